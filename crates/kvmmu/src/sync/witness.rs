//! `mmu_lock` and lock witnesses.
//!
//! Protocol: functions that need a lock held take a zero-sized witness of it ([`MmuRead`],
//! [`MmuWrite`], or a [`SrcuGuard`]/[`RcuGuard`] reference) instead of a comment saying "caller holds
//! mmu_lock", so the type checker does what the kernel's `lockdep_assert_held` does at run time. A
//! witness can only be borrowed from a live guard, so it cannot outlive the lock it proves.
//!
//! Invariants:
//! 1. **Witnesses are unforgeable.** [`MmuRead`] and [`MmuWrite`] have private fields, are not
//!    `Clone`, and are only handed out by reference from [`MmuReadGuard`] / [`MmuWriteGuard`]; the
//!    write guard also proves read (`read_witness`), as holding `mmu_lock` for write does.
//! 2. **Fairness.** `mmu_lock` is parking_lot's task-fair `RwLock`: a waiting writer blocks new
//!    readers. [`MmuLock::is_contended`] reports whether any thread is waiting (a waiter count kept
//!    around blocking acquisitions), and `cond_resched` releases the lock fairly (handing it to the
//!    waiter), yields and reacquires (Linux's `cond_resched_rwlock_{read,write}`), after which the
//!    caller must restart its walk because the tables may have changed.
//! 3. **Ranks.** Every guard registers its lock's [`LockRank`] before blocking; `cond_resched` checks
//!    that no lock ranked after `mmu_lock` (an RCU guard, an rmap bit) is held across the yield,
//!    as `tdp_mmu_iter_cond_resched` drops RCU first.
//! 4. **Statistics never touch another cache line.** The acquisition counters live in the same
//!    cache line as the lock word, which every acquisition writes anyway.
//! 5. **Witnesses name their lock.** A witness carries its lock's [`LockId`]; a structure that
//!    `mmu_lock` protects holds a [`LockBinding`] and checks every witness it is given, so a
//!    witness of one VM's lock cannot be used to change another VM's MMU.
//!
//! [`SrcuGuard`]: super::srcu::SrcuGuard
//! [`RcuGuard`]: super::rcu::RcuGuard

use core::fmt;
use core::ops::{Deref, DerefMut};

use super::atomic::{AtomicU64, AtomicUsize, Ordering};
use super::lock_rank::{self, LockRank, RankToken};
use super::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// The identity of one [`MmuLock`]: unique for the life of the process, never 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LockId(u64);

/// Source of [`LockId`]s. A plain `core` atomic even under loom: uniqueness is all it provides,
/// it orders nothing and is not part of any modelled protocol.
static NEXT_LOCK_ID: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(1);

impl LockId {
    fn fresh() -> LockId {
        // ORDERING: Relaxed: only the atomicity of the increment matters (each id handed out once).
        LockId(NEXT_LOCK_ID.fetch_add(1, core::sync::atomic::Ordering::Relaxed))
    }
}

/// Proof that one particular `mmu_lock` is held for read (or write); it names the lock
/// ([`MmuRead::lock_id`]). Only borrowed from a guard.
pub struct MmuRead {
    id: LockId,
}

/// Proof that one particular `mmu_lock` is held for write; it names the lock
/// ([`MmuWrite::lock_id`]). Only borrowed from a guard.
pub struct MmuWrite {
    id: LockId,
}

impl MmuRead {
    /// The lock this witness proves held.
    #[inline]
    pub fn lock_id(&self) -> LockId {
        self.id
    }
}

impl MmuWrite {
    /// The lock this witness proves held.
    #[inline]
    pub fn lock_id(&self) -> LockId {
        self.id
    }
}

impl fmt::Debug for MmuRead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MmuRead({:?})", self.id)
    }
}

impl fmt::Debug for MmuWrite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MmuWrite({:?})", self.id)
    }
}

/// The one `mmu_lock` a structure trusts (invariant 5): bound when the structure is built for a
/// VM ([`LockBinding::bound_to`]) or, for a structure used on its own, by the first witness it
/// sees. Every entry point that relies on `mmu_lock` calls [`LockBinding::check`], in debug and
/// release builds: one relaxed load and a compare.
pub struct LockBinding {
    /// The bound [`LockId`], or 0 while unbound. A plain `core` atomic, as for `NEXT_LOCK_ID`.
    id: core::sync::atomic::AtomicU64,
}

impl fmt::Debug for LockBinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // ORDERING: Relaxed: a diagnostic snapshot.
        let id = self.id.load(core::sync::atomic::Ordering::Relaxed);
        write!(f, "LockBinding({id})")
    }
}

