//! Periodic plans: finding the period of a training loop in its requests, and planning the
//! addresses of one period's blocks from the lifetimes they had.
//!
//! Note [Periodic plans]
//! ---------------------
//! Best fit decides where a block goes from what is free when it is asked for, and in a
//! training loop that is never quite the same twice: a step's activations land among the
//! holes the previous step left, the holes drift, and with memory held at its peak the
//! policy keeps recycling and compacting chunks at every step (about 30 compactions, 10 ms,
//! per step of GPT-2 on an H100), where PyTorch's allocator, with more memory, makes no
//! device call at all.
//!
//! But a training loop asks for the same sizes in the same order at every step, and frees
//! them at the same points. Once a whole period of requests has repeated exactly, the
//! lifetimes of one period's blocks are known, and their addresses can be planned the way a
//! compiler plans a static graph's buffers (offline dynamic storage allocation): the largest
//! block first, each at the lowest offset where it meets no block whose lifetime overlaps its
//! own. On the recorded traces such a plan needs 1.000-1.012× the most bytes the period ever
//! holds at once. From then on every request that matches the plan goes to its planned
//! address in a region of its own, whose pages, once mapped, stay mapped: the layout repeats
//! exactly, and steady state makes no device call.
//!
//! The plan is only a guess about the future. A request that does not match it, or whose
//! planned place is still taken (a block freed later than last time), is placed by best
//! fit as before; after `MAX_MISSES` requests in a row that do not match, the plan is
//! dropped and its region becomes ordinary memory again, recycled like any other. Lifetimes
//! are counted in requests, not time, so the plan does not depend on how fast the GPU runs.
//!
//! Blocks that live longer than a period (weights, optimizer state) are not planned: they
//! are placed by best fit, outside the region.

use crate::common::PtrMap;
use std::collections::VecDeque;

/// The requests hashed together to find a repeat.
const WINDOW: u64 = 16;
/// Shorter periods are layers within a step, or the creation of a model's weights.
const MIN_PERIOD: u64 = 64;
/// Longer periods are not looked for (the log holds two of them).
const MAX_PERIOD: u64 = 1 << 15;
/// Requests in a row that do not match the plan before it is dropped.
pub(crate) const MAX_MISSES: u32 = 16;
const HASH_MUL: u64 = 0x9e37_79b9_7f4a_7c15;

/// One request as the detector saw it: 24 bytes, since the log is written at every request
/// and holds 65,552 of them (Note [A small log]).
struct Rec {
    size: u64,
    stream: u64,
    /// Requests made from this one until its block was freed (`u32::MAX` while it lives,
    /// or if that was beyond any period).
    life: u32,
    /// The device calls the allocator had made before it, modulo 2^32: only the calls made
    /// within one period are ever compared.
    calls: u32,
}

// Note [A small log]
// ------------------
// The log is a ring written at every request, so each request writes a fresh part of it: at
// 40 bytes a record (its hash key, and absolute sequence numbers) the ring spanned 2.6 MiB,
// inside a `VecDeque` that had grown to twice that, more than a core's cache holds, and a
// cache-hit pair missed the cache on about half of its requests (cachegrind: 0.41 write
// misses to the last level per pair, 94% of them here). The key is recomputed from the size
// and stream, lifetimes and call counts fit in 32 bits, and the ring is held at its exact
// length.
const LOG_LEN: usize = (2 * MAX_PERIOD + WINDOW) as usize;

