//! Lockless lookups: the simulated CPU's page walk (`hardware_walk` under an RCU guard, and
//! `guest_walk`, a vCPU's walk in guest mode, which holds nothing: G1 in docs/locking.md) and the
//! oracle lookup (`leaf`, RCU, P1). Every SPTE is loaded with `Acquire` (spte.rs O1).

use crate::addr::{AsId, Gfn, Level};
use crate::mmu::spte::{Spte, SpteKind};
use crate::mmu::types::{HwWalk, access_leaf};
use crate::sync::atomic::Ordering;
use crate::sync::rcu::RcuGuard;

use super::table::{GFN_LIMIT, ROOT_LEVEL, TablePtr};
use super::{RootRef, TdpMmu};

/// The owner word (G3) beside the entry `sptep`, which the caller read as the entry for `gfn` at
/// `level`: found by walking from the root table `root` down to `level`. `None` if the walk does
/// not arrive at `sptep` itself (the tree changed since the caller read it), so a caller never
/// records or reads the word of another table's entry.
///
/// # Safety
/// As [`find_leaf`]: `root` is a root table valid for `'g`, and the tables below it are reached
/// under the RCU guard `'g` (P1, P4).
pub(super) unsafe fn owner_word<'g>(
    root: TablePtr,
    gfn: u64,
    level: Level,
    sptep: &crate::mmu::spte::AtomicSpte,
    _rcu: &'g RcuGuard<'_>,
) -> Option<&'g crate::sync::atomic::AtomicU64> {
    let mut table = root;
    let mut l = ROOT_LEVEL;
    loop {
        // SAFETY: the root table (this function's contract) or a table read from a present
        // non-leaf SPTE under `_rcu` (P1).
        let entry = unsafe { table.get::<'g>() }.entry(gfn, l);
        if l == level {
            // SAFETY: as the entry above.
            let owners = unsafe { table.owners::<'g>() };
            return core::ptr::eq(entry, sptep).then(|| owners.at(crate::geometry::index(gfn, l)));
        }
        // ORDERING: O1 — followed into the child table.
        let spte = entry.load(Ordering::Acquire);
        if spte.kind(l) != SpteKind::Table {
            return None;
        }
        table = TablePtr::from_spte(spte);
        l = l.down()?;
    }
}

/// Walks the tree under `table` to the leaf for `gfn`; returns the leaf slot's value and level,
/// or `None` at the first entry that is not present (FROZEN included).
///
/// # Safety
/// `table` must be a root table valid for `'g` (the caller holds a reference to its root, or
/// found it under the RCU guard `'g`; P4).
pub(super) unsafe fn find_leaf<'g>(
    table: TablePtr,
    gfn: u64,
    _rcu: &'g RcuGuard<'_>,
) -> Option<(&'g crate::mmu::spte::AtomicSpte, Spte, Level)> {
    if gfn >= GFN_LIMIT {
        return None;
    }
    let mut table = table;
    let mut level = ROOT_LEVEL;
    loop {
        // SAFETY: `table` is the root table (this function's contract) or was read from a present
        // non-leaf SPTE while `_rcu` is pinned, so P1 keeps it allocated for 'g.
        let sptep = unsafe { table.get::<'g>() }.entry(gfn, level);
        // ORDERING: O1 — the value may be followed into a child table.
        let spte = sptep.load(Ordering::Acquire);
        match spte.kind(level) {
            SpteKind::Leaf => return Some((sptep, spte, level)),
            SpteKind::Table => {
                table = TablePtr::from_spte(spte);
                level = level
                    .down()
                    .expect("a 4K SPTE is never a table (is_leaf holds at 4K)");
            }
            SpteKind::NonPresent | SpteKind::Frozen => return None,
        }
    }
}

impl TdpMmu {
    /// The simulated CPU's page walk of `root` for `gfn`.
    ///
    /// On a present leaf that allows the access it sets A, and D if `write`, unless already set,
    /// with a compare-and-swap on the value it checked (spte.rs O5: A/D never lands on a value
    /// that stopped being a present leaf), re-evaluating on a lost race. A walk of an invalid root
    /// is allowed: a vCPU keeps using its root until it reloads.
    pub fn hardware_walk(
        &self,
        root: &RootRef,
        gfn: Gfn,
        write: bool,
        rcu: &RcuGuard<'_>,
    ) -> HwWalk {
        self.assert_walkable(root, rcu, "hardware_walk");
        // SAFETY: we hold a reference to `root`, so its table is allocated (P4).
        let Some((sptep, spte, level)) = (unsafe { find_leaf(root.table(), gfn.raw(), rcu) })
        else {
            return HwWalk::NotPresent;
        };
        access_leaf(sptep, spte, level, gfn.raw(), write)
    }

    /// A vCPU's page walk in guest mode (`hardware_walk` without any guard): returns what
    /// [`TdpMmu::hardware_walk`] returns and, on a hit, the host page the frame must back according
    /// to the owner word recorded when the leaf was installed (`None` if the leaf has no recorded
    /// owner; the caller then checks the memslots instead, G3).
    ///
    /// # Safety
    /// The caller is a vCPU in guest mode that acknowledges remote TLB flushes only between two
    /// accesses, and this walk is inside one access: every path that unlinks a table flushes remote
    /// TLBs, waiting for that acknowledgement, before the table can be freed (G1, G2 in
    /// docs/locking.md), so every table this walk reaches stays allocated until it returns.
    /// `root` must belong to this `TdpMmu`.
    #[inline]
    pub unsafe fn guest_walk(
        &self,
        root: &RootRef,
        gfn: Gfn,
        write: bool,
    ) -> (HwWalk, Option<u64>) {
        debug_assert!(root.belongs_to(self), "guest_walk: foreign root");
        let gfn = gfn.raw();
        if gfn >= GFN_LIMIT {
            return (HwWalk::NotPresent, None);
        }
        // The root table: we hold a reference to `root` (P4).
        let mut table = root.table();
        let mut level = ROOT_LEVEL;
        loop {
            let i = crate::geometry::index(gfn, level);
            // SAFETY: the root table (P4), or a table read from a present non-leaf SPTE during
            // this access, which G1 keeps allocated until the vCPU's next acknowledgement, after
            // this function returns (this function's contract).
            let sptep = unsafe { table.get::<'_>() }.at(i);
            // ORDERING: O1 — the value may be followed into a child table, and a leaf's Acquire
            // orders its install's owner-word store before our read of it (G3).
            let spte = sptep.load(Ordering::Acquire);
            #[cfg(feature = "broken-free-before-flush-ack")]
            assert!(
                spte != super::table::POISON,
                "kvmmu: a vCPU in guest mode walked a freed page-table page (G1 violated)"
            );
            match spte.kind(level) {
                SpteKind::Leaf => {
                    let hit = access_leaf(sptep, spte, level, gfn, write);
                    let HwWalk::Hit { pfn, level, .. } = hit else {
                        return (hit, None);
                    };
                    let base_pfn = pfn.raw() - (gfn - crate::geometry::align_down(gfn, level));
                    // SAFETY: as the entry above.
                    let owners = unsafe { table.owners::<'_>() };
                    // ORDERING: Relaxed: the leaf's Acquire load above (or access_leaf's, on a
                    // lost A/D race) makes the owner store of the install that wrote that leaf
                    // visible; a later install's word is told apart by its pfn bits (G3).
                    let word = owners.at(i).load(Ordering::Relaxed);
                    return (
                        hit,
                        crate::mmu::owner::expected_host_page(word, base_pfn, pfn.raw()),
                    );
                }
                SpteKind::Table => {
                    #[cfg(feature = "test-hooks")]
                    super::hooks::maybe_yield_in_walk();
                    table = TablePtr::from_spte(spte);
                    level = level
                        .down()
                        .expect("a 4K SPTE is never a table (is_leaf holds at 4K)");
                }
                SpteKind::NonPresent | SpteKind::Frozen => return (HwWalk::NotPresent, None),
            }
        }
    }

    /// The present leaf mapping `gfn` in the valid root of `as_id`, with its level (for test
    /// oracles and debugging). Reads only.
    pub fn leaf(&self, as_id: AsId, gfn: Gfn, rcu: &RcuGuard<'_>) -> Option<(Spte, Level)> {
        self.assert_rcu_domain(rcu);
        let root = self.inner.valid_root(as_id)?;
        // SAFETY: found through the valid-root slot under `rcu`, so the root and its table stay
        // allocated while `rcu` is pinned (P4).
        let table = unsafe { root.get() }.table;
        // SAFETY: as above (P4).
        let (_, spte, level) = unsafe { find_leaf(table, gfn.raw(), rcu) }?;
        Some((spte, level))
    }

    /// Panics unless `rcu` pins this TDP MMU's own RCU domain: its page tables are retired through
    /// that domain only, so walking them under another domain's guard could read freed memory.
    /// A pointer comparison; the public entry points that read tables call it.
    #[inline]
    pub(super) fn assert_rcu_domain(&self, rcu: &RcuGuard<'_>) {
        assert!(
            rcu.pins(&self.inner.rcu),
            "kvmmu: a TDP MMU was walked under an RcuGuard of another RCU domain (use `TdpMmu::rcu()`)"
        );
    }

    /// Asserts that `root` is one of this MMU's and `rcu` pins its RCU domain
    /// ([`TdpMmu::assert_rcu_domain`]): the preconditions of a lock-free walk, checked by the
    /// public entry point `caller`.
    #[inline]
    pub(super) fn assert_walkable(&self, root: &RootRef, rcu: &RcuGuard<'_>, caller: &str) {
        assert!(
            root.belongs_to(self),
            "{caller}: the root belongs to another TdpMmu"
        );
        self.assert_rcu_domain(rcu);
    }
}
