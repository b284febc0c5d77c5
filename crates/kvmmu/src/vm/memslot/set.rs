//! One address space's immutable memslot set (`struct kvm_memslots`, spec §1.3).
//!
//! Where KVM keeps two mutable sets per address space and edits the inactive one, we build a new
//! immutable set per edit ([`Memslots::with_change`], copy-on-write, as rust-vmm's
//! `GuestMemoryMmap::insert_region`); the VM publishes it and retires the old one after an SRCU
//! grace period. The three indexes (by gfn, by id, by hva) are persistent structures: an edit
//! copies O(log n) nodes and shares the rest with the set it came from, so creating, deleting or
//! moving a slot costs O(log n) in the number of slots, and slots themselves are shared through
//! `Arc`.

use core::cmp::Ordering as CmpOrdering;

use equivalent::{Comparable, Equivalent};
use imbl::OrdMap;

use super::hva_index::{HvaEntry, HvaIndex};
use super::slot::Memslot;
use crate::addr::{AsId, Gfn, GfnRange, Hva, SlotId};
use crate::sync::Arc;
use crate::sync::atomic::{AtomicPtr, Ordering};

/// A slot's gfn range as the key of the gfn index, ordered by start. Ranges in one set are
/// disjoint (invariant 2), so ordering by start orders them by every address they hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct GfnKey {
    start: Gfn,
    end: Gfn,
}

impl GfnKey {
    fn of(slot: &Memslot) -> GfnKey {
        let r = slot.gfn_range();
        GfnKey {
            start: r.start(),
            end: r.end(),
        }
    }

    /// A key below every real key starting at or after `gfn` (real keys are non-empty).
    fn at(gfn: Gfn) -> GfnKey {
        GfnKey {
            start: gfn,
            end: gfn,
        }
    }
}

/// A lookup of the slot containing a gfn: equal to the key whose range contains it, below the
/// keys starting after it, above those ending at or before it. Consistent with [`GfnKey`]'s order
/// because the ranges are disjoint and sorted, so a B-tree point lookup finds the containing slot
/// without a range iterator (and without allocating).
struct ContainsGfn(Gfn);

impl Equivalent<GfnKey> for ContainsGfn {
    fn equivalent(&self, key: &GfnKey) -> bool {
        key.start <= self.0 && self.0 < key.end
    }
}

impl Comparable<GfnKey> for ContainsGfn {
    fn compare(&self, key: &GfnKey) -> CmpOrdering {
        if self.0 < key.start {
            CmpOrdering::Less
        } else if self.0 >= key.end {
            CmpOrdering::Greater
        } else {
            CmpOrdering::Equal
        }
    }
}

/// A value of the gfn index: the slot and a copy of its range, so that checking the last-used hint
/// reads the index node it already points into instead of the slot.
#[derive(Clone, Debug)]
struct GfnEntry {
    range: GfnKey,
    slot: Arc<Memslot>,
}

/// The hva index entry of a slot.
fn hva_entry(slot: &Memslot) -> HvaEntry {
    HvaEntry {
        start: slot.userspace_addr().raw(),
        end: slot.hva_end().raw(),
        slot: u32::from(slot.id().get()),
    }
}

/// The memslots of one address space: sorted by `base_gfn` with non-overlapping gfn ranges, an id
/// index, and an hva index that allows aliases (memslot invariants 2–4).
#[derive(Debug)]
pub struct Memslots {
    as_id: AsId,
    generation: u64,
    /// Slots by gfn range; ranges disjoint (invariant 2).
    by_gfn: OrdMap<GfnKey, GfnEntry>,
    /// The same slots by id.
    by_id: OrdMap<SlotId, Arc<Memslot>>,
    hva: HvaIndex,
    /// The slot `find_by_gfn` found last (`last_used_slot`): null, or the address of a
    /// [`GfnEntry`] stored in `by_gfn` of this very set. That map is never changed after the set
    /// is built (invariant 4; an edit changes a clone, whose copy-on-write leaves every node of
    /// this set in place), so the address stays valid while the set lives.
    last_used: AtomicPtr<GfnEntry>,
}

