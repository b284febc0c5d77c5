//! [`ShadowMmu`]: its state, statistics and roots (`mmu_alloc_direct_roots`, `root_count`). The map
//! step is in `fault.rs`, zaps in `zap.rs`, aging in `age.rs`, walks in `walk.rs`; the protocol
//! (S1–S7) is in the parent module's documentation.

use core::fmt;
use std::collections::{BTreeMap, HashMap};

use crate::addr::{AsId, Gfn, Level};
use crate::geometry::ROOT_LEVEL;
use crate::sync::atomic::{AtomicU64, Ordering, fence};
use crate::sync::percpu::StripedCounter;
use crate::sync::witness::{LockBinding, LockId, MmuLock, MmuWrite};
use crate::sync::{Arc, Mutex};

use super::page::{Role, ShadowPage, SpPtr};
use super::rmap::{RmapHead, RmapStats, RmapStatsSnapshot};

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
    /// Rmaps zapped because they grew past [`RMAP_RECYCLE_THRESHOLD`](super::rmap::RMAP_RECYCLE_THRESHOLD).
    pub rmap_recycles: u64,
    /// SPTEs read by lockless rmap aging.
    pub aged_sptes_lockless: u64,
    /// SPTEs read by rmap aging under `mmu_lock` write.
    pub aged_sptes_locked: u64,
    /// Accessed bits cleared by rmap aging.
    pub accessed_cleared: u64,
    /// `indirect_shadow_pages`: live indirect pages (EPT02 pages shadowing L1's EPT12 tables).
    pub indirect_shadow_pages: u64,
    /// Faults of L2 vCPUs that reached the map step of indirect pages.
    pub nested_faults: u64,
    /// Shadow entries zapped because L1 wrote the guest table they shadow (`mmu_pte_write`).
    pub mmu_pte_write: u64,
    /// Indirect pages zapped because L1 wrote their table too often (`mmu_flooded`).
    pub mmu_flooded: u64,
    /// L1 gfns write-tracked now (guest tables shadowed by at least one indirect page).
    pub write_tracked_gfns: u64,
    /// Aging calls (age or test) that walked the shadow MMU's rmaps: with the TDP MMU, only while
    /// indirect pages exist (spec §3.8, `kvm_may_have_shadow_mmu_sptes`).
    pub rmap_age_walks: u64,
    /// KVM's `max_mmu_rmap_size`: the longest rmap a leaf insertion found (the entries before it).
    pub max_mmu_rmap_size: u64,
    /// Rmap descriptor and bit-lock counters.
    pub rmap: RmapStatsSnapshot,
}

/// Statistics, each striped ([`StripedCounter`]) so that lockless aging and faults on different
/// CPUs do not share a cache line (issue 9 item 7).
#[derive(Default)]
pub(super) struct Counters {
    pub(super) faults: StripedCounter,
    pub(super) pages_allocated: StripedCounter,
    pub(super) pages_freed: StripedCounter,
    pub(super) roots_allocated: StripedCounter,
    pub(super) roots_freed: StripedCounter,
    pub(super) leaves_installed: StripedCounter,
    pub(super) leaves_zapped: StripedCounter,
    pub(super) dirty_leaves_zapped: StripedCounter,
    pub(super) rmap_recycles: StripedCounter,
    pub(super) aged_sptes_lockless: StripedCounter,
    pub(super) aged_sptes_locked: StripedCounter,
    pub(super) accessed_cleared: StripedCounter,
    pub(super) nested_faults: StripedCounter,
    pub(super) mmu_pte_write: StripedCounter,
    pub(super) mmu_flooded: StripedCounter,
    pub(super) rmap_age_walks: StripedCounter,
}

#[inline]
pub(super) fn add(c: &StripedCounter, n: u64) {
    c.add_nonzero(n);
}

