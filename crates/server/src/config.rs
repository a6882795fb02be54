//! Server configuration: a TOML file whose unknown keys are rejected, with
//! defaults for everything, validated once at start-up with messages that
//! name the offending key.
//!
//! This module only describes and checks settings; it never opens sockets or
//! files other than the config file it is asked to read.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use guildchat_protocol::limits::{MAX_NAME_CHARS, MAX_TEXT_CHARS};
use guildchat_protocol::ChatType;
use serde::Deserialize;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("invalid setting `{key}`: {why}")]
    Invalid { key: &'static str, why: String },
}

fn invalid(key: &'static str, why: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        why: why.into(),
    }
}

/// Everything `guildchat serve` can be told.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Websocket listen address.
    pub listen: SocketAddr,
    /// Where keys and the history database live.
    pub data_dir: PathBuf,
    /// Listen backlog handed to `listen(2)`; raise it (and
    /// `net.core.somaxconn`) for login storms.
    pub backlog: u32,
    /// Most players logged in at once; further new logins get SERVER_FULL.
    pub max_online: u32,
    pub auth: AuthConfig,
    pub limits: LimitsConfig,
    pub chat: ChatConfig,
    pub session: SessionConfig,
    pub history: crate::history::HistoryConfig,
    pub tls: Option<TlsConfig>,
    pub rates: RatesConfig,
    pub admission: AdmissionConfig,
    pub admin: AdminConfig,
    /// Most players one player may block.
    pub max_blocks: usize,
    /// `[cluster]`: join other nodes over NATS (off by default).
    pub cluster: ClusterConfig,
}

/// Cluster mode: nodes that share one chat service through NATS with
/// JetStream. With no `url`, the server runs alone, in-process.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// The NATS server, e.g. `nats://127.0.0.1:4222`.
    pub url: Option<String>,
    /// This node's name in the cluster: unique, 1 to 32 of `[A-Za-z0-9_-]`.
    pub node_id: Option<String>,
}

impl ClusterConfig {
    /// Whether this server is a node of a cluster.
    pub fn enabled(&self) -> bool {
        self.url.is_some()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let Some(_) = &self.url else {
            if self.node_id.is_some() {
                return Err(invalid("cluster.node_id", "needs cluster.url"));
            }
            return Ok(());
        };
        let Some(node) = &self.node_id else {
            return Err(invalid("cluster.node_id", "a cluster node needs a node id"));
        };
        let ok = (1..=32).contains(&node.len())
            && node
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !ok {
            return Err(invalid(
                "cluster.node_id",
                "1 to 32 characters of A-Z, a-z, 0-9, `_` and `-`",
            ));
        }
        Ok(())
    }
}

/// The admin HTTP API's listener and keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Where it listens (`"off"`: no admin listener). Port 0 picks a free
    /// port, which is logged.
    #[serde(deserialize_with = "listen_or_off")]
    pub listen: Option<SocketAddr>,
    /// `[[admin.keys]]`: who may call the API. With none, the listener
    /// serves only `/metrics`, `/healthz`, `/readyz` and the console's
    /// static pages, and only on a loopback address.
    pub keys: Vec<crate::admin::AdminKey>,
    /// Requests per second each key may make (burst: twice as many);
    /// beyond it, 429.
    pub requests_per_sec: u32,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 7001))),
            keys: Vec::new(),
            requests_per_sec: 200,
        }
    }
}

/// Parses `--admin-listen` and `admin.listen`: an address, or `off`.
pub fn parse_admin_listen(s: &str) -> Result<Option<SocketAddr>, String> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|e| format!("`{s}`: not an address or `off` ({e})"))
}

fn listen_or_off<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let s = String::deserialize(d)?;
    parse_admin_listen(&s).map_err(serde::de::Error::custom)
}

impl AdminConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=100_000).contains(&self.requests_per_sec) {
            return Err(invalid("admin.requests_per_sec", "must be in 1..=100000"));
        }
        let mut ids = std::collections::HashSet::new();
        let mut keys = std::collections::HashSet::new();
        for k in &self.keys {
            if k.id.is_empty() || k.id.len() > 64 {
                return Err(invalid(
                    "admin.keys",
                    "every key needs an id of 1 to 64 bytes",
                ));
            }
            if k.key.len() < crate::admin::keys::MIN_KEY_LEN {
                return Err(invalid(
                    "admin.keys",
                    format!(
                        "key `{}` is shorter than {} characters",
                        k.id,
                        crate::admin::keys::MIN_KEY_LEN
                    ),
                ));
            }
            if !ids.insert(k.id.as_str()) || !keys.insert(k.key.as_str()) {
                return Err(invalid(
                    "admin.keys",
                    format!("key `{}` is listed twice", k.id),
                ));
            }
        }
        if let Some(addr) = self.listen {
            if self.keys.is_empty() && !addr.ip().is_loopback() {
                return Err(invalid(
                    "admin.listen",
                    "with no admin.keys the admin listener must be on a loopback address",
                ));
            }
        }
        Ok(())
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 7000)),
            data_dir: PathBuf::from("./data"),
            backlog: 1024,
            max_online: 20_000,
            auth: AuthConfig::default(),
            limits: LimitsConfig::default(),
            chat: ChatConfig::default(),
            session: SessionConfig::default(),
            history: crate::history::HistoryConfig::default(),
            tls: None,
            rates: RatesConfig::default(),
            admission: AdmissionConfig::default(),
            admin: AdminConfig::default(),
            max_blocks: 500,
            cluster: ClusterConfig::default(),
        }
    }
}

