//! [`Mmu`]: the one place that chooses between the TDP MMU and the shadow MMU (`tdp_mmu_enabled`).

use crate::addr::{AsId, Gfn, GfnRange, Level};
use crate::config::MmuKind;
use crate::sync::Arc;
use crate::sync::atomic::{AtomicBool, Ordering};
use crate::sync::rcu::Rcu;
use crate::sync::witness::MmuWrite as MmuWriteWitness;
use crate::sync::witness::{MmuLock, MmuRead, MmuWrite, MmuWriteGuard};

use super::shadow::rmap::AgeAction;
use super::shadow::{RmapLookup, ShadowMmu, ShadowRoot, ShadowStats, SlotRmaps};
use super::spte::Spte;
use super::tdp::dirty::FastFault;
use super::tdp::{RootRef, TdpMmu, TdpStats};
mod nested;

use super::types::{
    FaultOutcome, HwWalk, MapRequest, RemoteTlbFlush, RetryReason, RootReload, ZapBatch,
};

/// A vCPU's reference to the root it translates through, for whichever MMU the VM uses (enum
/// dispatch: no `dyn` on the access path).
#[derive(Clone, Debug)]
pub enum MmuRoot {
    /// A TDP MMU root.
    Tdp(RootRef),
    /// A shadow MMU root.
    Shadow(ShadowRoot),
}

/// The translation of one gfn through a leaf a fault has just installed, as a hardware walk of
/// that leaf would report it ([`HwWalk::Hit`]) if it set no bit: what the faulting vCPU may cache
/// in its TLB without walking again (docs/locking.md F2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InstalledLeaf {
    /// The 4K frame of the gfn inside the leaf.
    pub pfn: crate::addr::Pfn,
    /// The leaf allows writes.
    pub writable: bool,
    /// Writes need not set Dirty (the leaf has it; or, A/D disabled, the leaf is writable).
    pub dirty: bool,
    /// The leaf allows instruction fetches.
    pub executable: bool,
}

impl InstalledLeaf {
    /// The translation of `gfn` through `spte` at `level`, if a read through it would hit without
    /// the walk writing the leaf: a present leaf with Accessed set (A/D enabled), or one not
    /// marked for access tracking (A/D disabled). This is exactly the no-write case of
    /// `access_leaf` (mmu/types.rs), so a fill from it equals what the walk would have filled.
    pub fn of(spte: Spte, level: Level, gfn: Gfn) -> Option<InstalledLeaf> {
        if !spte.is_present_leaf(level) {
            return None;
        }
        let dirty = if spte.ad_enabled() {
            if !spte.is_accessed() {
                return None;
            }
            spte.is_dirty()
        } else {
            if spte.is_access_tracked() {
                return None;
            }
            spte.is_writable()
        };
        Some(InstalledLeaf {
            pfn: super::hugepage::frame_in_leaf(gfn.raw(), spte.pfn(), level),
            writable: spte.is_writable(),
            dirty,
            executable: spte.raw() & super::spte::EXECUTABLE_MASK != 0,
        })
    }
}

impl MmuRoot {
    /// True if this root's fast page fault runs in the faulting vCPU's walk, in guest mode
    /// ([`Mmu::fast_page_fault_in_guest`], shadow roots), rather than in the fault handler
    /// ([`Mmu::fast_page_fault`], TDP roots).
    #[inline]
    pub fn fast_fault_in_guest(&self) -> bool {
        matches!(self, MmuRoot::Shadow(_))
    }

    /// The address space the root translates.
    pub fn as_id(&self) -> AsId {
        match self {
            MmuRoot::Tdp(r) => r.as_id(),
            MmuRoot::Shadow(r) => r.as_id(),
        }
    }
    /// True once the root was invalidated; the vCPU must load a new one.
    #[inline]
    pub fn is_invalid(&self) -> bool {
        match self {
            MmuRoot::Tdp(r) => r.is_invalid(),
            MmuRoot::Shadow(r) => r.is_invalid(),
        }
    }
}

#[path = "nx_huge.rs"]
mod nx_huge;

/// The MMU of one VM: the TDP MMU or the shadow MMU, chosen once at creation.
#[derive(Debug)]
pub struct Mmu {
    kind: MmuKind,
    tdp: TdpMmu,
    shadow: ShadowMmu,
    /// The splits the NX huge pages mitigation caused (`mmu/nx_huge.rs`).
    nx: nx_huge::NxSplits,
    /// Nested guests enabled: memslots get rmaps even with the TDP MMU (indirect pages need
    /// them). Set once, before any memslot exists.
    nested: AtomicBool,
}

