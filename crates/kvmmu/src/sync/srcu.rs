//! Sleepable RCU (SRCU) protecting the published memslot sets.
//!
//! Protocol (classic counter-based SRCU, as Linux's `srcu_read_lock` / `synchronize_srcu` before
//! Tree SRCU): the domain has a current index `idx` ∈ {0, 1} and, per index, a `lock` and an
//! `unlock` counter, striped over cache-padded stripes so readers on different threads write
//! different cache lines. A reader reads `idx`, increments `lock[idx]` on its stripe, executes a
//! full fence (B), and reads published pointers; on exit it increments `unlock[idx]` on the same
//! stripe with Release. A writer publishes a new pointer (Release), then `synchronize` flips `idx`
//! and waits until the old index's unlock sum equals its lock sum, and does so twice.
//!
//! **Owned stripes (issue 15).** A thread claims one of [`OWNED_STRIPES`] stripe numbers for its
//! lifetime (a global claim word, released when the thread exits); in every domain, stripe `k`'s
//! `unlock` counters are then written only by the thread owning `k` (a guard is not `Send`), so
//! its unlock is a plain `Release` store of the counter plus one (Linux's per-CPU `this_cpu_inc`,
//! which is not atomic against other CPUs either), not a locked RMW: a reader writes only its own
//! line, and the unlock costs a store. Threads that find every number claimed use the shared
//! stripe with RMWs, as before. The lock increment stays a locked RMW on every stripe: it is
//! fence B as well (see `increment_then_full_fence`). See docs/locking.md, "SRCU readers write
//! their own line".
//!
//! Invariants:
//! 1. **Grace period.** `synchronize` returns only after every read section that started before it
//!    was called has ended: such a reader incremented `lock[i]` for some `i`, and both indices are
//!    drained after a flip, so the reader is either counted (and waited for) or, if its increment
//!    was not yet visible to the check, its fence (B) is ordered after the check's fence (D) and it
//!    reads the newly published pointer, never the retired one.
//! 2. **Why twice.** A reader may read `idx` before a flip and increment the old index after the
//!    writer checked it. It then sits, unseen, in an index the *next* single-flip synchronize would
//!    not check. Draining both indices after flipping catches it (the classic SRCU bug that
//!    `Srcu::synchronize_broken_single_flip` reproduces for the loom test).
//! 3. **Counting.** `unlock` sums are read before `lock` sums (with the fence D between), so a
//!    counted unlock always has its lock counted too; equality means no reader of that index is
//!    in flight. Counters wrap; only equality is tested.
//! 4. **Readers never block writers' publication**, and writers never block readers: `read_lock` is
//!    one RMW on the thread's own stripe plus a fence; it takes no lock and allocates nothing.
//! 5. **Lifetimes.** [`SrcuCell::load`] returns a reference tied to the guard; the pointer it came
//!    from is freed only by [`Retired`] after a grace period of the same [`Srcu`] (a cell is bound
//!    to one domain at its first use and panics if used with another).
//!
//! Lock rank: a read section registers [`LockRank::MemslotsSrcu`] (reentrant); `synchronize`
//! asserts the caller is in no read section and holds no inner lock (spec §2.2 rule 2).

use core::fmt;

use super::atomic::{AtomicPtr, AtomicUsize, Ordering, fence};
use super::lock_rank::{self, LockRank, RankToken};
use super::{Arc, Mutex};

/// Stripes a thread can own exclusively (one bit each in the global claim word). Small under loom
/// to keep the state space small.
#[cfg(not(loom))]
const OWNED_STRIPES: usize = 64;
#[cfg(loom)]
const OWNED_STRIPES: usize = 3;
/// The index of the shared stripe, used with read-modify-writes by every thread that owns none.
const SHARED: usize = OWNED_STRIPES;

/// One stripe: the lock and unlock counters of both indices, alone in its cache line(s).
#[repr(align(128))]
struct Stripe {
    lock: [AtomicUsize; 2],
    unlock: [AtomicUsize; 2],
}

