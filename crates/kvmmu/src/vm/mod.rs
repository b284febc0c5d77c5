//! The VM (`struct kvm`, `virt/kvm/kvm_main.c`): memslots published under SRCU, `mmu_lock`, the
//! invalidation state, vCPU requests, and the MMU-notifier subscription to the host.
//!
//! # Memslot updates (spec §1.3, §2.3)
//! 1. `slots_lock` serializes updaters. The request is validated against the active sets
//!    ([`memslot::plan_change`]); a refused request changes nothing.
//! 2. Each swap waits, under `mn_invalidate_lock`, until no `invalidate_range_start`…`end` pair is in
//!    flight (`mn_active_invalidate_count == 0`), publishes the new set while still holding that lock,
//!    releases it, then waits for an SRCU grace period. So every start/end pair sees one set
//!    (spec §4 items 2–3) and no reader still uses the old set when the swap returns (spec §4 item 8).
//! 3. DELETE and MOVE first publish a copy of the slot marked INVALID (faults on it retry), zap every
//!    SPTE of the slot under `mmu_lock` write with a TLB flush, then publish the final set.
//! 4. Generations follow KVM: the in-progress bit (bit 63) is set before the publish, and the final
//!    value is `old + address_spaces`, so each address space keeps its residue (spec §4 item 7).
//!
//! # Teardown
//! Dropping the [`Vm`] (or the host calling `release`) marks it dead, makes every vCPU drop its
//! TLB and root (a waiting flush), zaps every SPTE, frees every root and waits for the deferred
//! page-table frees, and only then unsubscribes from the host, so no host invalidation is missed
//! while a vCPU could still use an old translation (DESIGN invariant 2); vCPUs still alive then
//! fail with `VcpuExit::VmDead`.

pub mod dirty_log;
pub mod dirty_ring;
#[doc(hidden)]
pub mod dirty_ring_core;
mod fault;
mod huge;
mod nx_huge;
#[cfg(not(feature = "shuttle"))]
pub use nx_huge::NxRecoveryWorker;
pub mod invalidate;
pub mod memslot;
mod nested;
pub mod request;
pub mod seq;

pub(crate) use fault::FaultFill;
pub use fault::VcpuExit;

use crate::addr::{AsId, Gfn, Level};
use crate::config::{AgingMode, ConfigError, VmConfig};
use crate::host::{HostMm, NotifierId};
use crate::mmu::shadow::rmap::RmapHead;
use crate::mmu::shadow::{RmapAllocError, RmapLookup, ShadowStats, SlotRmaps};
use crate::mmu::spte::Spte;
use crate::mmu::tdp::TdpStats;
use crate::mmu::{Mmu, MmuRoot, RemoteTlbFlush, RootReload};
use crate::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use crate::sync::guest_mode::{self, InGuestMode};
use crate::sync::lock_rank::LockRank;
use crate::sync::percpu::StripedCounter;
use crate::sync::rcu::Rcu;
use crate::sync::srcu::{Srcu, SrcuCell, SrcuGuard};
use crate::sync::witness::{MmuLock, MmuLockStats, RankedMutex};
use crate::sync::{Arc, Condvar};
use memslot::{MemoryRegion, Memslot, MemslotChange, MemslotError, Memslots};
use request::VcpuRequests;
use seq::{InvalidateCounters, InvalidateState};

/// Bit 63 of a memslot generation: an update is being published (`KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS`).
pub const MEMSLOT_GEN_UPDATE_IN_PROGRESS: u64 = 1 << 63;

