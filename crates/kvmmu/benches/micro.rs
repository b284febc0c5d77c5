//! Criterion micro-benchmarks of kvmmu's hot paths, each calling the library's public API exactly as
//! the VM and vCPU layers do: SPTE walk, software TLB hit and miss, TDP leaf install, zap, lockless
//! and locked aging of one table and of a 4 GiB range, whole-vCPU translation (warm TLB and TLB
//! miss, TDP and shadow), SRCU read-side entry (alone and beside a second reader thread), RCU
//! read-side entry, the whole vCPU fault path (walk miss, fault,
//! GUP with host frame allocation, install), lock-free (shared `mmu_lock`) vs locked (exclusive)
//! installs from parallel threads, and the shadow MMU's rmap
//! add/remove/age, and lockless vs locked aging of long rmap chains with bit-lock contention.
//!
//! Run with `cargo bench -p kvmmu --bench micro`; `cargo test` only compiles it (`harness = false`).

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use kvmmu::internals::addr::{AsId, Gfn, GfnRange, Gpa, Level, PAGE_SIZE, Pfn, SlotId};
use kvmmu::internals::config::{AgingMode, MmuKind, VmConfig};
use kvmmu::internals::host::{HostConfig, HostMm, Prot};
use kvmmu::internals::mmu::shadow::rmap::{
    AgeAction, RmapHead, RmapStats, SPTE_ACCESSED_MASK, SPTE_PRESENT_MASK, SptePtr,
};
use kvmmu::internals::mmu::tdp::{RootRef, TdpMmu};
use kvmmu::internals::mmu::{FaultOutcome, HwWalk, MapRequest, RemoteTlbFlush};
use kvmmu::internals::sync::{Arc, MmuLock, Rcu, Srcu};
use kvmmu::internals::vcpu::tlb::{Tlb, TlbEntry};
use kvmmu::internals::vm::Vm;
use kvmmu::internals::vm::memslot::{MemFlags, MemoryRegion};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

/// Pages in one last-level table.
const TABLE: u64 = 512;
/// Pages in 4 GiB.
const RANGE_4G: u64 = (4 << 30) / PAGE_SIZE;

/// A TDP MMU with one valid root, as the VM holds it.
struct Env {
    lock: MmuLock,
    rcu: Arc<Rcu>,
    tdp: TdpMmu,
    root: Option<RootRef>,
}

/// A flush that has no vCPUs to reach (the benchmark has none running on this MMU).
struct NoVcpus;

impl RemoteTlbFlush for NoVcpus {
    fn flush_remote_tlbs(&self) {}
}

impl Env {
    fn new() -> Env {
        let lock = MmuLock::new();
        let rcu = Arc::new(Rcu::new());
        let tdp = TdpMmu::new(1, Arc::clone(&rcu));
        let root = {
            let mmu = lock.read();
            tdp.get_root(AsId::new(0), mmu.witness())
        };
        Env {
            lock,
            rcu,
            tdp,
            root: Some(root),
        }
    }

    fn root(&self) -> &RootRef {
        self.root
            .as_ref()
            .expect("root held for the Env's lifetime")
    }

    /// Maps `gfns` (gfn g → pfn g + 1), each leaf young, as faults do.
    fn map(&self, gfns: std::ops::Range<u64>) {
        let mmu = self.lock.read();
        let rcu = self.rcu.pin();
        for g in gfns {
            let out = self.tdp.map(self.root(), &req(g), mmu.witness(), &rcu);
            assert!(
                matches!(out, FaultOutcome::Fixed | FaultOutcome::Spurious),
                "setup map of gfn {g} failed: {out:?}"
            );
        }
    }

    fn range(start: u64, len: u64) -> GfnRange {
        GfnRange::from_len(Gfn::new(start), len).expect("benchmark range is valid")
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        drop(self.root.take());
    }
}

fn req(g: u64) -> MapRequest {
    MapRequest {
        gfn: Gfn::new(g),
        pfn: Pfn::new(g + 1),
        level: Level::L4K,
        host_writable: true,
        write_fault: true,
        prefetch: false,
    }
}

