//! The sensitive-word list shared by every node: the key-value bucket
//! `gc_words`, one key per word, `w.<hex of its normalised form>`, with the
//! word as first typed for its value; `seeded`, made once by the node that
//! seeds an empty bucket from its own list; and `mark.<node>`, which a node
//! writes after an edit to learn when its own filter has caught up. Owns
//! that format, the seeding and the watch that rebuilds this node's filter
//! from the bucket. It never decides what a word matches (the filter does)
//! or what an edit is (the admin API does).
//!
//! One key per word, not one value for the whole list: a list of 100,000
//! words does not fit in one NATS message, and edits of different words on
//! different nodes compose without a compare-and-set.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{Cluster, ClusterError};
use crate::filter::{Filter, FilterHandle, WordList, MAX_WORDS};

pub const WORDS_BUCKET: &str = "gc_words";

/// The key the seeding node makes.
const SEEDED: &str = "seeded";

/// Word writes in flight at once during an edit or the seeding.
const WRITES_AT_ONCE: usize = 64;

/// How long an edit waits for this node's filter to have it in force.
const APPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Entries the watch takes without rebuilding once caught up: a burst of
/// changes makes one rebuild, not one per word.
const BATCH: usize = 10_000;

/// A word's key, from its normalised form.
pub fn key(normalized: &str) -> String {
    let mut key = String::with_capacity(2 + normalized.len() * 2);
    key.push_str("w.");
    for b in normalized.bytes() {
        key.push_str(&format!("{b:02x}"));
    }
    key
}

fn dir(e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Directory(e.to_string())
}

impl Cluster {
    /// The keys of every word in the shared list.
    /// Refused at once while NATS is away, so an edit then changes nothing.
    pub async fn word_keys(&self) -> Result<BTreeSet<String>, ClusterError> {
        if !self.connected() {
            return Err(dir("NATS is away"));
        }
        let read = async {
            let mut keys = self.inner.words.keys().await.map_err(dir)?;
            let mut out = BTreeSet::new();
            while let Some(k) = keys.next().await {
                let k = k.map_err(dir)?;
                if k.starts_with("w.") {
                    out.insert(k);
                }
            }
            Ok(out)
        };
        tokio::time::timeout(APPLY_TIMEOUT, read)
            .await
            .unwrap_or_else(|_| Err(dir("reading the shared word list timed out")))
    }

    /// Writes an edit to the shared list (`puts`: key and word; `deletes`:
    /// keys) and waits until this node's filter has it in force, so that
    /// a reply lists what is filtered here. Other nodes follow as their
    /// watches see it.
    pub async fn edit_words(
        &self,
        puts: Vec<(String, String)>,
        deletes: Vec<String>,
    ) -> Result<(), ClusterError> {
        let kv = &self.inner.words;
        write_words(kv, puts).await?;
        futures_util::stream::iter(deletes)
            .map(|k| async move { kv.delete(k).await.map_err(dir) })
            .buffer_unordered(WRITES_AT_ONCE)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<Vec<()>, _>>()?;
        // The watch sees every key in bucket order: once it has passed
        // this node's mark, it has passed every write above.
        let mark = kv
            .put(format!("mark.{}", self.inner.node), Default::default())
            .await
            .map_err(dir)?;
        let mut applied = self.inner.words_applied.clone();
        let caught_up = tokio::time::timeout(APPLY_TIMEOUT, async {
            applied.wait_for(|r| *r >= mark).await.map(|_| ())
        })
        .await;
        match caught_up {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(dir("the word watch has stopped")),
            Err(_) => Err(dir(
                "the word list was stored, but this node has not applied it yet",
            )),
        }
    }
}

async fn write_words(kv: &kv::Store, puts: Vec<(String, String)>) -> Result<(), ClusterError> {
    futures_util::stream::iter(puts)
        .map(|(k, word)| async move { kv.put(k, word.into()).await.map_err(dir) })
        .buffer_unordered(WRITES_AT_ONCE)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<u64>, _>>()
        .map(|_| ())
}

