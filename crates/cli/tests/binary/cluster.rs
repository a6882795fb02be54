//! Cluster mode with real processes: a real nats-server and `guildchat
//! serve --cluster` nodes as child processes, spoken to over real sockets
//! with the real protocol. The in-process cluster tests (the server
//! crate's `cluster.rs`) cover fan-out, takeovers and resumes; these cover
//! what only a process can do: die without a word (SIGKILL), or stop
//! answering for a while and come back (SIGSTOP, SIGCONT), and start from
//! the command line's flags alone.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use guildchat_auth::{KeyRing, Signer, TokenFormat};
use guildchat_client::{Client, ClientError, Event};
use guildchat_protocol::{close_code, ChatType, KickReason, ResCode, ServerMsg};
use rustix::process::{kill_process, Pid, Signal};

use crate::common::*;

/// A `guildchat serve --cluster` child process, killed when dropped (a
/// stopped one too: SIGKILL needs no SIGCONT), with its data dir.
struct Node {
    child: Child,
    dir: tempfile::TempDir,
    lines: Receiver<String>,
    /// Every log line read so far.
    log: Vec<String>,
    /// `ws://…`, once [`Node::ready`] has read it from the log.
    game: String,
    /// `http://…`, likewise.
    admin: String,
}

/// A node's config: no cooldowns (the tests send lines back to back), the
/// admin key the tests read with, and, for every node but the first, the
/// first node's development keys, so one token logs in anywhere.
fn node_config(keys: Option<&Node>) -> String {
    let mut text = String::new();
    for channel in ["scene", "guild", "world", "private", "team"] {
        text.push_str(&format!("[chat.{channel}]\ncooldown_ms = 0\n"));
    }
    if let Some(keys) = keys {
        let path = keys.dir.path().join("keys.toml");
        text.push_str(&format!(
            "[auth]\nkeys_file = {:?}\n",
            path.display().to_string()
        ));
    }
    text.push_str(&format!(
        "[[admin.keys]]\nid = \"read-1\"\nkey = \"{READ_KEY}\"\nscope = \"read\"\n"
    ));
    text
}

impl Node {
    /// Starts `guildchat serve --cluster <nats> --node-id <id>` on free
    /// ports and a fresh data dir, with `config` as its config file if
    /// given. Returns at once: [`Node::ready`] waits for it to listen, so
    /// several nodes can start side by side.
    fn spawn(nats: &Nats, id: &str, config: Option<String>) -> Node {
        Self::spawn_in(nats, id, config, tempfile::tempdir().unwrap())
    }

