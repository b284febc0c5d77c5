//! `kvmmu torture`: every concurrent actor of the MMU at once, checked by oracles (see
//! `kvmmu::torture`). Exits non-zero, with every violation and the seed, if an oracle fails.

use std::time::Duration;

use clap::Args;
use kvmmu::torture::{Actors, LiveProgress, TortureConfig, TortureError, TortureReport};
use kvmmu::{AgingMode, MmuKind};
use kvmmu_cli::report::progress;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::{AgingArg, MmuArg};

/// Options of `kvmmu torture`.
#[derive(Debug, Clone, Args)]
pub struct TortureArgs {
    /// Run for this long (e.g. 30s, 10m, 4h; a bare number is seconds). Without it, the run is
    /// bounded by --ops.
    #[arg(short = 'd', long, value_parser = parse_duration)]
    pub duration: Option<Duration>,

    /// Operations per vCPU (the bound used in CI). Without --duration it defaults to 20000.
    #[arg(long)]
    pub ops: Option<u64>,

    /// Seed of every actor's operation sequence (decimal or 0x-hex); printed in every report.
    #[arg(short = 's', long, value_parser = parse_seed)]
    pub seed: Option<u64>,

    /// Which MMU.
    #[arg(long, value_enum, default_value_t = MmuArg::Tdp)]
    pub mmu: MmuArg,

    /// Lockless or locked aging.
    #[arg(long, value_enum, default_value_t = AgingArg::Lockless)]
    pub aging: AgingArg,

    /// vCPU threads.
    #[arg(short = 'v', long, default_value_t = 2)]
    pub vcpus: usize,

    /// Host pages behind slot 0.
    #[arg(long, default_value_t = 256)]
    pub pages: u64,

    /// Host pages behind the dynamic slot (moved, flag-changed, deleted and re-created).
    #[arg(long, default_value_t = 64)]
    pub dyn_pages: u64,

    /// Frames of the host arena (default: twice the guest memory); below the page count this
    /// injects frame exhaustion.
    #[arg(long)]
    pub frames: Option<usize>,

    /// Entries in each vCPU's TLB.
    #[arg(long, default_value_t = 64)]
    pub tlb_entries: usize,

    /// Backing of guest memory: anonymous or anonymous_thp (the selftests' -s; here long only,
    /// as -s is the seed). THP needs --pages of at least 512 for a huge page to form.
    #[arg(long = "backing-src", default_value = "anonymous")]
    pub backing_src: kvmmu::BackingSrc,

    /// Do not elide the TLB flush of clear_flush_young (makes the accessed oracle strict).
    #[arg(long)]
    pub no_elide_flush: bool,

    /// Leaves without hardware A/D bits (`VmConfig::ad_bits = Disabled`): aging marks them for
    /// access tracking (one CAS) and the vCPUs' next accesses go through the fast page fault.
    #[arg(long)]
    pub ad_disabled: bool,

    /// Fail if an actor makes no progress for this long.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub stall_timeout: Duration,

    /// Turn off the host actor (munmap/mmap, mprotect, madvise).
    #[arg(long)]
    pub no_host: bool,
    /// Turn off random-range aging.
    #[arg(long)]
    pub no_aging: bool,
    /// Turn off the accessed oracle.
    #[arg(long)]
    pub no_accessed: bool,
    /// Turn off the memslot actor.
    #[arg(long)]
    pub no_memslot: bool,
    /// Turn off the MMU-reset actor.
    #[arg(long)]
    pub no_reset: bool,
    /// Turn on the reclaim actor: random vCPU pages evicted to swap and refaulted (needs a host
    /// of at least 17 frames).
    #[arg(long)]
    pub reclaim: bool,

    /// Add the dirty-log harvester (get/clear on slot 1 back to back, classic and manual
    /// protect), so re-arms and fast page faults race every other actor.
    #[arg(long)]
    pub dirty_log: bool,

    /// Run the vCPUs as an L2 guest over EPT12 that an L1 actor write-protects, unmaps and
    /// remaps while they run (indirect shadow pages, write tracking; the L1 actor also probes
    /// for stale EPT02 entries).
    #[arg(long)]
    pub nested: bool,

