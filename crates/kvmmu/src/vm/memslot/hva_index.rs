//! The host-virtual index of a memslot set: which slots does an hva range hit? (KVM's `hva_tree`.)
//!
//! Host ranges of slots may overlap (aliases, module invariant 3), so this is an interval index,
//! queried by every MMU-notifier walk and every aging call, and updated once per memslot change.
//!
//! It is a persistent (immutable, structurally shared) treap ordered by `(start, end, slot)`, each
//! node augmented with the largest `end` below it (an interval tree, as KVM's augmented rbtree).
//! An update ([`HvaIndex::with`], [`HvaIndex::without`]) copies only the O(log n) nodes on the
//! paths it changes and shares every other node with the index it came from, so publishing a new
//! memslot set costs O(log n), not O(n). No persistent-collection crate offers the `max_end`
//! augmentation a stabbing query needs, hence this small tree.
//!
//! Invariants:
//! 1. Binary-search-tree order on `(start, end, slot)`; heap order on `priority` (a fixed hash of
//!    the key, so the shape depends only on the set of entries, and the expected depth is
//!    O(log n) whatever the insertion order).
//! 2. `max_end` of a node is the largest `end` in its subtree.
//! 3. Nodes are never mutated after construction; an update builds new nodes for the changed paths.
//!
//! A query costs O(log n + k · log n) for `k` reported slots at worst and neither allocates nor
//! writes memory: a subtree whose `max_end` is at or below the query's start, or whose keys all
//! start at or after its end, is skipped.

use crate::sync::Arc;

/// One slot's host range `[start, end)` and its slot id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct HvaEntry {
    /// `userspace_addr`.
    pub start: u64,
    /// `userspace_addr + npages * PAGE_SIZE`, exclusive; `end > start`.
    pub end: u64,
    /// The slot's id (unique within a set).
    pub slot: u32,
}

impl HvaEntry {
    /// The treap priority of this entry (invariant 1): a mix of the whole key.
    fn priority(&self) -> u64 {
        let mut x = self.start ^ self.end.rotate_left(21) ^ u64::from(self.slot).rotate_left(42);
        // splitmix64's finaliser.
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }
}

type Link = Option<Arc<Node>>;

#[derive(Debug)]
struct Node {
    entry: HvaEntry,
    priority: u64,
    /// Largest `end` in this subtree (invariant 2).
    max_end: u64,
    left: Link,
    right: Link,
}

impl Node {
    /// A node with `entry` (and its priority) and the given children.
    fn new(entry: HvaEntry, priority: u64, left: Link, right: Link) -> Arc<Node> {
        let max_end = [&left, &right]
            .into_iter()
            .flatten()
            .fold(entry.end, |m, c| m.max(c.max_end));
        Arc::new(Node {
            entry,
            priority,
            max_end,
            left,
            right,
        })
    }

    /// A copy of `self` with other children (path copying, invariant 3).
    fn with_children(&self, left: Link, right: Link) -> Arc<Node> {
        Node::new(self.entry, self.priority, left, right)
    }
}

/// Splits `t` into the entries below `key` and the rest (`inclusive`: at or below `key`).
fn split(t: &Link, key: &HvaEntry, inclusive: bool) -> (Link, Link) {
    let Some(n) = t else { return (None, None) };
    let goes_left = if inclusive {
        n.entry <= *key
    } else {
        n.entry < *key
    };
    if goes_left {
        let (l, r) = split(&n.right, key, inclusive);
        (Some(n.with_children(n.left.clone(), l)), r)
    } else {
        let (l, r) = split(&n.left, key, inclusive);
        (l, Some(n.with_children(r, n.right.clone())))
    }
}

/// Joins two treaps, every key of `a` below every key of `b`.
fn merge(a: Link, b: Link) -> Link {
    match (a, b) {
        (None, t) | (t, None) => t,
        (Some(a), Some(b)) => {
            if a.priority > b.priority {
                Some(a.with_children(a.left.clone(), merge(a.right.clone(), Some(b))))
            } else {
                Some(b.with_children(merge(Some(a), b.left.clone()), b.right.clone()))
            }
        }
    }
}

/// A persistent interval index over the host ranges of one memslot set. Cloning shares it.
#[derive(Clone, Debug, Default)]
pub(super) struct HvaIndex {
    root: Link,
    len: usize,
}

impl HvaIndex {
    /// Builds the index from scratch (tests). Every entry must be non-empty (`end > start`), which
    /// memslots guarantee (module invariant 1), and keys must be distinct.
    #[cfg(test)]
    pub(super) fn build(entries: Vec<HvaEntry>) -> HvaIndex {
        entries
            .into_iter()
            .fold(HvaIndex::default(), |index, e| index.with(e))
    }

    /// Number of entries.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// This index plus `entry`, sharing all but O(log n) nodes with `self` (which is unchanged).
    ///
    /// # Panics
    ///
    /// If `entry` is empty (memslot invariant 1) or already present (slot ids are unique).
    pub(super) fn with(&self, entry: HvaEntry) -> HvaIndex {
        assert!(
            entry.start < entry.end,
            "memslot invariant 1 violated: a slot with an empty host range"
        );
        let (below, rest) = split(&self.root, &entry, false);
        let (same, above) = split(&rest, &entry, true);
        assert!(same.is_none(), "hva index: entry {entry:?} inserted twice");
        let single = Some(Node::new(entry, entry.priority(), None, None));
        HvaIndex {
            root: merge(merge(below, single), above),
            len: self.len + 1,
        }
    }

