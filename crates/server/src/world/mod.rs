//! The world actor: the one owner of the player registry.
//!
//! It handles login (new session or takeover), detach, chat fan-out, masks,
//! group membership, kicks, mutes, announcements and shutdown. It never
//! touches a socket and never waits on a player: everything it sends to a
//! connection or a user actor is `try_send`.
//!
//! [`WorldHandle`] is the public face; the actor and its messages are
//! private to this module.

mod actor;
pub mod fanout;
pub mod registry;
pub mod replay;

use std::sync::Arc;

use guildchat_protocol::{ChatType, KickReason, ResCode};
use tokio::sync::{mpsc, oneshot};

use crate::config::Config;
use crate::history::{Conversation, HistoryError, HistoryHandle, StoredMsg};
use crate::ids::{ConnId, GuildId, MsgId, SceneId, TeamId, UserId};
use crate::net::ConnTx;
use crate::stats::Stats;
pub use actor::now_ms;
pub(crate) use actor::{OFFLINE_ACK, RECEIPT};
pub use fanout::{Audience, Fanout, LocalFanout};

/// Capacity of the world actor's inbox. When it is full, senders (user
/// actors and connection readers) wait: that is the backpressure that
/// reaches a client's socket when the world is busy. Nothing is dropped.
const WORLD_INBOX: usize = 4096;

/// Who a player is, as established by the login token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: UserId,
    pub name: String,
    pub guild: GuildId,
    pub team: TeamId,
    pub scene: SceneId,
}

/// Where a whisper goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    None,
    Id(UserId),
    Name(String),
    /// A player the store knows (has logged in at least once), resolved by
    /// the user actor after the world found no such player registered: the
    /// world may store the whisper for them as an offline whisper.
    Known(UserId, String),
}

/// Who an announcement goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnnounceTo {
    Everyone,
    Guild(GuildId),
    Team(TeamId),
    Scene(SceneId),
    Player(UserId),
}

/// Whether a player's session has a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    Connected,
    /// The connection dropped; the session waits for a resume.
    Lingering,
}

/// A player's session as operators see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlayerView {
    pub name: String,
    pub state: SessionState,
    pub guild: GuildId,
    pub team: TeamId,
    pub scene: SceneId,
    pub mask: u32,
}

/// The world actor is gone: only after a bug killed it, or at the very end
/// of shutdown. Callers answer `RES_INTERNAL` instead of panicking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("world actor stopped")]
pub struct WorldGone;

impl From<WorldGone> for ResCode {
    fn from(_: WorldGone) -> ResCode {
        ResCode::ResInternal
    }
}

/// A chat line a user actor has already checked (cooldown, mute, text).
#[derive(Debug, Clone)]
pub struct ChatLine {
    pub from: UserId,
    pub channel: ChatType,
    pub text: String,
    pub target: Target,
    /// The client's message id for safe retries (0: none); kept with the
    /// stored line.
    pub nonce: u64,
    /// When the sender's actor accepted the request: fan-out latency is
    /// measured from here to the last frame queued.
    pub accepted: std::time::Instant,
}

/// What a chat line became.
pub struct ChatOutcome {
    pub msg_id: MsgId,
    /// Resolves once the line is durable (or failed to be); `None` without
    /// a history store.
    pub durable: Option<oneshot::Receiver<Result<(), HistoryError>>>,
    /// A whisper stored for a player without a live connection: resolves
    /// once the offline row is committed (or refused).
    pub offline: Option<oneshot::Receiver<Result<(), HistoryError>>>,
}

/// What a login request carries to the world.
pub(crate) struct LoginArgs {
    pub identity: Identity,
    pub conn: ConnTx,
    pub inbound: mpsc::Receiver<Box<crate::user::Inbound>>,
    pub seq: u32,
    /// Resume cursor from the login request (0: none).
    pub last_msg_id: u64,
    /// In a cluster: the session directory revision this login claimed
    /// (0 alone).
    pub claim: u64,
}

