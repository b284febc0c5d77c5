//! The L1 builder API: EPT12 tables land in L1 memory through ordinary vCPU writes, and misuse
//! is refused with a typed error that writes nothing.

use kvmmu::prelude::*;

#[path = "common/nested_vm.rs"]
mod nested_vm;
use kvmmu::{Ept12Entry, EptPerms};

const MIB: u64 = 1 << 20;
const POOL: u64 = 8 * MIB;

fn setup(mmu: MmuKind) -> (HostMm, Vm, Vcpu) {
    let (host, vm, _hva) = nested_vm::nested_vm(mmu, 8192);
    let vcpu = vm.create_vcpu().unwrap();
    (host, vm, vcpu)
}

/// Every word of L1 memory the builder may touch: the table pool.
fn pool_words(vcpu: &mut Vcpu, g: &NestedGuest) -> Vec<u64> {
    let (start, pages) = g.pool();
    let base = start.raw() << 12;
    (0..pages * 512)
        .map(|i| vcpu.read_u64(Gpa::new(base + 8 * i)).unwrap())
        .collect()
}

#[test]
fn map_writes_leaf_entries_into_l1_memory() {
    for mmu in [MmuKind::Tdp, MmuKind::Shadow] {
        let (_h, _vm, mut v) = setup(mmu);
        let mut g = NestedGuest::new(&mut v, Gpa::new(POOL), MIB).unwrap();
        g.map(
            &mut v,
            Gpa::new(0x4000_0000),
            Gpa::new(0x3000),
            3 * 4096,
            EptPerms::RW,
        )
        .unwrap();
        assert_eq!(g.mapped_pages(), 3);
        assert_eq!(g.table_pages(), 4, "root + one table per lower level");
        for i in 0..3u64 {
            let l2 = Gpa::new(0x4000_0000 + i * 4096);
            let at = g.entry_gpa(l2, 1).unwrap();
            let e = Ept12Entry::from_raw(v.read_u64(at).unwrap());
            assert_eq!(e.l1_gfn(), 3 + i);
            assert_eq!(e.perms(), EptPerms::RW);
            assert_eq!(
                g.translate(l2),
                Some((Gpa::new(0x3000 + i * 4096), EptPerms::RW))
            );
        }
        // The root links the level-3 table.
        let root = Ept12Entry::from_raw(
            v.read_u64(g.entry_gpa(Gpa::new(0x4000_0000), 4).unwrap())
                .unwrap(),
        );
        assert!(root.is_present());
        g.protect(&mut v, Gpa::new(0x4000_1000), 4096, EptPerms::R)
            .unwrap();
        let e = Ept12Entry::from_raw(
            v.read_u64(g.entry_gpa(Gpa::new(0x4000_1000), 1).unwrap())
                .unwrap(),
        );
        assert_eq!((e.l1_gfn(), e.perms()), (4, EptPerms::R));
        g.remap(&mut v, Gpa::new(0x4000_1000), Gpa::new(0x9000), 4096)
            .unwrap();
        let e = Ept12Entry::from_raw(
            v.read_u64(g.entry_gpa(Gpa::new(0x4000_1000), 1).unwrap())
                .unwrap(),
        );
        assert_eq!((e.l1_gfn(), e.perms()), (9, EptPerms::R));
        g.unmap(&mut v, Gpa::new(0x4000_0000), 3 * 4096).unwrap();
        assert_eq!(g.mapped_pages(), 0);
        let e = Ept12Entry::from_raw(
            v.read_u64(g.entry_gpa(Gpa::new(0x4000_0000), 1).unwrap())
                .unwrap(),
        );
        assert!(!e.is_present());
        g.invept(&mut v).unwrap();
    }
}

