//! The fault path's map step (`kvm_tdp_mmu_map`, spec §3.4 step 7), under `mmu_lock` read.
//!
//! Walk from the root to the target level (`req.level`, at most 1G; `mmu/hugepage.rs`); link every
//! missing table with a `Release` CAS (P2) — a lost CAS frees the never-published table and
//! retries; FROZEN anywhere retries (P7); a table at the
//! target level lowers the target; a huge leaf above the target is split in place (P8). At the target, a present leaf that already allows the access
//! is spurious, otherwise the new leaf is installed with one CAS from the value read (P3).

use super::split::split_huge_spte_owned;
use crate::addr::Level;
use crate::mmu::hugepage::{leaf_pfn, max_leaf_level};
use crate::mmu::spte::{LeafAttrs, Spte, SpteKind, make_spte_ad, resolve_access_tracked};
use crate::sync::atomic::Ordering;
use crate::sync::rcu::RcuGuard;
use crate::sync::witness::MmuRead;

use super::table::{GFN_LIMIT, ROOT_LEVEL, TablePtr};
use super::{Counters, RootRef, TdpMmu};
use crate::geometry::index as sptep_index;
use crate::mmu::types::{FaultOutcome, MapRequest, RetryReason};

impl TdpMmu {
    /// Resolves one fault by installing a leaf of at most `req.level` for `req.gfn` → `req.pfn` in `root`
    /// (`kvm_tdp_mmu_map`). Returns [`FaultOutcome::Retry`] when the root is invalid, a CAS was
    /// lost or an SPTE on the path is frozen; nothing is left half-done in those cases. A table
    /// linked before a lost leaf CAS stays linked (it is valid and empty, as in the kernel).
    ///
    /// A write fault on a frame whose host mapping is read-only (`host_writable == false`) installs
    /// a read-only leaf (the kernel's `RET_PF_WRITE_PROTECTED` case): the caller must resolve the
    /// host write fault first, or the vCPU's write keeps missing.
    ///
    /// # Panics
    /// If the gfn is already mapped to a different pfn (spec §4 item 13: the notifier must zap
    /// first; a bug in the caller's invalidation protocol), if `root` belongs to another
    /// `TdpMmu`, if `mmu` is a witness of another `mmu_lock` or `_rcu` pins another RCU domain.
    pub fn map(
        &self,
        root: &RootRef,
        req: &MapRequest,
        mmu: &MmuRead,
        _rcu: &RcuGuard<'_>,
    ) -> FaultOutcome {
        self.map_owned(root, req, None, mmu, _rcu)
    }

    /// [`TdpMmu::map`], recording beside the installed leaf that `req.pfn` backs host page
    /// `host_page` (`hva >> 12`): the owner a vCPU's guest-mode walk checks the frame against
    /// instead of the memslots (G3 in docs/locking.md). `None` records "unknown".
    ///
    /// # Panics
    /// As [`TdpMmu::map`].
    pub fn map_owned(
        &self,
        root: &RootRef,
        req: &MapRequest,
        host_page: Option<u64>,
        mmu: &MmuRead,
        _rcu: &RcuGuard<'_>,
    ) -> FaultOutcome {
        self.assert_rcu_domain(_rcu);
        self.map_locked(root, req, host_page, mmu)
    }

    /// [`TdpMmu::map_owned`] without an RCU pin: the fault path's entry (`Mmu::map`). The walk
    /// needs none, because `mmu` proves `mmu_lock` is held (read) for the whole call and a table
    /// link is removed only under `mmu_lock` write (P2), so every table reached from `root`
    /// (which the caller holds a reference to, P4) stays linked, hence allocated, until `mmu` is
    /// released (docs/locking.md "Fault path without an RCU pin", F1). A pin costs a `SeqCst`
    /// fence per fault.
    ///
    /// # Panics
    /// As [`TdpMmu::map`].
    pub fn map_locked(
        &self,
        root: &RootRef,
        req: &MapRequest,
        host_page: Option<u64>,
        mmu: &MmuRead,
    ) -> FaultOutcome {
        self.map_locked_leaf(root, req, host_page, mmu).0
    }

