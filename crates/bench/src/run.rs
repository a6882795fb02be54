//! The coordinator: for each scenario it starts a fresh server (guildchat,
//! then the reference and, with `--peer uws`, the uWebSockets relay, where
//! the scenario compares them), starts the worker fleet, drives the phases, samples the server's /proc and turns the
//! workers' counters into results.
//!
//! It owns the run's timeline and every verdict (a step passed, a delivery
//! was lost). It never holds a client socket itself, and every wait in it
//! has a limit; the run as a whole stops at `--duration`.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use tokio::time::Instant;

use super::plan::{Cmd, Layout, MixPlan, Plan, TargetKind, TokenKind};
use super::procfs::{self, Sample};
use super::procs::{Fleet, FleetReport, ServerOpts, ServerProc};
use super::report::{self, RunResult, ScenarioResult, StepResult, TargetResult};
use super::tally::{Accounting, LatencySummary};
use super::uws::{self, UwsPeer};
use super::{Peer, RunArgs, Scenario};

/// Sockets per worker process, well under the 20,000 open files a process
/// may have here.
const SOCKETS_PER_WORKER: u32 = 15_000;
/// The open-file limit the bench asks for (its children inherit it).
const NOFILE: u64 = 20_000;
/// How long connecting every client may take.
const CONNECT_LIMIT: Duration = Duration::from_secs(180);
/// How long workers may take to report.
const REPORT_LIMIT: Duration = Duration::from_secs(30);
/// How long workers may take to close everything and exit.
const CLOSE_LIMIT: Duration = Duration::from_secs(20);
/// Time for a fresh server to settle before its baseline is sampled, and
/// for connections to settle before the loaded sample (shorter in a smoke
/// run, which measures nothing).
const SETTLE: Duration = Duration::from_millis(1500);
const SMOKE_SETTLE: Duration = Duration::from_millis(300);

/// The run's settings after `--smoke` and defaults are applied.
#[derive(Debug, Clone)]
struct Settings {
    a: RunArgs,
    procs: u32,
    rates: Vec<f64>,
    /// Stop stepping after the first failed step.
    stop_on_fail: bool,
    idle_hold: f64,
    mix_hold: f64,
    slow_secs: (f64, f64),
    mix_period_ms: (u64, u64),
    storm_tokens: Vec<TokenKind>,
    settle: Duration,
}

fn parse_period(s: &str) -> anyhow::Result<(u64, u64)> {
    let (a, b) = s
        .split_once('-')
        .context("--mix-period: expected MIN-MAX seconds")?;
    let a: f64 = a.trim().parse().context("--mix-period MIN")?;
    let b: f64 = b.trim().parse().context("--mix-period MAX")?;
    if !(a > 0.0 && b >= a) {
        bail!("--mix-period: need 0 < MIN <= MAX");
    }
    Ok(((a * 1000.0) as u64, (b * 1000.0) as u64))
}

impl Settings {
    fn resolve(mut a: RunArgs) -> anyhow::Result<Settings> {
        let mut rates = a.rates.clone();
        let mut stop_on_fail = true;
        // The second part outlasts filling a stopped reader's socket
        // buffers plus the stall timeout.
        let mut slow_secs = (5.0, 15.0);
        if a.smoke {
            // Small and short, for CI: no timing verdicts, only counts.
            a.scenarios = vec![Scenario::LoginStorm, Scenario::Fanout, Scenario::Mix];
            a.clients = a.clients.min(200);
            a.procs = Some(2);
            a.step_secs = 1.5;
            a.drain_secs = 10.0;
            a.heartbeat_secs = 1.0;
            a.world_rate = 5.0;
            // Above the 1 s channel cooldowns, so no line is refused.
            a.mix_period = "1.2-3".into();
            a.reconnect_per_min = 3.0;
            a.idle_secs = 2.0;
            a.mix_secs = 5.0;
            a.duration = a.duration.min(120);
            a.storm_concurrency = 256;
            rates = vec![10.0, 40.0];
            stop_on_fail = false;
            // CI has no Python: the smoke run compares with nothing.
            a.peer.clear();
            slow_secs = (2.0, 5.0);
        }
        if rates.is_empty() {
            rates = vec![5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0];
        }
        if rates.len() > super::tally::MAX_STEPS - 1 {
            bail!("at most {} rates", super::tally::MAX_STEPS - 1);
        }
        if a.clients < 2 {
            bail!("--clients: need at least 2");
        }
        if a.senders == 0 || a.senders >= a.clients {
            bail!("--senders: need 1..clients");
        }
        if !(0.0..0.5).contains(&a.slow_fraction) {
            bail!("--slow-fraction: need 0 <= f < 0.5");
        }
        if let Some(urls) = &a.url {
            for url in urls.split(',') {
                super::conn::loopback_addr(url).map_err(anyhow::Error::msg)?;
            }
        }
        let procs = a
            .procs
            .unwrap_or_else(|| a.clients.div_ceil(SOCKETS_PER_WORKER).max(2))
            .clamp(1, a.clients);
        if a.clients.div_ceil(procs) > SOCKETS_PER_WORKER + 3_000 {
            bail!("--procs {procs}: more than 18,000 sockets per worker; use more workers");
        }
        let storm_tokens = if a.storm_tokens.is_empty() {
            vec![a.token]
        } else {
            a.storm_tokens.clone()
        };
        Ok(Settings {
            procs,
            rates,
            stop_on_fail,
            idle_hold: a.idle_secs,
            mix_hold: a.mix_secs,
            slow_secs,
            mix_period_ms: parse_period(&a.mix_period)?,
            storm_tokens,
            settle: if a.smoke { SMOKE_SETTLE } else { SETTLE },
            a,
        })
    }
}

