//! vCPU requests and remote TLB flushes: the vCPU-mode handshake of `kvm_make_all_cpus_request` /
//! `kvm_flush_remote_tlbs` (`virt/kvm/kvm_main.c`) and `vcpu_enter_guest` (`arch/x86/kvm/x86.c`).
//!
//! # Protocol
//!
//! Every registered vCPU owns one *slot*: a single 64-bit word, alone on its cache line, holding
//!
//! ```text
//!   bits 16..64  ack generation (wraps)      bit 8  IN_GUEST mode      bits 0..8  pending requests
//! ```
//!
//! Only the owning vCPU ([`VcpuHandle`]) clears request bits, changes the mode bit or advances the
//! generation; other threads only *set* request bits with `fetch_or`. Because the mode and the
//! requests live in one word, "store my side, then check the other side" is a single read-modify-write
//! on both sides, and the word's modification order decides who went first. That replaces the classic
//! two-location Dekker pattern (store `vcpu->mode`, full barrier, load `vcpu->requests` against set
//! request, full barrier, load mode), which needs `SeqCst` fences, with plain acquire/release RMWs.
//!
//! The steps:
//!
//! 1. **Post** (requester, [`VcpuRequests::make_all_request`] and [`VcpuRequests::flush_remote_tlbs`]):
//!    `old = word.fetch_or(bit)`. The returned `old` is the slot's mode and generation *at the instant
//!    the request became visible*.
//! 2. **Enter** ([`VcpuHandle::enter_guest`]): one CAS sets IN_GUEST, clears every pending request bit
//!    and advances the generation; the cleared bits are returned and the vCPU acts on them (flushes its
//!    TLB, reloads its root) before it touches guest memory.
//! 3. **Check** ([`VcpuHandle::check_requests`], before every guest access while in guest mode): a
//!    relaxed load of the word; if no request bit is set, return (no write, no shared-line traffic).
//!    Otherwise the same CAS as step 2 (mode unchanged) takes them and advances the generation: the
//!    generation step is the *acknowledgement*.
//! 4. **Exit** ([`VcpuHandle::exit_guest`]): one `fetch_add` clears IN_GUEST and advances the
//!    generation (also an acknowledgement). Pending requests stay pending for step 2. A vCPU must exit
//!    before it blocks on anything (a lock, a fault's `get_user_page`): a vCPU in guest mode never
//!    blocks, so a flusher waiting in step 5 always makes progress, even while holding `mmu_lock`.
//! 5. **Wait** ([`VcpuRequests::flush_remote_tlbs`] only): for every slot whose `old` from step 1 had
//!    IN_GUEST, spin until the generation differs from `old`'s. Slots that were outside guest mode are
//!    not waited for: they will take the request in step 2 before their next access.
//!
//! # Invariants
//!
//! 1. *Generation step ⇒ acknowledgement.* Every RMW that advances a slot's generation either clears
//!    every request bit set at that moment (steps 2–3: one CAS on the whole word) or clears IN_GUEST
//!    (step 4). No other RMW changes the generation.
//! 2. *No lost request.* A request bit, once set, is cleared only by the owning vCPU in step 2 or 3,
//!    which returns it to the caller; an exit (step 4) leaves it pending.
//! 3. *No stale TLB use after a flush* (DESIGN invariant 2 in docs/invariants.md, last clause). When
//!    `flush_remote_tlbs` returns, every vCPU either (a) was outside guest mode at step 1, so its next
//!    entry returns TlbFlush (invariant 2) before any access; or (b) performed, after step 1 in the
//!    word's modification order, a step-3 take (which returned TlbFlush, since the bit was set: 1) or a
//!    step-4 exit (after which step 2 returns it). A vCPU touches guest memory only in guest mode and
//!    only after a step 3, so no TLB entry filled before the call is used after the return.
//! 4. *Termination.* A waited-for vCPU is in guest mode, where it never blocks and calls step 3 before
//!    every access, or it exits (step 4), also when its [`VcpuHandle`] is dropped (even by a panic
//!    unwinding). Either advances the generation, so every wait in step 5 ends.
//!
//! # Ordering argument
//!
//! - Post is `AcqRel`: *Release* so that what made the request necessary (a zapped SPTE, a new root)
//!   happens-before the vCPU's walks after it takes the bit with an *Acquire* RMW (step 2/3); *Acquire*
//!   so that, when the post reads an exit (or a later RMW in its release sequence), the vCPU's accesses
//!   before that exit happen-before the flusher's return.
//! - Steps 2–3 are `AcqRel`: Acquire as above; Release because their generation step is an ack the
//!   flusher reads with an Acquire load in step 5, ordering the vCPU's earlier accesses (the last uses of
//!   old TLB entries) before the flusher frees what those entries pointed to.
//! - Step 4 is `Release` for the same reason; it need not acquire anything.
//! - The check fast path is `Relaxed`: it only decides whether to run the AcqRel take. If it misses a
//!   bit set concurrently, the flusher has not seen an ack for that bit yet (invariant 1) and is still
//!   waiting, so the vCPU's access is concurrent with, not after, the flush.
//!
//! # Locks
//!
//! The registry of slots is a `RwLock<Vec<_>>`, a leaf lock: posters hold it shared (also while
//! waiting in step 5), [`VcpuRequests::register`] and [`VcpuHandle`]'s drop hold it exclusive. A
//! waited-for vCPU is in guest mode and never takes it there (drop exits first), so holding it while
//! waiting cannot deadlock. It nests inside `mmu_lock`.

