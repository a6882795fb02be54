//! Test harness: starts the real server on 127.0.0.1:0 with a fresh data
//! dir, mints tokens with the keys it generated, and gives tests protocol
//! clients that talk to it over real websockets.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use guildchat_auth::{Claims, KeyRing, Signer, TokenFormat};
use guildchat_client::{Client, Event};
use guildchat_protocol::{codec, pb, ChatType, ClientMsg, MsgType, ResCode, ServerMsg};
use guildchat_server::ids::UserId;
use guildchat_server::stats::Stats;
use guildchat_server::world::WorldHandle;
use guildchat_server::{Config, Server};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long a test waits for something that should arrive.
pub const WAIT: Duration = Duration::from_secs(5);
/// How long a test waits to be sure something does not arrive.
pub const QUIET: Duration = Duration::from_millis(300);

/// Admin API keys every test server accepts, one per scope.
pub const GM_KEY: &str = "gm-key-for-tests-0001";
pub const LOGIC_KEY: &str = "logic-key-for-tests-01";
pub const READ_KEY: &str = "read-key-for-tests-001";

pub struct TestServer {
    pub url: String,
    /// The admin API, `http://127.0.0.1:port`.
    pub admin: String,
    pub dir: tempfile::TempDir,
    pub world: WorldHandle,
    pub stats: Arc<Stats>,
    /// The cluster link, for a node.
    pub cluster: Option<guildchat_server::cluster::Cluster>,
    pub ring: KeyRing,
    shutdown: CancellationToken,
    join: JoinHandle<()>,
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A player's token claims, valid for an hour.
pub fn claims(user: u64, name: &str, guild: u64, team: u64, scene: u64) -> Claims {
    Claims {
        user_id: user,
        name: name.into(),
        exp: unix_now() + 3600,
        guild,
        team,
        scene,
        iat: Some(unix_now()),
        nbf: None,
        aud: vec!["guildchat".into()],
    }
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    /// Starts a server after letting the test adjust its config.
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> TestServer {
        Self::start_in(tempfile::tempdir().unwrap(), adjust).await
    }

    /// Starts a server for a test on a paused clock. The history store works
    /// on its own OS thread in real time, which a paused tokio clock would
    /// race (idle waits for a commit would fast-forward every timer), so
    /// timer tests run without it.
    pub async fn start_timed(adjust: impl FnOnce(&mut Config)) -> TestServer {
        Self::start_with(|c| {
            c.history.enabled = false;
            adjust(c);
        })
        .await
    }

    /// Starts a server on an existing data dir (a restart).
    pub async fn start_in(dir: tempfile::TempDir, adjust: impl FnOnce(&mut Config)) -> TestServer {
        let mut config = Config {
            data_dir: dir.path().to_owned(),
            ..Config::default()
        };
        // Tests open many connections from 127.0.0.1 at once; the per-IP
        // limits are tested on their own (admission.rs sets its own).
        config.admission.max_per_ip = 1_000_000;
        config.admission.logins_per_ip_per_sec = 1_000_000;
        config.admission.login_burst_per_ip = 1_000_000;
        config.admin.keys = [
            ("gm", GM_KEY, "gm"),
            ("logic", LOGIC_KEY, "logic"),
            ("read", READ_KEY, "read"),
        ]
        .into_iter()
        .map(|(id, key, scope)| {
            toml::from_str(&format!(
                "id = \"{id}\"\nkey = \"{key}\"\nscope = \"{scope}\"\n"
            ))
            .unwrap()
        })
        .collect();
        adjust(&mut config);
        let listener = guildchat_server::bind("127.0.0.1:0".parse().unwrap(), 128).unwrap();
        let url = format!("ws://{}", listener.local_addr().unwrap());
        let server = Server::start(config.clone()).await.unwrap();
        let ring = if config.auth.insecure_dev_auth {
            KeyRing::default()
        } else {
            let text = std::fs::read_to_string(config.keys_file()).unwrap();
            KeyRing::from_toml_str(&text).unwrap()
        };
        let world = server.world();
        let stats = server.stats();
        let cluster = server.cluster();
        let shutdown = CancellationToken::new();
        let admin_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = format!("http://{}", admin_listener.local_addr().unwrap());
        tokio::spawn(guildchat_server::admin::serve(
            admin_listener,
            server.admin(),
            shutdown.clone(),
        ));
        let join = tokio::spawn(futures_util::FutureExt::map(
            server.run(listener, shutdown.clone()),
            Result::unwrap,
        ));
        TestServer {
            url,
            admin,
            dir,
            world,
            stats,
            cluster,
            ring,
            shutdown,
            join,
        }
    }

    pub fn mint(&self, claims: &Claims, format: TokenFormat) -> String {
        Signer::new(&self.ring, format, None).unwrap().mint(claims)
    }

    pub fn token(&self, user: u64, name: &str, guild: u64, team: u64, scene: u64) -> String {
        self.mint(&claims(user, name, guild, team, scene), TokenFormat::Jws)
    }

    pub async fn connect(&self) -> Client {
        Client::connect(&self.url).await.unwrap()
    }

    /// Connects and logs in; panics unless the login succeeds.
    pub async fn login(&self, user: u64, name: &str, guild: u64, team: u64, scene: u64) -> Client {
        let mut c = self.connect().await;
        let rep = c
            .login(&self.token(user, name, guild, team, scene))
            .await
            .unwrap();
        assert_eq!(rep.res, ResCode::ResOk as i32, "login of {user}");
        c
    }

    /// Cancels the shutdown token and waits for `run` to return.
    pub async fn stop(self) {
        self.stop_keep_dir().await;
    }

    /// Waits for the server to stop by itself (a drain), without asking.
    pub async fn until_stopped(self) {
        tokio::time::timeout(Duration::from_secs(30), self.join)
            .await
            .expect("server did not stop by itself")
            .unwrap();
    }

    /// Stops the server and hands back its data dir, for a restart.
    pub async fn stop_keep_dir(self) -> tempfile::TempDir {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.join)
            .await
            .expect("server did not stop")
            .unwrap();
        self.dir
    }
}

