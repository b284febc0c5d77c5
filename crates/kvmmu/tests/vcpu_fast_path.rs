//! The vCPU's translation fast path (`GuestMode::read_u64` / `write_u64` on a TLB hit with no
//! request pending) against the general path it short-cuts: the same counters, the same Dirty
//! handling, and remote invalidations still taken before the next access, on both MMUs.
//!
//! Every loop is bounded by an iteration count.

mod common;

use common::{fixture, gpa, hva_of};
use kvmmu::prelude::*;

const MMUS: [MmuKind; 2] = [MmuKind::Tdp, MmuKind::Shadow];

fn config(mmu: MmuKind, tlb_entries: usize) -> VmConfig {
    VmConfig {
        mmu,
        tlb_entries,
        ..VmConfig::default()
    }
}

#[test]
fn every_lookup_is_counted_once_and_only_misses_walk() {
    for mmu in MMUS {
        let f = fixture(128 * 4096, config(mmu, 64));
        let mut vcpu = f.vm.create_vcpu().expect("vcpu");
        {
            let mut g = vcpu.enter();
            for p in 0..16 {
                g.write_u64(gpa(p), p + 100).expect("populate");
            }
        }
        let (t0, s0) = (vcpu.tlb_stats(), vcpu.stats());
        {
            let mut g = vcpu.enter();
            for p in 0..16 {
                assert_eq!(g.read_u64(gpa(p)).expect("warm read"), p + 100, "{mmu:?}");
            }
        }
        let (t1, s1) = (vcpu.tlb_stats(), vcpu.stats());
        assert_eq!(t1.hits - t0.hits, 16, "{mmu:?}: warm reads are hits");
        assert_eq!(t1.misses, t0.misses, "{mmu:?}: no warm read missed");
        assert_eq!(s1.tlb_misses, s0.tlb_misses, "{mmu:?}: no warm read walked");
        assert_eq!(s1.accesses - s0.accesses, 16, "{mmu:?}");

        // 64 entries in 16 sets of 4 ways: gfns 16 apart share a set. Populate 128 pages, so set
        // 1 ends up holding pages 65, 81, 97 and 113, and pages 1, 17, 33, 49 were evicted.
        {
            let mut g = vcpu.enter();
            for p in 16..128 {
                g.write_u64(gpa(p), p).expect("populate the rest");
            }
        }
        let (t2, s2) = (vcpu.tlb_stats(), vcpu.stats());
        {
            let mut g = vcpu.enter();
            for p in [1u64, 17, 33, 49, 1] {
                assert_eq!(
                    g.read_u64(gpa(p)).expect("read"),
                    p + 100 * u64::from(p < 16)
                );
            }
        }
        let (t3, s3) = (vcpu.tlb_stats(), vcpu.stats());
        // Four evicted pages miss once each (a walk, no fault); the repeated read of page 1 hits.
        assert_eq!(t3.misses - t2.misses, 4, "{mmu:?}: one lookup per miss");
        assert_eq!(t3.hits - t2.hits, 1, "{mmu:?}");
        assert_eq!(
            s3.tlb_misses - s2.tlb_misses,
            4,
            "{mmu:?}: one walk per miss"
        );
        assert_eq!(s3.faults, s2.faults, "{mmu:?}: mapped pages do not fault");
        assert_eq!(s3.accesses - s2.accesses, 5, "{mmu:?}");
    }
}

#[test]
fn first_write_through_a_clean_entry_rewalks_to_set_dirty_then_hits() {
    for mmu in MMUS {
        let f = fixture(16 * 4096, config(mmu, 64));
        let mut vcpu = f.vm.create_vcpu().expect("vcpu");
        // Populate through the host so the vCPU's first access is a read (a clean TLB entry).
        f.host
            .write_u64(hva_of(f.hva, 3), 33)
            .expect("host populate");
        let s0 = vcpu.stats();
        let mut g = vcpu.enter();
        assert_eq!(g.read_u64(gpa(3)).expect("read"), 33, "{mmu:?}");
        g.write_u64(gpa(3), 34).expect("first write");
        g.write_u64(gpa(3), 35).expect("second write");
        assert_eq!(g.read_u64(gpa(3)).expect("read back"), 35, "{mmu:?}");
        drop(g);
        let s1 = vcpu.stats();
        // The read misses; the first write re-walks (the entry lacks Dirty, or write access on
        // the shadow MMU's read-only first mapping); the second write and the read hit.
        assert!(
            s1.tlb_misses - s0.tlb_misses >= 2,
            "{mmu:?}: the first write must not use the clean entry: {s0:?} -> {s1:?}"
        );
        let misses_after_first_write = s1.tlb_misses;
        let mut g = vcpu.enter();
        g.write_u64(gpa(3), 36).expect("dirty write");
        drop(g);
        assert_eq!(
            vcpu.stats().tlb_misses,
            misses_after_first_write,
            "{mmu:?}: a write through a writable, dirty entry takes the fast path"
        );
        let (spte, _) = f.vm.spte(AsId::new(0), gpa(3).gfn()).expect("mapped");
        assert!(spte.is_dirty(), "{mmu:?}: the re-walk set Dirty");
        assert_eq!(f.host.read_u64(hva_of(f.hva, 3)).expect("host"), 36);
    }
}

#[test]
fn an_invalidation_during_a_warm_guest_run_is_seen_by_the_next_access() {
    for mmu in MMUS {
        let f = fixture(16 * 4096, config(mmu, 64));
        let mut vcpu = f.vm.create_vcpu().expect("vcpu");
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let mut g = vcpu.enter();
            for p in 0..16 {
                g.write_u64(gpa(p), 7).expect("populate");
            }
            // The invalidator waits for this in-guest vCPU to acknowledge its TLB flush, which it
            // does at its next access: so it must run on another thread while we keep accessing.
            let invalidator = s.spawn(|| {
                f.host
                    .madvise_dontneed(hva_of(f.hva, 5), 4096)
                    .expect("dontneed");
                done.store(true, std::sync::atomic::Ordering::Release);
            });
            let mut finished = false;
            for _ in 0..50_000_000u64 {
                let v = g.read_u64(gpa(5)).expect("read during the invalidation");
                assert!(v == 7 || v == 0, "{mmu:?}: read {v}");
                if done.load(std::sync::atomic::Ordering::Acquire) {
                    finished = true;
                    break;
                }
            }
            assert!(finished, "{mmu:?}: the invalidation never completed");
            // The dropped page comes back zero-filled: the warm TLB entry was flushed.
            assert_eq!(g.read_u64(gpa(5)).expect("after"), 0, "{mmu:?}");
            assert_eq!(g.read_u64(gpa(6)).expect("untouched page"), 7, "{mmu:?}");
            drop(g);
            invalidator.join().expect("invalidator panicked");
        });
        assert!(
            vcpu.stats().tlb_flushes >= 1,
            "{mmu:?}: the flush was taken"
        );
        assert_eq!(f.host.arena().stats().stale_accesses, 0, "{mmu:?}");
    }
}
