//! Tests of the store through its public handle, on a real SQLite file in a
//! temporary directory.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::oneshot;

use super::*;

pub(super) fn now_ms() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    u64::try_from(since.as_millis()).expect("time fits in u64")
}

pub(super) fn msg(conversation: Conversation, msg_id: u64) -> StoredMsg {
    let (guild_id, team_id, scene_id, target_id) = match conversation {
        Conversation::Guild(g) => (g, 0, 0, 0),
        Conversation::Team(t) => (0, t, 0, 0),
        Conversation::Scene(s) => (0, 0, s, 0),
        Conversation::Whisper { high, .. } => (0, 0, 0, high),
        Conversation::World | Conversation::System => (0, 0, 0, 0),
    };
    StoredMsg {
        msg_id,
        conversation,
        chattype: 3,
        sender_id: 42,
        sender_name: "Ann".into(),
        text: format!("message {msg_id} ✓"),
        time_ms: now_ms(),
        guild_id,
        team_id,
        scene_id,
        target_id,
        target_name: if target_id == 0 {
            String::new()
        } else {
            "Bob".into()
        },
        nonce: 0,
    }
}

pub(super) fn open(dir: &Path, config: HistoryConfig) -> HistoryHandle {
    HistoryHandle::open(dir, config).expect("open store").0
}

/// Appends every message, then waits for all of them: one burst.
pub(super) async fn append_all(h: &HistoryHandle, msgs: impl IntoIterator<Item = StoredMsg>) {
    let waiters: Vec<_> = msgs
        .into_iter()
        .map(|m| h.append(m).expect("queue has room"))
        .collect();
    for w in waiters {
        w.await.expect("writer answered").expect("batch committed");
    }
}

pub(super) fn ids(page: &[StoredMsg]) -> Vec<u64> {
    page.iter().map(|m| m.msg_id).collect()
}

/// Waits (without blocking the runtime) for the store's threads to end.
pub(super) async fn joined(threads: HistoryThreads, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while !threads.is_finished() {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    threads.join();
    true
}

/// Stores an offline whisper and waits for the outcome.
pub(super) async fn store(h: &HistoryHandle, to: u64, m: StoredMsg) -> Result<(), HistoryError> {
    h.store_offline(to, m)
        .await
        .unwrap_or(Err(HistoryError::Unavailable))
}

/// The whispers waiting for `user`.
pub(super) async fn pending(h: &HistoryHandle, user: u64) -> Vec<StoredMsg> {
    h.pending_offline(user)
        .await
        .expect("writer answered")
        .expect("pending read")
}

#[test]
fn between_orders_the_pair() {
    assert_eq!(Conversation::between(9, 4), Conversation::between(4, 9));
    assert_eq!(
        Conversation::between(9, 4),
        Conversation::Whisper { low: 4, high: 9 }
    );
}

#[tokio::test]
async fn pages_give_every_message_once_newest_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = open(dir.path(), HistoryConfig::default());
    let guild = Conversation::Guild(1);
    // Interleave other conversations, including a guild id's neighbour and
    // a whisper, so a leaky WHERE clause would show.
    let mut msgs = Vec::new();
    for id in 1..=75u64 {
        let conv = match id % 3 {
            0 => guild,
            1 => Conversation::Guild(2),
            _ => Conversation::between(1, 0),
        };
        msgs.push(msg(conv, id));
    }
    append_all(&h, msgs.clone()).await;
    let expected: Vec<u64> = msgs
        .iter()
        .filter(|m| m.conversation == guild)
        .map(|m| m.msg_id)
        .rev()
        .collect();
    assert_eq!(expected.len(), 25);

    let mut seen = Vec::new();
    let mut before = 0;
    let mut pages = Vec::new();
    loop {
        let (page, more) = h.page(guild, before, 10).await.expect("page");
        assert!(page.iter().all(|m| m.conversation == guild));
        pages.push((page.len(), more));
        seen.extend(ids(&page));
        if !more {
            break;
        }
        before = page.last().expect("a page with more is not empty").msg_id;
    }
    assert_eq!(pages, [(10, true), (10, true), (5, false)]);
    assert_eq!(seen, expected);

    // A stored message reads back field for field.
    let (newest, _) = h.page(guild, 0, 1).await.expect("page");
    assert_eq!(newest, [msgs[74].clone()]);

    // A cursor past any id (or past i64) starts from the newest.
    let (page, _) = h.page(guild, u64::MAX, 3).await.expect("page");
    assert_eq!(ids(&page), expected[..3]);
    // Nothing older than the oldest.
    assert_eq!(h.page(guild, 3, 10).await.expect("page"), (vec![], false));
    assert_eq!(
        h.page(Conversation::Team(1), 0, 10).await.expect("page"),
        (vec![], false)
    );
}

