//! The loom model of a vCPU's guest-mode walk racing a zap + flush + free (G1-G2 in
//! docs/locking.md), on the production code: `TdpMmu::guest_walk` (no lock, no RCU, no SRCU),
//! `TdpMmu::zap_invalidated_roots` (unlink, freeze, retire through RCU, flush before dropping the
//! RCU guard) and the request handshake of `vm::request`. Shared by `loom_guest_walk.rs` (the
//! correct build must pass) and `broken_free_before_flush_ack.rs` (the broken build must fail).
//!
//! Under loom a freed table is poisoned and leaked, and every SPTE access asserts that it did not
//! read the poison (spte.rs), so a walk that reaches a freed table fails the model.

use kvmmu::internals::addr::{AsId, Gfn, Level, Pfn};
use kvmmu::internals::mmu::tdp::TdpMmu;
use kvmmu::internals::mmu::{FaultOutcome, HwWalk, MapRequest, RemoteTlbFlush};
use kvmmu::internals::sync::Arc;
use kvmmu::internals::sync::rcu::Rcu;
use kvmmu::internals::sync::witness::MmuLock;
use kvmmu::internals::vm::request::VcpuRequests;
use loom::thread;

const AS0: AsId = AsId::new(0);

/// The VM's remote TLB flush: the production request handshake.
struct Flusher(Arc<VcpuRequests>);

impl RemoteTlbFlush for Flusher {
    fn flush_remote_tlbs(&self) {
        self.0.flush_remote_tlbs();
    }
}

fn req(gfn: u64) -> MapRequest {
    MapRequest {
        gfn: Gfn::new(gfn),
        pfn: Pfn::new(gfn + 100),
        level: Level::L4K,
        host_writable: true,
        write_fault: false,
        prefetch: false,
    }
}

/// One model run: gfn 1 is mapped (a table under the root, a leaf in it, its owner recorded);
/// a vCPU in guest mode makes two accesses (request check, then a guest-mode walk of gfn 1)
/// while another thread invalidates the root and zaps it, unlinking and retiring the table.
/// Returns the number of tables freed once everything settled.
pub fn zap_flush_free_races_a_guest_walk() -> u64 {
    let rcu = Arc::new(Rcu::new());
    let lock = Arc::new(MmuLock::new());
    let tdp = Arc::new(TdpMmu::new(1, Arc::clone(&rcu)));
    let reqs = VcpuRequests::new();
    let root = {
        let mmu = lock.read();
        let root = tdp.get_root(AS0, mmu.witness());
        let g = rcu.pin();
        assert_eq!(
            tdp.map_owned(&root, &req(1), Some(7), mmu.witness(), &g),
            FaultOutcome::Fixed
        );
        root
    };
    let mut handle = reqs.register();
    let vcpu = {
        let tdp = Arc::clone(&tdp);
        thread::spawn(move || {
            let _ = handle.enter_guest();
            for _ in 0..2 {
                // An instruction boundary: acknowledge remote flushes (the walk's result is not
                // cached here, so the request itself needs no action).
                let _ = handle.check_requests();
                // SAFETY: this thread is a vCPU in guest mode that acknowledges flushes only at
                // the `check_requests` above, between two walks (G1).
                let (hit, owner) = unsafe { tdp.guest_walk(&root, Gfn::new(1), false) };
                match hit {
                    HwWalk::Hit { pfn, .. } => {
                        assert_eq!(pfn, Pfn::new(101));
                        assert_eq!(owner, Some(7), "the owner recorded at install");
                    }
                    HwWalk::NotPresent => {}
                    HwWalk::WriteProtected => panic!("a read never misses on permissions"),
                }
            }
            handle.exit_guest();
            drop(handle);
            drop(root);
        })
    };
    {
        let mut mmu = lock.write();
        tdp.invalidate_all_roots(mmu.witness());
        tdp.zap_invalidated_roots(&mut mmu, &Flusher(Arc::clone(&reqs)));
    }
    vcpu.join().expect("the vCPU thread panicked");
    let tdp = Arc::try_unwrap(tdp).unwrap_or_else(|_| panic!("every thread dropped its TdpMmu"));
    let freed_before_drop = tdp.stats().tables_freed;
    drop(tdp);
    rcu.synchronize();
    assert_eq!(rcu.pending(), 0);
    freed_before_drop
}

/// Runs the model under loom.
pub fn run() {
    loom::model(|| {
        zap_flush_free_races_a_guest_walk();
    });
}
