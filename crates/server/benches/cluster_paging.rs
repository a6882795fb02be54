//! Cluster history: a page read straight from the JetStream line stream
//! against the same page from a node's local SQLite copy of it, the choice
//! ARCHITECTURE.md explains (each node materialises the stream).
//!
//! Run: `GUILDCHAT_NATS_SERVER="$(scripts/nats-server)" cargo bench -p
//! guildchat-server --bench cluster_paging` (without the variable it looks
//! for `nats-server` on the PATH). It starts its own nats-server with
//! JetStream on a free loopback port, in a temporary directory.
//!
//! Both sides hold the same 100,000 lines: 10 guilds of 10,000 each,
//! interleaved as busy guilds write, one subject per guild as in the
//! cluster (`gc.line.guild.<id>`). JetStream reads forward only (an ordered
//! consumer from a start sequence, filtered to the guild's subject), so a
//! page of older lines before a cursor is a scan of the subject from its
//! start; a page after a cursor, as a resume reads, is a read of 50.
//! The stream's payloads are not decoded, which favours the stream side.

// Bench code: a failed unwrap is a failed run.
#![allow(clippy::unwrap_used)]

use std::collections::VecDeque;
use std::hint::black_box;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use futures_util::StreamExt;
use guildchat_server::history::{Conversation, HistoryConfig, HistoryHandle, StoredMsg};
use tokio::runtime::Runtime;

const GUILDS: u64 = 10;
const PER_GUILD: u64 = 10_000;
const PAGE: usize = 50;
/// The guild whose pages are read.
const GUILD: u64 = 3;

fn line(msg_id: u64) -> StoredMsg {
    let guild = msg_id % GUILDS;
    StoredMsg {
        msg_id,
        conversation: Conversation::Guild(guild),
        chattype: 3,
        sender_id: 42,
        sender_name: "Ann".into(),
        text: format!("message {msg_id}: anyone up for the raid tonight?"),
        time_ms: 1_700_000_000_000 + msg_id,
        guild_id: guild,
        team_id: 0,
        scene_id: 0,
        target_id: 0,
        target_name: String::new(),
        nonce: 0,
    }
}

/// A nats-server child, killed when dropped, with its store directory.
struct Nats {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Nats {
    fn start() -> Nats {
        let binary =
            std::env::var("GUILDCHAT_NATS_SERVER").unwrap_or_else(|_| "nats-server".into());
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new(&binary)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {binary} (see scripts/nats-server): {e}"));
        Nats {
            child,
            url: format!("nats://127.0.0.1:{port}"),
            _dir: dir,
        }
    }

