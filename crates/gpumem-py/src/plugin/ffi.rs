//! The C functions PyTorch's `CUDAPluggableAllocator` calls: malloc and free with its
//! signatures, and the hooks for `torch.cuda.empty_cache`, `set_per_process_memory_fraction`,
//! `Tensor.record_stream`, the base allocation and CUDA graph capture.
//!
//! The rules every function here keeps (`../shared/reference/pytorch-plugin.md` says why):
//! - No panic crosses the interface: each body runs under `catch_unwind`, and a panic
//!   becomes an error (malloc) or is reported and swallowed (the rest).
//! - No GIL: nothing here takes it, except malloc while history is recorded with Python
//!   stacks, as PyTorch's own allocator does then, and never under the allocator's lock (Note
//!   \[Stacks and the GIL\] in `stacks.rs`).
//! - Every call uses its `device` argument, and leaves the thread's CUDA context as it found
//!   it (Note \[The caller's context\] in `context.rs`).
//! - Free works from any thread and never fails loudly: PyTorch calls it from destructors,
//!   where an exception would end the process.
//! - After `fork`, nothing here touches the allocators (Note \[After fork\] in `fork.rs`).

use super::context::KeepContext;
use super::{allocator, existing, forked};
use crate::allocator::Inner;
use gpumem::{format_size, AllocError, Policy};
use std::ffi::{c_char, c_int, c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};

extern "C-unwind" {
    /// Throws `std::runtime_error(message)` (src/throw.cpp).
    fn gpumem_throw_runtime_error(message: *const c_char) -> !;
}

/// Runs `f`, turning a panic into an error message.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let why = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(format!("gpumem: internal error in {what} ({why}); please report it"))
    })
}

/// Says `message` on stderr, once per kind of problem: a free that fails has no caller to
/// tell, and a program freeing in a loop must not flood the terminal.
fn report_once(flag: &AtomicBool, message: &str) {
    if !flag.swap(true, Ordering::Relaxed) {
        eprintln!("{message}");
    }
}

fn device_index(device: c_int) -> Result<usize, String> {
    usize::try_from(device).map_err(|_| format!("gpumem: invalid device index {device}"))
}

/// The message for a failed allocation: PyTorch's own first sentences, which programs and
/// PyTorch's tests match on ("CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a
/// total capacity of ..."), then gpumem's report of where the memory is.
fn malloc_error(size: usize, device: usize, a: Option<&Inner>, e: AllocError) -> String {
    let policy = a.map_or("?", |a| Policy::kind_name(a.policy()));
    match e {
        AllocError::OutOfMemory(oom) => format!(
            "CUDA out of memory. Tried to allocate {}. GPU {} has a total capacity of {} of which {} is free. {} (gpumem, {policy} policy)",
            format_size(oom.alloc_size),
            oom.device,
            format_size(oom.total),
            format_size(oom.free),
            oom.details(),
        ),
        // PyTorch's words for an impossible size, which its own tests match on
        AllocError::TooLarge(_) => format!(
            "CUDA out of memory. Tried to allocate more than 1EB memory. (gpumem, {policy} policy: {size} bytes were asked for; check the size computation)"
        ),
        other => format!("gpumem ({policy} policy) could not allocate {size} bytes on device {device}: {other}"),
    }
}

fn try_malloc(size: usize, device: c_int, stream: *mut c_void) -> Result<*mut c_void, String> {
    if forked() {
        return Err("gpumem: this process was forked from one that used the GPU, and CUDA cannot be used in a forked child; use the 'spawn' start method (torch.multiprocessing.set_start_method('spawn'))".into());
    }
    let device = device_index(device)?;
    let served = allocator(device).map_err(|e| malloc_error(size, device, None, e))?;
    let _keep = KeepContext::new(served.is_cuda());
    let a = &served.alloc;
    a.malloc(size as u64, served.stream_id(stream))
        .map(|p| p as *mut c_void)
        .map_err(|e| malloc_error(size, device, Some(a), e))
}

