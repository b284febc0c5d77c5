//! EPT02: indirect shadow pages for an L2 guest (`FNAME(fetch)`, `kvm_mmu_get_shadow_page` with
//! `role.direct = 0`). Each page shadows one EPT12 table and is keyed by that table's L1 gfn;
//! links record their parent SPTE in the child's `parent_ptes`; leaves are 4K, map L2 gfn → the
//! host frame of the L1 gfn the walk found, and sit in the rmap of that L1 gfn, so an L1 page
//! mapped by several L2 addresses has an rmap chain longer than one. See the module doc (N1–N4).

use crate::addr::{AsId, Gfn, Level};
use crate::geometry::{ROOT_LEVEL, index};
use crate::mmu::spte::{LeafAttrs, Spte, SpteKind, make_spte};
use crate::mmu::types::{
    FaultOutcome, HwWalk, MapRequest, RemoteTlbFlush, RetryReason, access_leaf,
};
use crate::sync::Arc;
use crate::sync::atomic::Ordering;
use crate::sync::witness::MmuWrite;

use super::super::fault::upgrade_leaf;
use super::super::mmu::{RmapLookup, ShadowMmu, ShadowRoot, add};
use super::super::page::{Role, SpPtr};
use super::super::rmap::{RMAP_RECYCLE_THRESHOLD, SptePtr};
use super::super::slot_rmaps::SlotRmaps;
use super::super::zap::InvalidList;
use super::walk::GuestWalk;
use crate::mmu::types::ZapBatch;

/// The address space EPT02 pages live in (L1 runs in address space 0).
const L1_AS: AsId = AsId::new(0);

impl ShadowMmu {
    /// A reference to the indirect root shadowing the EPT12 root at L1 gfn `eptp_gfn`, allocating
    /// it if needed (count 2: the caller's and the MMU's, S3). The flag says the gfn became
    /// write-tracked by this call, so the caller must write-protect L1's mappings of it (N2).
    pub(crate) fn get_nested_root(&self, eptp_gfn: u64, mmu: &MmuWrite) -> (ShadowRoot, bool) {
        self.check_lock(mmu.lock_id());
        let role = Role {
            level: ROOT_LEVEL,
            as_id: L1_AS,
            direct: false,
        };
        let mut state = self.inner.state.lock();
        let (sp, new) = match state.hash.get(&(eptp_gfn, role)) {
            Some(&sp) => {
                // SAFETY: in the hash, so valid and holding the MMU's reference; `mmu_lock` write.
                let page = unsafe { sp.get() };
                // ORDERING: the MMU's reference keeps the count above 0 (as `Arc::clone`).
                page.root_count.fetch_add(1, Ordering::Relaxed);
                (sp, false)
            }
            None => {
                let was = self.write_tracked_in(eptp_gfn, eptp_gfn + 1);
                let sp = self.alloc_page(&mut state, eptp_gfn, role, 2);
                add(&self.inner.counters.roots_allocated, 1);
                (sp, !was)
            }
        };
        (
            ShadowRoot {
                inner: Arc::clone(&self.inner),
                sp,
            },
            new,
        )
    }

