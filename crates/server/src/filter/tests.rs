//! Behaviour of the built filter: what it finds, what it masks, and what it
//! leaves alone.

use std::borrow::Cow;
use std::sync::Arc;

use proptest::prelude::*;

use super::*;

fn filter(words: &[&str]) -> Filter {
    Filter::new(WordList::from_words(words).unwrap()).unwrap()
}

fn found<'t>(f: &Filter, text: &'t str) -> Vec<(String, &'t str)> {
    f.check(text)
        .matches
        .into_iter()
        .map(|m| (m.word.to_string(), &text[m.range]))
        .collect()
}

#[test]
fn a_filter_can_be_shared_between_threads() {
    fn shared<T: Send + Sync>() {}
    shared::<Filter>();
    shared::<FilterHandle>();
}

#[test]
fn masks_through_disguises() {
    let f = filter(&["fuck", "傻逼"]);
    let cases = [
        ("fuck you", "**** you"),
        ("f.u.c.k you", "******* you"),
        ("f u c k", "*******"),
        ("f_u-c*k!", "*******!"),
        ("F\u{200B}U\u{200D}C\u{FEFF}K", "*******"),
        ("ＦＵＣＫ off", "**** off"),
        ("FuCk", "****"),
        ("你是傻 逼吗", "你是***吗"),
        ("你是傻\u{3000}逼吗", "你是***吗"),
        ("傻。逼", "***"),
    ];
    for (text, want) in cases {
        assert_eq!(f.mask(text), want, "text {text:?}");
    }
}

#[test]
fn leftmost_longest_wins() {
    let f = filter(&["ab", "abc"]);
    assert_eq!(f.mask("abcd"), "***d");
    assert_eq!(found(&f, "abcd"), [("abc".to_string(), "abc")]);
}

#[test]
fn overlapping_words_report_the_leftmost_and_mask_the_text_clean() {
    let f = filter(&["abc", "cde"]);
    // Non-overlapping in the normalised text: `abc` is taken first, which
    // leaves `de`, not a word.
    assert_eq!(found(&f, "abcde"), [("abc".to_string(), "abc")]);
    assert_eq!(f.mask("abcde"), "***de");
    // Adjacent words are both found.
    assert_eq!(f.mask("abccde"), "******");
}

#[test]
fn ranges_are_bytes_of_the_original_with_multibyte_text_around() {
    let f = filter(&["idiot", "笨蛋"]);
    let text = "é你 I·D·I·O·T 好笨\u{200B}蛋!";
    let got = found(&f, text);
    assert_eq!(
        got,
        [
            ("idiot".to_string(), "I·D·I·O·T"),
            ("笨蛋".to_string(), "笨\u{200B}蛋"),
        ]
    );
    assert_eq!(f.mask(text), "é你 ********* 好***!");
}

#[test]
fn a_word_keeps_its_accents_with_it() {
    let f = filter(&["café"]);
    // Decomposed in the line, precomposed in the list: the combining accent
    // belongs to the match and is masked with its letter.
    assert_eq!(f.mask("un cafe\u{0301} noir"), "un ***** noir");
    assert_eq!(f.mask("un café noir"), "un **** noir");
}

#[test]
fn clean_lines_are_borrowed() {
    let f = filter(&["fuck"]);
    for text in ["", "hello there", "你好世界", "fun, luck? f-u-n"] {
        assert!(matches!(f.mask(text), Cow::Borrowed(_)), "{text:?}");
        assert!(f.check(text).is_clean());
        assert!(f.is_clean(text));
    }
    let empty = Filter::empty();
    assert!(matches!(empty.mask("fuck"), Cow::Borrowed("fuck")));
}

#[test]
fn masking_cannot_join_what_surrounds_a_word_into_a_new_one() {
    let f = filter(&["fuck"]);
    let text = "fu fuck ck";
    let masked = f.mask(text);
    assert!(f.is_clean(&masked), "{masked:?}");
    assert_eq!(masked, "**********");
    // Nested ever deeper, past the re-check rounds: still clean.
    let mut deep = String::from("fuck");
    for _ in 0..20 {
        deep = format!("fu {deep} ck");
    }
    let masked = f.mask(&deep);
    assert!(f.is_clean(&masked));
    assert_eq!(masked.chars().count(), deep.chars().count());
}

