//! What happens in a child process after `fork`.
//!
//! Note [After fork]
//! -----------------
//! A forked child (a DataLoader worker, say) inherits the parent's allocators: their tables,
//! and their locks as they were at the fork, possibly held by a thread that does not exist
//! in the child. CUDA cannot be used in the child either. So a handler that runs in the
//! child right after the fork marks the process forked, and from then on the C interface
//! touches neither the allocators nor the driver: malloc fails with a message that says
//! why, and free does nothing (the memory is the parent's, and the parent frees it).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

static FORKED: AtomicBool = AtomicBool::new(false);
static INSTALL: Once = Once::new();

extern "C" fn in_child() {
    FORKED.store(true, Ordering::SeqCst);
}

/// Registers the handler, once per process.
pub(super) fn install() {
    INSTALL.call_once(|| {
        // SAFETY: registers a handler that only stores to an atomic, which is
        // async-signal-safe as a fork child handler must be.
        unsafe { libc::pthread_atfork(None, None, Some(in_child)) };
    });
}

/// Whether this process is a child forked from one that used the allocator.
pub(crate) fn forked() -> bool {
    FORKED.load(Ordering::Relaxed)
}
