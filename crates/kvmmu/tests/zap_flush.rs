//! Zaps flush remote TLBs only when they must: before yielding `mmu_lock`, before dropping RCU over
//! unlinked tables, and once at the end.

mod common;

use common::*;
use kvmmu::prelude::*;

const MIB: u64 = 1 << 20;

/// Touches every page of the fixture's memslot, so the notifier has leaves to zap.
fn touch_all(f: &Fixture) {
    let mut vcpu = f.vm.create_vcpu().unwrap();
    let mut guest = vcpu.enter();
    for p in 0..f.bytes / 4096 {
        guest.write_u64(gpa(p), p).unwrap();
    }
}

#[test]
fn an_uncontended_munmap_of_256_mib_makes_exactly_one_remote_flush() {
    let f = fixture(256 * MIB, VmConfig::default());
    touch_all(&f);
    let before = f.vm.stats();
    f.host.munmap(f.hva, f.bytes).unwrap();
    let after = f.vm.stats();
    assert_eq!(
        after.tdp.leaves_zapped - before.tdp.leaves_zapped,
        f.bytes / 4096,
        "every touched page was zapped"
    );
    assert_eq!(
        after.remote_tlb_flush - before.remote_tlb_flush,
        1,
        "one flush for the whole uncontended zap (the kernel's flush_on_ret)"
    );
}

#[test]
fn an_uncontended_reset_flushes_once_for_the_reload_and_once_for_the_freed_tables() {
    let f = fixture(64 * MIB, VmConfig::default());
    touch_all(&f);
    let before = f.vm.stats();
    f.vm.reset_mmu();
    let after = f.vm.stats();
    assert!(after.tdp.leaves_zapped - before.tdp.leaves_zapped >= f.bytes / 4096);
    assert_eq!(
        after.remote_tlb_flush - before.remote_tlb_flush,
        2,
        "the waiting reload request, then one flush before the unlinked tables' RCU guard drops"
    );
}

#[test]
fn deleting_a_touched_memslot_makes_exactly_one_remote_flush() {
    let f = fixture(64 * MIB, VmConfig::default());
    touch_all(&f);
    let before = f.vm.stats();
    f.vm.set_user_memory_region(region(0, BASE_GPA, 0, f.hva))
        .unwrap();
    let after = f.vm.stats();
    assert_eq!(
        after.tdp.leaves_zapped - before.tdp.leaves_zapped,
        f.bytes / 4096
    );
    assert_eq!(after.remote_tlb_flush - before.remote_tlb_flush, 1);
}