#[test]
fn the_masked_text_never_holds_a_matched_word() {
    let f = filter(&["fuck", "傻逼", "idiot"]);
    for text in [
        "fuuck f.u.c.k",
        "傻傻逼逼",
        "i d i o t s",
        "ＦＵＣＫ傻逼idiot",
    ] {
        let (masked, outcome) = f.test(text);
        assert!(!outcome.is_clean(), "{text:?}");
        let normal = normalize_word(&masked);
        for m in &outcome.matches {
            assert!(!normal.contains(&normalize_word(&m.word)), "{masked:?}");
        }
    }
}

#[test]
fn policy_reads_lowercase_and_defaults_to_mask() {
    #[derive(serde::Deserialize)]
    struct Channel {
        #[serde(default)]
        filter: Policy,
    }
    let parse = |s: &str| toml::from_str::<Channel>(s).map(|c| c.filter);
    assert_eq!(parse("filter = \"mask\"").unwrap(), Policy::Mask);
    assert_eq!(parse("filter = \"refuse\"").unwrap(), Policy::Refuse);
    assert_eq!(parse("").unwrap(), Policy::Mask);
    assert!(parse("filter = \"Refuse\"").is_err());
}

#[test]
fn a_handle_swaps_filters_under_readers() {
    let handle = FilterHandle::new(filter(&["old"]));
    let before = handle.load();
    let previous = handle.replace(Arc::new(filter(&["new"])));
    assert!(Arc::ptr_eq(&before, &previous));
    assert_eq!(
        before.mask("old new"),
        "*** new",
        "a reader keeps its filter"
    );
    assert_eq!(handle.load().mask("old new"), "old ***");
    assert_eq!(handle.clone().load().words().len(), 1);
}

/// Text built from pieces that exercise the filter: listed words,
/// separators, invisible and combining characters, and anything at all.
fn line() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        3 => prop::sample::select(vec![
            "fuck", "FU", "ck", "傻", "逼", "ab", "abc", "ｃ", "ﬀ", "e\u{301}", "ｶﾞ",
        ])
        .prop_map(String::from),
        2 => prop::sample::select(vec![
            " ", ".", "*", "\u{200B}", "\u{FEFF}", "\u{0336}", "\u{301}", "、", "😀", "\u{FE0F}",
        ])
        .prop_map(String::from),
        2 => any::<char>().prop_map(String::from),
    ];
    prop::collection::vec(piece, 0..24).prop_map(|v| v.concat())
}

proptest! {
    #[test]
    fn masking_only_ever_replaces_characters_one_for_one(text in line()) {
        let f = filter(&["fuck", "傻逼", "abc", "ab", "ff", "é", "ガ", "ck"]);
        let outcome = f.check(&text);
        let masked = f.mask(&text);
        prop_assert_eq!(masked.chars().count(), text.chars().count());
        // Every character is either kept or masked.
        for (m, t) in masked.chars().zip(text.chars()) {
            prop_assert!(m == t || m == MASK_CHAR, "{:?} -> {:?}", text, masked);
        }
        // Every character a match covers is masked.
        let mut covered = vec![false; text.len()];
        for m in &outcome.matches {
            prop_assert!(text.is_char_boundary(m.range.start) && text.is_char_boundary(m.range.end));
            covered[m.range.clone()].iter_mut().for_each(|c| *c = true);
        }
        for ((at, _), m) in text.char_indices().zip(masked.chars()) {
            if covered[at] {
                prop_assert_eq!(m, MASK_CHAR);
            }
        }
        // And the result is clean: masking is idempotent.
        prop_assert!(f.is_clean(&masked), "{:?} -> {:?}", text, masked);
        prop_assert_eq!(outcome.is_clean(), matches!(masked, Cow::Borrowed(_)));
    }

    #[test]
    fn arbitrary_unicode_never_panics(text in any::<String>()) {
        let f = filter(&["fuck", "傻逼"]);
        let masked = f.mask(&text);
        prop_assert_eq!(masked.chars().count(), text.chars().count());
        let _ = f.check(&text);
        let _ = normalize_word(&text);
    }
}
