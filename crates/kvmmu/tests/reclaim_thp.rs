//! Reclaim and swap over THP-backed memory (`kvmmu::host` reclaim with `BackingSrc::AnonymousThp`):
//! `page_out` never frees one frame out of a live huge page (huge pages are not evicted, zap.rs),
//! a 4K page of a THP mapping that was evicted refaults its contents from swap, and the memory
//! limit's charge counts exactly the present 4K pages (reclaim R1, R3; DESIGN invariant 6).

mod common;

use common::*;
use kvmmu::internals::host::{BackingSrc, ReclaimAging, ReclaimConfig};
use kvmmu::prelude::*;

const PAGE: u64 = 4096;
const HUGE: u64 = 512;

fn thp_host(frames: usize, limit: u64) -> HostMm {
    let host = HostMm::new(HostConfig { frames }).unwrap();
    host.enable_reclaim(ReclaimConfig {
        limit_frames: limit,
        swap_slots: 1024,
        aging: ReclaimAging::Generations,
    })
    .unwrap();
    host
}

/// `pages` of THP-backed memory: pages `0..512` form one 2 MiB span, the rest are 4K.
fn thp_mapping(host: &HostMm, pages: u64) -> Hva {
    host.mmap_backed(
        pages * PAGE,
        Prot::READ | Prot::WRITE,
        BackingSrc::AnonymousThp,
    )
    .unwrap()
}

#[test]
fn page_out_inside_a_thp_keeps_every_page_of_the_huge_page_intact() {
    let host = thp_host(2048, 1024);
    let hva = thp_mapping(&host, HUGE);
    for p in 0..HUGE {
        host.write_u64(hva_of(hva, p), p * 3 + 1).unwrap();
    }
    assert_eq!(
        host.host_pte(hva).unwrap().level,
        Level::L2M,
        "a THP formed"
    );
    host.page_out(hva_of(hva, 5), 2 * PAGE).unwrap();
    for p in 0..HUGE {
        assert_eq!(
            host.read_u64(hva_of(hva, p)).unwrap(),
            p * 3 + 1,
            "page {p} of the THP after page_out of pages 5..7"
        );
    }
    host.munmap(hva, HUGE * PAGE).unwrap();
    let s = host.reclaim_stats();
    assert_eq!(host.arena().stats().allocated, 0, "no frame leaked");
    assert_eq!((s.swap.used, s.charged), (0, 0), "no slot or charge left");
}

#[test]
fn an_evicted_4k_page_of_a_thp_mapping_refaults_its_contents_from_swap() {
    let host = thp_host(2048, 1024);
    // Pages 512.. lie outside the only aligned 2 MiB span: 4K pages of a THP mapping.
    let hva = thp_mapping(&host, HUGE + 16);
    for p in HUGE..HUGE + 16 {
        host.write_u64(hva_of(hva, p), p + 1000).unwrap();
    }
    assert_eq!(host.host_pte(hva_of(hva, HUGE)).unwrap().level, Level::L4K);
    assert_eq!(host.page_out(hva_of(hva, HUGE), 16 * PAGE).unwrap(), 16);
    assert!(host.host_pte(hva_of(hva, HUGE + 3)).unwrap().swapped);
    for p in HUGE..HUGE + 16 {
        assert_eq!(host.read_u64(hva_of(hva, p)).unwrap(), p + 1000, "page {p}");
    }
    let s = host.reclaim_stats();
    assert_eq!(s.refaults, 16, "every page came back from its slot");
    assert_eq!(s.swap.used, 0, "the refaults freed their slots");
}

#[test]
fn a_thp_mapping_charges_exactly_its_present_4k_pages() {
    let host = thp_host(2048, 1024);
    let hva = thp_mapping(&host, HUGE + 16);
    host.write_u64(hva, 1).unwrap();
    for p in HUGE..HUGE + 16 {
        host.write_u64(hva_of(hva, p), p).unwrap();
    }
    // The huge page is not charged (zap.rs); the 16 fallback 4K pages are (reclaim R1).
    assert_eq!(host.reclaim_stats().charged, 16);
    host.page_out(hva_of(hva, HUGE), 4 * PAGE).unwrap();
    assert_eq!(host.reclaim_stats().charged, 12);
    host.munmap(hva, (HUGE + 16) * PAGE).unwrap();
    let s = host.reclaim_stats();
    assert_eq!((s.charged, s.swap.used), (0, 0));
    assert_eq!(host.arena().stats().allocated, 0);
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
fn page_out_under_a_huge_leaf_keeps_every_guest_value_on_both_mmus() {
    for config in configs() {
        let host = thp_host(4096, 2048);
        let pages = HUGE + 16;
        let hva = thp_mapping(&host, pages);
        let vm = Vm::new(&host, config.clone()).unwrap();
        vm.set_user_memory_region(region(0, BASE_GPA, pages * PAGE, hva))
            .unwrap();
        let mut vcpu = vm.create_vcpu().unwrap();
        for p in 0..pages {
            vcpu.write_u64(gpa(p), p + 7).unwrap();
        }
        // Pages out of the huge page (whose leaf the MMU may map at 2 MiB) and of the 4K tail.
        for p in [0, 9, 300, 511, HUGE, HUGE + 15] {
            host.page_out(hva_of(hva, p), PAGE).unwrap();
        }
        for p in 0..pages {
            assert_eq!(
                vcpu.read_u64(gpa(p)).unwrap(),
                p + 7,
                "{config:?}: gfn page {p}"
            );
        }
        // The guest's view and the host's agree through the other path too.
        for p in [0, 9, 300, 511, HUGE, HUGE + 15] {
            assert_eq!(host.read_u64(hva_of(hva, p)).unwrap(), p + 7, "{config:?}");
        }
        drop(vcpu);
        drop(vm);
        host.munmap(hva, pages * PAGE).unwrap();
        assert_eq!(
            host.arena().stats().allocated,
            0,
            "{config:?}: no frame leaked"
        );
    }
}
