//! The page-fault handler (`kvm_mmu_page_fault`, spec §3.4): VM orchestration around the MMU's
//! `map` step.
//!
//! 1. Under SRCU, look up the memslot of the gfn. No slot → exit to the user; an INVALID slot (being
//!    deleted or moved) → RETRY; a write to a read-only slot → exit to the user.
//! 2. Snapshot `mmu_invalidate_seq` ([`super::seq::InvalidateState::snapshot`]) **before** reading
//!    host page tables; pre-check lock-free for a racing invalidation (cheap RETRY instead of
//!    contending `mmu_lock` with an invalidation).
//! 3. Resolve the host frame with `get_user_page`; a host error (unmapped, or a write to read-only
//!    memory) is an exit to the user, like KVM's `-EFAULT`.
//! 4. [`Mmu::map`](crate::mmu::Mmu::map) takes `mmu_lock` in the mode the MMU needs (read for
//!    TDP, write for shadow); under it, if the VM is dead, the root is obsolete, or an
//!    invalidation covering the gfn is in progress or finished since the snapshot → RETRY (spec §4
//!    item 9). Otherwise the MMU installs the leaf.
//!
//! RETRY is control flow, not an error: the vCPU simply re-executes the access.

use crate::addr::{Gfn, Gpa, Hva};
use crate::host::{FrameTag, GupError, StaleAccess};
use crate::mmu::{FastFault, FaultOutcome, InstalledLeaf, MapRequest, MmuRoot, RetryReason};
use crate::sync::atomic::Ordering;
use crate::vm::VmInner;
use crate::vm::dirty_log::mark_page_dirty;
use crate::vm::dirty_ring::DirtyRing;

/// Why a vCPU access could not complete: what KVM would report to its user as a `KVM_RUN` exit.
///
/// The fault handler's error type too (an unresolvable fault is such an exit); re-exported as
/// `kvmmu::VcpuExit`.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum VcpuExit {
    /// The host refused the page (`-EFAULT`): the memory is unmapped, or it is a write to memory the
    /// host mapped read-only.
    #[error("host fault at gpa {gpa} (hva {hva}): {error}")]
    HostFault {
        /// The faulting guest physical address.
        gpa: Gpa,
        /// The host address the memslot maps it to.
        hva: Hva,
        /// What the host said.
        error: GupError,
    },
    /// No memslot covers the address (KVM: an MMIO exit).
    #[error("no memslot covers gpa {gpa}")]
    NoMemslot {
        /// The address.
        gpa: Gpa,
    },
    /// A write to a read-only memslot (KVM: an MMIO exit).
    #[error("write to read-only memslot at gpa {gpa}")]
    ReadonlyMemslot {
        /// The address.
        gpa: Gpa,
    },
    /// Accesses are 8-byte words; the address was not 8-byte aligned.
    #[error("gpa {gpa} is not 8-byte aligned")]
    Unaligned {
        /// The address.
        gpa: Gpa,
    },
    /// The MMU handed the vCPU a translation to a frame that no longer backs that guest page. This is
    /// a kvmmu bug (DESIGN invariant 2); it is reported so that tests and torture runs catch it.
    #[error("stale translation used at gpa {gpa}: {source}")]
    StaleTranslation {
        /// The address.
        gpa: Gpa,
        /// What the frame check found.
        source: StaleAccess,
    },
    /// The vCPU's dirty ring reached its soft limit (`KVM_EXIT_DIRTY_RING_FULL`): the fault
    /// that filled it was handled, the access was not performed. Collect and reset the rings
    /// (`Vm::collect_dirty_rings`, `Vm::reset_dirty_rings`), then retry the access.
    #[error("the vCPU's dirty ring is full")]
    DirtyRingFull,
    /// The VM has been torn down.
    #[error("the VM has been torn down")]
    VmDead,
    /// A byte access whose range runs past the end of the 64-bit guest physical address space.
    /// Nothing was accessed.
    #[error("{len} bytes at gpa {gpa} run past the end of the address space")]
    AddressOverflow {
        /// The first byte.
        gpa: Gpa,
        /// The length asked for.
        len: usize,
    },
    /// An L2 access exited to L1 because of EPT12 (a violation: not mapped or not allowed; or a
    /// misconfiguration: a malformed entry L1 wrote). Guest behaviour, not a host error.
    #[error(transparent)]
    Ept(#[from] crate::mmu::shadow::nested::walk::EptExit),
    /// The calling thread already holds a vCPU in guest mode: a second vCPU cannot enter from it
    /// (its faults would take `mmu_lock`, which a flusher waiting for the first vCPU may hold).
    /// Nothing was done.
    #[error(transparent)]
    InGuestMode(#[from] crate::sync::guest_mode::InGuestMode),
}

/// The translation a fault installed, with the tag GUP read from its frame: what the faulting vCPU
/// caches in its TLB before it re-enters guest mode, instead of walking the new leaf again
/// (docs/locking.md F2). Its access then checks the frame against this tag, as an access through
/// a walked fill checks it against the tag read at the fill.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FaultFill {
    /// The leaf's translation of the faulting gfn.
    pub(crate) leaf: InstalledLeaf,
    /// The frame's tag when GUP resolved the host page; it names that host page.
    pub(crate) tag: FrameTag,
}

