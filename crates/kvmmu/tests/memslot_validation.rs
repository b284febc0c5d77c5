//! `set_user_memory_region` validation and classification, as `__kvm_set_memory_region` decides
//! them: one test per rejection cause, the five outcomes, and the aliasing and overlap rules.

use std::sync::Arc;

use kvmmu::internals::addr::{AsId, Gfn, GfnRange, Gpa, Hva, PAGE_SIZE, SlotId};
use kvmmu::internals::vm::memslot::{
    KVM_MEM_MAX_NR_PAGES, MemFlags, MemoryRegion, MemslotChange, MemslotError, Memslots, SizeLimit,
    plan_change,
};

const HVA: u64 = 0x7f00_0000_0000;
const MIB: u64 = 1 << 20;

/// Two address spaces, as on x86 (normal + SMM).
struct Vm {
    sets: Vec<Memslots>,
}

impl Vm {
    fn new() -> Vm {
        Vm {
            sets: vec![Memslots::new(AsId::new(0)), Memslots::new(AsId::new(1))],
        }
    }

    fn plan(&self, req: MemoryRegion) -> Result<MemslotChange, MemslotError> {
        let sets: Vec<&Memslots> = self.sets.iter().collect();
        plan_change(&sets, &req)
    }

    /// Plans and applies `req` the way the VM does, bumping the generation by the number of
    /// address spaces.
    fn set(&mut self, req: MemoryRegion) -> Result<MemslotChange, MemslotError> {
        let change = self.plan(req)?;
        let set = &self.sets[req.as_id.index()];
        let generation = set.generation() + 2;
        let next = match &change {
            MemslotChange::Create { new } => {
                set.with_change(None, Some(Arc::new(clone_slot(new))), generation)
            }
            MemslotChange::Delete { old } => set.with_change(Some(old), None, generation),
            MemslotChange::Move { old, new } | MemslotChange::FlagsOnly { old, new } => {
                set.with_change(Some(old), Some(Arc::new(clone_slot(new))), generation)
            }
            MemslotChange::Unchanged => return Ok(change),
        };
        self.sets[req.as_id.index()] = next;
        Ok(change)
    }
}

/// A `Memslot` is not `Clone` (it is shared through `Arc`); rebuild it through the public API.
fn clone_slot(
    s: &kvmmu::internals::vm::memslot::Memslot,
) -> kvmmu::internals::vm::memslot::Memslot {
    let set = Memslots::new(s.as_id());
    let req = MemoryRegion {
        slot: s.id(),
        as_id: s.as_id(),
        flags: s.flags(),
        gpa: s.base_gfn().gpa().expect("slot gpa fits"),
        size: s.npages() * PAGE_SIZE,
        hva: s.userspace_addr(),
    };
    let sets: Vec<&Memslots> = if s.as_id().get() == 0 {
        vec![&set]
    } else {
        vec![&set, &set]
    };
    match plan_change(&sets, &req) {
        Ok(MemslotChange::Create { new }) => new,
        other => panic!("rebuilding a valid slot must plan a create, got {other:?}"),
    }
}

fn region(slot: u16, gpa: u64, size: u64, hva: u64) -> MemoryRegion {
    MemoryRegion {
        slot: SlotId::new(slot),
        as_id: AsId::new(0),
        flags: MemFlags::empty(),
        gpa: Gpa::new(gpa),
        size,
        hva: Hva::new(hva),
    }
}

fn err(vm: &Vm, req: MemoryRegion) -> MemslotError {
    match vm.plan(req) {
        Err(e) => e,
        Ok(change) => panic!("expected a rejection, got {change:?}"),
    }
}

// ---- one test per rejection cause ----

#[test]
fn unknown_flags_are_rejected_with_only_the_unknown_bits() {
    let mut req = region(0, 0, MIB, HVA);
    req.flags = MemFlags::from_bits_retain(0x1 | 0x4 | 0x100);
    assert_eq!(
        err(&Vm::new(), req),
        MemslotError::UnknownFlags { bits: 0x104 }
    );
}

#[test]
fn unaligned_size_is_rejected() {
    let req = region(0, 0, MIB + 1, HVA);
    assert_eq!(
        err(&Vm::new(), req),
        MemslotError::UnalignedSize { size: MIB + 1 }
    );
}

