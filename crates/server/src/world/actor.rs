//! The world actor's loop and its handlers. Private: everything outside
//! talks to it through [`super::WorldHandle`].

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use guildchat_protocol::{codec, mask_bit, pb, ChatType, KickReason, MsgId as WireMsg, ResCode};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info};

use super::fanout::{Audience, Fanout};
use super::registry::{Entry, Registry};
use super::replay::{Replay, Resume};
use super::{ChatLine, ChatOutcome, LoginArgs, Target, WeakWorld, WorldMsg};
use crate::config::Config;
use crate::history::{Conversation, HistoryHandle};
use crate::ids::{MsgId, UserId};
use crate::net::Priority;
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
    registry: Registry,
    /// The last msg_id handed out. Seeded from the wall clock so ids keep
    /// increasing across restarts.
    last_msg_id: u64,
    /// `(when, last_msg_id then)` once a tick, as far back as
    /// [`Config::replay_max_age`]: which ids are too old to replay.
    id_marks: VecDeque<(Instant, u64)>,
    shutting_down: bool,
}

/// Wall-clock Unix milliseconds (message timestamps).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl World {
    pub(super) fn new(
        config: Arc<Config>,
        stats: Arc<Stats>,
        fanout: Box<dyn Fanout>,
        inbox: mpsc::Receiver<WorldMsg>,
        me: WeakWorld,
        history: Option<HistoryHandle>,
        first_msg_id: u64,
    ) -> Self {
        World {
            registry: Registry::new(config.session.replay_buffer_shed()),
            config,
            stats,
            fanout,
            inbox,
            me,
            history,
            // Ids continue from the store's high-water mark, and from the
            // clock (1024 ids per millisecond) when nothing is stored, so
            // they keep increasing across restarts.
            last_msg_id: first_msg_id.max(now_ms() << 10),
            id_marks: VecDeque::new(),
            shutting_down: false,
        }
    }

    pub(super) async fn run(mut self) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = self.inbox.recv() => match msg {
                    Some(msg) => self.handle(msg),
                    None => break,
                },
                _ = tick.tick() => self.housekeeping(),
            }
        }
        debug!("world actor stopped");
    }

    fn handle(&mut self, msg: WorldMsg) {
        match msg {
            WorldMsg::Login { args, respond_to } => {
                let _ = respond_to.send(self.login(args));
            }
            WorldMsg::Detached { user, conn } => self.detached(user, conn),
            WorldMsg::HistoryScope {
                user,
                channel,
                group,
                peer,
                respond_to,
            } => {
                let _ = respond_to.send(self.history_scope(user, channel, group, peer));
            }
            WorldMsg::Chat { line, respond_to } => {
                let _ = respond_to.send(self.chat(line));
            }
            WorldMsg::SetMask {
                user,
                mask,
                respond_to,
            } => {
                if let Some(entry) = self.registry.get_mut(user) {
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
                let _ = respond_to.send(self.registry.regroup(user, guild, team, scene));
            }
            WorldMsg::Mute {
                user,
                duration,
                respond_to,
            } => {
                let found = self
                    .registry
                    .get(user)
                    .is_some_and(|e| e.user.try_send(UserMsg::Mute { duration }));
                let _ = respond_to.send(found);
            }
            WorldMsg::Kick {
                user,
                reason,
                respond_to,
            } => {
                let found = match self.registry.get_mut(user) {
                    // A kicked player does not linger: the session ends
                    // when the connection does (or now, if it has none).
                    Some(entry) => {
                        entry.kicked = true;
                        match &entry.conn {
                            Some(conn) => conn.kick(reason),
                            None => {
                                self.registry.remove(user);
                            }
                        }
                        true
                    }
                    None => false,
                };
                let _ = respond_to.send(found);
            }
            WorldMsg::Announce { text, respond_to } => {
                let id = self.next_msg_id();
                let notify = pb::ChatMessageNotifyChat {
                    msghead: codec::head(WireMsg::ChcNotifyChat, 0),
                    chattype: ChatType::ChatAll as i32,
                    strcontext: text,
                    msg_id: id.0,
                    time_ms: now_ms(),
                    ..Default::default()
                };
                let frame = codec::encode(&notify);
                if let Some(history) = &self.history {
                    // Announcements are kept, but nobody waits for them:
                    // the receiver is dropped.
                    drop(records::append(
                        history,
                        records::stored(&notify, Conversation::System),
                    ));
                }
                self.fanout.deliver(
                    &mut self.registry,
                    &Audience::Everyone,
                    ChatType::ChatAll,
                    id,
                    &frame,
                    &self.stats,
                );
                let _ = respond_to.send(id);
            }
            WorldMsg::Shutdown { respond_to } => {
                self.shutting_down = true;
                let entries = self.registry.drain();
                info!(players = entries.len(), "kicking every player for shutdown");
                for (_, entry) in entries {
                    if let Some(conn) = &entry.conn {
                        conn.kick(KickReason::KickShutdown);
                    }
                }
                self.publish_gauges();
                let _ = respond_to.send(());
            }
        }
    }

    fn login(&mut self, args: LoginArgs) -> Result<(), ResCode> {
        let LoginArgs {
            identity,
            conn,
            inbound,
            seq,
            last_msg_id,
        } = args;
        if self.shutting_down {
            return Err(ResCode::ResInternal);
        }
        let user = identity.user;
        let cursor = self.last_msg_id;
        if let Some((entry, world)) = self.registry.get_mut_with_world(user) {
            // Takeover or resume: the running user actor keeps its state and
            // gets the new connection's ends. The reply and the replay are
            // queued here, before the connection is visible to fan-out, so
            // they precede any live notification.
            let resume = if last_msg_id > 0 {
                let world = (entry.mask & mask_bit(ChatType::ChatWorld) == 0)
                    .then_some((world, entry.began));
                entry.replay.since(last_msg_id, world)
            } else {
                Resume::default()
            };
            if !entry.user.try_send(UserMsg::Attach(Attach {
                conn: conn.clone(),
                inbound,
            })) {
                return Err(ResCode::ResInternal);
            }
            let reply = login_reply(seq, user, entry, true, cursor, &resume);
            Stats::add(&self.stats.replayed, resume.frames.len() as u64);
            if resume.gap {
                Stats::bump(&self.stats.replay_gaps);
            }
            let _ = conn.try_frame(reply);
            for frame in resume.frames {
                if !conn.deliver(frame, Priority::Keep, &self.stats) {
                    break;
                }
            }
            entry.conn = Some(conn);
            entry.lingering = None;
            entry.kicked = false;
            Stats::bump(&self.stats.takeovers);
            Stats::bump(&self.stats.logins);
            info!(%user, "session resumed");
            return Ok(());
        }
        if self.registry.len() >= self.config.max_online as usize {
            return Err(ResCode::ResServerFull);
        }
        let Some(world) = self.me.upgrade() else {
            return Err(ResCode::ResInternal);
        };
        let handle = UserHandle::spawn(
            identity.clone(),
            conn.clone(),
            inbound,
            world,
            self.history.clone(),
            self.config.clone(),
            self.stats.clone(),
        );
        let session = &self.config.session;
        let entry = Entry {
            name: identity.name,
            guild: identity.guild,
            team: identity.team,
            scene: identity.scene,
            mask: 0,
            conn: Some(conn.clone()),
            lingering: None,
            kicked: false,
            replay: Replay::new(session.replay_buffer, session.replay_buffer_shed()),
            began: cursor,
            user: handle,
        };
        // A resume cursor with no session to resume (it expired, or the
        // server restarted): whatever came after it cannot be replayed.
        let resume = Resume {
            gap: last_msg_id > 0 && last_msg_id < cursor,
            ..Resume::default()
        };
        let _ = conn.try_frame(login_reply(seq, user, &entry, false, cursor, &resume));
        self.registry.insert(user, entry);
        Stats::bump(&self.stats.logins);
        self.publish_gauges();
        debug!(%user, "login");
        Ok(())
    }

    /// A user actor's connection went away. The session lingers for a
    /// resume unless lingering is off or an operator kicked the player.
    fn detached(&mut self, user: UserId, conn: crate::ids::ConnId) {
        let Some(entry) = self.registry.get_mut(user) else {
            return;
        };
        // A detach from a connection that was already replaced (takeover)
        // changes nothing.
        if entry.conn.as_ref().map(|c| c.id()) != Some(conn) {
            return;
        }
        if entry.kicked || self.config.session.linger_ms == 0 {
            self.registry.remove(user);
            self.publish_gauges();
            debug!(%user, "session ended");
        } else {
            entry.conn = None;
            entry.lingering = Some(Instant::now());
            Stats::bump(&self.stats.lingering);
            debug!(%user, "lingering");
        }
    }

    fn next_msg_id(&mut self) -> MsgId {
        self.last_msg_id = self.last_msg_id.max(now_ms() << 10) + 1;
        MsgId(self.last_msg_id)
    }

    fn chat(&mut self, line: ChatLine) -> Result<ChatOutcome, ResCode> {
        let Some(sender) = self.registry.get(line.from) else {
            return Err(ResCode::ResNotLoggedIn);
        };
        let mut offline_target = None;
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
                let to = match &line.target {
                    Target::Id(id) => *id,
                    Target::Name(name) => self
                        .registry
                        .by_name(name)
                        .ok_or(ResCode::ResNoSuchTarget)?,
                    Target::None => return Err(ResCode::ResNoSuchTarget),
                };
                // A lingering player is registered, so counts as online:
                // the whisper goes to its replay buffer. A player who is
                // not registered at all gets it stored for the next login.
                if self.registry.get(to).is_none() {
                    if self.history.is_none() {
                        return Err(ResCode::ResTargetOffline);
                    }
                    offline_target = Some(to);
                }
                (
                    Audience::Whisper {
                        from: line.from,
                        to,
                    },
                    Conversation::between(line.from.0, to.0),
                    0,
                    0,
                    0,
                )
            }
            ChatType::ChatAll => return Err(ResCode::ResNoPermission),
            ChatType::ChatNone => return Err(ResCode::ResBadRequest),
        };
        let (target_id, target_name) = match audience {
            Audience::Whisper { to, .. } => (
                to.0,
                self.registry
                    .get(to)
                    .map_or_else(String::new, |e| e.name.clone()),
            ),
            _ => (0, String::new()),
        };
        let sender_name = sender.name.clone();
        let id = self.next_msg_id();
        let notify = pb::ChatMessageNotifyChat {
            msghead: codec::head(WireMsg::ChcNotifyChat, 0),
            chattype: line.channel as i32,
            senderid: line.from.0,
            strcontext: line.text,
            sendername: sender_name,
            msg_id: id.0,
            time_ms: now_ms(),
            guildid: guild,
            teamid: team,
            sceneid: scene,
            targetid: target_id,
            targetname: target_name,
        };
        let frame = codec::encode(&notify);
        self.fanout.deliver(
            &mut self.registry,
            &audience,
            line.channel,
            id,
            &frame,
            &self.stats,
        );
        Stats::bump(&self.stats.chats);
        let mut outcome = ChatOutcome {
            msg_id: id,
            durable: None,
            offline: None,
        };
        if let Some(history) = &self.history {
            let stored = records::stored(&notify, conversation);
            outcome.offline = offline_target.map(|to| (to, stored.clone()));
            outcome.durable = Some(records::append(history, stored));
        }
        Ok(outcome)
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
        self.expire_replays();
        let linger = self.config.session.linger();
        let stall = self.config.limits.stall_timeout();
        let mut expired = Vec::new();
        let mut stale = Vec::new();
        for (user, entry) in self.registry.entries() {
            match (&entry.conn, entry.lingering) {
                (None, Some(since)) if since.elapsed() >= linger => expired.push(*user),
                // A connection whose writer died without its reader
                // noticing yet is detached here at the latest.
                (Some(conn), _) if conn.is_gone() => stale.push((*user, conn.id())),
                (Some(conn), _) => {
                    conn.check_stall(stall, &self.stats);
                }
                _ => {}
            }
        }
        for user in expired {
            // Dropping the entry drops the actor's only mailbox sender: the
            // user actor ends.
            self.registry.remove(user);
            Stats::bump(&self.stats.linger_expired);
            debug!(%user, "linger expired");
        }
        for (user, conn) in stale {
            self.detached(user, conn);
        }
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

    fn publish_gauges(&self) {
        self.stats.online.store(
            self.registry.len() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }
}

fn login_reply(
    seq: u32,
    user: UserId,
    entry: &Entry,
    resumed: bool,
    cursor: u64,
    resume: &Resume,
) -> Bytes {
    codec::encode(&pb::ChatMessageLoginRep {
        msghead: codec::head(WireMsg::ChcLoginRep, seq),
        res: ResCode::ResOk as i32,
        userid: user.0,
        username: entry.name.clone(),
        guildid: entry.guild.0,
        teamid: entry.team.0,
        sceneid: entry.scene.0,
        mask: entry.mask,
        resumed,
        last_msg_id: cursor,
        replayed: resume.frames.len() as u32,
        replay_gap: resume.gap,
        missed: resume.missed.min(u64::from(u32::MAX)) as u32,
    })
}
