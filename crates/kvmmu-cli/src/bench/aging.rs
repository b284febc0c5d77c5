//! The `aging` scenario: one aging pass through the host's notifier path (`clear_young` over the
//! whole guest) at 0%, 10% and 100% young, lockless and locked, against the flat-scan limits.

use super::guest::{Guest, touch_read};
use super::report::Report;
use super::{FLAT_A, YOUNG, modes, per_sec, populated};
use kvmmu::prelude::*;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Makes every `step`-th page young (none for step 0) after clearing everything.
fn make_young(g: &mut Guest, young_pct: u64) -> anyhow::Result<()> {
    g.age()?;
    if let Some(step) = 100u64.checked_div(young_pct) {
        let pages = g.pages;
        black_box(touch_read(&mut g.vcpus[0], pages, step)?);
    }
    Ok(())
}

/// Flat-scan limit: test-then-`fetch_and` of every entry of an array of the same number of
/// entries, eight entries per loop iteration. (The plain one-entry loop runs at one of two rates,
/// about 4 or 8 G entries/s, depending on where the linker places it relative to a 64-byte line,
/// so a change elsewhere in the binary could move the ratio by 2x; the unrolled loop runs at the
/// faster rate or above wherever it lands.)
fn flat_scan(a: &[AtomicU64]) -> u64 {
    let (blocks, tail) = a.as_chunks::<8>();
    let mut young = 0;
    for block in blocks {
        // The inner loop over a fixed-size array is unrolled.
        young += test_and_clear(block);
    }
    young + test_and_clear(tail)
}

/// Test-then-`fetch_and` of each entry of `words`; returns how many were young.
#[inline(always)]
fn test_and_clear(words: &[AtomicU64]) -> u64 {
    let mut young = 0;
    for w in words {
        // ORDERING: Relaxed: the limit models the SPTE aging loop, whose A-bit reads are hints.
        if w.load(Ordering::Relaxed) & FLAT_A != 0 {
            w.fetch_and(!FLAT_A, Ordering::Relaxed);
            young += 1;
        }
    }
    young
}

/// The flat-scan limit with kvmmu's own pre-test (`sync/block_or.rs`): a block of 16 entries is
/// ORed with eight 16-byte loads, and only a block with an A bit is tested entry by entry. The
/// same technique as the lockless pass over one array instead of two; reported beside the target
/// ratio so that the scan technique and the MMU's cost can be told apart.
fn flat_scan_blocks(a: &[AtomicU64]) -> u64 {
    let mut young = 0;
    let (blocks, tail) = a.as_chunks::<16>();
    for block in blocks {
        if block_or(block) & FLAT_A != 0 {
            young += test_and_clear(block);
        }
    }
    young + test_and_clear(tail)
}

/// The OR of 16 entries read with eight 16-byte loads.
#[cfg(target_arch = "x86_64")]
fn block_or(block: &[AtomicU64; 16]) -> u64 {
    use std::arch::x86_64::_mm_unpackhi_epi64;
    use std::arch::x86_64::{__m128i, _mm_cvtsi128_si64, _mm_loadu_si128, _mm_or_si128};
    let p = block.as_ptr().cast::<__m128i>();
    // SAFETY: `p` points to the 128 bytes of `block`, borrowed for the call (`loadu` needs no
    // alignment); the limit's array is accessed by this thread only, so these plain reads race
    // with nothing (docs/locking.md "(bo)" is the library's argument for the concurrent case).
    unsafe {
        let mut v = _mm_loadu_si128(p);
        for i in 1..8 {
            v = _mm_or_si128(v, _mm_loadu_si128(p.add(i)));
        }
        let folded = _mm_or_si128(v, _mm_unpackhi_epi64(v, v));
        _mm_cvtsi128_si64(folded) as u64
    }
}

