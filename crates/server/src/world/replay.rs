//! Per-player replay buffers: the notifications recently addressed to a
//! player, kept so a reconnecting or taking-over client can resume without
//! losing any.
//!
//! Entries are `(msg_id, Bytes)`: the same encoded buffer that was fanned
//! out, shared by reference count, never copied. Two rings per player keep
//! a flood of scene chat from pushing out a whisper: one for traffic that is
//! never shed (private, guild, team, system), a smaller one for scene.
//! World chat goes to every player alike, so it is kept once, in one ring
//! the registry shares between all players, and a resume merges it in:
//! a world line costs the fan-out no per-player bookkeeping at all.
//! Entries also leave by age: once older than any resume could still ask
//! for (see [`crate::config::Config::replay_max_age`]), so a quiet
//! player's rings shrink back instead of holding their peak forever.
//! Owned by the world actor's registry; no locks, no I/O.

use std::collections::VecDeque;

use bytes::Bytes;

use crate::net::Priority;

/// How many of the latest evictions a ring remembers, to count exactly what
/// a resume cursor missed; beyond that the count is an upper bound.
const EXACT_WINDOW: usize = 64;

/// A bounded ring of recent notifications, oldest first.
#[derive(Debug)]
pub struct Ring {
    cap: usize,
    entries: VecDeque<(u64, Bytes)>,
    /// Entries pushed out since the session began, and the newest of them.
    evicted: u64,
    last_evicted: u64,
    /// The ids of the most recent evictions (at most [`EXACT_WINDOW`]), to
    /// count exactly what a resume cursor missed.
    evicted_ids: VecDeque<u64>,
}

impl Ring {
    pub fn new(cap: usize) -> Self {
        // Allocated on first use (see Memory layout in ARCHITECTURE.md).
        Ring {
            cap,
            entries: VecDeque::new(),
            evicted: 0,
            last_evicted: 0,
            evicted_ids: VecDeque::new(),
        }
    }

    pub fn push(&mut self, msg_id: u64, frame: Bytes) {
        if self.entries.len() == self.cap {
            self.evict_front();
        }
        self.entries.push_back((msg_id, frame));
    }

    fn evict_front(&mut self) {
        if let Some((id, _)) = self.entries.pop_front() {
            self.evicted += 1;
            self.last_evicted = id;
            if self.evicted_ids.len() == EXACT_WINDOW {
                self.evicted_ids.pop_front();
            }
            self.evicted_ids.push_back(id);
        }
    }

    /// Evicts every entry up to and including msg_id `cutoff` (too old to
    /// be asked for), and gives back memory the ring no longer needs.
    pub fn expire(&mut self, cutoff: u64) {
        while self.entries.front().is_some_and(|(id, _)| *id <= cutoff) {
            self.evict_front();
        }
        let (len, cap) = (self.entries.len(), self.entries.capacity());
        if cap >= 16 && len * 4 <= cap {
            self.entries.shrink_to(len * 2);
        }
    }

    /// Drops the entry with this msg_id, if held (a recalled line). Not an
    /// eviction: nothing was missed.
    pub fn remove(&mut self, msg_id: u64) {
        if let Ok(i) = self.entries.binary_search_by_key(&msg_id, |(id, _)| *id) {
            self.entries.remove(i);
        }
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
    /// `(msg_id, frame)`, in msg_id order.
    pub frames: Vec<(u64, Bytes)>,
    pub gap: bool,
    /// Frames pushed out of the rings that had a gap (see the proto's
    /// `missed`).
    pub missed: u64,
}

/// A player's two replay rings, allocated on the first notification (see
/// Memory layout in ARCHITECTURE.md).
#[derive(Debug)]
pub struct Replay {
    rings: Option<Box<Rings>>,
    keep_cap: u32,
    shed_cap: u32,
}

#[derive(Debug)]
struct Rings {
    keep: Ring,
    shed: Ring,
}

impl Replay {
    pub fn new(keep: usize, shed: usize) -> Self {
        // Config validation bounds both far below u32::MAX.
        let cap = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Replay {
            rings: None,
            keep_cap: cap(keep),
            shed_cap: cap(shed),
        }
    }

    /// Records a notification addressed to this player. msg_ids arrive in
    /// increasing order (the world actor assigns them as it fans out).
    pub fn record(&mut self, msg_id: u64, frame: Bytes, priority: Priority) {
        let (keep, shed) = (self.keep_cap as usize, self.shed_cap as usize);
        let rings = self.rings.get_or_insert_with(|| {
            Box::new(Rings {
                keep: Ring::new(keep),
                shed: Ring::new(shed),
            })
        });
        match priority {
            Priority::Keep => rings.keep.push(msg_id, frame),
            Priority::Sheddable => rings.shed.push(msg_id, frame),
        }
    }

