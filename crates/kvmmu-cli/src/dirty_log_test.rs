//! `kvmmu dirty-log-test`: KVM's `dirty_log_test` on kvmmu (modes `dirty-log` and `clear-log`).
//!
//! Protocol, per iteration `it` (from 1): every vCPU enters guest mode and writes `it` into random
//! pages of the logged slot for `-I` milliseconds, then leaves guest mode and waits; the main
//! thread harvests the slot (`dirty-log`: a classic `get_dirty_log`, which re-arms;
//! `clear-log`: manual protect, `get_dirty_log` then `clear_dirty_log` with the bits it returned)
//! and checks the selftest's oracle on every page: a page reported dirty holds `it`, a clean page
//! an older value (`< it`). The vCPUs stop while the harvest is checked, so the oracle is exact:
//! a write the log missed shows as a clean page holding `it`. With `--age`, a thread ages the
//! slot locklessly throughout (aging must never lose a Dirty bit or a logged page).
//!
//! In `dirty-ring` mode (`-c` entries per vCPU) the harvest collects every ring and resets them;
//! a vCPU that exits with `DirtyRingFull` stops writing until the next iteration, and the page
//! whose write that exit cut off (its entry was pushed by the fault, the write not performed) may
//! be reported dirty while holding an older value: the ring's documented tolerance.
//!
//! A build whose re-arm skips the remote TLB flush (feature `broken-rearm-no-flush`) fails this
//! check: each vCPU keeps writing through TLB entries cached before the re-arm.

use crate::report::{Report, progress};
use crate::{AgingArg, MmuArg, OutputArgs, TrackingArg, vm_config};
use anyhow::{Context, anyhow};
use clap::{Args, ValueEnum};
use kvmmu::prelude::*;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

/// Guest physical address of the logged slot.
const BASE_GPA: u64 = 1 << 32;
/// Writes between two looks at the stop flag.
const BATCH: u64 = 64;

/// `-M`: how the log is harvested.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogMode {
    /// `KVM_GET_DIRTY_LOG` returns and re-arms.
    DirtyLog,
    /// Manual protect: `KVM_GET_DIRTY_LOG`, then `KVM_CLEAR_DIRTY_LOG` re-arms.
    ClearLog,
    /// Per-vCPU dirty rings: collect, then `KVM_RESET_DIRTY_RINGS` re-arms.
    DirtyRing,
}

/// Options of `dirty-log-test`.
#[derive(Debug, Clone, Args)]
pub struct DirtyLogTestArgs {
    /// Harvest mode.
    #[arg(short = 'M', long, value_enum, default_value_t = LogMode::DirtyLog)]
    pub mode: LogMode,

    /// Iterations (harvests).
    #[arg(short = 'i', long, default_value_t = 32)]
    pub iterations: u64,

    /// Dirty ring size in entries (-M dirty-ring; a power of two, at least 128).
    #[arg(short = 'c', long, default_value_t = 4096)]
    pub ring_size: u32,

    /// Milliseconds the vCPUs write between two harvests.
    #[arg(short = 'I', long, default_value_t = 10)]
    pub interval: u64,

    /// Pages in the logged slot.
    #[arg(short = 'p', long, default_value_t = 16384)]
    pub pages: u64,

    /// Number of vCPUs.
    #[arg(short = 'v', long, default_value_t = 1)]
    pub vcpus: usize,

    /// Which MMU maps guest memory.
    #[arg(long, value_enum, default_value_t = MmuArg::Tdp)]
    pub mmu: MmuArg,

    /// How pages are re-armed: write-protection (faults, the fast page fault) or D bits (PML-like).
    #[arg(long, value_enum, default_value_t = TrackingArg::WriteProtect)]
    pub tracking: TrackingArg,

    /// How aging reaches the SPTEs (with --age).
    #[arg(long, value_enum, default_value_t = AgingArg::Lockless)]
    pub aging: AgingArg,

    /// Age the slot from another thread throughout.
    #[arg(long)]
    pub age: bool,

    /// Entries in each vCPU's software TLB.
    #[arg(long, default_value_t = 2048)]
    pub tlb_entries: usize,

