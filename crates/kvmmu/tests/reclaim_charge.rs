//! The reclaim charge, transition by transition (docs/locking.md "Reclaim: the charge
//! accounting", C1-C6): after every host operation the counter equals the present 4K host PTEs
//! (huge pages are not charged), no uncharge was ever refused, and every used swap slot is named
//! by one swap entry. Deterministic, single-threaded: each test drives one path (pages present
//! before `enable_reclaim`, THP fault, 4K fallback, split, collapse, eviction, swap-in, zap,
//! `munmap`, `madvise`, `release`).

mod common;

use common::*;
use kvmmu::internals::host::{BackingSrc, ReclaimAging, ReclaimConfig};
use kvmmu::prelude::*;

const PAGE: u64 = 4096;
const HUGE: u64 = 512;

fn host() -> HostMm {
    HostMm::new(HostConfig { frames: 4096 }).unwrap()
}

fn enable(host: &HostMm) {
    host.enable_reclaim(ReclaimConfig {
        limit_frames: 2048,
        swap_slots: 1024,
        aging: ReclaimAging::Generations,
    })
    .unwrap();
}

/// `pages` of THP-backed memory, 2 MiB aligned: pages `0..512` form one span.
fn thp(host: &HostMm, pages: u64) -> Hva {
    host.mmap_backed(
        pages * PAGE,
        Prot::READ | Prot::WRITE,
        BackingSrc::AnonymousThp,
    )
    .unwrap()
}

fn write(host: &HostMm, hva: Hva, pages: core::ops::Range<u64>) {
    for p in pages {
        host.write_u64(hva_of(hva, p), p + 1).unwrap();
    }
}

/// The charge is exact (C1) and was never refused a decrement (C6); swap slots match entries.
/// Returns the charge.
#[track_caller]
fn exact(host: &HostMm, step: &str) -> u64 {
    let a = host.charge_audit();
    assert_eq!(
        host.charge_underflow(),
        None,
        "{step}: an uncharge of frames never charged"
    );
    assert_eq!(
        a.charged, a.present_4k,
        "{step}: charge vs present 4K PTEs: {a:?}"
    );
    assert_eq!(
        host.reclaim_stats().swap.used,
        a.swap_entries,
        "{step}: used swap slots vs swap entries: {a:?}"
    );
    a.charged
}

#[test]
fn pages_present_before_reclaim_is_enabled_are_charged_and_evicted_exactly() {
    let host = host();
    let plain = host.mmap(16 * PAGE, Prot::READ | Prot::WRITE).unwrap();
    write(&host, plain, 0..16);
    let huge = thp(&host, HUGE + 8);
    write(&host, huge, 0..1);
    write(&host, huge, HUGE..HUGE + 8);
    assert_eq!(exact(&host, "before enable_reclaim"), 24);
    enable(&host);
    assert_eq!(exact(&host, "enable_reclaim"), 24);
    assert_eq!(host.page_out(plain, 16 * PAGE).unwrap(), 16);
    assert_eq!(exact(&host, "page_out of the early pages"), 8);
    host.reclaim(64).unwrap();
    exact(&host, "reclaim");
    host.munmap(plain, 16 * PAGE).unwrap();
    host.munmap(huge, (HUGE + 8) * PAGE).unwrap();
    assert_eq!(exact(&host, "munmap"), 0);
    assert_eq!(host.arena().stats().allocated, 0);
}

#[test]
fn a_thp_fault_charges_nothing_and_its_4k_fallback_charges_one_frame_per_page() {
    let host = host();
    enable(&host);
    let hva = thp(&host, HUGE + 4);
    write(&host, hva, 7..8);
    assert_eq!(host.host_pte(hva).unwrap().level, Level::L2M);
    assert_eq!(exact(&host, "THP fault"), 0);
    write(&host, hva, HUGE..HUGE + 4);
    assert_eq!(exact(&host, "4K fallback"), 4);
    assert_eq!(host.charge_audit().present_huge, HUGE);
}

#[test]
fn a_split_charges_the_pages_it_keeps_and_the_zap_uncharges_the_rest() {
    for op in ["munmap", "madvise_dontneed", "mprotect"] {
        let host = host();
        enable(&host);
        let hva = thp(&host, HUGE);
        write(&host, hva, 0..1);
        assert_eq!(exact(&host, op), 0);
        let cut = hva_of(hva, 100);
        match op {
            "munmap" => host.munmap(cut, 4 * PAGE).unwrap(),
            "madvise_dontneed" => host.madvise_dontneed(cut, 4 * PAGE).unwrap(),
            _ => host.mprotect(cut, 4 * PAGE, Prot::READ).unwrap(),
        }
        assert_eq!(host.stats().thp_splits, 1, "{op}");
        let kept = if op == "mprotect" { HUGE } else { HUGE - 4 };
        assert_eq!(
            exact(&host, op),
            kept,
            "{op}: the split's 4K pages are charged"
        );
        assert_eq!(
            host.page_out(hva, 8 * PAGE).unwrap(),
            8,
            "{op}: split pages evict"
        );
        assert_eq!(exact(&host, op), kept - 8);
        host.release();
        assert_eq!(exact(&host, "release"), 0, "{op}");
    }
}

