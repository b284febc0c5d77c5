//! Torture with the dirty-log harvester (`Actors::DIRTY_LOG`): harvests of slot 1 (classic and
//! manual protect) race the host, aging, memslot and reset actors and the vCPUs on both MMUs;
//! every oracle must hold and the harvester must make progress.

use kvmmu::internals::config::MmuKind;
use kvmmu::torture::{Actors, TortureConfig, run};

#[test]
fn torture_with_dirty_log_harvests_passes_every_oracle_on_both_mmus() {
    for (i, mmu) in [MmuKind::Tdp, MmuKind::Shadow].into_iter().enumerate() {
        let cfg = TortureConfig {
            seed: 0xd1_0000 + i as u64,
            mmu,
            ops_per_vcpu: Some(4_000),
            actors: Actors::all(),
            ..TortureConfig::default()
        };
        let report = run(&cfg).expect("set-up");
        assert!(report.passed(), "{report}");
        for a in &report.actors {
            assert!(a.ops > 0, "actor {} made no progress:\n{report}", a.actor);
        }
    }
}
