//! Tests of the game-master store through the public handle, on a real
//! SQLite file in a temporary directory.

use std::time::Duration;

use futures_util::future::{join, join_all};

use super::config::DAY_MS;
use super::tests::{
    append_all, ids, joined, msg, now_ms, open, pending, store, whisper, SCHEMA_V1,
};
use super::*;

/// Rows in `table`, read from a connection of the test's own.
fn rows(dir: &Path, table: &str) -> i64 {
    let conn = rusqlite::Connection::open(dir.join(sqlite::FILE_NAME)).expect("open");
    conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
        .expect("count")
}

fn entry(action: &str, time_ms: u64) -> AuditEntry {
    AuditEntry {
        id: 0,
        time_ms,
        key_id: "ops-1".into(),
        action: action.into(),
        target: "user:7".into(),
        reason: "spam ✓".into(),
        result: "ok".into(),
    }
}

#[tokio::test]
async fn sanctions_and_revocations_survive_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (h, _, threads) =
        HistoryHandle::open(dir.path(), HistoryConfig::default()).expect("open store");
    let later = now_ms() + 3_600_000;
    h.set_sanction(7, SanctionKind::Mute, later, "spam".into())
        .await
        .expect("muted");
    h.set_sanction(7, SanctionKind::Ban, u64::MAX, "cheating".into())
        .await
        .expect("banned for ever");
    h.set_sanction(u64::MAX, SanctionKind::Mute, later, "last id".into())
        .await
        .expect("muted");
    h.set_sanction(3, SanctionKind::Mute, later, "first reason".into())
        .await
        .expect("muted");
    // Setting it again replaces it.
    h.set_sanction(3, SanctionKind::Mute, later + 1, "second reason".into())
        .await
        .expect("muted again");
    h.revoke_tokens(7, 1_000).await.expect("revoked");
    h.revoke_tokens(7, 900).await.expect("an older revocation");
    h.revoke_tokens(5, 2_000).await.expect("revoked");
    h.revoke_tokens(u64::MAX, 3_000).await.expect("revoked");

    let loaded = h.load_moderation().await.expect("loaded");
    let found: Vec<_> = loaded
        .sanctions
        .iter()
        .map(|s| (s.user, s.kind, s.until_ms, s.reason.as_str()))
        .collect();
    assert_eq!(
        found,
        [
            (3, SanctionKind::Mute, later + 1, "second reason"),
            (7, SanctionKind::Mute, later, "spam"),
            (7, SanctionKind::Ban, u64::MAX, "cheating"),
            (u64::MAX, SanctionKind::Mute, later, "last id"),
        ]
    );
    assert!(loaded.sanctions.iter().all(|s| s.set_ms <= now_ms()));
    assert_eq!(
        loaded.revocations,
        [(5, 2_000), (7, 1_000), (u64::MAX, 3_000)],
        "a revocation is never narrowed"
    );
    assert_eq!(h.sanctions().await.expect("sanctions"), loaded.sanctions);

    drop(h);
    assert!(joined(threads, Duration::from_secs(10)).await);
    let h = open(dir.path(), HistoryConfig::default());
    assert_eq!(h.load_moderation().await.expect("reloaded"), loaded);

    // Lifting one reports whether there was one.
    assert_eq!(h.clear_sanction(7, SanctionKind::Mute).await, Ok(true));
    assert_eq!(h.clear_sanction(7, SanctionKind::Mute).await, Ok(false));
    assert_eq!(h.clear_sanction(9, SanctionKind::Ban).await, Ok(false));
    let kinds: Vec<_> = h
        .sanctions()
        .await
        .expect("sanctions")
        .iter()
        .map(|s| (s.user, s.kind))
        .collect();
    assert_eq!(
        kinds,
        [
            (3, SanctionKind::Mute),
            (7, SanctionKind::Ban),
            (u64::MAX, SanctionKind::Mute)
        ]
    );
}