impl Stripe {
    fn new() -> Self {
        Stripe {
            lock: [AtomicUsize::new(0), AtomicUsize::new(0)],
            unlock: [AtomicUsize::new(0), AtomicUsize::new(0)],
        }
    }
}

/// A sleepable RCU domain (Linux's `struct srcu_struct`).
pub struct Srcu {
    /// Current index; only its low bit is used. Written only under `gp_lock`.
    idx: AtomicUsize,
    /// Serializes grace periods (Linux's `srcu_gp_mutex`).
    gp_lock: Mutex<()>,
    /// `OWNED_STRIPES` owned stripes, then the shared one (index [`SHARED`]).
    stripes: Box<[Stripe]>,
}

impl fmt::Debug for Srcu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Srcu")
            .field("stripes", &self.stripes.len())
            .finish_non_exhaustive()
    }
}

impl Default for Srcu {
    fn default() -> Self {
        Srcu::new()
    }
}

/// The stripe this thread owns, or [`SHARED`]: the thread's claim on a stripe number, released
/// when the thread exits (its thread-local destructor).
#[cfg(not(any(loom, feature = "shuttle")))]
mod claim {
    use super::{OWNED_STRIPES, SHARED};
    use std::sync::atomic::{AtomicU64, Ordering};

    const _: () = assert!(OWNED_STRIPES == 64, "one claim bit per owned stripe");

    /// Bit `k` set: stripe number `k` is owned by a live thread.
    static CLAIMED: AtomicU64 = AtomicU64::new(0);

    /// This thread's claim.
    pub(super) struct Claim(usize);

    impl Claim {
        fn new() -> Claim {
            // ORDERING: Relaxed first read; the CAS re-validates.
            let mut cur = CLAIMED.load(Ordering::Relaxed);
            loop {
                let free = !cur;
                if free == 0 {
                    return Claim(SHARED);
                }
                let k = free.trailing_zeros() as usize;
                // ORDERING: Acquire on success pairs with the previous owner's Release in `drop`:
                // its last plain stores to stripe `k`'s counters (in every domain) happen-before
                // our first load of them, so our read-increment-store continues from its value.
                match CLAIMED.compare_exchange_weak(
                    cur,
                    cur | (1 << k),
                    Ordering::Acquire,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => return Claim(k),
                    Err(now) => cur = now,
                }
            }
        }
    }

    impl Drop for Claim {
        fn drop(&mut self) {
            // From now on this thread owns no number, for `owned` too (before the release: the
            // number may be claimed by another thread right after it).
            let _ = OWNED.try_with(|c| c.set(SHARED));
            if self.0 < OWNED_STRIPES {
                // ORDERING: Release: see `Claim::new`.
                CLAIMED.fetch_and(!(1u64 << self.0), Ordering::Release);
            }
        }
    }

    /// `OWNED` before this thread's first call of [`owned`].
    const UNKNOWN: usize = usize::MAX;

    thread_local! {
        static CLAIM: Claim = Claim::new();
        /// A copy of this thread's claim for [`owned`]: no destructor, so reading it is one
        /// load; [`UNKNOWN`] until the first call, [`SHARED`] once the claim is released.
        static OWNED: core::cell::Cell<usize> = const { core::cell::Cell::new(UNKNOWN) };
    }

    /// [`stripe`], cached in a destructor-free thread-local (the per-event counters' path).
    #[inline(always)]
    pub(super) fn owned() -> usize {
        let k = OWNED.with(|c| c.get());
        if k != UNKNOWN {
            return k;
        }
        let k = stripe();
        OWNED.with(|c| c.set(k));
        k
    }

    /// The stripe the calling thread owns, or [`SHARED`] (no number free, or the thread is
    /// exiting and its claim is gone).
    #[inline]
    pub(super) fn stripe() -> usize {
        CLAIM.try_with(|c| c.0).unwrap_or(SHARED)
    }
}

