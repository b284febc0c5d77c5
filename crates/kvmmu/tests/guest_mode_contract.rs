//! The guest-mode contract as types (DESIGN "Simulated hardware and the guest-mode contract"):
//! a thread that holds a vCPU in guest mode is refused every call that could wait for its own
//! TLB-flush acknowledgement, before anything changes; an invalidation pair stays balanced when a
//! notifier callback panics; vCPUs run in address space 1.

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::*;
use kvmmu::internals::host::{HostError, MmuNotifier, NotifierRange};
use kvmmu::internals::sync::guest_mode::{InGuestMode, in_guest_mode};
use kvmmu::internals::vm::{SetMemoryRegionError, VmError};
use kvmmu::prelude::*;

/// 16 pages of memslot 0, plus 16 spare mapped pages for a later memslot update.
const BYTES: u64 = 16 * 4096;

struct Setup {
    host: HostMm,
    vm: Vm,
    hva: Hva,
    spare: Hva,
}

fn setup(config: VmConfig) -> Setup {
    let host = HostMm::new(HostConfig { frames: 256 }).unwrap();
    let vm = Vm::new(&host, config).unwrap();
    let hva = host.mmap(BYTES, Prot::READ | Prot::WRITE).unwrap();
    let spare = host.mmap(BYTES, Prot::READ | Prot::WRITE).unwrap();
    vm.set_user_memory_region(region(0, BASE_GPA, BYTES, hva))
        .unwrap();
    Setup {
        host,
        vm,
        hva,
        spare,
    }
}

fn shadow() -> VmConfig {
    VmConfig {
        mmu: MmuKind::Shadow,
        ..VmConfig::default()
    }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

/// Runs `forbidden` with a vCPU of `s` in guest mode (after one write through it, so it holds a
/// root and a TLB entry), then checks that the thread left guest mode, every counter is balanced,
/// and the VM still works: an access, a memslot update and a host invalidation that reaches it.
fn refused_and_vm_usable(s: &Setup, forbidden: impl FnOnce(&Setup)) {
    let mut vcpu = s.vm.create_vcpu().unwrap();
    let before = s.vm.stats();
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let mut g = vcpu.enter();
        g.write_u64(gpa(1), 11).unwrap();
        forbidden(s);
        g.write_u64(gpa(2), 22).unwrap();
    }));
    if let Err(p) = outcome {
        let text = panic_text(&*p);
        assert!(
            text.contains("refused") && text.contains("guest mode"),
            "a refusal panic says why: {text}"
        );
    }
    assert!(!in_guest_mode(), "the GuestMode's drop left guest mode");
    let st = s.vm.stats();
    assert_eq!(st.invalidate.in_progress, 0, "{st:?}");
    assert_eq!(st.mn_active_invalidate_count, 0, "{st:?}");
    assert_eq!(st.invalidate_starts, st.invalidate_ends, "{st:?}");
    assert_eq!(st.memslot_swaps, before.memslot_swaps, "no memslot changed");
    assert!(!s.vm.is_dead());
    // The VM is usable: an access, a memslot update, an invalidation that zaps and a fault after it.
    vcpu.write_u64(gpa(3), 33).unwrap();
    assert_eq!(vcpu.read_u64(gpa(1)).unwrap(), 11);
    s.vm.set_user_memory_region(region(1, BASE_GPA + BYTES, BYTES, s.spare))
        .unwrap();
    vcpu.write_u64(gpa(16), 44).unwrap();
    s.host.madvise_dontneed(s.hva, BYTES).unwrap();
    assert_eq!(vcpu.read_u64(gpa(1)).unwrap(), 0, "dontneed reached the VM");
    vcpu.write_u64(gpa(1), 55).unwrap();
    assert_eq!(s.host.read_u64(hva_of(s.hva, 1)).unwrap(), 55);
    let st = s.vm.stats();
    assert_eq!(st.invalidate.in_progress, 0, "{st:?}");
    assert_eq!(st.mn_active_invalidate_count, 0, "{st:?}");
}

fn in_guest_mode_error(op: &'static str) -> InGuestMode {
    InGuestMode { op }
}

#[test]
fn munmap_from_guest_mode_is_refused_with_a_typed_error_and_leaves_the_vm_usable() {
    for config in [VmConfig::default(), shadow()] {
        let s = setup(config);
        let extra = s.host.mmap(BYTES, Prot::READ | Prot::WRITE).unwrap();
        s.host.write_u64(extra, 9).unwrap();
        refused_and_vm_usable(&s, |s| {
            let e = s.host.munmap(s.hva, BYTES).unwrap_err();
            assert!(matches!(e, HostError::InGuestMode(g) if g == in_guest_mode_error("munmap")));
            assert!(matches!(
                s.host.munmap(extra, BYTES),
                Err(HostError::InGuestMode(_))
            ));
        });
        assert_eq!(s.host.read_u64(extra).unwrap(), 9, "nothing was unmapped");
        assert_eq!(s.host.stats().munmap, 0);
    }
}

