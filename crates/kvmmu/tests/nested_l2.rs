//! An L2 guest end to end, on both L1 MMUs: L2 accesses go through EPT12 (built by L1 with
//! ordinary writes) and EPT02 (indirect shadow pages), and see exactly what L1 wrote; EPT12
//! changes (remap, protect, unmap, malformed entries) reach L2 through write tracking.

use kvmmu::prelude::*;

#[path = "common/nested_vm.rs"]
mod nested_vm;
use kvmmu::{EptExit, ViolationReason};
use kvmmu::{EptPerms, MisconfigReason};

const MIB: u64 = 1 << 20;
const POOL: u64 = 8 * MIB;
const DATA: u64 = MIB;
const L2A: u64 = 0x4000_0000;
const L2B: u64 = 0x8000_0000;
const PAGES: u64 = 16;

struct Setup {
    host: HostMm,
    vm: Vm,
    l1: Vcpu,
    l2: Vcpu,
    guest: NestedGuest,
    hva: Hva,
}

fn setup(mmu: MmuKind) -> Setup {
    let (host, vm, hva) = nested_vm::nested_vm(mmu, 8192);
    let mut l1 = vm.create_vcpu().unwrap();
    let mut guest = NestedGuest::new(&mut l1, Gpa::new(POOL), MIB).unwrap();
    // Two L2 ranges alias the same L1 pages: every L1 page has two indirect leaves.
    for l2 in [L2A, L2B] {
        guest
            .map(
                &mut l1,
                Gpa::new(l2),
                Gpa::new(DATA),
                PAGES * 4096,
                EptPerms::RW,
            )
            .unwrap();
    }
    let mut l2 = vm.create_vcpu().unwrap();
    l2.enter_l2(&guest).unwrap();
    Setup {
        host,
        vm,
        l1,
        l2,
        guest,
        hva,
    }
}

fn both() -> [MmuKind; 2] {
    [MmuKind::Tdp, MmuKind::Shadow]
}

#[test]
fn l2_reads_what_l1_wrote_and_l1_reads_what_l2_wrote() {
    for mmu in both() {
        let mut s = setup(mmu);
        for p in 0..PAGES {
            s.l1.write_u64(Gpa::new(DATA + p * 4096 + 8), 1000 + p)
                .unwrap();
        }
        for p in 0..PAGES {
            assert_eq!(
                s.l2.read_u64(Gpa::new(L2A + p * 4096 + 8)).unwrap(),
                1000 + p
            );
            s.l2.write_u64(Gpa::new(L2B + p * 4096 + 16), 2000 + p)
                .unwrap();
        }
        for p in 0..PAGES {
            assert_eq!(
                s.l1.read_u64(Gpa::new(DATA + p * 4096 + 16)).unwrap(),
                2000 + p
            );
            assert_eq!(
                s.l2.read_u64(Gpa::new(L2A + p * 4096 + 16)).unwrap(),
                2000 + p
            );
        }
        let st = s.vm.stats().shadow;
        assert!(st.indirect_shadow_pages >= 4, "{mmu:?}: {st:?}");
        assert!(st.nested_faults >= 2 * PAGES, "{mmu:?}: {st:?}");
        assert!(st.write_tracked_gfns >= 4, "{mmu:?}: {st:?}");
    }
}

#[test]
fn ept12_remap_protect_and_unmap_reach_l2_through_write_tracking() {
    for mmu in both() {
        let mut s = setup(mmu);
        let other = DATA + 2 * MIB;
        s.l1.write_u64(Gpa::new(DATA), 1).unwrap();
        s.l1.write_u64(Gpa::new(other), 2).unwrap();
        assert_eq!(s.l2.read_u64(Gpa::new(L2A)).unwrap(), 1);
        s.guest
            .remap(&mut s.l1, Gpa::new(L2A), Gpa::new(other), 4096)
            .unwrap();
        assert_eq!(
            s.l2.read_u64(Gpa::new(L2A)).unwrap(),
            2,
            "{mmu:?}: remap seen"
        );
        assert_eq!(
            s.l2.read_u64(Gpa::new(L2B)).unwrap(),
            1,
            "{mmu:?}: alias kept"
        );
        s.guest
            .protect(&mut s.l1, Gpa::new(L2B), 4096, EptPerms::R)
            .unwrap();
        assert!(matches!(
            s.l2.write_u64(Gpa::new(L2B), 9),
            Err(VcpuExit::Ept(EptExit::Violation {
                reason: ViolationReason::Permission { .. },
                write: true,
                ..
            }))
        ));
        assert_eq!(s.l2.read_u64(Gpa::new(L2B)).unwrap(), 1);
        s.guest.unmap(&mut s.l1, Gpa::new(L2B), 4096).unwrap();
        assert!(matches!(
            s.l2.read_u64(Gpa::new(L2B)),
            Err(VcpuExit::Ept(EptExit::Violation {
                reason: ViolationReason::NotPresent { level: 1 },
                ..
            }))
        ));
        s.guest.invept(&mut s.l1).unwrap();
        let st = s.vm.stats().shadow;
        assert!(st.mmu_pte_write + st.mmu_flooded > 0, "{mmu:?}: {st:?}");
    }
}

