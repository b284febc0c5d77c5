//! What the actors share: the layout of guest memory, the per-page discard generations the data
//! oracle uses, the reset generation, progress counters for the watchdog, and the violation log.
//!
//! # Protocol
//! 1. Every host page has one owner vCPU (or the accessed-oracle actor) and only the owner writes
//!    it, through any guest alias; so the owner's private record of its last write is exact, and no
//!    locking is needed on the vCPU path.
//! 2. The host actor bumps a page's discard generation before and after it discards (DONTNEED,
//!    munmap + mmap) it, so the generation is odd while a discard is in progress. A writer samples
//!    the generation before writing; a later read may return zero only if that sample was odd or
//!    the generation moved since.
//! 3. The reset actor bumps the reset generation before and after `reset_mmu` (odd while one is
//!    in progress). The accessed oracle is excused by a reset (which zaps SPTEs or invalidates
//!    roots, losing Accessed bits) only if the generation it sampled before its write was odd or
//!    has moved, or its own vCPU loaded a new root before the follow-up read.
//! 4. The first violation stops the run: every actor polls `stop`.

use core::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use crate::addr::{Gfn, Gpa, Hva};

/// Who did something (for violation reports and the per-actor table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ActorId {
    /// vCPU thread number `n`.
    Vcpu(usize),
    /// The host thread (munmap/mmap, mprotect, madvise).
    Host,
    /// The aging thread (clear_young, test_young, clear_flush_young, and the accessed oracle).
    Aging,
    /// The memslot thread (create, move, flag changes, delete, aliases).
    Memslot,
    /// The MMU-reset thread.
    Reset,
    /// The reclaim thread (evicts vCPU pages to swap, `madvise(MADV_PAGEOUT)`).
    Reclaim,
    /// The dirty-log harvester.
    DirtyLog,
    /// The L1 hypervisor rewriting EPT12 (nested runs).
    L1,
    /// The liveness watchdog.
    Watchdog,
    /// The checks at quiescence and teardown.
    Teardown,
}

impl fmt::Display for ActorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ActorId::Vcpu(n) => write!(f, "vcpu{n}"),
            ActorId::Host => f.write_str("host"),
            ActorId::Aging => f.write_str("aging"),
            ActorId::Memslot => f.write_str("memslot"),
            ActorId::Reset => f.write_str("reset"),
            ActorId::Reclaim => f.write_str("reclaim"),
            ActorId::DirtyLog => f.write_str("dirty-log"),
            ActorId::L1 => f.write_str("l1"),
            ActorId::Watchdog => f.write_str("watchdog"),
            ActorId::Teardown => f.write_str("teardown"),
        }
    }
}

/// Which oracle a violation broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ViolationKind {
    /// A read did not return the last value written to that page (nor zero after a discard).
    Data,
    /// An access used a translation to a frame the host no longer maps there.
    StaleTranslation,
    /// A write landed in memory the host had write-protected.
    WriteToReadOnly,
    /// A page written after `clear_young` was not young at the next `test_young`, with no TLB hit
    /// or reset to excuse it.
    AccessedLost,
    /// An SPTE a vCPU wrote through is present without Dirty.
    DirtyLost,
    /// A failed fault left an SPTE installed.
    HalfInstalled,
    /// An operation failed that must succeed (or returned an error the oracle does not allow).
    UnexpectedError,
    /// A counter did not balance at quiescence or teardown.
    Counter,
    /// An actor made no progress within the stall timeout.
    Stall,
    /// An actor panicked (an internal invariant of kvmmu failed).
    Panic,
}

/// One oracle violation: enough to find it again with the same seed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The run's seed.
    pub seed: u64,
    /// Which actor observed it.
    pub actor: ActorId,
    /// Which oracle broke.
    pub kind: ViolationKind,
    /// The guest frame involved, if any.
    pub gfn: Option<Gfn>,
    /// The operation that observed it, and what was expected versus found.
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seed {:#x} {} {:?}", self.seed, self.actor, self.kind)?;
        if let Some(g) = self.gfn {
            write!(f, " gfn {:#x}", g.raw())?;
        }
        write!(f, ": {}", self.detail)
    }
}

/// Guest and host addresses of the torture memory (see the module doc of `torture`).
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    /// Host address of host page 0.
    pub hva: Hva,
    /// Host pages backing slot 0 (the last [`Layout::private`] of them are the accessed oracle's).
    pub main_pages: u64,
    /// Host pages backing the dynamic slot 1.
    pub dyn_pages: u64,
    /// Pages of slot 0 that the alias slot 2 maps again.
    pub alias_pages: u64,
    /// Pages reserved for the accessed oracle (end of slot 0).
    pub private: u64,
}

