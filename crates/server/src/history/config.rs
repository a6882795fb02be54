//! The `[history]` settings: how often the writer commits, how much of each
//! kind of conversation is kept, and how many whispers wait for an offline
//! player, from how many senders, and for how long.
//!
//! Pure data plus its validation: nothing here opens the database or
//! starts a thread.

use serde::Deserialize;

use super::Conversation;

/// Retention per kind of conversation, and the writer's batching knobs.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HistoryConfig {
    /// Whether the server keeps history at all. The server reads this to
    /// decide whether to open a store; the store itself does not look at it.
    pub enabled: bool,
    /// A PostgreSQL database for chat lines (`postgres://user:pass@host/db`,
    /// without TLS), instead of the SQLite file: every node of a cluster
    /// points at the same one. Offline whispers, the players table and the
    /// game-master records stay in the file (or NATS in a cluster). The
    /// server reads this; the store is told through
    /// [`HistoryHandle::attach_postgres`](super::HistoryHandle::attach_postgres).
    pub url: Option<String>,
    /// How long the writer waits, after the first queued write, for more
    /// writes to join the same commit. Each waiting message pays up to this
    /// much extra latency; in exchange a burst costs one fsync. With 0 a
    /// batch is whatever is already queued when the writer looks.
    pub flush_interval_ms: u64,
    /// Most writes in one transaction.
    pub max_batch: usize,
    /// Largest the database may grow, in bytes; 0 = no cap. Past it, writes
    /// fail as on a full disk: senders get RES_STORE_FAILED and nothing is
    /// acknowledged, until retention frees room.
    pub max_db_bytes: u64,
    /// How often the writer deletes what retention no longer keeps.
    pub prune_interval_secs: u64,
    /// Whether a commit waits for the disk (`full`) or only for the OS
    /// (`normal`); see [`Synchronous`].
    pub synchronous: Synchronous,
    pub world: Retention,
    pub scene: Retention,
    pub guild: Retention,
    pub team: Retention,
    /// Whisper conversations between two players.
    pub private: Retention,
    pub system: Retention,
    /// Most messages one history page returns, whatever the client asks.
    pub max_page: u32,
    /// Most whispers stored for one offline player; more are refused with
    /// [`HistoryError::InboxFull`](super::HistoryError::InboxFull).
    pub max_offline_whispers: u32,
    /// Days an undelivered offline whisper waits before retention deletes
    /// it; 0 = never. Without a limit, whispers to ids that never log in
    /// would stay on disk forever.
    pub offline_ttl_days: u32,
    /// Most undelivered whispers one sender may have waiting, over all
    /// recipients; more are refused with
    /// [`HistoryError::SenderLimit`](super::HistoryError::SenderLimit).
    /// `max_offline_whispers` bounds one inbox; this bounds what one account
    /// can make the server keep by whispering to arbitrary ids.
    pub max_offline_per_sender: u32,
}

/// How much of one kind of conversation is kept. A zero limit means "no
/// limit of that kind"; both zero keeps everything forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// Whether messages are stored at all. When false, appends succeed at
    /// once without touching the disk.
    pub persist: bool,
    /// Newest messages kept per conversation.
    pub keep_count: u32,
    /// Days a message is kept.
    pub keep_days: u32,
}

impl Retention {
    /// Busy public channels: a day's worth of scroll-back is plenty.
    const PUBLIC: Retention = Retention {
        persist: true,
        keep_count: 1000,
        keep_days: 1,
    };
    /// Group and private conversations: players expect to find them again.
    const PRIVATE: Retention = Retention {
        persist: true,
        keep_count: 10_000,
        keep_days: 30,
    };
}

/// SQLite's `synchronous` setting for the writer's connection (always in WAL
/// mode).
///
/// Both modes survive `kill -9` of the server: a commit has been written to
/// the WAL file, so the OS holds it even if the process dies. They differ on
/// power loss or a kernel crash: `full` fsyncs the WAL on every commit, so an
/// acknowledged message is on the disk; `normal` only fsyncs at checkpoints,
/// so the last commits before a power cut can be lost (the database stays
/// consistent either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// Every commit is fsynced: "acknowledged" means "on disk". The default,
    /// because group commit already shares one fsync among a burst: in the
    /// `history` benchmark a burst of 2000 costs the same under both modes;
    /// only one-commit-per-message traffic pays for the fsync.
    #[default]
    Full,
    /// Commits reach the OS, not necessarily the disk.
    Normal,
}

