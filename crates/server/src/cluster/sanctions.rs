//! Mutes and bans shared by every node: the key-value bucket
//! `gc_sanctions`, key `mute.<user>` or `ban.<user>`, value
//! `<until_ms> <set_ms> <reason>`. Owns that format and the watch that
//! applies the bucket to this node; it never decides a sanction (the admin
//! API does).
//!
//! The admin API on any node writes the bucket first and answers once it
//! is stored; every node, that one included, applies what the watch
//! reports to its in-memory [`Moderation`] and its own store (for its
//! lists and its restarts), and a node holding a banned player's session
//! kicks it.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use futures_util::StreamExt;
use guildchat_protocol::KickReason;
use tracing::{debug, warn};

use super::{Cluster, ClusterError};
use crate::history::{HistoryHandle, Sanction, SanctionKind};
use crate::ids::UserId;
use crate::moderation::Moderation;
use crate::world::WorldHandle;

pub const SANCTIONS_BUCKET: &str = "gc_sanctions";

fn key(user: u64, kind: SanctionKind) -> String {
    match kind {
        SanctionKind::Mute => format!("mute.{user}"),
        SanctionKind::Ban => format!("ban.{user}"),
    }
}

fn parse(key: &str, value: &[u8]) -> Option<Sanction> {
    let (kind, user) = key.split_once('.')?;
    let kind = match kind {
        "mute" => SanctionKind::Mute,
        "ban" => SanctionKind::Ban,
        _ => return None,
    };
    let user = user.parse().ok()?;
    let value = std::str::from_utf8(value).ok()?;
    let mut parts = value.splitn(3, ' ');
    let until_ms = parts.next()?.parse().ok()?;
    let set_ms = parts.next()?.parse().ok()?;
    let reason = parts.next().unwrap_or("").to_owned();
    Some(Sanction {
        user,
        kind,
        until_ms,
        reason,
        set_ms,
    })
}

impl Cluster {
    /// Stores a sanction for every node; done once the bucket has it.
    pub async fn put_sanction(&self, s: &Sanction) -> Result<(), ClusterError> {
        let value = format!("{} {} {}", s.until_ms, s.set_ms, s.reason);
        self.inner
            .sanctions
            .put(key(s.user, s.kind), value.into())
            .await
            .map(|_| ())
            .map_err(|e| ClusterError::Directory(e.to_string()))
    }

    /// Lifts a sanction for every node; whether one was stored.
    pub async fn clear_sanction(
        &self,
        user: UserId,
        kind: SanctionKind,
    ) -> Result<bool, ClusterError> {
        let key = key(user.0, kind);
        let kv = &self.inner.sanctions;
        let had = kv
            .entry(key.as_str())
            .await
            .map_err(|e| ClusterError::Directory(e.to_string()))?
            .is_some_and(|e| e.operation == kv::Operation::Put);
        if had {
            kv.delete(key.as_str())
                .await
                .map_err(|e| ClusterError::Directory(e.to_string()))?;
        }
        Ok(had)
    }
}

/// Applies the bucket to this node: every sanction in force first, then
/// each change.
pub(super) async fn watch(
    mut watch: kv::Watch,
    moderation: Arc<Moderation>,
    history: Option<HistoryHandle>,
    world: WorldHandle,
) {
    while let Some(entry) = watch.next().await {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                warn!(error = %e, "sanction watch failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        match entry.operation {
            kv::Operation::Put => {
                let Some(s) = parse(&entry.key, &entry.value) else {
                    debug!(key = %entry.key, "a sanction entry does not parse; skipped");
                    continue;
                };
                if let Some(history) = &history {
                    if let Err(e) = history
                        .set_sanction(s.user, s.kind, s.until_ms, s.reason.clone())
                        .await
                    {
                        warn!(user = s.user, error = %e, "cannot keep a sanction in the local store");
                    }
                }
                moderation.apply(&s);
                if s.kind == SanctionKind::Ban && s.until_ms > crate::moderation::now_ms() {
                    let _ = world.kick(UserId(s.user), KickReason::KickBanned).await;
                }
            }
            _ => {
                let Some((kind, user)) = entry.key.split_once('.') else {
                    continue;
                };
                let kind = match kind {
                    "mute" => SanctionKind::Mute,
                    "ban" => SanctionKind::Ban,
                    _ => continue,
                };
                let Ok(user) = user.parse::<u64>() else {
                    continue;
                };
                if let Some(history) = &history {
                    let _ = history.clear_sanction(user, kind).await;
                }
                moderation.lift(UserId(user), kind);
            }
        }
    }
    debug!("sanction feed ended");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sanction_round_trips_through_its_key_and_value() {
        let s = Sanction {
            user: 42,
            kind: SanctionKind::Ban,
            until_ms: 1_900_000_000_000,
            reason: "spam, twice".into(),
            set_ms: 1_800_000_000_000,
        };
        let value = format!("{} {} {}", s.until_ms, s.set_ms, s.reason);
        let back = parse(&key(42, SanctionKind::Ban), value.as_bytes()).unwrap();
        assert_eq!(
            (
                back.user,
                back.kind,
                back.until_ms,
                back.set_ms,
                back.reason.as_str()
            ),
            (42, SanctionKind::Ban, s.until_ms, s.set_ms, "spam, twice")
        );
        assert!(parse("mute.x", b"1 2 r").is_none());
        assert!(parse("other.1", b"1 2 r").is_none());
        assert!(parse("mute.1", b"soon").is_none());
    }
}