impl Mmu {
    /// The MMU of a VM with `address_spaces` address spaces, protected by `lock` (every MMU entry
    /// point refuses a witness of another lock) and freeing TDP page tables through `rcu`.
    pub fn new(kind: MmuKind, address_spaces: usize, lock: &MmuLock, rcu: Arc<Rcu>) -> Mmu {
        let tdp = TdpMmu::new(address_spaces, rcu);
        tdp.bind_lock(lock);
        let shadow = ShadowMmu::new(address_spaces);
        shadow.bind_lock(lock);
        Mmu {
            kind,
            tdp,
            shadow,
            nx: Default::default(),
            nested: AtomicBool::new(false),
        }
    }

    /// This MMU, building its leaves in the `ad` format (`VmConfig::ad_bits`); call before the
    /// MMU is shared.
    pub fn with_ad_bits(self, ad: crate::mmu::spte::AdBits) -> Mmu {
        Mmu {
            kind: self.kind,
            tdp: self.tdp.with_ad_bits(ad),
            shadow: self.shadow.with_ad_bits(ad),
            nx: self.nx,
            nested: self.nested,
        }
    }

    /// The format of the leaves this MMU builds.
    pub fn ad_bits(&self) -> crate::mmu::spte::AdBits {
        self.tdp.ad_bits()
    }

    /// Enables nested guests (the caller checked that no memslot exists yet).
    pub fn enable_nested(&self) {
        // ORDERING: Relaxed: set before any memslot exists; memslot creation (under
        // `slots_lock`, published through SRCU) orders it with every later reader.
        self.nested.store(true, Ordering::Relaxed);
    }

    /// True if nested guests are enabled (always possible with the shadow MMU).
    pub fn nested_enabled(&self) -> bool {
        // ORDERING: see `enable_nested`.
        self.shadow_enabled() || self.nested.load(Ordering::Relaxed)
    }

    /// Which MMU this is.
    pub fn kind(&self) -> MmuKind {
        self.kind
    }

    /// The RCU domain TDP page tables are freed through.
    pub fn rcu(&self) -> &Arc<Rcu> {
        self.tdp.rcu()
    }

    /// True if the VM runs the shadow MMU (`!tdp_mmu_enabled`).
    #[inline]
    pub fn shadow_enabled(&self) -> bool {
        self.kind == MmuKind::Shadow
    }

    /// True if memslots need rmap arrays (`kvm_memslots_have_rmaps`).
    pub fn needs_rmaps(&self) -> bool {
        self.nested_enabled()
    }

    /// `kvm_mmu_load`: a reference to the valid root of `as_id`, allocating it if needed, under
    /// `mmu_lock` in the mode the MMU needs (read for TDP, write for shadow:
    /// `mmu_alloc_direct_roots`). `alive` is checked under the lock: `None` if it says the VM is
    /// being torn down, so no root is allocated after the final zap.
    pub fn load_root(
        &self,
        lock: &MmuLock,
        as_id: AsId,
        alive: impl FnOnce() -> bool,
    ) -> Option<MmuRoot> {
        if self.shadow_enabled() {
            let mmu = lock.write();
            if !alive() {
                return None;
            }
            Some(MmuRoot::Shadow(self.shadow.get_root(as_id, mmu.witness())))
        } else {
            let mmu = lock.read();
            Some(MmuRoot::Tdp(self.tdp.get_root(as_id, mmu.witness())))
        }
    }

    /// The simulated CPU's page walk for `gfn` through `root`, setting A (and D on a write), with
    /// no lock, no RCU and no SRCU. On a hit it also returns the host page the frame must back
    /// per the owner recorded at install, where one was (leaves installed by a fault, and split or
    /// recovered from such leaves, in both MMUs; `None` otherwise: the caller checks the memslots
    /// then; G3-G5 in docs/locking.md).
    ///
    /// # Safety
    /// The caller is a vCPU in guest mode that acknowledges remote TLB flushes only at instruction
    /// boundaries, and this walk is inside one instruction (shadow S2; TDP G1).
    #[inline]
    pub unsafe fn hardware_walk(
        &self,
        root: &MmuRoot,
        gfn: Gfn,
        write: bool,
    ) -> (HwWalk, Option<u64>) {
        match root {
            // SAFETY: this function's contract (G1).
            MmuRoot::Tdp(root) => unsafe { self.tdp.guest_walk(root, gfn, write) },
            // SAFETY: this function's contract (shadow S2).
            MmuRoot::Shadow(root) => unsafe { self.shadow.hardware_walk(root, gfn, write) },
        }
    }

