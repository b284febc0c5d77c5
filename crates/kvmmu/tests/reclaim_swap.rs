//! Memory limit, swap and refaults (`kvmmu::host` reclaim): data survives eviction and refault,
//! every eviction is a balanced invalidate pair that leaves no SPTE behind, and exhaustion or bad
//! input is a typed error, never a panic or a hang.

mod common;

use common::*;
use kvmmu::internals::host::{GupError, HostError, ReclaimAging, ReclaimConfig, ReclaimError};
use kvmmu::prelude::*;

const PAGE: u64 = 4096;

fn limited_host(frames: usize, limit: u64, swap: u64) -> HostMm {
    let host = HostMm::new(HostConfig { frames }).unwrap();
    host.enable_reclaim(ReclaimConfig {
        limit_frames: limit,
        swap_slots: swap,
        aging: ReclaimAging::Generations,
    })
    .unwrap();
    host
}

#[test]
fn pages_beyond_the_limit_are_evicted_and_read_back_intact() {
    let host = limited_host(256, 32, 512);
    let pages = 200;
    let hva = host.mmap(pages * PAGE, Prot::READ | Prot::WRITE).unwrap();
    for p in 0..pages {
        host.write_u64(hva_of(hva, p), p * 7 + 1).unwrap();
        host.write_u64(Hva::new(hva_of(hva, p).raw() + 4088), !p)
            .unwrap();
        assert!(host.reclaim_stats().charged <= 32, "the limit holds");
    }
    for p in 0..pages {
        assert_eq!(host.read_u64(hva_of(hva, p)).unwrap(), p * 7 + 1);
        assert_eq!(
            host.read_u64(Hva::new(hva_of(hva, p).raw() + 4088))
                .unwrap(),
            !p
        );
    }
    let s = host.reclaim_stats();
    assert!(s.evicted >= pages - 32, "evicted {}", s.evicted);
    assert!(s.refaults >= pages - 32, "refaulted {}", s.refaults);
    assert!(s.charged <= 32);
    assert_eq!(s.oom_kills, 0);
    assert_eq!(
        host.arena().stats().allocated,
        s.charged,
        "charged frames are exactly the allocated ones"
    );
    assert_eq!(
        s.swap.used + s.charged,
        pages,
        "every page is resident or in swap"
    );
}

#[test]
fn munmap_frees_the_swap_slots_of_evicted_pages() {
    let host = limited_host(128, 16, 256);
    let hva = host.mmap(64 * PAGE, Prot::READ | Prot::WRITE).unwrap();
    for p in 0..64 {
        host.write_u64(hva_of(hva, p), p).unwrap();
    }
    assert!(host.reclaim_stats().swap.used >= 48);
    host.madvise_dontneed(hva, 8 * PAGE).unwrap();
    for p in 0..8 {
        assert_eq!(host.read_u64(hva_of(hva, p)).unwrap(), 0, "discarded");
    }
    host.munmap(hva, 64 * PAGE).unwrap();
    let s = host.reclaim_stats();
    assert_eq!((s.swap.used, s.charged), (0, 0));
    assert_eq!(host.arena().stats().allocated, 0);
    assert_eq!(host.stats().page_table_bytes, {
        let fresh = HostMm::new(HostConfig { frames: 1 }).unwrap();
        fresh.stats().page_table_bytes
    });
}

#[test]
fn a_full_swap_device_is_an_out_of_memory_error_and_other_pages_stay_intact() {
    let host = limited_host(128, 16, 8);
    let hva = host.mmap(64 * PAGE, Prot::READ | Prot::WRITE).unwrap();
    let mut written = 0;
    let err = loop {
        match host.write_u64(hva_of(hva, written), written + 100) {
            Ok(()) => written += 1,
            Err(e) => break e,
        }
        assert!(written < 64, "16 frames + 8 slots cannot hold 64 pages");
    };
    assert!(
        matches!(err, HostError::Gup(GupError::OutOfFrames)),
        "{err}"
    );
    assert_eq!(written, 24, "the limit plus the swap device");
    let s = host.reclaim_stats();
    assert!(s.oom_kills >= 1 && s.swap.full >= 1);
    // Memory and swap are full, so even a refault has nowhere to go (Linux OOMs too): check the
    // resident pages, discard them, and the swapped ones refault intact.
    let (resident, swapped) = split_resident(&host, hva, written);
    assert_eq!((resident.len(), swapped.len()), (16, 8));
    for &p in &resident {
        assert_eq!(host.read_u64(hva_of(hva, p)).unwrap(), p + 100);
        host.madvise_dontneed(hva_of(hva, p), PAGE).unwrap();
    }
    for &p in &swapped {
        assert_eq!(host.read_u64(hva_of(hva, p)).unwrap(), p + 100);
    }
}