/// Who may connect, and how far a connection gets before it logs in. A
/// connection over a limit is refused before its upgrade (`503` on a plain
/// socket, a close on TLS) and counted; players already connected are not
/// affected.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdmissionConfig {
    /// Most open connections, logged in or not. The limit in force is
    /// lower if the process's soft `RLIMIT_NOFILE` minus a reserve of 64
    /// descriptors is; it is logged at start-up.
    pub max_connections: u32,
    /// Most connections that have not logged in yet (in TLS, the upgrade or
    /// the login request). A connection stops counting when its login
    /// succeeds.
    pub max_prelogin: u32,
    /// Most open connections from one source address.
    pub max_per_ip: u32,
    /// New connections (each carries one login) per second from one source
    /// address, sustained ...
    pub logins_per_ip_per_sec: u32,
    /// ... and in a burst.
    pub login_burst_per_ip: u32,
    /// Expect a PROXY protocol header (v1 or v2) on every connection, as
    /// sent by a load balancer, and use the address it carries for the
    /// per-IP limits and logs. A connection without a valid one is refused.
    /// Turn on only behind a balancer that sends it: anyone who can reach
    /// the port can claim any address.
    pub proxy_protocol: bool,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        AdmissionConfig {
            max_connections: 20_000,
            max_prelogin: 2_048,
            max_per_ip: 64,
            logins_per_ip_per_sec: 20,
            login_burst_per_ip: 40,
            proxy_protocol: false,
        }
    }
}

impl AdmissionConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let keys: [(&'static str, u32); 5] = [
            ("admission.max_connections", self.max_connections),
            ("admission.max_prelogin", self.max_prelogin),
            ("admission.max_per_ip", self.max_per_ip),
            (
                "admission.logins_per_ip_per_sec",
                self.logins_per_ip_per_sec,
            ),
            ("admission.login_burst_per_ip", self.login_burst_per_ip),
        ];
        for (key, value) in keys {
            if value == 0 {
                return Err(invalid(key, "must be > 0"));
            }
        }
        if self.login_burst_per_ip < self.logins_per_ip_per_sec {
            return Err(invalid(
                "admission.login_burst_per_ip",
                "must be at least admission.logins_per_ip_per_sec",
            ));
        }
        Ok(())
    }
}

/// Login token settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// The `aud` tokens must carry.
    pub audience: String,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
    /// Key ring (TOML `[[keys]]`); defaults to `<data_dir>/keys.toml`, which
    /// is generated with development keys on first start.
    pub keys_file: Option<PathBuf>,
    /// Accept any token and trust the login request's fields. Only for
    /// trying the protocol; never in production.
    pub insecure_dev_auth: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            audience: "guildchat".into(),
            leeway_secs: 30,
            keys_file: None,
            insecure_dev_auth: false,
        }
    }
}

/// Timers and queue sizes of one connection.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// A connection that has not logged in by then is closed.
    pub login_timeout_ms: u64,
    /// The server pings a client every this often, unless the client sent
    /// a frame since the last ping (that already proves it alive).
    pub ping_interval_ms: u64,
    /// A connection silent (no frame, no pong) for this long is closed.
    pub idle_timeout_ms: u64,
    /// Frames that may wait for one client's socket. Past half of it (or of
    /// `outbound_bytes`), world and scene notifications are shed; when it is
    /// full, the client is a slow consumer and is disconnected.
    pub outbound_queue: usize,
    /// Bytes that may wait for one client's socket; same policy as
    /// `outbound_queue`.
    pub outbound_bytes: usize,
    /// A client whose queue has not drained at all for this long is a slow
    /// consumer, even if the queue is not full (checked on the world's
    /// one-second tick).
    pub stall_timeout_ms: u64,
    /// SO_SNDBUF for client sockets, in bytes; 0 keeps the kernel's
    /// auto-tuning (up to megabytes per socket). The default, 64 KiB, bounds
    /// the kernel memory a stalled client can pin and lets the slow-consumer
    /// policy see it stall, while leaving room for chat bursts.
    pub socket_send_buffer: u32,
    /// Undecodable or unexpected frames tolerated per connection before it
    /// is closed with PROTOCOL_ERROR.
    pub bad_frame_limit: u32,
    /// How long shutdown waits for connections to flush and close.
    pub shutdown_grace_ms: u64,
    /// Write coalescing ("corking"): a frame for a client that was written
    /// to less than this long ago waits out the rest of it, so that the
    /// frames behind it share one write. Adds at most this much latency, and
    /// only to a client receiving faster than one write per interval; 0
    /// turns it off.
    pub write_coalesce_ms: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            login_timeout_ms: 5_000,
            ping_interval_ms: 15_000,
            idle_timeout_ms: 45_000,
            // Both sized so that a full resume replay fits with the default
            // session and history settings (see `Config::replay_bound`).
            outbound_queue: 1024,
            outbound_bytes: 2 * 1024 * 1024,
            stall_timeout_ms: 10_000,
            socket_send_buffer: 64 * 1024,
            bad_frame_limit: 8,
            shutdown_grace_ms: 5_000,
            write_coalesce_ms: 5,
        }
    }
}

