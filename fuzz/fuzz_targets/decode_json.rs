//! Any bytes a client may send as a text frame (the JSON codec, reached
//! before login when the first frame decides): decoding never panics, a
//! head read from it agrees with a full decode, and what decodes encodes
//! back to JSON that decodes to the same message (and to protobuf that
//! does too).
#![no_main]

use guildchat_protocol::json;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &[u8]| {
    let _ = json::peek_seq(text);
    if let Ok(msg) = json::decode_client(text) {
        let out = msg.to_json().expect("a decoded message encodes to JSON");
        let again = json::decode_client(&out).expect("our JSON decodes");
        assert_eq!(again, msg);
        let proto = guildchat_protocol::decode_client(&msg.encode()).expect("and to protobuf");
        assert_eq!(proto, msg);
        assert_eq!(json::peek_seq(text), msg.seq());
    }
});
