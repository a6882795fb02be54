//! Cluster mode: a real nats-server with JetStream and three guildchat
//! nodes in this process, each on its own ports, with players on each,
//! speaking the real protocol over real sockets.

use guildchat_protocol::{ChatType, KickReason, ResCode, ServerMsg};
use guildchat_server::ids::UserId;

use crate::common::*;

struct Cluster {
    nats: Nats,
    nodes: Vec<TestServer>,
}

/// nats-server and nodes n1, n2, n3; n2 and n3 verify tokens with n1's
/// development keys.
async fn cluster() -> Cluster {
    let nats = Nats::start().await;
    let n1 = TestServer::node(&nats, "n1", None).await;
    let n2 = TestServer::node(&nats, "n2", Some(&n1)).await;
    let n3 = TestServer::node(&nats, "n3", Some(&n1)).await;
    Cluster {
        nats,
        nodes: vec![n1, n2, n3],
    }
}

impl Cluster {
    /// Waits until every node sees each player where it logged in.
    async fn settled(&self, players: &[(u64, usize)]) {
        for node in &self.nodes {
            for &(user, at) in players {
                node.until_located(user, &format!("n{}", at + 1)).await;
            }
        }
    }

    async fn stop(self) {
        for node in self.nodes {
            node.stop().await;
        }
        drop(self.nats);
    }
}

