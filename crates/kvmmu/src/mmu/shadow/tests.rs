//! Unit tests of the shadow MMU: page lifetime (S1), rmaps (S6), invalid roots (S4), aging.

use super::mmu::RmapLookup;
use super::rmap::{AgeAction, RMAP_RECYCLE_THRESHOLD, RmapHead};
use super::slot_rmaps::SlotRmaps;
use super::{ShadowMmu, ShadowRoot};
use crate::addr::Pfn;
use crate::addr::{AsId, Gfn, GfnRange, Level};
use crate::mmu::spte::{LeafAttrs, SHADOW_NONPRESENT_VALUE, make_spte};
use crate::mmu::types::{FaultOutcome, MapRequest, RemoteTlbFlush, RetryReason};
use crate::sync::atomic::{AtomicU64, Ordering};
use crate::sync::witness::MmuLock;
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
    let slot =
        OneSlot(SlotRmaps::new(GfnRange::new(Gfn::new(0), Gfn::new(GFNS)).unwrap()).unwrap());
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
    mmu.zap_all(&slot, w.witness()).commit(&check);
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
    mmu.zap_all(&slot, w.witness()).commit(&NoFlush);
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
    assert!(mmu.zap_gfn_range(&slot.0, all, &mut w, true, &NoFlush));
    assert!(
        !mmu.zap_gfn_range(&slot.0, all, &mut w, true, &NoFlush),
        "nothing left"
    );
    drop(w);
    let r = lock.read();
    for g in 0..GFNS {
        assert!(mmu.leaf(AsId::new(0), Gfn::new(g), r.witness()).is_none());
    }
    drop(r);
    let w = lock.write();
    mmu.zap_all(&slot, w.witness()).commit(&NoFlush);
    drop(w);
    drop(root);
    let s = mmu.stats();
    assert_eq!(s.pages_allocated, s.pages_freed);
}

#[test]
fn map_into_an_invalid_root_retries_and_installs_nothing() {
    let (mmu, lock, slot, root) = populated();
    let w = lock.write();
    mmu.zap_all(&slot, w.witness()).commit(&NoFlush);
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
    mmu.zap_all(&slot, w.witness()).commit(&NoFlush);
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
    assert!(mmu.age_gfn_range(&slot.0, range(3, 4), AgeAction::TestOnly, None));
    assert_eq!(mmu.stats().accessed_cleared, 0);
    assert!(mmu.age_gfn_range(&slot.0, range(0, GFNS), AgeAction::Clear, None));
    let cleared = mmu.stats().accessed_cleared;
    assert_eq!(cleared, mmu.stats().leaves_installed);
    assert!(!mmu.age_gfn_range(
        &slot.0,
        range(0, GFNS),
        AgeAction::Clear,
        Some(lock.write().witness())
    ));
    assert!(!mmu.age_gfn_range(&slot.0, range(0, GFNS), AgeAction::TestOnly, None));
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
    let p = unsafe { super::rmap::SptePtr::new(&slot2[0]) };
    let _ = head.pte_list_add(w.witness(), &mmu.inner.rmap_stats, p);
    drop(w);
    assert!(mmu.age_gfn_range(&slot.0, range(511, 513), AgeAction::TestOnly, None));
    let w = lock.write();
    head.pte_list_remove(w.witness(), &mmu.inner.rmap_stats, p)
        .unwrap();
    mmu.zap_all(&slot, w.witness()).commit(&NoFlush);
    drop(w);
    drop(root);
}

#[test]
fn rmap_age_report_names_young_gfns_and_clips_huge_blocks_to_the_range() {
    let (mmu, lock, slot, root) = populated();
    let range = |a, b| GfnRange::new(Gfn::new(a), Gfn::new(b)).unwrap();
    let mut got = Vec::new();
    assert!(mmu.age_gfn_range_report(&slot.0, range(10, 40), None, |r| got.push(r)));
    let want: Vec<GfnRange> = (12..40).step_by(3).map(|g| range(g, g + 1)).collect();
    assert_eq!(
        got, want,
        "one report per young 4K rmap, only inside the range"
    );
    got.clear();
    assert!(
        !mmu.age_gfn_range_report(&slot.0, range(10, 40), Some(lock.write().witness()), |r| {
            got.push(r)
        })
    );
    assert!(got.is_empty());
    // A young SPTE in the 2M rmap of [512, 1024), aged over [600, 700) after the 4K leaves
    // there are old: the block is reported clipped to the range.
    assert!(mmu.age_gfn_range(&slot.0, range(0, GFNS), AgeAction::Clear, None));
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
    let p = unsafe { super::rmap::SptePtr::new(&slot2[0]) };
    let _ = head.pte_list_add(w.witness(), &mmu.inner.rmap_stats, p);
    drop(w);
    got.clear();
    assert!(mmu.age_gfn_range_report(&slot.0, range(600, 700), None, |r| got.push(r)));
    assert_eq!(got, vec![range(600, 700)]);
    let w = lock.write();
    head.pte_list_remove(w.witness(), &mmu.inner.rmap_stats, p)
        .unwrap();
    mmu.zap_all(&slot, w.witness()).commit(&NoFlush);
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
            let _ = mmu.zap_gfn_range(&slot.0, all, &mut w, true, &flushes);
            // ORDERING: the waiter's stores happened under mmu_lock, which we hold again.
            yielded = waiter_ran.load(Ordering::Relaxed);
            drop(w);
        });
        let w = lock.write();
        mmu.zap_all(&slot, w.witness()).commit(&NoFlush);
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
        let p = unsafe { super::rmap::SptePtr::new(d) };
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
    mmu.zap_all(&slot, w.witness()).commit(&NoFlush);
    drop(w);
    drop(root);
    assert_eq!(mmu.stats().rmap.live_descriptors(), 0);
}

