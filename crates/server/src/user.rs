//! The user actor: one per logged-in player, owning that player's chat
//! state: channel mask, per-channel cooldown clocks and mute.
//!
//! It reads two inputs: requests decoded by the current connection's reader,
//! and control messages from the world actor (takeover, mute). It survives
//! its connection: on takeover it simply swaps in the new connection's ends,
//! so nothing is reloaded and a relogin cannot reset a cooldown. It never
//! reads or writes a socket itself; it queues frames through [`ConnTx`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesOrdered, StreamExt};

use bytes::Bytes;
use guildchat_protocol::{
    codec, pb, ChatType, ClientMsg, KickReason, MsgId as WireMsg, ResCode, UNMASKABLE,
};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, info_span, Instrument};

use crate::config::Config;
use crate::history::{HistoryError, HistoryHandle, StoredMsg};
use crate::ids::UserId;
use crate::net::{ConnTx, Priority};
use crate::records;
use crate::stats::Stats;
use crate::world::{ChatLine, Identity, Target, WorldHandle};

/// Capacity of a user actor's control mailbox (world -> user). The world
/// never waits on it: a full mailbox makes the world's request fail
/// (a takeover then answers RES_INTERNAL). Control messages are rare, so it
/// only fills if the actor is wedged.
const USER_MAILBOX: usize = 16;

/// Capacity of the request queue from a connection's reader to the user
/// actor. When full the reader waits, so a flooding client is slowed at its
/// own socket and costs nobody else anything.
pub const INBOUND_QUEUE: usize = 32;

/// Number of chat channels (CHATTYPE values 0..=6).
const CHANNELS: usize = 7;

/// What a connection's reader hands the user actor.
///
/// It travels boxed (the queue carries `Box<Inbound>`): a tokio channel
/// allocates its slots 32 at a time when it is created, so every idle
/// connection pays 32 × the size of a slot. A pointer makes that 256 bytes
/// instead of about 5 KiB.
#[derive(Debug)]
pub enum Inbound {
    /// A decoded request.
    Request(ClientMsg),
    /// The payload of a websocket pong: proof that the client has read
    /// every frame queued before the matching ping.
    Pong(Bytes),
}

/// Messages from the world actor. The mailbox carries them boxed, to keep
/// its preallocated slots small (see [`Inbound`]).
pub(crate) enum UserMsg {
    /// Takeover: from now on, talk to this connection.
    Attach(Attach),
    /// Mute for this long from now; `None` lifts it.
    Mute { duration: Option<Duration> },
}

/// A new connection's ends, handed over on takeover or resume.
pub(crate) struct Attach {
    pub conn: ConnTx,
    pub inbound: mpsc::Receiver<Box<Inbound>>,
}

/// The world's handle to a user actor. Only the world's registry holds one,
/// so removing the player from the registry ends the actor.
#[derive(Debug)]
pub struct UserHandle {
    tx: mpsc::Sender<Box<UserMsg>>,
}

impl UserHandle {
    pub(crate) fn spawn(
        identity: Identity,
        conn: ConnTx,
        inbound: mpsc::Receiver<Box<Inbound>>,
        world: WorldHandle,
        history: Option<HistoryHandle>,
        config: Arc<Config>,
        stats: Arc<Stats>,
    ) -> UserHandle {
        let (tx, mailbox) = mpsc::channel(USER_MAILBOX);
        // The rest of the identity (name, groups) is the world's business;
        // the name only goes into the span.
        let span = info_span!("user", user = %identity.user, name = %identity.name);
        let mut actor = UserActor {
            history,
            id: identity.user,
            conn: Some(conn),
            inbound: Some(inbound),
            mailbox,
            world,
            config,
            stats,
            mask: 0,
            pending: None,
            ready_at: None,
            muted_until: None,
        };
        // The actor is moved into a plain async block and `run` borrows it:
        // an `async fn` taking `self` by value (or `#[instrument]` on one)
        // keeps a second copy of its arguments (or of the whole inner
        // future) in the state machine, and every idle actor would pay it.
        tokio::spawn(async move { actor.run().await }.instrument(span));
        UserHandle { tx }
    }

    /// Never waits; false if the actor is gone or its mailbox is full.
    pub(crate) fn try_send(&self, msg: UserMsg) -> bool {
        self.tx.try_send(Box::new(msg)).is_ok()
    }
}

