//! Admin calls to another node: a NATS request to that node's subject
//! `gc.node.<node>.call`, answered by its world and its store. About one
//! player whose session that node holds (read, regroup, kick), or asked of
//! every live node and summed (stats, a guild's online members, disband,
//! recall). Owns the calls' JSON format and the task that answers them;
//! it never decides which nodes to ask (the admin API does, from the
//! session directory and the heartbeats).
//!
//! The answering task handles one call at a time; the NATS client's
//! bounded subscription buffer holds the rest. A call not answered within
//! [`CALL_TIMEOUT`] is an error for the caller to report (a 503, or a
//! node named as unanswered in the stats); a node that has stopped, whose
//! subject nobody listens on, is told apart so that callers can skip it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use guildchat_protocol::KickReason;
use serde::{Deserialize, Serialize};
use tracing::debug;

use super::{Cluster, ClusterError};
use crate::history::{Conversation, HistoryHandle, StoredMsg};
use crate::ids::{GuildId, NodeId, SceneId, TeamId, UserId};
use crate::stats::Stats;
use crate::world::{PlayerView, SessionState, WorldHandle};

/// How long a call to another node may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// What one node asks another about a player there.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Call {
    Player {
        user: u64,
    },
    Regroup {
        user: u64,
        guild: Option<u64>,
        team: Option<u64>,
        scene: Option<u64>,
    },
    Kick {
        user: u64,
    },
    /// The node's own counts and counters.
    Stats,
    /// The node's players with a session in the guild.
    GuildOnline {
        guild: u64,
    },
    /// The node's players in the guild leave it.
    Disband {
        guild: u64,
    },
    /// The node drops the line from its store and tells its players. With
    /// a database the nodes share, the asking node names its conversation,
    /// so that each node knows whom to tell, and deletes it there once
    /// every node has answered.
    Recall {
        msg_id: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        conversation: Option<Conversation>,
    },
}

/// One node's own figures, as `/v1/stats` reports them for it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NodeStats {
    pub online: u64,
    pub lingering: u64,
    pub connections: u64,
    pub counters: BTreeMap<String, u64>,
}

impl NodeStats {
    /// This node's figures.
    pub async fn of(world: &WorldHandle, stats: &Stats) -> Result<Self, crate::world::WorldGone> {
        let (online, lingering) = world.counts().await?;
        Ok(NodeStats {
            online,
            lingering,
            connections: Stats::get(&stats.open_connections),
            counters: stats
                .counters()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
        })
    }
}

/// A player's session as the other node sees it.
#[derive(Debug, Serialize, Deserialize)]
struct View {
    name: String,
    lingering: bool,
    guild: u64,
    team: u64,
    scene: u64,
    mask: u32,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Answer {
    View(Option<View>),
    Kicked(bool),
    Stats(NodeStats),
    Players(Vec<u64>),
    Count(usize),
    /// A recall: whether the line was in the node's store, and how many
    /// of its players were told.
    Recalled(bool, usize),
    Failed,
}

/// What a call came back with.
#[derive(Debug)]
pub enum Answered {
    View(Option<PlayerView>),
    Kicked(bool),
    Stats(NodeStats),
    Players(Vec<u64>),
    Count(usize),
    Recalled(bool, usize),
}

fn subject(node: &NodeId) -> String {
    format!("gc.node.{node}.call")
}

fn to_view(v: Option<PlayerView>) -> Option<View> {
    v.map(|v| View {
        name: v.name,
        lingering: v.state == SessionState::Lingering,
        guild: v.guild.0,
        team: v.team.0,
        scene: v.scene.0,
        mask: v.mask,
    })
}

fn from_view(v: Option<View>) -> Option<PlayerView> {
    v.map(|v| PlayerView {
        name: v.name,
        state: if v.lingering {
            SessionState::Lingering
        } else {
            SessionState::Connected
        },
        guild: GuildId(v.guild),
        team: TeamId(v.team),
        scene: SceneId(v.scene),
        mask: v.mask,
    })
}

impl Cluster {
    /// Asks `node` about one of its players.
    pub async fn call(&self, node: &NodeId, call: &Call) -> Result<Answered, ClusterError> {
        let failed = |why: String| ClusterError::Setup {
            what: "call to another node",
            why,
        };
        let payload = serde_json::to_vec(call).map_err(|e| failed(e.to_string()))?;
        let reply = tokio::time::timeout(
            CALL_TIMEOUT,
            self.inner.client.request(subject(node), payload.into()),
        )
        .await
        .map_err(|_| failed(format!("{node} did not answer")))?
        .map_err(|e| match e.kind() {
            async_nats::RequestErrorKind::NoResponders => ClusterError::Stopped(node.to_string()),
            _ => failed(e.to_string()),
        })?;
        match serde_json::from_slice(&reply.payload) {
            Ok(Answer::View(v)) => Ok(Answered::View(from_view(v))),
            Ok(Answer::Kicked(k)) => Ok(Answered::Kicked(k)),
            Ok(Answer::Stats(s)) => Ok(Answered::Stats(s)),
            Ok(Answer::Players(p)) => Ok(Answered::Players(p)),
            Ok(Answer::Count(n)) => Ok(Answered::Count(n)),
            Ok(Answer::Recalled(found, told)) => Ok(Answered::Recalled(found, told)),
            Ok(Answer::Failed) => Err(failed(format!("{node} could not do it"))),
            Err(e) => Err(failed(e.to_string())),
        }
    }

