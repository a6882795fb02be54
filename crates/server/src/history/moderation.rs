//! The game-master part of the store: sanctions (mutes and bans), token
//! revocations, blocks between players, the operators' audit log,
//! announcement idempotency keys, and the two message operations a game
//! master needs (recalling one line, reviewing one player's lines).
//!
//! It decides nothing: the caller says who is sanctioned until when, how
//! many blocks a player may have and what an operator did; this module only
//! makes those facts durable and reads them back. Its writes join the
//! writer's group commit and resolve after it; its reads go to the reader
//! thread, except [`HistoryHandle::pending_blocks`], which is answered in
//! queue order like [`HistoryHandle::pending_offline`]. A full writer queue
//! is `Err(Unavailable)` at once, as for every other write.

use std::sync::atomic::Ordering::Relaxed;

use tokio::sync::oneshot;

use super::reader::ReadCmd;
use super::sqlite::{ModWrite, Outcome, WriteOp};
use super::writer::{Command, QueuedRead, Responder, Write};
use super::{now_ms, ready, HistoryError, HistoryHandle, StoredMsg};

/// What a sanction stops a player from doing. Stored as a number (see
/// `sqlite`), so variants are only ever added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SanctionKind {
    /// May stay connected but not speak.
    Mute,
    /// May not log in.
    Ban,
}

/// One sanction in force. A player has at most one of each kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sanction {
    pub user: u64,
    pub kind: SanctionKind,
    /// When it ends (Unix ms). Anything from 2^63 on means "never" and
    /// reads back as `u64::MAX`.
    pub until_ms: u64,
    pub reason: String,
    /// When it was last set (Unix ms).
    pub set_ms: u64,
}

/// What the store holds for moderation at start-up, to fill the server's
/// in-memory caches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Moderation {
    /// Every sanction still in force, by user then kind.
    pub sanctions: Vec<Sanction>,
    /// `(user, before_s)`: that player's tokens issued before `before_s`
    /// (Unix seconds) are revoked. By user.
    pub revocations: Vec<(u64, u64)>,
}

/// What [`HistoryHandle::block`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockOutcome {
    /// The block was stored.
    Added,
    /// That player was already blocked; nothing changed.
    Already,
    /// The player already has `cap` blocks; nothing changed.
    Full,
}

/// One operator action, as the audit log keeps it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AuditEntry {
    /// Assigned by the store; ignored by [`HistoryHandle::audit`].
    pub id: u64,
    pub time_ms: u64,
    /// Which operator key acted (its id, never the secret).
    pub key_id: String,
    pub action: String,
    pub target: String,
    pub reason: String,
    pub result: String,
}

impl HistoryHandle {
    /// Sets `user`'s sanction of `kind` until `until_ms` (Unix ms),
    /// replacing one already set. Resolves once committed.
    pub async fn set_sanction(
        &self,
        user: u64,
        kind: SanctionKind,
        until_ms: u64,
        reason: String,
    ) -> Result<(), HistoryError> {
        let op = ModWrite::SetSanction {
            user,
            kind,
            until_ms,
            reason,
            set_ms: now_ms(),
        };
        self.write(WriteOp::Moderation(op)).await
    }

    /// Lifts `user`'s sanction of `kind`. `true` if there was one (expired
    /// or not, until the prune deletes it).
    pub async fn clear_sanction(
        &self,
        user: u64,
        kind: SanctionKind,
    ) -> Result<bool, HistoryError> {
        self.write_outcome(
            ModWrite::ClearSanction { user, kind },
            Outcome::into_removed,
        )
        .await
    }

    /// Every sanction still in force (`until_ms` later than now), by user
    /// then kind. Reads the committed state.
    pub async fn sanctions(&self) -> Result<Vec<Sanction>, HistoryError> {
        Ok(self.load_moderation().await?.sanctions)
    }

