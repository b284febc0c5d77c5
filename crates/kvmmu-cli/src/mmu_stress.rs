//! `kvmmu mmu-stress`: KVM's `mmu_stress_test` (spec §5.3) on kvmmu.
//!
//! Protocol: one host buffer of `-s` bytes is prefaulted and aliased into as many memslots as fit
//! in `-m` bytes of guest memory (slot 1 at 4 GiB, then contiguous); the guest range is split
//! evenly across the vCPUs. The vCPUs and the main thread meet at rendezvous points, with the
//! main thread timing the stretches between them:
//! 1. stage 0: every vCPU writes every page of its range ("run 1");
//! 2. the main thread resets the MMU (new roots, as the CR0.WP toggle does) ("reset");
//! 3. stage 1: write every page again ("run 2"); stage 2: read every page back, unsynchronised;
//! 4. the main thread `mprotect`s the buffer read-only while the vCPUs keep writing (stage 3):
//!    every vCPU must see the EFAULT-like exit, and no write may succeed once the `mprotect`
//!    returned ("ro");
//! 5. the main thread makes it writable again and every vCPU's write completes (stage 4) ("rw");
//! 6. even slots are deleted, the first half of the buffer is unmapped, and the process "exits"
//!    without deleting the other slots: the host's `release` must tear the VM down.
//!
//! Checks (each violated one fails the run, naming the check and the vCPU): the values read in
//! stage 2 are the ones written in stage 1 (every alias of a buffer offset writes the same value);
//! the read-only window; the EFAULT exits; no stale translation; balanced invalidations; the VM
//! is dead after `release` and its page-table pages were all freed.

use crate::report::{Report, progress};
use crate::vcpus::Span;
use crate::{AgingArg, MmuArg, OutputArgs, size, vm_config};
use anyhow::{Context, anyhow, bail, ensure};
use clap::Args;
use kvmmu::PAGE_SIZE;
use kvmmu::prelude::*;
use kvmmu::{GupError, HostError, MAX_FRAMES};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

mod rendezvous;
use rendezvous::{AbortOnDrop, Rendezvous, stage_times, wait_all_hit};

/// Guest physical address of slot 1.
const BASE_GPA: u64 = 1 << 32;
/// Guest physical address bits (MAXPHYADDR) of the simulated machine.
const MAXPHYADDR: u32 = 46;
/// Stage-3 writes a vCPU makes once the buffer is read-only before it stops writing and waits
/// (sleeping) for the other vCPUs to see the EFAULT exit.
const MAX_RO_ATTEMPTS: u64 = 5_000_000;
/// Milliseconds a vCPU that saw the EFAULT exit waits for the others before failing.
const MAX_WAIT_MS: u32 = 120_000;
/// Upper bound on stage-4 retries of one page while waiting for `mprotect(RW)`.
const MAX_RW_RETRIES: u64 = 1_000_000;

/// Options of `mmu-stress`.
#[derive(Debug, Clone, Args)]
pub struct StressArgs {
    /// Number of vCPUs.
    #[arg(short = 'c', long, default_value_t = 2)]
    pub vcpus: usize,

    /// Maximum guest memory (bytes; K, M, G suffixes; the selftest's unit is GiB, default 128G).
    #[arg(short = 'm', long, default_value = "1G", value_parser = size::parse_size)]
    pub max_mem: u64,

    /// Slot size, which is also the size of the one aliased host buffer (selftest default 2G).
    #[arg(short = 's', long, default_value = "64M", value_parser = size::parse_size)]
    pub slot_size: u64,

    /// Which MMU maps guest memory.
    #[arg(long, value_enum, default_value_t = MmuArg::Tdp)]
    pub mmu: MmuArg,

    /// How aging reaches the SPTEs.
    #[arg(long, value_enum, default_value_t = AgingArg::Lockless)]
    pub aging: AgingArg,

    /// Run an aging thread (clear_young over the whole buffer, back to back) throughout.
    #[arg(long)]
    pub age: bool,

