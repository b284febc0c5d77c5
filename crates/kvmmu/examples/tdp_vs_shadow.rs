//! The same guest on the TDP MMU and on the shadow MMU, side by side: populate, age twice, and
//! compare what each MMU built and counted.
//!
//! `cargo run --release -p kvmmu --example tdp_vs_shadow`

use kvmmu::prelude::*;
use std::time::Instant;

const PAGES: u64 = 32 << 10; // 128 MiB of guest memory

fn run(mmu: MmuKind) -> Result<(), Box<dyn std::error::Error>> {
    let host = HostMm::new(HostConfig { frames: 40 << 10 })?;
    // Back the simulator's own memory first: first-touch page faults of the arena are the
    // simulator's cost, not the MMU's.
    host.arena().prefault()?;
    let vm = Vm::new(
        &host,
        VmConfig {
            mmu,
            ..VmConfig::default()
        },
    )?;
    let len = PAGES * 4096;
    let hva = host.mmap(len, Prot::READ | Prot::WRITE)?;
    vm.set_user_memory_region(MemoryRegion::new(SlotId::new(0), Gpa::new(0), len, hva))?;
    let mut vcpu = vm.create_vcpu()?;

    let t = Instant::now();
    {
        let mut guest = vcpu.enter();
        for p in 0..PAGES {
            guest.write_u64(Gpa::new(p * 4096), p)?;
        }
    }
    let populate = t.elapsed();
    let t = Instant::now();
    let young = host.clear_young(hva, len)?;
    let age_young = t.elapsed();
    let t = Instant::now();
    let again = host.clear_young(hva, len)?;
    let age_idle = t.elapsed();
    let s = vm.shutdown();
    println!(
        "{mmu:?}: populate {:.1} ns/page ({} faults), aging {:.1} ns/page (young: {young}), \
         again {:.1} ns/page (young: {again}); shadow pages {}, tdp tables {}",
        populate.as_nanos() as f64 / PAGES as f64,
        s.faults,
        age_young.as_nanos() as f64 / PAGES as f64,
        age_idle.as_nanos() as f64 / PAGES as f64,
        s.shadow.pages_allocated,
        s.tdp.tables_allocated,
    );
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    run(MmuKind::Tdp)?;
    run(MmuKind::Shadow)
}
