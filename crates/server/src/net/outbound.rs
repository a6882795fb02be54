//! [`ConnTx`]: the only way logic code reaches a client, the slow-consumer
//! policy, and the one way a connection is ended.
//!
//! It wraps the connection's bounded frame queue, a byte count of what is
//! queued, and a kill switch. Queuing never waits. Every frame enters the
//! queue through [`ConnTx::try_frame`], which counts its bytes, and only a
//! [`Counted`] frame can be queued, so the writer takes off exactly what was
//! counted. When a client falls
//! behind, world and scene notifications are shed first (counted, and the
//! client is told how many); anything else that cannot be queued, or a queue
//! that has not drained for `stall_timeout`, makes it a slow consumer, which
//! is disconnected through the kill switch, bypassing the full queue.
//!
//! A connection speaks one [`Codec`], fixed by its websocket subprotocol or
//! by its first frame. Logic code always hands over protobuf; a frame for a
//! JSON connection is transcoded here, before its bytes are counted, and a
//! broadcast ([`Encoded`]) is transcoded once for all its JSON recipients.
//!
//! Every end of a connection is a [`Close`] verdict given to
//! [`ConnTx::close`]; nothing else here ends one. It must never queue a
//! frame uncounted, never wait, and never let a later verdict rewrite the
//! first.

use std::cell::OnceCell;
use std::sync::atomic::{
    AtomicBool, AtomicI32, AtomicU16, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use guildchat_protocol::{close_code, codec, json, pb, Codec, KickReason, MsgType};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::queue;
use crate::ids::ConnId;
use crate::stats::Stats;

/// What a connection's writer task is asked to do. Frames stay unboxed,
/// the rare rest is boxed (see Memory layout in ARCHITECTURE.md).
#[derive(Debug)]
pub enum Outbound {
    /// Write one encoded message: a binary frame, or a text frame on a
    /// JSON connection.
    Frame(Counted),
    /// Anything else: a ping, a close, a wake-up.
    Control(Box<Control>),
}

/// The rare things a writer is asked to do besides writing a frame.
#[derive(Debug)]
pub enum Control {
    /// Write a websocket ping with this payload: the client's pong proves
    /// it read everything queued before.
    Ping(Bytes),
    /// Write a close frame with this code, flush, and stop.
    Close(u16),
    /// Nothing to write: look at the kill and reader-gone flags. Lets the
    /// writer wait on its queue alone instead of also polling tokens (which
    /// take a lock) on every wake-up.
    Wake,
}

impl Outbound {
    fn control(control: Control) -> Self {
        Outbound::Control(Box::new(control))
    }
}

/// A frame whose bytes have been added to its connection's queued count.
/// Only [`ConnTx::try_frame`] makes one, so a frame cannot reach the queue
/// uncounted, and the writer subtracts [`Counted::len`] for each.
#[derive(Debug)]
pub struct Counted(Bytes);

impl Counted {
    /// The bytes counted for this frame.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Never true for a frame worth queuing; here because clippy asks for
    /// it beside `len`.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The encoded message, for the socket: protobuf, or JSON text on a
    /// JSON connection.
    pub fn into_bytes(self) -> Bytes {
        self.0
    }
}

/// Why a frame could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// The queue is full: the client is not keeping up.
    Full,
    /// The connection is gone.
    Closed,
}

/// How much a frame matters when the client falls behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// World and scene chat: high volume, low value; dropped first.
    Sheddable,
    /// Whispers, guild, team, system, replies, kicks: never dropped.
    Keep,
}

