//! The built filter: an Aho-Corasick automaton (a double array, from
//! `daachorse`) over the normalised words,
//! and the code that finds them in a chat line and masks them. It owns the
//! masking rules. It must never modify a line outside the characters a match
//! covers, and it never allocates an output for a line it leaves alone.

use std::borrow::Cow;
use std::cell::RefCell;
use std::ops::Range;
use std::sync::Arc;

use daachorse::{CharwiseDoubleArrayAhoCorasick, CharwiseDoubleArrayAhoCorasickBuilder, MatchKind};

use super::normalize::{normalize_into, Normalized};
use super::words::WordList;
use super::FilterError;

/// What every masked character becomes.
pub const MASK_CHAR: char = '*';

/// How many times [`Filter::mask`] re-checks its own output before it gives
/// up on fine-grained masking (see there). Real lines need one re-check at
/// most; only text built to nest words inside words needs more.
const MAX_MASK_ROUNDS: usize = 8;

/// Scratch buffers above this size are freed after use rather than kept for
/// the thread's next line.
const SCRATCH_KEEP_BYTES: usize = 16 * 1024;

thread_local! {
    /// Reused so that checking a clean line allocates nothing. Only borrowed
    /// inside functions of this module that call no outside code, so the
    /// borrow can never be taken twice.
    static SCRATCH: RefCell<Normalized> = RefCell::new(Normalized::default());
}

/// One word found in a line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    /// The list entry that matched, spelled as it was added to the list.
    pub word: Arc<str>,
    /// The bytes of the checked text it covers, separators between its
    /// letters included. Always on character boundaries.
    pub range: Range<usize>,
}

/// What [`Filter::check`] found: matches in text order, not overlapping in
/// the normalised text. Two ranges may still share a character when one
/// character expands to several (a ligature such as `ﬀ`) and a word ends
/// inside it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    pub matches: Vec<Match>,
}

impl Outcome {
    pub fn is_clean(&self) -> bool {
        self.matches.is_empty()
    }
}

/// An immutable, built word filter. Share it with `Arc`; to change the
/// words, build a new one and swap it in (see
/// [`FilterHandle`](super::FilterHandle)).
pub struct Filter {
    words: WordList,
    /// The spellings to report, indexed by the automaton's pattern id.
    originals: Vec<Arc<str>>,
    /// `None` for an empty list, which matches nothing.
    automaton: Option<CharwiseDoubleArrayAhoCorasick<u32>>,
}

impl std::fmt::Debug for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filter")
            .field("words", &self.words.len())
            .finish_non_exhaustive()
    }
}

impl Default for Filter {
    fn default() -> Filter {
        Filter::empty()
    }
}

impl Filter {
    /// A filter that matches nothing.
    pub fn empty() -> Filter {
        Filter {
            words: WordList::new(),
            originals: Vec::new(),
            automaton: None,
        }
    }

    /// Builds the automaton. Leftmost-longest: where words start at the same
    /// place the longest wins, so `abc` beats `ab`.
    pub fn new(words: WordList) -> Result<Filter, FilterError> {
        if words.is_empty() {
            return Ok(Filter::empty());
        }
        // The list holds no empty and no duplicate word, which are what
        // daachorse refuses; its size limits are far above ours.
        let automaton = CharwiseDoubleArrayAhoCorasickBuilder::new()
            .match_kind(MatchKind::LeftmostLongest)
            .build::<_, _, u32>(words.normalized())
            .map_err(FilterError::Build)?;
        let originals = words.words().map(Arc::from).collect();
        Ok(Filter {
            words,
            originals,
            automaton: Some(automaton),
        })
    }

    /// The list this filter was built from.
    pub fn words(&self) -> &WordList {
        &self.words
    }

    /// Whether `text` contains no listed word. The cheapest question, for
    /// the refuse policy.
    pub fn is_clean(&self, text: &str) -> bool {
        let Some(automaton) = &self.automaton else {
            return true;
        };
        with_normalized(text, |n| {
            automaton.leftmost_find_iter(&n.text).next().is_none()
        })
    }

    /// Every listed word in `text`, with the original bytes it covers.
    pub fn check(&self, text: &str) -> Outcome {
        let Some(automaton) = &self.automaton else {
            return Outcome::default();
        };
        let matches = with_normalized(text, |n| {
            automaton
                .leftmost_find_iter(&n.text)
                .map(|m| Match {
                    // The automaton's values are positions in `originals`.
                    word: self.originals[m.value() as usize].clone(),
                    range: n.original_range(m.start()..m.end()),
                })
                .collect()
        });
        Outcome { matches }
    }

    /// `text` with every character of every match replaced by
    /// [`MASK_CHAR`], one for one, so the line keeps its length in
    /// characters; separators inside a match are masked too (`f.u.c.k`
    /// becomes `*******`). Everything outside the matches is left
    /// byte-identical, and a clean line is returned borrowed.
    ///
    /// Masked characters are separators to the matcher, so masking can join
    /// what surrounds a word into a new one (`fu fuck ck` would read
    /// `fu **** ck`, which normalises to `fuck`). The output is therefore
    /// checked again until it is clean: `check(&mask(t))` is always clean.
    /// Should that take more than a few rounds, everything from the first
    /// remaining match to the end of the line is masked instead.
    pub fn mask<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let ranges = self.match_ranges(text);
        if ranges.is_empty() {
            return Cow::Borrowed(text);
        }
        let mut masked = apply_mask(text, &ranges);
        for _ in 0..MAX_MASK_ROUNDS {
            let ranges = self.match_ranges(&masked);
            if ranges.is_empty() {
                return Cow::Owned(masked);
            }
            masked = apply_mask(&masked, &ranges);
        }
        // What precedes the leftmost match holds no match of its own (it
        // would have been found first), and masking the rest leaves only
        // that prefix as content: clean.
        if let Some(first) = self.match_ranges(&masked).first() {
            let rest = first.start..masked.len();
            masked = apply_mask(&masked, std::slice::from_ref(&rest));
        }
        Cow::Owned(masked)
    }

    /// For an operator's "test" command: the line as players would see it,
    /// and what was found in it.
    pub fn test<'a>(&self, text: &'a str) -> (Cow<'a, str>, Outcome) {
        (self.mask(text), self.check(text))
    }

    /// The original byte ranges of the matches in `text`, merged where they
    /// touch.
    fn match_ranges(&self, text: &str) -> Vec<Range<usize>> {
        let Some(automaton) = &self.automaton else {
            return Vec::new();
        };
        with_normalized(text, |n| {
            let mut ranges: Vec<Range<usize>> = Vec::new();
            for m in automaton.leftmost_find_iter(&n.text) {
                let r = n.original_range(m.start()..m.end());
                match ranges.last_mut() {
                    Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                    _ => ranges.push(r),
                }
            }
            ranges
        })
    }
}

fn with_normalized<T>(text: &str, f: impl FnOnce(&Normalized) -> T) -> T {
    SCRATCH.with_borrow_mut(|n| {
        normalize_into(text, n);
        let out = f(n);
        n.shrink(SCRATCH_KEEP_BYTES);
        out
    })
}

/// `text` with each character inside `ranges` (sorted, disjoint, on
/// character boundaries) replaced by [`MASK_CHAR`].
fn apply_mask(text: &str, ranges: &[Range<usize>]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut done = 0;
    for r in ranges {
        out.push_str(&text[done..r.start]);
        out.extend(text[r.clone()].chars().map(|_| MASK_CHAR));
        done = r.end;
    }
    out.push_str(&text[done..]);
    out
}
