//! Remote TLB flushes racing real threads (`kvmmu::internals::vm::request` with `kvmmu::internals::vcpu::tlb::Tlb`).
//!
//! vCPU threads enter and leave guest mode, check requests before every access and "fault" (take
//! the simulated `mmu_lock`) outside guest mode; flusher threads bump the translation's version (a
//! zap + refault) and call `flush_remote_tlbs` while holding that same lock. Every loop is bounded
//! and every test runs under a watchdog, so a hang fails the test instead of stalling CI.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex, mpsc};
use std::thread;
use std::time::Duration;

use kvmmu::internals::addr::{Gfn, Pfn};
use kvmmu::internals::vcpu::tlb::{Tlb, TlbEntry};
use kvmmu::internals::vm::request::{Request, RequestStats, VcpuHandle, VcpuMode, VcpuRequests};

const WATCHDOG: Duration = Duration::from_secs(120);

/// Runs `f` on its own thread and fails if it does not finish within [`WATCHDOG`].
fn with_watchdog<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let worker = thread::spawn(move || {
        let out = f();
        let _ = tx.send(());
        out
    });
    match rx.recv_timeout(WATCHDOG) {
        Ok(()) => worker.join().expect("test body panicked"),
        Err(mpsc::RecvTimeoutError::Disconnected) => match worker.join() {
            Ok(_) => unreachable!("the body sends before it returns"),
            Err(panic) => std::panic::resume_unwind(panic),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{name}: hung for {WATCHDOG:?}"),
    }
}

/// The simulated guest memory state shared by flushers and vCPUs.
struct Machine {
    /// The SPTE: each zap + refault of the single gfn gives it a new version (= new pfn).
    version: AtomicU64,
    /// Highest version whose flush has returned: no vCPU may use an older translation afterwards.
    flushed: AtomicU64,
    /// The simulated `mmu_lock`: flushers hold it across the flush, vCPUs take it to "fault".
    mmu_lock: Mutex<()>,
    stop: AtomicBool,
}

const GFN: Gfn = Gfn::new(0x42);

impl Machine {
    fn walk(&self, tlb: &mut Tlb) {
        let v = self.version.load(Ordering::Acquire);
        tlb.insert(TlbEntry {
            gfn: GFN,
            pfn: Pfn::new(v),
            tag: v,
            writable: true,
            dirty: false,
            executable: true,
        });
    }

    /// One guest access: check requests, then use the TLB (walk on a miss).
    fn access(&self, vcpu: &mut VcpuHandle, tlb: &mut Tlb, slow: bool) {
        let r = vcpu.check_requests();
        if r.tlb_flush() {
            tlb.flush_all();
        }
        if tlb.lookup(GFN).is_none() {
            self.walk(tlb);
        }
        let used = tlb.lookup(GFN).expect("just filled").pfn.raw();
        // A long instruction: the translation stays in use while a flusher may run. The check
        // below is still sound: a flush cannot return while this vCPU, in guest mode, has not
        // acknowledged it, and it acknowledges only in `check_requests` above or in `exit_guest`.
        if slow {
            thread::yield_now();
        }
        let flushed = self.flushed.load(Ordering::Acquire);
        assert!(
            used >= flushed,
            "vCPU used translation v{used} after the flush of v{flushed} returned"
        );
    }

    fn enter(&self, vcpu: &mut VcpuHandle, tlb: &mut Tlb) {
        if vcpu.enter_guest().tlb_flush() {
            tlb.flush_all();
        }
    }

    /// A zap + refault of the gfn followed by the remote flush, under `mmu_lock` like a notifier.
    fn zap_and_flush(&self, reqs: &VcpuRequests) {
        let _mmu = self.mmu_lock.lock().expect("mmu_lock poisoned");
        let v = self.version.fetch_add(1, Ordering::AcqRel) + 1;
        reqs.flush_remote_tlbs();
        self.flushed.fetch_max(v, Ordering::AcqRel);
    }
}

struct VcpuResult {
    stats: kvmmu::internals::vm::request::VcpuRequestStats,
    final_pfn: u64,
}

fn vcpu_thread(
    machine: Arc<Machine>,
    mut vcpu: VcpuHandle,
    start: Arc<Barrier>,
    min_rounds: usize,
    max_rounds: usize,
) -> VcpuResult {
    let mut tlb = Tlb::new(64);
    start.wait();
    for round in 0..max_rounds {
        if round >= min_rounds && machine.stop.load(Ordering::Acquire) {
            break;
        }
        machine.enter(&mut vcpu, &mut tlb);
        for i in 0..8 {
            machine.access(&mut vcpu, &mut tlb, i % 2 == 1);
        }
        vcpu.exit_guest();
        if round % 4 == 0 {
            // A fault: blocks on mmu_lock, which is legal only outside guest mode.
            drop(machine.mmu_lock.lock().expect("mmu_lock poisoned"));
        } else {
            thread::yield_now();
        }
    }
    // Wait (bounded) until every flusher is done; then one more entry must deliver any flush not
    // yet taken.
    for _ in 0..100_000_000u64 {
        if machine.stop.load(Ordering::Acquire) {
            break;
        }
        thread::yield_now();
    }
    assert!(
        machine.stop.load(Ordering::Acquire),
        "flushers never finished"
    );
    machine.enter(&mut vcpu, &mut tlb);
    machine.access(&mut vcpu, &mut tlb, false);
    let final_pfn = tlb.lookup(GFN).expect("filled by access").pfn.raw();
    vcpu.exit_guest();
    assert_eq!(vcpu.mode(), VcpuMode::OutsideGuest);
    VcpuResult {
        stats: vcpu.stats(),
        final_pfn,
    }
}

