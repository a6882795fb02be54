//! Keys: the TOML-stored [`KeyRing`], and the parsed key material that
//! signing and verification use.

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;

use aes_gcm::{Aes256Gcm, KeyInit};
use serde::{Deserialize, Serialize};

use crate::error::KeyError;
use crate::jose::{b64_decode, b64_encode};

/// What one key is for. A key is only ever used with its own algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KeyAlg {
    /// JWE with `alg: dir` and `enc: A256GCM`: a 32-byte shared secret.
    #[serde(rename = "dir+A256GCM")]
    Dir,
    /// JWS with `alg: EdDSA` over Ed25519.
    #[serde(rename = "EdDSA")]
    EdDSA,
    /// JWS with `alg: ES256` (ECDSA over P-256 with SHA-256).
    #[serde(rename = "ES256")]
    Es256,
}

impl KeyAlg {
    /// The name used in key files.
    pub fn name(self) -> &'static str {
        match self {
            KeyAlg::Dir => "dir+A256GCM",
            KeyAlg::EdDSA => "EdDSA",
            KeyAlg::Es256 => "ES256",
        }
    }

    /// The token format this key makes and checks.
    pub fn format(self) -> TokenFormat {
        match self {
            KeyAlg::Dir => TokenFormat::Jwe,
            KeyAlg::EdDSA | KeyAlg::Es256 => TokenFormat::Jws,
        }
    }

    /// Asymmetric keys can verify without their secret.
    fn is_asymmetric(self) -> bool {
        self != KeyAlg::Dir
    }
}

impl fmt::Display for KeyAlg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The two compact JOSE serializations a token can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenFormat {
    /// Encrypted (claims are hidden from the client): five parts.
    Jwe,
    /// Signed (claims are readable by the client): three parts.
    Jws,
}

impl fmt::Display for TokenFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TokenFormat::Jwe => "JWE",
            TokenFormat::Jws => "JWS",
        })
    }
}

impl FromStr for TokenFormat {
    type Err = String;

    /// `jwe` or `jws`, in any case (for command lines and config files).
    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("jwe") {
            Ok(TokenFormat::Jwe)
        } else if s.eq_ignore_ascii_case("jws") {
            Ok(TokenFormat::Jws)
        } else {
            Err(format!("unknown token format {s:?} (expected jwe or jws)"))
        }
    }
}

/// One configured key. `secret` is the AES key (32 bytes) or the private key
/// (Ed25519 32-byte seed, P-256 32-byte scalar); `public` is the public key
/// (Ed25519 32 bytes; P-256 SEC1 uncompressed 65 bytes). Both are stored
/// base64url without padding. `Debug` masks the secret.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyEntry {
    pub kid: String,
    pub alg: KeyAlg,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public: Option<String>,
}

impl fmt::Debug for KeyEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Key entries end up in logs via `{:?}`; only the fact that a secret
        // exists may be shown.
        f.debug_struct("KeyEntry")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("public", &self.public)
            .finish()
    }
}

/// A set of keys, stored as TOML `[[keys]]` tables:
///
/// ```toml
/// [[keys]]
/// kid = "game-2025"
/// alg = "EdDSA"
/// public = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRing {
    #[serde(default)]
    pub keys: Vec<KeyEntry>,
}

const AES_KEY_LEN: usize = 32;
const ED25519_SEED_LEN: usize = 32;
const ED25519_PUBLIC_LEN: usize = 32;
const P256_SCALAR_LEN: usize = 32;
const P256_PUBLIC_LEN: usize = 65;
/// SEC1 tag of an uncompressed point.
const SEC1_UNCOMPRESSED: u8 = 0x04;

impl KeyRing {
    /// Parses and validates a key ring: kids are non-empty and unique, every
    /// key decodes to the right length and is a valid key of its algorithm,
    /// `dir+A256GCM` keys have a secret (and no public), EdDSA/ES256 keys
    /// have a public or a secret, and when both are given they match. A
    /// missing public key is derived from the secret and filled in.
    pub fn from_toml_str(s: &str) -> Result<KeyRing, KeyError> {
        let mut ring: KeyRing = toml::from_str(s)?;
        let parsed = ring.parse()?;
        for (entry, material) in ring.keys.iter_mut().zip(&parsed) {
            if entry.public.is_none() {
                entry.public = material.public_b64();
            }
        }
        Ok(ring)
    }

    /// Runs the checks of [`KeyRing::from_toml_str`] on a ring built in code.
    pub fn validate(&self) -> Result<(), KeyError> {
        self.parse().map(drop)
    }

