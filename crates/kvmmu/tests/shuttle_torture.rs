//! shuttle (randomized concurrency testing) of a whole small VM: 4 vCPU threads writing and
//! reading guest memory under the data oracle, an ager, a host thread (DONTNEED, mprotect RO/RW,
//! munmap + mmap), and a memslot thread (alias slot create / move / delete), all at once, under
//! `shuttle::check_random`: every iteration is a fresh VM and a fresh random schedule.
//!
//! Run (own target dir, like loom):
//! `cargo test -p kvmmu --features shuttle --test shuttle_torture`
//! and the twin that must FAIL (a broken build shuttle has to catch):
//! `cargo test -p kvmmu --features shuttle,broken-rmap-flush-if-young --test shuttle_torture`
//!
//! # What shuttle sees
//! Under `cfg(feature = "shuttle")` the sync facade maps `Mutex`, `RwLock` (so `mmu_lock`), `Condvar`, the
//! threads, `thread_local!`, `spin_hint` and `yield_now` to shuttle's; every lock operation and
//! every spin-wait round (the rmap bit lock, SRCU and RCU grace periods, remote TLB flushes
//! waiting for vCPU acknowledgements) is a point where shuttle may switch threads. Atomics stay
//! std's (see `kvmmu::sync`), so a preemption between two atomic operations happens only at
//! those points; with `--features test-hooks` the fault-injection yield sites of the TDP MMU and
//! the rmap become scheduling points too (every pass yields).
//!
//! # Oracles (the torture module's, in a compact form that runs inside shuttle threads: its
//! runner uses wall-clock supervision and OS threads, which shuttle cannot schedule)
//! 1. Data: a read returns the owner's last write to that host page, or zero if the page was
//!    discarded (DONTNEED, munmap) since; values encode (vCPU, page, sequence).
//! 2. No stale translation: no `StaleTranslation` exit, the arena counts no stale access, and no
//!    guest write lands in a page while the host keeps it read-only.
//! 3. Dirty: right after a successful write, the gfn's SPTE is absent or has Dirty set.
//! 4. Counters: at quiescence no invalidation is in progress and starts equal ends; after
//!    shutdown TDP tables, shadow pages and rmap descriptors allocated equal those freed; after
//!    release no host frame is allocated.
//! 5. Liveness: shuttle fails an iteration that deadlocks (every thread blocked) and, through
//!    `max_steps`, one that livelocks.
//!
//! Every actor runs a fixed number of operations (never "until stopped": shuttle runs its
//! threads on one OS thread, so a loop without a scheduling point would never end).
#![cfg(feature = "shuttle")]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use kvmmu::internals::addr::{AsId, Gpa, Hva, SlotId};
use kvmmu::internals::config::{AgingMode, MmuKind, VmConfig};
use kvmmu::internals::host::{HostConfig, HostMm, Prot};
use kvmmu::internals::sync::Mutex;
use kvmmu::internals::vcpu::VcpuExit;
use kvmmu::internals::vm::Vm;
use kvmmu::internals::vm::memslot::{MemFlags, MemoryRegion};

const PAGE: u64 = 4096;
/// Host pages behind slot 0.
const PAGES: u64 = 16;
/// The first `ALIAS_PAGES` host pages are also mapped by the alias slot 1.
const ALIAS_PAGES: u64 = 8;
const VCPUS: u64 = 4;
const MAIN_GPA: u64 = 0x1_0000_0000;
/// The two guest bases the memslot thread moves the alias slot between.
const ALIAS_GPA: [u64; 2] = [0x2_0000_0000, 0x3_0000_0000];

/// Guest accesses that succeeded, over every iteration of the process (writes, reads that
/// returned the owner's nonzero last write): the tests assert the scenario really ran.
static WRITES_OK: AtomicU64 = AtomicU64::new(0);
static READS_MATCHED: AtomicU64 = AtomicU64::new(0);

