//! Error types. Token errors are deliberately coarse and carry only static
//! text: they may be reported to an untrusted client, and must not echo
//! attacker-supplied bytes or reveal which key exists.

use crate::keys::{KeyAlg, TokenFormat};

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a well-formed compact JWS/JWE we support (size, parts, base64,
    /// header JSON, `crit`, `zip`, ...).
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// The header's `kid` names no configured key, or no `kid` was given and
    /// no single key of the header's algorithm exists.
    #[error("token names no key known to this server")]
    UnknownKey,
    /// The header's `alg` (or `enc`) is not exactly what the selected key
    /// allows; this includes `none` and every unsupported algorithm.
    #[error("token algorithm is not allowed for its key")]
    AlgNotAllowed,
    /// The signature or authentication tag does not verify.
    #[error("token signature or authentication tag is invalid")]
    BadSignature,
    /// `now` is past `exp` plus the leeway.
    #[error("token has expired")]
    Expired,
    /// `now` plus the leeway is before `nbf`.
    #[error("token is not valid yet")]
    NotYetValid,
    /// The token has no `aud`, or its `aud` does not name this server.
    #[error("token was not issued for this server")]
    WrongAudience,
    /// The authenticated payload is not a valid claims set.
    #[error("invalid token claims: {0}")]
    BadClaims(&'static str),
}

/// A problem with configured keys: loading a ring, building a verifier or a
/// signer, or generating a key. Messages name the key's `kid`.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key ring is not valid TOML: {0}")]
    Toml(#[from] toml::de::Error),
    #[error("a key has an empty kid")]
    EmptyKid,
    #[error("kid {0:?} is used by more than one key")]
    DuplicateKid(String),
    #[error("key {kid:?}: `{field}` is not base64url without padding")]
    BadBase64 { kid: String, field: &'static str },
    #[error("key {kid:?}: `{field}` is {got} bytes, expected {expected}")]
    BadLength {
        kid: String,
        field: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("key {kid:?}: `{field}` is not a valid {alg} key")]
    InvalidKey {
        kid: String,
        alg: KeyAlg,
        field: &'static str,
    },
    #[error("key {kid:?}: a {alg} key needs a `secret`")]
    MissingSecret { kid: String, alg: KeyAlg },
    #[error("key {kid:?}: a {alg} key needs a `public` or a `secret`")]
    MissingKey { kid: String, alg: KeyAlg },
    #[error("key {kid:?}: a {alg} key is a shared secret and takes no `public`")]
    UnexpectedPublic { kid: String, alg: KeyAlg },
    #[error("key {kid:?}: `public` does not belong to `secret`")]
    Mismatch { kid: String },
    #[error("no key with kid {0:?}")]
    UnknownKid(String),
    #[error("key {kid:?} is a {alg} key and cannot make {format} tokens")]
    WrongFormat {
        kid: String,
        alg: KeyAlg,
        format: TokenFormat,
    },
    #[error("the key ring has no key with a secret that can mint {0} tokens")]
    NoUsableKey(TokenFormat),
    #[error("the key ring has no keys")]
    EmptyRing,
    #[error("the audience must not be empty")]
    EmptyAudience,
    #[error("the operating system's random number generator failed: {0}")]
    Random(getrandom::Error),
}
