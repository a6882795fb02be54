//! The writer thread: the only code that writes to the history database.
//!
//! It owns the read-write connection, batches queued writes into group
//! commits, and applies retention on a timer. It runs on a dedicated OS
//! thread because every SQLite call blocks; it must never run on (or wait
//! for) the async runtime, and it never answers a waiter before that
//! waiter's transaction has committed or failed.

use std::collections::HashSet;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use super::sqlite::{Db, WriteOp};
use super::{Conversation, HistoryError, Shared};

/// Capacity of the writer's queue. When it is full the store is not keeping
/// up with the disk: new writes are refused at once with
/// [`HistoryError::Unavailable`] (and counted in `queue_full`) rather than
/// queued, because the world actor must never wait on the disk. At the
/// default 512 writes per commit this is 16 commits of backlog.
pub(super) const WRITE_QUEUE: usize = 8192;

/// What the handles ask of the writer.
pub(super) enum Command {
    /// Joins the next group commit.
    Write(Write),
    /// Runs on its own, after the batch being gathered has committed.
    Control(Control),
}

/// A write and its waiter, answered once its transaction is over.
pub(super) struct Write {
    pub(super) op: WriteOp,
    pub(super) respond_to: oneshot::Sender<Result<(), HistoryError>>,
}

pub(super) enum Control {
    /// Apply retention now; answers with the number of messages deleted.
    Prune {
        respond_to: oneshot::Sender<Result<u64, HistoryError>>,
    },
    /// Test hook: simulate a full disk, or end the simulation.
    #[cfg(test)]
    LimitPages {
        full: bool,
        respond_to: oneshot::Sender<Result<(), String>>,
    },
}

/// Spawns the writer thread. It ends when every handle has dropped, after
/// committing what was still queued.
pub(super) fn spawn(
    db: Db,
    rx: Receiver<Command>,
    shared: Arc<Shared>,
    high_water: u64,
) -> std::io::Result<JoinHandle<()>> {
    let config = &shared.config;
    let writer = Writer {
        db,
        rx,
        flush_interval: Duration::from_millis(config.flush_interval_ms),
        max_batch: config.max_batch,
        prune_interval: Duration::from_secs(config.prune_interval_secs),
        next_prune: Instant::now() + Duration::from_secs(config.prune_interval_secs),
        grown: HashSet::new(),
        high_water_written: high_water,
        failing: false,
        shared,
    };
    std::thread::Builder::new()
        .name("history-writer".into())
        .spawn(move || writer.run())
}

struct Writer {
    db: Db,
    rx: Receiver<Command>,
    shared: Arc<Shared>,
    flush_interval: Duration,
    max_batch: usize,
    prune_interval: Duration,
    next_prune: Instant,
    /// Conversations appended to since the last prune: the only ones that
    /// can exceed their `keep_count`. Lost on restart, so a conversation
    /// can stay over its count by one prune interval's worth of messages
    /// until it is next written.
    grown: HashSet<Conversation>,
    /// The high-water mark as last committed.
    high_water_written: u64,
    /// Whether the last write batch failed, so a full disk logs once when
    /// it starts and once when it ends, not once per batch.
    failing: bool,
}

/// What gathering a batch ended with.
struct Gathered {
    batch: Vec<Write>,
    /// A control command that arrived while gathering; it runs after the
    /// batch so that commands still take effect in queue order.
    control: Option<Control>,
    /// Every handle is gone: commit and stop.
    closed: bool,
}

impl Writer {
    fn run(mut self) {
        debug!("history writer started");
        loop {
            let until_prune = self.next_prune.saturating_duration_since(Instant::now());
            let first = match self.rx.recv_timeout(until_prune) {
                Ok(cmd) => cmd,
                Err(RecvTimeoutError::Timeout) => {
                    let _ = self.prune();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let gathered = self.gather(first);
            if !gathered.batch.is_empty() {
                self.commit(gathered.batch);
            }
            if let Some(control) = gathered.control {
                self.control(control);
            }
            // A busy store never times out of `recv_timeout`, so the prune
            // deadline is also checked between batches.
            if Instant::now() >= self.next_prune {
                let _ = self.prune();
            }
            if gathered.closed {
                break;
            }
        }
        self.finish();
        debug!("history writer stopped");
    }

    /// Collects a batch starting with `first`: everything already queued
    /// joins at once, then stragglers until `flush_interval` after the first
    /// or until `max_batch`.
    fn gather(&self, first: Command) -> Gathered {
        let mut gathered = Gathered {
            batch: Vec::new(),
            control: None,
            closed: false,
        };
        let deadline = Instant::now() + self.flush_interval;
        let mut next = first;
        loop {
            match next {
                Command::Write(write) => gathered.batch.push(write),
                Command::Control(control) => {
                    gathered.control = Some(control);
                    return gathered;
                }
            }
            if gathered.batch.len() >= self.max_batch {
                return gathered;
            }
            next = match self.rx.try_recv() {
                Ok(cmd) => cmd,
                Err(TryRecvError::Disconnected) => {
                    gathered.closed = true;
                    return gathered;
                }
                Err(TryRecvError::Empty) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return gathered;
                    }
                    match self.rx.recv_timeout(left) {
                        Ok(cmd) => cmd,
                        Err(RecvTimeoutError::Timeout) => return gathered,
                        Err(RecvTimeoutError::Disconnected) => {
                            gathered.closed = true;
                            return gathered;
                        }
                    }
                }
            };
        }
    }

