//! The process address space: VMAs, host PTEs, GUP, mmap/munmap/mprotect/madvise, aging.
//!
//! See the `host` module doc for the locking protocol and its invariants (cited here as H1–H7).

use super::frames::{FrameArena, FrameTag};
use super::huge::{HugeMode, HugeState, marker_level, split_cut};
use super::notifier::{
    InvalidateEvent, InvalidationPair, MmuNotifier, NotifierId, NotifierList, NotifierRange,
};
use super::reclaim::Reclaim;
use super::swap::swap_slot;
use super::vma::{Vma, Vmas, page_hva, pte, pte_frame};
use super::zap::zap_ptes;
use super::{GupError, HostError};
use crate::addr::{Hva, Level, PAGE_SHIFT, Pfn, is_page_aligned};
use crate::sync::atomic::{AtomicU64, Ordering};
use crate::sync::guest_mode;
use crate::sync::percpu::StripedCounter;
use crate::sync::{Arc, Mutex, RwLock};
use core::ops::ControlFlow;

/// Lowest mappable address (Linux's default `mmap_min_addr`).
pub const MMAP_MIN_ADDR: u64 = 0x1_0000;
/// One past the highest mappable address (8 TiB; every page's number fits a [`FrameTag`]).
pub const TASK_SIZE: u64 = 1 << 43;
/// Where [`HostMm::mmap`] starts looking for free address space.
const MMAP_BASE: u64 = 1 << 32;
/// Pages left unmapped on both sides of an [`HostMm::mmap`] placement.
const GUARD_PAGES: u64 = 1;
/// Mappings of at least 2 MiB are placed 2 MiB aligned (so a secondary MMU may map them huge).
const HUGE_PAGES: u64 = 512;

bitflags::bitflags! {
    /// Protection of a mapping (`PROT_*`).
    #[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
    pub struct Prot: u32 {
        /// Readable.
        const READ = 1;
        /// Writable (on x86 this implies readable).
        const WRITE = 2;
    }
}

/// Configuration of a [`HostMm`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct HostConfig {
    /// Frames of simulated physical memory (4 KiB each).
    pub frames: usize,
}

impl Default for HostConfig {
    /// 1 GiB of simulated physical memory.
    fn default() -> Self {
        HostConfig { frames: 1 << 18 }
    }
}

/// What [`HostMm::get_user_page`] returns: the frame backing a page, pinned by nothing (like
/// KVM's use of GUP results, validity is guaranteed by the invalidation protocol, not a refcount).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct GupPage {
    /// The frame.
    pub pfn: Pfn,
    /// The frame's tag at the time of the lookup.
    pub tag: FrameTag,
    /// Whether the mapping allows writes.
    pub writable: bool,
    /// The host mapping level of the page (`host_pfn_mapping_level`): 2M or 1G when a huge page
    /// backs it, whose frames are contiguous and aligned (`pfn` is the frame of this 4K page).
    pub level: Level,
}

/// A snapshot of one host PTE (for tests and oracles).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct HostPte {
    /// The frame (0 when not present).
    pub pfn: Pfn,
    /// The frame's tag ([`FrameTag::FREE`] when not present).
    pub tag: FrameTag,
    /// A frame backs the page.
    pub present: bool,
    /// The mapping allows writes.
    pub writable: bool,
    /// Accessed since the last clear.
    pub young: bool,
    /// Written since faulted in.
    pub dirty: bool,
    /// The page was evicted: its contents are in a swap slot and the next access refaults it.
    pub swapped: bool,
    /// The host mapping level (4K, or the huge page backing it).
    pub level: Level,
}

