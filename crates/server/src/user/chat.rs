//! Chat policy: what a chat request must pass before the world sees it
//! (channel, mute, text, per-channel cooldown), the whisper lookup of a
//! player the registry does not know, and idempotent retries by client
//! message id ([`RecentSends`]).
//!
//! It owns the cooldown clocks and the memory of recent sends, and decides
//! each chat reply's code. It must never write a frame itself: a chat reply
//! always goes through the ordered queue in `replies`, and a line already
//! fanned out is never fanned out again.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::{FutureExt, Shared};
use guildchat_protocol::{codec, pb, ChatType, MsgType, ResCode};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::actor::UserActor;
use super::replies::duration_ms;
use crate::filter::Policy;
use crate::history::{HistoryError, PlayerRef};
use crate::ids::UserId;
use crate::stats::Stats;
use crate::world::{ChatLine, Target};

/// How long a session new to a node waits for the shared cooldown clocks.
const CLOCK_READ: Duration = Duration::from_millis(500);

/// The running clocks as `(channel, unix ms when it may speak again)`.
fn wall_clocks(ready_at: &[Option<Instant>; CHANNELS]) -> Vec<(usize, u64)> {
    let (now, wall) = (Instant::now(), crate::world::now_ms());
    ready_at
        .iter()
        .enumerate()
        .filter_map(|(slot, at)| {
            let left = at.as_ref()?.checked_duration_since(now)?;
            let left = u64::try_from(left.as_millis()).unwrap_or(u64::MAX);
            Some((slot, wall.saturating_add(left)))
        })
        .collect()
}

/// Number of chat channels (CHATTYPE values 0..=6).
pub(super) const CHANNELS: usize = 7;

/// How many client message ids a session remembers for retries.
const RECENT_SENDS: usize = 256;

/// A chat reply, before it is tagged with its connection.
pub(super) type ReplyFuture = Pin<Box<dyn Future<Output = Bytes> + Send + Sync>>;

/// The result of one accepted line, shared by its first reply and any
/// retry of the same client message id.
type OutcomeFuture = Pin<Box<dyn Future<Output = ResCode> + Send + Sync>>;
type SharedOutcome = Shared<OutcomeFuture>;

/// A clock reading later than any real deadline (for durations too large
/// to add to now).
pub(super) fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365 * 30)
}

/// One remembered send.
struct Sent {
    msg_id: u64,
    offline: bool,
    outcome: SharedOutcome,
}

