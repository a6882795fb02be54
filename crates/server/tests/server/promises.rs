//! The delivery promises of README and ARCHITECTURE.md, one test each:
//! the token's identity on every login, whispers that cannot be lost,
//! msg_id order on every connection, the login reply first, replies on
//! their own connection, kicks that end the session, concurrent logins,
//! the world ring's mask, idempotent sends and shutdown replies.

use std::sync::atomic::Ordering;
use std::time::Duration;

use guildchat_client::{Client, Event};
use guildchat_protocol::{close_code, ChatType, KickReason, ResCode, ServerMsg};
use guildchat_server::ids::UserId;
use guildchat_server::Config;

use crate::common::page;
use crate::common::*;

/// Polls the world until `done` holds (bounded: five seconds).
async fn until(server: &TestServer, what: &str, mut done: impl FnMut(&TestServer) -> bool) {
    for _ in 0..1000 {
        if done(server) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("never: {what}");
}

async fn online(server: &TestServer) -> u32 {
    server.world.online().await.unwrap().0
}

/// Waits until the world counts `n` players.
async fn until_online(server: &TestServer, n: u32) {
    for _ in 0..1000 {
        if online(server).await == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("online never reached {n}");
}

async fn sent(c: &mut Client, channel: ChatType, text: &str, to: u64) -> pb_rep::Rep {
    c.send_chat(channel, text, to, "").await.unwrap();
    next_chat_rep(c).await
}

mod pb_rep {
    pub type Rep = guildchat_protocol::pb::ChatMessageChatRep;
}

fn ok(rep: &pb_rep::Rep) -> u64 {
    assert_eq!(rep.res, ResCode::ResOk as i32, "{rep:?}");
    rep.msg_id
}

/// No cooldowns, and commits that wait a second for company (the most the
/// config allows): a chat reply stays pending long enough for a test to
/// act while it waits.
fn slow_commits(c: &mut Config) {
    no_cooldowns(c);
    c.history.flush_interval_ms = 1000;
}

/// Logs a player in once and out again, so the store knows them, and waits
/// until their session is over (with no other player online).
async fn known(server: &TestServer, user: u64, name: &str) {
    let c = server.login(user, name, 0, 0, 0).await;
    c.close().await;
    until_online(server, 0).await;
}

// ---- Identity on every login ----------------------------------------------

async fn relogin_applies_the_new_tokens_identity(resume_after_drop: bool) {
    let server = TestServer::start_with(no_cooldowns).await;
    let a = server.login(1, "alice", 7, 0, 1).await;
    let mut g7 = server.login(2, "g7", 7, 0, 1).await;
    let mut g8 = server.login(3, "g8", 8, 0, 2).await;
    let mut cursor = 0;
    let mut old_device = Some(a);
    if resume_after_drop {
        ok(&sent(&mut g7, ChatType::ChatGuild, "before", 0).await);
        if let Some(mut a) = old_device.take() {
            cursor = next_chat(&mut a).await.msg_id;
            a.close().await;
        }
        until_lingering(&server, 1).await;
    }
    let mut b = server.connect().await;
    let rep = b
        .login_from(&server.token(1, "alicia", 8, 0, 2), cursor)
        .await
        .unwrap();
    assert_eq!(rep.res, ResCode::ResOk as i32);
    assert!(rep.resumed);
    assert_eq!(
        (rep.username.as_str(), rep.guildid, rep.sceneid),
        ("alicia", 8, 2),
        "the reply reports the new token's identity"
    );
    if let Some(mut a) = old_device {
        let (code, _) = expect_close(&mut a).await;
        assert_eq!(code, Some(close_code::LOGGED_IN_ELSEWHERE));
    }
    // Guild 8 and scene 2 reach her; guild 7 and scene 1 no longer do.
    ok(&sent(&mut g7, ChatType::ChatGuild, "old guild", 0).await);
    ok(&sent(&mut g7, ChatType::ChatNormal, "old scene", 0).await);
    ok(&sent(&mut g8, ChatType::ChatGuild, "new guild", 0).await);
    ok(&sent(&mut g8, ChatType::ChatNormal, "new scene", 0).await);
    assert_eq!(next_chat(&mut b).await.strcontext, "new guild");
    assert_eq!(next_chat(&mut b).await.strcontext, "new scene");
    assert_silent(&mut b).await;
    // She writes to guild 8 now, and guild 7's history is closed to her.
    ok(&sent(&mut b, ChatType::ChatGuild, "hello 8", 0).await);
    let n = next_chat(&mut g8).await;
    assert_eq!(
        (n.strcontext.as_str(), n.sendername.as_str()),
        ("hello 8", "alicia")
    );
    let refused = page(&mut b, ChatType::ChatGuild, 7, 0, 0, 10).await;
    assert_eq!(refused.res, ResCode::ResNoPermission as i32);
    // The name index follows: a whisper to the new name reaches her.
    g8.send_chat(ChatType::ChatPrivate, "psst", 0, "alicia")
        .await
        .unwrap();
    assert_eq!(next_chat_rep(&mut g8).await.res, ResCode::ResOk as i32);
    assert_eq!(next_chat(&mut b).await.strcontext, "psst");
    server.stop().await;
}

#[tokio::test]
async fn a_takeover_applies_the_new_tokens_guild_scene_and_name() {
    relogin_applies_the_new_tokens_identity(false).await;
}

#[tokio::test]
async fn a_resume_applies_the_new_tokens_guild_scene_and_name() {
    relogin_applies_the_new_tokens_identity(true).await;
}

// ---- Whispers cannot be lost ------------------------------------------------

#[tokio::test]
async fn whispers_from_two_senders_to_an_offline_player_arrive_once_each() {
    let server = TestServer::start_with(|c| {
        no_cooldowns(c);
        c.session.linger_ms = 0;
    })
    .await;
    known(&server, 9, "nine").await;
    let mut s1 = server.login(1, "s1", 0, 0, 0).await;
    let mut s2 = server.login(2, "s2", 0, 0, 0).await;
    // Interleaved, so that the later sender's whisper commits before the
    // earlier one's would under any batching.
    let mut want = Vec::new();
    for i in 0..5 {
        for (c, who) in [(&mut s1, "s1"), (&mut s2, "s2")] {
            let rep = sent(c, ChatType::ChatPrivate, &format!("{who} {i}"), 9).await;
            assert!(rep.offline, "stored for the offline player");
            want.push(ok(&rep));
        }
    }
    let mut nine = server.login(9, "nine", 0, 0, 0).await;
    let mut got = Vec::new();
    for _ in 0..want.len() {
        got.push(next_chat(&mut nine).await.msg_id);
    }
    assert_eq!(got, want, "every whisper, in msg_id order");
    // The pong to the barrier deletes exactly what was delivered.
    assert!(nine.heartbeat().await.unwrap().is_empty());
    assert!(nine.heartbeat().await.unwrap().is_empty());
    until(&server, "acked", |s| {
        s.stats.offline_acked.load(Ordering::Relaxed) == want.len() as u64
    })
    .await;
    nine.close().await;
    until_online(&server, 2).await;
    let mut again = server.login(9, "nine", 0, 0, 0).await;
    assert_silent(&mut again).await;
    server.stop().await;
}

#[tokio::test]
async fn a_login_between_routing_and_commit_gets_every_whisper() {
    let server = TestServer::start_with(|c| {
        no_cooldowns(c);
        c.session.linger_ms = 0;
        // Stores wait a second before they commit: the login below falls
        // between the world routing the whispers and the store committing
        // them.
        c.history.flush_interval_ms = 1000;
    })
    .await;
    known(&server, 9, "nine").await;
    let mut s1 = server.login(1, "s1", 0, 0, 0).await;
    let mut s2 = server.login(2, "s2", 0, 0, 0).await;
    // A line's OK means its commit is done, and with it every write queued
    // before it: nine's login record is in the store now.
    ok(&sent(&mut s1, ChatType::ChatWorld, "hello", 0).await);
    let _ = next_chat(&mut s2).await;
    let mut nine = server.connect().await;
    s1.send_chat(ChatType::ChatPrivate, "from s1", 9, "")
        .await
        .unwrap();
    s2.send_chat(ChatType::ChatPrivate, "from s2", 9, "")
        .await
        .unwrap();
    // Each echo is fanned out as the world routes the whisper, which is
    // when it queues the store.
    let first = next_chat(&mut s1).await.msg_id;
    let second = next_chat(&mut s2).await.msg_id;
    nine.send_login_from(&server.token(9, "nine", 0, 0, 0), 0, "", 0)
        .await
        .unwrap();
    let got = read_in_order(&mut nine, 2).await;
    let mut want = vec![first, second];
    want.sort_unstable();
    assert_eq!(got, want);
    for c in [&mut s1, &mut s2] {
        let rep = next_chat_rep(c).await;
        assert_eq!((rep.res, rep.offline), (ResCode::ResOk as i32, true));
    }
    server.stop().await;
}

#[tokio::test]
async fn spilled_whispers_pass_the_offline_caps() {
    let server = TestServer::start_with(|c| {
        no_cooldowns(c);
        c.session.linger_ms = 200;
        c.history.max_offline_per_sender = 1;
    })
    .await;
    known(&server, 8, "eight").await;
    let a = server.login(1, "alice", 0, 0, 0).await;
    let mut b = server.login(2, "bob", 0, 0, 0).await;
    // Bob's one offline whisper uses up his quota...
    let rep = sent(&mut b, ChatType::ChatPrivate, "to eight", 8).await;
    assert!(rep.offline);
    ok(&rep);
    // ...so a new offline one is refused...
    let refused = sent(&mut b, ChatType::ChatPrivate, "again", 8).await;
    assert_eq!(refused.res, ResCode::ResSenderLimit as i32);
    // ...but a whisper Alice never confirmed is kept when her session ends.
    let id = ok(&sent(&mut b, ChatType::ChatPrivate, "live", 1).await);
    drop(a);
    until_online(&server, 1).await;
    let mut a = server.login(1, "alice", 0, 0, 0).await;
    assert_eq!(next_chat(&mut a).await.msg_id, id);
    server.stop().await;
}

#[tokio::test]
async fn a_whisper_to_a_lingering_player_survives_the_linger_running_out() {
    let server = TestServer::start_with(|c| {
        no_cooldowns(c);
        c.session.linger_ms = 1000;
    })
    .await;
    let a = server.login(1, "alice", 0, 0, 0).await;
    let mut b = server.login(2, "bob", 0, 0, 0).await;
    a.close().await;
    until_lingering(&server, 1).await;
    let rep = sent(&mut b, ChatType::ChatPrivate, "while you were away", 1).await;
    assert_eq!(
        server.stats.linger_expired.load(Ordering::Relaxed),
        0,
        "sent while she lingered"
    );
    let id = ok(&rep);
    assert!(rep.offline, "no live connection: stored");
    until_online(&server, 1).await;
    assert_eq!(server.stats.linger_expired.load(Ordering::Relaxed), 1);
    // A fresh login, not a resume, still gets it.
    let mut a = server.connect().await;
    let login = a.login(&server.token(1, "alice", 0, 0, 0)).await.unwrap();
    assert!(!login.resumed);
    let n = next_chat(&mut a).await;
    assert_eq!(
        (n.msg_id, n.strcontext.as_str()),
        (id, "while you were away")
    );
    server.stop().await;
}

#[tokio::test]
async fn a_whisper_queued_to_a_connection_that_dies_unread_is_delivered_later() {
    let server = TestServer::start_with(|c| {
        no_cooldowns(c);
        c.session.linger_ms = 200;
    })
    .await;
    // Alice never reads again after logging in, so she never answers the
    // receipt ping: the server cannot know she saw the whisper.
    let a = server.login(1, "alice", 0, 0, 0).await;
    let mut b = server.login(2, "bob", 0, 0, 0).await;
    let rep = sent(&mut b, ChatType::ChatPrivate, "did you get this?", 1).await;
    let id = ok(&rep);
    assert!(!rep.offline, "she was connected");
    drop(a);
    until_online(&server, 1).await;
    until(&server, "spilled", |s| {
        s.stats.offline_spilled.load(Ordering::Relaxed) == 1
    })
    .await;
    let mut a = server.login(1, "alice", 0, 0, 0).await;
    assert_eq!(next_chat(&mut a).await.msg_id, id);
    server.stop().await;
}

#[tokio::test]
async fn a_whisper_the_client_confirmed_is_not_delivered_again() {
    let server = TestServer::start_with(|c| {
        no_cooldowns(c);
        c.session.linger_ms = 200;
    })
    .await;
    let mut a = server.login(1, "alice", 0, 0, 0).await;
    let mut b = server.login(2, "bob", 0, 0, 0).await;
    ok(&sent(&mut b, ChatType::ChatPrivate, "read me", 1).await);
    assert_eq!(next_chat(&mut a).await.strcontext, "read me");
    // Reading answers the receipt ping (the world's next tick sends it);
    // heartbeats keep the client reading until the world has the pong.
    for _ in 0..500 {
        if server.stats.receipts.load(Ordering::Relaxed) > 0 {
            break;
        }
        a.heartbeat().await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(server.stats.receipts.load(Ordering::Relaxed), 1);
    a.close().await;
    until_online(&server, 1).await;
    assert_eq!(server.stats.offline_spilled.load(Ordering::Relaxed), 0);
    let mut a = server.login(1, "alice", 0, 0, 0).await;
    assert_silent(&mut a).await;
    server.stop().await;
}

#[tokio::test]
async fn whispers_to_players_never_seen_are_refused_and_leave_no_rows() {
    let server = TestServer::start_with(no_cooldowns).await;
    let mut a = server.login(1, "alice", 0, 0, 0).await;
    for i in 0..50u64 {
        let rep = sent(
            &mut a,
            ChatType::ChatPrivate,
            "hello?",
            1_000_000 + i * 7919,
        )
        .await;
        assert_eq!(rep.res, ResCode::ResNoSuchTarget as i32);
    }
    a.send_chat(ChatType::ChatPrivate, "hello?", 0, "nobody")
        .await
        .unwrap();
    assert_eq!(
        next_chat_rep(&mut a).await.res,
        ResCode::ResNoSuchTarget as i32
    );
    assert_eq!(server.stats.offline_stored.load(Ordering::Relaxed), 0);
    let dir = server.stop_keep_dir().await;
    let db = rusqlite::Connection::open(dir.path().join("history.sqlite3")).unwrap();
    let rows: i64 = db
        .query_row("SELECT COUNT(*) FROM offline", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 0);
}

#[tokio::test]
async fn a_whisper_by_name_reaches_a_known_offline_player() {
    let server = TestServer::start_with(|c| {
        no_cooldowns(c);
        c.session.linger_ms = 0;
    })
    .await;
    known(&server, 9, "nine").await;
    let mut a = server.login(1, "alice", 0, 0, 0).await;
    a.send_chat(ChatType::ChatPrivate, "by name", 0, "nine")
        .await
        .unwrap();
    let rep = next_chat_rep(&mut a).await;
    let id = ok(&rep);
    assert!(rep.offline);
    let mut nine = server.login(9, "nine", 0, 0, 0).await;
    let n = next_chat(&mut nine).await;
    assert_eq!((n.msg_id, n.targetname.as_str()), (id, "nine"));
    server.stop().await;
}

// ---- Order and the first frame ---------------------------------------------

/// Reads frames until `count` notifications arrived, checking that the login
/// reply came first and that msg_ids only increase.
async fn read_in_order(c: &mut Client, count: usize) -> Vec<u64> {
    let first = next(c).await;
    assert!(
        matches!(first, ServerMsg::LoginRep(ref r) if r.res == ResCode::ResOk as i32),
        "the login reply is the first frame, got {first:?}"
    );
    let mut ids: Vec<u64> = Vec::new();
    while ids.len() < count {
        if let ServerMsg::Chat(n) = next(c).await {
            if let Some(last) = ids.last() {
                assert!(n.msg_id > *last, "{} after {last}", n.msg_id);
            }
            ids.push(n.msg_id);
        }
    }
    ids
}

#[tokio::test]
async fn offline_whispers_come_after_the_reply_and_before_live_traffic() {
    const STORED: usize = 20;
    const LIVE: usize = 200;
    let server = TestServer::start_with(|c| {
        no_cooldowns(c);
        c.session.linger_ms = 0;
    })
    .await;
    known(&server, 9, "nine").await;
    let mut s = server.login(1, "s", 0, 0, 0).await;
    let mut stored = Vec::new();
    for i in 0..STORED {
        stored.push(ok(&sent(
            &mut s,
            ChatType::ChatPrivate,
            &format!("stored {i}"),
            9,
        )
        .await));
    }
    // A stream of whispers and world lines while the player logs in.
    let streaming = tokio::spawn(async move {
        for i in 0..LIVE {
            let channel = if i % 2 == 0 {
                ChatType::ChatPrivate
            } else {
                ChatType::ChatWorld
            };
            let rep = sent(&mut s, channel, &format!("live {i}"), 9).await;
            ok(&rep);
        }
        s
    });
    let mut nine = server.connect().await;
    nine.send_login_from(&server.token(9, "nine", 0, 0, 0), 0, "", 0)
        .await
        .unwrap();
    let ids = read_in_order(&mut nine, STORED + 10).await;
    assert_eq!(ids[..STORED], stored[..], "the stored whispers come first");
    let _s = streaming.await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn every_connection_gets_the_login_reply_first_under_traffic() {
    let server = TestServer::start_with(no_cooldowns).await;
    let mut s = server.login(1, "s", 0, 0, 0).await;
    let mut a = server.login(2, "a", 0, 0, 0).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    let streaming = tokio::spawn(async move {
        for i in 0..20_000 {
            if stopped.load(Ordering::Relaxed) {
                break;
            }
            ok(&sent(&mut s, ChatType::ChatWorld, &format!("w{i}"), 0).await);
        }
    });
    let cursor = next_chat(&mut a).await.msg_id;
    // Takeovers with and without a cursor, while world chat flows.
    for i in 0..6 {
        let mut c = server.connect().await;
        let from = if i % 2 == 0 { cursor } else { 0 };
        c.send_login_from(&server.token(2, "a", 0, 0, 0), 0, "", from)
            .await
            .unwrap();
        read_in_order(&mut c, 3).await;
    }
    stop.store(true, Ordering::Relaxed);
    streaming.await.unwrap();
    server.stop().await;
}

// ---- Resume, takeover and kick ---------------------------------------------

#[tokio::test]
async fn a_cursor_older_than_the_session_reports_a_gap() {
    let server = TestServer::start_with(no_cooldowns).await;
    let mut a = server.login(1, "alice", 5, 0, 0).await;
    let mut b = server.login(2, "bob", 5, 0, 0).await;
    // Device A's cursor, from a session that then ends.
    ok(&sent(&mut b, ChatType::ChatGuild, "old", 0).await);
    let old_cursor = next_chat(&mut a).await.msg_id;
    assert!(server
        .world
        .kick(UserId(1), KickReason::KickOperator)
        .await
        .unwrap());
    expect_close(&mut a).await;
    ok(&sent(&mut b, ChatType::ChatWorld, "nobody hears this one", 0).await);
    // Device B starts a new session...
    let mut dev_b = server.login(1, "alice", 5, 0, 0).await;
    ok(&sent(&mut b, ChatType::ChatPrivate, "new", 1).await);
    assert_eq!(next_chat(&mut dev_b).await.strcontext, "new");
    // ...and device A comes back with its old cursor.
    let mut dev_a = server.connect().await;
    let rep = dev_a
        .login_from(&server.token(1, "alice", 5, 0, 0), old_cursor)
        .await
        .unwrap();
    assert!(rep.resumed);
    assert!(
        rep.replay_gap,
        "what came before the session is not replayable"
    );
    assert_eq!(rep.missed, 0, "this session itself lost nothing");
    assert_eq!(next_chat(&mut dev_a).await.strcontext, "new");
    server.stop().await;
}

#[tokio::test]
async fn a_pending_reply_never_reaches_the_next_device() {
    let server = TestServer::start_with(|c| {
        no_cooldowns(c);
        // Commits wait a second for company, so the reply is still pending
        // at the takeover (checked below: device A never gets it).
        c.history.flush_interval_ms = 1000;
    })
    .await;
    let mut a = server.login(1, "alice", 10, 0, 0).await;
    // Device B's socket is ready before A sends, so the takeover is quick.
    let mut b = server.connect().await;
    // A's requests are numbered apart from B's.
    for _ in 0..5 {
        a.heartbeat().await.unwrap();
    }
    let seq = a
        .send_chat(ChatType::ChatGuild, "slow", 0, "")
        .await
        .unwrap();
    assert_eq!(next_chat(&mut a).await.strcontext, "slow");
    b.login(&server.token(1, "alice", 10, 0, 0)).await.unwrap();
    loop {
        match a.recv_timeout(WAIT).await.unwrap() {
            Event::Msg(ServerMsg::ChatRep(r)) => {
                panic!(
                    "the reply (seq {:?}) was not pending at the takeover",
                    r.msghead
                )
            }
            Event::Msg(_) => {}
            Event::Closed(_) => break,
        }
    }
    // Chat replies keep request order, so B's own reply comes only after
    // A's pending one has settled: the first reply B sees must be its own.
    let mine = b
        .send_chat(ChatType::ChatGuild, "mine", 0, "")
        .await
        .unwrap();
    assert_ne!(mine, seq);
    let echo = next_chat(&mut b).await;
    assert_eq!(echo.strcontext, "mine");
    let rep = next_chat_rep(&mut b).await;
    assert_eq!(
        (rep.msghead.unwrap().seq, rep.msg_id),
        (mine, echo.msg_id),
        "device B got device A's reply"
    );
    server.stop().await;
}

#[tokio::test]
async fn an_operator_kick_ends_the_session_at_once() {
    let server = TestServer::start().await;
    let mut a = server.login(1, "alice", 0, 0, 0).await;
    assert!(server
        .world
        .kick(UserId(1), KickReason::KickOperator)
        .await
        .unwrap());
    // Gone before the kicked connection has even closed.
    assert_eq!(online(&server).await, 0);
    let mut again = server.connect().await;
    let rep = again
        .login(&server.token(1, "alice", 0, 0, 0))
        .await
        .unwrap();
    assert_eq!(rep.res, ResCode::ResOk as i32);
    assert!(!rep.resumed, "a fast reconnect does not undo the kick");
    let (code, kick) = expect_close(&mut a).await;
    assert_eq!(
        (code, kick),
        (
            Some(close_code::OPERATOR_KICK),
            Some(KickReason::KickOperator as i32)
        )
    );
    server.stop().await;
}

#[tokio::test]
async fn thirty_concurrent_logins_of_one_player_all_get_ok() {
    const LOGINS: usize = 30;
    let server = TestServer::start().await;
    let token = server.token(1, "alice", 0, 0, 0);
    let mut clients = Vec::new();
    for _ in 0..LOGINS {
        clients.push(server.connect().await);
    }
    let mut tasks = Vec::new();
    for mut c in clients {
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            let seq = c.send_login_from(&token, 0, "", 0).await.unwrap();
            let rep = loop {
                match next(&mut c).await {
                    ServerMsg::LoginRep(r) => break r,
                    ServerMsg::Kick(_) => panic!("kicked before the login reply"),
                    _ => {}
                }
            };
            assert_eq!(rep.msghead.unwrap().seq, seq);
            (rep.res, c)
        }));
    }
    let mut survivors = 0;
    for t in tasks {
        let (res, mut c) = t.await.unwrap();
        assert_eq!(res, ResCode::ResOk as i32, "never RES_INTERNAL");
        match c.recv_timeout(QUIET).await {
            Ok(Event::Msg(ServerMsg::Kick(k))) => {
                assert_eq!(k.reason, KickReason::KickLoggedInElsewhere as i32)
            }
            Err(guildchat_client::ClientError::Timeout) => survivors += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(survivors, 1, "exactly one connection keeps the session");
    assert_eq!(online(&server).await, 1);
    server.stop().await;
}

/// Resumes `user` after `cursor` and returns the replayed world lines.
async fn replayed_world(server: &TestServer, user: u64, name: &str, cursor: u64) -> Vec<String> {
    let mut c = server.connect().await;
    let rep = c
        .login_from(&server.token(user, name, 0, 0, 0), cursor)
        .await
        .unwrap();
    assert!(rep.resumed);
    let mut lines = Vec::new();
    for _ in 0..rep.replayed {
        lines.push(next_chat(&mut c).await.strcontext);
    }
    lines
}

#[tokio::test]
async fn the_world_ring_replays_by_the_mask_a_line_was_sent_under() {
    let server = TestServer::start_with(no_cooldowns).await;
    let mut a = server.connect().await;
    let cursor = a
        .login(&server.token(1, "alice", 0, 0, 0))
        .await
        .unwrap()
        .last_msg_id;
    let mut w = server.login(2, "w", 0, 0, 0).await;
    ok(&sent(&mut w, ChatType::ChatWorld, "heard", 0).await);
    assert_eq!(next_chat(&mut a).await.strcontext, "heard");
    a.send_mask(1 << ChatType::ChatWorld as u32).await.unwrap();
    assert!(matches!(next(&mut a).await, ServerMsg::SetMaskRep(_)));
    ok(&sent(&mut w, ChatType::ChatWorld, "masked", 0).await);
    a.close().await;
    until_lingering(&server, 1).await;
    assert_eq!(
        replayed_world(&server, 1, "alice", cursor).await,
        vec!["heard"]
    );
    server.stop().await;
}

// ---- Idempotent chat sends ---------------------------------------------------

#[tokio::test]
async fn a_retry_after_a_lost_reply_is_delivered_once() {
    let server = TestServer::start_with(slow_commits).await;
    let mut listener = server.login(2, "bob", 10, 0, 0).await;
    let mut a = server.login(1, "alice", 10, 0, 0).await;
    a.send_chat_with_id(ChatType::ChatGuild, "once", 0, "", 0xfeed)
        .await
        .unwrap();
    let first = next_chat(&mut listener).await;
    // The reply is still waiting for the commit when the connection dies.
    drop(a);
    until_lingering(&server, 1).await;
    let mut a = server.connect().await;
    a.login_from(&server.token(1, "alice", 10, 0, 0), first.msg_id)
        .await
        .unwrap();
    a.send_chat_with_id(ChatType::ChatGuild, "once", 0, "", 0xfeed)
        .await
        .unwrap();
    let rep = next_chat_rep(&mut a).await;
    assert_eq!((rep.res, rep.msg_id), (ResCode::ResOk as i32, first.msg_id));
    assert_silent(&mut listener).await;
    assert_eq!(server.stats.chat_retries.load(Ordering::Relaxed), 1);
    // A new id is a new line.
    a.send_chat_with_id(ChatType::ChatGuild, "twice", 0, "", 0xbeef)
        .await
        .unwrap();
    assert_ne!(ok(&next_chat_rep(&mut a).await), first.msg_id);
    assert_eq!(next_chat(&mut listener).await.strcontext, "twice");
    server.stop().await;
}

// ---- Shutdown -----------------------------------------------------------------

#[tokio::test]
async fn shutdown_answers_pending_chat_replies_before_closing() {
    let server = TestServer::start_with(slow_commits).await;
    let mut a = server.login(1, "alice", 10, 0, 0).await;
    let seq = a
        .send_chat(ChatType::ChatGuild, "last words", 0, "")
        .await
        .unwrap();
    assert_eq!(next_chat(&mut a).await.strcontext, "last words");
    let stopping = tokio::spawn(server.stop());
    let rep = next_chat_rep(&mut a).await;
    assert_eq!(rep.msghead.unwrap().seq, seq);
    assert_eq!(rep.res, ResCode::ResOk as i32);
    let (code, kick) = expect_close(&mut a).await;
    assert_eq!(code, Some(close_code::SHUTDOWN));
    assert_eq!(kick, Some(KickReason::KickShutdown as i32));
    stopping.await.unwrap();
}