    /// Drops a recalled line from both rings.
    pub fn remove(&mut self, msg_id: u64) {
        if let Some(rings) = &mut self.rings {
            rings.keep.remove(msg_id);
            rings.shed.remove(msg_id);
        }
    }

    /// Age eviction for both rings (see [`Ring::expire`]).
    pub fn expire(&mut self, cutoff: u64) {
        if let Some(rings) = &mut self.rings {
            rings.keep.expire(cutoff);
            rings.shed.expire(cutoff);
        }
    }

    /// Everything newer than `after`, merged in msg_id order. `world` is
    /// the shared world ring with the msg_id this session began at (only
    /// what was broadcast during the session is its to replay) and the
    /// msg_id ranges during which the player masked world chat: a line is
    /// replayed exactly when it passed the mask the player had when it was
    /// sent.
    pub fn since(&self, after: u64, world: Option<(&Ring, u64, &MaskLog)>) -> Resume {
        let mut rings = Vec::with_capacity(3);
        if let Some(own) = &self.rings {
            rings.extend([(&own.keep, after, None), (&own.shed, after, None)]);
        }
        if let Some((ring, began, masked)) = world {
            rings.push((ring, after.max(began), Some(masked)));
        }
        let mut entries: Vec<&(u64, Bytes)> = Vec::new();
        let mut resume = Resume::default();
        for (ring, cursor, masked) in rings {
            let fresh = ring.entries.range(ring.start(cursor)..);
            match masked {
                Some(masked) => entries.extend(fresh.filter(|(id, _)| !masked.covers(*id))),
                None => entries.extend(fresh),
            }
            if ring.has_gap(cursor) {
                resume.gap = true;
                resume.missed += ring.missed_after(cursor);
            }
        }
        // Each ring is in order already; a resume is rare and at most a few
        // hundred entries, so a sort is the simplest correct merge.
        entries.sort_unstable_by_key(|(id, _)| *id);
        resume.frames = entries.into_iter().cloned().collect();
        resume
    }
}

/// Most masked spans a [`MaskLog`] keeps; past it the two oldest merge, so
/// a player who toggles the mask that often may miss a few world lines on
/// resume (world chat is sheddable anyway), never get a masked one.
const MASK_SPANS: usize = 8;

/// When a player masked world chat during the session, as msg_id spans
/// `(from, to]`: the shared world ring is filtered by it on resume, so a
/// line sent while the mask was off is replayed even if the player masks
/// world chat later, and the other way round.
#[derive(Debug, Default)]
pub struct MaskLog {
    spans: Vec<(u64, u64)>,
}

impl MaskLog {
    /// The mask changed after msg_id `now` was assigned.
    pub fn set(&mut self, masked: bool, now: u64) {
        let open = self.spans.last().is_some_and(|(_, to)| *to == u64::MAX);
        match (masked, open) {
            (true, false) => {
                if self.spans.len() == MASK_SPANS {
                    let (from, _) = self.spans.remove(0);
                    self.spans[0].0 = from;
                }
                self.spans.push((now, u64::MAX));
            }
            (false, true) => {
                if let Some(last) = self.spans.last_mut() {
                    last.1 = now;
                }
            }
            _ => {}
        }
    }

    /// Whether the line `msg_id` was sent while world chat was masked.
    pub fn covers(&self, msg_id: u64) -> bool {
        self.spans
            .iter()
            .any(|(from, to)| msg_id > *from && msg_id <= *to)
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
            .map(|(id, f)| {
                assert_eq!(std::str::from_utf8(f).unwrap().parse::<u64>().unwrap(), *id);
                *id
            })
            .collect()
    }

    #[test]
    fn a_removed_line_is_not_replayed_and_counts_as_no_gap() {
        let mut r = Replay::new(8, 8);
        for id in [1, 2, 3] {
            r.record(id, frame(id), Priority::Keep);
        }
        r.remove(2);
        r.remove(9);
        let resume = r.since(0, None);
        assert_eq!(ids(&resume), vec![1, 3]);
        assert!(!resume.gap);
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
        let all = r.since(0, None);
        assert_eq!((ids(&all), all.gap), (vec![1, 2, 3, 5, 8], false));
        assert_eq!(ids(&r.since(3, None)), vec![5, 8]);
        assert_eq!(ids(&r.since(4, None)), vec![5, 8]);
        assert!(r.since(8, None).frames.is_empty());
    }

