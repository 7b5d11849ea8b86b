//! Keeping the calling thread's CUDA context as PyTorch set it.
//!
//! Note [The caller's context]
//! ---------------------------
//! PyTorch calls free on whatever thread drops the last reference to a tensor, with that
//! thread's current device set for its own work, not for the tensor's. The allocator's
//! device calls make the tensor's GPU context current on the thread (`cuCtxSetCurrent`),
//! and the CUDA runtime then takes that context as the thread's device: kernels launched
//! next would go to the wrong GPU. So every call from PyTorch that may touch the driver
//! puts the thread's previous context back when it ends.

use cudarc::driver::sys;

/// Restores the context that was current when it was made, if a call changed it.
pub(super) struct KeepContext(Option<sys::CUcontext>);

impl KeepContext {
    /// Remembers the current context; `cuda` is false for the simulated device, where no
    /// driver may be loaded.
    pub(super) fn new(cuda: bool) -> KeepContext {
        if !cuda {
            return KeepContext(None);
        }
        let mut ctx: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: writes the current context (or null) into `ctx`.
        let r = unsafe { sys::cuCtxGetCurrent(&mut ctx) };
        KeepContext((r == sys::CUresult::CUDA_SUCCESS).then_some(ctx))
    }
}

impl Drop for KeepContext {
    fn drop(&mut self) {
        let Some(before) = self.0 else { return };
        let mut now: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: reads the current context; sets back one that was current on this thread.
        unsafe {
            if sys::cuCtxGetCurrent(&mut now) == sys::CUresult::CUDA_SUCCESS
                && now != before
                && !before.is_null()
            {
                sys::cuCtxSetCurrent(before);
            }
        }
    }
}