/// Why a VM could not be created.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The configuration was refused.
    #[error("invalid VM configuration: {0}")]
    Config(#[from] ConfigError),
    /// The host was already released (its process exited).
    #[error("the host address space has been released")]
    HostReleased,
    /// The VM was torn down (dropped or released by the host).
    #[error("the VM has been torn down")]
    Dead,
    /// The calling thread holds a vCPU in guest mode; nothing was done.
    #[error(transparent)]
    InGuestMode(#[from] InGuestMode),
    /// Nested guests must be enabled before the first memslot is created (`Vm::enable_nested`).
    #[error("nested guests must be enabled before any memslot exists")]
    NestedAfterMemslots,
    /// The VM has no such address space (`VmConfig::address_spaces`).
    #[error("the VM has no address space {as_id:?}")]
    NoAddressSpace {
        /// The refused address space.
        as_id: AsId,
    },
}

/// Why `set_user_memory_region` refused a request.
#[derive(Debug, thiserror::Error)]
pub enum SetMemoryRegionError {
    /// The request is invalid; nothing changed.
    #[error(transparent)]
    Invalid(#[from] MemslotError),
    /// The shadow MMU's rmap arrays for the new slot could not be allocated (a valid but huge
    /// slot); nothing changed.
    #[error(transparent)]
    NoMemory(#[from] RmapAllocError),
    /// The VM was torn down.
    #[error("the VM has been torn down")]
    Dead,
    /// The calling thread holds a vCPU in guest mode (a memslot update waits for every vCPU's
    /// TLB-flush acknowledgement); nothing changed.
    #[error(transparent)]
    InGuestMode(#[from] InGuestMode),
}

/// Counters of VM-level events, for reports and oracles. Those bumped on the fault and aging
/// paths are striped ([`StripedCounter`]: vCPUs and agers on different CPUs bump different cache
/// lines); the rare ones (memslot swaps, invalidation pairs, remote flushes, each already behind a
/// lock or a flush that costs far more) stay plain atomics.
#[derive(Debug, Default)]
pub(crate) struct VmCounters {
    /// Faults not counted in `pf_fixed` (fast, spurious, retried, exits): `VmStats::faults` is
    /// the sum of the two, so that a slow-path fix bumps one counter, not two.
    pub(crate) faults_unfixed: StripedCounter,
    pub(crate) fault_retries: StripedCounter,
    pub(crate) memslot_swaps: AtomicU64,
    pub(crate) invalidate_starts: AtomicU64,
    pub(crate) invalidate_ends: AtomicU64,
    pub(crate) age_calls: StripedCounter,
    pub(crate) age_young: StripedCounter,
    pub(crate) remote_tlb_flush: AtomicU64,
    /// Faults fixed by the fast page fault (KVM's `pf_fast`).
    pub(crate) pf_fast: StripedCounter,
    /// Faults that installed or upgraded a leaf on the slow path (KVM's `pf_fixed`).
    pub(crate) pf_fixed: StripedCounter,
}

/// A snapshot of the VM's statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmStats {
    /// Page faults handled (each attempt, including retries).
    pub faults: u64,
    /// Faults that returned RETRY (raced with an invalidation, a frozen SPTE or a lost CAS).
    pub fault_retries: u64,
    /// Memslot set publications.
    pub memslot_swaps: u64,
    /// `invalidate_range_start` calls received.
    pub invalidate_starts: u64,
    /// `invalidate_range_end` calls received.
    pub invalidate_ends: u64,
    /// Aging notifier calls (`clear_young`, `clear_flush_young`, `test_young`).
    pub age_calls: u64,
    /// Aging calls that reported young.
    pub age_young: u64,
    /// Remote TLB flushes (KVM's stat `remote_tlb_flush`): one per `kvm_flush_remote_tlbs`.
    pub remote_tlb_flush: u64,
    /// Faults fixed by the fast page fault without `mmu_lock` (KVM's `pf_fast`): writes to leaves
    /// write-protected for dirty logging, and accesses to leaves marked for access tracking.
    pub pf_fast: u64,
    /// Faults fixed on the slow path: a leaf installed or made writable (KVM's `pf_fixed`).
    pub pf_fixed: u64,
    /// `mmu_invalidate_in_progress` and `mmu_invalidate_seq`.
    pub invalidate: InvalidateCounters,
    /// `mn_active_invalidate_count`.
    pub mn_active_invalidate_count: u64,
    /// `mmu_lock` acquisition counts.
    pub mmu_lock: MmuLockStats,
    /// TDP MMU page-table statistics.
    pub tdp: TdpStats,
    /// Shadow MMU statistics (shadow faults, pages, rmap aging and bit-lock contention).
    pub shadow: ShadowStats,
    /// Present 4K leaves over both MMUs (KVM's `pages_4k`).
    pub pages_4k: u64,
    /// Present 2M leaves (KVM's `pages_2m`).
    pub pages_2m: u64,
    /// Present 1G leaves (KVM's `pages_1g`).
    pub pages_1g: u64,
    /// Huge mappings the NX huge pages mitigation split and recovery has not yet undone (KVM's
    /// `nx_lpage_splits`; `VmConfig::nx_huge_pages`).
    pub nx_lpage_splits: u64,
    /// The longest shadow rmap a leaf insertion found (KVM's `max_mmu_rmap_size`).
    pub max_mmu_rmap_size: u64,
}

/// State shared by the VM handle, its vCPUs and its notifier subscription.
pub(crate) struct VmInner {
    pub(crate) config: VmConfig,
    pub(crate) host: HostMm,
    pub(crate) srcu: Srcu,
    pub(crate) memslots: Vec<SrcuCell<Memslots>>,
    pub(crate) generations: Vec<AtomicU64>,
    pub(crate) slots_lock: RankedMutex<()>,
    pub(crate) mn_invalidate: RankedMutex<u64>,
    pub(crate) mn_memslots_update: Condvar,
    pub(crate) mmu_lock: MmuLock,
    pub(crate) invalidate: InvalidateState,
    /// The MMU: TDP or shadow, as `config.mmu` says; the only place that chooses.
    pub(crate) mmu: Mmu,
    pub(crate) requests: Arc<VcpuRequests>,
    pub(crate) counters: VmCounters,
    pub(crate) dead: AtomicBool,
    /// `config.ad_bits == Disabled`: faults try the fast path (access-tracked leaves).
    pub(crate) ad_disabled: bool,
    /// The dirty-log protect mode (`manual_dirty_log_protect`).
    pub(crate) dirty_log: dirty_log::DirtyLogState,
    /// The dirty rings, once enabled.
    pub(crate) dirty_ring: dirty_ring::DirtyRingState,
}

/// A virtual machine on a [`HostMm`].
///
/// ```
/// use kvmmu::prelude::*;
/// let host = HostMm::new(HostConfig { frames: 1024 })?;
/// let vm = Vm::new(&host, VmConfig::default())?;
/// let hva = host.mmap(1 << 20, Prot::READ | Prot::WRITE)?;
/// vm.set_user_memory_region(MemoryRegion {
///     slot: SlotId::new(0), as_id: AsId::new(0), flags: MemFlags::empty(),
///     gpa: Gpa::new(0), size: 1 << 20, hva,
/// })?;
/// let mut vcpu = vm.create_vcpu()?;
/// vcpu.write_u64(Gpa::new(0x1000), 42)?;
/// assert_eq!(vcpu.read_u64(Gpa::new(0x1000))?, 42);
/// assert_eq!(host.read_u64(hva.checked_add(0x1000).unwrap())?, 42);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Vm {
    inner: Arc<VmInner>,
    subscription: NotifierId,
}

impl core::fmt::Debug for Vm {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Vm")
            .field("config", &self.inner.config)
            .field("dead", &self.inner.dead.load(Ordering::Relaxed))
            .field("memslot_generations", &self.inner.generations)
            .finish_non_exhaustive()
    }
}

impl Vm {
    /// Creates a VM on `host` and subscribes it to the host's MMU notifiers.
    ///
    /// Errors: [`VmError::Config`], [`VmError::InGuestMode`] from a thread that holds a vCPU in
    /// guest mode (subscribing waits for any host invalidation in flight).
    pub fn new(host: &HostMm, config: VmConfig) -> Result<Vm, VmError> {
        guest_mode::check("Vm::new")?;
        config.validate()?;
        let nr_as = config.address_spaces;
        let mmu_lock = MmuLock::new();
        let mmu = Mmu::new(config.mmu, nr_as, &mmu_lock, Arc::new(Rcu::new()))
            .with_ad_bits(config.ad_bits);
        mmu.set_nx_huge_pages(config.nx_huge_pages);
        let inner = Arc::new(VmInner {
            host: host.clone(),
            srcu: Srcu::new(),
            memslots: (0..nr_as)
                .map(|a| SrcuCell::new(Arc::new(Memslots::new(AsId::new(a as u8)))))
                .collect(),
            generations: (0..nr_as).map(|a| AtomicU64::new(a as u64)).collect(),
            slots_lock: RankedMutex::new(LockRank::SlotsLock, ()),
            mn_invalidate: RankedMutex::new(LockRank::MnInvalidate, 0),
            mn_memslots_update: Condvar::new(),
            invalidate: InvalidateState::bound_to(&mmu_lock),
            mmu_lock,
            mmu,
            requests: VcpuRequests::new(),
            counters: VmCounters::default(),
            dead: AtomicBool::new(false),
            ad_disabled: config.ad_bits == crate::config::AdBits::Disabled,
            dirty_log: dirty_log::DirtyLogState::default(),
            dirty_ring: dirty_ring::DirtyRingState::default(),
            config,
        });
        let subscription = host.register_notifier(Arc::new(invalidate::VmNotifier::new(&inner)));
        Ok(Vm {
            inner,
            subscription,
        })
    }

    /// The configuration the VM was created with.
    pub fn config(&self) -> &VmConfig {
        &self.inner.config
    }

    /// The host address space the VM sits on.
    pub fn host(&self) -> &HostMm {
        &self.inner.host
    }

    /// `KVM_SET_USER_MEMORY_REGION`: create (new slot id), delete (`size == 0`), move (new `gpa`) or
    /// change the flags of a memslot, with KVM's validation. A refused request changes nothing.
    ///
    /// Errors: [`SetMemoryRegionError::Invalid`], [`SetMemoryRegionError::Dead`],
    /// [`SetMemoryRegionError::InGuestMode`] from a thread that holds a vCPU in guest mode.
    pub fn set_user_memory_region(&self, region: MemoryRegion) -> Result<(), SetMemoryRegionError> {
        guest_mode::check("set_user_memory_region")?;
        self.inner.set_user_memory_region(&region)
    }

    /// The shared state (for the vCPU layer's `create_vcpu`).
    pub(crate) fn inner(&self) -> &Arc<VmInner> {
        &self.inner
    }

    /// The memslot generation of an address space.
    pub fn memslots_generation(&self, as_id: AsId) -> Option<u64> {
        self.inner
            .generations
            .get(as_id.index())
            .map(|g| g.load(Ordering::Acquire))
    }

    /// The active memslots of an address space, by base gfn.
    pub fn memslots(&self, as_id: AsId) -> Option<Vec<Arc<Memslot>>> {
        let cell = self.inner.memslots.get(as_id.index())?;
        let guard = self.inner.srcu.read_lock();
        Some(cell.load(&guard).iter().cloned().collect())
    }

    /// Invalidates every root (`kvm_mmu_zap_all_fast`, as a CR0.WP toggle or a memslot change does
    /// in the kernel): vCPUs load fresh roots on their next entry.
    pub fn reset_mmu(&self) {
        self.inner.reset_mmu();
    }

    /// The leaf SPTE that maps `gfn` in the address space's valid root, if any, with its level.
    /// Read-only: an oracle for tests and tools (it may be stale by the time it returns if vCPUs
    /// or the host are running). Lock-free with the TDP MMU; with the shadow MMU it takes
    /// `mmu_lock` for read, since shadow pages are freed under `mmu_lock` write rather than RCU.
    pub fn spte(&self, as_id: AsId, gfn: Gfn) -> Option<(Spte, Level)> {
        self.inner.leaf(as_id, gfn)
    }

    /// Statistics.
    pub fn stats(&self) -> VmStats {
        self.inner.stats()
    }

    /// Tears the VM down now (as dropping it does) and returns the final statistics, taken after every
    /// SPTE was zapped and every deferred page-table free has run. With no vCPU left alive, the TDP
    /// statistics then show as many tables freed as allocated (DESIGN invariant 5).
    ///
    /// The VM stays subscribed to the host until the teardown is complete (DESIGN invariant 2):
    /// a host `mprotect`/`munmap`/`madvise_dontneed` racing the shutdown either reaches the VM or
    /// finds it with no SPTE left and no vCPU holding a TLB entry or a root.
    ///
    /// # Panics
    /// From a thread that holds a vCPU in guest mode (teardown waits for every vCPU's TLB-flush
    /// acknowledgement), before anything is torn down.
    pub fn shutdown(self) -> VmStats {
        guest_mode::refuse("Vm::shutdown");
        self.inner.teardown();
        self.inner.host.unregister_notifier(self.subscription);
        self.inner.stats()
    }

    /// True once the VM has been torn down by the host's `release`.
    pub fn is_dead(&self) -> bool {
        self.inner.dead.load(Ordering::Acquire)
    }
}

/// Tears down first, then unsubscribes (see [`Vm::shutdown`]).
///
/// # Panics
/// When dropped by a thread that holds a vCPU in guest mode, before anything is torn down (the VM
/// then stays subscribed, and its subscription keeps it alive, until the host's `release`: it was
/// never torn down, so host changes must keep reaching it). If that thread is already unwinding,
/// the drop does nothing instead of aborting the process with a second panic.
impl Drop for Vm {
    fn drop(&mut self) {
        if guest_mode::in_guest_mode() && std::thread::panicking() {
            return;
        }
        guest_mode::refuse("dropping the Vm");
        self.inner.teardown();
        self.inner.host.unregister_notifier(self.subscription);
    }
}

impl VmInner {
    fn set_user_memory_region(&self, req: &MemoryRegion) -> Result<(), SetMemoryRegionError> {
        let _slots = self.slots_lock.lock();
        if self.dead.load(Ordering::Acquire) {
            return Err(SetMemoryRegionError::Dead);
        }
        let current: Vec<Arc<Memslots>> = self.memslots.iter().map(|c| c.current()).collect();
        let refs: Vec<&Memslots> = current.iter().map(|s| &**s).collect();
        let change = memslot::plan_change(&refs, req)?;
        let as_id = req.as_id;
        match change {
            MemslotChange::Unchanged => {}
            MemslotChange::Create { mut new } => {
                self.attach_new_rmaps(&mut new)?;
                self.attach_dirty_bitmap(None, &mut new);
                self.swap_memslots(as_id, None, Some(Arc::new(new)));
            }
            MemslotChange::FlagsOnly { old, mut new } => {
                // A flags-only change keeps the slot's SPTEs, so it keeps their rmaps.
                new.set_rmaps(old.rmaps_arc());
                self.attach_dirty_bitmap(Some(&old), &mut new);
                let new = Arc::new(new);
                self.swap_memslots(as_id, Some(&old), Some(Arc::clone(&new)));
                self.dirty_log_flags_changed(&old, &new);
            }
            MemslotChange::Delete { old } => {
                let invalid = Arc::new(old.invalid_copy());
                self.swap_memslots(as_id, Some(&old), Some(invalid.clone()));
                self.flush_shadow_memslot(&old);
                self.swap_memslots(as_id, Some(&invalid), None);
            }
            MemslotChange::Move { old, mut new } => {
                self.attach_new_rmaps(&mut new)?;
                self.attach_dirty_bitmap(Some(&old), &mut new);
                let invalid = Arc::new(old.invalid_copy());
                self.swap_memslots(as_id, Some(&old), Some(invalid.clone()));
                self.flush_shadow_memslot(&old);
                self.swap_memslots(as_id, Some(&invalid), Some(Arc::new(new)));
            }
        }
        Ok(())
    }

    /// `kvm_swap_active_memslots`: publish a copy of the active set with `old` replaced by `new`.
    /// Caller holds `slots_lock`.
    fn swap_memslots(&self, as_id: AsId, old: Option<&Arc<Memslot>>, new: Option<Arc<Memslot>>) {
        let _trace = tracing::trace_span!("swap_memslots").entered();
        let cell = &self.memslots[as_id.index()];
        let gen_cell = &self.generations[as_id.index()];
        // ORDERING: generations are written only under slots_lock; Release/Acquire make a reader that
        // sees the final value also see the set published before it.
        let generation = gen_cell.load(Ordering::Acquire);
        let final_gen =
            (generation & !MEMSLOT_GEN_UPDATE_IN_PROGRESS) + self.config.address_spaces as u64;
        gen_cell.store(
            generation | MEMSLOT_GEN_UPDATE_IN_PROGRESS,
            Ordering::Release,
        );
        let next = Arc::new(cell.current().with_change(old, new, final_gen));

        let mut mn = self.mn_invalidate.lock();
        while *mn != 0 {
            mn.wait(&self.mn_memslots_update);
        }
        let retired = cell.replace(next, &self.srcu);
        drop(mn);
        // Wait for every SRCU reader that may still see the old set.
        drop(retired.wait());
        gen_cell.store(final_gen, Ordering::Release);
        self.counters.memslot_swaps.fetch_add(1, Ordering::Relaxed);
    }

    /// Allocates rmap arrays for a new slot when the MMU needs them (`memslot_rmap_alloc`).
    fn attach_new_rmaps(&self, slot: &mut Memslot) -> Result<(), RmapAllocError> {
        if self.mmu.needs_rmaps() {
            slot.set_rmaps(Some(Arc::new(SlotRmaps::new(slot.gfn_range())?)));
        }
        Ok(())
    }

    /// The leaf SPTE for `gfn` in the valid root of `as_id` (oracle).
    fn leaf(&self, as_id: AsId, gfn: Gfn) -> Option<(Spte, Level)> {
        self.mmu.leaf(&self.mmu_lock, as_id, gfn)
    }

    /// `kvm_mmu_load` for a vCPU: a valid root of `as_id`, or `None` once the VM is dead.
    pub(crate) fn load_root(&self, as_id: AsId) -> Option<MmuRoot> {
        // Teardown sets `dead` before it takes `mmu_lock` to zap every shadow page, so the check
        // under the lock keeps a root from being allocated after the final zap.
        self.mmu
            .load_root(&self.mmu_lock, as_id, || !self.dead.load(Ordering::Acquire))
    }

    /// `kvm_arch_flush_shadow_memslot`: zap every SPTE of `slot`, flushing TLBs before the lock drops.
    fn flush_shadow_memslot(&self, slot: &Memslot) {
        let srcu = self.srcu_read();
        let mut mmu = self.mmu_lock.write();
        // Nested: indirect pages shadowing guest tables in the slot go too (vm/nested.rs).
        let sets: Vec<&Memslots> = self.memslots.iter().map(|c| c.load(&srcu)).collect();
        self.mmu
            .zap_nested_tables_in(
                slot.as_id(),
                slot.gfn_range(),
                sets.as_slice(),
                mmu.witness(),
            )
            .commit(self);
        let batch = self.mmu.unmap_gfn_range(
            slot.as_id(),
            slot.rmaps(),
            slot.gfn_range(),
            &mut mmu,
            true,
            self,
        );
        batch.commit(self);
        drop(mmu);
    }

    fn reset_mmu(&self) {
        // The memslot sets (for shadow rmaps) are loaded *after* `mmu_lock` was taken: a fault
        // that installed a leaf through a slot created meanwhile released `mmu_lock` before we
        // took it, so we see that slot (or its INVALID copy, which shares its rmaps; shadow S6).
        let srcu = self.srcu_read();
        let mut mmu = self.mmu_lock.write();
        let sets: Vec<&Memslots> = self.memslots.iter().map(|c| c.load(&srcu)).collect();
        self.mmu.reset(&mut mmu, sets.as_slice(), self);
        drop(mmu);
    }

    /// Zap everything and free every page table: the end of the VM's MMU.
    ///
    /// Idempotent. Every call waits for the deferred page-table frees, including those of roots that
    /// vCPUs released after an earlier call.
    pub(crate) fn teardown(&self) {
        if !self.dead.swap(true, Ordering::AcqRel) {
            {
                let srcu = self.srcu_read();
                let mut mmu = self.mmu_lock.write();
                // Every vCPU drops its root and TLB before anything is zapped (see `Mmu::reset`).
                self.requests.make_all_request(request::Request::MmuReload);
                self.flush_remote_tlbs();
                // Memslots loaded after `mmu_lock` was taken, as in `reset_mmu`.
                let sets: Vec<&Memslots> = self.memslots.iter().map(|c| c.load(&srcu)).collect();
                self.mmu
                    .zap_all(&mut mmu, sets.as_slice(), self)
                    .commit(self);
            }
            self.flush_remote_tlbs();
        }
        self.mmu.rcu().synchronize();
    }

    pub(crate) fn srcu_read(&self) -> SrcuGuard<'_> {
        self.srcu.read_lock()
    }

    pub(crate) fn aging_lockless(&self) -> bool {
        self.config.aging == AgingMode::Lockless
    }

    fn stats(&self) -> VmStats {
        let c = &self.counters;
        let pages = self.mmu.page_stats();
        let shadow = self.mmu.shadow_stats();
        VmStats {
            faults: c.faults_unfixed.sum() + c.pf_fixed.sum(),
            fault_retries: c.fault_retries.sum(),
            memslot_swaps: c.memslot_swaps.load(Ordering::Relaxed),
            invalidate_starts: c.invalidate_starts.load(Ordering::Relaxed),
            invalidate_ends: c.invalidate_ends.load(Ordering::Relaxed),
            age_calls: c.age_calls.sum(),
            age_young: c.age_young.sum(),
            remote_tlb_flush: c.remote_tlb_flush.load(Ordering::Relaxed),
            pf_fast: c.pf_fast.sum(),
            pf_fixed: c.pf_fixed.sum(),
            invalidate: self.invalidate.counters(),
            mn_active_invalidate_count: *self.mn_invalidate.lock(),
            mmu_lock: self.mmu_lock.stats(),
            tdp: self.mmu.tdp_stats(),
            shadow,
            pages_4k: pages.pages_4k,
            pages_2m: pages.pages_2m,
            pages_1g: pages.pages_1g,
            nx_lpage_splits: if guest_mode::in_guest_mode() {
                self.mmu.nx_lpage_splits_recorded()
            } else {
                self.mmu.nx_lpage_splits()
            },
            max_mmu_rmap_size: shadow.max_mmu_rmap_size,
        }
    }
}

