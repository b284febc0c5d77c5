//! Reverse maps of the shadow MMU, with the per-rmap LOCKED bit (spec §1.6, §3.8, §3.9).
//!
//! # Protocol
//! An rmap ([`RmapHead`], `struct kvm_rmap_head`) lists every shadow SPTE that maps one gfn at one
//! level. It is one word: 0 (empty), a single SPTE address, or (bit 0, MANY) the address of the head
//! [`PteListDesc`] of a chain. Bit 1 (LOCKED) is a bit spinlock that protects the *chain*, never the
//! SPTE values:
//! - **Lock** (`__kvm_rmap_lock`): load the word; if it is 0 return 0 *without locking*. Otherwise spin
//!   with plain loads while LOCKED is set (returning 0 if the rmap became empty meanwhile), then
//!   `compare_exchange_weak(old, old | LOCKED, Acquire)`. The result is the chain value, LOCKED clear.
//! - **Writers** ([`RmapHead::pte_list_add`], [`RmapHead::pte_list_remove`], [`RmapHead::zap_all`])
//!   hold `mmu_lock` for write (an [`MmuWrite`] witness), lock, build the new chain, and publish it
//!   and unlock in one Release store of the new value.
//! - **Read-only lockers** ([`RmapHead::lock_readonly`], used by lockless aging,
//!   [`RmapHead::age_rmap`]) hold no `mmu_lock`: they lock, walk, and unlock by storing back exactly the
//!   value they locked. Unlocking a lock that returned 0 does nothing.
//!
//! # Invariants (spec §4 items 21–27)
//! 1. **Encoding.** 0 never carries LOCKED (item 22): a locker that reads 0 returns 0 and writes
//!    nothing (item 21), and every unlock stores a value with LOCKED clear.
//! 2. **Mutual exclusion and publication.** At most one thread holds the bit (item 24): it is taken
//!    only by a successful CAS from a value without LOCKED, and released only by its holder. The
//!    Acquire CAS reads the Release store of the previous holder, so everything a holder wrote to the
//!    chain is visible to the next one; writers are in addition ordered among themselves by `mmu_lock`.
//! 3. **Only writers change chains, and they never free what a walker can reach.** Chains (head word
//!    and descriptors) change only under `mmu_lock` write (item 25), and a descriptor is freed only by
//!    such a writer while it holds the bit, after unlinking it from the value it will publish. A
//!    holder of the bit, and a holder of `mmu_lock` write, therefore never reach a freed descriptor.
//! 4. **Empty is unlocked.** A writer that finds 0 holds no bit but may publish a new chain with its
//!    Release store: read-only lockers that found 0 walk nothing and write nothing (seed 002), and
//!    other writers are excluded by `mmu_lock`.
//! 5. **SPTE memory (a requirement on callers).** Every [`SptePtr`] in a chain stays allocated until
//!    it has been removed from the rmap (which takes the bit) *and* no walker that held the bit before
//!    the removal can still use it, i.e. the shadow-page lifetime rule of spec §3.9 and item 33: a
//!    shadow page is freed only after all its SPTEs left their rmaps and a remote TLB flush. Under the
//!    bit an SPTE may go present → non-present (writers zap before they remove) but never
//!    non-present → present (item 26).
//! 6. **Read-only lockers restore.** While a read-only locker holds the bit, `val & !LOCKED` does not
//!    change, and its unlock stores exactly that value back (item 23; checked by an assertion).
//! 7. **Chain shape** (item 27). The head descriptor holds 1..=14 entries, every tail descriptor exactly
//!    14, `head.tail_count` is the sum of the tails; removal fills the hole with the head's last entry;
//!    a chain never converts from MANY back to a single pointer.
//!
//! # Lock order and waiting
//! The bit ranks after `mmu_lock` and before RCU (docs/locking.md, lock order); debug builds
//! register it with the lock-rank checker ([`LockRank::RmapBit`]), which also catches a nested
//! rmap operation inside a [`RmapHead::for_each_spte`] callback (a self-deadlock). Lockers spin with [`spin_hint`] and fall back
//! to [`yield_now`]: userspace cannot disable preemption, so a read-only holder must keep its critical
//! section tiny and never block in it (spec §3.9 "Why disable preemption"). An acquisition that
//! finds the bit held or loses its CAS counts once in [`RmapStats`], per kind of locker (writer or
//! read-only), as it first does.

