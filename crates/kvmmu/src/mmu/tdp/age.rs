//! Lockless aging (`kvm_tdp_mmu_age_gfn_range` / `kvm_tdp_mmu_test_age_gfn`, spec §3.8), and
//! clearing Dirty for dirty logging (`clear_dirty_gfn_range`).
//!
//! Aging holds only an RCU guard: no `mmu_lock`, no reference on the root (P4), no yield, no TLB
//! flush. It visits the present leaves of the valid root of one address space and clears Accessed
//! with one `fetch_and(!A)` where A is set (spte.rs O4), so it never changes a table pointer, bit
//! 11 or the pfn, and can never lose a concurrent Dirty or Writable update (spec items 14–20).
//! [`TdpMmu::age_gfn_range_report`] is the same walk, also reporting the gfns of every young leaf
//! (for a per-page aging answer); the plain walk passes a no-op reporter that compiles away.

use crate::addr::{AsId, Gfn, GfnRange};
use crate::mmu::spte::{ACCESSED_MASK, AtomicSpte, DIRTY_MASK, MMU_PRESENT_MASK};
use crate::sync::atomic::Ordering;
use crate::sync::rcu::RcuGuard;
use crate::sync::witness::MmuRead;

use super::iter::TdpIter;
use super::table::{ENTRIES, GFN_LIMIT, Table};
use super::{Counters, TdpMmu};

/// What to do with each present leaf whose `mask` bit is set.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Return at the first one.
    Test,
    /// Clear the bit with one atomic AND.
    Clear,
}

impl TdpMmu {
    /// Clears Accessed on every present leaf of `as_id`'s valid root in `range` where it is set;
    /// returns true if any was set (`kvm_age_gfn`). Invalid roots are not aged (spec item 20).
    /// Needs no `mmu_lock`; the caller may hold it (locked aging mode).
    pub fn age_gfn_range(&self, as_id: AsId, range: GfnRange, rcu: &RcuGuard<'_>) -> bool {
        self.age_gfn_range_report(as_id, range, rcu, |_| {})
    }

    /// [`TdpMmu::age_gfn_range`], also calling `young` with the gfns (clipped to `range`) of every
    /// leaf found with Accessed set, once per leaf; the result is true iff `young` was called.
    #[inline]
    pub fn age_gfn_range_report(
        &self,
        as_id: AsId,
        range: GfnRange,
        rcu: &RcuGuard<'_>,
        young: impl FnMut(GfnRange),
    ) -> bool {
        let (observed, cleared) =
            self.walk_leaves(as_id, range, ACCESSED_MASK, Action::Clear, rcu, young);
        Counters::add(&self.inner.counters.accessed_cleared, cleared);
        observed != 0
    }

    /// True if some present leaf of `as_id`'s valid root in `range` has Accessed set
    /// (`kvm_test_age_gfn`). Modifies nothing and returns at the first young leaf.
    pub fn test_age_gfn_range(&self, as_id: AsId, range: GfnRange, rcu: &RcuGuard<'_>) -> bool {
        self.walk_leaves(as_id, range, ACCESSED_MASK, Action::Test, rcu, |_| {})
            .0
            != 0
    }

    /// Clears Dirty on the present leaves of `as_id`'s valid root in `range` (the D-bit flavour of
    /// `kvm_tdp_mmu_clear_dirty_slot`, for dirty logging); returns true if any was dirty. Runs
    /// under `mmu_lock` read: one atomic AND per dirty leaf, so a racing CPU D-bit set either
    /// lands before (and is harvested) or after (and stays).
    pub fn clear_dirty_gfn_range(
        &self,
        as_id: AsId,
        range: GfnRange,
        mmu: &MmuRead,
        rcu: &RcuGuard<'_>,
    ) -> bool {
        self.check_lock(mmu.lock_id());
        self.walk_leaves(as_id, range, DIRTY_MASK, Action::Clear, rcu, |_| {})
            .0
            != 0
    }

