//! The world actor's registry: who is logged in, by id and by name, and who
//! belongs to which guild, team and scene.
//!
//! Plain data owned by the world actor; it has no lock because only that
//! actor ever touches it. It never sends anything itself (it only notes,
//! in `cluster::interest`, the groups whose lines the node must read).

use std::collections::{HashMap, HashSet, VecDeque};

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::fanout::Audience;
use super::replay::{MaskLog, Replay, Ring};
use super::Identity;
use crate::cluster::interest::{GroupKind, Interest};
use crate::history::StoredMsg;
use crate::ids::{GuildId, SceneId, TeamId, UserId};
use crate::net::ConnTx;
use crate::user::{Inbound, UserHandle};

/// One registered player.
#[derive(Debug)]
pub struct Entry {
    pub name: String,
    pub guild: GuildId,
    pub team: TeamId,
    pub scene: SceneId,
    /// Channels this player does not want (a mirror of the user actor's
    /// mask, so fan-out can skip them without a hop through the actor).
    pub mask: u32,
    /// The connection notifications go to: set only once it is visible to
    /// fan-out, after its login reply, replay and offline whispers were
    /// queued. `None` while lingering or while a login is pending.
    pub conn: Option<ConnTx>,
    /// A login whose offline whispers are still being read: its connection
    /// belongs to the session but sees no live traffic yet.
    pub pending: Option<Box<PendingLogin>>,
    /// Since when the player has had no connection (lingering).
    pub lingering: Option<Instant>,
    /// Recent notifications, for resume.
    pub replay: Replay,
    /// The last msg_id assigned before this session began: older lines in
    /// the shared world ring were never this session's.
    pub began: u64,
    /// When world chat was masked during the session (filters the shared
    /// world ring on resume).
    pub world_masked: MaskLog,
    /// Whispers queued towards this player's connection that the client has
    /// not yet confirmed reading (a pong to a receipt ping, or a resume
    /// cursor past them). When the session ends they go to the offline
    /// inbox, so a whisper lost with a cut connection is not lost for good.
    pub unconfirmed: VecDeque<StoredMsg>,
    /// The msg_id the outstanding receipt ping covers, and when it was
    /// sent.
    pub receipt: Option<(u64, Instant)>,
    /// The user actor's mailbox. The registry holds the only sender, so
    /// removing the entry ends the actor.
    pub actor: UserHandle,
    /// Players this one blocks (`None`: nobody): their channel lines are
    /// not delivered to this player and their whispers are refused.
    pub blocks: Option<Box<HashSet<UserId>>>,
    /// Whether the block list was read from the store for this session.
    pub blocks_loaded: bool,
    /// In a cluster: the session directory revision of this session's
    /// latest claim (0 alone). A later revision naming another node ends
    /// the session.
    pub claim: u64,
    /// The cursor of the connection's login: the client has every line up
    /// to it. A resume from another node can be ahead of this node's own
    /// feed, and the lines in between then come here live after the login;
    /// fan-out skips them for this player instead of sending them again.
    pub floor: u64,
}

impl Entry {
    /// Whether this player blocks `from`.
    pub fn blocks(&self, from: UserId) -> bool {
        self.blocks.as_ref().is_some_and(|b| b.contains(&from))
    }
}

/// A login the world has accepted but not yet made visible.
#[derive(Debug)]
pub struct PendingLogin {
    pub conn: ConnTx,
    pub inbound: mpsc::Receiver<Box<Inbound>>,
    /// The login request's seq, echoed in the reply.
    pub seq: u32,
    /// The request's resume cursor (0: none).
    pub last_msg_id: u64,
    /// Whether the login found a session (takeover or resume).
    pub resumed: bool,
    /// The last msg_id assigned when the login arrived: without a cursor,
    /// what was recorded after it is replayed, so nothing sent while the
    /// login was pending is lost.
    pub since: u64,
}

/// Membership index of one kind of group, and how many times a group
/// gained its first member or lost its last.
#[derive(Debug)]
struct Groups<K: std::hash::Hash + Eq> {
    members: HashMap<K, HashSet<UserId>>,
    changes: u64,
}

impl<K: std::hash::Hash + Eq> Default for Groups<K> {
    fn default() -> Self {
        Groups {
            members: HashMap::new(),
            changes: 0,
        }
    }
}

/// A group id as the line stream's subjects spell it.
trait GroupKey: Copy {
    const KIND: GroupKind;
    fn raw(self) -> u64;
}

impl GroupKey for GuildId {
    const KIND: GroupKind = GroupKind::Guild;
    fn raw(self) -> u64 {
        self.0
    }
}