/// Under shuttle every scheduled "thread" may share one OS thread's thread-locals: all use the
/// shared stripe.
#[cfg(all(feature = "shuttle", not(loom)))]
mod claim {
    /// Always the shared stripe.
    #[inline]
    pub(super) fn stripe() -> usize {
        super::SHARED
    }
}

/// Under loom the stripe is the loom thread number (unique within an execution, so owned by
/// construction, and deterministic across re-executions); threads past [`OWNED_STRIPES`] share.
#[cfg(loom)]
mod claim {
    /// The loom thread number if below `OWNED_STRIPES`, else the shared stripe.
    pub(super) fn stripe() -> usize {
        // `ThreadId`'s `Debug` form is `ThreadId(N)`, N the per-execution thread number.
        let id = format!("{:?}", loom::thread::current().id());
        let n: usize = id
            .trim_start_matches("ThreadId(")
            .trim_end_matches(')')
            .parse()
            .unwrap_or(super::SHARED);
        if n < super::OWNED_STRIPES {
            n
        } else {
            super::SHARED
        }
    }
}

/// The stripe number the calling thread owns for its lifetime (`claim`, below 64), or a number
/// `>= 64` if it owns none (every number claimed, the thread exiting, or a loom/shuttle build).
/// Another per-thread structure may use it to give each owning thread a slot that only that
/// thread writes, with the same hand-over between successive owners (the claim's `Release` on
/// release, `Acquire` on claim): `sync/percpu.rs`'s counters (docs/locking.md, "Counters a thread
/// owns").
#[cfg(not(any(loom, feature = "shuttle")))]
#[inline(always)]
pub(crate) fn owned_stripe() -> usize {
    claim::owned()
}

/// Under loom and shuttle no thread owns a number for other structures (see above).
#[cfg(any(loom, feature = "shuttle"))]
#[inline]
pub(crate) fn owned_stripe() -> usize {
    usize::MAX
}

impl Srcu {
    /// Creates a domain with no readers.
    pub fn new() -> Srcu {
        Srcu {
            idx: AtomicUsize::new(0),
            gp_lock: Mutex::new(()),
            stripes: (0..=OWNED_STRIPES).map(|_| Stripe::new()).collect(),
        }
    }

    /// A non-zero identity, unique among live domains and stable when the `Srcu` is moved: the
    /// address of its heap-allocated stripes.
    fn domain_id(&self) -> usize {
        self.stripes.as_ptr() as usize
    }

