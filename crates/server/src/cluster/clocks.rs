//! Cooldown clocks that move with the player: the key-value bucket
//! `gc_clocks` (in memory, a day's age limit), key `u.<user>`, value the
//! running clocks as `<channel>:<unix ms when it may speak again>`,
//! space-separated. Owns that format; it never decides a cooldown (the
//! player's user actor does, from its channel rules).
//!
//! The player's node writes the clocks after each line on a channel whose
//! cooldown is at least [`MOVING_COOLDOWN`]; a session new to a node reads
//! them before its first line, so a takeover or a resume on another node
//! cannot cut a long cooldown short. Shorter ones start afresh there: at
//! worst one line comes early, which is not worth a write per line.

use std::time::Duration;

use bytes::Bytes;

use super::{Cluster, ClusterError};
use crate::ids::UserId;

pub const CLOCKS_BUCKET: &str = "gc_clocks";

/// Cooldowns this long or longer move with the player.
pub const MOVING_COOLDOWN: Duration = Duration::from_secs(5);

fn key(user: UserId) -> String {
    format!("u.{user}")
}

/// `clocks` as the bucket keeps them.
fn format(clocks: &[(usize, u64)]) -> String {
    let mut out = String::new();
    for (channel, at) in clocks {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(&format!("{channel}:{at}"));
    }
    out
}

/// The bucket's value back as `(channel, unix ms)`; what does not parse is
/// skipped.
fn parse(value: &[u8]) -> Vec<(usize, u64)> {
    String::from_utf8_lossy(value)
        .split(' ')
        .filter_map(|entry| {
            let (channel, at) = entry.split_once(':')?;
            Some((channel.parse().ok()?, at.parse().ok()?))
        })
        .collect()
}

impl Cluster {
    /// Queues `user`'s running clocks for every node. Never waits: it goes
    /// through the publish queue, and is skipped while NATS is away or the
    /// queue is half full (the next node then starts the clocks afresh).
    pub fn put_clocks(&self, user: UserId, clocks: &[(usize, u64)]) {
        // Skipped while NATS is away (a write buffered until it is back
        // could overwrite a newer one from another node), and when the
        // publish queue is half full: chat lines come first.
        if !self.connected() || self.inner.publish.capacity() < super::PUBLISH_QUEUE / 2 {
            return;
        }
        let subject = format!("$KV.{CLOCKS_BUCKET}.{}", key(user));
        let value = Bytes::from(format(clocks));
        self.publish_raw(subject, value, None, Box::new(|_| {}));
    }

    /// `user`'s clocks as last written by any node (none if never).
    pub async fn clocks(&self, user: UserId) -> Result<Vec<(usize, u64)>, ClusterError> {
        let value = self
            .inner
            .clocks
            .get(key(user))
            .await
            .map_err(|e| ClusterError::Directory(e.to_string()))?;
        Ok(value.map(|v| parse(&v)).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clocks_read_back_as_written_and_junk_is_skipped() {
        let clocks = [(1, 1_700_000_000_000), (4, 5)];
        assert_eq!(parse(format(&clocks).as_bytes()), clocks);
        assert_eq!(parse(b""), Vec::<(usize, u64)>::new());
        assert_eq!(parse(b"x:1 2:y 3:4"), vec![(3, 4)]);
    }
}
