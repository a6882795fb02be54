//! The history store: durable chat history and offline whispers in one
//! embedded SQLite file (`<data_dir>/history.sqlite3`, WAL mode).
//!
//! It owns the database file and the two threads that touch it: a writer
//! that group-commits every write (one transaction, one fsync, for whatever
//! queued up in the last few milliseconds) and a reader that serves history
//! pages and pending whispers from a second, read-only connection. Callers
//! only see [`HistoryHandle`], a cloneable handle over two bounded queues.
//!
//! It must never block the async runtime: no SQLite call runs on a runtime
//! thread, [`HistoryHandle::append`] never waits (a full queue is an error
//! the caller sees at once), and nothing here knows about sockets, players
//! or the world's state. It never decides *what* is stored: the world picks
//! the [`Conversation`] and the message id.
//!
//! # Layout
//! - [`config`]: [`HistoryConfig`] and per-conversation [`Retention`].
//! - `writer`: the writer thread (group commit, pruning).
//! - `reader`: the reader thread (pages, pending whispers).
//! - `sqlite`: the schema and every SQL statement; synchronous code only.

pub mod config;
mod reader;
mod sqlite;
mod writer;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{self as std_mpsc, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot};

pub use config::{HistoryConfig, Retention, Synchronous};
use reader::{ReadCmd, READ_QUEUE};
use sqlite::{Db, WriteOp};
use writer::{Command, Control, Write, WRITE_QUEUE};

/// A conversation whose messages are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Conversation {
    World,
    System,
    Guild(u64),
    Team(u64),
    Scene(u64),
    /// A private conversation, named by its two players in increasing order
    /// so that both of them find the same one; build it with
    /// [`Conversation::between`].
    Whisper {
        low: u64,
        high: u64,
    },
}

impl Conversation {
    /// The whisper conversation of two players, whichever of them speaks.
    pub fn between(a: u64, b: u64) -> Conversation {
        Conversation::Whisper {
            low: a.min(b),
            high: a.max(b),
        }
    }
}

/// One stored message; the same fields as a live notification.
///
/// `msg_id` orders messages: pages and acknowledgements compare msg_ids, so
/// they must increase over time and stay below 2^63 (SQLite integers are
/// signed).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredMsg {
    pub msg_id: u64,
    pub conversation: Conversation,
    pub chattype: i32,
    pub sender_id: u64,
    pub sender_name: String,
    pub text: String,
    pub time_ms: u64,
    pub guild_id: u64,
    pub team_id: u64,
    pub scene_id: u64,
    pub target_id: u64,
    pub target_name: String,
}

/// Why a store request failed. Each maps to one result code for clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HistoryError {
    /// The transaction holding the write did not commit (disk full, file
    /// unwritable...). Nothing of it was stored; a later write may succeed.
    #[error("history store write failed")]
    WriteFailed,
    /// The store is not taking requests: its queue is full or its threads
    /// are gone.
    #[error("history store unavailable")]
    Unavailable,
    /// The offline player already has `max_offline_whispers` waiting.
    #[error("too many offline whispers pending")]
    InboxFull,
}

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("invalid history settings: {0}")]
    Config(String),
    #[error("cannot create history directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open history database {path}: {source}")]
    Database {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("history database {path} refused WAL mode (journal_mode is {mode})")]
    NoWal { path: PathBuf, mode: String },
    #[error("history database {path} has schema version {found}; this server knows up to {known}")]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("cannot start the history threads: {0}")]
    Spawn(#[source] std::io::Error),
}

/// Counters since the store was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HistoryStats {
    /// Transactions committed by the writer (write batches and prunes).
    pub commits: u64,
    /// History messages committed.
    pub messages: u64,
    /// Offline whispers committed.
    pub offline_stored: u64,
    /// Write batches that failed; every write in them got `WriteFailed`.
    pub failed_commits: u64,
    /// Writes refused with `Unavailable` because the writer's queue was full.
    pub queue_full: u64,
    /// Messages deleted by retention.
    pub pruned: u64,
    /// Reads of a player's offline whispers that went to the database
    /// (players known to have none are answered without one).
    pub offline_reads: u64,
}

/// The live counters behind [`HistoryStats`].
#[derive(Default)]
struct Counters {
    commits: AtomicU64,
    messages: AtomicU64,
    offline_stored: AtomicU64,
    failed_commits: AtomicU64,
    queue_full: AtomicU64,
    pruned: AtomicU64,
    offline_reads: AtomicU64,
}

/// What the handles and the threads share. Holds no channel end, so the
/// threads keeping it alive never keep themselves alive.
struct Shared {
    config: HistoryConfig,
    counters: Counters,
    /// Highest msg_id any caller has handed us, stored or not. The writer
    /// records it with each commit (and at shutdown) so that a restart never
    /// hands out an id a client has already seen, even one of a conversation
    /// that is not persisted.
    high_seen: AtomicU64,
    inboxes: Inboxes,
}

