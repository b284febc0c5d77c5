//! loom model: a page fault racing an invalidation (spec §3.3, §4 items 9–11).
//!
//! The invalidator runs `invalidate_range_start` (begin + range_add + zap under mmu_lock write),
//! changes the host PTE, then `invalidate_range_end` (seq++ under mmu_lock write). The fault snapshots
//! the sequence, reads the host PTE (GUP), and under mmu_lock read installs what it read unless
//! `retry_gfn` says retry. Property: at the end the SPTE is empty or maps the host's *current* frame.
//! A broken fault that skips the check must be caught by the same model.
#![cfg(loom)]

use kvmmu::internals::addr::{Gfn, GfnRange};
use kvmmu::internals::sync::Arc;
use kvmmu::internals::sync::atomic::{AtomicU64, Ordering};
use kvmmu::internals::sync::witness::MmuLock;
use kvmmu::internals::vm::seq::InvalidateState;

const EMPTY: u64 = 0;

struct World {
    mmu_lock: MmuLock,
    inv: InvalidateState,
    host_pte: AtomicU64,
    spte: AtomicU64,
}

fn model(check_retry: bool) {
    loom::model(move || {
        let w = Arc::new(World {
            mmu_lock: MmuLock::new(),
            inv: InvalidateState::new(),
            host_pte: AtomicU64::new(1),
            spte: AtomicU64::new(EMPTY),
        });
        let gfn = Gfn::new(7);

        let inv = {
            let w = w.clone();
            loom::thread::spawn(move || {
                {
                    let g = w.mmu_lock.write();
                    w.inv.begin(g.witness());
                    w.inv
                        .range_add(GfnRange::from_len(gfn, 1).unwrap(), g.witness())
                        .unwrap();
                    w.spte.store(EMPTY, Ordering::Relaxed); // zap
                }
                w.host_pte.store(2, Ordering::Release); // the host changes its PTE
                let g = w.mmu_lock.write();
                w.inv.end(g.witness()).unwrap();
            })
        };

        // The fault.
        let snap = w.inv.snapshot();
        let frame = w.host_pte.load(Ordering::Acquire); // GUP
        {
            let g = w.mmu_lock.read();
            if !check_retry || !w.inv.retry_gfn(snap, gfn, g.witness()) {
                w.spte.store(frame, Ordering::Relaxed);
            }
        }
        inv.join().unwrap();

        let spte = w.spte.load(Ordering::Relaxed);
        let host = w.host_pte.load(Ordering::Relaxed);
        assert!(
            spte == EMPTY || spte == host,
            "stale SPTE survived the invalidation: maps frame {spte}, host has {host}"
        );
        assert_eq!(w.inv.counters().in_progress, 0);
    });
}

#[test]
fn fault_that_raced_an_invalidation_installs_nothing_stale() {
    model(true);
}

#[test]
fn the_model_catches_a_fault_that_skips_the_retry_check() {
    let caught = std::panic::catch_unwind(|| model(false));
    assert!(caught.is_err(), "the broken fault path must be caught");
}
