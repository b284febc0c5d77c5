//! [`ShadowMmu`]: shadow pages, roots, the fault path's map step, zaps and aging through rmaps.
//! The protocol (S1–S7) is in the parent module's documentation.

use core::fmt;
use std::collections::HashMap;

use crate::addr::{AsId, Gfn, GfnRange, Level};
use crate::mmu::spte::{
    ACCESSED_MASK, DIRTY_MASK, LeafAttrs, SHADOW_NONPRESENT_VALUE, Spte, SpteKind, make_spte,
};
use crate::mmu::tdp::table::{ENTRIES, GFN_LIMIT, ROOT_LEVEL};
use crate::mmu::tdp::{FaultOutcome, HwWalk, MapRequest, RemoteTlbFlush, RetryReason};
use crate::sync::atomic::{AtomicU64, Ordering, fence};
use crate::sync::witness::{MmuLock, MmuRead, MmuWrite, MmuWriteGuard};
use crate::sync::{Arc, Mutex};
use crate::vm::memslot::Memslots;

use super::page::{Role, ShadowPage, SpPtr};
use super::rmap::{AgeAction, RMAP_RECYCLE_THRESHOLD, RmapHead, RmapStats, RmapStatsSnapshot};
use super::slot_rmaps::{RMAP_LEVELS, SlotRmaps};

/// Counters of the shadow MMU (read-only statistics).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct ShadowStats {
    /// Faults that reached the shadow MMU's map step (under `mmu_lock` write).
    pub faults: u64,
    /// Shadow pages allocated (roots included).
    pub pages_allocated: u64,
    /// Shadow pages freed (roots included).
    pub pages_freed: u64,
    /// Roots allocated.
    pub roots_allocated: u64,
    /// Roots freed.
    pub roots_freed: u64,
    /// Leaves installed by faults.
    pub leaves_installed: u64,
    /// Present leaves zapped (through rmaps or by zapping their page).
    pub leaves_zapped: u64,
    /// Zapped leaves whose Dirty bit was set.
    pub dirty_leaves_zapped: u64,
    /// Rmaps zapped because they grew past [`RMAP_RECYCLE_THRESHOLD`].
    pub rmap_recycles: u64,
    /// SPTEs read by lockless rmap aging.
    pub aged_sptes_lockless: u64,
    /// SPTEs read by rmap aging under `mmu_lock` write.
    pub aged_sptes_locked: u64,
    /// Accessed bits cleared by rmap aging.
    pub accessed_cleared: u64,
    /// `indirect_shadow_pages` (always 0: only direct pages are built).
    pub indirect_shadow_pages: u64,
    /// Rmap descriptor and bit-lock counters.
    pub rmap: RmapStatsSnapshot,
}

#[derive(Default)]
struct Counters {
    faults: AtomicU64,
    pages_allocated: AtomicU64,
    pages_freed: AtomicU64,
    roots_allocated: AtomicU64,
    roots_freed: AtomicU64,
    leaves_installed: AtomicU64,
    leaves_zapped: AtomicU64,
    dirty_leaves_zapped: AtomicU64,
    rmap_recycles: AtomicU64,
    aged_sptes_lockless: AtomicU64,
    aged_sptes_locked: AtomicU64,
    accessed_cleared: AtomicU64,
}

#[inline]
fn add(c: &AtomicU64, n: u64) {
    if n != 0 {
        // ORDERING: statistics only; no other memory is published through a counter.
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// State changed only under `mmu_lock` write (S5). The mutex is therefore never contended; it
/// exists so that the type system, not a comment, keeps the state exclusive.
struct State {
    /// `mmu_page_hash`: every live, valid shadow page by (gfn, role); roots included.
    hash: HashMap<(u64, Role), SpPtr>,
    /// The valid root of each address space.
    roots: Vec<Option<SpPtr>>,
}

struct Inner {
    state: Mutex<State>,
    counters: Counters,
    rmap_stats: RmapStats,
    /// `kvm->arch.indirect_shadow_pages`: written under `mmu_lock` write, read locklessly.
    indirect_shadow_pages: AtomicU64,
}

impl Inner {
    /// Drops one reference to a root; the last one frees it (`mmu_free_root_page`).
    fn put_root(&self, sp: SpPtr) {
        // SAFETY: the caller held a reference until this call (S3).
        let page = unsafe { sp.get() };
        // ORDERING: Release so this holder's uses of the root happen before the free; the last
        // holder's Acquire fence pairs with every other holder's Release (the `Arc` argument).
        if page.root_count.fetch_sub(1, Ordering::Release) != 1 {
            return;
        }
        fence(Ordering::Acquire);
        assert!(
            page.is_invalid(),
            "kvmmu bug: a shadow root's count reached 0 while valid (S3)"
        );
        // SAFETY: S3: the MMU's own reference is dropped only by prepare-zap, after which the root
        // is empty, off the hash and root table, and only reference holders could use it; we held
        // the last reference and no longer use it.
        unsafe { sp.free() };
        add(&self.counters.roots_freed, 1);
        add(&self.counters.pages_freed, 1);
    }
}

/// A counted reference to a shadow root (`root_count`): `Clone` takes one, `Drop` puts it.
pub struct ShadowRoot {
    inner: Arc<Inner>,
    sp: SpPtr,
}

impl ShadowRoot {
    #[inline]
    fn page(&self) -> &ShadowPage {
        // SAFETY: we hold a reference, so the root is allocated (S3).
        unsafe { self.sp.get() }
    }
    /// The address space this root translates.
    pub fn as_id(&self) -> AsId {
        self.page().role.as_id
    }
    /// True once the root was zapped; the holder should load a new root.
    #[inline]
    pub fn is_invalid(&self) -> bool {
        self.page().is_invalid()
    }
    fn belongs_to(&self, mmu: &ShadowMmu) -> bool {
        Arc::ptr_eq(&self.inner, &mmu.inner)
    }
}

impl Clone for ShadowRoot {
    fn clone(&self) -> ShadowRoot {
        // ORDERING: taking a reference while holding one needs no ordering (`Arc::clone`).
        self.page().root_count.fetch_add(1, Ordering::Relaxed);
        ShadowRoot {
            inner: Arc::clone(&self.inner),
            sp: self.sp,
        }
    }
}

impl Drop for ShadowRoot {
    fn drop(&mut self) {
        self.inner.put_root(self.sp);
    }
}

impl fmt::Debug for ShadowRoot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShadowRoot")
            .field("as_id", &self.as_id())
            .field("invalid", &self.is_invalid())
            .finish()
    }
}

