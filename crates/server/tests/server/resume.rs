//! Sessions that survive: linger and resume, replay gaps, takeover under a
//! continuous stream (exactly once), slow consumers shed by priority.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use guildchat_client::{Client, Event};
use guildchat_protocol::{close_code, ChatType, KickReason, ResCode, ServerMsg};
use guildchat_server::ids::UserId;
use guildchat_server::Config;

use crate::common::*;

/// Sends a chat line and returns the msg_id the server acknowledged.
async fn sent(c: &mut Client, channel: ChatType, text: &str, to: u64) -> u64 {
    c.send_chat(channel, text, to, "").await.unwrap();
    let rep = next_chat_rep(c).await;
    assert_eq!(rep.res, ResCode::ResOk as i32, "{text}");
    rep.msg_id
}

#[tokio::test]
async fn linger_then_resume_replays_in_order_without_duplicates() {
    let server = TestServer::start_with(no_cooldowns).await;
    let mut a = server.login(1, "alice", 10, 0, 0).await;
    let mut b = server.login(2, "bob", 10, 0, 0).await;
    let first = sent(&mut b, ChatType::ChatPrivate, "before", 1).await;
    let seen = next_chat(&mut a).await;
    assert_eq!(seen.msg_id, first);
    a.close().await;
    until_lingering(&server, 1).await;

    // Alice is lingering: whispers to her are accepted, and she is still a
    // guild member.
    let mut expected = Vec::new();
    for i in 0..5 {
        expected.push(sent(&mut b, ChatType::ChatPrivate, &format!("w{i}"), 1).await);
    }
    for i in 0..2 {
        expected.push(sent(&mut b, ChatType::ChatGuild, &format!("g{i}"), 0).await);
    }
    assert_eq!(server.world.online().await.unwrap().0, 2);

    let mut a = server.connect().await;
    let rep = a
        .login_from(&server.token(1, "alice", 10, 0, 0), seen.msg_id)
        .await
        .unwrap();
    assert_eq!(rep.res, ResCode::ResOk as i32);
    assert!(rep.resumed);
    // The guild lines come from the replay buffer, the whispers (stored
    // while she lingered) from the offline inbox, merged in msg_id order.
    assert_eq!((rep.replayed, rep.replay_gap), (2, false));
    let mut got = Vec::new();
    for _ in 0..7 {
        got.push(next_chat(&mut a).await.msg_id);
    }
    assert_eq!(got, expected, "replayed in order, nothing twice");
    // Then live traffic, and nothing else in between.
    let live = sent(&mut b, ChatType::ChatPrivate, "live", 1).await;
    assert_eq!(next_chat(&mut a).await.msg_id, live);
    server.stop().await;
}

#[tokio::test(start_paused = true)]
async fn linger_expires_and_the_player_is_gone() {
    let server = TestServer::start_timed(|c| {
        no_cooldowns(c);
        // Bob reads nothing for a minute of paused time; keep him.
        c.limits.idle_timeout_ms = 300_000;
    })
    .await;
    let a = server.login(1, "alice", 10, 0, 0).await;
    let mut b = server.login(2, "bob", 10, 0, 0).await;
    let seen = sent(&mut b, ChatType::ChatGuild, "hi", 0).await;
    a.close().await;
    until_lingering(&server, 1).await;
    tokio::time::sleep(Duration::from_secs(59)).await;
    assert_eq!(
        server.world.online().await.unwrap().0,
        2,
        "still lingering at 59 s"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(server.world.online().await.unwrap().0, 1, "gone after 60 s");
    assert_eq!(server.stats.linger_expired.load(Ordering::Relaxed), 1);
    b.send_chat(ChatType::ChatPrivate, "hello?", 1, "")
        .await
        .unwrap();
    assert_eq!(
        next_chat_rep(&mut b).await.res,
        ResCode::ResTargetOffline as i32
    );
    // A later login starts afresh and says the cursor cannot be honoured.
    sent(&mut b, ChatType::ChatWorld, "missed", 0).await;
    let mut a = server.connect().await;
    let rep = a
        .login_from(&server.token(1, "alice", 10, 0, 0), seen)
        .await
        .unwrap();
    assert_eq!(rep.res, ResCode::ResOk as i32);
    assert!(!rep.resumed);
    assert!(rep.replay_gap);
    server.stop().await;
}

#[tokio::test]
async fn a_gap_beyond_the_replay_buffer_is_reported() {
    let server = TestServer::start_with(|c| {
        no_cooldowns(c);
        c.session.replay_buffer = 4;
    })
    .await;
    let mut a = server.login(1, "alice", 3, 0, 0).await;
    let mut b = server.login(2, "bob", 3, 0, 0).await;
    let cursor = sent(&mut b, ChatType::ChatGuild, "seen", 0).await;
    assert_eq!(next_chat(&mut a).await.msg_id, cursor);
    a.close().await;
    until_lingering(&server, 1).await;
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(sent(&mut b, ChatType::ChatGuild, &format!("{i}"), 0).await);
    }
    let mut a = server.connect().await;
    let rep = a
        .login_from(&server.token(1, "alice", 3, 0, 0), cursor)
        .await
        .unwrap();
    assert!(rep.resumed);
    assert_eq!((rep.replay_gap, rep.missed, rep.replayed), (true, 6, 4));
    assert_eq!(server.stats.replay_gaps.load(Ordering::Relaxed), 1);
    for want in &ids[6..] {
        assert_eq!(next_chat(&mut a).await.msg_id, *want);
    }
    server.stop().await;
}