#[test]
fn malformed_ept12_entries_exit_to_l1_with_a_typed_reason() {
    for mmu in both() {
        let mut s = setup(mmu);
        let l2 = Gpa::new(L2A + 4096);
        assert_eq!(s.l2.read_u64(l2).unwrap(), 0);
        let leaf = s.guest.entry_gpa(l2, 1).unwrap();
        let good = s.l1.read_u64(leaf).unwrap();
        s.l1.write_u64(leaf, good | (1 << 60)).unwrap();
        assert!(matches!(
            s.l2.read_u64(l2),
            Err(VcpuExit::Ept(EptExit::Misconfig {
                level: 1,
                reason: MisconfigReason::ReservedBits(_),
                ..
            }))
        ));
        s.l1.write_u64(leaf, (good & !7) | 2).unwrap();
        assert!(matches!(
            s.l2.read_u64(l2),
            Err(VcpuExit::Ept(EptExit::Misconfig {
                reason: MisconfigReason::WriteWithoutRead,
                ..
            }))
        ));
        s.l1.write_u64(leaf, good).unwrap();
        assert_eq!(s.l2.read_u64(l2).unwrap(), 0);
        let l2e = s.guest.entry_gpa(l2, 2).unwrap();
        let link = s.l1.read_u64(l2e).unwrap();
        s.l1.write_u64(l2e, (1 << 40) | 7).unwrap();
        assert!(matches!(
            s.l2.read_u64(l2),
            Err(VcpuExit::Ept(EptExit::Misconfig {
                level: 2,
                reason: MisconfigReason::TableOutsideL1Memory,
                ..
            }))
        ));
        s.l1.write_u64(l2e, link).unwrap();
        assert_eq!(s.l2.read_u64(l2).unwrap(), 0);
        // A leaf pointing outside L1 memory is an access to no memslot (KVM: MMIO).
        s.l1.write_u64(leaf, (1 << 36) | 3).unwrap();
        assert!(matches!(s.l2.read_u64(l2), Err(VcpuExit::NoMemslot { .. })));
    }
}

#[test]
fn host_invalidation_of_an_l1_page_zaps_every_l2_mapping_of_it() {
    for mmu in both() {
        let mut s = setup(mmu);
        s.l1.write_u64(Gpa::new(DATA), 5).unwrap();
        assert_eq!(s.l2.read_u64(Gpa::new(L2A)).unwrap(), 5);
        assert_eq!(s.l2.read_u64(Gpa::new(L2B)).unwrap(), 5);
        let page = Hva::new(s.hva.raw() + DATA);
        s.host.madvise_dontneed(page, 4096).unwrap();
        assert_eq!(s.l2.read_u64(Gpa::new(L2A)).unwrap(), 0, "{mmu:?}");
        assert_eq!(s.l2.read_u64(Gpa::new(L2B)).unwrap(), 0, "{mmu:?}");
        s.l2.write_u64(Gpa::new(L2B), 6).unwrap();
        assert_eq!(s.l1.read_u64(Gpa::new(DATA)).unwrap(), 6);
        s.host.mprotect(page, 4096, Prot::READ).unwrap();
        assert!(matches!(
            s.l2.write_u64(Gpa::new(L2A), 7),
            Err(VcpuExit::HostFault { .. })
        ));
        assert_eq!(s.l2.read_u64(Gpa::new(L2A)).unwrap(), 6);
        s.host.munmap(page, 4096).unwrap();
        assert!(matches!(
            s.l2.read_u64(Gpa::new(L2A)),
            Err(VcpuExit::HostFault { .. })
        ));
    }
}

