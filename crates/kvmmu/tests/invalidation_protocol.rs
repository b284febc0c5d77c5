//! The notifier protocol at the VM level (spec §2.3, §3.2–§3.3; §4 items 2–4, 10, 11, 14).
//!
//! A second host subscriber, registered after the VM, can block inside `invalidate_range_start`:
//! the VM's start has then returned and its end has not run, which freezes the system at the
//! point the invariants talk about.

mod common;

use common::*;
use kvmmu::internals::host::{MmuNotifier, NotifierRange};
use kvmmu::prelude::*;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Blocks in `invalidate_range_start` while `hold` is set, after recording what the VM looked like.
#[derive(Default)]
struct Blocker {
    hold: AtomicBool,
    inside: AtomicBool,
    starts: AtomicUsize,
    #[allow(clippy::type_complexity)]
    check: Mutex<Option<Box<dyn Fn() + Send>>>,
}

impl MmuNotifier for Blocker {
    fn invalidate_range_start(&self, _r: &NotifierRange) {
        self.starts.fetch_add(1, Ordering::SeqCst);
        if let Some(check) = self.check.lock().unwrap().as_ref() {
            check();
        }
        self.inside.store(true, Ordering::SeqCst);
        while self.hold.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.inside.store(false, Ordering::SeqCst);
    }
    fn invalidate_range_end(&self, _r: &NotifierRange) {}
    fn clear_flush_young(&self, _s: Hva, _e: Hva) -> bool {
        false
    }
    fn clear_young(&self, _s: Hva, _e: Hva) -> bool {
        false
    }
    fn test_young(&self, _a: Hva) -> bool {
        false
    }
    fn release(&self) {}
}

