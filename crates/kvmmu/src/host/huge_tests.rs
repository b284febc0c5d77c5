//! Tests of host huge pages (`huge.rs`).

use super::*;
use crate::host::{HostConfig, InvalidateEvent, MmuNotifier, NotifierRange};
use crate::sync::{Arc, Mutex};

const MB2: u64 = 2 << 20;
const PAGE: u64 = 4096;

fn host(frames: usize) -> HostMm {
    HostMm::new(HostConfig { frames }).unwrap()
}

fn at(base: Hva, off: u64) -> Hva {
    Hva::new(base.raw() + off)
}

/// Records every invalidation range it is told about.
#[derive(Default)]
struct Recorder(Mutex<Vec<(Hva, Hva, InvalidateEvent)>>);

impl MmuNotifier for Recorder {
    fn invalidate_range_start(&self, r: &NotifierRange) {
        self.0.lock().push((r.start, r.end, r.event));
    }
    fn invalidate_range_end(&self, _: &NotifierRange) {}
    fn clear_flush_young(&self, _: Hva, _: Hva) -> bool {
        false
    }
    fn clear_young(&self, _: Hva, _: Hva) -> bool {
        false
    }
    fn test_young(&self, _: Hva) -> bool {
        false
    }
    fn release(&self) {}
}

#[test]
fn backing_source_names_round_trip_and_unknown_names_are_typed_errors() {
    for b in BackingSrc::ALL {
        assert_eq!(b.name().parse::<BackingSrc>(), Ok(b));
    }
    assert_eq!(
        "anonymous_huge".parse::<BackingSrc>(),
        Err(UnknownBackingSrc("anonymous_huge".into()))
    );
}

#[test]
fn a_thp_fault_maps_the_whole_aligned_2m_span_with_one_contiguous_aligned_run() {
    let h = host(4096);
    let hva = h
        .mmap_backed(4 * MB2, Prot::READ | Prot::WRITE, BackingSrc::AnonymousThp)
        .unwrap();
    assert!(hva.raw().is_multiple_of(MB2), "THP mappings are 2M aligned");
    let g = h.get_user_page(at(hva, MB2 + 5 * PAGE), true).unwrap();
    assert_eq!(g.level, Level::L2M);
    let first = g.pfn.raw() - 5;
    assert!(first.is_multiple_of(RUN_2M as u64), "the run is aligned");
    for i in 0..512 {
        let p = h.host_pte(at(hva, MB2 + i * PAGE)).unwrap();
        assert!(p.present, "page {i} of the THP is present");
        assert_eq!(p.pfn.raw(), first + i, "page {i} names frame first + {i}");
        assert_eq!(p.level, Level::L2M);
    }
    assert!(!h.host_pte(hva).unwrap().present, "other spans untouched");
    assert_eq!(h.arena().stats().allocated, 512);
    assert_eq!(h.stats().huge_faults, 1);
}

#[test]
fn a_thp_vma_maps_its_unaligned_edges_with_4k_pages() {
    let h = host(4096);
    let hva = h
        .mmap_backed(4 * MB2, Prot::READ | Prot::WRITE, BackingSrc::AnonymousThp)
        .unwrap();
    // Cut the mapping so its first 2M span is partial: [hva + 4K, hva + 8M).
    h.munmap(hva, PAGE).unwrap();
    let g = h.get_user_page(at(hva, 2 * PAGE), false).unwrap();
    assert_eq!(
        g.level,
        Level::L4K,
        "a span not inside the VMA is mapped 4K"
    );
    let g = h.get_user_page(at(hva, MB2), false).unwrap();
    assert_eq!(g.level, Level::L2M, "the interior is mapped huge");
}

#[test]
fn a_span_with_a_present_4k_page_is_not_mapped_huge() {
    let h = host(4096);
    let hva = h.mmap(2 * MB2, Prot::READ | Prot::WRITE).unwrap();
    h.write_u64(hva, 1).unwrap();
    h.madvise_hugepage(hva, 2 * MB2, true).unwrap();
    let g = h.get_user_page(at(hva, PAGE), false).unwrap();
    assert_eq!(g.level, Level::L4K, "khugepaged's job, not a fault's");
    assert_eq!(
        h.get_user_page(at(hva, MB2), false).unwrap().level,
        Level::L2M
    );
    h.madvise_hugepage(hva, 2 * MB2, false).unwrap();
    assert_eq!(
        h.get_user_page(at(hva, MB2 + PAGE), false).unwrap().level,
        Level::L2M,
        "MADV_NOHUGEPAGE leaves existing THPs alone"
    );
}

#[test]
fn a_partial_munmap_splits_the_thp_invalidating_its_whole_2m_and_keeps_the_rest() {
    let h = host(4096);
    let rec = Arc::new(Recorder::default());
    h.register_notifier(rec.clone());
    let hva = h
        .mmap_backed(MB2, Prot::READ | Prot::WRITE, BackingSrc::AnonymousThp)
        .unwrap();
    for i in 0..512 {
        h.write_u64(at(hva, i * PAGE), i + 100).unwrap();
    }
    assert_eq!(h.host_pte(hva).unwrap().level, Level::L2M);
    h.munmap(at(hva, 10 * PAGE), 2 * PAGE).unwrap();
    let calls = rec.0.lock().clone();
    assert_eq!(
        calls,
        vec![(hva, at(hva, MB2), InvalidateEvent::Unmap)],
        "one invalidation over the THP's whole 2M"
    );
    assert_eq!(h.stats().thp_splits, 1);
    for i in (0..512).filter(|i| !(10..12).contains(i)) {
        let p = h.host_pte(at(hva, i * PAGE)).unwrap();
        assert_eq!(p.level, Level::L4K, "page {i} is 4K after the split");
        assert_eq!(h.read_u64(at(hva, i * PAGE)).unwrap(), i + 100);
    }
    assert!(h.host_pte(at(hva, 10 * PAGE)).is_none());
    assert_eq!(h.arena().stats().allocated, 510, "the cut pages were freed");
}

