//! The torture run that hunts a TDP table freed under a vCPU's guest-mode walk (G1 in
//! docs/locking.md). Shared by `torture_guest_walk_yield.rs` (the correct build must pass it) and
//! `torture_broken_free_before_flush_ack.rs` (the broken build must fail it).
//!
//! Why this shape: in the torture, the tables vCPUs walk through are unlinked while they walk only
//! by `recover_huge_pages` on the valid root (a reset first makes every vCPU drop the old root
//! and waits for their acknowledgements before it zaps, so a reset's unlinks race no walk). So the
//! guest memory is THP-backed, the reset actor alternates reset, eager split of every huge leaf
//! (which gives the vCPUs 4K tables to walk) and in-place recovery (which unlinks those tables),
//! and a forced yield at every step of a guest-mode walk from a table link down to its child
//! widens the window between loading the link and reading the child from a few instructions to a
//! scheduling quantum, as a preemption there would.

use kvmmu::internals::host::BackingSrc;
use kvmmu::torture::{Actors, TortureConfig};

/// The run for `seed`: THP-backed guest memory, the vCPUs and the reset/split/recover actor, with
/// a yield at every table-to-table step of a guest-mode walk. No host actor: its partial munmap,
/// mprotect and DONTNEED split the THPs within a few operations, and recovery only forms huge
/// leaves over host-huge blocks, so with it no table would be recovered at all. Measured on
/// the loaded 2-core CI machine: without the forced yield the broken build passed all ten runs
/// (seeds 1-10); with it, the first run of every seed tried failed.
pub fn config(seed: u64) -> TortureConfig {
    TortureConfig {
        seed,
        vcpus: 2,
        main_pages: 2048,
        dyn_pages: 512,
        ops_per_vcpu: Some(20_000),
        backing: BackingSrc::AnonymousThp,
        actors: Actors::RESET,
        walk_yield_period: 1,
        ..TortureConfig::default()
    }
}
