//! The sanctions in force: mutes, bans and token revocations, as the
//! login path and every chat see them.
//!
//! It owns the in-memory copy of what the store holds, so that a chat or a
//! login checks a sanction with one uncontended read lock and no I/O. The
//! store is the truth: the admin API writes a sanction to the store first,
//! waits for the commit, and only then updates this copy (without a store
//! the copy is all there is, and a restart forgets it). It must never
//! decide policy (who may sanction whom) or talk to players: it only
//! answers "is this player muted, banned, revoked, and for how long".

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use crate::history::{Moderation as Stored, Sanction, SanctionKind};
use crate::ids::UserId;

/// Milliseconds since the Unix epoch, by the wall clock: sanctions are
/// stored as wall-clock end times so that they survive restarts.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A sanction as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InForce {
    pub until_ms: u64,
    pub reason: String,
    pub set_ms: u64,
    /// When it ends by the runtime's clock: what every check compares
    /// against, so a test can run a mute out on a paused clock. Derived
    /// from `until_ms` when the sanction is applied.
    deadline: Instant,
}

#[derive(Debug, Default)]
struct State {
    mutes: HashMap<UserId, InForce>,
    bans: HashMap<UserId, InForce>,
    /// Tokens issued (iat, seconds) before this are refused.
    revoked_before_s: HashMap<UserId, u64>,
}

/// Shared by the world, every user actor, the authenticator and the admin
/// API.
#[derive(Debug, Default)]
pub struct Moderation {
    state: RwLock<State>,
    /// Set once what the store holds is in (at once without a store):
    /// changes wait for it, so a load cannot undo one made before it.
    loaded: tokio::sync::watch::Sender<bool>,
}

impl Moderation {
    /// Takes in what the store holds, at start-up, and lets changes in.
    pub fn load(&self, stored: Stored) {
        for s in stored.sanctions {
            self.apply(&s);
        }
        for (user, before) in stored.revocations {
            self.revoke(UserId(user), before);
        }
        self.mark_loaded();
    }

    /// There is nothing to load (no store).
    pub fn mark_loaded(&self) {
        self.loaded.send_replace(true);
    }

    /// Waits until the store's sanctions are in; false after `within`.
    pub async fn wait_loaded(&self, within: Duration) -> bool {
        let mut rx = self.loaded.subscribe();
        tokio::time::timeout(within, rx.wait_for(|loaded| *loaded))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        // A panic while holding the lock left at worst one map entry
        // half-updated, which a later write repairs: keep serving.
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a sanction the store has committed.
    pub fn apply(&self, s: &Sanction) {
        let left = Duration::from_millis(s.until_ms.saturating_sub(now_ms()));
        // A ban too long for the clock to add is one without end.
        let far = Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);
        let entry = InForce {
            until_ms: s.until_ms,
            reason: s.reason.clone(),
            set_ms: s.set_ms,
            deadline: Instant::now().checked_add(left).unwrap_or(far).min(far),
        };
        let now = Instant::now();
        let mut state = self.write();
        let map = match s.kind {
            SanctionKind::Mute => &mut state.mutes,
            SanctionKind::Ban => &mut state.bans,
        };
        // Ended sanctions go here, so the maps hold what is in force (plus
        // whatever ended since the last new one), not every sanction ever.
        map.retain(|_, s| s.deadline > now);
        map.insert(UserId(s.user), entry);
    }

    /// Lifts a sanction; true if one was in force.
    pub fn lift(&self, user: UserId, kind: SanctionKind) -> bool {
        let now = Instant::now();
        let mut state = self.write();
        let removed = match kind {
            SanctionKind::Mute => state.mutes.remove(&user),
            SanctionKind::Ban => state.bans.remove(&user),
        };
        removed.is_some_and(|s| s.deadline > now)
    }

    /// Refuses every token of `user` issued before `before_s`.
    pub fn revoke(&self, user: UserId, before_s: u64) {
        let mut state = self.write();
        let slot = state.revoked_before_s.entry(user).or_insert(0);
        *slot = (*slot).max(before_s);
    }