#[tokio::test]
async fn lingering_players_hold_their_slot_and_may_always_resume() {
    let server = TestServer::start_with(|c| c.max_online = 1).await;
    let a = server.login(1, "alice", 0, 0, 0).await;
    a.close().await;
    until_lingering(&server, 1).await;
    let mut b = server.connect().await;
    let rep = b.login(&server.token(2, "bob", 0, 0, 0)).await.unwrap();
    assert_eq!(rep.res, ResCode::ResServerFull as i32);
    let mut a = server.connect().await;
    let rep = a.login(&server.token(1, "alice", 0, 0, 0)).await.unwrap();
    assert_eq!((rep.res, rep.resumed), (ResCode::ResOk as i32, true));
    server.stop().await;
}

#[tokio::test]
async fn takeovers_under_a_continuous_stream_deliver_exactly_once() {
    const MESSAGES: usize = 3000;
    const TAKEOVERS: usize = 6;
    let server = TestServer::start_with(|c| {
        no_cooldowns(c);
        c.session.replay_buffer = 2048;
        let (frames, bytes) = c.replay_bound();
        c.limits.outbound_queue = frames + 64;
        c.limits.outbound_bytes = bytes;
    })
    .await;
    let token = server.token(1, "u", 10, 0, 0);
    let mut device = server.connect().await;
    assert_eq!(
        device.login(&token).await.unwrap().res,
        ResCode::ResOk as i32
    );
    let mut sender = server.login(2, "sender", 10, 0, 0).await;

    // The sender streams whispers, guild and world chat to U and records
    // every msg_id the server acknowledged.
    let streaming = tokio::spawn(async move {
        let mut acked = Vec::with_capacity(MESSAGES);
        for i in 0..MESSAGES {
            let channel = [
                ChatType::ChatPrivate,
                ChatType::ChatGuild,
                ChatType::ChatWorld,
            ][i % 3];
            acked.push(sent(&mut sender, channel, &format!("m{i}"), 1).await);
        }
        acked
    });

    let mut seen: Vec<u64> = Vec::with_capacity(MESSAGES);
    let mut takeovers = 0;
    let per_device = MESSAGES / (TAKEOVERS + 1);
    while seen.len() < MESSAGES {
        let n = next_chat(&mut device).await;
        seen.push(n.msg_id);
        if takeovers < TAKEOVERS && seen.len() == per_device * (takeovers + 1) {
            // The second device logs in with the last msg_id the first one
            // saw; the first one reads nothing more.
            let mut next = server.connect().await;
            let rep = next.login_from(&token, n.msg_id).await.unwrap();
            assert_eq!(rep.res, ResCode::ResOk as i32);
            assert!(rep.resumed && !rep.replay_gap);
            device = next;
            takeovers += 1;
        }
    }
    let acked = streaming.await.unwrap();
    assert_eq!(takeovers, TAKEOVERS);
    let unique: HashSet<u64> = seen.iter().copied().collect();
    assert_eq!(unique.len(), seen.len(), "no message twice");
    assert_eq!(seen, acked, "every acknowledged message, once, in order");
    assert_silent(&mut device).await;
    assert_eq!(
        server.stats.takeovers.load(Ordering::Relaxed),
        TAKEOVERS as u64
    );
    server.stop().await;
}

