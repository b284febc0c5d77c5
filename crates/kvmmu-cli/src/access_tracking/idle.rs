//! `mark_memory_idle` of `kvmmu access-tracking`, in its two variants: page_idle (the bitmap,
//! one thread per vCPU region) and MGLRU (one aging pass, then the generation checks).

use super::{Layout, Policy};
use crate::report::{Report, Status, progress};
use crate::vcpus::{PhaseTime, Span};
use kvmmu::PAGE_SIZE;
use kvmmu::prelude::*;
use kvmmu::{IdleState, LruGen, PageIdle};
use std::sync::atomic::{AtomicU64, Ordering};

pub(super) fn page_hva(hva: Hva, page: u64) -> Hva {
    Hva::new(hva.raw() + page * PAGE_SIZE)
}

/// `mark_memory_idle`, page_idle variant: one thread per vCPU region (only one with `-o`).
pub(super) fn mark_idle_page_idle(
    lay: &Layout,
    idle: &PageIdle,
    hva: Hva,
    policy: Policy,
    nth: u32,
    r: &mut Report,
) -> anyhow::Result<()> {
    let (no_pfn, still_idle) = (AtomicU64::new(0), AtomicU64::new(0));
    let threads = if lay.overlap { 1 } else { lay.vcpus };
    let pb = progress::bar(lay.test_pages, "Mark memory idle (page_idle)");
    let start = std::sync::Barrier::new(threads);
    let time = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|i| {
                let (no_pfn, still_idle, pb, start) = (&no_pfn, &still_idle, &pb, &start);
                crate::vcpus::spawn_named(
                    s,
                    format!("page-idle-{i}"),
                    move || -> (anyhow::Result<()>, Span) {
                        start.wait();
                        Span::measure(|| -> anyhow::Result<()> {
                            let (first, n) = lay.region(i);
                            for p in first..first + n {
                                if p % 4096 == 4095 {
                                    pb.inc(4096);
                                }
                                let a = page_hva(hva, p);
                                match idle.read(a)? {
                                    IdleState::NoPfn => {
                                        no_pfn.fetch_add(1, Ordering::Relaxed);
                                        continue;
                                    }
                                    IdleState::Idle => {
                                        still_idle.fetch_add(1, Ordering::Relaxed);
                                        continue;
                                    }
                                    IdleState::NotIdle => {}
                                }
                                idle.mark_idle(a)?;
                            }
                            Ok(())
                        })
                    },
                )
            })
            .collect();
        let mut spans = Vec::new();
        for h in hs {
            let (res, span) = h
                .join()
                .map_err(|_| anyhow::anyhow!("mark-idle thread panicked"))?;
            res?;
            spans.push(span);
        }
        anyhow::Ok(PhaseTime::from_spans(&spans))
    })?;
    r.phase_time("Mark memory idle (page_idle)", &time);
    pb.finish_and_clear();
    let (no_pfn, still_idle) = (no_pfn.into_inner(), still_idle.into_inner());
    let pages = lay.test_pages;
    r.require(
        format!("mark idle #{nth}: pages without a pfn < 1%"),
        no_pfn < pages.div_ceil(100),
        format!("{no_pfn} of {pages}"),
    );
    let too_many = still_idle >= pages / 10 && still_idle > 0;
    r.check(
        format!("mark idle #{nth}: accessed pages still idle < 10%"),
        match (too_many, policy) {
            (false, _) => Status::Pass,
            (true, Policy::Warn) => Status::Warn,
            (true, Policy::Fail) => Status::Fail,
        },
        format!("{still_idle} of {pages} still idle"),
    );
    r.counts
        .insert(format!("mark_idle_{nth}_still_idle"), still_idle);
    r.counts.insert(format!("mark_idle_{nth}_no_pfn"), no_pfn);
    Ok(())
}

/// `mark_memory_idle`, MGLRU variant: one aging pass, then the generation checks.
pub(super) fn mark_idle_lru_gen(
    lay: &Layout,
    lru: &mut LruGen,
    last_gen: u32,
    policy: Policy,
    nth: u32,
    r: &mut Report,
) -> anyhow::Result<u32> {
    let (pass, span) = Span::measure(|| lru.age());
    let pass = pass?;
    r.phase("Mark memory idle (lru_gen)", span.duration());
    let pages = lay.test_pages;
    r.counts
        .insert(format!("mark_idle_{nth}_young"), pass.young);
    let status_if_bad = match policy {
        Policy::Fail => Status::Fail,
        Policy::Warn => Status::Warn,
    };
    let new_gen = match lru.find_generation(pages * 9 / 10) {
        Some(g) => {
            r.check(
                format!("mark idle #{nth}: a generation holds 90% of the pages"),
                Status::Pass,
                format!("generation {g}"),
            );
            Some(g)
        }
        None => {
            let half = lru.find_generation(pages / 2);
            r.check(
                format!("mark idle #{nth}: a generation holds 90% of the pages"),
                status_if_bad,
                format!("none; histogram {:?}", lru.histogram()),
            );
            r.require(
                format!("mark idle #{nth}: a generation holds 50% of the pages"),
                half.is_some(),
                format!("{half:?}"),
            );
            half
        }
    };
    let Some(new_gen) = new_gen else {
        return Ok(last_gen);
    };
    let moved = new_gen > last_gen;
    let stuck = lru.pages_in(last_gen).min(pages);
    r.check(
        format!("mark idle #{nth}: accessed pages moved to a newer generation"),
        if moved { Status::Pass } else { status_if_bad },
        format!(
            "generation {last_gen} -> {new_gen} ({} of {pages} pages young, {stuck} in the old one)",
            pass.young
        ),
    );
    Ok(new_gen)
}
