//! The free mapped pieces of the `gpumem` policy, by stream and size, for best fit.
//!
//! Every request of the policy searches this index, and every placement and free updates it
//! (a cache hit removes a piece and inserts what is left of it; its free puts the piece back),
//! so it is kept cheap. Each stream's pieces are spread over size classes, 16 per power of
//! two, each holding its pieces in order of one 128-bit key, the size above the address (a
//! sorted vector while they are few, an ordered set beyond); a bitmap says which classes hold
//! pieces. Best fit looks in the request's own class first (the first
//! key at or above `size << 64`) and otherwise takes the smallest piece of the next class
//! that holds any: the classes are ordered by size, so that is the smallest piece that fits
//! overall, exactly as one set of every piece would give it. A class holds few pieces, where
//! one set of a thousand pieces was three levels of 128-bit compares, and a cache hit's four
//! updates allocated and freed tree nodes as a class emptied and filled again.

use std::collections::BTreeSet;

/// Size classes: sizes below 16 one each, then 16 per power of two up to 2^63.
const CLASSES: usize = 16 * 61;
const WORDS: usize = CLASSES.div_ceil(64);

/// The size class of `size`; a larger size never has a smaller class.
fn class(size: u64) -> usize {
    if size < 16 {
        return size as usize;
    }
    let e = 63 - size.leading_zeros() as usize;
    (e - 3) * 16 + ((size >> (e - 4)) & 15) as usize
}

fn key(size: u64, addr: u64) -> u128 {
    (size as u128) << 64 | addr as u128
}

/// (size, address) of a key.
fn unkey(k: u128) -> (u64, u64) {
    ((k >> 64) as u64, k as u64)
}

/// Above this many pieces a class keeps them in an ordered set instead of a sorted vector.
const MANY: usize = 256;

/// The pieces of one size class, in key order. A sorted vector while they are few, which is
/// the usual case: no class of the bundled traces ever held more than 61, and a vector that
/// goes from one piece to none and back keeps its memory, where an ordered set frees and
/// allocates its node each time (a cache hit does exactly that). Beyond `MANY` an ordered
/// set, so that a program with thousands of holes of one size does not pay a long shift at
/// every update; back to a vector below half of that.
enum Class {
    Few(Vec<u128>),
    Many(BTreeSet<u128>),
}

impl Class {
    fn is_empty(&self) -> bool {
        match self {
            Class::Few(v) => v.is_empty(),
            Class::Many(s) => s.is_empty(),
        }
    }

    fn insert(&mut self, k: u128) -> bool {
        match self {
            Class::Few(v) => {
                let Err(i) = v.binary_search(&k) else { return false };
                v.insert(i, k);
                if v.len() > MANY {
                    *self = Class::Many(v.drain(..).collect());
                }
                true
            }
            Class::Many(s) => s.insert(k),
        }
    }

    fn remove(&mut self, k: u128) -> bool {
        match self {
            Class::Few(v) => {
                let Ok(i) = v.binary_search(&k) else { return false };
                v.remove(i);
                true
            }
            Class::Many(s) => {
                let removed = s.remove(&k);
                if s.len() < MANY / 2 {
                    *self = Class::Few(s.iter().copied().collect());
                }
                removed
            }
        }
    }

    /// The first key at or above `k`.
    fn at_least(&self, k: u128) -> Option<u128> {
        match self {
            Class::Few(v) => v.get(v.partition_point(|&x| x < k)).copied(),
            Class::Many(s) => s.range(k..).next().copied(),
        }
    }

    fn first(&self) -> Option<u128> {
        self.at_least(0)
    }

    fn last(&self) -> Option<u128> {
        match self {
            Class::Few(v) => v.last().copied(),
            Class::Many(s) => s.last().copied(),
        }
    }

    fn iter_rev(&self) -> RevKeys<'_> {
        match self {
            Class::Few(v) => RevKeys::Few(v.iter().rev()),
            Class::Many(s) => RevKeys::Many(s.iter().rev()),
        }
    }
}

/// A class's keys, largest first.
enum RevKeys<'a> {
    Few(std::iter::Rev<std::slice::Iter<'a, u128>>),
    Many(std::iter::Rev<std::collections::btree_set::Iter<'a, u128>>),
}

impl<'a> Iterator for RevKeys<'a> {
    type Item = &'a u128;
    fn next(&mut self) -> Option<&'a u128> {
        match self {
            RevKeys::Few(i) => i.next(),
            RevKeys::Many(i) => i.next(),
        }
    }
}

/// One stream's free pieces, by size class.
struct Classes {
    sets: Vec<Class>,
    /// Bit `c` is set while class `c` holds a piece.
    used: [u64; WORDS],
    len: usize,
}

impl Classes {
    fn new() -> Classes {
        Classes { sets: (0..CLASSES).map(|_| Class::Few(Vec::new())).collect(), used: [0; WORDS], len: 0 }
    }

    fn insert(&mut self, k: u128) {
        let c = class(unkey(k).0);
        if self.sets[c].insert(k) {
            self.used[c / 64] |= 1 << (c % 64);
            self.len += 1;
        }
    }

