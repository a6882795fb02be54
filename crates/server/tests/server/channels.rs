//! Delivery on every channel to exactly the right audience, masks,
//! cooldowns, text rules, mutes and whisper targets.

use std::time::Duration;

use guildchat_client::Client;
use guildchat_protocol::{mask_bit, ChatType, ResCode, ServerMsg};

use crate::common::*;

/// Four players:        guild team scene
///   1 alice              10    5     1
///   2 bob                10    6     2
///   3 carol              20    5     1
///   4 dave                0    0     2
async fn four(server: &TestServer) -> [Client; 4] {
    [
        server.login(1, "alice", 10, 5, 1).await,
        server.login(2, "bob", 10, 6, 2).await,
        server.login(3, "carol", 20, 5, 1).await,
        server.login(4, "dave", 0, 0, 2).await,
    ]
}

/// Sends from `from`, then checks exactly `hearers` (by index) get it,
/// echo included, and the others get nothing.
async fn check_audience(
    clients: &mut [Client; 4],
    from: usize,
    channel: ChatType,
    text: &str,
    target: (u64, &str),
    hearers: &[usize],
) {
    clients[from]
        .send_chat(channel, text, target.0, target.1)
        .await
        .unwrap();
    for (i, c) in clients.iter_mut().enumerate() {
        if hearers.contains(&i) {
            let n = next_chat(c).await;
            assert_eq!(
                (n.chattype, n.senderid, n.strcontext.as_str()),
                (channel as i32, from as u64 + 1, text),
                "player {} on {channel:?}",
                i + 1
            );
            assert!(n.msg_id > 0 && n.time_ms > 0);
        }
    }
    let rep = next_chat_rep(&mut clients[from]).await;
    assert_eq!(rep.res, ResCode::ResOk as i32, "{channel:?}");
    for (i, c) in clients.iter_mut().enumerate() {
        if !hearers.contains(&i) {
            assert_silent(c).await;
        }
    }
}

#[tokio::test]
async fn every_channel_reaches_exactly_its_audience() {
    let server = TestServer::start().await;
    let mut c = four(&server).await;
    check_audience(&mut c, 0, ChatType::ChatGuild, "guild 10", (0, ""), &[0, 1]).await;
    check_audience(&mut c, 0, ChatType::ChatTeam, "team 5", (0, ""), &[0, 2]).await;
    check_audience(&mut c, 1, ChatType::ChatNormal, "scene 2", (0, ""), &[1, 3]).await;
    check_audience(
        &mut c,
        2,
        ChatType::ChatWorld,
        "world",
        (0, ""),
        &[0, 1, 2, 3],
    )
    .await;
    check_audience(
        &mut c,
        3,
        ChatType::ChatPrivate,
        "psst id",
        (1, ""),
        &[0, 3],
    )
    .await;
    check_audience(
        &mut c,
        0,
        ChatType::ChatPrivate,
        "psst name",
        (0, "carol"),
        &[0, 2],
    )
    .await;
    server.stop().await;
}

#[tokio::test]
async fn notifications_carry_sender_target_and_group() {
    let server = TestServer::start().await;
    let mut c = four(&server).await;
    c[0].send_chat(ChatType::ChatPrivate, "hi bob", 0, "bob")
        .await
        .unwrap();
    let n = next_chat(&mut c[1]).await;
    assert_eq!(
        (n.sendername.as_str(), n.targetid, n.targetname.as_str()),
        ("alice", 2, "bob")
    );
    let echo = next_chat(&mut c[0]).await;
    assert_eq!(echo.msg_id, n.msg_id, "one encoding, one msg_id");
    c[0].send_chat(ChatType::ChatGuild, "g", 0, "")
        .await
        .unwrap();
    let g = next_chat(&mut c[1]).await;
    assert_eq!(g.guildid, 10);
    assert!(g.msg_id > n.msg_id, "msg_ids increase");
    server.stop().await;
}

#[tokio::test]
async fn masked_channels_are_not_delivered_but_whispers_and_system_are() {
    let server = TestServer::start().await;
    let mut c = four(&server).await;
    let all = u32::MAX;
    c[3].send_mask(all).await.unwrap();
    let ServerMsg::SetMaskRep(rep) = next(&mut c[3]).await else {
        panic!("no mask reply")
    };
    assert_eq!(
        rep.mask,
        all & !(mask_bit(ChatType::ChatPrivate) | mask_bit(ChatType::ChatAll))
    );
    check_audience(&mut c, 2, ChatType::ChatWorld, "world", (0, ""), &[0, 1, 2]).await;
    check_audience(&mut c, 1, ChatType::ChatNormal, "scene 2", (0, ""), &[1]).await;
    check_audience(&mut c, 0, ChatType::ChatPrivate, "psst", (4, ""), &[0, 3]).await;
    server
        .world
        .announce(
            "maintenance soon".into(),
            guildchat_server::world::AnnounceTo::Everyone,
        )
        .await
        .unwrap();
    for client in c.iter_mut() {
        let n = next_chat(client).await;
        assert_eq!(
            (n.chattype, n.strcontext.as_str()),
            (ChatType::ChatAll as i32, "maintenance soon")
        );
    }
    // Clearing the mask restores delivery.
    c[3].send_mask(0).await.unwrap();
    let _ = next(&mut c[3]).await;
    check_audience(
        &mut c,
        1,
        ChatType::ChatNormal,
        "scene 2 again",
        (0, ""),
        &[1, 3],
    )
    .await;
    server.stop().await;
}

