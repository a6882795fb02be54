//! Reply ordering and history pages. Chat replies wait in a per-player
//! ordered queue until the store settles them, so they keep request order
//! among themselves while the player's other requests are answered
//! meanwhile; a history page is read and answered in line.
//!
//! It owns the queue of pending replies and the rule of where a reply may
//! go. It must never write a reply to a connection other than the one that
//! asked: a reply whose connection was replaced is dropped, never
//! redirected.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{FuturesOrdered, StreamExt};
use guildchat_protocol::{codec, pb, ChatType, MsgType, ResCode};

use super::actor::UserActor;
use crate::ids::ConnId;
use crate::net::Priority;
use crate::records;

/// A reply still waiting for the store, with the connection it belongs to.
pub(super) type PendingReply = Pin<Box<dyn Future<Output = (ConnId, Bytes)> + Send + Sync>>;

/// Most chat replies a player may have waiting for commits. Past it, the
/// actor stops reading that player's requests until the oldest settles:
/// backpressure onto the player's own socket.
pub(super) const MAX_PENDING_REPLIES: usize = 64;

/// The next settled chat reply; called only while some are waiting.
pub(super) async fn next_reply(
    pending: &mut Option<Box<FuturesOrdered<PendingReply>>>,
) -> Option<(ConnId, Bytes)> {
    pending.as_mut()?.next().await
}

/// A duration for the wire, in whole milliseconds.
pub(super) fn duration_ms(d: Duration) -> u32 {
    // Round up so "1 ms left" is never reported as 0.
    d.as_micros().div_ceil(1000).min(u32::MAX as u128) as u32
}

impl UserActor {
    pub(super) fn pending_len(&self) -> usize {
        self.pending.as_ref().map_or(0, |p| p.len())
    }

    /// Writes a reply to the current connection, if any.
    pub(super) fn reply(&self, frame: Bytes) {
        if let Some(conn) = &self.conn {
            conn.deliver(frame, Priority::Keep, &self.stats);
        }
    }

    /// Writes a reply to the connection that asked for it, if it is still
    /// this session's.
    pub(super) fn reply_on(&self, asked_on: ConnId, frame: Bytes) {
        if self.conn.as_ref().is_some_and(|c| c.id() == asked_on) {
            self.reply(frame);
        }
    }

    /// Queues a reply behind those still waiting for the store.
    pub(super) fn queue_reply(&mut self, reply: PendingReply) {
        self.pending
            .get_or_insert_with(|| Box::new(FuturesOrdered::new()))
            .push_back(reply);
    }

    /// The answer to a history request.
    pub(super) async fn history_reply(&self, m: &pb::ChatMessageHistoryReq, seq: u32) -> Bytes {
        let rep = match self.history_page(m).await {
            Ok((msgs, has_more)) => pb::ChatMessageHistoryRep {
                msghead: codec::head(MsgType::ChcHistoryRep, seq),
                res: ResCode::ResOk as i32,
                msgs,
                has_more,
                ..Default::default()
            },
            Err(res) => pb::ChatMessageHistoryRep {
                msghead: codec::head(MsgType::ChcHistoryRep, seq),
                res: res as i32,
                ..Default::default()
            },
        };
        codec::encode(&rep)
    }

    /// One page of a conversation this player may read, newest first.
    async fn history_page(
        &self,
        m: &pb::ChatMessageHistoryReq,
    ) -> Result<(Vec<pb::ChatMessageNotifyChat>, bool), ResCode> {
        let Some(history) = &self.history else {
            return Err(ResCode::ResNoHistory);
        };
        let channel = ChatType::try_from(m.chattype).map_err(|_| ResCode::ResBadRequest)?;
        let conversation = self
            .world
            .history_scope(self.id, channel, m.groupid, m.peerid)
            .await?;
        let (page, has_more) = history
            .page(conversation, m.before_msg_id, m.limit)
            .await
            .map_err(|_| ResCode::ResInternal)?;
        Ok((page.iter().map(records::notification).collect(), has_more))
    }
}
