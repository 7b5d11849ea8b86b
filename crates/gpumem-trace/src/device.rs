//! What a replay needs from a device, beyond [`Device`], and the simulated device's side of
//! it. Kept apart from the replay itself so that the replay, the contents check and the GPU's
//! replay device all depend on this trait without depending on each other.

use gpumem::{Device, DeviceError, SimDevice, StreamId, StreamReport};

/// What a replay needs from a device beyond [`Device`]: side streams whose completion it
/// controls, preset segment addresses, and call counts.
pub trait ReplayDevice: Device + Clone {
    /// "sim" or "cuda".
    fn kind(&self) -> &'static str;
    /// A stream standing for "the other stream" that still used allocation `id` when it was
    /// freed.
    fn side_stream(&self, id: u32) -> StreamId;
    /// Marks the work on a side stream as done.
    fn complete_side(&self, stream: StreamId);
    /// Asks the device to hand out these (size, address) pairs for its next segments, where
    /// it can. Returns whether it will.
    fn preset_addresses(&self, segments: &[(u64, u64)]) -> bool;
    /// Segment allocations so far as (size, address).
    fn malloc_log(&self) -> Vec<(u64, u64)>;
    /// Page map and unmap calls so far.
    fn map_counts(&self) -> (u64, u64);
    /// Seconds spent in the driver's memory calls so far, where the device measures them (a
    /// GPU; the simulated device's calls take no real time).
    fn memory_call_seconds(&self) -> Option<f64> {
        None
    }
    /// Writes the 8-byte word `value` at `addr` (for `check_contents`).
    fn write_word(&self, addr: u64, value: u64) -> Result<(), DeviceError>;
    /// Reads the 8-byte word at `addr`; `None` where the memory under it is gone (the
    /// simulated device knows; a GPU would fault or read garbage).
    fn read_word(&self, addr: u64) -> Result<Option<u64>, DeviceError>;

    /// The allocator returned `ptr` for `size` bytes on `stream`: news for a
    /// [`gpumem::StreamOracle`] wrapped around the device (`--check-streams`); other devices
    /// ignore it. So do the two below.
    fn note_malloc(&self, _ptr: u64, _size: u64, _stream: StreamId) {}
    /// The program used the live block at `ptr` on `stream` too.
    fn note_record_stream(&self, _ptr: u64, _stream: StreamId) {}
    /// The program is about to free the block at `ptr`.
    fn note_free(&self, _ptr: u64) {}
    /// What a stream-ordering oracle found, where the device is one.
    fn stream_report(&self) -> Option<StreamReport> {
        None
    }
}

impl ReplayDevice for SimDevice {
    fn kind(&self) -> &'static str {
        "sim"
    }
    fn side_stream(&self, id: u32) -> StreamId {
        StreamId((1 << 62) | id as u64)
    }
    fn complete_side(&self, stream: StreamId) {
        self.complete_stream(stream);
    }
    fn preset_addresses(&self, segments: &[(u64, u64)]) -> bool {
        SimDevice::preset_addresses(self, segments.iter().copied());
        true
    }
    fn malloc_log(&self) -> Vec<(u64, u64)> {
        SimDevice::malloc_log(self)
    }
    fn map_counts(&self) -> (u64, u64) {
        let c = self.counters();
        (c.maps, c.unmaps)
    }
    fn write_word(&self, addr: u64, value: u64) -> Result<(), DeviceError> {
        self.write_tag(addr, value)
    }
    fn read_word(&self, addr: u64) -> Result<Option<u64>, DeviceError> {
        Ok(self.read_tag(addr))
    }
}
