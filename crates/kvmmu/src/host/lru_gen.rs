//! MGLRU-like generations over a range of host pages (`mm/vmscan.c` aging, driven the way the
//! lru_gen debugfs file's `+ memcg node max_gen can_swap force_scan` command drives it).
//!
//! Protocol: every resident page of the tracked range sits in one generation. An aging pass
//! ([`LruGen::age`]) creates a new youngest generation and ages the range in chunks of up to
//! [`AGING_CHUNK_PAGES`] pages (a chunk that would end inside a huge page extends to its end),
//! one [`HostMm::clear_young_into`] per chunk (so one
//! `clear_young_bitmap` notifier call per subscriber per chunk, not one per page); each resident
//! page whose young state — host PTE or any secondary MMU — was set moves to the new generation,
//! and the young state of every page of the chunk is cleared.
//! [`LruGen::find_generation`] answers the selftest's question: the oldest generation holding
//! more than a given number of pages.
//!
//! Invariants:
//! 1. Generations only grow: `min_gen <= gen(page) <= max_gen` for every tracked page, and a pass
//!    moves pages only to the generation it created.
//! 2. A page with no frame (never touched, or discarded) is not resident and counts in no
//!    generation; it keeps its generation number for when it becomes resident again.
//! 3. The tracker is owned by one aging thread (`&mut self`), like one `lru_gen_do_aging` caller;
//!    the host and the VMs may be used concurrently from other threads.

use super::mm::{check_mapped, page_range};
use super::{HostError, HostMm, YoungBitmap};
use crate::addr::{Hva, PAGE_SIZE};
use crate::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Pages aged per range call by [`LruGen::age`] (one leaf page table's worth): bounds the
/// bitmap and how long one notifier call keeps a secondary MMU busy.
pub const AGING_CHUNK_PAGES: u64 = 512;

/// What one aging pass did.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct AgingPass {
    /// The generation the pass created.
    pub generation: u32,
    /// Resident pages the pass looked at.
    pub resident: u64,
    /// Pages found young (moved to the new generation).
    pub young: u64,
}

/// One bin of a working-set report ([`LruGen::working_set`]): resident memory by idle age,
/// like crosvm's balloon `WorkingSetBucket`.
#[derive(Clone, Copy, PartialEq, Debug)]
pub struct WorkingSetBin {
    /// Aging passes since these pages were last found young (the last bin: at least this many).
    pub idle_passes: u32,
    /// Time since the pass that last found them young (the oldest such pass for the last bin).
    pub idle: Duration,
    /// Resident bytes in the bin.
    pub bytes: u64,
}

/// A working-set estimate of one tracked range: bins of {idle age, bytes}, youngest first, whose
/// bytes add up to the range's resident memory.
#[derive(Clone, PartialEq, Debug, Default)]
pub struct WorkingSet {
    /// The bins, youngest first.
    pub bins: Vec<WorkingSetBin>,
    /// Resident bytes of the range (the bins' total).
    pub resident_bytes: u64,
}

/// Generations of the pages of one host range.
#[derive(Debug)]
pub struct LruGen {
    host: HostMm,
    start: Hva,
    gens: Vec<u32>,
    max_gen: u32,
    /// When each generation was created (index = generation; 0 = tracking start).
    born: Vec<Instant>,
}

