//! `kvmmu reclaim`: vCPUs run a hot set and a cold set of guest memory under a host memory limit
//! below the guest's size, for a fixed time, while kswapd and direct reclaim age and evict pages to
//! swap: the setting of the lockless-aging series' claim ("neither vCPUs nor reclaim
//! (mmu_notifier_invalidate_range*) will get stuck waiting for aging").
//!
//! Protocol: one memslot of `-v × -b` bytes, split evenly across the vCPUs; in each vCPU's share
//! the first `--hot-percent` pages are its hot set, and `--hot-access-percent` of its accesses go
//! to a random hot page, the rest to a random cold page. Every access reads the page's word 0,
//! checks it against the last value this vCPU wrote there, and writes the next one. The host is
//! limited to `--limit` bytes with `--swap` bytes of swap; reclaim ages (the VM's lockless or
//! locked aging, or none with `--no-aging`) and evicts from the oldest generation.
//!
//! Reported per run, with counts: `invalidate_range_start` latency of every eviction (p50, p99,
//! max; hdrhistogram), evictions/s, refaults/s, the time eviction and aging waited for `mmu_lock`,
//! and vCPU progress (accesses/s). Checks: no value lost, balanced invalidations, no stale frame
//! access, the limit held. A vCPU whose page cannot get memory (swap full) is OOM-killed: it stops,
//! the run warns, and the other vCPUs go on.

use crate::report::{Report, Status, plot, progress};
use crate::{AgingArg, MmuArg, OutputArgs, size, vm_config};
use anyhow::{Context, bail};
use clap::Args;
use hdrhistogram::Histogram;
use kvmmu::PAGE_SIZE;
use kvmmu::prelude::*;
use kvmmu::{GupError, ReclaimAging, ReclaimConfig};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Guest physical address of the memslot.
const BASE_GPA: u64 = 1 << 32;
/// The least memory the limit must leave each vCPU (pages): enough for its fault to find a frame
/// while the other vCPUs hold theirs.
pub const MIN_PAGES_PER_VCPU: u64 = 64;

/// Options of `reclaim`.
#[derive(Debug, Clone, Args)]
pub struct ReclaimArgs {
    /// Number of vCPUs.
    #[arg(short = 'v', long, default_value_t = 2)]
    pub vcpus: usize,

    /// Guest memory per vCPU (bytes; K, M, G suffixes).
    #[arg(short = 'b', long, default_value = "64M", value_parser = size::parse_size)]
    pub bytes_per_vcpu: u64,

    /// Host memory limit (bytes; below the guest's size). Default: half the guest.
    #[arg(long, value_parser = size::parse_size)]
    pub limit: Option<u64>,

    /// Swap device size (bytes). Default: the guest's size (nothing can run out).
    #[arg(long, value_parser = size::parse_size)]
    pub swap: Option<u64>,

    /// Hot set, as a percentage of each vCPU's memory.
    #[arg(long, default_value_t = 25, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub hot_percent: u8,

    /// Share of accesses that go to the hot set (the skew), in percent.
    #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub hot_access_percent: u8,

    /// How long the vCPUs run (`10s`, `500ms`, `2m`; a bare number is seconds).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Which MMU maps guest memory.
    #[arg(long, value_enum, default_value_t = MmuArg::Tdp)]
    pub mmu: MmuArg,

    /// How aging reaches the SPTEs.
    #[arg(long, value_enum, default_value_t = AgingArg::Lockless)]
    pub aging: AgingArg,

    /// Reclaim without any aging (generations record fault order only; no notifier aging calls).
    #[arg(long)]
    pub no_aging: bool,

    /// Entries in each vCPU's software TLB.
    #[arg(long, default_value_t = 2048)]
    pub tlb_entries: usize,
}

/// `reclaim` with its output options.
#[derive(Debug, Clone, Args)]
pub struct ReclaimCommand {
    /// The workload.
    #[command(flatten)]
    pub args: ReclaimArgs,
    /// Output.
    #[command(flatten)]
    pub out: OutputArgs,
}

/// Parses `10s`, `250ms`, `2m`, `1.5s` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim().to_ascii_lowercase();
    let (num, scale) = if let Some(v) = t.strip_suffix("ms") {
        (v, 1e-3)
    } else if let Some(v) = t.strip_suffix('s') {
        (v, 1.0)
    } else if let Some(v) = t.strip_suffix('m') {
        (v, 60.0)
    } else {
        (t.as_str(), 1.0)
    };
    let x: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a duration (examples: 10s, 500ms, 2m)"))?;
    if !x.is_finite() || x < 0.0 || x * scale > 86_400.0 {
        return Err(format!("'{s}' is not a duration between 0 and 24 hours"));
    }
    Ok(Duration::from_secs_f64(x * scale))
}