mod desc;
pub mod hooks;
mod readonly;
mod spte_ptr;
mod stats;
#[cfg(all(test, not(loom)))]
mod tests;

use core::fmt;
use core::ops::ControlFlow;

pub use desc::{PTE_LIST_EXT, PteListDesc};
pub use readonly::RmapReadGuard;
pub use spte_ptr::{SPTE_ACCESSED_MASK, SPTE_PRESENT_MASK, SptePtr, spte_is_young};
use stats::Locker;
pub use stats::{RmapStats, RmapStatsSnapshot};

use desc::DescPtr;
use hooks::{YieldSite, force_cas_failure, maybe_yield};

use crate::sync::atomic::{AtomicUsize, Ordering};
use crate::sync::lock_rank::{self, LockRank, RankToken};
use crate::sync::witness::MmuWrite;
use crate::sync::{spin_hint, yield_now};

/// Bit 0 of the head word: the rest points to a [`PteListDesc`] (`KVM_RMAP_MANY`).
const RMAP_MANY: usize = 1 << 0;
/// Bit 1 of the head word: the bit lock (`KVM_RMAP_LOCKED`).
pub const RMAP_LOCKED: usize = 1 << 1;
/// Both tag bits.
const RMAP_TAGS: usize = RMAP_MANY | RMAP_LOCKED;

/// When [`RmapHead::pte_list_add`] returns more than this, the caller zaps the whole rmap
/// (`RMAP_RECYCLE_THRESHOLD` in `__rmap_add`).
pub const RMAP_RECYCLE_THRESHOLD: usize = 1000;

/// Spins with [`spin_hint`] before falling back to [`yield_now`].
const SPINS_BEFORE_YIELD: u32 = 64;

/// Errors of rmap writers. A failed operation leaves the rmap unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RmapError {
    /// `pte_list_remove` on an empty rmap.
    #[error("cannot remove {spte:?}: the rmap is empty")]
    Empty {
        /// The SPTE that was to be removed.
        spte: SptePtr,
    },
    /// `pte_list_remove` of an SPTE the (nonempty) rmap does not list.
    #[error("cannot remove {spte:?}: the rmap does not list it")]
    NotFound {
        /// The SPTE that was to be removed.
        spte: SptePtr,
    },
}

/// What [`RmapHead::age_rmap`] does with young SPTEs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgeAction {
    /// `kvm_test_age_gfn`: modify nothing; stop at the first young SPTE.
    TestOnly,
    /// `kvm_age_gfn`: clear the Accessed bit of every young SPTE.
    Clear,
}

/// The shape of one descriptor, for diagnostics and tests ([`RmapHead::shape`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DescShape {
    /// Entries in the descriptor.
    pub spte_count: usize,
    /// Entries in all descriptors after it.
    pub tail_count: usize,
}

/// The shape of an rmap chain, for diagnostics and tests ([`RmapHead::shape`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RmapShape {
    /// No entries.
    Empty,
    /// One entry stored directly in the head word.
    Single,
    /// A chain of descriptors, head first.
    Many(Vec<DescShape>),
}

/// The decoded value of a head word with LOCKED masked off.
#[derive(Clone, Copy)]
enum Chain {
    Empty,
    Single(SptePtr),
    Many(DescPtr),
}

/// Decodes a chain value.
///
/// # Safety
/// `val` (LOCKED clear) must be a value published by this module's writers.
#[inline]
unsafe fn decode(val: usize) -> Chain {
    debug_assert_eq!(val & RMAP_LOCKED, 0, "decode of a locked value");
    if val == 0 {
        Chain::Empty
    } else if val & RMAP_MANY == 0 {
        // SAFETY: per the contract a single-entry value is an `SptePtr` word.
        Chain::Single(unsafe { SptePtr::from_word(val) })
    } else {
        // SAFETY: per the contract a MANY value is a descriptor word with bit 0 set.
        Chain::Many(unsafe { DescPtr::from_word(val & !RMAP_TAGS) })
    }
}

