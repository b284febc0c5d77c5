//! The deliberately broken build that re-arms dirty logging without the remote TLB flush (feature
//! `broken-rearm-no-flush`) must be caught: a write through a TLB entry cached before the re-arm
//! is never logged. Run with
//! `cargo test -p kvmmu --features broken-rearm-no-flush --test dirty_log_broken_rearm_no_flush`.

mod common;
#[path = "common/dirty.rs"]
mod dirty;

use dirty::{DirtyRun, ring_stale_tlb_write_is_reported, run, stale_tlb_write_is_reported};
use kvmmu::prelude::*;

#[test]
fn a_rearm_without_flush_loses_the_stale_tlb_write() {
    for mmu in [MmuKind::Tdp, MmuKind::Shadow] {
        for tracking in [DirtyTracking::WriteProtect, DirtyTracking::DBit] {
            for manual in [false, true] {
                assert!(
                    !stale_tlb_write_is_reported(mmu, tracking, manual),
                    "{mmu:?} {tracking:?} manual={manual}: the broken build still reported the \
                     stale-TLB write"
                );
            }
        }
    }
}

#[test]
fn a_ring_reset_without_flush_loses_the_stale_tlb_write() {
    for mmu in [MmuKind::Tdp, MmuKind::Shadow] {
        assert!(!ring_stale_tlb_write_is_reported(mmu), "{mmu:?}");
    }
}

#[test]
fn the_concurrent_harness_catches_a_rearm_without_flush() {
    let caught = (1..=5).any(|seed| {
        run(DirtyRun {
            ad_bits: AdBits::Enabled,
            mmu: MmuKind::Tdp,
            tracking: DirtyTracking::WriteProtect,
            manual: false,
            vcpus: 2,
            pages_per_vcpu: 96,
            writes_per_vcpu: 20_000,
            seed,
        })
        .is_err()
    });
    assert!(
        caught,
        "five runs of a build without re-arm flushes lost no write"
    );
}
