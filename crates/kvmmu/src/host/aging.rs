//! Aging: host young bits plus the secondary MMUs' accessed state (`ptep_clear_young_notify`,
//! `mmu_notifier_clear_young`, `mmu_notifier_test_young`), one subscriber call per range.
//!
//! Protocol: the host young bits of the range are cleared (one atomic AND per young PTE) under
//! `mmap_lock` read, the lock is dropped, and then every subscriber of one snapshot is called over
//! the whole range; the result is the OR of all of them. [`HostMm::clear_young_range`] answers per
//! page: the host's young pages and every subscriber's
//! ([`MmuNotifier::clear_young_bitmap`]) are ORed into one [`YoungBitmap`]. Invariants:
//! 1. Aging never changes a PTE's presence, frame or dirty bit (it only clears young), so it needs
//!    no invalidation and cannot lose a concurrent dirty update.
//! 2. No host lock is held while a subscriber is called (host invariant H7).

use super::HostError;
use super::mm::{HostMm, MMAP_MIN_ADDR, TASK_SIZE, check_mapped, page_range};
use super::notifier::{MmuNotifier, YoungBitmap};
use super::vma::{page_hva, pte};
use crate::addr::{Hva, PAGE_SIZE};
use crate::sync::atomic::{AtomicU64, Ordering};
use core::ops::ControlFlow;

/// PTEs per cache line: the unit of the host aging pre-test.
const LINE: usize = 8;
/// PTEs (two cache lines) of the pre-test's fast path.
const BLOCK: usize = crate::sync::block_or::BLOCK;

impl HostMm {
    /// Clears the host young bits of a fully mapped range, calling `young` with the page number
    /// of each page that was young. On error nothing changed.
    #[inline]
    fn clear_host_young(
        &self,
        hva: Hva,
        len: u64,
        mut young: impl FnMut(u64),
    ) -> Result<(Hva, Hva), HostError> {
        let (s, e) = page_range(hva, len)?;
        let vmas = self.inner.mmap_lock.read();
        check_mapped(&vmas, s, e)?;
        // Only allocated leaves are visited: aging an untouched range reads a few directory
        // entries, whatever its length.
        let _ = vmas.pt.for_each_leaf(s, e, |first, ptes| {
            // Two cache lines of PTEs (16) are tested as a whole first, as a fixed-size block
            // (one load and OR per PTE: no per-PTE bounds test or branch), then each line
            // of a block with something young (and of a short tail) again: a line with nothing
            // young costs eight loads and one branch, and only young PTEs are written (the same
            // pre-test as the TDP ager's table scan).
            let mut i = 0;
            while i < ptes.len() {
                if let Some(block) = ptes
                    .get(i..i + BLOCK)
                    .and_then(|b| <&[AtomicU64; BLOCK]>::try_from(b).ok())
                {
                    // Young is a hint (a bit set just after the read is seen by the next
                    // pass); nothing is acted on from this OR (block_or invariant 2).
                    if crate::sync::block_or::or_block(block) & pte::YOUNG == 0 {
                        i += BLOCK;
                        continue;
                    }
                }
                let line = &ptes[i..(i + LINE).min(ptes.len())];
                // ORDERING: Relaxed: as above.
                let any = line
                    .iter()
                    .fold(0, |acc, w| acc | w.load(Ordering::Relaxed));
                if any & pte::YOUNG != 0 {
                    for (k, w) in line.iter().enumerate() {
                        // ORDERING: Relaxed: as above; the AND clears only that bit, so a
                        // concurrent dirty update is never lost.
                        if w.load(Ordering::Relaxed) & pte::YOUNG != 0 {
                            w.fetch_and(!pte::YOUNG, Ordering::Relaxed);
                            young(first + (i + k) as u64);
                        }
                    }
                }
                i += line.len();
            }
            ControlFlow::Continue(())
        });
        Ok((page_hva(s), page_hva(e)))
    }

