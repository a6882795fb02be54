//! Request rate limits: a request over its kind's limit gets
//! RES_RATE_LIMITED with the wait, a client that keeps flooding is closed
//! with 4008, and none of it costs honest players a single line.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use guildchat_client::{Client, Event};
use guildchat_protocol::{
    close_code, codec, pb, ChatType, ClientMsg, KickReason, MsgType, ResCode, ServerMsg,
};
use guildchat_server::stats::Stats;

use crate::common::*;

fn online_req(c: &mut Client) -> ClientMsg {
    ClientMsg::Online(pb::ChatMessageOnlineReq {
        msghead: codec::head(MsgType::CchOnlineReq, c.next_seq()),
    })
}

fn history_req(c: &mut Client) -> ClientMsg {
    ClientMsg::History(pb::ChatMessageHistoryReq {
        msghead: codec::head(MsgType::CchHistoryReq, c.next_seq()),
        chattype: ChatType::ChatWorld as i32,
        limit: 10,
        ..Default::default()
    })
}

async fn online(c: &mut Client) -> pb::ChatMessageOnlineRep {
    let req = online_req(c);
    c.send(&req).await.unwrap();
    match next(c).await {
        ServerMsg::OnlineRep(r) => r,
        other => panic!("expected an online reply, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_request_over_the_limit_gets_the_wait_and_passes_after_it() {
    let server = TestServer::start_timed(|_| {}).await;
    let mut a = server.login(1, "alice", 10, 0, 0).await;
    let _b = server.login(2, "bob", 10, 0, 0).await;
    // The default world-ask limit: 5 a second, burst 10. The count comes
    // from the gauge, with the configured maximum.
    for _ in 0..10 {
        let rep = online(&mut a).await;
        assert_eq!(
            (rep.res, rep.online, rep.max_online),
            (ResCode::ResOk as i32, 2, 20_000)
        );
    }
    let refused = online(&mut a).await;
    assert_eq!(refused.res, ResCode::ResRateLimited as i32);
    // One token every 200 ms; the paused clock may have moved on a little
    // while the server was idle.
    assert!(
        (1..=200).contains(&refused.retry_after_ms),
        "wait {}",
        refused.retry_after_ms
    );
    // Set-mask shares the bucket, and its refusal keeps the mask.
    a.send_mask(0).await.unwrap();
    let ServerMsg::SetMaskRep(mask) = next(&mut a).await else {
        panic!("expected a mask reply");
    };
    assert_eq!(mask.res, ResCode::ResRateLimited as i32);
    assert!(mask.retry_after_ms > 0 && mask.retry_after_ms <= 200);
    // Heartbeats have their own bucket.
    a.heartbeat().await.unwrap();
    tokio::time::advance(Duration::from_millis(200)).await;
    assert_eq!(online(&mut a).await.res, ResCode::ResOk as i32);
    assert_eq!(Stats::get(&server.stats.rate_limited), 2);
    assert_eq!(Stats::get(&server.stats.rate_kicks), 0);
    server.stop().await;
}

/// What the flooding client saw.
#[derive(Debug, Default)]
struct Flood {
    ok: u64,
    limited: u64,
    /// Close codes and kick reasons of each connection the server closed.
    closes: Vec<(Option<u16>, Option<i32>)>,
}

/// Logs in and sends history pages and online queries as fast as the
/// server answers them (16 in flight), logging in again whenever it is
/// closed, until `stop`.
async fn flood(server: Arc<TestServer>, stop: Arc<AtomicBool>) -> Flood {
    let mut seen = Flood::default();
    while !stop.load(Ordering::Relaxed) {
        let mut c = server.login(1_000, "flooder", 99, 0, 0).await;
        let mut kick = None;
        'conn: while !stop.load(Ordering::Relaxed) {
            for i in 0..16 {
                let req = if i % 2 == 0 {
                    history_req(&mut c)
                } else {
                    online_req(&mut c)
                };
                if c.send(&req).await.is_err() {
                    break;
                }
            }
            for _ in 0..16 {
                let res = match c.recv_timeout(WAIT).await.unwrap() {
                    Event::Msg(ServerMsg::HistoryRep(r)) => (r.res, r.retry_after_ms),
                    Event::Msg(ServerMsg::OnlineRep(r)) => (r.res, r.retry_after_ms),
                    Event::Msg(ServerMsg::Kick(k)) => {
                        kick = Some(k.reason);
                        continue;
                    }
                    Event::Msg(other) => panic!("unexpected {other:?}"),
                    Event::Closed(code) => {
                        seen.closes.push((code, kick.take()));
                        break 'conn;
                    }
                };
                match res {
                    (0, _) => seen.ok += 1,
                    (code, wait) => {
                        assert_eq!(code, ResCode::ResRateLimited as i32);
                        assert!(wait > 0 && wait <= 500, "wait {wait}");
                        seen.limited += 1;
                    }
                }
            }
        }
    }
    seen
}

/// Waits (in real time, at most `WAIT`) until `done` holds.
async fn until(done: impl Fn() -> bool) {
    tokio::time::timeout(WAIT, async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("timed out");
}

const HONEST: u64 = 100;

fn record(n: pb::ChatMessageNotifyChat, got: &mut HashMap<u64, usize>) {
    assert_eq!(n.strcontext, format!("line from {}", n.senderid));
    *got.entry(n.senderid).or_default() += 1;
}
const LINES: usize = 10;

/// Sends `LINES` guild lines, each acknowledged, and reads until it has
/// every line of every honest player. Returns how many it got per sender.
async fn chatter(mut c: Client, me: u64) -> HashMap<u64, usize> {
    let mut got: HashMap<u64, usize> = HashMap::new();
    let mut total = 0;
    for _ in 0..LINES {
        c.send_chat(ChatType::ChatGuild, &format!("line from {me}"), 0, "")
            .await
            .unwrap();
        loop {
            match next(&mut c).await {
                ServerMsg::ChatRep(r) => {
                    assert_eq!(r.res, ResCode::ResOk as i32, "player {me}");
                    break;
                }
                ServerMsg::Chat(n) => {
                    record(n, &mut got);
                    total += 1;
                }
                other => panic!("player {me}: unexpected {other:?}"),
            }
        }
    }
    while total < HONEST as usize * LINES {
        match next(&mut c).await {
            ServerMsg::Chat(n) => {
                record(n, &mut got);
                total += 1;
            }
            other => panic!("player {me}: unexpected {other:?}"),
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flooding_client_is_limited_and_closed_while_honest_chat_loses_nothing() {
    let server = Arc::new(TestServer::start_with(no_cooldowns).await);
    let mut honest = Vec::new();
    for id in 1..=HONEST {
        honest.push(server.login(id, &format!("p{id}"), 7, 0, 0).await);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let flooder = tokio::spawn(flood(server.clone(), stop.clone()));
    // Let the flood get going before the chat starts.
    until(|| Stats::get(&server.stats.rate_limited) > 0).await;
    let tasks: Vec<_> = honest
        .into_iter()
        .zip(1..)
        .map(|(c, id)| tokio::spawn(chatter(c, id)))
        .collect();
    for (task, id) in tasks.into_iter().zip(1..=HONEST) {
        let got = task.await.unwrap();
        assert_eq!(got.len(), HONEST as usize, "player {id} heard everyone");
        assert!(
            got.values().all(|&n| n == LINES),
            "player {id} got every line once: {got:?}"
        );
    }
    // Keep flooding until the server has closed the flooder at least once.
    until(|| Stats::get(&server.stats.rate_kicks) > 0).await;
    stop.store(true, Ordering::Relaxed);
    let seen = flooder.await.unwrap();
    assert!(seen.ok > 0, "{seen:?}");
    assert!(seen.limited > seen.ok, "{seen:?}");
    assert!(!seen.closes.is_empty(), "{seen:?}");
    for close in &seen.closes {
        assert_eq!(
            *close,
            (
                Some(close_code::RATE_LIMITED),
                Some(KickReason::KickRateLimited as i32)
            )
        );
    }
    assert!(Stats::get(&server.stats.rate_limited) >= seen.limited);
    assert!(Stats::get(&server.stats.rate_kicks) >= seen.closes.len() as u64);
    assert_eq!(Stats::get(&server.stats.slow_consumers), 0);
    Arc::into_inner(server)
        .expect("the flooder holds no server")
        .stop()
        .await;
}

#[tokio::test(start_paused = true)]
async fn heartbeats_past_their_limit_are_refused_with_the_wait() {
    let server = TestServer::start_timed(|c| {
        c.rates.heartbeat_per_sec = 1;
        c.rates.heartbeat_burst = 20;
    })
    .await;
    let mut a = server.login(1, "alice", 0, 0, 0).await;
    // All in flight at once, so the paused clock has no time to move.
    for i in 0..25 {
        let seq = a.next_seq();
        a.send(&ClientMsg::Heartbeat(pb::ChatMessageHeartbeatReq {
            msghead: codec::head(MsgType::CchHeartbeatReq, seq),
            client_time_ms: 1_000 + i,
        }))
        .await
        .unwrap();
    }
    let (mut ok, mut refused) = (0, 0);
    for i in 0..25 {
        let ServerMsg::HeartbeatRep(rep) = next(&mut a).await else {
            panic!("expected a heartbeat reply");
        };
        assert_eq!(rep.client_time_ms, 1_000 + i, "echoed even when refused");
        if rep.res == ResCode::ResOk as i32 {
            assert!(rep.server_time_ms > 0 && rep.retry_after_ms == 0);
            ok += 1;
        } else {
            assert_eq!(rep.res, ResCode::ResRateLimited as i32);
            assert!((1..=1_000).contains(&rep.retry_after_ms), "{rep:?}");
            assert_eq!(rep.server_time_ms, 0);
            refused += 1;
        }
    }
    // The burst, and at most one more had the clock moved a second.
    assert!((20..=21).contains(&ok), "{ok} accepted");
    assert_eq!(ok + refused, 25);
    assert_eq!(Stats::get(&server.stats.rate_limited), refused);
    server.stop().await;
}

/// Sends one undecodable frame and reads its error notice.
async fn garbage(c: &mut Client) {
    c.send_bytes(bytes::Bytes::from_static(b"garbage"))
        .await
        .unwrap();
    let ServerMsg::Error(e) = next(c).await else {
        panic!("expected an error notice");
    };
    assert_eq!(e.res, ResCode::ResBadRequest as i32);
}

#[tokio::test(start_paused = true)]
async fn the_bad_frame_budget_forgives_one_frame_every_ten_seconds() {
    let server = TestServer::start_timed(|c| c.limits.bad_frame_limit = 3).await;
    let mut c = server.login(1, "alice", 0, 0, 0).await;
    garbage(&mut c).await;
    garbage(&mut c).await;
    tokio::time::advance(Duration::from_secs(10)).await;
    // One forgiven: this is the second, not the third.
    garbage(&mut c).await;
    c.heartbeat().await.unwrap();
    tokio::time::advance(Duration::from_secs(20)).await;
    // Both forgiven.
    garbage(&mut c).await;
    garbage(&mut c).await;
    c.heartbeat().await.unwrap();
    // A burst still closes the connection.
    c.send_bytes(bytes::Bytes::from_static(b"garbage"))
        .await
        .unwrap();
    let (code, kick) = expect_close(&mut c).await;
    assert_eq!(code, Some(close_code::PROTOCOL_ERROR));
    assert_eq!(kick, Some(KickReason::KickProtocolError as i32));
    server.stop().await;
}
