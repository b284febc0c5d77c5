//! Nested TDP (`paging_tmpl.h`, EPT flavour; `Documentation/virt/kvm/x86/mmu.rst`): an L1 guest
//! runs an L2 guest with its own extended page tables (EPT12, [`ept12`]) in L1 memory. KVM
//! shadows them with **indirect** shadow pages (EPT02): `role.direct = false`, keyed by the L1 gfn
//! of the EPT12 table each one shadows, linked through `parent_ptes`, counted in
//! `indirect_shadow_pages`.
//!
//! # Protocol
//! 1. **L2 fault** (VM side, `vm/nested.rs`): under SRCU, walk EPT12 in software ([`walk`]),
//!    setting A/D in L1 memory; a missing or malformed entry is an [`walk::EptExit`] for L1.
//!    Resolve the leaf's L1 gfn like an L1 fault (memslot, sequence snapshot, GUP).
//! 2. Under `mmu_lock` write: link the indirect pages of the walk (`nested_link`); every table
//!    gfn that became write-tracked has L1's own mappings of it zapped in both MMUs (TDP leaves,
//!    rmaps), then TLBs are flushed; then the walk's entries are re-read from L1 memory and
//!    compared (without A/D) — a change means L1 wrote a table concurrently: RETRY; then the 4K
//!    leaf is installed (`nested_set_leaf`) and joins the rmap of the L1 gfn it maps.
//! 3. **L1 writes to a tracked table** fault (L1 maps it read-only), are emulated by the VM under
//!    `mmu_lock` write, and call `ShadowMmu::track_write` ([`track`]).
//! 4. **Host invalidation** of an L1 page zaps its TDP leaf and, through the rmap of the L1 gfn,
//!    every indirect leaf mapping it (`Mmu::unmap_gfn_range`, unchanged).
//!
//! # Invariants (cited as N1–N4)
//! 1. **N1 (leaf gfn)** An indirect leaf's L1 gfn is recorded in its page before the leaf is
//!    published with a Release store; a vCPU reads it after its Acquire load of the leaf, so the
//!    frame check it does (`vcpu/walker.rs`) uses the gfn the leaf was built for.
//! 2. **N2 (tracking)** While an indirect page shadows L1 gfn `g`, `g` is write-tracked: no L1
//!    fault installs a writable mapping of `g` (nor a huge one over it: the fault checks the
//!    tracked set under `mmu_lock` and retries if it changed since its snapshot), and the
//!    mappings made before tracking began were zapped and flushed before any indirect leaf
//!    derived from `g` is installed. Every change to `g` therefore runs `track_write` under
//!    `mmu_lock` write, after the emulated store.
//! 3. **N3 (consistency)** Each indirect SPTE agrees with the EPT12 entry (A/D aside) it was
//!    derived from, at every `mmu_lock` release: step 2 re-reads the entries after N2 holds, and
//!    `track_write` zaps what an L1 write changed before the lock drops, with a flush.
//! 4. **N4 (counts)** `indirect_shadow_pages` and the tracked set change with the page, under
//!    `mmu_lock` write (alloc and prepare-zap); a tracked gfn's count is the number of live
//!    indirect pages keyed by it.

pub mod ept12;
mod fetch;
pub mod track;
pub mod walk;
