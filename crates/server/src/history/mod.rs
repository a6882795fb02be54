//! The history store: durable chat history, offline whispers, the players
//! who have ever logged in, and the game-master records (sanctions, token
//! revocations, blocks between players, the operators' audit log,
//! announcement keys), in one embedded SQLite file
//! (`<data_dir>/history.sqlite3`, WAL mode, readable by its owner only).
//!
//! It owns the database file and the two threads that touch it: a writer
//! that group-commits every write (one transaction, one fsync, for whatever
//! queued up in the last few milliseconds) and also answers offline-whisper
//! and block-list reads, in queue order, so that a read sees every write
//! queued before it; and a reader that serves history pages, player
//! look-ups, recent nonces and the game-master reads from a second,
//! read-only connection. Callers only see
//! [`HistoryHandle`], a cloneable handle over two bounded queues, and
//! [`HistoryThreads`], which joins the threads at shutdown. Either thread
//! dying (a panic, or its loop ending while handles remain) is logged once
//! and reported through [`HistoryHandle::died`].
//!
//! It must never block the async runtime: no SQLite call runs on a runtime
//! thread, and every call the world actor makes on its hot path
//! ([`HistoryHandle::append`], [`store_offline`](HistoryHandle::store_offline),
//! [`pending_offline`](HistoryHandle::pending_offline),
//! [`record_login`](HistoryHandle::record_login)) never waits: a full queue
//! is an error the caller sees at once. Nothing here knows about sockets,
//! sessions or the world's state. It never decides *what* is stored or to
//! whom: the world picks the [`Conversation`], the message id and whether a
//! recipient is offline; nor who is muted, banned or blocked, only that
//! the caller said so.
//!
//! # Layout
//! - [`config`]: [`HistoryConfig`] and per-conversation [`Retention`].
//! - `moderation`: the game-master types ([`Sanction`], [`AuditEntry`]...)
//!   and their [`HistoryHandle`] methods.
//! - `writer`: the writer thread (group commit, queued reads, pruning).
//! - `reader`: the reader thread (pages, players, nonces, game-master
//!   reads).
//! - `sqlite`: the schema, its migrations, the file's permissions and
//!   every SQL statement; synchronous code only.
//! - `postgres`: chat lines in PostgreSQL instead of the file, when
//!   `history.url` names a database ([`HistoryHandle::attach_postgres`]);
//!   the rest stays in the file.

pub mod config;
mod moderation;
mod postgres;
mod reader;
mod sqlite;
mod writer;

#[cfg(test)]
mod moderation_tests;
#[cfg(test)]
mod tests;

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{self as std_mpsc, TrySendError};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

pub use config::{HistoryConfig, Retention, Synchronous};
pub use moderation::{AuditEntry, BlockOutcome, Moderation, Sanction, SanctionKind};
use reader::{ReadCmd, READ_QUEUE};
use sqlite::{Db, WriteOp};
use writer::{Command, Control, QueuedRead, Responder, Write, WRITE_QUEUE};

/// A conversation whose messages are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
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
    /// The client's own id for this send, 0 if it gave none. Stored so that
    /// a send retried after a restart can be answered with its original
    /// msg_id ([`HistoryHandle::recent_nonces`]).
    pub nonce: u64,
}

