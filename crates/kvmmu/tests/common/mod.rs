//! Shared set-up for the integration tests.
#![allow(dead_code)]

use kvmmu::prelude::*;

/// Guest physical base of the test memslot.
pub const BASE_GPA: u64 = 1 << 32;

/// A host, a VM on it, and one memslot of `bytes` at [`BASE_GPA`].
pub struct Fixture {
    pub host: HostMm,
    pub vm: Vm,
    pub hva: Hva,
    pub bytes: u64,
}

pub fn fixture(bytes: u64, config: VmConfig) -> Fixture {
    let host = HostMm::new(HostConfig {
        frames: (bytes / 4096) as usize * 2 + 256,
    })
    .expect("host");
    let vm = Vm::new(&host, config).expect("vm");
    let hva = host.mmap(bytes, Prot::READ | Prot::WRITE).expect("mmap");
    vm.set_user_memory_region(region(0, BASE_GPA, bytes, hva))
        .expect("memslot");
    Fixture {
        host,
        vm,
        hva,
        bytes,
    }
}

pub fn region(slot: u16, gpa: u64, size: u64, hva: Hva) -> MemoryRegion {
    MemoryRegion {
        slot: SlotId::new(slot),
        as_id: AsId::new(0),
        flags: MemFlags::empty(),
        gpa: Gpa::new(gpa),
        size,
        hva,
    }
}

pub fn gpa(page: u64) -> Gpa {
    Gpa::new(BASE_GPA + page * 4096)
}

pub fn hva_of(base: Hva, page: u64) -> Hva {
    base.checked_add(page * 4096).expect("hva")
}