impl Synchronous {
    /// The value of `PRAGMA synchronous`.
    pub(super) fn pragma(self) -> &'static str {
        match self {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        }
    }
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            enabled: true,
            url: None,
            flush_interval_ms: 1,
            max_batch: 512,
            max_db_bytes: 0,
            prune_interval_secs: 60,
            synchronous: Synchronous::Full,
            world: Retention::PUBLIC,
            scene: Retention::PUBLIC,
            guild: Retention::PRIVATE,
            team: Retention::PRIVATE,
            private: Retention::PRIVATE,
            system: Retention::PRIVATE,
            max_page: 100,
            max_offline_whispers: 200,
            offline_ttl_days: 30,
            max_offline_per_sender: 100,
        }
    }
}

/// Longest accepted `flush_interval_ms`: every acknowledged message may wait
/// this long, so anything above a second is surely a typo.
const MAX_FLUSH_INTERVAL_MS: u64 = 1000;

/// Largest accepted `max_batch`; bigger batches only hold more waiters for
/// one longer transaction.
const MAX_BATCH_LIMIT: usize = 65_536;

/// Largest accepted `max_page`: one page must fit in a single frame.
const MAX_PAGE_LIMIT: u32 = 1000;

/// Largest accepted `offline_ttl_days` other than 0: ten years is already
/// "never" in practice, so anything above it is surely a typo for 0 or for
/// a number of hours.
const MAX_OFFLINE_TTL_DAYS: u32 = 3650;

pub(super) const DAY_MS: u64 = 24 * 60 * 60 * 1000;

impl HistoryConfig {
    /// Checks the settings; the error names the offending key.
    pub fn validate(&self) -> Result<(), String> {
        if self.flush_interval_ms > MAX_FLUSH_INTERVAL_MS {
            return Err(format!(
                "history.flush_interval_ms must be at most {MAX_FLUSH_INTERVAL_MS}"
            ));
        }
        if self.max_batch == 0 || self.max_batch > MAX_BATCH_LIMIT {
            return Err(format!(
                "history.max_batch must be between 1 and {MAX_BATCH_LIMIT}"
            ));
        }
        if self.prune_interval_secs == 0 {
            return Err("history.prune_interval_secs must be at least 1".into());
        }
        if self.max_page == 0 || self.max_page > MAX_PAGE_LIMIT {
            return Err(format!(
                "history.max_page must be between 1 and {MAX_PAGE_LIMIT}"
            ));
        }
        if self.max_offline_whispers == 0 {
            return Err("history.max_offline_whispers must be at least 1".into());
        }
        if self.max_offline_per_sender == 0 {
            return Err("history.max_offline_per_sender must be at least 1".into());
        }
        if let Some(url) = &self.url {
            if !self.enabled {
                return Err("history.url needs history.enabled".into());
            }
            super::postgres::check_url(url).map_err(|e| format!("history.url {e}"))?;
        }
        if self.offline_ttl_days > MAX_OFFLINE_TTL_DAYS {
            return Err(format!(
                "history.offline_ttl_days must be at most {MAX_OFFLINE_TTL_DAYS} (0 = never expire)"
            ));
        }
        Ok(())
    }

    /// The retention that applies to `c`.
    pub fn retention(&self, c: &Conversation) -> &Retention {
        match c {
            Conversation::World => &self.world,
            Conversation::System => &self.system,
            Conversation::Guild(_) => &self.guild,
            Conversation::Team(_) => &self.team,
            Conversation::Scene(_) => &self.scene,
            Conversation::Whisper { .. } => &self.private,
        }
    }

    /// The oldest `time_ms` an offline whisper may have and still count as
    /// waiting at `now_ms`; `None` when whispers never expire.
    pub(super) fn offline_cutoff_ms(&self, now_ms: u64) -> Option<u64> {
        (self.offline_ttl_days > 0)
            .then(|| now_ms.saturating_sub(u64::from(self.offline_ttl_days) * DAY_MS))
    }

