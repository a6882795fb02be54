//! Block lists shared by every node: the key-value bucket `gc_blocks`, key
//! `u.<user>`, value the blocked players' ids, space-separated. Owns that
//! format and its reads and writes; it never decides a block (the player's
//! user actor does, within `max_blocks`).
//!
//! A player's node writes the whole list after each change; a node where
//! the player starts a session reads it, so blocks hold on whichever node
//! the player is, and a whisper to a player who blocks the sender is
//! refused (`RES_BLOCKED`) on any node, offline or connected elsewhere:
//! every node watches the bucket and hands each list to its world.

use async_nats::jetstream::kv;
use tracing::debug;

use super::{Cluster, ClusterError};
use crate::ids::UserId;
use crate::world::WorldHandle;

pub const BLOCKS_BUCKET: &str = "gc_blocks";

fn key(user: UserId) -> String {
    format!("u.{user}")
}

impl Cluster {
    /// Stores `user`'s whole block list for every node.
    pub async fn put_blocks(&self, user: UserId, blocked: &[UserId]) -> Result<(), ClusterError> {
        let value: Vec<String> = blocked.iter().map(|u| u.0.to_string()).collect();
        self.inner
            .blocks
            .put(key(user), value.join(" ").into())
            .await
            .map(|_| ())
            .map_err(|e| ClusterError::Directory(e.to_string()))
    }

    /// `user`'s block list (empty if none was ever stored).
    pub async fn blocks(&self, user: UserId) -> Result<Vec<u64>, ClusterError> {
        let value = self
            .inner
            .blocks
            .get(key(user))
            .await
            .map_err(|e| ClusterError::Directory(e.to_string()))?;
        Ok(value.map(|v| parse(&v)).unwrap_or_default())
    }
}

/// Most ids read from one value: far above any `max_blocks`, so a value
/// written by something else cannot make a node hold a huge list.
const MAX_READ: usize = 10_000;

fn parse(value: &[u8]) -> Vec<u64> {
    String::from_utf8_lossy(value)
        .split(' ')
        .filter_map(|id| id.parse().ok())
        .take(MAX_READ)
        .collect()
}

/// Feeds the bucket into the world: every list first, then each change.
/// A list changed on another node reaches this one a moment later; a
/// whisper sent in between is still dropped by the blocker's node.
pub(super) async fn watch(mut watch: kv::Watch, world: WorldHandle) {
    while let Some((user, entry)) = super::next_user_entry(&mut watch, "block list").await {
        let blocked: Box<[UserId]> = match entry.operation {
            kv::Operation::Put => parse(&entry.value).into_iter().map(UserId).collect(),
            _ => Box::default(),
        };
        if world.blocks_of(user, blocked).await.is_err() {
            break;
        }
    }
    debug!("block list feed ended");
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_block_list_value_reads_back_and_skips_what_is_not_an_id() {
        assert_eq!(super::parse(b"3 17 x 42"), vec![3, 17, 42]);
        assert!(super::parse(b"").is_empty());
        let long = vec!["1"; 20_000].join(" ");
        assert_eq!(super::parse(long.as_bytes()).len(), super::MAX_READ);
    }
}
