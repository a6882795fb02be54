//! History and offline whispers through the protocol: paging, membership,
//! restarts.

use std::sync::atomic::Ordering;
use std::time::Duration;

use guildchat_client::Client;
use guildchat_protocol::{pb, ChatType, ResCode};

use crate::common::*;

fn quick(c: &mut guildchat_server::Config) {
    for rule in [&mut c.chat.private, &mut c.chat.guild, &mut c.chat.world] {
        rule.cooldown_ms = 0;
    }
}

async fn sent(c: &mut Client, channel: ChatType, text: &str, to: u64) -> pb::ChatMessageChatRep {
    c.send_chat(channel, text, to, "").await.unwrap();
    next_chat_rep(c).await
}

#[tokio::test]
async fn guild_history_pages_without_gaps_or_duplicates() {
    let server = TestServer::start_with(quick).await;
    let mut a = server.login(1, "alice", 10, 0, 0).await;
    let mut b = server.login(2, "bob", 10, 0, 0).await;
    let mut sent_ids = Vec::new();
    for i in 0..25 {
        let rep = sent(&mut a, ChatType::ChatGuild, &format!("line {i}"), 0).await;
        assert_eq!(rep.res, ResCode::ResOk as i32);
        sent_ids.push(rep.msg_id);
    }
    // Newest first, with the fields of the live notification.
    let first = page(&mut b, ChatType::ChatGuild, 0, 0, 0, 10).await;
    assert_eq!(first.msgs.len(), 10);
    assert!(first.has_more);
    let newest = &first.msgs[0];
    assert_eq!(
        (
            newest.msg_id,
            newest.senderid,
            newest.sendername.as_str(),
            newest.strcontext.as_str(),
            newest.guildid
        ),
        (sent_ids[24], 1, "alice", "line 24", 10)
    );
    assert_eq!(all_pages(&mut b, ChatType::ChatGuild, 0, 7).await, sent_ids);
    server.stop().await;
}

#[tokio::test]
async fn only_members_and_parties_read_history() {
    let server = TestServer::start_with(quick).await;
    let mut a = server.login(1, "alice", 10, 3, 0).await;
    let mut b = server.login(2, "bob", 10, 0, 0).await;
    let mut c = server.login(3, "carol", 20, 0, 0).await;
    let mut d = server.login(4, "dave", 0, 0, 0).await;
    sent(&mut a, ChatType::ChatGuild, "guild secret", 0).await;
    let whisper = sent(&mut a, ChatType::ChatPrivate, "for bob", 2).await;

    assert_eq!(
        page(&mut c, ChatType::ChatGuild, 10, 0, 0, 10).await.res,
        ResCode::ResNoPermission as i32
    );
    assert_eq!(
        page(&mut d, ChatType::ChatGuild, 0, 0, 0, 10).await.res,
        ResCode::ResNotInGuild as i32
    );
    assert_eq!(
        page(&mut d, ChatType::ChatTeam, 0, 0, 0, 10).await.res,
        ResCode::ResNotInTeam as i32
    );
    let own = page(&mut c, ChatType::ChatGuild, 0, 0, 0, 10).await;
    assert_eq!(
        (own.res, own.msgs.len()),
        (ResCode::ResOk as i32, 0),
        "guild 20 has no lines"
    );

    let bobs = page(&mut b, ChatType::ChatPrivate, 0, 1, 0, 10).await;
    assert_eq!(
        bobs.msgs.iter().map(|m| m.msg_id).collect::<Vec<_>>(),
        vec![whisper.msg_id]
    );
    // Carol asking for "the conversation with alice" gets her own, empty.
    let carols = page(&mut c, ChatType::ChatPrivate, 0, 1, 0, 10).await;
    assert!(carols.msgs.is_empty());
    assert_eq!(
        page(&mut c, ChatType::ChatPrivate, 0, 0, 0, 10).await.res,
        ResCode::ResBadRequest as i32
    );
    server.stop().await;
}