fn spte_walk(c: &mut Criterion) {
    let env = Env::new();
    env.map(0..RANGE_4G / 16);
    let mut g = 0u64;
    c.bench_function("spte_walk/hot_read", |b| {
        b.iter(|| {
            let rcu = env.rcu.pin();
            // A stride of 8 pages walks a different SPTE line each time, tables stay cache-hot.
            g = (g + 8) % TABLE;
            black_box(env.tdp.hardware_walk(env.root(), Gfn::new(g), false, &rcu))
        })
    });
    let n = RANGE_4G / 16;
    c.bench_function("spte_walk/spread_256MiB", |b| {
        b.iter(|| {
            let rcu = env.rcu.pin();
            g = (g
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407))
                % n;
            black_box(env.tdp.hardware_walk(env.root(), Gfn::new(g), false, &rcu))
        })
    });
}

fn tlb(c: &mut Criterion) {
    let env = Env::new();
    env.map(0..4096);
    let mut tlb = Tlb::new(2048);
    for g in 0..1024 {
        tlb.insert(TlbEntry {
            gfn: Gfn::new(g),
            pfn: Pfn::new(g + 1),
            tag: 0,
            writable: true,
            dirty: true,
            executable: true,
        });
    }
    let mut g = 0u64;
    c.bench_function("tlb/hit", |b| {
        b.iter(|| {
            g = (g + 1) % 1024;
            black_box(tlb.lookup(Gfn::new(g)).map(|e| e.pfn))
        })
    });
    // A miss as the vCPU takes it: lookup, hardware walk, fill.
    let mut m = 1024u64;
    c.bench_function("tlb/miss_walk_fill", |b| {
        b.iter(|| {
            m = if m + 1 >= 4096 { 0 } else { m + 1 };
            let gfn = Gfn::new(m);
            if tlb.lookup(gfn).is_none() {
                let rcu = env.rcu.pin();
                if let HwWalk::Hit {
                    pfn,
                    writable,
                    dirty,
                    ..
                } = env.tdp.hardware_walk(env.root(), gfn, false, &rcu)
                {
                    tlb.insert(TlbEntry {
                        gfn,
                        pfn,
                        tag: 0,
                        writable,
                        dirty,
                        executable: true,
                    });
                }
            }
            black_box(m)
        })
    });
}

fn install(c: &mut Criterion) {
    let mut grp = c.benchmark_group("tdp_install");
    grp.throughput(Throughput::Elements(TABLE));
    grp.bench_function("one_table_incl_table_alloc", |b| {
        b.iter_batched(
            Env::new,
            |env| {
                env.map(0..TABLE);
                env
            },
            BatchSize::SmallInput,
        )
    });
    let env = Env::new();
    env.map(0..1); // upper tables exist
    let mut base = TABLE;
    grp.bench_function("one_table_upper_levels_present", |b| {
        b.iter(|| {
            env.map(base..base + TABLE);
            base += TABLE;
        })
    });
    grp.finish();
}

fn zap(c: &mut Criterion) {
    let mut grp = c.benchmark_group("tdp_zap");
    grp.throughput(Throughput::Elements(TABLE));
    grp.bench_function("one_table_leaves", |b| {
        b.iter_batched(
            || {
                let env = Env::new();
                env.map(0..TABLE);
                env
            },
            |env| {
                let mut mmu = env.lock.write();
                let flush = env.tdp.zap_leafs(
                    AsId::new(0),
                    Env::range(0, TABLE),
                    &mut mmu,
                    false,
                    &NoVcpus,
                );
                drop(mmu);
                black_box(flush);
                env
            },
            BatchSize::SmallInput,
        )
    });
    grp.finish();
}

fn aging(c: &mut Criterion) {
    let as0 = AsId::new(0);
    // One table, 100% young: every leaf made young again (outside the timing) before each pass.
    let mut grp = c.benchmark_group("age_one_table");
    grp.throughput(Throughput::Elements(TABLE));
    let env = Env::new();
    env.map(0..TABLE);
    let rejuvenate = |env: &Env| {
        let rcu = env.rcu.pin();
        for g in 0..TABLE {
            black_box(env.tdp.hardware_walk(env.root(), Gfn::new(g), false, &rcu));
        }
    };
    for (name, locked) in [("lockless_all_young", false), ("locked_all_young", true)] {
        grp.bench_function(name, |b| {
            b.iter_batched(
                || rejuvenate(&env),
                |()| age_once(&env, Env::range(0, TABLE), locked),
                BatchSize::SmallInput,
            )
        });
    }
    for (name, locked) in [("lockless_none_young", false), ("locked_none_young", true)] {
        grp.bench_function(name, |b| {
            b.iter(|| age_once(&env, Env::range(0, TABLE), locked))
        });
    }
    grp.finish();

    // A 4 GiB range (1 M SPTEs), steady state (nothing young), as back-to-back aging passes see it.
    let mut grp = c.benchmark_group("age_4GiB");
    grp.sample_size(10);
    grp.throughput(Throughput::Elements(RANGE_4G));
    let env = Env::new();
    env.map(0..RANGE_4G);
    {
        let rcu = env.rcu.pin();
        env.tdp.age_gfn_range(as0, Env::range(0, RANGE_4G), &rcu);
    }
    for (name, locked) in [("lockless_none_young", false), ("locked_none_young", true)] {
        grp.bench_function(name, |b| {
            b.iter(|| age_once(&env, Env::range(0, RANGE_4G), locked))
        });
    }
    grp.finish();
}

