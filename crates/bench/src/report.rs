//! Results: what a run found, as JSON for machines and as tables for
//! people, with guildchat's figures set against the reference server's
//! (and the uWebSockets relay's, with `--peer uws`).
//!
//! This module formats numbers it is given; it measures nothing and decides
//! nothing beyond listing the problems the scenarios recorded.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::tally::{Accounting, LatencySummary};

/// One fan-out step.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StepResult {
    pub step: u32,
    /// Lines per second asked of all senders together.
    pub rate: f64,
    pub secs: f64,
    pub sent: u64,
    pub accepted: u64,
    /// Receivers each accepted line should reach.
    pub audience: u64,
    pub accounting: Accounting,
    /// Deliveries per second asked for and achieved (over the step and its
    /// drain).
    pub offered_per_s: f64,
    pub deliveries_per_s: f64,
    pub server_cpu_s: f64,
    pub deliveries_per_cpu_s: f64,
    pub latency: LatencySummary,
    /// Time after the step (and a fixed 0.6 s settle) until every
    /// expected delivery was in.
    pub drain_s: f64,
    pub passed: bool,
    /// Why a step failed.
    pub verdict: String,
}

/// What one target (guildchat or the reference) did in one scenario.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TargetResult {
    pub target: String,
    pub clients: u32,
    pub procs: u32,
    pub ready: u64,
    pub connect_failures: u64,
    pub login_failures: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub login_rate_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub login_latency: Option<LatencySummary>,
    pub rss_base_mb: f64,
    pub rss_loaded_mb: f64,
    pub rss_peak_mb: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_per_conn: Option<f64>,
    /// Server CPU over the measured window, and that window.
    pub server_cpu_s: f64,
    pub window_s: f64,
    /// Generator CPU (all workers) over the same window.
    pub generator_cpu_s: f64,
    pub deliveries: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deliveries_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deliveries_per_cpu_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency: Option<LatencySummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_rtt: Option<LatencySummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accounting: Option<Accounting>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_sustained: Option<StepResult>,
    /// Scenario-specific figures (reconnects, slow-consumer kicks...).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, f64>,
    /// Close codes the clients saw (0: no close frame).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub close_codes: BTreeMap<u16, u64>,
    /// Refused chat lines by result code ("NO_REPLY": none came).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub refusals: BTreeMap<String, u64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
    /// The server's log, when there were problems.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_log: Option<String>,
}

/// One scenario, against guildchat and maybe the reference.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioResult {
    pub name: String,
    pub params: serde_json::Value,
    pub guildchat: Option<TargetResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<TargetResult>,
    /// guildchat / reference, metric by metric.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub ratios: BTreeMap<String, f64>,
    /// The uWebSockets relay (`--peer uws`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uws: Option<TargetResult>,
    /// guildchat / uws, metric by metric.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub uws_ratios: BTreeMap<String, f64>,
}

/// A whole run.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub started_unix_s: u64,
    pub command: String,
    pub machine: BTreeMap<String, String>,
    pub scenarios: Vec<ScenarioResult>,
    pub problems: Vec<String>,
    pub ok: bool,
}