#[test]
fn mprotect_and_madvise_from_guest_mode_are_refused_and_leave_the_vm_usable() {
    for config in [VmConfig::default(), shadow()] {
        let s = setup(config);
        refused_and_vm_usable(&s, |s| {
            assert!(matches!(
                s.host.mprotect(s.hva, BYTES, Prot::READ),
                Err(HostError::InGuestMode(_))
            ));
            assert!(matches!(
                s.host.madvise_dontneed(s.hva, BYTES),
                Err(HostError::InGuestMode(_))
            ));
            assert!(matches!(
                s.host.mmap(BYTES, Prot::READ),
                Err(HostError::InGuestMode(_))
            ));
        });
        let hs = s.host.stats();
        assert_eq!(
            (hs.mprotect, hs.dontneed),
            (0, 1),
            "only the check's dontneed ran"
        );
    }
}

#[test]
fn set_user_memory_region_from_guest_mode_is_refused_and_changes_no_memslot() {
    for config in [VmConfig::default(), shadow()] {
        let s = setup(config);
        let generation = s.vm.memslots_generation(AsId::new(0));
        refused_and_vm_usable(&s, |s| {
            for req in [
                region(0, BASE_GPA, 0, s.hva),                 // delete
                region(2, 1 << 40, BYTES, s.spare),            // create
                region(0, BASE_GPA + (1 << 30), BYTES, s.hva), // move
            ] {
                assert!(matches!(
                    s.vm.set_user_memory_region(req),
                    Err(SetMemoryRegionError::InGuestMode(_))
                ));
            }
            assert_eq!(s.vm.memslots_generation(AsId::new(0)), generation);
        });
    }
}

#[test]
fn reset_mmu_from_guest_mode_panics_before_invalidating_any_root() {
    for config in [VmConfig::default(), shadow()] {
        let s = setup(config);
        let roots = |st: VmStats| (st.tdp.roots_allocated, st.shadow.roots_allocated);
        let before = roots(s.vm.stats());
        refused_and_vm_usable(&s, |s| {
            let spare_before = s.vm.stats();
            let p = catch_unwind(AssertUnwindSafe(|| s.vm.reset_mmu())).unwrap_err();
            assert!(panic_text(&*p).contains("mmu_lock"), "{}", panic_text(&*p));
            assert_eq!(s.vm.stats().remote_tlb_flush, spare_before.remote_tlb_flush);
        });
        // The vCPU kept its root through the refused reset (only the test's vCPU loaded one).
        assert!(roots(s.vm.stats()) >= before);
    }
}

#[test]
fn locked_clear_young_from_guest_mode_is_refused_and_ages_nothing() {
    let config = VmConfig {
        aging: AgingMode::Locked,
        ..VmConfig::default()
    };
    for config in [
        config.clone(),
        VmConfig {
            mmu: MmuKind::Shadow,
            ..config
        },
    ] {
        let s = setup(config);
        refused_and_vm_usable(&s, |s| {
            for r in [
                s.host.clear_young(s.hva, BYTES),
                s.host.clear_flush_young(s.hva, BYTES),
                s.host.test_young(s.hva),
            ] {
                assert!(matches!(r, Err(HostError::InGuestMode(_))));
            }
            assert!(matches!(
                s.host.clear_young_range(s.hva, BYTES),
                Err(HostError::InGuestMode(_))
            ));
            assert_eq!(s.vm.stats().age_calls, 0, "no subscriber was called");
        });
        assert!(
            s.host.clear_young(s.hva, BYTES).unwrap(),
            "aging works again outside guest mode"
        );
    }
}

#[test]
fn vm_spte_on_the_shadow_mmu_from_guest_mode_panics_without_taking_mmu_lock() {
    let s = setup(shadow());
    refused_and_vm_usable(&s, |s| {
        let p = catch_unwind(AssertUnwindSafe(|| {
            s.vm.spte(AsId::new(0), Gpa::new(BASE_GPA).gfn())
        }))
        .unwrap_err();
        assert!(panic_text(&*p).contains("mmu_lock"), "{}", panic_text(&*p));
        assert_eq!(s.vm.stats().mmu_lock.contended_writes, 0);
    });
    // Outside guest mode the oracle works.
    assert!(
        s.vm.spte(AsId::new(0), Gpa::new(BASE_GPA + 4096).gfn())
            .is_some()
    );
}

