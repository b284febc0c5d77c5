//! Which threads are running guest code: the bottom half of the guest-mode contract.
//!
//! A thread that holds a vCPU in guest mode behaves like a CPU in VMX non-root mode: it
//! acknowledges remote TLB flushes only between two of its own accesses. So while it is in guest
//! mode it must not block on anything a flusher may hold while it waits for that acknowledgement
//! (`mmu_lock`, `slots_lock`, the host's `mm_writer`, the vCPU registry), nor flush or invalidate
//! itself. The vCPU layer counts, per thread, how many vCPUs the thread holds in guest mode
//! (`enter` / `exit`); the layers below ask [`in_guest_mode`] at the entry of every call that
//! could block that way and refuse it **before** changing any state: a typed
//! [`InGuestMode`] error where the call returns a `Result`, a panic with
//! [`refuse`]'s message where it does not.
//!
//! The depth is per thread, so the vCPU's guest-mode value must never move to another thread
//! (it is `!Send`): dropping it elsewhere would decrement the wrong thread's depth.
//!
//! Under `cfg(loom)` the vCPU layer is not compiled, so the depth stays 0. Under shuttle the
//! depth lives in a shuttle thread-local, one per shuttle thread.

use std::cell::Cell;

crate::sync::thread_local! {
    /// How many vCPUs the current thread holds in guest mode.
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// A call refused because the calling thread holds a vCPU in guest mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "kvmmu: refused `{op}`: the calling thread holds a vCPU in guest mode, and the call could \
     wait for that vCPU's own TLB-flush acknowledgement (a deadlock); nothing was changed. Leave \
     guest mode first (drop the GuestMode), as a real vCPU exits to its VMM before such calls"
)]
pub struct InGuestMode {
    /// The refused operation.
    pub op: &'static str,
}

/// The current thread enters guest mode with one more vCPU (called by the vCPU layer only).
pub(crate) fn enter() {
    DEPTH.with(|d| d.set(d.get() + 1));
}

/// The current thread leaves guest mode with one vCPU (called by the vCPU layer only).
pub(crate) fn exit() {
    DEPTH.with(|d| {
        debug_assert!(d.get() > 0, "guest-mode depth underflow");
        d.set(d.get().saturating_sub(1));
    });
}

/// True if the current thread holds a vCPU in guest mode.
#[inline]
pub fn in_guest_mode() -> bool {
    DEPTH.with(|d| d.get() > 0)
}

/// `Err` if the current thread is in guest mode: the entry check of a call that returns a
/// `Result` and could block on a flusher (`op` names the call in the error).
#[inline]
pub fn check(op: &'static str) -> Result<(), InGuestMode> {
    if in_guest_mode() {
        Err(InGuestMode { op })
    } else {
        Ok(())
    }
}

/// Panics with [`InGuestMode`]'s message if the current thread is in guest mode: the entry check
/// of a call that returns no `Result`. Call it before changing any state.
///
/// # Panics
/// If the current thread holds a vCPU in guest mode.
#[inline]
#[track_caller]
pub fn refuse(op: &'static str) {
    if let Err(e) = check(op) {
        panic!("{e}");
    }
}

#[cfg(all(test, not(loom), not(feature = "shuttle")))]
mod tests {
    use super::*;

    #[test]
    fn depth_is_per_thread_and_checks_refuse_only_in_guest_mode() {
        assert_eq!(check("munmap"), Ok(()));
        enter();
        enter();
        assert_eq!(check("munmap"), Err(InGuestMode { op: "munmap" }));
        std::thread::spawn(|| assert!(!in_guest_mode(), "another thread is not in guest mode"))
            .join()
            .unwrap();
        exit();
        assert!(in_guest_mode(), "one vCPU still in guest mode");
        let p = std::panic::catch_unwind(|| refuse("release")).unwrap_err();
        let msg = p.downcast_ref::<String>().unwrap();
        assert!(
            msg.contains("`release`") && msg.contains("guest mode"),
            "{msg}"
        );
        exit();
        assert!(!in_guest_mode());
        refuse("release");
    }
}