impl LimitsConfig {
    pub fn login_timeout(&self) -> Duration {
        Duration::from_millis(self.login_timeout_ms)
    }
    pub fn ping_interval(&self) -> Duration {
        Duration::from_millis(self.ping_interval_ms)
    }
    pub fn write_coalesce(&self) -> Duration {
        Duration::from_millis(self.write_coalesce_ms)
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }
    pub fn stall_timeout(&self) -> Duration {
        Duration::from_millis(self.stall_timeout_ms)
    }
}

/// Request rate limits of one player, per kind of request (chat lines have
/// their channel cooldowns instead). Each kind is a token bucket: `*_burst`
/// requests at once, refilled at `*_per_sec`. A request over the limit gets
/// RES_RATE_LIMITED with the wait; a player sending more than `kick_factor`
/// times a limit, for long enough to refuse `kick_factor - 1` bursts beyond
/// it, is closed with KICK_RATE_LIMITED.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RatesConfig {
    /// Heartbeats: the cheapest request, but each costs a reply.
    pub heartbeat_per_sec: u32,
    pub heartbeat_burst: u32,
    /// Requests answered from the world's state: set-mask and online.
    pub world_per_sec: u32,
    pub world_burst: u32,
    /// History pages: each is a read on the store's one reader thread.
    pub history_per_sec: u32,
    pub history_burst: u32,
    /// How many times its limit a player may keep sending before the
    /// connection is closed.
    pub kick_factor: u32,
    /// One bad frame of `limits.bad_frame_limit` is forgiven this often, so
    /// that rare garbage over a long session does not add up to a close.
    pub bad_frame_forgive_ms: u64,
}

impl Default for RatesConfig {
    fn default() -> Self {
        // Far above any honest client: a game sends a heartbeat every few
        // seconds, a mask change on a settings screen, history pages as a
        // player scrolls.
        RatesConfig {
            heartbeat_per_sec: 10,
            heartbeat_burst: 20,
            world_per_sec: 5,
            world_burst: 10,
            history_per_sec: 2,
            history_burst: 5,
            kick_factor: 5,
            bad_frame_forgive_ms: 10_000,
        }
    }
}

impl RatesConfig {
    pub fn bad_frame_forgive(&self) -> Duration {
        Duration::from_millis(self.bad_frame_forgive_ms)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let limits: [(&'static str, u32); 6] = [
            ("rates.heartbeat_per_sec", self.heartbeat_per_sec),
            ("rates.heartbeat_burst", self.heartbeat_burst),
            ("rates.world_per_sec", self.world_per_sec),
            ("rates.world_burst", self.world_burst),
            ("rates.history_per_sec", self.history_per_sec),
            ("rates.history_burst", self.history_burst),
        ];
        for (key, n) in limits {
            if !(1..=MAX_RATE).contains(&n) {
                return Err(invalid(key, format!("must be in 1..={MAX_RATE}")));
            }
        }
        if !(2..=100).contains(&self.kick_factor) {
            return Err(invalid("rates.kick_factor", "must be in 2..=100"));
        }
        if self.bad_frame_forgive_ms == 0 || self.bad_frame_forgive_ms > MAX_TIMER_MS {
            return Err(invalid(
                "rates.bad_frame_forgive_ms",
                format!("must be in 1..={MAX_TIMER_MS}"),
            ));
        }
        Ok(())
    }
}

/// Upper bound of every `rates.*_per_sec` and `rates.*_burst`: a million
/// requests a second is no limit at all, and it keeps `kick_factor` times
/// it far from overflowing.
pub const MAX_RATE: u32 = 1_000_000;

/// What happens to a session when its connection goes away.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionConfig {
    /// How long a player whose connection dropped stays registered (in
    /// guild, team and scene, receiving into its replay buffer) waiting for
    /// a resume. 0 ends the session with the connection.
    pub linger_ms: u64,
    /// Notifications kept per player for resume: private, guild, team and
    /// system. World and scene keep a quarter of this (at least 16), so a
    /// flood of world chat cannot push out a whisper.
    pub replay_buffer: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            linger_ms: 60_000,
            replay_buffer: 256,
        }
    }
}

