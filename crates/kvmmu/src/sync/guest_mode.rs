//! How many vCPUs the current thread holds in guest mode, to turn a self-deadlock (a remote TLB
//! flush waiting for this very thread's acknowledgement) into a clear panic.
//!
//! Kept here, below both `vm` (which refuses a flush from guest mode) and `vcpu` (which enters and
//! leaves guest mode), so that `vm` never imports `vcpu`.

use std::cell::Cell;

crate::sync::thread_local! {
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// The current thread entered guest mode with one more vCPU.
pub(crate) fn enter() {
    DEPTH.with(|d| d.set(d.get() + 1));
}

/// The current thread left guest mode with one vCPU.
pub(crate) fn exit() {
    DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
}

/// True if the current thread holds a vCPU in guest mode.
pub(crate) fn current_thread_in_guest_mode() -> bool {
    DEPTH.with(|d| d.get() > 0)
}
