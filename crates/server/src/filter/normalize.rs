//! Normalisation for matching: turns a chat line into the form the word list
//! is stored in, and remembers, for every character of that form, which bytes
//! of the original line it came from. It owns the rules for what counts as a
//! separator. It must never change what a player sees: the normalised form is
//! only ever matched against, and masking works on the original text through
//! the origin map.
//!
//! The steps, in order, for each cluster of the original text:
//! 1. NFKC. This also folds full-width Latin, digits and punctuation to their
//!    ASCII forms and half-width katakana to the usual katakana, since those
//!    are Unicode's `<wide>` and `<narrow>` compatibility mappings; no extra
//!    width table is needed.
//! 2. Drop every character that is not content: whitespace, punctuation,
//!    symbols (emoji included), controls, and invisible characters
//!    (zero-width spaces and joiners, variation selectors, BOM, soft
//!    hyphen, Hangul fillers, tag characters). Players put these between the
//!    letters of a word (`f.u.c.k`, `傻 逼`, `f\u{200B}uck`) to slip past a
//!    filter; no word of the list needs them.
//! 3. Drop the Latin-style combining diacritics that NFKC could not compose
//!    onto a letter (strike-through, "Zalgo" stacks). Precomposed letters
//!    such as `é` survive step 1 and are kept; the vowel signs of Indic,
//!    Thai or Arabic script are other blocks and are kept too, because there
//!    they change the word.
//! 4. Lowercase.
//!
//! Content is what Unicode calls alphabetic or numeric (letters of every
//! script, CJK ideographs, kana, Hangul, digits) plus the combining marks
//! step 3 keeps. Leet-speak (`@` for `a`, `0` for `o`) and homoglyphs across
//! scripts (Cyrillic `о` for Latin `o`) are not folded.

use unicode_normalization::char::{
    canonical_combining_class, decompose_compatible, is_combining_mark,
};
use unicode_normalization::{is_nfkc_quick, IsNormalized, UnicodeNormalization};

/// A chat line in matching form, with the original bytes behind each of its
/// characters.
#[derive(Debug, Default, Clone)]
pub(crate) struct Normalized {
    /// The matching form.
    pub(crate) text: String,
    /// One entry per character of `text`, in order.
    origin: Vec<Origin>,
}

/// Where one character of the matching form lives, in both strings.
#[derive(Debug, Clone, Copy)]
struct Origin {
    /// Byte offset of the character in [`Normalized::text`].
    at: usize,
    /// The original bytes it came from: a whole cluster, so that a match
    /// never splits a letter from its accents.
    start: usize,
    end: usize,
}

impl Normalized {
    /// Empties the buffers, keeping their memory for the next line.
    pub(crate) fn clear(&mut self) {
        self.text.clear();
        self.origin.clear();
    }

    /// Frees memory that one unusually long line left behind, so that a
    /// reused scratch buffer stays small.
    pub(crate) fn shrink(&mut self, max_bytes: usize) {
        if self.text.capacity() > max_bytes {
            self.text = String::new();
            self.origin = Vec::new();
        }
    }

    /// The original byte range behind `range` of the matching form. `range`
    /// must start and end on character boundaries of [`Self::text`] and not
    /// be empty.
    pub(crate) fn original_range(&self, range: std::ops::Range<usize>) -> std::ops::Range<usize> {
        let first = self.origin.partition_point(|o| o.at < range.start);
        let past = self.origin.partition_point(|o| o.at < range.end);
        debug_assert!(first < past, "empty or misaligned match {range:?}");
        let past = past.max(first + 1).min(self.origin.len());
        self.origin[first].start..self.origin[past - 1].end
    }

    fn push(&mut self, c: char, start: usize, end: usize) {
        self.origin.push(Origin {
            at: self.text.len(),
            start,
            end,
        });
        self.text.push(c);
    }

    /// Steps 2 to 4 for one character that NFKC produced from
    /// `start..end` of the original.
    fn push_folded(&mut self, c: char, start: usize, end: usize) {
        if c.is_ascii() {
            if c.is_ascii_alphanumeric() {
                self.push(c.to_ascii_lowercase(), start, end);
            }
            return;
        }
        if !is_content(c) {
            return;
        }
        for lower in c.to_lowercase() {
            self.push(lower, start, end);
        }
    }
}

/// Normalises a word of the list: the same function as for chat lines, so
/// that the two always agree.
pub fn normalize_word(word: &str) -> String {
    let mut out = Normalized::default();
    normalize_into(word, &mut out);
    out.text
}

/// Normalises `src` into `out`, replacing what `out` held.
pub(crate) fn normalize_into(src: &str, out: &mut Normalized) {
    out.clear();
    let mut chars = src.char_indices().peekable();
    while let Some((start, c)) = chars.next() {
        let mut end = start + c.len_utf8();
        // A cluster is a character plus whatever NFKC may merge into it:
        // combining marks, Hangul vowel and final jamo, half-width voicing
        // marks. Normalising per cluster keeps `e` + U+0301 equal to `é`.
        let mut single = true;
        while let Some(&(at, next)) = chars.peek() {
            if !joins_previous(next) {
                break;
            }
            single = false;
            end = at + next.len_utf8();
            chars.next();
        }
        if single && is_plain(c) {
            out.push(c, start, end);
        } else if single && (c.is_ascii() || is_nfkc_quick(std::iter::once(c)) == IsNormalized::Yes)
        {
            out.push_folded(c, start, end);
        } else {
            for n in src[start..end].nfkc() {
                out.push_folded(n, start, end);
            }
        }
    }
}