impl Config {
    /// The oldest notification a resume can still need: a client that
    /// stopped hearing anything is noticed within the idle timeout (plus a
    /// ping interval), then lingers. Older replay entries are evicted.
    pub fn replay_max_age(&self) -> Duration {
        self.limits.idle_timeout() + self.limits.ping_interval() + self.session.linger()
    }
}

impl SessionConfig {
    pub fn linger(&self) -> Duration {
        Duration::from_millis(self.linger_ms)
    }

    /// Capacity of a player's scene replay ring, and of the world ring all
    /// players share.
    pub fn replay_buffer_shed(&self) -> usize {
        (self.replay_buffer / 4).max(16)
    }
}

/// Rules of one chat channel.
#[derive(Debug, Clone, Copy)]
pub struct ChannelRule {
    /// Minimum time between two messages of one player on this channel.
    pub cooldown_ms: u64,
    /// Longest text, in characters.
    pub max_chars: usize,
    /// What a line with words from the sensitive-word list gets: masked
    /// with `*` (the default) or refused with RES_FILTERED.
    pub filter: crate::filter::Policy,
}

impl ChannelRule {
    const fn new(cooldown_ms: u64) -> Self {
        ChannelRule {
            cooldown_ms,
            max_chars: 200,
            filter: crate::filter::Policy::Mask,
        }
    }

    pub fn cooldown(&self) -> Duration {
        Duration::from_millis(self.cooldown_ms)
    }
}

/// Per-channel rules. The system channel has none: clients cannot send on it.
/// Each key of a `[chat.<channel>]` table is optional; a missing one keeps
/// that channel's default (the defaults differ per channel, so serde's
/// per-field `default` cannot express them).
#[derive(Debug, Clone, Deserialize)]
#[serde(from = "ChatTables")]
pub struct ChatConfig {
    /// CHAT_NORMAL, the scene channel.
    pub scene: ChannelRule,
    pub guild: ChannelRule,
    pub world: ChannelRule,
    pub private: ChannelRule,
    pub team: ChannelRule,
}

impl Default for ChatConfig {
    fn default() -> Self {
        ChatConfig {
            scene: ChannelRule::new(1_000),
            guild: ChannelRule::new(1_000),
            world: ChannelRule::new(10_000),
            private: ChannelRule::new(1_000),
            team: ChannelRule::new(1_000),
        }
    }
}

/// `[chat.<channel>]` as written: any key may be left out.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RuleTable {
    cooldown_ms: Option<u64>,
    max_chars: Option<usize>,
    filter: Option<crate::filter::Policy>,
}

impl RuleTable {
    fn over(self, default: ChannelRule) -> ChannelRule {
        ChannelRule {
            cooldown_ms: self.cooldown_ms.unwrap_or(default.cooldown_ms),
            max_chars: self.max_chars.unwrap_or(default.max_chars),
            filter: self.filter.unwrap_or(default.filter),
        }
    }
}

/// `[chat]` as written: any channel may be left out.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ChatTables {
    scene: RuleTable,
    guild: RuleTable,
    world: RuleTable,
    private: RuleTable,
    team: RuleTable,
}

impl From<ChatTables> for ChatConfig {
    fn from(t: ChatTables) -> Self {
        let d = ChatConfig::default();
        ChatConfig {
            scene: t.scene.over(d.scene),
            guild: t.guild.over(d.guild),
            world: t.world.over(d.world),
            private: t.private.over(d.private),
            team: t.team.over(d.team),
        }
    }
}

impl ChatConfig {
    /// The longest text any channel accepts, in characters.
    pub fn max_chars(&self) -> usize {
        [
            self.scene.max_chars,
            self.guild.max_chars,
            self.world.max_chars,
            self.private.max_chars,
            self.team.max_chars,
        ]
        .into_iter()
        .max()
        .unwrap_or(0)
    }

    /// The rule of a channel a client may send on; `None` for the system
    /// channel and NONE.
    pub fn rule(&self, channel: ChatType) -> Option<&ChannelRule> {
        match channel {
            ChatType::ChatNormal => Some(&self.scene),
            ChatType::ChatGuild => Some(&self.guild),
            ChatType::ChatWorld => Some(&self.world),
            ChatType::ChatPrivate => Some(&self.private),
            ChatType::ChatTeam => Some(&self.team),
            ChatType::ChatNone | ChatType::ChatAll => None,
        }
    }
}

