//! The writer thread: the only code that writes to the history database.
//!
//! It owns the read-write connection, batches queued writes into group
//! commits, answers offline-whisper and block reads in queue order, and
//! applies retention (and expires sanctions and announcement keys) on a
//! timer. It runs on a dedicated OS thread because every
//! SQLite call blocks; it must never run on (or wait for) the async
//! runtime, and it never answers a waiter before that waiter's transaction
//! has committed or failed.
//!
//! A queued read is answered after the batch holding every write queued
//! before it has committed, and before any write queued after it joins a
//! batch: a login sees exactly the whispers stored, and the blocks made,
//! before it asked.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use super::sqlite::{Db, OfflineLimits, Outcome, WriteOp};
use super::{now_ms, supervise, Conversation, HistoryError, Shared, StoredMsg};

/// Capacity of the writer's queue, shared by writes and offline reads. When
/// it is full the store is not keeping up with the disk: new commands are
/// refused at once with [`HistoryError::Unavailable`] (and counted in
/// `queue_full`; a login record is dropped and counted in
/// `players_dropped`) rather than queued, because the world actor must
/// never wait on the disk. At the default 512 writes per commit this is 16
/// commits of backlog.
pub(super) const WRITE_QUEUE: usize = 8192;

/// What the handles ask of the writer.
pub(super) enum Command {
    /// Joins the next group commit.
    Write(Write),
    /// Answered once every write queued before it has committed.
    Read(QueuedRead),
    /// Runs on its own, after the batch being gathered has committed.
    Control(Control),
}

/// A write and its waiter, answered once its transaction is over. A write
/// nobody waits for (a login record) has no waiter.
pub(super) struct Write {
    pub(super) op: WriteOp,
    pub(super) respond_to: Option<Responder>,
}

/// Who waits for a write, and for how much of its outcome.
pub(super) enum Responder {
    /// Only whether it committed (message and whisper writes).
    Done(oneshot::Sender<Result<(), HistoryError>>),
    /// Its [`Outcome`] (game-master writes, which answer with a value).
    Outcome(oneshot::Sender<Result<Outcome, HistoryError>>),
}

impl Responder {
    fn send(self, outcome: Result<Outcome, HistoryError>) {
        // The requester may have gone; nothing to do then.
        match self {
            Responder::Done(tx) => {
                let _ = tx.send(outcome.map(|_| ()));
            }
            Responder::Outcome(tx) => {
                let _ = tx.send(outcome);
            }
        }
    }
}

/// A read answered from the writer's connection, in queue order.
pub(super) enum QueuedRead {
    /// One player's waiting whispers.
    Offline {
        user: u64,
        respond_to: oneshot::Sender<Result<Vec<StoredMsg>, HistoryError>>,
    },
    /// Who one player has blocked.
    Blocks {
        user: u64,
        respond_to: oneshot::Sender<Result<Vec<u64>, HistoryError>>,
    },
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
    /// Test hook: panic on the writer thread.
    #[cfg(test)]
    Panic,
}

/// Spawns the writer thread. It ends when every handle has dropped, after
/// committing what was still queued; `handles` tells its supervisor whether
/// an end was that.
pub(super) fn spawn(
    db: Db,
    rx: Receiver<Command>,
    shared: Arc<Shared>,
    high_water: u64,
    handles: Weak<()>,
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
        carried: None,
        shared: shared.clone(),
    };
    std::thread::Builder::new()
        .name("history-writer".into())
        .spawn(move || supervise("history-writer", &shared, &handles, move || writer.run()))
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
    /// A command taken from the queue that must wait for the next round: a
    /// write that arrived after offline reads must not join their batch.
    carried: Option<Command>,
}

