//! `kvmmu dirty-log-perf`: KVM's `dirty_log_perf_test` on kvmmu.
//!
//! Phases, as the selftest prints them: populate memory (every vCPU writes each page of its own
//! `-b` bytes), enable dirty logging, then per iteration: dirty memory (each vCPU touches every
//! page of its range again, `-w` percent of them with writes, in order or with `-a` in random
//! order), get dirty log, clear dirty log (manual protect, unless `-g`), and finally disable
//! dirty logging. Each phase reports its wall time and its `pf_fast`, `pf_fixed` and
//! `remote_tlb_flush` counts (the kernel's cover letters give counts next to times), and the
//! run checks that every harvest reported at least every page written in that iteration. With
//! huge-page backing (`-s anonymous_thp`) the 2M leaves left after populating, enabling and
//! disabling are counted (`*.pages_2m`): eager splitting (`--eager-split on`, the default) splits
//! them while enabling, without it the first iteration's writes split them; disabling recovers
//! them. With `-e` (the selftest's "evil" flag) the vCPUs keep running passes over their memory
//! while logging is being disabled; their accesses during that phase are counted
//! (`disable.vcpu_accesses`, `disable.vcpu_passes`) and every write they made is checked in
//! memory after they stop.

use crate::report::{Report, progress};
use crate::{AgingArg, MmuArg, OutputArgs, TrackingArg, size, vm_config};
use anyhow::anyhow;
use clap::Args;
use kvmmu::prelude::*;
use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Guest physical address of the first vCPU's memory.
const BASE_GPA: u64 = 1 << 32;

/// Options of `dirty-log-perf`.
#[derive(Debug, Clone, Args)]
pub struct DirtyLogPerfArgs {
    /// Guest memory per vCPU (bytes; K, M, G suffixes).
    #[arg(short = 'b', long, default_value = "64M", value_parser = size::parse_size)]
    pub bytes_per_vcpu: u64,

    /// Number of vCPUs.
    #[arg(short = 'v', long, default_value_t = 1)]
    pub vcpus: usize,

    /// Iterations of dirty memory / get / clear (at least 2, as the selftest requires).
    #[arg(short = 'i', long, default_value_t = 2)]
    pub iterations: u64,

    /// Percentage of page accesses that are writes in the dirty-memory phases.
    #[arg(short = 'w', long, default_value_t = 100, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub write_percent: u8,

    /// Access pages in random order (the selftest's -a).
    #[arg(short = 'a', long)]
    pub random_access: bool,

    /// Split guest memory evenly over this many memslots (the selftest's -x).
    #[arg(short = 'x', long, default_value_t = 1)]
    pub slots: u64,

    /// Do not use manual protect (the selftest's -g): GET re-arms, no CLEAR phase.
    #[arg(short = 'g', long)]
    pub no_manual_protect: bool,

    /// Log into per-vCPU dirty rings of this many entries instead of bitmaps (0: bitmaps). The
    /// "get" phase collects the rings and the "clear" phase resets them; a ring must hold one
    /// iteration's writes (more than the pages per vCPU plus 64 reserved entries).
    #[arg(long, default_value_t = 0)]
    pub dirty_ring: u32,

    /// Which MMU maps guest memory.
    #[arg(long, value_enum, default_value_t = MmuArg::Tdp)]
    pub mmu: MmuArg,

    /// How pages are re-armed: write-protection (faults, the fast page fault) or D bits (PML-like).
    #[arg(long, value_enum, default_value_t = TrackingArg::WriteProtect)]
    pub tracking: TrackingArg,

    /// Entries in each vCPU's software TLB.
    #[arg(long, default_value_t = 2048)]
    pub tlb_entries: usize,

    /// Eager page splitting (`VmConfig::eager_page_split`; on by default, as KVM's
    /// `eager_page_split` module parameter): `on` splits huge leaves while enabling logging,
    /// `off` leaves them whole and the first write to each splits it.
    #[arg(long = "eager-split", value_enum, default_value_t = OnOff::On)]
    pub eager_split: OnOff,