#[test]
fn entering_creating_or_dropping_another_vcpu_or_creating_a_vm_from_guest_mode_is_refused() {
    for config in [VmConfig::default(), shadow()] {
        let s = setup(config);
        let mut other = s.vm.create_vcpu().unwrap();
        let mut third = Some(s.vm.create_vcpu().unwrap());
        refused_and_vm_usable(&s, |s| {
            // A second vCPU's fault would take mmu_lock on this thread.
            assert!(matches!(
                other.write_u64(gpa(5), 5),
                Err(VcpuExit::InGuestMode(_))
            ));
            assert!(matches!(other.try_enter(), Err(VcpuExit::InGuestMode(_))));
            let p = catch_unwind(AssertUnwindSafe(|| drop(other.enter()))).unwrap_err();
            assert!(
                panic_text(&*p).contains("second vCPU"),
                "{}",
                panic_text(&*p)
            );
            assert!(
                in_guest_mode(),
                "the refused entries left the first vCPU in guest mode"
            );
            assert!(matches!(s.vm.create_vcpu(), Err(VmError::InGuestMode(_))));
            assert!(matches!(
                Vm::new(&s.host, VmConfig::default()),
                Err(VmError::InGuestMode(_))
            ));
            assert_eq!(s.host.stats().subscribers, 1, "no second VM subscribed");
            // Unregistering a vCPU takes the lock a flusher holds while waiting for this thread.
            let p = catch_unwind(AssertUnwindSafe(|| drop(third.take()))).unwrap_err();
            assert!(
                panic_text(&*p).contains("dropping a vCPU"),
                "{}",
                panic_text(&*p)
            );
        });
        assert_eq!(other.stats().accesses, 0);
        other.write_u64(gpa(5), 5).unwrap();
        assert_eq!(other.read_u64(gpa(5)).unwrap(), 5);
    }
}

#[test]
fn dropping_the_vm_or_releasing_the_host_from_guest_mode_panics_before_tearing_down() {
    let s = setup(VmConfig::default());
    refused_and_vm_usable(&s, |s| {
        let p = catch_unwind(AssertUnwindSafe(|| s.host.release())).unwrap_err();
        assert!(panic_text(&*p).contains("release"), "{}", panic_text(&*p));
        assert_eq!(s.host.stats().subscribers, 1, "nobody was released");
    });
    // Dropping the Vm from guest mode: refused before any teardown; the vCPU keeps the VM alive
    // and subscribed, so host invalidations still reach its SPTEs.
    let Setup { host, vm, hva, .. } = s;
    let mut vcpu = vm.create_vcpu().unwrap();
    let mut vm = Some(vm);
    let p = catch_unwind(AssertUnwindSafe(|| {
        let mut g = vcpu.enter();
        g.write_u64(gpa(1), 1).unwrap();
        drop(vm.take());
    }))
    .unwrap_err();
    assert!(
        panic_text(&*p).contains("dropping the Vm"),
        "{}",
        panic_text(&*p)
    );
    assert_eq!(vcpu.read_u64(gpa(1)).unwrap(), 1, "not torn down");
    host.mprotect(hva, BYTES, Prot::READ).unwrap();
    assert!(matches!(
        vcpu.write_u64(gpa(1), 2),
        Err(VcpuExit::HostFault { .. })
    ));
    assert_eq!(host.read_u64(hva_of(hva, 1)).unwrap(), 1);
}

/// A subscriber that panics in `invalidate_range_start` while armed.
struct Panicky {
    armed: AtomicBool,
}

