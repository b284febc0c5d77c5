//! The arch MMU (`arch/x86/kvm/mmu`): the SPTE format, the TDP MMU, the retry protocol, and the page
//! fault path that ties memslots, the host's GUP and the page tables together.
//!
//! # Page fault (spec §3.4, `kvm_tdp_mmu_page_fault`)
//! 1. Under SRCU, look up the memslot of the gfn. No slot → exit to the user; an INVALID slot (being
//!    deleted or moved) → RETRY; a write to a read-only slot → exit to the user.
//! 2. Snapshot `mmu_invalidate_seq` ([`seq::InvalidateState::snapshot`]) **before** reading host page
//!    tables; pre-check lock-free for a racing invalidation (cheap RETRY instead of contending
//!    `mmu_lock` with an invalidation).
//! 3. Resolve the host frame with `get_user_page`; a host error (unmapped, or a write to read-only
//!    memory) is an exit to the user, like KVM's `-EFAULT`.
//! 4. Take `mmu_lock` read; if the root is obsolete or an invalidation covering the gfn is in progress
//!    or finished since the snapshot → RETRY (spec §4 item 9). Otherwise install with
//!    compare-and-swap ([`tdp::TdpMmu::map`]).
//!
//! The shadow MMU ([`shadow`], `VmConfig::mmu = Shadow`) runs the same steps 1–3; step 4 takes
//! `mmu_lock` **write** (spec §3.4 shadow path), re-checks the same conditions, and installs
//! through shadow pages and rmaps ([`shadow::ShadowMmu::map`]).
//!
//! RETRY is control flow, not an error: the vCPU simply re-executes the access.

pub mod seq;
pub mod shadow;
pub mod spte;
pub mod tdp;

#[cfg(not(loom))]
mod fault;
#[cfg(not(loom))]
pub use fault::FaultError;

/// A vCPU's reference to the root it translates through, for whichever MMU the VM uses (enum
/// dispatch: no `dyn` on the access path).
#[cfg(not(loom))]
#[derive(Clone, Debug)]
pub enum MmuRoot {
    /// A TDP MMU root.
    Tdp(tdp::RootRef),
    /// A shadow MMU root.
    Shadow(shadow::ShadowRoot),
}

#[cfg(not(loom))]
impl MmuRoot {
    /// The address space the root translates.
    pub fn as_id(&self) -> crate::addr::AsId {
        match self {
            MmuRoot::Tdp(r) => r.as_id(),
            MmuRoot::Shadow(r) => r.as_id(),
        }
    }
    /// True once the root was invalidated; the vCPU must load a new one.
    #[inline]
    pub fn is_invalid(&self) -> bool {
        match self {
            MmuRoot::Tdp(r) => r.is_invalid(),
            MmuRoot::Shadow(r) => r.is_invalid(),
        }
    }
}
