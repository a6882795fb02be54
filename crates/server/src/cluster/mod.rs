//! Cluster mode: the node's link to the other nodes, through NATS with
//! JetStream. Owns the NATS connection, the line stream, the session
//! directory, the shared buckets and streams (sanctions, blocks, masks,
//! clocks, the word list, the audit log, the inbox) and the tasks that
//! carry them, the one that rebuilds the node's filter and its word file
//! from the shared list included; it never touches a player's state (the
//! world actor does that with what these tasks hand it) and never waits
//! on a player.
//!
//! - **Lines.** Every chat line and announcement is published to the
//!   JetStream stream `GC_LINES` (subjects `gc.line.>`, one per
//!   conversation). Its place in the stream gives its msg_id (see
//!   [`ID_STEP`]), so ids are unique and every node sees the lines in one
//!   order. Each node reads the stream with one ordered consumer and hands
//!   the lines to its world, which delivers them to its own players.
//! - **Sessions.** The key-value bucket `gc_sessions` maps `u.<user>` to
//!   the node holding the player's session. A login claims the key with a
//!   compare-and-set on its revision; every node watches the bucket, and a
//!   node whose session was claimed elsewhere ends it with the "logged in
//!   elsewhere" kick.
//!
//! Queues: the publish queue ([`PUBLISH_QUEUE`]) is fed with `try_send`
//! by the world: full, the line is refused (`RES_STORE_FAILED`), never
//! waited for. The feeds into the world use the world's bounded inbox with
//! `send().await`: a busy world slows the consumer, and JetStream keeps
//! the lines meanwhile.

mod audit;
mod blocks;
pub mod calls;
mod clocks;
mod inbox;
pub mod interest;
mod masks;
mod sanctions;
pub mod wire;
mod words;

pub use audit::{SharedEntry, AUDIT_STREAM};
pub use blocks::BLOCKS_BUCKET;
pub use clocks::{CLOCKS_BUCKET, MOVING_COOLDOWN};
pub use inbox::{INBOX_STREAM, SENDERS_STREAM};
pub use masks::MASKS_BUCKET;
pub use sanctions::SANCTIONS_BUCKET;
pub use words::{key as word_key, WORDS_BUCKET};

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};
use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::config::ClusterConfig;
use crate::ids::{NodeId, UserId};
use crate::world::WorldHandle;

pub use wire::BusLine;

/// The stream that carries every line.
pub const LINES_STREAM: &str = "GC_LINES";
/// The session directory.
pub const SESSIONS_BUCKET: &str = "gc_sessions";
/// Cluster-wide settings (the msg_id base).
pub const META_BUCKET: &str = "gc_meta";
/// Which nodes are alive: each puts its key once a [`HEARTBEAT`].
pub const NODES_BUCKET: &str = "gc_nodes";
/// How often a node says it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// A node not heard from for this long is taken for dead: its players'
/// whispers go to the shared inbox instead.
pub const NODE_DEAD: Duration = Duration::from_secs(5);

/// Lines (and inbox whispers, and cooldown clocks) waiting to be handed to
/// NATS. Full, a message is refused at once: a line gets
/// `RES_STORE_FAILED`, an inbox whisper its sender's `RES_STORE_FAILED` or,
/// for a spill, a log line. Clocks are not queued once it is half full.
const PUBLISH_QUEUE: usize = 4096;
/// Refused publishes are logged at most once per this many ms.
static REFUSED_LOG: crate::logs::Throttle = crate::logs::Throttle::new(5_000);
/// Directory releases waiting to be sent; full, a release is skipped (the
/// key then points at this node until the player's next login, which is
/// harmless: see [`Cluster::release`]).
const RELEASE_QUEUE: usize = 4096;
/// How long a start-up step (connect, stream and bucket creation) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stopping node waits for its queues to reach NATS.
const STOP_FLUSH: Duration = Duration::from_secs(2);
/// How many compare-and-set rounds a login's claim tries before giving up.
const CLAIM_TRIES: usize = 16;
/// The msg_id of stream line `seq` is `base + seq * ID_STEP`. The ids in
/// between belong to the lines a node delivers only to its own players
/// while it cannot reach NATS: they sort after every stream line that node
/// has seen and before every later one, so each of its players still
/// receives increasing ids. 65,535 such lines fit between two stream
/// lines, and a u64 leaves room for 2^47 stream lines above the base.
pub const ID_STEP: u64 = 1 << 16;

/// Why cluster mode could not start or a claim failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot reach NATS at {url}: {why}")]
    Connect { url: String, why: String },
    #[error("JetStream set-up failed ({what}): {why}")]
    Setup { what: &'static str, why: String },
    #[error("session directory: {0}")]
    Directory(String),
    /// A call found nobody listening on the node's subject: the node has
    /// stopped (its heartbeat has not aged out yet).
    #[error("node {0} has stopped")]
    Stopped(String),
}

/// What a publish comes back with: the message's stream sequence, or why
/// it was not stored.
pub type PublishReply = Box<dyn FnOnce(Result<u64, String>) + Send>;

