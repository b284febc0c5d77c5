//! kvmmu: KVM's x86 MMU as a userspace library, on simulated hardware.
//!
//! (The crate tutorial is filled in as the layers land; see `README.md` and `DESIGN.md`.)

pub mod addr;
pub mod sync;

#[cfg(not(loom))]
pub mod host;
pub mod mmu;
#[cfg(not(loom))]
pub mod vcpu;
#[cfg(not(loom))]
pub mod vm;

/// Under loom only the small protocols are compiled: the sync primitives, the SPTE format, the TDP
/// tables and the TLB-flush request protocol.
#[cfg(loom)]
pub mod vm {
    #[path = "request.rs"]
    pub mod request;
}