    async fn connect(&self) -> async_nats::Client {
        for _ in 0..500 {
            if let Ok(c) = async_nats::connect(&self.url).await {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("nats-server did not start at {}", self.url);
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The stream with every line, and the stream sequence of each line of
/// [`GUILD`], oldest first.
async fn fill_stream(js: &jetstream::Context) -> (stream::Stream, Vec<u64>) {
    let stream = js
        .get_or_create_stream(stream::Config {
            name: "GC_LINES".into(),
            subjects: vec!["gc.line.>".into()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut seqs = Vec::new();
    let total = GUILDS * PER_GUILD;
    for chunk in (1..=total).collect::<Vec<_>>().chunks(1000) {
        let mut acks = Vec::with_capacity(chunk.len());
        for &id in chunk {
            let m = line(id);
            let payload = Bytes::from(format!("{}|{}|{}", m.msg_id, m.sender_name, m.text));
            let subject = format!("gc.line.guild.{}", m.guild_id);
            acks.push((id, js.publish(subject, payload).await.unwrap()));
        }
        for (id, ack) in acks {
            let seq = ack.await.unwrap().sequence;
            if id % GUILDS == GUILD {
                seqs.push(seq);
            }
        }
    }
    (stream, seqs)
}

/// Up to `PAGE` lines of the guild's subject from `start` on, in order.
async fn read_after(stream: &stream::Stream, start: u64) -> Vec<Bytes> {
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: format!("gc.line.guild.{GUILD}"),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start,
            },
            ..Default::default()
        })
        .await
        .unwrap();
    let name = consumer.cached_info().name.clone();
    let mut msgs = consumer.messages().await.unwrap().take(PAGE);
    let mut page = Vec::with_capacity(PAGE);
    while let Some(m) = msgs.next().await {
        page.push(m.unwrap().payload.clone());
    }
    // As the server does: a reader is deleted once read.
    stream.delete_consumer(&name).await.unwrap();
    page
}

/// The `PAGE` lines of the guild's subject just before sequence `before`:
/// a forward scan from the subject's first line.
async fn scan_before(stream: &stream::Stream, before: u64) -> Vec<Bytes> {
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: format!("gc.line.guild.{GUILD}"),
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .unwrap();
    let name = consumer.cached_info().name.clone();
    let mut msgs = consumer.messages().await.unwrap();
    let mut last = VecDeque::with_capacity(PAGE + 1);
    while let Some(m) = msgs.next().await {
        let m = m.unwrap();
        let info = m.info().unwrap();
        if info.stream_sequence >= before {
            break;
        }
        last.push_back(m.payload.clone());
        if last.len() > PAGE {
            last.pop_front();
        }
        if info.pending == 0 {
            break;
        }
    }
    stream.delete_consumer(&name).await.unwrap();
    last.into()
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

fn pages(c: &mut Criterion) {
    let rt = runtime();
    let nats = Nats::start();
    let (stream, seqs) = rt.block_on(async {
        let client = nats.connect().await;
        fill_stream(&jetstream::new(client)).await
    });
    assert_eq!(seqs.len() as u64, PER_GUILD);

    let dir = tempfile::tempdir().unwrap();
    let config = HistoryConfig {
        prune_interval_secs: 24 * 3600,
        ..HistoryConfig::default()
    };
    let (store, _, _threads) = HistoryHandle::open(dir.path(), config).unwrap();
    rt.block_on(async {
        for chunk in (1..=GUILDS * PER_GUILD).collect::<Vec<_>>().chunks(2000) {
            let waiters: Vec<_> = chunk
                .iter()
                .map(|&id| store.append(line(id)).unwrap())
                .collect();
            for w in waiters {
                w.await.unwrap().unwrap();
            }
        }
    });
    let conv = Conversation::Guild(GUILD);
    // The guild's middle line, by msg_id (SQLite) and by sequence (stream).
    let middle = (PER_GUILD / 2) as usize;
    let middle_id = GUILD + GUILDS * middle as u64;

    let mut group = c.benchmark_group("cluster_page_50");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    group.bench_function("sqlite_newest", |b| {
        b.iter(|| {
            let (page, _) = rt.block_on(store.page(conv, 0, PAGE as u32)).unwrap();
            assert_eq!(page.len(), PAGE);
            black_box(page)
        })
    });
    group.bench_function("sqlite_before_middle", |b| {
        b.iter(|| {
            let (page, _) = rt
                .block_on(store.page(conv, middle_id, PAGE as u32))
                .unwrap();
            assert_eq!(page.len(), PAGE);
            black_box(page)
        })
    });
    group.bench_function("jetstream_after_middle", |b| {
        b.iter(|| {
            let page = rt.block_on(read_after(&stream, seqs[middle]));
            assert_eq!(page.len(), PAGE);
            black_box(page)
        })
    });
    group.bench_function("jetstream_scan_newest", |b| {
        b.iter(|| {
            let page = rt.block_on(scan_before(&stream, u64::MAX));
            assert_eq!(page.len(), PAGE);
            black_box(page)
        })
    });
    group.bench_function("jetstream_scan_before_middle", |b| {
        b.iter(|| {
            let page = rt.block_on(scan_before(&stream, seqs[middle]));
            assert_eq!(page.len(), PAGE);
            black_box(page)
        })
    });
    group.finish();
}

criterion_group!(benches, pages);
criterion_main!(benches);
