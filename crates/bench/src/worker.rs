//! A worker process (`guildchat bench worker`): it plays a slice of the
//! simulated players, each a task holding one real websocket, and reports
//! counters to the coordinator.
//!
//! The coordinator decides *when* things happen (connect, each fan-out step,
//! the mix, quiet, close) by writing [`Cmd`]s on stdin; the worker turns each
//! into a [`Phase`] published on a watch channel that every player task
//! follows. Players do the counting themselves as frames arrive (atomics and
//! sharded histograms), so the coordinator only ever moves totals.
//!
//! A worker never decides pass or fail, never talks to another worker, and
//! never outlives its deadline: every loop here ends by the plan's deadline
//! at the latest, and the process exits when stdin closes.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use futures_util::FutureExt;
use guildchat_auth::{Claims, KeyRing};
use guildchat_protocol::{codec, pb, ChatType, ClientMsg, MsgType, ServerMsg};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, watch, Notify, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::conn::{loopback_addr, BenchConn, ConnError, Frame};
use super::plan::{Cmd, Note, Plan, TargetKind};
use super::tally::{self, Counters, Shards, Steps};
use super::wire::{self, Tag};

/// Most frames a player handles from one wake-up before it looks at its
/// timers and the phase again.
const DRAIN_BURST: usize = 64;
/// How long one client may take to connect and log in before it counts as
/// a failure.
const CONNECT_LIMIT: Duration = Duration::from_secs(30);
/// How long a login reply may take once the request is written.
const LOGIN_LIMIT: Duration = Duration::from_secs(20);
/// How often a worker sends its counters.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// Capacity of the queue of notes to stdout; progress notes are dropped
/// (the next one carries the same totals) rather than wait.
const NOTE_QUEUE: usize = 256;
/// Most frames a sender writes between two flushes.
const SEND_BURST: u64 = 256;
/// A slow client released by SlowRead reads until the server has been quiet
/// this long.
const SLOW_QUIET: Duration = Duration::from_secs(2);
/// A reconnecting mix player waits at most this long for its outstanding
/// chat replies before it hangs up.
const RECONNECT_DRAIN: Duration = Duration::from_secs(3);
/// Upper bound on events one player handles, on top of the deadline.
const MAX_EVENTS: u64 = 1 << 40;

/// What every player task is doing now.
#[derive(Debug, Clone)]
struct Phase {
    /// Bumped on every change, so a player notices a repeated mode.
    generation: u64,
    mode: Mode,
    /// Slow clients do not read while this is set.
    slow_stopped: bool,
}

#[derive(Debug, Clone)]
enum Mode {
    /// Connected: read and heartbeat.
    Hold,
    /// Fan-out senders each send `count` lines at `rate` per second from
    /// `start`.
    Fanout {
        step: u32,
        rate: f64,
        count: u64,
        start: Instant,
    },
    /// The MMO mix until `until`.
    Mix { until: Instant },
    /// Close and exit.
    Close,
}

/// State shared by the player tasks of this worker.
struct Shared {
    plan: Plan,
    /// The server, or a cluster's nodes: player `idx` uses
    /// `targets[idx % len]`.
    targets: Vec<(String, SocketAddr)>,
    /// One login token per local player (empty for the reference).
    tokens: Vec<String>,
    counters: Counters,
    steps: Steps,
    latency: Shards,
    login: Shards,
    heartbeat: Shards,
    close_codes: Mutex<BTreeMap<u16, u64>>,
    /// Result codes of refused chat lines, and how often.
    refusals: Mutex<BTreeMap<i32, u64>>,
    phase: watch::Sender<Phase>,
    gate: Semaphore,
    connect_started: Mutex<Option<Instant>>,
    /// Microseconds after `connect_started` of the last login.
    last_login_us: AtomicU64,
    settled: Notify,
    deadline: Instant,
}

impl Shared {
    fn close_code(&self, code: Option<u16>) {
        let mut codes = self.close_codes.lock().unwrap_or_else(|e| e.into_inner());
        *codes.entry(code.unwrap_or(0)).or_default() += 1;
    }