impl LruGen {
    /// Tracks `[hva, hva + len)` (page aligned, mapped); every page starts in generation 0.
    ///
    /// Errors: the range errors of [`HostMm::clear_young`] ([`HostError::ZeroLength`],
    /// [`HostError::Unaligned`], [`HostError::Overflow`], [`HostError::OutOfRange`]),
    /// [`HostError::NotMapped`] if a page of the range is not mapped (both checked before anything
    /// is sized by the range), and [`HostError::NoMemory`] if the generation array (4 bytes per
    /// page) cannot be allocated.
    pub fn new(host: &HostMm, hva: Hva, len: u64) -> Result<LruGen, HostError> {
        let (s, e) = page_range(hva, len)?;
        check_mapped(&host.inner.mmap_lock.read(), s, e)?;
        let n = usize::try_from(e - s).map_err(|_| HostError::Overflow { hva, len })?;
        let mut gens = Vec::new();
        gens.try_reserve_exact(n).map_err(|_| HostError::NoMemory {
            bytes: (e - s) * size_of::<u32>() as u64,
        })?;
        gens.resize(n, 0);
        Ok(LruGen {
            host: host.clone(),
            start: hva,
            gens,
            max_gen: 0,
            born: vec![Instant::now()],
        })
    }

    fn page_hva(&self, i: usize) -> Hva {
        Hva::new(self.start.raw() + i as u64 * PAGE_SIZE)
    }

    /// One aging pass (see the module doc): a new generation, and every young resident page moved
    /// into it.
    ///
    /// Errors: [`HostError::NotMapped`] if part of the range was unmapped since [`LruGen::new`];
    /// the chunks before the one holding it have been aged, and if that moved a page the new
    /// generation exists (`max_gen` includes it, keeping invariant 1).
    pub fn age(&mut self) -> Result<AgingPass, HostError> {
        let generation = self.max_gen + 1;
        let mut pass = AgingPass {
            generation,
            ..AgingPass::default()
        };
        let started = Instant::now();
        let result = self.age_chunks(&mut pass);
        if result.is_ok() || pass.young > 0 {
            self.max_gen = generation;
            self.born.push(started);
        }
        result.map(|()| pass)
    }

    /// The chunks of [`LruGen::age`], counting into `pass`.
    fn age_chunks(&mut self, pass: &mut AgingPass) -> Result<(), HostError> {
        let generation = pass.generation;
        let total = self.gens.len() as u64;
        let mut young = YoungBitmap::new(self.start, 0)?;
        let mut first = 0u64;
        while first < total {
            let mut pages = AGING_CHUNK_PAGES.min(total - first);
            // Never cut a huge page (one young bit, like a folio): a chunk ending inside one
            // extends to its end, so the page's young state is seen whole by one pass.
            if first + pages < total
                && let Some(p) = self
                    .host
                    .host_pte(self.page_hva((first + pages - 1) as usize))
                && p.present
                && p.level != crate::addr::Level::L4K
            {
                let span = p.level.pages();
                let last = self.start.page() + first + pages - 1;
                let end = (last / span + 1) * span - self.start.page();
                pages = end.min(total) - first;
            }
            young.reset(self.page_hva(first as usize), pages)?;
            self.host.clear_young_into(&mut young)?;
            for k in 0..pages {
                let i = (first + k) as usize;
                let a = self.page_hva(i);
                match self.host.host_pte(a) {
                    None => return Err(HostError::NotMapped { hva: a }),
                    Some(p) if !p.present => continue,
                    Some(_) => {}
                }
                pass.resident += 1;
                if young.is_young(k) {
                    self.gens[i] = generation;
                    pass.young += 1;
                }
            }
            first += pages;
        }
        Ok(())
    }

    /// The working-set estimate (module doc): resident pages binned by the number of aging passes
    /// since one last found them young, bins `0..nbins-1` one pass each and the last bin everything
    /// older (`nbins` is clamped to 1..=64). Pages never found young count from tracking start.
    pub fn working_set(&self, nbins: usize) -> WorkingSet {
        let nbins = nbins.clamp(1, 64);
        let now = Instant::now();
        let h = self.histogram();
        let mut ws = WorkingSet::default();
        for k in 0..nbins as u32 {
            let last = k as usize + 1 == nbins;
            // Generations `max_gen - k` (or every older one, for the last bin).
            let Some(g) = self.max_gen.checked_sub(k) else {
                break;
            };
            let pages: u64 = if last {
                h[..=g as usize].iter().sum()
            } else {
                h[g as usize]
            };
            let bytes = pages * PAGE_SIZE;
            ws.resident_bytes += bytes;
            ws.bins.push(WorkingSetBin {
                idle_passes: k,
                idle: now.saturating_duration_since(self.born[g as usize]),
                bytes,
            });
        }
        ws
    }