struct Publish {
    subject: String,
    payload: Bytes,
    /// JetStream's de-duplication id: a second publish with the same id
    /// within the stream's window is not stored again, and is answered
    /// with the first one's sequence.
    dedup: Option<String>,
    reply: PublishReply,
}

/// The node's cluster link. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.inner.node)
            .field("base", &self.inner.base)
            .finish_non_exhaustive()
    }
}

struct Inner {
    node: NodeId,
    /// msg_id = base + stream sequence × [`ID_STEP`].
    base: u64,
    /// The stream's last sequence when this node joined: its consumer
    /// starts after it.
    joined_at: u64,
    js: jetstream::Context,
    client: async_nats::Client,
    /// Resumes reading the stream at once (at most [`BACKFILLS`]).
    backfills: tokio::sync::Semaphore,
    /// The offline inbox stream.
    inbox: stream::Stream,
    /// The senders' places in the inbox.
    senders: stream::Stream,
    /// The shared audit log.
    audit: stream::Stream,
    sanctions: kv::Store,
    blocks: kv::Store,
    masks: kv::Store,
    clocks: kv::Store,
    sessions: kv::Store,
    words: kv::Store,
    /// The bucket revision this node's filter has caught up with.
    words_applied: tokio::sync::watch::Receiver<u64>,
    publish: mpsc::Sender<Publish>,
    release: mpsc::Sender<(UserId, u64)>,
    /// Ends the feeds at shutdown, so that the world and the store they
    /// hold handles to can stop.
    stop: tokio_util::sync::CancellationToken,
    /// Holds the line feed while true: a test hook ([`Cluster::hold_feed`]).
    feed_held: tokio::sync::watch::Sender<bool>,
    /// What the line reader reads, when it reads per need.
    interest: Option<interest::Interest>,
    /// A test hook: calls from other nodes go unanswered while `true`.
    calls_silenced: tokio::sync::watch::Sender<bool>,
}

/// The feeds that start once the world exists.
pub struct Feeds {
    lines: consumer::pull::Ordered,
    watch: kv::Watch,
    sanctions: kv::Watch,
    blocks: kv::Watch,
    calls: async_nats::Subscriber,
    nodes: kv::Store,
    beats: kv::Watch,
    publish: mpsc::Receiver<Publish>,
    release: mpsc::Receiver<(UserId, u64)>,
    js: jetstream::Context,
    sessions: kv::Store,
    words: kv::Watch,
    words_applied: tokio::sync::watch::Sender<u64>,
}

fn setup(what: &'static str) -> impl FnOnce(String) -> ClusterError {
    move |why| ClusterError::Setup { what, why }
}

/// A [`bucket`] on disk, without an age limit.
async fn file(
    js: &jetstream::Context,
    what: &'static str,
    name: &str,
) -> Result<kv::Store, ClusterError> {
    bucket(js, what, name, stream::StorageType::File, None).await
}

/// A key-value bucket keeping each key's latest value, made if missing.
async fn bucket(
    js: &jetstream::Context,
    what: &'static str,
    name: &str,
    storage: stream::StorageType,
    max_age: Option<Duration>,
) -> Result<kv::Store, ClusterError> {
    let config = kv::Config {
        bucket: name.into(),
        history: 1,
        storage,
        max_age: max_age.unwrap_or_default(),
        ..Default::default()
    };
    timed(what, js.create_or_update_key_value(config)).await
}

async fn timed<T, E: std::fmt::Display>(
    what: &'static str,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, ClusterError> {
    match tokio::time::timeout(CONNECT_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(setup(what)(e.to_string())),
        Err(_) => Err(setup(what)("timed out".into())),
    }
}