/// Guest base of slot 0.
pub const MAIN_GPA: u64 = 1 << 32;
/// The two guest bases slot 1 moves between.
pub const DYN_GPA: [u64; 2] = [2 << 32, 3 << 32];
/// Guest base of the alias slot 2.
pub const ALIAS_GPA: u64 = 4 << 32;
const PAGE: u64 = 4096;

impl Layout {
    /// Host pages in total.
    pub fn host_pages(&self) -> u64 {
        self.main_pages + self.dyn_pages
    }

    /// Host address of host page `hp`.
    pub fn hva_of(&self, hp: u64) -> Hva {
        Hva::new(self.hva.raw() + hp * PAGE)
    }

    /// True if `hp` belongs to the accessed oracle rather than to a vCPU.
    pub fn is_private(&self, hp: u64) -> bool {
        hp >= self.main_pages - self.private && hp < self.main_pages
    }

    /// Host pages the host actor may discard or protect: everything but the private pages.
    pub fn churnable(&self, hp: u64) -> bool {
        !self.is_private(hp)
    }

    /// The guest addresses that may map host page `hp`; `choice` picks one. Returns the address and
    /// whether its slot can legitimately be absent (slots 1 and 2 come and go).
    pub fn gpa_for(&self, hp: u64, choice: u64) -> (Gpa, bool) {
        if hp < self.main_pages {
            if hp < self.alias_pages && choice.is_multiple_of(4) {
                (Gpa::new(ALIAS_GPA + hp * PAGE), true)
            } else {
                (Gpa::new(MAIN_GPA + hp * PAGE), false)
            }
        } else {
            let base = DYN_GPA[(choice % 2) as usize];
            (Gpa::new(base + (hp - self.main_pages) * PAGE), true)
        }
    }
}

/// Encodes a value a vCPU writes: sequence, host page and writer, never zero.
pub fn encode(writer: usize, hp: u64, seq: u64) -> u64 {
    (seq << 28) | ((hp & 0xF_FFFF) << 8) | (writer as u64 & 0xFF)
}

/// The host page a written value names.
pub fn decode_page(v: u64) -> u64 {
    (v >> 8) & 0xF_FFFF
}

/// Progress of one actor, for the watchdog and the ops/s table.
#[derive(Debug, Default)]
pub struct Progress {
    /// Operations completed.
    pub ops: AtomicU64,
    /// The last operation started (an `Op` code and a host page, see `describe_op`).
    pub last_op: AtomicU64,
    /// The actor has finished.
    pub done: AtomicBool,
}

impl Progress {
    /// Records that operation `op` on host page `hp` starts.
    pub fn start(&self, op: u64, hp: u64) {
        // ORDERING: Relaxed: read only by the watchdog for a diagnostic dump.
        self.last_op
            .store((op << 32) | (hp & 0xFFFF_FFFF), Ordering::Relaxed);
    }

    /// Records that an operation completed.
    pub fn done_op(&self) {
        // ORDERING: Relaxed: a progress counter, read only by the watchdog and the final table.
        self.ops.fetch_add(1, Ordering::Relaxed);
    }
}

/// Operation codes recorded in [`Progress::last_op`].
pub mod op {
    /// vCPU write.
    pub const WRITE: u64 = 1;
    /// vCPU read.
    pub const READ: u64 = 2;
    /// Host madvise(DONTNEED).
    pub const DONTNEED: u64 = 3;
    /// Host mprotect read-only, check, read-write.
    pub const MPROTECT: u64 = 4;
    /// Host munmap + mmap_fixed.
    pub const REMAP: u64 = 5;
    /// Aging over a range.
    pub const AGE: u64 = 6;
    /// Accessed-oracle round.
    pub const ACCESSED: u64 = 7;
    /// Memslot change.
    pub const MEMSLOT: u64 = 8;
    /// MMU reset.
    pub const RESET: u64 = 9;
    /// Page-out of a range to swap.
    pub const PAGE_OUT: u64 = 10;
    /// L1 rewrite of EPT12 (nested runs).
    pub const L1_EPT: u64 = 40;
    /// Host THP collapse of a 2 MiB span.
    pub const COLLAPSE: u64 = 11;
    /// Dirty-log harvest.
    pub const HARVEST: u64 = 12;
}

