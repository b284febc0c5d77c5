//! Bounded torture runs with THP-backed guest memory: the host actor's partial munmap, mprotect
//! and madvise(DONTNEED) split THPs under the vCPUs' huge leaves, on both MMUs and both aging
//! modes; every oracle must pass, and the run must actually have formed and split huge pages.

use kvmmu::internals::config::{AgingMode, MmuKind};
use kvmmu::internals::host::BackingSrc;
use kvmmu::torture::{Actors, TortureConfig, TortureError, run};

fn thp(seed: u64, mmu: MmuKind, aging: AgingMode) -> TortureConfig {
    TortureConfig {
        seed,
        mmu,
        aging,
        vcpus: 2,
        main_pages: 2048,
        dyn_pages: 512,
        ops_per_vcpu: Some(6_000),
        backing: BackingSrc::AnonymousThp,
        // Every oracle is on, the accessed one included (its private pages share a THP, and a
        // huge leaf, with churned pages).
        actors: Actors::all().difference(Actors::RECLAIM | Actors::DIRTY_LOG),
        ..TortureConfig::default()
    }
}

#[test]
fn thp_backed_torture_passes_every_oracle_on_both_mmus_and_aging_modes() {
    let mut huge = 0;
    let mut splits = 0;
    for (i, mmu) in [MmuKind::Tdp, MmuKind::Shadow].into_iter().enumerate() {
        for (j, aging) in [AgingMode::Lockless, AgingMode::Locked]
            .into_iter()
            .enumerate()
        {
            for seed in 0..3u64 {
                let r = run(&thp(seed * 4 + (i * 2 + j) as u64, mmu, aging)).expect("set-up");
                assert!(r.passed(), "{mmu:?} {aging:?}:\n{r}");
                huge += r.host_stats.huge_faults;
                splits += r.host_stats.thp_splits;
            }
        }
    }
    assert!(
        huge > 0 && splits > 0,
        "THPs formed ({huge}) and split ({splits})"
    );
}

#[test]
fn hugetlb_backing_is_refused_for_torture() {
    let cfg = TortureConfig {
        backing: BackingSrc::AnonymousHugetlb2M,
        ..TortureConfig::default()
    };
    assert!(matches!(
        run(&cfg),
        Err(TortureError::Parameter {
            name: "backing",
            ..
        })
    ));
}
