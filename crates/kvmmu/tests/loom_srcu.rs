//! Loom models of the memslot SRCU (and of the loom build's RCU epoch).
//!
//! Run with `.ci/loom` (release, `--cfg loom`, own target dir, bounded preemptions).
//!
//! Each retired value is *poisoned* (a flag set) instead of freed, and kept alive until the model
//! ends, so a reader that can still reach a retired value detects it with an assertion instead of
//! touching freed memory. Models stay at two threads.
#![cfg(loom)]

use kvmmu::internals::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use kvmmu::internals::sync::{Arc, Rcu, Srcu, SrcuCell};
use loom::thread;

/// A published value that the writer poisons once it believes no reader can reach it.
struct Obj {
    value: u64,
    poisoned: AtomicBool,
}

impl Obj {
    fn new(value: u64) -> Arc<Obj> {
        Arc::new(Obj {
            value,
            poisoned: AtomicBool::new(false),
        })
    }

    /// Asserts the value is still live (the property every model checks).
    fn check(&self) {
        assert!(
            !self.poisoned.load(Ordering::Relaxed),
            "SRCU invariant 1 violated: value {} retired while a pre-existing reader uses it",
            self.value
        );
    }
}

/// Which grace-period implementation the writer uses.
#[derive(Clone, Copy)]
enum Sync {
    Correct,
    BrokenSingleFlip,
}

/// Reader: one read section that checks the loaded value at its start and at its end. Writer: two
/// replace + grace period + poison rounds (the single-flip bug needs a reader that straddles two).
fn reader_vs_two_grace_periods(sync: Sync) {
    let srcu = Arc::new(Srcu::new());
    let cell = Arc::new(SrcuCell::new(Obj::new(0)));

    let reader = {
        let srcu = srcu.clone();
        let cell = cell.clone();
        thread::spawn(move || {
            let g = srcu.read_lock();
            let v = cell.load(&g);
            v.check();
            thread::yield_now();
            v.check();
            drop(g);
        })
    };

    let mut retired = Vec::new();
    for i in 1..=2 {
        let r = cell.replace(Obj::new(i), &srcu);
        let old = match sync {
            Sync::Correct => r.wait(),
            Sync::BrokenSingleFlip => r.wait_broken_single_flip(),
        };
        old.poisoned.store(true, Ordering::Relaxed);
        // Keep the allocation alive: a violating reader must see the poison, not freed memory.
        retired.push(old);
    }
    reader.join().expect("reader panicked");
    assert_eq!(cell.current().value, 2);
}

fn builder_with_at_least_two_preemptions() -> loom::model::Builder {
    let mut b = loom::model::Builder::new();
    if let Some(p) = b.preemption_bound {
        b.preemption_bound = Some(p.max(2));
    }
    b
}

#[test]
fn srcu_reader_never_sees_retired_value() {
    static EXECUTIONS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    builder_with_at_least_two_preemptions().check(|| {
        EXECUTIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        reader_vs_two_grace_periods(Sync::Correct)
    });
    let n = EXECUTIONS.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("srcu_reader_never_sees_retired_value: {n} executions");
    assert!(n > 100, "the model explored only {n} interleavings");
}

/// The negative control: the model must catch the classic single-flip SRCU bug. If this test
/// fails, the models above prove nothing.
#[test]
fn srcu_single_flip_bug_is_caught() {
    let result = std::panic::catch_unwind(|| {
        builder_with_at_least_two_preemptions()
            .check(|| reader_vs_two_grace_periods(Sync::BrokenSingleFlip));
    });
    let payload = result
        .expect_err("loom explored every interleaving without catching the single-flip SRCU bug");
    let msg = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("<non-string panic>");
    assert!(
        msg.contains("SRCU invariant 1 violated"),
        "the broken model failed for another reason: {msg}"
    );
}

/// Nested read sections: the inner guard may land on the other index after a flip; dropping it
/// must not end the outer section's protection.
#[test]
fn srcu_nested_read_sections_keep_outer_protection() {
    loom::model(|| {
        let srcu = Arc::new(Srcu::new());
        let cell = Arc::new(SrcuCell::new(Obj::new(0)));

        let reader = {
            let srcu = srcu.clone();
            let cell = cell.clone();
            thread::spawn(move || {
                let outer = srcu.read_lock();
                let v_outer = cell.load(&outer);
                {
                    let inner = srcu.read_lock();
                    let v_inner = cell.load(&inner);
                    v_inner.check();
                }
                v_outer.check();
                drop(outer);
            })
        };

        let old = cell.replace(Obj::new(1), &srcu).wait();
        old.poisoned.store(true, Ordering::Relaxed);
        reader.join().expect("reader panicked");
        drop(old);
    });
}

/// The loom build's RCU epoch: a callback deferred while a reader is pinned runs only after the
/// reader unpins, and `synchronize` runs every callback.
#[test]
fn rcu_deferred_free_waits_for_pinned_reader() {
    loom::model(|| {
        let rcu = Arc::new(Rcu::new());
        let obj = Obj::new(7);
        let published = Arc::new(AtomicU64::new(1)); // 1 = obj reachable, 0 = unlinked
        let frees = Arc::new(AtomicU64::new(0));

        let reader = {
            let (rcu, obj, published) = (rcu.clone(), obj.clone(), published.clone());
            thread::spawn(move || {
                let g = rcu.pin();
                if published.load(Ordering::Acquire) == 1 {
                    obj.check();
                    thread::yield_now();
                    obj.check();
                }
                drop(g);
            })
        };

        {
            let g = rcu.pin();
            published.store(0, Ordering::Release);
            let (obj, frees) = (obj.clone(), frees.clone());
            g.defer(move || {
                obj.poisoned.store(true, Ordering::Relaxed);
                frees.fetch_add(1, Ordering::Relaxed);
            });
        }
        reader.join().expect("reader panicked");
        rcu.synchronize();
        assert_eq!(rcu.pending(), 0);
        assert_eq!(frees.load(Ordering::Relaxed), 1, "freed exactly once");
    });
}

/// Grace periods from two threads at once (they serialize on the domain's grace-period lock) still
/// protect a reader: three threads, the reader checks at both ends of its section.
#[test]
fn srcu_concurrent_synchronize_callers_protect_reader() {
    loom::model(|| {
        let srcu = Arc::new(Srcu::new());
        let cell = Arc::new(SrcuCell::new(Obj::new(0)));

        let reader = {
            let (srcu, cell) = (srcu.clone(), cell.clone());
            thread::spawn(move || {
                let g = srcu.read_lock();
                let v = cell.load(&g);
                v.check();
                thread::yield_now();
                v.check();
            })
        };
        let other = {
            let srcu = srcu.clone();
            thread::spawn(move || srcu.synchronize())
        };

        let old = cell.replace(Obj::new(1), &srcu).wait();
        old.poisoned.store(true, Ordering::Relaxed);
        reader.join().expect("reader panicked");
        other.join().expect("synchronizer panicked");
        drop(old);
    });
}