    /// Print the report as JSON (schema `kvmmu-torture/1`, see `to_json`) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Version tag of the torture report's JSON.
pub const TORTURE_SCHEMA: &str = "kvmmu-torture/1";

/// The torture report as JSON: `schema`, `seed` (hex string, as `--seed` takes it), `config`,
/// `elapsed_s`, `actors` (`name`, `ops`, `ops_per_s`), `counts` (KVM stat names where one
/// exists), `violations` (one string each) and `passed`.
pub fn to_json(a: &TortureArgs, r: &TortureReport) -> serde_json::Value {
    let s = &r.vm_stats;
    serde_json::json!({
        "schema": TORTURE_SCHEMA,
        "seed": format!("{:#x}", r.seed),
        "config": {
            "mmu": a.mmu,
            "aging": a.aging,
            "vcpus": a.vcpus,
            "pages": a.pages,
            "dyn_pages": a.dyn_pages,
            "frames": a.frames,
            "tlb_entries": a.tlb_entries,
            "duration_s": a.duration.map(|d| d.as_secs_f64()),
            "ops": a.ops,
            "elide_flush": !a.no_elide_flush,
            "ad_disabled": a.ad_disabled,
            "stall_timeout_s": a.stall_timeout.as_secs_f64(),
            "host": !a.no_host,
            "aging_actor": !a.no_aging,
            "accessed": !a.no_accessed,
            "memslot": !a.no_memslot,
            "reset": !a.no_reset,
            "reclaim": a.reclaim,
            "dirty_log": a.dirty_log,
            "nested": a.nested,
        },
        "elapsed_s": r.elapsed.as_secs_f64(),
        "actors": r.actors.iter().map(|x| serde_json::json!({
            "name": x.actor.to_string(),
            "ops": x.ops,
            "ops_per_s": x.ops_per_sec,
        })).collect::<Vec<_>>(),
        "counts": {
            "pf_taken": s.faults,
            "fault_retries": s.fault_retries,
            "invalidate_starts": s.invalidate_starts,
            "invalidate_ends": s.invalidate_ends,
            "mmu_invalidate_seq": s.invalidate.seq,
            "memslot_swaps": s.memslot_swaps,
            "remote_tlb_flush": s.remote_tlb_flush,
            "pages_4k": s.pages_4k,
            "pages_2m": s.pages_2m,
            "pages_1g": s.pages_1g,
            "nx_lpage_splits": s.nx_lpage_splits,
            "tdp_huge_splits": s.tdp.huge_splits,
            "host_huge_faults": r.host_stats.huge_faults,
            "host_thp_splits": r.host_stats.thp_splits,
            "host_thp_collapses": r.host_stats.thp_collapses,
            "out_of_frames_exits": r.out_of_frames_exits,
            "accessed_hidden_by_tlb": r.accessed_hidden_by_tlb,
            "accessed_excused_by_reset": r.accessed_excused_by_reset,
        },
        "violations": r.violations.iter().map(|v| v.to_string()).collect::<Vec<_>>(),
        "passed": r.passed(),
    })
}

/// Parses `30s`, `10m`, `4h`, `250ms` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, mult_ms) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1000)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60_000)
    } else if let Some(n) = t.strip_suffix('h') {
        (n, 3_600_000)
    } else {
        (t, 1000)
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a duration (examples: 30s, 10m, 4h)"))?;
    n.checked_mul(mult_ms)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("'{s}' is too long"))
}

/// Parses a decimal or `0x` hexadecimal seed.
pub fn parse_seed(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => t.parse(),
    };
    r.map_err(|_| format!("'{s}' is not a seed (decimal or 0x-hex)"))
}