    /// Asks every node in `nodes` but this one at once; the answers come
    /// back in the same order, each within [`CALL_TIMEOUT`].
    pub async fn call_others(
        &self,
        nodes: &[NodeId],
        call: &Call,
    ) -> Vec<(NodeId, Result<Answered, ClusterError>)> {
        let others = nodes.iter().filter(|n| *n != self.node());
        let asks = others.map(|node| async move { (node.clone(), self.call(node, call).await) });
        futures_util::future::join_all(asks).await
    }
}

/// Answers other nodes' calls: about this node's players, and its part of
/// the calls asked of every node.
pub(super) async fn answer(
    mut calls: async_nats::Subscriber,
    client: async_nats::Client,
    world: WorldHandle,
    stats: Arc<Stats>,
    history: Option<HistoryHandle>,
    silenced: tokio::sync::watch::Receiver<bool>,
) {
    while let Some(msg) = calls.next().await {
        let Some(reply_to) = msg.reply.clone() else {
            continue;
        };
        // A test silencing the node: the call goes unanswered, as from a
        // node that is stuck.
        if *silenced.borrow() {
            continue;
        }
        let answer = match serde_json::from_slice::<Call>(&msg.payload) {
            Ok(Call::Player { user }) => world
                .player(UserId(user))
                .await
                .map(|v| Answer::View(to_view(v))),
            Ok(Call::Regroup {
                user,
                guild,
                team,
                scene,
            }) => world
                .regroup(
                    UserId(user),
                    guild.map(GuildId),
                    team.map(TeamId),
                    scene.map(SceneId),
                )
                .await
                .map(|v| Answer::View(to_view(v))),
            Ok(Call::Kick { user }) => world
                .kick(UserId(user), KickReason::KickOperator)
                .await
                .map(Answer::Kicked),
            Ok(Call::Stats) => NodeStats::of(&world, &stats).await.map(Answer::Stats),
            Ok(Call::GuildOnline { guild }) => world
                .guild_online(GuildId(guild))
                .await
                .map(|p| Answer::Players(p.into_iter().map(|u| u.0).collect())),
            Ok(Call::Disband { guild }) => world.disband(GuildId(guild)).await.map(Answer::Count),
            Ok(Call::Recall {
                msg_id,
                conversation,
            }) => Ok(recall_here(&world, history.as_ref(), msg_id, conversation).await),
            Err(e) => {
                debug!(error = %e, "a call from another node does not parse");
                Ok(Answer::Failed)
            }
        };
        let answer = answer.unwrap_or(Answer::Failed);
        let Ok(payload) = serde_json::to_vec(&answer) else {
            continue;
        };
        let _ = client.publish(reply_to, payload.into()).await;
    }
    debug!("call feed ended");
}

/// Drops a line from this node's store and tells its players who had it.
async fn recall_here(
    world: &WorldHandle,
    history: Option<&HistoryHandle>,
    msg_id: u64,
    conversation: Option<Conversation>,
) -> Answer {
    let Some(history) = history else {
        return Answer::Recalled(false, 0);
    };
    let removed = match conversation.filter(|_| history.lines_shared()) {
        // In the shared database, which the asking node deletes it from
        // once every node has answered: only the telling is left here.
        Some(conversation) => Ok(Some(StoredMsg {
            msg_id,
            conversation,
            chattype: 0,
            sender_id: 0,
            sender_name: String::new(),
            text: String::new(),
            time_ms: 0,
            guild_id: 0,
            team_id: 0,
            scene_id: 0,
            target_id: 0,
            target_name: String::new(),
            nonce: 0,
        })),
        None => history.remove_message(msg_id).await,
    };
    match removed {
        Ok(Some(msg)) => match world.recall(msg).await {
            Ok(told) => Answer::Recalled(true, told),
            Err(_) => Answer::Failed,
        },
        Ok(None) => Answer::Recalled(false, 0),
        Err(e) => {
            debug!(msg_id, error = %e, "cannot recall a line from this node's store");
            Answer::Failed
        }
    }
}