enum WorldMsg {
    Login {
        args: LoginArgs,
        respond_to: oneshot::Sender<Result<(), ResCode>>,
    },
    Detached {
        user: UserId,
        conn: ConnId,
    },
    /// The offline whispers of a pending login have been read: queue the
    /// login reply, replay and whispers, and make the connection visible.
    Ready {
        user: UserId,
        conn: ConnId,
        offline: Vec<crate::history::Waiting>,
        /// The players this one blocks, read for a new session.
        blocks: Option<Vec<u64>>,
        /// In a cluster, a resume's lines from the stream.
        backfill: Option<Box<crate::cluster::Backfill>>,
        /// In a cluster, for a session new to this node: the player's
        /// mask, as set on another node.
        mask: Option<u32>,
    },
    Block {
        user: UserId,
        target: UserId,
        add: bool,
        respond_to: oneshot::Sender<bool>,
    },
    BlockList {
        user: UserId,
        respond_to: oneshot::Sender<Vec<UserId>>,
    },
    /// The client answered a receipt ping: it has read every whisper up to
    /// `upto` that was queued before it.
    Receipt {
        user: UserId,
        conn: ConnId,
        upto: u64,
    },
    Chat {
        line: ChatLine,
        respond_to: oneshot::Sender<Result<ChatOutcome, ResCode>>,
    },
    HistoryScope {
        user: UserId,
        channel: ChatType,
        group: u64,
        peer: u64,
        respond_to: oneshot::Sender<Result<Conversation, ResCode>>,
    },
    SetMask {
        user: UserId,
        mask: u32,
        respond_to: oneshot::Sender<()>,
    },
    Online {
        respond_to: oneshot::Sender<(u32, u32)>,
    },
    Backlog {
        user: UserId,
        respond_to: oneshot::Sender<Option<(usize, usize)>>,
    },
    Regroup {
        user: UserId,
        guild: Option<GuildId>,
        team: Option<TeamId>,
        scene: Option<SceneId>,
        respond_to: oneshot::Sender<Option<PlayerView>>,
    },
    Counts {
        respond_to: oneshot::Sender<(u64, u64)>,
    },
    Player {
        user: UserId,
        respond_to: oneshot::Sender<Option<PlayerView>>,
    },
    FindName {
        name: String,
        respond_to: oneshot::Sender<Option<UserId>>,
    },
    Disband {
        guild: GuildId,
        respond_to: oneshot::Sender<usize>,
    },
    GuildOnline {
        guild: GuildId,
        respond_to: oneshot::Sender<Vec<UserId>>,
    },
    Recall {
        msg: StoredMsg,
        respond_to: oneshot::Sender<usize>,
    },
    Kick {
        user: UserId,
        reason: KickReason,
        respond_to: oneshot::Sender<bool>,
    },
    Announce {
        text: String,
        to: AnnounceTo,
        respond_to: oneshot::Sender<MsgId>,
    },
    Shutdown {
        respond_to: oneshot::Sender<()>,
    },
    SessionsByNode {
        respond_to: oneshot::Sender<Vec<(crate::ids::NodeId, u64)>>,
    },
    Drain {
        batch: usize,
        respond_to: oneshot::Sender<usize>,
    },
    /// Another node said it is alive.
    NodeBeat {
        node: crate::ids::NodeId,
        /// Which run of the node: it changes when the node restarts.
        incarnation: u64,
    },
    Locate {
        user: UserId,
        respond_to: oneshot::Sender<Option<crate::ids::NodeId>>,
    },
    /// The shared block lists changed: `user` now blocks `blocked`.
    Blocks {
        user: UserId,
        blocked: Box<[UserId]>,
    },
    /// A line from the cluster's stream, at sequence `seq`.
    Bus {
        line: Box<crate::cluster::BusLine>,
        seq: u64,
        generation: u64,
    },
    /// The session directory changed: `holder` has `user`'s session as of
    /// `revision`.
    Directory {
        user: UserId,
        holder: crate::cluster::Holder,
        revision: u64,
    },
}