/// Reads one client until `end` arrives; returns the world msg_ids seen.
async fn read_until_end(mut c: Client) -> Vec<u64> {
    let mut ids = Vec::new();
    loop {
        let n = next_chat(&mut c).await;
        if n.strcontext == "end" {
            return ids;
        }
        ids.push(n.msg_id);
    }
}

#[tokio::test]
async fn a_stalled_reader_is_shed_then_cut_and_resumes_without_losing_whispers() {
    const HEALTHY: usize = 100;
    const WORLD: usize = 2000;
    let server = TestServer::start_with(|c| {
        no_cooldowns(c);
        c.limits.socket_send_buffer = 8 * 1024;
        c.session.replay_buffer = 64;
        // One sender streams every whisper of this test.
        c.history.max_offline_per_sender = 1000;
        // As small a queue as a full resume replay allows.
        let (frames, bytes) = c.replay_bound();
        c.limits.outbound_queue = frames + 64;
        c.limits.outbound_bytes = bytes;
        // The client is cut for a full queue here, not for stalling: the
        // flood (a round trip per line) may take longer than the default
        // stall timeout on a loaded machine.
        c.limits.stall_timeout_ms = 120_000;
    })
    .await;
    let max_bytes = {
        let mut c = Config::default();
        c.session.replay_buffer = 64;
        c.replay_bound().1
    };
    let token = server.token(1, "stalled", 0, 0, 0);
    let mut stalled = Client::connect_with(&server.url, None, Some(4096))
        .await
        .unwrap();
    let rep = stalled.login(&token).await.unwrap();
    assert_eq!(rep.res, ResCode::ResOk as i32);
    let mut readers = Vec::new();
    for i in 0..HEALTHY {
        let c = server
            .login(100 + i as u64, &format!("h{i}"), 0, 0, 0)
            .await;
        readers.push(tokio::spawn(read_until_end(c)));
    }
    let mut w = server.login(2, "sender", 0, 0, 0).await;

    // Phase 1: a world flood. The stalled client's queue fills to half and
    // world chat is shed for it; its backlog never passes the bound.
    let mut world_ids = Vec::new();
    let mut max_backlog = 0;
    for i in 0..WORLD {
        world_ids.push(sent(&mut w, ChatType::ChatWorld, &format!("world {i}"), 0).await);
        if i % 50 == 0 {
            if let Some((_, bytes)) = server.world.backlog(UserId(1)).await.unwrap() {
                max_backlog = max_backlog.max(bytes);
            }
        }
    }
    assert!(
        server.stats.shed.load(Ordering::Relaxed) > 0,
        "world chat was shed"
    );
    assert!(
        max_backlog <= max_bytes,
        "backlog {max_backlog} past its bound"
    );
    assert_eq!(server.stats.slow_consumers.load(Ordering::Relaxed), 0);

    // Phase 2: whispers are never shed. They fill the rest of the queue and
    // the client is cut as a slow consumer; its session lingers.
    let mut whispers = Vec::new();
    while server.stats.slow_consumers.load(Ordering::Relaxed) == 0 {
        assert!(whispers.len() < 500, "never disconnected");
        whispers.push(sent(&mut w, ChatType::ChatPrivate, "psst", 1).await);
    }
    // More whispers while it lingers: still accepted.
    for _ in 0..5 {
        whispers.push(sent(&mut w, ChatType::ChatPrivate, "later", 1).await);
    }

    // The healthy clients got every world message, once, in order.
    sent(&mut w, ChatType::ChatWorld, "end", 0).await;
    for r in readers {
        assert_eq!(r.await.unwrap(), world_ids);
    }

    // The stalled client reads what reached its socket, then the close.
    let mut got: Vec<u64> = Vec::new();
    let mut last_seen = rep.last_msg_id;
    let mut kick = None;
    let code = loop {
        match stalled.recv_timeout(WAIT).await.unwrap() {
            Event::Msg(ServerMsg::Chat(n)) => {
                last_seen = n.msg_id;
                if n.chattype == ChatType::ChatPrivate as i32 {
                    got.push(n.msg_id);
                }
            }
            Event::Msg(ServerMsg::Kick(k)) => kick = Some(k.reason),
            Event::Msg(_) => {}
            Event::Closed(code) => break code,
        }
    };
    assert_eq!(code, Some(close_code::SLOW_CONSUMER));
    assert_eq!(kick, Some(KickReason::KickSlowConsumer as i32));

    // It resumes from the last message it saw: every whisper arrives once,
    // from the replay buffer, the whispers its cut connection never
    // confirmed, and those stored while it lingered.
    let mut again = server.connect().await;
    let rep = again.login_from(&token, last_seen).await.unwrap();
    assert!(rep.resumed);
    while got.len() < whispers.len() {
        let n = next_chat(&mut again).await;
        if n.chattype == ChatType::ChatPrivate as i32 {
            got.push(n.msg_id);
        }
    }
    assert_eq!(got, whispers, "every whisper, once, in order");
    server.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_queue_that_does_not_drain_is_cut_after_the_stall_timeout() {
    let server = TestServer::start_timed(|c| {
        c.limits.socket_send_buffer = 4 * 1024;
        c.limits.stall_timeout_ms = 3_000;
    })
    .await;
    let mut stalled = Client::connect_with(&server.url, None, Some(4096))
        .await
        .unwrap();
    assert_eq!(
        stalled
            .login(&server.token(1, "s", 0, 0, 0))
            .await
            .unwrap()
            .res,
        ResCode::ResOk as i32
    );
    // System messages until something stays queued for the stalled client
    // for longer than the writer ever holds a frame back to coalesce.
    let mut n = 0;
    loop {
        assert!(n < 10_000, "socket never filled");
        server
            .world
            .announce(
                "x".repeat(500),
                guildchat_server::world::AnnounceTo::Everyone,
            )
            .await
            .unwrap();
        n += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
        if server
            .world
            .backlog(UserId(1))
            .await
            .unwrap()
            .is_some_and(|(frames, _)| frames > 0)
        {
            break;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(server.stats.slow_consumers.load(Ordering::Relaxed), 0);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(server.stats.slow_consumers.load(Ordering::Relaxed), 1);
    let (code, kick) = expect_close(&mut stalled).await;
    assert_eq!(code, Some(close_code::SLOW_CONSUMER));
    assert_eq!(kick, Some(KickReason::KickSlowConsumer as i32));
    server.stop().await;
}

/// Replay entries leave by age once no resume could still ask for them
/// (idle timeout + ping interval + linger: 120 s by default); before that a
/// takeover replays them.
#[tokio::test(start_paused = true)]
async fn replay_entries_older_than_any_resume_could_need_expire() {
    let server = TestServer::start_timed(no_cooldowns).await;
    assert_eq!(Config::default().replay_max_age(), Duration::from_secs(120));
    let mut logins = Vec::new();
    let mut devices = Vec::new();
    for (user, name) in [(1, "early"), (2, "late")] {
        let mut c = server.connect().await;
        let rep = c.login(&server.token(user, name, 10, 0, 0)).await.unwrap();
        logins.push(rep.last_msg_id);
        devices.push(c);
    }
    let mut b = server.login(3, "sender", 10, 0, 0).await;
    let old = sent(&mut b, ChatType::ChatGuild, "old", 0).await;
    for d in &mut devices {
        assert_eq!(next_chat(d).await.msg_id, old);
    }
    async fn takeover(
        server: &TestServer,
        user: u64,
        name: &str,
        cursor: u64,
    ) -> (bool, u32, bool) {
        let mut c = server.connect().await;
        let rep = c
            .login_from(&server.token(user, name, 10, 0, 0), cursor)
            .await
            .unwrap();
        (rep.resumed, rep.replayed, rep.replay_gap)
    }
    // Everyone stays connected, heartbeating, for 130 s.
    for step in 1..=13 {
        tokio::time::sleep(Duration::from_secs(10)).await;
        if step == 6 {
            // 60 s: still within reach.
            assert_eq!(
                takeover(&server, 1, "early", logins[0]).await,
                (true, 1, false)
            );
        }
        b.heartbeat().await.unwrap();
        devices[1].heartbeat().await.unwrap();
    }
    // 130 s: gone, and the resume says so.
    assert_eq!(
        takeover(&server, 2, "late", logins[1]).await,
        (true, 0, true)
    );
    server.stop().await;
}
