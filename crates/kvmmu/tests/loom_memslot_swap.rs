//! loom model: a memslot swap racing an `invalidate_range_start` … `invalidate_range_end` pair
//! (spec §4 items 2–3; `vm/mod.rs` `swap_memslots`, `vm/invalidate.rs`).
//!
//! The real `Vm` is not loom-compilable, so the model restates the pairing protocol against the
//! real `sync` types — `RankedMutex` (`mn_invalidate_lock` holding `mn_active_invalidate_count`),
//! the facade `Condvar` (`mn_memslots_update`), `Srcu` and `SrcuCell` (the published set):
//! - the invalidator increments the count under the mutex, reads the active set under SRCU (start),
//!   reads it again under SRCU (end), then decrements the count and wakes the swapper at zero;
//! - the swapper waits under the mutex until the count is zero, publishes the new set while still
//!   holding it, drops it, and waits for an SRCU grace period.
//!
//! Property: start and end of one pair see the same memslot set, and the count returns to 0. A
//! swapper that does not wait for the count must be caught by the same model.
//!
//! Run with `.ci/loom` (release, `--cfg loom`, own target dir, bounded preemptions).
#![cfg(loom)]

use kvmmu::internals::sync::lock_rank::LockRank;
use kvmmu::internals::sync::witness::RankedMutex;
use kvmmu::internals::sync::{Arc, Condvar, Srcu, SrcuCell};
use loom::thread;

struct World {
    srcu: Srcu,
    /// The active memslot set, named by its generation.
    slots: SrcuCell<u64>,
    /// `mn_invalidate_lock` protecting `mn_active_invalidate_count`.
    mn_invalidate: RankedMutex<u64>,
    /// `mn_memslots_update`.
    mn_memslots_update: Condvar,
}

fn model(swapper_waits: bool) {
    loom::model(move || {
        let w = Arc::new(World {
            srcu: Srcu::new(),
            slots: SrcuCell::new(Arc::new(1)),
            mn_invalidate: RankedMutex::new(LockRank::MnInvalidate, 0),
            mn_memslots_update: Condvar::new(),
        });

        let swapper = {
            let w = w.clone();
            thread::spawn(move || {
                let mut mn = w.mn_invalidate.lock();
                while swapper_waits && *mn != 0 {
                    mn.wait(&w.mn_memslots_update);
                }
                let retired = w.slots.replace(Arc::new(2), &w.srcu);
                drop(mn);
                drop(retired.wait());
            })
        };

        // invalidate_range_start: count, then walk the memslots.
        *w.mn_invalidate.lock() += 1;
        let at_start = {
            let g = w.srcu.read_lock();
            *w.slots.load(&g)
        };
        // invalidate_range_end: walk the memslots again, then uncount and wake the swapper.
        let at_end = {
            let g = w.srcu.read_lock();
            *w.slots.load(&g)
        };
        let wake = {
            let mut mn = w.mn_invalidate.lock();
            *mn -= 1;
            *mn == 0
        };
        if wake {
            w.mn_memslots_update.notify_all();
        }
        swapper.join().unwrap();

        assert_eq!(
            at_start, at_end,
            "invalidate_range_start saw memslot set {at_start}, its end saw {at_end}"
        );
        assert_eq!(
            *w.mn_invalidate.lock(),
            0,
            "mn_active_invalidate_count unbalanced"
        );
    });
}

#[test]
fn invalidate_start_and_end_see_the_same_memslots() {
    model(true);
}

#[test]
fn the_model_catches_a_swap_that_ignores_the_invalidate_count() {
    let caught = std::panic::catch_unwind(|| model(false));
    assert!(
        caught.is_err(),
        "a swapper that does not wait for in-flight invalidations must be caught"
    );
}
