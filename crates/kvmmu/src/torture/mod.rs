//! A torture test in the spirit of rcutorture: every concurrent actor of the MMU at once, with
//! oracles that notice a lost write, a stale translation, a leaked page or an unbalanced counter.
//! Built only on kvmmu's public API (plus read-only statistics); `kvmmu torture` and the
//! `torture_*` tests drive it.
//!
//! # Protocol
//! 1. Set-up: one host mapping of `main_pages + dyn_pages` pages; slot 0 maps the first
//!    `main_pages` at `MAIN_GPA`; slot 1 maps the rest at one of two bases (`DYN_GPA`); the alias
//!    slot 2 maps the first `alias_pages` of slot 0 again at `ALIAS_GPA`. The last `private` pages
//!    of slot 0 belong to the accessed oracle and are never churned.
//! 2. Actors run concurrently, each optional ([`Actors`]): vCPUs (each owns the host pages
//!    `hp % vcpus == id` and is their only writer, through any alias); the host (DONTNEED,
//!    mprotect RO/RW, munmap + mmap_fixed on random churnable ranges); aging (random-range
//!    `clear_young` / `test_young` / `clear_flush_young`, and the accessed oracle); memslots
//!    (move, flag change, delete/create, alias create/delete); MMU reset (`reset_mmu`). With
//!    `nested`, the vCPUs run in L2 over EPT12 that an L1 actor rewrites (`torture/nested.rs`).
//! 3. vCPUs stop after `ops_per_vcpu` operations each (or when `duration` elapses, or at the first
//!    violation); the other actors stop with them, once each has completed a few operations. A
//!    watchdog fails the run, with every actor's last operation, if an actor makes no progress
//!    for `stall_timeout`.
//! 4. At quiescence and teardown the counter oracles run; then the VM is shut down and the host
//!    released.
//!
//! # Oracles (each violation carries the seed, the actor, the gfn and the operation)
//! 1. Data: a read returns the owner's last write to that host page, or zero if the page was
//!    discarded since; a value naming another page is reported as misdirected.
//! 2. No stale translation: no [`crate::vcpu::VcpuExit::StaleTranslation`]; the arena's
//!    `stale_accesses` stays 0; no write lands in a page while the host keeps it read-only.
//! 3. Accessed: a page written through a page walk after `clear_young` is young at the next
//!    `test_young`, unless an MMU reset ran meanwhile; TLB hits that hide it are counted and bounded
//!    by the TLB size per round.
//! 4. Dirty: right after a successful write, the written gfn's SPTE is absent or has Dirty set.
//! 5. Fault injection: a fault that fails for lack of frames leaves no SPTE behind.
//! 6. Counters: `mmu_invalidate_in_progress` and `mn_active_invalidate_count` are 0 at
//!    quiescence, starts equal ends, the sequence never goes backwards (sampled by the
//!    supervisor); after `shutdown` the TDP page tables, shadow pages and rmap descriptors
//!    allocated equal those freed; after `release` no host frame is allocated.
//! 7. Liveness: every actor makes progress within `stall_timeout`.
//!
//! A seed fixes each actor's operation sequence; the interleaving is up to the scheduler, so a
//! replay with the same seed reproduces the operations, not necessarily the schedule.

mod actors;
mod nested;
mod opt_in;
pub mod oracle;
pub mod rng;
mod supervise;

use core::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::addr::Hva;
use crate::config::{AgingMode, ConfigError, MmuKind, VmConfig};
use crate::host::{HostConfig, HostError, HostMm, Prot};
use crate::vm::memslot::MemFlags;
use crate::vm::{SetMemoryRegionError, Vm, VmError};

pub use oracle::{ActorId, Violation, ViolationKind};
use oracle::{Layout, Progress, Shared};

