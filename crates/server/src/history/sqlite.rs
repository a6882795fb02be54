//! The schema and every SQL statement of the history store.
//!
//! Synchronous code over one `rusqlite::Connection`. It owns the table
//! layout, its migrations, the database file's permissions and how ids are
//! encoded; it never sees a channel or an async runtime, and it runs only on
//! the store's own writer and reader threads (and once at open).
//!
//! Layout (schema version 3):
//! - `messages` is keyed by (conversation, msg_id) without a rowid, so a
//!   page is one range scan of the primary key; `messages_by_age` lets
//!   age-based retention delete by range instead of scanning;
//!   `messages_by_nonce`, a partial index over the rows that carry a client
//!   nonce, finds a sender's newest nonces without touching the others.
//! - `offline` is keyed by (recipient, msg_id); `offline_by_sender` counts
//!   one sender's waiting whispers for the per-sender cap, and
//!   `offline_by_age` finds the expired ones.
//! - `players` holds every player who has logged in at least once, with the
//!   name and time of the last login; `players_by_name` resolves a name to
//!   its most recent holder.
//! - `meta` holds the msg_id high-water mark.
//! - Since version 3, the game-master store: `sanctions` (mutes and bans,
//!   one per player and kind), `revocations` (per player, tokens issued
//!   before a time are refused), `blocks` (who a player blocked, keyed so
//!   one player's list is one range scan), `audit` (every operator action,
//!   newest by id) and `announce_keys` (which announcement a retried
//!   request already made). `messages_by_id` finds a line to recall without
//!   knowing its conversation, `messages_by_sender` lists one player's
//!   lines, and `offline_by_msg` finds a recalled whisper still waiting.
//!
//! Both message tables carry `nonce`, the client's id for a send (0 = none).

use std::path::Path;
use std::time::Duration;

use rusqlite::types::Type;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Row, TransactionBehavior};
use tracing::{info, warn};

use super::config::{HistoryConfig, Synchronous, DAY_MS};
use super::moderation::{AuditEntry, BlockOutcome, Moderation, Sanction, SanctionKind};
use super::{Conversation, HistoryError, OpenError, PlayerRef, StoredMsg};

/// The database file inside the data directory.
pub(super) const FILE_NAME: &str = "history.sqlite3";