/// The sizes a run uses, after defaults.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// Guest pages per vCPU.
    pub pages_per_vcpu: u64,
    /// Guest pages in all.
    pub guest_pages: u64,
    /// The limit in frames.
    pub limit_frames: u64,
    /// Swap slots.
    pub swap_slots: u64,
}

/// Refuses bad flags before anything runs: a zero duration, a limit at or above the guest's size
/// or below what the vCPUs need, sizes that are not page multiples.
pub fn check(a: &ReclaimArgs) -> anyhow::Result<Plan> {
    use crate::error::{require, usage_hint};
    crate::check_vcpus("-v/--vcpus", a.vcpus)?;
    crate::check_pages("-b/--bytes-per-vcpu", a.bytes_per_vcpu)?;
    require(!a.duration.is_zero(), || {
        "--duration must be longer than 0".into()
    })?;
    let pages_per_vcpu = a.bytes_per_vcpu / PAGE_SIZE;
    let guest_pages = pages_per_vcpu
        .checked_mul(a.vcpus as u64)
        .filter(|p| *p <= 1 << 28)
        .ok_or_else(|| crate::error::usage("the guest (-v × -b) must be at most 1T"))?;
    let limit = a.limit.unwrap_or(guest_pages / 2 * PAGE_SIZE);
    crate::check_pages("--limit", limit)?;
    let limit_frames = limit / PAGE_SIZE;
    if limit_frames >= guest_pages {
        return Err(usage_hint(
            format!(
                "--limit {} is not below the guest's {} (-v {} × -b {}): nothing would be reclaimed",
                show(limit),
                show(guest_pages * PAGE_SIZE),
                a.vcpus,
                show(a.bytes_per_vcpu)
            ),
            "give a --limit below -v × -b",
        ));
    }
    let need = (a.vcpus as u64 * MIN_PAGES_PER_VCPU).max(kvmmu::MIN_LIMIT_FRAMES);
    if limit_frames < need {
        return Err(usage_hint(
            format!(
                "--limit {} leaves less than {} per vCPU: the vCPUs could not make progress",
                show(limit),
                show(MIN_PAGES_PER_VCPU * PAGE_SIZE)
            ),
            format!("give at least --limit {}", show(need * PAGE_SIZE)),
        ));
    }
    let swap = a.swap.unwrap_or(guest_pages * PAGE_SIZE);
    require(swap.is_multiple_of(PAGE_SIZE), || {
        format!("--swap must be a multiple of 4K (got {swap})")
    })?;
    crate::check_host_memory(limit_frames + 1024)?;
    Ok(Plan {
        pages_per_vcpu,
        guest_pages,
        limit_frames,
        swap_slots: swap / PAGE_SIZE,
    })
}

fn show(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b.is_multiple_of(1 << 30) => format!("{}G", b >> 30),
        b if b >= 1 << 20 && b.is_multiple_of(1 << 20) => format!("{}M", b >> 20),
        b if b >= 1 << 10 && b.is_multiple_of(1 << 10) => format!("{}K", b >> 10),
        b => format!("{b}"),
    }
}

/// What one vCPU did.
#[derive(Default, Debug)]
struct VcpuResult {
    accesses: u64,
    mismatches: u64,
    first_mismatch: Option<String>,
    oom: Option<String>,
}

