//! Dirty logging with bitmaps, on both MMUs: write-protection on enable, classic and manual
//! harvests, INITIALLY_SET, the fast page fault, disabling, typed errors that change nothing,
//! and aging never clearing Dirty.

mod common;
#[path = "common/dirty.rs"]
mod dirty;

use common::{BASE_GPA, Fixture, fixture, gpa, region};
use dirty::stale_tlb_write_is_reported;
use kvmmu::prelude::*;

const PAGES: u64 = 200;
const MMUS: [MmuKind; 2] = [MmuKind::Tdp, MmuKind::Shadow];
const S0: SlotId = SlotId::new(0);
const AS0: AsId = AsId::new(0);

fn vm_with(mmu: MmuKind) -> Fixture {
    fixture(
        PAGES * 4096,
        VmConfig {
            mmu,
            ..VmConfig::default()
        },
    )
}

fn set_logging(f: &Fixture, on: bool) {
    let mut r = region(0, BASE_GPA, f.bytes, f.hva);
    if on {
        r.flags = MemFlags::LOG_DIRTY_PAGES;
    }
    f.vm.set_user_memory_region(r).expect("flags change");
}

fn pages_of(words: &[u64]) -> Vec<u64> {
    let mut v = Vec::new();
    for (i, &w) in words.iter().enumerate() {
        for b in 0..64 {
            if w & (1 << b) != 0 {
                v.push(i as u64 * 64 + b);
            }
        }
    }
    v
}

fn spte(f: &Fixture, page: u64) -> Spte {
    f.vm.spte(AS0, gpa(page).gfn()).expect("mapped").0
}

use kvmmu::internals::mmu::spte::Spte;

#[test]
fn enabling_logging_write_protects_every_leaf_and_keeps_mmu_writable() {
    for mmu in MMUS {
        let f = vm_with(mmu);
        let mut vcpu = f.vm.create_vcpu().unwrap();
        for p in 0..10 {
            vcpu.write_u64(gpa(p), p).unwrap();
        }
        set_logging(&f, true);
        for p in 0..10 {
            let s = spte(&f, p);
            assert!(
                !s.is_writable() && s.is_mmu_writable(),
                "{mmu:?} page {p}: {s:?}"
            );
        }
        assert_eq!(
            pages_of(&f.vm.get_dirty_log(AS0, S0).unwrap()),
            Vec::<u64>::new()
        );
    }
}

#[test]
fn classic_get_reports_each_written_page_once_and_rearms() {
    for mmu in MMUS {
        let f = vm_with(mmu);
        set_logging(&f, true);
        let mut vcpu = f.vm.create_vcpu().unwrap();
        for p in [3, 64, 65, 199] {
            vcpu.write_u64(gpa(p), p).unwrap();
        }
        vcpu.read_u64(gpa(7)).unwrap();
        let words = f.vm.get_dirty_log(AS0, S0).unwrap();
        assert_eq!(words.len(), 4);
        assert_eq!(pages_of(&words), [3, 64, 65, 199], "{mmu:?}");
        assert!(!spte(&f, 64).is_writable(), "{mmu:?}: re-armed");
        assert_eq!(
            pages_of(&f.vm.get_dirty_log(AS0, S0).unwrap()),
            Vec::<u64>::new()
        );
        vcpu.write_u64(gpa(64), 1).unwrap();
        assert_eq!(
            pages_of(&f.vm.get_dirty_log(AS0, S0).unwrap()),
            [64],
            "{mmu:?}"
        );
    }
}

#[test]
fn a_write_through_a_tlb_entry_cached_before_rearming_is_reported() {
    for mmu in MMUS {
        for tracking in [DirtyTracking::WriteProtect, DirtyTracking::DBit] {
            for manual in [false, true] {
                assert!(
                    stale_tlb_write_is_reported(mmu, tracking, manual),
                    "{mmu:?} {tracking:?} manual={manual}"
                );
            }
        }
    }
}

