//! The TDP MMU (`arch/x86/kvm/mmu/tdp_mmu.c`): radix page tables of atomic SPTEs, one root per
//! address space, faults under `mmu_lock` read, zaps under `mmu_lock` write, lockless aging and a
//! lockless simulated hardware walker, with page-table pages freed through RCU.
//!
//! # Protocol
//! Who may change an SPTE, and how (spte.rs O1–O5 give the orderings):
//! - **Faults** (`map`, `mmu_lock` read + RCU) link missing tables and install leaves only by
//!   compare-and-swap from a value they read (`tdp_mmu_set_spte_atomic`); a lost CAS is a retry.
//! - **Zaps** (`zap_leafs`, `zap_invalidated_roots`, `teardown`; `mmu_lock` write + RCU) replace
//!   present leaves with NONPRESENT by `swap` when `needs_atomic_update` (else a plain store), and
//!   unlink tables, which `handle_removed_pt` then freezes and retires through `RcuGuard::defer`.
//! - **Agers** (`age_gfn_range`, `test_age_gfn_range`; RCU only, no `mmu_lock`) clear Accessed with
//!   one `fetch_and(!A)` where it is set, on valid roots only; they never touch a table pointer.
//! - **The simulated CPU** (`hardware_walk`, RCU only; `guest_walk`, a vCPU in guest mode, nothing
//!   pinned: tables it reaches stay allocated by the flush handshake, G1 in docs/locking.md) sets
//!   A, and D on writes, by a compare-and-swap on a present leaf it has just checked allows the
//!   access.
//!
//! # Invariants (numbers cited by SAFETY / ORDERING comments as P1–P7)
//! 1. **P1 (table lifetime)** A page-table page is reachable only from a root table or a present
//!    non-leaf SPTE. It is freed exactly once, by an RCU callback deferred after it was unlinked and
//!    all its present entries were frozen (spec §4 items 20, 29); so a table read while an
//!    `RcuGuard` is pinned stays allocated until that guard is dropped. A table whose link CAS
//!    was lost was never visible and is freed at once.
//! 2. **P2 (links)** A non-leaf SPTE is created only by a `Release` CAS from NONPRESENT over a
//!    fully initialised table, and removed only under `mmu_lock` write. Leaves live at 4K only
//!    (huge mappings are not installed yet), so a slot above 4K only ever holds NONPRESENT, a
//!    table, or FROZEN, and a 4K slot NONPRESENT, a leaf, or FROZEN.
//! 3. **P3 (leaves)** A reachable present leaf changes only by: a fault's CAS (`mmu_lock` read),
//!    a zap's swap-or-store (`mmu_lock` write, swap whenever `needs_atomic_update`: spec item 32),
//!    an ager's `fetch_and(!A)`, or the CPU's A/D CAS. A present leaf never becomes a present leaf
//!    with another pfn (spec item 13). Hence a Dirty bit set by the CPU is never lost (item 19).
//! 4. **P4 (roots)** A root starts with refcount 2 (the caller's and the TDP MMU's own). Its
//!    validity is cleared only under `mmu_lock` write; the TDP MMU's reference is dropped only by
//!    `zap_invalidated_roots` after zapping it, so the count reaches 0 only on an invalid, zapped
//!    root (item 30). The last `put` removes it from the root list and frees the root and its table
//!    through RCU; agers, which find the valid root through a published pointer without a
//!    reference, are covered by their RCU guard.
//! 5. **P5 (no installs into invalid roots)** `map` checks validity under `mmu_lock` read, and
//!    invalidation needs `mmu_lock` write, so no leaf or table is added to an invalid root; once
//!    zapped, an invalid root stays empty.
//! 6. **P6 (flush before retire / yield)** A zap flushes remote TLBs exactly when it must: before
//!    dropping an RCU guard under which it unlinked tables, and before yielding `mmu_lock` (which
//!    it does only when another thread waits for it) if it zapped leaves of a valid root since
//!    the last flush. Otherwise it reports the pending flush to its caller, which flushes once
//!    before dropping `mmu_lock` (`mmu::ZapBatch`). So no table is freed and no lock is yielded
//!    while a stale translation may be in use (item 31). A zap yields only after its position
//!    advanced since its last yield (forward progress).
//! 7. **P7 (FROZEN)** FROZEN is written only into unlinked tables (exclusive-mode
//!    `handle_removed_pt`), which `map` cannot reach because it holds `mmu_lock` read across its
//!    walk; a walker that meets FROZEN treats it as not present (`map` retries). FROZEN has no A/D
//!    bit, so an ager or the CPU racing the freeze cannot alter it (item 35).
//!
//! 8. **P8 (huge leaves and splits)** A leaf may sit at 2M or 1G (PS bit; `mmu/hugepage.rs`).
//!    Under `mmu_lock` read a present huge leaf may be replaced by a link to a table one level
//!    down, fully populated before it is published, with one `Release` CAS from the exact value
//!    its children were built from (`split.rs`): the translation of every gfn is unchanged, and
//!    no concurrent A/D or permission update is lost (the CAS fails and the children are
//!    rebuilt). A table is never replaced by a leaf under `mmu_lock` read.
//!
//! # Not modelled (yet)
//! In-place recovery under `mmu_lock` read (here it takes write, `split.rs`), A/D-disabled SPTEs and access tracking, zaps under `mmu_lock` read (shared-mode
//! `handle_removed_pt` with its FROZEN exchange loop), MMIO SPTEs, and mirror (TDX) roots.

