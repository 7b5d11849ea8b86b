//! PyTorch's allocator counters, with PyTorch's key names and meanings.
//!
//! Each counter is a [`Stat`] (current, peak, allocated, freed). Most come as three: the sum
//! over both pools ("all"), the small pool and the large pool. `memory_stats()` flattens them
//! into the 122 keys PyTorch's `torch.cuda.memory_stats()` returns, such as
//! `allocated_bytes.all.current` or `reserved_bytes.large_pool.peak`.

use std::collections::BTreeMap;

/// One counter: its current value, the peak since the last reset, and the totals added and
/// removed since the last reset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stat {
    /// The current value.
    pub current: i64,
    /// The largest value since the last peak reset.
    pub peak: i64,
    /// The sum of all increases since the last accumulated reset.
    pub allocated: i64,
    /// The sum of all decreases since the last accumulated reset.
    pub freed: i64,
}

impl Stat {
    pub(crate) fn increase(&mut self, n: u64) {
        self.current += n as i64;
        self.peak = self.peak.max(self.current);
        self.allocated += n as i64;
    }
    pub(crate) fn decrease(&mut self, n: u64) {
        self.current -= n as i64;
        debug_assert!(self.current >= 0, "negative stat: allocator bookkeeping error");
        self.freed += n as i64;
    }
    fn reset_accumulated(&mut self) {
        self.allocated = 0;
        self.freed = 0;
    }
    fn reset_peak(&mut self) {
        self.peak = self.current;
    }
}

/// Which pool a block belongs to: requests of 1 MiB or less (after rounding) are small.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PoolKind {
    /// Rounded requests of at most 1 MiB, in 2 MiB segments.
    Small,
    /// Everything larger.
    Large,
}

impl PoolKind {
    pub(crate) fn index(self) -> usize {
        match self {
            PoolKind::Small => 1,
            PoolKind::Large => 2,
        }
    }
    /// `"small"` or `"large"`, as snapshots name segment types.
    pub fn name(self) -> &'static str {
        match self {
            PoolKind::Small => "small",
            PoolKind::Large => "large",
        }
    }
}

/// A stat for "all", "small_pool" and "large_pool", in that order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatArray(pub [Stat; 3]);

impl StatArray {
    pub(crate) fn increase(&mut self, pool: PoolKind, n: u64) {
        self.0[0].increase(n);
        self.0[pool.index()].increase(n);
    }
    pub(crate) fn decrease(&mut self, pool: PoolKind, n: u64) {
        self.0[0].decrease(n);
        self.0[pool.index()].decrease(n);
    }
    /// The aggregate over both pools.
    pub fn all(&self) -> &Stat {
        &self.0[0]
    }
    /// The small pool's stat.
    pub fn small(&self) -> &Stat {
        &self.0[1]
    }
    /// The large pool's stat.
    pub fn large(&self) -> &Stat {
        &self.0[2]
    }
}

/// All counters of one device's allocator, as PyTorch's `DeviceStats`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceStats {
    /// Blocks handed out and not yet freed by the caller.
    pub allocation: StatArray,
    /// Segments from the device (`cuMemAlloc`; expandable mappings are not segments).
    pub segment: StatArray,
    /// Blocks handed out, or freed but still waiting for another stream's events.
    pub active: StatArray,
    /// Free blocks inside split segments: memory `empty_cache` cannot release.
    pub inactive_split: StatArray,
    /// Bytes of `allocation` blocks (rounded sizes, with any unsplit slack).
    pub allocated_bytes: StatArray,
    /// Bytes held from the device: segments plus mapped pages.
    pub reserved_bytes: StatArray,
    /// Bytes of `active` blocks.
    pub active_bytes: StatArray,
    /// Bytes of `inactive_split` blocks.
    pub inactive_split_bytes: StatArray,
    /// Bytes the callers asked for, of `active` blocks.
    pub requested_bytes: StatArray,
    /// Handouts of blocks of at least `max_split_size`.
    pub oversize_allocations: Stat,
    /// Segments of at least `max_split_size`.
    pub oversize_segments: Stat,
    /// Allocation attempts after freeing every cached block.
    pub num_alloc_retries: i64,
    /// Out-of-memory errors returned.
    pub num_ooms: i64,
    /// Times every outstanding event was waited for.
    pub num_sync_all_streams: i64,
    /// Segment allocations and page mappings made on the device.
    pub num_device_alloc: i64,
    /// Segment frees and page unmappings made on the device.
    pub num_device_free: i64,
    /// The `max_split_size` setting (-1 when unlimited).
    pub max_split_size: i64,
}

/// The key of each entry of a [`StatArray`], in order.
const POOL_KEYS: [&str; 3] = ["all", "small_pool", "large_pool"];

/// The flattened stats: PyTorch's key names mapped to values, sorted by key.
pub type MemoryStats = BTreeMap<String, i64>;

