//! Any bytes a client may send as a binary frame: decoding never panics,
//! and what decodes encodes back to a frame that decodes to the same
//! message.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|frame: &[u8]| {
    if let Ok(msg) = guildchat_protocol::decode_client(frame) {
        let again = guildchat_protocol::decode_client(&msg.encode())
            .expect("a decoded message re-encodes to a decodable frame");
        assert_eq!(again, msg);
    }
});
