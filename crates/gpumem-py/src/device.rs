//! [`AnyDevice`]: the GPU or the simulated one, chosen when the program runs.
//!
//! Python picks the device by a string (`device="sim"` in tests and on machines without a
//! GPU, `"cuda"` inside PyTorch), so the allocator's device is one type that is either.

use gpumem::{CudaDevice, Device, DeviceError, EventId, SimDevice, StreamId};

/// A real GPU or a simulated one.
#[derive(Clone)]
pub(crate) enum AnyDevice {
    Cuda(CudaDevice),
    Sim(SimDevice),
}

macro_rules! each {
    ($self:ident, $d:ident => $e:expr) => {
        match $self {
            AnyDevice::Cuda($d) => $e,
            AnyDevice::Sim($d) => $e,
        }
    };
}

impl AnyDevice {
    /// `"cuda"` or `"sim"`.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            AnyDevice::Cuda(_) => "cuda",
            AnyDevice::Sim(_) => "sim",
        }
    }
}

impl Device for AnyDevice {
    fn name(&self) -> String {
        each!(self, d => d.name())
    }
    fn index(&self) -> usize {
        each!(self, d => d.index())
    }
    fn malloc(&self, size: u64) -> Result<u64, DeviceError> {
        each!(self, d => d.malloc(size))
    }
    fn free(&self, ptr: u64) -> Result<(), DeviceError> {
        each!(self, d => d.free(ptr))
    }
    fn mem_get_info(&self) -> Result<(u64, u64), DeviceError> {
        each!(self, d => d.mem_get_info())
    }
    fn page_granularity(&self) -> u64 {
        each!(self, d => d.page_granularity())
    }
    fn reserve(&self, size: u64) -> Result<u64, DeviceError> {
        each!(self, d => d.reserve(size))
    }
    fn unreserve(&self, ptr: u64, size: u64) -> Result<(), DeviceError> {
        each!(self, d => d.unreserve(ptr, size))
    }
    fn map(&self, ptr: u64, size: u64) -> Result<(), DeviceError> {
        each!(self, d => d.map(ptr, size))
    }
    fn unmap(&self, ptr: u64, size: u64) -> Result<(), DeviceError> {
        each!(self, d => d.unmap(ptr, size))
    }
    fn remap(&self, ptr: u64, size: u64, keep: &[(u64, u64)]) -> Result<(), DeviceError> {
        each!(self, d => d.remap(ptr, size, keep))
    }
    fn remap_staged(
        &self,
        ptr: u64,
        size: u64,
        keep: &[(u64, u64)],
        save: &[(u64, u64, u64)],
    ) -> Result<(), DeviceError> {
        each!(self, d => d.remap_staged(ptr, size, keep, save))
    }
    fn create_event(&self) -> Result<EventId, DeviceError> {
        each!(self, d => d.create_event())
    }
    fn destroy_event(&self, event: EventId) -> Result<(), DeviceError> {
        each!(self, d => d.destroy_event(event))
    }
    fn check_stream(&self, stream: StreamId) -> Result<(), DeviceError> {
        each!(self, d => d.check_stream(stream))
    }
    fn record_event(&self, event: EventId, stream: StreamId) -> Result<(), DeviceError> {
        each!(self, d => d.record_event(event, stream))
    }
    fn query_event(&self, event: EventId) -> Result<bool, DeviceError> {
        each!(self, d => d.query_event(event))
    }
    fn synchronize_event(&self, event: EventId) -> Result<(), DeviceError> {
        each!(self, d => d.synchronize_event(event))
    }
    fn synchronize_stream(&self, stream: StreamId) -> Result<(), DeviceError> {
        each!(self, d => d.synchronize_stream(stream))
    }
    fn synchronize_device(&self) -> Result<(), DeviceError> {
        each!(self, d => d.synchronize_device())
    }
}