#[test]
fn teardown_frees_every_indirect_page() {
    for mmu in both() {
        let mut s = setup(mmu);
        assert_eq!(s.l2.read_u64(Gpa::new(L2A)).unwrap(), 0);
        drop((s.l1, s.l2));
        let st = s.vm.shutdown().shadow;
        assert_eq!(st.pages_allocated, st.pages_freed, "{mmu:?}: {st:?}");
        assert_eq!(st.indirect_shadow_pages, 0);
        drop(s.guest);
        drop(s.host);
    }
}

#[test]
fn with_tdp_for_l1_shadow_rmaps_are_aged_only_while_indirect_pages_exist() {
    let mut s = setup(MmuKind::Tdp);
    let page = Hva::new(s.hva.raw() + DATA);
    // Aging before any indirect page: the rmap walk is skipped.
    let walks = |s: &Setup| s.vm.stats().shadow.rmap_age_walks;
    s.host.clear_young(page, 4096).unwrap();
    assert_eq!(walks(&s), 0, "no indirect page yet: shadow rmaps skipped");
    assert_eq!(s.l2.read_u64(Gpa::new(L2A)).unwrap(), 0);
    assert!(s.vm.stats().shadow.indirect_shadow_pages > 0);
    assert!(
        s.host.clear_young(page, 4096).unwrap(),
        "the indirect leaf was young"
    );
    assert_eq!(walks(&s), 1, "indirect pages exist: shadow rmaps aged");
    // test_young: TDP says young (L1 touched the page) → the shadow MMU is not asked.
    s.l1.write_u64(Gpa::new(DATA), 1).unwrap();
    assert!(s.host.test_young(page).unwrap());
    assert_eq!(
        walks(&s),
        1,
        "test_young skipped the shadow MMU when TDP said young"
    );
    // Drop the last indirect page (a reset zaps them): the walk is skipped again.
    s.vm.reset_mmu();
    assert_eq!(s.vm.stats().shadow.indirect_shadow_pages, 0);
    s.host.clear_young(page, 4096).unwrap();
    assert!(!s.host.test_young(page).unwrap());
    assert_eq!(walks(&s), 1, "no indirect page left: shadow rmaps skipped");
}

#[test]
fn several_l2_addresses_of_one_l1_page_share_its_rmap_chain() {
    for mmu in both() {
        let mut s = setup(mmu);
        assert_eq!(s.l2.read_u64(Gpa::new(L2A)).unwrap(), 0);
        assert_eq!(s.l2.read_u64(Gpa::new(L2B)).unwrap(), 0);
        let len = s.vm.rmap_len(AsId::new(0), Gfn::new(DATA >> 12));
        // Two indirect leaves, plus L1's own leaf with the shadow MMU for L1.
        let want = if mmu == MmuKind::Shadow { 2..=3 } else { 2..=2 };
        assert!(
            want.contains(&len),
            "{mmu:?}: rmap of the L1 page holds {len}"
        );
    }
}

#[test]
fn l2_writes_are_logged_in_the_l1_slot_dirty_bitmap() {
    for mmu in both() {
        let mut s = setup(mmu);
        // A second L1 slot with dirty logging, mapped into L2.
        let hva = s.host.mmap(PAGES * 4096, Prot::READ | Prot::WRITE).unwrap();
        s.vm.set_user_memory_region(MemoryRegion {
            slot: SlotId::new(1),
            as_id: AsId::new(0),
            flags: MemFlags::LOG_DIRTY_PAGES,
            gpa: Gpa::new(32 * MIB),
            size: PAGES * 4096,
            hva,
        })
        .unwrap();
        let l2 = 0x9000_0000u64;
        s.guest
            .map(
                &mut s.l1,
                Gpa::new(l2),
                Gpa::new(32 * MIB),
                PAGES * 4096,
                EptPerms::RW,
            )
            .unwrap();
        let log = |s: &Setup| s.vm.get_dirty_log(AsId::new(0), SlotId::new(1)).unwrap();
        let _ = log(&s);
        // A read first (maps the page), then writes: each round's writes are logged.
        for round in 0..3u64 {
            for p in 0..4u64 {
                let want = if round == 0 { 0 } else { round - 1 + 100 };
                assert_eq!(s.l2.read_u64(Gpa::new(l2 + p * 4096)).unwrap(), want);
            }
            s.l2.write_u64(Gpa::new(l2 + 2 * 4096), round + 100)
                .unwrap();
            for p in [0u64, 1, 3] {
                s.l2.write_u64(Gpa::new(l2 + p * 4096), round + 100)
                    .unwrap();
            }
            let bits = log(&s);
            assert_eq!(
                bits[0] & 0xF,
                0xF,
                "{mmu:?} round {round}: every written page logged"
            );
        }
    }
}

