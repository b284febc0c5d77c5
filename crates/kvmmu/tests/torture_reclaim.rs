//! The torture run with the reclaim actor beside every other actor, on both MMUs and both aging
//! modes: vCPU pages evicted to swap at random are refaulted intact, and every oracle passes.

use kvmmu::internals::config::{AgingMode, MmuKind};
use kvmmu::torture::{ActorId, Actors, TortureConfig, run};

fn assert_passes(seed: u64, mmu: MmuKind, aging: AgingMode) {
    let cfg = TortureConfig {
        seed,
        mmu,
        aging,
        vcpus: 2,
        ops_per_vcpu: Some(4_000),
        actors: Actors::all(),
        ..TortureConfig::default()
    };
    let report = run(&cfg).expect("set-up");
    assert!(report.passed(), "{report}");
    let reclaim = report
        .actors
        .iter()
        .find(|a| a.actor == ActorId::Reclaim)
        .expect("the reclaim actor ran");
    assert!(
        reclaim.ops > 0,
        "the reclaim actor made no progress:\n{report}"
    );
}

#[test]
fn tdp_lockless_reclaim_actor_passes_every_oracle() {
    assert_passes(0x5eed_4ec1, MmuKind::Tdp, AgingMode::Lockless);
}

#[test]
fn tdp_locked_reclaim_actor_passes_every_oracle() {
    assert_passes(0x5eed_4ec2, MmuKind::Tdp, AgingMode::Locked);
}

#[test]
fn shadow_lockless_reclaim_actor_passes_every_oracle() {
    assert_passes(0x5eed_4ec3, MmuKind::Shadow, AgingMode::Lockless);
}

#[test]
fn shadow_locked_reclaim_actor_passes_every_oracle() {
    assert_passes(0x5eed_4ec4, MmuKind::Shadow, AgingMode::Locked);
}