#[tokio::test]
async fn max_page_caps_the_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = HistoryConfig {
        max_page: 7,
        ..HistoryConfig::default()
    };
    let h = open(dir.path(), config);
    append_all(&h, (1..=20).map(|id| msg(Conversation::World, id))).await;

    let (page, more) = h.page(Conversation::World, 0, 50).await.expect("page");
    assert_eq!(ids(&page), (14..=20).rev().collect::<Vec<_>>());
    assert!(more);
    // 0 asks for the server's maximum.
    let (page, _) = h.page(Conversation::World, 0, 0).await.expect("page");
    assert_eq!(page.len(), 7);
}

#[tokio::test]
async fn a_burst_is_committed_in_a_few_transactions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = open(dir.path(), HistoryConfig::default());
    append_all(&h, (1..=1000).map(|id| msg(Conversation::Scene(5), id))).await;

    let stats = h.stats();
    assert_eq!(stats.messages, 1000);
    assert_eq!(stats.failed_commits, 0);
    // 1000 writes at max_batch 512 need at least 2 commits; appended
    // without waiting they should need hardly more.
    assert!(
        (2..=20).contains(&stats.commits),
        "1000 appends took {} commits",
        stats.commits
    );
    let (page, more) = h.page(Conversation::Scene(5), 0, 1).await.expect("page");
    assert_eq!((ids(&page), more), (vec![1000], true));
}

#[tokio::test]
async fn reopening_keeps_messages_and_the_high_water_mark() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = HistoryConfig {
        world: Retention {
            persist: false,
            keep_count: 0,
            keep_days: 0,
        },
        ..HistoryConfig::default()
    };
    let (h, high_water, threads) =
        HistoryHandle::open(dir.path(), config.clone()).expect("open store");
    assert_eq!(high_water, 0, "a new store has handed out no ids");
    append_all(&h, (1..=5).map(|id| msg(Conversation::Team(3), id))).await;
    // An id used by a conversation that is not stored still counts: a
    // client may have seen it.
    append_all(&h, [msg(Conversation::World, 9)]).await;
    drop(h);
    assert!(joined(threads, Duration::from_secs(10)).await);

    let (h, high_water, _) = HistoryHandle::open(dir.path(), config).expect("reopen store");
    assert_eq!(high_water, 9);
    let (page, more) = h.page(Conversation::Team(3), 0, 10).await.expect("page");
    assert_eq!(ids(&page), [5, 4, 3, 2, 1]);
    assert!(!more);
    // The reopened store takes new writes.
    append_all(&h, [msg(Conversation::Team(3), 10)]).await;
    let (page, _) = h.page(Conversation::Team(3), 0, 1).await.expect("page");
    assert_eq!(ids(&page), [10]);
}

#[tokio::test]
async fn offline_whispers_wait_until_acknowledged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = HistoryConfig {
        max_offline_whispers: 3,
        ..HistoryConfig::default()
    };
    let h = open(dir.path(), config);
    let (bob, carol) = (7, 8);
    let whispers: Vec<_> = [10, 11, 12]
        .map(|id| msg(Conversation::between(42, bob), id))
        .into();
    for w in &whispers {
        store(&h, bob, w.clone()).await.expect("stored");
    }
    store(&h, carol, msg(Conversation::between(42, carol), 13))
        .await
        .expect("another player's inbox is separate");

    assert_eq!(pending(&h, bob).await, whispers);
    assert_eq!(
        store(&h, bob, msg(Conversation::between(42, bob), 14)).await,
        Err(HistoryError::InboxFull)
    );

    h.ack_offline(bob, vec![10, 11]).await.expect("acked");
    assert_eq!(pending(&h, bob).await, [whispers[2].clone()]);
    // Room again after the ack; acking twice is harmless.
    store(&h, bob, msg(Conversation::between(42, bob), 15))
        .await
        .expect("stored");
    h.ack_offline(bob, vec![10, 11]).await.expect("acked again");
    assert_eq!(ids(&pending(&h, bob).await), [12, 15]);
    assert_eq!(ids(&pending(&h, carol).await), [13]);
    assert_eq!(pending(&h, 99).await, []);
    assert_eq!(h.stats().offline_stored, 5);
}

