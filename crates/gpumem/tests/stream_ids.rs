//! Stream and event ids are identifiers, not handles (Note [Stream and event ids are not
//! handles] in `device/mod.rs`): what the allocator and the simulated device do with ids they
//! do not know. `CudaDevice`'s own tables are unit-tested in `device/cuda.rs` and on a GPU in
//! `tests/gpu.rs`.

use gpumem::{
    AllocError, Allocator, AllocatorConfig, Device, DeviceError, EventId, PolicyKind, SimDevice, StreamId,
};
use std::collections::HashSet;

const MIB: u64 = 1 << 20;

/// A simulated device that, like `CudaDevice`, knows only the default stream and the streams
/// registered with it.
#[derive(Clone)]
struct Registered {
    sim: SimDevice,
    streams: HashSet<StreamId>,
}

impl Registered {
    fn new(streams: &[StreamId]) -> Registered {
        let mut known: HashSet<StreamId> = streams.iter().copied().collect();
        known.insert(StreamId::DEFAULT);
        Registered { sim: SimDevice::new(80 << 30), streams: known }
    }
}

impl Device for Registered {
    fn name(&self) -> String {
        "registered".into()
    }
    fn malloc(&self, size: u64) -> Result<u64, DeviceError> {
        self.sim.malloc(size)
    }
    fn free(&self, ptr: u64) -> Result<(), DeviceError> {
        self.sim.free(ptr)
    }
    fn mem_get_info(&self) -> Result<(u64, u64), DeviceError> {
        self.sim.mem_get_info()
    }
    fn reserve(&self, size: u64) -> Result<u64, DeviceError> {
        self.sim.reserve(size)
    }
    fn unreserve(&self, ptr: u64, size: u64) -> Result<(), DeviceError> {
        self.sim.unreserve(ptr, size)
    }
    fn map(&self, ptr: u64, size: u64) -> Result<(), DeviceError> {
        self.sim.map(ptr, size)
    }
    fn unmap(&self, ptr: u64, size: u64) -> Result<(), DeviceError> {
        self.sim.unmap(ptr, size)
    }
    fn remap(&self, ptr: u64, size: u64, keep: &[(u64, u64)]) -> Result<(), DeviceError> {
        self.sim.remap(ptr, size, keep)
    }
    fn remap_staged(
        &self,
        ptr: u64,
        size: u64,
        keep: &[(u64, u64)],
        save: &[(u64, u64, u64)],
    ) -> Result<(), DeviceError> {
        self.sim.remap_staged(ptr, size, keep, save)
    }
    fn create_event(&self) -> Result<EventId, DeviceError> {
        self.sim.create_event()
    }
    fn destroy_event(&self, event: EventId) -> Result<(), DeviceError> {
        self.sim.destroy_event(event)
    }
    fn check_stream(&self, stream: StreamId) -> Result<(), DeviceError> {
        if self.streams.contains(&stream) {
            Ok(())
        } else {
            Err(DeviceError::InvalidHandle { what: "stream", id: stream.0, why: "not registered" })
        }
    }
    fn record_event(&self, event: EventId, stream: StreamId) -> Result<(), DeviceError> {
        self.check_stream(stream)?;
        self.sim.record_event(event, stream)
    }
    fn query_event(&self, event: EventId) -> Result<bool, DeviceError> {
        self.sim.query_event(event)
    }
    fn synchronize_event(&self, event: EventId) -> Result<(), DeviceError> {
        self.sim.synchronize_event(event)
    }
    fn synchronize_stream(&self, stream: StreamId) -> Result<(), DeviceError> {
        self.check_stream(stream)?;
        self.sim.synchronize_stream(stream)
    }
    fn synchronize_device(&self) -> Result<(), DeviceError> {
        self.sim.synchronize_device()
    }
}

fn allocator(dev: Registered, policy: PolicyKind) -> Allocator<Registered> {
    let mut config = AllocatorConfig::default();
    config.settle_policy(policy).unwrap();
    Allocator::new(dev, config).unwrap()
}

const POLICIES: [PolicyKind; 3] = [PolicyKind::Torch, PolicyKind::TorchExpandable, PolicyKind::Gpumem];

#[test]
fn record_stream_refuses_a_stream_the_device_does_not_know_and_changes_nothing() {
    let side = StreamId(0x7000);
    for policy in POLICIES {
        let dev = Registered::new(&[side]);
        let a = allocator(dev.clone(), policy);
        let p = a.malloc(8 * MIB, StreamId::DEFAULT).unwrap();
        let before = a.memory_stats();
        let e = a.record_stream(p, StreamId(0xbad)).unwrap_err();
        assert!(
            matches!(e, AllocError::Device(DeviceError::InvalidHandle { what: "stream", id: 0xbad, .. })),
            "{policy:?}: {e}"
        );
        assert_eq!(a.memory_stats(), before, "{policy:?}");
        // the free does not wait for anything, and records no event
        a.free(p).unwrap();
        assert_eq!(dev.sim.counters().events_recorded, 0, "{policy:?}");
        assert_eq!(a.memory_allocated(), 0, "{policy:?}");
        a.check_stats().unwrap();
    }
}

#[test]
fn a_registered_stream_is_recorded_and_waited_for() {
    let side = StreamId(0x7000);
    for policy in POLICIES {
        let dev = Registered::new(&[side]);
        let a = allocator(dev.clone(), policy);
        let p = a.malloc(8 * MIB, StreamId::DEFAULT).unwrap();
        a.record_stream(p, side).unwrap();
        a.free(p).unwrap();
        assert_eq!(dev.sim.counters().events_recorded, 1, "{policy:?}");
        assert_eq!(dev.sim.pending_events(), 1, "{policy:?}: the free waits for the side stream");
        dev.sim.complete_stream(side);
        a.process_events().unwrap();
        assert_eq!(dev.sim.pending_events(), 0, "{policy:?}");
        a.empty_cache().unwrap();
        assert_eq!(a.memory_reserved(), 0, "{policy:?}");
    }
}

#[test]
fn the_simulated_device_takes_any_stream_number() {
    let sim = SimDevice::new(80 << 30);
    for id in [0, 1, 0x7fff_0000_1234, u64::MAX] {
        sim.check_stream(StreamId(id)).unwrap();
    }
}

#[test]
fn an_event_the_simulated_device_did_not_create_is_an_invalid_handle() {
    let sim = SimDevice::new(80 << 30);
    let bogus = EventId(0xdead);
    let unknown = |r: Result<(), DeviceError>| {
        assert!(matches!(r, Err(DeviceError::InvalidHandle { what: "event", .. })), "{r:?}");
    };
    unknown(sim.record_event(bogus, StreamId::DEFAULT));
    unknown(sim.query_event(bogus).map(drop));
    unknown(sim.synchronize_event(bogus));
    unknown(sim.destroy_event(bogus));
    let e = sim.create_event().unwrap();
    sim.record_event(e, StreamId(5)).unwrap();
    sim.destroy_event(e).unwrap();
    unknown(sim.query_event(e).map(drop));
    unknown(sim.destroy_event(e));
}
