//! `guildchat serve`: turns flags and the config file into a [`Config`],
//! binds the game and admin listeners, and runs the server until SIGINT or
//! SIGTERM. SIGHUP reloads keys, TLS and the word list in place.
//!
//! Everything the server does lives in the library; this module only wires
//! process-level things (logging, signals, sockets) to it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::ValueEnum;
use guildchat_server::{admin, reload::Reloader, Config, Server};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Websocket listen address [default: 127.0.0.1:7000]
    #[arg(long, env = "GUILDCHAT_LISTEN")]
    listen: Option<SocketAddr>,
    /// Admin HTTP API address, or `off`; overrides `admin.listen`
    /// [default: 127.0.0.1:7001]. Port 0 picks a free port.
    #[arg(long, env = "GUILDCHAT_ADMIN_LISTEN", value_parser = parse_admin_listen)]
    admin_listen: Option<AdminListen>,
    /// Data directory (keys, history) [default: ./data]
    #[arg(long, env = "GUILDCHAT_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// TOML config file; unknown keys are rejected.
    #[arg(long, env = "GUILDCHAT_CONFIG")]
    config: Option<PathBuf>,
    /// Join a cluster through this NATS server (JetStream on), e.g.
    /// `nats://127.0.0.1:4222`; overrides `cluster.url`.
    #[arg(long, env = "GUILDCHAT_CLUSTER")]
    cluster: Option<String>,
    /// This node's unique name in the cluster; overrides
    /// `cluster.node_id`.
    #[arg(long, env = "GUILDCHAT_NODE_ID")]
    node_id: Option<String>,
    /// Keep chat lines in this PostgreSQL database (`postgres://...`,
    /// without TLS) instead of the data dir's SQLite file; every node of a
    /// cluster points at the same one. Overrides `history.url`.
    #[arg(long, env = "GUILDCHAT_HISTORY_URL")]
    history_url: Option<String>,
    /// Accept ANY token and trust the login request. Only for trying the
    /// protocol.
    #[arg(long)]
    insecure_dev_auth: bool,
    /// Log line format.
    #[arg(long, env = "GUILDCHAT_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// `--admin-listen`: an address, or `None` for `off`. A newtype, because
/// clap reads a bare `Option<Option<_>>` as "flag with optional value".
#[derive(Clone, Copy)]
struct AdminListen(Option<SocketAddr>);

fn parse_admin_listen(s: &str) -> Result<AdminListen, String> {
    guildchat_server::config::parse_admin_listen(s).map(AdminListen)
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Logs go to stderr through a non-blocking writer: the world actor and the
/// connection tasks never wait on a slow log pipe (a full buffer drops
/// lines instead). The guard flushes what is buffered when `main` returns.
pub fn init_logging(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().init(),
    }
    guard
}

/// How long the admin listener may take to finish its requests once the
/// game server has stopped.
const ADMIN_STOP_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(AdminListen(admin_listen)) = args.admin_listen {
        // Set before `Server::start`, whose validation refuses a non-loopback
        // admin listener without keys: the flag gets the same checks as
        // the file.
        config.admin.listen = admin_listen;
    }
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    if let Some(url) = args.cluster {
        config.cluster.url = Some(url);
    }
    if let Some(node) = args.node_id {
        config.cluster.node_id = Some(node);
    }
    if let Some(url) = args.history_url {
        config.history.url = Some(url);
    }
    if args.insecure_dev_auth {
        config.auth.insecure_dev_auth = true;
    }
    // Watched before anything is bound: SIGHUP's default action ends the
    // process, and a reload sent as soon as the server says it listens
    // must not.
    let hangup = watch_hangup();
    // The store (WAL recovery) and the keys first: a listener bound before
    // would let early clients queue in the backlog and time out meanwhile.
    let (listen, backlog, admin_listen) = (config.listen, config.backlog, config.admin.listen);
    let server = Server::start(config).await?;
    let listener = guildchat_server::bind(listen, backlog)?;
    let addr = listener.local_addr()?;
    let admin_listener = match admin_listen {
        Some(at) => {
            let l = tokio::net::TcpListener::bind(at)
                .await
                .with_context(|| format!("cannot bind the admin listener on {at}"))?;
            info!("admin listener on {}", l.local_addr()?);
            Some(l)
        }
        None => None,
    };
    info!(%addr, "guildchat listening (websocket)");
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        signal.cancel();
    });
    if let Some(hangup) = hangup {
        tokio::spawn(reload_on_hangup(
            hangup,
            server.reloader(),
            shutdown.clone(),
        ));
    }
    let admin_task = admin_listener.map(|l| {
        let (state, token) = (server.admin(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = admin::serve(l, state, token).await {
                error!(error = %e, "admin listener failed");
            }
        })
    });
    // An error here makes `main` return it, so the process exits non-zero.
    let result = server.run(listener, shutdown).await;
    if let Some(task) = admin_task {
        if tokio::time::timeout(ADMIN_STOP_TIMEOUT, task)
            .await
            .is_err()
        {
            warn!("admin requests still open at exit");
        }
    }
    result?;
    info!("bye");
    Ok(())
}

#[cfg(unix)]
type Hangup = tokio::signal::unix::Signal;
#[cfg(not(unix))]
type Hangup = std::convert::Infallible;

fn watch_hangup() -> Option<Hangup> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::hangup()) {
            Ok(hup) => Some(hup),
            Err(e) => {
                warn!(error = %e, "cannot watch SIGHUP; reload only through the admin API");
                None
            }
        }
    }
    #[cfg(not(unix))]
    None
}

/// Each SIGHUP re-reads keys, TLS and the word list. A refused reload
/// changes nothing and the server goes on; sessions are never touched.
#[cfg(unix)]
async fn reload_on_hangup(
    mut hangup: Hangup,
    reloader: Arc<Reloader>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            got = hangup.recv() => if got.is_none() { return },
        }
        let reloader = reloader.clone();
        // Blocking file reads and key parsing: off the runtime's workers.
        match tokio::task::spawn_blocking(move || reloader.reload()).await {
            Ok(Ok(done)) => info!("reload: {}", done.join(", ")),
            Ok(Err(e)) => warn!(error = %e, "reload refused; nothing changed"),
            Err(e) => warn!(error = %e, "reload stopped"),
        }
    }
}

#[cfg(not(unix))]
async fn reload_on_hangup(hangup: Hangup, _: Arc<Reloader>, _: CancellationToken) {
    match hangup {}
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {},
                    _ = term.recv() => {},
                }
            }
            Err(e) => {
                warn!(error = %e, "cannot watch SIGTERM; only SIGINT stops the server");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
