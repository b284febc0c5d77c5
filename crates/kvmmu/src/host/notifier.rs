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
//! - `clear_young_bitmap` ages a whole range in one call and answers per page: it sets (ORs in)
//!   the bit of every page of a [`YoungBitmap`] that was young and never clears a bit, so one
//!   bitmap collects the host's young bits and every subscriber's (what an MGLRU aging pass
//!   needs; `clear_young` can only answer one bool per range).
//! - `release` means the address space is going away: drop every mapping.
//!
//! Invariants kept by [`NotifierList`]:
//! 1. A start/end pair is delivered to the same set of subscribers: both come from one snapshot,
//!    so an unregister between them still delivers the end (the snapshot keeps the subscriber
//!    alive), and a subscriber registered in between sees neither.
//! 2. Calls are made with no lock of the list held, so a callback may (un)register without
//!    deadlocking on the list itself (see the `host` module doc for what callbacks may call).
//! 3. A pair stays balanced even if a callback panics ([`InvalidationPair`]): every subscriber
//!    whose `invalidate_range_start` returned gets its `invalidate_range_end`, during the
//!    unwinding if need be. A subscriber whose own start panics gets no end (as Linux calls no end
//!    for a subscriber whose start failed); it must leave itself balanced.

use super::{HostError, TASK_SIZE};
use crate::addr::{Hva, PAGE_SHIFT, PAGE_SIZE};
use crate::sync::atomic::{AtomicU64, Ordering};
use crate::sync::srcu::{Srcu, SrcuCell};
use crate::sync::{Arc, Mutex};

/// Why a range is being invalidated (`enum mmu_notifier_event`, reduced).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum InvalidateEvent {
    /// The range is unmapped (`munmap`, process exit).
    Unmap,
    /// The range's protection changes (`mprotect`).
    Protect,
    /// The range's pages are discarded and will read as zero (`madvise(MADV_DONTNEED)`).
    DontNeed,
    /// Reclaim writes the range's pages to swap and unmaps them (`try_to_unmap`, Linux's
    /// `MMU_NOTIFY_CLEAR`); the next access refaults them with their contents.
    Reclaim,
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
    /// Clears the accessed state of every page of `young`'s range without a flush, and sets the
    /// bit of every page that was young (the per-page form of [`MmuNotifier::clear_young`], for
    /// an aging pass over a whole range).
    ///
    /// Contract: bits are only **set**, never cleared: the caller ORs the host's young bits and
    /// every subscriber's answer into one bitmap. A page this subscriber does not map is simply
    /// left alone. Afterwards no page of the range is young in this subscriber, unless accessed
    /// again meanwhile; "some bit set by this call" agrees with what `clear_young` over the range
    /// would have returned.
    ///
    /// The default implementation calls [`MmuNotifier::clear_young`] once per page, so every
    /// subscriber is correct; a subscriber that can walk a range should override it with one walk.
    fn clear_young_bitmap(&self, young: &mut YoungBitmap) {
        for i in 0..young.pages() {
            let Some(page) = young.page_hva(i) else { break };
            // Cannot overflow: the bitmap's end fits (YoungBitmap invariant).
            let end = Hva::new(page.raw() + PAGE_SIZE);
            if self.clear_young(page, end) {
                young.set_page(i);
            }
        }
    }
    /// The address space is going away: drop every mapping.
    fn release(&self);
}

/// Young state of a page-aligned host range, one bit per 4 KiB page: bit `i` is the page at
/// `start + i * PAGE_SIZE` (bit `i % 64` of word `i / 64`). Filled by
/// [`MmuNotifier::clear_young_bitmap`] and [`super::HostMm::clear_young_range`].
///
/// Invariants: `start` is page aligned, `start + pages * PAGE_SIZE` does not overflow, and no bit
/// at or beyond `pages` is ever set (so [`YoungBitmap::count`] and the words are exact).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct YoungBitmap {
    start: Hva,
    pages: u64,
    words: Vec<u64>,
}

