//! Lock-rank checker: the lock order of docs/locking.md, checked at run time in debug builds.
//!
//! Protocol: every lock-like primitive of kvmmu (the `mmu_lock` guards, [`SrcuGuard`], [`RcuGuard`],
//! [`RankedMutex`] guards, the shadow MMU's rmap bit lock) calls [`acquire`] with its [`LockRank`]
//! *before* it blocks, and keeps the returned [`RankToken`] for as long as it holds the lock. The
//! checker keeps, per thread, how many locks of each rank the thread holds, and panics at the
//! acquisition that breaks the order, naming both locks, instead of letting the program deadlock
//! later under an unlucky schedule (the role lockdep plays in the kernel).
//!
//! Invariants checked (debug builds only; in release builds [`RankToken`] is a zero-sized no-op):
//! 1. **Order.** A thread that holds a lock of rank `h` may take a lock of rank `r` only if
//!    `r >= h` in the order of [`LockRank`] (outermost first, as docs/locking.md's "Lock order" table and
//!    spec §2.2).
//! 2. **Re-entry.** Taking a rank the thread already holds is allowed only for the read sides that
//!    nest ([`LockRank::MemslotsSrcu`], [`LockRank::Rcu`]); re-taking `slots_lock`,
//!    `mn_invalidate_lock`, `mmu_lock` or an rmap bit lock is a self-deadlock and panics.
//! 3. **Waiting.** A thread about to wait for a grace period of rank `r` (SRCU `synchronize`, RCU
//!    `synchronize`) must hold no lock of rank `>= r`, because the readers it waits for may be
//!    blocked on that lock ([`assert_may_wait_for`]).
//!
//! Tokens may be released in any order (guards are not always dropped LIFO), so the state is a
//! per-rank count rather than a stack. The checker is disabled under `cfg(loom)` and
//! `cfg(feature = "shuttle")`: those models run in release builds, and their threads share one OS thread's
//! thread-locals.
//!
//! [`SrcuGuard`]: super::srcu::SrcuGuard
//! [`RcuGuard`]: super::rcu::RcuGuard
//! [`RankedMutex`]: super::witness::RankedMutex

use core::fmt;
use core::marker::PhantomData;

/// The ranks of kvmmu's locks, outermost first (docs/locking.md "Lock order").
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LockRank {
    /// `slots_lock`: serializes memslot updates (a mutex).
    SlotsLock,
    /// The memslots SRCU read side (nests with itself).
    MemslotsSrcu,
    /// `mn_invalidate_lock`: guards `mn_active_invalidate_count`.
    MnInvalidate,
    /// `mmu_lock`, read or write.
    MmuLock,
    /// The rmap head LOCKED bit (a leaf: spec §2.2 rule 6).
    RmapBit,
    /// The RCU (epoch) read side for page-table pages (nests with itself).
    Rcu,
}

/// Number of ranks (the length of [`LockRank::ALL`]).
const NR_RANKS: usize = 6;

impl LockRank {
    /// Every rank, outermost first.
    pub const ALL: [LockRank; NR_RANKS] = [
        LockRank::SlotsLock,
        LockRank::MemslotsSrcu,
        LockRank::MnInvalidate,
        LockRank::MmuLock,
        LockRank::RmapBit,
        LockRank::Rcu,
    ];

    /// The kernel name of the lock this rank stands for.
    pub const fn name(self) -> &'static str {
        match self {
            LockRank::SlotsLock => "slots_lock",
            LockRank::MemslotsSrcu => "memslots SRCU",
            LockRank::MnInvalidate => "mn_invalidate_lock",
            LockRank::MmuLock => "mmu_lock",
            LockRank::RmapBit => "rmap LOCKED bit",
            LockRank::Rcu => "RCU (epoch)",
        }
    }

    /// True for read sides that may be taken again while already held (invariant 2).
    pub const fn is_reentrant(self) -> bool {
        matches!(self, LockRank::MemslotsSrcu | LockRank::Rcu)
    }

    /// Position in [`LockRank::ALL`].
    #[cfg(all(debug_assertions, not(loom), not(feature = "shuttle")))]
    const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for LockRank {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Proof that the current thread registered a lock of some rank; releases it on drop.
///
/// Not `Send`: the registration lives in the acquiring thread's state and must be released there.
/// Zero-sized and free in release builds.
#[must_use = "the rank is released when the token is dropped"]
pub struct RankToken {
    #[cfg(all(debug_assertions, not(loom), not(feature = "shuttle")))]
    rank: LockRank,
    _not_send: PhantomData<NotSend>,
}

/// A marker that is `Sync` but not `Send` (like a mutex guard), so that a guard embedding a
/// [`RankToken`] can still be shared by reference with scoped threads.
struct NotSend(PhantomData<*const ()>);

// SAFETY: `NotSend` has no data; it exists only to opt out of `Send`. Sharing `&RankToken` between
// threads cannot touch the per-thread state (only `Drop`, which needs ownership, does).
unsafe impl Sync for NotSend {}

impl fmt::Debug for RankToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("RankToken");
        #[cfg(all(debug_assertions, not(loom), not(feature = "shuttle")))]
        d.field("rank", &self.rank);
        d.finish()
    }
}

