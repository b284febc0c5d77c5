//! Loom models of the TDP MMU in its tiny geometry (4 entries × 2 levels, gfns 0..16).
//!
//! Run: `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target-loom cargo test --release -p kvmmu --test loom_tdp`
//! (bounded by `LOOM_MAX_PREEMPTIONS`, 2 in `.ci/loom`).
#![cfg(loom)]

use kvmmu::internals::addr::{AsId, Gfn, GfnRange, Level, Pfn};
use kvmmu::internals::mmu::tdp::{RootRef, TdpMmu};
use kvmmu::internals::mmu::{FaultOutcome, HwWalk, MapRequest, RemoteTlbFlush};
use kvmmu::internals::sync::Arc;
use kvmmu::internals::sync::atomic::{AtomicUsize, Ordering};
use kvmmu::internals::sync::rcu::Rcu;
use kvmmu::internals::sync::witness::MmuLock;
use loom::thread;

const AS0: AsId = AsId::new(0);

struct Flusher(AtomicUsize);

impl RemoteTlbFlush for Flusher {
    fn flush_remote_tlbs(&self) {
        // ORDERING: a counter only.
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

fn req(gfn: u64, write: bool) -> MapRequest {
    MapRequest {
        gfn: Gfn::new(gfn),
        pfn: Pfn::new(gfn + 100),
        level: Level::L4K,
        host_writable: true,
        write_fault: write,
        prefetch: false,
    }
}

fn range(start: u64, end: u64) -> GfnRange {
    GfnRange::new(Gfn::new(start), Gfn::new(end)).unwrap()
}

struct World {
    rcu: Arc<Rcu>,
    lock: Arc<MmuLock>,
    tdp: Arc<TdpMmu>,
}

impl World {
    fn new() -> World {
        let rcu = Arc::new(Rcu::new());
        World {
            tdp: Arc::new(TdpMmu::new(1, Arc::clone(&rcu))),
            rcu,
            lock: Arc::new(MmuLock::new()),
        }
    }
    fn root(&self) -> RootRef {
        let mmu = self.lock.read();
        self.tdp.get_root(AS0, mmu.witness())
    }
    fn map(&self, r: MapRequest) -> FaultOutcome {
        let mmu = self.lock.read();
        let root = self.tdp.get_root(AS0, mmu.witness());
        let g = self.rcu.pin();
        self.tdp.map(&root, &r, mmu.witness(), &g)
    }
    fn finish(self) {
        let World { rcu, lock, tdp } = self;
        {
            let mut mmu = lock.write();
            tdp.teardown(&mut mmu, &Flusher(AtomicUsize::new(0)));
        }
        let tdp = Arc::try_unwrap(tdp).expect("every thread dropped its TdpMmu handle");
        drop(tdp);
        rcu.synchronize();
        assert_eq!(rcu.pending(), 0);
    }
}

/// A fault installing leaves (and linking a table with a Release CAS), a lockless ager
/// (`fetch_and(!A)`), the CPU setting D (A/D CAS), and a zapper (swap under `mmu_lock` write),
/// all at once: a D bit the CPU set is never lost — it is either still in the leaf or was seen
/// by the zapper's swap.
#[test]
fn install_age_hardware_dirty_and_zap_never_lose_the_dirty_bit() {
    loom::model(|| {
        let w = World::new();
        // gfn 0: writable, then made clean (dirty logging), so the CPU must set D.
        assert_eq!(w.map(req(0, true)), FaultOutcome::Fixed);
        {
            let mmu = w.lock.read();
            let g = w.rcu.pin();
            assert!(
                w.tdp
                    .clear_dirty_gfn_range(AS0, range(0, 1), mmu.witness(), &g)
            );
        }
        let root = w.root();

        let hw = {
            let (tdp, rcu) = (Arc::clone(&w.tdp), Arc::clone(&w.rcu));
            thread::spawn(move || {
                let g = rcu.pin();
                tdp.hardware_walk(&root, Gfn::new(0), true, &g)
            })
        };
        let ager = {
            let (tdp, rcu) = (Arc::clone(&w.tdp), Arc::clone(&w.rcu));
            thread::spawn(move || {
                let g = rcu.pin();
                // Gfns 0..8: the old table and the one the installer is linking.
                tdp.age_gfn_range(AS0, range(0, 8), &g)
            })
        };
        let installer = {
            let (tdp, rcu, lock) = (Arc::clone(&w.tdp), Arc::clone(&w.rcu), Arc::clone(&w.lock));
            thread::spawn(move || {
                let mmu = lock.read();
                let root = tdp.get_root(AS0, mmu.witness());
                let g = rcu.pin();
                // gfn 5 lives in a table that does not exist yet: link + install.
                tdp.map(&root, &req(5, false), mmu.witness(), &g)
            })
        };
        // The zapper runs on the main thread.
        let flusher = Flusher(AtomicUsize::new(0));
        let needs_flush = {
            let mut mmu = w.lock.write();
            w.tdp.zap_leafs(AS0, range(0, 1), &mut mmu, false, &flusher)
        };
        assert!(needs_flush, "gfn 0 was present in a valid root");

        let hit = hw.join().unwrap();
        ager.join().unwrap();
        assert_eq!(
            installer.join().unwrap(),
            FaultOutcome::Fixed,
            "nobody else writes gfn 5's path"
        );

        let g = w.rcu.pin();
        let leaf0 = w.tdp.leaf(AS0, Gfn::new(0), &g);
        let stats = w.tdp.stats();
        assert_eq!(
            leaf0, None,
            "the zapper removed gfn 0; hw {hit:?} stats {stats:?}"
        );
        match hit {
            HwWalk::Hit { dirty, .. } => {
                assert!(dirty);
                assert_eq!(
                    stats.dirty_leaves_zapped, 1,
                    "the CPU's D bit reached the zapper's swap"
                );
            }
            HwWalk::NotPresent => assert_eq!(stats.dirty_leaves_zapped, 0),
            HwWalk::WriteProtected => panic!("gfn 0 was writable"),
        }
        let (leaf5, _) = w.tdp.leaf(AS0, Gfn::new(5), &g).expect("installed");
        assert_eq!(
            leaf5.pfn(),
            Pfn::new(105),
            "the ager saw an initialised table or none"
        );
        drop(g);
        w.finish();
    });
}

/// Without a zapper, the D bit the CPU set survives the ager's AND in the leaf itself.
#[test]
fn ager_and_hardware_dirty_keep_the_dirty_bit_in_the_leaf() {
    loom::model(|| {
        let w = World::new();
        assert_eq!(w.map(req(1, true)), FaultOutcome::Fixed);
        {
            let mmu = w.lock.read();
            let g = w.rcu.pin();
            w.tdp
                .clear_dirty_gfn_range(AS0, range(0, 4), mmu.witness(), &g);
        }
        let root = w.root();
        let hw = {
            let (tdp, rcu) = (Arc::clone(&w.tdp), Arc::clone(&w.rcu));
            thread::spawn(move || {
                let g = rcu.pin();
                tdp.hardware_walk(&root, Gfn::new(1), true, &g)
            })
        };
        let young = {
            let g = w.rcu.pin();
            w.tdp.age_gfn_range(AS0, range(0, 4), &g)
        };
        assert!(
            young,
            "the leaf was installed young and only the CPU sets A"
        );
        assert!(matches!(
            hw.join().unwrap(),
            HwWalk::Hit { dirty: true, .. }
        ));
        let g = w.rcu.pin();
        let (leaf, _) = w.tdp.leaf(AS0, Gfn::new(1), &g).unwrap();
        assert!(leaf.is_dirty(), "the D bit was lost: {leaf:?}");
        drop(g);
        w.finish();
    });
}

/// A reader inside an RCU read section walks a table while a zapper invalidates the root, unlinks
/// the table, freezes it and defers its free: the reader never reads freed memory (a freed table is
/// poisoned under loom and every SPTE access asserts against the poison).
#[test]
fn rcu_reader_never_reads_a_table_freed_under_it() {
    loom::model(|| {
        let w = World::new();
        assert_eq!(w.map(req(2, true)), FaultOutcome::Fixed);
        let root = w.root();
        let reader = {
            let (tdp, rcu) = (Arc::clone(&w.tdp), Arc::clone(&w.rcu));
            thread::spawn(move || {
                let g = rcu.pin();
                let first = tdp.hardware_walk(&root, Gfn::new(2), false, &g);
                let young = tdp.test_age_gfn_range(AS0, range(0, 4), &g);
                let second = tdp.hardware_walk(&root, Gfn::new(2), false, &g);
                (first, young, second)
            })
        };
        let ager = {
            let (tdp, rcu) = (Arc::clone(&w.tdp), Arc::clone(&w.rcu));
            thread::spawn(move || {
                let g = rcu.pin();
                tdp.age_gfn_range(AS0, range(0, 16), &g)
            })
        };
        let flusher = Flusher(AtomicUsize::new(0));
        {
            let mut mmu = w.lock.write();
            w.tdp.invalidate_all_roots(mmu.witness());
            w.tdp.zap_invalidated_roots(&mut mmu, &flusher);
        }
        // ORDERING: read after the zap on this thread.
        assert!(
            flusher.0.load(Ordering::Relaxed) >= 1,
            "tables are retired only after a flush"
        );
        let (first, _young, second) = reader.join().unwrap();
        ager.join().unwrap();
        // Once the walk saw the leaf gone, it never sees it again (the table is frozen, then freed).
        if first == HwWalk::NotPresent {
            assert_eq!(second, HwWalk::NotPresent);
        }
        w.finish();
    });
}

/// A lockless ager finds the valid root through its published pointer, without a reference,
/// while the root is invalidated, zapped and its last reference dropped: the root's table is
/// freed (poisoned) only after the ager's RCU section, never under it.
#[test]
fn ager_without_a_root_reference_never_reads_a_freed_root() {
    loom::model(|| {
        let w = World::new();
        assert_eq!(w.map(req(3, true)), FaultOutcome::Fixed);
        let root = w.root();
        let ager = {
            let (tdp, rcu) = (Arc::clone(&w.tdp), Arc::clone(&w.rcu));
            thread::spawn(move || {
                let g = rcu.pin();
                let young = tdp.age_gfn_range(AS0, range(0, 16), &g);
                let still = tdp.test_age_gfn_range(AS0, range(0, 16), &g);
                (young, still)
            })
        };
        let flusher = Flusher(AtomicUsize::new(0));
        {
            let mut mmu = w.lock.write();
            w.tdp.invalidate_all_roots(mmu.witness());
            w.tdp.zap_invalidated_roots(&mut mmu, &flusher);
        }
        drop(root);
        let (young, still) = ager.join().unwrap();
        assert!(
            !still || young,
            "test_age after age sees A only if the ager saw the leaf young"
        );
        let stats = w.tdp.stats();
        assert_eq!(stats.roots_allocated, 1);
        w.finish();
    });
}

/// A huge leaf (in the tiny geometry, a root entry spanning gfns 0..4) that is writable but not
/// dirty, with Accessed set.
fn huge_clean_leaf(w: &World) {
    let r = MapRequest {
        level: Level::L2M,
        pfn: Pfn::new(100),
        ..req(0, true)
    };
    assert_eq!(w.map(r), FaultOutcome::Fixed);
    let mmu = w.lock.read();
    let g = w.rcu.pin();
    w.tdp
        .clear_dirty_gfn_range(AS0, range(0, 4), mmu.witness(), &g);
}

/// The TDP split CAS (under `mmu_lock` read) races a lockless ager clearing Accessed and the CPU
/// setting Dirty on the huge leaf (P8): the split completes, every child maps its frame, and the
/// CPU's Dirty bit is in the child it wrote through, whichever happened first.
#[test]
fn split_cas_racing_ager_and_hardware_dirty_loses_no_accessed_or_dirty_bit() {
    loom::model(|| {
        let w = World::new();
        huge_clean_leaf(&w);
        let root = w.root();
        let hw = {
            let (tdp, rcu) = (Arc::clone(&w.tdp), Arc::clone(&w.rcu));
            thread::spawn(move || {
                loop {
                    let g = rcu.pin();
                    match tdp.hardware_walk(&root, Gfn::new(1), true, &g) {
                        hit @ HwWalk::Hit { .. } => return hit,
                        // The walk lost its A/D CAS to the split: a real CPU would re-walk.
                        _ => {
                            drop(g);
                            thread::yield_now();
                        }
                    }
                }
            })
        };
        let ager = {
            let (tdp, rcu) = (Arc::clone(&w.tdp), Arc::clone(&w.rcu));
            thread::spawn(move || {
                let g = rcu.pin();
                tdp.age_gfn_range(AS0, range(0, 4), &g)
            })
        };
        let split = {
            let mmu = w.lock.read();
            w.tdp
                .split_huge_pages(AS0, range(0, 4), Level::L4K, mmu.witness())
        };
        assert_eq!(
            split, 1,
            "the leaf stayed present, so the split must succeed"
        );
        let hit = hw.join().unwrap();
        assert!(matches!(hit, HwWalk::Hit { dirty: true, pfn, .. } if pfn == Pfn::new(101)));
        let _ = ager.join().unwrap();
        let g = w.rcu.pin();
        for gfn in 0..4 {
            let (leaf, level) = w.tdp.leaf(AS0, Gfn::new(gfn), &g).expect("a child");
            assert_eq!((level, leaf.pfn()), (Level::L4K, Pfn::new(100 + gfn)));
        }
        let (leaf, _) = w.tdp.leaf(AS0, Gfn::new(1), &g).unwrap();
        assert!(leaf.is_dirty(), "the CPU's D bit was lost: {leaf:?}");
        assert!(
            leaf.is_accessed() || !w.tdp.leaf(AS0, Gfn::new(0), &g).unwrap().0.is_accessed(),
            "A on gfn 1 may only be clear if the ager cleared it after the CPU set it"
        );
        drop(g);
        w.finish();
    });
}

/// A split (`mmu_lock` read) and a zap of the range (`mmu_lock` write) in either order leave
/// nothing mapped and every table freed once.
#[test]
fn split_and_zap_serialise_and_leave_nothing_mapped() {
    loom::model(|| {
        let w = World::new();
        huge_clean_leaf(&w);
        let zapper = {
            let (tdp, lock) = (Arc::clone(&w.tdp), Arc::clone(&w.lock));
            thread::spawn(move || {
                let mut mmu = lock.write();
                let flusher = Flusher(AtomicUsize::new(0));
                let _ = tdp.zap_leafs(AS0, range(0, 16), &mut mmu, false, &flusher);
            })
        };
        {
            let mmu = w.lock.read();
            let _ = w
                .tdp
                .split_huge_pages(AS0, range(0, 4), Level::L4K, mmu.witness());
        }
        zapper.join().unwrap();
        let g = w.rcu.pin();
        for gfn in 0..4 {
            assert!(w.tdp.leaf(AS0, Gfn::new(gfn), &g).is_none(), "gfn {gfn}");
        }
        drop(g);
        w.finish();
    });
}