/// One aging call as the VM makes it: lockless = RCU only; locked = `mmu_lock` write around it.
fn age_once(env: &Env, range: GfnRange, locked: bool) -> bool {
    let guard = locked.then(|| env.lock.write());
    let rcu = env.rcu.pin();
    let young = env.tdp.age_gfn_range(AsId::new(0), range, &rcu);
    drop(rcu);
    drop(guard);
    black_box(young)
}

fn read_side(c: &mut Criterion) {
    let srcu = Arc::new(Srcu::new());
    c.bench_function("srcu/read_lock_unlock", |b| {
        b.iter(|| black_box(srcu.read_lock()))
    });
    // The same with a second thread entering and leaving read sections of the same domain in a
    // loop (each thread writes its own stripe: no shared line between the two readers).
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let other = {
        let (srcu, stop) = (Arc::clone(&srcu), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut n = 0u64;
            // ORDERING: Relaxed: a stop flag; nothing is published through it.
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..1024 {
                    black_box(srcu.read_lock());
                }
                n += 1024;
            }
            n
        })
    };
    c.bench_function("srcu/read_lock_unlock_2_threads", |b| {
        b.iter(|| black_box(srcu.read_lock()))
    });
    // ORDERING: Relaxed: as above.
    stop.store(true, Ordering::Relaxed);
    black_box(other.join().expect("the second reader panicked"));
    let rcu = Rcu::new();
    c.bench_function("rcu/pin_unpin", |b| b.iter(|| black_box(rcu.pin())));
    let lock = MmuLock::new();
    c.bench_function("mmu_lock/read_lock_unlock", |b| {
        b.iter(|| black_box(lock.read()))
    });
}

/// The whole fault path of a fresh guest: TLB miss, walk, fault, memslot lookup under SRCU, GUP
/// (host frame allocation), retry check, install; lockless and locked aging mode VMs (faults take
/// `mmu_lock` read in both).
fn fault_path(c: &mut Criterion) {
    let mut grp = c.benchmark_group("fault_path");
    grp.throughput(Throughput::Elements(TABLE));
    for (name, aging) in [
        ("populate_512_lockless_vm", AgingMode::Lockless),
        ("populate_512_locked_vm", AgingMode::Locked),
    ] {
        grp.bench_function(name, |b| {
            b.iter_batched(
                || {
                    let host = HostMm::new(HostConfig {
                        frames: TABLE as usize + 64,
                    })
                    .expect("host");
                    host.prefault().expect("prefault");
                    let vm = Vm::new(
                        &host,
                        VmConfig {
                            mmu: MmuKind::Tdp,
                            aging,
                            ..VmConfig::default()
                        },
                    )
                    .expect("vm");
                    let hva = host
                        .mmap(TABLE * PAGE_SIZE, Prot::READ | Prot::WRITE)
                        .expect("mmap");
                    vm.set_user_memory_region(MemoryRegion {
                        slot: SlotId::new(0),
                        as_id: AsId::new(0),
                        flags: MemFlags::empty(),
                        gpa: Gpa::new(1 << 32),
                        size: TABLE * PAGE_SIZE,
                        hva,
                    })
                    .expect("memslot");
                    let vcpu = vm.create_vcpu().expect("vcpu");
                    (host, vm, vcpu)
                },
                |(host, vm, mut vcpu)| {
                    {
                        let mut g = vcpu.enter();
                        for p in 0..TABLE {
                            g.write_u64(Gpa::new((1 << 32) + p * PAGE_SIZE), p)
                                .expect("populate write");
                        }
                    }
                    (host, vm, vcpu)
                },
                BatchSize::PerIteration,
            )
        });
    }
    grp.finish();
}

