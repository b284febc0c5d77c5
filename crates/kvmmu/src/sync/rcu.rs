//! RCU for page-table pages: epoch-based reclamation, one collector per VM.
//!
//! Protocol: a thread that walks page tables without owning them (vCPU walks, lockless aging, TDP
//! walks under `mmu_lock` read) holds an [`RcuGuard`] from [`Rcu::pin`] for the whole walk. A thread
//! that unlinks a page from a table (with an atomic RMW, under `mmu_lock`) hands the page's freeing
//! to [`RcuGuard::defer`] *after* the unlink. Deferred callbacks run only once every guard that was
//! pinned when they were deferred has been dropped (a grace period), on whichever thread next
//! collects. [`Rcu::synchronize`] is `rcu_barrier`: it waits until every deferred callback has run.
//!
//! Invariants:
//! 1. **Grace period.** A callback deferred at time `t` runs only after every guard pinned before
//!    `t` is dropped; a walker that could still reach the unlinked page holds such a guard
//!    (DESIGN invariant 5 in docs/invariants.md: freed only when no walker can reach it).
//! 2. **Accounting.** `pending` counts callbacks deferred and not yet run: incremented before the
//!    callback is queued, decremented (Release) after it ran; `synchronize` returns only when it
//!    reads 0 (Acquire), so the callbacks' effects (free counters) are visible to its caller.
//! 3. **Progress.** A guard that deferred anything pushes its thread-local bag to the collector's
//!    global queue when dropped, so no callback stays stranded in the bag of an idle thread and
//!    `synchronize` terminates once no guard is held.
//! 4. **Callbacks are leaves.** Callbacks run inside another thread's `pin`/drop, possibly while it
//!    holds `mmu_lock`: they must not take kvmmu locks (they free pages and bump counters).
//!
//! Two implementations sit behind the same API: crossbeam-epoch (one `Collector` per [`Rcu`], the
//! per-thread `LocalHandle` cached in a thread-local) normally, and under `cfg(loom)` a minimal
//! in-crate epoch whose every step is a loom-visible lock operation, so loom models of "TDP install
//! vs age vs zap" see the frees happen at every point the grace period allows.
//!
//! Lock rank: a guard registers [`LockRank::Rcu`] (reentrant, innermost); `synchronize` asserts the
//! caller holds no guard (waiting for its own guard would never end).

use core::cell::Cell;
use core::fmt;
use core::marker::PhantomData;

use super::lock_rank::{self, LockRank, RankToken};

pub use imp::Rcu;

/// A read section of an [`Rcu`] (`rcu_read_lock`); dropping it is `rcu_read_unlock`. It is the
/// witness functions take to prove they run inside RCU; references into RCU-protected tables borrow
/// it. Not `Send`: the pin belongs to the pinning thread.
pub struct RcuGuard<'a> {
    inner: imp::GuardInner<'a>,
    /// Address of the [`Rcu`] this guard pins (it cannot move while the guard borrows it).
    domain: usize,
    /// Set once this guard deferred a callback (invariant 3).
    deferred: Cell<bool>,
    rank: Option<RankToken>,
    _not_send: PhantomData<*const ()>,
}

impl fmt::Debug for RcuGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RcuGuard").finish_non_exhaustive()
    }
}

impl RcuGuard<'_> {
    /// True if this guard pins `rcu` (and not some other RCU domain). Structures that retire memory
    /// through one [`Rcu`] must check this on entry: a guard of another domain does not delay their
    /// frees, so reading their memory under it would be a use-after-free.
    #[inline]
    pub fn pins(&self, rcu: &Rcu) -> bool {
        self.domain == rcu as *const Rcu as usize
    }

    /// Runs `f` after every guard pinned now (this one included) has been dropped (`call_rcu`).
    ///
    /// `f` must be a leaf: it may run on any thread, inside that thread's pin (invariant 4).
    pub fn defer(&self, f: impl FnOnce() + Send + 'static) {
        self.inner.defer(f);
        self.deferred.set(true);
    }
}

impl Drop for RcuGuard<'_> {
    fn drop(&mut self) {
        // Release the rank first: callbacks run by the flush below are not inside this section.
        drop(self.rank.take());
        if self.deferred.get() {
            self.inner.flush();
        }
    }
}

