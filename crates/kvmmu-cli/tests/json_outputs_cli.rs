//! `--json` of the default workload, torture and compare parses and carries a versioned
//! `schema`; compare keeps repeated phase names apart.

mod common;
use common::*;

#[test]
fn default_workload_json_has_a_schema_and_phases_timed_per_vcpu() {
    let r = json(&[
        "-v",
        "2",
        "-b",
        "1M",
        "--passes",
        "2",
        "--tlb-entries",
        "16",
    ]);
    assert_all_checks_pass(&r);
    assert_eq!(r["command"], "run");
    assert_eq!(
        phases(&r),
        [
            "prefault RAM",
            "populate",
            "aging pass 1",
            "aging pass 2",
            "verify"
        ]
    );
    let populate = &r["phases"][1];
    assert_eq!(populate["thread_seconds"].as_array().map(Vec::len), Some(2));
    assert_eq!(r["counts"]["guest_pages"], 512);
}

#[test]
fn torture_json_has_a_schema_actors_counts_and_the_seed() {
    let r = json(&["torture", "--ops", "300", "--seed", "0x77"]);
    assert_eq!(r["schema"], "kvmmu-torture/1");
    assert_eq!(r["seed"], "0x77");
    assert_eq!(r["passed"], true);
    assert!(r["violations"].as_array().is_some_and(Vec::is_empty));
    assert!(r["actors"].as_array().is_some_and(|a| a.len() >= 2));
    assert!(r["counts"]["pf_taken"].as_u64().is_some());
}

#[test]
fn compare_keeps_the_two_mark_idle_phases_apart() {
    let r = json(&[
        "compare",
        "--runs",
        "1",
        "--configs",
        "lockless,locked",
        "access-tracking",
        "-v",
        "1",
        "-b",
        "1M",
        "--tlb-entries",
        "16",
    ]);
    assert_eq!(r["schema"], "kvmmu-compare/1");
    let names: Vec<&str> = r["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .filter_map(|row| row["name"].as_str())
        .collect();
    assert!(names.contains(&"Mark memory idle (lru_gen)"), "{names:?}");
    assert!(
        names.contains(&"Mark memory idle (lru_gen) #2"),
        "{names:?}"
    );
}

#[test]
fn default_workload_draws_its_plot() {
    let path = std::env::temp_dir().join(format!("kvmmu-default-{}.svg", std::process::id()));
    let p = path.to_str().expect("utf-8");
    let out = kvmmu(&["-v", "1", "-b", "1M", "--passes", "1", "--plot", p]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::fs::metadata(&path).is_ok_and(|m| m.len() > 0));
    let _ = std::fs::remove_file(&path);
}
