//! Memory overcommit: a frame budget, MGLRU-like generations, eviction to swap, refaults, and a
//! kswapd thread (`mm/vmscan.c`'s MGLRU path, reduced to one anonymous "memcg").
//!
//! Protocol:
//! - **Budget.** Every frame that backs a host 4K page is *charged* (GUP's first touch or refault,
//!   a THP split) and uncharged when the page is zapped, evicted or collapsed (the `charge`
//!   module states who charges what). Under a limit ([`HostMm::enable_reclaim`])
//!   a charge beyond it is refused; GUP then runs **direct reclaim** (evicts a batch of
//!   [`SWAP_CLUSTER_MAX`] pages) and retries, at most [`MAX_DIRECT_RECLAIM_ATTEMPTS`] times,
//!   before it fails with `OutOfFrames` (the access is OOM-killed; no other page is touched).
//! - **Generations** ([`super::lru_gen::FrameGens`]): a faulted-in frame joins the youngest
//!   generation; an **aging pass** starts a new generation, walks the host page tables of every
//!   mapping in chunks of [`super::AGING_CHUNK_PAGES`] pages with
//!   [`HostMm::clear_young_into`] (host young bits plus one `clear_young_bitmap` per secondary MMU
//!   per chunk: KVM ages locklessly or under `mmu_lock` as its VM is configured) and moves every
//!   young frame to the new generation. With [`ReclaimAging::None`] a pass only starts the
//!   generation (no walk, no notifier call): reclaim with no aging at all, the baseline.
//! - **Eviction** takes frames of the oldest generation (never of the two youngest). For each
//!   page, under `mm_writer`: `invalidate_range_start` over the page (timed: the latency the
//!   lockless-aging series is about), then under `mmap_lock` write the frame is copied to a swap
//!   slot, the PTE becomes a swap entry and the frame is freed; then `invalidate_range_end`.
//! - **kswapd** ([`super::Kswapd`], `kswapd` module) wakes when the charge passes the high
//!   watermark, ages when fewer than
//!   [`MAX_NR_GENS`] generations exist and evicts until the charge is below the low watermark.
//!
//! Invariants:
//! - R1. `charged` equals the number of present host PTEs outside huge pages (R5; no GUP, zap or
//!   eviction in flight; docs/locking.md C1-C6). It never wraps: an uncharge below zero is
//!   refused and recorded ([`HostMm::charge_underflow`]).
//! - R2. A page is evicted only inside a balanced invalidate pair (host H1): when its frame is
//!   freed no secondary MMU maps it and no vCPU TLB holds it. (Feature
//!   `broken-evict-no-invalidate` breaks exactly this, for the tests that must catch it.)
//! - R3. An evicted page's contents are in its swap slot until a refault copies them back
//!   (swap S1, S3): data is never lost (DESIGN invariant 6).
//! - R4. Lock order: the evictor's cursor lock, then the aging lock, then `mm_writer`; GUP holds
//!   none of them when it enters direct reclaim (it dropped `mmap_lock`).
//! - R5. Huge pages are neither charged nor evicted (`zap.rs`): eviction and `page_out` skip every
//!   page whose span carries a huge marker, checked again under `mmap_lock` write (a huge
//!   install in flight stores its marker after its PTEs). A split THP's pages are 4K pages
//!   (charged at the split) and are evicted like any other; a 4K page of a THP mapping is charged at fault-in and
//!   refaulted from its swap slot like any other (a huge page never forms over a swap entry).

use super::charge::ChargeUnderflow;
use super::frames::FrameArena;
use super::huge::marker_level;
use super::lru_gen::{FrameGens, MIN_NR_GENS};
use super::mm::GupPage;
use super::mm::HostMm;
use super::notifier::{InvalidateEvent, InvalidationPair, NotifierRange, YoungBitmap};
use super::swap::{MAX_SWAP_SLOTS, SwapDevice, SwapStats, swap_entry};
use super::vma::{page_hva, pte, pte_frame};
use super::{AGING_CHUNK_PAGES, GupError, HostError, ReclaimError};
use crate::addr::{Hva, Level, Pfn};
use crate::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use crate::sync::witness::thread_mmu_lock_wait_nanos;
use crate::sync::{Condvar, Mutex, guest_mode};
use std::sync::OnceLock;
use std::time::Instant;