/// State shared by a connection's [`ConnTx`] handles and its writer.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Bytes queued and not yet written.
    pub(crate) queued_bytes: AtomicUsize,
    /// Batches written so far: the writer's progress, counted instead of
    /// timed so that no clock is read per frame.
    drains: AtomicU64,
    /// The stall rule's memory, touched only by the world's tick: `drains`
    /// as last seen, and since when (ms after `epoch`, 0: not stalled) the
    /// queue has been non-empty without a drain.
    drains_seen: AtomicU64,
    stalled_since_ms: AtomicU64,
    epoch: Instant,
    /// Sheddable frames dropped since the last shed notice, and in total.
    pub(crate) shed_pending: AtomicU32,
    pub(crate) shed_total: AtomicU64,
    /// `KickReason` as i32, or -1 for "close with `code` and no notice".
    reason: AtomicI32,
    code: AtomicU16,
    /// Set with `kill`: the writer's cheap check.
    killed: AtomicBool,
    /// The reader has finished: the writer stops too.
    reader_gone: AtomicBool,
    /// The client sent a frame since the writer's last ping tick: it is
    /// alive, and the writer skips that ping.
    heard: AtomicBool,
    /// The connection's codec: [`UNDECIDED`] until the subprotocol or the
    /// first frame decides, read as protobuf meanwhile.
    codec: AtomicU8,
    /// The kill switch. Also cancelled when the reader or the writer ends,
    /// so that the other stops too; only `killed` says a verdict was given.
    pub(crate) kill: CancellationToken,
}

impl Shared {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Shared {
            queued_bytes: AtomicUsize::new(0),
            drains: AtomicU64::new(0),
            drains_seen: AtomicU64::new(0),
            stalled_since_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            shed_pending: AtomicU32::new(0),
            shed_total: AtomicU64::new(0),
            reason: AtomicI32::new(-1),
            code: AtomicU16::new(1000),
            killed: AtomicBool::new(false),
            reader_gone: AtomicBool::new(false),
            heard: AtomicBool::new(false),
            codec: AtomicU8::new(UNDECIDED),
            kill: CancellationToken::new(),
        })
    }

    /// The writer reports progress: `n` counted bytes left the queue.
    pub(crate) fn drained(&self, n: usize) {
        self.unqueue(n);
        self.drains.fetch_add(1, Ordering::Release);
    }

    /// Takes `n` counted bytes off the queued count. Saturating: the count
    /// is exact by construction (see [`Counted`]), but a wrap would leave the
    /// connection looking congested forever, so it must not be possible.
    pub(crate) fn unqueue(&self, n: usize) {
        let _ = self
            .queued_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                Some(q.saturating_sub(n))
            });
    }

    /// Counts a dropped sheddable frame, for the next shed notice and the
    /// total. Saturating: a client that never reads decides how often this
    /// runs, and a wrapped count would tell it it missed nothing.
    fn shed_one(&self) {
        let _ = self
            .shed_pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_add(1))
            });
        let _ = self
            .shed_total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_add(1))
            });
    }

    /// Called once per world tick: how long the queue has been non-empty
    /// without the writer draining anything, to within a tick.
    fn stalled_for(&self) -> Duration {
        let drains = self.drains.load(Ordering::Acquire);
        let moved = self.drains_seen.swap(drains, Ordering::AcqRel) != drains;
        if moved || self.queued_bytes.load(Ordering::Acquire) == 0 {
            self.stalled_since_ms.store(0, Ordering::Release);
            return Duration::ZERO;
        }
        // +1: 0 means "not stalled".
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        let since = match self.stalled_since_ms.load(Ordering::Acquire) {
            0 => {
                self.stalled_since_ms.store(now, Ordering::Release);
                now
            }
            since => since,
        };
        Duration::from_millis(now.saturating_sub(since))
    }

    /// The notice to write before the close frame, if any, and the code.
    pub(crate) fn verdict(&self) -> (Option<KickReason>, u16) {
        let reason = KickReason::try_from(self.reason.load(Ordering::Acquire)).ok();
        (reason, self.code.load(Ordering::Acquire))
    }

    fn fire(&self, reason: Option<KickReason>, code: u16) {
        // The first verdict wins: a later kill must not rewrite why a
        // connection is closing, nor give one to a connection whose reader
        // or writer has already ended.
        if self.kill.is_cancelled() {
            return;
        }
        self.code.store(code, Ordering::Release);
        self.reason
            .store(reason.map_or(-1, |r| r as i32), Ordering::Release);
        self.killed.store(true, Ordering::Release);
        self.kill.cancel();
    }

    pub(crate) fn is_killed(&self) -> bool {
        self.killed.load(Ordering::Acquire)
    }

    /// The reader got a frame from the client.
    pub(crate) fn heard(&self) {
        self.heard.store(true, Ordering::Relaxed);
    }

    /// Whether the client sent a frame since the last call.
    pub(crate) fn take_heard(&self) -> bool {
        self.heard.swap(false, Ordering::Relaxed)
    }

    pub(crate) fn is_reader_gone(&self) -> bool {
        self.reader_gone.load(Ordering::Acquire)
    }

    /// The codec frames are written in (protobuf while undecided).
    pub(crate) fn codec(&self) -> Codec {
        match self.codec.load(Ordering::Acquire) {
            JSON => Codec::Json,
            _ => Codec::Protobuf,
        }
    }

    /// Fixes the codec unless it is already fixed; returns the one in force.
    /// Decided once: nothing may be queued in one codec and written in the
    /// other.
    pub(crate) fn settle_codec(&self, codec: Codec) -> Codec {
        let want = match codec {
            Codec::Protobuf => PROTOBUF,
            Codec::Json => JSON,
        };
        let _ = self
            .codec
            .compare_exchange(UNDECIDED, want, Ordering::AcqRel, Ordering::Acquire);
        self.codec()
    }
}