#[tokio::test(start_paused = true)]
async fn cooldown_reports_remaining_time_and_expires() {
    let server = TestServer::start_timed(|_| {}).await;
    let mut a = server.login(1, "alice", 10, 0, 0).await;
    let ok = say(&mut a, ChatType::ChatWorld, "first").await;
    assert_eq!((ok.res, ok.cooldown_ms), (ResCode::ResOk as i32, 10_000));
    tokio::time::advance(Duration::from_secs(4)).await;
    let rep = say(&mut a, ChatType::ChatWorld, "too soon").await;
    assert_eq!(rep.res, ResCode::ResOnCooldown as i32);
    assert!(
        (5_900..=6_000).contains(&rep.cooldown_ms),
        "remaining {}",
        rep.cooldown_ms
    );
    // Cooldowns are per channel: guild (1 s) is free.
    assert_eq!(
        say(&mut a, ChatType::ChatGuild, "guild").await.res,
        ResCode::ResOk as i32
    );
    tokio::time::advance(Duration::from_millis(6_001)).await;
    assert_eq!(
        say(&mut a, ChatType::ChatWorld, "again").await.res,
        ResCode::ResOk as i32
    );
    server.stop().await;
}

#[tokio::test]
async fn refusals_have_their_own_codes() {
    let server = TestServer::start_with(|c| {
        c.chat.scene.max_chars = 10;
        // Without a history store, a whisper to a player who is not online
        // is refused instead of stored.
        c.history.enabled = false;
    })
    .await;
    let mut c = four(&server).await;
    let dave = &mut c[3];
    assert_eq!(
        say(dave, ChatType::ChatGuild, "x").await.res,
        ResCode::ResNotInGuild as i32
    );
    assert_eq!(
        say(dave, ChatType::ChatTeam, "x").await.res,
        ResCode::ResNotInTeam as i32
    );
    assert_eq!(
        say(dave, ChatType::ChatAll, "x").await.res,
        ResCode::ResNoPermission as i32
    );
    assert_eq!(
        say(dave, ChatType::ChatNone, "x").await.res,
        ResCode::ResBadRequest as i32
    );
    assert_eq!(
        say(dave, ChatType::ChatNormal, "   ").await.res,
        ResCode::ResTextEmpty as i32
    );
    // 10 characters pass (multi-byte ones count once), 11 do not.
    assert_eq!(
        say(dave, ChatType::ChatNormal, "ééééééééé!").await.res,
        ResCode::ResOk as i32
    );
    assert_eq!(
        say(dave, ChatType::ChatWorld, "x").await.res,
        ResCode::ResOk as i32
    );
    let long = say(dave, ChatType::ChatNormal, "12345678901").await;
    assert_eq!(long.res, ResCode::ResTextTooLong as i32);

    let whisper = |id: u64, name: &'static str| (id, name);
    for ((id, name), want) in [
        (whisper(999, ""), ResCode::ResTargetOffline),
        (whisper(0, "nobody"), ResCode::ResNoSuchTarget),
        (whisper(0, ""), ResCode::ResNoSuchTarget),
    ] {
        c[0].send_chat(ChatType::ChatPrivate, "hi", id, name)
            .await
            .unwrap();
        let rep = next_chat_rep(&mut c[0]).await;
        assert_eq!(rep.res, want as i32, "{id} {name}");
    }
    server.stop().await;
}

#[tokio::test]
async fn regroup_moves_players_between_guilds_and_scenes() {
    use guildchat_server::ids::{GuildId, SceneId, UserId};
    let server = TestServer::start().await;
    let mut c = four(&server).await;
    // dave joins guild 10 and moves to scene 1.
    assert!(server
        .world
        .regroup(UserId(4), Some(GuildId(10)), None, Some(SceneId(1)))
        .await
        .unwrap()
        .is_some());
    check_audience(
        &mut c,
        0,
        ChatType::ChatGuild,
        "welcome",
        (0, ""),
        &[0, 1, 3],
    )
    .await;
    check_audience(
        &mut c,
        0,
        ChatType::ChatNormal,
        "scene 1",
        (0, ""),
        &[0, 2, 3],
    )
    .await;
    check_audience(&mut c, 1, ChatType::ChatNormal, "scene 2", (0, ""), &[1]).await;
    server.stop().await;
}

#[tokio::test]
async fn online_query_counts_players() {
    let server = TestServer::start_with(|c| c.max_online = 50).await;
    let mut c = four(&server).await;
    let seq = c[0].next_seq();
    c[0].send(&guildchat_protocol::ClientMsg::Online(
        guildchat_protocol::pb::ChatMessageOnlineReq {
            msghead: guildchat_protocol::codec::head(
                guildchat_protocol::MsgType::CchOnlineReq,
                seq,
            ),
        },
    ))
    .await
    .unwrap();
    let ServerMsg::OnlineRep(rep) = next(&mut c[0]).await else {
        panic!("no online reply")
    };
    assert_eq!(
        (rep.online, rep.max_online, rep.msghead.unwrap().seq),
        (4, 50, seq)
    );
    server.stop().await;
}
