//! Model-based test of the rmap writers (spec §1.6, §4 item 27): random add/remove/zap sequences
//! against a multiset model, checking the chain shape and contents after every operation and that
//! every descriptor allocated is freed.
#![cfg(not(loom))]

use kvmmu::internals::mmu::shadow::rmap::{
    PTE_LIST_EXT, RmapError, RmapHead, RmapShape, RmapStats, SptePtr,
};
use kvmmu::internals::sync::atomic::AtomicU64;
use kvmmu::internals::sync::witness::{MmuLock, MmuWrite};
use proptest::prelude::*;

const SLOTS: usize = 48;

#[derive(Clone, Debug)]
enum Op {
    Add(usize),
    Remove(usize),
    Zap,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..SLOTS).prop_map(Op::Add),
        3 => (0..SLOTS).prop_map(Op::Remove),
        1 => Just(Op::Zap),
    ]
}

/// Checks spec §4 item 27 (chain shape) and that the rmap lists exactly the model's multiset.
fn check(head: &RmapHead, w: &MmuWrite, stats: &RmapStats, model: &[SptePtr]) {
    let count = head.count(w, stats);
    let mut listed = Vec::new();
    head.for_each_spte(w, stats, |s| listed.push(s));
    assert_eq!(
        count,
        model.len(),
        "pte_list_count disagrees with the model"
    );
    assert_eq!(
        listed.len(),
        count,
        "iteration disagrees with pte_list_count"
    );
    let mut want = model.to_vec();
    want.sort();
    listed.sort();
    assert_eq!(listed, want, "the rmap lists a different set of SPTEs");
    match head.shape(w, stats) {
        RmapShape::Empty => assert_eq!(count, 0),
        RmapShape::Single => assert_eq!(count, 1),
        RmapShape::Many(descs) => {
            let (first, tails) = descs.split_first().expect("MANY has a head descriptor");
            assert!(
                (1..=PTE_LIST_EXT).contains(&first.spte_count),
                "head descriptor holds {} entries",
                first.spte_count
            );
            assert!(
                tails.iter().all(|d| d.spte_count == PTE_LIST_EXT),
                "a tail is not full: {descs:?}"
            );
            for (i, d) in descs.iter().enumerate() {
                let after: usize = descs[i + 1..].iter().map(|t| t.spte_count).sum();
                assert_eq!(
                    d.tail_count, after,
                    "tail_count of descriptor {i} is wrong: {descs:?}"
                );
            }
            assert_eq!(first.spte_count + first.tail_count, count);
            assert_eq!(head.raw_value() & 2, 0, "LOCKED left set");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn rmap_chain_matches_a_multiset_model(ops in proptest::collection::vec(op(), 1..300)) {
        let slots: Box<[AtomicU64]> = (0..SLOTS).map(|_| AtomicU64::new(0)).collect();
        // SAFETY: `slots` outlives `head`, which is zapped below before either is dropped.
        let ptr = |i: usize| unsafe { SptePtr::new(&slots[i]) };
        let lock = MmuLock::new();
        let stats = RmapStats::new();
        let head = RmapHead::new();
        let mut model: Vec<SptePtr> = Vec::new();
        {
            let g = lock.write();
            let w = g.witness();
            for op in &ops {
                match *op {
                    Op::Add(i) => {
                        let before = head.pte_list_add(w, &stats, ptr(i));
                        prop_assert_eq!(before, model.len());
                        model.push(ptr(i));
                    }
                    Op::Remove(i) => {
                        let r = head.pte_list_remove(w, &stats, ptr(i));
                        match model.iter().position(|&s| s == ptr(i)) {
                            Some(pos) => {
                                prop_assert_eq!(r, Ok(()));
                                model.swap_remove(pos);
                            }
                            None if model.is_empty() => {
                                prop_assert_eq!(r, Err(RmapError::Empty { spte: ptr(i) }));
                            }
                            None => prop_assert_eq!(r, Err(RmapError::NotFound { spte: ptr(i) })),
                        }
                    }
                    Op::Zap => {
                        let mut zapped = Vec::new();
                        let any = head.zap_all(w, &stats, |s| zapped.push(s));
                        prop_assert_eq!(any, !model.is_empty());
                        zapped.sort();
                        model.sort();
                        prop_assert_eq!(&zapped, &model, "zap_all did not visit exactly the entries");
                        model.clear();
                        prop_assert_eq!(stats.snapshot().live_descriptors(), 0);
                    }
                }
                check(&head, w, &stats, &model);
            }
            head.zap_all(w, &stats, |_| {});
        }
        let s = stats.snapshot();
        prop_assert_eq!(s.desc_allocs, s.desc_frees, "descriptor leak");
    }
}
