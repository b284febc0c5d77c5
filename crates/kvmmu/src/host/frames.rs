//! Simulated physical memory: a frame arena with owner tags.
//!
//! Protocol. The arena is one anonymous mapping of `n * 4096` bytes viewed as `n` frames of 512
//! `AtomicU64` words, plus one tag word per frame. A tag names the owner of an allocated frame
//! (the host page it backs, `hva >> 12`) and a per-frame generation. [`FrameArena::alloc`] hands
//! out a zero-filled frame with a fresh generation; [`FrameArena::free`] requires the exact tag it
//! was given, swaps it for a free value carrying the next generation, and puts the frame on a
//! free list. Every data access names the tag it believes the frame has; the arena checks it and
//! reports a mismatch as [`StaleAccess`] (and counts it) instead of silently accessing a frame
//! that belongs to somebody else.
//!
//! Allocation is a per-thread striped free list (one mutex per stripe, uncontended in the common
//! case) in front of a bump pointer over never-used frames; a thread whose stripe and the bump
//! region are empty steals a batch from another stripe. Each stripe publishes whether its list
//! is non-empty in a hint word, so that an allocation from an empty stripe (every first touch
//! of a fresh host) goes to the bump pointer without taking the stripe's mutex; the hint only
//! orders the attempts, and the mutex-held pop still runs before the arena reports
//! [`HostError::OutOfFrames`] (invariant 7).
//!
//! Invariants:
//! 1. A frame is in exactly one of: never used (index ≥ bump pointer), on exactly one free list,
//!    or allocated. Its tag word has host-page field 0 ("free") exactly when it is not allocated.
//! 2. The generation of a frame's tag changes on every free, so a tag, once freed, never matches
//!    that frame again (until the 32-bit generation wraps, after 2^32 reuses of one frame).
//! 3. `alloc` writes the new tag *before* zero-filling a reused frame, with a `SeqCst` fence in
//!    between; `write_u64` stores the word, then a `SeqCst` fence, then re-reads the tag. So a
//!    stale write either lands before the zero fill (and is erased by it) or its re-check sees the
//!    new tag and is reported: it never lands silently in a frame's new life.
//! 4. `read_u64` re-reads the tag after the word (behind an acquire fence), so a read that returns
//!    a value written in a frame's next life is reported too.
//! 5. The frame counters satisfy `allocated = total_allocs − total_frees` whenever no alloc or
//!    free is in flight.
//! 6. A run (huge page: [`RUN_2M`] or [`RUN_1G`] frames, first frame aligned to the run size) is
//!    handed out by [`FrameArena::alloc_run`] with one generation `G` for all its frames, frame
//!    `i` tagged with host page `first_page + i`. `G` is above every generation any frame of the
//!    run ever had, so invariant 2 holds per frame. A run is freed either whole
//!    ([`FrameArena::free_run`], back on the run list) or frame by frame ([`FrameArena::free`],
//!    after a split); frames on a run list are on no other list (invariant 1).
//! 7. A stripe's `nonempty` hint is written only under its mutex, after every change of its
//!    list, so it is exact whenever the mutex is free; read without the mutex it may be stale,
//!    which only lets an allocation take a never-used frame while a freed one waits on the list
//!    (invariant 1 still holds). `alloc` fails only after a locked pop of its own stripe and a
//!    steal from every other stripe found nothing, as before the hint.

#[path = "frame_runs.rs"]
mod runs;

use super::HostError;
use super::words::AtomicWords;
use crate::addr::Pfn;
use crate::sync::Mutex;
use crate::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering, fence};
use crate::sync::percpu::{STRIPES, stripe};

/// Number of 64-bit words in one 4 KiB frame.
pub const WORDS_PER_FRAME: usize = 512;

/// The largest arena (in frames) we support: pfns must fit the 29-bit field of a host PTE.
pub const MAX_FRAMES: usize = 1 << 29;

/// Frames moved at once when a thread steals from another stripe's free list.
const STEAL_BATCH: usize = 32;

const HOST_PAGE_MASK: u64 = 0xffff_ffff;

/// The owner tag of a frame: which host page it backs plus a generation.
///
/// Layout: bits 0..32 hold `host_page + 1` (0 means free), bits 32..64 the generation.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub struct FrameTag(u64);

