//! The default workload: populate, age, re-touch, find the hot pages, verify.

use crate::{AgingArg, MmuArg, WorkloadArgs};
use anyhow::{Context, bail, ensure};
use kvmmu::PAGE_SIZE;
use kvmmu::prelude::*;
use kvmmu_cli::error::{as_usage, require, usage};
use kvmmu_cli::report::Report as Common;
use kvmmu_cli::report::progress;
use kvmmu_cli::vcpus::{PhaseTime, run_vcpus};
use std::fmt;
use std::time::{Duration, Instant};

/// Guest physical address of the test memslot (memstress puts it high; 4 GiB keeps gfns non-trivial).
const TEST_GPA: u64 = 1 << 32;
/// Largest guest the default workload accepts (the frame arena is lazily populated, but every
/// populated page costs real memory).
const MAX_TOTAL_BYTES: u64 = 16 << 30;

/// What the workload measured.
pub struct Report {
    vcpus: usize,
    pages: u64,
    backing_src: BackingSrc,
    mmu: MmuArg,
    aging: AgingArg,
    prefault: Duration,
    populate: PhaseTime,
    faults: u64,
    fault_retries: u64,
    passes: Vec<(Duration, bool)>,
    aged_sptes_first_pass: u64,
    hot_pages: u64,
    hot_seen_young: u64,
    cold_seen_young: u64,
    verify: PhaseTime,
    stats: VmStats,
    tables_allocated: u64,
    tables_freed_after_teardown: u64,
}

fn value_for(vcpu: usize, page: u64) -> u64 {
    ((vcpu as u64) << 48) ^ (page.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 16) ^ 0xA5
}

/// The default workload: the table, or `--json`, and `--plot`.
pub fn main(cli: &WorkloadArgs) -> anyhow::Result<()> {
    kvmmu_cli::report::check_output(&cli.out)?;
    let r = run(cli)?;
    if cli.out.json || cli.out.plot.is_some() {
        let common = r.to_common();
        if cli.out.json {
            return kvmmu_cli::report::emit(&common, &cli.out);
        }
        print!("{r}");
        return kvmmu_cli::report::plot_only(&common, &cli.out);
    }
    print!("{r}");
    Ok(())
}

/// Most aging passes the default workload times (each is a full pass over guest memory).
pub const MAX_PASSES: u32 = 10_000;

/// Checks the flags before anything runs; returns the guest's size in bytes.
pub fn validate(cli: &WorkloadArgs) -> anyhow::Result<u64> {
    kvmmu_cli::check_vcpus("-v/--vcpus", cli.vcpus)?;
    kvmmu_cli::check_pages("-b/--bytes-per-vcpu", cli.bytes_per_vcpu)?;
    require(cli.passes <= MAX_PASSES, || {
        format!(
            "--passes must be at most {MAX_PASSES} (got {}); each pass ages all of guest memory",
            cli.passes
        )
    })?;
    require((1..=1 << 20).contains(&cli.tlb_entries), || {
        format!(
            "--tlb-entries must be between 1 and 1048576 (got {})",
            cli.tlb_entries
        )
    })?;
    let total = cli
        .bytes_per_vcpu
        .checked_mul(cli.vcpus as u64)
        .filter(|t| *t <= MAX_TOTAL_BYTES)
        .ok_or_else(|| {
            usage(format!(
                "-v times -b must be at most {} GiB of guest memory in all",
                MAX_TOTAL_BYTES >> 30
            ))
        })?;
    let huge = cli.backing_src.page_size();
    require(total.is_multiple_of(huge), || {
        format!(
            "-v times -b ({total} bytes) must be a multiple of the {} page size ({huge} bytes)",
            cli.backing_src
        )
    })?;
    Ok(total)
}

