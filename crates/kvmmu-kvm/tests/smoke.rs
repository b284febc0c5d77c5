use kvmmu_kvm::guest::Routine;
use kvmmu_kvm::hostmem::HostRegion;
use std::sync::Arc;
#[test]
fn probe() {
    let _g = kvmmu_kvm::kvm_lock();
    let Some(vm) = kvmmu_kvm::open_or_skip("probe") else { return };
    println!("as={} slots={} limits={:?}", vm.nr_address_spaces(), vm.nr_memslots(), vm.probe_limits());
    let mut vm = kvmmu_kvm::open_or_skip("probe").unwrap();
    vm.enable_guest().unwrap();
    let r = Arc::new(HostRegion::new(16 * 4096).unwrap());
    vm.adopt(r.clone());
    println!("{:?}", vm.set_user_memory_region(0, 0, 0, 0x10000, 8 * 4096, r.base()));
    println!("{:?}", vm.set_user_memory_region(0, 1, 2, 0x40000, 8 * 4096, r.base() + 8*4096));
    let o = vm.run(Routine::Store, 0x10008, 42, 0).unwrap(); println!("store {:?}", o.exit);
    let o = vm.run(Routine::Load, 0x10008, 0, 0).unwrap(); println!("load {:?} rax={}", o.exit, o.regs.rax);
    let o = vm.run(Routine::Load, 0x90000, 0, 0).unwrap(); println!("load noslot {:?}", o.exit);
    let o = vm.run(Routine::Store, 0x90000, 1, 0).unwrap(); println!("store noslot {:?}", o.exit);
    let o = vm.run(Routine::Store, 0x40000, 1, 0).unwrap(); println!("store ro {:?}", o.exit);
    let o = vm.run(Routine::Load, 0x40000, 1, 0).unwrap(); println!("load ro {:?} {}", o.exit, o.regs.rax);
    r.munmap(0, 4096).unwrap();
    let o = vm.run(Routine::Load, 0x10008, 0, 0).unwrap(); println!("load unmapped {:?}", o.exit);
    let o = vm.run(Routine::Store, 0x10008, 0, 0).unwrap(); println!("store unmapped {:?}", o.exit);
    r.mmap_fixed(0, 4096, kvmmu_kvm::hostmem::HostProt::Read).unwrap();
    let o = vm.run(Routine::Load, 0x10008, 0, 0).unwrap(); println!("load remapped ro {:?} {}", o.exit, o.regs.rax);
    let o = vm.run(Routine::Store, 0x10008, 5, 0).unwrap(); println!("store remapped ro {:?}", o.exit);
    vm.set_list(&[0x10000, 0x11000, 0x90000, 0x12000]).unwrap();
    let o = vm.run(Routine::StoreList, guest_list(), 100, 4).unwrap(); println!("list {:?} rcx={}", o.exit, o.regs.rcx);
    let o = vm.run(Routine::StoreStride, 0x11000, 7, 0x18000).unwrap(); println!("stride {:?} rdi={:#x}", o.exit, o.regs.rdi);
    println!("{:?}", vm.vm_stats().unwrap());
    println!("{:?}", vm.vcpu_stats().unwrap().0.keys().collect::<Vec<_>>());
}
fn guest_list() -> u64 { kvmmu_kvm::guest::RESERVED_GPA + kvmmu_kvm::guest::LIST_OFFSET }
