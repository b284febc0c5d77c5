//! Unit tests of the rmap encoding, the bit lock (spec §4 items 21–24) and the writers.

use super::*;
use crate::sync::atomic::{AtomicBool, AtomicU64};
use crate::sync::witness::MmuLock;
use std::time::Duration;

const YOUNG: u64 = SPTE_PRESENT_MASK | SPTE_ACCESSED_MASK | (1 << 9) | 0x7;

/// SPTE slots that outlive every rmap of a test.
struct Slots(Box<[AtomicU64]>);

impl Slots {
    fn new(n: usize, value: u64) -> Slots {
        Slots((0..n).map(|_| AtomicU64::new(value)).collect())
    }
    fn ptr(&self, i: usize) -> SptePtr {
        // SAFETY: every test drops (or zaps) its rmaps before its `Slots`, so the slot outlives every
        // use of the pointer.
        unsafe { SptePtr::new(&self.0[i]) }
    }
    fn value(&self, i: usize) -> u64 {
        self.0[i].load(Ordering::Relaxed)
    }
}

fn entries(head: &RmapHead, w: &MmuWrite, stats: &RmapStats) -> Vec<SptePtr> {
    let mut v = Vec::new();
    head.for_each_spte(w, stats, |s| v.push(s));
    v
}

#[test]
fn desc_is_two_cache_lines_metadata_first() {
    assert_eq!(core::mem::size_of::<PteListDesc>(), 128);
    assert_eq!(core::mem::align_of::<PteListDesc>(), 64);
}

#[test]
fn lock_of_empty_rmap_returns_zero_and_leaves_it_empty() {
    let stats = RmapStats::new();
    let head = RmapHead::new();
    let g = head.lock_readonly(&stats);
    assert_eq!(g.locked_value(), 0);
    assert!(!g.is_locked());
    assert_eq!(
        head.raw_value(),
        0,
        "locking an empty rmap wrote the LOCKED bit"
    );
    g.unlock();
    assert_eq!(head.raw_value(), 0);
}

#[test]
fn readonly_unlock_of_zero_is_a_noop_even_if_the_rmap_was_filled_meanwhile() {
    let slots = Slots::new(2, YOUNG);
    let stats = RmapStats::new();
    let lock = MmuLock::new();
    let head = RmapHead::new();
    let g = head.lock_readonly(&stats);
    assert_eq!(g.locked_value(), 0);
    {
        let w = lock.write();
        // A writer is not blocked by the empty guard (nothing was locked).
        assert_eq!(head.pte_list_add(w.witness(), &stats, slots.ptr(0)), 0);
    }
    let filled = head.raw_value();
    assert_eq!(filled, slots.ptr(0).addr());
    drop(g);
    assert_eq!(
        head.raw_value(),
        filled,
        "the unlock of 0 overwrote a new chain"
    );
    let w = lock.write();
    assert!(head.zap_all(w.witness(), &stats, |_| {}));
}

#[test]
fn readonly_lock_sets_locked_and_unlock_restores_exactly() {
    let slots = Slots::new(20, YOUNG);
    let stats = RmapStats::new();
    let lock = MmuLock::new();
    let head = RmapHead::new();
    for n in 1..=20 {
        {
            let w = lock.write();
            head.pte_list_add(w.witness(), &stats, slots.ptr(n - 1));
        }
        let before = head.raw_value();
        assert_eq!(before & RMAP_LOCKED, 0);
        let g = head.lock_readonly(&stats);
        assert_eq!(g.locked_value(), before);
        assert_eq!(head.raw_value(), before | RMAP_LOCKED);
        let mut seen = 0;
        let _ = g.for_each_spte(|_| {
            seen += 1;
            ControlFlow::Continue(())
        });
        assert_eq!(seen, n);
        g.unlock();
        assert_eq!(
            head.raw_value(),
            before,
            "read-only unlock did not restore the value"
        );
    }
    let w = lock.write();
    assert!(head.zap_all(w.witness(), &stats, |_| {}));
}

