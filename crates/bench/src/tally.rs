//! Counting: the counters a worker process keeps, the latency histograms,
//! and the arithmetic that turns them into deliveries, losses and
//! percentiles.
//!
//! Counters are plain atomics bumped by thousands of client tasks; a
//! [`Snap`] is a copy that crosses the process boundary as JSON and adds up
//! across workers. Histograms are HDR histograms in microseconds, sharded so
//! that the client tasks of a worker rarely contend on one lock.
//!
//! Nothing here does I/O or knows a scenario: loss is `expected - delivered
//! - shed - missed`, whoever computed `expected`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Most fan-out steps a run can have; step counters are a fixed array so
/// that receivers index them without a lock.
pub const MAX_STEPS: usize = 64;

/// Latency histograms record microseconds up to this; anything slower is
/// clamped (and already a failure).
const MAX_LATENCY_US: u64 = 600_000_000;

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        /// Counters of one worker process, bumped by its client tasks.
        #[derive(Debug, Default)]
        pub struct Counters {
            $($(#[$doc])* pub $name: AtomicU64,)*
        }

        /// A copy of [`Counters`]; adds up across workers.
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
        pub struct Snap {
            $($(#[$doc])* pub $name: u64,)*
        }

        impl Counters {
            pub fn snap(&self) -> Snap {
                Snap { $($name: self.$name.load(Relaxed),)* }
            }
        }

        impl Snap {
            pub fn add(&mut self, other: &Snap) {
                $(self.$name += other.$name;)*
            }
        }
    };
}

counters! {
    /// Connections that completed the websocket handshake.
    connect_ok,
    /// Connections that failed before the handshake completed.
    connect_fail,
    /// Logins answered RES_OK (first logins and reconnects).
    login_ok,
    /// Logins refused, timed out or cut off.
    login_fail,
    /// Clients that finished their connect phase, whatever the outcome.
    settled,
    /// Chat lines (or reference frames) written to the socket.
    sent,
    /// Chat lines the server accepted (for the reference: frames flushed).
    acked,
    /// Chat lines the server refused (any result code but OK).
    rejected,
    /// Deliveries the senders of a mix expect, summed over audiences.
    expected,
    /// Notifications received by reading clients, duplicates excluded.
    received,
    /// Notifications received twice or out of order.
    dup,
    /// Notifications the server said it shed (`CHC_Notify_Shed` counts).
    shed,
    /// Notifications replayed after a resume.
    replayed,
    /// Resumes whose replay had a gap, and what the server said it missed.
    replay_gaps,
    missed,
    /// Reconnects done by the mix scenario.
    reconnects,
    /// Kick notices received, and closes no scenario asked for.
    kicked,
    closed,
    /// Receipts and kicks of the clients the `slow` scenario stops: kicked
    /// with a notice or close code 4002, or cut off without either.
    slow_received,
    slow_kicked,
    slow_dropped,
    slow_shed,
    /// Slow clients done reading after being released.
    slow_done,
    /// Heartbeats (or websocket pings) sent, and their answers.
    heartbeats,
    heartbeat_reps,
    /// Frames from the server that the bench could not make sense of.
    bad_frames,
}

/// Adds `n` to a counter.
pub fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Relaxed);
}

/// Adds one to a counter.
pub fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Relaxed);
}

/// Bumps `counter`; whether it was below `limit` before.
pub fn bump_below(counter: &AtomicU64, limit: u64) -> bool {
    counter.fetch_add(1, Relaxed) < limit
}

/// Per-step counters of one worker.
#[derive(Debug, Default)]
pub struct StepCounters {
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub received: AtomicU64,
    pub dup: AtomicU64,
}

/// A copy of [`StepCounters`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepSnap {
    pub sent: u64,
    pub acked: u64,
    pub received: u64,
    pub dup: u64,
}

impl StepSnap {
    pub fn add(&mut self, other: &StepSnap) {
        self.sent += other.sent;
        self.acked += other.acked;
        self.received += other.received;
        self.dup += other.dup;
    }
}

/// [`StepCounters`] for every possible step.
#[derive(Debug)]
pub struct Steps(Vec<StepCounters>);

impl Default for Steps {
    fn default() -> Self {
        Steps((0..MAX_STEPS).map(|_| StepCounters::default()).collect())
    }
}

impl Steps {
    /// The counters of `step`; steps past the last share the last slot.
    pub fn get(&self, step: u32) -> &StepCounters {
        &self.0[(step as usize).min(MAX_STEPS - 1)]
    }

    /// Snapshots of the steps that saw anything, by step.
    pub fn snap(&self) -> BTreeMap<u32, StepSnap> {
        let mut out = BTreeMap::new();
        for (i, c) in self.0.iter().enumerate() {
            let s = StepSnap {
                sent: c.sent.load(Relaxed),
                acked: c.acked.load(Relaxed),
                received: c.received.load(Relaxed),
                dup: c.dup.load(Relaxed),
            };
            if s != StepSnap::default() {
                out.insert(i as u32, s);
            }
        }
        out
    }
}

/// An empty latency histogram (microseconds, 3 significant figures).
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("constant, valid bounds")
}

/// Histograms keyed by step, sharded: a client records into the shard of
/// its index, so two tasks contend only when they share a shard.
#[derive(Debug)]
pub struct Shards(Vec<Mutex<BTreeMap<u32, Histogram<u64>>>>);

const SHARDS: usize = 16;

impl Default for Shards {
    fn default() -> Self {
        Shards((0..SHARDS).map(|_| Mutex::new(BTreeMap::new())).collect())
    }
}

