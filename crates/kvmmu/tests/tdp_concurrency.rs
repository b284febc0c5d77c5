//! TDP MMU under real threads: faults under `mmu_lock` read, lockless aging, simulated hardware
//! setting Dirty, and a zapper, all at once. Sized to finish quickly in debug builds.
#![cfg(not(loom))]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;

use kvmmu::internals::addr::{AsId, Gfn, GfnRange, Level, Pfn};
use kvmmu::internals::mmu::tdp::TdpMmu;
use kvmmu::internals::mmu::{FaultOutcome, HwWalk, MapRequest, RemoteTlbFlush, RetryReason};
use kvmmu::internals::sync::Arc;
use kvmmu::internals::sync::rcu::Rcu;
use kvmmu::internals::sync::witness::MmuLock;

const AS0: AsId = AsId::new(0);
/// Gfns `[0, N)` are mapped up front and never zapped; `[N, 2N)` are mapped and zapped
/// concurrently. N spans several 4K tables.
const N: u64 = 1536;
const ROUNDS: usize = 10;
/// The hot window `[0, HOT)` and how often the CPU thread clears and re-dirties it per round.
const HOT: u64 = 16;
const HOT_ROUNDS: usize = 1000;

#[derive(Default)]
struct CountingFlusher(AtomicUsize);

