//! DESIGN invariant 7 under concurrency: vCPUs write random pages while a harvester loops
//! get (and clear) and an ager loops lockless aging; the union of harvested copies equals guest
//! memory at the end, for both MMUs, both protect modes and both tracking modes (write-protect
//! and D bit).

mod common;
#[path = "common/dirty.rs"]
mod dirty;

use dirty::{DirtyRun, run};
use kvmmu::prelude::*;

fn check(mmu: MmuKind, manual: bool) {
    check_ad(mmu, manual, AdBits::Enabled);
}

fn check_ad(mmu: MmuKind, manual: bool, ad_bits: AdBits) {
    for seed in 1..=4 {
        let tracking = if seed % 2 == 0 && ad_bits == AdBits::Enabled {
            DirtyTracking::DBit
        } else {
            DirtyTracking::WriteProtect
        };
        let cfg = DirtyRun {
            mmu,
            tracking,
            manual,
            vcpus: 2,
            pages_per_vcpu: 96,
            writes_per_vcpu: 20_000,
            seed,
            ad_bits,
        };
        let harvested = run(cfg).unwrap_or_else(|e| panic!("{e}"));
        assert!(harvested > 0, "nothing was ever harvested");
    }
}

#[test]
fn concurrent_harvests_with_lockless_aging_lose_no_write_tdp_classic() {
    check(MmuKind::Tdp, false);
}

#[test]
fn concurrent_harvests_with_lockless_aging_lose_no_write_tdp_manual() {
    check(MmuKind::Tdp, true);
}

#[test]
fn concurrent_harvests_with_lockless_aging_lose_no_write_shadow_classic() {
    check(MmuKind::Shadow, false);
}

#[test]
fn concurrent_harvests_with_lockless_aging_lose_no_write_shadow_manual() {
    check(MmuKind::Shadow, true);
}

#[test]
fn concurrent_harvests_with_lockless_access_tracking_lose_no_write_tdp_ad_disabled() {
    check_ad(MmuKind::Tdp, false, AdBits::Disabled);
    check_ad(MmuKind::Tdp, true, AdBits::Disabled);
}

#[test]
fn concurrent_harvests_with_lockless_access_tracking_lose_no_write_shadow_ad_disabled() {
    check_ad(MmuKind::Shadow, false, AdBits::Disabled);
    check_ad(MmuKind::Shadow, true, AdBits::Disabled);
}