    fn age(
        &self,
        hva: Hva,
        len: u64,
        call: impl Fn(&dyn MmuNotifier, Hva, Hva) -> bool,
    ) -> Result<bool, HostError> {
        crate::sync::guest_mode::check("host aging")?;
        let mut young = false;
        let (start, end) = self.clear_host_young(hva, len, |_| young = true)?;
        let called = self
            .inner
            .notifiers
            .for_each(|n| young |= call(n, start, end));
        self.inner.counters.aging_calls.add(called as u64);
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

    /// Clears the young state of `[hva, hva + len)` like [`HostMm::clear_young`], answering per
    /// page: bit `i` of the result is set if page `hva + i * PAGE_SIZE` was young in the host PTE
    /// or in any secondary MMU. One [`MmuNotifier::clear_young_bitmap`] call per subscriber over
    /// the whole range (an MGLRU aging pass over a range, not a call per page).
    ///
    /// Errors (nothing changed, nobody called): as [`HostMm::clear_young`].
    pub fn clear_young_range(&self, hva: Hva, len: u64) -> Result<YoungBitmap, HostError> {
        // Validate before allocating: a bad or unmapped range must not size the bitmap.
        let (s, e) = page_range(hva, len)?;
        check_mapped(&self.inner.mmap_lock.read(), s, e)?;
        let mut young = YoungBitmap::new(hva, len / PAGE_SIZE)?;
        self.clear_young_into(&mut young)?;
        Ok(young)
    }

    /// As [`HostMm::clear_young_range`] over `young`'s range, ORing into `young` (bits already set
    /// stay set), so a caller aging chunk after chunk reuses one bitmap
    /// ([`YoungBitmap::reset`]) and allocates nothing.
    ///
    /// Errors (nothing changed, nobody called): as [`HostMm::clear_young`] over
    /// `[young.start(), young.end())`; an empty bitmap is [`HostError::ZeroLength`].
    pub fn clear_young_into(&self, young: &mut YoungBitmap) -> Result<(), HostError> {
        crate::sync::guest_mode::check("host aging")?;
        let base = young.start().page();
        let len = young.pages() * PAGE_SIZE;
        self.clear_host_young(young.start(), len, |page| young.set_page(page - base))?;
        let called = self
            .inner
            .notifiers
            .for_each(|n| n.clear_young_bitmap(young));
        self.inner.counters.aging_calls.add(called as u64);
        Ok(())
    }

    /// True if the page containing `hva` is young in the host PTE or in any secondary MMU.
    /// Changes nothing. `hva` need not be aligned.
    ///
    /// Errors: [`HostError::OutOfRange`] outside the user address space, [`HostError::NotMapped`].
    pub fn test_young(&self, hva: Hva) -> Result<bool, HostError> {
        crate::sync::guest_mode::check("host aging")?;
        if hva.raw() < MMAP_MIN_ADDR || hva.raw() >= TASK_SIZE {
            return Err(HostError::OutOfRange { hva, len: 1 });
        }
        let page = hva.page();
        let mut young = {
            let vmas = self.inner.mmap_lock.read();
            vmas.find(page).ok_or(HostError::NotMapped { hva })?;
            // ORDERING: Relaxed: a hint, read only.
            vmas.pt
                .entry(page)
                .is_some_and(|w| w.load(Ordering::Relaxed) & pte::YOUNG != 0)
        };
        let called = self
            .inner
            .notifiers
            .for_each(|n| young |= n.test_young(hva));
        self.inner.counters.aging_calls.add(called as u64);
        Ok(young)
    }
}

#[cfg(test)]
mod tests {
    use crate::addr::{Hva, PAGE_SIZE};
    use crate::host::{HostConfig, HostError, HostMm, Prot};

    fn page(base: Hva, p: u64) -> Hva {
        Hva::new(base.raw() + p * PAGE_SIZE)
    }

    #[test]
    fn clear_young_range_reports_host_young_pages_and_clears_them() {
        let host = HostMm::new(HostConfig { frames: 64 }).unwrap();
        let hva = host.mmap(10 * PAGE_SIZE, Prot::READ | Prot::WRITE).unwrap();
        for p in [1, 4, 9] {
            host.write_u64(page(hva, p), p).unwrap();
        }
        let young = host.clear_young_range(hva, 10 * PAGE_SIZE).unwrap();
        assert_eq!(young.young_pages().collect::<Vec<_>>(), vec![1, 4, 9]);
        for p in 0..10 {
            assert!(!host.test_young(page(hva, p)).unwrap(), "page {p} is old");
        }
        host.read_u64(page(hva, 4)).unwrap();
        let young = host.clear_young_range(page(hva, 2), 4 * PAGE_SIZE).unwrap();
        assert_eq!(young.young_pages().collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn clear_young_range_validates_before_touching_anything() {
        let host = HostMm::new(HostConfig { frames: 16 }).unwrap();
        let hva = host.mmap(2 * PAGE_SIZE, Prot::READ | Prot::WRITE).unwrap();
        host.write_u64(hva, 1).unwrap();
        assert!(matches!(
            host.clear_young_range(hva, 0),
            Err(HostError::ZeroLength)
        ));
        assert!(matches!(
            host.clear_young_range(hva, 3 * PAGE_SIZE),
            Err(HostError::NotMapped { .. })
        ));
        assert!(matches!(
            host.clear_young_range(hva, !(PAGE_SIZE - 1)),
            Err(HostError::Overflow { .. } | HostError::OutOfRange { .. })
        ));
        assert!(host.test_young(hva).unwrap(), "a failed call aged nothing");
    }
}
