//! The conformance suite: one set of behavioural properties, run against every MMU kind
//! (`conformance!` instantiates each property for the TDP MMU and the shadow MMU). A property
//! that holds for one MMU must hold for the other: they differ in locking and data structures,
//! never in what the guest and the host observe.

mod common;

use common::*;
use kvmmu::prelude::*;

/// The MMU kinds the suite covers.
const KINDS: [MmuKind; 2] = [MmuKind::Tdp, MmuKind::Shadow];

fn cfg(mmu: MmuKind) -> VmConfig {
    VmConfig {
        mmu,
        ..VmConfig::default()
    }
}

/// Every page-table page (TDP tables or shadow pages) and descriptor freed at shutdown.
fn assert_balanced(s: &VmStats) {
    assert_eq!(s.tdp.tables_allocated, s.tdp.tables_freed, "{:?}", s.tdp);
    assert_eq!(
        s.shadow.pages_allocated, s.shadow.pages_freed,
        "{:?}",
        s.shadow
    );
    assert_eq!(s.shadow.rmap.live_descriptors(), 0, "{:?}", s.shadow);
    assert_eq!(s.invalidate.in_progress, 0);
}

/// Instantiates `$prop(mmu)` as one `#[test]` per MMU kind.
macro_rules! conformance {
    ($($prop:ident),* $(,)?) => {
        mod tdp {
            $(#[test] fn $prop() { super::$prop(kvmmu::prelude::MmuKind::Tdp); })*
        }
        mod shadow {
            $(#[test] fn $prop() { super::$prop(kvmmu::prelude::MmuKind::Shadow); })*
        }
    };
}

conformance!(
    writes_are_read_back_through_faults_tlb_and_after_reset,
    a_write_installs_a_writable_dirty_accessed_leaf_to_the_host_frame,
    munmap_zaps_and_a_new_mapping_reads_zero,
    mprotect_read_only_zaps_writes_and_refuses_them,
    aging_reports_young_once_and_test_young_clears_nothing,
    memslot_delete_zaps_and_recreate_maps_new_memory,
    memslot_move_keeps_data_at_the_new_address,
    readonly_memslot_refuses_writes,
);

#[test]
fn the_suite_covers_every_mmu_kind() {
    // A VM of each kind can be created and reports which MMU it runs.
    let host = HostMm::new(HostConfig { frames: 16 }).unwrap();
    for k in KINDS {
        let vm = Vm::new(&host, cfg(k)).unwrap();
        assert_eq!(vm.config().mmu, k);
    }
}

fn writes_are_read_back_through_faults_tlb_and_after_reset(mmu: MmuKind) {
    let f = fixture(64 * 4096, cfg(mmu));
    let mut v = f.vm.create_vcpu().unwrap();
    for p in 0..64 {
        v.write_u64(gpa(p), p * 3 + 1).unwrap();
    }
    for p in 0..64 {
        assert_eq!(v.read_u64(gpa(p)).unwrap(), p * 3 + 1, "TLB/walk, page {p}");
        assert_eq!(f.host.read_u64(hva_of(f.hva, p)).unwrap(), p * 3 + 1);
    }
    f.vm.reset_mmu();
    for p in 0..64 {
        assert_eq!(
            v.read_u64(gpa(p)).unwrap(),
            p * 3 + 1,
            "after reset, page {p}"
        );
    }
    assert!(
        v.stats().root_loads >= 2,
        "the reset made the vCPU load a new root"
    );
    drop(v);
    let s = f.vm.shutdown();
    match mmu {
        MmuKind::Tdp => assert_eq!(s.shadow.pages_allocated, 0),
        MmuKind::Shadow => {
            assert_eq!(s.tdp.tables_allocated, 0);
            assert!(s.shadow.faults >= 128, "{:?}", s.shadow);
        }
    }
    assert_balanced(&s);
}

fn a_write_installs_a_writable_dirty_accessed_leaf_to_the_host_frame(mmu: MmuKind) {
    let f = fixture(8 * 4096, cfg(mmu));
    let mut v = f.vm.create_vcpu().unwrap();
    v.read_u64(gpa(1)).unwrap();
    let (spte, level) =
        f.vm.spte(AsId::new(0), gpa(1).gfn())
            .expect("leaf after a read");
    assert_eq!(level, Level::L4K);
    assert!(spte.is_accessed() && !spte.is_dirty());
    v.write_u64(gpa(2), 9).unwrap();
    let (spte, _) =
        f.vm.spte(AsId::new(0), gpa(2).gfn())
            .expect("leaf after a write");
    assert!(spte.is_writable() && spte.is_dirty() && spte.is_accessed());
    let host = f.host.host_pte(hva_of(f.hva, 2)).unwrap();
    assert_eq!(spte.pfn(), host.pfn, "the leaf maps the host's frame");
    assert!(
        f.vm.spte(AsId::new(0), gpa(5).gfn()).is_none(),
        "untouched: no leaf"
    );
    drop(v);
    assert_balanced(&f.vm.shutdown());
}

fn munmap_zaps_and_a_new_mapping_reads_zero(mmu: MmuKind) {
    let f = fixture(16 * 4096, cfg(mmu));
    let mut v = f.vm.create_vcpu().unwrap();
    for p in 0..16 {
        v.write_u64(gpa(p), 7).unwrap();
    }
    let hole = hva_of(f.hva, 4);
    f.host.munmap(hole, 4 * 4096).unwrap();
    for p in 4..8 {
        assert!(
            f.vm.spte(AsId::new(0), gpa(p).gfn()).is_none(),
            "page {p} zapped"
        );
        assert!(matches!(
            v.read_u64(gpa(p)),
            Err(VcpuExit::HostFault { .. })
        ));
    }
    assert!(
        f.vm.spte(AsId::new(0), gpa(3).gfn()).is_some(),
        "outside the range: kept"
    );
    f.host
        .mmap_fixed(hole, 4 * 4096, Prot::READ | Prot::WRITE)
        .unwrap();
    for p in 4..8 {
        assert_eq!(v.read_u64(gpa(p)).unwrap(), 0, "fresh memory at page {p}");
    }
    assert_eq!(v.read_u64(gpa(3)).unwrap(), 7);
    drop(v);
    let s = f.vm.shutdown();
    assert!(s.invalidate.seq > 0);
    assert_balanced(&s);
    assert_eq!(f.host.arena().stats().stale_accesses, 0);
}

fn mprotect_read_only_zaps_writes_and_refuses_them(mmu: MmuKind) {
    let f = fixture(4 * 4096, cfg(mmu));
    let mut v = f.vm.create_vcpu().unwrap();
    v.write_u64(gpa(0), 1).unwrap();
    f.host.mprotect(f.hva, 4 * 4096, Prot::READ).unwrap();
    assert_eq!(v.read_u64(gpa(0)).unwrap(), 1);
    let (spte, _) = f.vm.spte(AsId::new(0), gpa(0).gfn()).unwrap();
    assert!(!spte.is_writable(), "re-faulted read-only");
    assert!(matches!(
        v.write_u64(gpa(0), 2),
        Err(VcpuExit::HostFault { .. })
    ));
    assert_eq!(f.host.read_u64(f.hva).unwrap(), 1, "the write did not land");
    f.host
        .mprotect(f.hva, 4 * 4096, Prot::READ | Prot::WRITE)
        .unwrap();
    v.write_u64(gpa(0), 3).unwrap();
    assert_eq!(f.host.read_u64(f.hva).unwrap(), 3);
    drop(v);
    assert_balanced(&f.vm.shutdown());
}

fn aging_reports_young_once_and_test_young_clears_nothing(mmu: MmuKind) {
    for aging in [AgingMode::Lockless, AgingMode::Locked] {
        let f = fixture(32 * 4096, VmConfig { aging, ..cfg(mmu) });
        let mut v = f.vm.create_vcpu().unwrap();
        for p in 0..32 {
            v.write_u64(gpa(p), p).unwrap();
        }
        assert!(f.host.clear_young(f.hva, f.bytes).unwrap(), "{aging:?}");
        assert!(!f.host.clear_young(f.hva, f.bytes).unwrap(), "{aging:?}");
        let s = f.vm.stats();
        assert_eq!(
            s.tdp.accessed_cleared + s.shadow.accessed_cleared,
            32,
            "{aging:?}: each SPTE aged once"
        );
        let mut fresh = f.vm.create_vcpu().unwrap(); // empty TLB: the walk sets Accessed
        fresh.read_u64(gpa(7)).unwrap();
        assert!(f.host.test_young(hva_of(f.hva, 7)).unwrap());
        assert!(
            f.host.test_young(hva_of(f.hva, 7)).unwrap(),
            "test_young clears nothing"
        );
        assert!(!f.host.test_young(hva_of(f.hva, 8)).unwrap());
        drop((v, fresh));
        let s = f.vm.shutdown();
        assert_eq!(
            s.tdp.leaves_zapped + s.shadow.leaves_zapped,
            32,
            "aging zapped nothing"
        );
        assert_balanced(&s);
    }
}

fn memslot_delete_zaps_and_recreate_maps_new_memory(mmu: MmuKind) {
    let f = fixture(8 * 4096, cfg(mmu));
    let mut v = f.vm.create_vcpu().unwrap();
    v.write_u64(gpa(2), 5).unwrap();
    f.vm.set_user_memory_region(region(0, BASE_GPA, 0, f.hva))
        .unwrap();
    assert!(
        f.vm.spte(AsId::new(0), gpa(2).gfn()).is_none(),
        "delete zapped the slot"
    );
    assert!(matches!(
        v.read_u64(gpa(2)),
        Err(VcpuExit::NoMemslot { .. })
    ));
    let other = f.host.mmap(8 * 4096, Prot::READ | Prot::WRITE).unwrap();
    f.host.write_u64(hva_of(other, 2), 77).unwrap();
    f.vm.set_user_memory_region(region(0, BASE_GPA, 8 * 4096, other))
        .unwrap();
    assert_eq!(v.read_u64(gpa(2)).unwrap(), 77, "the new slot's memory");
    drop(v);
    let s = f.vm.shutdown();
    assert_balanced(&s);
    assert_eq!(f.host.arena().stats().stale_accesses, 0);
}

fn memslot_move_keeps_data_at_the_new_address(mmu: MmuKind) {
    let f = fixture(8 * 4096, cfg(mmu));
    let mut v = f.vm.create_vcpu().unwrap();
    v.write_u64(gpa(1), 11).unwrap();
    let moved = BASE_GPA + (1 << 30);
    f.vm.set_user_memory_region(region(0, moved, 8 * 4096, f.hva))
        .unwrap();
    assert!(matches!(
        v.read_u64(gpa(1)),
        Err(VcpuExit::NoMemslot { .. })
    ));
    assert_eq!(v.read_u64(Gpa::new(moved + 4096)).unwrap(), 11);
    drop(v);
    assert_balanced(&f.vm.shutdown());
}

fn readonly_memslot_refuses_writes(mmu: MmuKind) {
    let host = HostMm::new(HostConfig { frames: 64 }).unwrap();
    let vm = Vm::new(&host, cfg(mmu)).unwrap();
    let hva = host.mmap(4 * 4096, Prot::READ | Prot::WRITE).unwrap();
    host.write_u64(hva, 42).unwrap();
    let mut r = region(0, BASE_GPA, 4 * 4096, hva);
    r.flags = MemFlags::READONLY;
    vm.set_user_memory_region(r).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    assert_eq!(v.read_u64(gpa(0)).unwrap(), 42);
    assert!(matches!(
        v.write_u64(gpa(0), 1),
        Err(VcpuExit::ReadonlyMemslot { .. })
    ));
    assert_eq!(host.read_u64(hva).unwrap(), 42);
    drop(v);
    assert_balanced(&vm.shutdown());
}
