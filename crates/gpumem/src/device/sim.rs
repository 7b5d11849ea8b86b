//! `SimDevice`: a simulated GPU. It never touches real memory.
//!
//! It has a capacity, hands out non-overlapping addresses, keeps VMM reservations and
//! mappings, and has events whose completion the caller controls: an event recorded on a
//! stream stays pending until the test (or the replay engine) completes that stream, or until
//! someone synchronizes on it, as a host thread waiting for the GPU would. Every call is
//! counted.

use crate::device::{Device, DeviceError, EventId, StreamId};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

/// The total memory of an H100 80GB as `cuMemGetInfo` reports it: the default capacity.
pub const H100_CAPACITY: u64 = 81079 << 20;

/// The largest capacity a simulated GPU takes: 16 TiB, some fifty times the largest GPU's
/// memory. Policies size their address ranges from the capacity (several times over), and
/// PyTorch's expandable segments map a request page by page (a 150 TiB request on a 1 PiB
/// device took minutes of map calls, found by fuzzing); a larger capacity is taken as this.
pub const MAX_SIM_CAPACITY: u64 = 1 << 44;

/// Where fresh segment addresses start. Addresses preset from a trace (around `0x7f..`) lie
/// far above, so the two never meet.
const FRESH_BASE: u64 = 0x1000_0000_0000;
/// Where virtual address reservations start.
const VA_BASE: u64 = 0x4000_0000_0000;
const ALIGN: u64 = 2 << 20;

/// How many times each [`Device`] call was made on a [`SimDevice`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimCounters {
    /// Successful `malloc` calls.
    pub mallocs: u64,
    /// `free` calls.
    pub frees: u64,
    /// Successful `map` calls.
    pub maps: u64,
    /// `unmap` calls.
    pub unmaps: u64,
    /// `remap` and `remap_staged` calls (each also counted as one unmap and a map per kept
    /// range).
    pub remaps: u64,
    /// Of those, `remap_staged` calls.
    pub staged_remaps: u64,
    /// `reserve` calls.
    pub reserves: u64,
    /// `unreserve` calls.
    pub unreserves: u64,
    /// Calls refused for lack of memory.
    pub ooms: u64,
    /// `create_event` calls.
    pub events_created: u64,
    /// `record_event` calls.
    pub events_recorded: u64,
    /// `query_event` calls.
    pub events_queried: u64,
    /// `synchronize_event`, `synchronize_stream` and `synchronize_device` calls.
    pub synchronizes: u64,
    /// Of those, `synchronize_device` calls: waits for every stream at once.
    pub device_synchronizes: u64,
    /// `mem_get_info` calls.
    pub mem_get_info: u64,
}

#[derive(Default)]
struct Event {
    stream: Option<StreamId>,
    complete: bool,
}

struct State {
    capacity: u64,
    used: u64,
    next_fresh: u64,
    next_va: u64,
    preset: VecDeque<(u64, u64)>,
    malloc_log: Vec<(u64, u64)>,
    segments: BTreeMap<u64, u64>,
    reservations: BTreeMap<u64, u64>,
    mappings: BTreeMap<u64, u64>,
    /// Simulated contents: one word per address written with `write_tag`.
    tags: BTreeMap<u64, u64>,
    events: HashMap<u64, Event>,
    next_event: u64,
    auto_complete: bool,
    counters: SimCounters,
}

/// A simulated GPU. Cloning it gives another handle to the same device, so a test can keep
/// one while the allocator owns the other.
///
/// ```
/// use gpumem::{Device, SimDevice};
/// let sim = SimDevice::new(1 << 30);
/// let p = sim.malloc(2 << 20).unwrap();
/// assert_eq!(sim.mem_get_info().unwrap(), ((1 << 30) - (2 << 20), 1 << 30));
/// sim.free(p).unwrap();
/// ```
#[derive(Clone)]
pub struct SimDevice {
    state: Arc<Mutex<State>>,
}

impl Default for SimDevice {
    fn default() -> Self {
        SimDevice::new(H100_CAPACITY)
    }
}

