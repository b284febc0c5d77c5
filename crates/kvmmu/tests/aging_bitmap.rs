//! Per-page aging over a range (`HostMm::clear_young_range`, the `clear_young_bitmap` notifier):
//! the bitmap says exactly which pages were young (host PTE or any secondary MMU), leaves every
//! page old, ORs aliased memslots into one bit, skips holes, agrees with the bool-returning
//! `clear_young`, refuses bad input without changing anything, and lets `LruGen::age` make one
//! notifier call per chunk instead of one per page. Run for TDP and shadow, lockless and locked.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};

use common::*;
use kvmmu::internals::host::{
    AGING_CHUNK_PAGES, HostError, LruGen, MmuNotifier, NotifierRange, YoungBitmap,
};
use kvmmu::internals::sync::Arc;
use kvmmu::prelude::*;

const PAGE: u64 = 4096;

fn configs() -> Vec<VmConfig> {
    let mut v = Vec::new();
    for mmu in [MmuKind::Tdp, MmuKind::Shadow] {
        for aging in [AgingMode::Lockless, AgingMode::Locked] {
            v.push(VmConfig {
                mmu,
                aging,
                ..VmConfig::default()
            });
        }
    }
    v
}

/// The guest's pattern: which pages a fresh vCPU touches.
fn touched(p: u64) -> bool {
    p.is_multiple_of(3) || p == 7 || (40..45).contains(&p)
}

/// Guest-writes every page, then clears every young bit (host and VM), so that only what is
/// touched afterwards is young.
fn populated_then_old(config: VmConfig, pages: u64) -> Fixture {
    let f = fixture(pages * PAGE, config);
    let mut vcpu = f.vm.create_vcpu().unwrap();
    for p in 0..pages {
        vcpu.write_u64(gpa(p), p + 1).unwrap();
    }
    f.host.clear_young(f.hva, f.bytes).unwrap();
    f
}

/// A fresh vCPU (empty TLB, so every access walks and sets Accessed) reads the touched pages.
fn touch(f: &Fixture, pages: u64, pattern: impl Fn(u64) -> bool) {
    let mut vcpu = f.vm.create_vcpu().unwrap();
    for p in (0..pages).filter(|&p| pattern(p)) {
        assert_eq!(vcpu.read_u64(gpa(p)).unwrap(), p + 1);
    }
}

fn test_young_pages(host: &HostMm, hva: Hva, pages: u64) -> Vec<u64> {
    (0..pages)
        .filter(|&p| host.test_young(hva_of(hva, p)).unwrap())
        .collect()
}

#[test]
fn bitmap_equals_per_page_test_young_and_leaves_every_page_old() {
    const PAGES: u64 = 72;
    for config in configs() {
        let what = format!("{:?} {:?}", config.mmu, config.aging);
        let f = populated_then_old(config, PAGES);
        assert!(test_young_pages(&f.host, f.hva, PAGES).is_empty(), "{what}");
        touch(&f, PAGES, touched);
        // A host-side access too: the host PTE's young bit is part of the answer.
        f.host.read_u64(hva_of(f.hva, 71)).unwrap();
        let before = test_young_pages(&f.host, f.hva, PAGES);
        let mut expected: Vec<u64> = (0..PAGES).filter(|&p| touched(p)).collect();
        expected.push(71);
        assert_eq!(
            before, expected,
            "{what}: the pattern is what test_young sees"
        );

        let cleared_before =
            f.vm.stats().tdp.accessed_cleared + f.vm.stats().shadow.accessed_cleared;
        let young = f.host.clear_young_range(f.hva, f.bytes).unwrap();
        assert_eq!((young.start(), young.pages()), (f.hva, PAGES), "{what}");
        assert_eq!(young.young_pages().collect::<Vec<_>>(), before, "{what}");
        let s = f.vm.stats();
        assert_eq!(
            s.tdp.accessed_cleared + s.shadow.accessed_cleared - cleared_before,
            (0..PAGES).filter(|&p| touched(p)).count() as u64,
            "{what}: one Accessed bit cleared per guest-touched page"
        );
        assert!(
            test_young_pages(&f.host, f.hva, PAGES).is_empty(),
            "{what}: every page is old after the call"
        );
        assert!(
            !f.host.clear_young_range(f.hva, f.bytes).unwrap().any(),
            "{what}"
        );
    }
}

