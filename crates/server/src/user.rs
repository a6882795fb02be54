//! The user actor: one per logged-in player, owning that player's chat
//! state: identity, channel mask, per-channel cooldown clocks and mute.
//!
//! It reads two inputs: requests decoded by the current connection's reader,
//! and control messages from the world actor (takeover, mute). It survives
//! its connection: on takeover it simply swaps in the new connection's ends,
//! so nothing is reloaded and a relogin cannot reset a cooldown. It never
//! reads or writes a socket itself; it queues frames through [`ConnTx`].

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use guildchat_protocol::{
    codec, pb, ChatType, ClientMsg, KickReason, MsgId as WireMsg, ResCode, UNMASKABLE,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, instrument};

use crate::config::Config;
use crate::ids::UserId;
use crate::net::ConnTx;
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

/// Messages from the world actor.
pub(crate) enum UserMsg {
    /// Takeover: from now on, talk to this connection.
    Attach {
        conn: ConnTx,
        inbound: mpsc::Receiver<ClientMsg>,
    },
    /// Mute for this long from now; `None` lifts it.
    Mute { duration: Option<Duration> },
}

/// The world's handle to a user actor. Only the world's registry holds one,
/// so removing the player from the registry ends the actor.
#[derive(Debug)]
pub struct UserHandle {
    tx: mpsc::Sender<UserMsg>,
}

impl UserHandle {
    pub(crate) fn spawn(
        identity: Identity,
        conn: ConnTx,
        inbound: mpsc::Receiver<ClientMsg>,
        world: WorldHandle,
        config: Arc<Config>,
        stats: Arc<Stats>,
    ) -> UserHandle {
        let (tx, mailbox) = mpsc::channel(USER_MAILBOX);
        let actor = UserActor {
            id: identity.user,
            identity,
            conn: Some(conn),
            inbound: Some(inbound),
            mailbox,
            world,
            config,
            stats,
            mask: 0,
            ready_at: [None; CHANNELS],
            muted_until: None,
        };
        tokio::spawn(actor.run());
        UserHandle { tx }
    }

    /// Never waits; false if the actor is gone or its mailbox is full.
    pub(crate) fn try_send(&self, msg: UserMsg) -> bool {
        self.tx.try_send(msg).is_ok()
    }
}

impl std::fmt::Debug for UserMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UserMsg::Attach { conn, .. } => write!(f, "Attach({})", conn.id()),
            UserMsg::Mute { duration } => write!(f, "Mute({duration:?})"),
        }
    }
}

struct UserActor {
    id: UserId,
    identity: Identity,
    conn: Option<ConnTx>,
    inbound: Option<mpsc::Receiver<ClientMsg>>,
    mailbox: mpsc::Receiver<UserMsg>,
    world: WorldHandle,
    config: Arc<Config>,
    stats: Arc<Stats>,
    mask: u32,
    /// When each channel may be used again.
    ready_at: [Option<Instant>; CHANNELS],
    muted_until: Option<Instant>,
}

/// Waits for the next request, or forever when no connection is attached.
async fn next_request(inbound: &mut Option<mpsc::Receiver<ClientMsg>>) -> Option<ClientMsg> {
    match inbound {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

impl UserActor {
    #[instrument(name = "user", skip_all, fields(user = %self.id, name = %self.identity.name))]
    async fn run(mut self) {
        loop {
            tokio::select! {
                msg = self.mailbox.recv() => match msg {
                    Some(msg) => self.control(msg),
                    // The world removed this player: the session is over.
                    None => break,
                },
                req = next_request(&mut self.inbound) => match req {
                    Some(req) => self.request(req).await,
                    None => self.connection_lost().await,
                },
            }
        }
        debug!("user actor stopped");
    }

    fn control(&mut self, msg: UserMsg) {
        match msg {
            UserMsg::Attach { conn, inbound } => {
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

    async fn connection_lost(&mut self) {
        self.inbound = None;
        if let Some(conn) = self.conn.take() {
            self.world.detached(self.id, conn.id()).await;
        }
    }

    fn reply(&self, frame: Bytes) {
        if let Some(conn) = &self.conn {
            conn.deliver(frame, crate::net::Priority::Keep, &self.stats);
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
            ClientMsg::Heartbeat(m) => self.reply(codec::encode(&pb::ChatMessageHeartbeatRep {
                msghead: codec::head(WireMsg::ChcHeartbeatRep, seq),
                client_time_ms: m.client_time_ms,
                server_time_ms: crate::world::now_ms(),
            })),
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
                let (res, cooldown_ms, msg_id) = match self.chat(m).await {
                    Ok((msg_id, cooldown)) => (ResCode::ResOk, cooldown, msg_id),
                    Err((res, cooldown)) => (res, cooldown, 0),
                };
                self.reply(codec::encode(&pb::ChatMessageChatRep {
                    msghead: codec::head(WireMsg::CchChatRep, seq),
                    res: res as i32,
                    cooldown_ms: duration_ms(cooldown_ms),
                    msg_id,
                }));
            }
        }
    }

    /// Checks a chat request against this player's state, then hands it to
    /// the world. Returns (msg_id, cooldown) or (code, remaining cooldown).
    async fn chat(
        &mut self,
        m: pb::ChatMessageChatReq,
    ) -> Result<(u64, Duration), (ResCode, Duration)> {
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
        if let Some(ready) = self.ready_at[slot].filter(|t| now < *t) {
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
        match self.world.chat(line).await {
            Ok(id) => {
                // The clock starts when the line is accepted; it lives in
                // this actor, so neither a reconnect nor a takeover resets
                // it.
                self.ready_at[slot] = Some(now + rule.cooldown());
                Ok((id.0, rule.cooldown()))
            }
            Err(code) => Err((code, none)),
        }
    }
}

fn duration_ms(d: Duration) -> u32 {
    // Round up so "1 ms left" is never reported as 0.
    d.as_micros().div_ceil(1000).min(u32::MAX as u128) as u32
}
