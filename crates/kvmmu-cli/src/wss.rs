//! `kvmmu wss`: the working-set estimate (bins of {idle age, bytes}, per memslot and per VM) over
//! time, and its accuracy against the simulator's ground truth.
//!
//! Protocol: one memslot per vCPU (`-b` bytes each); every vCPU first writes every page of its
//! slot, then runs windows of `--interval`: in each, it accesses random pages of its hot set (the
//! first `--hot-percent` of its slot) and marks every page it touched in a truth bitmap. Between
//! windows the vCPUs pause; the main thread runs one aging pass per memslot ([`LruGen::age`]: host
//! young bits plus the VM's `clear_young_bitmap`), reads the bins, and compares "found young by
//! this pass" with "touched in the window" page by page (precision and recall). Then, unless
//! `--no-flush`, every vCPU drops its TLB (it leaves and re-enters its address space) before the
//! next window: an access through a TLB entry cached before the pass sets no Accessed bit (x86
//! aging does not flush), so without the flush such pages look idle (reported as TLB-hidden).

use crate::report::{Report, plot, progress};
use crate::{AgingArg, MmuArg, OutputArgs, size, vm_config};
use anyhow::{Context, bail};
use clap::Args;
use kvmmu::LruGen;
use kvmmu::PAGE_SIZE;
use kvmmu::prelude::*;
use serde::Serialize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Version tag of [`WssRun`]'s JSON.
pub const WSS_SCHEMA: &str = "kvmmu-wss/1";
/// Guest physical address of slot 0.
const BASE_GPA: u64 = 1 << 32;
/// How long the main thread waits for the vCPUs to pause before it gives up.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(60);

/// Options of `wss`.
#[derive(Debug, Clone, Args)]
pub struct WssArgs {
    /// Number of vCPUs (one memslot each).
    #[arg(short = 'v', long, default_value_t = 2)]
    pub vcpus: usize,

    /// Guest memory per vCPU (bytes; K, M, G suffixes).
    #[arg(short = 'b', long, default_value = "64M", value_parser = size::parse_size)]
    pub bytes_per_vcpu: u64,

    /// Hot set, as a percentage of each vCPU's memory (the ground truth the estimate should find).
    #[arg(long, default_value_t = 25, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub hot_percent: u8,

    /// Windows (one aging pass and one report each).
    #[arg(long, default_value_t = 8)]
    pub windows: u32,

    /// Length of one window (`200ms`, `1s`).
    #[arg(long, default_value = "200ms", value_parser = crate::reclaim::parse_duration)]
    pub interval: Duration,

    /// Bins per report.
    #[arg(long, default_value_t = 4)]
    pub bins: usize,

    /// Do not flush the vCPUs' TLBs between windows (accesses through cached entries stay hidden).
    #[arg(long)]
    pub no_flush: bool,

    /// Which MMU maps guest memory.
    #[arg(long, value_enum, default_value_t = MmuArg::Tdp)]
    pub mmu: MmuArg,

    /// How aging reaches the SPTEs.
    #[arg(long, value_enum, default_value_t = AgingArg::Lockless)]
    pub aging: AgingArg,

    /// Entries in each vCPU's software TLB.
    #[arg(long, default_value_t = 2048)]
    pub tlb_entries: usize,

    /// Output.
    #[command(flatten)]
    pub out: OutputArgs,
}

/// One bin of one report.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Bin {
    /// Aging passes since last found young (the last bin: at least this many).
    pub idle_passes: u32,
    /// Milliseconds since last found young.
    pub idle_ms: f64,
    /// Resident bytes.
    pub bytes: u64,
}

