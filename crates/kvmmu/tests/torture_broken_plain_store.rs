//! The deliberately broken build whose lockless ager clears Accessed with a plain store of a
//! stale snapshot instead of an atomic AND (feature `broken-plain-store`) must be caught by the
//! torture oracles within a short, bounded run.
//! Run with `cargo test -p kvmmu --features broken-plain-store --test torture_broken_plain_store`.

use kvmmu::torture::{Actors, TortureConfig, ViolationKind, hunt};

#[test]
fn torture_catches_a_plain_store_where_an_atomic_update_is_needed() {
    // The store loses a vCPU's concurrent Dirty update (the dirty oracle), or brings back a leaf a
    // zap removed (a stale translation, the fault path's "present leaf changes pfn" panic, or, when
    // the zap came from a write-protect, a guest write landing in a page the host made read-only).
    let cfg = TortureConfig {
        ops_per_vcpu: Some(20_000),
        actors: Actors::AGING | Actors::HOST,
        ..TortureConfig::default()
    };
    let report = hunt(&cfg, 1..=5)
        .expect("set-up")
        .expect("five bounded runs of a build with a plain-store ager all passed");
    eprintln!("{report}");
    assert!(
        report.has_any(&[
            ViolationKind::DirtyLost,
            ViolationKind::StaleTranslation,
            ViolationKind::Data,
            ViolationKind::WriteToReadOnly,
            ViolationKind::Panic,
        ]),
        "caught, but not by an oracle for this bug:\n{report}"
    );
}