bitflags::bitflags! {
    /// Which actors run besides the vCPUs.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Actors: u32 {
        /// The host thread: munmap/mmap, mprotect, madvise(DONTNEED).
        const HOST = 1;
        /// The aging thread: random-range aging.
        const AGING = 2;
        /// The accessed oracle (runs in the aging thread, which it turns on).
        const ACCESSED = 4;
        /// The memslot thread.
        const MEMSLOT = 8;
        /// The MMU-reset thread.
        const RESET = 16;
        /// The reclaim thread: evicts random vCPU pages to swap (not in the default set).
        const RECLAIM = 32;
        /// The dirty-log harvester (opt-in, not in the default set): loops dirty-log harvests
        /// of slot 1 while the memslot thread toggles its logging, alternating classic and manual
        /// protect, so re-arms (write-protect + flush) and fast page faults race every other
        /// actor.
        const DIRTY_LOG = 64;
    }
}

/// Parameters of one torture run.
#[derive(Clone, Debug)]
pub struct TortureConfig {
    /// Seed of every actor's operation sequence.
    pub seed: u64,
    /// Which MMU.
    pub mmu: MmuKind,
    /// Lockless or locked aging.
    pub aging: AgingMode,
    /// vCPU threads (1..=64).
    pub vcpus: usize,
    /// Host pages behind slot 0 (at least `private + 8`).
    pub main_pages: u64,
    /// Host pages behind the dynamic slot 1 (at least 1).
    pub dyn_pages: u64,
    /// Pages of the accessed oracle at the end of slot 0 (at least 1).
    pub private: u64,
    /// Frames of the host arena; `None` gives twice the guest memory. A value below the number of
    /// guest pages injects frame exhaustion (GUP fails, faults exit with `OutOfFrames`).
    pub frames: Option<usize>,
    /// Entries in each vCPU's TLB.
    pub tlb_entries: usize,
    /// `VmConfig::elide_tlb_flush_if_young`. When false, the accessed oracle ages with
    /// `clear_flush_young`, so its write misses the TLB and the check is strict.
    pub elide_tlb_flush_if_young: bool,
    /// `VmConfig::ad_bits`: with `Disabled` aging marks leaves for access tracking and the
    /// vCPUs' next accesses are fixed by the fast page fault.
    pub ad_bits: crate::config::AdBits,
    /// Operations per vCPU; `None` runs until `duration`.
    pub ops_per_vcpu: Option<u64>,
    /// Wall-time limit (checked by the supervisor); `None` runs until `ops_per_vcpu`.
    pub duration: Option<Duration>,
    /// The other actors.
    pub actors: Actors,
    /// A run fails if an actor makes no progress for this long.
    pub stall_timeout: Duration,
    /// Forced CAS failure period (0 = off) in the TDP fault path (`kvmmu::internals::mmu::tdp::hooks`) and
    /// the rmap bit-lock acquire ([`crate::mmu::shadow::rmap::hooks`]); needs feature
    /// `test-hooks`.
    pub cas_failure_period: u32,
    /// Forced yield period (0 = off) in the TDP fault, age and zap paths and at the rmap hook
    /// sites (bit-lock acquire, bit held, lockless aging); needs `test-hooks`.
    pub yield_period: u32,
    /// Forced yield period (0 = off) inside a vCPU's guest-mode TDP walk, between loading a table
    /// link and reading the child table (`kvmmu::internals::mmu::tdp::hooks`); needs `test-hooks`.
    /// Widens the window in which a zap unlinks a table a walk is about to read (G1 in
    /// docs/locking.md).
    pub walk_yield_period: u32,
    /// Backing of guest memory: `Anonymous` or `AnonymousThp` (THP: the host actor's partial
    /// munmap/mprotect/madvise then split THPs; re-created ranges are advised huge again).
    /// hugetlb is refused: the host actor's random ranges would cut its pages.
    pub backing: crate::host::BackingSrc,
    /// Run the vCPUs as an L2 guest over EPT12 that an L1 actor rewrites meanwhile
    /// (`torture/nested.rs`); nested guests are enabled on the VM.
    pub nested: bool,
    /// Where the run publishes its progress while it goes on (operations completed by every
    /// actor, violations found so far), for a live display; `None` publishes nothing.
    pub live: Option<Arc<LiveProgress>>,
}

/// A torture run's progress while it goes on: read it from another thread (e.g. every 200 ms
/// for a progress bar) while [`run`] works. The counts only grow during a run.
#[derive(Debug, Default)]
pub struct LiveProgress {
    ops: AtomicU64,
    violations: AtomicU64,
}