    /// Page indexes (from the range's start) found young by the last aging pass, in order.
    pub fn young_in_last_pass(&self) -> impl Iterator<Item = u64> + '_ {
        let g = self.max_gen;
        self.gens
            .iter()
            .enumerate()
            .filter(move |(_, x)| **x == g && g > 0)
            .map(|(i, _)| i as u64)
    }

    /// The youngest generation.
    pub fn max_gen(&self) -> u32 {
        self.max_gen
    }

    /// The oldest generation that still holds a resident page (`max_gen` if none does).
    pub fn min_gen(&self) -> u32 {
        let h = self.histogram();
        (0..=self.max_gen)
            .find(|g| h[*g as usize] > 0)
            .unwrap_or(self.max_gen)
    }

    /// Resident pages per generation, index = generation, `0..=max_gen`.
    pub fn histogram(&self) -> Vec<u64> {
        let mut h = vec![0u64; self.max_gen as usize + 1];
        for (i, g) in self.gens.iter().enumerate() {
            if self
                .host
                .host_pte(self.page_hva(i))
                .is_some_and(|p| p.present)
            {
                h[*g as usize] += 1;
            }
        }
        h
    }

    /// Resident pages in generation `generation`.
    pub fn pages_in(&self, generation: u32) -> u64 {
        self.histogram()
            .get(generation as usize)
            .copied()
            .unwrap_or(0)
    }

    /// The oldest generation in `[min_gen, max_gen]` holding more than `pages` resident pages
    /// (the selftest's `lru_gen_find_generation`), or `None`.
    pub fn find_generation(&self, pages: u64) -> Option<u32> {
        let h = self.histogram();
        (0..=self.max_gen).find(|g| h[*g as usize] > pages)
    }
}

/// MGLRU's minimum number of generations: the two youngest are never evicted from, so a page
/// faulted in or found young always survives at least one more aging pass.
pub const MIN_NR_GENS: u32 = 2;

/// The generation of every frame of an arena (MGLRU keeps it in the folio's flags): the sequence
/// number of the youngest generation when the frame was faulted in or last found young.
///
/// Protocol (what [`super::reclaim`] does with it): a frame faulted in gets `max_seq`
/// ([`FrameGens::fault_in`]); an aging pass publishes `max_seq + 1` first
/// ([`FrameGens::new_generation`]) and then moves every frame found young to it
/// ([`FrameGens::promote`]); eviction takes frames whose sequence is at most `min_seq`
/// ([`FrameGens::is_evictable`]) and bumps `min_seq` when a whole scan finds none
/// ([`FrameGens::retire_oldest`]).
///
/// Invariants:
/// 1. `min_seq + MIN_NR_GENS <= max_seq + 1` whenever eviction may take a frame: eviction never
///    takes a frame of the two youngest generations.
/// 2. `min_seq` and `max_seq` only grow; a frame's sequence only grows while it stays allocated
///    (a sequence below `min_seq` reads as `min_seq`).
/// 3. Sequences are hints: a frame freed and reallocated between a scan and its eviction is
///    re-checked against the host PTE by the evictor, so a stale sequence never evicts a wrong page.
pub(crate) struct FrameGens {
    seq: Box<[AtomicU32]>,
    min_seq: AtomicU32,
    max_seq: AtomicU32,
}

