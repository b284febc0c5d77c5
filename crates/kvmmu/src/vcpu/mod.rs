//! Simulated vCPUs: the hardware that reads and writes guest memory through the MMU's translations.
//!
//! # How an access runs
//! 1. Outside guest mode, make sure the vCPU has a valid root (`kvm_mmu_reload`), then enter guest
//!    mode; pending requests (TLB flush, root reload) are handled on entry.
//! 2. At every access (an instruction boundary) the vCPU checks its requests, which acknowledges
//!    remote TLB flushes. It then looks up its software TLB; on a miss it walks the current root
//!    with acquire loads, setting Accessed (and Dirty on a write) with an atomic OR as hardware does,
//!    and fills the TLB.
//! 3. The access itself is an atomic word access to the host frame, checked against the frame's owner
//!    tag: an access through a stale translation is reported as
//!    [`VcpuExit::StaleTranslation`], never silently performed.
//! 4. A not-present or write-protected translation leaves guest mode and runs the page fault
//!    handler; RETRY re-executes the access; an unresolvable fault is returned as a [`VcpuExit`].
//! 5. The common case — aligned, no request pending, a valid root, a TLB hit that allows the
//!    access — is an inlined fast path doing exactly steps 2–3 (one relaxed load of the request
//!    word, the root's invalid flag, one TLB set, the checked frame access) with no lock and no
//!    atomic RMW (a read writes only the vCPU's own TLB and counters; a write adds its word's
//!    store and the arena's fence); anything else runs the general loop, which repeats none of
//!    the fast path's work (a TLB miss walks at once and is counted once).
//!
//! A vCPU never blocks on a lock while in guest mode (its walk pins nothing, docs/locking.md G1–G3;
//! a fill without a recorded owner enters SRCU, which never blocks),
//! so a thread that holds `mmu_lock` and waits for TLB-flush acknowledgements cannot deadlock with it.
//!
//! # The guest-mode contract
//! [`GuestMode`] is `!Send`: guest mode belongs to the thread that entered it, whose per-thread
//! depth ([`crate::sync::guest_mode`]) the layers below check. While a thread is in guest mode,
//! every call that could wait for its own TLB-flush acknowledgement is refused at its entry,
//! before it changes anything: host `mmap`/`munmap`/`mprotect`/`madvise_dontneed`/aging
//! (`HostError::InGuestMode`), memslot updates (`SetMemoryRegionError::InGuestMode`), creating a
//! vCPU (`VmError::InGuestMode`), entering a second vCPU ([`VcpuExit::InGuestMode`] from
//! [`Vcpu::try_enter`], [`Vcpu::read_u64`] and [`Vcpu::write_u64`]; a panic from
//! [`Vcpu::enter`]), and, with a panic, everything that takes `mmu_lock` or `slots_lock`
//! (`Vm::reset_mmu`, `Vm::spte` on the shadow MMU), `HostMm::release`,
//! `HostMm::register_notifier`, `Vm::shutdown` and dropping the `Vm`.

mod nested;
pub mod tlb;
mod walker;

pub use nested::{NestedError, NestedGuest};

use crate::addr::{AsId, Gpa};
use crate::mmu::{FaultOutcome, MmuRoot};
use crate::sync::Arc;
use crate::sync::atomic::Ordering;
use crate::sync::guest_mode;
use crate::vm::request::VcpuHandle;
use crate::vm::{Vm, VmError, VmInner};
use core::marker::PhantomData;
use core::mem::ManuallyDrop;
use tlb::Tlb;

pub use crate::vm::VcpuExit;

/// Per-vCPU counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuStats {
    /// Completed guest accesses.
    pub accesses: u64,
    /// TLB misses that walked the page tables.
    pub tlb_misses: u64,
    /// Faults taken (each attempt).
    pub faults: u64,
    /// Faults that returned RETRY.
    pub fault_retries: u64,
    /// Root (re)loads.
    pub root_loads: u64,
    /// TLB flushes performed because of remote requests.
    pub tlb_flushes: u64,
}