    /// This index without `entry`, sharing all but O(log n) nodes with `self` (which is
    /// unchanged).
    ///
    /// # Panics
    ///
    /// If `entry` is not in the index.
    pub(super) fn without(&self, entry: HvaEntry) -> HvaIndex {
        let (below, rest) = split(&self.root, &entry, false);
        let (same, above) = split(&rest, &entry, true);
        assert!(same.is_some(), "hva index: entry {entry:?} is not indexed");
        HvaIndex {
            root: merge(below, above),
            len: self.len - 1,
        }
    }

    /// Calls `f` with the slot of every entry intersecting `[start, end)`, each exactly once, in
    /// ascending start order. An empty query (`end <= start`) reports nothing.
    #[inline]
    pub(super) fn for_each_overlap(&self, start: u64, end: u64, mut f: impl FnMut(u32)) {
        if end > start {
            overlap(&self.root, start, end, &mut f);
        }
    }
}

/// The query of [`HvaIndex::for_each_overlap`] over subtree `t`.
fn overlap(t: &Link, start: u64, end: u64, f: &mut impl FnMut(u32)) {
    let Some(n) = t else { return };
    // Invariant 2: nothing below ends after `start`.
    if n.max_end <= start {
        return;
    }
    overlap(&n.left, start, end, f);
    // Invariant 1: everything to the right starts at or after this node.
    if n.entry.start < end {
        if n.entry.end > start {
            f(n.entry.slot);
        }
        overlap(&n.right, start, end, f);
    }
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
        // Disjoint, nested and aliased intervals; the descent must stay short for each shape (a
        // treap: expected depth about 2 ln n, bounded here by 3 log2 n).
        let shapes: [Vec<HvaEntry>; 3] = [
            (0..1024)
                .map(|i| HvaEntry {
                    start: i * 10,
                    end: i * 10 + 5,
                    slot: u32::try_from(i).expect("small"),
                })
                .collect(),
            (0..1024)
                .map(|i| HvaEntry {
                    start: i,
                    end: 4096 - i,
                    slot: u32::try_from(i).expect("small"),
                })
                .collect(),
            (0..1024)
                .map(|i| HvaEntry {
                    start: 7,
                    end: 9,
                    slot: i,
                })
                .collect(),
        ];
        for es in shapes {
            let index = HvaIndex::build(es);
            let depth = depth(&index.root);
            assert!(depth <= 30, "depth {depth} for 1024 entries");
        }
    }

    fn depth(n: &Link) -> usize {
        match n {
            None => 0,
            Some(node) => 1 + depth(&node.left).max(depth(&node.right)),
        }
    }

    /// The nodes of `t` as pointers.
    fn nodes(t: &Link, out: &mut std::collections::HashSet<*const Node>) {
        if let Some(n) = t {
            out.insert(Arc::as_ptr(n));
            nodes(&n.left, out);
            nodes(&n.right, out);
        }
    }

    #[test]
    fn an_update_copies_o_log_n_nodes_and_shares_the_rest() {
        let n = 32_764u32;
        let index = HvaIndex::build(
            (0..n)
                .map(|i| HvaEntry {
                    start: u64::from(i) << 12,
                    end: (u64::from(i) + 1) << 12,
                    slot: i,
                })
                .collect(),
        );
        let mut old = std::collections::HashSet::new();
        nodes(&index.root, &mut old);
        assert_eq!(old.len(), n as usize);
        let extra = HvaEntry {
            start: 0x1234_5000,
            end: 0x1234_6000,
            slot: n,
        };
        let victim = HvaEntry {
            start: 77 << 12,
            end: 78 << 12,
            slot: 77,
        };
        for next in [index.with(extra), index.without(victim)] {
            let mut now = std::collections::HashSet::new();
            nodes(&next.root, &mut now);
            let copied = now.difference(&old).count();
            // log2(32764) is 15: a copy of the tree would be 32,764 nodes.
            assert!(copied <= 64, "one update copied {copied} nodes");
            assert!(now.len().abs_diff(old.len()) == 1);
        }
        // The input is unchanged.
        let mut again = std::collections::HashSet::new();
        nodes(&index.root, &mut again);
        assert_eq!(again, old);
        assert_eq!(query(&index, 77 << 12, 78 << 12), vec![77]);
        assert_eq!(
            query(&index.without(victim), 77 << 12, 78 << 12),
            Vec::<u32>::new()
        );
    }

    #[test]
    fn removing_an_entry_leaves_its_aliases() {
        let es: Vec<HvaEntry> = (0..6)
            .map(|slot| HvaEntry {
                start: 100 + u64::from(slot),
                end: 200,
                slot,
            })
            .collect();
        let mut index = HvaIndex::build(es.clone());
        for e in &es[..3] {
            index = index.without(*e);
        }
        assert_eq!(index.len(), 3);
        assert_eq!(query(&index, 150, 151), vec![3, 4, 5]);
        assert_eq!(query(&index, 0, 103), Vec::<u32>::new());
    }
}