/// The metrics compared between the two servers: (name, extractor).
type Metric = (&'static str, fn(&TargetResult) -> Option<f64>);

const RATIO_METRICS: &[Metric] = &[
    ("bytes_per_conn", |t| t.bytes_per_conn),
    ("rss_loaded_mb", |t| Some(t.rss_loaded_mb)),
    ("server_cpu_s", |t| Some(t.server_cpu_s)),
    ("deliveries_per_s", |t| t.deliveries_per_s),
    ("deliveries_per_cpu_s", |t| t.deliveries_per_cpu_s),
    ("latency_p50_ms", |t| t.latency.map(|l| l.p50_ms)),
    ("latency_p99_ms", |t| t.latency.map(|l| l.p99_ms)),
    ("heartbeat_rtt_p99_ms", |t| {
        t.heartbeat_rtt.map(|l| l.p99_ms)
    }),
    ("max_sustained_rate", |t| {
        t.max_sustained.as_ref().map(|s| s.rate)
    }),
    ("max_sustained_deliveries_per_s", |t| {
        t.max_sustained.as_ref().map(|s| s.deliveries_per_s)
    }),
    ("max_sustained_deliveries_per_cpu_s", |t| {
        t.max_sustained.as_ref().map(|s| s.deliveries_per_cpu_s)
    }),
    ("max_sustained_p99_ms", |t| {
        t.max_sustained.as_ref().map(|s| s.latency.p99_ms)
    }),
];

/// guildchat / reference for every metric both have (and the reference's
/// is not zero).
pub fn ratios(g: &TargetResult, r: &TargetResult) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (name, get) in RATIO_METRICS {
        if let (Some(a), Some(b)) = (get(g), get(r)) {
            if b.abs() > f64::EPSILON {
                out.insert((*name).to_owned(), round3(a / b));
            }
        }
    }
    out
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn num(x: f64) -> String {
    if x.abs() >= 100_000.0 {
        format!("{:.0}", x)
    } else if x.abs() >= 100.0 {
        format!("{:.1}", x)
    } else {
        format!("{:.3}", x)
    }
}

fn opt(x: Option<f64>) -> String {
    x.map_or_else(|| "-".to_owned(), num)
}

/// A plain-text table: header row, then rows, columns padded.
fn table(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let cols = header.len();
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate().take(cols) {
            width[i] = width[i].max(cell.len());
        }
    }
    let line = |out: &mut String, cells: &[String]| {
        for (i, cell) in cells.iter().enumerate().take(cols) {
            let _ = if i == 0 {
                write!(out, "  {:<w$}", cell, w = width[i])
            } else {
                write!(out, "  {:>w$}", cell, w = width[i])
            };
        }
        out.push('\n');
    };
    line(
        out,
        &header.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
    );
    let rule: Vec<String> = width.iter().map(|w| "-".repeat(*w)).collect();
    line(out, &rule);
    for row in rows {
        line(out, row);
    }
}