/// Calls `f` on every SPTE of the chain `val`, head descriptor first, in order (`rmap_get_first/next`).
///
/// # Safety
/// `val` is the current chain of an rmap, and the caller holds its bit or `mmu_lock` for write
/// (invariant 3), for the whole call.
#[inline]
pub(super) unsafe fn walk(
    val: usize,
    mut f: impl FnMut(SptePtr) -> ControlFlow<()>,
) -> ControlFlow<()> {
    // SAFETY: per the contract `val` is a published chain value.
    match unsafe { decode(val) } {
        Chain::Empty => ControlFlow::Continue(()),
        Chain::Single(spte) => f(spte),
        Chain::Many(mut d) => loop {
            // SAFETY: the caller holds the bit or `mmu_lock` write, so no descriptor of the chain is
            // freed during the walk (invariant 3).
            let desc = unsafe { d.get() };
            for i in 0..desc.count() {
                f(desc.get(i))?;
            }
            match desc.more() {
                Some(next) => d = next,
                None => return ControlFlow::Continue(()),
            }
        },
    }
}

/// Waits one round for a bit holder: spin briefly, then yield.
#[inline]
fn backoff(spins: &mut u32) {
    if *spins < SPINS_BEFORE_YIELD {
        *spins += 1;
        spin_hint();
    } else {
        yield_now();
    }
}

/// The head of one rmap (`struct kvm_rmap_head`): a single word (invariant 1).
pub struct RmapHead {
    val: AtomicUsize,
}

impl Default for RmapHead {
    fn default() -> Self {
        RmapHead::new()
    }
}

impl fmt::Debug for RmapHead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RmapHead({:#x})", self.raw_value())
    }
}

impl Drop for RmapHead {
    fn drop(&mut self) {
        // Dropping a nonempty rmap leaks its descriptors: owners `zap_all` first (DESIGN
        // invariant 5 in docs/invariants.md, allocations equal frees at teardown).
        if !std::thread::panicking() {
            debug_assert_eq!(
                self.raw_value(),
                0,
                "rmap lifetime invariant broken: a nonempty rmap was dropped (zap_all it first)"
            );
        }
    }
}

/// A writer's hold on the bit; `val` is 0 if the rmap was empty (nothing locked, invariant 4).
struct WriteLock<'a> {
    head: &'a RmapHead,
    val: usize,
    _rank: Option<RankToken>,
}

impl WriteLock<'_> {
    /// Publishes `new` and releases the bit in one store (`kvm_rmap_unlock`).
    #[inline]
    fn unlock(self, new: usize) {
        debug_assert_eq!(
            new & RMAP_LOCKED,
            0,
            "rmap invariant 1: unlock value has LOCKED"
        );
        // ORDERING: Release: publishes the descriptors written under the bit to the next locker's
        // Acquire CAS (invariant 2).
        self.head.val.store(new, Ordering::Release);
    }
}

impl RmapHead {
    /// An empty rmap.
    pub fn new() -> RmapHead {
        RmapHead {
            val: AtomicUsize::new(0),
        }
    }

    /// The head word as it is now, LOCKED bit included (diagnostics and tests): 0 when empty, the
    /// SPTE's [`SptePtr::addr`] for a single entry, a descriptor address with bit 0 set otherwise.
    pub fn raw_value(&self) -> usize {
        // ORDERING: Relaxed: a diagnostic snapshot; nothing is dereferenced through it.
        self.val.load(Ordering::Relaxed)
    }

    /// True if the rmap lists no SPTE (a racy hint for lockless callers).
    pub fn is_empty(&self) -> bool {
        self.raw_value() == 0
    }