impl Cluster {
    /// Connects to NATS and makes sure the stream and buckets exist, and
    /// seeds a new cluster's word list with `seed_words`. The line
    /// consumer starts here, before this node can publish anything,
    /// so no line of its own or of another node is missed. `local_high` is
    /// the highest msg_id in this node's own store: a new cluster's id base
    /// starts above it.
    pub async fn connect(
        config: &ClusterConfig,
        config_history: &crate::history::HistoryConfig,
        local_high: u64,
        seed_words: &crate::filter::WordList,
    ) -> Result<(Cluster, Feeds), ClusterError> {
        let url = config.url.clone().unwrap_or_default();
        let node = NodeId(config.node_id.clone().unwrap_or_default().into());
        let client = tokio::time::timeout(
            CONNECT_TIMEOUT,
            async_nats::ConnectOptions::new()
                .name(format!("guildchat-{node}"))
                .retry_on_initial_connect()
                .connect(url.as_str()),
        )
        .await
        .map_err(|_| ClusterError::Connect {
            url: url.clone(),
            why: "timed out".into(),
        })?
        .map_err(|e| ClusterError::Connect {
            url: url.clone(),
            why: e.to_string(),
        })?;
        let calls = client
            .subscribe(format!("gc.node.{node}.call"))
            .await
            .map_err(|e| setup("call subscription")(e.to_string()))?;
        let js = jetstream::new(client.clone());
        let lines = timed(
            "line stream",
            js.get_or_create_stream(stream::Config {
                name: LINES_STREAM.into(),
                subjects: vec![format!("{}.>", wire::LINE_PREFIX)],
                storage: stream::StorageType::File,
                // A day of lines; the history store keeps them for longer.
                max_age: Duration::from_secs(86_400),
                max_consumers: MAX_READERS,
                ..Default::default()
            }),
        )
        .await?;
        let inbox = timed(
            "offline inbox stream",
            js.get_or_create_stream(inbox::config(config_history)),
        )
        .await?;
        room_for_readers(&js, &lines).await;
        room_for_readers(&js, &inbox).await;
        let senders = timed(
            "inbox senders stream",
            js.get_or_create_stream(inbox::senders_config(config_history)),
        )
        .await?;
        let audit = timed("audit stream", js.get_or_create_stream(audit::config())).await?;
        let sessions = file(&js, "session bucket", SESSIONS_BUCKET).await?;
        let sanctions = file(&js, "sanction bucket", SANCTIONS_BUCKET).await?;
        let sanction_watch = timed("sanction watch", sanctions.watch_with_history(">")).await?;
        let blocks = file(&js, "block bucket", BLOCKS_BUCKET).await?;
        let block_watch = timed("block watch", blocks.watch_with_history("u.>")).await?;
        let masks = file(&js, "mask bucket", MASKS_BUCKET).await?;
        let words = file(&js, "word bucket", WORDS_BUCKET).await?;
        timed("word list seeding", words::seed(&words, &node, seed_words)).await?;
        let word_watch = timed("word watch", words.watch_with_history(">")).await?;
        let (applied_tx, words_applied) = tokio::sync::watch::channel(0);
        // Clocks are worth nothing after a day, nor after NATS restarts.
        let clocks = bucket(
            &js,
            "clock bucket",
            CLOCKS_BUCKET,
            stream::StorageType::Memory,
            Some(Duration::from_secs(86_400)),
        )
        .await?;
        // Dead nodes' keys go by themselves.
        let age = Some(Duration::from_secs(60));
        let nodes = bucket(
            &js,
            "node bucket",
            NODES_BUCKET,
            stream::StorageType::Memory,
            age,
        )
        .await?;
        let beats = timed("node watch", nodes.watch_with_history(">")).await?;
        let meta = file(&js, "meta bucket", META_BUCKET).await?;
        // The first node of a new cluster sets the base; the others read
        // it. Above every local id and the clock, so ids keep increasing
        // from a single-node deployment's.
        let proposed = local_high.max(crate::world::now_ms() << 10);
        let _ = meta.create("id_base", proposed.to_string().into()).await;
        let base = timed("id base", meta.get("id_base"))
            .await?
            .and_then(|v| std::str::from_utf8(&v).ok()?.parse::<u64>().ok())
            .ok_or_else(|| setup("id base")("missing or malformed".into()))?;
        // Read before the consumer is made: every line after it reaches
        // this node's world, and its msg_ids start above it.
        let mut lines = lines;
        let joined_at = timed("line stream", lines.info())
            .await?
            .state
            .last_sequence;
        // A node with a standalone past must not hand out ids below the
        // ones it stored then: its clients' cursors would swallow lines.
        let next = seq_id(base, joined_at.saturating_add(1));
        if local_high >= next {
            return Err(setup("id base")(format!(
                "this node's store holds msg_id {local_high}, above the cluster's next id {next}: \
                 start it with a fresh data dir, or start the cluster from it"
            )));
        }
        // Without a local copy of every line to keep (one database for all
        // nodes, or no history), a node reads only its players' groups.
        let interest =
            (!config_history.enabled || config_history.url.is_some()).then(interest::Interest::new);
        let filters = match &interest {
            Some(interest) => interest.filters(),
            None => vec![format!("{}.>", wire::LINE_PREFIX)],
        };
        let lines = timed("line consumer", read_from(&lines, filters, joined_at + 1)).await?;
        // Every key's latest value first (who is where now), then changes.
        let watch = timed("session watch", sessions.watch_with_history("u.>")).await?;
        let (publish_tx, publish) = mpsc::channel(PUBLISH_QUEUE);
        let (release_tx, release) = mpsc::channel(RELEASE_QUEUE);
        info!(%node, base, "joined the cluster");
        let cluster = Cluster {
            inner: Arc::new(Inner {
                node,
                base,
                joined_at,
                js: js.clone(),
                client,
                inbox,
                senders,
                audit,
                backfills: tokio::sync::Semaphore::new(BACKFILLS),
                sanctions,
                blocks,
                masks,
                clocks,
                sessions: sessions.clone(),
                words,
                words_applied,
                publish: publish_tx,
                release: release_tx,
                stop: Default::default(),
                feed_held: tokio::sync::watch::Sender::new(false),
                interest,
                calls_silenced: tokio::sync::watch::Sender::new(false),
            }),
        };
        let feeds = Feeds {
            lines,
            watch,
            sanctions: sanction_watch,
            blocks: block_watch,
            calls,
            nodes,
            beats,
            publish,
            release,
            js,
            sessions,
            words: word_watch,
            words_applied: applied_tx,
        };
        Ok((cluster, feeds))
    }

