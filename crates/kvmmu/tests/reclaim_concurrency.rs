//! Reclaim racing vCPUs on both MMUs and both aging modes: vCPUs write and read back their own
//! pages while kswapd, direct reclaim, explicit page-outs and aging evict and refault them. No
//! value is ever lost, no access goes through a stale translation, and every eviction is a
//! balanced invalidate pair. Bounded loops and a watchdog: a hang fails the test.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::Duration;

use common::*;
use kvmmu::internals::host::{ReclaimAging, ReclaimConfig};
use kvmmu::prelude::*;

const PAGE: u64 = 4096;
const PAGES: u64 = 256;
const LIMIT: u64 = 160;
const VCPUS: u64 = 2;
const OPS: u64 = 6_000;
const MIN_ROUNDS: u64 = 300;
const WATCHDOG: Duration = Duration::from_secs(240);

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

/// A small deterministic generator (xorshift).
fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Runs the scenario; returns the problems found (empty when the run is clean).
fn scenario(config: VmConfig, aging: ReclaimAging) -> Vec<String> {
    let host = HostMm::new(HostConfig {
        frames: (PAGES * 2) as usize,
    })
    .unwrap();
    host.enable_reclaim(ReclaimConfig {
        limit_frames: LIMIT,
        swap_slots: PAGES,
        aging,
    })
    .unwrap();
    let vm = Arc::new(Vm::new(&host, config).unwrap());
    let hva = host.mmap(PAGES * PAGE, Prot::READ | Prot::WRITE).unwrap();
    vm.set_user_memory_region(region(0, BASE_GPA, PAGES * PAGE, hva))
        .unwrap();
    let kswapd = host.spawn_kswapd().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // Reclaimer rounds done: the vCPUs keep going (bounded) until it has run a while, so the two
    // overlap however the threads are scheduled.
    let rounds = Arc::new(AtomicU64::new(0));

    let vcpus: Vec<_> = (0..VCPUS)
        .map(|id| {
            let (vm, rounds) = (Arc::clone(&vm), Arc::clone(&rounds));
            thread::spawn(move || {
                let mut problems = Vec::new();
                let mut vcpu = vm.create_vcpu().unwrap();
                // Page p belongs to vCPU p % VCPUS; word 0 and word 511 both hold its value.
                let mine: Vec<u64> = (0..PAGES).filter(|p| p % VCPUS == id).collect();
                let mut last = vec![0u64; mine.len()];
                let mut x = 0x9e37_79b9_7f4a_7c15 ^ (id + 1);
                for op in 0..OPS * 50 {
                    // ORDERING: Relaxed: only paces the loop.
                    if op >= OPS && rounds.load(Ordering::Relaxed) >= MIN_ROUNDS {
                        break;
                    }
                    let i = (next(&mut x) % mine.len() as u64) as usize;
                    // A hot quarter gets most accesses, so aging has something to keep.
                    let i = if op % 4 != 0 { i % (mine.len() / 4) } else { i };
                    let g = gpa(mine[i]);
                    let end = Gpa::new(g.raw() + 4088);
                    if next(&mut x).is_multiple_of(2) {
                        let v = (id << 56) | (op + 1);
                        let r = vcpu.write_u64(g, v).and_then(|()| vcpu.write_u64(end, !v));
                        match r {
                            Ok(()) => last[i] = v,
                            Err(e) => {
                                problems.push(format!("vcpu{id} write page {}: {e}", mine[i]))
                            }
                        }
                    } else {
                        let r = vcpu.read_u64(g).and_then(|a| Ok((a, vcpu.read_u64(end)?)));
                        match r {
                            Ok((a, b)) if a == last[i] && (a == 0 && b == 0 || b == !a) => {}
                            Ok((a, b)) => problems.push(format!(
                                "vcpu{id} page {}: read {a:#x}/{b:#x}, last written {:#x}",
                                mine[i], last[i]
                            )),
                            Err(e) => problems.push(format!("vcpu{id} read page {}: {e}", mine[i])),
                        }
                    }
                    if problems.len() > 10 {
                        break;
                    }
                }
                // A final pass over every page.
                for (i, &p) in mine.iter().enumerate() {
                    match vcpu.read_u64(gpa(p)) {
                        Ok(v) if v == last[i] => {}
                        other => problems.push(format!(
                            "vcpu{id} final read of page {p}: {other:?}, last written {:#x}",
                            last[i]
                        )),
                    }
                }
                problems
            })
        })
        .collect();

    // Explicit page-outs and aging passes racing the vCPUs (bounded).
    let reclaimer = {
        let (host, stop, done) = (host.clone(), Arc::clone(&stop), Arc::clone(&rounds));
        thread::spawn(move || {
            let mut problems = Vec::new();
            let mut x = 0x1234_5678_9abc_def1u64;
            for round in 0..100_000u64 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let first = next(&mut x) % (PAGES - 4);
                let r = if round % 3 == 0 {
                    host.reclaim(8).map(|_| ())
                } else {
                    host.page_out(hva_of(hva, first), 4 * PAGE).map(|_| ())
                };
                if let Err(e) = r {
                    problems.push(format!("reclaimer: {e}"));
                    break;
                }
                if round % 7 == 0 {
                    let _ = host.clear_young_range(hva, PAGES * PAGE);
                }
                // ORDERING: Relaxed: only paces the vCPUs.
                done.store(round + 1, Ordering::Relaxed);
                thread::yield_now();
            }
            problems
        })
    };

    let mut problems: Vec<String> = Vec::new();
    for v in vcpus {
        problems.extend(v.join().expect("vcpu thread"));
    }
    stop.store(true, Ordering::Relaxed);
    problems.extend(reclaimer.join().expect("reclaimer thread"));
    drop(kswapd);

    let hs = host.stats();
    let rs = host.reclaim_stats();
    if hs.invalidate_start != hs.invalidate_end {
        problems.push(format!(
            "{} invalidate_range_start but {} invalidate_range_end",
            hs.invalidate_start, hs.invalidate_end
        ));
    }
    let vs = vm.stats();
    if vs.invalidate_starts != vs.invalidate_ends || vs.invalidate.in_progress != 0 {
        problems.push(format!("unbalanced VM invalidations: {vs:?}"));
    }
    let stale = host.arena().stats().stale_accesses;
    if stale != 0 {
        problems.push(format!("{stale} stale frame accesses"));
    }
    if rs.evicted == 0 || rs.refaults == 0 {
        problems.push(format!("the run evicted or refaulted nothing: {rs:?}"));
    }
    if rs.charged != host.arena().stats().allocated {
        problems.push(format!(
            "charged {} != allocated {}",
            rs.charged,
            host.arena().stats().allocated
        ));
    }
    problems
}

