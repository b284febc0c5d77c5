//! Huge pages end to end, on both MMUs: the host backs guest memory with THP or hugetlb, faults
//! install 2M/1G leaves only where host level, memslot alignment and `disallow_lpage` allow, host
//! splits zap the whole huge leaf, data survives, and aging answers per 4K page.

mod common;

use common::*;
use kvmmu::prelude::*;
use proptest::prelude::*;

const MB2: u64 = 2 << 20;
const PAGE: u64 = 4096;

fn cfg(mmu: MmuKind) -> VmConfig {
    VmConfig {
        mmu,
        ..VmConfig::default()
    }
}

/// A host with `frames` frames, a VM, and one memslot at [`BASE_GPA`] over `bytes` of memory
/// backed by `src`, the slot starting `skip` bytes into the mapping.
fn backed(mmu: MmuKind, src: BackingSrc, bytes: u64, skip: u64, frames: usize) -> Fixture {
    let host = HostMm::new(HostConfig { frames }).expect("host");
    let vm = Vm::new(&host, cfg(mmu)).expect("vm");
    let hva = host
        .mmap_backed(bytes, Prot::READ | Prot::WRITE, src)
        .expect("mmap");
    let hva = hva_of(hva, skip / PAGE);
    vm.set_user_memory_region(region(0, BASE_GPA + skip, bytes - skip, hva))
        .expect("memslot");
    Fixture {
        host,
        vm,
        hva,
        bytes: bytes - skip,
    }
}

fn gfn(page: u64) -> Gfn {
    gpa(page).gfn()
}

fn level_of(f: &Fixture, page: u64) -> Option<Level> {
    f.vm.spte(AsId::new(0), gfn(page)).map(|(_, l)| l)
}

macro_rules! both_mmus {
    ($($prop:ident),* $(,)?) => {
        mod tdp {
            $(#[test] fn $prop() { super::$prop(kvmmu::prelude::MmuKind::Tdp); })*
        }
        mod shadow {
            $(#[test] fn $prop() { super::$prop(kvmmu::prelude::MmuKind::Shadow); })*
        }
    };
}

both_mmus!(
    a_huge_leaf_is_installed_only_when_host_level_alignment_and_disallow_lpage_allow,
    an_unaligned_slot_maps_its_interior_huge_and_its_edges_4k,
    a_partial_munmap_of_a_thp_splits_it_and_no_spte_survives_over_the_invalidated_part,
    a_partial_mprotect_of_a_thp_zaps_the_huge_leaf_and_data_written_through_it_reads_back,
    a_1g_hugetlb_slot_is_mapped_by_one_1g_leaf,
    clear_young_over_gfns_511_to_513_reports_the_young_2m_leaf_at_512,
    the_aging_bitmap_equals_per_page_test_young_over_mixed_4k_2m_1g_memory,
    data_written_through_huge_leaves_reads_back_after_split_and_recovery,
    a_1g_leaf_splits_into_2m_and_4k_leaves_that_keep_its_data,
    a_host_collapse_invalidates_and_data_reads_back_through_a_new_2m_leaf,
    recovery_after_dirty_logging_builds_huge_leaves_in_place_that_keep_the_data,
    splits_and_in_place_recoveries_racing_vcpu_writes_lose_no_write,
);

fn splits_and_in_place_recoveries_racing_vcpu_writes_lose_no_write(mmu: MmuKind) {
    let f = backed(mmu, BackingSrc::AnonymousThp, 4 * MB2, 0, 8192);
    // Populate under dirty logging (4K leaves everywhere); disabling logging then recovers the
    // huge leaves in place (KVM recovers on disable). The loop below alternates splits and
    // in-place recoveries while the vCPUs write (the shadow MMU's splits drop, its faults and
    // recoveries map huge again).
    let mut r = region(0, BASE_GPA, 4 * MB2, f.hva);
    r.flags = MemFlags::LOG_DIRTY_PAGES;
    f.vm.set_user_memory_region(r).unwrap();
    {
        let mut v = f.vm.create_vcpu().unwrap();
        for p in 0..2048 {
            v.write_u64(gpa(p), 0).unwrap();
        }
    }
    r.flags = MemFlags::empty();
    f.vm.set_user_memory_region(r).unwrap();
    let s = f.vm.stats();
    assert_eq!(
        (s.pages_4k, s.pages_2m),
        (0, 4),
        "disabling logging recovered in place"
    );
    const ROUNDS: u64 = 3000;
    let done = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let (vm, done) = (&f.vm, &done);
            s.spawn(move || {
                let mut v = vm.create_vcpu().unwrap();
                // vCPU t owns the pages p with p % 2 == t: it writes, then reads its own value.
                for i in 0..ROUNDS {
                    let p = ((i * 97) % 1024) * 2 + t;
                    v.write_u64(gpa(p), i << 1 | t).unwrap();
                    assert_eq!(v.read_u64(gpa(p)).unwrap(), i << 1 | t, "page {p}");
                }
                done.fetch_add(1, std::sync::atomic::Ordering::Release);
            });
        }
        // Bounded; stops early once both vCPUs are done.
        for _ in 0..ROUNDS / 10 {
            if done.load(std::sync::atomic::Ordering::Acquire) == 2 {
                break;
            }
            f.vm.recover_huge_pages(AsId::new(0), slot_range(2048));
            f.vm.split_huge_pages(AsId::new(0), slot_range(2048), Level::L4K);
        }
    });
    let mut v = f.vm.create_vcpu().unwrap();
    for t in 0..2u64 {
        let i = ROUNDS - 1;
        let p = ((i * 97) % 1024) * 2 + t;
        assert_eq!(v.read_u64(gpa(p)).unwrap(), i << 1 | t);
    }
    assert_eq!(f.host.arena().stats().stale_accesses, 0);
    drop(v);
    let s = f.vm.shutdown();
    assert_eq!((s.pages_4k, s.pages_2m), (0, 0), "{s:?}");
    assert_eq!(
        s.shadow.pages_allocated, s.shadow.pages_freed,
        "{:?}",
        s.shadow
    );
    assert_eq!(s.tdp.tables_allocated, s.tdp.tables_freed, "{:?}", s.tdp);
}