#[test]
fn locked_bit_never_appears_alone() {
    let slots = Slots::new(30, YOUNG);
    let stats = RmapStats::new();
    let lock = MmuLock::new();
    let head = RmapHead::new();
    let check = |head: &RmapHead| {
        let v = head.raw_value();
        assert_ne!(v, RMAP_LOCKED, "0 | LOCKED appeared");
        let g = head.lock_readonly(&stats);
        assert_ne!(
            head.raw_value(),
            RMAP_LOCKED,
            "0 | LOCKED appeared under a lock"
        );
        drop(g);
    };
    for i in 0..30 {
        let w = lock.write();
        head.pte_list_add(w.witness(), &stats, slots.ptr(i));
        drop(w);
        check(&head);
    }
    for i in (0..30).rev() {
        let w = lock.write();
        head.pte_list_remove(w.witness(), &stats, slots.ptr(i))
            .expect("entry present");
        drop(w);
        check(&head);
    }
    assert_eq!(head.raw_value(), 0);
}

#[test]
fn add_returns_the_count_before_the_add() {
    let slots = Slots::new(40, YOUNG);
    let stats = RmapStats::new();
    let lock = MmuLock::new();
    let head = RmapHead::new();
    let w = lock.write();
    for i in 0..40 {
        assert_eq!(head.pte_list_add(w.witness(), &stats, slots.ptr(i)), i);
        assert_eq!(head.count(w.witness(), &stats), i + 1);
    }
    // 40 = 12 in the head + 2 full tails.
    assert_eq!(
        head.shape(w.witness(), &stats),
        RmapShape::Many(vec![
            DescShape {
                spte_count: 12,
                tail_count: 28
            },
            DescShape {
                spte_count: 14,
                tail_count: 14
            },
            DescShape {
                spte_count: 14,
                tail_count: 0
            },
        ])
    );
    assert!(head.zap_all(w.witness(), &stats, |_| {}));
}

#[test]
fn remove_fills_the_hole_with_the_head_last_entry_and_never_returns_to_single() {
    let slots = Slots::new(16, YOUNG);
    let stats = RmapStats::new();
    let lock = MmuLock::new();
    let head = RmapHead::new();
    let w = lock.write();
    let w = w.witness();
    head.pte_list_add(w, &stats, slots.ptr(0));
    assert_eq!(head.shape(w, &stats), RmapShape::Single);
    head.pte_list_add(w, &stats, slots.ptr(1));
    head.pte_list_remove(w, &stats, slots.ptr(0))
        .expect("present");
    assert_eq!(
        head.shape(w, &stats),
        RmapShape::Many(vec![DescShape {
            spte_count: 1,
            tail_count: 0
        }]),
        "a MANY chain converted back to a single pointer"
    );
    assert_eq!(entries(&head, w, &stats), vec![slots.ptr(1)]);
    head.pte_list_remove(w, &stats, slots.ptr(1))
        .expect("present");
    assert_eq!(head.raw_value(), 0);
    assert_eq!(stats.snapshot().live_descriptors(), 0);

    // 16 entries: head [14, 15], tail [0..14). Removing 3 from the tail moves 15 into its slot.
    for i in 0..16 {
        head.pte_list_add(w, &stats, slots.ptr(i));
    }
    head.pte_list_remove(w, &stats, slots.ptr(3))
        .expect("present");
    let e = entries(&head, w, &stats);
    assert_eq!(e[0], slots.ptr(14));
    assert_eq!(
        e[1 + 3],
        slots.ptr(15),
        "the hole was not filled with the head's last entry"
    );
    assert_eq!(
        head.shape(w, &stats),
        RmapShape::Many(vec![
            DescShape {
                spte_count: 1,
                tail_count: 14
            },
            DescShape {
                spte_count: 14,
                tail_count: 0
            },
        ])
    );
    // Emptying the head descriptor frees it and makes the full tail the head.
    head.pte_list_remove(w, &stats, slots.ptr(14))
        .expect("present");
    assert_eq!(
        head.shape(w, &stats),
        RmapShape::Many(vec![DescShape {
            spte_count: 14,
            tail_count: 0
        }])
    );
    assert_eq!(stats.snapshot().live_descriptors(), 1);
    assert!(head.zap_all(w, &stats, |_| {}));
}