/// Values of [`Shared::codec`].
const UNDECIDED: u8 = 0;
const PROTOBUF: u8 = 1;
const JSON: u8 = 2;

/// Transcodes a protobuf frame for a JSON connection, counted. None only
/// for a frame the server should never have made (logged: it is a bug).
fn transcode(frame: &[u8], stats: &Stats) -> Option<Bytes> {
    Stats::bump(&stats.json_encodes);
    match json::transcode_server(frame) {
        Ok(text) => Some(text),
        Err(e) => {
            tracing::warn!(error = %e, "a frame could not be written as JSON");
            None
        }
    }
}

/// One encoded message on its way to several connections: the protobuf
/// frame, encoded once, and its JSON form, transcoded the first time a JSON
/// recipient needs it and shared by every other. So a broadcast costs one
/// encode per codec that has recipients, never one per recipient.
#[derive(Debug)]
pub struct Encoded {
    proto: Bytes,
    json: OnceCell<Option<Bytes>>,
}

impl Encoded {
    pub fn new(proto: Bytes) -> Self {
        Encoded {
            proto,
            json: OnceCell::new(),
        }
    }

    /// The frame in `codec`, sharing the buffer with every other recipient
    /// of that codec.
    fn get(&self, codec: Codec, stats: &Stats) -> Option<Bytes> {
        match codec {
            Codec::Protobuf => Some(self.proto.clone()),
            Codec::Json => self
                .json
                .get_or_init(|| transcode(&self.proto, stats))
                .clone(),
        }
    }
}

/// Why a connection ends: the one input of [`ConnTx::close`]. Each verdict
/// decides whether the client is told why (a kick notice), the close code,
/// and whether what is already queued is delivered first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// Tell the client why, behind everything already queued, then close
    /// with the reason's 4xxx code. If notice or close frame do not fit the
    /// queue, the kill switch does it instead, dropping what was queued.
    Kick(KickReason),
    /// The client is not reading: counted and logged once, then notice and
    /// close 4002 through the kill switch, bypassing the full queue. Its
    /// session lingers, so it can resume.
    SlowConsumer,
    /// The client sent a frame over the size limit: close 1009 at once,
    /// without a notice, skipping whatever is queued.
    TooBig,
    /// The reader has finished (it already cancelled the kill switch): the
    /// writer stops too, writing nothing more. The peer is gone or was
    /// already given a verdict, so there is no close code of its own.
    ReaderGone,
}

impl Close {
    /// The websocket close code this verdict sends, if it sends one.
    pub const fn code(self) -> Option<u16> {
        match self {
            Close::Kick(reason) => Some(close_code::for_reason(reason)),
            Close::SlowConsumer => Some(close_code::SLOW_CONSUMER),
            Close::TooBig => Some(close_code::TOO_BIG),
            Close::ReaderGone => None,
        }
    }

    /// The kick notice written before the close frame, if any.
    pub const fn notice(self) -> Option<KickReason> {
        match self {
            Close::Kick(reason) => Some(reason),
            Close::SlowConsumer => Some(KickReason::KickSlowConsumer),
            Close::TooBig | Close::ReaderGone => None,
        }
    }
}

/// Handle to one connection's writer. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ConnTx {
    id: ConnId,
    frames: queue::Sender<Outbound>,
    shared: Arc<Shared>,
    max_frames: usize,
    max_bytes: usize,
}