impl SimDevice {
    /// A simulated GPU with `capacity` bytes of memory (at most [`MAX_SIM_CAPACITY`]).
    pub fn new(capacity: u64) -> SimDevice {
        SimDevice {
            state: Arc::new(Mutex::new(State {
                capacity: capacity.min(MAX_SIM_CAPACITY),
                used: 0,
                next_fresh: FRESH_BASE,
                next_va: VA_BASE,
                preset: VecDeque::new(),
                malloc_log: Vec::new(),
                segments: BTreeMap::new(),
                reservations: BTreeMap::new(),
                mappings: BTreeMap::new(),
                tags: BTreeMap::new(),
                events: HashMap::new(),
                next_event: 1,
                auto_complete: false,
                counters: SimCounters::default(),
            })),
        }
    }

    /// Writes one word of simulated contents at `addr`, which must lie in a live segment or
    /// mapping. The word survives as long as the memory under it: freeing or unmapping that
    /// memory loses it, and `remap` keeps it only in the kept ranges. Tests use it to check
    /// that moving pages keeps the data of live blocks.
    pub fn write_tag(&self, addr: u64, tag: u64) -> Result<(), DeviceError> {
        let mut s = self.state.lock();
        if !overlaps(&s.segments, addr, 1) && !overlaps(&s.mappings, addr, 1) {
            return Err(DeviceError::InvalidAddress(addr, "no memory is mapped there"));
        }
        s.tags.insert(addr, tag);
        Ok(())
    }

    /// The word last written at `addr` with [`SimDevice::write_tag`], if its memory is still
    /// there.
    pub fn read_tag(&self, addr: u64) -> Option<u64> {
        self.state.lock().tags.get(&addr).copied()
    }

    /// Presets the addresses of future segments: each `(size, address)` is used, in order, by
    /// the next `malloc` of exactly that size, as long as the address is free. A `malloc`
    /// of another size gets a fresh address and leaves the preset list alone. The replay engine uses
    /// this to hand out a trace's own segment addresses, so that ties between equal free
    /// blocks (ordered by address) break the way they did in the recorded run.
    pub fn preset_addresses(&self, segments: impl IntoIterator<Item = (u64, u64)>) {
        self.state.lock().preset = segments.into_iter().collect();
    }

    /// Makes every recorded event complete at once (as if the GPU were infinitely fast).
    pub fn set_auto_complete(&self, on: bool) {
        self.state.lock().auto_complete = on;
    }

    /// Completes every event recorded so far on `stream`.
    pub fn complete_stream(&self, stream: StreamId) {
        let mut s = self.state.lock();
        for e in s.events.values_mut() {
            if e.stream == Some(stream) {
                e.complete = true;
            }
        }
    }

    /// Completes every event recorded so far.
    pub fn complete_all(&self) {
        let mut s = self.state.lock();
        for e in s.events.values_mut() {
            e.complete = true;
        }
    }

    /// Completes one event.
    pub fn complete_event(&self, event: EventId) {
        if let Some(e) = self.state.lock().events.get_mut(&event.0) {
            e.complete = true;
        }
    }

    /// The call counters.
    pub fn counters(&self) -> SimCounters {
        self.state.lock().counters
    }

    /// Bytes of physical memory in use (segments plus mapped pages).
    pub fn used(&self) -> u64 {
        self.state.lock().used
    }

    /// The capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.state.lock().capacity
    }

    /// Every successful `malloc` so far as `(size, address)`, in order.
    pub fn malloc_log(&self) -> Vec<(u64, u64)> {
        self.state.lock().malloc_log.clone()
    }

    /// Live segments as `(address, size)`, in address order.
    pub fn live_segments(&self) -> Vec<(u64, u64)> {
        self.state.lock().segments.iter().map(|(&p, &s)| (p, s)).collect()
    }

    /// Live mappings as `(address, size)`, in address order.
    pub fn live_mappings(&self) -> Vec<(u64, u64)> {
        self.state.lock().mappings.iter().map(|(&p, &s)| (p, s)).collect()
    }

    /// Live virtual address reservations as `(address, size)`.
    pub fn live_reservations(&self) -> Vec<(u64, u64)> {
        let s = self.state.lock();
        s.reservations.iter().map(|(&p, &z)| (p, z)).collect()
    }

    /// Events recorded and not yet complete.
    pub fn pending_events(&self) -> usize {
        let s = self.state.lock();
        s.events.values().filter(|e| e.stream.is_some() && !e.complete).count()
    }
}

