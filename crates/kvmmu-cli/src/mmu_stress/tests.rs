//! Tests of `kvmmu mmu-stress`: every stage on both MMUs, and the checks that must fail.

use super::*;

fn args() -> StressArgs {
    StressArgs {
        vcpus: 2,
        max_mem: 4 << 20,
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
fn every_stage_passes_with_the_vcpus_in_l2_on_both_mmus() {
    for mmu in [MmuArg::Tdp, MmuArg::Shadow] {
        let mut a = args();
        a.nested = true;
        a.mmu = mmu;
        a.age = true;
        let r = run(&a).unwrap();
        assert!(r.passed, "{mmu:?}: {}", r.failures());
        assert!(r.counts["indirect_shadow_pages"] > 0);
    }
}

#[test]
fn with_hugepages_every_stage_passes_and_run_1_maps_2m_leaves() {
    for mmu in [MmuArg::Tdp, MmuArg::Shadow] {
        let mut a = args();
        a.hugepages = true;
        a.mmu = mmu;
        a.slot_size = 4 << 20;
        a.max_mem = 8 << 20;
        let r = run(&a).unwrap();
        assert!(r.passed, "{mmu:?}: {}", r.failures());
        // Two slots alias the 4M buffer: 2 x 2 huge pages.
        assert_eq!(r.counts["pages_2m_after_run_1"], 4, "{mmu:?}");
        assert_eq!(r.config["backing_src"], "anonymous_hugetlb_2mb");
    }
}

#[test]
fn hugepages_need_a_2m_multiple_slot_size() {
    let mut a = args();
    a.hugepages = true;
    a.slot_size = 3 << 20;
    let e = run(&a).unwrap_err().to_string();
    assert!(e.contains("multiple of 2M"), "{e}");
}

#[test]
fn every_stage_passes_under_a_memory_limit_with_reclaim() {
    let mut a = args();
    a.reclaim = true;
    a.limit = Some(512 << 10);
    let r = run(&a).unwrap();
    assert!(r.passed, "{}", r.failures());
    assert!(r.counts["evicted"] > 0 && r.counts["refaults"] > 0);
    a.limit = Some(2 << 20);
    assert!(run(&a).unwrap_err().to_string().contains("--limit"));
}

#[test]
fn bad_flags_are_refused_before_running() {
    let mut a = args();
    a.vcpus = 0;
    assert!(run(&a).unwrap_err().to_string().contains("--vcpus"));
    let mut a = args();
    a.slot_size = 12345;
    assert!(run(&a).unwrap_err().to_string().contains("multiple of 4K"));
    let mut a = args();
    a.max_mem = 1 << 19;
    assert!(
        run(&a)
            .unwrap_err()
            .to_string()
            .contains("at least one slot")
    );
    let mut a = args();
    a.slot_size = 1 << 42;
    a.max_mem = 1 << 43;
    assert!(run(&a).unwrap_err().to_string().contains("frame arena"));
}

#[test]
fn slots_fill_max_mem_and_aliases_pass_every_check() {
    let r = run(&args()).unwrap();
    assert!(r.passed, "{}", r.failures());
    assert_eq!(r.counts["slots"], 4);
    assert_eq!(r.counts["guest_pages"], 4 * 256);
}
