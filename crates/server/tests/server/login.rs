//! Login with every token format, and every way a token can be refused.

use guildchat_auth::{KeyAlg, KeyRing, Signer, TokenFormat};
use guildchat_protocol::{close_code, KickReason, ResCode};

use crate::common::*;

/// A server whose key ring holds one key of each algorithm.
async fn server_with_all_algs() -> (TestServer, KeyRing) {
    let ring = KeyRing {
        keys: vec![
            KeyRing::generate(KeyAlg::Dir, "aes-1").unwrap(),
            KeyRing::generate(KeyAlg::EdDSA, "ed-1").unwrap(),
            KeyRing::generate(KeyAlg::Es256, "p256-1").unwrap(),
        ],
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ring.toml");
    // The chat server holds only public keys for the signed formats.
    std::fs::write(&path, ring.public_only().to_toml_string()).unwrap();
    let server = TestServer::start_with(|c| c.auth.keys_file = Some(path)).await;
    std::mem::forget(dir);
    (server, ring)
}

async fn login_code(server: &TestServer, token: &str) -> (i32, Option<u16>) {
    let mut c = server.connect().await;
    let rep = c.login(token).await.unwrap();
    if rep.res == ResCode::ResOk as i32 {
        return (rep.res, None);
    }
    let (code, kick) = expect_close(&mut c).await;
    assert_eq!(kick, Some(KickReason::KickLoginFailed as i32));
    (rep.res, code)
}

#[tokio::test]
async fn each_token_format_logs_in() {
    let (server, ring) = server_with_all_algs().await;
    let formats = [
        ("aes-1", TokenFormat::Jwe),
        ("ed-1", TokenFormat::Jws),
        ("p256-1", TokenFormat::Jws),
    ];
    for (i, (kid, format)) in formats.into_iter().enumerate() {
        let user = 100 + i as u64;
        let token = Signer::new(&ring, format, Some(kid)).unwrap().mint(&claims(
            user,
            &format!("p{user}"),
            7,
            3,
            1,
        ));
        let mut c = server.connect().await;
        let rep = c.login(&token).await.unwrap();
        assert_eq!(rep.res, ResCode::ResOk as i32, "{kid}");
        assert_eq!(
            (
                rep.userid,
                rep.username.as_str(),
                rep.guildid,
                rep.teamid,
                rep.sceneid
            ),
            (user, format!("p{user}").as_str(), 7, 3, 1),
            "{kid}: identity comes from the token"
        );
        assert!(!rep.resumed);
    }
    server.stop().await;
}

#[tokio::test]
async fn dev_keys_are_generated_on_first_start() {
    let server = TestServer::start().await;
    let ring_file = server.dir.path().join("keys.toml");
    assert!(ring_file.exists());
    for format in [TokenFormat::Jwe, TokenFormat::Jws] {
        let token = server.mint(&claims(5, "five", 0, 0, 0), format);
        let mut c = server.connect().await;
        assert_eq!(c.login(&token).await.unwrap().res, ResCode::ResOk as i32);
    }
    server.stop().await;
}

#[tokio::test]
async fn bad_tokens_get_their_own_codes_and_a_close() {
    let (server, ring) = server_with_all_algs().await;
    let ed = Signer::new(&ring, TokenFormat::Jws, Some("ed-1")).unwrap();
    let good = ed.mint(&claims(1, "one", 0, 0, 0));

    // Forged: flip one character of the signature.
    let mut forged = good.clone().into_bytes();
    let last = forged.len() - 3;
    forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();

    // Wrong key: same kid, a key the server does not hold.
    let other = KeyRing {
        keys: vec![KeyRing::generate(KeyAlg::EdDSA, "ed-1").unwrap()],
    };
    let wrong_key = Signer::new(&other, TokenFormat::Jws, None)
        .unwrap()
        .mint(&claims(1, "one", 0, 0, 0));

    let mut expired = claims(1, "one", 0, 0, 0);
    expired.exp = unix_now() - 120; // beyond the 30 s leeway
    let expired = ed.mint(&expired);

    let mut wrong_aud = claims(1, "one", 0, 0, 0);
    wrong_aud.aud = vec!["another-game".into()];
    let wrong_aud = ed.mint(&wrong_aud);

    // alg not allowed for the key: the P-256 key's kid on an EdDSA token.
    let relabel = KeyRing {
        keys: vec![{
            let mut k = KeyRing::generate(KeyAlg::EdDSA, "p256-1").unwrap();
            k.kid = "p256-1".into();
            k
        }],
    };
    let alg_confused = Signer::new(&relabel, TokenFormat::Jws, None)
        .unwrap()
        .mint(&claims(1, "one", 0, 0, 0));

    let cases = [
        ("forged", forged, ResCode::ResBadToken),
        ("wrong key", wrong_key, ResCode::ResBadToken),
        ("expired", expired, ResCode::ResTokenExpired),
        ("wrong audience", wrong_aud, ResCode::ResBadToken),
        ("alg not allowed", alg_confused, ResCode::ResBadToken),
        ("garbage", "not.a.token".to_owned(), ResCode::ResBadToken),
        ("empty", String::new(), ResCode::ResBadToken),
    ];
    for (what, token, want) in cases {
        let (res, close) = login_code(&server, &token).await;
        assert_eq!(res, want as i32, "{what}");
        assert_eq!(close, Some(close_code::LOGIN_FAILED), "{what}");
    }
    assert_eq!(
        server
            .stats
            .logins
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    // The good token still works.
    assert_eq!(login_code(&server, &good).await.0, ResCode::ResOk as i32);
    server.stop().await;
}

#[tokio::test]
async fn request_fields_must_agree_with_the_token() {
    let server = TestServer::start().await;
    let token = server.token(9, "nine", 4, 0, 0);
    let cases: [(u64, &str, u64, ResCode); 5] = [
        (8, "", 0, ResCode::ResTokenMismatch),
        (0, "eight", 0, ResCode::ResTokenMismatch),
        (0, "", 5, ResCode::ResTokenMismatch),
        (9, "nine", 4, ResCode::ResOk),
        // Empty fields are filled from the token.
        (0, "", 0, ResCode::ResOk),
    ];
    for (userid, name, guild, want) in cases {
        let mut c = server.connect().await;
        let seq = c.next_seq();
        c.send(&guildchat_protocol::ClientMsg::Login(
            guildchat_protocol::pb::ChatMessageLoginReq {
                msghead: guildchat_protocol::codec::head(
                    guildchat_protocol::MsgType::CchLoginReq,
                    seq,
                ),
                userid,
                username: name.into(),
                guildid: guild,
                tokenmd5: "ignored".into(),
                tokenstr: token.clone(),
                last_msg_id: 0,
            },
        ))
        .await
        .unwrap();
        let guildchat_protocol::ServerMsg::LoginRep(rep) = next(&mut c).await else {
            panic!("no login reply");
        };
        assert_eq!(rep.res, want as i32, "{userid} {name} {guild}");
        assert_eq!(rep.msghead.unwrap().seq, seq, "seq is echoed");
        if want == ResCode::ResOk {
            assert_eq!((rep.userid, rep.username.as_str()), (9, "nine"));
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn long_username_is_refused() {
    let server = TestServer::start().await;
    let token = server.token(3, &"x".repeat(33), 0, 0, 0);
    assert_eq!(
        login_code(&server, &token).await,
        (
            ResCode::ResNameTooLong as i32,
            Some(close_code::LOGIN_FAILED)
        )
    );
    server.stop().await;
}

#[tokio::test]
async fn insecure_dev_auth_trusts_the_request() {
    let server = TestServer::start_with(|c| c.auth.insecure_dev_auth = true).await;
    let mut c = server.connect().await;
    c.send_login("anything", 77, "dev").await.unwrap();
    let guildchat_protocol::ServerMsg::LoginRep(rep) = next(&mut c).await else {
        panic!("no login reply");
    };
    assert_eq!((rep.res, rep.userid), (ResCode::ResOk as i32, 77));
    server.stop().await;
}
