//! Loom models of A/D-disabled leaves (`VmConfig::ad_bits = Disabled`) on the production TDP
//! code: the lockless ager's one marking CAS (`age_gfn_range` → `access_track::age_ad_disabled`,
//! AD1) racing the CPU's walk and write (`hardware_walk`), the fast page fault's restore CAS
//! (`fast_page_fault_access` → `types::fix_fast`, AD2), a dirty-log re-arm
//! (`write_protect_range` under `mmu_lock` write, after taking the bitmap word) and a zap
//! (`zap_leafs`). The bitmap word is modelled with the VM's protocol (vm/dirty_log.rs: mark after
//! a fixed write fast fault, before the write; exchange under `mmu_lock` write before
//! write-protecting). docs/locking.md (ad) is the race table these models check.
//!
//! Run: `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target-loom cargo test --release -p kvmmu --test loom_ad_disabled`
//! (or `.ci/loom`, which runs every `loom_*.rs`).
#![cfg(loom)]

use kvmmu::internals::addr::{AsId, Gfn, GfnRange, Level, Pfn};
use kvmmu::internals::mmu::spte::{
    ACC_TRACK_SAVED_MASK, ACC_TRACK_SAVED_SHIFT, ACCESSED_MASK, AdBits, Spte, WRITABLE_MASK,
};
use kvmmu::internals::mmu::tdp::dirty::FastFault;
use kvmmu::internals::mmu::tdp::{RootRef, TdpMmu};
use kvmmu::internals::mmu::{FaultOutcome, HwWalk, MapRequest, RemoteTlbFlush};
use kvmmu::internals::sync::Arc;
use kvmmu::internals::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use kvmmu::internals::sync::rcu::Rcu;
use kvmmu::internals::sync::witness::MmuLock;
use loom::thread;

const AS0: AsId = AsId::new(0);
const GFN: Gfn = Gfn::new(0);
const PFN: Pfn = Pfn::new(100);

/// The ager's report: not done yet, done and marked the leaf, done without marking it.
const AGER_RUNNING: u64 = 0;
const AGER_MARKED: u64 = 1;
const AGER_DID_NOT_MARK: u64 = 2;

struct Flusher(AtomicUsize);

