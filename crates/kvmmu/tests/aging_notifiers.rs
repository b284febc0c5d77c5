//! Aging through the host's notifier path: what clear_young / test_young / clear_flush_young report,
//! that lockless aging never takes mmu_lock, that locked aging does, and that aging never flushes TLBs
//! when the flush is elided.

mod common;

use common::*;
use kvmmu::prelude::*;

fn populated(config: VmConfig, pages: u64) -> (Fixture, Vcpu) {
    let f = fixture(pages * 4096, config);
    let mut vcpu = f.vm.create_vcpu().unwrap();
    let mut g = vcpu.enter();
    for p in 0..pages {
        g.write_u64(gpa(p), p + 1).unwrap();
    }
    drop(g);
    (f, vcpu)
}

#[test]
fn clear_young_reports_young_once_then_old() {
    for aging in [AgingMode::Lockless, AgingMode::Locked] {
        let (f, _vcpu) = populated(
            VmConfig {
                aging,
                ..VmConfig::default()
            },
            64,
        );
        assert!(f.host.clear_young(f.hva, f.bytes).unwrap(), "{aging:?}");
        assert!(!f.host.clear_young(f.hva, f.bytes).unwrap(), "{aging:?}");
        assert_eq!(
            f.vm.stats().tdp.accessed_cleared,
            64,
            "{aging:?}: every SPTE aged once"
        );
    }
}

#[test]
fn test_young_reports_without_clearing() {
    let (f, _vcpu) = populated(VmConfig::default(), 8);
    // The host's own young bits were set by GUP; clear everything once.
    f.host.clear_young(f.hva, f.bytes).unwrap();
    assert!(!f.host.test_young(f.hva).unwrap());
    let mut vcpu = f.vm.create_vcpu().unwrap();
    vcpu.read_u64(gpa(0)).unwrap(); // new vCPU: empty TLB, so the walk sets Accessed
    assert!(f.host.test_young(f.hva).unwrap());
    assert!(
        f.host.test_young(f.hva).unwrap(),
        "test_young must not clear"
    );
    assert!(!f.host.test_young(hva_of(f.hva, 1)).unwrap());
}

#[test]
fn lockless_aging_takes_no_mmu_lock_and_locked_aging_does() {
    let (f, _v) = populated(VmConfig::default(), 32);
    let before = f.vm.stats().mmu_lock;
    for _ in 0..10 {
        f.host.clear_young(f.hva, f.bytes).unwrap();
        f.host.test_young(f.hva).unwrap();
        f.host.clear_flush_young(f.hva, f.bytes).unwrap();
    }
    let after = f.vm.stats().mmu_lock;
    assert_eq!(before.write_acquisitions, after.write_acquisitions);
    assert_eq!(before.read_acquisitions, after.read_acquisitions);

    let (f, _v) = populated(
        VmConfig {
            aging: AgingMode::Locked,
            ..VmConfig::default()
        },
        32,
    );
    let before = f.vm.stats().mmu_lock;
    for _ in 0..10 {
        f.host.clear_young(f.hva, f.bytes).unwrap();
    }
    let after = f.vm.stats().mmu_lock;
    assert_eq!(after.write_acquisitions - before.write_acquisitions, 10);
}

#[test]
fn aging_does_not_flush_tlbs_unless_asked() {
    let (f, _v) = populated(VmConfig::default(), 16);
    let before = f.vm.stats().remote_tlb_flushes;
    f.host.clear_flush_young(f.hva, f.bytes).unwrap();
    assert_eq!(f.vm.stats().remote_tlb_flushes, before, "ELIDE: no flush");

    let (f, mut v) = populated(
        VmConfig {
            elide_tlb_flush_if_young: false,
            ..VmConfig::default()
        },
        16,
    );
    v.read_u64(gpa(0)).unwrap();
    let before = f.vm.stats().remote_tlb_flushes;
    assert!(f.host.clear_flush_young(f.hva, f.bytes).unwrap());
    assert_eq!(f.vm.stats().remote_tlb_flushes, before + 1);
}

#[test]
fn a_page_touched_only_through_a_cached_tlb_entry_looks_idle() {
    // Real x86 behaviour that the selftests warn about: aging does not flush TLBs.
    let (f, mut vcpu) = populated(VmConfig::default(), 4);
    f.host.clear_young(f.hva, f.bytes).unwrap();
    vcpu.read_u64(gpa(1)).unwrap(); // TLB hit: no walk, no Accessed bit
    assert!(!f.host.test_young(hva_of(f.hva, 1)).unwrap());
}