/// Pages one reclaim batch evicts (Linux's `SWAP_CLUSTER_MAX`).
pub const SWAP_CLUSTER_MAX: usize = 32;
/// Direct-reclaim rounds one GUP runs before it gives up with `OutOfFrames`.
pub const MAX_DIRECT_RECLAIM_ATTEMPTS: u32 = 64;
/// The smallest limit accepted, in frames.
pub const MIN_LIMIT_FRAMES: u64 = 16;
/// kswapd ages before evicting when fewer generations than this exist (MGLRU's `MAX_NR_GENS`).
pub const MAX_NR_GENS: u32 = 4;
/// Invalidate-latency samples kept per run (the rest are counted, not kept).
const MAX_LATENCY_SAMPLES: usize = 1 << 22;

/// Whether reclaim ages (the secondary MMUs' accessed state included) before it evicts.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash, Default)]
pub enum ReclaimAging {
    /// MGLRU: aging passes walk the host page tables and call `clear_young_bitmap` on every
    /// secondary MMU (KVM's lockless or locked aging, per VM configuration).
    #[default]
    Generations,
    /// No aging at all: generations only record fault-in order (the no-aging baseline).
    None,
}

/// A memory limit with swap ([`HostMm::enable_reclaim`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ReclaimConfig {
    /// Frames host pages may use at once (below the arena's size).
    pub limit_frames: u64,
    /// Slots of the in-memory swap device (4 KiB each, allocated when used).
    pub swap_slots: u64,
    /// Aging before eviction.
    pub aging: ReclaimAging,
}

/// Reclaim counters ([`HostMm::reclaim_stats`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct ReclaimStats {
    /// The limit in frames (`u64::MAX` when none).
    pub limit_frames: u64,
    /// Frames charged now (present host pages).
    pub charged: u64,
    /// Uncharges refused because fewer frames were charged (a host accounting bug; 0 when the
    /// accounting is exact, see [`HostMm::charge_underflow`]).
    pub charge_underflows: u64,
    /// Pages evicted to swap.
    pub evicted: u64,
    /// Swapped-out pages faulted back in.
    pub refaults: u64,
    /// Direct-reclaim rounds run by allocating threads.
    pub direct_reclaims: u64,
    /// GUPs that failed for lack of memory after direct reclaim (out-of-memory kills).
    pub oom_kills: u64,
    /// Times kswapd woke up to reclaim.
    pub kswapd_wakeups: u64,
    /// Aging passes (new generations).
    pub aging_passes: u64,
    /// Frames found young by aging passes.
    pub aging_young: u64,
    /// Nanoseconds spent in aging passes.
    pub aging_nanos: u64,
    /// Evictions refused because the swap device was full.
    pub swap_full: u64,
    /// `invalidate_range_start` calls made by eviction (one per evicted page attempt).
    pub invalidate_pairs: u64,
    /// Nanoseconds eviction's `invalidate_range_start` calls spent waiting for a VM's
    /// `mmu_lock` (held by a fault, a zap or locked aging).
    pub invalidate_mmu_lock_wait_nanos: u64,
    /// Nanoseconds aging passes spent waiting for a VM's `mmu_lock` (locked aging only).
    pub aging_mmu_lock_wait_nanos: u64,
    /// Oldest and youngest generation.
    pub min_seq: u32,
    /// Youngest generation.
    pub max_seq: u32,
    /// The swap device's counters.
    pub swap: SwapStats,
}

/// What eviction needs once reclaim is enabled.
pub(super) struct Active {
    pub(super) cfg: ReclaimConfig,
    swap: SwapDevice,
    pub(super) gens: FrameGens,
    /// Serialises evictors; the frame index where the next scan starts.
    cursor: Mutex<usize>,
    /// Serialises aging passes.
    aging: Mutex<()>,
}

#[derive(Default)]
pub(super) struct KswapdState {
    pub(super) running: bool,
    pub(super) stop: bool,
}

