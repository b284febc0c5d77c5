//! [`RmapStats`]: descriptor allocation/free counters, the longest chain an insertion found
//! (`max_mmu_rmap_size`) and bit-lock contention, shared by the rmaps of one VM. Allocation, free
//! and size statistics are written only by writers (under `mmu_lock` write); the contention
//! counters are [`StripedCounter`]s, bumped only by a locker that found the bit held or lost its
//! CAS, by writers and lockless agers alike.

use core::fmt;

use crate::sync::atomic::{AtomicU64, Ordering};
use crate::sync::percpu::StripedCounter;
use crate::sync::witness::{LockBinding, MmuLock, MmuWrite};

/// Who takes an rmap's bit (for the contention counters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Locker {
    /// A writer under `mmu_lock` write (`kvm_rmap_lock`).
    Writer,
    /// A read-only locker, e.g. lockless aging (`kvm_rmap_lock_readonly`).
    ReadOnly,
}

/// Counters shared by the rmaps of one VM: descriptor allocations and frees (equal at teardown,
/// DESIGN invariant 5, spec §4 items 28–34), the longest rmap a leaf insertion found, and
/// contended bit-lock acquisitions per kind of locker.
///
/// An uncontended read-only lock writes none of them, so lockless aging does not bounce a shared
/// cache line; a contended one bumps its own thread's stripe.
#[repr(align(128))]
pub struct RmapStats {
    desc_allocs: AtomicU64,
    desc_frees: AtomicU64,
    /// `kvm->stat.max_mmu_rmap_size`, written only under `mmu_lock` write.
    max_rmap_size: AtomicU64,
    contended_writer: StripedCounter,
    contended_readonly: StripedCounter,
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
    /// Bit-lock acquisitions (writer or read-only) that found the bit held and spun, or lost
    /// their compare-and-swap and retried (`lock_contended_writer + lock_contended_readonly`).
    pub lock_contended: u64,
    /// Writer acquisitions (under `mmu_lock` write) that spun or retried.
    pub lock_contended_writer: u64,
    /// Read-only acquisitions (lockless aging) that spun or retried.
    pub lock_contended_readonly: u64,
    /// KVM's `max_mmu_rmap_size`: the most entries a leaf insertion ([`super::RmapHead::rmap_add`])
    /// found in its rmap, i.e. the longest chain seen at insertion, not counting the new entry.
    pub max_rmap_size: u64,
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
            max_rmap_size: AtomicU64::new(0),
            contended_writer: StripedCounter::default(),
            contended_readonly: StripedCounter::default(),
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
        let (writer, readonly) = (self.contended_writer.sum(), self.contended_readonly.sum());
        RmapStatsSnapshot {
            desc_allocs: self.desc_allocs.load(Ordering::Relaxed),
            desc_frees: self.desc_frees.load(Ordering::Relaxed),
            lock_contended: writer + readonly,
            lock_contended_writer: writer,
            lock_contended_readonly: readonly,
            max_rmap_size: self.max_rmap_size.load(Ordering::Relaxed),
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

    pub(super) fn note_contended(&self, who: Locker) {
        match who {
            Locker::Writer => self.contended_writer.add(1),
            Locker::ReadOnly => self.contended_readonly.add(1),
        }
    }

    /// Records that a leaf insertion found `before` entries in its rmap (`__rmap_add`).
    /// Called under `mmu_lock` write (the caller presented its witness to the insertion).
    pub(super) fn note_rmap_size(&self, before: usize) {
        let n = before as u64;
        // ORDERING: Relaxed: writers of the maximum are serialized by `mmu_lock` write, so a
        // load-compare-store loses no update; readers want a statistic.
        if n > self.max_rmap_size.load(Ordering::Relaxed) {
            self.max_rmap_size.store(n, Ordering::Relaxed);
        }
    }
}
