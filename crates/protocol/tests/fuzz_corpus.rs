//! Replays the committed fuzz corpus (`fuzz/corpus/decode_client`,
//! `fuzz/corpus/peek_msgid` and `fuzz/corpus/decode_json`), and random
//! mutations of it, through the properties the fuzz targets check, so the
//! normal suite keeps what fuzzing found.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::OnceLock;

use guildchat_protocol::{codec, decode_client, json, peek_msgid};
use proptest::prelude::*;

/// This crate's directory, read when the test runs: a test binary reused
/// from a target dir another checkout built must read this checkout's
/// corpus.
fn crate_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

fn read_corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = crate_dir().join("../../fuzz/corpus").join(target);
    let mut frames: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| std::fs::read(entry.unwrap().path()).unwrap())
        .collect();
    frames.sort();
    frames
}

/// Both targets' corpora, read once.
fn corpus() -> &'static [Vec<u8>] {
    static CORPUS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    CORPUS.get_or_init(|| {
        let mut all = read_corpus("decode_client");
        all.extend(read_corpus("peek_msgid"));
        all
    })
}

/// What both fuzz targets assert about one frame.
fn check(frame: &[u8]) {
    let _ = peek_msgid(frame);
    let _ = codec::peek_seq(frame);
    if let Ok(msg) = decode_client(frame) {
        let canonical = msg.encode();
        assert!(peek_msgid(&canonical).is_some(), "{frame:?}");
        assert_eq!(codec::peek_seq(&canonical), msg.seq(), "{frame:?}");
        assert_eq!(decode_client(&canonical).as_ref(), Ok(&msg), "{frame:?}");
    }
}

/// The JSON target's corpus, read once.
fn json_corpus() -> &'static [Vec<u8>] {
    static CORPUS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    CORPUS.get_or_init(|| read_corpus("decode_json"))
}

/// What the JSON fuzz target asserts about one text frame.
fn check_json(text: &[u8]) {
    let _ = json::peek_seq(text);
    if let Ok(msg) = json::decode_client(text) {
        let out = msg.to_json().unwrap();
        assert_eq!(json::decode_client(&out).as_ref(), Ok(&msg), "{text:?}");
        assert_eq!(decode_client(&msg.encode()).as_ref(), Ok(&msg), "{text:?}");
        assert_eq!(json::peek_seq(text), msg.seq(), "{text:?}");
    }
}

#[test]
fn every_json_corpus_frame_keeps_the_codec_properties() {
    let mut decoded = 0;
    for text in json_corpus() {
        check_json(text);
        decoded += usize::from(json::decode_client(text).is_ok());
    }
    // The seeds hold one valid frame of every request type.
    assert!(decoded >= 9, "only {decoded} JSON corpus frames decode");
}

#[test]
fn every_corpus_frame_keeps_the_codec_properties() {
    let mut decoded = 0;
    for frame in corpus() {
        check(frame);
        decoded += usize::from(decode_client(frame).is_ok());
    }
    // The seeds hold one valid frame of every request type.
    assert!(decoded >= 7, "only {decoded} corpus frames decode");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn mutated_corpus_frames_keep_the_codec_properties(
        pick in any::<prop::sample::Index>(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8),
    ) {
        let all = corpus();
        let mut frame = all[pick.index(all.len())].clone();
        for (at, byte, kind) in edits {
            match kind {
                0 if !frame.is_empty() => {
                    let i = at.index(frame.len());
                    frame[i] = byte;
                }
                1 => {
                    let i = at.index(frame.len() + 1);
                    frame.insert(i, byte);
                }
                _ if !frame.is_empty() => {
                    let i = at.index(frame.len());
                    frame.truncate(i);
                }
                _ => frame.push(byte),
            }
        }
        check(&frame);
    }

    #[test]
    fn mutated_json_corpus_frames_keep_the_codec_properties(
        pick in any::<prop::sample::Index>(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8),
    ) {
        let all = json_corpus();
        let mut text = all[pick.index(all.len())].clone();
        for (at, byte, kind) in edits {
            match kind {
                0 if !text.is_empty() => {
                    let i = at.index(text.len());
                    text[i] = byte;
                }
                1 => {
                    let i = at.index(text.len() + 1);
                    text.insert(i, byte);
                }
                _ if !text.is_empty() => {
                    let i = at.index(text.len());
                    text.truncate(i);
                }
                _ => text.push(byte),
            }
        }
        check_json(&text);
    }
}
