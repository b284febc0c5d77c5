//! The primary MMU: the simulated process address space a VM sits on.
//!
//! Protocol (Linux mm as KVM sees it, spec §3.2; `mm/mmu_notifier.c`, `mm/gup.c`):
//! - [`FrameArena`] is the machine's physical memory; every frame carries an owner tag so an access
//!   through a stale translation is detected ([`StaleAccess`]).
//! - [`HostMm`] holds VMAs and a sparse host page table (hva page → frame, young, dirty; tables
//!   allocated on first touch, so an untouched range costs nothing to map, zap, protect or age).
//!   [`HostMm::get_user_page`] faults a zero-filled frame in on first touch, like GUP on
//!   anonymous memory.
//! - Secondary MMUs subscribe with [`HostMm::register_notifier`]. Every host operation that changes
//!   or removes a present PTE (`munmap`, `mprotect`, `madvise_dontneed`) is bracketed by
//!   `invalidate_range_start` … `invalidate_range_end`; `release` calls every subscriber's
//!   `release` before any frame is freed. Aging (`clear_young`, `clear_flush_young`, `test_young`,
//!   `clear_young_range`) combines the host young bits with one subscriber call per range.
//!
//! - Under a memory limit ([`HostMm::enable_reclaim`]) reclaim evicts pages to swap inside an
//!   invalidate pair, and GUP refaults them (`reclaim` and `swap` modules, invariants R1–R4 and
//!   S1–S3 in `docs/invariants.md`).
//!
//! - A thread that holds a vCPU in guest mode is refused, at the entry and before any change,
//!   every operation that takes `mm_writer` or calls subscribers (a subscriber may wait for that
//!   vCPU's TLB-flush acknowledgement): [`HostError::InGuestMode`], or a panic for `release` and
//!   `register_notifier`, which return no `Result`.
//!
//! Locks, outermost first:
//! 1. `mm_writer` (mutex): serialises structural operations (`mmap`, `mmap_fixed`, `munmap`,
//!    `mprotect`, `madvise_dontneed`, `register_notifier`, `release`). It plays the part of Linux's
//!    `mmap_lock` held for write *across the notifier calls*.
//! 2. `mmap_lock` (rwlock over the VMAs): read for GUP, userspace accesses, aging of host bits and
//!    queries; write for the instant a structural operation changes VMAs or removes PTEs.
//! 3. the subscriber list lock and the arena's free-list stripe locks (leaves).
//!
//! Unlike Linux, `mmap_lock` is never held while a subscriber is called, so a callback may call
//! the read-only and faulting entry points ([`HostMm::host_pte`], [`HostMm::arena`],
//! [`HostMm::get_user_page`], [`HostMm::read_u64`], [`HostMm::write_u64`], the aging functions,
//! [`HostMm::stats`], [`HostMm::mappings`], [`HostMm::unregister_notifier`]). A callback must
//! **not** call the operations that take `mm_writer` (`mmap`, `mmap_fixed`, `munmap`, `mprotect`,
//! `madvise_dontneed`, `register_notifier`, `release`): that deadlocks.
//!
//! Invariants:
//! - H1. A present PTE is changed or removed only with `mm_writer` held, under `mmap_lock` write,
//!   after `invalidate_range_start` over a covering range has returned from every subscriber of a
//!   snapshot, and before `invalidate_range_end` is called on the same snapshot. An operation
//!   that skips the notifier (no present PTE affected) checks and changes in one write-locked
//!   section, so a concurrent GUP cannot make a page present in between.
//! - H2. A frame is freed only after the PTE naming it was swapped to 0 (or, by reclaim, to a swap
//!   entry) under `mmap_lock` write; so a present PTE always names an allocated frame whose tag it
//!   records.
//! - H3. Under `mmap_lock` read a PTE only goes from 0 or a swap entry to present (GUP's CAS: a
//!   first touch or a refault) and gains or loses young/dirty bits; a reader that saw a present
//!   PTE may use its frame until it drops the lock.
//! - H4. Validation happens before any notifier call or change; a failed operation changes nothing
//!   and calls no subscriber.
//! - H5. Every mapped page lies below [`TASK_SIZE`], so its number fits a [`FrameTag`].
//! - H6. Registration is serialised with invalidations (it takes `mm_writer`), and a start/end pair
//!   uses one subscriber snapshot: every subscriber sees balanced pairs.
//! - H7. No `mmap_lock` (read or write) is held while a subscriber is called; only `mm_writer`
//!   is, for invalidations and `release`.

