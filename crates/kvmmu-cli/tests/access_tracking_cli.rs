//! `kvmmu access-tracking` end to end: the phases of spec §5.2, its checks, and page counts.

mod common;
use common::*;

const SELFTEST_TAIL: [&str; 5] = [
    "Writing to populated memory",
    "Reading from populated memory",
    "Writing to idle memory",
    "Reading from idle memory",
    "Populating memory",
];

#[test]
fn page_idle_run_has_every_phase_and_passes_its_checks() {
    let r = json(&[
        "access-tracking",
        "-v",
        "2",
        "-b",
        "2M",
        "--idle",
        "page-idle",
        "--tlb-entries",
        "16",
    ]);
    assert_all_checks_pass(&r);
    let ph = phases(&r);
    assert_eq!(
        ph,
        [
            "Populating memory",
            "Writing to populated memory",
            "Reading from populated memory",
            "Mark memory idle (page_idle)",
            "Writing to idle memory",
            "Mark memory idle (page_idle)",
            "Reading from idle memory",
        ]
    );
    assert_eq!(r["counts"]["test_pages"], 2 * 512);
    assert!(r["counts"]["faults"].as_u64().unwrap() >= 1024);
    assert_eq!(r["counts"]["mark_idle_1_no_pfn"], 0);
    assert_eq!(r["counts"]["mark_idle_2_still_idle"], 0);
    assert_eq!(r["config"]["idle"], "page-idle");
    assert_eq!(r["config"]["idle_policy"], "fail");
}

#[test]
fn lru_gen_run_has_every_phase_and_moves_pages_to_newer_generations() {
    let r = json(&[
        "access-tracking",
        "-v",
        "2",
        "-b",
        "2M",
        "--tlb-entries",
        "16",
        "-o",
    ]);
    assert_all_checks_pass(&r);
    let ph = phases(&r);
    for p in SELFTEST_TAIL {
        assert!(ph.iter().any(|x| x == p), "{p} missing from {ph:?}");
    }
    assert_eq!(ph[1], "Initial aging pass (lru_gen)");
    assert_eq!(ph[2], "Re-populating memory");
    assert_eq!(
        ph.iter()
            .filter(|p| *p == "Mark memory idle (lru_gen)")
            .count(),
        2
    );
    assert_eq!(r["counts"]["test_pages"], 1024);
    assert_eq!(r["counts"]["mark_idle_1_young"], 1024);
    // Initial pass to generation 1, then one generation per mark.
    assert_eq!(r["counts"]["lru_gen_last_generation"], 3);
}

#[test]
fn tlb_hits_make_pages_look_idle_and_auto_policy_only_warns() {
    // 256 pages per vCPU fit in a 2048-entry TLB: re-touches hit cached translations, set no
    // Accessed bit, and the pages look idle. The automatic policy warns, as on nested x86.
    let r = json(&[
        "access-tracking",
        "-v",
        "1",
        "-b",
        "1M",
        "--idle",
        "page-idle",
    ]);
    assert_eq!(r["config"]["idle_policy"], "warn");
    assert_eq!(r["passed"], true);
    let warned = r["checks"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["status"] == "warn");
    assert!(warned, "expected an idle-page warning: {r}");
    // With -w 0 the same run fails, naming the check.
    let out = kvmmu(&[
        "access-tracking",
        "-v",
        "1",
        "-b",
        "1M",
        "--idle",
        "page-idle",
        "-w",
        "0",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("still idle"));
}

#[test]
fn age_while_populating_reports_wall_time_and_passes() {
    let r = json(&[
        "access-tracking",
        "-v",
        "2",
        "-b",
        "4M",
        "-p",
        "--aging",
        "locked",
    ]);
    assert_all_checks_pass(&r);
    assert_eq!(phases(&r), ["Populating memory (async)"]);
    assert!(r["metrics"]["vcpu_wall_time_s"].as_f64().unwrap() > 0.0);
    let passes = r["counts"]["aging_passes"].as_u64().unwrap();
    assert!(passes >= 1);
    let avg = r["metrics"]["aging_avg_pass_s"].as_f64().unwrap();
    let total = r["metrics"]["aging_total_s"].as_f64().unwrap();
    assert!((avg * passes as f64 - total).abs() < 1e-9);
    assert!(r["counts"]["faults"].as_u64().unwrap() >= 2048);
}

#[test]
fn bad_flags_fail_before_running_with_a_clear_message() {
    for (args, msg) in [
        (&["access-tracking", "-v", "0"][..], "--vcpus"),
        (&["access-tracking", "-b", "12345"][..], "multiple of 4K"),
        (
            &["access-tracking", "-b", "1T", "-v", "8"][..],
            "frame arena",
        ),
        (
            &["access-tracking", "--idle", "sometimes"][..],
            "invalid value",
        ),
        (
            &["access-tracking", "-b", "99999999999T"][..],
            "does not fit",
        ),
    ] {
        let out = kvmmu(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(msg), "{args:?}: {err}");
    }
}

#[test]
fn ad_disabled_runs_pass_their_idle_checks_on_both_mmus() {
    for mmu in ["tdp", "shadow"] {
        for idle in ["lru-gen", "page-idle"] {
            let r = json(&[
                "access-tracking",
                "-v",
                "2",
                "-b",
                "2M",
                "--tlb-entries",
                "16",
                "--idle",
                idle,
                "--mmu",
                mmu,
                "--ad-disabled",
            ]);
            assert_all_checks_pass(&r);
            assert_eq!(r["config"]["ad_disabled"], true);
        }
    }
}
