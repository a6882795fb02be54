//! The user actor: one per logged-in player, owning that player's chat
//! state: channel mask, per-channel cooldown clocks and mute.
//!
//! It reads three inputs: requests decoded by the current connection's
//! reader, control messages from the world actor (mute, end), and the
//! connection the world hands over on login, takeover and resume. It
//! survives its connection: on takeover it simply swaps in the new
//! connection's ends, so nothing is reloaded and a relogin cannot reset a
//! cooldown. It never reads or writes a socket itself; it queues frames
//! through [`ConnTx`], and a reply only ever to the connection that asked.
//!
//! It also meters the player's requests (heartbeats, world asks, history
//! pages) with one token bucket per kind, so that no player can monopolise
//! the world actor or the store's reader thread.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::{FutureExt, Shared};
use futures_util::stream::{FuturesOrdered, StreamExt};

use bytes::Bytes;
use guildchat_protocol::{
    codec, pb, ChatType, ClientMsg, KickReason, MsgType, ResCode, UNMASKABLE,
};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::Instant;
use tracing::{debug, info_span, Instrument};

use crate::config::{Config, RatesConfig};
use crate::history::{HistoryError, HistoryHandle, PlayerRef};
use crate::ids::{ConnId, UserId};
use crate::net::{ConnTx, Priority};
use crate::records;
use crate::stats::Stats;
use crate::world::{ChatLine, Identity, Target, WorldHandle, OFFLINE_ACK, RECEIPT};

/// Capacity of a user actor's control mailbox (world -> user). The world
/// never waits on it: a full mailbox makes the world's request fail (a mute
/// reports the player as not found; an end at shutdown is replaced by the
/// world kicking the connection itself). Control messages are rare, so it
/// only fills if the actor is wedged. Connections do not travel here but
/// through a hand-off slot, so logins never fail on it.
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
    /// Mute for this long from now; `None` lifts it.
    Mute { duration: Option<Duration> },
    /// The session is over (shutdown): answer every pending chat reply,
    /// then close the connection with this reason, and stop.
    End(KickReason),
}

/// A connection's ends, handed over once its login reply, replay and
/// offline whispers are queued (new session, takeover or resume).
pub(crate) struct Attach {
    pub conn: ConnTx,
    pub inbound: mpsc::Receiver<Box<Inbound>>,
    /// The offline-whisper barrier queued on this connection: its token and
    /// exactly the msg_ids its pong acknowledges.
    pub offline_ack: Option<(u64, Vec<u64>)>,
}

/// Where the world leaves the newest connection for the actor. A slot
/// rather than a mailbox message, so that any number of logins racing for
/// one player never fill a queue: a newer attach replaces one the actor has
/// not taken yet (whose connection the world has already kicked). Taken
/// under a lock held for a swap, never across an await.
struct Handoff {
    slot: Mutex<Option<Attach>>,
    ready: Notify,
}

impl Handoff {
    fn take(&self) -> Option<Attach> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// The world's handle to a user actor. Only the world's registry holds one,
/// so removing the player from the registry ends the actor.
pub struct UserHandle {
    tx: mpsc::Sender<Box<UserMsg>>,
    handoff: Arc<Handoff>,
}

impl std::fmt::Debug for UserHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserHandle").finish_non_exhaustive()
    }
}