impl RemoteTlbFlush for CountingFlusher {
    fn flush_remote_tlbs(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// Sets the flag when dropped, including during a panic.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn req(gfn: u64, write: bool) -> MapRequest {
    MapRequest {
        gfn: Gfn::new(gfn),
        pfn: Pfn::new(gfn + 7),
        level: Level::L4K,
        host_writable: true,
        write_fault: write,
        prefetch: false,
    }
}

fn range(start: u64, end: u64) -> GfnRange {
    GfnRange::new(Gfn::new(start), Gfn::new(end)).unwrap()
}

/// Maps until the fault is not a retry (a vCPU re-faulting).
fn map_until_done(tdp: &TdpMmu, lock: &MmuLock, rcu: &Rcu, r: MapRequest) -> FaultOutcome {
    loop {
        let mmu = lock.read();
        let root = tdp.get_root(AS0, mmu.witness());
        let guard = rcu.pin();
        match tdp.map(&root, &r, mmu.witness(), &guard) {
            FaultOutcome::Retry(RetryReason::CasLost | RetryReason::Frozen) => continue,
            other => return other,
        }
    }
}

#[test]
fn concurrent_faults_aging_and_hardware_dirty_never_lose_a_dirty_bit() {
    let rcu = Arc::new(Rcu::new());
    let lock = MmuLock::new();
    let tdp = TdpMmu::new(1, Arc::clone(&rcu));
    let flusher = CountingFlusher::default();
    // Even gfns writable, odd gfns read-only (the mappers upgrade them concurrently).
    for g in 0..N {
        assert_eq!(
            map_until_done(&tdp, &lock, &rcu, req(g, g % 2 == 0)),
            FaultOutcome::Fixed
        );
    }
    let done = AtomicBool::new(false);
    let (tdp, lock, rcu, flusher, done) = (&tdp, &lock, &*rcu, &flusher, &done);
    thread::scope(|s| {
        // Two vCPU fault handlers over overlapping gfns: upgrades of the odd gfns race with the
        // hardware reader below and with the ager; [N, 2N) races with the zapper.
        for t in 0..2u64 {
            s.spawn(move || {
                for round in 0..ROUNDS as u64 {
                    for g in (t..2 * N).step_by(2 + (round as usize % 2)) {
                        let write = g >= N || g % 2 == 1;
                        let out = map_until_done(tdp, lock, rcu, req(g, write));
                        assert!(
                            matches!(out, FaultOutcome::Fixed | FaultOutcome::Spurious),
                            "{out:?}"
                        );
                    }
                }
            });
        }
        // The lockless ager: no mmu_lock at all.
        s.spawn(move || {
            let mut young = 0;
            while !done.load(Ordering::Relaxed) {
                let guard = rcu.pin();
                young += usize::from(tdp.age_gfn_range(AS0, range(0, 2 * N), &guard));
                let _ = tdp.test_age_gfn_range(AS0, range(0, N), &guard);
                for _ in 0..64 {
                    young += usize::from(tdp.age_gfn_range(AS0, range(0, HOT), &guard));
                }
            }
            young
        });
        // A zapper on [N, 2N), under mmu_lock write, yielding when contended.
        s.spawn(move || {
            while !done.load(Ordering::Relaxed) {
                let mut mmu = lock.write();
                if tdp.zap_leafs(AS0, range(N, 2 * N), &mut mmu, true, flusher) {
                    flusher.flush_remote_tlbs();
                }
                drop(mmu);
                thread::yield_now();
            }
        });
        // The simulated CPU: each round clears D (dirty logging), then writes every even gfn and
        // reads every odd one, racing the ager's fetch_and and the mappers' CAS.
        s.spawn(move || {
            // Stops the other threads even if an assertion below fails.
            let _stop = StopOnDrop(done);
            let root = tdp.get_root(AS0, lock.read().witness());
            for _ in 0..ROUNDS {
                {
                    let mmu = lock.read();
                    let guard = rcu.pin();
                    tdp.clear_dirty_gfn_range(AS0, range(0, N), mmu.witness(), &guard);
                }
                for g in 0..N {
                    let guard = rcu.pin();
                    let hit = tdp.hardware_walk(&root, Gfn::new(g), g % 2 == 0, &guard);
                    match hit {
                        HwWalk::Hit { pfn, dirty, .. } => {
                            assert_eq!(pfn, Pfn::new(g + 7));
                            assert!(g % 2 == 1 || dirty, "a hardware write returns a dirty leaf");
                        }
                        other => panic!("gfn {g} is mapped for the whole test, got {other:?}"),
                    }
                }
                // Nothing may have lost a D bit since this round's writes, while the ager and
                // the mappers kept running.
                {
                    let guard = rcu.pin();
                    for g in (0..N).step_by(2) {
                        let (spte, _) = tdp.leaf(AS0, Gfn::new(g), &guard).expect("never zapped");
                        assert!(
                            spte.is_dirty(),
                            "gfn {g}: the hardware's D bit was lost: {spte:?}"
                        );
                    }
                }
                // A hot window the ager hammers too, so the RMWs overlap often.
                for _ in 0..HOT_ROUNDS {
                    {
                        let mmu = lock.read();
                        let guard = rcu.pin();
                        tdp.clear_dirty_gfn_range(AS0, range(0, HOT), mmu.witness(), &guard);
                    }
                    let guard = rcu.pin();
                    for g in (0..HOT).step_by(2) {
                        let hit = tdp.hardware_walk(&root, Gfn::new(g), true, &guard);
                        assert!(matches!(hit, HwWalk::Hit { dirty: true, .. }), "{hit:?}");
                    }
                    for g in (0..HOT).step_by(2) {
                        let (spte, _) = tdp.leaf(AS0, Gfn::new(g), &guard).expect("never zapped");
                        assert!(
                            spte.is_dirty(),
                            "gfn {g}: the hardware's D bit was lost: {spte:?}"
                        );
                    }
                }
            }
        });
    });
    // After all joins: every leaf the hardware wrote after the last D clear still has D.
    let guard = rcu.pin();
    for g in (0..N).step_by(2) {
        let (spte, _) = tdp.leaf(AS0, Gfn::new(g), &guard).expect("never zapped");
        assert!(
            spte.is_dirty(),
            "gfn {g}: the hardware's D bit was lost: {spte:?}"
        );
        assert!(spte.is_writable());
    }
    for g in (1..N).step_by(2) {
        let (spte, _) = tdp.leaf(AS0, Gfn::new(g), &guard).expect("never zapped");
        assert!(
            spte.is_writable(),
            "gfn {g}: upgraded by a write fault: {spte:?}"
        );
        assert!(spte.writable_triple_is_valid());
    }
    drop(guard);
    {
        let mut mmu = lock.write();
        tdp.teardown(&mut mmu, flusher);
    }
    rcu.synchronize();
    let s = tdp.stats();
    assert_eq!(s.tables_allocated, s.tables_freed, "{s:?}");
    assert_eq!(s.roots_allocated, s.roots_freed, "{s:?}");
}

/// A zap that may yield, while a fault handler keeps contending for `mmu_lock`: every leaf in the
/// range is gone afterwards (restarts after yields skip nothing), leaves outside it are untouched,
/// a mid-zap flush happens only before a yield (at most one per 2M entry), and the zapped leaves
/// are either flushed or reported as needing a flush.
#[test]
fn zap_leafs_with_yields_under_contention_removes_every_leaf() {
    const LEAVES: u64 = 3 * 4096 + 100;
    let rcu = Arc::new(Rcu::new());
    let lock = MmuLock::new();
    let tdp = TdpMmu::new(1, Arc::clone(&rcu));
    for g in 0..LEAVES + 512 {
        assert_eq!(
            map_until_done(&tdp, &lock, &rcu, req(g, true)),
            FaultOutcome::Fixed
        );
    }
    let flusher = CountingFlusher::default();
    let done = AtomicBool::new(false);
    let (tdp_r, lock_r, rcu_r, done_r) = (&tdp, &lock, &*rcu, &done);
    let needs_flush = thread::scope(|s| {
        s.spawn(move || {
            // Faults outside the zapped range keep the lock contended.
            while !done_r.load(Ordering::Relaxed) {
                let out = map_until_done(tdp_r, lock_r, rcu_r, req(LEAVES + 7, false));
                assert_eq!(out, FaultOutcome::Spurious);
            }
        });
        let _stop = StopOnDrop(done_r);
        let mut mmu = lock.write();
        tdp.zap_leafs(AS0, range(0, LEAVES), &mut mmu, true, &flusher)
    });
    let yields = lock.stats().resched_yields;
    eprintln!("zap under contention: {yields} yields");
    let flushes = flusher.0.load(Ordering::Relaxed) as u64;
    // A zap flushes mid-walk only right before it yields `mmu_lock` to a waiter (P6), and it
    // yields at most once per 2M entry.
    assert!(
        flushes <= yields && flushes <= LEAVES.div_ceil(512),
        "flushes {flushes}, yields {yields}"
    );
    assert!(
        needs_flush || flushes > 0,
        "zapped leaves of a valid root are flushed by someone"
    );
    let guard = rcu.pin();
    for g in 0..LEAVES {
        assert!(
            tdp.leaf(AS0, Gfn::new(g), &guard).is_none(),
            "gfn {g} survived the zap"
        );
    }
    for g in LEAVES..LEAVES + 512 {
        assert!(
            tdp.leaf(AS0, Gfn::new(g), &guard).is_some(),
            "gfn {g} was outside the range"
        );
    }
    drop(guard);
    assert_eq!(tdp.stats().leaves_zapped, LEAVES);
    {
        let mut mmu = lock.write();
        tdp.teardown(&mut mmu, &flusher);
    }
    rcu.synchronize();
    let s = tdp.stats();
    assert_eq!(s.tables_allocated, s.tables_freed, "{s:?}");
}