use crate::sync::atomic::{AtomicU64, Ordering};
use crate::sync::{Arc, RwLock, spin_hint, yield_now};

/// Request bits live in the low byte of a slot word.
const REQUEST_MASK: u64 = 0xff;
/// The slot's vCPU is in guest mode (`IN_GUEST_MODE`).
const IN_GUEST: u64 = 1 << 8;
/// One step of the acknowledgement generation (bits 16..64, wrapping).
const GEN_ONE: u64 = 1 << 16;
/// Everything except the generation.
const GEN_MASK: u64 = !(GEN_ONE - 1);
/// How many in-guest vCPUs one flush records before it waits for them (a fixed stack buffer, so a
/// flush never allocates; larger VMs are flushed in batches of this size).
const WAIT_BATCH: usize = 64;
/// Spins on a vCPU's word before the waiter starts yielding its CPU.
const SPINS_BEFORE_YIELD: u32 = 128;

/// One request a VM can raise on its vCPUs (`KVM_REQ_*`). Several can be pending at once: see
/// [`Requests`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Request {
    /// Drop every TLB entry before the next guest access (`KVM_REQ_TLB_FLUSH`).
    TlbFlush,
    /// The current root is obsolete: load a new one before the next guest access
    /// (`KVM_REQ_MMU_FREE_OBSOLETE_ROOTS` / `KVM_REQ_MMU_RELOAD`).
    MmuReload,
}

impl Request {
    /// The request's bit in a slot word.
    const fn bit(self) -> u8 {
        match self {
            Request::TlbFlush => 1 << 0,
            Request::MmuReload => 1 << 1,
        }
    }
}

/// A set of [`Request`]s taken by a vCPU, which must act on every one of them before it touches
/// guest memory.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Debug)]
pub struct Requests(u8);

impl Requests {
    /// The empty set.
    pub const NONE: Requests = Requests(0);

    /// True if the vCPU must flush its TLB.
    #[inline]
    pub const fn tlb_flush(&self) -> bool {
        self.0 & Request::TlbFlush.bit() != 0
    }

    /// True if the vCPU must load a new root.
    #[inline]
    pub const fn mmu_reload(&self) -> bool {
        self.0 & Request::MmuReload.bit() != 0
    }

    /// True if `req` is in the set.
    #[inline]
    pub const fn contains(&self, req: Request) -> bool {
        self.0 & req.bit() != 0
    }

    /// True if there is nothing to do.
    #[inline]
    pub const fn is_empty(&self) -> bool {
        self.0 == 0
    }
}

