//! Chat lines in PostgreSQL (`history.url`): one database that every node
//! of a cluster shares, or a single server's alternative to keeping its
//! lines in its SQLite file.
//!
//! It owns the connection to that database, the task that group-inserts
//! lines, and the retention of lines there (table `gc_lines`). Only chat
//! lines live here: offline whispers, the players table and the
//! game-master records stay where they are without it (the SQLite file, or
//! NATS in a cluster). It must never block a runtime thread (tokio-postgres
//! is asynchronous), never make the world wait (an append into a full
//! queue fails at once), and never decide what is stored or for whom.
//!
//! Every line is written once, by the node that gave it its msg_id, keyed
//! by that msg_id: a retried write of the same line (a client's retry
//! answered by JetStream's duplicate window) stores nothing new.

use std::collections::HashSet;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_postgres::{Client, NoTls, Row, Statement};
use tracing::{debug, info, warn};

use super::config::DAY_MS;
use super::sqlite::{conv_key, conversation, page_bound, sql, sql_bound, unsql, Kind};
use super::{now_ms, Conversation, HistoryError, OpenError, Shared, StoredMsg};

/// Lines waiting for the insert task. When it is full the database is not
/// keeping up: an append is refused at once with
/// [`HistoryError::Unavailable`] (the sender gets `RES_STORE_FAILED`),
/// because the world never waits on the database. The same size as the
/// SQLite writer's queue.
const WRITE_QUEUE: usize = 8192;

/// Reads in flight at once (pages, look-ups); more wait for a permit. A
/// page is one player's request, so waiting slows only that player.
const READS_IN_FLIGHT: usize = 64;

/// How long one statement (or a connection attempt) may take before the
/// caller is told the database is unavailable.
const OP_TIMEOUT: Duration = Duration::from_secs(5);

/// The least time between two connection attempts, so that a database
/// that is down costs one attempt a second, not one per line.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);

/// The schema version this server writes; a database with a newer one is
/// refused at start.
const SCHEMA_VERSION: i32 = 1;

/// Taken while the schema is created, so nodes starting together do not
/// race on `CREATE TABLE IF NOT EXISTS` (which is not safe concurrently).
const SCHEMA_LOCK: i64 = 0x6763_6c69_6e65; // "gcline"

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS gc_schema (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS gc_lines (
    msg_id      BIGINT   PRIMARY KEY,
    conv_kind   SMALLINT NOT NULL,
    conv_id     BIGINT   NOT NULL,
    conv_id2    BIGINT   NOT NULL,
    chattype    INTEGER  NOT NULL,
    sender_id   BIGINT   NOT NULL,
    sender_name TEXT     NOT NULL,
    text        TEXT     NOT NULL,
    time_ms     BIGINT   NOT NULL,
    guild_id    BIGINT   NOT NULL,
    team_id     BIGINT   NOT NULL,
    scene_id    BIGINT   NOT NULL,
    target_id   BIGINT   NOT NULL,
    target_name TEXT     NOT NULL,
    nonce       BIGINT   NOT NULL
);
CREATE INDEX IF NOT EXISTS gc_lines_by_conv ON gc_lines (conv_kind, conv_id, conv_id2, msg_id);
CREATE INDEX IF NOT EXISTS gc_lines_by_age ON gc_lines (conv_kind, time_ms);
CREATE INDEX IF NOT EXISTS gc_lines_by_sender ON gc_lines (sender_id, msg_id);
";

/// The columns every read selects, in the order [`read_line`] expects.
macro_rules! line_columns {
    () => {
        "conv_kind, conv_id, conv_id2, msg_id, chattype, sender_id, sender_name, text, \
         time_ms, guild_id, team_id, scene_id, target_id, target_name, nonce"
    };
}

const INSERT: &str = concat!(
    "INSERT INTO gc_lines (",
    line_columns!(),
    ") SELECT * FROM UNNEST($1::int2[], $2::int8[], $3::int8[], $4::int8[], $5::int4[], \
     $6::int8[], $7::text[], $8::text[], $9::int8[], $10::int8[], $11::int8[], $12::int8[], \
     $13::int8[], $14::text[], $15::int8[]) ON CONFLICT (msg_id) DO NOTHING RETURNING msg_id"
);

const PAGE: &str = concat!(
    "SELECT ",
    line_columns!(),
    " FROM gc_lines WHERE conv_kind = $1 AND conv_id = $2 AND conv_id2 = $3 AND msg_id < $4 \
     ORDER BY msg_id DESC LIMIT $5"
);

/// One connection with its statements prepared.
struct Link {
    client: Client,
    insert: Statement,
    page: Statement,
}

/// A new connection, its I/O driven by a task of its own that ends with
/// it.
async fn open_client(config: &tokio_postgres::Config) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            debug!(error = %e, "history database connection ended");
        }
    });
    Ok(client)
}