    pub fn node(&self) -> &NodeId {
        &self.inner.node
    }

    /// Whether the link to NATS is up now.
    pub fn connected(&self) -> bool {
        self.inner.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Holds this node's feed of lines from the stream (`true`) or lets it
    /// go on, to put the node behind the others. A test hook: a held node
    /// delivers no line from another node, nor its own.
    #[doc(hidden)]
    pub fn hold_feed(&self, held: bool) {
        self.inner.feed_held.send_replace(held);
    }

    /// Leaves the admin calls of other nodes unanswered (`true`), as a
    /// stuck node would, or answers them again. A test hook.
    #[doc(hidden)]
    pub fn silence_calls(&self, silenced: bool) {
        self.inner.calls_silenced.send_replace(silenced);
    }

    /// The groups whose lines this node reads, when it reads only what
    /// its players need; `None` when it reads every line.
    pub fn interest(&self) -> Option<&interest::Interest> {
        self.inner.interest.as_ref()
    }

    /// The stream's last sequence when this node joined.
    pub fn joined_at(&self) -> u64 {
        self.inner.joined_at
    }

    /// The msg_id of the line at stream sequence `seq`.
    pub fn msg_id(&self, seq: u64) -> u64 {
        seq_id(self.inner.base, seq)
    }

    /// Whether `id` lies strictly between two stream lines' ids: free for a
    /// line this node delivers alone while NATS is out of reach (see
    /// [`ID_STEP`]).
    pub fn between_lines(&self, id: u64) -> bool {
        id.checked_sub(self.inner.base)
            .is_some_and(|offset| offset % ID_STEP != 0)
    }

    /// Deletes a recalled line from the line stream, so that no resume on
    /// any node replays it. A line no longer there (aged out, or never
    /// in it: delivered alone during an outage) is not an error.
    pub async fn forget_line(&self, msg_id: u64) -> Result<(), ClusterError> {
        let Some(offset) = msg_id.checked_sub(self.inner.base) else {
            return Ok(());
        };
        if offset % ID_STEP != 0 {
            return Ok(());
        }
        let stream = timed("line stream", self.inner.js.get_stream(LINES_STREAM)).await?;
        match timed("line delete", stream.delete_message(offset / ID_STEP)).await {
            Err(ClusterError::Setup { why, .. }) if why.contains("no message found") => Ok(()),
            done => done.map(|_| ()),
        }
    }

    /// Queues a line for JetStream; `reply` gets its sequence once stored.
    /// Never waits: with the queue full the line is refused at once.
    ///
    /// A line with a client message id is published with JetStream's
    /// de-duplication id `<sender>:<id>`: a retry that reaches another
    /// node before that node has the first line in its own store is still
    /// answered with the first line's msg_id, and not delivered again.
    pub fn publish(&self, subject: String, line: &BusLine, reply: PublishReply) {
        let payload = Bytes::from(prost::Message::encode_to_vec(line));
        let dedup =
            (line.nonce != 0 && line.from != 0).then(|| format!("{}:{}", line.from, line.nonce));
        self.publish_raw(subject, payload, dedup, reply);
    }

    fn publish_raw(
        &self,
        subject: String,
        payload: Bytes,
        dedup: Option<String>,
        reply: PublishReply,
    ) {
        let msg = Publish {
            subject,
            payload,
            dedup,
            reply,
        };
        if let Err(e) = self.inner.publish.try_send(msg) {
            let (msg, why) = match e {
                mpsc::error::TrySendError::Full(m) => (m, "the publish queue is full"),
                mpsc::error::TrySendError::Closed(m) => (m, "the node is stopping"),
            };
            // One line a few seconds under overload, not one per message.
            if let Some(suppressed) = REFUSED_LOG.allow() {
                warn!(suppressed, "cluster messages refused: {why}");
            }
            (msg.reply)(Err(why.into()));
        }
    }

    /// Claims the player's session for this node: a compare-and-set on the
    /// directory key, retried while other nodes race for it. Returns the
    /// revision that names this node: a later revision naming another node
    /// ends this session.
    pub async fn claim(&self, user: UserId, name: &str) -> Result<u64, ClusterError> {
        let key = format!("u.{user}");
        let value = Bytes::from(format!("{}\n{name}", self.inner.node));
        let kv = &self.inner.sessions;
        for _ in 0..CLAIM_TRIES {
            let current = kv
                .entry(key.as_str())
                .await
                .map_err(|e| ClusterError::Directory(e.to_string()))?;
            let result = match current {
                Some(e) if e.operation == kv::Operation::Put => kv
                    .update(key.as_str(), value.clone(), e.revision)
                    .await
                    .map_err(|e| {
                        (
                            e.kind() == kv::UpdateErrorKind::WrongLastRevision,
                            e.to_string(),
                        )
                    }),
                _ => kv.create(key.as_str(), value.clone()).await.map_err(|e| {
                    (
                        matches!(e.kind(), kv::CreateErrorKind::AlreadyExists),
                        e.to_string(),
                    )
                }),
            };
            match result {
                Ok(revision) => return Ok(revision),
                // Another node wrote in between: read again and retry.
                Err((true, _)) => continue,
                Err((false, why)) => return Err(ClusterError::Directory(why)),
            }
        }
        Err(ClusterError::Directory(format!(
            "{key}: still contended after {CLAIM_TRIES} tries"
        )))
    }

    /// The session claimed at `revision` ended: its key goes, unless
    /// another node has claimed it since. Skipped when the queue is full;
    /// a stale key only makes other nodes route the player's whispers here,
    /// where they are kept for the player's next login.
    pub fn release(&self, user: UserId, revision: u64) {
        if self.inner.release.try_send((user, revision)).is_err() {
            debug!(%user, "release queue full; the directory key stays");
        }
    }

    /// Starts the tasks that publish lines, release keys, feed the stream
    /// and the directory into the world, and apply shared sanctions and
    /// the shared word list (kept in `data_dir`'s word file too).
    pub fn start(
        &self,
        feeds: Feeds,
        world: WorldHandle,
        services: &crate::user::Services,
        history: Option<crate::history::HistoryHandle>,
        stats: Arc<crate::stats::Stats>,
        data_dir: std::path::PathBuf,
    ) {
        let Feeds {
            lines,
            watch,
            sanctions,
            blocks,
            calls,
            nodes,
            beats,
            publish,
            release,
            js,
            sessions,
            words,
            words_applied,
        } = feeds;
        let moderation = services.moderation.clone();
        let stop = &self.inner.stop;
        tokio::spawn(until(stop, publisher(js.clone(), publish)));
        tokio::spawn(until(stop, releaser(sessions, release)));
        let held = self.inner.feed_held.subscribe();
        tokio::spawn(until(
            stop,
            read_lines(
                lines,
                js.clone(),
                self.inner.interest.clone(),
                world.clone(),
                held,
                stats.clone(),
            ),
        ));
        tokio::spawn(until(stop, heartbeat(nodes, self.inner.node.clone())));
        tokio::spawn(until(stop, watch_beats(beats, world.clone())));
        tokio::spawn(until(
            stop,
            calls::answer(
                calls,
                self.inner.client.clone(),
                world.clone(),
                stats,
                history.clone(),
                self.inner.calls_silenced.subscribe(),
            ),
        ));
        tokio::spawn(until(
            stop,
            sanctions::watch(sanctions, moderation, history, world.clone()),
        ));
        tokio::spawn(until(stop, blocks::watch(blocks, world.clone())));
        tokio::spawn(until(
            stop,
            words::watch(words, services.filter.clone(), data_dir, words_applied),
        ));
        tokio::spawn(until(
            stop,
            watch_directory(watch, world, self.inner.node.clone()),
        ));
    }

    /// Ends the feeds (at shutdown, once the world has ended every
    /// session), after what is queued for NATS has been handed to it (at
    /// most [`STOP_FLUSH`]): the spilled whispers and the released keys.
    pub async fn stop(&self) {
        let inner = &self.inner;
        let queued =
            || inner.publish.capacity() < PUBLISH_QUEUE || inner.release.capacity() < RELEASE_QUEUE;
        let deadline = tokio::time::Instant::now() + STOP_FLUSH;
        while queued() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = tokio::time::timeout(STOP_FLUSH, inner.client.flush()).await;
        inner.stop.cancel();
    }
}

/// The msg_id of stream line `seq` under `base`.
fn seq_id(base: u64, seq: u64) -> u64 {
    base.saturating_add(seq.saturating_mul(ID_STEP))
}

/// Runs `task` until `stop` is cancelled, then drops it with the handles
/// it holds.
fn until(
    stop: &tokio_util::sync::CancellationToken,
    task: impl std::future::Future<Output = ()>,
) -> impl std::future::Future<Output = ()> {
    let stop = stop.clone();
    async move {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = task => {}
        }
    }
}

