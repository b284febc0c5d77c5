//! `kvmmu access-tracking -s` and `kvmmu run -s`: the backing source decides the leaf sizes the
//! report counts (KVM's `pages_4k`, `pages_2m`, `pages_1g`), on both MMUs.

mod common;
use common::{json, kvmmu};

use kvmmu::BackingSrc;
use kvmmu_cli::access_tracking::{self, AccessArgs, IdleArg};
use kvmmu_cli::{AgingArg, MmuArg};

fn args(vcpus: usize, bytes: u64, src: BackingSrc, mmu: MmuArg) -> AccessArgs {
    AccessArgs {
        ad_disabled: false,
        vcpus,
        bytes_per_vcpu: bytes,
        overlap: false,
        idle_policy: None,
        mmu,
        aging: AgingArg::Lockless,
        idle: IdleArg::LruGen,
        tlb_entries: 2048,
        seed: 1,
        random_access: false,
        age_while_populating: false,
        no_aging_thread: false,
        backing_src: src,
        nested: false,
        nested_aliases: 1,
    }
}

#[test]
fn thp_backed_access_tracking_passes_with_one_2m_leaf_per_2m_of_guest_memory() {
    for mmu in [MmuArg::Tdp, MmuArg::Shadow] {
        let r = access_tracking::run(&args(2, 256 << 20, BackingSrc::AnonymousThp, mmu)).unwrap();
        assert!(r.passed, "{mmu:?}: {:?}", r.checks);
        assert_eq!(r.counts["pages_2m"], 256, "{mmu:?}: two vCPUs x 128");
        assert!(
            r.counts["pages_4k"] < 16,
            "{mmu:?}: {}",
            r.counts["pages_4k"]
        );
    }
}

#[test]
fn a_1g_hugetlb_guest_is_mapped_by_one_1g_leaf() {
    let r = access_tracking::run(&args(
        1,
        1 << 30,
        BackingSrc::AnonymousHugetlb1G,
        MmuArg::Tdp,
    ))
    .unwrap();
    assert!(r.passed, "{:?}", r.checks);
    assert_eq!(
        (
            r.counts["pages_1g"],
            r.counts["pages_2m"],
            r.counts["pages_4k"]
        ),
        (1, 0, 0)
    );
}

#[test]
fn a_hugetlb_size_that_does_not_divide_guest_memory_is_a_usage_error() {
    let e = access_tracking::check(&args(
        1,
        3 << 20,
        BackingSrc::AnonymousHugetlb2M,
        MmuArg::Tdp,
    ))
    .unwrap_err();
    assert!(e.to_string().contains("page size"), "{e}");
}

#[test]
fn page_idle_on_a_thp_guest_finds_no_accessed_page_still_idle() {
    // One idle flag per huge page, read and marked through its head page only: a page-by-page
    // mark no longer finds every tail idle (511 of each 512 pages before the fix).
    for mmu in [MmuArg::Tdp, MmuArg::Shadow] {
        let mut a = args(2, 64 << 20, BackingSrc::AnonymousThp, mmu);
        a.idle = IdleArg::PageIdle;
        a.idle_policy = Some(0);
        let r = access_tracking::run(&a).unwrap();
        assert!(r.passed, "{mmu:?}: {:?}", r.checks);
        assert_eq!(r.counts["mark_idle_1_still_idle"], 0, "{mmu:?}");
        assert_eq!(r.counts["mark_idle_2_still_idle"], 0, "{mmu:?}");
        assert_eq!(r.counts["pages_2m"], 64, "{mmu:?}");
    }
}

#[test]
fn the_default_workload_maps_a_thp_guest_with_2m_leaves_and_refuses_a_partial_hugetlb_page() {
    let r = json(&[
        "run",
        "-v",
        "2",
        "-b",
        "8M",
        "-s",
        "anonymous_thp",
        "--passes",
        "1",
    ]);
    assert_eq!(r["passed"], true);
    assert_eq!(r["config"]["backing_src"], "anonymous_thp");
    assert_eq!(r["counts"]["pages_2m"], 8, "two vCPUs x 4");
    assert_eq!(r["counts"]["pages_4k"], 0);
    assert_eq!(r["counts"]["faults"], 8, "one fault per huge page");
    let plain = json(&["run", "-v", "1", "-b", "4M", "--passes", "1"]);
    assert_eq!(plain["counts"]["pages_2m"], 0, "anonymous is 4K");
    let out = kvmmu(&["run", "-v", "1", "-b", "3M", "-s", "anonymous_hugetlb_2mb"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("page size"));
}
