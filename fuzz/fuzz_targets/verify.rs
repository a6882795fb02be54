//! Any string as a login token: verification never panics, and only the
//! fixture keys' genuine tokens verify.
#![no_main]

use std::sync::OnceLock;

use guildchat_auth::{KeyRing, Verifier};
use libfuzzer_sys::fuzz_target;

/// A moment inside the fixture tokens' lifetime.
const NOW: i64 = 1_800_000_000;

fn verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| {
        let ring = KeyRing::from_toml_str(include_str!("../keys.toml")).expect("fixture ring");
        Verifier::new(&ring, "guildchat", 30).expect("fixture verifier")
    })
}

fuzz_target!(|data: &[u8]| {
    let token = String::from_utf8_lossy(data);
    if let Ok(claims) = verifier().verify(&token, NOW) {
        // Every fixture token names player 42; nothing else can be forged.
        assert_eq!(claims.user_id, 42);
    }
});
