//! Identifier newtypes. Each kind of id gets its own type so that a guild id
//! can never be passed where a user id is expected. On the wire they are all
//! plain `uint64`; 0 means "none" for guild and team, and "default" for
//! scene.

use std::fmt;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

id_type!(
    /// A player, as issued by the game's logic server (the token's `sub`).
    UserId
);
id_type!(
    /// One websocket connection, unique for the life of the process.
    ConnId
);
id_type!(
    /// A guild. `GuildId(0)` means "not in a guild".
    GuildId
);
id_type!(
    /// A team (party). `TeamId(0)` means "not in a team".
    TeamId
);
id_type!(
    /// A scene (map). `SceneId(0)` is the default scene.
    SceneId
);
id_type!(
    /// A chat message, assigned by the world actor: unique and increasing.
    MsgId
);

/// A cluster node, as named by `cluster.node_id`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NodeId(pub std::sync::Arc<str>);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl GuildId {
    pub fn is_none(self) -> bool {
        self.0 == 0
    }
}

impl TeamId {
    pub fn is_none(self) -> bool {
        self.0 == 0
    }
}