impl YoungBitmap {
    /// The most pages a bitmap covers: the user address space ([`super::TASK_SIZE`]).
    pub const MAX_PAGES: u64 = TASK_SIZE >> PAGE_SHIFT;

    /// An all-clear bitmap of `pages` pages starting at `start`.
    ///
    /// The range must lie below [`super::TASK_SIZE`] (so the bitmap is at most
    /// [`YoungBitmap::MAX_PAGES`] / 8 bytes), and its storage is allocated fallibly: a bad range
    /// is a typed error, never an abort.
    ///
    /// Errors: [`HostError::Unaligned`] if `start` is not page aligned, [`HostError::Overflow`] if
    /// the range's end does not fit in an address, [`HostError::OutOfRange`] if it ends above
    /// [`super::TASK_SIZE`], [`HostError::NoMemory`] if the bitmap cannot be allocated.
    pub fn new(start: Hva, pages: u64) -> Result<YoungBitmap, HostError> {
        let mut b = YoungBitmap {
            start: Hva::new(0),
            pages: 0,
            words: Vec::new(),
        };
        b.reset(start, pages)?;
        Ok(b)
    }

    /// Makes this bitmap cover `pages` pages from `start`, all clear, reusing its storage (an
    /// aging loop over chunks allocates once). On error nothing changed.
    ///
    /// Errors: as [`YoungBitmap::new`].
    pub fn reset(&mut self, start: Hva, pages: u64) -> Result<(), HostError> {
        let len = pages.checked_mul(PAGE_SIZE);
        if !start.is_page_aligned() {
            return Err(HostError::Unaligned {
                hva: start,
                len: len.unwrap_or(u64::MAX),
            });
        }
        let overflow = HostError::Overflow {
            hva: start,
            len: len.unwrap_or(u64::MAX),
        };
        let Some(len) = len else {
            return Err(overflow);
        };
        let Some(end) = start.checked_add(len) else {
            return Err(overflow);
        };
        // Bounded by the user address space before anything is sized by it.
        if end.raw() > TASK_SIZE {
            return Err(HostError::OutOfRange { hva: start, len });
        }
        let Ok(words) = usize::try_from(pages.div_ceil(64)) else {
            return Err(overflow);
        };
        if words > self.words.capacity() {
            let mut fresh: Vec<u64> = Vec::new();
            fresh
                .try_reserve_exact(words)
                .map_err(|_| HostError::NoMemory {
                    bytes: pages.div_ceil(64) * 8,
                })?;
            self.words = fresh;
        }
        self.words.clear();
        self.words.resize(words, 0);
        self.start = start;
        self.pages = pages;
        Ok(())
    }

    /// Clears every bit, keeping the range.
    pub fn clear(&mut self) {
        self.words.fill(0);
    }

    /// The first page of the range.
    pub fn start(&self) -> Hva {
        self.start
    }

    /// One past the last byte of the range.
    pub fn end(&self) -> Hva {
        // Cannot overflow (invariant).
        Hva::new(self.start.raw() + (self.pages << PAGE_SHIFT))
    }

    /// Number of pages (bits) in the range.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The address of page `i` of the range, or `None` if `i >= pages`.
    pub fn page_hva(&self, i: u64) -> Option<Hva> {
        // Cannot overflow for i < pages (invariant).
        (i < self.pages).then(|| Hva::new(self.start.raw() + (i << PAGE_SHIFT)))
    }

    /// The index of the page containing `hva`, or `None` outside the range.
    #[inline]
    pub fn index_of(&self, hva: Hva) -> Option<u64> {
        let i = hva.raw().checked_sub(self.start.raw())? >> PAGE_SHIFT;
        (i < self.pages).then_some(i)
    }

    /// Sets bit `i` (page `i` was young); an index outside the range is ignored.
    #[inline]
    pub fn set_page(&mut self, i: u64) {
        if i < self.pages {
            self.words[(i / 64) as usize] |= 1 << (i % 64);
        }
    }