/// The OR of 16 entries (16 loads where 16-byte loads are not available).
#[cfg(not(target_arch = "x86_64"))]
fn block_or(block: &[AtomicU64; 16]) -> u64 {
    // ORDERING: Relaxed: as in `flat_scan`.
    block
        .iter()
        .fold(0, |acc, w| acc | w.load(Ordering::Relaxed))
}

/// The target ratio of a lockless aging pass to the flat-scan limit at `pct`% young (issue 15):
/// TDP scans its tables, the shadow MMU its rmap heads and (in table order) its direct pages.
fn aging_target(mmu: MmuKind, pct: u64) -> Option<(f64, bool)> {
    match (mmu, pct) {
        (MmuKind::Shadow, 0) => Some((0.15, true)),
        (MmuKind::Shadow, 100) => Some((0.6, true)),
        // Issue 15 raised the TDP target at 0% young from 0.3 to 0.5.
        (_, 0) => Some((0.5, true)),
        (_, 100) => Some((0.7, true)),
        _ => None,
    }
}

pub(super) fn aging(r: &mut Report, mmu: MmuKind, pages: u64, reps: u32) -> anyhow::Result<()> {
    let mut guests = modes()
        .iter()
        .map(|(m, _)| populated(mmu, *m, pages, 64))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let flat: Vec<AtomicU64> = (0..pages).map(|_| AtomicU64::new(0)).collect();
    for pct in YOUNG {
        let mut kv: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        let mut seen_young: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        let mut lim = Vec::new();
        let mut lim_blocks = Vec::new();
        for _ in 0..reps {
            for (i, g) in guests.iter_mut().enumerate() {
                make_young(g, pct)?;
                let before = g.accessed_cleared();
                let t = Instant::now();
                black_box(g.age()?);
                kv[i].push(per_sec(pages, t) / 1e6);
                seen_young[i].push((g.accessed_cleared() - before) as f64 * 100.0 / pages as f64);
            }
            for (scan, out) in [
                (flat_scan as fn(&[AtomicU64]) -> u64, &mut lim),
                (flat_scan_blocks, &mut lim_blocks),
            ] {
                for (i, w) in flat.iter().enumerate() {
                    let v = if pct > 0 && (i as u64).is_multiple_of(100 / pct) {
                        FLAT_A
                    } else {
                        0
                    };
                    // ORDERING: Relaxed: setup of a single-threaded array.
                    w.store(v, Ordering::Relaxed);
                }
                let t = Instant::now();
                black_box(scan(&flat));
                out.push(per_sec(pages, t) / 1e6);
            }
        }
        let l = r.figure(
            "aging",
            format!("flat-scan limit, {pct}% young"),
            "M SPTE/s",
            lim,
        );
        let lb = r.figure(
            "aging",
            format!("flat-scan limit with the block pre-test, {pct}% young"),
            "M SPTE/s",
            lim_blocks,
        );
        let mut rates = [0.0; 2];
        for (i, (_, name)) in modes().iter().enumerate() {
            rates[i] = r.figure(
                "aging",
                format!("kvmmu {name} pass, {pct}% young"),
                "M SPTE/s",
                std::mem::take(&mut kv[i]),
            );
            r.figure(
                "aging",
                format!("kvmmu {name} pass, {pct}% young: SPTEs aged"),
                "% of pages",
                std::mem::take(&mut seen_young[i]),
            );
            let target = if i == 0 { aging_target(mmu, pct) } else { None };
            r.ratio(
                format!("aging {name} / limit, {pct}% young"),
                rates[i] / l,
                "fraction of the flat-scan rate",
                target,
            );
        }
        r.ratio(
            format!("aging lockless / block-pre-test limit, {pct}% young"),
            rates[0] / lb,
            "fraction of the flat scan using the pass's own technique",
            None,
        );
        r.ratio(
            format!("aging lockless / locked, {pct}% young"),
            rates[0] / rates[1],
            "speed-up of lockless over locked",
            None,
        );
    }
    for g in guests {
        drop(g.vcpus);
        g.vm.shutdown();
    }
    Ok(())
}