#[test]
fn bitmap_of_a_sub_range_reports_only_its_pages() {
    const PAGES: u64 = 64;
    for config in configs() {
        let what = format!("{:?} {:?}", config.mmu, config.aging);
        let f = populated_then_old(config, PAGES);
        touch(&f, PAGES, |p| p % 2 == 1);
        // Pages [10, 20): bit i is page 10 + i.
        let young = f
            .host
            .clear_young_range(hva_of(f.hva, 10), 10 * PAGE)
            .unwrap();
        let expected: Vec<u64> = (0..10).filter(|i| (10 + i) % 2 == 1).collect();
        assert_eq!(young.young_pages().collect::<Vec<_>>(), expected, "{what}");
        let still: Vec<u64> = (0..PAGES)
            .filter(|p| p % 2 == 1 && !(10..20).contains(p))
            .collect();
        assert_eq!(
            test_young_pages(&f.host, f.hva, PAGES),
            still,
            "{what}: pages outside the range keep their young state"
        );
    }
}

#[test]
fn bool_clear_young_agrees_with_any_bit_set() {
    const PAGES: u64 = 48;
    let ranges = [(0, PAGES), (1, 2), (2, 1), (4, 2), (8, 32), (41, 7)];
    for config in configs() {
        let what = format!("{:?} {:?}", config.mmu, config.aging);
        let f = populated_then_old(config, PAGES);
        // Guest touches only pages 1, 9 and 44: some ranges hold none.
        let pattern = |p: u64| [1, 9, 44].contains(&p);
        for (first, n) in ranges {
            let (hva, len) = (hva_of(f.hva, first), n * PAGE);
            touch(&f, PAGES, pattern);
            let any = f.host.clear_young(hva, len).unwrap();
            f.host.clear_young(f.hva, f.bytes).unwrap();
            touch(&f, PAGES, pattern);
            let bits = f.host.clear_young_range(hva, len).unwrap();
            f.host.clear_young(f.hva, f.bytes).unwrap();
            assert_eq!(any, bits.any(), "{what}: pages [{first}, {})", first + n);
            assert_eq!(
                any,
                (first..first + n).any(pattern),
                "{what}: pages [{first}, {})",
                first + n
            );
        }
    }
}

#[test]
fn aliased_memslots_or_into_the_same_bit() {
    const PAGES: u64 = 16;
    const ALIAS_GPA: u64 = 1 << 33;
    for config in configs() {
        let what = format!("{:?} {:?}", config.mmu, config.aging);
        let f = populated_then_old(config, PAGES);
        // Slot 1 maps the same host pages at another guest address.
        f.vm.set_user_memory_region(region(1, ALIAS_GPA, f.bytes, f.hva))
            .unwrap();
        let alias = |p: u64| Gpa::new(ALIAS_GPA + p * PAGE);
        let mut vcpu = f.vm.create_vcpu().unwrap();
        vcpu.read_u64(gpa(2)).unwrap(); // through slot 0 only
        assert_eq!(vcpu.read_u64(alias(5)).unwrap(), 6); // through slot 1 only
        vcpu.read_u64(gpa(9)).unwrap(); // through both
        vcpu.read_u64(alias(9)).unwrap();
        f.host.clear_young(f.hva, f.bytes).unwrap();
        let mut vcpu = f.vm.create_vcpu().unwrap();
        vcpu.read_u64(gpa(2)).unwrap();
        vcpu.read_u64(alias(5)).unwrap();
        vcpu.read_u64(gpa(9)).unwrap();
        vcpu.read_u64(alias(9)).unwrap();
        let cleared_before =
            f.vm.stats().tdp.accessed_cleared + f.vm.stats().shadow.accessed_cleared;
        let young = f.host.clear_young_range(f.hva, f.bytes).unwrap();
        assert_eq!(
            young.young_pages().collect::<Vec<_>>(),
            vec![2, 5, 9],
            "{what}"
        );
        let s = f.vm.stats();
        assert_eq!(
            s.tdp.accessed_cleared + s.shadow.accessed_cleared - cleared_before,
            4,
            "{what}: both aliases of page 9 were aged"
        );
        assert!(test_young_pages(&f.host, f.hva, PAGES).is_empty(), "{what}");
    }
}

