//! The fan-out seam: "deliver this encoded notification to this audience".
//!
//! The world actor decides *who* hears a message and encodes it once; a
//! [`Fanout`] gets the frame to them. [`LocalFanout`] delivers to players on
//! this node. A cluster deployment wraps it with one that also publishes the
//! same frame to other nodes, without the world actor changing.
//!
//! A fanout never waits: it queues with `try_send`, and a full queue goes
//! through the slow-consumer policy in [`crate::net::outbound`].

use bytes::Bytes;
use guildchat_protocol::{mask_bit, ChatType};

use super::registry::{Entry, Registry};
use crate::ids::{GuildId, SceneId, TeamId, UserId};
use crate::stats::Stats;

/// Who a notification is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Audience {
    /// Every player on the server.
    Everyone,
    Guild(GuildId),
    Team(TeamId),
    Scene(SceneId),
    /// A whisper: the target and, as an echo, the sender.
    Whisper {
        from: UserId,
        to: UserId,
    },
}

/// Delivers one encoded notification to an audience.
pub trait Fanout: Send + 'static {
    /// Returns how many connections the frame was queued for.
    fn deliver(
        &mut self,
        registry: &Registry,
        audience: &Audience,
        channel: ChatType,
        frame: &Bytes,
        stats: &Stats,
    ) -> usize;
}

/// In-process delivery to the players registered on this node.
#[derive(Debug, Default)]
pub struct LocalFanout;

impl Fanout for LocalFanout {
    fn deliver(
        &mut self,
        registry: &Registry,
        audience: &Audience,
        channel: ChatType,
        frame: &Bytes,
        stats: &Stats,
    ) -> usize {
        // The mask is checked here, before a frame is queued, so a masked
        // channel costs a bit test and nothing else.
        let bit = mask_bit(channel);
        let mut queued = 0;
        let mut send = |entry: &Entry| {
            if entry.mask & bit == 0 {
                if let Some(conn) = &entry.conn {
                    queued += usize::from(conn.deliver(frame.clone(), stats));
                }
            }
        };
        let lookup = |user: &UserId| registry.get(*user);
        match audience {
            Audience::Everyone => registry.entries().for_each(|(_, e)| send(e)),
            Audience::Guild(g) => registry
                .guild_members(*g)
                .filter_map(lookup)
                .for_each(&mut send),
            Audience::Team(t) => registry
                .team_members(*t)
                .filter_map(lookup)
                .for_each(&mut send),
            Audience::Scene(s) => registry
                .scene_members(*s)
                .filter_map(lookup)
                .for_each(&mut send),
            Audience::Whisper { from, to } => {
                [to, from]
                    .into_iter()
                    .take(if from == to { 1 } else { 2 })
                    .filter_map(lookup)
                    .for_each(&mut send);
            }
        }
        Stats::add(&stats.deliveries, queued as u64);
        queued
    }
}