/// A virtual CPU. Owned by one thread at a time.
pub struct Vcpu {
    vm: Arc<VmInner>,
    /// Dropped by `Drop for Vcpu`, unless that would block (see there).
    handle: ManuallyDrop<VcpuHandle>,
    tlb: Tlb,
    root: Option<MmuRoot>,
    as_id: AsId,
    stats: VcpuStats,
    /// This vCPU's dirty ring, if the VM enabled the ring before creating it.
    dirty_ring: Option<Arc<crate::vm::dirty_ring::DirtyRing>>,
    /// L2 mode: the EPT12 this vCPU translates L2 addresses through (`vcpu/nested.rs`).
    l2: Option<nested::L2Context>,
}

impl Vm {
    /// Creates a vCPU running in address space 0. Every access takes `&mut self`, so one thread
    /// drives it at a time (it can move between threads while outside guest mode).
    ///
    /// Errors: [`VmError::Dead`] after teardown, [`VmError::InGuestMode`] from a thread that holds
    /// a vCPU in guest mode (registering a vCPU waits for any remote TLB flush in flight).
    pub fn create_vcpu(&self) -> Result<Vcpu, VmError> {
        self.create_vcpu_in(AsId::new(0))
    }

    /// Creates a vCPU running in address space `as_id` (0, or 1 for a VM with two address
    /// spaces, as SMM). Errors: as [`Vm::create_vcpu`], and [`VmError::NoAddressSpace`] for an
    /// address space the VM does not have.
    pub fn create_vcpu_in(&self, as_id: AsId) -> Result<Vcpu, VmError> {
        guest_mode::check("create_vcpu")?;
        let vm = self.inner();
        if as_id.index() >= vm.config.address_spaces {
            return Err(VmError::NoAddressSpace { as_id });
        }
        if vm.dead.load(Ordering::Acquire) {
            return Err(VmError::Dead);
        }
        Ok(Vcpu::new(vm.clone(), as_id))
    }
}

impl Vcpu {
    fn new(vm: Arc<VmInner>, as_id: AsId) -> Vcpu {
        let handle = vm.requests.register();
        let tlb = Tlb::new(vm.config.tlb_entries);
        let dirty_ring = vm.dirty_ring_for_new_vcpu();
        Vcpu {
            dirty_ring,
            vm,
            handle: ManuallyDrop::new(handle),
            tlb,
            root: None,
            as_id,
            stats: VcpuStats::default(),
            l2: None,
        }
    }

    /// True if this vCPU has a dirty ring at its soft limit (`kvm_dirty_ring_soft_full`).
    fn dirty_ring_soft_full(&self) -> bool {
        self.dirty_ring.as_deref().is_some_and(|r| r.soft_full())
    }

    /// The address space the vCPU runs in.
    pub fn address_space(&self) -> AsId {
        self.as_id
    }

    /// Moves the vCPU to address space `as_id` (as entering or leaving SMM does): it drops its
    /// root and TLB and loads the new space's root at its next access. On error nothing changed.
    ///
    /// Errors: [`VmError::NoAddressSpace`] for an address space the VM does not have.
    pub fn set_address_space(&mut self, as_id: AsId) -> Result<(), VmError> {
        if as_id.index() >= self.vm.config.address_spaces {
            return Err(VmError::NoAddressSpace { as_id });
        }
        if as_id != self.as_id {
            self.as_id = as_id;
            self.root = None;
            self.tlb.flush_all();
        }
        Ok(())
    }

    /// Reads the 8-byte word at `gpa` (one guest instruction).
    ///
    /// Errors: the exits of [`GuestMode::read_u64`], and [`VcpuExit::InGuestMode`] if the
    /// calling thread already holds another vCPU in guest mode.
    pub fn read_u64(&mut self, gpa: Gpa) -> Result<u64, VcpuExit> {
        self.try_enter()?.read_u64(gpa)
    }

