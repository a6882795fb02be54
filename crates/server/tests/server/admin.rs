//! The admin API over real HTTP, together with players over real
//! websockets: membership, moderation, announcements, recall, the word
//! filter, auth and scopes, bad input, metrics, the audit log and reload.

use guildchat_client::{Client, Event};
use guildchat_protocol::{ChatType, KickReason, ResCode, ServerMsg};

use crate::common::*;

/// Waits for the next chat notification, skipping replies.
async fn chat_line(c: &mut Client) -> guildchat_protocol::pb::ChatMessageNotifyChat {
    next_chat(c).await
}

#[tokio::test]
async fn a_guild_move_changes_an_online_players_guild_traffic_at_once() {
    let server = TestServer::start_with(no_cooldowns).await;
    let mut alice = server.login(1, "alice", 10, 0, 0).await;
    let mut bob = server.login(2, "bob", 20, 0, 0).await;
    let r = server
        .logic("PUT", "/v1/players/2/groups", Some(r#"{"guild": 10}"#))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["guild"], 10);
    assert_eq!(r.json()["state"], "connected");
    let rep = say(&mut alice, ChatType::ChatGuild, "welcome").await;
    assert_eq!(rep.res, ResCode::ResOk as i32);
    assert_eq!(chat_line(&mut bob).await.strcontext, "welcome");
    // And bob's old guild no longer reaches him.
    let mut carol = server.login(3, "carol", 20, 0, 0).await;
    say(&mut carol, ChatType::ChatGuild, "old guild").await;
    assert_silent(&mut bob).await;
    // Disband: nobody of guild 10 hears guild lines any more.
    let r = server.logic("POST", "/v1/guilds/10/disband", None).await;
    assert_eq!(r.json()["players"], 2);
    let online = server
        .call("GET", "/v1/guilds/10/online", Some(READ_KEY), None)
        .await;
    assert_eq!(online.json()["players"], serde_json::json!([]));
    let rep = say(&mut alice, ChatType::ChatGuild, "anyone?").await;
    assert_eq!(rep.res, ResCode::ResNotInGuild as i32);
    // Unknown player: 404.
    let r = server
        .logic("PUT", "/v1/players/999/groups", Some(r#"{"team": 1}"#))
        .await;
    assert_eq!((r.status, r.code().as_str()), (404, "not_found"));
    server.stop().await;
}

#[tokio::test]
async fn a_mute_refuses_chat_with_the_time_left_and_survives_relogin_and_restart() {
    let server = TestServer::start_with(no_cooldowns).await;
    let mut a = server.login(1, "alice", 10, 0, 0).await;
    let r = server
        .gm(
            "PUT",
            "/v1/players/1/mute",
            Some(r#"{"seconds": 3600, "reason": "spam"}"#),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let rep = say(&mut a, ChatType::ChatGuild, "hello").await;
    assert_eq!(rep.res, ResCode::ResMuted as i32);
    assert!(
        rep.muted_ms > 3_500_000 && rep.muted_ms <= 3_600_000,
        "{}",
        rep.muted_ms
    );
    let mutes = server.gm("GET", "/v1/mutes", None).await.json();
    assert_eq!(mutes["mutes"][0]["id"], 1);
    // A relogin (a new session after the old one ends) is still muted.
    drop(a);
    server.gm("POST", "/v1/players/1/kick", None).await;
    let mut a = server.login(1, "alice", 10, 0, 0).await;
    let rep = say(&mut a, ChatType::ChatGuild, "hello").await;
    assert_eq!(rep.res, ResCode::ResMuted as i32);
    drop(a);
    // A restart on the same store keeps it.
    let dir = server.stop_keep_dir().await;
    let server = TestServer::start_in(dir, no_cooldowns).await;
    let mut a = server.login(1, "alice", 10, 0, 0).await;
    let rep = say(&mut a, ChatType::ChatGuild, "hello").await;
    assert_eq!(
        rep.res,
        ResCode::ResMuted as i32,
        "the mute survived the restart"
    );
    let player = server
        .call("GET", "/v1/players/1", Some(READ_KEY), None)
        .await
        .json();
    assert!(player["muted_until_ms"].as_u64().unwrap() > 0);
    // Lifted: chat works at once.
    let r = server.gm("DELETE", "/v1/players/1/mute", None).await;
    assert_eq!(r.status, 204, "{}", r.text);
    let rep = say(&mut a, ChatType::ChatGuild, "hello").await;
    assert_eq!(rep.res, ResCode::ResOk as i32);
    let r = server.gm("DELETE", "/v1/players/1/mute", None).await;
    assert_eq!(r.status, 404, "no mute left to lift");
    server.stop().await;
}

#[tokio::test]
async fn a_ban_kicks_the_player_and_refuses_logins_until_lifted() {
    let server = TestServer::start().await;
    let mut a = server.login(1, "alice", 10, 0, 0).await;
    let r = server
        .gm(
            "PUT",
            "/v1/players/1/ban",
            Some(r#"{"seconds": 600, "reason": "cheating"}"#),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let (code, reason) = expect_close(&mut a).await;
    assert_eq!(code, Some(guildchat_protocol::close_code::BANNED));
    assert_eq!(reason, Some(KickReason::KickBanned as i32));
    let mut again = server.connect().await;
    let rep = again
        .login(&server.token(1, "alice", 10, 0, 0))
        .await
        .unwrap();
    assert_eq!(rep.res, ResCode::ResBanned as i32);
    assert!(
        rep.banned_ms > 590_000 && rep.banned_ms <= 600_000,
        "{}",
        rep.banned_ms
    );
    assert_eq!(
        server.gm("DELETE", "/v1/players/1/ban", None).await.status,
        204
    );
    server.login(1, "alice", 10, 0, 0).await;
    server.stop().await;
}

#[tokio::test]
async fn revoking_tokens_refuses_older_tokens_and_accepts_new_ones() {
    let server = TestServer::start().await;
    let mut old = claims(1, "alice", 10, 0, 0);
    old.iat = Some(unix_now() - 60);
    let old = server.mint(&old, guildchat_auth::TokenFormat::Jws);
    let r = server.gm("POST", "/v1/players/1/revoke-tokens", None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let mut c = server.connect().await;
    let rep = c.login(&old).await.unwrap();
    assert_eq!(rep.res, ResCode::ResTokenRevoked as i32);
    // A token minted after the revocation's second logs in.
    let before_s = r.json()["before_s"].as_i64().unwrap();
    let mut fresh = claims(1, "alice", 10, 0, 0);
    fresh.iat = Some(before_s);
    let fresh = server.mint(&fresh, guildchat_auth::TokenFormat::Jws);
    let mut c = server.connect().await;
    assert_eq!(c.login(&fresh).await.unwrap().res, ResCode::ResOk as i32);
    server.stop().await;
}

#[tokio::test]
async fn a_kick_ends_the_session_so_a_fast_reconnect_is_a_new_one() {
    let server = TestServer::start().await;
    let mut a = server.login(1, "alice", 10, 0, 0).await;
    let r = server
        .gm("POST", "/v1/players/1/kick", Some(r#"{"reason": "afk"}"#))
        .await;
    assert_eq!(r.status, 204, "{}", r.text);
    let (code, reason) = expect_close(&mut a).await;
    assert_eq!(code, Some(guildchat_protocol::close_code::OPERATOR_KICK));
    assert_eq!(reason, Some(KickReason::KickOperator as i32));
    let mut c = server.connect().await;
    let rep = c.login(&server.token(1, "alice", 10, 0, 0)).await.unwrap();
    assert_eq!(rep.res, ResCode::ResOk as i32);
    assert!(!rep.resumed, "a kicked session does not resume");
    let r = server.gm("POST", "/v1/players/77/kick", None).await;
    assert_eq!(r.status, 404);
    server.stop().await;
}

#[tokio::test]
async fn announcements_reach_each_audience_and_a_repeated_key_sends_once() {
    let server = TestServer::start().await;
    let mut a = server.login(1, "alice", 10, 5, 100).await;
    let mut b = server.login(2, "bob", 20, 6, 200).await;
    let cases = [
        (r#"{"text": "to all"}"#, true, true),
        (r#"{"text": "to guild 10", "guild": 10}"#, true, false),
        (r#"{"text": "to team 6", "team": 6}"#, false, true),
        (r#"{"text": "to scene 100", "scene": 100}"#, true, false),
        (r#"{"text": "to bob", "player": 2}"#, false, true),
    ];
    for (body, to_a, to_b) in cases {
        let r = server.logic("POST", "/v1/announce", Some(body)).await;
        assert_eq!(r.status, 200, "{body}: {}", r.text);
        let id = r.json()["msg_id"].as_u64().unwrap();
        for (c, wanted) in [(&mut a, to_a), (&mut b, to_b)] {
            if wanted {
                let n = chat_line(c).await;
                assert_eq!(
                    (n.msg_id, n.chattype),
                    (id, ChatType::ChatAll as i32),
                    "{body}"
                );
            }
        }
    }
    assert_silent(&mut a).await;
    assert_silent(&mut b).await;
    let body = r#"{"text": "maintenance at 10", "idempotency_key": "maint-1"}"#;
    let first = server
        .logic("POST", "/v1/announce", Some(body))
        .await
        .json();
    let again = server
        .logic("POST", "/v1/announce", Some(body))
        .await
        .json();
    assert_eq!(first["msg_id"], again["msg_id"]);
    assert_eq!(chat_line(&mut a).await.strcontext, "maintenance at 10");
    assert_silent(&mut a).await;
    // Two audiences at once, and an empty text, are refused.
    let r = server
        .logic(
            "POST",
            "/v1/announce",
            Some(r#"{"text": "x", "guild": 1, "team": 2}"#),
        )
        .await;
    assert_eq!(r.status, 422);
    let r = server
        .logic("POST", "/v1/announce", Some(r#"{"text": "  "}"#))
        .await;
    assert_eq!(r.status, 422);
    server.stop().await;
}

#[tokio::test]
async fn a_recall_reaches_the_audience_and_removes_the_line_from_history() {
    let server = TestServer::start_with(no_cooldowns).await;
    let mut a = server.login(1, "alice", 10, 0, 0).await;
    let mut b = server.login(2, "bob", 10, 0, 0).await;
    let rep = say(&mut a, ChatType::ChatGuild, "something rude").await;
    let id = rep.msg_id;
    assert_eq!(chat_line(&mut b).await.msg_id, id);
    let r = server
        .gm(
            "DELETE",
            &format!("/v1/messages/{id}"),
            Some(r#"{"reason": "report 7"}"#),
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.text);
    for c in [&mut a, &mut b] {
        loop {
            match next(c).await {
                ServerMsg::Recall(r) => {
                    assert_eq!(r.msg_id, id);
                    break;
                }
                ServerMsg::Chat(_) => {}
                other => panic!("expected a recall, got {other:?}"),
            }
        }
    }
    let ids = all_pages(&mut b, ChatType::ChatGuild, 0, 50).await;
    assert!(!ids.contains(&id), "the line is gone from history");
    let again = server
        .gm("DELETE", &format!("/v1/messages/{id}"), None)
        .await;
    assert_eq!(again.status, 404);
    // What a GM reviews: the player's own lines, newest first.
    say(&mut a, ChatType::ChatGuild, "sorry").await;
    let mine = server
        .gm("GET", "/v1/players/1/messages?limit=10", None)
        .await
        .json();
    assert_eq!(mine["messages"][0]["text"], "sorry");
    assert_eq!(mine["messages"].as_array().unwrap().len(), 1);
    server.stop().await;
}

#[tokio::test]
async fn the_filter_masks_and_refuses_and_a_list_change_applies_without_a_restart() {
    let server = TestServer::start_with(|c| {
        no_cooldowns(c);
        c.chat.world.filter = guildchat_server::filter::Policy::Refuse;
    })
    .await;
    let mut a = server.login(1, "alice", 10, 0, 0).await;
    let mut b = server.login(2, "bob", 10, 0, 0).await;
    let rep = say(&mut a, ChatType::ChatGuild, "you badword").await;
    assert_eq!(rep.res, ResCode::ResOk as i32);
    assert_eq!(
        chat_line(&mut b).await.strcontext,
        "you badword",
        "not listed yet"
    );
    let r = server
        .gm(
            "POST",
            "/v1/filter/words",
            Some(r#"{"words": ["badword"]}"#),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    say(&mut a, ChatType::ChatGuild, "you b.a.d.w.o.r.d").await;
    assert_eq!(chat_line(&mut b).await.strcontext, "you *************");
    let rep = say(&mut a, ChatType::ChatWorld, "BADWORD").await;
    assert_eq!(
        rep.res,
        ResCode::ResFiltered as i32,
        "the world channel refuses"
    );
    let test = server
        .gm(
            "POST",
            "/v1/filter/test",
            Some(r#"{"text": "a badword here"}"#),
        )
        .await
        .json();
    assert_eq!(test["filtered"], "a ******* here");
    assert_eq!(test["matches"], serde_json::json!(["badword"]));
    // History never saw the raw text.
    let mine = server
        .gm("GET", "/v1/players/1/messages", None)
        .await
        .json();
    assert_eq!(mine["messages"][0]["text"], "you *************");
    // Persisted: the file in the data dir holds the word.
    let file = std::fs::read_to_string(server.dir.path().join("filter_words.txt")).unwrap();
    assert!(file.contains("badword"));
    let r = server
        .gm(
            "DELETE",
            "/v1/filter/words",
            Some(r#"{"words": ["badword"]}"#),
        )
        .await;
    assert_eq!(r.json()["words"], serde_json::json!([]));
    say(&mut a, ChatType::ChatGuild, "badword again").await;
    assert_eq!(chat_line(&mut b).await.strcontext, "badword again");
    server.stop().await;
}

#[tokio::test]
async fn keys_and_scopes_are_checked_on_every_route() {
    let server = TestServer::start().await;
    let r = server.call("GET", "/v1/stats", None, None).await;
    assert_eq!((r.status, r.code().as_str()), (401, "unauthorized"));
    let r = server
        .call("GET", "/v1/stats", Some("not-a-key-at-all-xx"), None)
        .await;
    assert_eq!(r.status, 401);
    let r = server.call("GET", "/v1/stats", Some(READ_KEY), None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["online"], 0);
    // read cannot moderate; logic cannot moderate; gm cannot announce.
    let r = server
        .call("POST", "/v1/players/1/kick", Some(READ_KEY), None)
        .await;
    assert_eq!((r.status, r.code().as_str()), (403, "forbidden"));
    let r = server
        .call(
            "PUT",
            "/v1/players/1/mute",
            Some(LOGIC_KEY),
            Some(r#"{"seconds": 5}"#),
        )
        .await;
    assert_eq!(r.status, 403);
    let r = server
        .gm("POST", "/v1/announce", Some(r#"{"text": "hi"}"#))
        .await;
    assert_eq!(r.status, 403);
    // Health and metrics need no key.
    assert_eq!(server.call("GET", "/healthz", None, None).await.status, 200);
    assert_eq!(server.call("GET", "/readyz", None, None).await.status, 200);
    assert_eq!(server.call("GET", "/metrics", None, None).await.status, 200);
    server.stop().await;
}

#[tokio::test]
async fn bad_input_gets_a_4xx_with_an_error_body_never_a_500() {
    let server = TestServer::start().await;
    let big = format!(r#"{{"text": "{}"}}"#, "x".repeat(70 * 1024));
    let cases: Vec<(&str, String, Option<String>, u16)> = vec![
        (
            "PUT",
            "/v1/players/1/mute".into(),
            Some("{not json".into()),
            400,
        ),
        (
            "PUT",
            "/v1/players/1/mute".into(),
            Some(r#"{"seconds": "ten"}"#.into()),
            422,
        ),
        (
            "PUT",
            "/v1/players/1/mute".into(),
            Some(r#"{"seconds": 0}"#.into()),
            422,
        ),
        (
            "PUT",
            "/v1/players/1/mute".into(),
            Some(r#"{"seconds": 5, "extra": 1}"#.into()),
            422,
        ),
        ("PUT", "/v1/players/1/mute".into(), None, 400),
        (
            "PUT",
            "/v1/players/abc/mute".into(),
            Some(r#"{"seconds": 5}"#.into()),
            400,
        ),
        ("POST", "/v1/announce".into(), Some(big), 413),
        ("GET", "/v1/players/424242".into(), None, 404),
        ("GET", "/v1/nowhere".into(), None, 404),
        ("GET", "/v1/audit?limit=100000".into(), None, 400),
        ("DELETE", "/v1/messages/123".into(), None, 404),
        ("PATCH", "/v1/stats".into(), None, 405),
    ];
    for (method, path, body, want) in cases {
        let key = if path.starts_with("/v1/announce") {
            LOGIC_KEY
        } else {
            GM_KEY
        };
        let r = server.call(method, &path, Some(key), body.as_deref()).await;
        assert_eq!(r.status, want, "{method} {path}: {}", r.text);
        assert!(
            !r.json()["error"]["code"].as_str().unwrap_or("").is_empty(),
            "{}",
            r.text
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text_and_move_with_traffic() {
    let server = TestServer::start_with(no_cooldowns).await;
    let read = |text: String| {
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text")
    };
    let value = |scrape: &prometheus_parse::Scrape, name: &str, label: Option<(&str, &str)>| {
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum::<f64>()
    };
    let before = read(server.call("GET", "/metrics", None, None).await.text);
    let mut a = server.login(1, "alice", 10, 0, 0).await;
    let mut b = server.login(2, "bob", 10, 0, 0).await;
    say(&mut a, ChatType::ChatGuild, "one").await;
    chat_line(&mut b).await;
    let after = read(server.call("GET", "/metrics", None, None).await.text);
    let ok = Some(("result", "RES_OK"));
    assert_eq!(
        value(&after, "guildchat_logins_total", ok) - value(&before, "guildchat_logins_total", ok),
        2.0
    );
    let chats = value(&after, "guildchat_chats_total", ok);
    assert_eq!(chats, 1.0);
    assert!(value(&after, "guildchat_deliveries_total", None) >= 2.0);
    assert_eq!(value(&after, "guildchat_players_online", None), 2.0);
    assert!(value(&after, "guildchat_fanout_seconds_count", None) >= 1.0);
    assert!(value(&after, "guildchat_history_commit_seconds_count", None) >= 1.0);
    server.stop().await;
}

#[tokio::test]
async fn the_audit_log_records_each_change_newest_first() {
    let server = TestServer::start().await;
    server.login(5, "eve", 0, 0, 0).await;
    server
        .gm(
            "PUT",
            "/v1/players/5/mute",
            Some(r#"{"seconds": 60, "reason": "flood"}"#),
        )
        .await;
    server
        .gm("POST", "/v1/players/5/kick", Some(r#"{"reason": "afk"}"#))
        .await;
    server
        .logic("POST", "/v1/announce", Some(r#"{"text": "hello"}"#))
        .await;
    let log = server.gm("GET", "/v1/audit?limit=10", None).await.json();
    let entries = log["entries"].as_array().unwrap();
    let actions: Vec<&str> = entries
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["announce", "kick", "mute"]);
    assert_eq!(entries[2]["key_id"], "gm");
    assert_eq!(entries[2]["target"], "player:5");
    assert_eq!(entries[2]["reason"], "flood");
    assert_eq!(entries[0]["key_id"], "logic");
    let older = server
        .gm(
            "GET",
            &format!("/v1/audit?before={}", entries[1]["id"]),
            None,
        )
        .await
        .json();
    assert_eq!(older["entries"][0]["action"], "mute");
    server.stop().await;
}

#[tokio::test]
async fn a_key_rotation_by_reload_keeps_players_connected() {
    let server = TestServer::start_with(no_cooldowns).await;
    let mut a = server.login(1, "alice", 10, 0, 0).await;
    let mut b = server.login(2, "bob", 10, 0, 0).await;
    // The logic server adds a new key pair; the chat server's ring gets the
    // new kid and loses the old ones.
    let keys_file = server.dir.path().join("keys.toml");
    let new_ring = guildchat_auth::KeyRing {
        keys: vec![
            guildchat_auth::KeyRing::generate(guildchat_auth::KeyAlg::EdDSA, "rotated-1").unwrap(),
        ],
    };
    std::fs::write(&keys_file, new_ring.to_toml_string()).unwrap();
    let r = server.gm("POST", "/v1/reload", None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.text.contains("keys"));
    // The old kid is refused, the new one logs in.
    let mut old = server.connect().await;
    let rep = old
        .login(&server.token(3, "carol", 10, 0, 0))
        .await
        .unwrap();
    assert_eq!(rep.res, ResCode::ResBadToken as i32);
    let token = guildchat_auth::Signer::new(&new_ring, guildchat_auth::TokenFormat::Jws, None)
        .unwrap()
        .mint(&claims(3, "carol", 10, 0, 0));
    let mut carol = server.connect().await;
    assert_eq!(
        carol.login(&token).await.unwrap().res,
        ResCode::ResOk as i32
    );
    // Players who logged in before the reload are still connected.
    say(&mut a, ChatType::ChatGuild, "still here").await;
    assert_eq!(chat_line(&mut b).await.strcontext, "still here");
    // A ring that does not parse is refused and changes nothing.
    std::fs::write(&keys_file, "this is not a key ring").unwrap();
    let r = server.gm("POST", "/v1/reload", None).await;
    assert_eq!(r.status, 422, "{}", r.text);
    let mut dave = server.connect().await;
    let token = guildchat_auth::Signer::new(&new_ring, guildchat_auth::TokenFormat::Jws, None)
        .unwrap()
        .mint(&claims(4, "dave", 10, 0, 0));
    assert_eq!(dave.login(&token).await.unwrap().res, ResCode::ResOk as i32);
    server.stop().await;
}

#[tokio::test]
async fn every_route_is_in_the_openapi_document() {
    let server = TestServer::start().await;
    let doc = server
        .call("GET", "/v1/openapi.json", None, None)
        .await
        .json();
    let paths = doc["paths"].as_object().unwrap();
    let expected = [
        ("/v1/stats", "get"),
        ("/v1/players/{id}", "get"),
        ("/v1/players", "get"),
        ("/v1/players/{id}/groups", "put"),
        ("/v1/guilds/{gid}/disband", "post"),
        ("/v1/guilds/{gid}/online", "get"),
        ("/v1/players/{id}/kick", "post"),
        ("/v1/players/{id}/mute", "put"),
        ("/v1/players/{id}/mute", "delete"),
        ("/v1/mutes", "get"),
        ("/v1/players/{id}/ban", "put"),
        ("/v1/players/{id}/ban", "delete"),
        ("/v1/players/{id}/revoke-tokens", "post"),
        ("/v1/announce", "post"),
        ("/v1/messages/{msg_id}", "delete"),
        ("/v1/players/{id}/messages", "get"),
        ("/v1/filter/words", "get"),
        ("/v1/filter/words", "put"),
        ("/v1/filter/words", "post"),
        ("/v1/filter/words", "delete"),
        ("/v1/filter/test", "post"),
        ("/v1/audit", "get"),
        ("/v1/reload", "post"),
    ];
    for (path, method) in expected {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} missing from the OpenAPI document"
        );
    }
    // And nothing in the document is missing from the router: every
    // documented path answers something other than the fallback 404 body.
    for (path, methods) in paths {
        for method in methods.as_object().unwrap().keys() {
            let concrete = path
                .replace("{id}", "1")
                .replace("{gid}", "1")
                .replace("{msg_id}", "1");
            let r = server
                .call(&method.to_uppercase(), &concrete, None, None)
                .await;
            assert_eq!(r.status, 401, "{method} {path} is routed (and needs a key)");
        }
    }
    server.stop().await;
}

async fn block_request(c: &mut Client, msg: guildchat_protocol::ClientMsg) -> ServerMsg {
    c.send(&msg).await.unwrap();
    loop {
        match next(c).await {
            m
            @ (ServerMsg::BlockRep(_) | ServerMsg::UnblockRep(_) | ServerMsg::BlockListRep(_)) => {
                return m
            }
            ServerMsg::Chat(_) => {}
            other => panic!("expected a block reply, got {other:?}"),
        }
    }
}

fn block(user: u64) -> guildchat_protocol::ClientMsg {
    use guildchat_protocol::{codec, pb, ClientMsg, MsgType};
    ClientMsg::Block(pb::ChatMessageBlockReq {
        msghead: codec::head(MsgType::CchBlockReq, 1),
        userid: user,
    })
}

fn unblock(user: u64) -> guildchat_protocol::ClientMsg {
    use guildchat_protocol::{codec, pb, ClientMsg, MsgType};
    ClientMsg::Unblock(pb::ChatMessageUnblockReq {
        msghead: codec::head(MsgType::CchUnblockReq, 2),
        userid: user,
    })
}

fn block_list() -> guildchat_protocol::ClientMsg {
    use guildchat_protocol::{codec, pb, ClientMsg, MsgType};
    ClientMsg::BlockList(pb::ChatMessageBlockListReq {
        msghead: codec::head(MsgType::CchBlockListReq, 3),
    })
}

fn res_of(m: &ServerMsg) -> i32 {
    match m {
        ServerMsg::BlockRep(r) => r.res,
        ServerMsg::UnblockRep(r) => r.res,
        ServerMsg::BlockListRep(r) => r.res,
        _ => -1,
    }
}

#[tokio::test]
async fn a_block_stops_whispers_and_channel_lines_and_outlives_the_session() {
    let server = TestServer::start_with(no_cooldowns).await;
    let mut alice = server.login(1, "alice", 10, 0, 0).await;
    let mut bob = server.login(2, "bob", 10, 0, 0).await;
    let mut carol = server.login(3, "carol", 10, 0, 0).await;
    let rep = block_request(&mut alice, block(2)).await;
    assert_eq!(res_of(&rep), ResCode::ResOk as i32);
    // Bob's whisper is refused; his guild line reaches carol, not alice.
    bob.send_chat(ChatType::ChatPrivate, "psst", 1, "")
        .await
        .unwrap();
    assert_eq!(
        next_chat_rep(&mut bob).await.res,
        ResCode::ResBlocked as i32
    );
    let rep = say(&mut bob, ChatType::ChatGuild, "hello guild").await;
    assert_eq!(rep.res, ResCode::ResOk as i32);
    assert_eq!(chat_line(&mut carol).await.strcontext, "hello guild");
    assert_silent(&mut alice).await;
    match block_request(&mut alice, block_list()).await {
        ServerMsg::BlockListRep(r) => assert_eq!(r.userids, vec![2]),
        other => panic!("{other:?}"),
    }
    // A new session (after a kick) reads the block from the store.
    server.gm("POST", "/v1/players/1/kick", None).await;
    drop(alice);
    let mut alice = server.login(1, "alice", 10, 0, 0).await;
    say(&mut bob, ChatType::ChatGuild, "again").await;
    assert_eq!(chat_line(&mut carol).await.strcontext, "again");
    assert_silent(&mut alice).await;
    // Lifted: bob reaches alice again.
    let rep = block_request(&mut alice, unblock(2)).await;
    assert_eq!(res_of(&rep), ResCode::ResOk as i32);
    say(&mut bob, ChatType::ChatGuild, "friends").await;
    assert_eq!(chat_line(&mut alice).await.strcontext, "friends");
    // Oneself and 0 are not players one can block.
    let rep = block_request(&mut alice, block(1)).await;
    assert_eq!(res_of(&rep), ResCode::ResBadRequest as i32);
    server.stop().await;
}

#[tokio::test]
async fn blocks_are_capped_per_player() {
    let server = TestServer::start_with(|c| c.max_blocks = 2).await;
    let mut alice = server.login(1, "alice", 10, 0, 0).await;
    for (user, want) in [
        (2, ResCode::ResOk),
        (3, ResCode::ResOk),
        (2, ResCode::ResOk),
        (4, ResCode::ResBlockLimit),
    ] {
        let rep = block_request(&mut alice, block(user)).await;
        assert_eq!(res_of(&rep), want as i32, "block {user}");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_key_past_its_request_rate_gets_429_and_others_do_not() {
    let server = TestServer::start_with(|c| c.admin.requests_per_sec = 1).await;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(
            server
                .call("GET", "/v1/stats", Some(READ_KEY), None)
                .await
                .status,
        );
    }
    assert_eq!(&statuses[..2], [200, 200], "the burst is twice the rate");
    assert!(statuses[2..].contains(&429), "{statuses:?}");
    let r = server.call("GET", "/v1/stats", Some(READ_KEY), None).await;
    if r.status == 429 {
        assert_eq!(r.code(), "rate_limited");
    }
    // Another key has its own budget.
    assert_eq!(server.gm("GET", "/v1/stats", None).await.status, 200);
    server.stop().await;
}

/// Logs in again with a resume cursor; returns the frames replayed before
/// live traffic (collected until the line is quiet).
async fn resume(
    server: &TestServer,
    user: u64,
    name: &str,
    guild: u64,
    cursor: u64,
) -> (Client, Vec<ServerMsg>) {
    let mut c = server.connect().await;
    let rep = c
        .login_from(&server.token(user, name, guild, 0, 0), cursor)
        .await
        .unwrap();
    assert_eq!(rep.res, ResCode::ResOk as i32);
    assert!(rep.resumed);
    let mut got = Vec::new();
    while let Ok(Event::Msg(m)) = c.recv_timeout(QUIET).await {
        got.push(m);
    }
    (c, got)
}

fn chat_ids(msgs: &[ServerMsg]) -> Vec<u64> {
    msgs.iter()
        .filter_map(|m| match m {
            ServerMsg::Chat(n) => Some(n.msg_id),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_recalled_line_is_not_replayed_to_a_lingering_player() {
    let server = TestServer::start_with(no_cooldowns).await;
    let mut a = server.login(1, "alice", 10, 0, 0).await;
    let mut b = server.login(2, "bob", 10, 0, 0).await;
    let first = say(&mut a, ChatType::ChatGuild, "before").await.msg_id;
    assert_eq!(chat_line(&mut b).await.msg_id, first);
    drop(b);
    until_lingering(&server, 2).await;
    let rude = say(&mut a, ChatType::ChatGuild, "rude").await.msg_id;
    let kept = say(&mut a, ChatType::ChatGuild, "fine").await.msg_id;
    let r = server
        .gm("DELETE", &format!("/v1/messages/{rude}"), None)
        .await;
    assert_eq!(r.status, 204, "{}", r.text);
    let (_b, got) = resume(&server, 2, "bob", 10, first).await;
    assert_eq!(
        chat_ids(&got),
        vec![kept],
        "the recalled line is gone from the replay"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_blockers_resume_leaves_out_the_blocked_players_world_lines() {
    let server = TestServer::start_with(no_cooldowns).await;
    let mut a = server.login(1, "alice", 10, 0, 0).await;
    let mut b = server.login(2, "bob", 10, 0, 0).await;
    let mut c = server.login(3, "carol", 10, 0, 0).await;
    let rep = block_request(&mut a, block(2)).await;
    assert_eq!(res_of(&rep), ResCode::ResOk as i32);
    let mark = say(&mut c, ChatType::ChatGuild, "mark").await.msg_id;
    assert_eq!(chat_line(&mut a).await.msg_id, mark);
    drop(a);
    until_lingering(&server, 1).await;
    say(&mut b, ChatType::ChatWorld, "from bob").await;
    let carol = say(&mut c, ChatType::ChatWorld, "from carol").await.msg_id;
    let (_a, got) = resume(&server, 1, "alice", 10, mark).await;
    assert_eq!(
        chat_ids(&got),
        vec![carol],
        "bob's world line is not replayed to alice"
    );
    server.stop().await;
}

#[tokio::test]
async fn the_console_is_served_without_a_key_and_finds_players_by_name() {
    let server = TestServer::start().await;
    for (path, kind) in [
        ("/console/", "text/html"),
        ("/console/console.js", "text/javascript"),
        ("/console/console.css", "text/css"),
    ] {
        let (status, headers, body) = raw_get(&server, path).await;
        assert_eq!(status, 200, "{path}");
        assert!(
            headers.contains(&format!("content-type: {kind}")),
            "{path}: {headers}"
        );
        assert!(
            headers.contains("content-security-policy: default-src 'self'"),
            "{headers}"
        );
        assert!(!body.is_empty());
    }
    let (_, _, html) = raw_get(&server, "/console/").await;
    assert!(html.contains("console.js") && html.contains("session storage"));
    let _a = server.login(7, "grace", 3, 0, 0).await;
    let found = server
        .call("GET", "/v1/players?name=grace", Some(READ_KEY), None)
        .await;
    assert_eq!(found.status, 200, "{}", found.text);
    assert_eq!(found.json()["id"], 7);
    assert_eq!(found.json()["state"], "connected");
    let r = server
        .call("GET", "/v1/players?name=nobody", Some(READ_KEY), None)
        .await;
    assert_eq!(r.status, 404);
    server.stop().await;
}

/// A GET with no key, returning (status, lower-cased headers, body).
async fn raw_get(server: &TestServer, path: &str) -> (u16, String, String) {
    let host = server.admin.trim_start_matches("http://").to_owned();
    raw(
        server,
        &format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n"),
        "",
    )
    .await
}

/// A POST of a JSON body with a chosen `Host`, returning the status.
async fn raw_post(server: &TestServer, path: &str, host: &str, body: &str) -> u16 {
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    raw(server, &head, body).await.0
}

/// One request written by hand (so the test picks every header, `Host`
/// included), returning (status, lower-cased headers, body).
async fn raw(server: &TestServer, head: &str, body: &str) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = server.admin.trim_start_matches("http://").to_owned();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let req = format!("{head}Connection: close\r\n\r\n{body}");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_lowercase(), body.to_owned())
}

#[tokio::test]
async fn the_demo_mints_tokens_only_with_development_keys_and_for_loopback_hosts() {
    let body = r#"{"user": 9, "name": "demo"}"#;
    let server = TestServer::start().await;
    let host = server.admin.trim_start_matches("http://").to_owned();
    assert_eq!(raw_post(&server, "/demo/token", &host, body).await, 200);
    assert_eq!(
        raw_post(&server, "/demo/token", "localhost:7001", body).await,
        200
    );
    // A rebound DNS name pointing at loopback is not a loopback host.
    assert_eq!(
        raw_post(&server, "/demo/token", "evil.example:7001", body).await,
        404
    );
    let (status, headers, _) = raw_get(&server, "/demo/").await;
    assert_eq!(status, 200);
    assert!(headers.contains("connect-src 'self' ws://"), "{headers}");
    server.stop().await;
    // Production: a configured key file, even one holding a development
    // ring, and the demo is gone.
    let server = TestServer::start_with(|c| {
        let path = c.data_dir.join("prod-keys.toml");
        std::fs::create_dir_all(&c.data_dir).unwrap();
        let ring = guildchat_auth::KeyRing::dev().unwrap();
        std::fs::write(&path, ring.to_toml_string()).unwrap();
        c.auth.keys_file = Some(path);
    })
    .await;
    let host = server.admin.trim_start_matches("http://").to_owned();
    assert_eq!(raw_post(&server, "/demo/token", &host, body).await, 404);
    assert_eq!(raw_get(&server, "/demo/").await.0, 404);
    server.stop().await;
}

#[tokio::test]
async fn a_mute_holds_across_a_takeover() {
    let server = TestServer::start_with(no_cooldowns).await;
    let _first = server.login(1, "alice", 10, 0, 0).await;
    let r = server
        .gm("PUT", "/v1/players/1/mute", Some(r#"{"seconds": 60}"#))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    // A second device takes the running session over.
    let mut second = server.login(1, "alice", 10, 0, 0).await;
    let rep = say(&mut second, ChatType::ChatGuild, "still muted?").await;
    assert_eq!(rep.res, ResCode::ResMuted as i32);
    server.stop().await;
}

#[tokio::test]
async fn a_whisper_to_an_offline_blocker_is_refused() {
    let server = TestServer::start_with(no_cooldowns).await;
    let mut carol = server.login(3, "carol", 10, 0, 0).await;
    let rep = block_request(&mut carol, block(2)).await;
    assert_eq!(res_of(&rep), ResCode::ResOk as i32);
    // Carol's session ends: she is known to the store and offline.
    server.gm("POST", "/v1/players/3/kick", None).await;
    drop(carol);
    let mut bob = server.login(2, "bob", 10, 0, 0).await;
    bob.send_chat(ChatType::ChatPrivate, "psst", 3, "")
        .await
        .unwrap();
    assert_eq!(
        next_chat_rep(&mut bob).await.res,
        ResCode::ResBlocked as i32
    );
    // Someone she does not block still leaves her an offline whisper.
    let mut dave = server.login(4, "dave", 10, 0, 0).await;
    dave.send_chat(ChatType::ChatPrivate, "hi", 3, "")
        .await
        .unwrap();
    let rep = next_chat_rep(&mut dave).await;
    assert_eq!((rep.res, rep.offline), (ResCode::ResOk as i32, true));
    server.stop().await;
}

async fn group_changes(server: &TestServer) -> u64 {
    let stats = server.gm("GET", "/v1/stats", None).await.json();
    stats["counters"]["group_changes"].as_u64().unwrap()
}

/// The `group_changes` counter counts the times a guild, team or scene
/// gains its first session on the server or loses its last: logins, moves
/// and ended sessions.
#[tokio::test]
async fn group_changes_count_each_groups_first_and_last_session() {
    let server = TestServer::start_with(no_cooldowns).await;
    // Guild 10 and scene 7 get their first session.
    let a = server.login(1, "a", 10, 0, 7).await;
    assert_eq!(group_changes(&server).await, 2);
    // Team 3 is new; guild 10 and scene 7 were not.
    let b = server.login(2, "b", 10, 3, 7).await;
    assert_eq!(group_changes(&server).await, 3);
    // b moves to guild 11, new; guild 10 keeps a.
    let r = server
        .logic("PUT", "/v1/players/2/groups", Some(r#"{"guild": 11}"#))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(group_changes(&server).await, 4);
    // a's session ends: guild 10 loses its last; scene 7 keeps b.
    server.gm("POST", "/v1/players/1/kick", None).await;
    for _ in 0..500 {
        if server
            .world
            .player(guildchat_server::ids::UserId(1))
            .await
            .unwrap()
            .is_none()
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert_eq!(group_changes(&server).await, 5);
    drop((a, b));
}
