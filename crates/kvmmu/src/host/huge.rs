//! Huge pages on the host: transparent huge pages (THP) and hugetlb, as the selftests' `-s`
//! backing sources name them (`anonymous`, `anonymous_thp`, `anonymous_hugetlb_2mb`,
//! `anonymous_hugetlb_1gb`).
//!
//! Protocol:
//! - A VMA carries a [`HugeMode`]: `None` (4K pages only), `Thp` (a page fault in an aligned 2 MiB
//!   span lying inside the VMA, none of whose pages is present, maps the whole span with one
//!   2 MiB page; otherwise 4K), or `Hugetlb(level)` (every page is a 2 MiB or 1 GiB page; never
//!   split; the VMA's bounds, and every range an operation names in it, are aligned to the size).
//! - A huge page is a run of contiguous, size-aligned frames ([`FrameArena::alloc_run`]) whose
//!   frame `i` backs host page `head + i`; its PTE words are all present and its spans' markers
//!   hold its level (`pgtable.rs` invariant 4). GUP reports the marker as the host mapping level.
//! - Fault-in in a VMA with a huge mode happens under the huge-fault mutex ([`HugeState`],
//!   inside `mmap_lock` read): an installer sees every PTE of its span settled, so it never
//!   races another installer. Pages are written before markers, so a lockless reader may see a
//!   huge page's PTE with marker 0 and report 4K: a smaller level is always correct.
//! - No huge page is created over a range for which an invalidation is in flight
//!   ([`HugeState::inflight`]): a structural operation records its range before calling
//!   `invalidate_range_start` and clears it after the change, so a secondary MMU that checked the
//!   faulting page against the in-flight range never maps a huge page reaching into it.
//! - Splitting a THP clears its marker under `mmap_lock` write: the frames stay, each 4K PTE
//!   keeps naming its own frame, so the data is unchanged. A structural operation
//!   (`munmap`, `mprotect`, `madvise_dontneed`) whose range cuts a THP widens its invalidation to
//!   the THP's whole 2 MiB range and splits it before changing the 4K PTEs; on a hugetlb VMA such
//!   an operation is refused ([`HostError::HugeUnaligned`]). A huge page wholly inside an unmapped
//!   or discarded range is freed as a run.

use core::ops::ControlFlow;
use core::str::FromStr;

use super::frames::{FrameArena, FrameTag, RUN_1G, RUN_2M};
use super::mm::{Counters, GupPage, HostMm, page_range};
use super::pgtable::PageTable;
use super::vma::{Vma, Vmas, page_hva, pte, pte_frame};
use super::{GupError, HostError, Prot};
use crate::addr::{Hva, Level, PAGE_SHIFT, Pfn};
use crate::sync::atomic::Ordering;
use crate::sync::guest_mode;

/// How anonymous memory is backed (the selftests' `-s` option).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash, Default)]
pub enum BackingSrc {
    /// 4 KiB pages only (`anonymous`).
    #[default]
    Anonymous,
    /// Transparent huge pages: 2 MiB where a fault finds an aligned, untouched 2 MiB span
    /// (`anonymous_thp`, i.e. `mmap` + `madvise(MADV_HUGEPAGE)`).
    AnonymousThp,
    /// hugetlbfs 2 MiB pages (`anonymous_hugetlb_2mb`): never split; length aligned to 2 MiB.
    AnonymousHugetlb2M,
    /// hugetlbfs 1 GiB pages (`anonymous_hugetlb_1gb`): never split; length aligned to 1 GiB.
    AnonymousHugetlb1G,
}

impl BackingSrc {
    /// Every backing source, in the selftests' order.
    pub const ALL: [BackingSrc; 4] = [
        BackingSrc::Anonymous,
        BackingSrc::AnonymousThp,
        BackingSrc::AnonymousHugetlb2M,
        BackingSrc::AnonymousHugetlb1G,
    ];