fn wait_until(cond: impl Fn() -> bool) {
    for _ in 0..10_000 {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!("condition not reached in 10 s");
}

/// The default configuration with the given MMU.
fn base(mmu: MmuKind) -> VmConfig {
    VmConfig {
        mmu,
        ..VmConfig::default()
    }
}

fn no_spte_survives_invalidate_range_start_for_the_range(mmu: MmuKind) {
    let f = fixture(64 * 4096, base(mmu));
    let mut vcpu = f.vm.create_vcpu().unwrap();
    for p in 0..64 {
        vcpu.write_u64(gpa(p), p).unwrap();
    }
    drop(vcpu);
    let vm = Arc::new(f.vm);
    let blocker = Arc::new(Blocker::default());
    let seen_present = Arc::new(AtomicUsize::new(0));
    {
        let (vm, seen) = (vm.clone(), seen_present.clone());
        *blocker.check.lock().unwrap() = Some(Box::new(move || {
            // The VM's start has returned (it subscribed first): pages 16..32 must be unmapped.
            for p in 16..32 {
                if vm.spte(AsId::new(0), gpa(p).gfn()).is_some() {
                    seen.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    f.host.register_notifier(blocker.clone());
    f.host
        .madvise_dontneed(hva_of(f.hva, 16), 16 * 4096)
        .unwrap();
    assert!(blocker.starts.load(Ordering::SeqCst) > 0);
    assert_eq!(seen_present.load(Ordering::SeqCst), 0, "spec §4 item 10");
    // Pages outside the range keep their translations.
    assert!(vm.spte(AsId::new(0), gpa(8).gfn()).is_some());
    assert!(vm.spte(AsId::new(0), gpa(40).gfn()).is_some());
}

fn no_spte_is_installed_between_start_and_end_and_the_fault_completes_after(mmu: MmuKind) {
    let f = fixture(16 * 4096, base(mmu));
    let blocker = Arc::new(Blocker::default());
    f.host.register_notifier(blocker.clone());
    // Make page 3 present on the host so the mprotect below has something to invalidate.
    f.host.write_u64(hva_of(f.hva, 3), 33).unwrap();
    blocker.hold.store(true, Ordering::SeqCst);
    std::thread::scope(|s| {
        let host = &f.host;
        let prot = s.spawn(move || host.mprotect(f.hva, 16 * 4096, Prot::READ).unwrap());
        wait_until(|| blocker.inside.load(Ordering::SeqCst));
        // Inside the invalidation: a vCPU read of page 3 faults, GUP succeeds (read-only memory
        // is readable) but the install must keep retrying.
        let vm = &f.vm;
        let reader = s.spawn(move || {
            let mut vcpu = vm.create_vcpu().unwrap();
            vcpu.read_u64(gpa(3)).unwrap()
        });
        wait_until(|| f.vm.stats().fault_retries > 0);
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            f.vm.spte(AsId::new(0), gpa(3).gfn()).is_none(),
            "spec §4 item 11: no SPTE installed while the invalidation is in progress"
        );
        assert!(!reader.is_finished());
        assert_eq!(f.vm.stats().invalidate.in_progress, 1);
        blocker.hold.store(false, Ordering::SeqCst);
        prot.join().unwrap();
        assert_eq!(reader.join().unwrap(), 33);
    });
    let (spte, _) = f.vm.spte(AsId::new(0), gpa(3).gfn()).unwrap();
    assert!(!spte.is_writable(), "mapped read-only after mprotect(READ)");
}

fn memslot_swap_waits_for_an_in_flight_invalidation(mmu: MmuKind) {
    let f = fixture(16 * 4096, base(mmu));
    let blocker = Arc::new(Blocker::default());
    f.host.register_notifier(blocker.clone());
    f.host.write_u64(f.hva, 1).unwrap();
    let gen_before = f.vm.memslots_generation(AsId::new(0)).unwrap();
    // Mapped before the block: host mapping changes wait for the host's own writer lock, which
    // the blocked munmap holds.
    let other = f.host.mmap(4096, Prot::READ).unwrap();
    blocker.hold.store(true, Ordering::SeqCst);
    std::thread::scope(|s| {
        let host = &f.host;
        let inv = s.spawn(move || host.munmap(f.hva, 4096).unwrap());
        wait_until(|| blocker.inside.load(Ordering::SeqCst));
        assert_eq!(f.vm.stats().mn_active_invalidate_count, 1);
        let vm = &f.vm;
        let update = s.spawn(move || {
            vm.set_user_memory_region(region(1, 1 << 40, 4096, other))
                .unwrap()
        });
        std::thread::sleep(Duration::from_millis(30));
        assert!(
            !update.is_finished(),
            "invariant 2: a swap waited for the pair"
        );
        assert_eq!(
            f.vm.memslots(AsId::new(0)).unwrap().len(),
            1,
            "the new slot is not published yet"
        );
        blocker.hold.store(false, Ordering::SeqCst);
        inv.join().unwrap();
        update.join().unwrap();
    });
    assert_eq!(f.vm.memslots(AsId::new(0)).unwrap().len(), 2);
    assert!(f.vm.memslots_generation(AsId::new(0)).unwrap() > gen_before);
    let s = f.vm.stats();
    assert_eq!(
        (s.mn_active_invalidate_count, s.invalidate.in_progress),
        (0, 0)
    );
}

fn seq_counts_exactly_the_invalidations_that_hit_a_memslot(mmu: MmuKind) {
    let f = fixture(16 * 4096, base(mmu));
    // Memory no memslot maps.
    let stray = f.host.mmap(16 * 4096, Prot::READ | Prot::WRITE).unwrap();
    for p in 0..16 {
        f.host.write_u64(hva_of(f.hva, p), p).unwrap();
        f.host.write_u64(hva_of(stray, p), p).unwrap();
    }
    let seq0 = f.vm.stats().invalidate.seq;
    for p in 0..5 {
        f.host.madvise_dontneed(hva_of(stray, p), 4096).unwrap();
    }
    assert_eq!(
        f.vm.stats().invalidate.seq,
        seq0,
        "no memslot, no begin/end"
    );
    for p in 0..5 {
        f.host.madvise_dontneed(hva_of(f.hva, p), 4096).unwrap();
    }
    let s = f.vm.stats();
    assert_eq!(s.invalidate.seq, seq0 + 5, "invariant 4");
    assert_eq!(s.invalidate.in_progress, 0);
}

fn invalidation_pairs_balance_across_concurrent_memslot_updates(mmu: MmuKind) {
    // Invariant 3: start and end of each pair see the same memslots, so in_progress returns to 0
    // even while slots covering the invalidated memory come and go.
    let f = fixture(64 * 4096, base(mmu));
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let (vm, stop) = (&f.vm, &stop);
        let hva = f.hva;
        s.spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                vm.set_user_memory_region(region(1, 1 << 40, 32 * 4096, hva))
                    .unwrap();
                vm.set_user_memory_region(region(
                    1,
                    (1 << 40) + (i % 3) * (1 << 30),
                    32 * 4096,
                    hva,
                ))
                .unwrap();
                vm.set_user_memory_region(region(1, 0, 0, hva)).unwrap();
                i += 1;
            }
        });
        let host = &f.host;
        for i in 0..300u64 {
            let p = i % 32;
            host.write_u64(hva_of(f.hva, p), i).unwrap();
            host.madvise_dontneed(hva_of(f.hva, p), 4096).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
    });
    let s = f.vm.stats();
    assert_eq!(s.invalidate.in_progress, 0);
    assert_eq!(s.mn_active_invalidate_count, 0);
    assert_eq!(s.invalidate_starts, s.invalidate_ends);
}

fn aging_never_allocates_or_frees_page_tables(mmu: MmuKind) {
    let f = fixture(256 * 4096, base(mmu));
    let mut vcpu = f.vm.create_vcpu().unwrap();
    for p in 0..256 {
        vcpu.write_u64(gpa(p), p).unwrap();
    }
    let (before, sh_before) = (f.vm.stats().tdp, f.vm.stats().shadow);
    for _ in 0..20 {
        f.host.clear_young(f.hva, f.bytes).unwrap();
        f.host.test_young(f.hva).unwrap();
    }
    let (after, sh_after) = (f.vm.stats().tdp, f.vm.stats().shadow);
    assert_eq!(
        (
            sh_before.pages_allocated,
            sh_before.pages_freed,
            sh_before.leaves_zapped
        ),
        (
            sh_after.pages_allocated,
            sh_after.pages_freed,
            sh_after.leaves_zapped
        ),
        "shadow aging allocates, frees and zaps nothing"
    );
    assert_eq!(
        sh_before.rmap.desc_allocs, sh_after.rmap.desc_allocs,
        "aging never changes a chain"
    );
    assert_eq!(
        before.tables_allocated, after.tables_allocated,
        "spec §4 item 14"
    );
    assert_eq!(before.tables_freed, after.tables_freed, "spec §4 item 14");
    assert_eq!(
        before.leaves_zapped, after.leaves_zapped,
        "aging zaps nothing"
    );
    // And every translation is still there.
    for p in 0..256 {
        assert!(f.vm.spte(AsId::new(0), gpa(p).gfn()).is_some());
    }
}

#[test]
fn tdp_no_spte_survives_invalidate_range_start_for_the_range() {
    no_spte_survives_invalidate_range_start_for_the_range(MmuKind::Tdp);
}

#[test]
fn shadow_no_spte_survives_invalidate_range_start_for_the_range() {
    no_spte_survives_invalidate_range_start_for_the_range(MmuKind::Shadow);
}

#[test]
fn tdp_no_spte_is_installed_between_start_and_end_and_the_fault_completes_after() {
    no_spte_is_installed_between_start_and_end_and_the_fault_completes_after(MmuKind::Tdp);
}

#[test]
fn shadow_no_spte_is_installed_between_start_and_end_and_the_fault_completes_after() {
    no_spte_is_installed_between_start_and_end_and_the_fault_completes_after(MmuKind::Shadow);
}

#[test]
fn tdp_memslot_swap_waits_for_an_in_flight_invalidation() {
    memslot_swap_waits_for_an_in_flight_invalidation(MmuKind::Tdp);
}

#[test]
fn shadow_memslot_swap_waits_for_an_in_flight_invalidation() {
    memslot_swap_waits_for_an_in_flight_invalidation(MmuKind::Shadow);
}

#[test]
fn tdp_seq_counts_exactly_the_invalidations_that_hit_a_memslot() {
    seq_counts_exactly_the_invalidations_that_hit_a_memslot(MmuKind::Tdp);
}

#[test]
fn shadow_seq_counts_exactly_the_invalidations_that_hit_a_memslot() {
    seq_counts_exactly_the_invalidations_that_hit_a_memslot(MmuKind::Shadow);
}

#[test]
fn tdp_invalidation_pairs_balance_across_concurrent_memslot_updates() {
    invalidation_pairs_balance_across_concurrent_memslot_updates(MmuKind::Tdp);
}

#[test]
fn shadow_invalidation_pairs_balance_across_concurrent_memslot_updates() {
    invalidation_pairs_balance_across_concurrent_memslot_updates(MmuKind::Shadow);
}

#[test]
fn tdp_aging_never_allocates_or_frees_page_tables() {
    aging_never_allocates_or_frees_page_tables(MmuKind::Tdp);
}

#[test]
fn shadow_aging_never_allocates_or_frees_page_tables() {
    aging_never_allocates_or_frees_page_tables(MmuKind::Shadow);
}