/// A spinner line that says what is happening and how fast.
struct Ticker {
    bar: ProgressBar,
    label: String,
    last: Option<(Instant, u64)>,
    rate: f64,
}

impl Ticker {
    fn tick(&mut self, f: &Fleet) {
        let t = f.total();
        let now = Instant::now();
        let got = t.received + t.slow_received;
        if let Some((at, n)) = self.last {
            let dt = now.duration_since(at).as_secs_f64();
            if dt >= 0.5 {
                self.rate = got.saturating_sub(n) as f64 / dt;
                self.last = Some((now, got));
            }
        } else {
            self.last = Some((now, got));
        }
        self.bar.set_message(format!(
            "{} | ready {} fail {} | sent {} | recv {} ({:.0}/s) | dup {} shed {} closed {}",
            self.label,
            t.login_ok,
            t.connect_fail + t.login_fail,
            t.sent,
            got,
            self.rate,
            t.dup,
            t.shed,
            t.closed
        ));
    }
}

struct Runner {
    s: Settings,
    exe: PathBuf,
    server_exe: PathBuf,
    dir: PathBuf,
    deadline: Instant,
    bar: ProgressBar,
    seed: u64,
    runs: u32,
    /// The uWebSockets relay's environment, when `--peer uws` was given.
    uws: Option<UwsPeer>,
}

fn mb(bytes: u64) -> f64 {
    report::round3(bytes as f64 / (1024.0 * 1024.0))
}

