//! The fault-vs-invalidation retry protocol: `mmu_invalidate_in_progress`, `mmu_invalidate_seq` and
//! the invalidated gfn range (spec §3.3).
//!
//! Protocol:
//! 1. `invalidate_range_start` runs [`InvalidateState::begin`] (in_progress += 1; range reset when it
//!    becomes 1) and [`InvalidateState::range_add`] for each gfn range it zaps, both under `mmu_lock`
//!    write, *before* the host changes its page tables.
//! 2. `invalidate_range_end` runs [`InvalidateState::end`] under `mmu_lock` write: seq += 1, then
//!    in_progress -= 1, *after* the host changed its page tables.
//! 3. A fault takes a [`SeqSnapshot`] before it reads the host page tables (GUP), and, under `mmu_lock`
//!    (either mode), installs nothing if [`InvalidateState::retry_gfn`] says an invalidation covering
//!    its gfn is in progress or completed since the snapshot.
//!
//! Invariants: (a) in_progress never underflows (spec §4 item 4); (b) seq only grows; (c) while
//! in_progress > 0 and `mmu_lock` is free the range is valid (item 5); (d) a fault whose GUP read a host
//! PTE that an invalidation then changed sees, under `mmu_lock`, either in_progress with a covering
//! range or a changed seq (item 9).
//!
//! All fields are atomics so that the lock-free pre-check ([`InvalidateState::retry_gfn_unsafe`]) can
//! read them; every *write* happens under `mmu_lock` write, which the [`MmuWrite`] witness proves.

use crate::addr::{Gfn, GfnRange};
use crate::sync::atomic::{AtomicU64, Ordering};
use crate::sync::witness::{LockBinding, MmuLock, MmuRead, MmuWrite};

const INVALID_GFN: u64 = u64::MAX;

/// The invalidation counters of one VM.
#[derive(Debug)]
pub struct InvalidateState {
    in_progress: AtomicU64,
    seq: AtomicU64,
    range_start: AtomicU64,
    range_end: AtomicU64,
    /// The `mmu_lock` whose witnesses the counters accept (written once).
    lock: LockBinding,
}

/// `mmu_invalidate_seq` as a fault saw it before resolving the host page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "a snapshot is only useful if it is checked before installing an SPTE"]
pub struct SeqSnapshot(u64);

/// A copy of the counters, for statistics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InvalidateCounters {
    /// `mmu_invalidate_in_progress`.
    pub in_progress: u64,
    /// `mmu_invalidate_seq`.
    pub seq: u64,
}

/// Why [`InvalidateState::end`] or [`InvalidateState::range_add`] found the protocol broken.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SeqError {
    /// `end` without a matching `begin`.
    #[error("invalidate end without a matching begin (in_progress would go below zero)")]
    Underflow,
    /// `range_add` outside a begin/end pair.
    #[error("invalidate range added while no invalidation is in progress")]
    NotInProgress,
}

impl Default for InvalidateState {
    fn default() -> Self {
        Self::new()
    }
}

impl InvalidateState {
    /// Counters at rest: nothing in progress, seq 0.
    pub fn new() -> Self {
        InvalidateState {
            in_progress: AtomicU64::new(0),
            seq: AtomicU64::new(0),
            range_start: AtomicU64::new(INVALID_GFN),
            range_end: AtomicU64::new(INVALID_GFN),
            lock: LockBinding::unbound(),
        }
    }

    /// Counters at rest, protected by `lock`: every locked method refuses a witness of another
    /// lock.
    pub fn bound_to(lock: &MmuLock) -> Self {
        InvalidateState {
            lock: LockBinding::bound_to(lock),
            ..InvalidateState::new()
        }
    }

    /// `kvm_mmu_invalidate_begin`.
    pub fn begin(&self, mmu: &MmuWrite) {
        self.lock.check(mmu.lock_id(), "the invalidation counters");
        // ORDERING: Relaxed suffices for every store here: writers are serialized by mmu_lock write,
        // and locked readers are ordered by the lock; the lock-free pre-check tolerates any
        // interleaving because a locked re-check always follows it.
        let prev = self.in_progress.fetch_add(1, Ordering::Relaxed);
        if prev == 0 {
            self.range_start.store(INVALID_GFN, Ordering::Relaxed);
            self.range_end.store(INVALID_GFN, Ordering::Relaxed);
        }
    }