/// Counters of a [`VcpuRequests`] registry (read-only snapshot).
#[derive(Clone, Copy, PartialEq, Eq, Default, Debug)]
pub struct RequestStats {
    /// Completed [`VcpuRequests::flush_remote_tlbs`] calls.
    pub flushes: u64,
    /// [`VcpuRequests::make_all_request`] calls.
    pub requests: u64,
    /// vCPUs that flushes found in guest mode and waited for (one per vCPU per flush).
    pub waited_vcpus: u64,
    /// vCPUs registered now.
    pub vcpus: usize,
}

/// Counters of one [`VcpuHandle`] (kept by the vCPU thread in plain fields).
#[derive(Clone, Copy, PartialEq, Eq, Default, Debug)]
pub struct VcpuRequestStats {
    /// Guest entries.
    pub entries: u64,
    /// Guest exits.
    pub exits: u64,
    /// Takes (steps 2–3 of the protocol) that returned [`Request::TlbFlush`].
    pub tlb_flushes_taken: u64,
    /// Takes that returned [`Request::MmuReload`].
    pub mmu_reloads_taken: u64,
}

/// Keeps a value on its own cache line(s) so a vCPU's polling never shares a line with another's.
#[repr(align(128))]
#[derive(Debug)]
struct CachePadded<T>(T);

/// One vCPU's slot word (layout in the module doc).
#[derive(Debug)]
struct Slot {
    word: CachePadded<AtomicU64>,
}

impl Slot {
    /// Step 1: sets `bit`; returns the word as it was just before.
    #[inline]
    fn post(&self, bit: u8) -> u64 {
        // ORDERING: AcqRel, see the module doc: Release publishes the cause of the request to the
        // vCPU's Acquire take (invariant 3); Acquire orders a read exit's earlier accesses before our
        // return.
        self.word.0.fetch_or(u64::from(bit), Ordering::AcqRel)
    }
}

/// The registry of slots (the leaf lock of the module doc's "Locks").
type SlotList = RwLock<Vec<Arc<Slot>>>;

/// Counters shared by every poster, apart from the registry lock's line.
#[derive(Debug)]
struct SharedCounters {
    flushes: AtomicU64,
    requests: AtomicU64,
    waited_vcpus: AtomicU64,
}

/// The per-VM registry of vCPU slots (`kvm->vcpu_array` plus each `vcpu->mode` / `vcpu->requests`).
///
/// Requesters (the MMU under `mmu_lock`, the notifier callbacks) use [`Self::make_all_request`] and
/// [`Self::flush_remote_tlbs`]; each vCPU thread holds the [`VcpuHandle`] that [`Self::register`]
/// returned.
#[derive(Debug)]
pub struct VcpuRequests {
    /// Shared with every [`VcpuHandle`], which removes its slot on drop.
    slots: Arc<SlotList>,
    counters: CachePadded<SharedCounters>,
}

impl VcpuRequests {
    /// Creates an empty registry.
    pub fn new() -> Arc<VcpuRequests> {
        Arc::new(VcpuRequests {
            slots: Arc::new(RwLock::new(Vec::new())),
            counters: CachePadded(SharedCounters {
                flushes: AtomicU64::new(0),
                requests: AtomicU64::new(0),
                waited_vcpus: AtomicU64::new(0),
            }),
        })
    }

    /// Registers a new vCPU, outside guest mode with no pending request (its TLB starts empty and it
    /// loads its root on first entry). The slot is unregistered when the handle is dropped. Takes the
    /// registry lock exclusive, so it waits for flushes in progress (never the reverse: flushes do not
    /// wait for registrations).
    pub fn register(&self) -> VcpuHandle {
        let slot = Arc::new(Slot {
            word: CachePadded(AtomicU64::new(0)),
        });
        self.slots.write().push(Arc::clone(&slot));
        VcpuHandle {
            registry: Arc::clone(&self.slots),
            slot,
            in_guest: false,
            stats: VcpuRequestStats::default(),
        }
    }

