//! Per-player replay buffers: the notifications recently addressed to a
//! player, kept so a reconnecting or taking-over client can resume without
//! losing any.
//!
//! Entries are `(msg_id, Bytes)`: the same encoded buffer that was fanned
//! out, shared by reference count, never copied. Two rings per player keep
//! a flood of world chat from pushing out a whisper: one for traffic that is
//! never shed (private, guild, team, system), a smaller one for world and
//! scene. Owned by the world actor's registry; no locks, no I/O.

use std::collections::VecDeque;

use bytes::Bytes;

use crate::net::Priority;

/// A bounded ring of recent notifications, oldest first.
#[derive(Debug)]
struct Ring {
    cap: usize,
    entries: VecDeque<(u64, Bytes)>,
    /// Entries pushed out since the session began, and the newest of them.
    evicted: u64,
    last_evicted: u64,
    /// The ids of the most recent evictions (at most `window`), to count
    /// exactly what a resume cursor missed.
    evicted_ids: VecDeque<u64>,
    window: usize,
}

impl Ring {
    fn new(cap: usize) -> Self {
        // Allocated on first use: an idle player costs no buffer.
        Ring {
            cap,
            entries: VecDeque::new(),
            evicted: 0,
            last_evicted: 0,
            evicted_ids: VecDeque::new(),
            // Twice the ring: a client that was caught up when it dropped
            // gets an exact count until it has missed that many.
            window: (cap * 2).max(64),
        }
    }

    fn push(&mut self, msg_id: u64, frame: Bytes) {
        if self.entries.len() == self.cap {
            if let Some((id, _)) = self.entries.pop_front() {
                self.evicted += 1;
                self.last_evicted = id;
                if self.evicted_ids.len() == self.window {
                    self.evicted_ids.pop_front();
                }
                self.evicted_ids.push_back(id);
            }
        }
        self.entries.push_back((msg_id, frame));
    }

    /// Index of the first entry newer than `after`.
    fn start(&self, after: u64) -> usize {
        self.entries.partition_point(|(id, _)| *id <= after)
    }

    /// Whether something newer than `after` was already pushed out.
    fn has_gap(&self, after: u64) -> bool {
        self.evicted > 0 && self.last_evicted > after
    }

    /// How many pushed-out entries are newer than `after`: exact while
    /// `after` is within the remembered evictions, otherwise every eviction
    /// since the session began (an upper bound).
    fn missed_after(&self, after: u64) -> u64 {
        let older = self.evicted_ids.partition_point(|id| *id <= after);
        if older == 0 {
            self.evicted
        } else {
            (self.evicted_ids.len() - older) as u64
        }
    }
}

/// What a resume gets: the frames to send, in msg_id order, and whether
/// some could not be kept.
#[derive(Debug, Default)]
pub struct Resume {
    pub frames: Vec<Bytes>,
    pub gap: bool,
    /// Frames pushed out of the rings that had a gap (see the proto's
    /// `missed`).
    pub missed: u64,
}

/// A player's two replay rings.
#[derive(Debug)]
pub struct Replay {
    keep: Ring,
    shed: Ring,
}

impl Replay {
    pub fn new(keep: usize, shed: usize) -> Self {
        Replay {
            keep: Ring::new(keep),
            shed: Ring::new(shed),
        }
    }

    /// Records a notification addressed to this player. msg_ids arrive in
    /// increasing order (the world actor assigns them as it fans out).
    pub fn record(&mut self, msg_id: u64, frame: Bytes, priority: Priority) {
        match priority {
            Priority::Keep => self.keep.push(msg_id, frame),
            Priority::Sheddable => self.shed.push(msg_id, frame),
        }
    }

    /// Everything newer than `after`, merged in msg_id order.
    pub fn since(&self, after: u64) -> Resume {
        let mut a = self.keep.entries.range(self.keep.start(after)..).peekable();
        let mut b = self.shed.entries.range(self.shed.start(after)..).peekable();
        let mut frames = Vec::with_capacity(a.len() + b.len());
        loop {
            let next = match (a.peek(), b.peek()) {
                (Some(x), Some(y)) if x.0 < y.0 => a.next(),
                (Some(_), Some(_)) => b.next(),
                (Some(_), None) => a.next(),
                (None, Some(_)) => b.next(),
                (None, None) => break,
            };
            if let Some((_, frame)) = next {
                frames.push(frame.clone());
            }
        }
        let mut resume = Resume {
            frames,
            ..Resume::default()
        };
        for ring in [&self.keep, &self.shed] {
            if ring.has_gap(after) {
                resume.gap = true;
                resume.missed += ring.missed_after(after);
            }
        }
        resume
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(id: u64) -> Bytes {
        Bytes::from(id.to_string())
    }

    fn ids(r: &Resume) -> Vec<u64> {
        r.frames
            .iter()
            .map(|f| std::str::from_utf8(f).unwrap().parse().unwrap())
            .collect()
    }

    #[test]
    fn replays_in_order_across_both_rings() {
        let mut r = Replay::new(4, 4);
        for (id, p) in [
            (1, Priority::Keep),
            (2, Priority::Sheddable),
            (3, Priority::Sheddable),
            (5, Priority::Keep),
            (8, Priority::Sheddable),
        ] {
            r.record(id, frame(id), p);
        }
        let all = r.since(0);
        assert_eq!((ids(&all), all.gap), (vec![1, 2, 3, 5, 8], false));
        assert_eq!(ids(&r.since(3)), vec![5, 8]);
        assert_eq!(ids(&r.since(4)), vec![5, 8]);
        assert!(r.since(8).frames.is_empty());
    }

    #[test]
    fn a_flood_of_sheddable_traffic_keeps_whispers() {
        let mut r = Replay::new(4, 2);
        r.record(1, frame(1), Priority::Keep);
        for id in 2..100 {
            r.record(id, frame(id), Priority::Sheddable);
        }
        let resume = r.since(0);
        assert_eq!(ids(&resume), vec![1, 98, 99]);
        assert!(resume.gap);
        assert_eq!(resume.missed, 96);
        // A cursor inside the remembered evictions (the last 64) counts
        // exactly; an older one gets every eviction, an upper bound.
        assert_eq!(r.since(96).missed, 1);
        assert_eq!(r.since(50).missed, 47);
        assert_eq!(r.since(10).missed, 96);
    }

    #[test]
    fn gap_only_when_something_newer_than_the_cursor_was_evicted() {
        let mut r = Replay::new(3, 3);
        for id in 1..=5 {
            r.record(id, frame(id), Priority::Keep);
        }
        // 1 and 2 were evicted.
        assert!(!r.since(2).gap);
        assert!(!r.since(4).gap);
        let behind = r.since(1);
        assert!(behind.gap);
        // Only 2 was evicted after the cursor.
        assert_eq!((ids(&behind), behind.missed), (vec![3, 4, 5], 1));
    }

    #[test]
    fn replay_shares_the_encoded_buffer() {
        let mut r = Replay::new(2, 2);
        let f = Bytes::from(vec![7u8; 64]);
        r.record(1, f.clone(), Priority::Keep);
        let out = r.since(0);
        assert_eq!(out.frames[0].as_ptr(), f.as_ptr());
    }
}