#[tokio::test]
async fn an_expired_sanction_is_not_loaded_and_is_pruned() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = open(dir.path(), HistoryConfig::default());
    h.set_sanction(1, SanctionKind::Mute, now_ms() - 1_000, "over".into())
        .await
        .expect("set");
    h.set_sanction(2, SanctionKind::Mute, now_ms() + 60_000, "on".into())
        .await
        .expect("set");
    let users: Vec<_> = h
        .sanctions()
        .await
        .expect("sanctions")
        .iter()
        .map(|s| s.user)
        .collect();
    assert_eq!(users, [2]);
    assert_eq!(rows(dir.path(), "sanctions"), 2, "kept until the prune");
    h.prune_now().await.expect("pruned");
    assert_eq!(rows(dir.path(), "sanctions"), 1);
    // An expired one can still be cleared before the prune; after it,
    // there is nothing to clear.
    assert_eq!(h.clear_sanction(1, SanctionKind::Mute).await, Ok(false));
}

#[tokio::test]
async fn the_block_cap_holds_inside_one_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A long flush interval gathers every block below into one commit.
    let config = HistoryConfig {
        flush_interval_ms: 50,
        ..HistoryConfig::default()
    };
    let h = open(dir.path(), config);
    let (ann, cap) = (1, 3);
    let commits = h.stats().commits;
    // `join_all` polls them in order, so they are queued in this order.
    let outcomes = join_all(
        [10, 11, 12, 11, 13, 14]
            .into_iter()
            .map(|blocked| h.block(ann, blocked, cap)),
    )
    .await;
    assert_eq!(h.stats().commits, commits + 1, "one batch");
    use BlockOutcome::{Added, Already, Full};
    assert_eq!(
        outcomes,
        [
            Ok(Added),
            Ok(Added),
            Ok(Added),
            Ok(Already),
            Ok(Full),
            Ok(Full)
        ]
    );
    assert_eq!(h.blocks(ann).await, Ok(vec![10, 11, 12]));
    assert_eq!(rows(dir.path(), "blocks"), 3);

    // Unblocking makes room for exactly one more.
    assert_eq!(h.unblock(ann, 11).await, Ok(true));
    assert_eq!(h.unblock(ann, 11).await, Ok(false));
    assert_eq!(h.block(ann, u64::MAX, cap).await, Ok(Added));
    assert_eq!(h.block(ann, 14, cap).await, Ok(Full));
    // Sorted as ids, even one past i64.
    assert_eq!(h.blocks(ann).await, Ok(vec![10, 12, u64::MAX]));
    // Blocks are one-way and per player.
    assert_eq!(h.blocks(10).await, Ok(vec![]));
    assert_eq!(h.block(10, ann, cap).await, Ok(Added));
    assert_eq!(h.blocks(10).await, Ok(vec![ann]));
    assert_eq!(h.block(2, 3, 0).await, Ok(Full), "a cap of 0 allows none");
}