/// Registers that the current thread takes a lock of rank `rank`.
///
/// Call it *before* blocking on the lock, so an ordering bug is reported instead of deadlocking.
///
/// # Panics
/// In debug builds, if the current thread holds a lock of a greater rank (invariant 1), or already
/// holds a non-reentrant lock of the same rank (invariant 2). The message names both locks.
///
/// In every build (loom and shuttle included), taking `slots_lock` or `mmu_lock` from a thread
/// that holds a vCPU in guest mode panics here, before the lock is touched: a flusher holding
/// either lock may be waiting for that very vCPU's acknowledgement ([`super::guest_mode`]).
#[inline]
pub fn acquire(rank: LockRank) -> RankToken {
    match rank {
        LockRank::SlotsLock => super::guest_mode::refuse("taking slots_lock"),
        LockRank::MmuLock => super::guest_mode::refuse("taking mmu_lock"),
        _ => {}
    }
    #[cfg(all(debug_assertions, not(loom), not(feature = "shuttle")))]
    imp::acquire(rank);
    #[cfg(not(all(debug_assertions, not(loom), not(feature = "shuttle"))))]
    let _ = rank;
    RankToken {
        #[cfg(all(debug_assertions, not(loom), not(feature = "shuttle")))]
        rank,
        _not_send: PhantomData,
    }
}

/// Asserts that the current thread may block waiting for the readers of a lock of rank `rank`
/// (invariant 3): it holds no lock of rank `>= rank`.
///
/// # Panics
/// In debug builds, if it does; the message names the held lock and `what` the thread waits for.
#[inline]
pub fn assert_may_wait_for(rank: LockRank, what: &str) {
    #[cfg(all(debug_assertions, not(loom), not(feature = "shuttle")))]
    imp::assert_may_wait_for(rank, what);
    #[cfg(not(all(debug_assertions, not(loom), not(feature = "shuttle"))))]
    let _ = (rank, what);
}

/// Asserts that the current thread holds no lock of a rank greater than `rank`, besides the lock of
/// rank `rank` it already holds. Used before a held lock is dropped and retaken (`cond_resched`):
/// retaking it while a later-ranked lock is held would break invariant 1.
///
/// # Panics
/// In debug builds, if a lock of greater rank is held.
#[inline]
pub fn assert_none_held_above(rank: LockRank) {
    #[cfg(all(debug_assertions, not(loom), not(feature = "shuttle")))]
    imp::assert_none_held_above(rank);
    #[cfg(not(all(debug_assertions, not(loom), not(feature = "shuttle"))))]
    let _ = rank;
}

/// How many locks of rank `rank` the current thread holds (always 0 in release and loom builds).
#[inline]
pub fn held(rank: LockRank) -> usize {
    #[cfg(all(debug_assertions, not(loom), not(feature = "shuttle")))]
    {
        imp::held(rank)
    }
    #[cfg(not(all(debug_assertions, not(loom), not(feature = "shuttle"))))]
    {
        let _ = rank;
        0
    }
}

impl Drop for RankToken {
    #[inline]
    fn drop(&mut self) {
        #[cfg(all(debug_assertions, not(loom), not(feature = "shuttle")))]
        imp::release(self.rank);
    }
}

#[cfg(all(debug_assertions, not(loom), not(feature = "shuttle")))]
mod imp {
    use super::{LockRank, NR_RANKS};
    use std::cell::Cell;