impl Default for LockBinding {
    fn default() -> Self {
        LockBinding::unbound()
    }
}

impl LockBinding {
    /// Bound to the first lock whose witness is checked.
    pub const fn unbound() -> LockBinding {
        LockBinding {
            id: core::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Bound to `lock` from the start.
    pub fn bound_to(lock: &MmuLock) -> LockBinding {
        LockBinding {
            id: core::sync::atomic::AtomicU64::new(lock.id().0),
        }
    }

    /// Panics unless `id` is the bound lock (binding it if nothing is bound yet). `what` names the
    /// structure in the message.
    ///
    /// # Panics
    /// If a witness of another `mmu_lock` is presented: trusting it would let this structure be
    /// changed under one VM's lock while another VM's lock holder walks it.
    #[inline]
    pub fn check(&self, id: LockId, what: &str) {
        use core::sync::atomic::Ordering as O;
        // ORDERING: Relaxed: the id is written once (0 → id) and never changes afterwards; the
        // lock itself, not this word, orders the data it protects.
        let bound = self.id.load(O::Relaxed);
        if bound == id.0 {
            return;
        }
        if bound == 0 {
            match self.id.compare_exchange(0, id.0, O::Relaxed, O::Relaxed) {
                Ok(_) => return,
                Err(now) if now == id.0 => return,
                Err(_) => {}
            }
        }
        foreign_witness(what, id);
    }
}

#[cold]
#[inline(never)]
fn foreign_witness(what: &str, id: LockId) -> ! {
    panic!(
        "kvmmu: {what} was called with a witness of another mmu_lock ({id:?}): a lock witness \
         proves only its own lock, and this structure is protected by a different one"
    )
}

/// Counters of [`MmuLock`] acquisitions (read-only statistics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmuLockStats {
    /// Read acquisitions (including reacquisitions by `cond_resched`).
    pub read_acquisitions: u64,
    /// Write acquisitions (including reacquisitions by `cond_resched`).
    pub write_acquisitions: u64,
    /// Read acquisitions that had to wait.
    pub contended_reads: u64,
    /// Write acquisitions that had to wait.
    pub contended_writes: u64,
    /// Times a holder yielded the lock in `cond_resched`.
    pub resched_yields: u64,
}

/// KVM's `mmu_lock`: a task-fair reader-writer lock with a waiter count and statistics.
#[repr(align(128))]
pub struct MmuLock {
    lock: RwLock<()>,
    /// The witnesses this lock's guards hand out, naming it (invariant 5).
    read_witness: MmuRead,
    write_witness: MmuWrite,
    /// Threads blocked in an acquisition (invariant 2).
    waiters: AtomicUsize,
    /// Read acquisitions: one per fault, from every vCPU, so striped (a shared counter would add
    /// a second contended line to the lock word's).
    reads: super::percpu::StripedCounter,
    writes: AtomicU64,
    contended_reads: AtomicU64,
    contended_writes: AtomicU64,
    resched_yields: AtomicU64,
}

impl fmt::Debug for MmuLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MmuLock")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Default for MmuLock {
    fn default() -> Self {
        MmuLock::new()
    }
}

impl MmuLock {
    /// Creates an unlocked `mmu_lock`.
    pub fn new() -> MmuLock {
        let id = LockId::fresh();
        MmuLock {
            lock: RwLock::new(()),
            read_witness: MmuRead { id },
            write_witness: MmuWrite { id },
            waiters: AtomicUsize::new(0),
            reads: super::percpu::StripedCounter::default(),
            writes: AtomicU64::new(0),
            contended_reads: AtomicU64::new(0),
            contended_writes: AtomicU64::new(0),
            resched_yields: AtomicU64::new(0),
        }
    }