    /// Run the vCPUs while dirty logging is being disabled (the selftest's -e): they keep
    /// running passes over their memory, with the last iteration's -w and -a, until the disable
    /// phase ends; the run reports their accesses during it and checks that every write they made
    /// is in memory afterwards.
    #[arg(short = 'e', long = "run-vcpus-while-disabling")]
    pub run_vcpus_while_disabling: bool,

    /// Backing source of guest memory (the selftest's -s): anonymous, anonymous_thp,
    /// anonymous_hugetlb_2mb or anonymous_hugetlb_1gb (hugetlb needs -b times -v over -x
    /// aligned to its size).
    #[arg(short = 's', long = "backing-src", default_value = "anonymous")]
    pub backing_src: kvmmu::BackingSrc,

    /// Nested (the selftest's -n): the vCPUs run as an L2 guest over a one-to-one EPT12 that L1
    /// built, so every access goes through indirect shadow pages and the L1 slots' rmaps.
    #[arg(short = 'n', long)]
    pub nested: bool,
}

/// A switch given as `on` or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

impl OnOff {
    /// True for `on`.
    pub fn is_on(self) -> bool {
        self == OnOff::On
    }
}

/// `dirty-log-perf` with its output options.
#[derive(Debug, Clone, Args)]
pub struct DirtyLogPerfCommand {
    /// The workload.
    #[command(flatten)]
    pub args: DirtyLogPerfArgs,
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

/// The counters a phase reports.
const PHASE_COUNTS: [&str; 3] = ["pf_fast", "pf_fixed", "remote_tlb_flush"];

fn counts(s: &VmStats) -> [u64; 3] {
    [s.pf_fast, s.pf_fixed, s.remote_tlb_flush]
}

/// One phase: times `f` and records its counter deltas under `key.NAME`.
fn phase<T>(
    r: &mut Report,
    vm: &Vm,
    name: &str,
    key: &str,
    f: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let before = counts(&vm.stats());
    let t = Instant::now();
    let out = f()?;
    let d = t.elapsed();
    let after = counts(&vm.stats());
    r.phase(name, d);
    for (i, c) in PHASE_COUNTS.iter().enumerate() {
        r.counts.insert(format!("{key}.{c}"), after[i] - before[i]);
    }
    Ok(out)
}

/// Every vCPU touches each page of its range once (writes with probability `write_percent`),
/// writing `value`; returns the pages written, per vCPU, as page indexes of the slot.
fn run_vcpus(
    vcpus: &mut [Vcpu],
    pages_per_vcpu: u64,
    write_percent: u8,
    random: bool,
    value: u64,
) -> anyhow::Result<Vec<Vec<u64>>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = vcpus
            .iter_mut()
            .enumerate()
            .map(|(i, vcpu)| {
                s.spawn(move || -> anyhow::Result<Vec<u64>> {
                    let mut rng =
                        (value ^ ((i as u64 + 1) << 40)).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                    let mut written = Vec::new();
                    let mut g = vcpu.enter();
                    let first = i as u64 * pages_per_vcpu;
                    for n in 0..pages_per_vcpu {
                        let page = first
                            + if random {
                                xorshift(&mut rng) % pages_per_vcpu
                            } else {
                                n
                            };
                        let gpa = Gpa::new(BASE_GPA + page * 4096);
                        if xorshift(&mut rng) % 100 < u64::from(write_percent) {
                            g.write_u64(gpa, value)?;
                            written.push(page);
                        } else {
                            g.read_u64(gpa)?;
                        }
                    }
                    Ok(written)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow!("a vCPU thread panicked"))?)
            .collect()
    })
}

/// Marks the values the vCPUs write while logging is being disabled (`-e`): bit 63 plus the
/// pass number, never an iteration's value.
const DISABLE_MARK: u64 = 1 << 63;