    /// The `map` step of a fault (spec §3.4 step 4): takes `mmu_lock` in the mode this MMU needs
    /// (read for TDP, write for shadow), runs `precheck` under it (the caller's retry rule; an
    /// `Err` is returned as is and nothing is installed), retries if `root` was invalidated, and
    /// installs the leaf. `rmaps` are the memslot's rmap arrays (required by the shadow MMU).
    /// `host_page` is the host page (`hva >> 12`) that `req.pfn` backs, recorded beside the leaf
    /// as its owner (G3 in docs/locking.md for TDP, G5 for shadow; `None` records none).
    ///
    /// # Panics
    /// If the shadow MMU is given no rmaps (a VM-layer bug: shadow memslots always have them).
    // The owner (`host_page`) rides beside the request rather than in `MapRequest`, whose
    // literals in tests and benches stay unchanged; hence one argument over clippy's limit.
    #[allow(clippy::too_many_arguments)]
    pub fn map<E>(
        &self,
        lock: &MmuLock,
        root: &MmuRoot,
        req: &MapRequest,
        host_page: Option<u64>,
        rmaps: Option<&SlotRmaps>,
        flusher: &impl RemoteTlbFlush,
        precheck: impl FnOnce(&MmuRead) -> Result<(), E>,
    ) -> Result<FaultOutcome, E> {
        self.map_leaf(
            lock, root, req, host_page, rmaps, flusher, &mut None, precheck,
        )
    }

    /// [`Mmu::map`], also storing in `installed`, for a [`FaultOutcome::Fixed`] outcome on a TDP
    /// root, the translation of `req.gfn` through the leaf this call installed, if a walk of that
    /// leaf would hit without setting anything ([`InstalledLeaf::of`]). The faulting vCPU may
    /// cache it in its TLB instead of walking again (docs/locking.md F2). `installed` is left
    /// alone otherwise (the shadow MMU, any other outcome). (An out-parameter rather than a
    /// bigger return value: the fault path's `E` is large.)
    ///
    /// # Panics
    /// As [`Mmu::map`].
    #[allow(clippy::too_many_arguments)]
    #[inline]
    pub fn map_leaf<E>(
        &self,
        lock: &MmuLock,
        root: &MmuRoot,
        req: &MapRequest,
        host_page: Option<u64>,
        rmaps: Option<&SlotRmaps>,
        flusher: &impl RemoteTlbFlush,
        installed: &mut Option<InstalledLeaf>,
        precheck: impl FnOnce(&MmuRead) -> Result<(), E>,
    ) -> Result<FaultOutcome, E> {
        match root {
            MmuRoot::Tdp(root) => {
                let mmu = lock.read();
                precheck(mmu.witness())?;
                if root.is_invalid() {
                    return Ok(FaultOutcome::Retry(RetryReason::InvalidRoot));
                }
                // No RCU pin: `mmu_lock` read keeps every table the walk reaches linked (F1).
                let (outcome, leaf) = self
                    .tdp
                    .map_locked_leaf(root, req, host_page, mmu.witness());
                if let Some((spte, level)) = leaf {
                    *installed = InstalledLeaf::of(spte, level, req.gfn);
                }
                Ok(outcome)
            }
            MmuRoot::Shadow(root) => {
                let mmu = lock.write();
                precheck(mmu.read_witness())?;
                if root.is_invalid() {
                    return Ok(FaultOutcome::Retry(RetryReason::InvalidRoot));
                }
                let Some(rmaps) = rmaps else {
                    panic!(
                        "kvmmu bug: a shadow-MMU fault on gfn {:?} without rmaps",
                        req.gfn
                    );
                };
                Ok(self
                    .shadow
                    .map_owned(root, req, host_page, rmaps, mmu.witness(), flusher))
            }
        }
    }

    /// `kvm_unmap_gfn_range` over one memslot: zaps every leaf mapping `gfns` in address space
    /// `as_id` (through the slot's `rmaps` if it has them, then the TDP MMU). With `may_block` it
    /// may yield `mmu_lock` when another thread waits for it, flushing first. The returned batch
    /// must be committed before `mmu` is dropped.
    pub fn unmap_gfn_range(
        &self,
        as_id: AsId,
        rmaps: Option<&SlotRmaps>,
        gfns: GfnRange,
        mmu: &mut MmuWriteGuard<'_>,
        may_block: bool,
        flusher: &impl RemoteTlbFlush,
    ) -> ZapBatch {
        let mut flush = false;
        if let Some(rmaps) = rmaps {
            flush |= self
                .shadow
                .zap_gfn_range(rmaps, gfns, mmu, may_block, flusher);
        }
        flush |= self.tdp.zap_leafs(as_id, gfns, mmu, may_block, flusher);
        let mut batch = ZapBatch::empty();
        if flush {
            batch.flush_before_unlock();
        }
        batch
    }

