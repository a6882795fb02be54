//! Mutes, bans and token revocations shared by every node: the key-value
//! bucket `gc_sanctions`, key `mute.<user>` or `ban.<user>` with value
//! `<until_ms> <set_ms> <reason>`, and key `revoke.<user>` with value
//! `<before_s>`. Owns that format and the watch that applies the bucket to
//! this node; it never decides a sanction (the admin API does).
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

/// Compare-and-set tries for a revocation before giving up (another GM
/// revoking the same player's tokens at the same moment).
const REVOKE_TRIES: usize = 8;

fn revoke_key(user: u64) -> String {
    format!("revoke.{user}")
}

/// A revocation's key and value: the player and the Unix second before
/// which their tokens are refused.
fn parse_revocation(key: &str, value: &[u8]) -> Option<(u64, u64)> {
    let user = key.strip_prefix("revoke.")?.parse().ok()?;
    let before_s = std::str::from_utf8(value).ok()?.trim().parse().ok()?;
    Some((user, before_s))
}

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
    /// Refuses a write at once while NATS is away: a write the client
    /// buffered until it is back would be neither refused nor done when
    /// the admin API answers.
    fn reachable(&self) -> Result<(), ClusterError> {
        if self.connected() {
            Ok(())
        } else {
            Err(ClusterError::Directory("NATS is away".into()))
        }
    }

    /// Stores a sanction for every node; done once the bucket has it.
    pub async fn put_sanction(&self, s: &Sanction) -> Result<(), ClusterError> {
        self.reachable()?;
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
        self.reachable()?;
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

impl Cluster {
    /// Refuses, on every node, the player's tokens issued before
    /// `before_s`; done once the bucket has it. A revocation is never
    /// narrowed: against a later one already stored (another node's clock
    /// may run ahead), the stored one stands and is returned.
    pub async fn put_revocation(&self, user: UserId, before_s: u64) -> Result<u64, ClusterError> {
        self.reachable()?;
        let key = revoke_key(user.0);
        let value = bytes::Bytes::from(before_s.to_string());
        let kv = &self.inner.sanctions;
        let dir = |e: &dyn std::fmt::Display| ClusterError::Directory(e.to_string());
        for _ in 0..REVOKE_TRIES {
            let current = kv.entry(key.as_str()).await.map_err(|e| dir(&e))?;
            // A value that does not parse (written by hand) counts as no
            // revocation, and is overwritten at its revision.
            let stored = current
                .as_ref()
                .filter(|e| e.operation == kv::Operation::Put)
                .map(|e| {
                    let b = parse_revocation(&e.key, &e.value).map_or(0, |(_, b)| b);
                    (e.revision, b)
                });
            // Another node wrote in between: read again and retry.
            match stored {
                Some((_, b)) if b >= before_s => return Ok(b),
                Some((revision, _)) => match kv.update(key.as_str(), value.clone(), revision).await
                {
                    Ok(_) => return Ok(before_s),
                    Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {}
                    Err(e) => return Err(dir(&e)),
                },
                None => match kv.create(key.as_str(), value.clone()).await {
                    Ok(_) => return Ok(before_s),
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
                    Err(e) => return Err(dir(&e)),
                },
            }
        }
        Err(ClusterError::Directory(format!(
            "{key}: still contended after {REVOKE_TRIES} tries"
        )))
    }
}

/// Applies the bucket to this node: every sanction and revocation in
/// force first, then each change.
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
        if entry.key.starts_with("revoke.") {
            // Revocations are only ever put (and never narrowed), so a
            // delete or a purge of one is an operator's hand: ignored.
            let parsed = (entry.operation == kv::Operation::Put)
                .then(|| parse_revocation(&entry.key, &entry.value))
                .flatten();
            if let Some((user, before_s)) = parsed {
                if let Some(history) = &history {
                    if let Err(e) = history.revoke_tokens(user, before_s).await {
                        warn!(user, error = %e, "cannot keep a revocation in the local store");
                    }
                }
                moderation.revoke(UserId(user), before_s);
            }
            continue;
        }
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

    #[test]
    fn a_revocation_round_trips_through_its_key_and_value() {
        assert_eq!(
            parse_revocation(&revoke_key(42), b"1800000000"),
            Some((42, 1_800_000_000))
        );
        assert_eq!(parse_revocation("revoke.x", b"1"), None);
        assert_eq!(parse_revocation("revoke.1", b"soon"), None);
        assert_eq!(parse_revocation("ban.1", b"1"), None);
    }
}
