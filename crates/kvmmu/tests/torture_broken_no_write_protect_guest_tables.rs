//! The deliberately broken build that forgets to write-protect guest tables (feature
//! `broken-no-write-protect-guest-tables`: EPT12 pages shadowed by indirect pages stay writable
//! in L1's own mapping, and L1's writes to them are not emulated) must be caught: the nested
//! torture's L1 probe writes through L2, write-protects the page in EPT12 and flushes, and the
//! stale writable EPT02 entry lets the L2 write through. Run with
//! `cargo test -p kvmmu --features broken-no-write-protect-guest-tables --test torture_broken_no_write_protect_guest_tables`.

use kvmmu::internals::config::{AgingMode, MmuKind};
use kvmmu::torture::{TortureConfig, ViolationKind, hunt};

fn caught(mmu: MmuKind) {
    let cfg = TortureConfig {
        mmu,
        aging: AgingMode::Lockless,
        ops_per_vcpu: Some(4_000),
        nested: true,
        ..TortureConfig::default()
    };
    // The probe is deterministic (one round catches it); a few seeds only guard against a run
    // whose vCPUs finish before the L1 actor reaches its first probe round.
    let report = hunt(&cfg, 1..=5)
        .expect("set-up")
        .expect("every nested run of a build that does not write-protect guest tables passed");
    eprintln!("{report}");
    assert!(
        report.has_any(&[ViolationKind::WriteToReadOnly, ViolationKind::Data]),
        "caught, but not as a write through an EPT12 entry L1 made read-only or a stale remap:\n{report}"
    );
}

#[test]
fn torture_catches_guest_tables_left_writable_tdp_l1() {
    caught(MmuKind::Tdp);
}

#[test]
fn torture_catches_guest_tables_left_writable_shadow_l1() {
    caught(MmuKind::Shadow);
}