    /// Links the indirect pages for `l2_gfn` below `root` along `walk` (levels 3..1), creating
    /// the missing ones. A link to a page shadowing another table than the walk's (L1 changed
    /// the entry and the write was not seen yet: impossible with write tracking, but cheap to
    /// keep honest) is zapped and replaced. Returns the L1 gfns that became write-tracked and a
    /// batch to commit before `mmu_lock` is dropped.
    pub(crate) fn nested_link(
        &self,
        root: &ShadowRoot,
        l2_gfn: u64,
        walk: &GuestWalk,
        sets: &(impl RmapLookup + ?Sized),
        mmu: &MmuWrite,
    ) -> (Vec<u64>, ZapBatch) {
        self.check_lock(mmu.lock_id());
        add(&self.inner.counters.nested_faults, 1);
        let stats = &self.inner.rmap_stats;
        let mut state = self.inner.state.lock();
        let mut invalid = InvalidList::default();
        let mut flush = false;
        let mut newly = Vec::new();
        let mut sp = root.sp;
        loop {
            // SAFETY: the referenced root or a page linked from it, under `mmu_lock` write (S1).
            let page = unsafe { sp.get() };
            // A fault through the page: the shadowed table is in use, not being rewritten (KVM
            // clears `write_flooding_count` in `FNAME(fetch)`).
            // ORDERING: Relaxed: changed only under `mmu_lock` write.
            page.write_flooding_count.store(0, Ordering::Relaxed);
            let level = page.role.level;
            let Some(child_level) = level.down() else {
                break;
            };
            let want = walk.tables[usize::from(child_level.get() - 1)];
            let i = index(l2_gfn, level);
            let sptep = page.at(i);
            // ORDERING: non-leaf SPTEs change only under `mmu_lock` write, which we hold.
            let old = sptep.load(Ordering::Relaxed);
            if old.kind(level) == SpteKind::Table {
                let child = SpPtr::from_spte(old);
                // SAFETY: linked from a present SPTE under `mmu_lock` write (S1).
                if unsafe { child.get() }.gfn == want {
                    sp = child;
                    continue;
                }
            }
            if old.kind(level) != SpteKind::NonPresent {
                flush |= self.zap_spte(&mut state, sp, i, sets, mmu, &mut invalid);
            }
            let role = Role {
                level: child_level,
                as_id: page.role.as_id,
                direct: false,
            };
            let child = match state.hash.get(&(want, role)) {
                Some(&c) => c,
                None => {
                    if !self.write_tracked_in(want, want + 1) {
                        newly.push(want);
                    }
                    self.alloc_page(&mut state, want, role, 0)
                }
            };
            // ORDERING: Release publishes the child's SPTEs to a vCPU's Acquire walk (spte.rs O2).
            sptep.store(child.to_spte(), Ordering::Release);
            // SAFETY: `page` is live under `mmu_lock` write; the link leaves the parent list
            // before `page` is freed (prepare-zap unlinks children first, S1).
            let pte = unsafe { SptePtr::from_spte(sptep) };
            // SAFETY: `child` is live: just allocated or found in the hash (S1).
            let _ = unsafe { child.get() }
                .parent_ptes
                .pte_list_add(mmu, stats, pte);
            sp = child;
        }
        drop(state);
        let mut batch = self.commit_zap(invalid);
        if flush {
            batch.flush_before_unlock();
        }
        (newly, batch)
    }