mod age;
pub mod dirty;
mod fault;
#[cfg(feature = "test-hooks")]
pub mod hooks;
mod iter;
mod split;
pub(crate) mod table;
mod walk;
mod zap;

use core::fmt;
use core::ptr::NonNull;

use crate::addr::{AsId, Gfn};
use crate::sync::atomic::{AtomicBool, AtomicUsize, Ordering, fence};
use crate::sync::percpu::StripedCounter;
use crate::sync::rcu::Rcu;
use crate::sync::witness::{LockBinding, LockId, MmuLock, MmuRead, MmuWrite};
use crate::sync::{Arc, Mutex};

use table::{GFN_LIMIT, ROOT_LEVEL, TablePtr};

#[cfg(test)]
use crate::mmu::types::{FaultOutcome, MapRequest};

/// Counters of the TDP MMU (read-only statistics).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct TdpStats {
    /// Page-table pages allocated (roots' tables included).
    pub tables_allocated: u64,
    /// Page-table pages freed (after their RCU grace period).
    pub tables_freed: u64,
    /// Leaves installed by faults.
    pub leaves_installed: u64,
    /// Present leaves removed by zaps (including those inside removed tables).
    pub leaves_zapped: u64,
    /// Zapped leaves whose Dirty bit was set when they were removed: the pfns the kernel would
    /// mark dirty (`kvm_set_pfn_dirty` from `handle_changed_spte`).
    pub dirty_leaves_zapped: u64,
    /// Roots allocated.
    pub roots_allocated: u64,
    /// Roots freed (after their RCU grace period).
    pub roots_freed: u64,
    /// Compare-and-swaps lost by faults.
    pub cas_retries: u64,
    /// Accessed bits cleared by aging.
    pub accessed_cleared: u64,
    /// Huge leaves split into tables of smaller leaves (P8).
    pub huge_splits: u64,
    /// Huge leaves formed in place by `recover_huge_pages`.
    pub huge_recovered: u64,
}

/// Shared counters; RCU callbacks hold an `Arc` to them so frees are counted when they happen.
/// Each is striped ([`StripedCounter`]): faults, zaps and aging on different CPUs bump different
/// cache lines (issue 9 item 7).
#[derive(Default)]
pub(crate) struct Counters {
    tables_allocated: StripedCounter,
    tables_freed: StripedCounter,
    /// Faults' installs over a present leaf (a write or access-tracking upgrade). A fault's
    /// install over a non-present SPTE is counted only in `pages` (one striped add per install,
    /// not two); `leaves_installed` is derived (see [`Counters::leaves_installed`]).
    reinstalled: StripedCounter,
    /// Leaves counted in `pages` that no fault installed: a split's children, a recovered huge
    /// leaf.
    installed_not_by_fault: StripedCounter,
    leaves_zapped: StripedCounter,
    dirty_leaves_zapped: StripedCounter,
    roots_allocated: StripedCounter,
    roots_freed: StripedCounter,
    cas_retries: StripedCounter,
    accessed_cleared: StripedCounter,
    /// Huge leaves split into tables (P8).
    huge_splits: StripedCounter,
    /// Huge leaves formed in place by recovery.
    huge_recovered: StripedCounter,
    /// Present leaves per level (`mmu/hugepage.rs`).
    pub(crate) pages: crate::mmu::hugepage::PageCounts,
}

