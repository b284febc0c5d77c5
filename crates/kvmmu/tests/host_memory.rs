//! Host memory semantics: zero-fill on DONTNEED, protection, young/dirty tracking, stale-access
//! detection, frame exhaustion and address-space placement.

use kvmmu::internals::addr::{Hva, PAGE_SIZE, Pfn};
use kvmmu::internals::host::{
    FrameArena, FrameTag, GupError, HostConfig, HostError, HostMm, Prot, StaleAccess,
};

const P: u64 = PAGE_SIZE;
const RW: Prot = Prot::READ.union(Prot::WRITE);

fn host(frames: usize) -> HostMm {
    HostMm::new(HostConfig { frames }).unwrap()
}

fn at(hva: Hva, off: u64) -> Hva {
    Hva::new(hva.raw() + off)
}

#[test]
fn dontneed_zero_fills_and_frees_the_old_frame() {
    let h = host(16);
    let hva = h.mmap(2 * P, RW).unwrap();
    h.write_u64(at(hva, 8), 0xfeed).unwrap();
    let old = h.host_pte(hva).unwrap();
    assert!(old.present && old.dirty);
    h.madvise_dontneed(hva, 2 * P).unwrap();
    assert_eq!(h.arena().tag(old.pfn), FrameTag::FREE, "old frame is free");
    assert_eq!(h.arena().stats().allocated, 0);
    assert_eq!(
        h.read_u64(at(hva, 8)).unwrap(),
        0,
        "next access sees a zero page"
    );
    let new = h.host_pte(hva).unwrap();
    assert_ne!(
        new.tag, old.tag,
        "the page is backed by a frame with a new tag"
    );
    assert!(!new.dirty);
    assert_eq!(h.stats().dontneed, 1);
}

#[test]
fn read_only_mapping_refuses_write_gup_until_made_writable() {
    let h = host(16);
    let hva = h.mmap(P, RW).unwrap();
    h.write_u64(hva, 1).unwrap();
    h.mprotect(hva, P, Prot::READ).unwrap();
    assert_eq!(
        h.get_user_page(hva, true),
        Err(GupError::ProtectionViolation { hva, write: true })
    );
    assert!(matches!(
        h.write_u64(hva, 2),
        Err(HostError::Gup(GupError::ProtectionViolation {
            write: true,
            ..
        }))
    ));
    let page = h.get_user_page(hva, false).unwrap();
    assert!(!page.writable);
    assert_eq!(h.read_u64(hva).unwrap(), 1);
    h.mprotect(hva, P, RW).unwrap();
    assert!(h.get_user_page(hva, true).unwrap().writable);
    h.write_u64(hva, 2).unwrap();
    assert_eq!(h.read_u64(hva).unwrap(), 2);
    h.mprotect(hva, P, Prot::empty()).unwrap();
    assert_eq!(
        h.get_user_page(hva, false),
        Err(GupError::ProtectionViolation { hva, write: false })
    );
}

#[test]
fn gup_on_unmapped_address_is_not_mapped() {
    let h = host(4);
    let hva = h.mmap(P, RW).unwrap();
    let past = at(hva, P);
    assert_eq!(
        h.get_user_page(past, false),
        Err(GupError::NotMapped { hva: past })
    );
    assert_eq!(
        h.get_user_page(Hva::new(u64::MAX), false),
        Err(GupError::NotMapped {
            hva: Hva::new(u64::MAX)
        })
    );
    assert_eq!(h.arena().stats().total_allocs, 0);
}

#[test]
fn young_is_set_by_access_and_cleared_once_test_young_never_clears() {
    let h = host(16);
    let hva = h.mmap(4 * P, RW).unwrap();
    assert!(!h.clear_young(hva, 4 * P).unwrap());
    h.get_user_page(at(hva, P), false).unwrap();
    let p = h.host_pte(at(hva, P)).unwrap();
    assert!(p.young && !p.dirty, "read GUP sets young only");
    assert!(h.test_young(at(hva, P)).unwrap());
    assert!(
        h.test_young(at(hva, P)).unwrap(),
        "test_young does not clear"
    );
    assert!(h.clear_young(hva, 4 * P).unwrap());
    assert!(
        !h.clear_young(hva, 4 * P).unwrap(),
        "second clear finds nothing"
    );
    assert!(!h.test_young(at(hva, P)).unwrap());
    h.write_u64(at(hva, 2 * P), 3).unwrap();
    let p = h.host_pte(at(hva, 2 * P)).unwrap();
    assert!(p.young && p.dirty, "write sets young and dirty");
    assert!(h.clear_flush_young(hva, 4 * P).unwrap());
    let p = h.host_pte(at(hva, 2 * P)).unwrap();
    assert!(!p.young && p.dirty, "aging clears young, keeps dirty");
    h.read_u64(at(hva, 2 * P)).unwrap();
    assert!(h.host_pte(at(hva, 2 * P)).unwrap().young, "read sets young");
}

