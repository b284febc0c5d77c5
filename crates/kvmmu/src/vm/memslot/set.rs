//! One address space's immutable memslot set (`struct kvm_memslots`, spec §1.3).
//!
//! Where KVM keeps two mutable sets per address space and edits the inactive one, we build a new
//! immutable set per edit ([`Memslots::with_change`], copy-on-write, as rust-vmm's
//! `GuestMemoryMmap::insert_region`); the VM publishes it and retires the old one after an SRCU
//! grace period. Slots are shared between sets through `Arc`.

use super::hva_index::{HvaEntry, HvaIndex};
use super::slot::Memslot;
use crate::addr::{AsId, Gfn, GfnRange, Hva, SlotId};
use crate::sync::Arc;
use crate::sync::atomic::{AtomicUsize, Ordering};

/// The memslots of one address space: sorted by `base_gfn` with non-overlapping gfn ranges, an id
/// index, and an hva index that allows aliases (module invariants 2–4).
#[derive(Debug)]
pub struct Memslots {
    as_id: AsId,
    generation: u64,
    /// Sorted by `base_gfn`; gfn ranges disjoint (invariant 2).
    slots: Vec<Arc<Memslot>>,
    /// `gfns[i] == slots[i].gfn_range()`: searched without dereferencing each slot's `Arc`.
    gfns: Vec<GfnRange>,
    /// `(id, index into slots)`, sorted by id.
    ids: Vec<(SlotId, u32)>,
    hva: HvaIndex,
    /// Index into `slots` of the slot `find_by_gfn` found last (`last_used_slot`).
    last_used: AtomicUsize,
}

impl Memslots {
    /// An empty set for address space `as_id`, with generation `as_id` (spec §1.3: generations of
    /// different address spaces never collide because each swap adds the number of address
    /// spaces).
    pub fn new(as_id: AsId) -> Memslots {
        Memslots::build(as_id, u64::from(as_id.get()), Vec::new(), None)
    }

