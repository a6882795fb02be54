//! Compact JOSE plumbing shared by signing and verification: base64url and
//! the protected header.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize};

/// base64url without padding (RFC 7515 §2). The engine also refuses
/// non-zero trailing bits, so each byte string has exactly one encoding and
/// a signed part cannot be re-spelled.
pub(crate) fn b64_encode(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

pub(crate) fn b64_encode_into(bytes: &[u8], out: &mut String) {
    URL_SAFE_NO_PAD.encode_string(bytes, out);
}

pub(crate) fn b64_decode(text: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(text).ok()
}

/// JOSE `alg` / `enc` names.
pub(crate) const ALG_DIR: &str = "dir";
pub(crate) const ENC_A256GCM: &str = "A256GCM";
pub(crate) const ALG_EDDSA: &str = "EdDSA";
pub(crate) const ALG_ES256: &str = "ES256";

/// The protected header as read from a token. Only the parameters this crate
/// acts on are named; others (`cty`, `jku`, `jwk`, `x5c`, ...) are ignored,
/// which is safe because keys come only from the configured ring, never from
/// the token. Duplicate names are refused by serde.
#[derive(Deserialize)]
pub(crate) struct ReadHeader {
    pub alg: String,
    #[serde(default)]
    pub enc: Option<String>,
    #[serde(default)]
    pub kid: Option<String>,
    #[serde(default)]
    pub typ: Option<String>,
    /// Present at all (even `null`): compression is refused, since it turns
    /// a size limit into a decompression bomb and leaks via lengths.
    #[serde(default, deserialize_with = "present")]
    pub zip: bool,
    /// Present at all: `crit` names extensions the reader must understand,
    /// and this reader understands none.
    #[serde(default, deserialize_with = "present")]
    pub crit: bool,
}

fn present<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    serde::de::IgnoredAny::deserialize(d).map(|_| true)
}

impl ReadHeader {
    /// `typ` is optional; when present it must say this is a JWT, so a JOSE
    /// object minted for another purpose with the same key is not taken as a
    /// login token. Media type names are case-insensitive (RFC 7515 §4.1.9).
    pub fn typ_ok(&self) -> bool {
        match &self.typ {
            None => true,
            Some(t) => t.eq_ignore_ascii_case("JWT") || t.eq_ignore_ascii_case("application/jwt"),
        }
    }
}

/// The protected header as minted.
#[derive(Serialize)]
pub(crate) struct WriteHeader<'a> {
    pub alg: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enc: Option<&'a str>,
    pub typ: &'a str,
    pub kid: &'a str,
}