fn overlaps(map: &BTreeMap<u64, u64>, ptr: u64, size: u64) -> bool {
    if let Some((&p, &s)) = map.range(..ptr.saturating_add(size)).next_back() {
        if p.saturating_add(s) > ptr {
            return true;
        }
    }
    false
}

/// Whether `ptr..ptr + size` lies wholly in mappings (one or several adjacent ones).
fn covered(map: &BTreeMap<u64, u64>, ptr: u64, size: u64) -> bool {
    let mut at = ptr;
    while at < ptr.saturating_add(size) {
        match map.range(..=at).next_back() {
            Some((&p, &s)) if p.saturating_add(s) > at => at = p.saturating_add(s),
            _ => return false,
        }
    }
    true
}

/// Checks a remap's arguments: a mapping of exactly that size, and kept ranges sorted,
/// page-aligned and inside it.
fn check_remap(s: &State, ptr: u64, size: u64, keep: &[(u64, u64)]) -> Result<(), DeviceError> {
    if s.mappings.get(&ptr) != Some(&size) {
        return Err(DeviceError::InvalidAddress(ptr, "not a mapping of that size"));
    }
    // mappings never wrap (map checks); a kept range that would is outside the mapping
    if keep.iter().any(|&(a, n)| a.checked_add(n).is_none()) {
        return Err(DeviceError::InvalidAddress(ptr, "a kept range wraps the address space"));
    }
    let mut at = ptr;
    for &(a, n) in keep {
        if a < at || a + n > ptr + size || n == 0 || !a.is_multiple_of(ALIGN) || !n.is_multiple_of(ALIGN) {
            return Err(DeviceError::InvalidAddress(
                a,
                "kept range unsorted, unaligned or outside the mapping",
            ));
        }
        at = a + n;
    }
    Ok(())
}

/// An event id this device did not create, or destroyed: an error, as on the GPU.
fn unknown_event(event: EventId) -> DeviceError {
    DeviceError::InvalidHandle {
        what: "event",
        id: event.0,
        why: "not an event this device created, or destroyed already",
    }
}

fn round_up(x: u64, to: u64) -> u64 {
    x.div_ceil(to) * to
}

impl State {
    /// Replaces the mapping at `ptr` by the mappings `keep` (a remap), counting the calls.
    fn replace_mapping(&mut self, ptr: u64, size: u64, keep: &[(u64, u64)]) {
        debug_assert_eq!(self.mappings.get(&ptr), Some(&size));
        self.mappings.remove(&ptr);
        self.mappings.extend(keep.iter().copied());
        self.counters.remaps += 1;
        self.counters.unmaps += 1;
        self.counters.maps += keep.len() as u64;
    }

    fn drop_tags(&mut self, from: u64, to: u64) {
        if from < to {
            let gone: Vec<u64> = self.tags.range(from..to).map(|(&a, _)| a).collect();
            for a in gone {
                self.tags.remove(&a);
            }
        }
    }

    fn take_memory(&mut self, size: u64) -> Result<(), DeviceError> {
        if size > self.capacity - self.used {
            self.counters.ooms += 1;
            return Err(DeviceError::OutOfMemory);
        }
        self.used += size;
        Ok(())
    }

    fn event(&mut self, event: EventId) -> Result<&mut Event, DeviceError> {
        self.events.get_mut(&event.0).ok_or_else(|| unknown_event(event))
    }
}

impl Device for SimDevice {
    fn name(&self) -> String {
        "simulated GPU".to_string()
    }

