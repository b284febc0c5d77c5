//! Eager page splitting when dirty logging is enabled (`VmConfig::eager_page_split`), and huge
//! leaf recovery when it is disabled, on THP-backed memory and both MMUs.

mod common;

use common::*;
use kvmmu::prelude::*;

const MB2: u64 = 2 << 20;
const PAGES: u64 = 1024;

fn thp(mmu: MmuKind, eager_page_split: bool) -> Fixture {
    let host = HostMm::new(HostConfig { frames: 4096 }).expect("host");
    let config = VmConfig {
        mmu,
        eager_page_split,
        ..VmConfig::default()
    };
    let vm = Vm::new(&host, config).expect("vm");
    let hva = host
        .mmap_backed(2 * MB2, Prot::READ | Prot::WRITE, BackingSrc::AnonymousThp)
        .expect("mmap");
    vm.set_user_memory_region(region(0, BASE_GPA, 2 * MB2, hva))
        .expect("memslot");
    Fixture {
        host,
        vm,
        hva,
        bytes: 2 * MB2,
    }
}

fn set_logging(f: &Fixture, on: bool) {
    let mut r = region(0, BASE_GPA, f.bytes, f.hva);
    if on {
        r.flags = MemFlags::LOG_DIRTY_PAGES;
    }
    f.vm.set_user_memory_region(r).expect("flags change");
}

fn dirty_pages(f: &Fixture) -> Vec<u64> {
    let words =
        f.vm.get_dirty_log(AsId::new(0), SlotId::new(0))
            .expect("harvest");
    (0..PAGES)
        .filter(|p| words[(p / 64) as usize] & (1 << (p % 64)) != 0)
        .collect()
}

/// Populates through huge leaves, enables logging, writes a sparse pattern, harvests; returns the
/// fixture after checking that the harvest names every page written and memory holds the values.
fn log_sparse_writes(mmu: MmuKind, eager: bool) -> Fixture {
    let f = thp(mmu, eager);
    let mut v = f.vm.create_vcpu().expect("vcpu");
    for p in 0..PAGES {
        v.write_u64(gpa(p), p).expect("populate");
    }
    assert_eq!(f.vm.stats().pages_2m, 2, "{mmu:?}: THP memory maps huge");
    set_logging(&f, true);
    if eager {
        let s = f.vm.stats();
        assert_eq!(
            s.pages_2m, 0,
            "{mmu:?}: enabling logging left a huge leaf: {s:?}"
        );
    }
    let written: Vec<u64> = (0..PAGES).filter(|p| p % 7 == 3).collect();
    for &p in &written {
        v.write_u64(gpa(p), p | 1 << 40).expect("write");
    }
    assert_eq!(
        f.vm.stats().pages_2m,
        0,
        "{mmu:?}: a logged slot maps 4K only"
    );
    let dirty = dirty_pages(&f);
    for &p in &written {
        assert!(
            dirty.contains(&p),
            "{mmu:?} eager={eager}: page {p} written, not logged"
        );
    }
    for p in 0..PAGES {
        let want = if p % 7 == 3 { p | 1 << 40 } else { p };
        assert_eq!(v.read_u64(gpa(p)).expect("read"), want, "page {p}");
    }
    drop(v);
    f
}

#[test]
fn enabling_logging_on_a_thp_slot_splits_every_huge_leaf_and_loses_no_write() {
    for mmu in [MmuKind::Tdp, MmuKind::Shadow] {
        let f = log_sparse_writes(mmu, true);
        if mmu == MmuKind::Tdp {
            assert!(
                f.vm.stats().tdp.huge_splits >= 2,
                "split in place under mmu_lock read"
            );
        }
    }
}

#[test]
fn without_eager_splitting_the_first_write_splits_and_no_write_is_lost() {
    for mmu in [MmuKind::Tdp, MmuKind::Shadow] {
        log_sparse_writes(mmu, false);
    }
    // TDP keeps the huge leaves, write-protected, until a write.
    let f = thp(MmuKind::Tdp, false);
    let mut v = f.vm.create_vcpu().expect("vcpu");
    for p in 0..PAGES {
        v.write_u64(gpa(p), p).expect("populate");
    }
    set_logging(&f, true);
    assert_eq!(f.vm.stats().pages_2m, 2, "no eager split");
    v.write_u64(gpa(5), 55).expect("write");
    assert_eq!(
        f.vm.stats().pages_2m,
        1,
        "the written block was split by its fault"
    );
    assert_eq!(dirty_pages(&f), vec![5]);
}

/// TDP re-forms huge leaves in place. The shadow MMU's recovery zaps the small leaves, but its
/// fault path serves a block below an existing (now empty) child page instead of replacing it by
/// a huge leaf (the kernel's `mmu_set_spte` does replace it), so only the data is checked there.
#[test]
fn disabling_logging_recovers_the_huge_leaves_and_keeps_the_data() {
    for mmu in [MmuKind::Tdp, MmuKind::Shadow] {
        let f = log_sparse_writes(mmu, true);
        set_logging(&f, false);
        let mut v = f.vm.create_vcpu().expect("vcpu");
        for p in 0..PAGES {
            let want = if p % 7 == 3 { p | 1 << 40 } else { p };
            assert_eq!(v.read_u64(gpa(p)).expect("read"), want, "page {p}");
        }
        if mmu == MmuKind::Tdp {
            assert_eq!(f.vm.stats().pages_2m, 2, "{mmu:?}: huge leaves recovered");
        }
    }
}

/// `leaves_installed` counts what faults installed, once each (DESIGN invariant 8): neither an
/// eager split's children nor a huge leaf re-formed by recovery are counted, and `faults` stays
/// the sum of every fault however it was resolved.
#[test]
fn tdp_leaves_installed_counts_fault_installs_only_across_split_and_recovery() {
    let f = thp(MmuKind::Tdp, true);
    let mut v = f.vm.create_vcpu().expect("vcpu");
    for p in 0..PAGES {
        v.write_u64(gpa(p), p).expect("populate");
    }
    let populated = f.vm.stats();
    assert_eq!(populated.pages_2m, 2);
    assert_eq!(
        populated.tdp.leaves_installed, 2,
        "two huge leaves installed"
    );
    assert_eq!(
        populated.faults,
        v.stats().faults,
        "every fault counted once"
    );
    set_logging(&f, true);
    let split = f.vm.stats();
    assert_eq!(
        split.pages_4k, PAGES,
        "every huge leaf split into 4K leaves"
    );
    assert_eq!(
        split.tdp.leaves_installed, 2,
        "a split's children are not fault installs"
    );
    // Write-protected by logging: each write is a fault that makes a present leaf writable.
    for p in 0..3 {
        v.write_u64(gpa(p), p + 1).expect("write");
    }
    let written = f.vm.stats();
    assert_eq!(
        written.tdp.leaves_installed + written.pf_fast,
        5,
        "an install over a present leaf counts once (or is a fast fix)"
    );
    assert_eq!(written.faults, v.stats().faults, "every fault counted once");
    set_logging(&f, false);
    let recovered = f.vm.stats();
    assert!(recovered.pages_2m >= 1, "a huge leaf was recovered");
    assert_eq!(
        recovered.tdp.leaves_installed, written.tdp.leaves_installed,
        "recovered huge leaves are not fault installs"
    );
}