#[tokio::test]
async fn only_players_with_waiting_whispers_cost_a_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = HistoryConfig {
        max_offline_whispers: 1,
        ..HistoryConfig::default()
    };
    let (h, _, threads) = HistoryHandle::open(dir.path(), config.clone()).expect("open store");
    let whisper = |to, id| msg(Conversation::between(42, to), id);
    assert_eq!(pending(&h, 7).await, []);
    assert_eq!(
        h.stats().offline_reads,
        0,
        "no whisper ever stored: no read"
    );

    store(&h, 7, whisper(7, 10)).await.expect("stored");
    assert_eq!(
        store(&h, 7, whisper(7, 11)).await,
        Err(HistoryError::InboxFull)
    );
    assert_eq!(ids(&pending(&h, 7).await), [10]);
    assert_eq!(pending(&h, 8).await, []);
    assert_eq!(h.stats().offline_reads, 1);

    // Delivered and acknowledged: no more reads for that player, and a new
    // whisper is found again.
    h.ack_offline(7, vec![10]).await.expect("acked");
    assert_eq!(pending(&h, 7).await, []);
    assert_eq!(h.stats().offline_reads, 1);
    store(&h, 7, whisper(7, 12)).await.expect("stored");
    assert_eq!(ids(&pending(&h, 7).await), [12]);

    // After a restart the waiting whispers are known from the file.
    drop(h);
    assert!(joined(threads, Duration::from_secs(10)).await);
    let h = open(dir.path(), config);
    assert_eq!(ids(&pending(&h, 7).await), [12]);
    assert_eq!(pending(&h, 8).await, []);
    assert_eq!(h.stats().offline_reads, 1);
}

#[tokio::test]
async fn a_failed_write_is_reported_and_the_writer_recovers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = open(dir.path(), HistoryConfig::default());
    let conv = Conversation::Guild(4);
    append_all(&h, [msg(conv, 1)]).await;

    // Simulated full disk: enough data that the batch must grow the file.
    h.limit_pages(true).await;
    let big = |id| StoredMsg {
        text: "x".repeat(2000),
        ..msg(conv, id)
    };
    let waiters: Vec<_> = (2..=40)
        .map(|id| h.append(big(id)).expect("queue has room"))
        .collect();
    for w in waiters {
        assert_eq!(
            w.await.expect("writer answered"),
            Err(HistoryError::WriteFailed)
        );
    }
    assert_eq!(store(&h, 5, big(41)).await, Err(HistoryError::WriteFailed));
    assert!(h.stats().failed_commits >= 1);
    // Nothing of the failed batches is visible.
    let (page, _) = h.page(conv, 0, 100).await.expect("reads still work");
    assert_eq!(ids(&page), [1]);

    // The disk has room again: the same thread takes writes normally.
    h.limit_pages(false).await;
    append_all(&h, (50..=60).map(big)).await;
    let (page, _) = h.page(conv, 0, 100).await.expect("page");
    assert_eq!(page.len(), 12);
    assert_eq!(page[0].msg_id, 60);
}

#[tokio::test]
async fn pruning_keeps_the_newest_by_count() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = HistoryConfig {
        guild: Retention {
            persist: true,
            keep_count: 5,
            keep_days: 0,
        },
        ..HistoryConfig::default()
    };
    let h = open(dir.path(), config);
    append_all(&h, (1..=20).map(|id| msg(Conversation::Guild(1), id))).await;
    append_all(&h, (21..=23).map(|id| msg(Conversation::Guild(2), id))).await;
    // Not pruned on insert: only the periodic prune deletes.
    let (page, _) = h.page(Conversation::Guild(1), 0, 100).await.expect("page");
    assert_eq!(page.len(), 20);

    assert_eq!(h.prune_now().await, Ok(15));
    let (page, more) = h.page(Conversation::Guild(1), 0, 100).await.expect("page");
    assert_eq!(ids(&page), [20, 19, 18, 17, 16]);
    assert!(!more);
    let (page, _) = h.page(Conversation::Guild(2), 0, 100).await.expect("page");
    assert_eq!(
        ids(&page),
        [23, 22, 21],
        "a conversation under its count is untouched"
    );
    assert_eq!(h.stats().pruned, 15);
    // Nothing more to do.
    assert_eq!(h.prune_now().await, Ok(0));
}