/// Guest pages of the translation benchmark's guest (32 MiB: 16× the default TLB's reach).
const XLATE_PAGES: u64 = 8192;
/// Pages of the warm set: half the default TLB, as `kvmmu bench` uses.
const XLATE_WARM: u64 = 1024;

/// Whole-vCPU translation as a guest runs it (`GuestMode::read_u64`: request check, TLB lookup,
/// walk on a miss, checked frame access), TDP and shadow: a warm-TLB pass over a hot set of pages
/// and a pass over a guest 4× larger than the TLB's reach (every access misses), one word per page.
fn translation(c: &mut Criterion) {
    let base = 1u64 << 32;
    for mmu in [MmuKind::Tdp, MmuKind::Shadow] {
        let host = HostMm::new(HostConfig {
            frames: XLATE_PAGES as usize + 256,
        })
        .expect("host");
        host.prefault().expect("prefault");
        let vm = Vm::new(
            &host,
            VmConfig {
                mmu,
                ..VmConfig::default()
            },
        )
        .expect("vm");
        let hva = host
            .mmap(XLATE_PAGES * PAGE_SIZE, Prot::READ | Prot::WRITE)
            .expect("mmap");
        vm.set_user_memory_region(MemoryRegion {
            slot: SlotId::new(0),
            as_id: AsId::new(0),
            flags: MemFlags::empty(),
            gpa: Gpa::new(base),
            size: XLATE_PAGES * PAGE_SIZE,
            hva,
        })
        .expect("memslot");
        let mut vcpu = vm.create_vcpu().expect("vcpu");
        {
            let mut g = vcpu.enter();
            for p in 0..XLATE_PAGES {
                g.write_u64(Gpa::new(base + p * PAGE_SIZE), p)
                    .expect("populate write");
            }
        }
        let name = match mmu {
            MmuKind::Tdp => "tdp",
            MmuKind::Shadow => "shadow",
        };
        let mut grp = c.benchmark_group("translation");
        grp.throughput(Throughput::Elements(XLATE_WARM));
        grp.bench_function(format!("{name}_warm_tlb"), |b| {
            b.iter(|| {
                let mut g = vcpu.enter();
                let mut sum = 0u64;
                for p in 0..XLATE_WARM {
                    sum = sum.wrapping_add(
                        g.read_u64(Gpa::new(base + p * PAGE_SIZE))
                            .expect("warm read"),
                    );
                }
                black_box(sum)
            })
        });
        grp.throughput(Throughput::Elements(XLATE_PAGES));
        grp.bench_function(format!("{name}_tlb_miss"), |b| {
            b.iter(|| {
                let mut g = vcpu.enter();
                let mut sum = 0u64;
                for p in 0..XLATE_PAGES {
                    sum = sum.wrapping_add(
                        g.read_u64(Gpa::new(base + p * PAGE_SIZE))
                            .expect("miss read"),
                    );
                }
                black_box(sum)
            })
        });
        grp.finish();
        drop(vcpu);
        vm.shutdown();
    }
}

