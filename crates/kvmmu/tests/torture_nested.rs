//! Torture with nesting: the vCPUs run as an L2 guest over EPT12 that an L1 actor write-protects,
//! unmaps and remaps while they run (and probes for stale EPT02 entries), next to every other
//! actor; 4 configurations (L1 on the TDP / shadow MMU x lockless / locked aging) must pass
//! every oracle.

use kvmmu::internals::config::{AgingMode, MmuKind};
use kvmmu::torture::{ActorId, TortureConfig, run};

fn nested(mmu: MmuKind, aging: AgingMode, seed: u64) {
    let cfg = TortureConfig {
        seed,
        mmu,
        aging,
        vcpus: 2,
        ops_per_vcpu: Some(4_000),
        nested: true,
        ..TortureConfig::default()
    };
    let report = run(&cfg).expect("set-up");
    eprintln!("{report}\n{:?}", report.vm_stats.shadow);
    assert!(report.passed(), "{report}");
    for a in &report.actors {
        assert!(a.ops > 0, "actor {} made no progress:\n{report}", a.actor);
    }
    assert!(report.actors.iter().any(|a| a.actor == ActorId::L1));
    let s = &report.vm_stats.shadow;
    assert!(s.nested_faults > 0, "L2 faults ran:\n{report}");
    assert!(
        s.mmu_pte_write + s.mmu_flooded > 0,
        "write tracking ran:\n{report}"
    );
}

#[test]
fn nested_tdp_l1_lockless_aging_passes_every_oracle() {
    nested(MmuKind::Tdp, AgingMode::Lockless, 0x4e57_0001);
}

#[test]
fn nested_tdp_l1_locked_aging_passes_every_oracle() {
    nested(MmuKind::Tdp, AgingMode::Locked, 0x4e57_0002);
}

#[test]
fn nested_shadow_l1_lockless_aging_passes_every_oracle() {
    nested(MmuKind::Shadow, AgingMode::Lockless, 0x4e57_0003);
}

#[test]
fn nested_shadow_l1_locked_aging_passes_every_oracle() {
    nested(MmuKind::Shadow, AgingMode::Locked, 0x4e57_0004);
}