impl Link {
    /// A new connection, with the schema made again if the database lost
    /// it (restored empty, or replaced) since the server started.
    async fn open(config: &tokio_postgres::Config) -> Result<Link, String> {
        let client = open_client(config).await.map_err(|e| describe(&e))?;
        prepare_schema(&client).await.map_err(|e| e.to_string())?;
        Link::prepare(client).await.map_err(|e| describe(&e))
    }

    /// Prepares the statements on `client` (the schema must exist).
    async fn prepare(client: Client) -> Result<Link, tokio_postgres::Error> {
        let insert = client.prepare(INSERT).await?;
        let page = client.prepare(PAGE).await?;
        Ok(Link {
            client,
            insert,
            page,
        })
    }
}

/// The state the handles and the insert task share.
struct Inner {
    config: tokio_postgres::Config,
    /// The handle's counters and commit observer, so the store's stats and
    /// metrics count these commits as they would SQLite's.
    shared: Arc<Shared>,
    link: Mutex<Option<Arc<Link>>>,
    /// When a connection was last attempted; held while one is.
    attempt: tokio::sync::Mutex<Option<Instant>>,
    /// Whether the last attempt or statement reached the database; changes
    /// are logged once each way.
    up: AtomicBool,
    reads: Semaphore,
    /// Conversations this node wrote to since its last prune: the only
    /// ones its writes can have taken over their `keep_count`.
    grown: Mutex<HashSet<Conversation>>,
}

/// PostgreSQL's side of the history store. Cheap to clone; the insert task
/// ends, after inserting what is queued, once every clone is dropped.
#[derive(Clone)]
pub(super) struct Lines {
    writes: mpsc::Sender<Pending>,
    inner: Arc<Inner>,
}

/// A line waiting for its insert, and who waits for it.
struct Pending {
    msg: StoredMsg,
    respond_to: oneshot::Sender<Result<(), HistoryError>>,
}

/// Ends once the insert task has inserted what was queued and stopped.
pub(super) type Finished = std::sync::mpsc::Receiver<()>;

/// Whether `url` names a PostgreSQL database this server can connect to;
/// the reason otherwise.
pub(super) fn check_url(url: &str) -> Result<(), String> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err("must be a postgres:// or postgresql:// URL".into());
    }
    tokio_postgres::Config::from_str(url)
        .map(drop)
        .map_err(|e| format!("is not a PostgreSQL URL: {e}"))
}