/// Shadow-MMU reverse maps (the primitive on main): add/remove one SPTE on an empty rmap and on a
/// 16-entry chain (descriptor list), and lockless aging of a 16-entry rmap (read-only bit lock).
fn rmap(c: &mut Criterion) {
    const CHAIN: usize = 16;
    let young = SPTE_PRESENT_MASK | SPTE_ACCESSED_MASK | 0x7;
    let slots: Box<[AtomicU64]> = (0..=CHAIN).map(|_| AtomicU64::new(young)).collect();
    // SAFETY: `slots` outlives every rmap below, each of which is emptied before this function
    // returns, so no pointer to a slot is used after the slots are freed.
    let ptr = |i: usize| unsafe { SptePtr::new(&slots[i]) };
    let lock = MmuLock::new();
    let stats = RmapStats::new();

    let single = RmapHead::new();
    c.bench_function("rmap/add_remove_single", |b| {
        b.iter(|| {
            let w = lock.write();
            single.pte_list_add(w.witness(), &stats, ptr(0));
            single
                .pte_list_remove(w.witness(), &stats, ptr(0))
                .expect("the SPTE just added is present");
        })
    });

    let chain = RmapHead::new();
    {
        let w = lock.write();
        for i in 0..CHAIN {
            chain.pte_list_add(w.witness(), &stats, ptr(i));
        }
    }
    c.bench_function("rmap/add_remove_in_16_chain", |b| {
        b.iter(|| {
            let w = lock.write();
            chain.pte_list_add(w.witness(), &stats, ptr(CHAIN));
            chain
                .pte_list_remove(w.witness(), &stats, ptr(CHAIN))
                .expect("the SPTE just added is present");
        })
    });
    let mut grp = c.benchmark_group("rmap_age_16");
    grp.throughput(Throughput::Elements(CHAIN as u64));
    grp.bench_function("lockless_none_young", |b| {
        for s in slots.iter() {
            // ORDERING: Relaxed: single-threaded setup between measurements.
            s.fetch_and(!SPTE_ACCESSED_MASK, Ordering::Relaxed);
        }
        b.iter(|| black_box(chain.age_rmap(&stats, AgeAction::Clear)))
    });
    grp.bench_function("lockless_all_young", |b| {
        b.iter_batched(
            || {
                for s in slots.iter() {
                    // ORDERING: Relaxed: single-threaded setup outside the timing.
                    s.fetch_or(SPTE_ACCESSED_MASK, Ordering::Relaxed);
                }
            },
            |()| black_box(chain.age_rmap(&stats, AgeAction::Clear)),
            BatchSize::SmallInput,
        )
    });
    grp.finish();

    let w = lock.write();
    for i in 0..CHAIN {
        chain
            .pte_list_remove(w.witness(), &stats, ptr(i))
            .expect("every SPTE added is present");
    }
    assert!(
        chain.is_empty() && single.is_empty(),
        "rmaps emptied before their slots are freed"
    );
}

/// Rmaps per chain length in [`rmap_chains`].
const CHAIN_RMAPS: usize = 64;

/// Lockless vs locked shadow rmap aging over long chains (issue 14): `CHAIN_RMAPS` rmaps of 1, 8
/// and 64 entries each (built with the rmap API, as nested guests' indirect pages build them),
/// aged with [`AgeAction::Clear`] once per iteration, quiet or against a writer thread that keeps
/// adding and removing one more entry in every rmap under `mmu_lock` write (a vCPU faulting and a
/// zap). Lockless takes each rmap's bit read-only; locked also holds `mmu_lock` write for the whole
/// pass (the pre-series baseline). After each run it prints the rmap-bit waits (ager and writer)
/// and `mmu_lock` write waits per million aged SPTEs next to criterion's times.
fn rmap_chains(c: &mut Criterion) {
    let young = SPTE_PRESENT_MASK | SPTE_ACCESSED_MASK | 0x7;
    for len in [1usize, 8, 64] {
        let per = len + 1;
        let slots: Box<[AtomicU64]> = (0..CHAIN_RMAPS * per)
            .map(|_| AtomicU64::new(young))
            .collect();
        // SAFETY: `slots` outlives every rmap below, each of which is emptied before this
        // iteration of the loop ends, so no pointer to a slot is used after the slots are freed.
        let ptr = |i: usize| unsafe { SptePtr::new(&slots[i]) };
        let lock = MmuLock::new();
        let stats = RmapStats::new();
        let heads: Box<[RmapHead]> = (0..CHAIN_RMAPS).map(|_| RmapHead::new()).collect();
        {
            let w = lock.write();
            for (r, h) in heads.iter().enumerate() {
                for e in 0..len {
                    h.pte_list_add(w.witness(), &stats, ptr(r * per + e));
                }
            }
        }
        let mut grp = c.benchmark_group(format!("rmap_age_chain_{len}"));
        grp.throughput(Throughput::Elements((CHAIN_RMAPS * len) as u64));
        grp.sample_size(20);
        grp.warm_up_time(std::time::Duration::from_millis(500));
        grp.measurement_time(std::time::Duration::from_secs(2));
        for (mode, locked) in [("lockless", false), ("locked", true)] {
            for with_writer in [false, true] {
                let name = format!("{mode}/{}", if with_writer { "writer" } else { "quiet" });
                let stop = std::sync::atomic::AtomicBool::new(false);
                let (s0, l0) = (stats.snapshot(), lock.stats());
                let mut aged = 0u64;
                std::thread::scope(|s| {
                    if with_writer {
                        s.spawn(|| {
                            // ORDERING: Relaxed: a stop flag; the scope's join orders the rest.
                            while !stop.load(Ordering::Relaxed) {
                                let w = lock.write();
                                for (r, h) in heads.iter().enumerate() {
                                    let spare = ptr(r * per + len);
                                    h.pte_list_add(w.witness(), &stats, spare);
                                    h.pte_list_remove(w.witness(), &stats, spare)
                                        .expect("the spare was just added");
                                }
                            }
                        });
                    }
                    grp.bench_function(&name, |b| {
                        b.iter(|| {
                            let _held = locked.then(|| lock.write());
                            let mut cleared = 0;
                            let mut young = false;
                            for h in heads.iter() {
                                young |= h.age_rmap_counted(
                                    &stats,
                                    AgeAction::Clear,
                                    &mut aged,
                                    &mut cleared,
                                );
                            }
                            black_box((young, cleared))
                        })
                    });
                    // ORDERING: Relaxed: see the writer's load.
                    stop.store(true, Ordering::Relaxed);
                });
                let (s1, l1) = (stats.snapshot(), lock.stats());
                let per_m = |n: u64| n as f64 * 1e6 / aged.max(1) as f64;
                println!(
                    "rmap_age_chain_{len}/{name}: per million aged SPTEs ({aged} aged): rmap-bit \
                     waits {:.1} (ager {:.1}, writer {:.1}), mmu_lock write waits {:.1}",
                    per_m(s1.lock_contended - s0.lock_contended),
                    per_m(s1.lock_contended_readonly - s0.lock_contended_readonly),
                    per_m(s1.lock_contended_writer - s0.lock_contended_writer),
                    per_m(l1.contended_writes - l0.contended_writes),
                );
            }
        }
        grp.finish();
        let w = lock.write();
        for h in heads.iter() {
            assert!(h.zap_all(w.witness(), &stats, |_| {}));
        }
    }
}

