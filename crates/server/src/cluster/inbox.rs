//! The offline inbox of a cluster: whispers waiting for players who have
//! no session anywhere, in the JetStream stream `GC_INBOX`, one subject per
//! player (`gc.inbox.<user>`), so any node a player logs in on finds them.
//! Owns the inbox's format and its reads and deletes; never decides whether
//! a whisper goes there (the world does).
//!
//! JetStream enforces the inbox cap itself: at most `max_offline_whispers`
//! per subject, and a publish past it is refused (`DiscardNew` per
//! subject), which the sender hears as `RES_INBOX_FULL`. Entries older
//! than `offline_ttl_days` expire with the stream's age limit.
//!
//! The sender's cap works the same way in a second stream, `GC_SENDERS`:
//! a whisper first takes a place on its sender's subject
//! (`gc.sent.<user>`, at most `max_offline_per_sender`, refused past it
//! as `RES_SENDER_LIMIT`), and its inbox entry names that place, which is
//! given back when the whisper is delivered or refused by the inbox. A
//! place expires with its whisper (after 30 days when whispers never
//! expire), so one whose release was lost comes back in the end.

use std::time::Duration;

use async_nats::jetstream::{consumer, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use guildchat_protocol::pb;
use tokio::sync::oneshot;
use tracing::{debug, warn};

use super::{Cluster, ClusterError};
use crate::history::{Conversation, HistoryConfig, HistoryError, StoredMsg, Waiting};
use crate::ids::UserId;
use crate::records;

/// The stream of offline whispers.
pub const INBOX_STREAM: &str = "GC_INBOX";
const PREFIX: &str = "gc.inbox";
/// The stream of places each sender holds in the inboxes.
pub const SENDERS_STREAM: &str = "GC_SENDERS";
const SENT_PREFIX: &str = "gc.sent";
/// How long a login's read of its inbox may take.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a start may spend moving the whispers of its own store into
/// the shared inbox.
const ADOPT_TIMEOUT: Duration = Duration::from_secs(30);

/// One waiting whisper.
#[derive(Clone, PartialEq, prost::Message)]
struct InboxMsg {
    /// The whisper as its target gets it, msg_id included.
    #[prost(message, optional, tag = "1")]
    notify: Option<pb::ChatMessageNotifyChat>,
    #[prost(uint64, tag = "2")]
    nonce: u64,
    /// The sender's place in `GC_SENDERS`; 0 for none.
    #[prost(uint64, tag = "3")]
    sent_seq: u64,
    /// A connection of the target's session was sent it (see
    /// [`Waiting::shown`]).
    #[prost(bool, tag = "4")]
    shown: bool,
}

pub(super) fn config(history: &HistoryConfig) -> stream::Config {
    let days = u64::from(history.offline_ttl_days);
    stream::Config {
        name: INBOX_STREAM.into(),
        subjects: vec![format!("{PREFIX}.>")],
        storage: stream::StorageType::File,
        max_messages_per_subject: i64::from(history.max_offline_whispers),
        discard: stream::DiscardPolicy::New,
        discard_new_per_subject: true,
        // 0 keeps them until they are read.
        max_age: Duration::from_secs(days.saturating_mul(86_400)),
        max_consumers: super::MAX_READERS,
        ..Default::default()
    }
}

/// How long a sender's place lasts when whispers never expire: a place
/// whose release was lost (a reply cut off by an outage) must come back
/// some day.
const PLACE_AGE_WITHOUT_TTL: Duration = Duration::from_secs(30 * 86_400);

/// The senders' stream: `max_offline_per_sender` places per sender, which
/// expire with the inbox's age limit (or after 30 days without one).
pub(super) fn senders_config(history: &HistoryConfig) -> stream::Config {
    let inbox = config(history);
    let max_age = match inbox.max_age {
        Duration::ZERO => PLACE_AGE_WITHOUT_TTL,
        age => age,
    };
    stream::Config {
        name: SENDERS_STREAM.into(),
        subjects: vec![format!("{SENT_PREFIX}.>")],
        max_messages_per_subject: i64::from(history.max_offline_per_sender),
        max_age,
        ..inbox
    }
}

fn subject(user: UserId) -> String {
    format!("{PREFIX}.{user}")
}

fn sent_subject(sender: u64) -> String {
    format!("{SENT_PREFIX}.{sender}")
}

/// Why a publish towards `to`'s inbox was refused: `capped` when a
/// stream's per-subject cap refused it, otherwise the store is out of
/// reach (logged).
fn refusal(to: UserId, why: &str, capped: HistoryError) -> HistoryError {
    if why.contains("maximum messages per subject") {
        capped
    } else {
        warn!(%to, error = %why, "an offline whisper was not stored");
        HistoryError::Unavailable
    }
}

impl Cluster {
    /// Keeps a whisper for `to`'s next login on any node, in a place of
    /// its sender's; resolves once JetStream has stored it (or refused
    /// it: a full inbox, or a sender with all its places taken).
    pub fn store_offline(
        &self,
        to: UserId,
        msg: &StoredMsg,
    ) -> oneshot::Receiver<Result<(), HistoryError>> {
        let (tx, rx) = oneshot::channel();
        let notify = records::notification(msg);
        let nonce = msg.nonce;
        let cluster = self.clone();
        // The sender's place first: the whisper goes in only with one.
        self.publish_raw(
            sent_subject(msg.sender_id),
            Bytes::new(),
            None,
            Box::new(move |place| match place {
                Ok(sent_seq) => {
                    let entry = InboxMsg {
                        notify: Some(notify),
                        nonce,
                        sent_seq,
                        shown: false,
                    };
                    cluster.put_inbox(to, entry, tx);
                }
                Err(why) => {
                    let _ = tx.send(Err(refusal(to, &why, HistoryError::SenderLimit)));
                }
            }),
        );
        rx
    }

    /// Keeps a whisper whose sender was answered long ago (a session's
    /// unconfirmed whispers, or one sent to a node that died) for `to`'s
    /// next login, outside its sender's places: the sender's cap is for
    /// what a sender may still send. `shown`: a connection of `to`'s
    /// session was sent it.
    pub fn spill_offline(
        &self,
        to: UserId,
        msg: &StoredMsg,
        shown: bool,
    ) -> oneshot::Receiver<Result<(), HistoryError>> {
        let (tx, rx) = oneshot::channel();
        let entry = InboxMsg {
            notify: Some(records::notification(msg)),
            nonce: msg.nonce,
            sent_seq: 0,
            shown,
        };
        self.put_inbox(to, entry, tx);
        rx
    }

    fn put_inbox(
        &self,
        to: UserId,
        entry: InboxMsg,
        tx: oneshot::Sender<Result<(), HistoryError>>,
    ) {
        let sent_seq = entry.sent_seq;
        let payload = prost::Message::encode_to_vec(&entry);
        let releaser = self.clone();
        self.publish_raw(
            subject(to),
            Bytes::from(payload),
            None,
            Box::new(move |result| {
                let result = result
                    .map(|_| ())
                    .map_err(|why| refusal(to, &why, HistoryError::InboxFull));
                // Refused, so the place is given back. A refusal that was
                // stored after all (the link dropped as it went) keeps its
                // whisper and frees its place early: its sender may then
                // have one more waiting than the cap.
                if result.is_err() && sent_seq != 0 {
                    releaser.release_places(vec![sent_seq]);
                }
                let _ = tx.send(result);
            }),
        );
    }

    /// Moves the whispers waiting in this node's own store (kept before it
    /// joined a cluster) into the shared inbox, where a login on any node
    /// finds them; each leaves the store only once the inbox has it. What
    /// cannot move (NATS away, a full inbox, past [`ADOPT_TIMEOUT`]) stays
    /// for the next start. Returns how many moved.
    pub async fn adopt_local_inbox(&self, history: &crate::history::HistoryHandle) -> usize {
        let mut moved = 0;
        let deadline = tokio::time::Instant::now() + ADOPT_TIMEOUT;
        for user in history.offline_users() {
            // Gone, or too long: the rest wait for the next start.
            if !self.connected() || tokio::time::Instant::now() >= deadline {
                warn!("some whispers from before the cluster stay in this node's store until its next start");
                break;
            }
            let waiting = match history.pending_offline(user).await {
                Ok(Ok(waiting)) => waiting,
                _ => continue,
            };
            // A player's whispers side by side, in their order; their
            // senders were answered long ago, so no place is taken.
            let stored: Vec<_> = waiting
                .iter()
                .map(|msg| (msg.msg_id, self.spill_offline(UserId(user), msg, false)))
                .collect();
            let mut done = Vec::with_capacity(stored.len());
            for (msg_id, rx) in stored {
                match tokio::time::timeout_at(deadline, rx).await {
                    Ok(Ok(Ok(()))) => done.push(msg_id),
                    _ => {
                        debug!(%user, msg_id, "a whisper from before the cluster stays in this node's store")
                    }
                }
            }
            moved += done.len();
            if let Err(e) = history.ack_offline(user, done).await {
                // They are in both now: the next start moves them again,
                // and a client de-duplicates by msg_id.
                warn!(%user, error = %e, "whispers moved to the shared inbox are still in this node's store");
            }
        }
        moved
    }

    /// Gives senders' places back, in the background: a place that stays
    /// taken only narrows its sender's cap until it expires.
    fn release_places(&self, seqs: Vec<u64>) {
        let senders = self.inner.senders.clone();
        tokio::spawn(async move {
            for seq in seqs {
                if let Err(e) = senders.delete_message(seq).await {
                    debug!(seq, error = %e, "a sender's inbox place was not given back");
                }
            }
        });
    }

    /// The whispers waiting for `user`, oldest first, each keyed by the
    /// inbox sequence that deletes it once delivered. An empty inbox costs
    /// one direct read.
    pub async fn pending_offline(&self, user: UserId) -> Result<Vec<Waiting>, ClusterError> {
        let failed = |e: String| ClusterError::Setup {
            what: "offline inbox",
            why: e,
        };
        let read = async {
            let stream = &self.inner.inbox;
            if stream
                .get_last_raw_message_by_subject(&subject(user))
                .await
                .is_err()
            {
                // Nothing waiting (or nothing readable: the login goes on,
                // and the whispers stay for the next one).
                return Ok(Vec::new());
            }
            let consumer = stream
                .create_consumer(consumer::pull::OrderedConfig {
                    filter_subject: subject(user),
                    deliver_policy: consumer::DeliverPolicy::All,
                    ..Default::default()
                })
                .await
                .map_err(|e| failed(e.to_string()))?;
            let name = consumer.cached_info().name.clone();
            let read = async {
                let mut pending = consumer.cached_info().num_pending;
                let mut found = Vec::new();
                if pending == 0 {
                    return Ok(found);
                }
                let mut msgs = consumer
                    .messages()
                    .await
                    .map_err(|e| failed(e.to_string()))?;
                while pending > 0 {
                    let Some(msg) = msgs.next().await else { break };
                    let msg = msg.map_err(|e| failed(e.to_string()))?;
                    let Ok(info) = msg.info() else { continue };
                    pending = info.pending;
                    let seq = info.stream_sequence;
                    match <InboxMsg as prost::Message>::decode(msg.payload.as_ref()) {
                        Ok(InboxMsg {
                            notify: Some(n),
                            nonce,
                            shown,
                            ..
                        }) => {
                            let conversation = Conversation::between(n.senderid, n.targetid);
                            found.push(Waiting {
                                key: seq,
                                msg: records::stored(&n, conversation, nonce),
                                shown,
                            });
                        }
                        _ => debug!(%user, seq, "an inbox entry does not decode; skipped"),
                    }
                }
                Ok(found)
            };
            // Deleted however the read ended, a timed-out one included.
            let found = tokio::time::timeout(READ_TIMEOUT, read).await;
            super::drop_reader(stream, &name).await;
            found.map_err(|_| failed("timed out".into()))?
        };
        // Past the inner read's limit, so that its reader is deleted first.
        tokio::time::timeout(2 * READ_TIMEOUT, read)
            .await
            .map_err(|_| failed("timed out".into()))?
    }

    /// Deletes delivered whispers from the inbox by their sequences, and
    /// gives back the senders' places of those it deleted.
    pub async fn ack_offline(&self, seqs: Vec<u64>) -> Result<(), HistoryError> {
        let inbox = &self.inner.inbox;
        let work = async {
            let mut result = Ok(());
            for seq in seqs {
                // Read back for its place; one that cannot be read keeps
                // its place until it expires.
                let place = match inbox.get_raw_message(seq).await {
                    Ok(raw) => <InboxMsg as prost::Message>::decode(raw.payload.as_ref())
                        .map_or(0, |m| m.sent_seq),
                    Err(_) => 0,
                };
                match inbox.delete_message(seq).await {
                    // Given back at once: a later timeout loses no place.
                    Ok(_) if place != 0 => self.release_places(vec![place]),
                    Ok(_) => {}
                    Err(e) => {
                        debug!(seq, error = %e, "an inbox entry was not deleted");
                        result = Err(HistoryError::Unavailable);
                    }
                }
            }
            result
        };
        tokio::time::timeout(READ_TIMEOUT, work)
            .await
            .unwrap_or(Err(HistoryError::Unavailable))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The inbox's cap and age limit are JetStream's own limits on the
    /// stream, taken from the history settings.
    #[test]
    fn the_inbox_stream_enforces_the_cap_and_the_age_limit() {
        let history = HistoryConfig {
            max_offline_whispers: 7,
            offline_ttl_days: 3,
            ..Default::default()
        };
        let c = config(&history);
        assert_eq!(c.max_messages_per_subject, 7);
        assert_eq!(c.discard, stream::DiscardPolicy::New);
        assert!(c.discard_new_per_subject);
        assert_eq!(c.max_age, Duration::from_secs(3 * 86_400));
        assert_eq!(c.subjects, ["gc.inbox.>"]);
        // 0 days: kept until read.
        let forever = config(&HistoryConfig {
            offline_ttl_days: 0,
            ..Default::default()
        });
        assert_eq!(forever.max_age, Duration::ZERO);
    }

    /// The senders' cap is a per-subject limit too, refusing past it, with
    /// the inbox's age limit.
    #[test]
    fn the_senders_stream_enforces_the_senders_cap() {
        let history = HistoryConfig {
            max_offline_per_sender: 4,
            offline_ttl_days: 3,
            ..Default::default()
        };
        let c = senders_config(&history);
        assert_eq!(c.name, SENDERS_STREAM);
        assert_eq!(c.subjects, ["gc.sent.>"]);
        assert_eq!(c.max_messages_per_subject, 4);
        assert_eq!(c.discard, stream::DiscardPolicy::New);
        assert!(c.discard_new_per_subject);
        assert_eq!(c.max_age, Duration::from_secs(3 * 86_400));
        // Whispers kept until read: places still expire.
        let forever = senders_config(&HistoryConfig {
            offline_ttl_days: 0,
            ..Default::default()
        });
        assert_eq!(forever.max_age, PLACE_AGE_WITHOUT_TTL);
    }
}