impl GroupKey for TeamId {
    const KIND: GroupKind = GroupKind::Team;
    fn raw(self) -> u64 {
        self.0
    }
}

impl GroupKey for SceneId {
    const KIND: GroupKind = GroupKind::Scene;
    fn raw(self) -> u64 {
        self.0
    }
}

/// Reading per need: where the group indexes report, and whether a group
/// the line reader misses has gained a session since the world last
/// looked. Boxed: most servers never read per need, and the registry
/// lives inside the world actor's future.
#[derive(Debug)]
struct Needs {
    interest: Interest,
    resync_due: bool,
}

impl<K: std::hash::Hash + Eq + GroupKey> Groups<K> {
    /// Adds `user`; `interest` (reading per need) hears of the group's
    /// first session here, and `resync_due` is set if the line reader
    /// does not read the group yet.
    fn join(&mut self, key: K, user: UserId, interest: &mut Option<Box<Needs>>) {
        let set = self.members.entry(key).or_default();
        if set.insert(user) && set.len() == 1 {
            self.changes += 1;
            if let Some(needs) = interest {
                needs.resync_due |= needs.interest.gained(K::KIND, key.raw());
            }
        }
    }

    /// Removes `user`; `interest` hears of the group's last session here,
    /// and `resync_due` is set if the reader can go back to per-group
    /// filters.
    fn leave(&mut self, key: K, user: UserId, interest: &mut Option<Box<Needs>>) {
        if let Some(set) = self.members.get_mut(&key) {
            if set.remove(&user) && set.is_empty() {
                self.members.remove(&key);
                self.changes += 1;
                if let Some(needs) = interest {
                    needs.resync_due |= needs.interest.lost(K::KIND, key.raw());
                }
            }
        }
    }

    fn members(&self, key: K) -> impl Iterator<Item = &UserId> {
        self.members.get(&key).into_iter().flatten()
    }
}

/// Every logged-in player and the indexes over them.
#[derive(Debug)]
pub struct Registry {
    /// Recent world chat, shared by every player's resume (see
    /// [`super::replay`]).
    pub world: Ring,
    users: HashMap<UserId, Entry>,
    names: HashMap<String, UserId>,
    guilds: Groups<GuildId>,
    teams: Groups<TeamId>,
    scenes: Groups<SceneId>,
    needs: Option<Box<Needs>>,
}

