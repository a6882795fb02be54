//! guildchat: a real-time chat server for online games.
//!
//! Game clients connect over websocket and speak protobuf
//! (`proto/chatproto.proto`). Each connection has a reader task, a writer
//! task and a user actor that owns the player's chat state; one world actor
//! owns the registry of players and fans messages out. All are joined by
//! bounded channels.
//!
//! # Layout
//! - [`config`]: the TOML configuration and its validation.
//! - [`auth`]: login token checking and the development-key bootstrap.
//! - [`net`]: sockets only: accept loop, per-connection reader and writer,
//!   and [`net::ConnTx`], the handle logic code uses to reach a client.
//! - [`user`]: the user actor.
//! - [`history`]: the embedded history store (SQLite, group commit) and
//!   offline whispers; [`records`] converts between its records and
//!   notifications.
//! - [`world`]: the world actor, its registry and the fan-out seam.
//! - [`filter`]: the sensitive-word list and the filter that masks it in
//!   chat lines (normalised, Aho-Corasick); callers choose the [`filter::Policy`].
//! - [`moderation`]: mutes, bans and token revocations in force.
//! - [`admin`]: the admin HTTP API (its own listener); [`metrics`]: the
//!   labelled metrics behind `/metrics`; [`reload`]: key, certificate and
//!   word-list reload.
//! - [`ids`], [`stats`], [`logs`]: id newtypes, counters, log throttling.
//!
//! The entry point is [`Server`]: build it from a [`Config`], then
//! [`Server::run`] it on a listener until a shutdown token is cancelled.

#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod filter;
pub mod history;
pub mod ids;
pub mod logs;
pub mod metrics;
pub mod moderation;
pub mod net;
pub mod records;
pub mod reload;
pub mod stats;
pub mod tls;
pub mod user;
pub mod world;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

pub use config::Config;
use net::conn::ConnCtx;
use stats::Stats;
use world::{LocalFanout, WorldHandle};

/// Why the server could not start, or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Keys(#[from] auth::KeysError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot read the sanctions in force: {0}")]
    LoadModeration(history::HistoryError),
    #[error("sensitive-word list: {0}")]
    Filter(#[from] filter::FilterError),
    #[error("history store: {0}")]
    History(history::OpenError),
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
    #[error("cluster mode needs Server::start, which connects to NATS")]
    ClusterNeedsStart,
    #[error("history.url needs Server::start, which connects to the database")]
    DatabaseNeedsStart,
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The history writer or reader thread ended while the server ran:
    /// nothing more can be stored or acknowledged.
    #[error("the history store stopped while the server was running; restart to recover")]
    HistoryDied,
}

/// A configured server, not yet accepting.
pub struct Server {
    ctx: Arc<ConnCtx>,
    tls: Option<tls::TlsSwap>,
    history: Option<history::HistoryHandle>,
    services: Arc<user::Services>,
    reloader: Arc<reload::Reloader>,
    store: Option<Store>,
    /// The game port, set by `run`, for the demo page.
    game_addr: Arc<std::sync::OnceLock<SocketAddr>>,
}

/// The history store's threads, watched while the server runs and joined
/// when it stops.
struct Store {
    died: CancellationToken,
    threads: history::HistoryThreads,
    /// A handle kept only so that unit tests can make the store fail.
    #[cfg(test)]
    handle: Option<history::HistoryHandle>,
}

