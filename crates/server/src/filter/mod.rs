//! The sensitive-word filter: a list of words operators do not want in
//! chat, and the code that finds and masks them in a line. It owns the
//! list, its file, the normalisation rules and the masking rules. It must
//! never decide what happens to a line (mask, refuse, log): that is the
//! caller's, per channel, through [`Policy`]. It holds no lock on the chat
//! path beyond the brief read of [`FilterHandle::load`], does no I/O there,
//! and is not wired into the user or world actors by itself.
//!
//! # Matching
//! Words and chat lines go through the same normalisation (see
//! [`normalize`] for the rules): NFKC, which also folds full-width forms;
//! lowercase; and removal of whitespace, punctuation, symbols and invisible
//! characters, so that `F.U.C.K`, `ｆｕｃｋ`, `f\u{200B}uck` and `傻 逼`
//! match `fuck` and `傻逼`. Matching is Aho-Corasick over the normalised
//! line, leftmost-longest (where words start at the same place, the
//! longest wins); each normalised character remembers the original bytes
//! it came from, so results are byte ranges of the line as the player
//! typed it. Masking replaces each character of a match with
//! `*`, separators inside the match included, and leaves the rest of the
//! line byte-identical.
//!
//! Matching is substring matching: a listed word also matches inside a
//! longer word (the old "Scunthorpe" trade-off). Keep short Latin words,
//! which hide inside ordinary ones, off the list.
//!
//! # Engine
//! Built on `daachorse` 5 (charwise double-array Aho-Corasick,
//! leftmost-longest). It was measured against `aho-corasick` 1 with
//! `benches/filter.rs` (group `engine`: 10,000 generated words, half
//! Chinese and half English, and 1,000 mixed chat lines of about 60
//! characters, mostly Chinese, already normalised). `daachorse` searched
//! the lines about 1.7 times as fast as `aho-corasick`'s automatic choice
//! of automaton and built about 3 times as fast (6 ms against 17 ms), in a
//! little less memory (0.76 MiB against 0.81 MiB). `aho-corasick`'s full
//! DFA searched about a third faster still, but took 70 ms and 20 MiB to
//! build: a poor trade when normalisation, not search, is most of a line's
//! cost and an operator's edit rebuilds the filter.
//!
//! # The list
//! [`WordList`] holds up to [`MAX_WORDS`] words of up to [`MAX_WORD_CHARS`]
//! characters. [`load`] and [`save`] read and write [`FILE_NAME`] in the
//! data directory (missing file: empty list; saves are atomic, mode 0600).
//! A short sample list ships as `data/filter_words.sample.txt` in this
//! crate; copy it into the data directory as `filter_words.txt` to start
//! from it.
//!
//! # Using it from the chat path
//! ```
//! use std::sync::Arc;
//! use guildchat_server::filter::{Filter, FilterHandle, Policy, WordList};
//!
//! // At start-up: load the list and build the filter once.
//! let words = WordList::from_words(["idiot", "傻逼"]).unwrap();
//! let handle = FilterHandle::new(Filter::new(words).unwrap());
//!
//! // Per line, in the actor that handles chat: take the current filter
//! // (an `Arc` clone under a read lock) and apply the channel's policy.
//! let filter = handle.load();
//! let line = "you i.d.i.o.t";
//! match Policy::default() {
//!     Policy::Mask => assert_eq!(filter.mask(line), "you *********"),
//!     Policy::Refuse => assert!(!filter.is_clean(line)),
//! }
//!
//! // On an operator's edit: build a new filter off the hot path, then swap.
//! let mut words = filter.words().clone();
//! words.insert("baka").unwrap();
//! handle.replace(Arc::new(Filter::new(words).unwrap()));
//! assert_eq!(handle.load().mask("baka!"), "****!");
//! ```
//! Building a filter from a large list takes milliseconds to tens of
//! milliseconds: do it on a blocking thread, not inside an actor's loop.

mod file;
mod matcher;
pub mod normalize;
mod words;

use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock};

pub use file::{load, path_in, save, FILE_NAME};
pub use matcher::{Filter, Match, Outcome, MASK_CHAR};
pub use normalize::normalize_word;
pub use words::{WordList, WordListError, MAX_WORDS, MAX_WORD_CHARS};

/// Why a list could not be read, written or built.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: line {line} is not valid UTF-8", path.display())]
    NotUtf8 { path: PathBuf, line: usize },
    #[error("{}: line {line}: {source}", path.display())]
    Line {
        path: PathBuf,
        line: usize,
        source: WordListError,
    },
    #[error("{}: {source}", path.display())]
    List {
        path: PathBuf,
        source: WordListError,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The automaton would exceed the matcher's internal limits; the word
    /// limits keep lists far below them.
    #[error("cannot build the word matcher: {0}")]
    Build(daachorse::errors::DaachorseError),
}

