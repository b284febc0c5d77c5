//! Aging: host young bits plus the secondary MMUs' accessed state (`ptep_clear_young_notify`,
//! `mmu_notifier_clear_young`, `mmu_notifier_test_young`), one subscriber call per range.
//!
//! Protocol: the host young bits of the range are cleared (one atomic AND per young PTE) under
//! `mmap_lock` read, the lock is dropped, and then every subscriber of one snapshot is called over
//! the whole range; the result is the OR of all of them. Invariants:
//! 1. Aging never changes a PTE's presence, frame or dirty bit (it only clears young), so it needs
//!    no invalidation and cannot lose a concurrent dirty update.
//! 2. No host lock is held while a subscriber is called (host invariant H7).

use super::HostError;
use super::mm::{Counters, HostMm, MMAP_MIN_ADDR, TASK_SIZE, check_mapped, page_range};
use super::notifier::MmuNotifier;
use super::vma::{page_hva, pte};
use crate::addr::Hva;
use crate::sync::atomic::Ordering;

impl HostMm {
    /// Clears the host young bits of a fully mapped range; true if any was set.
    fn clear_host_young(&self, hva: Hva, len: u64) -> Result<(Hva, Hva, bool), HostError> {
        let (s, e) = page_range(hva, len)?;
        let vmas = self.inner.mmap_lock.read();
        check_mapped(&vmas, s, e)?;
        let mut young = false;
        for v in vmas.overlapping(s, e) {
            for (_, w) in v.ptes(s, e) {
                // ORDERING: Relaxed: young is a hint; the AND clears only that bit, so a
                // concurrent dirty update is never lost.
                if w.load(Ordering::Relaxed) & pte::YOUNG != 0 {
                    w.fetch_and(!pte::YOUNG, Ordering::Relaxed);
                    young = true;
                }
            }
        }
        Ok((page_hva(s), page_hva(e), young))
    }

    fn age(
        &self,
        hva: Hva,
        len: u64,
        call: impl Fn(&dyn MmuNotifier, Hva, Hva) -> bool,
    ) -> Result<bool, HostError> {
        let (start, end, mut young) = self.clear_host_young(hva, len)?;
        let subs = self.inner.notifiers.snapshot();
        for (_, n) in subs.iter() {
            young |= call(&**n, start, end);
        }
        Counters::bump(&self.inner.counters.aging_calls, subs.len() as u64);
        Ok(young)
    }

    /// Clears the young state of `[hva, hva + len)` in the host PTEs and, with one call per
    /// subscriber over the whole range, in every secondary MMU; true if anything was young.
    /// Subscribers are called after the host bits are cleared, with no host lock held.
    ///
    /// Errors (nothing changed, nobody called): as [`HostMm::munmap`]'s range checks.
    pub fn clear_young(&self, hva: Hva, len: u64) -> Result<bool, HostError> {
        self.age(hva, len, |n, s, e| n.clear_young(s, e))
    }

    /// As [`HostMm::clear_young`], calling the subscribers' `clear_flush_young`.
    pub fn clear_flush_young(&self, hva: Hva, len: u64) -> Result<bool, HostError> {
        self.age(hva, len, |n, s, e| n.clear_flush_young(s, e))
    }

    /// True if the page containing `hva` is young in the host PTE or in any secondary MMU.
    /// Changes nothing. `hva` need not be aligned.
    ///
    /// Errors: [`HostError::OutOfRange`] outside the user address space, [`HostError::NotMapped`].
    pub fn test_young(&self, hva: Hva) -> Result<bool, HostError> {
        if hva.raw() < MMAP_MIN_ADDR || hva.raw() >= TASK_SIZE {
            return Err(HostError::OutOfRange { hva, len: 1 });
        }
        let page = hva.page();
        let mut young = {
            let vmas = self.inner.mmap_lock.read();
            let v = vmas.find(page).ok_or(HostError::NotMapped { hva })?;
            // ORDERING: Relaxed: a hint, read only.
            v.pte(page).load(Ordering::Relaxed) & pte::YOUNG != 0
        };
        let subs = self.inner.notifiers.snapshot();
        for (_, n) in subs.iter() {
            young |= n.test_young(hva);
        }
        Counters::bump(&self.inner.counters.aging_calls, subs.len() as u64);
        Ok(young)
    }
}
