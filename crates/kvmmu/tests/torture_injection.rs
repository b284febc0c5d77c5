//! Fault injection under torture (feature `test-hooks`): forced CAS failures and forced yields in
//! the TDP fault, age and zap paths drive the retry paths, and every oracle still holds.
//! Run with `cargo test -p kvmmu --features test-hooks --test torture_injection`.

use kvmmu::config::AgingMode;
use kvmmu::mmu::tdp::hooks;
use kvmmu::torture::{TortureConfig, run};

fn injected(aging: AgingMode, seed: u64) {
    let (cas_before, yields_before) = hooks::injected();
    let report = run(&TortureConfig {
        seed,
        aging,
        ops_per_vcpu: Some(3_000),
        cas_failure_period: 5,
        yield_period: 11,
        ..TortureConfig::default()
    })
    .expect("set-up");
    assert!(report.passed(), "{report}");
    let (cas, yields) = hooks::injected();
    assert!(cas > cas_before, "no CAS failure was injected");
    assert!(yields > yields_before, "no yield was injected");
    assert!(
        report.vm_stats.fault_retries > 0,
        "forced CAS failures must surface as fault retries:\n{report}"
    );
}

#[test]
fn forced_cas_failures_and_yields_lockless_aging_pass_every_oracle() {
    injected(AgingMode::Lockless, 0x1);
}

#[test]
fn forced_cas_failures_and_yields_locked_aging_pass_every_oracle() {
    injected(AgingMode::Locked, 0x2);
}