impl FrameTag {
    /// The tag of a frame that is not allocated.
    pub const FREE: FrameTag = FrameTag(0);

    /// The largest host page number a tag can name (so the largest backed `hva` is just below
    /// 16 TiB).
    pub const MAX_HOST_PAGE: u64 = HOST_PAGE_MASK - 1;

    /// Builds a tag; `host_page` must be at most [`FrameTag::MAX_HOST_PAGE`].
    pub(crate) const fn from_parts(host_page: u64, generation: u32) -> FrameTag {
        FrameTag(((generation as u64) << 32) | ((host_page + 1) & HOST_PAGE_MASK))
    }

    /// The canonical view of a raw tag word: every free value reads as [`FrameTag::FREE`].
    const fn from_word(word: u64) -> FrameTag {
        if word & HOST_PAGE_MASK == 0 {
            FrameTag::FREE
        } else {
            FrameTag(word)
        }
    }

    /// The host page (`hva >> 12`) the frame backs; `u64::MAX` for [`FrameTag::FREE`].
    pub const fn host_page(self) -> u64 {
        (self.0 & HOST_PAGE_MASK).wrapping_sub(1)
    }

    /// The frame's generation (0 for [`FrameTag::FREE`]).
    pub const fn generation(self) -> u32 {
        (self.0 >> 32) as u32
    }

    /// True for [`FrameTag::FREE`].
    pub const fn is_free(self) -> bool {
        self.0 & HOST_PAGE_MASK == 0
    }

    /// The raw tag word, for caching in a TLB entry.
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// Rebuilds a tag from [`FrameTag::raw`].
    pub const fn from_raw(raw: u64) -> FrameTag {
        FrameTag::from_word(raw)
    }
}

/// An access through a tag that no longer owns the frame.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
#[error("stale access to frame {pfn}: expected tag {expected:?}, found {found:?}")]
pub struct StaleAccess {
    /// The frame accessed.
    pub pfn: Pfn,
    /// The tag the accessor believed the frame had.
    pub expected: FrameTag,
    /// The tag the frame had (at the check that failed).
    pub found: FrameTag,
}

/// A snapshot of the arena's counters.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct FrameStats {
    /// Frames in the arena.
    pub capacity: usize,
    /// Frames allocated now (`total_allocs - total_frees`).
    pub allocated: u64,
    /// Successful allocations so far.
    pub total_allocs: u64,
    /// Successful frees so far.
    pub total_frees: u64,
    /// Stale accesses detected so far.
    pub stale_accesses: u64,
}

/// One stripe of the free list, on its own cache lines.
#[repr(align(128))]
#[derive(Default)]
struct Stripe {
    inner: Mutex<StripeInner>,
    /// `!inner.free.is_empty()`, written under `inner` after every change (invariant 7).
    nonempty: AtomicBool,
}

impl Stripe {
    /// Runs `f` on the stripe under its mutex, then republishes the non-empty hint.
    #[inline]
    fn with<R>(&self, f: impl FnOnce(&mut StripeInner) -> R) -> R {
        let mut s = self.inner.lock();
        let r = f(&mut s);
        // ORDERING: Relaxed: a hint (invariant 7); whoever needs the list itself takes the
        // mutex, whose acquire orders the list's contents.
        self.nonempty.store(!s.free.is_empty(), Ordering::Relaxed);
        r
    }

    /// The hint: false means the list was empty at its last change (invariant 7).
    #[inline]
    fn maybe_nonempty(&self) -> bool {
        // ORDERING: Relaxed: a hint (invariant 7).
        self.nonempty.load(Ordering::Relaxed)
    }
}

#[derive(Default)]
struct StripeInner {
    free: Vec<u32>,
    /// Allocations served from this stripe's free list (by any thread).
    reuse_allocs: u64,
    /// Frees pushed onto this stripe.
    frees: u64,
}