/// Watches the requests for a period that repeats exactly (Note [Periodic plans]).
pub(crate) struct Detector {
    log: VecDeque<Rec>,
    /// The sequence number of `log[0]`.
    first: u64,
    /// The sequence number of the next request.
    next: u64,
    hash: u64,
    /// `HASH_MUL^WINDOW`, to take the oldest request out of the rolling hash.
    drop_factor: u64,
    /// The last request whose window had each hash, for one window in eight: those whose
    /// hash, mixed once more, has its top three bits clear. A period repeats its windows, so
    /// it repeats the sampled ones too, and is found a few requests later at most; the map
    /// is an eighth as large (it held up to 262,144 entries, 4 MiB visited at random at every
    /// request, more than a core's caches hold) and is written an eighth as often. Every
    /// replay figure of the bundled traces stayed the same.
    seen: PtrMap<u64>,
    /// The period being checked (0: none) and how many requests matched it in a row.
    candidate: u64,
    matched: u64,
    /// Periods not to plan: they repeated but were not steady (their blocks mostly outlived
    /// them), or following their plan cost memory.
    rejected: Vec<u64>,
    /// A period that repeated and has not been planned yet.
    confirmed: Option<u64>,
}

/// A planned period: for each request of it, what is expected and where it goes.
pub(crate) struct Plan {
    pub period: usize,
    pub stream: u64,
    pub entries: Vec<Entry>,
    /// Bytes the region needs: the end of the highest planned block.
    pub extent: u64,
    /// The request at which the planned blocks hold the least (a step's boundary): the plan
    /// is followed from there, when the fewest blocks of the old layout are still live.
    pub entry: usize,
}

/// One request of a planned period.
#[derive(Clone, Copy)]
pub(crate) struct Entry {
    pub size: u64,
    pub stream: u64,
    /// Where it goes; `None` for a block that lived longer than a period.
    pub spot: Option<Spot>,
    /// Whether the block is live at the plan's entry (its place is needed only late in the
    /// first period followed).
    pub at_entry: bool,
}

/// Where a planned block goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Spot {
    /// At this offset in the plan's region.
    Region(u64),
    /// At this address, in a hole between long-lived blocks (Note [Holes]).
    Hole(u64),
}

fn key(size: u64, stream: u64) -> u64 {
    (size ^ stream.rotate_left(47)).wrapping_mul(HASH_MUL) ^ stream
}

impl Detector {
    pub(crate) fn new() -> Detector {
        Detector {
            log: VecDeque::new(),
            first: 0,
            next: 0,
            hash: 0,
            drop_factor: (0..WINDOW).fold(1u64, |f, _| f.wrapping_mul(HASH_MUL)),
            seen: PtrMap::default(),
            candidate: 0,
            matched: 0,
            rejected: Vec::new(),
            confirmed: None,
        }
    }

    fn rec(&self, seq: u64) -> Option<&Rec> {
        seq.checked_sub(self.first).and_then(|i| self.log.get(i as usize))
    }

    /// Records a request and returns its sequence number. With `search`, also looks for a
    /// period (not while a plan runs: nothing would use it).
    pub(crate) fn on_alloc(&mut self, size: u64, stream: u64, calls: u64, search: bool) -> u64 {
        let seq = self.next;
        self.next += 1;
        self.hash = self.hash.wrapping_mul(HASH_MUL).wrapping_add(key(size, stream));
        if seq >= WINDOW {
            let out = self.rec(seq - WINDOW).map_or(0, |r| key(r.size, r.stream));
            self.hash = self.hash.wrapping_sub(out.wrapping_mul(self.drop_factor));
        }
        if self.log.len() == LOG_LEN {
            self.log.pop_front();
            self.first += 1;
        } else if self.log.len() == self.log.capacity() {
            // grow as usual, but never beyond the ring's length (Note [A small log])
            let more = self.log.len().max(16).min(LOG_LEN - self.log.len());
            self.log.reserve_exact(more);
        }
        self.log.push_back(Rec { size, stream, life: u32::MAX, calls: calls as u32 });
        if search && seq + 1 >= WINDOW {
            self.search(seq, size, stream);
        }
        seq
    }

