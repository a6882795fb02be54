//! Labelled metrics and their Prometheus text form for `/metrics`.
//!
//! It owns one Prometheus recorder per server (not the process-global
//! one, so several servers in one process, as in the tests, each report
//! their own), the labelled counters and histograms the hot paths bump,
//! and the rendering of those together with every plain counter in
//! [`Stats`]. Handles are registered once, at start-up, for every label
//! value there is; a hot path then costs an atomic add, with no lookup and
//! no lock. It never decides anything and never blocks.

use std::time::Duration;

use guildchat_protocol::{ChatType, KickReason, ResCode};
use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::net::Priority;
use crate::stats::Stats;

/// Result codes that have their own label; any other is `other`. Covers
/// every code in the protocol today.
const RES_CODES: usize = 31;

/// Chat channels by wire value (0..=6).
const CHANNELS: usize = 7;

/// Kick reasons by wire value (0..=10), then the slow-consumer and
/// too-big cuts.
const KICKS: usize = 13;
const SLOW_CUT: usize = 11;
const TOO_BIG: usize = 12;

/// The metrics a server records.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    logins: Vec<Counter>,
    chats: Vec<Vec<Counter>>,
    deliveries: [Counter; 2],
    shed: [Counter; 2],
    kicks: Vec<Counter>,
    rate_limited: [Counter; 3],
    commit_batch: Histogram,
    commit_latency: Histogram,
    fanout_latency: Histogram,
    gauges: Gauges,
}

struct Gauges {
    connections: Gauge,
    online: Gauge,
    lingering: Gauge,
    world_inbox: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn res_name(i: usize) -> &'static str {
    ResCode::try_from(i as i32).map_or("other", |r| r.as_str_name())
}

fn kick_name(i: usize) -> &'static str {
    match i {
        SLOW_CUT => "SLOW_CONSUMER_CUT",
        TOO_BIG => "TOO_BIG",
        _ => KickReason::try_from(i as i32).map_or("other", |r| r.as_str_name()),
    }
}

/// The index of a priority's label: 0 `keep`, 1 `sheddable`.
fn class(priority: Priority) -> usize {
    match priority {
        Priority::Keep => 0,
        Priority::Sheddable => 1,
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Bucket bounds, in seconds, for the latency histograms: from 50 µs to
/// 5 s.
const LATENCY_BUCKETS: [f64; 14] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
];

/// Bucket bounds for commit batch sizes, in writes.
const BATCH_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 512.0, 2048.0];

