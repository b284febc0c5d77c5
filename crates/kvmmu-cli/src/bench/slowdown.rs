//! The `slowdown` scenario: a vCPU's populate and read passes with and without a thread aging the
//! same guest back to back, and the figures that take the difference apart.

use super::guest::{Guest, touch_read, touch_write};
use super::report::Report;
use super::{SLOWDOWN_TOUCH_PASSES, modes, populated};
use kvmmu::PAGE_SIZE;
use kvmmu::prelude::*;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Who ages while the slowdown scenario's vCPU runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ager {
    /// Nobody: the baseline.
    Nothing,
    /// `clear_young` over the vCPU's own guest, back to back (the scenario's subject).
    SameVm,
    /// The same passes over another host and VM in the same process, populated and idle (0%
    /// young): what the ager costs the vCPU through the memory system alone, with no line of
    /// guest state shared.
    OtherVm,
}

/// One slowdown run's measurements.
struct SlowdownSample {
    /// vCPU wall seconds.
    wall: f64,
    /// Aging passes completed during the run.
    passes: u64,
    /// vCPU wall seconds minus the time it waited for a CPU, when the OS reports it: the whole
    /// run, the populate phase, the read passes.
    on_cpu: Option<[f64; 3]>,
    /// Accessed bits the ager cleared in the vCPU's VM during the run: each one is an A bit the
    /// vCPU's walk set again (a CAS on an SPTE line the ager reads every pass).
    aged: u64,
}

/// The wall clock and the calling thread's CPU-wait so far, for [`on_cpu_since`].
fn cpu_mark() -> (Instant, Option<u64>) {
    (Instant::now(), thread_runqueue_wait_ns())
}

/// Seconds since `mark` minus the time the thread waited for a CPU meanwhile.
fn on_cpu_since(mark: (Instant, Option<u64>)) -> Option<f64> {
    let wall = mark.0.elapsed().as_secs_f64();
    let waited = mark
        .1
        .zip(thread_runqueue_wait_ns())
        .map(|(a, b)| b.saturating_sub(a) as f64 / 1e9)?;
    Some((wall - waited).max(0.0))
}

/// One slowdown run: a fresh guest, a vCPU populating then touching memory, with or without an aging
/// thread running passes back to back (on this guest or on another one).
fn slowdown_run(
    mmu: MmuKind,
    aging: AgingMode,
    pages: u64,
    ager: Ager,
) -> anyhow::Result<SlowdownSample> {
    let mut g = Guest::new(pages, mmu, aging, 1, VmConfig::default().tlb_entries)?;
    let other = match ager {
        Ager::OtherVm => {
            let mut o = populated(mmu, aging, pages, VmConfig::default().tlb_entries)?;
            o.age()?;
            drop(std::mem::take(&mut o.vcpus));
            Some(o)
        }
        _ => None,
    };
    let aged_before = g.accessed_cleared();
    let Guest {
        host, hva, vcpus, ..
    } = &mut g;
    let stop = AtomicBool::new(false);
    let bytes = pages * PAGE_SIZE;
    let (aged_host, aged_hva) = match &other {
        Some(o) => (&o.host, o.hva),
        None => (&*host, *hva),
    };
    let (wall, passes, on_cpu) =
        std::thread::scope(|s| -> anyhow::Result<(f64, u64, Option<[f64; 3]>)> {
            let ager = (ager != Ager::Nothing).then(|| {
                let stop = &stop;
                kvmmu_cli::vcpus::spawn_named(s, "aging".into(), move || -> anyhow::Result<u64> {
                    let mut n = 0;
                    // ORDERING: Relaxed: a stop flag; the join orders everything after it.
                    while !stop.load(Ordering::Relaxed) {
                        aged_host.clear_young(aged_hva, bytes)?;
                        n += 1;
                    }
                    Ok(n)
                })
            });
            let whole = cpu_mark();
            let mut phases = [None, None];
            let res = (|| -> anyhow::Result<()> {
                let m = cpu_mark();
                touch_write(&mut vcpus[0], 0..pages)?;
                phases[0] = on_cpu_since(m);
                let m = cpu_mark();
                for _ in 0..SLOWDOWN_TOUCH_PASSES {
                    black_box(touch_read(&mut vcpus[0], pages, 1)?);
                }
                phases[1] = on_cpu_since(m);
                Ok(())
            })();
            let wall = whole.0.elapsed().as_secs_f64();
            let on_cpu = on_cpu_since(whole)
                .zip(phases[0].zip(phases[1]))
                .map(|(w, (p, r))| [w, p, r]);
            // ORDERING: Relaxed: see the load.
            stop.store(true, Ordering::Relaxed);
            let passes = match ager {
                Some(h) => h
                    .join()
                    .map_err(|_| anyhow::anyhow!("aging thread panicked"))??,
                None => 0,
            };
            res?;
            Ok((wall, passes, on_cpu))
        })?;
    let aged = g.accessed_cleared() - aged_before;
    drop(g.vcpus);
    g.vm.shutdown();
    if let Some(o) = other {
        o.vm.shutdown();
    }
    Ok(SlowdownSample {
        wall,
        passes,
        on_cpu,
        aged,
    })
}