#[tokio::test]
async fn pruning_drops_messages_past_their_age() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = open(dir.path(), HistoryConfig::default());
    let two_days = 2 * 24 * 3600 * 1000;
    let old = |conv, id| StoredMsg {
        time_ms: now_ms() - two_days,
        ..msg(conv, id)
    };
    append_all(
        &h,
        [
            old(Conversation::World, 1),
            msg(Conversation::World, 2),
            // Guild messages are kept 30 days by default.
            old(Conversation::Guild(1), 3),
        ],
    )
    .await;

    assert_eq!(h.prune_now().await, Ok(1));
    let (page, _) = h.page(Conversation::World, 0, 10).await.expect("page");
    assert_eq!(ids(&page), [2]);
    let (page, _) = h.page(Conversation::Guild(1), 0, 10).await.expect("page");
    assert_eq!(ids(&page), [3]);
}

#[tokio::test]
async fn unpersisted_conversations_never_touch_the_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = HistoryConfig {
        scene: Retention {
            persist: false,
            keep_count: 1000,
            keep_days: 1,
        },
        ..HistoryConfig::default()
    };
    let h = open(dir.path(), config);
    let mut done = h.append(msg(Conversation::Scene(1), 1)).expect("accepted");
    // Resolved before the writer could even have seen it.
    assert_eq!(done.try_recv(), Ok(Ok(())));
    assert_eq!(h.stats().commits, 0);
    assert_eq!(
        h.page(Conversation::Scene(1), 0, 10).await.expect("page"),
        (vec![], false)
    );
}

#[tokio::test]
async fn dropping_the_last_handle_flushes_and_stops_the_threads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (h, _, threads) =
        HistoryHandle::open(dir.path(), HistoryConfig::default()).expect("open store");
    let clone = h.clone();
    let waiters: Vec<oneshot::Receiver<_>> = (1..=100)
        .map(|id| clone.append(msg(Conversation::System, id)).expect("queued"))
        .collect();
    drop(clone);
    drop(h);
    // What was queued before the drop is still committed.
    for w in waiters {
        assert_eq!(w.await, Ok(Ok(())));
    }
    assert!(
        joined(threads, Duration::from_secs(10)).await,
        "history threads still running after the last handle dropped"
    );
    let (h, high_water, _) =
        HistoryHandle::open(dir.path(), HistoryConfig::default()).expect("reopen store");
    assert_eq!(high_water, 100);
    let (page, _) = h.page(Conversation::System, 0, 100).await.expect("page");
    assert_eq!(page.len(), 100);
}

#[tokio::test]
async fn open_rejects_invalid_settings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = HistoryConfig {
        max_batch: 0,
        ..HistoryConfig::default()
    };
    assert!(matches!(
        HistoryHandle::open(dir.path(), config),
        Err(OpenError::Config(_))
    ));
}

#[tokio::test]
async fn a_dead_writer_fires_the_died_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (h, _, threads) =
        HistoryHandle::open(dir.path(), HistoryConfig::default()).expect("open store");
    let died = h.died();
    assert!(h.is_healthy());
    append_all(&h, [msg(Conversation::System, 1)]).await;

    h.crash_writer();
    tokio::time::timeout(Duration::from_secs(10), died.cancelled())
        .await
        .expect("the died token fires when the writer panics");
    assert!(!h.is_healthy());
    // Every later write is refused at once rather than left waiting.
    assert!(matches!(
        h.append(msg(Conversation::System, 2)),
        Err(HistoryError::Unavailable)
    ));
    assert_eq!(
        store(&h, 7, msg(Conversation::between(42, 7), 3)).await,
        Err(HistoryError::Unavailable)
    );
    // The reader is unaffected; the threads still end once the handle goes.
    drop(h);
    assert!(joined(threads, Duration::from_secs(10)).await);
}