fn recovery_after_dirty_logging_builds_huge_leaves_in_place_that_keep_the_data(mmu: MmuKind) {
    let f = backed(mmu, BackingSrc::AnonymousThp, 2 * MB2, 0, 4096);
    let mut r = region(0, BASE_GPA, 2 * MB2, f.hva);
    r.flags = MemFlags::LOG_DIRTY_PAGES;
    f.vm.set_user_memory_region(r).unwrap();
    let mut v = f.vm.create_vcpu().unwrap();
    for p in 0..1024 {
        v.write_u64(gpa(p), p ^ 0x3c3c).unwrap();
    }
    let s = f.vm.stats();
    assert_eq!((s.pages_4k, s.pages_2m), (1024, 0), "logging maps 4K");
    // Disabling logging recovers the huge leaves (as KVM's kvm_mmu_recover_huge_pages on a
    // logging-disable memslot update does), in place, with one batched flush.
    r.flags = MemFlags::empty();
    let flushes = f.vm.stats().remote_tlb_flush;
    f.vm.set_user_memory_region(r).unwrap();
    let s = f.vm.stats();
    assert_eq!((s.pages_4k, s.pages_2m), (0, 2), "formed in place: {s:?}");
    assert_eq!(s.remote_tlb_flush, flushes + 1, "one batched flush");
    assert_eq!(
        f.vm.recover_huge_pages(AsId::new(0), slot_range(1024)),
        0,
        "nothing left to recover"
    );
    let (spte, lvl) = f.vm.spte(AsId::new(0), gfn(700)).expect("a huge leaf");
    assert_eq!(lvl, Level::L2M);
    assert!(spte.is_writable() && spte.is_dirty(), "W kept, D set");
    let faults = v.stats().faults;
    for p in 0..1024 {
        assert_eq!(v.read_u64(gpa(p)).unwrap(), p ^ 0x3c3c, "page {p}");
    }
    v.write_u64(gpa(9), 9).unwrap();
    assert_eq!(
        v.stats().faults,
        faults,
        "the huge leaves serve every access"
    );
    assert_eq!(f.host.read_u64(hva_of(f.hva, 9)).unwrap(), 9);
    assert_eq!(f.host.arena().stats().stale_accesses, 0);
    drop(v);
    let s = f.vm.shutdown();
    assert_eq!((s.pages_2m, s.pages_4k), (0, 0));
    assert_eq!(
        s.shadow.pages_allocated, s.shadow.pages_freed,
        "{:?}",
        s.shadow
    );
}

