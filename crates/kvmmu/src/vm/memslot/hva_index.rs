//! The host-virtual index of a memslot set: which slots does an hva range hit? (KVM's `hva_tree`.)
//!
//! Host ranges of slots may overlap (aliases, module invariant 3), so this is an interval index,
//! built once per immutable set and queried by every MMU-notifier walk and every aging call.
//!
//! A slot's range `[a, b)` intersects a query `[s, e)` exactly when either
//! - it contains `s` (`a <= s < b`): a *stabbing* query at `s`, answered by a static centered
//!   interval tree, or
//! - it starts inside the query (`s < a < e`): a contiguous run of the slots sorted by start.
//!
//! The two cases are disjoint and together cover every intersection, so each slot is reported once.
//! Both cost `O(log n + k)` for `k` reported slots: each tree node on the descent path scans only
//! the entries it reports plus one, and the tree is balanced because each node splits at the median
//! start. Queries neither allocate nor write memory.

/// Marks a missing child in [`CenterNode`].
const NIL: u32 = u32::MAX;

/// One slot's host range `[start, end)` and its index in the set's gfn-sorted slot array.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct HvaEntry {
    /// `userspace_addr`.
    pub start: u64,
    /// `userspace_addr + npages * PAGE_SIZE`, exclusive; `end > start`.
    pub end: u64,
    /// Index of the slot in `Memslots::slots`.
    pub slot: u32,
}

/// A node of the centered interval tree: the entries containing `center`, stored twice (by start
/// ascending and by end descending) in `[lo, hi)` of the two segment arrays.
#[derive(Clone, Copy, Debug)]
struct CenterNode {
    center: u64,
    lo: u32,
    hi: u32,
    /// Subtree of entries that end at or before `center`.
    left: u32,
    /// Subtree of entries that start after `center`.
    right: u32,
}

/// A static interval index over the host ranges of one memslot set.
#[derive(Debug, Default)]
pub(super) struct HvaIndex {
    /// Every entry, sorted by `(start, end, slot)`.
    by_start: Vec<HvaEntry>,
    nodes: Vec<CenterNode>,
    /// Per node, its entries sorted by start ascending.
    node_by_start: Vec<HvaEntry>,
    /// Per node, its entries sorted by end descending.
    node_by_end: Vec<HvaEntry>,
    root: u32,
}

impl HvaIndex {
    /// Builds the index. Every entry must be non-empty (`end > start`), which memslots guarantee
    /// (module invariant 1).
    pub(super) fn build(mut entries: Vec<HvaEntry>) -> HvaIndex {
        assert!(
            entries.iter().all(|e| e.start < e.end),
            "memslot invariant 1 violated: a slot with an empty host range"
        );
        assert!(
            u32::try_from(entries.len()).is_ok_and(|n| n < NIL),
            "too many memslots"
        );
        entries.sort_unstable_by_key(|e| (e.start, e.end, e.slot));
        let mut index = HvaIndex {
            by_start: Vec::new(),
            nodes: Vec::with_capacity(entries.len()),
            node_by_start: Vec::with_capacity(entries.len()),
            node_by_end: Vec::with_capacity(entries.len()),
            root: NIL,
        };
        index.root = index.build_node(&entries);
        index.by_start = entries;
        index
    }

    /// Builds the subtree over `entries` (sorted by start) and returns its node index.
    fn build_node(&mut self, entries: &[HvaEntry]) -> u32 {
        if entries.is_empty() {
            return NIL;
        }
        // The median start: its own entry contains it, and at most half of the entries lie
        // entirely on either side, so the depth is at most log2(n) + 1.
        let center = entries[entries.len() / 2].start;
        let mut left = Vec::new();
        let mut right = Vec::new();
        let lo = self.node_by_start.len();
        for e in entries {
            if e.end <= center {
                left.push(*e);
            } else if e.start > center {
                right.push(*e);
            } else {
                self.node_by_start.push(*e);
            }
        }
        let hi = self.node_by_start.len();
        self.node_by_end
            .extend_from_slice(&self.node_by_start[lo..hi]);
        self.node_by_end[lo..hi].sort_unstable_by_key(|e| core::cmp::Reverse(e.end));
        let id = self.nodes.len();
        self.nodes.push(CenterNode {
            center,
            lo: to_u32(lo),
            hi: to_u32(hi),
            left: NIL,
            right: NIL,
        });
        let l = self.build_node(&left);
        let r = self.build_node(&right);
        self.nodes[id].left = l;
        self.nodes[id].right = r;
        to_u32(id)
    }