    /// `kvm_mmu_invalidate_range_add`: widen the in-progress range to cover `range`.
    pub fn range_add(&self, range: GfnRange, mmu: &MmuWrite) -> Result<(), SeqError> {
        self.lock.check(mmu.lock_id(), "the invalidation counters");
        // ORDERING: see `begin`.
        if self.in_progress.load(Ordering::Relaxed) == 0 {
            return Err(SeqError::NotInProgress);
        }
        let (s, e) = (range.start().raw(), range.end().raw());
        let cur_s = self.range_start.load(Ordering::Relaxed);
        if cur_s == INVALID_GFN {
            self.range_start.store(s, Ordering::Relaxed);
            self.range_end.store(e, Ordering::Relaxed);
        } else {
            let cur_e = self.range_end.load(Ordering::Relaxed);
            self.range_start.store(cur_s.min(s), Ordering::Relaxed);
            self.range_end.store(cur_e.max(e), Ordering::Relaxed);
        }
        Ok(())
    }

    /// `kvm_mmu_invalidate_end`: seq += 1, then in_progress -= 1.
    pub fn end(&self, mmu: &MmuWrite) -> Result<(), SeqError> {
        self.lock.check(mmu.lock_id(), "the invalidation counters");
        // ORDERING: the seq increment is Release and in_progress is decremented after it, so a
        // lock-free reader that Acquire-loads in_progress == 0 (see `retry_gfn_unsafe`) and then
        // loads seq observes the increment (the kernel's smp_wmb between the two). The Release on
        // seq also pairs with the Acquire in `snapshot`: a fault that sees the new seq reads host
        // PTEs that the host changed before calling end.
        if self.in_progress.load(Ordering::Relaxed) == 0 {
            return Err(SeqError::Underflow);
        }
        self.seq.fetch_add(1, Ordering::Release);
        self.in_progress.fetch_sub(1, Ordering::Release);
        Ok(())
    }

    /// Takes the snapshot a fault must take before reading host page tables.
    pub fn snapshot(&self) -> SeqSnapshot {
        // ORDERING: Acquire so the GUP that follows cannot read host PTEs older than the invalidation
        // whose `end` produced this value (pairs with the Release in `end`).
        SeqSnapshot(self.seq.load(Ordering::Acquire))
    }

    fn covers(&self, gfn: Gfn) -> (bool, bool) {
        let s = self.range_start.load(Ordering::Relaxed);
        let e = self.range_end.load(Ordering::Relaxed);
        (s == INVALID_GFN, s <= gfn.raw() && gfn.raw() < e)
    }

    /// `mmu_invalidate_retry_gfn`: true if a fault that took `snap` must not install an SPTE for `gfn`.
    /// Requires `mmu_lock` in either mode (a write witness derefs to a read one).
    pub fn retry_gfn(&self, snap: SeqSnapshot, gfn: Gfn, mmu: &MmuRead) -> bool {
        self.lock.check(mmu.lock_id(), "the invalidation counters");
        // ORDERING: under mmu_lock every writer is excluded, so Relaxed loads see the values the last
        // write-lock holder stored (the lock's acquire/release orders them).
        if self.in_progress.load(Ordering::Relaxed) > 0 {
            let (invalid, covered) = self.covers(gfn);
            // A range that is INVALID while in progress means someone dropped the lock between begin
            // and range_add; be conservative and retry.
            if invalid || covered {
                return true;
            }
        }
        self.seq.load(Ordering::Relaxed) != snap.0
    }

    /// `mmu_invalidate_retry_gfn_unsafe`: the lock-free pre-check. May give false positives and false
    /// negatives; a `false` must be confirmed by [`InvalidateState::retry_gfn`] under `mmu_lock`.
    pub fn retry_gfn_unsafe(&self, snap: SeqSnapshot, gfn: Gfn) -> bool {
        // ORDERING: Acquire on in_progress pairs with the Release decrement in `end`, so seeing 0
        // here means seeing the seq increment that preceded it.
        if self.in_progress.load(Ordering::Acquire) > 0 {
            let (invalid, covered) = self.covers(gfn);
            if invalid || covered {
                return true;
            }
        }
        self.seq.load(Ordering::Acquire) != snap.0
    }

    /// The current counters.
    pub fn counters(&self) -> InvalidateCounters {
        InvalidateCounters {
            in_progress: self.in_progress.load(Ordering::Acquire),
            seq: self.seq.load(Ordering::Acquire),
        }
    }
}