#[test]
fn builder_misuse_is_refused_with_a_typed_error_and_writes_nothing() {
    let (_h, vm, mut v) = setup(MmuKind::Tdp);
    let mut g = NestedGuest::new(&mut v, Gpa::new(POOL), 4 * 4096).unwrap();
    g.map(&mut v, Gpa::new(0), Gpa::new(0x10000), 4096, EptPerms::RWX)
        .unwrap();
    let before = pool_words(&mut v, &g);
    let (mapped, tables) = (g.mapped_pages(), g.table_pages());
    let l2 = Gpa::new(0x20_0000);
    let cases: Vec<(NestedError, Result<(), NestedError>)> = vec![
        (
            NestedError::Unaligned {
                what: "L2 address",
                value: 0x20_0008,
            },
            g.map(&mut v, Gpa::new(0x20_0008), Gpa::new(0), 4096, EptPerms::R),
        ),
        (
            NestedError::Unaligned {
                what: "L1 address",
                value: 0x10,
            },
            g.map(&mut v, l2, Gpa::new(0x10), 4096, EptPerms::R),
        ),
        (
            NestedError::Unaligned {
                what: "length",
                value: 100,
            },
            g.map(&mut v, l2, Gpa::new(0), 100, EptPerms::R),
        ),
        (
            NestedError::EmptyRange,
            g.map(&mut v, l2, Gpa::new(0), 0, EptPerms::R),
        ),
        (
            NestedError::L2OutOfRange {
                l2: Gpa::new(1 << 48),
                len: 4096,
            },
            g.map(&mut v, Gpa::new(1 << 48), Gpa::new(0), 4096, EptPerms::R),
        ),
        (
            NestedError::NotL1Memory {
                l1: Gpa::new(16 * MIB - 4096),
                len: 8192,
            },
            g.map(&mut v, l2, Gpa::new(16 * MIB - 4096), 8192, EptPerms::R),
        ),
        (
            NestedError::MapsTablePool,
            g.map(&mut v, l2, Gpa::new(POOL), 4096, EptPerms::R),
        ),
        (
            NestedError::Overlap { l2: Gpa::new(0) },
            g.map(&mut v, Gpa::new(0), Gpa::new(0x20000), 4096, EptPerms::R),
        ),
        (
            NestedError::BadPerms(EptPerms::from_bits_truncate(2)),
            g.map(
                &mut v,
                l2,
                Gpa::new(0),
                4096,
                EptPerms::from_bits_truncate(2),
            ),
        ),
        (
            NestedError::BadPerms(EptPerms::NONE),
            g.map(&mut v, l2, Gpa::new(0), 4096, EptPerms::NONE),
        ),
        (
            // Three new tables are needed below a new level-3 entry; one pool page is left.
            NestedError::PoolExhausted { needed: 3, free: 0 },
            g.map(&mut v, Gpa::new(1 << 39), Gpa::new(0), 4096, EptPerms::R),
        ),
        (
            NestedError::NotMapped {
                l2: Gpa::new(0x1000),
            },
            g.unmap(&mut v, Gpa::new(0), 8192),
        ),
        (
            NestedError::NotMapped { l2 },
            g.protect(&mut v, l2, 4096, EptPerms::R),
        ),
        (
            NestedError::BadPerms(EptPerms::NONE),
            g.protect(&mut v, Gpa::new(0), 4096, EptPerms::NONE),
        ),
        (
            NestedError::NotL1Memory {
                l1: Gpa::new(1 << 40),
                len: 4096,
            },
            g.remap(&mut v, Gpa::new(0), Gpa::new(1 << 40), 4096),
        ),
    ];
    for (want, got) in cases {
        assert_eq!(got, Err(want.clone()), "expected {want}");
    }
    let other = Vm::new(
        &HostMm::new(HostConfig { frames: 64 }).unwrap(),
        VmConfig::default(),
    )
    .unwrap();
    let mut foreign = other.create_vcpu().unwrap();
    assert_eq!(
        g.map(&mut foreign, l2, Gpa::new(0), 4096, EptPerms::R),
        Err(NestedError::ForeignVcpu)
    );
    v.enter_l2(&g).unwrap();
    assert_eq!(
        g.map(&mut v, l2, Gpa::new(0), 4096, EptPerms::R),
        Err(NestedError::VcpuInL2)
    );
    v.leave_l2();
    assert_eq!((g.mapped_pages(), g.table_pages()), (mapped, tables));
    assert_eq!(
        pool_words(&mut v, &g),
        before,
        "a refused request wrote nothing"
    );
    drop(vm);
}

#[test]
fn a_pool_outside_l1_memory_is_refused() {
    let (_h, _vm, mut v) = setup(MmuKind::Shadow);
    assert_eq!(
        NestedGuest::new(&mut v, Gpa::new(16 * MIB), 4096).unwrap_err(),
        NestedError::NotL1Memory {
            l1: Gpa::new(16 * MIB),
            len: 4096
        }
    );
    assert!(matches!(
        NestedGuest::new(&mut v, Gpa::new(0x800), 4096),
        Err(NestedError::Unaligned { .. })
    ));
}

#[test]
fn nesting_must_be_enabled_before_memslots_on_a_tdp_vm() {
    let host = HostMm::new(HostConfig { frames: 1024 }).unwrap();
    let vm = Vm::new(&host, VmConfig::default()).unwrap();
    let hva = host.mmap(MIB, Prot::READ | Prot::WRITE).unwrap();
    vm.set_user_memory_region(MemoryRegion {
        slot: SlotId::new(0),
        as_id: AsId::new(0),
        flags: MemFlags::empty(),
        gpa: Gpa::new(0),
        size: MIB,
        hva,
    })
    .unwrap();
    assert!(matches!(
        vm.enable_nested(),
        Err(VmError::NestedAfterMemslots)
    ));
    let mut v = vm.create_vcpu().unwrap();
    assert_eq!(
        NestedGuest::new(&mut v, Gpa::new(0), 4096).unwrap_err(),
        NestedError::NestedNotEnabled
    );
}

#[test]
fn invept_from_a_thread_in_guest_mode_is_refused_and_does_nothing() {
    let (_h, vm, mut v) = setup(MmuKind::Tdp);
    let g = NestedGuest::new(&mut v, Gpa::new(POOL), MIB).unwrap();
    let mut other = vm.create_vcpu().unwrap();
    let flushes = vm.stats().remote_tlb_flush;
    let guest = other.enter();
    assert!(matches!(
        g.invept(&mut v),
        Err(NestedError::Vcpu(VcpuExit::InGuestMode(_)))
    ));
    drop(guest);
    assert_eq!(vm.stats().remote_tlb_flush, flushes);
    g.invept(&mut v).unwrap();
    assert_eq!(vm.stats().remote_tlb_flush, flushes + 1);
}