    /// The selftests' name.
    pub const fn name(self) -> &'static str {
        match self {
            BackingSrc::Anonymous => "anonymous",
            BackingSrc::AnonymousThp => "anonymous_thp",
            BackingSrc::AnonymousHugetlb2M => "anonymous_hugetlb_2mb",
            BackingSrc::AnonymousHugetlb1G => "anonymous_hugetlb_1gb",
        }
    }

    /// The size a mapping's length must be a multiple of (4 KiB but for hugetlb).
    pub const fn page_size(self) -> u64 {
        match self {
            BackingSrc::Anonymous | BackingSrc::AnonymousThp => 1 << PAGE_SHIFT,
            BackingSrc::AnonymousHugetlb2M => 2 << 20,
            BackingSrc::AnonymousHugetlb1G => 1 << 30,
        }
    }

    /// The largest page the source may back a mapping with.
    pub const fn max_level(self) -> Level {
        match self {
            BackingSrc::Anonymous => Level::L4K,
            BackingSrc::AnonymousThp | BackingSrc::AnonymousHugetlb2M => Level::L2M,
            BackingSrc::AnonymousHugetlb1G => Level::L1G,
        }
    }

    const fn mode(self) -> HugeMode {
        match self {
            BackingSrc::Anonymous => HugeMode::None,
            BackingSrc::AnonymousThp => HugeMode::Thp,
            BackingSrc::AnonymousHugetlb2M => HugeMode::Hugetlb(Level::L2M),
            BackingSrc::AnonymousHugetlb1G => HugeMode::Hugetlb(Level::L1G),
        }
    }
}

impl core::fmt::Display for BackingSrc {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown backing source name.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
#[error(
    "unknown backing source {0:?} (anonymous, anonymous_thp, anonymous_hugetlb_2mb, anonymous_hugetlb_1gb)"
)]
pub struct UnknownBackingSrc(pub String);

impl FromStr for BackingSrc {
    type Err = UnknownBackingSrc;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BackingSrc::ALL
            .into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| UnknownBackingSrc(s.to_owned()))
    }
}

/// How a VMA may be backed by huge pages.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum HugeMode {
    /// 4K pages only.
    None,
    /// Transparent huge pages (2 MiB), split when an operation cuts one.
    Thp,
    /// hugetlb pages of this level, never split.
    Hugetlb(Level),
}

impl HugeMode {
    /// The level of the huge pages this mode creates, if any.
    pub(crate) const fn level(self) -> Option<Level> {
        match self {
            HugeMode::None => None,
            HugeMode::Thp => Some(Level::L2M),
            HugeMode::Hugetlb(l) => Some(l),
        }
    }
}

/// The huge-fault mutex's state (module doc).
#[derive(Default, Debug)]
pub(crate) struct HugeState {
    /// Pages `[s, e)` of the structural operation whose invalidation is in flight, if any
    /// (there is at most one: `mm_writer` serialises them).
    pub(crate) inflight: Option<(u64, u64)>,
}

/// Pages one host page of `level` spans (4K geometry of the host, not the MMU's loom one).
const fn span(level: Level) -> u64 {
    level.pages()
}

/// The host mapping level of `page` from its span's marker (4K when no leaf or marker 0).
#[inline]
pub(crate) fn marker_level(pt: &PageTable, page: u64) -> Level {
    // ORDERING: Acquire pairs with the installer's Release store of the marker, which follows
    // its PTE stores: a reader that sees the marker sees the whole huge page present.
    match pt.huge_marker(page).map(|m| m.load(Ordering::Acquire)) {
        Some(2) => Level::L2M,
        Some(3) => Level::L1G,
        _ => Level::L4K,
    }
}

