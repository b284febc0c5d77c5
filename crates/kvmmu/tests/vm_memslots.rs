//! Memslot updates through the VM: generations, failed updates changing nothing, delete and move
//! zapping translations, read-only slots, aliases.

mod common;

use common::*;
use kvmmu::internals::vm::SetMemoryRegionError;
use kvmmu::internals::vm::memslot::MemslotError;
use kvmmu::prelude::*;

#[test]
fn refused_update_changes_nothing() {
    let f = fixture(1 << 20, VmConfig::default());
    let before = f.vm.memslots(AsId::new(0)).unwrap();
    let gen_before = f.vm.memslots_generation(AsId::new(0)).unwrap();
    // Overlaps slot 0's gfn range.
    let err =
        f.vm.set_user_memory_region(region(1, BASE_GPA + 4096, 4096, f.hva))
            .unwrap_err();
    assert!(matches!(
        err,
        SetMemoryRegionError::Invalid(MemslotError::Overlap { .. })
    ));
    // Unaligned size.
    let err =
        f.vm.set_user_memory_region(region(2, 0, 100, f.hva))
            .unwrap_err();
    assert!(matches!(
        err,
        SetMemoryRegionError::Invalid(MemslotError::UnalignedSize { .. })
    ));
    assert_eq!(f.vm.memslots(AsId::new(0)).unwrap(), before);
    assert_eq!(f.vm.memslots_generation(AsId::new(0)).unwrap(), gen_before);
}

#[test]
fn generations_grow_by_address_space_count_and_keep_their_residue() {
    let host = HostMm::new(HostConfig { frames: 64 }).unwrap();
    let vm = Vm::new(
        &host,
        VmConfig {
            address_spaces: 2,
            ..VmConfig::default()
        },
    )
    .unwrap();
    let hva = host.mmap(1 << 16, Prot::READ | Prot::WRITE).unwrap();
    for as_id in [0u8, 1] {
        let mut last = vm.memslots_generation(AsId::new(as_id)).unwrap();
        assert_eq!(last % 2, u64::from(as_id));
        for slot in 0..3u16 {
            let mut r = region(slot, u64::from(slot) << 20, 4096, hva);
            r.as_id = AsId::new(as_id);
            vm.set_user_memory_region(r).unwrap();
            let g = vm.memslots_generation(AsId::new(as_id)).unwrap();
            assert_eq!(g & kvmmu::internals::vm::MEMSLOT_GEN_UPDATE_IN_PROGRESS, 0);
            assert!(g > last, "generation must grow");
            assert_eq!(
                g % 2,
                u64::from(as_id),
                "generation keeps its address-space residue"
            );
            last = g;
        }
    }
}

#[test]
fn delete_zaps_translations_and_faults_see_no_slot() {
    let f = fixture(1 << 20, VmConfig::default());
    let mut vcpu = f.vm.create_vcpu().unwrap();
    vcpu.write_u64(gpa(3), 77).unwrap();
    assert_eq!(vcpu.read_u64(gpa(3)).unwrap(), 77);
    f.vm.set_user_memory_region(region(0, BASE_GPA, 0, f.hva))
        .unwrap();
    assert!(matches!(
        vcpu.read_u64(gpa(3)),
        Err(VcpuExit::NoMemslot { .. })
    ));
    // The host memory still has the value: deleting a slot does not touch host memory.
    assert_eq!(f.host.read_u64(hva_of(f.hva, 3)).unwrap(), 77);
}

#[test]
fn move_keeps_data_at_the_new_address() {
    let f = fixture(1 << 20, VmConfig::default());
    let mut vcpu = f.vm.create_vcpu().unwrap();
    vcpu.write_u64(gpa(5), 0xfeed).unwrap();
    let new_base = BASE_GPA + (1 << 30);
    f.vm.set_user_memory_region(region(0, new_base, 1 << 20, f.hva))
        .unwrap();
    assert!(matches!(
        vcpu.read_u64(gpa(5)),
        Err(VcpuExit::NoMemslot { .. })
    ));
    assert_eq!(
        vcpu.read_u64(Gpa::new(new_base + 5 * 4096)).unwrap(),
        0xfeed
    );
}

#[test]
fn aliased_slots_see_each_others_writes() {
    let f = fixture(1 << 16, VmConfig::default());
    let alias = BASE_GPA + (1 << 30);
    f.vm.set_user_memory_region(region(1, alias, 1 << 16, f.hva))
        .unwrap();
    let mut vcpu = f.vm.create_vcpu().unwrap();
    vcpu.write_u64(gpa(2), 1234).unwrap();
    assert_eq!(vcpu.read_u64(Gpa::new(alias + 2 * 4096)).unwrap(), 1234);
    // An invalidation of the shared hva zaps both translations.
    f.host.madvise_dontneed(f.hva, 1 << 16).unwrap();
    assert_eq!(vcpu.read_u64(Gpa::new(alias + 2 * 4096)).unwrap(), 0);
    assert_eq!(vcpu.read_u64(gpa(2)).unwrap(), 0);
}

#[test]
fn readonly_slot_refuses_guest_writes_but_allows_reads() {
    let host = HostMm::new(HostConfig { frames: 64 }).unwrap();
    let vm = Vm::new(&host, VmConfig::default()).unwrap();
    let hva = host.mmap(1 << 16, Prot::READ | Prot::WRITE).unwrap();
    host.write_u64(hva, 99).unwrap();
    let mut r = region(0, BASE_GPA, 1 << 16, hva);
    r.flags = MemFlags::READONLY;
    vm.set_user_memory_region(r).unwrap();
    let mut vcpu = vm.create_vcpu().unwrap();
    assert_eq!(vcpu.read_u64(gpa(0)).unwrap(), 99);
    assert!(matches!(
        vcpu.write_u64(gpa(0), 1),
        Err(VcpuExit::ReadonlyMemslot { .. })
    ));
    assert_eq!(host.read_u64(hva).unwrap(), 99);
}
