//! Bounded torture runs with the reclaim actor over THP-backed guest memory, on both MMUs and both
//! aging modes: `page_out` of random vCPU pages meets huge pages (never evicted, docs/invariants.md
//! R5), 4K pages of the THP mapping (evicted and refaulted from swap, R6) and THPs the host actor
//! splits, under the vCPUs' huge leaves; every oracle must pass, the data oracle above all (DESIGN
//! invariant 6). Before R5/R6 held, every configuration here failed with Data violations.
//!
//! Once ignored for a rare charge underflow (CI, `tdp_lockless_...`, seed 0x7e8: "attempt to add
//! with overflow" in `Reclaim::try_charge` from the THP 4K fallback). The cause: an eviction
//! checked a page under `mmap_lock` read while a THP install (also under `mmap_lock` read) had
//! stored the page's PTE but not yet the span's marker, then evicted it under `mmap_lock` write
//! without looking again: a frame out of a live THP was freed and uncharged though huge pages are
//! never charged, wrapping the charge to `u64::MAX`, which `then_some(c + 1)` then overflowed.
//! Deterministic tests: `tests/reclaim_charge.rs` and `host::reclaim::tests` (the eviction seam).
//! The teardown oracle now also fails a run whose charge is not 0 after `release` or which
//! refused an uncharge (docs/locking.md C1, C6).

use kvmmu::internals::config::{AgingMode, MmuKind};
use kvmmu::internals::host::BackingSrc;
use kvmmu::torture::{ActorId, Actors, TortureConfig, run};

fn reclaim_thp(seed: u64, mmu: MmuKind, aging: AgingMode) -> TortureConfig {
    TortureConfig {
        seed,
        mmu,
        aging,
        vcpus: 2,
        // Two 2 MiB spans in slot 0; the dynamic slot's pages are 4K pages of the THP mapping.
        main_pages: 1024,
        dyn_pages: 128,
        ops_per_vcpu: Some(3_000),
        backing: BackingSrc::AnonymousThp,
        actors: Actors::all(),
        ..TortureConfig::default()
    }
}

fn assert_passes(mmu: MmuKind, aging: AgingMode, seeds: [u64; 3]) {
    let mut huge = 0;
    for seed in seeds {
        let r = run(&reclaim_thp(seed, mmu, aging)).expect("set-up");
        assert!(r.passed(), "{mmu:?} {aging:?}:\n{r}");
        let reclaim = r
            .actors
            .iter()
            .find(|a| a.actor == ActorId::Reclaim)
            .expect("the reclaim actor ran");
        assert!(reclaim.ops > 0, "the reclaim actor made no progress:\n{r}");
        huge += r.host_stats.huge_faults;
    }
    assert!(huge > 0, "{mmu:?} {aging:?}: no THP formed");
}

#[test]
fn shadow_lockless_reclaim_over_thp_passes_every_oracle() {
    assert_passes(MmuKind::Shadow, AgingMode::Lockless, [0x7e1, 0x7e2, 0x7e3]);
}

#[test]
fn shadow_locked_reclaim_over_thp_passes_every_oracle() {
    assert_passes(MmuKind::Shadow, AgingMode::Locked, [0x7e4, 0x7e5, 0x7e6]);
}

#[test]
fn tdp_lockless_reclaim_over_thp_passes_every_oracle() {
    assert_passes(MmuKind::Tdp, AgingMode::Lockless, [0x7e7, 0x7e8, 0x7e9]);
}

#[test]
fn tdp_locked_reclaim_over_thp_passes_every_oracle() {
    assert_passes(MmuKind::Tdp, AgingMode::Locked, [0x7ea, 0x7eb, 0x7ec]);
}
