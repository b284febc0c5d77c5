//! # kvmmu: KVM's x86 MMU as a userspace library, on simulated hardware
//!
//! kvmmu rebuilds the parts of Linux KVM's x86 MMU that decide how guest memory is mapped, invalidated
//! and aged — memslots under SRCU, the TDP MMU with parallel faults, MMU-notifier invalidation, and
//! **lockless aging** ("KVM: x86/mmu: Age sptes locklessly") — on a simulated host memory manager and
//! simulated vCPUs, so that MMU locking designs can be prototyped, model-checked and benchmarked in
//! seconds.
//!
//! ## The public face
//! - The host: [`HostMm`] (the primary MMU: a frame arena of simulated physical memory, host page
//!   tables, GUP, `mmap`/`munmap`/`mprotect`/`madvise`, aging, and the notifier list that
//!   [`MmuNotifier`] subscribers join), [`HostConfig`], [`Prot`]; host-side aging policies
//!   [`LruGen`] (MGLRU-like generations) and [`PageIdle`] (per-page idle flags).
//! - The VM: [`Vm`] (`struct kvm`: memslots published under SRCU, `mmu_lock`, the fault handler and
//!   its retry protocol, the MMU-notifier callbacks), [`VmConfig`], [`MemoryRegion`], [`MemFlags`],
//!   [`VmStats`].
//! - The vCPU: [`Vcpu`] (simulated hardware: a software TLB and a page walker that sets
//!   Accessed/Dirty atomically; misses fault into the VM) and [`GuestMode`], a run of accesses.
//! - Addresses as checked newtypes: [`Gpa`], [`Gfn`], [`Hva`], [`Pfn`], [`GfnRange`], [`SlotId`],
//!   [`AsId`], [`Level`].
//! - One error type per layer: [`HostError`] (with [`GupError`]), [`VmError`] and
//!   [`SetMemoryRegionError`] (with [`MemslotError`]), [`VcpuExit`], [`ConfigError`], and
//!   [`InGuestMode`] for a call the guest-mode contract forbids.
//! - Nested guests: [`NestedGuest`] (an L1 hypervisor's EPT12 builder, [`EptPerms`],
//!   [`Ept12Entry`]) and [`Vcpu::enter_l2`]; its errors are [`NestedError`], and an L2 access
//!   that EPT12 does not allow exits with [`VcpuExit::Ept`] ([`EptExit`]).
//! - [`torture`]: every concurrent actor at once, under oracles (the engine of `kvmmu torture`).
//!
//! Inside, the layers import downwards only: vcpu → vm (memslots, the fault handler, the
//! notifier callbacks) → mmu (the one place that chooses the TDP MMU or the shadow MMU; the SPTE
//! format) → host → sync (the only module naming std, parking_lot, crossbeam-epoch, loom or
//! shuttle). `docs/locking.md` and `docs/invariants.md` in the repository give the lock order, the
//! races and the invariants the code keeps.
//!
//! ## Using it
//! ```
//! use kvmmu::prelude::*;
//! let host = HostMm::new(HostConfig { frames: 4096 })?;          // 16 MiB of simulated RAM
//! let vm = Vm::new(&host, VmConfig::default())?;                  // subscribes to host notifiers
//! let hva = host.mmap(1 << 22, Prot::READ | Prot::WRITE)?;       // lazily populated memory
//! vm.set_user_memory_region(MemoryRegion {
//!     slot: SlotId::new(0), as_id: AsId::new(0), flags: MemFlags::empty(),
//!     gpa: Gpa::new(0), size: 1 << 22, hva,
//! })?;
//! let mut vcpu = vm.create_vcpu()?;
//! vcpu.write_u64(Gpa::new(0x1000), 42)?;                          // TLB miss → walk → fault → install
//! assert_eq!(vcpu.read_u64(Gpa::new(0x1000))?, 42);
//! assert!(host.clear_young(hva, 1 << 22)?);                        // aging through the notifier path
//! host.mprotect(hva, 1 << 22, Prot::READ)?;                        // invalidate start/end around it
//! assert!(matches!(vcpu.write_u64(Gpa::new(0x1000), 7), Err(VcpuExit::HostFault { .. })));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

