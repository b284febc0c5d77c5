//! The short, bounded torture run CI executes on every submission (a fixed operation count per
//! vCPU, not a wall time): every actor at once on the TDP and the shadow MMU, lockless and locked
//! aging, plus frame exhaustion; each run must pass every oracle.

use kvmmu::internals::config::{AgingMode, ConfigError, MmuKind};
use kvmmu::torture::{Actors, TortureConfig, TortureError, run};

fn short(seed: u64) -> TortureConfig {
    TortureConfig {
        seed,
        vcpus: 2,
        ops_per_vcpu: Some(4_000),
        ..TortureConfig::default()
    }
}

fn assert_passes(cfg: &TortureConfig) -> kvmmu::torture::TortureReport {
    let report = run(cfg).expect("set-up");
    assert!(report.passed(), "{report}");
    for a in &report.actors {
        assert!(a.ops > 0, "actor {} made no progress:\n{report}", a.actor);
    }
    report
}

#[test]
fn tdp_lockless_all_actors_pass_every_oracle() {
    let r = assert_passes(&short(0x5eed_0001));
    assert!(
        r.vm_stats.invalidate.seq > 0,
        "the host actor invalidated:\n{r}"
    );
    assert!(
        r.vm_stats.memslot_swaps > 2,
        "the memslot actor changed slots:\n{r}"
    );
}

#[test]
fn tdp_locked_all_actors_pass_every_oracle() {
    assert_passes(&TortureConfig {
        aging: AgingMode::Locked,
        ..short(0x5eed_0002)
    });
}

#[test]
fn accessed_oracle_is_strict_when_aging_flushes_tlbs() {
    // With the flush not elided, the oracle's write after clear_flush_young walks the tables, so a
    // TLB can never excuse a page that is not young.
    let r = assert_passes(&TortureConfig {
        elide_tlb_flush_if_young: false,
        ..short(0x5eed_0004)
    });
    assert_eq!(r.accessed_hidden_by_tlb, 0, "{r}");
}

/// Host frames for the exhaustion runs: fewer than the 76 pages the vCPUs write (the 60 of slot 0
/// outside the accessed oracle's, and the 16 of slot 1), so they cannot all be backed at once.
const SCARCE_FRAMES: usize = 48;

#[test]
fn frame_exhaustion_fails_faults_cleanly() {
    // Fewer frames than guest pages and no actor that frees any (the host actor's discards and
    // unmaps would, at a rate set by the scheduler): once the vCPUs have touched `SCARCE_FRAMES`
    // pages, every fault on a new page exits with OutOfFrames, and each must leave nothing
    // installed while aging runs and every other oracle holds. Each vCPU's page sequence is fixed
    // by the seed and covers more pages than there are frames, so exhaustion happens in every
    // schedule.
    let cfg = TortureConfig {
        frames: Some(SCARCE_FRAMES),
        actors: Actors::AGING,
        ..short(0x5eed_0003)
    };
    let r = assert_passes(&cfg);
    assert!(
        r.out_of_frames_exits > 0,
        "no fault ran out of frames although no frame is ever freed:\n{r}"
    );
}

#[test]
fn frame_exhaustion_under_host_churn_passes_every_oracle() {
    // The same scarcity while the host actor discards, unmaps and re-protects pages, freeing and
    // reusing frames: faults that run out of frames (how many depends on the schedule, so none is
    // required here; `frame_exhaustion_fails_faults_cleanly` forces them) leave nothing
    // installed, and every oracle holds across the churn.
    let r = assert_passes(&TortureConfig {
        frames: Some(SCARCE_FRAMES),
        actors: Actors::HOST | Actors::AGING,
        ..short(0x5eed_0003)
    });
    assert!(
        r.vm_stats.invalidate.seq > 0,
        "the host actor invalidated:\n{r}"
    );
}

#[test]
fn shadow_lockless_all_actors_pass_every_oracle() {
    let r = assert_passes(&TortureConfig {
        mmu: MmuKind::Shadow,
        ..short(0x5eed_0005)
    });
    assert!(
        r.vm_stats.shadow.faults > 0,
        "the shadow MMU handled the faults:\n{r}"
    );
}

#[test]
fn shadow_locked_all_actors_pass_every_oracle() {
    assert_passes(&TortureConfig {
        mmu: MmuKind::Shadow,
        aging: AgingMode::Locked,
        ..short(0x5eed_0006)
    });
}

#[test]
fn invalid_vm_configuration_is_refused_before_anything_runs() {
    let cfg = TortureConfig {
        tlb_entries: 0,
        ..short(1)
    };
    assert!(matches!(
        run(&cfg),
        Err(TortureError::Config(ConfigError::TlbEntries(0)))
    ));
}

#[cfg(not(feature = "test-hooks"))]
#[test]
fn fault_injection_needs_the_test_hooks_feature() {
    let cfg = TortureConfig {
        cas_failure_period: 3,
        ..short(1)
    };
    assert!(matches!(run(&cfg), Err(TortureError::HooksUnavailable)));
}

#[test]
fn unbounded_runs_are_refused() {
    let cfg = TortureConfig {
        ops_per_vcpu: None,
        duration: None,
        ..short(1)
    };
    assert!(matches!(run(&cfg), Err(TortureError::Parameter { .. })));
}

#[test]
fn hunt_finds_nothing_in_a_correct_build_and_refuses_a_bad_config_at_the_first_seed() {
    let cfg = TortureConfig {
        ops_per_vcpu: Some(1_000),
        ..short(0)
    };
    let found = kvmmu::torture::hunt(&cfg, 1..=3).expect("set-up");
    assert!(
        found.is_none(),
        "a correct build failed a hunted seed:\n{}",
        found.map(|r| r.to_string()).unwrap_or_default()
    );
    let bad = TortureConfig { vcpus: 0, ..cfg };
    assert!(
        matches!(
            kvmmu::torture::hunt(&bad, 1..=3),
            Err(TortureError::Parameter { name: "vcpus", .. })
        ),
        "zero vCPUs must be refused as a set-up error naming the parameter"
    );
}