fn a_host_collapse_invalidates_and_data_reads_back_through_a_new_2m_leaf(mmu: MmuKind) {
    let f = backed(mmu, BackingSrc::Anonymous, 2 * MB2, 0, 4096);
    let mut v = f.vm.create_vcpu().unwrap();
    for p in 0..512 {
        v.write_u64(gpa(p), p * 7 + 1).unwrap();
    }
    assert_eq!((f.vm.stats().pages_4k, f.vm.stats().pages_2m), (512, 0));
    assert!(
        !f.host.collapse(f.hva).unwrap(),
        "not THP-enabled: no collapse"
    );
    f.host.madvise_hugepage(f.hva, 2 * MB2, true).unwrap();
    assert!(
        !f.host.collapse(hva_of(f.hva, 512)).unwrap(),
        "a span with missing pages is not collapsed"
    );
    assert!(f.host.collapse(f.hva).unwrap());
    assert_eq!(f.host.stats().thp_collapses, 1);
    assert_eq!(f.host.host_pte(f.hva).unwrap().level, Level::L2M);
    assert!(
        (0..512).all(|p| f.vm.spte(AsId::new(0), gfn(p)).is_none()),
        "the collapse's invalidation zapped every small leaf"
    );
    assert_eq!(
        f.host.get_user_page(hva_of(f.hva, 3), false).unwrap().level,
        Level::L2M,
        "GUP reports the new huge page"
    );
    // The emptied 4K table (TDP) or shadow page still sits where the huge leaf would go, and a
    // fault maps below an existing table (`mmu/hugepage.rs`): recovery unlinks empty TDP tables,
    // a fresh root drops the shadow pages.
    if mmu == MmuKind::Tdp {
        f.vm.recover_huge_pages(AsId::new(0), slot_range(1024));
    } else {
        f.vm.reset_mmu();
    }
    for p in 0..512 {
        assert_eq!(
            v.read_u64(gpa(p)).unwrap(),
            p * 7 + 1,
            "page {p} after collapse"
        );
    }
    let s = f.vm.stats();
    assert_eq!((s.pages_4k, s.pages_2m), (0, 1));
    assert_eq!(f.host.arena().stats().stale_accesses, 0);
    assert_eq!(
        f.host.arena().stats().allocated,
        512,
        "the small frames were freed"
    );
}

fn slot_range(pages: u64) -> GfnRange {
    GfnRange::from_len(gfn(0), pages).unwrap()
}

fn data_written_through_huge_leaves_reads_back_after_split_and_recovery(mmu: MmuKind) {
    let f = backed(mmu, BackingSrc::AnonymousThp, 2 * MB2, 0, 4096);
    let mut v = f.vm.create_vcpu().unwrap();
    for p in 0..1024 {
        v.write_u64(gpa(p), p ^ 0x5a5a).unwrap();
    }
    assert_eq!(f.vm.stats().pages_2m, 2);
    let split =
        f.vm.split_huge_pages(AsId::new(0), slot_range(1024), Level::L4K);
    assert_eq!(split, 2);
    let s = f.vm.stats();
    assert_eq!(s.pages_2m, 0);
    if mmu == MmuKind::Tdp {
        assert_eq!(s.pages_4k, 1024, "split in place: 512 children per leaf");
        assert_eq!(s.tdp.huge_splits, 2);
        let (spte, lvl) = f.vm.spte(AsId::new(0), gfn(7)).unwrap();
        assert_eq!(lvl, Level::L4K);
        assert!(
            spte.is_dirty() && spte.is_writable(),
            "children inherit W and D"
        );
    }
    for p in 0..1024 {
        assert_eq!(
            v.read_u64(gpa(p)).unwrap(),
            p ^ 0x5a5a,
            "page {p} after the split"
        );
    }
    v.write_u64(gpa(5), 1).unwrap();
    assert_eq!(f.host.read_u64(hva_of(f.hva, 5)).unwrap(), 1);
    let rec = f.vm.recover_huge_pages(AsId::new(0), slot_range(1024));
    if mmu == MmuKind::Tdp {
        assert_eq!(rec, 2, "two tables replaced in place");
        eprintln!("{:?}", f.vm.stats().tdp);
    }
    for p in 0..1024 {
        let want = if p == 5 { 1 } else { p ^ 0x5a5a };
        assert_eq!(v.read_u64(gpa(p)).unwrap(), want, "page {p} after recovery");
    }
    let s = f.vm.stats();
    assert_eq!((s.pages_2m, s.pages_4k), (2, 0), "{s:?}");
    assert_eq!(f.host.arena().stats().stale_accesses, 0);
    drop(v);
    let s = f.vm.shutdown();
    assert_eq!((s.pages_2m, s.pages_4k), (0, 0));
    assert_eq!(s.tdp.tables_allocated, s.tdp.tables_freed, "{:?}", s.tdp);
}