/// The guest-mode walk's view of `gfn`: the frame and the host page the leaf's installer
/// recorded for it (G5).
fn walk_owner(mmu: &ShadowMmu, root: &ShadowRoot, g: u64) -> (Option<Pfn>, Option<u64>) {
    // SAFETY: single-threaded test: nothing zaps or frees a page during the walk (S2).
    let (hit, owner) = unsafe { mmu.hardware_walk(root, Gfn::new(g), false) };
    match hit {
        crate::mmu::HwWalk::Hit { pfn, .. } => (Some(pfn), owner),
        _ => (None, owner),
    }
}

#[test]
fn a_fault_records_the_host_page_of_its_frame_and_the_guest_walk_returns_it_for_that_leaf_only() {
    let mmu = ShadowMmu::new(1);
    let lock = MmuLock::new();
    let slot =
        OneSlot(SlotRmaps::new(GfnRange::new(Gfn::new(0), Gfn::new(GFNS)).unwrap()).unwrap());
    let mut w = lock.write();
    let root = mmu.get_root(AsId::new(0), w.witness());
    // gfn 3 with an owner, gfn 4 without (a direct `map` caller records none).
    let out = mmu.map_owned(
        &root,
        &req(3, true),
        Some(7003),
        &slot.0,
        w.witness(),
        &NoFlush,
    );
    assert_eq!(out, FaultOutcome::Fixed);
    assert_eq!(
        mmu.map(&root, &req(4, true), &slot.0, w.witness(), &NoFlush),
        FaultOutcome::Fixed
    );
    assert_eq!(
        walk_owner(&mmu, &root, 3),
        (Some(Pfn::new(103)), Some(7003))
    );
    assert_eq!(walk_owner(&mmu, &root, 4), (Some(Pfn::new(104)), None));
    assert_eq!(
        walk_owner(&mmu, &root, 5),
        (None, None),
        "no leaf, no owner"
    );
    // Zap gfn 3 and map it to another frame without an owner: the old word must not describe
    // the new leaf.
    let _ = mmu.zap_gfn_range(
        &slot.0,
        GfnRange::new(Gfn::new(3), Gfn::new(4)).unwrap(),
        &mut w,
        false,
        &NoFlush,
    );
    let other = MapRequest {
        pfn: Pfn::new(900),
        ..req(3, true)
    };
    assert_eq!(
        mmu.map(&root, &other, &slot.0, w.witness(), &NoFlush),
        FaultOutcome::Fixed
    );
    assert_eq!(walk_owner(&mmu, &root, 3), (Some(Pfn::new(900)), None));
    mmu.zap_all(&slot, w.witness()).commit(&NoFlush);
}

#[test]
fn a_huge_leaf_claims_consecutive_host_pages_and_recovery_keeps_a_run_of_claims() {
    let mmu = ShadowMmu::new(1);
    let lock = MmuLock::new();
    let slot =
        OneSlot(SlotRmaps::new(GfnRange::new(Gfn::new(0), Gfn::new(GFNS)).unwrap()).unwrap());
    let w = lock.write();
    let root = mmu.get_root(AsId::new(0), w.witness());
    // A 2M leaf for the block at gfn 512, faulted on gfn 519 whose frame backs host page 9000.
    let huge = MapRequest {
        gfn: Gfn::new(519),
        pfn: Pfn::new(4096 + 7),
        level: Level::L2M,
        ..req(519, true)
    };
    assert_eq!(
        mmu.map_owned(&root, &huge, Some(9000), &slot.0, w.witness(), &NoFlush),
        FaultOutcome::Fixed
    );
    assert_eq!(
        walk_owner(&mmu, &root, 512),
        (Some(Pfn::new(4096)), Some(8993))
    );
    assert_eq!(
        walk_owner(&mmu, &root, 1023),
        (Some(Pfn::new(4096 + 511)), Some(8993 + 511))
    );
    // The block at gfn 0: 512 4K leaves on one run of frames and host pages, then recovered in
    // place into one 2M leaf, which keeps the run; a block with one leaf lacking an owner
    // (gfn 1024 + 5) recovers into a leaf without one.
    for base in [0u64, 1024] {
        for g in base..base + 512 {
            let r = MapRequest {
                pfn: Pfn::new(8192 + g),
                ..req(g, true)
            };
            let owner = (g != 1029).then_some(20_000 + g);
            assert_eq!(
                mmu.map_owned(&root, &r, owner, &slot.0, w.witness(), &NoFlush),
                FaultOutcome::Fixed
            );
        }
    }
    let (formed, batch) = mmu.recover_huge_in_place(
        AsId::new(0),
        &slot.0,
        GfnRange::new(Gfn::new(0), Gfn::new(GFNS)).unwrap(),
        |_, level| level == Level::L2M,
        w.witness(),
    );
    batch.commit(&NoFlush);
    assert_eq!(formed, 2, "both 4K blocks recovered");
    assert_eq!(
        walk_owner(&mmu, &root, 0),
        (Some(Pfn::new(8192)), Some(20_000))
    );
    assert_eq!(
        walk_owner(&mmu, &root, 300),
        (Some(Pfn::new(8492)), Some(20_300))
    );
    assert_eq!(walk_owner(&mmu, &root, 1024), (Some(Pfn::new(9216)), None));
    assert_eq!(walk_owner(&mmu, &root, 1029), (Some(Pfn::new(9221)), None));
    mmu.zap_all(&slot, w.witness()).commit(&NoFlush);
}
