//! Durability: a real server process is killed with SIGKILL mid-stream and
//! restarted on the same data dir. Every acknowledged message is in history
//! and no offline whisper is lost or duplicated.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use guildchat_auth::{KeyRing, Signer, TokenFormat};
use guildchat_client::Client;
use guildchat_protocol::{ChatType, ResCode, ServerMsg};

use crate::common::*;

/// A `guildchat serve` child process.
struct ServerProcess {
    child: Child,
    url: String,
}

impl ServerProcess {
    fn start(dir: &Path) -> ServerProcess {
        let config = dir.join("test.toml");
        std::fs::write(
            &config,
            "[chat.private]\ncooldown_ms = 0\nmax_chars = 200\n[chat.guild]\ncooldown_ms = 0\nmax_chars = 200\n",
        )
        .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_guildchat"))
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&config)
            .arg("--data-dir")
            .arg(dir)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads the log until the listening line, then keeps draining it so
        // the child never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("addr=").nth(1) {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr.trim().to_owned());
                    }
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("server did not start");
        ServerProcess {
            child,
            url: format!("ws://{addr}"),
        }
    }

    fn kill9(mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }
}

fn token(dir: &Path, user: u64, name: &str, guild: u64) -> String {
    let ring =
        KeyRing::from_toml_str(&std::fs::read_to_string(dir.join("keys.toml")).unwrap()).unwrap();
    Signer::new(&ring, TokenFormat::Jws, None)
        .unwrap()
        .mint(&claims(user, name, guild, 0, 0))
}

async fn login(url: &str, token: &str) -> Client {
    let mut c = Client::connect(url).await.unwrap();
    assert_eq!(c.login(token).await.unwrap().res, ResCode::ResOk as i32);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let first = ServerProcess::start(dir.path());
    let sender_token = token(dir.path(), 1, "sender", 10);
    let mut sender = login(&first.url, &sender_token).await;
    // Player 2 has logged in once (whispers to players never seen are
    // refused), and is away for the rest of the stream.
    login(&first.url, &token(dir.path(), 2, "two", 0))
        .await
        .close()
        .await;

    // Stream guild lines and whispers to player 2 (who is offline), keeping
    // every msg_id the server acknowledged.
    let acked_guild = Arc::new(Mutex::new(Vec::new()));
    let acked_whisper = Arc::new(Mutex::new(Vec::new()));
    let (g, w) = (acked_guild.clone(), acked_whisper.clone());
    let streaming = tokio::spawn(async move {
        for i in 0..100_000u32 {
            let (channel, to) = if i % 2 == 0 {
                (ChatType::ChatGuild, 0)
            } else {
                (ChatType::ChatPrivate, 2)
            };
            if sender
                .send_chat(channel, &format!("m{i}"), to, "")
                .await
                .is_err()
            {
                return;
            }
            let rep = loop {
                match sender.recv().await {
                    Ok(guildchat_client::Event::Msg(ServerMsg::ChatRep(r))) => break r,
                    Ok(guildchat_client::Event::Msg(_)) => {}
                    _ => return,
                }
            };
            if rep.res == ResCode::ResOk as i32 {
                let list = if channel == ChatType::ChatGuild {
                    &g
                } else {
                    &w
                };
                list.lock().unwrap().push(rep.msg_id);
            }
        }
    });
    // Kill it mid-stream.
    for _ in 0..3000 {
        if acked_guild.lock().unwrap().len() >= 150 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.kill9();
    let _ = tokio::time::timeout(Duration::from_secs(10), streaming).await;
    let acked_guild = acked_guild.lock().unwrap().clone();
    let acked_whisper = acked_whisper.lock().unwrap().clone();
    assert!(acked_guild.len() >= 150, "the stream ran");

    let second = ServerProcess::start(dir.path());
    // Every acknowledged guild line is in history, once.
    let mut reader = login(&second.url, &token(dir.path(), 3, "reader", 10)).await;
    let history = all_pages(&mut reader, ChatType::ChatGuild, 0, 100).await;
    let stored: HashSet<u64> = history.iter().copied().collect();
    assert_eq!(stored.len(), history.len(), "no duplicates in history");
    for id in &acked_guild {
        assert!(stored.contains(id), "acknowledged guild line {id} lost");
    }

    // Every acknowledged whisper is delivered to player 2, once.
    let two = token(dir.path(), 2, "two", 0);
    let mut player = login(&second.url, &two).await;
    let mut got = Vec::new();
    for m in player.heartbeat().await.unwrap() {
        if let ServerMsg::Chat(n) = m {
            got.push(n.msg_id);
        }
    }
    // The first reply came after the barrier ping; the pong to it is
    // processed before this second reply.
    assert!(player.heartbeat().await.unwrap().is_empty());
    let unique: HashSet<u64> = got.iter().copied().collect();
    assert_eq!(unique.len(), got.len(), "no whisper twice");
    for id in &acked_whisper {
        assert!(unique.contains(id), "acknowledged whisper {id} lost");
    }
    let mut sorted = got.clone();
    sorted.sort_unstable();
    assert_eq!(got, sorted, "whispers in order");

    // Delivered and confirmed: a crash now does not deliver them again.
    second.kill9();
    let third = ServerProcess::start(dir.path());
    let mut player = login(&third.url, &two).await;
    assert!(
        player.heartbeat().await.unwrap().is_empty(),
        "no whisper redelivered"
    );
    third.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_kill_9_is_answered_and_not_delivered_again() {
    let dir = tempfile::tempdir().unwrap();
    let first = ServerProcess::start(dir.path());
    let sender = token(dir.path(), 1, "sender", 10);
    let mut c = login(&first.url, &sender).await;
    c.send_chat_with_id(ChatType::ChatGuild, "exactly once", 0, "", 42)
        .await
        .unwrap();
    let rep = next_chat_rep(&mut c).await;
    assert_eq!(rep.res, ResCode::ResOk as i32);
    first.kill9();

    // The client never saw the reply (as far as it knows) and retries.
    let second = ServerProcess::start(dir.path());
    let mut listener = login(&second.url, &token(dir.path(), 3, "listener", 10)).await;
    let mut c = login(&second.url, &sender).await;
    c.send_chat_with_id(ChatType::ChatGuild, "exactly once", 0, "", 42)
        .await
        .unwrap();
    let retry = next_chat_rep(&mut c).await;
    assert_eq!(
        (retry.res, retry.msg_id),
        (ResCode::ResOk as i32, rep.msg_id),
        "the original result and msg_id"
    );
    assert_silent(&mut listener).await;
    let history = all_pages(&mut listener, ChatType::ChatGuild, 0, 100).await;
    assert_eq!(history, vec![rep.msg_id], "stored once");
    second.kill9();
}
