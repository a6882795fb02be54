//! Bad input and hostile clients: every case gets a clear code or close,
//! never a panic, and the server keeps serving others.

use std::time::Duration;

use bytes::Bytes;
use guildchat_protocol::limits::MAX_FRAME_BYTES;
use guildchat_protocol::{
    close_code, codec, pb, ChatType, KickReason, MsgType, ResCode, ServerMsg,
};
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

async fn expect_error(c: &mut guildchat_client::Client) -> pb::ChatMessageNotifyError {
    match next(c).await {
        ServerMsg::Error(e) => e,
        other => panic!("expected an error notice, got {other:?}"),
    }
}

#[tokio::test]
async fn bad_frames_get_error_notices_before_and_after_login() {
    let server = TestServer::start().await;
    let mut pre = server.connect().await;
    let mut post = server.login(1, "alice", 0, 0, 0).await;
    for c in [&mut pre, &mut post] {
        // Undecodable.
        c.send_bytes(Bytes::from_static(&[0xff, 0x00, 0x13]))
            .await
            .unwrap();
        let e = expect_error(c).await;
        assert_eq!(e.res, ResCode::ResBadRequest as i32);
        // A valid head with an unknown msgid; its seq is echoed.
        let unknown = codec::encode(&pb::ChatMessageOnlineReq {
            msghead: Some(pb::ChatMessageHead {
                msgid: 999,
                seq: 42,
            }),
        });
        c.send_bytes(unknown).await.unwrap();
        let e = expect_error(c).await;
        assert_eq!((e.res, e.badmsgid), (ResCode::ResUnknownMsg as i32, 999));
        assert_eq!(e.msghead.unwrap().seq, 42);
        // A text frame where binary is expected.
        c.send_raw(Message::Text("hello".into())).await.unwrap();
        assert_eq!(expect_error(c).await.res, ResCode::ResBadRequest as i32);
        // Invalid UTF-8 in the chat text.
        let mut frame = codec::encode(&pb::ChatMessageChatReq {
            msghead: codec::head(MsgType::CchChatReq, 7),
            chattype: ChatType::ChatWorld as i32,
            context: "abc".into(),
            ..Default::default()
        })
        .to_vec();
        let n = frame.len();
        frame[n - 1] = 0xff;
        c.send_bytes(frame.into()).await.unwrap();
        let e = expect_error(c).await;
        assert_eq!(
            (e.res, e.badmsgid),
            (ResCode::ResBadUtf8 as i32, MsgType::CchChatReq as u32)
        );
    }
    // Both connections are still usable.
    assert_eq!(
        say(&mut post, ChatType::ChatWorld, "still fine").await.res,
        ResCode::ResOk as i32
    );
    pre.send_chat(ChatType::ChatWorld, "before login", 0, "")
        .await
        .unwrap();
    let ServerMsg::ChatRep(rep) = next(&mut pre).await else {
        panic!("no chat reply")
    };
    assert_eq!(rep.res, ResCode::ResNotLoggedIn as i32);
    server.stop().await;
}

#[tokio::test]
async fn second_login_on_one_connection_is_refused() {
    let server = TestServer::start().await;
    let mut c = server.login(1, "alice", 0, 0, 0).await;
    c.send_login(&server.token(1, "alice", 0, 0, 0), 0, "")
        .await
        .unwrap();
    let ServerMsg::LoginRep(rep) = next(&mut c).await else {
        panic!("no login reply")
    };
    assert_eq!(rep.res, ResCode::ResAlreadyLoggedIn as i32);
    assert_eq!(
        say(&mut c, ChatType::ChatWorld, "ok").await.res,
        ResCode::ResOk as i32
    );
    server.stop().await;
}

#[tokio::test]
async fn oversized_frame_closes_with_1009() {
    let server = TestServer::start().await;
    let mut bystander = server.login(2, "bob", 0, 0, 0).await;
    for logged_in in [false, true] {
        let mut c = if logged_in {
            server.login(1, "alice", 0, 0, 0).await
        } else {
            server.connect().await
        };
        c.send_bytes(Bytes::from(vec![0u8; MAX_FRAME_BYTES + 1]))
            .await
            .unwrap();
        assert_eq!(expect_close(&mut c).await.0, Some(close_code::TOO_BIG));
    }
    assert_eq!(
        say(&mut bystander, ChatType::ChatWorld, "alive").await.res,
        ResCode::ResOk as i32
    );
    server.stop().await;
}

#[tokio::test]
async fn repeated_garbage_closes_with_protocol_error() {
    let server = TestServer::start_with(|c| c.limits.bad_frame_limit = 5).await;
    let mut c = server.login(1, "alice", 0, 0, 0).await;
    for _ in 0..5 {
        c.send_bytes(Bytes::from_static(b"garbage")).await.unwrap();
    }
    let (code, kick) = expect_close(&mut c).await;
    assert_eq!(code, Some(close_code::PROTOCOL_ERROR));
    assert_eq!(kick, Some(KickReason::KickProtocolError as i32));
    server.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_connection_that_never_logs_in_is_closed() {
    let server = TestServer::start_timed(|_| {}).await;
    let mut c = server.connect().await;
    let started = tokio::time::Instant::now();
    let (code, kick) = expect_close(&mut c).await;
    assert_eq!(code, Some(close_code::LOGIN_TIMEOUT));
    assert_eq!(kick, Some(KickReason::KickLoginTimeout as i32));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(5) && waited < Duration::from_secs(6),
        "{waited:?}"
    );
    server.stop().await;
}

#[tokio::test(start_paused = true)]
async fn silent_connections_are_closed_but_ponging_ones_live() {
    let server = TestServer::start_timed(|_| {}).await;
    let mut silent = server.login(1, "mute", 0, 0, 0).await;
    let mut alive = server.login(2, "alive", 0, 0, 0).await;
    // `alive` keeps reading, so its client answers the server's pings;
    // `silent` reads nothing for a minute, so it never pongs.
    let listening = tokio::spawn(async move {
        let r = alive.recv_timeout(Duration::from_secs(60)).await;
        (alive, r)
    });
    // Just past the idle limit (45 s): the silent one has been kicked and
    // is read while the server still waits for its close reply.
    tokio::time::sleep(Duration::from_secs(46)).await;
    let (code, kick) = expect_close(&mut silent).await;
    assert_eq!(code, Some(close_code::IDLE));
    assert_eq!(kick, Some(KickReason::KickIdle as i32));
    let (mut alive, r) = listening.await.unwrap();
    assert!(
        matches!(r, Err(guildchat_client::ClientError::Timeout)),
        "{r:?}"
    );
    assert_eq!(
        say(&mut alive, ChatType::ChatWorld, "still here").await.res,
        ResCode::ResOk as i32
    );
    server.stop().await;
}

#[tokio::test]
async fn heartbeat_is_answered_with_the_client_time() {
    let server = TestServer::start().await;
    let mut c = server.login(1, "alice", 0, 0, 0).await;
    let seq = c.next_seq();
    c.send(&guildchat_protocol::ClientMsg::Heartbeat(
        pb::ChatMessageHeartbeatReq {
            msghead: codec::head(MsgType::CchHeartbeatReq, seq),
            client_time_ms: 12345,
        },
    ))
    .await
    .unwrap();
    let ServerMsg::HeartbeatRep(rep) = next(&mut c).await else {
        panic!("no heartbeat reply")
    };
    assert_eq!((rep.client_time_ms, rep.msghead.unwrap().seq), (12345, seq));
    assert!(rep.server_time_ms > 0);
    server.stop().await;
}