/// Encodes a kick notice.
pub fn kick_notice(reason: KickReason, detail: &str) -> Bytes {
    codec::encode(&pb::ChatMessageNotifyKick {
        msghead: codec::head(MsgType::ChcNotifyKick, 0),
        reason: reason as i32,
        detail: detail.to_owned(),
    })
}

impl ConnTx {
    pub(crate) fn new(
        id: ConnId,
        frames: queue::Sender<Outbound>,
        shared: Arc<Shared>,
        max_bytes: usize,
    ) -> Self {
        let max_frames = frames.max_capacity();
        ConnTx {
            id,
            frames,
            shared,
            max_frames,
            max_bytes,
        }
    }

    pub fn id(&self) -> ConnId {
        self.id
    }

    /// The reader got a data frame from the client: the writer's next ping
    /// is not needed (see `writer::run`).
    pub(crate) fn heard(&self) {
        self.shared.heard();
    }

    /// The codec this connection's frames are written in.
    pub fn codec(&self) -> Codec {
        self.shared.codec()
    }

    /// Fixes the connection's codec from its first frame, unless the
    /// subprotocol already did; returns the codec in force.
    pub fn settle_codec(&self, codec: Codec) -> Codec {
        self.shared.settle_codec(codec)
    }

    /// Queues one protobuf frame without waiting, within the byte bound,
    /// transcoded first on a JSON connection (one recipient, one encode).
    /// `stats` counts the transcodes.
    pub fn try_frame(&self, frame: Bytes, stats: &Stats) -> Result<(), SendError> {
        self.try_encoded(&Encoded::new(frame), stats)
    }

    /// [`ConnTx::try_frame`] for a frame shared by several recipients.
    pub fn try_encoded(&self, frame: &Encoded, stats: &Stats) -> Result<(), SendError> {
        match frame.get(self.codec(), stats) {
            Some(bytes) => self.queue(bytes),
            // Nothing the client could read: as if it were not there.
            None => Ok(()),
        }
    }