fn check(mmu: MmuKind, aging: AgingMode, reclaim: ReclaimAging) {
    let config = VmConfig {
        mmu,
        aging,
        ..VmConfig::default()
    };
    let name = format!("{mmu:?}/{aging:?}/{reclaim:?}");
    let problems = with_watchdog(&name.clone(), move || scenario(config, reclaim));
    assert!(problems.is_empty(), "{name}:\n{}", problems.join("\n"));
}

#[test]
fn tdp_lockless_aging_reclaim_loses_no_data() {
    check(MmuKind::Tdp, AgingMode::Lockless, ReclaimAging::Generations);
}

#[test]
fn tdp_locked_aging_reclaim_loses_no_data() {
    check(MmuKind::Tdp, AgingMode::Locked, ReclaimAging::Generations);
}

#[test]
fn shadow_lockless_aging_reclaim_loses_no_data() {
    check(
        MmuKind::Shadow,
        AgingMode::Lockless,
        ReclaimAging::Generations,
    );
}

#[test]
fn shadow_locked_aging_reclaim_loses_no_data() {
    check(
        MmuKind::Shadow,
        AgingMode::Locked,
        ReclaimAging::Generations,
    );
}

#[test]
fn reclaim_without_aging_loses_no_data() {
    check(MmuKind::Tdp, AgingMode::Lockless, ReclaimAging::None);
}