#[tokio::test]
async fn a_normal_shutdown_is_not_a_death() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (h, _, threads) =
        HistoryHandle::open(dir.path(), HistoryConfig::default()).expect("open store");
    let died = h.died();
    let waiter = h.append(msg(Conversation::System, 1)).expect("queued");
    drop(h);
    // `join` blocks; the writer commits what was queued before it ends.
    tokio::task::spawn_blocking(move || threads.join())
        .await
        .expect("join");
    assert_eq!(waiter.await, Ok(Ok(())));
    assert!(!died.is_cancelled());
}

/// A whisper from `sender` to `to`.
pub(super) fn whisper(sender: u64, to: u64, msg_id: u64) -> StoredMsg {
    StoredMsg {
        sender_id: sender,
        ..msg(Conversation::between(sender, to), msg_id)
    }
}

/// Waits until every write queued so far has committed: writes commit in
/// queue order, so awaiting one that changes nothing is enough.
pub(super) async fn flushed(h: &HistoryHandle) {
    h.ack_offline(0, vec![0]).await.expect("flush write");
}

const FORTY_DAYS_MS: u64 = 40 * 24 * 3600 * 1000;

#[tokio::test]
async fn an_offline_read_sees_exactly_the_stores_queued_before_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A long flush interval keeps a queued store uncommitted while the
    // read is issued, as under load.
    let config = HistoryConfig {
        flush_interval_ms: 50,
        ..HistoryConfig::default()
    };
    let h = open(dir.path(), config);
    let (t, s1, s2) = (7, 41, 42);

    // S2's whisper (id 12) is committed before T logs in; S2's next one
    // (id 13) is queued but not yet committed when T's login reads.
    store(&h, t, whisper(s2, t, 12)).await.expect("stored");
    let queued_before = h.store_offline(t, whisper(s2, t, 13));
    let login = h.pending_offline(t);
    // S1's whisper was given the lower id 10 by the world, but its store
    // is queued only after T's read.
    let late = h.store_offline(t, whisper(s1, t, 10));

    let delivered = login.await.expect("answered").expect("read");
    assert_eq!(ids(&delivered), [12, 13]);
    assert_eq!(queued_before.await, Ok(Ok(())));
    assert_eq!(late.await, Ok(Ok(())));

    // T acknowledges what it was delivered; S1's whisper is not covered.
    h.ack_offline(t, ids(&delivered)).await.expect("acked");
    assert!(h.may_have_offline(t));
    assert_eq!(ids(&pending(&h, t).await), [10]);

    // The count is raised when the store is called, not when it commits:
    // a login right after it never skips the read.
    let other = 8;
    let rx = h.store_offline(other, whisper(s1, other, 14));
    assert!(h.may_have_offline(other));
    assert_eq!(ids(&pending(&h, other).await), [14]);
    assert_eq!(rx.await, Ok(Ok(())));
}

#[tokio::test]
async fn ack_deletes_exactly_the_given_ids() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = open(dir.path(), HistoryConfig::default());
    let bob = 7;
    for id in [10, 11, 12, 13] {
        store(&h, bob, whisper(42, bob, id)).await.expect("stored");
    }
    h.ack_offline(bob, vec![11, 13]).await.expect("acked");
    assert_eq!(ids(&pending(&h, bob).await), [10, 12]);
    // Nothing to delete is not an error, and another player's ids are not
    // touched.
    h.ack_offline(bob, Vec::new()).await.expect("empty ack");
    h.ack_offline(8, vec![10, 12]).await.expect("other inbox");
    assert_eq!(ids(&pending(&h, bob).await), [10, 12]);
    h.ack_offline(bob, vec![10, 12, 999]).await.expect("acked");
    assert_eq!(pending(&h, bob).await, []);
    assert!(!h.may_have_offline(bob), "every whisper is gone");
}