impl MmuNotifier for Panicky {
    fn invalidate_range_start(&self, _: &NotifierRange) {
        if self.armed.swap(false, Ordering::SeqCst) {
            panic!("test subscriber panics in invalidate_range_start");
        }
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
fn a_notifier_panicking_in_start_leaves_every_started_pair_balanced_and_the_vm_usable() {
    for config in [VmConfig::default(), shadow()] {
        // The VM subscribes first, so its start has run when the second subscriber panics.
        let s = setup(config);
        let panicky = Arc::new(Panicky {
            armed: AtomicBool::new(false),
        });
        s.host.register_notifier(panicky.clone());
        let mut vcpu = s.vm.create_vcpu().unwrap();
        vcpu.write_u64(gpa(1), 7).unwrap();
        for op in 0..3 {
            panicky.armed.store(true, Ordering::SeqCst);
            let r = catch_unwind(AssertUnwindSafe(|| match op {
                0 => s.host.mprotect(s.hva, BYTES, Prot::READ),
                1 => s.host.madvise_dontneed(s.hva, BYTES),
                _ => s.host.munmap(s.hva, BYTES),
            }));
            assert!(
                r.is_err(),
                "op {op}: the subscriber's panic reached the caller"
            );
            let st = s.vm.stats();
            assert_eq!(st.invalidate.in_progress, 0, "op {op}: {st:?}");
            assert_eq!(st.mn_active_invalidate_count, 0, "op {op}: {st:?}");
            assert_eq!(st.invalidate_starts, op + 1, "op {op}: {st:?}");
            assert_eq!(st.invalidate_ends, op + 1, "op {op}: {st:?}");
            let hs = s.host.stats();
            assert_eq!(hs.invalidate_start, hs.invalidate_end, "op {op}: {hs:?}");
            // The VM is usable: its start zapped the mapping, a fault maps it again, a memslot
            // update does not hang waiting for an invalidation that never ends.
            vcpu.write_u64(gpa(1), 7).unwrap();
            assert_eq!(vcpu.read_u64(gpa(1)).unwrap(), 7);
        }
        s.vm.set_user_memory_region(region(1, BASE_GPA + BYTES, BYTES, s.spare))
            .unwrap();
        vcpu.write_u64(gpa(16), 8).unwrap();
        s.host.munmap(s.spare, BYTES).unwrap();
        assert!(matches!(
            vcpu.read_u64(gpa(16)),
            Err(VcpuExit::HostFault { .. })
        ));
        let st = s.vm.stats();
        assert_eq!(
            (st.invalidate.in_progress, st.mn_active_invalidate_count),
            (0, 0)
        );
    }
}

#[test]
fn a_vcpu_in_address_space_1_reads_and_writes_its_own_slots_and_sees_invalidations() {
    for mmu in [MmuKind::Tdp, MmuKind::Shadow] {
        let s = setup(VmConfig {
            mmu,
            address_spaces: 2,
            ..VmConfig::default()
        });
        // Address space 1 maps the same guest physical address to other host memory.
        let mut r1 = region(0, BASE_GPA, BYTES, s.spare);
        r1.as_id = AsId::new(1);
        s.vm.set_user_memory_region(r1).unwrap();
        let mut v0 = s.vm.create_vcpu().unwrap();
        let mut v1 = s.vm.create_vcpu_in(AsId::new(1)).unwrap();
        assert_eq!(v1.address_space(), AsId::new(1));
        v0.write_u64(gpa(3), 100).unwrap();
        v1.write_u64(gpa(3), 101).unwrap();
        assert_eq!(v0.read_u64(gpa(3)).unwrap(), 100);
        assert_eq!(v1.read_u64(gpa(3)).unwrap(), 101);
        assert_eq!(s.host.read_u64(hva_of(s.spare, 3)).unwrap(), 101);
        assert_eq!(s.host.read_u64(hva_of(s.hva, 3)).unwrap(), 100);
        assert!(s.vm.spte(AsId::new(1), gpa(3).gfn()).is_some());
        // An invalidation of AS 1's memory zaps its SPTE and the vCPU's TLB entry.
        s.host.mprotect(s.spare, BYTES, Prot::READ).unwrap();
        assert!(matches!(
            v1.write_u64(gpa(3), 102),
            Err(VcpuExit::HostFault { .. })
        ));
        assert_eq!(v1.read_u64(gpa(3)).unwrap(), 101);
        v0.write_u64(gpa(3), 103).unwrap();
        s.host.madvise_dontneed(s.spare, BYTES).unwrap();
        assert_eq!(v1.read_u64(gpa(3)).unwrap(), 0, "dontneed reached AS 1");
        // Switching address spaces, as SMM entry and exit do.
        v1.set_address_space(AsId::new(0)).unwrap();
        assert_eq!(v1.read_u64(gpa(3)).unwrap(), 103);
        let st = s.vm.stats();
        assert_eq!(
            (st.invalidate.in_progress, st.mn_active_invalidate_count),
            (0, 0)
        );
    }
}

#[test]
fn a_vcpu_cannot_run_in_an_address_space_the_vm_does_not_have() {
    let s = setup(VmConfig::default());
    assert!(matches!(
        s.vm.create_vcpu_in(AsId::new(1)),
        Err(VmError::NoAddressSpace { .. })
    ));
    let mut v = s.vm.create_vcpu().unwrap();
    assert!(matches!(
        v.set_address_space(AsId::new(1)),
        Err(VmError::NoAddressSpace { .. })
    ));
    assert_eq!(v.address_space(), AsId::new(0));
    v.write_u64(gpa(0), 1).unwrap();
}
