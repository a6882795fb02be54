//! Admin calls about a player whose session another node holds: a NATS
//! request to that node's subject `gc.node.<node>.call`, answered by its
//! world. Owns the calls' JSON format and the task that answers them; it
//! never decides which node to ask (the admin API does, from the session
//! directory).
//!
//! The answering task handles one call at a time; the NATS client's
//! bounded subscription buffer holds the rest, and a caller whose request
//! is not answered within [`CALL_TIMEOUT`] gets a 503.

use std::time::Duration;

use futures_util::StreamExt;
use guildchat_protocol::KickReason;
use serde::{Deserialize, Serialize};
use tracing::debug;

use super::{Cluster, ClusterError};
use crate::ids::{GuildId, NodeId, SceneId, TeamId, UserId};
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
    Failed,
}

/// What a call came back with.
#[derive(Debug)]
pub enum Answered {
    View(Option<PlayerView>),
    Kicked(bool),
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
        .map_err(|e| failed(e.to_string()))?;
        match serde_json::from_slice(&reply.payload) {
            Ok(Answer::View(v)) => Ok(Answered::View(from_view(v))),
            Ok(Answer::Kicked(k)) => Ok(Answered::Kicked(k)),
            Ok(Answer::Failed) => Err(failed(format!("{node} could not do it"))),
            Err(e) => Err(failed(e.to_string())),
        }
    }
}

/// Answers other nodes' calls about this node's players.
pub(super) async fn answer(
    mut calls: async_nats::Subscriber,
    client: async_nats::Client,
    world: WorldHandle,
) {
    while let Some(msg) = calls.next().await {
        let Some(reply_to) = msg.reply.clone() else {
            continue;
        };
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