    fn report(&self) -> Note {
        let codes = self
            .close_codes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Note::Report {
            worker: self.plan.worker,
            snap: self.counters.snap(),
            steps: self.steps.snap(),
            latency: self.latency.collect(),
            login: self.login.collect().remove(&0).unwrap_or_default(),
            heartbeat: self.heartbeat.collect().remove(&0).unwrap_or_default(),
            close_codes: codes,
            refusals: self
                .refusals
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }

    fn refused(&self, res: i32) {
        tally::bump(&self.counters.rejected);
        let mut codes = self.refusals.lock().unwrap_or_else(|e| e.into_inner());
        *codes.entry(res).or_default() += 1;
    }
}

/// A small xorshift generator: the bench needs cheap, seedable jitter, not
/// cryptographic randomness.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn between_ms(&mut self, lo: u64, hi: u64) -> Duration {
        let span = hi.saturating_sub(lo) as f64;
        Duration::from_millis(lo + (self.unit() * span) as u64)
    }

    /// Exponentially distributed with this mean (a Poisson process).
    fn exp(&mut self, mean_s: f64) -> Duration {
        let u = self.unit().max(1e-12);
        Duration::from_secs_f64((-u.ln() * mean_s).min(1e6))
    }
}

fn unix_ms() -> u64 {
    wire::now_us() / 1000
}

/// Runs a worker: reads its plan and commands from stdin until Close, EOF
/// or the deadline.
pub async fn run() -> anyhow::Result<()> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let first = lines.next_line().await?.context("no plan on stdin")?;
    let Cmd::Plan(plan) = serde_json::from_str(&first).context("first line is not a plan")? else {
        bail!("first line is not a plan");
    };
    let plan = *plan;
    let targets = plan
        .url
        .split(',')
        .map(|url| {
            let addr = loopback_addr(url).map_err(anyhow::Error::msg)?;
            Ok((url.to_owned(), addr))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let tokens = mint_tokens(&plan)?;
    let left = plan.deadline_unix_ms.saturating_sub(unix_ms());
    let deadline = Instant::now() + Duration::from_millis(left);
    let (phase, _) = watch::channel(Phase {
        generation: 0,
        mode: Mode::Hold,
        slow_stopped: false,
    });
    let shared = Arc::new(Shared {
        gate: Semaphore::new(plan.concurrency.max(1)),
        plan,
        targets,
        tokens,
        counters: Counters::default(),
        steps: Steps::default(),
        latency: Shards::default(),
        login: Shards::default(),
        heartbeat: Shards::default(),
        close_codes: Mutex::new(BTreeMap::new()),
        refusals: Mutex::new(BTreeMap::new()),
        phase,
        connect_started: Mutex::new(None),
        last_login_us: AtomicU64::new(0),
        settled: Notify::new(),
        deadline,
    });
    let worker = shared.plan.worker;

    let (notes, notes_rx) = mpsc::channel::<Note>(NOTE_QUEUE);
    let writer = tokio::spawn(write_notes(notes_rx));
    let progress = tokio::spawn(send_progress(shared.clone(), notes.clone()));
    let mut players = JoinSet::new();

    loop {
        let line = tokio::select! {
            l = lines.next_line() => l,
            _ = tokio::time::sleep_until(deadline) => Ok(None),
        };
        let cmd = match line {
            Ok(Some(line)) => match serde_json::from_str::<Cmd>(&line) {
                Ok(cmd) => cmd,
                Err(e) => {
                    let _ = notes
                        .send(Note::Error {
                            worker,
                            message: format!("bad command {line:?}: {e}"),
                        })
                        .await;
                    continue;
                }
            },
            // EOF, a read error or the deadline: the coordinator is gone or
            // out of time; wind down.
            _ => Cmd::Close,
        };
        match cmd {
            Cmd::Plan(_) => {}
            Cmd::Connect => {
                start_connecting(&shared, &mut players, notes.clone());
            }
            Cmd::Fanout { step, rate, secs } => {
                let senders = shared.plan.senders.len().max(1) as f64;
                let per_sender = rate / senders;
                let count = (per_sender * secs).round() as u64;
                set_mode(
                    &shared,
                    Mode::Fanout {
                        step,
                        rate: per_sender,
                        count,
                        start: Instant::now(),
                    },
                );
            }
            Cmd::Mix { secs } => set_mode(
                &shared,
                Mode::Mix {
                    until: Instant::now() + Duration::from_secs_f64(secs),
                },
            ),
            Cmd::Quiet => set_mode(&shared, Mode::Hold),
            Cmd::SlowStop => set_slow(&shared, true),
            Cmd::SlowRead => set_slow(&shared, false),
            Cmd::Report => {
                let _ = notes.send(shared.report()).await;
            }
            Cmd::Close => break,
        }
    }

    set_mode(&shared, Mode::Close);
    // Players close politely within a second each, all at once.
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while players.join_next().await.is_some() {}
    })
    .await;
    players.abort_all();
    progress.abort();
    let _ = notes.send(shared.report()).await;
    let _ = notes.send(Note::Bye { worker }).await;
    drop(notes);
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
    Ok(())
}

