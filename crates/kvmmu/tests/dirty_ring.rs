//! The dirty ring on both MMUs: entries in push order, collect/reset re-arming, the soft-limit
//! exit, exclusivity with bitmaps, typed errors, and the concurrent no-lost-write harness.

mod common;
#[path = "common/dirty.rs"]
mod dirty;

use common::{BASE_GPA, fixture, gpa, region};
use dirty::{harvest_ring, ring_fixture, ring_stale_tlb_write_is_reported, run_ring};
use kvmmu::internals::vm::dirty_ring::{DIRTY_RING_RESERVED, DirtyRingEntry, DirtyRingError};
use kvmmu::prelude::*;

const MMUS: [MmuKind; 2] = [MmuKind::Tdp, MmuKind::Shadow];

#[test]
fn the_ring_reports_each_write_in_order_and_reset_rearms() {
    for mmu in MMUS {
        let f = ring_fixture(mmu, 64, 256);
        let mut vcpu = f.vm.create_vcpu().unwrap();
        for p in [7, 3, 7, 9] {
            vcpu.write_u64(gpa(p), p).unwrap();
        }
        let got: Vec<u64> =
            f.vm.collect_dirty_rings()
                .unwrap()
                .iter()
                .map(|e| e.offset)
                .collect();
        assert_eq!(
            got,
            [7, 3, 9],
            "{mmu:?}: one entry per write fault, in order"
        );
        assert!(
            f.vm.collect_dirty_rings().unwrap().is_empty(),
            "collected once"
        );
        assert!(
            f.vm.spte(AsId::new(0), gpa(7).gfn())
                .unwrap()
                .0
                .is_writable()
        );
        assert_eq!(f.vm.reset_dirty_rings().unwrap(), 3);
        assert!(
            !f.vm
                .spte(AsId::new(0), gpa(7).gfn())
                .unwrap()
                .0
                .is_writable(),
            "{mmu:?}"
        );
        vcpu.write_u64(gpa(7), 1).unwrap();
        assert_eq!(
            f.vm.collect_dirty_rings().unwrap(),
            [DirtyRingEntry {
                as_id: AsId::new(0),
                slot: SlotId::new(0),
                offset: 7
            }]
        );
        assert_eq!(
            f.vm.get_dirty_log(AsId::new(0), SlotId::new(0)),
            Err(DirtyLogError::RingInUse),
            "no bitmap with the ring"
        );
    }
}

#[test]
fn a_write_through_a_tlb_entry_cached_before_a_ring_reset_is_reported() {
    for mmu in MMUS {
        assert!(ring_stale_tlb_write_is_reported(mmu), "{mmu:?}");
    }
}

#[test]
fn a_soft_full_ring_exits_after_the_fault_and_a_reset_lets_the_vcpu_go_on() {
    for mmu in MMUS {
        let entries = 2 * DIRTY_RING_RESERVED;
        let soft = u64::from(entries - DIRTY_RING_RESERVED);
        let f = ring_fixture(mmu, 2 * soft, entries);
        let mut vcpu = f.vm.create_vcpu().unwrap();
        for p in 0..soft - 1 {
            vcpu.write_u64(gpa(p), 1).unwrap();
        }
        // The fault that reaches the soft limit is handled (its entry pushed), then the vCPU exits.
        assert_eq!(
            vcpu.write_u64(gpa(soft - 1), 1),
            Err(VcpuExit::DirtyRingFull)
        );
        // While full, it exits again without faulting (no push past the soft limit).
        assert_eq!(vcpu.write_u64(gpa(soft), 1), Err(VcpuExit::DirtyRingFull));
        let mut dest = vec![0u64; 2 * soft as usize];
        assert_eq!(
            harvest_ring(&f.vm, &f.host, f.hva, &mut dest),
            soft,
            "{mmu:?}"
        );
        vcpu.write_u64(gpa(soft - 1), 2).unwrap();
        vcpu.write_u64(gpa(soft), 2).unwrap();
        let offsets: Vec<u64> =
            f.vm.collect_dirty_rings()
                .unwrap()
                .iter()
                .map(|e| e.offset)
                .collect();
        assert_eq!(offsets, [soft - 1, soft], "{mmu:?}");
    }
}

#[test]
fn bad_ring_calls_are_typed_errors_that_change_nothing() {
    let f = fixture(64 * 4096, VmConfig::default());
    assert_eq!(
        f.vm.enable_dirty_ring(100),
        Err(DirtyRingError::NotPowerOfTwo(100))
    );
    assert!(matches!(
        f.vm.enable_dirty_ring(64),
        Err(DirtyRingError::BadSize { size: 64, .. })
    ));
    assert_eq!(f.vm.collect_dirty_rings(), Err(DirtyRingError::NotEnabled));
    assert_eq!(f.vm.reset_dirty_rings(), Err(DirtyRingError::NotEnabled));
    // A slot already logging into a bitmap.
    let mut r = region(0, BASE_GPA, f.bytes, f.hva);
    r.flags = MemFlags::LOG_DIRTY_PAGES;
    f.vm.set_user_memory_region(r).unwrap();
    assert_eq!(
        f.vm.enable_dirty_ring(256),
        Err(DirtyRingError::BitmapInUse {
            slot: SlotId::new(0)
        })
    );
    r.flags = MemFlags::empty();
    f.vm.set_user_memory_region(r).unwrap();
    f.vm.set_dirty_tracking(DirtyTracking::DBit).unwrap();
    assert_eq!(
        f.vm.enable_dirty_ring(256),
        Err(DirtyRingError::DBitTracking)
    );
    f.vm.set_dirty_tracking(DirtyTracking::WriteProtect)
        .unwrap();
    let _vcpu = f.vm.create_vcpu().unwrap();
    assert_eq!(f.vm.enable_dirty_ring(256), Err(DirtyRingError::VcpusExist));
    assert_eq!(
        f.vm.collect_dirty_rings(),
        Err(DirtyRingError::NotEnabled),
        "still disabled"
    );
    // After enabling (on a fresh VM): D-bit tracking and a second enable are refused.
    let g = fixture(64 * 4096, VmConfig::default());
    g.vm.enable_dirty_ring(256).unwrap();
    assert_eq!(
        g.vm.enable_dirty_ring(256),
        Err(DirtyRingError::AlreadyEnabled)
    );
    assert_eq!(
        g.vm.set_dirty_tracking(DirtyTracking::DBit),
        Err(DirtyLogError::RingInUse)
    );
}

#[test]
fn concurrent_ring_harvests_with_lockless_aging_lose_no_write() {
    for mmu in MMUS {
        for seed in 1..=2 {
            let n = run_ring(mmu, 2, 96, 10_000, seed).unwrap_or_else(|e| panic!("{mmu:?}: {e}"));
            assert!(n > 0);
        }
    }
}