    /// Queues one frame, already in the connection's codec, without
    /// waiting, within the byte bound: the only way a frame enters the
    /// queue. Its bytes are counted before it is sent, so that several
    /// senders (world, user actor, reader) cannot together pass the bound,
    /// and taken back if it cannot be queued.
    fn queue(&self, frame: Bytes) -> Result<(), SendError> {
        let len = frame.len();
        let max = self.max_bytes;
        let counted =
            self.shared
                .queued_bytes
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |before| {
                    // An empty queue takes any one frame, so a frame larger
                    // than the bound is not refused forever.
                    match before.checked_add(len) {
                        Some(after) if after <= max || before == 0 => Some(after),
                        _ => None,
                    }
                });
        if counted.is_err() {
            return Err(SendError::Full);
        }
        match self.frames.try_send(Outbound::Frame(Counted(frame))) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.shared.unqueue(len);
                match e {
                    queue::TrySendError::Full(_) => Err(SendError::Full),
                    queue::TrySendError::Closed(_) => Err(SendError::Closed),
                }
            }
        }
    }

    /// True when the queue is past half full, in frames or bytes: the point
    /// from which sheddable traffic is dropped, keeping the rest of the room
    /// for traffic that must not be lost.
    fn congested(&self) -> bool {
        self.max_frames.saturating_sub(self.frames.len()) < self.max_frames / 2
            || self.shared.queued_bytes.load(Ordering::Acquire) > self.max_bytes / 2
    }

    /// Queues a protobuf frame for a player under the slow-consumer policy
    /// (transcoded on a JSON connection). Returns whether it was queued.
    pub fn deliver(&self, frame: Bytes, priority: Priority, stats: &Stats) -> bool {
        self.deliver_encoded(&Encoded::new(frame), priority, stats)
    }

    /// [`ConnTx::deliver`] for a frame shared by several recipients.
    pub fn deliver_encoded(&self, frame: &Encoded, priority: Priority, stats: &Stats) -> bool {
        if priority == Priority::Sheddable && self.congested() {
            self.shared.shed_one();
            Stats::bump(&stats.shed);
            stats.metrics.shed(priority);
            return false;
        }
        match self.try_encoded(frame, stats) {
            Ok(()) => true,
            Err(SendError::Full) => {
                self.close(Close::SlowConsumer, stats);
                false
            }
            Err(SendError::Closed) => false,
        }
    }

    /// Queues a delivery barrier: a ping whose pong comes back to the user
    /// actor as [`crate::user::Inbound::Pong`] with this payload.
    pub fn barrier(&self, payload: Bytes) -> bool {
        self.control(Control::Ping(payload))
    }

    /// Queues a control item. Controls carry no counted bytes: a ping's
    /// payload is a few bytes the writer does not count either.
    fn control(&self, control: Control) -> bool {
        self.frames.try_send(Outbound::control(control)).is_ok()
    }

    /// Ends the connection: the one way to, whatever the reason. The
    /// first verdict wins: once the kill switch has fired (or the reader or
    /// writer has ended), a later verdict changes neither the notice nor
    /// the code. `stats` counts slow consumers.
    pub fn close(&self, verdict: Close, stats: &Stats) {
        match verdict {
            Close::Kick(reason) => stats.metrics.kick(reason),
            Close::SlowConsumer if !self.shared.kill.is_cancelled() => {
                stats.metrics.slow_consumer_cut()
            }
            Close::TooBig => stats.metrics.too_big(),
            _ => {}
        }
        match verdict {
            Close::Kick(reason) => {
                // Through the queue, counted like every frame, so that every
                // frame queued before it is delivered first.
                let queued = self.try_frame(kick_notice(reason, ""), stats).is_ok()
                    && self.control(Control::Close(close_code::for_reason(reason)));
                if !queued {
                    self.kill(verdict);
                }
            }
            Close::SlowConsumer => {
                // The world gives this verdict from fan-out: a burst of cuts
                // writes one line a second, with how many it stands for (the
                // counter has them all).
                static LOG: crate::logs::Throttle = crate::logs::Throttle::new(1000);
                if !self.shared.kill.is_cancelled() {
                    Stats::bump(&stats.slow_consumers);
                    if let Some(more) = LOG.allow() {
                        tracing::info!(conn = %self.id, also_since_last = more, "slow consumer disconnected");
                    }
                }
                self.kill(verdict);
            }
            Close::TooBig => self.kill(verdict),
            Close::ReaderGone => {
                self.shared.reader_gone.store(true, Ordering::Release);
                let _ = self.control(Control::Wake);
            }
        }
    }

    /// Fires the kill switch with this verdict's notice and code: the
    /// writer skips whatever is queued. Only [`ConnTx::close`] calls it.
    fn kill(&self, verdict: Close) {
        // Every verdict that kills has a code; one without (the reader's
        // end) has nothing to write.
        let Some(code) = verdict.code() else {
            return;
        };
        self.shared.fire(verdict.notice(), code);
        // If the queue is full the writer is busy and checks the flag after
        // its batch; if not, this wakes it.
        let _ = self.control(Control::Wake);
    }

    /// True once the connection's writer has gone.
    pub fn is_gone(&self) -> bool {
        self.frames.is_closed()
    }

    /// (frames, bytes) waiting for the socket.
    pub fn backlog(&self) -> (usize, usize) {
        (
            self.frames.len(),
            self.shared.queued_bytes.load(Ordering::Acquire),
        )
    }

    /// Gives back what a burst left in an emptied queue. Meant for the
    /// world's once-a-second tick (see `queue::Sender::trim`).
    pub fn trim(&self) {
        self.frames.trim();
    }

    /// Applies the stall rule: a queue that has not drained for `limit` is
    /// a slow consumer. Returns whether it fired. Meant to be called once
    /// per world tick (the rule is exact to within a tick).
    pub fn check_stall(&self, limit: Duration, stats: &Stats) -> bool {
        if !self.shared.kill.is_cancelled() && self.shared.stalled_for() >= limit {
            self.close(Close::SlowConsumer, stats);
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// See Memory layout in ARCHITECTURE.md.
    #[test]
    fn an_outbound_slot_is_the_size_of_a_frame() {
        assert_eq!(
            std::mem::size_of::<Outbound>(),
            std::mem::size_of::<Bytes>()
        );
        assert_eq!(std::mem::size_of::<Outbound>(), 32);
    }

    fn conn(frames: usize, bytes: usize) -> (ConnTx, queue::Receiver<Outbound>) {
        let (tx, rx) = queue::channel(frames);
        (ConnTx::new(ConnId(1), tx, Shared::new(), bytes), rx)
    }

    /// What the writer does with a batch: take everything queued and
    /// report the counted bytes of its frames.
    fn drain(conn: &ConnTx, rx: &mut queue::Receiver<Outbound>) {
        let mut bytes = 0;
        while let Some(item) = rx.try_recv() {
            if let Outbound::Frame(frame) = item {
                bytes += frame.len();
            }
        }
        conn.shared.drained(bytes);
    }

    fn queued(conn: &ConnTx) -> usize {
        conn.shared.queued_bytes.load(Ordering::Acquire)
    }

    #[test]
    fn a_kick_notice_is_counted_like_any_frame() {
        let (conn, mut rx) = conn(8, 1024);
        conn.queue(Bytes::from_static(b"hello")).unwrap();
        conn.close(Close::Kick(KickReason::KickIdle), &Stats::default());
        assert!(queued(&conn) > 5, "the notice is counted");
        drain(&conn, &mut rx);
        assert_eq!(queued(&conn), 0);
        // A frame queued after the kick (the world still fans out until the
        // player is detached) finds an honest count, not a wrapped one.
        conn.queue(Bytes::from_static(b"late")).unwrap();
        assert_eq!(conn.backlog(), (1, 4));
        assert!(!conn.congested());
    }

    #[test]
    fn the_byte_bound_refuses_without_overflowing() {
        let (conn, mut rx) = conn(8, 10);
        // An empty queue takes one frame of any size.
        conn.queue(Bytes::from(vec![0; 64])).unwrap();
        assert_eq!(conn.queue(Bytes::from_static(b"x")), Err(SendError::Full));
        assert_eq!(queued(&conn), 64, "a refused frame leaves no trace");
        drain(&conn, &mut rx);
        conn.shared
            .queued_bytes
            .store(usize::MAX - 1, Ordering::Release);
        assert_eq!(conn.queue(Bytes::from_static(b"xyz")), Err(SendError::Full));
        // Subtracting more than is counted stops at zero.
        conn.shared.drained(usize::MAX);
        conn.shared.drained(1);
        assert_eq!(queued(&conn), 0);
    }

    #[test]
    fn a_kick_that_does_not_fit_fires_the_kill_switch() {
        let (conn, _rx) = conn(8, 16);
        conn.queue(Bytes::from(vec![0; 16])).unwrap();
        conn.close(Close::Kick(KickReason::KickIdle), &Stats::default());
        assert!(conn.shared.is_killed());
        assert_eq!(
            conn.shared.verdict(),
            (Some(KickReason::KickIdle), close_code::IDLE)
        );
        assert_eq!(queued(&conn), 16, "the notice was not queued");
    }

    #[test]
    fn shed_counts_saturate() {
        let (conn, _rx) = conn(8, 1024);
        conn.shared.shed_pending.store(u32::MAX, Ordering::Release);
        conn.shared.shed_total.store(u64::MAX, Ordering::Release);
        conn.shared.shed_one();
        assert_eq!(conn.shared.shed_pending.load(Ordering::Acquire), u32::MAX);
        assert_eq!(conn.shared.shed_total.load(Ordering::Acquire), u64::MAX);
    }

    #[test]
    fn each_verdict_has_its_code_and_notice() {
        use KickReason::*;
        for reason in [
            KickLoggedInElsewhere,
            KickShutdown,
            KickIdle,
            KickRateLimited,
        ] {
            let close = Close::Kick(reason);
            assert_eq!(close.code(), Some(close_code::for_reason(reason)));
            assert_eq!(close.notice(), Some(reason));
        }
        assert_eq!(Close::SlowConsumer.code(), Some(close_code::SLOW_CONSUMER));
        assert_eq!(Close::SlowConsumer.notice(), Some(KickSlowConsumer));
        assert_eq!(Close::TooBig.code(), Some(close_code::TOO_BIG));
        assert_eq!(Close::TooBig.notice(), None);
        assert_eq!(Close::ReaderGone.code(), None);
    }

    #[test]
    fn the_first_verdict_wins() {
        let stats = Stats::default();
        let (conn, _rx) = conn(8, 1024);
        conn.close(Close::TooBig, &stats);
        assert_eq!(conn.shared.verdict(), (None, close_code::TOO_BIG));
        conn.close(Close::SlowConsumer, &stats);
        // A kick finds the queue open, but the kill switch has fired.
        conn.close(Close::Kick(KickReason::KickShutdown), &stats);
        assert_eq!(conn.shared.verdict(), (None, close_code::TOO_BIG));
        assert_eq!(
            Stats::get(&stats.slow_consumers),
            0,
            "a connection already closing is not counted as a slow consumer"
        );
    }

    #[test]
    fn a_slow_consumer_is_counted_once_and_bypasses_the_queue() {
        let stats = Stats::default();
        let (conn, _rx) = conn(8, 1024);
        conn.queue(Bytes::from_static(b"unread")).unwrap();
        conn.close(Close::SlowConsumer, &stats);
        conn.close(Close::SlowConsumer, &stats);
        assert_eq!(Stats::get(&stats.slow_consumers), 1);
        assert!(conn.shared.is_killed());
        assert_eq!(
            conn.shared.verdict(),
            (
                Some(KickReason::KickSlowConsumer),
                close_code::SLOW_CONSUMER
            )
        );
        assert_eq!(queued(&conn), 6, "no notice was queued behind the backlog");
    }

    #[test]
    fn a_full_queue_makes_a_slow_consumer() {
        let stats = Stats::default();
        let (conn, _rx) = conn(8, 8);
        assert!(conn.deliver(Bytes::from(vec![0; 8]), Priority::Keep, &stats));
        assert!(!conn.deliver(Bytes::from_static(b"x"), Priority::Keep, &stats));
        assert_eq!(Stats::get(&stats.slow_consumers), 1);
        assert_eq!(
            conn.shared.verdict(),
            (
                Some(KickReason::KickSlowConsumer),
                close_code::SLOW_CONSUMER
            )
        );
    }

    #[test]
    fn a_shared_frame_is_transcoded_once_and_counted_in_each_codec() {
        let stats = Stats::default();
        let frame = kick_notice(KickReason::KickIdle, "x");
        let json = json::transcode_server(&frame).unwrap();
        let conns: Vec<_> = [Codec::Json, Codec::Protobuf, Codec::Json]
            .into_iter()
            .map(|codec| {
                let (c, rx) = conn(8, 1024);
                assert_eq!(c.settle_codec(codec), codec);
                // Fixed once: a later frame of the other kind changes nothing.
                assert_eq!(c.settle_codec(Codec::Protobuf), codec);
                (c, rx)
            })
            .collect();
        let shared = Encoded::new(frame.clone());
        for (c, _) in &conns {
            assert!(c.deliver_encoded(&shared, Priority::Keep, &stats));
        }
        assert_eq!(Stats::get(&stats.json_encodes), 1);
        for ((c, mut rx), want) in conns.into_iter().zip([&json, &frame, &json]) {
            assert_eq!(queued(&c), want.len(), "counted in the codec written");
            let Some(Outbound::Frame(got)) = rx.try_recv() else {
                panic!("nothing queued")
            };
            assert_eq!(&got.into_bytes(), want);
        }
        // A reply to one JSON connection is one transcode more.
        let (c, _rx) = conn(8, 1024);
        c.settle_codec(Codec::Json);
        c.try_frame(frame, &stats).unwrap();
        assert_eq!(Stats::get(&stats.json_encodes), 2);
    }

    #[test]
    fn the_readers_end_stops_the_writer_without_a_verdict() {
        let stats = Stats::default();
        let (conn, _rx) = conn(8, 1024);
        // The reader cancels the kill switch first, then says it is gone.
        conn.shared.kill.cancel();
        conn.close(Close::ReaderGone, &stats);
        assert!(conn.shared.is_reader_gone());
        assert!(!conn.shared.is_killed());
        // Nothing given after that counts.
        conn.close(Close::SlowConsumer, &stats);
        assert!(!conn.shared.is_killed());
        assert_eq!(Stats::get(&stats.slow_consumers), 0);
    }
}