#[tokio::test]
async fn inbox_and_sender_caps_refuse_offline_whispers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = HistoryConfig {
        max_offline_whispers: 3,
        max_offline_per_sender: 2,
        ..HistoryConfig::default()
    };
    let h = open(dir.path(), config);
    let (ann, cid, bob, dan, eve) = (41, 43, 7, 8, 9);

    store(&h, bob, whisper(ann, bob, 1)).await.expect("stored");
    store(&h, bob, whisper(ann, bob, 2)).await.expect("stored");
    assert_eq!(
        store(&h, bob, whisper(ann, bob, 3)).await,
        Err(HistoryError::SenderLimit)
    );
    // The sender cap spans recipients.
    assert_eq!(
        store(&h, dan, whisper(ann, dan, 4)).await,
        Err(HistoryError::SenderLimit)
    );
    assert!(!h.may_have_offline(dan), "a refused store is not counted");
    store(&h, bob, whisper(cid, bob, 5)).await.expect("stored");
    assert_eq!(
        store(&h, bob, whisper(cid, bob, 6)).await,
        Err(HistoryError::InboxFull)
    );
    // Storing the same whisper again is a no-op success, even when full.
    store(&h, bob, whisper(ann, bob, 1))
        .await
        .expect("duplicate");
    assert_eq!(ids(&pending(&h, bob).await), [1, 2, 5]);
    assert_eq!(h.stats().offline_stored, 3);
    h.ack_offline(bob, vec![1, 2, 5]).await.expect("acked");
    assert!(
        !h.may_have_offline(bob),
        "refusals and the duplicate left no count behind"
    );

    // Expired whispers count toward neither cap.
    let old = |sender, to, id| StoredMsg {
        time_ms: now_ms() - FORTY_DAYS_MS,
        ..whisper(sender, to, id)
    };
    store(&h, eve, old(cid, eve, 7)).await.expect("stored");
    store(&h, eve, old(cid, eve, 8)).await.expect("stored");
    store(&h, eve, old(ann, eve, 9)).await.expect("stored");
    store(&h, eve, whisper(cid, eve, 10))
        .await
        .expect("expired ones do not fill the inbox or the sender's quota");
}

#[tokio::test]
async fn prune_expires_undelivered_whispers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = open(dir.path(), HistoryConfig::default());
    let bob = 7;
    let old = StoredMsg {
        time_ms: now_ms() - FORTY_DAYS_MS,
        ..whisper(42, bob, 1)
    };
    store(&h, bob, old).await.expect("stored");
    store(&h, bob, whisper(42, bob, 2)).await.expect("stored");
    // Past its TTL a whisper is no longer delivered, even before a prune.
    assert_eq!(ids(&pending(&h, bob).await), [2]);

    let rows = || {
        let conn = rusqlite::Connection::open(dir.path().join(sqlite::FILE_NAME)).expect("open");
        conn.query_row("SELECT COUNT(*) FROM offline", [], |r| r.get::<_, i64>(0))
            .expect("count")
    };
    assert_eq!(rows(), 2);
    assert_eq!(h.prune_now().await, Ok(0), "no history message is old");
    assert_eq!(rows(), 1, "the expired whisper is deleted");
    assert_eq!(h.stats().offline_expired, 1);
    // The inbox count dropped by the expired row: after acking the other
    // one, nothing is thought to wait.
    h.ack_offline(bob, vec![2]).await.expect("acked");
    assert!(!h.may_have_offline(bob));
}

#[tokio::test]
async fn offline_whispers_never_expire_with_a_zero_ttl() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = HistoryConfig {
        offline_ttl_days: 0,
        ..HistoryConfig::default()
    };
    let h = open(dir.path(), config);
    let old = StoredMsg {
        time_ms: now_ms() - FORTY_DAYS_MS,
        ..whisper(42, 7, 1)
    };
    store(&h, 7, old).await.expect("stored");
    h.prune_now().await.expect("pruned");
    assert_eq!(ids(&pending(&h, 7).await), [1]);
    assert_eq!(h.stats().offline_expired, 0);
}

