//! The private user actor: its state, its run loop, taking and losing a
//! connection, the end at shutdown, and dispatching each request to the
//! job that handles it.
//!
//! It owns the session's state for the actor's whole life and nothing
//! outside `user` ever sees it. It must never wait on anything but the
//! world, the store and its own inputs, and never write to a connection
//! other than the one attached (replies go through [`ConnTx`]).

use std::sync::Arc;

use futures_util::stream::FuturesOrdered;
use guildchat_protocol::{codec, pb, ClientMsg, KickReason, MsgType, ResCode, UNMASKABLE};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::debug;

use super::chat::{RecentSends, CHANNELS};
use super::rates::{rate_limited_reply, Class, Rates, Verdict};
use super::replies::{next_reply, PendingReply, MAX_PENDING_REPLIES};
use super::{heartbeat_reply, Attach, Handoff, Inbound, Services, UserMsg};
use crate::config::Config;
use crate::history::HistoryHandle;
use crate::ids::UserId;
use crate::net::{Close, ConnTx};
use crate::stats::Stats;
use crate::world::WorldHandle;

pub(super) struct UserActor {
    pub(super) history: Option<HistoryHandle>,
    pub(super) id: UserId,
    pub(super) conn: Option<ConnTx>,
    inbound: Option<mpsc::Receiver<Box<Inbound>>>,
    mailbox: mpsc::Receiver<Box<UserMsg>>,
    handoff: Arc<Handoff>,
    pub(super) world: WorldHandle,
    pub(super) config: Arc<Config>,
    pub(super) stats: Arc<Stats>,
    mask: u32,
    /// Chat replies waiting for the store, in request order, each tagged
    /// with the connection that asked: a reply is only ever written to that
    /// connection, and dropped once it is replaced. A player's next requests
    /// are handled meanwhile, so one fsync does not stall them.
    pub(super) pending: Option<Box<FuturesOrdered<PendingReply>>>,
    /// When each channel may be used again; allocated on the first chat
    /// line (see Memory layout in ARCHITECTURE.md).
    pub(super) ready_at: Option<Box<[Option<Instant>; CHANNELS]>>,
    pub(super) services: Arc<Services>,
    /// The offline-whisper barrier outstanding on the current connection.
    pub(super) offline_ack: Option<Box<(u64, Vec<u64>)>>,
    /// Recent sends by client message id, for retries.
    pub(super) sends: Option<Box<RecentSends>>,
    /// When a receipt pong was last passed to the world.
    pub(super) receipt_at: Option<Instant>,
    /// Request buckets; allocated on the first metered request.
    rates: Option<Box<Rates>>,
}

