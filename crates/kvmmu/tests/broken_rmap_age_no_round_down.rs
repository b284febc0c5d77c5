//! The deliberately broken build whose shadow rmap aging does not round an unaligned start down
//! per level (feature `broken-rmap-age-no-round-down`) must be caught: aging gfns [511, 513)
//! misses the young 2M leaf at gfn 512, so the per-page bitmap disagrees with `test_young`.
//! Run with `cargo test -p kvmmu --features broken-rmap-age-no-round-down
//! --test broken_rmap_age_no_round_down`.

mod common;

use common::*;
use kvmmu::prelude::*;

#[test]
fn the_aging_check_catches_rmap_aging_that_forgets_to_round_down() {
    let host = HostMm::new(HostConfig { frames: 4096 }).unwrap();
    let vm = Vm::new(
        &host,
        VmConfig {
            mmu: MmuKind::Shadow,
            ..VmConfig::default()
        },
    )
    .unwrap();
    let hva = host
        .mmap_backed(4 << 20, Prot::READ | Prot::WRITE, BackingSrc::AnonymousThp)
        .unwrap();
    vm.set_user_memory_region(region(0, BASE_GPA, 4 << 20, hva))
        .unwrap();
    let mut v = vm.create_vcpu().unwrap();
    v.write_u64(gpa(600), 1).unwrap();
    drop(v);
    let per_page: Vec<bool> = [511, 512]
        .iter()
        .map(|p| host.test_young(hva_of(hva, *p)).unwrap())
        .collect();
    assert_eq!(
        per_page,
        [false, true],
        "test_young sees the 2M leaf at 512"
    );
    let bitmap = host.clear_young_range(hva_of(hva, 511), 2 * 4096).unwrap();
    let got: Vec<bool> = (0..2).map(|i| bitmap.is_young(i)).collect();
    assert_ne!(
        got, per_page,
        "the broken build was not caught: its bitmap matched test_young"
    );
}
