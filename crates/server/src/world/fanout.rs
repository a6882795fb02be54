//! The fan-out seam: "deliver this encoded notification to this audience".
//!
//! The world actor decides *who* hears a message and encodes it once; a
//! [`Fanout`] gets the frame to them, in each recipient's codec, transcoding
//! it to JSON at most once per notification. [`LocalFanout`] delivers to players on
//! this node. A cluster deployment wraps it with one that also publishes the
//! same frame to other nodes, without the world actor changing.
//!
//! A fanout never waits: it queues with `try_send`, and a full queue goes
//! through the slow-consumer policy in [`crate::net::outbound`].

use bytes::Bytes;
use guildchat_protocol::{mask_bit, ChatType};

use super::registry::Registry;
use crate::ids::{GuildId, MsgId, SceneId, TeamId, UserId};
use crate::net::outbound::Encoded;
use crate::net::Priority;
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
    /// One player only: the sender's echo of a whisper that was stored for
    /// its target instead of fanned out to it.
    User(UserId),
}

/// How a channel's traffic is treated when a client falls behind.
pub fn priority(channel: ChatType) -> Priority {
    match channel {
        ChatType::ChatWorld | ChatType::ChatNormal => Priority::Sheddable,
        _ => Priority::Keep,
    }
}

/// One encoded notification and who it goes to.
#[derive(Debug, Clone, Copy)]
pub struct Line<'a> {
    pub audience: &'a Audience,
    /// The sender, whose blockers do not get it; `None` for the server's
    /// own lines.
    pub from: Option<UserId>,
    pub channel: ChatType,
    pub msg_id: MsgId,
    pub frame: &'a Bytes,
}

/// Delivers one encoded notification to an audience.
pub trait Fanout: Send + 'static {
    /// Returns how many connections the frame was queued for.
    fn deliver(&mut self, registry: &mut Registry, line: Line<'_>, stats: &Stats) -> usize;
}

/// In-process delivery to the players registered on this node.
#[derive(Debug, Default)]
pub struct LocalFanout;

impl Fanout for LocalFanout {
    fn deliver(&mut self, registry: &mut Registry, line: Line<'_>, stats: &Stats) -> usize {
        let Line {
            audience,
            from,
            channel,
            msg_id,
            frame,
        } = line;
        // The mask is checked here, before anything is queued or recorded
        // for a player, so a masked channel costs a bit test and nothing
        // else. World chat is recorded once for everyone in the shared
        // ring; a resume filters it by the player's mask log instead.
        let bit = mask_bit(channel);
        let priority = priority(channel);
        // World chat is the same for everyone: kept once, in the shared
        // ring, instead of once per player.
        let shared = *audience == Audience::Everyone && priority == Priority::Sheddable;
        if shared {
            registry.world.push(msg_id.0, frame.clone());
        }
        // Transcoded to JSON at most once, for the first JSON recipient.
        let encoded = Encoded::new(frame.clone());
        let mut queued = 0;
        registry.visit(audience, |entry| {
            // The mask, and a line the client read before this login (see
            // `Entry::floor`).
            if entry.mask & bit != 0 || msg_id.0 <= entry.floor {
                return;
            }
            // Blocks, like the mask, are checked before anything is queued
            // or recorded for the blocker.
            if from.is_some_and(|from| entry.blocks(from)) {
                return;
            }
            // Recorded even while the player lingers without a connection:
            // that is what a resume replays.
            if !shared {
                entry.replay.record(msg_id.0, frame.clone(), priority);
            }
            if let Some(conn) = &entry.conn {
                queued += usize::from(conn.deliver_encoded(&encoded, priority, stats));
            }
        });
        Stats::add(&stats.deliveries, queued as u64);
        stats.metrics.delivered(priority, queued as u64);
        queued
    }
}