#[tokio::test]
async fn a_queued_block_read_sees_exactly_the_blocks_queued_before_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = HistoryConfig {
        flush_interval_ms: 50,
        ..HistoryConfig::default()
    };
    let h = open(dir.path(), config);
    h.block(1, 5, 10).await.expect("blocked");

    // `join` polls the block first, so it is queued (not yet committed)
    // before the read, which must be lazy too: `pending_blocks` queues
    // when called, `block` when first polled.
    let (added, seen) = join(h.block(1, 6, 10), async { h.pending_blocks(1).await }).await;
    assert_eq!(added, Ok(BlockOutcome::Added));
    assert_eq!(seen.expect("answered"), Ok(vec![5, 6]));

    // Queued after the read: not seen by it.
    let read = h.pending_blocks(1);
    let (unblocked, added) = join(h.unblock(1, 5), h.block(1, 7, 10)).await;
    assert_eq!((unblocked, added), (Ok(true), Ok(BlockOutcome::Added)));
    assert_eq!(read.await.expect("answered"), Ok(vec![5, 6]));
    assert_eq!(h.pending_blocks(1).await.expect("answered"), Ok(vec![6, 7]));
    assert_eq!(h.pending_blocks(2).await.expect("answered"), Ok(vec![]));

    // A dead writer refuses at once instead of leaving callers waiting.
    h.crash_writer();
    tokio::time::timeout(Duration::from_secs(10), h.died().cancelled())
        .await
        .expect("writer died");
    assert_eq!(
        h.pending_blocks(1).await.expect("answered"),
        Err(HistoryError::Unavailable)
    );
    assert_eq!(h.block(1, 8, 10).await, Err(HistoryError::Unavailable));
    assert_eq!(h.audit(entry("x", 1)).await, Err(HistoryError::Unavailable));
    // The reader still answers from what was committed.
    assert_eq!(h.blocks(1).await, Ok(vec![6, 7]));
}

#[tokio::test]
async fn audit_pages_run_newest_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = HistoryConfig {
        max_page: 3,
        ..HistoryConfig::default()
    };
    let h = open(dir.path(), config);
    let mut assigned = Vec::new();
    for n in 1..=5u64 {
        let mut e = entry(&format!("mute-{n}"), 1000 * n);
        e.id = 999; // ignored
        assigned.push(h.audit(e).await.expect("audited"));
    }
    assert_eq!(assigned, [1, 2, 3, 4, 5]);

    let page_ids = |page: &[AuditEntry]| page.iter().map(|e| e.id).collect::<Vec<_>>();
    let first = h.audit_page(0, 2).await.expect("page");
    assert_eq!(page_ids(&first), [5, 4]);
    assert_eq!(
        first[0],
        AuditEntry {
            id: 5,
            ..entry("mute-5", 5000)
        },
        "an entry reads back field for field"
    );
    let next = h.audit_page(4, 2).await.expect("page");
    assert_eq!(page_ids(&next), [3, 2]);
    assert_eq!(page_ids(&h.audit_page(2, 2).await.expect("page")), [1]);
    assert_eq!(h.audit_page(1, 2).await, Ok(vec![]));
    // max_page caps the limit, and 0 asks for it.
    assert_eq!(
        page_ids(&h.audit_page(0, 50).await.expect("page")),
        [5, 4, 3]
    );
    assert_eq!(
        page_ids(&h.audit_page(0, 0).await.expect("page")),
        [5, 4, 3]
    );
    assert_eq!(
        page_ids(&h.audit_page(u64::MAX, 1).await.expect("page")),
        [5]
    );
}

#[tokio::test]
async fn an_announce_key_keeps_its_first_msg_id_for_a_day() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (h, _, threads) =
        HistoryHandle::open(dir.path(), HistoryConfig::default()).expect("open store");
    let t = now_ms() - 3 * DAY_MS;
    let claim = |key: &str, msg_id, at| h.announce_key(key.into(), msg_id, at);

    assert_eq!(claim("maint", 100, t).await, Ok(100));
    assert_eq!(claim("maint", 101, t + 1000).await, Ok(100), "a retry");
    assert_eq!(claim("other", 102, t + 1000).await, Ok(102));
    assert_eq!(claim("maint", 103, t + DAY_MS - 1).await, Ok(100));
    // 24 hours on, the key is free again and the new claim replaces it.
    assert_eq!(claim("maint", 104, t + DAY_MS).await, Ok(104));
    assert_eq!(claim("maint", 105, t + DAY_MS + 1).await, Ok(104));
    assert_eq!(rows(dir.path(), "announce_keys"), 2);

    // The prune deletes keys older than a day (both, here) and keeps the
    // rest.
    assert_eq!(claim("fresh", 106, now_ms()).await, Ok(106));
    h.prune_now().await.expect("pruned");
    assert_eq!(rows(dir.path(), "announce_keys"), 1);
    assert_eq!(claim("fresh", 107, now_ms()).await, Ok(106));
    assert_eq!(claim("maint", 108, now_ms()).await, Ok(108));

    // Its msg_id counts toward the high-water mark.
    drop(h);
    assert!(joined(threads, Duration::from_secs(10)).await);
    let (_, high_water, _) =
        HistoryHandle::open(dir.path(), HistoryConfig::default()).expect("reopen");
    assert_eq!(high_water, 108);
}

