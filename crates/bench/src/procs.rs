//! The child processes of a bench run: the server under test (guildchat
//! started with a generated config, or one already running), the reference
//! server, the uWebSockets relay (`--peer uws`), and the worker fleet.
//!
//! Every child is started from this binary or the given server binary, on
//! 127.0.0.1 only, with its output in the run's work directory, and is
//! stopped by its own pid: SIGTERM first, so guildchat shuts down as in
//! production, SIGKILL if it does not exit in time. Nothing here measures
//! traffic; it only starts, watches and stops processes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use guildchat_auth::{KeyAlg, KeyRing};
use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::plan::{Cmd, Note, Plan};
use super::procfs::{self, Sample};
use super::tally::{new_histogram, Snap, StepSnap};
use super::uws::UwsPeer;

/// How long a server may take to start accepting.
const START_LIMIT: Duration = Duration::from_secs(20);
/// How long a server may take to exit after SIGTERM (guildchat's own
/// shutdown grace is 5 s).
const STOP_LIMIT: Duration = Duration::from_secs(15);
/// Notes waiting for the coordinator, from all workers together.
const NOTE_QUEUE: usize = 4096;
/// How long workers may take to answer one Report.
const REPORT_LIMIT_EACH: Duration = Duration::from_secs(30);

/// Settings of a guildchat the bench starts itself.
#[derive(Debug, Clone, Copy)]
pub struct ServerOpts {
    pub outbound_queue: usize,
    pub stall_timeout_ms: u64,
    /// SO_SNDBUF of client sockets; 0 keeps the kernel's auto-tuning.
    pub socket_send_buffer: u32,
}

impl Default for ServerOpts {
    fn default() -> Self {
        ServerOpts {
            outbound_queue: 1024,
            stall_timeout_ms: 5000,
            socket_send_buffer: 0,
        }
    }
}

