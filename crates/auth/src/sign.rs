//! Token minting, for the game side, the CLI and tests.

use std::fmt;

use aes_gcm::aead::{AeadInOut, Nonce};
use aes_gcm::Aes256Gcm;
use ed25519_dalek::Signer as _;

use crate::claims::{Claims, WireClaims};
use crate::error::KeyError;
use crate::jose::{
    b64_encode, b64_encode_into, WriteHeader, ALG_DIR, ALG_EDDSA, ALG_ES256, ENC_A256GCM,
};
use crate::keys::{KeyAlg, KeyRing, Material, TokenFormat};

/// Mints tokens with one key of a ring.
pub struct Signer {
    kid: String,
    alg: KeyAlg,
    /// The encoded protected header, fixed per key, computed once.
    header_b64: String,
    key: SignKey,
}

enum SignKey {
    Dir(Box<Aes256Gcm>),
    EdDSA(Box<ed25519_dalek::SigningKey>),
    Es256(Box<p256::ecdsa::SigningKey>),
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signer")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// Picks the key with this kid (it must have a secret and make `format`
    /// tokens), or with `kid` `None` the first key in ring order usable for
    /// `format` (JWE needs a `dir+A256GCM` key, JWS an EdDSA or ES256 key
    /// with a secret). The whole ring is validated first, so a signer is
    /// never built from a ring the verifier would refuse.
    pub fn new(ring: &KeyRing, format: TokenFormat, kid: Option<&str>) -> Result<Signer, KeyError> {
        let parsed = ring.parse()?;
        let mut candidates = ring.keys.iter().zip(parsed);
        let (entry, material) = match kid {
            Some(kid) => {
                let (entry, material) = candidates
                    .find(|(e, _)| e.kid == kid)
                    .ok_or_else(|| KeyError::UnknownKid(kid.to_owned()))?;
                if entry.alg.format() != format {
                    return Err(KeyError::WrongFormat {
                        kid: entry.kid.clone(),
                        alg: entry.alg,
                        format,
                    });
                }
                if !material.has_secret() {
                    return Err(KeyError::MissingSecret {
                        kid: entry.kid.clone(),
                        alg: entry.alg,
                    });
                }
                (entry, material)
            }
            None => candidates
                .find(|(e, m)| e.alg.format() == format && m.has_secret())
                .ok_or(KeyError::NoUsableKey(format))?,
        };
        let key = match material {
            Material::Dir(cipher) => SignKey::Dir(cipher),
            Material::EdDSA {
                secret: Some(sk), ..
            } => SignKey::EdDSA(sk),
            Material::Es256 {
                secret: Some(sk), ..
            } => SignKey::Es256(sk),
            // Both branches above only pass keys that have a secret.
            Material::EdDSA { secret: None, .. } | Material::Es256 { secret: None, .. } => {
                return Err(KeyError::MissingSecret {
                    kid: entry.kid.clone(),
                    alg: entry.alg,
                })
            }
        };
        let (alg, enc) = match entry.alg {
            KeyAlg::Dir => (ALG_DIR, Some(ENC_A256GCM)),
            KeyAlg::EdDSA => (ALG_EDDSA, None),
            KeyAlg::Es256 => (ALG_ES256, None),
        };
        let header = WriteHeader {
            alg,
            enc,
            typ: "JWT",
            kid: &entry.kid,
        };
        let header_json =
            serde_json::to_vec(&header).expect("a struct of string fields serializes to JSON");
        Ok(Signer {
            kid: entry.kid.clone(),
            alg: entry.alg,
            header_b64: b64_encode(&header_json),
            key,
        })
    }

    /// The kid this signer puts in its tokens.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The algorithm of this signer's key.
    pub fn alg(&self) -> KeyAlg {
        self.alg
    }

    /// Mints a token carrying `claims`. A JWE gets a fresh random 12-byte IV
    /// per token: reusing an IV under one AES-GCM key would reveal the XOR
    /// of two plaintexts and allow tag forgery.
    ///
    /// # Panics
    /// If the operating system's random number generator fails while making
    /// a JWE IV; use [`Signer::try_mint`] to get an error instead.
    pub fn mint(&self, claims: &Claims) -> String {
        match self.try_mint(claims) {
            Ok(token) => token,
            // There is no safe token to return without fresh randomness.
            Err(e) => panic!("cannot mint a token: {e}"),
        }
    }

    /// [`Signer::mint`], reporting a random number generator failure.
    pub fn try_mint(&self, claims: &Claims) -> Result<String, KeyError> {
        let payload = serde_json::to_vec(&WireClaims::from(claims))
            .expect("strings and integers with string keys serialize to JSON");
        let mut out = String::with_capacity(self.header_b64.len() + payload.len() * 2 + 128);
        out.push_str(&self.header_b64);
        match &self.key {
            SignKey::EdDSA(sk) => {
                out.push('.');
                b64_encode_into(&payload, &mut out);
                let sig = sk.sign(out.as_bytes());
                out.push('.');
                b64_encode_into(&sig.to_bytes(), &mut out);
            }
            SignKey::Es256(sk) => {
                out.push('.');
                b64_encode_into(&payload, &mut out);
                let sig: p256::ecdsa::Signature =
                    p256::ecdsa::signature::Signer::sign(sk.as_ref(), out.as_bytes());
                out.push('.');
                b64_encode_into(&sig.to_bytes(), &mut out);
            }
            SignKey::Dir(cipher) => {
                let mut iv = [0u8; 12];
                getrandom::fill(&mut iv).map_err(KeyError::Random)?;
                let nonce = Nonce::<Aes256Gcm>::from(iv);
                let mut data = payload;
                // AES-GCM only fails for plaintexts over 64 GiB or AAD over
                // 2^61 bytes; claims and header are tiny.
                let tag = cipher
                    .encrypt_inout_detached(
                        &nonce,
                        self.header_b64.as_bytes(),
                        data.as_mut_slice().into(),
                    )
                    .expect("claims are far below AES-GCM's length limits");
                // Empty encrypted key: `dir` uses the shared key directly.
                out.push_str("..");
                b64_encode_into(&iv, &mut out);
                out.push('.');
                b64_encode_into(&data, &mut out);
                out.push('.');
                b64_encode_into(&tag, &mut out);
            }
        }
        Ok(out)
    }
}