/// The host's reclaim state (inside `HostMm`).
pub(crate) struct Reclaim {
    /// Frames charged (`charge` module).
    pub(super) charged: AtomicU64,
    /// The limit in frames (`u64::MAX` until reclaim is enabled).
    pub(super) limit: AtomicU64,
    /// Refused uncharges (`charge` module), and the first of them.
    pub(super) underflows: AtomicU64,
    pub(super) first_underflow: OnceLock<ChargeUnderflow>,
    pub(super) active: OnceLock<Active>,
    evicted: AtomicU64,
    refaults: AtomicU64,
    direct: AtomicU64,
    oom: AtomicU64,
    pub(super) wakeups: AtomicU64,
    passes: AtomicU64,
    young: AtomicU64,
    aging_nanos: AtomicU64,
    pairs: AtomicU64,
    invalidate_wait: AtomicU64,
    aging_wait: AtomicU64,
    latencies: Mutex<Vec<u32>>,
    pub(super) kswapd: Mutex<KswapdState>,
    pub(super) kswapd_cv: Condvar,
    pub(super) wake_pending: AtomicBool,
}

impl Reclaim {
    /// The reclaim machinery, once [`HostMm::enable_reclaim`] has set it up.
    fn enabled(&self) -> Result<&Active, ReclaimError> {
        self.active.get().ok_or(ReclaimError::NotEnabled)
    }
}

impl Default for Reclaim {
    fn default() -> Self {
        Reclaim {
            charged: AtomicU64::new(0),
            limit: AtomicU64::new(u64::MAX),
            underflows: AtomicU64::new(0),
            first_underflow: OnceLock::new(),
            active: OnceLock::new(),
            evicted: AtomicU64::new(0),
            refaults: AtomicU64::new(0),
            direct: AtomicU64::new(0),
            oom: AtomicU64::new(0),
            wakeups: AtomicU64::new(0),
            passes: AtomicU64::new(0),
            young: AtomicU64::new(0),
            aging_nanos: AtomicU64::new(0),
            pairs: AtomicU64::new(0),
            invalidate_wait: AtomicU64::new(0),
            aging_wait: AtomicU64::new(0),
            latencies: Mutex::new(Vec::new()),
            kswapd: Mutex::new(KswapdState::default()),
            kswapd_cv: Condvar::new(),
            wake_pending: AtomicBool::new(false),
        }
    }
}

pub(super) fn bump(c: &AtomicU64, n: u64) {
    // ORDERING: Relaxed: statistics.
    c.fetch_add(n, Ordering::Relaxed);
}

impl Reclaim {
    /// `(high, low)` watermarks for `limit`: kswapd wakes above high and stops at low.
    pub(super) fn watermarks(limit: u64) -> (u64, u64) {
        let gap = (limit / 64).max(1);
        (limit - gap, limit.saturating_sub(2 * gap))
    }

    /// Copies swap slot `slot` into the fresh frame `pfn` (a refault in progress).
    pub(super) fn swap_in(&self, arena: &FrameArena, pfn: Pfn, slot: u32) {
        if let (Some(a), Some(words)) = (self.active.get(), arena.frame_contents(pfn)) {
            a.swap.load_into(slot, words);
        }
    }

    /// GUP published frame `pfn` (refaulted from `slot` if any): it joins the youngest
    /// generation, and the slot is freed by this, the CAS winner (swap S3).
    #[inline]
    pub(super) fn faulted_in(&self, pfn: Pfn, slot: Option<u32>) {
        if let Some(a) = self.active.get() {
            a.gens.fault_in(pfn.raw() as usize);
            if let Some(slot) = slot {
                a.swap.free(slot, true);
                bump(&self.refaults, 1);
            }
        }
    }

    /// A zap removed a swap entry naming `slot` (swap S3).
    pub(super) fn drop_swap_slot(&self, slot: u32) {
        if let Some(a) = self.active.get() {
            a.swap.free(slot, false);
        }
    }

    pub(super) fn wake_kswapd(&self) {
        // ORDERING: SeqCst: see `try_charge`.
        if !self.wake_pending.swap(true, Ordering::SeqCst) {
            let st = self.kswapd.lock();
            if st.running {
                self.kswapd_cv.notify_all();
            }
        }
    }

