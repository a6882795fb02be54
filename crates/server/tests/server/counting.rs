//! Byte accounting of a connection's queue: every frame that enters it is
//! counted, and the writer takes off exactly what was counted, so a player
//! cut while traffic for them keeps coming cannot upset anyone else.

use std::time::Duration;

use guildchat_protocol::{close_code, ChatType, KickReason, ResCode};
use tokio::time::Instant;

use crate::common::*;

/// Operator announcements queued at the world in one go: more than a task
/// handles in one turn of the scheduler (tokio's budget is 128), so the
/// world is still working through them when the kicked player's writer has
/// written its kick notice.
const BURST: usize = 300;

#[tokio::test(start_paused = true)]
async fn an_idle_kick_during_a_chat_stream_leaves_the_server_serving() {
    let server = TestServer::start_timed(|c| {
        c.chat.world.cooldown_ms = 0;
        // No corking: the kick notice is written the moment it is queued.
        c.limits.write_coalesce_ms = 0;
    })
    .await;
    let before = Instant::now();
    let mut silent = server.login(1, "silent", 7, 0, 0).await;
    // The clock is paused: the login took no time, so the server last heard
    // from `silent` at `before`.
    assert_eq!(Instant::now(), before);
    let idle_at = before + Duration::from_secs(45);
    let mut talker = server.login(2, "talker", 7, 0, 0).await;
    // `talker` streams world chat across the moment `silent` is kicked as
    // idle (it reads nothing, so it never answers a ping), and stops within
    // the 2 s the server waits for `silent` to answer the close.
    let stream = tokio::spawn(async move {
        let mut n = 0u32;
        while Instant::now() < idle_at + Duration::from_secs(1) {
            n += 1;
            let rep = say(&mut talker, ChatType::ChatWorld, &format!("line {n}")).await;
            assert_eq!(rep.res, ResCode::ResOk as i32, "line {n}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        talker
    });
    // At that very instant, announcements reach the world: traffic that is
    // never shed, for a player about to be detached. Their timers are set
    // after the server's idle timer for `silent`, so they fire after it.
    let burst: Vec<_> = (0..BURST)
        .map(|i| {
            let world = server.world.clone();
            tokio::spawn(async move {
                tokio::time::sleep_until(idle_at).await;
                world
                    .announce(
                        format!("notice {i}"),
                        guildchat_server::world::AnnounceTo::Everyone,
                    )
                    .await
            })
        })
        .collect();
    let mut talker = stream.await.unwrap();
    for task in burst {
        tokio::time::timeout(WAIT, task)
            .await
            .expect("the world answers every announcement")
            .unwrap()
            .expect("the world is alive");
    }
    let (code, kick) = expect_close(&mut silent).await;
    assert_eq!(code, Some(close_code::IDLE));
    assert_eq!(kick, Some(KickReason::KickIdle as i32));
    // The world survived what it queued for the kicked player.
    for i in 0..10 {
        let rep = say(&mut talker, ChatType::ChatWorld, &format!("after {i}")).await;
        assert_eq!(rep.res, ResCode::ResOk as i32, "after {i}");
    }
    server.stop().await;
}
