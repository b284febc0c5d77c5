//! Aging through the host's notifier path: what clear_young / test_young / clear_flush_young report,
//! that lockless aging never takes mmu_lock, that locked aging does, and that aging never flushes TLBs
//! when the flush is elided.

mod common;

use common::*;
use kvmmu::prelude::*;

/// The default configuration with the given MMU.
fn base(mmu: MmuKind) -> VmConfig {
    VmConfig {
        mmu,
        ..VmConfig::default()
    }
}

/// Accessed bits cleared by whichever MMU the VM uses.
fn accessed_cleared(s: &VmStats) -> u64 {
    s.tdp.accessed_cleared + s.shadow.accessed_cleared
}

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

fn clear_young_reports_young_once_then_old(mmu: MmuKind) {
    for aging in [AgingMode::Lockless, AgingMode::Locked] {
        let (f, _vcpu) = populated(VmConfig { aging, ..base(mmu) }, 64);
        assert!(
            f.host.clear_young(f.hva, f.bytes).unwrap(),
            "{mmu:?} {aging:?}"
        );
        assert!(
            !f.host.clear_young(f.hva, f.bytes).unwrap(),
            "{mmu:?} {aging:?}"
        );
        assert_eq!(
            accessed_cleared(&f.vm.stats()),
            64,
            "{mmu:?} {aging:?}: every SPTE aged once"
        );
    }
}

fn test_young_reports_without_clearing(mmu: MmuKind) {
    let (f, _vcpu) = populated(base(mmu), 8);
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

fn lockless_aging_takes_no_mmu_lock_and_locked_aging_does(mmu: MmuKind) {
    let (f, _v) = populated(base(mmu), 32);
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
            ..base(mmu)
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

fn aging_does_not_flush_tlbs_unless_asked(mmu: MmuKind) {
    let (f, _v) = populated(base(mmu), 16);
    let before = f.vm.stats().remote_tlb_flush;
    f.host.clear_flush_young(f.hva, f.bytes).unwrap();
    assert_eq!(f.vm.stats().remote_tlb_flush, before, "ELIDE: no flush");

    let (f, mut v) = populated(
        VmConfig {
            elide_tlb_flush_if_young: false,
            ..base(mmu)
        },
        16,
    );
    v.read_u64(gpa(0)).unwrap();
    let before = f.vm.stats().remote_tlb_flush;
    assert!(f.host.clear_flush_young(f.hva, f.bytes).unwrap());
    assert_eq!(f.vm.stats().remote_tlb_flush, before + 1);
}

fn a_page_touched_only_through_a_cached_tlb_entry_looks_idle(mmu: MmuKind) {
    // Real x86 behaviour that the selftests warn about: aging does not flush TLBs.
    let (f, mut vcpu) = populated(base(mmu), 4);
    f.host.clear_young(f.hva, f.bytes).unwrap();
    vcpu.read_u64(gpa(1)).unwrap(); // TLB hit: no walk, no Accessed bit
    assert!(!f.host.test_young(hva_of(f.hva, 1)).unwrap());
}

#[test]
fn tdp_clear_young_reports_young_once_then_old() {
    clear_young_reports_young_once_then_old(MmuKind::Tdp);
}

#[test]
fn shadow_clear_young_reports_young_once_then_old() {
    clear_young_reports_young_once_then_old(MmuKind::Shadow);
}

#[test]
fn tdp_test_young_reports_without_clearing() {
    test_young_reports_without_clearing(MmuKind::Tdp);
}

#[test]
fn shadow_test_young_reports_without_clearing() {
    test_young_reports_without_clearing(MmuKind::Shadow);
}

#[test]
fn tdp_lockless_aging_takes_no_mmu_lock_and_locked_aging_does() {
    lockless_aging_takes_no_mmu_lock_and_locked_aging_does(MmuKind::Tdp);
}

#[test]
fn shadow_lockless_aging_takes_no_mmu_lock_and_locked_aging_does() {
    lockless_aging_takes_no_mmu_lock_and_locked_aging_does(MmuKind::Shadow);
}

#[test]
fn tdp_aging_does_not_flush_tlbs_unless_asked() {
    aging_does_not_flush_tlbs_unless_asked(MmuKind::Tdp);
}

#[test]
fn shadow_aging_does_not_flush_tlbs_unless_asked() {
    aging_does_not_flush_tlbs_unless_asked(MmuKind::Shadow);
}

#[test]
fn tdp_a_page_touched_only_through_a_cached_tlb_entry_looks_idle() {
    a_page_touched_only_through_a_cached_tlb_entry_looks_idle(MmuKind::Tdp);
}

#[test]
fn shadow_a_page_touched_only_through_a_cached_tlb_entry_looks_idle() {
    a_page_touched_only_through_a_cached_tlb_entry_looks_idle(MmuKind::Shadow);
}
