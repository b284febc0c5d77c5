//! # kvmmu: KVM's x86 MMU as a userspace library, on simulated hardware
//!
//! kvmmu rebuilds the parts of Linux KVM's x86 MMU that decide how guest memory is mapped, invalidated
//! and aged — memslots under SRCU, the TDP MMU with parallel faults, MMU-notifier invalidation, and
//! **lockless aging** ("KVM: x86/mmu: Age sptes locklessly") — on a simulated host memory manager and
//! simulated vCPUs, so that MMU locking designs can be prototyped, model-checked and benchmarked in
//! seconds.
//!
//! ## A tour, top to bottom (imports point down only)
//! - [`vcpu`]: simulated hardware. A [`vcpu::Vcpu`] reads and writes guest memory through a software
//!   TLB and a page walker that sets Accessed/Dirty atomically; misses fault into the MMU.
//! - [`vm`]: the VM (`struct kvm`): memslots published under SRCU, `mmu_lock`, the fault handler
//!   and its retry protocol, the invalidation counters, and the MMU-notifier callbacks the host calls.
//! - [`mmu`]: the arch MMU: [`mmu::Mmu`], the one place that chooses the TDP MMU (radix tables of
//!   atomic SPTEs, freed through RCU) or the shadow MMU (shadow pages and rmaps); the SPTE format.
//! - [`host`]: the primary MMU: a frame arena (simulated physical memory), host page tables, GUP,
//!   `mmap`/`munmap`/`mprotect`/`madvise`, and the notifier list.
//! - [`sync`]: the only module that names std, parking_lot, crossbeam-epoch or loom: facade types,
//!   SRCU, RCU, lock witnesses and the lock-rank checker.
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

pub mod addr;
#[cfg(not(loom))]
pub mod config;
pub mod geometry;
pub mod mmu;
pub mod sync;

#[cfg(not(loom))]
pub mod host;
#[cfg(not(loom))]
pub mod torture;
#[cfg(not(loom))]
pub mod vcpu;
#[cfg(not(loom))]
pub mod vm;

/// Under loom only the small protocols are compiled: the sync primitives, the SPTE format, the TDP
/// tables and the TLB-flush request protocol.
#[cfg(loom)]
pub mod vm {
    #[path = "dirty_ring_core.rs"]
    pub mod dirty_ring_core;
    #[path = "request.rs"]
    pub mod request;
    #[path = "seq.rs"]
    pub mod seq;
}

/// The types most programs need.
#[cfg(not(loom))]
pub mod prelude {
    pub use crate::addr::{AsId, Gfn, GfnRange, Gpa, Hva, Level, Pfn, SlotId};
    pub use crate::config::{AgingMode, MmuKind, VmConfig};
    pub use crate::host::{HostConfig, HostMm, Prot};
    pub use crate::vcpu::{Vcpu, VcpuExit};
    pub use crate::vm::dirty_log::{DirtyLogError, DirtyLogProtect, DirtyTracking};
    pub use crate::vm::memslot::{MemFlags, MemoryRegion};
    pub use crate::vm::{Vm, VmStats};
}
