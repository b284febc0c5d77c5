//! Idle page tracking (`/sys/kernel/mm/page_idle/bitmap`, `mm/page_idle.c`): one idle flag per
//! frame, read and written through a host virtual address.
//!
//! Protocol (spec §5.2, as `access_tracking_perf_test` uses it):
//! - **Read** ([`PageIdle::read`]): look up the frame backing the page (`/proc/self/pagemap`); if
//!   its idle flag is set, clear the young state of every mapping of the page — the host PTE and,
//!   through the `clear_young` notifier, every secondary MMU — and if anything was young, clear the
//!   idle flag. Report the idle flag as it is afterwards.
//! - **Write** ([`PageIdle::mark_idle`]): clear the young state of every mapping the same way, then
//!   set the idle flag.
//!
//! A huge page is one folio: its flag is its head (first) frame's, and its young state is cleared
//! over its whole range. Only the head page is tracked: reading a tail page of a huge page reports
//! it not idle and marking one does nothing (`page_idle_get_folio` refuses tail pages), so a
//! caller that reads then marks page by page (the selftest) sees each huge page once, through its
//! head, instead of finding every tail idle because the mark of a page before it in the same
//! folio had just cleared the folio's young state.
//!
//! Invariants:
//! 1. The flags are indexed by frame (pfn), like the kernel's folio flag: a page that is freed and
//!    faulted in again lands on another frame whose flag says nothing about the old one.
//! 2. A flag is only a hint: a frame may be freed and reused between the lookup and the flag
//!    update (the kernel has the same race); nothing else depends on it, so every flag access is
//!    a relaxed atomic.
//! 3. No host lock is held while the flags are touched or a subscriber is called (host H7).

use super::{HostError, HostMm};
use crate::addr::{Hva, PAGE_SIZE};
use crate::sync::atomic::{AtomicU64, Ordering};

/// What reading a page's idle flag found.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum IdleState {
    /// No frame backs the page (the pagemap entry has no pfn).
    NoPfn,
    /// The idle flag is still set: nothing accessed the page since it was marked.
    Idle,
    /// The page is not idle: never marked, or accessed since.
    NotIdle,
}

/// The idle flags of every frame of a host's arena.
pub struct PageIdle {
    host: HostMm,
    bits: Box<[AtomicU64]>,
}

impl core::fmt::Debug for PageIdle {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("PageIdle")
            .field("frames", &(self.bits.len() * 64))
            .finish()
    }
}