/// The simulated physical memory: `capacity` frames of 512 atomic words each.
pub struct FrameArena {
    words: AtomicWords,
    tags: AtomicWords,
    nframes: usize,
    /// Frames `next_fresh..nframes` have never been allocated (invariant 1).
    next_fresh: AtomicUsize,
    stripes: Box<[Stripe]>,
    /// Free contiguous runs (huge pages freed whole), by size (invariant 6).
    runs: Mutex<runs::RunLists>,
    stale_accesses: AtomicU64,
}

/// Frames in a 2 MiB run.
pub const RUN_2M: usize = 512;
/// Frames in a 1 GiB run.
pub const RUN_1G: usize = 512 * 512;

impl core::fmt::Debug for FrameArena {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("FrameArena")
            .field("stats", &self.stats())
            .finish()
    }
}

impl FrameArena {
    /// Creates an arena of `nframes` frames (lazily populated by the OS).
    ///
    /// Errors: [`HostError::InvalidFrameCount`] for 0 or more than [`MAX_FRAMES`];
    /// [`HostError::Mmap`] if the OS refuses the mapping.
    pub fn new(nframes: usize) -> Result<FrameArena, HostError> {
        if nframes == 0 || nframes > MAX_FRAMES {
            return Err(HostError::InvalidFrameCount { frames: nframes });
        }
        let nwords = nframes
            .checked_mul(WORDS_PER_FRAME)
            .ok_or(HostError::InvalidFrameCount { frames: nframes })?;
        let words = AtomicWords::new(nwords).map_err(HostError::Mmap)?;
        let tags = AtomicWords::new(nframes).map_err(HostError::Mmap)?;
        let stripes = (0..STRIPES).map(|_| Stripe::default()).collect();
        Ok(FrameArena {
            words,
            tags,
            nframes,
            next_fresh: AtomicUsize::new(0),
            stripes,
            runs: Mutex::new(runs::RunLists::default()),
            stale_accesses: AtomicU64::new(0),
        })
    }

    /// Number of frames in the arena.
    pub fn capacity(&self) -> usize {
        self.nframes
    }

    /// Makes the OS back every frame that has never been allocated, now, so that later
    /// allocations do not pay the simulator's first-touch page faults (on a virtualised machine
    /// those cost microseconds each and would dominate any fault-rate measurement). Allocated
    /// frames and their contents are untouched. Safe to call at any time, including concurrently
    /// with allocations.
    pub fn prefault(&self) -> Result<(), HostError> {
        // ORDERING: Relaxed: only a hint of where never-used frames start; populating a frame that
        // an allocator has just taken changes none of its words.
        let first = self.next_fresh.load(Ordering::Relaxed);
        self.tags.populate(first).map_err(HostError::Mmap)?;
        self.words
            .populate(first * WORDS_PER_FRAME)
            .map_err(HostError::Mmap)
    }

    #[inline]
    fn tag_word(&self, pfn: Pfn) -> Option<&AtomicU64> {
        usize::try_from(pfn.raw())
            .ok()
            .and_then(|i| self.tags.as_slice().get(i))
    }

    #[inline]
    fn frame_words(&self, index: usize) -> &[AtomicU64] {
        &self.words.as_slice()[index * WORDS_PER_FRAME..(index + 1) * WORDS_PER_FRAME]
    }