impl RemoteTlbFlush for Flusher {
    fn flush_remote_tlbs(&self) {
        // ORDERING: a counter only.
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

fn range(start: u64, end: u64) -> GfnRange {
    GfnRange::new(Gfn::new(start), Gfn::new(end)).unwrap()
}

/// How gfn 0's leaf starts.
#[derive(Clone, Copy, Debug)]
enum Start {
    /// Written (W, A, D), its page logged (bitmap bit set), not re-armed since.
    Writable,
    /// Written, harvested and re-armed: W clear, MMU-writable, D and A kept, bitmap clean.
    Rearmed,
    /// Written, then aged: marked for access tracking (R/X saved, R/W/X/A clear), page logged.
    Marked,
}

/// What a vCPU's access to gfn 0 did.
struct VcpuAccess {
    /// The access was performed (a write through a writable leaf).
    done: bool,
    /// The fast page fault fixed the leaf (restored it and/or made it writable).
    fast_fixed: bool,
}

struct World {
    rcu: Arc<Rcu>,
    lock: Arc<MmuLock>,
    tdp: Arc<TdpMmu>,
    /// Bit 0: gfn 0's dirty bit.
    bitmap: Arc<AtomicU64>,
    /// What the ager did (`AGER_*`), published after its CAS.
    ager: Arc<AtomicU64>,
    /// gfn 0's leaf as first installed (writable, young, dirty).
    installed: Spte,
}

impl World {
    fn new(start: Start) -> World {
        let rcu = Arc::new(Rcu::new());
        let mut w = World {
            tdp: Arc::new(TdpMmu::new(1, Arc::clone(&rcu)).with_ad_bits(AdBits::Disabled)),
            rcu,
            lock: Arc::new(MmuLock::new()),
            bitmap: Arc::new(AtomicU64::new(1)),
            ager: Arc::new(AtomicU64::new(AGER_RUNNING)),
            installed: Spte::NONPRESENT,
        };
        {
            let mmu = w.lock.read();
            let root = w.tdp.get_root(AS0, mmu.witness());
            let g = w.rcu.pin();
            let req = MapRequest {
                gfn: GFN,
                pfn: PFN,
                level: Level::L4K,
                host_writable: true,
                write_fault: true,
                prefetch: false,
            };
            assert_eq!(
                w.tdp.map(&root, &req, mmu.witness(), &g),
                FaultOutcome::Fixed
            );
        }
        w.installed = w.leaf().expect("just mapped");
        let s = w.installed;
        assert!(!s.ad_enabled() && s.is_writable() && s.is_dirty() && s.is_accessed());
        assert!(s.is_mmu_writable() && !s.is_access_tracked());
        match start {
            Start::Writable => {}
            Start::Rearmed => {
                let mmu = w.lock.write();
                w.bitmap.store(0, Ordering::Relaxed);
                let g = w.rcu.pin();
                assert!(
                    w.tdp
                        .write_protect_range(AS0, range(0, 1), |_| true, mmu.witness(), &g)
                );
            }
            Start::Marked => {
                let g = w.rcu.pin();
                assert!(w.tdp.age_gfn_range(AS0, range(0, 1), &g));
                drop(g);
                assert!(w.leaf().unwrap().is_access_tracked());
            }
        }
        w
    }

    fn root(&self) -> RootRef {
        let mmu = self.lock.read();
        self.tdp.get_root(AS0, mmu.witness())
    }

    fn leaf(&self) -> Option<Spte> {
        let g = self.rcu.pin();
        self.tdp.leaf(AS0, GFN, &g).map(|(s, _)| s)
    }

    /// A vCPU's access to gfn 0 (a write if `write`) as the VM runs it: the CPU's walk; on a
    /// fault (marked leaf, write-protected leaf) the fast page fault, marking the page when it
    /// fixed a write (D3), then the walk again. Checks that a walk started after the ager
    /// reported a mark does not access the leaf without a fault.
    fn vcpu(&self, write: bool) -> thread::JoinHandle<VcpuAccess> {
        let (tdp, rcu, bitmap, ager) = (
            Arc::clone(&self.tdp),
            Arc::clone(&self.rcu),
            Arc::clone(&self.bitmap),
            Arc::clone(&self.ager),
        );
        let root = self.root();
        thread::spawn(move || {
            let g = rcu.pin();
            // ORDERING: Acquire pairs with the ager's Release: its CAS happens-before this walk.
            let aged = ager.load(Ordering::Acquire);
            let mut walk = tdp.hardware_walk(&root, GFN, write, &g);
            if aged == AGER_MARKED {
                assert!(
                    !matches!(walk, HwWalk::Hit { .. }),
                    "a leaf marked for access tracking was accessed without a fault"
                );
            }
            let mut fast_fixed = false;
            if !matches!(walk, HwWalk::Hit { .. }) {
                if tdp.fast_page_fault_access(&root, GFN, write, &g) == FastFault::Fixed {
                    fast_fixed = true;
                    if write {
                        // ORDERING: as DirtyBitmap::mark (D3).
                        bitmap.fetch_or(1, Ordering::Release);
                    }
                }
                walk = tdp.hardware_walk(&root, GFN, write, &g);
            }
            let done = match walk {
                HwWalk::Hit { pfn, writable, .. } => {
                    assert_eq!(pfn, PFN, "an access through another pfn");
                    assert!(writable || !write);
                    true
                }
                HwWalk::WriteProtected | HwWalk::NotPresent => false,
            };
            VcpuAccess { done, fast_fixed }
        })
    }

    /// The lockless ager over gfns 0..4, publishing whether it marked gfn 0's leaf; returns that.
    fn ager(&self) -> thread::JoinHandle<bool> {
        let (tdp, rcu, ager) = (
            Arc::clone(&self.tdp),
            Arc::clone(&self.rcu),
            Arc::clone(&self.ager),
        );
        thread::spawn(move || {
            let g = rcu.pin();
            // `age_gfn_range` answers "observed young", also when its CAS lost; whether this call
            // marked the leaf is what its `accessed_cleared` count (only this thread ages) says.
            let before = tdp.stats().accessed_cleared;
            tdp.age_gfn_range(AS0, range(0, 4), &g);
            let marked = tdp.stats().accessed_cleared != before;
            let report = if marked {
                AGER_MARKED
            } else {
                AGER_DID_NOT_MARK
            };
            // ORDERING: Release publishes the CAS to the vCPU's Acquire load.
            ager.store(report, Ordering::Release);
            marked
        })
    }

    /// The harvester: take the word, write-protect, under `mmu_lock` write (vm/dirty_log.rs).
    /// Returns the word taken.
    fn harvest(&self) -> u64 {
        let mmu = self.lock.write();
        // ORDERING: as DirtyBitmap::take (D1, D3).
        let taken = self.bitmap.swap(0, Ordering::Acquire);
        let g = self.rcu.pin();
        self.tdp
            .write_protect_range(AS0, range(0, 1), |_| true, mmu.witness(), &g);
        taken
    }

    /// The checks every final leaf passes: same pfn, never loses D, MMU-writable or
    /// host-writable; a marked leaf holds exactly the installed R/X in its saved bits, an unmarked
    /// one exactly the installed R/X in place (the restore brought back what was saved); a
    /// writable leaf's page is logged. Then one more write, alone, is fixed by the fast path.
    fn check_final(&self) {
        let leaf = self.leaf().expect("nothing zaps gfn 0");
        let installed_rx = self.installed.raw() & ACC_TRACK_SAVED_MASK;
        let saved_bits = ACC_TRACK_SAVED_MASK << ACC_TRACK_SAVED_SHIFT;
        assert_eq!(leaf.pfn(), PFN, "{leaf:?}");
        assert!(leaf.is_dirty(), "D was lost: {leaf:?}");
        assert!(leaf.is_mmu_writable(), "MMU-writable was lost: {leaf:?}");
        assert!(leaf.is_host_writable(), "{leaf:?}");
        if leaf.is_access_tracked() {
            assert_eq!(
                leaf.raw() & saved_bits,
                installed_rx << ACC_TRACK_SAVED_SHIFT,
                "the mark saved other R/X than the leaf had: {leaf:?}"
            );
            assert_eq!(leaf.raw() & ACCESSED_MASK, 0, "{leaf:?}");
        } else {
            assert_eq!(
                leaf.raw() & ACC_TRACK_SAVED_MASK,
                installed_rx,
                "the restore brought back other R/X than were saved: {leaf:?}"
            );
            assert_eq!(leaf.raw() & saved_bits, 0, "saved copies left: {leaf:?}");
            assert!(leaf.is_accessed(), "an unmarked leaf is young: {leaf:?}");
        }
        if leaf.is_writable() {
            assert_eq!(
                self.bitmap.load(Ordering::Relaxed) & 1,
                1,
                "a writable leaf whose page is not logged: {leaf:?}"
            );
        }
        // No Writable is lost for good: alone, the next write faults at most once and the fast
        // path makes the leaf writable again (restoring it if marked).
        let root = self.root();
        let g = self.rcu.pin();
        if !matches!(
            self.tdp.hardware_walk(&root, GFN, true, &g),
            HwWalk::Hit { .. }
        ) {
            assert_eq!(
                self.tdp.fast_page_fault_access(&root, GFN, true, &g),
                FastFault::Fixed,
                "the leaf can no longer be made writable without mmu_lock: {leaf:?}"
            );
            match self.tdp.hardware_walk(&root, GFN, true, &g) {
                HwWalk::Hit { pfn, writable, .. } => assert!(pfn == PFN && writable),
                other => panic!("a fixed leaf still faults: {other:?}"),
            }
        }
        let after = self.tdp.leaf(AS0, GFN, &g).unwrap().0;
        assert_eq!(after.raw() & ACC_TRACK_SAVED_MASK, installed_rx);
        assert_eq!(after.raw() & saved_bits, 0);
        assert!(after.raw() & WRITABLE_MASK != 0 && after.is_dirty());
        drop(g);
        drop(root);
    }

    fn finish(self) {
        let World { rcu, lock, tdp, .. } = self;
        {
            let mut mmu = lock.write();
            tdp.teardown(&mut mmu, &Flusher(AtomicUsize::new(0)));
        }
        let tdp = Arc::try_unwrap(tdp).expect("every thread dropped its TdpMmu handle");
        drop(tdp);
        rcu.synchronize();
    }
}

/// Marking vs the vCPU's access (a write if `write`: the CPU's write or the fast page fault) vs
/// a re-arm, from the leaf `start`: no lost Dirty, no
/// lost MMU-writable, a performed write is in the harvest or still in the bitmap, a writable leaf
/// is logged, a walk after the mark faults, and R/X are exactly the installed ones (in place or
/// saved).
fn marking_races_fast_fault_and_rearm(start: Start, write: bool) {
    loom::model(move || {
        let w = World::new(start);
        let vcpu = w.vcpu(write);
        let ager = w.ager();
        let taken = w.harvest();
        let v = vcpu.join().unwrap();
        ager.join().unwrap();
        if write && v.done {
            let left = w.bitmap.load(Ordering::Relaxed);
            assert_eq!(
                (taken | left) & 1,
                1,
                "{start:?}: a performed write was never logged"
            );
        }
        w.check_final();
        w.finish();
    });
}

#[test]
fn ad_disabled_marking_vs_fast_fault_and_rearm_from_a_rearmed_leaf_loses_nothing() {
    marking_races_fast_fault_and_rearm(Start::Rearmed, true);
}

#[test]
fn ad_disabled_marking_vs_hardware_write_and_rearm_from_a_writable_leaf_loses_nothing() {
    marking_races_fast_fault_and_rearm(Start::Writable, true);
}

#[test]
fn ad_disabled_restore_vs_rearm_from_a_marked_leaf_loses_nothing() {
    marking_races_fast_fault_and_rearm(Start::Marked, true);
}

#[test]
fn ad_disabled_marking_vs_a_read_and_rearm_never_lets_a_marked_leaf_be_read_without_a_fault() {
    marking_races_fast_fault_and_rearm(Start::Writable, false);
}

#[test]
fn ad_disabled_read_restore_vs_rearm_from_a_marked_leaf_brings_back_the_saved_r_x() {
    marking_races_fast_fault_and_rearm(Start::Marked, false);
}

/// Without a re-arm, the ager's CAS is the only writer racing the vCPU: an ager that did not
/// mark never undid the fast path's W (a lost CAS changes nothing), and a leaf the ager marked
/// is either still marked or was restored by the vCPU's fast fault.
#[test]
fn a_lost_marking_cas_never_undoes_the_fast_paths_writable() {
    loom::model(|| {
        let w = World::new(Start::Rearmed);
        let vcpu = w.vcpu(true);
        let ager = w.ager();
        let v = vcpu.join().unwrap();
        let marked = ager.join().unwrap();
        let leaf = w.leaf().unwrap();
        if v.done && !marked {
            assert!(
                leaf.is_writable(),
                "the ager's failed CAS undid W: {leaf:?}"
            );
        }
        if marked && !leaf.is_access_tracked() {
            assert!(v.fast_fixed, "a marked leaf was unmarked without a fault");
        }
        if v.done {
            assert_eq!(
                w.bitmap.load(Ordering::Relaxed) & 1,
                1,
                "the write was not logged"
            );
        }
        w.check_final();
        w.finish();
    });
}

/// The fast page fault's restore vs the ager vs a zap, from a marked leaf: the restore CAS
/// never brings back a zapped leaf, so no access goes through the pfn the zap removed.
#[test]
fn ad_disabled_restore_never_resurrects_a_zapped_leaf() {
    loom::model(|| {
        let w = World::new(Start::Marked);
        let vcpu = w.vcpu(true);
        let ager = w.ager();
        let flusher = Flusher(AtomicUsize::new(0));
        {
            let mut mmu = w.lock.write();
            let _ = w.tdp.zap_leafs(AS0, range(0, 1), &mut mmu, false, &flusher);
        }
        vcpu.join().unwrap();
        ager.join().unwrap();
        assert!(w.leaf().is_none(), "the zapped leaf came back");
        w.finish();
    });
}