/// The shadow MMU of one VM (`tdp_mmu=N`), with direct shadow pages.
pub struct ShadowMmu {
    inner: Arc<Inner>,
}

impl fmt::Debug for ShadowMmu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShadowMmu")
            .field("stats", &self.stats())
            .finish()
    }
}

/// Finds the rmap of a leaf SPTE: (address space, gfn, level) → the head in the memslot that
/// currently covers the gfn (`gfn_to_rmap(gfn, level, __gfn_to_memslot(...))`).
pub(crate) trait RmapLookup {
    /// The rmap of (`gfn`, `level`) in address space `as_id`, if a memslot with rmaps covers it.
    fn leaf_rmap(&self, as_id: AsId, gfn: Gfn, level: Level) -> Option<&RmapHead>;
}

/// The current memslot sets, one per address space (read under SRCU by the caller).
impl RmapLookup for [&Memslots] {
    fn leaf_rmap(&self, as_id: AsId, gfn: Gfn, level: Level) -> Option<&RmapHead> {
        self.get(as_id.index())?
            .find_by_gfn(gfn)?
            .rmaps()?
            .get(gfn, level)
    }
}

/// Pages queued by prepare-zap, freed by commit-zap after a remote TLB flush (S1).
#[derive(Default)]
struct InvalidList(Vec<SpPtr>);

