//! The per-vCPU software TLB: a set-associative cache of gfn → host frame translations, owned by one
//! vCPU thread (plain fields, no atomics, no locks).
//!
//! # Protocol
//!
//! 1. A guest access looks the gfn up ([`Tlb::lookup`]); on a hit it uses the entry without walking
//!    the page tables; on a miss the vCPU walks, then fills the entry ([`Tlb::insert`]).
//! 2. The vCPU empties the TLB ([`Tlb::flush_all`]) whenever it takes a `TlbFlush` request
//!    (`crate::vm::request`), before its next guest access; that is what makes a remote TLB flush
//!    complete (DESIGN invariant 2, docs/invariants.md).
//! 3. [`Tlb::flush_gfn`] drops one translation (a local `INVLPG`, e.g. after the vCPU's own fault
//!    changed that gfn's SPTE).
//!
//! # Geometry
//!
//! `entries` (rounded up to a power of two, clamped to `WAYS ..= MAX_ENTRIES`) split into sets of
//! [`Tlb::WAYS`] = 4 ways, indexed by the low bits of the gfn like a hardware STLB indexes by the low
//! virtual-page bits, so consecutive gfns use different sets. The default, [`Tlb::DEFAULT_ENTRIES`] =
//! 2048 (512 sets × 4), is a real second-level TLB's 1536 entries rounded up. Each set's tags,
//! validity generations and tree-PLRU bits share one cache line; the entries sit in a parallel array,
//! so a hit touches two lines and a miss one.
//!
//! # Invariants
//!
//! 1. A way is valid iff its generation equals the TLB's current generation (never 0). `flush_all`
//!    advances the generation, invalidating every way in O(1); when the generation would wrap to 0
//!    every way's generation is reset to 0 first, so no way from before the wrap can look valid.
//! 2. At most one valid way per set holds a given gfn (`insert` replaces an existing translation).
//! 3. A lookup matches on the gfn passed to `insert`; changing `gfn` through the `&mut TlbEntry` that
//!    `lookup` returns does not re-index the entry.

use crate::addr::{Gfn, Pfn};

/// One cached translation.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct TlbEntry {
    /// The guest frame translated.
    pub gfn: Gfn,
    /// The host frame it maps to.
    pub pfn: Pfn,
    /// The host frame's owner tag when the translation was made (opaque here; the vCPU checks it
    /// against the frame to detect a stale translation).
    pub tag: u64,
    /// The translation allows writes.
    pub writable: bool,
    /// The D bit has been set for this translation (writes need not set it again).
    pub dirty: bool,
    /// The translation allows instruction fetches (the leaf's X bit).
    pub executable: bool,
}

impl TlbEntry {
    /// Placeholder contents of a never-filled way (never returned: its generation is 0).
    const EMPTY: TlbEntry = TlbEntry {
        gfn: Gfn::new(0),
        pfn: Pfn::new(0),
        tag: 0,
        writable: false,
        dirty: false,
        executable: false,
    };
}

/// Counters of one [`Tlb`].
#[derive(Clone, Copy, PartialEq, Eq, Default, Debug)]
pub struct TlbStats {
    /// Lookups that found a valid translation.
    pub hits: u64,
    /// Lookups that did not.
    pub misses: u64,
    /// Calls to [`Tlb::insert`].
    pub inserts: u64,
    /// Inserts that evicted a valid translation of another gfn.
    pub evictions: u64,
    /// Calls to [`Tlb::flush_all`].
    pub flushes: u64,
    /// Calls to [`Tlb::flush_gfn`].
    pub gfn_flushes: u64,
}

const WAYS: usize = 4;

/// One set's lookup metadata: exactly one cache line.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(64))]
struct SetTags {
    gfns: [u64; WAYS],
    /// Way `w` is valid iff `gens[w] == Tlb::generation` (invariant 1).
    gens: [u32; WAYS],
    /// Tree pseudo-LRU: bit 0 = which half was used less recently (0: ways 0–1, 1: ways 2–3),
    /// bit 1 = within ways 0–1 (0: way 0 is older), bit 2 = within ways 2–3 (0: way 2 is older).
    plru: u8,
}

impl SetTags {
    const EMPTY: SetTags = SetTags {
        gfns: [0; WAYS],
        gens: [0; WAYS],
        plru: 0,
    };

    /// Marks `way` most recently used: point every tree node on its path away from it.
    #[inline]
    fn touch(&mut self, way: usize) {
        self.plru = match way {
            0 => (self.plru | 0b001) | 0b010,
            1 => (self.plru | 0b001) & !0b010,
            2 => (self.plru & !0b001) | 0b100,
            _ => (self.plru & !0b001) & !0b100,
        };
    }

    /// The way the tree says was used least recently.
    #[inline]
    fn victim(&self) -> usize {
        if self.plru & 0b001 == 0 {
            usize::from(self.plru & 0b010 != 0)
        } else {
            2 + usize::from(self.plru & 0b100 != 0)
        }
    }
}