/// Most publishes awaiting JetStream's ack at once.
const IN_FLIGHT: usize = 1024;

/// Hands lines to NATS in queue order (so one node's lines keep their
/// order in the stream) and answers each once JetStream has stored it.
async fn publisher(js: jetstream::Context, mut rx: mpsc::Receiver<Publish>) {
    let mut acks = FuturesUnordered::new();
    loop {
        tokio::select! {
            msg = rx.recv(), if acks.len() < IN_FLIGHT => {
                let Some(Publish { subject, payload, dedup, reply }) = msg else { break };
                let sent = match dedup {
                    Some(id) => {
                        let publish = jetstream::message::PublishMessage::build()
                            .payload(payload)
                            .message_id(id);
                        js.send_publish(subject, publish).await
                    }
                    None => js.publish(subject, payload).await,
                };
                match sent {
                    Ok(ack) => acks.push(async move {
                        let result = ack.await.map(|a| a.sequence);
                        if let Err(e) = &result {
                            debug!(error = %e, "a message was not stored by JetStream");
                        }
                        reply(result.map_err(|e| e.to_string()));
                    }),
                    Err(e) => {
                        debug!(error = %e, "cannot publish a message");
                        reply(Err(e.to_string()));
                    }
                }
            }
            Some(()) = acks.next(), if !acks.is_empty() => {}
        }
    }
    while acks.next().await.is_some() {}
}