/// Handle to the world actor. Cheap to clone; the actor stops when the last
/// handle is dropped.
#[derive(Clone)]
pub struct WorldHandle {
    tx: mpsc::Sender<WorldMsg>,
}

impl WorldHandle {
    /// Spawns the world actor. `first_msg_id` is the highest msg_id ever
    /// stored (0 if none); new ids are above it.
    pub fn new(
        config: Arc<Config>,
        stats: Arc<Stats>,
        fanout: Box<dyn Fanout>,
        history: Option<HistoryHandle>,
        first_msg_id: u64,
        services: Arc<crate::user::Services>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(WORLD_INBOX);
        let handle = WorldHandle { tx };
        let actor = actor::World::new(
            config,
            stats,
            fanout,
            rx,
            handle.downgrade(),
            history,
            first_msg_id,
            services,
        );
        tokio::spawn(actor.run());
        handle
    }

    /// Messages waiting in the world's inbox now (a gauge for `/metrics`).
    pub fn inbox_depth(&self) -> usize {
        WORLD_INBOX - self.tx.capacity()
    }

    fn downgrade(&self) -> WeakWorld {
        WeakWorld(self.tx.downgrade())
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> WorldMsg,
    ) -> Result<T, WorldGone> {
        let (respond_to, rx) = oneshot::channel();
        self.tx
            .send(make(respond_to))
            .await
            .map_err(|_| WorldGone)?;
        rx.await.map_err(|_| WorldGone)
    }

    async fn tell(&self, msg: WorldMsg) -> Result<(), WorldGone> {
        self.tx.send(msg).await.map_err(|_| WorldGone)
    }

    /// Registers a player, or hands an existing session the new connection
    /// (takeover or resume). On success the connection is the session's,
    /// but not yet visible to fan-out: the world queues the login reply as
    /// its first frame, then the replay and the offline whispers, and only
    /// then lets live traffic and the user actor at it.
    pub(crate) async fn login(&self, args: LoginArgs) -> Result<(), ResCode> {
        self.ask(|respond_to| WorldMsg::Login { args, respond_to })
            .await?
    }

    /// A user actor's connection went away.
    pub(crate) async fn detached(&self, user: UserId, conn: ConnId) -> Result<(), WorldGone> {
        self.tell(WorldMsg::Detached { user, conn }).await
    }

    /// A receipt ping came back on `conn`.
    pub(crate) async fn receipt(
        &self,
        user: UserId,
        conn: ConnId,
        upto: u64,
    ) -> Result<(), WorldGone> {
        self.tell(WorldMsg::Receipt { user, conn, upto }).await
    }

    /// Fans a checked chat line out; returns its msg_id and, with a
    /// history store, what remains to make it durable.
    pub async fn chat(&self, line: ChatLine) -> Result<ChatOutcome, ResCode> {
        self.ask(|respond_to| WorldMsg::Chat { line, respond_to })
            .await?
    }

    /// The stored conversation `user` may read for a history request on
    /// `channel` (`group`: a guild or team id, 0 = own; `peer`: the other
    /// player of a whisper conversation).
    pub async fn history_scope(
        &self,
        user: UserId,
        channel: ChatType,
        group: u64,
        peer: u64,
    ) -> Result<Conversation, ResCode> {
        self.ask(|respond_to| WorldMsg::HistoryScope {
            user,
            channel,
            group,
            peer,
            respond_to,
        })
        .await?
    }

    /// Updates the mask fan-out uses for this player.
    pub async fn set_mask(&self, user: UserId, mask: u32) -> Result<(), WorldGone> {
        self.ask(|respond_to| WorldMsg::SetMask {
            user,
            mask,
            respond_to,
        })
        .await
    }

    /// (players online, configured maximum)
    pub async fn online(&self) -> Result<(u32, u32), WorldGone> {
        self.ask(|respond_to| WorldMsg::Online { respond_to }).await
    }

    /// (frames, bytes) queued for a player's connection; `None` if the
    /// player has no connection.
    pub async fn backlog(&self, user: UserId) -> Result<Option<(usize, usize)>, WorldGone> {
        self.ask(|respond_to| WorldMsg::Backlog { user, respond_to })
            .await
    }