    /// `__kvm_rmap_lock`: returns the chain value (LOCKED clear), or 0 without locking if the rmap
    /// is or becomes empty (invariant 1).
    /// An acquisition that sees LOCKED or loses its CAS counts once as contended for `who`, when
    /// it first does (so a holder can watch a waiter arrive).
    #[inline]
    fn lock_raw(&self, stats: &RmapStats, who: Locker) -> usize {
        // ORDERING: Relaxed: a hint; only the Acquire CAS below synchronizes with the previous
        // holder. Returning 0 after a Relaxed load is sound: the caller then walks nothing
        // (invariants 1 and 4), and writers see the latest chain through `mmu_lock`.
        let mut old = self.val.load(Ordering::Relaxed);
        if old == 0 {
            return 0;
        }
        let mut contended = false;
        let mut spins = 0;
        let locked = loop {
            while old & RMAP_LOCKED != 0 {
                if !contended {
                    contended = true;
                    stats.note_contended(who);
                }
                backoff(&mut spins);
                // ORDERING: Relaxed: spinning on a plain load keeps the line shared; see above.
                old = self.val.load(Ordering::Relaxed);
            }
            if old == 0 {
                break 0;
            }
            // Test hooks (nothing without `test-hooks`): a preemption between the read and the
            // CAS, or a CAS that fails as a spurious `compare_exchange_weak` failure does; both
            // are paths this loop takes anyway (hooks invariant 1).
            maybe_yield(YieldSite::BeforeLockCas);
            let res = if force_cas_failure() {
                // ORDERING: Relaxed, as the failure ordering of the CAS it stands in for.
                Err(self.val.load(Ordering::Relaxed))
            } else {
                // ORDERING: Acquire on success: lock acquisition, pairs with the previous
                // holder's Release unlock (invariant 2). Relaxed on failure: we retry.
                self.val.compare_exchange_weak(
                    old,
                    old | RMAP_LOCKED,
                    Ordering::Acquire,
                    Ordering::Relaxed,
                )
            };
            match res {
                Ok(_) => break old,
                Err(cur) => {
                    if !contended {
                        contended = true;
                        stats.note_contended(who);
                    }
                    old = cur;
                }
            }
        };
        if locked != 0 {
            // Test hook: the holder is preempted with the bit held (hooks invariant 1).
            maybe_yield(YieldSite::HoldingLock);
        }
        locked
    }

