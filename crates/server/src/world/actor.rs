//! The world actor's loop and its handlers. Private: everything outside
//! talks to it through [`super::WorldHandle`].

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use guildchat_protocol::{codec, mask_bit, pb, ChatType, KickReason, MsgType, ResCode};
use prost::Message;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::fanout::{Audience, Fanout, Line};
use super::registry::{Entry, PendingLogin, Registry};
use super::replay::{MaskLog, Replay, Resume};
use super::{ChatLine, ChatOutcome, LoginArgs, Target, WeakWorld, WorldMsg};
use crate::cluster::{wire, BusLine, Cluster, Holder};
use crate::config::Config;
use crate::history::{Conversation, HistoryHandle, StoredMsg};
use crate::ids::{ConnId, MsgId, NodeId, UserId};
use crate::net::outbound::Encoded;
use crate::net::{Close, Priority};
use crate::records;
use crate::stats::Stats;
use crate::user::{Attach, UserHandle, UserMsg};

/// How often the world does its housekeeping: linger expiry, the stall rule
/// for slow consumers, gauges. Both timers are therefore precise to a tick.
const TICK: Duration = Duration::from_secs(1);

pub(super) struct World {
    config: Arc<Config>,
    stats: Arc<Stats>,
    fanout: Box<dyn Fanout>,
    inbox: mpsc::Receiver<WorldMsg>,
    me: WeakWorld,
    history: Option<HistoryHandle>,
    services: Arc<crate::user::Services>,
    registry: Registry,
    /// The last msg_id handed out. Seeded from the wall clock so ids keep
    /// increasing across restarts.
    last_msg_id: u64,
    /// The last stream line handled (cluster), and the generation of the
    /// line reader's consumer whose lines are taken: lines of an older
    /// one come again from the newer (see `cluster::interest`).
    bus_seq: u64,
    bus_generation: u64,
    /// `(when, last_msg_id then)` once a tick, as far back as
    /// [`Config::replay_max_age`]: which ids are too old to replay.
    id_marks: VecDeque<(Instant, u64)>,
    shutting_down: bool,
    /// Unconfirmed whispers of ended sessions on their way to the offline
    /// inbox, kept here while the store's queue is full and retried on
    /// every tick (at most [`MAX_SPILLS`]).
    spills: Vec<(u64, StoredMsg)>,
    /// In a cluster: the link to the other nodes (`None` alone).
    cluster: Option<Cluster>,
    /// In a cluster: what this node knows of the others (boxed: the world
    /// actor's future stays small, see Memory layout in ARCHITECTURE.md).
    remote: Box<Others>,
}

/// What a cluster node's world knows of the other nodes.
#[derive(Default)]
struct Others {
    /// In a cluster: players whose session another node holds, as the
    /// session directory last said.
    elsewhere: HashMap<UserId, Remote>,
    /// In a cluster: directory keys deleted lately, with their revision and
    /// when: a login that claimed before such a delete was already
    /// replaced (kept [`RELEASED_FOR`]).
    released: HashMap<UserId, (u64, Instant)>,
    /// In a cluster: when each node (this one too) last said it was alive,
    /// and which run of it.
    beats: HashMap<NodeId, (Instant, u64)>,
    /// In a cluster: whispers this node sent to players on other nodes in
    /// the last [`REMOTE_WINDOW`]. If their node is found dead meanwhile
    /// they go to the shared inbox, since that node may have died with
    /// them unread (at most [`MAX_REMOTE_SENT`]).
    sent_remote: VecDeque<(Instant, NodeId, UserId, StoredMsg)>,
    /// In a cluster: every player's block list, from the shared bucket
    /// (non-empty lists only, each within `max_blocks`), so a whisper to
    /// a blocker on another node is refused here with `RES_BLOCKED`.
    blocks: HashMap<UserId, Box<[UserId]>>,
}

/// How long a directory delete is remembered: longer than any login takes
/// from its claim to the world.
const RELEASED_FOR: Duration = Duration::from_secs(60);
/// How long a whisper sent to another node's player is kept in case that
/// node turns out dead: past the time it takes to be found dead.
const REMOTE_WINDOW: Duration = Duration::from_secs(10);
/// Most such whispers kept; past it the oldest go unguarded (counted).
const MAX_REMOTE_SENT: usize = 100_000;

/// A player whose session is on another node.
struct Remote {
    node: NodeId,
    name: String,
    revision: u64,
}

/// A chat line the world has checked and addressed, still without its
/// msg_id.
struct Routed {
    audience: Audience,
    conversation: Conversation,
    notify: pb::ChatMessageNotifyChat,
    nonce: u64,
    /// A whisper kept as an offline whisper for this target.
    store_for: Option<UserId>,
    /// A whisper queued live to this target on this node.
    live_to: Option<UserId>,
    /// A whisper to a player whose session another node holds.
    to_node: Option<NodeId>,
}

/// Most spilled whispers the world holds while the store cannot take them;
/// past it the oldest are lost (logged and counted), since the store is
/// then failing anyway.
const MAX_SPILLS: usize = 100_000;

