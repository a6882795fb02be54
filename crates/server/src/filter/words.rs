//! The sensitive-word list: what operators typed, next to the normalised
//! form that is matched. It owns the list's limits and its deduplication. It
//! must never hold a word whose normalised form is empty (such a word would
//! match everywhere, or nowhere, depending on the matcher), and it never
//! touches files: reading and writing them is [`super::file`]'s job.

use super::normalize::normalize_word;

/// The most words a list may hold, after duplicates collapse. Enough for the
/// commercial lists games license, small enough that building a filter
/// stays well under a second.
pub const MAX_WORDS: usize = 100_000;

/// The longest word accepted, in characters as typed (surrounding
/// whitespace not counted).
pub const MAX_WORD_CHARS: usize = 64;

/// Why a word or a list was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WordListError {
    #[error("word {word:?} has {chars} characters; at most {max} are allowed")]
    TooLong {
        /// The word's first [`MAX_WORD_CHARS`] characters.
        word: String,
        chars: usize,
        max: usize,
    },
    #[error("the list would hold more than {max} words")]
    TooMany { max: usize },
    /// The list file holds one word per line, so a word cannot contain one.
    #[error("word {word:?} contains a line break")]
    LineBreak { word: String },
}

/// A sorted, deduplicated list of words, ready to build a
/// [`Filter`](super::Filter) from.
///
/// Two words are the same when their normalised forms are: `FUCK`,
/// `f.u.c.k` and `ｆｕｃｋ` are one entry, and the first one added is the
/// form kept for display and for saving.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WordList {
    /// Sorted by `normalized`, no two equal.
    entries: Vec<Entry>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) normalized: String,
    pub(crate) original: String,
}

impl Entry {
    /// Checks and normalises one word. `Ok(None)` for a word that is blank
    /// once normalised, which is ignored rather than refused so that a list
    /// file may contain stray punctuation lines.
    pub(crate) fn new(word: &str) -> Result<Option<Entry>, WordListError> {
        let word = word.trim();
        if word.contains(['\n', '\r']) {
            return Err(WordListError::LineBreak { word: word.into() });
        }
        let chars = word.chars().count();
        if chars > MAX_WORD_CHARS {
            return Err(WordListError::TooLong {
                word: word.chars().take(MAX_WORD_CHARS).collect(),
                chars,
                max: MAX_WORD_CHARS,
            });
        }
        let normalized = normalize_word(word);
        if normalized.is_empty() {
            return Ok(None);
        }
        Ok(Some(Entry {
            normalized,
            original: word.into(),
        }))
    }
}

impl WordList {
    /// An empty list.
    pub fn new() -> WordList {
        WordList::default()
    }

    /// Builds a list from words. Blank words are skipped, duplicates
    /// collapse (the first spelling wins); a word that is too long or a list
    /// that is too big is refused whole.
    pub fn from_words<I, S>(words: I) -> Result<WordList, WordListError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut entries = Vec::new();
        for word in words {
            if let Some(entry) = Entry::new(word.as_ref())? {
                entries.push(entry);
            }
        }
        WordList::from_entries(entries)
    }

    pub(crate) fn from_entries(mut entries: Vec<Entry>) -> Result<WordList, WordListError> {
        // Stable, so that among equal words the first one added is kept.
        entries.sort_by(|a, b| a.normalized.cmp(&b.normalized));
        entries.dedup_by(|later, first| later.normalized == first.normalized);
        if entries.len() > MAX_WORDS {
            return Err(WordListError::TooMany { max: MAX_WORDS });
        }
        Ok(WordList { entries })
    }

    /// Adds a word. `Ok(false)` when it was blank or already on the list.
    pub fn insert(&mut self, word: &str) -> Result<bool, WordListError> {
        let Some(entry) = Entry::new(word)? else {
            return Ok(false);
        };
        match self.find(&entry.normalized) {
            Ok(_) => Ok(false),
            Err(at) => {
                if self.entries.len() >= MAX_WORDS {
                    return Err(WordListError::TooMany { max: MAX_WORDS });
                }
                self.entries.insert(at, entry);
                Ok(true)
            }
        }
    }

    /// Removes the entry `word` normalises to, whichever spelling it was
    /// added with. `false` when there was none.
    pub fn remove(&mut self, word: &str) -> bool {
        match self.find(&normalize_word(word)) {
            Ok(at) => {
                self.entries.remove(at);
                true
            }
            Err(_) => false,
        }
    }

    /// Whether `word`, in any spelling, is on the list.
    pub fn contains(&self, word: &str) -> bool {
        self.find(&normalize_word(word)).is_ok()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The words as first added, in the order of their normalised forms.
    pub fn words(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        self.entries.iter().map(|e| e.original.as_str())
    }

    /// The normalised forms, sorted, in the same order as [`Self::words`].
    pub fn normalized(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        self.entries.iter().map(|e| e.normalized.as_str())
    }

    fn find(&self, normalized: &str) -> Result<usize, usize> {
        self.entries
            .binary_search_by(|e| e.normalized.as_str().cmp(normalized))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blanks_are_skipped_and_spellings_collapse() {
        let list = WordList::from_words([
            "FUCK",
            "",
            "   ",
            "...",
            "f.u.c.k",
            "ｆｕｃｋ",
            "傻逼",
            "傻 逼",
        ])
        .unwrap();
        assert_eq!(list.words().collect::<Vec<_>>(), ["FUCK", "傻逼"]);
        assert_eq!(list.normalized().collect::<Vec<_>>(), ["fuck", "傻逼"]);
    }

    #[test]
    fn insert_remove_and_contains_compare_normalised_forms() {
        let mut list = WordList::new();
        assert_eq!(list.insert("Idiot"), Ok(true));
        assert_eq!(list.insert("i d i o t"), Ok(false));
        assert_eq!(list.insert(" "), Ok(false));
        assert!(list.contains("IDIOT"));
        assert!(list.remove("ｉｄｉｏｔ"));
        assert!(!list.remove("idiot"));
        assert!(list.is_empty());
    }

    #[test]
    fn a_long_word_is_refused() {
        let long = "a".repeat(MAX_WORD_CHARS + 1);
        let err = WordList::from_words([long.as_str()]).unwrap_err();
        assert_eq!(
            err,
            WordListError::TooLong {
                word: "a".repeat(MAX_WORD_CHARS),
                chars: MAX_WORD_CHARS + 1,
                max: MAX_WORD_CHARS
            }
        );
        // The limit counts characters, not bytes.
        assert!(WordList::from_words(["傻".repeat(MAX_WORD_CHARS)]).is_ok());
    }

    #[test]
    fn a_word_with_a_line_break_is_refused() {
        let mut list = WordList::new();
        assert!(matches!(
            list.insert("a\nb"),
            Err(WordListError::LineBreak { .. })
        ));
    }

    #[test]
    fn the_size_cap_counts_distinct_words() {
        let words: Vec<String> = (0..MAX_WORDS).map(|i| format!("w{i}")).collect();
        let mut list = WordList::from_words(words.iter().chain(words.iter())).unwrap();
        assert_eq!(list.len(), MAX_WORDS);
        assert_eq!(list.insert("w0"), Ok(false));
        assert_eq!(
            list.insert("one more"),
            Err(WordListError::TooMany { max: MAX_WORDS })
        );
        let too_many = (0..=MAX_WORDS).map(|i| format!("w{i}"));
        assert_eq!(
            WordList::from_words(too_many),
            Err(WordListError::TooMany { max: MAX_WORDS })
        );
    }
}
