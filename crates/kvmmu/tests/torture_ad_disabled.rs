//! Torture with A/D-disabled leaves (`ad_bits = Disabled`): aging marks leaves for access
//! tracking with one CAS while vCPUs fault them back (fast page fault on TDP), the host, memslot,
//! reset and (optionally) dirty-log actors run; every oracle must hold on both MMUs, both aging
//! modes, with and without dirty logging.

use kvmmu::internals::config::{AdBits, AgingMode, MmuKind};
use kvmmu::torture::{Actors, TortureConfig, run};

#[test]
fn torture_with_ad_disabled_leaves_passes_every_oracle_on_both_mmus_and_aging_modes() {
    let mut seed = 0xad_0000;
    for mmu in [MmuKind::Tdp, MmuKind::Shadow] {
        for aging in [AgingMode::Lockless, AgingMode::Locked] {
            for dirty_log in [false, true] {
                seed += 1;
                let mut actors = Actors::all().difference(Actors::RECLAIM);
                if !dirty_log {
                    actors.remove(Actors::DIRTY_LOG);
                }
                let cfg = TortureConfig {
                    seed,
                    mmu,
                    aging,
                    ad_bits: AdBits::Disabled,
                    ops_per_vcpu: Some(3_000),
                    actors,
                    ..TortureConfig::default()
                };
                let report = run(&cfg).expect("set-up");
                assert!(
                    report.passed(),
                    "{mmu:?} {aging:?} dirty_log={dirty_log}: {report}"
                );
                for a in &report.actors {
                    assert!(a.ops > 0, "actor {} made no progress:\n{report}", a.actor);
                }
            }
        }
    }
}
