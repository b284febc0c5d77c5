//! vCPUs faulting and accessing memory while the host unmaps, write-protects and discards it and an
//! aging thread ages it: no stale translation is ever used, reads see the last write (or zero after a
//! discard), a write never lands while the memory is read-only, and every counter balances.

mod common;

use common::*;
use kvmmu::internals::host::HostError;
use kvmmu::prelude::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

const PAGES: u64 = 256;
const VCPUS: usize = 2;

fn run(config: VmConfig) {
    let mmu = config.mmu;
    let f = fixture(PAGES * 4096, config);
    let stop = Arc::new(AtomicBool::new(false));
    // Host page protection generation: odd while the churn half is read-only.
    let ro_epoch = Arc::new(AtomicU64::new(0));
    // The host churn starts once every vCPU finished a round (populated its churn pages): a host
    // operation over a range with no present PTE notifies nobody, so a host thread that ran
    // first on a loaded machine would test nothing.
    let vcpu_rounds = Arc::new(AtomicU64::new(0));
    let half = PAGES / 2;
    let churn_hva = hva_of(f.hva, half);
    let churn_len = half * 4096;

    std::thread::scope(|s| {
        // vCPUs: each owns pages i, i+VCPUS, ... in the stable half (strict last-write oracle) and
        // writes the churn half, where a discard may zero a page and read-only may refuse a write.
        for id in 0..VCPUS {
            let vm = &f.vm;
            let stop = stop.clone();
            let vcpu_rounds = vcpu_rounds.clone();
            s.spawn(move || {
                let mut vcpu = vm.create_vcpu().unwrap();
                let mut last = vec![0u64; PAGES as usize];
                let mut round = 1u64;
                while !stop.load(Ordering::Relaxed) {
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
                            Err(e) => panic!("unexpected exit on churn page {p}: {e}"),
                        }
                        match g.read_u64(gpa(p)) {
                            Ok(got) => assert!(
                                got == last[p as usize] || got == 0,
                                "churn page {p}: read {got:#x}, last write {:#x}",
                                last[p as usize]
                            ),
                            Err(VcpuExit::HostFault { .. }) => {}
                            Err(e) => panic!("unexpected exit on churn page {p}: {e}"),
                        }
                    }
                    drop(g);
                    // Re-check the stable half after the round: nothing lost.
                    for p in (id as u64..half).step_by(VCPUS) {
                        assert_eq!(vcpu.read_u64(gpa(p)).unwrap(), last[p as usize]);
                    }
                    if round == 1 {
                        // ORDERING: Relaxed: a start signal the host thread waits for.
                        vcpu_rounds.fetch_add(1, Ordering::Relaxed);
                    }
                    round += 1;
                }
            });
        }
        // Aging thread.
        {
            let host = &f.host;
            let stop = stop.clone();
            let (hva, bytes) = (f.hva, f.bytes);
            s.spawn(move || {
                // The churn thread unmaps windows of the range; aging a range with a hole is refused
                // with NotMapped (and changes nothing), anything else is a failure.
                let ok = |r: Result<bool, HostError>| match r {
                    Ok(_) | Err(HostError::NotMapped { .. }) => {}
                    Err(e) => panic!("aging failed: {e}"),
                };
                while !stop.load(Ordering::Relaxed) {
                    ok(host.clear_young(hva, bytes));
                    ok(host.test_young(hva));
                    ok(host.clear_flush_young(hva, bytes));
                }
            });
        }
        // Host thread: churn the second half.
        {
            let host = &f.host;
            let ro_epoch = ro_epoch.clone();
            let vcpu_rounds = vcpu_rounds.clone();
            s.spawn(move || {
                // ORDERING: Relaxed: see `vcpu_rounds`; bounded so a vCPU that panicked in its
                // first round fails the test instead of hanging it.
                let since = std::time::Instant::now();
                while vcpu_rounds.load(Ordering::Relaxed) < VCPUS as u64
                    && since.elapsed() < std::time::Duration::from_secs(120)
                {
                    std::thread::yield_now();
                }
                for i in 0..120u64 {
                    let off = (i * 7 % half) * 4096;
                    let len = ((i % 5) + 1) * 4096;
                    let len = len.min(churn_len - off);
                    let a = churn_hva.checked_add(off).unwrap();
                    match i % 4 {
                        0 => host.madvise_dontneed(a, len).unwrap(),
                        1 => {
                            host.mprotect(churn_hva, churn_len, Prot::READ).unwrap();
                            ro_epoch.fetch_add(1, Ordering::SeqCst);
                            // While read-only, a host-side check: no guest write may land. Snapshot
                            // the churn half, let vCPUs run, compare.
                            let snap: Vec<u64> = (0..half)
                                .map(|p| host.read_u64(hva_of(churn_hva, p)).unwrap())
                                .collect();
                            std::thread::sleep(std::time::Duration::from_millis(2));
                            for (p, v) in snap.iter().enumerate() {
                                assert_eq!(
                                    host.read_u64(hva_of(churn_hva, p as u64)).unwrap(),
                                    *v,
                                    "a guest write landed in read-only memory"
                                );
                            }
                            host.mprotect(churn_hva, churn_len, Prot::READ | Prot::WRITE)
                                .unwrap();
                            ro_epoch.fetch_add(1, Ordering::SeqCst);
                        }
                        2 => {
                            host.munmap(a, len).unwrap();
                            host.mmap_fixed(a, len, Prot::READ | Prot::WRITE).unwrap();
                        }
                        _ => std::thread::yield_now(),
                    }
                }
                stop.store(true, Ordering::Relaxed);
            });
        }
    });

    let stats = f.vm.stats();
    assert_eq!(stats.invalidate.in_progress, 0);
    assert_eq!(stats.mn_active_invalidate_count, 0);
    assert_eq!(stats.invalidate_starts, stats.invalidate_ends);
    assert!(stats.invalidate.seq > 0, "the host thread invalidated");
    assert_eq!(f.host.arena().stats().stale_accesses, 0);
    let host = f.host.clone();
    let final_stats = f.vm.shutdown();
    assert_eq!(
        final_stats.tdp.tables_allocated,
        final_stats.tdp.tables_freed
    );
    let sh = final_stats.shadow;
    assert_eq!(
        sh.pages_allocated, sh.pages_freed,
        "no leaked shadow page: {sh:?}"
    );
    assert_eq!(
        sh.rmap.desc_allocs, sh.rmap.desc_frees,
        "no leaked descriptor: {sh:?}"
    );
    assert_eq!(
        sh.leaves_installed, sh.leaves_zapped,
        "every leaf zapped once: {sh:?}"
    );
    match mmu {
        MmuKind::Shadow => {
            assert!(sh.faults > 0, "the shadow MMU handled the faults");
            assert_eq!(final_stats.tdp.tables_allocated, 0, "TDP unused");
        }
        MmuKind::Tdp => assert_eq!(sh.pages_allocated, 0, "shadow unused"),
    }
    drop(host);
}

#[test]
fn tdp_lockless_aging_no_stale_translation_no_lost_write() {
    run(VmConfig::default());
}

#[test]
fn tdp_locked_aging_no_stale_translation_no_lost_write() {
    run(VmConfig {
        aging: AgingMode::Locked,
        ..VmConfig::default()
    });
}

#[test]
fn shadow_lockless_aging_no_stale_translation_no_lost_write() {
    run(VmConfig {
        mmu: MmuKind::Shadow,
        ..VmConfig::default()
    });
}

#[test]
fn shadow_locked_aging_no_stale_translation_no_lost_write() {
    run(VmConfig {
        mmu: MmuKind::Shadow,
        aging: AgingMode::Locked,
        ..VmConfig::default()
    });
}
