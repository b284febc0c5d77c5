//! Negative tests: with kvmmu built deliberately wrong, the differential families must FAIL (with
//! a divergence, not a setup error). Each runs only under its feature:
//!
//! ```sh
//! cargo test -p kvmmu-kvm --features broken-accept-overlapping-slots --test broken_kvmmu
//! cargo test -p kvmmu-kvm --features broken-madvise-no-zap --test broken_kvmmu
//! cargo test -p kvmmu-kvm --features broken-rearm-no-flush --test broken_kvmmu
//! ```
//!
//! Without `/dev/kvm` they print one `SKIPPED` line and pass.

#[allow(unused_imports)]
use kvmmu_kvm::diff::{self, FamilyError};

#[allow(dead_code)]
fn assert_diverges(family: &str, r: Result<diff::Summary, FamilyError>) {
    match r {
        Err(FamilyError::Divergence(d)) => println!("{family}: caught as expected:\n{d}"),
        Err(FamilyError::Setup(e)) => panic!("{family}: setup failed instead of a divergence: {e}"),
        Ok(s) => {
            panic!("{family}: the broken kvmmu build passed {s:?}; the differential test is blind")
        }
    }
}

#[cfg(feature = "broken-accept-overlapping-slots")]
#[test]
fn memslot_family_catches_a_kvmmu_that_accepts_overlapping_slots() {
    let _g = kvmmu_kvm::kvm_lock();
    if kvmmu_kvm::open_or_skip("memslot_family_catches_a_kvmmu_that_accepts_overlapping_slots")
        .is_none()
    {
        return;
    }
    assert_diverges(
        "memslots",
        diff::memslots::run(1, 3000, "n/a (broken build)"),
    );
}

#[cfg(feature = "broken-madvise-no-zap")]
#[test]
fn data_family_catches_a_kvmmu_whose_madvise_does_not_zap() {
    let _g = kvmmu_kvm::kvm_lock();
    if kvmmu_kvm::open_or_skip("data_family_catches_a_kvmmu_whose_madvise_does_not_zap").is_none() {
        return;
    }
    for mmu in [kvmmu::MmuKind::Tdp, kvmmu::MmuKind::Shadow] {
        assert_diverges("data", diff::data::run(1, 3000, mmu, "n/a (broken build)"));
    }
}

#[cfg(feature = "broken-rearm-no-flush")]
#[test]
fn dirty_family_catches_a_kvmmu_whose_rearm_does_not_flush() {
    let _g = kvmmu_kvm::kvm_lock();
    if kvmmu_kvm::open_or_skip("dirty_family_catches_a_kvmmu_whose_rearm_does_not_flush").is_none()
    {
        return;
    }
    use diff::dirty::DirtyMode;
    for mode in [
        DirtyMode::Bitmap(kvmmu::DirtyLogProtect::Classic),
        DirtyMode::Bitmap(kvmmu::DirtyLogProtect::Manual {
            initially_set: false,
        }),
        DirtyMode::Ring,
    ] {
        assert_diverges(
            "dirty",
            diff::dirty::run(1, 1500, mode, kvmmu::MmuKind::Tdp, "n/a (broken build)"),
        );
    }
}