/// Which players may have offline whispers waiting, so that the login of
/// everyone else (nearly everyone) skips the store. Per player it counts
/// whispers stored or on their way, minus those deleted after delivery:
/// incremented before a store is queued, decremented only for a store that
/// failed or for rows an acknowledgement actually deleted. So it can be
/// too high (a duplicate store, retention), which costs one needless read,
/// but never too low, which would hide waiting whispers.
#[derive(Default)]
struct Inboxes(Mutex<HashMap<u64, u32>>);

impl Inboxes {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, u32>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add(&self, user: u64) {
        *self.lock().entry(user).or_default() += 1;
    }

    fn forget(&self, user: u64, n: usize) {
        let mut map = self.lock();
        if let Some(count) = map.get_mut(&user) {
            *count = count.saturating_sub(n as u32);
            if *count == 0 {
                map.remove(&user);
            }
        }
    }

    fn may_have(&self, user: u64) -> bool {
        self.lock().contains_key(&user)
    }
}

/// The store, as seen by the rest of the server. Cheap to clone; the
/// threads stop once every clone is dropped, after committing what was
/// already queued.
#[derive(Clone)]
pub struct HistoryHandle {
    writes: std_mpsc::SyncSender<Command>,
    reads: mpsc::Sender<ReadCmd>,
    shared: Arc<Shared>,
}