/// PyTorch's malloc: `void* malloc(size_t size, int device, cudaStream_t stream)`. A size of
/// 0 gives null, as PyTorch expects. On failure it throws a C++ `std::runtime_error` whose
/// message starts "CUDA out of memory." for out of memory, which PyTorch raises in Python as
/// a `RuntimeError` at the line that allocated; it never returns null for a nonzero size.
#[no_mangle]
pub extern "C-unwind" fn gpumem_torch_malloc(size: usize, device: c_int, stream: *mut c_void) -> *mut c_void {
    match guarded("malloc", || try_malloc(size, device, stream)) {
        Ok(p) => p,
        Err(message) => {
            let message = CString::new(message.replace('\0', " ")).unwrap_or_default();
            // SAFETY: `message` is a valid C string; the C++ function copies it before it
            // throws, and the exception unwinds through this frame ("C-unwind"), dropping it.
            unsafe { gpumem_throw_runtime_error(message.as_ptr()) }
        }
    }
}

/// The same allocation as [`gpumem_torch_malloc`], for callers that cannot catch a C++
/// exception (tests through `ctypes`): returns 0 and the address in `*out`, or -1 and the
/// error message in `message` (at most `message_len` bytes, with its terminating NUL).
///
/// # Safety
/// `out` must be valid for a write; `message` must be null or valid for `message_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn gpumem_try_malloc(
    size: usize,
    device: c_int,
    stream: *mut c_void,
    out: *mut *mut c_void,
    message: *mut c_char,
    message_len: usize,
) -> c_int {
    match guarded("malloc", || try_malloc(size, device, stream)) {
        Ok(p) => {
            // SAFETY: the caller vouches for `out`.
            unsafe { *out = p };
            0
        }
        Err(m) => {
            if !message.is_null() && message_len > 0 {
                let n = m.len().min(message_len - 1);
                // SAFETY: the caller vouches for `message_len` bytes at `message`.
                unsafe {
                    std::ptr::copy_nonoverlapping(m.as_ptr(), message.cast(), n);
                    *message.add(n) = 0;
                }
            }
            -1
        }
    }
}

static FREE_FAILED: AtomicBool = AtomicBool::new(false);

/// PyTorch's free: `void free(void* ptr, size_t size, int device, cudaStream_t stream)`.
/// `stream` is the allocation's stream, which gpumem knows already.
#[no_mangle]
pub extern "C" fn gpumem_torch_free(ptr: *mut c_void, _size: usize, device: c_int, _stream: *mut c_void) {
    if ptr.is_null() || forked() {
        return;
    }
    let r = guarded("free", || {
        let served = allocator(device_index(device)?).map_err(|e| e.to_string())?;
        let _keep = KeepContext::new(served.is_cuda());
        served.alloc.free(ptr as u64).map_err(|e| e.to_string())
    });
    if let Err(e) = r {
        report_once(&FREE_FAILED, &format!("gpumem: free of {ptr:p} on device {device} failed: {e} (further failures of free are not shown)"));
    }
}

/// Called once PyTorch initializes CUDA, with the number of GPUs. The allocators are made
/// on first use of each GPU, so that no context is created for a GPU the program never uses.
#[no_mangle]
pub extern "C" fn gpumem_torch_init(_device_count: c_int) {}

static EMPTY_FAILED: AtomicBool = AtomicBool::new(false);

/// `torch.cuda.empty_cache()`: every allocator gives its wholly free memory back.
#[no_mangle]
pub extern "C" fn gpumem_torch_empty_cache() {
    if forked() {
        return;
    }
    let r = guarded("empty_cache", || {
        for (_, served) in existing() {
            let _keep = KeepContext::new(served.is_cuda());
            served.alloc.empty_cache().map_err(|e| e.to_string())?;
        }
        Ok(())
    });
    if let Err(e) = r {
        report_once(&EMPTY_FAILED, &format!("gpumem: empty_cache failed: {e}"));
    }
}

