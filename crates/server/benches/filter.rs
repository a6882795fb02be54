//! The sensitive-word filter on a list the size games ship: 10,000 words,
//! half Chinese (2 to 4 common characters), half English (4 to 8 random
//! letters), generated from a fixed seed. Measures building the filter
//! (once per operator edit) and masking mixed Chinese and English chat
//! lines of 20 to 100 characters (once per line sent), a quarter of which
//! hold a listed word, often disguised with separators or full-width
//! letters. The `engine` group compares the Aho-Corasick crates (and
//! `aho-corasick`'s automatic and DFA automata) on the same normalised
//! words and lines, without the normalisation.
//!
//! `cargo bench -p guildchat-server --bench filter`

// Bench code: a failed unwrap is a failed run.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use guildchat_server::filter::{normalize_word, Filter, WordList};

const WORDS: usize = 10_000;
const LINES: usize = 1_000;

/// Characters words are made of.
const WORD_HANZI: &str = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可也你说年下过子得后自之经法民样能都定现看起行方";
/// Characters the rest of a line is made of, none of them in a word, so
/// that a line meant to be clean is.
const FILLER_HANZI: &str = "好吧今天晚副本团队装备打怪升级任务奖励公会活动集合快点走等我马上线谢谢老板厉害牛加油冲啊哈嗯哦呢吗";
const FILLER_WORDS: &[&str] = &[
    "gg", "wp", "lol", "ok", "boss", "raid", "tank", "heal", "dps", "loot", "brb", "afk", "pls",
    "go",
];

/// A 64-bit linear congruential generator (Knuth's MMIX constants): all the
/// randomness a reproducible bench needs.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

fn word_list(rng: &mut Lcg) -> Vec<String> {
    let hanzi: Vec<char> = WORD_HANZI.chars().collect();
    let mut words = Vec::with_capacity(WORDS);
    while words.len() < WORDS {
        let word: String = if words.len() % 2 == 0 {
            let len = 2 + rng.below(3);
            (0..len).map(|_| *rng.pick(&hanzi)).collect()
        } else {
            let len = 4 + rng.below(5);
            (0..len)
                .map(|_| (b'a' + rng.below(26) as u8) as char)
                .collect()
        };
        words.push(word);
    }
    words
}

/// A listed word as a player might disguise it.
fn disguise(rng: &mut Lcg, word: &str) -> String {
    match rng.below(4) {
        0 => word.to_string(),
        1 => word
            .chars()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join("."),
        2 => word
            .chars()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(" "),
        _ => word
            .chars()
            .map(|c| match c {
                'a'..='z' => char::from_u32(c as u32 - 'a' as u32 + 'Ａ' as u32).unwrap_or(c),
                _ => c,
            })
            .collect(),
    }
}

fn chat_lines(rng: &mut Lcg, words: &[String]) -> Vec<String> {
    let filler: Vec<char> = FILLER_HANZI.chars().collect();
    (0..LINES)
        .map(|i| {
            let target = 20 + rng.below(81);
            let hit = i % 4 == 0;
            let mut line = String::new();
            let mut placed = false;
            while line.chars().count() < target {
                if hit && !placed && rng.below(3) == 0 {
                    let word = rng_pick(rng, words);
                    line.push_str(&disguise(rng, word));
                    placed = true;
                } else if rng.below(3) == 0 {
                    let word: &str = rng.pick::<&str>(FILLER_WORDS);
                    line.push_str(word);
                    line.push(' ');
                } else {
                    line.push(*rng.pick(&filler));
                    if rng.below(8) == 0 {
                        line.push('，');
                    }
                }
            }
            if hit && !placed {
                let word = rng_pick(rng, words);
                line.push_str(&disguise(rng, word));
            }
            line
        })
        .collect()
}

fn rng_pick<'a>(rng: &mut Lcg, words: &'a [String]) -> &'a str {
    let at = rng.below(words.len());
    &words[at]
}