    /// Seed of the vCPUs' page choice.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// `dirty-log-test` with its output options.
#[derive(Debug, Clone, Args)]
pub struct DirtyLogTestCommand {
    /// The workload.
    #[command(flatten)]
    pub args: DirtyLogTestArgs,
    /// Output.
    #[command(flatten)]
    pub out: OutputArgs,
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

fn check_args(a: &DirtyLogTestArgs) -> anyhow::Result<()> {
    crate::check_vcpus("-v/--vcpus", a.vcpus)?;
    crate::error::require(a.iterations >= 1, || {
        "-i/--iterations must be at least 1".into()
    })?;
    crate::error::require((1..=1 << 22).contains(&a.pages), || {
        format!("-p/--pages must be between 1 and 4194304 (got {})", a.pages)
    })?;
    crate::error::require(a.interval <= 60_000, || {
        format!(
            "-I/--interval must be at most 60000 ms (got {})",
            a.interval
        )
    })
}

/// What the main thread found in one harvest.
#[derive(Default)]
struct Verdict {
    dirty: u64,
    clean: u64,
    /// Dirty pages not holding the current iteration.
    bad_dirty: Vec<(u64, u64)>,
    /// Clean pages holding the current iteration (a lost write) or a newer one.
    bad_clean: Vec<(u64, u64)>,
}

/// Runs the test and returns its report.
pub fn run(a: &DirtyLogTestArgs) -> anyhow::Result<Report> {
    check_args(a)?;
    let bytes = a.pages * 4096;
    let host = HostMm::new(HostConfig {
        frames: a.pages as usize + 1024,
    })?;
    let vm = Vm::new(&host, vm_config(a.mmu, a.aging, a.tlb_entries))?;
    vm.set_dirty_tracking(a.tracking.mode())?;
    if a.mode == LogMode::ClearLog {
        vm.set_dirty_log_protect(DirtyLogProtect::Manual {
            initially_set: false,
        })?;
    }
    if a.mode == LogMode::DirtyRing {
        vm.enable_dirty_ring(a.ring_size)
            .map_err(|e| crate::error::usage(format!("-c/--ring-size: {e}")))?;
    }
    let hva = host.mmap(bytes, Prot::READ | Prot::WRITE)?;
    let (as0, slot) = (AsId::new(0), SlotId::new(0));
    vm.set_user_memory_region(MemoryRegion {
        slot,
        as_id: as0,
        flags: MemFlags::LOG_DIRTY_PAGES,
        gpa: Gpa::new(BASE_GPA),
        size: bytes,
        hva,
    })?;
    let mut vcpus: Vec<Vcpu> = (0..a.vcpus)
        .map(|_| vm.create_vcpu())
        .collect::<Result<_, _>>()?;

    let iteration = AtomicU64::new(1);
    let stop = AtomicBool::new(false);
    let done = AtomicBool::new(false);
    let failed: Mutex<Option<String>> = Mutex::new(None);
    let writes = AtomicU64::new(0);
    let ring_full_exits = AtomicU64::new(0);
    // Pages whose write a DirtyRingFull exit cut off after the fault pushed their entry: the
    // ring's documented tolerance (reported dirty, still holding an older value).
    let cut_off: Mutex<Vec<u64>> = Mutex::new(Vec::new());
    // vCPUs + main thread meet twice per iteration: after writing, and after the harvest.
    let barrier = Barrier::new(a.vcpus + 1);
    let mut verdicts: Vec<Verdict> = Vec::new();
    let bar = progress::bar(a.iterations, "dirty-log-test");
    let start = Instant::now();
    let before = vm.stats();
    std::thread::scope(|s| -> anyhow::Result<()> {
        for (i, vcpu) in vcpus.iter_mut().enumerate() {
            let (iteration, stop, done, barrier, failed, writes) =
                (&iteration, &stop, &done, &barrier, &failed, &writes);
            let (ring_full_exits, cut_off) = (&ring_full_exits, &cut_off);
            let pages = a.pages;
            let mut rng = (a.seed ^ ((i as u64 + 1) << 32)).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            s.spawn(move || {
                loop {
                    let it = iteration.load(Ordering::Acquire);
                    let mut n = 0;
                    {
                        let mut g = vcpu.enter();
                        'run: loop {
                            for _ in 0..BATCH {
                                let page = xorshift(&mut rng) % pages;
                                let r = g.write_u64(Gpa::new(BASE_GPA + page * 4096), it);
                                if r == Err(VcpuExit::DirtyRingFull) {
                                    ring_full_exits.fetch_add(1, Ordering::Relaxed);
                                    cut_off.lock().unwrap_or_else(|p| p.into_inner()).push(page);
                                    break 'run;
                                }
                                if let Err(e) = r {
                                    *failed.lock().unwrap_or_else(|p| p.into_inner()) =
                                        Some(format!("vCPU {i}: {e}"));
                                    break 'run;
                                }
                                n += 1;
                            }
                            if stop.load(Ordering::Acquire) {
                                break;
                            }
                        }
                    }
                    writes.fetch_add(n, Ordering::Relaxed);
                    barrier.wait();
                    barrier.wait();
                    if done.load(Ordering::Acquire) {
                        return;
                    }
                }
            });
        }
        if a.age {
            let (host, done) = (&host, &done);
            s.spawn(move || {
                while !done.load(Ordering::Acquire) {
                    let _ = host.clear_young(hva, bytes);
                }
            });
        }
        let mut result = Ok(());
        for it in 1..=a.iterations {
            std::thread::sleep(Duration::from_millis(a.interval));
            stop.store(true, Ordering::Release);
            barrier.wait();
            stop.store(false, Ordering::Release);
            let cut: Vec<u64> =
                std::mem::take(&mut *cut_off.lock().unwrap_or_else(|p| p.into_inner()));
            let v = harvest_and_verify(&vm, &host, hva, a, it, &cut);
            iteration.store(it + 1, Ordering::Release);
            if it == a.iterations || v.is_err() {
                done.store(true, Ordering::Release);
            }
            barrier.wait();
            bar.inc(1);
            match v {
                Ok(v) => verdicts.push(v),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        done.store(true, Ordering::Release);
        result
    })?;
    bar.finish_and_clear();
    let elapsed = start.elapsed();
    if let Some(e) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(anyhow!(e));
    }
    let after = vm.stats();

    let mut r = Report::new("dirty-log-test");
    r.config("mode", a.mode);
    r.config("iterations", a.iterations);
    r.config("interval_ms", a.interval);
    r.config("pages", a.pages);
    r.config("vcpus", a.vcpus);
    r.config("mmu", a.mmu);
    r.config("tracking", a.tracking);
    r.config("aging", a.aging);
    r.config("age", a.age);
    r.phase("iterations", elapsed);
    let bad_dirty: Vec<String> = verdicts
        .iter()
        .enumerate()
        .flat_map(|(i, v)| {
            v.bad_dirty
                .iter()
                .map(move |(p, val)| format!("iteration {}: page {p} dirty but holds {val}", i + 1))
        })
        .collect();
    let bad_clean: Vec<String> = verdicts
        .iter()
        .enumerate()
        .flat_map(|(i, v)| {
            v.bad_clean.iter().map(move |(p, val)| {
                format!(
                    "iteration {}: page {p} clean but holds {val} (a lost write)",
                    i + 1
                )
            })
        })
        .collect();
    r.require(
        "every page reported dirty holds the current iteration",
        bad_dirty.is_empty(),
        summarize(&bad_dirty),
    );
    r.require(
        "every clean page holds an older iteration (no write lost)",
        bad_clean.is_empty(),
        summarize(&bad_clean),
    );
    r.require(
        "every iteration ran",
        verdicts.len() as u64 == a.iterations,
        format!("{} of {}", verdicts.len(), a.iterations),
    );
    let dirty: u64 = verdicts.iter().map(|v| v.dirty).sum();
    let clean: u64 = verdicts.iter().map(|v| v.clean).sum();
    r.counts.insert("pages_reported_dirty".into(), dirty);
    r.counts.insert("pages_clean".into(), clean);
    r.counts
        .insert("guest_writes".into(), writes.load(Ordering::Relaxed));
    if a.mode == LogMode::DirtyRing {
        r.config("ring_size", a.ring_size);
        r.counts.insert(
            "dirty_ring_full_exits".into(),
            ring_full_exits.load(Ordering::Relaxed),
        );
    }
    for (k, v) in crate::vm_counts(&after) {
        r.counts
            .insert(k.clone(), v - crate::vm_counts(&before)[&k]);
    }
    r.counts
        .insert("pf_fast".into(), after.pf_fast - before.pf_fast);
    r.counts
        .insert("pf_fixed".into(), after.pf_fixed - before.pf_fixed);
    Ok(r)
}

fn summarize(lines: &[String]) -> String {
    if lines.is_empty() {
        return "none".into();
    }
    let mut s = format!("{} pages: ", lines.len());
    s.push_str(&lines.iter().take(3).cloned().collect::<Vec<_>>().join("; "));
    s
}

/// Harvests the slot as the mode says and checks the oracle on every page.
fn harvest_and_verify(
    vm: &Vm,
    host: &HostMm,
    hva: Hva,
    a: &DirtyLogTestArgs,
    it: u64,
    cut_off: &[u64],
) -> anyhow::Result<Verdict> {
    let (as0, slot) = (AsId::new(0), SlotId::new(0));
    let words = if a.mode == LogMode::DirtyRing {
        let mut words = vec![0u64; a.pages.div_ceil(64) as usize];
        for e in vm.collect_dirty_rings()? {
            words[(e.offset / 64) as usize] |= 1 << (e.offset % 64);
        }
        vm.reset_dirty_rings()?;
        words
    } else {
        vm.get_dirty_log(as0, slot)?
    };
    if a.mode == LogMode::ClearLog {
        vm.clear_dirty_log(as0, slot, 0, a.pages, &words)?;
    }
    let mut v = Verdict::default();
    for page in 0..a.pages {
        let val = host
            .read_u64(hva.checked_add(page * 4096).context("hva overflow")?)
            .with_context(|| format!("reading page {page}"))?;
        let dirty = words[(page / 64) as usize] & (1 << (page % 64)) != 0;
        if dirty {
            v.dirty += 1;
            if val != it && !(val < it && cut_off.contains(&page)) {
                v.bad_dirty.push((page, val));
            }
        } else {
            v.clean += 1;
            if val >= it {
                v.bad_clean.push((page, val));
            }
        }
    }
    Ok(v)
}

/// `kvmmu dirty-log-test`.
pub fn main(cmd: &DirtyLogTestCommand) -> anyhow::Result<()> {
    crate::report::check_output(&cmd.out)?;
    let r = run(&cmd.args)?;
    crate::report::emit(&r, &cmd.out)
}