impl Counters {
    fn new() -> Counters {
        Counters::default()
    }
    /// Adds `n` to a counter (nothing if `n` is zero).
    #[inline]
    fn add(c: &StripedCounter, n: u64) {
        c.add_nonzero(n);
    }
    /// `n` leaves entered `pages` without a fault installing them (splits, recovery).
    #[inline]
    pub(crate) fn not_by_fault(&self, n: u64) {
        self.installed_not_by_fault.add_nonzero(n);
    }
    /// Leaves installed by faults: new leaves (all of `pages`' installs but the ones no fault
    /// made) plus installs over a present leaf. Exact when no install is in flight (every
    /// counter is monotonic; the subtrahend is read first, and a split bumps it after `pages`,
    /// so a racing snapshot errs high, never wraps).
    fn leaves_installed(&self) -> u64 {
        let not_by_fault = self.installed_not_by_fault.sum();
        (self.pages.installed_total() + self.reinstalled.sum()).saturating_sub(not_by_fault)
    }
    fn snapshot(&self) -> TdpStats {
        // A snapshot need not be consistent across counters (percpu invariant 2 per counter).
        let r = |c: &StripedCounter| c.sum();
        TdpStats {
            tables_allocated: r(&self.tables_allocated),
            tables_freed: r(&self.tables_freed),
            leaves_installed: self.leaves_installed(),
            leaves_zapped: r(&self.leaves_zapped),
            dirty_leaves_zapped: r(&self.dirty_leaves_zapped),
            roots_allocated: r(&self.roots_allocated),
            roots_freed: r(&self.roots_freed),
            cas_retries: r(&self.cas_retries),
            accessed_cleared: r(&self.accessed_cleared),
            huge_splits: r(&self.huge_splits),
            huge_recovered: r(&self.huge_recovered),
        }
    }
}

/// A root (`struct kvm_mmu_page` of a TDP root): its table, address space, validity and refcount.
pub(crate) struct Root {
    table: TablePtr,
    as_id: AsId,
    /// `role.invalid`: set once, under `mmu_lock` write (P4).
    invalid: AtomicBool,
    /// `tdp_mmu_root_count`.
    refcount: AtomicUsize,
}

/// A pointer to a [`Root`]; the root is freed through RCU after its last reference (P4).
#[derive(Clone, Copy, PartialEq, Eq)]
struct RootPtr(NonNull<Root>);

// SAFETY: `Root` holds only atomics and a `TablePtr` (Send + Sync); the pointer's validity is
// governed by P4, not by the thread that holds it.
unsafe impl Send for RootPtr {}
// SAFETY: as above; all shared access to a `Root` is through atomics.
unsafe impl Sync for RootPtr {}

impl RootPtr {
    /// # Safety
    /// The root must be allocated for `'a`: the caller holds a reference (refcount > 0), or
    /// loaded the pointer from the valid-root slot or the root list under RCU or the root-list
    /// lock (P4).
    unsafe fn get<'a>(self) -> &'a Root {
        // SAFETY: this function's contract.
        unsafe { self.0.as_ref() }
    }

    /// # Safety
    /// The root must be unreachable, unreferenced and freed only once (P4).
    unsafe fn free(self) {
        // Under loom the root is leaked rather than deallocated, like tables (table.rs), so a
        // protocol bug shows up as a poisoned root-table read instead of undetected UB.
        #[cfg(not(loom))]
        // SAFETY: the root came from `Box::leak` in `get_root`; this function's contract.
        drop(unsafe { Box::from_raw(self.0.as_ptr()) });
    }
}

/// An entry of the root list (`tdp_mmu_roots`).
struct RootEntry {
    root: RootPtr,
    /// The TDP MMU still holds its own reference (dropped by `zap_invalidated_roots`).
    owned: bool,
}

/// State shared by the [`TdpMmu`] and every [`RootRef`].
struct Inner {
    rcu: Arc<Rcu>,
    /// The `mmu_lock` whose witnesses this MMU accepts (bound by the VM, or on first use).
    lock: LockBinding,
    /// Per address space: the address of the valid root, or 0. Published with `Release` (P4).
    valid_roots: Box<[AtomicUsize]>,
    /// Every root not yet freed, valid or invalid (`tdp_mmu_roots` + `tdp_mmu_pages_lock`).
    roots: Mutex<Vec<RootEntry>>,
    counters: Arc<Counters>,
    /// The format of the leaves this MMU builds (set once, before the MMU is shared).
    ad_bits: crate::mmu::spte::AdBits,
}