impl HostMm {
    /// Maps `len` bytes of lazily populated anonymous memory backed as `src` says, at an address
    /// of the host's choosing aligned to the largest page `src` may use (2 MiB for THP if
    /// `len >= 2 MiB`).
    ///
    /// Errors (nothing changed): as [`HostMm::mmap`]; [`HostError::HugeUnaligned`] for a hugetlb
    /// source whose page size does not divide `len`.
    pub fn mmap_backed(&self, len: u64, prot: Prot, src: BackingSrc) -> Result<Hva, HostError> {
        guest_mode::check("mmap")?;
        if len == 0 {
            return Err(HostError::ZeroLength);
        }
        if !len.is_multiple_of(src.page_size()) {
            return Err(HostError::HugeUnaligned {
                hva: Hva::new(0),
                len,
                page_size: src.page_size(),
            });
        }
        let align = match src {
            BackingSrc::AnonymousHugetlb1G => RUN_1G as u64,
            BackingSrc::AnonymousHugetlb2M => RUN_2M as u64,
            _ if len >> PAGE_SHIFT >= RUN_2M as u64 => RUN_2M as u64,
            _ => 1,
        };
        let mut vma = Vma::new(0, 0, prot);
        vma.huge = src.mode();
        self.mmap_vma(len, align, vma)
    }

    /// `madvise(MADV_HUGEPAGE)` (`enable`) or `madvise(MADV_NOHUGEPAGE)` over a fully mapped
    /// range: later faults may (or may no longer) map THPs there. Existing THPs stay (as in
    /// Linux); nothing is invalidated.
    ///
    /// Errors (nothing changed): the range errors of [`HostMm::munmap`];
    /// [`HostError::HugeUnaligned`] if the range touches a hugetlb mapping.
    pub fn madvise_hugepage(&self, hva: Hva, len: u64, enable: bool) -> Result<(), HostError> {
        guest_mode::check("madvise")?;
        let (s, e) = page_range(hva, len)?;
        self.with_vmas_write(|vmas| {
            super::mm::check_mapped(vmas, s, e)?;
            if let Some(v) = vmas
                .overlapping(s, e)
                .find(|v| matches!(v.huge, HugeMode::Hugetlb(_)))
            {
                return Err(HostError::HugeUnaligned {
                    hva,
                    len,
                    page_size: v.huge.level().map_or(0, |l| span(l) << PAGE_SHIFT),
                });
            }
            vmas.split_at(s);
            vmas.split_at(e);
            for v in vmas.range_mut(s, e) {
                v.huge = if enable {
                    HugeMode::Thp
                } else {
                    HugeMode::None
                };
            }
            Ok(())
        })
    }

