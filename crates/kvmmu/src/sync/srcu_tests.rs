//! Unit tests of the SRCU domain (`sync/srcu.rs`), kept in their own file so the module stays
//! small.

use super::*;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

#[test]
fn srcu_types_are_send_and_sync_guard_is_not_send() {
    fn send_sync<T: Send + Sync>() -> bool {
        !core::any::type_name::<T>().is_empty()
    }
    fn sync<T: Sync>() -> bool {
        !core::any::type_name::<T>().is_empty()
    }
    assert!(send_sync::<Srcu>());
    assert!(send_sync::<SrcuCell<Vec<u8>>>());
    // A guard may be shared with scoped threads but stays on its thread (its rank does).
    assert!(sync::<SrcuGuard<'static>>());
}

#[test]
fn read_lock_then_unlock_balances_counters() {
    let s = Srcu::new();
    {
        let _a = s.read_lock();
        let _b = s.read_lock();
        assert!(!s.readers_done(0));
    }
    assert!(s.readers_done(0));
    assert!(s.readers_done(1));
}

#[test]
fn synchronize_without_readers_returns() {
    let s = Srcu::new();
    s.synchronize();
    s.synchronize();
    assert!(s.readers_done(0) && s.readers_done(1));
}

#[test]
fn synchronize_waits_for_preexisting_reader() {
    let s = Srcu::new();
    let released = AtomicBool::new(false);
    let synced = AtomicBool::new(false);
    std::thread::scope(|sc| {
        let g = s.read_lock();
        sc.spawn(|| {
            s.synchronize();
            synced.store(true, Ordering::SeqCst);
            assert!(
                released.load(Ordering::SeqCst),
                "synchronize returned while a pre-existing reader was inside"
            );
        });
        std::thread::sleep(Duration::from_millis(30));
        assert!(!synced.load(Ordering::SeqCst));
        released.store(true, Ordering::SeqCst);
        drop(g);
    });
    assert!(synced.load(Ordering::SeqCst));
}

#[test]
fn replace_hands_back_old_value_after_grace_period() {
    let s = Srcu::new();
    let cell = SrcuCell::new(Arc::new(1u64));
    let old = cell.replace(Arc::new(2), &s).wait();
    assert_eq!(*old, 1);
    assert_eq!(
        Arc::strong_count(&old),
        1,
        "cell must drop its count of the old value"
    );
    assert_eq!(*cell.current(), 2);
    let g = s.read_lock();
    assert_eq!(*cell.load(&g), 2);
}

#[test]
fn retired_values_are_never_freed_under_readers() {
    // Readers check a value the writer poisons only after `Retired::wait`.
    struct Val(std::sync::atomic::AtomicU64);
    let s = Srcu::new();
    let cell = SrcuCell::new(Arc::new(Val(std::sync::atomic::AtomicU64::new(0))));
    let stop = AtomicBool::new(false);
    let sections = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|sc| {
        for _ in 0..2 {
            sc.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let g = s.read_lock();
                    let v = cell.load(&g);
                    let a = v.0.load(Ordering::Relaxed);
                    std::thread::yield_now();
                    let b = v.0.load(Ordering::Relaxed);
                    assert_ne!(a, u64::MAX, "read a retired (poisoned) value");
                    assert_eq!(a, b, "value poisoned inside a read section");
                    sections.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        // Keep replacing until the readers have run a fair number of sections concurrently.
        let mut i = 1u64;
        while i < 200 || (sections.load(Ordering::Relaxed) < 200 && i < 100_000) {
            let old = cell
                .replace(Arc::new(Val(std::sync::atomic::AtomicU64::new(i))), &s)
                .wait();
            old.0.store(u64::MAX, Ordering::Relaxed);
            i += 1;
        }
        stop.store(true, Ordering::Relaxed);
    });
    assert!(sections.load(Ordering::Relaxed) > 0, "readers never ran");
}

#[test]
fn concurrent_writers_and_nested_readers_never_see_retired_values() {
    // Two writers (serialized by a mutex, as slots_lock does) plus a thread calling
    // `synchronize` on its own, against readers that nest sections.
    let s = Srcu::new();
    let cell = SrcuCell::new(Arc::new(std::sync::atomic::AtomicU64::new(0)));
    let slots_lock = std::sync::Mutex::new(1u64);
    let stop = AtomicBool::new(false);
    let sections = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|sc| {
        for _ in 0..2 {
            sc.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let outer = s.read_lock();
                    let a = cell.load(&outer);
                    let inner = s.read_lock();
                    let b = cell.load(&inner);
                    std::thread::yield_now();
                    assert_ne!(b.load(Ordering::Relaxed), u64::MAX, "inner value retired");
                    drop(inner);
                    std::thread::yield_now();
                    // The outer section still protects what it loaded.
                    assert_ne!(a.load(Ordering::Relaxed), u64::MAX, "outer value retired");
                    sections.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        sc.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                s.synchronize();
            }
        });
        let writers: Vec<_> = (0..2)
            .map(|_| {
                sc.spawn(|| {
                    for _ in 0..100 {
                        let retired = {
                            let mut next = slots_lock
                                .lock()
                                .expect("writer panicked holding the test lock");
                            *next += 1;
                            let v = Arc::new(std::sync::atomic::AtomicU64::new(*next));
                            cell.replace(v, &s)
                        };
                        retired.wait().store(u64::MAX, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().expect("writer panicked");
        }
        stop.store(true, Ordering::Relaxed);
    });
    assert_eq!(cell.current().load(Ordering::Relaxed), 201);
    assert!(sections.load(Ordering::Relaxed) > 0, "readers never ran");
}

#[test]
#[should_panic(expected = "two different Srcu domains")]
fn cell_rejects_second_domain() {
    let a = Srcu::new();
    let b = Srcu::new();
    let cell = SrcuCell::new(Arc::new(0u8));
    let _ = cell.replace(Arc::new(1), &a).wait();
    let g = b.read_lock();
    let _ = cell.load(&g);
}

#[test]
fn cell_binding_survives_moving_the_srcu() {
    let s = Srcu::new();
    let cell = SrcuCell::new(Arc::new(0u8));
    let _ = cell.replace(Arc::new(1), &s).wait();
    let moved = Box::new(s);
    let g = moved.read_lock();
    assert_eq!(*cell.load(&g), 1);
}

#[test]
fn dropping_retired_waits_and_frees() {
    let s = Srcu::new();
    let v = Arc::new(5u32);
    let cell = SrcuCell::new(v.clone());
    drop(cell.replace(Arc::new(6), &s));
    assert_eq!(Arc::strong_count(&v), 1);
    drop(cell);
}

#[cfg(debug_assertions)]
#[test]
#[should_panic(expected = "waiting for an SRCU grace period while holding memslots SRCU")]
fn synchronize_inside_read_section_panics() {
    let s = Srcu::new();
    let _g = s.read_lock();
    s.synchronize();
}
