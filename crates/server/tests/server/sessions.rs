//! Sessions: takeover keeps state, server full, operator kick, shutdown,
//! slow consumers.

use std::sync::atomic::Ordering;
use std::time::Duration;

use guildchat_protocol::{close_code, ChatType, KickReason, ResCode, ServerMsg};
use guildchat_server::ids::UserId;

use crate::common::*;

#[tokio::test]
async fn takeover_kicks_the_old_connection_and_keeps_state() {
    let server = TestServer::start().await;
    let mut old = server.login(1, "alice", 10, 0, 0).await;
    let mut bob = server.login(2, "bob", 10, 0, 0).await;
    // State built up on the first connection: a mask and a world cooldown.
    old.send_mask(1 << ChatType::ChatNormal as u32)
        .await
        .unwrap();
    let _ = next(&mut old).await;
    assert_eq!(
        say(&mut old, ChatType::ChatWorld, "hi").await.res,
        ResCode::ResOk as i32
    );
    let _ = next_chat(&mut bob).await;

    let mut new = server.connect().await;
    let rep = new
        .login(&server.token(1, "alice", 10, 0, 0))
        .await
        .unwrap();
    assert_eq!(rep.res, ResCode::ResOk as i32);
    assert!(rep.resumed, "the login took over the session");
    assert_eq!(rep.mask, 1 << ChatType::ChatNormal as u32, "mask survived");

    let (code, kick) = expect_close(&mut old).await;
    assert_eq!(kick, Some(KickReason::KickLoggedInElsewhere as i32));
    assert_eq!(code, Some(close_code::LOGGED_IN_ELSEWHERE));

    // The cooldown started before the takeover still applies.
    let rep = say(&mut new, ChatType::ChatWorld, "again").await;
    assert_eq!(rep.res, ResCode::ResOnCooldown as i32);
    assert!(rep.cooldown_ms > 5_000);
    // Group membership survived: guild chat reaches bob and the new
    // connection hears bob.
    assert_eq!(
        say(&mut new, ChatType::ChatGuild, "still here").await.res,
        ResCode::ResOk as i32
    );
    assert_eq!(next_chat(&mut bob).await.strcontext, "still here");
    bob.send_chat(ChatType::ChatGuild, "wb", 0, "")
        .await
        .unwrap();
    assert_eq!(next_chat(&mut new).await.strcontext, "wb");
    assert_eq!(server.stats.online.load(Ordering::Relaxed), 2);
    assert_eq!(server.stats.takeovers.load(Ordering::Relaxed), 1);
    server.stop().await;
}

#[tokio::test]
async fn server_full_refuses_new_players_but_not_takeovers() {
    let server = TestServer::start_with(|c| c.max_online = 1).await;
    let _a = server.login(1, "alice", 0, 0, 0).await;
    let mut b = server.connect().await;
    let rep = b.login(&server.token(2, "bob", 0, 0, 0)).await.unwrap();
    assert_eq!(rep.res, ResCode::ResServerFull as i32);
    assert_eq!(expect_close(&mut b).await.0, Some(close_code::LOGIN_FAILED));
    let _a2 = server.login(1, "alice", 0, 0, 0).await;
    server.stop().await;
}