    fn search(&mut self, seq: u64, size: u64, stream: u64) {
        if self.candidate > 0 {
            if self.rec(seq - self.candidate).is_some_and(|r| r.size == size && r.stream == stream) {
                self.matched += 1;
            } else {
                self.candidate = 0;
            }
        }
        let sampled = self.hash.wrapping_mul(HASH_MUL) >> 61 == 0;
        if self.candidate == 0 && sampled {
            if let Some(&j) = self.seen.get(&self.hash) {
                let p = seq - j;
                if (MIN_PERIOD..=MAX_PERIOD).contains(&p)
                    && !self.rejected.iter().any(|&r| p.is_multiple_of(r))
                {
                    self.candidate = p;
                    self.matched = 0;
                }
            }
        }
        if sampled {
            if self.seen.len() as u64 > MAX_PERIOD {
                self.seen.clear();
            }
            self.seen.insert(self.hash, seq);
        }
        let p = self.candidate;
        if p > 0 && self.matched >= p {
            // A whole period repeated: plan it if its blocks mostly die within it.
            self.candidate = 0;
            let start = seq + 1 - 2 * p;
            let steady = (start..start + p).filter(|&s| self.dies_within(s, p)).count() as u64;
            if 2 * steady >= p {
                self.confirmed = Some(p);
            } else {
                self.reject(p);
            }
        }
    }

    /// Notes that the block of request `seq` was freed.
    pub(crate) fn on_free(&mut self, seq: u64) {
        let life = (self.next - seq).min(u32::MAX as u64 - 1) as u32;
        if let Some(i) = seq.checked_sub(self.first) {
            if let Some(r) = self.log.get_mut(i as usize) {
                r.life = life;
            }
        }
    }

    /// Whether the block of request `s` was freed within `p` requests of it.
    fn dies_within(&self, s: u64, p: u64) -> bool {
        self.rec(s).is_some_and(|r| r.life as u64 <= p)
    }

    /// Never plans period `p` (or a multiple) again: it was not steady, or following it
    /// cost memory.
    pub(crate) fn reject(&mut self, p: u64) {
        if !self.rejected.contains(&p) && self.rejected.len() < 64 {
            self.rejected.push(p);
        }
    }

    /// Forgets the period being checked (after a plan is dropped, the search starts over).
    pub(crate) fn restart(&mut self) {
        self.candidate = 0;
        self.matched = 0;
        self.confirmed = None;
    }

    /// Whether a period just repeated without a device call: `calls` is the number the
    /// allocator has made so far.
    pub(crate) fn last_period_made_no_call(&self, calls: u64) -> bool {
        let Some(p) = self.confirmed else { return false };
        self.rec(self.next - p).is_some_and(|r| r.calls == calls as u32)
    }

    /// The first request of the two periods that just repeated, if they did: blocks of older
    /// requests still live outlive the period (see `take_plan`).
    pub(crate) fn confirmed_start(&self) -> Option<u64> {
        self.confirmed.map(|p| self.next - 2 * p)
    }

    /// The plan for a period that just repeated, if one did: for the last two periods of
    /// requests, which were the same, the plan of the older one, whose blocks have all had a
    /// period's time to be freed. The next request is the plan's first. `holes` are free
    /// space, as (address, size), that may take planned blocks at no cost.
    ///
    /// Before the blocks are packed (the costly part), `can_follow` sees the most bytes they
    /// hold at once (no plan can need less) and the least, at the request where the plan
    /// would take over (what the old layout still holds then). A period it refuses is
    /// rejected, and the search starts over.
    pub(crate) fn take_plan(
        &mut self,
        align: u64,
        holes: &[(u64, u64)],
        can_follow: impl FnOnce(u64, u64) -> bool,
    ) -> Option<Plan> {
        let p = self.confirmed.take()?;
        let start = self.next - 2 * p;
        let recs: Vec<&Rec> =
            (start..start + p).map(|s| self.rec(s).expect("two periods are logged")).collect();
        // the stream most of the period's requests use; blocks of others are not planned
        let mut counts: Vec<(u64, usize)> = Vec::new();
        for r in &recs {
            match counts.iter_mut().find(|c| c.0 == r.stream) {
                Some(c) => c.1 += 1,
                None => counts.push((r.stream, 1)),
            }
        }
        let stream = counts.iter().max_by_key(|c| c.1).map(|c| c.0)?;
        let blocks: Vec<Interval> = recs
            .iter()
            .enumerate()
            .filter(|(i, r)| r.stream == stream && self.dies_within(start + *i as u64, p))
            .map(|(i, r)| Interval {
                index: i,
                size: r.size.div_ceil(align) * align,
                from: i as u64,
                to: i as u64 + r.life as u64,
            })
            .collect();
        let (lower_bound, entry, least_live) = live_profile(&blocks, p);
        if !can_follow(lower_bound, least_live) {
            self.reject(p);
            self.restart();
            return None;
        }
        let (spots, extent) = pack(&blocks, p, holes, lower_bound);
        let mut entries: Vec<Entry> = recs
            .iter()
            .map(|r| Entry { size: r.size, stream: r.stream, spot: None, at_entry: false })
            .collect();
        for (b, spot) in blocks.iter().zip(spots) {
            let e = entry as u64;
            entries[b.index].spot = Some(spot);
            entries[b.index].at_entry = (b.from <= e && e < b.to) || (b.from <= e + p && e + p < b.to);
        }
        Some(Plan { period: p as usize, stream, entries, extent, entry })
    }
}

