//! What unmapping a chunk waits for: events of the streams that freed blocks on it, and the
//! default stream once per call.
//!
//! Note [Which wait before unmapping]
//! -----------------------------------
//! Unmapping does not wait for the GPU (Note [Unmapping does not wait] in
//! `device/cuda.rs`). PyTorch waits for the segment's stream. Here the default stream's
//! work is waited for once per call (it cannot be destroyed). Work of other streams is
//! waited for through events recorded when their blocks on the chunk were freed: at a
//! free the program still holds the stream, while by the time the chunk is unmapped it
//! may have destroyed it, so the stream itself must not be synchronized then. One event
//! per stream and chunk, the latest, covers all earlier work of that stream. No wait
//! is device-wide (a device-wide wait under the lock would stall every thread's cache
//! hits), except where an event could not be recorded.

use crate::device::{Device, EventId, StreamId};
use crate::error::AllocError;
use crate::packed::{Packed, Waited};

impl<D: Device> Packed<D> {
    /// Remembers, on every chunk under the block `[addr, addr + size)` just freed by
    /// `stream` (not the default one), an event recorded on `stream` now: unmapping any of
    /// those chunks waits for it (Note [Which wait before unmapping]).
    pub(crate) fn note_stream_free(&mut self, addr: u64, size: u64, stream: StreamId) {
        let event = match self.spare_events.pop().map_or_else(|| self.device.create_event(), Ok) {
            Ok(e) => match self.device.record_event(e, stream) {
                Ok(()) => Some(e),
                Err(_) => {
                    self.spare_events.push(e);
                    None
                }
            },
            Err(_) => None,
        };
        let mut p = addr;
        while p < addr + size {
            let c = self.chunk_at(p).expect("live blocks are mapped");
            let ch = self.chunks[c as usize].as_mut().unwrap();
            p = ch.start + ch.size;
            let Some(e) = event else {
                ch.wait_device = true;
                continue;
            };
            *self.event_refs.entry(e.0).or_insert(0) += 1;
            let old = match ch.waits.iter_mut().find(|w| w.0 == stream) {
                Some(w) => Some(std::mem::replace(&mut w.1, e)),
                None => {
                    ch.waits.push((stream, e));
                    None
                }
            };
            if let Some(old) = old {
                // a later event of the same stream covers the earlier one
                self.unref_event(old);
            }
        }
        if let Some(e) = event.filter(|e| !self.event_refs.contains_key(&e.0)) {
            self.spare_events.push(e);
        }
    }

    /// One chunk fewer holds `e`; the last one gives it back to the spares.
    pub(crate) fn unref_event(&mut self, e: EventId) {
        let n = self.event_refs.get_mut(&e.0).expect("a held event");
        *n -= 1;
        if *n == 0 {
            self.event_refs.remove(&e.0);
            self.spare_events.push(e);
        }
    }

    /// Waits for the work that may still use chunk `c`'s pages (Note [Which wait before
    /// unmapping]), and lets go of its events. Where a wait fails, the chunk keeps its events
    /// and waits for the whole device the next time: it is never unmapped unwaited.
    pub(crate) fn wait_for_chunk(&mut self, c: u32) -> Result<(), AllocError> {
        let ch = self.chunks[c as usize].as_ref().expect("a live chunk");
        let (waits, wait_device) = (ch.waits.clone(), ch.wait_device);
        if let Err(e) = self.wait_for(&waits, wait_device) {
            self.chunks[c as usize].as_mut().unwrap().wait_device = true;
            return Err(e);
        }
        self.chunks[c as usize].as_mut().unwrap().waits.clear();
        for (_, e) in waits {
            self.unref_event(e);
        }
        Ok(())
    }

    /// Waits for `events` (unless the device was waited for in this call), and for the
    /// default stream or, with `device`, the whole device, once per call.
    fn wait_for(&mut self, events: &[(StreamId, EventId)], device: bool) -> Result<(), AllocError> {
        for &(_, e) in events {
            if self.waited < Waited::Device && !self.device.query_event(e)? {
                self.device.synchronize_event(e)?;
            }
        }
        let waited = if device { Waited::Device } else { Waited::DefaultStream };
        if self.waited < waited {
            match waited {
                Waited::Device => self.device.synchronize_device()?,
                _ => self.device.synchronize_stream(StreamId::DEFAULT)?,
            }
            self.waited = waited;
        }
        Ok(())
    }
}
