//! Offline token verification.

use std::collections::HashMap;
use std::fmt;

use aes_gcm::aead::{AeadInOut, Nonce, Tag};
use aes_gcm::Aes256Gcm;
use ed25519_dalek::Signature as EdSignature;
use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::Signature as EsSignature;

use crate::claims::{Claims, WireClaims};
use crate::error::{KeyError, TokenError};
use crate::jose::{b64_decode, ReadHeader, ALG_DIR, ALG_EDDSA, ALG_ES256, ENC_A256GCM};
use crate::keys::{KeyAlg, KeyRing, Material};

/// Longest token accepted, in bytes. Checked before any decoding so that a
/// hostile client cannot make the server base64-decode or parse megabytes.
pub const MAX_TOKEN_LEN: usize = 4096;

const IV_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// Checks tokens against a key ring. Keys are parsed once in
/// [`Verifier::new`]; `verify` takes `&self`, so one `Verifier` can be
/// shared (e.g. in an `Arc`) by every connection task.
pub struct Verifier {
    keys: Vec<VerifyKey>,
    by_kid: HashMap<String, usize>,
    /// For tokens without `kid`: the index of the only key of each
    /// algorithm, if exactly one exists (see [`Verifier::verify`]).
    sole: [Option<usize>; 3],
    audience: String,
    leeway_secs: u64,
}

struct VerifyKey {
    kid: String,
    alg: KeyAlg,
    material: Material,
}

fn alg_slot(alg: KeyAlg) -> usize {
    match alg {
        KeyAlg::Dir => 0,
        KeyAlg::EdDSA => 1,
        KeyAlg::Es256 => 2,
    }
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys: Vec<_> = self.keys.iter().map(|k| (&k.kid, k.alg)).collect();
        f.debug_struct("Verifier")
            .field("keys", &keys)
            .field("audience", &self.audience)
            .field("leeway_secs", &self.leeway_secs)
            .finish()
    }
}

impl Verifier {
    /// Validates and parses every key of `ring` (secrets of asymmetric keys
    /// are not needed and may be absent). `audience` is the `aud` value
    /// tokens must carry; `leeway_secs` absorbs clock skew between the
    /// minting game server and this one, for `exp` and `nbf`.
    pub fn new(ring: &KeyRing, audience: &str, leeway_secs: u64) -> Result<Verifier, KeyError> {
        if audience.is_empty() {
            return Err(KeyError::EmptyAudience);
        }
        let parsed = ring.parse()?;
        if parsed.is_empty() {
            return Err(KeyError::EmptyRing);
        }
        let mut keys = Vec::with_capacity(parsed.len());
        let mut by_kid = HashMap::with_capacity(parsed.len());
        let mut count = [0usize; 3];
        let mut sole = [None; 3];
        for (i, (entry, material)) in ring.keys.iter().zip(parsed).enumerate() {
            by_kid.insert(entry.kid.clone(), i);
            let slot = alg_slot(entry.alg);
            count[slot] += 1;
            sole[slot] = Some(i);
            keys.push(VerifyKey {
                kid: entry.kid.clone(),
                alg: entry.alg,
                material,
            });
        }
        for (slot, n) in sole.iter_mut().zip(count) {
            if n != 1 {
                *slot = None;
            }
        }
        Ok(Verifier {
            keys,
            by_kid,
            sole,
            audience: audience.to_owned(),
            leeway_secs,
        })
    }

