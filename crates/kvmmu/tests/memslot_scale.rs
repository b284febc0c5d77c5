//! Memslot updates scale to KVM's full slot count: every one of the 32,764 user slots of an address
//! space can be created, moved and deleted through the VM (each update is O(log n) in the number of
//! slots, so this runs in well under a second in release builds), a vCPU reaches guest memory
//! through any of them, and the published set always holds exactly the slots created.
//! (Counts only: no timing is asserted.)

use kvmmu::prelude::*;

const PAGE: u64 = 4096;

fn region(slot: u16, gpa: u64, size: u64, hva: Hva) -> MemoryRegion {
    MemoryRegion {
        slot: SlotId::new(slot),
        as_id: AsId::new(0),
        flags: MemFlags::empty(),
        gpa: Gpa::new(gpa),
        size,
        hva,
    }
}

#[test]
fn every_user_slot_can_be_created_moved_and_deleted_and_stays_reachable() {
    let n = SlotId::MAX;
    let host = HostMm::new(HostConfig { frames: 256 }).expect("host");
    let vm = Vm::new(&host, VmConfig::default()).expect("vm");
    let hva = host
        .mmap(u64::from(n) * PAGE, Prot::READ | Prot::WRITE)
        .expect("mmap");
    let page = |i: u16| Hva::new(hva.raw() + u64::from(i) * PAGE);
    // Slot i maps guest page 2i (gaps in between) to host page i.
    for i in 0..n {
        vm.set_user_memory_region(region(i, 2 * u64::from(i) * PAGE, PAGE, page(i)))
            .expect("create");
    }
    let slots = vm.memslots(AsId::new(0)).expect("address space 0");
    assert_eq!(slots.len(), usize::from(n));
    assert!(
        slots.windows(2).all(|w| w[0].base_gfn() < w[1].base_gfn()),
        "the set iterates in gfn order"
    );

    // A guest write through the last slot lands in its host page.
    let mut vcpu = vm.create_vcpu().expect("vcpu");
    let last = n - 1;
    vcpu.write_u64(Gpa::new(2 * u64::from(last) * PAGE + 8), 0xfeed)
        .expect("guest write");
    assert_eq!(
        host.read_u64(Hva::new(page(last).raw() + 8)).expect("host"),
        0xfeed
    );
    drop(vcpu);

    // Move every even slot into the gap after it, then delete every odd slot.
    for i in (0..n).step_by(2) {
        vm.set_user_memory_region(region(i, (2 * u64::from(i) + 1) * PAGE, PAGE, page(i)))
            .expect("move");
    }
    for i in (1..n).step_by(2) {
        vm.set_user_memory_region(region(i, 0, 0, page(i)))
            .expect("delete");
    }
    let slots = vm.memslots(AsId::new(0)).expect("address space 0");
    assert_eq!(slots.len(), usize::from(n).div_ceil(2));
    assert!(slots.iter().all(|s| s.id().get() % 2 == 0
        && s.base_gfn().raw() == 2 * u64::from(s.id().get()) + 1));
}