#[tokio::test]
async fn a_removed_message_is_gone_from_history_and_inboxes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = open(dir.path(), HistoryConfig::default());
    let lines: Vec<_> = (1..=3).map(|id| msg(Conversation::World, id)).collect();
    append_all(&h, lines.clone()).await;

    assert_eq!(h.remove_message(2).await, Ok(Some(lines[1].clone())));
    let (page, _) = h.page(Conversation::World, 0, 10).await.expect("page");
    assert_eq!(ids(&page), [3, 1]);
    assert_eq!(h.remove_message(2).await, Ok(None), "already gone");
    assert_eq!(h.remove_message(999).await, Ok(None));

    // A whisper kept as history and waiting offline: both copies go, and
    // its recipient is no longer thought to have whispers waiting.
    let bob = 7;
    let both = whisper(42, bob, 10);
    append_all(&h, [both.clone()]).await;
    store(&h, bob, both.clone()).await.expect("stored");
    assert!(h.may_have_offline(bob));
    assert_eq!(h.remove_message(10).await, Ok(Some(both)));
    assert_eq!(pending(&h, bob).await, []);
    assert!(!h.may_have_offline(bob));
    let (page, _) = h
        .page(Conversation::between(42, bob), 0, 10)
        .await
        .expect("page");
    assert_eq!(page, []);

    // A whisper only waiting offline is returned from the inbox.
    let only_offline = whisper(42, bob, 11);
    store(&h, bob, only_offline.clone()).await.expect("stored");
    store(&h, bob, whisper(42, bob, 12)).await.expect("stored");
    assert_eq!(h.remove_message(11).await, Ok(Some(only_offline)));
    assert_eq!(ids(&pending(&h, bob).await), [12]);
    assert!(h.may_have_offline(bob), "whisper 12 still waits");
}

#[tokio::test]
async fn a_players_own_messages_newest_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = HistoryConfig {
        max_page: 4,
        ..HistoryConfig::default()
    };
    let h = open(dir.path(), config);
    let base = now_ms() - 10_000;
    let line = |sender, conv, id: u64| StoredMsg {
        sender_id: sender,
        time_ms: base + id * 100,
        ..msg(conv, id)
    };
    append_all(
        &h,
        [
            line(42, Conversation::World, 1),
            line(43, Conversation::World, 2),
            line(42, Conversation::Guild(1), 3),
            line(42, Conversation::between(42, 7), 4),
            line(43, Conversation::Guild(1), 5),
            line(42, Conversation::World, 6),
            line(42, Conversation::Team(2), 7),
            line(42, Conversation::World, 8),
        ],
    )
    .await;

    let mine = h.messages_by_sender(42, 0, 10).await.expect("read");
    assert_eq!(ids(&mine), [8, 7, 6, 4], "capped at max_page");
    assert!(mine.iter().all(|m| m.sender_id == 42));
    assert_eq!(mine[0], line(42, Conversation::World, 8));
    assert_eq!(
        ids(&h.messages_by_sender(42, base + 400, 0).await.expect("read")),
        [8, 7, 6, 4],
        "since is inclusive"
    );
    assert_eq!(
        ids(&h.messages_by_sender(42, base + 401, 2).await.expect("read")),
        [8, 7]
    );
    assert_eq!(
        ids(&h.messages_by_sender(43, 0, 10).await.expect("read")),
        [5, 2]
    );
    assert_eq!(h.messages_by_sender(44, 0, 10).await, Ok(vec![]));
    assert_eq!(h.messages_by_sender(42, u64::MAX, 10).await, Ok(vec![]));
}

