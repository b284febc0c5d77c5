//! The swap device: slots holding the contents of evicted pages, in memory.
//!
//! Protocol (`mm/swapfile.c` reduced to what reclaim and refault need):
//! - Eviction ([`super::reclaim`]) copies a frame into a free slot ([`SwapDevice::store`]) and
//!   replaces the page's host PTE with a *swap entry* naming the slot ([`swap_entry`]), under
//!   `mmap_lock` write, after `invalidate_range_start` returned from every subscriber.
//! - GUP of a page whose PTE is a swap entry (a refault) copies the slot into a fresh frame
//!   ([`SwapDevice::load_into`]), publishes the frame with a CAS from the swap entry, and only the
//!   CAS winner frees the slot ([`SwapDevice::free`]). Racing GUPs hold `mmap_lock` read, which
//!   excludes eviction, so a swap entry never comes back to the same PTE while they look at it
//!   (no ABA): a loser's CAS simply fails and it discards its copy.
//! - `munmap`, `madvise(DONTNEED)` and process exit free the slot of every swap entry they clear.
//!
//! Host PTE encoding of a swap entry: bit 63 set, bits 0–2 (present, young, dirty) clear, the slot
//! number in bits 3..35. So a swap entry is never present, never young, and aging leaves it alone.
//!
//! Invariants:
//! - S1. A slot is in exactly one of: free, or named by exactly one swap entry (or being filled
//!   by the eviction that will install that entry, under `mm_writer`).
//! - S2. `used` equals the number of slots not free.
//! - S3. A slot is freed only by the thread that removed the last swap entry naming it (the
//!   refault CAS winner, or a zap under `mmap_lock` write).

use super::frames::WORDS_PER_FRAME;
use crate::sync::Mutex;
use crate::sync::atomic::{AtomicU64, Ordering};

/// Bit 63 of a host PTE marks a swap entry.
const SWAP_BIT: u64 = 1 << 63;
const SLOT_SHIFT: u32 = 3;
const SLOT_MASK: u64 = (1 << 32) - 1;

/// The most slots a swap device can have (slot numbers fit 32 bits of a swap entry).
pub const MAX_SWAP_SLOTS: u64 = 1 << 32;

/// The host PTE word of a swap entry for `slot`.
pub(crate) const fn swap_entry(slot: u32) -> u64 {
    SWAP_BIT | ((slot as u64) << SLOT_SHIFT)
}

/// The slot of a swap-entry PTE word, or `None` if the word is not a swap entry.
pub(crate) const fn swap_slot(pte: u64) -> Option<u32> {
    if pte & SWAP_BIT != 0 && pte & 0b111 == 0 {
        Some(((pte >> SLOT_SHIFT) & SLOT_MASK) as u32)
    } else {
        None
    }
}

/// A snapshot of a swap device's counters.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct SwapStats {
    /// Slots of the device.
    pub slots: u64,
    /// Slots holding a page now.
    pub used: u64,
    /// Pages written to the device so far.
    pub swap_outs: u64,
    /// Pages read back so far (refaults).
    pub swap_ins: u64,
    /// Stores refused because every slot was in use.
    pub full: u64,
}

/// Words of a page kept as (index, value) pairs when at most this many are non-zero (like
/// zswap's same-filled pages: a mostly-empty page costs a few bytes, not 4 KiB).
const SPARSE_MAX: usize = 32;

/// The contents of one slot.
enum SlotData {
    /// A page with at most [`SPARSE_MAX`] non-zero words.
    Sparse(Box<[(u16, u64)]>),
    /// Any other page.
    Full(Box<[u64; WORDS_PER_FRAME]>),
}

#[derive(Default)]
struct Slots {
    data: Vec<Option<SlotData>>,
    free: Vec<u32>,
}

/// An in-memory swap device of a fixed number of slots (slot storage allocated on first use).
pub(crate) struct SwapDevice {
    capacity: u64,
    slots: Mutex<Slots>,
    used: AtomicU64,
    swap_outs: AtomicU64,
    swap_ins: AtomicU64,
    full: AtomicU64,
}

impl core::fmt::Debug for SwapDevice {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SwapDevice")
            .field("stats", &self.stats())
            .finish()
    }
}

fn bump(c: &AtomicU64, n: i64) {
    // ORDERING: Relaxed: statistics; the slot table's mutex orders the slot contents.
    if n >= 0 {
        c.fetch_add(n as u64, Ordering::Relaxed);
    } else {
        c.fetch_sub(n.unsigned_abs(), Ordering::Relaxed);
    }
}

impl SwapDevice {
    /// A device of `slots` slots (the caller checked `slots <= MAX_SWAP_SLOTS`).
    pub(crate) fn new(slots: u64) -> SwapDevice {
        SwapDevice {
            capacity: slots,
            slots: Mutex::new(Slots::default()),
            used: AtomicU64::new(0),
            swap_outs: AtomicU64::new(0),
            swap_ins: AtomicU64::new(0),
            full: AtomicU64::new(0),
        }
    }

