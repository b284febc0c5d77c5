//! Two vCPU threads keep touching a hot set while an aging thread finds the cold pages, as a
//! working-set estimator would: lockless aging never stops the vCPUs.
//!
//! `cargo run --release -p kvmmu --example threaded_aging`

use kvmmu::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

const PAGES: u64 = 16 << 10; // 64 MiB of guest memory
const HOT: u64 = PAGES / 4; // each vCPU keeps re-touching the first quarter of its half

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let host = HostMm::new(HostConfig { frames: 32 << 10 })?;
    let vm = Vm::new(
        &host,
        VmConfig {
            aging: AgingMode::Lockless,
            // A small TLB, so that re-touches reach the page tables and set Accessed again.
            tlb_entries: 64,
            ..VmConfig::default()
        },
    )?;
    let hva = host.mmap(PAGES * 4096, Prot::READ | Prot::WRITE)?;
    vm.set_user_memory_region(MemoryRegion::new(
        SlotId::new(0),
        Gpa::new(0),
        PAGES * 4096,
        hva,
    ))?;

    let stop = AtomicBool::new(false);
    let mut young_hot = 0u64;
    let mut young_cold = 0u64;
    std::thread::scope(|s| -> Result<(), Box<dyn std::error::Error>> {
        let mut workers = Vec::new();
        for id in 0..2u64 {
            let mut vcpu = vm.create_vcpu()?;
            let stop = &stop;
            workers.push(s.spawn(move || -> Result<u64, VcpuExit> {
                let half = PAGES / 2;
                let base = id * half;
                let mut guest = vcpu.enter();
                for p in base..base + half {
                    guest.write_u64(Gpa::new(p * 4096), p)?; // populate everything once
                }
                let mut rounds = 0;
                while !stop.load(Ordering::Relaxed) {
                    for p in base..base + HOT / 2 {
                        guest.read_u64(Gpa::new(p * 4096))?;
                    }
                    rounds += 1;
                }
                Ok(rounds)
            }));
        }
        // The aging thread: clear Accessed everywhere, let the vCPUs run, then ask per page.
        std::thread::sleep(std::time::Duration::from_millis(200));
        host.clear_young(hva, PAGES * 4096)?;
        std::thread::sleep(std::time::Duration::from_millis(200));
        let young = host.clear_young_range(hva, PAGES * 4096)?;
        stop.store(true, Ordering::Relaxed);
        for p in 0..PAGES {
            let hot = (p % (PAGES / 2)) < HOT / 2;
            if young.is_young(p) {
                if hot {
                    young_hot += 1;
                } else {
                    young_cold += 1;
                }
            }
        }
        for w in workers {
            let rounds = w.join().expect("vCPU thread panicked")?;
            println!("vCPU re-touched its hot set {rounds} times");
        }
        Ok(())
    })?;
    println!(
        "hot pages found young: {young_hot} of {HOT}; cold pages found young: {young_cold} of {}",
        PAGES - HOT
    );
    println!("VM stats: {:?}", vm.stats().mmu_lock);
    Ok(())
}