/// Sends a line and reads until both its reply and its echo have come (in
/// either order: the echo comes back through the stream), skipping other
/// lines; returns the reply.
async fn say_seen(
    c: &mut guildchat_client::Client,
    channel: ChatType,
    text: &str,
    target: u64,
) -> guildchat_protocol::pb::ChatMessageChatRep {
    c.send_chat(channel, text, target, "").await.unwrap();
    let mut echoes = Vec::new();
    let rep = loop {
        match next(c).await {
            ServerMsg::ChatRep(rep) => break rep,
            ServerMsg::Chat(n) => echoes.push(n.msg_id),
            _ => {}
        }
    };
    assert_eq!(rep.res, ResCode::ResOk as i32, "{channel:?} {text}");
    while !echoes.contains(&rep.msg_id) {
        echoes.push(next_chat(c).await.msg_id);
    }
    let echoed = echoes.iter().filter(|id| **id == rep.msg_id).count();
    assert_eq!(echoed, 1, "one echo");
    rep
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_channel_reaches_exactly_its_audience_on_every_node() {
    let cl = cluster().await;
    let [n1, n2, n3] = [&cl.nodes[0], &cl.nodes[1], &cl.nodes[2]];
    // (user, node, guild, team, scene)
    let layout = [
        (1, 0, 10, 20, 30),
        (2, 0, 11, 21, 31),
        (3, 1, 10, 21, 30),
        (4, 1, 11, 20, 31),
        (5, 2, 10, 20, 31),
        (6, 2, 0, 0, 30),
    ];
    let mut clients = Vec::new();
    for &(user, node, guild, team, scene) in &layout {
        let server = [n1, n2, n3][node];
        clients.push(
            server
                .login(user, &format!("p{user}"), guild, team, scene)
                .await,
        );
    }
    let players: Vec<(u64, usize)> = layout.iter().map(|p| (p.0, p.1)).collect();
    cl.settled(&players).await;
    // Player 1 (on n1: guild 10, team 20, scene 30) speaks on each channel.
    let expect: [(ChatType, &[u64]); 4] = [
        (ChatType::ChatWorld, &[1, 2, 3, 4, 5, 6]),
        (ChatType::ChatGuild, &[1, 3, 5]),
        (ChatType::ChatTeam, &[1, 4, 5]),
        (ChatType::ChatNormal, &[1, 3, 6]),
    ];
    for (channel, audience) in expect {
        let text = format!("{channel:?} from p1");
        let rep = say_seen(&mut clients[0], channel, &text, 0).await;
        assert!(rep.msg_id > 0);
        for (i, &(user, ..)) in layout.iter().enumerate() {
            if user != 1 && audience.contains(&user) {
                let n = next_chat(&mut clients[i]).await;
                assert_eq!(n.strcontext, text, "player {user} on {channel:?}");
                // One id everywhere, the one the sender was told.
                assert_eq!(n.msg_id, rep.msg_id, "player {user} on {channel:?}");
            }
        }
        for (i, &(user, ..)) in layout.iter().enumerate() {
            if !audience.contains(&user) {
                assert_silent(&mut clients[i]).await;
            }
        }
    }
    // An announcement to everyone from n3's admin API reaches all six.
    let http = n3
        .logic("POST", "/v1/announce", Some(r#"{"text":"maintenance"}"#))
        .await;
    assert_eq!(http.status, 200, "{}", http.text);
    for c in &mut clients {
        let n = next_chat(c).await;
        assert_eq!(n.strcontext, "maintenance");
        assert_eq!(n.chattype, ChatType::ChatAll as i32);
    }
    drop(clients);
    cl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn msg_ids_increase_for_every_recipient_across_nodes() {
    let cl = cluster().await;
    let mut a = cl.nodes[0].login(1, "a", 0, 0, 0).await;
    let mut b = cl.nodes[1].login(2, "b", 0, 0, 0).await;
    // A login reply's cursor is in the same id space as the lines: below
    // every line that follows it, so a resume from it misses none.
    let mut c = cl.nodes[2].connect().await;
    let rep = c.login(&cl.nodes[2].token(3, "c", 0, 0, 0)).await.unwrap();
    assert_eq!(rep.res, ResCode::ResOk as i32);
    let first = say_seen(&mut a, ChatType::ChatWorld, "first", 0).await;
    assert!(
        rep.last_msg_id < first.msg_id,
        "{} vs {}",
        rep.last_msg_id,
        first.msg_id
    );
    assert_eq!(next_chat(&mut c).await.msg_id, first.msg_id);
    assert_eq!(next_chat(&mut b).await.msg_id, first.msg_id);
    // a and b talk at once on world chat; c, on a third node, hears both.
    let lines = 40;
    let (ra, rb) = tokio::join!(
        async {
            for i in 0..lines {
                a.send_chat(ChatType::ChatWorld, &format!("a{i}"), 0, "")
                    .await
                    .unwrap();
            }
        },
        async {
            for i in 0..lines {
                b.send_chat(ChatType::ChatWorld, &format!("b{i}"), 0, "")
                    .await
                    .unwrap();
            }
        }
    );
    let ((), ()) = (ra, rb);
    let mut last = 0;
    for _ in 0..2 * lines {
        let n = next_chat(&mut c).await;
        assert!(n.msg_id > last, "{} after {last}", n.msg_id);
        last = n.msg_id;
    }
    assert_silent(&mut c).await;
    drop((a, b, c));
    // A node that stops lets go of its players' directory keys.
    let Cluster { nats, nodes } = cl;
    for node in nodes {
        node.stop().await;
    }
    let js = async_nats::jetstream::new(async_nats::connect(nats.url.as_str()).await.unwrap());
    let sessions = js.get_key_value("gc_sessions").await.unwrap();
    for user in 1..=3 {
        let key = sessions.get(format!("u.{user}")).await.unwrap();
        assert!(key.is_none(), "player {user}'s key outlived its node");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whisper_reaches_its_target_on_another_node() {
    let cl = cluster().await;
    let mut a = cl.nodes[0].login(1, "alice", 0, 0, 0).await;
    let mut b = cl.nodes[1].login(2, "bob", 0, 0, 0).await;
    let mut c = cl.nodes[2].login(3, "carol", 0, 0, 0).await;
    cl.settled(&[(1, 0), (2, 1), (3, 2)]).await;
    let rep = say_seen(&mut a, ChatType::ChatPrivate, "psst", 2).await;
    assert!(!rep.offline);
    let got = next_chat(&mut b).await;
    assert_eq!(
        (
            got.strcontext.as_str(),
            got.senderid,
            got.targetid,
            got.msg_id
        ),
        ("psst", 1, 2, rep.msg_id)
    );
    assert_eq!(got.targetname, "bob");
    // And back.
    let rep = say_seen(&mut b, ChatType::ChatPrivate, "hi", 1).await;
    let got = next_chat(&mut a).await;
    assert_eq!((got.strcontext.as_str(), got.msg_id), ("hi", rep.msg_id));
    assert_silent(&mut c).await;
    drop((a, b, c));
    cl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_on_another_node_takes_the_session_over() {
    let cl = cluster().await;
    let mut first = cl.nodes[0].login(7, "seven", 0, 0, 0).await;
    let mut other = cl.nodes[2].login(8, "eight", 0, 0, 0).await;
    cl.settled(&[(7, 0), (8, 2)]).await;
    let mut second = cl.nodes[1].login(7, "seven", 0, 0, 0).await;
    let (_, kick) = expect_close(&mut first).await;
    assert_eq!(kick, Some(KickReason::KickLoggedInElsewhere as i32));
    cl.nodes[0].until_located(7, "n2").await;
    assert!(cl.nodes[0].world.player(UserId(7)).await.unwrap().is_none());
    // The new session is live, and the only one: a world line reaches it
    // once.
    cl.nodes[2].until_located(7, "n2").await;
    let rep = say_seen(&mut other, ChatType::ChatWorld, "still there?", 0).await;
    assert_eq!(next_chat(&mut second).await.msg_id, rep.msg_id);
    assert_silent(&mut second).await;
    // A whisper from n3 finds it on n2.
    say_seen(&mut other, ChatType::ChatPrivate, "found you", 7).await;
    assert_eq!(next_chat(&mut second).await.strcontext, "found you");
    drop((second, other));
    cl.stop().await;
}

/// Two logins of one player at once on two nodes, 50 times: each time
/// exactly one session survives, on the node the directory names, and the
/// other connection is told it was logged in elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_simultaneous_logins_on_two_nodes_leave_one_session() {
    let cl = cluster().await;
    let (n1, n2) = (&cl.nodes[0], &cl.nodes[1]);
    let js = async_nats::jetstream::new(async_nats::connect(cl.nats.url.as_str()).await.unwrap());
    let sessions = js.get_key_value("gc_sessions").await.unwrap();
    for round in 0..50u64 {
        let user = 1000 + round;
        let (mut a, mut b) = (n1.connect().await, n2.connect().await);
        let (ta, tb) = (
            n1.token(user, "racer", 0, 0, 0),
            n2.token(user, "racer", 0, 0, 0),
        );
        let (ra, rb) = tokio::join!(a.login(&ta), b.login(&tb));
        // Each login is answered (one of them may be replaced at once).
        for rep in [ra, rb] {
            assert_eq!(rep.unwrap().res, ResCode::ResOk as i32, "round {round}");
        }
        let holder = sessions
            .get(format!("u.{user}"))
            .await
            .unwrap()
            .expect("the directory names a node");
        let holder = String::from_utf8(holder.to_vec()).unwrap();
        let winner_is_n1 = holder.starts_with("n1\n");
        let (loser, winner_node, loser_node, mut winner) = if winner_is_n1 {
            (&mut b, n1, n2, a)
        } else {
            (&mut a, n2, n1, b)
        };
        let (_, kick) = expect_close(loser).await;
        assert_eq!(
            kick,
            Some(KickReason::KickLoggedInElsewhere as i32),
            "round {round}"
        );
        assert!(
            loser_node
                .world
                .player(UserId(user))
                .await
                .unwrap()
                .is_none(),
            "round {round}: the losing node still has a session"
        );
        assert!(
            winner_node
                .world
                .player(UserId(user))
                .await
                .unwrap()
                .is_some(),
            "round {round}: the winning node has no session"
        );
        // The survivor is live: its own world line comes back to it.
        say_seen(&mut winner, ChatType::ChatWorld, "me", 0).await;
    }
    cl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_sent_on_one_node_is_in_the_history_of_every_node() {
    let cl = cluster().await;
    let mut a = cl.nodes[0].login(1, "a", 5, 0, 0).await;
    let mut c = cl.nodes[2].login(3, "c", 5, 0, 0).await;
    let rep = say_seen(&mut a, ChatType::ChatGuild, "for the record", 0).await;
    // c heard it live, so n3's world has queued it to n3's store; the
    // commit follows within a group commit.
    assert_eq!(next_chat(&mut c).await.msg_id, rep.msg_id);
    for _ in 0..500 {
        let page = page(&mut c, ChatType::ChatGuild, 0, 0, 0, 10).await;
        assert_eq!(page.res, ResCode::ResOk as i32);
        if let Some(m) = page.msgs.first() {
            assert_eq!(
                (m.msg_id, m.strcontext.as_str()),
                (rep.msg_id, "for the record")
            );
            drop((a, c));
            cl.stop().await;
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("the line never reached n3's history");
}

/// The next chat reply, waiting longer than usual: while NATS is away a
/// reply waits for JetStream's ack to time out.
async fn slow_reply(
    c: &mut guildchat_client::Client,
) -> guildchat_protocol::pb::ChatMessageChatRep {
    loop {
        match c
            .recv_timeout(std::time::Duration::from_secs(30))
            .await
            .unwrap()
        {
            guildchat_client::Event::Msg(ServerMsg::ChatRep(rep)) => return rep,
            guildchat_client::Event::Msg(_) => {}
            other => panic!("expected a reply, got {other:?}"),
        }
    }
}

/// Polls `node`'s `/readyz` until its status and cluster state are these
/// (bounded).
async fn until_ready_is(node: &TestServer, status: u16, state: &str) {
    for _ in 0..1000 {
        let ready = http("GET", &format!("{}/readyz", node.admin), None, None).await;
        if ready.status == status && ready.json()["cluster"]["state"] == state {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("/readyz of {} never said {status} {state}", node.admin);
}

/// The ids of the lines `c` receives until the one with `id`, each checked
/// to be above the one before, starting above `after`.
async fn lines_until(c: &mut guildchat_client::Client, after: u64, id: u64) -> Vec<String> {
    let mut last = after;
    let mut texts = Vec::new();
    loop {
        let n = match c
            .recv_timeout(std::time::Duration::from_secs(60))
            .await
            .unwrap()
        {
            guildchat_client::Event::Msg(ServerMsg::Chat(n)) => n,
            guildchat_client::Event::Msg(_) => continue,
            other => panic!("expected a line, got {other:?}"),
        };
        assert!(n.msg_id > last, "ids increase: {} after {last}", n.msg_id);
        last = n.msg_id;
        texts.push(n.strcontext);
        if n.msg_id == id {
            return texts;
        }
    }
}

/// nats-server killed mid-traffic and started again on the same store.
/// While it is away a node's players go on hearing each other: a line is
/// acknowledged once it is in the node's own history and reaches only that
/// node's players, and a whisper to another node's player is refused. Once
/// NATS is back lines cross nodes again, every acknowledged line has
/// reached its audience, and every player's ids still increase.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_chat_goes_on_while_nats_is_away_and_lines_cross_again_after() {
    let mut cl = cluster().await;
    let mut a = cl.nodes[0].login(1, "a", 0, 0, 0).await;
    let mut c = cl.nodes[0].login(3, "c", 0, 0, 0).await;
    let mut b = cl.nodes[1].login(2, "b", 0, 0, 0).await;
    cl.settled(&[(1, 0), (2, 1), (3, 0)]).await;
    let before = say_seen(&mut a, ChatType::ChatWorld, "before", 0).await;
    assert_eq!(next_chat(&mut b).await.msg_id, before.msg_id);
    assert_eq!(next_chat(&mut c).await.msg_id, before.msg_id);
    cl.nats.kill();
    // The node says why it is not ready.
    until_ready_is(&cl.nodes[0], 503, "degraded").await;
    // Its own players still hear each other, in order.
    let during = say_seen(&mut a, ChatType::ChatWorld, "during", 0).await;
    assert!(during.msg_id > before.msg_id);
    let n = next_chat(&mut c).await;
    assert_eq!((n.msg_id, n.strcontext.as_str()), (during.msg_id, "during"));
    let psst = say_seen(&mut a, ChatType::ChatPrivate, "psst", 3).await;
    assert!(psst.msg_id > during.msg_id);
    assert_eq!(next_chat(&mut c).await.msg_id, psst.msg_id);
    // Another node's player is out of reach: refused, not acknowledged.
    a.send_chat(ChatType::ChatPrivate, "far", 2, "")
        .await
        .unwrap();
    assert_eq!(slow_reply(&mut a).await.res, ResCode::ResStoreFailed as i32);
    // The acknowledged line is in the node's history.
    let mut kept = false;
    for _ in 0..500 {
        let page = page(&mut c, ChatType::ChatWorld, 0, 0, 0, 10).await;
        if page
            .msgs
            .iter()
            .any(|m| m.msg_id == during.msg_id && m.strcontext == "during")
        {
            kept = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(
        kept,
        "the line sent while NATS was away is not in n1's history"
    );
    // Shared state cannot change meanwhile: a word list edit is refused
    // and changes nothing.
    let r = cl.nodes[0]
        .gm("POST", "/v1/filter/words", Some(r#"{"words": ["away"]}"#))
        .await;
    assert_eq!(r.status, 503, "{}", r.text);
    let r = cl.nodes[0].gm("GET", "/v1/filter/words", None).await;
    assert_eq!(r.json()["words"], serde_json::json!([]));
    // Nor can a sanction or a revocation be set, nor the shared audit log
    // be read.
    let r = cl.nodes[0]
        .gm("PUT", "/v1/players/2/mute", Some(r#"{"seconds":600}"#))
        .await;
    assert_eq!(r.status, 503, "{}", r.text);
    let r = cl.nodes[0].gm("DELETE", "/v1/players/2/ban", None).await;
    assert_eq!(r.status, 503, "{}", r.text);
    let r = cl.nodes[0]
        .gm("POST", "/v1/players/2/revoke-tokens", None)
        .await;
    assert_eq!(r.status, 503, "{}", r.text);
    let r = cl.nodes[0].gm("GET", "/v1/audit", None).await;
    assert_eq!(r.status, 503, "{}", r.text);
    cl.nats.restart().await;
    until_ready_is(&cl.nodes[0], 200, "ok").await;
    for node in &cl.nodes {
        let r = node.gm("GET", "/v1/filter/words", None).await;
        assert_eq!(r.json()["words"], serde_json::json!([]), "{}", node.admin);
    }
    // Sent until one is stored (JetStream may still be starting). A line
    // refused now may arrive too: the client library may have buffered it,
    // and a refusal does not promise it was not stored.
    let mut acked = None;
    for i in 0..100 {
        a.send_chat(ChatType::ChatWorld, &format!("after {i}"), 0, "")
            .await
            .unwrap();
        let rep = slow_reply(&mut a).await;
        if rep.res == ResCode::ResOk as i32 {
            acked = Some(rep.msg_id);
            break;
        }
        assert_eq!(rep.res, ResCode::ResStoreFailed as i32);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let acked = acked.expect("no line was stored after the restart");
    // Every player gets it, once its consumer has noticed the restart (its
    // heartbeat: about 15 s here), above every id it had; the other node's
    // player never gets what n1 said alone.
    let on_b = lines_until(&mut b, before.msg_id, acked).await;
    assert!(
        !on_b.iter().any(|t| t == "during" || t == "psst"),
        "{on_b:?}"
    );
    lines_until(&mut c, psst.msg_id, acked).await;
    lines_until(&mut a, psst.msg_id, acked).await;
    // Once every node has caught up: the refused sanction and revocation
    // were not stored late either (a write the NATS client buffered would
    // have landed by now).
    for node in &cl.nodes {
        let r = node.gm("GET", "/v1/players/2", None).await;
        assert_eq!(r.json()["muted_until_ms"], 0, "{}", r.text);
        assert_eq!(r.json()["tokens_revoked_before_s"], 0, "{}", r.text);
    }
    drop((a, b, c));
    cl.stop().await;
}

/// A player drops off n1 and resumes on n2 with its cursor: every line of
/// its conversations sent meanwhile, on any node, arrives once, in order,
/// before live traffic; n1's lingering session ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_on_another_node_loses_nothing() {
    let cl = cluster().await;
    let [n1, n2, n3] = [&cl.nodes[0], &cl.nodes[1], &cl.nodes[2]];
    // The player: guild 5, team 6, scene 7.
    let mut p = n1.login(1, "roamer", 5, 6, 7).await;
    let mut guildmate = n2.login(2, "guildmate", 5, 0, 0).await;
    let mut teammate = n3.login(3, "teammate", 0, 6, 0).await;
    let mut neighbour = n3.login(4, "neighbour", 0, 0, 7).await;
    let mut stranger = n2.login(5, "stranger", 9, 9, 9).await;
    cl.settled(&[(1, 0), (2, 1), (3, 2), (4, 2), (5, 1)]).await;
    let seen = say_seen(&mut guildmate, ChatType::ChatGuild, "hello guild", 0).await;
    assert_eq!(next_chat(&mut p).await.msg_id, seen.msg_id);
    // The connection drops; the session lingers on n1.
    drop(p);
    until_lingering(n1, 1).await;
    let mut missed = Vec::new();
    for (c, channel, text) in [
        (&mut guildmate, ChatType::ChatGuild, "guild line"),
        (&mut teammate, ChatType::ChatTeam, "team line"),
        (&mut neighbour, ChatType::ChatNormal, "scene line"),
        (&mut stranger, ChatType::ChatWorld, "world line"),
    ] {
        missed.push(say_seen(c, channel, text, 0).await.msg_id);
    }
    let whisper = say_seen(&mut stranger, ChatType::ChatPrivate, "a whisper", 1).await;
    missed.push(whisper.msg_id);
    let http = n3
        .logic(
            "POST",
            "/v1/announce",
            Some(r#"{"text":"to you","player":1}"#),
        )
        .await;
    assert_eq!(http.status, 200, "{}", http.text);
    missed.push(http.json()["msg_id"].as_u64().unwrap());
    // Lines the player is not in: the stranger's guild, another scene.
    say_seen(&mut stranger, ChatType::ChatGuild, "not yours", 0).await;
    say_seen(&mut stranger, ChatType::ChatNormal, "not yours either", 0).await;
    // Resume on n2.
    let mut p = n2.connect().await;
    let rep = p
        .login_from(&n2.token(1, "roamer", 5, 6, 7), seen.msg_id)
        .await
        .unwrap();
    assert_eq!(rep.res, ResCode::ResOk as i32);
    assert!(!rep.replay_gap, "the stream had everything");
    assert_eq!(rep.replayed as usize, missed.len());
    let mut got = Vec::new();
    for _ in 0..missed.len() {
        got.push(next_chat(&mut p).await.msg_id);
    }
    assert_eq!(got, missed, "every missed line, once, in order");
    // The resume's readers of the stream are gone: only the nodes' own
    // line readers are left, and the stream has room for a resume storm
    // (nats-server's default is 1,000 consumers a stream).
    let js = async_nats::jetstream::new(async_nats::connect(cl.nats.url.as_str()).await.unwrap());
    let mut lines = js.get_stream("GC_LINES").await.unwrap();
    // Polled: a node's own reader may be between two incarnations.
    let mut readers = 0;
    for _ in 0..100 {
        readers = lines.info().await.unwrap().state.consumer_count;
        if readers == 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(readers, 3);
    assert_eq!(lines.info().await.unwrap().config.max_consumers, 20_000);
    // n1's session ended; live traffic reaches the player on n2.
    n1.until_located(1, "n2").await;
    assert!(n1.world.player(UserId(1)).await.unwrap().is_none());
    let live = say_seen(&mut guildmate, ChatType::ChatGuild, "welcome back", 0).await;
    assert_eq!(next_chat(&mut p).await.msg_id, live.msg_id);
    assert_silent(&mut p).await;
    drop((p, guildmate, teammate, neighbour, stranger));
    cl.stop().await;
}

/// A whisper to a player with no session anywhere waits in the shared
/// inbox, and arrives once at the player's next login, on another node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_whisper_waits_for_a_login_on_any_node() {
    let cl = cluster().await;
    let [n1, n2, n3] = [&cl.nodes[0], &cl.nodes[1], &cl.nodes[2]];
    // The target has logged in once, on n3, and left (no linger).
    let target = n3.login(9, "nine", 0, 0, 0).await;
    let mut sender = n1.login(1, "one", 0, 0, 0).await;
    cl.settled(&[(9, 2), (1, 0)]).await;
    n3.gm("POST", "/v1/players/9/kick", None).await;
    drop(target);
    // n1 knows the player is gone once the directory says so.
    until_gone(n1, 9).await;
    let rep = say_seen(&mut sender, ChatType::ChatPrivate, "while you were out", 9).await;
    assert!(rep.offline, "kept as an offline whisper");
    // The next login, on n2, gets it after its reply, and only once.
    let mut back = n2.login(9, "nine", 0, 0, 0).await;
    let got = next_chat(&mut back).await;
    assert_eq!(
        (got.msg_id, got.strcontext.as_str(), got.senderid),
        (rep.msg_id, "while you were out", 1)
    );
    // Nothing else comes; reading on answers the barrier ping that
    // follows the whisper, which confirms it was read.
    assert_silent(&mut back).await;
    // Delivered and confirmed: gone from the inbox.
    let js = async_nats::jetstream::new(async_nats::connect(cl.nats.url.as_str()).await.unwrap());
    let inbox = js.get_stream("GC_INBOX").await.unwrap();
    let mut gone = false;
    for _ in 0..500 {
        if inbox
            .get_last_raw_message_by_subject("gc.inbox.9")
            .await
            .is_err()
        {
            gone = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert!(gone, "the delivered whisper is deleted from the inbox");
    // And so is the login's reader of the inbox.
    let info = inbox.clone().info().await.unwrap().clone();
    assert_eq!(info.state.consumer_count, 0);
    assert_eq!(info.config.max_consumers, 20_000);
    drop(back);
    let mut again = n3.login(9, "nine", 0, 0, 0).await;
    assert_silent(&mut again).await;
    drop((sender, again));
    cl.stop().await;
}

/// A login on a node whose feed is behind the stream gets a waiting
/// whisper once, from its feed in its place, not also from the inbox at
/// login: the inbox holds whispers the node has not read from the stream
/// yet (another node kept them, or spilled them as the session moved).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_on_a_node_behind_gets_a_waiting_whisper_once() {
    let cl = cluster().await;
    let [n1, n2] = [&cl.nodes[0], &cl.nodes[1]];
    // The target has been seen once, on n2, and is gone.
    drop(n2.login(9, "nine", 0, 0, 0).await);
    n2.gm("POST", "/v1/players/9/kick", None).await;
    until_gone(n1, 9).await;
    until_gone(n2, 9).await;
    let mut s = n1.login(1, "one", 0, 0, 0).await;
    cl.settled(&[(1, 0)]).await;
    // n2 falls behind: it reads nothing more from the stream for now.
    n2.cluster.as_ref().unwrap().hold_feed(true);
    let rep = say_to(&mut s, ChatType::ChatPrivate, "while you were out", 9).await;
    assert_eq!(rep.res, ResCode::ResOk as i32);
    assert!(rep.offline);
    let mut nine = n2.login(9, "nine", 0, 0, 0).await;
    n2.cluster.as_ref().unwrap().hold_feed(false);
    let got = next_chat(&mut nine).await;
    assert_eq!(
        (got.msg_id, got.strcontext.as_str()),
        (rep.msg_id, "while you were out")
    );
    assert_silent(&mut nine).await;
    drop((s, nine));
    cl.stop().await;
}

/// A resume on a node whose own feed is behind the client's cursor: the
/// lines the client read on the old node reach the new one later, live,
/// and are not sent to it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_on_a_node_behind_the_cursor_does_not_send_old_lines_again() {
    let cl = cluster().await;
    let [n1, n2] = [&cl.nodes[0], &cl.nodes[1]];
    let mut p = n1.login(1, "one", 5, 0, 0).await;
    let mut s = n1.login(2, "two", 5, 0, 0).await;
    cl.settled(&[(1, 0), (2, 0)]).await;
    // n2 falls behind: it reads nothing more from the stream for now.
    n2.cluster.as_ref().unwrap().hold_feed(true);
    let mut read = Vec::new();
    for text in ["first", "second"] {
        let rep = say_seen(&mut s, ChatType::ChatGuild, text, 0).await;
        assert_eq!(next_chat(&mut p).await.msg_id, rep.msg_id);
        read.push(rep.msg_id);
    }
    drop(p);
    until_lingering(n1, 1).await;
    let mut p = n2.connect().await;
    let rep = p
        .login_from(&n2.token(1, "one", 5, 0, 0), read[1])
        .await
        .unwrap();
    assert_eq!(rep.res, ResCode::ResOk as i32);
    assert_eq!(rep.replayed, 0, "the client has read everything");
    // n2 catches up: both lines reach it now, after the login.
    n2.cluster.as_ref().unwrap().hold_feed(false);
    let live = say_seen(&mut s, ChatType::ChatGuild, "third", 0).await;
    let got = next_chat(&mut p).await;
    assert_eq!(
        (got.msg_id, got.strcontext.as_str()),
        (live.msg_id, "third"),
        "the next line is the new one, not one the client read on n1"
    );
    assert_silent(&mut p).await;
    drop((p, s));
    cl.stop().await;
}

/// Whispers a connection was sent but never confirmed go to the shared
/// inbox when the session ends; a login elsewhere whose cursor has passed
/// one does not get it again (the client read it: a connection gets its
/// lines in msg_id order), and gets those after the cursor once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spilled_whispers_the_cursor_has_passed_are_not_sent_again_elsewhere() {
    let cl = cluster().await;
    let [n1, n2] = [&cl.nodes[0], &cl.nodes[1]];
    let mut p = n1.login(1, "one", 0, 0, 0).await;
    let mut q = n2.login(2, "two", 0, 0, 0).await;
    cl.settled(&[(1, 0), (2, 1)]).await;
    let first = say_to(&mut q, ChatType::ChatPrivate, "first", 1).await;
    let second = say_to(&mut q, ChatType::ChatPrivate, "second", 1).await;
    assert!(!first.offline && !second.offline, "she was connected");
    assert_eq!(next_chat(&mut p).await.msg_id, first.msg_id);
    assert_eq!(next_chat(&mut p).await.msg_id, second.msg_id);
    // Nothing more is read, so the receipt ping after them is never
    // answered: both are unconfirmed when the session ends.
    drop(p);
    n1.gm("POST", "/v1/players/1/kick", None).await;
    until_gone(n1, 1).await;
    let js = async_nats::jetstream::new(async_nats::connect(cl.nats.url.as_str()).await.unwrap());
    let mut inbox = js.get_stream("GC_INBOX").await.unwrap();
    assert_eq!(
        until_inbox_holds(&mut inbox, 2).await,
        2,
        "both spilled to the shared inbox"
    );
    // The client had read up to the first.
    let mut back = n2.connect().await;
    let rep = back
        .login_from(&n2.token(1, "one", 0, 0, 0), first.msg_id)
        .await
        .unwrap();
    assert_eq!(rep.res, ResCode::ResOk as i32);
    let got = next_chat(&mut back).await;
    assert_eq!(
        (got.msg_id, got.strcontext.as_str()),
        (second.msg_id, "second")
    );
    assert_silent(&mut back).await;
    // Both are deleted once this connection confirmed the barrier.
    assert_eq!(
        until_inbox_holds(&mut inbox, 0).await,
        0,
        "the inbox is empty"
    );
    drop((q, back));
    cl.stop().await;
}

/// Polls the inbox stream until it holds `n` whispers (bounded); returns
/// how many it last held.
async fn until_inbox_holds(inbox: &mut async_nats::jetstream::stream::Stream, n: u64) -> u64 {
    let mut held = 0;
    for _ in 0..500 {
        held = inbox.info().await.unwrap().state.messages;
        if held == n {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    held
}

/// Polls `path` on `node` until `ready` holds for its JSON (bounded).
async fn until_json(node: &TestServer, path: &str, ready: impl Fn(&serde_json::Value) -> bool) {
    for _ in 0..500 {
        let http = node.gm("GET", path, None).await;
        if http.status == 200 && ready(&http.json()) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("{path} never got there on {}", node.admin);
}

/// The admin API of any node acts on a player whose session another node
/// holds: read, regroup, mute, ban, kick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_on_any_node_reach_a_player_on_another() {
    let cl = cluster().await;
    let [n1, n2, n3] = [&cl.nodes[0], &cl.nodes[1], &cl.nodes[2]];
    let mut p = n2.login(5, "five", 0, 0, 0).await;
    let mut friend = n1.login(6, "six", 7, 0, 0).await;
    cl.settled(&[(5, 1), (6, 0)]).await;
    // The online count on any node is the cluster's, by node.
    let http = n3.gm("GET", "/v1/stats", None).await;
    assert_eq!(http.status, 200, "{}", http.text);
    let stats = http.json();
    assert_eq!(stats["online"], 0, "this node's own");
    assert_eq!(stats["cluster"]["online"], 2);
    assert_eq!(
        stats["cluster"]["nodes"],
        serde_json::json!({"n1": 1, "n2": 1, "n3": 0})
    );
    // Read, on n1.
    let http = n1.gm("GET", "/v1/players/5", None).await;
    assert_eq!(http.status, 200, "{}", http.text);
    assert_eq!(http.json()["state"], "connected");
    // The logic server moves the player into guild 7, through n3.
    let http = n3
        .logic("PUT", "/v1/players/5/groups", Some(r#"{"guild":7}"#))
        .await;
    assert_eq!(http.status, 200, "{}", http.text);
    assert_eq!(http.json()["guild"], 7);
    let rep = say_seen(&mut friend, ChatType::ChatGuild, "welcome to 7", 0).await;
    assert_eq!(next_chat(&mut p).await.msg_id, rep.msg_id);
    // Muted through n1: once n2 has it, the player cannot speak.
    let http = n1
        .gm("PUT", "/v1/players/5/mute", Some(r#"{"seconds":600}"#))
        .await;
    assert_eq!(http.status, 200, "{}", http.text);
    until_json(n2, "/v1/players/5", |j| {
        j["muted_until_ms"].as_u64() > Some(0)
    })
    .await;
    let rep = say(&mut p, ChatType::ChatWorld, "can I?").await;
    assert_eq!(rep.res, ResCode::ResMuted as i32);
    // Unmuted through n3.
    let http = n3.gm("DELETE", "/v1/players/5/mute", None).await;
    assert_eq!(http.status, 204, "{}", http.text);
    until_json(n2, "/v1/players/5", |j| j["muted_until_ms"] == 0).await;
    say_seen(&mut p, ChatType::ChatWorld, "I can", 0).await;
    // Banned through n3: n2 puts the player out, and no node lets them in.
    let http = n3
        .gm("PUT", "/v1/players/5/ban", Some(r#"{"seconds":600}"#))
        .await;
    assert_eq!(http.status, 200, "{}", http.text);
    let (_, kick) = expect_close(&mut p).await;
    assert_eq!(kick, Some(KickReason::KickBanned as i32));
    until_json(n1, "/v1/players/5", |j| {
        j["banned_until_ms"].as_u64() > Some(0)
    })
    .await;
    let mut c = n1.connect().await;
    let rep = c.login(&n1.token(5, "five", 0, 0, 0)).await.unwrap();
    assert_eq!(rep.res, ResCode::ResBanned as i32);
    drop(c);
    let http = n2.gm("DELETE", "/v1/players/5/ban", None).await;
    assert_eq!(http.status, 204, "{}", http.text);
    until_json(n1, "/v1/players/5", |j| j["banned_until_ms"] == 0).await;
    let mut p = n1.login(5, "five", 0, 0, 0).await;
    // Kicked through n3, while on n1.
    n3.until_located(5, "n1").await;
    let http = n3.gm("POST", "/v1/players/5/kick", None).await;
    assert_eq!(http.status, 204, "{}", http.text);
    let (_, kick) = expect_close(&mut p).await;
    assert_eq!(kick, Some(KickReason::KickOperator as i32));
    drop(friend);
    cl.stop().await;
}

/// Reads until the connection ends; returns the kick reason and the
/// msg_ids of the lines that came before.
async fn lines_until_kicked(
    c: &mut guildchat_client::Client,
) -> (Option<i32>, Option<u16>, Vec<u64>) {
    let (mut kick, mut lines) = (None, Vec::new());
    loop {
        match c
            .recv_timeout(std::time::Duration::from_secs(30))
            .await
            .unwrap()
        {
            guildchat_client::Event::Closed(code) => return (kick, code, lines),
            guildchat_client::Event::Msg(ServerMsg::Kick(k)) => kick = Some(k.reason),
            guildchat_client::Event::Msg(ServerMsg::Chat(n)) => lines.push(n.msg_id),
            guildchat_client::Event::Msg(_) => {}
        }
    }
}

/// `POST /v1/drain` on one of three nodes while world chat flows: its
/// readiness fails at once, its players are told to reconnect, resume on
/// the other nodes with every line exactly once, and the node exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_node_hands_its_players_to_the_others_and_exits() {
    let mut cl = cluster().await;
    let n1 = cl.nodes.remove(0);
    let (n2, n3) = (&cl.nodes[0], &cl.nodes[1]);
    let mut players = Vec::new();
    for user in 1..=4 {
        players.push(n1.login(user, &format!("p{user}"), 0, 0, 0).await);
    }
    let mut talker = n2.login(9, "talker", 0, 0, 0).await;
    // World chat all through the drain.
    let traffic = tokio::spawn(async move {
        let mut ids = Vec::new();
        for i in 0..60 {
            ids.push(
                say_seen(&mut talker, ChatType::ChatWorld, &format!("line {i}"), 0)
                    .await
                    .msg_id,
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        (talker, ids)
    });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let http = n1.gm("POST", "/v1/drain", None).await;
    assert_eq!(http.status, 202, "{}", http.text);
    assert_eq!(http.json()["players"], 4);
    let ready = crate::common::http("GET", &format!("{}/readyz", n1.admin), None, None).await;
    assert_eq!(ready.status, 503, "a draining node is not ready");
    assert_eq!(ready.json()["draining"], true);
    // Each player is told to reconnect, and resumes on n2 or n3 from the
    // last line it saw.
    let mut seen_by = Vec::new();
    for (i, mut c) in players.into_iter().enumerate() {
        let user = i as u64 + 1;
        let (kick, code, lines) = lines_until_kicked(&mut c).await;
        assert_eq!(
            kick,
            Some(KickReason::KickReconnect as i32),
            "player {user}"
        );
        assert_eq!(code, Some(guildchat_protocol::close_code::RECONNECT));
        let node = if user.is_multiple_of(2) { n2 } else { n3 };
        let mut back = node.connect().await;
        let rep = back
            .login_from(
                &node.token(user, &format!("p{user}"), 0, 0, 0),
                lines.last().copied().unwrap_or(0),
            )
            .await
            .unwrap();
        assert_eq!(rep.res, ResCode::ResOk as i32);
        assert!(!rep.replay_gap || lines.is_empty(), "player {user}");
        seen_by.push((user, back, lines));
    }
    n1.until_stopped().await;
    let (talker, sent) = traffic.await.unwrap();
    for (user, back, lines) in &mut seen_by {
        // The first line a player saw, onwards: every one, once, in order.
        let from = sent
            .iter()
            .position(|id| Some(id) == lines.first())
            .unwrap_or(0);
        while lines.last() != sent.last() {
            lines.push(next_chat(back).await.msg_id);
        }
        assert_eq!(&lines[..], &sent[from..], "player {user}");
    }
    drop((talker, seen_by));
    cl.stop().await;
}

/// A send retried with the same client message id on another node, which
/// has nothing in its own store to recognise it by (no history here), is
/// answered with the first send's msg_id and delivered once: the stream
/// itself de-duplicates it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_on_another_node_is_delivered_once() {
    let nats = Nats::start().await;
    let n1 = TestServer::node(&nats, "n1", None).await;
    let n2 = TestServer::node_with(&nats, "n2", Some(&n1), |c| c.history.enabled = false).await;
    let mut p = n1.login(1, "p", 0, 0, 0).await;
    let mut watcher = n1.login(2, "w", 0, 0, 0).await;
    p.send_chat_with_id(ChatType::ChatWorld, "once", 0, "", 77)
        .await
        .unwrap();
    let first = next_chat_rep(&mut p).await;
    assert_eq!(first.res, ResCode::ResOk as i32);
    assert_eq!(next_chat(&mut watcher).await.msg_id, first.msg_id);
    // The reply was lost, say; the client moved to n2 and retries.
    drop(p);
    let mut p = n2.login(1, "p", 0, 0, 0).await;
    p.send_chat_with_id(ChatType::ChatWorld, "once", 0, "", 77)
        .await
        .unwrap();
    let again = next_chat_rep(&mut p).await;
    assert_eq!(again.res, ResCode::ResOk as i32);
    assert_eq!(again.msg_id, first.msg_id, "the first send's msg_id");
    assert_silent(&mut watcher).await;
    drop((p, watcher));
    n1.stop().await;
    n2.stop().await;
}

/// A login on a full node is refused before it claims the session, so the
/// player's session on another node goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_refused_by_a_full_node_leaves_the_session_elsewhere() {
    let nats = Nats::start().await;
    let n1 = TestServer::node_with(&nats, "n1", None, |c| c.max_online = 1).await;
    let n2 = TestServer::node(&nats, "n2", Some(&n1)).await;
    let _filler = n1.login(9, "filler", 0, 0, 0).await;
    let mut p = n2.login(1, "p", 0, 0, 0).await;
    let mut c = n1.connect().await;
    let rep = c.login(&n1.token(1, "p", 0, 0, 0)).await.unwrap();
    assert_eq!(rep.res, ResCode::ResServerFull as i32);
    drop(c);
    // Still the session on n2, and still live.
    let mut other = n2.login(2, "q", 0, 0, 0).await;
    let rep = say_seen(&mut other, ChatType::ChatWorld, "still here?", 0).await;
    assert_eq!(next_chat(&mut p).await.msg_id, rep.msg_id);
    assert!(n2.world.player(UserId(1)).await.unwrap().is_some());
    drop((p, other, _filler));
    n1.stop().await;
    n2.stop().await;
}

/// A cursor from before the stream's first line (here, before the cluster
/// began) replays what the stream has and reports a gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_from_before_the_stream_reports_a_gap() {
    let cl = cluster().await;
    let mut a = cl.nodes[0].login(1, "a", 0, 0, 0).await;
    let line = say_seen(&mut a, ChatType::ChatWorld, "kept", 0).await;
    let mut b = cl.nodes[1].connect().await;
    let rep = b
        .login_from(&cl.nodes[1].token(2, "b", 0, 0, 0), 1)
        .await
        .unwrap();
    assert_eq!(rep.res, ResCode::ResOk as i32);
    assert!(rep.replay_gap, "the stream does not go back that far");
    assert_eq!(next_chat(&mut b).await.msg_id, line.msg_id);
    drop((a, b));
    cl.stop().await;
}

/// The shared inbox holds `max_offline_whispers` per player; past it a
/// whisper is refused with RES_INBOX_FULL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_shared_inbox_refuses_the_next_whisper() {
    let nats = Nats::start().await;
    let cap = |c: &mut guildchat_server::Config| c.history.max_offline_whispers = 2;
    let n1 = TestServer::node_with(&nats, "n1", None, cap).await;
    let n2 = TestServer::node_with(&nats, "n2", Some(&n1), cap).await;
    // The target has been seen once, on n2, and is gone.
    drop(n2.login(9, "nine", 0, 0, 0).await);
    n2.gm("POST", "/v1/players/9/kick", None).await;
    let mut s = n1.login(1, "one", 0, 0, 0).await;
    until_gone(&n1, 9).await;
    for text in ["one", "two"] {
        let rep = say_seen(&mut s, ChatType::ChatPrivate, text, 9).await;
        assert!(rep.offline);
    }
    let rep = say_to(&mut s, ChatType::ChatPrivate, "three", 9).await;
    assert_eq!(rep.res, ResCode::ResInboxFull as i32);
    drop(s);
    n1.stop().await;
    n2.stop().await;
}

/// Until `node` knows `user` has no session anywhere (bounded).
async fn until_gone(node: &TestServer, user: u64) {
    for _ in 0..500 {
        if node.world.locate(UserId(user)).await.unwrap().is_none() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    panic!("{} still places player {user}", node.admin);
}

/// `max_offline_per_sender` holds across nodes: a sender's whispers
/// waiting in the shared inbox count wherever they were sent from, past
/// the cap the next is refused with RES_SENDER_LIMIT, and a delivery on
/// any node gives its place back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_senders_cap_on_offline_whispers_holds_across_nodes() {
    let nats = Nats::start().await;
    let cap = |c: &mut guildchat_server::Config| c.history.max_offline_per_sender = 2;
    let n1 = TestServer::node_with(&nats, "n1", None, cap).await;
    let n2 = TestServer::node_with(&nats, "n2", Some(&n1), cap).await;
    // Two targets, seen once and gone.
    for user in [8, 9] {
        drop(n2.login(user, "target", 0, 0, 0).await);
        n2.gm("POST", &format!("/v1/players/{user}/kick"), None)
            .await;
        until_gone(&n1, user).await;
        until_gone(&n2, user).await;
    }
    // One whisper each, sent from n1.
    let mut s = n1.login(1, "one", 0, 0, 0).await;
    let mut sent = Vec::new();
    for to in [9, 8] {
        let rep = say_seen(&mut s, ChatType::ChatPrivate, "while you were out", to).await;
        assert!(rep.offline);
        sent.push(rep.msg_id);
    }
    // The sender moves to n2: its third is refused there, to either
    // target, and kept in no inbox (the line itself is in the stream and
    // the history, as a refused whisper is alone).
    drop(s);
    let mut s = n2.login(1, "one", 0, 0, 0).await;
    for to in [9, 8] {
        let rep = say_to(&mut s, ChatType::ChatPrivate, "one too many", to).await;
        assert_eq!(rep.res, ResCode::ResSenderLimit as i32, "to {to}");
    }
    // Target 9 logs in on n1 and reads its whisper, which frees a place:
    // the sender, still on n2, may send one more, and no more.
    let mut nine = n1.login(9, "target", 0, 0, 0).await;
    let got = next_chat(&mut nine).await;
    assert_eq!(got.msg_id, sent[0]);
    assert_silent(&mut nine).await;
    let mut freed = None;
    for _ in 0..200 {
        let rep = say_to(&mut s, ChatType::ChatPrivate, "again", 8).await;
        if rep.res == ResCode::ResOk as i32 {
            freed = Some(rep);
            break;
        }
        assert_eq!(rep.res, ResCode::ResSenderLimit as i32);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let freed = freed.expect("the delivered whisper's place never came back");
    assert!(freed.offline);
    assert_eq!(
        say_to(&mut s, ChatType::ChatPrivate, "past the cap", 8)
            .await
            .res,
        ResCode::ResSenderLimit as i32
    );
    // Target 8 gets exactly what was accepted for it, in order.
    let mut eight = n1.login(8, "target", 0, 0, 0).await;
    let got = [next_chat(&mut eight).await, next_chat(&mut eight).await];
    assert_eq!(
        got.map(|m| (m.msg_id, m.strcontext)),
        [
            (sent[1], "while you were out".to_owned()),
            (freed.msg_id, "again".to_owned())
        ]
    );
    assert_silent(&mut eight).await;
    drop((s, nine, eight));
    n1.stop().await;
    n2.stop().await;
}

/// A whisper the full inbox refuses gives its sender's place back: with
/// room for two waiting whispers, a sender refused once by a full inbox
/// still gets its second whisper elsewhere kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whisper_refused_by_a_full_inbox_gives_its_senders_place_back() {
    let nats = Nats::start().await;
    let n1 = TestServer::node_with(&nats, "n1", None, |c| {
        c.history.max_offline_whispers = 1;
        c.history.max_offline_per_sender = 2;
    })
    .await;
    for user in [8, 9] {
        drop(n1.login(user, "target", 0, 0, 0).await);
        n1.gm("POST", &format!("/v1/players/{user}/kick"), None)
            .await;
        until_gone(&n1, user).await;
    }
    let mut s = n1.login(1, "one", 0, 0, 0).await;
    assert!(
        say_seen(&mut s, ChatType::ChatPrivate, "kept", 9)
            .await
            .offline
    );
    assert_eq!(
        say_to(&mut s, ChatType::ChatPrivate, "inbox full", 9)
            .await
            .res,
        ResCode::ResInboxFull as i32
    );
    // The refused whisper's place comes back (its delete runs in the
    // background, so a first try may still find it taken).
    let mut kept = false;
    for _ in 0..200 {
        let rep = say_to(&mut s, ChatType::ChatPrivate, "to eight", 8).await;
        if rep.res == ResCode::ResOk as i32 {
            assert!(rep.offline);
            kept = true;
            break;
        }
        assert_eq!(rep.res, ResCode::ResSenderLimit as i32);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(kept, "the refused whisper's place never came back");
    drop(s);
    n1.stop().await;
}

/// Whispers a server kept alone, before it joined a cluster, move to the
/// shared inbox as it joins: they reach their player at a login on any
/// node, once, and a later start does not bring them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whispers_kept_before_joining_reach_a_login_on_any_node() {
    let alone = TestServer::start_with(no_cooldowns).await;
    drop(alone.login(9, "nine", 0, 0, 0).await);
    alone.gm("POST", "/v1/players/9/kick", None).await;
    for _ in 0..500 {
        if alone.world.player(UserId(9)).await.unwrap().is_none() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert!(alone.world.player(UserId(9)).await.unwrap().is_none());
    let mut s = alone.login(1, "one", 0, 0, 0).await;
    let mut kept = Vec::new();
    for text in ["first", "second"] {
        let rep = say_to(&mut s, ChatType::ChatPrivate, text, 9).await;
        assert_eq!(rep.res, ResCode::ResOk as i32);
        assert!(rep.offline);
        kept.push((rep.msg_id, text.to_owned()));
    }
    drop(s);
    let dir = alone.stop_keep_dir().await;
    let nats = Nats::start().await;
    let as_n1 = |c: &mut guildchat_server::Config| {
        no_cooldowns(c);
        c.cluster.url = Some(nats.url.clone());
        c.cluster.node_id = Some("n1".into());
    };
    let n1 = TestServer::start_in(dir, as_n1).await;
    let n2 = TestServer::node(&nats, "n2", Some(&n1)).await;
    let mut nine = n2.login(9, "nine", 0, 0, 0).await;
    let got = [next_chat(&mut nine).await, next_chat(&mut nine).await];
    assert_eq!(
        got.map(|m| (m.msg_id, m.strcontext)),
        [kept[0].clone(), kept[1].clone()]
    );
    assert_silent(&mut nine).await;
    drop(nine);
    n2.gm("POST", "/v1/players/9/kick", None).await;
    until_gone(&n2, 9).await;
    // n1 starts again on its dir: its store no longer holds them.
    let n1 = TestServer::start_in(n1.stop_keep_dir().await, as_n1).await;
    until_gone(&n1, 9).await;
    let mut nine = n2.login(9, "nine", 0, 0, 0).await;
    assert_silent(&mut nine).await;
    drop(nine);
    n1.stop().await;
    n2.stop().await;
}

/// Line and inbox streams made with nats-server's default consumer limit
/// (by an older build) have it raised when a node joins: a storm of
/// resumes needs more readers than 1,000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_raises_the_reader_limit_of_older_streams() {
    let nats = Nats::start().await;
    let js = async_nats::jetstream::new(async_nats::connect(nats.url.as_str()).await.unwrap());
    for (name, subjects) in [("GC_LINES", "gc.line.>"), ("GC_INBOX", "gc.inbox.>")] {
        js.create_stream(async_nats::jetstream::stream::Config {
            name: name.into(),
            subjects: vec![subjects.into()],
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let n1 = TestServer::node(&nats, "n1", None).await;
    for name in ["GC_LINES", "GC_INBOX"] {
        let mut stream = js.get_stream(name).await.unwrap();
        let config = stream.info().await.unwrap().config.clone();
        assert_eq!(config.max_consumers, 20_000, "{name}");
        assert_eq!(
            config.subjects.len(),
            1,
            "{name}: the rest of its config stays"
        );
    }
    n1.stop().await;
}

/// A whisper from before joining that the shared inbox refuses (the
/// player's inbox is full) stays in the node's store, and moves at a
/// later start, once there is room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whisper_the_full_inbox_refuses_at_joining_moves_at_a_later_start() {
    let alone = TestServer::start_with(no_cooldowns).await;
    drop(alone.login(9, "nine", 0, 0, 0).await);
    alone.gm("POST", "/v1/players/9/kick", None).await;
    for _ in 0..500 {
        if alone.world.player(UserId(9)).await.unwrap().is_none() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let mut s = alone.login(1, "one", 0, 0, 0).await;
    let mut kept = Vec::new();
    for text in ["first", "second"] {
        let rep = say_to(&mut s, ChatType::ChatPrivate, text, 9).await;
        assert!(rep.offline, "{rep:?}");
        kept.push(rep.msg_id);
    }
    drop(s);
    let dir = alone.stop_keep_dir().await;
    let nats = Nats::start().await;
    // The cluster's inbox holds one whisper a player.
    let as_n1 = |c: &mut guildchat_server::Config| {
        no_cooldowns(c);
        c.history.max_offline_whispers = 1;
        c.cluster.url = Some(nats.url.clone());
        c.cluster.node_id = Some("n1".into());
    };
    let n1 = TestServer::start_in(dir, as_n1).await;
    let n2 = TestServer::node(&nats, "n2", Some(&n1)).await;
    let mut nine = n2.login(9, "nine", 0, 0, 0).await;
    assert_eq!(next_chat(&mut nine).await.msg_id, kept[0]);
    assert_silent(&mut nine).await;
    drop(nine);
    n2.gm("POST", "/v1/players/9/kick", None).await;
    until_gone(&n2, 9).await;
    // The next start of n1 moves the second, now that there is room.
    let n1 = TestServer::start_in(n1.stop_keep_dir().await, as_n1).await;
    until_gone(&n1, 9).await;
    let mut nine = n2.login(9, "nine", 0, 0, 0).await;
    assert_eq!(next_chat(&mut nine).await.msg_id, kept[1]);
    assert_silent(&mut nine).await;
    drop(nine);
    n1.stop().await;
    n2.stop().await;
}

/// A node whose own store holds ids from a standalone past above the
/// cluster's next id refuses to join, rather than hand out lower ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_newer_ids_of_its_own_refuses_to_join() {
    let nats = Nats::start().await;
    let n1 = TestServer::node(&nats, "n1", None).await;
    let mut p = n1.login(2, "p", 0, 0, 0).await;
    let cluster_id = say(&mut p, ChatType::ChatWorld, "in the cluster")
        .await
        .msg_id;
    // A standalone server started once the clock (1024 ids a millisecond)
    // has passed the cluster's next ids: its clock-based ids are above.
    let step = guildchat_server::cluster::ID_STEP;
    for _ in 0..1000 {
        let clock = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        if clock << 10 > cluster_id + 2 * step {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    let alone = TestServer::start().await;
    let mut a = alone.login(1, "a", 0, 0, 0).await;
    let rep = say(&mut a, ChatType::ChatWorld, "alone").await;
    assert_eq!(rep.res, ResCode::ResOk as i32);
    drop(a);
    let dir = alone.stop_keep_dir().await;
    let mut config = guildchat_server::Config {
        data_dir: dir.path().to_owned(),
        ..Default::default()
    };
    config.cluster.url = Some(nats.url.clone());
    config.cluster.node_id = Some("n2".into());
    let err = match guildchat_server::Server::start(config).await {
        Ok(_) => panic!("the node joined below its own ids"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("id base"), "{err}");
    drop(p);
    n1.stop().await;
}

/// A block set on one node holds on another: the blocker's session there
/// does not hear the blocked player's lines, and a whisper to the blocker,
/// connected on another node or offline, is refused whatever node it is
/// sent from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_set_on_one_node_holds_on_the_others() {
    use guildchat_protocol::{codec, pb, ClientMsg, MsgType};
    let cl = cluster().await;
    let [n1, n2, n3] = [&cl.nodes[0], &cl.nodes[1], &cl.nodes[2]];
    let mut blocker = n1.login(1, "blocker", 0, 0, 0).await;
    let mut pest = n3.login(2, "pest", 0, 0, 0).await;
    blocker
        .send(&ClientMsg::Block(pb::ChatMessageBlockReq {
            msghead: codec::head(MsgType::CchBlockReq, 1),
            userid: 2,
        }))
        .await
        .unwrap();
    loop {
        match next(&mut blocker).await {
            ServerMsg::BlockRep(r) => {
                assert_eq!(r.res, ResCode::ResOk as i32);
                break;
            }
            ServerMsg::Chat(_) => {}
            other => panic!("expected the block reply, got {other:?}"),
        }
    }
    // The blocker moves to n2 (a new session there).
    drop(blocker);
    let mut blocker = n2.login(1, "blocker", 0, 0, 0).await;
    let mut other = n3.login(3, "other", 0, 0, 0).await;
    say_seen(&mut pest, ChatType::ChatWorld, "can you hear me", 0).await;
    let heard = say_seen(&mut other, ChatType::ChatWorld, "and me", 0).await;
    // Only the other player's line arrives.
    assert_eq!(next_chat(&mut blocker).await.msg_id, heard.msg_id);
    // Connected on n2, the blocker refuses the pest's whisper from n3 too:
    // n3 has the shared list (written before the blocker moved) and says
    // so, where n2 would drop the whisper unseen.
    n3.until_located(1, "n2").await;
    assert_eq!(
        say_to(&mut pest, ChatType::ChatPrivate, "psst", 1)
            .await
            .res,
        ResCode::ResBlocked as i32
    );
    // Offline now (kicked: no linger), the blocker refuses the pest's
    // whisper, sent from n3.
    n2.gm("POST", "/v1/players/1/kick", None).await;
    drop(blocker);
    for _ in 0..500 {
        if n3.world.locate(UserId(1)).await.unwrap().is_none() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let rep = say_to(&mut pest, ChatType::ChatPrivate, "let me in", 1).await;
    assert_eq!(rep.res, ResCode::ResBlocked as i32);
    drop((pest, other));
    cl.stop().await;
}

/// A player who turned world chat off on one node keeps it off on the
/// node it moves to: the login reply there carries the mask, and world
/// lines stay away while other channels arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mask_set_on_one_node_holds_on_the_next() {
    use guildchat_protocol::{codec, mask_bit, pb, ClientMsg, MsgType};
    let cl = cluster().await;
    let [n1, n2, n3] = [&cl.nodes[0], &cl.nodes[1], &cl.nodes[2]];
    let mut p = n1.login(1, "p", 4, 0, 0).await;
    let mask = mask_bit(ChatType::ChatWorld);
    p.send(&ClientMsg::SetMask(pb::ChatMessageSetMaskReq {
        msghead: codec::head(MsgType::CchSetMaskReq, 1),
        mask,
    }))
    .await
    .unwrap();
    loop {
        if let ServerMsg::SetMaskRep(r) = next(&mut p).await {
            assert_eq!((r.res, r.mask), (ResCode::ResOk as i32, mask));
            break;
        }
    }
    drop(p);
    let mut c = n2.connect().await;
    let rep = c.login(&n2.token(1, "p", 4, 0, 0)).await.unwrap();
    assert_eq!((rep.res, rep.mask), (ResCode::ResOk as i32, mask));
    let mut q = n3.login(2, "q", 4, 0, 0).await;
    say_seen(&mut q, ChatType::ChatWorld, "world, masked", 0).await;
    let guild = say_seen(&mut q, ChatType::ChatGuild, "guild, not masked", 0).await;
    assert_eq!(next_chat(&mut c).await.msg_id, guild.msg_id);
    drop((c, q));
    cl.stop().await;
}

/// A long cooldown moves with the player: after a world line on n1 and a
/// login on n2 (the session moves), a world line on n2 is refused for the
/// rest of the clock. Another player on n2 is not held by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_cooldown_moves_with_the_player_to_another_node() {
    let nats = Nats::start().await;
    let slow_world = |c: &mut guildchat_server::Config| c.chat.world.cooldown_ms = 60_000;
    let n1 = TestServer::node_with(&nats, "n1", None, slow_world).await;
    let n2 = TestServer::node_with(&nats, "n2", Some(&n1), slow_world).await;
    let mut p = n1.login(1, "p", 0, 0, 0).await;
    say_seen(&mut p, ChatType::ChatWorld, "first", 0).await;
    let mut q = n2.login(1, "p", 0, 0, 0).await;
    n1.until_located(1, "n2").await;
    let rep = say_to(&mut q, ChatType::ChatWorld, "again", 0).await;
    assert_eq!(rep.res, ResCode::ResOnCooldown as i32);
    assert!(
        (50_000..=60_000).contains(&rep.cooldown_ms),
        "{} ms left",
        rep.cooldown_ms
    );
    let mut other = n2.login(2, "o", 0, 0, 0).await;
    say_seen(&mut other, ChatType::ChatWorld, "mine", 0).await;
    drop((p, q, other));
    n1.stop().await;
    n2.stop().await;
}

/// Sends guild lines on `c` until one is stored (JetStream may still be
/// starting after a restart), bounded.
async fn until_stored(c: &mut guildchat_client::Client) {
    for i in 0..100 {
        c.send_chat(ChatType::ChatGuild, &format!("probe {i}"), 0, "")
            .await
            .unwrap();
        let rep = slow_reply(c).await;
        if rep.res == ResCode::ResOk as i32 {
            return;
        }
        assert_eq!(rep.res, ResCode::ResStoreFailed as i32);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("no line was stored");
}

/// A cooldown that starts while NATS is away does not follow the player:
/// the next session, on another node after the outage, starts it afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cooldown_started_while_nats_is_away_starts_afresh_elsewhere() {
    let mut nats = Nats::start().await;
    let slow_world = |c: &mut guildchat_server::Config| c.chat.world.cooldown_ms = 60_000;
    let n1 = TestServer::node_with(&nats, "n1", None, slow_world).await;
    let n2 = TestServer::node_with(&nats, "n2", Some(&n1), slow_world).await;
    let mut p = n1.login(1, "p", 0, 0, 0).await;
    let mut o = n2.login(2, "o", 9, 0, 0).await;
    nats.kill();
    until_ready_is(&n1, 503, "degraded").await;
    say_seen(&mut p, ChatType::ChatWorld, "alone", 0).await;
    nats.restart().await;
    until_ready_is(&n1, 200, "ok").await;
    until_ready_is(&n2, 200, "ok").await;
    // The stream and the buckets are back once a line is stored again.
    until_stored(&mut o).await;
    let mut q = n2.login(1, "p", 0, 0, 0).await;
    q.send_chat(ChatType::ChatWorld, "fresh", 0, "")
        .await
        .unwrap();
    assert_eq!(slow_reply(&mut q).await.res, ResCode::ResOk as i32);
    drop((p, q, o));
    n1.stop().await;
    n2.stop().await;
}

/// The admin API of any node counts, reads and acts on every node: the
/// stats are sums with each node's own figures, a guild's online members
/// are those of every node, a recall reaches the line's audience on every
/// node and leaves no copy to replay, and a disband empties the guild
/// everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guild_reads_stats_recall_and_disband_span_every_node() {
    let cl = cluster().await;
    let [n1, n2, n3] = [&cl.nodes[0], &cl.nodes[1], &cl.nodes[2]];
    let mut a = n1.login(1, "ann", 7, 0, 0).await;
    let mut b = n2.login(2, "bob", 7, 0, 0).await;
    let c = n3.login(3, "cid", 0, 0, 0).await;
    cl.settled(&[(1, 0), (2, 1), (3, 2)]).await;
    // Stats on n3: the sums, and each node's own figures.
    let http = n3.gm("GET", "/v1/stats", None).await;
    assert_eq!(http.status, 200, "{}", http.text);
    let stats = &http.json()["cluster"];
    assert_eq!(stats["unanswered"], serde_json::json!([]));
    let by_node = stats["by_node"].as_object().unwrap();
    assert_eq!(
        by_node.keys().collect::<Vec<_>>(),
        ["n1", "n2", "n3"],
        "{stats}"
    );
    for figures in by_node.values() {
        assert_eq!(figures["online"], 1, "{stats}");
        assert_eq!(figures["connections"], 1, "{stats}");
        assert_eq!(figures["counters"]["logins"], 1, "{stats}");
    }
    assert_eq!(stats["counters"]["logins"], 3, "{stats}");
    assert_eq!(stats["connections"], 3, "{stats}");
    assert_eq!(stats["lingering"], 0, "{stats}");
    // Guild 7's members online, asked of n3 where neither is.
    let http = n3.gm("GET", "/v1/guilds/7/online", None).await;
    assert_eq!(http.status, 200, "{}", http.text);
    assert_eq!(http.json()["players"], serde_json::json!([1, 2]));
    // A guild line from n1, recalled through n3: both members are told.
    let line = say_seen(&mut a, ChatType::ChatGuild, "something rude", 0).await;
    assert_eq!(next_chat(&mut b).await.msg_id, line.msg_id);
    let http = n3
        .gm("DELETE", &format!("/v1/messages/{}", line.msg_id), None)
        .await;
    assert_eq!(http.status, 204, "{}", http.text);
    for p in [&mut a, &mut b] {
        loop {
            match next(p).await {
                ServerMsg::Recall(r) => {
                    assert_eq!(r.msg_id, line.msg_id);
                    break;
                }
                ServerMsg::Chat(_) => {}
                other => panic!("expected a recall, got {other:?}"),
            }
        }
    }
    // No node keeps it: n2's store has forgotten it, and a resume on n3
    // (from the stream) does not bring it back.
    let http = n2.gm("GET", "/v1/players/1/messages", None).await;
    assert_eq!(http.status, 200, "{}", http.text);
    assert_eq!(http.json()["messages"], serde_json::json!([]));
    let after = say_seen(&mut a, ChatType::ChatGuild, "sorry", 0).await;
    assert_eq!(next_chat(&mut b).await.msg_id, after.msg_id);
    drop(b);
    let mut b = n3.connect().await;
    let rep = b
        .login_from(&n3.token(2, "bob", 7, 0, 0), line.msg_id - 1)
        .await
        .unwrap();
    assert_eq!(rep.res, ResCode::ResOk as i32);
    assert_eq!(next_chat(&mut b).await.msg_id, after.msg_id);
    n1.until_located(2, "n3").await;
    // Disbanded through n1: the members on n1 and n3 both leave.
    let http = n1.logic("POST", "/v1/guilds/7/disband", None).await;
    assert_eq!(http.status, 200, "{}", http.text);
    assert_eq!(http.json()["players"], 2);
    for (node, user) in [(n1, 1), (n3, 2)] {
        let http = node.gm("GET", &format!("/v1/players/{user}"), None).await;
        assert_eq!(http.json()["guild"], 0, "{}", http.text);
    }
    let http = n2.gm("GET", "/v1/guilds/7/online", None).await;
    assert_eq!(http.json()["players"], serde_json::json!([]));
    drop((a, b, c));
    cl.stop().await;
}

/// A revocation made on one node refuses the player's older tokens on
/// every node, a node that joins later included; a token minted after it
/// logs in anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_on_one_node_refuses_old_tokens_on_every_node() {
    let cl = cluster().await;
    let [n1, n2, n3] = [&cl.nodes[0], &cl.nodes[1], &cl.nodes[2]];
    // Online on n2, so that every node can read the player; the session
    // already logged in stays.
    let mut online = n2.login(4, "dee", 0, 0, 0).await;
    cl.settled(&[(4, 1)]).await;
    let mut old = claims(4, "dee", 0, 0, 0);
    old.iat = Some(unix_now() - 60);
    let old = n1.mint(&old, guildchat_auth::TokenFormat::Jws);
    let r = n1.gm("POST", "/v1/players/4/revoke-tokens", None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let before_s = r.json()["before_s"].as_u64().unwrap();
    let n4 = TestServer::node(&cl.nats, "n4", Some(n1)).await;
    n4.until_located(4, "n2").await;
    for node in [n1, n2, n3, &n4] {
        until_json(node, "/v1/players/4", |j| {
            j["tokens_revoked_before_s"] == before_s
        })
        .await;
        let mut c = node.connect().await;
        let rep = c.login(&old).await.unwrap();
        assert_eq!(rep.res, ResCode::ResTokenRevoked as i32, "{}", node.admin);
    }
    say_seen(&mut online, ChatType::ChatWorld, "still here", 0).await;
    let mut fresh = claims(4, "dee", 0, 0, 0);
    fresh.iat = Some(before_s as i64);
    let fresh = n1.mint(&fresh, guildchat_auth::TokenFormat::Jws);
    let mut c = n3.connect().await;
    assert_eq!(c.login(&fresh).await.unwrap().res, ResCode::ResOk as i32);
    drop((c, online));
    n4.stop().await;
    cl.stop().await;
}

/// The word list edited through any node is the list of every node: an
/// add on n1 masks a line sent on n3, a remove on n2 lets it through on
/// every node again, and a replace on n3 leaves every node with exactly
/// the new list. A reload on a node leaves the shared list in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_word_list_edited_on_one_node_filters_on_every_node() {
    let cl = cluster().await;
    let [n1, n2, n3] = [&cl.nodes[0], &cl.nodes[1], &cl.nodes[2]];
    let mut a = n3.login(1, "ann", 7, 0, 0).await;
    let mut b = n1.login(2, "bob", 7, 0, 0).await;
    cl.settled(&[(1, 2), (2, 0)]).await;
    let listed = |words: serde_json::Value| move |j: &serde_json::Value| j["words"] == words;
    let r = n1
        .gm("POST", "/v1/filter/words", Some(r#"{"words": ["durian"]}"#))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["words"], serde_json::json!(["durian"]));
    for node in [n2, n3] {
        until_json(
            node,
            "/v1/filter/words",
            listed(serde_json::json!(["durian"])),
        )
        .await;
    }
    let line = say_seen(&mut a, ChatType::ChatGuild, "a D.U.R.I.A.N here", 0).await;
    let got = next_chat(&mut b).await;
    assert_eq!(
        (got.msg_id, got.strcontext.as_str()),
        (line.msg_id, "a *********** here")
    );
    // A reload on n3 does not bring back its file's list of old.
    let r = n3.gm("POST", "/v1/reload", None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        n3.gm("GET", "/v1/filter/words", None).await.json()["words"],
        serde_json::json!(["durian"])
    );
    // Removed through n2: gone everywhere.
    let r = n2
        .gm(
            "DELETE",
            "/v1/filter/words",
            Some(r#"{"words": ["durian"]}"#),
        )
        .await;
    assert_eq!(r.json()["words"], serde_json::json!([]), "{}", r.text);
    for node in [n1, n3] {
        until_json(node, "/v1/filter/words", listed(serde_json::json!([]))).await;
    }
    say_seen(&mut a, ChatType::ChatGuild, "durian again", 0).await;
    assert_eq!(next_chat(&mut b).await.strcontext, "durian again");
    // Replaced through n3: every node holds exactly the new list, the
    // words added through n1 before it gone.
    let r = n1
        .gm(
            "POST",
            "/v1/filter/words",
            Some(r#"{"words": ["kiwi", "lime"]}"#),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    until_json(
        n3,
        "/v1/filter/words",
        listed(serde_json::json!(["kiwi", "lime"])),
    )
    .await;
    let r = n3
        .gm(
            "PUT",
            "/v1/filter/words",
            Some(r#"{"words": ["mango", "kiwi"]}"#),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    for node in [n1, n2, n3] {
        until_json(
            node,
            "/v1/filter/words",
            listed(serde_json::json!(["kiwi", "mango"])),
        )
        .await;
    }
    // Each node keeps its copy in its own word file.
    let file = std::fs::read_to_string(n2.dir.path().join("filter_words.txt")).unwrap();
    assert!(file.contains("mango") && !file.contains("lime"), "{file}");
    drop((a, b));
    cl.stop().await;
}

/// A new cluster's list comes from the first node's word file; a node
/// that joins later takes the shared list, whatever its own file says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_nodes_word_file_seeds_the_shared_list() {
    let nats = Nats::start().await;
    let with_file = |words: &'static str| {
        move |c: &mut guildchat_server::Config| {
            std::fs::write(c.data_dir.join("filter_words.txt"), words).unwrap();
        }
    };
    let n1 = TestServer::node_with(&nats, "n1", None, with_file("papaya\nquince\n")).await;
    let n2 = TestServer::node_with(&nats, "n2", Some(&n1), with_file("rhubarb\n")).await;
    let both = |j: &serde_json::Value| j["words"] == serde_json::json!(["papaya", "quince"]);
    until_json(&n1, "/v1/filter/words", both).await;
    until_json(&n2, "/v1/filter/words", both).await;
    let file = std::fs::read_to_string(n2.dir.path().join("filter_words.txt")).unwrap();
    assert!(
        file.contains("papaya") && !file.contains("rhubarb"),
        "{file}"
    );
    n2.stop().await;
    n1.stop().await;
    drop(nats);
    // A first node with no words seeds an empty list: a later node's own
    // words are not in force either.
    let nats = Nats::start().await;
    let n1 = TestServer::node_with(&nats, "n1", None, with_file("")).await;
    let n2 = TestServer::node_with(&nats, "n2", Some(&n1), with_file("rhubarb\n")).await;
    until_json(&n2, "/v1/filter/words", |j| {
        j["words"] == serde_json::json!([])
    })
    .await;
    n2.stop().await;
    n1.stop().await;
    drop(nats);
}

/// Every node's admin actions are in one audit log that any node reads:
/// newest first, each naming the node that took it, paged by id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_nodes_admin_actions_are_in_one_audit_log() {
    let cl = cluster().await;
    let [n1, n2, n3] = [&cl.nodes[0], &cl.nodes[1], &cl.nodes[2]];
    let eve = n2.login(5, "eve", 0, 0, 0).await;
    cl.settled(&[(5, 1)]).await;
    let r = n1
        .gm(
            "PUT",
            "/v1/players/5/mute",
            Some(r#"{"seconds": 60, "reason": "spam"}"#),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = n2
        .gm("POST", "/v1/filter/words", Some(r#"{"words": ["yuzu"]}"#))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = n3.gm("POST", "/v1/players/5/kick", None).await;
    assert_eq!(r.status, 204, "{}", r.text);
    for node in [n1, n2, n3] {
        let page = node.gm("GET", "/v1/audit", None).await;
        assert_eq!(page.status, 200, "{}", page.text);
        let page = page.json();
        let entries = page["entries"].as_array().unwrap();
        let seen: Vec<(&str, &str)> = entries
            .iter()
            .map(|e| (e["node"].as_str().unwrap(), e["action"].as_str().unwrap()))
            .collect();
        assert_eq!(seen, [("n3", "kick"), ("n2", "filter-add"), ("n1", "mute")]);
        assert_eq!(entries[2]["reason"], "spam");
        let ids: Vec<u64> = entries.iter().map(|e| e["id"].as_u64().unwrap()).collect();
        assert!(ids.windows(2).all(|w| w[0] > w[1]), "{ids:?}");
        let next = node
            .gm("GET", &format!("/v1/audit?limit=1&before={}", ids[0]), None)
            .await
            .json();
        assert_eq!(next["entries"].as_array().unwrap().len(), 1, "{next}");
        assert_eq!(next["entries"][0]["id"], ids[1]);
    }
    drop(eve);
    cl.stop().await;
}