/// Certificate and key for `wss://`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

impl Config {
    /// Reads and validates a TOML file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// The queue a full resume replay needs, as (frames, bytes): the login
    /// reply, a full private ring, a full scene ring and the shared world
    /// ring, and (with history) every offline whisper that may wait plus
    /// the whispers a cut connection left unconfirmed (at most a private
    /// ring's worth), each counted at the largest notification a client can
    /// cause.
    pub fn replay_bound(&self) -> (usize, usize) {
        let offline = if self.history.enabled {
            (self.history.max_offline_whispers as usize).saturating_add(self.session.replay_buffer)
        } else {
            0
        };
        let frames = 1usize
            .saturating_add(self.session.replay_buffer)
            .saturating_add(self.session.replay_buffer_shed().saturating_mul(2))
            .saturating_add(offline);
        let bytes = frames.saturating_mul(max_notify_bytes(self.chat.max_chars()));
        (frames, bytes)
    }

    /// Checks cross-field rules that serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.admin.validate()?;
        self.cluster.validate()?;
        if !(1..=10_000).contains(&self.max_blocks) {
            return Err(invalid("max_blocks", "must be in 1..=10000"));
        }
        let l = &self.limits;
        let timers: [(&'static str, u64); 6] = [
            ("limits.login_timeout_ms", l.login_timeout_ms),
            ("limits.ping_interval_ms", l.ping_interval_ms),
            ("limits.idle_timeout_ms", l.idle_timeout_ms),
            ("limits.stall_timeout_ms", l.stall_timeout_ms),
            ("limits.shutdown_grace_ms", l.shutdown_grace_ms),
            ("session.linger_ms", self.session.linger_ms),
        ];
        for (key, ms) in timers {
            if ms > MAX_TIMER_MS {
                return Err(invalid(
                    key,
                    format!("must be at most {MAX_TIMER_MS} (24 hours)"),
                ));
            }
        }
        if self.auth.leeway_secs > MAX_LEEWAY_SECS {
            return Err(invalid(
                "auth.leeway_secs",
                format!("must be at most {MAX_LEEWAY_SECS}: it extends every token's life"),
            ));
        }
        if l.login_timeout_ms == 0 {
            return Err(invalid("limits.login_timeout_ms", "must be > 0"));
        }
        if l.ping_interval_ms == 0 {
            return Err(invalid("limits.ping_interval_ms", "must be > 0"));
        }
        if l.idle_timeout_ms < 30_000 {
            return Err(invalid(
                "limits.idle_timeout_ms",
                "must be at least 30000: clients may stay quiet for 10 s or more",
            ));
        }
        if l.idle_timeout_ms <= l.ping_interval_ms {
            return Err(invalid(
                "limits.idle_timeout_ms",
                "must be longer than limits.ping_interval_ms, or pongs cannot arrive in time",
            ));
        }
        if l.write_coalesce_ms > 100 {
            return Err(invalid(
                "limits.write_coalesce_ms",
                "must be at most 100: it is added to the latency of a busy client",
            ));
        }
        if !(8..=65_536).contains(&l.outbound_queue) {
            return Err(invalid("limits.outbound_queue", "must be in 8..=65536"));
        }
        if !(4 * 1024..=64 * 1024 * 1024).contains(&l.outbound_bytes) {
            return Err(invalid(
                "limits.outbound_bytes",
                "must be in 4096..=67108864",
            ));
        }
        if l.stall_timeout_ms == 0 {
            return Err(invalid("limits.stall_timeout_ms", "must be > 0"));
        }
        if !(1..=65_536).contains(&self.session.replay_buffer) {
            return Err(invalid("session.replay_buffer", "must be in 1..=65536"));
        }
        self.history
            .validate()
            .map_err(|why| invalid("history", why))?;
        if l.bad_frame_limit == 0 {
            return Err(invalid("limits.bad_frame_limit", "must be > 0"));
        }
        self.rates.validate()?;
        if self.max_online == 0 {
            return Err(invalid("max_online", "must be > 0"));
        }
        if self.backlog == 0 {
            return Err(invalid("backlog", "must be > 0"));
        }
        self.admission.validate()?;
        if self.auth.audience.is_empty() {
            return Err(invalid("auth.audience", "must not be empty"));
        }
        let rules: [(&'static str, &ChannelRule); 5] = [
            ("chat.scene.max_chars", &self.chat.scene),
            ("chat.guild.max_chars", &self.chat.guild),
            ("chat.world.max_chars", &self.chat.world),
            ("chat.private.max_chars", &self.chat.private),
            ("chat.team.max_chars", &self.chat.team),
        ];
        for (key, rule) in rules {
            if rule.max_chars == 0 || rule.max_chars > MAX_TEXT_CHARS {
                return Err(invalid(
                    key,
                    format!("must be in 1..={MAX_TEXT_CHARS} characters"),
                ));
            }
        }
        // A resume queues its whole replay at once; if it did not fit, the
        // resuming client would be cut as a slow consumer by its own replay,
        // and again on every retry.
        let (frames, bytes) = self.replay_bound();
        let need_frames = frames.saturating_add(REPLAY_HEADROOM_FRAMES);
        if l.outbound_queue < need_frames {
            return Err(invalid(
                "limits.outbound_queue",
                format!(
                    "must be at least {need_frames}: a full resume replay is {frames} frames \
                     (1 + session.replay_buffer + 2 x a quarter of it + history.max_offline_whispers), \
                     plus {REPLAY_HEADROOM_FRAMES} for live traffic"
                ),
            ));
        }
        if l.outbound_bytes < bytes {
            return Err(invalid(
                "limits.outbound_bytes",
                format!(
                    "must be at least {bytes}: a full resume replay is {frames} frames \
                     (session.replay_buffer, history.max_offline_whispers) of up to {} bytes \
                     (the largest chat.*.max_chars)",
                    max_notify_bytes(self.chat.max_chars())
                ),
            ));
        }
        Ok(())
    }

    /// The key ring file in force.
    pub fn keys_file(&self) -> PathBuf {
        self.auth
            .keys_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("keys.toml"))
    }
}