#[tokio::test]
async fn offline_whispers_arrive_at_next_login_once() {
    let server = TestServer::start_with(|c| {
        quick(c);
        c.session.linger_ms = 0;
    })
    .await;
    // Nine has logged in once, so the store knows the player.
    server.login(9, "nine", 0, 0, 0).await.close().await;
    for _ in 0..200 {
        if server.world.online().await.unwrap().0 == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut a = server.login(1, "alice", 0, 0, 0).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let rep = sent(&mut a, ChatType::ChatPrivate, &format!("while away {i}"), 9).await;
        assert_eq!((rep.res, rep.offline), (ResCode::ResOk as i32, true));
        ids.push(rep.msg_id);
    }
    // By name too: the store knows the name.
    a.send_chat(ChatType::ChatPrivate, "by name", 0, "nine")
        .await
        .unwrap();
    let rep = next_chat_rep(&mut a).await;
    assert_eq!((rep.res, rep.offline), (ResCode::ResOk as i32, true));
    ids.push(rep.msg_id);

    let mut nine = server.login(9, "nine", 0, 0, 0).await;
    let mut got = Vec::new();
    for _ in 0..4 {
        let n = next_chat(&mut nine).await;
        assert_eq!((n.chattype, n.senderid), (ChatType::ChatPrivate as i32, 1));
        got.push(n.msg_id);
    }
    assert_eq!(got, ids, "in order");
    // The first heartbeat's reply comes after the barrier ping, so the
    // client has read the ping (and queued its pong) by then; the second
    // reply proves the server processed that pong.
    assert!(nine.heartbeat().await.unwrap().is_empty());
    assert!(nine.heartbeat().await.unwrap().is_empty());
    assert_eq!(server.stats.offline_acked.load(Ordering::Relaxed), 4);
    nine.close().await;
    for _ in 0..200 {
        if server.world.online().await.unwrap().0 == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut again = server.login(9, "nine", 0, 0, 0).await;
    assert_silent(&mut again).await;
    server.stop().await;
}

#[tokio::test]
async fn history_survives_a_restart_and_ids_keep_increasing() {
    let server = TestServer::start_with(quick).await;
    let mut a = server.login(1, "alice", 10, 0, 0).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            sent(&mut a, ChatType::ChatGuild, &format!("{i}"), 0)
                .await
                .msg_id,
        );
    }
    drop(a);
    let dir = server.stop_keep_dir().await;
    let server = TestServer::start_in(dir, quick).await;
    let mut a = server.login(1, "alice", 10, 0, 0).await;
    assert_eq!(all_pages(&mut a, ChatType::ChatGuild, 0, 2).await, ids);
    let after = sent(&mut a, ChatType::ChatGuild, "after restart", 0)
        .await
        .msg_id;
    assert!(after > *ids.last().unwrap());
    server.stop().await;
}

#[tokio::test]
async fn a_full_store_refuses_with_a_clear_code_and_keeps_serving() {
    // The size cap fails writes with SQLITE_FULL, as a full disk does.
    let server = TestServer::start_with(|c| {
        quick(c);
        c.history.max_db_bytes = 64 * 1024;
    })
    .await;
    let mut a = server.login(1, "alice", 10, 0, 0).await;
    let text = "x".repeat(200);
    let mut acked = Vec::new();
    let mut refused = None;
    for _ in 0..5000 {
        let rep = sent(&mut a, ChatType::ChatGuild, &text, 0).await;
        if rep.res != ResCode::ResOk as i32 {
            refused = Some(rep.res);
            break;
        }
        acked.push(rep.msg_id);
    }
    assert_eq!(refused, Some(ResCode::ResStoreFailed as i32));
    assert!(!acked.is_empty());
    // Still failing cleanly, still serving.
    assert_eq!(
        sent(&mut a, ChatType::ChatGuild, &text, 0).await.res,
        ResCode::ResStoreFailed as i32
    );
    assert!(a.heartbeat().await.is_ok());
    // Nothing acknowledged was lost.
    assert_eq!(all_pages(&mut a, ChatType::ChatGuild, 0, 100).await, acked);
    server.stop().await;
}

#[tokio::test]
async fn pipelined_chat_replies_keep_request_order() {
    let server = TestServer::start_with(|c| {
        quick(c);
        c.chat.guild.max_chars = 5;
    })
    .await;
    let mut a = server.login(1, "alice", 10, 0, 0).await;
    // Many lines without waiting for replies; every fifth one too long, so
    // refusals (immediate) and acknowledgements (after a commit) mix.
    let mut seqs = Vec::new();
    for i in 0..40 {
        let text = if i % 5 == 0 { "far too long" } else { "ok" };
        seqs.push(a.send_chat(ChatType::ChatGuild, text, 0, "").await.unwrap());
    }
    let mut last_id = 0;
    for (i, seq) in seqs.into_iter().enumerate() {
        let rep = next_chat_rep(&mut a).await;
        assert_eq!(rep.msghead.unwrap().seq, seq, "replies in request order");
        if i % 5 == 0 {
            assert_eq!(rep.res, ResCode::ResTextTooLong as i32);
        } else {
            assert_eq!(rep.res, ResCode::ResOk as i32);
            assert!(rep.msg_id > last_id);
            last_id = rep.msg_id;
        }
    }
    server.stop().await;
}