    fn malloc(&self, size: u64) -> Result<u64, DeviceError> {
        let mut s = self.state.lock();
        if size == 0 {
            return Err(DeviceError::InvalidAddress(0, "zero-size segment"));
        }
        s.take_memory(size)?;
        let preset = match s.preset.front() {
            // a preset address whose segment would reach the top half of the address space
            // is ignored: the policies add sizes to addresses, and no GPU hands those out
            Some(&(psize, paddr))
                if psize == size
                    && paddr.checked_add(size).is_some_and(|end| end <= 1 << 63)
                    && !overlaps(&s.segments, paddr, size) =>
            {
                s.preset.pop_front();
                Some(paddr)
            }
            _ => None,
        };
        let ptr = preset.unwrap_or_else(|| {
            let p = s.next_fresh;
            s.next_fresh = round_up(p + size, ALIGN);
            p
        });
        s.segments.insert(ptr, size);
        s.malloc_log.push((size, ptr));
        s.counters.mallocs += 1;
        Ok(ptr)
    }

    fn free(&self, ptr: u64) -> Result<(), DeviceError> {
        let mut s = self.state.lock();
        let size = s.segments.remove(&ptr).ok_or(DeviceError::InvalidAddress(ptr, "not a live segment"))?;
        s.used -= size;
        s.drop_tags(ptr, ptr + size);
        s.counters.frees += 1;
        Ok(())
    }

    fn mem_get_info(&self) -> Result<(u64, u64), DeviceError> {
        let mut s = self.state.lock();
        s.counters.mem_get_info += 1;
        Ok((s.capacity - s.used, s.capacity))
    }

    fn reserve(&self, size: u64) -> Result<u64, DeviceError> {
        let mut s = self.state.lock();
        let ptr = s.next_va;
        // the simulated address space ends at 2^62, far above any real reservation
        let end = ptr
            .checked_add(size)
            .and_then(|e| e.checked_next_multiple_of(ALIGN))
            .filter(|&e| e < 1 << 62)
            .ok_or(DeviceError::OutOfMemory)?;
        s.next_va = end + ALIGN;
        s.reservations.insert(ptr, size);
        s.counters.reserves += 1;
        Ok(ptr)
    }

    fn unreserve(&self, ptr: u64, size: u64) -> Result<(), DeviceError> {
        let mut s = self.state.lock();
        if s.reservations.get(&ptr) != Some(&size) {
            return Err(DeviceError::InvalidAddress(ptr, "not a reservation of that size"));
        }
        if overlaps(&s.mappings, ptr, size) {
            return Err(DeviceError::InvalidAddress(ptr, "reservation still has mapped pages"));
        }
        s.reservations.remove(&ptr);
        s.counters.unreserves += 1;
        Ok(())
    }

    fn map(&self, ptr: u64, size: u64) -> Result<(), DeviceError> {
        let mut s = self.state.lock();
        let inside = s
            .reservations
            .range(..=ptr)
            .next_back()
            .is_some_and(|(&p, &z)| ptr.checked_add(size).is_some_and(|end| end <= p + z));
        if !inside || size == 0 || !ptr.is_multiple_of(ALIGN) || !size.is_multiple_of(ALIGN) {
            return Err(DeviceError::InvalidAddress(ptr, "map outside a reservation or unaligned"));
        }
        if overlaps(&s.mappings, ptr, size) {
            return Err(DeviceError::InvalidAddress(ptr, "range already mapped"));
        }
        s.take_memory(size)?;
        s.mappings.insert(ptr, size);
        s.counters.maps += 1;
        Ok(())
    }

    fn unmap(&self, ptr: u64, size: u64) -> Result<(), DeviceError> {
        let mut s = self.state.lock();
        if s.mappings.get(&ptr) != Some(&size) {
            return Err(DeviceError::InvalidAddress(ptr, "not a mapping of that size"));
        }
        s.mappings.remove(&ptr);
        s.used -= size;
        s.drop_tags(ptr, ptr + size);
        s.counters.unmaps += 1;
        Ok(())
    }

    fn remap(&self, ptr: u64, size: u64, keep: &[(u64, u64)]) -> Result<(), DeviceError> {
        let mut s = self.state.lock();
        check_remap(&s, ptr, size, keep)?;
        // Both allocations are held while the contents are copied.
        let kept: u64 = keep.iter().map(|k| k.1).sum();
        s.take_memory(kept)?;
        s.used -= size;
        s.replace_mapping(ptr, size, keep);
        let mut at = ptr;
        for &(a, n) in keep.iter().chain(std::iter::once(&(ptr + size, 0))) {
            s.drop_tags(at, a);
            at = a + n;
        }
        Ok(())
    }