/// A block of the planned period: `size` bytes from request `from` until request `to`
/// (which may lie in the next period: `to - from` is at most a period).
#[derive(Clone, Copy)]
struct Interval {
    index: usize,
    size: u64,
    from: u64,
    to: u64,
}

impl Interval {
    /// Whether the two blocks live at once, in this period or across its end.
    fn overlaps(&self, o: &Interval, p: u64) -> bool {
        let meet = |a: u64, b: u64, c: u64, d: u64| a < d && c < b;
        meet(self.from, self.to, o.from, o.to)
            || meet(self.from + p, self.to + p, o.from, o.to)
            || meet(self.from, self.to, o.from + p, o.to + p)
    }
}

/// The most bytes the blocks hold at once, over the period and across its end, the request
/// at which they hold the least, and that least.
fn live_profile(blocks: &[Interval], p: u64) -> (u64, usize, u64) {
    let mut delta = vec![0i64; 2 * p as usize + 1];
    for b in blocks {
        delta[b.from as usize] += b.size as i64;
        delta[b.to as usize] -= b.size as i64;
    }
    let (mut live, mut most) = (0i64, vec![0i64; p as usize]);
    for (t, d) in delta.iter().enumerate().take(2 * p as usize) {
        live += d;
        most[t % p as usize] += live;
    }
    let least = (0..most.len()).min_by_key(|&t| most[t]).unwrap_or(0);
    let least_live = most.get(least).copied().unwrap_or(0).max(0) as u64;
    (most.into_iter().max().unwrap_or(0).max(0) as u64, least, least_live)
}