impl RemoteTlbFlush for VmInner {
    fn flush_remote_tlbs(&self) {
        // A flush waits for every vCPU in guest mode to acknowledge; a vCPU only acknowledges from
        // its own thread, so a thread in guest mode that gets here would wait for itself forever.
        // Every public entry that can get here refuses a guest-mode caller before changing any
        // state; this is the last line of defence.
        guest_mode::refuse("a remote TLB flush");
        let _trace = tracing::trace_span!("flush_remote_tlbs").entered();
        self.counters
            .remote_tlb_flush
            .fetch_add(1, Ordering::Relaxed);
        self.requests.flush_remote_tlbs();
    }
}

impl RootReload for VmInner {
    fn request_root_reload(&self) {
        self.requests.make_all_request(request::Request::MmuReload);
    }
}

/// The current memslot sets, one per address space (read under SRCU by the caller): how the
/// shadow MMU finds the rmap of a leaf it zaps (`gfn_to_rmap(gfn, level, __gfn_to_memslot(...))`).
impl RmapLookup for [&Memslots] {
    fn leaf_rmap(&self, as_id: AsId, gfn: Gfn, level: Level) -> Option<&RmapHead> {
        self.get(as_id.index())?
            .find_by_gfn(gfn)?
            .rmaps()?
            .get(gfn, level)
    }
}
