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
//! This file owns the public surface only: [`UserHandle`], the messages
//! the world and the reader send, and the hand-off slot. It must never
//! hold session state; that lives in the private actor. The actor's jobs
//! are split by file:
//!
//! - `actor`: the actor itself, its run loop, attach and end, and request
//!   dispatch;
//! - `chat`: chat policy (mute, text, cooldowns) and idempotent retries;
//! - `rates`: the per-kind request buckets;
//! - `offline`: the delivery protocol (offline-whisper barrier, receipts);
//! - `replies`: reply ordering behind the store, and history pages.

mod actor;
mod chat;
mod offline;
mod rates;
mod replies;

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use guildchat_protocol::{codec, pb, ClientMsg, KickReason, MsgType};
use tokio::sync::{mpsc, Notify};
use tracing::{info_span, Instrument};

use crate::config::Config;
use crate::filter::FilterHandle;
use crate::history::HistoryHandle;
use crate::moderation::Moderation;
use crate::net::ConnTx;
use crate::stats::Stats;
use crate::world::{Identity, WorldHandle};

use actor::UserActor;

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

/// What a connection's reader hands the user actor. The queue carries it
/// boxed (see Memory layout in ARCHITECTURE.md).
#[derive(Debug)]
pub enum Inbound {
    /// A decoded request.
    Request(ClientMsg),
    /// The payload of a websocket pong: proof that the client has read
    /// every frame queued before the matching ping.
    Pong(Bytes),
}

/// Messages from the world actor. The mailbox carries them boxed (see
/// Memory layout in ARCHITECTURE.md).
pub(crate) enum UserMsg {
    /// The session is over (shutdown): answer every pending chat reply,
    /// then close the connection with this reason, and stop.
    End(KickReason),
}

impl std::fmt::Debug for UserMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UserMsg::End(reason) => write!(f, "End({reason:?})"),
        }
    }
}

/// What every user actor shares, behind one pointer: sanctions in force,
/// the word filter, and in a cluster the link to the other nodes.
#[derive(Debug, Default)]
pub struct Services {
    pub moderation: Arc<Moderation>,
    pub filter: FilterHandle,
    pub cluster: Option<crate::cluster::Cluster>,
}

/// A connection's ends, handed over once its login reply, replay and
/// offline whispers are queued (new session, takeover or resume).
pub(crate) struct Attach {
    pub conn: ConnTx,
    pub inbound: mpsc::Receiver<Box<Inbound>>,
    /// The offline-whisper barrier queued on this connection: its token and
    /// exactly the msg_ids its pong acknowledges.
    pub offline_ack: Option<(u64, Vec<u64>)>,
    /// In a cluster, a session new to this node: the mask the player set
    /// on another node.
    pub mask: Option<u32>,
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
        services: Arc<Services>,
    ) -> UserHandle {
        let (tx, mailbox) = mpsc::channel(USER_MAILBOX);
        let handoff = Arc::new(Handoff {
            slot: Mutex::new(None),
            ready: Notify::new(),
        });
        // The rest of the identity (name, groups) is the world's business;
        // the name only goes into the span.
        let span = info_span!("user", user = %identity.user, name = %identity.name);
        let actor = UserActor::new(
            identity.user,
            mailbox,
            handoff.clone(),
            world,
            history,
            config,
            stats,
            services,
        );
        tokio::spawn(task(actor).instrument(span));
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

/// The actor's task: a plain async block (see Memory layout in
/// ARCHITECTURE.md).
#[allow(clippy::manual_async_fn)]
fn task(mut actor: UserActor) -> impl std::future::Future<Output = ()> + Send {
    async move { actor.run().await }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::LocalFanout;

    /// The user actor's task is per-player memory for the session's life.
    #[tokio::test]
    async fn an_idle_user_actor_task_stays_small() {
        let config = Arc::new(Config::default());
        let stats = Arc::new(Stats::default());
        let world = WorldHandle::new(
            config.clone(),
            stats.clone(),
            Box::new(LocalFanout),
            None,
            0,
            Default::default(),
        );
        let (_tx, mailbox) = mpsc::channel(USER_MAILBOX);
        let handoff = Arc::new(Handoff {
            slot: Mutex::new(None),
            ready: Notify::new(),
        });
        let actor = UserActor::new(
            crate::ids::UserId(1),
            mailbox,
            handoff,
            world,
            None,
            config,
            stats,
            Default::default(),
        );
        let run = task(actor);
        let size = std::mem::size_of_val(&run);
        // 480 bytes today (see Memory layout in ARCHITECTURE.md).
        assert!(
            size <= 512,
            "user actor future is {size} bytes (see Memory layout in ARCHITECTURE.md)"
        );
    }
}
