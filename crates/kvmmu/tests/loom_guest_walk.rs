//! Loom model of the guest-mode contract's table lifetime (G1-G2 in docs/locking.md): a vCPU
//! walking without RCU while a zap unlinks, flushes and frees a table never reads the freed table.
//! The model is in `common/guest_walk_model.rs` (shared with the broken build's test).
//!
//! Run: `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target-loom cargo test --release -p kvmmu --test
//! loom_guest_walk` (bounded by `LOOM_MAX_PREEMPTIONS`, 2 in `.ci/loom`).
#![cfg(loom)]

#[path = "common/guest_walk_model.rs"]
mod guest_walk_model;

#[test]
fn guest_walk_never_reads_a_table_freed_by_a_racing_zap() {
    guest_walk_model::run();
}