#[test]
fn racing_flushes_are_acknowledged_and_never_leave_stale_entries() {
    const VCPUS: usize = 3;
    const FLUSHERS: usize = 2;
    const FLUSHES_EACH: u64 = 300;
    const MIN_ROUNDS: usize = 300;
    const MAX_ROUNDS: usize = 1_000_000;

    with_watchdog("racing flushes", || {
        let reqs = VcpuRequests::new();
        let machine = Arc::new(Machine {
            version: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
            mmu_lock: Mutex::new(()),
            stop: AtomicBool::new(false),
        });
        let start = Arc::new(Barrier::new(VCPUS + FLUSHERS));
        let vcpus: Vec<_> = (0..VCPUS)
            .map(|_| {
                let handle = reqs.register();
                let (m, s) = (Arc::clone(&machine), Arc::clone(&start));
                thread::spawn(move || vcpu_thread(m, handle, s, MIN_ROUNDS, MAX_ROUNDS))
            })
            .collect();
        let flushers: Vec<_> = (0..FLUSHERS)
            .map(|i| {
                let (m, r, s) = (Arc::clone(&machine), Arc::clone(&reqs), Arc::clone(&start));
                thread::spawn(move || {
                    s.wait();
                    for n in 0..FLUSHES_EACH {
                        m.zap_and_flush(&r);
                        // Spread the flushes over the vCPUs' run.
                        thread::yield_now();
                        if i == 0 && n % 50 == 0 {
                            r.make_all_request(Request::MmuReload);
                        }
                    }
                })
            })
            .collect();
        for f in flushers {
            f.join().expect("flusher panicked");
        }
        machine.stop.store(true, Ordering::Release);
        let results: Vec<VcpuResult> = vcpus
            .into_iter()
            .map(|v| v.join().expect("vCPU panicked"))
            .collect();

        let total = FLUSHERS as u64 * FLUSHES_EACH;
        let final_version = machine.version.load(Ordering::Acquire);
        assert_eq!(final_version, total);
        let stats: RequestStats = reqs.stats();
        assert_eq!(stats.flushes, total, "every flush call is counted once");
        assert_eq!(stats.requests, FLUSHES_EACH.div_ceil(50), "MmuReload posts");
        assert_eq!(
            stats.vcpus, 0,
            "each vCPU thread dropped (unregistered) its handle"
        );
        assert!(stats.waited_vcpus <= total * VCPUS as u64);
        for r in &results {
            // No flush was lost: the last entry delivered the final flush, so the TLB was refilled
            // with the final translation.
            assert_eq!(r.final_pfn, final_version, "a flush request was lost");
            assert!(r.stats.tlb_flushes_taken >= 1 && r.stats.tlb_flushes_taken <= total);
            assert!(r.stats.mmu_reloads_taken >= 1 && r.stats.mmu_reloads_taken <= stats.requests);
            assert_eq!(
                r.stats.entries, r.stats.exits,
                "every entry was matched by an exit"
            );
        }
        drop(results);
    });
}

#[test]
fn flush_batches_beyond_64_in_guest_vcpus() {
    const VCPUS: usize = 70;
    const FLUSHES: u64 = 20;

    with_watchdog("batched flush", || {
        let reqs = VcpuRequests::new();
        let mut handles: Vec<VcpuHandle> = (0..VCPUS).map(|_| reqs.register()).collect();
        for h in &mut handles {
            assert!(h.enter_guest().is_empty());
        }
        let stop = Arc::new(AtomicBool::new(false));
        // One thread plays all 70 vCPUs, staying in guest mode and acking at "instruction
        // boundaries"; the flusher must wait for every one of them, across its stack batches.
        let acker = {
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let mut taken = 0u64;
                for _ in 0..100_000_000u64 {
                    if stop.load(Ordering::Acquire) {
                        break;
                    }
                    for h in &mut handles {
                        if h.check_requests().tlb_flush() {
                            taken += 1;
                        }
                    }
                    thread::yield_now();
                }
                (taken, handles)
            })
        };
        for _ in 0..FLUSHES {
            reqs.flush_remote_tlbs();
        }
        stop.store(true, Ordering::Release);
        let (taken, handles) = acker.join().expect("acker panicked");
        let s = reqs.stats();
        assert_eq!(s.flushes, FLUSHES);
        assert_eq!(
            s.waited_vcpus,
            FLUSHES * VCPUS as u64,
            "every in-guest vCPU is waited for"
        );
        // Every flush waited for every vCPU's ack, so none coalesced: each vCPU took each flush.
        assert_eq!(taken, FLUSHES * VCPUS as u64);
        assert!(handles.iter().all(|h| h.mode() == VcpuMode::InGuest));
        drop(handles);
        assert_eq!(reqs.vcpus(), 0);
    });
}

#[test]
fn vcpu_panicking_in_guest_mode_does_not_hang_flushers() {
    with_watchdog("panicking vCPU", || {
        let reqs = VcpuRequests::new();
        let mut handle = reqs.register();
        let entered = Arc::new(Barrier::new(2));
        let vcpu = {
            let entered = Arc::clone(&entered);
            thread::spawn(move || {
                handle.enter_guest();
                entered.wait();
                panic!("guest crashed while in guest mode");
            })
        };
        entered.wait();
        reqs.flush_remote_tlbs();
        assert!(vcpu.join().is_err(), "the vCPU thread panicked as scripted");
        assert_eq!(reqs.vcpus(), 0, "the unwinding drop unregistered the vCPU");
        assert_eq!(reqs.stats().flushes, 1);
    });
}