    /// The TOML form read by [`KeyRing::from_toml_str`].
    pub fn to_toml_string(&self) -> String {
        // The ring is a table holding an array of tables of strings; TOML
        // can represent every such value.
        toml::to_string(self).expect("a key ring always serializes to TOML")
    }

    /// A fresh random key. Asymmetric keys get both secret and public.
    pub fn generate(alg: KeyAlg, kid: &str) -> Result<KeyEntry, KeyError> {
        if kid.is_empty() {
            return Err(KeyError::EmptyKid);
        }
        let (secret, public) = match alg {
            KeyAlg::Dir => (random_32()?.to_vec(), None),
            KeyAlg::EdDSA => {
                let seed = random_32()?;
                let sk = ed25519_dalek::SigningKey::from_bytes(&seed);
                (seed.to_vec(), Some(sk.verifying_key().to_bytes().to_vec()))
            }
            KeyAlg::Es256 => {
                // A random 32-byte string is a valid scalar unless it is 0 or
                // >= the group order (probability about 2^-32), so a few
                // draws suffice; a bounded loop turns a broken RNG that keeps
                // returning the same invalid bytes into an error, not a hang.
                let mut key = None;
                for _ in 0..16 {
                    let bytes = random_32()?;
                    if let Ok(sk) = p256::ecdsa::SigningKey::from_slice(&bytes) {
                        key = Some((bytes, sk));
                        break;
                    }
                }
                let (bytes, sk) = key.ok_or(KeyError::Random(getrandom::Error::UNEXPECTED))?;
                let public = sk.verifying_key().to_sec1_point(false);
                (bytes.to_vec(), Some(public.as_bytes().to_vec()))
            }
        };
        Ok(KeyEntry {
            kid: kid.to_owned(),
            alg,
            secret: Some(b64_encode(&secret)),
            public: public.map(|p| b64_encode(&p)),
        })
    }

    /// A fresh development ring: one `dir+A256GCM` key with kid `dev-aes`
    /// and one EdDSA key with kid `dev-ed25519`. The keys are random, so two
    /// installations never share them; whoever mints must read the same
    /// ring (the server writes it to its key file on first start).
    pub fn dev() -> Result<KeyRing, KeyError> {
        Ok(KeyRing {
            keys: vec![
                KeyRing::generate(KeyAlg::Dir, "dev-aes")?,
                KeyRing::generate(KeyAlg::EdDSA, "dev-ed25519")?,
            ],
        })
    }

    /// The ring a verifier needs and nothing more: the secrets of EdDSA and
    /// ES256 keys are dropped (deriving the public key first if it was
    /// missing). `dir+A256GCM` keys are shared secrets that verification
    /// needs, so they are kept. An asymmetric entry whose secret cannot be
    /// parsed is kept without it and fails validation later.
    pub fn public_only(&self) -> KeyRing {
        let keys = self
            .keys
            .iter()
            .map(|e| {
                let mut e = e.clone();
                if e.alg.is_asymmetric() {
                    if e.public.is_none() {
                        e.public = Material::parse(&e).ok().and_then(|m| m.public_b64());
                    }
                    e.secret = None;
                }
                e
            })
            .collect();
        KeyRing { keys }
    }

    /// Checks the whole ring and parses every key, in ring order.
    pub(crate) fn parse(&self) -> Result<Vec<Material>, KeyError> {
        let mut seen = HashSet::new();
        for e in &self.keys {
            if e.kid.is_empty() {
                return Err(KeyError::EmptyKid);
            }
            if !seen.insert(e.kid.as_str()) {
                return Err(KeyError::DuplicateKid(e.kid.clone()));
            }
        }
        self.keys.iter().map(Material::parse).collect()
    }
}

fn random_32() -> Result<[u8; 32], KeyError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(KeyError::Random)?;
    Ok(bytes)
}

/// A key decoded and parsed once, so verification does no base64 or point
/// decoding per token.
pub(crate) enum Material {
    Dir(Box<Aes256Gcm>),
    EdDSA {
        secret: Option<Box<ed25519_dalek::SigningKey>>,
        public: ed25519_dalek::VerifyingKey,
    },
    Es256 {
        secret: Option<Box<p256::ecdsa::SigningKey>>,
        public: Box<p256::ecdsa::VerifyingKey>,
    },
}

