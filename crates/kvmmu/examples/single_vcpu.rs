//! One vCPU on a 64 MiB guest: write and read guest memory, watch the host age it, and see an
//! invalidation reach the vCPU.
//!
//! `cargo run --release -p kvmmu --example single_vcpu`

use kvmmu::prelude::*;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const SIZE: u64 = 64 << 20;
    // Simulated physical memory: 32,768 frames of 4 KiB (128 MiB).
    let host = HostMm::new(HostConfig { frames: 32 << 10 })?;
    let vm = Vm::new(&host, VmConfig::default())?;
    let hva = host.mmap(SIZE, Prot::READ | Prot::WRITE)?;
    vm.set_user_memory_region(MemoryRegion::new(SlotId::new(0), Gpa::new(0), SIZE, hva))?;

    let mut vcpu = vm.create_vcpu()?;
    {
        // A run of guest instructions: one entry into guest mode, many accesses.
        let mut guest = vcpu.enter();
        for page in 0..SIZE / 4096 {
            guest.write_u64(Gpa::new(page * 4096), page)?;
        }
        guest.write_bytes(Gpa::new(4093), b"hello, guest")?; // unaligned, crosses a page
        let mut back = [0u8; 12];
        guest.read_bytes(Gpa::new(4093), &mut back)?;
        assert_eq!(&back, b"hello, guest");
    }
    println!("after populating: {:?}", vcpu.stats());

    // The host ages the guest through the MMU-notifier path (lockless by default).
    println!("young after populating: {}", host.clear_young(hva, SIZE)?);
    println!(
        "first page young right after aging: {}",
        host.test_young(hva)?
    );

    // An invalidation: the host write-protects the memory; the vCPU's next write exits.
    host.mprotect(hva, SIZE, Prot::READ)?;
    match vcpu.write_u64(Gpa::new(0), 1) {
        Err(VcpuExit::HostFault { gpa, error, .. }) => println!("write at {gpa} refused: {error}"),
        other => println!("unexpected: {other:?}"),
    }
    assert_eq!(vcpu.read_u64(Gpa::new(8192))?, 2, "reads still work");

    let stats = vm.shutdown();
    println!(
        "faults {} (retries {}), invalidations {}/{}, remote TLB flushes {}",
        stats.faults,
        stats.fault_retries,
        stats.invalidate_starts,
        stats.invalidate_ends,
        stats.remote_tlb_flush
    );
    Ok(())
}