/// Counters of host operations (successful ones, except `gup` which counts every call).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct HostStats {
    /// Successful `mmap` and `mmap_fixed` calls.
    pub mmap: u64,
    /// Successful `munmap` calls.
    pub munmap: u64,
    /// Successful `mprotect` calls.
    pub mprotect: u64,
    /// Successful `madvise_dontneed` calls.
    pub dontneed: u64,
    /// `get_user_page` calls, including those made by `read_u64` / `write_u64`.
    pub gup: u64,
    /// `invalidate_range_start` calls made (one per subscriber per pair).
    pub invalidate_start: u64,
    /// `invalidate_range_end` calls made.
    pub invalidate_end: u64,
    /// Aging callback calls made (`clear_young`, `clear_flush_young`, `test_young`).
    pub aging_calls: u64,
    /// `release` callback calls made.
    pub release_calls: u64,
    /// Subscribers registered now.
    pub subscribers: u64,
    /// Bytes of host page tables allocated now. Tables are allocated when a page of their span
    /// is first faulted in and freed by `munmap`, so mapping, zapping or aging an untouched
    /// range never grows this.
    pub page_table_bytes: u64,
    /// Huge pages faulted in whole (THP and hugetlb).
    pub huge_faults: u64,
    /// THPs split because an operation's range cut them.
    pub thp_splits: u64,
    /// 2 MiB spans collapsed into THPs (`HostMm::collapse`).
    pub thp_collapses: u64,
}

#[derive(Default)]
pub(super) struct Counters {
    mmap: AtomicU64,
    munmap: AtomicU64,
    mprotect: AtomicU64,
    dontneed: AtomicU64,
    pub(super) gup: StripedCounter,
    pub(super) invalidate_start: AtomicU64,
    pub(super) invalidate_end: AtomicU64,
    /// Striped: bumped by every aging call, from any number of agers at once.
    pub(super) aging_calls: StripedCounter,
    release_calls: AtomicU64,
    pub(super) huge_faults: AtomicU64,
    thp_splits: AtomicU64,
    pub(super) thp_collapses: AtomicU64,
}

impl Counters {
    pub(super) fn bump(c: &AtomicU64, n: u64) {
        // ORDERING: Relaxed: statistics, no data published through them.
        c.fetch_add(n, Ordering::Relaxed);
    }
}

pub(super) struct Inner {
    pub(super) arena: FrameArena,
    /// Serialises structural operations; held across invalidation callbacks (H1, H7).
    pub(super) mm_writer: Mutex<()>,
    /// VMAs and host PTEs; never held across a subscriber callback (H7).
    pub(super) mmap_lock: RwLock<Vmas>,
    pub(super) notifiers: NotifierList,
    pub(super) counters: Counters,
    /// Memory limit, swap and generations (`reclaim` module).
    pub(super) reclaim: Reclaim,
    /// The huge-fault mutex (`huge.rs`), inside `mmap_lock` read and `mm_writer`.
    pub(super) huge: Mutex<HugeState>,
}

/// The simulated process address space (the primary MMU). Cheap to clone: clones share it.
#[derive(Clone)]
pub struct HostMm {
    pub(super) inner: Arc<Inner>,
}

impl core::fmt::Debug for HostMm {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("HostMm")
            .field("stats", &self.stats())
            .finish()
    }
}

/// Validates a page range and converts it to pages `[start, end)`.
pub(super) fn page_range(hva: Hva, len: u64) -> Result<(u64, u64), HostError> {
    if len == 0 {
        return Err(HostError::ZeroLength);
    }
    if !hva.is_page_aligned() || !is_page_aligned(len) {
        return Err(HostError::Unaligned { hva, len });
    }
    let end = hva
        .raw()
        .checked_add(len)
        .ok_or(HostError::Overflow { hva, len })?;
    if hva.raw() < MMAP_MIN_ADDR || end > TASK_SIZE {
        return Err(HostError::OutOfRange { hva, len });
    }
    Ok((hva.page(), end >> PAGE_SHIFT))
}

/// Checks that a validated range is fully mapped.
pub(super) fn check_mapped(vmas: &Vmas, s: u64, e: u64) -> Result<(), HostError> {
    match vmas.first_hole(s, e) {
        Some(p) => Err(HostError::NotMapped { hva: page_hva(p) }),
        None => Ok(()),
    }
}

