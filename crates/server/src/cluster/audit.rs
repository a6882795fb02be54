//! The audit log shared by every node: the JetStream stream `GC_AUDIT`,
//! subject `gc.audit.<node>`, one JSON entry per admin action, whose
//! stream sequence is its id. Owns that format, the writes and the paged
//! reads; it never decides what is audited (the admin API does).
//!
//! Each node also keeps its own entries in its own store, as it does
//! alone, so an action taken while NATS is away is still recorded there;
//! the shared log is what `GET /v1/audit` reads in a cluster.

use std::time::Duration;

use async_nats::jetstream::stream;
use serde::{Deserialize, Serialize};
use tracing::debug;

use super::{Cluster, ClusterError};
use crate::history::AuditEntry;

/// The stream of every node's admin actions.
pub const AUDIT_STREAM: &str = "GC_AUDIT";
const PREFIX: &str = "gc.audit";

/// Entries kept; past it the oldest go first.
const MAX_ENTRIES: i64 = 1_000_000;

/// How long a write or a page read may take.
const AUDIT_TIMEOUT: Duration = Duration::from_secs(5);

/// One admin action, as the shared log holds it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SharedEntry {
    /// The node whose admin API took the action.
    pub node: String,
    pub time_ms: u64,
    pub key_id: String,
    pub action: String,
    pub target: String,
    pub reason: String,
    pub result: String,
}

pub(super) fn config() -> stream::Config {
    stream::Config {
        name: AUDIT_STREAM.into(),
        subjects: vec![format!("{PREFIX}.>")],
        storage: stream::StorageType::File,
        max_messages: MAX_ENTRIES,
        discard: stream::DiscardPolicy::Old,
        ..Default::default()
    }
}

fn failed(e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Directory(e.to_string())
}

impl Cluster {
    /// Appends an action to the shared log; its id once stored.
    pub async fn audit(&self, e: &AuditEntry) -> Result<u64, ClusterError> {
        if !self.connected() {
            return Err(failed("NATS is away"));
        }
        let entry = SharedEntry {
            node: self.inner.node.0.to_string(),
            time_ms: e.time_ms,
            key_id: e.key_id.clone(),
            action: e.action.clone(),
            target: e.target.clone(),
            reason: e.reason.clone(),
            result: e.result.clone(),
        };
        let payload = serde_json::to_vec(&entry).map_err(failed)?;
        let subject = format!("{PREFIX}.{}", self.inner.node);
        let stored = async {
            let ack = self
                .inner
                .js
                .publish(subject, payload.into())
                .await
                .map_err(failed)?;
            ack.await.map(|a| a.sequence).map_err(failed)
        };
        tokio::time::timeout(AUDIT_TIMEOUT, stored)
            .await
            .unwrap_or_else(|_| Err(failed("the shared audit log did not answer in time")))
    }

    /// Up to `limit` entries with an id below `before` (0: the newest),
    /// newest first, with their ids.
    pub async fn audit_page(
        &self,
        before: u64,
        limit: u32,
    ) -> Result<Vec<(u64, SharedEntry)>, ClusterError> {
        if !self.connected() {
            return Err(failed("NATS is away"));
        }
        let read = async {
            let info = self.inner.audit.get_info().await.map_err(failed)?;
            let (first, last) = (info.state.first_sequence, info.state.last_sequence);
            let top = match before {
                0 => last,
                b => last.min(b - 1),
            };
            if top == 0 || top < first {
                return Ok(Vec::new());
            }
            let bottom = top
                .saturating_sub(u64::from(limit).saturating_sub(1))
                .max(first);
            let reads = (bottom..=top)
                .rev()
                .map(|seq| async move { (seq, self.inner.audit.get_raw_message(seq).await) });
            let mut out = Vec::new();
            for (seq, got) in futures_util::future::join_all(reads).await {
                let msg = match got {
                    Ok(msg) => msg,
                    // A gap (an entry aged out as the page was read).
                    Err(e) if e.kind() == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound => {
                        continue
                    }
                    Err(e) => return Err(failed(e)),
                };
                match serde_json::from_slice::<SharedEntry>(&msg.payload) {
                    Ok(entry) => out.push((seq, entry)),
                    Err(e) => debug!(seq, error = %e, "an audit entry does not parse; skipped"),
                }
            }
            Ok(out)
        };
        tokio::time::timeout(AUDIT_TIMEOUT, read)
            .await
            .unwrap_or_else(|_| Err(failed("reading the shared audit log timed out")))
    }
}