    /// [`Node::spawn`] on an existing data dir (a restart).
    fn spawn_in(nats: &Nats, id: &str, config: Option<String>, dir: tempfile::TempDir) -> Node {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_guildchat"));
        cmd.args(["serve", "--cluster", &nats.url, "--node-id", id])
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir.path());
        if let Some(text) = config {
            let path = dir.path().join("node.toml");
            std::fs::write(&path, text).unwrap();
            cmd.arg("--config").arg(path);
        }
        // Only the flags above configure the node.
        for var in [
            "GUILDCHAT_LISTEN",
            "GUILDCHAT_ADMIN_LISTEN",
            "GUILDCHAT_DATA_DIR",
            "GUILDCHAT_CONFIG",
            "GUILDCHAT_CLUSTER",
            "GUILDCHAT_NODE_ID",
            "GUILDCHAT_LOG_FORMAT",
        ] {
            cmd.env_remove(var);
        }
        let mut child = cmd
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        // Forwards every line, and keeps draining after the test stops
        // listening so the child never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Node {
            child,
            dir,
            lines,
            log: Vec::new(),
            game: String::new(),
            admin: String::new(),
        }
    }

    /// Waits until the node listens and reads its ports from its log (the
    /// admin line comes before the game line).
    fn ready(&mut self) {
        let game = self.wait_for("guildchat listening");
        let game = game.split("addr=").nth(1).unwrap().trim().to_owned();
        self.game = format!("ws://{game}");
        let admin = self
            .log
            .iter()
            .find_map(|l| l.split("admin listener on ").nth(1))
            .expect("an admin listener")
            .trim()
            .to_owned();
        self.admin = format!("http://{admin}");
    }

    /// Reads the log until a line contains `needle`, and returns it.
    fn wait_for(&mut self, needle: &str) -> String {
        crate::admin::wait_for_line(&self.lines, &mut self.log, needle, "node")
    }

    fn signal(&self, signal: Signal) {
        kill_process(Pid::from_child(&self.child), signal).unwrap();
    }

    /// SIGKILL, and reaps it.
    fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// The development keys this node generated in its data dir.
    fn ring(&self) -> KeyRing {
        let text = std::fs::read_to_string(self.dir.path().join("keys.toml")).unwrap();
        KeyRing::from_toml_str(&text).unwrap()
    }

    /// `GET /v1/players/<user>` on this node's admin API: the `state` it
    /// reports (`connected`, `lingering` or `offline`).
    async fn player_state(&self, user: u64) -> String {
        let url = format!("{}/v1/players/{user}", self.admin);
        let reply = http("GET", &url, Some(READ_KEY), None).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        reply.json()["state"].as_str().unwrap().to_owned()
    }

    /// The sessions this node itself holds (`/v1/stats` counts the node
    /// asked; `/v1/players` answers for the whole cluster).
    async fn online(&self) -> u64 {
        let url = format!("{}/v1/stats", self.admin);
        let reply = http("GET", &url, Some(READ_KEY), None).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        reply.json()["online"].as_u64().unwrap()
    }

    /// Polls the admin API until it reports the player in `want`.
    async fn until_state(&self, user: u64, want: &str) {
        let deadline = Instant::now() + WAIT;
        let mut last = String::new();
        for _ in 0..500 {
            last = self.player_state(user).await;
            if last == want || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(last, want, "player {user} on {}", self.admin);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// nats-server and nodes n1, n2, n3 (n2 and n3 with n1's keys), ready.
async fn three_nodes() -> (Nats, Node, Node, Node) {
    let nats = Nats::start().await;
    let mut n1 = Node::spawn(&nats, "n1", Some(node_config(None)));
    n1.ready();
    let mut n2 = Node::spawn(&nats, "n2", Some(node_config(Some(&n1))));
    let mut n3 = Node::spawn(&nats, "n3", Some(node_config(Some(&n1))));
    n2.ready();
    n3.ready();
    (nats, n1, n2, n3)
}

fn token(ring: &KeyRing, user: u64, guild: u64, team: u64, scene: u64) -> String {
    Signer::new(ring, TokenFormat::Jws, None)
        .unwrap()
        .mint(&claims(user, &format!("p{user}"), guild, team, scene))
}

async fn login(node: &Node, token: &str) -> Client {
    let mut c = Client::connect(&node.game).await.unwrap();
    let rep = c.login(token).await.unwrap();
    assert_eq!(rep.res, ResCode::ResOk as i32, "login on {}", node.game);
    c
}

/// Sends a line and reads until both its reply and its own echo (which
/// comes back through the stream, before or after the reply) have come,
/// skipping other lines. Returns the line's msg_id, or the refusal's code.
async fn try_say(c: &mut Client, channel: ChatType, text: &str, target: u64) -> Result<u64, i32> {
    c.send_chat(channel, text, target, "").await.unwrap();
    let mut echoes = Vec::new();
    let rep = loop {
        match next(c).await {
            ServerMsg::ChatRep(rep) => break rep,
            ServerMsg::Chat(n) => echoes.push(n.msg_id),
            _ => {}
        }
    };
    if rep.res != ResCode::ResOk as i32 {
        return Err(rep.res);
    }
    for _ in 0..1000 {
        if echoes.contains(&rep.msg_id) {
            break;
        }
        echoes.push(next_chat(c).await.msg_id);
    }
    let echoed = echoes.iter().filter(|id| **id == rep.msg_id).count();
    assert_eq!(echoed, 1, "one echo of {text}");
    Ok(rep.msg_id)
}

async fn say_seen(c: &mut Client, channel: ChatType, text: &str, target: u64) -> u64 {
    match try_say(c, channel, text, target).await {
        Ok(id) => id,
        Err(res) => panic!("{channel:?} {text}: refused with {res}"),
    }
}

/// A whisper from a node that may not have heard yet where its target is:
/// until its directory watch has, the whisper is refused as offline
/// (nothing is stored or published), so it is sent again until accepted.
/// Afterwards that node knows where the target is.
async fn whisper_once_located(c: &mut Client, to: u64, text: &str) -> u64 {
    let deadline = Instant::now() + WAIT;
    for _ in 0..500 {
        match try_say(c, ChatType::ChatPrivate, text, to).await {
            Ok(id) => return id,
            Err(res) if res == ResCode::ResTargetOffline as i32 && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(res) => panic!("whisper to {to} refused with {res}"),
        }
    }
    panic!("the sender's node never located player {to}");
}

/// Waits (at most `limit`) until the shared offline inbox holds at least
/// `n` whispers.
async fn until_inbox_holds(nats: &Nats, n: u64, limit: Duration) {
    let js = async_nats::jetstream::new(async_nats::connect(nats.url.as_str()).await.unwrap());
    let mut inbox = js.get_stream("GC_INBOX").await.unwrap();
    let deadline = Instant::now() + limit;
    while inbox.info().await.unwrap().state.messages < n {
        assert!(
            Instant::now() < deadline,
            "the inbox never held {n} whispers"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads until the connection ends, whichever way: a close frame, or a
/// reset from a process that died. Returns the close code, any kick reason
/// seen, and the msg_ids of the chat lines that came before the end.
async fn until_ended(c: &mut Client) -> (Option<u16>, Option<i32>, Vec<u64>) {
    let (mut kick, mut lines) = (None, Vec::new());
    for _ in 0..10_000 {
        match c.recv_timeout(Duration::from_secs(10)).await {
            Ok(Event::Closed(code)) => return (code, kick, lines),
            Ok(Event::Msg(ServerMsg::Kick(k))) => kick = Some(k.reason),
            Ok(Event::Msg(ServerMsg::Chat(n))) => lines.push(n.msg_id),
            Ok(Event::Msg(_)) => {}
            Err(ClientError::Ws(_) | ClientError::Io(_)) => return (None, kick, lines),
            Err(e) => panic!("expected the connection to end, got {e}"),
        }
    }
    panic!("the connection never ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_with_sigkill_loses_only_its_connections() {
    let (_nats, mut n1, n2, n3) = three_nodes().await;
    let ring = n1.ring();
    // The player, 2 (guild 5, scene 7), on n1; 1, a guildmate and
    // neighbour, on n2; 3, another guildmate, on n3, in a team the player
    // is not in. Whispers from 1 and 3 use both halves of the player's
    // whisper subjects (`w.1.2`, `w.2.3`).
    let player = || token(&ring, 2, 5, 0, 7);
    let mut p = login(&n1, &player()).await;
    let mut q = login(&n2, &token(&ring, 1, 5, 0, 7)).await;
    let mut r = login(&n3, &token(&ring, 3, 5, 9, 0)).await;
    // The player receives some lines: whispers from both other nodes (so
    // both know it is on n1) and a world line.
    let seen = [
        whisper_once_located(&mut q, 2, "hi from n2").await,
        whisper_once_located(&mut r, 2, "hi from n3").await,
        say_seen(&mut r, ChatType::ChatWorld, "world before", 0).await,
    ];
    let mut got = Vec::new();
    for _ in 0..seen.len() {
        got.push(next_chat(&mut p).await.msg_id);
    }
    assert_eq!(got, seen);
    let cursor = seen[2];

    n1.kill9();
    // The player's connection drops with the process: no close frame.
    let (code, kick, _) = until_ended(&mut p).await;
    assert_eq!((code, kick), (None, None), "a killed process says nothing");
    // While n1 is still live to n2 (its heartbeat ages out in 5 s), the
    // directory gives it a session: its silence is reported, not passed
    // over as a stopped node's.
    let stats = http(
        "GET",
        &format!("{}/v1/stats", n2.admin),
        Some(READ_KEY),
        None,
    )
    .await;
    let cluster = &stats.json()["cluster"];
    assert!(cluster["nodes"].get("n1").is_some(), "{}", stats.text);
    assert_eq!(
        cluster["unanswered"],
        serde_json::json!(["n1"]),
        "{}",
        stats.text
    );
    // A read of a guild on every node answers 503, naming the silent node.
    let url = format!("{}/v1/guilds/5/online", n2.admin);
    let online = http("GET", &url, Some(READ_KEY), None).await;
    assert_eq!(online.status, 503, "{}", online.text);
    assert!(online.text.contains("n1"), "{}", online.text);
    // n2 and n3 go on: every line of the player's conversations sent
    // meanwhile, from either node, is stored. The whispers are routed to
    // n1, where the directory still places the player.
    let missed = [
        say_seen(&mut q, ChatType::ChatWorld, "world after", 0).await,
        say_seen(&mut r, ChatType::ChatGuild, "guild after", 0).await,
        say_seen(&mut q, ChatType::ChatNormal, "scene after", 0).await,
        say_seen(&mut r, ChatType::ChatPrivate, "whisper from n3", 2).await,
        say_seen(&mut q, ChatType::ChatPrivate, "whisper from n2", 2).await,
    ];
    // And one the player is not in.
    say_seen(&mut r, ChatType::ChatTeam, "not yours", 0).await;

    let mut p = Client::connect(&n2.game).await.unwrap();
    let rep = p.login_from(&player(), cursor).await.unwrap();
    assert_eq!(rep.res, ResCode::ResOk as i32);
    assert!(!rep.replay_gap, "the stream had everything");
    assert_eq!(rep.replayed as usize, missed.len());
    let mut got = Vec::new();
    for _ in 0..missed.len() {
        got.push(next_chat(&mut p).await.msg_id);
    }
    assert_eq!(got, missed, "every missed line, once, in order");
    // Live traffic reaches it on n2, from both nodes, and nothing twice.
    let live = [
        say_seen(&mut r, ChatType::ChatGuild, "live from n3", 0).await,
        say_seen(&mut q, ChatType::ChatWorld, "live from n2", 0).await,
        say_seen(&mut r, ChatType::ChatPrivate, "found you on n2", 2).await,
    ];
    let mut got = Vec::new();
    for _ in 0..live.len() {
        got.push(next_chat(&mut p).await.msg_id);
    }
    assert_eq!(got, live);
    assert_silent(&mut p).await;
    // The other nodes' players never noticed.
    n2.until_state(2, "connected").await;
    n2.until_state(1, "connected").await;
    n3.until_state(3, "connected").await;
}

/// How long n1 stays stopped. The issue speaks of 30 s; what ends the old
/// session is n1 reading the directory change when it runs again, which
/// NATS holds for it however long the pause (its ping interval is two
/// minutes, and the little traffic here fills no socket buffer), so a
/// shorter pause shows the same thing. Run once with 30 s, this test
/// passed the same way; n1 also logged that its directory watch had
/// missed an idle heartbeat, and went on.
const PAUSE: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_paused_for_a_while_never_leaves_two_live_sessions() {
    let nats = Nats::start().await;
    let mut n1 = Node::spawn(&nats, "n1", Some(node_config(None)));
    n1.ready();
    let mut n2 = Node::spawn(&nats, "n2", Some(node_config(Some(&n1))));
    n2.ready();
    let ring = n1.ring();
    let mut old = login(&n1, &token(&ring, 1, 0, 0, 0)).await;
    let mut q = login(&n2, &token(&ring, 2, 0, 0, 0)).await;
    let seen = whisper_once_located(&mut q, 1, "hello").await;
    assert_eq!(next_chat(&mut old).await.msg_id, seen);

    n1.signal(Signal::STOP);
    let stopped = Instant::now();
    // Sent while the player's session is on a stopped node.
    let missed = say_seen(&mut q, ChatType::ChatWorld, "while n1 is stopped", 0).await;
    let mut during = vec![missed];
    // The player gives up on n1 and logs in on n2 with its cursor.
    let mut new = Client::connect(&n2.game).await.unwrap();
    let rep = new
        .login_from(&token(&ring, 1, 0, 0, 0), seen)
        .await
        .unwrap();
    assert_eq!(rep.res, ResCode::ResOk as i32);
    assert!(!rep.replay_gap);
    assert_eq!(rep.replayed, 1);
    assert_eq!(next_chat(&mut new).await.msg_id, missed);
    for i in 0..3 {
        let text = format!("on n2 {i}");
        let id = say_seen(&mut q, ChatType::ChatWorld, &text, 0).await;
        assert_eq!(next_chat(&mut new).await.msg_id, id);
        during.push(id);
    }
    n2.until_state(1, "connected").await;
    // The pause itself: a length of time, not a condition to wait for.
    tokio::time::sleep(PAUSE.saturating_sub(stopped.elapsed())).await;
    n1.signal(Signal::CONT);

    // n1 reads that n2 claimed the session later, and ends its own.
    let (code, kick, stale) = until_ended(&mut old).await;
    assert_eq!(kick, Some(KickReason::KickLoggedInElsewhere as i32));
    assert_eq!(code, Some(close_code::LOGGED_IN_ELSEWHERE));
    // n1 reads the line stream and the directory on separate feeds, so
    // the lines sent during the pause may reach the old connection before
    // its kick (some runs: all four, others: none), in order and once.
    assert!(during.starts_with(&stale), "{stale:?} of {during:?}");
    let deadline = Instant::now() + WAIT;
    while n1.online().await != 0 {
        assert!(Instant::now() < deadline, "n1 still holds a session");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The n2 session is the one left, and still hears everything once.
    n2.until_state(1, "connected").await;
    let id = say_seen(&mut q, ChatType::ChatWorld, "after the pause", 0).await;
    assert_eq!(next_chat(&mut new).await.msg_id, id);
    let id = say_seen(&mut q, ChatType::ChatPrivate, "still you?", 1).await;
    assert_eq!(next_chat(&mut new).await.msg_id, id);
    assert_silent(&mut new).await;
    assert_eq!(n1.online().await, 0);
    // Asked on n1, the admin API finds the session on n2.
    assert_eq!(n1.player_state(1).await, "connected");
    // And n1 works again: a player there hears n2 and is heard on n2.
    let mut z = login(&n1, &token(&ring, 3, 0, 0, 0)).await;
    let id = say_seen(&mut q, ChatType::ChatWorld, "to n1 again", 0).await;
    assert_eq!(next_chat(&mut z).await.msg_id, id);
    assert_eq!(next_chat(&mut new).await.msg_id, id);
    let id = say_seen(&mut z, ChatType::ChatWorld, "from n1 again", 0).await;
    assert_eq!(next_chat(&mut new).await.msg_id, id);
    assert_eq!(next_chat(&mut q).await.msg_id, id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_the_cluster_flags_alone_starts_a_working_node() {
    let nats = Nats::start().await;
    // No config file: the cluster comes from `--cluster` and `--node-id`.
    let mut node = Node::spawn(&nats, "solo", None);
    node.ready();
    node.wait_for("joined the cluster");
    let mut p = login(&node, &token(&node.ring(), 1, 0, 0, 0)).await;
    let id = say_seen(&mut p, ChatType::ChatWorld, "hello cluster", 0).await;
    // The line went through the cluster's stream: its msg_id is the id
    // base plus its place there times the id step (2^16), and the
    // directory names this node.
    let js = async_nats::jetstream::new(async_nats::connect(nats.url.as_str()).await.unwrap());
    let mut lines = js.get_stream("GC_LINES").await.unwrap();
    let state = &lines.info().await.unwrap().state;
    assert_eq!((state.messages, state.last_sequence), (1, 1));
    let meta = js.get_key_value("gc_meta").await.unwrap();
    let base = meta.get("id_base").await.unwrap().unwrap();
    let base: u64 = std::str::from_utf8(&base).unwrap().parse().unwrap();
    assert_eq!(id, base + (1 << 16));
    let sessions = js.get_key_value("gc_sessions").await.unwrap();
    let holder = sessions.get("u.1").await.unwrap().unwrap();
    assert_eq!(std::str::from_utf8(&holder).unwrap(), "solo\np1");
}

/// Whispers to a player whose node died: the ones sent before the others
/// noticed (routed to the dead node) and the first one after (kept as an
/// offline whisper) all wait in the shared inbox, and arrive once, in
/// order, at the player's next login on another node, without a cursor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whispers_to_a_dead_nodes_player_wait_for_its_next_login() {
    let (nats, mut n1, n2, n3) = three_nodes().await;
    let ring = n1.ring();
    let mut p = login(&n1, &token(&ring, 2, 0, 0, 0)).await;
    let mut r = login(&n3, &token(&ring, 3, 0, 0, 0)).await;
    let before = whisper_once_located(&mut r, 2, "before").await;
    assert_eq!(next_chat(&mut p).await.msg_id, before);
    n1.kill9();
    let _ = until_ended(&mut p).await;
    // Whispers sent on: at first n3 still places the player on n1 and
    // routes them there; once n1's heartbeat is missed, n3 keeps them as
    // offline whispers.
    let mut sent = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "n3 never noticed n1 died");
        let text = format!("whisper {}", sent.len());
        r.send_chat(ChatType::ChatPrivate, &text, 2, "")
            .await
            .unwrap();
        let rep = loop {
            if let ServerMsg::ChatRep(rep) = next(&mut r).await {
                break rep;
            }
        };
        assert_eq!(rep.res, ResCode::ResOk as i32);
        sent.push(rep.msg_id);
        if rep.offline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(sent.len() > 1, "some were routed to the dead node first");
    // All of them reach the inbox: the offline one at once, the others on
    // n3's next tick after it found n1 dead.
    until_inbox_holds(&nats, sent.len() as u64, Duration::from_secs(10)).await;
    let mut back = login(&n2, &token(&ring, 2, 0, 0, 0)).await;
    let mut got = Vec::new();
    while got.last() != sent.last() {
        assert!(got.len() <= sent.len(), "{got:?} for {sent:?}");
        got.push(next_chat(&mut back).await.msg_id);
    }
    // The whisper read on n1 just before it died may come again, first,
    // with its own msg_id (n3 cannot know it was read): the client has it
    // already and drops it.
    if got.first() == Some(&before) {
        got.remove(0);
    }
    assert_eq!(got, sent, "each once, in order");
    match back.recv_timeout(QUIET).await {
        Err(ClientError::Timeout) => {}
        other => panic!("expected nothing more, got {other:?}"),
    }
}

/// A node killed and started again at once under its id, before anyone
/// could find it dead: the whispers sent to its players just before went
/// down with it unread, and the senders' nodes, seeing it back with a new
/// start time, keep them in the shared inbox for the players' next login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whispers_to_a_node_that_restarts_at_once_wait_for_the_next_login() {
    let (nats, mut n1, n2, n3) = three_nodes().await;
    let ring = n1.ring();
    let mut p = login(&n1, &token(&ring, 2, 0, 0, 0)).await;
    let mut r = login(&n3, &token(&ring, 3, 0, 0, 0)).await;
    let before = whisper_once_located(&mut r, 2, "before").await;
    assert_eq!(next_chat(&mut p).await.msg_id, before);
    // The player stops reading; n1 dies with the next whisper unread.
    let unread = say_seen(&mut r, ChatType::ChatPrivate, "unread", 2).await;
    n1.kill9();
    drop(p);
    let dir = std::mem::replace(&mut n1.dir, tempfile::tempdir().unwrap());
    let mut n1 = Node::spawn_in(&nats, "n1", Some(node_config(None)), dir);
    n1.ready();
    // Within the 5 s a dead node takes to be noticed, n3 sees n1 back
    // with a new start time and moves the whisper to the inbox.
    until_inbox_holds(&nats, 1, Duration::from_secs(20)).await;
    let mut back = login(&n2, &token(&ring, 2, 0, 0, 0)).await;
    let mut got = Vec::new();
    while got.last() != Some(&unread) {
        assert!(got.len() < 3, "{got:?}");
        got.push(next_chat(&mut back).await.msg_id);
    }
    // The one read before may come again first, with its own msg_id.
    got.retain(|id| *id != before);
    assert_eq!(got, [unread]);
    drop(n1);
}