/// One window's report.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Window {
    /// Window number, from 1.
    pub window: u32,
    /// The VM's bins (the memslots' bins added up), youngest first.
    pub bins: Vec<Bin>,
    /// Per memslot: its bins.
    pub memslots: Vec<Vec<Bin>>,
    /// The bins' total: resident guest memory.
    pub total_bytes: u64,
    /// Bytes the estimate calls hot (found young by this window's pass).
    pub estimated_hot_bytes: u64,
    /// Bytes the vCPUs touched in the window (ground truth).
    pub true_hot_bytes: u64,
    /// Touched pages found young / pages found young.
    pub precision: f64,
    /// Touched pages found young / touched pages.
    pub recall: f64,
    /// Touched pages the pass missed (accessed only through TLB entries cached before the pass).
    pub tlb_hidden_pages: u64,
    /// Milliseconds the aging passes of this window took (the estimate's cost).
    pub aging_ms: f64,
}

/// The result of `kvmmu wss`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct WssRun {
    /// [`WSS_SCHEMA`].
    pub schema: &'static str,
    /// The configuration.
    pub config: std::collections::BTreeMap<String, serde_json::Value>,
    /// Guest memory mapped (bytes).
    pub guest_bytes: u64,
    /// TLBs flushed between windows.
    pub tlb_flush: bool,
    /// One report per window.
    pub windows: Vec<Window>,
    /// Median over windows 2.. of |estimated hot − true hot| / true hot.
    pub hot_error: f64,
    /// Every window's bins added up to the guest memory mapped.
    pub totals_match: bool,
}

/// The truth bitmap: one bit per guest page.
struct Truth(Vec<AtomicU64>);

impl Truth {
    fn set(&self, page: u64) {
        let (w, b) = ((page / 64) as usize, 1u64 << (page % 64));
        // ORDERING: Relaxed: read by the main thread only while the vCPUs are paused, after the
        // pause handshake's acquire.
        if self.0[w].load(Ordering::Relaxed) & b == 0 {
            self.0[w].fetch_or(b, Ordering::Relaxed);
        }
    }
    fn get(&self, page: u64) -> bool {
        // ORDERING: Relaxed: see `set`.
        self.0[(page / 64) as usize].load(Ordering::Relaxed) & (1 << (page % 64)) != 0
    }
    fn clear(&self) {
        for w in &self.0 {
            // ORDERING: Relaxed: see `set`.
            w.store(0, Ordering::Relaxed);
        }
    }
}

/// The window handshake: the main thread raises `pause`, each vCPU acknowledges by bumping
/// `paused` and waits for `epoch` to move.
struct Sync {
    pause: AtomicBool,
    paused: AtomicU64,
    epoch: AtomicU64,
    stop: AtomicBool,
}