/// State changed only under `mmu_lock` write (S5). The mutex is therefore never contended; it
/// exists so that the type system, not a comment, keeps the state exclusive.
pub(super) struct State {
    /// `mmu_page_hash`: every live, valid shadow page by (gfn, role); roots included.
    pub(super) hash: HashMap<(u64, Role), SpPtr>,
    /// The valid root of each address space.
    pub(super) roots: Vec<Option<SpPtr>>,
}

pub(super) struct Inner {
    /// The VM's `mmu_lock`, the only one whose witnesses this MMU accepts.
    pub(super) lock: LockBinding,
    pub(super) state: Mutex<State>,
    pub(super) counters: Counters,
    pub(super) rmap_stats: RmapStats,
    /// Present leaves per level (`mmu/hugepage.rs`).
    pub(super) pages: crate::mmu::hugepage::PageCounts,
    /// `kvm->arch.indirect_shadow_pages`: written under `mmu_lock` write, read locklessly.
    pub(super) indirect_shadow_pages: AtomicU64,
    /// The format of the leaves this MMU builds (set once, before the MMU is shared).
    pub(super) ad_bits: crate::mmu::spte::AdBits,
    /// Write tracking (`page_track.c`, `gfn_write_track`): L1 gfn → indirect pages shadowing it.
    /// Changed under `mmu_lock` write (with the page it counts); read under `mmu_lock` (either
    /// mode) by faults that must not map a tracked gfn writable (nested N2).
    pub(super) write_track: Mutex<BTreeMap<u64, u32>>,
    /// The number of keys in `write_track`: lets L1 faults skip the map lookup when nothing is
    /// tracked.
    pub(super) write_tracked: AtomicU64,
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
    pub(super) inner: Arc<Inner>,
    pub(super) sp: SpPtr,
}

