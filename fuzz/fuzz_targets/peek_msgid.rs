//! The frame-type peek run before decoding: it never panics or reads past
//! the frame, and every frame this protocol's encoder writes (head first)
//! is peekable.
#![no_main]

use guildchat_protocol::{codec, decode_client, peek_msgid};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|frame: &[u8]| {
    let _ = peek_msgid(frame);
    let _ = codec::peek_seq(frame);
    if let Ok(msg) = decode_client(frame) {
        let canonical = msg.encode();
        assert!(peek_msgid(&canonical).is_some(), "an encoded frame has a peekable msgid");
        assert_eq!(codec::peek_seq(&canonical), msg.seq());
    }
});