/// How long a stopping server waits for the history threads to commit what
/// is queued and end.
const STORE_JOIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl Server {
    /// Validates the config, loads keys (generating development keys on
    /// first start) and spawns the world actor. Call inside a runtime. A
    /// cluster node needs [`Server::start`] instead.
    pub fn new(config: Config) -> Result<Server, ServerError> {
        if config.cluster.enabled() {
            return Err(ServerError::ClusterNeedsStart);
        }
        if config.history.url.is_some() {
            return Err(ServerError::DatabaseNeedsStart);
        }
        let parts = Parts::open(config)?;
        Ok(parts.assemble(None))
    }

    /// [`Server::new`], and in cluster mode (`cluster.url`) first joins the
    /// cluster: connects to NATS and sets up the stream and buckets.
    pub async fn start(config: Config) -> Result<Server, ServerError> {
        let mut parts = Parts::open(config)?;
        if let (Some(url), Some(history), Some(store)) = (
            parts.config.history.url.clone(),
            parts.history.as_mut(),
            parts.store.as_mut(),
        ) {
            let high = history
                .attach_postgres(&url, &mut store.threads)
                .await
                .map_err(ServerError::History)?;
            // Ids stay above every line the database holds, as above the
            // file's: a page never meets an id twice.
            parts.first_msg_id = parts.first_msg_id.max(high);
        }
        let joined = match parts.config.cluster.enabled() {
            true => Some(
                cluster::Cluster::connect(
                    &parts.config.cluster,
                    &parts.config.history,
                    parts.first_msg_id,
                    parts.filter.load().words(),
                )
                .await?,
            ),
            false => None,
        };
        let server = parts.assemble(joined);
        // Whispers kept alone before this node joined wait for players who
        // may log in on any node: they move to the shared inbox before
        // this node serves anyone.
        if let (Some(cluster), Some(history)) = (&server.ctx.cluster, &server.history) {
            let moved = cluster.adopt_local_inbox(history).await;
            if moved > 0 {
                tracing::info!(
                    moved,
                    "offline whispers from before the cluster are in the shared inbox"
                );
            }
        }
        Ok(server)
    }
}

/// What a server is built from, before it joins a cluster.
struct Parts {
    config: Config,
    moderation: Arc<moderation::Moderation>,
    auth: Arc<auth::Authenticator>,
    tls: Option<tls::TlsSwap>,
    filter: filter::FilterHandle,
    history: Option<history::HistoryHandle>,
    first_msg_id: u64,
    store: Option<Store>,
}

impl Parts {
    fn open(config: Config) -> Result<Parts, ServerError> {
        config.validate()?;
        let moderation = Arc::new(moderation::Moderation::default());
        let auth = Arc::new(auth::Authenticator::from_config(
            &config,
            moderation.clone(),
        )?);
        let tls = config
            .tls
            .as_ref()
            .map(tls::acceptor)
            .transpose()?
            .map(tls::TlsSwap::new);
        let words = filter::load(&filter::path_in(&config.data_dir))?;
        let filter = filter::FilterHandle::new(filter::Filter::new(words)?);
        let (history, first_msg_id, store) = if config.history.enabled {
            let (handle, high_water, threads) =
                history::HistoryHandle::open(&config.data_dir, config.history.clone())
                    .map_err(ServerError::History)?;
            let store = Store {
                died: handle.died(),
                threads,
                #[cfg(test)]
                handle: Some(handle.clone()),
            };
            (Some(handle), high_water, Some(store))
        } else {
            (None, 0, None)
        };
        Ok(Parts {
            config,
            moderation,
            auth,
            tls,
            filter,
            history,
            first_msg_id,
            store,
        })
    }