impl Inner {
    /// The valid root of `as_id`, without taking a reference; the result is valid for the
    /// caller's RCU section (P4).
    fn valid_root(&self, as_id: AsId) -> Option<RootPtr> {
        let slot = self.valid_roots.get(as_id.index())?;
        // ORDERING: Acquire pairs with the Release publication in `get_root`, so the root's
        // fields and its table are initialised when seen (P4).
        let addr = slot.load(Ordering::Acquire);
        let ptr = NonNull::new(core::ptr::with_exposed_provenance_mut::<Root>(addr))?;
        Some(RootPtr(ptr))
    }

    /// Drops one reference; the last one frees the root (`kvm_tdp_mmu_put_root`).
    fn put_root(&self, root: RootPtr) {
        // SAFETY: the caller held a reference until this call (P4).
        let r = unsafe { root.get() };
        // ORDERING: Release so that this holder's accesses to the root happen before the free;
        // the last holder's Acquire fence below pairs with every other holder's Release (the
        // standard `Arc` argument).
        if r.refcount.fetch_sub(1, Ordering::Release) != 1 {
            return;
        }
        fence(Ordering::Acquire);
        // ORDERING: the flag was set under `mmu_lock` write before the TDP MMU's reference was
        // dropped, which happens before the count reached 0 (Release/Acquire above).
        assert!(
            r.invalid.load(Ordering::Relaxed),
            "a root's refcount reached 0 while it was still valid (P4 / spec §4 item 30)"
        );
        self.roots.lock().retain(|e| e.root != root);
        let table = r.table;
        let counters = Arc::clone(&self.counters);
        let guard = self.rcu.pin();
        guard.defer(move || {
            // SAFETY: the root is off the list and the valid slot (P4), so no thread can find it
            // any more, and every thread that found it earlier held a reference (now all gone) or
            // an RCU guard older than this callback. Its table is reachable only from the root.
            unsafe { zap::free_subtree(table, ROOT_LEVEL, &counters) };
            // SAFETY: as above; this is the root's only free.
            unsafe { root.free() };
            Counters::add(&counters.roots_freed, 1);
        });
    }
}

/// A counted reference to a root (`kvm_tdp_mmu_get_root` / `kvm_tdp_mmu_put_root`): `Clone`
/// takes a reference, `Drop` puts it.
pub struct RootRef {
    inner: Arc<Inner>,
    root: RootPtr,
}

impl RootRef {
    #[inline]
    fn root(&self) -> &Root {
        // SAFETY: this `RootRef` holds a reference, so the root is allocated (P4).
        unsafe { self.root.get() }
    }
    /// The address space this root translates.
    pub fn as_id(&self) -> AsId {
        self.root().as_id
    }
    /// True once the root was invalidated (`role.invalid`); the holder should load a new root.
    #[inline]
    pub fn is_invalid(&self) -> bool {
        // ORDERING: a hint for vCPUs; `map` re-checks under `mmu_lock`, which orders it (P5).
        self.root().invalid.load(Ordering::Relaxed)
    }
    fn table(&self) -> TablePtr {
        self.root().table
    }
    /// True if `self` refers to the root `mmu` belongs with (same shared state).
    fn belongs_to(&self, mmu: &TdpMmu) -> bool {
        Arc::ptr_eq(&self.inner, &mmu.inner)
    }
}

impl Clone for RootRef {
    fn clone(&self) -> RootRef {
        // ORDERING: taking a reference while already holding one needs no ordering (`Arc::clone`).
        self.root().refcount.fetch_add(1, Ordering::Relaxed);
        RootRef {
            inner: Arc::clone(&self.inner),
            root: self.root,
        }
    }
}

impl Drop for RootRef {
    fn drop(&mut self) {
        self.inner.put_root(self.root);
    }
}

impl fmt::Debug for RootRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RootRef")
            .field("as_id", &self.as_id())
            .field("invalid", &self.is_invalid())
            .finish()
    }
}

/// The TDP MMU of one VM.
pub struct TdpMmu {
    inner: Arc<Inner>,
}

impl fmt::Debug for TdpMmu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TdpMmu")
            .field("stats", &self.stats())
            .finish()
    }
}