#[test]
fn unaligned_gpa_is_rejected() {
    let req = region(0, 0x1800, MIB, HVA);
    assert_eq!(
        err(&Vm::new(), req),
        MemslotError::UnalignedGpa {
            gpa: Gpa::new(0x1800)
        }
    );
}

#[test]
fn unaligned_hva_is_rejected() {
    let req = region(0, 0, MIB, HVA + 8);
    assert_eq!(
        err(&Vm::new(), req),
        MemslotError::UnalignedHva {
            hva: Hva::new(HVA + 8)
        }
    );
}

#[test]
fn hva_end_overflow_is_rejected() {
    let hva = u64::MAX - (PAGE_SIZE - 1);
    let req = region(0, 0, 2 * PAGE_SIZE, hva);
    assert_eq!(
        err(&Vm::new(), req),
        MemslotError::SizeOverflow {
            gpa: Gpa::new(0),
            hva: Hva::new(hva),
            size: 2 * PAGE_SIZE,
            limit: SizeLimit::HvaEnd
        }
    );
}

#[test]
fn hva_range_above_the_user_address_space_is_rejected_even_for_a_delete() {
    // KVM's access_ok(hva, size): found by the real-KVM differential test (crates/kvmmu-kvm).
    let vm = Vm::new();
    let end = kvmmu::internals::vm::memslot::USER_ADDR_END;
    assert!(matches!(
        vm.plan(region(0, 0, PAGE_SIZE, end - PAGE_SIZE)),
        Ok(MemslotChange::Create { .. })
    ));
    for (size, hva) in [
        (PAGE_SIZE, end),
        (2 * PAGE_SIZE, end - PAGE_SIZE),
        (0, u64::MAX - 4095),
    ] {
        assert!(matches!(
            err(&vm, region(0, 0, size, hva)),
            MemslotError::SizeOverflow {
                limit: SizeLimit::HvaEnd,
                ..
            }
        ));
    }
}

#[test]
fn slot_past_the_largest_mappable_gfn_is_rejected_on_create() {
    // x86's kvm_arch_prepare_memory_region: last gfn <= kvm_mmu_max_gfn() (48-bit here).
    let vm = Vm::new();
    let end = 1u64 << 48;
    assert!(matches!(
        vm.plan(region(0, end - PAGE_SIZE, PAGE_SIZE, HVA)),
        Ok(MemslotChange::Create { .. })
    ));
    assert!(matches!(
        err(&vm, region(0, end - PAGE_SIZE, 2 * PAGE_SIZE, HVA)),
        MemslotError::SizeOverflow {
            limit: SizeLimit::MaxGfn,
            ..
        }
    ));
}

#[test]
fn moving_a_slot_past_the_largest_mappable_gfn_is_rejected() {
    let mut vm = Vm::new();
    vm.set(region(0, 0, 2 * PAGE_SIZE, HVA)).expect("create");
    assert!(matches!(
        err(&vm, region(0, (1u64 << 48) - PAGE_SIZE, 2 * PAGE_SIZE, HVA)),
        MemslotError::SizeOverflow {
            limit: SizeLimit::MaxGfn,
            ..
        }
    ));
}

#[test]
fn gpa_end_overflow_is_rejected() {
    let gpa = u64::MAX - (PAGE_SIZE - 1);
    let req = region(0, gpa, 2 * PAGE_SIZE, HVA);
    assert!(matches!(
        err(&Vm::new(), req),
        MemslotError::SizeOverflow { limit: SizeLimit::GpaEnd, gpa: g, .. } if g == Gpa::new(gpa)
    ));
}

#[test]
fn more_than_max_pages_is_rejected_and_exactly_max_is_accepted() {
    let vm = Vm::new();
    let too_big = (KVM_MEM_MAX_NR_PAGES + 1) * PAGE_SIZE;
    assert!(matches!(
        err(&vm, region(0, 0, too_big, 1 << 40)),
        MemslotError::SizeOverflow { limit: SizeLimit::MaxPages, size, .. } if size == too_big
    ));
    let max = KVM_MEM_MAX_NR_PAGES * PAGE_SIZE;
    // 8 TiB of host range: it must start low to end inside the user address space.
    assert!(matches!(
        vm.plan(region(0, 0, max, 1 << 40)),
        Ok(MemslotChange::Create { .. })
    ));
}