/// Version 2 as it shipped: version 1, then the second migration.
const MIGRATION_V2: &str = "
ALTER TABLE messages ADD COLUMN nonce INTEGER NOT NULL DEFAULT 0;
ALTER TABLE offline ADD COLUMN nonce INTEGER NOT NULL DEFAULT 0;
CREATE INDEX messages_by_nonce ON messages (sender_id, msg_id) WHERE nonce != 0;
CREATE INDEX offline_by_sender ON offline (sender_id);
CREATE INDEX offline_by_age ON offline (time_ms);
CREATE TABLE players (
    user_id       INTEGER PRIMARY KEY,
    name          TEXT    NOT NULL,
    last_login_ms INTEGER NOT NULL
);
CREATE INDEX players_by_name ON players (name, last_login_ms);
PRAGMA user_version = 2;
";

#[tokio::test]
async fn a_version_2_database_is_upgraded_in_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(sqlite::FILE_NAME);
    let time = now_ms() as i64;
    {
        let conn = rusqlite::Connection::open(&path).expect("create v2");
        conn.execute_batch(SCHEMA_V1).expect("v1 schema");
        conn.execute_batch(MIGRATION_V2).expect("v2 schema");
        // Guild 5, msg 3 with nonce 77; a whisper 42 -> 7, msg 4; a player;
        // high water 4.
        conn.execute(
            "INSERT INTO messages VALUES (3, 5, 0, 3, 3, 42, 'Ann', 'old line', ?1,
                                          5, 0, 0, 0, '', 77)",
            [time],
        )
        .expect("v2 message");
        conn.execute(
            "INSERT INTO offline VALUES (7, 4, 6, 7, 42, 3, 42, 'Ann', 'old whisper', ?1,
                                         0, 0, 0, 7, 'Bob', 0)",
            [time],
        )
        .expect("v2 whisper");
        conn.execute("INSERT INTO players VALUES (42, 'Ann', ?1)", [time])
            .expect("v2 player");
        conn.execute("INSERT INTO meta VALUES ('high_water', 4)", [])
            .expect("v2 meta");
    }

    let (h, high_water, _) =
        HistoryHandle::open(dir.path(), HistoryConfig::default()).expect("open v2");
    assert_eq!(high_water, 4);
    let (page, _) = h.page(Conversation::Guild(5), 0, 10).await.expect("page");
    assert_eq!(ids(&page), [3]);
    assert_eq!((page[0].text.as_str(), page[0].nonce), ("old line", 77));
    assert_eq!(ids(&pending(&h, 7).await), [4]);
    assert_eq!(h.recent_nonces(42, 5).await, Ok(vec![(77, 3)]));
    assert_eq!(
        h.find_player(PlayerRef::Id(42)).await,
        Ok(Some((42, "Ann".into())))
    );

    // Version 3 works on the upgraded file, old rows included.
    assert_eq!(
        ids(&h.messages_by_sender(42, 0, 10).await.expect("read")),
        [3]
    );
    h.set_sanction(42, SanctionKind::Ban, u64::MAX, "old".into())
        .await
        .expect("sanction");
    assert_eq!(h.sanctions().await.expect("sanctions").len(), 1);
    assert_eq!(h.block(42, 7, 5).await, Ok(BlockOutcome::Added));
    assert_eq!(h.audit(entry("ban", 1)).await, Ok(1));
    assert_eq!(h.announce_key("k".into(), 5, now_ms()).await, Ok(5));
    assert_eq!(
        h.remove_message(4).await.expect("removed").map(|m| m.text),
        Some("old whisper".into())
    );
    let conn = rusqlite::Connection::open(&path).expect("inspect");
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .expect("version");
    assert_eq!(version, 3);
}