fn a_1g_leaf_splits_into_2m_and_4k_leaves_that_keep_its_data(mmu: MmuKind) {
    let f = backed(mmu, BackingSrc::AnonymousHugetlb1G, 1 << 30, 0, 1 << 18);
    let mut v = f.vm.create_vcpu().unwrap();
    for p in [0, 513, 200_000] {
        v.write_u64(gpa(p), p + 1).unwrap();
    }
    assert_eq!(f.vm.stats().pages_1g, 1);
    f.vm.split_huge_pages(AsId::new(0), slot_range(1 << 18), Level::L2M);
    let s = f.vm.stats();
    assert_eq!(s.pages_1g, 0);
    if mmu == MmuKind::Tdp {
        assert_eq!(s.pages_2m, 512);
        f.vm.split_huge_pages(AsId::new(0), slot_range(1024), Level::L4K);
        let s = f.vm.stats();
        assert_eq!((s.pages_2m, s.pages_4k), (510, 1024));
    }
    for p in [0, 513, 200_000] {
        assert_eq!(v.read_u64(gpa(p)).unwrap(), p + 1);
    }
}

fn a_huge_leaf_is_installed_only_when_host_level_alignment_and_disallow_lpage_allow(mmu: MmuKind) {
    // THP host, aligned slot: 2M.
    let f = backed(mmu, BackingSrc::AnonymousThp, 2 * MB2, 0, 4096);
    let mut v = f.vm.create_vcpu().unwrap();
    v.write_u64(gpa(3), 7).unwrap();
    assert_eq!(level_of(&f, 3), Some(Level::L2M));
    assert_eq!(
        level_of(&f, 511),
        Some(Level::L2M),
        "one leaf maps the block"
    );
    assert_eq!((f.vm.stats().pages_2m, f.vm.stats().pages_4k), (1, 0));
    for p in 0..512 {
        v.write_u64(gpa(p), p).unwrap();
    }
    assert_eq!(f.vm.stats().pages_2m, 1, "every page through the same leaf");
    drop(v);

    // 4K host pages: 4K leaves, however aligned the slot.
    let f = backed(mmu, BackingSrc::Anonymous, 2 * MB2, 0, 4096);
    let mut v = f.vm.create_vcpu().unwrap();
    v.write_u64(gpa(3), 7).unwrap();
    assert_eq!(level_of(&f, 3), Some(Level::L4K));
    drop(v);

    // Huge host pages but gpa and hva aligned differently: disallow_lpage everywhere, 4K.
    let host = HostMm::new(HostConfig { frames: 4096 }).unwrap();
    let vm = Vm::new(&host, cfg(mmu)).unwrap();
    let hva = host
        .mmap_backed(
            2 * MB2,
            Prot::READ | Prot::WRITE,
            BackingSrc::AnonymousHugetlb2M,
        )
        .unwrap();
    vm.set_user_memory_region(region(0, BASE_GPA + PAGE, MB2, hva))
        .unwrap();
    let mut v = vm.create_vcpu().unwrap();
    v.write_u64(Gpa::new(BASE_GPA + 300 * PAGE), 1).unwrap();
    assert_eq!(
        vm.spte(AsId::new(0), Gpa::new(BASE_GPA + 300 * PAGE).gfn())
            .map(|(_, l)| l),
        Some(Level::L4K)
    );
    assert_eq!(
        host.host_pte(hva).unwrap().level,
        Level::L2M,
        "host is huge"
    );
    let s = vm.stats();
    assert_eq!((s.pages_2m, s.pages_4k), (0, 1));
}

