//! Zapping under `mmu_lock` write: leaf zaps for notifiers (`tdp_mmu_zap_leafs`, spec §3.6),
//! whole-root zaps for invalidated roots (`tdp_mmu_zap_root`), table removal
//! (`handle_removed_pt`, spec §3.5) and teardown.
//!
//! Leaves are replaced by NONPRESENT with a `swap` when `needs_atomic_update` (P3, spec item 32),
//! else a plain store. Unlinked tables have every present entry frozen, then are retired through
//! `RcuGuard::defer` (P1); the remote TLB flush happens before the RCU guard that deferred them
//! is dropped, and before any yield of `mmu_lock` (P6).

use crate::addr::{AsId, GfnRange, Level};
use crate::mmu::spte::{AtomicSpte, Spte, SpteKind};
use crate::sync::Arc;
use crate::sync::atomic::Ordering;
use crate::sync::rcu::RcuGuard;
use crate::sync::witness::MmuWriteGuard;

use super::iter::TdpIter;
use super::table::{ENTRIES, GFN_LIMIT, ROOT_LEVEL, TablePtr};
use super::{Counters, RootRef, TdpMmu};
use crate::mmu::types::RemoteTlbFlush;

/// Something that can yield `mmu_lock` (`cond_resched_rwlock_write`).
pub(super) trait Resched {
    /// True if another thread waits for the lock (`rwlock_needbreak`): a zap that may yield then
    /// flushes, drops RCU and yields; otherwise it keeps going without either (P6).
    fn needbreak(&self) -> bool;
    /// Yields the lock if another thread waits for it; true if it did. No RCU guard may be held.
    fn cond_resched(&mut self) -> bool;
}

impl Resched for MmuWriteGuard<'_> {
    fn needbreak(&self) -> bool {
        self.is_contended()
    }
    fn cond_resched(&mut self) -> bool {
        MmuWriteGuard::cond_resched(self)
    }
}

/// Never yields: for `Drop`, where nobody else can use the TDP MMU.
pub(super) struct NoResched;

impl Resched for NoResched {
    fn needbreak(&self) -> bool {
        false
    }
    fn cond_resched(&mut self) -> bool {
        false
    }
}

/// Writes `new` over the SPTE whose snapshot is `old`, under `mmu_lock` write
/// (`kvm_tdp_mmu_write_spte`): a swap when `old` needs an atomic update, so a concurrent CPU
/// D-bit set is returned rather than lost (P3); else a plain store. Returns the old value.
///
/// Under loom the store path is a swap too: loom keeps modification order partial and does not
/// enforce RMW atomicity against plain stores, so it would report an ager's `fetch_and` that read
/// the pre-store value as landing *after* the store, which C11 forbids (an RMW writes immediately
/// after the value it read, and the store follows that value by read-write coherence).
fn write_spte(sptep: &AtomicSpte, old: Spte, new: Spte, level: Level) -> Spte {
    if cfg!(loom) || old.needs_atomic_update(level) {
        // ORDERING: O3 — the RMW's atomicity keeps a racing D/W update; the remote TLB flush and
        // RCU, not this access, order the zap against later reuse of the frame or table.
        sptep.swap(new, Ordering::Relaxed)
    } else {
        // ORDERING: O3 — no lockless party can change anything but A in this value (A may be
        // lost, as spec §1.4 allows); ordering as above.
        sptep.store(new, Ordering::Relaxed);
        old
    }
}

