//! [`StreamOracle`]: a [`Device`] wrapper that checks, independently of any policy's
//! bookkeeping, that no memory freed on one stream is handed to another before the work that
//! used it is known to be done.
//!
//! Note [The stream-ordering oracle]
//! ---------------------------------
//! A caching allocator may hand bytes freed by a block of stream S to a block of stream T
//! only once the GPU has finished the work queued on S (and on every stream the block was
//! `record_stream`'d to) before the free. Each policy proves that to itself with its own
//! events and flags, so a bug in that bookkeeping would also blind any check that reads it.
//! The oracle therefore keeps its own books and trusts only two sources:
//!
//! - the device calls it sees pass through (it wraps the allocator's `Device`): each
//!   `record_event` on stream X gets the next *sequence number* of X; an event that
//!   `query_event` reports complete, or that `synchronize_event` waited for, proves X has
//!   reached that number; `synchronize_stream(X)` proves every number issued on X so far,
//!   `synchronize_device` every number on every stream, and so does a segment `free`, because
//!   `cuMemFree` synchronizes the device implicitly (PyTorch relies on it; unmapping does not
//!   synchronize, which is why the engines wait before they unmap);
//! - what the driver of the allocator (the replay, a test) tells it the program did:
//!   `note_malloc`, `note_record_stream`, `note_free`. Sizes come from its own map of live
//!   blocks, and it tracks the bytes the program asked for, not the policy's rounded blocks:
//!   only those bytes carry the program's work.
//!
//! At a free, each stream X that used the block (its own and its `record_stream` ones) must
//! reach the number that the *next* event recorded on X will get: that event is the first
//! that can prove the work queued before the free is done. (A sync of X is modelled as one
//! such number issued and reached at once, so a free after the sync is not covered by it.)
//! The freed bytes keep those requirements in an interval map. When a later `malloc` hands
//! any of them to stream T, each remembered stream X other than T must have reached its
//! number; T's own work needs no wait, since a stream runs in order. Bytes where every such
//! X is known done count as `cross_stream_reuses`; bytes where one is not count as
//! `stream_violations`, and the first is described. Reusing bytes on the stream that freed
//! them thus needs only their `record_stream` streams to be done.
//!
//! The model is conservative where it cannot know better: an event on X that completes
//! proves only what was queued before it, and a test's `SimDevice::complete_stream` proves
//! nothing to the oracle until the allocator (or someone) queries an event or syncs: the
//! allocator too may rely only on what it has observed.

use crate::device::{Device, DeviceError, EventId, StreamId};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

/// The first unsynchronized reuse a [`StreamOracle`] saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamViolation {
    /// Which noted call (`note_malloc`, `note_free`, `note_record_stream`, counted from 1)
    /// handed the bytes out.
    pub call: u64,
    /// The first byte reused too early.
    pub addr: u64,
    /// How many bytes from `addr` on (one run with the same history).
    pub size: u64,
    /// The stream of the block that freed them.
    pub freed_on: StreamId,
    /// The stream they were handed to.
    pub reused_on: StreamId,
    /// A stream that used them and was not known to be done with them.
    pub unfinished: StreamId,
    /// Whether the bytes were unmapped (rather than handed to `reused_on`) before that work
    /// was known to be done: a kernel still running on them would fault.
    pub unmapped: bool,
}

impl fmt::Display for StreamViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = if self.unmapped {
            "were unmapped".to_string()
        } else {
            format!("were handed to stream {}", self.reused_on)
        };
        write!(
            f,
            "call {}: {} bytes at {:#x}, freed by a block of stream {}, {what} before the work of \
             stream {} on them was known to be done",
            self.call, self.size, self.addr, self.freed_on, self.unfinished
        )
    }
}

/// What a [`StreamOracle`] has seen so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamReport {
    /// Bytes that another stream had used (the stream of the block that freed them, or one
    /// it was `record_stream`'d to) handed to a stream after that work was known to be done:
    /// properly synchronized cross-stream reuse.
    pub cross_stream_reuses: u64,
    /// Bytes handed to a stream while another stream's work on them was not known to be
    /// done.
    pub stream_violations: u64,
    /// Mallocs that handed out at least one such byte.
    pub stream_violation_count: u64,
    /// The first of them.
    pub first_violation: Option<StreamViolation>,
}

/// A stream's sequence numbers: the last one issued (an event recorded, or a sync) and the
/// highest one known to be reached.
#[derive(Clone, Copy, Default)]
struct Clock {
    issued: u64,
    done: u64,
}