#[test]
fn a_partial_mprotect_and_dontneed_split_the_thp() {
    let h = host(4096);
    let hva = h
        .mmap_backed(2 * MB2, Prot::READ | Prot::WRITE, BackingSrc::AnonymousThp)
        .unwrap();
    h.write_u64(hva, 7).unwrap();
    h.write_u64(at(hva, MB2), 8).unwrap();
    h.mprotect(at(hva, PAGE), PAGE, Prot::READ).unwrap();
    assert_eq!(h.host_pte(hva).unwrap().level, Level::L4K);
    assert!(!h.host_pte(at(hva, PAGE)).unwrap().writable);
    h.madvise_dontneed(at(hva, MB2 + PAGE), PAGE).unwrap();
    assert_eq!(h.host_pte(at(hva, MB2)).unwrap().level, Level::L4K);
    assert!(!h.host_pte(at(hva, MB2 + PAGE)).unwrap().present);
    assert_eq!(h.read_u64(hva).unwrap(), 7);
    assert_eq!(h.read_u64(at(hva, MB2)).unwrap(), 8);
    assert_eq!(h.stats().thp_splits, 2);
}

#[test]
fn munmap_of_a_whole_huge_page_frees_its_run_for_reuse() {
    let h = host(2048);
    for _ in 0..8 {
        let hva = h
            .mmap_backed(
                2 * MB2,
                Prot::READ | Prot::WRITE,
                BackingSrc::AnonymousHugetlb2M,
            )
            .unwrap();
        h.write_u64(hva, 1).unwrap();
        h.write_u64(at(hva, MB2 + 8), 2).unwrap();
        assert_eq!(h.read_u64(at(hva, MB2 + 8)).unwrap(), 2);
        assert_eq!(h.arena().stats().allocated, 1024);
        h.munmap(hva, 2 * MB2).unwrap();
        assert_eq!(h.arena().stats().allocated, 0);
    }
    assert_eq!(h.arena().stats().stale_accesses, 0);
}

#[test]
fn hugetlb_refuses_unaligned_lengths_and_cuts_and_changes_nothing() {
    let h = host(1 << 19);
    assert!(matches!(
        h.mmap_backed(MB2, Prot::READ, BackingSrc::AnonymousHugetlb1G),
        Err(HostError::HugeUnaligned { .. })
    ));
    assert!(h.mappings().is_empty());
    let hva = h
        .mmap_backed(
            2 * MB2,
            Prot::READ | Prot::WRITE,
            BackingSrc::AnonymousHugetlb2M,
        )
        .unwrap();
    h.write_u64(hva, 5).unwrap();
    h.write_u64(at(hva, MB2), 6).unwrap();
    for r in [
        h.munmap(at(hva, PAGE), PAGE),
        h.mprotect(hva, PAGE, Prot::READ),
        h.madvise_dontneed(at(hva, MB2 - PAGE), 2 * PAGE),
        h.madvise_hugepage(hva, MB2, false),
    ] {
        assert!(matches!(r, Err(HostError::HugeUnaligned { .. })), "{r:?}");
    }
    assert_eq!(h.host_pte(hva).unwrap().level, Level::L2M);
    assert_eq!(h.read_u64(hva).unwrap(), 5);
    h.munmap(hva, MB2).unwrap();
    assert_eq!(h.host_pte(at(hva, MB2)).unwrap().level, Level::L2M);
}

#[test]
fn a_1g_hugetlb_page_is_one_aligned_run_and_frees_whole() {
    let h = host(1 << 19);
    let hva = h
        .mmap_backed(
            1 << 30,
            Prot::READ | Prot::WRITE,
            BackingSrc::AnonymousHugetlb1G,
        )
        .unwrap();
    assert!(hva.raw().is_multiple_of(1 << 30));
    let g = h.get_user_page(at(hva, 3 * MB2 + 8 * PAGE), true).unwrap();
    assert_eq!(g.level, Level::L1G);
    assert!((g.pfn.raw() - (3 * 512 + 8)).is_multiple_of(RUN_1G as u64));
    assert_eq!(
        h.host_pte(at(hva, (1 << 30) - PAGE)).unwrap().level,
        Level::L1G
    );
    assert_eq!(h.arena().stats().allocated, RUN_1G as u64);
    h.munmap(hva, 1 << 30).unwrap();
    assert_eq!(h.arena().stats().allocated, 0);
    assert!(
        h.stats().page_table_bytes < 1 << 16,
        "its tables were pruned"
    );
}

#[test]
fn a_thp_fault_falls_back_to_4k_when_no_run_is_free() {
    let h = host(600);
    let hva = h
        .mmap_backed(2 * MB2, Prot::READ | Prot::WRITE, BackingSrc::AnonymousThp)
        .unwrap();
    assert_eq!(h.get_user_page(hva, true).unwrap().level, Level::L2M);
    assert_eq!(
        h.get_user_page(at(hva, MB2), true).unwrap().level,
        Level::L4K,
        "no second run fits: 4K"
    );
}