/// Spin, then yield: waiting for other threads to leave their read sections.
fn backoff(spins: &mut u32) {
    *spins = spins.saturating_add(1);
    if *spins < 16 {
        super::spin_hint();
    } else if *spins < 1024 || cfg!(any(loom, feature = "shuttle")) {
        super::yield_now();
    } else {
        #[cfg(not(any(loom, feature = "shuttle")))]
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
}

#[cfg(not(any(loom, feature = "shuttle")))]
mod imp {
    //! crossbeam-epoch behind the [`Rcu`] API.

    use core::cell::{Cell, RefCell};
    use core::fmt;
    use core::marker::PhantomData;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::sync::{Arc, Weak};

    use crossbeam_epoch::{Collector, Guard, LocalHandle};

    use super::{LockRank, RcuGuard, backoff, lock_rank};

    /// Shared by the [`Rcu`] and its cached thread-local handles (which only hold a `Weak`).
    struct Shared {
        id: u64,
        collector: Collector,
        /// Deferred callbacks not yet run (invariant 2).
        pending: Arc<AtomicUsize>,
    }

    /// One RCU domain (one per VM): a crossbeam-epoch `Collector` and a pending-callback counter.
    pub struct Rcu {
        shared: Arc<Shared>,
    }

    impl fmt::Debug for Rcu {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("Rcu")
                .field("pending", &self.pending())
                .finish_non_exhaustive()
        }
    }

    struct CachedHandle {
        id: u64,
        owner: Weak<Shared>,
        handle: LocalHandle,
    }

    thread_local! {
        /// This thread's registration with each live `Rcu` it has pinned (most recent first).
        static HANDLES: RefCell<Vec<CachedHandle>> = const { RefCell::new(Vec::new()) };
    }

    impl Default for Rcu {
        fn default() -> Self {
            Rcu::new()
        }
    }

    impl Rcu {
        /// Creates a domain with its own collector.
        pub fn new() -> Rcu {
            static NEXT_ID: AtomicU64 = AtomicU64::new(1);
            Rcu {
                shared: Arc::new(Shared {
                    // ORDERING: Relaxed: ids need only be unique, which the RMW guarantees.
                    id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                    collector: Collector::new(),
                    pending: Arc::new(AtomicUsize::new(0)),
                }),
            }
        }

        /// Enters a read section. Cheap: the thread's handle for this domain is cached.
        ///
        /// # Panics
        /// In debug builds, if the thread holds a lock ranked after RCU (none is; see lock_rank).
        #[inline]
        pub fn pin(&self) -> RcuGuard<'_> {
            let rank = lock_rank::acquire(LockRank::Rcu);
            let guard = self.pin_crossbeam();
            RcuGuard {
                domain: self as *const Rcu as usize,
                inner: GuardInner {
                    guard,
                    pending: &self.shared.pending,
                },
                deferred: Cell::new(false),
                rank: Some(rank),
                _not_send: PhantomData,
            }
        }

        fn pin_crossbeam(&self) -> Guard {
            let id = self.shared.id;
            let cached = HANDLES.try_with(|h| {
                let h = h.try_borrow().ok()?;
                h.iter().find(|c| c.id == id).map(|c| c.handle.pin())
            });
            if let Ok(Some(g)) = cached {
                return g;
            }
            let handle = self.shared.collector.register();
            let guard = handle.pin();
            // Cache the handle unless the thread is exiting or re-entered us from a callback; a
            // guard outlives a dropped handle (crossbeam finalizes the participant at unpin).
            let _ = HANDLES.try_with(|h| {
                if let Ok(mut h) = h.try_borrow_mut() {
                    h.retain(|c| c.owner.strong_count() > 0);
                    h.insert(
                        0,
                        CachedHandle {
                            id,
                            owner: Arc::downgrade(&self.shared),
                            handle,
                        },
                    );
                }
            });
            guard
        }

        /// Blocks until every callback deferred before the call has run (`rcu_barrier`).
        ///
        /// May also wait for callbacks deferred concurrently; it is meant for teardown and tests.
        ///
        /// # Panics
        /// In debug builds, if the calling thread holds an [`RcuGuard`] (it would wait forever).
        pub fn synchronize(&self) {
            lock_rank::assert_may_wait_for(LockRank::Rcu, "RCU callbacks");
            let mut spins = 0;
            loop {
                // ORDERING: Acquire pairs with the Release decrement after each callback ran, so the
                // callbacks' effects are visible to our caller (invariant 2).
                if self.shared.pending.load(Ordering::Acquire) == 0 {
                    return;
                }
                // Pinning and flushing tries to advance the epoch and runs expired bags.
                let g = self.pin_crossbeam();
                g.flush();
                drop(g);
                backoff(&mut spins);
            }
        }

        /// Deferred callbacks not yet run.
        pub fn pending(&self) -> usize {
            // ORDERING: Relaxed: a statistic; `synchronize` does the Acquire that matters.
            self.shared.pending.load(Ordering::Relaxed)
        }
    }

    impl Drop for Rcu {
        fn drop(&mut self) {
            // Teardown runs every callback (pages allocated == pages freed); no guard can be held
            // because guards borrow `self`. Skip if we are unwinding from a lock-rank panic.
            if !std::thread::panicking() {
                self.synchronize();
            }
        }
    }

    /// The implementation half of an [`RcuGuard`].
    pub(super) struct GuardInner<'a> {
        guard: Guard,
        pending: &'a Arc<AtomicUsize>,
    }

    impl GuardInner<'_> {
        pub(super) fn defer(&self, f: impl FnOnce() + Send + 'static) {
            let pending = Arc::clone(self.pending);
            // ORDERING: Relaxed: the increment is sequenced before the callback is queued, and the
            // callback's Release decrement follows it in the counter's modification order.
            pending.fetch_add(1, Ordering::Relaxed);
            self.guard.defer(move || {
                f();
                // ORDERING: Release: the callback's effects happen-before `synchronize`'s Acquire.
                pending.fetch_sub(1, Ordering::Release);
            });
        }

        pub(super) fn flush(&self) {
            self.guard.flush();
        }
    }
}