fn next(x: &mut u64) -> u64 {
    *x ^= *x >> 12;
    *x ^= *x << 25;
    *x ^= *x >> 27;
    x.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

fn vcpu_body(
    vcpu: &mut Vcpu,
    id: usize,
    a: &WssArgs,
    pages: u64,
    truth: &Truth,
    sync: &Sync,
) -> anyhow::Result<()> {
    let first = id as u64 * pages;
    let gpa = |p: u64| Gpa::new(BASE_GPA + (first + p) * PAGE_SIZE);
    for p in 0..pages {
        vcpu.write_u64(gpa(p), p + 1)?;
    }
    let hot = (pages * u64::from(a.hot_percent) / 100).max(1);
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (id as u64 + 1);
    let mut seen_epoch = 0;
    loop {
        // ORDERING: Acquire pairs with the main thread's Release stores (pause, epoch, stop).
        if sync.stop.load(Ordering::Acquire) {
            return Ok(());
        }
        if sync.pause.load(Ordering::Acquire) {
            // ORDERING: Release: our truth bits before the acknowledgement.
            sync.paused.fetch_add(1, Ordering::Release);
            let t0 = Instant::now();
            while sync.epoch.load(Ordering::Acquire) == seen_epoch {
                if sync.stop.load(Ordering::Acquire) {
                    return Ok(());
                }
                if t0.elapsed() > PAUSE_TIMEOUT {
                    bail!("vCPU {id}: the main thread never resumed the window");
                }
                std::thread::yield_now();
            }
            seen_epoch += 1;
            if !a.no_flush {
                // Leaving and re-entering the address space drops the root and the whole TLB.
                vcpu.set_address_space(AsId::new(1))?;
                vcpu.set_address_space(AsId::new(0))?;
            }
        }
        let mut g = vcpu.enter();
        for _ in 0..256 {
            let p = next(&mut x) % hot;
            g.read_u64(gpa(p))?;
            truth.set(first + p);
        }
    }
}

fn bins_of(ws: &kvmmu::WorkingSet) -> Vec<Bin> {
    ws.bins
        .iter()
        .map(|b| Bin {
            idle_passes: b.idle_passes,
            idle_ms: b.idle.as_secs_f64() * 1e3,
            bytes: b.bytes,
        })
        .collect()
}

/// Runs `kvmmu wss`.
pub fn run(a: &WssArgs) -> anyhow::Result<WssRun> {
    use crate::error::require;
    crate::check_vcpus("-v/--vcpus", a.vcpus)?;
    crate::check_pages("-b/--bytes-per-vcpu", a.bytes_per_vcpu)?;
    require((1..=10_000).contains(&a.windows), || {
        "--windows must be between 1 and 10000".into()
    })?;
    require(!a.interval.is_zero(), || {
        "--interval must be longer than 0".into()
    })?;
    require((1..=64).contains(&a.bins), || {
        "--bins must be between 1 and 64".into()
    })?;
    let pages = a.bytes_per_vcpu / PAGE_SIZE;
    let total_pages = pages * a.vcpus as u64;
    crate::check_host_memory(total_pages + 1024)?;
    let host = HostMm::new(HostConfig {
        frames: usize::try_from(total_pages + 1024).context("guest too large")?,
    })?;
    let mut cfg = vm_config(a.mmu, a.aging, a.tlb_entries);
    cfg.address_spaces = 2;
    let vm = Vm::new(&host, cfg)?;
    let hva = host.mmap(total_pages * PAGE_SIZE, Prot::READ | Prot::WRITE)?;
    for i in 0..a.vcpus {
        let off = i as u64 * a.bytes_per_vcpu;
        vm.set_user_memory_region(MemoryRegion {
            slot: SlotId::new(u16::try_from(i)?),
            as_id: AsId::new(0),
            flags: MemFlags::empty(),
            gpa: Gpa::new(BASE_GPA + off),
            size: a.bytes_per_vcpu,
            hva: Hva::new(hva.raw() + off),
        })?;
    }
    let mut vcpus: Vec<Vcpu> = (0..a.vcpus)
        .map(|_| vm.create_vcpu())
        .collect::<Result<_, _>>()?;
    let truth = Truth(
        (0..total_pages.div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect(),
    );
    let sync = Sync {
        pause: AtomicBool::new(false),
        paused: AtomicU64::new(0),
        epoch: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    };
    let pb = progress::bar(u64::from(a.windows), "wss");
    let mut lrus: Vec<LruGen> = (0..a.vcpus)
        .map(|i| {
            LruGen::new(
                &host,
                Hva::new(hva.raw() + i as u64 * a.bytes_per_vcpu),
                a.bytes_per_vcpu,
            )
        })
        .collect::<Result<_, _>>()?;
    let n = a.vcpus as u64;
    let windows = std::thread::scope(|s| -> anyhow::Result<Vec<Window>> {
        let handles: Vec<_> = vcpus
            .iter_mut()
            .enumerate()
            .map(|(id, v)| {
                let (truth, sync) = (&truth, &sync);
                s.spawn(move || vcpu_body(v, id, a, pages, truth, sync))
            })
            .collect();
        let result = (|| {
            let mut out = Vec::new();
            // Window 0 is the population and the first pass: it starts the generations.
            pause_all(&sync, n, &handles)?;
            for l in &mut lrus {
                l.age()?;
            }
            for w in 1..=a.windows {
                truth.clear();
                resume_all(&sync);
                std::thread::sleep(a.interval);
                pause_all(&sync, n, &handles)?;
                let t0 = Instant::now();
                for l in &mut lrus {
                    l.age()?;
                }
                let aging_ms = t0.elapsed().as_secs_f64() * 1e3;
                out.push(window(w, &lrus, &truth, pages, a.bins, aging_ms));
                pb.inc(1);
                if progress::interrupted() {
                    break;
                }
            }
            Ok(out)
        })();
        // ORDERING: Release: pairs with the vCPUs' Acquire loads.
        sync.stop.store(true, Ordering::Release);
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("a vCPU thread panicked"))??;
        }
        result
    })?;
    pb.finish_and_clear();
    let guest_bytes = total_pages * PAGE_SIZE;
    let mut errs: Vec<f64> = windows
        .iter()
        .skip(1)
        .filter(|w| w.true_hot_bytes > 0)
        .map(|w| {
            (w.estimated_hot_bytes as f64 - w.true_hot_bytes as f64).abs() / w.true_hot_bytes as f64
        })
        .collect();
    let hot_error = crate::compare::median(&mut errs).unwrap_or(f64::NAN);
    let mut config = Report::new("wss");
    config.config("vcpus", a.vcpus);
    config.config("bytes_per_vcpu", a.bytes_per_vcpu);
    config.config("hot_percent", a.hot_percent);
    config.config("interval_ms", a.interval.as_secs_f64() * 1e3);
    config.config("mmu", a.mmu);
    config.config("aging", a.aging);
    Ok(WssRun {
        schema: WSS_SCHEMA,
        config: config.config,
        guest_bytes,
        tlb_flush: !a.no_flush,
        totals_match: windows.iter().all(|w| w.total_bytes == guest_bytes),
        windows,
        hot_error,
    })
}

