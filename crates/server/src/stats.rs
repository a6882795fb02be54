//! Process-wide counters and gauges. Plain atomics: every task may bump them
//! without a lock or a message, and the operations layer reads them.
//!
//! This module only counts; it never decides anything.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Counters shared by every task of one server.
#[derive(Debug, Default)]
pub struct Stats {
    /// The labelled metrics (by result, channel, class, reason) and their
    /// Prometheus rendering.
    pub metrics: crate::metrics::Metrics,
    /// Accepting and able to acknowledge: false before `run`, once shutdown
    /// begins, and once the history store has died.
    pub ready: AtomicBool,
    /// Connections accepted (websocket upgrade done).
    pub connections: AtomicU64,
    /// Successful logins (new sessions and takeovers).
    pub logins: AtomicU64,
    /// Logins refused (bad token, mismatch, server full...).
    pub login_failures: AtomicU64,
    /// Logins that took over an existing session (connected or lingering).
    pub takeovers: AtomicU64,
    /// Notifications replayed to resuming clients.
    pub replayed: AtomicU64,
    /// Resumes that could not replay everything (gap reported).
    pub replay_gaps: AtomicU64,
    /// Sessions that lingered after a dropped connection, and those whose
    /// linger ran out.
    pub lingering: AtomicU64,
    pub linger_expired: AtomicU64,
    /// Players currently registered with the world actor.
    pub online: AtomicU64,
    /// Chat messages accepted and fanned out.
    pub chats: AtomicU64,
    /// Chat requests recognised as retries of an earlier send (same client
    /// message id): answered, not delivered again.
    pub chat_retries: AtomicU64,
    /// Frames queued towards clients.
    pub deliveries: AtomicU64,
    /// Connections closed because their outbound queue was full.
    pub slow_consumers: AtomicU64,
    /// World and scene notifications dropped for clients that fell behind.
    pub shed: AtomicU64,
    /// Whispers stored for offline players, delivered to them, and
    /// confirmed received (then forgotten).
    pub offline_stored: AtomicU64,
    pub offline_delivered: AtomicU64,
    pub offline_acked: AtomicU64,
    /// Whispers moved to the offline inbox because their session ended
    /// before the client confirmed reading them.
    pub offline_spilled: AtomicU64,
    /// Spilled whispers the world had to drop because the store could not
    /// take them for a long time.
    pub offline_spill_lost: AtomicU64,
    /// Times a guild, team or scene gained its first session on this node
    /// or lost its last (see `Registry::group_changes`).
    pub group_changes: AtomicU64,
    /// Lines from the cluster's line stream this node's world handled
    /// (each once, however often a resync read it).
    pub bus_lines: AtomicU64,
    /// Times the line reader opened a new consumer because a group gained
    /// its first session here (reading per need; see `cluster::interest`).
    pub line_resyncs: AtomicU64,
    /// Receipt pings answered: whispers on a live connection confirmed.
    pub receipts: AtomicU64,
    /// Frames from clients that could not be handled.
    pub bad_frames: AtomicU64,
    /// Protobuf frames transcoded to JSON on their way into a JSON
    /// connection's queue: one per reply (or queued notice) to a JSON
    /// client, and one per broadcast that has any JSON recipient, however
    /// many it has. (The writer's own shed and kill-switch notices are
    /// transcoded where they are written and not counted here.)
    pub json_encodes: AtomicU64,
    /// Requests refused with RES_RATE_LIMITED.
    pub rate_limited: AtomicU64,
    /// Connections closed for going on far past their rate limit.
    pub rate_kicks: AtomicU64,
    /// Connections refused by admission, in all; then by reason: the
    /// global limit, the pre-login limit, the per-IP cap, the per-IP login
    /// rate, a missing or invalid PROXY header.
    pub admission_refused: AtomicU64,
    pub refused_connections: AtomicU64,
    pub refused_prelogin: AtomicU64,
    pub refused_per_ip: AtomicU64,
    pub refused_login_rate: AtomicU64,
    pub refused_proxy: AtomicU64,
    /// Sessions lingering without a connection now (a gauge, updated on
    /// the world's one-second tick).
    pub lingering_now: AtomicU64,
    /// Connections open now, logged in or not (a gauge, bounded by
    /// `admission.max_connections`).
    pub open_connections: AtomicU64,
    /// Connections holding a pre-login place now: accepted and not yet
    /// logged in (a gauge, bounded by `admission.max_prelogin`).
    pub prelogin: AtomicU64,
    /// Requests on the game port answered with an HTTP error (400, 426,
    /// 431) instead of an upgrade.
    pub http_refused: AtomicU64,
    /// Connections cut by the login deadline before their upgrade was done
    /// (TLS or HTTP too slow), or by the stream's own cut after it.
    pub handshake_timeouts: AtomicU64,
}

impl Stats {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Every counter, by field name (they only go up).
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("connections", Stats::get(&self.connections)),
            ("logins", Stats::get(&self.logins)),
            ("login_failures", Stats::get(&self.login_failures)),
            ("takeovers", Stats::get(&self.takeovers)),
            ("replayed", Stats::get(&self.replayed)),
            ("replay_gaps", Stats::get(&self.replay_gaps)),
            ("lingering", Stats::get(&self.lingering)),
            ("linger_expired", Stats::get(&self.linger_expired)),
            ("chats", Stats::get(&self.chats)),
            ("chat_retries", Stats::get(&self.chat_retries)),
            ("deliveries", Stats::get(&self.deliveries)),
            ("slow_consumers", Stats::get(&self.slow_consumers)),
            ("shed", Stats::get(&self.shed)),
            ("offline_stored", Stats::get(&self.offline_stored)),
            ("offline_delivered", Stats::get(&self.offline_delivered)),
            ("offline_acked", Stats::get(&self.offline_acked)),
            ("offline_spilled", Stats::get(&self.offline_spilled)),
            ("offline_spill_lost", Stats::get(&self.offline_spill_lost)),
            ("group_changes", Stats::get(&self.group_changes)),
            ("bus_lines", Stats::get(&self.bus_lines)),
            ("line_resyncs", Stats::get(&self.line_resyncs)),
            ("receipts", Stats::get(&self.receipts)),
            ("bad_frames", Stats::get(&self.bad_frames)),
            ("rate_limited", Stats::get(&self.rate_limited)),
            ("rate_kicks", Stats::get(&self.rate_kicks)),
            ("admission_refused", Stats::get(&self.admission_refused)),
            ("refused_connections", Stats::get(&self.refused_connections)),
            ("refused_prelogin", Stats::get(&self.refused_prelogin)),
            ("refused_per_ip", Stats::get(&self.refused_per_ip)),
            ("refused_login_rate", Stats::get(&self.refused_login_rate)),
            ("refused_proxy", Stats::get(&self.refused_proxy)),
            ("http_refused", Stats::get(&self.http_refused)),
            ("handshake_timeouts", Stats::get(&self.handshake_timeouts)),
        ]
    }

    /// Every gauge, by field name (they go up and down).
    pub fn gauges(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("online", Stats::get(&self.online)),
            ("lingering_now", Stats::get(&self.lingering_now)),
            ("open_connections", Stats::get(&self.open_connections)),
            ("prelogin", Stats::get(&self.prelogin)),
        ]
    }
}
