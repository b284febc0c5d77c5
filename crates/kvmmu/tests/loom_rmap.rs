//! loom models of the rmap bit lock (spec §3.9, §4 items 21–26).
//!
//! 1. A read-only locker races an `mmu_lock` writer that grows the rmap into a descriptor chain and
//!    empties it again (freeing the descriptor): the reader sees a stable chain and never a freed
//!    descriptor (freed descriptors are poisoned and leaked under loom, and walking one panics).
//! 2. Two read-only lockers exclude each other.
//! 3. A read-only locker spins on an rmap that a writer empties and refills: it returns 0 without
//!    locking (or locks a real chain), and its unlock never clobbers the writer's value.
//! 4. A lockless ager races a writer that zaps an SPTE, removes it from the rmap and then reuses the
//!    slot's memory: the ager never writes the slot after its removal (invariant 5 / item 26).
//! 5. A read-only locker walks a chain spanning two descriptors while a writer removes an entry of
//!    the tail descriptor (compaction: the head's last entry fills the hole and the emptied head
//!    descriptor is freed) and then adds one (a full tail: a new head descriptor is allocated):
//!    the walker sees one of the three chains, the same one twice, never a freed descriptor.
//! 6. A lockless ager ages that chain while the writer zaps an entry of the tail descriptor,
//!    removes it (compacting and freeing the head descriptor) and reuses its slot: the ager never
//!    writes the slot after its removal, and clears Accessed on every SPTE still listed.
#![cfg(loom)]

use std::ops::ControlFlow;

use kvmmu::internals::mmu::shadow::rmap::{
    AgeAction, PTE_LIST_EXT, RMAP_LOCKED, RmapHead, RmapShape, RmapStats, SPTE_ACCESSED_MASK,
    SPTE_PRESENT_MASK, SptePtr,
};
use kvmmu::internals::sync::Arc;
use kvmmu::internals::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use kvmmu::internals::sync::witness::MmuLock;

struct World {
    slots: [AtomicU64; 2],
    head: RmapHead,
    stats: RmapStats,
    mmu_lock: MmuLock,
}

impl World {
    fn new() -> Arc<World> {
        Arc::new(World {
            slots: [AtomicU64::new(0), AtomicU64::new(0)],
            head: RmapHead::new(),
            stats: RmapStats::new(),
            mmu_lock: MmuLock::new(),
        })
    }

    fn ptr(&self, i: usize) -> SptePtr {
        // SAFETY: the slots live in the same `Arc` as the rmap and every thread holds the `Arc`, so
        // they outlive every use of the pointer.
        unsafe { SptePtr::new(&self.slots[i]) }
    }

    /// Leaves the rmap empty at the end of a model (a nonempty rmap must not be dropped).
    fn teardown(&self) {
        let g = self.mmu_lock.write();
        self.head.zap_all(g.witness(), &self.stats, |_| {});
    }
}

/// Runs a model exhaustively (the models are small enough: well under a second each); set
/// `LOOM_MAX_PREEMPTIONS` to bound them if they grow.
fn model(f: impl Fn() + Sync + Send + 'static) {
    loom::model::Builder::new().check(f);
}

#[test]
fn readonly_locker_never_sees_a_changing_chain_or_a_freed_descriptor() {
    model(|| {
        let w = World::new();
        {
            let g = w.mmu_lock.write();
            w.head.pte_list_add(g.witness(), &w.stats, w.ptr(0));
        }
        let writer = {
            let w = w.clone();
            loom::thread::spawn(move || {
                let g = w.mmu_lock.write();
                // Single -> descriptor [0, 1] (allocation) -> [1] -> empty (the descriptor is freed).
                w.head.pte_list_add(g.witness(), &w.stats, w.ptr(1));
                w.head
                    .pte_list_remove(g.witness(), &w.stats, w.ptr(0))
                    .expect("listed");
                w.head
                    .pte_list_remove(g.witness(), &w.stats, w.ptr(1))
                    .expect("listed");
            })
        };
        let guard = w.head.lock_readonly(&w.stats);
        let walk = || {
            let mut seen = Vec::new();
            let _ = guard.for_each_spte(|p| {
                seen.push(p);
                ControlFlow::Continue(())
            });
            seen
        };
        let first = walk();
        let second = walk();
        assert_eq!(first, second, "chain changed under a read-only lock");
        assert!(first.len() <= 2);
        assert!(first.iter().all(|&p| p == w.ptr(0) || p == w.ptr(1)));
        assert_eq!(first.is_empty(), !guard.is_locked());
        drop(guard);
        writer.join().expect("writer panicked");
        assert_eq!(w.head.raw_value(), 0);
        let s = w.stats.snapshot();
        assert_eq!((s.desc_allocs, s.desc_frees), (1, 1));
    });
}

