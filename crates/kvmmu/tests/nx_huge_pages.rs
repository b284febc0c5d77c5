//! NX huge pages (`VmConfig::nx_huge_pages`), on both MMUs: an instruction fetch through a huge
//! leaf faults (the X bit is honoured by the walk and the TLB) and maps its page with a 4K leaf,
//! counted in `nx_lpage_splits`; recovery zaps `ceil(splits / ratio)` of those splits so the
//! ranges fault huge again. The six steps are those of the kernel's `x86/nx_huge_pages_test`.

mod common;

use common::*;
use kvmmu::prelude::*;

const MB2: u64 = 2 << 20;
const HPAGE: u64 = 512;
const X_BIT: u64 = 1 << 2;

/// A VM with three 2M hugetlb pages at [`BASE_GPA`], every word filled with a pattern.
fn three_hpages(mmu: MmuKind, nx: bool, ratio: u32, period_ms: u64) -> Fixture {
    let host = HostMm::new(HostConfig { frames: 4096 }).expect("host");
    let cfg = VmConfig {
        mmu,
        nx_huge_pages: nx,
        nx_huge_pages_recovery_ratio: ratio,
        nx_huge_pages_recovery_period_ms: period_ms,
        ..VmConfig::default()
    };
    let vm = Vm::new(&host, cfg).expect("vm");
    let hva = host
        .mmap_backed(
            3 * MB2,
            Prot::READ | Prot::WRITE,
            BackingSrc::AnonymousHugetlb2M,
        )
        .expect("mmap");
    vm.set_user_memory_region(region(0, BASE_GPA, 3 * MB2, hva))
        .expect("memslot");
    Fixture {
        host,
        vm,
        hva,
        bytes: 3 * MB2,
    }
}

fn counts(f: &Fixture) -> (u64, u64) {
    let s = f.vm.stats();
    (s.pages_2m, s.nx_lpage_splits)
}

fn leaf(f: &Fixture, page: u64) -> (u64, Level) {
    let (s, l) = f.vm.spte(AsId::new(0), gpa(page).gfn()).expect("a leaf");
    (s.raw(), l)
}

/// The guest of the selftest, one step per call: read hpage 1, read hpage 2, execute hpage 1,
/// execute hpage 3, read hpage 1, then (after recovery) read hpage 3.
fn step(v: &mut Vcpu, i: usize) {
    let r = match i {
        0 => v.read_u64(gpa(0)),
        1 => v.read_u64(gpa(HPAGE)),
        2 => v.fetch_u64(gpa(0)),
        3 => v.fetch_u64(gpa(2 * HPAGE)),
        4 => v.read_u64(gpa(0)),
        _ => v.read_u64(gpa(2 * HPAGE)),
    };
    r.expect("guest access");
}

macro_rules! both_mmus {
    ($($prop:ident),* $(,)?) => {
        mod tdp {
            $(#[test] fn $prop() { super::$prop(kvmmu::prelude::MmuKind::Tdp); })*
        }
        mod shadow {
            $(#[test] fn $prop() { super::$prop(kvmmu::prelude::MmuKind::Shadow); })*
        }
    };
}

both_mmus!(
    the_six_steps_give_the_kernel_selftest_counts,
    with_the_mitigation_off_fetches_keep_huge_leaves,
    with_recovery_disabled_the_splits_stay,
    a_fetch_through_a_huge_leaf_faults_and_is_served_by_an_executable_4k_leaf,
    data_reads_back_after_an_nx_split_and_recovery,
    a_round_zaps_ceil_splits_over_ratio_oldest_first,
    the_background_worker_recovers_the_splits,
    fetches_and_reads_racing_recovery_keep_the_data_and_the_counts,
);

fn fetches_and_reads_racing_recovery_keep_the_data_and_the_counts(mmu: MmuKind) {
    let f = three_hpages(mmu, true, 1, 0);
    {
        let mut v = f.vm.create_vcpu().unwrap();
        for p in 0..3 * HPAGE {
            v.write_u64(gpa(p), p * 11 + 5).unwrap();
        }
    }
    const ROUNDS: u64 = 4000;
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let vm = &f.vm;
            s.spawn(move || {
                let mut v = vm.create_vcpu().unwrap();
                for i in 0..ROUNDS {
                    let p = (i * 37 + t * 101) % (3 * HPAGE);
                    let got = if (i + t) % 3 == 0 {
                        v.fetch_u64(gpa(p))
                    } else {
                        v.read_u64(gpa(p))
                    };
                    assert_eq!(got.unwrap(), p * 11 + 5, "vCPU {t}, page {p}");
                }
            });
        }
        // Bounded: as many rounds as the vCPUs make accesses, no waiting on them.
        for _ in 0..ROUNDS / 4 {
            f.vm.recover_nx_huge_pages();
            assert!(f.vm.stats().nx_lpage_splits <= 3);
        }
    });
    f.vm.recover_nx_huge_pages();
    let s = f.vm.stats();
    assert_eq!(s.nx_lpage_splits, 0, "{s:?}");
    assert_eq!(f.host.arena().stats().stale_accesses, 0);
    let s = f.vm.shutdown();
    assert_eq!((s.pages_4k, s.pages_2m), (0, 0));
    assert_eq!(s.tdp.tables_allocated, s.tdp.tables_freed, "{:?}", s.tdp);
    assert_eq!(
        s.shadow.pages_allocated, s.shadow.pages_freed,
        "{:?}",
        s.shadow
    );
}