/// A live block as the program noted it.
struct Live {
    size: u64,
    stream: StreamId,
    uses: Vec<StreamId>,
}

/// A run of freed bytes `[start, end)` with what must be done before another stream may
/// use them: (stream, the sequence number it must reach), sorted by stream.
#[derive(Clone, PartialEq, Eq)]
struct Freed {
    end: u64,
    freed_on: StreamId,
    waits: Vec<(StreamId, u64)>,
}

#[derive(Default)]
struct State {
    clocks: HashMap<StreamId, Clock>,
    events: HashMap<EventId, (StreamId, u64)>,
    live: BTreeMap<u64, Live>,
    freed: BTreeMap<u64, Freed>,
    calls: u64,
    report: StreamReport,
}

impl State {
    fn clock(&mut self, s: StreamId) -> &mut Clock {
        self.clocks.entry(s).or_default()
    }

    /// Issues a number on `s` for a synchronization about to start, returning it: frees
    /// noted from now on need a later one.
    fn issue(&mut self, s: StreamId) -> u64 {
        let c = self.clock(s);
        c.issued += 1;
        c.issued
    }

    /// Stream `s` has reached number `n`.
    fn reach(&mut self, s: StreamId, n: u64) {
        let c = self.clock(s);
        c.done = c.done.max(n);
    }

    /// Issues a number on every stream for a device-wide synchronization about to start.
    fn issue_all(&mut self) -> Vec<(StreamId, u64)> {
        let streams: Vec<StreamId> = self.clocks.keys().copied().collect();
        streams.into_iter().map(|x| (x, self.issue(x))).collect()
    }

    fn reached(&self, s: StreamId, n: u64) -> bool {
        self.clocks.get(&s).is_some_and(|c| c.done >= n)
    }

    /// Removes `[start, end)` from the freed map and returns the pieces that were there,
    /// clipped to it, as (start, piece).
    fn take(&mut self, start: u64, end: u64) -> Vec<(u64, Freed)> {
        // a run that begins before `start` and reaches into it is split at `start`
        if let Some((&a, f)) = self.freed.range(..start).next_back() {
            if f.end > start {
                let right = f.clone();
                self.freed.get_mut(&a).expect("present").end = start;
                self.freed.insert(start, right);
            }
        }
        let keys: Vec<u64> = self.freed.range(start..end).map(|(&a, _)| a).collect();
        let mut out = Vec::with_capacity(keys.len());
        for a in keys {
            let mut f = self.freed.remove(&a).expect("present");
            if f.end > end {
                let rest = Freed { end: f.end, ..f.clone() };
                self.freed.insert(end, rest);
                f.end = end;
            }
            out.push((a, f));
        }
        out
    }

    /// Records `[start, f.end)` as freed, merging it with equal neighbours so that the map
    /// stays proportional to the distinct runs.
    fn put(&mut self, mut start: u64, mut f: Freed) {
        self.take(start, f.end);
        if let Some((&a, left)) = self.freed.range(..start).next_back() {
            if left.end == start && left.freed_on == f.freed_on && left.waits == f.waits {
                self.freed.remove(&a);
                start = a;
            }
        }
        if let Some(right) = self.freed.get(&f.end) {
            if right.freed_on == f.freed_on && right.waits == f.waits {
                let end = right.end;
                self.freed.remove(&f.end);
                f.end = end;
            }
        }
        self.freed.insert(start, f);
    }
}

struct Shared<D> {
    device: D,
    state: Mutex<State>,
}

/// A [`Device`] that passes every call to the device it wraps and checks the stream
/// ordering of the memory an allocator hands out (Note \[The stream-ordering oracle\] in the
/// source). Give it to the allocator, keep a clone, and tell it what the allocator did with
/// [`StreamOracle::note_malloc`], [`StreamOracle::note_record_stream`] and
/// [`StreamOracle::note_free`]; [`StreamOracle::report`] says what it found. Clones share one
/// state, and it is safe to use from several threads.
///
/// ```
/// use gpumem::{Allocator, AllocatorConfig, SimDevice, StreamId, StreamOracle};
/// let oracle = StreamOracle::new(SimDevice::default());
/// let alloc = Allocator::new(oracle.clone(), AllocatorConfig::parse("policy:torch")?)?;
/// let p = alloc.malloc(4096, StreamId(1))?;
/// oracle.note_malloc(p, 4096, StreamId(1));
/// oracle.note_free(p); // just before the allocator's free
/// alloc.free(p)?;
/// assert_eq!(oracle.report().stream_violations, 0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct StreamOracle<D: Device> {
    shared: Arc<Shared<D>>,
}