impl ShadowMmu {
    /// A shadow MMU for `address_spaces` address spaces.
    pub fn new(address_spaces: usize) -> ShadowMmu {
        ShadowMmu {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    hash: HashMap::new(),
                    roots: vec![None; address_spaces],
                }),
                counters: Counters::default(),
                rmap_stats: RmapStats::new(),
                indirect_shadow_pages: AtomicU64::new(0),
            }),
        }
    }

    /// The rmap counters shared by every rmap of the VM.
    pub fn rmap_stats(&self) -> &RmapStats {
        &self.inner.rmap_stats
    }

    /// `kvm->arch.indirect_shadow_pages`, read without a lock (`READ_ONCE`).
    pub fn indirect_shadow_pages(&self) -> u64 {
        // ORDERING: a hint for aging dispatch (spec §3.8); writers hold `mmu_lock` write.
        self.inner.indirect_shadow_pages.load(Ordering::Relaxed)
    }

    /// Statistics.
    pub fn stats(&self) -> ShadowStats {
        let c = &self.inner.counters;
        // ORDERING: statistics only; a snapshot need not be consistent across counters.
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ShadowStats {
            faults: r(&c.faults),
            pages_allocated: r(&c.pages_allocated),
            pages_freed: r(&c.pages_freed),
            roots_allocated: r(&c.roots_allocated),
            roots_freed: r(&c.roots_freed),
            leaves_installed: r(&c.leaves_installed),
            leaves_zapped: r(&c.leaves_zapped),
            dirty_leaves_zapped: r(&c.dirty_leaves_zapped),
            rmap_recycles: r(&c.rmap_recycles),
            aged_sptes_lockless: r(&c.aged_sptes_lockless),
            aged_sptes_locked: r(&c.aged_sptes_locked),
            accessed_cleared: r(&c.accessed_cleared),
            indirect_shadow_pages: self.indirect_shadow_pages(),
            rmap: self.inner.rmap_stats.snapshot(),
        }
    }

    /// Allocates a page and enters it in the hash (`kvm_mmu_alloc_shadow_page`). Caller holds
    /// `mmu_lock` write (the `state` guard stands for it).
    fn alloc_page(&self, state: &mut State, gfn: u64, role: Role, root_count: usize) -> SpPtr {
        let sp = SpPtr::alloc(gfn, role, root_count);
        state.hash.insert((gfn, role), sp);
        add(&self.inner.counters.pages_allocated, 1);
        if !role.direct {
            // ORDERING: written under `mmu_lock` write; read as a hint (spec §3.8).
            self.inner
                .indirect_shadow_pages
                .fetch_add(1, Ordering::Relaxed);
        }
        sp
    }

    /// A reference to the valid root of `as_id`, allocating it if needed
    /// (`mmu_alloc_direct_roots`, under `mmu_lock` write). A new root starts with count 2: the
    /// caller's and the MMU's own (S3).
    ///
    /// # Panics
    /// If `as_id` is beyond the address spaces given to [`ShadowMmu::new`] (a VM-layer bug).
    pub fn get_root(&self, as_id: AsId, _mmu: &MmuWrite) -> ShadowRoot {
        let mut state = self.inner.state.lock();
        let nr = state.roots.len();
        let slot = state.roots.get(as_id.index()).copied().unwrap_or_else(|| {
            panic!("as_id {as_id:?} beyond the ShadowMmu's {nr} address spaces")
        });
        let sp = match slot {
            Some(sp) => {
                // SAFETY: a valid root holds the MMU's reference and we hold `mmu_lock` write (S3).
                let page = unsafe { sp.get() };
                // ORDERING: the MMU's reference keeps the count above 0 (as `Arc::clone`).
                page.root_count.fetch_add(1, Ordering::Relaxed);
                sp
            }
            None => {
                let role = Role {
                    level: ROOT_LEVEL,
                    as_id,
                    direct: true,
                };
                let sp = self.alloc_page(&mut state, 0, role, 2);
                add(&self.inner.counters.roots_allocated, 1);
                state.roots[as_id.index()] = Some(sp);
                sp
            }
        };
        ShadowRoot {
            inner: Arc::clone(&self.inner),
            sp,
        }
    }

    /// Resolves one fault by installing a 4K leaf for `req.gfn` → `req.pfn` under `root`
    /// (`direct_map` / `kvm_mmu_get_child_sp` / `mmu_set_spte`), linking missing shadow pages
    /// and adding the leaf to its rmap in `rmaps` (the memslot's arrays). Rmaps past
    /// [`RMAP_RECYCLE_THRESHOLD`] are zapped and flushed (`__rmap_add`).
    ///
    /// # Panics
    /// If the gfn is mapped to another pfn (spec §4 item 13: the notifier must zap first), if
    /// `root` belongs to another MMU, or if a huge leaf is met (this MMU installs 4K leaves only).
    pub fn map(
        &self,
        root: &ShadowRoot,
        req: &MapRequest,
        rmaps: &SlotRmaps,
        mmu: &MmuWrite,
        flush: &impl RemoteTlbFlush,
    ) -> FaultOutcome {
        assert!(
            root.belongs_to(self),
            "map: the root belongs to another ShadowMmu"
        );
        add(&self.inner.counters.faults, 1);
        if root.is_invalid() {
            return FaultOutcome::Retry(RetryReason::InvalidRoot);
        }
        let gfn = req.gfn.raw();
        if gfn >= GFN_LIMIT {
            return FaultOutcome::OutOfRange;
        }
        let Some(rmap) = rmaps.get(req.gfn, Level::L4K) else {
            panic!("kvmmu bug: map of gfn {gfn:#x} with the rmaps of a memslot not covering it");
        };
        let stats = &self.inner.rmap_stats;
        let mut state = self.inner.state.lock();
        let mut sp = root.sp;
        loop {
            // SAFETY: `sp` is the root we hold a reference to, or a page linked from a present
            // non-leaf SPTE; we hold `mmu_lock` write, so no page is freed meanwhile (S1).
            let page = unsafe { sp.get() };
            let level = page.role.level;
            let sptep = page.entry(gfn);
            // ORDERING: non-leaf SPTEs change only under `mmu_lock` write, which we hold.
            let old = sptep.load(Ordering::Relaxed);
            let Some(child_level) = level.down() else {
                return self.set_leaf(sp, req, old, rmap, mmu, flush);
            };
            sp = match old.kind(level) {
                SpteKind::Table => SpPtr::from_spte(old),
                SpteKind::NonPresent => {
                    let role = Role {
                        level: child_level,
                        as_id: page.role.as_id,
                        direct: true,
                    };
                    let base = gfn & !(level.pages() - 1);
                    let child = match state.hash.get(&(base, role)) {
                        Some(&c) => c,
                        None => self.alloc_page(&mut state, base, role, 0),
                    };
                    // ORDERING: Release publishes the child's initialised SPTEs to a vCPU's
                    // Acquire walk (spte.rs O2).
                    sptep.store(child.to_spte(), Ordering::Release);
                    // SAFETY: `page` is live under `mmu_lock` write; its entry leaves the parent
                    // list before `page` is freed (S1, prepare-zap unlinks children first).
                    let pte = unsafe { super::rmap::SptePtr::from_spte(sptep) };
                    // SAFETY: `child` is live: just allocated or found in the hash (S1).
                    let _ = unsafe { child.get() }
                        .parent_ptes
                        .pte_list_add(mmu, stats, pte);
                    child
                }
                SpteKind::Leaf | SpteKind::Frozen => panic!(
                    "kvmmu bug: {old:?} at level {level:?} for gfn {gfn:#x}: the shadow MMU \
                     installs 4K leaves only and never freezes (S2)"
                ),
            };
        }
    }

    /// The last step of [`ShadowMmu::map`]: install or upgrade the leaf in `sp`.
    fn set_leaf(
        &self,
        sp: SpPtr,
        req: &MapRequest,
        old: Spte,
        rmap: &RmapHead,
        mmu: &MmuWrite,
        flush: &impl RemoteTlbFlush,
    ) -> FaultOutcome {
        let gfn = req.gfn.raw();
        // SAFETY: `mmu_lock` write keeps the page allocated (S1).
        let page = unsafe { sp.get() };
        let sptep = page.entry(gfn);
        let attrs = LeafAttrs {
            host_writable: req.host_writable,
            write_allowed: req.write_fault,
            prefetch: req.prefetch,
        };
        let new = make_spte(req.pfn, Level::L4K, attrs);
        match old.kind(Level::L4K) {
            SpteKind::Leaf => {
                assert_eq!(
                    old.pfn(),
                    req.pfn,
                    "gfn {gfn:#x} is mapped to another pfn: a present leaf may not change pfn \
                     (spec §4 item 13)"
                );
                if !req.write_fault || old.is_writable() || !new.is_writable() {
                    return FaultOutcome::Spurious;
                }
                // Upgrade to writable, keeping A/D the CPU may be setting concurrently (O5).
                let mut cur = old;
                loop {
                    let want =
                        Spte::from_raw(new.raw() | (cur.raw() & (ACCESSED_MASK | DIRTY_MASK)));
                    // ORDERING: Release as for a new leaf; on failure re-read (only A/D change).
                    match sptep.compare_exchange(cur, want, Ordering::Release, Ordering::Relaxed) {
                        Ok(_) => return FaultOutcome::Fixed,
                        Err(actual) => cur = actual,
                    }
                }
            }
            SpteKind::NonPresent => {
                // ORDERING: Release, so a vCPU that Acquire-loads the leaf sees what we saw before
                // installing it (the host's initialisation of the frame, via GUP).
                sptep.store(new, Ordering::Release);
                add(&self.inner.counters.leaves_installed, 1);
                // SAFETY: the page is live; the entry leaves the rmap before the page is freed (S1).
                let pte = unsafe { sp.sptep(super::super::tdp::table::index(gfn, Level::L4K)) };
                let before = rmap.pte_list_add(mmu, &self.inner.rmap_stats, pte);
                if before > RMAP_RECYCLE_THRESHOLD {
                    self.zap_rmap(rmap, mmu);
                    add(&self.inner.counters.rmap_recycles, 1);
                    flush.flush_remote_tlbs();
                }
                FaultOutcome::Fixed
            }
            SpteKind::Table | SpteKind::Frozen => {
                unreachable!("a 4K shadow SPTE is a leaf or non-present (S2)")
            }
        }
    }

    /// Zaps every SPTE of one rmap (`kvm_zap_rmap`); true if any was zapped.
    fn zap_rmap(&self, rmap: &RmapHead, mmu: &MmuWrite) -> bool {
        let c = &self.inner.counters;
        rmap.zap_all(mmu, &self.inner.rmap_stats, |p| {
            let old = Spte::from_raw(p.zap(SHADOW_NONPRESENT_VALUE));
            if old.is_shadow_present() {
                add(&c.leaves_zapped, 1);
                if old.is_dirty() {
                    add(&c.dirty_leaves_zapped, 1);
                }
            }
        })
    }

    /// Zaps every leaf of `gfns` through the slot's rmaps (`__kvm_rmap_zap_gfn_range`, levels
    /// 4K..1G). Returns true if the caller must flush remote TLBs before dropping `mmu_lock`.
    ///
    /// With `may_block` (the lock `mmu` guards), it yields `mmu_lock` when another thread waits for it
    /// (`__walk_slot_rmaps`), flushing first if it zapped anything since the last flush, so no
    /// stale translation survives a yield (spec §3.6, §3.10). Callers must tolerate the yield:
    /// the range is covered by an invalidation in progress or belongs to an INVALID memslot, so
    /// no fault installs into it meanwhile.
    pub fn zap_gfn_range(
        &self,
        rmaps: &SlotRmaps,
        gfns: GfnRange,
        mmu: &mut MmuWriteGuard<'_>,
        may_block: Option<&MmuLock>,
        flusher: &impl RemoteTlbFlush,
    ) -> bool {
        /// Rmaps visited between two checks for a waiter.
        const RESCHED_EVERY: u32 = 64;
        let mut flush = false;
        let mut since_check = 0u32;
        for level in RMAP_LEVELS {
            let mut g = gfns.start().align_down(level).raw();
            while g < gfns.end().raw() {
                if let Some(r) = rmaps.get(Gfn::new(g), level)
                    && !r.is_empty()
                {
                    flush |= self.zap_rmap(r, mmu.witness());
                }
                g += level.pages();
                since_check += 1;
                if let Some(lock) = may_block
                    && since_check >= RESCHED_EVERY
                {
                    since_check = 0;
                    if lock.is_contended() {
                        if flush {
                            flusher.flush_remote_tlbs();
                            flush = false;
                        }
                        mmu.cond_resched();
                    }
                }
            }
        }
        flush
    }

    /// Prepare-zap (`kvm_mmu_prepare_zap_page`): zaps `sp`'s leaves (removing them from their
    /// rmaps), unlinks and recursively prepare-zaps its children, unlinks it from its parents,
    /// marks it invalid and takes it off the hash. Non-root pages (and a root whose last
    /// reference was the MMU's) are queued on `invalid` for [`ShadowMmu::commit_zap`].
    fn prepare_zap(
        &self,
        state: &mut State,
        sp: SpPtr,
        sets: &(impl RmapLookup + ?Sized),
        mmu: &MmuWrite,
        invalid: &mut InvalidList,
    ) {
        let stats = &self.inner.rmap_stats;
        let c = &self.inner.counters;
        // SAFETY: `mmu_lock` write; `sp` is live (S1).
        let page = unsafe { sp.get() };
        if page.is_invalid() {
            return;
        }
        let level = page.role.level;
        for i in 0..ENTRIES {
            let sptep = page.at(i);
            // ORDERING: under `mmu_lock` write, non-leaf SPTEs are ours; a leaf is swapped below.
            let cur = sptep.load(Ordering::Relaxed);
            match cur.kind(level) {
                SpteKind::NonPresent => {}
                SpteKind::Leaf => {
                    // Clear first, then remove from the rmap (spec §3.9: lockless readers may see
                    // present → non-present, never the reverse).
                    // ORDERING: atomic swap keeps a concurrent Dirty set by the CPU (item 19).
                    let old = sptep.swap(Spte::NONPRESENT, Ordering::Relaxed);
                    add(&c.leaves_zapped, 1);
                    if old.is_dirty() {
                        add(&c.dirty_leaves_zapped, 1);
                    }
                    let gfn = page.gfn_of(i);
                    let Some(rmap) = sets.leaf_rmap(page.role.as_id, gfn, level) else {
                        panic!("kvmmu bug: a shadow leaf for gfn {gfn:?} has no memslot rmap (S6)");
                    };
                    // SAFETY: the page is live; this is the pointer the fault added (S1).
                    let pte = unsafe { sp.sptep(i) };
                    if let Err(e) = rmap.pte_list_remove(mmu, stats, pte) {
                        panic!("kvmmu bug: shadow leaf not in its rmap: {e} (S6)");
                    }
                }
                SpteKind::Table => {
                    let child = SpPtr::from_spte(cur);
                    // ORDERING: vCPUs that still walk through the old link are covered by the
                    // flush in commit-zap (S2); nothing is published.
                    sptep.store(Spte::NONPRESENT, Ordering::Relaxed);
                    // SAFETY: linked from a present SPTE under `mmu_lock` write: live (S1).
                    let cpage = unsafe { child.get() };
                    // SAFETY: `page` is live; this is the pointer the link added.
                    let pte = unsafe { sp.sptep(i) };
                    if let Err(e) = cpage.parent_ptes.pte_list_remove(mmu, stats, pte) {
                        panic!("kvmmu bug: parent SPTE not in its child's parent list: {e} (S2)");
                    }
                    if cpage.parent_ptes.is_empty() {
                        self.prepare_zap(state, child, sets, mmu, invalid);
                    }
                }
                SpteKind::Frozen => unreachable!("the shadow MMU never freezes SPTEs (S2)"),
            }
        }
        // Unlink from the parents (`kvm_mmu_unlink_parents`): clear every SPTE pointing here.
        let _ = page.parent_ptes.zap_all(mmu, stats, |p| {
            let _ = p.zap(SHADOW_NONPRESENT_VALUE);
        });
        // ORDERING: see `ShadowPage::is_invalid`; the Release decrement below publishes it to the
        // last root-reference holder.
        page.invalid.store(true, Ordering::Relaxed);
        state.hash.remove(&(page.gfn, page.role));
        if !page.role.direct {
            // ORDERING: as in `alloc_page`.
            self.inner
                .indirect_shadow_pages
                .fetch_sub(1, Ordering::Relaxed);
        }
        if page.role.level == ROOT_LEVEL {
            let as_idx = page.role.as_id.index();
            if state.roots.get(as_idx).copied().flatten() == Some(sp) {
                state.roots[as_idx] = None;
            }
            // Drop the MMU's own reference last: after it, a vCPU may free the root (S3).
            // ORDERING: as in `Inner::put_root`.
            if page.root_count.fetch_sub(1, Ordering::Release) == 1 {
                fence(Ordering::Acquire);
                invalid.0.push(sp);
            }
        } else {
            invalid.0.push(sp);
        }
    }

    /// Commit-zap (`kvm_mmu_commit_zap_page`): flush remote TLBs, then free the queued pages (S1).
    fn commit_zap(&self, invalid: InvalidList, flush: &impl RemoteTlbFlush) {
        if invalid.0.is_empty() {
            return;
        }
        flush.flush_remote_tlbs();
        let c = &self.inner.counters;
        for sp in invalid.0 {
            // SAFETY: `mmu_lock` write is still held by our caller: the page is live until now.
            let is_root = unsafe { sp.get() }.role.level == ROOT_LEVEL;
            // SAFETY: prepare-zap emptied the page, removed its SPTEs from every rmap and unlinked
            // it from its parents, the hash and the root table; the flush above waited for every
            // vCPU in guest mode to pass an instruction boundary, so no walker is inside it (S1).
            unsafe { sp.free() };
            add(&c.pages_freed, 1);
            if is_root {
                add(&c.roots_freed, 1);
            }
        }
    }

    /// Zaps every shadow page (`kvm_mmu_zap_all`): roots are invalidated (vCPUs reload), every
    /// leaf leaves its rmap, and the pages are freed after one remote TLB flush. `sets` are the
    /// current memslot sets, one per address space, read under SRCU.
    pub(crate) fn zap_all(
        &self,
        sets: &(impl RmapLookup + ?Sized),
        mmu: &MmuWrite,
        flush: &impl RemoteTlbFlush,
    ) {
        let mut invalid = InvalidList::default();
        {
            let mut state = self.inner.state.lock();
            let roots: Vec<SpPtr> = state.roots.iter().flatten().copied().collect();
            for sp in roots {
                self.prepare_zap(&mut state, sp, sets, mmu, &mut invalid);
            }
            // Pages not reachable from a valid root (none are expected with direct pages).
            let rest: Vec<SpPtr> = state.hash.values().copied().collect();
            for sp in rest {
                self.prepare_zap(&mut state, sp, sets, mmu, &mut invalid);
            }
        }
        self.commit_zap(invalid, flush);
    }

    /// Ages the rmaps of `gfns` in one slot (`kvm_rmap_age_gfn_range`): per level 4K..1G, per
    /// rmap, lock read-only, clear (or test) Accessed. `start` is rounded down to each level's
    /// alignment so no huge-page rmap is skipped (spec §3.8 analysis). `locked` says the caller
    /// holds `mmu_lock` write (the pre-series baseline); it only selects the statistics counter.
    pub fn age_gfn_range(
        &self,
        rmaps: &SlotRmaps,
        gfns: GfnRange,
        action: AgeAction,
        locked: bool,
    ) -> bool {
        self.age_rmaps(rmaps, gfns, action, locked, |_| {})
    }

    /// [`ShadowMmu::age_gfn_range`] with [`AgeAction::Clear`], also calling `young` with the gfns
    /// (clipped to `gfns`) of every rmap found with a young SPTE, once per rmap; the result is true
    /// iff `young` was called.
    #[inline]
    pub fn age_gfn_range_report(
        &self,
        rmaps: &SlotRmaps,
        gfns: GfnRange,
        locked: bool,
        young: impl FnMut(GfnRange),
    ) -> bool {
        self.age_rmaps(rmaps, gfns, AgeAction::Clear, locked, young)
    }

    /// The rmap walk of [`ShadowMmu::age_gfn_range`]; `report` gets each young rmap's gfns.
    #[inline]
    fn age_rmaps(
        &self,
        rmaps: &SlotRmaps,
        gfns: GfnRange,
        action: AgeAction,
        locked: bool,
        mut report: impl FnMut(GfnRange),
    ) -> bool {
        let stats = &self.inner.rmap_stats;
        let mut young = false;
        let mut visited = 0;
        let mut cleared = 0;
        'levels: for level in RMAP_LEVELS {
            let mut g = gfns.start().align_down(level).raw();
            while g < gfns.end().raw() {
                if let Some(r) = rmaps.get(Gfn::new(g), level)
                    && r.age_rmap_counted(stats, action, &mut visited, &mut cleared)
                {
                    young = true;
                    if action == AgeAction::TestOnly {
                        break 'levels;
                    }
                    // The rmap covers the level-aligned block at `g`; only its part in `gfns`
                    // was asked about.
                    let block = GfnRange::from_len(Gfn::new(g), level.pages());
                    if let Some(r) = block.and_then(|b| b.intersect(&gfns)) {
                        report(r);
                    }
                }
                g += level.pages();
            }
        }
        let c = &self.inner.counters;
        add(
            if locked {
                &c.aged_sptes_locked
            } else {
                &c.aged_sptes_lockless
            },
            visited,
        );
        add(&c.accessed_cleared, cleared);
        young
    }

    /// Walks from `root` to the leaf slot of `gfn`, or `None` at the first non-present entry.
    ///
    /// # Safety
    /// The caller holds a reference to `root` and either holds `mmu_lock` or is a vCPU in guest
    /// mode that stays before its next instruction boundary for `'a` (S2).
    unsafe fn find_leaf<'a>(
        root: SpPtr,
        gfn: u64,
    ) -> Option<(&'a crate::mmu::spte::AtomicSpte, Spte)> {
        if gfn >= GFN_LIMIT {
            return None;
        }
        let mut sp = root;
        loop {
            // SAFETY: the root is referenced; a child was read from a present non-leaf SPTE and
            // is freed only after a flush that this caller has not acknowledged yet, or under
            // `mmu_lock` write, which excludes this caller (S1, S2).
            let page = unsafe { sp.get::<'a>() };
            let sptep = page.entry(gfn);
            // ORDERING: O1: the value may be followed into a child page.
            let spte = sptep.load(Ordering::Acquire);
            match spte.kind(page.role.level) {
                SpteKind::Leaf => return Some((sptep, spte)),
                SpteKind::Table => sp = SpPtr::from_spte(spte),
                SpteKind::NonPresent | SpteKind::Frozen => return None,
            }
        }
    }

    /// The simulated CPU's walk of a shadow root: like [`crate::mmu::tdp::TdpMmu::hardware_walk`],
    /// it sets A (and D on a write) with a compare-and-swap on a present leaf that allows the access.
    ///
    /// # Safety
    /// The caller is a vCPU in guest mode that acknowledges remote TLB flushes only at instruction
    /// boundaries, and this walk is inside one instruction (S2).
    pub(crate) unsafe fn hardware_walk(&self, root: &ShadowRoot, gfn: Gfn, write: bool) -> HwWalk {
        debug_assert!(root.belongs_to(self), "hardware_walk: foreign root");
        // SAFETY: we hold a reference to `root`; this function's contract covers its children.
        let Some((sptep, spte)) = (unsafe { Self::find_leaf(root.sp, gfn.raw()) }) else {
            return HwWalk::NotPresent;
        };
        crate::mmu::tdp::access_leaf(sptep, spte, Level::L4K, write)
    }

    /// The present leaf mapping `gfn` under the valid root of `as_id` (oracle for tests and
    /// tools). Needs `mmu_lock` (read suffices: every change to shadow pages takes it for write).
    pub fn leaf(&self, as_id: AsId, gfn: Gfn, _mmu: &MmuRead) -> Option<(Spte, Level)> {
        let root = self
            .inner
            .state
            .lock()
            .roots
            .get(as_id.index())
            .copied()
            .flatten()?;
        // SAFETY: under `mmu_lock` no page is freed and a valid root holds the MMU's reference.
        let (_, spte) = unsafe { Self::find_leaf(root, gfn.raw()) }?;
        Some((spte, Level::L4K))
    }

    /// Live shadow pages in the hash (valid pages; diagnostics and tests).
    pub fn live_pages(&self, _mmu: &MmuRead) -> usize {
        self.inner.state.lock().hash.len()
    }
}