impl LiveProgress {
    /// Operations completed so far by every actor together (published by the supervisor every
    /// 20 ms, so up to one tick behind).
    pub fn ops(&self) -> u64 {
        // ORDERING: Relaxed: a display counter; nothing is published through it.
        self.ops.load(Ordering::Relaxed)
    }

    /// Violations found so far.
    pub fn violations(&self) -> u64 {
        // ORDERING: Relaxed: a display counter; the report carries the violations themselves.
        self.violations.load(Ordering::Relaxed)
    }

    fn note_violation(&self) {
        // ORDERING: Relaxed: a display counter.
        self.violations.fetch_add(1, Ordering::Relaxed);
    }
}

impl Default for TortureConfig {
    fn default() -> Self {
        TortureConfig {
            seed: 1,
            mmu: MmuKind::Tdp,
            aging: AgingMode::Lockless,
            vcpus: 2,
            main_pages: 64,
            dyn_pages: 16,
            private: 4,
            frames: None,
            tlb_entries: 64,
            elide_tlb_flush_if_young: true,
            ad_bits: crate::config::AdBits::Enabled,
            ops_per_vcpu: Some(5_000),
            duration: None,
            actors: Actors::all().difference(Actors::RECLAIM.union(Actors::DIRTY_LOG)),
            stall_timeout: Duration::from_secs(20),
            cas_failure_period: 0,
            yield_period: 0,
            walk_yield_period: 0,
            backing: crate::host::BackingSrc::Anonymous,
            nested: false,
            live: None,
        }
    }
}

