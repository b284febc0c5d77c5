//! The deliberately broken build that frees an unlinked TDP table at once, before the remote TLB
//! flush is acknowledged (feature `broken-free-before-flush-ack`, violating G1 in
//! docs/locking.md), must be caught by the torture within a short, bounded hunt: a vCPU in guest
//! mode that loaded a link to a table, and reads the table after the broken zap freed it, reads
//! the poison this build stores into freed tables (`guest_walk` asserts it never does).
//!
//! Run: `cargo test -p kvmmu --features broken-free-before-flush-ack,test-hooks --test
//! torture_broken_free_before_flush_ack`.

#[path = "common/walk_yield_torture.rs"]
mod walk_yield_torture;

use kvmmu::torture::{ViolationKind, hunt};

/// Seeds the hunt may try; each run is bounded by `ops_per_vcpu`.
const SEEDS: core::ops::RangeInclusive<u64> = 1..=20;

#[test]
fn torture_catches_a_table_freed_before_the_flush_is_acknowledged() {
    let report = hunt(&walk_yield_torture::config(0), SEEDS)
        .expect("set-up")
        .expect("every bounded run of a build that frees tables before the flush ack passed");
    eprintln!("{report}");
    let walked_freed_table = report.violations.iter().any(|v| {
        v.kind == ViolationKind::Panic && v.detail.contains("walked a freed page-table page")
    });
    assert!(
        walked_freed_table
            || report.has_any(&[ViolationKind::StaleTranslation, ViolationKind::Data]),
        "caught, but not as a walk through a freed table, a stale translation or lost data:\n\
         {report}"
    );
}