/// One scenario's size (operations per actor).
#[derive(Clone, Copy)]
struct Size {
    vcpu_ops: u64,
    host_ops: u64,
    age_ops: u64,
    memslot_ops: u64,
}

const SIZE: Size = Size {
    vcpu_ops: 24,
    host_ops: 6,
    age_ops: 8,
    memslot_ops: 4,
};

/// A tiny deterministic generator (shuttle fixes the schedule; this fixes each actor's choices
/// from its seed, which shuttle's own random source provides per iteration).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// State shared by the actors of one iteration.
struct World {
    vm: Arc<Vm>,
    host: HostMm,
    hva: Hva,
    /// Per host page: odd while a discard (DONTNEED, munmap + mmap) is in progress; bumped before
    /// and after each.
    discard_gen: Vec<AtomicU64>,
    violations: Mutex<Vec<String>>,
}

impl World {
    fn violation(&self, what: String) {
        self.violations.lock().push(what);
    }
    fn discard_gen(&self, hp: u64) -> u64 {
        // ORDERING: SeqCst: the data oracle compares a generation sampled before a write with one
        // sampled after a read; SeqCst keeps both in the single order of the discards.
        self.discard_gen[hp as usize].load(Ordering::SeqCst)
    }
    fn bump(&self, hp: u64, n: u64) {
        for p in hp..hp + n {
            // ORDERING: SeqCst, see `discard_gen`.
            self.discard_gen[p as usize].fetch_add(1, Ordering::SeqCst);
        }
    }
    fn hva_of(&self, hp: u64) -> Hva {
        Hva::new(self.hva.raw() + hp * PAGE)
    }
}

fn region(slot: u16, gpa: u64, pages: u64, hva: Hva) -> MemoryRegion {
    MemoryRegion {
        slot: SlotId::new(slot),
        as_id: AsId::new(0),
        flags: MemFlags::empty(),
        gpa: Gpa::new(gpa),
        size: pages * PAGE,
        hva,
    }
}

/// The owner's knowledge of one page: the last value written and the discard generation
/// sampled before that write.
#[derive(Clone, Copy, Default)]
struct Record {
    last: u64,
    discard: u64,
}

fn vcpu(w: &World, id: u64, seed: u64, ops: u64) {
    let mut vcpu = w.vm.create_vcpu().expect("create_vcpu");
    let owned: Vec<u64> = (0..PAGES).filter(|hp| hp % VCPUS == id).collect();
    let mut rec = vec![Record::default(); PAGES as usize];
    let mut rng = Rng(seed ^ ((id + 1) * 0x1000));
    let mut seq = 0;
    for _ in 0..ops {
        let hp = owned[rng.below(owned.len() as u64) as usize];
        // Through the alias (which may be absent or moving) about a third of the time.
        let (gpa, optional) = if hp < ALIAS_PAGES && rng.below(3) == 0 {
            (ALIAS_GPA[rng.below(2) as usize] + hp * PAGE, true)
        } else {
            (MAIN_GPA + hp * PAGE, false)
        };
        let gpa = Gpa::new(gpa);
        let exit_ok = |e: &VcpuExit| match e {
            VcpuExit::HostFault { .. } => true,
            VcpuExit::NoMemslot { .. } | VcpuExit::ReadonlyMemslot { .. } => optional,
            _ => false,
        };
        let exit_kind = |e: &VcpuExit| match e {
            VcpuExit::StaleTranslation { .. } => "StaleTranslation",
            _ => "UnexpectedExit",
        };
        if rng.below(2) == 0 {
            seq += 1;
            let v = (id << 56) | (hp << 32) | seq;
            let discard = w.discard_gen(hp);
            let r = vcpu.enter().write_u64(gpa, v);
            match r {
                Ok(()) => {
                    // ORDERING: Relaxed: a statistic read after every iteration ended.
                    WRITES_OK.fetch_add(1, Ordering::Relaxed);
                    rec[hp as usize] = Record { last: v, discard };
                    // Dirty oracle, outside guest mode (reading an SPTE may take `mmu_lock`).
                    if let Some((spte, level)) = w.vm.spte(AsId::new(0), gpa.gfn())
                        && spte.is_present_leaf(level)
                        && !spte.is_dirty()
                    {
                        w.violation(format!(
                            "DirtyLost: vcpu{id} wrote gpa {gpa} but {spte:?} has no Dirty"
                        ));
                    }
                }
                Err(e) if exit_ok(&e) => {}
                Err(e) => w.violation(format!("{}: vcpu{id} write gpa {gpa}: {e}", exit_kind(&e))),
            }
        } else {
            let r = vcpu.enter().read_u64(gpa);
            match r {
                Ok(got) => {
                    let r = &mut rec[hp as usize];
                    if got == r.last {
                        if got != 0 {
                            // ORDERING: Relaxed: a statistic, as above.
                            READS_MATCHED.fetch_add(1, Ordering::Relaxed);
                        }
                        continue;
                    }
                    if got == 0 && (r.discard % 2 == 1 || w.discard_gen(hp) != r.discard) {
                        *r = Record {
                            last: 0,
                            discard: w.discard_gen(hp),
                        };
                        continue;
                    }
                    w.violation(format!(
                        "Data: vcpu{id} read gpa {gpa} (host page {hp}) = {got:#x}, last write \
                         {:#x}",
                        r.last
                    ));
                }
                Err(e) if exit_ok(&e) => {}
                Err(e) => w.violation(format!("{}: vcpu{id} read gpa {gpa}: {e}", exit_kind(&e))),
            }
        }
    }
}

