//! The delivery protocol: what the client's pongs prove. A pong to the
//! offline-whisper barrier lets the store forget exactly the whispers
//! queued before that barrier; a pong to a receipt ping confirms the live
//! whispers the world queued before it.
//!
//! It owns the barrier outstanding on the current connection and the
//! spacing of receipts passed to the world. It must never delete or
//! confirm on a pong the connection was not sent: a forged pong changes
//! nothing, and a flood of them costs the world nothing.

use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::actor::UserActor;
use crate::stats::Stats;
use crate::world::{OFFLINE_ACK, RECEIPT};

/// Least time between two receipt pongs passed to the world: the world
/// sends a receipt ping at most once a tick (one second).
const RECEIPT_SPACING: Duration = Duration::from_millis(500);

impl UserActor {
    /// A ping of ours came back. Only the barrier or receipt this
    /// connection was actually sent counts: a forged pong changes nothing.
    pub(super) async fn pong(&mut self, payload: Bytes) {
        let Ok(text) = std::str::from_utf8(&payload) else {
            return;
        };
        let Some(conn) = self.conn.as_ref().map(|c| c.id()) else {
            return;
        };
        if let Some(token) = text
            .strip_prefix(OFFLINE_ACK)
            .and_then(|t| t.parse::<u64>().ok())
        {
            // The client has every offline whisper queued before the
            // barrier: delete exactly those.
            let matches = self.offline_ack.as_ref().is_some_and(|a| a.0 == token);
            if let (true, Some(history)) = (matches, &self.history) {
                if let Some(ack) = self.offline_ack.take() {
                    let ids = ack.1;
                    let n = ids.len() as u64;
                    // In a cluster the inbox is shared, and the ids are
                    // its sequences.
                    let acked = match &self.services.cluster {
                        Some(cluster) => cluster.ack_offline(ids).await,
                        None => history.ack_offline(self.id.0, ids).await,
                    };
                    match acked {
                        Ok(()) => Stats::add(&self.stats.offline_acked, n),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot forget delivered offline whispers")
                        }
                    }
                }
            }
        } else if let Some(upto) = text
            .strip_prefix(RECEIPT)
            .and_then(|t| t.parse::<u64>().ok())
        {
            // The world sends at most one receipt ping a tick, so more pongs
            // than that are forged: they are dropped here rather than cost
            // the world a message each.
            let now = Instant::now();
            if self
                .receipt_at
                .is_none_or(|at| now.duration_since(at) >= RECEIPT_SPACING)
            {
                self.receipt_at = Some(now);
                let _ = self.world.receipt(self.id, conn, upto).await;
            }
        }
    }
}
