//! Chat lines in PostgreSQL (`history.url`): a real PostgreSQL server, the
//! real game protocol and admin API, one server or three cluster nodes.

use guildchat_protocol::{ChatType, ResCode, ServerMsg};

use crate::common::*;

/// The msg_ids and texts in the database's `gc_lines`, oldest first.
async fn rows(pg: &Postgres) -> Vec<(u64, String)> {
    let db = pg.client().await.unwrap();
    db.query("SELECT msg_id, text FROM gc_lines ORDER BY msg_id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, i64>(0) as u64, r.get(1)))
        .collect()
}

/// A single server on the database at `url`.
async fn on_database(url: &str) -> TestServer {
    let url = url.to_owned();
    TestServer::start_with(move |c| {
        no_cooldowns(c);
        c.history.url = Some(url);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_are_kept_in_the_database_and_outlive_the_data_dir() {
    let pg = Postgres::start().await;
    let server = on_database(&pg.url).await;
    let mut a = server.login(1, "ann", 5, 0, 0).await;
    let mut sent = Vec::new();
    for text in ["one", "two", "a\0b"] {
        let rep = say(&mut a, ChatType::ChatGuild, text).await;
        assert_eq!(rep.res, ResCode::ResOk as i32, "{text:?}");
        sent.push(rep.msg_id);
    }
    // Acknowledged means in the database: the reply waited for it. A NUL,
    // which PostgreSQL's text cannot hold, is kept as U+FFFD rather than
    // failing the batch.
    let expected: Vec<(u64, String)> = sent
        .iter()
        .zip(["one", "two", "a\u{FFFD}b"])
        .map(|(id, t)| (*id, t.to_owned()))
        .collect();
    assert_eq!(rows(&pg).await, expected);
    // Not in the data dir's file.
    let file = rusqlite::Connection::open(server.dir.path().join("history.sqlite3")).unwrap();
    let in_file: i64 = file
        .query_row("SELECT COUNT(*) FROM messages", [], |r| r.get(0))
        .unwrap();
    assert_eq!(in_file, 0);
    // Pages come from the database, newest first.
    let rep = page(&mut a, ChatType::ChatGuild, 0, 0, 0, 10).await;
    assert_eq!(rep.res, ResCode::ResOk as i32);
    let paged: Vec<u64> = rep.msgs.iter().map(|m| m.msg_id).collect();
    assert_eq!(paged, sent.iter().rev().copied().collect::<Vec<_>>());
    assert_eq!(rep.msgs[0].strcontext, "a\u{FFFD}b");
    drop(a);
    server.stop().await;

    // A line far above the clock's ids, as another server on this
    // database may have written: a server starting on it must hand out
    // ids above it, or a page would meet the same id twice.
    let high: i64 = 1 << 60;
    let elsewhere = |id: i64, text: &'static str| {
        let (pg, first) = (&pg, sent[0] as i64);
        async move {
            pg.client()
                .await
                .unwrap()
                .execute(
                    "INSERT INTO gc_lines SELECT $1, conv_kind, conv_id, conv_id2, chattype, \
                     sender_id, sender_name, $3, time_ms, guild_id, team_id, scene_id, \
                     target_id, target_name, 0 FROM gc_lines WHERE msg_id = $2",
                    &[&id, &first, &text],
                )
                .await
                .unwrap();
        }
    };
    elsewhere(high, "from elsewhere").await;
    // A new server with a new, empty data dir finds everything there.
    let server = on_database(&pg.url).await;
    let mut b = server.login(2, "bob", 5, 0, 0).await;
    let rep = page(&mut b, ChatType::ChatGuild, 0, 0, 0, 10).await;
    let paged: Vec<u64> = rep.msgs.iter().map(|m| m.msg_id).collect();
    let mut want = vec![high as u64];
    want.extend(sent.iter().rev());
    assert_eq!(paged, want);
    // Another writer takes the id this server hands out next (as two
    // cluster nodes cut off from NATS at once may): the line is refused,
    // not acknowledged over the other one, which stays as it was.
    elsewhere(high + 1, "taken").await;
    let rep = say(&mut b, ChatType::ChatGuild, "collides").await;
    assert_eq!(rep.res, ResCode::ResStoreFailed as i32);
    let rep = say(&mut b, ChatType::ChatGuild, "later").await;
    assert_eq!(rep.res, ResCode::ResOk as i32);
    assert!(
        rep.msg_id > high as u64 + 1,
        "{} is not above {}",
        rep.msg_id,
        high + 1
    );
    let newest: Vec<(u64, String)> = rows(&pg).await.split_off(sent.len());
    assert_eq!(
        newest,
        [
            (high as u64, "from elsewhere".to_owned()),
            (high as u64 + 1, "taken".to_owned()),
            (rep.msg_id, "later".to_owned()),
        ]
    );
    drop(b);
    server.stop().await;
}

/// `/readyz`'s status and its `database` state.
async fn readiness(server: &TestServer) -> (u16, String) {
    let ready = http("GET", &format!("{}/readyz", server.admin), None, None).await;
    let state = ready.json()["database"]["state"]
        .as_str()
        .unwrap_or("absent")
        .to_owned();
    (ready.status, state)
}

/// Polls `/readyz` until it answers 200 with the database ok.
async fn until_ready(server: &TestServer) {
    for _ in 0..500 {
        if readiness(server).await == (200, "ok".to_owned()) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("/readyz never said ready: {:?}", readiness(server).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_database_a_line_is_refused_and_nothing_acknowledged_is_lost() {
    let mut pg = Postgres::start().await;
    let server = on_database(&pg.url).await;
    until_ready(&server).await;
    let mut a = server.login(1, "ann", 0, 0, 0).await;
    let mut b = server.login(2, "bob", 0, 0, 0).await;
    let kept = say(&mut a, ChatType::ChatWorld, "kept").await;
    assert_eq!(kept.res, ResCode::ResOk as i32);

    pg.kill();
    // The first line finds the database gone (its listeners may hear it).
    let refused = say(&mut a, ChatType::ChatWorld, "not kept").await;
    assert_eq!(refused.res, ResCode::ResStoreFailed as i32);
    assert_eq!(readiness(&server).await, (503, "degraded".to_owned()));
    // Once it is known to be gone, a line is refused before anyone hears
    // it.
    let early = say(&mut a, ChatType::ChatWorld, "refused at once").await;
    assert_eq!(early.res, ResCode::ResStoreFailed as i32);

    // Back without any traffic: the server tries again on its own.
    pg.restart().await;
    until_ready(&server).await;
    let after = say(&mut a, ChatType::ChatWorld, "after").await;
    assert_eq!(after.res, ResCode::ResOk as i32);
    let ids: Vec<u64> = rows(&pg).await.into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, [kept.msg_id, after.msg_id]);
    let mut heard = Vec::new();
    loop {
        let line = next_chat(&mut b).await;
        heard.push(line.strcontext);
        if line.msg_id == after.msg_id {
            break;
        }
    }
    assert!(!heard.iter().any(|t| t == "refused at once"), "{heard:?}");
    assert_eq!(heard.first().map(String::as_str), Some("kept"));
    drop(b);
    let rep = page(&mut a, ChatType::ChatWorld, 0, 0, 0, 10).await;
    let paged: Vec<u64> = rep.msgs.iter().map(|m| m.msg_id).collect();
    assert_eq!(paged, [after.msg_id, kept.msg_id]);
    drop(a);
    server.stop().await;
}

/// Reads until a recall notice for `msg_id`, skipping chat lines.
async fn until_recalled(c: &mut guildchat_client::Client, msg_id: u64) {
    loop {
        match next(c).await {
            ServerMsg::Recall(r) => {
                assert_eq!(r.msg_id, msg_id);
                return;
            }
            ServerMsg::Chat(_) | ServerMsg::ChatRep(_) => {}
            other => panic!("expected a recall, got {other:?}"),
        }
    }
}

/// The next chat reply, after checking it is OK; the player's own echo
/// may come before or after it.
async fn said(c: &mut guildchat_client::Client, channel: ChatType, text: &str) -> u64 {
    c.send_chat(channel, text, 0, "").await.unwrap();
    loop {
        if let ServerMsg::ChatRep(rep) = next(c).await {
            assert_eq!(rep.res, ResCode::ResOk as i32, "{text}");
            return rep.msg_id;
        }
    }
}

/// Reads chat lines until one with `msg_id`.
async fn until_heard(c: &mut guildchat_client::Client, msg_id: u64) {
    for _ in 0..100 {
        if next_chat(c).await.msg_id == msg_id {
            return;
        }
    }
    panic!("line {msg_id} never arrived");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_sharing_a_database_write_each_line_once_and_recall_it_everywhere() {
    let nats = Nats::start().await;
    let pg = Postgres::start().await;
    let url = pg.url.clone();
    let with_db = |c: &mut guildchat_server::Config| c.history.url = Some(url.clone());
    let n1 = TestServer::node_with(&nats, "n1", None, with_db).await;
    let n2 = TestServer::node_with(&nats, "n2", Some(&n1), with_db).await;
    let n3 = TestServer::node_with(&nats, "n3", Some(&n1), with_db).await;
    // Every row any node offers the table, duplicates included: a BEFORE
    // trigger sees each one before the key turns a repeat away.
    pg.client()
        .await
        .unwrap()
        .batch_execute(
            "CREATE TABLE attempts (msg_id BIGINT NOT NULL);
             CREATE FUNCTION note_attempt() RETURNS trigger AS $$
             BEGIN INSERT INTO attempts VALUES (NEW.msg_id); RETURN NEW; END $$
             LANGUAGE plpgsql;
             CREATE TRIGGER note_attempt BEFORE INSERT ON gc_lines
             FOR EACH ROW EXECUTE FUNCTION note_attempt();",
        )
        .await
        .unwrap();
    let mut a = n1.login(1, "ann", 7, 0, 0).await;
    let mut b = n2.login(2, "bob", 7, 0, 0).await;
    let mut c = n3.login(3, "cid", 7, 0, 0).await;
    for node in [&n1, &n2, &n3] {
        for (user, at) in [(1, "n1"), (2, "n2"), (3, "n3")] {
            node.until_located(user, at).await;
        }
    }
    let one = said(&mut a, ChatType::ChatGuild, "one").await;
    let two = said(&mut b, ChatType::ChatGuild, "two").await;
    // The sender's own echo may have come before its reply.
    for p in [&mut a, &mut c] {
        until_heard(p, two).await;
    }
    // Each line once, by the node that sent it (all three delivered it).
    assert_eq!(
        rows(&pg).await,
        [(one, "one".to_owned()), (two, "two".to_owned())]
    );
    // A page on the third node, from the database.
    let rep = page(&mut c, ChatType::ChatGuild, 0, 0, 0, 10).await;
    assert_eq!(rep.res, ResCode::ResOk as i32);
    let paged: Vec<u64> = rep.msgs.iter().map(|m| m.msg_id).collect();
    assert_eq!(paged, [two, one]);
    // Recalled through n3, where neither sender is, while n2 does not
    // answer: a 503 naming it, and the line stays in the database so that
    // a retry still knows whom to tell.
    n2.cluster.as_ref().unwrap().silence_calls(true);
    let http = n3.gm("DELETE", &format!("/v1/messages/{one}"), None).await;
    assert_eq!(http.status, 503, "{}", http.text);
    assert!(http.text.contains("n2"), "{}", http.text);
    for p in [&mut a, &mut c] {
        until_recalled(p, one).await;
    }
    assert_eq!(rows(&pg).await.len(), 2);
    // The retry: every member is told on every node, and the database
    // forgets it.
    n2.cluster.as_ref().unwrap().silence_calls(false);
    let http = n3.gm("DELETE", &format!("/v1/messages/{one}"), None).await;
    assert_eq!(http.status, 204, "{}", http.text);
    for p in [&mut a, &mut b, &mut c] {
        until_recalled(p, one).await;
    }
    assert_eq!(rows(&pg).await, [(two, "two".to_owned())]);
    let http = n2.gm("GET", "/v1/players/1/messages", None).await;
    assert_eq!(http.status, 200, "{}", http.text);
    assert_eq!(http.json()["messages"], serde_json::json!([]));
    let http = n1.gm("GET", "/v1/players/2/messages", None).await;
    assert_eq!(http.json()["messages"][0]["msg_id"], two, "{}", http.text);
    // An announcement to everyone is kept once too.
    let http = n2
        .logic(
            "POST",
            "/v1/announce",
            Some(r#"{"text":"maintenance soon"}"#),
        )
        .await;
    assert!(http.status < 300, "{}", http.text);
    let announced = http.json()["msg_id"].as_u64().unwrap();
    until_heard(&mut a, announced).await;
    let mut found = false;
    for _ in 0..250 {
        if rows(&pg).await.len() == 2 {
            found = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(found, "the announcement never reached the database");
    // Written once each, by the node that sent it, though three nodes
    // delivered each of them.
    let offered: Vec<(i64, i64)> = pg
        .client()
        .await
        .unwrap()
        .query(
            "SELECT msg_id, COUNT(*) FROM attempts GROUP BY msg_id ORDER BY msg_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        offered,
        [(one as i64, 1), (two as i64, 1), (announced as i64, 1)]
    );
    assert_eq!(
        rows(&pg).await,
        [
            (two, "two".to_owned()),
            (announced, "maintenance soon".to_owned())
        ]
    );
    drop((a, b, c));
    for node in [n1, n2, n3] {
        node.stop().await;
    }
}

/// A node's counter `name` from `/v1/stats`.
async fn counter(node: &TestServer, name: &str) -> u64 {
    let stats = node.gm("GET", "/v1/stats", None).await.json();
    stats["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("{name}: {stats}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_database_a_node_reads_only_its_players_groups() {
    let nats = Nats::start().await;
    let pg = Postgres::start().await;
    let url = pg.url.clone();
    let with_db = |c: &mut guildchat_server::Config| c.history.url = Some(url.clone());
    let n1 = TestServer::node_with(&nats, "n1", None, with_db).await;
    let n2 = TestServer::node_with(&nats, "n2", Some(&n1), with_db).await;
    let mut a = n1.login(1, "ann", 7, 0, 3).await;
    let mut b = n2.login(2, "bob", 8, 0, 4).await;
    for node in [&n1, &n2] {
        for (user, at) in [(1, "n1"), (2, "n2")] {
            node.until_located(user, at).await;
        }
    }
    let before = counter(&n2, "bus_lines").await;
    // Guild 7 has nobody on n2: n2 does not read its line.
    let g7 = said(&mut a, ChatType::ChatGuild, "guild seven").await;
    let w = said(&mut a, ChatType::ChatWorld, "world").await;
    until_heard(&mut b, w).await;
    assert!(g7 < w);
    assert_eq!(counter(&n2, "bus_lines").await, before + 1);
    assert!(counter(&n2, "line_resyncs").await >= 1);

    // bob joins guild 7 on n2 while n2's reader is held with lines in
    // flight: whatever the reader had read under the old filters is read
    // again, so bob gets every line after the join, in order, each once.
    n2.cluster.as_ref().unwrap().hold_feed(true);
    let w0 = said(&mut a, ChatType::ChatWorld, "before the join").await;
    let http = n2
        .logic("PUT", "/v1/players/2/groups", Some(r#"{"guild": 7}"#))
        .await;
    assert!(http.status < 300, "{}", http.text);
    let g7b = said(&mut a, ChatType::ChatGuild, "welcome").await;
    let w2 = said(&mut a, ChatType::ChatWorld, "after the join").await;
    n2.cluster.as_ref().unwrap().hold_feed(false);
    let mut heard = Vec::new();
    while heard.last() != Some(&w2) {
        heard.push(next_chat(&mut b).await.msg_id);
    }
    assert_eq!(heard, [w0, g7b, w2]);
    drop((a, b));
    n2.stop().await;
    n1.stop().await;
}
