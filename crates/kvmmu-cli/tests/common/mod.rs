//! Helpers shared by the integration tests: run the `kvmmu` binary and parse its JSON.

#![allow(dead_code)]

use std::process::{Command, Output};

/// Runs `kvmmu` with `args`, stderr captured (so progress bars stay hidden).
pub fn kvmmu(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kvmmu"))
        .args(args)
        .output()
        .expect("the kvmmu binary runs")
}

/// Runs `kvmmu` with `args` plus `--json`, asserts success, and parses stdout.
pub fn json(args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.push("--json");
    let out = kvmmu(&a);
    assert!(
        out.status.success(),
        "kvmmu {a:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is JSON")
}

/// The phase names of a report, in order.
pub fn phases(r: &serde_json::Value) -> Vec<String> {
    r["phases"]
        .as_array()
        .expect("phases is an array")
        .iter()
        .map(|p| {
            assert!(p["seconds"].as_f64().expect("seconds is a number") >= 0.0);
            p["name"].as_str().expect("name is a string").to_owned()
        })
        .collect()
}

/// Asserts every check of a report has status "pass" and the report passed.
pub fn assert_all_checks_pass(r: &serde_json::Value) {
    assert_eq!(r["schema"], "kvmmu-report/1");
    let checks = r["checks"].as_array().expect("checks is an array");
    assert!(!checks.is_empty());
    for c in checks {
        assert_eq!(c["status"], "pass", "check {c}");
    }
    assert_eq!(r["passed"], true);
}