fn pause_all<T>(
    sync: &Sync,
    n: u64,
    handles: &[std::thread::ScopedJoinHandle<'_, T>],
) -> anyhow::Result<()> {
    // ORDERING: Release/Acquire: the vCPUs see the pause; their acknowledgements carry their
    // truth bits.
    sync.pause.store(true, Ordering::Release);
    let t0 = Instant::now();
    while sync.paused.load(Ordering::Acquire) < n {
        if handles.iter().any(|h| h.is_finished()) {
            bail!("a vCPU stopped before the window ended");
        }
        if t0.elapsed() > PAUSE_TIMEOUT {
            bail!("the vCPUs did not pause within {PAUSE_TIMEOUT:?}");
        }
        std::thread::yield_now();
    }
    Ok(())
}

fn resume_all(sync: &Sync) {
    // ORDERING: Release: the cleared truth bitmap before the vCPUs run again.
    sync.paused.store(0, Ordering::Release);
    sync.pause.store(false, Ordering::Release);
    sync.epoch.fetch_add(1, Ordering::Release);
}

fn window(
    w: u32,
    lrus: &[LruGen],
    truth: &Truth,
    pages: u64,
    nbins: usize,
    aging_ms: f64,
) -> Window {
    let memslots: Vec<Vec<Bin>> = lrus
        .iter()
        .map(|l| bins_of(&l.working_set(nbins)))
        .collect();
    let mut bins: Vec<Bin> = Vec::new();
    for slot in &memslots {
        for (k, b) in slot.iter().enumerate() {
            match bins.get_mut(k) {
                Some(t) => {
                    t.bytes += b.bytes;
                    t.idle_ms = t.idle_ms.max(b.idle_ms);
                }
                None => bins.push(b.clone()),
            }
        }
    }
    let (mut est, mut tru, mut both) = (0u64, 0u64, 0u64);
    for (i, l) in lrus.iter().enumerate() {
        let base = i as u64 * pages;
        let young: std::collections::HashSet<u64> = l.young_in_last_pass().collect();
        est += young.len() as u64;
        for p in 0..pages {
            if truth.get(base + p) {
                tru += 1;
                both += u64::from(young.contains(&p));
            }
        }
    }
    Window {
        window: w,
        total_bytes: bins.iter().map(|b| b.bytes).sum(),
        bins,
        memslots,
        estimated_hot_bytes: est * PAGE_SIZE,
        true_hot_bytes: tru * PAGE_SIZE,
        precision: if est == 0 {
            1.0
        } else {
            both as f64 / est as f64
        },
        recall: if tru == 0 {
            1.0
        } else {
            both as f64 / tru as f64
        },
        tlb_hidden_pages: tru - both,
        aging_ms,
    }
}

fn render(r: &WssRun) -> String {
    use std::fmt::Write;
    let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "kvmmu wss: {:.0} MiB guest, TLB {} between windows",
        mib(r.guest_bytes),
        if r.tlb_flush {
            "flushed"
        } else {
            "not flushed"
        }
    );
    let _ = writeln!(
        s,
        "\n  {:>3} {:>9} {:>9} {:>6} {:>6} {:>8} {:>8}  bins (MiB, youngest first)",
        "win", "est hot", "true hot", "prec", "recall", "hidden", "aging"
    );
    for w in &r.windows {
        let bins: Vec<String> = w
            .bins
            .iter()
            .map(|b| format!("{:.1}", mib(b.bytes)))
            .collect();
        let _ = writeln!(
            s,
            "  {:>3} {:>9.1} {:>9.1} {:>6.3} {:>6.3} {:>8} {:>6.1}ms  {}",
            w.window,
            mib(w.estimated_hot_bytes),
            mib(w.true_hot_bytes),
            w.precision,
            w.recall,
            w.tlb_hidden_pages,
            w.aging_ms,
            bins.join(" ")
        );
    }
    let _ = writeln!(
        s,
        "\n  hot-set error (median |est - true| / true, windows 2..): {:.1}%",
        r.hot_error * 100.0
    );
    let _ = writeln!(
        s,
        "  bins add up to guest memory in every window: {}",
        if r.totals_match { "yes" } else { "NO" }
    );
    s
}

