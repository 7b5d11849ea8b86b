//! `CudaDevice`: the real GPU through the CUDA driver API (`cudarc::driver::sys`).
//!
//! The driver library is loaded at run time, so gpumem builds and runs where there is no
//! CUDA: [`CudaDevice::new`] then returns [`DeviceError::NoDriver`] instead of panicking.
//!
//! Note [Releasing physical handles at once]
//! -----------------------------------------
//! A VMM mapping keeps its physical allocation alive until it is unmapped, so `map` releases
//! the handle right after mapping it (`cuMemRelease`), and `unmap` alone gives the memory
//! back. No table of handles is needed.
//!
//! Note [Unmapping does not wait]
//! ------------------------------
//! Unlike `cuMemFree`, `cuMemUnmap` does not wait for kernels still using the pages; unmapping
//! early kills the context with an illegal-address error. The engines wait for the default
//! stream, or for the whole device where other streams used the pages, before they call
//! `unmap` (Note [Which wait before unmapping] in `packed/waits.rs`).
//!
//! Streams and events reach the driver only through the tables of [`Handles`]: Note \[Stream
//! and event ids are not handles\] in `device/mod.rs` says why.

use crate::device::{Device, DeviceError, EventId, StreamId};
use cudarc::driver::sys::{self, CUresult};
use cudarc::driver::{CudaContext, CudaEvent, CudaStream};
use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Device calls made so far on a [`CudaDevice`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CudaCounters {
    /// `cuMemAlloc` calls that succeeded.
    pub mallocs: u64,
    /// `cuMemFree` calls.
    pub frees: u64,
    /// Physical pages created and mapped.
    pub maps: u64,
    /// Mappings removed.
    pub unmaps: u64,
    /// Nanoseconds spent in the driver's memory calls: segment allocations and frees, maps,
    /// unmaps and remaps, and the waits for the GPU that come before unmapping.
    pub memory_call_ns: u64,
}

/// One NVIDIA GPU, through the CUDA driver.
///
/// ```no_run
/// use gpumem::{Allocator, AllocatorConfig, CudaDevice, StreamId};
/// let gpu = CudaDevice::new(0)?;
/// let alloc = Allocator::new(gpu, AllocatorConfig::default())?;
/// let p = alloc.malloc(1 << 20, StreamId::DEFAULT)?;
/// alloc.free(p)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// Streams and events are named by ids that it resolves through tables of its own (Note
/// \[Stream and event ids are not handles\] in `device/mod.rs`): a real stream is known by the
/// id [`CudaDevice::stream_id`] gives it. Clones share the GPU, the counters and the tables.
#[derive(Clone)]
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    ordinal: usize,
    name: String,
    granularity: u64,
    counters: Arc<[AtomicU64; 5]>,
    handles: Arc<Handles>,
}

/// The streams and events a [`CudaDevice`] may hand the driver.
struct Handles {
    /// Registered streams, held (Note \[Stream and event ids are not handles\]); the legacy
    /// default stream under [`StreamId::DEFAULT`] from the start.
    streams: Table<StreamHandle>,
    /// Live events this device created, by their ids.
    events: Table<CudaEvent>,
    /// The next event id: ids count up and are never reused.
    next_event: AtomicU64,
}

impl Handles {
    fn new(ctx: &Arc<CudaContext>) -> Handles {
        let streams = Table::new(
            "stream",
            "not registered with this device (CudaDevice::stream_id registers a stream)",
        );
        streams.insert(StreamId::DEFAULT.0, || Arc::new(StreamHandle::Owned(ctx.default_stream())));
        let events = Table::new("event", "not an event this device created, or destroyed already");
        Handles { streams, events, next_event: AtomicU64::new(1) }
    }

    fn stream(&self, id: StreamId) -> Result<Arc<StreamHandle>, DeviceError> {
        self.streams.get(id.0)
    }

    fn event(&self, id: EventId) -> Result<Arc<CudaEvent>, DeviceError> {
        self.events.get(id.0)
    }
}