    /// Enters a read section (Linux's `srcu_read_lock`); the guard's drop leaves it.
    ///
    /// Writes only the calling thread's stripe; takes no lock and allocates nothing. Read sections
    /// nest and may be held across blocking work.
    ///
    /// # Panics
    /// In debug builds, if the thread holds a lock ranked after the memslots SRCU (lock order).
    #[inline]
    pub fn read_lock(&self) -> SrcuGuard<'_> {
        let rank = lock_rank::acquire(LockRank::MemslotsSrcu);
        let stripe = claim::stripe();
        // ORDERING: Relaxed: a stale index is harmless (invariant 2: both indices are drained after
        // every flip); the fence below orders the increment against the section's loads.
        let idx = self.idx.load(Ordering::Relaxed) & 1;
        increment_then_full_fence(&self.stripes[stripe].lock[idx]);
        SrcuGuard {
            srcu: self,
            stripe,
            idx,
            _rank: rank,
        }
    }

    /// Waits for a grace period (Linux's `synchronize_srcu`): returns only after every read section
    /// that started before the call has ended.
    ///
    /// # Panics
    /// In debug builds, if the calling thread is inside a read section or holds a lock ranked after
    /// the memslots SRCU (that would deadlock: spec §2.2 rule 2).
    pub fn synchronize(&self) {
        lock_rank::assert_may_wait_for(LockRank::MemslotsSrcu, "an SRCU grace period");
        let _gp = self.gp_lock.lock();
        // ORDERING: fence A: everything the caller did before (e.g. publishing a new pointer with
        // Release) is ordered before the flips and checks below, for fence B's pairing.
        fence(Ordering::SeqCst);
        self.flip_and_wait();
        self.flip_and_wait();
    }

    /// The classic broken SRCU: flip once and wait once. Kept only so the loom test can show that
    /// the model catches it (invariant 2); never use it.
    #[cfg(any(loom, test, feature = "test-hooks"))]
    pub fn synchronize_broken_single_flip(&self) {
        let _gp = self.gp_lock.lock();
        // ORDERING: as in `synchronize` (fence A).
        fence(Ordering::SeqCst);
        self.flip_and_wait();
    }

    /// Flips the index and waits until the old index has no reader in flight. Caller holds `gp_lock`.
    fn flip_and_wait(&self) {
        // ORDERING: Relaxed: `idx` is written only under `gp_lock`, so this reads our own last value.
        let old = self.idx.load(Ordering::Relaxed) & 1;
        // ORDERING: Relaxed store; readers tolerate stale indices (invariant 2) and the check below
        // starts with fence D.
        self.idx.store(old ^ 1, Ordering::Relaxed);
        let mut spins = 0u32;
        while !self.readers_done(old) {
            backoff(&mut spins);
        }
        // ORDERING: fence (SeqCst) after the check: the caller's later frees are ordered after the
        // Acquire reads of the unlock counters (readers' sections happen-before them).
        fence(Ordering::SeqCst);
    }

    /// True if index `idx` has no reader in flight (Linux's `srcu_readers_active_idx_check`).
    fn readers_done(&self, idx: usize) -> bool {
        let mut unlocks = 0usize;
        for s in self.stripes.iter() {
            // ORDERING: Acquire pairs with the reader's Release unlock: its section happens-before
            // whatever the writer does after the grace period (invariant 5), and its lock increment
            // is visible to the lock sum below (invariant 3).
            unlocks = unlocks.wrapping_add(s.unlock[idx].load(Ordering::Acquire));
        }
        // ORDERING: fence D (SeqCst) pairs with readers' fence B (invariant 1).
        fence(Ordering::SeqCst);
        let mut locks = 0usize;
        for s in self.stripes.iter() {
            // ORDERING: Relaxed: fence D orders these loads after the unlock sum and pairs with B.
            locks = locks.wrapping_add(s.lock[idx].load(Ordering::Relaxed));
        }
        locks == unlocks
    }
}

/// `counter += 1` followed by fence B (Linux's `this_cpu_inc(lock_count); smp_mb()`).
///
/// ORDERING: fence B (SeqCst) pairs with fence D in `readers_done`: either the writer's check sees
/// this increment, or the read section's later loads see everything the writer did before its
/// check, including publication of the new pointer (invariant 1).
#[inline(always)]
fn increment_then_full_fence(counter: &AtomicUsize) {
    #[cfg(all(target_arch = "x86_64", not(loom), not(miri)))]
    {
        // A `lock`-prefixed RMW is a full barrier on x86 (SDM vol. 3 §9.2.2: locked instructions
        // have a total order and are not reordered with any load or store), so one `lock add` is
        // both the increment and fence B, saving the `mfence` that `fetch_add; fence(SeqCst)`
        // compiles to (about half of `read_lock`'s cost). Linux's x86 `smp_mb()` is also a
        // `lock`-prefixed add. The asm has no `nomem` option, so it is a compiler barrier too.
        // SAFETY: `counter.as_ptr()` is valid, aligned and only accessed atomically: this asm is
        // equivalent to `fence(SeqCst); counter.fetch_add(1, SeqCst); fence(SeqCst)`, so it races
        // with no non-atomic access. It touches no stack and clobbers only the flags.
        unsafe {
            core::arch::asm!(
                "lock add qword ptr [{0}], 1",
                in(reg) counter.as_ptr(),
                options(nostack),
            );
        }
    }
    #[cfg(not(all(target_arch = "x86_64", not(loom), not(miri))))]
    {
        // ORDERING: Relaxed RMW; its ordering with the section's loads comes from fence B.
        counter.fetch_add(1, Ordering::Relaxed);
        // ORDERING: fence B, as documented above.
        fence(Ordering::SeqCst);
    }
}