    /// Every kind of conversation with its retention, for the pruner.
    pub(super) fn kinds(&self) -> [(super::sqlite::Kind, Retention); 6] {
        use super::sqlite::Kind;
        [
            (Kind::World, self.world),
            (Kind::System, self.system),
            (Kind::Guild, self.guild),
            (Kind::Team, self.team),
            (Kind::Scene, self.scene),
            (Kind::Whisper, self.private),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_match_the_product_rules() {
        let c = HistoryConfig::default();
        assert_eq!(c.validate(), Ok(()));
        assert!(c.enabled);
        assert_eq!(c.retention(&Conversation::World).keep_count, 1000);
        assert_eq!(c.retention(&Conversation::Scene(3)).keep_days, 1);
        assert_eq!(c.retention(&Conversation::between(9, 2)).keep_count, 10_000);
        assert_eq!(c.retention(&Conversation::System).keep_days, 30);
        assert_eq!(c.offline_ttl_days, 30);
        assert_eq!(c.max_offline_per_sender, 100);
    }

    #[test]
    fn toml_overrides_and_rejects_unknown_keys() {
        let c: HistoryConfig = toml::from_str(
            "max_page = 50\nsynchronous = \"normal\"\n\
             [world]\npersist = false\nkeep_count = 0\nkeep_days = 0\n",
        )
        .expect("valid history config");
        assert_eq!(c.max_page, 50);
        assert_eq!(c.synchronous, Synchronous::Normal);
        // Keys added with schema v2 default when an older file omits them.
        assert_eq!(c.offline_ttl_days, 30);
        assert!(!c.world.persist);
        assert!(c.guild.persist);

        assert!(toml::from_str::<HistoryConfig>("max_pages = 5").is_err());
        // A retention table must be complete: half-specified retention is
        // more likely a mistake than an intent.
        assert!(toml::from_str::<HistoryConfig>("[guild]\npersist = true").is_err());
    }

    #[test]
    fn validation_names_the_key() {
        let bad = [
            HistoryConfig {
                max_batch: 0,
                ..HistoryConfig::default()
            },
            HistoryConfig {
                flush_interval_ms: 5000,
                ..HistoryConfig::default()
            },
            HistoryConfig {
                max_page: 0,
                ..HistoryConfig::default()
            },
            HistoryConfig {
                max_offline_whispers: 0,
                ..HistoryConfig::default()
            },
            HistoryConfig {
                prune_interval_secs: 0,
                ..HistoryConfig::default()
            },
            HistoryConfig {
                max_offline_per_sender: 0,
                ..HistoryConfig::default()
            },
            HistoryConfig {
                offline_ttl_days: 100_000,
                ..HistoryConfig::default()
            },
        ];
        let keys = [
            "max_batch",
            "flush_interval_ms",
            "max_page",
            "max_offline_whispers",
            "prune_interval_secs",
            "max_offline_per_sender",
            "offline_ttl_days",
        ];
        for (config, key) in bad.iter().zip(keys) {
            let err = config.validate().expect_err(key);
            assert!(err.contains(key), "{err} should name {key}");
        }
    }

    #[test]
    fn a_history_url_must_be_postgres_and_needs_history() {
        let with = |url: &str, enabled: bool| HistoryConfig {
            url: Some(url.into()),
            enabled,
            ..HistoryConfig::default()
        };
        assert_eq!(
            with("postgres://gc@127.0.0.1:5432/chat", true).validate(),
            Ok(())
        );
        assert_eq!(
            with("postgresql://gc@localhost/chat", true).validate(),
            Ok(())
        );
        let err = with("mysql://gc@127.0.0.1/chat", true)
            .validate()
            .expect_err("not PostgreSQL");
        assert!(err.contains("history.url"), "{err}");
        let err = with("postgres://gc@127.0.0.1:notaport/chat", true)
            .validate()
            .expect_err("bad port");
        assert!(err.contains("history.url"), "{err}");
        let err = with("postgres://gc@127.0.0.1/chat", false)
            .validate()
            .expect_err("history off");
        assert!(err.contains("history.enabled"), "{err}");
    }
}