#[test]
fn holes_without_a_memslot_or_a_mapping_report_only_host_young_bits() {
    const PAGES: u64 = 32;
    for config in configs() {
        let what = format!("{:?} {:?}", config.mmu, config.aging);
        let host = HostMm::new(HostConfig { frames: 256 }).unwrap();
        let vm = Vm::new(&host, config).unwrap();
        let hva = host.mmap(PAGES * PAGE, Prot::READ | Prot::WRITE).unwrap();
        // Slot 0: host pages [0, 8) at BASE_GPA; slot 1: host pages [16, 24) at BASE_GPA + 8 pages.
        // Pages [8, 16) and [24, 32) have no memslot.
        vm.set_user_memory_region(region(0, BASE_GPA, 8 * PAGE, hva))
            .unwrap();
        vm.set_user_memory_region(region(1, BASE_GPA + 8 * PAGE, 8 * PAGE, hva_of(hva, 16)))
            .unwrap();
        let host_page = |g: u64| if g < 8 { g } else { g + 8 };
        let mut vcpu = vm.create_vcpu().unwrap();
        for g in [0, 3, 9, 15] {
            vcpu.write_u64(gpa(g), g).unwrap();
        }
        host.write_u64(hva_of(hva, 12), 1).unwrap(); // in the hole: host young only
        host.clear_young(hva, PAGES * PAGE).unwrap();
        let mut vcpu = vm.create_vcpu().unwrap();
        for g in [3, 9] {
            assert_eq!(vcpu.read_u64(gpa(g)).unwrap(), g);
        }
        host.read_u64(hva_of(hva, 12)).unwrap();
        // Pages 0 and 15 (gfn 0 and 15 → host 0 and 23) are mapped but old; 1, 2, ... never
        // faulted in; 12 has no memslot; 28 is mapped by the host only and never touched.
        let young = host.clear_young_range(hva, PAGES * PAGE).unwrap();
        let mut expected = vec![host_page(3), host_page(9), 12];
        expected.sort_unstable();
        assert_eq!(young.young_pages().collect::<Vec<_>>(), expected, "{what}");
        assert!(test_young_pages(&host, hva, PAGES).is_empty(), "{what}");
    }
}

/// Counts notifier calls; reports nothing young. Every counter is Relaxed: the host calls its
/// subscribers on the calling thread, and the test reads the counters on that same thread.
#[derive(Default)]
struct Counting {
    clear_young: AtomicU64,
    bitmap: AtomicU64,
    bitmap_pages: AtomicU64,
}

impl MmuNotifier for Counting {
    fn invalidate_range_start(&self, _: &NotifierRange) {}
    fn invalidate_range_end(&self, _: &NotifierRange) {}
    fn clear_flush_young(&self, start: Hva, end: Hva) -> bool {
        self.clear_young(start, end)
    }
    fn clear_young(&self, _: Hva, _: Hva) -> bool {
        // ORDERING: Relaxed: see the struct doc (same-thread counters).
        self.clear_young.fetch_add(1, Ordering::Relaxed);
        false
    }
    fn clear_young_bitmap(&self, young: &mut YoungBitmap) {
        // ORDERING: Relaxed: see the struct doc (same-thread counters).
        self.bitmap.fetch_add(1, Ordering::Relaxed);
        self.bitmap_pages
            .fetch_add(young.pages(), Ordering::Relaxed);
    }
    fn test_young(&self, _: Hva) -> bool {
        false
    }
    fn release(&self) {}
}

