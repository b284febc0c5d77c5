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
//! A vCPU never blocks on a lock while in guest mode (it only pins RCU and SRCU, which never block),
//! so a thread that holds `mmu_lock` and waits for TLB-flush acknowledgements cannot deadlock with it.

pub mod tlb;
mod walker;

use crate::addr::{AsId, Gpa};
use crate::mmu::{FaultOutcome, MmuRoot};
use crate::sync::Arc;
use crate::sync::atomic::Ordering;
use crate::vm::request::VcpuHandle;
use crate::vm::{Vm, VmError, VmInner};
use tlb::Tlb;

pub use crate::vm::VcpuExit;

impl Vm {
    /// Creates a vCPU. It is owned by one thread at a time (it is `Send`, not `Sync`).
    pub fn create_vcpu(&self) -> Result<Vcpu, VmError> {
        if self.inner().dead.load(Ordering::Acquire) {
            return Err(VmError::Dead);
        }
        Ok(Vcpu::new(self.inner().clone()))
    }
}

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
    handle: VcpuHandle,
    tlb: Tlb,
    root: Option<MmuRoot>,
    as_id: AsId,
    stats: VcpuStats,
}

impl Vcpu {
    pub(crate) fn new(vm: Arc<VmInner>) -> Vcpu {
        let handle = vm.requests.register();
        let tlb = Tlb::new(vm.config.tlb_entries);
        Vcpu {
            vm,
            handle,
            tlb,
            root: None,
            as_id: AsId::new(0),
            stats: VcpuStats::default(),
        }
    }

    /// Reads the 8-byte word at `gpa` (one guest instruction).
    pub fn read_u64(&mut self, gpa: Gpa) -> Result<u64, VcpuExit> {
        self.enter().read_u64(gpa)
    }

    /// Writes the 8-byte word at `gpa` (one guest instruction).
    pub fn write_u64(&mut self, gpa: Gpa, value: u64) -> Result<(), VcpuExit> {
        self.enter().write_u64(gpa, value)
    }

    /// Enters guest mode for a run of accesses; guest mode ends when the returned value is dropped.
    /// Running many accesses in one session is how a real guest runs, and is much cheaper than one
    /// entry per access.
    pub fn enter(&mut self) -> GuestMode<'_> {
        guest_mode_depth::enter();
        let reqs = self.handle.enter_guest();
        self.apply_requests(reqs);
        GuestMode { vcpu: self }
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
        let root = self.vm.load_root(self.as_id).ok_or(VcpuExit::VmDead)?;
        self.root = Some(root);
        self.stats.root_loads += 1;
        Ok(())
    }
}

/// A vCPU in guest mode. Dropping it leaves guest mode.
///
/// While it lives the thread is "running guest code": it must not block on anything another thread
/// may be waiting on. In particular it must not call host operations that invalidate memory
/// (`munmap`, `mprotect`, `madvise_dontneed`, `release`), memslot updates, `Vm::reset_mmu`,
/// `Vm::shutdown` or drop the `Vm`: each of those waits for every vCPU in guest mode to acknowledge
/// a TLB flush, and this one only acknowledges at its next access or when it leaves guest mode.
/// A thread that triggers a remote TLB flush from inside guest mode panics with a message saying
/// so instead of deadlocking.
pub struct GuestMode<'v> {
    vcpu: &'v mut Vcpu,
}

impl GuestMode<'_> {
    /// Reads the 8-byte word at `gpa`.
    #[inline]
    pub fn read_u64(&mut self, gpa: Gpa) -> Result<u64, VcpuExit> {
        self.access(gpa, None)
    }

    /// Writes the 8-byte word at `gpa`.
    #[inline]
    pub fn write_u64(&mut self, gpa: Gpa, value: u64) -> Result<(), VcpuExit> {
        self.access(gpa, Some(value)).map(|_| ())
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
    fn access(&mut self, gpa: Gpa, write: Option<u64>) -> Result<u64, VcpuExit> {
        let vcpu = &mut *self.vcpu;
        if gpa.raw() & 7 == 0
            && !vcpu.handle.requests_pending()
            && vcpu.root.as_ref().is_some_and(|r| !r.is_invalid())
        {
            return match walker::tlb_access(vcpu, gpa, write) {
                Some(Ok(v)) => {
                    vcpu.stats.accesses += 1;
                    Ok(v)
                }
                Some(Err(source)) => Err(VcpuExit::StaleTranslation { gpa, source }),
                None => self.access_slow(gpa, write, true),
            };
        }
        self.access_slow(gpa, write, false)
    }

    /// The general access loop: requests, root (re)load, translation, faults and retries.
    /// `missed`: the caller has just checked requests and the root and missed in the TLB (see
    /// [`Self::access`]), so the first attempt walks at once.
    #[inline(never)]
    fn access_slow(
        &mut self,
        gpa: Gpa,
        write: Option<u64>,
        mut missed: bool,
    ) -> Result<u64, VcpuExit> {
        if gpa.raw() & 7 != 0 {
            return Err(VcpuExit::Unaligned { gpa });
        }
        let mut spins = 0u32;
        loop {
            let attempt = if missed {
                missed = false;
                walker::walk_and_access(self.vcpu, gpa, write)?
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
                walker::translate_and_access(self.vcpu, gpa, write)?
            };
            match attempt {
                walker::Access::Done(v) => {
                    self.vcpu.stats.accesses += 1;
                    return Ok(v);
                }
                walker::Access::Fault => {
                    let outcome = self.leave_guest_mode_for(|v| {
                        let root = v.root.clone().ok_or(VcpuExit::VmDead)?;
                        v.stats.faults += 1;
                        v.vm.page_fault(&root, gpa, write.is_some())
                    })?;
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

    /// Leaves guest mode, runs `f` (which may block), and re-enters, handling requests raised meanwhile.
    fn leave_guest_mode_for<T>(
        &mut self,
        f: impl FnOnce(&mut Vcpu) -> Result<T, VcpuExit>,
    ) -> Result<T, VcpuExit> {
        self.vcpu.handle.exit_guest();
        guest_mode_depth::exit();
        let r = f(self.vcpu);
        guest_mode_depth::enter();
        let reqs = self.vcpu.handle.enter_guest();
        self.vcpu.apply_requests(reqs);
        r
    }
}

impl Drop for GuestMode<'_> {
    fn drop(&mut self) {
        guest_mode_depth::exit();
        self.vcpu.handle.exit_guest();
    }
}

/// How many vCPUs the current thread holds in guest mode (kept in `sync`, below `vm`, which
/// refuses a remote TLB flush from guest mode).
pub(crate) use crate::sync::guest_mode as guest_mode_depth;