    /// Entries in each vCPU's software TLB.
    #[arg(long, default_value_t = 2048)]
    pub tlb_entries: usize,

    /// Run the stages under a host memory limit with swap: kswapd and direct reclaim age and
    /// evict the buffer's pages throughout (the shape of Yu Zhao's `max_guest_memory_test` runs).
    #[arg(long)]
    pub reclaim: bool,

    /// Run the vCPUs as an L2 guest: L1 maps the guest range one to one in EPT12 (built with
    /// ordinary writes in a table slot at gpa 0), so every access goes through indirect shadow
    /// pages.
    #[arg(long)]
    pub nested: bool,

    /// The memory limit with `--reclaim` (bytes, below -s; default half of -s).
    #[arg(long, requires = "reclaim", value_parser = size::parse_size)]
    pub limit: Option<u64>,

    /// Back the buffer with 2M hugetlb pages (the selftest's `-H`: a hugetlb memfd), so the
    /// slots are mapped with 2M leaves; -s must be a multiple of 2M. Not with --reclaim
    /// (hugetlb pages are not reclaimed).
    #[arg(short = 'H', long, conflicts_with = "reclaim")]
    pub hugepages: bool,
}

/// `mmu-stress` with its output options.
#[derive(Debug, Clone, Args)]
pub struct StressCommand {
    /// The workload.
    #[command(flatten)]
    pub args: StressArgs,
    /// Output.
    #[command(flatten)]
    pub out: OutputArgs,
}

/// How the main thread write-protects the buffer: `mprotect` normally; tests substitute a host
/// operation the MMU never hears about to prove the read-only check catches it.
pub type WriteProtect<'a> = &'a (dyn Fn(&HostMm, Hva, u64) -> Result<(), HostError> + Sync);

/// The normal write-protect: `mprotect(PROT_READ)`.
pub fn mprotect_read_only(host: &HostMm, hva: Hva, len: u64) -> Result<(), HostError> {
    host.mprotect(hva, len, Prot::READ)
}

struct Shared {
    slot_size: u64,
    ro_done: AtomicBool,
    all_hit_ro: AtomicBool,
    nr_ro_faults: AtomicU64,
    vcpus: u64,
}

impl Shared {
    /// The value every alias of buffer offset `off` writes in `stage`.
    fn value(&self, gpa: u64, stage: u64) -> u64 {
        let off = (gpa - BASE_GPA) % self.slot_size;
        (off ^ (stage << 56)).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1
    }
}

fn is_ro_fault(e: &VcpuExit) -> bool {
    matches!(
        e,
        VcpuExit::HostFault {
            error: GupError::ProtectionViolation { write: true, .. },
            ..
        }
    )
}