#[cfg(any(loom, feature = "shuttle"))]
mod imp {
    //! A minimal epoch for loom models (and shuttle tests, whose threads share one OS thread and
    //! so its thread-locals, which crossbeam-epoch's per-thread handles rely on): every step is one loom mutex section, so it is obviously
    //! correct and loom explores frees at every point the grace period allows.
    //!
    //! State: a global epoch counter, one announce slot per live guard (the epoch it pinned in) and a
    //! list of `(epoch, callback)`. `defer` tags the callback with the current epoch and advances the
    //! epoch, so guards pinned later announce a greater epoch. A callback runs once no announce slot
    //! holds an epoch `<=` its tag, i.e. every guard pinned before it was deferred is gone.

    use core::cell::Cell;
    use core::fmt;
    use core::marker::PhantomData;

    use super::super::Mutex;
    use super::{LockRank, RcuGuard, backoff, lock_rank};

    type Callback = Box<dyn FnOnce() + Send>;

    struct State {
        epoch: u64,
        /// Announce slots: `Some(epoch)` while a guard is pinned in that slot.
        slots: Vec<Option<u64>>,
        deferred: Vec<(u64, Callback)>,
        pending: usize,
    }

    impl State {
        /// Removes and returns the callbacks whose grace period has elapsed.
        fn take_expired(&mut self) -> Vec<Callback> {
            let oldest = self.slots.iter().flatten().copied().min();
            let mut ready = Vec::new();
            let mut i = 0;
            while i < self.deferred.len() {
                if oldest.is_none_or(|o| o > self.deferred[i].0) {
                    ready.push(self.deferred.swap_remove(i).1);
                } else {
                    i += 1;
                }
            }
            ready
        }
    }

    /// One RCU domain (loom build).
    pub struct Rcu {
        state: Mutex<State>,
    }

