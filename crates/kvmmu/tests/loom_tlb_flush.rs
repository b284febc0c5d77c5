//! Loom models of the remote TLB flush protocol (`kvmmu::internals::vm::request`, invariant 3 and 4).
//!
//! Each vCPU holds a "TLB entry" filled before the model starts: the index of the frame the SPTE
//! (`spte`) pointed to. The flusher repoints the SPTE to a new frame (the zap + refault), calls
//! `flush_remote_tlbs`, then *reuses the old frame* (writes it through a `loom::cell::UnsafeCell`) and
//! raises `done`. A vCPU reads its frame through its cached entry before every access, after
//! `check_requests`. Loom then checks:
//! - no vCPU read of the old frame through a stale entry races with the flusher's reuse (loom's
//!   causality checker: the vCPU's last stale use must happen-before the flush returns);
//! - a vCPU that observes `done` uses only the new translation (the assert in `access`);
//! - the flusher's wait always ends (a hang makes loom exceed its branch bound and fail).
//!
//! The one-vCPU models are exhaustive; the two-vCPU model is bounded to 4 preemptions (about 5 s in
//! release; `LOOM_MAX_PREEMPTIONS=5` also passes, in about 20 s).
//!
//! Run: `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target-loom cargo test --release -p kvmmu --test
//! loom_tlb_flush`.
#![cfg(loom)]

use kvmmu::internals::vm::request::{Request, VcpuHandle, VcpuRequests};
use loom::cell::UnsafeCell;
use loom::sync::Arc;
use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use loom::thread;

const OLD: usize = 0;
const NEW: usize = 1;
/// What the flusher writes into the old frame when it reuses it.
const REUSED: u64 = 0xdead;

struct Machine {
    /// The SPTE: index of the frame the gfn maps to.
    spte: AtomicUsize,
    /// Two host frames holding guest data.
    frames: [UnsafeCell<u64>; 2],
    /// Set (Release) after `flush_remote_tlbs` returned and the old frame was reused.
    done: AtomicBool,
}

impl Machine {
    fn new() -> Arc<Machine> {
        Arc::new(Machine {
            spte: AtomicUsize::new(OLD),
            frames: [UnsafeCell::new(7), UnsafeCell::new(7)],
            done: AtomicBool::new(false),
        })
    }

    /// The flusher: zap + refault to the new frame, flush, reuse the old frame.
    fn flusher(&self, reqs: &VcpuRequests) {
        // Relaxed on purpose: the request protocol alone must order this before the vCPU's refill.
        self.spte.store(NEW, Ordering::Relaxed);
        reqs.flush_remote_tlbs();
        self.frames[OLD].with_mut(|p| {
            // SAFETY: the model's claim under test: after the flush no vCPU reads the old frame, so
            // this write has no concurrent access (loom reports one if the claim is false).
            unsafe { *p = REUSED }
        });
        self.done.store(true, Ordering::Release);
    }

    /// One guest access through the vCPU's TLB entry `tlb` (a frame index).
    fn access(&self, vcpu: &mut VcpuHandle, tlb: &mut usize) {
        if vcpu.check_requests().tlb_flush() {
            *tlb = self.walk();
        }
        self.use_entry(*tlb);
    }

    /// Page walk: reads the SPTE (Relaxed: ordered by the request protocol).
    fn walk(&self) -> usize {
        self.spte.load(Ordering::Relaxed)
    }

    fn use_entry(&self, frame: usize) {
        let value = self.frames[frame].with(|p| {
            // SAFETY: reads race only with the flusher's reuse of the old frame, which the protocol
            // orders after every stale use (loom checks it).
            unsafe { *p }
        });
        assert_ne!(
            value, REUSED,
            "vCPU read a reused frame through a stale TLB entry"
        );
        if self.done.load(Ordering::Acquire) {
            assert_eq!(
                frame, NEW,
                "vCPU used a TLB entry filled before a completed flush"
            );
        }
    }

    /// A vCPU run: enter, two accesses, exit.
    fn vcpu(&self, mut vcpu: VcpuHandle) {
        let mut tlb = OLD; // filled before the model starts
        if vcpu.enter_guest().tlb_flush() {
            tlb = self.walk();
        }
        self.access(&mut vcpu, &mut tlb);
        self.access(&mut vcpu, &mut tlb);
        vcpu.exit_guest();
    }
}

#[test]
fn one_vcpu_never_uses_a_stale_entry_after_flush() {
    loom::model(|| {
        let reqs = VcpuRequests::new();
        let machine = Machine::new();
        let handle = reqs.register();
        let vcpu = {
            let machine = Arc::clone(&machine);
            thread::spawn(move || machine.vcpu(handle))
        };
        machine.flusher(&reqs);
        vcpu.join().expect("vCPU thread panicked");
        assert_eq!(reqs.stats().flushes, 1);
    });
}

#[test]
fn vcpu_dropped_in_guest_mode_does_not_hang_flusher() {
    loom::model(|| {
        let reqs = VcpuRequests::new();
        let machine = Machine::new();
        let mut handle = reqs.register();
        let vcpu = {
            let machine = Arc::clone(&machine);
            thread::spawn(move || {
                let mut tlb = OLD;
                if handle.enter_guest().tlb_flush() {
                    tlb = machine.walk();
                }
                machine.access(&mut handle, &mut tlb);
                drop(handle); // still in guest mode: drop must acknowledge
            })
        };
        machine.flusher(&reqs);
        vcpu.join().expect("vCPU thread panicked");
        assert_eq!(reqs.vcpus(), 0);
    });
}

#[test]
fn two_vcpus_never_use_a_stale_entry_after_flush() {
    // Unbounded does not finish in 15 minutes; see the module doc.
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(4);
    }
    builder.check(|| {
        let reqs = VcpuRequests::new();
        let machine = Machine::new();
        let handles = [reqs.register(), reqs.register()];
        let threads = handles.map(|mut handle| {
            let machine = Arc::clone(&machine);
            thread::spawn(move || {
                let mut tlb = OLD;
                if handle.enter_guest().tlb_flush() {
                    tlb = machine.walk();
                }
                machine.access(&mut handle, &mut tlb);
                handle.exit_guest();
            })
        });
        machine.flusher(&reqs);
        for t in threads {
            t.join().expect("vCPU thread panicked");
        }
        assert_eq!(reqs.stats().flushes, 1);
    });
}

#[test]
fn request_posted_while_outside_is_taken_on_entry() {
    loom::model(|| {
        let reqs = VcpuRequests::new();
        let mut handle = reqs.register();
        let flag = Arc::new(AtomicBool::new(false));
        let poster = {
            let reqs = Arc::clone(&reqs);
            let flag = Arc::clone(&flag);
            thread::spawn(move || {
                flag.store(true, Ordering::Relaxed);
                reqs.make_all_request(Request::MmuReload);
            })
        };
        // The take that returns the request sees what was published before the post (Relaxed
        // flag: only the protocol's Release post / Acquire take orders it).
        let checked = |r: kvmmu::internals::vm::request::Requests| {
            if r.mmu_reload() {
                assert!(
                    flag.load(Ordering::Relaxed),
                    "take did not acquire the post"
                );
            }
            r
        };
        let first = checked(handle.enter_guest());
        let second = checked(handle.check_requests());
        handle.exit_guest();
        poster.join().expect("poster panicked");
        let third = checked(handle.enter_guest());
        // Exactly one take returns the request (invariant 2: no lost, no duplicated request).
        let takes = [first, second, third];
        assert_eq!(takes.iter().filter(|r| r.mmu_reload()).count(), 1);
    });
}