    /// Moves a player to another guild, team or scene (`None` = unchanged),
    /// at once: the next line on the new guild reaches them, the old one's
    /// does not. Returns the player's new state; `None` if the player has
    /// no session (neither connected nor lingering).
    pub async fn regroup(
        &self,
        user: UserId,
        guild: Option<GuildId>,
        team: Option<TeamId>,
        scene: Option<SceneId>,
    ) -> Result<Option<PlayerView>, WorldGone> {
        self.ask(|respond_to| WorldMsg::Regroup {
            user,
            guild,
            team,
            scene,
            respond_to,
        })
        .await
    }

    /// Adds (or, with `add` false, lifts) a block of `user` on `target`
    /// for fan-out. Without a store this is the only copy, capped at
    /// `max_blocks`: false when the cap refused it or the player has no
    /// session.
    pub(crate) async fn block(
        &self,
        user: UserId,
        target: UserId,
        add: bool,
    ) -> Result<bool, WorldGone> {
        self.ask(|respond_to| WorldMsg::Block {
            user,
            target,
            add,
            respond_to,
        })
        .await
    }

    /// Who `user` blocks, in increasing id order.
    pub(crate) async fn blocks(&self, user: UserId) -> Result<Vec<UserId>, WorldGone> {
        self.ask(|respond_to| WorldMsg::BlockList { user, respond_to })
            .await
    }

    /// (players with a session, of them lingering without a connection).
    pub async fn counts(&self) -> Result<(u64, u64), WorldGone> {
        self.ask(|respond_to| WorldMsg::Counts { respond_to }).await
    }

    /// A player's session, if they have one.
    pub async fn player(&self, user: UserId) -> Result<Option<PlayerView>, WorldGone> {
        self.ask(|respond_to| WorldMsg::Player { user, respond_to })
            .await
    }

    /// The player with a session who has this name, if any.
    pub async fn find_name(&self, name: String) -> Result<Option<UserId>, WorldGone> {
        self.ask(|respond_to| WorldMsg::FindName { name, respond_to })
            .await
    }

    /// Every member of the guild with a session leaves it. Returns how many.
    pub async fn disband(&self, guild: GuildId) -> Result<usize, WorldGone> {
        self.ask(|respond_to| WorldMsg::Disband { guild, respond_to })
            .await
    }

    /// The members of a guild with a session, in increasing id order.
    pub async fn guild_online(&self, guild: GuildId) -> Result<Vec<UserId>, WorldGone> {
        self.ask(|respond_to| WorldMsg::GuildOnline { guild, respond_to })
            .await
    }

    /// Drops a removed line from the replay buffers of its audience (its
    /// conversation's members with a session) and from whispers waiting to
    /// be confirmed, and tells those connected that it is gone, with
    /// `CHC_Notify_Recall`. Returns how many were told.
    pub async fn recall(&self, msg: StoredMsg) -> Result<usize, WorldGone> {
        self.ask(|respond_to| WorldMsg::Recall { msg, respond_to })
            .await
    }

    /// Disconnects a player with a kick notice and ends the session at once:
    /// it does not linger, so a fast reconnect starts a new one. Returns
    /// false if the player is not online.
    pub async fn kick(&self, user: UserId, reason: KickReason) -> Result<bool, WorldGone> {
        self.ask(|respond_to| WorldMsg::Kick {
            user,
            reason,
            respond_to,
        })
        .await
    }

    /// Sends a system message (CHAT_ALL) to everyone, or to one guild,
    /// team, scene or player. Kept in history (the system conversation)
    /// when it goes to everyone.
    pub async fn announce(&self, text: String, to: AnnounceTo) -> Result<MsgId, WorldGone> {
        self.ask(|respond_to| WorldMsg::Announce {
            text,
            to,
            respond_to,
        })
        .await
    }