/// A stream the device may hand the driver: one of cudarc's, held; or one another library
/// made and keeps alive ([`CudaDevice::foreign_stream_id`]), by its raw handle.
enum StreamHandle {
    Owned(Arc<CudaStream>),
    Foreign(u64),
}

impl StreamHandle {
    fn raw(&self) -> sys::CUstream {
        match self {
            StreamHandle::Owned(s) => s.cu_stream(),
            StreamHandle::Foreign(raw) => *raw as sys::CUstream,
        }
    }
}

/// Driver objects by id. A lookup clones the `Arc` out and the caller calls the driver
/// outside the lock: an object removed meanwhile is dropped (for an event: destroyed) only
/// once the last call using it is done, and no call waits for the lock behind a slow one
/// (`cuEventSynchronize`).
struct Table<V> {
    /// `"stream"` or `"event"`, for errors.
    what: &'static str,
    /// Why an id is unknown, for errors.
    why: &'static str,
    map: RwLock<HashMap<u64, Arc<V>>>,
}

impl<V> Table<V> {
    fn new(what: &'static str, why: &'static str) -> Table<V> {
        Table { what, why, map: RwLock::default() }
    }

    fn unknown(&self, id: u64) -> DeviceError {
        DeviceError::InvalidHandle { what: self.what, id, why: self.why }
    }

    /// The object of `id`, or [`DeviceError::InvalidHandle`].
    fn get(&self, id: u64) -> Result<Arc<V>, DeviceError> {
        self.map.read().get(&id).cloned().ok_or_else(|| self.unknown(id))
    }

    fn contains(&self, id: u64) -> bool {
        self.map.read().contains_key(&id)
    }

    /// Adds `id` with the object `make` gives, unless `id` is there already (the first one
    /// stays).
    fn insert(&self, id: u64, make: impl FnOnce() -> Arc<V>) {
        self.map.write().entry(id).or_insert_with(make);
    }

    /// Takes `id` out, or [`DeviceError::InvalidHandle`].
    fn remove(&self, id: u64) -> Result<Arc<V>, DeviceError> {
        let removed = self.map.write().remove(&id);
        removed.ok_or_else(|| self.unknown(id))
    }

    fn len(&self) -> usize {
        self.map.read().len()
    }
}

fn check(call: &'static str, r: CUresult) -> Result<(), DeviceError> {
    match r {
        CUresult::CUDA_SUCCESS => Ok(()),
        CUresult::CUDA_ERROR_OUT_OF_MEMORY => Err(DeviceError::OutOfMemory),
        other => {
            let e = cudarc::driver::DriverError(other);
            let message = match (e.error_name(), e.error_string()) {
                (Ok(n), Ok(s)) => format!("{} ({})", n.to_string_lossy(), s.to_string_lossy()),
                _ => format!("{other:?}"),
            };
            Err(DeviceError::Driver { call, message })
        }
    }
}

fn driver_err(call: &'static str, e: cudarc::driver::DriverError) -> DeviceError {
    check(call, e.0).err().unwrap_or(DeviceError::Driver { call, message: format!("{e:?}") })
}

/// Whether a CUDA driver library can be loaded on this machine.
pub fn driver_present() -> bool {
    // SAFETY: a dlopen probe; it loads nothing else.
    unsafe { sys::is_culib_present() }
}

/// The number of GPUs the driver sees (0 without a driver).
pub fn device_count() -> Result<usize, DeviceError> {
    if !driver_present() {
        return Err(DeviceError::NoDriver);
    }
    CudaContext::device_count().map(|n| n as usize).map_err(|e| driver_err("cuDeviceGetCount", e))
}

fn location(ordinal: usize) -> sys::CUmemLocation {
    sys::CUmemLocation { type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE, id: ordinal as i32 }
}

fn alloc_prop(ordinal: usize) -> sys::CUmemAllocationProp {
    // SAFETY: a plain C struct; all-zero is its documented default.
    let mut prop: sys::CUmemAllocationProp = unsafe { std::mem::zeroed() };
    prop.type_ = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.requestedHandleTypes = sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_NONE;
    prop.location = location(ordinal);
    prop
}

