//! The reader thread: history pages, player look-ups, recent nonces, and
//! the game-master reads (moderation state, block lists, the audit log, a
//! player's own messages).
//!
//! It owns a second, read-only connection. Under WAL a reader sees the last
//! committed state and neither waits for nor delays the writer, so a player
//! scrolling back never holds up the commits that acknowledge everyone's
//! chat, and a page is never stuck behind a batch's fsync. Because a write's
//! future resolves only after its commit, a read issued after it resolved
//! always sees it; a read racing a write still in flight may not, which is
//! why offline whispers are read by the writer instead. This thread never
//! writes and never runs on the async runtime.

use std::sync::{Arc, Weak};
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use super::moderation::{AuditEntry, Moderation};
use super::sqlite::Db;
use super::{supervise, Conversation, HistoryError, PlayerRef, Shared, StoredMsg};

/// Capacity of the reader's queue. Reads are player requests, already
/// rate-limited upstream; when the queue is full a caller waits for room,
/// which slows only the requesting player's actor.
pub(super) const READ_QUEUE: usize = 256;

/// A page of history and whether older messages remain.
type Page = (Vec<StoredMsg>, bool);

pub(super) enum ReadCmd {
    Page {
        conv: Conversation,
        before: u64,
        limit: u32,
        respond_to: oneshot::Sender<Result<Page, HistoryError>>,
    },
    FindPlayer {
        who: PlayerRef,
        respond_to: oneshot::Sender<Result<Option<(u64, String)>, HistoryError>>,
    },
    RecentNonces {
        sender: u64,
        limit: u32,
        respond_to: oneshot::Sender<Result<Vec<(u64, u64)>, HistoryError>>,
    },
    /// Sanctions in force at `now_ms`, and every revocation.
    Moderation {
        now_ms: u64,
        respond_to: oneshot::Sender<Result<Moderation, HistoryError>>,
    },
    Blocks {
        user: u64,
        respond_to: oneshot::Sender<Result<Vec<u64>, HistoryError>>,
    },
    AuditPage {
        before: u64,
        limit: u32,
        respond_to: oneshot::Sender<Result<Vec<AuditEntry>, HistoryError>>,
    },
    AnnounceSeen {
        key: String,
        now_ms: u64,
        respond_to: oneshot::Sender<Result<Option<u64>, HistoryError>>,
    },
    MessagesBySender {
        sender: u64,
        since_ms: u64,
        limit: u32,
        respond_to: oneshot::Sender<Result<Vec<StoredMsg>, HistoryError>>,
    },
}

/// Spawns the reader thread; it ends when every handle has dropped, and
/// `handles` tells its supervisor whether an end was that.
pub(super) fn spawn(
    db: Db,
    rx: mpsc::Receiver<ReadCmd>,
    shared: Arc<Shared>,
    handles: Weak<()>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("history-reader".into())
        .spawn(move || supervise("history-reader", &shared, &handles, move || run(db, rx)))
}

fn run(db: Db, mut rx: mpsc::Receiver<ReadCmd>) {
    debug!("history reader started");
    // `blocking_recv` is fine here: this is a plain OS thread, not a
    // runtime worker.
    while let Some(cmd) = rx.blocking_recv() {
        match cmd {
            ReadCmd::Page {
                conv,
                before,
                limit,
                respond_to,
            } => {
                let result = db.page(&conv, before, limit).map_err(|e| {
                    warn!(error = %e, ?conv, "history page read failed");
                    HistoryError::Unavailable
                });
                let _ = respond_to.send(result);
            }
            ReadCmd::FindPlayer { who, respond_to } => {
                let result = db.find_player(&who).map_err(|e| {
                    warn!(error = %e, ?who, "player look-up failed");
                    HistoryError::Unavailable
                });
                let _ = respond_to.send(result);
            }
            ReadCmd::RecentNonces {
                sender,
                limit,
                respond_to,
            } => {
                let result = db.recent_nonces(sender, limit).map_err(|e| {
                    warn!(error = %e, sender, "recent nonce read failed");
                    HistoryError::Unavailable
                });
                let _ = respond_to.send(result);
            }
            ReadCmd::Moderation { now_ms, respond_to } => {
                let result = db.moderation(now_ms).map_err(|e| {
                    warn!(error = %e, "moderation state read failed");
                    HistoryError::Unavailable
                });
                let _ = respond_to.send(result);
            }
            ReadCmd::Blocks { user, respond_to } => {
                let result = db.blocks(user).map_err(|e| {
                    warn!(error = %e, user, "block list read failed");
                    HistoryError::Unavailable
                });
                let _ = respond_to.send(result);
            }
            ReadCmd::AnnounceSeen {
                key,
                now_ms,
                respond_to,
            } => {
                let result = db.announce_seen(&key, now_ms).map_err(|e| {
                    warn!(error = %e, "announce key read failed");
                    HistoryError::Unavailable
                });
                let _ = respond_to.send(result);
            }
            ReadCmd::AuditPage {
                before,
                limit,
                respond_to,
            } => {
                let result = db.audit_page(before, limit).map_err(|e| {
                    warn!(error = %e, before, "audit log read failed");
                    HistoryError::Unavailable
                });
                let _ = respond_to.send(result);
            }
            ReadCmd::MessagesBySender {
                sender,
                since_ms,
                limit,
                respond_to,
            } => {
                let result = db.messages_by_sender(sender, since_ms, limit).map_err(|e| {
                    warn!(error = %e, sender, "sender's messages read failed");
                    HistoryError::Unavailable
                });
                let _ = respond_to.send(result);
            }
        }
    }
    debug!("history reader stopped");
}