/// What gathering a batch ended with.
struct Gathered {
    batch: Vec<Write>,
    /// Reads queued after every write of `batch` (and before any write not
    /// in it), answered once it has committed.
    reads: Vec<QueuedRead>,
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
            let first = match self.carried.take() {
                Some(cmd) => cmd,
                None => {
                    let until_prune = self.next_prune.saturating_duration_since(Instant::now());
                    match self.rx.recv_timeout(until_prune) {
                        Ok(cmd) => cmd,
                        Err(RecvTimeoutError::Timeout) => {
                            let _ = self.prune();
                            continue;
                        }
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
            };
            let gathered = self.gather(first);
            if !gathered.batch.is_empty() {
                self.commit(gathered.batch);
            }
            self.answer_reads(gathered.reads);
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
    /// or until `max_batch` commands. Once a queued read has joined, only
    /// more reads may: the first write or control after it is carried to
    /// the next round, so each read sees exactly what was queued before it.
    fn gather(&mut self, first: Command) -> Gathered {
        let mut gathered = Gathered {
            batch: Vec::new(),
            reads: Vec::new(),
            control: None,
            closed: false,
        };
        let deadline = Instant::now() + self.flush_interval;
        let mut next = first;
        loop {
            match next {
                Command::Read(read) => gathered.reads.push(read),
                cmd if !gathered.reads.is_empty() => {
                    self.carried = Some(cmd);
                    return gathered;
                }
                Command::Write(write) => gathered.batch.push(write),
                Command::Control(control) => {
                    gathered.control = Some(control);
                    return gathered;
                }
            }
            if gathered.batch.len() + gathered.reads.len() >= self.max_batch {
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
        let config = &shared.config;
        // Read before the transaction: every write in the batch raised it
        // before it was queued.
        let high_water = shared.high_seen.load(Relaxed);
        let limits = OfflineLimits {
            per_inbox: config.max_offline_whispers,
            per_sender: config.max_offline_per_sender,
            cutoff_ms: config.offline_cutoff_ms(now_ms()),
        };
        let started = std::time::Instant::now();
        let result = self
            .db
            .write_batch(batch.iter().map(|w| &w.op), limits, high_water);
        let counters = &shared.counters;
        match result {
            Ok(outcomes) => {
                if let Some(observe) = shared.commits.get() {
                    observe(batch.len(), started.elapsed());
                }
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
                        WriteOp::StoreOffline { to_user, .. } => match outcome {
                            Ok(Outcome::Rows(1)) => {
                                counters.offline_stored.fetch_add(1, Relaxed);
                            }
                            // Refused, or already waiting (and counted by
                            // the store that put it there): this store
                            // added no row, so take back its count.
                            _ => shared.inboxes.forget(*to_user, 1),
                        },
                        WriteOp::AckOffline { user, .. } => {
                            if let Ok(Outcome::Rows(deleted)) = outcome {
                                shared.inboxes.forget(*user, deleted);
                            }
                        }
                        // A whisper already waiting keeps its count high:
                        // a needless read at login, never a missed one.
                        WriteOp::Spill { .. } => {
                            if let Ok(Outcome::Rows(stored)) = outcome {
                                counters.offline_stored.fetch_add(stored as u64, Relaxed);
                            }
                        }
                        WriteOp::RecordLogin { .. } => {}
                        // A recalled whisper no longer waits for anyone.
                        WriteOp::Moderation(_) => {
                            if let Ok(Outcome::Message { offline_for, .. }) = &outcome {
                                for user in offline_for {
                                    shared.inboxes.forget(*user, 1);
                                }
                            }
                        }
                    }
                    if let Some(respond_to) = write.respond_to {
                        respond_to.send(outcome);
                    }
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
                    match &write.op {
                        WriteOp::StoreOffline { to_user, .. } => {
                            shared.inboxes.forget(*to_user, 1);
                        }
                        WriteOp::RecordLogin { .. } => {
                            counters.players_dropped.fetch_add(1, Relaxed);
                        }
                        WriteOp::Spill { whispers } => {
                            counters
                                .spill_failed
                                .fetch_add(whispers.len() as u64, Relaxed);
                            warn!(
                                whispers = whispers.len(),
                                "unconfirmed whispers could not be kept for their players"
                            );
                        }
                        _ => {}
                    }
                    if let Some(respond_to) = write.respond_to {
                        respond_to.send(Err(HistoryError::WriteFailed));
                    }
                }
            }
        }
    }

    /// Answers queued reads from the committed state. Runs after the batch
    /// of the writes queued before them, so nothing they must see is still
    /// in flight.
    fn answer_reads(&self, reads: Vec<QueuedRead>) {
        if reads.is_empty() {
            return;
        }
        let config = &self.shared.config;
        let cutoff = config.offline_cutoff_ms(now_ms());
        for read in reads {
            match read {
                QueuedRead::Offline { user, respond_to } => {
                    let result = self
                        .db
                        .pending_offline(user, config.max_offline_whispers, cutoff)
                        .map_err(|e| {
                            warn!(error = %e, user, "offline whisper read failed");
                            HistoryError::Unavailable
                        });
                    let _ = respond_to.send(result);
                }
                QueuedRead::Blocks { user, respond_to } => {
                    let result = self.db.blocks(user).map_err(|e| {
                        warn!(error = %e, user, "block list read failed");
                        HistoryError::Unavailable
                    });
                    let _ = respond_to.send(result);
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
            #[cfg(test)]
            Control::Panic => panic!("history writer crash requested by a test"),
        }
    }

    /// Applies retention and schedules the next prune. On failure the grown
    /// set is kept, so the next prune retries it. Returns how many history
    /// messages were deleted.
    fn prune(&mut self) -> Result<u64, HistoryError> {
        self.next_prune = Instant::now() + self.prune_interval;
        match self.db.prune(&self.grown, &self.shared.config, now_ms()) {
            Ok(pruned) => {
                self.grown.clear();
                let shared = &self.shared;
                let counters = &shared.counters;
                counters.commits.fetch_add(1, Relaxed);
                counters.pruned.fetch_add(pruned.messages, Relaxed);
                let expired = pruned.expired_for.len() as u64;
                counters.offline_expired.fetch_add(expired, Relaxed);
                let mut per_user: HashMap<u64, usize> = HashMap::new();
                for user in pruned.expired_for {
                    *per_user.entry(user).or_default() += 1;
                }
                for (user, n) in per_user {
                    shared.inboxes.forget(user, n);
                }
                if pruned.more_expired {
                    // Go on right after the next batch instead of in one
                    // long transaction that would hold every commit.
                    self.next_prune = Instant::now();
                }
                if pruned.messages > 0 || expired > 0 || pruned.sanctions > 0 {
                    debug!(
                        messages = pruned.messages,
                        expired,
                        sanctions = pruned.sanctions,
                        announce_keys = pruned.announce_keys,
                        "history pruned"
                    );
                }
                Ok(pruned.messages)
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
