//! Phase timing is measured where the work happens: under CPU hogs that deschedule any thread at
//! any time, no phase is ever reported shorter than the work of one of the threads that did it.
//! (A structural property of how phases are timed, not a speed assertion.)

use kvmmu_cli::access_tracking::{self, AccessArgs, IdleArg};
use kvmmu_cli::mmu_stress::{self, StressArgs};
use kvmmu_cli::report::Report;
use kvmmu_cli::{AgingArg, MmuArg};
use std::sync::atomic::{AtomicBool, Ordering};

/// Runs `f` while one spinning thread per CPU (plus one) competes with it for every core.
fn under_cpu_hogs<T>(f: impl FnOnce() -> T) -> T {
    let stop = AtomicBool::new(false);
    let hogs = std::thread::available_parallelism().map_or(2, |n| n.get()) + 1;
    std::thread::scope(|s| {
        for _ in 0..hogs {
            s.spawn(|| {
                let mut x = 0u64;
                // ORDERING: Relaxed: a stop flag; the scope's join orders everything after it.
                while !stop.load(Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                }
            });
        }
        let r = f();
        // ORDERING: Relaxed: see the load.
        stop.store(true, Ordering::Relaxed);
        r
    })
}

/// Every phase timed by several threads lasts at least as long as each thread's own work.
fn assert_no_phase_shorter_than_its_threads(r: &Report) -> usize {
    let mut checked = 0;
    for p in &r.phases {
        if let Some(max) = p.thread_seconds.iter().copied().reduce(f64::max) {
            assert!(
                p.seconds >= max,
                "phase '{}' of {} reported {} s, shorter than one of its threads' own {} s",
                p.name,
                r.command,
                p.seconds,
                max
            );
            checked += 1;
        }
    }
    checked
}

fn access(idle: IdleArg, p: bool) -> AccessArgs {
    AccessArgs {
        ad_disabled: false,
        vcpus: 2,
        bytes_per_vcpu: 1 << 20,
        overlap: false,
        idle_policy: Some(1),
        mmu: MmuArg::Tdp,
        aging: AgingArg::Lockless,
        idle,
        tlb_entries: 16,
        seed: 1,
        random_access: false,
        age_while_populating: p,
        no_aging_thread: false,
        backing_src: kvmmu::BackingSrc::Anonymous,
        nested: false,
        nested_aliases: 1,
    }
}

#[test]
fn access_tracking_phase_is_never_shorter_than_its_vcpus_own_work_under_cpu_hogs() {
    let checked = under_cpu_hogs(|| {
        let mut checked = 0;
        for run in 0..24 {
            let a = match run % 3 {
                0 => access(IdleArg::LruGen, false),
                1 => access(IdleArg::PageIdle, false),
                _ => access(IdleArg::LruGen, true),
            };
            let r = access_tracking::run(&a).expect("access-tracking runs");
            checked += assert_no_phase_shorter_than_its_threads(&r);
        }
        checked
    });
    // Every access phase and the page-idle marking carry per-thread spans.
    assert!(
        checked >= 24 * 3,
        "only {checked} phases carried thread spans"
    );
}

#[test]
fn mmu_stress_stage_is_never_shorter_than_its_participants_own_work_under_cpu_hogs() {
    let a = StressArgs {
        vcpus: 2,
        max_mem: 2 << 20,
        slot_size: 1 << 20,
        mmu: MmuArg::Tdp,
        aging: AgingArg::Lockless,
        age: false,
        tlb_entries: 64,
        reclaim: false,
        limit: None,
        hugepages: false,
        nested: false,
    };
    let checked = under_cpu_hogs(|| {
        (0..6)
            .map(|_| {
                let r = mmu_stress::run(&a).expect("mmu-stress runs");
                assert!(r.passed, "{}", r.failures());
                assert_no_phase_shorter_than_its_threads(&r)
            })
            .sum::<usize>()
    });
    assert_eq!(
        checked,
        6 * 5,
        "run 1, reset, run 2, ro and rw each carry spans"
    );
}