impl Lines {
    /// Connects to the database at `url`, creates (or checks) the schema
    /// and starts the insert and retention tasks. Returns the handle, the
    /// highest msg_id the database holds (0 if none), and what ends when
    /// the insert task has finished. Call inside a runtime.
    pub(super) async fn connect(
        url: &str,
        shared: Arc<Shared>,
    ) -> Result<(Lines, u64, Finished), OpenError> {
        check_url(url).map_err(OpenError::Config)?;
        let mut config = tokio_postgres::Config::from_str(url)
            .map_err(|e| OpenError::Config(format!("history.url: {e}")))?;
        config.connect_timeout(OP_TIMEOUT);
        config.application_name("guildchat");
        // A database that stops answering (a partition, a hung host) must
        // be found out in seconds, not at the kernel's TCP timeout: the
        // socket gives up on unacknowledged data after OP_TIMEOUT, and
        // idle links are probed. The server abandons a statement before
        // this side stops waiting for it, so a statement this side gave
        // up on has almost always been rolled back there too.
        config.tcp_user_timeout(OP_TIMEOUT);
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(10));
        config.keepalives_interval(Duration::from_secs(2));
        config.keepalives_retries(3);
        let statement_timeout = format!(
            "-c statement_timeout={}",
            OP_TIMEOUT.as_millis().saturating_sub(1000)
        );
        let options = match config.get_options() {
            Some(theirs) if !theirs.is_empty() => format!("{theirs} {statement_timeout}"),
            _ => statement_timeout,
        };
        config.options(options);
        let database = |e: String| OpenError::Postgres(e);
        let client = tokio::time::timeout(OP_TIMEOUT, open_client(&config))
            .await
            .map_err(|_| database("no answer within 5 s".into()))?
            .map_err(|e| database(describe(&e)))?;
        let high = tokio::time::timeout(OP_TIMEOUT, prepare_schema(&client))
            .await
            .map_err(|_| database("no answer within 5 s".into()))??;
        let link = tokio::time::timeout(OP_TIMEOUT, Link::prepare(client))
            .await
            .map_err(|_| database("no answer within 5 s".into()))?
            .map_err(|e| database(describe(&e)))?;
        let inner = Arc::new(Inner {
            config,
            shared,
            link: Mutex::new(Some(Arc::new(link))),
            attempt: tokio::sync::Mutex::new(None),
            up: AtomicBool::new(true),
            reads: Semaphore::new(READS_IN_FLIGHT),
            grown: Mutex::new(HashSet::new()),
        });
        let (writes, queue) = mpsc::channel(WRITE_QUEUE);
        let (done, finished) = std::sync::mpsc::sync_channel(0);
        tokio::spawn(insert_loop(inner.clone(), queue, done));
        tokio::spawn(upkeep(Arc::downgrade(&inner)));
        Ok((Lines { writes, inner }, high, finished))
    }

    /// Queues a line for the next insert. The receiver resolves once the
    /// insert holding it has committed (`Ok`, also when the line was already
    /// stored) or failed. Never waits: a full queue resolves at once with
    /// `Unavailable`.
    pub(super) fn append(&self, msg: StoredMsg) -> oneshot::Receiver<Result<(), HistoryError>> {
        let (respond_to, rx) = oneshot::channel();
        if let Err(e) = self.writes.try_send(Pending { msg, respond_to }) {
            let (mpsc::error::TrySendError::Full(p) | mpsc::error::TrySendError::Closed(p)) = e;
            self.inner.shared.counters.queue_full.fetch_add(1, Relaxed);
            let _ = p.respond_to.send(Err(HistoryError::Unavailable));
        }
        rx
    }

    /// Whether the database answered the last time it was asked.
    pub(super) fn reachable(&self) -> bool {
        self.inner.up.load(Relaxed)
    }

    /// Keyset paging, as [`super::HistoryHandle::page`] (`limit` already
    /// capped).
    pub(super) async fn page(
        &self,
        conv: &Conversation,
        before: u64,
        limit: u32,
    ) -> Result<(Vec<StoredMsg>, bool), HistoryError> {
        let (kind, id, id2) = conv_key(conv);
        let before = page_bound(before);
        // One row more than asked tells whether another page exists.
        let fetch = i64::from(limit) + 1;
        let kind = kind as i16;
        let rows = self
            .inner
            .read(|link| async move {
                link.client
                    .query(&link.page, &[&kind, &id, &id2, &before, &fetch])
                    .await
            })
            .await?;
        let mut page = rows.iter().map(read_line).collect::<Result<Vec<_>, _>>()?;
        let more = page.len() > limit as usize;
        page.truncate(limit as usize);
        Ok((page, more))
    }

    /// `(nonce, msg_id)` of `sender`'s newest `limit` lines with a nonce,
    /// newest first.
    pub(super) async fn recent_nonces(
        &self,
        sender: u64,
        limit: u32,
    ) -> Result<Vec<(u64, u64)>, HistoryError> {
        let (sender, limit) = (sql(sender), i64::from(limit));
        let rows = self
            .inner
            .read(|link| async move {
                link.client
                    .query(
                        "SELECT nonce, msg_id FROM gc_lines WHERE sender_id = $1 AND nonce != 0 \
                         ORDER BY msg_id DESC LIMIT $2",
                        &[&sender, &limit],
                    )
                    .await
            })
            .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    unsql(r.try_get(0).map_err(bad_row)?),
                    unsql(r.try_get(1).map_err(bad_row)?),
                ))
            })
            .collect()
    }

    /// `sender`'s newest `limit` lines from `since_ms` on, newest first.
    pub(super) async fn by_sender(
        &self,
        sender: u64,
        since_ms: u64,
        limit: u32,
    ) -> Result<Vec<StoredMsg>, HistoryError> {
        let (sender, since, limit) = (sql(sender), sql_bound(since_ms), i64::from(limit));
        let rows = self
            .inner
            .read(|link| async move {
                link.client
                    .query(
                        concat!(
                            "SELECT ",
                            line_columns!(),
                            " FROM gc_lines WHERE sender_id = $1 AND time_ms >= $2 \
                             ORDER BY msg_id DESC LIMIT $3"
                        ),
                        &[&sender, &since, &limit],
                    )
                    .await
            })
            .await?;
        rows.iter().map(read_line).collect()
    }

    /// The line `msg_id`, or `None` if no such line is stored.
    pub(super) async fn find(&self, msg_id: u64) -> Result<Option<StoredMsg>, HistoryError> {
        self.one_line(
            concat!(
                "SELECT ",
                line_columns!(),
                " FROM gc_lines WHERE msg_id = $1"
            ),
            msg_id,
        )
        .await
    }

    /// Deletes the line `msg_id` and returns it, or `None` if no such line
    /// is stored (already recalled, or never kept).
    pub(super) async fn remove(&self, msg_id: u64) -> Result<Option<StoredMsg>, HistoryError> {
        self.one_line(
            concat!(
                "DELETE FROM gc_lines WHERE msg_id = $1 RETURNING ",
                line_columns!()
            ),
            msg_id,
        )
        .await
    }

    /// Runs `statement`, which takes `msg_id` as `$1` and returns at most
    /// one line in [`line_columns`] order.
    async fn one_line(
        &self,
        statement: &'static str,
        msg_id: u64,
    ) -> Result<Option<StoredMsg>, HistoryError> {
        let id = sql(msg_id);
        let rows = self
            .inner
            .read(|link| async move { link.client.query(statement, &[&id]).await })
            .await?;
        rows.first().map(read_line).transpose()
    }

    /// Applies retention now: by count in the conversations this node wrote
    /// to since its last prune, by age in every kind. How many lines it
    /// deleted.
    pub(super) async fn prune(&self) -> Result<u64, HistoryError> {
        self.inner.prune().await
    }
}