    /// [`TdpMmu::map_locked`], also returning, when the outcome is [`FaultOutcome::Fixed`], the
    /// leaf this call installed and its level: the value of its winning CAS, which the faulting
    /// vCPU may cache in its TLB before it re-enters guest mode (docs/locking.md F2). `None` for
    /// every other outcome.
    ///
    /// # Panics
    /// As [`TdpMmu::map`].
    pub fn map_locked_leaf(
        &self,
        root: &RootRef,
        req: &MapRequest,
        host_page: Option<u64>,
        mmu: &MmuRead,
    ) -> (FaultOutcome, Option<(Spte, Level)>) {
        self.check_lock(mmu.lock_id());
        assert!(
            root.belongs_to(self),
            "map: the root belongs to another TdpMmu"
        );
        // ORDERING: `invalid` is written under `mmu_lock` write and we hold it for read (P5).
        if root.root().invalid.load(Ordering::Relaxed) {
            return (FaultOutcome::Retry(RetryReason::InvalidRoot), None);
        }
        let gfn = req.gfn.raw();
        if gfn >= GFN_LIMIT {
            return (FaultOutcome::OutOfRange, None);
        }
        let counters: &Counters = &self.inner.counters;
        let mut target = req.level.min(max_leaf_level());
        let mut table = root.table();
        let mut level = ROOT_LEVEL;
        // Walk down to the target level; a huge leaf above it is split, a table at the target
        // level lowers the target.
        let (leaf_table, sptep, old) = loop {
            // Why `table` is allocated: it is the root table of a root we hold a reference to
            // (P4), or a table read from a present non-leaf SPTE while `mmu` (this MMU's
            // mmu_lock, read) is held; links are removed only under mmu_lock write (P2), so it
            // stays linked, hence allocated (P1), until `mmu` is released (F1).
            // SAFETY: allocated for the whole call, as argued just above (P1, P2, P4, F1).
            let t = unsafe { table.get() };
            let sptep = t.entry(gfn, level);
            // ORDERING: O1 — we may follow the pointer into the child table.
            let mut old = sptep.load(Ordering::Acquire);
            let mut kind = old.kind(level);
            if kind == SpteKind::Frozen {
                return (FaultOutcome::Retry(RetryReason::Frozen), None);
            }
            if kind == SpteKind::Leaf && level > target {
                // A huge leaf where the fault wants a smaller one (dirty logging): split it in
                // place (P8) and continue into the new table, as `kvm_tdp_mmu_map` does. The
                // children get the huge leaf's claim for their frames (G4), read beside it after
                // the Acquire load above.
                // SAFETY: `t`'s allocation, as argued above (P1, P2, P4, F1).
                let owner = unsafe { table.owners() }.at(sptep_index(gfn, level));
                if split_huge_spte_owned(sptep, Some(owner), old, level, counters).is_err() {
                    Counters::add(&counters.cas_retries, 1);
                    return (FaultOutcome::Retry(RetryReason::CasLost), None);
                }
                // ORDERING: O1, as above.
                old = sptep.load(Ordering::Acquire);
                kind = old.kind(level);
            }
            if level == target || kind == SpteKind::Leaf {
                if kind != SpteKind::Table {
                    target = level;
                    break (table, sptep, old);
                }
                // A table where the huge leaf would go: serve the fault below it.
                target = level.down().unwrap_or(Level::L4K);
            }
            let Some(child_level) = level.down() else {
                unreachable!("a 4K SPTE is never a table (is_leaf holds at 4K)")
            };
            table = match kind {
                SpteKind::Table => TablePtr::from_spte(old),
                _ => {
                    let child = TablePtr::alloc();
                    Counters::add(&counters.tables_allocated, 1);
                    // ORDERING: O2 — Release publishes the child's initialised entries; Acquire
                    // on failure is not needed since we do not follow the value we lost to.
                    #[cfg(feature = "test-hooks")]
                    let forced = super::hooks::force_cas_failure();
                    #[cfg(not(feature = "test-hooks"))]
                    let forced = false;
                    let linked = if forced {
                        Err(old)
                    } else {
                        sptep.compare_exchange(
                            old,
                            child.to_spte(),
                            Ordering::Release,
                            Ordering::Relaxed,
                        )
                    };
                    match linked {
                        Ok(_) => child,
                        Err(_) => {
                            // SAFETY: the CAS failed, so `child` was never published (P1).
                            unsafe { child.free() };
                            Counters::add(&counters.tables_freed, 1);
                            Counters::add(&counters.cas_retries, 1);
                            return (FaultOutcome::Retry(RetryReason::CasLost), None);
                        }
                    }
                }
            };
            level = child_level;
        };
        let level = target;
        let pfn = leaf_pfn(gfn, req.pfn, level);
        match old.kind(level) {
            SpteKind::Leaf => {
                assert_eq!(
                    old.pfn(),
                    pfn,
                    "gfn {gfn:#x} is mapped to another pfn: a present leaf may not change pfn (spec §4 item 13)"
                );
                // A leaf marked for access tracking allows no access: it is restored below.
                if !old.is_access_tracked() && (!req.write_fault || old.is_writable()) {
                    return (FaultOutcome::Spurious, None);
                }
            }
            SpteKind::NonPresent => {}
            SpteKind::Table | SpteKind::Frozen => {
                unreachable!("the walk stops only at a leaf or a non-present SPTE")
            }
        }
        let attrs = LeafAttrs {
            host_writable: req.host_writable,
            write_allowed: req.write_fault,
            prefetch: req.prefetch,
        };
        let mut new = counters
            .pages
            .nx_adjust(make_spte_ad(pfn, level, attrs, self.inner.ad_bits), level);
        if old.is_access_tracked() {
            new = resolve_access_tracked(old, new);
        }
        if new == old {
            return (FaultOutcome::Spurious, None);
        }
        // The owner word beside the leaf, written before the install CAS (G3).
        // (A block whose host pages would start below 0 cannot be aligned as the caller
        // checked; it records "unknown" rather than a wrapped page.)
        let offset = gfn - crate::geometry::align_down(gfn, level);
        let owner = crate::mmu::owner::for_leaf(host_page, offset, pfn.raw());
        // SAFETY: as the walk above: the table holding `sptep` is a root table we hold a
        // reference to or was reached while `mmu` is held (P1, P2, P4; F1).
        let owners = unsafe { leaf_table.owners() };
        // ORDERING: Relaxed: published by the install CAS's Release below, which a walker's
        // Acquire load of the leaf pairs with (G3). A lost CAS leaves our word beside the winner's
        // leaf: a racing fault maps the same gfn to the same frame (P3) and host page, or its
        // pfn bits differ and the walker falls back to the memslots.
        owners
            .at(sptep_index(gfn, level))
            .store(owner, Ordering::Relaxed);
        // ORDERING: Release, so a walker that Acquire-loads the leaf sees everything this thread
        // saw before installing it (e.g. the host's initialisation of the frame, via GUP).
        #[cfg(feature = "test-hooks")]
        super::hooks::maybe_yield();
        #[cfg(feature = "test-hooks")]
        let forced = super::hooks::force_cas_failure();
        #[cfg(not(feature = "test-hooks"))]
        let forced = false;
        let installed = if forced {
            Err(old)
        } else {
            sptep.compare_exchange(old, new, Ordering::Release, Ordering::Relaxed)
        };
        match installed {
            Ok(_) => {
                // One striped add per install: `leaves_installed` is derived from these two
                // (`Counters::leaves_installed`).
                if old.is_shadow_present() {
                    Counters::add(&counters.reinstalled, 1);
                } else {
                    counters.pages.install(level);
                }
                (FaultOutcome::Fixed, Some((new, level)))
            }
            Err(_) => {
                Counters::add(&counters.cas_retries, 1);
                (FaultOutcome::Retry(RetryReason::CasLost), None)
            }
        }
    }
}
