//! Synchronization primitives: the only module that names `std::sync`, `parking_lot`,
//! `crossbeam-epoch` or `loom`.
//!
//! Everything else in the crate imports its atomics, `Arc`, locks and spin hints from here, so that
//! building with `RUSTFLAGS="--cfg loom"` swaps every one of them for loom's model-checked twin
//! without touching the code that uses them.
//!
//! Building with feature `shuttle` (randomized whole-VM tests, `tests/shuttle_*.rs`) swaps
//! the blocking and scheduling primitives for shuttle's: [`Mutex`], [`RwLock`], [`Condvar`],
//! [`thread`], [`thread_local!`], [`spin_hint`] and [`yield_now`], so every lock operation, every
//! spin-wait round and every forced yield of the `test-hooks` sites is a point where shuttle's
//! scheduler may switch threads, and no wait can block the single OS thread shuttle runs its
//! threads on. The [`atomic`] types stay std's under shuttle: the host's guest memory and the
//! page tables are arrays of `AtomicU64` laid out as `u64` (mmap-backed, 4 KiB tables), which
//! shuttle's bookkeeping atomics are not; shuttle models every atomic as `SeqCst` anyway, and the
//! weak-memory orderings are loom's job. Under shuttle [`rcu`] uses the same in-crate epoch as
//! under loom (crossbeam-epoch caches per-thread handles in thread-locals, which shuttle's threads
//! share), and the debug lock-rank checker is off (it keeps per-thread state in thread-locals too).
//!
//! What lives here:
//! - the facade types ([`atomic`], [`Arc`], [`Mutex`], [`RwLock`], [`Condvar`], [`spin_hint`]);
//! - [`srcu`]: our sleepable RCU, which protects the published memslot sets;
//! - [`rcu`]: epoch-based reclamation for page-table pages (crossbeam-epoch, one collector per VM);
//! - [`witness`]: zero-sized proofs that a lock is held, passed to functions that need it;
//! - [`lock_rank`]: a debug-build checker of the lock order in docs/locking.md;
//! - [`block_or`]: the OR of a 16-word block in one pass, the aging scans' pre-test;
//! - [`guest_mode`]: which threads hold a vCPU in guest mode, so that calls that could wait for
//!   that vCPU's own TLB-flush acknowledgement are refused at their entry.
//!
//! The main types of the submodules are re-exported here (`kvmmu::internals::sync::{Srcu, Rcu, MmuLock, ..}`).

pub(crate) mod block_or;
pub mod guest_mode;
pub mod lock_rank;
pub(crate) mod percpu;
pub mod rcu;
pub mod srcu;
pub mod witness;

pub use lock_rank::{LockRank, RankToken};
pub use rcu::{Rcu, RcuGuard};
pub use srcu::{Retired, Srcu, SrcuCell, SrcuGuard};
pub use witness::{
    MmuLock, MmuLockStats, MmuRead, MmuReadGuard, MmuWrite, MmuWriteGuard, RankedMutex,
    RankedMutexGuard,
};

/// Atomic integer types and orderings (std normally, loom under `cfg(loom)`).
pub mod atomic {
    #[cfg(loom)]
    pub use loom::sync::atomic::{
        AtomicBool, AtomicI64, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering, fence,
    };
    #[cfg(not(loom))]
    pub use std::sync::atomic::{
        AtomicBool, AtomicI64, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering, fence,
    };
}

#[cfg(loom)]
pub use loom::sync::Arc;
#[cfg(not(loom))]
pub use std::sync::Arc;
/// A non-owning reference to an [`Arc`] (std only: nothing model-checked needs it).
#[cfg(not(loom))]
pub use std::sync::Weak;

/// Hint that the caller is spinning on a value another thread will change.
///
/// Under loom this yields to the scheduler, which loom requires of every spin loop (otherwise the
/// model explores an unbounded number of iterations of the spinning thread).
/// Under shuttle it yields to shuttle's scheduler for the same reason (and because shuttle runs
/// every thread on one OS thread: a spinning thread that never yields would wait forever).
#[inline]
pub fn spin_hint() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(all(feature = "shuttle", not(loom)))]
    shuttle::thread::yield_now();
    #[cfg(not(any(loom, feature = "shuttle")))]
    core::hint::spin_loop();
}

/// Give up the CPU to another runnable thread (used by backoff loops that spun too long).
#[inline]
pub fn yield_now() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(all(feature = "shuttle", not(loom)))]
    shuttle::thread::yield_now();
    #[cfg(not(any(loom, feature = "shuttle")))]
    std::thread::yield_now();
}

/// Threads: std's normally, loom's under `cfg(loom)`, shuttle's under `cfg(feature = "shuttle")`.
pub mod thread {
    #[cfg(loom)]
    pub use loom::thread::{JoinHandle, spawn, yield_now};
    #[cfg(all(feature = "shuttle", not(loom)))]
    pub use shuttle::thread::{JoinHandle, spawn, yield_now};
    #[cfg(not(any(loom, feature = "shuttle")))]
    pub use std::thread::{JoinHandle, spawn, yield_now};
}