/// The host vCPU thread of the selftest (its stages 0-4).
fn vcpu_thread(
    i: usize,
    vcpu: &mut Vcpu,
    range: (u64, u64),
    sh: &Shared,
    rv: &Rendezvous,
    marks: &mut Vec<Span>,
) -> anyhow::Result<()> {
    let pages = || (range.0..range.1).step_by(PAGE_SIZE as usize);
    let write_all = |vcpu: &mut Vcpu, stage: u64| -> anyhow::Result<()> {
        let mut g = vcpu.enter();
        for gpa in pages() {
            g.write_u64(Gpa::new(gpa), sh.value(gpa, stage))
                .with_context(|| format!("vCPU {i}: stage {stage} write of gpa {gpa:#x}"))?;
        }
        Ok(())
    };
    rv.wait_marked(marks)?;
    write_all(vcpu, 0)?;
    rv.wait_marked(marks)?;
    rv.wait_marked(marks)?; // the main thread resets the MMU between these two
    write_all(vcpu, 1)?;
    rv.wait_marked(marks)?;
    {
        let mut g = vcpu.enter();
        for gpa in pages() {
            let got = g
                .read_u64(Gpa::new(gpa))
                .with_context(|| format!("vCPU {i}: stage 2 read of gpa {gpa:#x}"))?;
            // Another vCPU may already be in stage 3, writing the same buffer offset through
            // another alias: its stage-3 value is the only other one allowed.
            ensure!(
                got == sh.value(gpa, 1) || got == sh.value(gpa, 3),
                "check 'stage 2 reads what stage 1 wrote' failed on vCPU {i}: gpa {gpa:#x} read \
                 {got:#x}, expected {:#x} (or {:#x} from a vCPU already in stage 3)",
                sh.value(gpa, 1),
                sh.value(gpa, 3)
            );
        }
    }
    // Stage 3: write until the buffer is read-only and every vCPU has hit the EFAULT exit.
    let mut hit = false;
    let mut attempts = 0u64;
    'outer: loop {
        let mut g = vcpu.enter();
        for gpa in pages() {
            // ORDERING: Acquire pairs with the main thread's Release after mprotect returned: a
            // write that starts after seeing the flag starts after the host made the buffer
            // read-only, so it must fault.
            let ro = sh.ro_done.load(Ordering::Acquire);
            // Only writes after the read-only window opened count toward the bound: before it,
            // the wait is bounded by the main thread, which sets the flag or aborts.
            attempts += u64::from(ro);
            match g.write_u64(Gpa::new(gpa), sh.value(gpa, 3)) {
                Ok(()) if ro => bail!(
                    "check 'no write lands while read-only' failed on vCPU {i}: the write to \
                     gpa {gpa:#x} succeeded after mprotect(PROT_READ) returned"
                ),
                Ok(()) => {}
                Err(e) if is_ro_fault(&e) => {
                    if !hit {
                        hit = true;
                        if sh.nr_ro_faults.fetch_add(1, Ordering::AcqRel) + 1 == sh.vcpus {
                            sh.all_hit_ro.store(true, Ordering::Release);
                        }
                    }
                }
                Err(e) => {
                    return Err(anyhow!(e)).with_context(|| {
                        format!("vCPU {i}: stage 3 write of gpa {gpa:#x}: not the EFAULT exit")
                    });
                }
            }
            if hit && sh.all_hit_ro.load(Ordering::Acquire) {
                break 'outer;
            }
            if hit && attempts >= MAX_RO_ATTEMPTS {
                // Enough hammering: wait for the slower vCPUs without burning their CPU.
                drop(g);
                wait_all_hit(i, sh, rv)?;
                break 'outer;
            }
        }
        drop(g);
        if rv.is_aborted() {
            bail!("aborted: another thread failed");
        }
        std::thread::yield_now();
    }
    rv.wait_marked(marks)?;
    // Stage 4: writes fail with EFAULT until the main thread's mprotect(RW), then all complete.
    {
        let mut g = vcpu.enter();
        for gpa in pages() {
            let mut retries = 0u64;
            loop {
                match g.write_u64(Gpa::new(gpa), sh.value(gpa, 4)) {
                    Ok(()) => break,
                    Err(e) if is_ro_fault(&e) => {
                        retries += 1;
                        if rv.is_aborted() {
                            bail!("aborted: another thread failed");
                        }
                        ensure!(
                            retries < MAX_RW_RETRIES,
                            "check 'writes succeed after mprotect(RW)' failed on vCPU {i}: gpa \
                             {gpa:#x} still faults after {retries} retries"
                        );
                        std::thread::yield_now();
                    }
                    Err(e) => {
                        return Err(anyhow!(e))
                            .with_context(|| format!("vCPU {i}: stage 4 write of gpa {gpa:#x}"));
                    }
                }
            }
        }
    }
    rv.wait_marked(marks)?;
    Ok(())
}