#[test]
fn a_collapse_uncharges_the_4k_pages_it_replaces() {
    let host = host();
    enable(&host);
    let hva = thp(&host, HUGE);
    write(&host, hva, 0..1);
    host.madvise_dontneed(hva_of(hva, 10), PAGE).unwrap();
    assert_eq!(exact(&host, "split by madvise_dontneed"), HUGE - 1);
    write(&host, hva, 10..11);
    assert_eq!(exact(&host, "refill"), HUGE);
    assert!(host.collapse(hva).unwrap());
    assert_eq!(exact(&host, "collapse"), 0);
    assert_eq!(host.charge_audit().present_huge, HUGE);
    assert_eq!(host.read_u64(hva_of(hva, 10)).unwrap(), 11);
    host.munmap(hva, HUGE * PAGE).unwrap();
    assert_eq!(exact(&host, "munmap"), 0);
    assert_eq!(host.arena().stats().allocated, 0);
}

#[test]
fn eviction_uncharges_swap_in_charges_and_a_zapped_swap_entry_uncharges_nothing() {
    let host = host();
    enable(&host);
    let hva = thp(&host, HUGE + 16);
    write(&host, hva, HUGE..HUGE + 16);
    assert_eq!(exact(&host, "fault-in"), 16);
    assert_eq!(host.page_out(hva_of(hva, HUGE), 16 * PAGE).unwrap(), 16);
    assert_eq!(exact(&host, "page_out"), 0);
    assert_eq!(host.read_u64(hva_of(hva, HUGE + 3)).unwrap(), HUGE + 4);
    assert_eq!(exact(&host, "swap-in"), 1);
    host.madvise_dontneed(hva_of(hva, HUGE), 8 * PAGE).unwrap();
    assert_eq!(exact(&host, "madvise_dontneed over swap entries"), 0);
    host.munmap(hva, (HUGE + 16) * PAGE).unwrap();
    assert_eq!(exact(&host, "munmap over swap entries"), 0);
    assert_eq!(host.reclaim_stats().swap.used, 0);
}

#[test]
fn release_of_a_thp_cut_by_a_vma_boundary_uncharges_only_what_was_charged() {
    // madvise(NOHUGEPAGE) and an mprotect that changes no protection split the VMA inside a
    // live THP without splitting the THP (no PTE changes); `release` then zaps VMA by VMA.
    for op in ["madvise_nohugepage", "mprotect_same"] {
        let host = host();
        enable(&host);
        let hva = thp(&host, HUGE);
        write(&host, hva, 0..1);
        let cut = hva_of(hva, 100);
        match op {
            "madvise_nohugepage" => host.madvise_hugepage(cut, 4 * PAGE, false).unwrap(),
            _ => host
                .mprotect(cut, 4 * PAGE, Prot::READ | Prot::WRITE)
                .unwrap(),
        }
        assert_eq!(host.mappings().len(), 3, "{op}: three VMAs");
        assert_eq!(exact(&host, op), 0, "{op}: still one whole THP");
        host.release();
        assert_eq!(exact(&host, "release"), 0, "{op}");
        assert_eq!(host.arena().stats().allocated, 0, "{op}");
    }
}

#[test]
fn munmap_of_one_vma_inside_a_thp_splits_it_and_keeps_the_charge_exact() {
    let host = host();
    enable(&host);
    let hva = thp(&host, HUGE);
    write(&host, hva, 0..1);
    host.madvise_hugepage(hva_of(hva, 100), 4 * PAGE, false)
        .unwrap();
    host.munmap(hva_of(hva, 100), 4 * PAGE).unwrap();
    assert_eq!(exact(&host, "munmap of the middle VMA"), HUGE - 4);
    host.munmap(hva, 100 * PAGE).unwrap();
    assert_eq!(exact(&host, "munmap of the first VMA"), HUGE - 104);
    host.munmap(hva_of(hva, 104), (HUGE - 104) * PAGE).unwrap();
    assert_eq!(exact(&host, "munmap of the last VMA"), 0);
    assert_eq!(host.arena().stats().allocated, 0);
}

#[test]
fn page_outs_racing_thp_installs_never_uncharge_a_huge_page_frame() {
    // Race r5 (docs/locking.md) under real threads: one thread discards and re-faults a whole THP
    // (512 PTE stores, then the marker) while another pages out its first pages. Whatever the
    // interleaving, a page of a huge page is never evicted, so no uncharge is refused and the
    // charge stays 0. Bounded on both sides; no timing assumption.
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let host = host();
    enable(&host);
    let hva = thp(&host, HUGE);
    let done = Arc::new(AtomicBool::new(false));
    let evictor = {
        let (host, done) = (host.clone(), done.clone());
        std::thread::spawn(move || {
            let mut evicted = 0;
            for i in 0..2_000_000u64 {
                if done.load(Ordering::Relaxed) {
                    break;
                }
                evicted += host.page_out(hva_of(hva, i % 4), PAGE).unwrap();
            }
            evicted
        })
    };
    for round in 0..1_000u64 {
        host.madvise_dontneed(hva, HUGE * PAGE).unwrap();
        host.write_u64(hva_of(hva, 300), round).unwrap();
    }
    done.store(true, Ordering::Relaxed);
    let evicted = evictor.join().unwrap();
    assert_eq!(evicted, 0, "no page of a THP was evicted");
    assert_eq!(exact(&host, "after the race"), 0);
    host.release();
    assert_eq!(exact(&host, "release"), 0);
    assert_eq!(host.arena().stats().stale_accesses, 0);
}