    /// Writes `batch` in one transaction, then answers every waiter.
    fn commit(&mut self, batch: Vec<Write>) {
        let shared = &self.shared;
        // Read before the transaction: every write in the batch raised it
        // before it was queued.
        let high_water = shared.high_seen.load(Relaxed);
        let result = self.db.write_batch(
            batch.iter().map(|w| &w.op),
            shared.config.max_offline_whispers,
            high_water,
        );
        let counters = &shared.counters;
        match result {
            Ok(outcomes) => {
                if self.failing {
                    info!("history store writes succeed again");
                    self.failing = false;
                }
                counters.commits.fetch_add(1, Relaxed);
                self.high_water_written = self.high_water_written.max(high_water);
                for (write, outcome) in batch.into_iter().zip(outcomes) {
                    match &write.op {
                        WriteOp::Append(msg) => {
                            counters.messages.fetch_add(1, Relaxed);
                            self.grown.insert(msg.conversation);
                        }
                        WriteOp::StoreOffline { .. } if outcome.is_ok() => {
                            counters.offline_stored.fetch_add(1, Relaxed);
                        }
                        WriteOp::AckOffline { user, .. } => {
                            if let Ok(deleted) = outcome {
                                shared.inboxes.forget(*user, deleted);
                            }
                        }
                        _ => {}
                    }
                    let _ = write.respond_to.send(outcome.map(|_| ()));
                }
            }
            Err(e) => {
                counters.failed_commits.fetch_add(1, Relaxed);
                // The waiters get WriteFailed and decide what to tell
                // players; this is where the cause is logged, once per
                // outage.
                if self.failing {
                    debug!(error = %e, writes = batch.len(), "history batch failed again");
                } else {
                    warn!(error = %e, writes = batch.len(), "history batch failed; its writes are reported failed");
                    self.failing = true;
                }
                for write in batch {
                    let _ = write.respond_to.send(Err(HistoryError::WriteFailed));
                }
            }
        }
    }

    fn control(&mut self, control: Control) {
        match control {
            Control::Prune { respond_to } => {
                let _ = respond_to.send(self.prune());
            }
            #[cfg(test)]
            Control::LimitPages { full, respond_to } => {
                let _ = respond_to.send(self.db.limit_pages(full).map_err(|e| e.to_string()));
            }
        }
    }

    /// Applies retention and schedules the next prune. On failure the grown
    /// set is kept, so the next prune retries it.
    fn prune(&mut self) -> Result<u64, HistoryError> {
        self.next_prune = Instant::now() + self.prune_interval;
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        match self.db.prune(&self.grown, &self.shared.config, now_ms) {
            Ok(deleted) => {
                self.grown.clear();
                let counters = &self.shared.counters;
                counters.commits.fetch_add(1, Relaxed);
                counters.pruned.fetch_add(deleted, Relaxed);
                if deleted > 0 {
                    debug!(deleted, "history pruned");
                }
                Ok(deleted)
            }
            Err(e) => {
                warn!(error = %e, "history prune failed; retrying at the next interval");
                Err(HistoryError::WriteFailed)
            }
        }
    }

    /// Records a high-water mark raised by messages that were never stored
    /// (unpersisted conversations) since the last commit.
    fn finish(&mut self) {
        let high_seen = self.shared.high_seen.load(Relaxed);
        if high_seen > self.high_water_written {
            if let Err(e) = self.db.write_high_water(high_seen) {
                warn!(error = %e, "could not record the history high-water mark at shutdown");
            }
        }
    }
}
