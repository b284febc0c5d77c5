//! Fault injection under torture (feature `test-hooks`): forced CAS failures and forced yields in
//! the TDP fault, age and zap paths and in the shadow MMU's rmap bit lock and lockless rmap aging
//! drive the retry and contention paths, and every oracle still holds.
//! Run with `cargo test -p kvmmu --features test-hooks --test torture_injection`.

use std::sync::Mutex;

use kvmmu::internals::config::{AgingMode, MmuKind};
use kvmmu::internals::mmu::shadow::rmap::hooks as rmap_hooks;
use kvmmu::internals::mmu::tdp::hooks;
use kvmmu::torture::{TortureConfig, run};

/// The hook knobs are process-wide and every run turns them off when it ends: runs of this binary
/// take turns, so one test's end cannot switch off another's injection.
static SERIAL: Mutex<()> = Mutex::new(());

fn injected(aging: AgingMode, seed: u64) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
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

/// Most shadow torture runs a test may need before every rmap hook site has fired. The yield
/// period is one counter shared by every site, so whether a run's few passes through the aging
/// site land on a chosen tick depends on how the scheduler interleaves the actors (under load the
/// aging thread may age only a handful of SPTEs before the vCPUs finish); each further run, with
/// its own seed, is another chance, and each must pass every oracle. Exhausting them means a site
/// is not reached at all.
const MAX_SHADOW_RUNS: u64 = 16;

/// Shadow-MMU runs with the rmap hooks on: every run passes every oracle, and runs go on (up to
/// [`MAX_SHADOW_RUNS`]) until every rmap hook site has fired.
fn shadow_injected(aging: AgingMode, seed: u64) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let before = rmap_hooks::injected();
    let mut aged = 0;
    for run_no in 0..MAX_SHADOW_RUNS {
        let report = run(&TortureConfig {
            seed: seed + (run_no << 32),
            mmu: MmuKind::Shadow,
            aging,
            ops_per_vcpu: Some(3_000),
            cas_failure_period: 3,
            yield_period: 7,
            ..TortureConfig::default()
        })
        .expect("set-up");
        assert!(report.passed(), "{report}");
        aged +=
            report.vm_stats.shadow.aged_sptes_lockless + report.vm_stats.shadow.aged_sptes_locked;
        let now = rmap_hooks::injected();
        if now.cas_failures > before.cas_failures
            && now.yields_before_lock_cas > before.yields_before_lock_cas
            && now.yields_holding_lock > before.yields_holding_lock
            && now.yields_age_before_clear > before.yields_age_before_clear
            && aged > 0
        {
            return;
        }
    }
    let after = rmap_hooks::injected();
    assert!(
        after.cas_failures > before.cas_failures,
        "no rmap bit-lock CAS failure was injected in {MAX_SHADOW_RUNS} runs: {after:?}"
    );
    assert!(
        after.yields_before_lock_cas > before.yields_before_lock_cas,
        "no yield between reading an rmap head and locking it in {MAX_SHADOW_RUNS} runs: {after:?}"
    );
    assert!(
        after.yields_holding_lock > before.yields_holding_lock,
        "no yield while holding an rmap bit in {MAX_SHADOW_RUNS} runs: {after:?}"
    );
    assert!(
        after.yields_age_before_clear > before.yields_age_before_clear,
        "no yield in rmap aging between reading an SPTE and clearing Accessed in \
         {MAX_SHADOW_RUNS} runs: {after:?}"
    );
    assert!(
        aged > 0,
        "the ager never walked an rmap in {MAX_SHADOW_RUNS} runs"
    );
}

#[test]
fn shadow_rmap_forced_cas_failures_and_yields_lockless_aging_pass_every_oracle() {
    shadow_injected(AgingMode::Lockless, 0x3);
}

#[test]
fn shadow_rmap_forced_cas_failures_and_yields_locked_aging_pass_every_oracle() {
    shadow_injected(AgingMode::Locked, 0x4);
}