fn sample_or_default(s: Option<Sample>) -> Sample {
    s.unwrap_or_default()
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Runner {
    fn next_random(&mut self) -> u64 {
        // splitmix64: fresh ids and addresses per fleet.
        self.seed = self.seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn layout(&mut self) -> Layout {
        let r = self.next_random();
        Layout {
            clients: self.s.a.clients,
            user_base: (r % 1_000_000) * 1_000_000 + 1,
            group_base: ((r >> 20) % 1_000_000) * 1_000_000,
            guild_size: 20,
            team_size: 5,
            scenes: 200,
            // 1..=254: never 0 (127.0.x.y is the usual loopback) nor 255.
            ip_salt: 1 + ((r >> 40) % 254) as u8,
        }
    }

    fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    fn ticker(&self, label: String) -> Ticker {
        Ticker {
            bar: self.bar.clone(),
            label,
            last: None,
            rate: 0.0,
        }
    }

    fn run_dir(&mut self, name: &str) -> anyhow::Result<PathBuf> {
        self.runs += 1;
        let d = self.dir.join(format!("{:02}-{name}", self.runs));
        std::fs::create_dir_all(&d)?;
        Ok(d)
    }

    /// Starts the server under test, lets it settle, and samples its
    /// resting RSS and CPU: every scenario's baseline.
    async fn start_server(
        &mut self,
        kind: TargetKind,
        opts: &ServerOpts,
        dir: &Path,
    ) -> anyhow::Result<(ServerProc, Sample)> {
        let server = self.spawn_server(kind, opts, dir).await?;
        tokio::time::sleep(self.s.settle).await;
        let base = sample_or_default(server.sample());
        Ok((server, base))
    }

    async fn spawn_server(
        &mut self,
        kind: TargetKind,
        opts: &ServerOpts,
        dir: &Path,
    ) -> anyhow::Result<ServerProc> {
        let limit = self.remaining() + Duration::from_secs(30);
        match kind {
            TargetKind::Guildchat => match &self.s.a.url {
                Some(url) => {
                    // requires = "data_dir" on --url.
                    let data = self.s.a.data_dir.clone().unwrap_or_default();
                    Ok(ServerProc::external(url, self.s.a.server_pid, &data))
                }
                None => ServerProc::guildchat(&self.server_exe, dir, opts).await,
            },
            TargetKind::Reference => ServerProc::reference(&self.exe, dir, limit).await,
            TargetKind::Uws => match &self.uws {
                Some(peer) => ServerProc::uws(peer, dir, limit).await,
                None => bail!("the uWebSockets relay was not prepared (--peer uws)"),
            },
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn plans(
        &self,
        kind: TargetKind,
        server: &ServerProc,
        layout: Layout,
        token: TokenKind,
        senders: &[u32],
        slow_every: u32,
        concurrency: usize,
    ) -> Vec<Plan> {
        let a = &self.s.a;
        let procs = self.s.procs;
        let per = a.clients.div_ceil(procs);
        let deadline_unix_ms = unix_ms() + self.remaining().as_millis() as u64 + 20_000;
        let (lo, hi) = self.s.mix_period_ms;
        (0..procs)
            .filter_map(|w| {
                let first = w * per;
                let count = per.min(a.clients.saturating_sub(first));
                (count > 0).then(|| Plan {
                    worker: w,
                    target: kind,
                    url: server.url.clone(),
                    keys_file: server.keys_file.clone(),
                    token,
                    audience: "guildchat".into(),
                    layout,
                    first,
                    count,
                    senders: senders.to_vec(),
                    slow_every,
                    slow_recv_buffer: 4096,
                    heartbeat_ms: (a.heartbeat_secs * 1000.0) as u64,
                    text_len: a.text_len,
                    concurrency: concurrency.div_ceil(procs as usize).max(1),
                    mix: MixPlan {
                        period_min_ms: lo,
                        period_max_ms: hi,
                        world_per_s: a.world_rate,
                        reconnect_per_min: a.reconnect_per_min,
                        roam: a.roam,
                    },
                    deadline_unix_ms,
                })
            })
            .collect()
    }

    /// Sends Connect and waits for every worker to finish connecting.
    async fn connect(&mut self, fleet: &mut Fleet, label: &str) -> anyhow::Result<f64> {
        fleet.send(&Cmd::Connect).await?;
        let mut ticker = self.ticker(format!("{label}: connecting"));
        let limit = CONNECT_LIMIT.min(self.remaining());
        let done = fleet
            .wait_until(limit, |f| f.connected().is_some(), |f| ticker.tick(f))
            .await;
        if !done {
            bail!("clients did not finish connecting within {limit:?}");
        }
        Ok(fleet.connected().unwrap_or(0.0))
    }

    /// Common figures of a target result.
    fn base_result(&self, kind: TargetKind, rep: &FleetReport, base: &Sample) -> TargetResult {
        let mut r = TargetResult {
            target: kind.name().into(),
            clients: self.s.a.clients,
            procs: self.s.procs,
            ready: rep.login.len(),
            connect_failures: rep.snap.connect_fail,
            login_failures: rep.snap.login_fail,
            login_latency: Some(LatencySummary::of(&rep.login)),
            rss_base_mb: mb(base.rss_bytes),
            close_codes: rep.close_codes.clone(),
            refusals: rep
                .refusals
                .iter()
                .map(|(code, n)| {
                    let name = guildchat_protocol::ResCode::try_from(*code)
                        .map_or("NO_REPLY", |c| c.as_str_name());
                    (name.to_owned(), *n)
                })
                .collect(),
            ..Default::default()
        };
        if !rep.heartbeat.is_empty() {
            r.heartbeat_rtt = Some(LatencySummary::of(&rep.heartbeat));
        }
        let s = &rep.snap;
        if r.connect_failures + r.login_failures > 0 {
            r.problems.push(format!(
                "{} connects and {} logins failed",
                r.connect_failures, r.login_failures
            ));
        }
        if s.bad_frames > 0 {
            r.problems.push(format!(
                "{} frames from the server made no sense",
                s.bad_frames
            ));
        }
        r
    }

    async fn finish(&self, fleet: Fleet, server: ServerProc, r: &mut TargetResult) {
        let errors = fleet.errors.clone();
        let _ = fleet.close(CLOSE_LIMIT).await;
        let log = server.log.clone();
        server.stop().await;
        r.problems.extend(errors);
        if !r.problems.is_empty() {
            r.server_log = log.map(|l| l.display().to_string());
        }
    }

    // ---- idle --------------------------------------------------------

    async fn idle(&mut self, kind: TargetKind) -> anyhow::Result<TargetResult> {
        let dir = self.run_dir(&format!("idle-{}", kind.name()))?;
        let opts = ServerOpts::default();
        let (server, base) = self.start_server(kind, &opts, &dir).await?;
        let layout = self.layout();
        let plans = self.plans(
            kind,
            &server,
            layout,
            self.s.a.token,
            &[],
            0,
            self.s.a.concurrency,
        );
        let mut fleet = Fleet::start(&self.exe, plans, &dir).await?;
        let label = format!("idle {}", kind.name());
        self.connect(&mut fleet, &label).await?;
        let mut ticker = self.ticker(format!("{label}: settling"));
        fleet.hold(self.s.settle, |f| ticker.tick(f)).await;
        let s1 = sample_or_default(server.sample());
        let (g1, t1) = (fleet.cpu_s(), Instant::now());
        let hold = Duration::from_secs_f64(self.s.idle_hold).min(self.remaining());
        let mut ticker = self.ticker(format!("{label}: holding {hold:?}"));
        fleet.hold(hold, |f| ticker.tick(f)).await;
        let s2 = sample_or_default(server.sample());
        let (g2, window) = (fleet.cpu_s(), t1.elapsed().as_secs_f64());
        let rep = fleet.report(REPORT_LIMIT).await?;
        let mut r = self.base_result(kind, &rep, &base);
        r.rss_loaded_mb = mb(s2.rss_bytes);
        r.rss_peak_mb = mb(s2.hwm_bytes);
        if r.ready > 0 && server.pid.is_some() {
            let delta = s2.rss_bytes.saturating_sub(base.rss_bytes) as f64;
            r.bytes_per_conn = Some(report::round3(delta / r.ready as f64));
        }
        r.server_cpu_s = report::round3(s2.cpu_s - s1.cpu_s);
        r.window_s = report::round3(window);
        r.generator_cpu_s = report::round3(g2 - g1);
        if r.ready > 0 && window > 0.0 {
            // Per 1000 connections, as a share of one core.
            let share = (s2.cpu_s - s1.cpu_s) / window / r.ready as f64 * 1000.0;
            r.extra.insert(
                "server CPU % of a core per 1000 idle conns".into(),
                report::round3(share * 100.0),
            );
        }
        if rep.snap.closed > 0 {
            r.problems
                .push(format!("{} connections closed while idle", rep.snap.closed));
        }
        self.finish(fleet, server, &mut r).await;
        Ok(r)
    }

    // ---- fan-out -----------------------------------------------------

    /// One fan-out step: send at `rate` for `secs`, wait for the last
    /// deliveries, and judge.
    #[allow(clippy::too_many_arguments)]
    async fn step(
        &mut self,
        fleet: &mut Fleet,
        server: &ServerProc,
        label: &str,
        step: u32,
        rate: f64,
        secs: f64,
        audience: u64,
    ) -> anyhow::Result<StepResult> {
        let before = fleet.total();
        let s0 = sample_or_default(server.sample());
        fleet.send(&Cmd::Fanout { step, rate, secs }).await?;
        let mut ticker = self.ticker(format!("{label}: step {step} at {rate} lines/s"));
        fleet
            .hold(Duration::from_secs_f64(secs), |f| ticker.tick(f))
            .await;
        fleet.send(&Cmd::Quiet).await?;
        // Progress notes come every 250 ms: judge the drain on notes sent
        // after the workers went quiet. A step that kept up has delivered
        // its last line well within this settle, so the drain time (and
        // the step's window) counts from its end.
        fleet
            .hold(Duration::from_millis(600), |f| ticker.tick(f))
            .await;
        let sent_end = Instant::now();
        let drain = Duration::from_secs_f64(self.s.a.drain_secs).min(self.remaining());
        let drained = fleet
            .wait_until(
                drain,
                |f| {
                    let st = f.step(step);
                    let t = f.total();
                    let rejected = t.rejected - before.rejected;
                    let shed = t.shed - before.shed;
                    st.acked + rejected >= st.sent && st.received + shed >= st.acked * audience
                },
                |f| ticker.tick(f),
            )
            .await;
        let drain_s = sent_end.elapsed().as_secs_f64();
        let s1 = sample_or_default(server.sample());
        let rep = fleet
            .settled_report(Duration::from_secs(3), |r| {
                let st = r.steps.get(&step).copied().unwrap_or_default();
                let rejected = r.snap.rejected - before.rejected;
                let shed = r.snap.shed - before.shed;
                st.acked + rejected >= st.sent && st.received + shed >= st.acked * audience
            })
            .await?;
        let st = rep.steps.get(&step).copied().unwrap_or_default();
        let shed = rep.snap.shed - before.shed;
        let closed = rep.snap.closed - before.closed;
        let acc = Accounting::new(st.acked * audience, st.received, shed, 0, st.dup);
        let latency = rep
            .latency
            .get(&step)
            .map(LatencySummary::of)
            .unwrap_or_default();
        let cpu = s1.cpu_s - s0.cpu_s;
        let window = secs + drain_s;
        let mut verdict = Vec::new();
        if !drained {
            verdict.push(format!("not delivered within {:.0}s", self.s.a.drain_secs));
        }
        if acc.lost > 0 {
            verdict.push(format!("lost {}", acc.lost));
        }
        if acc.dup > 0 || acc.excess > 0 {
            verdict.push(format!("dup {} excess {}", acc.dup, acc.excess));
        }
        if shed > 0 {
            verdict.push(format!("shed {shed}"));
        }
        if closed > 0 {
            verdict.push(format!("{closed} clients closed"));
        }
        if latency.p99_ms > self.s.a.max_p99_ms {
            verdict.push(format!("p99 {:.0} ms", latency.p99_ms));
        }
        let want = (rate * secs).round() as u64;
        if (st.acked as f64) < 0.9 * want as f64 {
            verdict.push(format!(
                "senders reached {:.0} lines/s",
                st.acked as f64 / secs
            ));
        }
        Ok(StepResult {
            step,
            rate,
            secs,
            sent: st.sent,
            accepted: st.acked,
            audience,
            accounting: acc,
            offered_per_s: report::round3(rate * audience as f64),
            deliveries_per_s: report::round3(st.received as f64 / window),
            server_cpu_s: report::round3(cpu),
            deliveries_per_cpu_s: if cpu > 0.0 {
                report::round3(st.received as f64 / cpu)
            } else {
                0.0
            },
            latency,
            drain_s: report::round3(drain_s),
            passed: verdict.is_empty(),
            verdict: verdict.join("; "),
        })
    }

    async fn fanout(&mut self, kind: TargetKind) -> anyhow::Result<TargetResult> {
        let dir = self.run_dir(&format!("fanout-{}", kind.name()))?;
        let opts = ServerOpts::default();
        let (server, base) = self.start_server(kind, &opts, &dir).await?;
        let layout = self.layout();
        let senders: Vec<u32> = (0..self.s.a.senders).collect();
        let plans = self.plans(
            kind,
            &server,
            layout,
            self.s.a.token,
            &senders,
            0,
            self.s.a.concurrency,
        );
        let mut fleet = Fleet::start(&self.exe, plans, &dir).await?;
        let label = format!("fanout {}", kind.name());
        self.connect(&mut fleet, &label).await?;
        fleet.hold(self.s.settle, |_| {}).await;
        let loaded = sample_or_default(server.sample());
        let audience = fleet.total().login_ok;
        let (g1, t1) = (fleet.cpu_s(), Instant::now());
        let mut steps = Vec::new();
        for (i, rate) in self.s.rates.clone().into_iter().enumerate() {
            let need = Duration::from_secs_f64(self.s.a.step_secs + self.s.a.drain_secs + 5.0);
            if self.remaining() < need {
                break;
            }
            let step = self
                .step(
                    &mut fleet,
                    &server,
                    &label,
                    i as u32,
                    rate,
                    self.s.a.step_secs,
                    audience,
                )
                .await?;
            let failed = !step.passed;
            steps.push(step);
            if failed && self.s.stop_on_fail {
                break;
            }
        }
        let end = sample_or_default(server.sample());
        let (g2, window) = (fleet.cpu_s(), t1.elapsed().as_secs_f64());
        let rep = fleet.report(REPORT_LIMIT).await?;
        let mut r = self.base_result(kind, &rep, &base);
        r.rss_loaded_mb = mb(loaded.rss_bytes);
        r.rss_peak_mb = mb(end.hwm_bytes);
        if r.ready > 0 && server.pid.is_some() {
            let delta = loaded.rss_bytes.saturating_sub(base.rss_bytes) as f64;
            r.bytes_per_conn = Some(report::round3(delta / r.ready as f64));
        }
        r.server_cpu_s = report::round3(end.cpu_s - loaded.cpu_s);
        r.window_s = report::round3(window);
        r.generator_cpu_s = report::round3(g2 - g1);
        r.deliveries = steps.iter().map(|s| s.accounting.delivered).sum();
        let mut total = Accounting::default();
        for s in &steps {
            let a = s.accounting;
            total = Accounting::new(
                total.expected + a.expected,
                total.delivered + a.delivered,
                total.shed + a.shed,
                0,
                total.dup + a.dup,
            );
        }
        r.accounting = Some(total);
        r.max_sustained = steps.iter().rfind(|s| s.passed).cloned();
        if let Some(m) = &r.max_sustained {
            r.deliveries_per_s = Some(m.deliveries_per_s);
            r.deliveries_per_cpu_s = Some(m.deliveries_per_cpu_s);
            r.latency = Some(m.latency);
        }
        // Loss is a bug at any rate: shedding is how the server is allowed
        // to fall behind, and it is counted.
        for s in &steps {
            if s.accounting.lost > 0 || s.accounting.dup > 0 || s.accounting.excess > 0 {
                r.problems.push(format!(
                    "step {} ({} lines/s): lost {}, duplicated {}, excess {}",
                    s.step, s.rate, s.accounting.lost, s.accounting.dup, s.accounting.excess
                ));
            }
        }
        if steps.is_empty() {
            r.problems.push("no step ran (out of time?)".into());
        } else if r.max_sustained.is_none() {
            r.problems.push(format!(
                "even the first rate ({} lines/s) fell behind: {}",
                steps[0].rate, steps[0].verdict
            ));
        }
        r.steps = steps;
        self.finish(fleet, server, &mut r).await;
        Ok(r)
    }

    /// A scenario that runs against both servers.
    async fn compared(&mut self, sc: Scenario, kind: TargetKind) -> anyhow::Result<TargetResult> {
        match sc {
            Scenario::Idle => self.idle(kind).await,
            _ => self.fanout(kind).await,
        }
    }

    // ---- login storm -------------------------------------------------

    /// A login storm against guildchat with `token`, or, for the uWS
    /// relay, a storm of websocket upgrades (it has no login).
    async fn login_storm(
        &mut self,
        kind: TargetKind,
        token: TokenKind,
    ) -> anyhow::Result<TargetResult> {
        let dir = match kind {
            TargetKind::Guildchat => self.run_dir(&format!("login-storm-{token:?}"))?,
            _ => self.run_dir(&format!("login-storm-{}", kind.name()))?,
        };
        let opts = ServerOpts::default();
        let (server, base) = self.start_server(kind, &opts, &dir).await?;
        let layout = self.layout();
        let plans = self.plans(
            kind,
            &server,
            layout,
            token,
            &[],
            0,
            self.s.a.storm_concurrency,
        );
        let mut fleet = Fleet::start(&self.exe, plans, &dir).await?;
        // Workers mint their tokens before they answer; give them a moment
        // so minting is not inside the measured storm.
        fleet.hold(Duration::from_millis(500), |_| {}).await;
        let s0 = sample_or_default(server.sample());
        let g0 = fleet.cpu_s();
        let elapsed = self
            .connect(&mut fleet, &format!("login-storm {token:?}"))
            .await?;
        let s1 = sample_or_default(server.sample());
        let g1 = fleet.cpu_s();
        let rep = fleet.report(REPORT_LIMIT).await?;
        let mut r = self.base_result(kind, &rep, &base);
        r.rss_loaded_mb = mb(s1.rss_bytes);
        r.rss_peak_mb = mb(s1.hwm_bytes);
        if elapsed > 0.0 {
            r.login_rate_per_s = Some(report::round3(r.ready as f64 / elapsed));
        }
        r.server_cpu_s = report::round3(s1.cpu_s - s0.cpu_s);
        r.window_s = report::round3(elapsed);
        r.generator_cpu_s = report::round3(g1 - g0);
        if r.ready > 0 && server.pid.is_some() {
            r.extra.insert(
                "server CPU ms per login".into(),
                report::round3((s1.cpu_s - s0.cpu_s) * 1000.0 / r.ready as f64),
            );
        }
        self.finish(fleet, server, &mut r).await;
        Ok(r)
    }

    // ---- mix ---------------------------------------------------------

    async fn mix(&mut self) -> anyhow::Result<TargetResult> {
        let kind = TargetKind::Guildchat;
        let dir = self.run_dir("mix")?;
        let opts = ServerOpts::default();
        let (server, base) = self.start_server(kind, &opts, &dir).await?;
        let layout = self.layout();
        let plans = self.plans(
            kind,
            &server,
            layout,
            self.s.a.token,
            &[],
            0,
            self.s.a.concurrency,
        );
        let mut fleet = Fleet::start(&self.exe, plans, &dir).await?;
        self.connect(&mut fleet, "mix").await?;
        fleet.hold(self.s.settle, |_| {}).await;
        let s1 = sample_or_default(server.sample());
        let (g1, t1) = (fleet.cpu_s(), Instant::now());
        let hold = self
            .s
            .mix_hold
            .min(self.remaining().as_secs_f64() - 30.0)
            .max(1.0);
        fleet.send(&Cmd::Mix { secs: hold }).await?;
        let mut ticker = self.ticker(format!("mix: {hold:.0}s"));
        fleet
            .hold(Duration::from_secs_f64(hold), |f| ticker.tick(f))
            .await;
        fleet.send(&Cmd::Quiet).await?;
        fleet
            .hold(Duration::from_millis(600), |f| ticker.tick(f))
            .await;
        // Reconnects in flight finish within a few seconds; then every
        // accepted line must be accounted for.
        let drained = fleet
            .wait_until(
                Duration::from_secs(20).min(self.remaining()),
                |f| {
                    let t = f.total();
                    t.acked + t.rejected >= t.sent && t.received + t.shed + t.missed >= t.expected
                },
                |f| ticker.tick(f),
            )
            .await;
        let s2 = sample_or_default(server.sample());
        let (g2, window) = (fleet.cpu_s(), t1.elapsed().as_secs_f64());
        let rep = fleet
            .settled_report(Duration::from_secs(5), |r| {
                let t = &r.snap;
                t.acked + t.rejected >= t.sent && t.received + t.shed + t.missed >= t.expected
            })
            .await?;
        let t = &rep.snap;
        let mut r = self.base_result(kind, &rep, &base);
        r.rss_loaded_mb = mb(s1.rss_bytes);
        r.rss_peak_mb = mb(s2.hwm_bytes);
        r.server_cpu_s = report::round3(s2.cpu_s - s1.cpu_s);
        r.window_s = report::round3(window);
        r.generator_cpu_s = report::round3(g2 - g1);
        r.deliveries = t.received;
        r.deliveries_per_s = Some(report::round3(t.received as f64 / window));
        if s2.cpu_s > s1.cpu_s {
            r.deliveries_per_cpu_s =
                Some(report::round3(t.received as f64 / (s2.cpu_s - s1.cpu_s)));
        }
        r.latency = Some(LatencySummary::of(&rep.all_latency()));
        // Per channel (the tag's step is the channel in `mix`): world lines
        // reach every player, so their tail is the time one broadcast takes.
        for (step, h) in &rep.latency {
            let name = guildchat_protocol::ChatType::try_from(*step as i32).map_or_else(
                |_| format!("channel {step}"),
                |c| c.as_str_name().to_lowercase(),
            );
            let l = LatencySummary::of(h);
            r.extra.insert(format!("latency p50 ms, {name}"), l.p50_ms);
            r.extra.insert(format!("latency p99 ms, {name}"), l.p99_ms);
        }
        let acc = Accounting::new(t.expected, t.received, t.shed, t.missed, t.dup);
        r.accounting = Some(acc);
        for (k, v) in [
            ("lines sent", t.sent),
            ("lines accepted", t.acked),
            ("lines refused or unanswered", t.rejected),
            ("reconnects", t.reconnects),
            ("replayed on resume", t.replayed),
            ("resumes with a replay gap", t.replay_gaps),
            ("kicked", t.kicked),
            ("closed unexpectedly", t.closed),
        ] {
            r.extra.insert(k.into(), v as f64);
        }
        r.extra
            .insert("lines/s".into(), report::round3(t.sent as f64 / hold));
        if !drained {
            r.problems
                .push("not every line was delivered within 20 s of the end".into());
        }
        if !acc.clean() {
            r.problems.push(format!(
                "lost {}, duplicated {}, excess {}",
                acc.lost, acc.dup, acc.excess
            ));
        }
        if t.rejected > 0 {
            r.problems
                .push(format!("{} lines refused or unanswered", t.rejected));
        }
        if t.closed > 0 || t.kicked > 0 {
            r.problems.push(format!(
                "{} connections closed and {} kicked unasked",
                t.closed, t.kicked
            ));
        }
        self.finish(fleet, server, &mut r).await;
        Ok(r)
    }

    // ---- slow consumers ----------------------------------------------

    async fn slow(&mut self) -> anyhow::Result<TargetResult> {
        let kind = TargetKind::Guildchat;
        let dir = self.run_dir("slow")?;
        // A short stall timeout and the default queue, so the policy shows
        // within the scenario's seconds.
        let opts = ServerOpts {
            outbound_queue: 1024,
            stall_timeout_ms: 3000,
            socket_send_buffer: self.s.a.slow_sndbuf,
        };
        let (server, base) = self.start_server(kind, &opts, &dir).await?;
        let layout = self.layout();
        let frac = self.s.a.slow_fraction;
        let slow_every = if frac > 0.0 {
            ((1.0 / frac).round() as u32).max(2)
        } else {
            0
        };
        let is_slow = |i: u32| slow_every > 0 && i % slow_every == slow_every - 1;
        let senders: Vec<u32> = (0..layout.clients)
            .filter(|&i| !is_slow(i))
            .take(self.s.a.senders as usize)
            .collect();
        let slow_count = (0..layout.clients).filter(|&i| is_slow(i)).count() as u64;
        let plans = self.plans(
            kind,
            &server,
            layout,
            self.s.a.token,
            &senders,
            slow_every,
            self.s.a.concurrency,
        );
        let plans = plans
            .into_iter()
            .map(|mut p| {
                p.text_len = self.s.a.slow_text_len;
                p
            })
            .collect();
        let mut fleet = Fleet::start(&self.exe, plans, &dir).await?;
        self.connect(&mut fleet, "slow").await?;
        fleet.hold(self.s.settle, |_| {}).await;
        let loaded = sample_or_default(server.sample());
        let healthy = fleet.total().login_ok.saturating_sub(slow_count);
        let (g1, t1) = (fleet.cpu_s(), Instant::now());
        let rate = self.s.a.slow_rate;
        let (a_secs, b_secs) = self.s.slow_secs;
        let before = self
            .step(
                &mut fleet,
                &server,
                "slow: all reading",
                0,
                rate,
                a_secs,
                healthy,
            )
            .await?;
        fleet.send(&Cmd::SlowStop).await?;
        let during = self
            .step(
                &mut fleet,
                &server,
                "slow: some stopped",
                1,
                rate,
                b_secs,
                healthy,
            )
            .await?;
        let mid = sample_or_default(server.sample());
        fleet.send(&Cmd::SlowRead).await?;
        let mut ticker = self.ticker("slow: releasing stopped clients".into());
        let released = fleet
            .wait_until(
                Duration::from_secs(40).min(self.remaining()),
                |f| f.total().slow_done >= slow_count,
                |f| ticker.tick(f),
            )
            .await;
        let end = sample_or_default(server.sample());
        let (g2, window) = (fleet.cpu_s(), t1.elapsed().as_secs_f64());
        let rep = fleet.report(REPORT_LIMIT).await?;
        let t = &rep.snap;
        let mut r = self.base_result(kind, &rep, &base);
        r.rss_loaded_mb = mb(loaded.rss_bytes);
        r.rss_peak_mb = mb(end.hwm_bytes);
        r.server_cpu_s = report::round3(end.cpu_s - loaded.cpu_s);
        r.window_s = report::round3(window);
        r.generator_cpu_s = report::round3(g2 - g1);
        r.deliveries = before.accounting.delivered + during.accounting.delivered;
        r.deliveries_per_s = Some(during.deliveries_per_s);
        r.deliveries_per_cpu_s = Some(during.deliveries_per_cpu_s);
        r.latency = Some(during.latency);
        r.accounting = Some(Accounting::new(
            before.accounting.expected + during.accounting.expected,
            r.deliveries,
            before.accounting.shed + during.accounting.shed,
            0,
            before.accounting.dup + during.accounting.dup,
        ));
        for (k, v) in [
            ("slow clients", slow_count as f64),
            ("slow clients kicked (notice or 4002)", t.slow_kicked as f64),
            (
                "slow clients cut off without a close",
                t.slow_dropped as f64,
            ),
            ("slow clients' notices received", t.slow_received as f64),
            ("slow clients' shed count", t.slow_shed as f64),
            ("healthy p99 ms, all reading", before.latency.p99_ms),
            ("healthy p99 ms, some stopped", during.latency.p99_ms),
            ("server RSS MB while stopped", mb(mid.rss_bytes)),
        ] {
            r.extra.insert(k.into(), v);
        }
        if let Some(log) = &server.log {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let n = text.matches("slow consumer disconnected").count();
            r.extra
                .insert("slow consumers disconnected (server log)".into(), n as f64);
        }
        for s in [&before, &during] {
            if !s.accounting.clean() || s.accounting.shed > 0 {
                r.problems.push(format!(
                    "healthy receivers in step {}: lost {}, dup {}, excess {}, shed {}",
                    s.step,
                    s.accounting.lost,
                    s.accounting.dup,
                    s.accounting.excess,
                    s.accounting.shed
                ));
            }
        }
        if !released {
            r.problems
                .push("stopped clients did not finish reading within 40 s".into());
        }
        r.steps = vec![before, during];
        self.finish(fleet, server, &mut r).await;
        Ok(r)
    }
}

fn machine() -> std::collections::BTreeMap<String, String> {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    };
    let mut m = std::collections::BTreeMap::new();
    m.insert(
        "cpus".into(),
        std::thread::available_parallelism()
            .map(|n| n.to_string())
            .unwrap_or_default(),
    );
    m.insert("kernel".into(), read("/proc/sys/kernel/osrelease"));
    m.insert("somaxconn".into(), read("/proc/sys/net/core/somaxconn"));
    m.insert(
        "ip_local_port_range".into(),
        read("/proc/sys/net/ipv4/ip_local_port_range").replace('\t', "-"),
    );
    m.insert("clk_tck".into(), procfs::ticks_per_second().to_string());
    m
}

/// Runs the scenarios, prints the tables, writes the JSON.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let s = Settings::resolve(args)?;
    let nofile = procfs::raise_nofile(NOFILE);
    let per_worker = s.a.clients.div_ceil(s.procs) as u64;
    if per_worker + 100 > nofile {
        bail!("open-file limit {nofile} is too low for {per_worker} sockets per worker; raise `ulimit -n` or use more --procs");
    }
    if s.a.url.is_none() && s.a.clients as u64 + 200 > nofile {
        bail!(
            "open-file limit {nofile} is too low for a server holding {} sockets",
            s.a.clients
        );
    }
    let exe = std::env::current_exe().context("finding this binary")?;
    let server_exe = s.a.server_bin.clone().unwrap_or_else(|| exe.clone());
    let dir = std::env::temp_dir().join(format!(
        "guildchat-bench-{}-{}",
        std::process::id(),
        unix_ms()
    ));
    std::fs::create_dir_all(&dir)?;
    let bar = if s.a.no_progress {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
                .expect("a constant template"),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    };
    let started = unix_ms();
    let mut runner = Runner {
        exe,
        server_exe,
        dir: dir.clone(),
        deadline: Instant::now() + Duration::from_secs(s.a.duration),
        bar: bar.clone(),
        seed: started ^ u64::from(std::process::id()) << 32,
        runs: 0,
        uws: None,
        s: s.clone(),
    };
    if s.a.peer.contains(&Peer::Uws) {
        // Before any scenario, so that installing is never inside a
        // measured window; a peer that cannot run stops the run here.
        bar.set_message("preparing the uWebSockets relay");
        runner.uws = Some(uws::prepare(&runner.exe).await?);
    }
    let compare = !s.a.no_reference;
    let mut scenarios = Vec::new();
    let mut problems = Vec::new();
    for sc in s.a.scenarios.clone() {
        if runner.remaining() < Duration::from_secs(10) {
            problems.push(format!("{}: skipped, --duration ran out", sc.name()));
            continue;
        }
        let params = json!({
            "clients": s.a.clients,
            "procs": s.procs,
            "token": format!("{:?}", s.a.token),
        });
        let mut results: Vec<ScenarioResult> = Vec::new();
        match sc {
            Scenario::Idle | Scenario::Fanout => {
                let mut params = params;
                if sc == Scenario::Fanout {
                    params["senders"] = json!(s.a.senders);
                    params["rates"] = json!(s.rates);
                    params["step_secs"] = json!(s.a.step_secs);
                    params["max_p99_ms"] = json!(s.a.max_p99_ms);
                    params["text_len"] = json!(s.a.text_len);
                } else {
                    params["hold_s"] = json!(s.idle_hold);
                    params["heartbeat_s"] = json!(s.a.heartbeat_secs);
                }
                let g = runner.compared(sc, TargetKind::Guildchat).await;
                let r = if compare {
                    Some(runner.compared(sc, TargetKind::Reference).await)
                } else {
                    None
                };
                let u = if runner.uws.is_some() {
                    Some(runner.compared(sc, TargetKind::Uws).await)
                } else {
                    None
                };
                let mut res = ScenarioResult {
                    name: sc.name().into(),
                    params,
                    guildchat: None,
                    reference: None,
                    ratios: Default::default(),
                    uws: None,
                    uws_ratios: Default::default(),
                };
                match g {
                    Ok(g) => res.guildchat = Some(g),
                    Err(e) => problems.push(format!("{} guildchat: {e:#}", sc.name())),
                }
                match r {
                    Some(Ok(r)) => res.reference = Some(r),
                    Some(Err(e)) => problems.push(format!("{} reference: {e:#}", sc.name())),
                    None => {}
                }
                match u {
                    Some(Ok(u)) => res.uws = Some(u),
                    Some(Err(e)) => problems.push(format!("{} uws: {e:#}", sc.name())),
                    None => {}
                }
                if let (Some(g), Some(r)) = (&res.guildchat, &res.reference) {
                    res.ratios = report::ratios(g, r);
                }
                if let (Some(g), Some(u)) = (&res.guildchat, &res.uws) {
                    res.uws_ratios = report::ratios(g, u);
                }
                results.push(res);
            }
            Scenario::LoginStorm => {
                // With `--peer uws`, the same storm against uWS, which only
                // upgrades (its relay has no login): the cost of the
                // handshake alone, beside every token's login.
                let upgrade = if runner.uws.is_some() {
                    match runner.login_storm(TargetKind::Uws, s.a.token).await {
                        Ok(u) => Some(u),
                        Err(e) => {
                            problems.push(format!("login-storm uws: {e:#}"));
                            None
                        }
                    }
                } else {
                    None
                };
                for token in s.storm_tokens.clone() {
                    let mut params = params.clone();
                    params["token"] = json!(format!("{token:?}"));
                    params["concurrency"] = json!(s.a.storm_concurrency);
                    let mut res = ScenarioResult {
                        name: format!("login-storm ({token:?})"),
                        params,
                        guildchat: None,
                        reference: None,
                        ratios: Default::default(),
                        uws: None,
                        uws_ratios: Default::default(),
                    };
                    match runner.login_storm(TargetKind::Guildchat, token).await {
                        Ok(g) => res.guildchat = Some(g),
                        Err(e) => problems.push(format!("login-storm {token:?}: {e:#}")),
                    }
                    res.uws = upgrade.clone();
                    if let (Some(g), Some(u)) = (&res.guildchat, &res.uws) {
                        res.uws_ratios = report::ratios(g, u);
                    }
                    results.push(res);
                }
            }
            Scenario::Mix => {
                let mut params = params;
                params["hold_s"] = json!(s.mix_hold);
                params["world_lines_per_s"] = json!(s.a.world_rate);
                params["period_s"] = json!(s.a.mix_period);
                params["reconnect_per_min"] = json!(s.a.reconnect_per_min);
                params["roam"] = json!(s.a.roam);
                params["guild_size"] = json!(20);
                params["team_size"] = json!(5);
                params["scenes"] = json!(200);
                let mut res = ScenarioResult {
                    name: "mix".into(),
                    params,
                    guildchat: None,
                    reference: None,
                    ratios: Default::default(),
                    uws: None,
                    uws_ratios: Default::default(),
                };
                match runner.mix().await {
                    Ok(g) => res.guildchat = Some(g),
                    Err(e) => problems.push(format!("mix: {e:#}")),
                }
                results.push(res);
            }
            Scenario::Slow => {
                let mut params = params;
                params["slow_fraction"] = json!(s.a.slow_fraction);
                params["rate"] = json!(s.a.slow_rate);
                params["text_len"] = json!(s.a.slow_text_len);
                params["secs"] = json!([s.slow_secs.0, s.slow_secs.1]);
                params["outbound_queue"] = json!(1024);
                params["stall_timeout_ms"] = json!(3000);
                params["socket_send_buffer"] = json!(s.a.slow_sndbuf);
                let mut res = ScenarioResult {
                    name: "slow".into(),
                    params,
                    guildchat: None,
                    reference: None,
                    ratios: Default::default(),
                    uws: None,
                    uws_ratios: Default::default(),
                };
                match runner.slow().await {
                    Ok(g) => res.guildchat = Some(g),
                    Err(e) => problems.push(format!("slow: {e:#}")),
                }
                results.push(res);
            }
        }
        for res in &results {
            for t in [&res.guildchat, &res.reference, &res.uws]
                .into_iter()
                .flatten()
            {
                for p in &t.problems {
                    problems.push(format!("{} {}: {p}", res.name, t.target));
                }
            }
            bar.println(format!("finished {}", res.name));
        }
        scenarios.extend(results);
    }
    bar.finish_and_clear();
    let run = RunResult {
        started_unix_s: started / 1000,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: machine(),
        scenarios,
        ok: problems.is_empty(),
        problems,
    };
    println!("{}", report::render(&run));
    if let Some(out) = &s.a.out {
        let json = serde_json::to_string_pretty(&run)?;
        std::fs::write(out, json).with_context(|| format!("writing {}", out.display()))?;
        println!("results written to {}", out.display());
    }
    if s.a.keep_dir || !run.ok {
        println!("server logs and configs kept in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    if !run.ok && (s.a.smoke || s.a.strict) {
        bail!("{} problem(s) found", run.problems.len());
    }
    Ok(())
}