impl Material {
    pub(crate) fn parse(e: &KeyEntry) -> Result<Material, KeyError> {
        let kid = e.kid.as_str();
        let invalid = |field| KeyError::InvalidKey {
            kid: kid.to_owned(),
            alg: e.alg,
            field,
        };
        match e.alg {
            KeyAlg::Dir => {
                if e.public.is_some() {
                    return Err(KeyError::UnexpectedPublic {
                        kid: kid.to_owned(),
                        alg: e.alg,
                    });
                }
                let secret = e.secret.as_deref().ok_or_else(|| KeyError::MissingSecret {
                    kid: kid.to_owned(),
                    alg: e.alg,
                })?;
                let key = decode_fixed::<AES_KEY_LEN>(kid, "secret", secret)?;
                let cipher = Aes256Gcm::new_from_slice(&key).map_err(|_| invalid("secret"))?;
                Ok(Material::Dir(Box::new(cipher)))
            }
            KeyAlg::EdDSA => {
                let secret = match e.secret.as_deref() {
                    Some(s) => {
                        let seed = decode_fixed::<ED25519_SEED_LEN>(kid, "secret", s)?;
                        Some(Box::new(ed25519_dalek::SigningKey::from_bytes(&seed)))
                    }
                    None => None,
                };
                let public = match (e.public.as_deref(), &secret) {
                    (Some(p), _) => {
                        let bytes = decode_fixed::<ED25519_PUBLIC_LEN>(kid, "public", p)?;
                        ed25519_dalek::VerifyingKey::from_bytes(&bytes)
                            .ok()
                            // A small-order key would accept forged
                            // signatures under lax verification; refuse it
                            // at load time even though verify_strict would.
                            .filter(|k| !k.is_weak())
                            .ok_or_else(|| invalid("public"))?
                    }
                    (None, Some(sk)) => sk.verifying_key(),
                    (None, None) => return Err(missing_key(e)),
                };
                if let Some(sk) = &secret {
                    if sk.verifying_key() != public {
                        return Err(KeyError::Mismatch {
                            kid: kid.to_owned(),
                        });
                    }
                }
                Ok(Material::EdDSA { secret, public })
            }
            KeyAlg::Es256 => {
                let secret = match e.secret.as_deref() {
                    Some(s) => {
                        let scalar = decode_fixed::<P256_SCALAR_LEN>(kid, "secret", s)?;
                        let sk = p256::ecdsa::SigningKey::from_slice(&scalar)
                            .map_err(|_| invalid("secret"))?;
                        Some(Box::new(sk))
                    }
                    None => None,
                };
                let public = match (e.public.as_deref(), &secret) {
                    (Some(p), _) => {
                        let bytes = decode_fixed::<P256_PUBLIC_LEN>(kid, "public", p)?;
                        // Only the uncompressed form is accepted so that a key
                        // has one spelling in files (and compares equal).
                        if bytes[0] != SEC1_UNCOMPRESSED {
                            return Err(invalid("public"));
                        }
                        p256::ecdsa::VerifyingKey::from_sec1_bytes(&bytes)
                            .map_err(|_| invalid("public"))?
                    }
                    (None, Some(sk)) => *sk.verifying_key(),
                    (None, None) => return Err(missing_key(e)),
                };
                if let Some(sk) = &secret {
                    if *sk.verifying_key() != public {
                        return Err(KeyError::Mismatch {
                            kid: kid.to_owned(),
                        });
                    }
                }
                Ok(Material::Es256 {
                    secret,
                    public: Box::new(public),
                })
            }
        }
    }

    /// Whether this key can mint tokens.
    pub(crate) fn has_secret(&self) -> bool {
        match self {
            Material::Dir(_) => true,
            Material::EdDSA { secret, .. } => secret.is_some(),
            Material::Es256 { secret, .. } => secret.is_some(),
        }
    }

    /// The public key in key-file form; `None` for shared-secret keys.
    fn public_b64(&self) -> Option<String> {
        match self {
            Material::Dir(_) => None,
            Material::EdDSA { public, .. } => Some(b64_encode(public.as_bytes())),
            Material::Es256 { public, .. } => {
                Some(b64_encode(public.to_sec1_point(false).as_bytes()))
            }
        }
    }
}

fn missing_key(e: &KeyEntry) -> KeyError {
    KeyError::MissingKey {
        kid: e.kid.clone(),
        alg: e.alg,
    }
}

fn decode_fixed<const N: usize>(
    kid: &str,
    field: &'static str,
    text: &str,
) -> Result<[u8; N], KeyError> {
    let bytes = b64_decode(text).ok_or_else(|| KeyError::BadBase64 {
        kid: kid.to_owned(),
        field,
    })?;
    let got = bytes.len();
    bytes.try_into().map_err(|_| KeyError::BadLength {
        kid: kid.to_owned(),
        field,
        expected: N,
        got,
    })
}
