//! `kvmmu bench`: kvmmu against its hardware limits and its peers, side by side in one process.
//!
//! Protocol:
//! 1. Every scenario runs its configurations alternately (A, B, C, A, B, C, ...) for `reps`
//!    repetitions, so that machine noise hits all of them alike; figures are medians, and ratios are
//!    ratios of medians measured in this run (never against numbers from another run).
//! 2. The kvmmu side runs only public library calls — `HostMm::clear_young` (the notifier path),
//!    vCPU accesses (TLB, walker, fault path, host GUP and frame allocation) — the same code a user runs.
//! 3. The limits are the same operation with the MMU removed: a flat `Vec<AtomicU64>` scanned with the
//!    same test-then-`fetch_and` (aging), a CAS into a plain array (fault install), a raw load
//!    (translation). The peers are gfn-keyed hash maps (see [`peers`]).
//! 4. No timing is asserted anywhere; targets are reported as MET or missed.

mod aging;
mod guest;
mod huge;
mod peers;
mod rawwalk;
mod report;
mod slowdown;
mod translation;

use crate::{MmuArg, size};
use anyhow::ensure;
use clap::Args;
use guest::{Guest, touch_read, touch_write};
use kvmmu::PAGE_SIZE;
use kvmmu::prelude::*;
use kvmmu_cli::error::{require, usage, usage_hint};
use kvmmu_cli::report::progress;
use peers::Peer;
use report::Report;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Options of `kvmmu bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// The quick run (under a minute): a 128 MiB guest, 5 repetitions, no scaling sweep.
    #[arg(long)]
    pub quick: bool,
    /// Print JSON instead of the table.
    #[arg(long)]
    pub json: bool,
    /// After the table, draw the aging and slowdown results as text bar charts.
    #[arg(long, conflicts_with = "json")]
    pub bars: bool,
    /// Also draw the aging rates (flat-scan limit, lockless, locked; per young percentage) to
    /// FILE; the format follows the extension (.svg or .png), as every other --plot.
    #[arg(long, value_name = "FILE")]
    pub plot: Option<std::path::PathBuf>,
    /// Which MMU kvmmu uses.
    #[arg(long, value_enum, default_value_t = MmuArg::Tdp)]
    pub mmu: MmuArg,
    /// Guest memory for the per-operation scenarios (default 128M quick, 1G full).
    #[arg(long, value_parser = size::parse_size)]
    pub bytes: Option<u64>,
    /// Repetitions of every configuration (default 5 quick, 9 full).
    #[arg(long)]
    pub reps: Option<u32>,
    /// Largest guest of the scaling sweep, in GiB (full run only; sizes 1, 4, 16 up to this).
    #[arg(long, default_value_t = 16)]
    pub max_scaling_gib: u64,
    /// Run only these scenarios (comma-separated: aging, slowdown, fault, translation, peers,
    /// scaling, huge-populate, huge-aging), e.g. to profile one of them.
    #[arg(long, value_delimiter = ',', value_parser = SCENARIOS)]
    pub only: Vec<String>,
    /// The huge backing the huge-populate and huge-aging scenarios compare with 4K pages (the
    /// selftests' -s names; --bytes must be a multiple of its page size).
    #[arg(short = 's', long = "backing-src", default_value = "anonymous_thp")]
    pub backing_src: BackingSrc,
}

/// The scenarios, in run order.
const SCENARIOS: [&str; 8] = [
    "aging",
    "slowdown",
    "fault",
    "translation",
    "peers",
    "scaling",
    "huge-populate",
    "huge-aging",
];

/// Accessed bit of the flat-array limit (the EPT A bit position).
pub(super) const FLAT_A: u64 = 1 << 8;
/// Young percentages of the aging scenario.
pub(super) const YOUNG: [u64; 3] = [0, 10, 100];
/// Read passes over guest memory the vCPU makes after populating, in the slowdown scenario.
pub(super) const SLOWDOWN_TOUCH_PASSES: u32 = 3;

/// Runs the benchmark and returns the text or JSON to print.
pub fn run(args: &BenchArgs) -> anyhow::Result<String> {
    let mmu = match args.mmu {
        MmuArg::Tdp => MmuKind::Tdp,
        MmuArg::Shadow => MmuKind::Shadow,
    };
    // The library decides what exists: ask it before measuring anything.
    VmConfig {
        mmu,
        ..VmConfig::default()
    }
    .validate()
    .map_err(|e| usage(format!("--mmu {:?}: {e}", args.mmu).to_lowercase()))?;
    let bytes = args
        .bytes
        .unwrap_or(if args.quick { 128 << 20 } else { 1 << 30 });
    require(
        bytes >= 64 * PAGE_SIZE && bytes.is_multiple_of(PAGE_SIZE) && bytes <= 16 << 30,
        || "--bytes must be a multiple of 4 KiB between 256 KiB and 16 GiB".into(),
    )?;
    require(bytes.is_multiple_of(args.backing_src.page_size()), || {
        format!(
            "--bytes ({bytes}) must be a multiple of the -s {} page size ({} bytes)",
            args.backing_src,
            args.backing_src.page_size()
        )
    })?;
    let reps = args.reps.unwrap_or(if args.quick { 5 } else { 9 });
    require((1..=1000).contains(&reps), || {
        format!("--reps must be between 1 and 1000 (got {reps})")
    })?;
    if let Some(p) = &args.plot {
        kvmmu_cli::check_output_path("--plot", p, &["svg", "png"])?;
        if !args.only.is_empty() && !args.only.iter().any(|o| o == "aging") {
            return Err(usage_hint(
                "--plot draws the aging scenario, which --only leaves out",
                "add aging to --only, or drop --plot",
            ));
        }
    }
    if args.quick && !args.only.is_empty() && args.only.iter().all(|o| o == "scaling") {
        return Err(usage_hint(
            "--only scaling runs nothing with --quick (the quick run has no scaling sweep)",
            "drop --quick to run the scaling sweep",
        ));
    }
    let pages = bytes / PAGE_SIZE;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());

    let mut r = Report {
        config: vec![
            ("mmu", format!("{:?}", args.mmu).to_lowercase()),
            ("guest_bytes", bytes.to_string()),
            ("pages", pages.to_string()),
            ("reps", reps.to_string()),
            ("host_cpus", cpus.to_string()),
            ("mode", if args.quick { "quick" } else { "full" }.into()),
            ("backing_src", args.backing_src.name().into()),
        ],
        ..Report::default()
    };
    let started = Instant::now();
    let on = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);
    let planned: Vec<&str> = SCENARIOS
        .iter()
        .copied()
        .filter(|s| on(s) && (*s != "scaling" || !args.quick))
        .collect();
    progress::stop_between_units();
    let pb = progress::bar(planned.len() as u64, "bench");
    let mut interrupted = false;
    for (i, name) in planned.iter().enumerate() {
        if progress::interrupted() {
            interrupted = true;
            break;
        }
        pb.set_message(format!("bench: {name} ({} of {})", i + 1, planned.len()));
        match *name {
            "aging" => aging::aging(&mut r, mmu, pages, reps)?,
            "slowdown" => slowdown::slowdown(&mut r, mmu, pages, reps)?,
            "fault" => fault_rate(&mut r, mmu, pages, reps)?,
            "translation" => translation::translation(&mut r, mmu, pages, reps)?,
            "peers" => peer_ops(&mut r, mmu, pages, reps)?,
            "huge-populate" => huge::populate(&mut r, mmu, pages, reps, args.backing_src)?,
            "huge-aging" => huge::aging(&mut r, mmu, pages, reps, args.backing_src)?,
            _ => scaling(&mut r, mmu, reps.min(3), args.max_scaling_gib)?,
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    if interrupted {
        r.config.push(("interrupted", "true".into()));
    }
    r.config.push((
        "wall_seconds",
        format!("{:.1}", started.elapsed().as_secs_f64()),
    ));
    let out = if args.json {
        r.to_json()
    } else if args.bars {
        let mut s = r.to_text();
        s.push_str(&r.to_plot("aging", "M SPTE/s"));
        s.push_str(&r.to_plot("slowdown", "ms"));
        s
    } else {
        r.to_text()
    };
    if let Some(path) = &args.plot {
        plot_aging(&r, path, &format!("{:?}", args.mmu).to_lowercase())?;
    }
    if interrupted {
        print!("{out}");
        return Err(kvmmu_cli::error::Interrupted.into());
    }
    Ok(out)
}

/// Draws the aging scenario's rates: one group per young percentage, one bar each for the
/// flat-scan limit and kvmmu's lockless and locked passes.
fn plot_aging(r: &Report, path: &std::path::Path, mmu: &str) -> anyhow::Result<()> {
    use kvmmu_cli::report::plot;
    let median = |name: &str| {
        r.figures
            .iter()
            .find(|f| f.scenario == "aging" && f.name == name)
            .map_or(0.0, report::Figure::median)
    };
    let cats: Vec<String> = YOUNG.iter().map(|p| format!("{p}% young")).collect();
    let series: Vec<plot::Series> = [
        ("flat-scan limit", "flat-scan limit, {}% young"),
        ("kvmmu lockless", "kvmmu lockless pass, {}% young"),
        ("kvmmu locked", "kvmmu locked pass, {}% young"),
    ]
    .iter()
    .map(|(name, pattern)| plot::Series {
        name: (*name).to_owned(),
        values: YOUNG
            .iter()
            .map(|p| median(&pattern.replace("{}", &p.to_string())))
            .collect(),
    })
    .collect();
    plot::bars_in(
        path,
        &format!("kvmmu bench: aging pass rate ({mmu} MMU, medians)"),
        ("M SPTE/s", 1.0),
        &cats,
        &series,
    )
}

/// A text line folded within the table width (see `kvmmu_cli::report::table::fold`).
fn kvmmu_cli_fold(line: &str, indent: &str) -> String {
    kvmmu_cli::report::table::fold(line, kvmmu_cli::report::table::WIDTH, indent)
}

pub(super) fn modes() -> [(AgingMode, &'static str); 2] {
    [
        (AgingMode::Lockless, "lockless"),
        (AgingMode::Locked, "locked"),
    ]
}

pub(super) fn per_sec(n: u64, t: Instant) -> f64 {
    n as f64 / t.elapsed().as_secs_f64().max(1e-9)
}

/// A populated guest with a small TLB (so that re-touches miss and set Accessed).
pub(super) fn populated(
    mmu: MmuKind,
    aging: AgingMode,
    pages: u64,
    tlb: usize,
) -> anyhow::Result<Guest> {
    let mut g = Guest::new(pages, mmu, aging, 1, tlb)?;
    touch_write(&mut g.vcpus[0], 0..pages)?;
    Ok(g)
}

fn fault_rate(r: &mut Report, mmu: MmuKind, pages: u64, reps: u32) -> anyhow::Result<()> {
    let (mut kv, mut lim) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        let mut g = Guest::new(pages, mmu, AgingMode::Lockless, 1, 2048)?;
        let f0 = g.vm.stats().faults;
        let t = Instant::now();
        touch_write(&mut g.vcpus[0], 0..pages)?;
        let rate = per_sec(pages, t);
        ensure!(
            g.vm.stats().faults - f0 >= pages,
            "populate took fewer faults than pages"
        );
        kv.push(rate / 1e6);
        drop(g.vcpus);
        g.vm.shutdown();

        let arr: Vec<AtomicU64> = (0..pages).map(|_| AtomicU64::new(0)).collect();
        let t = Instant::now();
        for (i, w) in arr.iter().enumerate() {
            // ORDERING: Release on success, as an SPTE install publishes the frame; Relaxed on failure.
            let _ = w.compare_exchange(
                0,
                ((i as u64) << 12) | 0x7 | FLAT_A,
                Ordering::Release,
                Ordering::Relaxed,
            );
        }
        lim.push(per_sec(pages, t) / 1e6);
        black_box(&arr);
    }
    let k = r.figure(
        "fault",
        "kvmmu populate (incl. host frame alloc), 1 vCPU",
        "M faults/s",
        kv,
    );
    let l = r.figure(
        "fault",
        "CAS install into a plain array (limit)",
        "M installs/s",
        lim,
    );
    r.ratio(
        "populate faults/s per vCPU (M)",
        k,
        "absolute, millions per second",
        Some((1.0, true)),
    );
    r.ratio(
        "populate / CAS-install limit",
        k / l,
        "fraction of the limit",
        None,
    );
    Ok(())
}

/// One peer run on a fresh host: fault, age at 100% young, age at 0% young (the pass right after,
/// the steady state of back-to-back aging), translate; each in M ops/s.
fn peer_run(peer: &dyn Peer, pages: u64) -> anyhow::Result<[f64; 4]> {
    let host = HostMm::new(HostConfig {
        frames: usize::try_from(pages + 1024)?,
    })?;
    host.prefault()?;
    let hva = host.mmap(pages * PAGE_SIZE, Prot::READ | Prot::WRITE)?;
    let t = Instant::now();
    peers::fault_all(peer, &host, hva, pages)?;
    let fault = per_sec(pages, t) / 1e6;
    let t = Instant::now();
    let young = peer.age();
    let age = per_sec(pages, t) / 1e6;
    ensure!(young == pages, "{}: aged {young} of {pages}", peer.name());
    let t = Instant::now();
    let young = peer.age();
    let age_cold = per_sec(pages, t) / 1e6;
    ensure!(
        young == 0,
        "{}: {young} pages young on the second pass",
        peer.name()
    );
    let t = Instant::now();
    black_box(peers::translate_all(peer, &host, pages)?);
    let tr = per_sec(pages, t) / 1e6;
    Ok([fault, age, age_cold, tr])
}

/// The same operations on kvmmu: populate, an aging pass at 100% young, the pass right after at
/// 0% young, one read of every page.
fn kvmmu_peer_run(mmu: MmuKind, pages: u64) -> anyhow::Result<[f64; 4]> {
    let mut g = Guest::new(pages, mmu, AgingMode::Lockless, 1, 2048)?;
    let t = Instant::now();
    touch_write(&mut g.vcpus[0], 0..pages)?;
    let fault = per_sec(pages, t) / 1e6;
    let t = Instant::now();
    g.age()?;
    let age = per_sec(pages, t) / 1e6;
    let before = g.accessed_cleared();
    let t = Instant::now();
    g.age()?;
    let age_cold = per_sec(pages, t) / 1e6;
    let young = g.accessed_cleared() - before;
    ensure!(young == 0, "kvmmu: {young} SPTEs young on the second pass");
    let t = Instant::now();
    black_box(touch_read(&mut g.vcpus[0], pages, 1)?);
    let tr = per_sec(pages, t) / 1e6;
    drop(g.vcpus);
    g.vm.shutdown();
    Ok([fault, age, age_cold, tr])
}

fn peer_ops(r: &mut Report, mmu: MmuKind, pages: u64, reps: u32) -> anyhow::Result<()> {
    const OPS: [&str; 4] = [
        "fault",
        "age (100% young)",
        "age (0% young)",
        "translate+read",
    ];
    let mut kv: [Vec<f64>; 4] = Default::default();
    let names = ["dashmap", "papaya", "rwlock-hashmap"];
    let mut ps: Vec<[Vec<f64>; 4]> = (0..names.len()).map(|_| Default::default()).collect();
    for _ in 0..reps {
        for (o, x) in kvmmu_peer_run(mmu, pages)?.into_iter().enumerate() {
            kv[o].push(x);
        }
        let peers: [Box<dyn Peer>; 3] = [
            Box::<peers::DashPeer>::default(),
            Box::<peers::PapayaPeer>::default(),
            Box::<peers::RwLockPeer>::default(),
        ];
        for (i, p) in peers.iter().enumerate() {
            for (o, x) in peer_run(&**p, pages)?.into_iter().enumerate() {
                ps[i][o].push(x);
            }
        }
    }
    for o in 0..OPS.len() {
        let k = r.figure(
            "peers",
            format!("kvmmu {}", OPS[o]),
            "M ops/s",
            std::mem::take(&mut kv[o]),
        );
        let mut best = (0.0f64, "");
        for (i, n) in names.iter().enumerate() {
            let v = r.figure(
                "peers",
                format!("{n} {}", OPS[o]),
                "M ops/s",
                std::mem::take(&mut ps[i][o]),
            );
            let target = if o == 1 || o == 2 { 3.0 } else { 1.0 };
            r.ratio(
                format!("kvmmu / {n}, {}", OPS[o]),
                k / v,
                "kvmmu speed-up over the peer",
                Some((target, true)),
            );
            if v > best.0 && *n != "rwlock-hashmap" {
                best = (v, n);
            }
        }
        r.config.push((
            match o {
                0 => "faster_concurrent_map_fault",
                1 => "faster_concurrent_map_age",
                2 => "faster_concurrent_map_age_cold",
                _ => "faster_concurrent_map_translate",
            },
            best.1.to_string(),
        ));
    }
    Ok(())
}

fn scaling(r: &mut Report, mmu: MmuKind, reps: u32, max_gib: u64) -> anyhow::Result<()> {
    for gib in [1u64, 4, 16].into_iter().filter(|g| *g <= max_gib) {
        let pages = (gib << 30) / PAGE_SIZE;
        let (mut fault, mut age0, mut age100) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..reps {
            let mut g = Guest::new(pages, mmu, AgingMode::Lockless, 1, 64)?;
            let t = Instant::now();
            touch_write(&mut g.vcpus[0], 0..pages)?;
            fault.push(t.elapsed().as_secs_f64() * 1e9 / pages as f64);
            let t = Instant::now();
            g.age()?;
            age100.push(t.elapsed().as_secs_f64() * 1e9 / pages as f64);
            let t = Instant::now();
            g.age()?;
            age0.push(t.elapsed().as_secs_f64() * 1e9 / pages as f64);
            drop(g.vcpus);
            g.vm.shutdown();
        }
        r.figure("scaling", format!("{gib} GiB: populate"), "ns/page", fault);
        r.figure(
            "scaling",
            format!("{gib} GiB: aging pass, 100% young"),
            "ns/page",
            age100,
        );
        r.figure(
            "scaling",
            format!("{gib} GiB: aging pass, 0% young"),
            "ns/page",
            age0,
        );
    }
    // 1 vs 2 vCPU threads populating disjoint halves of 1 GiB.
    let pages = (1u64 << 30) / PAGE_SIZE;
    for n in [1usize, 2] {
        let mut per_vcpu = Vec::new();
        for _ in 0..reps {
            let mut g = Guest::new(pages, mmu, AgingMode::Lockless, n, 2048)?;
            let share = pages / n as u64;
            // Each vCPU thread times its own work; the phase is earliest start to latest end.
            let time = kvmmu_cli::vcpus::run_vcpus(&mut g.vcpus, |i, v| {
                let lo = i as u64 * share;
                touch_write(v, lo..lo + share)
            })?;
            per_vcpu.push(
                (share * n as u64) as f64 / time.wall.as_secs_f64().max(1e-9) / n as f64 / 1e6,
            );
            drop(g.vcpus);
            g.vm.shutdown();
        }
        r.figure(
            "scaling",
            format!("1 GiB, {n} vCPU thread(s): populate per vCPU"),
            "M faults/s",
            per_vcpu,
        );
    }
    Ok(())
}
