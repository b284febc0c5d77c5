//! `kvmmu access-tracking`: KVM's `access_tracking_perf_test` (spec §5.2) on kvmmu.
//!
//! Protocol: vCPUs populate their regions (memstress: partitioned, or all of it with `-o`), then
//! the timed phases of the selftest run in order — with `--idle lru-gen` an initial aging pass and
//! a re-population first — writing and reading populated memory, marking memory idle, and writing
//! and reading idle memory. Marking idle checks that the guest's accesses were seen:
//! 1. page-idle: fewer than 1% of the pages may lack a frame (always fatal), and fewer than 10%
//!    may still be idle after the guest touched them (fatal or a warning per `-w`);
//! 2. lru-gen: after an access phase the pages (more than 90% of them) must sit in a newer
//!    generation than before (fatal or a warning per `-w`, falling back to 50%).
//!
//! With `-p` (the historic benchmark mode behind the published tables) the vCPUs populate while
//! the main thread runs aging passes back to back; the report gives the vCPU wall time and the
//! average pass duration with the pass count.
//!
//! The vCPU TLB is real x86 behaviour here: aging does not flush it, so a page touched only
//! through a cached translation sets no Accessed bit and looks idle. `--tlb-entries` sizes it;
//! the automatic `-w` policy warns instead of failing when the TLBs could cover 10% of the pages.

use crate::report::{Report, progress};
use crate::vcpus::{PhaseTime, Span, run_vcpus};
use crate::{AgingArg, MmuArg, OutputArgs, size, vm_config};
use anyhow::{Context, ensure};
use clap::{Args, ValueEnum};
use kvmmu::PAGE_SIZE;
use kvmmu::prelude::*;
use kvmmu::{IdleState, LruGen, MAX_FRAMES, PageIdle};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

mod idle;
use idle::{mark_idle_lru_gen, mark_idle_page_idle, page_hva};

/// Guest physical address of the test memslot.
const TEST_GPA: u64 = 1 << 32;
/// The memslot index memstress uses for test memory.
const TEST_SLOT: u16 = 1;
/// Frames beyond the guest's pages (slack for nothing in particular: the test memory is all).
const SPARE_FRAMES: u64 = 64;

/// `--idle`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdleArg {
    /// `/sys/kernel/mm/page_idle/bitmap`: per page, read then write the idle flag.
    PageIdle,
    /// MGLRU: age the whole range in one pass and track generations.
    LruGen,
}

/// Options of `access-tracking`.
#[derive(Debug, Clone, Args)]
pub struct AccessArgs {
    /// Number of vCPUs.
    #[arg(short = 'v', long, default_value_t = 1)]
    pub vcpus: usize,

    /// Guest memory per vCPU (bytes; K, M, G suffixes; the selftest's default is 1G).
    #[arg(short = 'b', long, default_value = "64M", value_parser = size::parse_size)]
    pub bytes_per_vcpu: u64,

    /// Overlap: every vCPU walks all of guest memory instead of its own part.
    #[arg(short = 'o', long)]
    pub overlap: bool,

    /// Idle-page policy when accessed pages look idle: 0 fail, >0 warn, <0 or unset: auto (warn
    /// when the vCPU TLBs can hold 10% of the pages, fail otherwise).
    #[arg(short = 'w', long = "idle-policy", allow_negative_numbers = true)]
    pub idle_policy: Option<i64>,

    /// Which MMU maps guest memory.
    #[arg(long, value_enum, default_value_t = MmuArg::Tdp)]
    pub mmu: MmuArg,

    /// How aging reaches the SPTEs.
    #[arg(long, value_enum, default_value_t = AgingArg::Lockless)]
    pub aging: AgingArg,

    /// How memory is marked idle.
    #[arg(long, value_enum, default_value_t = IdleArg::LruGen)]
    pub idle: IdleArg,

    /// Entries in each vCPU's software TLB.
    #[arg(long, default_value_t = 2048)]
    pub tlb_entries: usize,

    /// Leaves without hardware A/D bits (`VmConfig::ad_bits = Disabled`): aging marks them for
    /// access tracking and the next access is fixed by the fast page fault.
    #[arg(long)]
    pub ad_disabled: bool,

    /// Seed of the values the guest writes and of the page order with --random-access.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// Visit each vCPU's pages in a seeded pseudo-random order (memstress -a).
    #[arg(short = 'a', long)]
    pub random_access: bool,