impl std::fmt::Debug for UserMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UserMsg::Attach(a) => write!(f, "Attach({})", a.conn.id()),
            UserMsg::Mute { duration } => write!(f, "Mute({duration:?})"),
        }
    }
}

struct UserActor {
    history: Option<HistoryHandle>,
    id: UserId,
    conn: Option<ConnTx>,
    inbound: Option<mpsc::Receiver<Box<Inbound>>>,
    mailbox: mpsc::Receiver<Box<UserMsg>>,
    world: WorldHandle,
    config: Arc<Config>,
    stats: Arc<Stats>,
    mask: u32,
    /// Chat replies waiting for the store, in request order. A player's
    /// next requests are handled meanwhile, so one fsync does not stall
    /// them. Only present while some are waiting, and boxed: an empty
    /// FuturesOrdered still holds an allocation, and an inline one takes
    /// room in the task, which every idle player would pay.
    pending: Option<Box<FuturesOrdered<PendingReply>>>,
    /// When each channel may be used again; allocated on the first chat
    /// line, so a player who never chats does not carry it.
    ready_at: Option<Box<[Option<Instant>; CHANNELS]>>,
    muted_until: Option<Instant>,
}

/// The next settled chat reply; called only while some are waiting.
async fn next_reply(pending: &mut Option<Box<FuturesOrdered<PendingReply>>>) -> Option<Bytes> {
    pending.as_mut()?.next().await
}