    /// Makes `gfns` of one memslot map at most `target` (4K for dirty logging): the entry point
    /// for eager page splitting (`kvm_mmu_try_split_huge_pages`). The TDP MMU splits its huge
    /// leaves in place under `mmu_lock` read (one CAS each, no flush needed); the shadow MMU
    /// then drops its huge leaves under `mmu_lock` write and flushes remote TLBs before
    /// releasing it. Returns the number of huge leaves split or dropped.
    pub fn split_huge_pages(
        &self,
        lock: &MmuLock,
        as_id: AsId,
        rmaps: Option<&SlotRmaps>,
        gfns: GfnRange,
        target: Level,
        flusher: &impl RemoteTlbFlush,
    ) -> u64 {
        let mut n = {
            let mmu = lock.read();
            self.tdp
                .split_huge_pages(as_id, gfns, target, mmu.witness())
        };
        if let Some(rmaps) = rmaps {
            let mmu = lock.write();
            let dropped = self
                .shadow
                .drop_huge_leaves(rmaps, gfns, target, mmu.witness());
            if dropped != 0 {
                flusher.flush_remote_tlbs();
            }
            n += dropped;
        }
        n
    }

    /// Recovers huge mappings over `gfns` of one memslot (`kvm_mmu_recover_huge_pages`, e.g. when
    /// dirty logging is disabled) for the blocks `allowed(block_gfn, level)` names: the TDP MMU
    /// replaces each fully populated table in place by a huge leaf, and so does the shadow MMU
    /// with each fully populated shadow page. One remote TLB flush per root (TDP) or per call
    /// (shadow), under `mmu_lock` write. Returns the number of huge leaves formed.
    pub fn recover_huge_pages(
        &self,
        mmu: &MmuWriteGuard<'_>,
        as_id: AsId,
        rmaps: Option<&SlotRmaps>,
        gfns: GfnRange,
        allowed: &dyn Fn(u64, Level) -> bool,
        flusher: &impl RemoteTlbFlush,
    ) -> u64 {
        let mut n = self
            .tdp
            .recover_huge_pages(as_id, gfns, allowed, mmu.witness(), flusher);
        if let Some(rmaps) = rmaps {
            let (formed, batch) =
                self.shadow
                    .recover_huge_in_place(as_id, rmaps, gfns, allowed, mmu.witness());
            batch.commit(flusher);
            n += formed;
        }
        n
    }

    /// `may_have_shadow_sptes`: TDP off, or indirect shadow pages exist (spec §3.8).
    #[inline]
    fn may_have_shadow_sptes(&self) -> bool {
        self.shadow_enabled() || self.shadow.indirect_shadow_pages() != 0
    }

    /// `kvm_age_gfn` over one memslot: TDP first, then the shadow MMU if it may have SPTEs (spec
    /// §3.8). `locked` is the caller's `mmu_lock` write witness in locked aging mode, `None` in
    /// lockless mode. With `young`, each MMU also reports the gfns of every young leaf.
    ///
    /// Aging pins RCU for the TDP MMU only: in locked mode it nests inside `mmu_lock` (DESIGN lock
    /// order), in lockless mode it keeps the page tables alive. The rmap walk holds no RCU guard
    /// (the rmap bit ranks before RCU); SRCU (the caller's) keeps the rmap arrays alive.
    #[inline]
    pub fn age_gfn_range(
        &self,
        as_id: AsId,
        rmaps: Option<&SlotRmaps>,
        gfns: GfnRange,
        locked: Option<&MmuWrite>,
        mut young: Option<&mut dyn FnMut(GfnRange)>,
    ) -> bool {
        let mut any = false;
        if !self.shadow_enabled() {
            let rcu = self.tdp.rcu().pin();
            any = match young.as_deref_mut() {
                None => self.tdp.age_gfn_range(as_id, gfns, &rcu),
                Some(report) => self.tdp.age_gfn_range_report(as_id, gfns, &rcu, report),
            };
        }
        if self.may_have_shadow_sptes()
            && let Some(rmaps) = rmaps
        {
            self.shadow.note_rmap_age_walk();
            any |= match young {
                None => self
                    .shadow
                    .age_gfn_range(rmaps, gfns, AgeAction::Clear, locked),
                Some(report) => self
                    .shadow
                    .age_gfn_range_report(rmaps, gfns, locked, report),
            };
        }
        any
    }

