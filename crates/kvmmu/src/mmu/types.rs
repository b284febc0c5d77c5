//! The types both MMUs share with the layers above: a fault's request and outcome (`RET_PF_*`),
//! the simulated CPU's walk result, the access the CPU makes through a leaf, and the remote TLB
//! flush the VM provides.

use crate::addr::{Gfn, Level, Pfn};
use crate::mmu::spte::{
    ACCESSED_MASK, AtomicSpte, DIRTY_MASK, Spte, WRITABLE_MASK, restore_access_tracked,
};
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
    /// The largest level the caller allows (`goal_level`, `kvm_mmu_max_mapping_level`): the MMU
    /// installs a leaf of at most this level (lower where a table is already in place), mapping
    /// the level-aligned block around `gfn` to the frames around `pfn`, which the caller checked
    /// are contiguous and equally aligned.
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
        /// The leaf allows instruction fetches (its X bit; clear on a huge leaf under the NX
        /// huge pages mitigation).
        executable: bool,
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
///
/// An A/D-disabled leaf (spte.rs invariant 6) is never written: one marked for access tracking
/// allows no access (an EPT violation, reported as [`HwWalk::NotPresent`]), and a hit reports
/// `dirty` as W, since the CPU sets no D bit in it.
///
/// The frame returned is the 4K frame of `gfn` inside the leaf (base + offset for a huge leaf).
/// Inlined: it is the end of every TLB miss (issue 15).
#[inline]
pub(crate) fn access_leaf(
    sptep: &AtomicSpte,
    mut spte: Spte,
    level: Level,
    gfn: u64,
    write: bool,
) -> HwWalk {
    if !spte.ad_enabled() {
        if !spte.is_present_leaf(level) || spte.is_access_tracked() {
            return HwWalk::NotPresent;
        }
        if write && !spte.is_writable() {
            return HwWalk::WriteProtected;
        }
        return HwWalk::Hit {
            pfn: crate::mmu::hugepage::frame_in_leaf(gfn, spte.pfn(), level),
            writable: spte.is_writable(),
            dirty: spte.is_writable(),
            executable: spte.raw() & crate::mmu::spte::EXECUTABLE_MASK != 0,
            level,
        };
    }
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
                pfn: crate::mmu::hugepage::frame_in_leaf(gfn, spte.pfn(), level),
                writable: spte.is_writable(),
                dirty: spte.is_dirty(),
                executable: spte.raw() & crate::mmu::spte::EXECUTABLE_MASK != 0,
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

/// The result of a fast page fault attempt (`RET_PF_FIXED` / `RET_PF_SPURIOUS` / `RET_PF_INVALID`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum FastFault {
    /// The leaf was made to allow the access by one CAS: for a write, the caller marks the page
    /// dirty.
    Fixed,
    /// The leaf already allows the access.
    Spurious,
    /// Not a case for the fast path (no present 4K leaf, not MMU-writable, invalid root, or the
    /// CAS lost a race): take the slow path.
    Slow,
}