/// A readable form of a [`Progress::last_op`] value.
pub fn describe_op(v: u64) -> String {
    let name = match v >> 32 {
        0 => "none",
        op::WRITE => "write",
        op::READ => "read",
        op::DONTNEED => "madvise(DONTNEED)",
        op::MPROTECT => "mprotect",
        op::REMAP => "munmap+mmap",
        op::AGE => "age",
        op::ACCESSED => "accessed-oracle round",
        op::MEMSLOT => "memslot change",
        op::RESET => "reset_mmu",
        op::PAGE_OUT => "page_out",
        op::COLLAPSE => "collapse",
        op::HARVEST => "dirty-log harvest",
        _ => "unknown",
    };
    format!("{name} (host page {})", v & 0xFFFF_FFFF)
}

/// State shared by every actor of one run.
pub struct Shared {
    /// The run's seed.
    pub seed: u64,
    /// Memory layout.
    pub layout: Layout,
    /// Per host page: bumped before each discard (protocol 2).
    pub discard_gen: Box<[AtomicU64]>,
    /// Bumped before and after each `reset_mmu` (protocol 3).
    pub reset_gen: AtomicU64,
    /// Set when the run must end (time up, vCPUs done, or a violation).
    pub stop: AtomicBool,
    /// Violations found so far.
    pub violations: Mutex<Vec<Violation>>,
    /// vCPU writes whose fault failed for lack of host frames (fault injection by `frames`).
    pub out_of_frames_exits: AtomicU64,
    /// Accesses whose Accessed bit a TLB hit legitimately hid.
    pub accessed_hidden_by_tlb: AtomicU64,
    /// Accessed-oracle misses excused by a concurrent MMU reset.
    pub accessed_excused_by_reset: AtomicU64,
    /// When the run started.
    pub started: Instant,
    /// Where the run's progress is published for a live display.
    pub live: Option<std::sync::Arc<super::LiveProgress>>,
    /// The vCPUs run in L2 (EPT violations caused by the L1 actor are allowed).
    pub nested: bool,
}

impl Shared {
    /// Records a violation and stops the run (protocol 4).
    pub fn violation(&self, actor: ActorId, kind: ViolationKind, gfn: Option<Gfn>, detail: String) {
        if let Some(live) = &self.live {
            live.note_violation();
        }
        let v = Violation {
            seed: self.seed,
            actor,
            kind,
            gfn,
            detail,
        };
        self.violations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(v);
        // ORDERING: Relaxed: actors poll it; the violation log is under its own mutex.
        self.stop.store(true, Ordering::Relaxed);
    }

    /// True once the run must end.
    pub fn stopped(&self) -> bool {
        // ORDERING: Relaxed: a best-effort stop signal, bounded by the actors' own op counts.
        self.stop.load(Ordering::Relaxed)
    }

    /// The reset generation (protocol 3).
    pub fn reset_gen(&self) -> u64 {
        // ORDERING: SeqCst, paired with the reset actor's SeqCst bumps around `reset_mmu`.
        self.reset_gen.load(Ordering::SeqCst)
    }

    /// The discard generation of host page `hp`.
    pub fn discard_gen(&self, hp: u64) -> u64 {
        // ORDERING: SeqCst, paired with the host's SeqCst bump before its discard (protocol 2): a
        // reader that saw the discard's zero-fill also sees the bump, through the host's locks
        // and the MMU's invalidation, which order the discard after the bump.
        self.discard_gen[hp as usize].load(Ordering::SeqCst)
    }

    /// Bumps the discard generation of `[hp, hp + n)`.
    pub fn bump_discard(&self, hp: u64, n: u64) {
        for p in hp..hp + n {
            // ORDERING: SeqCst, see `discard_gen`.
            self.discard_gen[p as usize].fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_values_are_nonzero_and_name_their_page() {
        for (w, hp, seq) in [(0, 0, 1), (3, 77, 9), (255, 0xF_FFFF, 1 << 30)] {
            let v = encode(w, hp, seq);
            assert_ne!(v, 0);
            assert_eq!(decode_page(v), hp);
        }
    }

    #[test]
    fn private_pages_are_the_end_of_slot_zero_and_never_churned() {
        let l = Layout {
            hva: Hva::new(1 << 30),
            main_pages: 64,
            dyn_pages: 16,
            alias_pages: 8,
            private: 4,
        };
        assert!(l.is_private(60) && l.is_private(63));
        assert!(!l.is_private(59) && !l.is_private(64));
        assert!(!l.churnable(61) && l.churnable(70));
        assert_eq!(l.gpa_for(70, 1).0, Gpa::new(DYN_GPA[1] + 6 * PAGE));
        assert_eq!(l.gpa_for(3, 0), (Gpa::new(ALIAS_GPA + 3 * PAGE), true));
        assert_eq!(l.gpa_for(3, 1), (Gpa::new(MAIN_GPA + 3 * PAGE), false));
    }
}
