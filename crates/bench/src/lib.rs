//! `guildchat bench`: a load generator that plays real game clients over
//! real websockets against a guildchat server (and, for comparison, against
//! a minimal reference relay), and reports throughput, end-to-end latency,
//! loss and the server's CPU and memory.
//!
//! It owns the bench's processes and numbers: a coordinator
//! ([`run`](self::run)) that starts the servers and the worker processes,
//! steps through the scenarios and writes the results; the workers
//! ([`worker`]) that hold the connections; and the reference server
//! ([`reference`]). It must never aim traffic anywhere but loopback, never
//! run a loop that is not bounded in time, and never change the server it
//! measures: it only talks the protocol and reads `/proc`.
//!
//! # Layout
//! - [`plan`]: the coordinator/worker messages and the player layout.
//! - [`worker`]: the player tasks of a worker process.
//! - [`conn`]: one bench websocket.
//! - [`wire`]: the tag carried in chat text; the zero-copy notify reader.
//! - [`tally`]: counters, histograms and loss accounting.
//! - [`procfs`]: `/proc` sampling and the open-file limit.
//! - [`procs`]: starting and stopping servers and workers.
//! - [`run`](self::run): the scenarios.
//! - [`report`]: result types, ratios, tables.
//! - [`reference`]: the reference relay server.
//! - [`uws`]: the environment of the uWebSockets relay (`--peer uws`).

mod conn;
mod plan;
mod procfs;
mod procs;
mod reference;
mod report;
mod run;
mod tally;
mod uws;
mod wire;
mod worker;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use plan::TokenKind;

/// A load scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// N players log in and only heartbeat: memory and CPU per connection.
    Idle,
    /// N receivers, a few world senders, rate stepped up until delivery
    /// falls behind.
    Fanout,
    /// N players connect and log in as fast as possible.
    LoginStorm,
    /// An MMO's mix: guilds, teams, scenes, whispers, some world chat,
    /// reconnects.
    Mix,
    /// Fan-out while a few receivers stop reading.
    Slow,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Idle => "idle",
            Scenario::Fanout => "fanout",
            Scenario::LoginStorm => "login-storm",
            Scenario::Mix => "mix",
            Scenario::Slow => "slow",
        }
    }
}

/// A further server to compare with, beside the reference relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Peer {
    /// uWebSockets (socketify from PyPI, in a venv under the target dir)
    /// relaying the reference's protocol; needs python3 and libuv1.
    Uws,
}

/// `guildchat bench`.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    internal: Option<Internal>,
    #[command(flatten)]
    run: RunArgs,
}

/// Processes the bench starts from its own binary.
#[derive(Debug, clap::Subcommand)]
enum Internal {
    /// A worker process holding a slice of the clients (commands on stdin).
    #[command(hide = true)]
    Worker,
    /// The reference relay server.
    #[command(hide = true)]
    Reference {
        #[arg(long)]
        listen: SocketAddr,
        /// Exit after this long whatever happens.
        #[arg(long, default_value_t = 3600)]
        limit_secs: u64,
    },
}

