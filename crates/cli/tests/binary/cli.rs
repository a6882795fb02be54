//! The `guildchat` binary's tools: keygen, token, and config validation at
//! start-up.

use std::process::Command;

use guildchat_auth::{KeyRing, Signer, TokenFormat};
use guildchat_protocol::ResCode;

use crate::common::*;

fn guildchat(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_guildchat"))
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test]
async fn keygen_makes_a_private_ring_for_the_logic_server_and_a_public_one() {
    let dir = tempfile::tempdir().unwrap();
    let private = dir.path().join("logic.toml");
    let public = dir.path().join("chat.toml");
    let out = guildchat(&[
        "keygen",
        "--alg",
        "es256",
        "--kid",
        "game-1",
        "--private-out",
        private.to_str().unwrap(),
        "--public-out",
        public.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let public_text = std::fs::read_to_string(&public).unwrap();
    assert!(
        !public_text.contains("secret"),
        "public ring holds no secret"
    );
    let private_ring = KeyRing::from_toml_str(&std::fs::read_to_string(&private).unwrap()).unwrap();

    let server = TestServer::start_with(|c| c.auth.keys_file = Some(public.clone())).await;
    let token = Signer::new(&private_ring, TokenFormat::Jws, Some("game-1"))
        .unwrap()
        .mint(&claims(5, "five", 0, 0, 0));
    let mut c = server.connect().await;
    assert_eq!(c.login(&token).await.unwrap().res, ResCode::ResOk as i32);
    server.stop().await;
}

#[tokio::test]
async fn token_prints_only_a_token_that_logs_in() {
    let server = TestServer::start().await;
    let dir = server.dir.path().to_str().unwrap().to_owned();
    for (format, parts) in [("jws", 3), ("jwe", 5)] {
        let out = guildchat(&[
            "token",
            "--data-dir",
            &dir,
            "--user",
            "42",
            "--name",
            "carol",
            "--guild",
            "7",
            "--ttl",
            "10m",
            "--format",
            format,
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8(out.stdout).unwrap();
        let token = stdout.trim_end_matches('\n');
        assert!(!token.contains('\n'), "one line");
        assert_eq!(token.split('.').count(), parts, "{format}");
        let mut c = server.connect().await;
        let rep = c.login(token).await.unwrap();
        assert_eq!(
            (rep.res, rep.userid, rep.username.as_str(), rep.guildid),
            (ResCode::ResOk as i32, 42, "carol", 7)
        );
    }
    let bad = guildchat(&[
        "token",
        "--data-dir",
        &dir,
        "--user",
        "1",
        "--name",
        "x",
        "--ttl",
        "5y",
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unit"));
    server.stop().await;
}

#[test]
fn serve_refuses_a_bad_config_and_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("unknown = 1\n", "unknown"),
        ("[limits]\nidle_timeout_ms = 10\n", "limits.idle_timeout_ms"),
        ("listen = 7\n", "listen"),
    ];
    for (text, key) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let out = guildchat(&[
            "serve",
            "--config",
            path.to_str().unwrap(),
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ]);
        assert!(!out.status.success(), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{text}: {err}");
    }
}