/// `PRAGMA user_version` of the schema [`MIGRATIONS`] builds. A database
/// with a higher version was written by a newer server and is refused
/// rather than misread.
pub(super) const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// `MIGRATIONS[v]` takes a database from version `v` to `v + 1`; a new file
/// (version 0) runs them all. Each is on disk in some deployment: never edit
/// one, append a new one. They run in a single transaction with the version
/// bump, so a crash mid-upgrade leaves the old version intact.
const MIGRATIONS: [&str; 3] = [
    // 1: messages, offline whispers, the high-water mark. `IF NOT EXISTS`
    // because a version-0 file may already hold them (a crash between the
    // tables and the version bump, before migrations were transactional).
    "
CREATE TABLE IF NOT EXISTS messages (
    conv_kind   INTEGER NOT NULL,
    conv_id     INTEGER NOT NULL,
    conv_id2    INTEGER NOT NULL,
    msg_id      INTEGER NOT NULL,
    chattype    INTEGER NOT NULL,
    sender_id   INTEGER NOT NULL,
    sender_name TEXT    NOT NULL,
    text        TEXT    NOT NULL,
    time_ms     INTEGER NOT NULL,
    guild_id    INTEGER NOT NULL,
    team_id     INTEGER NOT NULL,
    scene_id    INTEGER NOT NULL,
    target_id   INTEGER NOT NULL,
    target_name TEXT    NOT NULL,
    PRIMARY KEY (conv_kind, conv_id, conv_id2, msg_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS messages_by_age ON messages (conv_kind, time_ms);
CREATE TABLE IF NOT EXISTS offline (
    to_user     INTEGER NOT NULL,
    msg_id      INTEGER NOT NULL,
    conv_kind   INTEGER NOT NULL,
    conv_id     INTEGER NOT NULL,
    conv_id2    INTEGER NOT NULL,
    chattype    INTEGER NOT NULL,
    sender_id   INTEGER NOT NULL,
    sender_name TEXT    NOT NULL,
    text        TEXT    NOT NULL,
    time_ms     INTEGER NOT NULL,
    guild_id    INTEGER NOT NULL,
    team_id     INTEGER NOT NULL,
    scene_id    INTEGER NOT NULL,
    target_id   INTEGER NOT NULL,
    target_name TEXT    NOT NULL,
    PRIMARY KEY (to_user, msg_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT    PRIMARY KEY NOT NULL,
    value INTEGER NOT NULL
) WITHOUT ROWID;
",
    // 2: client nonces, known players, and the indexes behind the offline
    // caps and expiry. Existing rows get nonce 0 ("none").
    "
ALTER TABLE messages ADD COLUMN nonce INTEGER NOT NULL DEFAULT 0;
ALTER TABLE offline ADD COLUMN nonce INTEGER NOT NULL DEFAULT 0;
CREATE INDEX messages_by_nonce ON messages (sender_id, msg_id) WHERE nonce != 0;
CREATE INDEX offline_by_sender ON offline (sender_id);
CREATE INDEX offline_by_age ON offline (time_ms);
CREATE TABLE players (
    user_id       INTEGER PRIMARY KEY,
    name          TEXT    NOT NULL,
    last_login_ms INTEGER NOT NULL
);
CREATE INDEX players_by_name ON players (name, last_login_ms);
",
    // 3: moderation, blocks, the audit log and announcement keys. The new
    // indexes over `messages` are built from the existing rows, so this
    // upgrade takes a while on a large file (once).
    "
CREATE TABLE sanctions (
    user_id  INTEGER NOT NULL,
    kind     INTEGER NOT NULL,
    until_ms INTEGER NOT NULL,
    reason   TEXT    NOT NULL,
    set_ms   INTEGER NOT NULL,
    PRIMARY KEY (user_id, kind)
);
CREATE TABLE revocations (
    user_id  INTEGER PRIMARY KEY,
    before_s INTEGER NOT NULL
);
CREATE TABLE blocks (
    user_id    INTEGER NOT NULL,
    blocked_id INTEGER NOT NULL,
    since_ms   INTEGER NOT NULL,
    PRIMARY KEY (user_id, blocked_id)
) WITHOUT ROWID;
CREATE TABLE audit (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    time_ms INTEGER NOT NULL,
    key_id  TEXT    NOT NULL,
    action  TEXT    NOT NULL,
    target  TEXT    NOT NULL,
    reason  TEXT    NOT NULL,
    result  TEXT    NOT NULL
);
CREATE TABLE announce_keys (
    key     TEXT    PRIMARY KEY NOT NULL,
    msg_id  INTEGER NOT NULL,
    time_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX messages_by_id ON messages (msg_id);
CREATE INDEX messages_by_sender ON messages (sender_id, msg_id);
CREATE INDEX offline_by_msg ON offline (msg_id);
",
];

/// The columns every read selects, in the order [`read_msg`] expects.
/// Both tables have them under the same names. A macro rather than a const
/// so `concat!` can build each statement's text at compile time.
macro_rules! msg_columns {
    () => {
        "conv_kind, conv_id, conv_id2, msg_id, chattype, sender_id, sender_name, text, \
         time_ms, guild_id, team_id, scene_id, target_id, target_name, nonce"
    };
}

/// How long a statement waits for a lock held by another connection (an
/// operator's `sqlite3` shell, a checkpoint) before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// WAL size kept after a checkpoint, so one burst does not leave a huge
/// file behind.
const JOURNAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;

/// Most expired offline whispers one prune deletes. A prune runs on the
/// writer thread between batches, so after a long downtime a single
/// unbounded DELETE would hold every commit behind it; when a chunk comes
/// back full the writer prunes again right after its next batch.
const OFFLINE_PRUNE_CHUNK: i64 = 5000;

/// The kind of a conversation, as stored in `conv_kind`. The numbers are
/// on disk: never reuse or renumber them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    World = 1,
    System = 2,
    Guild = 3,
    Team = 4,
    Scene = 5,
    Whisper = 6,
}

/// How long an announcement key holds its msg_id; an older claim of the
/// same key is replaced, and the prune deletes it.
pub(super) const ANNOUNCE_KEY_MS: u64 = DAY_MS;

/// A [`SanctionKind`] as stored in `sanctions.kind`. On disk: never reuse
/// or renumber.
fn sanction_code(kind: SanctionKind) -> i64 {
    match kind {
        SanctionKind::Mute => 1,
        SanctionKind::Ban => 2,
    }
}

fn sanction_kind(code: i64) -> Option<SanctionKind> {
    match code {
        1 => Some(SanctionKind::Mute),
        2 => Some(SanctionKind::Ban),
        _ => None,
    }
}

/// SQLite integers are signed 64-bit, so ids are stored bit for bit.
/// User, guild... ids are only compared for equality, which that keeps
/// exact over the whole `u64` range; msg_ids and times are also compared
/// with `<`, which is right while they stay below 2^63.
pub(super) fn sql(v: u64) -> i64 {
    v as i64
}

pub(super) fn unsql(v: i64) -> u64 {
    v as u64
}

/// A client-supplied upper bound as an SQL one: anything past `i64::MAX`
/// means "no bound" rather than wrapping negative.
/// A page's `before_msg_id` as the SQL bound: 0 asks for the newest.
pub(super) fn page_bound(before: u64) -> i64 {
    if before == 0 {
        i64::MAX
    } else {
        sql_bound(before)
    }
}

pub(super) fn sql_bound(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The inverse of [`sql_bound`] for a time that may mean "never": the
/// clamped value reads back as `u64::MAX`.
fn unsql_bound(v: i64) -> u64 {
    if v == i64::MAX {
        u64::MAX
    } else {
        unsql(v)
    }
}

/// `(conv_kind, conv_id, conv_id2)` of a conversation.
pub(super) fn conv_key(c: &Conversation) -> (i64, i64, i64) {
    match *c {
        Conversation::World => (Kind::World as i64, 0, 0),
        Conversation::System => (Kind::System as i64, 0, 0),
        Conversation::Guild(id) => (Kind::Guild as i64, sql(id), 0),
        Conversation::Team(id) => (Kind::Team as i64, sql(id), 0),
        Conversation::Scene(id) => (Kind::Scene as i64, sql(id), 0),
        Conversation::Whisper { low, high } => (Kind::Whisper as i64, sql(low), sql(high)),
    }
}

/// A `conv_kind` or sanction kind this server does not know: the file was
/// written by something else.
#[derive(Debug, thiserror::Error)]
#[error("unknown {what} kind {code}")]
struct UnknownKind {
    what: &'static str,
    code: i64,
}

fn unknown_kind(column: usize, what: &'static str, code: i64) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        column,
        Type::Integer,
        Box::new(UnknownKind { what, code }),
    )
}

pub(super) fn conversation(kind: i64, id: i64, id2: i64) -> Option<Conversation> {
    let id_u = unsql(id);
    Some(match kind {
        k if k == Kind::World as i64 => Conversation::World,
        k if k == Kind::System as i64 => Conversation::System,
        k if k == Kind::Guild as i64 => Conversation::Guild(id_u),
        k if k == Kind::Team as i64 => Conversation::Team(id_u),
        k if k == Kind::Scene as i64 => Conversation::Scene(id_u),
        k if k == Kind::Whisper as i64 => Conversation::Whisper {
            low: id_u,
            high: unsql(id2),
        },
        _ => return None,
    })
}

/// A row selected with `msg_columns!()`.
fn read_msg(row: &Row<'_>) -> rusqlite::Result<StoredMsg> {
    read_msg_at(row, 0)
}

/// The `msg_columns!()` of a row that has `at` other columns before them.
fn read_msg_at(row: &Row<'_>, at: usize) -> rusqlite::Result<StoredMsg> {
    let kind: i64 = row.get(at)?;
    let conversation = conversation(kind, row.get(at + 1)?, row.get(at + 2)?)
        .ok_or_else(|| unknown_kind(at, "conversation", kind))?;
    Ok(StoredMsg {
        msg_id: unsql(row.get(at + 3)?),
        conversation,
        chattype: row.get(at + 4)?,
        sender_id: unsql(row.get(at + 5)?),
        sender_name: row.get(at + 6)?,
        text: row.get(at + 7)?,
        time_ms: unsql(row.get(at + 8)?),
        guild_id: unsql(row.get(at + 9)?),
        team_id: unsql(row.get(at + 10)?),
        scene_id: unsql(row.get(at + 11)?),
        target_id: unsql(row.get(at + 12)?),
        target_name: row.get(at + 13)?,
        nonce: unsql(row.get(at + 14)?),
    })
}

/// One write of a group commit.
#[derive(Debug)]
pub(super) enum WriteOp {
    Append(StoredMsg),
    StoreOffline {
        to_user: u64,
        msg: StoredMsg,
    },
    /// Deletes exactly these whispers of `user`.
    AckOffline {
        user: u64,
        ids: Vec<u64>,
    },
    /// Whispers already acknowledged to their senders, moved to their
    /// recipients' inboxes because a session ended before its client
    /// confirmed them: no cap refuses them, and one already waiting is
    /// left as it is.
    Spill {
        whispers: Vec<(u64, StoredMsg)>,
    },
    RecordLogin {
        user: u64,
        name: String,
        time_ms: u64,
    },
    /// A game-master write; see [`ModWrite`].
    Moderation(ModWrite),
}

/// A write of the game-master tables, one step of a batch.
#[derive(Debug)]
pub(super) enum ModWrite {
    /// Upserts one sanction.
    SetSanction {
        user: u64,
        kind: SanctionKind,
        until_ms: u64,
        reason: String,
        set_ms: u64,
    },
    ClearSanction {
        user: u64,
        kind: SanctionKind,
    },
    /// Keeps the later of the stored and the new `before_s`.
    RevokeTokens {
        user: u64,
        before_s: u64,
    },
    /// Counts `user`'s blocks and inserts, in this op's own step of the
    /// transaction, so earlier blocks of the same batch are counted.
    Block {
        user: u64,
        blocked: u64,
        since_ms: u64,
        cap: usize,
    },
    Unblock {
        user: u64,
        blocked: u64,
    },
    Audit(AuditEntry),
    AnnounceKey {
        key: String,
        msg_id: u64,
        now_ms: u64,
    },
    RemoveMessage {
        msg_id: u64,
    },
}

/// What one write of a batch did.
#[derive(Debug)]
pub(super) enum Outcome {
    /// Rows added or deleted: 1 or 0 for a whisper stored, the number an
    /// ack deleted or a spill stored; 0 for the other message writes.
    Rows(usize),
    /// Whether a clear or an unblock deleted a row.
    Removed(bool),
    Block(BlockOutcome),
    /// An audit entry's new id, or the msg_id owning an announcement key.
    Id(u64),
    /// A recalled message, and the recipient of every offline copy deleted
    /// (so the inbox counts drop by exactly that).
    Message {
        removed: Option<StoredMsg>,
        offline_for: Vec<u64>,
    },
}

impl Outcome {
    pub(super) fn into_removed(self) -> Option<bool> {
        match self {
            Outcome::Removed(removed) => Some(removed),
            _ => None,
        }
    }

    pub(super) fn into_block(self) -> Option<BlockOutcome> {
        match self {
            Outcome::Block(outcome) => Some(outcome),
            _ => None,
        }
    }

    pub(super) fn into_id(self) -> Option<u64> {
        match self {
            Outcome::Id(id) => Some(id),
            _ => None,
        }
    }

    pub(super) fn into_message(self) -> Option<Option<StoredMsg>> {
        match self {
            Outcome::Message { removed, .. } => Some(removed),
            _ => None,
        }
    }
}

/// What refuses an offline whisper, fixed for one batch.
#[derive(Debug, Clone, Copy)]
pub(super) struct OfflineLimits {
    pub(super) per_inbox: u32,
    pub(super) per_sender: u32,
    /// Whispers older than this have expired and no longer count (`None`:
    /// they never expire).
    pub(super) cutoff_ms: Option<u64>,
}

/// `time_ms >= cutoff` as an SQL bound that every row passes when there is
/// no cutoff.
fn sql_cutoff(cutoff_ms: Option<u64>) -> i64 {
    cutoff_ms.map_or(i64::MIN, sql_bound)
}

/// What one prune deleted.
#[derive(Debug, Default)]
pub(super) struct Pruned {
    /// History messages.
    pub(super) messages: u64,
    /// The recipient of each expired whisper deleted, once per whisper, so
    /// the caller can lower the inbox counts by exactly that much.
    pub(super) expired_for: Vec<u64>,
    /// The expiry stopped at its chunk size: more expired whispers remain.
    pub(super) more_expired: bool,
    /// Sanctions past their end.
    pub(super) sanctions: u64,
    /// Announcement keys past [`ANNOUNCE_KEY_MS`].
    pub(super) announce_keys: u64,
}

/// Creates the database file readable by its owner only, or warns about an
/// existing one that others can read: it holds every private whisper.
/// SQLite gives the `-wal` and `-shm` files the database file's mode, so
/// creating this one right covers all three.
fn prepare_file(path: &Path) -> Result<(), OpenError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        let file_error = |source| OpenError::File {
            path: path.to_path_buf(),
            source,
        };
        // An empty file is a valid empty database to SQLite.
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(file_error(e)),
        }
        if let Some(mode) = loose_mode(path).map_err(file_error)? {
            warn!(
                path = %path.display(),
                mode = format_args!("{mode:o}"),
                "history database is readable by group or others and holds private whispers; \
                 chmod 600 it (and its -wal and -shm files)"
            );
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// The permission bits of `path` if group or others have any of them.
#[cfg(unix)]
pub(super) fn loose_mode(path: &Path) -> std::io::Result<Option<u32>> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
    Ok((mode & 0o077 != 0).then_some(mode))
}

/// Brings the schema to [`SCHEMA_VERSION`] in one transaction.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), OpenError> {
    let database = |source| OpenError::Database {
        path: path.to_path_buf(),
        source,
    };
    // IMMEDIATE: the version read and the upgrade are one unit even if an
    // operator's shell has the file open.
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(database)?;
    let version: i64 = tx
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(database)?;
    if version > SCHEMA_VERSION {
        return Err(OpenError::TooNew {
            path: path.to_path_buf(),
            found: version,
            known: SCHEMA_VERSION,
        });
    }
    if version == SCHEMA_VERSION {
        return Ok(());
    }
    for migration in &MIGRATIONS[usize::try_from(version.max(0)).unwrap_or(0)..] {
        tx.execute_batch(migration).map_err(database)?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)
        .map_err(database)?;
    tx.commit().map_err(database)?;
    if version > 0 {
        info!(path = %path.display(), from = version, to = SCHEMA_VERSION, "history database upgraded");
    }
    Ok(())
}

/// One connection to the history database.
pub(super) struct Db {
    conn: Connection,
}

impl Db {
    /// The writer's connection: creates the file (owner-only) and the
    /// schema, upgrades an older schema, WAL mode.
    pub(super) fn open_writer(
        path: &Path,
        sync: Synchronous,
        max_db_bytes: u64,
    ) -> Result<Db, OpenError> {
        let database = |source| OpenError::Database {
            path: path.to_path_buf(),
            source,
        };
        prepare_file(path)?;
        let mut conn = Connection::open(path).map_err(database)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(database)?;
        // WAL: a commit appends to one file (one fsync with FULL) instead
        // of journal + database, and readers on the other connection are
        // never blocked by the writer.
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(database)?;
        if !mode.eq_ignore_ascii_case("wal") {
            // Only an in-memory or exotic VFS refuses WAL; failing loudly
            // beats silently losing the durability and concurrency story.
            return Err(OpenError::NoWal {
                path: path.to_path_buf(),
                mode,
            });
        }
        conn.pragma_update(None, "synchronous", sync.pragma())
            .map_err(database)?;
        conn.pragma_update(None, "journal_size_limit", JOURNAL_SIZE_LIMIT)
            .map_err(database)?;
        migrate(&mut conn, path)?;
        if max_db_bytes > 0 {
            // A size cap: past it SQLite fails writes with SQLITE_FULL,
            // exactly as a full disk would, and the same error path
            // (STORE_FAILED, nothing acknowledged) handles both.
            let page_size: i64 = conn
                .pragma_query_value(None, "page_size", |row| row.get(0))
                .map_err(database)?;
            let pages = (max_db_bytes as i64 / page_size.max(512)).max(1);
            conn.pragma_update(None, "max_page_count", pages)
                .map_err(database)?;
        }
        Ok(Db { conn })
    }

    /// A read-only connection to a database the writer has already set up.
    /// Under WAL it reads the last committed state without ever waiting for
    /// the writer.
    pub(super) fn open_reader(path: &Path) -> Result<Db, OpenError> {
        let database = |source| OpenError::Database {
            path: path.to_path_buf(),
            source,
        };
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags).map_err(database)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(database)?;
        Ok(Db { conn })
    }

    /// The highest msg_id ever recorded (0 if none).
    pub(super) fn high_water(&self) -> rusqlite::Result<u64> {
        let v: Option<i64> = self
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'high_water'",
                [],
                |row| row.get(0),
            )
            .optional()?;
        Ok(v.map_or(0, unsql))
    }

    /// Records `high_water` unless a higher value is already stored.
    fn raise_high_water(conn: &Connection, high_water: u64) -> rusqlite::Result<()> {
        conn.prepare_cached(
            "INSERT INTO meta (key, value) VALUES ('high_water', ?1)
             ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)",
        )?
        .execute([sql(high_water)])?;
        Ok(())
    }

    /// Raises the high-water mark in a transaction of its own.
    pub(super) fn write_high_water(&mut self, high_water: u64) -> rusqlite::Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        Db::raise_high_water(&tx, high_water)?;
        tx.commit()
    }

    /// Applies `ops` in one transaction, with the high-water mark. On `Ok`
    /// everything is committed and each op has its own outcome: a
    /// `StoreOffline` is `Ok(Rows(1))` when stored, `Ok(Rows(0))` when that
    /// whisper was already waiting, or refused (`InboxFull`, `SenderLimit`)
    /// writing nothing; an ack reports how many whispers it deleted; each
    /// moderation op answers with its own variant. On `Err` nothing is.
    ///
    /// Re-appending a message already stored is a no-op, not an error, so
    /// one duplicate cannot fail the other writes of its batch.
    pub(super) fn write_batch<'a>(
        &mut self,
        ops: impl IntoIterator<Item = &'a WriteOp>,
        limits: OfflineLimits,
        high_water: u64,
    ) -> rusqlite::Result<Vec<Result<Outcome, HistoryError>>> {
        // IMMEDIATE takes the write lock now, so a lock conflict (another
        // process) shows up at BEGIN, before any work is done.
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut outcomes = Vec::new();
        for op in ops {
            let outcome = match op {
                WriteOp::Append(msg) => {
                    insert_message(&tx, msg)?;
                    Ok(Outcome::Rows(0))
                }
                WriteOp::StoreOffline { to_user, msg } => {
                    store_offline(&tx, *to_user, msg, limits)?.map(Outcome::Rows)
                }
                WriteOp::AckOffline { user, ids } => {
                    let mut delete = tx
                        .prepare_cached("DELETE FROM offline WHERE to_user = ?1 AND msg_id = ?2")?;
                    let mut deleted = 0;
                    for id in ids {
                        deleted += delete.execute([sql(*user), sql(*id)])?;
                    }
                    Ok(Outcome::Rows(deleted))
                }
                WriteOp::Spill { whispers } => {
                    let mut stored = 0;
                    for (to_user, msg) in whispers {
                        stored += insert_offline(&tx, *to_user, msg)?;
                    }
                    Ok(Outcome::Rows(stored))
                }
                WriteOp::RecordLogin {
                    user,
                    name,
                    time_ms,
                } => {
                    tx.prepare_cached(
                        "INSERT INTO players (user_id, name, last_login_ms) VALUES (?1, ?2, ?3)
                         ON CONFLICT (user_id) DO UPDATE
                         SET name = excluded.name, last_login_ms = excluded.last_login_ms",
                    )?
                    .execute(params![sql(*user), name, sql(*time_ms)])?;
                    Ok(Outcome::Rows(0))
                }
                WriteOp::Moderation(op) => Ok(moderation_write(&tx, op)?),
            };
            outcomes.push(outcome);
        }
        Db::raise_high_water(&tx, high_water)?;
        tx.commit()?;
        Ok(outcomes)
    }

    /// Up to `limit` messages of `conv` older than `before` (0: newest),
    /// newest first, and whether there are more.
    pub(super) fn page(
        &self,
        conv: &Conversation,
        before: u64,
        limit: u32,
    ) -> rusqlite::Result<(Vec<StoredMsg>, bool)> {
        let (kind, id, id2) = conv_key(conv);
        let before = page_bound(before);
        // One row more than asked tells whether another page exists without
        // a COUNT.
        let fetch = i64::from(limit) + 1;
        let mut stmt = self.conn.prepare_cached(concat!(
            "SELECT ",
            msg_columns!(),
            " FROM messages
             WHERE conv_kind = ?1 AND conv_id = ?2 AND conv_id2 = ?3 AND msg_id < ?4
             ORDER BY msg_id DESC LIMIT ?5"
        ))?;
        let mut page = stmt
            .query_map(params![kind, id, id2, before, fetch], read_msg)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let more = page.len() > limit as usize;
        page.truncate(limit as usize);
        Ok((page, more))
    }

    /// How many whispers wait for each player who has any, expired or not:
    /// the inbox counts start from every row a later prune or ack may
    /// delete, so subtracting those deletions can never take them too low.
    /// Every player who blocks anyone.
    pub(super) fn blockers(&self) -> rusqlite::Result<Vec<u64>> {
        let mut stmt = self.conn.prepare("SELECT DISTINCT user_id FROM blocks")?;
        let rows = stmt.query_map([], |row| row.get::<_, i64>(0).map(unsql))?;
        rows.collect()
    }

    pub(super) fn offline_counts(&self) -> rusqlite::Result<Vec<(u64, u32)>> {
        let mut stmt = self
            .conn
            .prepare("SELECT to_user, COUNT(*) FROM offline GROUP BY to_user")?;
        let rows = stmt.query_map([], |row| {
            Ok((row.get::<_, i64>(0)? as u64, row.get::<_, i64>(1)? as u32))
        })?;
        rows.collect()
    }

    /// The whispers waiting for `user`, oldest first, at most `limit`,
    /// leaving out those older than `cutoff_ms`.
    pub(super) fn pending_offline(
        &self,
        user: u64,
        limit: u32,
        cutoff_ms: Option<u64>,
    ) -> rusqlite::Result<Vec<StoredMsg>> {
        let mut stmt = self.conn.prepare_cached(concat!(
            "SELECT ",
            msg_columns!(),
            " FROM offline WHERE to_user = ?1 AND time_ms >= ?2 ORDER BY msg_id LIMIT ?3"
        ))?;
        let rows = stmt.query_map(
            params![sql(user), sql_cutoff(cutoff_ms), i64::from(limit)],
            read_msg,
        )?;
        rows.collect()
    }

    /// A player who has logged in at least once, by id or by the exact name
    /// of their last login (the most recent such login when several
    /// players have used that name).
    pub(super) fn find_player(&self, who: &PlayerRef) -> rusqlite::Result<Option<(u64, String)>> {
        let row = |row: &Row<'_>| Ok((unsql(row.get(0)?), row.get(1)?));
        match who {
            PlayerRef::Id(id) => self
                .conn
                .prepare_cached("SELECT user_id, name FROM players WHERE user_id = ?1")?
                .query_row([sql(*id)], row)
                .optional(),
            PlayerRef::Name(name) => self
                .conn
                .prepare_cached(
                    "SELECT user_id, name FROM players WHERE name = ?1
                     ORDER BY last_login_ms DESC, user_id DESC LIMIT 1",
                )?
                .query_row([name], row)
                .optional(),
        }
    }

    /// `(nonce, msg_id)` of the newest `limit` messages `sender` stored with
    /// a nonce, newest first. Offline whispers count too: with an
    /// unpersisted `private` retention they are the only copy. Each half is
    /// limited before the union so neither walks more than `limit` index
    /// entries.
    pub(super) fn recent_nonces(
        &self,
        sender: u64,
        limit: u32,
    ) -> rusqlite::Result<Vec<(u64, u64)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT nonce, msg_id FROM (
                 SELECT nonce, msg_id FROM messages
                 WHERE sender_id = ?1 AND nonce != 0 ORDER BY msg_id DESC LIMIT ?2)
             UNION
             SELECT nonce, msg_id FROM (
                 SELECT nonce, msg_id FROM offline
                 WHERE sender_id = ?1 AND nonce != 0 ORDER BY msg_id DESC LIMIT ?2)
             ORDER BY msg_id DESC LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![sql(sender), i64::from(limit)], |row| {
            Ok((unsql(row.get(0)?), unsql(row.get(1)?)))
        })?;
        rows.collect()
    }

    /// The sanctions in force at `now_ms` and every revocation, from one
    /// read transaction so both lists are the same moment's. Sorted here,
    /// as [`blocks`](Self::blocks) is, so ids past 2^63 sort as ids.
    pub(super) fn moderation(&self, now_ms: u64) -> rusqlite::Result<Moderation> {
        // Deferred: on this read-only connection it only pins a snapshot.
        let tx = self.conn.unchecked_transaction()?;
        let mut sanctions = tx
            .prepare_cached(
                "SELECT user_id, kind, until_ms, reason, set_ms FROM sanctions
                 WHERE until_ms > ?1",
            )?
            .query_map([sql_bound(now_ms)], |row| {
                let code = row.get(1)?;
                Ok(Sanction {
                    user: unsql(row.get(0)?),
                    kind: sanction_kind(code).ok_or_else(|| unknown_kind(1, "sanction", code))?,
                    until_ms: unsql_bound(row.get(2)?),
                    reason: row.get(3)?,
                    set_ms: unsql(row.get(4)?),
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let mut revocations = tx
            .prepare_cached("SELECT user_id, before_s FROM revocations")?
            .query_map([], |row| Ok((unsql(row.get(0)?), unsql_bound(row.get(1)?))))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        tx.finish()?;
        sanctions.sort_unstable_by_key(|s: &Sanction| (s.user, sanction_code(s.kind)));
        revocations.sort_unstable();
        Ok(Moderation {
            sanctions,
            revocations,
        })
    }

    /// Who `user` has blocked, in increasing id order. Sorted here rather
    /// than by SQL because ids are stored bit for bit: an id from 2^63 on
    /// sorts negative in SQLite.
    pub(super) fn blocks(&self, user: u64) -> rusqlite::Result<Vec<u64>> {
        let mut blocked = self
            .conn
            .prepare_cached("SELECT blocked_id FROM blocks WHERE user_id = ?1")?
            .query_map([sql(user)], |row| row.get(0).map(unsql))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        blocked.sort_unstable();
        Ok(blocked)
    }

    /// Up to `limit` audit entries with id < `before` (0: newest), newest
    /// first.
    /// The msg_id an announce key was claimed for, if claimed less than
    /// [`ANNOUNCE_KEY_MS`] before `now_ms`.
    pub(super) fn announce_seen(&self, key: &str, now_ms: u64) -> rusqlite::Result<Option<u64>> {
        let cutoff = sql_bound(now_ms.saturating_sub(ANNOUNCE_KEY_MS));
        self.conn
            .prepare_cached("SELECT msg_id FROM announce_keys WHERE key = ?1 AND time_ms > ?2")?
            .query_row(params![key, cutoff], |row| row.get::<_, i64>(0))
            .optional()
            .map(|id| id.map(unsql))
    }

    pub(super) fn audit_page(&self, before: u64, limit: u32) -> rusqlite::Result<Vec<AuditEntry>> {
        let before = if before == 0 {
            i64::MAX
        } else {
            sql_bound(before)
        };
        self.conn
            .prepare_cached(
                "SELECT id, time_ms, key_id, action, target, reason, result FROM audit
                 WHERE id < ?1 ORDER BY id DESC LIMIT ?2",
            )?
            .query_map(params![before, i64::from(limit)], |row| {
                Ok(AuditEntry {
                    id: unsql(row.get(0)?),
                    time_ms: unsql(row.get(1)?),
                    key_id: row.get(2)?,
                    action: row.get(3)?,
                    target: row.get(4)?,
                    reason: row.get(5)?,
                    result: row.get(6)?,
                })
            })?
            .collect()
    }

    /// `sender`'s newest `limit` history messages from `since_ms` on,
    /// newest first. Walks `messages_by_sender` backwards and stops at
    /// `limit`.
    pub(super) fn messages_by_sender(
        &self,
        sender: u64,
        since_ms: u64,
        limit: u32,
    ) -> rusqlite::Result<Vec<StoredMsg>> {
        self.conn
            .prepare_cached(concat!(
                "SELECT ",
                msg_columns!(),
                " FROM messages INDEXED BY messages_by_sender
                 WHERE sender_id = ?1 AND time_ms >= ?2 ORDER BY msg_id DESC LIMIT ?3"
            ))?
            .query_map(
                params![sql(sender), sql_bound(since_ms), i64::from(limit)],
                read_msg,
            )?
            .collect()
    }

    /// Deletes what retention no longer keeps, in one transaction: by count
    /// in each of `grown` (the conversations written since the last prune,
    /// the only ones that can have gone over), by age in every kind, and up
    /// to [`OFFLINE_PRUNE_CHUNK`] offline whispers past `offline_ttl_days`;
    /// also the sanctions that have ended and the announcement keys older
    /// than [`ANNOUNCE_KEY_MS`].
    pub(super) fn prune<'a>(
        &mut self,
        grown: impl IntoIterator<Item = &'a Conversation>,
        config: &HistoryConfig,
        now_ms: u64,
    ) -> rusqlite::Result<Pruned> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut pruned = Pruned::default();
        for conv in grown {
            let keep = config.retention(conv).keep_count;
            if keep == 0 {
                continue;
            }
            let (kind, id, id2) = conv_key(conv);
            // The subquery finds the oldest message to keep (NULL when there
            // are fewer than `keep`, which deletes nothing); it walks `keep`
            // index entries, never the whole conversation.
            pruned.messages +=
                tx.prepare_cached(
                    "DELETE FROM messages
                     WHERE conv_kind = ?1 AND conv_id = ?2 AND conv_id2 = ?3 AND msg_id < (
                         SELECT msg_id FROM messages
                         WHERE conv_kind = ?1 AND conv_id = ?2 AND conv_id2 = ?3
                         ORDER BY msg_id DESC LIMIT 1 OFFSET ?4)",
                )?
                .execute(params![kind, id, id2, i64::from(keep) - 1])? as u64;
        }
        for (kind, retention) in config.kinds() {
            if retention.keep_days == 0 {
                continue;
            }
            let cutoff = now_ms.saturating_sub(u64::from(retention.keep_days) * DAY_MS);
            pruned.messages +=
                tx.prepare_cached("DELETE FROM messages WHERE conv_kind = ?1 AND time_ms < ?2")?
                    .execute(params![kind as i64, sql_bound(cutoff)])? as u64;
        }
        if let Some(cutoff) = config.offline_cutoff_ms(now_ms) {
            // RETURNING names each deleted whisper's recipient, so the inbox
            // counts drop by exactly what was deleted.
            let mut stmt = tx.prepare_cached(
                "DELETE FROM offline WHERE (to_user, msg_id) IN (
                     SELECT to_user, msg_id FROM offline WHERE time_ms < ?1 LIMIT ?2)
                 RETURNING to_user",
            )?;
            pruned.expired_for = stmt
                .query_map(params![sql_bound(cutoff), OFFLINE_PRUNE_CHUNK], |row| {
                    row.get::<_, i64>(0).map(unsql)
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            pruned.more_expired = pruned.expired_for.len() as i64 >= OFFLINE_PRUNE_CHUNK;
        }
        // Both tables stay small (one row per sanctioned player, one per
        // announcement a day), so a scan is cheaper than another index to
        // maintain.
        pruned.sanctions = tx
            .prepare_cached("DELETE FROM sanctions WHERE until_ms <= ?1")?
            .execute([sql_bound(now_ms)])? as u64;
        pruned.announce_keys =
            tx.prepare_cached("DELETE FROM announce_keys WHERE time_ms <= ?1")?
                .execute([sql_bound(now_ms.saturating_sub(ANNOUNCE_KEY_MS))])? as u64;
        tx.commit()?;
        Ok(pruned)
    }

    /// Test hook simulating a full disk, chosen because it works as root
    /// (file permissions do not stop root): `full` caps the database at its
    /// current size (`PRAGMA max_page_count`), so the next write needing a
    /// new page fails with SQLITE_FULL exactly as a full disk would; `!full`
    /// lifts the cap.
    #[cfg(test)]
    pub(super) fn limit_pages(&self, full: bool) -> rusqlite::Result<()> {
        let pages: i64 = if full {
            self.conn
                .pragma_query_value(None, "page_count", |row| row.get(0))?
        } else {
            // SQLite's own ceiling; it clamps anything larger.
            4_294_967_294
        };
        self.conn.pragma_update(None, "max_page_count", pages)
    }
}

fn insert_message(conn: &Connection, m: &StoredMsg) -> rusqlite::Result<()> {
    let (kind, id, id2) = conv_key(&m.conversation);
    conn.prepare_cached(concat!(
        "INSERT OR IGNORE INTO messages (",
        msg_columns!(),
        ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)"
    ))?
    .execute(params![
        kind,
        id,
        id2,
        sql(m.msg_id),
        m.chattype,
        sql(m.sender_id),
        m.sender_name,
        m.text,
        sql(m.time_ms),
        sql(m.guild_id),
        sql(m.team_id),
        sql(m.scene_id),
        sql(m.target_id),
        m.target_name,
        sql(m.nonce),
    ])?;
    Ok(())
}

/// One game-master write inside a batch's transaction.
fn moderation_write(tx: &Connection, op: &ModWrite) -> rusqlite::Result<Outcome> {
    Ok(match op {
        ModWrite::SetSanction {
            user,
            kind,
            until_ms,
            reason,
            set_ms,
        } => {
            tx.prepare_cached(
                "INSERT INTO sanctions (user_id, kind, until_ms, reason, set_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (user_id, kind) DO UPDATE
                 SET until_ms = excluded.until_ms, reason = excluded.reason,
                     set_ms = excluded.set_ms",
            )?
            .execute(params![
                sql(*user),
                sanction_code(*kind),
                sql_bound(*until_ms),
                reason,
                sql(*set_ms)
            ])?;
            Outcome::Rows(0)
        }
        ModWrite::ClearSanction { user, kind } => {
            let deleted = tx
                .prepare_cached("DELETE FROM sanctions WHERE user_id = ?1 AND kind = ?2")?
                .execute(params![sql(*user), sanction_code(*kind)])?;
            Outcome::Removed(deleted > 0)
        }
        ModWrite::RevokeTokens { user, before_s } => {
            tx.prepare_cached(
                "INSERT INTO revocations (user_id, before_s) VALUES (?1, ?2)
                 ON CONFLICT (user_id) DO UPDATE
                 SET before_s = max(before_s, excluded.before_s)",
            )?
            .execute(params![sql(*user), sql_bound(*before_s)])?;
            Outcome::Rows(0)
        }
        ModWrite::Block {
            user,
            blocked,
            since_ms,
            cap,
        } => Outcome::Block(block(tx, *user, *blocked, *since_ms, *cap)?),
        ModWrite::Unblock { user, blocked } => {
            let deleted = tx
                .prepare_cached("DELETE FROM blocks WHERE user_id = ?1 AND blocked_id = ?2")?
                .execute([sql(*user), sql(*blocked)])?;
            Outcome::Removed(deleted > 0)
        }
        ModWrite::Audit(entry) => {
            let id: i64 = tx
                .prepare_cached(
                    "INSERT INTO audit (time_ms, key_id, action, target, reason, result)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6) RETURNING id",
                )?
                .query_row(
                    params![
                        sql(entry.time_ms),
                        entry.key_id,
                        entry.action,
                        entry.target,
                        entry.reason,
                        entry.result
                    ],
                    |row| row.get(0),
                )?;
            Outcome::Id(unsql(id))
        }
        ModWrite::AnnounceKey {
            key,
            msg_id,
            now_ms,
        } => {
            // One statement: insert the claim, or replace one that is too
            // old; a live claim is left alone and read back below.
            let fresh_from = now_ms.saturating_sub(ANNOUNCE_KEY_MS).saturating_add(1);
            tx.prepare_cached(
                "INSERT INTO announce_keys (key, msg_id, time_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (key) DO UPDATE
                 SET msg_id = excluded.msg_id, time_ms = excluded.time_ms
                 WHERE time_ms < ?4",
            )?
            .execute(params![
                key,
                sql(*msg_id),
                sql_bound(*now_ms),
                sql_bound(fresh_from)
            ])?;
            let owner: i64 = tx
                .prepare_cached("SELECT msg_id FROM announce_keys WHERE key = ?1")?
                .query_row([key], |row| row.get(0))?;
            Outcome::Id(unsql(owner))
        }
        ModWrite::RemoveMessage { msg_id } => {
            let removed = tx
                .prepare_cached(concat!(
                    "DELETE FROM messages WHERE msg_id = ?1 RETURNING ",
                    msg_columns!()
                ))?
                .query_map([sql(*msg_id)], read_msg)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let mut offline_for = Vec::new();
            let mut offline_copy = None;
            let mut stmt = tx.prepare_cached(concat!(
                "DELETE FROM offline WHERE msg_id = ?1 RETURNING to_user, ",
                msg_columns!()
            ))?;
            let mut rows = stmt.query([sql(*msg_id)])?;
            while let Some(row) = rows.next()? {
                offline_for.push(unsql(row.get(0)?));
                if offline_copy.is_none() {
                    offline_copy = Some(read_msg_at(row, 1)?);
                }
            }
            Outcome::Message {
                removed: removed.into_iter().next().or(offline_copy),
                offline_for,
            }
        }
    })
}

/// `user` blocks `blocked` unless already so or at `cap`.
fn block(
    tx: &Connection,
    user: u64,
    blocked: u64,
    since_ms: u64,
    cap: usize,
) -> rusqlite::Result<BlockOutcome> {
    let exists = tx
        .prepare_cached("SELECT 1 FROM blocks WHERE user_id = ?1 AND blocked_id = ?2")?
        .exists([sql(user), sql(blocked)])?;
    if exists {
        return Ok(BlockOutcome::Already);
    }
    let count: i64 = tx
        .prepare_cached("SELECT COUNT(*) FROM blocks WHERE user_id = ?1")?
        .query_row([sql(user)], |row| row.get(0))?;
    if usize::try_from(count).unwrap_or(usize::MAX) >= cap {
        return Ok(BlockOutcome::Full);
    }
    tx.prepare_cached("INSERT INTO blocks (user_id, blocked_id, since_ms) VALUES (?1, ?2, ?3)")?
        .execute([sql(user), sql(blocked), sql(since_ms)])?;
    Ok(BlockOutcome::Added)
}

/// One offline store inside a batch's transaction: a no-op if that whisper
/// is already waiting (a retried store must not be refused by the inbox it
/// already fills), else refused when the recipient's inbox or the sender's
/// quota is full, counting only unexpired whispers.
fn store_offline(
    tx: &Connection,
    to_user: u64,
    msg: &StoredMsg,
    limits: OfflineLimits,
) -> rusqlite::Result<Result<usize, HistoryError>> {
    let exists = tx
        .prepare_cached("SELECT 1 FROM offline WHERE to_user = ?1 AND msg_id = ?2")?
        .exists([sql(to_user), sql(msg.msg_id)])?;
    if exists {
        return Ok(Ok(0));
    }
    let cutoff = sql_cutoff(limits.cutoff_ms);
    let in_inbox: i64 = tx
        .prepare_cached("SELECT COUNT(*) FROM offline WHERE to_user = ?1 AND time_ms >= ?2")?
        .query_row([sql(to_user), cutoff], |row| row.get(0))?;
    if in_inbox >= i64::from(limits.per_inbox) {
        return Ok(Err(HistoryError::InboxFull));
    }
    let from_sender: i64 = tx
        .prepare_cached("SELECT COUNT(*) FROM offline WHERE sender_id = ?1 AND time_ms >= ?2")?
        .query_row([sql(msg.sender_id), cutoff], |row| row.get(0))?;
    if from_sender >= i64::from(limits.per_sender) {
        return Ok(Err(HistoryError::SenderLimit));
    }
    insert_offline(tx, to_user, msg)?;
    Ok(Ok(1))
}

/// Returns how many rows it added (0: that whisper was already waiting).
fn insert_offline(conn: &Connection, to_user: u64, m: &StoredMsg) -> rusqlite::Result<usize> {
    let (kind, id, id2) = conv_key(&m.conversation);
    let added = conn
        .prepare_cached(concat!(
            "INSERT OR IGNORE INTO offline (to_user, ",
            msg_columns!(),
            ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)"
        ))?
        .execute(params![
            sql(to_user),
            kind,
            id,
            id2,
            sql(m.msg_id),
            m.chattype,
            sql(m.sender_id),
            m.sender_name,
            m.text,
            sql(m.time_ms),
            sql(m.guild_id),
            sql(m.team_id),
            sql(m.scene_id),
            sql(m.target_id),
            m.target_name,
            sql(m.nonce),
        ])?;
    Ok(added)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversation_keys_round_trip() {
        let all = [
            Conversation::World,
            Conversation::System,
            Conversation::Guild(7),
            Conversation::Team(u64::MAX),
            Conversation::Scene(1 << 63),
            Conversation::between(u64::MAX, 3),
        ];
        for c in all {
            let (kind, id, id2) = conv_key(&c);
            assert_eq!(conversation(kind, id, id2), Some(c));
        }
        assert_eq!(conversation(99, 0, 0), None);
    }

    #[test]
    fn bounds_past_i64_mean_unbounded() {
        assert_eq!(sql_bound(u64::MAX), i64::MAX);
        assert_eq!(sql_bound(5), 5);
    }
}