    /// Writes the 8-byte word at `gpa` (one guest instruction).
    ///
    /// Errors: as [`Vcpu::read_u64`].
    pub fn write_u64(&mut self, gpa: Gpa, value: u64) -> Result<(), VcpuExit> {
        self.try_enter()?.write_u64(gpa, value)
    }

    /// Fetches the 8-byte word at `gpa` as an instruction (one guest instruction fetch); see
    /// [`GuestMode::fetch_u64`]. Errors: as [`Vcpu::read_u64`].
    pub fn fetch_u64(&mut self, gpa: Gpa) -> Result<u64, VcpuExit> {
        self.try_enter()?.fetch_u64(gpa)
    }

    /// Reads `buf.len()` bytes at `gpa` (any alignment, across pages); see
    /// [`GuestMode::read_bytes`]. Errors: as there, and as [`Vcpu::read_u64`].
    pub fn read_bytes(&mut self, gpa: Gpa, buf: &mut [u8]) -> Result<(), VcpuExit> {
        self.try_enter()?.read_bytes(gpa, buf)
    }

    /// Writes `data` at `gpa` (any alignment, across pages); see [`GuestMode::write_bytes`].
    /// Errors: as there, and as [`Vcpu::read_u64`].
    pub fn write_bytes(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), VcpuExit> {
        self.try_enter()?.write_bytes(gpa, data)
    }

    /// Enters guest mode for a run of accesses; guest mode ends when the returned value is dropped.
    /// Running many accesses in one session is how a real guest runs, and is much cheaper than one
    /// entry per access.
    ///
    /// # Panics
    /// If the calling thread already holds a vCPU in guest mode (see [`Vcpu::try_enter`]);
    /// nothing was changed then.
    #[track_caller]
    pub fn enter(&mut self) -> GuestMode<'_> {
        match self.try_enter() {
            Ok(g) => g,
            Err(e) => panic!("{e}"),
        }
    }

    /// Enters guest mode as [`Vcpu::enter`] does, or refuses with [`VcpuExit::InGuestMode`],
    /// changing nothing, if the calling thread already holds a vCPU in guest mode: one thread
    /// runs one vCPU, and a second vCPU's fault on this thread would take `mmu_lock`, which an
    /// invalidation waiting for the first vCPU's acknowledgement may hold (a deadlock).
    pub fn try_enter(&mut self) -> Result<GuestMode<'_>, VcpuExit> {
        guest_mode::check("entering a second vCPU")?;
        guest_mode::enter();
        let reqs = self.handle.enter_guest();
        self.apply_requests(reqs);
        Ok(GuestMode {
            vcpu: self,
            _not_send: PhantomData,
        })
    }

    /// Per-vCPU counters (the TLB's own counters are in [`Vcpu::tlb_stats`]).
    pub fn stats(&self) -> VcpuStats {
        self.stats
    }

    /// The software TLB's counters.
    pub fn tlb_stats(&self) -> tlb::TlbStats {
        self.tlb.stats()
    }

    fn apply_requests(&mut self, reqs: crate::vm::request::Requests) {
        if reqs.tlb_flush() {
            self.tlb.flush_all();
            self.stats.tlb_flushes += 1;
        }
        if reqs.mmu_reload() {
            self.tlb.flush_all();
            self.root = None;
        }
    }

    /// `kvm_mmu_reload`: outside guest mode, take a valid root.
    fn load_root(&mut self) -> Result<(), VcpuExit> {
        if self.vm.dead.load(Ordering::Acquire) {
            return Err(VcpuExit::VmDead);
        }
        if self.root.as_ref().is_some_and(|r| !r.is_invalid()) {
            return Ok(());
        }
        self.root = None;
        self.tlb.flush_all();
        let root = self.load_root_for_mode().ok_or(VcpuExit::VmDead)?;
        self.root = Some(root);
        self.stats.root_loads += 1;
        Ok(())
    }
}

