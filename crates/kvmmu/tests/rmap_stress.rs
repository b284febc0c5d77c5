//! Stress: one `mmu_lock` writer adds and removes rmap entries (zapping SPTEs before removal, as the
//! shadow MMU does) while two agers age the same rmaps without `mmu_lock` (spec §3.8, §3.9).
//! Properties: no panic (no walker reaches a freed descriptor, every read-only unlock restores its
//! value), a locked chain is stable, `0 | LOCKED` is never observed, no entry is lost, and every
//! descriptor allocated is freed.
#![cfg(not(loom))]

use std::ops::ControlFlow;

use kvmmu::internals::mmu::shadow::rmap::{
    AgeAction, RMAP_LOCKED, RmapHead, RmapStats, SPTE_ACCESSED_MASK, SPTE_PRESENT_MASK, SptePtr,
};
use kvmmu::internals::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use kvmmu::internals::sync::witness::MmuLock;

const HEADS: usize = 4;
const SLOTS_PER_HEAD: usize = 40;
const ROUNDS: usize = 100_000;
const YOUNG: u64 = SPTE_PRESENT_MASK | SPTE_ACCESSED_MASK | 0x7;

/// A tiny deterministic PRNG (xorshift64*).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn lockless_agers_race_an_mmu_lock_writer_without_loss_or_leak() {
    let slots: Box<[AtomicU64]> = (0..HEADS * SLOTS_PER_HEAD)
        .map(|_| AtomicU64::new(0))
        .collect();
    // SAFETY: `slots` outlives every rmap and every thread of this test (all joined by the scope,
    // and every rmap is zapped before the end).
    let ptr = |i: usize| unsafe { SptePtr::new(&slots[i]) };
    let heads: Vec<RmapHead> = (0..HEADS).map(|_| RmapHead::new()).collect();
    let lock = MmuLock::new();
    let stats = RmapStats::new();
    let done = AtomicBool::new(false);
    let mut present = [false; HEADS * SLOTS_PER_HEAD];

    std::thread::scope(|s| {
        let mut agers = Vec::new();
        for seed in 1..=2u64 {
            let (heads, stats, done) = (&heads, &stats, &done);
            agers.push(s.spawn(move || {
                let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
                let mut young = 0u64;
                while !done.load(Ordering::Acquire) {
                    let head = &heads[rng.below(HEADS)];
                    let raw = head.raw_value();
                    assert_ne!(raw, RMAP_LOCKED, "0 | LOCKED observed");
                    if rng.below(4) == 0 {
                        // Walk twice under one lock: the chain must not change meanwhile.
                        let g = head.lock_readonly(stats);
                        let mut a = Vec::new();
                        let mut b = Vec::new();
                        let _ = g.for_each_spte(|p| {
                            a.push(p);
                            ControlFlow::Continue(())
                        });
                        let _ = g.for_each_spte(|p| {
                            b.push(p);
                            ControlFlow::Continue(())
                        });
                        assert_eq!(a, b, "chain changed under a read-only lock");
                        assert_eq!(a.is_empty(), !g.is_locked());
                        drop(g);
                    } else {
                        let action = if rng.below(2) == 0 {
                            AgeAction::Clear
                        } else {
                            AgeAction::TestOnly
                        };
                        young += u64::from(head.age_rmap(stats, action));
                    }
                }
                young
            }));
        }

        let mut rng = Rng(0x1234_5678);
        for round in 0..ROUNDS {
            let g = lock.write();
            let w = g.witness();
            let h = rng.below(HEADS);
            let i = h * SLOTS_PER_HEAD + rng.below(SLOTS_PER_HEAD);
            if present[i] {
                // Zap the SPTE first, then drop it from the rmap (mmu_spte_clear_track_bits; drop_spte).
                slots[i].store(1 << 63, Ordering::Relaxed);
                heads[h]
                    .pte_list_remove(w, &stats, ptr(i))
                    .expect("present entry must be listed");
                present[i] = false;
            } else {
                slots[i].store(YOUNG, Ordering::Relaxed);
                heads[h].pte_list_add(w, &stats, ptr(i));
                present[i] = true;
            }
            if round % 1000 == 999 {
                // "Hardware" touches everything again, so agers keep clearing.
                for (j, p) in present.iter().enumerate() {
                    if *p {
                        slots[j].fetch_or(SPTE_ACCESSED_MASK, Ordering::Relaxed);
                    }
                }
            }
            drop(g);
        }
        done.store(true, Ordering::Release);
        let young: u64 = agers
            .into_iter()
            .map(|h| h.join().expect("ager panicked"))
            .sum();
        assert!(
            young > 0,
            "the agers never saw a young SPTE: the test did not exercise aging"
        );
    });

    let g = lock.write();
    let w = g.witness();
    for (h, head) in heads.iter().enumerate() {
        let mut listed = Vec::new();
        head.for_each_spte(w, &stats, |p| listed.push(p));
        listed.sort();
        let mut want: Vec<SptePtr> = (h * SLOTS_PER_HEAD..(h + 1) * SLOTS_PER_HEAD)
            .filter(|&i| present[i])
            .map(ptr)
            .collect();
        want.sort();
        assert_eq!(listed, want, "rmap {h} lost or gained an entry");
        assert_eq!(head.count(w, &stats), want.len());
        for p in &listed {
            let v = p.load_lockless();
            assert_ne!(v & SPTE_PRESENT_MASK, 0, "aging changed the present bit");
            assert_eq!(v & 0x7, 0x7, "aging changed permission bits");
        }
        head.zap_all(w, &stats, |_| {});
    }
    drop(g);
    let s = stats.snapshot();
    assert!(s.desc_allocs > 0, "the test never built a descriptor chain");
    assert_eq!(s.desc_allocs, s.desc_frees, "descriptor leak");
}