fn host_actor(w: &World, seed: u64, ops: u64) {
    let mut rng = Rng(seed ^ 0x4057);
    for _ in 0..ops {
        let hp = rng.below(PAGES);
        let n = 1 + rng.below((PAGES - hp).min(3));
        let (hva, len) = (w.hva_of(hp), n * PAGE);
        match rng.below(3) {
            0 => {
                w.bump(hp, n);
                w.host.madvise_dontneed(hva, len).expect("madvise_dontneed");
                w.bump(hp, n);
            }
            1 => {
                w.host.mprotect(hva, len, Prot::READ).expect("mprotect RO");
                // After invalidate_range_start returned no guest write may land.
                let snap: Vec<_> = (0..n).map(|i| w.host.read_u64(w.hva_of(hp + i))).collect();
                kvmmu::internals::sync::yield_now();
                for (i, before) in snap.into_iter().enumerate() {
                    let p = hp + i as u64;
                    if let (Ok(b), Ok(a)) = (before, w.host.read_u64(w.hva_of(p)))
                        && a != b
                    {
                        w.violation(format!(
                            "WriteToReadOnly: host page {p} changed from {b:#x} to {a:#x}"
                        ));
                    }
                }
                w.host
                    .mprotect(hva, len, Prot::READ | Prot::WRITE)
                    .expect("mprotect RW");
            }
            _ => {
                w.bump(hp, n);
                w.host.munmap(hva, len).expect("munmap");
                kvmmu::internals::sync::yield_now();
                w.host
                    .mmap_fixed(hva, len, Prot::READ | Prot::WRITE)
                    .expect("mmap_fixed");
                w.bump(hp, n);
            }
        }
    }
}

fn ager(w: &World, seed: u64, ops: u64) {
    let mut rng = Rng(seed ^ 0xa9e);
    for _ in 0..ops {
        let hp = rng.below(PAGES);
        let n = 1 + rng.below(PAGES - hp);
        let (hva, len) = (w.hva_of(hp), n * PAGE);
        // A range with a hole (a concurrent munmap) is refused with NotMapped and changes nothing.
        let _ = match rng.below(3) {
            0 => w.host.clear_young(hva, len),
            1 => w.host.test_young(hva),
            _ => w.host.clear_flush_young(hva, len),
        };
    }
}

