//! What travels between nodes: one [`BusLine`] per chat line, encoded with
//! protobuf (prost) as the payload of a JetStream message. Owns the bus
//! format and its subjects; it never decides who hears a line (that is the
//! receiving world's job).
//!
//! The notification inside has `msg_id` 0: the id is the line's place in
//! the stream, known only once JetStream has stored it, and every node
//! fills it in before encoding the frame once for its own players.

use guildchat_protocol::pb;

use crate::history::Conversation;
use crate::ids::{GuildId, SceneId, TeamId, UserId};
use crate::world::Audience;

/// One line on the cluster bus.
#[derive(Clone, PartialEq, prost::Message)]
pub struct BusLine {
    /// The notification as every recipient gets it, but for its msg_id.
    #[prost(message, optional, tag = "1")]
    pub notify: Option<pb::ChatMessageNotifyChat>,
    /// Who hears it: see [`AudienceKind`].
    #[prost(enumeration = "AudienceKind", tag = "2")]
    pub kind: i32,
    /// The guild, team, scene or player the audience names.
    #[prost(uint64, tag = "3")]
    pub audience_id: u64,
    /// The sender (0 for the server's own lines): blockers do not get it.
    #[prost(uint64, tag = "4")]
    pub from: u64,
    /// The client's message id for safe retries, kept with the stored line.
    #[prost(uint64, tag = "5")]
    pub nonce: u64,
    /// The node that published it.
    #[prost(string, tag = "6")]
    pub origin: String,
    /// A whisper: the node the directory placed its target on when it was
    /// sent, which keeps it for the target's next login if the target has
    /// gone by the time it arrives.
    #[prost(string, tag = "7")]
    pub to_node: String,
    /// A whisper the sender's node keeps as an offline whisper (its target
    /// had no session anywhere).
    #[prost(bool, tag = "8")]
    pub offline: bool,
    /// Whether the line goes into history (everything but announcements to
    /// a group or a player).
    #[prost(bool, tag = "9")]
    pub stored: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum AudienceKind {
    Everyone = 0,
    Guild = 1,
    Team = 2,
    Scene = 3,
    /// `audience_id` is the target; the sender hears it too.
    Whisper = 4,
    /// `audience_id` is the one player who hears it.
    User = 5,
}

impl BusLine {
    /// The audience as the world's fan-out names it.
    pub fn to_audience(&self) -> Audience {
        let id = self.audience_id;
        match AudienceKind::try_from(self.kind).unwrap_or(AudienceKind::User) {
            AudienceKind::Everyone => Audience::Everyone,
            AudienceKind::Guild => Audience::Guild(GuildId(id)),
            AudienceKind::Team => Audience::Team(TeamId(id)),
            AudienceKind::Scene => Audience::Scene(SceneId(id)),
            AudienceKind::Whisper => Audience::Whisper {
                from: UserId(self.from),
                to: UserId(id),
            },
            AudienceKind::User => Audience::User(UserId(id)),
        }
    }

    /// Sets the audience fields from the world's.
    pub fn set_audience(&mut self, audience: &Audience) {
        let (kind, id) = match *audience {
            Audience::Everyone => (AudienceKind::Everyone, 0),
            Audience::Guild(g) => (AudienceKind::Guild, g.0),
            Audience::Team(t) => (AudienceKind::Team, t.0),
            Audience::Scene(s) => (AudienceKind::Scene, s.0),
            Audience::Whisper { to, .. } => (AudienceKind::Whisper, to.0),
            Audience::User(u) => (AudienceKind::User, u.0),
        };
        self.kind = kind as i32;
        self.audience_id = id;
    }
}

/// Every line's subject starts with this; the stream holds `gc.line.>`.
pub const LINE_PREFIX: &str = "gc.line";

/// The subject of a line: one per conversation, so that JetStream's
/// per-subject limits keep each conversation's retention apart. Lines that
/// are not stored (announcements to a group or player) go under `sys.to`.
pub fn subject(conversation: Option<Conversation>, audience: &Audience) -> String {
    match conversation {
        Some(Conversation::World) => format!("{LINE_PREFIX}.world"),
        Some(Conversation::System) => format!("{LINE_PREFIX}.sys"),
        Some(Conversation::Guild(g)) => format!("{LINE_PREFIX}.guild.{g}"),
        Some(Conversation::Team(t)) => format!("{LINE_PREFIX}.team.{t}"),
        Some(Conversation::Scene(s)) => format!("{LINE_PREFIX}.scene.{s}"),
        Some(Conversation::Whisper { low, high }) => format!("{LINE_PREFIX}.w.{low}.{high}"),
        None => match audience {
            Audience::Guild(g) => format!("{LINE_PREFIX}.sys.to.guild.{g}"),
            Audience::Team(t) => format!("{LINE_PREFIX}.sys.to.team.{t}"),
            Audience::Scene(s) => format!("{LINE_PREFIX}.sys.to.scene.{s}"),
            Audience::User(u) | Audience::Whisper { to: u, .. } => {
                format!("{LINE_PREFIX}.sys.to.user.{u}")
            }
            Audience::Everyone => format!("{LINE_PREFIX}.sys"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn a_line_round_trips_with_its_audience() {
        for audience in [
            Audience::Everyone,
            Audience::Guild(GuildId(7)),
            Audience::Team(TeamId(8)),
            Audience::Scene(SceneId(9)),
            Audience::Whisper {
                from: UserId(1),
                to: UserId(2),
            },
            Audience::User(UserId(3)),
        ] {
            let mut line = BusLine {
                notify: Some(pb::ChatMessageNotifyChat {
                    strcontext: "hi".into(),
                    ..Default::default()
                }),
                from: 1,
                ..Default::default()
            };
            line.set_audience(&audience);
            let back = BusLine::decode(line.encode_to_vec().as_slice()).unwrap();
            assert_eq!(back.to_audience(), audience);
            assert_eq!(back, line);
        }
    }

    #[test]
    fn each_conversation_has_its_own_subject() {
        let a = subject(Some(Conversation::between(5, 3)), &Audience::Everyone);
        assert_eq!(a, "gc.line.w.3.5");
        assert_eq!(
            subject(None, &Audience::Guild(GuildId(4))),
            "gc.line.sys.to.guild.4"
        );
        assert_eq!(
            subject(Some(Conversation::World), &Audience::Everyone),
            "gc.line.world"
        );
    }
}