    /// Copies `words` (one frame) into a free slot; `None` if every slot is in use.
    pub(crate) fn store(&self, words: &[AtomicU64]) -> Option<u32> {
        let mut s = self.slots.lock();
        let slot = match s.free.pop() {
            Some(i) => i,
            None if (s.data.len() as u64) < self.capacity => {
                s.data.push(None);
                (s.data.len() - 1) as u32
            }
            None => {
                bump(&self.full, 1);
                return None;
            }
        };
        let mut page = [0u64; WORDS_PER_FRAME];
        let mut nonzero = 0;
        for (d, w) in page.iter_mut().zip(words) {
            // ORDERING: Relaxed: the caller holds mmap_lock write after invalidate_range_start
            // returned, so no writer can reach the frame (host H1, S1).
            *d = w.load(Ordering::Relaxed);
            nonzero += usize::from(*d != 0);
        }
        let data = if nonzero <= SPARSE_MAX {
            let pairs: Vec<(u16, u64)> = (0..WORDS_PER_FRAME)
                .filter(|&i| page[i] != 0)
                .map(|i| (i as u16, page[i]))
                .collect();
            SlotData::Sparse(pairs.into_boxed_slice())
        } else {
            SlotData::Full(Box::new(page))
        };
        s.data[slot as usize] = Some(data);
        bump(&self.used, 1);
        bump(&self.swap_outs, 1);
        Some(slot)
    }

    /// Copies slot `slot` into `words` (one zero-filled frame the caller owns exclusively, not yet
    /// published). A slot freed meanwhile (the caller lost the refault race, S3) leaves the frame
    /// zero; the caller's CAS then fails and the copy is discarded.
    pub(crate) fn load_into(&self, slot: u32, words: &[AtomicU64]) {
        let s = self.slots.lock();
        // ORDERING (every store here): Relaxed: the frame is published later by the caller's
        // release CAS. The frame comes zero-filled from the arena.
        match s.data.get(slot as usize).and_then(Option::as_ref) {
            Some(SlotData::Full(page)) => {
                for (w, v) in words.iter().zip(page.iter()) {
                    w.store(*v, Ordering::Relaxed);
                }
            }
            Some(SlotData::Sparse(pairs)) => {
                for &(i, v) in pairs.iter() {
                    if let Some(w) = words.get(usize::from(i)) {
                        w.store(v, Ordering::Relaxed);
                    }
                }
            }
            None => {}
        }
    }

    /// Returns slot `slot` to the free list (S3: by the thread that removed its swap entry).
    pub(crate) fn free(&self, slot: u32, swapped_in: bool) {
        let mut s = self.slots.lock();
        if let Some(d) = s.data.get_mut(slot as usize) {
            // The contents go with the slot: a drained device holds no memory.
            *d = None;
            s.free.push(slot);
            bump(&self.used, -1);
            if swapped_in {
                bump(&self.swap_ins, 1);
            }
        }
    }

    /// The device's counters.
    pub(crate) fn stats(&self) -> SwapStats {
        // ORDERING: Relaxed: statistics.
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SwapStats {
            slots: self.capacity,
            used: ld(&self.used),
            swap_outs: ld(&self.swap_outs),
            swap_ins: ld(&self.swap_ins),
            full: ld(&self.full),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(v: u64) -> Vec<AtomicU64> {
        (0..WORDS_PER_FRAME as u64)
            .map(|i| AtomicU64::new(v + i))
            .collect()
    }

    #[test]
    fn a_stored_page_reads_back_and_a_full_device_refuses() {
        let d = SwapDevice::new(2);
        let a = d.store(&frame(100)).unwrap();
        let b = d.store(&frame(200)).unwrap();
        assert_ne!(a, b);
        assert_eq!(d.store(&frame(300)), None);
        let out = frame(0);
        d.load_into(a, &out);
        assert_eq!(out[7].load(Ordering::Relaxed), 107);
        d.free(a, true);
        assert_eq!(d.stats().used, 1);
        assert_eq!(d.store(&frame(300)), Some(a));
        let s = d.stats();
        assert_eq!((s.swap_outs, s.swap_ins, s.full, s.used), (3, 1, 1, 2));
    }

    #[test]
    fn swap_entries_are_never_present_or_young_and_round_trip() {
        for slot in [0u32, 1, 12345, u32::MAX] {
            let e = swap_entry(slot);
            assert_eq!(e & 0b111, 0);
            assert_eq!(swap_slot(e), Some(slot));
        }
        assert_eq!(swap_slot(0), None);
        assert_eq!(swap_slot(1), None);
    }
}