/// Why a torture run could not be set up (a run that *finds* bugs returns a report instead).
#[derive(Debug, thiserror::Error)]
pub enum TortureError {
    /// The VM configuration was refused (e.g. an MMU not built in this configuration).
    #[error("VM configuration refused: {0}")]
    Config(#[from] ConfigError),
    /// A torture parameter is out of range.
    #[error("invalid torture parameter {name}: {why}")]
    Parameter {
        /// The parameter.
        name: &'static str,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Fault injection was asked for in a build without feature `test-hooks`.
    #[error(
        "cas_failure_period / yield_period / walk_yield_period need kvmmu built with feature \
         test-hooks"
    )]
    HooksUnavailable,
    /// The host could not be set up.
    #[error("host set-up failed: {0}")]
    Host(#[from] HostError),
    /// The VM could not be created.
    #[error("VM creation failed: {0}")]
    Vm(#[from] VmError),
    /// A set-up memslot was refused.
    #[error("memslot set-up failed: {0}")]
    Memslot(#[from] SetMemoryRegionError),
    /// L1's EPT12 could not be built (nested runs).
    #[error("EPT12 set-up failed: {0}")]
    Nested(#[from] crate::vcpu::NestedError),
}

/// Operations an actor completed and its rate.
#[derive(Clone, Debug, PartialEq)]
pub struct ActorReport {
    /// The actor.
    pub actor: ActorId,
    /// Operations completed.
    pub ops: u64,
    /// Operations per second over the run.
    pub ops_per_sec: f64,
}

/// The outcome of a torture run.
#[derive(Clone, Debug)]
pub struct TortureReport {
    /// The seed (replay with it).
    pub seed: u64,
    /// Wall time of the run.
    pub elapsed: Duration,
    /// Per-actor throughput.
    pub actors: Vec<ActorReport>,
    /// Every oracle violation (empty when the run passed).
    pub violations: Vec<Violation>,
    /// vCPU writes that failed for lack of host frames (each checked: nothing installed).
    pub out_of_frames_exits: u64,
    /// Accesses whose Accessed bit a TLB hit hid (legitimate, bounded by the TLB size).
    pub accessed_hidden_by_tlb: u64,
    /// Accessed-oracle misses excused by a concurrent MMU reset, or (THP backing) by a host
    /// invalidation of the whole huge page that left the page unmapped.
    pub accessed_excused_by_reset: u64,
    /// VM statistics at quiescence.
    pub vm_stats: crate::vm::VmStats,
    /// Host statistics at the end (huge-page faults and THP splits included).
    pub host_stats: crate::host::HostStats,
}

impl TortureReport {
    /// True if no oracle was violated.
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }

    /// True if some violation is of `kind`.
    pub fn has(&self, kind: ViolationKind) -> bool {
        self.violations.iter().any(|v| v.kind == kind)
    }

    /// True if some violation is of one of `kinds`.
    pub fn has_any(&self, kinds: &[ViolationKind]) -> bool {
        kinds.iter().any(|k| self.has(*k))
    }
}

impl fmt::Display for TortureReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.passed() { "PASSED" } else { "FAILED" };
        writeln!(
            f,
            "torture {verdict}: seed {:#x}, {:.2}s",
            self.seed,
            self.elapsed.as_secs_f64()
        )?;
        for a in &self.actors {
            writeln!(
                f,
                "  {:<8} {:>10} ops {:>12.0} ops/s",
                a.actor.to_string(),
                a.ops,
                a.ops_per_sec
            )?;
        }
        let s = &self.vm_stats;
        writeln!(
            f,
            "  faults {} (retries {}), invalidations {}/{}, seq {}, memslot swaps {}, flushes {}",
            s.faults,
            s.fault_retries,
            s.invalidate_starts,
            s.invalidate_ends,
            s.invalidate.seq,
            s.memslot_swaps,
            s.remote_tlb_flush
        )?;
        writeln!(
            f,
            "  accessed hidden by TLB {}, excused by reset {}; out-of-frames exits {}",
            self.accessed_hidden_by_tlb, self.accessed_excused_by_reset, self.out_of_frames_exits
        )?;
        for v in &self.violations {
            writeln!(f, "  VIOLATION {v}")?;
        }
        Ok(())
    }
}

impl TortureConfig {
    fn check(&self) -> Result<Layout, TortureError> {
        let bad = |name, why| Err(TortureError::Parameter { name, why });
        if self.vcpus == 0 || self.vcpus > 64 {
            return bad("vcpus", "must be between 1 and 64");
        }
        if self.private == 0 || self.main_pages < self.private + 8 {
            return bad(
                "main_pages",
                "must be at least private + 8, with private >= 1",
            );
        }
        if self.dyn_pages == 0 || self.main_pages + self.dyn_pages > 1 << 20 {
            return bad(
                "dyn_pages",
                "must be at least 1, with at most 2^20 pages in total",
            );
        }
        if self.ops_per_vcpu.is_none() && self.duration.is_none() {
            return bad(
                "ops_per_vcpu",
                "either an op count or a duration must bound the run",
            );
        }
        if !matches!(
            self.backing,
            crate::host::BackingSrc::Anonymous | crate::host::BackingSrc::AnonymousThp
        ) {
            return bad("backing", "must be anonymous or anonymous_thp");
        }
        if cfg!(not(feature = "test-hooks"))
            && (self.cas_failure_period | self.yield_period | self.walk_yield_period) != 0
        {
            return Err(TortureError::HooksUnavailable);
        }
        self.vm_config().validate()?;
        Ok(Layout {
            hva: Hva::new(0),
            main_pages: self.main_pages,
            dyn_pages: self.dyn_pages,
            alias_pages: (self.main_pages - self.private).min(16),
            private: self.private,
        })
    }

