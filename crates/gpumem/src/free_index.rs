//! The free mapped pieces of the `gpumem` policy, by stream and size, for best fit.
//!
//! Every request of the policy searches this index, and every placement and free updates it,
//! so it is kept small: one ordered set per stream (a program uses a few), each keyed by one
//! 128-bit number, the size above the address. Best fit is then the first key at or above
//! `size << 64`, and a comparison is one 128-bit compare instead of three 64-bit ones.

use std::collections::BTreeSet;

/// Free mapped pieces of each stream, ordered by (size, address).
#[derive(Default)]
pub(crate) struct FreeIndex {
    /// (stream, its pieces), for the streams that have free pieces.
    streams: Vec<(u64, BTreeSet<u128>)>,
}

fn key(size: u64, addr: u64) -> u128 {
    (size as u128) << 64 | addr as u128
}

/// (size, address) of a key.
fn unkey(k: u128) -> (u64, u64) {
    ((k >> 64) as u64, k as u64)
}

impl FreeIndex {
    fn set(&self, stream: u64) -> Option<&BTreeSet<u128>> {
        self.streams.iter().find(|s| s.0 == stream).map(|s| &s.1)
    }

    fn set_or_new(&mut self, stream: u64) -> &mut BTreeSet<u128> {
        let i = match self.streams.iter().position(|s| s.0 == stream) {
            Some(i) => i,
            None => {
                self.streams.push((stream, BTreeSet::new()));
                self.streams.len() - 1
            }
        };
        &mut self.streams[i].1
    }

    /// Adds the free piece of `stream` at `addr..addr + size`.
    pub(crate) fn insert(&mut self, stream: u64, size: u64, addr: u64) {
        self.set_or_new(stream).insert(key(size, addr));
    }

    /// Removes the free piece of `stream` at `addr..addr + size` (nothing if there is none).
    pub(crate) fn remove(&mut self, stream: u64, size: u64, addr: u64) {
        let Some(i) = self.streams.iter().position(|s| s.0 == stream) else {
            return;
        };
        let set = &mut self.streams[i].1;
        set.remove(&key(size, addr));
        if set.is_empty() {
            // a program that makes streams as it goes must not leave a trail of them here
            self.streams.swap_remove(i);
        }
    }

    /// The address of the smallest piece of `stream` that holds `size` bytes (the lowest
    /// address among equals).
    pub(crate) fn best_fit(&self, stream: u64, size: u64) -> Option<u64> {
        self.set(stream)?.range(key(size, 0)..).next().map(|&k| unkey(k).1)
    }

    /// The size of the largest piece of any stream.
    pub(crate) fn largest(&self) -> u64 {
        self.streams.iter().filter_map(|s| s.1.last()).map(|&k| unkey(k).0).max().unwrap_or(0)
    }

    /// Every piece as (address, size), largest first; among equal sizes, the lower stream
    /// first, then the higher address.
    pub(crate) fn largest_first(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        // one iterator per stream, each from its largest piece down, merged
        let mut sets: Vec<&(u64, BTreeSet<u128>)> = self.streams.iter().collect();
        sets.sort_unstable_by_key(|s| std::cmp::Reverse(s.0));
        let mut its: Vec<_> = sets.into_iter().map(|s| s.1.iter().rev().peekable()).collect();
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