/// Wall-clock Unix milliseconds (message timestamps).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl World {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        config: Arc<Config>,
        stats: Arc<Stats>,
        fanout: Box<dyn Fanout>,
        inbox: mpsc::Receiver<WorldMsg>,
        me: WeakWorld,
        history: Option<HistoryHandle>,
        first_msg_id: u64,
        services: Arc<crate::user::Services>,
    ) -> Self {
        // The cluster link the user actors share, when there is one.
        let cluster = services.cluster.clone();
        // Ids continue from the store's high-water mark, and from the
        // clock (1024 ids per millisecond) when nothing is stored, so they
        // keep increasing across restarts. In a cluster they are the
        // stream's: the last one is the stream's last line when this node
        // joined, and each line read raises it.
        let last_msg_id = match &cluster {
            // Above what the store holds from an earlier run too (lines
            // delivered alone while NATS was out of reach), so that those
            // ids are not handed out twice.
            Some(cluster) => cluster.msg_id(cluster.joined_at()).max(first_msg_id),
            None => first_msg_id.max(now_ms() << 10),
        };
        let mut registry = Registry::new(config.session.replay_buffer_shed());
        if let Some(interest) = cluster.as_ref().and_then(|c| c.interest()) {
            registry.read_per_need(interest);
        }
        let bus_seq = cluster.as_ref().map_or(0, |c| c.joined_at());
        World {
            cluster,
            remote: Box::default(),
            services,
            registry,
            bus_seq,
            bus_generation: 0,
            config,
            stats,
            fanout,
            inbox,
            me,
            history,
            last_msg_id,
            id_marks: VecDeque::new(),
            shutting_down: false,
            spills: Vec::new(),
        }
    }

    pub(super) async fn run(mut self) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = self.inbox.recv() => match msg {
                    Some(msg) => {
                        self.handle(msg);
                        self.resync_if_due();
                    }
                    None => break,
                },
                _ = tick.tick() => self.housekeeping(),
            }
        }
        debug!("world actor stopped");
    }

    /// A group that gained its first session here is not read yet: the
    /// line reader reads again after the last line handled, and lines of
    /// its current consumer are dropped until the new one's arrive.
    fn resync_if_due(&mut self) {
        if !self.registry.take_resync_due() {
            return;
        }
        if let Some(interest) = self.cluster.as_ref().and_then(|c| c.interest()) {
            self.bus_generation = interest.resync(self.bus_seq);
        }
    }

    fn handle(&mut self, msg: WorldMsg) {
        match msg {
            WorldMsg::Login { args, respond_to } => {
                let _ = respond_to.send(self.login(args));
            }
            WorldMsg::Ready {
                user,
                conn,
                offline,
                blocks,
                backfill,
                mask,
            } => self.ready(user, conn, offline, blocks, backfill, mask),
            WorldMsg::Block {
                user,
                target,
                add,
                respond_to,
            } => {
                let cap = self.config.max_blocks;
                let done = self.registry.get_mut(user).is_some_and(|e| {
                    let set = e.blocks.get_or_insert_with(Default::default);
                    if !add {
                        set.remove(&target);
                        true
                    } else {
                        (set.len() < cap || set.contains(&target)) && {
                            set.insert(target);
                            true
                        }
                    }
                });
                let _ = respond_to.send(done);
            }
            WorldMsg::BlockList { user, respond_to } => {
                let mut list: Vec<UserId> = self
                    .registry
                    .get(user)
                    .and_then(|e| e.blocks.as_ref())
                    .map(|b| b.iter().copied().collect())
                    .unwrap_or_default();
                list.sort();
                let _ = respond_to.send(list);
            }
            WorldMsg::Detached { user, conn } => self.detached(user, conn),
            WorldMsg::Receipt { user, conn, upto } => self.receipt(user, conn, upto),
            WorldMsg::HistoryScope {
                user,
                channel,
                group,
                peer,
                respond_to,
            } => {
                let _ = respond_to.send(self.history_scope(user, channel, group, peer));
            }
            WorldMsg::Chat { line, respond_to } => self.chat(line, respond_to),
            WorldMsg::SetMask {
                user,
                mask,
                respond_to,
            } => {
                let now = self.last_msg_id;
                if let Some(entry) = self.registry.get_mut(user) {
                    let bit = mask_bit(ChatType::ChatWorld);
                    if (entry.mask ^ mask) & bit != 0 {
                        entry.world_masked.set(mask & bit != 0, now);
                    }
                    entry.mask = mask;
                }
                let _ = respond_to.send(());
            }
            WorldMsg::Online { respond_to } => {
                let _ = respond_to.send((self.registry.len() as u32, self.config.max_online));
            }
            WorldMsg::Backlog { user, respond_to } => {
                let backlog = self
                    .registry
                    .get(user)
                    .and_then(|e| e.conn.as_ref())
                    .map(|c| c.backlog());
                let _ = respond_to.send(backlog);
            }
            WorldMsg::Regroup {
                user,
                guild,
                team,
                scene,
                respond_to,
            } => {
                self.registry.regroup(user, guild, team, scene);
                self.publish_gauges();
                let _ = respond_to.send(self.view(user));
            }
            WorldMsg::Counts { respond_to } => {
                let lingering = self
                    .registry
                    .entries()
                    .filter(|(_, e)| e.lingering.is_some())
                    .count() as u64;
                let _ = respond_to.send((self.registry.len() as u64, lingering));
            }
            WorldMsg::FindName { name, respond_to } => {
                let _ = respond_to.send(self.registry.by_name(&name));
            }
            WorldMsg::Player { user, respond_to } => {
                let _ = respond_to.send(self.view(user));
            }
            WorldMsg::Disband { guild, respond_to } => {
                let members: Vec<UserId> = self.registry.guild_members(guild).copied().collect();
                for user in &members {
                    self.registry
                        .regroup(*user, Some(crate::ids::GuildId(0)), None, None);
                }
                self.publish_gauges();
                let _ = respond_to.send(members.len());
            }
            WorldMsg::GuildOnline { guild, respond_to } => {
                let mut members: Vec<UserId> =
                    self.registry.guild_members(guild).copied().collect();
                members.sort();
                let _ = respond_to.send(members);
            }
            WorldMsg::Recall { msg, respond_to } => {
                let _ = respond_to.send(self.recall(&msg));
            }
            WorldMsg::Kick {
                user,
                reason,
                respond_to,
            } => {
                // The session ends now, not when the connection does, so a
                // fast reconnect starts a new session instead of resuming
                // this one.
                let found = self.end_session(user, Some(reason));
                let _ = respond_to.send(found);
            }
            WorldMsg::Announce {
                text,
                to,
                respond_to,
            } => self.announce(text, to, respond_to),
            WorldMsg::Bus {
                line,
                seq,
                generation,
            } => self.bus_line(*line, seq, generation),
            WorldMsg::SessionsByNode { respond_to } => {
                let mut by: HashMap<NodeId, u64> = HashMap::new();
                if let Some(cluster) = &self.cluster {
                    by.insert(cluster.node().clone(), self.registry.len() as u64);
                }
                // Every live node, those holding no session too: the
                // admin API asks each of them for its figures.
                for node in self.remote.beats.keys() {
                    if self.alive(node) {
                        by.entry(node.clone()).or_default();
                    }
                }
                for remote in self.remote.elsewhere.values() {
                    if self.alive(&remote.node) {
                        *by.entry(remote.node.clone()).or_default() += 1;
                    }
                }
                let _ = respond_to.send(by.into_iter().collect());
            }
            WorldMsg::Drain { batch, respond_to } => {
                let users: Vec<UserId> = self
                    .registry
                    .entries()
                    .take(batch)
                    .map(|(user, _)| *user)
                    .collect();
                for user in users {
                    // Not lingering: the player resumes on another node,
                    // and what it may not have read goes to the inbox.
                    self.end_session(user, Some(KickReason::KickReconnect));
                }
                let _ = respond_to.send(self.registry.len());
            }
            WorldMsg::NodeBeat { node, incarnation } => {
                let restarted = self
                    .remote
                    .beats
                    .insert(node.clone(), (Instant::now(), incarnation))
                    .is_some_and(|(_, before)| before != incarnation);
                // A node back under the same id lost what it held: the
                // whispers sent to its players go to the inbox, as for a
                // node found dead.
                if restarted {
                    self.guard_remote_whispers(Some(&node));
                }
            }
            WorldMsg::Locate { user, respond_to } => {
                let node = match (&self.cluster, self.registry.get(user)) {
                    (Some(cluster), Some(_)) => Some(cluster.node().clone()),
                    _ => self
                        .remote
                        .elsewhere
                        .get(&user)
                        .filter(|r| self.alive(&r.node))
                        .map(|r| r.node.clone()),
                };
                let _ = respond_to.send(node);
            }
            WorldMsg::Directory {
                user,
                holder,
                revision,
            } => self.directory(user, holder, revision),
            WorldMsg::Blocks { user, blocked } => {
                if blocked.is_empty() {
                    self.remote.blocks.remove(&user);
                } else {
                    self.remote.blocks.insert(user, blocked);
                }
            }
            WorldMsg::Shutdown { respond_to } => {
                self.shutting_down = true;
                let entries = self.registry.drain();
                info!(players = entries.len(), "ending every session for shutdown");
                for (user, mut entry) in entries {
                    if let Some(pending) = &entry.pending {
                        abandon(user, &entry, pending, KickReason::KickShutdown, &self.stats);
                    }
                    // The actor answers its pending chat replies first, then
                    // kicks its connection; if it cannot be told, the world
                    // kicks it now.
                    if let Some(conn) = &entry.conn {
                        if !entry.actor.try_send(UserMsg::End(KickReason::KickShutdown)) {
                            conn.close(Close::Kick(KickReason::KickShutdown), &self.stats);
                        }
                    }
                    self.spill(user, &mut entry);
                    // The directory stops naming this node for the player.
                    if let (Some(cluster), claim @ 1..) = (&self.cluster, entry.claim) {
                        cluster.release(user, claim);
                    }
                }
                self.flush_spills();
                if !self.spills.is_empty() {
                    error!(
                        whispers = self.spills.len(),
                        "unconfirmed whispers could not be kept at shutdown"
                    );
                }
                // The world's store handle goes now: once the user actors
                // have answered their replies and ended, nothing holds the
                // store open and its threads can finish and be joined.
                self.history = None;
                self.publish_gauges();
                let _ = respond_to.send(());
            }
        }
    }

    /// A login's first step: the connection joins the session (a new one,
    /// or the running one on takeover and resume) as its pending login. The
    /// token's identity applies at once; only actor state (mask, cooldown
    /// clocks, mute) carries over. Nothing is queued on the connection yet:
    /// [`World::ready`] does that once the player's offline whispers are
    /// read, so the login reply is its first frame and live traffic comes
    /// after the replay and the whispers.
    fn login(&mut self, args: LoginArgs) -> Result<(), ResCode> {
        let LoginArgs {
            identity,
            conn,
            inbound,
            seq,
            last_msg_id,
            claim,
        } = args;
        if self.shutting_down {
            return Err(ResCode::ResInternal);
        }
        let user = identity.user;
        // Checked here too, not only by the reader: a ban's kick and this
        // login are ordered by the world's inbox, so a ban applied while
        // the token was being checked still keeps the player out.
        if self.services.moderation.ban_left(user).is_some() {
            return Err(ResCode::ResBanned);
        }
        let since = self.last_msg_id;
        let resumed = self.registry.set_identity(&identity);
        self.publish_gauges();
        if resumed {
            let Some(entry) = self.registry.get_mut(user) else {
                return Err(ResCode::ResInternal);
            };
            // The previous device goes now. A login of it still pending is
            // answered first, so each of many concurrent logins gets its
            // RES_OK before it is told it was replaced.
            if let Some(old) = entry.conn.take() {
                old.close(Close::Kick(KickReason::KickLoggedInElsewhere), &self.stats);
            }
            if let Some(old) = entry.pending.take() {
                abandon(
                    user,
                    entry,
                    &old,
                    KickReason::KickLoggedInElsewhere,
                    &self.stats,
                );
            }
            entry.lingering = None;
            Stats::bump(&self.stats.takeovers);
        } else {
            if self.registry.len() >= self.config.max_online as usize {
                return Err(ResCode::ResServerFull);
            }
            let Some(world) = self.me.upgrade() else {
                return Err(ResCode::ResInternal);
            };
            let actor = UserHandle::spawn(
                identity.clone(),
                world,
                self.history.clone(),
                self.config.clone(),
                self.stats.clone(),
                self.services.clone(),
            );
            let session = &self.config.session;
            let entry = Entry {
                name: identity.name.clone(),
                guild: identity.guild,
                team: identity.team,
                scene: identity.scene,
                mask: 0,
                conn: None,
                pending: None,
                lingering: None,
                replay: Replay::new(session.replay_buffer, session.replay_buffer_shed()),
                began: since,
                world_masked: MaskLog::default(),
                unconfirmed: VecDeque::new(),
                receipt: None,
                actor,
                blocks: None,
                blocks_loaded: false,
                claim,
                floor: 0,
            };
            self.registry.insert(user, entry);
            self.publish_gauges();
        }
        let conn_id = conn.id();
        if let Some(entry) = self.registry.get_mut(user) {
            entry.claim = entry.claim.max(claim);
            entry.pending = Some(Box::new(PendingLogin {
                conn,
                inbound,
                seq,
                last_msg_id,
                resumed,
                since,
            }));
        }
        Stats::bump(&self.stats.logins);
        self.stats.metrics.login(ResCode::ResOk);
        // Another node claimed the session after this login did, and the
        // directory said so before this login got here: this login is
        // already replaced. It gets its reply, then the kick.
        let later = self.remote.elsewhere.get(&user).map(|r| r.revision);
        let deleted = self.remote.released.get(&user).map(|(rev, _)| *rev);
        if claim != 0 && later.max(deleted).is_some_and(|rev| rev > claim) {
            if let Some(entry) = self.registry.get_mut(user) {
                entry.claim = 0;
            }
            self.end_session(user, Some(KickReason::KickLoggedInElsewhere));
            Stats::bump(&self.stats.takeovers);
            return Ok(());
        }
        // What must be read before the login's reply: the offline
        // whispers, the block list, and, for a session new to this node
        // that comes with a cursor (a resume from another node), its lines
        // from the cluster's stream.
        let mut offline_read = None;
        let mut blocks_read = None;
        if let Some(history) = &self.history {
            history.record_login(user.0, &identity.name);
            // A session reads its block list once, at its first login.
            let want_blocks = self.cluster.is_none()
                && self.registry.get(user).is_some_and(|e| !e.blocks_loaded)
                && history.may_have_blocks(user.0);
            // Read through the writer's queue, after every whisper and
            // block the world has already queued for this player. In a
            // cluster the whispers wait in the shared inbox instead.
            offline_read = (self.cluster.is_none() && history.may_have_offline(user.0))
                .then(|| history.pending_offline(user.0));
            blocks_read = want_blocks.then(|| history.pending_blocks(user.0));
        }
        let backfill = match &self.cluster {
            Some(cluster) if !resumed && last_msg_id > 0 => {
                let session = &self.config.session;
                Some((
                    cluster.clone(),
                    crate::cluster::Wants {
                        user,
                        guild: identity.guild,
                        team: identity.team,
                        scene: identity.scene,
                        after: last_msg_id,
                        cap: session.replay_buffer + 2 * session.replay_buffer_shed(),
                    },
                ))
            }
            _ => None,
        };
        let inbox = self.cluster.clone().filter(|_| self.history.is_some());
        // In a cluster the block list is the shared one.
        let shared_blocks = self
            .cluster
            .clone()
            .filter(|_| self.registry.get(user).is_some_and(|e| !e.blocks_loaded));
        // So is the mask, for a session new to this node.
        let shared_mask = self.cluster.clone().filter(|_| !resumed);
        if offline_read.is_none()
            && blocks_read.is_none()
            && backfill.is_none()
            && inbox.is_none()
            && shared_blocks.is_none()
            && shared_mask.is_none()
        {
            self.ready(user, conn_id, Vec::new(), None, None, None);
        } else {
            // The world does not wait: the answers come back as Ready.
            let world = self.me.clone();
            let history = self.history.clone();
            tokio::spawn(async move {
                // The cluster's reads, side by side.
                let stream = async {
                    let backfill = async {
                        match backfill {
                            Some((cluster, wants)) => Some(cluster.backfill(wants).await),
                            None => None,
                        }
                    };
                    let inbox = async {
                        let cluster = inbox?;
                        // Unread, they stay in the inbox for a later login.
                        Some(cluster.pending_offline(user).await.unwrap_or_else(|e| {
                            warn!(%user, error = %e, "cannot read the offline inbox");
                            Vec::new()
                        }))
                    };
                    let blocks = async {
                        let cluster = shared_blocks?;
                        Some(cluster.blocks(user).await.unwrap_or_else(|e| {
                            warn!(%user, error = %e, "cannot read the shared block list; this session starts without it");
                            Vec::new()
                        }))
                    };
                    let mask = async {
                        let cluster = shared_mask?;
                        cluster.mask(user).await.unwrap_or_else(|e| {
                            warn!(%user, error = %e, "cannot read the shared mask");
                            None
                        })
                    };
                    tokio::join!(backfill, inbox, blocks, mask)
                };
                let store = async {
                    let Some(history) = &history else {
                        return (Vec::new(), None);
                    };
                    // Keyed by msg_id, which deletes them from the local
                    // store.
                    let offline = match offline_read {
                        Some(read) => read_offline(history, user, read)
                            .await
                            .into_iter()
                            .map(|msg| crate::history::Waiting {
                                key: msg.msg_id,
                                msg,
                                shown: false,
                            })
                            .collect(),
                        None => Vec::new(),
                    };
                    let blocks = match blocks_read {
                        Some(read) => Some(read_blocks(history, user, read).await),
                        None => None,
                    };
                    (offline, blocks)
                };
                let ((backfill, inbox, shared, mask), (offline, blocks)) =
                    tokio::join!(stream, store);
                let blocks = shared.or(blocks);
                // Keyed by inbox sequence, which deletes them from the
                // shared inbox.
                let offline = inbox.unwrap_or(offline);
                if let Some(world) = world.upgrade() {
                    let _ = world
                        .tell(WorldMsg::Ready {
                            user,
                            conn: conn_id,
                            offline,
                            blocks,
                            backfill: backfill.map(Box::new),
                            mask,
                        })
                        .await;
                }
            });
        }
        debug!(%user, resumed, "login");
        Ok(())
    }

    /// A login's second step, in one go so that nothing can come between:
    /// the login reply, then everything the client has not seen (replay and
    /// offline whispers, merged in msg_id order, each once), then the
    /// barrier for the whispers; then the connection becomes visible to
    /// fan-out and the user actor gets it. A login superseded meanwhile is
    /// ignored.
    fn ready(
        &mut self,
        user: UserId,
        conn_id: ConnId,
        offline: Vec<crate::history::Waiting>,
        blocks: Option<Vec<u64>>,
        backfill: Option<Box<crate::cluster::Backfill>>,
        mask: Option<u32>,
    ) {
        let current = self.last_msg_id;
        let Some((entry, world_ring)) = self.registry.get_mut_with_world(user) else {
            return;
        };
        // The session's block list, from the first read to come back, also
        // a superseded login's: no block can have changed it since, as the
        // actor has no connection before its first Ready.
        if let Some(blocks) = blocks.filter(|_| !entry.blocks_loaded) {
            entry.blocks =
                (!blocks.is_empty()).then(|| Box::new(blocks.into_iter().map(UserId).collect()));
            entry.blocks_loaded = true;
        }
        if entry.pending.as_ref().map(|p| p.conn.id()) != Some(conn_id) {
            return;
        }
        // The mask the player set on another node, for a session new here
        // (its first Ready: nothing can have changed it since).
        if let Some(mask) = mask.filter(|_| entry.pending.as_ref().is_some_and(|p| !p.resumed)) {
            let bit = mask_bit(ChatType::ChatWorld);
            if (entry.mask ^ mask) & bit != 0 {
                entry.world_masked.set(mask & bit != 0, entry.began);
            }
            entry.mask = mask;
        }
        let Some(pending) = entry.pending.take() else {
            return;
        };
        let PendingLogin {
            conn,
            inbound,
            seq,
            last_msg_id,
            resumed,
            since,
        } = *pending;
        entry.floor = last_msg_id;
        // Without a cursor, what was recorded while the login was pending is
        // still this client's to see.
        let after = if last_msg_id > 0 { last_msg_id } else { since };
        let mut resume = entry
            .replay
            .since(after, Some((world_ring, entry.began, &entry.world_masked)));
        // A cursor from before this session (it expired, the server
        // restarted, or another device started it): what came between
        // cannot be replayed, unless the cluster's stream had it.
        match backfill {
            Some(backfill) => {
                let cap = self.config.session.replay_buffer
                    + 2 * self.config.session.replay_buffer_shed();
                let have: std::collections::HashSet<u64> =
                    resume.frames.iter().map(|(id, _)| *id).collect();
                // The stream's read may be ahead of this node's own feed:
                // lines past what the world has handled come live once the
                // connection is visible, and must not come twice.
                resume.frames.extend(
                    backfill
                        .frames
                        .into_iter()
                        .filter(|(id, _)| *id <= current && !have.contains(id)),
                );
                resume.frames.sort_unstable_by_key(|(id, _)| *id);
                // The replay must fit the connection's queue: the newest
                // win.
                if resume.frames.len() > cap {
                    let over = resume.frames.len() - cap;
                    resume.frames.drain(..over);
                    resume.gap = true;
                }
                resume.gap |= backfill.gap;
            }
            None if last_msg_id > 0 && last_msg_id < entry.began => resume.gap = true,
            None => {}
        }
        // The cursor proves the client read every whisper up to it.
        if last_msg_id > 0 {
            while entry
                .unconfirmed
                .front()
                .is_some_and(|m| m.msg_id <= last_msg_id)
            {
                entry.unconfirmed.pop_front();
            }
        }
        entry.receipt = None;
        // Offline whispers, and whispers an earlier connection of the
        // session was sent but never confirmed (none the client's cursor
        // says it has), join the replay, each msg_id once. The offline ones
        // are deleted after this connection's barrier; the unconfirmed ones
        // stay tracked until its receipt.
        let mut ack = Vec::with_capacity(offline.len());
        let replayed = resume.frames.len();
        let mut present: std::collections::HashSet<u64> =
            resume.frames.iter().map(|(id, _)| *id).collect();
        let seen = |id: u64| last_msg_id > 0 && id <= last_msg_id;
        let mut whispers = Vec::new();
        // An offline whisper is sent (once) and deleted only once this
        // connection has carried it, whatever the cursor says, unless a
        // connection of the session was sent it and the cursor has passed
        // it: the client has it (a session's whispers spilled as it moved
        // to another node would otherwise come again, older than the
        // cursor).
        for w in &offline {
            ack.push(w.key);
            let m = &w.msg;
            if w.shown && seen(m.msg_id) {
                continue;
            }
            if present.insert(m.msg_id) {
                whispers.push((m.msg_id, codec::encode(&records::notification(m))));
            }
        }
        let delivered = whispers.len();
        for m in &entry.unconfirmed {
            if !seen(m.msg_id) && present.insert(m.msg_id) {
                whispers.push((m.msg_id, codec::encode(&records::notification(m))));
            }
        }
        resume.frames.extend(whispers);
        // The shared world ring holds every player's lines, and whispers
        // may have reached this session before its block list did: a
        // blocker's resume leaves the blocked players' lines out.
        if let Some(blocks) = &entry.blocks {
            let blocked = |frame: &Bytes| {
                pb::ChatMessageNotifyChat::decode(frame.as_ref())
                    .is_ok_and(|n| blocks.contains(&UserId(n.senderid)))
            };
            resume.frames.retain(|(_, frame)| !blocked(frame));
            entry
                .unconfirmed
                .retain(|m| !blocks.contains(&UserId(m.sender_id)));
        }
        resume.frames.sort_unstable_by_key(|(id, _)| *id);
        // Everything after the reply is newer than its cursor.
        let cursor = resume
            .frames
            .first()
            .map_or(current, |(id, _)| current.min(id - 1));
        let reply = login_reply(seq, user, entry, resumed, cursor, replayed, &resume);
        Stats::add(&self.stats.replayed, replayed as u64);
        Stats::add(&self.stats.offline_delivered, delivered as u64);
        if resume.gap {
            Stats::bump(&self.stats.replay_gaps);
        }
        let _ = conn.try_frame(reply, &self.stats);
        for (_, frame) in resume.frames {
            if !conn.deliver(frame, Priority::Keep, &self.stats) {
                break;
            }
        }
        let offline_ack = if ack.is_empty() {
            None
        } else {
            let token = conn_id.0;
            conn.barrier(Bytes::from(format!("{OFFLINE_ACK}{token}")));
            Some((token, ack))
        };
        entry.conn = Some(conn.clone());
        entry.lingering = None;
        entry.actor.attach(Attach {
            conn,
            inbound,
            offline_ack,
            mask: (!resumed).then_some(entry.mask),
        });
        if resumed {
            debug!(%user, "session resumed");
        }
    }

    /// A user actor's connection went away. The session lingers for a
    /// resume unless lingering is off.
    fn detached(&mut self, user: UserId, conn: ConnId) {
        let Some(entry) = self.registry.get_mut(user) else {
            return;
        };
        // A detach from a connection that was already replaced (takeover)
        // changes nothing.
        if entry.conn.as_ref().map(|c| c.id()) != Some(conn) {
            return;
        }
        entry.conn = None;
        entry.receipt = None;
        if self.config.session.linger_ms == 0 && entry.pending.is_none() {
            self.end_session(user, None);
            debug!(%user, "session ended");
        } else {
            entry.lingering = Some(Instant::now());
            Stats::bump(&self.stats.lingering);
            debug!(%user, "lingering");
        }
    }

    /// The client read every whisper up to `upto`: they need no spill.
    /// Only the receipt this connection was sent counts, so a forged pong
    /// cannot clear whispers it never saw.
    fn receipt(&mut self, user: UserId, conn: ConnId, upto: u64) {
        let Some(entry) = self.registry.get_mut(user) else {
            return;
        };
        if entry.conn.as_ref().map(|c| c.id()) != Some(conn)
            || entry.receipt.map(|(id, _)| id) != Some(upto)
        {
            return;
        }
        entry.receipt = None;
        while entry.unconfirmed.front().is_some_and(|m| m.msg_id <= upto) {
            entry.unconfirmed.pop_front();
        }
        Stats::bump(&self.stats.receipts);
    }

    /// Removes a session now; with `kick`, its connections are told why.
    /// Whispers it may not have read go to the offline inbox. Dropping the
    /// entry drops the actor's only mailbox sender: the user actor ends.
    fn end_session(&mut self, user: UserId, kick: Option<KickReason>) -> bool {
        let Some(mut entry) = self.registry.remove(user) else {
            return false;
        };
        if let (Some(cluster), claim @ 1..) = (&self.cluster, entry.claim) {
            cluster.release(user, claim);
        }
        if let Some(reason) = kick {
            if let Some(conn) = &entry.conn {
                conn.close(Close::Kick(reason), &self.stats);
            }
            if let Some(pending) = &entry.pending {
                abandon(user, &entry, pending, reason, &self.stats);
            }
        }
        self.spill(user, &mut entry);
        self.flush_spills();
        self.publish_gauges();
        true
    }

    /// Stores a session's unconfirmed whispers as offline whispers (the
    /// same msg_ids, so a client that did read them de-duplicates). Nobody
    /// waits: their senders were answered when they were committed to
    /// history.
    fn spill(&mut self, user: UserId, entry: &mut Entry) {
        if self.history.is_none() {
            return;
        }
        for m in entry.unconfirmed.drain(..) {
            self.spills.push((user.0, m));
            Stats::bump(&self.stats.offline_spilled);
        }
    }

    /// Hands the spilled whispers to the store in one write; a full queue
    /// keeps them for the next tick.
    fn flush_spills(&mut self) {
        let Some(history) = &self.history else {
            return;
        };
        if self.spills.is_empty() {
            return;
        }
        let whispers = std::mem::take(&mut self.spills);
        // In a cluster they go to the shared inbox: nobody waits, and one
        // refused (a full inbox, NATS gone) is logged by the inbox.
        if let Some(cluster) = &self.cluster {
            for (to, m) in whispers {
                drop(cluster.spill_offline(UserId(to), &m, true));
            }
            return;
        }
        if history.spill_offline(whispers.clone()).is_err() {
            self.spills = whispers;
            if self.spills.len() > MAX_SPILLS {
                let lost = self.spills.len() - MAX_SPILLS;
                self.spills.drain(..lost);
                Stats::add(&self.stats.offline_spill_lost, lost as u64);
                error!(
                    lost,
                    "the store cannot take unconfirmed whispers; the oldest are lost"
                );
            }
        }
    }

    fn next_msg_id(&mut self) -> MsgId {
        self.last_msg_id = self.last_msg_id.max(now_ms() << 10).saturating_add(1);
        MsgId(self.last_msg_id)
    }

    /// Checks and addresses a chat line: who hears it, where it is kept.
    fn route(&mut self, line: ChatLine) -> Result<Routed, ResCode> {
        let Some(sender) = self.registry.get(line.from) else {
            return Err(ResCode::ResNotLoggedIn);
        };
        // Whether the whisper's target gets it live (recorded for replay and
        // queued if connected) or stored as an offline whisper, and its name.
        let mut store_for = None;
        let mut live_to = None;
        let mut target_name = String::new();
        let mut to_node = None;
        let (audience, conversation, guild, team, scene) = match line.channel {
            ChatType::ChatNormal => (
                Audience::Scene(sender.scene),
                Conversation::Scene(sender.scene.0),
                0,
                0,
                sender.scene.0,
            ),
            ChatType::ChatGuild if sender.guild.is_none() => return Err(ResCode::ResNotInGuild),
            ChatType::ChatGuild => (
                Audience::Guild(sender.guild),
                Conversation::Guild(sender.guild.0),
                sender.guild.0,
                0,
                0,
            ),
            ChatType::ChatTeam if sender.team.is_none() => return Err(ResCode::ResNotInTeam),
            ChatType::ChatTeam => (
                Audience::Team(sender.team),
                Conversation::Team(sender.team.0),
                0,
                sender.team.0,
                0,
            ),
            ChatType::ChatWorld => (Audience::Everyone, Conversation::World, 0, 0, 0),
            ChatType::ChatPrivate => {
                // Not registered: with a store, the user actor asks it
                // whether the player exists (RES_TARGET_OFFLINE here means
                // "resolve it") and comes back with Target::Known.
                let unregistered = if self.history.is_some() {
                    ResCode::ResTargetOffline
                } else {
                    ResCode::ResNoSuchTarget
                };
                let (to, known) = match &line.target {
                    Target::Id(id) => (*id, None),
                    Target::Name(name) => (self.registry.by_name(name).ok_or(unregistered)?, None),
                    Target::Known(id, name) => (*id, Some(name)),
                    Target::None => return Err(ResCode::ResNoSuchTarget),
                };
                if self.registry.get(to).is_some_and(|e| e.blocks(line.from)) {
                    return Err(ResCode::ResBlocked);
                }
                let audience = match (self.registry.get(to), &self.history) {
                    // A live connection, or a login about to get one: the
                    // whisper is recorded for replay and, once queued,
                    // tracked until the client confirms reading it.
                    (Some(e), _) if e.conn.is_some() || e.pending.is_some() => {
                        target_name = e.name.clone();
                        live_to = Some(to);
                        Audience::Whisper {
                            from: line.from,
                            to,
                        }
                    }
                    // Lingering without a store: the replay buffer is all
                    // there is.
                    (Some(e), None) => {
                        target_name = e.name.clone();
                        Audience::Whisper {
                            from: line.from,
                            to,
                        }
                    }
                    // Lingering, or known and offline: stored now, as the
                    // world decides, for the next login.
                    (Some(e), Some(_)) => {
                        target_name = e.name.clone();
                        store_for = Some(to);
                        Audience::User(line.from)
                    }
                    // Another node holds the target's session: that node
                    // queues it, tracks it and keeps it if the target has
                    // gone by then.
                    (None, _)
                        if self
                            .remote
                            .elsewhere
                            .get(&to)
                            .is_some_and(|r| self.alive(&r.node)) =>
                    {
                        // The target's node would drop it: say so here.
                        if self
                            .remote
                            .blocks
                            .get(&to)
                            .is_some_and(|b| b.contains(&line.from))
                        {
                            return Err(ResCode::ResBlocked);
                        }
                        let remote = &self.remote.elsewhere[&to];
                        target_name = remote.name.clone();
                        to_node = Some(remote.node.clone());
                        Audience::Whisper {
                            from: line.from,
                            to,
                        }
                    }
                    (None, Some(_)) if known.is_some() => {
                        target_name = known.cloned().unwrap_or_default();
                        store_for = Some(to);
                        Audience::User(line.from)
                    }
                    (None, _) => return Err(ResCode::ResTargetOffline),
                };
                (audience, Conversation::between(line.from.0, to.0), 0, 0, 0)
            }
            ChatType::ChatAll => return Err(ResCode::ResNoPermission),
            ChatType::ChatNone => return Err(ResCode::ResBadRequest),
        };
        let target_id = match audience {
            Audience::Whisper { to, .. } => to.0,
            _ => store_for.map_or(0, |to| to.0),
        };
        let sender_name = sender.name.clone();
        let notify = pb::ChatMessageNotifyChat {
            msghead: codec::head(MsgType::ChcNotifyChat, 0),
            chattype: line.channel as i32,
            senderid: line.from.0,
            strcontext: line.text,
            sendername: sender_name,
            msg_id: 0,
            time_ms: now_ms(),
            guildid: guild,
            teamid: team,
            sceneid: scene,
            targetid: target_id,
            targetname: target_name,
        };
        Ok(Routed {
            audience,
            conversation,
            notify,
            nonce: line.nonce,
            store_for,
            live_to,
            to_node,
        })
    }

    /// A chat line: checked and addressed, then fanned out with a new
    /// msg_id, or, in a cluster, published to the stream; the reply waits
    /// for the stream's ack and the fan-out comes back through it.
    fn chat(
        &mut self,
        line: ChatLine,
        respond_to: tokio::sync::oneshot::Sender<Result<ChatOutcome, ResCode>>,
    ) {
        let accepted = line.accepted;
        let from = line.from;
        let routed = match self.route(line) {
            Ok(routed) => routed,
            Err(code) => {
                let _ = respond_to.send(Err(code));
                return;
            }
        };
        if let Some(history) = &self.history {
            if history.refuses_now(&routed.conversation) {
                let _ = respond_to.send(Err(ResCode::ResStoreFailed));
                return;
            }
        }
        Stats::bump(&self.stats.chats);
        if let Some(cluster) = self.cluster.clone() {
            if !cluster.connected() {
                let outcome = self.deliver_alone(routed, from);
                if outcome.is_ok() {
                    self.stats.metrics.fanout(accepted.elapsed());
                }
                let _ = respond_to.send(outcome);
                return;
            }
            // A whisper for a player with no session anywhere goes to the
            // shared inbox once the stream has given it its msg_id; the
            // reply waits for both.
            let offline = routed
                .store_for
                .map(|to| (to, routed.notify.clone(), routed.conversation, routed.nonce));
            // With a shared database the sender's node writes the line
            // there, once, and the reply waits for that too.
            let shared = self
                .history
                .clone()
                .filter(HistoryHandle::lines_shared)
                .map(|h| (h, routed.notify.clone(), routed.conversation, routed.nonce));
            let stats = self.stats.clone();
            self.publish(
                routed,
                Some(from),
                true,
                Box::new(move |id| {
                    let outcome = match id {
                        Ok(id) => {
                            stats.metrics.fanout(accepted.elapsed());
                            Ok(ChatOutcome {
                                msg_id: id,
                                durable: shared.map(
                                    |(history, mut notify, conversation, nonce)| {
                                        notify.msg_id = id.0;
                                        let record = records::stored(&notify, conversation, nonce);
                                        records::append(&history, record)
                                    },
                                ),
                                offline: offline.map(|(to, mut notify, conversation, nonce)| {
                                    notify.msg_id = id.0;
                                    let record = records::stored(&notify, conversation, nonce);
                                    cluster.store_offline(to, &record)
                                }),
                            })
                        }
                        Err(()) => Err(ResCode::ResStoreFailed),
                    };
                    let _ = respond_to.send(outcome);
                }),
            );
            return;
        }
        let id = self.next_msg_id();
        let outcome = self.deliver(routed, Some(from), id, true);
        self.stats.metrics.fanout(accepted.elapsed());
        let _ = respond_to.send(Ok(outcome));
    }

    /// A line while NATS is out of reach: this node's players go on
    /// hearing each other. It reaches the players on this node only, under
    /// an id between the stream's (see [`crate::cluster::ID_STEP`]), and is
    /// kept in this node's history; the other nodes never get it. A whisper
    /// for a player who is not here is refused (the other nodes and the
    /// shared inbox are out of reach), and so is every line once the ids
    /// between two stream lines are used up.
    fn deliver_alone(&mut self, routed: Routed, from: UserId) -> Result<ChatOutcome, ResCode> {
        let next = self.last_msg_id.saturating_add(1);
        let free = self.cluster.as_ref().is_some_and(|c| c.between_lines(next));
        if !free || routed.to_node.is_some() || routed.store_for.is_some() {
            return Err(ResCode::ResStoreFailed);
        }
        self.last_msg_id = next;
        Ok(self.deliver(routed, Some(from), MsgId(next), true))
    }

    /// Publishes an addressed line to the cluster's stream; `reply` gets
    /// its msg_id once JetStream has stored it.
    fn publish(
        &mut self,
        routed: Routed,
        from: Option<UserId>,
        stored: bool,
        reply: Box<dyn FnOnce(Result<MsgId, ()>) + Send>,
    ) {
        let Some(cluster) = self.cluster.clone() else {
            return;
        };
        let subject = wire::subject(stored.then_some(routed.conversation), &routed.audience);
        let mut line = BusLine {
            notify: Some(routed.notify),
            from: from.map_or(0, |u| u.0),
            nonce: routed.nonce,
            origin: cluster.node().0.to_string(),
            to_node: routed
                .to_node
                .map_or_else(|| cluster.node().0.to_string(), |n| n.0.to_string()),
            offline: routed.store_for.is_some(),
            stored,
            ..Default::default()
        };
        line.set_audience(&routed.audience);
        let ids = cluster.clone();
        cluster.publish(
            subject,
            &line,
            Box::new(move |seq| reply(seq.map(|seq| MsgId(ids.msg_id(seq))).map_err(|_| ()))),
        );
    }

    /// Encodes an addressed line with its msg_id once, fans it out to this
    /// node's players, and hands it to the store (`stored`).
    fn deliver(
        &mut self,
        routed: Routed,
        from: Option<UserId>,
        id: MsgId,
        stored: bool,
    ) -> ChatOutcome {
        let Routed {
            audience,
            conversation,
            mut notify,
            nonce,
            store_for,
            live_to,
            to_node: _,
        } = routed;
        notify.msg_id = id.0;
        let channel = ChatType::try_from(notify.chattype).unwrap_or(ChatType::ChatNone);
        let frame = codec::encode(&notify);
        self.fanout.deliver(
            &mut self.registry,
            Line {
                audience: &audience,
                from,
                channel,
                msg_id: id,
                frame: &frame,
            },
            &self.stats,
        );
        let mut outcome = ChatOutcome {
            msg_id: id,
            durable: None,
            offline: None,
        };
        // In a cluster the inbox is NATS's, and takes whispers until the
        // very end, after the local store has been let go at shutdown. A
        // line here came from the stream, its sender already answered: it
        // takes no place of its sender's.
        if let (Some(to), Some(cluster)) = (store_for, &self.cluster) {
            let record = records::stored(&notify, conversation, nonce);
            outcome.offline = Some(cluster.spill_offline(to, &record, false));
            Stats::bump(&self.stats.offline_stored);
        }
        if let Some(history) = self.history.clone() {
            let record = records::stored(&notify, conversation, nonce);
            if let (Some(to), None) = (store_for, &self.cluster) {
                outcome.offline = Some(history.store_offline(to.0, record.clone()));
                Stats::bump(&self.stats.offline_stored);
            }
            if let Some(to) = live_to.filter(|to| Some(*to) != from) {
                self.track(to, record.clone());
            }
            if stored {
                outcome.durable = Some(records::append(&history, record));
            }
        }
        outcome
    }

    /// A line from the cluster's stream: this node's share of its fan-out.
    /// The node that published it keeps a whisper for an offline target;
    /// the node the target was on tracks it, or keeps it if the target has
    /// gone. Every node stores every line in its own history, unless the
    /// nodes share one database (`history.url`).
    fn bus_line(&mut self, line: BusLine, seq: u64, generation: u64) {
        let Some(cluster) = &self.cluster else {
            return;
        };
        // A line from a consumer a resync has replaced (it comes again), or
        // one already handled.
        if generation != self.bus_generation || seq <= self.bus_seq {
            return;
        }
        self.bus_seq = seq;
        Stats::bump(&self.stats.bus_lines);
        let id = MsgId(cluster.msg_id(seq));
        let me = cluster.node().0.clone();
        self.last_msg_id = self.last_msg_id.max(id.0);
        let audience = line.to_audience();
        let notify = line.notify.clone().unwrap_or_default();
        let from = (line.from != 0).then_some(UserId(line.from));
        let channel = ChatType::try_from(notify.chattype).unwrap_or(ChatType::ChatNone);
        let conversation = conversation_of(&notify, channel);
        // An offline whisper's sender node stored it in the inbox before
        // answering; the other nodes only deliver the sender's echo (none
        // of them has the sender).
        let mut store_for = None;
        let mut live_to = None;
        if let Audience::Whisper { to, .. } = audience {
            match self.registry.get(to) {
                Some(e) if e.conn.is_some() || e.pending.is_some() => live_to = Some(to),
                // Lingering here: kept for the next login, as alone.
                Some(_) if self.history.is_some() => store_for = Some(to),
                Some(_) => {}
                None if *line.to_node == *me => store_for = Some(to),
                None => {}
            }
        }
        // A whisper of ours to another node's player: kept a while in case
        // that node is found dead with it unread.
        if let (Audience::Whisper { to, .. }, true) = (&audience, *line.origin == *me) {
            if *line.to_node != *me && self.history.is_some() {
                let mut n = notify.clone();
                n.msg_id = id.0;
                let record = records::stored(&n, conversation, line.nonce);
                let node = NodeId(line.to_node.as_str().into());
                self.remote
                    .sent_remote
                    .push_back((Instant::now(), node, *to, record));
                if self.remote.sent_remote.len() > MAX_REMOTE_SENT {
                    self.remote.sent_remote.pop_front();
                    Stats::bump(&self.stats.offline_spill_lost);
                }
            }
        }
        let routed = Routed {
            audience,
            conversation,
            notify,
            nonce: line.nonce,
            store_for,
            live_to,
            to_node: None,
        };
        // A shared database has the line from the node that published it.
        let stored = line.stored && !self.history.as_ref().is_some_and(|h| h.lines_shared());
        let outcome = self.deliver(routed, from, id, stored);
        // Nobody waits: the sender was answered when the stream stored it.
        drop(outcome);
    }

    /// Ends the player's session here with the "logged in elsewhere" kick
    /// if its claim is older than the directory's `revision`; the key is
    /// another node's by then, so nothing is released. Whether it did.
    fn end_if_claimed_before(&mut self, user: UserId, revision: u64) -> bool {
        let Some(entry) = self
            .registry
            .get_mut(user)
            .filter(|e| e.claim != 0 && e.claim < revision)
        else {
            return false;
        };
        entry.claim = 0;
        self.end_session(user, Some(KickReason::KickLoggedInElsewhere))
    }

    /// Whether another node has said it is alive lately. This node counts
    /// as alive.
    fn alive(&self, node: &NodeId) -> bool {
        if self.cluster.as_ref().is_some_and(|c| c.node() == node) {
            return true;
        }
        let Some((theirs, _)) = self.remote.beats.get(node) else {
            return false;
        };
        // Measured against this node's own heartbeat, read through the
        // same feed: if that feed lags, nobody is declared dead for it.
        let mine = self
            .cluster
            .as_ref()
            .and_then(|c| self.remote.beats.get(c.node()))
            .map(|(at, _)| *at);
        let behind = match mine {
            Some(mine) => mine.saturating_duration_since(*theirs),
            None => theirs.elapsed(),
        };
        behind < crate::cluster::NODE_DEAD
    }

    /// Whispers sent to players of a node found dead go to the shared
    /// inbox (the same msg_ids: a client that did read them de-duplicates);
    /// those older than the window, to live nodes, are let go.
    /// `restarted`: a node seen back under its id, whose whispers go too.
    fn guard_remote_whispers(&mut self, restarted: Option<&NodeId>) {
        let Some(cluster) = self.cluster.clone() else {
            return;
        };
        let now = Instant::now();
        let mut keep = VecDeque::with_capacity(self.remote.sent_remote.len());
        for (at, node, to, record) in std::mem::take(&mut self.remote.sent_remote) {
            if !self.alive(&node) || restarted == Some(&node) {
                drop(cluster.spill_offline(to, &record, false));
                Stats::bump(&self.stats.offline_spilled);
                debug!(%to, %node, "whisper to a dead node's player kept in the inbox");
            } else if now.duration_since(at) < REMOTE_WINDOW {
                keep.push_back((at, node, to, record));
            }
        }
        self.remote.sent_remote = keep;
    }

    /// The session directory changed. A session here that another node
    /// claimed later ends with the "logged in elsewhere" kick.
    fn directory(&mut self, user: UserId, holder: Holder, revision: u64) {
        match holder {
            Holder::Remote { node, name } => {
                let stale = self
                    .remote
                    .elsewhere
                    .get(&user)
                    .is_some_and(|r| r.revision >= revision);
                if !stale {
                    // Every node's table of known players learns the
                    // players of the others, so a whisper to one of them
                    // who has gone offline is kept for them, here too.
                    if let Some(history) = &self.history {
                        history.record_login(user.0, &name);
                    }
                    self.remote.elsewhere.insert(
                        user,
                        Remote {
                            node,
                            name,
                            revision,
                        },
                    );
                }
                if self.end_if_claimed_before(user, revision) {
                    Stats::bump(&self.stats.takeovers);
                    debug!(%user, "session moved to another node");
                }
            }
            Holder::Here | Holder::Nobody => {
                if self
                    .remote
                    .elsewhere
                    .get(&user)
                    .is_some_and(|r| r.revision < revision)
                {
                    self.remote.elsewhere.remove(&user);
                }
                if holder == Holder::Nobody {
                    self.remote
                        .released
                        .insert(user, (revision, Instant::now()));
                    // A later delete than this session's claim: another
                    // node claimed and let go meanwhile (the bucket keeps
                    // only the latest of the two), so this one is stale.
                    self.end_if_claimed_before(user, revision);
                }
            }
        }
    }

    /// Remembers a whisper queued towards `to` until the client confirms
    /// reading it. Past the replay buffer's size the oldest is stored as an
    /// offline whisper at once instead: bounded memory, nothing dropped.
    fn track(&mut self, to: UserId, whisper: StoredMsg) {
        let cap = self.config.session.replay_buffer.max(1);
        let Some(entry) = self
            .registry
            .get_mut(to)
            .filter(|e| whisper.msg_id > e.floor)
        else {
            return;
        };
        entry.unconfirmed.push_back(whisper);
        if entry.unconfirmed.len() > cap {
            if let Some(oldest) = entry.unconfirmed.pop_front() {
                self.spills.push((to.0, oldest));
                Stats::bump(&self.stats.offline_spilled);
                self.flush_spills();
            }
        }
    }

    /// Which stored conversation a history request may read.
    fn history_scope(
        &self,
        user: UserId,
        channel: ChatType,
        group: u64,
        peer: u64,
    ) -> Result<Conversation, ResCode> {
        let Some(entry) = self.registry.get(user) else {
            return Err(ResCode::ResNotLoggedIn);
        };
        // Only members read a guild's or team's history: a request names
        // the requester's own group, or another one and is refused.
        let own = |mine: u64, missing: ResCode| {
            if mine == 0 {
                Err(missing)
            } else if group != 0 && group != mine {
                Err(ResCode::ResNoPermission)
            } else {
                Ok(mine)
            }
        };
        match channel {
            ChatType::ChatWorld => Ok(Conversation::World),
            ChatType::ChatAll => Ok(Conversation::System),
            ChatType::ChatNormal => Ok(Conversation::Scene(entry.scene.0)),
            ChatType::ChatGuild => {
                own(entry.guild.0, ResCode::ResNotInGuild).map(Conversation::Guild)
            }
            ChatType::ChatTeam => own(entry.team.0, ResCode::ResNotInTeam).map(Conversation::Team),
            // A whisper conversation always includes the requester, so only
            // its two players can read it.
            ChatType::ChatPrivate if peer != 0 => Ok(Conversation::between(user.0, peer)),
            _ => Err(ResCode::ResBadRequest),
        }
    }

    fn housekeeping(&mut self) {
        // Once a tick, not per change: a scan, and exact to within a tick.
        let lingering = self
            .registry
            .entries()
            .filter(|(_, e)| e.lingering.is_some())
            .count() as u64;
        self.stats
            .lingering_now
            .store(lingering, std::sync::atomic::Ordering::Relaxed);
        self.expire_replays();
        let linger = self.config.session.linger();
        let stall = self.config.limits.stall_timeout();
        let mut expired = Vec::new();
        let mut stale = Vec::new();
        for (user, entry) in self.registry.entries_mut() {
            match (&entry.conn, entry.lingering) {
                (None, Some(since)) if entry.pending.is_none() && since.elapsed() >= linger => {
                    expired.push(*user)
                }
                // A connection whose writer died without its reader
                // noticing yet is detached here at the latest.
                (Some(conn), _) if conn.is_gone() => stale.push((*user, conn.id())),
                (Some(conn), _) => {
                    conn.trim();
                    let stalled = conn.check_stall(stall, &self.stats);
                    if !stalled {
                        ask_receipt(entry);
                    }
                }
                _ => {}
            }
        }
        for user in expired {
            self.end_session(user, None);
            Stats::bump(&self.stats.linger_expired);
            debug!(%user, "linger expired");
        }
        for (user, conn) in stale {
            self.detached(user, conn);
        }
        self.flush_spills();
        self.guard_remote_whispers(None);
        self.remote
            .released
            .retain(|_, (_, at)| at.elapsed() < RELEASED_FOR);
        self.publish_gauges();
    }

    /// Evicts replay entries older than [`Config::replay_max_age`].
    fn expire_replays(&mut self) {
        let now = Instant::now();
        self.id_marks.push_back((now, self.last_msg_id));
        let max_age = self.config.replay_max_age();
        let mut cutoff = None;
        while let Some(&(at, id)) = self.id_marks.front() {
            if now.duration_since(at) < max_age {
                break;
            }
            cutoff = Some(id);
            self.id_marks.pop_front();
        }
        if let Some(cutoff) = cutoff {
            self.registry.expire_replays(cutoff);
        }
    }

    /// A player's session as operators see it.
    fn view(&self, user: UserId) -> Option<super::PlayerView> {
        let e = self.registry.get(user)?;
        Some(super::PlayerView {
            name: e.name.clone(),
            state: if e.lingering.is_some() {
                super::SessionState::Lingering
            } else {
                super::SessionState::Connected
            },
            guild: e.guild,
            team: e.team,
            scene: e.scene,
            mask: e.mask,
        })
    }

    /// A system line from operators. To everyone it is kept in history
    /// (nobody waits for that write); to a group or a player it is only
    /// delivered (and replayed on resume). In a cluster it goes through the
    /// stream like a chat line.
    fn announce(
        &mut self,
        text: String,
        to: super::AnnounceTo,
        respond_to: tokio::sync::oneshot::Sender<MsgId>,
    ) {
        use super::AnnounceTo;
        let (audience, guild, team, scene, target) = match to {
            AnnounceTo::Everyone => (Audience::Everyone, 0, 0, 0, 0),
            AnnounceTo::Guild(g) => (Audience::Guild(g), g.0, 0, 0, 0),
            AnnounceTo::Team(t) => (Audience::Team(t), 0, t.0, 0, 0),
            AnnounceTo::Scene(sc) => (Audience::Scene(sc), 0, 0, sc.0, 0),
            AnnounceTo::Player(u) => (Audience::User(u), 0, 0, 0, u.0),
        };
        let notify = pb::ChatMessageNotifyChat {
            msghead: codec::head(MsgType::ChcNotifyChat, 0),
            chattype: ChatType::ChatAll as i32,
            strcontext: text,
            time_ms: now_ms(),
            guildid: guild,
            teamid: team,
            sceneid: scene,
            targetid: target,
            ..Default::default()
        };
        let routed = Routed {
            audience,
            conversation: Conversation::System,
            notify,
            nonce: 0,
            store_for: None,
            live_to: None,
            to_node: None,
        };
        let stored = to == AnnounceTo::Everyone;
        if self.cluster.is_some() {
            // A shared database gets the line from this node alone; nobody
            // waits for that write.
            let shared = self
                .history
                .clone()
                .filter(|h| stored && h.lines_shared())
                .map(|h| (h, routed.notify.clone()));
            // A line the stream did not take drops the reply: the caller
            // sees the world as unable to answer.
            self.publish(
                routed,
                None,
                stored,
                Box::new(move |id| {
                    if let Ok(id) = id {
                        if let Some((history, mut notify)) = shared {
                            notify.msg_id = id.0;
                            let record = records::stored(&notify, Conversation::System, 0);
                            drop(records::append(&history, record));
                        }
                        let _ = respond_to.send(id);
                    }
                }),
            );
            return;
        }
        let id = self.next_msg_id();
        // Nobody waits for the store's write.
        drop(self.deliver(routed, None, id, stored));
        let _ = respond_to.send(id);
    }

    /// Tells a removed line's audience with a session that it is gone.
    fn recall(&mut self, msg: &StoredMsg) -> usize {
        let audience = match msg.conversation {
            Conversation::World | Conversation::System => Audience::Everyone,
            Conversation::Guild(g) => Audience::Guild(crate::ids::GuildId(g)),
            Conversation::Team(t) => Audience::Team(crate::ids::TeamId(t)),
            Conversation::Scene(sc) => Audience::Scene(crate::ids::SceneId(sc)),
            Conversation::Whisper { low, high } => Audience::Whisper {
                from: UserId(low),
                to: UserId(high),
            },
        };
        let frame = codec::encode(&pb::ChatMessageNotifyRecall {
            msghead: codec::head(MsgType::ChcNotifyRecall, 0),
            msg_id: msg.msg_id,
        });
        let frame = Encoded::new(frame);
        let mut told = 0;
        let stats = &self.stats;
        let id = msg.msg_id;
        self.registry.world.remove(id);
        self.registry.visit(&audience, |entry| {
            // Gone from what a resume replays and from what a session's end
            // would spill, so the line does not come back.
            entry.replay.remove(id);
            entry.unconfirmed.retain(|m| m.msg_id != id);
            if let Some(conn) = &entry.conn {
                told += usize::from(conn.deliver_encoded(&frame, Priority::Keep, stats));
            }
        });
        told
    }

    fn publish_gauges(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        self.stats.online.store(self.registry.len() as u64, Relaxed);
        self.stats
            .group_changes
            .store(self.registry.group_changes(), Relaxed);
    }
}