    /// The slow path of GUP in a VMA with a huge mode (module doc): under `mmap_lock` read and the
    /// huge-fault mutex, returns the page's frame, faulting in a whole huge page when its span is
    /// untouched, inside the VMA and clear of any in-flight invalidation, else a 4K page (THP)
    /// or an error (hugetlb).
    pub(crate) fn gup_huge(
        &self,
        vmas: &Vmas,
        vma: &Vma,
        hva: Hva,
        write: bool,
    ) -> Result<GupPage, GupError> {
        let page = hva.page();
        let writable = vma.writable();
        let want = pte::YOUNG | if write { pte::DIRTY } else { 0 };
        let level = vma.huge.level().unwrap_or(Level::L4K);
        let n = span(level);
        let head = page & !(n - 1);
        let st = self.inner.huge.lock();
        let word = vmas.pt.entry_or_alloc(page);
        // ORDERING: Acquire, as GUP's fast-path load: the frame's tag and fill are visible.
        let cur = word.load(Ordering::Acquire);
        if cur & pte::PRESENT != 0 {
            drop(st);
            if cur & want != want {
                // ORDERING: as GUP's fast path (young/dirty are hints).
                word.fetch_or(want, Ordering::Relaxed);
            }
            let (pfn, tag) = pte_frame(page, cur);
            return Ok(GupPage {
                pfn,
                tag,
                writable,
                level: marker_level(&vmas.pt, page),
            });
        }
        let fits = head >= vma.start && head + n <= vma.end;
        let clear = st.inflight.is_none_or(|(s, e)| head + n <= s || e <= head);
        let hugetlb = matches!(vma.huge, HugeMode::Hugetlb(_));
        // A hugetlb page is never cut by an in-flight range (cuts are refused), so a fault inside
        // one is inside the range and the secondary MMU's retry rule covers it.
        let untouched = fits && (clear || hugetlb) && !any_pte(&vmas.pt, head, head + n);
        if untouched {
            match self.arena().alloc_run(head, n as usize) {
                Ok((first, generation)) => {
                    install_huge(&vmas.pt, head, n, first, generation, page, want, level);
                    Counters::bump(&self.inner.counters.huge_faults, 1);
                    let (pfn, tag) = (
                        Pfn::new(first.raw() + (page - head)),
                        FrameTag::from_parts(page, generation),
                    );
                    return Ok(GupPage {
                        pfn,
                        tag,
                        writable,
                        level,
                    });
                }
                Err(_) if hugetlb => return Err(GupError::OutOfFrames),
                Err(_) => {}
            }
        } else if hugetlb {
            // Hugetlb pages are installed whole; a hole in one means an invalidation of its
            // range is in flight: the caller's retry protocol handles the refusal.
            return Err(GupError::OutOfFrames);
        }
        // THP fallback: a 4K page, installed under the mutex (no other installer can race). Charged
        // like every 4K page (docs/invariants.md R1, R6): zap and eviction uncharge it, collapse
        // uncharges its span. A refused charge sends the caller to direct reclaim.
        let reclaim = &self.inner.reclaim;
        if !reclaim.try_charge() {
            return Err(GupError::OutOfFrames);
        }
        let (pfn, tag) = match self.arena().alloc(page) {
            Ok(f) => f,
            Err(_) => {
                reclaim.uncharge(1);
                return Err(GupError::OutOfFrames);
            }
        };
        // ORDERING: Release publishes the frame's tag and zero fill with the PTE (as GUP's CAS);
        // the mutex excludes every other installer of this VMA, so a store suffices.
        word.store(
            pte::encode(pfn.raw(), tag.generation(), want),
            Ordering::Release,
        );
        reclaim.faulted_in(pfn, None);
        Ok(GupPage {
            pfn,
            tag,
            writable,
            level: Level::L4K,
        })
    }

    /// Widens `[s, e)` to whole THPs it cuts (for the invalidation of a structural operation),
    /// or refuses a range that cuts a hugetlb VMA's pages. Under `mmap_lock` (either mode).
    pub(crate) fn widen_for_split(
        vmas: &Vmas,
        (s, e): (u64, u64),
    ) -> Result<(u64, u64), HostError> {
        let mut lo = s;
        let mut hi = e;
        for (edge, is_start) in [(s, true), (e, false)] {
            for v in vmas.overlapping(edge.saturating_sub(1), edge + 1) {
                let Some(level) = v.huge.level() else {
                    continue;
                };
                let n = span(level);
                if edge.is_multiple_of(n) {
                    continue;
                }
                if matches!(v.huge, HugeMode::Hugetlb(_)) {
                    let (hva, len) = (page_hva(s), (e - s) << PAGE_SHIFT);
                    return Err(HostError::HugeUnaligned {
                        hva,
                        len,
                        page_size: n << PAGE_SHIFT,
                    });
                }
                if marker_level(&vmas.pt, edge) != Level::L4K {
                    let head = edge & !(n - 1);
                    if is_start {
                        lo = lo.min(head);
                    } else {
                        hi = hi.max(head + n);
                    }
                }
            }
        }
        Ok((lo, hi))
    }

    /// Records (or clears) the in-flight invalidation range (module doc).
    pub(crate) fn set_inflight(&self, r: Option<(u64, u64)>) {
        self.inner.huge.lock().inflight = r;
    }
}