    /// Calls `f` with the slot index of every entry intersecting `[start, end)`, each exactly once,
    /// in no particular order. An empty query (`end <= start`) reports nothing.
    #[inline]
    pub(super) fn for_each_overlap(&self, start: u64, end: u64, mut f: impl FnMut(u32)) {
        if end <= start {
            return;
        }
        self.stab(start, &mut f);
        // Entries that start strictly inside the query.
        let first = self.by_start.partition_point(|e| e.start <= start);
        for e in &self.by_start[first..] {
            if e.start >= end {
                break;
            }
            f(e.slot);
        }
    }

    /// Calls `f` for every entry with `start <= q < end`.
    #[inline]
    fn stab(&self, q: u64, f: &mut impl FnMut(u32)) {
        let mut n = self.root;
        while let Some(node) = self.nodes.get(n as usize) {
            let (lo, hi) = (node.lo as usize, node.hi as usize);
            // Every entry at this node contains `center`.
            if q < node.center {
                // Each ends after center > q, so it contains q iff it starts at or before q.
                for e in &self.node_by_start[lo..hi] {
                    if e.start > q {
                        break;
                    }
                    f(e.slot);
                }
                n = node.left;
            } else {
                // Each starts at or before center <= q, so it contains q iff it ends after q.
                for e in &self.node_by_end[lo..hi] {
                    if e.end <= q {
                        break;
                    }
                    f(e.slot);
                }
                n = node.right;
            }
        }
    }
}

/// Node and entry positions fit in `u32`: `build` checked the entry count.
fn to_u32(v: usize) -> u32 {
    u32::try_from(v).expect("hva index position fits in u32 (checked in HvaIndex::build)")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Model: every entry sharing at least one address with `[s, e)` (none if the query is empty).
    fn linear(entries: &[HvaEntry], s: u64, e: u64) -> Vec<u32> {
        let mut v: Vec<u32> = entries
            .iter()
            .filter(|x| (s..e).any(|a| x.start <= a && a < x.end))
            .map(|x| x.slot)
            .collect();
        v.sort_unstable();
        v
    }

    fn query(index: &HvaIndex, s: u64, e: u64) -> Vec<u32> {
        let mut v = Vec::new();
        index.for_each_overlap(s, e, |i| v.push(i));
        v.sort_unstable();
        v
    }

    /// Random intervals over a small coordinate space (so aliases and nesting are common).
    fn entries() -> impl Strategy<Value = Vec<HvaEntry>> {
        prop::collection::vec((0u64..64, 1u64..24), 0..40).prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (start, len))| HvaEntry {
                    start,
                    end: start + len,
                    slot: u32::try_from(i).expect("small"),
                })
                .collect()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn overlap_query_matches_a_linear_scan(es in entries(), s in 0u64..96, len in 0u64..40) {
            let index = HvaIndex::build(es.clone());
            prop_assert_eq!(query(&index, s, s + len), linear(&es, s, s + len));
        }
    }

    #[test]
    fn identical_aliases_are_each_reported_once() {
        let es: Vec<HvaEntry> = (0..10)
            .map(|slot| HvaEntry {
                start: 100,
                end: 200,
                slot,
            })
            .collect();
        let index = HvaIndex::build(es);
        assert_eq!(query(&index, 150, 151), (0..10).collect::<Vec<_>>());
        assert_eq!(query(&index, 0, 100), Vec::<u32>::new());
        assert_eq!(query(&index, 200, 300), Vec::<u32>::new());
        assert_eq!(query(&index, 150, 150), Vec::<u32>::new(), "empty query");
    }

    #[test]
    fn tree_depth_is_logarithmic() {
        // Disjoint, nested and aliased intervals; the descent must stay short for each shape.
        let shapes: [Vec<HvaEntry>; 3] = [
            (0..1024)
                .map(|i| HvaEntry {
                    start: i * 10,
                    end: i * 10 + 5,
                    slot: 0,
                })
                .collect(),
            (0..1024)
                .map(|i| HvaEntry {
                    start: i,
                    end: 4096 - i,
                    slot: 0,
                })
                .collect(),
            (0..1024)
                .map(|_| HvaEntry {
                    start: 7,
                    end: 9,
                    slot: 0,
                })
                .collect(),
        ];
        for es in shapes {
            let index = HvaIndex::build(es);
            let depth = depth(&index, index.root);
            assert!(depth <= 11, "depth {depth} for 1024 entries");
        }
    }

    fn depth(index: &HvaIndex, n: u32) -> usize {
        match index.nodes.get(n as usize) {
            None => 0,
            Some(node) => 1 + depth(index, node.left).max(depth(index, node.right)),
        }
    }
}