impl UserHandle {
    /// Spawns the actor of a new session. It has no connection until the
    /// world hands it one with [`UserHandle::attach`].
    pub(crate) fn spawn(
        identity: Identity,
        world: WorldHandle,
        history: Option<HistoryHandle>,
        config: Arc<Config>,
        stats: Arc<Stats>,
    ) -> UserHandle {
        let (tx, mailbox) = mpsc::channel(USER_MAILBOX);
        let handoff = Arc::new(Handoff {
            slot: Mutex::new(None),
            ready: Notify::new(),
        });
        // The rest of the identity (name, groups) is the world's business;
        // the name only goes into the span.
        let span = info_span!("user", user = %identity.user, name = %identity.name);
        let mut actor = UserActor {
            history,
            id: identity.user,
            conn: None,
            inbound: None,
            mailbox,
            handoff: handoff.clone(),
            world,
            config,
            stats,
            mask: 0,
            pending: None,
            ready_at: None,
            muted_until: None,
            offline_ack: None,
            sends: None,
            receipt_at: None,
            rates: None,
        };
        tokio::spawn(async move { actor.run().await }.instrument(span));
        UserHandle { tx, handoff }
    }

    /// Never waits; false if the actor is gone or its mailbox is full.
    pub(crate) fn try_send(&self, msg: UserMsg) -> bool {
        self.tx.try_send(Box::new(msg)).is_ok()
    }

    /// Hands the actor its connection. Never fails and never waits.
    pub(crate) fn attach(&self, attach: Attach) {
        *self.handoff.slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(attach);
        self.handoff.ready.notify_one();
    }
}

impl std::fmt::Debug for UserMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UserMsg::Mute { duration } => write!(f, "Mute({duration:?})"),
            UserMsg::End(reason) => write!(f, "End({reason:?})"),
        }
    }
}

struct UserActor {
    history: Option<HistoryHandle>,
    id: UserId,
    conn: Option<ConnTx>,
    inbound: Option<mpsc::Receiver<Box<Inbound>>>,
    mailbox: mpsc::Receiver<Box<UserMsg>>,
    handoff: Arc<Handoff>,
    world: WorldHandle,
    config: Arc<Config>,
    stats: Arc<Stats>,
    mask: u32,
    /// Chat replies waiting for the store, in request order, each tagged
    /// with the connection that asked: a reply is only ever written to that
    /// connection, and dropped once it is replaced. A player's next requests
    /// are handled meanwhile, so one fsync does not stall them.
    pending: Option<Box<FuturesOrdered<PendingReply>>>,
    /// When each channel may be used again; allocated on the first chat
    /// line, so a player who never chats does not carry it.
    ready_at: Option<Box<[Option<Instant>; CHANNELS]>>,
    muted_until: Option<Instant>,
    /// The offline-whisper barrier outstanding on the current connection.
    offline_ack: Option<Box<(u64, Vec<u64>)>>,
    /// Recent sends by client message id, for retries.
    sends: Option<Box<RecentSends>>,
    /// When a receipt pong was last passed to the world.
    receipt_at: Option<Instant>,
    /// Request buckets; allocated on the first metered request.
    rates: Option<Box<Rates>>,
}

/// Least time between two receipt pongs passed to the world: the world
/// sends a receipt ping at most once a tick (one second).
const RECEIPT_SPACING: Duration = Duration::from_millis(500);