impl<D: Device> Clone for StreamOracle<D> {
    fn clone(&self) -> Self {
        StreamOracle { shared: Arc::clone(&self.shared) }
    }
}

impl<D: Device> StreamOracle<D> {
    /// An oracle over `device`, having seen nothing yet.
    pub fn new(device: D) -> StreamOracle<D> {
        StreamOracle { shared: Arc::new(Shared { device, state: Mutex::new(State::default()) }) }
    }

    /// The wrapped device (to complete a simulated stream, say: the oracle learns of it only
    /// through the event queries and syncs that follow).
    pub fn device(&self) -> &D {
        &self.shared.device
    }

    /// What the oracle has found so far.
    pub fn report(&self) -> StreamReport {
        self.shared.state.lock().report
    }

    /// The allocator returned `ptr` for `size` requested bytes on `stream`. Call it after the
    /// allocator's `malloc` returns; a `ptr` of 0 or a `size` of 0 is ignored.
    pub fn note_malloc(&self, ptr: u64, size: u64, stream: StreamId) {
        let mut s = self.shared.state.lock();
        s.calls += 1;
        if ptr == 0 || size == 0 {
            return;
        }
        let call = s.calls;
        let mut violated = false;
        for (a, f) in s.take(ptr, ptr + size) {
            let len = f.end - a;
            let mut others = f.waits.iter().filter(|w| w.0 != stream).peekable();
            let any = others.peek().is_some();
            let unfinished = others.find(|&&(x, n)| !s.reached(x, n)).map(|w| w.0);
            let r = &mut s.report;
            match unfinished {
                Some(x) => {
                    violated = true;
                    r.stream_violations += len;
                    r.first_violation.get_or_insert(StreamViolation {
                        call,
                        addr: a,
                        size: len,
                        freed_on: f.freed_on,
                        reused_on: stream,
                        unfinished: x,
                        unmapped: false,
                    });
                }
                None if any => r.cross_stream_reuses += len,
                None => {}
            }
        }
        s.report.stream_violation_count += violated as u64;
        s.live.insert(ptr, Live { size, stream, uses: Vec::new() });
    }

    /// The program recorded a use of the live block at `ptr` on `stream`
    /// (`record_stream`). Unknown pointers are ignored.
    pub fn note_record_stream(&self, ptr: u64, stream: StreamId) {
        let mut s = self.shared.state.lock();
        s.calls += 1;
        if let Some(b) = s.live.get_mut(&ptr) {
            if b.stream != stream && !b.uses.contains(&stream) {
                b.uses.push(stream);
            }
        }
    }

    /// The program frees the block at `ptr`. Call it just *before* the allocator's `free`:
    /// an event the allocator records while freeing must count as coming after the free.
    /// Unknown pointers (and 0) are ignored.
    pub fn note_free(&self, ptr: u64) {
        let mut s = self.shared.state.lock();
        s.calls += 1;
        let Some(b) = s.live.remove(&ptr) else {
            return;
        };
        let mut waits: Vec<(StreamId, u64)> = std::iter::once(b.stream)
            .chain(b.uses.iter().copied())
            .map(|x| (x, s.clock(x).issued + 1))
            .collect();
        waits.sort_unstable();
        s.put(ptr, Freed { end: ptr + b.size, freed_on: b.stream, waits });
    }
}

impl<D: Device> StreamOracle<D> {
    /// Runs a synchronization `f` that covers the numbers `issue` hands out before it starts;
    /// they are reached once it succeeds. The lock is not held while `f` waits for the GPU.
    fn synchronizing<T>(
        &self,
        issue: impl FnOnce(&mut State) -> Vec<(StreamId, u64)>,
        f: impl FnOnce(&D) -> Result<T, DeviceError>,
    ) -> Result<T, DeviceError> {
        let marks = issue(&mut self.shared.state.lock());
        let out = f(&self.shared.device)?;
        let mut s = self.shared.state.lock();
        for (x, n) in marks {
            s.reach(x, n);
        }
        Ok(out)
    }

    /// Runs `f`, which tells whether `event` is complete; if it is, its stream reached the
    /// number the event had when `f` began (read first, in case another thread records it
    /// again meanwhile).
    fn observing(
        &self,
        event: EventId,
        f: impl FnOnce(&D) -> Result<bool, DeviceError>,
    ) -> Result<bool, DeviceError> {
        let mark = self.shared.state.lock().events.get(&event).copied();
        let done = f(&self.shared.device)?;
        if let (true, Some((x, n))) = (done, mark) {
            self.shared.state.lock().reach(x, n);
        }
        Ok(done)
    }
}

