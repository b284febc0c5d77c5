//! The shadow MMU under concurrency: vCPUs faulting through shadow pages while the host unmaps,
//! discards and write-protects the same memory, agers age it through the rmaps (lockless and
//! locked), and a memslot is deleted and re-created over and over. Checked: no stale translation,
//! no lost write (strict last-write oracles on stable memory and across memslot churn), no leaked
//! shadow page or rmap descriptor, and balanced counters. The rmap bit-lock contention and aging
//! counts are printed for the closing note (`--nocapture`).

mod common;

use common::*;
use kvmmu::internals::host::HostError;
use kvmmu::prelude::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

const PAGES: u64 = 128;
const SLOT_B_PAGES: u64 = 32;
const SLOT_B_GPA: u64 = BASE_GPA + (1 << 30);
const VCPUS: usize = 2;
const HOST_ROUNDS: u64 = 80;
const MEMSLOT_ROUNDS: u64 = 40;

fn slot_b(page: u64) -> Gpa {
    Gpa::new(SLOT_B_GPA + page * 4096)
}

fn run(aging: AgingMode) -> VmStats {
    let config = VmConfig {
        mmu: MmuKind::Shadow,
        aging,
        ..VmConfig::default()
    };
    let f = fixture(PAGES * 4096, config);
    let b_hva = f
        .host
        .mmap(SLOT_B_PAGES * 4096, Prot::READ | Prot::WRITE)
        .unwrap();
    f.vm.set_user_memory_region(region(1, SLOT_B_GPA, SLOT_B_PAGES * 4096, b_hva))
        .unwrap();
    let host_done = Arc::new(AtomicBool::new(false));
    // The host churn starts once every vCPU finished a round, i.e. populated its churn pages: a
    // host operation over a range with no present PTE notifies nobody, so on a loaded machine a
    // host thread that ran all its rounds first would test nothing (and `seq` would stay 0).
    let vcpu_rounds = Arc::new(AtomicU64::new(0));
    let slots_done = Arc::new(AtomicBool::new(false));
    let half = PAGES / 2;
    let churn_hva = hva_of(f.hva, half);
    let churn_len = half * 4096;

    std::thread::scope(|s| {
        for id in 0..VCPUS {
            let vm = &f.vm;
            let (host_done, slots_done) = (host_done.clone(), slots_done.clone());
            let vcpu_rounds = vcpu_rounds.clone();
            s.spawn(move || {
                let mut vcpu = vm.create_vcpu().unwrap();
                let mut last = vec![0u64; PAGES as usize];
                let mut last_b = vec![0u64; SLOT_B_PAGES as usize];
                let mut round = 1u64;
                while !(host_done.load(Ordering::Relaxed) && slots_done.load(Ordering::Relaxed)) {
                    let mut g = vcpu.enter();
                    for p in (id as u64..half).step_by(VCPUS) {
                        let v = (round << 16) | (p << 4) | id as u64;
                        g.write_u64(gpa(p), v).unwrap();
                        last[p as usize] = v;
                        assert_eq!(g.read_u64(gpa(p)).unwrap(), v, "stable page {p}");
                    }
                    for p in (half + id as u64..PAGES).step_by(VCPUS) {
                        let v = (round << 16) | (p << 4) | id as u64;
                        match g.write_u64(gpa(p), v) {
                            Ok(()) => last[p as usize] = v,
                            Err(VcpuExit::HostFault { .. }) => {}
                            Err(e) => panic!("churn page {p}: {e}"),
                        }
                        match g.read_u64(gpa(p)) {
                            Ok(got) => {
                                assert!(got == last[p as usize] || got == 0, "churn page {p}")
                            }
                            Err(VcpuExit::HostFault { .. }) => {}
                            Err(e) => panic!("churn page {p}: {e}"),
                        }
                    }
                    // Slot B comes and goes but its host memory stays: a write that completed is
                    // never lost, whatever the memslot churn.
                    for p in (id as u64..SLOT_B_PAGES).step_by(VCPUS) {
                        match g.read_u64(slot_b(p)) {
                            Ok(got) => assert_eq!(got, last_b[p as usize], "slot B page {p}"),
                            Err(VcpuExit::NoMemslot { .. }) => {}
                            Err(e) => panic!("slot B page {p}: {e}"),
                        }
                        let v = (round << 16) | (p << 4) | id as u64;
                        match g.write_u64(slot_b(p), v) {
                            Ok(()) => last_b[p as usize] = v,
                            Err(VcpuExit::NoMemslot { .. }) => {}
                            Err(e) => panic!("slot B page {p}: {e}"),
                        }
                    }
                    drop(g);
                    for p in (id as u64..half).step_by(VCPUS) {
                        assert_eq!(vcpu.read_u64(gpa(p)).unwrap(), last[p as usize]);
                    }
                    if round == 1 {
                        // ORDERING: Relaxed: a start signal; the host thread only waits for it.
                        vcpu_rounds.fetch_add(1, Ordering::Relaxed);
                    }
                    round += 1;
                }
            });
        }
        // Ager: both slots, every notifier.
        {
            let host = &f.host;
            let (host_done, slots_done) = (host_done.clone(), slots_done.clone());
            let (hva, bytes) = (f.hva, f.bytes);
            s.spawn(move || {
                let ok = |r: Result<bool, HostError>| match r {
                    Ok(_) | Err(HostError::NotMapped { .. }) => {}
                    Err(e) => panic!("aging failed: {e}"),
                };
                // One pass more after the others finished: the host only starts once the vCPUs
                // populated their pages, so that pass ages present SPTEs (the stable half is never
                // churned) even if the scheduler kept this thread off the CPU until then.
                loop {
                    let last =
                        host_done.load(Ordering::Relaxed) && slots_done.load(Ordering::Relaxed);
                    ok(host.clear_young(hva, bytes));
                    ok(host.test_young(hva));
                    ok(host.clear_flush_young(b_hva, SLOT_B_PAGES * 4096));
                    ok(host.test_young(b_hva));
                    if last {
                        break;
                    }
                }
            });
        }
        // Memslot churn: delete and re-create slot B.
        {
            let vm = &f.vm;
            let slots_done = slots_done.clone();
            s.spawn(move || {
                for _ in 0..MEMSLOT_ROUNDS {
                    vm.set_user_memory_region(region(1, SLOT_B_GPA, 0, b_hva))
                        .unwrap();
                    std::thread::yield_now();
                    vm.set_user_memory_region(region(1, SLOT_B_GPA, SLOT_B_PAGES * 4096, b_hva))
                        .unwrap();
                    std::thread::yield_now();
                }
                slots_done.store(true, Ordering::Relaxed);
            });
        }
        // Host churn on the second half of slot A.
        {
            let host = &f.host;
            let host_done = host_done.clone();
            let vcpu_rounds = vcpu_rounds.clone();
            s.spawn(move || {
                // ORDERING: Relaxed: see `vcpu_rounds`. Bounded, so that a vCPU that panicked in
                // its first round fails the test instead of hanging it.
                let since = std::time::Instant::now();
                while vcpu_rounds.load(Ordering::Relaxed) < VCPUS as u64
                    && since.elapsed() < std::time::Duration::from_secs(120)
                {
                    std::thread::yield_now();
                }
                for i in 0..HOST_ROUNDS {
                    let off = (i * 7 % half) * 4096;
                    let len = (((i % 5) + 1) * 4096).min(churn_len - off);
                    let a = churn_hva.checked_add(off).unwrap();
                    match i % 3 {
                        0 => host.madvise_dontneed(a, len).unwrap(),
                        1 => {
                            host.mprotect(churn_hva, churn_len, Prot::READ).unwrap();
                            std::thread::yield_now();
                            host.mprotect(churn_hva, churn_len, Prot::READ | Prot::WRITE)
                                .unwrap();
                        }
                        _ => {
                            host.munmap(a, len).unwrap();
                            host.mmap_fixed(a, len, Prot::READ | Prot::WRITE).unwrap();
                        }
                    }
                }
                host_done.store(true, Ordering::Relaxed);
            });
        }
    });

    let stats = f.vm.stats();
    assert_eq!(stats.invalidate.in_progress, 0);
    assert_eq!(stats.mn_active_invalidate_count, 0);
    assert_eq!(stats.invalidate_starts, stats.invalidate_ends);
    assert!(stats.invalidate.seq > 0, "the host invalidated");
    assert_eq!(
        f.host.arena().stats().stale_accesses,
        0,
        "no stale translation"
    );
    let fin = f.vm.shutdown();
    let sh = fin.shadow;
    assert!(sh.faults > 0);
    assert_eq!(fin.tdp.tables_allocated, 0, "the TDP MMU was not used");
    assert_eq!(
        sh.pages_allocated, sh.pages_freed,
        "no leaked shadow page: {sh:?}"
    );
    assert_eq!((sh.roots_allocated, sh.roots_freed), (1, 1), "{sh:?}");
    assert_eq!(
        sh.rmap.live_descriptors(),
        0,
        "no leaked descriptor: {sh:?}"
    );
    assert_eq!(
        sh.leaves_installed, sh.leaves_zapped,
        "every leaf zapped once: {sh:?}"
    );
    eprintln!(
        "shadow concurrency ({aging:?}): {} shadow faults, {} SPTEs aged lockless / {} locked, \
         rmap bit contended {} times, {} descriptors allocated",
        sh.faults,
        sh.aged_sptes_lockless,
        sh.aged_sptes_locked,
        sh.rmap.lock_contended,
        sh.rmap.desc_allocs
    );
    fin
}

#[test]
fn shadow_vcpus_vs_invalidation_aging_and_memslot_churn_lockless() {
    let s = run(AgingMode::Lockless);
    assert!(s.shadow.aged_sptes_lockless > 0 && s.shadow.aged_sptes_locked == 0);
}

#[test]
fn shadow_vcpus_vs_invalidation_aging_and_memslot_churn_locked() {
    let s = run(AgingMode::Locked);
    assert!(s.shadow.aged_sptes_locked > 0 && s.shadow.aged_sptes_lockless == 0);
}