impl CudaDevice {
    /// Opens GPU `ordinal` (its primary context). No driver, or no such GPU, is an error.
    pub fn new(ordinal: usize) -> Result<CudaDevice, DeviceError> {
        let count = device_count()?;
        if ordinal >= count {
            return Err(DeviceError::NoSuchDevice(ordinal, count));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| driver_err("cuCtxCreate", e))?;
        let name = ctx.name().unwrap_or_else(|_| format!("GPU {ordinal}"));
        let prop = alloc_prop(ordinal);
        let mut granularity = 0usize;
        // SAFETY: prop is a valid allocation property; the context is current (new binds it).
        let r = unsafe {
            sys::cuMemGetAllocationGranularity(
                &mut granularity,
                &prop,
                sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_RECOMMENDED,
            )
        };
        let granularity =
            if r == CUresult::CUDA_SUCCESS && granularity > 0 { granularity as u64 } else { 2 << 20 };
        let handles = Arc::new(Handles::new(&ctx));
        Ok(CudaDevice { ctx, ordinal, name, granularity, counters: Arc::new(Default::default()), handles })
    }

    /// The id of `stream` on this device, registering it: from now on the device holds the
    /// stream (it is not destroyed before the device is), and accepts the id wherever a
    /// [`StreamId`] goes, such as [`crate::Allocator::record_stream`]. The id is the value of
    /// the stream's `CUstream` pointer, so the same stream always gets the same id; the
    /// legacy default stream's is [`StreamId::DEFAULT`]. A stream of another CUDA context
    /// (another GPU) is [`DeviceError::InvalidHandle`]. Note \[Stream and event ids are not
    /// handles\] in `device/mod.rs` says why the device holds the stream.
    pub fn stream_id(&self, stream: &Arc<CudaStream>) -> Result<StreamId, DeviceError> {
        let id = StreamId(stream.cu_stream() as u64);
        if stream.context().cu_ctx() != self.ctx.cu_ctx() {
            return Err(DeviceError::InvalidHandle {
                what: "stream",
                id: id.0,
                why: "it belongs to another CUDA context than this device's",
            });
        }
        // A registered stream is alive (the table holds it), so no other live stream has its
        // handle: finding the id means finding this very stream.
        if !self.handles.streams.contains(id.0) {
            self.handles.streams.insert(id.0, || Arc::new(StreamHandle::Owned(stream.clone())));
        }
        Ok(id)
    }

    /// The id of a stream that another library created and manages (PyTorch's streams, which
    /// reach gpumem's plugin as raw `cudaStream_t` handles), registering it by its handle. The
    /// null handle is the legacy default stream, [`StreamId::DEFAULT`].
    ///
    /// # Safety
    /// `stream` must be null or a live stream of this device's context (its primary context,
    /// which the CUDA runtime uses too), and must stay alive as long as this device may wait
    /// on it: until the device is dropped. PyTorch's streams qualify: its pools of streams are
    /// created once per device and never destroyed. A stream destroyed earlier could leave
    /// its handle to a new stream, and waits meant for the old one would go to the new one
    /// (Note \[Stream and event ids are not handles\] in `device/mod.rs`).
    pub unsafe fn foreign_stream_id(&self, stream: sys::CUstream) -> StreamId {
        let id = StreamId(stream as u64);
        if !self.handles.streams.contains(id.0) {
            self.handles.streams.insert(id.0, || Arc::new(StreamHandle::Foreign(id.0)));
        }
        id
    }

    /// The id of `stream` if it is registered with this device ([`CudaDevice::stream_id`]),
    /// for callers that hold only a reference to it.
    pub fn registered_stream_id(&self, stream: &CudaStream) -> Option<StreamId> {
        let id = StreamId(stream.cu_stream() as u64);
        match &*self.handles.streams.get(id.0).ok()? {
            StreamHandle::Owned(known) => {
                (known.context().cu_ctx() == stream.context().cu_ctx()).then_some(id)
            }
            StreamHandle::Foreign(_) => (stream.context().cu_ctx() == self.ctx.cu_ctx()).then_some(id),
        }
    }

