//! The `translation` scenario: a vCPU's guest accesses through a warm TLB and through TLB misses
//! (a walk and a fill per access), against raw loads and a raw 4-level walk of the same pattern.
//!
//! The limits run at two strides (rawwalk.rs): the guest's own pattern, word 0 of every 4 KiB page,
//! which the targets are measured against, and one word per 64-byte line (the limits before session
//! 4, kept under their old names). No translation can beat the first; the second is faster than any
//! access of the guest's pattern, and the bench reports how far (the "ceiling" ratios).

use super::guest::{self, touch_read};
use super::report::Report;
use super::{per_sec, populated, rawwalk};
use kvmmu::PAGE_SIZE;
use kvmmu::prelude::*;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Runs the scenario on a populated guest of `pages` pages.
pub(super) fn translation(
    r: &mut Report,
    mmu: MmuKind,
    pages: u64,
    reps: u32,
) -> anyhow::Result<()> {
    let tlb = 2048usize.min((pages / 4) as usize).max(1);
    let mut g = populated(mmu, AgingMode::Lockless, pages, tlb)?;
    let warm_pages = (tlb / 2) as u64;
    let warm_loops = (pages / warm_pages).max(1) * 4;
    // The limits, at two strides (rawwalk.rs): the guest's own pattern (word 0 of every 4 KiB
    // page: the same cache sets, one host page per access) and one word per 64-byte line.
    let strides = [rawwalk::PAGE_STRIDE_WORDS, rawwalk::LINE_STRIDE_WORDS];
    let raws: Vec<Vec<AtomicU64>> = strides
        .iter()
        .map(|s| (0..pages * s).map(|_| AtomicU64::new(1)).collect())
        .collect();
    let trees: Vec<rawwalk::RawTree> = strides
        .iter()
        .map(|&s| rawwalk::RawTree::new(guest::GUEST_GPA / PAGE_SIZE, pages, s))
        .collect();
    let (mut warm, mut miss, mut miss_frac) = (Vec::new(), Vec::new(), Vec::new());
    // [stride]: raw load of the hot set, of the whole range, and the raw 4-level walk.
    let mut raw_warm: [Vec<f64>; 2] = Default::default();
    let mut raw_miss: [Vec<f64>; 2] = Default::default();
    let mut raw_walk: [Vec<f64>; 2] = Default::default();
    r.config
        .push(("raw_walk_tables", trees[0].tables().to_string()));
    for _ in 0..reps {
        let v = &mut g.vcpus[0];
        black_box(touch_read(v, warm_pages, 1)?);
        let t = Instant::now();
        for _ in 0..warm_loops {
            black_box(touch_read(v, warm_pages, 1)?);
        }
        warm.push(per_sec(warm_pages * warm_loops, t) / 1e6);

        let m0 = v.stats().tlb_misses;
        let t = Instant::now();
        black_box(touch_read(v, pages, 1)?);
        miss.push(per_sec(pages, t) / 1e6);
        miss_frac.push((v.stats().tlb_misses - m0) as f64 * 100.0 / pages as f64);

        for (i, (raw, &stride)) in raws.iter().zip(&strides).enumerate() {
            let stride = stride as usize;
            // The limit: a raw load of the word each page's access reads, hot set and whole range.
            let t = Instant::now();
            let mut sum = 0u64;
            for _ in 0..warm_loops {
                for p in 0..warm_pages as usize {
                    // ORDERING: Relaxed: a plain load is the limit being measured.
                    sum = sum.wrapping_add(raw[p * stride].load(Ordering::Relaxed));
                }
            }
            black_box(sum);
            raw_warm[i].push(per_sec(warm_pages * warm_loops, t) / 1e6);
            let t = Instant::now();
            for p in 0..pages as usize {
                // ORDERING: Relaxed: as above.
                sum = sum.wrapping_add(raw[p * stride].load(Ordering::Relaxed));
            }
            black_box(sum);
            raw_miss[i].push(per_sec(pages, t) / 1e6);

            // The raw-walk limit: the same gfns through a 4-level tree of the TDP geometry,
            // walked by a bare loop, then the word the leaf names (rawwalk.rs).
            let t = Instant::now();
            black_box(trees[i].walk_all());
            raw_walk[i].push(per_sec(pages, t) / 1e6);
        }
    }
    let w = r.figure("translation", "kvmmu warm TLB", "M accesses/s", warm);
    let m = r.figure("translation", "kvmmu TLB miss (walk)", "M accesses/s", miss);
    r.figure(
        "translation",
        "kvmmu TLB-miss run: accesses that missed",
        "%",
        miss_frac,
    );
    r.ratio(
        "warm-TLB accesses/s per vCPU (M)",
        w,
        "absolute, millions per second",
        Some((100.0, true)),
    );
    r.ratio(
        "TLB-miss accesses/s per vCPU (M)",
        m,
        "absolute, millions per second",
        Some((30.0, true)),
    );
    let [pw, lw] = raw_warm;
    let [pm, lm] = raw_miss;
    let [pk, lk] = raw_walk;
    // The guest's own pattern: the limits the targets are measured against.
    let prw = r.figure(
        "translation",
        "raw load, hot set, page stride (limit)",
        "M loads/s",
        pw,
    );
    let rm = r.figure(
        "translation",
        "raw load, whole range, page stride (limit)",
        "M loads/s",
        pm,
    );
    let prwk = r.figure(
        "translation",
        "raw 4-level walk + load, page stride (limit)",
        "M walks/s",
        pk,
    );
    r.ratio(
        "warm TLB / raw load, page stride",
        w / prw,
        "fraction of the same-pattern limit",
        Some((0.15, true)),
    );
    r.ratio(
        "TLB miss / raw load, page stride",
        m / rm,
        "fraction of the same-pattern limit",
        None,
    );
    r.ratio(
        "TLB miss / raw 4-level walk, page stride",
        m / prwk,
        "fraction of the same-pattern raw-walk limit",
        Some((0.2, true)),
    );
    // One word per 64-byte line (the limits of bench schema kvmmu-bench/2 before session 4, kept
    // under their old names): faster than any access of the guest's pattern can be.
    let rw = r.figure("translation", "raw load, hot set (limit)", "M loads/s", lw);
    let rm = r.figure(
        "translation",
        "raw load, whole range (limit)",
        "M loads/s",
        lm,
    );
    let rwk = r.figure(
        "translation",
        "raw 4-level walk + load (limit)",
        "M walks/s",
        lk,
    );
    r.ratio(
        "warm TLB / raw load",
        w / rw,
        "fraction of the 64-byte-stride limit",
        None,
    );
    r.ratio(
        "TLB miss / raw load",
        m / rm,
        "fraction of the 64-byte-stride limit",
        None,
    );
    r.ratio(
        "TLB miss / raw 4-level walk",
        m / rwk,
        "fraction of the 64-byte-stride raw-walk limit",
        None,
    );
    // What a translation that cost nothing would score against the 64-byte-stride limits: the
    // ceiling of the two ratios above for any implementation of the guest's access pattern.
    r.ratio(
        "zero-cost translation / raw load (ceiling)",
        prw / rw,
        "page-stride raw load / 64-byte-stride raw load",
        None,
    );
    r.ratio(
        "zero-cost translation / raw 4-level walk (ceiling)",
        prwk / rwk,
        "page-stride raw walk / 64-byte-stride raw walk",
        None,
    );
    drop(g.vcpus);
    g.vm.shutdown();
    Ok(())
}