impl HostMm {
    /// khugepaged's collapse of one 2 MiB span (`collapse_huge_page`): if the span at `hva` (2 MiB
    /// aligned) lies in one THP-enabled mapping, is not huge yet and every page of it is present,
    /// an invalidation over the span starts (event `Unmap`, as Linux's `MMU_NOTIFY_CLEAR`), the
    /// 512 pages are copied into a fresh 2 MiB run (young and dirty bits kept per page), the PTEs
    /// switch to it with the huge marker, the old frames are freed, and the invalidation ends.
    /// Returns false (and changes nothing) when the span is not collapsible or no run is free.
    ///
    /// Errors (nothing changed, nobody called): [`HostError::HugeUnaligned`] for an unaligned
    /// `hva`; [`HostError::OutOfRange`]; [`HostError::NotMapped`] if the span is not mapped;
    /// [`HostError::InGuestMode`].
    pub fn collapse(&self, hva: Hva) -> Result<bool, HostError> {
        guest_mode::check("collapse")?;
        let n = RUN_2M as u64;
        if !hva.raw().is_multiple_of(n << PAGE_SHIFT) {
            return Err(HostError::HugeUnaligned {
                hva,
                len: n << PAGE_SHIFT,
                page_size: n << PAGE_SHIFT,
            });
        }
        let (s, e) = page_range(hva, n << PAGE_SHIFT)?;
        let collapsible = |vmas: &Vmas| {
            vmas.overlapping(s, e).count() == 1
                && vmas.find(s).is_some_and(|v| v.huge == HugeMode::Thp)
                && marker_level(&vmas.pt, s) == Level::L4K
                && (s..e).all(|p| {
                    // ORDERING: Acquire, as GUP's load (the frame's tag is read below).
                    vmas.pt
                        .entry(p)
                        .is_some_and(|w| w.load(Ordering::Acquire) & pte::PRESENT != 0)
                })
        };
        let mut done = false;
        self.change_range(
            (s, e),
            super::InvalidateEvent::Unmap,
            |v| super::mm::check_mapped(v, s, e),
            |v| collapsible(v),
            |vmas, arena| {
                if !collapsible(vmas) {
                    return;
                }
                let Ok((first, generation)) = arena.alloc_run(s, RUN_2M) else {
                    return;
                };
                for i in 0..n {
                    let Some(word) = vmas.pt.entry(s + i) else {
                        continue;
                    };
                    // ORDERING: Relaxed: `mmap_lock` write excludes every other PTE user (H3).
                    let old = word.load(Ordering::Relaxed);
                    let (pfn, tag) = pte_frame(s + i, old);
                    let new_pfn = Pfn::new(first.raw() + i);
                    let new_tag = FrameTag::from_parts(s + i, generation);
                    for w in 0..super::WORDS_PER_FRAME {
                        let v = arena.read_u64(pfn, w, tag).unwrap_or(0);
                        if v != 0 {
                            let _ = arena.write_u64(new_pfn, w, new_tag, v);
                        }
                    }
                    let flags = old & (pte::YOUNG | pte::DIRTY);
                    // ORDERING: Release publishes the copied frame with the PTE (as GUP's CAS).
                    word.store(
                        pte::encode(new_pfn.raw(), generation, flags),
                        Ordering::Release,
                    );
                    if arena.free(pfn, tag).is_err() {
                        arena.report_stale(pfn, tag, arena.tag(pfn));
                    }
                }
                // ORDERING: Release after the PTEs (pgtable.rs invariant 4).
                vmas.pt
                    .huge_marker_or_alloc(s)
                    .store(u64::from(Level::L2M.get()), Ordering::Release);
                // The 4K frames were charged (faulted in, or split from a THP); a whole huge
                // page is not (see `zap_ptes`).
                self.inner.reclaim.uncharge(n);
                done = true;
            },
        )?;
        if done {
            Counters::bump(&self.inner.counters.thp_collapses, 1);
        }
        Ok(done)
    }
}