/// Runs the default workload described by `cli`.
pub fn run(cli: &WorkloadArgs) -> anyhow::Result<Report> {
    let total = validate(cli)?;
    let pages = total / PAGE_SIZE;
    let pages_per_vcpu = cli.bytes_per_vcpu / PAGE_SIZE;

    let config = kvmmu_cli::vm_config(cli.mmu, cli.aging, cli.tlb_entries);
    config.validate().map_err(|e| as_usage(e.into()))?;
    // Refuse, before anything runs, a guest whose frame arena this machine cannot back.
    kvmmu_cli::check_host_memory(pages + 1024)?;
    let host = HostMm::new(HostConfig {
        frames: usize::try_from(pages + 1024).context("guest too large for this machine")?,
    })?;
    // Back the simulated RAM now: first-touch page faults of the simulator's own memory are not
    // part of the MMU's fault path (the kernel's frames come from its page allocator).
    let t = Instant::now();
    host.prefault()?;
    let prefault = t.elapsed();
    let vm = Vm::new(&host, config)?;
    let hva = host.mmap_backed(total, Prot::READ | Prot::WRITE, cli.backing_src)?;
    vm.set_user_memory_region(MemoryRegion {
        slot: SlotId::new(0),
        as_id: AsId::new(0),
        flags: MemFlags::empty(),
        gpa: Gpa::new(TEST_GPA),
        size: total,
        hva,
    })?;
    let gpa_of = |vcpu: usize, page: u64| {
        Gpa::new(TEST_GPA + (vcpu as u64 * pages_per_vcpu + page) * PAGE_SIZE)
    };
    let mut vcpus = (0..cli.vcpus)
        .map(|_| vm.create_vcpu())
        .collect::<Result<Vec<_>, _>>()?;

    let pb = progress::spinner("populating");
    // Phase 1: populate (every page written once: a fault each).
    let populate = run_vcpus(&mut vcpus, |i, vcpu| {
        let mut g = vcpu.enter();
        for p in 0..pages_per_vcpu {
            g.write_u64(gpa_of(i, p), value_for(i, p))?;
        }
        Ok(())
    })?;
    let after_populate = vm.stats();

    pb.set_message("aging passes");
    // Phase 2: full aging passes through the notifier path.
    let mut passes = Vec::new();
    let mut aged_first = 0;
    for n in 0..cli.passes {
        let before = accessed_cleared(&vm.stats());
        let t = Instant::now();
        let young = host.clear_young(hva, total)?;
        passes.push((t.elapsed(), young));
        if n == 0 {
            aged_first = accessed_cleared(&vm.stats()) - before;
        }
    }

    pb.set_message("hot/cold pass");
    // Phase 3: touch hot_percent of each vCPU's pages again (reads), then ask which pages are young.
    let hot_per_vcpu = pages_per_vcpu * u64::from(cli.hot_percent) / 100;
    host.clear_young(hva, total)?;
    run_vcpus(&mut vcpus, |i, vcpu| {
        let mut g = vcpu.enter();
        for p in 0..hot_per_vcpu {
            g.read_u64(gpa_of(i, p))?;
        }
        Ok(())
    })?;
    let (mut hot_seen, mut cold_seen) = (0, 0);
    for i in 0..cli.vcpus {
        for p in 0..pages_per_vcpu {
            let a = hva
                .checked_add((i as u64 * pages_per_vcpu + p) * PAGE_SIZE)
                .context("hva overflow")?;
            if host.test_young(a)? {
                if p < hot_per_vcpu {
                    hot_seen += 1;
                } else {
                    cold_seen += 1;
                }
            }
        }
    }

    pb.set_message("verifying");
    // Phase 4: every value reads back as written.
    let verify = run_vcpus(&mut vcpus, |i, vcpu| {
        let mut g = vcpu.enter();
        for p in 0..pages_per_vcpu {
            let got = g.read_u64(gpa_of(i, p))?;
            if got != value_for(i, p) {
                bail!(
                    "vCPU {i}: page {p} read {got:#x}, expected {:#x}",
                    value_for(i, p)
                );
            }
        }
        Ok(())
    })?;

    pb.finish_and_clear();
    let stats = vm.stats();
    ensure!(
        stats.invalidate.in_progress == 0 && stats.mn_active_invalidate_count == 0,
        "invalidation counters unbalanced at the end: {:?}",
        stats.invalidate
    );
    ensure!(
        host.arena().stats().stale_accesses == 0,
        "a stale translation was used"
    );
    drop(vcpus);
    let final_stats = vm.shutdown();
    let (allocated, freed) = (
        final_stats.tdp.tables_allocated + final_stats.shadow.pages_allocated,
        final_stats.tdp.tables_freed + final_stats.shadow.pages_freed,
    );
    ensure!(
        allocated == freed,
        "page-table pages leaked: {allocated} allocated, {freed} freed"
    );
    ensure!(
        final_stats.shadow.rmap.live_descriptors() == 0,
        "rmap descriptors leaked: {:?}",
        final_stats.shadow.rmap
    );
    Ok(Report {
        vcpus: cli.vcpus,
        pages,
        backing_src: cli.backing_src,
        mmu: cli.mmu,
        aging: cli.aging,
        prefault,
        populate,
        faults: after_populate.faults,
        fault_retries: after_populate.fault_retries,
        passes,
        aged_sptes_first_pass: aged_first,
        hot_pages: hot_per_vcpu * cli.vcpus as u64,
        hot_seen_young: hot_seen,
        cold_seen_young: cold_seen,
        verify,
        stats,
        tables_allocated: allocated,
        tables_freed_after_teardown: freed,
    })
}

