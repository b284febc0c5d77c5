//! The nested-guest half of [`Mmu`](super::Mmu) (`mmu/shadow/nested/`): loading EPT02 roots, the
//! map step of L2 faults, write tracking of L1's guest tables and the L2 hardware walk. Split from
//! `dispatch.rs` to keep files small; like it, the only place that knows both MMUs.

use crate::addr::{AsId, Gfn, GfnRange, Level};
use crate::sync::witness::MmuWrite as MmuWriteWitness;
use crate::sync::witness::{MmuLock, MmuRead, MmuWriteGuard};

use super::{Mmu, MmuRoot};
use crate::mmu::shadow::{RmapLookup, SlotRmaps};
use crate::mmu::types::{FaultOutcome, HwWalk, MapRequest, RemoteTlbFlush, RetryReason, ZapBatch};

impl Mmu {
    /// `kvm_mmu_load` in L2 mode: a reference to the indirect root shadowing the EPT12 root at
    /// L1 gfn `eptp_gfn`, under `mmu_lock` write. A root that makes the gfn write-tracked first
    /// zaps L1's own mappings of it (nested N2). `None` if `alive` says the VM is being torn down.
    pub(crate) fn load_nested_root(
        &self,
        lock: &MmuLock,
        eptp_gfn: u64,
        sets: &(impl RmapLookup + ?Sized),
        flusher: &impl RemoteTlbFlush,
        alive: impl FnOnce() -> bool,
    ) -> Option<MmuRoot> {
        let mut mmu = lock.write();
        if !alive() {
            return None;
        }
        let (root, new) = self.shadow.get_nested_root(eptp_gfn, mmu.witness());
        if new && self.zap_l1_mappings(&[eptp_gfn], sets, &mut mmu, flusher) {
            flusher.flush_remote_tlbs();
        }
        Some(MmuRoot::Shadow(root))
    }

    /// Zaps L1's own mappings of each L1 gfn in `gfns` (address space 0) in both MMUs, huge
    /// leaves over them included, so that they fault back read-only and 4K (nested N2). True if
    /// the caller must flush before relying on it.
    fn zap_l1_mappings(
        &self,
        gfns: &[u64],
        sets: &(impl RmapLookup + ?Sized),
        mmu: &mut MmuWriteGuard<'_>,
        flusher: &impl RemoteTlbFlush,
    ) -> bool {
        if cfg!(feature = "broken-no-write-protect-guest-tables") {
            return false;
        }
        let as_id = AsId::new(0);
        let mut flush = false;
        for &g in gfns {
            let gfn = Gfn::new(g);
            for level in crate::mmu::shadow::RMAP_LEVELS {
                if let Some(r) = sets.leaf_rmap(as_id, gfn.align_down(level), level)
                    && !r.is_empty()
                {
                    flush |= self.shadow.zap_rmap_pub(r, level, mmu.witness());
                }
            }
            if !self.shadow_enabled()
                && let Some(range) = GfnRange::new(gfn, Gfn::new(g + 1))
            {
                flush |= self.tdp.zap_leafs(as_id, range, mmu, false, flusher);
            }
        }
        flush
    }