impl Shards {
    /// Records one latency, in microseconds.
    pub fn record(&self, client: u32, step: u32, us: u64) {
        let shard = &self.0[client as usize % SHARDS];
        // A poisoned shard only means another task panicked mid-record;
        // the counts are still usable.
        let mut map = shard.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(step)
            .or_insert_with(new_histogram)
            .saturating_record(us.clamp(1, MAX_LATENCY_US));
    }

    /// All shards merged, by step, as portable data.
    pub fn collect(&self) -> BTreeMap<u32, HistData> {
        let mut merged: BTreeMap<u32, Histogram<u64>> = BTreeMap::new();
        for shard in &self.0 {
            let map = shard.lock().unwrap_or_else(|e| e.into_inner());
            for (step, h) in map.iter() {
                merged
                    .entry(*step)
                    .or_insert_with(new_histogram)
                    .add(h)
                    .expect("every histogram here has the same bounds");
            }
        }
        merged
            .into_iter()
            .map(|(s, h)| (s, HistData::from(&h)))
            .collect()
    }
}

/// A histogram as (value, count) pairs, to cross a process boundary.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistData(pub Vec<(u64, u64)>);

impl From<&Histogram<u64>> for HistData {
    fn from(h: &Histogram<u64>) -> Self {
        HistData(
            h.iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect(),
        )
    }
}

impl HistData {
    /// Adds these counts into `h`.
    pub fn add_to(&self, h: &mut Histogram<u64>) {
        for &(value, count) in &self.0 {
            let _ = h.record_n(value.clamp(1, MAX_LATENCY_US), count);
        }
    }
}

/// Percentiles of a latency histogram, in milliseconds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl LatencySummary {
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return LatencySummary::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        LatencySummary {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

/// Where every expected delivery went.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accounting {
    /// Deliveries the accepted sends called for.
    pub expected: u64,
    /// Received, each at most once.
    pub delivered: u64,
    /// Dropped by design and reported by the server (`CHC_Notify_Shed`).
    pub shed: u64,
    /// Dropped by design from a resume's bounded replay buffer.
    pub missed: u64,
    /// Neither received nor accounted for by the server: must be 0.
    pub lost: u64,
    /// Received more often than expected (a duplicate the per-connection
    /// checks did not catch, or a send the bench did not count): must be 0.
    pub excess: u64,
    /// Received twice or out of order: must be 0.
    pub dup: u64,
}

impl Accounting {
    pub fn new(expected: u64, delivered: u64, shed: u64, missed: u64, dup: u64) -> Self {
        let explained = delivered + shed + missed;
        Accounting {
            expected,
            delivered,
            shed,
            missed,
            lost: expected.saturating_sub(explained),
            excess: delivered.saturating_sub(expected),
            dup,
        }
    }

    /// True when nothing was lost or duplicated.
    pub fn clean(&self) -> bool {
        self.lost == 0 && self.excess == 0 && self.dup == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounting_cases() {
        // (expected, delivered, shed, missed, dup) -> (lost, excess, clean)
        let cases = [
            ((100, 100, 0, 0, 0), (0, 0, true)),
            ((100, 90, 10, 0, 0), (0, 0, true)),
            ((100, 90, 4, 6, 0), (0, 0, true)),
            ((100, 90, 0, 0, 0), (10, 0, false)),
            ((100, 101, 0, 0, 0), (0, 1, false)),
            ((100, 100, 0, 0, 1), (0, 0, false)),
            // The server may count as shed what a resume then replays.
            ((100, 100, 5, 0, 0), (0, 0, true)),
            ((0, 0, 0, 0, 0), (0, 0, true)),
        ];
        for ((e, d, s, m, dup), (lost, excess, clean)) in cases {
            let a = Accounting::new(e, d, s, m, dup);
            assert_eq!(
                (a.lost, a.excess, a.clean()),
                (lost, excess, clean),
                "{a:?}"
            );
        }
    }

    #[test]
    fn percentiles_survive_the_trip_between_processes() {
        let shards = Shards::default();
        for i in 1..=1000u64 {
            // 1 ms .. 1000 ms, spread over clients and shards.
            shards.record(i as u32, 3, i * 1000);
        }
        shards.record(7, 4, 5);
        let data = shards.collect();
        assert_eq!(data.len(), 2);
        let json = serde_json::to_string(&data).unwrap();
        let back: BTreeMap<u32, HistData> = serde_json::from_str(&json).unwrap();
        let mut h = new_histogram();
        back[&3].add_to(&mut h);
        let s = LatencySummary::of(&h);
        assert_eq!(s.count, 1000);
        // 3 significant figures: within 0.1 %.
        assert!((s.p50_ms - 500.0).abs() <= 0.5, "{s:?}");
        assert!((s.p99_ms - 990.0).abs() <= 1.0, "{s:?}");
        assert!((s.p999_ms - 999.0).abs() <= 1.0, "{s:?}");
        assert!((s.max_ms - 1000.0).abs() <= 1.0, "{s:?}");
        assert_eq!(
            LatencySummary::of(&new_histogram()),
            LatencySummary::default()
        );
    }

    #[test]
    fn snaps_add_up() {
        let c = Counters::default();
        bump(&c.received);
        add(&c.shed, 4);
        let mut total = Snap::default();
        total.add(&c.snap());
        total.add(&c.snap());
        assert_eq!((total.received, total.shed, total.sent), (2, 8, 0));
        let steps = Steps::default();
        bump(&steps.get(2).received);
        bump(&steps.get(500).sent);
        let snap = steps.snap();
        assert_eq!(snap.len(), 2);
        assert_eq!(snap[&2].received, 1);
        assert_eq!(snap[&(MAX_STEPS as u32 - 1)].sent, 1);
    }
}