    /// `kvm_rmap_lock`: a writer's lock, registered with the lock-rank checker.
    #[inline]
    fn lock_write(&self, w: &MmuWrite, stats: &RmapStats) -> WriteLock<'_> {
        stats.check_witness(w);
        let rank = lock_rank::acquire(LockRank::RmapBit);
        let val = self.lock_raw(stats, Locker::Writer);
        WriteLock {
            head: self,
            val,
            _rank: (val != 0).then_some(rank),
        }
    }

    /// Adds `spte` (`pte_list_add`) and returns how many entries the rmap had before.
    ///
    /// The caller compares the result with [`RMAP_RECYCLE_THRESHOLD`]. Allocates a descriptor when
    /// the rmap goes from one entry to two, or when the head descriptor is full.
    pub fn pte_list_add(&self, w: &MmuWrite, stats: &RmapStats, spte: SptePtr) -> usize {
        let lock = self.lock_write(w, stats);
        // SAFETY: `lock.val` was published by a writer of this module (invariant 3).
        let (before, new) = match unsafe { decode(lock.val) } {
            Chain::Empty => (0, spte.to_word()),
            Chain::Single(first) => {
                let d = DescPtr::alloc(stats, None, 0);
                // SAFETY: freshly allocated and not yet published.
                let desc = unsafe { d.get() };
                desc.push(first);
                desc.push(spte);
                (1, d.to_word() | RMAP_MANY)
            }
            Chain::Many(h) => {
                // SAFETY: we hold the bit and `mmu_lock` write (invariant 3).
                let head = unsafe { h.get() };
                let total = head.count() + head.tail_count();
                if head.count() == PTE_LIST_EXT {
                    let d = DescPtr::alloc(stats, Some(h), total);
                    // SAFETY: freshly allocated and not yet published.
                    unsafe { d.get() }.push(spte);
                    (total, d.to_word() | RMAP_MANY)
                } else {
                    head.push(spte);
                    (total, lock.val)
                }
            }
        };
        lock.unlock(new);
        before
    }

    /// Adds a leaf `spte` to its gfn's rmap (the rmap part of `__rmap_add`): [`RmapHead::pte_list_add`],
    /// and records the count it returns as the VM's `max_mmu_rmap_size` if it is the largest yet
    /// ([`RmapStatsSnapshot::max_rmap_size`]). Parent-pointer lists use `pte_list_add` directly.
    pub fn rmap_add(&self, w: &MmuWrite, stats: &RmapStats, spte: SptePtr) -> usize {
        let before = self.pte_list_add(w, stats, spte);
        stats.note_rmap_size(before);
        before
    }

    /// Removes one occurrence of `spte` (`pte_list_remove`).
    ///
    /// The hole is filled with the head descriptor's last entry, so tails stay full; an emptied head
    /// descriptor is freed and its successor becomes the head. On error the rmap is unchanged.
    pub fn pte_list_remove(
        &self,
        w: &MmuWrite,
        stats: &RmapStats,
        spte: SptePtr,
    ) -> Result<(), RmapError> {
        let lock = self.lock_write(w, stats);
        // SAFETY: `lock.val` was published by a writer of this module (invariant 3).
        match unsafe { decode(lock.val) } {
            // Nothing was locked (invariant 4): leave the word alone.
            Chain::Empty => Err(RmapError::Empty { spte }),
            Chain::Single(only) => {
                if only == spte {
                    lock.unlock(0);
                    Ok(())
                } else {
                    let old = lock.val;
                    lock.unlock(old);
                    Err(RmapError::NotFound { spte })
                }
            }
            Chain::Many(h) => {
                // SAFETY: we hold the bit and `mmu_lock` write (invariant 3).
                let Some((d, i)) = (unsafe { find(h, spte) }) else {
                    let old = lock.val;
                    lock.unlock(old);
                    return Err(RmapError::NotFound { spte });
                };
                // SAFETY: as above; `h` and `d` are descriptors of the locked chain.
                let (head, desc) = unsafe { (h.get(), d.get()) };
                let last = head.pop();
                if (d, i) != (h, head.count()) {
                    desc.set(i, last);
                }
                let new = if head.count() == 0 {
                    let new = head.more().map_or(0, |m| m.to_word() | RMAP_MANY);
                    // SAFETY: we hold the bit and `mmu_lock` write, and `h` is unlinked from `new`,
                    // the value we publish; nothing uses `head` after this (invariant 3).
                    unsafe { h.free(stats) };
                    new
                } else {
                    lock.val
                };
                lock.unlock(new);
                Ok(())
            }
        }
    }

    /// Clears every SPTE with `clear` and empties the rmap, freeing its descriptors
    /// (`kvm_zap_all_rmap_sptes`). Returns false, calling nothing, if the rmap was empty; true
    /// otherwise: the caller must flush remote TLBs before dropping `mmu_lock`.
    ///
    /// `clear` must zap the SPTE (`mmu_spte_clear_track_bits`); it must not call into any rmap
    /// (it runs under this rmap's bit).
    pub fn zap_all(&self, w: &MmuWrite, stats: &RmapStats, mut clear: impl FnMut(SptePtr)) -> bool {
        let lock = self.lock_write(w, stats);
        if lock.val == 0 {
            return false;
        }
        #[cfg(feature = "broken-rmap-flush-if-young")]
        let mut any_young = false;
        // SAFETY: we hold the bit and `mmu_lock` write; `lock.val` is the current chain.
        let _ = unsafe {
            walk(lock.val, |spte| {
                #[cfg(feature = "broken-rmap-flush-if-young")]
                {
                    any_young |= spte_is_young(spte.load_lockless());
                }
                clear(spte);
                ControlFlow::Continue(())
            })
        };
        // SAFETY: `lock.val` is a published chain value.
        if let Chain::Many(mut d) = unsafe { decode(lock.val) } {
            loop {
                // SAFETY: we hold the bit and `mmu_lock` write; `d` is still linked only from
                // descriptors we free in this loop and from the value we replace with 0 below.
                let next = unsafe { d.get() }.more();
                // SAFETY: as above; nothing reads `d` after this (invariant 3).
                unsafe { d.free(stats) };
                match next {
                    Some(n) => d = n,
                    None => break,
                }
            }
        }
        lock.unlock(0);
        // The deliberately broken build of feature `broken-rmap-flush-if-young` (test-only; the
        // torture tests assert it is caught): asks for the flush only if a zapped SPTE was young,
        // as if an SPTE whose Accessed bit is clear could not be cached in a TLB. But aging clears
        // Accessed without flushing (and a TLB hit never sets it again), so a vCPU may still hold
        // the translation: skipping the flush leaves a stale translation to a frame the host is
        // about to free or write-protect (violates spec §3.1 step 4 and §3.10).
        #[cfg(feature = "broken-rmap-flush-if-young")]
        return any_young;
        #[cfg(not(feature = "broken-rmap-flush-if-young"))]
        true
    }

    /// Entries in the rmap (`pte_list_count`). `stats` are the VM's rmap statistics, which name
    /// the `mmu_lock` `w` must be a witness of.
    ///
    /// # Panics
    /// If `w` is a witness of another `mmu_lock` than the one these rmaps are bound to.
    pub fn count(&self, w: &MmuWrite, stats: &RmapStats) -> usize {
        stats.check_witness(w);
        // ORDERING: Relaxed: `mmu_lock` write orders us after the writer that published the chain;
        // a concurrent read-only locker only toggles LOCKED (invariant 6).
        let val = self.val.load(Ordering::Relaxed) & !RMAP_LOCKED;
        // SAFETY: a chain value published by a writer (invariant 3).
        match unsafe { decode(val) } {
            Chain::Empty => 0,
            Chain::Single(_) => 1,
            Chain::Many(h) => {
                // SAFETY: `mmu_lock` write: only we could free descriptors (invariant 3).
                let head = unsafe { h.get() };
                head.count() + head.tail_count()
            }
        }
    }

    /// Calls `f` on every SPTE of the rmap, in chain order (`for_each_rmap_spte`).
    ///
    /// Holds the bit during the walk, so `f` must not call into this rmap (that self-deadlocks;
    /// debug builds panic through the lock-rank checker).
    pub fn for_each_spte(&self, w: &MmuWrite, stats: &RmapStats, mut f: impl FnMut(SptePtr)) {
        let lock = self.lock_write(w, stats);
        if lock.val == 0 {
            return;
        }
        // SAFETY: we hold the bit and `mmu_lock` write.
        let _ = unsafe {
            walk(lock.val, |spte| {
                f(spte);
                ControlFlow::Continue(())
            })
        };
        let old = lock.val;
        lock.unlock(old);
    }

    /// The chain's shape (diagnostics and tests of invariant 7). Allocates.
    ///
    /// # Panics
    /// As [`RmapHead::count`], for a witness of another `mmu_lock`.
    pub fn shape(&self, w: &MmuWrite, stats: &RmapStats) -> RmapShape {
        stats.check_witness(w);
        // ORDERING: Relaxed: as in `count`.
        let val = self.val.load(Ordering::Relaxed) & !RMAP_LOCKED;
        // SAFETY: a chain value published by a writer (invariant 3).
        match unsafe { decode(val) } {
            Chain::Empty => RmapShape::Empty,
            Chain::Single(_) => RmapShape::Single,
            Chain::Many(h) => {
                let mut descs = Vec::new();
                let mut d = Some(h);
                while let Some(p) = d {
                    // SAFETY: `mmu_lock` write: only we could free descriptors (invariant 3).
                    let desc = unsafe { p.get() };
                    descs.push(DescShape {
                        spte_count: desc.count(),
                        tail_count: desc.tail_count(),
                    });
                    d = desc.more();
                }
                RmapShape::Many(descs)
            }
        }
    }

    /// `kvm_rmap_lock_readonly`: locks the rmap without `mmu_lock`, for a read-only walk.
    ///
    /// If the rmap is (or becomes, while waiting) empty, nothing is locked and the returned guard is
    /// empty. Keep the guard's lifetime tiny and never block while holding it.
    #[inline]
    pub fn lock_readonly<'a>(&'a self, stats: &RmapStats) -> RmapReadGuard<'a> {
        let rank = lock_rank::acquire(LockRank::RmapBit);
        let val = self.lock_raw(stats, Locker::ReadOnly);
        RmapReadGuard::new(self, val, (val != 0).then_some(rank))
    }

    /// Ages the SPTEs of this rmap without `mmu_lock` (the body of `kvm_rmap_age_gfn_range`).
    ///
    /// Locks read-only, reads each SPTE once and skips non-present ones. Returns true if a present
    /// SPTE had Accessed set; with [`AgeAction::TestOnly`] it stops (and unlocks) at the first one and
    /// modifies nothing, with [`AgeAction::Clear`] it clears Accessed on each with one atomic AND.
    #[inline]
    pub fn age_rmap(&self, stats: &RmapStats, action: AgeAction) -> bool {
        let (mut visited, mut cleared) = (0, 0);
        self.age_rmap_counted(stats, action, &mut visited, &mut cleared)
    }

    /// [`RmapHead::age_rmap`], also adding to `visited` the number of SPTEs it read and to
    /// `cleared` the Accessed bits it cleared (statistics kept in the caller's locals, so the
    /// lockless path writes no shared cache line).
    #[inline]
    pub fn age_rmap_counted(
        &self,
        stats: &RmapStats,
        action: AgeAction,
        visited: &mut u64,
        cleared: &mut u64,
    ) -> bool {
        let guard = self.lock_readonly(stats);
        let young = guard.age(action, visited, cleared);
        guard.unlock();
        young
    }

    /// True if, at the moment of one load, this rmap listed exactly `spte` and nothing else, with
    /// the bit clear (the head word equals `spte`'s word). A racy hint that dereferences nothing:
    /// the table-order aging scan uses it to prove that no *other* SPTE maps the rmap's gfn
    /// (docs/invariants.md "Shadow aging in table order").
    #[inline]
    pub fn lists_only(&self, spte: SptePtr) -> bool {
        // ORDERING: Relaxed: nothing is read through the value; the caller reads `spte` through a
        // page it keeps alive by other means (a bit it holds), and a chain published after this
        // load is a mapping made after the walk's linearization point (invariant 4).
        self.val.load(Ordering::Relaxed) == spte.to_word()
    }
}