impl Metrics {
    pub fn new() -> Metrics {
        // The bucket lists are constants, sorted and non-empty: the only
        // inputs the builder refuses.
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
                &LATENCY_BUCKETS,
            )
            .and_then(|b| {
                b.set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full(
                        "guildchat_history_commit_batch_size".into(),
                    ),
                    &BATCH_BUCKETS,
                )
            })
            .expect("constant, valid bucket lists")
            .build_recorder();
        let handle = recorder.handle();
        let r = &recorder;
        let with = |f: &dyn Fn() -> Counter| metrics::with_local_recorder(r, f);
        let logins = (0..RES_CODES)
            .map(|i| with(&|| metrics::counter!("guildchat_logins_total", "result" => res_name(i))))
            .collect();
        let chats = (0..CHANNELS)
            .map(|c| {
                let channel = ChatType::try_from(c as i32).map_or("other", |t| t.as_str_name());
                (0..RES_CODES)
                    .map(|i| {
                        with(&|| {
                            metrics::counter!("guildchat_chats_total",
                                "channel" => channel, "result" => res_name(i))
                        })
                    })
                    .collect()
            })
            .collect();
        let class = |name: &'static str| {
            [
                with(&|| metrics::counter!(name, "class" => "keep")),
                with(&|| metrics::counter!(name, "class" => "sheddable")),
            ]
        };
        let deliveries = class("guildchat_deliveries_total");
        let shed = class("guildchat_shed_total");
        let kicks = (0..KICKS)
            .map(|i| {
                with(&|| metrics::counter!("guildchat_disconnects_total", "reason" => kick_name(i)))
            })
            .collect();
        let rate_limited = ["cheap", "world", "store"]
            .map(|c| with(&|| metrics::counter!("guildchat_rate_limited_total", "class" => c)));
        let histogram =
            |name: &'static str| metrics::with_local_recorder(r, || metrics::histogram!(name));
        let gauge = |name: &'static str| metrics::with_local_recorder(r, || metrics::gauge!(name));
        Metrics {
            logins,
            chats,
            deliveries,
            shed,
            kicks,
            rate_limited,
            commit_batch: histogram("guildchat_history_commit_batch_size"),
            commit_latency: histogram("guildchat_history_commit_seconds"),
            fanout_latency: histogram("guildchat_fanout_seconds"),
            gauges: Gauges {
                connections: gauge("guildchat_connections"),
                online: gauge("guildchat_players_online"),
                lingering: gauge("guildchat_players_lingering"),
                world_inbox: gauge("guildchat_world_inbox_depth"),
            },
            recorder,
            handle,
        }
    }

    pub fn login(&self, res: ResCode) {
        self.logins[(res as usize).min(RES_CODES - 1)].increment(1);
    }

    pub fn chat(&self, channel: ChatType, res: ResCode) {
        let c = (channel as usize).min(CHANNELS - 1);
        self.chats[c][(res as usize).min(RES_CODES - 1)].increment(1);
    }

    pub fn delivered(&self, priority: Priority, n: u64) {
        self.deliveries[class(priority)].increment(n);
    }

    pub fn shed(&self, priority: Priority) {
        self.shed[class(priority)].increment(1);
    }

    /// A connection closed by the server: a kick reason, or a cut.
    pub fn kick(&self, reason: KickReason) {
        self.kicks[(reason as usize).min(SLOW_CUT - 1)].increment(1);
    }

    pub fn slow_consumer_cut(&self) {
        self.kicks[SLOW_CUT].increment(1);
    }

    pub fn too_big(&self) {
        self.kicks[TOO_BIG].increment(1);
    }

    /// A request refused by its rate limit: 0 cheap, 1 world, 2 store.
    pub fn rate_limited(&self, class: usize) {
        self.rate_limited[class.min(2)].increment(1);
    }

    /// One group commit of the history writer.
    pub fn commit(&self, batch: usize, took: Duration) {
        self.commit_batch.record(batch as f64);
        self.commit_latency.record(took.as_secs_f64());
    }

    /// From a chat line's acceptance to its last frame queued.
    pub fn fanout(&self, took: Duration) {
        self.fanout_latency.record(took.as_secs_f64());
    }

    /// The Prometheus text: the labelled metrics here, the gauges given,
    /// and every counter in `stats` as `guildchat_<name>_total`.
    /// Reads only atomics: a scrape never asks the world anything.
    pub fn render(&self, stats: &Stats, world_inbox: usize) -> String {
        self.gauges
            .connections
            .set(Stats::get(&stats.open_connections) as f64);
        self.gauges.online.set(Stats::get(&stats.online) as f64);
        self.gauges
            .lingering
            .set(Stats::get(&stats.lingering_now) as f64);
        self.gauges.world_inbox.set(world_inbox as f64);
        let _ = &self.recorder;
        let mut out = self.handle.render();
        for (name, value) in stats.counters() {
            out.push_str(&format!(
                "# TYPE guildchat_stat_{name}_total counter\nguildchat_stat_{name}_total {value}\n"
            ));
        }
        for (name, value) in stats.gauges() {
            out.push_str(&format!(
                "# TYPE guildchat_stat_{name} gauge\nguildchat_stat_{name} {value}\n"
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_labelled_metric_renders_and_moves() {
        let m = Metrics::new();
        let stats = Stats::default();
        m.login(ResCode::ResOk);
        m.login(ResCode::ResBanned);
        m.chat(ChatType::ChatWorld, ResCode::ResOk);
        m.delivered(Priority::Sheddable, 5);
        m.kick(KickReason::KickOperator);
        m.kick(KickReason::KickBanned);
        m.slow_consumer_cut();
        m.commit(3, Duration::from_millis(2));
        m.fanout(Duration::from_micros(300));
        stats.online.store(4, std::sync::atomic::Ordering::Relaxed);
        let text = m.render(&stats, 0);
        for line in [
            "guildchat_logins_total{result=\"RES_OK\"} 1",
            "guildchat_logins_total{result=\"RES_BANNED\"} 1",
            "guildchat_chats_total{channel=\"CHAT_WORLD\",result=\"RES_OK\"} 1",
            "guildchat_deliveries_total{class=\"sheddable\"} 5",
            "guildchat_disconnects_total{reason=\"KICK_OPERATOR\"} 1",
            "guildchat_disconnects_total{reason=\"SLOW_CONSUMER_CUT\"} 1",
            "guildchat_disconnects_total{reason=\"KICK_BANNED\"} 1",
            "guildchat_players_online 4",
            "guildchat_history_commit_batch_size_count 1",
            "guildchat_fanout_seconds_count 1",
            "guildchat_stat_chats_total 0",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }

    #[test]
    fn two_servers_keep_their_own_numbers() {
        let a = Metrics::new();
        let b = Metrics::new();
        a.login(ResCode::ResOk);
        let stats = Stats::default();
        assert!(a
            .render(&stats, 0)
            .contains("guildchat_logins_total{result=\"RES_OK\"} 1"));
        assert!(b
            .render(&stats, 0)
            .contains("guildchat_logins_total{result=\"RES_OK\"} 0"));
    }
}