/// Seeds a new cluster's list from this node's own (its word file), at
/// start-up, before the node serves anyone: while `seeded` is missing, the
/// node puts its words and then makes `seeded`. A node that stops half-way
/// leaves `seeded` missing, so the next node to start finishes the job
/// with its own file; nodes that start into a new cluster at the same
/// moment seed it with the union of their files.
pub(super) async fn seed(
    kv: &kv::Store,
    node: &crate::ids::NodeId,
    list: &WordList,
) -> Result<(), ClusterError> {
    if kv.get(SEEDED).await.map_err(dir)?.is_some() {
        return Ok(());
    }
    let puts: Vec<(String, String)> = list
        .normalized()
        .zip(list.words())
        .map(|(n, w)| (key(n), w.to_owned()))
        .collect();
    let n = puts.len();
    write_words(kv, puts).await?;
    match kv.create(SEEDED, node.0.to_string().into()).await {
        Ok(_) => info!(
            words = n,
            "seeded the shared word list from this node's file"
        ),
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
        Err(e) => return Err(dir(e)),
    }
    Ok(())
}

/// Keeps this node's filter equal to the bucket: every word first, then
/// each change. A node's own word file only seeds a new cluster ([`seed`]);
/// after that, the bucket is the list.
pub(super) async fn watch(
    mut watch: kv::Watch,
    filter: FilterHandle,
    data_dir: PathBuf,
    applied: watch::Sender<u64>,
) {
    let mut words: BTreeMap<String, String> = BTreeMap::new();
    let mut caught_up = false;
    // The first pass installs the bucket whatever it holds, an empty list
    // included: the node's file list must not outlive the join.
    let mut changed = true;
    let mut last = 0;
    loop {
        let Some(first) = watch.next().await else {
            break;
        };
        let mut taken = 0;
        let mut entry = Some(first);
        while let Some(e) = entry.take() {
            taken += 1;
            match e {
                Ok(e) => {
                    last = last.max(e.revision);
                    caught_up |= e.delta == 0 || e.seen_current;
                    if let Some(k) = e.key.strip_prefix("w.").map(|_| e.key.clone()) {
                        changed = true;
                        match e.operation {
                            kv::Operation::Put => {
                                words.insert(k, String::from_utf8_lossy(&e.value).into_owned());
                            }
                            _ => {
                                words.remove(&k);
                            }
                        }
                    }
                }
                Err(e) => {
                    warn!(error = %e, "word list watch failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            if caught_up && taken >= BATCH {
                break;
            }
            // What else is already here, without waiting.
            entry = watch.next().now_or_never().flatten();
        }
        if !caught_up {
            continue;
        }
        if changed {
            let list: Vec<String> = words.values().cloned().collect();
            let (filter, path) = (filter.clone(), crate::filter::path_in(&data_dir));
            let built = tokio::task::spawn_blocking(move || install(&filter, &path, list)).await;
            // Not in force: tried again with the next batch, and edits
            // waiting for it are not told it is.
            if !matches!(built, Ok(true)) {
                continue;
            }
            changed = false;
        }
        applied.send_replace(last);
    }
    debug!("word list feed ended");
}

/// Builds the filter from the bucket's words, puts it in force and keeps
/// it in the node's word file (a copy: a restart loads it and uses it
/// until its watch has caught up with the bucket). Whether it is in force.
fn install(filter: &FilterHandle, path: &std::path::Path, mut words: Vec<String>) -> bool {
    // Concurrent adds on several nodes can pass the limit together.
    if words.len() > MAX_WORDS {
        warn!(
            words = words.len(),
            "the shared word list is over the limit; the rest is ignored"
        );
        words.truncate(MAX_WORDS);
    }
    let built = WordList::from_words(&words)
        .map_err(|e| e.to_string())
        .and_then(|list| Filter::new(list).map_err(|e| e.to_string()));
    let built = match built {
        Ok(f) => f,
        Err(e) => {
            warn!(error = %e, "the shared word list does not build; the filter is unchanged");
            return false;
        }
    };
    if let Err(e) = crate::filter::save(path, built.words()) {
        warn!(error = %e, "cannot keep the shared word list in this node's file");
    }
    filter.replace(Arc::new(built));
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_words_key_is_its_normalised_form_in_hex() {
        assert_eq!(key("ab"), "w.6162");
        assert_eq!(key("傻"), "w.e582bb");
        let k = key(&crate::filter::normalize_word("Ｆ.U.C.K"));
        assert_eq!(k, key("fuck"));
        assert!(k.bytes().skip(2).all(|b| b.is_ascii_hexdigit()));
    }
}