impl Inner {
    /// The current connection, opening a new one if it has closed (at most
    /// one attempt per [`RECONNECT_EVERY`]).
    async fn link(&self) -> Result<Arc<Link>, HistoryError> {
        if let Some(link) = self.current() {
            return Ok(link);
        }
        let mut last = self.attempt.lock().await;
        if let Some(link) = self.current() {
            return Ok(link);
        }
        if last.is_some_and(|at| at.elapsed() < RECONNECT_EVERY) {
            return Err(HistoryError::Unavailable);
        }
        *last = Some(Instant::now());
        match tokio::time::timeout(OP_TIMEOUT, Link::open(&self.config)).await {
            Ok(Ok(link)) => {
                let link = Arc::new(link);
                *self.link.lock().unwrap_or_else(|e| e.into_inner()) = Some(link.clone());
                self.mark(true, None);
                Ok(link)
            }
            Ok(Err(e)) => {
                self.mark(false, Some(&e));
                Err(HistoryError::Unavailable)
            }
            Err(_) => {
                self.mark(false, Some("no answer within 5 s"));
                Err(HistoryError::Unavailable)
            }
        }
    }

    fn current(&self) -> Option<Arc<Link>> {
        let mut link = self.link.lock().unwrap_or_else(|e| e.into_inner());
        if link.as_ref().is_some_and(|l| l.client.is_closed()) {
            *link = None;
            drop(link);
            self.mark(false, Some("connection closed"));
            return None;
        }
        link.clone()
    }