    impl fmt::Debug for Rcu {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("Rcu").finish_non_exhaustive()
        }
    }

    impl Default for Rcu {
        fn default() -> Self {
            Rcu::new()
        }
    }

    impl Rcu {
        /// Creates a domain.
        pub fn new() -> Rcu {
            Rcu {
                state: Mutex::new(State {
                    epoch: 0,
                    slots: Vec::new(),
                    deferred: Vec::new(),
                    pending: 0,
                }),
            }
        }

        /// Enters a read section: announces the current epoch in a free slot.
        pub fn pin(&self) -> RcuGuard<'_> {
            let rank = lock_rank::acquire(LockRank::Rcu);
            let slot = {
                let mut st = self.state.lock();
                let e = st.epoch;
                match st.slots.iter().position(Option::is_none) {
                    Some(i) => {
                        st.slots[i] = Some(e);
                        i
                    }
                    None => {
                        st.slots.push(Some(e));
                        st.slots.len() - 1
                    }
                }
            };
            RcuGuard {
                domain: self as *const Rcu as usize,
                inner: GuardInner { rcu: self, slot },
                deferred: Cell::new(false),
                rank: Some(rank),
                _not_send: PhantomData,
            }
        }

        /// Runs the expired callbacks outside the lock; returns whether none is pending.
        fn collect(&self) -> bool {
            let ready = self.state.lock().take_expired();
            let n = ready.len();
            for f in ready {
                f();
            }
            let mut st = self.state.lock();
            st.pending -= n;
            st.pending == 0
        }

        /// Blocks until every callback deferred before the call has run.
        pub fn synchronize(&self) {
            lock_rank::assert_may_wait_for(LockRank::Rcu, "RCU callbacks");
            let mut spins = 0;
            while !self.collect() {
                backoff(&mut spins);
            }
        }

        /// Deferred callbacks not yet run.
        pub fn pending(&self) -> usize {
            self.state.lock().pending
        }
    }

    impl Drop for Rcu {
        fn drop(&mut self) {
            if !std::thread::panicking() {
                self.synchronize();
            }
        }
    }

    /// The implementation half of an [`RcuGuard`] (loom build): the announce slot it holds.
    pub(super) struct GuardInner<'a> {
        rcu: &'a Rcu,
        slot: usize,
    }

    impl GuardInner<'_> {
        pub(super) fn defer(&self, f: impl FnOnce() + Send + 'static) {
            let mut st = self.rcu.state.lock();
            let e = st.epoch;
            st.deferred.push((e, Box::new(f)));
            st.epoch += 1;
            st.pending += 1;
        }

        pub(super) fn flush(&self) {
            // Collection happens when the slot is released (Drop below).
        }
    }

    impl Drop for GuardInner<'_> {
        fn drop(&mut self) {
            self.rcu.state.lock().slots[self.slot] = None;
            self.rcu.collect();
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    #[test]
    fn rcu_is_send_and_sync() {
        fn send_sync<T: Send + Sync>() -> bool {
            !core::any::type_name::<T>().is_empty()
        }
        assert!(send_sync::<Rcu>());
        assert_eq!(Rcu::new().pending(), 0);
    }

    #[test]
    fn synchronize_runs_every_deferred_callback() {
        let rcu = Rcu::new();
        let ran = Arc::new(AtomicUsize::new(0));
        for _ in 0..300 {
            let g = rcu.pin();
            let r = ran.clone();
            g.defer(move || {
                r.fetch_add(1, Ordering::Relaxed);
            });
        }
        rcu.synchronize();
        assert_eq!(rcu.pending(), 0);
        assert_eq!(ran.load(Ordering::Relaxed), 300);
    }

    #[test]
    fn callback_waits_for_guard_pinned_before_defer() {
        let rcu = Rcu::new();
        let freed = Arc::new(AtomicBool::new(false));
        std::thread::scope(|s| {
            let reader = rcu.pin();
            s.spawn(|| {
                let g = rcu.pin();
                let f = freed.clone();
                g.defer(move || f.store(true, Ordering::SeqCst));
            })
            .join()
            .expect("deferring thread panicked");
            // Many collection attempts must not run the callback while `reader` is pinned.
            for _ in 0..200 {
                let g = rcu.pin();
                g.flush_for_test();
            }
            assert!(
                !freed.load(Ordering::SeqCst),
                "callback ran inside a grace period"
            );
            assert_eq!(rcu.pending(), 1);
            drop(reader);
        });
        rcu.synchronize();
        assert!(freed.load(Ordering::SeqCst));
    }

    #[test]
    fn drop_runs_pending_callbacks() {
        let ran = Arc::new(AtomicUsize::new(0));
        {
            let rcu = Rcu::new();
            let g = rcu.pin();
            let r = ran.clone();
            g.defer(move || {
                r.fetch_add(1, Ordering::Relaxed);
            });
        }
        assert_eq!(ran.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn guards_nest_and_work_across_domains() {
        let a = Rcu::new();
        let b = Rcu::new();
        let ga = a.pin();
        let ga2 = a.pin();
        let gb = b.pin();
        let ran = Arc::new(AtomicUsize::new(0));
        let r = ran.clone();
        gb.defer(move || {
            r.fetch_add(1, Ordering::Relaxed);
        });
        drop((gb, ga2, ga));
        b.synchronize();
        a.synchronize();
        assert_eq!(ran.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn concurrent_defers_are_all_run() {
        let rcu = Rcu::new();
        let ran = Arc::new(AtomicUsize::new(0));
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    for _ in 0..200 {
                        let g = rcu.pin();
                        let r = ran.clone();
                        g.defer(move || {
                            r.fetch_add(1, Ordering::Relaxed);
                        });
                    }
                });
            }
        });
        rcu.synchronize();
        assert_eq!(ran.load(Ordering::Relaxed), 600);
        assert_eq!(rcu.pending(), 0);
    }

    #[cfg(debug_assertions)]
    #[test]
    #[should_panic(expected = "waiting for RCU callbacks while holding RCU")]
    fn synchronize_inside_guard_panics() {
        let rcu = Rcu::new();
        let _g = rcu.pin();
        rcu.synchronize();
    }

    impl RcuGuard<'_> {
        fn flush_for_test(&self) {
            self.inner.flush();
        }
    }
}

#[cfg(all(test, not(loom)))]
mod domain_tests {
    use super::Rcu;

    #[test]
    fn a_guard_pins_only_its_own_domain() {
        let (a, b) = (Rcu::new(), Rcu::new());
        let g = a.pin();
        assert!(g.pins(&a));
        assert!(!g.pins(&b));
    }
}