/// `torch.cuda.set_per_process_memory_fraction(fraction, device)`.
#[no_mangle]
pub extern "C" fn gpumem_torch_set_fraction(fraction: f64, device: c_int) {
    if forked() {
        return;
    }
    let r = guarded("set_per_process_memory_fraction", || {
        let served = allocator(device_index(device)?).map_err(|e| e.to_string())?;
        let _keep = KeepContext::new(served.is_cuda());
        served.alloc.set_per_process_memory_fraction(fraction).map_err(|e| e.to_string())
    });
    if let Err(e) = r {
        eprintln!("gpumem: set_per_process_memory_fraction({fraction}, {device}) failed: {e}");
    }
}

/// `Tensor.record_stream(stream)`, with the tensor's storage pointer. A pointer of no gpumem
/// allocator (a tensor made from a foreign buffer) is left alone, as PyTorch's own allocator
/// does.
#[no_mangle]
pub extern "C" fn gpumem_torch_record_stream(ptr: *mut c_void, stream: *mut c_void) {
    if ptr.is_null() || forked() {
        return;
    }
    let _ = guarded("record_stream", || {
        // only the devices the stream belongs to: a stream is registered with a device
        // only if it is of that device's context (`foreign_stream_id`'s contract)
        for (_, served) in existing().filter(|(_, s)| s.has_stream(stream)) {
            let _keep = KeepContext::new(served.is_cuda());
            if served.alloc.record_stream(ptr as u64, served.stream_id(stream)).is_ok() {
                break;
            }
        }
        Ok(())
    });
}

/// The start and size of the segment that holds `ptr` (PyTorch's `getBaseAllocation`); `ptr`
/// itself, and `*size` unchanged, for a pointer no allocator holds.
///
/// # Safety
/// `size` must be null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn gpumem_torch_base_alloc(ptr: *mut c_void, size: *mut usize) -> *mut c_void {
    if ptr.is_null() || forked() {
        return ptr;
    }
    let found = guarded("base allocation", || {
        let p = ptr as u64;
        Ok(existing().find_map(|(_, served)| {
            served.alloc.snapshot().into_iter().find(|s| s.address <= p && p < s.address + s.total_size)
        }))
    });
    match found {
        Ok(Some(seg)) => {
            if !size.is_null() {
                // SAFETY: the caller vouches for `size`.
                unsafe { *size = seg.total_size as usize };
            }
            seg.address as *mut c_void
        }
        _ => ptr,
    }
}

/// The start of CUDA graph capture into a private pool. gpumem does not have private pools
/// for graphs yet, and allocating from the shared cache during capture would hand a graph's
/// memory to other work: so capture fails here, before it begins, with a message that says
/// so. The arguments (device, pool id, and PyTorch's stream filter, which only C++ can call)
/// are not read.
#[no_mangle]
pub extern "C-unwind" fn gpumem_torch_begin_pool(_device: c_int, _id0: u64, _id1: u64, _filter: *mut c_void) {
    let message = c"gpumem does not support CUDA graph capture yet (torch.cuda.graph, make_graphed_callables, torch.compile(mode=\"reduce-overhead\")): capture needs private memory pools, which gpumem's allocator does not have. Run without gpumem.torch.enable() to capture graphs, or use torch.compile without mode=\"reduce-overhead\".";
    // SAFETY: a valid C string; the exception unwinds through this frame ("C-unwind").
    unsafe { gpumem_throw_runtime_error(message.as_ptr()) }
}

/// The end of a capture (never reached: capture does not begin under gpumem).
#[no_mangle]
pub extern "C" fn gpumem_torch_end_pool(_device: c_int, _id0: u64, _id1: u64) {}

/// The release of a graph's pool (never reached: capture does not begin under gpumem).
#[no_mangle]
pub extern "C" fn gpumem_torch_release_pool(_device: c_int, _id0: u64, _id1: u64) {}