#[test]
fn two_readonly_lockers_exclude_each_other() {
    model(|| {
        let w = World::new();
        {
            let g = w.mmu_lock.write();
            w.head.pte_list_add(g.witness(), &w.stats, w.ptr(0));
        }
        let inside = Arc::new(AtomicUsize::new(0));
        let reader = |w: Arc<World>, inside: Arc<AtomicUsize>| {
            move || {
                let g = w.head.lock_readonly(&w.stats);
                assert!(g.is_locked());
                // ORDERING: Relaxed: loom explores every interleaving; overlap shows as a nonzero
                // value whatever the ordering.
                assert_eq!(
                    inside.fetch_add(1, Ordering::Relaxed),
                    0,
                    "two holders of the bit"
                );
                inside.fetch_sub(1, Ordering::Relaxed);
                drop(g);
            }
        };
        let t = loom::thread::spawn(reader(w.clone(), inside.clone()));
        reader(w.clone(), inside)();
        t.join().expect("reader panicked");
        assert_eq!(
            w.head.raw_value(),
            w.ptr(0).addr(),
            "unlock did not restore the chain"
        );
        w.teardown();
    });
}

#[test]
fn locker_of_an_rmap_emptied_while_it_spins_returns_zero_and_clobbers_nothing() {
    model(|| {
        let w = World::new();
        {
            let g = w.mmu_lock.write();
            w.head.pte_list_add(g.witness(), &w.stats, w.ptr(0));
        }
        let reader = {
            let w = w.clone();
            loom::thread::spawn(move || {
                let g = w.head.lock_readonly(&w.stats);
                let v = g.locked_value();
                let raw = w.head.raw_value();
                assert_ne!(raw, RMAP_LOCKED, "0 | LOCKED observed");
                if v != 0 {
                    assert_eq!(raw, v | RMAP_LOCKED, "locked without the LOCKED bit");
                }
                drop(g);
                v
            })
        };
        {
            let g = w.mmu_lock.write();
            // Empty the rmap (the reader may be spinning on the bit meanwhile), then refill it.
            w.head
                .pte_list_remove(g.witness(), &w.stats, w.ptr(0))
                .expect("listed");
            w.head.pte_list_add(g.witness(), &w.stats, w.ptr(1));
        }
        let seen = reader.join().expect("reader panicked");
        assert!(
            seen == 0 || seen == w.ptr(0).addr() || seen == w.ptr(1).addr(),
            "locked a value that was never the chain: {seen:#x}"
        );
        assert_eq!(
            w.head.raw_value(),
            w.ptr(1).addr(),
            "the reader's unlock clobbered the writer's chain"
        );
        w.teardown();
    });
}

#[test]
fn ager_never_touches_an_spte_after_it_left_the_rmap() {
    const YOUNG: u64 = SPTE_PRESENT_MASK | SPTE_ACCESSED_MASK;
    const NONPRESENT: u64 = 1 << 63;
    // What the slot's memory holds once "freed" and reused; an AND of !A would change it.
    const REUSED: u64 = 0x5a5a_5a5a_5a5a_5b5a | SPTE_ACCESSED_MASK;
    model(|| {
        let w = World::new();
        // ORDERING: Relaxed: set up before the other thread is spawned (spawn orders it).
        w.slots[0].store(YOUNG, Ordering::Relaxed);
        {
            let g = w.mmu_lock.write();
            w.head.pte_list_add(g.witness(), &w.stats, w.ptr(0));
        }
        let ager = {
            let w = w.clone();
            loom::thread::spawn(move || w.head.age_rmap(&w.stats, AgeAction::Clear))
        };
        {
            let g = w.mmu_lock.write();
            // ORDERING: Relaxed: SPTE values carry no ordering (spec §3.9); the rmap bit taken by
            // the removal orders the reuse after any ager that could still see the slot.
            w.slots[0].store(NONPRESENT, Ordering::Relaxed);
            w.head
                .pte_list_remove(g.witness(), &w.stats, w.ptr(0))
                .expect("listed");
        }
        w.slots[0].store(REUSED, Ordering::Relaxed);
        ager.join().expect("ager panicked");
        assert_eq!(
            w.slots[0].load(Ordering::Relaxed),
            REUSED,
            "the ager wrote an SPTE slot after it left the rmap"
        );
    });
}

/// Entries of the multi-descriptor models: one more than a descriptor holds, so the chain is a
/// head descriptor of one entry and a full tail descriptor.
const CHAIN: usize = PTE_LIST_EXT + 1;
/// The entry the writer removes: in the tail descriptor, so the removal compacts (the head's last
/// entry fills the hole) and frees the emptied head descriptor.
const REMOVED: usize = 3;

/// A world with a multi-descriptor chain: `CHAIN` entries listed, plus one spare slot to add.
struct ChainWorld {
    slots: [AtomicU64; CHAIN + 1],
    head: RmapHead,
    stats: RmapStats,
    mmu_lock: MmuLock,
}

