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
//! 2048 (512 sets × 4), is a real second-level TLB's 1536 entries rounded up. Each set's keys (gfn
//! and validity generation in one word per way) and tree-PLRU bits share one cache line; the entries
//! sit in a parallel array, so a hit touches two lines and a miss one. A way's key is
//! `generation << 52 | gfn` (a gfn is a 64-bit address shifted right by 12, so it fits 52 bits): a
//! lookup compares one word per way, and a fill tells a free way by the key's generation field.
//!
//! # Invariants
//!
//! 1. A way is valid iff the generation field of its key equals the TLB's current generation (never
//!    0; 12 bits). `flush_all` advances the generation, invalidating every way in O(1); when the
//!    generation would pass [`MAX_GENERATION`] every key is reset to 0 (generation 0) first, so no
//!    way from before the wrap can look valid.
//! 2. At most one valid way per set holds a given gfn (`insert` replaces an existing translation).
//! 3. A lookup matches on the gfn passed to `insert`; changing `gfn` through the `&mut TlbEntry` that
//!    `lookup` returns does not re-index the entry.
//! 4. `last_miss` is nonzero only if it is the key (current generation and gfn) of a lookup that
//!    missed, and no `insert` or `flush_all` ran since: then no valid way holds that key, so
//!    an `insert` of that gfn needs no replace search. (`flush_gfn` keeps it: it only drops ways.)

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

/// Bits of a key below its generation field: a gfn is at most 52 bits (`u64` address >> 12).
const GEN_SHIFT: u32 = 52;
/// The largest generation (the key's top 12 bits); the next `flush_all` resets every key.
const MAX_GENERATION: u64 = (1 << (64 - GEN_SHIFT)) - 1;

/// The key of `gfn` in generation `generation` (invariant 1).
#[inline(always)]
fn key(generation: u64, gfn: Gfn) -> u64 {
    // A gfn is a 64-bit guest address shifted right by PAGE_SHIFT, so its top 12 bits are 0 and
    // the generation field cannot alias gfn bits.
    debug_assert_eq!(gfn.raw() >> GEN_SHIFT, 0, "a gfn wider than 52 bits");
    (generation << GEN_SHIFT) | gfn.raw()
}

/// One set's lookup metadata: exactly one cache line.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(64))]
struct SetTags {
    /// Way `w` is valid iff `keys[w] >> GEN_SHIFT == Tlb::generation` (invariant 1); its gfn is
    /// then the low bits.
    keys: [u64; WAYS],
    /// Tree pseudo-LRU: bit 0 = which half was used less recently (0: ways 0–1, 1: ways 2–3),
    /// bit 1 = within ways 0–1 (0: way 0 is older), bit 2 = within ways 2–3 (0: way 2 is older).
    plru: u8,
}