fn an_unaligned_slot_maps_its_interior_huge_and_its_edges_4k(mmu: MmuKind) {
    // The slot starts 4K into a 3 x 2M THP mapping and ends 4K before its end: gpa and hva stay
    // equally aligned, so only the partial first and last blocks are disallowed.
    let host = HostMm::new(HostConfig { frames: 8192 }).unwrap();
    let vm = Vm::new(&host, cfg(mmu)).unwrap();
    let base = host
        .mmap_backed(3 * MB2, Prot::READ | Prot::WRITE, BackingSrc::AnonymousThp)
        .unwrap();
    let slot_hva = hva_of(base, 1);
    vm.set_user_memory_region(region(0, BASE_GPA + PAGE, 3 * MB2 - 2 * PAGE, slot_hva))
        .unwrap();
    let mut v = vm.create_vcpu().unwrap();
    let at = |p: u64| Gpa::new(BASE_GPA + p * PAGE);
    for p in [1, 511, 512, 1023, 1024, 1534] {
        v.write_u64(at(p), p).unwrap();
    }
    let lvl = |p: u64| vm.spte(AsId::new(0), at(p).gfn()).map(|(_, l)| l);
    assert_eq!(lvl(1), Some(Level::L4K), "head block is partial");
    assert_eq!(lvl(511), Some(Level::L4K));
    assert_eq!(lvl(512), Some(Level::L2M), "interior block is huge");
    assert_eq!(lvl(1023), Some(Level::L2M));
    assert_eq!(lvl(1024), Some(Level::L4K), "tail block is partial");
    assert_eq!(lvl(1534), Some(Level::L4K));
    assert_eq!(
        host.host_pte(hva_of(base, 1)).unwrap().level,
        Level::L2M,
        "the host maps the head huge; the memslot forbids it"
    );
    let s = vm.stats();
    assert_eq!((s.pages_2m, s.pages_4k), (1, 4));
    for p in [1, 511, 512, 1023, 1024, 1534] {
        assert_eq!(v.read_u64(at(p)).unwrap(), p);
    }
}

fn a_partial_munmap_of_a_thp_splits_it_and_no_spte_survives_over_the_invalidated_part(
    mmu: MmuKind,
) {
    let f = backed(mmu, BackingSrc::AnonymousThp, 2 * MB2, 0, 4096);
    let mut v = f.vm.create_vcpu().unwrap();
    for p in 0..1024 {
        v.write_u64(gpa(p), p + 1).unwrap();
    }
    assert_eq!(f.vm.stats().pages_2m, 2);
    f.host.munmap(hva_of(f.hva, 100), PAGE).unwrap();
    assert_eq!(f.host.stats().thp_splits, 1);
    for p in 0..512 {
        assert!(
            f.vm.spte(AsId::new(0), gfn(p)).is_none(),
            "gfn {p}: the huge leaf over the split THP is gone"
        );
    }
    assert_eq!(
        level_of(&f, 512),
        Some(Level::L2M),
        "the other THP is intact"
    );
    assert_eq!(f.vm.stats().pages_2m, 1);
    for p in (0..1024).filter(|p| *p != 100) {
        assert_eq!(v.read_u64(gpa(p)).unwrap(), p + 1, "page {p}");
    }
    assert!(matches!(
        v.read_u64(gpa(100)),
        Err(VcpuExit::HostFault { .. })
    ));
    assert_eq!(
        level_of(&f, 7),
        Some(Level::L4K),
        "refaulted 4K after the split"
    );
    assert_eq!(f.host.arena().stats().stale_accesses, 0);
}