    /// Visits the present leaves with `mask` set; returns how many were observed with it (at most
    /// 1 for [`Action::Test`]) and how many of those this call cleared itself. With
    /// [`Action::Clear`], `report` gets the gfns (clipped to `range`) of each observed leaf.
    fn walk_leaves(
        &self,
        as_id: AsId,
        range: GfnRange,
        mask: u64,
        action: Action,
        rcu: &RcuGuard<'_>,
        mut report: impl FnMut(GfnRange),
    ) -> (u64, u64) {
        self.assert_rcu_domain(rcu);
        let start = range.start().raw();
        let end = range.end().raw().min(GFN_LIMIT);
        if start >= end {
            return (0, 0);
        }
        let Some(root) = self.inner.valid_root(as_id) else {
            return (0, 0);
        };
        // SAFETY: found through the valid-root slot under `rcu` (P4).
        let root = unsafe { root.get() };
        // ORDERING: a stale "valid" only means aging a root that was just invalidated, which is
        // harmless (spec item 18 tolerates it); the kernel has the same window.
        if root.invalid.load(Ordering::Relaxed) {
            return (0, 0);
        }
        let (mut observed, mut cleared) = (0, 0);
        // SAFETY: the root table stays allocated while `rcu` is pinned (P4).
        let mut it = unsafe { TdpIter::new(root.table, start, end, rcu) };
        while it.valid() {
            // Fast path (perf-anchors §7 item 1, 4): a table of 4K leaves is scanned in one tight
            // loop over the part of it inside the range, then skipped as a whole.
            if let Some(table) = it.leaf_table() {
                let base = it.gfn();
                // The iterator only visits entries whose span intersects [start, end), so both
                // bounds fall inside this table's 0..=ENTRIES.
                let lo = (start.max(base) - base) as usize;
                let hi = (end.min(base + ENTRIES as u64) - base) as usize;
                let (o, c) = scan_leaf_table(table, lo, hi, mask, action, |i| {
                    report_gfns(&mut report, base + i as u64, 1, start, end);
                });
                observed += o;
                cleared += c;
                if action == Action::Test && o != 0 {
                    return (1, 0);
                }
                it.skip_span();
                continue;
            }
            let old = it.old();
            if old.is_present_leaf(it.level()) && old.raw() & mask != 0 {
                match action {
                    Action::Test => return (1, 0),
                    Action::Clear => {
                        let prev = clear_leaf_bit(it.sptep(), old, mask);
                        // The leaf was observed with the bit either way; a racing zap or ager may
                        // have cleared it first, so count as cleared only what this AND removed.
                        observed += 1;
                        cleared += u64::from(prev.raw() & mask != 0);
                        report_gfns(&mut report, it.gfn(), it.level().pages(), start, end);
                        it.set_old(prev);
                    }
                }
            }
            it.next();
        }
        (observed, cleared)
    }
}

/// Clears `mask` in the leaf `sptep`, last seen as `old`, and returns the value it replaced: the
/// one write the ager makes, shared by the iterator path and the table scan (with the test-only
/// yield before it, and the deliberately broken plain store in its place under
/// `broken-plain-store`). An A/D-disabled leaf is aged instead by one CAS that marks it for
/// access tracking (`spte::age_ad_disabled`; not retried, and the returned copy has A clear if
/// the CAS failed, so `mask` set in the result still means "this call cleared it").
#[inline(always)]
fn clear_leaf_bit(
    sptep: &crate::mmu::spte::AtomicSpte,
    old: crate::mmu::spte::Spte,
    mask: u64,
) -> crate::mmu::spte::Spte {
    #[cfg(feature = "test-hooks")]
    super::hooks::maybe_yield();
    if mask == ACCESSED_MASK && !old.ad_enabled() {
        return crate::mmu::spte::age_ad_disabled(sptep, old);
    }
    #[cfg(not(feature = "broken-plain-store"))]
    {
        let _ = old;
        // ORDERING: O4 — the AND's atomicity, not its ordering, is what keeps a concurrent D/W
        // update; the bit carries no data dependency.
        sptep.fetch_and(!mask, Ordering::Relaxed)
    }
    #[cfg(feature = "broken-plain-store")]
    broken_plain_clear(sptep, old, mask)
}

