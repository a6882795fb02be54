//! What the coordinator and its worker processes say to each other, and the
//! layout of the simulated player base.
//!
//! Workers are the same binary started as `guildchat bench worker`; they read
//! one JSON [`Cmd`] per line on stdin (the first is the [`Plan`]) and write
//! one JSON [`Note`] per line on stdout. JSON lines keep the two sides
//! loosely coupled and easy to debug by hand.
//!
//! [`Layout`] is a pure function from a client's global index to who that
//! player is (user id, guild, team, scene, source address), so every process
//! agrees on audiences without exchanging membership lists. Nothing here does
//! I/O.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use guildchat_auth::{KeyAlg, KeyRing, Signer, TokenFormat};
use serde::{Deserialize, Serialize};

use super::tally::{HistData, Snap, StepSnap};

/// Which server a worker's clients talk to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TargetKind {
    /// guildchat: clients log in with tokens and speak the protocol.
    Guildchat,
    /// The reference relay: no login, frames are relayed verbatim.
    Reference,
    /// The uWebSockets relay: the reference's protocol, served by uWS.
    Uws,
}

impl TargetKind {
    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Guildchat => "guildchat",
            TargetKind::Reference => "reference",
            TargetKind::Uws => "uws",
        }
    }

    /// Whether the target speaks the relay protocol (no login; every
    /// binary frame relayed verbatim to everyone) rather than guildchat's.
    pub fn relay(self) -> bool {
        matches!(self, TargetKind::Reference | TargetKind::Uws)
    }
}

/// Which kind of login token the clients present.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum TokenKind {
    /// JWE dir + A256GCM.
    Jwe,
    /// JWS EdDSA (Ed25519).
    Eddsa,
    /// JWS ES256 (P-256).
    Es256,
}

impl TokenKind {
    fn alg(self) -> KeyAlg {
        match self {
            TokenKind::Jwe => KeyAlg::Dir,
            TokenKind::Eddsa => KeyAlg::EdDSA,
            TokenKind::Es256 => KeyAlg::Es256,
        }
    }

    /// A signer for this kind from a ring holding a key of its algorithm.
    pub fn signer(self, ring: &KeyRing) -> Result<Signer, String> {
        let alg = self.alg();
        let entry = ring
            .keys
            .iter()
            .find(|k| k.alg == alg)
            .ok_or_else(|| format!("the key ring has no {} key", alg.name()))?;
        let format = match self {
            TokenKind::Jwe => TokenFormat::Jwe,
            TokenKind::Eddsa | TokenKind::Es256 => TokenFormat::Jws,
        };
        Signer::new(ring, format, Some(&entry.kid)).map_err(|e| e.to_string())
    }
}

/// Who the simulated players are. Every index in `0..clients` is one player.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    pub clients: u32,
    /// User ids are `user_base + index`; a fresh base per run keeps one run
    /// from resuming the lingering sessions of the previous one.
    pub user_base: u64,
    /// Guild, team and scene ids start above this, for the same reason.
    pub group_base: u64,
    pub guild_size: u32,
    pub team_size: u32,
    pub scenes: u32,
    /// Source addresses are 127.<salt>.x.y, a fresh salt per run, so ports
    /// left in TIME_WAIT by a previous run are never in the way.
    pub ip_salt: u8,
}

/// Connections per source address: well inside the ephemeral port range
/// (about 28,000 ports), since binding before connecting reserves a port
/// per socket.
const CONNS_PER_IP: u32 = 5_000;

impl Layout {
    pub fn user(&self, idx: u32) -> u64 {
        self.user_base + u64::from(idx)
    }

    pub fn name(&self, idx: u32) -> String {
        format!("b{}", self.user(idx))
    }

    pub fn guild(&self, idx: u32) -> u64 {
        self.group_base + 1 + u64::from(idx / self.guild_size)
    }

    pub fn team(&self, idx: u32) -> u64 {
        self.group_base + 1 + u64::from(idx / self.team_size)
    }

    pub fn scene(&self, idx: u32) -> u64 {
        self.group_base + 1 + u64::from(idx % self.scenes)
    }

    /// Members of the block of `size` players holding `idx` (the last
    /// block may be short).
    fn block(&self, idx: u32, size: u32) -> u64 {
        let start = idx / size * size;
        u64::from(size.min(self.clients - start))
    }

    pub fn guild_members(&self, idx: u32) -> u64 {
        self.block(idx, self.guild_size)
    }

    pub fn team_members(&self, idx: u32) -> u64 {
        self.block(idx, self.team_size)
    }

    pub fn scene_members(&self, idx: u32) -> u64 {
        let s = idx % self.scenes;
        u64::from(self.clients / self.scenes + u32::from(s < self.clients % self.scenes))
    }

    /// The loopback address client `idx` connects from.
    pub fn source_ip(&self, idx: u32) -> IpAddr {
        let block = idx / CONNS_PER_IP;
        let b = (block / 250) as u8;
        let c = 2 + (block % 250) as u8;
        IpAddr::V4(Ipv4Addr::new(127, self.ip_salt, b, c))
    }
}

/// The timing of the `mix` scenario.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MixPlan {
    /// Each player speaks on guild, team, scene and whisper, each once per
    /// period drawn uniformly from this range (milliseconds).
    pub period_min_ms: u64,
    pub period_max_ms: u64,
    /// World chat lines per second, all players together.
    pub world_per_s: f64,
    /// Fraction of players that reconnect per minute.
    pub reconnect_per_min: f64,
    /// Against several targets (a cluster's nodes): each reconnect goes to
    /// the next one, as a balancer without sticky sessions may send it.
    pub roam: bool,
}