#[test]
fn manual_get_does_not_rearm_and_clear_rearms_exactly_its_range() {
    for mmu in MMUS {
        let f = vm_with(mmu);
        f.vm.set_dirty_log_protect(DirtyLogProtect::Manual {
            initially_set: false,
        })
        .unwrap();
        set_logging(&f, true);
        let mut vcpu = f.vm.create_vcpu().unwrap();
        for p in [1, 70, 130] {
            vcpu.write_u64(gpa(p), 1).unwrap();
        }
        let first = f.vm.get_dirty_log(AS0, S0).unwrap();
        assert_eq!(pages_of(&first), [1, 70, 130]);
        assert_eq!(
            f.vm.get_dirty_log(AS0, S0).unwrap(),
            first,
            "{mmu:?}: GET does not clear"
        );
        assert!(spte(&f, 70).is_writable(), "{mmu:?}: GET does not re-arm");
        f.vm.clear_dirty_log(AS0, S0, 64, 64, &[u64::MAX]).unwrap();
        assert_eq!(pages_of(&f.vm.get_dirty_log(AS0, S0).unwrap()), [1, 130]);
        assert!(
            !spte(&f, 70).is_writable(),
            "{mmu:?}: cleared page re-armed"
        );
        assert!(
            spte(&f, 1).is_writable() && spte(&f, 130).is_writable(),
            "{mmu:?}"
        );
        // The last, partial word may be cleared with a length that ends at the slot's end.
        f.vm.clear_dirty_log(AS0, S0, 128, PAGES - 128, &[u64::MAX; 2])
            .unwrap();
        assert_eq!(pages_of(&f.vm.get_dirty_log(AS0, S0).unwrap()), [1]);
    }
}

#[test]
fn clear_rearms_only_the_pages_in_its_mask() {
    for mmu in MMUS {
        let f = vm_with(mmu);
        f.vm.set_dirty_log_protect(DirtyLogProtect::Manual {
            initially_set: false,
        })
        .unwrap();
        set_logging(&f, true);
        let mut vcpu = f.vm.create_vcpu().unwrap();
        for p in [0, 1, 2] {
            vcpu.write_u64(gpa(p), 1).unwrap();
        }
        // Page 2 was dirtied after the user's GET saw only pages 0 and 1.
        f.vm.clear_dirty_log(AS0, S0, 0, 64, &[0b011]).unwrap();
        assert_eq!(
            pages_of(&f.vm.get_dirty_log(AS0, S0).unwrap()),
            [2],
            "{mmu:?}"
        );
        assert!(
            !spte(&f, 0).is_writable() && spte(&f, 2).is_writable(),
            "{mmu:?}"
        );
    }
}

#[test]
fn initially_set_reports_every_page_and_write_protects_nothing_until_cleared() {
    for mmu in MMUS {
        let f = vm_with(mmu);
        let mut vcpu = f.vm.create_vcpu().unwrap();
        vcpu.write_u64(gpa(9), 1).unwrap();
        f.vm.set_dirty_log_protect(DirtyLogProtect::Manual {
            initially_set: true,
        })
        .unwrap();
        set_logging(&f, true);
        let all = pages_of(&f.vm.get_dirty_log(AS0, S0).unwrap());
        assert_eq!(all, (0..PAGES).collect::<Vec<_>>(), "{mmu:?}");
        assert!(
            spte(&f, 9).is_writable(),
            "{mmu:?}: not write-protected on enable"
        );
        f.vm.clear_dirty_log(AS0, S0, 0, PAGES, &[u64::MAX; 4])
            .unwrap();
        assert!(!spte(&f, 9).is_writable(), "{mmu:?}");
        assert!(f.vm.get_dirty_log(AS0, S0).unwrap().iter().all(|&w| w == 0));
    }
}