    thread_local! {
        /// Per-rank count of locks the current thread holds.
        static HELD: [Cell<u32>; NR_RANKS] = const { [const { Cell::new(0) }; NR_RANKS] };
    }

    /// The greatest rank held by this thread that is above `rank`, if any.
    fn highest_above(held: &[Cell<u32>; NR_RANKS], rank: LockRank) -> Option<LockRank> {
        LockRank::ALL[rank.index() + 1..]
            .iter()
            .rev()
            .copied()
            .find(|r| held[r.index()].get() > 0)
    }

    pub(super) fn acquire(rank: LockRank) {
        HELD.with(|held| {
            if let Some(h) = highest_above(held, rank) {
                panic!(
                    "lock order violation: taking {rank} while holding {h} \
                     ({rank} must be taken before {h}; docs/locking.md lock order)"
                );
            }
            let c = &held[rank.index()];
            if c.get() > 0 && !rank.is_reentrant() {
                panic!(
                    "lock order violation: taking {rank} while holding {rank} \
                     (self-deadlock: {rank} is not reentrant)"
                );
            }
            c.set(c.get() + 1);
        });
    }

    pub(super) fn release(rank: LockRank) {
        HELD.with(|held| {
            let c = &held[rank.index()];
            // A token is created only by a successful `acquire` of the same rank on this thread
            // and is not `Send`, so the count cannot be zero here.
            assert!(
                c.get() > 0,
                "lock rank invariant broken: {rank} released but not held"
            );
            c.set(c.get() - 1);
        });
    }

    pub(super) fn assert_may_wait_for(rank: LockRank, what: &str) {
        HELD.with(|held| {
            if let Some(h) = LockRank::ALL[rank.index()..]
                .iter()
                .rev()
                .copied()
                .find(|r| held[r.index()].get() > 0)
            {
                panic!(
                    "lock order violation: waiting for {what} while holding {h} \
                     (readers of {rank} may be blocked behind {h}: deadlock)"
                );
            }
        });
    }

    pub(super) fn assert_none_held_above(rank: LockRank) {
        HELD.with(|held| {
            if let Some(h) = highest_above(held, rank) {
                panic!(
                    "lock order violation: retaking {rank} while holding {h} \
                     (drop {h} before yielding {rank})"
                );
            }
        });
    }

    pub(super) fn held(rank: LockRank) -> usize {
        HELD.with(|held| held[rank.index()].get() as usize)
    }
}

#[cfg(all(test, debug_assertions, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn ranks_are_ordered_outermost_first() {
        let mut sorted = LockRank::ALL;
        sorted.sort();
        assert_eq!(sorted, LockRank::ALL);
        assert!(LockRank::SlotsLock < LockRank::Rcu);
    }

    #[test]
    fn tokens_count_and_release_out_of_order() {
        let a = acquire(LockRank::MemslotsSrcu);
        let b = acquire(LockRank::MmuLock);
        let c = acquire(LockRank::Rcu);
        assert_eq!(held(LockRank::MmuLock), 1);
        drop(b);
        assert_eq!(held(LockRank::MmuLock), 0);
        assert_eq!(held(LockRank::Rcu), 1);
        drop(a);
        drop(c);
        for r in LockRank::ALL {
            assert_eq!(held(r), 0, "{r} still held");
        }
    }

    #[test]
    #[should_panic(expected = "taking slots_lock while holding mmu_lock")]
    fn inversion_names_both_locks() {
        let _m = acquire(LockRank::MmuLock);
        let _s = acquire(LockRank::SlotsLock);
    }

    #[test]
    #[should_panic(expected = "self-deadlock")]
    fn retaking_rmap_bit_panics() {
        let _a = acquire(LockRank::RmapBit);
        let _b = acquire(LockRank::RmapBit);
    }

    #[test]
    #[should_panic(expected = "waiting for")]
    fn waiting_inside_read_section_panics() {
        let _s = acquire(LockRank::MemslotsSrcu);
        assert_may_wait_for(LockRank::MemslotsSrcu, "test grace period");
    }

    #[test]
    fn waiting_under_outer_lock_is_allowed() {
        let _s = acquire(LockRank::SlotsLock);
        assert_may_wait_for(LockRank::MemslotsSrcu, "test grace period");
        assert_eq!(held(LockRank::SlotsLock), 1);
    }
}
