//! Login tokens for guildchat: a game's logic server mints a token when a
//! player logs in, and the chat server verifies it offline, with no call back
//! to the game. This crate owns the token formats (compact JOSE: a `dir` +
//! `A256GCM` JWE, or an `EdDSA` / `ES256` JWS, so any language's JOSE library
//! can mint them), the keys (a [`KeyRing`] stored as TOML `[[keys]]` tables)
//! and the claims a token carries ([`Claims`]).
//!
//! What it must never do, and why:
//! - No I/O besides parsing the strings handed to it: reading and writing key
//!   files belongs to the server and the CLI, which know where files live and
//!   how to report failures to a person.
//! - No clock reads inside [`Verifier::verify`]: the caller passes `now`, so
//!   every time check is testable and one request sees one instant.
//! - Never accept `alg: none`, or any algorithm not configured for a key: the
//!   header is attacker-controlled, so it may only *select* a key, never
//!   choose how that key is used.
//! - Never let a key verify with an algorithm other than its own: each key
//!   carries exactly one [`KeyAlg`], and a header naming anything else is
//!   refused with [`TokenError::AlgNotAllowed`] before any cryptography runs.

#![forbid(unsafe_code)]

mod claims;
mod error;
mod jose;
mod keys;
mod sign;
mod verify;

#[cfg(test)]
mod tests;

pub use claims::Claims;
pub use error::{KeyError, TokenError};
pub use keys::{KeyAlg, KeyEntry, KeyRing, TokenFormat};
pub use sign::Signer;
pub use verify::{Verifier, MAX_TOKEN_LEN};