/// What the vCPUs did while dirty logging was being disabled (`-e`).
struct DisableRun {
    /// Accesses made (reads and writes).
    accesses: u64,
    /// Writes made.
    writes: u64,
    /// Full passes over a vCPU's memory completed, summed over the vCPUs.
    passes: u64,
    /// vCPUs stopped by a `DirtyRingFull` exit (the ring fills while slots still log).
    ring_full_exits: u64,
    /// Per vCPU, per page of its range: the last value written (0: not written).
    last_written: Vec<Vec<u64>>,
}

/// The selftest's -e: the vCPUs run passes over their memory (the last iteration's write
/// percentage and order) from before `disable` starts until it has returned; then they stop
/// and are joined. Returns what `disable` returned and what the vCPUs did.
fn disable_with_running_vcpus(
    vcpus: &mut [Vcpu],
    a: &DirtyLogPerfArgs,
    pages_per_vcpu: u64,
    disable: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<DisableRun> {
    let stop = AtomicBool::new(false);
    let started = Barrier::new(vcpus.len() + 1);
    std::thread::scope(|s| {
        let handles: Vec<_> = vcpus
            .iter_mut()
            .enumerate()
            .map(|(i, vcpu)| {
                let (stop, started) = (&stop, &started);
                s.spawn(move || -> anyhow::Result<(u64, u64, u64, bool, Vec<u64>)> {
                    let mut rng = ((i as u64 + 1) << 40).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                    let mut last = vec![0u64; pages_per_vcpu as usize];
                    let (mut accesses, mut writes, mut passes) = (0u64, 0u64, 0u64);
                    let first = i as u64 * pages_per_vcpu;
                    started.wait();
                    let mut g = vcpu.enter();
                    'run: for pass in 1u64.. {
                        for n in 0..pages_per_vcpu {
                            // ORDERING: Relaxed: the flag only ends the loop; the scope's join
                            // orders everything the thread did before the caller reads it.
                            if stop.load(Ordering::Relaxed) {
                                break 'run;
                            }
                            let local = if a.random_access {
                                xorshift(&mut rng) % pages_per_vcpu
                            } else {
                                n
                            };
                            let gpa = Gpa::new(BASE_GPA + (first + local) * 4096);
                            let value = DISABLE_MARK | pass;
                            let done = if xorshift(&mut rng) % 100 < u64::from(a.write_percent) {
                                g.write_u64(gpa, value).map(|()| {
                                    last[local as usize] = value;
                                    writes += 1;
                                })
                            } else {
                                g.read_u64(gpa).map(|_| ())
                            };
                            match done {
                                Ok(()) => accesses += 1,
                                // The access was not made; nothing harvests the ring here.
                                Err(VcpuExit::DirtyRingFull) => {
                                    return Ok((accesses, writes, passes, true, last));
                                }
                                Err(e) => return Err(e.into()),
                            }
                        }
                        passes += 1;
                    }
                    Ok((accesses, writes, passes, false, last))
                })
            })
            .collect();
        started.wait();
        let disabled = disable();
        // ORDERING: Relaxed: see the load.
        stop.store(true, Ordering::Relaxed);
        let mut d = DisableRun {
            accesses: 0,
            writes: 0,
            passes: 0,
            ring_full_exits: 0,
            last_written: Vec::new(),
        };
        for h in handles {
            let (accesses, writes, passes, full, last) =
                h.join().map_err(|_| anyhow!("a vCPU thread panicked"))??;
            d.accesses += accesses;
            d.writes += writes;
            d.passes += passes;
            d.ring_full_exits += u64::from(full);
            d.last_written.push(last);
        }
        disabled.map(|()| d)
    })
}

