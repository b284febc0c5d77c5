//! The VM the nested tests start from: a host of `frames` frames, a VM on `mmu` with nesting
//! enabled (before any memslot, as `Vm::enable_nested` requires), and one read-write 16 MiB slot
//! at gpa 0 (L1 memory: table pool and data). Shared by `nested_builder.rs` and `nested_l2.rs`.

use kvmmu::prelude::*;

/// L1 memory size.
pub const L1_BYTES: u64 = 16 << 20;

/// The host, the VM and the slot's hva.
pub fn nested_vm(mmu: MmuKind, frames: usize) -> (HostMm, Vm, Hva) {
    let host = HostMm::new(HostConfig { frames }).unwrap();
    let vm = Vm::new(
        &host,
        VmConfig {
            mmu,
            ..VmConfig::default()
        },
    )
    .unwrap();
    vm.enable_nested().unwrap();
    let hva = host.mmap(L1_BYTES, Prot::READ | Prot::WRITE).unwrap();
    vm.set_user_memory_region(MemoryRegion {
        slot: SlotId::new(0),
        as_id: AsId::new(0),
        flags: MemFlags::empty(),
        gpa: Gpa::new(0),
        size: L1_BYTES,
        hva,
    })
    .unwrap();
    (host, vm, hva)
}
