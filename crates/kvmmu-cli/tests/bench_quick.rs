//! `kvmmu bench --quick --json` on a tiny guest: the JSON parses and holds every scenario, every
//! figure as a finite median, and every ratio the issue asks for (no timing assertions).

use std::process::Command;

fn run_bench(extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kvmmu"))
        .args(["bench", "--quick", "--json", "--bytes", "1M", "--reps", "1"])
        .args(extra)
        .output()
        .expect("the kvmmu binary runs")
}

#[test]
fn quick_json_has_every_scenario_and_ratio() {
    let out = run_bench(&[]);
    assert!(
        out.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");

    let figures = v["figures"].as_array().expect("figures array");
    for scenario in ["aging", "slowdown", "fault", "translation", "peers"] {
        assert!(
            figures.iter().any(|f| f["scenario"] == scenario),
            "no figure for scenario {scenario}"
        );
    }
    for f in figures {
        let m = f["median"].as_f64();
        assert!(
            m.is_some_and(|m| m.is_finite() && m >= 0.0),
            "figure {} has no finite median",
            f["name"]
        );
        assert_eq!(
            f["samples"].as_array().map(Vec::len),
            Some(1),
            "{}",
            f["name"]
        );
    }
    // The aged-SPTE share reports the young pattern that was set up (re-touches that hit a TLB entry
    // kept across aging set no Accessed bit, so 100% may come out slightly lower).
    let aged = |name: &str| {
        figures
            .iter()
            .find(|f| f["name"] == name)
            .and_then(|f| f["median"].as_f64())
            .unwrap_or_else(|| panic!("missing figure {name}"))
    };
    assert_eq!(aged("kvmmu lockless pass, 0% young: SPTEs aged"), 0.0);
    let full = aged("kvmmu lockless pass, 100% young: SPTEs aged");
    assert!((90.0..=100.0).contains(&full), "100% young aged {full}%");

    let ratios = v["ratios"].as_array().expect("ratios array");
    let names: Vec<&str> = ratios.iter().filter_map(|r| r["name"].as_str()).collect();
    let mut expected = Vec::new();
    for pct in [0, 10, 100] {
        expected.push(format!("aging lockless / limit, {pct}% young"));
        expected.push(format!("aging locked / limit, {pct}% young"));
        expected.push(format!("aging lockless / locked, {pct}% young"));
    }
    for e in [
        "vCPU slowdown, lockless aging",
        "vCPU slowdown, locked aging",
        "populate faults/s per vCPU (M)",
        "populate / CAS-install limit",
        "warm-TLB accesses/s per vCPU (M)",
        "TLB-miss accesses/s per vCPU (M)",
        "warm TLB / raw load",
        "TLB miss / raw load",
        "TLB miss / raw 4-level walk",
        "warm TLB / raw load, page stride",
        "TLB miss / raw load, page stride",
        "TLB miss / raw 4-level walk, page stride",
        "zero-cost translation / raw load (ceiling)",
        "zero-cost translation / raw 4-level walk (ceiling)",
    ] {
        expected.push(e.to_string());
    }
    for peer in ["dashmap", "papaya", "rwlock-hashmap"] {
        for op in [
            "fault",
            "age (100% young)",
            "age (0% young)",
            "translate+read",
        ] {
            expected.push(format!("kvmmu / {peer}, {op}"));
        }
    }
    for e in &expected {
        assert!(names.contains(&e.as_str()), "missing ratio {e}");
    }
    for r in ratios {
        assert!(
            r["value"].as_f64().is_some_and(f64::is_finite),
            "ratio {} is not a finite number",
            r["name"]
        );
        if !r["target"].is_null() {
            assert!(r["meets"].is_boolean(), "ratio {} lacks meets", r["name"]);
        }
    }
    assert_eq!(v["schema"], "kvmmu-bench/2");
    assert_eq!(v["config"]["reps"], 1, "config numbers are JSON numbers");
    let mut ids: Vec<&str> = figures
        .iter()
        .chain(ratios)
        .map(|x| x["id"].as_str().expect("every figure and ratio has an id"))
        .collect();
    let n = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), n, "ids are unique");
    assert_eq!(v["config"]["mode"], "quick");
    assert_eq!(v["config"]["mmu"], "tdp");
}

#[test]
fn shadow_mmu_bench_runs_and_reports_its_configuration() {
    let out = run_bench(&["--mmu", "shadow"]);
    assert!(
        out.status.success(),
        "bench --mmu shadow failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
    assert_eq!(v["config"]["mmu"], "shadow");
}

#[test]
fn bad_sizes_are_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_kvmmu"))
        .args(["bench", "--quick", "--bytes", "1000"])
        .output()
        .expect("the kvmmu binary runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--bytes"));
}

#[test]
fn bars_draws_aging_and_slowdown_text_charts() {
    let out = Command::new(env!("CARGO_BIN_EXE_kvmmu"))
        .args([
            "bench",
            "--quick",
            "--bars",
            "--bytes",
            "1M",
            "--reps",
            "1",
            "--only",
            "aging,slowdown",
        ])
        .output()
        .expect("the kvmmu binary runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("[aging plot, M SPTE/s]"), "{text}");
    assert!(text.contains("[slowdown plot, ms]"), "{text}");
    // Each chart has a full-width bar (its largest median; ties may add more).
    let full = "#".repeat(20);
    assert!(text.matches(full.as_str()).count() >= 2, "{text}");
}

#[test]
fn plot_file_draws_the_aging_chart_like_every_other_plot() {
    let path = std::env::temp_dir().join(format!("kvmmu-bench-{}.svg", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_kvmmu"))
        .args([
            "bench", "--quick", "--bytes", "1M", "--reps", "1", "--only", "aging",
        ])
        .arg("--plot")
        .arg(&path)
        .output()
        .expect("the kvmmu binary runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let svg = std::fs::read_to_string(&path).expect("the plot was written");
    assert!(svg.contains("<svg") && svg.contains("M SPTE/s"));
    let _ = std::fs::remove_file(&path);
}
