//! MMU notifiers: how the host tells secondary MMUs (KVM) that host mappings change or age.
//!
//! Protocol (Linux `include/linux/mmu_notifier.h`, as KVM sees it, spec §3.2):
//! - `invalidate_range_start(r)` is called before the host changes or removes any present PTE in
//!   `[r.start, r.end)`; when it returns, the subscriber holds no mapping of those pages (KVM zaps
//!   its SPTEs and bumps `mmu_invalidate_in_progress`). The host frees a frame only after start has
//!   returned from every subscriber.
//! - `invalidate_range_end(r)` follows, with the same range, after the change; KVM bumps
//!   `mmu_invalidate_seq` so that faults that raced with the change retry.
//! - `clear_young` / `clear_flush_young` / `test_young` ask the subscriber whether it accessed the
//!   range since the last clear (KVM ages its SPTEs); `test_young` changes nothing.
//! - `release` means the address space is going away: drop every mapping.
//!
//! Invariants kept by [`NotifierList`]:
//! 1. A start/end pair is delivered to the same set of subscribers: both come from one snapshot,
//!    so an unregister between them still delivers the end (the snapshot keeps the subscriber
//!    alive), and a subscriber registered in between sees neither.
//! 2. Calls are made with no lock of the list held, so a callback may (un)register without
//!    deadlocking on the list itself (see the `host` module doc for what callbacks may call).

use crate::addr::Hva;
use crate::sync::atomic::{AtomicU64, Ordering};
use crate::sync::{Arc, RwLock};

/// Why a range is being invalidated (`enum mmu_notifier_event`, reduced).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum InvalidateEvent {
    /// The range is unmapped (`munmap`, process exit).
    Unmap,
    /// The range's protection changes (`mprotect`).
    Protect,
    /// The range's pages are discarded and will read as zero (`madvise(MADV_DONTNEED)`).
    DontNeed,
}

/// The range an invalidation covers (`struct mmu_notifier_range`).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub struct NotifierRange {
    /// First host virtual address (page aligned).
    pub start: Hva,
    /// One past the last address (exclusive, page aligned).
    pub end: Hva,
    /// What the host is doing to the range.
    pub event: InvalidateEvent,
    /// Whether the subscriber may sleep (always true in this simulation).
    pub blockable: bool,
}

/// A secondary MMU subscribed to a [`super::HostMm`] (`struct mmu_notifier_ops`).
pub trait MmuNotifier: Send + Sync {
    /// The host is about to change or remove present PTEs in `range`; drop every mapping of it.
    fn invalidate_range_start(&self, range: &NotifierRange);
    /// The change announced by the matching `invalidate_range_start` is complete.
    fn invalidate_range_end(&self, range: &NotifierRange);
    /// Clear the accessed state of `[start, end)`, flushing if the subscriber wants to; true if
    /// any page was young.
    fn clear_flush_young(&self, start: Hva, end: Hva) -> bool;
    /// Clear the accessed state of `[start, end)` without a flush; true if any page was young.
    fn clear_young(&self, start: Hva, end: Hva) -> bool;
    /// True if the page containing `addr` is young; changes nothing.
    fn test_young(&self, addr: Hva) -> bool;
    /// The address space is going away: drop every mapping.
    fn release(&self);
}

/// The handle returned by [`super::HostMm::register_notifier`].
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub struct NotifierId(u64);

impl NotifierId {
    /// The raw id (unique per [`super::HostMm`]).
    pub const fn raw(self) -> u64 {
        self.0
    }
}

/// One registered subscriber.
pub(crate) type Subscriber = (NotifierId, Arc<dyn MmuNotifier>);

/// The subscriber list: an immutable snapshot replaced on every (un)registration.
pub(crate) struct NotifierList {
    current: RwLock<Arc<[Subscriber]>>,
    next_id: AtomicU64,
}

impl NotifierList {
    pub(crate) fn new() -> NotifierList {
        NotifierList {
            current: RwLock::new(Arc::from(Vec::new())),
            next_id: AtomicU64::new(1),
        }
    }

    /// The subscribers now (invariant 1: use one snapshot for a whole start/end pair).
    pub(crate) fn snapshot(&self) -> Arc<[Subscriber]> {
        self.current.read().clone()
    }

    /// Adds a subscriber.
    pub(crate) fn register(&self, n: Arc<dyn MmuNotifier>) -> NotifierId {
        // ORDERING: Relaxed: ids only need to be unique.
        let id = NotifierId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let mut cur = self.current.write();
        let mut v: Vec<Subscriber> = cur.iter().cloned().collect();
        v.push((id, n));
        *cur = Arc::from(v);
        id
    }

    /// Removes a subscriber; false if `id` is not registered.
    pub(crate) fn unregister(&self, id: NotifierId) -> bool {
        let mut cur = self.current.write();
        if !cur.iter().any(|(i, _)| *i == id) {
            return false;
        }
        let v: Vec<Subscriber> = cur.iter().filter(|(i, _)| *i != id).cloned().collect();
        *cur = Arc::from(v);
        true
    }

    /// Removes every subscriber and returns them.
    pub(crate) fn take_all(&self) -> Arc<[Subscriber]> {
        core::mem::replace(&mut *self.current.write(), Arc::from(Vec::new()))
    }

    /// Number of subscribers now.
    pub(crate) fn len(&self) -> usize {
        self.current.read().len()
    }
}