    pub(super) fn over(&self, mark: u64) -> bool {
        // ORDERING: SeqCst: see `try_charge`.
        self.charged.load(Ordering::SeqCst) > mark
    }
}

/// What one eviction attempt did.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Evicted {
    Yes,
    Skipped,
    SwapFull,
}

impl HostMm {
    /// Puts host memory under a limit of `cfg.limit_frames` frames, with a swap device of
    /// `cfg.swap_slots` slots: beyond the limit, allocating threads reclaim directly, and a
    /// [`Kswapd`] ([`HostMm::spawn_kswapd`]) reclaims in the background. Once per host.
    ///
    /// Errors (nothing changed): [`ReclaimError::LimitTooSmall`], [`ReclaimError::LimitAboveArena`],
    /// [`ReclaimError::SwapTooLarge`], [`ReclaimError::AlreadyEnabled`],
    /// [`ReclaimError::NoMemory`].
    pub fn enable_reclaim(&self, cfg: ReclaimConfig) -> Result<(), ReclaimError> {
        let capacity = self.arena().capacity() as u64;
        if cfg.limit_frames < MIN_LIMIT_FRAMES {
            return Err(ReclaimError::LimitTooSmall {
                limit: cfg.limit_frames,
                min: MIN_LIMIT_FRAMES,
            });
        }
        if cfg.limit_frames >= capacity {
            return Err(ReclaimError::LimitAboveArena {
                limit: cfg.limit_frames,
                capacity,
            });
        }
        if cfg.swap_slots > MAX_SWAP_SLOTS {
            return Err(ReclaimError::SwapTooLarge {
                slots: cfg.swap_slots,
                max: MAX_SWAP_SLOTS,
            });
        }
        let r = &self.inner.reclaim;
        if r.active.get().is_some() {
            return Err(ReclaimError::AlreadyEnabled);
        }
        let gens = FrameGens::new(self.arena().capacity()).ok_or(ReclaimError::NoMemory)?;
        let active = Active {
            cfg,
            swap: SwapDevice::new(cfg.swap_slots),
            gens,
            cursor: Mutex::new(0),
            aging: Mutex::new(()),
        };
        r.active
            .set(active)
            .map_err(|_| ReclaimError::AlreadyEnabled)?;
        // ORDERING: Relaxed: published after the state it guards (a charge refused early
        // finds `active` set: OnceLock's own release/acquire).
        r.limit.store(cfg.limit_frames, Ordering::Relaxed);
        Ok(())
    }

    /// The reclaim counters (all zero but `charged` before [`HostMm::enable_reclaim`]).
    pub fn reclaim_stats(&self) -> ReclaimStats {
        let r = &self.inner.reclaim;
        // ORDERING: Relaxed: statistics.
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (min_seq, max_seq, swap) = r.active.get().map_or((0, 0, SwapStats::default()), |a| {
            let (min, max) = a.gens.seqs();
            (min, max, a.swap.stats())
        });
        ReclaimStats {
            limit_frames: ld(&r.limit),
            charged: ld(&r.charged),
            charge_underflows: ld(&r.underflows),
            evicted: ld(&r.evicted),
            refaults: ld(&r.refaults),
            direct_reclaims: ld(&r.direct),
            oom_kills: ld(&r.oom),
            kswapd_wakeups: ld(&r.wakeups),
            aging_passes: ld(&r.passes),
            aging_young: ld(&r.young),
            aging_nanos: ld(&r.aging_nanos),
            swap_full: swap.full,
            invalidate_pairs: ld(&r.pairs),
            invalidate_mmu_lock_wait_nanos: ld(&r.invalidate_wait),
            aging_mmu_lock_wait_nanos: ld(&r.aging_wait),
            min_seq,
            max_seq,
            swap,
        }
    }

    /// Takes the `invalidate_range_start` latencies (nanoseconds, one per eviction, in order)
    /// recorded since the last call (at most 4 Mi samples are kept between calls).
    pub fn take_invalidate_latencies(&self) -> Vec<u32> {
        core::mem::take(&mut *self.inner.reclaim.latencies.lock())
    }

