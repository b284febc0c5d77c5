//! The A/D-disabled SPTE format's operations (`VmConfig::ad_bits = Disabled`; the kernel's
//! `mark_spte_for_access_track`, `restore_acc_track_spte` and the A/D-disabled branch of
//! `kvm_tdp_mmu_age_spte`): building such leaves, marking them for access tracking, restoring
//! them, and the lockless ager's one CAS. The bit layout and its invariant (spte.rs invariant 6)
//! live with the rest of the format in [`super::spte`], which re-exports these.

use crate::addr::{Level, Pfn};
use crate::sync::atomic::Ordering;

use super::spte::{
    ACC_TRACK_MASK, ACC_TRACK_SAVED_MASK, ACC_TRACK_SAVED_SHIFT, ACCESSED_MASK, AD_DISABLED_MASK,
    AtomicSpte, LeafAttrs, Spte, make_spte,
};

/// Whether the leaves an MMU builds use hardware Accessed/Dirty bits (`VmConfig::ad_bits`; the
/// kernel's `kvm_ad_enabled` / `spte_ad_enabled`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum AdBits {
    /// The CPU sets A and D; aging clears A with one atomic AND.
    #[default]
    Enabled,
    /// The CPU sets neither: aging marks leaves for access tracking (one CAS), the next access
    /// faults and the fast page fault restores the leaf; dirty logging write-protects.
    Disabled,
}

/// [`make_spte`] in the format `ad` selects. With [`AdBits::Disabled`] the leaf carries
/// [`AD_DISABLED_MASK`] and invariant 6 holds: A is set unless `prefetch`, and a prefetched leaf
/// starts marked for access tracking, as the kernel's `make_spte` does for such SPTEs.
pub fn make_spte_ad(pfn: Pfn, level: Level, attrs: LeafAttrs, ad: AdBits) -> Spte {
    let spte = make_spte(pfn, level, attrs);
    match ad {
        AdBits::Enabled => spte,
        AdBits::Disabled => {
            let spte = Spte::from_raw(spte.raw() | AD_DISABLED_MASK | ACCESSED_MASK);
            if attrs.prefetch {
                mark_for_access_track(spte)
            } else {
                spte
            }
        }
    }
}

/// The value aging gives a young A/D-disabled leaf (`mark_spte_for_access_track`): R and X saved
/// in bits 54/56, then R, W, X and A cleared. Pfn, bit 11, MMU-writable, host-writable and D are
/// kept. An A/D-enabled SPTE, a non-present one or one already marked is returned unchanged.
pub const fn mark_for_access_track(spte: Spte) -> Spte {
    if spte.ad_enabled() || !spte.is_shadow_present() || spte.is_access_tracked() {
        return spte;
    }
    let saved = (spte.raw() & ACC_TRACK_SAVED_MASK) << ACC_TRACK_SAVED_SHIFT;
    let cleared = spte.raw()
        & !(ACC_TRACK_MASK | ACCESSED_MASK | (ACC_TRACK_SAVED_MASK << ACC_TRACK_SAVED_SHIFT));
    Spte::from_raw(cleared | saved)
}

/// The inverse of [`mark_for_access_track`] (`restore_acc_track_spte`): R and X back from bits
/// 54/56, the saved copies cleared and A set. W is not restored (it was not saved): a write
/// afterwards needs MMU-writable to be made writable again. Any other SPTE is returned unchanged.
pub const fn restore_access_tracked(spte: Spte) -> Spte {
    if !spte.is_access_tracked() {
        return spte;
    }
    let saved_bits = ACC_TRACK_SAVED_MASK << ACC_TRACK_SAVED_SHIFT;
    let saved = (spte.raw() & saved_bits) >> ACC_TRACK_SAVED_SHIFT;
    Spte::from_raw((spte.raw() & !saved_bits) | saved | ACCESSED_MASK)
}

/// The leaf a locked fault installs over the access-tracked leaf `old`, given `fresh`, the leaf
/// `make_spte_ad` built for this fault: `fresh` if it is writable (a write the host allows, a
/// superset of `old`), else `old` restored, which keeps its MMU-writable bit (so losing it needs
/// no TLB flush, and the next write can still be fixed fast).
pub fn resolve_access_tracked(old: Spte, fresh: Spte) -> Spte {
    if fresh.is_writable() {
        fresh
    } else {
        restore_access_tracked(old)
    }
}

