//! Aging cost per guest page with 2M leaves vs 4K leaves, and populate time with THP vs 4K, in one
//! run (issue 11's bench ratio). For each backing source: populate a guest through one vCPU
//! (timed), then repeatedly touch every page (so every leaf is young) and time one
//! `HostMm::clear_young` over the whole guest. The same host-side pass without a VM subscribed is
//! timed too and subtracted, leaving the secondary MMU's share (KVM's `kvm_age_gfn`).
//!
//! Run: `cargo run --release -p kvmmu --example huge_aging [GiB] [reps]`.

use std::time::{Duration, Instant};

use kvmmu::prelude::*;

const PAGE: u64 = 4096;
const BASE_GPA: u64 = 1 << 32;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let gib: u64 = args.next().map_or(Ok(1), |a| a.parse())?;
    let reps: usize = args.next().map_or(Ok(7), |a| a.parse())?;
    let bytes = gib << 30;
    let pages = bytes / PAGE;
    let frames = usize::try_from(pages + (1 << 18))?;
    let mut per_page = Vec::new();
    for src in [BackingSrc::Anonymous, BackingSrc::AnonymousThp] {
        // The host alone: populate, then age a fully young range.
        let host = HostMm::new(HostConfig { frames })?;
        host.prefault()?;
        let hva = host.mmap_backed(bytes, Prot::READ | Prot::WRITE, src)?;
        for p in 0..pages {
            host.write_u64(Hva::new(hva.raw() + p * PAGE), p)?;
        }
        // The host's young bits were set by the fault-ins; in the VM run below they are cleared
        // by the first pass and stay clear (vCPU accesses never reach the host PTEs), so the
        // baseline is a pass over old PTEs.
        host.clear_young(hva, bytes)?;
        let mut host_only = Vec::new();
        for _ in 0..reps {
            let t = Instant::now();
            host.clear_young(hva, bytes)?;
            host_only.push(t.elapsed());
        }
        drop(host);

        // Host and VM.
        let host = HostMm::new(HostConfig { frames })?;
        host.prefault()?;
        let vm = Vm::new(&host, VmConfig::default())?;
        let hva = host.mmap_backed(bytes, Prot::READ | Prot::WRITE, src)?;
        vm.set_user_memory_region(MemoryRegion {
            slot: SlotId::new(0),
            as_id: AsId::new(0),
            flags: MemFlags::empty(),
            gpa: Gpa::new(BASE_GPA),
            size: bytes,
            hva,
        })?;
        let mut v = vm.create_vcpu()?;
        let t = Instant::now();
        for p in 0..pages {
            v.write_u64(Gpa::new(BASE_GPA + p * PAGE), p)?;
        }
        let populate = t.elapsed();
        let populate_faults = vm.stats().faults;
        host.clear_young(hva, bytes)?;
        let mut with_vm = Vec::new();
        for _ in 0..reps {
            // Every leaf young again: the guest touches every page; with far more pages than TLB
            // entries every access walks and sets Accessed in its leaf.
            for p in 0..pages {
                v.read_u64(Gpa::new(BASE_GPA + p * PAGE))?;
            }
            let t = Instant::now();
            let young = host.clear_young(hva, bytes)?;
            with_vm.push(t.elapsed());
            assert!(young);
        }
        let s = vm.stats();
        let (h, w) = (median(host_only), median(with_vm));
        let kvm = w.saturating_sub(h);
        let ns = kvm.as_nanos() as f64 / pages as f64;
        println!(
            "{src}: {gib} GiB, pages_4k {} pages_2m {}: populate {:.1} ms ({} faults); \
             clear_young total {:.3} ms, host-only {:.3} ms, MMU share {:.3} ms = {ns:.3} ns per guest page",
            s.pages_4k,
            s.pages_2m,
            populate.as_secs_f64() * 1e3,
            populate_faults,
            w.as_secs_f64() * 1e3,
            h.as_secs_f64() * 1e3,
            kvm.as_secs_f64() * 1e3,
        );
        per_page.push((ns, populate));
    }
    println!(
        "ratio 4K/2M: aging (MMU share per guest page) {:.1}x, populate {:.1}x",
        per_page[0].0 / per_page[1].0.max(1e-9),
        per_page[0].1.as_secs_f64() / per_page[1].1.as_secs_f64()
    );
    Ok(())
}
