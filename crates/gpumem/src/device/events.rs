//! Frees that wait for other streams: an event recorded on each stream that used a block, and
//! the check that hands the block back once its events have completed.
//!
//! Note [Why per-stream queues]
//! ----------------------------
//! Work on one stream completes in order, so each stream's events are checked oldest first
//! and the check stops at the first one still pending: it costs one query per completed event
//! plus one per stream. Keeping one queue per stream means a slow stream does not hold up the
//! frees waiting on the others (PyTorch's `cuda_events`, and issue pytorch#71616 for what a
//! single queue would cost). Events are recycled: creating them is slow.

use crate::device::{Device, DeviceError, EventId, StreamId};
use std::collections::{BTreeMap, VecDeque};

/// Events outstanding per stream, each naming the block (`K`) it holds back.
pub(crate) struct PendingFrees<K> {
    queues: BTreeMap<StreamId, VecDeque<(EventId, K)>>,
    spare: Vec<EventId>,
}

impl<K: Copy> Default for PendingFrees<K> {
    fn default() -> Self {
        PendingFrees { queues: BTreeMap::new(), spare: Vec::new() }
    }
}

impl<K: Copy> PendingFrees<K> {
    pub(crate) fn is_empty(&self) -> bool {
        self.queues.is_empty()
    }

    /// Records an event on `stream` that holds `key` back until the work queued there so far
    /// is done.
    pub(crate) fn record<D: Device>(
        &mut self,
        device: &D,
        stream: StreamId,
        key: K,
    ) -> Result<(), DeviceError> {
        let event = match self.spare.pop() {
            Some(e) => e,
            None => device.create_event()?,
        };
        if let Err(e) = device.record_event(event, stream) {
            // an unknown stream (Device::check_stream) leaves the event unused, not lost
            self.spare.push(event);
            return Err(e);
        }
        self.queues.entry(stream).or_default().push_back((event, key));
        Ok(())
    }

    /// The keys of every event that has completed (one entry per event), oldest first per
    /// stream.
    pub(crate) fn completed<D: Device>(&mut self, device: &D) -> Result<Vec<K>, DeviceError> {
        let mut done = Vec::new();
        for queue in self.queues.values_mut() {
            while let Some(&(event, key)) = queue.front() {
                if !device.query_event(event)? {
                    break;
                }
                queue.pop_front();
                self.spare.push(event);
                done.push(key);
            }
        }
        self.queues.retain(|_, q| !q.is_empty());
        Ok(done)
    }

    /// Waits for every outstanding event and returns all their keys.
    pub(crate) fn wait_all<D: Device>(&mut self, device: &D) -> Result<Vec<K>, DeviceError> {
        let mut done = Vec::new();
        for (_, queue) in std::mem::take(&mut self.queues) {
            for (event, key) in queue {
                device.synchronize_event(event)?;
                self.spare.push(event);
                done.push(key);
            }
        }
        Ok(done)
    }

    /// Destroys the spare events (at the allocator's end).
    pub(crate) fn destroy<D: Device>(&mut self, device: &D) {
        for e in self.spare.drain(..) {
            let _ = device.destroy_event(e);
        }
    }
}
