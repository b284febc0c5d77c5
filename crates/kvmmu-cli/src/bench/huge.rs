//! The huge-page scenarios of `kvmmu bench`: the same guest backed by 4K pages and by the
//! `-s/--backing-src` huge backing (THP by default), alternated rep by rep in one run.
//!
//! - `huge-populate`: a vCPU writes every page of a fresh guest (one fault per leaf: 512 times
//!   fewer faults with 2M leaves); guest pages populated per second, and the ratio.
//! - `huge-aging`: one full aging pass (`clear_young` over the guest through the notifier path)
//!   with every page young; nanoseconds per guest page, and the ratio (one SPTE per 512 pages
//!   with 2M leaves).
//!
//! Guest construction and the arena's prefault are never timed.

use super::guest::{Guest, touch_read, touch_write};
use super::report::Report;
use kvmmu::prelude::*;
use std::hint::black_box;
use std::time::Instant;

/// vCPU TLB entries: small, so that re-touches miss and set Accessed bits.
const TLB: usize = 64;

/// The two backings compared: 4K pages, then `src`.
fn backings(src: BackingSrc) -> [(BackingSrc, String); 2] {
    [
        (BackingSrc::Anonymous, "4K pages (anonymous)".into()),
        (src, format!("{src}")),
    ]
}

/// Populate rate with 4K pages and with `src`.
pub fn populate(
    r: &mut Report,
    mmu: MmuKind,
    pages: u64,
    reps: u32,
    src: BackingSrc,
) -> anyhow::Result<()> {
    let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..reps {
        for (i, (b, _)) in backings(src).iter().enumerate() {
            let mut g = Guest::new_backed(pages, mmu, AgingMode::Lockless, 1, TLB, *b)?;
            let t = Instant::now();
            touch_write(&mut g.vcpus[0], 0..pages)?;
            rates[i].push(pages as f64 / t.elapsed().as_secs_f64().max(1e-9) / 1e6);
            drop(g.vcpus);
            g.vm.shutdown();
        }
    }
    let mut med = [0.0; 2];
    for (i, (_, name)) in backings(src).iter().enumerate() {
        med[i] = r.figure(
            "huge-populate",
            format!("populate, {name}"),
            "M pages/s",
            std::mem::take(&mut rates[i]),
        );
    }
    r.ratio(
        format!("populate {src} / 4K"),
        med[1] / med[0],
        "speed-up of populating with huge pages",
        None,
    );
    Ok(())
}

/// Aging cost per guest page with 4K leaves and with `src`'s leaves, every page young.
pub fn aging(
    r: &mut Report,
    mmu: MmuKind,
    pages: u64,
    reps: u32,
    src: BackingSrc,
) -> anyhow::Result<()> {
    let mut guests = backings(src)
        .iter()
        .map(|(b, _)| {
            let mut g = Guest::new_backed(pages, mmu, AgingMode::Lockless, 1, TLB, *b)?;
            touch_write(&mut g.vcpus[0], 0..pages)?;
            Ok(g)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut cost: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..reps {
        for (i, g) in guests.iter_mut().enumerate() {
            g.age()?;
            black_box(touch_read(&mut g.vcpus[0], pages, 1)?);
            let t = Instant::now();
            black_box(g.age()?);
            cost[i].push(t.elapsed().as_secs_f64() * 1e9 / pages as f64);
        }
    }
    let mut med = [0.0; 2];
    for (i, (_, name)) in backings(src).iter().enumerate() {
        med[i] = r.figure(
            "huge-aging",
            format!("aging pass, all young, {name}"),
            "ns/page",
            std::mem::take(&mut cost[i]),
        );
    }
    r.ratio(
        format!("aging cost per page, 4K / {src}"),
        med[0] / med[1].max(1e-12),
        "times cheaper per guest page with huge leaves",
        None,
    );
    for g in guests {
        drop(g.vcpus);
        g.vm.shutdown();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_huge_scenarios_report_a_figure_per_backing_and_their_ratio() {
        let mut r = Report::default();
        let src = BackingSrc::AnonymousThp;
        populate(&mut r, MmuKind::Tdp, 1024, 1, src).unwrap();
        aging(&mut r, MmuKind::Shadow, 1024, 1, src).unwrap();
        for scenario in ["huge-populate", "huge-aging"] {
            let figs: Vec<_> = r
                .figures
                .iter()
                .filter(|f| f.scenario == scenario)
                .collect();
            assert_eq!(figs.len(), 2, "{scenario}: 4K and THP");
            assert!(figs.iter().all(|f| f.median() > 0.0), "{scenario}");
        }
        let names: Vec<&str> = r.ratios.iter().map(|x| x.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "populate anonymous_thp / 4K",
                "aging cost per page, 4K / anonymous_thp"
            ]
        );
        assert!(
            r.ratios
                .iter()
                .all(|x| x.value.is_finite() && x.value > 0.0)
        );
    }
}
