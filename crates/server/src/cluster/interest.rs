//! Which lines of the line stream this node reads, when it reads only what
//! its players need (`history.url` or history off: no local copy of every
//! line to keep).
//!
//! It owns the set of group subjects (guild, team, scene) that have a
//! session on this node, what the line reader last subscribed to, and the
//! resync signal between the world and that reader. It must never make the
//! world wait (one short lock, a `watch` send) and never decide delivery:
//! the world still checks every line's audience.
//!
//! The order promise rests on one rule. When a group gains its first
//! session here, the world asks for a resync *after* the last stream line
//! it has handled, under a new generation; the reader opens a new consumer
//! with the new filters from the next sequence, and the world drops every
//! line of an older generation it receives meanwhile (those come again from
//! the new consumer). So every line after the join reaches the new member,
//! and each recipient still gets lines in stream order, each once. Losing a
//! group's last session changes nothing at once: its subjects stay
//! subscribed until the next resync, so a group that comes back soon costs
//! none.
//!
//! Filters are worth it only for a few groups. A JetStream consumer with
//! many filter subjects costs the server more per line than it saves (and
//! its creation must count what is pending on each), so past
//! [`MAX_GROUPS`] groups the reader reads the whole line stream, and it
//! goes back to filters, through a resync, once half of that is left.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::wire::LINE_PREFIX;

/// Above this many groups with a session here, the reader reads every
/// line instead of two filters a group. Measured in docs/BENCHMARKS.md
/// (Run 13): with some 1,700 groups a node, per-group filters tripled
/// nats-server's CPU and put seconds on the tail latency.
pub const MAX_GROUPS: usize = 64;

/// A request to the line reader: read from stream sequence `after + 1`
/// with the current filters, tagging lines with `generation`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resync {
    pub generation: u64,
    pub after: u64,
}

/// A kind of group whose lines a node reads only while it has a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupKind {
    Guild,
    Team,
    Scene,
}

impl GroupKind {
    fn name(self) -> &'static str {
        match self {
            GroupKind::Guild => "guild",
            GroupKind::Team => "team",
            GroupKind::Scene => "scene",
        }
    }
}

/// The handle the world and the line reader share.
#[derive(Clone)]
pub struct Interest {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    resync: watch::Sender<Resync>,
}

#[derive(Default)]
struct State {
    /// Groups with a session here, as `kind.id`.
    wanted: HashSet<String>,
    /// The groups the reader's consumer filters on (a superset of
    /// `wanted` until the next resync drops the groups gone since).
    applied: HashSet<String>,
    /// Whether the reader's consumer reads every line (too many groups
    /// for filters).
    everything: bool,
    generation: u64,
}