/// Reports the pages in its list young, through the default (per-page) `clear_young_bitmap`.
struct YoungAt(Vec<Hva>);

impl MmuNotifier for YoungAt {
    fn invalidate_range_start(&self, _: &NotifierRange) {}
    fn invalidate_range_end(&self, _: &NotifierRange) {}
    fn clear_flush_young(&self, start: Hva, end: Hva) -> bool {
        self.clear_young(start, end)
    }
    fn clear_young(&self, start: Hva, end: Hva) -> bool {
        self.0.iter().any(|&h| h >= start && h < end)
    }
    fn test_young(&self, addr: Hva) -> bool {
        self.0.contains(&addr)
    }
    fn release(&self) {}
}

#[test]
fn every_subscriber_is_ored_in_including_one_using_the_default_method() {
    const PAGES: u64 = 16;
    let f = populated_then_old(VmConfig::default(), PAGES);
    f.host
        .register_notifier(Arc::new(YoungAt(vec![hva_of(f.hva, 4), hva_of(f.hva, 11)])));
    touch(&f, PAGES, |p| p == 1 || p == 4);
    let young = f.host.clear_young_range(f.hva, f.bytes).unwrap();
    assert_eq!(young.young_pages().collect::<Vec<_>>(), vec![1, 4, 11]);
}

#[test]
fn lru_gen_age_makes_one_notifier_call_per_chunk_not_per_page() {
    // Not a multiple of the chunk: the last chunk is partial.
    let pages = 2 * AGING_CHUNK_PAGES + 100;
    for config in configs() {
        let what = format!("{:?} {:?}", config.mmu, config.aging);
        let f = fixture(pages * PAGE, config);
        let counting = Arc::new(Counting::default());
        f.host.register_notifier(counting.clone());
        let mut vcpu = f.vm.create_vcpu().unwrap();
        for p in (0..pages).step_by(5) {
            vcpu.write_u64(gpa(p), p + 1).unwrap();
        }
        let mut lru = LruGen::new(&f.host, f.hva, f.bytes).unwrap();
        let vm_calls = f.vm.stats().age_calls;
        let pass = lru.age().unwrap();
        let resident = pages.div_ceil(5);
        assert_eq!((pass.resident, pass.young), (resident, resident), "{what}");
        let chunks = pages.div_ceil(AGING_CHUNK_PAGES);
        assert_eq!(counting.bitmap.load(Ordering::Relaxed), chunks, "{what}");
        assert_eq!(
            counting.bitmap_pages.load(Ordering::Relaxed),
            pages,
            "{what}"
        );
        assert_eq!(counting.clear_young.load(Ordering::Relaxed), 0, "{what}");
        assert_eq!(
            f.vm.stats().age_calls - vm_calls,
            chunks,
            "{what}: the VM walks once per chunk"
        );

        // Generations as before: a guest access moves exactly the touched pages.
        touch_lru(&f, &[0, 5, pages - 1 - (pages - 1) % 5]);
        let pass = lru.age().unwrap();
        assert_eq!((pass.generation, pass.young), (2, 3), "{what}");
        assert_eq!(lru.histogram(), vec![0, resident - 3, 3], "{what}");
        assert_eq!(
            counting.bitmap.load(Ordering::Relaxed),
            2 * chunks,
            "{what}"
        );
    }
}

fn touch_lru(f: &Fixture, pages: &[u64]) {
    let mut vcpu = f.vm.create_vcpu().unwrap();
    for &p in pages {
        assert_eq!(vcpu.read_u64(gpa(p)).unwrap(), p + 1);
    }
}

/// Whether an error is the expected variant.
type ErrorCheck = fn(&HostError) -> bool;