/// True if any PTE of `[s, e)` is non-zero.
fn any_pte(pt: &PageTable, s: u64, e: u64) -> bool {
    pt.for_each_leaf_huge(s, e, |_, ptes, marker| {
        // ORDERING: Relaxed: under the huge-fault mutex no installer runs; a PTE only goes to 0
        // under `mmap_lock` write, which our caller's read lock excludes.
        if marker.load(Ordering::Relaxed) != 0
            || ptes.iter().any(|w| w.load(Ordering::Relaxed) != 0)
        {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .is_break()
}

/// Writes the PTEs of a huge page (frames `first..first + n` for pages `head..head + n`), then
/// its markers (`pgtable.rs` invariant 4). The faulting page gets `want`; the others start old.
#[allow(clippy::too_many_arguments)]
fn install_huge(
    pt: &PageTable,
    head: u64,
    n: u64,
    first: Pfn,
    generation: u32,
    page: u64,
    want: u64,
    level: Level,
) {
    for i in 0..n {
        let flags = if head + i == page { want } else { 0 };
        // ORDERING: Release publishes the run's tags and zero fill (done by `alloc_run` before)
        // with each PTE, as GUP's CAS does for one frame.
        pt.entry_or_alloc(head + i).store(
            pte::encode(first.raw() + i, generation, flags),
            Ordering::Release,
        );
    }
    for span2m in (head..head + n).step_by(RUN_2M) {
        // ORDERING: Release after every PTE store: a reader that Acquire-loads the marker sees
        // the whole page present (`marker_level`).
        pt.huge_marker_or_alloc(span2m)
            .store(u64::from(level.get()), Ordering::Release);
    }
}

/// Splits every THP cut by `s` or `e` (clears its marker; frames and PTEs stay). Under
/// `mmap_lock` write, after the widened invalidation started.
pub(crate) fn split_cut(pt: &PageTable, s: u64, e: u64) -> u64 {
    let mut splits = 0;
    for edge in [s, e] {
        if edge.is_multiple_of(RUN_2M as u64) {
            continue;
        }
        if let Some(m) = pt.huge_marker(edge) {
            // ORDERING: Relaxed: `mmap_lock` write excludes every reader of the marker.
            if m.load(Ordering::Relaxed) == u64::from(Level::L2M.get()) {
                m.store(0, Ordering::Relaxed);
                splits += 1;
            }
        }
    }
    splits
}

/// Clears the PTEs and markers of every huge page wholly inside `[s, e)` and frees each as a run.
/// Under `mmap_lock` write, after `invalidate_range_start` (host H1, H2). Huge pages cut by the
/// range were split before (`split_cut`) or refused (hugetlb), so every marked span met here
/// belongs to a page inside the range.
pub(crate) fn zap_huge(pt: &PageTable, s: u64, e: u64, arena: &FrameArena) {
    let _ = pt.for_each_leaf_huge(s, e, |first, _, marker| {
        // ORDERING: Relaxed: `mmap_lock` write (H3).
        let level = match marker.load(Ordering::Relaxed) {
            2 => Level::L2M,
            3 => Level::L1G,
            _ => return ControlFlow::Continue(()),
        };
        let n = span(level);
        let head = first & !(n - 1);
        if head < s || head + n > e {
            // Not wholly inside: the caller split (THP) or refused (hugetlb) it; leave it.
            return ControlFlow::Continue(());
        }
        // ORDERING: Relaxed: as above.
        let w = pt.entry(head).map_or(0, |w| w.load(Ordering::Relaxed));
        let (pfn, tag) = pte_frame(head, w);
        for span2m in (head..head + n).step_by(RUN_2M) {
            if let Some(m) = pt.huge_marker(span2m) {
                // ORDERING: Relaxed: as above.
                m.store(0, Ordering::Relaxed);
            }
        }
        for p in head..head + n {
            if let Some(w) = pt.entry(p) {
                // ORDERING: Relaxed: as above.
                w.store(0, Ordering::Relaxed);
            }
        }
        if w & pte::PRESENT == 0
            || arena
                .free_run(pfn, n as usize, head, tag.generation())
                .is_err()
        {
            arena.report_stale(pfn, tag, arena.tag(pfn));
        }
        ControlFlow::Continue(())
    });
}

#[cfg(all(test, not(loom)))]
#[path = "huge_tests.rs"]
mod tests;