/// A per-vCPU set-associative software TLB (see the module doc for the geometry and invariants).
#[derive(Clone, Debug)]
pub struct Tlb {
    tags: Box<[SetTags]>,
    /// `entries[set * WAYS + way]`.
    entries: Box<[TlbEntry]>,
    set_mask: u64,
    generation: u32,
    stats: TlbStats,
}

impl Default for Tlb {
    fn default() -> Self {
        Tlb::new(Tlb::DEFAULT_ENTRIES)
    }
}

impl Tlb {
    /// Ways per set.
    pub const WAYS: usize = WAYS;
    /// Default requested size: a second-level TLB's 1536 entries (rounded to 2048).
    pub const DEFAULT_ENTRIES: usize = 1536;
    /// Largest size honoured; larger requests are clamped to it.
    pub const MAX_ENTRIES: usize = 1 << 20;

    /// Creates an empty TLB of `entries` entries, rounded up to a power of two and clamped to
    /// `WAYS ..= MAX_ENTRIES` (so any `entries`, including 0, is accepted).
    pub fn new(entries: usize) -> Tlb {
        let entries = entries
            .clamp(WAYS, Self::MAX_ENTRIES)
            .next_power_of_two()
            .min(Self::MAX_ENTRIES);
        let sets = entries / WAYS;
        Tlb {
            tags: vec![SetTags::EMPTY; sets].into_boxed_slice(),
            entries: vec![TlbEntry::EMPTY; entries].into_boxed_slice(),
            set_mask: sets as u64 - 1,
            generation: 1,
            stats: TlbStats::default(),
        }
    }

    /// Number of entries (after rounding).
    pub fn capacity(&self) -> usize {
        self.entries.len()
    }

    /// The set that `gfn` maps to.
    #[inline(always)]
    fn set_of(&self, gfn: Gfn) -> usize {
        // The mask is below the number of sets, a usize, so the cast is lossless.
        (gfn.raw() & self.set_mask) as usize
    }

    /// The valid way of `set` holding `gfn`, if any.
    #[inline(always)]
    fn find(&self, set: usize, gfn: Gfn) -> Option<usize> {
        let t = &self.tags[set];
        (0..WAYS).find(|&w| t.gens[w] == self.generation && t.gfns[w] == gfn.raw())
    }

    /// Looks `gfn` up; on a hit returns the entry (mutable, e.g. to record that D was set) and marks
    /// it most recently used. Allocation-free, a few compares.
    #[inline(always)]
    pub fn lookup(&mut self, gfn: Gfn) -> Option<&mut TlbEntry> {
        let set = self.set_of(gfn);
        match self.find(set, gfn) {
            Some(way) => {
                self.stats.hits += 1;
                self.tags[set].touch(way);
                Some(&mut self.entries[set * WAYS + way])
            }
            None => {
                self.stats.misses += 1;
                None
            }
        }
    }

    /// Fills a translation: replaces the gfn's existing one, else takes an invalid way, else evicts
    /// the set's pseudo-least-recently-used way.
    pub fn insert(&mut self, e: TlbEntry) {
        self.stats.inserts += 1;
        let set = self.set_of(e.gfn);
        let generation = self.generation;
        let way = match self.find(set, e.gfn) {
            Some(way) => way,
            None => {
                let t = &self.tags[set];
                match (0..WAYS).find(|&w| t.gens[w] != generation) {
                    Some(way) => way,
                    None => {
                        self.stats.evictions += 1;
                        t.victim()
                    }
                }
            }
        };
        let t = &mut self.tags[set];
        t.gfns[way] = e.gfn.raw();
        t.gens[way] = generation;
        t.touch(way);
        self.entries[set * WAYS + way] = e;
    }

    /// Drops every translation (O(1): advances the generation, invariant 1).
    pub fn flush_all(&mut self) {
        self.stats.flushes += 1;
        self.generation = self.generation.wrapping_add(1);
        if self.generation == 0 {
            for t in self.tags.iter_mut() {
                t.gens = [0; WAYS];
            }
            self.generation = 1;
        }
    }

    /// Drops the translation of `gfn`, if cached.
    pub fn flush_gfn(&mut self, gfn: Gfn) {
        self.stats.gfn_flushes += 1;
        let set = self.set_of(gfn);
        if let Some(way) = self.find(set, gfn) {
            self.tags[set].gens[way] = 0;
        }
    }

    /// The counters.
    pub fn stats(&self) -> TlbStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(gfn: u64, pfn: u64) -> TlbEntry {
        TlbEntry {
            gfn: Gfn::new(gfn),
            pfn: Pfn::new(pfn),
            tag: gfn ^ 0xabc,
            writable: true,
            dirty: false,
            executable: true,
        }
    }

    #[test]
    fn default_geometry_is_2048_entries_4_way() {
        let tlb = Tlb::default();
        assert_eq!(tlb.capacity(), 2048);
        assert_eq!(tlb.tags.len(), 512);
        assert_eq!(core::mem::size_of::<SetTags>(), 64);
    }

