//! The deliberately broken build that skips the remote TLB flush after a zap (feature
//! `broken-skip-zap-flush`) must be caught by the torture oracles within a short, bounded run.
//! Run with `cargo test -p kvmmu --features broken-skip-zap-flush --test torture_broken_skip_zap_flush`.

use kvmmu::torture::{Actors, TortureConfig, ViolationKind, hunt};

#[test]
fn torture_catches_a_zap_without_tlb_flush() {
    // Host churn frees frames the vCPUs still cache in their TLBs: the next access through such an
    // entry hits a frame with another owner tag (a stale translation or lost data). When the zap
    // came from a write-protect (mprotect) instead, the stale writable TLB entry lets a guest write
    // land in a page the host made read-only: the same missing flush, seen from the other side.
    let cfg = TortureConfig {
        ops_per_vcpu: Some(20_000),
        actors: Actors::HOST,
        ..TortureConfig::default()
    };
    let report = hunt(&cfg, 1..=5)
        .expect("set-up")
        .expect("five bounded runs of a build without zap flushes all passed");
    eprintln!("{report}");
    assert!(
        report.has_any(&[
            ViolationKind::StaleTranslation,
            ViolationKind::Data,
            ViolationKind::WriteToReadOnly,
        ]),
        "caught, but not as a stale translation, lost data or a write through a stale writable \
         entry:\n{report}"
    );
}