/// Reads back every page written while logging was being disabled, through its own vCPU;
/// returns how many do not hold the last value written to them.
fn count_lost_writes(
    vcpus: &mut [Vcpu],
    pages_per_vcpu: u64,
    last_written: &[Vec<u64>],
) -> anyhow::Result<u64> {
    let mut lost = 0;
    for (i, (vcpu, last)) in vcpus.iter_mut().zip(last_written).enumerate() {
        let mut g = vcpu.enter();
        for (local, &want) in last.iter().enumerate() {
            if want != 0 {
                let gpa = Gpa::new(BASE_GPA + (i as u64 * pages_per_vcpu + local as u64) * 4096);
                lost += u64::from(g.read_u64(gpa)? != want);
            }
        }
    }
    Ok(lost)
}

/// Refuses bad flags before anything runs.
pub fn check(a: &DirtyLogPerfArgs) -> anyhow::Result<()> {
    crate::check_vcpus("-v/--vcpus", a.vcpus)?;
    crate::check_pages("-b/--bytes-per-vcpu", a.bytes_per_vcpu)?;
    crate::error::require(a.iterations >= 2, || {
        format!("-i/--iterations must be at least 2 (got {})", a.iterations)
    })?;
    let pages_per_vcpu = a.bytes_per_vcpu / 4096;
    let npages = pages_per_vcpu * a.vcpus as u64;
    crate::error::require(
        a.slots >= 1 && a.slots <= 512 && npages.is_multiple_of(a.slots),
        || {
            format!(
                "-x/--slots must be between 1 and 512 and divide the {npages} guest pages (got {})",
                a.slots
            )
        },
    )?;
    crate::error::require(npages / a.slots <= kvmmu::KVM_MEM_MAX_NR_PAGES, || {
        "-b times -v over -x slots exceeds one memslot".into()
    })?;
    if a.dirty_ring != 0 {
        crate::error::require(
            a.dirty_ring.is_power_of_two()
                && u64::from(a.dirty_ring) >= pages_per_vcpu + 64
                && a.dirty_ring <= kvmmu::DIRTY_RING_MAX,
            || {
                format!(
                    "--dirty-ring must be a power of two of at least {} entries (the pages per \
                     vCPU plus 64 reserved) and at most {} (got {})",
                    (pages_per_vcpu + 64).next_power_of_two(),
                    kvmmu::DIRTY_RING_MAX,
                    a.dirty_ring
                )
            },
        )?;
        crate::error::require(a.tracking == TrackingArg::WriteProtect, || {
            "--dirty-ring needs --tracking write-protect".into()
        })?;
    }
    crate::check_host_memory(npages + 1024)
}