    /// Allocates a zero-filled frame backing `host_page`, with a fresh generation.
    ///
    /// Errors: [`HostError::OutOfFrames`] when every frame is allocated;
    /// [`HostError::BadHostPage`] if `host_page > FrameTag::MAX_HOST_PAGE`.
    pub fn alloc(&self, host_page: u64) -> Result<(Pfn, FrameTag), HostError> {
        if host_page > FrameTag::MAX_HOST_PAGE {
            return Err(HostError::BadHostPage { host_page });
        }
        let home = stripe();
        // An empty-looking home stripe goes to the bump pointer without its mutex; the locked
        // pop still runs before any steal or failure (invariant 7).
        let popped = if self.stripes[home].maybe_nonempty() {
            self.pop(home)
        } else {
            None
        };
        let (index, reused) = match popped {
            Some(i) => (i, true),
            None => match self.bump() {
                Some(i) => (i, false),
                None => match self.pop(home) {
                    Some(i) => (i, true),
                    None => (self.steal(home).ok_or(HostError::OutOfFrames)?, true),
                },
            },
        };
        let word = &self.tags.as_slice()[index];
        // ORDERING: Relaxed: we own the frame exclusively; the free that put it on the list
        // happened-before our pop through the stripe mutex (invariant 1).
        let old = word.load(Ordering::Relaxed);
        assert!(
            old & HOST_PAGE_MASK == 0,
            "frame arena invariant 1 violated: frame {index} on a free list has an owner tag"
        );
        let tag = FrameTag::from_parts(host_page, (old >> 32) as u32);
        // ORDERING: Relaxed store then a SeqCst fence before zeroing (invariant 3): a stale
        // writer's post-check either sees this store or its write is ordered before the zero
        // fill. Other threads learn (pfn, tag) only through the caller's own release (e.g. the
        // host PTE CAS), which orders this store and the zero fill before their accesses.
        word.store(tag.0, Ordering::Relaxed);
        if reused {
            fence(Ordering::SeqCst);
            for w in self.frame_words(index) {
                // ORDERING: Relaxed after the SeqCst fence, which also acts as the release fence
                // that read_u64's acquire fence pairs with (invariant 4).
                w.store(0, Ordering::Relaxed);
            }
        }
        Ok((Pfn::new(index as u64), tag))
    }

    fn pop(&self, stripe: usize) -> Option<usize> {
        self.stripes[stripe].with(|s| {
            let i = s.free.pop()?;
            s.reuse_allocs += 1;
            Some(i as usize)
        })
    }