impl core::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Vcpu")
            .field("address_space", &self.as_id)
            .field("root", &self.root)
            .field("stats", &self.stats)
            .field("tlb", &self.tlb.stats())
            .finish_non_exhaustive()
    }
}

impl core::fmt::Debug for GuestMode<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("GuestMode")
            .field("vcpu", &self.vcpu)
            .finish()
    }
}

/// Unregisters the vCPU from the VM's request registry.
///
/// # Panics
/// When dropped by a thread that holds another vCPU in guest mode: unregistering takes the
/// registry lock, which a remote TLB flush holds while it waits for that other vCPU's
/// acknowledgement (a deadlock). The registration is then leaked instead (this vCPU is outside
/// guest mode, so no flush ever waits for it); if the thread is already unwinding, it is leaked
/// without a second panic.
impl Drop for Vcpu {
    fn drop(&mut self) {
        if guest_mode::in_guest_mode() {
            if !std::thread::panicking() {
                guest_mode::refuse("dropping a vCPU");
            }
            return;
        }
        // SAFETY: `handle` is dropped only here, once, and `self` is not used afterwards.
        unsafe { ManuallyDrop::drop(&mut self.handle) };
    }
}

/// A vCPU in guest mode. Dropping it leaves guest mode.
///
/// While it lives the thread is "running guest code": it must not block on anything another thread
/// may be waiting on. In particular it must not call host operations that invalidate memory
/// (`munmap`, `mprotect`, `madvise_dontneed`, `release`), memslot updates, `Vm::reset_mmu`,
/// `Vm::shutdown` or drop the `Vm`: each of those waits for every vCPU in guest mode to acknowledge
/// a TLB flush, and this one only acknowledges at its next access or when it leaves guest mode.
/// Such calls are refused at their entry, before they change anything (see the module doc's
/// "guest-mode contract"), instead of deadlocking.
///
/// `GuestMode` is not `Send`: guest mode belongs to the thread that entered it (the per-thread
/// depth the refusals check), so it cannot be dropped on another thread:
///
/// ```compile_fail
/// fn assert_send<T: Send>(_: T) {}
/// fn move_to_another_thread(vcpu: &mut kvmmu::Vcpu) {
///     assert_send(vcpu.enter());
/// }
/// ```
pub struct GuestMode<'v> {
    vcpu: &'v mut Vcpu,
    /// Not `Send` (nor `Sync`): the guest-mode depth is the entering thread's.
    _not_send: PhantomData<*const ()>,
}