async fn releaser(sessions: kv::Store, mut rx: mpsc::Receiver<(UserId, u64)>) {
    while let Some((user, revision)) = rx.recv().await {
        let key = format!("u.{user}");
        // Fails when another node claimed the key since: it is theirs.
        if let Err(e) = sessions
            .delete_expect_revision(key.as_str(), Some(revision))
            .await
        {
            debug!(%user, error = %e, "directory key not released");
        }
    }
}

/// Says this node is alive, once a [`HEARTBEAT`].
async fn heartbeat(nodes: kv::Store, me: NodeId) {
    // The value names this run of the node: a node back under the same id
    // is told apart from one that never went.
    let incarnation = crate::world::now_ms().to_string();
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        match nodes.put(me.0.as_ref(), incarnation.clone().into()).await {
            Ok(_) => failing = false,
            Err(e) => {
                // Once per outage.
                if !failing {
                    warn!(error = %e, "cannot tell the cluster this node is alive");
                    failing = true;
                }
            }
        }
    }
}

/// Feeds the other nodes' heartbeats into the world.
async fn watch_beats(mut beats: kv::Watch, world: WorldHandle) {
    while let Some(entry) = beats.next().await {
        let Ok(entry) = entry else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        if entry.operation != kv::Operation::Put {
            continue;
        }
        let incarnation = std::str::from_utf8(&entry.value)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let node = NodeId(entry.key.as_str().into());
        if world.node_beat(node, incarnation).await.is_err() {
            break;
        }
    }
    debug!("heartbeat feed ended");
}

/// An ordered consumer of the line stream on `filters`, from stream
/// sequence `start`.
async fn ordered_from(
    stream: &stream::Stream,
    filters: Vec<String>,
    start: u64,
) -> Result<consumer::Consumer<consumer::pull::OrderedConfig>, String> {
    stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subjects: filters,
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start,
            },
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())
}

/// The lines of [`ordered_from`]'s consumer.
async fn read_from(
    stream: &stream::Stream,
    filters: Vec<String>,
    start: u64,
) -> Result<consumer::pull::Ordered, String> {
    let consumer = ordered_from(stream, filters, start).await?;
    consumer.messages().await.map_err(|e| e.to_string())
}