fn memslots(w: &World, seed: u64, ops: u64) {
    let mut rng = Rng(seed ^ 0x5107);
    let mut at: Option<usize> = None;
    for _ in 0..ops {
        let next = match at {
            None => Some(rng.below(2) as usize),
            // Delete, or move to the other base.
            Some(b) => (rng.below(2) == 0).then_some(1 - b),
        };
        let r = match next {
            Some(b) => region(1, ALIAS_GPA[b], ALIAS_PAGES, w.hva),
            None => region(1, ALIAS_GPA[at.unwrap_or(0)], 0, w.hva),
        };
        match w.vm.set_user_memory_region(r) {
            Ok(()) => at = next,
            Err(e) => w.violation(format!("Memslot: {e}")),
        }
    }
}

/// One iteration: a fresh VM, every actor in its own shuttle thread, then the counter oracles.
fn scenario(mmu: MmuKind, aging: AgingMode, size: Size) {
    #[cfg(feature = "test-hooks")]
    {
        kvmmu::internals::mmu::tdp::hooks::set_yield_period(1);
        kvmmu::internals::mmu::shadow::rmap::hooks::set_yield_period(1);
    }
    let seed = {
        use shuttle::rand::RngCore;
        shuttle::rand::thread_rng().next_u64()
    };
    let host = HostMm::new(HostConfig {
        frames: (PAGES * 4) as usize,
    })
    .expect("host");
    let vm = Arc::new(
        Vm::new(
            &host,
            VmConfig {
                mmu,
                aging,
                tlb_entries: 8,
                ..VmConfig::default()
            },
        )
        .expect("vm"),
    );
    let hva = host
        .mmap(PAGES * PAGE, Prot::READ | Prot::WRITE)
        .expect("mmap");
    vm.set_user_memory_region(region(0, MAIN_GPA, PAGES, hva))
        .expect("slot 0");
    let w = Arc::new(World {
        vm,
        host: host.clone(),
        hva,
        discard_gen: (0..PAGES).map(|_| AtomicU64::new(0)).collect(),
        violations: Mutex::new(Vec::new()),
    });
    let mut threads = Vec::new();
    for id in 0..VCPUS {
        let w = Arc::clone(&w);
        threads.push(shuttle::thread::spawn(move || {
            vcpu(&w, id, seed, size.vcpu_ops)
        }));
    }
    {
        let w = Arc::clone(&w);
        threads.push(shuttle::thread::spawn(move || {
            host_actor(&w, seed, size.host_ops)
        }));
    }
    {
        let w = Arc::clone(&w);
        threads.push(shuttle::thread::spawn(move || ager(&w, seed, size.age_ops)));
    }
    {
        let w = Arc::clone(&w);
        threads.push(shuttle::thread::spawn(move || {
            memslots(&w, seed, size.memslot_ops)
        }));
    }
    for t in threads {
        t.join().expect("an actor panicked");
    }
    let w = Arc::into_inner(w).expect("every actor joined");
    let mut v = std::mem::take(&mut *w.violations.lock());
    let s = w.vm.stats();
    assert!(
        s.faults > 0,
        "no vCPU access faulted: the scenario did not run"
    );
    if s.invalidate.in_progress != 0 || s.mn_active_invalidate_count != 0 {
        v.push(format!(
            "Counter: in_progress {} active {} at quiescence",
            s.invalidate.in_progress, s.mn_active_invalidate_count
        ));
    }
    if s.invalidate_starts != s.invalidate_ends {
        v.push(format!(
            "Counter: {} starts, {} ends",
            s.invalidate_starts, s.invalidate_ends
        ));
    }
    let stale = host.arena().stats().stale_accesses;
    if stale != 0 {
        v.push(format!(
            "StaleTranslation: the arena counted {stale} stale accesses"
        ));
    }
    let vm = Arc::into_inner(w.vm).expect("the vCPUs are gone");
    let fin = vm.shutdown();
    if fin.tdp.tables_allocated != fin.tdp.tables_freed
        || fin.shadow.pages_allocated != fin.shadow.pages_freed
        || fin.shadow.rmap.desc_allocs != fin.shadow.rmap.desc_frees
    {
        v.push(format!(
            "Counter: after shutdown tables {}/{}, shadow pages {}/{}, rmap descs {}/{}",
            fin.tdp.tables_allocated,
            fin.tdp.tables_freed,
            fin.shadow.pages_allocated,
            fin.shadow.pages_freed,
            fin.shadow.rmap.desc_allocs,
            fin.shadow.rmap.desc_frees
        ));
    }
    host.release();
    let frames = host.arena().stats().allocated;
    if frames != 0 {
        v.push(format!("Counter: {frames} frames allocated after release"));
    }
    assert!(v.is_empty(), "oracle violations (seed {seed:#x}): {v:#?}");
}