#[tokio::test]
async fn players_are_found_by_id_and_by_their_latest_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = open(dir.path(), HistoryConfig::default());
    let find = |who| h.find_player(who);
    let name = |n: &str| PlayerRef::Name(n.into());

    h.record_login_at(1, "Ann", 1000);
    h.record_login_at(2, "Bob", 2000);
    flushed(&h).await;
    assert_eq!(find(PlayerRef::Id(1)).await, Ok(Some((1, "Ann".into()))));
    assert_eq!(find(name("Bob")).await, Ok(Some((2, "Bob".into()))));
    assert_eq!(find(PlayerRef::Id(99)).await, Ok(None));
    assert_eq!(find(name("ann")).await, Ok(None), "names match exactly");

    // Another player takes the name later: the newest login wins, until
    // the first logs in under it again.
    h.record_login_at(3, "Ann", 3000);
    flushed(&h).await;
    assert_eq!(find(name("Ann")).await, Ok(Some((3, "Ann".into()))));
    h.record_login_at(1, "Ann", 4000);
    flushed(&h).await;
    assert_eq!(find(name("Ann")).await, Ok(Some((1, "Ann".into()))));

    // A login updates the player's row instead of adding one.
    h.record_login_at(2, "Cid", 5000);
    flushed(&h).await;
    assert_eq!(find(PlayerRef::Id(2)).await, Ok(Some((2, "Cid".into()))));
    assert_eq!(find(name("Bob")).await, Ok(None));

    h.record_login(4, "Dan");
    flushed(&h).await;
    assert_eq!(find(name("Dan")).await, Ok(Some((4, "Dan".into()))));
    assert_eq!(h.stats().players_dropped, 0);
}

#[tokio::test]
async fn recent_nonces_are_the_senders_newest_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = open(dir.path(), HistoryConfig::default());
    let with_nonce = |m: StoredMsg, nonce| StoredMsg { nonce, ..m };
    append_all(
        &h,
        (1..=5).map(|id| {
            let nonce = if id % 2 == 1 { 100 + id } else { 0 };
            with_nonce(msg(Conversation::World, id), nonce)
        }),
    )
    .await;
    append_all(
        &h,
        [with_nonce(
            StoredMsg {
                sender_id: 43,
                ..msg(Conversation::World, 6)
            },
            900,
        )],
    )
    .await;
    // An offline whisper counts; one in both tables counts once.
    store(&h, 7, with_nonce(whisper(42, 7, 7), 500))
        .await
        .expect("stored");
    let both = with_nonce(whisper(42, 8, 8), 600);
    append_all(&h, [both.clone()]).await;
    store(&h, 8, both).await.expect("stored");

    assert_eq!(
        h.recent_nonces(42, 10).await,
        Ok(vec![(600, 8), (500, 7), (105, 5), (103, 3), (101, 1)])
    );
    assert_eq!(h.recent_nonces(42, 2).await, Ok(vec![(600, 8), (500, 7)]));
    assert_eq!(h.recent_nonces(43, 10).await, Ok(vec![(900, 6)]));
    assert_eq!(h.recent_nonces(44, 10).await, Ok(vec![]));
    // The nonce reads back with the message.
    let (page, _) = h.page(Conversation::World, 0, 1).await.expect("page");
    assert_eq!(page[0].nonce, 900);
    assert_eq!(pending(&h, 7).await[0].nonce, 500);
}

/// The schema as schema version 1 shipped it, to build an old database.
pub(super) const SCHEMA_V1: &str = "
CREATE TABLE messages (
    conv_kind INTEGER NOT NULL, conv_id INTEGER NOT NULL, conv_id2 INTEGER NOT NULL,
    msg_id INTEGER NOT NULL, chattype INTEGER NOT NULL, sender_id INTEGER NOT NULL,
    sender_name TEXT NOT NULL, text TEXT NOT NULL, time_ms INTEGER NOT NULL,
    guild_id INTEGER NOT NULL, team_id INTEGER NOT NULL, scene_id INTEGER NOT NULL,
    target_id INTEGER NOT NULL, target_name TEXT NOT NULL,
    PRIMARY KEY (conv_kind, conv_id, conv_id2, msg_id)
) WITHOUT ROWID;
CREATE INDEX messages_by_age ON messages (conv_kind, time_ms);
CREATE TABLE offline (
    to_user INTEGER NOT NULL, msg_id INTEGER NOT NULL, conv_kind INTEGER NOT NULL,
    conv_id INTEGER NOT NULL, conv_id2 INTEGER NOT NULL, chattype INTEGER NOT NULL,
    sender_id INTEGER NOT NULL, sender_name TEXT NOT NULL, text TEXT NOT NULL,
    time_ms INTEGER NOT NULL, guild_id INTEGER NOT NULL, team_id INTEGER NOT NULL,
    scene_id INTEGER NOT NULL, target_id INTEGER NOT NULL, target_name TEXT NOT NULL,
    PRIMARY KEY (to_user, msg_id)
) WITHOUT ROWID;
CREATE TABLE meta (key TEXT PRIMARY KEY NOT NULL, value INTEGER NOT NULL) WITHOUT ROWID;
PRAGMA user_version = 1;
";

