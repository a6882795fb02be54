//! Micro-benchmarks of the per-message costs that the load generator can
//! only see in aggregate: encoding a chat notification (once per broadcast,
//! shared by every recipient), decoding a chat request (once per line a
//! client sends), and verifying a login token in each format the server
//! accepts (once per login).
//!
//! `cargo bench -p guildchat-server --bench codec`

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::time::{SystemTime, UNIX_EPOCH};

use criterion::{criterion_group, criterion_main, Criterion};
use guildchat_auth::{Claims, KeyAlg, KeyRing, Signer, TokenFormat, Verifier};
use guildchat_protocol::{codec, pb, ChatType, ClientMsg, MsgType};

/// A chat line as long as the bench's default (64 characters).
const TEXT: &str = "gcb:3:1:42:1795920000000000:xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn codec_benches(c: &mut Criterion) {
    let note = pb::ChatMessageNotifyChat {
        msghead: codec::head(MsgType::ChcNotifyChat, 0),
        chattype: ChatType::ChatWorld as i32,
        senderid: 1_000_001,
        strcontext: TEXT.into(),
        sendername: "b1000001".into(),
        msg_id: 1_838_000_000_000_000,
        time_ms: 1_795_920_000_000,
        ..Default::default()
    };
    c.bench_function("encode NotifyChat", |b| {
        b.iter(|| codec::encode(black_box(&note)))
    });

    let frame = ClientMsg::Chat(pb::ChatMessageChatReq {
        msghead: codec::head(MsgType::CchChatReq, 7),
        chattype: ChatType::ChatWorld as i32,
        context: TEXT.into(),
        ..Default::default()
    })
    .encode();
    c.bench_function("decode ChatReq", |b| {
        b.iter(|| codec::decode_client(black_box(&frame)))
    });
}

fn token_benches(c: &mut Criterion) {
    // unwrap: key generation only fails if the OS has no randomness.
    let ring = KeyRing {
        keys: vec![
            KeyRing::generate(KeyAlg::Dir, "aes").unwrap(),
            KeyRing::generate(KeyAlg::EdDSA, "ed").unwrap(),
            KeyRing::generate(KeyAlg::Es256, "es").unwrap(),
        ],
    };
    let verifier = Verifier::new(&ring.public_only(), "guildchat", 30).unwrap();
    let now = now();
    let claims = Claims {
        user_id: 1_000_001,
        name: "b1000001".into(),
        exp: now + 3600,
        guild: 51,
        team: 201,
        scene: 7,
        iat: Some(now),
        nbf: None,
        aud: vec!["guildchat".into()],
    };
    let mut group = c.benchmark_group("verify token");
    for (name, format, kid) in [
        ("JWE dir+A256GCM", TokenFormat::Jwe, "aes"),
        ("JWS EdDSA", TokenFormat::Jws, "ed"),
        ("JWS ES256", TokenFormat::Jws, "es"),
    ] {
        let token = Signer::new(&ring, format, Some(kid)).unwrap().mint(&claims);
        // A benchmark of a failing path would measure nothing useful.
        assert!(verifier.verify(&token, now).is_ok(), "{name}");
        group.bench_function(name, |b| b.iter(|| verifier.verify(black_box(&token), now)));
    }
    group.finish();
}

criterion_group!(benches, codec_benches, token_benches);
criterion_main!(benches);
