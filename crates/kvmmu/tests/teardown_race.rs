//! Teardown before unsubscribe (DESIGN invariant 2, issue 9 item 4): a `Vm` dropped (or shut down)
//! while its vCPUs write and the host write-protects or unmaps their memory never lets a write
//! land after the host's operation returned, whatever the interleaving.
//!
//! Each round: vCPU threads write one page each (so they hold an SPTE and a TLB entry), then, all
//! released by one barrier, they keep writing in guest mode while one thread drops the `Vm` and
//! another `mprotect`s the memory read-only (or `munmap`s it). The outcome checked is the same
//! in every interleaving: the memory after everything stopped equals what it held right after
//! the host operation returned, and no vCPU ever reached a freed frame.

mod common;

use std::sync::Barrier;
use std::thread;

use common::*;
use kvmmu::prelude::*;

const ROUNDS: u64 = 500;
const VCPUS: u64 = 2;
const BYTES: u64 = VCPUS * 4096;
/// Far more writes than a vCPU can make before the racing drop reaches it; only a broken
/// teardown (a vCPU that never learns the VM is dead) gets there.
const MAX_WRITES: u64 = 1 << 40;

#[derive(Clone, Copy)]
enum HostOp {
    Mprotect,
    Munmap,
}

/// What one vCPU thread saw: the last value it wrote successfully and the exit that stopped it.
struct VcpuEnd {
    page: u64,
    last_ok: u64,
    exit: VcpuExit,
}

fn vcpu_thread(mut vcpu: Vcpu, page: u64, start: &Barrier) -> VcpuEnd {
    vcpu.write_u64(gpa(page), 1).expect("first write");
    start.wait();
    let mut g = vcpu.enter();
    let mut last_ok = 1;
    for v in 2..MAX_WRITES {
        match g.write_u64(gpa(page), v) {
            Ok(()) => last_ok = v,
            Err(exit) => {
                return VcpuEnd {
                    page,
                    last_ok,
                    exit,
                };
            }
        }
    }
    panic!("vCPU {page} still writing after {MAX_WRITES} writes: the dropped VM never stopped it");
}

/// One round of the race, with its checks.
fn round(mmu: MmuKind, op: HostOp, r: u64) {
    let host = HostMm::new(HostConfig { frames: 64 }).unwrap();
    let vm = Vm::new(
        &host,
        VmConfig {
            mmu,
            ..VmConfig::default()
        },
    )
    .unwrap();
    let hva = host.mmap(BYTES, Prot::READ | Prot::WRITE).unwrap();
    vm.set_user_memory_region(region(0, BASE_GPA, BYTES, hva))
        .unwrap();
    let vcpus: Vec<Vcpu> = (0..VCPUS).map(|_| vm.create_vcpu().unwrap()).collect();
    let start = Barrier::new(VCPUS as usize + 2);
    let (ends, after_op) = thread::scope(|s| {
        let workers: Vec<_> = vcpus
            .into_iter()
            .zip(0..)
            .map(|(v, page)| {
                let start = &start;
                s.spawn(move || vcpu_thread(v, page, start))
            })
            .collect();
        let start_ref = &start;
        let dropper = s.spawn(move || {
            start_ref.wait();
            // Odd rounds shut down instead: the same teardown, returning statistics.
            if r.is_multiple_of(2) {
                drop(vm);
            } else {
                let _ = vm.shutdown();
            }
        });
        let host_thread = s.spawn(|| {
            start.wait();
            match op {
                HostOp::Mprotect => {
                    host.mprotect(hva, BYTES, Prot::READ).unwrap();
                    // What the memory holds once mprotect returned: no guest write may change it.
                    Some(
                        (0..VCPUS)
                            .map(|p| host.read_u64(hva_of(hva, p)).unwrap())
                            .collect::<Vec<_>>(),
                    )
                }
                HostOp::Munmap => {
                    host.munmap(hva, BYTES).unwrap();
                    None
                }
            }
        });
        dropper.join().unwrap();
        let after_op = host_thread.join().unwrap();
        let ends: Vec<VcpuEnd> = workers.into_iter().map(|w| w.join().unwrap()).collect();
        (ends, after_op)
    });
    for e in &ends {
        assert!(
            matches!(e.exit, VcpuExit::VmDead | VcpuExit::HostFault { .. }),
            "round {r}: vCPU {} stopped with {:?} (a write through a stale translation)",
            e.page,
            e.exit
        );
    }
    assert_eq!(
        host.arena().stats().stale_accesses,
        0,
        "round {r}: an access reached a freed or reused frame"
    );
    if let Some(after_op) = after_op {
        for e in &ends {
            let now = host.read_u64(hva_of(hva, e.page)).unwrap();
            assert_eq!(
                now, after_op[e.page as usize],
                "round {r}: vCPU {}'s write landed in memory the host had made read-only \
                 (last successful write {})",
                e.page, e.last_ok
            );
            assert_eq!(
                now, e.last_ok,
                "round {r}: memory holds the last successful write"
            );
        }
    }
}

#[test]
fn a_vm_dropped_while_vcpus_write_never_lets_a_write_land_after_mprotect_read_only_returned() {
    for r in 0..ROUNDS {
        round(MmuKind::Tdp, HostOp::Mprotect, r);
        round(MmuKind::Shadow, HostOp::Mprotect, r);
    }
}

#[test]
fn a_vm_dropped_while_vcpus_write_never_lets_a_write_reach_a_frame_munmap_freed() {
    for r in 0..ROUNDS {
        round(MmuKind::Tdp, HostOp::Munmap, r);
        round(MmuKind::Shadow, HostOp::Munmap, r);
    }
}