#[tokio::test]
async fn a_version_1_database_is_upgraded_in_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(sqlite::FILE_NAME);
    let time = now_ms();
    {
        let conn = rusqlite::Connection::open(&path).expect("create v1");
        conn.execute_batch(SCHEMA_V1).expect("v1 schema");
        // Guild 5, msg 3; a whisper 42 -> 7, msg 4; high water 4.
        conn.execute(
            "INSERT INTO messages VALUES (3, 5, 0, 3, 3, 42, 'Ann', 'old line', ?1,
                                          5, 0, 0, 0, '')",
            [time as i64],
        )
        .expect("v1 message");
        conn.execute(
            "INSERT INTO offline VALUES (7, 4, 6, 7, 42, 3, 42, 'Ann', 'old whisper', ?1,
                                         0, 0, 0, 7, 'Bob')",
            [time as i64],
        )
        .expect("v1 whisper");
        conn.execute("INSERT INTO meta VALUES ('high_water', 4)", [])
            .expect("v1 meta");
    }

    let (h, high_water, _) =
        HistoryHandle::open(dir.path(), HistoryConfig::default()).expect("open v1");
    assert_eq!(high_water, 4);
    let (page, _) = h.page(Conversation::Guild(5), 0, 10).await.expect("page");
    assert_eq!(ids(&page), [3]);
    assert_eq!((page[0].text.as_str(), page[0].nonce), ("old line", 0));
    let waiting = pending(&h, 7).await;
    assert_eq!(ids(&waiting), [4]);
    assert_eq!(waiting[0].conversation, Conversation::between(42, 7));

    // Version 2 works on the upgraded file.
    append_all(
        &h,
        [StoredMsg {
            nonce: 77,
            ..msg(Conversation::Guild(5), 5)
        }],
    )
    .await;
    assert_eq!(h.recent_nonces(42, 5).await, Ok(vec![(77, 5)]));
    h.record_login(42, "Ann");
    flushed(&h).await;
    assert_eq!(
        h.find_player(PlayerRef::Id(42)).await,
        Ok(Some((42, "Ann".into())))
    );
    let conn = rusqlite::Connection::open(&path).expect("inspect");
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .expect("version");
    assert_eq!(version, sqlite::SCHEMA_VERSION);
    assert_eq!(version, 3);
}

#[tokio::test]
async fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let conn = rusqlite::Connection::open(dir.path().join(sqlite::FILE_NAME)).expect("create");
        conn.pragma_update(None, "user_version", 4)
            .expect("set version");
    }
    assert!(matches!(
        HistoryHandle::open(dir.path(), HistoryConfig::default()),
        Err(OpenError::TooNew { found: 4, .. })
    ));
}

#[cfg(unix)]
#[tokio::test]
async fn the_store_keeps_its_files_private() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("data").join("chat");
    let (h, _, threads) = HistoryHandle::open(&dir, HistoryConfig::default()).expect("open store");
    append_all(&h, [msg(Conversation::World, 1)]).await;
    let db = dir.join(sqlite::FILE_NAME);
    assert_eq!(mode(&root.path().join("data")), 0o700);
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&db), 0o600);
    for suffix in ["-wal", "-shm"] {
        let side = dir.join(format!("{}{suffix}", sqlite::FILE_NAME));
        assert_eq!(mode(&side), 0o600, "{}", side.display());
    }
    assert_eq!(sqlite::loose_mode(&db).expect("stat"), None);
    drop(h);
    assert!(joined(threads, Duration::from_secs(10)).await);

    // An existing database others can read still opens (with a warning);
    // its mode is reported, not changed.
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    assert_eq!(sqlite::loose_mode(&db).expect("stat"), Some(0o644));
    let h = open(&dir, HistoryConfig::default());
    let (page, _) = h.page(Conversation::World, 0, 10).await.expect("page");
    assert_eq!(ids(&page), [1]);
    assert_eq!(mode(&db), 0o644);
}