    fn remove(&mut self, k: u128) {
        let c = class(unkey(k).0);
        if self.sets[c].remove(k) {
            self.len -= 1;
            if self.sets[c].is_empty() {
                self.used[c / 64] &= !(1 << (c % 64));
            }
        }
    }

    /// The first class at or above `c` that holds a piece.
    fn next_used(&self, c: usize) -> Option<usize> {
        let (mut w, mut bits) = (c / 64, self.used.get(c / 64)? & (!0u64 << (c % 64)));
        loop {
            if bits != 0 {
                return Some(w * 64 + bits.trailing_zeros() as usize);
            }
            w += 1;
            bits = *self.used.get(w)?;
        }
    }

    /// The last class that holds a piece.
    fn last_used(&self) -> Option<usize> {
        let w = self.used.iter().rposition(|&b| b != 0)?;
        Some(w * 64 + 63 - self.used[w].leading_zeros() as usize)
    }

    fn best_fit(&self, size: u64) -> Option<u128> {
        let c = self.next_used(class(size))?;
        if let Some(k) = self.sets[c].at_least(key(size, 0)) {
            return Some(k);
        }
        // nothing in the request's own class holds it: the next class's smallest does
        self.sets[self.next_used(c + 1)?].first()
    }

    /// Every key, largest first.
    fn iter_rev(&self) -> impl Iterator<Item = &u128> + '_ {
        self.sets.iter().rev().flat_map(|s| s.iter_rev())
    }
}

/// Free mapped pieces of each stream, ordered by (size, address).
#[derive(Default)]
pub(crate) struct FreeIndex {
    /// (stream, its pieces), for the streams that have free pieces.
    streams: Vec<(u64, Box<Classes>)>,
    /// The classes of a stream that ran out of pieces, kept for the next one (976 classes,
    /// with their vectors' memory; a stream may run out and come back at every request).
    spare: Option<Box<Classes>>,
}

impl FreeIndex {
    fn set(&self, stream: u64) -> Option<&Classes> {
        self.streams.iter().find(|s| s.0 == stream).map(|s| &*s.1)
    }

    /// Adds the free piece of `stream` at `addr..addr + size`.
    pub(crate) fn insert(&mut self, stream: u64, size: u64, addr: u64) {
        let i = match self.streams.iter().position(|s| s.0 == stream) {
            Some(i) => i,
            None => {
                let classes = self.spare.take().unwrap_or_else(|| Box::new(Classes::new()));
                self.streams.push((stream, classes));
                self.streams.len() - 1
            }
        };
        self.streams[i].1.insert(key(size, addr));
    }

    /// Removes the free piece of `stream` at `addr..addr + size` (nothing if there is none).
    pub(crate) fn remove(&mut self, stream: u64, size: u64, addr: u64) {
        let Some(i) = self.streams.iter().position(|s| s.0 == stream) else {
            return;
        };
        let classes = &mut self.streams[i].1;
        classes.remove(key(size, addr));
        if classes.len == 0 {
            // a program that makes streams as it goes must not leave a trail of them here
            self.spare = Some(self.streams.swap_remove(i).1);
        }
    }

    /// The address of the smallest piece of `stream` that holds `size` bytes (the lowest
    /// address among equals).
    pub(crate) fn best_fit(&self, stream: u64, size: u64) -> Option<u64> {
        self.set(stream)?.best_fit(size).map(|k| unkey(k).1)
    }

    /// The size of the largest piece of any stream.
    pub(crate) fn largest(&self) -> u64 {
        let last = |c: &Classes| c.last_used().and_then(|i| c.sets[i].last());
        self.streams.iter().filter_map(|s| last(&s.1)).map(|k| unkey(k).0).max().unwrap_or(0)
    }