#[test]
fn stale_access_is_detected_and_counted() {
    let a = FrameArena::new(2).unwrap();
    let (pfn, tag) = a.alloc(7).unwrap();
    a.write_u64(pfn, 1, tag, 11).unwrap();
    assert_eq!(a.read_u64(pfn, 1, tag).unwrap(), 11);
    a.free(pfn, tag).unwrap();
    let stale = StaleAccess {
        pfn,
        expected: tag,
        found: FrameTag::FREE,
    };
    assert!(matches!(a.read_u64(pfn, 1, tag), Err(HostError::Stale(s)) if s == stale));
    assert_eq!(a.stats().stale_accesses, 1);
    assert!(matches!(
        a.write_u64(pfn, 1, tag, 5),
        Err(HostError::Stale(_))
    ));
    assert_eq!(a.stats().stale_accesses, 2);
    // After reuse the old tag still fails, and the new owner's zero-filled data is untouched.
    let (pfn2, tag2) = a.alloc(8).unwrap();
    assert_eq!(pfn2, pfn);
    assert!(matches!(
        a.write_u64(pfn, 1, tag, 5),
        Err(HostError::Stale(StaleAccess { found, .. })) if found == tag2
    ));
    assert_eq!(a.read_u64(pfn, 1, tag2).unwrap(), 0);
    assert_eq!(a.stats().stale_accesses, 3);
    // FREE is never a valid tag to access with.
    let (pfn3, _) = a.alloc(9).unwrap();
    assert!(matches!(
        a.read_u64(pfn3, 0, FrameTag::FREE),
        Err(HostError::Stale(_))
    ));
    assert_eq!(a.stats().stale_accesses, 4);
}

#[test]
fn access_through_a_gup_result_after_dontneed_is_stale() {
    let h = host(8);
    let hva = h.mmap(P, RW).unwrap();
    let page = h.get_user_page(hva, true).unwrap();
    h.arena().write_u64(page.pfn, 0, page.tag, 42).unwrap();
    assert_eq!(h.read_u64(hva).unwrap(), 42);
    h.madvise_dontneed(hva, P).unwrap();
    assert!(matches!(
        h.arena().read_u64(page.pfn, 0, page.tag),
        Err(HostError::Stale(_))
    ));
    assert_eq!(h.arena().stats().stale_accesses, 1);
}

#[test]
fn double_and_stale_free_are_rejected_without_change() {
    let a = FrameArena::new(4).unwrap();
    let (pfn, tag) = a.alloc(1).unwrap();
    a.free(pfn, tag).unwrap();
    let before = a.stats();
    assert!(matches!(
        a.free(pfn, tag),
        Err(HostError::StaleFree {
            found: FrameTag::FREE,
            ..
        })
    ));
    let (pfn2, tag2) = a.alloc(2).unwrap();
    assert_eq!(pfn2, pfn);
    assert!(matches!(a.free(pfn, tag), Err(HostError::StaleFree { found, .. }) if found == tag2));
    assert_eq!(a.tag(pfn), tag2, "the new owner keeps its frame");
    assert!(matches!(
        a.free(pfn, FrameTag::FREE),
        Err(HostError::StaleFree { .. })
    ));
    assert!(matches!(
        a.free(Pfn::new(4), tag2),
        Err(HostError::BadPfn { .. })
    ));
    assert_eq!(a.stats().total_frees, before.total_frees);
}

#[test]
fn bad_word_pfn_and_host_page_are_typed_errors() {
    let a = FrameArena::new(1).unwrap();
    let (pfn, tag) = a.alloc(0).unwrap();
    assert!(matches!(
        a.read_u64(pfn, 512, tag),
        Err(HostError::BadWordIndex { word: 512 })
    ));
    assert!(matches!(
        a.write_u64(pfn, 9999, tag, 1),
        Err(HostError::BadWordIndex { .. })
    ));
    assert!(matches!(
        a.read_u64(Pfn::new(1), 0, tag),
        Err(HostError::BadPfn { .. })
    ));
    assert!(matches!(
        a.alloc(FrameTag::MAX_HOST_PAGE + 1),
        Err(HostError::BadHostPage { .. })
    ));
    assert_eq!(a.tag(Pfn::new(u64::MAX)), FrameTag::FREE);
    assert_eq!(a.stats().stale_accesses, 0);
}