impl GuestMode<'_> {
    /// Reads the 8-byte word at `gpa`.
    #[inline]
    pub fn read_u64(&mut self, gpa: Gpa) -> Result<u64, VcpuExit> {
        self.access(gpa, None, u64::MAX, false)
    }

    /// Writes the 8-byte word at `gpa`.
    #[inline]
    pub fn write_u64(&mut self, gpa: Gpa, value: u64) -> Result<(), VcpuExit> {
        self.access(gpa, Some(value), u64::MAX, false).map(|_| ())
    }

    /// Fetches the 8-byte word at `gpa` as an instruction: a read that needs the X bit of the
    /// translation (an EPT violation on a leaf without X, e.g. a huge leaf under the NX huge pages
    /// mitigation, `VmConfig::nx_huge_pages`, whose fault then maps the page with a 4K leaf).
    #[inline]
    pub fn fetch_u64(&mut self, gpa: Gpa) -> Result<u64, VcpuExit> {
        self.access(gpa, None, u64::MAX, true)
    }

    /// Reads `buf.len()` bytes starting at `gpa`, any alignment, across page boundaries (each
    /// 8-byte word is one guest load, little-endian as on x86).
    ///
    /// Errors: the exits of [`GuestMode::read_u64`] for the first word that cannot be read (the
    /// bytes before it are already in `buf`, as a `rep movs` that faults mid-way leaves them), and
    /// [`VcpuExit::AddressOverflow`] if the range does not fit below 2^64 (nothing is read).
    pub fn read_bytes(&mut self, gpa: Gpa, buf: &mut [u8]) -> Result<(), VcpuExit> {
        let mut done = 0usize;
        for (word, first, len) in byte_words(gpa, buf.len())? {
            let bytes = self.access(word, None, u64::MAX, false)?.to_le_bytes();
            buf[done..done + len].copy_from_slice(&bytes[first..first + len]);
            done += len;
        }
        Ok(())
    }

    /// Writes `data` starting at `gpa`, any alignment, across page boundaries. Whole words are
    /// plain word stores; the bytes of a partly covered word are merged into it atomically, so a
    /// concurrent write to its other bytes (by another vCPU or the host) is never lost.
    ///
    /// Errors: as [`GuestMode::read_bytes`] (the bytes before the failing word are written).
    pub fn write_bytes(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), VcpuExit> {
        let mut done = 0usize;
        for (word, first, len) in byte_words(gpa, data.len())? {
            let mut bytes = [0u8; 8];
            bytes[first..first + len].copy_from_slice(&data[done..done + len]);
            let mask = if len == 8 {
                u64::MAX
            } else {
                (u64::MAX >> (64 - 8 * len as u32)) << (8 * first as u32)
            };
            self.access(word, Some(u64::from_le_bytes(bytes)), mask, false)?;
            done += len;
        }
        Ok(())
    }

    /// One guest access: translate (TLB, walk, or fault) and perform it.
    ///
    /// The fast path (inlined into the caller) is the common case of a real vCPU: aligned, no
    /// request pending (one relaxed load of the vCPU's own request word, `kvm_request_pending`), a
    /// valid root, and a TLB hit that allows the access; then one checked frame access. Everything
    /// else goes to [`Self::access_slow`], which starts over from the request check, except that a
    /// plain TLB miss goes straight to the walk: the fast path has just checked requests and the
    /// root, and the same thread changed nothing since, so repeating those checks (and counting a
    /// second TLB lookup) would be redundant.
    #[inline(always)]
    fn access(
        &mut self,
        gpa: Gpa,
        write: Option<u64>,
        mask: u64,
        fetch: bool,
    ) -> Result<u64, VcpuExit> {
        let vcpu = &mut *self.vcpu;
        if gpa.raw() & 7 == 0
            && !vcpu.handle.requests_pending()
            && vcpu.root.as_ref().is_some_and(|r| !r.is_invalid())
        {
            return match walker::tlb_access(vcpu, gpa, write, mask, fetch) {
                Some(Ok(v)) => {
                    vcpu.stats.accesses += 1;
                    Ok(v)
                }
                Some(Err(source)) => Err(VcpuExit::StaleTranslation { gpa, source }),
                None => self.access_slow(gpa, write, mask, fetch, true),
            };
        }
        self.access_slow(gpa, write, mask, fetch, false)
    }

    /// The general access loop: requests, root (re)load, translation, faults and retries.
    /// `missed`: the caller has just checked requests and the root and missed in the TLB (see
    /// [`Self::access`]), so the first attempt walks at once.
    #[inline(never)]
    fn access_slow(
        &mut self,
        gpa: Gpa,
        write: Option<u64>,
        mask: u64,
        fetch: bool,
        mut missed: bool,
    ) -> Result<u64, VcpuExit> {
        if gpa.raw() & 7 != 0 {
            return Err(VcpuExit::Unaligned { gpa });
        }
        let mut spins = 0u32;
        loop {
            let attempt = if missed {
                missed = false;
                walker::walk_and_access(self.vcpu, gpa, write, mask, fetch)?
            } else {
                // An instruction boundary: acknowledge remote TLB flushes before translating.
                let reqs = self.vcpu.handle.check_requests();
                if !reqs.is_empty() {
                    self.vcpu.apply_requests(reqs);
                }
                if self.vcpu.root.as_ref().is_none_or(|r| r.is_invalid()) {
                    self.leave_guest_mode_for(|v| v.load_root())?;
                    continue;
                }
                walker::translate_and_access(self.vcpu, gpa, write, mask, fetch)?
            };
            match attempt {
                walker::Access::Done(v) => {
                    self.vcpu.stats.accesses += 1;
                    return Ok(v);
                }
                walker::Access::Fault => {
                    // A soft-full dirty ring exits before the fault (no push past the soft
                    // limit) and after the fault that filled it (dirty_ring.rs R1).
                    if self.vcpu.dirty_ring_soft_full() {
                        return Err(VcpuExit::DirtyRingFull);
                    }
                    let outcome = match self.leave_guest_mode_for(|v| {
                        // Borrowed, not cloned: a clone and its drop are two atomic RMWs on
                        // the root's shared reference count per fault.
                        let root = v.root.as_ref().ok_or(VcpuExit::VmDead)?;
                        v.stats.faults += 1;
                        let mut fill = None;
                        let r = v.handle_fault(root, gpa, write, mask, fetch, &mut fill);
                        // F2: cache the installed leaf now, outside guest mode, so that a flush
                        // posted since the install is taken on re-entry and drops it; the retry
                        // below then hits in the TLB instead of walking the new leaf again.
                        if let Some(fill) = fill {
                            walker::fill_from_fault(v, gpa.gfn(), fill);
                        }
                        r
                    })? {
                        nested::FaultResult::Outcome(o) => o,
                        nested::FaultResult::Emulated(v) => {
                            self.vcpu.stats.accesses += 1;
                            return Ok(v);
                        }
                    };
                    if self.vcpu.dirty_ring_soft_full() {
                        return Err(VcpuExit::DirtyRingFull);
                    }
                    if let FaultOutcome::Retry(_) = outcome {
                        self.vcpu.stats.fault_retries += 1;
                        spins += 1;
                        if spins > 64 {
                            // An invalidation keeps racing us: let it finish.
                            crate::sync::yield_now();
                        }
                    }
                }
            }
        }
    }

    /// Leaves guest mode, runs `f` (which may block), and re-enters, handling requests raised
    /// meanwhile. Guest mode is re-entered even if `f` panics, so that the unwinding drop of the
    /// `GuestMode` leaves it exactly once.
    fn leave_guest_mode_for<T>(
        &mut self,
        f: impl FnOnce(&mut Vcpu) -> Result<T, VcpuExit>,
    ) -> Result<T, VcpuExit> {
        /// Re-enters guest mode when dropped.
        struct Reenter<'a>(&'a mut Vcpu);
        impl Drop for Reenter<'_> {
            fn drop(&mut self) {
                guest_mode::enter();
                let reqs = self.0.handle.enter_guest();
                self.0.apply_requests(reqs);
            }
        }
        let _trace = tracing::trace_span!("vcpu_exit").entered();
        self.vcpu.handle.exit_guest();
        guest_mode::exit();
        let outside = Reenter(self.vcpu);
        f(&mut *outside.0)
    }
}

/// The 8-byte words a byte range `[gpa, gpa + len)` touches, as (word address, first byte in the
/// word, bytes in the word), in address order.
fn byte_words(gpa: Gpa, len: usize) -> Result<impl Iterator<Item = (Gpa, usize, usize)>, VcpuExit> {
    let start = gpa.raw();
    let end = start
        .checked_add(len as u64)
        .ok_or(VcpuExit::AddressOverflow { gpa, len })?;
    let mut at = start;
    Ok(core::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let word = at & !7;
        let first = (at - word) as usize;
        let n = (8 - first).min((end - at) as usize);
        at += n as u64;
        Some((Gpa::new(word), first, n))
    }))
}

impl Drop for GuestMode<'_> {
    fn drop(&mut self) {
        guest_mode::exit();
        self.vcpu.handle.exit_guest();
    }
}