impl TdpMmu {
    /// One past the largest gfn a root can map (2^36: 48-bit guest physical addresses).
    pub const GFN_LIMIT: Gfn = Gfn::new(GFN_LIMIT);

    /// A TDP MMU for `address_spaces` address spaces (1, or 2 with SMM), freeing page-table pages
    /// through `rcu`.
    pub fn new(address_spaces: usize, rcu: Arc<Rcu>) -> TdpMmu {
        let valid_roots = (0..address_spaces).map(|_| AtomicUsize::new(0)).collect();
        TdpMmu {
            inner: Arc::new(Inner {
                rcu,
                lock: LockBinding::unbound(),
                valid_roots,
                roots: Mutex::new(Vec::new()),
                counters: Arc::new(Counters::new()),
                ad_bits: crate::mmu::spte::AdBits::Enabled,
            }),
        }
    }

    /// This MMU, building its leaves in the `ad` format (`VmConfig::ad_bits`).
    ///
    /// # Panics
    /// If the MMU is already shared (a root or a clone of its state exists).
    pub fn with_ad_bits(mut self, ad: crate::mmu::spte::AdBits) -> TdpMmu {
        Arc::get_mut(&mut self.inner)
            .expect("with_ad_bits: the TdpMmu is already shared")
            .ad_bits = ad;
        self
    }

    /// The format of the leaves this MMU builds.
    pub fn ad_bits(&self) -> crate::mmu::spte::AdBits {
        self.inner.ad_bits
    }

    /// The RCU domain page-table pages are freed through.
    pub fn rcu(&self) -> &Arc<Rcu> {
        &self.inner.rcu
    }

    /// Binds this MMU to `lock`: from now on every entry point that relies on `mmu_lock` refuses
    /// a witness of another lock.
    ///
    /// # Panics
    /// If the MMU already trusts another lock.
    pub fn bind_lock(&self, lock: &MmuLock) {
        self.check_lock(lock.id());
    }

    /// Panics unless `id` is the lock this MMU trusts (binding it on first use).
    #[inline]
    pub(super) fn check_lock(&self, id: LockId) {
        self.inner.lock.check(id, "the TdpMmu");
    }

    fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    /// A reference to the valid root of `as_id`, allocating it on first use
    /// (`kvm_tdp_mmu_alloc_root`). A new root starts with refcount 2: the caller's and the TDP
    /// MMU's own (spec §1.5).
    ///
    /// # Panics
    /// If `as_id` is not below the `address_spaces` given to [`TdpMmu::new`] (a bug in the VM
    /// layer, which validates address-space ids), or if `mmu` is a witness of another `mmu_lock`.
    pub fn get_root(&self, as_id: AsId, mmu: &MmuRead) -> RootRef {
        self.check_lock(mmu.lock_id());
        assert!(
            as_id.index() < self.inner.valid_roots.len(),
            "as_id {as_id:?} beyond the TdpMmu's {} address spaces",
            self.inner.valid_roots.len()
        );
        // The published pointer is dereferenced under RCU as well as `mmu_lock` read (P4): the
        // guard is what keeps a root found through the valid slot allocated.
        let rcu = self.inner.rcu.pin();
        if let Some(r) = self.try_get_valid_root(as_id) {
            return r;
        }
        drop(rcu);
        let mut roots = self.inner.roots.lock();
        // Re-check under the list lock: another reader-lock holder may have allocated it.
        if let Some(r) = self.try_get_valid_root(as_id) {
            return r;
        }
        let table = TablePtr::alloc();
        Counters::add(&self.counters().tables_allocated, 1);
        Counters::add(&self.counters().roots_allocated, 1);
        let root = Box::new(Root {
            table,
            as_id,
            invalid: AtomicBool::new(false),
            refcount: AtomicUsize::new(2),
        });
        let root = RootPtr(NonNull::from(Box::leak(root)));
        roots.push(RootEntry { root, owned: true });
        // ORDERING: Release publishes the initialised root and table to `valid_root` (P4).
        self.inner.valid_roots[as_id.index()]
            .store(root.0.as_ptr().expose_provenance(), Ordering::Release);
        RootRef {
            inner: Arc::clone(&self.inner),
            root,
        }
    }