    fn remap_staged(
        &self,
        ptr: u64,
        size: u64,
        keep: &[(u64, u64)],
        save: &[(u64, u64, u64)],
    ) -> Result<(), DeviceError> {
        let mut s = self.state.lock();
        check_remap(&s, ptr, size, keep)?;
        let mut targets: Vec<(u64, u64)> = save.iter().map(|&(_, to, n)| (to, n)).collect();
        targets.sort_unstable();
        if targets.windows(2).any(|w| w[0].0 + w[0].1 > w[1].0) {
            return Err(DeviceError::InvalidAddress(
                targets[0].0,
                "saved ranges overlap in the staging area",
            ));
        }
        for &(from, to, n) in save {
            let inside = keep.iter().any(|&(a, k)| from >= a && from + n <= a + k);
            if !inside || to < ptr + size && to + n > ptr || !covered(&s.mappings, to, n) {
                return Err(DeviceError::InvalidAddress(
                    to,
                    "a saved range outside the kept pages, or staged where nothing is mapped or inside the range",
                ));
            }
        }
        // Copied out (what was in the staging area is overwritten), the old allocation
        // released, the new ones made (the pages are fresh: nothing of the old contents is
        // left), and the saved words copied back.
        let moved = |s: &State, from: u64, to: u64, n: u64| -> Vec<(u64, u64)> {
            s.tags.range(from..from + n).map(|(&a, &t)| (to + (a - from), t)).collect()
        };
        // (the staging areas lie outside the range and apart, so no copy reads another's)
        for &(from, to, n) in save {
            let words = moved(&s, from, to, n);
            s.drop_tags(to, to + n);
            s.tags.extend(words);
        }
        s.used -= size;
        let kept: u64 = keep.iter().map(|k| k.1).sum();
        if let Err(e) = s.take_memory(kept) {
            s.used += size;
            return Err(e);
        }
        s.replace_mapping(ptr, size, keep);
        s.drop_tags(ptr, ptr + size);
        for &(from, to, n) in save {
            let back = moved(&s, to, from, n);
            s.tags.extend(back);
        }
        s.counters.staged_remaps += 1;
        Ok(())
    }

    fn create_event(&self) -> Result<EventId, DeviceError> {
        let mut s = self.state.lock();
        let id = s.next_event;
        s.next_event += 1;
        s.events.insert(id, Event::default());
        s.counters.events_created += 1;
        Ok(EventId(id))
    }

    fn destroy_event(&self, event: EventId) -> Result<(), DeviceError> {
        let mut s = self.state.lock();
        s.events.remove(&event.0).map(|_| ()).ok_or_else(|| unknown_event(event))
    }

    fn record_event(&self, event: EventId, stream: StreamId) -> Result<(), DeviceError> {
        let mut s = self.state.lock();
        let auto = s.auto_complete;
        s.counters.events_recorded += 1;
        let e = s.event(event)?;
        e.stream = Some(stream);
        e.complete = auto;
        Ok(())
    }

    fn query_event(&self, event: EventId) -> Result<bool, DeviceError> {
        let mut s = self.state.lock();
        s.counters.events_queried += 1;
        Ok(s.event(event)?.complete)
    }

    fn synchronize_event(&self, event: EventId) -> Result<(), DeviceError> {
        let mut s = self.state.lock();
        s.counters.synchronizes += 1;
        s.event(event)?.complete = true;
        Ok(())
    }

    fn synchronize_stream(&self, stream: StreamId) -> Result<(), DeviceError> {
        self.state.lock().counters.synchronizes += 1;
        self.complete_stream(stream);
        Ok(())
    }