impl ShadowRoot {
    #[inline]
    pub(super) fn page(&self) -> &ShadowPage {
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
    pub(super) fn belongs_to(&self, mmu: &ShadowMmu) -> bool {
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
    pub(super) inner: Arc<Inner>,
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

impl ShadowMmu {
    /// A shadow MMU for `address_spaces` address spaces.
    pub fn new(address_spaces: usize) -> ShadowMmu {
        ShadowMmu {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    hash: HashMap::new(),
                    roots: vec![None; address_spaces],
                }),
                lock: LockBinding::unbound(),
                counters: Counters::default(),
                rmap_stats: RmapStats::new(),
                pages: Default::default(),
                indirect_shadow_pages: AtomicU64::new(0),
                ad_bits: crate::mmu::spte::AdBits::Enabled,
                write_track: Mutex::new(BTreeMap::new()),
                write_tracked: AtomicU64::new(0),
            }),
        }
    }

    /// This MMU, building its leaves in the `ad` format (`VmConfig::ad_bits`).
    ///
    /// # Panics
    /// If the MMU is already shared (a root exists).
    pub fn with_ad_bits(mut self, ad: crate::mmu::spte::AdBits) -> ShadowMmu {
        Arc::get_mut(&mut self.inner)
            .expect("with_ad_bits: the ShadowMmu is already shared")
            .ad_bits = ad;
        self
    }

    /// The format of the leaves this MMU builds.
    pub fn ad_bits(&self) -> crate::mmu::spte::AdBits {
        self.inner.ad_bits
    }

    /// Binds this MMU (and its rmaps' statistics, which every rmap writer presents) to `lock`:
    /// from now on every entry point refuses a witness of another lock.
    ///
    /// # Panics
    /// If the MMU already trusts another lock.
    pub fn bind_lock(&self, lock: &MmuLock) {
        self.check_lock(lock.id());
        self.inner.rmap_stats.bind_lock(lock);
    }

    /// Panics unless `id` is the lock this MMU trusts (binding it on first use).
    #[inline]
    pub(super) fn check_lock(&self, id: LockId) {
        self.inner.lock.check(id, "the ShadowMmu");
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

    /// Present leaves per level (`pages_4k`, `pages_2m`, `pages_1g`).
    pub fn page_stats(&self) -> crate::mmu::PageStats {
        self.inner.pages.snapshot()
    }

    /// Statistics.
    pub fn stats(&self) -> ShadowStats {
        let c = &self.inner.counters;
        // A snapshot need not be consistent across counters.
        let r = |c: &StripedCounter| c.sum();
        let rmap = self.inner.rmap_stats.snapshot();
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
            nested_faults: r(&c.nested_faults),
            mmu_pte_write: r(&c.mmu_pte_write),
            mmu_flooded: r(&c.mmu_flooded),
            write_tracked_gfns: self.write_tracked_gfns(),
            rmap_age_walks: r(&c.rmap_age_walks),
            max_mmu_rmap_size: rmap.max_rmap_size,
            rmap,
        }
    }

    /// Allocates a page and enters it in the hash (`kvm_mmu_alloc_shadow_page`). Caller holds
    /// `mmu_lock` write (the `state` guard stands for it).
    pub(super) fn alloc_page(
        &self,
        state: &mut State,
        gfn: u64,
        role: Role,
        root_count: usize,
    ) -> SpPtr {
        let sp = SpPtr::alloc(gfn, role, root_count);
        state.hash.insert((gfn, role), sp);
        add(&self.inner.counters.pages_allocated, 1);
        if !role.direct {
            // ORDERING: written under `mmu_lock` write; read as a hint (spec §3.8).
            self.inner
                .indirect_shadow_pages
                .fetch_add(1, Ordering::Relaxed);
            self.track_gfn(gfn, true);
        }
        sp
    }

    /// Adds (`add`) or drops one write-tracking reference on L1 gfn `gfn`
    /// (`__kvm_write_track_add_gfn` / `_remove_gfn`); under `mmu_lock` write.
    pub(super) fn track_gfn(&self, gfn: u64, add: bool) {
        let mut t = self.inner.write_track.lock();
        let n = t.entry(gfn).or_insert(0);
        if add {
            *n += 1;
        } else {
            *n = n.saturating_sub(1);
        }
        if *n == 0 {
            t.remove(&gfn);
        }
        // ORDERING: Relaxed: a hint read under `mmu_lock`, which orders it with this update.
        self.inner
            .write_tracked
            .store(t.len() as u64, Ordering::Relaxed);
    }

    /// Counts one aging call that walks the rmaps (the dispatcher's, spec §3.8).
    #[inline]
    pub(crate) fn note_rmap_age_walk(&self) {
        add(&self.inner.counters.rmap_age_walks, 1);
    }

    /// The number of write-tracked L1 gfns.
    #[inline]
    pub fn write_tracked_gfns(&self) -> u64 {
        // ORDERING: see `track_gfn`.
        self.inner.write_tracked.load(Ordering::Relaxed)
    }

    /// True if any L1 gfn in `[start, end)` is write-tracked (`kvm_gfn_is_write_tracked`; over a
    /// range, it is the huge-page check `disallow_lpage` answers in KVM). Meaningful under
    /// `mmu_lock` (either mode): tracking changes only under `mmu_lock` write.
    pub fn write_tracked_in(&self, start: u64, end: u64) -> bool {
        if self.write_tracked_gfns() == 0 || start >= end {
            return false;
        }
        self.inner
            .write_track
            .lock()
            .range(start..end)
            .next()
            .is_some()
    }

    /// A reference to the valid root of `as_id`, allocating it if needed
    /// (`mmu_alloc_direct_roots`, under `mmu_lock` write). A new root starts with count 2: the
    /// caller's and the MMU's own (S3).
    ///
    /// # Panics
    /// If `as_id` is beyond the address spaces given to [`ShadowMmu::new`] (a VM-layer bug).
    pub fn get_root(&self, as_id: AsId, mmu: &MmuWrite) -> ShadowRoot {
        self.check_lock(mmu.lock_id());
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