fn set_mode(shared: &Shared, mode: Mode) {
    shared.phase.send_modify(|p| {
        p.generation += 1;
        p.mode = mode;
    });
}

fn set_slow(shared: &Shared, stopped: bool) {
    shared.phase.send_modify(|p| {
        p.generation += 1;
        p.slow_stopped = stopped;
    });
}

/// Mints every local player's token up front, so that minting is never
/// part of a measured login.
fn mint_tokens(plan: &Plan) -> anyhow::Result<Vec<String>> {
    if plan.target.relay() {
        return Ok(Vec::new());
    }
    let path = plan
        .keys_file
        .as_ref()
        .context("guildchat needs a key ring to mint tokens from")?;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let ring = KeyRing::from_toml_str(&text)?;
    let signer = plan.token.signer(&ring).map_err(anyhow::Error::msg)?;
    let now = (unix_ms() / 1000) as i64;
    let l = &plan.layout;
    (plan.first..plan.first + plan.count)
        .map(|idx| {
            let claims = Claims {
                user_id: l.user(idx),
                name: l.name(idx),
                exp: now + 3 * 3600,
                guild: l.guild(idx),
                team: l.team(idx),
                scene: l.scene(idx),
                iat: Some(now),
                nbf: None,
                aud: vec![plan.audience.clone()],
            };
            signer.try_mint(&claims).map_err(anyhow::Error::from)
        })
        .collect()
}

/// The only writer of stdout: one JSON note per line.
async fn write_notes(mut rx: mpsc::Receiver<Note>) {
    let mut out = tokio::io::stdout();
    while let Some(note) = rx.recv().await {
        let mut line =
            serde_json::to_vec(&note).expect("notes are plain data that always serialize");
        line.push(b'\n');
        if out.write_all(&line).await.is_err() || out.flush().await.is_err() {
            // The coordinator is gone; nobody is left to tell.
            return;
        }
    }
}

async fn send_progress(shared: Arc<Shared>, notes: mpsc::Sender<Note>) {
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    while Instant::now() < shared.deadline {
        tick.tick().await;
        let _ = notes.try_send(Note::Progress {
            worker: shared.plan.worker,
            snap: shared.counters.snap(),
            steps: shared.steps.snap(),
        });
    }
}

