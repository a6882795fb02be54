//! History store benchmarks: write throughput with and without group
//! commit, under both `synchronous` modes, and the latency of reading one
//! history page.
//!
//! Run: `cargo bench -p guildchat-server --bench history`. The database
//! lives in a temporary directory under `$HISTORY_BENCH_DIR` (default: the
//! system temp dir); point it at the disk you want measured, since the
//! write figures are mostly the cost of fsync there.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Duration;

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use guildchat_server::history::{
    Conversation, HistoryConfig, HistoryHandle, StoredMsg, Synchronous,
};
use tempfile::TempDir;
use tokio::runtime::Runtime;

/// Messages written per iteration of a write benchmark.
const WRITES: u64 = 2000;

/// Size of the conversation a page is read from.
const CONVERSATION: u64 = 10_000;

/// Messages per page read.
const PAGE: u32 = 50;

fn msg(conversation: Conversation, msg_id: u64) -> StoredMsg {
    StoredMsg {
        msg_id,
        conversation,
        chattype: 3,
        sender_id: 42,
        sender_name: "Ann".into(),
        // A typical chat line.
        text: format!("message {msg_id}: anyone up for the raid tonight?"),
        time_ms: 1_700_000_000_000 + msg_id,
        guild_id: 1,
        team_id: 0,
        scene_id: 0,
        target_id: 0,
        target_name: String::new(),
        nonce: 0,
    }
}

/// A store in its own temporary directory, with the next free msg_id.
struct Store {
    handle: HistoryHandle,
    next_id: u64,
    // Dropped last: the handle's threads must stop before the directory goes.
    _dir: TempDir,
}

impl Store {
    fn open(config: HistoryConfig) -> Store {
        let base = std::env::var_os("HISTORY_BENCH_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let dir = tempfile::tempdir_in(base).expect("temporary directory");
        let (handle, _, _threads) =
            HistoryHandle::open(dir.path(), config).expect("open history store");
        Store {
            handle,
            next_id: 1,
            _dir: dir,
        }
    }

    fn next(&mut self) -> StoredMsg {
        let m = msg(Conversation::Guild(1), self.next_id);
        self.next_id += 1;
        m
    }

    /// `n` appends queued at once, then all awaited: a burst of chat.
    async fn burst(&mut self, n: u64) {
        let waiters: Vec<_> = (0..n)
            .map(|_| {
                let m = self.next();
                self.handle.append(m).expect("queue has room")
            })
            .collect();
        for w in waiters {
            w.await.expect("writer alive").expect("committed");
        }
    }

    /// `n` appends, each awaited before the next: one commit per message.
    async fn one_by_one(&mut self, n: u64) {
        for _ in 0..n {
            let m = self.next();
            let w = self.handle.append(m).expect("queue has room");
            w.await.expect("writer alive").expect("committed");
        }
    }
}

fn config(synchronous: Synchronous, flush_interval_ms: u64) -> HistoryConfig {
    HistoryConfig {
        synchronous,
        flush_interval_ms,
        // Retention would only add noise to a write benchmark.
        prune_interval_secs: 24 * 3600,
        ..HistoryConfig::default()
    }
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn writes(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("history_write_2000");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        // Iterations take milliseconds to seconds: one flat batch of
        // samples, not criterion's growing ramp.
        .sampling_mode(SamplingMode::Flat)
        .throughput(Throughput::Elements(WRITES));
    for (name, sync) in [("full", Synchronous::Full), ("normal", Synchronous::Normal)] {
        // The default 5 ms linger: the burst fills batches either way.
        let mut store = Store::open(config(sync, 5));
        group.bench_function(BenchmarkId::new("group_commit", name), |b| {
            b.iter(|| rt.block_on(store.burst(WRITES)))
        });
        // No linger, so each lone message pays for its commit and nothing
        // else (with the default 5 ms each would also wait 5 ms for company).
        let mut store = Store::open(config(sync, 0));
        group.bench_function(BenchmarkId::new("commit_per_message", name), |b| {
            b.iter(|| rt.block_on(store.one_by_one(WRITES)))
        });
    }
    group.finish();
}

fn page_reads(c: &mut Criterion) {
    let rt = runtime();
    let mut store = Store::open(config(Synchronous::Full, 5));
    // In bursts that fit the writer's queue, as a busy guild would write.
    for _ in 0..CONVERSATION / WRITES {
        rt.block_on(store.burst(WRITES));
    }
    let conv = Conversation::Guild(1);
    let mut group = c.benchmark_group("history_page");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    group.bench_function("newest_50_of_10k", |b| {
        b.iter(|| {
            let (page, more) = rt
                .block_on(store.handle.page(conv, 0, PAGE))
                .expect("page read");
            assert!(page.len() == PAGE as usize && more);
            black_box(page)
        })
    });
    group.finish();
}

criterion_group!(benches, writes, page_reads);
criterion_main!(benches);