    /// The valid root with a new reference, if there is one. The caller holds `mmu_lock` read,
    /// so the root cannot be invalidated and still holds the TDP MMU's reference (P4).
    fn try_get_valid_root(&self, as_id: AsId) -> Option<RootRef> {
        let root = self.inner.valid_root(as_id)?;
        // SAFETY: the pointer was published in the valid slot and, under `mmu_lock` read, the
        // root cannot lose the TDP MMU's reference (P4), so it is allocated.
        let r = unsafe { root.get() };
        // ORDERING: `invalid` is written under `mmu_lock` write; the caller's `mmu_lock` read
        // orders that write before this load (P5).
        if r.invalid.load(Ordering::Relaxed) {
            return None;
        }
        // ORDERING: the TDP MMU's reference keeps the count above 0 meanwhile (as `Arc::clone`).
        r.refcount.fetch_add(1, Ordering::Relaxed);
        Some(RootRef {
            inner: Arc::clone(&self.inner),
            root,
        })
    }

    /// Fast zap, first half (`kvm_tdp_mmu_invalidate_roots`): marks every root invalid and
    /// unpublishes it, so vCPUs load new roots; [`TdpMmu::zap_invalidated_roots`] then empties and
    /// releases them.
    pub fn invalidate_all_roots(&self, mmu: &MmuWrite) {
        self.check_lock(mmu.lock_id());
        self.invalidate_all_roots_unlocked();
    }

    /// [`TdpMmu::invalidate_all_roots`] for callers with exclusive access by other means
    /// (`mmu_lock` write, or `Drop`).
    fn invalidate_all_roots_unlocked(&self) {
        let roots = self.inner.roots.lock();
        for e in roots.iter() {
            // SAFETY: the entry is on the list, so its refcount is above 0 or its free is waiting
            // for the list lock we hold (P4); either way it is allocated.
            let r = unsafe { e.root.get() };
            // ORDERING: read under `mmu_lock` (P5); agers tolerate a stale value (spec item 18).
            r.invalid.store(true, Ordering::Relaxed);
        }
        for slot in self.inner.valid_roots.iter() {
            // ORDERING: readers that still see the old pointer are covered by RCU (P4); there is
            // nothing to publish.
            slot.store(0, Ordering::Relaxed);
        }
    }

    /// Statistics.
    pub fn stats(&self) -> TdpStats {
        self.counters().snapshot()
    }

    /// Present leaves per level (`pages_4k`, `pages_2m`, `pages_1g`).
    pub fn page_stats(&self) -> crate::mmu::PageStats {
        self.inner.counters.pages.snapshot()
    }
}

impl Drop for TdpMmu {
    fn drop(&mut self) {
        // Nobody else can call into this TdpMmu any more; `RootRef`s only put references.
        self.invalidate_all_roots_unlocked();
        self.zap_invalidated_roots_inner(&mut zap::NoResched, None);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn tdp_mmu_and_root_refs_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<TdpMmu>();
        check::<RootRef>();
    }
    use crate::addr::{Gfn, Level, Pfn};
    use crate::sync::witness::MmuLock;

    #[test]
    fn dropping_the_tdp_mmu_frees_every_table_and_root() {
        let rcu = Arc::new(Rcu::new());
        let lock = MmuLock::new();
        let tdp = TdpMmu::new(1, Arc::clone(&rcu));
        let counters = Arc::clone(&tdp.inner.counters);
        let root = {
            let mmu = lock.read();
            let root = tdp.get_root(AsId::new(0), mmu.witness());
            let guard = rcu.pin();
            for g in (0..600).chain([1 << 20]) {
                let req = MapRequest {
                    gfn: Gfn::new(g),
                    pfn: Pfn::new(g),
                    level: Level::L4K,
                    host_writable: true,
                    write_fault: false,
                    prefetch: false,
                };
                assert_eq!(
                    tdp.map(&root, &req, mmu.witness(), &guard),
                    FaultOutcome::Fixed
                );
            }
            root
        };
        drop(tdp);
        assert!(
            root.is_invalid(),
            "dropping the TdpMmu invalidates its roots"
        );
        drop(root);
        rcu.synchronize();
        let s = counters.snapshot();
        assert!(s.tables_allocated >= 7, "{s:?}");
        assert_eq!(s.tables_allocated, s.tables_freed, "{s:?}");
        assert_eq!((s.roots_allocated, s.roots_freed), (1, 1));
        assert_eq!(s.leaves_zapped, 601);
    }
}