/// True if some page of `[s, e)` in a VMA accepted by `filter` is present. Visits only the
/// allocated leaves of the host page table: an untouched range costs nothing.
fn any_present(vmas: &Vmas, s: u64, e: u64, filter: impl Fn(&Vma) -> bool) -> bool {
    vmas.overlapping(s, e).filter(|v| filter(v)).any(|v| {
        let found = vmas
            .pt
            .for_each_leaf(s.max(v.start), e.min(v.end), |_, ptes| {
                // ORDERING: Relaxed: under mmap_lock write no PTE changes concurrently (H3).
                if ptes
                    .iter()
                    .any(|w| w.load(Ordering::Relaxed) & pte::PRESENT != 0)
                {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            });
        found.is_break()
    })
}

impl HostMm {
    /// Creates an empty address space over a fresh frame arena.
    pub fn new(cfg: HostConfig) -> Result<HostMm, HostError> {
        Ok(HostMm {
            inner: Arc::new(Inner {
                arena: FrameArena::new(cfg.frames)?,
                mm_writer: Mutex::new(()),
                mmap_lock: RwLock::new(Vmas::default()),
                notifiers: NotifierList::new(),
                counters: Counters::default(),
                reclaim: Reclaim::default(),
                huge: Mutex::new(HugeState::default()),
            }),
        })
    }

    /// The simulated physical memory.
    pub fn arena(&self) -> &FrameArena {
        &self.inner.arena
    }

    /// Backs the whole frame arena with memory now ([`FrameArena::prefault`]): for measurements
    /// that should not include the simulator's own first-touch page faults.
    pub fn prefault(&self) -> Result<(), HostError> {
        self.inner.arena.prefault()
    }

    /// Maps `len` bytes of lazily populated anonymous memory at an address of the host's choosing
    /// (page aligned, with unmapped guard pages around it, 2 MiB aligned if `len >= 2 MiB`).
    pub fn mmap(&self, len: u64, prot: Prot) -> Result<Hva, HostError> {
        guest_mode::check("mmap")?;
        if len == 0 {
            return Err(HostError::ZeroLength);
        }
        if !is_page_aligned(len) {
            return Err(HostError::Unaligned {
                hva: Hva::new(0),
                len,
            });
        }
        let npages = len >> PAGE_SHIFT;
        let align = if npages >= HUGE_PAGES { HUGE_PAGES } else { 1 };
        self.mmap_vma(len, align, Vma::new(0, 0, prot))
    }

    /// Places `proto` (its bounds ignored) over `len` bytes (page aligned, non-zero) of free
    /// address space starting at a multiple of `align` pages.
    pub(super) fn mmap_vma(&self, len: u64, align: u64, proto: Vma) -> Result<Hva, HostError> {
        let npages = len >> PAGE_SHIFT;
        let _w = self.inner.mm_writer.lock();
        let mut vmas = self.inner.mmap_lock.write();
        let start = vmas
            .find_gap(
                npages,
                MMAP_BASE >> PAGE_SHIFT,
                TASK_SIZE >> PAGE_SHIFT,
                GUARD_PAGES,
                align,
            )
            .ok_or(HostError::AddressSpaceExhausted)?;
        vmas.insert(Vma {
            start,
            end: start + npages,
            ..proto
        });
        Counters::bump(&self.inner.counters.mmap, 1);
        Ok(page_hva(start))
    }

    /// Runs `f` on the VMAs under `mm_writer` and `mmap_lock` write, for a change that removes
    /// or changes no present PTE (so it needs no invalidation, H1).
    pub(super) fn with_vmas_write<R>(&self, f: impl FnOnce(&mut Vmas) -> R) -> R {
        let _w = self.inner.mm_writer.lock();
        let mut vmas = self.inner.mmap_lock.write();
        f(&mut vmas)
    }

    /// Maps `len` bytes at exactly `hva`; fails with [`HostError::Overlaps`] if any page of the
    /// range is already mapped (unlike Linux's `MAP_FIXED`, nothing is replaced).
    pub fn mmap_fixed(&self, hva: Hva, len: u64, prot: Prot) -> Result<Hva, HostError> {
        guest_mode::check("mmap_fixed")?;
        let (s, e) = page_range(hva, len)?;
        let _w = self.inner.mm_writer.lock();
        let mut vmas = self.inner.mmap_lock.write();
        if let Some(v) = vmas.first_overlap(s, e) {
            return Err(HostError::Overlaps {
                hva,
                len,
                existing: page_hva(v.start),
            });
        }
        vmas.insert(Vma::new(s, e, prot));
        Counters::bump(&self.inner.counters.mmap, 1);
        Ok(hva)
    }

    /// Runs a structural change of `[s, e)` under the invalidation protocol (H1, H2, H4, H7).
    ///
    /// `validate` checks the request against the VMAs (an error returns before any notifier
    /// call); `needs_notify` says whether the change touches a present PTE; `apply` performs it
    /// under `mmap_lock` write. When no notification is needed, check and change happen in one
    /// write-locked section, so no GUP can slip a present page in between. Otherwise the lock is
    /// dropped for the start callbacks and retaken; pages a concurrent GUP faults in meanwhile
    /// lie in the range whose start was already delivered (the secondary MMU's retry protocol,
    /// spec §3.3, keeps it from mapping them).
    pub(super) fn change_range(
        &self,
        (s, e): (u64, u64),
        event: InvalidateEvent,
        validate: impl Fn(&Vmas) -> Result<(), HostError>,
        needs_notify: impl Fn(&Vmas) -> bool,
        apply: impl FnOnce(&mut Vmas, &FrameArena),
    ) -> Result<(), HostError> {
        let inner = &*self.inner;
        let _w = inner.mm_writer.lock();
        // Clears the in-flight range (huge.rs) however this function is left.
        struct Inflight<'a>(&'a HostMm);
        impl Drop for Inflight<'_> {
            fn drop(&mut self) {
                self.0.set_inflight(None);
            }
        }
        // Every subscriber whose start returned gets its end when `notified` goes, even if a
        // callback (or `apply`) panics: the pair stays balanced (DESIGN invariant 1).
        let mut notified: Option<InvalidationPair<'_>> = None;
        let mut inflight: Option<Inflight<'_>> = None;
        let result = loop {
            let mut vmas = inner.mmap_lock.write();
            if let Err(err) = validate(&vmas) {
                break Err(err);
            }
            // A range cutting a THP invalidates (and splits) the THP's whole 2 MiB; one cutting a
            // hugetlb page is refused before anything changed (huge.rs).
            let (ns, ne) = match HostMm::widen_for_split(&vmas, (s, e)) {
                Ok(r) => r,
                Err(err) => break Err(err),
            };
            if notified.is_none() && needs_notify(&vmas) {
                // Recorded before `mmap_lock` is dropped: no huge-page fault-in (which runs
                // under `mmap_lock` read) can slip a THP reaching into the range in between.
                self.set_inflight(Some((ns, ne)));
                inflight = Some(Inflight(self));
                drop(vmas);
                let range = NotifierRange {
                    start: page_hva(ns),
                    end: page_hva(ne),
                    event,
                    blockable: true,
                };
                notified = Some(InvalidationPair::start(
                    inner.notifiers.snapshot(),
                    range,
                    &inner.counters.invalidate_start,
                    &inner.counters.invalidate_end,
                ));
                continue;
            }
            // Split only under a started invalidation (whose range covered the THPs); with no
            // present page changing nothing is cut.
            if notified.is_some() {
                let splits = split_cut(&vmas.pt, s, e);
                Counters::bump(&inner.counters.thp_splits, splits);
                // A split THP's frames become 4K pages, which a later zap uncharges one by one:
                // charge them now (huge pages are not charged while whole; see `zap_ptes`).
                inner
                    .reclaim
                    .charge_forced(splits * super::frames::RUN_2M as u64);
            }
            apply(&mut vmas, &inner.arena);
            break Ok(());
        };
        if let Some(pair) = notified {
            pair.end();
        }
        drop(inflight);
        result
    }

    /// Unmaps `[hva, hva + len)`, which must be fully mapped; frees its frames.
    ///
    /// Errors (nothing changed, nobody called): [`HostError::ZeroLength`],
    /// [`HostError::Unaligned`], [`HostError::Overflow`], [`HostError::OutOfRange`],
    /// [`HostError::NotMapped`] (names the first unmapped page of the range),
    /// [`HostError::InGuestMode`] from a thread that holds a vCPU in guest mode (as for every
    /// operation that takes `mm_writer` or ages: it could wait for that vCPU).
    pub fn munmap(&self, hva: Hva, len: u64) -> Result<(), HostError> {
        guest_mode::check("munmap")?;
        let (s, e) = page_range(hva, len)?;
        self.change_range(
            (s, e),
            InvalidateEvent::Unmap,
            |v| check_mapped(v, s, e),
            |v| any_present(v, s, e, |_| true),
            |vmas, arena| {
                vmas.split_at(s);
                vmas.split_at(e);
                vmas.remove_range(s, e);
                zap_ptes(&vmas.pt, s, e, arena, &self.inner.reclaim);
                // Like `free_pgtables`: the range's tables go with it (those still holding a
                // neighbour's PTE stay).
                vmas.pt.prune(s, e);
            },
        )?;
        Counters::bump(&self.inner.counters.munmap, 1);
        Ok(())
    }

    /// Changes the protection of `[hva, hva + len)`, which must be fully mapped.
    pub fn mprotect(&self, hva: Hva, len: u64, prot: Prot) -> Result<(), HostError> {
        guest_mode::check("mprotect")?;
        let (s, e) = page_range(hva, len)?;
        self.change_range(
            (s, e),
            InvalidateEvent::Protect,
            |v| check_mapped(v, s, e),
            |v| any_present(v, s, e, |vma| vma.prot != prot),
            |vmas, _| {
                vmas.split_at(s);
                vmas.split_at(e);
                for v in vmas.range_mut(s, e) {
                    v.prot = prot;
                }
            },
        )?;
        Counters::bump(&self.inner.counters.mprotect, 1);
        Ok(())
    }

    /// Test-only fault injection: changes the protection of `[hva, hva + len)` **without** calling
    /// any subscriber — a host write-protect the secondary MMUs never hear about, breaking H1 on
    /// purpose so that tests can prove their checks catch it (writes through stale writable SPTEs
    /// then land in memory the host made read-only).
    ///
    /// Errors: as [`HostMm::mprotect`].
    #[cfg(feature = "test-hooks")]
    pub fn mprotect_without_notifier(
        &self,
        hva: Hva,
        len: u64,
        prot: Prot,
    ) -> Result<(), HostError> {
        guest_mode::check("mprotect_without_notifier")?;
        let (s, e) = page_range(hva, len)?;
        let _w = self.inner.mm_writer.lock();
        let mut vmas = self.inner.mmap_lock.write();
        check_mapped(&vmas, s, e)?;
        vmas.split_at(s);
        vmas.split_at(e);
        for v in vmas.range_mut(s, e) {
            v.prot = prot;
        }
        Ok(())
    }

    /// Discards the pages of `[hva, hva + len)` (`madvise(MADV_DONTNEED)` on private anonymous
    /// memory): their frames are freed and the next access faults in a zero-filled frame.
    pub fn madvise_dontneed(&self, hva: Hva, len: u64) -> Result<(), HostError> {
        guest_mode::check("madvise_dontneed")?;
        let (s, e) = page_range(hva, len)?;
        // Deliberately broken build (negative differential test in crates/kvmmu-kvm): nothing is
        // zapped or discarded, so the guest keeps reading the old contents.
        if cfg!(feature = "broken-madvise-no-zap") {
            return Ok(());
        }
        self.change_range(
            (s, e),
            InvalidateEvent::DontNeed,
            |v| check_mapped(v, s, e),
            |v| any_present(v, s, e, |_| true),
            // The range was checked to be fully mapped; its tables stay (as in Linux).
            |vmas, arena| zap_ptes(&vmas.pt, s, e, arena, &self.inner.reclaim),
        )?;
        Counters::bump(&self.inner.counters.dontneed, 1);
        Ok(())
    }

    /// GUP with `mmap_lock` held for read: the PTE of `hva`, faulting a zero-filled frame in if
    /// needed, with young (and dirty on write) set.
    #[inline]
    pub(super) fn gup_locked(
        &self,
        vmas: &Vmas,
        hva: Hva,
        write: bool,
    ) -> Result<GupPage, GupError> {
        let page = hva.page();
        let vma = vmas.find(page).ok_or(GupError::NotMapped { hva })?;
        if (write && !vma.writable()) || !vma.readable() {
            return Err(GupError::ProtectionViolation { hva, write });
        }
        let writable = vma.writable();
        let word = vmas.pt.entry_or_alloc(page);
        let want = pte::YOUNG | if write { pte::DIRTY } else { 0 };
        // ORDERING: Acquire pairs with the Release of the CAS that installed the PTE, so the
        // frame's tag and zero fill (done before the CAS) are visible to us and our caller.
        let mut cur = word.load(Ordering::Acquire);
        loop {
            if cur & pte::PRESENT != 0 {
                if cur & want != want {
                    // ORDERING: Relaxed: young/dirty are hints for aging, ordered by nothing;
                    // the PTE stays present with the same frame while we hold the read lock (H3).
                    word.fetch_or(want, Ordering::Relaxed);
                }
                let (pfn, tag) = pte_frame(page, cur);
                // A THP outlives MADV_NOHUGEPAGE: the marker, not the VMA, says.
                let level = marker_level(&vmas.pt, page);
                return Ok(GupPage {
                    pfn,
                    tag,
                    writable,
                    level,
                });
            }
            // R6 (docs/invariants.md): a huge mode only decides how an empty PTE is filled. A swap
            // entry is refaulted as a 4K page below, whatever the VMA's mode (reclaim R3, DESIGN
            // invariant 6): the huge path would install a zero-filled frame over it. No race with
            // the huge path's installers: they write only PTEs they saw 0 under the huge-fault
            // mutex, and under `mmap_lock` read a 0 PTE never becomes a swap entry (eviction takes
            // it for write).
            if vma.huge != HugeMode::None && cur == 0 {
                return self.gup_huge(vmas, vma, hva, write);
            }
            // A frame is needed (first touch, or a refault of a swap entry): charge it to the
            // memory limit first; a refused charge sends the caller to direct reclaim.
            let reclaim = &self.inner.reclaim;
            if !reclaim.try_charge() {
                return Err(GupError::OutOfFrames);
            }
            let (pfn, tag) = match self.inner.arena.alloc(page) {
                Ok(f) => f,
                Err(HostError::OutOfFrames) => {
                    reclaim.uncharge(1);
                    return Err(GupError::OutOfFrames);
                }
                Err(e) => panic!("host invariant H5 violated: mapped page {page:#x}: {e}"),
            };
            let slot = swap_slot(cur);
            if let Some(slot) = slot {
                reclaim.swap_in(&self.inner.arena, pfn, slot);
            }
            let new = pte::encode(pfn.raw(), tag.generation(), want);
            // ORDERING: AcqRel: Release publishes the frame's tag and contents (zero fill or the
            // swapped-in copy) with the PTE; Acquire on failure reads the winner's frame like the
            // load above. A non-present PTE is 0 or a swap entry (vma invariant 2, swap S1), and
            // `cur` is the one we saw, so only the thread that saw it wins.
            match word.compare_exchange(cur, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    reclaim.faulted_in(pfn, slot);
                    return Ok(GupPage {
                        pfn,
                        tag,
                        writable,
                        level: Level::L4K,
                    });
                }
                Err(actual) => {
                    if let Err(e) = self.inner.arena.free(pfn, tag) {
                        panic!("frame arena invariant 1 violated: unpublished frame {pfn}: {e}");
                    }
                    reclaim.uncharge(1);
                    cur = actual;
                }
            }
        }
    }

    /// Get-user-page: the frame backing `hva`, faulting in a zero-filled frame if none; sets the
    /// host young bit (and dirty on `write`).
    ///
    /// Errors: [`GupError::NotMapped`], [`GupError::ProtectionViolation`] (write to a
    /// non-writable mapping, or any access to a `Prot::empty()` one), [`GupError::OutOfFrames`].
    ///
    /// Under a memory limit ([`HostMm::enable_reclaim`]) a page that needs a frame beyond the
    /// limit runs direct reclaim and retries; [`GupError::OutOfFrames`] then means reclaim could
    /// free nothing (the swap device is full, or nothing is evictable): an out-of-memory kill of
    /// the access, with every other page intact.
    #[inline]
    pub fn get_user_page(&self, hva: Hva, write: bool) -> Result<GupPage, GupError> {
        self.inner.counters.gup.add(1);
        self.with_page(hva, write, |_| Ok(()))
            .map(|(p, ())| p)
            .map_err(|e| match e {
                HostError::Gup(g) => g,
                _ => GupError::OutOfFrames,
            })
    }

    /// Subscribes a secondary MMU. Waits for any invalidation in flight, so the new subscriber
    /// never sees an `invalidate_range_end` without its start (H6).
    ///
    /// # Panics
    /// From a thread that holds a vCPU in guest mode (it could wait for an invalidation that waits
    /// for that vCPU), before anything changed.
    pub fn register_notifier(&self, n: Arc<dyn MmuNotifier>) -> NotifierId {
        guest_mode::refuse("register_notifier");
        let _w = self.inner.mm_writer.lock();
        self.inner.notifiers.register(n)
    }

    /// Unsubscribes; false if `id` is not subscribed. An invalidation pair already started on it
    /// still delivers its end (H6), and an aging call that took its subscriber snapshot before
    /// this returned may still reach it; nothing else calls it afterwards. It stays alive as long
    /// as such a call holds it.
    pub fn unregister_notifier(&self, id: NotifierId) -> bool {
        self.inner.notifiers.unregister(id)
    }

    /// Process exit (`exit_mmap`): calls every subscriber's `release` (before any frame is
    /// freed), drops the subscribers, then tears down every mapping and frees every frame.
    /// Idempotent; the address space stays usable afterwards (empty, no subscribers).
    ///
    /// # Panics
    /// From a thread that holds a vCPU in guest mode (a subscriber's teardown waits for every
    /// vCPU's TLB-flush acknowledgement), before anything changed or anyone was called.
    pub fn release(&self) {
        guest_mode::refuse("release");
        let inner = &*self.inner;
        let _w = inner.mm_writer.lock();
        let subs = inner.notifiers.take_all();
        for (_, n) in subs.iter() {
            n.release();
        }
        Counters::bump(&inner.counters.release_calls, subs.len() as u64);
        drop(subs);
        let mut vmas = inner.mmap_lock.write();
        for v in vmas.take_all() {
            zap_ptes(&vmas.pt, v.start, v.end, &inner.arena, &inner.reclaim);
            vmas.pt.prune(v.start, v.end);
        }
    }

    /// Operation counters.
    pub fn stats(&self) -> HostStats {
        let c = &self.inner.counters;
        // ORDERING: Relaxed: statistics.
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        HostStats {
            mmap: ld(&c.mmap),
            munmap: ld(&c.munmap),
            mprotect: ld(&c.mprotect),
            dontneed: ld(&c.dontneed),
            gup: c.gup.sum(),
            invalidate_start: ld(&c.invalidate_start),
            invalidate_end: ld(&c.invalidate_end),
            aging_calls: c.aging_calls.sum(),
            release_calls: ld(&c.release_calls),
            subscribers: self.inner.notifiers.len() as u64,
            page_table_bytes: self.inner.mmap_lock.read().pt.bytes(),
            huge_faults: ld(&c.huge_faults),
            thp_splits: ld(&c.thp_splits),
            thp_collapses: ld(&c.thp_collapses),
        }
    }
}
