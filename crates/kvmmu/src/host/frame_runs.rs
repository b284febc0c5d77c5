//! Contiguous frame runs (huge pages) in the arena: [`FrameArena::alloc_run`],
//! [`FrameArena::free_run`] and their free lists (`frames.rs` invariant 6).

use super::{FrameArena, FrameTag, HOST_PAGE_MASK, RUN_1G, RUN_2M, WORDS_PER_FRAME};
use crate::addr::Pfn;
use crate::host::HostError;
use crate::sync::atomic::{Ordering, fence};
use crate::sync::percpu::stripe;

/// The free lists of contiguous, aligned frame runs (2 MiB and 1 GiB).
#[derive(Default)]
pub(super) struct RunLists {
    /// First frames of free runs of [`RUN_2M`] frames.
    pub(super) r2m: Vec<u32>,
    /// First frames of free runs of [`RUN_1G`] frames.
    pub(super) r1g: Vec<u32>,
    /// Frames handed out from these lists.
    pub(super) reuse_allocs: u64,
    /// Frames put on these lists.
    pub(super) frees: u64,
}

impl FrameArena {
    /// Allocates a zero-filled run of `frames` contiguous frames ([`RUN_2M`] or [`RUN_1G`]),
    /// aligned to its size, backing host pages `first_page..first_page + frames` (invariant 6).
    /// Returns the first frame and the run's generation.
    ///
    /// Errors: [`HostError::OutOfFrames`] when no free run and no room for a fresh one is left
    /// (single frames are never merged back into runs); [`HostError::BadHostPage`] if the last
    /// host page cannot be tagged; [`HostError::InvalidFrameCount`] for another size.
    pub fn alloc_run(&self, first_page: u64, frames: usize) -> Result<(Pfn, u32), HostError> {
        if frames != RUN_2M && frames != RUN_1G {
            return Err(HostError::InvalidFrameCount { frames });
        }
        let last_page = first_page.saturating_add(frames as u64 - 1);
        if last_page > FrameTag::MAX_HOST_PAGE {
            return Err(HostError::BadHostPage {
                host_page: last_page,
            });
        }
        let from_list = {
            let mut r = self.runs.lock();
            let list = if frames == RUN_2M {
                &mut r.r2m
            } else {
                &mut r.r1g
            };
            let got = list.pop();
            if got.is_some() {
                r.reuse_allocs += frames as u64;
            }
            got
        };
        let (first, reused) = match from_list {
            Some(f) => (f as usize, true),
            None => (self.bump_run(frames).ok_or(HostError::OutOfFrames)?, false),
        };
        let tags = &self.tags.as_slice()[first..first + frames];
        let mut generation = 0u32;
        for t in tags {
            // ORDERING: Relaxed: the run is ours exclusively (invariant 1, through the run-list
            // mutex or the bump pointer).
            let old = t.load(Ordering::Relaxed);
            assert!(
                old & HOST_PAGE_MASK == 0,
                "frame arena invariant 1 violated: a free run holds an owned frame"
            );
            generation = generation.max((old >> 32) as u32);
        }
        for (i, t) in tags.iter().enumerate() {
            // ORDERING: as in `alloc` (invariant 3): tags first, a SeqCst fence, then zero fill.
            t.store(
                FrameTag::from_parts(first_page + i as u64, generation).0,
                Ordering::Relaxed,
            );
        }
        if reused {
            fence(Ordering::SeqCst);
            for w in
                &self.words.as_slice()[first * WORDS_PER_FRAME..(first + frames) * WORDS_PER_FRAME]
            {
                // ORDERING: as in `alloc`: after the SeqCst fence (invariants 3, 4).
                w.store(0, Ordering::Relaxed);
            }
        }
        Ok((Pfn::new(first as u64), generation))
    }

    /// Takes `frames` never-used frames aligned to `frames` from the bump region; the frames
    /// skipped to align go on this thread's free list (counted allocated, then freed).
    fn bump_run(&self, frames: usize) -> Option<usize> {
        let mut start = 0;
        // ORDERING: Relaxed: as in `bump`.
        let prev = self
            .next_fresh
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                start = n.checked_add(frames - 1)? & !(frames - 1);
                let end = start.checked_add(frames)?;
                (end <= self.nframes).then_some(end)
            })
            .ok()?;
        if start > prev {
            self.stripes[stripe()].with(|s| {
                s.free.extend((prev..start).map(|i| i as u32));
                s.frees += (start - prev) as u64;
            });
        }
        Some(start)
    }

    /// Frees a whole run allocated by [`FrameArena::alloc_run`] whose frame `i` still carries
    /// tag (`first_page + i`, `generation`); the run goes back on its run list.
    ///
    /// Errors (nothing changed): [`HostError::BadPfn`] for a run outside the arena or not
    /// aligned; [`HostError::StaleFree`] naming the first frame whose tag differs.
    pub fn free_run(
        &self,
        first: Pfn,
        frames: usize,
        first_page: u64,
        generation: u32,
    ) -> Result<(), HostError> {
        let f = usize::try_from(first.raw()).unwrap_or(usize::MAX);
        if (frames != RUN_2M && frames != RUN_1G)
            || f % frames != 0
            || f.checked_add(frames).is_none_or(|e| e > self.nframes)
        {
            return Err(HostError::BadPfn { pfn: first });
        }
        let tags = &self.tags.as_slice()[f..f + frames];
        for (i, t) in tags.iter().enumerate() {
            let want = FrameTag::from_parts(first_page + i as u64, generation);
            // ORDERING: Relaxed: a pre-check; the frames are owned by the caller's PTEs, which
            // only it (under `mmap_lock` write) frees.
            let found = t.load(Ordering::Relaxed);
            if found != want.0 {
                return Err(HostError::StaleFree {
                    pfn: Pfn::new((f + i) as u64),
                    expected: want,
                    found: FrameTag::from_word(found),
                });
            }
        }
        let freed = u64::from(generation.wrapping_add(1)) << 32;
        for t in tags {
            // ORDERING: Release, as `free`'s CAS: stale accessors are ordered by invariant 3's
            // fences; the next owner by the run-list mutex.
            t.store(freed, Ordering::Release);
        }
        let mut r = self.runs.lock();
        if frames == RUN_2M {
            r.r2m.push(f as u32);
        } else {
            r.r1g.push(f as u32);
        }
        r.frees += frames as u64;
        Ok(())
    }
}