    /// The Unix second before which `user`'s tokens are refused, if any.
    pub fn revoked_before(&self, user: UserId) -> Option<u64> {
        self.read().revoked_before_s.get(&user).copied()
    }

    /// Whether a token of `user` issued at `iat` (seconds; `None` when the
    /// token does not say) has been revoked. A token that does not say when
    /// it was issued cannot prove it is newer than a revocation.
    pub fn is_revoked(&self, user: UserId, iat: Option<i64>) -> bool {
        match self.read().revoked_before_s.get(&user) {
            None => false,
            Some(&before) => iat.is_none_or(|iat| iat < before as i64),
        }
    }

    /// Time left on the player's mute, if muted now.
    pub fn mute_left(&self, user: UserId) -> Option<Duration> {
        left(self.read().mutes.get(&user))
    }

    /// Time left on the player's ban, if banned now.
    pub fn ban_left(&self, user: UserId) -> Option<Duration> {
        left(self.read().bans.get(&user))
    }

    /// The mute or ban in force, if any.
    pub fn get(&self, user: UserId, kind: SanctionKind) -> Option<InForce> {
        let now = Instant::now();
        let state = self.read();
        let map = match kind {
            SanctionKind::Mute => &state.mutes,
            SanctionKind::Ban => &state.bans,
        };
        map.get(&user).filter(|s| s.deadline > now).cloned()
    }

    /// Every sanction of this kind in force, by user id.
    pub fn list(&self, kind: SanctionKind) -> Vec<(UserId, InForce)> {
        let now = Instant::now();
        let state = self.read();
        let map = match kind {
            SanctionKind::Mute => &state.mutes,
            SanctionKind::Ban => &state.bans,
        };
        let mut out: Vec<_> = map
            .iter()
            .filter(|(_, s)| s.deadline > now)
            .map(|(u, s)| (*u, s.clone()))
            .collect();
        out.sort_by_key(|(u, _)| *u);
        out
    }
}

fn left(s: Option<&InForce>) -> Option<Duration> {
    let left = s?.deadline.saturating_duration_since(Instant::now());
    (!left.is_zero()).then_some(left)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sanction(user: u64, kind: SanctionKind, until_ms: u64) -> Sanction {
        Sanction {
            user,
            kind,
            until_ms,
            reason: "spam".into(),
            set_ms: 1,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_sanction_counts_only_until_it_ends() {
        let m = Moderation::default();
        let now = now_ms();
        m.apply(&sanction(1, SanctionKind::Mute, now + 60_000));
        m.apply(&sanction(2, SanctionKind::Mute, now.saturating_sub(1)));
        assert!(m
            .mute_left(UserId(1))
            .is_some_and(|d| d <= Duration::from_secs(60)));
        assert_eq!(m.mute_left(UserId(2)), None);
        assert_eq!(m.ban_left(UserId(1)), None);
        assert_eq!(m.list(SanctionKind::Mute).len(), 1);
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(m.mute_left(UserId(1)).is_some());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(
            m.mute_left(UserId(1)),
            None,
            "ran out on the runtime's clock"
        );
        m.apply(&sanction(1, SanctionKind::Mute, now_ms() + 60_000));
        assert!(m.lift(UserId(1), SanctionKind::Mute));
        assert!(!m.lift(UserId(1), SanctionKind::Mute));
        assert_eq!(m.mute_left(UserId(1)), None);
    }

    #[test]
    fn revocation_refuses_older_tokens_and_tokens_without_iat() {
        let m = Moderation::default();
        m.revoke(UserId(7), 1_000);
        m.revoke(UserId(7), 500);
        assert!(m.is_revoked(UserId(7), Some(999)));
        assert!(m.is_revoked(UserId(7), None));
        assert!(!m.is_revoked(UserId(7), Some(1_000)));
        assert!(!m.is_revoked(UserId(8), Some(1)));
    }
}