/// A small deterministic generator (xorshift64*).
fn next(x: &mut u64) -> u64 {
    *x ^= *x >> 12;
    *x ^= *x << 25;
    *x ^= *x >> 27;
    x.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

fn vcpu_body(
    vcpu: &mut Vcpu,
    id: usize,
    a: &ReclaimArgs,
    plan: &Plan,
    stop: &AtomicBool,
) -> anyhow::Result<VcpuResult> {
    let first = id as u64 * plan.pages_per_vcpu;
    let n = plan.pages_per_vcpu;
    let hot = (n * u64::from(a.hot_percent) / 100).max(1);
    let mut last = vec![0u32; n as usize];
    let mut r = VcpuResult::default();
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (id as u64 + 1);
    let mut g = vcpu.enter();
    // ORDERING: Relaxed: a stop hint, polled every 256 accesses.
    while r.accesses & 255 != 0 || !stop.load(Ordering::Relaxed) {
        let pick = next(&mut x);
        let to_hot = hot == n || pick % 100 < u64::from(a.hot_access_percent);
        let page = if to_hot {
            (pick >> 8) % hot
        } else {
            hot + (pick >> 8) % (n - hot)
        };
        let gpa = Gpa::new(BASE_GPA + (first + page) * PAGE_SIZE);
        let want = u64::from(last[page as usize]);
        let outcome = g.read_u64(gpa).and_then(|got| {
            let next_value = (want + 1) & 0xffff_ffff;
            g.write_u64(gpa, next_value).map(|()| (got, next_value))
        });
        match outcome {
            Ok((got, written)) => {
                if got != want {
                    r.mismatches += 1;
                    r.first_mismatch.get_or_insert_with(|| {
                        format!("page {} read {got}, last written {want}", first + page)
                    });
                }
                last[page as usize] = written as u32;
                r.accesses += 1;
            }
            Err(VcpuExit::HostFault {
                error: GupError::OutOfFrames,
                gpa,
                ..
            }) => {
                // The kernel would OOM-kill the guest: this vCPU stops; the others go on.
                r.oom = Some(format!("out of memory at gpa {gpa}"));
                break;
            }
            Err(e) => bail!("vCPU {id}: {e}"),
        }
    }
    Ok(r)
}

/// Runs the workload once.
pub fn run(a: &ReclaimArgs) -> anyhow::Result<Report> {
    let plan = check(a).map_err(crate::error::as_usage)?;
    let host = HostMm::new(HostConfig {
        frames: (plan.guest_pages + 1024) as usize,
    })
    .context("host")?;
    host.enable_reclaim(ReclaimConfig {
        limit_frames: plan.limit_frames,
        swap_slots: plan.swap_slots,
        aging: if a.no_aging {
            ReclaimAging::None
        } else {
            ReclaimAging::Generations
        },
    })
    .context("memory limit")?;
    let vm = Vm::new(&host, vm_config(a.mmu, a.aging, a.tlb_entries)).context("VM")?;
    let bytes = plan.guest_pages * PAGE_SIZE;
    let hva = host.mmap(bytes, Prot::READ | Prot::WRITE).context("mmap")?;
    vm.set_user_memory_region(MemoryRegion {
        slot: SlotId::new(0),
        as_id: AsId::new(0),
        flags: MemFlags::empty(),
        gpa: Gpa::new(BASE_GPA),
        size: bytes,
        hva,
    })
    .context("memslot")?;
    let mut vcpus: Vec<Vcpu> = (0..a.vcpus)
        .map(|_| vm.create_vcpu())
        .collect::<Result<_, _>>()
        .context("vCPUs")?;
    let kswapd = host.spawn_kswapd().context("kswapd")?;
    let lock_before = vm.stats().mmu_lock;
    let stop = AtomicBool::new(false);
    let pb = progress::spinner("reclaim: running");
    let t0 = Instant::now();
    let results: Vec<anyhow::Result<VcpuResult>> = std::thread::scope(|s| {
        let handles: Vec<_> = vcpus
            .iter_mut()
            .enumerate()
            .map(|(id, v)| {
                let (stop, plan) = (&stop, &plan);
                s.spawn(move || vcpu_body(v, id, a, plan, stop))
            })
            .collect();
        while t0.elapsed() < a.duration
            && !progress::interrupted()
            && !handles.iter().all(|h| h.is_finished())
        {
            std::thread::sleep(Duration::from_millis(20).min(a.duration));
            pb.tick();
        }
        // ORDERING: Relaxed: see vcpu_body.
        stop.store(true, Ordering::Relaxed);
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| bail!("a vCPU thread panicked")))
            .collect()
    });
    let elapsed = t0.elapsed().as_secs_f64();
    drop(kswapd);
    pb.finish_and_clear();
    let results: Vec<VcpuResult> = results.into_iter().collect::<anyhow::Result<_>>()?;
    let rs = host.reclaim_stats();
    let hs = host.stats();
    let vs = vm.stats();
    let latencies = host.take_invalidate_latencies();
    let mut hist =
        Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3).context("latency histogram")?;
    for l in &latencies {
        hist.saturating_record(u64::from(*l).max(1));
    }

    let mut r = Report::new("reclaim");
    r.config("vcpus", a.vcpus);
    r.config("guest", show(bytes));
    r.config("limit", show(plan.limit_frames * PAGE_SIZE));
    r.config("swap", show(plan.swap_slots * PAGE_SIZE));
    r.config("hot_percent", a.hot_percent);
    r.config("hot_access_percent", a.hot_access_percent);
    r.config("duration_s", a.duration.as_secs_f64());
    r.config("mmu", a.mmu);
    r.config(
        "aging",
        if a.no_aging {
            "none".into()
        } else {
            format!("{:?}", a.aging).to_lowercase()
        },
    );
    let accesses: u64 = results.iter().map(|v| v.accesses).sum();
    let ns = |v: u64| v as f64 * 1e-9;
    if !hist.is_empty() {
        r.metrics.insert(
            "invalidate_range_start p50".into(),
            ns(hist.value_at_quantile(0.5)),
        );
        r.metrics.insert(
            "invalidate_range_start p99".into(),
            ns(hist.value_at_quantile(0.99)),
        );
        r.metrics
            .insert("invalidate_range_start max".into(), ns(hist.max()));
    }
    r.metrics
        .insert("evictions/s".into(), rs.evicted as f64 / elapsed);
    r.metrics
        .insert("refaults/s".into(), rs.refaults as f64 / elapsed);
    r.metrics
        .insert("vcpu accesses/s".into(), accesses as f64 / elapsed);
    r.metrics.insert(
        "evict mmu_lock wait".into(),
        ns(rs.invalidate_mmu_lock_wait_nanos),
    );
    r.metrics.insert(
        "aging mmu_lock wait".into(),
        ns(rs.aging_mmu_lock_wait_nanos),
    );
    r.metrics.insert("aging time".into(), ns(rs.aging_nanos));
    for (k, v) in [
        ("vcpu_accesses", accesses),
        ("evicted", rs.evicted),
        ("refaults", rs.refaults),
        ("invalidate_pairs", rs.invalidate_pairs),
        ("latency_samples", latencies.len() as u64),
        ("direct_reclaims", rs.direct_reclaims),
        ("kswapd_wakeups", rs.kswapd_wakeups),
        ("aging_passes", rs.aging_passes),
        ("aging_young", rs.aging_young),
        ("oom_kills", rs.oom_kills),
        ("swap_used", rs.swap.used),
        ("swap_full", rs.swap.full),
        ("resident_frames", rs.charged),
    ] {
        r.counts.insert(k.into(), v);
    }
    let lock = vs.mmu_lock;
    r.counts.insert(
        "mmu_lock_contended_writes".into(),
        lock.contended_writes - lock_before.contended_writes,
    );
    r.counts.insert(
        "mmu_lock_contended_reads".into(),
        lock.contended_reads - lock_before.contended_reads,
    );
    r.counts.insert("pf_taken".into(), vs.faults);
    r.counts
        .insert("remote_tlb_flush".into(), vs.remote_tlb_flush);

    let mismatches: u64 = results.iter().map(|v| v.mismatches).sum();
    let first = results.iter().find_map(|v| v.first_mismatch.clone());
    r.require(
        "no value lost through eviction and refault",
        mismatches == 0,
        match first {
            None => format!("{accesses} accesses read back what they wrote"),
            Some(m) => format!("{mismatches} mismatches, first: {m}"),
        },
    );
    r.require(
        "balanced invalidations",
        hs.invalidate_start == hs.invalidate_end
            && vs.invalidate_starts == vs.invalidate_ends
            && vs.invalidate.in_progress == 0,
        format!(
            "host {} starts / {} ends, VM {} / {}, in progress {}",
            hs.invalidate_start,
            hs.invalidate_end,
            vs.invalidate_starts,
            vs.invalidate_ends,
            vs.invalidate.in_progress
        ),
    );
    let stale = host.arena().stats().stale_accesses;
    r.require(
        "no stale frame access",
        stale == 0,
        format!("{stale} stale accesses"),
    );
    r.require(
        "the limit held",
        rs.charged <= plan.limit_frames,
        format!(
            "{} frames resident, limit {}",
            rs.charged, plan.limit_frames
        ),
    );
    r.require(
        "reclaim ran",
        rs.evicted > 0,
        format!("{} pages evicted", rs.evicted),
    );
    let killed: Vec<String> = results
        .iter()
        .enumerate()
        .filter_map(|(i, v)| v.oom.as_ref().map(|m| format!("vCPU {i}: {m}")))
        .collect();
    let status = if killed.is_empty() {
        Status::Pass
    } else {
        Status::Warn
    };
    r.check(
        "no vCPU OOM-killed",
        status,
        if killed.is_empty() {
            "every vCPU ran for the whole duration".into()
        } else {
            format!(
                "{} (swap full: {} refusals)",
                killed.join("; "),
                rs.swap.full
            )
        },
    );
    r.notes.push(
        "invalidate_range_start latency: one sample per eviction, from the host's call to the \
         return of every subscriber (KVM's zap, its mmu_lock wait and TLB shootdown included)"
            .into(),
    );
    if progress::interrupted() {
        r.notes
            .push("interrupted by Ctrl-C before --duration elapsed".into());
    }
    Ok(r)
}