/// The deliberately broken ager of feature `broken-plain-store` (test-only; the torture tests
/// assert it is caught): clears `mask` with a plain store of the stale snapshot `old` instead of
/// an atomic AND, after a yield that widens the window. A CPU D-bit set or a zap that lands in
/// between is overwritten: the Dirty bit is lost, or a zapped leaf comes back (violating P3).
#[cfg(feature = "broken-plain-store")]
fn broken_plain_clear(
    sptep: &crate::mmu::spte::AtomicSpte,
    old: crate::mmu::spte::Spte,
    mask: u64,
) -> crate::mmu::spte::Spte {
    crate::sync::yield_now();
    // ORDERING: deliberately wrong (see above); Relaxed like the AND it replaces.
    sptep.store(
        crate::mmu::spte::Spte::from_raw(old.raw() & !mask),
        Ordering::Relaxed,
    );
    old
}

/// Calls `report` with the gfns `[gfn, gfn + pages)` of one young leaf, clipped to `[start, end)`.
#[inline(always)]
fn report_gfns(report: &mut impl FnMut(GfnRange), gfn: u64, pages: u64, start: u64, end: u64) {
    let lo = gfn.max(start);
    let hi = gfn.saturating_add(pages).min(end);
    if let Some(r) = GfnRange::new(Gfn::new(lo), Gfn::new(hi)) {
        report(r);
    }
}

/// Entries per 64-byte cache line: the unit of the pre-test in [`scan_leaf_table`].
const LINE: usize = 8;

/// Entries (two cache lines) read by [`quiet_block`], the pre-test's fast path.
const BLOCK: usize = crate::sync::block_or::BLOCK;

/// True if no entry of the aligned block `table[i..i + BLOCK]` has a `mask` bit set: the one
/// branch the scan takes per [`BLOCK`] entries where nothing is young.
///
/// The block is read by [`crate::sync::block_or::or_block`] (eight 16-byte loads on x86-64, half
/// the load instructions of 16 entry loads: the scan is bound by load throughput), nothing kept.
/// A block that fails the test is read again, line by line, by the snapshot path of
/// [`scan_leaf_table`]; each of those reads is a fresh snapshot of the entry, which the ager
/// tolerates as it tolerates any stale one.
#[inline(always)]
fn quiet_block(entries: &[AtomicSpte; ENTRIES], i: usize, mask: u64) -> bool {
    let Some(block) = entries
        .get(i..i + BLOCK)
        .and_then(|b| <&[AtomicSpte; BLOCK]>::try_from(b).ok())
    else {
        return false;
    };
    // ORDERING: the OR is a hint that orders nothing (block_or invariant 2), which is all a skip
    // needs: nothing is dereferenced from these values and nothing is written, and a stale bit
    // only means a young entry aged on the next pass (spec §3.8), or a block read again (with
    // Acquire, O1) by the snapshot path.
    crate::sync::block_or::or_block(block_words(block)) & mask == 0
}

/// The words of a block of SPTEs, for [`crate::sync::block_or::or_block`].
#[inline(always)]
fn block_words(block: &[AtomicSpte; BLOCK]) -> &[crate::sync::atomic::AtomicU64; BLOCK] {
    // SAFETY: `AtomicSpte` is `repr(transparent)` over `AtomicU64` (spte.rs), so an array of
    // one has the size, alignment and layout of an array of the other; the result borrows the
    // same memory for the same lifetime, and is only ever read atomically.
    unsafe {
        &*(block as *const [AtomicSpte; BLOCK]).cast::<[crate::sync::atomic::AtomicU64; BLOCK]>()
    }
}