    /// Benchmark mode (-p): populate while an aging thread runs passes back to back; report vCPU
    /// wall time and the average aging pass (spec §6 items 5-6).
    #[arg(short = 'p', long)]
    pub age_while_populating: bool,

    /// With -p: populate without the aging thread (the "no aging" column). Set by `compare`.
    #[arg(skip)]
    pub no_aging_thread: bool,

    /// Run the vCPUs as an L2 guest over EPT12 tables L1 built (nested TDP: indirect shadow
    /// pages; the test memory is also mapped at more L2 windows, so rmap chains hold several SPTEs:
    /// see --nested-aliases).
    #[arg(long)]
    pub nested: bool,

    /// With --nested: extra L2 windows onto the test memory (each adds one SPTE to every rmap
    /// chain; the default 2 gives chains of 3, so KVM's `max_mmu_rmap_size`, the most entries an
    /// insertion found before it, reaches 2).
    #[arg(long, default_value_t = 2, requires = "nested")]
    pub nested_aliases: u64,

    /// Backing source of guest memory (the selftests' -s): anonymous, anonymous_thp,
    /// anonymous_hugetlb_2mb or anonymous_hugetlb_1gb (hugetlb needs -v x -b aligned to its size).
    #[arg(short = 's', long = "backing-src", default_value = "anonymous")]
    pub backing_src: kvmmu::BackingSrc,
}

/// `access-tracking` with its output options.
#[derive(Debug, Clone, Args)]
pub struct AccessCommand {
    /// The workload.
    #[command(flatten)]
    pub args: AccessArgs,
    /// Output.
    #[command(flatten)]
    pub out: OutputArgs,
}

/// What `-w` resolved to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Policy {
    Fail,
    Warn,
}

struct Layout {
    vcpus: usize,
    pages_per_vcpu: u64,
    test_pages: u64,
    total: u64,
    overlap: bool,
    stride: u64,
    seed: u64,
    random: bool,
}

impl Layout {
    /// The pages vCPU `i` walks, as (first page, count).
    fn region(&self, i: usize) -> (u64, u64) {
        if self.overlap {
            (0, self.test_pages)
        } else {
            (i as u64 * self.pages_per_vcpu, self.pages_per_vcpu)
        }
    }

    /// The `k`-th page vCPU `i` visits.
    fn page(&self, i: usize, k: u64) -> u64 {
        let (first, n) = self.region(i);
        if self.random {
            first + (k.wrapping_mul(self.stride).wrapping_add(self.seed)) % n
        } else {
            first + k
        }
    }