impl Interest {
    pub fn new() -> Interest {
        Interest {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                resync: watch::Sender::new(Resync::default()),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A group gained its first session here. Whether the reader must
    /// resync to read its lines (it does not while they are still read).
    pub fn gained(&self, kind: GroupKind, id: u64) -> bool {
        let key = format!("{}.{id}", kind.name());
        let mut state = self.state();
        let needed = !state.everything && !state.applied.contains(&key);
        state.wanted.insert(key);
        needed
    }

    /// A group lost its last session here. Whether the reader, reading
    /// everything, can go back to filters now (said once, as the count
    /// falls to half of [`MAX_GROUPS`]).
    pub fn lost(&self, kind: GroupKind, id: u64) -> bool {
        let mut state = self.state();
        let removed = state.wanted.remove(&format!("{}.{id}", kind.name()));
        removed && state.everything && state.wanted.len() == MAX_GROUPS / 2
    }

    /// Asks the reader to read again after stream sequence `after` with
    /// the groups wanted now; returns the generation its lines will carry.
    pub fn resync(&self, after: u64) -> u64 {
        let generation = {
            let mut state = self.state();
            state.generation += 1;
            state.generation
        };
        self.inner.resync.send_replace(Resync { generation, after });
        generation
    }

    pub(super) fn subscribe(&self) -> watch::Receiver<Resync> {
        self.inner.resync.subscribe()
    }

    /// The filters for a new consumer: what every node reads (the world,
    /// everyone's announcements, announcements to one player, whispers)
    /// and each wanted group's lines and announcements, or every line past
    /// [`MAX_GROUPS`] groups. From now on the wanted groups are the
    /// applied ones.
    pub(super) fn filters(&self) -> Vec<String> {
        let p = LINE_PREFIX;
        let mut state = self.state();
        state.applied = state.wanted.clone();
        state.everything = state.applied.len() > MAX_GROUPS;
        if state.everything {
            return vec![format!("{p}.>")];
        }
        let mut filters = vec![
            format!("{p}.world"),
            format!("{p}.sys"),
            format!("{p}.sys.to.user.>"),
            format!("{p}.w.>"),
        ];
        for group in &state.applied {
            filters.push(format!("{p}.{group}"));
            filters.push(format!("{p}.sys.to.{group}"));
        }
        filters
    }

    /// How many groups the reader reads now.
    pub fn applied(&self) -> usize {
        self.state().applied.len()
    }

    /// Whether the reader reads every line now.
    pub fn reads_everything(&self) -> bool {
        self.state().everything
    }
}

impl std::fmt::Debug for Interest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interest")
            .field("applied", &self.applied())
            .finish()
    }
}

impl Default for Interest {
    fn default() -> Self {
        Interest::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_needs_a_resync_only_when_it_is_not_read_already() {
        let i = Interest::new();
        assert!(i.gained(GroupKind::Guild, 7));
        assert_eq!(i.resync(10), 1);
        let filters = i.filters();
        assert!(filters.contains(&"gc.line.guild.7".to_owned()));
        assert!(filters.contains(&"gc.line.sys.to.guild.7".to_owned()));
        assert!(filters.contains(&"gc.line.world".to_owned()));
        // Lost and back before the next resync: still read.
        i.lost(GroupKind::Guild, 7);
        assert!(!i.gained(GroupKind::Guild, 7));
        // Lost, then dropped from the filters by the next resync.
        i.lost(GroupKind::Guild, 7);
        assert!(i.gained(GroupKind::Team, 3));
        assert_eq!(i.resync(12), 2);
        let filters = i.filters();
        assert!(!filters.iter().any(|f| f.contains("guild.7")));
        assert!(filters.contains(&"gc.line.team.3".to_owned()));
        assert_eq!(i.applied(), 1);
        assert!(!i.reads_everything());
        let mut rx = i.subscribe();
        assert_eq!(
            *rx.borrow_and_update(),
            Resync {
                generation: 2,
                after: 12
            }
        );
    }

    #[test]
    fn past_max_groups_the_reader_reads_every_line_until_half_are_left() {
        let i = Interest::new();
        for id in 0..=MAX_GROUPS as u64 {
            assert!(i.gained(GroupKind::Scene, id));
        }
        i.resync(1);
        assert_eq!(i.filters(), vec!["gc.line.>".to_owned()]);
        assert!(i.reads_everything());
        // Read already, whatever the group.
        assert!(!i.gained(GroupKind::Guild, 1));
        assert!(!i.lost(GroupKind::Guild, 1));
        // Back to filters once, as the count falls to half.
        let mut asked = 0;
        for id in 0..=MAX_GROUPS as u64 {
            asked += usize::from(i.lost(GroupKind::Scene, id));
            if asked == 1 && i.reads_everything() {
                i.resync(2);
                let filters = i.filters();
                assert_eq!(filters.len(), 4 + 2 * (MAX_GROUPS / 2));
                assert!(!i.reads_everything());
            }
        }
        assert_eq!(asked, 1);
        assert_eq!(i.applied(), MAX_GROUPS / 2);
    }
}
