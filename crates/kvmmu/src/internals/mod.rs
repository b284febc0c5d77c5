//! The layers themselves, for kvmmu's own tests, loom and shuttle models, benchmarks and tools
//! that study the MMU from inside (the TDP and shadow MMUs, rmaps, SRCU, witnesses). Not part of
//! the documented API: nothing here is stable, and some of it is only sound under the protocols
//! of `docs/locking.md`. Programs use the public face at the crate root.

#[path = "../addr.rs"]
pub mod addr;
#[cfg(not(loom))]
#[path = "../config.rs"]
pub mod config;
#[path = "../geometry.rs"]
pub mod geometry;
#[path = "../mmu/mod.rs"]
pub mod mmu;
#[path = "../sync/mod.rs"]
pub mod sync;

#[cfg(not(loom))]
#[path = "../host/mod.rs"]
pub mod host;
#[cfg(not(loom))]
#[path = "../vcpu/mod.rs"]
pub mod vcpu;
#[cfg(not(loom))]
#[path = "../vm/mod.rs"]
pub mod vm;

/// Under loom only the small protocols are compiled: the sync primitives, the SPTE format, the TDP
/// tables and the TLB-flush request protocol.
#[cfg(loom)]
#[path = "../vm/loom.rs"]
pub mod vm;