    /// Every piece as (address, size), largest first; among equal sizes, the lower stream
    /// first, then the higher address.
    pub(crate) fn largest_first(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        // one iterator per stream, each from its largest piece down, merged
        let mut sets: Vec<&(u64, Box<Classes>)> = self.streams.iter().collect();
        sets.sort_unstable_by_key(|s| std::cmp::Reverse(s.0));
        let mut its: Vec<_> = sets.into_iter().map(|s| s.1.iter_rev().peekable()).collect();
        std::iter::from_fn(move || {
            let (_, i) =
                its.iter_mut().enumerate().filter_map(|(i, it)| Some((unkey(**it.peek()?).0, i))).max()?;
            its[i].next().map(|&k| {
                let (size, addr) = unkey(k);
                (addr, size)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_fit_takes_the_smallest_piece_that_holds_the_size_on_its_stream() {
        let mut f = FreeIndex::default();
        f.insert(0, 4096, 0x1000);
        f.insert(0, 1024, 0x9000);
        f.insert(0, 4096, 0x500);
        f.insert(7, 2048, 0x20000);
        assert_eq!(f.best_fit(0, 1000), Some(0x9000));
        assert_eq!(f.best_fit(0, 2000), Some(0x500)); // the lower of two equal pieces
        assert_eq!(f.best_fit(7, 2000), Some(0x20000));
        assert_eq!(f.best_fit(7, 4096), None);
        assert_eq!(f.best_fit(3, 1), None);
        f.remove(0, 4096, 0x500);
        assert_eq!(f.best_fit(0, 2000), Some(0x1000));
        assert_eq!(f.largest(), 4096);
    }

    #[test]
    fn a_larger_size_never_has_a_smaller_class() {
        let mut last = 0;
        for size in (0..4096).chain((12..64).flat_map(|e| [(1u64 << e) - 1, 1 << e, (1 << e) + 512])) {
            let c = class(size);
            assert!(c < CLASSES);
            if size > 0 {
                assert!(c >= class(size - 1), "class({size}) < class({})", size - 1);
            }
            last = last.max(c);
        }
        assert_eq!(class(u64::MAX), CLASSES - 1);
        assert!(last < CLASSES);
    }

    /// Applies `ops` (stream, size, address slot, add or remove) to an index and to one
    /// ordered set per stream, and checks that every answer is the set's.
    fn same_as_one_ordered_set(ops: Vec<(u64, u64, u64, bool)>, asks: Vec<u64>) -> Result<(), String> {
        let mut f = FreeIndex::default();
        let mut all: Vec<BTreeSet<u128>> = vec![BTreeSet::new(); 3];
        let mut held: Vec<std::collections::HashMap<u64, u128>> = vec![Default::default(); 3];
        for (stream, size, slot, add) in ops {
            let (addr, st) = (slot << 40, stream as usize);
            // at most one piece per address, as in the policy
            match (add, held[st].get(&addr).copied()) {
                (true, None) => {
                    f.insert(stream, size, addr);
                    all[st].insert(key(size, addr));
                    held[st].insert(addr, key(size, addr));
                }
                (false, Some(h)) => {
                    let (s, a) = unkey(h);
                    f.remove(stream, s, a);
                    all[st].remove(&h);
                    held[st].remove(&addr);
                }
                _ => {}
            }
        }
        for size in asks {
            for stream in 0..3u64 {
                let want = all[stream as usize].range(key(size, 0)..).next().map(|&k| unkey(k).1);
                if f.best_fit(stream, size) != want {
                    return Err(format!("best fit of {size} on stream {stream}"));
                }
            }
        }
        let largest = all.iter().filter_map(|s| s.last()).map(|&k| unkey(k).0).max().unwrap_or(0);
        if f.largest() != largest {
            return Err("largest".into());
        }
        let mut want: Vec<(u64, u64, u64)> = (0..3u64)
            .flat_map(|st| all[st as usize].iter().map(move |&k| (unkey(k).0, st, unkey(k).1)))
            .collect();
        want.sort_by_key(|&(size, st, addr)| (std::cmp::Reverse(size), st, std::cmp::Reverse(addr)));
        let want: Vec<(u64, u64)> = want.into_iter().map(|(size, _, addr)| (addr, size)).collect();
        if f.largest_first().collect::<Vec<_>>() != want {
            return Err("largest_first".into());
        }
        Ok(())
    }

    proptest::proptest! {
        /// The size classes are an implementation detail: every answer is the one a single
        /// ordered set of all the stream's pieces gives.
        #[test]
        fn best_fit_is_that_of_one_ordered_set(
            ops in proptest::collection::vec((0u64..3, 1u64..1 << 36, 0u64..64, proptest::bool::ANY), 1..300),
            asks in proptest::collection::vec(1u64..1 << 37, 1..40),
        ) {
            proptest::prop_assert_eq!(same_as_one_ordered_set(ops, asks), Ok(()));
        }

        /// The same with many pieces in a few classes, so that classes pass from a vector
        /// to an ordered set and back.
        #[test]
        fn crowded_classes_answer_the_same(
            fill in proptest::collection::vec((0u64..2, (1u64 << 20)..(1 << 20) + 60_000, 0u64..600, proptest::bool::weighted(0.9)), 800..1500),
            drain in proptest::collection::vec((0u64..2, (1u64 << 20)..(1 << 20) + 60_000, 0u64..600, proptest::bool::weighted(0.1)), 3000..5000),
            asks in proptest::collection::vec((1u64 << 20)..(1 << 20) + 70_000, 1..40),
        ) {
            let ops = fill.into_iter().chain(drain).collect();
            proptest::prop_assert_eq!(same_as_one_ordered_set(ops, asks), Ok(()));
        }
    }

    #[test]
    fn largest_first_merges_the_streams() {
        let mut f = FreeIndex::default();
        f.insert(1, 100, 0x100);
        f.insert(2, 300, 0x200);
        f.insert(1, 300, 0x300);
        f.insert(2, 50, 0x400);
        f.insert(5, 10, 0x500);
        f.remove(5, 10, 0x500);
        assert_eq!(f.streams.len(), 2, "a stream without free pieces is forgotten");
        let all: Vec<(u64, u64)> = f.largest_first().collect();
        assert_eq!(all, vec![(0x300, 300), (0x200, 300), (0x100, 100), (0x400, 50)]);
    }
}