#[test]
fn a_table_written_again_and_again_is_zapped_as_flooded_and_l2_stays_correct() {
    for mmu in both() {
        let mut s = setup(mmu);
        assert_eq!(s.l2.read_u64(Gpa::new(L2A)).unwrap(), 0);
        let before = s.vm.stats().shadow;
        // Rewrite one leaf entry many times with no L2 fault in between.
        for _ in 0..8 {
            s.guest
                .protect(&mut s.l1, Gpa::new(L2A), 4096, EptPerms::R)
                .unwrap();
            s.guest
                .protect(&mut s.l1, Gpa::new(L2A), 4096, EptPerms::RW)
                .unwrap();
        }
        let after = s.vm.stats().shadow;
        assert!(after.mmu_flooded > before.mmu_flooded, "{mmu:?}: {after:?}");
        assert!(
            after.mmu_pte_write > before.mmu_pte_write,
            "{mmu:?}: {after:?}"
        );
        s.l1.write_u64(Gpa::new(DATA), 77).unwrap();
        assert_eq!(s.l2.read_u64(Gpa::new(L2A)).unwrap(), 77);
        s.l2.write_u64(Gpa::new(L2A), 78).unwrap();
        assert_eq!(s.l2.read_u64(Gpa::new(L2B)).unwrap(), 78);
    }
}

#[test]
fn l1_maps_pages_next_to_a_guest_table_with_4k_leaves_only() {
    for mmu in both() {
        let host = HostMm::new(HostConfig { frames: 8192 }).unwrap();
        let vm = Vm::new(
            &host,
            VmConfig {
                mmu,
                ..VmConfig::default()
            },
        )
        .unwrap();
        vm.enable_nested().unwrap();
        let hva = host
            .mmap_backed(8 * MIB, Prot::READ | Prot::WRITE, BackingSrc::AnonymousThp)
            .unwrap();
        vm.set_user_memory_region(MemoryRegion {
            slot: SlotId::new(0),
            as_id: AsId::new(0),
            flags: MemFlags::empty(),
            gpa: Gpa::new(0),
            size: 8 * MIB,
            hva,
        })
        .unwrap();
        let mut l1 = vm.create_vcpu().unwrap();
        // The pool is the first 64 KiB of the first 2 MiB; L1 data sits in the same 2 MiB.
        let mut g = NestedGuest::new(&mut l1, Gpa::new(0), 64 << 10).unwrap();
        g.map(&mut l1, Gpa::new(0), Gpa::new(MIB), 4096, EptPerms::RW)
            .unwrap();
        let mut l2 = vm.create_vcpu().unwrap();
        l2.enter_l2(&g).unwrap();
        assert_eq!(l2.read_u64(Gpa::new(0)).unwrap(), 0);
        l1.write_u64(Gpa::new(MIB + 8), 1).unwrap();
        l1.write_u64(Gpa::new(4 * MIB), 1).unwrap();
        let level = |gpa: u64| vm.spte(AsId::new(0), Gpa::new(gpa).gfn()).map(|(_, l)| l);
        assert_eq!(
            level(4 * MIB),
            Some(Level::L2M),
            "{mmu:?}: THP backing maps huge elsewhere"
        );
        assert_eq!(
            level(MIB),
            Some(Level::L4K),
            "{mmu:?}: no huge leaf over a tracked table"
        );
        // The table pages themselves are mapped read-only (or not at all).
        if let Some((spte, _)) = vm.spte(AsId::new(0), Gfn::new(0)) {
            assert!(
                !spte.is_writable(),
                "{mmu:?}: a tracked table is never writable"
            );
        }
        drop((l1, l2));
    }
}