#[test]
fn slot_id_out_of_range_is_rejected_and_the_last_id_is_accepted() {
    let vm = Vm::new();
    let max = SlotId::new(SlotId::MAX);
    assert_eq!(
        err(&vm, region(SlotId::MAX, 0, MIB, HVA)),
        MemslotError::SlotIdOutOfRange { slot: max }
    );
    assert!(matches!(
        vm.plan(region(SlotId::MAX - 1, 0, MIB, HVA)),
        Ok(MemslotChange::Create { .. })
    ));
}

#[test]
fn as_id_out_of_range_is_rejected() {
    let mut req = region(0, 0, MIB, HVA);
    req.as_id = AsId::new(2);
    assert_eq!(
        err(&Vm::new(), req),
        MemslotError::AsIdOutOfRange {
            as_id: AsId::new(2),
            nr_address_spaces: 2
        }
    );
}

#[test]
fn overlapping_gfns_in_one_address_space_are_rejected() {
    let mut vm = Vm::new();
    vm.set(region(0, 0, 16 * PAGE_SIZE, HVA))
        .expect("first slot");
    // Last page of slot 0 overlaps.
    let req = region(1, 15 * PAGE_SIZE, 4 * PAGE_SIZE, HVA + MIB);
    assert_eq!(
        err(&vm, req),
        MemslotError::Overlap {
            slot: SlotId::new(1),
            with: SlotId::new(0)
        }
    );
    // Covering slot 0 entirely also overlaps.
    let req = region(1, 0, MIB, HVA + MIB);
    assert_eq!(
        err(&vm, req),
        MemslotError::Overlap {
            slot: SlotId::new(1),
            with: SlotId::new(0)
        }
    );
    // Adjacent is fine.
    assert!(matches!(
        vm.plan(region(1, 16 * PAGE_SIZE, 4 * PAGE_SIZE, HVA + MIB)),
        Ok(MemslotChange::Create { .. })
    ));
}

#[test]
fn changing_the_size_of_a_slot_is_rejected() {
    let mut vm = Vm::new();
    vm.set(region(0, 0, MIB, HVA)).expect("slot");
    assert_eq!(
        err(&vm, region(0, 0, 2 * MIB, HVA)),
        MemslotError::ChangeSize {
            slot: SlotId::new(0),
            old_size: MIB,
            new_size: 2 * MIB
        }
    );
}

#[test]
fn changing_the_hva_of_a_slot_is_rejected() {
    let mut vm = Vm::new();
    vm.set(region(0, 0, MIB, HVA)).expect("slot");
    assert_eq!(
        err(&vm, region(0, 0, MIB, HVA + MIB)),
        MemslotError::ChangeHva {
            slot: SlotId::new(0),
            old: Hva::new(HVA),
            new: Hva::new(HVA + MIB)
        }
    );
}

#[test]
fn changing_readonly_is_rejected_both_ways() {
    let mut vm = Vm::new();
    vm.set(region(0, 0, MIB, HVA)).expect("slot");
    let mut req = region(0, 0, MIB, HVA);
    req.flags = MemFlags::READONLY;
    assert_eq!(
        err(&vm, req),
        MemslotError::ChangeReadonly {
            slot: SlotId::new(0),
            old: MemFlags::empty(),
            new: MemFlags::READONLY
        }
    );
    let mut ro = region(1, 2 * MIB, MIB, HVA);
    ro.flags = MemFlags::READONLY;
    vm.set(ro).expect("read-only slot");
    ro.flags = MemFlags::LOG_DIRTY_PAGES;
    assert!(matches!(err(&vm, ro), MemslotError::ChangeReadonly { .. }));
}

#[test]
fn deleting_a_nonexistent_slot_is_rejected() {
    let mut vm = Vm::new();
    vm.set(region(0, 0, MIB, HVA)).expect("slot");
    assert_eq!(
        err(&vm, region(1, 0, 0, 0)),
        MemslotError::DeleteNonexistent {
            slot: SlotId::new(1),
            as_id: AsId::new(0)
        }
    );
    // Slot 0 exists in address space 0, not in address space 1.
    let mut req = region(0, 0, 0, 0);
    req.as_id = AsId::new(1);
    assert_eq!(
        err(&vm, req),
        MemslotError::DeleteNonexistent {
            slot: SlotId::new(0),
            as_id: AsId::new(1)
        }
    );
}

