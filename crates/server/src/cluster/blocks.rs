//! Block lists shared by every node: the key-value bucket `gc_blocks`, key
//! `u.<user>`, value the blocked players' ids, space-separated. Owns that
//! format and its reads and writes; it never decides a block (the player's
//! user actor does, within `max_blocks`).
//!
//! A player's node writes the whole list after each change; a node where
//! the player starts a session reads it, so blocks hold on whichever node
//! the player is, and a whisper to an offline player who blocks the sender
//! is refused on any node.

use super::{Cluster, ClusterError};
use crate::ids::UserId;

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
        Ok(value
            .map(|v| {
                String::from_utf8_lossy(&v)
                    .split(' ')
                    .filter_map(|id| id.parse().ok())
                    .collect()
            })
            .unwrap_or_default())
    }
}
