//! The correct build passes the torture run that catches `broken-free-before-flush-ack`
//! (`tests/common/walk_yield_torture.rs`): with a yield forced at every table-to-table step of a
//! vCPU's guest-mode walk while recovery unlinks the tables the vCPUs walk, no vCPU reads a freed
//! table and every oracle holds (G1 in docs/locking.md).
//!
//! Run: `cargo test -p kvmmu --features test-hooks --test torture_guest_walk_yield`.

#[path = "common/walk_yield_torture.rs"]
mod walk_yield_torture;

use kvmmu::internals::mmu::tdp::hooks;
use kvmmu::torture::run;

#[test]
fn guest_walks_preempted_between_levels_while_recovery_unlinks_tables_pass_every_oracle() {
    let yields_before = hooks::walk_yields();
    let mut recovered = 0;
    for seed in 1..=3 {
        let report = run(&walk_yield_torture::config(seed)).expect("set-up");
        assert!(report.passed(), "{report}");
        recovered += report.vm_stats.tdp.huge_recovered;
    }
    assert!(
        hooks::walk_yields() > yields_before,
        "no yield was injected into a guest-mode walk"
    );
    assert!(
        recovered > 0,
        "recovery never unlinked a table the vCPUs could walk"
    );
}