/// The metric rows: guildchat's figure, then for each other target present
/// its figure and guildchat's over it.
fn target_rows(g: Option<&TargetResult>, others: &[&TargetResult]) -> Vec<Vec<String>> {
    type Get = fn(&TargetResult) -> Option<f64>;
    let metrics: &[(&str, Get)] = &[
        ("clients ready", |t| Some(t.ready as f64)),
        ("connect+login failures", |t| {
            Some((t.connect_failures + t.login_failures) as f64)
        }),
        ("logins/s", |t| t.login_rate_per_s),
        ("login p50 ms", |t| t.login_latency.map(|l| l.p50_ms)),
        ("login p99 ms", |t| t.login_latency.map(|l| l.p99_ms)),
        ("login max ms", |t| t.login_latency.map(|l| l.max_ms)),
        ("server RSS base MB", |t| Some(t.rss_base_mb)),
        ("server RSS loaded MB", |t| Some(t.rss_loaded_mb)),
        ("server RSS peak MB", |t| Some(t.rss_peak_mb)),
        ("bytes/connection", |t| t.bytes_per_conn),
        ("window s", |t| Some(t.window_s)),
        ("server CPU s", |t| Some(t.server_cpu_s)),
        ("generator CPU s", |t| Some(t.generator_cpu_s)),
        ("deliveries", |t| Some(t.deliveries as f64)),
        ("deliveries/s", |t| t.deliveries_per_s),
        ("deliveries/server CPU-s", |t| t.deliveries_per_cpu_s),
        ("latency p50 ms", |t| t.latency.map(|l| l.p50_ms)),
        ("latency p99 ms", |t| t.latency.map(|l| l.p99_ms)),
        ("latency p99.9 ms", |t| t.latency.map(|l| l.p999_ms)),
        ("latency max ms", |t| t.latency.map(|l| l.max_ms)),
        ("heartbeat RTT p50 ms", |t| {
            t.heartbeat_rtt.map(|l| l.p50_ms)
        }),
        ("heartbeat RTT p99 ms", |t| {
            t.heartbeat_rtt.map(|l| l.p99_ms)
        }),
        ("expected deliveries", |t| {
            t.accounting.map(|a| a.expected as f64)
        }),
        ("lost", |t| t.accounting.map(|a| a.lost as f64)),
        ("duplicated/reordered", |t| {
            t.accounting.map(|a| a.dup as f64)
        }),
        ("excess", |t| t.accounting.map(|a| a.excess as f64)),
        ("shed (by design)", |t| t.accounting.map(|a| a.shed as f64)),
        ("missed in replay (by design)", |t| {
            t.accounting.map(|a| a.missed as f64)
        }),
        ("max sustained lines/s", |t| {
            t.max_sustained.as_ref().map(|s| s.rate)
        }),
        ("max sustained deliveries/s", |t| {
            t.max_sustained.as_ref().map(|s| s.deliveries_per_s)
        }),
        ("  at deliveries/server CPU-s", |t| {
            t.max_sustained.as_ref().map(|s| s.deliveries_per_cpu_s)
        }),
        ("  at latency p99 ms", |t| {
            t.max_sustained.as_ref().map(|s| s.latency.p99_ms)
        }),
    ];
    let mut rows = Vec::new();
    for (name, get) in metrics {
        let a = g.and_then(get);
        let bs: Vec<Option<f64>> = others.iter().map(|t| get(t)).collect();
        if a.is_none() && bs.iter().all(Option::is_none) {
            continue;
        }
        let mut row = vec![name.to_string(), opt(a)];
        for b in bs {
            let ratio = match (a, b) {
                (Some(a), Some(b)) if b.abs() > f64::EPSILON => num(a / b),
                _ => "-".into(),
            };
            row.push(opt(b));
            row.push(ratio);
        }
        rows.push(row);
    }
    // Scenario-specific figures, by name: guildchat's, then each other's.
    let mut extras: BTreeMap<&str, Vec<Option<f64>>> = BTreeMap::new();
    let all = std::iter::once(g).chain(others.iter().map(|t| Some(*t)));
    for (i, t) in all.enumerate() {
        for (k, v) in t.map(|t| &t.extra).into_iter().flatten() {
            extras
                .entry(k.as_str())
                .or_insert_with(|| vec![None; others.len() + 1])[i] = Some(*v);
        }
    }
    for (k, vals) in extras {
        let mut row = vec![k.to_string(), opt(vals[0])];
        for v in &vals[1..] {
            row.push(opt(*v));
            row.push("-".into());
        }
        rows.push(row);
    }
    rows
}

fn step_rows(t: &TargetResult) -> Vec<Vec<String>> {
    t.steps
        .iter()
        .map(|s| {
            vec![
                s.step.to_string(),
                num(s.rate),
                s.accepted.to_string(),
                num(s.offered_per_s),
                num(s.deliveries_per_s),
                num(s.server_cpu_s),
                num(s.deliveries_per_cpu_s),
                num(s.latency.p50_ms),
                num(s.latency.p99_ms),
                num(s.latency.p999_ms),
                num(s.latency.max_ms),
                s.accounting.lost.to_string(),
                s.accounting.dup.to_string(),
                s.accounting.shed.to_string(),
                if s.passed {
                    "ok".into()
                } else {
                    s.verdict.clone()
                },
            ]
        })
        .collect()
}