    /// Sets the bits of the `pages` pages from the one containing `hva`, clipped to the range
    /// (a young huge mapping makes every page it covers young).
    #[inline]
    pub fn set_hva_pages(&mut self, hva: Hva, pages: u64) {
        let first = hva.page();
        let start = self.start.page();
        let lo = first.max(start);
        let hi = first.saturating_add(pages).min(start + self.pages);
        for p in lo..hi {
            self.set_page(p - start);
        }
    }

    /// True if page `i` is young (false outside the range).
    pub fn is_young(&self, i: u64) -> bool {
        i < self.pages && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// True if any page is young.
    pub fn any(&self) -> bool {
        self.words.iter().any(|w| *w != 0)
    }

    /// Number of young pages.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// The indexes of the young pages, ascending.
    pub fn young_pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(wi, &w)| {
            let base = wi as u64 * 64;
            let mut w = w;
            core::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = w.trailing_zeros();
                w &= w - 1;
                Some(base + u64::from(b))
            })
        })
    }

    /// The raw words (bit `i % 64` of word `i / 64` is page `i`).
    pub fn words(&self) -> &[u64] {
        &self.words
    }
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

/// One invalidation delivered to one snapshot of subscribers (invariants 1 and 3).
///
/// [`InvalidationPair::start`] calls the subscribers' `invalidate_range_start` in order;
/// [`InvalidationPair::end`] (or dropping the pair, e.g. while unwinding from a panic in a later
/// start or in the host's change) calls `invalidate_range_end` on exactly those whose start
/// returned, once each, in the same order.
#[must_use = "dropping the pair ends the invalidation at once"]
pub(crate) struct InvalidationPair<'a> {
    subs: Arc<Vec<Subscriber>>,
    range: NotifierRange,
    /// Subscribers `[0, started)` returned from their start.
    started: usize,
    /// Subscribers `[0, ended)` have been called for their end (`ended <= started`).
    ended: usize,
    ends: &'a AtomicU64,
}

