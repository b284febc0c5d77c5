//! A fault caches the leaf it installed in the faulting vCPU's TLB (docs/locking.md F2): the
//! access it retries hits instead of walking the new leaf again, the entry carries exactly what a
//! walk would have filled, and it is subject to remote TLB flushes like any other entry.
//!
//! Every loop is bounded by an iteration count.

mod common;

use common::{fixture, gpa, hva_of};
use kvmmu::prelude::*;

fn config(mmu: MmuKind) -> VmConfig {
    VmConfig {
        mmu,
        tlb_entries: 64,
        ..VmConfig::default()
    }
}

#[test]
fn a_tdp_fault_fills_the_tlb_so_its_retried_access_does_not_walk_again() {
    let f = fixture(16 * 4096, config(MmuKind::Tdp));
    let mut vcpu = f.vm.create_vcpu().expect("vcpu");
    let (t0, s0) = (vcpu.tlb_stats(), vcpu.stats());
    {
        let mut g = vcpu.enter();
        for p in 0..8 {
            g.write_u64(gpa(p), p + 7).expect("first write");
        }
    }
    let (t1, s1) = (vcpu.tlb_stats(), vcpu.stats());
    assert_eq!(s1.faults - s0.faults, 8, "one fault per fresh page");
    assert_eq!(
        s1.tlb_misses - s0.tlb_misses,
        8,
        "one walk per page: the miss that faulted"
    );
    assert_eq!(
        t1.inserts - t0.inserts,
        8,
        "one fill per page, from the fault"
    );
    assert_eq!(
        t1.hits - t0.hits,
        8,
        "the retried access hits the filled entry"
    );
    assert_eq!(s1.accesses - s0.accesses, 8);
    for p in 0..8 {
        assert_eq!(f.host.read_u64(hva_of(f.hva, p)).expect("host"), p + 7);
        let (spte, _) = f.vm.spte(AsId::new(0), gpa(p).gfn()).expect("mapped");
        assert!(
            spte.is_accessed() && spte.is_dirty(),
            "the installed leaf has what the fill claims"
        );
    }
    // A second write through the filled (writable, dirty) entry takes the fast path.
    {
        let mut g = vcpu.enter();
        g.write_u64(gpa(3), 99).expect("warm write");
    }
    assert_eq!(
        vcpu.stats().tlb_misses,
        s1.tlb_misses,
        "a warm write does not walk"
    );
    assert_eq!(f.host.read_u64(hva_of(f.hva, 3)).expect("host"), 99);
}

#[test]
fn a_read_fault_fills_a_clean_entry_and_the_first_write_still_walks_to_set_dirty() {
    let f = fixture(16 * 4096, config(MmuKind::Tdp));
    let mut vcpu = f.vm.create_vcpu().expect("vcpu");
    let s0 = vcpu.stats();
    {
        let mut g = vcpu.enter();
        assert_eq!(g.read_u64(gpa(5)).expect("read fault"), 0);
    }
    let s1 = vcpu.stats();
    assert_eq!(
        s1.tlb_misses - s0.tlb_misses,
        1,
        "the read walked once (the miss)"
    );
    let (spte, _) = f.vm.spte(AsId::new(0), gpa(5).gfn()).expect("mapped");
    assert!(!spte.is_dirty(), "a read fault installs a clean leaf");
    {
        let mut g = vcpu.enter();
        g.write_u64(gpa(5), 1).expect("write");
    }
    assert_eq!(
        vcpu.stats().tlb_misses - s1.tlb_misses,
        1,
        "the filled entry lacks Dirty, so the write re-walks and sets it"
    );
    let (spte, _) = f.vm.spte(AsId::new(0), gpa(5).gfn()).expect("mapped");
    assert!(spte.is_dirty(), "the re-walk set Dirty");
}

#[test]
fn a_filled_entry_is_dropped_by_a_flush_posted_while_the_vcpu_is_outside_guest_mode() {
    let f = fixture(16 * 4096, config(MmuKind::Tdp));
    let mut vcpu = f.vm.create_vcpu().expect("vcpu");
    vcpu.write_u64(gpa(2), 42).expect("fault and fill");
    // Outside guest mode now: the zap's flush does not wait for this vCPU, it posts a request
    // that its next entry takes, dropping the filled entry before any access.
    f.host
        .madvise_dontneed(hva_of(f.hva, 2), 4096)
        .expect("dontneed");
    let s0 = vcpu.stats();
    assert_eq!(
        vcpu.read_u64(gpa(2)).expect("read after the zap"),
        0,
        "the page was dropped: a fresh zero page, not the old frame through the filled entry"
    );
    let s1 = vcpu.stats();
    assert!(s1.tlb_flushes > s0.tlb_flushes, "the entry took the flush");
    assert_eq!(
        s1.faults - s0.faults,
        1,
        "the read faulted the page back in"
    );
}

#[test]
fn shadow_faults_keep_walking_the_installed_leaf() {
    let f = fixture(16 * 4096, config(MmuKind::Shadow));
    let mut vcpu = f.vm.create_vcpu().expect("vcpu");
    let s0 = vcpu.stats();
    vcpu.write_u64(gpa(1), 5).expect("write");
    let s1 = vcpu.stats();
    assert!(
        s1.tlb_misses - s0.tlb_misses >= 2,
        "no fill from the shadow MMU: the retry walks"
    );
    assert_eq!(f.host.read_u64(hva_of(f.hva, 1)).expect("host"), 5);
}