/// The lockless ager's one write to an A/D-disabled young leaf `old` (`kvm_tdp_mmu_age_spte` for
/// such SPTEs): one compare-and-swap to [`mark_for_access_track`]`(old)`, **not retried** on
/// failure (the racing change, a fast-path fix, a re-arm, a zap, is left as it is; the leaf most
/// likely stays young anyway). Returns the value the slot held before, with A cleared in the
/// returned copy if the CAS failed, so that "A set in the result" means "this call aged it", as it
/// does for the atomic AND of A/D-enabled leaves. A failed CAS changes nothing, so it can never
/// lose a concurrent Dirty or Writable update.
#[inline]
pub fn age_ad_disabled(sptep: &AtomicSpte, old: Spte) -> Spte {
    let new = mark_for_access_track(old);
    if new == old {
        return Spte::from_raw(old.raw() & !ACCESSED_MASK);
    }
    // ORDERING: O4 — like the AND it replaces, only atomicity matters: the whole-word compare is
    // what keeps any concurrent change (docs/locking.md "A/D-disabled aging" AD1).
    match sptep.compare_exchange(old, new, Ordering::Relaxed, Ordering::Relaxed) {
        Ok(prev) => prev,
        Err(actual) => Spte::from_raw(actual.raw() & !ACCESSED_MASK),
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::mmu::spte::WRITABLE_MASK;

    fn ad_disabled_leaf(write: bool) -> Spte {
        let attrs = LeafAttrs {
            host_writable: true,
            write_allowed: write,
            prefetch: false,
        };
        make_spte_ad(Pfn::new(0x1234), Level::L4K, attrs, AdBits::Disabled)
    }

    #[test]
    fn marking_for_access_tracking_saves_r_x_and_restoring_brings_them_back() {
        let s = ad_disabled_leaf(true);
        assert!(!s.ad_enabled() && s.is_accessed() && s.is_writable() && s.is_dirty());
        assert!(!s.is_access_tracked());
        let t = mark_for_access_track(s);
        assert!(t.is_access_tracked() && t.is_shadow_present());
        assert_eq!(t.raw() & (ACC_TRACK_MASK | ACCESSED_MASK), 0);
        assert_ne!(t.raw() & (1 << 54), 0, "R saved in bit 54");
        assert_ne!(t.raw() & (1 << 56), 0, "X saved in bit 56");
        assert_eq!(t.pfn(), s.pfn());
        assert!(t.is_mmu_writable() && t.is_host_writable() && t.is_dirty());
        assert_eq!(mark_for_access_track(t), t, "marking twice changes nothing");
        let r = restore_access_tracked(t);
        assert_eq!(
            r.raw(),
            s.raw() & !WRITABLE_MASK,
            "everything back but W, which was not saved"
        );
        assert!(r.writable_triple_is_valid() && t.writable_triple_is_valid());
        // A/D-enabled and non-present SPTEs are never marked.
        let e = make_spte(Pfn::new(1), Level::L4K, LeafAttrs::default());
        assert_eq!(mark_for_access_track(e), e);
        assert_eq!(mark_for_access_track(Spte::NONPRESENT), Spte::NONPRESENT);
        assert_eq!(mark_for_access_track(Spte::FROZEN), Spte::FROZEN);
        assert!(!Spte::FROZEN.is_access_tracked() && !Spte::NONPRESENT.is_access_tracked());
        // A prefetched A/D-disabled leaf starts marked, as in the kernel.
        let p = make_spte_ad(
            Pfn::new(3),
            Level::L4K,
            LeafAttrs {
                prefetch: true,
                ..LeafAttrs::default()
            },
            AdBits::Disabled,
        );
        assert!(p.is_access_tracked() && !p.is_accessed());
        assert!(ad_disabled_leaf(false).needs_atomic_update(Level::L4K));
        assert!(t.needs_atomic_update(Level::L4K));
    }

    #[test]
    fn a_lost_aging_cas_changes_nothing_and_reports_not_aged() {
        let s = ad_disabled_leaf(true);
        let slot = AtomicSpte::new(s);
        let prev = age_ad_disabled(&slot, s);
        assert!(prev.is_accessed(), "this call aged it");
        assert!(slot.load(Ordering::Relaxed).is_access_tracked());
        // A stale snapshot: the slot was changed (e.g. a fast-path restore) since.
        let now = restore_access_tracked(slot.load(Ordering::Relaxed));
        slot.store(now, Ordering::Relaxed);
        let prev = age_ad_disabled(&slot, s);
        assert!(!prev.is_accessed(), "the CAS lost: not aged by this call");
        assert_eq!(slot.load(Ordering::Relaxed), now, "and nothing changed");
    }
}