/// What to run and how big.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Scenarios to run, in order (comma-separated).
    #[arg(
        long = "scenario",
        short = 's',
        value_enum,
        value_delimiter = ',',
        default_value = "fanout"
    )]
    pub scenarios: Vec<Scenario>,
    /// Simulated players.
    #[arg(long, default_value_t = 1000)]
    pub clients: u32,
    /// Worker processes [default: enough for 15,000 sockets each, at least 2].
    #[arg(long)]
    pub procs: Option<u32>,
    /// Target a running guildchat (loopback only) instead of starting one;
    /// several comma-separated URLs (a cluster's nodes) share the players
    /// out in turn.
    #[arg(long, requires = "data_dir")]
    pub url: Option<String>,
    /// With --url: the server's data dir, whose keys.toml mints tokens.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// With --url: the server's pid, for CPU and memory figures.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// The guildchat binary to start [default: this one].
    #[arg(long)]
    pub server_bin: Option<PathBuf>,
    /// Skip the reference server.
    #[arg(long)]
    pub no_reference: bool,
    /// Also measure these servers in `idle` and `fanout`, and their bare
    /// websocket upgrade beside `login-storm` (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub peer: Vec<Peer>,
    /// Hard cap on the whole run, in seconds.
    #[arg(long, default_value_t = 900)]
    pub duration: u64,
    /// `idle`: seconds measured after every client is connected.
    #[arg(long, default_value_t = 20.0)]
    pub idle_secs: f64,
    /// `mix`: seconds the players chat.
    #[arg(long, default_value_t = 60.0)]
    pub mix_secs: f64,
    /// Fan-out senders.
    #[arg(long, default_value_t = 2)]
    pub senders: u32,
    /// Fan-out rates to step through, lines per second, all senders
    /// together [default: 5,10,20,50,100,200,500,1000,2000].
    #[arg(long, value_delimiter = ',')]
    pub rates: Vec<f64>,
    /// Seconds per fan-out step.
    #[arg(long, default_value_t = 5.0)]
    pub step_secs: f64,
    /// A step whose p99 latency exceeds this has fallen behind.
    #[arg(long, default_value_t = 250.0)]
    pub max_p99_ms: f64,
    /// How long a step may take to deliver its last lines, in seconds.
    #[arg(long, default_value_t = 5.0)]
    pub drain_secs: f64,
    /// Characters per chat line.
    #[arg(long, default_value_t = 64)]
    pub text_len: usize,
    /// Seconds between a client's heartbeats.
    #[arg(long, default_value_t = 10.0)]
    pub heartbeat_secs: f64,
    /// `slow`: fraction of receivers that stop reading.
    #[arg(long, default_value_t = 0.03)]
    pub slow_fraction: f64,
    /// `slow`: world lines per second during the scenario.
    #[arg(long, default_value_t = 20.0)]
    pub slow_rate: f64,
    /// `slow`: characters per line, larger than usual so that a stopped
    /// reader's socket buffers fill within the scenario's seconds.
    #[arg(long, default_value_t = 1000)]
    pub slow_text_len: usize,
    /// `slow`: the server's `limits.socket_send_buffer` (SO_SNDBUF) in
    /// bytes; 0 keeps the kernel's auto-tuning, under which a stopped
    /// reader can pin megabytes before the server notices.
    #[arg(long, default_value_t = 32 * 1024)]
    pub slow_sndbuf: u32,
    /// `mix`: world lines per second, all players together.
    #[arg(long, default_value_t = 3.0)]
    pub world_rate: f64,
    /// `mix`: seconds between a player's guild, team, scene and whisper
    /// lines, as MIN-MAX.
    #[arg(long, default_value = "30-120")]
    pub mix_period: String,
    /// `mix`: fraction of players reconnecting per minute.
    #[arg(long, default_value_t = 0.1)]
    pub reconnect_per_min: f64,
    /// `mix` against several `--url`s: each reconnect goes to the next node
    /// (as a balancer without sticky sessions may send it), not back to
    /// the player's own.
    #[arg(long)]
    pub roam: bool,
    /// Token the clients log in with.
    #[arg(long, value_enum, default_value = "eddsa")]
    pub token: TokenKind,
    /// `login-storm`: token formats to storm with, one storm each.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub storm_tokens: Vec<TokenKind>,
    /// Connections opened at once, all workers together.
    #[arg(long, default_value_t = 512)]
    pub concurrency: usize,
    /// `login-storm`: connections opened at once.
    #[arg(long, default_value_t = 2048)]
    pub storm_concurrency: usize,
    /// Write the results here as JSON.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// A quick end-to-end check for CI: a few hundred clients for a few
    /// seconds; exits non-zero on any loss, duplicate or failed login.
    #[arg(long)]
    pub smoke: bool,
    /// Exit non-zero when any problem was found (implied by --smoke).
    #[arg(long)]
    pub strict: bool,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// Keep the work directory (server logs, configs) after the run.
    #[arg(long)]
    pub keep_dir: bool,
}

/// Runs `guildchat bench` (or one of its internal processes).
pub fn main(args: BenchArgs) -> anyhow::Result<()> {
    match args.internal {
        Some(Internal::Worker) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(worker::run()),
        Some(Internal::Reference { listen, limit_secs }) => {
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(reference::serve(listen, Duration::from_secs(limit_secs)))
        }
        // The coordinator mostly waits; one thread leaves the cores to the
        // server and the workers.
        None => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(run::run(args.run)),
    }
}