impl ChainWorld {
    fn new(value: u64) -> Arc<ChainWorld> {
        let w = Arc::new(ChainWorld {
            slots: core::array::from_fn(|_| AtomicU64::new(value)),
            head: RmapHead::new(),
            stats: RmapStats::new(),
            mmu_lock: MmuLock::new(),
        });
        {
            let g = w.mmu_lock.write();
            for i in 0..CHAIN {
                w.head.pte_list_add(g.witness(), &w.stats, w.ptr(i));
            }
            assert_eq!(
                w.head.shape(g.witness(), &w.stats),
                RmapShape::Many(vec![
                    kvmmu::internals::mmu::shadow::rmap::DescShape {
                        spte_count: 1,
                        tail_count: PTE_LIST_EXT,
                    },
                    kvmmu::internals::mmu::shadow::rmap::DescShape {
                        spte_count: PTE_LIST_EXT,
                        tail_count: 0,
                    },
                ]),
                "the model starts from a chain spanning two descriptors"
            );
        }
        w
    }

    fn ptr(&self, i: usize) -> SptePtr {
        // SAFETY: the slots live in the same `Arc` as the rmap and every thread holds the `Arc`, so
        // they outlive every use of the pointer.
        unsafe { SptePtr::new(&self.slots[i]) }
    }

    fn teardown(&self) {
        let g = self.mmu_lock.write();
        self.head.zap_all(g.witness(), &self.stats, |_| {});
    }
}

/// The multi-descriptor models: exhaustive up to `LOOM_MAX_PREEMPTIONS` (default here 2, as
/// `.ci/loom` sets it), since a walk of fifteen entries has many interleaving points.
fn chain_model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound.get_or_insert(2);
    b.check(f);
}

#[test]
fn readonly_walk_of_a_multi_descriptor_chain_sees_one_stable_chain_while_a_writer_compacts() {
    chain_model(|| {
        let w = ChainWorld::new(0);
        let writer = {
            let w = w.clone();
            loom::thread::spawn(move || {
                let g = w.mmu_lock.write();
                // Remove from the tail: compaction, and the emptied head descriptor is freed.
                w.head
                    .pte_list_remove(g.witness(), &w.stats, w.ptr(REMOVED))
                    .expect("listed");
                // The tail is full again: a new head descriptor is allocated.
                w.head.pte_list_add(g.witness(), &w.stats, w.ptr(CHAIN));
            })
        };
        let guard = w.head.lock_readonly(&w.stats);
        let walk = || {
            let mut seen = Vec::new();
            let _ = guard.for_each_spte(|p| {
                seen.push(p);
                ControlFlow::Continue(())
            });
            seen
        };
        let first = walk();
        let second = walk();
        drop(guard);
        assert_eq!(first, second, "chain changed under a read-only lock");
        let mut got: Vec<usize> = first
            .iter()
            .map(|p| {
                (0..=CHAIN)
                    .find(|&i| w.ptr(i) == *p)
                    .expect("a slot of the model")
            })
            .collect();
        got.sort_unstable();
        let before: Vec<usize> = (0..CHAIN).collect();
        let removed: Vec<usize> = (0..CHAIN).filter(|&i| i != REMOVED).collect();
        let added: Vec<usize> = (0..=CHAIN).filter(|&i| i != REMOVED).collect();
        assert!(
            got == before || got == removed || got == added,
            "walked a chain that never existed: {got:?}"
        );
        writer.join().expect("writer panicked");
        let s = w.stats.snapshot();
        // Two descriptors at the start, the head freed by the removal, one allocated by the add.
        assert_eq!((s.desc_allocs, s.desc_frees), (3, 1));
        w.teardown();
    });
}

#[test]
fn ager_of_a_multi_descriptor_chain_never_touches_a_compacted_out_spte() {
    const YOUNG: u64 = SPTE_PRESENT_MASK | SPTE_ACCESSED_MASK;
    const NONPRESENT: u64 = 1 << 63;
    const REUSED: u64 = 0x5a5a_5a5a_5a5a_5b5a | SPTE_ACCESSED_MASK;
    chain_model(|| {
        let w = ChainWorld::new(YOUNG);
        let ager = {
            let w = w.clone();
            loom::thread::spawn(move || w.head.age_rmap(&w.stats, AgeAction::Clear))
        };
        {
            let g = w.mmu_lock.write();
            // ORDERING: Relaxed: SPTE values carry no ordering (spec §3.9); the bit taken by the
            // removal orders the reuse after any ager that could still reach the slot.
            w.slots[REMOVED].store(NONPRESENT, Ordering::Relaxed);
            w.head
                .pte_list_remove(g.witness(), &w.stats, w.ptr(REMOVED))
                .expect("listed");
        }
        w.slots[REMOVED].store(REUSED, Ordering::Relaxed);
        assert!(ager.join().expect("ager panicked"), "the chain was young");
        assert_eq!(
            w.slots[REMOVED].load(Ordering::Relaxed),
            REUSED,
            "the ager wrote an SPTE slot after it left the rmap"
        );
        for i in (0..CHAIN).filter(|&i| i != REMOVED) {
            assert_eq!(
                w.slots[i].load(Ordering::Relaxed),
                SPTE_PRESENT_MASK,
                "slot {i}, listed throughout, was not aged"
            );
        }
        w.teardown();
    });
}
