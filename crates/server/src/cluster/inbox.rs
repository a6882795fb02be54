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

use std::time::Duration;

use async_nats::jetstream::{consumer, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use guildchat_protocol::pb;
use tokio::sync::oneshot;
use tracing::{debug, warn};

use super::{Cluster, ClusterError};
use crate::history::{Conversation, HistoryConfig, HistoryError, StoredMsg};
use crate::ids::UserId;
use crate::records;

/// The stream of offline whispers.
pub const INBOX_STREAM: &str = "GC_INBOX";
const PREFIX: &str = "gc.inbox";
/// How long a login's read of its inbox may take.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// One waiting whisper.
#[derive(Clone, PartialEq, prost::Message)]
struct InboxMsg {
    /// The whisper as its target gets it, msg_id included.
    #[prost(message, optional, tag = "1")]
    notify: Option<pb::ChatMessageNotifyChat>,
    #[prost(uint64, tag = "2")]
    nonce: u64,
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
        ..Default::default()
    }
}

fn subject(user: UserId) -> String {
    format!("{PREFIX}.{user}")
}

impl Cluster {
    /// Keeps a whisper for `to`'s next login on any node; resolves once
    /// JetStream has stored it (or refused it: a full inbox).
    pub fn store_offline(
        &self,
        to: UserId,
        msg: &StoredMsg,
    ) -> oneshot::Receiver<Result<(), HistoryError>> {
        let (tx, rx) = oneshot::channel();
        let payload = prost::Message::encode_to_vec(&InboxMsg {
            notify: Some(records::notification(msg)),
            nonce: msg.nonce,
        });
        self.publish_raw(
            subject(to),
            Bytes::from(payload),
            None,
            Box::new(move |result| {
                let result = result.map(|_| ()).map_err(|why| {
                    if why.contains("maximum messages per subject") {
                        HistoryError::InboxFull
                    } else {
                        warn!(%to, error = %why, "an offline whisper was not stored");
                        HistoryError::Unavailable
                    }
                });
                let _ = tx.send(result);
            }),
        );
        rx
    }

    /// The whispers waiting for `user`, oldest first, with the inbox
    /// sequence that deletes each once delivered. An empty inbox costs one
    /// direct read.
    pub async fn pending_offline(
        &self,
        user: UserId,
    ) -> Result<Vec<(u64, StoredMsg)>, ClusterError> {
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
                    }) => {
                        let conversation = Conversation::between(n.senderid, n.targetid);
                        found.push((seq, records::stored(&n, conversation, nonce)));
                    }
                    _ => debug!(%user, seq, "an inbox entry does not decode; skipped"),
                }
            }
            Ok(found)
        };
        tokio::time::timeout(READ_TIMEOUT, read)
            .await
            .map_err(|_| failed("timed out".into()))?
    }

    /// Deletes delivered whispers from the inbox by their sequences.
    pub async fn ack_offline(&self, seqs: Vec<u64>) -> Result<(), HistoryError> {
        let mut result = Ok(());
        for seq in seqs {
            if let Err(e) = self.inner.inbox.delete_message(seq).await {
                debug!(seq, error = %e, "an inbox entry was not deleted");
                result = Err(HistoryError::Unavailable);
            }
        }
        result
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
}