/// Runs the benchmark and returns its report.
pub fn run(a: &DirtyLogPerfArgs) -> anyhow::Result<Report> {
    check(a)?;
    let pages_per_vcpu = a.bytes_per_vcpu / 4096;
    let npages = pages_per_vcpu * a.vcpus as u64;
    let tables = if a.nested {
        crate::nested::table_frames(npages, 1)
    } else {
        0
    };
    let host = HostMm::new(HostConfig {
        frames: (npages + tables) as usize + 1024,
    })?;
    let config = VmConfig {
        eager_page_split: a.eager_split.is_on(),
        ..vm_config(a.mmu, AgingArg::Lockless, a.tlb_entries)
    };
    let vm = Vm::new(&host, config)?;
    if a.nested {
        vm.enable_nested()?;
    }
    vm.set_dirty_tracking(a.tracking.mode())?;
    let ring = a.dirty_ring != 0;
    if ring {
        vm.enable_dirty_ring(a.dirty_ring)?;
    }
    let manual = !a.no_manual_protect && !ring;
    if manual {
        vm.set_dirty_log_protect(DirtyLogProtect::Manual {
            initially_set: false,
        })?;
    }
    let bytes = npages * 4096;
    let hva = host.mmap_backed(bytes, Prot::READ | Prot::WRITE, a.backing_src)?;
    let as0 = AsId::new(0);
    let slot_pages = npages / a.slots;
    let set_all = |flags: MemFlags| -> anyhow::Result<()> {
        for i in 0..a.slots {
            vm.set_user_memory_region(MemoryRegion {
                slot: SlotId::new(i as u16),
                as_id: as0,
                flags,
                gpa: Gpa::new(BASE_GPA + i * slot_pages * 4096),
                size: slot_pages * 4096,
                hva: hva
                    .checked_add(i * slot_pages * 4096)
                    .ok_or_else(|| anyhow!("hva overflow"))?,
            })?;
        }
        Ok(())
    };
    set_all(MemFlags::empty())?;
    let mut vcpus: Vec<Vcpu> = (0..a.vcpus)
        .map(|_| vm.create_vcpu())
        .collect::<Result<_, _>>()?;
    let _guest = if a.nested {
        Some(crate::nested::enter_l2(
            &host, &vm, &mut vcpus, BASE_GPA, bytes, 0, None,
        )?)
    } else {
        None
    };

    let mut r = Report::new("dirty-log-perf");
    r.config("bytes_per_vcpu", a.bytes_per_vcpu);
    r.config("vcpus", a.vcpus);
    r.config("iterations", a.iterations);
    r.config("write_percent", a.write_percent);
    r.config("random_access", a.random_access);
    r.config("manual_protect", manual);
    r.config("slots", a.slots);
    r.config("dirty_ring", a.dirty_ring);
    r.config("mmu", a.mmu);
    r.config("tracking", a.tracking);
    r.config("eager_page_split", a.eager_split.is_on());
    r.config("run_vcpus_while_disabling", a.run_vcpus_while_disabling);
    r.config("backing_src", a.backing_src.name());
    r.config("nested", a.nested);
    let bar = progress::bar(a.iterations + 3, "dirty-log-perf");
    phase(&mut r, &vm, "populate memory", "populate", || {
        run_vcpus(&mut vcpus, pages_per_vcpu, 100, false, 1)
    })?;
    r.counts
        .insert("populate.pages_2m".into(), vm.stats().pages_2m);
    bar.inc(1);
    phase(&mut r, &vm, "enable dirty logging", "enable", || {
        set_all(MemFlags::LOG_DIRTY_PAGES)
    })?;
    r.counts
        .insert("enable.pages_2m".into(), vm.stats().pages_2m);
    bar.inc(1);
    let mut missed = 0u64;
    let mut dirty_time = Vec::new();
    for it in 1..=a.iterations {
        let t = Instant::now();
        let written = phase(
            &mut r,
            &vm,
            &format!("iteration {it} dirty memory"),
            &format!("iter{it}.dirty"),
            || {
                run_vcpus(
                    &mut vcpus,
                    pages_per_vcpu,
                    a.write_percent,
                    a.random_access,
                    it + 1,
                )
            },
        )?;
        dirty_time.push(t.elapsed());
        let words = phase(
            &mut r,
            &vm,
            &format!("iteration {it} get dirty log"),
            &format!("iter{it}.get"),
            || -> anyhow::Result<Vec<Vec<u64>>> {
                if !ring {
                    return (0..a.slots)
                        .map(|i| Ok(vm.get_dirty_log(as0, SlotId::new(i as u16))?))
                        .collect();
                }
                let mut words =
                    vec![vec![0u64; slot_pages.div_ceil(64) as usize]; a.slots as usize];
                for e in vm.collect_dirty_rings()? {
                    words[usize::from(e.slot.get())][(e.offset / 64) as usize] |=
                        1 << (e.offset % 64);
                }
                Ok(words)
            },
        )?;
        if ring {
            phase(
                &mut r,
                &vm,
                &format!("iteration {it} clear dirty log"),
                &format!("iter{it}.clear"),
                || Ok(vm.reset_dirty_rings().map(|_| ())?),
            )?;
        }
        if manual {
            phase(
                &mut r,
                &vm,
                &format!("iteration {it} clear dirty log"),
                &format!("iter{it}.clear"),
                || {
                    for (i, w) in words.iter().enumerate() {
                        vm.clear_dirty_log(as0, SlotId::new(i as u16), 0, slot_pages, w)?;
                    }
                    Ok(())
                },
            )?;
        }
        for p in written.iter().flatten() {
            let (i, off) = ((p / slot_pages) as usize, p % slot_pages);
            if words[i][(off / 64) as usize] & (1 << (off % 64)) == 0 {
                missed += 1;
            }
        }
        bar.inc(1);
    }
    if a.run_vcpus_while_disabling {
        let d = disable_with_running_vcpus(&mut vcpus, a, pages_per_vcpu, || {
            phase(&mut r, &vm, "disable dirty logging", "disable", || {
                set_all(MemFlags::empty())
            })
        })?;
        if ring {
            // A vCPU stopped by a full ring left it soft-full: harvest it so that the check's
            // reads can fault.
            vm.collect_dirty_rings()?;
            vm.reset_dirty_rings()?;
        }
        let lost = count_lost_writes(&mut vcpus, pages_per_vcpu, &d.last_written)?;
        r.counts.insert("disable.vcpu_accesses".into(), d.accesses);
        r.counts.insert("disable.vcpu_passes".into(), d.passes);
        r.counts
            .insert("disable.ring_full_exits".into(), d.ring_full_exits);
        r.counts
            .insert("disable.vcpu_writes_checked".into(), d.writes);
        r.notes.push(format!(
            "-e: the vCPUs made {} accesses ({} full passes) while dirty logging was being disabled",
            d.accesses, d.passes
        ));
        r.require(
            "every write made while dirty logging was being disabled is in memory",
            lost == 0,
            format!("{lost} pages do not hold the last value written to them"),
        );
    } else {
        phase(&mut r, &vm, "disable dirty logging", "disable", || {
            set_all(MemFlags::empty())
        })?;
    }
    r.counts
        .insert("disable.pages_2m".into(), vm.stats().pages_2m);
    bar.finish_and_clear();
    r.require(
        "every page written in an iteration is in that iteration's log",
        missed == 0,
        format!("{missed} written pages missing"),
    );
    let s = vm.stats();
    r.counts.insert("pf_fast".into(), s.pf_fast);
    r.counts.insert("pf_fixed".into(), s.pf_fixed);
    r.counts
        .insert("remote_tlb_flush".into(), s.remote_tlb_flush);
    let (fast, fixed): (u64, u64) = (1..=a.iterations).fold((0, 0), |(f, x), it| {
        (
            f + r.counts[&format!("iter{it}.dirty.pf_fast")],
            x + r.counts[&format!("iter{it}.dirty.pf_fixed")],
        )
    });
    r.counts.insert("dirty_phases.pf_fast".into(), fast);
    r.counts.insert("dirty_phases.pf_fixed".into(), fixed);
    if fast + fixed > 0 {
        r.notes.push(format!(
            "fast page faults fixed {:.1}% of the dirty-memory phases' faults ({fast} of {})",
            100.0 * fast as f64 / (fast + fixed) as f64,
            fast + fixed
        ));
    }
    let total: Duration = dirty_time.iter().sum();
    r.metrics
        .insert("dirty_memory_total_seconds".into(), total.as_secs_f64());
    r.notes.push(
        "per-phase counts are under counts.<phase>.{pf_fast,pf_fixed,remote_tlb_flush}".into(),
    );
    if a.nested {
        crate::nested::report(&vm, &mut r, false);
    }
    Ok(r)
}

/// `kvmmu dirty-log-perf`.
pub fn main(cmd: &DirtyLogPerfCommand) -> anyhow::Result<()> {
    crate::report::check_output(&cmd.out)?;
    let r = run(&cmd.args)?;
    crate::report::emit(&r, &cmd.out)
}
