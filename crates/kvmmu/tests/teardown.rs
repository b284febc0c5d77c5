//! Teardown: dropping the VM or the host's release frees everything exactly once.

mod common;

use common::*;
use kvmmu::prelude::*;

#[test]
fn shutdown_frees_every_page_table_page() {
    let f = fixture(4 << 20, VmConfig::default());
    let mut vcpu = f.vm.create_vcpu().unwrap();
    for p in (0..1024).step_by(3) {
        vcpu.write_u64(gpa(p), p).unwrap();
    }
    f.vm.reset_mmu(); // a second root
    for p in (0..1024).step_by(5) {
        vcpu.write_u64(gpa(p), p).unwrap();
    }
    drop(vcpu);
    let stats = f.vm.shutdown();
    assert!(stats.tdp.tables_allocated > 2);
    assert_eq!(stats.tdp.tables_allocated, stats.tdp.tables_freed);
    assert_eq!(stats.tdp.roots_allocated, stats.tdp.roots_freed);
}

#[test]
fn host_release_tears_the_vm_down() {
    let f = fixture(1 << 20, VmConfig::default());
    let mut vcpu = f.vm.create_vcpu().unwrap();
    vcpu.write_u64(gpa(1), 5).unwrap();
    f.host.release();
    assert!(f.vm.is_dead());
    assert_eq!(vcpu.read_u64(gpa(1)), Err(VcpuExit::VmDead));
    assert!(f.vm.create_vcpu().is_err());
    drop(vcpu);
    let stats = f.vm.shutdown();
    assert_eq!(stats.tdp.tables_allocated, stats.tdp.tables_freed);
    assert_eq!(
        f.host.arena().stats().allocated,
        0,
        "release freed every frame"
    );
}

#[test]
fn dropping_the_vm_unsubscribes_from_the_host() {
    let host = HostMm::new(HostConfig { frames: 64 }).unwrap();
    let hva = host.mmap(1 << 16, Prot::READ | Prot::WRITE).unwrap();
    {
        let vm = Vm::new(&host, VmConfig::default()).unwrap();
        vm.set_user_memory_region(region(0, BASE_GPA, 1 << 16, hva))
            .unwrap();
        vm.create_vcpu().unwrap().write_u64(gpa(0), 1).unwrap();
    }
    // No subscriber is left to call: invalidation and aging still work host-side.
    host.munmap(hva, 1 << 16).unwrap();
    assert!(host.host_pte(hva).is_none());
}

#[test]
fn shadow_mmu_vm_works_and_shutdown_frees_every_shadow_page() {
    let config = VmConfig {
        mmu: MmuKind::Shadow,
        ..VmConfig::default()
    };
    let f = fixture(4 << 20, config);
    let mut vcpu = f.vm.create_vcpu().unwrap();
    for p in (0..1024).step_by(3) {
        vcpu.write_u64(gpa(p), p).unwrap();
    }
    f.vm.reset_mmu(); // a second root
    for p in (0..1024).step_by(5) {
        vcpu.write_u64(gpa(p), p).unwrap();
        assert_eq!(vcpu.read_u64(gpa(p)).unwrap(), p);
    }
    drop(vcpu);
    let stats = f.vm.shutdown();
    let s = stats.shadow;
    assert!(s.pages_allocated > 2, "{s:?}");
    assert_eq!(s.pages_allocated, s.pages_freed, "{s:?}");
    assert_eq!((s.roots_allocated, s.roots_freed), (2, 2), "{s:?}");
    assert_eq!(s.leaves_installed, s.leaves_zapped, "{s:?}");
    assert_eq!(s.rmap.desc_allocs, s.rmap.desc_frees, "{s:?}");
    assert_eq!(stats.tdp.tables_allocated, 0, "the TDP MMU was not used");
}

#[test]
fn shadow_host_release_tears_the_vm_down() {
    let f = fixture(
        1 << 20,
        VmConfig {
            mmu: MmuKind::Shadow,
            ..VmConfig::default()
        },
    );
    let mut vcpu = f.vm.create_vcpu().unwrap();
    vcpu.write_u64(gpa(1), 5).unwrap();
    f.host.release();
    assert!(f.vm.is_dead());
    assert_eq!(vcpu.read_u64(gpa(1)), Err(VcpuExit::VmDead));
    drop(vcpu);
    let s = f.vm.shutdown().shadow;
    assert_eq!(s.pages_allocated, s.pages_freed, "{s:?}");
    assert_eq!(
        f.host.arena().stats().allocated,
        0,
        "release freed every frame"
    );
}

/// A thread that holds a vCPU in guest mode and then invalidates memory would wait for its own
/// TLB-flush acknowledgement forever; it is refused with a typed error instead, before anything
/// changed (review finding; more in `guest_mode_contract.rs`).
#[test]
fn invalidating_memory_from_inside_guest_mode_is_refused_instead_of_deadlocking() {
    let host = HostMm::new(HostConfig { frames: 64 }).unwrap();
    let vm = Vm::new(&host, VmConfig::default()).unwrap();
    let hva = host.mmap(1 << 16, Prot::READ | Prot::WRITE).unwrap();
    vm.set_user_memory_region(region(0, BASE_GPA, 1 << 16, hva))
        .unwrap();
    let mut vcpu = vm.create_vcpu().unwrap();
    let mut g = vcpu.enter();
    g.write_u64(gpa(1), 1).unwrap();
    let e = host.madvise_dontneed(hva, 1 << 16).unwrap_err();
    assert!(
        matches!(e, kvmmu::internals::host::HostError::InGuestMode(_)),
        "{e:?}"
    );
    assert!(
        e.to_string().contains("guest mode"),
        "the error says why: {e}"
    );
    assert_eq!(g.read_u64(gpa(1)).unwrap(), 1, "nothing was discarded");
}
