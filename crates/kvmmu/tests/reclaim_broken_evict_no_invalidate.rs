//! The deliberately broken build that evicts a page without its invalidate_range_start/end pair
//! (feature `broken-evict-no-invalidate`) must be caught: by the direct check below (the vCPU's
//! next access goes through a translation to the freed frame) and by the torture oracles with the
//! reclaim actor. Run with
//! `cargo test -p kvmmu --features broken-evict-no-invalidate --test reclaim_broken_evict_no_invalidate`.

mod common;

use common::*;
use kvmmu::internals::host::{ReclaimAging, ReclaimConfig};
use kvmmu::prelude::*;
use kvmmu::torture::{Actors, TortureConfig, ViolationKind, hunt};

#[test]
fn an_eviction_without_invalidation_leaves_a_stale_translation_that_is_caught() {
    let host = HostMm::new(HostConfig { frames: 256 }).unwrap();
    host.enable_reclaim(ReclaimConfig {
        limit_frames: 128,
        swap_slots: 64,
        aging: ReclaimAging::Generations,
    })
    .unwrap();
    let vm = Vm::new(&host, VmConfig::default()).unwrap();
    let hva = host.mmap(16 * 4096, Prot::READ | Prot::WRITE).unwrap();
    vm.set_user_memory_region(region(0, BASE_GPA, 16 * 4096, hva))
        .unwrap();
    let mut vcpu = vm.create_vcpu().unwrap();
    vcpu.write_u64(gpa(3), 77).unwrap();
    assert_eq!(host.page_out(hva_of(hva, 3), 4096).unwrap(), 1);
    assert!(
        vm.spte(AsId::new(0), gpa(3).gfn()).is_some(),
        "the broken build keeps the SPTE of the evicted page"
    );
    // The vCPU still translates to the freed frame: the arena's owner tags report it.
    let r = vcpu.read_u64(gpa(3));
    assert!(
        matches!(r, Err(VcpuExit::StaleTranslation { .. })) || r != Ok(77),
        "an access through the evicted page's stale translation went unnoticed: {r:?}"
    );
}

#[test]
fn torture_with_the_reclaim_actor_catches_an_eviction_without_invalidation() {
    let cfg = TortureConfig {
        ops_per_vcpu: Some(20_000),
        actors: Actors::RECLAIM,
        ..TortureConfig::default()
    };
    let report = hunt(&cfg, 1..=5)
        .expect("set-up")
        .expect("five bounded runs of a build that evicts without invalidating all passed");
    eprintln!("{report}");
    assert!(
        report.has_any(&[ViolationKind::StaleTranslation, ViolationKind::Data]),
        "caught, but not as a stale translation or lost data:\n{report}"
    );
}