fn validate(a: &StressArgs) -> anyhow::Result<u64> {
    crate::check_vcpus("-c/--vcpus", a.vcpus)?;
    crate::check_pages("-s/--slot-size", a.slot_size)?;
    ensure!(
        (a.slot_size / PAGE_SIZE) + 64 <= MAX_FRAMES as u64,
        "-s/--slot-size of {} bytes exceeds the host's frame arena ({MAX_FRAMES} frames of 4K)",
        a.slot_size
    );
    crate::check_host_memory(a.slot_size / PAGE_SIZE + 64)?;
    ensure!(
        a.slot_size
            .checked_mul(4)
            .is_some_and(|x| x < 1 << MAXPHYADDR),
        "MAXPHYADDR ({MAXPHYADDR} bits) must exceed 4 x the slot size"
    );
    ensure!(
        a.max_mem >= a.slot_size,
        "-m/--max-mem ({}) must hold at least one slot of -s ({})",
        a.max_mem,
        a.slot_size
    );
    ensure!(
        (1..=1 << 20).contains(&a.tlb_entries),
        "--tlb-entries must be between 1 and 1048576 (got {})",
        a.tlb_entries
    );
    let mut slots = 0u64;
    while slots + 1 < u64::from(SlotId::MAX) {
        let end = BASE_GPA + (slots + 1) * a.slot_size;
        if end > BASE_GPA + a.max_mem || end > 1 << MAXPHYADDR {
            break;
        }
        slots += 1;
    }
    if a.reclaim {
        let limit = reclaim_limit(a);
        let need =
            (a.vcpus as u64 * crate::reclaim::MIN_PAGES_PER_VCPU).max(kvmmu::MIN_LIMIT_FRAMES);
        ensure!(
            limit.is_multiple_of(PAGE_SIZE) && limit / PAGE_SIZE >= need && limit < a.slot_size,
            "--limit ({limit}) must be a multiple of 4K, at least {} bytes and below -s ({})",
            need * PAGE_SIZE,
            a.slot_size
        );
    }
    if a.hugepages {
        ensure!(
            a.slot_size
                .is_multiple_of(BackingSrc::AnonymousHugetlb2M.page_size()),
            "-s/--slot-size ({}) must be a multiple of 2M with -H/--hugepages",
            a.slot_size
        );
        ensure!(
            !a.reclaim,
            "-H/--hugepages cannot be combined with --reclaim"
        );
    }
    let pages = slots * (a.slot_size / PAGE_SIZE);
    ensure!(
        pages >= a.vcpus as u64,
        "{pages} guest pages cannot be split across {} vCPUs",
        a.vcpus
    );
    Ok(slots)
}

/// The `--reclaim` limit in bytes (default half the buffer, rounded down to a page).
fn reclaim_limit(a: &StressArgs) -> u64 {
    a.limit.unwrap_or(a.slot_size / 2 / PAGE_SIZE * PAGE_SIZE)
}

/// Refuses bad flags (a usage error naming the flag) before any work; returns the slot count.
pub fn check(a: &StressArgs) -> anyhow::Result<u64> {
    let n = validate(a).map_err(crate::error::as_usage)?;
    vm_config(a.mmu, a.aging, a.tlb_entries)
        .validate()
        .map_err(|e| crate::error::as_usage(anyhow::Error::new(e)))?;
    Ok(n)
}