fn the_six_steps_give_the_kernel_selftest_counts(mmu: MmuKind) {
    let f = three_hpages(mmu, true, 1, 0);
    let mut v = f.vm.create_vcpu().unwrap();
    assert_eq!(counts(&f), (0, 0));
    let want = [(1, 0), (2, 0), (1, 1), (1, 2), (1, 2)];
    for (i, w) in want.into_iter().enumerate() {
        step(&mut v, i);
        assert_eq!(counts(&f), w, "after step {}", i + 1);
    }
    assert_eq!(f.vm.recover_nx_huge_pages(), 2);
    assert_eq!(counts(&f), (1, 0), "after recovery");
    step(&mut v, 5);
    assert_eq!(counts(&f), (2, 0), "after the final read");
}

fn with_the_mitigation_off_fetches_keep_huge_leaves(mmu: MmuKind) {
    let f = three_hpages(mmu, false, 1, 0);
    let mut v = f.vm.create_vcpu().unwrap();
    let want = [(1, 0), (2, 0), (2, 0), (3, 0), (3, 0)];
    for (i, w) in want.into_iter().enumerate() {
        step(&mut v, i);
        assert_eq!(counts(&f), w, "after step {}", i + 1);
    }
    assert_eq!(f.vm.recover_nx_huge_pages(), 0);
    step(&mut v, 5);
    assert_eq!(counts(&f), (3, 0));
}

fn with_recovery_disabled_the_splits_stay(mmu: MmuKind) {
    let f = three_hpages(mmu, true, 0, 0);
    let mut v = f.vm.create_vcpu().unwrap();
    for i in 0..5 {
        step(&mut v, i);
    }
    assert_eq!(f.vm.recover_nx_huge_pages(), 0);
    assert_eq!(counts(&f), (1, 2));
    assert!(f.vm.spawn_nx_recovery_worker().unwrap().is_none());
}

fn a_fetch_through_a_huge_leaf_faults_and_is_served_by_an_executable_4k_leaf(mmu: MmuKind) {
    let f = three_hpages(mmu, true, 1, 0);
    let mut v = f.vm.create_vcpu().unwrap();
    v.read_u64(gpa(5)).unwrap();
    let (raw, level) = leaf(&f, 5);
    assert_eq!(level, Level::L2M);
    assert_eq!(
        raw & X_BIT,
        0,
        "a huge leaf is not executable under the mitigation"
    );
    let faults = v.stats().faults;
    // The read filled the TLB with the huge translation; the fetch must not use it.
    v.fetch_u64(gpa(5)).unwrap();
    assert!(v.stats().faults > faults, "the fetch faulted");
    let (raw, level) = leaf(&f, 5);
    assert_eq!(level, Level::L4K);
    assert_ne!(raw & X_BIT, 0, "the 4K leaf is executable");
    let faults = v.stats().faults;
    v.fetch_u64(gpa(5)).unwrap();
    assert_eq!(v.stats().faults, faults, "a second fetch hits");
    // A never-touched hpage fetched first is mapped 4K from the start.
    v.fetch_u64(gpa(HPAGE + 7)).unwrap();
    assert_eq!(leaf(&f, HPAGE + 7).1, Level::L4K);
    assert_eq!(counts(&f), (0, 2));
}

fn data_reads_back_after_an_nx_split_and_recovery(mmu: MmuKind) {
    let f = three_hpages(mmu, true, 1, 0);
    let mut v = f.vm.create_vcpu().unwrap();
    for p in (0..3 * HPAGE).step_by(61) {
        v.write_u64(gpa(p), p * 3 + 1).unwrap();
    }
    for h in 0..3 {
        v.fetch_u64(gpa(h * HPAGE + 1)).unwrap();
    }
    assert_eq!(counts(&f), (0, 3));
    assert_eq!(f.vm.recover_nx_huge_pages(), 3);
    for p in (0..3 * HPAGE).step_by(61) {
        assert_eq!(v.read_u64(gpa(p)).unwrap(), p * 3 + 1, "page {p}");
    }
    assert_eq!(counts(&f), (3, 0));
}

fn a_round_zaps_ceil_splits_over_ratio_oldest_first(mmu: MmuKind) {
    let f = three_hpages(mmu, true, 2, 0);
    let mut v = f.vm.create_vcpu().unwrap();
    for h in [2, 0, 1] {
        v.fetch_u64(gpa(h * HPAGE)).unwrap();
    }
    assert_eq!(counts(&f), (0, 3));
    assert_eq!(f.vm.recover_nx_huge_pages(), 2, "ceil(3 / 2)");
    assert_eq!(counts(&f).1, 1);
    // hpages 2 and 0 were split first: they fault huge again, hpage 1 stays split.
    for h in 0..3 {
        v.read_u64(gpa(h * HPAGE + 3)).unwrap();
    }
    assert_eq!(leaf(&f, 2 * HPAGE + 3).1, Level::L2M);
    assert_eq!(leaf(&f, 3).1, Level::L2M);
    assert_eq!(leaf(&f, HPAGE + 3).1, Level::L4K);
    assert_eq!(f.vm.recover_nx_huge_pages(), 1, "ceil(1 / 2)");
    assert_eq!(counts(&f), (2, 0));
}

fn the_background_worker_recovers_the_splits(mmu: MmuKind) {
    let f = three_hpages(mmu, true, 1, 1);
    let mut v = f.vm.create_vcpu().unwrap();
    for i in 0..5 {
        step(&mut v, i);
    }
    let worker = f.vm.spawn_nx_recovery_worker().unwrap().expect("a worker");
    // Bounded wait for the worker's first round (no timing assertion: only that it happens).
    let mut rounds = 0;
    while counts(&f).1 != 0 {
        rounds += 1;
        assert!(rounds < 60_000, "the worker never recovered the splits");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    drop(worker);
    assert_eq!(counts(&f), (1, 0));
    step(&mut v, 5);
    assert_eq!(counts(&f), (2, 0));
}