    /// Records whether the database is reachable, logging each change once.
    fn mark(&self, up: bool, why: Option<&str>) {
        if self.up.swap(up, Relaxed) == up {
            return;
        }
        if up {
            info!("history database reachable again");
        } else {
            warn!(
                why = why.unwrap_or("unknown"),
                "history database unreachable; lines cannot be acknowledged until it returns"
            );
        }
    }

    /// Runs one statement on the connection within [`OP_TIMEOUT`], holding
    /// one of the read permits.
    async fn read<F, Fut>(&self, run: F) -> Result<Vec<Row>, HistoryError>
    where
        F: FnOnce(Arc<Link>) -> Fut,
        Fut: std::future::Future<Output = Result<Vec<Row>, tokio_postgres::Error>>,
    {
        let _permit = self
            .reads
            .acquire()
            .await
            .map_err(|_| HistoryError::Unavailable)?;
        let link = self.link().await?;
        match tokio::time::timeout(OP_TIMEOUT, run(link)).await {
            Ok(Ok(rows)) => Ok(rows),
            Ok(Err(e)) => Err(self.failed(&e)),
            Err(_) => Err(self.timed_out()),
        }
    }

    /// A statement that got no answer within [`OP_TIMEOUT`]: the link is
    /// taken for dead (a reconnect follows, at most once a second) rather
    /// than left to stall every later statement behind it.
    fn timed_out(&self) -> HistoryError {
        *self.link.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.mark(false, Some("no answer within 5 s"));
        HistoryError::Unavailable
    }

    /// What a failed statement means for its caller.
    fn failed(&self, e: &tokio_postgres::Error) -> HistoryError {
        if e.is_closed() {
            self.mark(false, Some(&describe(e)));
            HistoryError::Unavailable
        } else {
            debug!(error = %describe(e), "history database statement failed");
            HistoryError::WriteFailed
        }
    }