/// A new consumer for the latest resync, tried again every 200 ms (NATS
/// away) until one opens; a newer resync met meanwhile replaces the one
/// being tried. `None` once the world has gone.
async fn resync_lines(
    js: &jetstream::Context,
    interest: &interest::Interest,
    resyncs: &mut tokio::sync::watch::Receiver<interest::Resync>,
) -> Option<(consumer::pull::Ordered, u64)> {
    let mut failing = false;
    loop {
        let want = *resyncs.borrow_and_update();
        let opened = match js.get_stream(LINES_STREAM).await {
            Ok(stream) => read_from(&stream, interest.filters(), want.after + 1).await,
            Err(e) => Err(e.to_string()),
        };
        match opened {
            Ok(lines) => return Some((lines, want.generation)),
            Err(e) => {
                if !failing {
                    warn!(error = %e, "reading the line stream with new filters failed; retrying");
                    failing = true;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                if resyncs.has_changed().is_err() {
                    return None;
                }
            }
        }
    }
}

/// Feeds the stream's lines, in stream order, into the world, each tagged
/// with the generation of the consumer that read it (see
/// [`interest`]).
async fn read_lines(
    mut lines: consumer::pull::Ordered,
    js: jetstream::Context,
    interest: Option<interest::Interest>,
    world: WorldHandle,
    mut held: tokio::sync::watch::Receiver<bool>,
    stats: Arc<crate::stats::Stats>,
) {
    let mut failing = false;
    let mut generation = 0;
    let mut resyncs = interest.as_ref().map(interest::Interest::subscribe);
    loop {
        let msg = match (&interest, resyncs.as_mut()) {
            (Some(interest), Some(resyncs)) => tokio::select! {
                biased;
                changed = resyncs.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let Some((opened, g)) = resync_lines(&js, interest, resyncs).await else {
                        break;
                    };
                    lines = opened;
                    generation = g;
                    crate::stats::Stats::bump(&stats.line_resyncs);
                    continue;
                }
                msg = lines.next() => msg,
            },
            _ => lines.next().await,
        };
        let Some(msg) = msg else { break };
        // A test holding the feed: the line waits, as on a node behind.
        if held.wait_for(|held| !held).await.is_err() {
            break;
        }
        let msg = match msg {
            Ok(msg) => msg,
            Err(e) => {
                // Once per outage, not per message.
                if !failing {
                    error!(error = %e, "reading the line stream failed; retrying");
                    failing = true;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        failing = false;
        let Ok(seq) = msg.info().map(|i| i.stream_sequence) else {
            continue;
        };
        let line = match <BusLine as prost::Message>::decode(msg.payload.as_ref()) {
            Ok(line) => line,
            Err(e) => {
                warn!(seq, error = %e, "a line on the bus does not decode; skipped");
                continue;
            }
        };
        if world.bus_line(line, seq, generation).await.is_err() {
            break;
        }
    }
    debug!("line feed ended");
}

/// The next entry of a watch over `u.<user>` keys, with its user. A failed
/// read is logged and retried after 200 ms; other keys are skipped. `None`
/// once the watch has ended.
async fn next_user_entry(watch: &mut kv::Watch, what: &str) -> Option<(UserId, kv::Entry)> {
    loop {
        let entry = match watch.next().await? {
            Ok(entry) => entry,
            Err(e) => {
                warn!(error = %e, "{what} watch failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let user = entry
            .key
            .strip_prefix("u.")
            .and_then(|u| u.parse::<u64>().ok());
        if let Some(user) = user {
            return Some((UserId(user), entry));
        }
    }
}

/// Feeds the session directory into the world: who holds which session.
async fn watch_directory(mut watch: kv::Watch, world: WorldHandle, me: NodeId) {
    while let Some((user, entry)) = next_user_entry(&mut watch, "session directory").await {
        let holder = match entry.operation {
            kv::Operation::Put => {
                let value = String::from_utf8_lossy(&entry.value);
                let (node, name) = value.split_once('\n').unwrap_or((&value, ""));
                Some(Holder::Remote {
                    node: NodeId(node.into()),
                    name: name.to_owned(),
                })
            }
            _ => None,
        };
        let holder = match holder {
            Some(Holder::Remote { node, .. }) if node == me => Holder::Here,
            Some(h) => h,
            None => Holder::Nobody,
        };
        if world.directory(user, holder, entry.revision).await.is_err() {
            break;
        }
    }
    debug!("directory feed ended");
}

/// What a login resuming on this node wants from the stream: the lines of
/// its conversations after its cursor.
pub struct Wants {
    pub user: UserId,
    pub guild: crate::ids::GuildId,
    pub team: crate::ids::TeamId,
    pub scene: crate::ids::SceneId,
    /// The client's `last_msg_id`.
    pub after: u64,
    /// Most lines kept: the newest win, and a gap is reported.
    pub cap: usize,
}

/// The lines a resume on another node gets from the stream.
#[derive(Debug, Default)]
pub struct Backfill {
    /// `(msg_id, frame)`, in msg_id order.
    pub frames: Vec<(u64, Bytes)>,
    /// Some lines could not be had: before the stream's first, past the
    /// cap, or the read failed or took too long.
    pub gap: bool,
}

/// Resumes reading the stream at once; the others wait their turn.
const BACKFILLS: usize = 16;
/// How long a resume's read of the stream may take.
const BACKFILL_TIMEOUT: Duration = Duration::from_secs(5);
/// Most lines a resume's read looks at, whatever it keeps.
const BACKFILL_SCAN: u64 = 200_000;

impl Cluster {
    /// Reads a resuming player's lines after its cursor from the stream:
    /// world and system lines, its scene's, guild's and team's (as its new
    /// token names them), and its whispers. A cursor the stream no longer
    /// covers reads what there is and reports a gap.
    pub async fn backfill(&self, wants: Wants) -> Backfill {
        // A few at a time: a wave of resumes waits its turn instead of
        // opening hundreds of reads of the stream at once.
        let Ok(_turn) = self.inner.backfills.acquire().await else {
            return Backfill {
                gap: true,
                ..Default::default()
            };
        };
        let mut readers = Vec::new();
        let read =
            tokio::time::timeout(BACKFILL_TIMEOUT, self.read_back(&wants, &mut readers)).await;
        // Deleted however the read ended, a timed-out one included.
        for (stream, name) in &readers {
            drop_reader(stream, name).await;
        }
        match read {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                warn!(user = %wants.user, error = %e, "cannot read a resume's lines from the stream");
                Backfill {
                    gap: true,
                    ..Default::default()
                }
            }
            Err(_) => {
                warn!(user = %wants.user, "reading a resume's lines from the stream timed out");
                Backfill {
                    gap: true,
                    ..Default::default()
                }
            }
        }
    }

    /// The lines of [`Cluster::backfill`]; every reader it opens is put in
    /// `readers`, for the caller to delete.
    async fn read_back(
        &self,
        wants: &Wants,
        readers: &mut Vec<(stream::Stream, String)>,
    ) -> Result<Backfill, ClusterError> {
        let p = wire::LINE_PREFIX;
        let u = wants.user;
        let mut subjects = vec![
            format!("{p}.world"),
            format!("{p}.sys"),
            format!("{p}.scene.{}", wants.scene),
            format!("{p}.sys.to.scene.{}", wants.scene),
            format!("{p}.sys.to.user.{u}"),
            // Whispers where the player is the lower id; the higher-id
            // half overlaps this filter, so it is read on its own.
            format!("{p}.w.{u}.*"),
        ];
        if !wants.guild.is_none() {
            subjects.push(format!("{p}.guild.{}", wants.guild));
            subjects.push(format!("{p}.sys.to.guild.{}", wants.guild));
        }
        if !wants.team.is_none() {
            subjects.push(format!("{p}.team.{}", wants.team));
            subjects.push(format!("{p}.sys.to.team.{}", wants.team));
        }
        let failed = |what: &'static str| move |e: String| ClusterError::Setup { what, why: e };
        let stream = self
            .inner
            .js
            .get_stream(LINES_STREAM)
            .await
            .map_err(|e| failed("resume read")(e.to_string()))?;
        let first = stream.cached_info().state.first_sequence;
        let mut gap = false;
        // The stream line at or before the cursor (a cursor between two
        // lines is one this node's player got while cut off from NATS).
        let start = match wants.after.checked_sub(self.inner.base) {
            Some(offset) if (offset / ID_STEP).saturating_add(1) >= first => offset / ID_STEP + 1,
            // A cursor from before the stream's first line (or before the
            // cluster): what came between is gone from it.
            _ => {
                gap = true;
                first.max(1)
            }
        };
        // Only the newest `cap` are kept while reading, so a cursor far
        // back costs reading time (bounded), not memory.
        let mut lines: std::collections::VecDeque<(u64, BusLine)> = Default::default();
        let mut dropped = false;
        for filters in [subjects, vec![format!("{p}.w.*.{u}")]] {
            let consumer = ordered_from(&stream, filters, start)
                .await
                .map_err(failed("resume read"))?;
            readers.push((stream.clone(), consumer.cached_info().name.clone()));
            let mut pending = consumer.cached_info().num_pending;
            if pending == 0 {
                continue;
            }
            let mut msgs = consumer
                .messages()
                .await
                .map_err(|e| failed("resume read")(e.to_string()))?;
            let mut scanned = 0;
            while pending > 0 && scanned < BACKFILL_SCAN {
                let Some(msg) = msgs.next().await else { break };
                let msg = msg.map_err(|e| failed("resume read")(e.to_string()))?;
                scanned += 1;
                let Ok(info) = msg.info() else { continue };
                pending = info.pending;
                let seq = info.stream_sequence;
                if let Ok(line) = <BusLine as prost::Message>::decode(msg.payload.as_ref()) {
                    lines.push_back((seq, line));
                    if lines.len() > wants.cap.saturating_mul(2) {
                        lines.pop_front();
                        dropped = true;
                    }
                }
            }
            gap |= pending > 0;
        }
        // The two reads' lines, merged in stream order, each once.
        let mut lines: Vec<(u64, BusLine)> = lines.into();
        lines.sort_unstable_by_key(|(seq, _)| *seq);
        lines.dedup_by_key(|(seq, _)| *seq);
        if lines.len() > wants.cap {
            gap = true;
            lines.drain(..lines.len() - wants.cap);
        }
        gap |= dropped;
        let frames = lines
            .into_iter()
            .map(|(seq, line)| {
                let id = self.msg_id(seq);
                let mut notify = line.notify.unwrap_or_default();
                notify.msg_id = id;
                (id, guildchat_protocol::codec::encode(&notify))
            })
            .collect();
        Ok(Backfill { frames, gap })
    }
}

/// Consumers a stream this node creates may hold at once. nats-server
/// 2.15 gives a stream that sets no limit 1,000, and every resume and
/// every login with whispers waiting opens a short-lived reader: a node
/// dying with thousands of players, all resuming elsewhere, must not be
/// refused for want of readers. The readers are deleted once read (see
/// [`drop_reader`]), so this is headroom, not a working level.
const MAX_READERS: i32 = 20_000;

/// Raises a stream's consumer limit to [`MAX_READERS`] when it is lower:
/// an existing stream (made by an older build) keeps the limit it was made
/// with. A server that refuses the change is logged, and the node goes on
/// with the old limit.
async fn room_for_readers(js: &jetstream::Context, stream: &stream::Stream) {
    let config = &stream.cached_info().config;
    if config.max_consumers >= MAX_READERS {
        return;
    }
    let raised = stream::Config {
        max_consumers: MAX_READERS,
        ..config.clone()
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, js.update_stream(&raised)).await {
        Ok(Ok(_)) => {
            info!(stream = %config.name, "stream's consumer limit raised to {MAX_READERS}")
        }
        Ok(Err(e)) => {
            warn!(stream = %config.name, error = %e, "cannot raise the stream's consumer limit; a storm of resumes may be refused readers")
        }
        Err(_) => warn!(stream = %config.name, "raising the stream's consumer limit timed out"),
    }
}

/// Deletes a one-off reader once read. One left behind (this node died,
/// or the delete failed) goes by itself after 30 s idle, the ordered
/// consumer's inactivity limit, and holds a place among
/// [`MAX_READERS`] until then.
async fn drop_reader(stream: &stream::Stream, name: &str) {
    if let Err(e) = stream.delete_consumer(name).await {
        debug!(name, error = %e, "a stream reader was not deleted; it goes when idle");
    }
}

/// Who the directory says holds a player's session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// This node.
    Here,
    /// Another node, and the player's name there.
    Remote { node: NodeId, name: String },
    /// Nobody: the session ended.
    Nobody,
}