fn a_partial_mprotect_of_a_thp_zaps_the_huge_leaf_and_data_written_through_it_reads_back(
    mmu: MmuKind,
) {
    let f = backed(mmu, BackingSrc::AnonymousThp, MB2, 0, 2048);
    let mut v = f.vm.create_vcpu().unwrap();
    for p in 0..512 {
        v.write_u64(gpa(p), 3 * p).unwrap();
    }
    assert_eq!(level_of(&f, 0), Some(Level::L2M));
    f.host
        .mprotect(hva_of(f.hva, 300), 2 * PAGE, Prot::READ)
        .unwrap();
    assert!((0..512).all(|p| f.vm.spte(AsId::new(0), gfn(p)).is_none()));
    for p in 0..512 {
        assert_eq!(
            v.read_u64(gpa(p)).unwrap(),
            3 * p,
            "page {p} after the split"
        );
    }
    assert!(matches!(
        v.write_u64(gpa(301), 1),
        Err(VcpuExit::HostFault { .. })
    ));
    v.write_u64(gpa(302), 9).unwrap();
    assert_eq!(f.host.read_u64(hva_of(f.hva, 302)).unwrap(), 9);
    let s = f.vm.stats();
    assert_eq!(s.pages_2m, 0);
    assert_eq!(
        s.pages_4k, 512,
        "every page refaulted at 4K (the write upgraded a leaf)"
    );
}

fn a_1g_hugetlb_slot_is_mapped_by_one_1g_leaf(mmu: MmuKind) {
    let f = backed(mmu, BackingSrc::AnonymousHugetlb1G, 1 << 30, 0, 1 << 18);
    let mut v = f.vm.create_vcpu().unwrap();
    for p in [0, 1, 77_777, (1 << 18) - 1] {
        v.write_u64(gpa(p), p).unwrap();
    }
    for p in [0, 1, 77_777, (1 << 18) - 1] {
        assert_eq!(v.read_u64(gpa(p)).unwrap(), p);
        assert_eq!(f.host.read_u64(hva_of(f.hva, p)).unwrap(), p);
    }
    assert_eq!(level_of(&f, 5), Some(Level::L1G));
    let s = f.vm.stats();
    assert_eq!((s.pages_1g, s.pages_2m, s.pages_4k), (1, 0, 0));
    let s = f.vm.shutdown();
    assert_eq!((s.pages_1g, s.pages_2m, s.pages_4k), (0, 0, 0));
}

fn clear_young_over_gfns_511_to_513_reports_the_young_2m_leaf_at_512(mmu: MmuKind) {
    let f = backed(mmu, BackingSrc::AnonymousThp, 2 * MB2, 0, 4096);
    let mut v = f.vm.create_vcpu().unwrap();
    v.write_u64(gpa(600), 1).unwrap(); // a young 2M leaf at gfn 512
    v.write_u64(gpa(3), 1).unwrap(); // a 2M leaf at gfn 0 ...
    drop(v);
    assert_eq!(level_of(&f, 512), Some(Level::L2M));
    // ... made old (host bits and its A bit) so only the leaf at 512 can answer below.
    f.host.clear_young(f.hva, 512 * PAGE).unwrap();
    assert!(!f.host.host_pte(hva_of(f.hva, 512)).unwrap().young);
    // The host's own young bit is on page 600 only: outside the range.
    assert!(
        f.host.clear_young(hva_of(f.hva, 511), 2 * PAGE).unwrap(),
        "the bool form finds the young 2M leaf"
    );
    // Make it young again through a fresh walk (aging does not flush TLBs).
    f.vm.reset_mmu();
    let mut v = f.vm.create_vcpu().unwrap();
    v.read_u64(gpa(700)).unwrap();
    drop(v);
    let young = f
        .host
        .clear_young_range(hva_of(f.hva, 511), 2 * PAGE)
        .unwrap();
    assert_eq!(
        young.young_pages().collect::<Vec<_>>(),
        vec![1],
        "page 512 (through the 2M leaf) is young, page 511 is not"
    );
    assert!(
        !f.host.clear_young(hva_of(f.hva, 511), 2 * PAGE).unwrap(),
        "the leaf's one A bit was cleared"
    );
}