    /// Inserts a batch in one statement (one commit). `Ok` holds, per line
    /// of the batch, whether it is stored: newly, or as the same line
    /// already there (a retry). A different line under the same msg_id is
    /// not: two nodes cut off from NATS at once hand out the same ids
    /// between the stream's, and the second to reach the database must be
    /// refused, not acknowledged and lost.
    async fn insert(&self, batch: &[Pending]) -> Result<Vec<bool>, HistoryError> {
        let link = self.link().await?;
        let mut cols = Columns::with_capacity(batch.len());
        for p in batch {
            cols.push(&p.msg);
        }
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 15] = [
            &cols.kind,
            &cols.id,
            &cols.id2,
            &cols.msg_id,
            &cols.chattype,
            &cols.sender_id,
            &cols.sender_name,
            &cols.text,
            &cols.time_ms,
            &cols.guild_id,
            &cols.team_id,
            &cols.scene_id,
            &cols.target_id,
            &cols.target_name,
            &cols.nonce,
        ];
        let rows = match tokio::time::timeout(OP_TIMEOUT, link.client.query(&link.insert, &params))
            .await
        {
            Ok(Ok(rows)) => rows,
            Ok(Err(e)) => return Err(self.failed(&e)),
            Err(_) => return Err(self.timed_out()),
        };
        let inserted = rows
            .iter()
            .map(|r| r.try_get::<_, i64>(0))
            .collect::<Result<HashSet<i64>, _>>()
            .map_err(bad_row)?;
        if inserted.len() == batch.len() {
            return Ok(vec![true; batch.len()]);
        }
        let taken: Vec<i64> = cols
            .msg_id
            .iter()
            .copied()
            .filter(|id| !inserted.contains(id))
            .collect();
        let rows = match tokio::time::timeout(
            OP_TIMEOUT,
            link.client.query(
                "SELECT msg_id, sender_id, nonce, time_ms, text FROM gc_lines \
                 WHERE msg_id = ANY($1)",
                &[&taken],
            ),
        )
        .await
        {
            Ok(Ok(rows)) => rows,
            Ok(Err(e)) => return Err(self.failed(&e)),
            Err(_) => return Err(self.timed_out()),
        };
        let mut there = std::collections::HashMap::with_capacity(rows.len());
        for r in &rows {
            let id: i64 = r.try_get(0).map_err(bad_row)?;
            let line: (i64, i64, i64, String) = (
                r.try_get(1).map_err(bad_row)?,
                r.try_get(2).map_err(bad_row)?,
                r.try_get(3).map_err(bad_row)?,
                r.try_get(4).map_err(bad_row)?,
            );
            there.insert(id, line);
        }
        Ok((0..batch.len())
            .map(|i| {
                let id = cols.msg_id[i];
                if inserted.contains(&id) {
                    return true;
                }
                // Gone since (recalled, pruned): whether it was this line
                // cannot be told, so it is refused (a refusal promises
                // nothing either way; the sender may retry).
                let Some((sender, nonce, time_ms, text)) = there.get(&id) else {
                    return false;
                };
                // The same line: the sender's retry (same nonce), or the
                // same record written twice.
                *sender == cols.sender_id[i]
                    && ((*nonce != 0 && *nonce == cols.nonce[i])
                        || (*time_ms == cols.time_ms[i] && *text == cols.text[i]))
            })
            .collect())
    }

    async fn prune(&self) -> Result<u64, HistoryError> {
        let config = &self.shared.config;
        let grown: Vec<Conversation> = self
            .grown
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .collect();
        let mut deleted = 0u64;
        let mut failure = None;
        for conv in &grown {
            let keep = config.retention(conv).keep_count;
            if keep == 0 {
                continue;
            }
            let (kind, id, id2) = conv_key(conv);
            let (kind, skip) = (kind as i16, i64::from(keep) - 1);
            // The subquery finds the oldest line to keep (NULL when there
            // are fewer, which deletes nothing), walking `keep` index
            // entries rather than the whole conversation.
            let result = self
                .execute(|link| async move {
                    link.client
                        .execute(
                            "DELETE FROM gc_lines WHERE conv_kind = $1 AND conv_id = $2 \
                             AND conv_id2 = $3 AND msg_id < (SELECT msg_id FROM gc_lines \
                             WHERE conv_kind = $1 AND conv_id = $2 AND conv_id2 = $3 \
                             ORDER BY msg_id DESC OFFSET $4 LIMIT 1)",
                            &[&kind, &id, &id2, &skip],
                        )
                        .await
                })
                .await;
            match result {
                Ok(n) => deleted += n,
                Err(e) => {
                    // Tried again at the next prune.
                    self.grown
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(*conv);
                    failure = Some(e);
                }
            }
        }
        let now = now_ms();
        for (kind, retention) in config.kinds() {
            if retention.keep_days == 0 {
                continue;
            }
            let cutoff = sql_bound(now.saturating_sub(u64::from(retention.keep_days) * DAY_MS));
            let kind = kind as i16;
            match self
                .execute(|link| async move {
                    link.client
                        .execute(
                            "DELETE FROM gc_lines WHERE conv_kind = $1 AND time_ms < $2",
                            &[&kind, &cutoff],
                        )
                        .await
                })
                .await
            {
                Ok(n) => deleted += n,
                Err(e) => failure = Some(e),
            }
        }
        self.shared.counters.pruned.fetch_add(deleted, Relaxed);
        match failure {
            Some(e) => Err(e),
            None => Ok(deleted),
        }
    }

    /// [`Inner::read`] for a statement that counts rows.
    async fn execute<F, Fut>(&self, run: F) -> Result<u64, HistoryError>
    where
        F: FnOnce(Arc<Link>) -> Fut,
        Fut: std::future::Future<Output = Result<u64, tokio_postgres::Error>>,
    {
        let link = self.link().await?;
        match tokio::time::timeout(OP_TIMEOUT, run(link)).await {
            Ok(Ok(n)) => Ok(n),
            Ok(Err(e)) => Err(self.failed(&e)),
            Err(_) => Err(self.timed_out()),
        }
    }
}