    fn vm_config(&self) -> VmConfig {
        VmConfig {
            mmu: self.mmu,
            aging: self.aging,
            tlb_entries: self.tlb_entries,
            elide_tlb_flush_if_young: self.elide_tlb_flush_if_young,
            ad_bits: self.ad_bits,
            ..VmConfig::default()
        }
    }
}

#[cfg(feature = "test-hooks")]
fn set_hooks(cfg: &TortureConfig) {
    use crate::mmu::shadow::rmap::hooks as rmap;
    use crate::mmu::tdp::hooks as tdp;
    tdp::set_cas_failure_period(cfg.cas_failure_period);
    tdp::set_yield_period(cfg.yield_period);
    tdp::set_walk_yield_period(cfg.walk_yield_period);
    rmap::set_cas_failure_period(cfg.cas_failure_period);
    rmap::set_yield_period(cfg.yield_period);
}

#[cfg(not(feature = "test-hooks"))]
fn set_hooks(_cfg: &TortureConfig) {}

struct ActorThread {
    actor: ActorId,
    progress: Arc<Progress>,
    handle: Option<JoinHandle<()>>,
}

/// Runs `cfg` once per seed of `seeds` (each replacing `cfg.seed`), in order, and returns the
/// report of the first run that fails, or `None` if every run passed: how a bug that shows up in
/// some schedules only is hunted down (and how the broken-build tests prove torture catches one).
///
/// Errors: the first run that could not be set up ([`run`]'s errors).
pub fn hunt(
    cfg: &TortureConfig,
    seeds: impl IntoIterator<Item = u64>,
) -> Result<Option<TortureReport>, TortureError> {
    for seed in seeds {
        let report = run(&TortureConfig {
            seed,
            ..cfg.clone()
        })?;
        if !report.passed() {
            return Ok(Some(report));
        }
    }
    Ok(None)
}

/// Runs one torture run. Returns the report (check [`TortureReport::passed`]), or an error if the
/// run could not be set up. On a stall the stuck threads are left running detached and the report
/// carries a [`ViolationKind::Stall`] with every actor's last operation.
pub fn run(cfg: &TortureConfig) -> Result<TortureReport, TortureError> {
    let mut layout = cfg.check()?;
    let total = layout.host_pages();
    let host = HostMm::new(HostConfig {
        frames: cfg.frames.unwrap_or(total as usize * 2 + 64),
    })?;
    let vm = Arc::new(Vm::new(&host, cfg.vm_config())?);
    if cfg.nested {
        vm.enable_nested()?;
    }
    layout.hva = host.mmap_backed(total * 4096, Prot::READ | Prot::WRITE, cfg.backing)?;
    vm.set_user_memory_region(actors::main_region(&layout))?;
    vm.set_user_memory_region(actors::dyn_region(&layout, 0, MemFlags::empty()))?;
    let l2 = if cfg.nested {
        Some(Arc::new(nested::setup(&host, &vm, &layout)?))
    } else {
        None
    };
    if cfg.actors.contains(Actors::RECLAIM) {
        // Swap for every page, and a limit that leaves the accessed oracle's pages alone: the
        // actor evicts only vCPU pages, explicitly.
        let capacity = host.arena().capacity() as u64;
        host.enable_reclaim(crate::host::ReclaimConfig {
            limit_frames: capacity - 1,
            swap_slots: total,
            aging: crate::host::ReclaimAging::Generations,
        })
        .map_err(|_| TortureError::Parameter {
            name: "frames",
            why: "the reclaim actor needs at least 17 frames",
        })?;
    }
    set_hooks(cfg);

    let shared = Arc::new(Shared {
        seed: cfg.seed,
        layout,
        discard_gen: (0..total).map(|_| AtomicU64::new(0)).collect(),
        reset_gen: AtomicU64::new(0),
        out_of_frames_exits: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        violations: Default::default(),
        accessed_hidden_by_tlb: AtomicU64::new(0),
        accessed_excused_by_reset: AtomicU64::new(0),
        started: Instant::now(),
        live: cfg.live.clone(),
        nested: cfg.nested,
    });
    let mut threads: Vec<ActorThread> = Vec::new();
    let mut spawn = |actor: ActorId, body: Box<dyn FnOnce(&Progress) + Send>| {
        let progress = Arc::new(Progress::default());
        let p = Arc::clone(&progress);
        let sh = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name(format!("torture-{actor}"))
            .spawn(move || {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(&p)));
                if let Err(e) = r {
                    let msg = e
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "non-string panic".into());
                    sh.violation(actor, ViolationKind::Panic, None, msg);
                }
                // ORDERING: Release, read by the supervisor with Acquire before it joins.
                p.done.store(true, Ordering::Release);
            });
        threads.push(ActorThread {
            actor,
            progress,
            handle: handle.ok(),
        });
    };
    for id in 0..cfg.vcpus {
        let (vm, sh, c) = (Arc::clone(&vm), Arc::clone(&shared), cfg.clone());
        let l2 = l2.clone();
        spawn(
            ActorId::Vcpu(id),
            Box::new(move |p| actors::vcpu(&vm, &sh, &c, id, l2.as_deref(), p)),
        );
    }
    if let Some(n) = &l2 {
        let (vm, sh, c, n) = (
            Arc::clone(&vm),
            Arc::clone(&shared),
            cfg.clone(),
            Arc::clone(n),
        );
        spawn(
            ActorId::L1,
            Box::new(move |p| nested::l1(&vm, &sh, &c, &n, p)),
        );
    }
    if cfg.actors.contains(Actors::HOST) {
        let (h, sh, c) = (host.clone(), Arc::clone(&shared), cfg.clone());
        spawn(
            ActorId::Host,
            Box::new(move |p| actors::host(&h, &sh, &c, p)),
        );
    }
    if cfg.actors.intersects(Actors::AGING | Actors::ACCESSED) {
        let (vm, sh, c) = (Arc::clone(&vm), Arc::clone(&shared), cfg.clone());
        spawn(
            ActorId::Aging,
            Box::new(move |p| actors::aging(&vm, &sh, &c, p)),
        );
    }
    if cfg.actors.contains(Actors::MEMSLOT) {
        let (vm, sh, c) = (Arc::clone(&vm), Arc::clone(&shared), cfg.clone());
        spawn(
            ActorId::Memslot,
            Box::new(move |p| actors::memslot(&vm, &sh, &c, p)),
        );
    }
    if cfg.actors.contains(Actors::RECLAIM) {
        let (h, sh, c) = (host.clone(), Arc::clone(&shared), cfg.clone());
        spawn(
            ActorId::Reclaim,
            Box::new(move |p| opt_in::reclaim(&h, &sh, &c, p)),
        );
    }
    if cfg.actors.contains(Actors::DIRTY_LOG) {
        let (vm, sh) = (Arc::clone(&vm), Arc::clone(&shared));
        spawn(
            ActorId::DirtyLog,
            Box::new(move |p| opt_in::dirty_log(&vm, &sh, p)),
        );
    }
    if cfg.actors.contains(Actors::RESET) {
        let (vm, sh, thp) = (
            Arc::clone(&vm),
            Arc::clone(&shared),
            cfg.backing == crate::host::BackingSrc::AnonymousThp,
        );
        spawn(
            ActorId::Reset,
            Box::new(move |p| actors::reset(&vm, &sh, thp, p)),
        );
    }

    let stalled = supervise::supervise(cfg, &vm, &shared, &threads);
    let elapsed = shared.started.elapsed();
    let actors_report = threads
        .iter()
        .map(|t| {
            // ORDERING: Relaxed: a statistic; the threads are joined or abandoned.
            let ops = t.progress.ops.load(Ordering::Relaxed);
            ActorReport {
                actor: t.actor,
                ops,
                ops_per_sec: ops as f64 / elapsed.as_secs_f64().max(1e-9),
            }
        })
        .collect();
    let vm_stats = vm.stats();
    let host_stats = host.stats();
    if !stalled {
        for t in &mut threads {
            if let Some(h) = t.handle.take() {
                // A panic was already caught and recorded inside the thread.
                let _ = h.join();
            }
        }
        supervise::quiescence_checks(&shared, &host, vm);
    }
    set_hooks(&TortureConfig::default());
    let violations = shared
        .violations
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    Ok(TortureReport {
        seed: cfg.seed,
        elapsed,
        actors: actors_report,
        violations,
        // ORDERING: Relaxed: statistics, read after the actors stopped.
        out_of_frames_exits: shared.out_of_frames_exits.load(Ordering::Relaxed),
        // ORDERING: as above.
        accessed_hidden_by_tlb: shared.accessed_hidden_by_tlb.load(Ordering::Relaxed),
        // ORDERING: as above.
        accessed_excused_by_reset: shared.accessed_excused_by_reset.load(Ordering::Relaxed),
        vm_stats,
        host_stats,
    })
}