    /// `kvm_test_age_gfn` over one memslot: TDP first; the shadow MMU is asked only if TDP found
    /// nothing young and it may have SPTEs (spec §3.8). Changes nothing.
    pub fn test_age_gfn_range(
        &self,
        as_id: AsId,
        rmaps: Option<&SlotRmaps>,
        gfns: GfnRange,
        locked: Option<&MmuWrite>,
    ) -> bool {
        if !self.shadow_enabled() {
            let rcu = self.tdp.rcu().pin();
            if self.tdp.test_age_gfn_range(as_id, gfns, &rcu) {
                return true;
            }
        }
        self.may_have_shadow_sptes()
            && rmaps.is_some_and(|r| {
                self.shadow.note_rmap_age_walk();
                self.shadow
                    .age_gfn_range(r, gfns, AgeAction::TestOnly, locked)
            })
    }

    /// `kvm_mmu_zap_all_fast` (a reset: CR0.WP toggle, memslot flags): every root is invalidated
    /// and every vCPU reloads. `sets` finds the rmap of a shadow leaf (the memslots, read under
    /// SRCU after `mmu_lock` was taken).
    pub(crate) fn reset(
        &self,
        mmu: &mut MmuWriteGuard<'_>,
        sets: &(impl RmapLookup + ?Sized),
        vcpus: &(impl RemoteTlbFlush + RootReload),
    ) {
        if self.shadow_enabled() || self.shadow.indirect_shadow_pages() != 0 {
            // Commit-zap: flush, then free the zapped pages (shadow S1). With the TDP MMU these
            // are the indirect pages of nested guests; the TDP roots follow.
            self.shadow.zap_all(sets, mmu.witness()).commit(vcpus);
            vcpus.request_root_reload();
            if self.shadow_enabled() {
                return;
            }
        }
        self.tdp.invalidate_all_roots(mmu.witness());
        // A waiting request (the kernel's KVM_REQ_MMU_FREE_OBSOLETE_ROOTS has KVM_REQUEST_WAIT):
        // zaps of invalid roots do not flush TLBs, which is only sound once no vCPU can still be
        // using a translation of the old root. Without the wait, a vCPU between its request check
        // and its access could use a TLB entry whose frame a concurrent invalidation then frees.
        vcpus.request_root_reload();
        vcpus.flush_remote_tlbs();
        self.tdp.zap_invalidated_roots(mmu, vcpus);
    }

    /// Zaps every SPTE and releases every root of both MMUs (VM teardown). The caller has already
    /// made every vCPU drop its root and TLB; it commits the returned batch (flush, then free the
    /// shadow pages) before dropping `mmu`. TDP tables are retired through RCU after the TDP
    /// MMU's own flush (P6).
    pub(crate) fn zap_all(
        &self,
        mmu: &mut MmuWriteGuard<'_>,
        sets: &(impl RmapLookup + ?Sized),
        flusher: &impl RemoteTlbFlush,
    ) -> ZapBatch {
        let batch = self.shadow.zap_all(sets, mmu.witness());
        self.tdp.teardown(mmu, flusher);
        batch
    }

    /// The leaf SPTE that maps `gfn` in the valid root of `as_id`, with its level (an oracle for
    /// tests and tools). Lock-free with the TDP MMU (RCU); with the shadow MMU it takes `lock` for
    /// read, since shadow pages are freed under `mmu_lock` write rather than RCU.
    pub fn leaf(&self, lock: &MmuLock, as_id: AsId, gfn: Gfn) -> Option<(Spte, Level)> {
        if self.shadow_enabled() {
            let mmu = lock.read();
            self.shadow.leaf(as_id, gfn, mmu.witness())
        } else {
            let rcu = self.tdp.rcu().pin();
            self.tdp.leaf(as_id, gfn, &rcu)
        }
    }

    /// Present leaves per level over both MMUs (KVM's `pages_4k`, `pages_2m`, `pages_1g`).
    pub fn page_stats(&self) -> crate::mmu::PageStats {
        self.tdp.page_stats().plus(self.shadow.page_stats())
    }