/// `handle_removed_pt` in exclusive mode: `table` (whose entries are at `level`) was just
/// unlinked by this thread; freeze every present entry, recurse into child tables, and retire
/// the table through `rcu`. Returns the number of present leaves removed.
///
/// # Safety
/// `table` must be unreachable from every root and SPTE, unlinked by the caller under
/// `mmu_lock` write while `rcu` is pinned, and handed to this function once (P1).
pub(super) unsafe fn handle_removed_pt(
    table: TablePtr,
    level: Level,
    rcu: &RcuGuard<'_>,
    counters: &Arc<Counters>,
) -> u64 {
    // SAFETY: the caller unlinked the table under `rcu`; it is freed only by the callback deferred
    // below, after `rcu` is dropped (P1).
    let t = unsafe { table.get() };
    let mut leaves = 0;
    // This level's leaves and dirty leaves, counted once after the loop (a striped add per leaf
    // made zapping a table 60% slower).
    let (mut own, mut dirty) = (0, 0);
    for i in 0..ENTRIES {
        let sptep = t.at(i);
        // ORDERING: only lockless A/D changes can race; `write_spte` keeps them (O3).
        let old = sptep.load(Ordering::Relaxed);
        if !old.is_shadow_present() {
            continue;
        }
        let old = write_spte(sptep, old, Spte::FROZEN, level);
        match old.kind(level) {
            SpteKind::Leaf => {
                own += 1;
                dirty += u64::from(old.is_dirty());
            }
            SpteKind::Table => {
                let child_level = level
                    .down()
                    .expect("a 4K SPTE is never a table (is_leaf holds at 4K)");
                // SAFETY: the child was reachable only through this entry, now FROZEN in an
                // unreachable table; we hand it over once, under the same `rcu` (P1).
                leaves += unsafe {
                    handle_removed_pt(TablePtr::from_spte(old), child_level, rcu, counters)
                };
            }
            SpteKind::NonPresent | SpteKind::Frozen => {}
        }
    }
    leaves += own;
    counters.pages.remove(level, own);
    if dirty != 0 {
        Counters::add(&counters.dirty_leaves_zapped, dirty);
    }
    // The deliberately broken build `broken-free-before-flush-ack` (test-only; its loom model
    // asserts it is caught) frees the table right after unlinking it, before the remote TLB flush
    // and its acknowledgements: a vCPU in guest mode, which walks without RCU (G1), may still be
    // reading it.
    if cfg!(feature = "broken-free-before-flush-ack") {
        // SAFETY: none: this is the deliberate bug (the table is poisoned and leaked, never
        // deallocated, in this build: table.rs).
        unsafe { table.free() };
        Counters::add(&counters.tables_freed, 1);
        return leaves;
    }
    let counters = Arc::clone(counters);
    rcu.defer(move || {
        // SAFETY: unlinked and frozen (P1); this callback runs after every RCU reader that could
        // have reached the table is gone, and it is the table's only free.
        unsafe { table.free() };
        Counters::add(&counters.tables_freed, 1);
    });
    leaves
}

/// Frees `table` (entries at `level`) and every table below it, right now.
///
/// # Safety
/// Nothing may reach `table` or its subtree any more, and no thread may still be reading them:
/// called only from an RCU callback for a root that was unreachable before the grace period (P4).
pub(super) unsafe fn free_subtree(table: TablePtr, level: Level, counters: &Counters) {
    if let Some(child_level) = level.down() {
        // SAFETY: this function's contract: the subtree is still allocated and exclusively ours.
        let t = unsafe { table.get() };
        for i in 0..ENTRIES {
            // ORDERING: no other thread can access the subtree any more.
            let spte = t.at(i).load(Ordering::Relaxed);
            if spte.kind(level) == SpteKind::Table {
                // SAFETY: a child of an exclusively owned, unreachable subtree.
                unsafe { free_subtree(TablePtr::from_spte(spte), child_level, counters) };
            }
        }
    }
    // SAFETY: as above; freed once, as the recursion visits each table once.
    unsafe { table.free() };
    Counters::add(&counters.tables_freed, 1);
}

/// How a zap may yield and flush.
pub(super) struct ZapCtx<'a> {
    pub(super) resched: &'a mut dyn Resched,
    pub(super) may_yield: bool,
    pub(super) flusher: Option<&'a dyn RemoteTlbFlush>,
    /// Leaves of a valid root zapped since the last flush.
    pub(super) unflushed: u64,
}

impl ZapCtx<'_> {
    fn flush_now(&mut self) {
        // The deliberately broken build of feature `broken-skip-zap-flush` (test-only; the
        // torture tests assert it is caught) forgets the flush, violating P6.
        if cfg!(feature = "broken-skip-zap-flush") {
            self.unflushed = 0;
            return;
        }
        if let Some(f) = self.flusher {
            f.flush_remote_tlbs();
        }
        self.unflushed = 0;
    }
}

impl TdpMmu {
    /// Zaps the present leaves mapping `range` in every root of `as_id`, valid and invalid
    /// (`kvm_tdp_mmu_unmap_gfn_range`). Returns whether a remote TLB flush is still needed
    /// (the caller flushes before dropping `mmu_lock`). With `may_yield`, it releases `mmu_lock`
    /// when another thread waits for it, flushing first, and only after progress; uncontended, it
    /// neither flushes nor restarts its walk, so the caller's one flush at the end is the only one.
    /// Only leaves are zapped: no table is freed.
    ///
    /// # Panics
    /// If `mmu` guards another `mmu_lock` than the one this MMU is bound to.
    #[must_use = "a true result means remote TLBs must be flushed before mmu_lock is dropped"]
    pub fn zap_leafs(
        &self,
        as_id: AsId,
        range: GfnRange,
        mmu: &mut MmuWriteGuard<'_>,
        may_yield: bool,
        flusher: &dyn RemoteTlbFlush,
    ) -> bool {
        self.check_lock(mmu.witness().lock_id());
        let end = range.end().raw().min(GFN_LIMIT);
        let start = range.start().raw();
        if start >= end {
            return false;
        }
        let roots = self.roots_of(Some(as_id));
        let mut ctx = ZapCtx {
            resched: mmu,
            may_yield,
            flusher: Some(flusher),
            unflushed: 0,
        };
        for root in &roots {
            self.zap_leafs_in_root(root, start, end, &mut ctx);
        }
        drop(roots);
        // `broken-skip-zap-flush` (test-only): claim no flush is needed (violates P6).
        ctx.unflushed != 0 && !cfg!(feature = "broken-skip-zap-flush")
    }