/// Lock-free vs locked fault path (issue 6): `threads` threads install leaves into disjoint tables
/// of one TDP MMU, one fault at a time, each fault taking `mmu_lock` and pinning RCU the way the
/// VM's fault path does. `read` is the TDP MMU's design (faults hold the lock shared and race
/// with compare-and-swap); `write` is the legacy design where every fault holds it exclusively
/// (the shadow MMU, and KVM before the TDP MMU). Only the installs are timed, not the set-up.
fn fault_install_parallel(c: &mut Criterion) {
    const PER_THREAD: u64 = 8 * TABLE;
    let mut grp = c.benchmark_group("fault_install_parallel");
    grp.sample_size(20);
    for threads in [1u64, 2] {
        grp.throughput(Throughput::Elements(threads * PER_THREAD));
        for (mode, exclusive) in [("lockfree_read_lock", false), ("locked_write_lock", true)] {
            grp.bench_function(format!("{mode}/{threads}_threads"), |b| {
                b.iter_custom(|iters| {
                    let mut total = std::time::Duration::ZERO;
                    for _ in 0..iters {
                        let env = Env::new();
                        env.map(0..1); // upper levels of the first table exist, as in a warm VM
                        let t = std::time::Instant::now();
                        std::thread::scope(|s| {
                            for th in 0..threads {
                                let env = &env;
                                s.spawn(move || {
                                    // Disjoint 1 GiB regions: no two threads share a table.
                                    let base = (th + 1) << 18;
                                    for g in base..base + PER_THREAD {
                                        let out = if exclusive {
                                            let mmu = env.lock.write();
                                            let rcu = env.rcu.pin();
                                            env.tdp.map(
                                                env.root(),
                                                &req(g),
                                                mmu.read_witness(),
                                                &rcu,
                                            )
                                        } else {
                                            let mmu = env.lock.read();
                                            let rcu = env.rcu.pin();
                                            env.tdp.map(env.root(), &req(g), mmu.witness(), &rcu)
                                        };
                                        assert!(
                                            matches!(out, FaultOutcome::Fixed),
                                            "install of gfn {g} failed: {out:?}"
                                        );
                                    }
                                });
                            }
                        });
                        total += t.elapsed();
                        drop(env);
                    }
                    total
                })
            });
        }
    }
    grp.finish();
}

criterion_group!(
    benches,
    spte_walk,
    tlb,
    translation,
    install,
    zap,
    aging,
    read_side,
    fault_path,
    fault_install_parallel,
    rmap,
    rmap_chains
);
criterion_main!(benches);