/// Reads a login's offline whispers, retrying a failed read a few times.
/// If the store still cannot answer, the login goes on without them: they
/// stay stored (only what a connection carried is ever deleted) and come
/// with a later login.
async fn read_offline(
    history: &HistoryHandle,
    user: UserId,
    mut read: tokio::sync::oneshot::Receiver<Result<Vec<StoredMsg>, crate::history::HistoryError>>,
) -> Vec<StoredMsg> {
    for delay_ms in [50, 200, 800] {
        match read.await {
            Ok(Ok(offline)) => return offline,
            Ok(Err(e)) => debug!(%user, error = %e, "offline whisper read failed; retrying"),
            Err(_) => debug!(%user, "offline whisper read dropped; retrying"),
        }
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        read = history.pending_offline(user.0);
    }
    match read.await {
        Ok(Ok(offline)) => offline,
        _ => {
            warn!(%user, "cannot read offline whispers; they stay stored for a later login");
            Vec::new()
        }
    }
}

/// Reads a new session's block list, retrying like [`read_offline`]. If
/// the store cannot answer, the session starts with no blocks (they stay
/// stored for a later login).
async fn read_blocks(
    history: &HistoryHandle,
    user: UserId,
    mut read: tokio::sync::oneshot::Receiver<Result<Vec<u64>, crate::history::HistoryError>>,
) -> Vec<u64> {
    for delay_ms in [50, 200, 800] {
        if let Ok(Ok(blocks)) = read.await {
            return blocks;
        }
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        read = history.pending_blocks(user.0);
    }
    match read.await {
        Ok(Ok(blocks)) => blocks,
        _ => {
            warn!(%user, "cannot read the block list; this session starts without it");
            Vec::new()
        }
    }
}