#[test]
fn checks_run_in_kvm_order() {
    let vm = Vm::new();
    let mut req = region(SlotId::MAX, 0x1800, MIB + 1, u64::MAX - 7);
    req.flags = MemFlags::from_bits_retain(8);
    req.as_id = AsId::new(9);
    // The ioctl checks the user slot id before anything else.
    assert!(matches!(
        err(&vm, req),
        MemslotError::SlotIdOutOfRange { .. }
    ));
    req.slot = SlotId::new(0);
    assert!(matches!(err(&vm, req), MemslotError::UnknownFlags { .. }));
    req.flags = MemFlags::empty();
    assert!(matches!(err(&vm, req), MemslotError::UnalignedSize { .. }));
    req.size = MIB;
    assert!(matches!(err(&vm, req), MemslotError::UnalignedGpa { .. }));
    req.gpa = Gpa::new(u64::MAX - (PAGE_SIZE - 1));
    assert!(matches!(err(&vm, req), MemslotError::UnalignedHva { .. }));
    req.hva = Hva::new(u64::MAX - (PAGE_SIZE - 1));
    assert!(matches!(
        err(&vm, req),
        MemslotError::SizeOverflow {
            limit: SizeLimit::HvaEnd,
            ..
        }
    ));
    req.hva = Hva::new(HVA);
    assert!(matches!(err(&vm, req), MemslotError::AsIdOutOfRange { .. }));
    req.as_id = AsId::new(0);
    assert!(matches!(
        err(&vm, req),
        MemslotError::SizeOverflow {
            limit: SizeLimit::GpaEnd,
            ..
        }
    ));
    // A delete is validated like any request before the slot is looked up.
    let del = region(0, 0x1800, 0, 0);
    assert!(matches!(err(&vm, del), MemslotError::UnalignedGpa { .. }));
}

#[test]
fn error_messages_name_the_offending_values() {
    let msg = MemslotError::Overlap {
        slot: SlotId::new(3),
        with: SlotId::new(7),
    }
    .to_string();
    assert!(msg.contains("slot 3") && msg.contains("slot 7"), "{msg}");
    let msg = MemslotError::UnalignedGpa {
        gpa: Gpa::new(0x1800),
    }
    .to_string();
    assert!(msg.contains("0x1800"), "{msg}");
    let msg = MemslotError::SizeOverflow {
        gpa: Gpa::new(0),
        hva: Hva::new(0x1000),
        size: 0x2000,
        limit: SizeLimit::MaxPages,
    }
    .to_string();
    assert!(
        msg.contains("0x2000") && msg.contains("KVM_MEM_MAX_NR_PAGES"),
        "{msg}"
    );
}

// ---- classification ----

#[test]
fn a_new_slot_id_is_a_create() {
    let mut vm = Vm::new();
    let mut req = region(5, 4 * MIB, MIB, HVA);
    req.flags = MemFlags::LOG_DIRTY_PAGES;
    match vm.set(req) {
        Ok(MemslotChange::Create { new }) => {
            assert_eq!(new.id(), SlotId::new(5));
            assert_eq!(new.as_id(), AsId::new(0));
            assert_eq!(new.base_gfn(), Gfn::new(4 * MIB / PAGE_SIZE));
            assert_eq!(new.npages(), MIB / PAGE_SIZE);
            assert_eq!(new.userspace_addr(), Hva::new(HVA));
            assert_eq!(new.flags(), MemFlags::LOG_DIRTY_PAGES);
            assert!(!new.is_invalid());
        }
        other => panic!("expected Create, got {other:?}"),
    }
    assert_eq!(vm.sets[0].len(), 1);
}

#[test]
fn size_zero_is_a_delete_of_the_existing_slot() {
    let mut vm = Vm::new();
    vm.set(region(0, 0, MIB, HVA)).expect("slot");
    let existing = Arc::clone(vm.sets[0].get(SlotId::new(0)).expect("slot 0"));
    match vm.set(region(0, 0, 0, 0)) {
        Ok(MemslotChange::Delete { old }) => assert!(Arc::ptr_eq(&old, &existing)),
        other => panic!("expected Delete, got {other:?}"),
    }
    assert!(vm.sets[0].is_empty());
}