/// Declares a thread-local (std's `thread_local!` normally; shuttle's under `cfg(feature = "shuttle")`, whose
/// threads share one OS thread, so that each shuttle thread gets its own value).
#[cfg(all(feature = "shuttle", not(loom)))]
pub use shuttle::thread_local;
/// Declares a thread-local (std's `thread_local!` normally; shuttle's under `cfg(feature = "shuttle")`, whose
/// threads share one OS thread, so that each shuttle thread gets its own value).
#[cfg(not(all(feature = "shuttle", not(loom))))]
pub use std::thread_local;

#[cfg(not(any(loom, feature = "shuttle")))]
mod imp {
    /// A mutual-exclusion lock (parking_lot).
    pub type Mutex<T> = parking_lot::Mutex<T>;
    /// Guard of a [`Mutex`].
    pub type MutexGuard<'a, T> = parking_lot::MutexGuard<'a, T>;
    /// A condition variable used with [`Mutex`].
    pub type Condvar = parking_lot::Condvar;
    /// A reader-writer lock (parking_lot, task-fair).
    pub type RwLock<T> = parking_lot::RwLock<T>;
    /// Shared guard of a [`RwLock`].
    pub type RwLockReadGuard<'a, T> = parking_lot::RwLockReadGuard<'a, T>;
    /// Exclusive guard of a [`RwLock`].
    pub type RwLockWriteGuard<'a, T> = parking_lot::RwLockWriteGuard<'a, T>;
}

#[cfg(any(loom, feature = "shuttle"))]
mod imp {
    //! Thin wrappers that give loom's (or shuttle's) locks parking_lot's guard-returning API.

    #[cfg(loom)]
    use loom::sync as backend;
    #[cfg(all(feature = "shuttle", not(loom)))]
    use shuttle::sync as backend;

    /// A mutual-exclusion lock (loom or shuttle).
    #[derive(Debug)]
    pub struct Mutex<T>(backend::Mutex<T>);
    /// Guard of a [`Mutex`].
    pub type MutexGuard<'a, T> = backend::MutexGuard<'a, T>;

    impl<T: Default> Default for Mutex<T> {
        fn default() -> Self {
            Self::new(T::default())
        }
    }

    impl<T> Mutex<T> {
        /// Creates the lock.
        pub fn new(v: T) -> Self {
            Self(backend::Mutex::new(v))
        }
        /// Acquires the lock.
        pub fn lock(&self) -> MutexGuard<'_, T> {
            self.0.lock().unwrap_or_else(|e| e.into_inner())
        }
        /// Tries to acquire the lock without blocking.
        pub fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
            self.0.try_lock().ok()
        }
    }

    /// A condition variable (loom or shuttle).
    #[derive(Debug, Default)]
    pub struct Condvar(backend::Condvar);

    impl Condvar {
        /// Creates the condition variable.
        pub fn new() -> Self {
            Self(backend::Condvar::new())
        }
        /// Blocks until notified, releasing and retaking the guard's lock.
        pub fn wait<T>(&self, guard: &mut MutexGuard<'_, T>) {
            // loom's (and shuttle's) Condvar consumes the guard; emulate parking_lot's `&mut` API
            // by swapping through a raw read/write pair.
            // SAFETY: `guard` is a valid, initialized guard that we move out of and immediately
            // replace with the guard returned by `wait`, which holds the same lock; no code observes
            // the moved-from slot in between (the call cannot unwind past us with the slot empty
            // because the backend's `wait` only returns Ok or an unwrapped poison error).
            unsafe {
                let g = core::ptr::read(guard);
                let g = self.0.wait(g).unwrap_or_else(|e| e.into_inner());
                core::ptr::write(guard, g);
            }
        }
        /// Wakes every waiter.
        pub fn notify_all(&self) -> bool {
            self.0.notify_all();
            true
        }
        /// Wakes one waiter.
        pub fn notify_one(&self) -> bool {
            self.0.notify_one();
            true
        }
    }

    /// A reader-writer lock (loom or shuttle).
    #[derive(Debug)]
    pub struct RwLock<T>(backend::RwLock<T>);
    /// Shared guard of a [`RwLock`].
    pub type RwLockReadGuard<'a, T> = backend::RwLockReadGuard<'a, T>;
    /// Exclusive guard of a [`RwLock`].
    pub type RwLockWriteGuard<'a, T> = backend::RwLockWriteGuard<'a, T>;

    impl<T: Default> Default for RwLock<T> {
        fn default() -> Self {
            Self::new(T::default())
        }
    }

    impl<T> RwLock<T> {
        /// Creates the lock.
        pub fn new(v: T) -> Self {
            Self(backend::RwLock::new(v))
        }
        /// Acquires the lock shared.
        pub fn read(&self) -> RwLockReadGuard<'_, T> {
            self.0.read().unwrap_or_else(|e| e.into_inner())
        }
        /// Acquires the lock exclusive.
        pub fn write(&self) -> RwLockWriteGuard<'_, T> {
            self.0.write().unwrap_or_else(|e| e.into_inner())
        }
        /// Tries to acquire the lock shared without blocking.
        pub fn try_read(&self) -> Option<RwLockReadGuard<'_, T>> {
            self.0.try_read().ok()
        }
        /// Tries to acquire the lock exclusive without blocking.
        pub fn try_write(&self) -> Option<RwLockWriteGuard<'_, T>> {
            self.0.try_write().ok()
        }
    }
}

pub use imp::*;
