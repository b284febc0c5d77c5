//! The shadow MMU (`arch/x86/kvm/mmu/mmu.c`, `tdp_mmu=N`): shadow pages found through a gfn+role
//! hash, parent-pointer lists, counted roots, per-gfn reverse maps ([`rmap`]) with the LOCKED bit,
//! faults and zaps under `mmu_lock` write, and aging through rmaps with or without `mmu_lock`.
//! Direct shadow pages map guest memory; indirect ones ([`nested`]) shadow an L1 guest's EPT12
//! tables for its L2 guest (protocol N1–N4 there).
//!
//! # Protocol
//! - **Faults** ([`ShadowMmu::map`], `mmu_lock` write) walk from the vCPU's root, find or create
//!   each missing child page through the hash, link it with a `Release` store and record the
//!   linking SPTE in the child's `parent_ptes`; the leaf is stored, then added to the memslot's
//!   rmap for (gfn, 4K). An rmap that grew past [`rmap::RMAP_RECYCLE_THRESHOLD`] is zapped and
//!   TLBs are flushed.
//! - **Zaps through rmaps** ([`ShadowMmu::zap_gfn_range`], `mmu_lock` write: invalidation, memslot
//!   delete/move) empty the rmaps of a gfn range, clearing each SPTE with an atomic swap before
//!   its rmap forgets it; the caller flushes before dropping `mmu_lock`. Pages stay.
//! - **Page zaps** (`ShadowMmu::zap_all`, reset and teardown) are split like the kernel's:
//!   *prepare-zap* clears the page's leaves and removes them from their rmaps, unlinks and
//!   recursively prepare-zaps children that lose their last parent, clears the parent SPTEs,
//!   marks the page invalid and takes it off the hash; *commit-zap* returns the queued pages in a
//!   [`ZapBatch`](crate::mmu::ZapBatch) whose `commit` (by the caller, still under `mmu_lock`
//!   write) calls `flush_remote_tlbs` and only then frees them.
//! - **Aging** ([`ShadowMmu::age_gfn_range`]) locks rmaps read-only and clears Accessed with
//!   one atomic AND per young SPTE; `TestOnly` stops at the first young SPTE and writes nothing.
//!   It skips lines of empty heads, and under one rmap's bit reads a direct page's table in order
//!   while the following rmaps list exactly its next slots (`age_scan.rs`, invariants A1–A3).
//!   In lockless mode no `mmu_lock` is held (SRCU keeps the memslot and its rmaps alive); in
//!   locked mode the caller holds it for write. No RCU guard is held while aging rmaps (the rmap
//!   bit ranks before RCU).
//! - **The simulated CPU** walks its referenced root with `Acquire` loads in guest mode and sets
//!   A/D by compare-and-swap, exactly as on TDP roots.
//!
//! # Invariants (cited as S1–S7)
//! 1. **S1 (page lifetime, spec §4 item 33)** A shadow page is freed only by commit-zap, after
//!    prepare-zap removed every SPTE in it from every rmap (leaves) and parent list (links) and
//!    unlinked it from its parents, the hash and the root table, **and** after a remote TLB flush
//!    completed — or, for a root, by the put of its last reference (S3). Every free happens under
//!    `mmu_lock` write or by the last root reference holder.
//! 2. **S2 (walkers)** vCPUs walk shadow pages only in guest mode, between instruction
//!    boundaries, and `flush_remote_tlbs` waits until every vCPU in guest mode has acknowledged
//!    the flush at an instruction boundary. A page reachable when a walk started and unlinked
//!    later is therefore freed only after that walk finished: the walk's instruction boundary
//!    precedes the acknowledgement, which precedes the free (the kernel relies on the same IPI
//!    wait for its IRQ-disabled lockless walkers). Non-leaf SPTEs are written only under
//!    `mmu_lock` write; the shadow MMU never writes FROZEN. Leaves sit at 4K, 2M or 1G (a huge
//!    leaf is listed in the rmap of its level; `huge.rs` drops huge leaves, it never splits).
//! 3. **S3 (roots)** A root starts with count 2 (the caller's and the MMU's). Prepare-zap marks it
//!    invalid, empties it, takes it off the root table, and drops the MMU's reference last. The
//!    count reaches 0 only on an invalid, empty, unreachable root; the holder of the last
//!    reference frees it without a flush, because only reference holders walk a root and the
//!    last one has stopped.
//! 4. **S4 (no installs into invalid roots)** `map` checks the root under `mmu_lock` write, which
//!    prepare-zap also holds, so an invalid root stays empty.
//! 5. **S5 (state)** The hash, the root table, link SPTEs and chains of rmaps and parent lists
//!    change only under `mmu_lock` write (the internal mutex is never contended).
//! 6. **S6 (leaves and rmaps)** Every present leaf is listed exactly once, in the rmap of its gfn
//!    in the memslot currently covering the gfn (its INVALID copy shares the arrays), and is
//!    cleared before it leaves that rmap (spec §4 item 26).
//! 7. **S7 (counters)** `indirect_shadow_pages` counts live indirect pages (spec §4 item 34;
//!    non-zero only while nested guests run, [`nested`] N4); `pages_allocated - pages_freed`
//!    counts live pages including invalid roots
//!    still referenced by vCPUs; at teardown with no vCPU left they are equal.

#[cfg(not(loom))]
pub mod nested;
pub mod rmap;

#[cfg(not(loom))]
mod age;
#[cfg(not(loom))]
mod age_scan;
#[cfg(not(loom))]
mod dirty;
#[cfg(not(loom))]
mod fault;
#[cfg(not(loom))]
mod huge;
#[cfg(not(loom))]
mod mmu;
#[cfg(not(loom))]
mod page;
#[cfg(not(loom))]
mod slot_rmaps;
#[cfg(all(test, not(loom)))]
mod tests;
#[cfg(not(loom))]
mod walk;
#[cfg(not(loom))]
mod zap;

#[cfg(not(loom))]
pub(crate) use mmu::RmapLookup;
#[cfg(not(loom))]
pub use mmu::{ShadowMmu, ShadowRoot, ShadowStats};
#[cfg(not(loom))]
pub use slot_rmaps::{RMAP_LEVELS, RmapAllocError, SlotRmaps};
