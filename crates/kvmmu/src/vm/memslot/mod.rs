//! Memslots: guest-physical ranges backed by host-virtual ranges, in immutable per-address-space sets.
//!
//! # Protocol
//!
//! This module is the pure data layer under `set_user_memory_region` (KVM's `kvm_main.c`, spec §1.2,
//! §1.3, §3.1). An update runs in two steps, both under the VM's `slots_lock`:
//!
//! 1. **Plan.** [`plan_change`] validates a [`MemoryRegion`] against the active [`Memslots`] of every
//!    address space and classifies it as a [`MemslotChange`] (create, delete, move, flags-only or
//!    unchanged), exactly as `__kvm_set_memory_region` does. It changes nothing; a rejected request
//!    comes back as a [`MemslotError`] naming the offending values.
//! 2. **Apply.** The VM builds the next set with [`Memslots::with_change`] (`kvm_replace_memslot`),
//!    an O(log n) copy-on-write edit that leaves the published set untouched, publishes it under SRCU and waits
//!    for old readers (the swap, `kvm_swap_active_memslots`, lives in `vm/mod.rs`). DELETE and MOVE
//!    first publish [`Memslot::invalid_copy`] of the old slot, so faults retry while its SPTEs are
//!    zapped, then publish the final set.
//!
//! Readers (faults, the MMU-notifier hva-range walk, aging) hold a `&Memslots` obtained under SRCU
//! and use [`Memslots::find_by_gfn`] and [`Memslots::for_each_hva_overlap`]; neither allocates nor
//! takes a lock, and a hit on the last-used hint writes nothing.
//!
//! # Invariants
//!
//! 1. A [`Memslot`] never changes once built: `1 <= npages <= KVM_MEM_MAX_NR_PAGES`, its
//!    `userspace_addr` is page aligned, and both `base_gfn + npages` and
//!    `userspace_addr + npages * PAGE_SIZE` fit in 64 bits, so every conversion inside the slot is
//!    exact and cannot overflow.
//! 2. Within one [`Memslots`], slots are sorted by `base_gfn` and their gfn ranges never overlap;
//!    slot ids are unique; every slot belongs to the set's address space.
//! 3. Host-virtual ranges may overlap, within a set and across sets (aliases): the hva index reports
//!    every slot whose range intersects the query, each exactly once.
//! 4. A [`Memslots`] is never mutated after construction: its indexes are persistent structures
//!    that an edit clones (sharing all but O(log n) nodes) and changes copy-on-write, leaving every
//!    node of the original in place. The only interior mutability is the last-used hint of
//!    [`Memslots::find_by_gfn`], which only ever names a slot stored in the set's own indexes and
//!    is range-checked on every use, so any value it holds is harmless.
//! 5. A set's generation is the one its builder gave ([`Memslots::new`] starts at the address-space
//!    id, spec §1.3); this module never computes generations, the swap does.

mod hva_index;
mod lpage;
mod plan;
mod set;
mod slot;

pub use lpage::LpageInfo;
pub use plan::{MemslotChange, MemslotError, SizeLimit, USER_ADDR_END, plan_change};
pub use set::Memslots;
pub use slot::{KVM_MEM_MAX_NR_PAGES, MemFlags, MemoryRegion, Memslot};