    fn value(&self, i: usize, page: u64, iteration: u64) -> u64 {
        (page ^ (iteration << 40) ^ ((i as u64) << 56)).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ self.seed
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Checks the flags before anything runs.
fn validate(a: &AccessArgs) -> anyhow::Result<(u64, u64)> {
    crate::check_vcpus("-v/--vcpus", a.vcpus)?;
    crate::check_pages("-b/--bytes-per-vcpu", a.bytes_per_vcpu)?;
    ensure!(
        (1..=1 << 20).contains(&a.tlb_entries),
        "--tlb-entries must be between 1 and 1048576 (got {})",
        a.tlb_entries
    );
    let total = a
        .bytes_per_vcpu
        .checked_mul(a.vcpus as u64)
        .context("-v times -b overflows 64 bits")?;
    let pages = total / PAGE_SIZE;
    ensure!(
        pages + SPARE_FRAMES <= MAX_FRAMES as u64,
        "guest memory of {total} bytes exceeds the host's frame arena ({} frames of 4K at most)",
        MAX_FRAMES
    );
    ensure!(
        (1..=crate::nested::MAX_ALIASES).contains(&a.nested_aliases),
        "--nested-aliases must be between 1 and {}",
        crate::nested::MAX_ALIASES
    );
    crate::check_host_memory(pages + SPARE_FRAMES)?;
    ensure!(
        total.is_multiple_of(a.backing_src.page_size()),
        "-v times -b ({total} bytes) must be a multiple of the {} page size ({} bytes)",
        a.backing_src,
        a.backing_src.page_size()
    );
    Ok((total, pages))
}

/// The VM configuration of the flags.
fn config_of(a: &AccessArgs) -> kvmmu::VmConfig {
    kvmmu::VmConfig {
        ad_bits: crate::ad_bits(a.ad_disabled),
        ..vm_config(a.mmu, a.aging, a.tlb_entries)
    }
}

/// Refuses bad flags (a usage error naming the flag) before any work; returns the guest's size
/// in bytes and pages.
pub fn check(a: &AccessArgs) -> anyhow::Result<(u64, u64)> {
    let r = validate(a).map_err(crate::error::as_usage)?;
    config_of(a)
        .validate()
        .map_err(|e| crate::error::as_usage(anyhow::Error::new(e)))?;
    if a.no_aging_thread && !a.age_while_populating {
        return Err(crate::error::usage_hint(
            "the no-aging configuration only changes access-tracking with -p",
            "add -p (--age-while-populating) to the workload's flags",
        ));
    }
    Ok(r)
}

/// Runs the test; a failed check is a failed report, an error is a failure to run at all.
pub fn run(a: &AccessArgs) -> anyhow::Result<Report> {
    let (total, test_pages) = check(a)?;
    let config = config_of(a);
    let policy = match a.idle_policy {
        Some(0) => Policy::Fail,
        Some(p) if p > 0 => Policy::Warn,
        _ if (a.vcpus as u64).saturating_mul(a.tlb_entries as u64) * 10 >= test_pages => {
            Policy::Warn
        }
        _ => Policy::Fail,
    };
    let mut n = (test_pages / a.vcpus as u64).max(1);
    if a.overlap {
        n = test_pages;
    }
    let mut stride = (a.seed.wrapping_mul(0x9E37_79B9) % n) | 1;
    while gcd(stride, n) != 1 {
        stride += 2;
    }
    let lay = Layout {
        vcpus: a.vcpus,
        pages_per_vcpu: test_pages / a.vcpus as u64,
        test_pages,
        total,
        overlap: a.overlap,
        stride,
        seed: a.seed,
        random: a.random_access,
    };

    let mut r = Report::new("access-tracking");
    r.config("vcpus", a.vcpus);
    r.config("bytes_per_vcpu", a.bytes_per_vcpu);
    r.config("overlap", a.overlap);
    r.config("mmu", a.mmu);
    r.config("aging", a.aging);
    r.config("idle", a.idle);
    r.config("tlb_entries", a.tlb_entries);
    r.config("ad_disabled", a.ad_disabled);
    r.config("seed", a.seed);
    r.config("random_access", a.random_access);
    r.config("age_while_populating", a.age_while_populating);
    r.config("backing_src", a.backing_src.name());
    r.config("nested", a.nested);
    r.config("nested_aliases", a.nested_aliases);
    r.config("aging_thread", a.age_while_populating && !a.no_aging_thread);
    r.config(
        "idle_policy",
        match policy {
            Policy::Fail => "fail",
            Policy::Warn => "warn",
        },
    );
    r.counts.insert("test_pages".into(), test_pages);

    let tables = if a.nested {
        crate::nested::table_frames(test_pages, 1 + a.nested_aliases)
    } else {
        0
    };
    let host = HostMm::new(HostConfig {
        frames: usize::try_from(test_pages + SPARE_FRAMES + tables)?,
    })?;
    host.prefault()?;
    let vm = Vm::new(&host, config)?;
    if a.nested {
        vm.enable_nested()?;
    }
    let hva = host.mmap_backed(total, Prot::READ | Prot::WRITE, a.backing_src)?;
    vm.set_user_memory_region(MemoryRegion {
        slot: SlotId::new(TEST_SLOT),
        as_id: AsId::new(0),
        flags: MemFlags::empty(),
        gpa: Gpa::new(TEST_GPA),
        size: total,
        hva,
    })?;
    let mut vcpus = (0..a.vcpus)
        .map(|_| vm.create_vcpu())
        .collect::<Result<Vec<_>, _>>()?;
    let _guest = if a.nested {
        Some(crate::nested::enter_l2(
            &host,
            &vm,
            &mut vcpus,
            TEST_GPA,
            total,
            a.nested_aliases,
            Some(&|i| lay.region(i)),
        )?)
    } else {
        None
    };

    if a.age_while_populating {
        populate_while_aging(a, &lay, &host, hva, &mut vcpus, &mut r)?;
    } else {
        selftest_phases(a, &lay, &host, hva, &mut vcpus, policy, &mut r)?;
    }

    if a.nested {
        crate::nested::report(&vm, &mut r, true);
    }
    let stats = vm.stats();
    r.counts.extend(crate::vm_counts(&stats));
    r.counts.insert("faults".into(), stats.faults);
    r.counts.insert("fault_retries".into(), stats.fault_retries);
    r.counts.insert("age_calls".into(), stats.age_calls);
    r.counts.insert("age_young".into(), stats.age_young);
    r.counts.insert(
        "mmu_lock_contended_reads".into(),
        stats.mmu_lock.contended_reads,
    );
    r.require(
        "invalidations balanced",
        stats.invalidate.in_progress == 0 && stats.mn_active_invalidate_count == 0,
        format!(
            "{} in progress, {} active",
            stats.invalidate.in_progress, stats.mn_active_invalidate_count
        ),
    );
    let stale = host.arena().stats().stale_accesses;
    r.require(
        "no stale translation used",
        stale == 0,
        format!("{stale} stale accesses"),
    );
    drop(vcpus);
    let fin = vm.shutdown();
    r.require(
        "page-table pages freed at teardown",
        fin.tdp.tables_allocated == fin.tdp.tables_freed,
        format!(
            "{} allocated, {} freed",
            fin.tdp.tables_allocated, fin.tdp.tables_freed
        ),
    );
    if policy == Policy::Warn {
        r.notes.push(
            "idle checks warn only: the vCPU TLBs can hold 10% or more of the pages, and a page \
             touched through a cached translation sets no Accessed bit (x86 does not flush TLBs \
             when aging)"
                .into(),
        );
    }
    Ok(r)
}

/// Runs one guest pass over every vCPU's pages (memstress's guest loop body); `write` per access.
fn access_phase(
    lay: &Layout,
    vcpus: &mut [Vcpu],
    iteration: u64,
    write: bool,
    msg: &str,
) -> anyhow::Result<PhaseTime> {
    let pb = progress::bar(lay.vcpus as u64 * lay.region(0).1, msg);
    let d = run_vcpus(vcpus, |i, vcpu| {
        let (_, n) = lay.region(i);
        let mut g = vcpu.enter();
        for k in 0..n {
            let p = lay.page(i, k);
            let gpa = Gpa::new(TEST_GPA + p * PAGE_SIZE);
            if write {
                g.write_u64(gpa, lay.value(i, p, iteration))
            } else {
                g.read_u64(gpa).map(|_| ())
            }
            .with_context(|| format!("{msg}: page {p}"))?;
            if k % 4096 == 4095 {
                pb.inc(4096);
            }
        }
        Ok(())
    })?;
    pb.finish_and_clear();
    Ok(d)
}

#[allow(clippy::too_many_arguments)]
fn selftest_phases(
    a: &AccessArgs,
    lay: &Layout,
    host: &HostMm,
    hva: Hva,
    vcpus: &mut [Vcpu],
    policy: Policy,
    r: &mut Report,
) -> anyhow::Result<()> {
    let mut iteration = 0;
    let mut access = |r: &mut Report, vcpus: &mut [Vcpu], write: bool, name: &str| {
        iteration += 1;
        let d = access_phase(lay, vcpus, iteration, write, name)?;
        r.phase_time(name, &d);
        anyhow::Ok(())
    };
    access(r, vcpus, true, "Populating memory")?;
    match a.idle {
        IdleArg::PageIdle => {
            let idle = PageIdle::new(host);
            access(r, vcpus, true, "Writing to populated memory")?;
            access(r, vcpus, false, "Reading from populated memory")?;
            mark_idle_page_idle(lay, &idle, hva, policy, 1, r)?;
            access(r, vcpus, true, "Writing to idle memory")?;
            mark_idle_page_idle(lay, &idle, hva, policy, 2, r)?;
            access(r, vcpus, false, "Reading from idle memory")?;
        }
        IdleArg::LruGen => {
            let mut lru = LruGen::new(host, hva, lay.total)?;
            let (pass, span) = Span::measure(|| lru.age());
            let pass = pass?;
            r.phase("Initial aging pass (lru_gen)", span.duration());
            r.require(
                "initial aging pass sees every page",
                pass.resident >= lay.test_pages,
                format!(
                    "{} resident of {} test pages",
                    pass.resident, lay.test_pages
                ),
            );
            access(r, vcpus, true, "Re-populating memory")?;
            let mut last_gen = lru.find_generation(lay.test_pages * 9 / 10).unwrap_or(0);
            access(r, vcpus, true, "Writing to populated memory")?;
            access(r, vcpus, false, "Reading from populated memory")?;
            last_gen = mark_idle_lru_gen(lay, &mut lru, last_gen, policy, 1, r)?;
            access(r, vcpus, true, "Writing to idle memory")?;
            last_gen = mark_idle_lru_gen(lay, &mut lru, last_gen, policy, 2, r)?;
            access(r, vcpus, false, "Reading from idle memory")?;
            r.counts
                .insert("lru_gen_last_generation".into(), u64::from(last_gen));
        }
    }
    Ok(())
}

/// `-p`: vCPUs populate while aging passes run back to back on this thread.
fn populate_while_aging(
    a: &AccessArgs,
    lay: &Layout,
    host: &HostMm,
    hva: Hva,
    vcpus: &mut [Vcpu],
    r: &mut Report,
) -> anyhow::Result<()> {
    let mut lru = match a.idle {
        IdleArg::LruGen => Some(LruGen::new(host, hva, lay.total)?),
        IdleArg::PageIdle => None,
    };
    let idle = PageIdle::new(host);
    let done = AtomicUsize::new(0);
    // Set by the aging thread as its first pass starts; the vCPUs wait for it so that the first
    // pass overlaps populating however the OS schedules the threads (otherwise, on a loaded
    // machine, every vCPU may finish before the aging thread first runs).
    let aging_started = std::sync::atomic::AtomicBool::new(a.no_aging_thread);
    let spans = std::sync::Mutex::new(Vec::<Span>::new());
    let (mut passes, mut aging_total) = (0u64, Duration::ZERO);
    let start_barrier = std::sync::Barrier::new(lay.vcpus + 1);
    let pb = progress::bar(lay.vcpus as u64, "Populating memory (async)");
    std::thread::scope(|s| {
        let hs: Vec<_> = vcpus
            .iter_mut()
            .enumerate()
            .map(|(i, vcpu)| {
                let (done, spans, b, pb) = (&done, &spans, &start_barrier, &pb);
                let aging_started = &aging_started;
                crate::vcpus::spawn_named(s, format!("vcpu-{i}"), move || -> anyhow::Result<()> {
                    b.wait();
                    // ORDERING: Acquire pairs with the aging thread's Release store; the flag
                    // only orders start times, no data is published through it. Bounded: the
                    // aging thread sets it before its first pass, right after the barrier.
                    while !aging_started.load(Ordering::Acquire) {
                        std::thread::yield_now();
                    }
                    let (_, n) = lay.region(i);
                    let (r, span) = Span::measure(|| {
                        let mut g = vcpu.enter();
                        for k in 0..n {
                            let p = lay.page(i, k);
                            g.write_u64(Gpa::new(TEST_GPA + p * PAGE_SIZE), lay.value(i, p, 1))
                                .with_context(|| format!("vCPU {i}: page {p}"))?;
                        }
                        anyhow::Ok(())
                    });
                    if let Ok(mut m) = spans.lock() {
                        m.push(span);
                    }
                    done.fetch_add(1, Ordering::Release);
                    pb.inc(1);
                    r
                })
            })
            .collect();
        start_barrier.wait();
        if !a.no_aging_thread {
            // Bounded by the vCPUs' progress: each pass is finite and the vCPUs always finish
            // (an error also counts as finished).
            while done.load(Ordering::Acquire) < lay.vcpus {
                let t = Instant::now();
                // ORDERING: Release, see the vCPUs' wait above.
                aging_started.store(true, Ordering::Release);
                match lru.as_mut() {
                    Some(l) => {
                        l.age()?;
                    }
                    None => {
                        for p in 0..lay.test_pages {
                            let ph = page_hva(hva, p);
                            if idle.read(ph)? == IdleState::NotIdle {
                                idle.mark_idle(ph)?;
                            }
                        }
                    }
                }
                aging_total += t.elapsed();
                passes += 1;
            }
        }
        for (i, h) in hs.into_iter().enumerate() {
            h.join()
                .map_err(|_| anyhow::anyhow!("vCPU {i} panicked"))??;
        }
        anyhow::Ok(())
    })?;
    pb.finish_and_clear();
    let time = PhaseTime::from_spans(
        &spans
            .into_inner()
            .map_err(|_| anyhow::anyhow!("poisoned"))?,
    );
    r.phase_time("Populating memory (async)", &time);
    r.metrics
        .insert("vcpu_wall_time_s".into(), time.wall.as_secs_f64());
    r.counts.insert("aging_passes".into(), passes);
    if passes > 0 {
        r.metrics
            .insert("aging_total_s".into(), aging_total.as_secs_f64());
        r.metrics.insert(
            "aging_avg_pass_s".into(),
            aging_total.as_secs_f64() / passes as f64,
        );
    }
    if !a.no_aging_thread {
        r.require(
            "at least one aging pass ran while populating",
            passes >= 1,
            format!("{passes} passes"),
        );
    }
    Ok(())
}

/// `kvmmu access-tracking`.
pub fn main(cmd: &AccessCommand) -> anyhow::Result<()> {
    crate::report::check_output(&cmd.out)?;
    let r = run(&cmd.args)?;
    crate::report::emit(&r, &cmd.out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> AccessArgs {
        AccessArgs {
            ad_disabled: false,
            vcpus: 2,
            bytes_per_vcpu: 1 << 20,
            overlap: false,
            idle_policy: None,
            mmu: MmuArg::Tdp,
            aging: AgingArg::Lockless,
            idle: IdleArg::PageIdle,
            tlb_entries: 16,
            seed: 1,
            random_access: false,
            age_while_populating: false,
            no_aging_thread: false,
            nested: false,
            nested_aliases: 2,
            backing_src: kvmmu::BackingSrc::Anonymous,
        }
    }

    #[test]
    fn bad_flags_are_refused_before_running() {
        let mut a = args();
        a.vcpus = 0;
        assert!(run(&a).unwrap_err().to_string().contains("--vcpus"));
        let mut a = args();
        a.bytes_per_vcpu = 100;
        assert!(run(&a).unwrap_err().to_string().contains("multiple of 4K"));
        let mut a = args();
        a.bytes_per_vcpu = !(PAGE_SIZE - 1);
        assert!(run(&a).unwrap_err().to_string().contains("overflow"));
        let mut a = args();
        a.bytes_per_vcpu = 1 << 40;
        assert!(run(&a).unwrap_err().to_string().contains("frame arena"));
        let mut a = args();
        a.mmu = MmuArg::Shadow;
        // Until the shadow MMU lands the library refuses it by name; afterwards it must pass.
        match run(&a) {
            Err(e) => assert!(e.to_string().contains("not available"), "{e}"),
            Ok(r) => assert!(r.passed, "{}", r.failures()),
        }
    }

    #[test]
    fn nested_run_has_indirect_pages_and_rmap_chains_of_three_on_both_mmus() {
        for mmu in [MmuArg::Tdp, MmuArg::Shadow] {
            let mut a = args();
            a.nested = true;
            a.mmu = mmu;
            let r = run(&a).unwrap();
            assert!(r.passed, "{mmu:?}: {}", r.failures());
            assert!(r.counts["indirect_shadow_pages"] > 0);
            assert_eq!(
                r.counts["max_rmap_len"], 3,
                "{mmu:?}: one SPTE per L2 window"
            );
            assert_eq!(
                r.counts["max_mmu_rmap_size"], 2,
                "{mmu:?}: entries found at insertion"
            );
        }
        let mut a = args();
        a.nested = true;
        a.nested_aliases = 5;
        let r = run(&a).unwrap();
        assert!(r.passed, "{}", r.failures());
        assert_eq!(r.counts["max_rmap_len"], 6, "one SPTE per L2 window");
        assert_eq!(r.counts["max_mmu_rmap_size"], 5);
    }

    #[test]
    fn random_order_visits_every_page_once() {
        let lay = Layout {
            vcpus: 1,
            pages_per_vcpu: 12,
            test_pages: 12,
            total: 12 * PAGE_SIZE,
            overlap: false,
            stride: 5,
            seed: 7,
            random: true,
        };
        let mut seen: Vec<u64> = (0..12).map(|k| lay.page(0, k)).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..12).collect::<Vec<_>>());
    }
}