    fn assemble(self, joined: Option<(cluster::Cluster, cluster::Feeds)>) -> Server {
        let Parts {
            config,
            moderation,
            auth,
            tls,
            filter,
            history,
            first_msg_id,
            store,
        } = self;
        let config = Arc::new(config);
        let stats = Arc::new(Stats::default());
        if history.is_none() {
            moderation.mark_loaded();
        }
        let services = Arc::new(user::Services {
            moderation,
            filter: filter.clone(),
            cluster: joined.as_ref().map(|(c, _)| c.clone()),
        });
        if let Some(history) = &history {
            let stats = stats.clone();
            history.observe_commits(Box::new(move |batch, took| {
                stats.metrics.commit(batch, took)
            }));
        }
        let world = WorldHandle::new(
            config.clone(),
            stats.clone(),
            Box::new(LocalFanout),
            history.clone(),
            first_msg_id,
            services.clone(),
        );
        let cluster = joined.map(|(cluster, feeds)| {
            cluster.start(
                feeds,
                world.clone(),
                &services,
                history.clone(),
                stats.clone(),
                config.data_dir.clone(),
            );
            cluster
        });
        let reloader = Arc::new(reload::Reloader::new(
            config.clone(),
            auth.clone(),
            tls.clone(),
            filter,
        ));
        let ctx = Arc::new(ConnCtx {
            world,
            auth,
            config,
            stats,
            shutdown: CancellationToken::new(),
            drain: CancellationToken::new(),
            cluster,
        });
        Server {
            ctx,
            tls,
            store,
            history,
            services,
            reloader,
            game_addr: Arc::default(),
        }
    }
}

impl Server {
    /// The world actor, for in-process control (operators, tests).
    pub fn world(&self) -> WorldHandle {
        self.ctx.world.clone()
    }

    /// The cluster link, in cluster mode.
    pub fn cluster(&self) -> Option<cluster::Cluster> {
        self.ctx.cluster.clone()
    }

    /// The server's counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.ctx.stats.clone()
    }

    /// What the admin API drives; serve it with [`admin::serve`] on a
    /// listener of its own.
    pub fn admin(&self) -> admin::AdminState {
        let mut state = admin::AdminState::new(
            self.ctx.world.clone(),
            self.ctx.stats.clone(),
            self.history.clone(),
            self.services.moderation.clone(),
            self.services.filter.clone(),
            self.reloader.clone(),
            self.ctx.config.clone(),
        );
        state.game_addr = self.game_addr.clone();
        state.dev_signer = dev_signer(&self.ctx.config).map(Arc::new);
        state.cluster = self.services.cluster.clone();
        state.drain = Some(self.ctx.drain.clone());
        state
    }

    /// Re-reads keys, TLS certificate and word list (SIGHUP).
    pub fn reloader(&self) -> Arc<reload::Reloader> {
        self.reloader.clone()
    }

    /// Accepts connections until `shutdown` is cancelled, then kicks every
    /// player with reason SHUTDOWN and waits (up to the configured grace)
    /// for connections to flush and close. An error means the server could
    /// not go on (see [`ServerError::HistoryDied`]).
    pub async fn run(
        mut self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), ServerError> {
        // First, before anything awaits: the demo page names this port.
        if let Ok(addr) = listener.local_addr() {
            let _ = self.game_addr.set(addr);
        }
        // Sanctions in force before the first login is accepted.
        if let Some(history) = self.history.take() {
            let stored = history
                .load_moderation()
                .await
                .map_err(ServerError::LoadModeration)?;
            self.services.moderation.load(stored);
        }
        let tracker = TaskTracker::new();
        let ctx = self.ctx.clone();
        let accept = tokio::spawn(net::listener::accept_loop(
            listener,
            self.tls,
            ctx.clone(),
            tracker.clone(),
        ));
        ctx.stats.ready.store(true, Ordering::Release);
        let died = self.store.as_ref().map(|s| s.died.clone());
        let store_died = async {
            match &died {
                Some(died) => died.cancelled().await,
                None => std::future::pending().await,
            }
        };
        // A dead store cannot acknowledge anything any more: the server
        // stops, and exits non-zero, so that an orchestrator restarts it.
        let drain = ctx.drain.clone();
        let failed = tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = store_died => true,
            _ = drain.cancelled() => {
                // The listener has closed; the players go a batch at a
                // time, then the server stops as if asked to.
                ctx.stats.ready.store(false, Ordering::Release);
                info!("draining: moving every player off this node");
                drain_players(&ctx.world, shutdown.clone()).await;
                info!("drained");
                false
            }
        };
        ctx.stats.ready.store(false, Ordering::Release);
        if failed {
            error!("the history store died; shutting down");
        } else {
            info!("shutting down");
        }
        // Pre-login connections watch this token; logged-in players are
        // ended by the world (each actor answers its pending chat replies
        // first).
        ctx.shutdown.cancel();
        let _ = accept.await;
        let _ = ctx.world.shutdown().await;
        if let Some(cluster) = &ctx.cluster {
            cluster.stop().await;
        }
        tracker.close();
        let grace = ctx.config.limits.shutdown_grace();
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            warn!(
                remaining = tracker.len(),
                "connections still open after the shutdown grace"
            );
        }
        if let Some(store) = self.store {
            // The world and the user actors have let go of the store, so
            // its threads commit what is queued and end.
            #[cfg(test)]
            drop(store.handle);
            // Joined from a thread of its own, not the runtime's blocking
            // pool: a runtime waits for its blocking tasks when it is
            // dropped, and a join that never ends must not hang the exit.
            let threads = store.threads;
            let (done, joined) = tokio::sync::oneshot::channel();
            let spawned = std::thread::Builder::new()
                .name("history-join".into())
                .spawn(move || {
                    threads.join();
                    let _ = done.send(());
                });
            if spawned.is_err()
                || tokio::time::timeout(STORE_JOIN_TIMEOUT, joined)
                    .await
                    .is_err()
            {
                warn!("history threads still running at exit");
            }
        }
        if failed {
            Err(ServerError::HistoryDied)
        } else {
            Ok(())
        }
    }
}