    #[test]
    fn sizes_round_up_to_a_power_of_two_and_clamp() {
        assert_eq!(Tlb::new(0).capacity(), Tlb::WAYS);
        assert_eq!(Tlb::new(5).capacity(), 8);
        assert_eq!(Tlb::new(64).capacity(), 64);
        assert_eq!(Tlb::new(usize::MAX).capacity(), Tlb::MAX_ENTRIES);
    }

    #[test]
    fn hit_after_insert_returns_the_inserted_entry() {
        let mut tlb = Tlb::new(64);
        assert!(tlb.lookup(Gfn::new(7)).is_none());
        tlb.insert(entry(7, 70));
        assert_eq!(tlb.lookup(Gfn::new(7)).copied(), Some(entry(7, 70)));
        let s = tlb.stats();
        assert_eq!((s.hits, s.misses, s.inserts), (1, 1, 1));
    }

    #[test]
    fn lookup_entry_is_mutable_in_place() {
        let mut tlb = Tlb::new(64);
        tlb.insert(entry(3, 30));
        tlb.lookup(Gfn::new(3)).expect("just inserted").dirty = true;
        assert!(tlb.lookup(Gfn::new(3)).expect("still cached").dirty);
    }

    #[test]
    fn reinsert_replaces_instead_of_duplicating() {
        let mut tlb = Tlb::new(64);
        tlb.insert(entry(9, 1));
        tlb.insert(entry(9, 2));
        assert_eq!(tlb.lookup(Gfn::new(9)).map(|e| e.pfn), Some(Pfn::new(2)));
        tlb.flush_gfn(Gfn::new(9));
        assert!(tlb.lookup(Gfn::new(9)).is_none());
        assert_eq!(tlb.stats().evictions, 0);
    }

    #[test]
    fn miss_after_flush_all() {
        let mut tlb = Tlb::new(64);
        for g in 0..64 {
            tlb.insert(entry(g, g + 100));
        }
        tlb.flush_all();
        for g in 0..64 {
            assert!(
                tlb.lookup(Gfn::new(g)).is_none(),
                "gfn {g} survived flush_all"
            );
        }
        assert_eq!(tlb.stats().flushes, 1);
        assert_eq!(tlb.stats().misses, 64);
    }

    #[test]
    fn miss_after_flush_gfn_only_for_that_gfn() {
        let mut tlb = Tlb::new(64);
        tlb.insert(entry(1, 11));
        tlb.insert(entry(2, 22));
        tlb.flush_gfn(Gfn::new(1));
        assert!(tlb.lookup(Gfn::new(1)).is_none());
        assert_eq!(tlb.lookup(Gfn::new(2)).map(|e| e.pfn), Some(Pfn::new(22)));
        assert_eq!(tlb.stats().gfn_flushes, 1);
    }

    #[test]
    fn associativity_eviction_keeps_four_per_set_and_spares_the_most_recent() {
        let mut tlb = Tlb::new(64); // 16 sets: gfns 16 apart share a set
        for i in 0..4 {
            tlb.insert(entry(i * 16, i));
        }
        // All four ways are resident.
        for i in 0..4 {
            assert!(tlb.lookup(Gfn::new(i * 16)).is_some());
        }
        assert!(tlb.lookup(Gfn::new(0)).is_some()); // way 0 most recently used
        tlb.insert(entry(4 * 16, 4));
        assert_eq!(tlb.stats().evictions, 1);
        let resident = (0..5)
            .filter(|i| tlb.lookup(Gfn::new(i * 16)).is_some())
            .count();
        assert_eq!(resident, 4, "a 4-way set holds exactly four translations");
        assert!(tlb.lookup(Gfn::new(0)).is_some(), "the MRU way was evicted");
        assert!(
            tlb.lookup(Gfn::new(4 * 16)).is_some(),
            "the new entry is resident"
        );
        // Other sets are untouched by the eviction.
        tlb.insert(entry(1, 99));
        assert!(tlb.lookup(Gfn::new(1)).is_some());
    }

    #[test]
    fn plru_victim_is_never_the_way_just_touched() {
        let mut t = SetTags::EMPTY;
        for w in 0..WAYS {
            t.touch(w);
            assert_ne!(t.victim(), w);
        }
    }

    #[test]
    fn generation_wrap_does_not_resurrect_entries() {
        let mut tlb = Tlb::new(8);
        tlb.insert(entry(5, 50));
        tlb.generation = u32::MAX;
        tlb.insert(entry(6, 60));
        tlb.flush_all(); // wraps: must reset every way
        assert_eq!(tlb.generation, 1);
        assert!(tlb.lookup(Gfn::new(5)).is_none());
        assert!(tlb.lookup(Gfn::new(6)).is_none());
    }

    #[test]
    fn stats_count_every_operation() {
        let mut tlb = Tlb::new(16);
        tlb.insert(entry(1, 1));
        let _ = tlb.lookup(Gfn::new(1));
        let _ = tlb.lookup(Gfn::new(2));
        tlb.flush_gfn(Gfn::new(1));
        tlb.flush_all();
        assert_eq!(
            tlb.stats(),
            TlbStats {
                hits: 1,
                misses: 1,
                inserts: 1,
                evictions: 0,
                flushes: 1,
                gfn_flushes: 1
            }
        );
    }
}