#[test]
fn bad_limits_are_refused_and_change_nothing() {
    let host = HostMm::new(HostConfig { frames: 64 }).unwrap();
    let cfg = |limit, swap| ReclaimConfig {
        limit_frames: limit,
        swap_slots: swap,
        aging: ReclaimAging::None,
    };
    assert!(matches!(
        host.enable_reclaim(cfg(4, 8)),
        Err(ReclaimError::LimitTooSmall { limit: 4, .. })
    ));
    assert!(matches!(
        host.enable_reclaim(cfg(64, 8)),
        Err(ReclaimError::LimitAboveArena { .. })
    ));
    assert!(matches!(
        host.enable_reclaim(cfg(32, u64::MAX)),
        Err(ReclaimError::SwapTooLarge { .. })
    ));
    assert!(matches!(host.reclaim(1), Err(ReclaimError::NotEnabled)));
    assert!(matches!(host.spawn_kswapd(), Err(ReclaimError::NotEnabled)));
    assert_eq!(host.reclaim_stats().limit_frames, u64::MAX);
    host.enable_reclaim(cfg(32, 8)).unwrap();
    assert!(matches!(
        host.enable_reclaim(cfg(32, 8)),
        Err(ReclaimError::AlreadyEnabled)
    ));
    let k = host.spawn_kswapd().unwrap();
    assert!(matches!(
        host.spawn_kswapd(),
        Err(ReclaimError::KswapdRunning)
    ));
    drop(k);
    assert!(matches!(
        host.page_out(Hva::new(1 << 40), PAGE),
        Err(ReclaimError::Host(HostError::NotMapped { .. }))
    ));
}

/// Pages `0..n` of `hva` split into (resident, swapped).
fn split_resident(host: &HostMm, hva: Hva, n: u64) -> (Vec<u64>, Vec<u64>) {
    (0..n).partition(|&p| host.host_pte(hva_of(hva, p)).unwrap().present)
}

fn vm_with_limit(config: VmConfig, pages: u64, limit: u64) -> (HostMm, Vm, Hva) {
    let host = limited_host((pages * 2) as usize + 64, limit, pages * 2);
    let vm = Vm::new(&host, config).unwrap();
    let hva = host.mmap(pages * PAGE, Prot::READ | Prot::WRITE).unwrap();
    vm.set_user_memory_region(region(0, BASE_GPA, pages * PAGE, hva))
        .unwrap();
    (host, vm, hva)
}

fn configs() -> Vec<VmConfig> {
    let mut v = Vec::new();
    for mmu in [MmuKind::Tdp, MmuKind::Shadow] {
        for aging in [AgingMode::Lockless, AgingMode::Locked] {
            v.push(VmConfig {
                mmu,
                aging,
                ..VmConfig::default()
            });
        }
    }
    v
}

#[test]
fn page_out_leaves_no_spte_and_the_vcpu_refaults_the_written_value() {
    for config in configs() {
        let (host, vm, hva) = vm_with_limit(config.clone(), 64, 48);
        let mut vcpu = vm.create_vcpu().unwrap();
        for p in 0..16 {
            vcpu.write_u64(gpa(p), p + 1000).unwrap();
        }
        let before = host.stats();
        let evicted = host.page_out(hva, 16 * PAGE).unwrap();
        assert_eq!(evicted, 16, "{config:?}");
        let after = host.stats();
        assert_eq!(
            after.invalidate_start - before.invalidate_start,
            16,
            "one pair per evicted page"
        );
        assert_eq!(after.invalidate_start, after.invalidate_end, "balanced");
        let vs = vm.stats();
        assert_eq!(vs.invalidate_starts, vs.invalidate_ends);
        for p in 0..16 {
            assert!(
                vm.spte(AsId::new(0), gpa(p).gfn()).is_none(),
                "{config:?}: an SPTE survived the eviction of page {p}"
            );
            assert!(host.host_pte(hva_of(hva, p)).unwrap().swapped);
        }
        // The vCPU's TLB entries went with the invalidation: every access refaults the page
        // from swap and sees the value written before the eviction.
        for p in 0..16 {
            assert_eq!(vcpu.read_u64(gpa(p)).unwrap(), p + 1000, "{config:?}");
        }
        assert_eq!(host.reclaim_stats().refaults, 16);
        assert!(vcpu.stats().faults >= 32);
    }
}

#[test]
fn a_vcpu_beyond_a_full_swap_gets_a_clean_out_of_memory_exit() {
    let host = limited_host(256, 16, 4);
    let vm = Vm::new(&host, VmConfig::default()).unwrap();
    let hva = host.mmap(64 * PAGE, Prot::READ | Prot::WRITE).unwrap();
    vm.set_user_memory_region(region(0, BASE_GPA, 64 * PAGE, hva))
        .unwrap();
    let mut vcpu = vm.create_vcpu().unwrap();
    let mut written = 0;
    let exit = loop {
        match vcpu.write_u64(gpa(written), written + 1) {
            Ok(()) => written += 1,
            Err(e) => break e,
        }
        assert!(written < 64);
    };
    assert!(
        matches!(
            exit,
            VcpuExit::HostFault {
                error: GupError::OutOfFrames,
                ..
            }
        ),
        "{exit}"
    );
    let (resident, swapped) = split_resident(&host, hva, written);
    assert_eq!(
        resident.len() + swapped.len(),
        20,
        "the limit plus the swap device"
    );
    for &p in &resident {
        assert_eq!(vcpu.read_u64(gpa(p)).unwrap(), p + 1, "page {p} intact");
        host.madvise_dontneed(hva_of(hva, p), PAGE).unwrap();
    }
    for &p in &swapped {
        assert_eq!(vcpu.read_u64(gpa(p)).unwrap(), p + 1, "page {p} intact");
    }
}