    /// References to the roots of `as_id` (all roots if `None`) that are still referenced
    /// (`for_each_tdp_mmu_root_yield_safe`: the references keep them on the list across yields).
    pub(super) fn roots_of(&self, as_id: Option<AsId>) -> Vec<RootRef> {
        let roots = self.inner.roots.lock();
        let mut out = Vec::with_capacity(roots.len());
        for e in roots.iter() {
            // SAFETY: on the list under its lock: allocated (P4).
            let r = unsafe { e.root.get() };
            if as_id.is_some_and(|a| a != r.as_id) {
                continue;
            }
            // `kvm_tdp_mmu_get_root`: increment only if not already 0 (a 0 root is being freed
            // and waits for the list lock we hold).
            // ORDERING: as `Arc::clone`; the list lock orders us with the freeing thread.
            let mut n = r.refcount.load(Ordering::Relaxed);
            while n != 0 {
                match r.refcount.compare_exchange_weak(
                    n,
                    n + 1,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => {
                        out.push(RootRef {
                            inner: Arc::clone(&self.inner),
                            root: e.root,
                        });
                        break;
                    }
                    Err(v) => n = v,
                }
            }
        }
        out
    }

    /// `tdp_mmu_zap_leafs` on one root over `[start, end)`.
    fn zap_leafs_in_root(&self, root: &RootRef, start: u64, end: u64, ctx: &mut ZapCtx<'_>) {
        let counters = &self.inner.counters;
        // Invalid roots need no flush: vCPUs flush when they load a new root (spec §3.6 step 6).
        let needs_flush = !root.is_invalid();
        let mut resume = start;
        let mut yielded_gfn = start;
        'restart: loop {
            let guard = self.inner.rcu.pin();
            // SAFETY: we hold a reference to `root`, so its table is allocated (P4).
            let mut it = unsafe { TdpIter::new(root.table(), resume, end, &guard) };
            // Counted per walk and added when it yields or ends (per-leaf adds cost 60%).
            let (mut zapped, mut dirty) = (0, 0);
            let mut removed = [0u64; 3];
            let count = |zapped: u64, dirty: u64, removed: &[u64; 3]| {
                Counters::add(&counters.leaves_zapped, zapped);
                if dirty != 0 {
                    Counters::add(&counters.dirty_leaves_zapped, dirty);
                }
                for (l, n) in [Level::L4K, Level::L2M, Level::L1G]
                    .into_iter()
                    .zip(removed)
                {
                    counters.pages.remove(l, *n);
                }
            };
            while it.valid() {
                // A yield point (`tdp_mmu_iter_cond_resched`): at each 2M entry, once the
                // position advanced since the last yield (forward progress, P6), and only if
                // another thread waits for `mmu_lock`. Then, and only then, flush (P6), drop RCU,
                // yield and restart the walk from the current position.
                if ctx.may_yield
                    && it.level() == Level::L2M
                    && it.next_gfn() != yielded_gfn
                    && ctx.resched.needbreak()
                {
                    resume = it.next_gfn();
                    yielded_gfn = resume;
                    count(zapped, dirty, &removed);
                    if ctx.unflushed != 0 {
                        ctx.flush_now();
                    }
                    drop(guard);
                    ctx.resched.cond_resched();
                    continue 'restart;
                }
                let old = it.old();
                if old.is_present_leaf(it.level()) {
                    #[cfg(feature = "test-hooks")]
                    super::hooks::maybe_yield();
                    let prev = write_spte(it.sptep(), old, Spte::NONPRESENT, it.level());
                    it.set_old(prev);
                    zapped += 1;
                    dirty += u64::from(prev.is_dirty());
                    removed[usize::from(it.level().get() - 1)] += 1;
                    if needs_flush {
                        ctx.unflushed += 1;
                    }
                }
                it.next();
            }
            count(zapped, dirty, &removed);
            return;
        }
    }

    /// Zaps a whole (invalid) root: first its leaves, with yields, then its tables, each removed
    /// table frozen and retired through RCU after a flush (`tdp_mmu_zap_root`).
    fn zap_root(&self, root: &RootRef, ctx: &mut ZapCtx<'_>) {
        self.zap_leafs_in_root(root, 0, GFN_LIMIT, ctx);
        let counters = &self.inner.counters;
        let child_level = ROOT_LEVEL.down().expect("a root is above 4K");
        let mut i = 0;
        while i < ENTRIES {
            let guard = self.inner.rcu.pin();
            let mut removed = false;
            while i < ENTRIES {
                // SAFETY: we hold a reference to `root`, so its table is allocated (P4).
                let sptep = unsafe { root.table().get() }.at(i);
                i += 1;
                // ORDERING: table pointers change only under `mmu_lock` write, which we hold (P2).
                let old = sptep.load(Ordering::Relaxed);
                if old.kind(ROOT_LEVEL) != SpteKind::Table {
                    continue;
                }
                // ORDERING: unlinking publishes nothing; walkers that still see the old pointer
                // are covered by RCU (P1).
                sptep.store(Spte::NONPRESENT, Ordering::Relaxed);
                // SAFETY: unlinked just now under `mmu_lock` write with `guard` pinned; handed
                // over once (P1).
                let leaves = unsafe {
                    handle_removed_pt(TablePtr::from_spte(old), child_level, &guard, counters)
                };
                Counters::add(&counters.leaves_zapped, leaves);
                removed = true;
                // Yield only when someone waits for `mmu_lock`; the flush below precedes it.
                if ctx.may_yield && ctx.resched.needbreak() {
                    break;
                }
            }
            // P6: flush before the guard that deferred the frees is dropped.
            if removed || ctx.unflushed != 0 {
                ctx.flush_now();
            }
            drop(guard);
            if ctx.may_yield && i < ENTRIES {
                ctx.resched.cond_resched();
            }
        }
    }

    /// Fast zap, second half (`kvm_tdp_mmu_zap_invalidated_roots`): zaps every invalidated root
    /// whose TDP MMU reference is still held, then drops that reference. Tables are frozen entry by
    /// entry and freed through RCU after a remote TLB flush, never while a walker can reach them.
    /// May yield `mmu_lock` when contended.
    pub fn zap_invalidated_roots(&self, mmu: &mut MmuWriteGuard<'_>, flusher: &dyn RemoteTlbFlush) {
        self.check_lock(mmu.witness().lock_id());
        let mut ctx = ZapCtx {
            resched: mmu,
            may_yield: true,
            flusher: Some(flusher),
            unflushed: 0,
        };
        self.zap_invalidated_roots_with(&mut ctx);
    }

    /// [`TdpMmu::zap_invalidated_roots`] with an explicit yield / flush policy.
    pub(super) fn zap_invalidated_roots_inner(
        &self,
        resched: &mut dyn Resched,
        flusher: Option<&dyn RemoteTlbFlush>,
    ) {
        let mut ctx = ZapCtx {
            resched,
            may_yield: false,
            flusher,
            unflushed: 0,
        };
        self.zap_invalidated_roots_with(&mut ctx);
    }

    fn zap_invalidated_roots_with(&self, ctx: &mut ZapCtx<'_>) {
        let owned: Vec<RootRef> = {
            let mut roots = self.inner.roots.lock();
            roots
                .iter_mut()
                .filter(|e| {
                    // SAFETY: on the list under its lock: allocated (P4).
                    let r = unsafe { e.root.get() };
                    // ORDERING: `invalid` is written under `mmu_lock` write, which we hold.
                    e.owned && r.invalid.load(Ordering::Relaxed)
                })
                .map(|e| {
                    // The TDP MMU's own reference moves into this `RootRef`.
                    e.owned = false;
                    RootRef {
                        inner: Arc::clone(&self.inner),
                        root: e.root,
                    }
                })
                .collect()
        };
        for root in &owned {
            self.zap_root(root, ctx);
        }
        // Dropping the references may free roots; the list lock is not held here.
        drop(owned);
    }

    /// Zaps everything (VM teardown): invalidates every root, zaps it, and drops the TDP MMU's
    /// references. Tables are freed after the RCU grace period; roots once the last `RootRef`
    /// held elsewhere is dropped.
    pub fn teardown(&self, mmu: &mut MmuWriteGuard<'_>, flusher: &dyn RemoteTlbFlush) {
        self.invalidate_all_roots(mmu.witness());
        self.zap_invalidated_roots(mmu, flusher);
    }
}