/// What a channel does with a line that contains a listed word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Deliver the line with the words masked.
    #[default]
    Mask,
    /// Reject the line; the sender is told, nobody else sees it.
    Refuse,
}

/// The current filter, shared by every task that checks chat, and
/// replaceable while they run.
///
/// Readers hold the lock only to clone an `Arc`, so a swap never waits for
/// a line to be checked, and a line being checked keeps the filter it
/// started with.
#[derive(Debug, Clone, Default)]
pub struct FilterHandle {
    current: Arc<RwLock<Arc<Filter>>>,
    /// Held by an edit from reading the list to swapping the new filter
    /// in, so two concurrent edits cannot lose one another's words.
    editing: Arc<std::sync::Mutex<()>>,
}

impl FilterHandle {
    pub fn new(filter: Filter) -> FilterHandle {
        FilterHandle {
            current: Arc::new(RwLock::new(Arc::new(filter))),
            editing: Arc::default(),
        }
    }

    /// The filter in force now.
    pub fn load(&self) -> Arc<Filter> {
        // Poisoning cannot leave the value half-changed: the only writes
        // are whole-`Arc` swaps, so a poisoned lock still holds a good one.
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Puts `filter` in force and returns the one it replaces.
    pub fn replace(&self, filter: Arc<Filter>) -> Arc<Filter> {
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        std::mem::replace(&mut *current, filter)
    }

    /// Holds off list edits ([`FilterHandle::change`]) while the caller
    /// replaces the filter by other means (a reload from the file), so the
    /// two cannot undo each other.
    pub fn lock_edits(&self) -> std::sync::MutexGuard<'_, ()> {
        self.editing.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The list's words, as they were added.
    pub fn words(&self) -> Vec<String> {
        self.load().words().words().map(str::to_owned).collect()
    }

    /// The filtered text and the list words found in it, without sending
    /// anything (the admin API's test).
    pub fn test(&self, text: &str) -> (String, Vec<String>) {
        let filter = self.load();
        let (masked, outcome) = filter.test(text);
        let mut found: Vec<String> = outcome.matches.iter().map(|m| m.word.to_string()).collect();
        found.dedup();
        (masked.into_owned(), found)
    }

    /// Applies an operator's edit: builds the new list and filter, writes
    /// the list to `<data_dir>/filter_words.txt`, and only then puts it in
    /// force, so that what is in force is what a restart loads. Blocking
    /// (file I/O and the automaton build): call it off the runtime. On any
    /// error nothing changes. Returns the list's size and words.
    pub fn change(
        &self,
        data_dir: &std::path::Path,
        change: Change,
    ) -> Result<(usize, Vec<String>), FilterError> {
        let _one_at_a_time = self.editing.lock().unwrap_or_else(PoisonError::into_inner);
        let path = path_in(data_dir);
        let words = self.edited(&path, change)?;
        let filter = Filter::new(words.clone())?;
        save(&path, &words)?;
        let listed = words.words().map(str::to_owned).collect::<Vec<_>>();
        self.replace(Arc::new(filter));
        Ok((listed.len(), listed))
    }

    /// The list an edit would make from the one in force, refused as
    /// [`FilterHandle::change`] refuses it, without putting it in force
    /// (a cluster node writes it to the shared list instead).
    pub fn preview(
        &self,
        data_dir: &std::path::Path,
        change: Change,
    ) -> Result<WordList, FilterError> {
        self.edited(&path_in(data_dir), change)
    }

    fn edited(&self, path: &std::path::Path, change: Change) -> Result<WordList, FilterError> {
        let list_error = |source| FilterError::List {
            path: path.into(),
            source,
        };
        Ok(match change {
            Change::Replace(words) => WordList::from_words(words).map_err(list_error)?,
            Change::Add(words) => {
                let mut list = self.load().words().clone();
                for w in words {
                    list.insert(&w).map_err(list_error)?;
                }
                list
            }
            Change::Remove(words) => {
                let mut list = self.load().words().clone();
                for w in words {
                    list.remove(&w);
                }
                list
            }
        })
    }
}

/// An operator's edit of the word list.
#[derive(Debug, Clone)]
pub enum Change {
    Replace(Vec<String>),
    Add(Vec<String>),
    Remove(Vec<String>),
}

#[cfg(test)]
mod tests;