/// The human summary of a run.
pub fn render(run: &RunResult) -> String {
    let mut out = String::new();
    for sc in &run.scenarios {
        let _ = writeln!(out, "\n== {} ==  {}", sc.name, sc.params);
        let g = sc.guildchat.as_ref();
        let r = sc.reference.as_ref();
        let u = sc.uws.as_ref();
        let mut header = vec!["metric", "guildchat"];
        if r.is_some() {
            header.extend(["reference", "ratio g/r"]);
        }
        if u.is_some() {
            header.extend(["uws", "ratio g/uws"]);
        }
        let others: Vec<&TargetResult> = [r, u].into_iter().flatten().collect();
        table(&mut out, &header, &target_rows(g, &others));
        for t in [g, r, u].into_iter().flatten() {
            if t.steps.is_empty() {
                continue;
            }
            let _ = writeln!(out, "\n  {} steps:", t.target);
            table(
                &mut out,
                &[
                    "step",
                    "lines/s",
                    "accepted",
                    "offered/s",
                    "deliv/s",
                    "cpu s",
                    "deliv/cpu-s",
                    "p50 ms",
                    "p99 ms",
                    "p99.9 ms",
                    "max ms",
                    "lost",
                    "dup",
                    "shed",
                    "verdict",
                ],
                &step_rows(t),
            );
        }
        for t in [g, r, u].into_iter().flatten() {
            if !t.close_codes.is_empty() {
                let codes: Vec<String> = t
                    .close_codes
                    .iter()
                    .map(|(c, n)| format!("{c}x{n}"))
                    .collect();
                let _ = writeln!(out, "  {} close codes seen: {}", t.target, codes.join(" "));
            }
            if !t.refusals.is_empty() {
                let codes: Vec<String> =
                    t.refusals.iter().map(|(c, n)| format!("{c}x{n}")).collect();
                let _ = writeln!(out, "  {} refused lines: {}", t.target, codes.join(" "));
            }
            if let Some(log) = &t.server_log {
                let _ = writeln!(out, "  {} server log: {log}", t.target);
            }
        }
    }
    if run.problems.is_empty() {
        let _ = writeln!(out, "\nno problems found");
    } else {
        let _ = writeln!(out, "\nPROBLEMS:");
        for p in &run.problems {
            let _ = writeln!(out, "  - {p}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_skip_missing_and_zero() {
        let g = TargetResult {
            bytes_per_conn: Some(3000.0),
            deliveries_per_s: Some(50.0),
            rss_loaded_mb: 30.0,
            ..Default::default()
        };
        let r = TargetResult {
            bytes_per_conn: Some(1000.0),
            deliveries_per_s: Some(0.0),
            rss_loaded_mb: 20.0,
            ..Default::default()
        };
        let got = ratios(&g, &r);
        assert_eq!(got.get("bytes_per_conn"), Some(&3.0));
        assert_eq!(got.get("rss_loaded_mb"), Some(&1.5));
        assert!(!got.contains_key("deliveries_per_s"));
        assert!(!got.contains_key("latency_p99_ms"));
    }

    #[test]
    fn uws_gets_its_own_figure_and_ratio_columns() {
        let t = |target: &str, rss: f64| TargetResult {
            target: target.into(),
            rss_loaded_mb: rss,
            extra: [("only here".to_owned(), 7.0)].into_iter().collect(),
            ..Default::default()
        };
        let g = t("guildchat", 30.0);
        let r = t("reference", 20.0);
        let u = t("uws", 10.0);
        let rows = target_rows(Some(&g), &[&r, &u]);
        let rss = rows
            .iter()
            .find(|row| row[0] == "server RSS loaded MB")
            .expect("an RSS row");
        assert_eq!(rss[1..], ["30.000", "20.000", "1.500", "10.000", "3.000"]);
        assert!(rows.iter().all(|row| row.len() == 6), "{rows:?}");
        let run = RunResult {
            started_unix_s: 0,
            command: String::new(),
            machine: BTreeMap::new(),
            scenarios: vec![ScenarioResult {
                name: "idle".into(),
                params: serde_json::Value::Null,
                ratios: ratios(&g, &r),
                uws_ratios: ratios(&g, &u),
                guildchat: Some(g),
                reference: Some(r),
                uws: Some(u),
            }],
            problems: Vec::new(),
            ok: true,
        };
        let text = render(&run);
        assert!(text.contains("ratio g/r"), "{text}");
        assert!(text.contains("ratio g/uws"), "{text}");
        assert_eq!(run.scenarios[0].uws_ratios.get("rss_loaded_mb"), Some(&3.0));
    }

    #[test]
    fn tables_line_up() {
        let mut out = String::new();
        table(
            &mut out,
            &["a", "bb"],
            &[
                vec!["x".into(), "1".into()],
                vec!["yyyy".into(), "22".into()],
            ],
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines.iter().all(|l| l.len() == lines[0].len()), "{out}");
    }
}