/// The next settled chat reply; called only while some are waiting.
async fn next_reply(
    pending: &mut Option<Box<FuturesOrdered<PendingReply>>>,
) -> Option<(ConnId, Bytes)> {
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
    /// across an await.
    async fn run(&mut self) {
        let handoff = self.handoff.clone();
        loop {
            tokio::select! {
                msg = self.mailbox.recv() => match msg.map(|m| *m) {
                    Some(UserMsg::Mute { duration }) => {
                        // A duration too large for the clock is a mute
                        // without end.
                        self.muted_until = duration
                            .map(|d| Instant::now().checked_add(d).unwrap_or_else(far_future));
                    }
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

    fn pending_len(&self) -> usize {
        self.pending.as_ref().map_or(0, |p| p.len())
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
        }: Attach,
    ) {
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
            conn.kick(reason);
        }
    }

    /// One input from the connection.
    async fn input(&mut self, input: Box<Inbound>) {
        match *input {
            Inbound::Request(req) => self.request(req).await,
            Inbound::Pong(payload) => self.pong(payload).await,
        }
    }

    /// A ping of ours came back. Only the barrier or receipt this
    /// connection was actually sent counts: a forged pong changes nothing.
    async fn pong(&mut self, payload: Bytes) {
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
                    match history.ack_offline(self.id.0, ids).await {
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

    async fn connection_lost(&mut self) {
        self.inbound = None;
        self.offline_ack = None;
        if let Some(conn) = self.conn.take() {
            let _ = self.world.detached(self.id, conn.id()).await;
        }
    }

    fn reply(&self, frame: Bytes) {
        if let Some(conn) = &self.conn {
            conn.deliver(frame, Priority::Keep, &self.stats);
        }
    }

    /// Writes a reply to the connection that asked for it, if it is still
    /// this session's.
    fn reply_on(&self, asked_on: ConnId, frame: Bytes) {
        if self.conn.as_ref().is_some_and(|c| c.id() == asked_on) {
            self.reply(frame);
        }
    }

    fn queue_reply(&mut self, reply: PendingReply) {
        self.pending
            .get_or_insert_with(|| Box::new(FuturesOrdered::new()))
            .push_back(reply);
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
                self.reply(rate_limited_reply(req, self.mask, wait));
                false
            }
            Verdict::Kick => {
                Stats::bump(&self.stats.rate_limited);
                Stats::bump(&self.stats.rate_kicks);
                debug!(?class, "rate limit ignored: closing the connection");
                if let Some(conn) = &self.conn {
                    conn.kick(KickReason::KickRateLimited);
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
                let rep = match self.history_page(&m).await {
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
                self.reply(codec::encode(&rep));
            }
        }
    }

    /// A chat request's reply, still to settle: a retry of a known client
    /// message id gets the original outcome; anything else is checked and
    /// sent.
    async fn chat_reply(&mut self, m: pb::ChatMessageChatReq, seq: u32) -> ReplyFuture {
        let nonce = m.client_msg_id;
        let slot = m.chattype.clamp(0, CHANNELS as i32 - 1) as usize;
        if nonce != 0 {
            self.load_sends().await;
            // Whatever the first send's outcome, a retry gets the same: a
            // line that was fanned out is never fanned out again, even if
            // storing it failed. A client tries again with a new id.
            if let Some(sent) = self.sends.as_ref().and_then(|s| s.get(nonce)) {
                Stats::bump(&self.stats.chat_retries);
                let remaining = self.cooldown_left(slot);
                let (msg_id, offline, outcome) = (sent.msg_id, sent.offline, sent.outcome.clone());
                return Box::pin(async move {
                    let res = outcome.await;
                    let id = if res == ResCode::ResOk { msg_id } else { 0 };
                    chat_rep(seq, res, remaining, id, offline && res == ResCode::ResOk)
                });
            }
        }
        match self.chat(m).await {
            Ok(accepted) => {
                let (msg_id, cooldown, offline) = (
                    accepted.msg_id,
                    accepted.cooldown,
                    accepted.offline.is_some(),
                );
                let outcome: SharedOutcome =
                    (Box::pin(accepted.settle()) as OutcomeFuture).shared();
                if nonce != 0 {
                    self.sends.get_or_insert_with(Default::default).insert(
                        nonce,
                        msg_id,
                        offline,
                        outcome.clone(),
                    );
                }
                Box::pin(async move {
                    let res = outcome.await;
                    if res == ResCode::ResOk {
                        chat_rep(seq, res, cooldown, msg_id, offline)
                    } else {
                        chat_rep(seq, res, Duration::ZERO, 0, false)
                    }
                })
            }
            Err((res, cooldown)) => {
                let rep = chat_rep(seq, res, cooldown, 0, false);
                Box::pin(std::future::ready(rep))
            }
        }
    }

    /// After a restart the session is new, but a retry may still come: the
    /// first send with a client message id loads the ids of the player's
    /// latest stored lines.
    async fn load_sends(&mut self) {
        if self.sends.as_ref().is_some_and(|s| s.loaded) {
            return;
        }
        let sends = self.sends.get_or_insert_with(Default::default);
        sends.loaded = true;
        let Some(history) = &self.history else {
            return;
        };
        match history.recent_nonces(self.id.0, RECENT_SENDS as u32).await {
            Ok(stored) => {
                // Oldest first, so the newest stay when the map is full.
                for (nonce, msg_id) in stored.into_iter().rev() {
                    if sends.get(nonce).is_none() {
                        let done: SharedOutcome = (Box::pin(std::future::ready(ResCode::ResOk))
                            as OutcomeFuture)
                            .shared();
                        sends.insert(nonce, msg_id, false, done);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read recent client message ids"),
        }
    }

    fn cooldown_left(&self, slot: usize) -> Duration {
        let now = Instant::now();
        self.ready_at
            .as_ref()
            .and_then(|r| r[slot])
            .map_or(Duration::ZERO, |t| t.saturating_duration_since(now))
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
        let mut line = ChatLine {
            from: self.id,
            channel,
            text: m.context,
            target,
            nonce: m.client_msg_id,
        };
        // A whisper to someone not registered: kept for them only if the
        // store knows them (they have logged in at least once).
        let retry = (channel == ChatType::ChatPrivate).then(|| line.clone());
        let outcome = match (self.world.chat(line).await, retry, &self.history) {
            (Err(ResCode::ResTargetOffline), Some(mut retry), Some(history)) => {
                let who = match &retry.target {
                    Target::Id(id) => PlayerRef::Id(id.0),
                    Target::Name(name) => PlayerRef::Name(name.clone()),
                    _ => return Err((ResCode::ResNoSuchTarget, none)),
                };
                match history.find_player(who).await {
                    Ok(Some((id, name))) => {
                        retry.target = Target::Known(UserId(id), name);
                        line = retry;
                        self.world.chat(line).await
                    }
                    Ok(None) => Err(ResCode::ResNoSuchTarget),
                    Err(_) => Err(ResCode::ResInternal),
                }
            }
            (result, _, _) => result,
        }
        .map_err(|code| (code, none))?;
        // The clock starts when the world has accepted the line (read after
        // the world's answer, so backpressure cannot squeeze two lines into
        // one cooldown); it lives in this actor, so neither a reconnect nor
        // a takeover resets it.
        let ready = Instant::now()
            .checked_add(rule.cooldown())
            .unwrap_or_else(far_future);
        self.ready_at
            .get_or_insert_with(|| Box::new([None; CHANNELS]))[slot] = Some(ready);
        Ok(Accepted {
            msg_id: outcome.msg_id.0,
            cooldown: rule.cooldown(),
            durable: outcome.durable,
            offline: outcome.offline,
        })
    }
}

/// A clock reading later than any real deadline (for durations too large
/// to add to now).
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365 * 30)
}

/// A reply still waiting for the store, with the connection it belongs to.
type PendingReply = Pin<Box<dyn Future<Output = (ConnId, Bytes)> + Send + Sync>>;

/// A chat reply, before it is tagged with its connection.
type ReplyFuture = Pin<Box<dyn Future<Output = Bytes> + Send + Sync>>;

/// The result of one accepted line, shared by its first reply and any
/// retry of the same client message id.
type OutcomeFuture = Pin<Box<dyn Future<Output = ResCode> + Send + Sync>>;
type SharedOutcome = Shared<OutcomeFuture>;

/// Most chat replies a player may have waiting for commits. Past it, the
/// actor stops reading that player's requests until the oldest settles:
/// backpressure onto the player's own socket.
const MAX_PENDING_REPLIES: usize = 64;

/// How many client message ids a session remembers for retries.
const RECENT_SENDS: usize = 256;

/// One remembered send.
struct Sent {
    msg_id: u64,
    offline: bool,
    outcome: SharedOutcome,
}

/// The last [`RECENT_SENDS`] sends with a client message id, oldest first.
#[derive(Default)]
struct RecentSends {
    by_nonce: HashMap<u64, Sent>,
    order: VecDeque<u64>,
    /// Whether the store's ids were loaded (once per session).
    loaded: bool,
}

impl RecentSends {
    fn get(&self, nonce: u64) -> Option<&Sent> {
        self.by_nonce.get(&nonce)
    }

    fn insert(&mut self, nonce: u64, msg_id: u64, offline: bool, outcome: SharedOutcome) {
        if self.order.len() == RECENT_SENDS {
            if let Some(old) = self.order.pop_front() {
                self.by_nonce.remove(&old);
            }
        }
        self.order.push_back(nonce);
        self.by_nonce.insert(
            nonce,
            Sent {
                msg_id,
                offline,
                outcome,
            },
        );
    }
}

/// A line the world has fanned out; its reply waits until it is durable.
struct Accepted {
    msg_id: u64,
    cooldown: Duration,
    durable: Option<oneshot::Receiver<Result<(), HistoryError>>>,
    offline: Option<oneshot::Receiver<Result<(), HistoryError>>>,
}

impl Accepted {
    /// Waits for the store (the offline row, then the group commit): OK
    /// only once the line is durable.
    async fn settle(self) -> ResCode {
        for rx in [self.offline, self.durable].into_iter().flatten() {
            match rx.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return store_code(e),
                Err(_) => return ResCode::ResStoreFailed,
            }
        }
        ResCode::ResOk
    }
}

/// The heartbeat answer, the same before and after login.
pub(crate) fn heartbeat_reply(seq: u32, m: &pb::ChatMessageHeartbeatReq) -> Bytes {
    codec::encode(&pb::ChatMessageHeartbeatRep {
        msghead: codec::head(MsgType::ChcHeartbeatRep, seq),
        client_time_ms: m.client_time_ms,
        server_time_ms: crate::world::now_ms(),
        ..Default::default()
    })
}

/// The answer to a request refused by its rate limit. Only metered
/// requests reach here; each gets its own reply type, carrying the wait.
fn rate_limited_reply(req: &ClientMsg, mask: u32, wait: Duration) -> Bytes {
    let res = ResCode::ResRateLimited as i32;
    let retry_after_ms = duration_ms(wait);
    match req {
        ClientMsg::Heartbeat(m) => codec::encode(&pb::ChatMessageHeartbeatRep {
            msghead: codec::head(MsgType::ChcHeartbeatRep, req.seq()),
            client_time_ms: m.client_time_ms,
            res,
            retry_after_ms,
            ..Default::default()
        }),
        ClientMsg::SetMask(_) => codec::encode(&pb::ChatMessageSetMaskRep {
            msghead: codec::head(MsgType::ChcSetMaskRep, req.seq()),
            res,
            mask,
            retry_after_ms,
        }),
        ClientMsg::Online(_) => codec::encode(&pb::ChatMessageOnlineRep {
            msghead: codec::head(MsgType::ChcOnlineRep, req.seq()),
            res,
            retry_after_ms,
            ..Default::default()
        }),
        ClientMsg::History(_) => codec::encode(&pb::ChatMessageHistoryRep {
            msghead: codec::head(MsgType::ChcHistoryRep, req.seq()),
            res,
            retry_after_ms,
            ..Default::default()
        }),
        // Never metered (see `Class::of`); an error notice, should that
        // ever change.
        ClientMsg::Login(_) | ClientMsg::Chat(_) => codec::encode(&pb::ChatMessageNotifyError {
            msghead: codec::head(MsgType::ChcNotifyError, req.seq()),
            res,
            ..Default::default()
        }),
    }
}

/// Kinds of metered request, by what they cost the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Heartbeats: answered by this actor alone.
    Cheap,
    /// Set-mask (a world round trip) and online (a reply).
    World,
    /// History pages: a read on the store's single reader thread.
    History,
}

impl Class {
    /// Chat lines are not metered here (each channel has its cooldown), nor
    /// a second login (answered at once, and a client error).
    fn of(req: &ClientMsg) -> Option<Class> {
        match req {
            ClientMsg::Heartbeat(_) => Some(Class::Cheap),
            ClientMsg::SetMask(_) | ClientMsg::Online(_) => Some(Class::World),
            ClientMsg::History(_) => Some(Class::History),
            ClientMsg::Login(_) | ClientMsg::Chat(_) => None,
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// (requests per second, burst) from the config.
    fn limit(self, rates: &RatesConfig) -> (u32, u32) {
        match self {
            Class::Cheap => (rates.heartbeat_per_sec, rates.heartbeat_burst),
            Class::World => (rates.world_per_sec, rates.world_burst),
            Class::History => (rates.history_per_sec, rates.history_burst),
        }
    }
}

/// What a bucket says about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Go,
    /// Refused; the next request of its kind is accepted after this long.
    Wait(Duration),
    /// Refused, and the player has ignored the limit long enough: close.
    Kick,
}

/// A token bucket in one instant (the generic cell rate algorithm): `tat`
/// is when the bucket would be full again. A request is allowed while
/// `tat` is less than `burst - 1` intervals ahead of now, and moves it one
/// interval on.
///
/// Hand-rolled rather than `governor`: it reads tokio's clock, so tests can
/// pause it, and it is one `Instant` (16 bytes) where a governor direct
/// limiter carries its own clock and state (and would need one per class
/// per player, 20,000 players at a time).
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tat: Instant,
}

impl Bucket {
    /// A full bucket.
    fn new(now: Instant) -> Bucket {
        Bucket { tat: now }
    }

    /// Takes one token at `now`, refilled at `per_sec` up to `burst`; on
    /// refusal, how long until the next token.
    fn take(&mut self, now: Instant, per_sec: u32, burst: u32) -> Result<(), Duration> {
        let interval = Duration::from_secs(1) / per_sec.max(1);
        let tolerance = interval * burst.max(1).saturating_sub(1);
        let wait = self
            .tat
            .saturating_duration_since(now)
            .saturating_sub(tolerance);
        if !wait.is_zero() {
            return Err(wait);
        }
        self.tat = self.tat.max(now) + interval;
        Ok(())
    }
}

/// One kind's bucket, and a second that counts its refusals: that one
/// refills `kick_factor - 1` times as fast and holds `kick_factor - 1`
/// bursts, so it only runs dry when a player keeps sending more than
/// `kick_factor` times the limit.
#[derive(Debug, Clone, Copy)]
struct Metered {
    tokens: Bucket,
    refusals: Bucket,
}

/// A player's request buckets, each made on the first request of its kind.
/// Boxed in the actor: 8 bytes for a player who never sends a metered
/// request, 96 more once one did (checked by a test).
#[derive(Debug, Default)]
struct Rates {
    classes: [Option<Metered>; 3],
}

impl Rates {
    fn check(&mut self, class: Class, config: &RatesConfig, now: Instant) -> Verdict {
        let metered = self.classes[class.index()].get_or_insert(Metered {
            tokens: Bucket::new(now),
            refusals: Bucket::new(now),
        });
        let (per_sec, burst) = class.limit(config);
        let Err(wait) = metered.tokens.take(now, per_sec, burst) else {
            return Verdict::Go;
        };
        let over = config.kick_factor.saturating_sub(1).max(1);
        match metered.refusals.take(
            now,
            per_sec.saturating_mul(over),
            burst.saturating_mul(over),
        ) {
            Ok(()) => Verdict::Wait(wait),
            Err(_) => Verdict::Kick,
        }
    }
}

fn chat_rep(seq: u32, res: ResCode, cooldown: Duration, msg_id: u64, offline: bool) -> Bytes {
    codec::encode(&pb::ChatMessageChatRep {
        msghead: codec::head(MsgType::CchChatRep, seq),
        res: res as i32,
        cooldown_ms: duration_ms(cooldown),
        msg_id,
        offline,
    })
}

fn store_code(e: HistoryError) -> ResCode {
    match e {
        HistoryError::InboxFull => ResCode::ResInboxFull,
        HistoryError::SenderLimit => ResCode::ResSenderLimit,
        _ => ResCode::ResStoreFailed,
    }
}

fn duration_ms(d: Duration) -> u32 {
    // Round up so "1 ms left" is never reported as 0.
    d.as_micros().div_ceil(1000).min(u32::MAX as u128) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn request_buckets_stay_small() {
        assert_eq!(std::mem::size_of::<Option<Box<Rates>>>(), 8);
        assert!(std::mem::size_of::<Rates>() <= 96);
    }

    #[tokio::test(start_paused = true)]
    async fn a_bucket_allows_its_burst_then_its_rate() {
        let mut b = Bucket::new(Instant::now());
        // 2 per second, burst 5.
        for i in 0..5 {
            assert_eq!(b.take(Instant::now(), 2, 5), Ok(()), "request {i}");
        }
        assert_eq!(b.take(Instant::now(), 2, 5), Err(ms(500)));
        tokio::time::advance(ms(200)).await;
        assert_eq!(b.take(Instant::now(), 2, 5), Err(ms(300)));
        tokio::time::advance(ms(300)).await;
        assert_eq!(b.take(Instant::now(), 2, 5), Ok(()));
        assert_eq!(b.take(Instant::now(), 2, 5), Err(ms(500)));
        // A steady 2 per second is always allowed.
        for _ in 0..20 {
            tokio::time::advance(ms(500)).await;
            assert_eq!(b.take(Instant::now(), 2, 5), Ok(()));
        }
        // A long pause refills the burst, and no more.
        tokio::time::advance(Duration::from_secs(60)).await;
        for _ in 0..5 {
            assert_eq!(b.take(Instant::now(), 2, 5), Ok(()));
        }
        assert!(b.take(Instant::now(), 2, 5).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn refused_requests_close_only_past_the_kick_factor() {
        let config = RatesConfig::default();
        let (per_sec, burst) = Class::History.limit(&config);
        assert_eq!((per_sec, burst), (2, 5));
        let step = ms(1000 / (per_sec as u64 * 4));

        // Four times the limit, for a minute: refused, never closed.
        let mut rates = Rates::default();
        let (mut go, mut wait) = (0, 0);
        for _ in 0..(60 * per_sec * 4) {
            match rates.check(Class::History, &config, Instant::now()) {
                Verdict::Go => go += 1,
                Verdict::Wait(d) => {
                    assert!(d > Duration::ZERO && d <= ms(500));
                    wait += 1
                }
                Verdict::Kick => panic!("closed at four times the limit"),
            }
            tokio::time::advance(step).await;
        }
        assert!((120..=126).contains(&go), "{go}");
        assert!(wait > 300, "{wait}");

        // Ten times the limit: closed within a few seconds.
        let mut rates = Rates::default();
        let step = ms(1000 / (per_sec as u64 * 10));
        let mut sent = 0;
        loop {
            sent += 1;
            if rates.check(Class::History, &config, Instant::now()) == Verdict::Kick {
                break;
            }
            assert!(sent < 200, "never closed");
            tokio::time::advance(step).await;
        }
        // burst + 4 bursts of refusals, plus what refilled meanwhile.
        assert!(sent > 25, "{sent}");

        // Classes are independent: history abuse leaves heartbeats alone.
        assert_eq!(
            rates.check(Class::Cheap, &config, Instant::now()),
            Verdict::Go
        );
    }
}