/// Nanoseconds the calling thread has spent runnable but waiting for a CPU (Linux
/// `/proc/thread-self/schedstat`, second field); None where the OS does not report it.
fn thread_runqueue_wait_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().nth(1)?.parse().ok()
}

/// The slowdown scenario's samples of one aging mode, per [`Ager`] (index `Ager as usize`).
#[derive(Default)]
struct SlowdownSamples {
    wall: [Vec<f64>; 3],
    /// Whole run, populate, read passes (minus CPU-wait), in ms.
    on_cpu: [[Vec<f64>; 3]; 3],
    passes: [Vec<f64>; 3],
    aged: [Vec<f64>; 3],
}

impl SlowdownSamples {
    fn push(&mut self, ager: Ager, s: &SlowdownSample) {
        let a = ager as usize;
        self.wall[a].push(s.wall * 1e3);
        if let Some(oc) = s.on_cpu {
            for (v, x) in self.on_cpu[a].iter_mut().zip(oc) {
                v.push(x * 1e3);
            }
        }
        self.passes[a].push(s.passes as f64);
        self.aged[a].push(s.aged as f64);
    }
}

pub(super) fn slowdown(r: &mut Report, mmu: MmuKind, pages: u64, reps: u32) -> anyhow::Result<()> {
    let mut samples: [SlowdownSamples; 2] = Default::default();
    for _ in 0..reps {
        for (i, (m, _)) in modes().iter().enumerate() {
            // Aging another VM only with the lockless mode (the one with a target).
            let agers: &[Ager] = if i == 0 {
                &[Ager::Nothing, Ager::SameVm, Ager::OtherVm]
            } else {
                &[Ager::Nothing, Ager::SameVm]
            };
            for &a in agers {
                let s = slowdown_run(mmu, *m, pages, a)?;
                samples[i].push(a, &s);
            }
        }
    }
    let (off_i, on_i, other_i) = (
        Ager::Nothing as usize,
        Ager::SameVm as usize,
        Ager::OtherVm as usize,
    );
    for (i, (_, name)) in modes().iter().enumerate() {
        let sm = &mut samples[i];
        let off = r.figure(
            "slowdown",
            format!("vCPU wall, no aging ({name} VM)"),
            "ms",
            std::mem::take(&mut sm.wall[off_i]),
        );
        let on = r.figure(
            "slowdown",
            format!("vCPU wall, continuous {name} aging"),
            "ms",
            std::mem::take(&mut sm.wall[on_i]),
        );
        let passes = r.figure(
            "slowdown",
            format!("aging passes during the run ({name})"),
            "passes",
            std::mem::take(&mut sm.passes[on_i]),
        );
        let aged = r.figure(
            "slowdown",
            format!("A bits aged during the run ({name}): re-set by the vCPU's walks"),
            "SPTEs",
            std::mem::take(&mut sm.aged[on_i]),
        );
        r.figure(
            "slowdown",
            format!("A bits aged per aging pass ({name})"),
            "SPTEs",
            vec![aged / passes.max(1.0)],
        );
        r.ratio(
            format!("vCPU slowdown, {name} aging"),
            on / off,
            "vCPU wall with aging / without",
            (i == 0).then_some((1.03, false)),
        );
        if sm.on_cpu[off_i][0].is_empty() || sm.on_cpu[on_i][0].is_empty() {
            continue;
        }
        let off = r.figure(
            "slowdown",
            format!("vCPU wall minus CPU-wait, no aging ({name} VM)"),
            "ms",
            std::mem::take(&mut sm.on_cpu[off_i][0]),
        );
        let on = r.figure(
            "slowdown",
            format!("vCPU wall minus CPU-wait, continuous {name} aging"),
            "ms",
            std::mem::take(&mut sm.on_cpu[on_i][0]),
        );
        r.ratio(
            format!("vCPU slowdown excluding CPU-wait, {name} aging"),
            on / off,
            "as above, runqueue wait removed",
            (i == 0).then_some((1.05, false)),
        );
        if i != 0 {
            continue;
        }
        // Where the lockless ager's cost lands, and what an ager costs with nothing shared.
        for (k, phase) in [(1, "populate"), (2, "read passes")] {
            let off = r.figure(
                "slowdown",
                format!("vCPU {phase} minus CPU-wait, no aging ({name} VM)"),
                "ms",
                std::mem::take(&mut sm.on_cpu[off_i][k]),
            );
            let on = r.figure(
                "slowdown",
                format!("vCPU {phase} minus CPU-wait, continuous {name} aging"),
                "ms",
                std::mem::take(&mut sm.on_cpu[on_i][k]),
            );
            r.ratio(
                format!("vCPU {phase} slowdown excluding CPU-wait, {name} aging"),
                on / off,
                "the phase's share of the row above",
                None,
            );
        }
        let other = r.figure(
            "slowdown",
            format!("vCPU wall minus CPU-wait, {name} aging of another VM"),
            "ms",
            std::mem::take(&mut sm.on_cpu[other_i][0]),
        );
        r.figure(
            "slowdown",
            format!("aging passes during the run (another VM, {name})"),
            "passes",
            std::mem::take(&mut sm.passes[other_i]),
        );
        r.ratio(
            format!("vCPU slowdown excluding CPU-wait, {name} aging of another VM"),
            other / off,
            "memory-system contention alone (no guest line shared)",
            None,
        );
    }
    slowdown_read_pass_costs(r, mmu, pages, reps)
}