/// Applies `action` to the present 4K leaves of `table[lo..hi]` with `mask` set; returns (observed,
/// cleared) as [`TdpMmu::walk_leaves`] counts them (stops at the first for [`Action::Test`]), and
/// with [`Action::Clear`] calls `report` with the index of each observed leaf.
///
/// Each aligned block of [`BLOCK`] entries is first tested as a whole ([`quiet_block`]), then each
/// cache line of a block that failed (and of the range's unaligned ends) is tested the same way on
/// a snapshot, so a line with nothing to do costs loads and one branch; only entries that are
/// present leaves with the bit set get the `fetch_and` (perf-anchors §7 item 1: never RMW an entry
/// that is not young).
#[inline]
fn scan_leaf_table(
    table: &Table,
    lo: usize,
    hi: usize,
    mask: u64,
    action: Action,
    mut report: impl FnMut(usize),
) -> (u64, u64) {
    let entries = table.entries();
    let want = MMU_PRESENT_MASK | mask;
    let (mut observed, mut cleared) = (0, 0);
    let mut i = lo;
    while i < hi {
        if i.is_multiple_of(BLOCK) && i + BLOCK <= hi && quiet_block(entries, i, mask) {
            i += BLOCK;
            continue;
        }
        let line_end = ((i | (LINE - 1)) + 1).min(hi);
        let line = &entries[i..line_end];
        // ORDERING: Acquire, exactly as the iterator's per-entry snapshot (O1) that this loop
        // replaces, so the orderings are unchanged (a block [`quiet_block`] found young is read
        // twice: two snapshots, the second the one acted on); on x86 an
        // Acquire load is a plain load. Nothing weaker is needed or stronger: a 4K slot holds only
        // NONPRESENT, a leaf or FROZEN (P2), nothing is dereferenced from it, a stale A/D bit is
        // tolerated (spec §3.8), and the clear below is the atomic AND (O4) on the current value.
        let mut snap = [0u64; LINE];
        let mut any = 0;
        for (s, e) in snap.iter_mut().zip(line) {
            *s = e.load(Ordering::Acquire).raw();
            any |= *s;
        }
        if any & mask != 0 {
            for (k, (&old, e)) in snap.iter().zip(line).enumerate() {
                if old & want != want {
                    continue;
                }
                match action {
                    Action::Test => return (1, 0),
                    Action::Clear => {
                        let prev = clear_leaf_bit(e, crate::mmu::spte::Spte::from_raw(old), mask);
                        observed += 1;
                        cleared += u64::from(prev.raw() & mask != 0);
                        report(i + k);
                    }
                }
            }
        }
        i = line_end;
    }
    (observed, cleared)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::addr::{Gfn, Level, Pfn};
    use crate::mmu::types::{FaultOutcome, MapRequest};
    use crate::sync::Arc;
    use crate::sync::rcu::Rcu;
    use crate::sync::witness::MmuLock;

    /// Maps `gfns` (with Accessed set) into a fresh TDP MMU; returns it with its RCU domain and
    /// the root (kept so the root stays valid).
    fn mapped(gfns: &[u64]) -> (Arc<Rcu>, TdpMmu, super::super::RootRef) {
        let rcu = Arc::new(Rcu::new());
        let lock = MmuLock::new();
        let tdp = TdpMmu::new(1, Arc::clone(&rcu));
        let mmu = lock.read();
        let root = tdp.get_root(AsId::new(0), mmu.witness());
        let guard = rcu.pin();
        for &g in gfns {
            let req = MapRequest {
                gfn: Gfn::new(g),
                pfn: Pfn::new(g + 1),
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
        drop(guard);
        (rcu, tdp, root)
    }

    fn young(tdp: &TdpMmu, rcu: &Rcu, g: u64) -> bool {
        let guard = rcu.pin();
        let (spte, _) = tdp
            .leaf(AsId::new(0), Gfn::new(g), &guard)
            .expect("the leaf is mapped");
        spte.is_accessed()
    }

    fn range(s: u64, e: u64) -> GfnRange {
        GfnRange::new(Gfn::new(s), Gfn::new(e)).expect("a non-empty range")
    }

    #[test]
    fn table_scan_ages_exactly_the_range_across_partial_and_whole_tables() {
        // Three 4K tables, a hole in the middle one; the range starts and ends mid-table.
        let gfns: Vec<u64> = (0..1536).filter(|g| !(700..720).contains(g)).collect();
        let (rcu, tdp, _root) = mapped(&gfns);
        let before = tdp.stats().accessed_cleared;
        let guard = rcu.pin();
        assert!(tdp.age_gfn_range(AsId::new(0), range(100, 1200), &guard));
        drop(guard);
        let in_range = gfns.iter().filter(|g| (100..1200).contains(*g)).count() as u64;
        assert_eq!(tdp.stats().accessed_cleared - before, in_range);
        for &g in &gfns {
            assert_eq!(
                young(&tdp, &rcu, g),
                !(100..1200).contains(&g),
                "gfn {g}: only leaves inside the range lose Accessed"
            );
        }
        let guard = rcu.pin();
        assert!(!tdp.test_age_gfn_range(AsId::new(0), range(100, 1200), &guard));
        assert!(!tdp.age_gfn_range(AsId::new(0), range(100, 1200), &guard));
        assert!(tdp.test_age_gfn_range(AsId::new(0), range(99, 100), &guard));
        assert!(tdp.test_age_gfn_range(AsId::new(0), range(1199, 1201), &guard));
        assert!(tdp.test_age_gfn_range(AsId::new(0), range(0, 1 << 30), &guard));
    }

    #[test]
    fn age_report_names_exactly_the_young_leaves_in_the_range() {
        // Two tables, a hole, and a range that starts and ends mid-table.
        let gfns: Vec<u64> = (0..1024).filter(|g| !(300..310).contains(g)).collect();
        let (rcu, tdp, _root) = mapped(&gfns);
        let guard = rcu.pin();
        let mut got = Vec::new();
        assert!(
            tdp.age_gfn_range_report(AsId::new(0), range(5, 1000), &guard, |r| {
                got.extend(r.start().raw()..r.end().raw());
            })
        );
        let want: Vec<u64> = gfns
            .iter()
            .copied()
            .filter(|g| (5..1000).contains(g))
            .collect();
        assert_eq!(got, want, "every young leaf in the range, once, in order");
        // The rest of the mapping is still young; then nothing is.
        for expect in [true, false] {
            got.clear();
            let young = tdp.age_gfn_range_report(AsId::new(0), range(0, 1024), &guard, |r| {
                got.extend(r.start().raw()..r.end().raw());
            });
            assert_eq!(young, expect);
            let want: Vec<u64> = if expect {
                (0..5).chain(1000..1024).collect()
            } else {
                Vec::new()
            };
            assert_eq!(got, want, "the report agrees with the bool");
        }
    }

    #[test]
    fn test_age_finds_a_single_young_leaf_anywhere_in_a_table() {
        let gfns: Vec<u64> = (0..1024).collect();
        let (rcu, tdp, _root) = mapped(&gfns);
        let guard = rcu.pin();
        assert!(tdp.age_gfn_range(AsId::new(0), range(0, 1024), &guard));
        assert!(!tdp.test_age_gfn_range(AsId::new(0), range(0, 1024), &guard));
        for g in [0u64, 7, 8, 511, 512, 777, 1023] {
            // Make exactly one leaf young again, the way the simulated CPU does.
            let root = tdp.inner.valid_root(AsId::new(0)).expect("a valid root");
            // SAFETY: found through the valid-root slot under `guard` (P4).
            let table = unsafe { root.get() }.table;
            // SAFETY: the root table stays allocated while `guard` is pinned (P4).
            let mut it = unsafe { TdpIter::new(table, g, g + 1, &guard) };
            while it.valid() && it.level() != Level::L4K {
                it.next();
            }
            assert!(it.valid(), "gfn {g} is mapped");
            // ORDERING: test-only; the later loads are on the same thread.
            it.sptep().fetch_or(ACCESSED_MASK, Ordering::Relaxed);
            assert!(tdp.test_age_gfn_range(AsId::new(0), range(0, 1024), &guard));
            if g > 0 {
                assert!(!tdp.test_age_gfn_range(AsId::new(0), range(0, g), &guard));
            }
            assert!(tdp.age_gfn_range(AsId::new(0), range(g, g + 1), &guard));
            assert!(!tdp.test_age_gfn_range(AsId::new(0), range(0, 1024), &guard));
        }
    }
}
