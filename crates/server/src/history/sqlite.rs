//! The schema and every SQL statement of the history store.
//!
//! Synchronous code over one `rusqlite::Connection`. It owns the table
//! layout and how ids are encoded; it never sees a channel or an async
//! runtime, and it runs only on the store's own writer and reader threads.
//!
//! Layout: `messages` is keyed by (conversation, msg_id) without a rowid,
//! so a page is one range scan of the primary key; `messages_by_age` lets
//! age-based retention delete by range instead of scanning; `offline` is
//! keyed by (recipient, msg_id); `meta` holds the msg_id high-water mark.

use std::path::Path;
use std::time::Duration;

use rusqlite::types::Type;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Row, TransactionBehavior};

use super::config::{HistoryConfig, Synchronous};
use super::{Conversation, HistoryError, OpenError, StoredMsg};

/// The database file inside the data directory.
pub(super) const FILE_NAME: &str = "history.sqlite3";

/// `PRAGMA user_version` of the schema below. A database with a higher
/// version was written by a newer server and is refused rather than
/// misread.
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
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
";

/// The columns every read selects, in the order [`read_msg`] expects.
/// Both tables have them under the same names. A macro rather than a const
/// so `concat!` can build each statement's text at compile time.
macro_rules! msg_columns {
    () => {
        "conv_kind, conv_id, conv_id2, msg_id, chattype, sender_id, sender_name, text, \
         time_ms, guild_id, team_id, scene_id, target_id, target_name"
    };
}

/// How long a statement waits for a lock held by another connection (an
/// operator's `sqlite3` shell, a checkpoint) before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// WAL size kept after a checkpoint, so one burst does not leave a huge
/// file behind.
const JOURNAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;

const DAY_MS: u64 = 24 * 60 * 60 * 1000;

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

/// SQLite integers are signed 64-bit, so ids are stored bit for bit.
/// User, guild... ids are only compared for equality, which that keeps
/// exact over the whole `u64` range; msg_ids and times are also compared
/// with `<`, which is right while they stay below 2^63.
fn sql(v: u64) -> i64 {
    v as i64
}

fn unsql(v: i64) -> u64 {
    v as u64
}

/// A client-supplied upper bound as an SQL one: anything past `i64::MAX`
/// means "no bound" rather than wrapping negative.
fn sql_bound(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// `(conv_kind, conv_id, conv_id2)` of a conversation.
fn conv_key(c: &Conversation) -> (i64, i64, i64) {
    match *c {
        Conversation::World => (Kind::World as i64, 0, 0),
        Conversation::System => (Kind::System as i64, 0, 0),
        Conversation::Guild(id) => (Kind::Guild as i64, sql(id), 0),
        Conversation::Team(id) => (Kind::Team as i64, sql(id), 0),
        Conversation::Scene(id) => (Kind::Scene as i64, sql(id), 0),
        Conversation::Whisper { low, high } => (Kind::Whisper as i64, sql(low), sql(high)),
    }
}

/// A `conv_kind` this server does not know: the file was written by
/// something else.
#[derive(Debug, thiserror::Error)]
#[error("unknown conversation kind {0}")]
struct UnknownKind(i64);

fn conversation(kind: i64, id: i64, id2: i64) -> Option<Conversation> {
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
    let kind: i64 = row.get(0)?;
    let conversation = conversation(kind, row.get(1)?, row.get(2)?).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(0, Type::Integer, Box::new(UnknownKind(kind)))
    })?;
    Ok(StoredMsg {
        msg_id: unsql(row.get(3)?),
        conversation,
        chattype: row.get(4)?,
        sender_id: unsql(row.get(5)?),
        sender_name: row.get(6)?,
        text: row.get(7)?,
        time_ms: unsql(row.get(8)?),
        guild_id: unsql(row.get(9)?),
        team_id: unsql(row.get(10)?),
        scene_id: unsql(row.get(11)?),
        target_id: unsql(row.get(12)?),
        target_name: row.get(13)?,
    })
}

/// One write of a group commit.
#[derive(Debug)]
pub(super) enum WriteOp {
    Append(StoredMsg),
    StoreOffline { to_user: u64, msg: StoredMsg },
    AckOffline { user: u64, up_to: u64 },
}

/// One connection to the history database.
pub(super) struct Db {
    conn: Connection,
}