    /// The sanctions still in force and every token revocation, read in one
    /// snapshot: what the server loads into memory at start-up.
    pub async fn load_moderation(&self) -> Result<Moderation, HistoryError> {
        let (respond_to, rx) = oneshot::channel();
        self.read(ReadCmd::Moderation {
            now_ms: now_ms(),
            respond_to,
        })
        .await?;
        rx.await.map_err(|_| HistoryError::Unavailable)?
    }

    /// Revokes `user`'s tokens issued before `before_s` (Unix seconds). An
    /// earlier revocation with a later `before_s` is kept: a revocation is
    /// never narrowed.
    pub async fn revoke_tokens(&self, user: u64, before_s: u64) -> Result<(), HistoryError> {
        self.write(WriteOp::Moderation(ModWrite::RevokeTokens {
            user,
            before_s,
        }))
        .await
    }

    /// `user` blocks `blocked`, unless that is already so or `user` already
    /// has `cap` blocks. The count and the insert run in the block's own
    /// step of the batch transaction, so blocks queued together are counted
    /// one after another and the cap holds exactly.
    pub async fn block(
        &self,
        user: u64,
        blocked: u64,
        cap: usize,
    ) -> Result<BlockOutcome, HistoryError> {
        self.shared
            .blockers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(user);
        let op = ModWrite::Block {
            user,
            blocked,
            since_ms: now_ms(),
            cap,
        };
        self.write_outcome(op, Outcome::into_block).await
    }

    /// `user` no longer blocks `blocked`; `true` if they did.
    pub async fn unblock(&self, user: u64, blocked: u64) -> Result<bool, HistoryError> {
        self.write_outcome(ModWrite::Unblock { user, blocked }, Outcome::into_removed)
            .await
    }

    /// Who `user` has blocked, in increasing id order: one range scan of
    /// the primary key, cheap enough for every login. Reads the committed
    /// state; use [`pending_blocks`](Self::pending_blocks) to see blocks
    /// still queued.
    pub async fn blocks(&self, user: u64) -> Result<Vec<u64>, HistoryError> {
        let (respond_to, rx) = oneshot::channel();
        self.read(ReadCmd::Blocks { user, respond_to }).await?;
        rx.await.map_err(|_| HistoryError::Unavailable)?
    }

    /// Who `user` has blocked, in increasing id order, read by the writer
    /// in queue order: answered once every write queued before it has
    /// committed, so it sees every [`block`](Self::block) and
    /// [`unblock`](Self::unblock) queued before it, and none queued after.
    /// This read is queued when called; those writes, being `async`, when
    /// first polled.
    ///
    /// Never waits: a full queue resolves at once with `Unavailable`.
    pub fn pending_blocks(&self, user: u64) -> oneshot::Receiver<Result<Vec<u64>, HistoryError>> {
        let (respond_to, rx) = oneshot::channel();
        match self.send(Command::Read(QueuedRead::Blocks { user, respond_to })) {
            Ok(()) => rx,
            Err(e) => ready(Err(e)),
        }
    }

    /// Appends `entry` to the audit log (its `id` is ignored) and returns
    /// the id it was given, once committed. Ids increase and are never
    /// reused.
    pub async fn audit(&self, entry: AuditEntry) -> Result<u64, HistoryError> {
        self.write_outcome(ModWrite::Audit(entry), Outcome::into_id)
            .await
    }