/// Offline placement: the blocks in a few orders (largest first, longest-lived first, most
/// byte-requests first, in request order), each at the lowest offset free of every block
/// whose lifetime meets its own, in the smallest hole where there is one, else in the region;
/// the order whose region is smallest wins (the first within 1/256 of the `lower` bound stops
/// the search). Returns the spots and the region's extent.
///
/// Note [Packing in request order]
/// -------------------------------
/// Request order is tried last, so it changes only plans the other three left more than
/// 1/256 above the bound. On ViT over 24 steps (1,073 blocks, bound 2,683 MB) they gave
/// 2,707, 2,703 and 2,800 MB; request order gives 2,688 MB (0.18% above the bound), which is
/// what lets that plan fit within best fit's peak (Note [What a plan leaves outside its
/// region] in `packed/plan_region.rs`: 1,132 MB of long-lived pages and 2,688 against
/// 3,810 and 0.4%). Also tried: the smallest gap instead of the lowest offset (2,731 MB at
/// best). No other bundled trace's plan changed.
fn pack(blocks: &[Interval], p: u64, holes: &[(u64, u64)], lower: u64) -> (Vec<Spot>, u64) {
    let mut holes = holes.to_vec();
    holes.sort_unstable_by_key(|h| (h.1, h.0));
    let orders: [fn(&Interval) -> u64; 4] =
        [|b| b.size, |b| b.to - b.from, |b| b.size * (b.to - b.from), |b| u64::MAX - b.from];
    let mut best: Option<(Vec<Spot>, u64)> = None;
    for order in orders {
        let mut idx: Vec<usize> = (0..blocks.len()).collect();
        idx.sort_by_key(|&i| (std::cmp::Reverse(order(&blocks[i])), i));
        let mut spots = vec![Spot::Region(0); blocks.len()];
        // per hole, and for the region (last), the blocks placed there by offset
        let mut placed: Vec<Vec<(u64, u64, usize)>> = vec![Vec::new(); holes.len() + 1];
        let mut extent = 0;
        for &i in &idx {
            let b = &blocks[i];
            let first = holes.partition_point(|h| h.1 < b.size);
            let in_hole = (first..holes.len()).find_map(|h| {
                let off = lowest_fit(&placed[h], blocks, b, p);
                (off + b.size <= holes[h].1).then_some((h, off))
            });
            let (slot, off) =
                in_hole.unwrap_or_else(|| (holes.len(), lowest_fit(&placed[holes.len()], blocks, b, p)));
            spots[i] = match holes.get(slot) {
                Some(h) => Spot::Hole(h.0 + off),
                None => {
                    extent = extent.max(off + b.size);
                    Spot::Region(off)
                }
            };
            let list = &mut placed[slot];
            let at = list.partition_point(|&(lo, _, _)| lo < off);
            list.insert(at, (off, off + b.size, i));
        }
        if best.as_ref().is_none_or(|b| extent < b.1) {
            best = Some((spots, extent));
        }
        if extent <= lower + lower / 256 {
            break;
        }
    }
    best.unwrap_or_default()
}

