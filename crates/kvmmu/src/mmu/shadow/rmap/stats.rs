//! [`RmapStats`]: descriptor allocation/free counters and bit-lock contention, shared by the rmaps
//! of one VM. Counters are Relaxed atomics written only on writer paths and contended acquisitions.

use core::fmt;

use crate::sync::atomic::{AtomicU64, Ordering};
use crate::sync::witness::{LockBinding, MmuLock, MmuWrite};

/// Counters shared by the rmaps of one VM: descriptor allocations and frees (equal at teardown,
/// DESIGN invariant 5, spec §4 items 28–34) and contended bit-lock acquisitions.
///
/// Written only on writer paths (under `mmu_lock`) and on contended acquisitions, never on an
/// uncontended read-only lock, so lockless aging does not bounce this cache line.
#[repr(align(128))]
pub struct RmapStats {
    desc_allocs: AtomicU64,
    desc_frees: AtomicU64,
    lock_contended: AtomicU64,
    /// The `mmu_lock` whose write witness every rmap writer of this VM presents (written once).
    lock: LockBinding,
}

/// A snapshot of [`RmapStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RmapStatsSnapshot {
    /// Descriptors allocated.
    pub desc_allocs: u64,
    /// Descriptors freed.
    pub desc_frees: u64,
    /// Bit-lock acquisitions (writer or read-only) that found the bit held and had to wait.
    pub lock_contended: u64,
}

impl RmapStatsSnapshot {
    /// Descriptors currently allocated (`desc_allocs - desc_frees`).
    pub fn live_descriptors(&self) -> u64 {
        self.desc_allocs - self.desc_frees
    }
}

impl Default for RmapStats {
    fn default() -> Self {
        RmapStats::new()
    }
}

impl fmt::Debug for RmapStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("RmapStats").field(&self.snapshot()).finish()
    }
}

impl RmapStats {
    /// Zeroed counters.
    pub fn new() -> RmapStats {
        RmapStats {
            desc_allocs: AtomicU64::new(0),
            desc_frees: AtomicU64::new(0),
            lock_contended: AtomicU64::new(0),
            lock: LockBinding::unbound(),
        }
    }

    /// Binds the rmaps counted here to `lock`: every writer must then present its witness.
    ///
    /// # Panics
    /// If they are already bound to another lock.
    pub fn bind_lock(&self, lock: &MmuLock) {
        self.lock.check(lock.id(), "an rmap");
    }

    /// Panics unless `w` is a witness of the lock these rmaps are bound to (binding it on first use).
    #[inline]
    pub(crate) fn check_witness(&self, w: &MmuWrite) {
        self.lock.check(w.lock_id(), "an rmap");
    }

    /// Reads the counters.
    pub fn snapshot(&self) -> RmapStatsSnapshot {
        // ORDERING: Relaxed: independent statistics; callers that need exact values (leak checks)
        // read them after joining the threads that wrote them.
        RmapStatsSnapshot {
            desc_allocs: self.desc_allocs.load(Ordering::Relaxed),
            desc_frees: self.desc_frees.load(Ordering::Relaxed),
            lock_contended: self.lock_contended.load(Ordering::Relaxed),
        }
    }

    pub(super) fn note_alloc(&self) {
        // ORDERING: Relaxed: a statistic.
        self.desc_allocs.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn note_free(&self) {
        // ORDERING: Relaxed: a statistic.
        self.desc_frees.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn note_contended(&self) {
        // ORDERING: Relaxed: a statistic.
        self.lock_contended.fetch_add(1, Ordering::Relaxed);
    }
}