#[test]
fn deleting_the_memslot_of_the_guest_tables_drops_every_translation_derived_from_them() {
    for mmu in both() {
        // The tables in their own slot this time.
        let host = HostMm::new(HostConfig { frames: 4096 }).unwrap();
        let vm = Vm::new(
            &host,
            VmConfig {
                mmu,
                ..VmConfig::default()
            },
        )
        .unwrap();
        vm.enable_nested().unwrap();
        let region = |slot: u16, gpa: u64, size: u64, hva: Hva| MemoryRegion {
            slot: SlotId::new(slot),
            as_id: AsId::new(0),
            flags: MemFlags::empty(),
            gpa: Gpa::new(gpa),
            size,
            hva,
        };
        let tables = host.mmap(MIB, Prot::READ | Prot::WRITE).unwrap();
        let data = host.mmap(MIB, Prot::READ | Prot::WRITE).unwrap();
        vm.set_user_memory_region(region(0, 0, MIB, tables))
            .unwrap();
        vm.set_user_memory_region(region(1, 4 * MIB, MIB, data))
            .unwrap();
        let mut l1 = vm.create_vcpu().unwrap();
        let mut g = NestedGuest::new(&mut l1, Gpa::new(0), MIB).unwrap();
        g.map(&mut l1, Gpa::new(0), Gpa::new(4 * MIB), 4096, EptPerms::RW)
            .unwrap();
        l1.write_u64(Gpa::new(4 * MIB), 3).unwrap();
        let mut l2 = vm.create_vcpu().unwrap();
        l2.enter_l2(&g).unwrap();
        assert_eq!(l2.read_u64(Gpa::new(0)).unwrap(), 3);
        vm.set_user_memory_region(region(0, 0, 0, tables)).unwrap();
        assert_eq!(vm.stats().shadow.indirect_shadow_pages, 0, "{mmu:?}");
        assert!(
            matches!(
                l2.read_u64(Gpa::new(0)),
                Err(VcpuExit::Ept(EptExit::Misconfig {
                    level: 4,
                    reason: MisconfigReason::TableOutsideL1Memory,
                    ..
                }))
            ),
            "{mmu:?}: no translation survives its tables"
        );
        // Fresh (zero) memory where the tables were: nothing is mapped.
        let fresh = host.mmap(MIB, Prot::READ | Prot::WRITE).unwrap();
        vm.set_user_memory_region(region(0, 0, MIB, fresh)).unwrap();
        assert!(matches!(
            l2.read_u64(Gpa::new(0)),
            Err(VcpuExit::Ept(EptExit::Violation {
                reason: ViolationReason::NotPresent { level: 4 },
                ..
            }))
        ));
        drop((l1, l2));
    }
}

#[test]
fn the_walker_setting_accessed_in_a_guest_table_dirties_the_table_page() {
    for mmu in both() {
        let host = HostMm::new(HostConfig { frames: 4096 }).unwrap();
        let vm = Vm::new(
            &host,
            VmConfig {
                mmu,
                ..VmConfig::default()
            },
        )
        .unwrap();
        vm.enable_nested().unwrap();
        let hva = host.mmap(4 * MIB, Prot::READ | Prot::WRITE).unwrap();
        vm.set_user_memory_region(MemoryRegion {
            slot: SlotId::new(0),
            as_id: AsId::new(0),
            flags: MemFlags::LOG_DIRTY_PAGES,
            gpa: Gpa::new(0),
            size: 4 * MIB,
            hva,
        })
        .unwrap();
        let mut l1 = vm.create_vcpu().unwrap();
        let mut g = NestedGuest::new(&mut l1, Gpa::new(0), MIB).unwrap();
        g.map(&mut l1, Gpa::new(0), Gpa::new(2 * MIB), 4096, EptPerms::R)
            .unwrap();
        let _ = vm.get_dirty_log(AsId::new(0), SlotId::new(0)).unwrap();
        let mut l2 = vm.create_vcpu().unwrap();
        l2.enter_l2(&g).unwrap();
        assert_eq!(l2.read_u64(Gpa::new(0)).unwrap(), 0);
        let bits = vm.get_dirty_log(AsId::new(0), SlotId::new(0)).unwrap();
        // The four tables (pool pages 0..4) had their A bits set by the walk.
        assert_eq!(bits[0] & 0xF, 0xF, "{mmu:?}: {:#x}", bits[0]);
        drop((l1, l2));
    }
}