/// Whether NFKC may combine `c` with the character before it.
fn joins_previous(c: char) -> bool {
    if c.is_ascii() || is_plain(c) {
        return false;
    }
    if canonical_combining_class(c) != 0 {
        return true;
    }
    match is_nfkc_quick(std::iter::once(c)) {
        IsNormalized::Yes => false,
        // Characters such as the Hangul vowel jamo that compose with a
        // preceding starter.
        IsNormalized::Maybe => true,
        // A compatibility character whose expansion starts with a combining
        // mark, such as half-width katakana's voicing mark.
        IsNormalized::No => {
            let mut first = None;
            decompose_compatible(c, |d| {
                first.get_or_insert(d);
            });
            first.is_some_and(|d| canonical_combining_class(d) != 0)
        }
    }
}

/// The bulk of CJK text: characters already in NFKC, content, caseless,
/// and never combined with a neighbour, so they skip the table look-ups.
fn is_plain(c: char) -> bool {
    matches!(c, '\u{4E00}'..='\u{9FFF}' | '\u{3400}'..='\u{4DBF}' | '\u{AC00}'..='\u{D7A3}')
}

/// Steps 2 and 3 for a non-ASCII character already in NFKC.
fn is_content(c: char) -> bool {
    if is_invisible(c) || is_decoration(c) {
        return false;
    }
    c.is_alphanumeric() || is_combining_mark(c)
}

/// Characters that render as nothing (or as blank space while being
/// letters), which players slip between letters.
fn is_invisible(c: char) -> bool {
    matches!(c,
        '\u{00AD}'                      // soft hyphen
        | '\u{034F}'                    // combining grapheme joiner
        | '\u{061C}'                    // Arabic letter mark
        | '\u{115F}' | '\u{1160}'       // Hangul choseong and jungseong fillers
        | '\u{17B4}' | '\u{17B5}'       // Khmer inherent vowels
        | '\u{180B}'..='\u{180F}'       // Mongolian variation selectors, vowel separator
        | '\u{200B}'..='\u{200F}'       // zero-width space, (non-)joiner, direction marks
        | '\u{202A}'..='\u{202E}'       // bidi embeddings and overrides
        | '\u{2060}'..='\u{206F}'       // word joiner, invisible operators, bidi isolates
        | '\u{3164}' | '\u{FFA0}'       // Hangul fillers
        | '\u{FE00}'..='\u{FE0F}'       // variation selectors
        | '\u{FEFF}'                    // zero-width no-break space (BOM)
        | '\u{E0000}'..='\u{E007F}'     // tag characters
        | '\u{E0100}'..='\u{E01EF}'     // variation selectors supplement
    )
}

/// Combining diacritics of the Latin-style blocks. Those NFKC could compose
/// are gone by the time this is asked, so what is left decorates rather than
/// spells.
fn is_decoration(c: char) -> bool {
    matches!(c,
        '\u{0300}'..='\u{036F}'
        | '\u{1AB0}'..='\u{1AFF}'
        | '\u{1DC0}'..='\u{1DFF}'
        | '\u{20D0}'..='\u{20FF}'
        | '\u{FE20}'..='\u{FE2F}'
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(s: &str) -> String {
        normalize_word(s)
    }

    #[test]
    fn strips_separators_and_folds() {
        let cases = [
            ("f.u.c.k", "fuck"),
            ("f u c k", "fuck"),
            ("f_u-c*k", "fuck"),
            ("F\u{200B}U\u{200C}C\u{200D}K\u{2060}\u{FEFF}", "fuck"),
            ("ＦＵＣＫ", "fuck"),
            ("ｆ！ｕ？ｃ，ｋ", "fuck"),
            ("傻 逼", "傻逼"),
            ("傻\u{3000}逼", "傻逼"),
            ("傻、。逼", "傻逼"),
            ("傻💩逼", "傻逼"),
            ("f\u{0336}u\u{0336}c\u{0336}k\u{0336}", "fuck"),
            ("cafe\u{0301}", "café"),
            ("café", "café"),
            ("ｶﾞｷ", "ガキ"),
            ("\u{1100}\u{1161}", "가"),
            ("ÀBC", "àbc"),
            ("１２３", "123"),
            ("ﬀ", "ff"),
        ];
        for (input, want) in cases {
            assert_eq!(norm(input), want, "input {input:?}");
        }
    }

    #[test]
    fn keeps_letters_digits_and_script_marks() {
        for word in [
            "abc123",
            "傻逼",
            "ばか",
            "바보",
            "дурак",
            "किताब",
            "สวัสดี",
            "々ー〇",
        ] {
            assert_eq!(norm(word), word.to_lowercase(), "word {word:?}");
        }
    }

    #[test]
    fn every_normalised_char_maps_back_to_its_cluster() {
        let src = "a.é\u{200B}傻 Ｂ";
        let mut n = Normalized::default();
        normalize_into(src, &mut n);
        assert_eq!(n.text, "aé傻b");
        let pieces: Vec<&str> = n.origin.iter().map(|o| &src[o.start..o.end]).collect();
        assert_eq!(pieces, ["a", "é", "傻", "Ｂ"]);
        // A match of "é傻" covers the original bytes from é to 傻, the
        // zero-width space between them included.
        let at = n.text.find("é傻").unwrap();
        let r = n.original_range(at..at + "é傻".len());
        assert_eq!(&src[r], "é\u{200B}傻");
    }

    #[test]
    fn separators_only_normalise_to_nothing() {
        for s in ["", "   ", "...", "\u{200B}\u{FEFF}", "、。！", "★☆"] {
            assert_eq!(norm(s), "", "input {s:?}");
        }
    }
}
