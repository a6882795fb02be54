//! [`ConnTx`]: the only way logic code reaches a client.
//!
//! It wraps the connection's bounded frame queue and a kill switch. Queuing
//! never waits: a full queue is reported to the caller, whose slow-consumer
//! policy decides what happens. The kill switch bypasses the queue, so a
//! client that stopped reading can still be told to go away.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use guildchat_protocol::{close_code, codec, pb, KickReason, MsgId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::ids::ConnId;
use crate::stats::Stats;

/// What a connection's writer task is asked to do.
#[derive(Debug)]
pub enum Outbound {
    /// Write one encoded message as a binary frame.
    Frame(Bytes),
    /// Write a close frame with this code, flush, and stop.
    Close(u16),
}

/// Why a frame could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// The queue is full: the client is not keeping up.
    Full,
    /// The connection is gone.
    Closed,
}

/// A kill request: how the writer must close, bypassing the queue.
#[derive(Debug)]
pub(crate) struct KillSwitch {
    /// `KickReason` as i32, or -1 for "close with `code` and no notice".
    reason: AtomicI32,
    code: std::sync::atomic::AtomicU16,
    pub(crate) token: CancellationToken,
}

impl KillSwitch {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(KillSwitch {
            reason: AtomicI32::new(-1),
            code: std::sync::atomic::AtomicU16::new(1000),
            token: CancellationToken::new(),
        })
    }

    /// The notice to write before the close frame, if any, and the code.
    pub(crate) fn verdict(&self) -> (Option<KickReason>, u16) {
        let reason = KickReason::try_from(self.reason.load(Ordering::Acquire)).ok();
        (reason, self.code.load(Ordering::Acquire))
    }

    fn fire(&self, reason: Option<KickReason>, code: u16) {
        // The first verdict wins: a later kill must not rewrite why a
        // connection is closing.
        if self.token.is_cancelled() {
            return;
        }
        self.code.store(code, Ordering::Release);
        self.reason
            .store(reason.map_or(-1, |r| r as i32), Ordering::Release);
        self.token.cancel();
    }
}

/// Handle to one connection's writer. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ConnTx {
    id: ConnId,
    frames: mpsc::Sender<Outbound>,
    kill: Arc<KillSwitch>,
}

/// Encodes a kick notice.
pub fn kick_notice(reason: KickReason, detail: &str) -> Bytes {
    codec::encode(&pb::ChatMessageNotifyKick {
        msghead: codec::head(MsgId::ChcNotifyKick, 0),
        reason: reason as i32,
        detail: detail.to_owned(),
    })
}

impl ConnTx {
    pub(crate) fn new(id: ConnId, frames: mpsc::Sender<Outbound>, kill: Arc<KillSwitch>) -> Self {
        ConnTx { id, frames, kill }
    }

    pub fn id(&self) -> ConnId {
        self.id
    }

    /// Queues one frame without waiting.
    pub fn try_frame(&self, frame: Bytes) -> Result<(), SendError> {
        match self.frames.try_send(Outbound::Frame(frame)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => Err(SendError::Full),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(SendError::Closed),
        }
    }

    /// Tells the client why it is being closed (a kick notice), then closes
    /// with the reason's 4xxx code. Goes through the queue so that every
    /// frame queued before it is delivered first; if the queue is full the
    /// kill switch does it instead, dropping what was queued.
    pub fn kick(&self, reason: KickReason) {
        let code = close_code::for_reason(reason);
        let notice = kick_notice(reason, "");
        let queued = self.frames.try_send(Outbound::Frame(notice)).is_ok()
            && self.frames.try_send(Outbound::Close(code)).is_ok();
        if !queued {
            self.kill.fire(Some(reason), code);
        }
    }

    /// Closes at once, skipping whatever is queued: for clients that are not
    /// reading (slow consumers) or sent something unacceptable.
    pub fn kill(&self, reason: Option<KickReason>, code: u16) {
        self.kill.fire(reason, code);
    }

    /// Queues a frame for a player; a full queue goes through
    /// [`slow_consumer`]. Returns whether the frame was queued.
    pub fn deliver(&self, frame: Bytes, stats: &Stats) -> bool {
        match self.try_frame(frame) {
            Ok(()) => true,
            Err(SendError::Full) => {
                slow_consumer(self, stats);
                false
            }
            Err(SendError::Closed) => false,
        }
    }

    /// True once the connection's writer has gone.
    pub fn is_gone(&self) -> bool {
        self.frames.is_closed()
    }
}

/// The slow-consumer policy, in one place: a client whose queue is full is
/// disconnected with SLOW_CONSUMER (the notice and close frame bypass the
/// full queue), and counted.
pub fn slow_consumer(conn: &ConnTx, stats: &Stats) {
    if !conn.kill.token.is_cancelled() {
        Stats::bump(&stats.slow_consumers);
        tracing::info!(conn = %conn.id, "slow consumer disconnected");
    }
    conn.kill(
        Some(KickReason::KickSlowConsumer),
        close_code::SLOW_CONSUMER,
    );
}