// The layers live in `internals` (hidden from the documentation, no stability promise) and are
// imported here so that the crate names them `crate::host`, `crate::vm`, ...; a program sees the
// public face below, re-exported at the root and, for the common types, in the prelude.
#[doc(hidden)]
pub mod internals;
#[cfg(not(loom))]
pub mod torture;

#[cfg(not(loom))]
use internals::vm;
use internals::{addr, geometry, mmu, sync};
#[cfg(not(loom))]
use internals::{config, host, vcpu};

pub use addr::{AsId, Gfn, GfnRange, Gpa, Hva, Level, PAGE_SHIFT, PAGE_SIZE, Pfn, SlotId};
#[cfg(not(loom))]
pub use config::{AdBits, AgingMode, ConfigError, MmuKind, VmConfig};
#[cfg(not(loom))]
pub use host::{
    AGING_CHUNK_PAGES, AgingPass, FrameArena, FrameStats, FrameTag, GupError, GupPage, HostConfig,
    HostError, HostMm, HostPte, HostStats, IdleState, InvalidateEvent, Kswapd, LruGen, MAX_FRAMES,
    MAX_SWAP_SLOTS, MmuNotifier, NotifierId, NotifierRange, PageIdle, Prot, StaleAccess, SwapStats,
    TASK_SIZE, WorkingSet, WorkingSetBin, YoungBitmap,
};
#[cfg(not(loom))]
pub use host::{
    BackingSrc, ChargeUnderflow, MIN_LIMIT_FRAMES, ReclaimAging, ReclaimConfig, ReclaimError,
    ReclaimStats, UnknownBackingSrc,
};
pub use sync::guest_mode::InGuestMode;
#[cfg(not(loom))]
pub use vcpu::{GuestMode, NestedError, NestedGuest, Vcpu, VcpuStats, tlb::TlbStats};
#[cfg(not(any(loom, feature = "shuttle")))]
pub use vm::NxRecoveryWorker;
#[cfg(not(loom))]
pub use vm::dirty_log::{DirtyLogError, DirtyLogProtect, DirtyTracking};
#[cfg(not(loom))]
pub use vm::dirty_ring::{DIRTY_RING_MAX, DIRTY_RING_RESERVED, DirtyRingEntry, DirtyRingError};
#[cfg(not(loom))]
pub use vm::memslot::{
    KVM_MEM_MAX_NR_PAGES, MemFlags, MemoryRegion, Memslot, MemslotError, SizeLimit, USER_ADDR_END,
};
#[cfg(not(loom))]
pub use vm::{SetMemoryRegionError, VcpuExit, Vm, VmError, VmStats};
#[cfg(not(loom))]
pub use {
    mmu::hugepage::PageStats,
    mmu::shadow::nested::ept12::{Ept12Entry, EptPerms, MisconfigReason},
    mmu::shadow::nested::walk::{EptExit, ViolationReason},
    mmu::shadow::rmap::RmapStatsSnapshot,
    mmu::shadow::{RmapAllocError, ShadowStats},
    mmu::spte::{Spte, SpteKind},
    mmu::tdp::TdpStats,
    sync::witness::MmuLockStats,
    vm::seq::InvalidateCounters,
};

/// The types most programs need, errors included.
#[cfg(not(loom))]
pub mod prelude {
    pub use crate::{
        AdBits, AgingMode, AsId, BackingSrc, ConfigError, DirtyLogError, DirtyLogProtect,
        DirtyTracking, EptExit, EptPerms, Gfn, GfnRange, Gpa, GupError, HostConfig, HostError,
        HostMm, Hva, InGuestMode, Level, MemFlags, MemoryRegion, MemslotError, MmuKind,
        NestedError, NestedGuest, Pfn, Prot, SetMemoryRegionError, SlotId, Vcpu, VcpuExit, Vm,
        VmConfig, VmError, VmStats,
    };
}