/// The next server message, skipping nothing.
pub async fn next(c: &mut Client) -> ServerMsg {
    match c.recv_timeout(WAIT).await.unwrap() {
        Event::Msg(m) => m,
        Event::Closed(code) => panic!("closed ({code:?}) while waiting for a message"),
    }
}

/// The next chat notification, skipping replies and heartbeats.
pub async fn next_chat(c: &mut Client) -> pb::ChatMessageNotifyChat {
    loop {
        match next(c).await {
            ServerMsg::Chat(n) => return n,
            ServerMsg::ChatRep(_) | ServerMsg::HeartbeatRep(_) | ServerMsg::SetMaskRep(_) => {}
            other => panic!("expected a chat notification, got {other:?}"),
        }
    }
}

/// The next chat reply, skipping notifications.
pub async fn next_chat_rep(c: &mut Client) -> pb::ChatMessageChatRep {
    loop {
        match next(c).await {
            ServerMsg::ChatRep(r) => return r,
            ServerMsg::Chat(_) => {}
            other => panic!("expected a chat reply, got {other:?}"),
        }
    }
}

/// Sends a chat line and returns the reply.
pub async fn say(c: &mut Client, channel: ChatType, text: &str) -> pb::ChatMessageChatRep {
    say_to(c, channel, text, 0).await
}

/// Sends a chat line to `target` (a whisper's) and returns the reply.
pub async fn say_to(
    c: &mut Client,
    channel: ChatType,
    text: &str,
    target: u64,
) -> pb::ChatMessageChatRep {
    c.send_chat(channel, text, target, "").await.unwrap();
    next_chat_rep(c).await
}

/// Asserts nothing but pings arrives for a short while.
pub async fn assert_silent(c: &mut Client) {
    match c.recv_timeout(QUIET).await {
        Err(guildchat_client::ClientError::Timeout) => {}
        other => panic!("expected silence, got {other:?}"),
    }
}

/// Reads until the server closes; returns the close code and any kick
/// reason seen before it.
pub async fn expect_close(c: &mut Client) -> (Option<u16>, Option<i32>) {
    let mut kick = None;
    loop {
        // Longer than any server timer, so that with a paused clock the
        // server's deadline fires first.
        match c.recv_timeout(Duration::from_secs(60)).await {
            Ok(Event::Closed(code)) => return (code, kick),
            Ok(Event::Msg(ServerMsg::Kick(k))) => kick = Some(k.reason),
            Ok(Event::Msg(_)) => {}
            Err(e) => panic!("expected a close, got {e}"),
        }
    }
}

/// No cooldown on any channel, for tests that send many lines.
pub fn no_cooldowns(c: &mut Config) {
    for rule in [
        &mut c.chat.private,
        &mut c.chat.guild,
        &mut c.chat.world,
        &mut c.chat.scene,
        &mut c.chat.team,
    ] {
        rule.cooldown_ms = 0;
    }
}