fn filter_benches(c: &mut Criterion) {
    let mut rng = Lcg(0x6775_696c_6463_6861);
    let words = word_list(&mut rng);
    let lines = chat_lines(&mut rng, &words);
    let list = WordList::from_words(&words).unwrap();
    let filter = Filter::new(list.clone()).unwrap();
    let hits = lines.iter().filter(|l| !filter.is_clean(l)).count();
    let chars: usize = lines.iter().map(|l| l.chars().count()).sum();
    eprintln!(
        "filter bench: {} distinct words, {LINES} lines ({hits} with a hit), {:.1} chars per line",
        list.len(),
        chars as f64 / LINES as f64
    );

    let mut g = c.benchmark_group("filter");
    g.sample_size(10);
    g.bench_function("build 10k words", |b| {
        b.iter_batched(|| list.clone(), Filter::new, BatchSize::LargeInput)
    });
    g.bench_function("word list from 10k words", |b| {
        b.iter(|| WordList::from_words(black_box(&words)).unwrap())
    });
    g.finish();

    let mut g = c.benchmark_group("filter");
    g.throughput(Throughput::Elements(LINES as u64));
    g.bench_function("mask 1k lines", |b| {
        b.iter(|| {
            for line in &lines {
                black_box(filter.mask(black_box(line)));
            }
        })
    });
    g.bench_function("is_clean 1k lines", |b| {
        b.iter(|| {
            for line in &lines {
                black_box(filter.is_clean(black_box(line)));
            }
        })
    });
    g.bench_function("normalize 1k lines", |b| {
        b.iter(|| {
            for line in &lines {
                black_box(normalize_word(black_box(line)));
            }
        })
    });
    g.finish();

    engine_benches(c, &list, &lines);
}

/// The matching step alone, both crates, leftmost-longest.
fn engine_benches(c: &mut Criterion, list: &WordList, lines: &[String]) {
    let normal_lines: Vec<String> = lines.iter().map(|l| normalize_word(l)).collect();
    let build_aho = || {
        aho_corasick::AhoCorasick::builder()
            .match_kind(aho_corasick::MatchKind::LeftmostLongest)
            .build(list.normalized())
            .unwrap()
    };
    let build_aho_dfa = || {
        aho_corasick::AhoCorasick::builder()
            .match_kind(aho_corasick::MatchKind::LeftmostLongest)
            .kind(Some(aho_corasick::AhoCorasickKind::DFA))
            .build(list.normalized())
            .unwrap()
    };
    let build_daac = || {
        daachorse::CharwiseDoubleArrayAhoCorasickBuilder::new()
            .match_kind(daachorse::MatchKind::LeftmostLongest)
            .build::<_, _, u32>(list.normalized())
            .unwrap()
    };
    let aho = build_aho();
    let aho_dfa = build_aho_dfa();
    let daac = build_daac();
    eprintln!(
        "engine memory: aho-corasick {} KiB, aho-corasick dfa {} KiB, daachorse {} KiB",
        aho.memory_usage() / 1024,
        aho_dfa.memory_usage() / 1024,
        daac.heap_bytes() / 1024
    );
    let count_aho = |l: &str| aho.find_iter(l).count();
    let count_aho_dfa = |l: &str| aho_dfa.find_iter(l).count();
    let count_daac = |l: &str| daac.leftmost_find_iter(l).count();
    assert!(
        normal_lines.iter().all(|l| count_aho(l) == count_daac(l)),
        "the two engines disagree"
    );

    let mut g = c.benchmark_group("engine");
    g.sample_size(10);
    g.bench_function("aho-corasick build", |b| b.iter(build_aho));
    g.bench_function("aho-corasick dfa build", |b| b.iter(build_aho_dfa));
    g.bench_function("daachorse build", |b| b.iter(build_daac));
    g.finish();

    let mut g = c.benchmark_group("engine");
    g.throughput(Throughput::Elements(lines.len() as u64));
    g.bench_function("aho-corasick search 1k lines", |b| {
        b.iter(|| {
            normal_lines
                .iter()
                .map(|l| count_aho(black_box(l)))
                .sum::<usize>()
        })
    });
    g.bench_function("aho-corasick dfa search 1k lines", |b| {
        b.iter(|| {
            normal_lines
                .iter()
                .map(|l| count_aho_dfa(black_box(l)))
                .sum::<usize>()
        })
    });
    g.bench_function("daachorse search 1k lines", |b| {
        b.iter(|| {
            normal_lines
                .iter()
                .map(|l| count_daac(black_box(l)))
                .sum::<usize>()
        })
    });
    g.finish();
}

criterion_group!(benches, filter_benches);
criterion_main!(benches);
