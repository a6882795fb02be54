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
//! - [`ids`], [`stats`]: id newtypes and counters.
//!
//! The entry point is [`Server`]: build it from a [`Config`], then
//! [`Server::run`] it on a listener until a shutdown token is cancelled.

pub mod auth;
pub mod config;
pub mod history;
pub mod ids;
pub mod net;
pub mod records;
pub mod stats;
pub mod tls;
pub mod user;
pub mod world;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

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
    #[error("history store: {0}")]
    History(history::OpenError),
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
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Server {
    /// Validates the config, loads keys (generating development keys on
    /// first start) and spawns the world actor. Call inside a runtime.
    pub fn new(config: Config) -> Result<Server, ServerError> {
        config.validate()?;
        let auth = auth::Authenticator::from_config(&config)?;
        let tls = config.tls.as_ref().map(tls::acceptor).transpose()?;
        let (history, first_msg_id) = if config.history.enabled {
            let (handle, high_water, _threads) =
                history::HistoryHandle::open(&config.data_dir, config.history.clone())
                    .map_err(ServerError::History)?;
            (Some(handle), high_water)
        } else {
            (None, 0)
        };
        let config = Arc::new(config);
        let stats = Arc::new(Stats::default());
        let world = WorldHandle::new(
            config.clone(),
            stats.clone(),
            Box::new(LocalFanout),
            history,
            first_msg_id,
        );
        let ctx = Arc::new(ConnCtx {
            world,
            auth,
            config,
            stats,
            shutdown: CancellationToken::new(),
        });
        Ok(Server { ctx, tls })
    }

    /// The world actor, for in-process control (operators, tests).
    pub fn world(&self) -> WorldHandle {
        self.ctx.world.clone()
    }

    /// The server's counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.ctx.stats.clone()
    }

    /// Accepts connections until `shutdown` is cancelled, then kicks every
    /// player with reason SHUTDOWN and waits (up to the configured grace)
    /// for connections to flush and close. An error means the server could
    /// not go on (see [`ServerError::HistoryDied`]).
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), ServerError> {
        let tracker = TaskTracker::new();
        let ctx = self.ctx.clone();
        let accept = tokio::spawn(net::listener::accept_loop(
            listener,
            self.tls,
            ctx.clone(),
            tracker.clone(),
        ));
        shutdown.cancelled().await;
        info!("shutting down");
        // Pre-login connections watch this token; logged-in players are
        // kicked by the world.
        ctx.shutdown.cancel();
        let _ = accept.await;
        let _ = ctx.world.shutdown().await;
        tracker.close();
        let grace = ctx.config.limits.shutdown_grace();
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            warn!(
                remaining = tracker.len(),
                "connections still open after the shutdown grace"
            );
        }
        Ok(())
    }
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
    Server::new(config)?.run(listener, shutdown).await
}