    /// Builds a set from slots already sorted by `base_gfn` and checked for invariant 2, with the
    /// last-used hint on the slot with id `hint` (if present).
    fn build(
        as_id: AsId,
        generation: u64,
        slots: Vec<Arc<Memslot>>,
        hint: Option<SlotId>,
    ) -> Memslots {
        let gfns: Vec<GfnRange> = slots.iter().map(|s| s.gfn_range()).collect();
        let mut ids: Vec<(SlotId, u32)> = slots
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id(), index_u32(i)))
            .collect();
        ids.sort_unstable_by_key(|&(id, _)| id);
        assert!(
            ids.windows(2).all(|w| w[0].0 != w[1].0),
            "memslot invariant 2 violated: duplicate slot id in one set"
        );
        let hva = HvaIndex::build(
            slots
                .iter()
                .enumerate()
                .map(|(i, s)| HvaEntry {
                    start: s.userspace_addr().raw(),
                    end: s.hva_end().raw(),
                    slot: index_u32(i),
                })
                .collect(),
        );
        let mut set = Memslots {
            as_id,
            generation,
            slots,
            gfns,
            ids,
            hva,
            last_used: AtomicUsize::new(0),
        };
        if let Some(i) = hint.and_then(|id| set.position(id)) {
            set.last_used = AtomicUsize::new(i);
        }
        set
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
        self.slots.len()
    }

    /// True if the set holds no slot.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The slots in ascending `base_gfn` order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Memslot>> {
        self.slots.iter()
    }

    /// The slot with id `id` (`id_to_memslot`), if any.
    pub fn get(&self, id: SlotId) -> Option<&Arc<Memslot>> {
        self.position(id).map(|i| &self.slots[i])
    }

    fn position(&self, id: SlotId) -> Option<usize> {
        let k = self.ids.binary_search_by_key(&id, |&(id, _)| id).ok()?;
        Some(self.ids[k].1 as usize)
    }

    /// The slot containing `gfn` (`search_memslots`), INVALID slots included: callers that install
    /// mappings must check [`Memslot::is_invalid`] and retry.
    ///
    /// O(1) when `gfn` is in the slot found last, O(log n) otherwise. A hit on that last-used hint
    /// writes nothing, so concurrent faults on the same slot do not bounce a cache line.
    #[inline]
    pub fn find_by_gfn(&self, gfn: Gfn) -> Option<&Arc<Memslot>> {
        // ORDERING: Relaxed suffices; the hint publishes no data. Any index it holds is
        // bounds-checked and range-checked against this immutable set before use (module
        // invariant 4), so a stale or racing value costs at most a binary search.
        let hint = self.last_used.load(Ordering::Relaxed);
        if self.gfns.get(hint).is_some_and(|r| r.contains(gfn)) {
            return Some(&self.slots[hint]);
        }
        // The last slot starting at or before gfn is the only candidate (gfns disjoint, sorted).
        let i = self
            .gfns
            .partition_point(|r| r.start() <= gfn)
            .checked_sub(1)?;
        if !self.gfns[i].contains(gfn) {
            return None;
        }
        // ORDERING: Relaxed, as for the load above. Only stored on a miss, so `i != hint` and the
        // line is written only when the hint actually changes.
        self.last_used.store(i, Ordering::Relaxed);
        Some(&self.slots[i])
    }

    /// The id of the lowest slot other than `skip` whose gfns overlap `range`, if any.
    pub(super) fn first_overlap(&self, range: GfnRange, skip: SlotId) -> Option<SlotId> {
        // Slots ending at or before range.start cannot overlap; the rest are scanned in gfn order
        // until one starts at or after range.end. `skip` is the only overlapping slot passed
        // over, so at most three slots are looked at after the binary search.
        let first = self.gfns.partition_point(|r| r.end() <= range.start());
        self.gfns[first..]
            .iter()
            .zip(&self.slots[first..])
            .take_while(|(r, _)| r.start() < range.end())
            .map(|(_, s)| s.id())
            .find(|&id| id != skip)
    }

    /// Calls `f` for every slot whose host range intersects `[start, end)`, aliases included, with
    /// the guest frames backing the intersection (spec §3.1: clamped to the slot, partial pages
    /// rounded out). The inner loop of `kvm_handle_hva_range`.
    ///
    /// O(log n + k) for k matching slots; no allocation, no lock, no shared write. Slots are
    /// reported once each, in no particular order. An empty range (`end <= start`) reports nothing.
    #[inline]
    pub fn for_each_hva_overlap(
        &self,
        start: Hva,
        end: Hva,
        mut f: impl FnMut(&Arc<Memslot>, GfnRange),
    ) {
        self.hva.for_each_overlap(start.raw(), end.raw(), |i| {
            let slot = &self.slots[i as usize];
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
    /// This is the apply step after [`super::plan_change`] accepted the change; it is not a
    /// validator.
    ///
    /// # Panics
    ///
    /// On a kvmmu bug that would break module invariant 2: `old` is not the very slot (same `Arc`)
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

        let mut slots: Vec<Arc<Memslot>> = Vec::with_capacity(self.slots.len() + 1);
        slots.extend(
            self.slots
                .iter()
                .filter(|s| Some(s.id()) != old_id)
                .cloned(),
        );
        let hinted = self
            .slots
            .get(self.last_used.load(Ordering::Relaxed))
            .map(|s| s.id());
        let mut hint = hinted.filter(|&id| Some(id) != old_id);
        if let Some(new) = new {
            let range = new.gfn_range();
            let at = slots.partition_point(|s| s.base_gfn() < range.start());
            let clashes =
                |s: Option<&Arc<Memslot>>| s.is_some_and(|s| s.gfn_range().overlaps(&range));
            assert!(
                !clashes(at.checked_sub(1).and_then(|p| slots.get(p))) && !clashes(slots.get(at)),
                "memslot invariant 2 violated: slot {:?} gfns {:?} overlap another slot",
                new.id(),
                range
            );
            if hinted.is_some() && hinted == old_id {
                hint = Some(new.id());
            }
            slots.insert(at, new);
        }
        Memslots::build(self.as_id, generation, slots, hint)
    }
}

/// Slot positions fit in `u32`: a set holds at most `SlotId::MAX` slots.
fn index_u32(i: usize) -> u32 {
    u32::try_from(i).expect("memslot index fits in u32 (at most SlotId::MAX slots per set)")
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
        let hinted = &next.slots[next.last_used.load(Ordering::Relaxed)];
        assert!(Arc::ptr_eq(hinted, &invalid));
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