impl Memslots {
    /// An empty set for address space `as_id`, with generation `as_id` (spec §1.3: generations of
    /// different address spaces never collide because each swap adds the number of address
    /// spaces).
    pub fn new(as_id: AsId) -> Memslots {
        Memslots {
            as_id,
            generation: u64::from(as_id.get()),
            by_gfn: OrdMap::new(),
            by_id: OrdMap::new(),
            hva: HvaIndex::default(),
            last_used: AtomicPtr::new(core::ptr::null_mut()),
        }
    }

    /// The address space of this set.
    pub fn as_id(&self) -> AsId {
        self.as_id
    }

    /// The generation this set was built with (see spec §1.3 for how the swap computes it).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Number of slots.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// True if the set holds no slot.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The slots in ascending `base_gfn` order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Memslot>> {
        self.by_gfn.values().map(|e| &e.slot)
    }

    /// The slot with id `id` (`id_to_memslot`), if any.
    pub fn get(&self, id: SlotId) -> Option<&Arc<Memslot>> {
        self.by_id.get(&id)
    }

    /// The last-used hint (`last_used` field doc).
    #[inline]
    fn hinted(&self) -> Option<&GfnEntry> {
        // ORDERING: Relaxed: the hint only ever holds addresses inside this set's own maps, which
        // were fully built before the set was published to this thread (the SRCU publication
        // orders them); the hint itself publishes nothing.
        let p = self.last_used.load(Ordering::Relaxed);
        // SAFETY: `p` is null or the address of a `GfnEntry` inside a node of `self.by_gfn` (the
        // only stores are of such addresses, see `set_hint`); that map is never changed while
        // `self` lives (memslot invariant 4), so the value is alive, in place and never written
        // for the lifetime of `&self`.
        unsafe { p.as_ref() }
    }

    /// Points the last-used hint at `entry`, which must be a reference into `self.by_gfn`.
    #[inline]
    fn set_hint(&self, entry: &GfnEntry) {
        // ORDERING: Relaxed, as in `hinted`.
        self.last_used
            .store(core::ptr::from_ref(entry).cast_mut(), Ordering::Relaxed);
    }

    /// The slot containing `gfn` (`search_memslots`), INVALID slots included: callers that install
    /// mappings must check [`Memslot::is_invalid`] and retry.
    ///
    /// O(1) when `gfn` is in the slot found last, O(log n) otherwise, with no allocation. A hit on
    /// that last-used hint writes nothing, so concurrent faults on the same slot do not bounce a
    /// cache line.
    #[inline]
    pub fn find_by_gfn(&self, gfn: Gfn) -> Option<&Arc<Memslot>> {
        let probe = ContainsGfn(gfn);
        if let Some(entry) = self.hinted()
            && probe.equivalent(&entry.range)
        {
            return Some(&entry.slot);
        }
        let entry = self.by_gfn.get(&probe)?;
        // Only stored on a miss, so the line is written only when the hint actually changes.
        self.set_hint(entry);
        Some(&entry.slot)
    }

    /// The id of the lowest slot other than `skip` whose gfns overlap `range`, if any.
    pub(super) fn first_overlap(&self, range: GfnRange, skip: SlotId) -> Option<SlotId> {
        // The slot containing range.start (if any), then the slots starting inside the range, in
        // gfn order: `skip` is the only overlapping slot passed over, so at most three slots are
        // looked at after the lookups.
        self.by_gfn
            .get(&ContainsGfn(range.start()))
            .into_iter()
            .chain(
                self.by_gfn
                    .range(GfnKey::at(range.start())..)
                    .take_while(|(k, _)| k.start < range.end())
                    .map(|(_, e)| e),
            )
            .map(|e| e.slot.id())
            .find(|&id| id != skip)
    }

    /// Calls `f` for every slot whose host range intersects `[start, end)`, aliases included, with
    /// the guest frames backing the intersection (spec §3.1: clamped to the slot, partial pages
    /// rounded out). The inner loop of `kvm_handle_hva_range`.
    ///
    /// O(log n + k log n) for k matching slots; no allocation, no lock, no shared write. Slots are
    /// reported once each, in no particular order. An empty range (`end <= start`) reports nothing.
    #[inline]
    pub fn for_each_hva_overlap(
        &self,
        start: Hva,
        end: Hva,
        mut f: impl FnMut(&Arc<Memslot>, GfnRange),
    ) {
        self.hva.for_each_overlap(start.raw(), end.raw(), |id| {
            // Every indexed id is a slot of this set (both indexes change together).
            let Some(slot) = u16::try_from(id)
                .ok()
                .and_then(|id| self.by_id.get(&SlotId::new(id)))
            else {
                return;
            };
            // The index only reports intersecting slots, so the clamp is never empty.
            if let Some(gfns) = slot.gfns_for_hva_range(start, end) {
                f(slot, gfns);
            }
        });
    }

    /// A new set equal to this one with `old` replaced by `new`, carrying `generation`
    /// (`kvm_replace_memslot`). `old = None` inserts, `new = None` removes, both `None` copies.
    /// `self` is not changed. If the last-used hint pointed at `old`, it points at `new`.
    ///
    /// O(log n): the new set shares every index node but those on the changed paths with `self`.
    /// This is the apply step after [`super::plan_change`] accepted the change; it is not a
    /// validator.
    ///
    /// # Panics
    ///
    /// On a kvmmu bug that would break memslot invariant 2: `old` is not the very slot (same `Arc`)
    /// this set holds under its id; `new` belongs to another address space; `new`'s id is taken by a
    /// slot other than `old`; or `new`'s gfn range overlaps another slot.
    pub fn with_change(
        &self,
        old: Option<&Arc<Memslot>>,
        new: Option<Arc<Memslot>>,
        generation: u64,
    ) -> Memslots {
        let old_id = old.map(|o| o.id());
        if let Some(old) = old {
            assert!(
                self.get(old.id()).is_some_and(|cur| Arc::ptr_eq(cur, old)),
                "Memslots::with_change: old slot {:?} is not in the set of {:?}",
                old.id(),
                self.as_id
            );
        }
        if let Some(new) = &new {
            assert_eq!(
                new.as_id(),
                self.as_id,
                "Memslots::with_change: slot {:?} belongs to another address space",
                new.id()
            );
            assert!(
                old_id == Some(new.id()) || self.get(new.id()).is_none(),
                "Memslots::with_change: slot id {:?} is already in use",
                new.id()
            );
        }

        let mut by_gfn = self.by_gfn.clone();
        let mut by_id = self.by_id.clone();
        let mut hva = self.hva.clone();
        if let Some(old) = old {
            by_gfn.remove(&GfnKey::of(old));
            by_id.remove(&old.id());
            hva = hva.without(hva_entry(old));
        }
        let hinted = self.hinted().map(|e| e.slot.id());
        let mut hint = hinted.filter(|&id| Some(id) != old_id);
        if let Some(new) = new {
            let key = GfnKey::of(&new);
            let clash = by_gfn.get(&ContainsGfn(key.start)).is_some()
                || by_gfn
                    .range(GfnKey::at(key.start)..)
                    .next()
                    .is_some_and(|(k, _)| k.start < key.end);
            assert!(
                !clash,
                "memslot invariant 2 violated: slot {:?} gfns {:?} overlap another slot",
                new.id(),
                new.gfn_range()
            );
            if hinted.is_some() && hinted == old_id {
                hint = Some(new.id());
            }
            hva = hva.with(hva_entry(&new));
            by_id.insert(new.id(), new.clone());
            by_gfn.insert(
                key,
                GfnEntry {
                    range: key,
                    slot: new,
                },
            );
        }
        let set = Memslots {
            as_id: self.as_id,
            generation,
            by_gfn,
            by_id,
            hva,
            last_used: AtomicPtr::new(core::ptr::null_mut()),
        };
        debug_assert_eq!(set.hva.len(), set.by_id.len());
        if let Some(entry) = hint
            .and_then(|id| set.by_id.get(&id))
            .and_then(|slot| set.by_gfn.get(&GfnKey::of(slot)))
        {
            set.set_hint(entry);
        }
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::PAGE_SIZE;
    use crate::vm::memslot::MemFlags;
    use proptest::prelude::*;

    fn slot(id: u16, base_gfn: u64, npages: u64, hva: u64) -> Arc<Memslot> {
        Arc::new(
            Memslot::from_parts(
                SlotId::new(id),
                AsId::new(0),
                Gfn::new(base_gfn),
                npages,
                Hva::new(hva),
                MemFlags::empty(),
            )
            .expect("valid test slot"),
        )
    }

    fn set_of(slots: impl IntoIterator<Item = Arc<Memslot>>) -> Memslots {
        slots
            .into_iter()
            .fold(Memslots::new(AsId::new(0)), |set, s| {
                set.with_change(None, Some(s), 0)
            })
    }

    fn snapshot(set: &Memslots) -> Vec<(SlotId, GfnRange, Hva, bool)> {
        set.iter()
            .map(|s| (s.id(), s.gfn_range(), s.userspace_addr(), s.is_invalid()))
            .collect()
    }

    /// Random sets of disjoint gfn ranges: (gap before, length) pairs laid out left to right, with
    /// host addresses drawn from a few pages so that aliases are common.
    fn disjoint_slots() -> impl Strategy<Value = Vec<Arc<Memslot>>> {
        prop::collection::vec((0u64..8, 1u64..8, 0u64..6, any::<bool>()), 0..24).prop_map(|v| {
            let mut next = 0;
            let mut out: Vec<Arc<Memslot>> = v
                .into_iter()
                .enumerate()
                .map(|(i, (gap, len, hva_page, alias))| {
                    let base = next + gap;
                    next = base + len;
                    let hva = if alias {
                        0x1000_0000
                    } else {
                        0x1000_0000 + hva_page * PAGE_SIZE
                    };
                    slot(u16::try_from(i).expect("small"), base, len, hva)
                })
                .collect();
            // Insertion order must not matter: insert from the highest gfn down.
            out.reverse();
            out
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn find_by_gfn_matches_a_linear_scan(
            slots in disjoint_slots(),
            gfns in prop::collection::vec(0u64..200, 1..40),
        ) {
            let set = set_of(slots.clone());
            for g in gfns {
                let gfn = Gfn::new(g);
                let model = slots.iter().find(|s| s.gfn_range().contains(gfn)).map(|s| s.id());
                prop_assert_eq!(set.find_by_gfn(gfn).map(|s| s.id()), model);
                // The hint must not change the answer on a repeat.
                prop_assert_eq!(set.find_by_gfn(gfn).map(|s| s.id()), model);
            }
        }

        #[test]
        fn for_each_hva_overlap_matches_a_linear_page_model(
            slots in disjoint_slots(),
            start in 0x0fff_e000u64..0x1000_a000,
            len in 0u64..0x9000,
        ) {
            let set = set_of(slots.clone());
            let (s, e) = (start, start + len);
            let mut got = Vec::new();
            set.for_each_hva_overlap(Hva::new(s), Hva::new(e), |slot, gfns| got.push((slot.id(), gfns)));
            got.sort_unstable_by_key(|&(id, _)| id);
            // Model: per slot, the gfns whose 4 KiB page intersects [s, e), found page by page.
            let mut model = Vec::new();
            for slot in &slots {
                let hit: Vec<u64> = (slot.base_gfn().raw()..slot.gfn_range().end().raw())
                    .filter(|&g| {
                        let page = slot.gfn_to_hva(Gfn::new(g)).expect("inside").raw();
                        page < e && s < page + PAGE_SIZE
                    })
                    .collect();
                if let (Some(&first), Some(&last)) = (hit.first(), hit.last()) {
                    let range = GfnRange::new(Gfn::new(first), Gfn::new(last + 1)).expect("ordered");
                    model.push((slot.id(), range));
                }
            }
            model.sort_unstable_by_key(|&(id, _)| id);
            prop_assert_eq!(got, model);
        }
    }

    #[test]
    fn new_set_is_empty_with_generation_equal_to_as_id() {
        let set = Memslots::new(AsId::new(1));
        assert!(set.is_empty());
        assert_eq!(set.len(), 0);
        assert_eq!(set.generation(), 1);
        assert_eq!(set.as_id(), AsId::new(1));
        assert!(set.find_by_gfn(Gfn::new(0)).is_none());
        let mut called = false;
        set.for_each_hva_overlap(Hva::new(0), Hva::new(u64::MAX), |_, _| called = true);
        assert!(!called);
    }

    #[test]
    fn with_change_leaves_the_input_set_unchanged_and_takes_the_given_generation() {
        let a = slot(1, 0x100, 16, 0x10_0000);
        let b = slot(2, 0x200, 16, 0x20_0000);
        let base = set_of([a.clone(), b.clone()]);
        let before = snapshot(&base);
        let generation = base.generation();

        let inserted = base.with_change(None, Some(slot(3, 0x300, 4, 0x30_0000)), 42);
        let removed = base.with_change(Some(&a), None, 44);
        let invalid = Arc::new(a.invalid_copy());
        let replaced = base.with_change(Some(&a), Some(invalid.clone()), 46);
        let moved = base.with_change(Some(&b), Some(slot(2, 0x10, 16, 0x20_0000)), 48);

        assert_eq!(snapshot(&base), before, "input set changed");
        assert_eq!(base.generation(), generation);
        assert!(Arc::ptr_eq(base.get(SlotId::new(1)).expect("a"), &a));

        assert_eq!((inserted.len(), inserted.generation()), (3, 42));
        assert_eq!((removed.len(), removed.generation()), (1, 44));
        assert!(removed.get(SlotId::new(1)).is_none());
        assert!(removed.find_by_gfn(Gfn::new(0x100)).is_none());
        assert_eq!(replaced.generation(), 46);
        assert!(Arc::ptr_eq(
            replaced.get(SlotId::new(1)).expect("invalid a"),
            &invalid
        ));
        assert!(
            replaced
                .find_by_gfn(Gfn::new(0x105))
                .expect("still mapped")
                .is_invalid()
        );
        assert_eq!(moved.generation(), 48);
        let ids: Vec<u16> = moved.iter().map(|s| s.id().get()).collect();
        assert_eq!(ids, [2, 1], "iteration follows base_gfn after a move");
        assert!(moved.find_by_gfn(Gfn::new(0x205)).is_none());
        assert_eq!(
            moved.find_by_gfn(Gfn::new(0x15)).map(|s| s.id()),
            Some(SlotId::new(2))
        );
        // Slots not touched by the change are shared, not copied.
        assert!(Arc::ptr_eq(inserted.get(SlotId::new(2)).expect("b"), &b));
    }

    #[test]
    fn with_change_repoints_the_last_used_hint_from_old_to_new() {
        let a = slot(1, 0x100, 16, 0x10_0000);
        let b = slot(2, 0x200, 16, 0x20_0000);
        let base = set_of([a.clone(), b]);
        assert_eq!(
            base.find_by_gfn(Gfn::new(0x100)).map(|s| s.id()),
            Some(SlotId::new(1))
        );
        let invalid = Arc::new(a.invalid_copy());
        let next = base.with_change(Some(&a), Some(invalid.clone()), 2);
        let hinted = next.hinted().expect("a hint");
        assert!(Arc::ptr_eq(&hinted.slot, &invalid));
    }

    #[test]
    #[should_panic(expected = "is not in the set")]
    fn with_change_rejects_an_old_slot_the_set_does_not_hold() {
        let a = slot(1, 0x100, 16, 0x10_0000);
        let set = set_of([a]);
        let lookalike = slot(1, 0x100, 16, 0x10_0000);
        let _ = set.with_change(Some(&lookalike), None, 2);
    }

    #[test]
    #[should_panic(expected = "memslot invariant 2 violated")]
    fn with_change_rejects_overlapping_gfns() {
        let set = set_of([slot(1, 0x100, 16, 0x10_0000)]);
        let _ = set.with_change(None, Some(slot(2, 0x10f, 1, 0x10_0000)), 2);
    }

    #[test]
    fn find_by_gfn_hits_slot_edges_and_misses_gaps() {
        let set = set_of([slot(1, 0x100, 16, 0x10_0000), slot(2, 0x110, 1, 0x20_0000)]);
        let id = |g: u64| set.find_by_gfn(Gfn::new(g)).map(|s| s.id().get());
        assert_eq!(id(0xff), None);
        assert_eq!(id(0x100), Some(1));
        assert_eq!(id(0x10f), Some(1));
        assert_eq!(id(0x110), Some(2));
        assert_eq!(id(0x111), None);
        assert_eq!(id(u64::MAX), None);
    }
}