/// A whisper waiting for a login, as the world gets it from either inbox.
#[derive(Debug, Clone)]
pub struct Waiting {
    /// What deletes it once delivered: its msg_id in the local store, its
    /// sequence in a cluster's inbox.
    pub key: u64,
    pub msg: StoredMsg,
    /// A connection of the player's session was sent it (a session's
    /// unconfirmed whisper, kept when the session ended). Connections get
    /// their lines in msg_id order, so a cursor at or past it proves the
    /// client read it. A whisper never sent anywhere (its target had no
    /// session, or was on a node found dead) is sent whatever the cursor.
    pub shown: bool,
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
    /// The sender already has `max_offline_per_sender` whispers waiting,
    /// over all recipients.
    #[error("this sender already has max_offline_per_sender whispers waiting")]
    SenderLimit,
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
    #[error("cannot create or inspect history database file {path}: {source}")]
    File {
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
    #[error("history database (history.url): {0}")]
    Postgres(String),
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
    /// Writes and offline reads refused with `Unavailable` because the
    /// writer's queue was full.
    pub queue_full: u64,
    /// Messages deleted by retention.
    pub pruned: u64,
    /// Undelivered offline whispers deleted by `offline_ttl_days`.
    pub offline_expired: u64,
    /// Reads of a player's offline whispers that went to the database
    /// (players known to have none are answered without one).
    pub offline_reads: u64,
    /// Logins not recorded in `players`: the writer's queue was full or
    /// their batch failed.
    pub players_dropped: u64,
    /// Spilled whispers lost with a batch that failed to commit.
    pub spill_failed: u64,
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
    offline_expired: AtomicU64,
    offline_reads: AtomicU64,
    players_dropped: AtomicU64,
    spill_failed: AtomicU64,
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
    /// Cancelled when either thread dies; never by a normal shutdown.
    died: CancellationToken,
    /// Told the size and duration of every group commit (metrics).
    commits: std::sync::OnceLock<CommitObserver>,
    /// Players who may block someone: loaded at open, added to before a
    /// block is queued (never removed), so it can be too wide, never too
    /// narrow. A login reads the block list only for these.
    blockers: Mutex<std::collections::HashSet<u64>>,
}

/// Called by the writer thread after each group commit with the batch's
/// size and how long the commit took. It must be quick and never block.
pub type CommitObserver = Box<dyn Fn(usize, std::time::Duration) + Send + Sync>;

/// Which players may have offline whispers waiting, so that the login of
/// everyone else (nearly everyone) skips the store. Per player it counts
/// whispers stored or on their way, minus those known to be gone:
/// incremented before a store is queued; decremented for a store that
/// failed, was refused or was a duplicate, and for rows an acknowledgement
/// or the expiry actually deleted. So it can be too high (a writer that died
/// holding a store), which costs one needless read, but never too low,
/// which would hide waiting whispers.
#[derive(Default)]
struct Inboxes(Mutex<HashMap<u64, u32>>);

impl Inboxes {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, u32>> {
        // A panic while holding the lock cannot leave the map half-updated
        // (each update is one entry), so a poisoned lock is still usable.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add(&self, user: u64) {
        *self.lock().entry(user).or_default() += 1;
    }

    fn forget(&self, user: u64, n: usize) {
        let mut map = self.lock();
        if let Some(count) = map.get_mut(&user) {
            *count = count.saturating_sub(u32::try_from(n).unwrap_or(u32::MAX));
            if *count == 0 {
                map.remove(&user);
            }
        }
    }

    fn may_have(&self, user: u64) -> bool {
        self.lock().contains_key(&user)
    }
}

/// A player to look up in the store's record of logins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlayerRef {
    Id(u64),
    /// The exact name a player last logged in with.
    Name(String),
}

/// The store, as seen by the rest of the server. Cheap to clone; the
/// threads stop once every clone is dropped, after committing what was
/// already queued.
#[derive(Clone)]
pub struct HistoryHandle {
    /// Alive while any handle is: a thread whose queue ends while this is
    /// still held stopped for some other reason, and reports it. Declared
    /// first so that it drops before the queue ends below: by the time a
    /// thread sees its queue closed, the last handle's token is gone.
    _alive: Arc<()>,
    writes: std_mpsc::SyncSender<Command>,
    reads: mpsc::Sender<ReadCmd>,
    shared: Arc<Shared>,
    /// Chat lines go to PostgreSQL instead of the file (`history.url`).
    lines: Option<postgres::Lines>,
}

impl fmt::Debug for HistoryHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HistoryHandle")
            .field("healthy", &self.is_healthy())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// The store's two threads, for a shutdown that waits for them. Dropping
/// it detaches them: they still end on their own once every handle is
/// gone.
#[derive(Debug)]
pub struct HistoryThreads {
    writer: JoinHandle<()>,
    reader: JoinHandle<()>,
    /// Ends once PostgreSQL's insert task has stopped (`history.url`).
    postgres: Option<postgres::Finished>,
}