impl Drop for ShadowMmu {
    fn drop(&mut self) {
        // The VM zaps everything at teardown (which needs the memslots for the rmaps); a page left
        // here would leak its rmap entries, so say so loudly in debug builds.
        let state = self.inner.state.lock();
        if !std::thread::panicking() {
            debug_assert!(
                state.hash.is_empty(),
                "kvmmu bug: ShadowMmu dropped with {} live pages (teardown must zap_all)",
                state.hash.len()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::Pfn;
    use core::cell::Cell;

    const GFNS: u64 = 2048;

    /// One slot's rmaps covering gfns `[0, GFNS)` of address space 0.
    struct OneSlot(SlotRmaps);

    impl RmapLookup for OneSlot {
        fn leaf_rmap(&self, as_id: AsId, gfn: Gfn, level: Level) -> Option<&RmapHead> {
            (as_id.index() == 0)
                .then(|| self.0.get(gfn, level))
                .flatten()
        }
    }

    /// A flush that checks spec §4 item 33 at the moment it runs: every leaf already left its
    /// rmap, and no page was freed before the flush.
    struct CheckingFlush<'a> {
        mmu: &'a ShadowMmu,
        slot: &'a OneSlot,
        freed_before: u64,
        flushes: Cell<u32>,
    }

    impl RemoteTlbFlush for CheckingFlush<'_> {
        fn flush_remote_tlbs(&self) {
            self.flushes.set(self.flushes.get() + 1);
            assert_eq!(
                self.mmu.stats().pages_freed,
                self.freed_before,
                "a shadow page was freed before the remote TLB flush (item 33)"
            );
            for g in 0..GFNS {
                let r = self.slot.0.get(Gfn::new(g), Level::L4K).unwrap();
                assert!(
                    r.is_empty(),
                    "gfn {g}: an SPTE is still in its rmap at flush time"
                );
            }
        }
    }

    struct NoFlush;
    impl RemoteTlbFlush for NoFlush {
        fn flush_remote_tlbs(&self) {}
    }

    fn req(g: u64, write: bool) -> MapRequest {
        MapRequest {
            gfn: Gfn::new(g),
            pfn: Pfn::new(g + 100),
            level: Level::L4K,
            host_writable: true,
            write_fault: write,
            prefetch: false,
        }
    }

    fn populated() -> (ShadowMmu, MmuLock, OneSlot, ShadowRoot) {
        let mmu = ShadowMmu::new(1);
        let lock = MmuLock::new();
        let slot = OneSlot(SlotRmaps::new(
            GfnRange::new(Gfn::new(0), Gfn::new(GFNS)).unwrap(),
        ));
        let w = lock.write();
        let root = mmu.get_root(AsId::new(0), w.witness());
        for g in (0..GFNS).step_by(3) {
            assert_eq!(
                mmu.map(&root, &req(g, g % 2 == 0), &slot.0, w.witness(), &NoFlush),
                FaultOutcome::Fixed
            );
        }
        drop(w);
        (mmu, lock, slot, root)
    }

    #[test]
    fn shadow_page_is_freed_only_after_its_sptes_left_every_rmap_and_a_flush() {
        let (mmu, lock, slot, root) = populated();
        let before = mmu.stats();
        assert!(before.pages_allocated >= 4 + 3, "{before:?}");
        let check = CheckingFlush {
            mmu: &mmu,
            slot: &slot,
            freed_before: before.pages_freed,
            flushes: Cell::new(0),
        };
        let w = lock.write();
        mmu.zap_all(&slot, w.witness(), &check);
        drop(w);
        assert_eq!(check.flushes.get(), 1, "commit-zap flushes exactly once");
        let after = mmu.stats();
        // Every page but the root the test still references is freed.
        assert_eq!(after.pages_freed, after.pages_allocated - 1, "{after:?}");
        assert!(root.is_invalid());
        assert_eq!(after.leaves_zapped, after.leaves_installed);
        drop(root);
        let s = mmu.stats();
        assert_eq!(
            s.pages_freed, s.pages_allocated,
            "the last root put frees it (S3)"
        );
        assert_eq!((s.roots_allocated, s.roots_freed), (1, 1));
        assert_eq!(s.rmap.live_descriptors(), 0);
    }

    #[test]
    fn indirect_shadow_pages_counts_live_indirect_pages() {
        // Only direct pages are built: the counter must stay equal to the live indirect count, 0.
        let (mmu, lock, slot, root) = populated();
        assert_eq!(mmu.indirect_shadow_pages(), 0);
        let r = lock.read();
        let indirect = mmu
            .inner
            .state
            .lock()
            .hash
            .keys()
            .filter(|(_, role)| !role.direct)
            .count() as u64;
        assert_eq!(mmu.indirect_shadow_pages(), indirect);
        assert!(mmu.live_pages(r.witness()) > 0);
        drop(r);
        let w = lock.write();
        mmu.zap_all(&slot, w.witness(), &NoFlush);
        drop(w);
        assert_eq!(mmu.indirect_shadow_pages(), 0);
        drop(root);
    }

    #[test]
    fn every_present_leaf_is_in_its_rmap_exactly_once_and_zaps_clear_before_removal() {
        let (mmu, lock, slot, root) = populated();
        let r = lock.read();
        for g in 0..GFNS {
            let leaf = mmu.leaf(AsId::new(0), Gfn::new(g), r.witness());
            let head = slot.0.get(Gfn::new(g), Level::L4K).unwrap();
            let mut listed = Vec::new();
            // Read-only lock: the chain is stable; count entries and check they are present.
            let guard = head.lock_readonly(&mmu.inner.rmap_stats);
            let _ = guard.for_each_spte(|p| {
                listed.push(p.load_lockless());
                core::ops::ControlFlow::Continue(())
            });
            drop(guard);
            match leaf {
                Some((spte, _)) => {
                    assert_eq!(listed, vec![spte.raw()], "gfn {g}: listed once, same SPTE");
                    assert_eq!(spte.pfn(), Pfn::new(g + 100));
                }
                None => assert!(listed.is_empty(), "gfn {g}: no leaf, no rmap entry"),
            }
        }
        drop(r);
        // Zap through rmaps: afterwards no leaf is present and no rmap lists anything.
        let mut w = lock.write();
        let all = GfnRange::new(Gfn::new(0), Gfn::new(GFNS)).unwrap();
        assert!(mmu.zap_gfn_range(&slot.0, all, &mut w, Some(&lock), &NoFlush));
        assert!(
            !mmu.zap_gfn_range(&slot.0, all, &mut w, Some(&lock), &NoFlush),
            "nothing left"
        );
        drop(w);
        let r = lock.read();
        for g in 0..GFNS {
            assert!(mmu.leaf(AsId::new(0), Gfn::new(g), r.witness()).is_none());
        }
        drop(r);
        let w = lock.write();
        mmu.zap_all(&slot, w.witness(), &NoFlush);
        drop(w);
        drop(root);
        let s = mmu.stats();
        assert_eq!(s.pages_allocated, s.pages_freed);
    }

    #[test]
    fn map_into_an_invalid_root_retries_and_installs_nothing() {
        let (mmu, lock, slot, root) = populated();
        let w = lock.write();
        mmu.zap_all(&slot, w.witness(), &NoFlush);
        let installed = mmu.stats().leaves_installed;
        assert_eq!(
            mmu.map(&root, &req(1, false), &slot.0, w.witness(), &NoFlush),
            FaultOutcome::Retry(RetryReason::InvalidRoot)
        );
        assert_eq!(mmu.stats().leaves_installed, installed);
        // A new root is a different, valid one.
        let fresh = mmu.get_root(AsId::new(0), w.witness());
        assert!(!fresh.is_invalid());
        assert_eq!(
            mmu.map(&fresh, &req(1, false), &slot.0, w.witness(), &NoFlush),
            FaultOutcome::Fixed
        );
        mmu.zap_all(&slot, w.witness(), &NoFlush);
        drop(w);
        drop((root, fresh));
        let s = mmu.stats();
        assert_eq!(s.pages_allocated, s.pages_freed);
    }

    #[test]
    fn rmap_aging_rounds_unaligned_starts_down_and_test_only_modifies_nothing() {
        let (mmu, lock, slot, root) = populated();
        let range = |a, b| GfnRange::new(Gfn::new(a), Gfn::new(b)).unwrap();
        // Leaves are installed with A set (not prefetch). TestOnly: young, nothing cleared.
        assert!(mmu.age_gfn_range(&slot.0, range(3, 4), AgeAction::TestOnly, false));
        assert_eq!(mmu.stats().accessed_cleared, 0);
        assert!(mmu.age_gfn_range(&slot.0, range(0, GFNS), AgeAction::Clear, false));
        let cleared = mmu.stats().accessed_cleared;
        assert_eq!(cleared, mmu.stats().leaves_installed);
        assert!(!mmu.age_gfn_range(&slot.0, range(0, GFNS), AgeAction::Clear, true));
        assert!(!mmu.age_gfn_range(&slot.0, range(0, GFNS), AgeAction::TestOnly, false));
        let s = mmu.stats();
        assert!(
            s.aged_sptes_lockless > 0 && s.aged_sptes_locked > 0,
            "{s:?}"
        );
        // A huge-page rmap is found from an unaligned start: put an SPTE in the 2M rmap of the
        // block [512, 1024) and age [511, 513).
        let slot2 = [AtomicU64::new(SHADOW_NONPRESENT_VALUE)];
        let present = make_spte(
            Pfn::new(7),
            Level::L4K,
            LeafAttrs {
                host_writable: true,
                write_allowed: false,
                prefetch: false,
            },
        );
        slot2[0].store(present.raw(), Ordering::Relaxed);
        let head = slot.0.get(Gfn::new(512), Level::L2M).unwrap();
        let w = lock.write();
        // SAFETY: `slot2` outlives its rmap membership: it is removed below before it is dropped.
        let p = unsafe { super::super::rmap::SptePtr::new(&slot2[0]) };
        let _ = head.pte_list_add(w.witness(), &mmu.inner.rmap_stats, p);
        drop(w);
        assert!(mmu.age_gfn_range(&slot.0, range(511, 513), AgeAction::TestOnly, false));
        let w = lock.write();
        head.pte_list_remove(w.witness(), &mmu.inner.rmap_stats, p)
            .unwrap();
        mmu.zap_all(&slot, w.witness(), &NoFlush);
        drop(w);
        drop(root);
    }

    #[test]
    fn rmap_age_report_names_young_gfns_and_clips_huge_blocks_to_the_range() {
        let (mmu, lock, slot, root) = populated();
        let range = |a, b| GfnRange::new(Gfn::new(a), Gfn::new(b)).unwrap();
        let mut got = Vec::new();
        assert!(mmu.age_gfn_range_report(&slot.0, range(10, 40), false, |r| got.push(r)));
        let want: Vec<GfnRange> = (12..40).step_by(3).map(|g| range(g, g + 1)).collect();
        assert_eq!(
            got, want,
            "one report per young 4K rmap, only inside the range"
        );
        got.clear();
        assert!(!mmu.age_gfn_range_report(&slot.0, range(10, 40), true, |r| got.push(r)));
        assert!(got.is_empty());
        // A young SPTE in the 2M rmap of [512, 1024), aged over [600, 700) after the 4K leaves
        // there are old: the block is reported clipped to the range.
        assert!(mmu.age_gfn_range(&slot.0, range(0, GFNS), AgeAction::Clear, false));
        let slot2 = [AtomicU64::new(SHADOW_NONPRESENT_VALUE)];
        let present = make_spte(
            Pfn::new(7),
            Level::L4K,
            LeafAttrs {
                host_writable: true,
                write_allowed: false,
                prefetch: false,
            },
        );
        slot2[0].store(present.raw(), Ordering::Relaxed);
        let head = slot.0.get(Gfn::new(512), Level::L2M).unwrap();
        let w = lock.write();
        // SAFETY: `slot2` outlives its rmap membership: it is removed below before it is dropped.
        let p = unsafe { super::super::rmap::SptePtr::new(&slot2[0]) };
        let _ = head.pte_list_add(w.witness(), &mmu.inner.rmap_stats, p);
        drop(w);
        got.clear();
        assert!(mmu.age_gfn_range_report(&slot.0, range(600, 700), false, |r| got.push(r)));
        assert_eq!(got, vec![range(600, 700)]);
        let w = lock.write();
        head.pte_list_remove(w.witness(), &mmu.inner.rmap_stats, p)
            .unwrap();
        mmu.zap_all(&slot, w.witness(), &NoFlush);
        drop(w);
        drop(root);
    }

    #[test]
    fn zap_gfn_range_flushes_before_yielding_mmu_lock_to_a_waiter() {
        use crate::sync::atomic::{AtomicBool, AtomicU32};
        struct CountFlush(AtomicU32);
        impl RemoteTlbFlush for CountFlush {
            fn flush_remote_tlbs(&self) {
                // ORDERING: test bookkeeping; the waiter reads it after taking mmu_lock, which
                // orders it after this store.
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        // One attempt: a waiter queues on mmu_lock while we hold it, then we zap everything.
        // Returns the flush count the waiter saw if the zap yielded to it, None if it did not
        // (the waiter counted itself as waiting but had not parked yet when the zap checked, so
        // the fair unlock found nobody to hand the lock to: a scheduling race, not a bug).
        let attempt = || -> Option<u32> {
            let (mmu, lock, slot, root) = populated();
            let flushes = CountFlush(AtomicU32::new(0));
            let waiter_saw = AtomicU32::new(u32::MAX);
            let waiter_ran = AtomicBool::new(false);
            let all = GfnRange::new(Gfn::new(0), Gfn::new(GFNS)).unwrap();
            let mut yielded = false;
            std::thread::scope(|s| {
                let mut w = lock.write();
                s.spawn(|| {
                    let g = lock.write();
                    // ORDERING: read under mmu_lock, after the zapper's flush and yield.
                    waiter_saw.store(flushes.0.load(Ordering::Relaxed), Ordering::Relaxed);
                    waiter_ran.store(true, Ordering::Relaxed);
                    drop(g);
                });
                let mut spins = 0u32;
                while !lock.is_contended() {
                    spins += 1;
                    assert!(spins < 10_000_000, "the waiter never queued on mmu_lock");
                    std::thread::yield_now();
                }
                // Give the waiter time to park behind the lock it is counted as waiting for.
                std::thread::sleep(std::time::Duration::from_millis(5));
                let _ = mmu.zap_gfn_range(&slot.0, all, &mut w, Some(&lock), &flushes);
                // ORDERING: the waiter's stores happened under mmu_lock, which we hold again.
                yielded = waiter_ran.load(Ordering::Relaxed);
                drop(w);
            });
            let w = lock.write();
            mmu.zap_all(&slot, w.witness(), &NoFlush);
            drop(w);
            drop(root);
            yielded.then(|| waiter_saw.load(Ordering::Relaxed))
        };
        let saw = (0..20)
            .find_map(|_| attempt())
            .expect("in 20 attempts the zap never yielded mmu_lock to a parked waiter");
        assert!(
            saw >= 1,
            "zapped SPTEs were flushed before mmu_lock was yielded (waiter saw {saw} flushes)"
        );
    }

    #[test]
    fn an_rmap_past_the_recycle_threshold_is_zapped_and_flushed() {
        struct CountFlush(Cell<u32>);
        impl RemoteTlbFlush for CountFlush {
            fn flush_remote_tlbs(&self) {
                self.0.set(self.0.get() + 1);
            }
        }
        let (mmu, lock, slot, root) = populated();
        let present = make_spte(
            Pfn::new(9),
            Level::L4K,
            LeafAttrs {
                host_writable: true,
                write_allowed: false,
                prefetch: false,
            },
        );
        let dummies: Box<[AtomicU64]> = (0..=RMAP_RECYCLE_THRESHOLD)
            .map(|_| AtomicU64::new(present.raw()))
            .collect();
        let head = slot.0.get(Gfn::new(1), Level::L4K).unwrap();
        let w = lock.write();
        for d in dummies.iter() {
            // SAFETY: `dummies` outlives its rmap membership: the recycle below removes them all.
            let p = unsafe { super::super::rmap::SptePtr::new(d) };
            let _ = head.pte_list_add(w.witness(), &mmu.inner.rmap_stats, p);
        }
        let flush = CountFlush(Cell::new(0));
        assert_eq!(
            mmu.map(&root, &req(1, false), &slot.0, w.witness(), &flush),
            FaultOutcome::Fixed
        );
        assert_eq!(flush.0.get(), 1, "the recycle flushed");
        assert!(head.is_empty(), "the whole rmap was zapped");
        assert!(
            dummies
                .iter()
                .all(|d| d.load(Ordering::Relaxed) == SHADOW_NONPRESENT_VALUE)
        );
        assert_eq!(mmu.stats().rmap_recycles, 1);
        drop(w);
        let r = lock.read();
        assert!(mmu.leaf(AsId::new(0), Gfn::new(1), r.witness()).is_none());
        drop(r);
        let w = lock.write();
        mmu.zap_all(&slot, w.witness(), &NoFlush);
        drop(w);
        drop(root);
        assert_eq!(mmu.stats().rmap.live_descriptors(), 0);
    }
}