/// The library configuration these options describe; a fresh seed from the clock if none given.
pub fn config(a: &TortureArgs) -> TortureConfig {
    let mut actors = Actors::all().difference(Actors::RECLAIM | Actors::DIRTY_LOG);
    if a.dirty_log {
        actors |= Actors::DIRTY_LOG;
    }
    if a.reclaim {
        actors.insert(Actors::RECLAIM);
    }
    for (off, a) in [
        (a.no_host, Actors::HOST),
        (a.no_aging, Actors::AGING),
        (a.no_accessed, Actors::ACCESSED),
        (a.no_memslot, Actors::MEMSLOT),
        (a.no_reset, Actors::RESET),
    ] {
        if off {
            actors.remove(a);
        }
    }
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    TortureConfig {
        seed,
        mmu: match a.mmu {
            MmuArg::Tdp => MmuKind::Tdp,
            MmuArg::Shadow => MmuKind::Shadow,
        },
        aging: match a.aging {
            AgingArg::Lockless => AgingMode::Lockless,
            AgingArg::Locked => AgingMode::Locked,
        },
        vcpus: a.vcpus,
        main_pages: a.pages,
        dyn_pages: a.dyn_pages,
        frames: a.frames,
        tlb_entries: a.tlb_entries,
        elide_tlb_flush_if_young: !a.no_elide_flush,
        ad_bits: kvmmu_cli::ad_bits(a.ad_disabled),
        ops_per_vcpu: match (a.ops, a.duration) {
            (Some(n), _) => Some(n),
            (None, Some(_)) => None,
            (None, None) => Some(DEFAULT_OPS),
        },
        duration: a.duration,
        backing: a.backing_src,
        actors,
        stall_timeout: a.stall_timeout,
        nested: a.nested,
        ..TortureConfig::default()
    }
}

/// Operations per vCPU when neither --ops nor --duration is given.
pub const DEFAULT_OPS: u64 = 20_000;

/// Most operations per vCPU (`--ops`): about an hour at the slowest measured rate.
pub const MAX_OPS: u64 = 1 << 32;

/// Refuses, in the user's flag names, options the run could not honour or that mean nothing.
pub fn check(a: &TortureArgs) -> anyhow::Result<()> {
    use kvmmu_cli::error::{require, usage_hint};
    if a.duration == Some(Duration::ZERO) {
        return Err(usage_hint(
            "--duration 0s would stop the run before any operation",
            "give a positive duration (e.g. --duration 30s) or bound the run with --ops",
        ));
    }
    if a.stall_timeout.is_zero() {
        return Err(usage_hint(
            "--stall-timeout 0s would report every actor as stalled at once",
            "give a positive timeout (default 30s)",
        ));
    }
    require(a.ops.is_none_or(|n| (1..=MAX_OPS).contains(&n)), || {
        format!(
            "--ops must be between 1 and {MAX_OPS} (got {})",
            a.ops.unwrap_or(0)
        )
    })?;
    require((1..=64).contains(&a.vcpus), || {
        format!("-v/--vcpus must be between 1 and 64 (got {})", a.vcpus)
    })?;
    let private = TortureConfig::default().private;
    require(a.pages >= private + 8, || {
        format!("--pages must be at least {} (got {})", private + 8, a.pages)
    })?;
    require(
        a.dyn_pages >= 1 && a.pages.saturating_add(a.dyn_pages) <= 1 << 20,
        || {
            format!(
                "--dyn-pages must be at least 1, and --pages plus --dyn-pages at most 1048576 \
                 (got {} + {})",
                a.pages, a.dyn_pages
            )
        },
    )?;
    require(a.frames != Some(0), || "--frames must be at least 1".into())?;
    require((1..=1 << 20).contains(&a.tlb_entries), || {
        format!(
            "--tlb-entries must be between 1 and 1048576 (got {})",
            a.tlb_entries
        )
    })?;
    Ok(())
}

/// The flag behind a library parameter name.
fn flag_of(param: &str) -> &str {
    match param {
        "vcpus" => "--vcpus",
        "main_pages" => "--pages",
        "dyn_pages" => "--dyn-pages",
        "ops_per_vcpu" => "--ops or --duration",
        "tlb_entries" => "--tlb-entries",
        other => other,
    }
}

/// "s" unless `n` is 1.
fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// `n` with a k/M suffix, at most 5 columns (`999`, `12.3k`, `4.56M`).
fn compact(n: f64) -> String {
    match n {
        n if n >= 1e6 => format!("{:.2}M", n / 1e6),
        n if n >= 1e4 => format!("{:.0}k", n / 1e3),
        n if n >= 1e3 => format!("{:.1}k", n / 1e3),
        n => format!("{n:.0}"),
    }
}

