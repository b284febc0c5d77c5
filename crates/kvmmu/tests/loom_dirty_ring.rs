//! Loom model of the dirty ring's full/reset handshake on the production ring
//! (`kvmmu::internals::vm::dirty_ring_core::DirtyRing`): a vCPU pushes while not soft-full (exiting and
//! retrying otherwise, as `DirtyRingFull` makes it), a user thread collects and resets. Every
//! pushed entry is collected exactly once, in order, with its fields, and no push ever finds the
//! ring completely full (R1, R2).
//!
//! Run: `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target-loom cargo test --release -p kvmmu --test loom_dirty_ring`
#![cfg(loom)]

use kvmmu::internals::sync::Arc;
use kvmmu::internals::vm::dirty_ring_core::DirtyRing;
use loom::thread;

/// Entries the vCPU pushes.
const PUSHES: u64 = 3;

#[test]
fn a_full_ring_and_resets_lose_and_duplicate_no_entry() {
    loom::model(|| {
        // 4 entries, 2 reserved: soft limit 2, so the third push must wait for a reset.
        let ring = Arc::new(DirtyRing::new(4, 2));
        let vcpu = {
            let ring = Arc::clone(&ring);
            thread::spawn(move || {
                let mut k = 0;
                while k < PUSHES {
                    if ring.soft_full() {
                        // The DirtyRingFull exit: the user resets, the vCPU re-enters.
                        thread::yield_now();
                        continue;
                    }
                    assert!(ring.push(7, 100 + k), "a push found the ring full");
                    k += 1;
                }
            })
        };
        let mut seen = Vec::new();
        while (seen.len() as u64) < PUSHES {
            ring.collect(|slot, offset| {
                assert_eq!(slot, 7, "an entry's fields were read before its flags");
                seen.push(offset);
            });
            let mut reset = Vec::new();
            ring.reset_collected(|_, offset| reset.push(offset));
            thread::yield_now();
        }
        vcpu.join().unwrap();
        assert_eq!(
            seen,
            [100, 101, 102],
            "lost, duplicated or reordered entries"
        );
        let mut extra = 0;
        ring.collect(|_, _| extra += 1);
        assert_eq!(extra, 0);
        // A reset that read the dirty index before the last push published it left that collected
        // entry for the next reset, which frees it now.
        ring.reset_collected(|_, _| {});
        assert_eq!(ring.used(), 0, "a collected entry was never freed");
    });
}