/// Waits until the world sees the player without a connection (lingering).
pub async fn until_lingering(server: &TestServer, user: u64) {
    for _ in 0..500 {
        if server.world.backlog(UserId(user)).await.unwrap().is_none() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("player {user} never started lingering");
}

/// Requests one history page and returns the reply.
pub async fn page(
    c: &mut Client,
    channel: ChatType,
    group: u64,
    peer: u64,
    before: u64,
    limit: u32,
) -> pb::ChatMessageHistoryRep {
    let seq = c.next_seq();
    c.send(&ClientMsg::History(pb::ChatMessageHistoryReq {
        msghead: codec::head(MsgType::CchHistoryReq, seq),
        chattype: channel as i32,
        peerid: peer,
        before_msg_id: before,
        limit,
        groupid: group,
    }))
    .await
    .unwrap();
    loop {
        match next(c).await {
            ServerMsg::HistoryRep(rep) => {
                assert_eq!(rep.msghead.unwrap().seq, seq);
                return rep;
            }
            ServerMsg::Chat(_) | ServerMsg::ChatRep(_) => {}
            other => panic!("expected a history reply, got {other:?}"),
        }
    }
}

/// Pages back through a whole conversation; returns msg_ids oldest first.
pub async fn all_pages(c: &mut Client, channel: ChatType, peer: u64, limit: u32) -> Vec<u64> {
    let mut ids = Vec::new();
    let mut before = 0;
    for _ in 0..1000 {
        let rep = page(c, channel, 0, peer, before, limit).await;
        assert_eq!(rep.res, ResCode::ResOk as i32);
        assert!(rep.msgs.len() <= limit as usize);
        ids.extend(rep.msgs.iter().map(|m| m.msg_id));
        if !rep.has_more {
            ids.reverse();
            return ids;
        }
        before = rep.msgs.last().unwrap().msg_id;
    }
    panic!("history never ended");
}

/// An admin API answer.
#[derive(Debug)]
pub struct Http {
    pub status: u16,
    pub text: String,
}

impl Http {
    /// The body as JSON (panics if it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    /// The `error.code` of an error body.
    pub fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    }
}

impl TestServer {
    /// Calls the admin API over real HTTP with `key` as the bearer token.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<&str>,
    ) -> Http {
        http(
            method,
            &format!("{}{path}", self.admin),
            key,
            body.map(str::to_owned),
        )
        .await
    }

    /// Calls the admin API with the key of the scope the route needs.
    pub async fn gm(&self, method: &str, path: &str, body: Option<&str>) -> Http {
        self.call(method, path, Some(GM_KEY), body).await
    }

    pub async fn logic(&self, method: &str, path: &str, body: Option<&str>) -> Http {
        self.call(method, path, Some(LOGIC_KEY), body).await
    }
}

/// One HTTP request with a real HTTP client (on a blocking thread).
pub async fn http(method: &str, url: &str, key: Option<&str>, body: Option<String>) -> Http {
    let (method, url, key) = (method.to_owned(), url.to_owned(), key.map(str::to_owned));
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .allow_non_standard_methods(true)
            .build()
            .into();
        let mut req = ureq::http::Request::builder()
            .method(method.as_str())
            .uri(&url);
        if let Some(key) = key {
            req = req.header("Authorization", format!("Bearer {key}"));
        }
        if body.is_some() {
            req = req.header("Content-Type", "application/json");
        }
        let req = req.body(body.unwrap_or_default()).unwrap();
        let resp = agent.run(req).unwrap();
        let status = resp.status().as_u16();
        let text = resp.into_body().read_to_string().unwrap_or_default();
        Http { status, text }
    })
    .await
    .unwrap()
}

/// A real nats-server with JetStream, on a free loopback port, storing in
/// a temp dir; killed when dropped.
pub struct Nats {
    pub url: String,
    port: u16,
    dir: tempfile::TempDir,
    child: Option<std::process::Child>,
}

/// The nats-server binary: `GUILDCHAT_NATS_SERVER`, else the one
/// `scripts/nats-server` installs under the target dir, else `PATH`.
fn nats_binary() -> std::path::PathBuf {
    if let Some(path) = std::env::var_os("GUILDCHAT_NATS_SERVER") {
        return path.into();
    }
    let manifest = std::path::PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| manifest.join("../../target"));
    let installed = target.join("venv-nats/bin/nats-server");
    if installed.exists() {
        return installed;
    }
    "nats-server".into()
}

