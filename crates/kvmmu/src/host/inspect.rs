//! Userspace word accesses to mapped memory and read-only views of the address space (host PTE
//! snapshots, the mapping list), for tests, oracles and tools: the `HostMm` methods that change no
//! mapping.

use super::huge::marker_level;
use super::mm::HostPte;
use super::swap::swap_slot;
use super::vma::{page_hva, pte, pte_frame};
use super::{FrameTag, HostError, HostMm, Prot};
use crate::addr::{Hva, Level, PAGE_SHIFT, Pfn};
use crate::sync::atomic::Ordering;

impl HostMm {
    fn access(&self, hva: Hva, write: Option<u64>) -> Result<u64, HostError> {
        if !hva.raw().is_multiple_of(8) {
            return Err(HostError::UnalignedAccess { hva });
        }
        self.inner.counters.gup.add(1);
        let word = ((hva.raw() & ((1 << PAGE_SHIFT) - 1)) / 8) as usize;
        // The frame cannot be freed while `with_page` holds mmap_lock read (H2, H3), so a stale
        // error here would be a host bug; it is still reported rather than hidden.
        self.with_page(hva, write.is_some(), |page| match write {
            Some(v) => self
                .inner
                .arena
                .write_u64(page.pfn, word, page.tag, v)
                .map(|()| v),
            None => self.inner.arena.read_u64(page.pfn, word, page.tag),
        })
        .map(|(_, v)| v)
    }

    /// A userspace 8-byte read of `hva` (8-byte aligned), faulting the page in if needed.
    ///
    /// Errors: [`HostError::UnalignedAccess`], [`HostError::Gup`].
    pub fn read_u64(&self, hva: Hva) -> Result<u64, HostError> {
        self.access(hva, None)
    }

    /// A userspace 8-byte write of `v` to `hva` (8-byte aligned), faulting the page in.
    pub fn write_u64(&self, hva: Hva, v: u64) -> Result<(), HostError> {
        self.access(hva, Some(v)).map(|_| ())
    }

    /// A snapshot of the host PTE of the page containing `hva`; `None` if it is not mapped.
    pub fn host_pte(&self, hva: Hva) -> Option<HostPte> {
        let page = hva.page();
        let vmas = self.inner.mmap_lock.read();
        let v = vmas.find(page)?;
        // ORDERING: Acquire: like GUP's load, so the returned tag is the one published with it.
        let w = vmas.pt.entry(page).map_or(0, |w| w.load(Ordering::Acquire));
        let present = w & pte::PRESENT != 0;
        let (pfn, tag) = if present {
            pte_frame(page, w)
        } else {
            (Pfn::new(0), FrameTag::FREE)
        };
        Some(HostPte {
            pfn,
            tag,
            present,
            writable: v.writable(),
            young: w & pte::YOUNG != 0,
            dirty: w & pte::DIRTY != 0,
            swapped: swap_slot(w).is_some(),
            level: if present {
                marker_level(&vmas.pt, page)
            } else {
                Level::L4K
            },
        })
    }

    /// Mapped ranges in address order, as `(start, len, prot)` (for tests and oracles).
    pub fn mappings(&self) -> Vec<(Hva, u64, Prot)> {
        self.inner
            .mmap_lock
            .read()
            .iter()
            .map(|v| (page_hva(v.start), (v.end - v.start) << PAGE_SHIFT, v.prot))
            .collect()
    }
}