/// `kvmmu reclaim`.
pub fn main(cmd: &ReclaimCommand) -> anyhow::Result<()> {
    crate::report::check_output(&cmd.out)?;
    let r = run(&cmd.args)?;
    if cmd.out.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print!("{}", crate::report::table::render(&r));
    }
    if let Some(path) = &cmd.out.plot {
        let names = [
            "invalidate_range_start p50",
            "invalidate_range_start p99",
            "invalidate_range_start max",
        ];
        let cats: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let values = names
            .iter()
            .map(|n| r.metrics.get(*n).copied().unwrap_or(0.0))
            .collect();
        plot::bars(
            path,
            &format!(
                "kvmmu reclaim: invalidate_range_start latency ({} vCPUs, {:?} MMU, aging {})",
                cmd.args.vcpus,
                cmd.args.mmu,
                r.config
                    .get("aging")
                    .and_then(|v| v.as_str())
                    .unwrap_or("?")
            ),
            &cats,
            &[plot::Series {
                name: "reclaim".into(),
                values,
            }],
        )?;
    }
    if !r.passed {
        return Err(crate::error::ChecksFailed {
            lines: r.failure_lines(),
        }
        .into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> ReclaimArgs {
        ReclaimArgs {
            vcpus: 2,
            bytes_per_vcpu: 4 << 20,
            // Below the two hot sets (2 × 1M): eviction is certain however little CPU the vCPUs get.
            limit: Some(1 << 20),
            swap: None,
            hot_percent: 25,
            hot_access_percent: 90,
            duration: Duration::from_millis(300),
            mmu: MmuArg::Tdp,
            aging: AgingArg::Lockless,
            no_aging: false,
            tlb_entries: 64,
        }
    }

    #[test]
    fn durations_parse_with_units_and_garbage_is_refused() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn bad_limits_and_a_zero_duration_are_usage_errors() {
        let mut a = args();
        a.limit = Some(8 << 20);
        let e = check(&a).unwrap_err().to_string();
        assert!(e.contains("not below the guest"), "{e}");
        a.limit = Some(64 << 10);
        let e = check(&a).unwrap_err().to_string();
        assert!(e.contains("per vCPU"), "{e}");
        a.limit = Some(1 << 20);
        a.duration = Duration::ZERO;
        let e = check(&a).unwrap_err().to_string();
        assert!(e.contains("--duration"), "{e}");
    }

    #[test]
    fn a_short_run_under_a_limit_evicts_refaults_and_loses_nothing() {
        for (aging, no_aging) in [
            (AgingArg::Lockless, false),
            (AgingArg::Locked, false),
            (AgingArg::Lockless, true),
        ] {
            let mut a = args();
            a.aging = aging;
            a.no_aging = no_aging;
            let r = run(&a).unwrap();
            assert!(r.passed, "{}", r.failures());
            assert!(r.counts["evicted"] > 0 && r.counts["vcpu_accesses"] > 0);
            assert!(r.metrics.contains_key("invalidate_range_start p99"));
        }
    }

    #[test]
    fn a_full_swap_device_oom_kills_the_vcpu_cleanly() {
        let mut a = args();
        a.swap = Some(64 << 10);
        a.hot_percent = 100;
        a.duration = Duration::from_secs(30);
        let r = run(&a).unwrap();
        let oom = r
            .checks
            .iter()
            .find(|c| c.name == "no vCPU OOM-killed")
            .unwrap();
        assert_eq!(oom.status, Status::Warn, "{}", oom.detail);
        assert!(
            r.passed,
            "an OOM kill is not a failed check: {}",
            r.failures()
        );
    }
}