impl Nats {
    pub async fn start() -> Nats {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut nats = Nats {
            url: format!("nats://127.0.0.1:{port}"),
            port,
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        nats.restart().await;
        nats
    }

    /// Starts the server again on the same port and store (after `kill`).
    pub async fn restart(&mut self) {
        let child = std::process::Command::new(nats_binary())
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start nats-server ({e}); run scripts/nats-server to install it")
            });
        self.child = Some(child);
        // Ready once it answers a JetStream request, not merely accepts.
        for _ in 0..500 {
            if let Ok(client) = async_nats::connect(self.url.as_str()).await {
                let js = async_nats::jetstream::new(client);
                if js.query_account().await.is_ok() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("nats-server did not start");
    }

    /// Kills the server (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

impl TestServer {
    /// A cluster node on `nats`; with `keys`, it verifies tokens with that
    /// key file (another node's), as every node of a cluster must.
    pub async fn node(nats: &Nats, id: &str, keys: Option<&TestServer>) -> TestServer {
        Self::node_with(nats, id, keys, |_| {}).await
    }

    /// [`TestServer::node`], after letting the test adjust its config.
    pub async fn node_with(
        nats: &Nats,
        id: &str,
        keys: Option<&TestServer>,
        adjust: impl FnOnce(&mut Config),
    ) -> TestServer {
        let keys = keys.map(|k| k.dir.path().join("keys.toml"));
        Self::start_with(|c| {
            no_cooldowns(c);
            c.cluster.url = Some(nats.url.clone());
            c.cluster.node_id = Some(id.into());
            c.auth.keys_file = keys;
            adjust(c);
        })
        .await
    }

    /// Waits until this node sees the player's session on `node`.
    pub async fn until_located(&self, user: u64, node: &str) {
        for _ in 0..500 {
            let at = self.world.locate(UserId(user)).await.unwrap();
            if at.is_some_and(|n| &*n.0 == node) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("player {user} never showed up on {node}");
    }
}

/// A real PostgreSQL server on a free loopback port, its cluster in a temp
/// dir (fsync off: these tests kill it, they do not pull the power);
/// stopped when dropped. Run as the `postgres` user when the tests run as
/// root, which PostgreSQL refuses to run as.
pub struct Postgres {
    pub url: String,
    port: u16,
    dir: tempfile::TempDir,
    child: Option<std::process::Child>,
}

/// The directory of PostgreSQL's server programs: `GUILDCHAT_POSTGRES_BIN`
/// (what `scripts/postgres` prints), else the newest Debian install.
fn postgres_bin() -> std::path::PathBuf {
    if let Some(dir) = std::env::var_os("GUILDCHAT_POSTGRES_BIN") {
        return dir.into();
    }
    let mut found: Vec<std::path::PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dirs| {
            dirs.filter_map(|d| d.ok().map(|d| d.path().join("bin")))
                .filter(|bin| bin.join("initdb").exists())
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
        .pop()
        .expect("no PostgreSQL server found; run scripts/postgres to install it")
}

/// The uid and gid to run PostgreSQL as: the `postgres` user's when this
/// process is root, else none (run as ourselves).
fn postgres_ids() -> Option<(u32, u32)> {
    let id = |args: &[&str]| -> Option<u32> {
        let out = std::process::Command::new("id").args(args).output().ok()?;
        String::from_utf8(out.stdout).ok()?.trim().parse().ok()
    };
    if id(&["-u"])? != 0 {
        return None;
    }
    Some((
        id(&["-u", "postgres"]).expect("running as root needs a postgres user"),
        id(&["-g", "postgres"]).expect("running as root needs a postgres group"),
    ))
}

impl Postgres {
    pub async fn start() -> Postgres {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let ids = postgres_ids();
        if let Some((uid, gid)) = ids {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let mut initdb = std::process::Command::new(postgres_bin().join("initdb"));
        initdb
            .args([
                "-U",
                "guildchat",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-locale",
            ])
            .arg("-D")
            .arg(dir.path().join("data"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if let Some((uid, gid)) = ids {
            std::os::unix::process::CommandExt::uid(&mut initdb, uid);
            std::os::unix::process::CommandExt::gid(&mut initdb, gid);
        }
        let status = tokio::task::spawn_blocking(move || initdb.status())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success(), "initdb failed");
        let mut pg = Postgres {
            url: format!("postgres://guildchat@127.0.0.1:{port}/postgres"),
            port,
            dir,
            child: None,
        };
        pg.restart().await;
        pg
    }

    /// Starts the server again on the same port and data (after `kill`).
    pub async fn restart(&mut self) {
        let mut cmd = std::process::Command::new(postgres_bin().join("postgres"));
        cmd.arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "fsync=off"])
            .args(["-c", "max_connections=50"])
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                self.dir.path().display()
            ))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if let Some((uid, gid)) = postgres_ids() {
            std::os::unix::process::CommandExt::uid(&mut cmd, uid);
            std::os::unix::process::CommandExt::gid(&mut cmd, gid);
        }
        self.child = Some(cmd.spawn().expect("cannot start postgres"));
        for _ in 0..500 {
            if self.client().await.is_some() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("postgres did not start");
    }

    /// A connection of the test's own, to look at the tables.
    pub async fn client(&self) -> Option<tokio_postgres::Client> {
        let (client, connection) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .ok()?;
        tokio::spawn(connection);
        Some(client)
    }

    /// Stops the server at once, as a crash would (SIGQUIT: immediate
    /// shutdown, crash recovery at the next start), and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = std::process::Command::new("kill")
                .args(["-QUIT", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.kill();
    }
}
