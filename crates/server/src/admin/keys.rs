//! Who is calling the admin API: the configured keys, their scopes, and the
//! `Authorization: Bearer` check.
//!
//! Keys are compared in constant time, so response timing says nothing
//! about how much of a guessed key was right. This module never logs a key
//! and never shows one in `Debug`.

use std::fmt;

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use serde::Deserialize;
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::AdminState;

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// The GET routes.
    Read,
    /// Moderation (kick, mute, ban, revoke, recall, filter, audit, reload),
    /// and everything `read` may do.
    Gm,
    /// Membership, announcements, and everything `read` may do.
    Logic,
}

/// One `[[admin.keys]]` entry.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AdminKey {
    /// A name for the key, recorded in the audit log.
    pub id: String,
    pub key: String,
    pub scope: Scope,
}

impl fmt::Debug for AdminKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminKey")
            .field("id", &self.id)
            .field("key", &"<redacted>")
            .field("scope", &self.scope)
            .finish()
    }
}

/// The shortest key accepted at start-up: a guessable key on an API that
/// can ban players is a hole.
pub const MIN_KEY_LEN: usize = 16;

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    Read,
    Gm,
    Logic,
}

impl Need {
    fn allowed(self, scope: Scope) -> bool {
        match self {
            Need::Read => true,
            Need::Gm => scope == Scope::Gm,
            Need::Logic => scope == Scope::Logic,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Need::Read => "reading",
            Need::Gm => "moderation (scope gm)",
            Need::Logic => "membership and announcements (scope logic)",
        }
    }
}

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub id: String,
    pub scope: Scope,
}

impl Caller {
    /// Refuses with 403 unless the caller's scope covers `need`.
    pub fn need(&self, need: Need) -> Result<(), ApiError> {
        if need.allowed(self.scope) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(need.name()))
        }
    }
}

/// Finds the key a bearer token names. Every configured key is compared,
/// whatever matched first, so the time taken does not say which one did.
pub fn find<'a>(keys: &'a [AdminKey], presented: &[u8]) -> Option<&'a AdminKey> {
    let mut found = None;
    for key in keys {
        if bool::from(key.key.as_bytes().ct_eq(presented)) {
            found = Some(key);
        }
    }
    found
}

impl FromRequestParts<AdminState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AdminState,
    ) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(AUTHORIZATION)
            .ok_or(ApiError::Unauthorized)?;
        let token = header
            .as_bytes()
            .strip_prefix(b"Bearer ")
            .ok_or(ApiError::Unauthorized)?;
        let key = find(&state.keys, token).ok_or(ApiError::Unauthorized)?;
        // Per key, so one runaway script cannot starve the other callers.
        if let Err(not_until) = state.limiter.check_key(&key.id) {
            let wait = not_until.wait_time_from(governor::clock::Clock::now(
                &governor::clock::DefaultClock::default(),
            ));
            return Err(ApiError::TooMany(wait.as_millis().max(1) as u64));
        }
        Ok(Caller {
            id: key.id.clone(),
            scope: key.scope,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str, key: &str, scope: Scope) -> AdminKey {
        AdminKey {
            id: id.into(),
            key: key.into(),
            scope,
        }
    }

    #[test]
    fn a_key_is_found_only_by_its_exact_bytes() {
        let keys = [
            key("a", "aaaaaaaaaaaaaaaa", Scope::Read),
            key("b", "bbbbbbbbbbbbbbbb", Scope::Gm),
        ];
        assert_eq!(
            find(&keys, b"bbbbbbbbbbbbbbbb").map(|k| k.id.as_str()),
            Some("b")
        );
        assert!(find(&keys, b"bbbbbbbbbbbbbbb").is_none());
        assert!(find(&keys, b"bbbbbbbbbbbbbbbbb").is_none());
        assert!(find(&keys, b"").is_none());
    }

    #[test]
    fn scopes_cover_read_and_their_own_routes_only() {
        let gm = Caller {
            id: "g".into(),
            scope: Scope::Gm,
        };
        let logic = Caller {
            id: "l".into(),
            scope: Scope::Logic,
        };
        let read = Caller {
            id: "r".into(),
            scope: Scope::Read,
        };
        assert!(gm.need(Need::Read).is_ok() && gm.need(Need::Gm).is_ok());
        assert!(gm.need(Need::Logic).is_err());
        assert!(logic.need(Need::Logic).is_ok() && logic.need(Need::Gm).is_err());
        assert!(read.need(Need::Read).is_ok());
        assert!(read.need(Need::Gm).is_err() && read.need(Need::Logic).is_err());
    }

    #[test]
    fn debug_never_shows_the_key() {
        let k = key("x", "supersecretkey123", Scope::Gm);
        assert!(!format!("{k:?}").contains("supersecret"));
    }
}