/// Waits politely: spin briefly, then yield, then (outside loom) sleep; readers may block for long.
fn backoff(spins: &mut u32) {
    *spins = spins.saturating_add(1);
    if *spins < 64 {
        super::spin_hint();
    } else if *spins < 1024 || cfg!(any(loom, feature = "shuttle")) {
        super::yield_now();
    } else {
        #[cfg(not(any(loom, feature = "shuttle")))]
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
}

/// A read section of an [`Srcu`] domain (Linux's `srcu_read_lock` index); dropping it is
/// `srcu_read_unlock`. It is also the witness functions take to prove they run inside SRCU.
pub struct SrcuGuard<'a> {
    srcu: &'a Srcu,
    stripe: usize,
    idx: usize,
    _rank: RankToken,
}

impl fmt::Debug for SrcuGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SrcuGuard")
            .field("idx", &self.idx)
            .finish_non_exhaustive()
    }
}

impl SrcuGuard<'_> {
    /// Identity of the domain this guard belongs to (its address).
    fn domain(&self) -> usize {
        self.srcu.domain_id()
    }
}

impl Drop for SrcuGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        let counter = &self.srcu.stripes[self.stripe].unlock[self.idx];
        if self.stripe != SHARED && claim::stripe() == self.stripe {
            // An owned stripe: this thread is the only writer of its unlock counters (the guard
            // is not `Send`, and the number is ours until the thread exits), so a load and a
            // store are an increment (docs/locking.md, "SRCU readers write their own line").
            // ORDERING: Relaxed load: we read our own last store (or, after a claim, the previous
            // owner's, ordered by the claim's Acquire). Release store (Linux's fence C): every
            // access of the section happens-before a writer's Acquire read of this counter, so
            // before anything the writer frees after the grace period.
            let v = counter.load(Ordering::Relaxed);
            counter.store(v.wrapping_add(1), Ordering::Release);
        } else {
            // The shared stripe, or a guard that outlived its thread's claim (dropped by another
            // thread-local's destructor after the claim's): an RMW. In the latter case a new
            // owner's load-and-store could overwrite this increment; the unlock sum would then
            // stay short and a grace period would wait forever (a hang, never an early free).
            // ORDERING: Release, as above; an RMW because other threads write this stripe.
            counter.fetch_add(1, Ordering::Release);
        }
    }
}

/// A pointer published to SRCU readers (Linux's `rcu_assign_pointer` / `srcu_dereference` pair).
///
/// The published `Arc` is owned by a writer-side mutex (never touched by readers); readers load the
/// raw pointer and borrow the value for the life of their guard. The writer swaps in a new value and
/// gets the old one back only after a grace period.
pub struct SrcuCell<T> {
    /// `Arc::as_ptr` of the value owned by `published`.
    ptr: AtomicPtr<T>,
    /// The domain (`Srcu::domain_id`) this cell is bound to; 0 until first use.
    domain: AtomicUsize,
    /// The published value's strong count; writers only.
    published: Mutex<Arc<T>>,
}

impl<T> fmt::Debug for SrcuCell<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SrcuCell").finish_non_exhaustive()
    }
}

impl<T: Send + Sync> SrcuCell<T> {
    /// Publishes `initial`.
    pub fn new(initial: Arc<T>) -> SrcuCell<T> {
        SrcuCell {
            ptr: AtomicPtr::new(Arc::as_ptr(&initial).cast_mut()),
            domain: AtomicUsize::new(0),
            published: Mutex::new(initial),
        }
    }

    /// Binds the cell to domain `d` on first use, and checks every later use is the same domain.
    #[inline]
    fn check_domain(&self, d: usize) {
        // ORDERING: Relaxed: the binding is a single value written once by CAS; the CAS total order
        // on this word alone decides the winner, and no other data depends on it.
        let cur = self.domain.load(Ordering::Relaxed);
        if cur == d {
            return;
        }
        let bound = if cur == 0 {
            // ORDERING: Relaxed, as above.
            match self
                .domain
                .compare_exchange(0, d, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => d,
                Err(other) => other,
            }
        } else {
            cur
        };
        assert!(
            bound == d,
            "SrcuCell invariant 5 broken: the cell is used with two different Srcu domains"
        );
    }