/// Players a drain moves off at a time, and how often.
const DRAIN_BATCH: usize = 100;
const DRAIN_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Ends every session with the reconnect kick, [`DRAIN_BATCH`] at a time,
/// so the players resume on other nodes without all reconnecting at once;
/// returns once none is left (or the server is told to stop).
async fn drain_players(world: &WorldHandle, shutdown: CancellationToken) {
    loop {
        match world.drain(DRAIN_BATCH).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(DRAIN_EVERY) => {}
        }
    }
}

/// A signer over the development keys, when the server runs on them: no
/// `auth.keys_file` set, and the ring in the data dir is the development
/// ring (kid `dev-ed25519`). Production (a configured key file) never has
/// one, so the demo's token endpoint does not exist there.
fn dev_signer(config: &Config) -> Option<guildchat_auth::Signer> {
    if config.auth.keys_file.is_some() || config.auth.insecure_dev_auth {
        return None;
    }
    let ring = auth::read_ring(&config.keys_file()).ok()?;
    guildchat_auth::Signer::new(&ring, guildchat_auth::TokenFormat::Jws, Some("dev-ed25519")).ok()
}

/// Binds a listener with the configured backlog.
pub fn bind(addr: SocketAddr, backlog: u32) -> Result<TcpListener, ServerError> {
    let listen = |addr: SocketAddr| -> std::io::Result<TcpListener> {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(backlog)
    };
    listen(addr).map_err(|source| ServerError::Listen { addr, source })
}

/// Runs a server: [`Server::new`] then [`Server::run`].
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    Server::start(config).await?.run(listener, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_dead_history_store_stops_the_server_with_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            data_dir: dir.path().to_owned(),
            ..Config::default()
        };
        let listener = bind("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let mut server = Server::new(config).unwrap();
        let stats = server.stats();
        let store = server.store.as_mut().unwrap();
        let died = store.died.clone();
        store.handle.take().unwrap().crash_writer();
        let shutdown = CancellationToken::new();
        let run = tokio::spawn(server.run(listener, shutdown.clone()));
        died.cancelled().await;
        let result = tokio::time::timeout(std::time::Duration::from_secs(30), run)
            .await
            .expect("the server stops by itself")
            .unwrap();
        assert!(matches!(result, Err(ServerError::HistoryDied)));
        assert!(!stats.ready.load(Ordering::Acquire), "no longer ready");
        assert!(!shutdown.is_cancelled(), "it stopped without being asked");
    }
}