impl Report {
    /// The report in the common shape (`kvmmu-report/1`, command `run`) for `--json` and
    /// `--plot`; every check passed (a failed one ends the run with an error instead).
    pub fn to_common(&self) -> Common {
        let mut r = Common::new("run");
        r.config("vcpus", self.vcpus);
        r.config("guest_pages", self.pages);
        r.config("mmu", self.mmu);
        r.config("aging", self.aging);
        r.config("backing_src", self.backing_src.name());
        r.phase("prefault RAM", self.prefault);
        r.phase_time("populate", &self.populate);
        for (i, (d, _)) in self.passes.iter().enumerate() {
            r.phase(format!("aging pass {}", i + 1), *d);
        }
        r.phase_time("verify", &self.verify);
        r.counts.extend(kvmmu_cli::vm_counts(&self.stats));
        let c = &mut r.counts;
        c.insert("guest_pages".into(), self.pages);
        c.insert("faults".into(), self.faults);
        c.insert("fault_retries".into(), self.fault_retries);
        c.insert("aging_passes".into(), self.passes.len() as u64);
        c.insert(
            "aging_passes_young".into(),
            self.passes.iter().filter(|(_, y)| *y).count() as u64,
        );
        c.insert("aged_sptes_first_pass".into(), self.aged_sptes_first_pass);
        c.insert("hot_pages".into(), self.hot_pages);
        c.insert("hot_seen_young".into(), self.hot_seen_young);
        c.insert("cold_seen_young".into(), self.cold_seen_young);
        c.insert("page_tables_allocated".into(), self.tables_allocated);
        c.insert("page_tables_freed".into(), self.tables_freed_after_teardown);
        c.insert(
            "mmu_lock_read_acquisitions".into(),
            self.stats.mmu_lock.read_acquisitions,
        );
        c.insert(
            "mmu_lock_write_acquisitions".into(),
            self.stats.mmu_lock.write_acquisitions,
        );
        c.insert(
            "mmu_lock_contended_reads".into(),
            self.stats.mmu_lock.contended_reads,
        );
        c.insert(
            "mmu_lock_contended_writes".into(),
            self.stats.mmu_lock.contended_writes,
        );
        r.metrics.insert(
            "populate_faults_per_s_per_vcpu".into(),
            rate(self.faults, self.populate.wall) / self.vcpus as f64,
        );
        r.require(
            "every page read back the value written",
            true,
            format!("{} pages", self.pages),
        );
        r.require(
            "invalidations balanced",
            true,
            format!("seq {}", self.stats.invalidate.seq),
        );
        r.require("no stale translation used", true, "0 stale accesses");
        r.require(
            "page-table pages freed at teardown",
            true,
            format!(
                "{} allocated, {} freed",
                self.tables_allocated, self.tables_freed_after_teardown
            ),
        );
        r.notes.push(
            "re-touches that hit a TLB entry cached before aging set no Accessed bit: x86 does \
             not flush TLBs when aging"
                .into(),
        );
        if self.backing_src != BackingSrc::Anonymous {
            r.notes.push(
                "with huge pages one Accessed bit covers a whole huge leaf: cold pages that share \
                 a leaf with a hot page read young"
                    .into(),
            );
        }
        r
    }
}

/// Accessed bits cleared by aging, whichever MMU holds the SPTEs.
fn accessed_cleared(s: &VmStats) -> u64 {
    s.tdp.accessed_cleared + s.shadow.accessed_cleared
}

fn rate(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = String::new();
        self.render(&mut out)?;
        f.write_str(&out)
    }
}

/// Columns of the summary: a phase's label, its time, then its detail (continuation lines of a
/// detail start under the detail's first word).
const LABEL: usize = 14;
const DETAIL_COLUMN: usize = 2 + LABEL + 10 + 3 + 2;