impl PageIdle {
    /// Idle flags for every frame of `host`'s arena, all clear.
    pub fn new(host: &HostMm) -> PageIdle {
        let words = host.arena().capacity().div_ceil(64);
        PageIdle {
            host: host.clone(),
            bits: (0..words).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn slot(&self, pfn: u64) -> (&AtomicU64, u64) {
        let i = usize::try_from(pfn / 64).unwrap_or(usize::MAX);
        match self.bits.get(i) {
            Some(w) => (w, 1 << (pfn % 64)),
            None => {
                panic!("host invariant H2 violated: present PTE names pfn {pfn} outside the arena")
            }
        }
    }

    /// The folio backing the page of `hva` — its first frame, first address and size (a huge
    /// page is one folio: one idle flag, one young state, as `folio_test_idle` sees it) — or
    /// `None` when no frame backs the page. `Some(None)`: the page is a tail page of a huge
    /// folio, which page-idle does not track (module doc).
    #[allow(clippy::type_complexity)]
    fn folio_of(&self, hva: Hva) -> Result<Option<Option<(u64, Hva, u64)>>, HostError> {
        match self.host.host_pte(hva) {
            None => Err(HostError::NotMapped { hva }),
            Some(p) if p.present => {
                let pages = p.level.pages();
                let index = hva.page() & (pages - 1);
                if index != 0 {
                    return Ok(Some(None));
                }
                Ok(Some(Some((p.pfn.raw(), hva, pages * PAGE_SIZE))))
            }
            Some(_) => Ok(None),
        }
    }

    /// Reads the idle flag of the page of `hva` (see the module doc for the read semantics).
    ///
    /// Errors: [`HostError::NotMapped`], and the range errors of [`HostMm::clear_young`].
    pub fn read(&self, hva: Hva) -> Result<IdleState, HostError> {
        let Some(folio) = self.folio_of(hva)? else {
            return Ok(IdleState::NoPfn);
        };
        let Some((pfn, head, len)) = folio else {
            return Ok(IdleState::NotIdle);
        };
        let (word, bit) = self.slot(pfn);
        // ORDERING: Relaxed: idle flags are hints ordered by nothing (invariant 2).
        if word.load(Ordering::Relaxed) & bit == 0 {
            return Ok(IdleState::NotIdle);
        }
        if self.host.clear_young(head, len)? {
            // ORDERING: Relaxed: invariant 2.
            word.fetch_and(!bit, Ordering::Relaxed);
            return Ok(IdleState::NotIdle);
        }
        Ok(IdleState::Idle)
    }

    /// Marks the page of `hva` idle: clears its young state everywhere, then sets its idle flag.
    /// Returns false (and changes nothing) if no frame backs the page; a tail page of a huge page
    /// is backed but not tracked: true, nothing changed (module doc).
    ///
    /// Errors: as [`PageIdle::read`].
    pub fn mark_idle(&self, hva: Hva) -> Result<bool, HostError> {
        let Some(folio) = self.folio_of(hva)? else {
            return Ok(false);
        };
        let Some((pfn, head, len)) = folio else {
            return Ok(true);
        };
        self.host.clear_young(head, len)?;
        let (word, bit) = self.slot(pfn);
        // ORDERING: Relaxed: invariant 2.
        word.fetch_or(bit, Ordering::Relaxed);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::{HostConfig, Prot};

    #[test]
    fn unaccessed_page_stays_idle_and_access_clears_it() {
        let host = HostMm::new(HostConfig { frames: 64 }).unwrap();
        let hva = host.mmap(4 * PAGE_SIZE, Prot::READ | Prot::WRITE).unwrap();
        let idle = PageIdle::new(&host);
        assert_eq!(idle.read(hva).unwrap(), IdleState::NoPfn);
        assert!(!idle.mark_idle(hva).unwrap());
        host.write_u64(hva, 1).unwrap();
        assert_eq!(idle.read(hva).unwrap(), IdleState::NotIdle);
        assert!(idle.mark_idle(hva).unwrap());
        assert_eq!(idle.read(hva).unwrap(), IdleState::Idle);
        host.read_u64(hva).unwrap();
        assert_eq!(idle.read(hva).unwrap(), IdleState::NotIdle);
        // The read that found the access cleared the flag: it stays not idle until marked again.
        assert_eq!(idle.read(hva).unwrap(), IdleState::NotIdle);
    }

    #[test]
    fn a_thp_is_tracked_through_its_head_so_a_page_by_page_mark_leaves_no_accessed_page_idle() {
        use crate::host::BackingSrc;
        let host = HostMm::new(HostConfig { frames: 2048 }).unwrap();
        let len = 2 * 512 * PAGE_SIZE;
        let hva = host
            .mmap_backed(len, Prot::READ | Prot::WRITE, BackingSrc::AnonymousThp)
            .unwrap();
        let page = |p: u64| Hva::new(hva.raw() + p * PAGE_SIZE);
        host.write_u64(hva, 1).unwrap();
        host.write_u64(page(512), 1).unwrap();
        let idle = PageIdle::new(&host);
        // The selftest's pass: read each page, mark it unless it reads idle.
        let pass = |idle: &PageIdle| {
            let mut still_idle = 0;
            for p in 0..1024 {
                match idle.read(page(p)).unwrap() {
                    IdleState::Idle => still_idle += 1,
                    IdleState::NotIdle => assert!(idle.mark_idle(page(p)).unwrap()),
                    IdleState::NoPfn => panic!("page {p} has no frame"),
                }
            }
            still_idle
        };
        assert_eq!(pass(&idle), 0, "nothing was marked before");
        // Every page accessed: the second pass finds none idle (each THP is read through its
        // head only; a tail read does not report the folio the head just re-marked).
        for p in [3, 700] {
            host.read_u64(page(p)).unwrap();
        }
        assert_eq!(pass(&idle), 0);
        // Nothing accessed: each THP is idle once, through its head.
        assert_eq!(pass(&idle), 2);
        assert_eq!(
            idle.read(page(1)).unwrap(),
            IdleState::NotIdle,
            "a tail is untracked"
        );
    }

    #[test]
    fn unmapped_address_is_an_error() {
        let host = HostMm::new(HostConfig { frames: 16 }).unwrap();
        let idle = PageIdle::new(&host);
        assert!(matches!(
            idle.read(Hva::new(1 << 32)),
            Err(HostError::NotMapped { .. })
        ));
    }
}