/// The last [`RECENT_SENDS`] sends with a client message id, oldest first.
#[derive(Default)]
pub(super) struct RecentSends {
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

/// `wait` is the time that goes with the code: the cooldown (left, or
/// after a send), or the mute left with RES_MUTED.
fn chat_rep(seq: u32, res: ResCode, wait: Duration, msg_id: u64, offline: bool) -> Bytes {
    let (cooldown_ms, muted_ms) = match res {
        ResCode::ResMuted => (0, duration_ms(wait)),
        _ => (duration_ms(wait), 0),
    };
    codec::encode(&pb::ChatMessageChatRep {
        msghead: codec::head(MsgType::CchChatRep, seq),
        res: res as i32,
        cooldown_ms,
        msg_id,
        offline,
        muted_ms,
    })
}

fn store_code(e: HistoryError) -> ResCode {
    match e {
        HistoryError::InboxFull => ResCode::ResInboxFull,
        HistoryError::SenderLimit => ResCode::ResSenderLimit,
        _ => ResCode::ResStoreFailed,
    }
}

impl UserActor {
    /// A chat request's reply, still to settle: a retry of a known client
    /// message id gets the original outcome; anything else is checked and
    /// sent.
    pub(super) async fn chat_reply(&mut self, m: pb::ChatMessageChatReq, seq: u32) -> ReplyFuture {
        let nonce = m.client_msg_id;
        let slot = m.chattype.clamp(0, CHANNELS as i32 - 1) as usize;
        let channel = ChatType::try_from(m.chattype).unwrap_or(ChatType::ChatNone);
        let stats = self.stats.clone();
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
                    stats.metrics.chat(channel, res);
                    if res == ResCode::ResOk {
                        chat_rep(seq, res, cooldown, msg_id, offline)
                    } else {
                        chat_rep(seq, res, Duration::ZERO, 0, false)
                    }
                })
            }
            Err((res, cooldown)) => {
                stats.metrics.chat(channel, res);
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
        let Some(history) = &self.history else {
            sends.loaded = true;
            return;
        };
        // A failed read (the store away) is tried again at the next send,
        // so that a retry after the store is back is still recognised.
        match history.recent_nonces(self.id.0, RECENT_SENDS as u32).await {
            Ok(stored) => {
                sends.loaded = true;
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

    /// In a cluster, once per session new to this node: the clocks the
    /// player's last node left running (`cluster::clocks`). A read that
    /// fails or takes too long (NATS away) starts them afresh rather than
    /// hold the line up.
    async fn load_clocks(&mut self) {
        let Some(cluster) = self.services.cluster.clone() else {
            return;
        };
        let read = async {
            if !cluster.connected() {
                return Vec::new();
            }
            match tokio::time::timeout(CLOCK_READ, cluster.clocks(self.id)).await {
                Ok(Ok(clocks)) => clocks,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot read the shared cooldown clocks");
                    Vec::new()
                }
                Err(_) => Vec::new(),
            }
        };
        let clocks = read.await;
        let (now, wall) = (Instant::now(), crate::world::now_ms());
        let ready = self
            .ready_at
            .get_or_insert_with(|| Box::new([None; CHANNELS]));
        for (slot, at) in clocks {
            if slot < CHANNELS && at > wall {
                ready[slot] = now.checked_add(Duration::from_millis(at - wall));
            }
        }
    }

    fn cooldown_left(&self, slot: usize) -> Duration {
        let now = Instant::now();
        self.ready_at
            .as_ref()
            .and_then(|r| r[slot])
            .map_or(Duration::ZERO, |t| t.saturating_duration_since(now))
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
        if let Some(left) = self.services.moderation.mute_left(self.id) {
            return Err((ResCode::ResMuted, left));
        }
        if m.context.trim().is_empty() {
            return Err((ResCode::ResTextEmpty, none));
        }
        if m.context.chars().count() > rule.max_chars {
            return Err((ResCode::ResTextTooLong, none));
        }
        // Filtered here, in the sender's actor, before the line is encoded
        // or stored: neither recipients nor history see the raw text.
        let filter = self.services.filter.load();
        let text = match rule.filter {
            Policy::Refuse if !filter.is_clean(&m.context) => {
                return Err((ResCode::ResFiltered, none));
            }
            Policy::Refuse => m.context,
            Policy::Mask => match filter.mask(&m.context) {
                std::borrow::Cow::Borrowed(_) => m.context,
                std::borrow::Cow::Owned(masked) => masked,
            },
        };
        // A session new to this node has no clocks yet: another node may
        // have left some running.
        if self.ready_at.is_none() {
            self.load_clocks().await;
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
            text,
            target,
            nonce: m.client_msg_id,
            accepted: std::time::Instant::now(),
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
                        // An offline target who blocks the sender refuses
                        // the whisper as a connected one would; a block
                        // list that cannot be read refuses it too.
                        let blocked = if let Some(cluster) = &self.services.cluster {
                            cluster
                                .blocks(UserId(id))
                                .await
                                .map(|b| b.contains(&self.id.0))
                                .map_err(|_| ())
                        } else if history.may_have_blocks(id) {
                            history
                                .blocks(id)
                                .await
                                .map(|b| b.contains(&self.id.0))
                                .map_err(|_| ())
                        } else {
                            Ok(false)
                        };
                        match blocked {
                            Ok(true) => return Err((ResCode::ResBlocked, none)),
                            Err(_) => return Err((ResCode::ResInternal, none)),
                            Ok(false) => {}
                        }
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
        let clocks = self
            .ready_at
            .get_or_insert_with(|| Box::new([None; CHANNELS]));
        clocks[slot] = Some(ready);
        if let Some(cluster) = &self.services.cluster {
            if rule.cooldown() >= crate::cluster::MOVING_COOLDOWN {
                cluster.put_clocks(self.id, &wall_clocks(clocks));
            }
        }
        Ok(Accepted {
            msg_id: outcome.msg_id.0,
            cooldown: rule.cooldown(),
            durable: outcome.durable,
            offline: outcome.offline,
        })
    }
}