#[test]
fn failed_remove_is_an_error_and_leaves_the_rmap_unchanged() {
    let slots = Slots::new(20, YOUNG);
    let stats = RmapStats::new();
    let lock = MmuLock::new();
    let head = RmapHead::new();
    let w = lock.write();
    let w = w.witness();
    assert_eq!(
        head.pte_list_remove(w, &stats, slots.ptr(0)),
        Err(RmapError::Empty { spte: slots.ptr(0) })
    );
    assert_eq!(head.raw_value(), 0);
    for n in [1, 5, 19] {
        for i in head.count(w, &stats)..n {
            head.pte_list_add(w, &stats, slots.ptr(i));
        }
        let (raw, shape, e) = (
            head.raw_value(),
            head.shape(w, &stats),
            entries(&head, w, &stats),
        );
        assert_eq!(
            head.pte_list_remove(w, &stats, slots.ptr(19)),
            Err(RmapError::NotFound {
                spte: slots.ptr(19)
            })
        );
        assert_eq!(
            head.raw_value(),
            raw,
            "unlock after a failed remove changed the head"
        );
        assert_eq!(head.shape(w, &stats), shape);
        assert_eq!(entries(&head, w, &stats), e);
    }
    assert!(head.zap_all(w, &stats, |_| {}));
}

#[test]
fn zap_all_clears_every_spte_and_frees_every_descriptor() {
    let slots = Slots::new(45, YOUNG);
    let stats = RmapStats::new();
    let lock = MmuLock::new();
    let head = RmapHead::new();
    let w = lock.write();
    let w = w.witness();
    assert!(!head.zap_all(w, &stats, |_| panic!(
        "zap_all of an empty rmap called back"
    )));
    for i in 0..45 {
        head.pte_list_add(w, &stats, slots.ptr(i));
    }
    let s = stats.snapshot();
    assert_eq!(s.live_descriptors(), 4);
    assert!(head.zap_all(w, &stats, |spte| {
        let _ = spte.clear_accessed();
    }));
    assert!(!head.zap_all(w, &stats, |_| {}), "second zap found entries");
    let s = stats.snapshot();
    assert_eq!(s.desc_allocs, 4);
    assert_eq!(s.desc_frees, 4, "descriptors leaked by zap_all");
    assert_eq!(head.raw_value(), 0);
    assert!(
        (0..45).all(|i| slots.value(i) & SPTE_ACCESSED_MASK == 0),
        "zap_all skipped an SPTE"
    );
}

#[test]
fn age_clears_accessed_only_on_present_sptes_and_keeps_other_bits() {
    let slots = Slots::new(20, YOUNG);
    let stats = RmapStats::new();
    let lock = MmuLock::new();
    let head = RmapHead::new();
    // Slot 0: non-present but with bit 8 set (must be skipped); slot 1: present, not accessed.
    slots.0[0].store(SPTE_ACCESSED_MASK | (1 << 63), Ordering::Relaxed);
    slots.0[1].store(SPTE_PRESENT_MASK | 0x7, Ordering::Relaxed);
    {
        let w = lock.write();
        for i in 0..20 {
            head.pte_list_add(w.witness(), &stats, slots.ptr(i));
        }
    }
    assert!(head.age_rmap(&stats, AgeAction::Clear));
    assert_eq!(
        slots.value(0),
        SPTE_ACCESSED_MASK | (1 << 63),
        "aging touched a non-present SPTE"
    );
    assert_eq!(slots.value(1), SPTE_PRESENT_MASK | 0x7);
    for i in 2..20 {
        assert_eq!(slots.value(i), YOUNG & !SPTE_ACCESSED_MASK, "slot {i}");
    }
    assert_eq!(
        head.raw_value() & RMAP_LOCKED,
        0,
        "age_rmap left the bit set"
    );
    assert!(
        !head.age_rmap(&stats, AgeAction::Clear),
        "nothing is young any more"
    );
    assert!(!head.age_rmap(&stats, AgeAction::TestOnly));
    let w = lock.write();
    assert!(head.zap_all(w.witness(), &stats, |_| {}));
}

