//! The allocator PyTorch calls through `torch.cuda.memory.CUDAPluggableAllocator`: one
//! gpumem allocator per GPU, made on first use with the settings `gpumem.torch.enable()`
//! gave, reached from PyTorch through the C functions of `ffi.rs` and from Python through
//! `gpumem.torch` (stats, snapshots, history).
//!
//! Note [One library, two roles]
//! -----------------------------
//! The same shared library is imported by Python as the module `gpumem._gpumem` and opened
//! by PyTorch with `ctypes.CDLL(path)` to find the C functions. The dynamic loader gives the
//! already-loaded library for the second open, so both roles share these statics: the stats
//! Python reads are those of the allocators PyTorch allocates from.

mod context;
pub(crate) mod ffi;
mod fork;

use crate::allocator::{make_device, parse_policy, Inner};
use crate::device::AnyDevice;
use gpumem::{AllocError, Policy, StackSource, StreamId};
use parking_lot::Mutex;
use std::sync::{Arc, OnceLock};

pub(crate) use fork::forked;

/// GPUs per process that the plugin serves: device indices at or above it are refused.
pub(crate) const MAX_DEVICES: usize = 64;

/// The allocator of each device, once made; never replaced, so a reference to one stays valid
/// and the hot path reads it without a lock.
static ALLOCATORS: [OnceLock<Served>; MAX_DEVICES] = [const { OnceLock::new() }; MAX_DEVICES];

/// One device's allocator, and a clone of its device (clones share the GPU and its stream
/// table), so that the calls from PyTorch resolve streams and contexts without the
/// allocator's lock (`Allocator::with_device` takes it).
pub(crate) struct Served {
    pub(crate) alloc: Arc<Inner>,
    device: AnyDevice,
}

impl Served {
    /// Whether this serves a real GPU.
    pub(crate) fn is_cuda(&self) -> bool {
        matches!(self.device, AnyDevice::Cuda(_))
    }

    /// Whether `stream` (a raw `cudaStream_t`; null is the legacy default stream, which
    /// every context has) belongs to this device's context: only such a stream may be given
    /// to [`Served::stream_id`].
    pub(crate) fn has_stream(&self, stream: *mut std::ffi::c_void) -> bool {
        match &self.device {
            AnyDevice::Cuda(c) => {
                if stream.is_null() {
                    return true;
                }
                let mut ctx: cudarc::driver::sys::CUcontext = std::ptr::null_mut();
                // SAFETY: asks the driver which context a stream handle PyTorch passed belongs
                // to; writes only `ctx`.
                let r = unsafe { cudarc::driver::sys::cuStreamGetCtx(stream.cast(), &mut ctx) };
                r == cudarc::driver::sys::CUresult::CUDA_SUCCESS && ctx == c.context().cu_ctx()
            }
            AnyDevice::Sim(_) => true,
        }
    }

    /// The device's id for a stream PyTorch passed as a raw `cudaStream_t`, which must be of
    /// this device (the `device` argument of malloc, or [`Served::has_stream`]).
    pub(crate) fn stream_id(&self, stream: *mut std::ffi::c_void) -> StreamId {
        match &self.device {
            // SAFETY: PyTorch passes its own streams, of this device's primary context, and
            // never destroys them: its pools of streams live as long as the process
            // (`foreign_stream_id`'s contract; `torch.cuda.ExternalStream`s must outlive their
            // tensors' use, as they must under PyTorch's own allocator).
            AnyDevice::Cuda(c) => unsafe { c.foreign_stream_id(stream.cast()) },
            AnyDevice::Sim(_) => StreamId(stream as u64),
        }
    }
}

/// How the allocators are made, and what every new one starts with.
struct Settings {
    policy: Option<Policy>,
    /// `"cuda"`, or `"sim"` for tests of the C interface without a GPU.
    device: String,
    capacity: Option<u64>,
    /// History recording that `_record_memory_history` turned on: `(max_entries, stacks)`.
    history: Option<(usize, bool)>,
}

static SETTINGS: Mutex<Settings> =
    Mutex::new(Settings { policy: None, device: String::new(), capacity: None, history: None });

/// Sets the policy and device of the allocators to come. Refused once any exists: an
/// allocator holding PyTorch's memory cannot change its policy.
pub(crate) fn configure(policy: &str, device: &str, capacity: Option<u64>) -> Result<(), String> {
    let policy = parse_policy(policy).map_err(|e| e.to_string())?;
    if !matches!(device, "cuda" | "sim") {
        return Err(format!("unknown device {device:?}: use \"cuda\" or \"sim\""));
    }
    let mut s = SETTINGS.lock();
    if let Some(i) = ALLOCATORS.iter().position(|a| a.get().is_some()) {
        return Err(format!(
            "gpumem's allocator for device {i} already exists: the policy can only be set before the first allocation"
        ));
    }
    fork::install();
    s.policy = Some(policy);
    s.device = device.to_string();
    s.capacity = capacity;
    Ok(())
}

/// The allocator of `device`, made now if it is the first use.
pub(crate) fn allocator(device: usize) -> Result<&'static Served, AllocError> {
    let slot = ALLOCATORS.get(device).ok_or_else(|| {
        AllocError::InvalidArgument(format!(
            "device index {device} is out of range (gpumem serves 0 to {})",
            MAX_DEVICES - 1
        ))
    })?;
    if let Some(a) = slot.get() {
        return Ok(a);
    }
    let s = SETTINGS.lock();
    if let Some(a) = slot.get() {
        return Ok(a); // made by another thread while this one waited for the lock
    }
    let policy = s.policy.clone().unwrap_or_else(|| Policy::parse("gpumem").expect("a known policy"));
    let kind = if s.device.is_empty() { "cuda" } else { s.device.as_str() };
    let dev = make_device(kind, device, s.capacity)
        .map_err(|e| AllocError::InvalidArgument(format!("cannot open device {device}: {e}")))?;
    let a = Arc::new(Inner::with_policy(dev.clone(), &policy)?);
    if let Some((max_entries, stacks)) = s.history {
        start_history(&a, max_entries, stacks);
    }
    Ok(slot.get_or_init(|| Served { alloc: a, device: dev }))
}

/// Every allocator made so far, with its device index.
pub(crate) fn existing() -> impl Iterator<Item = (usize, &'static Served)> {
    ALLOCATORS.iter().enumerate().filter_map(|(i, a)| a.get().map(|a| (i, a)))
}

/// The device kind of the allocators (`"cuda"` unless configured otherwise).
pub(crate) fn device_kind() -> String {
    let s = SETTINGS.lock();
    if s.device.is_empty() {
        "cuda".into()
    } else {
        s.device.clone()
    }
}

fn start_history(a: &Inner, max_entries: usize, stacks: bool) {
    a.record_history(true, max_entries);
    a.set_stack_source(stacks.then(|| Arc::new(crate::stacks::python_stack) as StackSource));
}

/// Starts (or with `None` stops and clears) recording history on every allocator, present
/// and to come.
pub(crate) fn record_history(setting: Option<(usize, bool)>) {
    let mut s = SETTINGS.lock();
    s.history = setting;
    for (_, Served { alloc: a, .. }) in existing() {
        match setting {
            Some((max_entries, stacks)) => start_history(a, max_entries, stacks),
            None => {
                a.set_stack_source(None);
                a.record_history(false, 1);
            }
        }
    }
}

/// The history setting of every allocator: `(max_entries, stacks)`, or `None` when off.
pub(crate) fn history() -> Option<(usize, bool)> {
    SETTINGS.lock().history
}