    /// The `map` step of an L2 fault (nested protocol step 2, `shadow/nested/mod.rs`): under
    /// `mmu_lock` write, `precheck` (the caller's retry rule), link the walk's indirect pages,
    /// write-protect newly tracked tables and flush, `recheck` the walk's entries in L1 memory
    /// (false: RETRY), then install the leaf. `rmaps` are the L1 memslot's of `req.gfn` (the L1
    /// gfn).
    ///
    /// # Panics
    /// If `root` is not a shadow root or `rmaps` is `None` (VM-layer bugs).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn map_nested<E>(
        &self,
        lock: &MmuLock,
        root: &MmuRoot,
        l2_gfn: u64,
        walk: &crate::mmu::shadow::nested::walk::GuestWalk,
        req: &MapRequest,
        rmaps: Option<&SlotRmaps>,
        sets: &(impl RmapLookup + ?Sized),
        flusher: &impl RemoteTlbFlush,
        precheck: impl FnOnce(&MmuRead) -> Result<(), E>,
        recheck: impl FnOnce() -> bool,
    ) -> Result<FaultOutcome, E> {
        let MmuRoot::Shadow(root) = root else {
            panic!("kvmmu bug: an L2 fault through a TDP root");
        };
        let Some(rmaps) = rmaps else {
            panic!(
                "kvmmu bug: an L2 fault on L1 gfn {:?} without rmaps",
                req.gfn
            );
        };
        let mut mmu = lock.write();
        precheck(mmu.read_witness())?;
        if root.is_invalid() {
            return Ok(FaultOutcome::Retry(RetryReason::InvalidRoot));
        }
        let (newly, batch) = self
            .shadow
            .nested_link(root, l2_gfn, walk, sets, mmu.witness());
        batch.commit(flusher);
        if self.zap_l1_mappings(&newly, sets, &mut mmu, flusher) {
            flusher.flush_remote_tlbs();
        }
        if !recheck() {
            return Ok(FaultOutcome::Retry(RetryReason::CasLost));
        }
        let g = req.gfn.raw();
        let mut req = *req;
        // A table page mapped into L2 is mapped read-only: L2's writes to it must be seen too.
        req.host_writable &= !self.shadow.write_tracked_in(g, g + 1);
        Ok(self.shadow.nested_set_leaf(
            root,
            l2_gfn,
            walk,
            &req,
            rmaps,
            sets,
            mmu.witness(),
            flusher,
        ))
    }

    /// True if an L1 gfn of `[start, end)` is write-tracked (shadowed by an indirect page).
    /// Exact under `mmu_lock`; a hint otherwise.
    #[inline]
    pub fn write_tracked_in(&self, start: u64, end: u64) -> bool {
        if cfg!(feature = "broken-no-write-protect-guest-tables") {
            return false;
        }
        // Most VMs track nothing: answer from the count, inlined here, so that the fault path's
        // three checks cost a load each instead of three calls (the count is read the same way
        // inside `write_tracked_in`, so the answer is the same).
        self.shadow.write_tracked_gfns() != 0 && self.shadow.write_tracked_in(start, end)
    }

    /// `kvm_mmu_track_write` for L1's emulated write of word `word` of L1 page `gfn`, under
    /// `mmu_lock` write; the batch is committed before the lock drops.
    pub(crate) fn track_write(
        &self,
        gfn: u64,
        word: usize,
        sets: &(impl RmapLookup + ?Sized),
        mmu: &MmuWriteWitness,
    ) -> ZapBatch {
        self.shadow.track_write(gfn, word, sets, mmu)
    }

    /// A memslot of address space `as_id` covering `gfns` is being deleted or moved: zap the
    /// indirect pages shadowing guest tables in it (nested N3: EPT02 must not outlive the EPT12
    /// it was derived from). Vcpus whose EPT02 root goes reload it.
    pub(crate) fn zap_nested_tables_in(
        &self,
        as_id: AsId,
        gfns: GfnRange,
        sets: &(impl RmapLookup + ?Sized),
        mmu: &MmuWriteWitness,
    ) -> ZapBatch {
        if as_id.index() != 0 || self.shadow.indirect_shadow_pages() == 0 {
            return ZapBatch::empty();
        }
        self.shadow
            .zap_indirect_in(gfns.start().raw(), gfns.end().raw(), sets, mmu)
    }

    /// The simulated CPU's walk of an EPT02 root for an L2 gfn; also returns the L1 gfn the leaf
    /// maps (the vCPU checks the frame against it).
    ///
    /// # Safety
    /// As [`Mmu::hardware_walk`].
    #[inline]
    pub unsafe fn hardware_walk_l2(
        &self,
        root: &MmuRoot,
        l2_gfn: Gfn,
        write: bool,
    ) -> (HwWalk, Gfn) {
        match root {
            // SAFETY: this function's contract (shadow S2).
            MmuRoot::Shadow(root) => unsafe { self.shadow.hardware_walk_l2(root, l2_gfn, write) },
            MmuRoot::Tdp(_) => (HwWalk::NotPresent, l2_gfn),
        }
    }

    /// The length of the 4K rmap chain of `gfn` in `rmaps` (diagnostics), under `mmu_lock` write.
    pub fn rmap_chain_len(&self, lock: &MmuLock, rmaps: &SlotRmaps, gfn: Gfn) -> usize {
        let Some(r) = rmaps.get(gfn, Level::L4K) else {
            return 0;
        };
        let mmu = lock.write();
        r.count(mmu.witness(), self.shadow.rmap_stats())
    }
}