/// Waits for the next request, or forever when no connection is attached.
async fn next_request(inbound: &mut Option<mpsc::Receiver<Box<Inbound>>>) -> Option<Box<Inbound>> {
    match inbound {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

impl UserActor {
    /// Every handler that awaits is boxed: the actor waits in this loop for
    /// its whole life, and its task is as large as the largest future held
    /// across an await, so an unboxed chat or history request would make
    /// every idle player carry that room.
    async fn run(&mut self) {
        Box::pin(self.deliver_offline()).await;
        loop {
            tokio::select! {
                msg = self.mailbox.recv() => match msg {
                    Some(msg) => {
                        let attached = matches!(*msg, UserMsg::Attach(_));
                        self.control(*msg);
                        if attached {
                            Box::pin(self.deliver_offline()).await;
                        }
                    }
                    // The world removed this player: the session is over.
                    None => break,
                },
                Some(reply) = next_reply(&mut self.pending), if self.pending_len() > 0 => {
                    if self.pending_len() == 0 {
                        self.pending = None;
                    }
                    self.reply(reply);
                }
                req = next_request(&mut self.inbound), if self.pending_len() < MAX_PENDING_REPLIES => match req {
                    Some(input) => Box::pin(self.input(input)).await,
                    None => Box::pin(self.connection_lost()).await,
                },
            }
        }
        debug!("user actor stopped");
    }

    fn pending_len(&self) -> usize {
        self.pending.as_ref().map_or(0, |p| p.len())
    }

    fn control(&mut self, msg: UserMsg) {
        match msg {
            UserMsg::Attach(Attach { conn, inbound }) => {
                if let Some(old) = self.conn.replace(conn) {
                    old.kick(KickReason::KickLoggedInElsewhere);
                }
                self.inbound = Some(inbound);
            }
            UserMsg::Mute { duration } => {
                self.muted_until = duration.map(|d| Instant::now() + d);
            }
        }
    }

    /// Queues the whispers stored while this player was offline, oldest
    /// first, then a barrier ping. They stay stored until the barrier's pong
    /// proves the client read them; a crash before that delivers them again
    /// with the same msg_ids, which clients de-duplicate.
    async fn deliver_offline(&mut self) {
        let (Some(history), Some(conn)) = (&self.history, &self.conn) else {
            return;
        };
        let pending = match history
            .pending_offline(self.id.0)
            .await
            .unwrap_or(Err(HistoryError::Unavailable))
        {
            Ok(pending) => pending,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read offline whispers; they stay stored");
                return;
            }
        };
        let Some(last) = pending.last().map(|m| m.msg_id) else {
            return;
        };
        for m in &pending {
            conn.deliver(
                codec::encode(&records::notification(m)),
                Priority::Keep,
                &self.stats,
            );
        }
        conn.barrier(Bytes::from(format!("{OFFLINE_ACK}{last}")));
        Stats::add(&self.stats.offline_delivered, pending.len() as u64);
    }

    /// One input from the connection, unboxed here rather than in `run`:
    /// what `run` binds across an await takes room in every idle actor.
    async fn input(&mut self, input: Box<Inbound>) {
        match *input {
            Inbound::Request(req) => self.request(req).await,
            Inbound::Pong(payload) => self.pong(payload).await,
        }
    }

    /// A barrier came back: the client has the offline whispers up to the
    /// id it carries, so they can be forgotten.
    async fn pong(&mut self, payload: Bytes) {
        let Some(history) = &self.history else {
            return;
        };
        let upto = std::str::from_utf8(&payload)
            .ok()
            .and_then(|p| p.strip_prefix(OFFLINE_ACK))
            .and_then(|id| id.parse::<u64>().ok());
        if let Some(upto) = upto {
            match history.ack_offline_through(self.id.0, upto).await {
                Ok(()) => Stats::bump(&self.stats.offline_acked),
                Err(e) => tracing::warn!(error = %e, "cannot forget delivered offline whispers"),
            }
        }
    }

    async fn connection_lost(&mut self) {
        self.inbound = None;
        if let Some(conn) = self.conn.take() {
            self.world.detached(self.id, conn.id()).await;
        }
    }

    fn reply(&self, frame: Bytes) {
        if let Some(conn) = &self.conn {
            conn.deliver(frame, Priority::Keep, &self.stats);
        }
    }

    async fn request(&mut self, req: ClientMsg) {
        let seq = req.seq();
        match req {
            ClientMsg::Login(_) => self.reply(codec::encode(&pb::ChatMessageLoginRep {
                msghead: codec::head(WireMsg::ChcLoginRep, seq),
                res: ResCode::ResAlreadyLoggedIn as i32,
                ..Default::default()
            })),
            ClientMsg::Heartbeat(m) => self.reply(heartbeat_reply(seq, &m)),
            ClientMsg::SetMask(m) => {
                self.mask = m.mask & !UNMASKABLE;
                self.world.set_mask(self.id, self.mask).await;
                self.reply(codec::encode(&pb::ChatMessageSetMaskRep {
                    msghead: codec::head(WireMsg::ChcSetMaskRep, seq),
                    res: ResCode::ResOk as i32,
                    mask: self.mask,
                }));
            }
            ClientMsg::Online(_) => {
                let (online, max_online) = self.world.online().await;
                self.reply(codec::encode(&pb::ChatMessageOnlineRep {
                    msghead: codec::head(WireMsg::ChcOnlineRep, seq),
                    res: ResCode::ResOk as i32,
                    online,
                    max_online,
                }));
            }
            ClientMsg::Chat(m) => {
                // Every chat reply goes through the pending queue, so replies
                // keep request order even when an earlier line still waits
                // for its commit.
                let reply: PendingReply = match self.chat(m).await {
                    Ok(accepted) => Box::pin(accepted.settle(seq)),
                    Err((res, cooldown)) => {
                        let rep = chat_rep(seq, res, cooldown, 0, false);
                        Box::pin(std::future::ready(rep))
                    }
                };
                self.pending
                    .get_or_insert_with(|| Box::new(FuturesOrdered::new()))
                    .push_back(reply);
            }
            ClientMsg::History(m) => {
                let rep = match self.history_page(&m).await {
                    Ok((msgs, has_more)) => pb::ChatMessageHistoryRep {
                        msghead: codec::head(WireMsg::ChcHistoryRep, seq),
                        res: ResCode::ResOk as i32,
                        msgs,
                        has_more,
                    },
                    Err(res) => pb::ChatMessageHistoryRep {
                        msghead: codec::head(WireMsg::ChcHistoryRep, seq),
                        res: res as i32,
                        ..Default::default()
                    },
                };
                self.reply(codec::encode(&rep));
            }
        }
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

    /// Checks a chat request against this player's state, then hands it to
    /// the world. Returns the accepted line (its reply still to settle) or
    /// (code, remaining cooldown).
    async fn chat(&mut self, m: pb::ChatMessageChatReq) -> Result<Accepted, (ResCode, Duration)> {
        let none = Duration::ZERO;
        let channel = match ChatType::try_from(m.chattype) {
            Ok(ChatType::ChatAll) => return Err((ResCode::ResNoPermission, none)),
            Ok(c) => c,
            Err(_) => return Err((ResCode::ResBadRequest, none)),
        };
        let Some(rule) = self.config.chat.rule(channel).copied() else {
            return Err((ResCode::ResBadRequest, none));
        };
        let now = Instant::now();
        if self.muted_until.is_some_and(|t| now < t) {
            return Err((ResCode::ResMuted, none));
        }
        if m.context.trim().is_empty() {
            return Err((ResCode::ResTextEmpty, none));
        }
        if m.context.chars().count() > rule.max_chars {
            return Err((ResCode::ResTextTooLong, none));
        }
        let slot = channel as usize;
        let ready_at = self.ready_at.as_ref().and_then(|r| r[slot]);
        if let Some(ready) = ready_at.filter(|t| now < *t) {
            return Err((ResCode::ResOnCooldown, ready - now));
        }
        let target = match (m.targetid, m.targetname.is_empty()) {
            (0, true) => Target::None,
            (0, false) => Target::Name(m.targetname),
            (id, _) => Target::Id(UserId(id)),
        };
        let line = ChatLine {
            from: self.id,
            channel,
            text: m.context,
            target,
        };
        let outcome = self.world.chat(line).await.map_err(|code| (code, none))?;
        // The clock starts when the world accepts the line; it lives in
        // this actor, so neither a reconnect nor a takeover resets it.
        self.ready_at
            .get_or_insert_with(|| Box::new([None; CHANNELS]))[slot] = Some(now + rule.cooldown());
        Ok(Accepted {
            msg_id: outcome.msg_id.0,
            cooldown: rule.cooldown(),
            durable: outcome.durable,
            offline: outcome.offline,
            history: self.history.clone(),
            stats: self.stats.clone(),
        })
    }
}

/// A reply still waiting for the store.
type PendingReply = Pin<Box<dyn Future<Output = Bytes> + Send + Sync>>;

/// Most chat replies a player may have waiting for commits. Past it, the
/// actor stops reading that player's requests until the oldest settles:
/// backpressure onto the player's own socket.
const MAX_PENDING_REPLIES: usize = 64;

/// A line the world has fanned out; its reply waits until it is durable.
struct Accepted {
    msg_id: u64,
    cooldown: Duration,
    durable: Option<oneshot::Receiver<Result<(), HistoryError>>>,
    offline: Option<(UserId, StoredMsg)>,
    history: Option<HistoryHandle>,
    stats: Arc<Stats>,
}

impl Accepted {
    /// Waits for the store (offline whisper, then the group commit) and
    /// builds the reply: OK only once the line is durable.
    async fn settle(self, seq: u32) -> Bytes {
        let refused = |code| chat_rep(seq, code, Duration::ZERO, 0, false);
        let mut offline = false;
        if let (Some((to, stored)), Some(history)) = (self.offline, &self.history) {
            if let Err(e) = history
                .store_offline(to.0, stored)
                .await
                .unwrap_or(Err(HistoryError::Unavailable))
            {
                return refused(store_code(e));
            }
            Stats::bump(&self.stats.offline_stored);
            offline = true;
        }
        if let Some(durable) = self.durable {
            match durable.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return refused(store_code(e)),
                Err(_) => return refused(ResCode::ResStoreFailed),
            }
        }
        chat_rep(seq, ResCode::ResOk, self.cooldown, self.msg_id, offline)
    }
}

/// The heartbeat answer, the same before and after login.
pub(crate) fn heartbeat_reply(seq: u32, m: &pb::ChatMessageHeartbeatReq) -> Bytes {
    codec::encode(&pb::ChatMessageHeartbeatRep {
        msghead: codec::head(WireMsg::ChcHeartbeatRep, seq),
        client_time_ms: m.client_time_ms,
        server_time_ms: crate::world::now_ms(),
    })
}

fn chat_rep(seq: u32, res: ResCode, cooldown: Duration, msg_id: u64, offline: bool) -> Bytes {
    codec::encode(&pb::ChatMessageChatRep {
        msghead: codec::head(WireMsg::CchChatRep, seq),
        res: res as i32,
        cooldown_ms: duration_ms(cooldown),
        msg_id,
        offline,
    })
}

/// Pong payload prefix of the offline-whisper delivery barrier.
const OFFLINE_ACK: &str = "offline-ack:";

fn store_code(e: HistoryError) -> ResCode {
    match e {
        HistoryError::InboxFull => ResCode::ResInboxFull,
        _ => ResCode::ResStoreFailed,
    }
}

fn duration_ms(d: Duration) -> u32 {
    // Round up so "1 ms left" is never reported as 0.
    d.as_micros().div_ceil(1000).min(u32::MAX as u128) as u32
}
