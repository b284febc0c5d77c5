//! A/D-disabled leaves (`VmConfig::ad_bits = Disabled`): aging marks them for access tracking,
//! the next access faults and is fixed (fast page fault on TDP, the locked path on shadow), and
//! the aging answers are the ones A/D-enabled leaves give for the same accesses.

mod common;

use common::{BASE_GPA, fixture, gpa, region};
use kvmmu::prelude::*;

const PAGES: u64 = 256;

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

fn config(mmu: MmuKind, ad_bits: AdBits) -> VmConfig {
    VmConfig {
        mmu,
        ad_bits,
        // clear_flush_young flushes the TLBs of a young range, so every access of the next round
        // walks (or faults): the young set is then exactly the pages accessed.
        elide_tlb_flush_if_young: false,
        ..VmConfig::default()
    }
}

/// Runs `rounds` rounds of seeded random reads and writes, aging the whole slot with
/// `clear_flush_young_range`-like per-page answers after each; returns the young pages each
/// round's aging reported, and the pages each round accessed.
fn young_sets(mmu: MmuKind, ad_bits: AdBits, seed: u64) -> (Vec<Vec<u64>>, Vec<Vec<u64>>) {
    let f = fixture(PAGES * 4096, config(mmu, ad_bits));
    let mut vcpu = f.vm.create_vcpu().expect("vcpu");
    for p in 0..PAGES {
        vcpu.write_u64(gpa(p), p).expect("populate");
    }
    assert!(f.host.clear_flush_young(f.hva, f.bytes).expect("aging"));
    let mut rng = seed | 1;
    let (mut young, mut accessed) = (Vec::new(), Vec::new());
    for round in 0..6u64 {
        let mut touched = Vec::new();
        for p in 0..PAGES {
            if xorshift(&mut rng).is_multiple_of(3) {
                touched.push(p);
                if xorshift(&mut rng).is_multiple_of(2) {
                    vcpu.write_u64(gpa(p), (round << 32) | p).expect("write");
                } else {
                    assert_eq!(
                        vcpu.read_u64(gpa(p)).expect("read") & 0xffff_ffff,
                        p,
                        "a restored leaf maps the same frame"
                    );
                }
            }
        }
        let mut set = Vec::new();
        for p in 0..PAGES {
            let hva = common::hva_of(f.hva, p);
            if f.host.clear_flush_young(hva, 4096).expect("aging") {
                set.push(p);
            }
        }
        young.push(set);
        accessed.push(touched);
    }
    (young, accessed)
}

#[test]
fn ad_disabled_aging_reports_the_same_young_set_as_ad_enabled_aging() {
    for mmu in [MmuKind::Tdp, MmuKind::Shadow] {
        for seed in [1u64, 7, 42] {
            let (on, accessed) = young_sets(mmu, AdBits::Enabled, seed);
            let (off, accessed_off) = young_sets(mmu, AdBits::Disabled, seed);
            assert_eq!(accessed, accessed_off, "same access pattern");
            assert_eq!(
                on, off,
                "{mmu:?} seed {seed}: A/D-disabled young sets differ"
            );
            assert_eq!(
                off, accessed,
                "{mmu:?} seed {seed}: young set is exactly the pages accessed"
            );
        }
    }
}

#[test]
fn aging_marks_ad_disabled_leaves_for_access_tracking_and_the_next_access_restores_them() {
    for mmu in [MmuKind::Tdp, MmuKind::Shadow] {
        let f = fixture(16 * 4096, config(mmu, AdBits::Disabled));
        let mut vcpu = f.vm.create_vcpu().expect("vcpu");
        vcpu.write_u64(gpa(3), 33).expect("write");
        let gfn = gpa(3).gfn();
        let (s, _) = f.vm.spte(AsId::new(0), gfn).expect("mapped");
        assert!(!s.ad_enabled() && s.is_accessed() && s.is_writable() && s.is_dirty());
        assert!(f.host.clear_flush_young(f.hva, f.bytes).expect("aging"));
        let (t, _) = f.vm.spte(AsId::new(0), gfn).expect("still present");
        assert!(
            t.is_access_tracked() && !t.is_accessed() && !t.is_writable(),
            "{mmu:?}: {t:?}"
        );
        assert_eq!(t.pfn(), s.pfn(), "marking keeps the pfn");
        assert!(
            t.is_dirty() && t.is_mmu_writable(),
            "marking keeps D and MMU-W"
        );
        assert!(!f.host.test_young(common::hva_of(f.hva, 3)).expect("test"));
        let before = f.vm.stats();
        assert_eq!(vcpu.read_u64(gpa(3)).expect("read"), 33);
        let after = f.vm.stats();
        let (r, _) = f.vm.spte(AsId::new(0), gfn).expect("present");
        assert!(
            r.is_accessed() && r.is_readable() && !r.is_access_tracked(),
            "{r:?}"
        );
        assert_eq!(
            after.pf_fast,
            before.pf_fast + 1,
            "{mmu:?}: the fast page fault restores the leaf"
        );
        vcpu.write_u64(gpa(3), 34).expect("write after restore");
        let (w, _) = f.vm.spte(AsId::new(0), gfn).expect("present");
        assert!(w.is_writable() && w.is_dirty(), "{w:?}");
        assert_eq!(vcpu.read_u64(gpa(3)).expect("read"), 34);
    }
}

#[test]
fn d_bit_tracking_is_refused_without_ad_bits_and_changes_nothing() {
    let f = fixture(16 * 4096, config(MmuKind::Tdp, AdBits::Disabled));
    assert_eq!(
        f.vm.set_dirty_tracking(DirtyTracking::DBit),
        Err(DirtyLogError::DBitNeedsAdBits)
    );
    assert_eq!(f.vm.dirty_tracking(), DirtyTracking::WriteProtect);
}

#[test]
fn write_protect_logging_with_ad_disabled_reports_every_written_page() {
    for mmu in [MmuKind::Tdp, MmuKind::Shadow] {
        let f = fixture(PAGES * 4096, config(mmu, AdBits::Disabled));
        let mut r = region(0, BASE_GPA, f.bytes, f.hva);
        r.flags = MemFlags::LOG_DIRTY_PAGES;
        f.vm.set_user_memory_region(r).expect("enable logging");
        let mut vcpu = f.vm.create_vcpu().expect("vcpu");
        let mut rng = 5u64;
        for round in 0..4 {
            let mut written = vec![false; PAGES as usize];
            for p in 0..PAGES {
                match xorshift(&mut rng) % 4 {
                    0 => {
                        vcpu.write_u64(gpa(p), p + round).expect("write");
                        written[p as usize] = true;
                    }
                    1 => {
                        vcpu.read_u64(gpa(p)).expect("read");
                    }
                    _ => {}
                }
            }
            // Age between the writes and the harvest: marking a written leaf for access
            // tracking must not hide its write from the log.
            f.host.clear_young(f.hva, f.bytes).expect("aging");
            let words =
                f.vm.get_dirty_log(AsId::new(0), SlotId::new(0))
                    .expect("harvest");
            for p in 0..PAGES {
                let reported = words[(p / 64) as usize] & (1 << (p % 64)) != 0;
                if written[p as usize] {
                    assert!(
                        reported,
                        "{mmu:?} round {round}: page {p} written, not reported"
                    );
                }
            }
        }
    }
}
