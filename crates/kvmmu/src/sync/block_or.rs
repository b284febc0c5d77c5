//! The OR of an aligned block of 16 atomic words in one pass over its two cache lines: the
//! pre-test of the aging scans (the TDP ager's table scan, `mmu/tdp/age.rs`, and the host's young
//! scan, `host/aging.rs`), which skip a block whose OR has no bit of interest.
//!
//! Why not 16 atomic loads: the scans are bound by load throughput (one 8-byte load per entry,
//! like the flat-scan limit they are compared with), and a pass reads two arrays (host PTEs and
//! SPTEs) where the limit reads one. On x86-64 the block is read with eight 16-byte SSE2 loads
//! (half the load instructions) in one `asm!` block; elsewhere, and under loom (whose atomics are
//! not plain words), with 16 `Relaxed` loads.
//!
//! Invariants:
//! 1. The result is the OR of 16 values, each of which its word held at some moment during the
//!    call (each aligned 8-byte half of a 16-byte SSE load is read single-copy atomically: Intel
//!    SDM vol. 3A §9.1.1, AMD APM vol. 2 §7.3.2), i.e. exactly what 16 `Relaxed` loads return.
//! 2. Nothing is written, and the result orders nothing: a caller acts only on a fresh atomic
//!    load of a word, never on this OR (a stale OR only delays aging a young entry to the next
//!    pass, or sends a block to the per-entry path for nothing).

use super::atomic::AtomicU64;

/// Words in a block: two 64-byte cache lines of 8-byte entries.
pub(crate) const BLOCK: usize = 16;

/// The OR of the 16 words of `block` (invariant 1); orders nothing (invariant 2).
#[cfg(all(target_arch = "x86_64", not(loom)))]
#[inline(always)]
pub(crate) fn or_block(block: &[AtomicU64; BLOCK]) -> u64 {
    let p = block.as_ptr();
    let out: u64;
    // Why the block below is sound: `p` points to 128 readable bytes (the array, borrowed for
    // the call), which the block only reads (`readonly`); `movdqu` has no alignment requirement
    // and each word is 8-byte aligned (an `AtomicU64`), so each 8-byte half is read atomically
    // (invariant 1). An `asm!` block is opaque to the Rust memory model: its reads are the
    // hardware's, equivalent to 16 `Relaxed` loads, so they race with no Rust access (the words
    // are only ever accessed atomically). Only the named xmm registers are clobbered.
    // SAFETY: 128 readable bytes, read only, each word whole (the argument just above).
    unsafe {
        core::arch::asm!(
            "movdqu {a}, [{p}]",
            "movdqu {b}, [{p} + 16]",
            "movdqu {c}, [{p} + 32]",
            "movdqu {d}, [{p} + 48]",
            "por {a}, {c}",
            "por {b}, {d}",
            "movdqu {c}, [{p} + 64]",
            "movdqu {d}, [{p} + 80]",
            "por {a}, {c}",
            "por {b}, {d}",
            "movdqu {c}, [{p} + 96]",
            "movdqu {d}, [{p} + 112]",
            "por {a}, {c}",
            "por {b}, {d}",
            "por {a}, {b}",
            "pshufd {b}, {a}, 0x4e",
            "por {a}, {b}",
            "movq {out}, {a}",
            p = in(reg) p,
            a = out(xmm_reg) _,
            b = out(xmm_reg) _,
            c = out(xmm_reg) _,
            d = out(xmm_reg) _,
            out = out(reg) out,
            options(nostack, preserves_flags, readonly),
        );
    }
    out
}

/// The OR of the 16 words of `block` (invariant 1); orders nothing (invariant 2).
#[cfg(not(all(target_arch = "x86_64", not(loom))))]
#[inline(always)]
pub(crate) fn or_block(block: &[AtomicU64; BLOCK]) -> u64 {
    // ORDERING: Relaxed: invariant 2 (the result is a hint; nothing is read through it).
    block
        .iter()
        .fold(0, |acc, w| acc | w.load(super::atomic::Ordering::Relaxed))
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn or_block_is_the_or_of_every_word_including_each_lane() {
        let block: [AtomicU64; BLOCK] = core::array::from_fn(|_| AtomicU64::new(0));
        assert_eq!(or_block(&block), 0);
        for i in 0..BLOCK {
            for bit in [0, 5, 31, 32, 63] {
                block[i].store(1 << bit, core::sync::atomic::Ordering::Relaxed);
                assert_eq!(or_block(&block), 1 << bit, "word {i}, bit {bit}");
                block[i].store(0, core::sync::atomic::Ordering::Relaxed);
            }
        }
        for (i, w) in block.iter().enumerate() {
            w.store(1 << i, core::sync::atomic::Ordering::Relaxed);
        }
        assert_eq!(or_block(&block), (1 << BLOCK) - 1);
    }

    #[test]
    fn or_block_reads_an_unaligned_block_of_a_larger_array() {
        // A block starting at an odd word (8-byte aligned, not 16): the host scan's slices may.
        let words: Vec<AtomicU64> = (0..BLOCK as u64 + 1).map(|_| AtomicU64::new(0)).collect();
        words[0].store(1, core::sync::atomic::Ordering::Relaxed);
        words[BLOCK].store(2, core::sync::atomic::Ordering::Relaxed);
        let block = <&[AtomicU64; BLOCK]>::try_from(&words[1..=BLOCK]).expect("16 words");
        assert_eq!(or_block(block), 2, "only the block's own words count");
    }
}
