//! Replaying on the real GPU.

use crate::device::ReplayDevice;
use gpumem::{CudaDevice, Device, DeviceError, EventId, StreamId};

/// A [`CudaDevice`] set up for replays: one real side stream stands for "the other stream"
/// of frees that waited on one.
///
/// A GPU's streams cannot be held back at will, so a deferred free completes as soon as the
/// side stream's (empty) queue reaches its event: at once, where the recorded run waited for
/// real work. Reuse after such frees can therefore come earlier than in the recorded run.
///
/// The trace's own stream numbers are only labels of the cache here (the engines hand the
/// driver no allocation stream but the default one); the side stream is registered with the
/// device, which holds it, and is the only other stream events are recorded on.
#[derive(Clone)]
pub struct CudaReplayDevice {
    dev: CudaDevice,
    side: StreamId,
}

impl CudaReplayDevice {
    /// Opens GPU `ordinal` for a replay, and warms up the driver calls a replay makes (the
    /// first ones in a process are several times slower), so that they are not timed.
    pub fn new(ordinal: usize) -> Result<CudaReplayDevice, DeviceError> {
        let dev = CudaDevice::new(ordinal)?;
        let side = dev
            .context()
            .new_stream()
            .map_err(|e| DeviceError::Driver { call: "cuStreamCreate", message: format!("{e:?}") })?;
        let side = dev.stream_id(&side)?;
        let page = dev.page_granularity();
        for _ in 0..4 {
            let p = dev.malloc(page)?;
            dev.free(p)?;
            let va = dev.reserve(page)?;
            dev.map(va, page)?;
            dev.unmap(va, page)?;
            dev.unreserve(va, page)?;
        }
        let e = dev.create_event()?;
        dev.record_event(e, side)?;
        dev.synchronize_event(e)?;
        dev.destroy_event(e)?;
        Ok(CudaReplayDevice { dev, side })
    }
}

impl Device for CudaReplayDevice {
    fn name(&self) -> String {
        self.dev.name()
    }
    fn index(&self) -> usize {
        self.dev.index()
    }
    fn malloc(&self, size: u64) -> Result<u64, DeviceError> {
        self.dev.malloc(size)
    }
    fn free(&self, ptr: u64) -> Result<(), DeviceError> {
        self.dev.free(ptr)
    }
    fn mem_get_info(&self) -> Result<(u64, u64), DeviceError> {
        self.dev.mem_get_info()
    }
    fn page_granularity(&self) -> u64 {
        self.dev.page_granularity()
    }
    fn reserve(&self, size: u64) -> Result<u64, DeviceError> {
        self.dev.reserve(size)
    }
    fn unreserve(&self, ptr: u64, size: u64) -> Result<(), DeviceError> {
        self.dev.unreserve(ptr, size)
    }
    fn map(&self, ptr: u64, size: u64) -> Result<(), DeviceError> {
        self.dev.map(ptr, size)
    }
    fn unmap(&self, ptr: u64, size: u64) -> Result<(), DeviceError> {
        self.dev.unmap(ptr, size)
    }
    fn remap(&self, ptr: u64, size: u64, keep: &[(u64, u64)]) -> Result<(), DeviceError> {
        self.dev.remap(ptr, size, keep)
    }
    fn remap_staged(
        &self,
        ptr: u64,
        size: u64,
        keep: &[(u64, u64)],
        save: &[(u64, u64, u64)],
    ) -> Result<(), DeviceError> {
        self.dev.remap_staged(ptr, size, keep, save)
    }
    fn create_event(&self) -> Result<EventId, DeviceError> {
        self.dev.create_event()
    }
    fn destroy_event(&self, event: EventId) -> Result<(), DeviceError> {
        self.dev.destroy_event(event)
    }
    fn check_stream(&self, stream: StreamId) -> Result<(), DeviceError> {
        self.dev.check_stream(stream)
    }
    fn record_event(&self, event: EventId, stream: StreamId) -> Result<(), DeviceError> {
        self.dev.record_event(event, stream)
    }
    fn query_event(&self, event: EventId) -> Result<bool, DeviceError> {
        self.dev.query_event(event)
    }
    fn synchronize_event(&self, event: EventId) -> Result<(), DeviceError> {
        self.dev.synchronize_event(event)
    }
    fn synchronize_stream(&self, stream: StreamId) -> Result<(), DeviceError> {
        self.dev.synchronize_stream(stream)
    }
    fn synchronize_device(&self) -> Result<(), DeviceError> {
        self.dev.synchronize_device()
    }
}

impl ReplayDevice for CudaReplayDevice {
    fn kind(&self) -> &'static str {
        "cuda"
    }
    fn side_stream(&self, _id: u32) -> StreamId {
        self.side
    }
    fn complete_side(&self, _stream: StreamId) {}
    fn preset_addresses(&self, _segments: &[(u64, u64)]) -> bool {
        false
    }
    fn malloc_log(&self) -> Vec<(u64, u64)> {
        Vec::new()
    }
    fn map_counts(&self) -> (u64, u64) {
        let c = self.dev.counters();
        (c.maps, c.unmaps)
    }
    fn memory_call_seconds(&self) -> Option<f64> {
        Some(self.dev.counters().memory_call_ns as f64 * 1e-9)
    }
    fn write_word(&self, addr: u64, value: u64) -> Result<(), DeviceError> {
        // SAFETY: `addr` lies in a live block of the replay; no kernel runs.
        unsafe { self.dev.write_bytes(addr, &value.to_ne_bytes()) }
    }
    fn read_word(&self, addr: u64) -> Result<Option<u64>, DeviceError> {
        let mut word = [0u8; 8];
        // SAFETY: as above.
        unsafe { self.dev.read_bytes(addr, &mut word) }?;
        Ok(Some(u64::from_ne_bytes(word)))
    }
}
