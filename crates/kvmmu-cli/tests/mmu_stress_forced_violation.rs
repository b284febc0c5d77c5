//! A host write-protect the MMU never hears about (no invalidation, so SPTEs and TLB entries
//! stay writable) must make `mmu-stress` fail on its read-only check, naming check and vCPU.

use kvmmu::prelude::*;
use kvmmu_cli::mmu_stress::{StressArgs, run_with};
use kvmmu_cli::{AgingArg, MmuArg};

fn args() -> StressArgs {
    StressArgs {
        vcpus: 2,
        max_mem: 2 << 20,
        slot_size: 1 << 20,
        mmu: MmuArg::Tdp,
        aging: AgingArg::Lockless,
        age: false,
        tlb_entries: 64,
        reclaim: false,
        limit: None,
        hugepages: false,
        nested: false,
    }
}

#[test]
fn write_protect_without_notifier_fails_the_read_only_check() {
    let silent =
        |host: &HostMm, hva: Hva, len: u64| host.mprotect_without_notifier(hva, len, Prot::READ);
    let err = run_with(&args(), &silent).expect_err("the violation must be caught");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("check 'no write lands while read-only' failed on vCPU"),
        "{msg}"
    );
}

#[test]
fn the_same_run_with_mprotect_passes() {
    let r = run_with(&args(), &kvmmu_cli::mmu_stress::mprotect_read_only).unwrap();
    assert!(r.passed, "{}", r.failures());
}