impl VmInner {
    /// The shadow MMU's fast page fault, tried by the faulting vCPU inside its walk, before it
    /// leaves guest mode (docs/locking.md "Dirty logging" D2, D3; "A/D-disabled aging" AD2): a
    /// write to a leaf write-protected for dirty logging, or any access to a leaf marked for
    /// access tracking, is fixed by one CAS with no lock; a write's page is marked right after
    /// the CAS, before the vCPU's write. Returns true if the access should be walked again
    /// (fixed, or already allowed), false to take the page fault. Counted as a fault and in
    /// `pf_fast`. A vCPU whose dirty ring is soft-full takes the fault (and its exit) instead.
    ///
    /// # Safety
    /// The caller is a vCPU in guest mode holding `root`, inside one instruction (shadow S2).
    pub(crate) unsafe fn fast_fault_in_guest(
        &self,
        root: &MmuRoot,
        gfn: Gfn,
        write: bool,
        ring: Option<&DirtyRing>,
    ) -> bool {
        if !root.fast_fault_in_guest()
            || (!write && !self.ad_disabled)
            || ring.is_some_and(DirtyRing::soft_full)
        {
            return false;
        }
        let srcu = self.srcu_read();
        let Some(cell) = self.memslots.get(root.as_id().index()) else {
            return false;
        };
        let slots = cell.load(&srcu);
        let Some(slot) = slots.find_by_gfn(gfn) else {
            return false;
        };
        let flags = slot.flags();
        if slot.is_invalid() || (write && flags.contains(crate::vm::memslot::MemFlags::READONLY)) {
            return false;
        }
        let logging = flags.contains(crate::vm::memslot::MemFlags::LOG_DIRTY_PAGES);
        if !((write && logging) || self.ad_disabled) {
            return false;
        }
        // SAFETY: this function's contract is the one the shadow fast path needs (S2).
        match unsafe { self.mmu.fast_page_fault_in_guest(root, gfn, write) } {
            FastFault::Fixed => {
                if write {
                    mark_page_dirty(slot, gfn, ring);
                }
                self.counters.faults_unfixed.add(1);
                self.counters.pf_fast.add(1);
                true
            }
            FastFault::Spurious => true,
            FastFault::Slow => false,
        }
    }

    /// Handles one fault on `gpa` for a vCPU whose current root is `root`; `fetch`: the access
    /// was an instruction fetch. On a `Fixed` outcome, `fill` receives the translation installed,
    /// if the vCPU may cache it without a walk (F2); it is left alone otherwise.
    pub(crate) fn page_fault(
        &self,
        root: &MmuRoot,
        gpa: Gpa,
        write: bool,
        fetch: bool,
        ring: Option<&DirtyRing>,
        fill: &mut Option<FaultFill>,
    ) -> Result<FaultOutcome, VcpuExit> {
        let _trace = tracing::trace_span!("page_fault", gfn = gpa.gfn().raw(), write).entered();
        let outcome = self.page_fault_inner(root, gpa.gfn(), gpa, write, fetch, ring, fill);
        // Every fault is counted once (DESIGN invariant 8): a `Fixed` outcome was counted by
        // the path that fixed it (`pf_fixed` on the slow path, `faults_unfixed` on the fast
        // path), every other outcome here.
        match outcome {
            Ok(FaultOutcome::Fixed) => {}
            Ok(FaultOutcome::Retry(_)) => {
                self.counters.faults_unfixed.add(1);
                self.counters.fault_retries.add(1);
            }
            _ => self.counters.faults_unfixed.add(1),
        }
        outcome
    }