/// What one read pass over the guest costs the vCPU (ns per access, CPU-wait excluded) after an
/// aging pass that ran before it, not concurrently: so the parts of the slowdown are measured
/// even on a machine where the two threads rarely run at once. The pass before is (0) none (A
/// bits set), (1) on the vCPU's thread (the vCPU re-sets every A bit: a CAS per access), (2) on
/// another thread (the same, and every SPTE line was last read or written by another core),
/// (3) on another thread over another VM (the ager's memory traffic alone), (4) on the vCPU's
/// thread over another VM (the same traffic through the vCPU's own caches: (1) minus (4) is what
/// re-setting the A bits costs).
fn slowdown_read_pass_costs(
    r: &mut Report,
    mmu: MmuKind,
    pages: u64,
    reps: u32,
) -> anyhow::Result<()> {
    let tlb = VmConfig::default().tlb_entries;
    let mut g = populated(mmu, AgingMode::Lockless, pages, tlb)?;
    let mut o = populated(mmu, AgingMode::Lockless, pages, tlb)?;
    drop(std::mem::take(&mut o.vcpus));
    let bytes = pages * PAGE_SIZE;
    let age_elsewhere = |host: &HostMm, hva: Hva| -> anyhow::Result<()> {
        std::thread::scope(|s| {
            kvmmu_cli::vcpus::spawn_named(s, "aging".into(), || host.clear_young(hva, bytes))
                .join()
                .map_err(|_| anyhow::anyhow!("aging thread panicked"))
        })??;
        Ok(())
    };
    let mut t: [Vec<f64>; 5] = Default::default();
    black_box(touch_read(&mut g.vcpus[0], pages, 1)?);
    for _ in 0..reps {
        for (k, v) in t.iter_mut().enumerate() {
            match k {
                1 => {
                    g.age()?;
                }
                2 => age_elsewhere(&g.host, g.hva)?,
                3 => age_elsewhere(&o.host, o.hva)?,
                4 => {
                    o.age()?;
                }
                _ => {}
            }
            let m = cpu_mark();
            black_box(touch_read(&mut g.vcpus[0], pages, 1)?);
            if let Some(x) = on_cpu_since(m) {
                v.push(x * 1e9 / pages as f64);
            }
        }
    }
    let names = [
        "no aging pass before (A bits set)",
        "after an aging pass on the vCPU's thread",
        "after an aging pass on another thread",
        "after another thread aged another VM",
        "after the vCPU's thread aged another VM",
    ];
    for (k, name) in names.iter().enumerate() {
        r.figure(
            "slowdown",
            format!("one read pass, {name}"),
            "ns/access",
            std::mem::take(&mut t[k]),
        );
    }
    o.vm.shutdown();
    drop(g.vcpus);
    g.vm.shutdown();
    Ok(())
}