    /// Raises `req` on every registered vCPU without waiting (`kvm_make_all_cpus_request` without
    /// `KVM_REQUEST_WAIT`): vCPUs in guest mode take it at their next [`VcpuHandle::check_requests`],
    /// the others on their next [`VcpuHandle::enter_guest`].
    pub fn make_all_request(&self, req: Request) {
        let slots = self.slots.read();
        for slot in slots.iter() {
            slot.post(req.bit());
        }
        drop(slots);
        // ORDERING: Relaxed: a statistics counter, read only for reporting; it orders nothing.
        self.counters.0.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Raises [`Request::TlbFlush`] on every vCPU and waits until every vCPU that was in guest mode
    /// has acknowledged it (taken it or left guest mode) (`kvm_flush_remote_tlbs`). After the return no
    /// vCPU uses a TLB entry filled before the call (invariant 3).
    ///
    /// Safe to call while holding `mmu_lock`: a vCPU in guest mode never blocks (invariant 4). Does not
    /// allocate. A vCPU thread calls it only outside guest mode (its fault handler runs after
    /// [`VcpuHandle::exit_guest`]), or it would wait for its own acknowledgement.
    pub fn flush_remote_tlbs(&self) {
        let slots = self.slots.read();
        let mut pending: [(usize, u64); WAIT_BATCH] = [(0, 0); WAIT_BATCH];
        let mut len = 0;
        let mut waited = 0u64;
        for (index, slot) in slots.iter().enumerate() {
            let old = slot.post(Request::TlbFlush.bit());
            if old & IN_GUEST != 0 {
                if len == WAIT_BATCH {
                    wait_for_acks(&slots, &pending[..len]);
                    len = 0;
                }
                pending[len] = (index, old & GEN_MASK);
                len += 1;
                waited += 1;
            }
        }
        wait_for_acks(&slots, &pending[..len]);
        drop(slots);
        // ORDERING: Relaxed: statistics counters, read only for reporting; they order nothing.
        self.counters.0.flushes.fetch_add(1, Ordering::Relaxed);
        self.counters
            .0
            .waited_vcpus
            .fetch_add(waited, Ordering::Relaxed);
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> RequestStats {
        let vcpus = self.slots.read().len();
        // ORDERING: Relaxed: statistics counters; each value is exact, the snapshot is not atomic
        // across them.
        let c = &self.counters.0;
        RequestStats {
            flushes: c.flushes.load(Ordering::Relaxed),
            requests: c.requests.load(Ordering::Relaxed),
            waited_vcpus: c.waited_vcpus.load(Ordering::Relaxed),
            vcpus,
        }
    }

    /// Number of registered vCPUs.
    pub fn vcpus(&self) -> usize {
        self.slots.read().len()
    }
}

/// Step 5: waits until each `(index, generation)` slot's generation has moved.
fn wait_for_acks(slots: &[Arc<Slot>], pending: &[(usize, u64)]) {
    for &(index, generation) in pending {
        let word = &slots[index].word.0;
        let mut spins = 0u32;
        // ORDERING: Acquire pairs with the vCPU's Release ack (steps 3-4), so its uses of old TLB
        // entries happen-before our return (invariant 3).
        while word.load(Ordering::Acquire) & GEN_MASK == generation {
            if spins < SPINS_BEFORE_YIELD {
                spins += 1;
                spin_hint();
            } else {
                yield_now();
            }
        }
    }
}

/// Mode of a vCPU as its own thread sees it (`vcpu->mode`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum VcpuMode {
    /// Not running guest code: may block; requests wait for the next entry (`OUTSIDE_GUEST_MODE`).
    OutsideGuest,
    /// Running guest code: never blocks; checks requests before every access (`IN_GUEST_MODE`).
    InGuest,
}

/// The vCPU thread's side of one slot: enters and leaves guest mode and takes requests. Owned by one
/// thread (`Send`, not `Sync` in use: every method takes `&mut self`). Dropping it leaves guest mode
/// and unregisters the vCPU.
#[derive(Debug)]
pub struct VcpuHandle {
    /// The registry's slot list, to unregister on drop.
    registry: Arc<SlotList>,
    slot: Arc<Slot>,
    /// Mirrors the IN_GUEST bit, which only this handle changes.
    in_guest: bool,
    stats: VcpuRequestStats,
}

impl VcpuHandle {
    /// Step 2: enters guest mode and takes every pending request (`vcpu_enter_guest`). The caller
    /// must act on the returned requests (flush its TLB on [`Requests::tlb_flush`], load a new root on
    /// [`Requests::mmu_reload`]) before it touches guest memory. Called in guest mode it behaves as
    /// [`Self::check_requests`] that always writes.
    pub fn enter_guest(&mut self) -> Requests {
        let taken = self.take(IN_GUEST);
        if !self.in_guest {
            self.in_guest = true;
            self.stats.entries += 1;
        }
        taken
    }