impl fmt::Debug for HistoryHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HistoryHandle")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl HistoryHandle {
    /// Opens (creating) the database in `dir` and spawns its threads.
    /// Returns the handle and the highest msg_id ever handed to the store (0
    /// if none), so the caller can keep msg_ids increasing across restarts.
    ///
    /// Does blocking file I/O: call it at start-up, not from a busy runtime
    /// thread.
    pub fn open(dir: &Path, config: HistoryConfig) -> Result<(HistoryHandle, u64), OpenError> {
        // The threads are detached: they end on their own when the last
        // handle drops.
        let (handle, high_water, _threads) = HistoryHandle::start(dir, config)?;
        Ok((handle, high_water))
    }

    /// [`open`](Self::open), also returning the writer and reader threads so
    /// tests can watch them end.
    fn start(
        dir: &Path,
        config: HistoryConfig,
    ) -> Result<(HistoryHandle, u64, [JoinHandle<()>; 2]), OpenError> {
        config.validate().map_err(OpenError::Config)?;
        std::fs::create_dir_all(dir).map_err(|source| OpenError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join(sqlite::FILE_NAME);
        // The writer's connection creates the file and the schema, so it
        // must exist before the read-only one opens.
        let writer_db = Db::open_writer(&path, config.synchronous, config.max_db_bytes)?;
        let database = |source| OpenError::Database {
            path: path.clone(),
            source,
        };
        let high_water = writer_db.high_water().map_err(database)?;
        let waiting = writer_db.offline_counts().map_err(database)?;
        let reader_db = Db::open_reader(&path)?;

        let shared = Arc::new(Shared {
            config,
            counters: Counters::default(),
            high_seen: AtomicU64::new(high_water),
            inboxes: Inboxes(Mutex::new(waiting.into_iter().collect())),
        });
        let (writes, write_rx) = std_mpsc::sync_channel(WRITE_QUEUE);
        let (reads, read_rx) = mpsc::channel(READ_QUEUE);
        // If the second spawn fails, returning drops `writes`, which stops
        // the first thread.
        let writer = writer::spawn(writer_db, write_rx, shared.clone(), high_water)
            .map_err(OpenError::Spawn)?;
        let reader = reader::spawn(reader_db, read_rx).map_err(OpenError::Spawn)?;
        let handle = HistoryHandle {
            writes,
            reads,
            shared,
        };
        Ok((handle, high_water, [writer, reader]))
    }

    /// Queues a message for the next group commit. The receiver resolves
    /// once the batch holding it is committed (`Ok`) or has failed
    /// (`Err(WriteFailed)`); if the writer thread died it is closed without
    /// a value. A conversation whose retention does not persist resolves
    /// `Ok` at once without touching the disk.
    ///
    /// Never waits: a full queue is `Err(Unavailable)` right away, because
    /// the world actor calls this on its hot path.
    pub fn append(
        &self,
        msg: StoredMsg,
    ) -> Result<oneshot::Receiver<Result<(), HistoryError>>, HistoryError> {
        self.shared.high_seen.fetch_max(msg.msg_id, Relaxed);
        let (respond_to, rx) = oneshot::channel();
        if !self.shared.config.retention(&msg.conversation).persist {
            let _ = respond_to.send(Ok(()));
            return Ok(rx);
        }
        self.send_write(WriteOp::Append(msg), respond_to)?;
        Ok(rx)
    }

    /// Keyset paging: messages of `conv` with msg_id < `before` (0 means
    /// "from the newest"), newest first, at most `min(limit, max_page)` of
    /// them (a `limit` of 0 asks for `max_page`). Returns the page and
    /// whether older messages remain.
    pub async fn page(
        &self,
        conv: Conversation,
        before: u64,
        limit: u32,
    ) -> Result<(Vec<StoredMsg>, bool), HistoryError> {
        let max = self.shared.config.max_page;
        let limit = if limit == 0 { max } else { limit.min(max) };
        let (respond_to, rx) = oneshot::channel();
        self.read(ReadCmd::Page {
            conv,
            before,
            limit,
            respond_to,
        })
        .await?;
        rx.await.map_err(|_| HistoryError::Unavailable)?
    }

    /// Stores a whisper for a player who is not online. Resolves once it is
    /// committed; `Err(InboxFull)` if the player already has
    /// `max_offline_whispers` waiting. Stored whatever the `private`
    /// retention says: this is delivery, not history.
    pub async fn store_offline(&self, to_user: u64, msg: StoredMsg) -> Result<(), HistoryError> {
        self.shared.high_seen.fetch_max(msg.msg_id, Relaxed);
        // Counted before it is queued, so a login never misses it.
        self.shared.inboxes.add(to_user);
        let (respond_to, rx) = oneshot::channel();
        let result = match self.send_write(WriteOp::StoreOffline { to_user, msg }, respond_to) {
            Ok(()) => rx.await.unwrap_or(Err(HistoryError::Unavailable)),
            Err(e) => Err(e),
        };
        if result.is_err() {
            self.shared.inboxes.forget(to_user, 1);
        }
        result
    }

    /// The whispers waiting for `user`, oldest first (at most
    /// `max_offline_whispers`). They stay stored until acknowledged.
    pub async fn pending_offline(&self, user: u64) -> Result<Vec<StoredMsg>, HistoryError> {
        if !self.shared.inboxes.may_have(user) {
            return Ok(Vec::new());
        }
        self.shared.counters.offline_reads.fetch_add(1, Relaxed);
        let (respond_to, rx) = oneshot::channel();
        self.read(ReadCmd::Pending {
            user,
            limit: self.shared.config.max_offline_whispers,
            respond_to,
        })
        .await?;
        rx.await.map_err(|_| HistoryError::Unavailable)?
    }

    /// The client has everything up to and including `up_to_msg_id`: delete
    /// those pending whispers. Deliver, ack, then delete gives exactly-once
    /// delivery as far as clients can tell: a crash in between re-delivers
    /// the same msg_ids, which clients de-duplicate.
    pub async fn ack_offline(&self, user: u64, up_to_msg_id: u64) -> Result<(), HistoryError> {
        let (respond_to, rx) = oneshot::channel();
        let op = WriteOp::AckOffline {
            user,
            up_to: up_to_msg_id,
        };
        self.send_write(op, respond_to)?;
        rx.await.map_err(|_| HistoryError::Unavailable)?
    }

    /// Applies retention now instead of at the next prune tick (operators,
    /// tests). Returns how many messages were deleted.
    pub async fn prune_now(&self) -> Result<u64, HistoryError> {
        let (respond_to, rx) = oneshot::channel();
        self.send(Command::Control(Control::Prune { respond_to }))?;
        rx.await.map_err(|_| HistoryError::Unavailable)?
    }

    /// The store's counters.
    pub fn stats(&self) -> HistoryStats {
        let c = &self.shared.counters;
        HistoryStats {
            commits: c.commits.load(Relaxed),
            messages: c.messages.load(Relaxed),
            offline_stored: c.offline_stored.load(Relaxed),
            failed_commits: c.failed_commits.load(Relaxed),
            queue_full: c.queue_full.load(Relaxed),
            pruned: c.pruned.load(Relaxed),
            offline_reads: c.offline_reads.load(Relaxed),
        }
    }

    /// Simulates a full disk (`full`) or frees it again, on the writer's
    /// connection; see `Db::limit_pages`.
    #[cfg(test)]
    async fn limit_pages(&self, full: bool) {
        let (respond_to, rx) = oneshot::channel();
        self.send(Command::Control(Control::LimitPages { full, respond_to }))
            .expect("writer queue has room in tests");
        rx.await
            .expect("writer thread alive")
            .expect("page limit applied");
    }

    fn send_write(
        &self,
        op: WriteOp,
        respond_to: oneshot::Sender<Result<(), HistoryError>>,
    ) -> Result<(), HistoryError> {
        self.send(Command::Write(Write { op, respond_to }))
    }

    /// Every write goes through here: the writer's queue is a std channel
    /// (its thread needs `recv_timeout` to gather a batch), so async callers
    /// must not wait on it and a full queue is reported instead.
    fn send(&self, cmd: Command) -> Result<(), HistoryError> {
        match self.writes.try_send(cmd) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                self.shared.counters.queue_full.fetch_add(1, Relaxed);
                Err(HistoryError::Unavailable)
            }
            Err(TrySendError::Disconnected(_)) => Err(HistoryError::Unavailable),
        }
    }

    /// Reads may wait for room: a page request is one player's, and waiting
    /// slows only that player's actor.
    async fn read(&self, cmd: ReadCmd) -> Result<(), HistoryError> {
        self.reads
            .send(cmd)
            .await
            .map_err(|_| HistoryError::Unavailable)
    }
}