/// Everything a worker needs to know, sent once as its first line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub worker: u32,
    pub target: TargetKind,
    pub url: String,
    /// The key ring to mint tokens from (guildchat only).
    pub keys_file: Option<PathBuf>,
    pub token: TokenKind,
    pub audience: String,
    pub layout: Layout,
    /// This worker's clients: global indices `first..first + count`.
    pub first: u32,
    pub count: u32,
    /// Global indices of the fan-out senders (they may live in any worker).
    pub senders: Vec<u32>,
    /// Every `slow_every`-th client (0: none) stops reading on request.
    pub slow_every: u32,
    /// Receive buffer of the slow clients, in bytes.
    pub slow_recv_buffer: u32,
    pub heartbeat_ms: u64,
    pub text_len: usize,
    /// Connections being opened at once by this worker.
    pub concurrency: usize,
    pub mix: MixPlan,
    /// Wall-clock Unix milliseconds after which the worker exits whatever
    /// it is doing.
    pub deadline_unix_ms: u64,
}

impl Plan {
    /// The position of `idx` among the fan-out senders, if it is one.
    pub fn sender_slot(&self, idx: u32) -> Option<usize> {
        self.senders.iter().position(|&s| s == idx)
    }

    pub fn is_slow(&self, idx: u32) -> bool {
        self.slow_every > 0 && idx % self.slow_every == self.slow_every - 1
    }
}

/// Coordinator -> worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Cmd {
    Plan(Box<Plan>),
    /// Connect (and log in) every client, `concurrency` at a time.
    Connect,
    /// Fan-out senders send `rate` lines per second in total, for `secs`.
    Fanout {
        step: u32,
        rate: f64,
        secs: f64,
    },
    /// Every player behaves as in an MMO for `secs`.
    Mix {
        secs: f64,
    },
    /// Stop sending; keep reading.
    Quiet,
    /// Slow clients stop reading, or start again.
    SlowStop,
    SlowRead,
    /// Send a full [`Note::Report`].
    Report,
    /// Close every connection and exit.
    Close,
}

/// Worker -> coordinator.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Note {
    /// Counters so far, a few times a second.
    Progress {
        worker: u32,
        snap: Snap,
        steps: BTreeMap<u32, StepSnap>,
    },
    /// Every client of this worker finished its connect phase;
    /// `elapsed_s` from the Connect command to the last login.
    Connected {
        worker: u32,
        elapsed_s: f64,
    },
    /// Counters and histograms (microseconds) so far.
    Report {
        worker: u32,
        snap: Snap,
        steps: BTreeMap<u32, StepSnap>,
        latency: BTreeMap<u32, HistData>,
        login: HistData,
        heartbeat: HistData,
        /// Close codes seen and how often, for the diagnosis of surprises.
        close_codes: BTreeMap<u16, u64>,
        /// Result codes of refused chat lines (-1: no reply), and how often.
        refusals: BTreeMap<i32, u64>,
    },
    /// The worker is exiting.
    Bye {
        worker: u32,
    },
    Error {
        worker: u32,
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(clients: u32) -> Layout {
        Layout {
            clients,
            user_base: 1_000,
            group_base: 50,
            guild_size: 20,
            team_size: 5,
            scenes: 200,
            ip_salt: 9,
        }
    }

    #[test]
    fn audiences_add_up_to_the_player_base() {
        for clients in [1, 7, 200, 1003, 5000] {
            let l = layout(clients);
            let mut guilds: BTreeMap<u64, u64> = BTreeMap::new();
            let mut teams: BTreeMap<u64, u64> = BTreeMap::new();
            let mut scenes: BTreeMap<u64, u64> = BTreeMap::new();
            for i in 0..clients {
                *guilds.entry(l.guild(i)).or_default() += 1;
                *teams.entry(l.team(i)).or_default() += 1;
                *scenes.entry(l.scene(i)).or_default() += 1;
            }
            for i in 0..clients {
                assert_eq!(l.guild_members(i), guilds[&l.guild(i)], "{clients} {i}");
                assert_eq!(l.team_members(i), teams[&l.team(i)], "{clients} {i}");
                assert_eq!(l.scene_members(i), scenes[&l.scene(i)], "{clients} {i}");
            }
            assert!(guilds.values().all(|&n| n <= 20));
            assert!(teams.values().all(|&n| n <= 5));
        }
    }

    #[test]
    fn sources_are_loopback_and_spread() {
        let l = layout(20_000);
        assert_eq!(l.source_ip(0), IpAddr::V4(Ipv4Addr::new(127, 9, 0, 2)));
        assert_eq!(l.source_ip(4_999), l.source_ip(0));
        assert_eq!(l.source_ip(5_000), IpAddr::V4(Ipv4Addr::new(127, 9, 0, 3)));
        assert!(l.source_ip(19_999).is_loopback());
        assert_eq!(l.name(3), "b1003");
    }

    #[test]
    fn commands_are_json_lines() {
        let cmd = Cmd::Fanout {
            step: 2,
            rate: 10.0,
            secs: 1.5,
        };
        let line = serde_json::to_string(&cmd).unwrap();
        assert!(!line.contains('\n'));
        assert!(matches!(
            serde_json::from_str::<Cmd>(&line).unwrap(),
            Cmd::Fanout { step: 2, .. }
        ));
    }
}
