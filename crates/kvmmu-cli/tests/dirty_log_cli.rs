//! `kvmmu dirty-log-test` and `kvmmu dirty-log-perf` end to end: the selftest oracle passes in
//! every mode on both MMUs, and the perf run reports each phase with its fault and flush counts.

mod common;
use common::*;

#[test]
fn dirty_log_test_passes_every_mode_on_both_mmus() {
    for mmu in ["tdp", "shadow"] {
        for mode in ["dirty-log", "clear-log", "dirty-ring"] {
            let r = json(&[
                "dirty-log-test",
                "-M",
                mode,
                "-i",
                "16",
                "-I",
                "1",
                "-p",
                "2048",
                "--mmu",
                mmu,
                "--age",
            ]);
            assert_all_checks_pass(&r);
            assert_eq!(r["schema"], "kvmmu-report/1");
            assert!(
                r["counts"]["pages_reported_dirty"].as_u64().unwrap() > 0,
                "{mmu} {mode}"
            );
        }
    }
}

#[test]
fn dirty_log_perf_reports_phases_with_fault_and_flush_counts() {
    let r = json(&["dirty-log-perf", "-v", "2", "-b", "4M", "-i", "3"]);
    assert_all_checks_pass(&r);
    let ph = phases(&r);
    assert_eq!(ph.first().map(String::as_str), Some("populate memory"));
    assert_eq!(ph.last().map(String::as_str), Some("disable dirty logging"));
    assert_eq!(ph.len(), 2 + 3 * 3 + 1, "{ph:?}");
    let c = &r["counts"];
    for it in 1..=3 {
        for k in ["pf_fast", "pf_fixed", "remote_tlb_flush"] {
            assert!(
                c[format!("iter{it}.dirty.{k}")].is_u64(),
                "iter{it}.dirty.{k}"
            );
        }
        // 2 vCPUs x 1024 pages, each re-armed page written once: all fixed by the fast path.
        assert_eq!(c[format!("iter{it}.dirty.pf_fast")], 2048);
        assert_eq!(c[format!("iter{it}.clear.remote_tlb_flush")], 1);
    }
}

#[test]
fn dirty_log_test_in_d_bit_mode_and_with_a_tiny_ring_passes() {
    let r = json(&[
        "dirty-log-test",
        "-i",
        "8",
        "-I",
        "1",
        "-p",
        "1024",
        "--tracking",
        "d-bit",
    ]);
    assert_all_checks_pass(&r);
    let r = json(&[
        "dirty-log-test",
        "-M",
        "dirty-ring",
        "-c",
        "128",
        "-i",
        "8",
        "-I",
        "1",
        "-p",
        "1024",
    ]);
    assert_all_checks_pass(&r);
    assert!(r["counts"]["dirty_ring_full_exits"].as_u64().unwrap() > 0);
}