impl DeviceStats {
    fn arrays(&self) -> [(&'static str, &StatArray); 9] {
        [
            ("allocation", &self.allocation),
            ("segment", &self.segment),
            ("active", &self.active),
            ("inactive_split", &self.inactive_split),
            ("allocated_bytes", &self.allocated_bytes),
            ("reserved_bytes", &self.reserved_bytes),
            ("active_bytes", &self.active_bytes),
            ("inactive_split_bytes", &self.inactive_split_bytes),
            ("requested_bytes", &self.requested_bytes),
        ]
    }

    fn arrays_mut(&mut self) -> [&mut StatArray; 9] {
        [
            &mut self.allocation,
            &mut self.segment,
            &mut self.active,
            &mut self.inactive_split,
            &mut self.allocated_bytes,
            &mut self.reserved_bytes,
            &mut self.active_bytes,
            &mut self.inactive_split_bytes,
            &mut self.requested_bytes,
        ]
    }

    /// The 122 keys of `torch.cuda.memory_stats()`.
    pub fn to_map(&self) -> MemoryStats {
        let mut m = MemoryStats::new();
        let mut put = |prefix: String, s: &Stat| {
            m.insert(format!("{prefix}.current"), s.current);
            m.insert(format!("{prefix}.peak"), s.peak);
            m.insert(format!("{prefix}.allocated"), s.allocated);
            m.insert(format!("{prefix}.freed"), s.freed);
        };
        for (name, arr) in self.arrays() {
            for (pool, stat) in POOL_KEYS.iter().zip(&arr.0) {
                put(format!("{name}.{pool}"), stat);
            }
        }
        put("oversize_allocations".into(), &self.oversize_allocations);
        put("oversize_segments".into(), &self.oversize_segments);
        m.insert("num_alloc_retries".into(), self.num_alloc_retries);
        m.insert("num_ooms".into(), self.num_ooms);
        m.insert("num_sync_all_streams".into(), self.num_sync_all_streams);
        m.insert("num_device_alloc".into(), self.num_device_alloc);
        m.insert("num_device_free".into(), self.num_device_free);
        m.insert("max_split_size".into(), self.max_split_size);
        m
    }

    /// The first per-pool counter whose `current` value differs from `recounted` (what
    /// [`recount`](crate::recount) derives from a snapshot), as a sentence naming it and both values;
    /// `None` when the bookkeeping agrees.
    pub fn mismatch_with_recount(&self, recounted: &DeviceStats) -> Option<String> {
        for ((name, got), (_, want)) in self.arrays().into_iter().zip(recounted.arrays()) {
            for ((pool, g), w) in POOL_KEYS.iter().zip(&got.0).zip(&want.0) {
                if g.current != w.current {
                    return Some(format!(
                        "{name}.{pool}.current is {}, but a recount of the snapshot gives {}",
                        g.current, w.current
                    ));
                }
            }
        }
        None
    }

    /// `reset_peak_memory_stats`: every peak becomes the current value.
    pub fn reset_peak(&mut self) {
        for a in self.arrays_mut() {
            a.0.iter_mut().for_each(Stat::reset_peak);
        }
        self.oversize_allocations.reset_peak();
        self.oversize_segments.reset_peak();
    }

    /// `reset_accumulated_memory_stats`: the allocated/freed totals and the event counters
    /// go back to zero.
    pub fn reset_accumulated(&mut self) {
        for a in self.arrays_mut() {
            a.0.iter_mut().for_each(Stat::reset_accumulated);
        }
        self.oversize_allocations.reset_accumulated();
        self.oversize_segments.reset_accumulated();
        self.num_alloc_retries = 0;
        self.num_ooms = 0;
        self.num_sync_all_streams = 0;
        self.num_device_alloc = 0;
        self.num_device_free = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn there_are_122_keys() {
        let m = DeviceStats::default().to_map();
        assert_eq!(m.len(), 122);
        assert!(m.contains_key("allocation.all.current"));
        assert!(m.contains_key("requested_bytes.small_pool.freed"));
        assert!(m.contains_key("oversize_segments.peak"));
    }

    #[test]
    fn a_counter_that_disagrees_with_the_recount_is_named() {
        let recounted = DeviceStats::default();
        let mut s = DeviceStats::default();
        assert_eq!(s.mismatch_with_recount(&recounted), None);
        s.active_bytes.increase(PoolKind::Large, 512);
        assert_eq!(
            s.mismatch_with_recount(&recounted).as_deref(),
            Some("active_bytes.all.current is 512, but a recount of the snapshot gives 0")
        );
    }

    #[test]
    fn stat_semantics() {
        let mut s = Stat::default();
        s.increase(10);
        s.decrease(4);
        s.increase(1);
        assert_eq!(s, Stat { current: 7, peak: 10, allocated: 11, freed: 4 });
        s.reset_peak();
        assert_eq!(s.peak, 7);
        s.reset_accumulated();
        assert_eq!((s.allocated, s.freed), (0, 0));
    }
}