#[tokio::test]
async fn operator_kick_closes_with_its_code_and_frees_the_slot() {
    let server = TestServer::start().await;
    let mut a = server.login(1, "alice", 0, 0, 0).await;
    assert!(server
        .world
        .kick(UserId(1), KickReason::KickOperator)
        .await
        .unwrap());
    assert!(!server
        .world
        .kick(UserId(2), KickReason::KickOperator)
        .await
        .unwrap());
    let (code, kick) = expect_close(&mut a).await;
    assert_eq!(
        (code, kick),
        (
            Some(close_code::OPERATOR_KICK),
            Some(KickReason::KickOperator as i32)
        )
    );
    // The player is gone from the registry.
    for _ in 0..100 {
        if server.world.online().await.unwrap().0 == 0 {
            break;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(server.world.online().await.unwrap().0, 0);
    server.stop().await;
}

#[tokio::test]
async fn shutdown_tells_every_client_why() {
    let server = TestServer::start().await;
    let mut a = server.login(1, "alice", 0, 0, 0).await;
    let mut b = server.login(2, "bob", 0, 0, 0).await;
    let mut pre_login = server.connect().await;
    let stopping = tokio::spawn(server.stop());
    for c in [&mut a, &mut b, &mut pre_login] {
        let (code, kick) = expect_close(c).await;
        assert_eq!(code, Some(close_code::SHUTDOWN));
        assert_eq!(kick, Some(KickReason::KickShutdown as i32));
    }
    stopping.await.unwrap();
}

#[tokio::test]
async fn a_client_that_stops_reading_is_disconnected_as_slow_consumer() {
    let server = TestServer::start_with(|c| {
        // A small queue, as small as a full resume replay allows.
        c.history.enabled = false;
        c.session.replay_buffer = 4;
        c.limits.outbound_queue = c.replay_bound().0 + 64;
    })
    .await;
    let mut stalled = server.login(1, "stalled", 0, 0, 0).await;
    let mut healthy = server.login(2, "healthy", 0, 0, 0).await;
    let text = "x".repeat(900);
    // The stalled client reads nothing. Its socket buffers fill, then its
    // queue; the healthy one keeps reading throughout.
    let mut sent = 0u32;
    while server.stats.slow_consumers.load(Ordering::Relaxed) == 0 {
        assert!(sent < 200_000, "no slow consumer detected");
        server
            .world
            .announce(text.clone(), guildchat_server::world::AnnounceTo::Everyone)
            .await
            .unwrap();
        sent += 1;
        let n = next_chat(&mut healthy).await;
        assert_eq!(n.chattype, ChatType::ChatAll as i32);
    }
    let (code, _) = loop {
        match stalled.recv_timeout(WAIT).await.unwrap() {
            guildchat_client::Event::Closed(code) => break (code, ()),
            guildchat_client::Event::Msg(ServerMsg::Kick(k)) => {
                assert_eq!(k.reason, KickReason::KickSlowConsumer as i32)
            }
            guildchat_client::Event::Msg(_) => {}
        }
    };
    assert_eq!(code, Some(close_code::SLOW_CONSUMER));
    // Delivery to the healthy client goes on.
    server
        .world
        .announce(
            "after".into(),
            guildchat_server::world::AnnounceTo::Everyone,
        )
        .await
        .unwrap();
    assert_eq!(next_chat(&mut healthy).await.strcontext, "after");
    server.stop().await;
}

/// Write coalescing: a frame for a client written to less than
/// `write_coalesce_ms` ago waits out the rest of the interval and the frames
/// behind it share its write; after a quiet spell a frame goes out at once.
#[tokio::test(start_paused = true)]
async fn a_busy_client_gets_its_frames_coalesced_and_a_quiet_one_at_once() {
    for coalesce_ms in [0u64, 50] {
        let server = TestServer::start_timed(|c| c.limits.write_coalesce_ms = coalesce_ms).await;
        let mut a = server.login(1, "a", 0, 0, 0).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let t0 = tokio::time::Instant::now();
        server
            .world
            .announce(
                "first".into(),
                guildchat_server::world::AnnounceTo::Everyone,
            )
            .await
            .unwrap();
        let _ = next_chat(&mut a).await;
        let first = t0.elapsed();
        server
            .world
            .announce(
                "second".into(),
                guildchat_server::world::AnnounceTo::Everyone,
            )
            .await
            .unwrap();
        server
            .world
            .announce(
                "third".into(),
                guildchat_server::world::AnnounceTo::Everyone,
            )
            .await
            .unwrap();
        let _ = next_chat(&mut a).await;
        let second = t0.elapsed();
        let _ = next_chat(&mut a).await;
        let third = t0.elapsed();
        assert!(
            first < Duration::from_millis(5),
            "quiet client waited {first:?}"
        );
        if coalesce_ms == 0 {
            assert!(second < Duration::from_millis(5), "held back {second:?}");
        } else {
            assert!(
                (Duration::from_millis(50)..Duration::from_millis(60)).contains(&second),
                "second frame after {second:?}"
            );
        }
        assert!(third - second < Duration::from_millis(1), "not one write");
        server.stop().await;
    }
}