impl Report {
    /// The summary, within [`WIDTH`](kvmmu_cli::report::table::WIDTH) columns.
    fn render(&self, f: &mut String) -> fmt::Result {
        use kvmmu_cli::report::table::{WIDTH, wrap};
        let mib = (self.pages * PAGE_SIZE) >> 20;
        let plural = if self.vcpus == 1 { "" } else { "s" };
        let mmu = match self.mmu {
            MmuArg::Tdp => "TDP MMU",
            MmuArg::Shadow => "shadow MMU",
        };
        let aging = match self.aging {
            AgingArg::Lockless => "lockless aging",
            AgingArg::Locked => "locked aging (under mmu_lock)",
        };
        f.push_str(&format!(
            "kvmmu default workload: {} vCPU{plural}, {mib} MiB guest ({} pages)\n  {mmu}, {aging}, {} backing\n",
            self.vcpus, self.pages, self.backing_src
        ));
        let timed = |f: &mut String, label: &str, d: Duration, detail: &str| {
            let first = format!("  {label:<LABEL$}{:>10.3} ms  ", d.as_secs_f64() * 1e3);
            f.push_str(&wrap(detail, &first, &" ".repeat(DETAIL_COLUMN), WIDTH));
        };
        let plain = |f: &mut String, label: &str, detail: &str| {
            let first = format!("  {label:<LABEL$} ");
            f.push_str(&wrap(detail, &first, &" ".repeat(LABEL + 3), WIDTH));
        };
        timed(
            f,
            "prefault RAM",
            self.prefault,
            "the simulator's own frame arena, not MMU work",
        );
        timed(
            f,
            "populate",
            self.populate.wall,
            &format!(
                "{} faults ({} retries), {:.2} M faults/s per vCPU",
                self.faults,
                self.fault_retries,
                rate(self.faults, self.populate.wall) / self.vcpus as f64 / 1e6
            ),
        );
        for (i, (d, young)) in self.passes.iter().enumerate() {
            let seen = if *young { "young" } else { "none young" };
            let detail = if i == 0 {
                format!(
                    "{seen}, {} SPTEs aged, {:.1} M SPTEs/s",
                    self.aged_sptes_first_pass,
                    rate(self.pages, *d) / 1e6
                )
            } else {
                format!("{seen}, {:.1} M SPTEs/s", rate(self.pages, *d) / 1e6)
            };
            timed(f, &format!("aging pass {}", i + 1), *d, &detail);
        }
        timed(
            f,
            "verify",
            self.verify.wall,
            "every page read back the value written",
        );
        plain(
            f,
            "hot/cold",
            &format!(
                "{} of {} re-touched and {} of {} untouched pages seen young",
                self.hot_seen_young,
                self.hot_pages,
                self.cold_seen_young,
                self.pages - self.hot_pages
            ),
        );
        plain(
            f,
            "checks",
            &format!(
                "invalidations balanced (seq {}, in progress {}); no stale translation; \
                 {} page-table pages allocated = {} freed at teardown",
                self.stats.invalidate.seq,
                self.stats.invalidate.in_progress,
                self.tables_allocated,
                self.tables_freed_after_teardown
            ),
        );
        plain(
            f,
            "mmu_lock",
            &format!(
                "{} read, {} write acquisitions; {} reads and {} writes waited",
                self.stats.mmu_lock.read_acquisitions,
                self.stats.mmu_lock.write_acquisitions,
                self.stats.mmu_lock.contended_reads,
                self.stats.mmu_lock.contended_writes
            ),
        );
        if self.mmu == MmuArg::Shadow {
            let sh = &self.stats.shadow;
            plain(
                f,
                "shadow",
                &format!(
                    "{} faults, {} shadow pages, SPTEs aged {} lockless / {} locked, rmap bit \
                     contended {} times",
                    sh.faults,
                    sh.pages_allocated,
                    sh.aged_sptes_lockless,
                    sh.aged_sptes_locked,
                    sh.rmap.lock_contended
                ),
            );
        }
        plain(
            f,
            "note",
            "re-touches that hit a TLB entry cached before aging set no Accessed bit \
             (x86 does not flush TLBs when aging)",
        );
        if self.backing_src != BackingSrc::Anonymous {
            plain(
                f,
                "note",
                "one Accessed bit covers a whole huge leaf: untouched pages that share a leaf \
                 with a re-touched page read young",
            );
        }
        Ok(())
    }
}