mod aging;
mod charge;
mod frames;
mod huge;
mod idle;
mod inspect;
mod kswapd;
mod lru_gen;
mod mm;
mod notifier;
mod pgtable;
mod reclaim;
mod swap;
mod vma;
mod words;
mod zap;

pub use charge::{ChargeAudit, ChargeUnderflow};
pub use frames::{
    FrameArena, FrameStats, FrameTag, MAX_FRAMES, RUN_1G, RUN_2M, StaleAccess, WORDS_PER_FRAME,
};
pub use huge::{BackingSrc, UnknownBackingSrc};
pub use idle::{IdleState, PageIdle};
pub use kswapd::Kswapd;
pub use lru_gen::{AGING_CHUNK_PAGES, AgingPass, LruGen, MIN_NR_GENS, WorkingSet, WorkingSetBin};
pub use mm::{GupPage, HostConfig, HostMm, HostPte, HostStats, MMAP_MIN_ADDR, Prot, TASK_SIZE};
pub use notifier::{InvalidateEvent, MmuNotifier, NotifierId, NotifierRange, YoungBitmap};
pub use reclaim::{
    MAX_DIRECT_RECLAIM_ATTEMPTS, MAX_NR_GENS, MIN_LIMIT_FRAMES, ReclaimAging, ReclaimConfig,
    ReclaimStats, SWAP_CLUSTER_MAX,
};
pub use swap::{MAX_SWAP_SLOTS, SwapStats};

use crate::addr::{Hva, Pfn};

/// Why a get-user-page failed (the EFAULT-like causes a fault handler reports).
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub enum GupError {
    /// No mapping covers the address.
    #[error("no mapping at {hva}")]
    NotMapped {
        /// The address.
        hva: Hva,
    },
    /// The mapping does not allow the access.
    #[error("{} access to {hva} not allowed by the mapping", if *write { "write" } else { "read" })]
    ProtectionViolation {
        /// The address.
        hva: Hva,
        /// True for a write access.
        write: bool,
    },
    /// No free frame to fault the page in.
    #[error("out of frames")]
    OutOfFrames,
}