#[test]
fn bad_ranges_are_typed_errors_that_change_nothing_and_call_nobody() {
    const PAGES: u64 = 8;
    for config in configs() {
        let what = format!("{:?} {:?}", config.mmu, config.aging);
        let f = populated_then_old(config, PAGES);
        let counting = Arc::new(Counting::default());
        f.host.register_notifier(counting.clone());
        touch(&f, PAGES, |p| p < 4);
        let young_before = test_young_pages(&f.host, f.hva, PAGES);
        assert_eq!(young_before, vec![0, 1, 2, 3], "{what}");
        let cases: [(Hva, u64, ErrorCheck); 6] = [
            (f.hva, 0, |e| matches!(e, HostError::ZeroLength)),
            (Hva::new(f.hva.raw() + 8), PAGE, |e| {
                matches!(e, HostError::Unaligned { .. })
            }),
            (f.hva, PAGE + 8, |e| {
                matches!(e, HostError::Unaligned { .. })
            }),
            (Hva::new(0), PAGE, |e| {
                matches!(e, HostError::OutOfRange { .. })
            }),
            (Hva::new(!(PAGE - 1)), 2 * PAGE, |e| {
                matches!(e, HostError::Overflow { .. })
            }),
            // One page past the mapping.
            (f.hva, f.bytes + PAGE, |e| {
                matches!(e, HostError::NotMapped { .. })
            }),
        ];
        for (hva, len, is_expected) in cases {
            let err = f.host.clear_young_range(hva, len).unwrap_err();
            assert!(is_expected(&err), "{what}: {hva}+{len:#x} gave {err:?}");
        }
        // The reusable form refuses an empty bitmap the same way.
        let mut empty = YoungBitmap::new(f.hva, 0).unwrap();
        assert!(matches!(
            f.host.clear_young_into(&mut empty),
            Err(HostError::ZeroLength)
        ));
        assert_eq!(
            counting.bitmap.load(Ordering::Relaxed),
            0,
            "{what}: nobody called"
        );
        assert_eq!(
            test_young_pages(&f.host, f.hva, PAGES),
            young_before,
            "{what}: nothing aged"
        );
    }
}

#[test]
fn range_aging_racing_guest_writes_and_invalidations_loses_no_data() {
    const PAGES: u64 = 32;
    const ROUNDS: u64 = 40;
    for config in configs() {
        let what = format!("{:?} {:?}", config.mmu, config.aging);
        let f = populated_then_old(config, PAGES);
        let mut vcpu = f.vm.create_vcpu().unwrap();
        std::thread::scope(|s| {
            let writer = s.spawn(move || {
                for round in 1..=ROUNDS {
                    for p in 0..PAGES {
                        // A write that lands while the host has the range read-only exits; retry
                        // (bounded) until the host makes it writable again.
                        let mut tries = 0;
                        while let Err(e) = vcpu.write_u64(gpa(p), round * 1000 + p) {
                            assert!(
                                matches!(e, VcpuExit::HostFault { .. }) && tries < 1_000_000,
                                "{e:?} after {tries} tries"
                            );
                            tries += 1;
                            std::thread::yield_now();
                        }
                    }
                }
                vcpu
            });
            for i in 0..ROUNDS {
                let young = f.host.clear_young_range(f.hva, f.bytes).unwrap();
                assert!(young.count() <= PAGES, "{what}");
                if i % 8 == 0 {
                    // Zap every SPTE between two aging calls (invalidate start/end).
                    f.host.mprotect(f.hva, f.bytes, Prot::READ).unwrap();
                    f.host
                        .mprotect(f.hva, f.bytes, Prot::READ | Prot::WRITE)
                        .unwrap();
                }
            }
            assert!(
                f.vm.stats().invalidate_starts >= 2 * ROUNDS / 8,
                "{what}: the invalidations ran"
            );
            let mut vcpu = writer.join().unwrap();
            for p in 0..PAGES {
                assert_eq!(vcpu.read_u64(gpa(p)).unwrap(), ROUNDS * 1000 + p, "{what}");
            }
        });
    }
}