    fn synchronize_device(&self) -> Result<(), DeviceError> {
        let mut s = self.state.lock();
        s.counters.synchronizes += 1;
        s.counters.device_synchronizes += 1;
        drop(s);
        self.complete_all();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_near_the_top_of_the_space_are_refused_not_wrapped() {
        let sim = SimDevice::new(u64::MAX);
        assert_eq!(sim.capacity(), MAX_SIM_CAPACITY);
        assert!(sim.reserve(u64::MAX).is_err());
        assert!(sim.reserve(u64::MAX - VA_BASE).is_err());
        assert!(sim.map(u64::MAX - ALIGN + 1, ALIGN).is_err());
        assert!(sim.map(VA_BASE, u64::MAX - ALIGN + 1).is_err());
        assert!(sim.write_tag(u64::MAX, 1).is_err());
        // a preset address whose segment would wrap is not used
        sim.preset_addresses([(ALIGN, u64::MAX - ALIGN + 1)]);
        let p = sim.malloc(ALIGN).unwrap();
        assert!(p < 1 << 62, "{p:#x}");
        let va = sim.reserve(4 * ALIGN).unwrap();
        sim.map(va, 2 * ALIGN).unwrap();
        assert!(sim.remap(va, 2 * ALIGN, &[(u64::MAX, 2)]).is_err());
    }

    const MIB: u64 = 1 << 20;

    /// A device of 12 MiB with an 8 MiB mapping holding words in its first and last pages,
    /// and a 2 MiB mapping beside it to stage them in.
    fn full_device() -> (SimDevice, u64, u64) {
        let sim = SimDevice::new(12 * MIB);
        let va = sim.reserve(64 * MIB).unwrap();
        sim.map(va, 8 * MIB).unwrap();
        sim.map(va + 16 * MIB, 2 * MIB).unwrap();
        for (a, t) in [(va + 100, 1), (va + MIB, 2), (va + 7 * MIB + 8, 3), (va + 5 * MIB, 4)] {
            sim.write_tag(a, t).unwrap();
        }
        (sim, va, va + 16 * MIB)
    }

    #[test]
    fn a_staged_remap_keeps_the_saved_words_without_holding_both_allocations() {
        let (sim, va, stage) = full_device();
        let keep = [(va, 2 * MIB), (va + 6 * MIB, 2 * MIB)];
        // a plain remap would hold 8 + 4 MiB beside the 2 MiB staging mapping: no room
        assert_eq!(sim.remap(va, 8 * MIB, &keep), Err(DeviceError::OutOfMemory));
        let save = [(va, stage, MIB + 8), (va + 7 * MIB, stage + 3 * MIB / 2, 16)];
        sim.remap_staged(va, 8 * MIB, &keep, &save).unwrap();
        assert_eq!(sim.used(), 6 * MIB);
        assert_eq!(sim.live_mappings(), vec![(va, 2 * MIB), (va + 6 * MIB, 2 * MIB), (stage, 2 * MIB)]);
        // saved words come back; the word on a given-back page and the unsaved one do not
        assert_eq!(sim.read_tag(va + 100), Some(1));
        assert_eq!(sim.read_tag(va + MIB), Some(2));
        assert_eq!(sim.read_tag(va + 7 * MIB + 8), Some(3));
        assert_eq!(sim.read_tag(va + 5 * MIB), None);
        assert_eq!(sim.counters().staged_remaps, 1);
    }

    #[test]
    fn a_staged_remap_refuses_what_would_lose_data() {
        let (sim, va, stage) = full_device();
        let keep = [(va, 2 * MIB)];
        let bad: [&[(u64, u64, u64)]; 4] = [
            &[(va + 5 * MIB, stage, 16)],                        // not a kept page
            &[(va, va + 4 * MIB, 16)],                           // staged inside the range
            &[(va, stage + 2 * MIB, 16)],                        // staged where nothing is mapped
            &[(va, stage, 2 * MIB), (va + 16, stage + MIB, 16)], // staged twice in one place
        ];
        for save in bad {
            let e = sim.remap_staged(va, 8 * MIB, &keep, save).unwrap_err();
            assert!(matches!(e, DeviceError::InvalidAddress(..)), "{save:?}: {e}");
        }
        assert_eq!(sim.used(), 10 * MIB, "nothing changed");
        assert_eq!(sim.read_tag(va + 7 * MIB + 8), Some(3));
    }
}