    /// How many streams are registered, the legacy default stream included.
    pub fn registered_streams(&self) -> usize {
        self.handles.streams.len()
    }

    /// How many events this device created and has not destroyed.
    pub fn live_events(&self) -> usize {
        self.handles.events.len()
    }

    /// The cudarc context, to share with cudarc code (streams, kernels, copies).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Device calls made so far.
    pub fn counters(&self) -> CudaCounters {
        let c = &self.counters;
        CudaCounters {
            mallocs: c[0].load(Ordering::Relaxed),
            frees: c[1].load(Ordering::Relaxed),
            maps: c[2].load(Ordering::Relaxed),
            unmaps: c[3].load(Ordering::Relaxed),
            memory_call_ns: c[4].load(Ordering::Relaxed),
        }
    }

    /// Copies `bytes` from the host to device address `addr`, synchronously (for checks and
    /// tests: `gpumem replay --check-contents` stamps blocks with it).
    ///
    /// # Safety
    /// `addr..addr + bytes.len()` must be mapped device memory no kernel uses meanwhile.
    pub unsafe fn write_bytes(&self, addr: u64, bytes: &[u8]) -> Result<(), DeviceError> {
        self.bind()?;
        // SAFETY: the context is current; the caller vouches for the range, and the copy
        // reads `bytes` before it returns.
        check("cuMemcpyHtoD", unsafe { sys::cuMemcpyHtoD_v2(addr, bytes.as_ptr().cast(), bytes.len()) })
    }

    /// Copies device memory at `addr` into `out`, synchronously.
    ///
    /// # Safety
    /// `addr..addr + out.len()` must be mapped device memory.
    pub unsafe fn read_bytes(&self, addr: u64, out: &mut [u8]) -> Result<(), DeviceError> {
        self.bind()?;
        // SAFETY: as above; the copy writes `out` before it returns.
        check("cuMemcpyDtoH", unsafe { sys::cuMemcpyDtoH_v2(out.as_mut_ptr().cast(), addr, out.len()) })
    }

    fn bind(&self) -> Result<(), DeviceError> {
        self.ctx.bind_to_thread().map_err(|e| driver_err("cuCtxSetCurrent", e))
    }