impl Registry {
    /// `world_replay`: how many recent world lines a resume can replay.
    pub fn new(world_replay: usize) -> Self {
        Registry {
            world: Ring::new(world_replay),
            users: HashMap::new(),
            names: HashMap::new(),
            guilds: Groups::default(),
            teams: Groups::default(),
            scenes: Groups::default(),
            needs: None,
        }
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    pub fn get(&self, user: UserId) -> Option<&Entry> {
        self.users.get(&user)
    }

    pub fn get_mut(&mut self, user: UserId) -> Option<&mut Entry> {
        self.users.get_mut(&user)
    }

    /// Evicts replay entries up to msg_id `cutoff` from every ring.
    pub fn expire_replays(&mut self, cutoff: u64) {
        self.world.expire(cutoff);
        for entry in self.users.values_mut() {
            entry.replay.expire(cutoff);
        }
    }

    /// An entry together with the shared world ring, for a resume.
    pub fn get_mut_with_world(&mut self, user: UserId) -> Option<(&mut Entry, &Ring)> {
        let entry = self.users.get_mut(&user)?;
        Some((entry, &self.world))
    }

    pub fn by_name(&self, name: &str) -> Option<UserId> {
        self.names.get(name).copied()
    }

    /// Applies a login token's identity to a registered player: name
    /// (and the name index), guild, team and scene.
    pub fn set_identity(&mut self, identity: &Identity) -> bool {
        let user = identity.user;
        let Some(entry) = self.users.get_mut(&user) else {
            return false;
        };
        if entry.name != identity.name {
            if self.names.get(&entry.name) == Some(&user) {
                self.names.remove(&entry.name);
            }
            entry.name = identity.name.clone();
            self.names.insert(identity.name.clone(), user);
        }
        self.regroup(
            user,
            Some(identity.guild),
            Some(identity.team),
            Some(identity.scene),
        )
    }

    pub fn insert(&mut self, user: UserId, entry: Entry) {
        // Names are unique per game; should two players claim one, the
        // newest login owns it until it leaves.
        self.names.insert(entry.name.clone(), user);
        if !entry.guild.is_none() {
            self.guilds.join(entry.guild, user, &mut self.needs);
        }
        if !entry.team.is_none() {
            self.teams.join(entry.team, user, &mut self.needs);
        }
        self.scenes.join(entry.scene, user, &mut self.needs);
        self.users.insert(user, entry);
    }

    pub fn remove(&mut self, user: UserId) -> Option<Entry> {
        let entry = self.users.remove(&user)?;
        if self.names.get(&entry.name) == Some(&user) {
            self.names.remove(&entry.name);
        }
        self.guilds.leave(entry.guild, user, &mut self.needs);
        self.teams.leave(entry.team, user, &mut self.needs);
        self.scenes.leave(entry.scene, user, &mut self.needs);
        Some(entry)
    }

    /// Moves a player between groups (the logic server's join/leave/map
    /// change); `None` keeps the current value.
    pub fn regroup(
        &mut self,
        user: UserId,
        guild: Option<GuildId>,
        team: Option<TeamId>,
        scene: Option<SceneId>,
    ) -> bool {
        let Some(entry) = self.users.get_mut(&user) else {
            return false;
        };
        if let Some(g) = guild.filter(|g| *g != entry.guild) {
            self.guilds.leave(entry.guild, user, &mut self.needs);
            if !g.is_none() {
                self.guilds.join(g, user, &mut self.needs);
            }
            entry.guild = g;
        }
        if let Some(t) = team.filter(|t| *t != entry.team) {
            self.teams.leave(entry.team, user, &mut self.needs);
            if !t.is_none() {
                self.teams.join(t, user, &mut self.needs);
            }
            entry.team = t;
        }
        if let Some(s) = scene.filter(|s| *s != entry.scene) {
            self.scenes.leave(entry.scene, user, &mut self.needs);
            self.scenes.join(s, user, &mut self.needs);
            entry.scene = s;
        }
        true
    }

    /// How many times a guild, team or scene has gained its first session
    /// on this node or lost its last, since the start: the subscription
    /// churn a node subscribing only to its players' groups would have.
    pub fn group_changes(&self) -> u64 {
        self.guilds.changes + self.teams.changes + self.scenes.changes
    }

    /// Reads per need from now on: every first and last session of a
    /// group is told to `interest`. Set before any player is registered.
    pub fn read_per_need(&mut self, interest: &Interest) {
        self.needs = Some(Box::new(Needs {
            interest: interest.clone(),
            resync_due: false,
        }));
    }

    /// Whether a group gained since the last call needs the line reader
    /// to resync (and forgets it).
    pub fn take_resync_due(&mut self) -> bool {
        self.needs
            .as_mut()
            .is_some_and(|n| std::mem::take(&mut n.resync_due))
    }

    pub fn entries(&self) -> impl Iterator<Item = (&UserId, &Entry)> {
        self.users.iter()
    }

    pub fn entries_mut(&mut self) -> impl Iterator<Item = (&UserId, &mut Entry)> {
        self.users.iter_mut()
    }

    /// Calls `f` on every member of an audience. Fan-out goes through here
    /// so it can record into each recipient's replay buffer.
    pub fn visit(&mut self, audience: &Audience, mut f: impl FnMut(&mut Entry)) {
        let Registry {
            users,
            guilds,
            teams,
            scenes,
            ..
        } = self;
        let mut one = |user: &UserId| {
            if let Some(entry) = users.get_mut(user) {
                f(entry);
            }
        };
        match audience {
            Audience::Everyone => {
                for entry in users.values_mut() {
                    f(entry);
                }
            }
            Audience::Guild(g) => guilds.members(*g).for_each(&mut one),
            Audience::Team(t) => teams.members(*t).for_each(&mut one),
            Audience::Scene(s) => scenes.members(*s).for_each(&mut one),
            Audience::Whisper { from, to } => {
                one(to);
                if from != to {
                    one(from);
                }
            }
            Audience::User(user) => one(user),
        }
    }

    pub fn guild_members(&self, g: GuildId) -> impl Iterator<Item = &UserId> {
        self.guilds.members(g)
    }

    pub fn team_members(&self, t: TeamId) -> impl Iterator<Item = &UserId> {
        self.teams.members(t)
    }

    pub fn scene_members(&self, s: SceneId) -> impl Iterator<Item = &UserId> {
        self.scenes.members(s)
    }

    /// Drops every entry (shutdown), returning them.
    pub fn drain(&mut self) -> Vec<(UserId, Entry)> {
        self.names.clear();
        self.guilds.members.clear();
        self.teams.members.clear();
        self.scenes.members.clear();
        self.users.drain().collect()
    }
}
