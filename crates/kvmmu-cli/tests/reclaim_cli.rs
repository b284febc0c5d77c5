//! `kvmmu reclaim`, `kvmmu compare ... reclaim` and `kvmmu wss` from the command line: JSON with
//! the documented fields, and bad input refused before any work.

mod common;
use common::*;

#[test]
fn reclaim_json_reports_latency_rates_and_passing_checks() {
    let r = json(&[
        "reclaim",
        "-v",
        "2",
        "-b",
        "4M",
        "--limit",
        "4M",
        "--duration",
        "300ms",
    ]);
    assert_all_checks_pass(&r);
    assert_eq!(r["command"], "reclaim");
    for m in [
        "invalidate_range_start p50",
        "invalidate_range_start p99",
        "invalidate_range_start max",
        "evictions/s",
        "refaults/s",
        "vcpu accesses/s",
        "evict mmu_lock wait",
    ] {
        assert!(
            r["metrics"][m].as_f64().is_some(),
            "metric {m} missing: {r}"
        );
    }
    assert!(r["counts"]["evicted"].as_u64().unwrap() > 0);
    assert_eq!(
        r["counts"]["evicted"], r["counts"]["latency_samples"],
        "one latency sample per eviction"
    );
}

#[test]
fn compare_runs_reclaim_per_configuration_with_rates_and_latencies() {
    let c = json(&[
        "compare",
        "--configs",
        "lockless,locked,no-aging",
        "--runs",
        "1",
        "reclaim",
        "-v",
        "2",
        "-b",
        "4M",
        "--limit",
        "1M",
        "--duration",
        "200ms",
    ]);
    assert_eq!(c["schema"], "kvmmu-compare/1");
    assert_eq!(c["workload"], "reclaim");
    assert_eq!(c["passed"], true);
    let rows = c["rows"].as_array().unwrap();
    for name in ["invalidate_range_start p99", "evictions/s", "refaults/s"] {
        let row = rows.iter().find(|r| r["name"] == name).expect(name);
        assert_eq!(row["medians"].as_array().unwrap().len(), 3);
    }
}

#[test]
fn reclaim_refuses_bad_limits_and_a_zero_duration() {
    for (args, mentions) in [
        (
            vec!["reclaim", "-b", "4M", "--limit", "16M"],
            "not below the guest",
        ),
        (vec!["reclaim", "-b", "4M", "--limit", "64K"], "per vCPU"),
        (
            vec!["reclaim", "-b", "4M", "--limit", "4M", "--duration", "0s"],
            "--duration",
        ),
        (
            vec![
                "compare",
                "reclaim",
                "-b",
                "4M",
                "--limit",
                "4M",
                "--no-aging",
            ],
            "--no-aging",
        ),
    ] {
        let out = kvmmu(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(mentions), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}

#[test]
fn wss_bins_add_up_to_guest_memory_and_find_the_hot_set() {
    let w = json(&[
        "wss",
        "-v",
        "2",
        "-b",
        "2M",
        "--hot-percent",
        "25",
        "--windows",
        "3",
        "--interval",
        "50ms",
    ]);
    assert_eq!(w["schema"], "kvmmu-wss/1");
    assert_eq!(w["totals_match"], true);
    for win in w["windows"].as_array().unwrap() {
        assert_eq!(win["total_bytes"], 4 << 20);
        assert_eq!(win["tlb_hidden_pages"], 0);
    }
    assert!(w["hot_error"].as_f64().unwrap() <= 0.10, "{w}");
}
