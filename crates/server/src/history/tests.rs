//! Tests of the store through its public handle, on a real SQLite file in a
//! temporary directory.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::oneshot;

use super::*;

fn now_ms() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    u64::try_from(since.as_millis()).expect("time fits in u64")
}

fn msg(conversation: Conversation, msg_id: u64) -> StoredMsg {
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

fn open(dir: &Path, config: HistoryConfig) -> HistoryHandle {
    HistoryHandle::open(dir, config).expect("open store").0
}

/// Appends every message, then waits for all of them: one burst.
async fn append_all(h: &HistoryHandle, msgs: impl IntoIterator<Item = StoredMsg>) {
    let waiters: Vec<_> = msgs
        .into_iter()
        .map(|m| h.append(m).expect("queue has room"))
        .collect();
    for w in waiters {
        w.await.expect("writer answered").expect("batch committed");
    }
}

fn ids(page: &[StoredMsg]) -> Vec<u64> {
    page.iter().map(|m| m.msg_id).collect()
}

/// Waits (without blocking the runtime) for the store's threads to end.
async fn joined(threads: HistoryThreads, within: Duration) -> bool {
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
async fn store(h: &HistoryHandle, to: u64, m: StoredMsg) -> Result<(), HistoryError> {
    h.store_offline(to, m)
        .await
        .unwrap_or(Err(HistoryError::Unavailable))
}

/// The whispers waiting for `user`.
async fn pending(h: &HistoryHandle, user: u64) -> Vec<StoredMsg> {
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