/// A pending login that will never become visible (kick, shutdown): it
/// still gets its login reply first, then the kick.
fn abandon(user: UserId, entry: &Entry, pending: &PendingLogin, reason: KickReason, stats: &Stats) {
    let reply = login_reply(
        pending.seq,
        user,
        entry,
        pending.resumed,
        pending.since,
        0,
        &Resume::default(),
    );
    let _ = pending.conn.try_frame(reply, stats);
    pending.conn.close(Close::Kick(reason), stats);
}

/// Pong payload prefix of a receipt ping: the client read every whisper up
/// to the msg_id that follows.
pub(crate) const RECEIPT: &str = "receipt:";

/// Pong payload prefix of the offline-whisper barrier; a token follows.
pub(crate) const OFFLINE_ACK: &str = "offline-ack:";

/// Asks the client to confirm the whispers queued to it so far: a ping
/// after them, whose pong proves they were read. One at a time per
/// connection, asked again if unanswered for [`RECEIPT_RETRY`]; a full
/// queue just tries again at the next tick.
fn ask_receipt(entry: &mut Entry) {
    let (Some(conn), Some(last)) = (&entry.conn, entry.unconfirmed.back()) else {
        return;
    };
    if entry
        .receipt
        .is_some_and(|(_, at)| at.elapsed() < RECEIPT_RETRY)
    {
        return;
    }
    let upto = last.msg_id;
    if conn.barrier(Bytes::from(format!("{RECEIPT}{upto}"))) {
        entry.receipt = Some((upto, Instant::now()));
    }
}

