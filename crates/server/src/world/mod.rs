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
use std::time::Duration;

use guildchat_protocol::{ChatType, KickReason, ResCode};
use tokio::sync::{mpsc, oneshot};

use crate::config::Config;
use crate::history::{Conversation, HistoryError, HistoryHandle, StoredMsg};
use crate::ids::{GuildId, MsgId, SceneId, TeamId, UserId};
use crate::net::ConnTx;
use crate::stats::Stats;
pub use actor::now_ms;
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
}

/// A chat line a user actor has already checked (cooldown, mute, text).
#[derive(Debug, Clone)]
pub struct ChatLine {
    pub from: UserId,
    pub channel: ChatType,
    pub text: String,
    pub target: Target,
}

/// What a chat line became.
pub struct ChatOutcome {
    pub msg_id: MsgId,
    /// Resolves once the line is durable (or failed to be); `None` without
    /// a history store.
    pub durable: Option<oneshot::Receiver<Result<(), HistoryError>>>,
    /// A whisper to a player who is not registered: to store for their
    /// next login.
    pub offline: Option<(UserId, StoredMsg)>,
}

/// What a login request carries to the world.
pub(crate) struct LoginArgs {
    pub identity: Identity,
    pub conn: ConnTx,
    pub inbound: mpsc::Receiver<Box<crate::user::Inbound>>,
    pub seq: u32,
    /// Resume cursor from the login request (0: none).
    pub last_msg_id: u64,
}

enum WorldMsg {
    Login {
        args: LoginArgs,
        respond_to: oneshot::Sender<Result<(), ResCode>>,
    },
    Detached {
        user: UserId,
        conn: crate::ids::ConnId,
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
        respond_to: oneshot::Sender<bool>,
    },
    Mute {
        user: UserId,
        duration: Option<Duration>,
        respond_to: oneshot::Sender<bool>,
    },
    Kick {
        user: UserId,
        reason: KickReason,
        respond_to: oneshot::Sender<bool>,
    },
    Announce {
        text: String,
        respond_to: oneshot::Sender<MsgId>,
    },
    Shutdown {
        respond_to: oneshot::Sender<()>,
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
        );
        tokio::spawn(actor.run());
        handle
    }

    fn downgrade(&self) -> WeakWorld {
        WeakWorld(self.tx.downgrade())
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> WorldMsg) -> T {
        let (respond_to, rx) = oneshot::channel();
        self.tx
            .send(make(respond_to))
            .await
            .expect("world actor stopped");
        rx.await.expect("world actor stopped")
    }

    /// Registers a player, or hands an existing session the new connection
    /// (takeover). On success the world has already queued the login reply
    /// as the connection's first frame.
    pub(crate) async fn login(&self, args: LoginArgs) -> Result<(), ResCode> {
        self.ask(|respond_to| WorldMsg::Login { args, respond_to })
            .await
    }

    /// A user actor's connection went away.
    pub(crate) async fn detached(&self, user: UserId, conn: crate::ids::ConnId) {
        self.tx
            .send(WorldMsg::Detached { user, conn })
            .await
            .expect("world actor stopped");
    }

    /// Fans a checked chat line out; returns its msg_id and, with a
    /// history store, what remains to make it durable.
    pub async fn chat(&self, line: ChatLine) -> Result<ChatOutcome, ResCode> {
        self.ask(|respond_to| WorldMsg::Chat { line, respond_to })
            .await
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
        .await
    }

    /// Updates the mask fan-out uses for this player.
    pub async fn set_mask(&self, user: UserId, mask: u32) {
        self.ask(|respond_to| WorldMsg::SetMask {
            user,
            mask,
            respond_to,
        })
        .await
    }

    /// (players online, configured maximum)
    pub async fn online(&self) -> (u32, u32) {
        self.ask(|respond_to| WorldMsg::Online { respond_to }).await
    }

    /// (frames, bytes) queued for a player's connection; `None` if the
    /// player has no connection.
    pub async fn backlog(&self, user: UserId) -> Option<(usize, usize)> {
        self.ask(|respond_to| WorldMsg::Backlog { user, respond_to })
            .await
    }

    /// Moves a player to another guild, team or scene (`None` = unchanged).
    /// Returns false if the player is not online.
    pub async fn regroup(
        &self,
        user: UserId,
        guild: Option<GuildId>,
        team: Option<TeamId>,
        scene: Option<SceneId>,
    ) -> bool {
        self.ask(|respond_to| WorldMsg::Regroup {
            user,
            guild,
            team,
            scene,
            respond_to,
        })
        .await
    }

    /// Mutes a player for `duration` (`None` lifts the mute). Returns false
    /// if the player is not online.
    pub async fn mute(&self, user: UserId, duration: Option<Duration>) -> bool {
        self.ask(|respond_to| WorldMsg::Mute {
            user,
            duration,
            respond_to,
        })
        .await
    }

    /// Disconnects a player with a kick notice. Returns false if the player
    /// is not online.
    pub async fn kick(&self, user: UserId, reason: KickReason) -> bool {
        self.ask(|respond_to| WorldMsg::Kick {
            user,
            reason,
            respond_to,
        })
        .await
    }

    /// Sends a system message (CHAT_ALL) to everyone.
    pub async fn announce(&self, text: String) -> MsgId {
        self.ask(|respond_to| WorldMsg::Announce { text, respond_to })
            .await
    }

    /// Kicks every player with reason SHUTDOWN and refuses new logins.
    pub async fn shutdown(&self) {
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