    /// Resident frames per generation, oldest first (`min_seq..=max_seq`).
    ///
    /// Errors: [`ReclaimError::NotEnabled`].
    pub fn generations(&self) -> Result<Vec<u64>, ReclaimError> {
        let a = self.inner.reclaim.enabled()?;
        let arena = self.arena();
        Ok(a.gens
            .histogram(|pfn| !arena.tag(Pfn::new(pfn as u64)).is_free()))
    }

    /// Reclaims up to `pages` pages now (like writing to `memory.reclaim`): ages when needed, then
    /// evicts from the oldest generation. Returns the pages evicted.
    ///
    /// Errors: [`ReclaimError::NotEnabled`]; [`ReclaimError::Host`] with
    /// [`HostError::InGuestMode`] from a thread holding a vCPU in guest mode.
    pub fn reclaim(&self, pages: u64) -> Result<u64, ReclaimError> {
        guest_mode::check("reclaim").map_err(HostError::from)?;
        let a = self.inner.reclaim.enabled()?;
        let mut done = 0;
        while done < pages {
            let want = (pages - done).min(SWAP_CLUSTER_MAX as u64) as usize;
            let n = self.evict_batch(a, want);
            if n == 0 {
                break;
            }
            done += n as u64;
        }
        Ok(done)
    }

    /// Evicts every resident page of `[hva, hva + len)` to swap now, whatever its generation
    /// (`madvise(MADV_PAGEOUT)`), but for pages of a huge page, which stay (R5). Returns the
    /// pages evicted; stops early when swap is full.
    ///
    /// Errors: [`ReclaimError::NotEnabled`]; the range errors of [`HostMm::munmap`] as
    /// [`ReclaimError::Host`].
    pub fn page_out(&self, hva: Hva, len: u64) -> Result<u64, ReclaimError> {
        guest_mode::check("page_out").map_err(HostError::from)?;
        let (s, e) = super::mm::page_range(hva, len)?;
        super::mm::check_mapped(&self.inner.mmap_lock.read(), s, e)?;
        let a = self.inner.reclaim.enabled()?;
        let mut done = 0;
        for page in s..e {
            let pfn = {
                let vmas = self.inner.mmap_lock.read();
                // ORDERING: Acquire: as GUP's load of a PTE.
                match vmas.pt.entry(page).map(|w| w.load(Ordering::Acquire)) {
                    Some(v) if v & pte::PRESENT != 0 => Pfn::new(pte::pfn(v)),
                    _ => continue,
                }
            };
            match self.evict_page(a, page, pfn) {
                Evicted::Yes => done += 1,
                Evicted::Skipped => {}
                Evicted::SwapFull => break,
            }
        }
        Ok(done)
    }