    /// Acquires `mmu_lock` for read (`read_lock(&kvm->mmu_lock)`).
    ///
    /// # Panics
    /// In debug builds, on a lock-order violation (e.g. taking it while holding RCU or itself).
    pub fn read(&self) -> MmuReadGuard<'_> {
        let rank = lock_rank::acquire(LockRank::MmuLock);
        MmuReadGuard {
            guard: Some(self.lock_read()),
            lock: self,
            _rank: rank,
            _trace: tracing::trace_span!("mmu_lock_read").entered(),
        }
    }

    /// Acquires `mmu_lock` for write (`write_lock(&kvm->mmu_lock)`).
    ///
    /// # Panics
    /// In debug builds, on a lock-order violation.
    pub fn write(&self) -> MmuWriteGuard<'_> {
        let rank = lock_rank::acquire(LockRank::MmuLock);
        MmuWriteGuard {
            guard: Some(self.lock_write()),
            lock: self,
            _rank: rank,
            _trace: tracing::trace_span!("mmu_lock_write").entered(),
        }
    }

    /// This lock's identity, which its witnesses carry.
    #[inline]
    pub fn id(&self) -> LockId {
        self.read_witness.id
    }

    /// True if some thread is waiting for the lock (`rwlock_needbreak`).
    #[inline]
    pub fn is_contended(&self) -> bool {
        // ORDERING: Relaxed: an advisory hint; a stale answer only delays or adds one yield.
        self.waiters.load(Ordering::Relaxed) > 0
    }

    /// A snapshot of the acquisition counters.
    pub fn stats(&self) -> MmuLockStats {
        // ORDERING: Relaxed: independent statistics counters; no data is published through them.
        MmuLockStats {
            read_acquisitions: self.reads.sum(),
            write_acquisitions: self.writes.load(Ordering::Relaxed),
            contended_reads: self.contended_reads.load(Ordering::Relaxed),
            contended_writes: self.contended_writes.load(Ordering::Relaxed),
            resched_yields: self.resched_yields.load(Ordering::Relaxed),
        }
    }

    fn lock_read(&self) -> RwLockReadGuard<'_, ()> {
        // ORDERING (all counters here): Relaxed: statistics and an advisory waiter count; the lock
        // itself provides the acquire/release ordering for the data it protects.
        self.reads.add(1);
        if let Some(g) = self.lock.try_read() {
            return g;
        }
        self.contended_reads.fetch_add(1, Ordering::Relaxed);
        self.waiters.fetch_add(1, Ordering::Relaxed);
        let t0 = std::time::Instant::now();
        let _trace = tracing::trace_span!("mmu_lock_read_wait").entered();
        let g = self.lock.read();
        note_wait(t0);
        self.waiters.fetch_sub(1, Ordering::Relaxed);
        g
    }

    fn lock_write(&self) -> RwLockWriteGuard<'_, ()> {
        // ORDERING: Relaxed, as in `lock_read`.
        self.writes.fetch_add(1, Ordering::Relaxed);
        if let Some(g) = self.lock.try_write() {
            return g;
        }
        self.contended_writes.fetch_add(1, Ordering::Relaxed);
        self.waiters.fetch_add(1, Ordering::Relaxed);
        let t0 = std::time::Instant::now();
        let _trace = tracing::trace_span!("mmu_lock_write_wait").entered();
        let g = self.lock.write();
        note_wait(t0);
        self.waiters.fetch_sub(1, Ordering::Relaxed);
        g
    }

    fn note_yield(&self) {
        // ORDERING: Relaxed: a statistic.
        self.resched_yields.fetch_add(1, Ordering::Relaxed);
    }
}

crate::sync::thread_local! {
    /// Nanoseconds this thread has waited for any `mmu_lock` (contended acquisitions only).
    static MMU_LOCK_WAIT_NANOS: core::cell::Cell<u64> = const { core::cell::Cell::new(0) };
}

fn note_wait(t0: std::time::Instant) {
    let ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
    MMU_LOCK_WAIT_NANOS.with(|c| c.set(c.get().saturating_add(ns)));
}

/// Nanoseconds the calling thread has waited for any `mmu_lock` so far (contended acquisitions
/// only): a caller samples it around an operation to learn how long that operation waited for
/// the lock (reclaim uses it to time its `invalidate_range_start` waits).
pub fn thread_mmu_lock_wait_nanos() -> u64 {
    MMU_LOCK_WAIT_NANOS.with(core::cell::Cell::get)
}

/// `mmu_lock` held for read.
pub struct MmuReadGuard<'a> {
    /// Always `Some` outside `cond_resched`.
    guard: Option<RwLockReadGuard<'a, ()>>,
    lock: &'a MmuLock,
    _rank: RankToken,
    /// The hold, as a span of the trace (`--trace`); nothing when no subscriber listens.
    _trace: tracing::span::EnteredSpan,
}

impl fmt::Debug for MmuReadGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MmuReadGuard")
    }
}

impl MmuReadGuard<'_> {
    /// Proof that `mmu_lock` is held for read.
    #[inline]
    pub fn witness(&self) -> &MmuRead {
        &self.lock.read_witness
    }

    /// True if another thread waits for the lock (`rwlock_needbreak`).
    #[inline]
    pub fn is_contended(&self) -> bool {
        self.lock.is_contended()
    }

    /// If another thread waits for the lock: release it fairly, yield, reacquire, and return true
    /// (the caller restarts its walk). Otherwise return false without releasing.
    ///
    /// # Panics
    /// In debug builds, if a lock ranked after `mmu_lock` (an RCU guard, an rmap bit) is held.
    pub fn cond_resched(&mut self) -> bool {
        let lock = self.lock;
        cond_resched(lock, &mut self.guard, release_read_fair, || {
            lock.lock_read()
        })
    }
}

