//! Zero-initialised arrays of `AtomicU64` backed by lazily populated anonymous memory.
//!
//! This is the only place in `host` that touches raw memory. The simulated physical memory
//! ([`super::FrameArena`]: frame words and tags) is such an array, so that a large, mostly
//! untouched arena costs address space rather than resident memory: the OS populates a page of
//! the array the first time it is touched. (The host page tables are a sparse radix tree instead,
//! `pgtable.rs`: an array would be written whole by a zap of its range.)
//!
//! Invariants:
//! 1. The mapping is created with `len * 8` bytes, is page aligned (so 8-byte aligned) and
//!    zero-filled by the OS, and lives exactly as long as the [`AtomicWords`] value.
//! 2. The memory is only ever accessed through `&AtomicU64` handed out by [`AtomicWords::as_slice`];
//!    no `&[u8]`, `&mut` or non-atomic access to it is ever created, so every access is atomic and
//!    there are no data races by construction.

use memmap2::{MmapOptions, MmapRaw};

use crate::sync::atomic::AtomicU64;

/// A fixed-length array of `AtomicU64`, zero-initialised, backed by an anonymous mapping.
pub(crate) struct AtomicWords {
    map: MmapRaw,
    len: usize,
}

impl AtomicWords {
    /// Maps `len` words (`len > 0`). Fails on size overflow or when the OS refuses the mapping.
    pub(crate) fn new(len: usize) -> std::io::Result<AtomicWords> {
        let bytes = len
            .checked_mul(size_of::<AtomicU64>())
            .filter(|&b| b > 0)
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        let map = MmapRaw::from(MmapOptions::new().len(bytes).map_anon()?);
        Ok(AtomicWords { map, len })
    }

    /// The words as a slice of atomics.
    #[inline]
    pub(crate) fn as_slice(&self) -> &[AtomicU64] {
        let base = self.map.as_mut_ptr().cast::<AtomicU64>();
        // Invariant 1: `base` points to `len * 8` bytes of zero-filled, 8-byte aligned memory that
        // stays mapped while `self` (and so the returned borrow) lives; an all-zero `AtomicU64` is
        // a valid value and `AtomicU64` has the size and alignment of `u64`.
        // SAFETY: invariant 1 above, and invariant 2: the memory is only ever reached through this
        // shared slice of atomics (interior mutability), never through a reference to plain bytes,
        // so creating many shared slices over it at once is sound.
        unsafe { core::slice::from_raw_parts(base, self.len) }
    }
}

impl AtomicWords {
    /// Asks the OS to back words `from..len` with memory now (first-touch page faults taken here
    /// instead of on a hot path). Contents are unchanged: the OS populates zero pages, and where
    /// `MADV_POPULATE_WRITE` is unavailable every page is touched with an atomic `fetch_or(0)`,
    /// which leaves any value in place.
    pub(crate) fn populate(&self, from: usize) -> std::io::Result<()> {
        if from >= self.len {
            return Ok(());
        }
        let page = 4096 / size_of::<AtomicU64>();
        let from = from - from % page;
        let offset = from * size_of::<AtomicU64>();
        let bytes = (self.len - from) * size_of::<AtomicU64>();
        #[cfg(target_os = "linux")]
        if self
            .map
            .advise_range(memmap2::Advice::PopulateWrite, offset, bytes)
            .is_ok()
        {
            return Ok(());
        }
        let _ = (offset, bytes);
        for w in self.as_slice()[from..].iter().step_by(page) {
            // ORDERING: Relaxed: an RMW that changes nothing; it only forces a write fault.
            w.fetch_or(0, core::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }
}

impl core::fmt::Debug for AtomicWords {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("AtomicWords")
            .field("len", &self.len)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::atomic::Ordering;

    #[test]
    fn words_start_zero_and_hold_values() {
        let w = AtomicWords::new(4096).unwrap();
        assert_eq!(w.as_slice().len(), 4096);
        assert!(w.as_slice().iter().all(|a| a.load(Ordering::Relaxed) == 0));
        w.as_slice()[4095].store(7, Ordering::Relaxed);
        assert_eq!(w.as_slice()[4095].load(Ordering::Relaxed), 7);
    }

    #[test]
    fn zero_length_is_rejected() {
        assert!(AtomicWords::new(0).is_err());
        assert!(AtomicWords::new(usize::MAX).is_err());
    }
}
