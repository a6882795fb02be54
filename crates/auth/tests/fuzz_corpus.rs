//! Replays the committed fuzz corpus of the token verifier
//! (`fuzz/corpus/verify`, keys in `fuzz/keys.toml`), and random mutations
//! of it, through the property the `verify` fuzz target checks: nothing
//! panics, and only the fixture's genuine tokens verify.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::OnceLock;

use guildchat_auth::{KeyRing, Verifier};
use proptest::prelude::*;

/// Inside the fixture tokens' lifetime, as in the fuzz target.
const NOW: i64 = 1_800_000_000;

/// Read when the test runs: a test binary reused from a target dir another
/// checkout built must read this checkout's corpus.
fn fuzz_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .join("../../fuzz")
}

fn verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| {
        let text = std::fs::read_to_string(fuzz_dir().join("keys.toml")).unwrap();
        Verifier::new(&KeyRing::from_toml_str(&text).unwrap(), "guildchat", 30).unwrap()
    })
}

fn corpus() -> &'static [Vec<u8>] {
    static CORPUS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    CORPUS.get_or_init(|| {
        let dir = fuzz_dir().join("corpus/verify");
        let mut tokens: Vec<Vec<u8>> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| std::fs::read(entry.unwrap().path()).unwrap())
            .collect();
        tokens.sort();
        tokens
    })
}

/// Whether `data` verifies; a token that does names the fixture's player.
fn check(data: &[u8]) -> bool {
    match verifier().verify(&String::from_utf8_lossy(data), NOW) {
        Ok(claims) => {
            assert_eq!(claims.user_id, 42, "{data:?}");
            true
        }
        Err(_) => false,
    }
}

#[test]
fn the_genuine_seed_tokens_verify_and_nothing_else_panics() {
    for kid in ["fuzz-ed25519", "fuzz-es256", "fuzz-aes"] {
        let token = std::fs::read(fuzz_dir().join("corpus/verify").join(kid)).unwrap();
        assert!(check(&token), "{kid}");
    }
    for token in corpus() {
        check(token);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn mutated_tokens_never_verify_as_anyone_else(
        pick in any::<prop::sample::Index>(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..6),
    ) {
        let all = corpus();
        let mut token = all[pick.index(all.len())].clone();
        for (at, byte, kind) in edits {
            match kind {
                0 if !token.is_empty() => {
                    let i = at.index(token.len());
                    token[i] = byte;
                }
                1 => {
                    let i = at.index(token.len() + 1);
                    token.insert(i, byte);
                }
                _ if !token.is_empty() => {
                    let i = at.index(token.len());
                    token.truncate(i);
                }
                _ => token.push(byte),
            }
        }
        check(&token);
    }
}