/// `mmu_lock` held for write.
pub struct MmuWriteGuard<'a> {
    /// Always `Some` outside `cond_resched`.
    guard: Option<RwLockWriteGuard<'a, ()>>,
    lock: &'a MmuLock,
    _rank: RankToken,
    /// The hold, as a span of the trace (`--trace`); nothing when no subscriber listens.
    _trace: tracing::span::EnteredSpan,
}

impl fmt::Debug for MmuWriteGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MmuWriteGuard")
    }
}

impl MmuWriteGuard<'_> {
    /// Proof that `mmu_lock` is held for write.
    #[inline]
    pub fn witness(&self) -> &MmuWrite {
        &self.lock.write_witness
    }

    /// Proof that `mmu_lock` is held for read (write implies read).
    #[inline]
    pub fn read_witness(&self) -> &MmuRead {
        &self.lock.read_witness
    }

    /// True if another thread waits for the lock (`rwlock_needbreak`).
    #[inline]
    pub fn is_contended(&self) -> bool {
        self.lock.is_contended()
    }

    /// If another thread waits for the lock: release it fairly, yield, reacquire for write, and
    /// return true (the caller restarts its walk). Otherwise return false without releasing.
    ///
    /// # Panics
    /// In debug builds, if a lock ranked after `mmu_lock` (an RCU guard, an rmap bit) is held.
    pub fn cond_resched(&mut self) -> bool {
        let lock = self.lock;
        cond_resched(lock, &mut self.guard, release_write_fair, || {
            lock.lock_write()
        })
    }
}

/// The `cond_resched` of both guards of `lock`: if another thread waits for it, releases `guard`
/// fairly with `release`, yields, reacquires with `acquire` and returns true; otherwise returns
/// false without releasing.
fn cond_resched<G>(
    lock: &MmuLock,
    guard: &mut Option<G>,
    release: fn(G),
    acquire: impl FnOnce() -> G,
) -> bool {
    // Checked even when uncontended, so the bug shows on every run, not only under contention.
    lock_rank::assert_none_held_above(LockRank::MmuLock);
    if !lock.is_contended() {
        return false;
    }
    let g = guard
        .take()
        .expect("mmu_lock guard invariant broken: guard is present outside cond_resched");
    release(g);
    super::yield_now();
    *guard = Some(acquire());
    lock.note_yield();
    true
}

/// Releases a read guard, handing the lock directly to a waiter (parking_lot's fair unlock).
fn release_read_fair(g: RwLockReadGuard<'_, ()>) {
    #[cfg(not(any(loom, feature = "shuttle")))]
    RwLockReadGuard::unlock_fair(g);
    #[cfg(any(loom, feature = "shuttle"))]
    drop(g);
}

/// Releases a write guard, handing the lock directly to a waiter (parking_lot's fair unlock).
fn release_write_fair(g: RwLockWriteGuard<'_, ()>) {
    #[cfg(not(any(loom, feature = "shuttle")))]
    RwLockWriteGuard::unlock_fair(g);
    #[cfg(any(loom, feature = "shuttle"))]
    drop(g);
}

/// A facade [`Mutex`] that takes part in lock-rank checking (`slots_lock`, `mn_invalidate_lock`).
pub struct RankedMutex<T> {
    rank: LockRank,
    mutex: Mutex<T>,
}

impl<T> fmt::Debug for RankedMutex<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RankedMutex")
            .field("rank", &self.rank)
            .finish_non_exhaustive()
    }
}

impl<T> RankedMutex<T> {
    /// Creates a mutex of rank `rank` holding `v`.
    pub fn new(rank: LockRank, v: T) -> Self {
        RankedMutex {
            rank,
            mutex: Mutex::new(v),
        }
    }

    /// The rank this mutex was created with.
    pub fn rank(&self) -> LockRank {
        self.rank
    }

    /// Acquires the mutex (the rank is checked before blocking).
    ///
    /// # Panics
    /// In debug builds, on a lock-order violation (including re-taking it on the same thread).
    pub fn lock(&self) -> RankedMutexGuard<'_, T> {
        let rank = lock_rank::acquire(self.rank);
        RankedMutexGuard {
            guard: self.mutex.lock(),
            _rank: rank,
        }
    }
}