#[test]
fn the_fast_page_fault_fixes_rearmed_writes_without_mmu_lock_on_both_mmus() {
    for mmu in MMUS {
        let f = vm_with(mmu);
        set_logging(&f, true);
        let mut vcpu = f.vm.create_vcpu().unwrap();
        for p in 0..32 {
            vcpu.write_u64(gpa(p), 1).unwrap();
        }
        assert_eq!(pages_of(&f.vm.get_dirty_log(AS0, S0).unwrap()).len(), 32);
        let before = f.vm.stats();
        for p in 0..32 {
            vcpu.write_u64(gpa(p), 2).unwrap();
        }
        let after = f.vm.stats();
        let (fast, fixed) = (
            after.pf_fast - before.pf_fast,
            after.pf_fixed - before.pf_fixed,
        );
        assert_eq!(
            (fast, fixed),
            (32, 0),
            "{mmu:?}: every re-armed write fixed fast"
        );
        assert_eq!(
            (
                after.mmu_lock.read_acquisitions,
                after.mmu_lock.write_acquisitions
            ),
            (
                before.mmu_lock.read_acquisitions,
                before.mmu_lock.write_acquisitions
            ),
            "{mmu:?}: the fast path takes no mmu_lock"
        );
        assert_eq!(pages_of(&f.vm.get_dirty_log(AS0, S0).unwrap()).len(), 32);
    }
}

#[test]
fn disabling_logging_drops_the_bitmap_and_writes_come_back_lazily() {
    for mmu in MMUS {
        let f = vm_with(mmu);
        set_logging(&f, true);
        let mut vcpu = f.vm.create_vcpu().unwrap();
        vcpu.write_u64(gpa(4), 1).unwrap();
        f.vm.get_dirty_log(AS0, S0).unwrap();
        set_logging(&f, false);
        assert!(
            !spte(&f, 4).is_writable(),
            "{mmu:?}: nothing changes on disable"
        );
        vcpu.write_u64(gpa(4), 2).unwrap();
        assert!(spte(&f, 4).is_writable(), "{mmu:?}");
        assert_eq!(vcpu.read_u64(gpa(4)).unwrap(), 2);
        assert_eq!(
            f.vm.get_dirty_log(AS0, S0),
            Err(DirtyLogError::NotLogging { slot: S0 })
        );
    }
}

#[test]
fn bad_dirty_log_calls_are_typed_errors_that_change_nothing() {
    let f = vm_with(MmuKind::Tdp);
    assert_eq!(
        f.vm.get_dirty_log(AS0, S0),
        Err(DirtyLogError::NotLogging { slot: S0 })
    );
    assert_eq!(
        f.vm.get_dirty_log(AS0, SlotId::new(9)),
        Err(DirtyLogError::NoSuchSlot {
            as_id: AS0,
            slot: SlotId::new(9)
        })
    );
    set_logging(&f, true);
    let mut vcpu = f.vm.create_vcpu().unwrap();
    vcpu.write_u64(gpa(70), 1).unwrap();
    assert_eq!(
        f.vm.clear_dirty_log(AS0, S0, 64, 64, &[u64::MAX]),
        Err(DirtyLogError::NotManualProtect)
    );
    f.vm.set_dirty_log_protect(DirtyLogProtect::Manual {
        initially_set: false,
    })
    .unwrap();
    for (first, n, err) in [
        (
            1,
            64,
            DirtyLogError::UnalignedRange {
                first_page: 1,
                num_pages: 64,
            },
        ),
        (
            64,
            10,
            DirtyLogError::UnalignedRange {
                first_page: 64,
                num_pages: 10,
            },
        ),
        (
            192,
            64,
            DirtyLogError::RangePastSlot {
                first_page: 192,
                num_pages: 64,
                npages: PAGES,
            },
        ),
        (
            u64::MAX - 63,
            64,
            DirtyLogError::RangePastSlot {
                first_page: u64::MAX - 63,
                num_pages: 64,
                npages: PAGES,
            },
        ),
    ] {
        assert_eq!(
            f.vm.clear_dirty_log(AS0, S0, first, n, &[u64::MAX]),
            Err(err)
        );
    }
    assert_eq!(
        f.vm.clear_dirty_log(AS0, S0, 0, 128, &[u64::MAX]),
        Err(DirtyLogError::MaskTooShort {
            words: 1,
            needed: 2
        })
    );
    assert_eq!(
        pages_of(&f.vm.get_dirty_log(AS0, S0).unwrap()),
        [70],
        "unchanged"
    );
    assert!(
        spte(&f, 70).is_writable(),
        "no refused call re-armed anything"
    );
    let mut g = vcpu.enter();
    assert!(matches!(
        f.vm.get_dirty_log(AS0, S0),
        Err(DirtyLogError::InGuestMode(_))
    ));
    drop(g.read_u64(gpa(70)));
}