    /// Reads the published value (`srcu_dereference`); valid while `guard` lives.
    ///
    /// # Panics
    /// If `guard` belongs to a different [`Srcu`] than the one this cell was first used with.
    #[inline]
    pub fn load<'g>(&'g self, guard: &'g SrcuGuard<'_>) -> &'g T {
        self.check_domain(guard.domain());
        // ORDERING: Acquire pairs with the Release in `replace`: the value's contents written before
        // publication are visible here.
        let p = self.ptr.load(Ordering::Acquire);
        // SAFETY: `p` is `Arc::as_ptr` of a value that was published while `guard`'s section ran or
        // before it: either `published` still owns it, or a `Retired` of this cell's domain owns it
        // and drops it only after a grace period, which waits for `guard`'s section (invariants 1
        // and 5). The result borrows `guard` and `self`, so it cannot outlive either.
        unsafe { &*p }
    }

    /// The currently published value (writer side).
    pub fn current(&self) -> Arc<T> {
        self.published.lock().clone()
    }

    /// Publishes `new` (`rcu_assign_pointer`) and returns the old value, retired: it is handed back
    /// (or dropped) only after a grace period of `srcu`.
    ///
    /// # Panics
    /// If `srcu` is not the domain this cell was first used with.
    pub fn replace<'s>(&self, new: Arc<T>, srcu: &'s Srcu) -> Retired<'s, T> {
        self.check_domain(srcu.domain_id());
        let mut published = self.published.lock();
        // ORDERING: Release publishes `new`'s contents to readers' Acquire loads. Writers are
        // serialized by `published`, so the pointer and the owning `Arc` change together.
        self.ptr
            .store(Arc::as_ptr(&new).cast_mut(), Ordering::Release);
        let old = core::mem::replace(&mut *published, new);
        Retired {
            old: Some(old),
            srcu,
        }
    }
}

/// A value unpublished by [`SrcuCell::replace`] that readers may still be using.
///
/// [`Retired::wait`] waits for the grace period and hands the value back; dropping it without
/// waiting also waits (so the value is never freed under a reader), except while unwinding from a
/// panic, when the value is leaked instead.
#[must_use = "dropping a Retired blocks for an SRCU grace period; call wait() where that is intended"]
pub struct Retired<'s, T> {
    old: Option<Arc<T>>,
    srcu: &'s Srcu,
}

impl<T> fmt::Debug for Retired<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retired").finish_non_exhaustive()
    }
}

impl<'s, T> Retired<'s, T> {
    /// Waits for a grace period of the domain and returns the old value, now unreachable by readers.
    pub fn wait(mut self) -> Arc<T> {
        self.srcu.synchronize();
        self.old
            .take()
            .expect("Retired invariant broken: the old value is taken only once")
    }

    /// Broken variant for the loom negative test: waits with a single flip (see
    /// [`Srcu::synchronize_broken_single_flip`]).
    #[cfg(any(loom, test, feature = "test-hooks"))]
    pub fn wait_broken_single_flip(mut self) -> Arc<T> {
        self.srcu.synchronize_broken_single_flip();
        self.old
            .take()
            .expect("Retired invariant broken: the old value is taken only once")
    }
}

impl<T> Drop for Retired<'_, T> {
    fn drop(&mut self) {
        if let Some(old) = self.old.take() {
            if std::thread::panicking() {
                // Unwinding (perhaps from inside a read section, where waiting would deadlock or
                // panic again): leak the value rather than free it under a reader.
                core::mem::forget(old);
                return;
            }
            self.srcu.synchronize();
            drop(old);
        }
    }
}

#[cfg(all(test, not(loom)))]
#[path = "srcu_tests.rs"]
mod tests;