/// How long a receipt ping may go unanswered before it is sent again (its
/// pong may have been lost with a replaced connection, or dropped as too
/// soon after another).
const RECEIPT_RETRY: Duration = Duration::from_secs(5);

fn login_reply(
    seq: u32,
    user: UserId,
    entry: &Entry,
    resumed: bool,
    cursor: u64,
    replayed: usize,
    resume: &Resume,
) -> Bytes {
    codec::encode(&pb::ChatMessageLoginRep {
        msghead: codec::head(MsgType::ChcLoginRep, seq),
        res: ResCode::ResOk as i32,
        userid: user.0,
        username: entry.name.clone(),
        guildid: entry.guild.0,
        teamid: entry.team.0,
        sceneid: entry.scene.0,
        mask: entry.mask,
        resumed,
        last_msg_id: cursor,
        replayed: u32::try_from(replayed).unwrap_or(u32::MAX),
        replay_gap: resume.gap,
        missed: resume.missed.min(u64::from(u32::MAX)) as u32,
        banned_ms: 0,
    })
}

/// The stored conversation a line belongs to, from its notification.
fn conversation_of(n: &pb::ChatMessageNotifyChat, channel: ChatType) -> Conversation {
    match channel {
        ChatType::ChatNormal => Conversation::Scene(n.sceneid),
        ChatType::ChatGuild => Conversation::Guild(n.guildid),
        ChatType::ChatTeam => Conversation::Team(n.teamid),
        ChatType::ChatPrivate => Conversation::between(n.senderid, n.targetid),
        ChatType::ChatWorld => Conversation::World,
        _ => Conversation::System,
    }
}