    fn bump(&self) -> Option<usize> {
        // ORDERING: Relaxed: the bump pointer only partitions never-used frames among
        // allocators; the frames' contents are OS-zeroed and published by the caller.
        self.next_fresh
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.nframes).then_some(n + 1)
            })
            .ok()
    }

    /// Takes one frame from another stripe and moves up to a batch more to `home`.
    fn steal(&self, home: usize) -> Option<usize> {
        let mut batch = [0u32; STEAL_BATCH];
        for k in 1..STRIPES {
            let victim = (home + k) % STRIPES;
            let Some((got, taken)) = self.stripes[victim].with(|v| {
                let got = v.free.pop()?;
                v.reuse_allocs += 1;
                let take = (v.free.len() / 2).min(STEAL_BATCH);
                let from = v.free.len() - take;
                batch[..take].copy_from_slice(&v.free[from..]);
                v.free.truncate(from);
                Some((got, take))
            }) else {
                continue;
            };
            if taken > 0 {
                self.stripes[home].with(|h| h.free.extend_from_slice(&batch[..taken]));
            }
            return Some(got as usize);
        }
        None
    }

    /// Frees `pfn`, which must currently carry exactly `tag`; bumps the frame's generation.
    ///
    /// Errors (nothing changed): [`HostError::BadPfn`] for a pfn outside the arena;
    /// [`HostError::StaleFree`] if the frame's tag is not `tag` (double free, or a free through
    /// a stale tag).
    pub fn free(&self, pfn: Pfn, tag: FrameTag) -> Result<(), HostError> {
        let word = self.tag_word(pfn).ok_or(HostError::BadPfn { pfn })?;
        let stale = |found: u64| HostError::StaleFree {
            pfn,
            expected: tag,
            found: FrameTag::from_word(found),
        };
        if tag.is_free() {
            // ORDERING: Relaxed: only reported in the error.
            return Err(stale(word.load(Ordering::Relaxed)));
        }
        let freed = u64::from(tag.generation().wrapping_add(1)) << 32;
        // ORDERING: AcqRel/Acquire: the CAS is the single point deciding which of several
        // racing frees wins (invariant 1). The next owner is ordered after us by the stripe
        // mutex, and stale accessors by invariant 3's fences, so nothing stronger is needed.
        word.compare_exchange(tag.0, freed, Ordering::AcqRel, Ordering::Acquire)
            .map_err(stale)?;
        self.stripes[stripe()].with(|s| {
            s.free.push(pfn.raw() as u32);
            s.frees += 1;
        });
        Ok(())
    }

    /// The words of frame `pfn` (`None` outside the arena), for copying a whole page to or from
    /// swap; the caller owns the frame exclusively (eviction under `mmap_lock` write after the
    /// invalidation, or a refault before the frame is published).
    pub(super) fn frame_contents(&self, pfn: Pfn) -> Option<&[AtomicU64]> {
        let i = usize::try_from(pfn.raw())
            .ok()
            .filter(|&i| i < self.nframes)?;
        Some(self.frame_words(i))
    }

    /// The frame's current tag ([`FrameTag::FREE`] when free or outside the arena).
    pub fn tag(&self, pfn: Pfn) -> FrameTag {
        // ORDERING: Acquire: a caller that sees an owner tag also sees the zero fill that
        // preceded its publication (harmless extra strength on a query path).
        self.tag_word(pfn).map_or(FrameTag::FREE, |w| {
            FrameTag::from_word(w.load(Ordering::Acquire))
        })
    }

    #[inline(always)]
    fn check(&self, pfn: Pfn, expect: FrameTag, word: u64) -> Result<(), StaleAccess> {
        // `expect` free never matches: a free tag word has host-page field 0, and an owner tag
        // never does, so comparing the words alone would accept a FREE `expect` on a free frame.
        if expect.is_free() || word != expect.0 {
            return Err(self.stale(pfn, expect, word));
        }
        Ok(())
    }

    #[cold]
    #[inline(never)]
    fn stale(&self, pfn: Pfn, expect: FrameTag, word: u64) -> StaleAccess {
        self.report_stale(pfn, expect, FrameTag::from_word(word))
    }

    #[inline(always)]
    fn locate(&self, pfn: Pfn, word: usize) -> Result<(&AtomicU64, &AtomicU64), HostError> {
        if word >= WORDS_PER_FRAME {
            return Err(HostError::BadWordIndex { word });
        }
        let tags = self.tags.as_slice();
        // Built only on the error branch: an eager `ok_or(HostError::BadPfn { .. })` constructs
        // and drops a `HostError` (which has a destructor) on every access.
        let Some(index) = usize::try_from(pfn.raw()).ok().filter(|&i| i < tags.len()) else {
            return Err(HostError::BadPfn { pfn });
        };
        // `index < nframes` and the words array holds `nframes * WORDS_PER_FRAME` words, so the
        // word (`word < WORDS_PER_FRAME`, checked above) is in bounds.
        let data = &self.words.as_slice()[index * WORDS_PER_FRAME + word];
        Ok((&tags[index], data))
    }

    /// [`FrameArena::locate`] for the vCPU's access path: a `pfn` outside the arena or a
    /// `word >= 512` names no frame at all, and is reported (and counted) as found
    /// [`FrameTag::FREE`].
    #[inline(always)]
    fn locate_tagged(
        &self,
        pfn: Pfn,
        word: usize,
        expect: FrameTag,
    ) -> Result<(&AtomicU64, &AtomicU64), StaleAccess> {
        self.locate(pfn, word)
            .map_err(|_| self.report_stale(pfn, expect, FrameTag::FREE))
    }

    /// Reads word `word` of frame `pfn`, which must carry tag `expect` before and after the read.
    ///
    /// Errors: [`HostError::Stale`] (counted in [`FrameStats::stale_accesses`]) on a tag
    /// mismatch; [`HostError::BadWordIndex`] for `word >= 512`; [`HostError::BadPfn`].
    #[inline]
    pub fn read_u64(&self, pfn: Pfn, word: usize, expect: FrameTag) -> Result<u64, HostError> {
        let (tag, data) = self.locate(pfn, word)?;
        self.read_located(pfn, tag, data, expect)
            .map_err(HostError::Stale)
    }

    /// Writes `v` to word `word` of frame `pfn`, which must carry tag `expect` before and after
    /// the write. A write whose re-check fails was performed on a frame that changed owner: it is
    /// reported, not hidden.
    ///
    /// Errors: as [`FrameArena::read_u64`].
    #[inline]
    pub fn write_u64(
        &self,
        pfn: Pfn,
        word: usize,
        expect: FrameTag,
        v: u64,
    ) -> Result<(), HostError> {
        let (tag, data) = self.locate(pfn, word)?;
        self.write_located(pfn, tag, data, expect, v)
            .map_err(HostError::Stale)
    }

    /// [`FrameArena::read_u64`] for the vCPU's access path: the same checks, with every failure
    /// reported as a [`StaleAccess`] (a `Copy` error, so the hot path has nothing to drop). A
    /// `pfn` outside the arena or a `word >= 512` names no frame at all, and is reported as found
    /// [`FrameTag::FREE`] (and counted).
    #[inline(always)]
    pub fn read_tagged(&self, pfn: Pfn, word: usize, expect: FrameTag) -> Result<u64, StaleAccess> {
        let (tag, data) = self.locate_tagged(pfn, word, expect)?;
        self.read_located(pfn, tag, data, expect)
    }

    /// [`FrameArena::read_tagged`] for a caller that loaded `expect` itself with
    /// [`FrameArena::tag`] just before (a vCPU's TLB fill): that `Acquire` load, program-ordered
    /// before this read's load of the word, is the check before the read, so only the check after
    /// it (invariant 4) is made here. A `FREE` `expect` is reported, as by `read_tagged`.
    #[inline(always)]
    pub fn read_after_tag(
        &self,
        pfn: Pfn,
        word: usize,
        expect: FrameTag,
    ) -> Result<u64, StaleAccess> {
        let (tag, data) = self.locate_tagged(pfn, word, expect)?;
        self.read_rechecked(pfn, tag, data, expect)
    }

    /// [`FrameArena::write_tagged`] for a caller that loaded `expect` with [`FrameArena::tag`]
    /// just before, as [`FrameArena::read_after_tag`]: that `Acquire` load is the check before the
    /// store (the store cannot be performed before it), so only the check after it is made here.
    /// A `FREE` `expect` is refused before the store.
    #[inline(always)]
    pub fn write_after_tag(
        &self,
        pfn: Pfn,
        word: usize,
        expect: FrameTag,
        v: u64,
    ) -> Result<(), StaleAccess> {
        let (tag, data) = self.locate_tagged(pfn, word, expect)?;
        if expect.is_free() {
            // ORDERING: Relaxed: only reported.
            return Err(self.stale(pfn, expect, tag.load(Ordering::Relaxed)));
        }
        self.write_rechecked(pfn, tag, data, expect, v)
    }

    /// [`FrameArena::write_u64`] for the vCPU's access path, with errors as in
    /// [`FrameArena::read_tagged`].
    #[inline(always)]
    pub fn write_tagged(
        &self,
        pfn: Pfn,
        word: usize,
        expect: FrameTag,
        v: u64,
    ) -> Result<(), StaleAccess> {
        let (tag, data) = self.locate_tagged(pfn, word, expect)?;
        self.write_located(pfn, tag, data, expect, v)
    }

    /// Stores the bits of `v` selected by `mask` into a word and keeps its other bits, atomically
    /// (a compare-and-swap loop, so a concurrent write to the other bits is never lost), with the
    /// checks of [`FrameArena::write_tagged`]; returns the word's new value. The vCPU's partial-word
    /// (byte) stores.
    pub fn write_masked_tagged(
        &self,
        pfn: Pfn,
        word: usize,
        expect: FrameTag,
        v: u64,
        mask: u64,
    ) -> Result<u64, StaleAccess> {
        let (tag, data) = self.locate_tagged(pfn, word, expect)?;
        // ORDERING: as write_located: Relaxed check, then a Release update so a reader observing
        // the new value synchronises with us, then the SeqCst fence before re-checking the tag
        // (the store-buffering pattern with alloc's fence, invariant 3).
        self.check(pfn, expect, tag.load(Ordering::Relaxed))?;
        let mut cur = data.load(Ordering::Relaxed);
        let new = loop {
            let next = (cur & !mask) | (v & mask);
            // ORDERING: Release on success (see above); Relaxed on failure, we only retry.
            match data.compare_exchange_weak(cur, next, Ordering::Release, Ordering::Relaxed) {
                Ok(_) => break next,
                Err(actual) => cur = actual,
            }
        };
        fence(Ordering::SeqCst);
        self.check(pfn, expect, tag.load(Ordering::Relaxed))?;
        Ok(new)
    }

    #[inline(always)]
    fn read_located(
        &self,
        pfn: Pfn,
        tag: &AtomicU64,
        data: &AtomicU64,
        expect: FrameTag,
    ) -> Result<u64, StaleAccess> {
        // ORDERING: Relaxed: the caller's knowledge of `expect` came through a release/acquire
        // publication that already orders the frame's zero fill before this access.
        self.check(pfn, expect, tag.load(Ordering::Relaxed))?;
        self.read_rechecked(pfn, tag, data, expect)
    }

    /// The read and the check after it (invariant 4); the caller made the check before it.
    #[inline(always)]
    fn read_rechecked(
        &self,
        pfn: Pfn,
        tag: &AtomicU64,
        data: &AtomicU64,
        expect: FrameTag,
    ) -> Result<u64, StaleAccess> {
        // ORDERING: Relaxed load, then an acquire fence before re-reading the tag: if the value
        // came from a later owner (a release store, or a zero fill behind alloc's SeqCst fence)
        // the fence synchronises with it and the re-read sees the new tag (invariant 4).
        let v = data.load(Ordering::Relaxed);
        fence(Ordering::Acquire);
        self.check(pfn, expect, tag.load(Ordering::Relaxed))?;
        Ok(v)
    }

    #[inline(always)]
    fn write_located(
        &self,
        pfn: Pfn,
        tag: &AtomicU64,
        data: &AtomicU64,
        expect: FrameTag,
        v: u64,
    ) -> Result<(), StaleAccess> {
        // ORDERING: Relaxed: see read_located.
        self.check(pfn, expect, tag.load(Ordering::Relaxed))?;
        self.write_rechecked(pfn, tag, data, expect, v)
    }

    /// The store and the check after it (invariant 3); the caller made the check before it.
    #[inline(always)]
    fn write_rechecked(
        &self,
        pfn: Pfn,
        tag: &AtomicU64,
        data: &AtomicU64,
        expect: FrameTag,
        v: u64,
    ) -> Result<(), StaleAccess> {
        // ORDERING: Release so that a reader observing this value synchronises with us
        // (invariant 4); then a SeqCst fence pairing with alloc's fence (invariant 3) so the
        // re-read of the tag cannot miss a reallocation our store raced with. This is a
        // store-buffering (Dekker) pattern — we store data then load the tag, alloc stores the
        // tag then the zero fill — and no weaker ordering forbids its bad outcome: x86 itself
        // lets a load pass an earlier store (the store buffer), so without a StoreLoad barrier a
        // stale write could land after the zero fill while its re-check reads the old tag, an
        // undetected corruption of the new owner. The only cheaper schemes move the barrier to
        // the allocator as a process-wide one (`membarrier`, or an mprotect IPI), which needs a
        // syscall outside our dependencies and cannot be modelled by loom.
        data.store(v, Ordering::Release);
        fence(Ordering::SeqCst);
        self.check(pfn, expect, tag.load(Ordering::Relaxed))
    }

    /// Records a stale translation found by a caller's own check (e.g. a vCPU validating a TLB fill
    /// against the host page it expects) and returns it as an error, counted like the arena's own.
    pub fn report_stale(&self, pfn: Pfn, expected: FrameTag, found: FrameTag) -> StaleAccess {
        // ORDERING: Relaxed: a statistics counter.
        self.stale_accesses.fetch_add(1, Ordering::Relaxed);
        StaleAccess {
            pfn,
            expected,
            found,
        }
    }

    /// The arena's counters (exact when no alloc/free is in flight, invariant 5).
    pub fn stats(&self) -> FrameStats {
        let (mut reuse, mut frees) = (0u64, 0u64);
        for s in self.stripes.iter() {
            let s = s.inner.lock();
            reuse += s.reuse_allocs;
            frees += s.frees;
        }
        {
            let r = self.runs.lock();
            reuse += r.reuse_allocs;
            frees += r.frees;
        }
        // ORDERING: Relaxed: statistics.
        let fresh = self.next_fresh.load(Ordering::Relaxed) as u64;
        let total_allocs = fresh + reuse;
        FrameStats {
            capacity: self.nframes,
            allocated: total_allocs.saturating_sub(frees),
            total_allocs,
            total_frees: frees,
            stale_accesses: self.stale_accesses.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
#[path = "frames_tests.rs"]
mod tests;