/// The lowest offset where `b` meets none of the `placed` blocks (by offset) that live when
/// it does: one pass, since they are sorted by where they start.
fn lowest_fit(placed: &[(u64, u64, usize)], blocks: &[Interval], b: &Interval, p: u64) -> u64 {
    let mut off = 0;
    for &(lo, hi, j) in placed {
        if lo >= off + b.size {
            break;
        }
        if hi > off && blocks[j].overlaps(b, p) {
            off = hi;
        }
    }
    off
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A step of `sizes`, each freed `life` requests later, repeated `steps` times: the first
    /// plan made, with the lower bound its period was offered with.
    fn run(d: &mut Detector, sizes: &[u64], life: usize, steps: usize) -> Option<(Plan, u64)> {
        run_offering(d, sizes, life, steps, |_, _| true)
    }

    /// `n` sizes drawn from `x` (a linear congruential generator's state): `unit` to
    /// `classes * unit` bytes.
    fn random_sizes(x: &mut u64, n: usize, classes: u64, unit: u64) -> Vec<u64> {
        (0..n)
            .map(|_| {
                *x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (*x >> 40) % classes * unit + unit
            })
            .collect()
    }

    /// `run`, with `can_follow` deciding which periods are packed.
    fn run_offering(
        d: &mut Detector,
        sizes: &[u64],
        life: usize,
        steps: usize,
        can_follow: impl Fn(u64, u64) -> bool,
    ) -> Option<(Plan, u64)> {
        let mut live: VecDeque<u64> = VecDeque::new();
        for _ in 0..steps {
            for &s in sizes {
                live.push_back(d.on_alloc(s, 0, 0, true));
                if live.len() > life {
                    d.on_free(live.pop_front().unwrap());
                }
                let mut lower = 0;
                let offer = |l, least| {
                    lower = l;
                    can_follow(l, least)
                };
                if let Some(plan) = d.take_plan(512, &[], offer) {
                    return Some((plan, lower));
                }
            }
        }
        None
    }

    #[test]
    fn finds_the_period_and_plans_within_the_bound() {
        let sizes: Vec<u64> = (0..200u64).map(|i| ((i * 7919) % 97 + 1) * 4096).collect();
        let mut d = Detector::new();
        let (plan, lower_bound) = run(&mut d, &sizes, 10, 4).expect("a plan after two equal periods");
        assert_eq!(plan.period, 200);
        assert!(plan.entries.iter().all(|e| e.spot.is_some()));
        assert!(plan.extent >= lower_bound);
        assert!(plan.extent <= lower_bound * 3 / 2, "{} vs {lower_bound}", plan.extent);
        // no two planned blocks that live at once overlap
        let p = plan.period as u64;
        let iv: Vec<(u64, u64, u64, u64)> = plan
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let Some(Spot::Region(o)) = e.spot else { panic!("no holes were offered") };
                (i as u64, i as u64 + 10, o, o + e.size)
            })
            .collect();
        for a in &iv {
            for b in &iv {
                let a_i = Interval { index: 0, size: 0, from: a.0, to: a.1 };
                let b_i = Interval { index: 0, size: 0, from: b.0, to: b.1 };
                if a.0 != b.0 && a_i.overlaps(&b_i, p) {
                    assert!(a.3 <= b.2 || b.3 <= a.2, "blocks {} and {} overlap", a.0, b.0);
                }
            }
        }
    }

    #[test]
    fn a_refused_period_is_offered_once_and_never_packed() {
        let sizes: Vec<u64> = (0..200u64).map(|i| ((i * 7919) % 97 + 1) * 4096).collect();
        let mut d = Detector::new();
        let offers = std::cell::Cell::new(0);
        let refuse = |_, _| {
            offers.set(offers.get() + 1);
            false
        };
        assert!(run_offering(&mut d, &sizes, 10, 8, refuse).is_none());
        // the period repeated six more times, and neither it nor a multiple came back
        assert_eq!(offers.get(), 1);
    }

    #[test]
    fn a_sequence_that_only_grows_is_not_planned() {
        // weights: the same layer shapes again and again, never freed
        let sizes: Vec<u64> = (0..100u64).map(|i| (i % 10 + 1) << 20).collect();
        let mut d = Detector::new();
        assert!(run(&mut d, &sizes, usize::MAX, 8).is_none());
    }

    #[test]
    fn the_log_wraps_at_its_length_and_still_finds_the_period() {
        // more requests than the log holds, none of them periodic, then a training loop
        let mut d = Detector::new();
        let mut x = 99u64;
        let noise = random_sizes(&mut x, LOG_LEN + 5000, 4096, 512);
        assert!(run(&mut d, &noise, 20, 1).is_none());
        assert_eq!(d.log.len(), LOG_LEN);
        assert!(
            d.log.capacity() <= LOG_LEN + LOG_LEN / 16,
            "the ring keeps its length: {}",
            d.log.capacity()
        );
        assert_eq!(d.first + LOG_LEN as u64, d.next);
        let sizes = random_sizes(&mut x, 300, 89, 8192);
        let (plan, _) = run(&mut d, &sizes, 12, 4).expect("a plan after two equal periods");
        assert_eq!(plan.period, 300);
        assert!(plan.entries.iter().all(|e| e.spot.is_some()), "every block dies within the period");
        // lifetimes survived the wrap: blocks freed 12 requests later overlap exactly their
        // 11 neighbours on each side, so no block shares its spot with one of those
        let spot = |i: usize| match plan.entries[i % 300].spot {
            Some(Spot::Region(o)) => (o, o + plan.entries[i % 300].size),
            other => panic!("{other:?}"),
        };
        for i in 0..300 {
            for j in i + 1..i + 12 {
                let (a, b) = (spot(i), spot(j));
                assert!(a.1 <= b.0 || b.1 <= a.0, "requests {i} and {j} live at once");
            }
        }
    }

    #[test]
    fn random_requests_have_no_period() {
        let mut d = Detector::new();
        let sizes = random_sizes(&mut 12345, 5000, 64, 512);
        assert!(run(&mut d, &sizes, 20, 1).is_none());
    }
}