impl SetTags {
    const EMPTY: SetTags = SetTags {
        keys: [0; WAYS],
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
    /// The current generation, `1..=MAX_GENERATION` (invariant 1).
    generation: u64,
    /// The key of the last lookup that missed, if no insert or `flush_all` came after it; else 0
    /// (never a valid key: generation 0). Invariant 4.
    last_miss: u64,
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
            last_miss: 0,
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

    /// The valid way of `set` holding `gfn`, if any: one compare per way (the key holds the
    /// generation, invariant 1).
    #[inline(always)]
    fn find(&self, set: usize, gfn: Gfn) -> Option<usize> {
        let k = key(self.generation, gfn);
        let t = &self.tags[set];
        (0..WAYS).find(|&w| t.keys[w] == k)
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
                self.last_miss = key(self.generation, gfn);
                None
            }
        }
    }

    /// Fills a translation: replaces the gfn's existing one, else takes an invalid way, else evicts
    /// the set's pseudo-least-recently-used way. Inlined into the fill (issue 15).
    #[inline]
    pub fn insert(&mut self, e: TlbEntry) {
        self.stats.inserts += 1;
        let set = self.set_of(e.gfn);
        let k = key(self.generation, e.gfn);
        let generation = self.generation;
        // Invariant 4: the last lookup missed on this very key and nothing changed the TLB since,
        // so no way holds the gfn and the replace search (invariant 2) can be skipped: the common
        // fill, right after the miss that caused its walk.
        let absent = self.last_miss == k;
        self.last_miss = 0;
        let t = &mut self.tags[set];
        let way = match (!absent)
            .then(|| t.keys.iter().position(|&x| x == k))
            .flatten()
        {
            Some(way) => way,
            None => match t.keys.iter().position(|&x| x >> GEN_SHIFT != generation) {
                Some(way) => way,
                None => {
                    self.stats.evictions += 1;
                    t.victim()
                }
            },
        };
        t.keys[way] = k;
        t.touch(way);
        self.entries[set * WAYS + way] = e;
    }

    /// Drops every translation (O(1): advances the generation, invariant 1).
    pub fn flush_all(&mut self) {
        self.stats.flushes += 1;
        self.last_miss = 0;
        if self.generation == MAX_GENERATION {
            for t in self.tags.iter_mut() {
                t.keys = [0; WAYS];
            }
            self.generation = 1;
        } else {
            self.generation += 1;
        }
    }

    /// Drops the translation of `gfn`, if cached.
    pub fn flush_gfn(&mut self, gfn: Gfn) {
        self.stats.gfn_flushes += 1;
        // `last_miss` stays: dropping a translation keeps every absent gfn absent.
        let set = self.set_of(gfn);
        if let Some(way) = self.find(set, gfn) {
            self.tags[set].keys[way] = 0;
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
        tlb.generation = MAX_GENERATION;
        tlb.insert(entry(6, 60));
        tlb.flush_all(); // wraps: must reset every way
        assert_eq!(tlb.generation, 1);
        assert!(tlb.lookup(Gfn::new(5)).is_none());
        assert!(tlb.lookup(Gfn::new(6)).is_none());
    }

    #[test]
    fn the_widest_gfn_hits_and_stays_apart_from_the_generation_field() {
        let mut tlb = Tlb::new(8);
        let wide = (1u64 << GEN_SHIFT) - 1;
        tlb.insert(entry(wide, 1));
        assert_eq!(tlb.lookup(Gfn::new(wide)).map(|e| e.pfn), Some(Pfn::new(1)));
        // Same set, same low bits, other generation: not a hit after a flush.
        tlb.flush_all();
        assert!(tlb.lookup(Gfn::new(wide)).is_none());
    }

    #[test]
    fn a_way_dropped_by_flush_gfn_is_reused_before_any_eviction() {
        let mut tlb = Tlb::new(4); // one set of four ways
        for g in 0..4 {
            tlb.insert(entry(g, g));
        }
        tlb.flush_gfn(Gfn::new(2));
        tlb.insert(entry(9, 9));
        assert_eq!(tlb.stats().evictions, 0);
        for g in [0, 1, 3, 9] {
            assert!(tlb.lookup(Gfn::new(g)).is_some(), "gfn {g} not resident");
        }
    }

    #[test]
    fn a_fill_after_a_miss_and_a_refill_after_a_hit_keep_one_way_per_gfn() {
        let mut tlb = Tlb::new(4); // one set of four ways
        assert!(tlb.lookup(Gfn::new(1)).is_none());
        tlb.insert(entry(1, 10)); // fill right after its miss: no replace search
        assert!(tlb.lookup(Gfn::new(1)).is_some());
        tlb.insert(entry(1, 11)); // refill after a hit (a write needing D): replaces
        assert!(tlb.lookup(Gfn::new(2)).is_none());
        tlb.insert(entry(1, 12)); // the last miss was another gfn: replaces
        tlb.insert(entry(2, 20)); // a stale hint is never used after an insert
        tlb.insert(entry(2, 21));
        let ways = tlb.tags[0].keys.iter().filter(|&&x| x != 0).count();
        assert_eq!(ways, 2, "one way per gfn (invariant 2)");
        assert_eq!(tlb.lookup(Gfn::new(1)).map(|e| e.pfn), Some(Pfn::new(12)));
        assert_eq!(tlb.lookup(Gfn::new(2)).map(|e| e.pfn), Some(Pfn::new(21)));
        assert_eq!(tlb.stats().evictions, 0);
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
