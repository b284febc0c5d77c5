//! The types both MMUs share with the layers above: a fault's request and outcome (`RET_PF_*`),
//! the simulated CPU's walk result, the access the CPU makes through a leaf, and the remote TLB
//! flush the VM provides.

use crate::addr::{Gfn, Level, Pfn};
use crate::mmu::spte::{ACCESSED_MASK, AtomicSpte, DIRTY_MASK, Spte};
use crate::sync::atomic::Ordering;

/// Result of an MMU's `map` step, like KVM's `RET_PF_*`: control flow, not an error.
#[must_use = "a Retry means nothing was installed and the vCPU must fault again"]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum FaultOutcome {
    /// A new leaf was installed (`RET_PF_FIXED`).
    Fixed,
    /// The SPTE already allowed the access (`RET_PF_SPURIOUS`): nothing changed.
    Spurious,
    /// Nothing was installed; re-enter the guest and let it fault again (`RET_PF_RETRY`).
    Retry(RetryReason),
    /// The gfn lies beyond what a root can map (48-bit guest physical addresses); nothing was
    /// installed. The caller reports it like a fault on an address no memslot covers.
    OutOfRange,
}

/// Why a fault must be retried.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum RetryReason {
    /// An SPTE on the path was FROZEN by another thread's multi-step update (P7).
    Frozen,
    /// A compare-and-swap on the path lost a race with another writer.
    CasLost,
    /// The root was invalidated; the vCPU must load a new root.
    InvalidRoot,
    /// An invalidation raced with the fault (`mmu_invalidate_retry_gfn`); set by the caller's
    /// sequence check, never returned by an MMU's `map`.
    Invalidation,
    /// The memslot is being deleted or moved (`KVM_MEMSLOT_INVALID`); set by the caller.
    InvalidSlot,
}

/// One fault to resolve (`struct kvm_page_fault`, the parts the MMUs need).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct MapRequest {
    /// The faulting guest frame.
    pub gfn: Gfn,
    /// The host frame backing it.
    pub pfn: Pfn,
    /// The largest level the caller allows (`goal_level`). This implementation maps at 4K only;
    /// a larger level is accepted and mapped at 4K, which is correct for `gfn` → `pfn`.
    pub level: Level,
    /// The host mapping is writable.
    pub host_writable: bool,
    /// The guest access was a write (the leaf is made writable when the host allows it).
    pub write_fault: bool,
    /// Speculative install: the leaf starts without the Accessed bit.
    pub prefetch: bool,
}

/// Result of the simulated CPU's page walk.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum HwWalk {
    /// A present leaf allows the access; A (and D for a write) is now set in it.
    Hit {
        /// The host frame the gfn maps to.
        pfn: Pfn,
        /// The leaf is writable (the TLB may cache write permission).
        writable: bool,
        /// The leaf's Dirty bit after the walk.
        dirty: bool,
        /// The level of the leaf.
        level: Level,
    },
    /// No present leaf maps the gfn (an EPT violation on a not-present entry).
    NotPresent,
    /// A present leaf maps the gfn but does not allow writes (a permission miss).
    WriteProtected,
}

/// The simulated CPU's access through the leaf `spte` (last loaded from `sptep`, at `level`), as
/// both MMUs' hardware walks end: if it is a present leaf that allows the access, set A (and D if
/// `write`) unless already set, with a compare-and-swap on the value just checked (spte.rs O5: A/D
/// never lands on a value that stopped being a present leaf), re-evaluating on a lost race.
pub(crate) fn access_leaf(sptep: &AtomicSpte, mut spte: Spte, level: Level, write: bool) -> HwWalk {
    let want = ACCESSED_MASK | if write { DIRTY_MASK } else { 0 };
    loop {
        if !spte.is_present_leaf(level) {
            return HwWalk::NotPresent;
        }
        if write && !spte.is_writable() {
            return HwWalk::WriteProtected;
        }
        if spte.raw() & want == want {
            return HwWalk::Hit {
                pfn: spte.pfn(),
                writable: spte.is_writable(),
                dirty: spte.is_dirty(),
                level,
            };
        }
        let new = Spte::from_raw(spte.raw() | want);
        // ORDERING: O5 — atomicity keeps concurrent A/D/zap updates; on failure the fresh
        // value is re-checked, and Acquire matches the walk's loads (O1) in case it changed.
        match sptep.compare_exchange(spte, new, Ordering::Relaxed, Ordering::Acquire) {
            Ok(_) => spte = new,
            Err(actual) => spte = actual,
        }
    }
}

/// Remote TLB shootdown, provided by the caller (the VM): `kvm_flush_remote_tlbs`.
pub trait RemoteTlbFlush {
    /// Makes every vCPU drop its cached translations before returning.
    fn flush_remote_tlbs(&self);
}

/// Root reloads, provided by the caller (the VM): `kvm_make_all_cpus_request(KVM_REQ_MMU_RELOAD)`.
pub trait RootReload {
    /// Asks every vCPU to drop its root and TLB and load a fresh root on its next entry.
    fn request_root_reload(&self);
}