    /// Step 4: leaves guest mode (and acknowledges every request posted so far; they stay pending
    /// for the next entry). Must be called before the vCPU blocks on anything. A no-op outside guest
    /// mode.
    pub fn exit_guest(&mut self) {
        if !self.in_guest {
            return;
        }
        self.in_guest = false;
        self.stats.exits += 1;
        // ORDERING: Release: the generation step acknowledges every post before it (invariant 1);
        // the flusher's Acquire load orders our earlier guest accesses before its return. Adding
        // `GEN_ONE - IN_GUEST` clears IN_GUEST (set: `in_guest` mirrors it) without a borrow and
        // carries one into the generation, which wraps at bit 64.
        self.slot
            .word
            .0
            .fetch_add(GEN_ONE - IN_GUEST, Ordering::Release);
    }

    /// Step 3: takes and acknowledges pending requests (`kvm_check_request` at an instruction
    /// boundary). With none pending this is one relaxed load of the vCPU's own cache line.
    #[inline]
    pub fn check_requests(&mut self) -> Requests {
        if !self.requests_pending() {
            return Requests::NONE;
        }
        self.take(0)
    }

    /// True if a request is pending (`kvm_request_pending`): the read-only half of
    /// [`Self::check_requests`], one relaxed load of the vCPU's own cache line. A fast path that
    /// sees `false` may go on with its access without taking anything; seeing `true` it must call
    /// [`Self::check_requests`] (or [`Self::enter_guest`]) before the access.
    #[inline(always)]
    pub fn requests_pending(&self) -> bool {
        // ORDERING: Relaxed: only a hint whether to take, exactly as `check_requests`'s own load;
        // see "Ordering argument" in the module doc.
        self.slot.word.0.load(Ordering::Relaxed) & REQUEST_MASK != 0
    }

    /// The vCPU's mode.
    pub fn mode(&self) -> VcpuMode {
        if self.in_guest {
            VcpuMode::InGuest
        } else {
            VcpuMode::OutsideGuest
        }
    }

    /// This vCPU's counters.
    pub fn stats(&self) -> VcpuRequestStats {
        self.stats
    }