/// `kvmmu wss`.
pub fn main(a: &WssArgs) -> anyhow::Result<()> {
    crate::report::check_output(&a.out)?;
    let r = run(a)?;
    if a.out.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print!("{}", render(&r));
    }
    if let Some(path) = &a.out.plot {
        let cats: Vec<String> = r.windows.iter().map(|w| format!("w{}", w.window)).collect();
        let nb = r.windows.iter().map(|w| w.bins.len()).max().unwrap_or(0);
        let series: Vec<plot::Series> = (0..nb)
            .map(|k| plot::Series {
                name: format!("idle {k} pass{}", if k + 1 == nb { "es+" } else { "" }),
                values: r
                    .windows
                    .iter()
                    .map(|w| w.bins.get(k).map_or(0.0, |b| b.bytes as f64))
                    .collect(),
            })
            .collect();
        plot::bars_in(
            path,
            &format!(
                "kvmmu wss: working-set bins per window ({} vCPUs, hot {}%, TLB {})",
                a.vcpus,
                a.hot_percent,
                if r.tlb_flush {
                    "flushed"
                } else {
                    "not flushed"
                }
            ),
            ("MiB", 1.0 / f64::from(1u32 << 20)),
            &cats,
            &series,
        )?;
    }
    if !r.totals_match {
        bail!("the working-set bins do not add up to the guest memory mapped");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_estimate_finds_the_hot_set_when_tlbs_are_flushed_and_bins_add_up() {
        let a = WssArgs {
            vcpus: 2,
            bytes_per_vcpu: 2 << 20,
            hot_percent: 25,
            windows: 3,
            interval: Duration::from_millis(50),
            bins: 4,
            no_flush: false,
            mmu: MmuArg::Tdp,
            aging: AgingArg::Lockless,
            tlb_entries: 64,
            out: OutputArgs::default(),
        };
        let r = run(&a).unwrap();
        assert!(r.totals_match);
        for w in &r.windows {
            assert_eq!(w.total_bytes, 4 << 20);
            assert!(
                w.precision > 0.99,
                "every page found young was touched: {w:?}"
            );
            assert_eq!(w.tlb_hidden_pages, 0, "a flushed TLB hides nothing: {w:?}");
        }
    }
}