#[test]
fn test_only_aging_modifies_nothing_and_reports_young() {
    let slots = Slots::new(16, SPTE_PRESENT_MASK);
    slots.0[9].store(YOUNG, Ordering::Relaxed);
    let stats = RmapStats::new();
    let lock = MmuLock::new();
    let head = RmapHead::new();
    {
        let w = lock.write();
        for i in 0..16 {
            head.pte_list_add(w.witness(), &stats, slots.ptr(i));
        }
    }
    let raw = head.raw_value();
    assert!(head.age_rmap(&stats, AgeAction::TestOnly));
    assert_eq!(slots.value(9), YOUNG, "test_only aging cleared A");
    assert_eq!(
        head.raw_value(),
        raw,
        "test_only returned without unlocking"
    );
    assert!(!RmapHead::new().age_rmap(&stats, AgeAction::TestOnly));
    let w = lock.write();
    assert!(head.zap_all(w.witness(), &stats, |_| {}));
}

#[test]
fn bit_lock_is_mutually_exclusive_and_counts_contention() {
    let slots = Slots::new(3, YOUNG);
    let stats = RmapStats::new();
    let lock = MmuLock::new();
    let head = RmapHead::new();
    {
        let w = lock.write();
        head.pte_list_add(w.witness(), &stats, slots.ptr(0));
        head.pte_list_add(w.witness(), &stats, slots.ptr(1));
    }
    let inside = AtomicUsize::new(0);
    let overlap = AtomicBool::new(false);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                for _ in 0..2000 {
                    let g = head.lock_readonly(&stats);
                    assert!(g.is_locked());
                    if inside.fetch_add(1, Ordering::SeqCst) != 0 {
                        overlap.store(true, Ordering::SeqCst);
                    }
                    inside.fetch_sub(1, Ordering::SeqCst);
                    drop(g);
                }
            });
        }
        s.spawn(|| {
            for i in 0..500 {
                let w = lock.write();
                head.for_each_spte(w.witness(), &stats, |_| {
                    if inside.fetch_add(1, Ordering::SeqCst) != 0 {
                        overlap.store(true, Ordering::SeqCst);
                    }
                    inside.fetch_sub(1, Ordering::SeqCst);
                });
                if i % 2 == 0 {
                    head.pte_list_add(w.witness(), &stats, slots.ptr(2));
                } else {
                    head.pte_list_remove(w.witness(), &stats, slots.ptr(2))
                        .expect("added in the previous round");
                }
            }
        });
    });
    assert!(
        !overlap.load(Ordering::SeqCst),
        "two holders of the rmap bit at once"
    );

    // A deterministic contended acquisition: hold the bit until the other thread is waiting.
    let before = stats.snapshot().lock_contended;
    let started = AtomicBool::new(false);
    std::thread::scope(|s| {
        let g = head.lock_readonly(&stats);
        let h = s.spawn(|| {
            started.store(true, Ordering::SeqCst);
            head.lock_readonly(&stats).is_locked()
        });
        while !started.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        std::thread::sleep(Duration::from_millis(50));
        drop(g);
        assert!(h.join().expect("locker panicked"));
    });
    assert!(
        stats.snapshot().lock_contended > before,
        "a waiting acquisition was not counted"
    );
    let w = lock.write();
    assert!(head.zap_all(w.witness(), &stats, |_| {}));
}

