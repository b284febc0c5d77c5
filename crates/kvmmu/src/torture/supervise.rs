//! The supervisor of a run (it waits for the vCPUs, stops the other actors, watches for stalls)
//! and the counter oracles checked at quiescence.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::host::HostMm;
use crate::vm::Vm;

use super::oracle::{self, ActorId, Shared, ViolationKind};
use super::{ActorThread, TortureConfig};

/// Operations every non-vCPU actor completes before a run bounded by `ops_per_vcpu` stops.
const MIN_OPS_PER_ACTOR: u64 = 8;

/// Waits for the vCPUs to finish (or the duration to elapse, or a violation), stops the other
/// actors, and watches for stalls. Returns true if an actor stalled (its thread is abandoned).
pub(super) fn supervise(
    cfg: &TortureConfig,
    vm: &Vm,
    sh: &Shared,
    threads: &[ActorThread],
) -> bool {
    let tick = Duration::from_millis(20);
    let mut last: Vec<(u64, Instant)> = threads.iter().map(|_| (0, Instant::now())).collect();
    let mut seq = vm.stats().invalidate.seq;
    loop {
        std::thread::sleep(tick);
        // Counter oracle 6: the invalidation sequence only grows.
        let now_seq = vm.stats().invalidate.seq;
        if now_seq < seq {
            sh.violation(
                ActorId::Watchdog,
                ViolationKind::Counter,
                None,
                format!("mmu_invalidate_seq went back from {seq} to {now_seq}"),
            );
        }
        seq = now_seq;
        if let Some(live) = &sh.live {
            // ORDERING: Relaxed: display counters (see `LiveProgress`).
            let ops = threads
                .iter()
                .map(|t| t.progress.ops.load(Ordering::Relaxed));
            live.ops.store(ops.sum(), Ordering::Relaxed);
        }
        // ORDERING: Acquire pairs with each thread's Release store of `done`.
        let done = |t: &ActorThread| t.progress.done.load(Ordering::Acquire);
        let vcpus_done = threads
            .iter()
            .filter(|t| matches!(t.actor, ActorId::Vcpu(_)))
            .all(done);
        // With a bounded operation count the vCPUs can finish before a descheduled actor ran
        // once (a loaded machine); such a run would test nothing of that actor, so the others
        // stop only once each completed MIN_OPS_PER_ACTOR operations (the watchdog still catches
        // one that stalls).
        // ORDERING: Relaxed: a progress counter.
        let others_ran = threads
            .iter()
            .filter(|t| !matches!(t.actor, ActorId::Vcpu(_)))
            .all(|t| done(t) || t.progress.ops.load(Ordering::Relaxed) >= MIN_OPS_PER_ACTOR);
        if (vcpus_done && others_ran) || cfg.duration.is_some_and(|d| sh.started.elapsed() >= d) {
            // ORDERING: Relaxed: actors poll it (oracle protocol 4).
            sh.stop.store(true, Ordering::Relaxed);
        }
        if threads.iter().all(done) {
            return false;
        }
        let now = Instant::now();
        for (t, (ops, since)) in threads.iter().zip(last.iter_mut()) {
            // ORDERING: Relaxed: a progress counter.
            let n = t.progress.ops.load(Ordering::Relaxed);
            if n != *ops || done(t) {
                *ops = n;
                *since = now;
            } else if now.duration_since(*since) >= cfg.stall_timeout {
                let dump: Vec<String> = threads
                    .iter()
                    .map(|t| {
                        format!(
                            "{}: {} ops, last {}{}",
                            t.actor,
                            // ORDERING: Relaxed: diagnostics.
                            t.progress.ops.load(Ordering::Relaxed),
                            oracle::describe_op(t.progress.last_op.load(Ordering::Relaxed)),
                            if done(t) { " (finished)" } else { "" }
                        )
                    })
                    .collect();
                sh.violation(
                    ActorId::Watchdog,
                    ViolationKind::Stall,
                    None,
                    format!(
                        "{} made no progress for {:?}; actors: {}",
                        t.actor,
                        cfg.stall_timeout,
                        dump.join("; ")
                    ),
                );
                return true;
            }
        }
    }
}

/// Counter oracles (6) at quiescence, then shutdown and release.
pub(super) fn quiescence_checks(sh: &Shared, host: &HostMm, vm: Arc<Vm>) {
    let fail =
        |detail: String| sh.violation(ActorId::Teardown, ViolationKind::Counter, None, detail);
    let s = vm.stats();
    if s.invalidate.in_progress != 0 {
        fail(format!(
            "mmu_invalidate_in_progress = {} at quiescence",
            s.invalidate.in_progress
        ));
    }
    if s.mn_active_invalidate_count != 0 {
        fail(format!(
            "mn_active_invalidate_count = {} at quiescence",
            s.mn_active_invalidate_count
        ));
    }
    if s.invalidate_starts != s.invalidate_ends {
        fail(format!(
            "{} invalidate_range_start but {} invalidate_range_end",
            s.invalidate_starts, s.invalidate_ends
        ));
    }
    let stale = host.arena().stats().stale_accesses;
    if stale != 0 {
        sh.violation(
            ActorId::Teardown,
            ViolationKind::StaleTranslation,
            None,
            format!("the frame arena counted {stale} stale accesses"),
        );
    }
    match Arc::try_unwrap(vm) {
        Ok(vm) => {
            let fin = vm.shutdown();
            if fin.tdp.tables_allocated != fin.tdp.tables_freed {
                fail(format!(
                    "after shutdown {} TDP tables allocated, {} freed",
                    fin.tdp.tables_allocated, fin.tdp.tables_freed
                ));
            }
            if fin.shadow.pages_allocated != fin.shadow.pages_freed {
                fail(format!(
                    "after shutdown {} shadow pages allocated, {} freed",
                    fin.shadow.pages_allocated, fin.shadow.pages_freed
                ));
            }
            if fin.shadow.rmap.desc_allocs != fin.shadow.rmap.desc_frees {
                fail(format!(
                    "after shutdown {} rmap descriptors allocated, {} freed",
                    fin.shadow.rmap.desc_allocs, fin.shadow.rmap.desc_frees
                ));
            }
        }
        Err(_) => fail("a VM reference outlived every actor".into()),
    }
    host.release();
    // The reclaim charge (docs/locking.md C1, C6): nothing is present after release, and no
    // uncharge was ever refused.
    if let Some(e) = host.charge_underflow() {
        fail(e.to_string());
    }
    let charged = host.reclaim_stats().charged;
    if charged != 0 {
        fail(format!("{charged} frames still charged after release"));
    }
    let frames = host.arena().stats().allocated;
    if frames != 0 {
        fail(format!(
            "{frames} host frames still allocated after release"
        ));
    }
}