impl HistoryThreads {
    /// Blocks until both threads have ended. Call it after dropping every
    /// [`HistoryHandle`] (otherwise it waits forever), from a thread that
    /// may block; the writer first commits everything that was queued.
    pub fn join(self) {
        // The threads catch their own panics (see `supervise`), so a join
        // error cannot happen; there is nothing more to report if it did.
        let _ = self.writer.join();
        let _ = self.reader.join();
        if let Some(finished) = self.postgres {
            // Disconnected (an error) once the task has ended.
            let _ = finished.recv();
        }
    }

    #[cfg(test)]
    fn is_finished(&self) -> bool {
        self.writer.is_finished() && self.reader.is_finished()
    }
}

/// Runs a store thread's loop, turning its death into one error log and a
/// cancelled [`Shared::died`]. A loop that ends because every handle is
/// gone is a normal shutdown and reports nothing.
fn supervise(thread: &'static str, shared: &Shared, handles: &Weak<()>, body: impl FnOnce()) {
    let why = match panic::catch_unwind(AssertUnwindSafe(body)) {
        Err(payload) => format!("panicked: {}", panic_message(payload.as_ref())),
        Ok(()) if handles.strong_count() > 0 => "stopped while handles still use it".to_owned(),
        Ok(()) => return,
    };
    // Its waiters were dropped with it and see `Unavailable`; new requests
    // are refused the same way. The server decides whether that is fatal.
    tracing::error!(thread, why = %why, "history store thread died; the store is unavailable");
    shared.died.cancel();
}

