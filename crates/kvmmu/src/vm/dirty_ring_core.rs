//! The dirty ring's entry protocol on its own (no MMU, no VM), so that it also builds under loom:
//! one vCPU pushes, one collector marks entries collected, resets free them in order
//! (`virt/kvm/dirty_ring.c`; the VM API is `vm/dirty_ring.rs`, the rules R1–R2 in
//! docs/invariants.md).

use crate::sync::atomic::{AtomicU64, Ordering};

const FLAG_DIRTY: u64 = 1;
const FLAG_COLLECTED: u64 = 2;

/// One entry (`struct kvm_dirty_gfn`).
#[derive(Debug)]
struct Entry {
    flags: AtomicU64,
    /// `as_id << 16 | slot`.
    slot: AtomicU64,
    offset: AtomicU64,
}

/// One vCPU's ring: `size` entries, of which the last `reserved` are never filled (R1).
#[derive(Debug)]
pub struct DirtyRing {
    entries: Box<[Entry]>,
    soft_limit: u64,
    /// Pushes so far (written by the owning vCPU only).
    dirty_index: AtomicU64,
    /// Entries freed by resets (written by resets only, which the VM serialises).
    reset_index: AtomicU64,
    /// The collector's position (collections are serialised by the caller).
    fetch_index: AtomicU64,
}

impl DirtyRing {
    /// A ring of `size` entries whose soft limit is `size - reserved`.
    ///
    /// # Panics
    /// Unless `0 < reserved < size` (the VM validates the size first).
    pub fn new(size: u32, reserved: u32) -> DirtyRing {
        assert!(0 < reserved && reserved < size, "bad dirty ring geometry");
        DirtyRing {
            entries: (0..size)
                .map(|_| Entry {
                    flags: AtomicU64::new(0),
                    slot: AtomicU64::new(0),
                    offset: AtomicU64::new(0),
                })
                .collect(),
            soft_limit: u64::from(size - reserved),
            dirty_index: AtomicU64::new(0),
            reset_index: AtomicU64::new(0),
            fetch_index: AtomicU64::new(0),
        }
    }

    fn entry(&self, index: u64) -> &Entry {
        &self.entries[(index % self.entries.len() as u64) as usize]
    }

    /// Entries in use (dirty or collected, not yet reset), as the owning vCPU sees it.
    pub fn used(&self) -> u64 {
        // ORDERING: R1 — the vCPU reads its own dirty index; Acquire on the reset index pairs
        // with the reset's Release, so the freed entries' cleared flags are visible before reuse.
        self.dirty_index.load(Ordering::Relaxed) - self.reset_index.load(Ordering::Acquire)
    }

    /// True when the vCPU must exit with `DirtyRingFull` (`kvm_dirty_ring_soft_full`).
    pub fn soft_full(&self) -> bool {
        self.used() >= self.soft_limit
    }

    /// Publishes a dirty entry (`kvm_dirty_ring_push`); called on the owning vCPU's thread only,
    /// never while soft-full (R1), so a free entry always exists. Returns false (and pushes
    /// nothing) if the ring is completely full, which R1 rules out.
    pub fn push(&self, slot: u64, offset: u64) -> bool {
        if self.used() >= self.entries.len() as u64 {
            debug_assert!(false, "kvmmu bug: a push into a full dirty ring");
            return false;
        }
        // ORDERING: only this thread writes the dirty index.
        let i = self.dirty_index.load(Ordering::Relaxed);
        let e = self.entry(i);
        // ORDERING: the fields are published by the Release store of the flags below.
        e.slot.store(slot, Ordering::Relaxed);
        e.offset.store(offset, Ordering::Relaxed);
        // ORDERING: R2 — Release publishes the fields, and (as the bitmap's mark, D3) the fast
        // page fault's CAS to a collector that Acquire-loads the flags.
        e.flags.store(FLAG_DIRTY, Ordering::Release);
        // ORDERING: Release so a reset that reads the index (Acquire) sees the entries below it.
        self.dirty_index.store(i + 1, Ordering::Release);
        true
    }

    /// Collects the dirty entries in push order, calling `f(slot, offset)` for each and marking
    /// it collected. Callers serialise collections.
    pub fn collect(&self, mut f: impl FnMut(u64, u64)) {
        // ORDERING: the fetch index is only used by serialised collectors.
        let mut i = self.fetch_index.load(Ordering::Relaxed);
        loop {
            let e = self.entry(i);
            // ORDERING: R2 — Acquire pairs with the push's Release of the flags.
            if e.flags.load(Ordering::Acquire) != FLAG_DIRTY {
                break;
            }
            // ORDERING: published by the flags (above).
            f(
                e.slot.load(Ordering::Relaxed),
                e.offset.load(Ordering::Relaxed),
            );
            // ORDERING: Release orders our reads before a reset frees the entry.
            e.flags.store(FLAG_COLLECTED, Ordering::Release);
            i += 1;
        }
        self.fetch_index.store(i, Ordering::Relaxed);
    }

    /// Frees the collected entries from the reset index on, in order, stopping at the first
    /// that is not collected, calling `f(slot, offset)` for each (the caller re-arms the page);
    /// returns how many it freed. Callers serialise resets.
    pub fn reset_collected(&self, mut f: impl FnMut(u64, u64)) -> u64 {
        // ORDERING: only serialised resets write the reset index.
        let start = self.reset_index.load(Ordering::Relaxed);
        // ORDERING: Acquire pairs with the push's Release of the dirty index.
        let end = self.dirty_index.load(Ordering::Acquire);
        let mut i = start;
        while i < end {
            let e = self.entry(i);
            // ORDERING: pairs with the collector's Release (R2).
            if e.flags.load(Ordering::Acquire) != FLAG_COLLECTED {
                break;
            }
            f(
                e.slot.load(Ordering::Relaxed),
                e.offset.load(Ordering::Relaxed),
            );
            // ORDERING: published to the vCPU by the reset index's Release below.
            e.flags.store(0, Ordering::Relaxed);
            i += 1;
        }
        // ORDERING: R1 — Release publishes the cleared flags before the vCPU reuses the entries.
        self.reset_index.store(i, Ordering::Release);
        i - start
    }
}
