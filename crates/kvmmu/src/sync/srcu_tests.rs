//! Unit tests of the SRCU domain (`sync/srcu.rs`), kept in their own file so the module stays
//! small.

use super::*;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

/// How long a handshake waits for readers that are runnable before it declares them stuck. Far
/// beyond any scheduling delay on a loaded machine: reaching it means a reader never ran again (a
/// hang), not that it was slow. It bounds the wait; nothing is asserted about timing.
const STUCK: Duration = Duration::from_secs(120);

/// Read sections completed by each reader thread: the handshake that lets a writer wait until the
/// readers really ran alongside it, instead of hoping the scheduler ran them (on a loaded machine
/// it may not run them at all before the writers are done).
struct Sections {
    done: Vec<std::sync::atomic::AtomicUsize>,
    /// Set by a reader that panicked, so writers waiting on it fail instead of hanging.
    reader_panicked: AtomicBool,
}

/// Marks its reader dead if the reader unwinds (a failed assertion in a read section).
struct PanicFlag<'a>(&'a AtomicBool);

impl Drop for PanicFlag<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // ORDERING: SeqCst: a test flag; no data is published through it.
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

impl Sections {
    fn new(readers: usize) -> Sections {
        Sections {
            done: (0..readers)
                .map(|_| std::sync::atomic::AtomicUsize::new(0))
                .collect(),
            reader_panicked: AtomicBool::new(false),
        }
    }

    /// Reader `r` completed a section.
    fn record(&self, r: usize) {
        // ORDERING: SeqCst: test bookkeeping; the values themselves are checked by the readers.
        self.done[r].fetch_add(1, Ordering::SeqCst);
    }

    /// Sections completed so far, per reader.
    fn snapshot(&self) -> Vec<usize> {
        // ORDERING: SeqCst, as in `record`.
        self.done.iter().map(|d| d.load(Ordering::SeqCst)).collect()
    }

    /// Waits until every reader has completed a section after `seen` (a snapshot), yielding the
    /// CPU meanwhile. Panics if a reader panicked or, as a bound, if a reader never completes one.
    fn wait_all_past(&self, seen: &[usize]) {
        let since = Instant::now();
        loop {
            let now = self.snapshot();
            if now.iter().zip(seen).all(|(n, s)| n > s) {
                return;
            }
            // ORDERING: SeqCst, as in `PanicFlag::drop`.
            assert!(
                !self.reader_panicked.load(Ordering::SeqCst),
                "a reader panicked (see its message above)"
            );
            assert!(
                since.elapsed() < STUCK,
                "a runnable reader completed no read section for {STUCK:?}: {now:?} after {seen:?}"
            );
            std::thread::yield_now();
        }
    }
}

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
    // Readers check a value the writer poisons only after `Retired::wait`. After each retirement
    // the writer waits until every reader has completed a section since that replacement began,
    // so the readers run alongside every retirement however the threads are scheduled.
    struct Val(std::sync::atomic::AtomicU64);
    const READERS: usize = 2;
    const REPLACEMENTS: u64 = 200;
    let s = Srcu::new();
    let cell = SrcuCell::new(Arc::new(Val(std::sync::atomic::AtomicU64::new(0))));
    let stop = AtomicBool::new(false);
    let sections = Sections::new(READERS);
    std::thread::scope(|sc| {
        for r in 0..READERS {
            let (s, cell, stop, sections) = (&s, &cell, &stop, &sections);
            sc.spawn(move || {
                let _flag = PanicFlag(&sections.reader_panicked);
                // ORDERING: Relaxed: the stop flag publishes nothing.
                while !stop.load(Ordering::Relaxed) {
                    let g = s.read_lock();
                    let v = cell.load(&g);
                    let a = v.0.load(Ordering::Relaxed);
                    std::thread::yield_now();
                    let b = v.0.load(Ordering::Relaxed);
                    assert_ne!(a, u64::MAX, "read a retired (poisoned) value");
                    assert_eq!(a, b, "value poisoned inside a read section");
                    drop(g);
                    sections.record(r);
                }
            });
        }
        let stop_on_unwind = StopOnDrop(&stop);
        for i in 1..=REPLACEMENTS {
            let seen = sections.snapshot();
            let old = cell
                .replace(Arc::new(Val(std::sync::atomic::AtomicU64::new(i))), &s)
                .wait();
            old.0.store(u64::MAX, Ordering::Relaxed);
            sections.wait_all_past(&seen);
        }
        drop(stop_on_unwind);
    });
    for (r, n) in sections.snapshot().into_iter().enumerate() {
        assert!(
            n >= REPLACEMENTS as usize,
            "reader {r} ran {n} sections, fewer than one per replacement"
        );
    }
}

/// Sets the readers' stop flag when dropped, also when the writer unwinds (a failed handshake),
/// so the scope's readers end and the failure is reported instead of hanging the scope.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        // ORDERING: Relaxed: the stop flag publishes nothing.
        self.0.store(true, Ordering::Relaxed);
    }
}

#[test]
fn concurrent_writers_and_nested_readers_never_see_retired_values() {
    // Two writers (serialized by a mutex, as slots_lock does) plus a thread calling `synchronize`
    // on its own, against readers that nest sections. After each retirement a writer waits until
    // every reader has completed a section since its replacement began (a handshake), so the
    // readers provably run throughout the writers' work, on their own stripes, however loaded the
    // machine is.
    const READERS: usize = 2;
    const WRITERS: u64 = 2;
    const REPLACEMENTS: u64 = 100;
    let s = Srcu::new();
    let cell = SrcuCell::new(Arc::new(std::sync::atomic::AtomicU64::new(0)));
    let slots_lock = std::sync::Mutex::new(1u64);
    let stop = AtomicBool::new(false);
    let sections = Sections::new(READERS);
    std::thread::scope(|sc| {
        for r in 0..READERS {
            let (s, cell, stop, sections) = (&s, &cell, &stop, &sections);
            sc.spawn(move || {
                let _flag = PanicFlag(&sections.reader_panicked);
                // ORDERING: Relaxed: the stop flag publishes nothing.
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
                    drop(outer);
                    sections.record(r);
                }
            });
        }
        sc.spawn(|| {
            // ORDERING: Relaxed: the stop flag publishes nothing.
            while !stop.load(Ordering::Relaxed) {
                s.synchronize();
            }
        });
        let stop_on_unwind = StopOnDrop(&stop);
        let writers: Vec<_> = (0..WRITERS)
            .map(|_| {
                sc.spawn(|| {
                    for _ in 0..REPLACEMENTS {
                        let seen = sections.snapshot();
                        let retired = {
                            let mut next = slots_lock
                                .lock()
                                .expect("writer panicked holding the test lock");
                            *next += 1;
                            let v = Arc::new(std::sync::atomic::AtomicU64::new(*next));
                            cell.replace(v, &s)
                        };
                        retired.wait().store(u64::MAX, Ordering::Relaxed);
                        sections.wait_all_past(&seen);
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().expect("writer panicked");
        }
        drop(stop_on_unwind);
    });
    assert_eq!(
        cell.current().load(Ordering::Relaxed),
        1 + WRITERS * REPLACEMENTS
    );
    for (r, n) in sections.snapshot().into_iter().enumerate() {
        assert!(
            n >= REPLACEMENTS as usize,
            "reader {r} ran {n} sections, fewer than one per replacement of a writer"
        );
    }
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