/// Runs `f` (the torture run) under a progress display: with `--duration`, a bar of the time
/// elapsed and left; with `--ops`, a spinner with the elapsed time; both with every actor's
/// operations per second and the violations so far, read from `live` (the run's
/// [`LiveProgress`](kvmmu::torture::LiveProgress)).
fn with_progress<T>(a: &TortureArgs, live: &LiveProgress, f: impl FnOnce() -> T) -> T {
    let pb = match a.duration {
        Some(d) => {
            progress::bar_with_prefix(u64::try_from(d.as_millis()).unwrap_or(u64::MAX), "torture")
        }
        None => progress::spinner(&format!(
            "torture: {} ops per vCPU",
            a.ops.unwrap_or(DEFAULT_OPS)
        )),
    };
    if pb.is_hidden() {
        return f();
    }
    let done = AtomicBool::new(false);
    let start = Instant::now();
    let r = std::thread::scope(|s| {
        s.spawn(|| {
            // Bounded: `done` is set as soon as `f` returns.
            // ORDERING: Relaxed: a stop flag; the scope's join orders the rest.
            let mut last = (0u64, Instant::now());
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                let (ops, now) = (live.ops(), Instant::now());
                let rate = (ops - last.0.min(ops)) as f64
                    / now.duration_since(last.1).as_secs_f64().max(1e-3);
                last = (ops, now);
                let v = live.violations();
                let stats = format!("{} ops/s, {v} violation{}", compact(rate), plural(v));
                if let Some(d) = a.duration {
                    let el = start.elapsed().min(d);
                    pb.set_position(u64::try_from(el.as_millis()).unwrap_or(u64::MAX));
                    pb.set_message(format!("{}s left", (d - el).as_secs()));
                }
                pb.set_prefix(stats);
            }
        });
        let r = f();
        // ORDERING: see the load.
        done.store(true, Ordering::Relaxed);
        r
    });
    pb.finish_and_clear();
    r
}

/// Runs `kvmmu torture`: the report on success; on a violation the report is printed and the
/// error lists every violation (exit status 1).
pub fn run(a: &TortureArgs) -> anyhow::Result<String> {
    check(a)?;
    let cfg = config(a);
    // The note is in place before the banner: a Ctrl-C that follows the banner (as the CLI test's
    // does) must find it, or the user loses the seed to replay.
    progress::set_interrupt_note(format!(
        "torture cut short: no oracle had failed when it was stopped; seed {:#x} (replay \
         with --seed {:#x} and the same options)",
        cfg.seed, cfg.seed
    ));
    progress::suspend(|| {
        eprintln!(
            "kvmmu torture: {} MMU, {} aging, {} vCPUs",
            format!("{:?}", cfg.mmu).to_lowercase(),
            format!("{:?}", cfg.aging).to_lowercase(),
            cfg.vcpus
        );
        eprintln!("seed {:#x} (replay with --seed {:#x})", cfg.seed, cfg.seed);
    });
    let live = Arc::new(LiveProgress::default());
    let cfg = TortureConfig {
        live: Some(Arc::clone(&live)),
        ..cfg
    };
    let report = with_progress(a, &live, || kvmmu::torture::run(&cfg)).map_err(|e| match e {
        TortureError::Parameter { name, why } => {
            kvmmu_cli::error::usage(format!("{} {why}", flag_of(name)))
        }
        TortureError::Config(c) => kvmmu_cli::error::usage(c.to_string()),
        other => anyhow::Error::new(other).context("torture set-up failed"),
    })?;
    let shown = if a.json {
        format!("{:#}\n", to_json(a, &report))
    } else {
        kvmmu_cli::report::table::fold(&report.to_string(), kvmmu_cli::report::table::WIDTH, "    ")
    };
    if !report.passed() {
        print!("{shown}");
        let mut lines: Vec<String> = report
            .violations
            .iter()
            .map(|v| format!("violation: {}", v.to_string().replace('\n', "; ")))
            .collect();
        lines.push(format!(
            "torture failed with seed {:#x}: rerun with --seed {:#x} and the same options",
            report.seed, report.seed
        ));
        return Err(kvmmu_cli::error::ChecksFailed { lines }.into());
    }
    Ok(shown)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_seeds_parse() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("soon").is_err());
        assert_eq!(parse_seed("0x1f"), Ok(31));
        assert_eq!(parse_seed("42"), Ok(42));
        assert!(parse_seed("0xg").is_err());
    }
}