/// The fast path's one write (`fast_page_fault`'s loop body, without its retries): from `old`
/// (a present 4K leaf) to the leaf that allows the access — restored if it is marked for access
/// tracking, and with `W | A` (and D for an A/D-disabled leaf, invariant 6) for a write if it is
/// MMU-writable. [`FastFault::Spurious`] if `old` already allows the access,
/// [`FastFault::Slow`] if only the locked path can allow it or the CAS lost a race.
#[inline]
pub(crate) fn fix_fast(sptep: &AtomicSpte, old: Spte, write: bool) -> FastFault {
    let mut new = restore_access_tracked(old);
    if write && !new.is_writable() {
        if !new.is_mmu_writable() {
            return FastFault::Slow;
        }
        let d = if new.ad_enabled() { 0 } else { DIRTY_MASK };
        new = Spte::from_raw(new.raw() | WRITABLE_MASK | ACCESSED_MASK | d);
    }
    if new == old {
        return FastFault::Spurious;
    }
    // ORDERING: D2 — the CAS changes only permission bits of a leaf whose pfn and frame contents
    // were published by the installing fault's Release CAS (or store, shadow); an RMW continues that release
    // sequence, so a walker's Acquire load of the new value still synchronises with the install.
    // Comparing the whole word is what rules out a stale pfn (a zapped leaf never reads back equal).
    match sptep.compare_exchange(old, new, Ordering::Relaxed, Ordering::Relaxed) {
        Ok(_) => FastFault::Fixed,
        Err(_) => FastFault::Slow,
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

/// What a zap leaves to do once it returns: remote TLBs must be flushed before `mmu_lock` is
/// dropped (the kernel's `flush_on_ret`), and the memory it unlinked may be freed only after that
/// flush (the shadow MMU's commit-zap, S1). [`ZapBatch::commit`] does both, in that order.
///
/// The zap itself has already flushed wherever it had to earlier (before yielding `mmu_lock`,
/// before dropping RCU over unlinked TDP tables); the batch is the one flush at the end.
#[must_use = "a zap's batch must be committed (flush, then free) before mmu_lock is dropped"]
#[derive(Default)]
pub struct ZapBatch {
    flush: bool,
    /// Frees of unlinked memory, run by `commit` after the flush.
    retire: Vec<Box<dyn FnOnce()>>,
}

impl core::fmt::Debug for ZapBatch {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ZapBatch")
            .field("flush", &self.flush)
            .field("retire", &self.retire.len())
            .finish()
    }
}

impl ZapBatch {
    /// Nothing zapped, nothing to flush or free.
    pub fn empty() -> ZapBatch {
        ZapBatch::default()
    }

    /// True if committing will flush remote TLBs.
    pub fn needs_flush(&self) -> bool {
        self.flush
    }

    /// Adds another zap's leftovers to this batch.
    pub fn merge(&mut self, mut other: ZapBatch) {
        self.flush |= other.flush;
        self.retire.append(&mut other.retire);
    }

    /// Records that leaves were zapped: remote TLBs must be flushed before `mmu_lock` is dropped.
    pub(crate) fn flush_before_unlock(&mut self) {
        self.flush = true;
    }

    /// Queues `free` to run after the flush: it frees memory the zap unlinked, which only vCPUs
    /// that have not yet acknowledged a flush may still be walking.
    pub(crate) fn free_after_flush(&mut self, free: impl FnOnce() + 'static) {
        self.flush = true;
        self.retire.push(Box::new(free));
    }

    /// Flushes remote TLBs if anything was zapped since the zap's last flush, then frees what the
    /// zap unlinked. Call it while still holding `mmu_lock` write.
    pub fn commit(mut self, flusher: &(impl RemoteTlbFlush + ?Sized)) {
        if self.flush {
            flusher.flush_remote_tlbs();
        }
        for free in self.retire.drain(..) {
            free();
        }
    }
}

impl Drop for ZapBatch {
    fn drop(&mut self) {
        // A batch dropped without `commit` leaks what it would have freed: never a free without
        // the flush. Say so in debug builds (not while unwinding from another panic).
        debug_assert!(
            self.retire.is_empty() || std::thread::panicking(),
            "kvmmu bug: a ZapBatch holding unlinked memory was dropped without commit (leaked)"
        );
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;

    struct Log(Rc<RefCell<Vec<&'static str>>>);
    impl RemoteTlbFlush for Log {
        fn flush_remote_tlbs(&self) {
            self.0.borrow_mut().push("flush");
        }
    }

    #[test]
    fn a_zap_batch_flushes_before_it_frees_and_merges_into_one_flush() {
        let log = Rc::new(RefCell::new(Vec::new()));
        let mut a = ZapBatch::empty();
        assert!(!a.needs_flush());
        let l = Rc::clone(&log);
        a.free_after_flush(move || l.borrow_mut().push("free a"));
        let mut b = ZapBatch::empty();
        b.flush_before_unlock();
        let l = Rc::clone(&log);
        b.free_after_flush(move || l.borrow_mut().push("free b"));
        a.merge(b);
        assert!(a.needs_flush());
        assert!(log.borrow().is_empty(), "nothing is freed before commit");
        a.commit(&Log(Rc::clone(&log)));
        assert_eq!(*log.borrow(), ["flush", "free a", "free b"]);
    }

    #[test]
    fn an_empty_zap_batch_commits_without_flushing() {
        let log = Rc::new(RefCell::new(Vec::new()));
        ZapBatch::empty().commit(&Log(Rc::clone(&log)));
        assert!(log.borrow().is_empty());
    }
}