    /// Keyset paging over the audit log: entries with id < `before_id` (0
    /// means "from the newest"), newest first, at most
    /// `min(limit, max_page)` (a `limit` of 0 asks for `max_page`).
    pub async fn audit_page(
        &self,
        before_id: u64,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, HistoryError> {
        let (respond_to, rx) = oneshot::channel();
        self.read(ReadCmd::AuditPage {
            before: before_id,
            limit: self.page_limit(limit),
            respond_to,
        })
        .await?;
        rx.await.map_err(|_| HistoryError::Unavailable)?
    }

    /// The msg_id of an announcement that claimed `key` less than 24 hours
    /// before `now_ms`, if any (read-only; see [`HistoryHandle::announce_key`]).
    pub async fn announce_seen(
        &self,
        key: String,
        now_ms: u64,
    ) -> Result<Option<u64>, HistoryError> {
        let (respond_to, rx) = oneshot::channel();
        self.read(ReadCmd::AnnounceSeen {
            key,
            now_ms,
            respond_to,
        })
        .await?;
        rx.await.map_err(|_| HistoryError::Unavailable)?
    }

    /// Claims idempotency `key` for the announcement `msg_id` at `now_ms`
    /// and returns the msg_id that owns it: `msg_id` if the key is new, or
    /// last used 24 hours or more before `now_ms` (the old claim is
    /// replaced); otherwise the msg_id of the first claim, whose
    /// announcement the caller must not make again. The check and the
    /// claim are one step of the writer's transaction.
    pub async fn announce_key(
        &self,
        key: String,
        msg_id: u64,
        now_ms: u64,
    ) -> Result<u64, HistoryError> {
        // A client may see this id even if the announcement is never
        // stored, so it counts toward the high-water mark.
        self.shared.high_seen.fetch_max(msg_id, Relaxed);
        let op = ModWrite::AnnounceKey {
            key,
            msg_id,
            now_ms,
        };
        self.write_outcome(op, Outcome::into_id).await
    }

    /// Recalls message `msg_id`: deletes it from history and from every
    /// offline inbox it waits in, and returns the deleted row (the history
    /// copy if there was one, else an offline copy), so the caller knows
    /// which conversation and players to tell. `None` if it was stored
    /// nowhere.
    pub async fn remove_message(&self, msg_id: u64) -> Result<Option<StoredMsg>, HistoryError> {
        // The file's copy goes too: its offline whispers, and any line kept
        // there before the database was configured.
        let local = self
            .write_outcome(ModWrite::RemoveMessage { msg_id }, Outcome::into_message)
            .await?;
        match &self.lines {
            Some(lines) => Ok(lines.remove(msg_id).await?.or(local)),
            None => Ok(local),
        }
    }

    /// The line `msg_id` in the database the nodes share (`history.url`),
    /// left in place; `None` if it is not there or there is no such
    /// database. A cluster's recall reads it first and deletes it only once
    /// every node has told its players, so that a retry after a node did
    /// not answer still knows whom to tell.
    pub async fn find_shared_line(&self, msg_id: u64) -> Result<Option<StoredMsg>, HistoryError> {
        match &self.lines {
            Some(lines) => lines.find(msg_id).await,
            None => Ok(None),
        }
    }

    /// `user`'s own history messages with `time_ms >= since_ms`, newest
    /// first, at most `min(limit, max_page)` (0 asks for `max_page`): what
    /// a game master reviews after a report. Offline whispers that are not
    /// also history are not included.
    pub async fn messages_by_sender(
        &self,
        user: u64,
        since_ms: u64,
        limit: u32,
    ) -> Result<Vec<StoredMsg>, HistoryError> {
        if let Some(lines) = &self.lines {
            return lines
                .by_sender(user, since_ms, self.page_limit(limit))
                .await;
        }
        let (respond_to, rx) = oneshot::channel();
        self.read(ReadCmd::MessagesBySender {
            sender: user,
            since_ms,
            limit: self.page_limit(limit),
            respond_to,
        })
        .await?;
        rx.await.map_err(|_| HistoryError::Unavailable)?
    }

    /// Queues `op`, waits for its commit and takes its outcome apart.
    async fn write_outcome<T>(
        &self,
        op: ModWrite,
        take: fn(Outcome) -> Option<T>,
    ) -> Result<T, HistoryError> {
        let (respond_to, rx) = oneshot::channel();
        self.send(Command::Write(Write {
            op: WriteOp::Moderation(op),
            respond_to: Some(Responder::Outcome(respond_to)),
        }))?;
        let outcome = rx.await.map_err(|_| HistoryError::Unavailable)??;
        // Each op is answered with its own kind of outcome (the tests call
        // every one); a mismatch would be a bug here, reported as a failed
        // write rather than a panic in the caller's task.
        take(outcome).ok_or(HistoryError::WriteFailed)
    }
}
