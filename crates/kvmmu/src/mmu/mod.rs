//! The arch MMU (`arch/x86/kvm/mmu`): the SPTE format, the TDP MMU, the shadow MMU, and [`Mmu`], the
//! one place that chooses between them.
//!
//! # Who decides what
//! - [`Mmu`] owns both MMUs and dispatches every operation the layers above need: root loading,
//!   the simulated CPU's walk, the fault's `map` step (with the `mmu_lock` mode it needs: read for
//!   TDP, write for shadow, spec §3.4), unmapping a gfn range, aging with the spec §3.8 dispatch,
//!   reset, zap-all, the leaf oracle and statistics. Nothing outside this module matches on
//!   TDP versus shadow.
//! - The fault path around `map` (memslot, GUP, the retry rule) is VM orchestration and lives in
//!   `vm/fault.rs`; the invalidation counters it checks live in `vm/seq.rs`.
//! - `mmu` never calls up into the VM: zaps return a [`ZapBatch`] that the VM commits (remote TLB
//!   flush before `mmu_lock` is dropped), and a zap that must flush before yielding `mmu_lock` or
//!   before dropping RCU over unlinked tables calls the [`RemoteTlbFlush`] it was given.
//!
//! RETRY is control flow, not an error: the vCPU simply re-executes the access.

pub mod access_track;
pub mod hugepage;
#[cfg(feature = "test-hooks")]
mod inject;
mod owner;
pub mod shadow;
pub mod spte;
pub mod tdp;
pub mod types;

#[cfg(not(loom))]
mod dispatch;

#[cfg(not(loom))]
pub use dispatch::{InstalledLeaf, Mmu, MmuRoot};
pub use hugepage::PageStats;
pub use tdp::dirty::FastFault;
pub use types::{
    FaultOutcome, HwWalk, MapRequest, RemoteTlbFlush, RetryReason, RootReload, ZapBatch,
};
