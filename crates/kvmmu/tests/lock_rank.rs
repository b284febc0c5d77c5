//! The lock-rank checker on the real lock types: the order of docs/locking.md (slots_lock →
//! memslots SRCU → mn_invalidate_lock → mmu_lock → rmap bit → RCU) is enforced in debug builds, legal nestings pass.
#![cfg(not(loom))]

use kvmmu::internals::sync::lock_rank::{self, LockRank};
use kvmmu::internals::sync::{MmuLock, RankedMutex, Rcu, Srcu};

/// Every rank is released once the guards are gone.
fn assert_nothing_held() {
    for r in LockRank::ALL {
        assert_eq!(lock_rank::held(r), 0, "{r} still registered");
    }
}

#[test]
fn legal_nesting_slots_srcu_mmu_rcu_is_allowed() {
    let slots = RankedMutex::new(LockRank::SlotsLock, 0u32);
    let srcu = Srcu::new();
    let mn = RankedMutex::new(LockRank::MnInvalidate, 0u32);
    let mmu = MmuLock::new();
    let rcu = Rcu::new();
    {
        let mut s = slots.lock();
        *s += 1;
        let g = srcu.read_lock();
        drop(mn.lock());
        let w = mmu.write();
        let rmap = lock_rank::acquire(LockRank::RmapBit);
        let r = rcu.pin();
        if cfg!(debug_assertions) {
            assert_eq!(lock_rank::held(LockRank::MmuLock), 1);
            assert_eq!(lock_rank::held(LockRank::Rcu), 1);
        }
        drop((r, rmap, w, g, s));
    }
    assert_nothing_held();
    assert_eq!(*slots.lock(), 1);
}

#[test]
fn srcu_then_rcu_without_mmu_lock_is_allowed() {
    // Lockless aging: SRCU for memslots, RCU for tables, no mmu_lock.
    let srcu = Srcu::new();
    let rcu = Rcu::new();
    let g = srcu.read_lock();
    let r = rcu.pin();
    if cfg!(debug_assertions) {
        assert_eq!(lock_rank::held(LockRank::MemslotsSrcu), 1);
        assert_eq!(lock_rank::held(LockRank::Rcu), 1);
    }
    drop((r, g));
    assert_nothing_held();
}

#[test]
fn nested_read_sections_are_allowed() {
    let srcu = Srcu::new();
    let rcu = Rcu::new();
    let a = srcu.read_lock();
    let b = srcu.read_lock();
    let r1 = rcu.pin();
    let r2 = rcu.pin();
    if cfg!(debug_assertions) {
        assert_eq!(lock_rank::held(LockRank::MemslotsSrcu), 2);
        assert_eq!(lock_rank::held(LockRank::Rcu), 2);
    }
    // Out-of-order release is fine.
    drop(a);
    drop(r1);
    drop(b);
    drop(r2);
    assert_nothing_held();
}

#[test]
fn relocking_after_release_is_allowed() {
    let mmu = MmuLock::new();
    let slots = RankedMutex::new(LockRank::SlotsLock, ());
    drop(mmu.read());
    drop(slots.lock());
    drop(mmu.write());
    let s = slots.lock();
    drop(mmu.read());
    drop(s);
    assert_nothing_held();
    assert_eq!(mmu.stats().read_acquisitions, 2);
}

#[test]
fn synchronize_under_slots_lock_is_allowed() {
    // spec §2.2 rule 2: synchronize_srcu runs inside slots_lock.
    let slots = RankedMutex::new(LockRank::SlotsLock, ());
    let srcu = Srcu::new();
    let s = slots.lock();
    srcu.synchronize();
    drop(s);
    assert_nothing_held();
}

#[cfg(debug_assertions)]
mod violations {
    use super::*;

    #[test]
    #[should_panic(expected = "taking slots_lock while holding mmu_lock")]
    fn mmu_lock_then_slots_lock_panics() {
        let mmu = MmuLock::new();
        let slots = RankedMutex::new(LockRank::SlotsLock, ());
        let _w = mmu.write();
        let _s = slots.lock();
    }

    #[test]
    #[should_panic(expected = "taking mmu_lock while holding RCU (epoch)")]
    fn rcu_then_mmu_lock_panics() {
        let rcu = Rcu::new();
        let mmu = MmuLock::new();
        let _r = rcu.pin();
        let _m = mmu.read();
    }

    #[test]
    #[should_panic(expected = "taking memslots SRCU while holding mmu_lock")]
    fn srcu_inside_mmu_lock_panics() {
        let mmu = MmuLock::new();
        let srcu = Srcu::new();
        let _m = mmu.read();
        let _g = srcu.read_lock();
    }

    #[test]
    #[should_panic(expected = "taking mmu_lock while holding mmu_lock")]
    fn mmu_lock_reentry_panics_instead_of_deadlocking() {
        let mmu = MmuLock::new();
        let _a = mmu.read();
        let _b = mmu.read();
    }

    #[test]
    #[should_panic(expected = "taking slots_lock while holding slots_lock")]
    fn slots_lock_reentry_panics() {
        let slots = RankedMutex::new(LockRank::SlotsLock, ());
        let _a = slots.lock();
        let _b = slots.lock();
    }

    #[test]
    #[should_panic(expected = "taking mn_invalidate_lock while holding mmu_lock")]
    fn mn_invalidate_inside_mmu_lock_panics() {
        let mmu = MmuLock::new();
        let mn = RankedMutex::new(LockRank::MnInvalidate, ());
        let _m = mmu.write();
        let _n = mn.lock();
    }

    #[test]
    #[should_panic(expected = "taking mmu_lock while holding rmap LOCKED bit")]
    fn rmap_bit_is_a_leaf() {
        let mmu = MmuLock::new();
        let _b = lock_rank::acquire(LockRank::RmapBit);
        let _m = mmu.write();
    }

    #[test]
    #[should_panic(expected = "retaking mmu_lock while holding RCU (epoch)")]
    fn cond_resched_with_rcu_held_panics() {
        // tdp_mmu_iter_cond_resched drops RCU before yielding mmu_lock; forgetting to is caught
        // even when nobody is waiting for the lock.
        let mmu = MmuLock::new();
        let rcu = Rcu::new();
        let mut w = mmu.write();
        let _r = rcu.pin();
        w.cond_resched();
    }

    #[test]
    #[should_panic(expected = "waiting for an SRCU grace period while holding mmu_lock")]
    fn synchronize_srcu_under_mmu_lock_panics() {
        let mmu = MmuLock::new();
        let srcu = Srcu::new();
        let _m = mmu.write();
        srcu.synchronize();
    }
}

#[cfg(not(debug_assertions))]
#[test]
fn release_builds_do_not_track_ranks() {
    let mmu = MmuLock::new();
    let rcu = Rcu::new();
    let r = rcu.pin();
    let m = mmu.read(); // an inversion, unchecked in release builds
    assert_eq!(lock_rank::held(LockRank::Rcu), 0);
    assert_eq!(core::mem::size_of::<kvmmu::internals::sync::RankToken>(), 0);
    drop((m, r));
}
