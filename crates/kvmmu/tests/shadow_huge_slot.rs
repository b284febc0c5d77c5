//! A huge but valid memslot on a shadow-MMU VM: its rmap arrays (one head per page) are allocated
//! fallibly and lazily (zeroed pages from the allocator), so creating the slot neither aborts the
//! process nor grows resident memory with the slot's size; a refused allocation would be the typed
//! `SetMemoryRegionError::NoMemory`.
//!
//! One test in a binary of its own: resident memory is a process-wide number.

use kvmmu::internals::host::{HostConfig, HostMm, Prot};
use kvmmu::internals::vm::SetMemoryRegionError;
use kvmmu::prelude::*;

const PAGE: u64 = 4096;
/// 2^26 pages (256 GiB): 512 MiB of 4K rmap heads if they were written.
const PAGES: u64 = 1 << 26;
const SIXTY_FOUR_MIB: u64 = 64 << 20;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("read /proc/self/statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|f| f.parse().ok())
        .expect("statm has a resident field");
    pages * PAGE
}

#[test]
fn a_huge_shadow_memslot_is_created_without_writing_its_rmaps_and_works() {
    let host = HostMm::new(HostConfig { frames: 64 }).expect("host");
    let vm = Vm::new(
        &host,
        VmConfig {
            mmu: MmuKind::Shadow,
            ..VmConfig::default()
        },
    )
    .expect("vm");
    let hva = host
        .mmap(PAGES * PAGE, Prot::READ | Prot::WRITE)
        .expect("mmap 256 GiB");
    let before = rss_bytes();
    let created = vm.set_user_memory_region(MemoryRegion {
        slot: SlotId::new(0),
        as_id: AsId::new(0),
        flags: MemFlags::empty(),
        gpa: Gpa::new(0),
        size: PAGES * PAGE,
        hva,
    });
    match created {
        Ok(()) => {}
        // The system may refuse 512 MiB of address space; then the error is typed and nothing
        // changed.
        Err(SetMemoryRegionError::NoMemory(e)) => {
            assert_eq!(e.pages, PAGES);
            assert!(vm.memslots(AsId::new(0)).unwrap().is_empty());
            return;
        }
        Err(e) => panic!("unexpected error: {e}"),
    }
    let mut vcpu = vm.create_vcpu().expect("vcpu");
    let last = Gpa::new((PAGES - 1) * PAGE);
    vcpu.write_u64(Gpa::new(0), 1).unwrap();
    vcpu.write_u64(last, 2).unwrap();
    assert_eq!(vcpu.read_u64(last).unwrap(), 2);
    let grown = rss_bytes().saturating_sub(before);
    assert!(
        grown < SIXTY_FOUR_MIB,
        "creating and using a 256 GiB shadow memslot grew RSS by {grown} bytes"
    );
    drop(vcpu);
    let fin = vm.shutdown();
    assert_eq!(fin.shadow.pages_allocated, fin.shadow.pages_freed);
}
