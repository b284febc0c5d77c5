#![allow(dead_code)]
//! The concurrent dirty-logging harness shared by `dirty_log_concurrent` and the broken build's
//! test: vCPUs write random pages, a harvester loops get (and clear) copying every reported page,
//! an ager loops lockless aging; at the end the copy must equal guest memory (DESIGN invariant 7:
//! a page written after its last copy was reported again).

use std::sync::atomic::{AtomicUsize, Ordering};

use kvmmu::prelude::*;

use crate::common::{BASE_GPA, fixture, gpa, hva_of, region};

/// One run of the harness.
#[derive(Clone, Copy, Debug)]
pub struct DirtyRun {
    pub mmu: MmuKind,
    pub tracking: DirtyTracking,
    pub manual: bool,
    pub vcpus: usize,
    pub pages_per_vcpu: u64,
    pub writes_per_vcpu: u64,
    pub seed: u64,
    /// The leaves' A/D format (with `Disabled`, aging marks leaves for access tracking by one
    /// CAS, racing the fast page fault; `tracking` must be `WriteProtect`).
    pub ad_bits: AdBits,
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// Harvests once: the reported pages are re-armed, then copied into `dest`. Returns how many
/// pages were reported.
pub fn harvest(vm: &Vm, host: &HostMm, hva: Hva, manual: bool, dest: &mut [u64]) -> u64 {
    let (as_id, slot) = (AsId::new(0), SlotId::new(0));
    let words = vm.get_dirty_log(as_id, slot).expect("get_dirty_log");
    let mut n = 0;
    for (i, &w) in words.iter().enumerate() {
        if w == 0 {
            continue;
        }
        if manual {
            let first = i as u64 * 64;
            let len = 64.min(dest.len() as u64 - first);
            vm.clear_dirty_log(as_id, slot, first, len, &[w])
                .expect("clear_dirty_log");
        }
        for b in 0..64 {
            if w & (1 << b) != 0 {
                let page = i as u64 * 64 + b;
                dest[page as usize] = host.read_u64(hva_of(hva, page)).expect("host read");
                n += 1;
            }
        }
    }
    n
}

/// Runs the harness; `Err` lists the pages whose last harvested copy differs from guest memory.
pub fn run(cfg: DirtyRun) -> Result<u64, String> {
    let npages = cfg.vcpus as u64 * cfg.pages_per_vcpu;
    let config = VmConfig {
        mmu: cfg.mmu,
        ad_bits: cfg.ad_bits,
        ..VmConfig::default()
    };
    let f = fixture(npages * 4096, config);
    f.vm.set_dirty_tracking(cfg.tracking).expect("tracking");
    if cfg.manual {
        f.vm.set_dirty_log_protect(DirtyLogProtect::Manual {
            initially_set: false,
        })
        .expect("manual protect");
    }
    let mut r = region(0, BASE_GPA, f.bytes, f.hva);
    r.flags = MemFlags::LOG_DIRTY_PAGES;
    f.vm.set_user_memory_region(r).expect("enable logging");

    let mut vcpus: Vec<Vcpu> = (0..cfg.vcpus)
        .map(|_| f.vm.create_vcpu().expect("vcpu"))
        .collect();
    let running = AtomicUsize::new(cfg.vcpus);
    let mut dest = vec![0u64; npages as usize];
    let mut harvested = 0;
    std::thread::scope(|s| {
        for (i, vcpu) in vcpus.iter_mut().enumerate() {
            let running = &running;
            s.spawn(move || {
                let mut rng = cfg.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                rng ^= (i as u64 + 1) << 32;
                let mut g = vcpu.enter();
                for seq in 1..=cfg.writes_per_vcpu {
                    let page =
                        i as u64 * cfg.pages_per_vcpu + xorshift(&mut rng) % cfg.pages_per_vcpu;
                    let value = ((i as u64 + 1) << 40) | seq;
                    g.write_u64(gpa(page), value).expect("guest write");
                }
                drop(g);
                running.fetch_sub(1, Ordering::Release);
            });
        }
        let (host, hva, bytes) = (&f.host, f.hva, f.bytes);
        let running_ref = &running;
        s.spawn(move || {
            while running_ref.load(Ordering::Acquire) != 0 {
                host.clear_young(hva, bytes).expect("aging");
            }
        });
        while running.load(Ordering::Acquire) != 0 {
            harvested += harvest(&f.vm, &f.host, f.hva, cfg.manual, &mut dest);
        }
    });
    // The final harvest, with every vCPU stopped (the migration's last pass).
    harvested += harvest(&f.vm, &f.host, f.hva, cfg.manual, &mut dest);
    let mut lost = Vec::new();
    for page in 0..npages {
        let now = f.host.read_u64(hva_of(f.hva, page)).expect("host read");
        if dest[page as usize] != now {
            lost.push(format!(
                "page {page}: harvested copy {:#x}, guest memory {now:#x}",
                dest[page as usize]
            ));
        }
    }
    drop(vcpus);
    if lost.is_empty() {
        Ok(harvested)
    } else {
        Err(format!(
            "{} of {npages} pages lost a write ({cfg:?}):\n{}",
            lost.len(),
            lost.iter().take(10).cloned().collect::<Vec<_>>().join("\n")
        ))
    }
}

/// The single-vCPU scenario the re-arm flush exists for: a write, a harvest, then a second write
/// through the TLB entry cached by the first; the next harvest must report the page.
pub fn stale_tlb_write_is_reported(mmu: MmuKind, tracking: DirtyTracking, manual: bool) -> bool {
    let f = fixture(
        64 * 4096,
        VmConfig {
            mmu,
            ..VmConfig::default()
        },
    );
    f.vm.set_dirty_tracking(tracking).expect("tracking");
    if manual {
        f.vm.set_dirty_log_protect(DirtyLogProtect::Manual {
            initially_set: false,
        })
        .expect("manual protect");
    }
    let mut r = region(0, BASE_GPA, f.bytes, f.hva);
    r.flags = MemFlags::LOG_DIRTY_PAGES;
    f.vm.set_user_memory_region(r).expect("enable logging");
    let mut vcpu = f.vm.create_vcpu().expect("vcpu");
    let mut dest = vec![0u64; 64];
    vcpu.write_u64(gpa(5), 1).expect("write 1");
    assert_eq!(harvest(&f.vm, &f.host, f.hva, manual, &mut dest), 1);
    vcpu.write_u64(gpa(5), 2).expect("write 2");
    harvest(&f.vm, &f.host, f.hva, manual, &mut dest);
    dest[5] == 2
}

/// The dirty ring's harvest: collect, reset (re-arm and flush), then copy the collected pages.
pub fn harvest_ring(vm: &Vm, host: &HostMm, hva: Hva, dest: &mut [u64]) -> u64 {
    let entries = vm.collect_dirty_rings().expect("collect");
    vm.reset_dirty_rings().expect("reset");
    for e in &entries {
        dest[e.offset as usize] = host.read_u64(hva_of(hva, e.offset)).expect("host read");
    }
    entries.len() as u64
}

/// A VM with a dirty ring of `entries` and one logging slot of `pages` pages.
pub fn ring_fixture(mmu: MmuKind, pages: u64, entries: u32) -> crate::common::Fixture {
    let f = fixture(
        pages * 4096,
        VmConfig {
            mmu,
            ..VmConfig::default()
        },
    );
    f.vm.enable_dirty_ring(entries).expect("enable ring");
    let mut r = region(0, BASE_GPA, f.bytes, f.hva);
    r.flags = MemFlags::LOG_DIRTY_PAGES;
    f.vm.set_user_memory_region(r).expect("enable logging");
    f
}

/// [`stale_tlb_write_is_reported`] with the dirty ring.
pub fn ring_stale_tlb_write_is_reported(mmu: MmuKind) -> bool {
    let f = ring_fixture(mmu, 64, 256);
    let mut vcpu = f.vm.create_vcpu().expect("vcpu");
    let mut dest = vec![0u64; 64];
    vcpu.write_u64(gpa(5), 1).expect("write 1");
    assert_eq!(harvest_ring(&f.vm, &f.host, f.hva, &mut dest), 1);
    vcpu.write_u64(gpa(5), 2).expect("write 2");
    harvest_ring(&f.vm, &f.host, f.hva, &mut dest);
    dest[5] == 2
}

/// The concurrent harness with dirty rings: vCPUs wait out `DirtyRingFull` exits (bounded)
/// while the harvester collects and resets.
pub fn run_ring(
    mmu: MmuKind,
    vcpus: usize,
    pages_per_vcpu: u64,
    writes: u64,
    seed: u64,
) -> Result<u64, String> {
    let npages = vcpus as u64 * pages_per_vcpu;
    let f = ring_fixture(mmu, npages, 128);
    let mut vs: Vec<Vcpu> = (0..vcpus)
        .map(|_| f.vm.create_vcpu().expect("vcpu"))
        .collect();
    let running = AtomicUsize::new(vcpus);
    let full_exits = std::sync::atomic::AtomicU64::new(0);
    let mut dest = vec![0u64; npages as usize];
    let mut harvested = 0;
    std::thread::scope(|s| {
        for (i, vcpu) in vs.iter_mut().enumerate() {
            let (running, full_exits) = (&running, &full_exits);
            s.spawn(move || {
                let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                rng ^= (i as u64 + 1) << 32;
                for seq in 1..=writes {
                    let page = i as u64 * pages_per_vcpu + xorshift(&mut rng) % pages_per_vcpu;
                    let value = ((i as u64 + 1) << 40) | seq;
                    let mut tries = 0u64;
                    loop {
                        match vcpu.write_u64(gpa(page), value) {
                            Ok(()) => break,
                            Err(VcpuExit::DirtyRingFull) => {
                                full_exits.fetch_add(1, Ordering::Relaxed);
                                tries += 1;
                                assert!(tries < 50_000_000, "the harvester never reset the ring");
                                std::thread::yield_now();
                            }
                            Err(e) => panic!("guest write: {e}"),
                        }
                    }
                }
                running.fetch_sub(1, Ordering::Release);
            });
        }
        let (host, hva, bytes) = (&f.host, f.hva, f.bytes);
        let running_ref = &running;
        s.spawn(move || {
            while running_ref.load(Ordering::Acquire) != 0 {
                host.clear_young(hva, bytes).expect("aging");
            }
        });
        while running.load(Ordering::Acquire) != 0 {
            harvested += harvest_ring(&f.vm, &f.host, f.hva, &mut dest);
        }
    });
    harvested += harvest_ring(&f.vm, &f.host, f.hva, &mut dest);
    let lost: Vec<u64> = (0..npages)
        .filter(|&p| f.host.read_u64(hva_of(f.hva, p)).expect("read") != dest[p as usize])
        .collect();
    drop(vs);
    if lost.is_empty() {
        Ok(harvested)
    } else {
        Err(format!(
            "{} of {npages} pages lost a write with the ring: {:?}",
            lost.len(),
            &lost[..lost.len().min(10)]
        ))
    }
}