/// Ages one SPTE of a locked (or otherwise pinned) rmap walk: reads it once and ages it with
/// [`age_loaded`]. Adds 1 to `visited`. The per-SPTE step of every shadow aging path.
#[inline]
pub fn age_one(
    sptep: SptePtr,
    action: AgeAction,
    young: &mut bool,
    visited: &mut u64,
    cleared: &mut u64,
) -> ControlFlow<()> {
    *visited += 1;
    age_loaded(sptep, sptep.load_lockless(), action, young, cleared)
}

/// Ages an SPTE whose value `old` was just read once ([`SptePtr::load_lockless`]): if it is present
/// and young, sets `*young` and either stops ([`AgeAction::TestOnly`], `Break`) or ages it
/// ([`AgeAction::Clear`]: clears its Accessed bit with one atomic AND, or marks an A/D-disabled
/// SPTE for access tracking with one CAS) and adds 1 to `cleared` if this call aged it.
#[inline]
pub fn age_loaded(
    sptep: SptePtr,
    old: u64,
    action: AgeAction,
    young: &mut bool,
    cleared: &mut u64,
) -> ControlFlow<()> {
    if !spte_is_young(old) {
        return ControlFlow::Continue(());
    }
    *young = true;
    match action {
        AgeAction::TestOnly => ControlFlow::Break(()),
        AgeAction::Clear => {
            // Test hook: a vCPU may set Dirty, or a page zap clear the SPTE, between our read
            // and our clear; the atomic AND keeps both (hooks invariant 1).
            maybe_yield(YieldSite::AgeBeforeClear);
            // An A/D-disabled SPTE is marked for access tracking by one CAS instead (AD1); it
            // counts as cleared only if this call's CAS won.
            *cleared += u64::from(sptep.age(old));
            ControlFlow::Continue(())
        }
    }
}

/// Locate `spte` in the chain headed by `h`.
///
/// # Safety
/// The caller holds the chain's bit and `mmu_lock` write.
unsafe fn find(h: DescPtr, spte: SptePtr) -> Option<(DescPtr, usize)> {
    let mut d = Some(h);
    while let Some(p) = d {
        // SAFETY: per the contract no descriptor of the chain is freed meanwhile (invariant 3).
        let desc = unsafe { p.get() };
        if let Some(i) = (0..desc.count()).find(|&i| desc.get(i) == spte) {
            return Some((p, i));
        }
        d = desc.more();
    }
    None
}