#[test]
fn aging_never_clears_dirty_or_loses_a_logged_page() {
    for mmu in MMUS {
        let f = vm_with(mmu);
        set_logging(&f, true);
        let mut vcpu = f.vm.create_vcpu().unwrap();
        vcpu.write_u64(gpa(11), 1).unwrap();
        assert!(spte(&f, 11).is_dirty());
        for _ in 0..3 {
            f.host.clear_young(f.hva, f.bytes).unwrap();
        }
        let s = spte(&f, 11);
        assert!(s.is_dirty() && !s.is_accessed(), "{mmu:?}: {s:?}");
        assert_eq!(pages_of(&f.vm.get_dirty_log(AS0, S0).unwrap()), [11]);
    }
}

/// One scripted run: writes and reads, harvests after each step; returns every harvest.
fn scripted_harvests(mmu: MmuKind, tracking: DirtyTracking, manual: bool) -> Vec<Vec<u64>> {
    let f = vm_with(mmu);
    f.vm.set_dirty_tracking(tracking).unwrap();
    if manual {
        f.vm.set_dirty_log_protect(DirtyLogProtect::Manual {
            initially_set: false,
        })
        .unwrap();
    }
    let mut vcpu = f.vm.create_vcpu().unwrap();
    // Some pages mapped (read or written) before logging starts.
    for p in [0, 1, 100] {
        vcpu.write_u64(gpa(p), 1).unwrap();
    }
    vcpu.read_u64(gpa(2)).unwrap();
    set_logging(&f, true);
    let steps: [&[u64]; 5] = [&[0, 2, 3], &[], &[0, 0, 150], &[1, 2, 3, 4, 199], &[100]];
    let mut out = Vec::new();
    for (i, pages) in steps.iter().enumerate() {
        for &p in *pages {
            vcpu.write_u64(gpa(p), i as u64).unwrap();
        }
        vcpu.read_u64(gpa(5 + i as u64)).unwrap();
        let words = f.vm.get_dirty_log(AS0, S0).unwrap();
        if manual {
            f.vm.clear_dirty_log(AS0, S0, 0, PAGES, &words).unwrap();
        }
        out.push(pages_of(&words));
    }
    out
}

#[test]
fn d_bit_tracking_and_write_protection_give_identical_bitmaps() {
    for mmu in MMUS {
        for manual in [false, true] {
            let wp = scripted_harvests(mmu, DirtyTracking::WriteProtect, manual);
            let db = scripted_harvests(mmu, DirtyTracking::DBit, manual);
            assert_eq!(wp, db, "{mmu:?} manual={manual}");
            assert_eq!(wp[0], [0, 2, 3], "{mmu:?} manual={manual}");
            assert!(wp[1].is_empty());
        }
    }
}

#[test]
fn d_bit_tracking_keeps_leaves_writable_and_rearms_by_clearing_dirty() {
    for mmu in MMUS {
        let f = vm_with(mmu);
        f.vm.set_dirty_tracking(DirtyTracking::DBit).unwrap();
        set_logging(&f, true);
        let mut vcpu = f.vm.create_vcpu().unwrap();
        vcpu.write_u64(gpa(8), 1).unwrap();
        assert_eq!(pages_of(&f.vm.get_dirty_log(AS0, S0).unwrap()), [8]);
        let s = spte(&f, 8);
        assert!(s.is_writable() && !s.is_dirty(), "{mmu:?}: {s:?}");
        let before = f.vm.stats();
        vcpu.write_u64(gpa(8), 2).unwrap();
        assert_eq!(
            f.vm.stats().faults,
            before.faults,
            "{mmu:?}: no fault in D-bit mode"
        );
        assert_eq!(
            pages_of(&f.vm.get_dirty_log(AS0, S0).unwrap()),
            [8],
            "{mmu:?}"
        );
        assert_eq!(
            f.vm.set_dirty_tracking(DirtyTracking::WriteProtect),
            Err(DirtyLogError::TrackingInUse { slot: S0 })
        );
        assert_eq!(f.vm.dirty_tracking(), DirtyTracking::DBit, "unchanged");
    }
}