/// A held [`RankedMutex`]; derefs to the protected value.
pub struct RankedMutexGuard<'a, T> {
    guard: MutexGuard<'a, T>,
    _rank: RankToken,
}

impl<T: fmt::Debug> fmt::Debug for RankedMutexGuard<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("RankedMutexGuard")
            .field(&*self.guard)
            .finish()
    }
}

impl<T> RankedMutexGuard<'_, T> {
    /// Blocks on `cv` until notified, releasing the mutex meanwhile and reacquiring it before
    /// returning (spurious wake-ups possible: re-check the condition). The rank stays registered:
    /// the thread takes no other lock while it waits.
    pub fn wait(&mut self, cv: &Condvar) {
        cv.wait(&mut self.guard);
    }

    /// Waits on `cv` while `condition` holds for the protected value.
    pub fn wait_while(&mut self, cv: &Condvar, mut condition: impl FnMut(&mut T) -> bool) {
        while condition(&mut self.guard) {
            cv.wait(&mut self.guard);
        }
    }
}

impl<T> Deref for RankedMutexGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T> DerefMut for RankedMutexGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.guard
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::sync::Arc;
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    fn needs_read(_: &MmuRead) -> u32 {
        1
    }
    fn needs_write(_: &MmuWrite) -> u32 {
        2
    }

    #[test]
    fn a_binding_accepts_its_own_lock_and_refuses_another() {
        let (a, b) = (MmuLock::new(), MmuLock::new());
        assert_ne!(a.id(), b.id());
        let bound = LockBinding::bound_to(&a);
        bound.check(a.write().witness().lock_id(), "test");
        let lazy = LockBinding::unbound();
        lazy.check(b.read().witness().lock_id(), "test");
        lazy.check(b.write().read_witness().lock_id(), "test");
        let foreign = b.read().witness().lock_id();
        let refused = std::panic::catch_unwind(|| bound.check(foreign, "test"));
        assert!(
            refused.is_err(),
            "a witness of another lock must be refused"
        );
    }

    #[test]
    fn witnesses_come_from_guards_and_name_their_lock() {
        let l = MmuLock::new();
        {
            let r = l.read();
            assert_eq!(needs_read(r.witness()), 1);
        }
        let w = l.write();
        assert_eq!(needs_write(w.witness()) + needs_read(w.read_witness()), 3);
    }

    #[test]
    fn stats_count_acquisitions() {
        let l = MmuLock::new();
        drop(l.read());
        drop(l.read());
        drop(l.write());
        let s = l.stats();
        assert_eq!(s.read_acquisitions, 2);
        assert_eq!(s.write_acquisitions, 1);
        assert_eq!(s.contended_reads + s.contended_writes, 0);
        assert!(!l.is_contended());
    }

    #[test]
    fn cond_resched_without_waiters_keeps_the_lock() {
        let l = MmuLock::new();
        let mut w = l.write();
        assert!(!w.cond_resched());
        assert!(l.lock.try_read().is_none(), "lock was released");
        assert_eq!(l.stats().resched_yields, 0);
    }

    #[test]
    fn cond_resched_yields_to_a_waiting_writer() {
        let l = Arc::new(MmuLock::new());
        let wrote = AtomicBool::new(false);
        std::thread::scope(|s| {
            let mut r = l.read();
            let h = s.spawn(|| {
                let _w = l.write();
                wrote.store(true, Ordering::SeqCst);
            });
            while !l.is_contended() {
                std::thread::sleep(Duration::from_millis(1));
            }
            // Let the writer park, so the fair release hands the lock straight to it.
            std::thread::sleep(Duration::from_millis(20));
            assert!(r.cond_resched(), "a writer was waiting");
            // The writer got the lock between our release and reacquisition (retry a few times in
            // case it had not parked yet when we released).
            let mut tries = 0;
            while !wrote.load(Ordering::SeqCst) && tries < 1000 {
                std::thread::sleep(Duration::from_millis(1));
                r.cond_resched();
                tries += 1;
            }
            assert!(
                wrote.load(Ordering::SeqCst),
                "writer never got in through cond_resched"
            );
            drop(r);
            h.join().expect("writer panicked");
        });
        let s = l.stats();
        assert_eq!(s.contended_writes, 1);
        assert!(s.resched_yields >= 1);
    }

    #[test]
    fn ranked_mutex_waits_on_condvar() {
        let m = RankedMutex::new(LockRank::MnInvalidate, 0u32);
        let cv = Condvar::new();
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(10));
                *m.lock() = 3;
                cv.notify_all();
            });
            let mut g = m.lock();
            g.wait_while(&cv, |v| *v == 0);
            assert_eq!(*g, 3);
        });
    }
}