fn start_connecting(shared: &Arc<Shared>, players: &mut JoinSet<()>, notes: mpsc::Sender<Note>) {
    {
        let mut started = shared
            .connect_started
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if started.is_some() {
            return;
        }
        *started = Some(Instant::now());
    }
    let plan = &shared.plan;
    for local in 0..plan.count {
        players.spawn(player(shared.clone(), plan.first + local, local as usize));
    }
    // Tells the coordinator once every player has an outcome.
    let shared = shared.clone();
    tokio::spawn(async move {
        let all = u64::from(shared.plan.count);
        while shared.counters.settled.load(Ordering::Acquire) < all {
            tokio::select! {
                _ = shared.settled.notified() => {}
                // Notify can miss a wake-up between the load and the
                // await; the poll bounds that.
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            if Instant::now() >= shared.deadline {
                return;
            }
        }
        let elapsed_s = shared.last_login_us.load(Ordering::Acquire) as f64 / 1e6;
        let _ = notes
            .send(Note::Connected {
                worker: shared.plan.worker,
                elapsed_s,
            })
            .await;
    });
}

/// One simulated player, from connect to close.
async fn player(shared: Arc<Shared>, idx: u32, local: usize) {
    let slow = shared.plan.is_slow(idx);
    let conn = connect(&shared, idx, 0, local, slow, 0, true).await;
    tally::bump(&shared.counters.settled);
    shared.settled.notify_one();
    let Some((conn, rep)) = conn else {
        return;
    };
    // The login reply's cursor is where a resume starts if this player
    // hangs up before any notification reaches it; 0 would ask for no
    // resume at all, and whatever came meanwhile would be lost.
    let cursor = rep.map_or(0, |r| r.last_msg_id);
    let phase = shared.phase.subscribe();
    let mut p = Player {
        sender_slot: shared.plan.sender_slot(idx),
        last_seq: vec![0; shared.plan.senders.len()],
        rng: Rng::new(shared.plan.layout.user(idx) ^ u64::from(shared.plan.layout.ip_salt) << 56),
        shared,
        idx,
        local,
        slow,
        conn: Some(conn),
        last_msg_id: cursor,
        moves: 0,
        replay_left: 0,
        my_seq: 0,
        pending: VecDeque::new(),
        generation: u64::MAX,
        step_sent: 0,
        mix: None,
        saw_kick: false,
    };
    p.run(phase).await;
}

/// Connects and (for guildchat) logs in, resuming after `last_msg_id` when
/// it is not 0, and counts the outcome. `first` marks the player's first
/// login, the one whose time is measured. Returns the connection and the
/// login reply. `moves`: how many times the player has moved to the next
/// target.
async fn connect(
    shared: &Shared,
    idx: u32,
    moves: u32,
    local: usize,
    slow: bool,
    last_msg_id: u64,
    first: bool,
) -> Option<(BenchConn, Option<pb::ChatMessageLoginRep>)> {
    let plan = &shared.plan;
    let permit = shared
        .gate
        .acquire()
        .await
        .expect("the gate is never closed");
    let t0 = Instant::now();
    let handshake_done = std::sync::atomic::AtomicBool::new(false);
    let attempt = async {
        let recv_buffer = slow.then_some(plan.slow_recv_buffer);
        // Player `idx` starts on target `idx mod n`, and each move
        // (`mix --roam`) takes it to the next.
        let at = (idx as usize + moves as usize) % shared.targets.len();
        let (url, addr) = &shared.targets[at];
        let mut conn =
            BenchConn::connect(url, *addr, Some(plan.layout.source_ip(idx)), recv_buffer).await?;
        handshake_done.store(true, Ordering::Relaxed);
        tally::bump(&shared.counters.connect_ok);
        let rep = match plan.target {
            TargetKind::Guildchat => Some(
                conn.login(&shared.tokens[local], last_msg_id, LOGIN_LIMIT)
                    .await?,
            ),
            TargetKind::Reference | TargetKind::Uws => None,
        };
        Ok::<_, ConnError>((conn, rep))
    };
    let outcome = tokio::time::timeout(CONNECT_LIMIT, attempt)
        .await
        .unwrap_or(Err(ConnError::Timeout));
    drop(permit);
    let c = &shared.counters;
    if outcome.is_err() && !handshake_done.load(Ordering::Relaxed) {
        tally::bump(&c.connect_fail);
        return None;
    }
    match outcome {
        Ok(ok) => {
            // The reference has no login: a finished handshake is its
            // "logged in", so both targets count ready players alike.
            tally::bump(&c.login_ok);
            if first {
                shared.login.record(idx, 0, t0.elapsed().as_micros() as u64);
                let started = *shared
                    .connect_started
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if let Some(s) = started {
                    let us = s.elapsed().as_micros() as u64;
                    shared.last_login_us.fetch_max(us, Ordering::AcqRel);
                }
            }
            Some(ok)
        }
        Err(_) => {
            tally::bump(&c.login_fail);
            None
        }
    }
}

/// Timers of a player in the mix.
struct MixTimers {
    until: Instant,
    guild: Instant,
    team: Instant,
    scene: Instant,
    whisper: Instant,
    world: Instant,
    reconnect: Instant,
    /// Set once a reconnect is due: no new lines, and hang up when the
    /// replies are in or at this instant.
    hang_up_by: Option<Instant>,
}

/// Duplicates a worker describes in its log; the rest are only counted.
const DUPS_LOGGED: u64 = 10;

struct Player {
    shared: Arc<Shared>,
    idx: u32,
    local: usize,
    slow: bool,
    conn: Option<BenchConn>,
    /// The newest msg_id received: the resume cursor, and the duplicate
    /// check (per connection, msg_ids only increase).
    last_msg_id: u64,
    /// Reconnects that moved to the next target (`mix --roam`).
    moves: u32,
    /// Notifications still to come from the replay after a resume; they
    /// count as received but carry no live latency.
    replay_left: u32,
    /// For each fan-out sender, the newest of its sequence numbers seen.
    last_seq: Vec<u64>,
    sender_slot: Option<usize>,
    my_seq: u64,
    /// Chat requests awaiting their reply: (seq, step, audience).
    pending: VecDeque<(u32, u32, u64)>,
    generation: u64,
    /// Lines sent in the current fan-out step.
    step_sent: u64,
    mix: Option<MixTimers>,
    rng: Rng,
    /// A kick notice arrived (slow clients count it when they close).
    saw_kick: bool,
}

/// Far enough in the future to mean "not scheduled".
fn never() -> Instant {
    Instant::now() + Duration::from_secs(86_400)
}

impl Player {
    fn c(&self) -> &Counters {
        &self.shared.counters
    }

    async fn run(&mut self, mut phase_rx: watch::Receiver<Phase>) {
        let deadline = self.shared.deadline;
        let hb_every = Duration::from_millis(self.shared.plan.heartbeat_ms.max(100));
        let mut hb_due = Instant::now() + self.rng.between_ms(0, hb_every.as_millis() as u64);
        let mut was_stopped = false;
        for _ in 0..MAX_EVENTS {
            let phase = phase_rx.borrow_and_update().clone();
            if phase.generation != self.generation {
                self.generation = phase.generation;
                self.enter(&phase.mode);
            }
            if matches!(phase.mode, Mode::Close) || Instant::now() >= deadline {
                break;
            }
            let stopped = self.slow && phase.slow_stopped;
            if was_stopped && !stopped {
                // Released: read what piled up, see how the server dealt
                // with us, and leave.
                self.drain_slow().await;
                break;
            }
            was_stopped = stopped;
            let now = Instant::now();
            let mut due = if stopped { never() } else { hb_due };
            if !stopped {
                if let Some(t) = self.send_due(&phase.mode) {
                    due = due.min(t);
                }
            }
            if due <= now {
                if hb_due <= now {
                    hb_due = now + hb_every;
                    if self.heartbeat().await.is_err() {
                        self.lost_connection(None);
                        break;
                    }
                }
                match self.act(&phase.mode, now).await {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(_) => {
                        self.lost_connection(None);
                        break;
                    }
                }
                continue;
            }
            // The connection is only taken while reconnecting, which `act`
            // finishes before returning.
            let conn = self.conn.as_mut().expect("connected between acts");
            tokio::select! {
                changed = phase_rx.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                frame = conn.next_frame(), if !stopped => {
                    // Then whatever else is already buffered, without
                    // building this select again for each frame: several
                    // frames often arrive in one read.
                    let mut next = Some(frame);
                    let mut handled = 0;
                    let mut over = false;
                    while let Some(frame) = next.take() {
                        match frame {
                            Ok(Frame::Closed(code)) => {
                                self.lost_connection(code);
                                over = true;
                            }
                            Ok(frame) => self.on_frame(frame),
                            Err(_) => {
                                self.lost_connection(None);
                                over = true;
                            }
                        }
                        handled += 1;
                        if !over && handled < DRAIN_BURST {
                            next = self.conn.as_mut().and_then(|c| c.next_frame().now_or_never());
                        }
                    }
                    if over {
                        break;
                    }
                }
                _ = tokio::time::sleep_until(due) => {}
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        if let Some(conn) = self.conn.take() {
            conn.close(Duration::from_secs(1)).await;
        }
    }

    /// A new phase began.
    fn enter(&mut self, mode: &Mode) {
        self.step_sent = 0;
        match mode {
            Mode::Mix { until } => {
                let plan = &self.shared.plan;
                let mix = plan.mix;
                let now = Instant::now();
                let max = mix.period_max_ms;
                let world_mean = f64::from(plan.layout.clients) / mix.world_per_s.max(1e-9);
                let reconnect_mean = 60.0 / mix.reconnect_per_min.max(1e-9);
                // The first line of each kind comes anywhere in one full
                // period, so the load is steady from the start.
                self.mix = Some(MixTimers {
                    until: *until,
                    guild: now + self.rng.between_ms(0, max),
                    team: now + self.rng.between_ms(0, max),
                    scene: now + self.rng.between_ms(0, max),
                    whisper: now + self.rng.between_ms(0, max),
                    world: now + self.rng.exp(world_mean),
                    reconnect: now + self.rng.exp(reconnect_mean),
                    hang_up_by: None,
                });
            }
            _ => {
                if let Some(m) = &mut self.mix {
                    // Quiet: finish a reconnect in progress, start no more.
                    m.until = Instant::now();
                }
            }
        }
    }

    /// When this player next has something to send, if ever.
    fn send_due(&self, mode: &Mode) -> Option<Instant> {
        match mode {
            Mode::Fanout {
                rate, count, start, ..
            } if self.sender_slot.is_some() && self.step_sent < *count => {
                Some(*start + Duration::from_secs_f64(self.step_sent as f64 / rate.max(1e-9)))
            }
            _ => {
                let m = self.mix.as_ref()?;
                if let Some(by) = m.hang_up_by {
                    return Some(if self.pending.is_empty() {
                        Instant::now()
                    } else {
                        by
                    });
                }
                if Instant::now() >= m.until {
                    return None;
                }
                Some(
                    m.guild
                        .min(m.team)
                        .min(m.scene)
                        .min(m.whisper)
                        .min(m.world)
                        .min(m.reconnect),
                )
            }
        }
    }

    /// Does whatever is due. Ok(false) ends the player.
    async fn act(&mut self, mode: &Mode, now: Instant) -> Result<bool, ConnError> {
        if let Mode::Fanout {
            step,
            rate,
            count,
            start,
        } = mode
        {
            if self.sender_slot.is_some() && self.step_sent < *count {
                let elapsed = now.saturating_duration_since(*start).as_secs_f64();
                let due = ((elapsed * rate) as u64 + 1).min(*count);
                let n = due.saturating_sub(self.step_sent).min(SEND_BURST);
                self.send_fanout(*step, n).await?;
            }
            return Ok(true);
        }
        let Some(m) = self.mix.as_mut() else {
            return Ok(true);
        };
        if let Some(by) = m.hang_up_by {
            if self.pending.is_empty() || now >= by {
                return self.reconnect().await;
            }
            return Ok(true);
        }
        if now >= m.until {
            return Ok(true);
        }
        if now >= m.reconnect {
            m.hang_up_by = Some(now + RECONNECT_DRAIN);
            return Ok(true);
        }
        let plan = &self.shared.plan;
        let l = plan.layout;
        let (lo, hi) = (plan.mix.period_min_ms, plan.mix.period_max_ms);
        let world_mean = f64::from(l.clients) / plan.mix.world_per_s.max(1e-9);
        let idx = self.idx;
        let mut lines: Vec<(ChatType, u64, u64)> = Vec::with_capacity(5);
        if now >= m.guild {
            m.guild = now + self.rng.between_ms(lo, hi);
            lines.push((ChatType::ChatGuild, 0, l.guild_members(idx)));
        }
        if now >= m.team {
            m.team = now + self.rng.between_ms(lo, hi);
            lines.push((ChatType::ChatTeam, 0, l.team_members(idx)));
        }
        if now >= m.scene {
            m.scene = now + self.rng.between_ms(lo, hi);
            lines.push((ChatType::ChatNormal, 0, l.scene_members(idx)));
        }
        if now >= m.whisper {
            m.whisper = now + self.rng.between_ms(lo, hi);
            if l.clients > 1 {
                let mut other =
                    (idx + 1 + (self.rng.next() % u64::from(l.clients - 1)) as u32) % l.clients;
                // Against a cluster (client i on node i mod n) a whisper
                // always crosses nodes, so that its latency is the bus's.
                let nodes = self.shared.targets.len() as u32;
                while nodes > 1 && l.clients > nodes && other % nodes == idx % nodes {
                    other = (other + 1) % l.clients;
                }
                // The target, and the echo to the sender.
                lines.push((ChatType::ChatPrivate, l.user(other), 2));
            }
        }
        if now >= m.world {
            m.world = now + self.rng.exp(world_mean);
            lines.push((ChatType::ChatWorld, 0, u64::from(l.clients)));
        }
        // `mix` has no steps: the tag's step names the channel instead, so
        // latency can be reported per channel.
        for (channel, target, audience) in lines {
            self.send_chat(channel, target, channel as u32, audience)
                .await?;
        }
        self.conn
            .as_mut()
            .expect("only taken while reconnecting, finished before this")
            .flush()
            .await?;
        Ok(true)
    }

    /// Writes one chat request (guildchat) without flushing.
    async fn send_chat(
        &mut self,
        channel: ChatType,
        target: u64,
        step: u32,
        audience: u64,
    ) -> Result<(), ConnError> {
        self.my_seq += 1;
        let tag = Tag {
            step,
            sender: self.idx,
            seq: self.my_seq,
            sent_us: wire::now_us(),
        };
        let text = wire::write_text(&tag, self.shared.plan.text_len);
        let conn = self.conn.as_mut().expect("only taken while reconnecting");
        let seq = conn.next_seq();
        let req = ClientMsg::Chat(pb::ChatMessageChatReq {
            msghead: codec::head(MsgType::CchChatReq, seq),
            chattype: channel as i32,
            context: text,
            targetid: target,
            targetname: String::new(),
            client_msg_id: 0,
        });
        conn.feed(Message::Binary(req.encode())).await?;
        self.pending.push_back((seq, step, audience));
        tally::bump(&self.shared.counters.sent);
        tally::bump(&self.shared.steps.get(step).sent);
        Ok(())
    }

    /// Sends `n` fan-out lines and flushes once.
    async fn send_fanout(&mut self, step: u32, n: u64) -> Result<(), ConnError> {
        let target = self.shared.plan.target;
        let text_len = self.shared.plan.text_len;
        for _ in 0..n {
            match target {
                TargetKind::Guildchat => {
                    // The audience of a world line is counted by the
                    // coordinator, which knows how many players are on.
                    self.send_chat(ChatType::ChatWorld, 0, step, 0).await?;
                }
                TargetKind::Reference | TargetKind::Uws => {
                    self.my_seq += 1;
                    let tag = Tag {
                        step,
                        sender: self.idx,
                        seq: self.my_seq,
                        sent_us: wire::now_us(),
                    };
                    let frame = wire::reference_frame(&tag, text_len);
                    self.conn
                        .as_mut()
                        .expect("the reference never reconnects")
                        .feed(Message::Binary(frame))
                        .await?;
                    tally::bump(&self.shared.counters.sent);
                    tally::bump(&self.shared.steps.get(step).sent);
                }
            }
            self.step_sent += 1;
        }
        self.conn
            .as_mut()
            .expect("only taken while reconnecting")
            .flush()
            .await?;
        if target.relay() {
            // The reference answers nothing: a flushed frame is accepted.
            tally::add(&self.shared.counters.acked, n);
            tally::add(&self.shared.steps.get(step).acked, n);
        }
        Ok(())
    }

    async fn heartbeat(&mut self) -> Result<(), ConnError> {
        let now = wire::now_us();
        let msg = match self.shared.plan.target {
            // client_time_ms is echoed verbatim; the bench puts microseconds
            // in it for a finer round-trip time.
            TargetKind::Guildchat => Message::Binary(
                ClientMsg::Heartbeat(pb::ChatMessageHeartbeatReq {
                    msghead: codec::head(MsgType::CchHeartbeatReq, 0),
                    client_time_ms: now,
                })
                .encode(),
            ),
            TargetKind::Reference | TargetKind::Uws => {
                Message::Ping(Bytes::copy_from_slice(&now.to_le_bytes()))
            }
        };
        tally::bump(&self.shared.counters.heartbeats);
        match self.conn.as_mut() {
            Some(conn) => conn.send(msg).await,
            None => Ok(()),
        }
    }

    /// Hangs up, waits a little like a player on a flaky network, and logs
    /// in again resuming after the last notification received.
    async fn reconnect(&mut self) -> Result<bool, ConnError> {
        if !self.pending.is_empty() {
            // Replies that never came: the bench cannot know whether those
            // lines went out, so they are counted as refused (code -1).
            for _ in self.pending.drain(..) {
                self.shared.refused(-1);
            }
        }
        if let Some(conn) = self.conn.take() {
            conn.close(Duration::from_millis(500)).await;
        }
        let pause = self.rng.between_ms(100, 500);
        tokio::time::sleep(pause).await;
        let shared = self.shared.clone();
        if shared.plan.mix.roam {
            self.moves = self.moves.wrapping_add(1);
        }
        let Some((conn, rep)) = connect(
            &shared,
            self.idx,
            self.moves,
            self.local,
            self.slow,
            self.last_msg_id,
            false,
        )
        .await
        else {
            return Ok(false);
        };
        self.conn = Some(conn);
        tally::bump(&shared.counters.reconnects);
        if let Some(rep) = rep {
            self.replay_left = rep.replayed;
            if rep.replay_gap {
                tally::bump(&shared.counters.replay_gaps);
                tally::add(&shared.counters.missed, u64::from(rep.missed));
            }
        }
        let (lo, hi) = (shared.plan.mix.period_min_ms, shared.plan.mix.period_max_ms);
        let reconnect_mean = 60.0 / shared.plan.mix.reconnect_per_min.max(1e-9);
        if let Some(m) = self.mix.as_mut() {
            m.hang_up_by = None;
            let now = Instant::now();
            m.reconnect = now + self.rng.exp(reconnect_mean);
            // Lines that fell due while away wait a fresh period.
            for t in [&mut m.guild, &mut m.team, &mut m.scene, &mut m.whisper] {
                if *t <= now {
                    *t = now + self.rng.between_ms(lo, hi);
                }
            }
        }
        Ok(true)
    }

    fn lost_connection(&mut self, code: Option<u16>) {
        self.shared.close_code(code);
        let phase = self.shared.phase.borrow().mode.clone();
        if !matches!(phase, Mode::Close) {
            tally::bump(&self.c().closed);
        }
        self.conn = None;
    }

    fn on_frame(&mut self, frame: Frame) {
        match frame {
            Frame::Binary(b) => self.on_binary(&b),
            Frame::Pong(p) => {
                if let Ok(bytes) = <[u8; 8]>::try_from(&p[..]) {
                    let sent = u64::from_le_bytes(bytes);
                    self.heartbeat_rep(sent);
                }
            }
            Frame::Closed(_) => {}
        }
    }

    fn heartbeat_rep(&self, sent_us: u64) {
        tally::bump(&self.c().heartbeat_reps);
        let rtt = wire::now_us().saturating_sub(sent_us);
        self.shared.heartbeat.record(self.idx, 0, rtt);
    }

    fn on_binary(&mut self, b: &Bytes) {
        let msgid = codec::peek_msgid(b).unwrap_or(0);
        if msgid == MsgType::ChcNotifyChat as u32 {
            self.on_notify(b);
            return;
        }
        let c = &self.shared.counters;
        match codec::decode_server(b) {
            Ok(ServerMsg::ChatRep(rep)) => {
                let seq = rep.msghead.map_or(0, |h| h.seq);
                let Some((want, step, audience)) = self.pending.pop_front() else {
                    tally::bump(&c.bad_frames);
                    return;
                };
                if want != seq {
                    tally::bump(&c.bad_frames);
                }
                if rep.res == guildchat_protocol::ResCode::ResOk as i32 {
                    tally::bump(&c.acked);
                    tally::bump(&self.shared.steps.get(step).acked);
                    tally::add(&c.expected, audience);
                } else {
                    self.shared.refused(rep.res);
                }
            }
            Ok(ServerMsg::HeartbeatRep(rep)) => self.heartbeat_rep(rep.client_time_ms),
            Ok(ServerMsg::Shed(s)) => {
                let counter = if self.slow { &c.slow_shed } else { &c.shed };
                tally::add(counter, u64::from(s.count));
            }
            // A slow client's kick is counted once, when it is closed.
            Ok(ServerMsg::Kick(_)) if self.slow => self.saw_kick = true,
            Ok(ServerMsg::Kick(_)) => tally::bump(&c.kicked),
            _ => tally::bump(&c.bad_frames),
        }
    }

    fn on_notify(&mut self, b: &[u8]) {
        let shared = &self.shared;
        let c = &shared.counters;
        let Some(note) = wire::scan_notify(b) else {
            tally::bump(&c.bad_frames);
            return;
        };
        let tag = wire::parse_text(note.text);
        let step = tag.map_or(0, |t| t.step);
        let mut dup = false;
        if shared.plan.target == TargetKind::Guildchat {
            if note.msg_id <= self.last_msg_id {
                dup = true;
            } else {
                self.last_msg_id = note.msg_id;
            }
        }
        if let Some(t) = tag {
            if let Some(slot) = shared.plan.sender_slot(t.sender) {
                if t.seq <= self.last_seq[slot] {
                    dup = true;
                } else {
                    self.last_seq[slot] = t.seq;
                }
            }
        }
        if self.slow {
            tally::bump(&c.slow_received);
            return;
        }
        if dup {
            // The first few, in the worker's log, to tell a repeated id
            // from a sender's line out of order.
            if tally::bump_below(&c.dup, DUPS_LOGGED) {
                eprintln!(
                    "duplicate or out of order: player {} got msg_id {} after {} (sender {:?}, seq {:?}, replay left {}, moves {})",
                    self.idx,
                    note.msg_id,
                    self.last_msg_id,
                    tag.map(|t| t.sender),
                    tag.map(|t| t.seq),
                    self.replay_left,
                    self.moves,
                );
            }
            tally::bump(&shared.steps.get(step).dup);
            return;
        }
        tally::bump(&c.received);
        tally::bump(&shared.steps.get(step).received);
        if self.replay_left > 0 {
            self.replay_left -= 1;
            tally::bump(&c.replayed);
            return;
        }
        if let Some(t) = tag {
            let latency = wire::now_us().saturating_sub(t.sent_us);
            shared.latency.record(self.idx, step, latency);
        }
    }

    fn slow_closed(&mut self, code: Option<u16>) {
        let c = &self.shared.counters;
        if self.saw_kick || code == Some(guildchat_protocol::close_code::SLOW_CONSUMER) {
            tally::bump(&c.slow_kicked);
        } else {
            tally::bump(&c.slow_dropped);
        }
        self.shared.close_code(code);
        self.conn = None;
    }

    /// A released slow client reads until the server goes quiet or closes
    /// it, counting what it got and how it was treated.
    async fn drain_slow(&mut self) {
        let until = (Instant::now() + Duration::from_secs(30)).min(self.shared.deadline);
        while Instant::now() < until {
            let Some(conn) = self.conn.as_mut() else {
                break;
            };
            match tokio::time::timeout(SLOW_QUIET, conn.next_frame()).await {
                Ok(Ok(Frame::Closed(code))) => {
                    self.slow_closed(code);
                    break;
                }
                Ok(Ok(frame)) => self.on_frame(frame),
                Ok(Err(_)) => {
                    self.slow_closed(None);
                    break;
                }
                Err(_) => break,
            }
        }
        tally::bump(&self.shared.counters.slow_done);
    }
}
