//! `guildchat serve` with its admin listener, driven by `guildchat admin`
//! as a game master would: both are real child processes. Also SIGHUP
//! reload (no session dropped) and `--admin-listen off`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use guildchat_auth::{KeyRing, Signer, TokenFormat};
use guildchat_client::Client;
use guildchat_protocol::ResCode;

use crate::common::*;

const GM_KEY: &str = "gm-key-0123456789abcdef";
const LOGIC_KEY: &str = "logic-key-0123456789abcdef";

/// A `guildchat serve` child process whose log is read line by line.
struct Served {
    child: Child,
    lines: Receiver<String>,
    /// Every line read so far.
    log: Vec<String>,
    game: String,
    admin: Option<String>,
}

impl Served {
    fn start(dir: &Path, admin_listen: &str) -> Served {
        let config = dir.join("test.toml");
        std::fs::write(
            &config,
            format!(
                "[[admin.keys]]\nid = \"gm-1\"\nkey = \"{GM_KEY}\"\nscope = \"gm\"\n\
                 [[admin.keys]]\nid = \"logic-1\"\nkey = \"{LOGIC_KEY}\"\nscope = \"logic\"\n"
            ),
        )
        .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_guildchat"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                admin_listen,
            ])
            .arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(dir)
            .env("RUST_LOG", "info")
            .env_remove("GUILDCHAT_ADMIN_LISTEN")
            .env_remove("GUILDCHAT_LOG_FORMAT")
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
        let mut served = Served {
            child,
            lines,
            log: Vec::new(),
            game: String::new(),
            admin: None,
        };
        // The admin line comes before the game line, so once the game line
        // is in, the log says whether there is an admin listener.
        let game = served.wait_for("guildchat listening");
        served.game = game.split("addr=").nth(1).unwrap().trim().to_owned();
        served.admin = served
            .log
            .iter()
            .find_map(|l| l.split("admin listener on ").nth(1))
            .map(|a| format!("http://{}", a.trim()));
        served
    }

    /// Reads the log until a line contains `needle`, and returns it.
    fn wait_for(&mut self, needle: &str) -> String {
        wait_for_line(&self.lines, &mut self.log, needle, "server")
    }

    /// `guildchat admin --url <this server> --key <key> <args>`.
    fn admin(&self, key: &str, args: &[&str]) -> Output {
        let url = self.admin.as_deref().expect("admin listener on");
        Command::new(env!("CARGO_BIN_EXE_guildchat"))
            .args(["admin", "--url", url, "--key", key])
            .args(args)
            .env_remove("GUILDCHAT_ADMIN_URL")
            .env_remove("GUILDCHAT_ADMIN_KEY")
            .output()
            .unwrap()
    }

    fn url(&self) -> String {
        format!("ws://{}", self.game)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn token(dir: &Path, user: u64, name: &str) -> String {
    let ring =
        KeyRing::from_toml_str(&std::fs::read_to_string(dir.join("keys.toml")).unwrap()).unwrap();
    Signer::new(&ring, TokenFormat::Jws, None)
        .unwrap()
        .mint(&claims(user, name, 10, 0, 0))
}

async fn login(url: &str, token: &str) -> Client {
    let mut c = Client::connect(url).await.unwrap();
    assert_eq!(c.login(token).await.unwrap().res, ResCode::ResOk as i32);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_game_master_reads_and_is_refused_with_a_code() {
    let dir = tempfile::tempdir().unwrap();
    let server = Served::start(dir.path(), "127.0.0.1:0");
    let _player = login(&server.url(), &token(dir.path(), 7, "seven")).await;

    let out = server.admin(GM_KEY, &["stats", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stats: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(stats["online"], 1, "{stats}");

    let out = server.admin(GM_KEY, &["stats"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out)
            .lines()
            .any(|l| l.split_whitespace().eq(["online", "1"])),
        "{}",
        stdout(&out)
    );

    let out = server.admin(GM_KEY, &["who", "42"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not_found"), "{}", stderr(&out));
    assert!(out.stdout.is_empty());

    let out = server.admin("not-a-key-0123456789abcdef", &["stats"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("unauthorized"), "{}", stderr(&out));

    // Each key is held to its scope.
    let out = server.admin(LOGIC_KEY, &["kick", "7"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("forbidden"), "{}", stderr(&out));
    let out = server.admin(LOGIC_KEY, &["announce", "maintenance at noon", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let reply: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert!(reply["msg_id"].as_u64().unwrap() > 0, "{reply}");

    // A mute shows up in `who`.
    let out = server.admin(
        GM_KEY,
        &["mute", "7", "--seconds", "600", "--reason", "spam"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = server.admin(GM_KEY, &["who", "7"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let who = stdout(&out);
    assert!(who.contains("connected"), "{who}");
    assert!(who.contains("(in 9m") || who.contains("(in 10m"), "{who}");
}

#[test]
fn usage_errors_exit_2() {
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_guildchat"))
            .args(args)
            .env_remove("GUILDCHAT_ADMIN_URL")
            .env_remove("GUILDCHAT_ADMIN_KEY")
            .output()
            .unwrap()
    };
    let two_audiences = run(&[
        "admin", "--key", GM_KEY, "announce", "hi", "--guild", "1", "--team", "2",
    ]);
    assert_eq!(two_audiences.status.code(), Some(2));
    let https = run(&[
        "admin",
        "--url",
        "https://127.0.0.1:1",
        "--key",
        GM_KEY,
        "stats",
    ]);
    assert_eq!(https.status.code(), Some(2));
    assert!(stderr(&https).contains("http://"), "{}", stderr(&https));
    let no_key = run(&["admin", "stats"]);
    assert_eq!(no_key.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_keeps_every_session() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Served::start(dir.path(), "127.0.0.1:0");
    let mut player = login(&server.url(), &token(dir.path(), 5, "five")).await;

    let pid = rustix::process::Pid::from_child(&server.child);
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).unwrap();
    let line = server.wait_for("reload:");
    assert!(line.contains("keys") && line.contains("filter"), "{line}");

    // The process is still up, the admin API still answers, and the
    // session made before the reload still gets replies.
    assert!(server.child.try_wait().unwrap().is_none(), "server exited");
    let out = server.admin(GM_KEY, &["stats", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stats: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(stats["online"], 1, "{stats}");
    tokio::time::timeout(Duration::from_secs(10), player.heartbeat())
        .await
        .expect("heartbeat answered")
        .expect("still connected");
    // And a new login after it uses the reloaded keys.
    login(&server.url(), &token(dir.path(), 6, "six")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_listen_off_serves_only_the_game() {
    let dir = tempfile::tempdir().unwrap();
    let server = Served::start(dir.path(), "off");
    assert!(server.admin.is_none(), "{}", server.log.join("\n"));
    assert!(
        !server.log.iter().any(|l| l.contains("admin listener")),
        "{}",
        server.log.join("\n")
    );
    let mut player = login(&server.url(), &token(dir.path(), 1, "one")).await;
    player.heartbeat().await.unwrap();
}

#[test]
fn an_admin_address_in_use_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_guildchat"))
        .args(["serve", "--listen", "127.0.0.1:0", "--admin-listen", &addr])
        .arg("--data-dir")
        .arg(dir.path())
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("cannot bind the admin listener"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_public_admin_address_without_keys_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_guildchat"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "0.0.0.0:0",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("admin.listen"), "{}", stderr(&out));
}

/// Reads a child's log lines (kept in `log`) until one contains `needle`,
/// within 30 s, and returns it; panics with the log so far otherwise.
/// `who` names the child in the message.
pub fn wait_for_line(
    lines: &Receiver<String>,
    log: &mut Vec<String>,
    needle: &str,
    who: &str,
) -> String {
    if let Some(line) = log.iter().find(|l| l.contains(needle)) {
        return line.clone();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                log.push(line.clone());
                if line.contains(needle) {
                    return line;
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                panic!("no log line with `{needle}`; log:\n{}", log.join("\n"))
            }
            Err(RecvTimeoutError::Disconnected) => panic!(
                "the {who} exited before logging `{needle}`; log:\n{}",
                log.join("\n")
            ),
        }
    }
}