impl Db {
    /// The writer's connection: creates the file and schema, WAL mode.
    pub(super) fn open_writer(
        path: &Path,
        sync: Synchronous,
        max_db_bytes: u64,
    ) -> Result<Db, OpenError> {
        let database = |source| OpenError::Database {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open(path).map_err(database)?;
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

        let version: i64 = conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(database)?;
        if version > SCHEMA_VERSION {
            return Err(OpenError::TooNew {
                path: path.to_path_buf(),
                found: version,
                known: SCHEMA_VERSION,
            });
        }
        conn.execute_batch(SCHEMA).map_err(database)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(database)?;
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
    /// everything is committed and each op has its own outcome (only
    /// `StoreOffline` can be refused, with `InboxFull`, which writes
    /// nothing; an `AckOffline` reports how many whispers it deleted). On
    /// `Err` nothing is.
    ///
    /// Re-appending a message already stored is a no-op, not an error, so
    /// one duplicate cannot fail the other writes of its batch.
    pub(super) fn write_batch<'a>(
        &mut self,
        ops: impl IntoIterator<Item = &'a WriteOp>,
        max_offline: u32,
        high_water: u64,
    ) -> rusqlite::Result<Vec<Result<usize, HistoryError>>> {
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
                    Ok(0)
                }
                WriteOp::StoreOffline { to_user, msg } => {
                    let waiting: i64 = tx
                        .prepare_cached("SELECT COUNT(*) FROM offline WHERE to_user = ?1")?
                        .query_row([sql(*to_user)], |row| row.get(0))?;
                    if waiting >= i64::from(max_offline) {
                        Err(HistoryError::InboxFull)
                    } else {
                        insert_offline(&tx, *to_user, msg)?;
                        Ok(0)
                    }
                }
                WriteOp::AckOffline { user, up_to } => Ok(tx
                    .prepare_cached("DELETE FROM offline WHERE to_user = ?1 AND msg_id <= ?2")?
                    .execute([sql(*user), sql_bound(*up_to)])?),
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
        let before = if before == 0 {
            i64::MAX
        } else {
            sql_bound(before)
        };
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

    /// How many whispers wait for each player who has any.
    pub(super) fn offline_counts(&self) -> rusqlite::Result<Vec<(u64, u32)>> {
        let mut stmt = self
            .conn
            .prepare("SELECT to_user, COUNT(*) FROM offline GROUP BY to_user")?;
        let rows = stmt.query_map([], |row| {
            Ok((row.get::<_, i64>(0)? as u64, row.get::<_, i64>(1)? as u32))
        })?;
        rows.collect()
    }

    /// The whispers waiting for `user`, oldest first, at most `limit`.
    pub(super) fn pending_offline(
        &self,
        user: u64,
        limit: u32,
    ) -> rusqlite::Result<Vec<StoredMsg>> {
        let mut stmt = self.conn.prepare_cached(concat!(
            "SELECT ",
            msg_columns!(),
            " FROM offline WHERE to_user = ?1 ORDER BY msg_id LIMIT ?2"
        ))?;
        let rows = stmt.query_map(params![sql(user), i64::from(limit)], read_msg)?;
        rows.collect()
    }

    /// Deletes what retention no longer keeps, in one transaction: by count
    /// in each of `grown` (the conversations written since the last prune,
    /// the only ones that can have gone over), by age in every kind.
    /// Returns how many messages were deleted.
    pub(super) fn prune<'a>(
        &mut self,
        grown: impl IntoIterator<Item = &'a Conversation>,
        config: &HistoryConfig,
        now_ms: u64,
    ) -> rusqlite::Result<u64> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut deleted = 0;
        for conv in grown {
            let keep = config.retention(conv).keep_count;
            if keep == 0 {
                continue;
            }
            let (kind, id, id2) = conv_key(conv);
            // The subquery finds the oldest message to keep (NULL when there
            // are fewer than `keep`, which deletes nothing); it walks `keep`
            // index entries, never the whole conversation.
            deleted += tx
                .prepare_cached(
                    "DELETE FROM messages
                     WHERE conv_kind = ?1 AND conv_id = ?2 AND conv_id2 = ?3 AND msg_id < (
                         SELECT msg_id FROM messages
                         WHERE conv_kind = ?1 AND conv_id = ?2 AND conv_id2 = ?3
                         ORDER BY msg_id DESC LIMIT 1 OFFSET ?4)",
                )?
                .execute(params![kind, id, id2, i64::from(keep) - 1])?;
        }
        for (kind, retention) in config.kinds() {
            if retention.keep_days == 0 {
                continue;
            }
            let cutoff = now_ms.saturating_sub(u64::from(retention.keep_days) * DAY_MS);
            deleted += tx
                .prepare_cached("DELETE FROM messages WHERE conv_kind = ?1 AND time_ms < ?2")?
                .execute(params![kind as i64, sql_bound(cutoff)])?;
        }
        tx.commit()?;
        Ok(deleted as u64)
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
        ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"
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
    ])?;
    Ok(())
}

fn insert_offline(conn: &Connection, to_user: u64, m: &StoredMsg) -> rusqlite::Result<()> {
    let (kind, id, id2) = conv_key(&m.conversation);
    conn.prepare_cached(concat!(
        "INSERT OR IGNORE INTO offline (to_user, ",
        msg_columns!(),
        ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)"
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
    ])?;
    Ok(())
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