/// Waits for the next request, or forever when no connection is attached.
async fn next_request(inbound: &mut Option<mpsc::Receiver<Box<Inbound>>>) -> Option<Box<Inbound>> {
    match inbound {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

impl UserActor {
    /// A session without a connection yet.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        id: UserId,
        mailbox: mpsc::Receiver<Box<UserMsg>>,
        handoff: Arc<Handoff>,
        world: WorldHandle,
        history: Option<HistoryHandle>,
        config: Arc<Config>,
        stats: Arc<Stats>,
        services: Arc<Services>,
    ) -> UserActor {
        UserActor {
            history,
            id,
            conn: None,
            inbound: None,
            mailbox,
            handoff,
            world,
            config,
            stats,
            mask: 0,
            pending: None,
            ready_at: None,
            services,
            offline_ack: None,
            sends: None,
            receipt_at: None,
            rates: None,
        }
    }

    /// The actor waits in this loop for its whole life; every handler that
    /// awaits is boxed (see Memory layout in ARCHITECTURE.md).
    pub(super) async fn run(&mut self) {
        let handoff = self.handoff.clone();
        loop {
            tokio::select! {
                msg = self.mailbox.recv() => match msg.map(|m| *m) {
                    Some(UserMsg::End(reason)) => {
                        Box::pin(self.end(reason)).await;
                        break;
                    }
                    // The world removed this player: the session is over.
                    None => break,
                },
                _ = handoff.ready.notified() => {
                    if let Some(attach) = handoff.take() {
                        self.attach(attach);
                    }
                }
                Some((conn, reply)) = next_reply(&mut self.pending), if self.pending_len() > 0 => {
                    if self.pending_len() == 0 {
                        self.pending = None;
                    }
                    self.reply_on(conn, reply);
                }
                req = next_request(&mut self.inbound), if self.pending_len() < MAX_PENDING_REPLIES => match req {
                    Some(input) => Box::pin(self.input(input)).await,
                    None => Box::pin(self.connection_lost()).await,
                },
            }
        }
        debug!("user actor stopped");
    }

    /// Takes the connection the world handed over. The previous one, if
    /// any, was already kicked by the world; replies still pending for it
    /// are dropped when they settle.
    fn attach(
        &mut self,
        Attach {
            conn,
            inbound,
            offline_ack,
            mask,
        }: Attach,
    ) {
        if let Some(mask) = mask {
            self.mask = mask;
        }
        self.conn = Some(conn);
        self.inbound = Some(inbound);
        self.offline_ack = offline_ack.map(Box::new);
        self.receipt_at = None;
    }

    /// Shutdown: every pending chat reply is answered (each settles when
    /// its commit does), then the connection is told why it closes.
    async fn end(&mut self, reason: KickReason) {
        while let Some((conn, reply)) = next_reply(&mut self.pending).await {
            self.reply_on(conn, reply);
        }
        if let Some(conn) = &self.conn {
            conn.close(Close::Kick(reason), &self.stats);
        }
    }

    /// One input from the connection.
    async fn input(&mut self, input: Box<Inbound>) {
        match *input {
            Inbound::Request(req) => self.request(req).await,
            Inbound::Pong(payload) => self.pong(payload).await,
        }
    }

    async fn connection_lost(&mut self) {
        self.inbound = None;
        self.offline_ack = None;
        if let Some(conn) = self.conn.take() {
            let _ = self.world.detached(self.id, conn.id()).await;
        }
    }

    /// Blocks (or lifts a block on) `target`: the store first, so the block
    /// outlives the session, then the world's copy that fan-out checks.
    async fn block(&mut self, target: u64, add: bool) -> ResCode {
        if target == 0 || target == self.id.0 {
            return ResCode::ResBadRequest;
        }
        if let Some(history) = &self.history {
            let stored = if add {
                match history
                    .block(self.id.0, target, self.config.max_blocks)
                    .await
                {
                    Ok(crate::history::BlockOutcome::Full) => return ResCode::ResBlockLimit,
                    Ok(_) => Ok(()),
                    Err(e) => Err(e),
                }
            } else {
                history.unblock(self.id.0, target).await.map(|_| ())
            };
            if stored.is_err() {
                return ResCode::ResStoreFailed;
            }
        }
        let applied = self.world.block(self.id, UserId(target), add).await;
        // In a cluster the whole list goes to the shared bucket, for the
        // player's sessions on other nodes and whispers sent from them.
        if let (Ok(_), Some(cluster)) = (&applied, &self.services.cluster) {
            let list = match self.world.blocks(self.id).await {
                Ok(list) => list,
                Err(gone) => return gone.into(),
            };
            if cluster.put_blocks(self.id, &list).await.is_err() {
                return ResCode::ResStoreFailed;
            }
        }
        match applied {
            Ok(true) => ResCode::ResOk,
            // Without a store the world's copy is the only one, and its
            // cap refused the block.
            Ok(false) if self.history.is_none() => ResCode::ResBlockLimit,
            Ok(false) => ResCode::ResOk,
            Err(gone) => gone.into(),
        }
    }

    /// Meters a request of `class`. Refused requests are answered here;
    /// true means the request may be handled.
    async fn admit(&mut self, req: &ClientMsg, class: Class) -> bool {
        let now = Instant::now();
        let verdict =
            self.rates
                .get_or_insert_with(Default::default)
                .check(class, &self.config.rates, now);
        match verdict {
            Verdict::Go => true,
            Verdict::Wait(wait) => {
                Stats::bump(&self.stats.rate_limited);
                self.stats.metrics.rate_limited(class as usize);
                self.reply(rate_limited_reply(req, self.mask, wait));
                false
            }
            Verdict::Kick => {
                Stats::bump(&self.stats.rate_limited);
                self.stats.metrics.rate_limited(class as usize);
                Stats::bump(&self.stats.rate_kicks);
                debug!(?class, "rate limit ignored: closing the connection");
                if let Some(conn) = &self.conn {
                    conn.close(Close::Kick(KickReason::KickRateLimited), &self.stats);
                }
                // Stop reading this connection now rather than meter
                // whatever it still has in flight.
                self.connection_lost().await;
                false
            }
        }
    }

    async fn request(&mut self, req: ClientMsg) {
        let seq = req.seq();
        if let Some(class) = Class::of(&req) {
            if !self.admit(&req, class).await {
                return;
            }
        }
        match req {
            ClientMsg::Login(_) => self.reply(codec::encode(&pb::ChatMessageLoginRep {
                msghead: codec::head(MsgType::ChcLoginRep, seq),
                res: ResCode::ResAlreadyLoggedIn as i32,
                ..Default::default()
            })),
            ClientMsg::Heartbeat(m) => self.reply(heartbeat_reply(seq, &m)),
            ClientMsg::SetMask(m) => {
                let mask = m.mask & !UNMASKABLE;
                let res = match self.world.set_mask(self.id, mask).await {
                    Ok(()) => {
                        self.mask = mask;
                        ResCode::ResOk
                    }
                    Err(gone) => gone.into(),
                };
                // In a cluster it follows the player to other nodes; a
                // mask not shared still holds on this one.
                if let (ResCode::ResOk, Some(cluster)) = (res, &self.services.cluster) {
                    if let Err(e) = cluster.put_mask(self.id, mask).await {
                        tracing::warn!(error = %e, "cannot share a mask with the cluster");
                    }
                }
                self.reply(codec::encode(&pb::ChatMessageSetMaskRep {
                    msghead: codec::head(MsgType::ChcSetMaskRep, seq),
                    res: res as i32,
                    mask: self.mask,
                    ..Default::default()
                }));
            }
            ClientMsg::Online(_) => {
                // From the gauge the world publishes on every login and
                // logout: no round trip through the world's mailbox.
                let online = Stats::get(&self.stats.online).min(u32::MAX as u64) as u32;
                self.reply(codec::encode(&pb::ChatMessageOnlineRep {
                    msghead: codec::head(MsgType::ChcOnlineRep, seq),
                    res: ResCode::ResOk as i32,
                    online,
                    max_online: self.config.max_online,
                    ..Default::default()
                }));
            }
            ClientMsg::Chat(m) => {
                let Some(asked_on) = self.conn.as_ref().map(|c| c.id()) else {
                    return;
                };
                // Every chat reply goes through the pending queue, so replies
                // keep request order even when an earlier line still waits
                // for its commit.
                let reply = self.chat_reply(m, seq).await;
                self.queue_reply(Box::pin(async move { (asked_on, reply.await) }));
            }
            ClientMsg::History(m) => {
                let rep = self.history_reply(&m, seq).await;
                self.reply(rep);
            }
            ClientMsg::Block(m) => {
                let res = Box::pin(self.block(m.userid, true)).await;
                self.reply(codec::encode(&pb::ChatMessageBlockRep {
                    msghead: codec::head(MsgType::ChcBlockRep, seq),
                    res: res as i32,
                    userid: m.userid,
                    retry_after_ms: 0,
                }));
            }
            ClientMsg::Unblock(m) => {
                let res = Box::pin(self.block(m.userid, false)).await;
                self.reply(codec::encode(&pb::ChatMessageUnblockRep {
                    msghead: codec::head(MsgType::ChcUnblockRep, seq),
                    res: res as i32,
                    userid: m.userid,
                    retry_after_ms: 0,
                }));
            }
            ClientMsg::BlockList(_) => {
                let rep = match self.world.blocks(self.id).await {
                    Ok(list) => pb::ChatMessageBlockListRep {
                        msghead: codec::head(MsgType::ChcBlockListRep, seq),
                        res: ResCode::ResOk as i32,
                        userids: list.into_iter().map(|u| u.0).collect(),
                        retry_after_ms: 0,
                    },
                    Err(gone) => pb::ChatMessageBlockListRep {
                        msghead: codec::head(MsgType::ChcBlockListRep, seq),
                        res: ResCode::from(gone) as i32,
                        ..Default::default()
                    },
                };
                self.reply(codec::encode(&rep));
            }
        }
    }
}