    fn count(&self, i: usize) {
        self.counters[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Runs a memory call with this GPU's context current, adding its time to
    /// `memory_call_ns`.
    fn memory_call<T>(&self, call: impl FnOnce() -> Result<T, DeviceError>) -> Result<T, DeviceError> {
        let t = std::time::Instant::now();
        let r = self.bind().and_then(|()| call());
        self.counters[4].fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        r
    }

    /// Creates a physical allocation of `size` bytes on this GPU.
    fn create(&self, size: u64) -> Result<sys::CUmemGenericAllocationHandle, DeviceError> {
        let prop = alloc_prop(self.ordinal);
        let mut handle: sys::CUmemGenericAllocationHandle = 0;
        // SAFETY: valid property and out-pointer.
        check("cuMemCreate", unsafe { sys::cuMemCreate(&mut handle, size as usize, &prop, 0) })?;
        Ok(handle)
    }

    /// Creates a physical allocation of `size` bytes and maps it read-write at `ptr`.
    fn create_and_map(&self, ptr: u64, size: u64) -> Result<(), DeviceError> {
        let handle = self.create(size)?;
        let result = self.map_handle(ptr, size, handle);
        // See Note [Releasing physical handles at once].
        let released = release(handle);
        result?;
        released?;
        self.count(2);
        Ok(())
    }

    /// Maps `handle` read-write at `ptr..ptr + size` (unmapped, inside a reservation).
    fn map_handle(
        &self,
        ptr: u64,
        size: u64,
        handle: sys::CUmemGenericAllocationHandle,
    ) -> Result<(), DeviceError> {
        // SAFETY: ptr..ptr+size lies in a reservation and is unmapped (the engine's invariant).
        check("cuMemMap", unsafe { sys::cuMemMap(ptr, size as usize, 0, handle, 0) })?;
        let desc = sys::CUmemAccessDesc {
            location: location(self.ordinal),
            flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        };
        // SAFETY: the range was just mapped.
        let r = check("cuMemSetAccess", unsafe { sys::cuMemSetAccess(ptr, size as usize, &desc, 1) });
        if r.is_err() {
            // SAFETY: undo the mapping made above.
            unsafe { sys::cuMemUnmap(ptr, size as usize) };
        }
        r
    }
}

/// The error of a remap that failed after the old allocation was gone: the moved pages'
/// contents are lost, and the message says so.
fn contents_lost(e: DeviceError) -> DeviceError {
    DeviceError::Driver {
        call: "cuMemMap",
        message: format!("remapping moved pages failed, their contents are lost: {e}"),
    }
}

/// Drops our reference to a physical allocation; its mappings keep the memory.
fn release(handle: sys::CUmemGenericAllocationHandle) -> Result<(), DeviceError> {
    // SAFETY: the handle is ours.
    check("cuMemRelease", unsafe { sys::cuMemRelease(handle) })
}

impl Device for CudaDevice {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn index(&self) -> usize {
        self.ordinal
    }

    fn malloc(&self, size: u64) -> Result<u64, DeviceError> {
        self.memory_call(|| {
            let mut p: sys::CUdeviceptr = 0;
            // SAFETY: p is a valid out-pointer; the context is current.
            check("cuMemAlloc", unsafe { sys::cuMemAlloc_v2(&mut p, size as usize) })?;
            self.count(0);
            Ok(p)
        })
    }

    fn free(&self, ptr: u64) -> Result<(), DeviceError> {
        self.memory_call(|| {
            // SAFETY: ptr came from cuMemAlloc (the engine frees only its own segments).
            check("cuMemFree", unsafe { sys::cuMemFree_v2(ptr) })?;
            self.count(1);
            Ok(())
        })
    }

    fn mem_get_info(&self) -> Result<(u64, u64), DeviceError> {
        self.bind()?;
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: valid out-pointers; the context is current.
        check("cuMemGetInfo", unsafe { sys::cuMemGetInfo_v2(&mut free, &mut total) })?;
        Ok((free as u64, total as u64))
    }

    fn page_granularity(&self) -> u64 {
        self.granularity
    }

    fn reserve(&self, size: u64) -> Result<u64, DeviceError> {
        self.bind()?;
        let mut p: sys::CUdeviceptr = 0;
        // SAFETY: valid out-pointer; size is a multiple of the granularity (the engine's pages are).
        check("cuMemAddressReserve", unsafe { sys::cuMemAddressReserve(&mut p, size as usize, 0, 0, 0) })?;
        Ok(p)
    }

    fn unreserve(&self, ptr: u64, size: u64) -> Result<(), DeviceError> {
        self.bind()?;
        // SAFETY: ptr/size name a reservation made by `reserve`, with nothing mapped in it.
        check("cuMemAddressFree", unsafe { sys::cuMemAddressFree(ptr, size as usize) })
    }

    fn map(&self, ptr: u64, size: u64) -> Result<(), DeviceError> {
        self.memory_call(|| self.create_and_map(ptr, size))
    }

    fn remap(&self, ptr: u64, size: u64, keep: &[(u64, u64)]) -> Result<(), DeviceError> {
        self.memory_call(|| {
            // The new allocations are first mapped in a scratch range at the same offsets, the
            // live contents copied there, and only then is the old allocation unmapped and the new
            // ones mapped in its place. A failure before the unmap leaves everything as it was.
            let scratch = self.reserve(size)?;
            let mut made: Vec<(u64, u64, sys::CUmemGenericAllocationHandle)> = Vec::with_capacity(keep.len());
            let staged = (|| {
                for &(a, n) in keep {
                    let handle = self.create(n)?;
                    made.push((a, n, handle));
                    self.map_handle(scratch + (a - ptr), n, handle)?;
                    // SAFETY: both ranges are mapped, n bytes long; the caller waited for the GPU.
                    check("cuMemcpyDtoD", unsafe {
                        sys::cuMemcpyDtoD_v2(scratch + (a - ptr), a, n as usize)
                    })?;
                }
                // SAFETY: the context is current; the copies must be done before the unmap.
                check("cuCtxSynchronize", unsafe { sys::cuCtxSynchronize() })
            })();
            // Unmaps the scratch range and drops our handles: a new allocation mapped at its
            // final address keeps its memory, any other goes back.
            let unstage = |made: &[(u64, u64, sys::CUmemGenericAllocationHandle)]| {
                for &(a, n, handle) in made {
                    // SAFETY: mapped in the scratch range above (if its map failed, this is a
                    // harmless error).
                    unsafe { sys::cuMemUnmap(scratch + (a - ptr), n as usize) };
                    let _ = release(handle);
                }
                // everything in the scratch range is unmapped now
                let _ = self.unreserve(scratch, size);
            };
            if let Err(e) = staged {
                unstage(&made);
                return Err(e);
            }
            // SAFETY: the range was mapped by `map`, and the caller waited for the GPU.
            let unmapped = check("cuMemUnmap", unsafe { sys::cuMemUnmap(ptr, size as usize) });
            if let Err(e) = unmapped {
                unstage(&made);
                return Err(e);
            }
            let mut result = Ok(());
            for &(a, n, handle) in &made {
                if result.is_ok() {
                    result = self.map_handle(a, n, handle);
                }
            }
            unstage(&made);
            self.count(3);
            for _ in keep {
                self.count(2);
            }
            // A failure here loses the contents of the kept pages: say so plainly.
            result.map_err(contents_lost)
        })
    }

    fn remap_staged(
        &self,
        ptr: u64,
        size: u64,
        keep: &[(u64, u64)],
        save: &[(u64, u64, u64)],
    ) -> Result<(), DeviceError> {
        self.memory_call(|| {
            let copy = |dst: u64, src: u64, n: u64| {
                // SAFETY: both ranges are mapped, n bytes long, and nothing else uses them (the
                // caller waited for the GPU and gives free memory as the staging area).
                check("cuMemcpyDtoD", unsafe { sys::cuMemcpyDtoD_v2(dst, src, n as usize) })
            };
            for &(from, to, n) in save {
                copy(to, from, n)?;
            }
            // SAFETY: the context is current; the copies must be done before the unmap.
            check("cuCtxSynchronize", unsafe { sys::cuCtxSynchronize() })?;
            // SAFETY: the range was mapped by `map`, and the caller waited for the GPU.
            check("cuMemUnmap", unsafe { sys::cuMemUnmap(ptr, size as usize) })?;
            self.count(3);
            // From here a failure loses the saved contents' way home: say so plainly.
            for &(a, n) in keep {
                self.create_and_map(a, n).map_err(contents_lost)?;
            }
            // The copies back run in order on the legacy default stream: the next remap's
            // copies out, and its wait before it unmaps, come after them. The caller waits for
            // the device before anything else uses the staging area (`Device::remap_staged`).
            for &(from, to, n) in save {
                copy(from, to, n).map_err(contents_lost)?;
            }
            Ok(())
        })
    }

    fn unmap(&self, ptr: u64, size: u64) -> Result<(), DeviceError> {
        self.memory_call(|| {
            // SAFETY: the range was mapped by `map`, and the engine waited for the GPU first.
            check("cuMemUnmap", unsafe { sys::cuMemUnmap(ptr, size as usize) })?;
            self.count(3);
            Ok(())
        })
    }

    fn create_event(&self) -> Result<EventId, DeviceError> {
        let event = self.ctx.new_event(None).map_err(|e| driver_err("cuEventCreate", e))?;
        let id = EventId(self.handles.next_event.fetch_add(1, Ordering::Relaxed));
        self.handles.events.insert(id.0, || Arc::new(event));
        Ok(id)
    }

    fn destroy_event(&self, event: EventId) -> Result<(), DeviceError> {
        // Out of the table at once; `cuEventDestroy` runs when the last call using it is done
        // (the `Arc` drops), with the context bound by cudarc's `Drop`.
        self.handles.events.remove(event.0).map(drop)
    }

    fn record_event(&self, event: EventId, stream: StreamId) -> Result<(), DeviceError> {
        let (ev, st) = (self.handles.event(event)?, self.handles.stream(stream)?);
        match &*st {
            // cudarc checks that both belong to one context
            StreamHandle::Owned(st) => ev.record(st).map_err(|e| driver_err("cuEventRecord", e)),
            StreamHandle::Foreign(_) => {
                self.bind()?;
                // SAFETY: the event is live (the table's `Arc` holds it) and of this context;
                // the stream is live by the promise of `foreign_stream_id`.
                check("cuEventRecord", unsafe { sys::cuEventRecord(ev.cu_event(), st.raw()) })
            }
        }
    }

    fn query_event(&self, event: EventId) -> Result<bool, DeviceError> {
        let ev = self.handles.event(event)?;
        self.bind()?;
        ev.try_is_complete().map_err(|e| driver_err("cuEventQuery", e))
    }

    fn synchronize_event(&self, event: EventId) -> Result<(), DeviceError> {
        let ev = self.handles.event(event)?;
        ev.synchronize().map_err(|e| driver_err("cuEventSynchronize", e))
    }

    fn check_stream(&self, stream: StreamId) -> Result<(), DeviceError> {
        self.handles.stream(stream).map(drop)
    }

    fn synchronize_device(&self) -> Result<(), DeviceError> {
        self.memory_call(|| {
            // SAFETY: the context is current.
            check("cuCtxSynchronize", unsafe { sys::cuCtxSynchronize() })
        })
    }

    fn synchronize_stream(&self, stream: StreamId) -> Result<(), DeviceError> {
        let st = self.handles.stream(stream)?;
        self.memory_call(|| match &*st {
            StreamHandle::Owned(s) => s.synchronize().map_err(|e| driver_err("cuStreamSynchronize", e)),
            // SAFETY: the context is current; the stream is live by the promise of
            // `foreign_stream_id`.
            StreamHandle::Foreign(_) => {
                check("cuStreamSynchronize", unsafe { sys::cuStreamSynchronize(st.raw()) })
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Table<String> {
        Table::new("event", "not an event this device created, or destroyed already")
    }

    #[test]
    fn an_unknown_id_is_an_invalid_handle_error() {
        let t = table();
        let e = t.get(7).unwrap_err();
        assert_eq!(
            e,
            DeviceError::InvalidHandle {
                what: "event",
                id: 7,
                why: "not an event this device created, or destroyed already"
            }
        );
        assert_eq!(
            e.to_string(),
            "unknown event 0x7: not an event this device created, or destroyed already"
        );
        assert_eq!(t.remove(7).unwrap_err(), e);
    }

    #[test]
    fn the_first_object_registered_under_an_id_stays() {
        let t = table();
        t.insert(3, || Arc::new("first".into()));
        t.insert(3, || panic!("not made again"));
        assert_eq!(*t.get(3).unwrap(), "first");
        assert!(t.contains(3));
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn a_removed_id_is_unknown_but_its_object_lives_while_a_call_holds_it() {
        let t = table();
        t.insert(5, || Arc::new("ev".into()));
        let in_use = t.get(5).unwrap();
        let removed = t.remove(5).unwrap();
        assert!(t.get(5).is_err(), "gone from the table at once");
        assert!(t.remove(5).is_err(), "removing twice is an error, not a double destroy");
        drop(removed);
        assert_eq!(*in_use, "ev", "the call that looked it up still has it");
        assert_eq!(Arc::strong_count(&in_use), 1, "and drops (destroys) it last");
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn without_a_driver_a_cuda_device_is_a_typed_error() {
        if driver_present() {
            return; // the GPU tests cover this machine
        }
        assert_eq!(CudaDevice::new(0).err(), Some(DeviceError::NoDriver));
    }
}