impl FrameGens {
    /// Generations for `frames` frames, all in generation 0; `None` if the array (4 bytes per
    /// frame) cannot be allocated.
    pub(crate) fn new(frames: usize) -> Option<FrameGens> {
        let mut seq = Vec::new();
        seq.try_reserve_exact(frames).ok()?;
        seq.resize_with(frames, || AtomicU32::new(0));
        Some(FrameGens {
            seq: seq.into_boxed_slice(),
            // Generation 0 and 1 exist from the start: the two youngest (invariant 1).
            min_seq: AtomicU32::new(0),
            max_seq: AtomicU32::new(1),
        })
    }

    /// Frames tracked.
    pub(crate) fn frames(&self) -> usize {
        self.seq.len()
    }

    /// `(min_seq, max_seq)`.
    pub(crate) fn seqs(&self) -> (u32, u32) {
        // ORDERING: Relaxed: hints (invariant 3); the evictor re-checks under host locks.
        (
            self.min_seq.load(Ordering::Relaxed),
            self.max_seq.load(Ordering::Relaxed),
        )
    }

    /// True if eviction may take a frame now (invariant 1).
    pub(crate) fn can_evict(&self) -> bool {
        let (min, max) = self.seqs();
        min + MIN_NR_GENS <= max
    }

    /// A frame was faulted in: it joins the youngest generation.
    #[inline]
    pub(crate) fn fault_in(&self, pfn: usize) {
        if let Some(s) = self.seq.get(pfn) {
            // ORDERING: Relaxed: invariant 3.
            s.store(self.max_seq.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }

    /// Starts a new youngest generation; returns its sequence number.
    pub(crate) fn new_generation(&self) -> u32 {
        // ORDERING: Relaxed: invariant 3.
        self.max_seq.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Moves a frame found young to generation `seq` (never backwards, invariant 2).
    pub(crate) fn promote(&self, pfn: usize, seq: u32) {
        if let Some(s) = self.seq.get(pfn) {
            // ORDERING: Relaxed: invariant 3.
            s.fetch_max(seq, Ordering::Relaxed);
        }
    }

    /// True if frame `pfn` lies in the oldest generation (or below it).
    #[inline]
    pub(crate) fn is_evictable(&self, pfn: usize, min_seq: u32) -> bool {
        // ORDERING: Relaxed: invariant 3.
        self.seq
            .get(pfn)
            .is_some_and(|s| s.load(Ordering::Relaxed) <= min_seq)
    }

    /// The oldest generation `min_seq` is empty: retire it, unless that would break invariant 1.
    /// Returns true if `min_seq` moved.
    pub(crate) fn retire_oldest(&self, min_seq: u32) -> bool {
        let max = self.max_seq.load(Ordering::Relaxed);
        if min_seq + MIN_NR_GENS > max {
            return false;
        }
        // ORDERING: Relaxed: invariant 3; the CAS only keeps two retirers from skipping a
        // generation.
        self.min_seq
            .compare_exchange(min_seq, min_seq + 1, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }

    /// Resident frames per generation, oldest first, from `min_seq` to `max_seq`, counting only
    /// frames for which `allocated(pfn)` holds.
    pub(crate) fn histogram(&self, allocated: impl Fn(usize) -> bool) -> Vec<u64> {
        let (min, max) = self.seqs();
        let mut h = vec![0u64; (max - min + 1) as usize];
        for (pfn, s) in self.seq.iter().enumerate() {
            if allocated(pfn) {
                // ORDERING: Relaxed: a statistic.
                let g = s.load(Ordering::Relaxed).clamp(min, max);
                h[(g - min) as usize] += 1;
            }
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::{HostConfig, Prot};

    #[test]
    fn accessed_pages_move_to_the_new_generation_and_others_stay() {
        let host = HostMm::new(HostConfig { frames: 64 }).unwrap();
        let hva = host.mmap(8 * PAGE_SIZE, Prot::READ | Prot::WRITE).unwrap();
        for p in 0..6 {
            host.write_u64(Hva::new(hva.raw() + p * PAGE_SIZE), p)
                .unwrap();
        }
        let mut lru = LruGen::new(&host, hva, 8 * PAGE_SIZE).unwrap();
        let pass = lru.age().unwrap();
        assert_eq!((pass.generation, pass.resident, pass.young), (1, 6, 6));
        assert_eq!(lru.find_generation(5), Some(1));
        for p in 0..2 {
            host.read_u64(Hva::new(hva.raw() + p * PAGE_SIZE)).unwrap();
        }
        let pass = lru.age().unwrap();
        assert_eq!((pass.generation, pass.young), (2, 2));
        assert_eq!(lru.histogram(), vec![0, 4, 2]);
        assert_eq!(lru.min_gen(), 1);
        assert_eq!(lru.find_generation(3), Some(1));
        assert_eq!(lru.find_generation(4), None);
        assert_eq!(lru.pages_in(2), 2);
    }

    #[test]
    fn a_pass_cut_short_by_an_unmap_keeps_generations_consistent() {
        // Two chunks; the second loses a page after tracking starts.
        let pages = AGING_CHUNK_PAGES + 8;
        let host = HostMm::new(HostConfig { frames: 64 }).unwrap();
        let hva = host
            .mmap(pages * PAGE_SIZE, Prot::READ | Prot::WRITE)
            .unwrap();
        for p in [0, 1, AGING_CHUNK_PAGES + 1] {
            host.write_u64(Hva::new(hva.raw() + p * PAGE_SIZE), p)
                .unwrap();
        }
        let mut lru = LruGen::new(&host, hva, pages * PAGE_SIZE).unwrap();
        let hole = Hva::new(hva.raw() + (AGING_CHUNK_PAGES + 4) * PAGE_SIZE);
        host.munmap(hole, PAGE_SIZE).unwrap();
        assert!(matches!(lru.age(), Err(HostError::NotMapped { hva }) if hva == hole));
        // The first chunk's young pages moved to generation 1, which therefore exists; the
        // second chunk's resident page stayed in generation 0.
        assert_eq!(lru.max_gen(), 1);
        assert_eq!(lru.histogram(), vec![1, 2]);
        // The second chunk was not aged: its young page is still young.
        assert!(
            host.test_young(Hva::new(hva.raw() + (AGING_CHUNK_PAGES + 1) * PAGE_SIZE))
                .unwrap()
        );
    }

    #[test]
    fn working_set_bins_add_up_to_resident_memory_and_age_with_passes() {
        let host = HostMm::new(HostConfig { frames: 64 }).unwrap();
        let hva = host.mmap(8 * PAGE_SIZE, Prot::READ | Prot::WRITE).unwrap();
        for p in 0..6 {
            host.write_u64(Hva::new(hva.raw() + p * PAGE_SIZE), p)
                .unwrap();
        }
        let mut lru = LruGen::new(&host, hva, 8 * PAGE_SIZE).unwrap();
        lru.age().unwrap();
        host.read_u64(hva).unwrap();
        lru.age().unwrap();
        assert_eq!(lru.young_in_last_pass().collect::<Vec<_>>(), vec![0]);
        let ws = lru.working_set(4);
        let bytes: Vec<u64> = ws.bins.iter().map(|b| b.bytes / PAGE_SIZE).collect();
        assert_eq!(bytes, vec![1, 5, 0], "1 page young now, 5 one pass ago");
        assert_eq!(ws.resident_bytes, 6 * PAGE_SIZE);
        assert!(ws.bins[0].idle <= ws.bins[1].idle);
    }

    #[test]
    fn unmapped_range_is_refused() {
        let host = HostMm::new(HostConfig { frames: 16 }).unwrap();
        assert!(LruGen::new(&host, Hva::new(1 << 32), PAGE_SIZE).is_err());
        assert!(matches!(
            LruGen::new(&host, Hva::new(1 << 32), 0),
            Err(HostError::ZeroLength)
        ));
    }
}
