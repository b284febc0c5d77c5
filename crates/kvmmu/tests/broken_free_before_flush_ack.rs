//! The deliberately broken build that frees an unlinked TDP table before the remote TLB flush is
//! acknowledged (feature `broken-free-before-flush-ack`, violating G1 in docs/locking.md) must be
//! caught: the loom model of a zap + flush + free racing a vCPU's guest-mode walk finds the
//! interleaving where the vCPU reads the freed (poisoned) table.
//!
//! Run: `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target-loom cargo test --release -p kvmmu
//! --features broken-free-before-flush-ack --test broken_free_before_flush_ack`.
#![cfg(loom)]

#[path = "common/guest_walk_model.rs"]
mod guest_walk_model;

#[test]
fn loom_catches_a_table_freed_before_the_flush_is_acknowledged() {
    let caught = std::panic::catch_unwind(guest_walk_model::run);
    assert!(
        caught.is_err(),
        "the loom model passed a build that frees tables before the flush is acknowledged"
    );
}