    /// Clears every request bit, ORs `set_mode` into the mode and advances the generation, in one
    /// CAS (invariant 1); returns the cleared bits.
    fn take(&mut self, set_mode: u64) -> Requests {
        let word = &self.slot.word.0;
        // ORDERING: Relaxed: the CAS below re-validates the value.
        let mut old = word.load(Ordering::Relaxed);
        loop {
            let new = ((old & !REQUEST_MASK) | set_mode).wrapping_add(GEN_ONE);
            // ORDERING: AcqRel on success: Acquire pairs with the posts' Release (the cause of each
            // request is visible to our next walk), Release makes the generation step an ack the
            // flusher acquires (invariant 3). Relaxed on failure: we only retry.
            match word.compare_exchange_weak(old, new, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => break,
                Err(current) => old = current,
            }
        }
        // The mask keeps only the low byte, so the cast is lossless.
        #[allow(clippy::cast_possible_truncation)]
        let taken = Requests((old & REQUEST_MASK) as u8);
        if taken.tlb_flush() {
            self.stats.tlb_flushes_taken += 1;
        }
        if taken.mmu_reload() {
            self.stats.mmu_reloads_taken += 1;
        }
        taken
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        // Invariant 4: a flusher may be waiting for this vCPU; leaving guest mode acknowledges it
        // before we take the registry lock it holds shared.
        self.exit_guest();
        let mut slots = self.registry.write();
        if let Some(pos) = slots.iter().position(|s| Arc::ptr_eq(s, &self.slot)) {
            slots.swap_remove(pos);
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn request_posted_outside_guest_is_taken_on_entry() {
        let reqs = VcpuRequests::new();
        let mut vcpu = reqs.register();
        reqs.make_all_request(Request::MmuReload);
        reqs.flush_remote_tlbs();
        let taken = vcpu.enter_guest();
        assert!(taken.tlb_flush() && taken.mmu_reload());
        assert!(vcpu.check_requests().is_empty());
        assert_eq!(vcpu.mode(), VcpuMode::InGuest);
    }

    #[test]
    fn flush_of_vcpus_outside_guest_mode_does_not_wait() {
        let reqs = VcpuRequests::new();
        let _a = reqs.register();
        let _b = reqs.register();
        reqs.flush_remote_tlbs();
        let s = reqs.stats();
        assert_eq!((s.flushes, s.waited_vcpus, s.vcpus), (1, 0, 2));
    }

    #[test]
    fn exit_keeps_requests_pending_for_next_entry() {
        let reqs = VcpuRequests::new();
        let mut vcpu = reqs.register();
        assert!(vcpu.enter_guest().is_empty());
        reqs.make_all_request(Request::TlbFlush);
        vcpu.exit_guest();
        assert_eq!(vcpu.mode(), VcpuMode::OutsideGuest);
        assert!(vcpu.enter_guest().tlb_flush());
        let s = vcpu.stats();
        assert_eq!((s.entries, s.exits, s.tlb_flushes_taken), (2, 1, 1));
    }

    #[test]
    fn flush_waits_for_in_guest_vcpu_ack() {
        let reqs = VcpuRequests::new();
        let mut vcpu = reqs.register();
        assert!(vcpu.enter_guest().is_empty());
        let flusher = {
            let reqs = Arc::clone(&reqs);
            std::thread::spawn(move || reqs.flush_remote_tlbs())
        };
        // Wait (bounded) until the request is posted, without acking it.
        for _ in 0..10_000_000 {
            if vcpu.slot.word.0.load(Ordering::Relaxed) & REQUEST_MASK != 0 {
                break;
            }
            std::thread::yield_now();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(
            !flusher.is_finished(),
            "flush returned before the in-guest vCPU acked"
        );
        assert!(vcpu.check_requests().tlb_flush());
        flusher.join().expect("flusher panicked");
        assert_eq!(reqs.stats().waited_vcpus, 1);
    }

    #[test]
    fn dropping_a_handle_unregisters_it_and_acks() {
        let reqs = VcpuRequests::new();
        let mut vcpu = reqs.register();
        vcpu.enter_guest();
        assert_eq!(reqs.vcpus(), 1);
        drop(vcpu);
        assert_eq!(reqs.vcpus(), 0);
        reqs.flush_remote_tlbs();
        assert_eq!(reqs.stats().waited_vcpus, 0);
    }

    #[test]
    fn exit_clears_only_the_mode_bit_and_advances_generation() {
        let reqs = VcpuRequests::new();
        let mut vcpu = reqs.register();
        vcpu.enter_guest();
        reqs.make_all_request(Request::MmuReload);
        let before = vcpu.slot.word.0.load(Ordering::Relaxed);
        vcpu.exit_guest();
        let after = vcpu.slot.word.0.load(Ordering::Relaxed);
        assert_eq!(after & REQUEST_MASK, before & REQUEST_MASK);
        assert_eq!(after & IN_GUEST, 0);
        assert_eq!((after & GEN_MASK).wrapping_sub(before & GEN_MASK), GEN_ONE);
    }
}