    /// Verifies `token` at time `now` (Unix seconds) and returns its claims.
    ///
    /// Order of checks: size and shape, header (`crit` and `zip` refused,
    /// `typ` if present must be JWT), algorithm, key, then the signature or
    /// authentication tag, and only then the claims, so nothing in an
    /// unauthenticated payload is ever interpreted. Then `exp`
    /// (`now > exp + leeway` is [`TokenError::Expired`]), `nbf`
    /// (`now + leeway < nbf` is [`TokenError::NotYetValid`]) and `aud`.
    ///
    /// Key selection: the header's `kid` picks the key, and the header's
    /// `alg` (and, for JWE, `enc`) must be exactly that key's. A token
    /// without `kid` is accepted only when the ring holds exactly one key of
    /// the header's algorithm; with none or several it is
    /// [`TokenError::UnknownKey`], because guessing among keys would let a
    /// token meant for one key be tried against another.
    ///
    /// Audience: the token must carry `aud` and it must contain this
    /// verifier's audience. A token without `aud` is refused
    /// ([`TokenError::WrongAudience`]): tokens must be minted for this
    /// server, so one issued by the same game for another service cannot be
    /// replayed here.
    pub fn verify(&self, token: &str, now: i64) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed("token longer than 4096 bytes"));
        }
        let mut parts = [""; 5];
        let mut n = 0;
        for part in token.split('.') {
            if n == parts.len() {
                return Err(TokenError::Malformed("too many parts"));
            }
            parts[n] = part;
            n += 1;
        }
        if n != 3 && n != 5 {
            return Err(TokenError::Malformed(
                "token must have 3 (JWS) or 5 (JWE) parts",
            ));
        }

        let header_json =
            b64_decode(parts[0]).ok_or(TokenError::Malformed("header is not base64url"))?;
        let header: ReadHeader = serde_json::from_slice(&header_json)
            .map_err(|_| TokenError::Malformed("header is not a valid JOSE header"))?;
        if header.crit {
            return Err(TokenError::Malformed("crit header is not supported"));
        }
        if header.zip {
            return Err(TokenError::Malformed("compressed tokens are not supported"));
        }
        if !header.typ_ok() {
            return Err(TokenError::Malformed("typ is not JWT"));
        }

        // The part count and the presence of `enc` must agree on the format;
        // then the algorithm must be one this crate implements at all.
        let alg = match (n, header.enc.as_deref()) {
            (5, Some(enc)) => {
                if header.alg == ALG_DIR && enc == ENC_A256GCM {
                    KeyAlg::Dir
                } else {
                    return Err(TokenError::AlgNotAllowed);
                }
            }
            (5, None) => return Err(TokenError::Malformed("JWE header lacks enc")),
            (_, Some(_)) => return Err(TokenError::Malformed("JWS header has enc")),
            (_, None) => match header.alg.as_str() {
                ALG_EDDSA => KeyAlg::EdDSA,
                ALG_ES256 => KeyAlg::Es256,
                // `none`, HS256, RS256, `dir` without a JWE shape, ...
                _ => return Err(TokenError::AlgNotAllowed),
            },
        };

        let key = self.select(header.kid.as_deref(), alg)?;
        let payload = match &key.material {
            Material::Dir(cipher) => open_jwe(cipher, &parts)?,
            Material::EdDSA { public, .. } => {
                let JwsParts {
                    input,
                    payload,
                    sig,
                } = jws_parts(token, &parts)?;
                let sig = EdSignature::from_slice(&sig).map_err(|_| TokenError::BadSignature)?;
                // verify_strict: refuses non-canonical and small-order
                // encodings, so a signature cannot be re-spelled.
                public
                    .verify_strict(input, &sig)
                    .map_err(|_| TokenError::BadSignature)?;
                payload
            }
            Material::Es256 { public, .. } => {
                let JwsParts {
                    input,
                    payload,
                    sig,
                } = jws_parts(token, &parts)?;
                // Raw r||s per RFC 7518 §3.4; a DER signature has another
                // length and is refused here.
                let sig = EsSignature::from_slice(&sig).map_err(|_| TokenError::BadSignature)?;
                public
                    .verify(input, &sig)
                    .map_err(|_| TokenError::BadSignature)?;
                payload
            }
        };

        let wire: WireClaims = serde_json::from_slice(&payload)
            .map_err(|_| TokenError::BadClaims("not a JSON claims set with sub, name and exp"))?;
        let claims = wire.into_claims().map_err(TokenError::BadClaims)?;
        self.check_claims(&claims, now)?;
        Ok(claims)
    }

    fn select(&self, kid: Option<&str>, alg: KeyAlg) -> Result<&VerifyKey, TokenError> {
        let index = match kid {
            Some(kid) => *self.by_kid.get(kid).ok_or(TokenError::UnknownKey)?,
            None => self.sole[alg_slot(alg)].ok_or(TokenError::UnknownKey)?,
        };
        let key = &self.keys[index];
        if key.alg != alg {
            return Err(TokenError::AlgNotAllowed);
        }
        Ok(key)
    }

    fn check_claims(&self, claims: &Claims, now: i64) -> Result<(), TokenError> {
        // i128 so that a hostile exp/nbf near i64::MAX, or a huge leeway,
        // cannot overflow.
        let now = i128::from(now);
        let leeway = i128::from(self.leeway_secs);
        if now > i128::from(claims.exp) + leeway {
            return Err(TokenError::Expired);
        }
        if let Some(nbf) = claims.nbf {
            if now + leeway < i128::from(nbf) {
                return Err(TokenError::NotYetValid);
            }
        }
        if !claims.aud.contains(&self.audience) {
            return Err(TokenError::WrongAudience);
        }
        Ok(())
    }
}

/// A JWS split up: the signing input is the token's own text, so what is
/// verified is exactly what was sent.
struct JwsParts<'t> {
    input: &'t [u8],
    payload: Vec<u8>,
    sig: Vec<u8>,
}

fn jws_parts<'t>(token: &'t str, parts: &[&str; 5]) -> Result<JwsParts<'t>, TokenError> {
    let input_len = parts[0].len() + 1 + parts[1].len();
    Ok(JwsParts {
        input: &token.as_bytes()[..input_len],
        payload: b64_decode(parts[1]).ok_or(TokenError::Malformed("payload is not base64url"))?,
        sig: b64_decode(parts[2]).ok_or(TokenError::Malformed("signature is not base64url"))?,
    })
}

/// Decrypts a `dir` + `A256GCM` JWE (RFC 7516 §5.2) and returns the
/// plaintext. The AAD is the encoded protected header, so the header is
/// authenticated along with the claims.
fn open_jwe(cipher: &Aes256Gcm, parts: &[&str; 5]) -> Result<Vec<u8>, TokenError> {
    if !parts[1].is_empty() {
        return Err(TokenError::Malformed(
            "dir JWE must have an empty encrypted key",
        ));
    }
    let iv = b64_decode(parts[2]).ok_or(TokenError::Malformed("IV is not base64url"))?;
    let mut data =
        b64_decode(parts[3]).ok_or(TokenError::Malformed("ciphertext is not base64url"))?;
    let tag = b64_decode(parts[4]).ok_or(TokenError::Malformed("tag is not base64url"))?;
    if iv.len() != IV_LEN {
        return Err(TokenError::Malformed("IV is not 12 bytes"));
    }
    if tag.len() != TAG_LEN {
        return Err(TokenError::Malformed("tag is not 16 bytes"));
    }
    let nonce = Nonce::<Aes256Gcm>::try_from(iv.as_slice())
        .map_err(|_| TokenError::Malformed("IV is not 12 bytes"))?;
    let tag = Tag::<Aes256Gcm>::try_from(tag.as_slice())
        .map_err(|_| TokenError::Malformed("tag is not 16 bytes"))?;
    cipher
        .decrypt_inout_detached(
            &nonce,
            parts[0].as_bytes(),
            data.as_mut_slice().into(),
            &tag,
        )
        .map_err(|_| TokenError::BadSignature)?;
    Ok(data)
}