/// `shuttle::check_random` with 1 MiB continuation stacks instead of shuttle's 60 KiB: a debug
/// build of `HostMm::new` builds a 512-entry host page-table directory through stack temporaries,
/// which overflows the default and faults with SIGSEGV (not a kvmmu bug; real threads have MiBs).
fn check_random<F: Fn() + Send + Sync + 'static>(f: F, iterations: usize) {
    let mut config = shuttle::Config::new();
    config.stack_size = 1 << 20;
    shuttle::Runner::new(shuttle::scheduler::RandomScheduler::new(iterations), config).run(f);
}

/// Shuttle runs of the correct build; iteration counts keep the whole file well under a minute.
#[cfg(not(feature = "broken-rmap-flush-if-young"))]
mod correct {
    use super::*;

    fn passes(mmu: MmuKind, aging: AgingMode) {
        check_random(move || scenario(mmu, aging, SIZE), iterations());
        // ORDERING: Relaxed: statistics; the iterations have ended.
        assert!(
            WRITES_OK.load(Ordering::Relaxed) > 0,
            "no guest write succeeded"
        );
        assert!(
            READS_MATCHED.load(Ordering::Relaxed) > 0,
            "no read returned a value written earlier"
        );
        // With the hooks, their yield sites were scheduling points (process-wide counts).
        #[cfg(feature = "test-hooks")]
        if mmu == MmuKind::Shadow {
            let n = kvmmu::internals::mmu::shadow::rmap::hooks::injected();
            assert!(n.yields() > 0, "no rmap hook site yielded: {n:?}");
        } else {
            assert!(
                kvmmu::internals::mmu::tdp::hooks::injected().1 > 0,
                "no TDP hook site yielded"
            );
        }
    }

    #[test]
    fn shuttle_tdp_lockless_aging_passes_every_oracle() {
        passes(MmuKind::Tdp, AgingMode::Lockless);
    }

    #[test]
    fn shuttle_shadow_lockless_aging_passes_every_oracle() {
        passes(MmuKind::Shadow, AgingMode::Lockless);
    }

    #[test]
    fn shuttle_shadow_locked_aging_passes_every_oracle() {
        passes(MmuKind::Shadow, AgingMode::Locked);
    }

    /// Iterations per test: 1000 (a few seconds in release), or `SHUTTLE_ITERATIONS` to run for
    /// longer.
    fn iterations() -> usize {
        std::env::var("SHUTTLE_ITERATIONS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000)
    }
}

/// The twin: the build whose rmap zaps flush only when a zapped SPTE was young must be caught.
#[cfg(feature = "broken-rmap-flush-if-young")]
#[test]
fn shuttle_catches_an_rmap_zap_that_flushes_only_young_sptes() {
    let r = std::panic::catch_unwind(|| {
        check_random(|| scenario(MmuKind::Shadow, AgingMode::Lockless, SIZE), 500);
    });
    let payload = r.expect_err("500 shuttle iterations of a build that skips flushes all passed");
    let msg = payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default();
    assert!(
        ["StaleTranslation", "Data:", "WriteToReadOnly"]
            .iter()
            .any(|k| msg.contains(k)),
        "caught, but not as a stale translation, lost data or a write to a read-only page: {msg}"
    );
}