/// A server under test: one the bench started, or one it was pointed at.
pub struct ServerProc {
    pub url: String,
    /// For /proc sampling; `None` if unknown (external, no --server-pid).
    pub pid: Option<u32>,
    /// The key ring tokens are minted from (guildchat only).
    pub keys_file: Option<PathBuf>,
    pub log: Option<PathBuf>,
    child: Option<Child>,
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// The generated server config: no world cooldown (fan-out senders send
/// many lines a second), room for every bench client (no per-IP limits: the
/// clients share a few loopback addresses), a backlog for login storms, and per-connection queues chosen by the scenario. World lines
/// may be 1000 characters, so the byte bound is raised to what the server
/// requires for a full resume replay of lines that long (841 frames of up
/// to 6,896 bytes, the JSON codec's worst case: 5,799,536 bytes).
fn config_toml(opts: &ServerOpts) -> String {
    format!(
        "# Written by `guildchat bench`.\n\
         backlog = 4096\n\
         max_online = 60000\n\
         [limits]\n\
         login_timeout_ms = 30000\n\
         outbound_queue = {}\n\
         outbound_bytes = 6291456\n\
         stall_timeout_ms = {}\n\
         socket_send_buffer = {}\n\
         [chat.world]\n\
         cooldown_ms = 0\n\
         max_chars = 1000\n\
         [admission]\n\
         max_connections = 65000\n\
         max_prelogin = 65000\n\
         max_per_ip = 65000\n\
         logins_per_ip_per_sec = 1000000\n\
         login_burst_per_ip = 1000000\n",
        opts.outbound_queue, opts.stall_timeout_ms, opts.socket_send_buffer
    )
}

/// A key ring with one key of every kind, so every token format can be
/// measured against the same server.
fn bench_keys() -> anyhow::Result<KeyRing> {
    Ok(KeyRing {
        keys: vec![
            KeyRing::generate(KeyAlg::EdDSA, "bench-ed25519")?,
            KeyRing::generate(KeyAlg::Dir, "bench-aes")?,
            KeyRing::generate(KeyAlg::Es256, "bench-es256")?,
        ],
    })
}

async fn wait_accepting(child: &mut Child, port: u16, log: &Path) -> anyhow::Result<()> {
    let until = Instant::now() + START_LIMIT;
    while Instant::now() < until {
        if let Some(status) = child.try_wait()? {
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            let tail: String = tail.lines().rev().take(20).collect::<Vec<_>>().join("\n");
            bail!("server exited at start ({status}); its log ends:\n{tail}");
        }
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("server did not accept on port {port} within {START_LIMIT:?}")
}

impl ServerProc {
    /// Starts `guildchat serve` from `exe` with a fresh data dir under
    /// `dir`.
    pub async fn guildchat(exe: &Path, dir: &Path, opts: &ServerOpts) -> anyhow::Result<Self> {
        let data = dir.join("data");
        std::fs::create_dir_all(&data)?;
        let keys_file = data.join("keys.toml");
        std::fs::write(&keys_file, bench_keys()?.to_toml_string())?;
        let config = dir.join("guildchat.toml");
        std::fs::write(&config, config_toml(opts))?;
        let port = free_port()?;
        let log = dir.join("guildchat.log");
        let mut child = Command::new(exe)
            .arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(&data)
            .arg("--config")
            .arg(&config)
            // Warnings, plus one line per slow consumer disconnected, which
            // the slow scenario counts.
            .env("RUST_LOG", "warn,guildchat_server::net::outbound=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        wait_accepting(&mut child, port, &log).await?;
        Ok(ServerProc {
            url: format!("ws://127.0.0.1:{port}"),
            pid: child.id(),
            keys_file: Some(keys_file),
            log: Some(log),
            child: Some(child),
        })
    }

    /// Starts the reference relay (`bench reference`) from `exe`.
    pub async fn reference(exe: &Path, dir: &Path, limit: Duration) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let port = free_port()?;
        let log = dir.join("reference.log");
        let mut child = Command::new(exe)
            .arg("bench")
            .arg("reference")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--limit-secs")
            .arg(limit.as_secs().max(1).to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        wait_accepting(&mut child, port, &log).await?;
        Ok(ServerProc {
            url: format!("ws://127.0.0.1:{port}"),
            pid: child.id(),
            keys_file: None,
            log: Some(log),
            child: Some(child),
        })
    }

    /// Starts the uWebSockets relay: `peer`'s interpreter running its
    /// relay script. Its pid is the interpreter's, so /proc sampling sees
    /// the whole relay, uWS included.
    pub async fn uws(peer: &UwsPeer, dir: &Path, limit: Duration) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let port = free_port()?;
        let log = dir.join("uws.log");
        let mut child = Command::new(&peer.python)
            .arg(&peer.script)
            .arg("--port")
            .arg(port.to_string())
            .arg("--limit-secs")
            .arg(limit.as_secs().max(1).to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", peer.python.display()))?;
        wait_accepting(&mut child, port, &log).await?;
        Ok(ServerProc {
            url: format!("ws://127.0.0.1:{port}"),
            pid: child.id(),
            keys_file: None,
            log: Some(log),
            child: Some(child),
        })
    }

    /// A guildchat that is already running.
    pub fn external(url: &str, pid: Option<u32>, data_dir: &Path) -> Self {
        ServerProc {
            url: url.to_owned(),
            pid,
            keys_file: Some(data_dir.join("keys.toml")),
            log: None,
            child: None,
        }
    }

    pub fn sample(&self) -> Option<Sample> {
        self.pid.and_then(procfs::sample)
    }

    /// Stops a server the bench started (SIGTERM, then SIGKILL); leaves an
    /// external one alone.
    pub async fn stop(mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        stop_child(&mut child).await;
    }
}

async fn stop_child(child: &mut Child) {
    if let Some(pid) = child.id() {
        // SAFETY: signalling a child this process started, by its pid,
        // while it has not been reaped (so the pid is still ours).
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
    }
    if tokio::time::timeout(STOP_LIMIT, child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

/// What the fleet's workers reported, merged.
#[derive(Debug)]
pub struct FleetReport {
    pub snap: Snap,
    pub steps: BTreeMap<u32, StepSnap>,
    pub latency: BTreeMap<u32, Histogram<u64>>,
    pub login: Histogram<u64>,
    pub heartbeat: Histogram<u64>,
    pub close_codes: BTreeMap<u16, u64>,
    pub refusals: BTreeMap<i32, u64>,
}

impl FleetReport {
    /// All steps' latencies together.
    pub fn all_latency(&self) -> Histogram<u64> {
        let mut h = new_histogram();
        for s in self.latency.values() {
            h.add(s).expect("same bounds everywhere");
        }
        h
    }
}

struct Worker {
    child: Child,
    stdin: ChildStdin,
}

/// The worker processes of one target, and their latest counters.
pub struct Fleet {
    workers: Vec<Worker>,
    notes: mpsc::Receiver<Note>,
    progress: Vec<(Snap, BTreeMap<u32, StepSnap>)>,
    connected: Vec<Option<f64>>,
    reports: Vec<Option<Note>>,
    byes: usize,
    pub errors: Vec<String>,
}

impl Fleet {
    /// Starts one `bench worker` per plan and hands each its plan.
    pub async fn start(exe: &Path, plans: Vec<Plan>, log_dir: &Path) -> anyhow::Result<Fleet> {
        let (tx, notes) = mpsc::channel(NOTE_QUEUE);
        let mut workers = Vec::new();
        for plan in &plans {
            let log = log_dir.join(format!("worker-{}.log", plan.worker));
            let mut child = Command::new(exe)
                .arg("bench")
                .arg("worker")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(std::fs::File::create(&log)?)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting a worker from {}", exe.display()))?;
            let stdin = child.stdin.take().expect("stdin was asked to be piped");
            let stdout = child.stdout.take().expect("stdout was asked to be piped");
            let tx = tx.clone();
            let worker = plan.worker;
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let note = serde_json::from_str(&line).unwrap_or_else(|e| Note::Error {
                        worker,
                        message: format!("unreadable note {line:?}: {e}"),
                    });
                    if tx.send(note).await.is_err() {
                        return;
                    }
                }
            });
            workers.push(Worker { child, stdin });
        }
        let n = workers.len();
        let mut fleet = Fleet {
            workers,
            notes,
            progress: vec![Default::default(); n],
            connected: vec![None; n],
            reports: vec![None; n],
            byes: 0,
            errors: Vec::new(),
        };
        for (w, plan) in plans.into_iter().enumerate() {
            fleet.send_to(w, &Cmd::Plan(Box::new(plan))).await?;
        }
        Ok(fleet)
    }

    pub fn pids(&self) -> Vec<u32> {
        self.workers.iter().filter_map(|w| w.child.id()).collect()
    }

    /// CPU seconds of all workers so far.
    pub fn cpu_s(&self) -> f64 {
        self.pids()
            .into_iter()
            .filter_map(procfs::sample)
            .map(|s| s.cpu_s)
            .sum()
    }

    async fn send_to(&mut self, w: usize, cmd: &Cmd) -> anyhow::Result<()> {
        let mut line =
            serde_json::to_vec(cmd).expect("commands are plain data that always serialize");
        line.push(b'\n');
        let stdin = &mut self.workers[w].stdin;
        stdin
            .write_all(&line)
            .await
            .with_context(|| format!("worker {w} is gone"))?;
        stdin.flush().await?;
        Ok(())
    }

    pub async fn send(&mut self, cmd: &Cmd) -> anyhow::Result<()> {
        for w in 0..self.workers.len() {
            self.send_to(w, cmd).await?;
        }
        Ok(())
    }

    fn absorb(&mut self, note: Note) {
        match note {
            Note::Progress {
                worker,
                snap,
                steps,
            } => {
                if let Some(p) = self.progress.get_mut(worker as usize) {
                    *p = (snap, steps);
                }
            }
            Note::Connected { worker, elapsed_s } => {
                if let Some(c) = self.connected.get_mut(worker as usize) {
                    *c = Some(elapsed_s);
                }
            }
            Note::Report { worker, .. } => {
                if let Some(r) = self.reports.get_mut(worker as usize) {
                    if let Note::Report { snap, steps, .. } = &note {
                        self.progress[worker as usize] = (*snap, steps.clone());
                    }
                    *r = Some(note);
                }
            }
            Note::Bye { .. } => self.byes += 1,
            Note::Error { worker, message } => {
                self.errors.push(format!("worker {worker}: {message}"));
            }
        }
    }

    /// Takes in every note that has arrived.
    pub fn pump(&mut self) {
        while let Ok(note) = self.notes.try_recv() {
            self.absorb(note);
        }
    }

    /// Processes notes until `done` holds or `limit` passes, calling `tick`
    /// about ten times a second. Returns whether `done` held.
    pub async fn wait_until(
        &mut self,
        limit: Duration,
        mut done: impl FnMut(&Fleet) -> bool,
        mut tick: impl FnMut(&Fleet),
    ) -> bool {
        let until = Instant::now() + limit;
        let mut next_tick = Instant::now();
        loop {
            self.pump();
            if done(self) {
                return true;
            }
            let now = Instant::now();
            if now >= until {
                return false;
            }
            if now >= next_tick {
                tick(self);
                next_tick = now + Duration::from_millis(100);
            }
            let wake = until.min(next_tick);
            tokio::select! {
                note = self.notes.recv() => match note {
                    Some(note) => self.absorb(note),
                    // Every reader is gone: no worker is left to wait for.
                    None => return done(self),
                },
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    /// Waits `d`, processing notes and ticking.
    pub async fn hold(&mut self, d: Duration, tick: impl FnMut(&Fleet)) {
        self.wait_until(d, |_| false, tick).await;
    }

    /// Totals of the latest progress of every worker.
    pub fn total(&self) -> Snap {
        let mut t = Snap::default();
        for (s, _) in &self.progress {
            t.add(s);
        }
        t
    }

    /// Per-step totals of the latest progress of every worker.
    pub fn steps(&self) -> BTreeMap<u32, StepSnap> {
        let mut out: BTreeMap<u32, StepSnap> = BTreeMap::new();
        for (_, steps) in &self.progress {
            for (k, v) in steps {
                out.entry(*k).or_default().add(v);
            }
        }
        out
    }

    pub fn step(&self, step: u32) -> StepSnap {
        self.steps().get(&step).copied().unwrap_or_default()
    }

    /// Whether every worker finished connecting, and the slowest one's time
    /// from Connect to its last login.
    pub fn connected(&self) -> Option<f64> {
        let mut slowest: f64 = 0.0;
        for c in &self.connected {
            slowest = slowest.max((*c)?);
        }
        Some(slowest)
    }

    /// Asks every worker for its counters and histograms and merges them.
    pub async fn report(&mut self, limit: Duration) -> anyhow::Result<FleetReport> {
        self.reports.iter_mut().for_each(|r| *r = None);
        self.send(&Cmd::Report).await?;
        let all = self
            .wait_until(limit, |f| f.reports.iter().all(Option::is_some), |_| {})
            .await;
        if !all {
            bail!("workers did not report within {limit:?}");
        }
        Ok(self.merged())
    }

    /// [`Fleet::report`] until `done` holds for the report (replies and
    /// deliveries still in flight have landed) or `limit` passes; returns
    /// the last report either way.
    pub async fn settled_report(
        &mut self,
        limit: Duration,
        done: impl Fn(&FleetReport) -> bool,
    ) -> anyhow::Result<FleetReport> {
        let until = Instant::now() + limit;
        loop {
            let rep = self.report(REPORT_LIMIT_EACH).await?;
            if done(&rep) || Instant::now() >= until {
                return Ok(rep);
            }
            self.hold(Duration::from_millis(300), |_| {}).await;
        }
    }

    fn merged(&self) -> FleetReport {
        let mut out = FleetReport {
            snap: Snap::default(),
            steps: BTreeMap::new(),
            latency: BTreeMap::new(),
            login: new_histogram(),
            heartbeat: new_histogram(),
            close_codes: BTreeMap::new(),
            refusals: BTreeMap::new(),
        };
        for r in self.reports.iter().flatten() {
            let Note::Report {
                snap,
                steps,
                latency,
                login,
                heartbeat,
                close_codes,
                refusals,
                ..
            } = r
            else {
                continue;
            };
            out.snap.add(snap);
            for (k, v) in steps {
                out.steps.entry(*k).or_default().add(v);
            }
            for (k, v) in latency {
                v.add_to(out.latency.entry(*k).or_insert_with(new_histogram));
            }
            login.add_to(&mut out.login);
            heartbeat.add_to(&mut out.heartbeat);
            for (k, v) in close_codes {
                *out.close_codes.entry(*k).or_default() += v;
            }
            for (k, v) in refusals {
                *out.refusals.entry(*k).or_default() += v;
            }
        }
        out
    }

    /// Tells every worker to close its connections and exit, and waits for
    /// them (killing any that hang). Returns their final reports.
    pub async fn close(mut self, limit: Duration) -> FleetReport {
        self.reports.iter_mut().for_each(|r| *r = None);
        let _ = self.send(&Cmd::Close).await;
        let n = self.workers.len();
        self.wait_until(limit, |f| f.byes >= n, |_| {}).await;
        let report = self.merged();
        for w in &mut self.workers {
            if tokio::time::timeout(Duration::from_secs(5), w.child.wait())
                .await
                .is_err()
            {
                let _ = w.child.kill().await;
            }
        }
        report
    }
}