    #[allow(clippy::too_many_arguments)]
    fn page_fault_inner(
        &self,
        root: &MmuRoot,
        gfn: Gfn,
        gpa: Gpa,
        write: bool,
        fetch: bool,
        ring: Option<&DirtyRing>,
        fill: &mut Option<FaultFill>,
    ) -> Result<FaultOutcome, VcpuExit> {
        let srcu = self.srcu_read();
        let Some(cell) = self.memslots.get(root.as_id().index()) else {
            return Err(VcpuExit::NoMemslot { gpa });
        };
        let slots = cell.load(&srcu);
        let Some(slot) = slots.find_by_gfn(gfn) else {
            return Err(VcpuExit::NoMemslot { gpa });
        };
        if slot.is_invalid() {
            return Ok(FaultOutcome::Retry(RetryReason::InvalidSlot));
        }
        let readonly_slot = slot
            .flags()
            .contains(crate::vm::memslot::MemFlags::READONLY);
        if write && readonly_slot {
            return Err(VcpuExit::ReadonlyMemslot { gpa });
        }
        let Some(hva) = slot.gfn_to_hva(gfn) else {
            return Err(VcpuExit::NoMemslot { gpa });
        };

        // The fast page fault (docs/locking.md "Dirty logging" D2, D3, "A/D-disabled aging"
        // AD2): a write to a leaf write-protected only for dirty logging, or any access to a leaf
        // marked for access tracking, is fixed by one CAS without `mmu_lock`; a write's page is
        // marked before the vCPU's write. Only a logging slot has write-protected leaves (logging
        // write-protects them; a slot whose logging was switched off has none left to be fixed
        // fast until its next write faults them writable), and only an A/D-disabled VM has
        // access-tracked ones, so other faults skip the extra walk, as the kernel's
        // `page_fault_can_be_fast` does.
        // Nested N2: a write-tracked gfn (an EPT12 table some indirect page shadows) is never
        // mapped writable, and no huge leaf covers it; the fast path could make it writable, so
        // its faults take the slow path.
        let logging = slot
            .flags()
            .contains(crate::vm::memslot::MemFlags::LOG_DIRTY_PAGES);
        let tracked = self.mmu.write_tracked_in(gfn.raw(), gfn.raw() + 1);
        if !tracked && ((write && logging) || self.ad_disabled) {
            match self.mmu.fast_page_fault(root, gfn, write) {
                FastFault::Fixed => {
                    if write {
                        mark_page_dirty(slot, gfn, ring);
                    }
                    self.counters.pf_fast.add(1);
                    // Counted here, not in `pf_fixed` (see `page_fault`).
                    self.counters.faults_unfixed.add(1);
                    return Ok(FaultOutcome::Fixed);
                }
                FastFault::Spurious => return Ok(FaultOutcome::Spurious),
                FastFault::Slow => {}
            }
        }

        let snap = self.invalidate.snapshot();
        if self.invalidate.retry_gfn_unsafe(snap, gfn) {
            return Ok(FaultOutcome::Retry(RetryReason::Invalidation));
        }
        let page = match self.host.get_user_page(hva, write) {
            Ok(p) => p,
            Err(error) => return Err(VcpuExit::HostFault { gpa, hva, error }),
        };
        if self.invalidate.retry_gfn_unsafe(snap, gfn) {
            return Ok(FaultOutcome::Retry(RetryReason::Invalidation));
        }

        // `kvm_mmu_max_mapping_level`: the host mapping level (read by GUP without any lock
        // KVM holds; a split after it invalidates the whole huge range, so the retry rule below
        // catches it) capped by the memslot's alignment and `disallow_lpage` counts.
        // A slot with dirty logging maps 4K pages only (`kvm_slot_dirty_track_enabled`).
        let mut level = if logging {
            crate::addr::Level::L4K
        } else {
            page.level.min(slot.max_mapping_level(gfn))
        };
        // Nested N2: no huge leaf covers a write-tracked gfn.
        while level > crate::addr::Level::L4K {
            let start = gfn.align_down(level).raw();
            if !self.mmu.write_tracked_in(start, start + level.pages()) {
                break;
            }
            level = level.down().unwrap_or(crate::addr::Level::L4K);
        }
        let covered = {
            let start = gfn.align_down(level).raw();
            (start, start + level.pages())
        };
        let tracked_then = self.mmu.write_tracked_in(covered.0, covered.1);
        // NX huge pages (`disallowed_hugepage_adjust`, `mmu/nx_huge.rs`): an instruction fetch
        // is served by a 4K leaf; the level it would have had is recorded once it is mapped.
        let nx_disallowed = (fetch && self.config.nx_huge_pages && level > crate::addr::Level::L4K)
            .then_some(level);
        if nx_disallowed.is_some() {
            level = crate::addr::Level::L4K;
        }
        let host_writable = page.writable && !readonly_slot && !tracked;
        let req = MapRequest {
            gfn,
            pfn: page.pfn,
            level,
            host_writable,
            write_fault: write,
            prefetch: false,
        };
        let host_page = hva.raw() >> crate::addr::PAGE_SHIFT;
        let mut leaf = None;
        let outcome = self.mmu.map_leaf(
            &self.mmu_lock,
            root,
            &req,
            Some(host_page),
            slot.rmaps(),
            self,
            &mut leaf,
            |mmu| {
                if self.dead.load(Ordering::Acquire) {
                    return Err(Err(VcpuExit::VmDead));
                }
                if self.invalidate.retry_gfn(snap, gfn, mmu) {
                    return Err(Ok(FaultOutcome::Retry(RetryReason::Invalidation)));
                }
                // Tracking changes only under `mmu_lock` write (N2): if it changed since the
                // level and permissions were chosen, choose again.
                if self.mmu.write_tracked_in(covered.0, covered.1) != tracked_then {
                    return Err(Ok(FaultOutcome::Retry(RetryReason::Invalidation)));
                }
                if write && host_writable {
                    // The leaf will be writable: mark it under `mmu_lock`, before it is
                    // installed, as `make_spte` does, so a harvest (which takes the bitmap under
                    // `mmu_lock` write) sees the mark and the leaf together (D3). A lost CAS
                    // leaves a false positive, which dirty logging allows.
                    mark_page_dirty(slot, gfn, ring);
                }
                Ok(())
            },
        );
        let outcome = match outcome {
            Ok(o) => o,
            Err(early) => return early,
        };
        drop(srcu);
        if outcome == FaultOutcome::Fixed {
            self.counters.pf_fixed.add(1);
            // F2: the vCPU may cache the installed leaf with the tag GUP read, if that tag names
            // the host page the memslot maps the gfn to (what a walk's fill checks, G3) and the
            // leaf maps the gfn to GUP's frame (always, P3; checked as it is free).
            if let Some(leaf) = leaf
                && leaf.pfn == page.pfn
                && !page.tag.is_free()
                && page.tag.host_page() == host_page
            {
                *fill = Some(FaultFill {
                    leaf,
                    tag: page.tag,
                });
            }
        }
        if let Some(max) = nx_disallowed
            && matches!(outcome, FaultOutcome::Fixed | FaultOutcome::Spurious)
        {
            self.mmu.account_nx_huge_page(root.as_id(), gfn, max);
        }
        match outcome {
            // Beyond what a root can map: no memslot can legitimately cover it either.
            FaultOutcome::OutOfRange => Err(VcpuExit::NoMemslot { gpa }),
            o => Ok(o),
        }
    }
}
