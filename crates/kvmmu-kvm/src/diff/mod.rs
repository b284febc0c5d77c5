//! Differential families: one seeded operation sequence, run on kvmmu and on real KVM, every answer
//! compared. The first divergence stops the run and is reported with the seed, the operation, both
//! answers and a command that replays it ([`Divergence`]).
//!
//! | family | module | what is compared |
//! |---|---|---|
//! | 1 memslots | [`memslots`] | accept/refuse of every `set_user_memory_region` (errno class, [`ERRNO_TABLE`]) |
//! | 2 data and exits | [`data`] | value read and exit kind of every guest access, across host memory ops and memslot changes |
//! | 3 dirty logging | [`dirty`] | bitmap of every harvest (classic, manual protect with clears), the page set of every dirty-ring harvest where the host has the ring, errno class of every dirty-log request |
//! | 4 stats | [`stats`] | `KVM_GET_STATS_FD` next to `VmStats` for one workload |
//!
//! A family is a function `run(seed, ops, ..) -> Result<Summary, FamilyError>`; the integration
//! test `tests/differential.rs` calls each for several seeds.

pub mod access;
pub mod data;
pub mod dirty;
pub mod memslots;
pub mod setup;
pub mod stats;

use std::fmt;

use kvmmu::MemslotError;
use kvmmu::SetMemoryRegionError;

/// The errno classes a memslot request can get, and which of kvmmu's errors maps to which: the one
/// table the memslot family compares through. KVM's `kvm_set_memory_region` returns `-EINVAL` for
/// every malformed or forbidden request and `-EEXIST` only for a gfn overlap (Linux
/// virt/kvm/kvm_main.c; x86's `kvm_arch_prepare_memory_region` adds `-EINVAL` past the largest gfn).
pub const ERRNO_TABLE: &[(&str, i32, &str)] = &[
    ("UnalignedGpa", libc::EINVAL, "gpa & 0xfff"),
    ("UnalignedHva", libc::EINVAL, "hva & 0xfff"),
    ("UnalignedSize", libc::EINVAL, "size & 0xfff"),
    (
        "SizeOverflow(HvaEnd)",
        libc::EINVAL,
        "!access_ok(hva, size)",
    ),
    ("SizeOverflow(GpaEnd)", libc::EINVAL, "gpa + size wraps"),
    (
        "SizeOverflow(MaxPages)",
        libc::EINVAL,
        "npages > KVM_MEM_MAX_NR_PAGES",
    ),
    (
        "SizeOverflow(MaxGfn)",
        libc::EINVAL,
        "last gfn > kvm_mmu_max_gfn() (x86 prepare)",
    ),
    (
        "SlotIdOutOfRange",
        libc::EINVAL,
        "(u16)slot >= KVM_USER_MEM_SLOTS",
    ),
    (
        "AsIdOutOfRange",
        libc::EINVAL,
        "as_id >= kvm_arch_nr_memslot_as_ids",
    ),
    ("UnknownFlags", libc::EINVAL, "check_memory_region_flags"),
    ("ChangeSize", libc::EINVAL, "npages != old->npages"),
    (
        "ChangeHva",
        libc::EINVAL,
        "userspace_addr != old->userspace_addr",
    ),
    (
        "ChangeReadonly",
        libc::EINVAL,
        "(flags ^ old->flags) & READONLY",
    ),
    ("DeleteNonexistent", libc::EINVAL, "size 0 and no old slot"),
    ("Overlap", libc::EEXIST, "kvm_check_memslot_overlap"),
];

/// The errno KVM returns for the request kvmmu refused with `e` (per [`ERRNO_TABLE`]).
pub fn errno_of(e: &SetMemoryRegionError) -> i32 {
    match e {
        SetMemoryRegionError::Invalid(MemslotError::Overlap { .. }) => libc::EEXIST,
        SetMemoryRegionError::Invalid(_) => libc::EINVAL,
        // Not a request error: no errno of KVM's; compared as "other".
        _ => -1,
    }
}

/// A deterministic generator (SplitMix64): the same seed gives the same operations on every host.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    /// True with probability `pct` percent.
    pub fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
}

/// The first operation on which kvmmu and KVM disagreed.
#[derive(Clone, Debug)]
pub struct Divergence {
    /// Which family.
    pub family: &'static str,
    /// The seed of the sequence.
    pub seed: u64,
    /// Index of the diverging operation in the sequence.
    pub index: usize,
    /// The operation.
    pub op: String,
    /// kvmmu's answer.
    pub kvmmu: String,
    /// KVM's answer.
    pub kvm: String,
    /// The command that replays it.
    pub replay: String,
}

impl fmt::Display for Divergence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "DIVERGENCE in family {} (seed {:#x}), operation #{}:",
            self.family, self.seed, self.index
        )?;
        writeln!(f, "  op:    {}", self.op)?;
        writeln!(f, "  kvmmu: {}", self.kvmmu)?;
        writeln!(f, "  kvm:   {}", self.kvm)?;
        write!(f, "  replay: {}", self.replay)
    }
}

/// The replay command of a family's test for `seed` and `ops` operations.
pub fn replay_command(test: &str, seed: u64, ops: usize) -> String {
    format!(
        "KVMMU_KVM_SEEDS={seed:#x} KVMMU_KVM_OPS={ops} cargo test -p kvmmu-kvm --test differential {test} -- --nocapture"
    )
}

/// Why a family run did not pass.
#[derive(Debug, thiserror::Error)]
pub enum FamilyError {
    /// kvmmu and KVM disagreed.
    #[error("{0}")]
    Divergence(Box<Divergence>),
    /// The harness could not set up or drive one side.
    #[error("setup: {0}")]
    Setup(String),
}

impl FamilyError {
    /// Wraps any displayable setup error.
    pub fn setup(e: impl fmt::Display) -> FamilyError {
        FamilyError::Setup(e.to_string())
    }
}

/// What a passing family run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Operations run.
    pub ops: usize,
    /// Operations both sides accepted (or guest accesses that completed on both).
    pub accepted: usize,
    /// Operations both sides refused (or accesses that exited on both).
    pub refused: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvmmu::{Gpa, SlotId};

    #[test]
    fn errno_of_maps_overlap_to_eexist_and_every_other_refusal_to_einval() {
        let overlap = SetMemoryRegionError::Invalid(MemslotError::Overlap {
            slot: SlotId::new(1),
            with: SlotId::new(0),
        });
        assert_eq!(errno_of(&overlap), libc::EEXIST);
        let unaligned =
            SetMemoryRegionError::Invalid(MemslotError::UnalignedGpa { gpa: Gpa::new(1) });
        assert_eq!(errno_of(&unaligned), libc::EINVAL);
        assert_eq!(
            ERRNO_TABLE.iter().filter(|r| r.1 == libc::EEXIST).count(),
            1,
            "only an overlap is -EEXIST"
        );
    }

    #[test]
    fn rng_is_deterministic_per_seed() {
        let a: Vec<u64> = (0..4)
            .scan(Rng::new(7), |r, _| Some(r.next_u64()))
            .collect();
        let b: Vec<u64> = (0..4)
            .scan(Rng::new(7), |r, _| Some(r.next_u64()))
            .collect();
        assert_eq!(a, b);
        assert_ne!(
            a,
            (0..4)
                .scan(Rng::new(8), |r, _| Some(r.next_u64()))
                .collect::<Vec<_>>()
        );
    }
}