#[test]
fn exhausted_arena_fails_gup_until_a_page_is_discarded() {
    let h = host(2);
    let hva = h.mmap(3 * P, RW).unwrap();
    h.write_u64(hva, 1).unwrap();
    h.write_u64(at(hva, P), 2).unwrap();
    assert_eq!(
        h.get_user_page(at(hva, 2 * P), false),
        Err(GupError::OutOfFrames)
    );
    assert!(
        !h.host_pte(at(hva, 2 * P)).unwrap().present,
        "failed GUP installed nothing"
    );
    h.madvise_dontneed(hva, P).unwrap();
    assert!(h.get_user_page(at(hva, 2 * P), true).is_ok());
    assert_eq!(h.read_u64(at(hva, P)).unwrap(), 2);
}

#[test]
fn mmap_places_disjoint_guarded_mappings_and_aligns_large_ones() {
    let h = host(4);
    let a = h.mmap(P, RW).unwrap();
    let b = h.mmap(P, RW).unwrap();
    let big = h.mmap(4 << 20, RW).unwrap();
    assert!(a.is_page_aligned() && b.is_page_aligned());
    assert!(
        b.raw() >= a.raw() + 2 * P,
        "a guard page separates mappings"
    );
    assert_eq!(h.host_pte(at(a, P)), None, "the guard page is unmapped");
    assert_eq!(big.raw() % (2 << 20), 0, "large mappings are 2 MiB aligned");
    let fixed = Hva::new(0x10_0000);
    assert_eq!(h.mmap_fixed(fixed, 2 * P, Prot::READ).unwrap(), fixed);
    assert!(matches!(
        h.mmap_fixed(at(fixed, P), P, RW),
        Err(HostError::Overlaps { existing, .. }) if existing == fixed
    ));
    assert!(matches!(
        h.mmap(1 << 50, RW),
        Err(HostError::AddressSpaceExhausted)
    ));
    assert_eq!(h.stats().mmap, 4);
    assert!(
        h.write_u64(fixed, 0).is_err(),
        "the fixed mapping is read-only"
    );
    // A fresh mapping over a previously unmapped range reads zero.
    h.munmap(fixed, 2 * P).unwrap();
    h.mmap_fixed(fixed, 2 * P, RW).unwrap();
    h.write_u64(fixed, 5).unwrap();
    h.munmap(fixed, 2 * P).unwrap();
    h.mmap_fixed(fixed, 2 * P, RW).unwrap();
    assert_eq!(h.read_u64(fixed).unwrap(), 0);
}

#[test]
fn split_mprotect_applies_to_exactly_the_range() {
    let h = host(8);
    let hva = h.mmap(4 * P, RW).unwrap();
    h.mprotect(at(hva, P), 2 * P, Prot::READ).unwrap();
    assert_eq!(
        h.mappings(),
        vec![
            (hva, P, RW),
            (at(hva, P), 2 * P, Prot::READ),
            (at(hva, 3 * P), P, RW)
        ]
    );
    assert!(h.write_u64(hva, 1).is_ok());
    assert!(h.write_u64(at(hva, P), 1).is_err());
    assert!(h.write_u64(at(hva, 2 * P + 8), 1).is_err());
    assert!(h.write_u64(at(hva, 3 * P), 1).is_ok());
    // An operation spanning the split pieces still works as one range.
    h.munmap(hva, 4 * P).unwrap();
    assert!(h.mappings().is_empty());
    assert_eq!(h.arena().stats().allocated, 0);
}

/// A frame freed behind the host's back through the public arena API must not make a later
/// `munmap` panic halfway through its invalidation: the VM's counters stay balanced and the misuse
/// is counted as a stale access. (Found in review: the panic left `mn_active_invalidate_count` and
/// `mmu_invalidate_in_progress` at 1 for good.)
#[test]
fn munmap_survives_a_frame_freed_through_the_public_arena_api() {
    use kvmmu::prelude::*;
    let host = HostMm::new(HostConfig { frames: 64 }).unwrap();
    let vm = Vm::new(&host, VmConfig::default()).unwrap();
    let hva = host.mmap(1 << 16, Prot::READ | Prot::WRITE).unwrap();
    vm.set_user_memory_region(MemoryRegion {
        slot: SlotId::new(0),
        as_id: AsId::new(0),
        flags: MemFlags::empty(),
        gpa: Gpa::new(0),
        size: 1 << 16,
        hva,
    })
    .unwrap();
    host.write_u64(hva, 1).unwrap();
    let pte = host.host_pte(hva).unwrap();
    host.arena().free(pte.pfn, pte.tag).unwrap();
    let stale_before = host.arena().stats().stale_accesses;
    host.munmap(hva, 1 << 16).unwrap();
    let s = vm.stats();
    assert_eq!(
        (s.mn_active_invalidate_count, s.invalidate.in_progress),
        (0, 0)
    );
    assert_eq!(host.arena().stats().stale_accesses, stale_before + 1);
    assert!(host.host_pte(hva).is_none());
}
