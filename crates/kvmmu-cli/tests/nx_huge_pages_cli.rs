//! `kvmmu nx-huge-pages` end to end: the counts of the kernel's `x86/nx_huge_pages_test` on both
//! MMUs, its failure without recovery, and its JSON and plot outputs.

mod common;
use common::*;

/// `(pages_2m, nx_lpage_splits)` after each step, after recovery and after the final read.
fn sequence(r: &serde_json::Value) -> Vec<(u64, u64)> {
    [
        "step1", "step2", "step3", "step4", "step5", "recovery", "step6",
    ]
    .iter()
    .map(|k| {
        let c = &r["counts"];
        (
            c[format!("{k}_pages_2m")].as_u64().expect(k),
            c[format!("{k}_nx_lpage_splits")].as_u64().expect(k),
        )
    })
    .collect()
}

const KERNEL_COUNTS: [(u64, u64); 7] = [(1, 0), (2, 0), (1, 1), (1, 2), (1, 2), (1, 0), (2, 0)];

#[test]
fn the_selftest_counts_hold_on_tdp_and_shadow() {
    for mmu in ["tdp", "shadow"] {
        let r = json(&["nx-huge-pages", "--mmu", mmu]);
        assert_eq!(r["passed"], true, "{mmu}: {}", r["checks"]);
        assert_eq!(sequence(&r), KERNEL_COUNTS, "{mmu}");
        assert_eq!(r["counts"]["recovered_tables"], 2, "{mmu}");
        assert_eq!(r["counts"]["nx_lpage_splits"], 0, "{mmu}");
        assert_eq!(r["config"]["mmu"], mmu);
    }
}

#[test]
fn the_background_worker_gives_the_same_counts() {
    let r = json(&["nx-huge-pages", "--worker", "-p", "5"]);
    assert_eq!(sequence(&r), KERNEL_COUNTS);
    assert_eq!(r["config"]["recovery"], "worker");
}

#[test]
fn with_the_mitigation_disabled_executed_huge_pages_stay_huge() {
    let r = json(&["nx-huge-pages", "-x", "--mmu", "shadow"]);
    assert_eq!(
        sequence(&r),
        [(1, 0), (2, 0), (2, 0), (3, 0), (3, 0), (3, 0), (3, 0)]
    );
}

#[test]
fn without_recovery_the_run_fails_with_one_error_line() {
    for mmu in ["tdp", "shadow"] {
        let out = kvmmu(&["nx-huge-pages", "--mmu", mmu, "--no-recovery"]);
        assert_eq!(out.status.code(), Some(1), "{mmu}");
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{mmu}: {err}");
        assert!(
            lines[0].starts_with("error: ")
                && lines[0].contains("recovery")
                && lines[0].contains("(1, 2), expected (1, 0)"),
            "{mmu}: {err}"
        );
    }
}

#[test]
fn plot_writes_an_svg_of_the_step_times() {
    let dir = std::env::temp_dir().join(format!("kvmmu-nx-plot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let svg = dir.join("nx.svg");
    let out = kvmmu(&["nx-huge-pages", "--plot", svg.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg") || text.contains("<svg"), "an SVG");
    assert!(text.contains("recovery"), "the recovery phase is drawn");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_zero_period_is_refused_as_usage() {
    let out = kvmmu(&["nx-huge-pages", "--worker", "-p", "0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--reclaim-period-ms"));
}