/// Runs the test with `write_protect` as the read-only step.
pub fn run_with(a: &StressArgs, write_protect: WriteProtect<'_>) -> anyhow::Result<Report> {
    let nslots = check(a)?;
    let config = vm_config(a.mmu, a.aging, a.tlb_entries);
    let mut r = Report::new("mmu-stress");
    r.config("vcpus", a.vcpus);
    r.config("max_mem", a.max_mem);
    r.config("slot_size", a.slot_size);
    r.config("mmu", a.mmu);
    r.config("aging", a.aging);
    r.config("age", a.age);
    r.config("tlb_entries", a.tlb_entries);
    let backing = if a.hugepages {
        BackingSrc::AnonymousHugetlb2M
    } else {
        BackingSrc::Anonymous
    };
    r.config("hugepages", a.hugepages);
    r.config("backing_src", backing.name());
    r.config("nested", a.nested);

    let buf_pages = a.slot_size / PAGE_SIZE;
    // With -H, one huge page of slack: the arena hands out 2M-aligned runs.
    let slack = if a.hugepages { 512 + 64 } else { 64 };
    let tables = if a.nested {
        crate::nested::table_frames(nslots * buf_pages, 1)
    } else {
        0
    };
    let host = HostMm::new(HostConfig {
        frames: usize::try_from(buf_pages + slack + tables)?,
    })?;
    host.prefault()?;
    r.config("reclaim", a.reclaim);
    let kswapd = if a.reclaim {
        host.enable_reclaim(kvmmu::ReclaimConfig {
            limit_frames: reclaim_limit(a) / PAGE_SIZE,
            swap_slots: buf_pages,
            aging: kvmmu::ReclaimAging::Generations,
        })?;
        r.config("limit", reclaim_limit(a));
        Some(host.spawn_kswapd()?)
    } else {
        None
    };
    let vm = Vm::new(&host, config)?;
    if a.nested {
        vm.enable_nested()?;
    }
    let buf = host.mmap_backed(a.slot_size, Prot::READ | Prot::WRITE, backing)?;
    let t = Instant::now();
    for p in 0..buf_pages {
        host.write_u64(Hva::new(buf.raw() + p * PAGE_SIZE), 0xaaaa_aaaa_aaaa_aaaa)?;
    }
    r.phase("prefault buffer", t.elapsed());
    for s in 0..nslots {
        vm.set_user_memory_region(MemoryRegion {
            slot: SlotId::new(u16::try_from(s + 1)?),
            as_id: AsId::new(0),
            flags: MemFlags::empty(),
            gpa: Gpa::new(BASE_GPA + s * a.slot_size),
            size: a.slot_size,
            hva: buf,
        })?;
    }
    let total_pages = nslots * buf_pages;
    let per = total_pages / a.vcpus as u64;
    let ranges: Vec<(u64, u64)> = (0..a.vcpus as u64)
        .map(|i| {
            let lo = BASE_GPA + i * per * PAGE_SIZE;
            let hi = if i + 1 == a.vcpus as u64 {
                BASE_GPA + total_pages * PAGE_SIZE
            } else {
                lo + per * PAGE_SIZE
            };
            (lo, hi)
        })
        .collect();
    r.counts.insert("slots".into(), nslots);
    r.counts.insert("guest_pages".into(), total_pages);
    r.counts.insert("buffer_pages".into(), buf_pages);

    let mut vcpus = (0..a.vcpus)
        .map(|_| vm.create_vcpu())
        .collect::<Result<Vec<_>, _>>()?;
    let _guest = if a.nested {
        Some(crate::nested::enter_l2(
            &host,
            &vm,
            &mut vcpus,
            BASE_GPA,
            total_pages * PAGE_SIZE,
            0,
            None,
        )?)
    } else {
        None
    };
    let sh = Shared {
        slot_size: a.slot_size,
        ro_done: AtomicBool::new(false),
        all_hit_ro: AtomicBool::new(false),
        nr_ro_faults: AtomicU64::new(0),
        vcpus: a.vcpus as u64,
    };
    let rv = Rendezvous::new(a.vcpus + 1);
    let stop_aging = AtomicBool::new(false);
    let pages_2m_run1 = AtomicU64::new(0);
    let names = ["run 1", "reset", "run 2", "ro", "rw"];
    let pb = progress::bar(names.len() as u64, "mmu-stress: run 1");

    let (times, aging_passes) = std::thread::scope(|s| {
        let ager = a.age.then(|| {
            let (host, stop) = (&host, &stop_aging);
            crate::vcpus::spawn_named(s, "aging".into(), move || -> anyhow::Result<u64> {
                let mut passes = 0;
                // Bounded by the main thread, which always sets `stop` (below) before joining.
                while !stop.load(Ordering::Acquire) {
                    host.clear_young(buf, a.slot_size)?;
                    passes += 1;
                }
                Ok(passes)
            })
        });
        let hs: Vec<_> = vcpus
            .iter_mut()
            .zip(&ranges)
            .enumerate()
            .map(|(i, (v, range))| {
                let (sh, rv) = (&sh, &rv);
                crate::vcpus::spawn_named(s, format!("vcpu-{i}"), move || {
                    let mut guard = AbortOnDrop(rv, false);
                    let mut marks = Vec::new();
                    let res = vcpu_thread(i, v, *range, sh, rv, &mut marks);
                    guard.1 = res.is_ok();
                    res.map(|()| marks)
                })
            })
            .collect();
        // The main thread is one more participant: its rendezvous marks bound the phases in
        // which it works (reset, the mprotects), the vCPUs' marks those in which they do.
        let main = (|| -> anyhow::Result<Vec<Span>> {
            let mut guard = AbortOnDrop(&rv, false);
            let mut marks = Vec::new();
            rv.wait_marked(&mut marks)?;
            rv.wait_marked(&mut marks)?;
            // ORDERING: Relaxed: read by this thread after the scope joins.
            pages_2m_run1.store(vm.stats().pages_2m, Ordering::Relaxed);
            pb.inc(1); // run 1
            pb.set_message("mmu-stress: reset");
            vm.reset_mmu();
            rv.wait_marked(&mut marks)?;
            pb.inc(1); // reset
            pb.set_message("mmu-stress: run 2");
            rv.wait_marked(&mut marks)?;
            pb.inc(1); // run 2
            pb.set_message("mmu-stress: ro");
            write_protect(&host, buf, a.slot_size).context("write-protecting the buffer")?;
            // ORDERING: Release pairs with the vCPUs' Acquire: the flag is set only after the
            // host operation returned.
            sh.ro_done.store(true, Ordering::Release);
            rv.wait_marked(&mut marks)?;
            pb.inc(1); // ro
            pb.set_message("mmu-stress: rw");
            host.mprotect(buf, a.slot_size, Prot::READ | Prot::WRITE)
                .context("mprotect(RW)")?;
            rv.wait_marked(&mut marks)?;
            pb.inc(1); // rw
            guard.1 = true;
            Ok(marks)
        })();
        stop_aging.store(true, Ordering::Release);
        // A vCPU that only saw the abort is a consequence of another failure: report the cause.
        let mut errors: Vec<anyhow::Error> = Vec::new();
        let mut all_marks: Vec<Vec<Span>> = Vec::new();
        for (i, h) in hs.into_iter().enumerate() {
            match h.join() {
                Ok(Ok(m)) => all_marks.push(m),
                Ok(Err(e)) => errors.push(e),
                Err(_) => errors.push(anyhow!("vCPU {i} panicked")),
            }
        }
        errors.sort_by_key(|e| format!("{e}").starts_with("aborted"));
        let first_err = errors.into_iter().next();
        let passes = match ager.map(|h| h.join()) {
            None => 0,
            Some(Ok(Ok(p))) => p,
            Some(Ok(Err(e))) => return Err(e.context("aging thread")),
            Some(Err(_)) => bail!("aging thread panicked"),
        };
        if let Some(e) = first_err {
            return Err(e);
        }
        all_marks.push(main?);
        Ok((stage_times(&all_marks, names.len()), passes))
    })?;
    pb.finish_and_clear();
    for (n, t) in names.iter().zip(&times) {
        r.phase_time(*n, t);
    }
    r.counts.insert("aging_passes".into(), aging_passes);
    let huge = pages_2m_run1.into_inner();
    r.counts.insert("pages_2m_after_run_1".into(), huge);
    if a.hugepages {
        r.require(
            "run 1 mapped the hugetlb buffer with 2M leaves",
            huge > 0,
            format!("{huge} 2M leaves"),
        );
    }
    r.require(
        "every vCPU saw the EFAULT exit while read-only",
        sh.nr_ro_faults.load(Ordering::Acquire) == a.vcpus as u64,
        format!(
            "{} of {} vCPUs",
            sh.nr_ro_faults.load(Ordering::Acquire),
            a.vcpus
        ),
    );
    r.check(
        "no write landed while read-only",
        crate::report::Status::Pass,
        "every write after mprotect(PROT_READ) returned faulted",
    );

    if a.nested {
        crate::nested::report(&vm, &mut r, false);
    }
    // Delete even slots, unmap the first half of the buffer, and exit without deleting the rest.
    let t = Instant::now();
    for s in (2..=nslots).step_by(2) {
        vm.set_user_memory_region(MemoryRegion {
            slot: SlotId::new(u16::try_from(s)?),
            as_id: AsId::new(0),
            flags: MemFlags::empty(),
            gpa: Gpa::new(BASE_GPA + (s - 1) * a.slot_size),
            size: 0,
            hva: buf,
        })?;
    }
    // Whole huge pages with -H (a hugetlb mapping is never split).
    let half = (buf_pages / 2) * PAGE_SIZE / backing.page_size() * backing.page_size();
    if half > 0 {
        host.munmap(buf, half)?;
    }
    r.phase("delete even slots, unmap half", t.elapsed());
    if let Some(k) = kswapd {
        drop(k);
        let rs = host.reclaim_stats();
        r.counts.insert("evicted".into(), rs.evicted);
        r.counts.insert("refaults".into(), rs.refaults);
        r.counts
            .insert("direct_reclaims".into(), rs.direct_reclaims);
        r.counts
            .insert("reclaim_aging_passes".into(), rs.aging_passes);
        let mut l = host.take_invalidate_latencies();
        if !l.is_empty() {
            l.sort_unstable();
            let at = |q: f64| f64::from(l[((l.len() - 1) as f64 * q) as usize]) * 1e-9;
            r.metrics
                .insert("invalidate_range_start p99".into(), at(0.99));
            r.metrics
                .insert("invalidate_range_start max".into(), at(1.0));
        }
        r.require(
            "reclaim ran",
            rs.evicted > 0,
            format!("{} pages evicted, {} refaulted", rs.evicted, rs.refaults),
        );
    }
    let stats = vm.stats();
    r.counts.extend(crate::vm_counts(&stats));
    r.counts.insert("faults".into(), stats.faults);
    r.counts.insert("fault_retries".into(), stats.fault_retries);
    r.counts
        .insert("invalidate_starts".into(), stats.invalidate_starts);
    r.counts.insert("age_calls".into(), stats.age_calls);
    r.counts
        .insert("remote_tlb_flushes".into(), stats.remote_tlb_flush);
    r.require(
        "invalidations balanced",
        stats.invalidate.in_progress == 0
            && stats.mn_active_invalidate_count == 0
            && stats.invalidate_starts == stats.invalidate_ends,
        format!(
            "{} starts, {} ends, {} in progress",
            stats.invalidate_starts, stats.invalidate_ends, stats.invalidate.in_progress
        ),
    );
    let stale = host.arena().stats().stale_accesses;
    r.require(
        "no stale translation used",
        stale == 0,
        format!("{stale} stale accesses"),
    );
    drop(vcpus);
    let t = Instant::now();
    host.release();
    r.phase("exit (release)", t.elapsed());
    r.require(
        "release tore the VM down",
        vm.is_dead(),
        format!("vm dead: {}", vm.is_dead()),
    );
    let fin = vm.shutdown();
    r.require(
        "page-table pages freed",
        fin.tdp.tables_allocated == fin.tdp.tables_freed,
        format!(
            "{} allocated, {} freed",
            fin.tdp.tables_allocated, fin.tdp.tables_freed
        ),
    );
    Ok(r)
}

/// Runs the test as the selftest does.
pub fn run(a: &StressArgs) -> anyhow::Result<Report> {
    run_with(a, &mprotect_read_only)
}

/// `kvmmu mmu-stress`.
pub fn main(cmd: &StressCommand) -> anyhow::Result<()> {
    crate::report::check_output(&cmd.out)?;
    if cmd.args.aging == AgingArg::Locked && !cmd.args.age && !cmd.args.reclaim {
        return Err(crate::error::usage_hint(
            "--aging locked changes nothing without --age or --reclaim (no aging reaches the VM)",
            "add --age to run the aging thread under mmu_lock (or --reclaim for kswapd's aging)",
        ));
    }
    let r = run(&cmd.args)?;
    crate::report::emit(&r, &cmd.out)
}

#[cfg(test)]
mod tests;