#[cfg(debug_assertions)]
#[test]
#[should_panic(expected = "self-deadlock")]
fn nested_rmap_operation_in_a_walk_is_caught_in_debug_builds() {
    let slots = Slots::new(1, YOUNG);
    let stats = RmapStats::new();
    let lock = MmuLock::new();
    let head = RmapHead::new();
    let w = lock.write();
    head.pte_list_add(w.witness(), &stats, slots.ptr(0));
    head.for_each_spte(w.witness(), &stats, |s| {
        let _ = head.pte_list_remove(w.witness(), &stats, s);
    });
}

#[test]
fn max_rmap_size_is_the_longest_rmap_a_leaf_insertion_found() {
    let slots = Slots::new(20, YOUNG);
    let stats = RmapStats::new();
    let lock = MmuLock::new();
    let (a, b) = (RmapHead::new(), RmapHead::new());
    let w = lock.write();
    for i in 0..17 {
        assert_eq!(a.rmap_add(w.witness(), &stats, slots.ptr(i)), i);
    }
    assert_eq!(
        stats.snapshot().max_rmap_size,
        16,
        "KVM counts the entries found"
    );
    // A shorter rmap, and parent-list style `pte_list_add`s, leave the maximum alone.
    b.rmap_add(w.witness(), &stats, slots.ptr(17));
    b.rmap_add(w.witness(), &stats, slots.ptr(18));
    for i in 0..17 {
        a.pte_list_remove(w.witness(), &stats, slots.ptr(i))
            .expect("added above");
    }
    for i in 0..19 {
        a.pte_list_add(w.witness(), &stats, slots.ptr(i));
    }
    assert_eq!(stats.snapshot().max_rmap_size, 16);
    assert!(a.zap_all(w.witness(), &stats, |_| {}));
    assert!(b.zap_all(w.witness(), &stats, |_| {}));
}

#[test]
fn writer_and_readonly_waits_on_the_bit_are_counted_apart() {
    let slots = Slots::new(2, YOUNG);
    let stats = RmapStats::new();
    let lock = MmuLock::new();
    let head = RmapHead::new();
    head.pte_list_add(lock.write().witness(), &stats, slots.ptr(0));
    let before = stats.snapshot();
    // Hold the bit read-only until the other thread's acquisition has seen it held (it counts
    // itself then), so the wait is certain, whatever the scheduling.
    let wait_for = |count: fn(&RmapStatsSnapshot) -> u64, locker: &(dyn Fn() + Sync)| {
        std::thread::scope(|s| {
            let g = head.lock_readonly(&stats);
            let t = s.spawn(locker);
            while count(&stats.snapshot()) == count(&before) {
                std::thread::yield_now();
            }
            drop(g);
            t.join().expect("locker panicked");
        });
    };
    wait_for(|s| s.lock_contended_writer, &|| {
        head.pte_list_add(lock.write().witness(), &stats, slots.ptr(1));
    });
    let mid = stats.snapshot();
    assert_eq!(mid.lock_contended_writer, before.lock_contended_writer + 1);
    assert_eq!(mid.lock_contended_readonly, before.lock_contended_readonly);
    wait_for(|s| s.lock_contended_readonly, &|| {
        assert!(head.lock_readonly(&stats).is_locked());
    });
    let after = stats.snapshot();
    assert_eq!(
        after.lock_contended_readonly,
        mid.lock_contended_readonly + 1
    );
    assert_eq!(after.lock_contended_writer, mid.lock_contended_writer);
    assert_eq!(
        after.lock_contended,
        after.lock_contended_writer + after.lock_contended_readonly
    );
    assert!(head.zap_all(lock.write().witness(), &stats, |_| {}));
}