    /// Dirty logging's re-arm (`kvm_arch_mmu_enable_log_dirty_pt_masked` with write-protection):
    /// clears W, keeping MMU-writable, on every leaf of `as_id` mapping a gfn of `range` for which
    /// `wanted` holds, in the TDP MMU and (through the slot's `rmaps`) the shadow MMU. Returns
    /// true if remote TLBs must be flushed before the caller's user relies on it (D1).
    pub fn write_protect_gfns(
        &self,
        as_id: AsId,
        rmaps: Option<&SlotRmaps>,
        range: GfnRange,
        mut wanted: impl FnMut(Gfn) -> bool,
        mmu: &MmuWriteWitness,
    ) -> bool {
        let mut flush = false;
        if let Some(rmaps) = rmaps {
            let gfns = (range.start().raw()..range.end().raw())
                .map(Gfn::new)
                .filter(|&g| wanted(g));
            flush |= self.shadow.write_protect_gfns(rmaps, gfns, mmu);
        }
        if !self.shadow_enabled() {
            let rcu = self.tdp.rcu().pin();
            flush |= self
                .tdp
                .write_protect_range(as_id, range, wanted, mmu, &rcu);
        }
        flush
    }

    /// The D-bit re-arm (`kvm_mmu_clear_dirty_pt_masked`, the PML flavour): clears D on every
    /// leaf of `as_id` mapping a gfn of `range` that passes `wanted`, in both MMUs, calling `dirty`
    /// for each gfn whose D it cleared. Returns true if remote TLBs must be flushed (a TLB entry
    /// that cached D lets the CPU write without setting it again).
    pub fn clear_dirty_gfns(
        &self,
        as_id: AsId,
        rmaps: Option<&SlotRmaps>,
        range: GfnRange,
        mut wanted: impl FnMut(Gfn) -> bool,
        dirty: &mut dyn FnMut(Gfn),
        mmu: &MmuWriteWitness,
    ) -> bool {
        let mut flush = false;
        if let Some(rmaps) = rmaps {
            let gfns = (range.start().raw()..range.end().raw())
                .map(Gfn::new)
                .filter(|&g| wanted(g));
            flush |= self.shadow.clear_dirty_gfns(rmaps, gfns, &mut *dirty, mmu);
        }
        if !self.shadow_enabled() {
            let rcu = self.tdp.rcu().pin();
            flush |= self
                .tdp
                .clear_dirty_range(as_id, range, wanted, dirty, mmu, &rcu);
        }
        flush
    }

    /// The fast page fault for an access (a write if `write`) to `gfn` through `root`
    /// (`fast_page_fault`): a leaf write-protected for dirty logging is made writable, a leaf
    /// marked for access tracking is restored, each by one CAS without `mmu_lock`. TDP roots only
    /// (direct pages); shadow roots answer [`FastFault::Slow`] here: their fast path runs in the
    /// vCPU's walk ([`Mmu::fast_page_fault_in_guest`]).
    #[inline]
    pub fn fast_page_fault(&self, root: &MmuRoot, gfn: Gfn, write: bool) -> FastFault {
        match root {
            MmuRoot::Tdp(root) => {
                let rcu = self.tdp.rcu().pin();
                self.tdp.fast_page_fault_access(root, gfn, write, &rcu)
            }
            MmuRoot::Shadow(_) => FastFault::Slow,
        }
    }

    /// The shadow MMU's fast page fault, run by the faulting vCPU inside its own walk, in guest
    /// mode (`ShadowMmu::fast_page_fault_in_guest`); TDP roots answer [`FastFault::Slow`] (their
    /// fast path runs in [`Mmu::fast_page_fault`], under RCU).
    ///
    /// # Safety
    /// As [`Mmu::hardware_walk`]: the caller is a vCPU in guest mode, inside one instruction (S2).
    #[inline]
    pub unsafe fn fast_page_fault_in_guest(
        &self,
        root: &MmuRoot,
        gfn: Gfn,
        write: bool,
    ) -> FastFault {
        match root {
            MmuRoot::Tdp(_) => FastFault::Slow,
            // SAFETY: this function's contract (S2).
            MmuRoot::Shadow(root) => unsafe {
                self.shadow.fast_page_fault_in_guest(root, gfn, write)
            },
        }
    }

    /// The TDP MMU's statistics.
    pub fn tdp_stats(&self) -> TdpStats {
        self.tdp.stats()
    }

    /// The shadow MMU's statistics.
    pub fn shadow_stats(&self) -> ShadowStats {
        self.shadow.stats()
    }
}
