//! [`RmapReadGuard`]: the read-only side of the bit lock (`kvm_rmap_lock_readonly` /
//! `kvm_rmap_unlock_readonly`), used by lockless aging. See the protocol in the parent module.

use core::fmt;
use core::ops::ControlFlow;

use super::{AgeAction, RMAP_LOCKED, RMAP_MANY, RmapHead, SptePtr, age_one, walk};
use crate::sync::atomic::Ordering;
use crate::sync::lock_rank::RankToken;

/// A read-only hold on an rmap's bit ([`RmapHead::lock_readonly`]); unlocks on drop.
///
/// Empty (holding nothing) when the rmap was empty. Not `Send`: the lock-rank registration belongs
/// to the locking thread.
pub struct RmapReadGuard<'a> {
    head: &'a RmapHead,
    /// The locked chain value (LOCKED clear), or 0 if nothing is locked.
    val: usize,
    _rank: Option<RankToken>,
}

impl fmt::Debug for RmapReadGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RmapReadGuard({:#x})", self.val)
    }
}

impl<'a> RmapReadGuard<'a> {
    /// Wraps the result of a read-only lock of `head` (`val` 0: nothing locked).
    pub(super) fn new(head: &'a RmapHead, val: usize, rank: Option<RankToken>) -> Self {
        RmapReadGuard {
            head,
            val,
            _rank: rank,
        }
    }

    /// The value `kvm_rmap_lock_readonly` returned: the chain (LOCKED clear), or 0 if nothing is
    /// locked.
    pub fn locked_value(&self) -> usize {
        self.val
    }

    /// True if the guard holds the bit (the rmap was not empty).
    pub fn is_locked(&self) -> bool {
        self.val != 0
    }

    /// Walks the locked chain (`for_each_rmap_spte_lockless`); `f` may stop the walk early.
    ///
    /// The chain is stable during the walk; the SPTE values are not (invariant 5): read each once.
    #[inline]
    pub fn for_each_spte(&self, f: impl FnMut(SptePtr) -> ControlFlow<()>) -> ControlFlow<()> {
        // SAFETY: we hold the bit (or `val` is 0 and nothing is walked); `val` is the chain value
        // the lock returned, unchanged while we hold the bit (invariant 6).
        unsafe { walk(self.val, f) }
    }

    /// The locked chain's only SPTE, if it holds exactly one (`None` when empty or a descriptor
    /// chain). The SPTE stays in the rmap, so its shadow page stays allocated, while the guard
    /// lives (invariant 5).
    #[inline]
    pub fn single(&self) -> Option<SptePtr> {
        // SAFETY: a nonzero value without MANY, published by a writer, is an `SptePtr` word
        // (invariant 1), and it is still in the rmap: we hold the bit (invariant 6).
        (self.val != 0 && self.val & RMAP_MANY == 0)
            .then(|| unsafe { SptePtr::from_word(self.val) })
    }

    /// Ages the locked chain with [`age_one`] (the loop body of `kvm_rmap_age_gfn_range`): returns
    /// true if a present SPTE was young; [`AgeAction::TestOnly`] stops at the first one.
    #[inline]
    pub fn age(&self, action: AgeAction, visited: &mut u64, cleared: &mut u64) -> bool {
        let mut young = false;
        let _ = self.for_each_spte(|sptep| age_one(sptep, action, &mut young, visited, cleared));
        young
    }

    /// `kvm_rmap_unlock_readonly`: restores the locked value; a no-op for an empty guard.
    #[inline]
    pub fn unlock(self) {
        drop(self);
    }
}

impl Drop for RmapReadGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        if self.val == 0 {
            return;
        }
        // ORDERING: Relaxed: we hold the bit, so only our own store could have changed the word.
        let cur = self.head.val.load(Ordering::Relaxed);
        if cur != self.val | RMAP_LOCKED && !std::thread::panicking() {
            panic!(
                "rmap invariant 6 broken: chain changed under a read-only lock \
                 (locked {:#x}, now {cur:#x})",
                self.val
            );
        }
        // ORDERING: Release: the unlock; pairs with the next locker's Acquire CAS (invariant 2).
        self.head.val.store(self.val, Ordering::Release);
    }
}