/// Errors of the host module.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// An address or length is not page aligned.
    #[error("range {hva}+{len:#x} is not page aligned")]
    Unaligned {
        /// Start of the range.
        hva: Hva,
        /// Length in bytes.
        len: u64,
    },
    /// A word access is not 8-byte aligned.
    #[error("access to {hva} is not 8-byte aligned")]
    UnalignedAccess {
        /// The address.
        hva: Hva,
    },
    /// A range has length 0.
    #[error("zero-length range")]
    ZeroLength,
    /// `hva + len` overflows.
    #[error("range {hva}+{len:#x} overflows")]
    Overflow {
        /// Start of the range.
        hva: Hva,
        /// Length in bytes.
        len: u64,
    },
    /// A range leaves the user address space `[MMAP_MIN_ADDR, TASK_SIZE)`.
    #[error("range {hva}+{len:#x} is outside the user address space")]
    OutOfRange {
        /// Start of the range.
        hva: Hva,
        /// Length in bytes.
        len: u64,
    },
    /// A structure sized by the request (an aging bitmap, a generation array) could not be
    /// allocated; nothing changed.
    #[error("cannot allocate {bytes} bytes")]
    NoMemory {
        /// The allocation's size.
        bytes: u64,
    },
    /// (Part of) a range is not mapped.
    #[error("{hva} is not mapped")]
    NotMapped {
        /// The first unmapped address of the range.
        hva: Hva,
    },
    /// A length or range that is not a multiple of the mapping's huge page size (hugetlb), or an
    /// operation that would split a hugetlb page; nothing changed.
    #[error("range {hva}+{len:#x} is not aligned to the huge page size {page_size:#x}")]
    HugeUnaligned {
        /// Start of the range (0 for an `mmap` length).
        hva: Hva,
        /// Length in bytes.
        len: u64,
        /// The huge page size in bytes.
        page_size: u64,
    },
    /// A fixed mapping would overlap an existing one.
    #[error("range {hva}+{len:#x} overlaps the mapping at {existing}")]
    Overlaps {
        /// Start of the requested range.
        hva: Hva,
        /// Length in bytes.
        len: u64,
        /// Start of an existing mapping it overlaps.
        existing: Hva,
    },
    /// Every frame of the arena is allocated.
    #[error("out of frames")]
    OutOfFrames,
    /// No free address range is large enough.
    #[error("address space exhausted")]
    AddressSpaceExhausted,
    /// A frame arena size of 0 or above `MAX_FRAMES`.
    #[error("invalid frame count {frames}")]
    InvalidFrameCount {
        /// The requested count.
        frames: usize,
    },
    /// A word index of 512 or more.
    #[error("word index {word} is outside a frame")]
    BadWordIndex {
        /// The index.
        word: usize,
    },
    /// A pfn outside the arena.
    #[error("pfn {pfn} is outside the arena")]
    BadPfn {
        /// The pfn.
        pfn: Pfn,
    },
    /// A host page number too large for a frame tag.
    #[error("host page {host_page:#x} cannot be tagged")]
    BadHostPage {
        /// The page number.
        host_page: u64,
    },
    /// A free whose tag does not match the frame (double or stale free); nothing was freed.
    #[error("stale free of frame {pfn}: expected {expected:?}, found {found:?}")]
    StaleFree {
        /// The frame.
        pfn: Pfn,
        /// The tag passed to `free`.
        expected: FrameTag,
        /// The frame's tag.
        found: FrameTag,
    },
    /// A get-user-page failure (from `read_u64` / `write_u64`).
    #[error(transparent)]
    Gup(#[from] GupError),
    /// An access through a stale frame tag.
    #[error(transparent)]
    Stale(#[from] StaleAccess),
    /// The OS refused an anonymous mapping (the frame arena).
    #[error("anonymous mapping failed: {0}")]
    Mmap(std::io::Error),
    /// The calling thread holds a vCPU in guest mode: the operation could wait for that vCPU's
    /// own TLB-flush acknowledgement. Refused before anything changed or anyone was called.
    #[error(transparent)]
    InGuestMode(#[from] crate::sync::guest_mode::InGuestMode),
}

/// Why a reclaim request was refused (nothing changed).
#[derive(Debug, thiserror::Error)]
pub enum ReclaimError {
    /// The limit is below [`MIN_LIMIT_FRAMES`].
    #[error("memory limit of {limit} frames is below the minimum of {min}")]
    LimitTooSmall {
        /// The requested limit.
        limit: u64,
        /// [`MIN_LIMIT_FRAMES`].
        min: u64,
    },
    /// The limit is not below the arena's size (it would never be reached).
    #[error("memory limit of {limit} frames is not below the {capacity} frames of the arena")]
    LimitAboveArena {
        /// The requested limit.
        limit: u64,
        /// The arena's frames.
        capacity: u64,
    },
    /// More swap slots than a swap entry can name.
    #[error("{slots} swap slots is more than the maximum of {max}")]
    SwapTooLarge {
        /// The requested slots.
        slots: u64,
        /// [`MAX_SWAP_SLOTS`].
        max: u64,
    },
    /// Reclaim is already enabled on this host.
    #[error("reclaim is already enabled")]
    AlreadyEnabled,
    /// Reclaim is not enabled on this host.
    #[error("reclaim is not enabled")]
    NotEnabled,
    /// A kswapd thread already runs for this host.
    #[error("kswapd already runs")]
    KswapdRunning,
    /// The OS refused to start the kswapd thread.
    #[error("cannot start kswapd: {0}")]
    Spawn(std::io::Error),
    /// The generation array (4 bytes per frame) could not be allocated.
    #[error("cannot allocate the generation array")]
    NoMemory,
    /// A host error (a bad range, or a call from a thread in guest mode).
    #[error(transparent)]
    Host(#[from] HostError),
}

// The handles are shared across vCPU threads: keep them Send + Sync (checked at compile time).
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<HostMm>();
    send_sync::<FrameArena>();
    send_sync::<GupPage>();
};
