//! Differential tests against real KVM (`/dev/kvm`): each family runs several seeded sequences on
//! kvmmu and on the real kernel and fails on the first divergence, printing the seed, the
//! operation, both answers and a replay command. Without `/dev/kvm` each test prints one
//! `SKIPPED` line and passes.
//!
//! `KVMMU_KVM_SEEDS=1,0x2a` and `KVMMU_KVM_OPS=N` override the seeds and the operation count.

use kvmmu::{DirtyLogProtect, MmuKind};
use kvmmu_kvm::diff::dirty::DirtyMode;
use kvmmu_kvm::diff::{self, FamilyError};

fn seeds() -> Vec<u64> {
    match std::env::var("KVMMU_KVM_SEEDS") {
        Ok(s) => s
            .split(',')
            .filter_map(|t| {
                let t = t.trim();
                t.strip_prefix("0x")
                    .map_or_else(|| t.parse().ok(), |h| u64::from_str_radix(h, 16).ok())
            })
            .collect(),
        Err(_) => vec![1, 2, 3, 0xdead_beef],
    }
}

fn ops(default: usize) -> usize {
    std::env::var("KVMMU_KVM_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn check(family: &str, r: Result<diff::Summary, FamilyError>) {
    match r {
        Ok(s) => println!("{family}: {s:?}"),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn memslot_requests_are_accepted_or_refused_like_kvm() {
    let _g = kvmmu_kvm::kvm_lock();
    if kvmmu_kvm::open_or_skip("memslot_requests_are_accepted_or_refused_like_kvm").is_none() {
        return;
    }
    for seed in seeds() {
        check(
            "memslots",
            diff::memslots::run(
                seed,
                ops(3000),
                "memslot_requests_are_accepted_or_refused_like_kvm",
            ),
        );
    }
}

#[test]
fn guest_data_and_exits_match_kvm_with_tdp() {
    let _g = kvmmu_kvm::kvm_lock();
    if kvmmu_kvm::open_or_skip("guest_data_and_exits_match_kvm_with_tdp").is_none() {
        return;
    }
    for seed in seeds() {
        check(
            "data/tdp",
            diff::data::run(
                seed,
                ops(2000),
                MmuKind::Tdp,
                "guest_data_and_exits_match_kvm_with_tdp",
            ),
        );
    }
}

#[test]
fn guest_data_and_exits_match_kvm_with_shadow() {
    let _g = kvmmu_kvm::kvm_lock();
    if kvmmu_kvm::open_or_skip("guest_data_and_exits_match_kvm_with_shadow").is_none() {
        return;
    }
    for seed in seeds() {
        check(
            "data/shadow",
            diff::data::run(
                seed,
                ops(2000),
                MmuKind::Shadow,
                "guest_data_and_exits_match_kvm_with_shadow",
            ),
        );
    }
}

#[test]
fn stats_side_by_side_agree_where_semantics_match() {
    let _g = kvmmu_kvm::kvm_lock();
    if kvmmu_kvm::open_or_skip("stats_side_by_side_agree_where_semantics_match").is_none() {
        return;
    }
    for mmu in [MmuKind::Tdp, MmuKind::Shadow] {
        let rows = diff::stats::run(256, mmu).unwrap_or_else(|e| panic!("{e}"));
        println!(
            "kvmmu {mmu:?} vs KVM, 256 pages:\n{}",
            diff::stats::render(&rows)
        );
        for r in rows
            .iter()
            .filter(|r| r.relation == diff::stats::Relation::Same)
        {
            assert_eq!(
                r.kvm, r.kvmmu,
                "{} / {} in phase {}",
                r.kvm_name, r.kvmmu_name, r.phase
            );
        }
    }
}

#[test]
fn dirty_bitmaps_match_kvm_in_classic_and_manual_protect_modes() {
    let _g = kvmmu_kvm::kvm_lock();
    let what = "dirty_bitmaps_match_kvm_in_classic_and_manual_protect_modes";
    let Some(real) = kvmmu_kvm::open_or_skip(what) else {
        return;
    };
    let ring = diff::dirty::ring_supported(&real);
    if !ring {
        kvmmu_kvm::skip_line(
            "dirty ring mode of the dirty-log family",
            "this host's KVM does not offer KVM_CAP_DIRTY_LOG_RING",
        );
    }
    drop(real);
    let mut modes = vec![
        DirtyMode::Bitmap(DirtyLogProtect::Classic),
        DirtyMode::Bitmap(DirtyLogProtect::Manual {
            initially_set: false,
        }),
        DirtyMode::Bitmap(DirtyLogProtect::Manual {
            initially_set: true,
        }),
    ];
    if ring {
        modes.push(DirtyMode::Ring);
    }
    for seed in seeds() {
        for &mode in &modes {
            for mmu in [MmuKind::Tdp, MmuKind::Shadow] {
                check(
                    &format!("dirty/{mode:?}/{mmu:?}"),
                    diff::dirty::run(seed, ops(1500), mode, mmu, what),
                );
            }
        }
    }
}