#[test]
fn a_new_gpa_for_an_existing_slot_is_a_move() {
    let mut vm = Vm::new();
    vm.set(region(0, 0, 16 * PAGE_SIZE, HVA)).expect("slot");
    // Moving onto part of its own old range is allowed (only other slots count as overlap).
    match vm.set(region(0, 8 * PAGE_SIZE, 16 * PAGE_SIZE, HVA)) {
        Ok(MemslotChange::Move { old, new }) => {
            assert_eq!(old.base_gfn(), Gfn::new(0));
            assert_eq!(new.base_gfn(), Gfn::new(8));
            assert_eq!(new.userspace_addr(), old.userspace_addr());
            assert_eq!(new.npages(), old.npages());
        }
        other => panic!("expected Move, got {other:?}"),
    }
    assert_eq!(
        vm.sets[0].find_by_gfn(Gfn::new(23)).map(|s| s.id()),
        Some(SlotId::new(0))
    );
    assert!(vm.sets[0].find_by_gfn(Gfn::new(7)).is_none());
}

#[test]
fn a_move_onto_another_slot_is_rejected() {
    let mut vm = Vm::new();
    vm.set(region(0, 0, MIB, HVA)).expect("slot 0");
    vm.set(region(1, 4 * MIB, MIB, HVA + MIB)).expect("slot 1");
    assert_eq!(
        err(&vm, region(1, MIB / 2, MIB, HVA + MIB)),
        MemslotError::Overlap {
            slot: SlotId::new(1),
            with: SlotId::new(0)
        }
    );
}

#[test]
fn toggling_dirty_logging_is_flags_only() {
    let mut vm = Vm::new();
    vm.set(region(0, 0, MIB, HVA)).expect("slot");
    let mut req = region(0, 0, MIB, HVA);
    req.flags = MemFlags::LOG_DIRTY_PAGES;
    match vm.set(req) {
        Ok(MemslotChange::FlagsOnly { old, new }) => {
            assert_eq!(old.flags(), MemFlags::empty());
            assert_eq!(new.flags(), MemFlags::LOG_DIRTY_PAGES);
            assert_eq!(new.gfn_range(), old.gfn_range());
        }
        other => panic!("expected FlagsOnly, got {other:?}"),
    }
    let slot = vm.sets[0].get(SlotId::new(0)).expect("slot 0");
    assert_eq!(slot.flags(), MemFlags::LOG_DIRTY_PAGES);
}

#[test]
fn an_identical_request_is_unchanged() {
    let mut vm = Vm::new();
    let mut req = region(0, 0, MIB, HVA);
    req.flags = MemFlags::READONLY;
    vm.set(req).expect("slot");
    let generation = vm.sets[0].generation();
    assert!(matches!(vm.set(req), Ok(MemslotChange::Unchanged)));
    assert_eq!(vm.sets[0].generation(), generation);
}

// ---- aliasing and address spaces ----

#[test]
fn several_slots_may_alias_the_same_hva() {
    let mut vm = Vm::new();
    for (slot, gpa) in [(0, 0), (1, 4 * MIB), (2, 8 * MIB)] {
        assert!(matches!(
            vm.set(region(slot, gpa, MIB, HVA)),
            Ok(MemslotChange::Create { .. })
        ));
    }
    // A notifier range on the shared buffer reaches every alias, each at its own gfns.
    let mut hits = Vec::new();
    vm.sets[0].for_each_hva_overlap(
        Hva::new(HVA + PAGE_SIZE),
        Hva::new(HVA + 2 * PAGE_SIZE),
        |s, g| hits.push((s.id().get(), g)),
    );
    hits.sort_unstable_by_key(|&(id, _)| id);
    let pages = MIB / PAGE_SIZE;
    let gfns = |base: u64| GfnRange::new(Gfn::new(base + 1), Gfn::new(base + 2)).expect("ordered");
    assert_eq!(
        hits,
        vec![(0, gfns(0)), (1, gfns(4 * pages)), (2, gfns(8 * pages))]
    );
}

#[test]
fn overlapping_gfns_across_address_spaces_are_allowed() {
    let mut vm = Vm::new();
    vm.set(region(0, 0, MIB, HVA)).expect("as 0");
    let mut smm = region(0, 0, MIB, HVA + MIB);
    smm.as_id = AsId::new(1);
    assert!(matches!(vm.set(smm), Ok(MemslotChange::Create { .. })));
    assert_eq!(
        vm.sets[0]
            .find_by_gfn(Gfn::new(3))
            .map(|s| s.userspace_addr()),
        Some(Hva::new(HVA))
    );
    assert_eq!(
        vm.sets[1]
            .find_by_gfn(Gfn::new(3))
            .map(|s| s.userspace_addr()),
        Some(Hva::new(HVA + MIB))
    );
}