    /// Installs (or upgrades) the 4K leaf for `l2_gfn` in the indirect page `nested_link` linked:
    /// `req.gfn` is the L1 gfn, `req.pfn` its host frame; W only if EPT12 and the host allow it.
    /// The leaf joins the rmap of the L1 gfn in `rmaps` (the L1 memslot's arrays). Retries if the
    /// path is not (or no longer) the walk's.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn nested_set_leaf(
        &self,
        root: &ShadowRoot,
        l2_gfn: u64,
        walk: &GuestWalk,
        req: &MapRequest,
        rmaps: &SlotRmaps,
        sets: &(impl RmapLookup + ?Sized),
        mmu: &MmuWrite,
        flush: &impl RemoteTlbFlush,
    ) -> FaultOutcome {
        self.check_lock(mmu.lock_id());
        if root.is_invalid() {
            return FaultOutcome::Retry(RetryReason::InvalidRoot);
        }
        let stats = &self.inner.rmap_stats;
        let mut sp = root.sp;
        loop {
            // SAFETY: as in `nested_link`.
            let page = unsafe { sp.get() };
            let level = page.role.level;
            if level == Level::L4K {
                break;
            }
            // ORDERING: as in `nested_link`.
            let old = page.at(index(l2_gfn, level)).load(Ordering::Relaxed);
            if old.kind(level) != SpteKind::Table {
                return FaultOutcome::Retry(RetryReason::CasLost);
            }
            sp = SpPtr::from_spte(old);
            let want = walk.tables[usize::from(level.get() - 2)];
            // SAFETY: linked from a present SPTE under `mmu_lock` write (S1).
            if unsafe { sp.get() }.gfn != want {
                return FaultOutcome::Retry(RetryReason::CasLost);
            }
        }
        // SAFETY: as above.
        let page = unsafe { sp.get() };
        let i = index(l2_gfn, Level::L4K);
        let sptep = page.at(i);
        let attrs = LeafAttrs {
            host_writable: req.host_writable,
            write_allowed: walk.perms.write(),
            prefetch: false,
        };
        let new = make_spte(req.pfn, Level::L4K, attrs);
        let Some(rmap) = rmaps.get(req.gfn, Level::L4K) else {
            panic!(
                "kvmmu bug: nested map of L1 gfn {:?} with rmaps not covering it",
                req.gfn
            );
        };
        // ORDERING: under `mmu_lock` write only the CPU changes a leaf (A/D), handled below.
        let old = sptep.load(Ordering::Relaxed);
        if old.kind(Level::L4K) == SpteKind::Leaf {
            if old.pfn() == req.pfn && page.leaf_gfn(i) == req.gfn {
                return upgrade_leaf(sptep, old, new, req.write_fault);
            }
            // Another L1 page than the walk's: drop the old leaf first (spec §4 item 13).
            let old_gfn = page.leaf_gfn(i);
            // ORDERING: atomic swap keeps a concurrent Dirty (item 19).
            let _ = sptep.swap(Spte::NONPRESENT, Ordering::Relaxed);
            self.leaf_zapped(old, Level::L4K);
            let Some(r) = sets.leaf_rmap(L1_AS, old_gfn, Level::L4K) else {
                panic!("kvmmu bug: a nested leaf for L1 gfn {old_gfn:?} has no memslot rmap (S6)");
            };
            // SAFETY: the page is live under `mmu_lock` write; the pointer the fault added.
            let pte = unsafe { sp.leaf_sptep(i) };
            if let Err(e) = r.pte_list_remove(mmu, stats, pte) {
                panic!("kvmmu bug: nested leaf not in its rmap: {e} (S6)");
            }
            flush.flush_remote_tlbs();
        }
        page.set_leaf_gfn(i, req.gfn);
        // ORDERING: Release, so a vCPU that Acquire-loads the leaf sees the recorded L1 gfn and
        // what GUP saw of the frame (N1).
        sptep.store(new, Ordering::Release);
        add(&self.inner.counters.leaves_installed, 1);
        self.inner.pages.install(Level::L4K);
        // SAFETY: the page is live; the entry leaves the rmap before the page is freed (S1).
        let pte = unsafe { sp.leaf_sptep(i) };
        let before = rmap.rmap_add(mmu, stats, pte);
        if before > RMAP_RECYCLE_THRESHOLD {
            self.zap_rmap(rmap, Level::L4K, mmu);
            add(&self.inner.counters.rmap_recycles, 1);
            flush.flush_remote_tlbs();
        }
        FaultOutcome::Fixed
    }

    /// The simulated CPU's walk of an EPT02 root for L2 gfn `l2_gfn` (as [`ShadowMmu`]'s direct
    /// walk), returning also the L1 gfn the leaf maps, which the vCPU validates the frame against.
    ///
    /// # Safety
    /// As `hardware_walk`: a vCPU in guest mode, inside one instruction (S2).
    pub(crate) unsafe fn hardware_walk_l2(
        &self,
        root: &ShadowRoot,
        l2_gfn: Gfn,
        write: bool,
    ) -> (HwWalk, Gfn) {
        let g = l2_gfn.raw();
        let mut sp = root.sp;
        loop {
            // SAFETY: the function's contract (S2): the root is referenced, children were read
            // from present links and are freed only after a flush this vCPU has not acknowledged.
            let page = unsafe { sp.get() };
            let level = page.role.level;
            let i = index(g, level);
            let sptep = page.at(i);
            // ORDERING: O1: the value may be followed into a child page; on a leaf it orders the
            // read of the recorded L1 gfn after the leaf's publication (N1).
            let spte = sptep.load(Ordering::Acquire);
            match spte.kind(level) {
                SpteKind::Table => sp = SpPtr::from_spte(spte),
                SpteKind::Leaf => {
                    let l1 = page.leaf_gfn(i);
                    return (access_leaf(sptep, spte, level, g, write), l1);
                }
                SpteKind::NonPresent | SpteKind::Frozen => return (HwWalk::NotPresent, l2_gfn),
            }
        }
    }
}