#[test]
fn a_bad_ring_size_is_a_usage_error() {
    let out = kvmmu(&["dirty-log-test", "-M", "dirty-ring", "-c", "100"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("power of two"));
}

#[test]
fn dirty_log_perf_with_a_dirty_ring_reports_the_same_fast_faults() {
    let r = json(&[
        "dirty-log-perf",
        "-v",
        "2",
        "-b",
        "4M",
        "-i",
        "2",
        "--dirty-ring",
        "2048",
    ]);
    assert_all_checks_pass(&r);
    assert_eq!(r["counts"]["iter2.dirty.pf_fast"], 2048);
    let out = kvmmu(&["dirty-log-perf", "-b", "4M", "--dirty-ring", "1024"]);
    assert!(
        !out.status.success(),
        "a ring smaller than one iteration is refused"
    );
}

#[test]
fn dirty_log_perf_over_several_memslots_logs_every_write() {
    for extra in [&[][..], &["-g"][..], &["--dirty-ring", "2048"][..]] {
        let mut args = vec![
            "dirty-log-perf",
            "-v",
            "2",
            "-b",
            "4M",
            "-i",
            "2",
            "-x",
            "4",
        ];
        args.extend_from_slice(extra);
        let r = json(&args);
        assert_all_checks_pass(&r);
        assert_eq!(r["config"]["slots"], 4);
        assert_eq!(r["counts"]["iter2.dirty.pf_fast"], 2048, "{extra:?}");
    }
    let out = kvmmu(&["dirty-log-perf", "-b", "4M", "-x", "3"]);
    assert!(!out.status.success(), "-x must divide the guest pages");
}

#[test]
fn dirty_log_perf_refuses_a_single_iteration() {
    let out = kvmmu(&["dirty-log-perf", "-i", "1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 2"));
}

#[test]
fn dirty_log_perf_on_thp_splits_while_enabling_unless_eager_splitting_is_off() {
    for mmu in ["tdp", "shadow"] {
        let eager = json(&[
            "dirty-log-perf",
            "-b",
            "4M",
            "-i",
            "2",
            "-s",
            "anonymous_thp",
            "--mmu",
            mmu,
        ]);
        assert_all_checks_pass(&eager);
        let c = &eager["counts"];
        assert_eq!(c["populate.pages_2m"], 2, "{mmu}: THP memory maps huge");
        assert_eq!(
            c["enable.pages_2m"], 0,
            "{mmu}: eager splitting while enabling"
        );
        assert_eq!(eager["config"]["eager_page_split"], true);
        let lazy = json(&[
            "dirty-log-perf",
            "-b",
            "4M",
            "-i",
            "2",
            "-s",
            "anonymous_thp",
            "--mmu",
            mmu,
            "--eager-split",
            "off",
        ]);
        assert_all_checks_pass(&lazy);
        assert_eq!(lazy["config"]["eager_page_split"], false);
        if mmu == "tdp" {
            // Left whole, write-protected: the first iteration's writes split them.
            assert_eq!(lazy["counts"]["enable.pages_2m"], 2);
            assert!(lazy["counts"]["iter1.dirty.pf_fixed"].as_u64().unwrap() > 0);
        }
        if mmu == "tdp" {
            assert_eq!(
                eager["counts"]["disable.pages_2m"], 2,
                "disabling logging recovers the huge leaves"
            );
        }
    }
}

#[test]
fn dirty_log_perf_e_runs_vcpus_while_disabling_and_every_write_they_make_lands() {
    for (mmu, extra) in [
        ("tdp", &["-s", "anonymous_thp"][..]),
        ("shadow", &["-s", "anonymous_thp"][..]),
        ("tdp", &["--dirty-ring", "2048", "-w", "50", "-a"][..]),
    ] {
        let mut args = vec![
            "dirty-log-perf",
            "-v",
            "2",
            "-b",
            "4M",
            "-i",
            "2",
            "--mmu",
            mmu,
            "-e",
        ];
        args.extend_from_slice(extra);
        let r = json(&args);
        assert_all_checks_pass(&r);
        assert_eq!(r["config"]["run_vcpus_while_disabling"], true, "{mmu}");
        assert_eq!(
            r["config"]["eager_page_split"], true,
            "-e is not eager splitting"
        );
        let c = &r["counts"];
        for k in [
            "disable.vcpu_accesses",
            "disable.vcpu_passes",
            "disable.ring_full_exits",
            "disable.vcpu_writes_checked",
        ] {
            assert!(c[k].is_u64(), "{mmu} {extra:?}: {k}");
        }
        assert_eq!(
            phases(&r).last().map(String::as_str),
            Some("disable dirty logging")
        );
    }
}

#[test]
fn dirty_log_perf_help_gives_e_the_selftests_meaning_and_eager_split_its_own_flag() {
    let out = kvmmu(&["dirty-log-perf", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("-e, --run-vcpus-while-disabling"), "{help}");
    assert!(help.contains("--eager-split <EAGER_SPLIT>"), "{help}");
    assert!(!help.contains("no-eager-split"), "{help}");
}

#[test]
fn dirty_log_test_help_lists_every_mode() {
    let out = kvmmu(&["dirty-log-test", "--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("dirty-log | clear-log | dirty-ring"),
        "{help}"
    );
}