/// Per-page `test_young` answers, then the bitmap over `[s, e)` pages of the mapping, compared.
fn bitmap_matches_test_young(host: &HostMm, hva: Hva, s: u64, e: u64) {
    let want: Vec<u64> = (s..e)
        .filter(|p| host.test_young(hva_of(hva, *p)).unwrap())
        .map(|p| p - s)
        .collect();
    let got = host
        .clear_young_range(hva_of(hva, s), (e - s) * PAGE)
        .unwrap();
    assert_eq!(
        got.young_pages().collect::<Vec<_>>(),
        want,
        "pages [{s}, {e})"
    );
}

/// One VM over three slots: 4K pages, THP (2M) and hugetlb 1G, back to back in guest physical
/// memory; returns the host, VM, each slot's host address and a vCPU.
fn mixed(mmu: MmuKind) -> (HostMm, Vm, [Hva; 3]) {
    let host = HostMm::new(HostConfig { frames: 1 << 19 }).unwrap();
    let vm = Vm::new(&host, cfg(mmu)).unwrap();
    let srcs = [
        (BackingSrc::Anonymous, 2 * MB2),
        (BackingSrc::AnonymousThp, 2 * MB2),
        (BackingSrc::AnonymousHugetlb1G, 1 << 30),
    ];
    let mut hvas = [Hva::new(0); 3];
    let mut g = BASE_GPA;
    for (i, (src, len)) in srcs.into_iter().enumerate() {
        let hva = host
            .mmap_backed(len, Prot::READ | Prot::WRITE, src)
            .unwrap();
        g = g.next_multiple_of(1 << 30);
        vm.set_user_memory_region(region(i as u16, g, len, hva))
            .unwrap();
        hvas[i] = hva;
        g += len;
    }
    (host, vm, hvas)
}

fn touch_mixed(vm: &Vm, pages: &[(usize, u64)]) {
    let mut v = vm.create_vcpu().unwrap();
    for &(slot, p) in pages {
        let gpa = Gpa::new(BASE_GPA.next_multiple_of(1 << 30) + ((slot as u64) << 30) + p * PAGE);
        v.write_u64(gpa, p).unwrap();
    }
}

fn the_aging_bitmap_equals_per_page_test_young_over_mixed_4k_2m_1g_memory(mmu: MmuKind) {
    let (host, vm, hvas) = mixed(mmu);
    touch_mixed(
        &vm,
        &[(0, 3), (0, 700), (1, 5), (1, 900), (2, 1), (2, 100_000)],
    );
    let s = vm.stats();
    assert_eq!((s.pages_4k, s.pages_2m, s.pages_1g), (2, 2, 1));
    // Make the host bits differ from the MMU's: clear the host bits only where a later range
    // will not look, then compare unaligned ranges straddling leaf boundaries.
    bitmap_matches_test_young(&host, hvas[0], 1, 701);
    bitmap_matches_test_young(&host, hvas[1], 511, 513);
    bitmap_matches_test_young(&host, hvas[1], 3, 1000);
    bitmap_matches_test_young(&host, hvas[2], 99_999, 100_003);
    bitmap_matches_test_young(&host, hvas[2], 0, 5);
    drop(vm);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    /// Random unaligned ranges over a 2M-leaf mapping never miss a young huge leaf, on both MMUs.
    #[test]
    fn random_unaligned_aging_ranges_report_exactly_the_young_pages_of_huge_leaves(
        shadow in any::<bool>(),
        touched in proptest::collection::vec(0u64..2048, 1..6),
        s in 0u64..2048,
        len in 1u64..1200,
    ) {
        let mmu = if shadow { MmuKind::Shadow } else { MmuKind::Tdp };
        let f = backed(mmu, BackingSrc::AnonymousThp, 4 * MB2, 0, 8192);
        let mut v = f.vm.create_vcpu().unwrap();
        for &p in &touched {
            v.write_u64(gpa(p), p).unwrap();
        }
        drop(v);
        let e = (s + len).min(2048);
        // The host's own young bits name only the touched pages; the MMU's leaves cover blocks.
        let want: Vec<u64> = (s..e)
            .filter(|p| touched.iter().any(|t| t / 512 == p / 512))
            .map(|p| p - s)
            .collect();
        let got = f.host.clear_young_range(hva_of(f.hva, s), (e - s) * PAGE).unwrap();
        prop_assert_eq!(got.young_pages().collect::<Vec<_>>(), want);
    }
}
