//! # kvmmu-kvm: kvmmu held against the real kernel
//!
//! The machines this project builds on have a working `/dev/kvm`. This crate drives it through
//! rust-vmm's `kvm-ioctls`: a real VM with memslots and one vCPU running a minimal 64-bit guest
//! ([`guest`]: identity-mapped page tables and a few routines assembled here), real host memory
//! ([`hostmem`]: `munmap`, `mprotect`, `madvise(MADV_DONTNEED)`, `mmap(MAP_FIXED)`), and KVM's
//! binary statistics ([`stats`]). The [`diff`] families run one seeded operation sequence on kvmmu
//! and on real KVM and compare every answer; [`timing`] runs the populate / re-touch workload on
//! both, side by side.
//!
//! Without `/dev/kvm` (or without permission) [`open_or_skip`] prints one line saying why and the
//! caller skips.

pub mod diff;
pub mod guest;
pub mod hostmem;
pub mod runner;
pub mod stats;
pub mod timing;

pub use runner::{HostLimits, KvmExit, KvmUnavailable, KvmVm};

use std::sync::{Mutex, MutexGuard};

static KVM_LOCK: Mutex<()> = Mutex::new(());

/// Serialises real-KVM runs within a process (hostmem contract item 3: no foreign mapping may be
/// created while a run has a hole in its guest memory). Poisoning is ignored: a failed test must
/// not fail the others.
pub fn kvm_lock() -> MutexGuard<'static, ()> {
    KVM_LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Prints `SKIPPED <what>: <why>` straight to the process's stderr, past the test harness's output
/// capture, so that a skip shows in a plain `cargo test` run.
pub fn skip_line(what: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {what}: {why} (the real-KVM tests need /dev/kvm)"
    );
}

/// Opens a real VM, or prints `SKIPPED <what>: <why>` on stderr and returns `None`.
pub fn open_or_skip(what: &str) -> Option<KvmVm> {
    match KvmVm::open() {
        Ok(vm) => Some(vm),
        Err(why) => {
            skip_line(what, &why.to_string());
            None
        }
    }
}