/// Creates the schema (or checks it) under an advisory lock, and returns
/// the highest stored msg_id.
async fn prepare_schema(client: &Client) -> Result<u64, OpenError> {
    let database = |e: tokio_postgres::Error| OpenError::Postgres(describe(&e));
    // A database whose encoding cannot hold every character a player may
    // type would fail whole batches later.
    let encoding: String = client
        .query_one("SHOW server_encoding", &[])
        .await
        .map_err(database)?
        .try_get(0)
        .map_err(database)?;
    if !matches!(encoding.as_str(), "UTF8" | "SQL_ASCII") {
        return Err(OpenError::Postgres(format!(
            "the database's encoding is {encoding}; guildchat needs UTF8"
        )));
    }
    client
        .batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock({SCHEMA_LOCK}); {SCHEMA} \
             INSERT INTO gc_schema (version) SELECT {SCHEMA_VERSION} \
             WHERE NOT EXISTS (SELECT 1 FROM gc_schema); COMMIT;"
        ))
        .await
        .map_err(database)?;
    let found: i32 = client
        .query_one("SELECT max(version) FROM gc_schema", &[])
        .await
        .map_err(database)?
        .try_get(0)
        .map_err(database)?;
    if found > SCHEMA_VERSION {
        return Err(OpenError::Postgres(format!(
            "the database has schema version {found}; this server knows up to {SCHEMA_VERSION}"
        )));
    }
    let high: i64 = client
        .query_one("SELECT COALESCE(max(msg_id), 0) FROM gc_lines", &[])
        .await
        .map_err(database)?
        .try_get(0)
        .map_err(database)?;
    Ok(unsql(high))
}

/// Inserts whatever is queued, one statement per batch, until every handle
/// is gone and the queue is empty; then ends `done`.
async fn insert_loop(
    inner: Arc<Inner>,
    mut queue: mpsc::Receiver<Pending>,
    done: std::sync::mpsc::SyncSender<()>,
) {
    let max_batch = inner.shared.config.max_batch.max(1);
    let mut batch = Vec::with_capacity(max_batch);
    while queue.recv_many(&mut batch, max_batch).await > 0 {
        let started = Instant::now();
        let result = inner.insert(&batch).await;
        let counters = &inner.shared.counters;
        match &result {
            Ok(_) => {
                counters.commits.fetch_add(1, Relaxed);
                counters.messages.fetch_add(batch.len() as u64, Relaxed);
                if let Some(observe) = inner.shared.commits.get() {
                    observe(batch.len(), started.elapsed());
                }
                let mut grown = inner.grown.lock().unwrap_or_else(|e| e.into_inner());
                grown.extend(batch.iter().map(|p| p.msg.conversation));
            }
            Err(_) => {
                counters.failed_commits.fetch_add(1, Relaxed);
            }
        }
        match result {
            Ok(stored) => {
                for (p, stored) in batch.drain(..).zip(stored) {
                    if !stored {
                        warn!(
                            msg_id = p.msg.msg_id,
                            "the history database holds another line under this msg_id; \
                             refused (two nodes cut off from NATS at once)"
                        );
                    }
                    let _ = p.respond_to.send(match stored {
                        true => Ok(()),
                        false => Err(HistoryError::WriteFailed),
                    });
                }
            }
            Err(e) => {
                for p in batch.drain(..) {
                    let _ = p.respond_to.send(Err(e));
                }
            }
        }
    }
    drop(done);
}