impl<D: Device> Device for StreamOracle<D> {
    fn name(&self) -> String {
        self.shared.device.name()
    }
    fn index(&self) -> usize {
        self.shared.device.index()
    }
    fn malloc(&self, size: u64) -> Result<u64, DeviceError> {
        self.shared.device.malloc(size)
    }
    /// `cuMemFree` synchronizes the device before it frees, so the oracle counts it as a
    /// `synchronize_device`.
    fn free(&self, ptr: u64) -> Result<(), DeviceError> {
        self.synchronizing(State::issue_all, |d| d.free(ptr))
    }
    fn mem_get_info(&self) -> Result<(u64, u64), DeviceError> {
        self.shared.device.mem_get_info()
    }
    fn page_granularity(&self) -> u64 {
        self.shared.device.page_granularity()
    }
    fn reserve(&self, size: u64) -> Result<u64, DeviceError> {
        self.shared.device.reserve(size)
    }
    fn unreserve(&self, ptr: u64, size: u64) -> Result<(), DeviceError> {
        self.shared.device.unreserve(ptr, size)
    }
    fn map(&self, ptr: u64, size: u64) -> Result<(), DeviceError> {
        self.shared.device.map(ptr, size)
    }
    /// Unmapping does not wait for the GPU: every stream that used freed bytes in the range
    /// must be known done first (Note \[Which wait before unmapping\] in `packed/waits.rs`),
    /// or a kernel still running there would fault. Bytes that were never freed (fresh pages)
    /// carry no work.
    fn unmap(&self, ptr: u64, size: u64) -> Result<(), DeviceError> {
        let mut s = self.shared.state.lock();
        let call = s.calls;
        let runs: Vec<(u64, Freed)> = s
            .freed
            .range(..ptr.saturating_add(size))
            .filter(|(_, f)| f.end > ptr)
            .map(|(&a, f)| (a, f.clone()))
            .collect();
        let mut violated = false;
        for (a, f) in runs {
            let (lo, hi) = (a.max(ptr), f.end.min(ptr.saturating_add(size)));
            if let Some(&(x, _)) = f.waits.iter().find(|&&(x, n)| !s.reached(x, n)) {
                violated = true;
                s.report.stream_violations += hi - lo;
                s.report.first_violation.get_or_insert(StreamViolation {
                    call,
                    addr: lo,
                    size: hi - lo,
                    freed_on: f.freed_on,
                    reused_on: f.freed_on,
                    unfinished: x,
                    unmapped: true,
                });
            }
        }
        s.report.stream_violation_count += violated as u64;
        drop(s);
        self.shared.device.unmap(ptr, size)
    }
    fn remap(&self, ptr: u64, size: u64, keep: &[(u64, u64)]) -> Result<(), DeviceError> {
        self.shared.device.remap(ptr, size, keep)
    }
    fn remap_staged(
        &self,
        ptr: u64,
        size: u64,
        keep: &[(u64, u64)],
        save: &[(u64, u64, u64)],
    ) -> Result<(), DeviceError> {
        self.shared.device.remap_staged(ptr, size, keep, save)
    }
    fn create_event(&self) -> Result<EventId, DeviceError> {
        self.shared.device.create_event()
    }
    fn destroy_event(&self, event: EventId) -> Result<(), DeviceError> {
        self.shared.state.lock().events.remove(&event);
        self.shared.device.destroy_event(event)
    }
    fn record_event(&self, event: EventId, stream: StreamId) -> Result<(), DeviceError> {
        // numbered under the lock, so that no free is noted between the record and its number
        let mut s = self.shared.state.lock();
        self.shared.device.record_event(event, stream)?;
        let n = s.issue(stream);
        s.events.insert(event, (stream, n));
        Ok(())
    }
    fn query_event(&self, event: EventId) -> Result<bool, DeviceError> {
        self.observing(event, |d| d.query_event(event))
    }
    fn synchronize_event(&self, event: EventId) -> Result<(), DeviceError> {
        self.observing(event, |d| d.synchronize_event(event).map(|()| true)).map(|_| ())
    }
    fn synchronize_stream(&self, stream: StreamId) -> Result<(), DeviceError> {
        self.synchronizing(|s| vec![(stream, s.issue(stream))], |d| d.synchronize_stream(stream))
    }
    fn synchronize_device(&self) -> Result<(), DeviceError> {
        self.synchronizing(State::issue_all, |d| d.synchronize_device())
    }
}