/// Longest username accepted, re-exported for the login path.
pub const MAX_NAME: usize = MAX_NAME_CHARS;

/// Upper bound of every timer setting (24 hours): far above any sensible
/// value, and low enough that `Instant + Duration` can never overflow (a
/// panic on every connection) nor any sum of them, such as
/// [`Config::replay_max_age`].
pub const MAX_TIMER_MS: u64 = 24 * 60 * 60 * 1000;

/// Upper bound of `auth.leeway_secs`: clock skew beyond five minutes is a
/// broken clock, and the leeway lets every token live that much longer.
pub const MAX_LEEWAY_SECS: u64 = 300;

/// Frames kept free beyond a full replay, for the live traffic that can
/// arrive while it drains.
const REPLAY_HEADROOM_FRAMES: usize = 64;

/// The largest encoded notification a client can cause on channels whose
/// longest text is `max_chars`, in either codec: in JSON, up to 6 bytes
/// per character of the text and of two names (sender and whisper target;
/// a control character is escaped as `\uXXXX`, anything else is at most 4
/// UTF-8 bytes), plus 512 bytes for the field names, the head, and ids and
/// times written as strings. The protobuf frame (4 bytes a character plus
/// 128) is always smaller.
pub fn max_notify_bytes(max_chars: usize) -> usize {
    max_chars
        .saturating_mul(6)
        .saturating_add(2 * MAX_NAME_CHARS * 6)
        .saturating_add(512)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's configuration example is the defaults, and valid.
    #[test]
    fn the_readme_config_example_parses_and_validates() {
        let dir = std::env::var_os("CARGO_MANIFEST_DIR").expect("run by cargo");
        let readme = std::fs::read_to_string(std::path::Path::new(&dir).join("../../README.md"))
            .expect("README.md at the workspace root");
        let section = readme
            .split("## Configuration")
            .nth(1)
            .expect("a Configuration section");
        let block = section
            .split("```toml\n")
            .nth(1)
            .and_then(|b| b.split("```").next())
            .expect("a toml block");
        let c = parse(block).unwrap();
        let d = Config::default();
        assert_eq!(c.admin.listen, d.admin.listen);
        assert_eq!(c.max_blocks, d.max_blocks);
        assert_eq!(c.chat.world.filter, d.chat.world.filter);
        assert_eq!(c.limits.outbound_queue, d.limits.outbound_queue);
    }

    #[test]
    fn a_cluster_node_needs_a_url_and_a_plain_node_id() {
        let with = |url: Option<&str>, node: Option<&str>| {
            let mut c = Config::default();
            c.cluster.url = url.map(str::to_owned);
            c.cluster.node_id = node.map(str::to_owned);
            c.validate()
        };
        assert!(with(None, None).is_ok());
        assert!(with(Some("nats://127.0.0.1:4222"), Some("eu-1_a")).is_ok());
        for (url, node) in [
            (Some("nats://127.0.0.1:4222"), None),
            (None, Some("n1")),
            (Some("nats://127.0.0.1:4222"), Some("")),
            (Some("nats://127.0.0.1:4222"), Some("n.1")),
            (Some("nats://127.0.0.1:4222"), Some("n>")),
        ] {
            let err = with(url, node).unwrap_err().to_string();
            assert!(err.contains("cluster.node_id"), "{url:?} {node:?}: {err}");
        }
        let toml = "[cluster]\nurl = \"nats://h:4222\"\nnode_id = \"n1\"\n";
        let c: Config = toml::from_str(toml).unwrap();
        assert!(c.cluster.enabled());
        assert_eq!(c.cluster.node_id.as_deref(), Some("n1"));
    }

    #[test]
    fn admin_keys_must_be_long_and_unique_and_keyless_admin_stays_on_loopback() {
        let key = |id: &str, key: &str| {
            format!("[[admin.keys]]\nid = \"{id}\"\nkey = \"{key}\"\nscope = \"gm\"\n")
        };
        assert!(parse(&key("a", "short")).unwrap_err().contains("shorter"));
        let twice = format!(
            "{}{}",
            key("a", "0123456789abcdef"),
            key("a", "fedcba9876543210")
        );
        assert!(parse(&twice).unwrap_err().contains("twice"));
        assert!(parse("[admin]\nlisten = \"0.0.0.0:7001\"\n")
            .unwrap_err()
            .contains("loopback"));
        let open = format!(
            "[admin]\nlisten = \"0.0.0.0:7001\"\n{}",
            key("a", "0123456789abcdef")
        );
        assert!(parse(&open).is_ok());
        assert_eq!(
            parse("[admin]\nlisten = \"off\"\n").unwrap().admin.listen,
            None
        );
    }

    fn parse(s: &str) -> Result<Config, String> {
        let c: Config = toml::from_str(s).map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.listen.port(), 7000);
        assert_eq!(c.chat.world.cooldown_ms, 10_000);
        assert_eq!(c.chat.guild.cooldown_ms, 1_000);
        assert_eq!(c.chat.world.max_chars, 200);
        assert_eq!(c.auth.leeway_secs, 30);
        assert_eq!(c.auth.audience, "guildchat");
        assert!(c.limits.idle_timeout_ms >= 30_000);
        assert!(!c.auth.insecure_dev_auth);
        assert_eq!(c.session.linger_ms, 60_000);
        assert_eq!(c.session.replay_buffer, 256);
        assert_eq!((c.rates.history_per_sec, c.rates.history_burst), (2, 5));
        assert_eq!(c.rates.kick_factor, 5);
        assert_eq!(c.admission.max_connections, 20_000);
        assert_eq!(c.admission.max_prelogin, 2_048);
        assert_eq!(c.admission.max_per_ip, 64);
        assert_eq!(c.admission.logins_per_ip_per_sec, 20);
        assert_eq!(c.admission.login_burst_per_ip, 40);
        assert!(!c.admission.proxy_protocol);
    }

    #[test]
    fn bad_configs_name_the_key() {
        let cases = [
            ("nonsense = 1", "nonsense"),
            ("[limits]\nidle_timeout_ms = 1000", "limits.idle_timeout_ms"),
            (
                "[chat.world]\ncooldown_ms = 1\nmax_chars = 0",
                "chat.world.max_chars",
            ),
            ("[chat.world]\nwhat = 1", "what"),
            (
                "[limits]\nidle_timeout_ms = 86400001",
                "limits.idle_timeout_ms",
            ),
            ("max_online = 0", "max_online"),
            ("[auth]\naudience = \"\"", "auth.audience"),
            ("listen = \"not an address\"", "listen"),
            ("[rates]\nhistory_per_sec = 0", "rates.history_per_sec"),
            ("[rates]\nworld_burst = 1000001", "rates.world_burst"),
            ("[rates]\nkick_factor = 1", "rates.kick_factor"),
            (
                "[rates]\nbad_frame_forgive_ms = 0",
                "rates.bad_frame_forgive_ms",
            ),
            ("[rates]\nwhat = 1", "what"),
            ("[admission]\nmax_prelogin = 0", "admission.max_prelogin"),
            ("[admission]\nmax_per_ip = 0", "admission.max_per_ip"),
            (
                "[admission]\nlogins_per_ip_per_sec = 50",
                "admission.login_burst_per_ip",
            ),
            ("[admission]\nlimit = 1", "limit"),
        ];
        for (text, key) in cases {
            let err = parse(text).unwrap_err();
            assert!(err.contains(key), "{text:?}: {err}");
        }
    }

    #[test]
    fn overrides_apply() {
        let c = parse(
            "max_online = 5\n[chat.world]\ncooldown_ms = 3000\nmax_chars = 50\n[limits]\noutbound_queue = 1000",
        )
        .unwrap();
        assert_eq!(c.max_online, 5);
        assert_eq!(c.chat.world.cooldown(), Duration::from_secs(3));
        assert_eq!(c.chat.rule(ChatType::ChatWorld).unwrap().max_chars, 50);
        assert!(c.chat.rule(ChatType::ChatAll).is_none());
        assert_eq!(c.limits.outbound_queue, 1000);
    }

    #[test]
    fn a_partial_chat_table_keeps_the_channel_defaults() {
        let c = parse("[chat.world]\ncooldown_ms = 1\n[chat.guild]\nmax_chars = 50").unwrap();
        assert_eq!(c.chat.world.cooldown_ms, 1);
        assert_eq!(c.chat.world.max_chars, 200);
        assert_eq!(c.chat.guild.cooldown_ms, 1_000);
        assert_eq!(c.chat.guild.max_chars, 50);
        assert_eq!(c.chat.scene.cooldown_ms, 1_000);
    }

    #[test]
    fn timers_and_leeway_are_bounded() {
        let keys = [
            ("limits", "login_timeout_ms"),
            ("limits", "ping_interval_ms"),
            ("limits", "idle_timeout_ms"),
            ("limits", "stall_timeout_ms"),
            ("limits", "shutdown_grace_ms"),
            ("session", "linger_ms"),
        ];
        for (table, key) in keys {
            let at = format!("[{table}]\n{key} = {MAX_TIMER_MS}");
            // idle must stay above ping, so a day of ping needs a longer idle
            // than allowed: the ping key is refused on its own merits below.
            if key != "ping_interval_ms" {
                parse(&at).unwrap_or_else(|e| panic!("{at:?}: {e}"));
            }
            let over = format!("[{table}]\n{key} = {}", MAX_TIMER_MS + 1);
            let err = parse(&over).unwrap_err();
            assert!(err.contains(&format!("{table}.{key}")), "{over:?}: {err}");
            let huge = format!("[{table}]\n{key} = {}", i64::MAX);
            assert!(parse(&huge).is_err(), "{huge:?}");
        }
        parse("[auth]\nleeway_secs = 300").unwrap();
        let err = parse("[auth]\nleeway_secs = 301").unwrap_err();
        assert!(err.contains("auth.leeway_secs"), "{err}");
    }

    #[test]
    fn the_defaults_fit_a_full_replay() {
        let c = Config::default();
        let (frames, bytes) = c.replay_bound();
        // 1 + 256 + 2 x 64 + 200 offline whispers + 256 unconfirmed ones,
        // of 200 chars at most.
        assert_eq!(frames, 841);
        assert_eq!(max_notify_bytes(200), 2096);
        assert_eq!(bytes, 841 * 2096);
        assert!(c.limits.outbound_queue >= frames + 64);
        assert!(c.limits.outbound_bytes >= bytes);
        // Without history there are no offline whispers to replay.
        let mut c = c;
        c.history.enabled = false;
        assert_eq!(c.replay_bound().0, 385);
    }

    #[test]
    fn the_largest_notification_fits_the_bound_in_both_codecs() {
        use guildchat_protocol::{codec, pb, ChatType, MsgType};
        // Control characters take the most room in JSON (\u0001).
        let worst = |n: usize| "\u{1}".repeat(n);
        let max = u64::MAX;
        let n = pb::ChatMessageNotifyChat {
            msghead: codec::head(MsgType::ChcNotifyChat, u32::MAX),
            chattype: ChatType::ChatPrivate as i32,
            senderid: max,
            strcontext: worst(200),
            sendername: worst(MAX_NAME_CHARS),
            msg_id: max,
            time_ms: max,
            guildid: max,
            teamid: max,
            sceneid: max,
            targetid: max,
            targetname: worst(MAX_NAME_CHARS),
        };
        let proto = codec::encode(&n);
        let json = guildchat_protocol::json::transcode_server(&proto).unwrap();
        assert!(proto.len() <= max_notify_bytes(200), "{}", proto.len());
        assert!(json.len() <= max_notify_bytes(200), "{}", json.len());
    }

    #[test]
    fn a_replay_that_does_not_fit_the_queue_is_refused() {
        // The old defaults: 512 frames are too few for 841 + 64.
        let err = parse("[limits]\noutbound_queue = 512").unwrap_err();
        assert!(err.contains("limits.outbound_queue"), "{err}");
        assert!(err.contains("905"), "{err}");
        // 256 KiB cannot hold 841 frames of 2096 bytes.
        let err = parse("[limits]\noutbound_bytes = 262144").unwrap_err();
        assert!(err.contains("limits.outbound_bytes"), "{err}");
        // Longer texts need more bytes: 1000 chars are 6896-byte frames.
        let err = parse("[chat.private]\nmax_chars = 1000").unwrap_err();
        assert!(err.contains("limits.outbound_bytes"), "{err}");
        parse("[chat.private]\nmax_chars = 1000\n[limits]\noutbound_bytes = 5799536").unwrap();
        // A bigger replay buffer needs a bigger queue; fewer offline
        // whispers need less.
        let err = parse("[session]\nreplay_buffer = 1024").unwrap_err();
        assert!(err.contains("limits.outbound_queue"), "{err}");
        parse("[history]\nmax_offline_whispers = 10\n[limits]\noutbound_queue = 715\noutbound_bytes = 1364496")
            .unwrap();
    }
}