    /// In a cluster, the node that holds the player's session, as this
    /// node knows it: itself, another node (as the session directory last
    /// said), or none.
    pub async fn locate(&self, user: UserId) -> Result<Option<crate::ids::NodeId>, WorldGone> {
        self.ask(|respond_to| WorldMsg::Locate { user, respond_to })
            .await
    }

    /// In a cluster: how many sessions each live node holds (this one
    /// from its registry, the others from the session directory), every
    /// live node listed, with 0 if it holds none.
    pub async fn sessions_by_node(&self) -> Result<Vec<(crate::ids::NodeId, u64)>, WorldGone> {
        self.ask(|respond_to| WorldMsg::SessionsByNode { respond_to })
            .await
    }

    /// Ends up to `batch` sessions with the reconnect kick (a drain);
    /// returns how many sessions are left.
    pub async fn drain(&self, batch: usize) -> Result<usize, WorldGone> {
        self.ask(|respond_to| WorldMsg::Drain { batch, respond_to })
            .await
    }

    /// A node's heartbeat.
    pub(crate) async fn node_beat(
        &self,
        node: crate::ids::NodeId,
        incarnation: u64,
    ) -> Result<(), WorldGone> {
        self.tell(WorldMsg::NodeBeat { node, incarnation }).await
    }

    /// `user`'s block list as the shared bucket now has it. Waits while
    /// the world's inbox is full: the bucket's watch keeps the changes.
    pub(crate) async fn blocks_of(
        &self,
        user: UserId,
        blocked: Box<[UserId]>,
    ) -> Result<(), WorldGone> {
        self.tell(WorldMsg::Blocks { user, blocked }).await
    }

    /// A line from the cluster's stream. Waits while the world's inbox is
    /// full: the stream keeps the lines meanwhile.
    pub(crate) async fn bus_line(
        &self,
        line: crate::cluster::BusLine,
        seq: u64,
        generation: u64,
    ) -> Result<(), WorldGone> {
        self.tell(WorldMsg::Bus {
            line: Box::new(line),
            seq,
            generation,
        })
        .await
    }

    /// A change in the cluster's session directory.
    pub(crate) async fn directory(
        &self,
        user: UserId,
        holder: crate::cluster::Holder,
        revision: u64,
    ) -> Result<(), WorldGone> {
        self.tell(WorldMsg::Directory {
            user,
            holder,
            revision,
        })
        .await
    }

    /// Refuses new logins and ends every session: each user actor answers
    /// its pending chat replies, then its connection gets the SHUTDOWN kick.
    pub async fn shutdown(&self) -> Result<(), WorldGone> {
        self.ask(|respond_to| WorldMsg::Shutdown { respond_to })
            .await
    }
}

/// A handle that does not keep the world alive; user actors hold one so the
/// world can stop once the server has dropped its handles.
#[derive(Clone)]
pub(crate) struct WeakWorld(mpsc::WeakSender<WorldMsg>);

impl WeakWorld {
    pub(crate) fn upgrade(&self) -> Option<WorldHandle> {
        self.0.upgrade().map(|tx| WorldHandle { tx })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// There is one world actor, so its size is not per-player memory; the
    /// guard catches a handler that starts keeping a large value inline in
    /// the run loop across an await, which shows as a jump here.
    #[tokio::test]
    async fn the_world_actor_task_stays_small() {
        let config = Arc::new(Config::default());
        let (tx, rx) = mpsc::channel(WORLD_INBOX);
        let handle = WorldHandle { tx };
        let actor = actor::World::new(
            config,
            Arc::new(Stats::default()),
            Box::new(LocalFanout),
            rx,
            handle.downgrade(),
            None,
            0,
            Default::default(),
        );
        let run = actor.run();
        let size = std::mem::size_of_val(&run);
        // 1256 bytes today (see Memory layout in ARCHITECTURE.md): one per
        // process, so the bound guards against a large field creeping in,
        // not against a few words.
        assert!(
            size <= 1344,
            "world actor future is {size} bytes (see Memory layout in ARCHITECTURE.md)"
        );
    }
}
