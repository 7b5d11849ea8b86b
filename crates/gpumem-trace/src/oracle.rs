//! A replay under a [`StreamOracle`] (`gpumem replay --check-streams`): the oracle wraps the
//! replay's device, passes the replay's own calls (side streams, preset addresses, contents)
//! through, and takes the replay's notes of what the program did.

use crate::device::ReplayDevice;
use gpumem::{DeviceError, StreamId, StreamOracle, StreamReport};

impl<D: ReplayDevice> ReplayDevice for StreamOracle<D> {
    fn kind(&self) -> &'static str {
        self.device().kind()
    }
    fn side_stream(&self, id: u32) -> StreamId {
        self.device().side_stream(id)
    }
    /// The side stream's work is done on the device; the oracle learns of it only when the
    /// allocator queries its events (as the allocator itself does).
    fn complete_side(&self, stream: StreamId) {
        self.device().complete_side(stream)
    }
    fn preset_addresses(&self, segments: &[(u64, u64)]) -> bool {
        self.device().preset_addresses(segments)
    }
    fn malloc_log(&self) -> Vec<(u64, u64)> {
        self.device().malloc_log()
    }
    fn map_counts(&self) -> (u64, u64) {
        self.device().map_counts()
    }
    fn memory_call_seconds(&self) -> Option<f64> {
        self.device().memory_call_seconds()
    }
    fn write_word(&self, addr: u64, value: u64) -> Result<(), DeviceError> {
        self.device().write_word(addr, value)
    }
    fn read_word(&self, addr: u64) -> Result<Option<u64>, DeviceError> {
        self.device().read_word(addr)
    }
    fn note_malloc(&self, ptr: u64, size: u64, stream: StreamId) {
        StreamOracle::note_malloc(self, ptr, size, stream)
    }
    fn note_record_stream(&self, ptr: u64, stream: StreamId) {
        StreamOracle::note_record_stream(self, ptr, stream)
    }
    fn note_free(&self, ptr: u64) {
        StreamOracle::note_free(self, ptr)
    }
    fn stream_report(&self) -> Option<StreamReport> {
        Some(self.report())
    }
}