/// Once a second: tries the database again while it is unreachable (so
/// `/readyz` recovers without traffic), and applies retention every
/// `prune_interval_secs`. Ends with the last handle.
async fn upkeep(inner: Weak<Inner>) {
    let mut last_prune = Instant::now();
    loop {
        tokio::time::sleep(RECONNECT_EVERY).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if !inner.up.load(Relaxed) {
            let _ = inner.link().await;
        }
        let every = Duration::from_secs(inner.shared.config.prune_interval_secs.max(1));
        if last_prune.elapsed() >= every {
            last_prune = Instant::now();
            if let Err(e) = inner.prune().await {
                debug!(error = %e, "history database prune failed; tried again later");
            }
        }
    }
}

/// A batch as one array per column, for the `UNNEST` insert.
#[derive(Default)]
struct Columns {
    kind: Vec<i16>,
    id: Vec<i64>,
    id2: Vec<i64>,
    msg_id: Vec<i64>,
    chattype: Vec<i32>,
    sender_id: Vec<i64>,
    sender_name: Vec<String>,
    text: Vec<String>,
    time_ms: Vec<i64>,
    guild_id: Vec<i64>,
    team_id: Vec<i64>,
    scene_id: Vec<i64>,
    target_id: Vec<i64>,
    target_name: Vec<String>,
    nonce: Vec<i64>,
}

impl Columns {
    fn with_capacity(n: usize) -> Columns {
        let mut c = Columns::default();
        c.kind.reserve(n);
        c.msg_id.reserve(n);
        c
    }

    fn push(&mut self, m: &StoredMsg) {
        let (kind, id, id2) = conv_key(&m.conversation);
        self.kind.push(kind as i16);
        self.id.push(id);
        self.id2.push(id2);
        self.msg_id.push(sql(m.msg_id));
        self.chattype.push(m.chattype);
        self.sender_id.push(sql(m.sender_id));
        self.sender_name.push(pg_text(&m.sender_name));
        self.text.push(pg_text(&m.text));
        self.time_ms.push(sql_bound(m.time_ms));
        self.guild_id.push(sql(m.guild_id));
        self.team_id.push(sql(m.team_id));
        self.scene_id.push(sql(m.scene_id));
        self.target_id.push(sql(m.target_id));
        self.target_name.push(pg_text(&m.target_name));
        self.nonce.push(sql(m.nonce));
    }
}

/// PostgreSQL's text cannot hold U+0000, and one such character would fail
/// the whole batch it is in: it is stored as U+FFFD instead.
fn pg_text(s: &str) -> String {
    if s.contains('\0') {
        s.replace('\0', "\u{FFFD}")
    } else {
        s.to_owned()
    }
}

/// A row selected with `line_columns!()`.
fn read_line(row: &Row) -> Result<StoredMsg, HistoryError> {
    let kind: i16 = row.try_get(0).map_err(bad_row)?;
    let conversation = conversation(
        i64::from(kind),
        row.try_get(1).map_err(bad_row)?,
        row.try_get(2).map_err(bad_row)?,
    )
    .ok_or(HistoryError::Unavailable)?;
    let u = |i: usize| row.try_get::<_, i64>(i).map(unsql).map_err(bad_row);
    Ok(StoredMsg {
        msg_id: u(3)?,
        conversation,
        chattype: row.try_get(4).map_err(bad_row)?,
        sender_id: u(5)?,
        sender_name: row.try_get(6).map_err(bad_row)?,
        text: row.try_get(7).map_err(bad_row)?,
        time_ms: u(8)?,
        guild_id: u(9)?,
        team_id: u(10)?,
        scene_id: u(11)?,
        target_id: u(12)?,
        target_name: row.try_get(13).map_err(bad_row)?,
        nonce: u(14)?,
    })
}

/// An error with the server's own message when it sent one (the plain
/// `Display` says only "db error").
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{e}: {db}"),
        None => e.to_string(),
    }
}

/// A row whose columns do not have the schema's types: something else
/// wrote the table.
fn bad_row(e: tokio_postgres::Error) -> HistoryError {
    warn!(error = %e, "a gc_lines row does not match the schema");
    HistoryError::Unavailable
}

/// Kinds are stored as `SMALLINT`; every [`Kind`] fits.
const _: () = assert!((Kind::Whisper as i64) < i16::MAX as i64);