    #[test]
    fn a_flood_of_sheddable_traffic_keeps_whispers() {
        let mut r = Replay::new(4, 2);
        r.record(1, frame(1), Priority::Keep);
        for id in 2..100 {
            r.record(id, frame(id), Priority::Sheddable);
        }
        let resume = r.since(0, None);
        assert_eq!(ids(&resume), vec![1, 98, 99]);
        assert!(resume.gap);
        assert_eq!(resume.missed, 96);
        // A cursor inside the remembered evictions (the last 64) counts
        // exactly; an older one gets every eviction, an upper bound.
        assert_eq!(r.since(96, None).missed, 1);
        assert_eq!(r.since(50, None).missed, 47);
        assert_eq!(r.since(10, None).missed, 96);
    }

    #[test]
    fn gap_only_when_something_newer_than_the_cursor_was_evicted() {
        let mut r = Replay::new(3, 3);
        for id in 1..=5 {
            r.record(id, frame(id), Priority::Keep);
        }
        // 1 and 2 were evicted.
        assert!(!r.since(2, None).gap);
        assert!(!r.since(4, None).gap);
        let behind = r.since(1, None);
        assert!(behind.gap);
        // Only 2 was evicted after the cursor.
        assert_eq!((ids(&behind), behind.missed), (vec![3, 4, 5], 1));
    }

    #[test]
    fn replay_shares_the_encoded_buffer() {
        let mut r = Replay::new(2, 2);
        let f = Bytes::from(vec![7u8; 64]);
        r.record(1, f.clone(), Priority::Keep);
        let out = r.since(0, None);
        assert_eq!(out.frames[0].1.as_ptr(), f.as_ptr());
    }

    #[test]
    fn the_shared_world_ring_replays_only_what_came_during_the_session() {
        let mut world = Ring::new(4);
        let mut r = Replay::new(4, 4);
        world.push(1, frame(1));
        world.push(2, frame(2));
        // The session began after 2.
        r.record(3, frame(3), Priority::Keep);
        world.push(4, frame(4));
        r.record(5, frame(5), Priority::Sheddable);
        world.push(6, frame(6));
        let open = MaskLog::default();
        let all = r.since(0, Some((&world, 2, &open)));
        assert_eq!((ids(&all), all.gap), (vec![3, 4, 5, 6], false));
        assert_eq!(ids(&r.since(4, Some((&world, 2, &open)))), vec![5, 6]);
        // World chat masked: none of it.
        assert_eq!(ids(&r.since(0, None)), vec![3, 5]);
        // The world ring overflows: a gap only for cursors it passed.
        for id in 7..=10 {
            world.push(id, frame(id));
        }
        let behind = r.since(4, Some((&world, 2, &open)));
        assert_eq!(ids(&behind), vec![5, 7, 8, 9, 10]);
        assert_eq!((behind.gap, behind.missed), (true, 1));
        assert!(!r.since(6, Some((&world, 2, &open))).gap);
    }

    #[test]
    fn world_lines_replay_by_the_mask_in_force_when_they_were_sent() {
        let mut world = Ring::new(16);
        let r = Replay::new(4, 4);
        let mut log = MaskLog::default();
        world.push(1, frame(1));
        log.set(true, 1);
        world.push(2, frame(2));
        world.push(3, frame(3));
        log.set(false, 3);
        world.push(4, frame(4));
        log.set(true, 4);
        world.push(5, frame(5));
        // Masked now, yet 1 and 4 were sent while the mask was off.
        assert_eq!(ids(&r.since(0, Some((&world, 0, &log)))), vec![1, 4]);
        log.set(false, 5);
        world.push(6, frame(6));
        assert_eq!(ids(&r.since(0, Some((&world, 0, &log)))), vec![1, 4, 6]);
        // Many toggles keep a bounded log and never replay a masked line.
        for id in 7..40 {
            log.set(id % 2 == 0, id);
        }
        assert!(log.spans.len() <= MASK_SPANS);
        assert!(log.covers(2) && log.covers(5));
    }

    #[test]
    fn old_entries_expire_as_evictions_and_give_their_memory_back() {
        let mut r = Replay::new(256, 16);
        for id in 1..=200 {
            r.record(id, frame(id), Priority::Keep);
        }
        let grown = r.rings.as_ref().unwrap().keep.entries.capacity();
        r.expire(190);
        let resume = r.since(100, None);
        assert_eq!(ids(&resume), (191..=200).collect::<Vec<_>>());
        assert_eq!(
            (resume.gap, resume.missed),
            (true, 190),
            "upper bound past the window"
        );
        assert_eq!(r.since(150, None).missed, 40, "exact within the window");
        assert!(!r.since(190, None).gap);
        assert!(
            r.rings.as_ref().unwrap().keep.entries.capacity() < grown / 4,
            "memory given back"
        );
        // Nothing newer than the cutoff is touched.
        r.expire(0);
        assert_eq!(r.since(0, None).frames.len(), 10);
    }
}