fn panic_message(payload: &(dyn Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "(non-string panic payload)"
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Creates the data directory (and missing parents) readable by the owner
/// only: it holds every private whisper. An existing directory is left as
/// it is; the operator chose its mode.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// A receiver already holding `value`, for answers known without the
/// store's threads.
fn ready<T>(value: T) -> oneshot::Receiver<T> {
    let (tx, rx) = oneshot::channel();
    let _ = tx.send(value);
    rx
}

impl HistoryHandle {
    /// Opens (creating, or upgrading an older schema) the database in `dir`
    /// and spawns its threads. Returns the handle, the highest msg_id ever
    /// handed to the store (0 if none), so the caller can keep msg_ids
    /// increasing across restarts, and the threads to join at shutdown.
    ///
    /// Does blocking file I/O: call it at start-up, not from a busy runtime
    /// thread.
    pub fn open(
        dir: &Path,
        config: HistoryConfig,
    ) -> Result<(HistoryHandle, u64, HistoryThreads), OpenError> {
        config.validate().map_err(OpenError::Config)?;
        create_private_dir(dir).map_err(|source| OpenError::Dir {
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
        let blockers = writer_db.blockers().map_err(database)?;
        let reader_db = Db::open_reader(&path)?;

        let shared = Arc::new(Shared {
            config,
            counters: Counters::default(),
            high_seen: AtomicU64::new(high_water),
            inboxes: Inboxes(Mutex::new(waiting.into_iter().collect())),
            died: CancellationToken::new(),
            commits: std::sync::OnceLock::new(),
            blockers: Mutex::new(blockers.into_iter().collect()),
        });
        let alive = Arc::new(());
        let (writes, write_rx) = std_mpsc::sync_channel(WRITE_QUEUE);
        let (reads, read_rx) = mpsc::channel(READ_QUEUE);
        // If the second spawn fails, returning drops `writes`, which stops
        // the first thread (and `alive` first, so it stops quietly).
        let writer = writer::spawn(
            writer_db,
            write_rx,
            shared.clone(),
            high_water,
            Arc::downgrade(&alive),
        )
        .map_err(OpenError::Spawn)?;
        let reader = reader::spawn(reader_db, read_rx, shared.clone(), Arc::downgrade(&alive))
            .map_err(OpenError::Spawn)?;
        let handle = HistoryHandle {
            _alive: alive,
            writes,
            reads,
            shared,
            lines: None,
        };
        let threads = HistoryThreads {
            writer,
            reader,
            postgres: None,
        };
        Ok((handle, high_water, threads))
    }

    /// Keeps chat lines in the PostgreSQL database at `url` from now on
    /// instead of the file: appends, pages, recalls, a sender's lines and
    /// retention go there; everything else stays in the file. Call it
    /// before cloning the handle, inside a runtime. Returns the highest
    /// msg_id the database holds, which the caller's ids must stay above.
    pub async fn attach_postgres(
        &mut self,
        url: &str,
        threads: &mut HistoryThreads,
    ) -> Result<u64, OpenError> {
        let (lines, high, finished) = postgres::Lines::connect(url, self.shared.clone()).await?;
        self.shared.high_seen.fetch_max(high, Relaxed);
        self.lines = Some(lines);
        threads.postgres = Some(finished);
        Ok(high)
    }

    /// Whether chat lines go to a database shared with other nodes
    /// (`history.url`), where each line is written once, by the node that
    /// gave it its msg_id, rather than by every node that delivers it.
    pub fn lines_shared(&self) -> bool {
        self.lines.is_some()
    }

    /// Whether that database answered when last asked; `None` without one.
    pub fn database_reachable(&self) -> Option<bool> {
        self.lines.as_ref().map(postgres::Lines::reachable)
    }

    /// Whether a line in `c` would be refused now because the history
    /// database (`history.url`) is known to be unreachable: the world then
    /// refuses it before anyone hears it rather than after.
    pub fn refuses_now(&self, c: &Conversation) -> bool {
        self.database_reachable() == Some(false) && self.shared.config.retention(c).persist
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
        if let Some(lines) = &self.lines {
            return Ok(lines.append(msg));
        }
        self.send_write(WriteOp::Append(msg), Some(respond_to))?;
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
        if let Some(lines) = &self.lines {
            return lines.page(&conv, before, self.page_limit(limit)).await;
        }
        let (respond_to, rx) = oneshot::channel();
        self.read(ReadCmd::Page {
            conv,
            before,
            limit: self.page_limit(limit),
            respond_to,
        })
        .await?;
        rx.await.map_err(|_| HistoryError::Unavailable)?
    }

    /// Stores a whisper for a player who is not online. Call it at the
    /// moment that is decided: the whisper counts as waiting from this call
    /// on, so a [`pending_offline`](Self::pending_offline) issued after it
    /// returns always finds it (or its refusal).
    ///
    /// The receiver resolves once the whisper is committed (`Ok`, also when
    /// that whisper was already waiting), or with `InboxFull` (the
    /// recipient has `max_offline_whispers` waiting), `SenderLimit` (the
    /// sender has `max_offline_per_sender` waiting), `WriteFailed`, or at
    /// once with `Unavailable` when the queue is full or the writer is gone.
    /// Expired whispers count toward neither limit. Stored whatever the
    /// `private` retention says: this is delivery, not history.
    ///
    /// Never waits: the world actor calls this on its hot path.
    pub fn store_offline(
        &self,
        to_user: u64,
        msg: StoredMsg,
    ) -> oneshot::Receiver<Result<(), HistoryError>> {
        self.shared.high_seen.fetch_max(msg.msg_id, Relaxed);
        // Counted before it is queued, so a login that checks after this
        // call never skips the read; the writer undoes it if the store does
        // not add a row.
        self.shared.inboxes.add(to_user);
        let (respond_to, rx) = oneshot::channel();
        match self.send_write(WriteOp::StoreOffline { to_user, msg }, Some(respond_to)) {
            Ok(()) => rx,
            Err(e) => {
                self.shared.inboxes.forget(to_user, 1);
                ready(Err(e))
            }
        }
    }

    /// Moves whispers whose senders were answered long ago into their
    /// recipients' inboxes (see `WriteOp::Spill`): one queue slot for the
    /// lot, no cap refuses them. Never waits; a full queue is
    /// `Err(Unavailable)` at once and the caller keeps them.
    pub fn spill_offline(&self, whispers: Vec<(u64, StoredMsg)>) -> Result<(), HistoryError> {
        if whispers.is_empty() {
            return Ok(());
        }
        for (to_user, msg) in &whispers {
            self.shared.high_seen.fetch_max(msg.msg_id, Relaxed);
            self.shared.inboxes.add(*to_user);
        }
        let users: Vec<u64> = whispers.iter().map(|(to, _)| *to).collect();
        let result = self.send_write(WriteOp::Spill { whispers }, None);
        if result.is_err() {
            for user in users {
                self.shared.inboxes.forget(user, 1);
            }
        }
        result
    }

    /// Whether `user` may have offline whispers waiting; `false` is certain.
    /// In memory, no I/O.
    pub fn may_have_offline(&self, user: u64) -> bool {
        self.shared.inboxes.may_have(user)
    }

    /// Every player who may have whispers waiting, in no order.
    pub fn offline_users(&self) -> Vec<u64> {
        self.shared.inboxes.lock().keys().copied().collect()
    }

    /// The whispers waiting for `user`, oldest first by msg_id, at most
    /// `max_offline_whispers`, leaving out those past `offline_ttl_days`.
    /// They stay stored until acknowledged with
    /// [`ack_offline`](Self::ack_offline).
    ///
    /// The read joins the writer's queue and is answered once every write
    /// queued before it has committed, so it sees every
    /// [`store_offline`](Self::store_offline) called before it, and none
    /// called after. A player with none waiting is answered at once without
    /// I/O. Never waits: a full queue resolves at once with `Unavailable`.
    pub fn pending_offline(
        &self,
        user: u64,
    ) -> oneshot::Receiver<Result<Vec<StoredMsg>, HistoryError>> {
        if !self.may_have_offline(user) {
            return ready(Ok(Vec::new()));
        }
        self.shared.counters.offline_reads.fetch_add(1, Relaxed);
        let (respond_to, rx) = oneshot::channel();
        match self.send(Command::Read(QueuedRead::Offline { user, respond_to })) {
            Ok(()) => rx,
            Err(e) => ready(Err(e)),
        }
    }

    /// The client has these whispers of `user` (the msg_ids it was sent):
    /// delete exactly them, and nothing stored since. Deliver, ack, then
    /// delete gives exactly-once delivery as far as clients can tell: a
    /// crash in between re-delivers the same msg_ids, which clients
    /// de-duplicate. Ids that are not waiting are ignored.
    pub async fn ack_offline(&self, user: u64, ids: Vec<u64>) -> Result<(), HistoryError> {
        if ids.is_empty() {
            return Ok(());
        }
        self.write(WriteOp::AckOffline { user, ids }).await
    }

    /// Records that `user` logged in now under `name`, for
    /// [`find_player`](Self::find_player). Best effort and never waits: a
    /// full queue drops it (counted in `players_dropped`).
    pub fn record_login(&self, user: u64, name: &str) {
        self.record_login_at(user, name, now_ms());
    }

    fn record_login_at(&self, user: u64, name: &str, time_ms: u64) {
        let op = WriteOp::RecordLogin {
            user,
            name: name.to_owned(),
            time_ms,
        };
        let write = Command::Write(Write {
            op,
            respond_to: None,
        });
        if self.writes.try_send(write).is_err() {
            self.shared.counters.players_dropped.fetch_add(1, Relaxed);
        }
    }

    /// Whether a player has ever logged in (as recorded by
    /// [`record_login`](Self::record_login)), with their id and last name.
    /// By name: the most recent login under exactly that name. Reads the
    /// committed state, so a login recorded moments ago may not show yet.
    pub async fn find_player(&self, who: PlayerRef) -> Result<Option<(u64, String)>, HistoryError> {
        let (respond_to, rx) = oneshot::channel();
        self.read(ReadCmd::FindPlayer { who, respond_to }).await?;
        rx.await.map_err(|_| HistoryError::Unavailable)?
    }

    /// `(nonce, msg_id)` of `sender`'s newest `limit` stored messages that
    /// carry a nonce (history and offline whispers), newest first: after a
    /// restart, a retried send is answered with its original msg_id.
    pub async fn recent_nonces(
        &self,
        sender: u64,
        limit: u32,
    ) -> Result<Vec<(u64, u64)>, HistoryError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let (respond_to, rx) = oneshot::channel();
        self.read(ReadCmd::RecentNonces {
            sender,
            limit,
            respond_to,
        })
        .await?;
        let local = rx.await.map_err(|_| HistoryError::Unavailable)??;
        let Some(lines) = &self.lines else {
            return Ok(local);
        };
        // The file still holds the offline whispers (the only copy when
        // whispers are not kept as history).
        let mut both = lines.recent_nonces(sender, limit).await?;
        both.extend(local);
        both.sort_unstable_by_key(|b| std::cmp::Reverse(b.1));
        both.dedup_by_key(|(_, id)| *id);
        both.truncate(limit as usize);
        Ok(both)
    }

    /// Applies retention now instead of at the next prune tick (operators,
    /// tests). Returns how many history messages were deleted; expired
    /// offline whispers are counted in `offline_expired`. Ended sanctions
    /// and day-old announcement keys are deleted too.
    pub async fn prune_now(&self) -> Result<u64, HistoryError> {
        let (respond_to, rx) = oneshot::channel();
        self.send(Command::Control(Control::Prune { respond_to }))?;
        let local = rx.await.map_err(|_| HistoryError::Unavailable)??;
        match &self.lines {
            Some(lines) => Ok(local + lines.prune().await?),
            None => Ok(local),
        }
    }

    /// Whether `user` may block anyone (see the field's doc); false means
    /// certainly not.
    pub fn may_have_blocks(&self, user: u64) -> bool {
        self.shared
            .blockers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&user)
    }

    /// Has every later group commit reported to `observe` (once per
    /// store; a second call is ignored).
    pub fn observe_commits(&self, observe: CommitObserver) {
        let _ = self.shared.commits.set(observe);
    }

    /// Cancelled once either store thread has died (a panic, or its loop
    /// ended while handles remain); from then on every request fails with
    /// `Unavailable`. Never cancelled by a normal shutdown.
    pub fn died(&self) -> CancellationToken {
        self.shared.died.clone()
    }

    /// Whether both store threads are still running.
    pub fn is_healthy(&self) -> bool {
        !self.shared.died.is_cancelled()
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
            offline_expired: c.offline_expired.load(Relaxed),
            offline_reads: c.offline_reads.load(Relaxed),
            players_dropped: c.players_dropped.load(Relaxed),
            spill_failed: c.spill_failed.load(Relaxed),
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

    /// Makes the writer thread panic once it reaches this command.
    #[cfg(test)]
    pub(crate) fn crash_writer(&self) {
        self.send(Command::Control(Control::Panic))
            .expect("writer queue has room in tests");
    }

    /// Queues `op` and waits for its commit.
    async fn write(&self, op: WriteOp) -> Result<(), HistoryError> {
        let (respond_to, rx) = oneshot::channel();
        self.send_write(op, Some(respond_to))?;
        rx.await.map_err(|_| HistoryError::Unavailable)?
    }

    fn send_write(
        &self,
        op: WriteOp,
        respond_to: Option<oneshot::Sender<Result<(), HistoryError>>>,
    ) -> Result<(), HistoryError> {
        self.send(Command::Write(Write {
            op,
            respond_to: respond_to.map(Responder::Done),
        }))
    }

    /// Every command to the writer goes through here: its queue is a std
    /// channel (its thread needs `recv_timeout` to gather a batch), so async
    /// callers must not wait on it and a full queue is reported instead.
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

    /// A client's page size: `max_page` caps it, and 0 asks for `max_page`.
    fn page_limit(&self, limit: u32) -> u32 {
        let max = self.shared.config.max_page;
        if limit == 0 {
            max
        } else {
            limit.min(max)
        }
    }

    /// Reads may wait for room: a page or look-up is one player's request,
    /// and waiting slows only that player's actor.
    async fn read(&self, cmd: ReadCmd) -> Result<(), HistoryError> {
        self.reads
            .send(cmd)
            .await
            .map_err(|_| HistoryError::Unavailable)
    }
}