    /// GUP of `hva`, then `f` on the page with `mmap_lock` still held for read (so the frame
    /// stays the page's, H2/H3); direct reclaim and a retry when the page needs a frame beyond
    /// the memory limit (bounded: `reclaim` module).
    #[inline]
    pub(super) fn with_page<R>(
        &self,
        hva: Hva,
        write: bool,
        f: impl Fn(&GupPage) -> Result<R, HostError>,
    ) -> Result<(GupPage, R), HostError> {
        let mut attempt = 0;
        loop {
            {
                let vmas = self.inner.mmap_lock.read();
                match self.gup_locked(&vmas, hva, write) {
                    Ok(p) => return f(&p).map(|r| (p, r)),
                    Err(GupError::OutOfFrames) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            attempt += 1;
            if !self.direct_reclaim(attempt) {
                return Err(GupError::OutOfFrames.into());
            }
        }
    }

    /// Direct reclaim for a GUP whose charge was refused (attempt `attempt`, from 1): true if the
    /// GUP should retry.
    pub(super) fn direct_reclaim(&self, attempt: u32) -> bool {
        let r = &self.inner.reclaim;
        let Some(a) = r.active.get() else {
            return false;
        };
        if attempt > MAX_DIRECT_RECLAIM_ATTEMPTS || guest_mode::check("direct reclaim").is_err() {
            bump(&r.oom, 1);
            return false;
        }
        bump(&r.direct, 1);
        r.wake_kswapd();
        let n = self.evict_batch(a, SWAP_CLUSTER_MAX);
        // ORDERING: Relaxed: a hint; the retry's charge decides.
        if n == 0 && r.charged.load(Ordering::Relaxed) >= r.limit.load(Ordering::Relaxed) {
            if a.swap.stats().used >= a.cfg.swap_slots {
                // Swap is full: nothing can be evicted until something is freed.
                bump(&r.oom, 1);
                return false;
            }
            // The only candidates were in flight (a frame allocated by a racing GUP, not yet
            // published): let them settle; the attempt bound above ends a hopeless case.
            crate::sync::yield_now();
        }
        true
    }

    /// Evicts up to `want` pages of the oldest generation (aging first when only the two
    /// youngest exist). Returns the pages evicted.
    pub(super) fn evict_batch(&self, a: &Active, want: usize) -> usize {
        let mut cursor = a.cursor.lock();
        let frames = a.gens.frames();
        let arena = self.arena();
        let mut evicted = 0;
        let mut candidates: Vec<(usize, u64)> = Vec::with_capacity(want);
        // Bounded: each round ages, retires an empty generation, or evicts.
        for _ in 0..2 * MAX_NR_GENS + 2 {
            if evicted >= want {
                break;
            }
            if !a.gens.can_evict() {
                self.age_generations(a);
                continue;
            }
            let (min, _) = a.gens.seqs();
            candidates.clear();
            let mut scanned = 0;
            while scanned < frames && candidates.len() < want - evicted {
                let pfn = *cursor;
                *cursor = if pfn + 1 == frames { 0 } else { pfn + 1 };
                scanned += 1;
                if a.gens.is_evictable(pfn, min) {
                    let tag = arena.tag(Pfn::new(pfn as u64));
                    if !tag.is_free() {
                        candidates.push((pfn, tag.host_page()));
                    }
                }
            }
            if candidates.is_empty() {
                a.gens.retire_oldest(min);
                continue;
            }
            let before = evicted;
            for &(pfn, page) in &candidates {
                match self.evict_page(a, page, Pfn::new(pfn as u64)) {
                    Evicted::Yes => evicted += 1,
                    Evicted::Skipped => {}
                    Evicted::SwapFull => return evicted,
                }
            }
            if evicted == before {
                // Every candidate was in flight (allocated, not yet published by its GUP): they
                // keep their stale sequence (G3) and stay evictable; move on to younger pages.
                a.gens.retire_oldest(min);
            }
        }
        evicted
    }

    /// One aging pass (module doc): a new generation, then the walk unless aging is off.
    pub(super) fn age_generations(&self, a: &Active) {
        let r = &self.inner.reclaim;
        let _one = a.aging.lock();
        let t0 = Instant::now();
        let waited = thread_mmu_lock_wait_nanos();
        let seq = a.gens.new_generation();
        bump(&r.passes, 1);
        if a.cfg.aging == ReclaimAging::None {
            return;
        }
        let ranges: Vec<(u64, u64)> = self
            .inner
            .mmap_lock
            .read()
            .iter()
            .map(|v| (v.start, v.end))
            .collect();
        let Ok(mut young) = YoungBitmap::new(page_hva(ranges.first().map_or(1 << 20, |r| r.0)), 0)
        else {
            return;
        };
        for (s, e) in ranges {
            let mut first = s;
            while first < e {
                let n = AGING_CHUNK_PAGES.min(e - first);
                let chunk = first;
                first += n;
                // A chunk unmapped since the snapshot is skipped (its pages are gone).
                if young.reset(page_hva(chunk), n).is_err()
                    || self.clear_young_into(&mut young).is_err()
                {
                    continue;
                }
                let vmas = self.inner.mmap_lock.read();
                for k in young.young_pages() {
                    // ORDERING: Acquire: as GUP's load of a PTE.
                    let v = vmas
                        .pt
                        .entry(chunk + k)
                        .map_or(0, |w| w.load(Ordering::Acquire));
                    if v & pte::PRESENT != 0 {
                        a.gens.promote(pte::pfn(v) as usize, seq);
                        bump(&r.young, 1);
                    }
                }
            }
        }
        bump(&r.aging_nanos, t0.elapsed().as_nanos() as u64);
        bump(&r.aging_wait, thread_mmu_lock_wait_nanos() - waited);
    }

    /// Evicts host page `page` if frame `pfn` still backs it (module doc, R2, R3).
    fn evict_page(&self, a: &Active, page: u64, pfn: Pfn) -> Evicted {
        let want_pfn = pfn;
        let inner = &*self.inner;
        let r = &inner.reclaim;
        let _w = inner.mm_writer.lock();
        let backed = {
            let vmas = inner.mmap_lock.read();
            // ORDERING: Relaxed: present PTEs change only under mm_writer, which we hold (H1).
            vmas.find(page).is_some()
                && vmas.pt.entry(page).is_some_and(|w| {
                    let v = w.load(Ordering::Relaxed);
                    v & pte::PRESENT != 0 && pte::pfn(v) == pfn.raw()
                })
                // R5 (docs/invariants.md): a page of a huge page is never evicted. Freeing one
                // frame of the run would leave the marker, so GUP would keep reporting the span as
                // huge and a secondary MMU would map a huge leaf over the freed (and reused) frame.
                // Only a first filter: a huge install in flight (`mmap_lock` read, like us) has
                // stored this PTE but not yet its marker; the write section below decides.
                && marker_level(&vmas.pt, page) == Level::L4K
        };
        if !backed {
            return Evicted::Skipped;
        }
        #[cfg(all(test, not(loom)))]
        tests::after_evict_check();
        let range = NotifierRange {
            start: page_hva(page),
            end: page_hva(page + 1),
            event: InvalidateEvent::Reclaim,
            blockable: true,
        };
        let waited = thread_mmu_lock_wait_nanos();
        let t0 = Instant::now();
        let pair = if cfg!(feature = "broken-evict-no-invalidate") {
            None
        } else {
            Some(InvalidationPair::start(
                inner.notifiers.snapshot(),
                range,
                &inner.counters.invalidate_start,
                &inner.counters.invalidate_end,
            ))
        };
        let nanos = u32::try_from(t0.elapsed().as_nanos()).unwrap_or(u32::MAX);
        bump(&r.pairs, 1);
        bump(&r.invalidate_wait, thread_mmu_lock_wait_nanos() - waited);
        {
            let mut l = r.latencies.lock();
            if l.len() < MAX_LATENCY_SAMPLES {
                l.push(nanos);
            }
        }
        let outcome = {
            let vmas = inner.mmap_lock.write();
            match vmas.pt.entry(page) {
                None => Evicted::Skipped,
                Some(w) => {
                    // ORDERING: Relaxed: mmap_lock write excludes every other PTE user (H3).
                    let v = w.load(Ordering::Relaxed);
                    let (pfn, tag) = pte_frame(page, v);
                    // Re-checked under `mmap_lock` write, which no huge install holds across
                    // (installs run under `mmap_lock` read and store the marker last): the marker
                    // seen here is final. A page whose marker landed after the read check above
                    // belongs to a huge page, whose frames are not charged (R5, C3 in
                    // docs/locking.md): evicting it freed a frame out of a live THP and uncharged
                    // a frame never charged (the charge underflow of `torture_reclaim_thp`).
                    if v & pte::PRESENT == 0
                        || pfn != want_pfn
                        || marker_level(&vmas.pt, page) != Level::L4K
                    {
                        Evicted::Skipped
                    } else if let Some(slot) = inner
                        .arena
                        .frame_contents(pfn)
                        .and_then(|words| a.swap.store(words))
                    {
                        // ORDERING: Relaxed: as the load; mmap_lock's release publishes it.
                        w.store(swap_entry(slot), Ordering::Relaxed);
                        if inner.arena.free(pfn, tag).is_err() {
                            inner.arena.report_stale(pfn, tag, inner.arena.tag(pfn));
                        }
                        r.uncharge(1);
                        bump(&r.evicted, 1);
                        Evicted::Yes
                    } else {
                        Evicted::SwapFull
                    }
                }
            }
        };
        if let Some(p) = pair {
            p.end();
        }
        outcome
    }
}

// Keeps the min-generation constant referenced where the protocol states it.
const _: () = assert!(MIN_NR_GENS < MAX_NR_GENS);

#[cfg(all(test, not(loom)))]
#[path = "reclaim_tests.rs"]
mod tests;