impl<'a> InvalidationPair<'a> {
    /// Calls `invalidate_range_start` on every subscriber of `subs`, counting each call that
    /// returns in `starts`; `ends` will count the end calls. If a start panics, the ends of the
    /// subscribers started before it run as the panic unwinds.
    pub(crate) fn start(
        subs: Arc<Vec<Subscriber>>,
        range: NotifierRange,
        starts: &AtomicU64,
        ends: &'a AtomicU64,
    ) -> InvalidationPair<'a> {
        let mut pair = InvalidationPair {
            subs,
            range,
            started: 0,
            ended: 0,
            ends,
        };
        while pair.started < pair.subs.len() {
            pair.subs[pair.started]
                .1
                .invalidate_range_start(&pair.range);
            pair.started += 1;
            // ORDERING: Relaxed: a statistic.
            starts.fetch_add(1, Ordering::Relaxed);
        }
        pair
    }

    /// Calls `invalidate_range_end` on every started subscriber (the change is complete).
    pub(crate) fn end(mut self) {
        self.end_remaining();
    }

    /// Ends the started subscribers not ended yet. `ended` advances before each call, so if an
    /// end panics outside an unwinding, the drop glue goes on with the next subscriber.
    fn end_remaining(&mut self) {
        while self.ended < self.started {
            let i = self.ended;
            self.ended += 1;
            self.subs[i].1.invalidate_range_end(&self.range);
            // ORDERING: Relaxed: a statistic.
            self.ends.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for InvalidationPair<'_> {
    fn drop(&mut self) {
        self.end_remaining();
    }
}

/// The subscriber list: an immutable snapshot replaced on every (un)registration, published
/// under the list's own SRCU domain (Linux's `mmu_notifier` SRCU).
///
/// Protocol: readers (aging, per call) enter an SRCU read section and iterate the current
/// snapshot in place, writing only their SRCU stripe — no shared reference count, no shared
/// lock word (the statistics rule of `docs/invariants.md`, striped counters). An invalidation
/// pair clones the snapshot's `Arc` instead, so its start and end reach the same subscribers
/// (invariant 1) however long the host change in between takes. Writers serialize on `writer`,
/// publish a new snapshot and wait for a grace period before dropping the old one, so when
/// `unregister` returns no aging call still runs on the removed subscriber. A writer must not
/// be inside a read section of this list (a callback must not register or unregister).
pub(crate) struct NotifierList {
    srcu: Srcu,
    current: SrcuCell<Vec<Subscriber>>,
    writer: Mutex<()>,
    next_id: AtomicU64,
}

impl NotifierList {
    pub(crate) fn new() -> NotifierList {
        NotifierList {
            srcu: Srcu::new(),
            current: SrcuCell::new(Arc::new(Vec::new())),
            writer: Mutex::new(()),
            next_id: AtomicU64::new(1),
        }
    }

    /// The subscribers now, as a snapshot an invalidation pair keeps for its start and end
    /// (invariant 1).
    pub(crate) fn snapshot(&self) -> Arc<Vec<Subscriber>> {
        self.current.current()
    }

    /// Calls `f` on every subscriber of the current snapshot, inside an SRCU read section (no
    /// shared cache line is written); returns how many were called.
    pub(crate) fn for_each(&self, mut f: impl FnMut(&dyn MmuNotifier)) -> usize {
        let guard = self.srcu.read_lock();
        let subs = self.current.load(&guard);
        for (_, n) in subs.iter() {
            f(&**n);
        }
        subs.len()
    }

    /// Publishes `next` and waits until no reader can still see the old snapshot.
    fn publish(&self, next: Vec<Subscriber>) -> Arc<Vec<Subscriber>> {
        self.current.replace(Arc::new(next), &self.srcu).wait()
    }

    /// Adds a subscriber.
    pub(crate) fn register(&self, n: Arc<dyn MmuNotifier>) -> NotifierId {
        // ORDERING: Relaxed: ids only need to be unique.
        let id = NotifierId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let _w = self.writer.lock();
        let mut v: Vec<Subscriber> = (*self.current.current()).clone();
        v.push((id, n));
        drop(self.publish(v));
        id
    }

    /// Removes a subscriber; false if `id` is not registered. When it returns, no aging call
    /// runs on the subscriber any more (an invalidation pair that started before still ends).
    pub(crate) fn unregister(&self, id: NotifierId) -> bool {
        let _w = self.writer.lock();
        let cur = self.current.current();
        if !cur.iter().any(|(i, _)| *i == id) {
            return false;
        }
        let v: Vec<Subscriber> = cur.iter().filter(|(i, _)| *i != id).cloned().collect();
        drop(cur);
        drop(self.publish(v));
        true
    }

    /// Removes every subscriber and returns them.
    pub(crate) fn take_all(&self) -> Arc<Vec<Subscriber>> {
        let _w = self.writer.lock();
        self.publish(Vec::new())
    }

    /// Number of subscribers now.
    pub(crate) fn len(&self) -> usize {
        self.current.current().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: u64 = 0x10_0000_0000;

    fn hva(page: u64) -> Hva {
        Hva::new(BASE + page * PAGE_SIZE)
    }

    #[test]
    fn bitmap_bits_map_to_pages_and_are_clipped_to_the_range() {
        let mut b = YoungBitmap::new(hva(0), 130).unwrap();
        assert_eq!((b.pages(), b.words().len()), (130, 3));
        assert_eq!(b.end(), hva(130));
        assert_eq!((b.page_hva(129), b.page_hva(130)), (Some(hva(129)), None));
        assert!(!b.any());
        b.set_page(0);
        b.set_page(64);
        b.set_page(129);
        b.set_page(130); // outside: ignored, so the words stay exact
        b.set_page(u64::MAX);
        assert_eq!(b.young_pages().collect::<Vec<_>>(), vec![0, 64, 129]);
        assert_eq!(b.count(), 3);
        assert!(b.is_young(64) && !b.is_young(63) && !b.is_young(130));
        assert_eq!(b.index_of(Hva::new(BASE + 5 * PAGE_SIZE + 17)), Some(5));
        assert_eq!(b.index_of(Hva::new(BASE - 1)), None);
        assert_eq!(b.index_of(hva(130)), None);
        b.clear();
        // A huge mapping that straddles both ends sets only the pages inside the range.
        b.set_hva_pages(Hva::new(BASE - 2 * PAGE_SIZE), 4);
        b.set_hva_pages(hva(128), 512);
        assert_eq!(b.young_pages().collect::<Vec<_>>(), vec![0, 1, 128, 129]);
    }

    #[test]
    fn bitmap_refuses_unaligned_and_overflowing_ranges_and_reset_keeps_it_on_error() {
        assert!(matches!(
            YoungBitmap::new(Hva::new(BASE + 1), 1),
            Err(HostError::Unaligned { .. })
        ));
        assert!(matches!(
            YoungBitmap::new(Hva::new(!(PAGE_SIZE - 1)), 2),
            Err(HostError::Overflow { .. })
        ));
        assert!(matches!(
            YoungBitmap::new(hva(0), u64::MAX),
            Err(HostError::Overflow { .. })
        ));
        let mut b = YoungBitmap::new(hva(0), 8).unwrap();
        b.set_page(3);
        assert!(b.reset(Hva::new(BASE + 8), 8).is_err());
        assert!(matches!(
            b.reset(hva(0), 1 << 40),
            Err(HostError::OutOfRange { .. })
        ));
        assert_eq!((b.start(), b.pages(), b.count()), (hva(0), 8, 1));
        b.reset(hva(64), 70).unwrap();
        assert_eq!((b.start(), b.pages(), b.count()), (hva(64), 70, 0));
    }

    #[test]
    fn bitmap_over_a_huge_range_is_a_typed_error_and_changes_nothing() {
        // 2^50 pages: the end fits in an address, the bitmap (128 TiB) must not be attempted.
        assert!(matches!(
            YoungBitmap::new(hva(0), 1 << 50),
            Err(HostError::OutOfRange { .. })
        ));
        assert!(matches!(
            YoungBitmap::new(Hva::new(TASK_SIZE - PAGE_SIZE), 2),
            Err(HostError::OutOfRange { .. })
        ));
        let mut b = YoungBitmap::new(hva(0), 100).unwrap();
        b.set_page(99);
        let before = b.clone();
        assert!(b.reset(hva(0), 1 << 50).is_err());
        assert_eq!(b, before, "a refused reset keeps range, bits and storage");
        assert_eq!(YoungBitmap::MAX_PAGES, TASK_SIZE / PAGE_SIZE);
    }

    /// Young on the pages in `young`; counts `clear_young` calls; keeps the default
    /// `clear_young_bitmap`.
    struct PerPage {
        young: Vec<u64>,
        calls: AtomicU64,
    }

    impl MmuNotifier for PerPage {
        fn invalidate_range_start(&self, _: &NotifierRange) {}
        fn invalidate_range_end(&self, _: &NotifierRange) {}
        fn clear_flush_young(&self, start: Hva, end: Hva) -> bool {
            self.clear_young(start, end)
        }
        fn clear_young(&self, start: Hva, end: Hva) -> bool {
            // ORDERING: Relaxed: a test counter read on the same thread.
            self.calls.fetch_add(1, Ordering::Relaxed);
            self.young.iter().any(|&p| hva(p) >= start && hva(p) < end)
        }
        fn test_young(&self, addr: Hva) -> bool {
            self.young.contains(&((addr.raw() - BASE) / PAGE_SIZE))
        }
        fn release(&self) {}
    }

    #[test]
    fn default_clear_young_bitmap_asks_per_page_and_only_sets_bits() {
        let n = PerPage {
            young: vec![1, 5, 70],
            calls: AtomicU64::new(0),
        };
        let mut b = YoungBitmap::new(hva(0), 72).unwrap();
        b.set_page(2); // set by the host or another subscriber: must survive
        n.clear_young_bitmap(&mut b);
        assert_eq!(b.young_pages().collect::<Vec<_>>(), vec![1, 2, 5, 70]);
        // ORDERING: Relaxed: same thread.
        assert_eq!(n.calls.load(Ordering::Relaxed), 72, "one call per page");
    }
}
