//! Channel masks shared by every node: the key-value bucket `gc_masks`,
//! key `u.<user>`, value the mask in decimal. Owns that format; it never
//! decides a mask (the player does, through its user actor).
//!
//! The player's node writes the mask on each change; a node where the
//! player starts a session reads it, so a player who moves to another node
//! keeps the channels it turned off.

use super::{Cluster, ClusterError};
use crate::ids::UserId;

pub const MASKS_BUCKET: &str = "gc_masks";

fn key(user: UserId) -> String {
    format!("u.{user}")
}

impl Cluster {
    /// Stores `user`'s mask for every node.
    pub async fn put_mask(&self, user: UserId, mask: u32) -> Result<(), ClusterError> {
        self.inner
            .masks
            .put(key(user), mask.to_string().into())
            .await
            .map(|_| ())
            .map_err(|e| ClusterError::Directory(e.to_string()))
    }

    /// `user`'s mask, if one was ever stored.
    pub async fn mask(&self, user: UserId) -> Result<Option<u32>, ClusterError> {
        let value = self
            .inner
            .masks
            .get(key(user))
            .await
            .map_err(|e| ClusterError::Directory(e.to_string()))?;
        Ok(value.and_then(|v| std::str::from_utf8(&v).ok()?.parse().ok()))
    }
}
