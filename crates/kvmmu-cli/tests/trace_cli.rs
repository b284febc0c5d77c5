//! `--trace FILE`: the run as Chrome trace-event JSON, one track per thread, from every kind of
//! thread the library instruments; a path that cannot be written is refused before the run.

mod common;
use common::*;
use std::collections::{BTreeMap, BTreeSet};

fn temp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("kvmmu-trace-{}-{name}", std::process::id()))
}

/// The trace's events, each with its thread's name, after checking the trace-event shape.
fn load(path: &std::path::Path) -> Vec<(String, serde_json::Value)> {
    let text = std::fs::read_to_string(path).expect("the trace file was written");
    let v: serde_json::Value = serde_json::from_str(&text).expect("the trace is JSON");
    let events = v["traceEvents"]
        .as_array()
        .expect("traceEvents is an array");
    let mut names = BTreeMap::new();
    for e in events {
        for key in ["ph", "pid", "tid", "name"] {
            assert!(e.get(key).is_some(), "event without {key}: {e}");
        }
        if e["ph"] == "M" && e["name"] == "thread_name" {
            names.insert(
                e["tid"].as_u64().unwrap(),
                e["args"]["name"].as_str().unwrap().to_owned(),
            );
        } else if e["ph"] != "M" {
            assert!(e["ts"].as_f64().is_some_and(|t| t >= 0.0), "ts: {e}");
            if e["ph"] == "X" {
                assert!(e["dur"].as_f64().is_some_and(|d| d >= 0.0), "dur: {e}");
            }
        }
    }
    events
        .iter()
        .filter(|e| e["ph"] != "M")
        .map(|e| {
            let tid = e["tid"].as_u64().unwrap();
            (
                names.get(&tid).cloned().expect("every track is named"),
                e.clone(),
            )
        })
        .collect()
}

#[test]
fn torture_trace_is_chrome_trace_json_with_vcpu_aging_host_and_memslot_tracks() {
    let path = temp("torture.json");
    let p = path.to_str().unwrap();
    let out = kvmmu(&["torture", "--ops", "400", "--seed", "0x5", "--trace", p]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events = load(&path);
    let _ = std::fs::remove_file(&path);
    let kinds: BTreeSet<&str> = events
        .iter()
        .filter_map(|(thread, _)| {
            ["vcpu", "aging", "host", "memslot"]
                .into_iter()
                .find(|k| thread.contains(k))
        })
        .collect();
    assert_eq!(kinds.len(), 4, "thread kinds in the trace: {kinds:?}");
    let names: BTreeSet<&str> = events
        .iter()
        .map(|(_, e)| e["name"].as_str().unwrap())
        .collect();
    for want in [
        "vcpu_exit",
        "page_fault",
        "age_hva_range",
        "invalidate_range_start",
        "invalidate_range_end",
        "mmu_lock_read",
        "mmu_lock_write",
        "flush_remote_tlbs",
        "swap_memslots",
    ] {
        assert!(names.contains(want), "no {want} event in {names:?}");
    }
    // Each thread's events are its own: vCPU faults on vCPU tracks, invalidations on the host's.
    assert!(
        events
            .iter()
            .any(|(t, e)| t.contains("vcpu") && e["name"] == "page_fault")
    );
    assert!(
        events
            .iter()
            .any(|(t, e)| t.contains("host") && e["name"] == "invalidate_range_start")
    );
    assert!(
        events
            .iter()
            .any(|(t, e)| t.contains("memslot") && e["name"] == "swap_memslots")
    );
}

#[test]
fn default_workload_trace_has_a_track_per_vcpu_thread() {
    let path = temp("run.json");
    let p = path.to_str().unwrap();
    let out = kvmmu(&["-v", "2", "-b", "1M", "--passes", "1", "--trace", p]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events = load(&path);
    let _ = std::fs::remove_file(&path);
    for vcpu in ["vcpu-0", "vcpu-1"] {
        assert!(
            events
                .iter()
                .any(|(t, e)| t == vcpu && e["name"] == "page_fault"),
            "no fault on {vcpu}'s track"
        );
    }
}

#[test]
fn unwritable_or_misnamed_trace_paths_are_refused_before_the_run() {
    for (path, says) in [
        ("/no/such/dir/t.json", "does not exist"),
        ("trace.txt", ".json"),
    ] {
        let out = kvmmu(&["torture", "--ops", "100000000", "--trace", path]);
        assert_eq!(out.status.code(), Some(2), "{path}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.starts_with("error: --trace"), "{err}");
        assert!(err.contains(says), "{err}");
        assert!(!std::path::Path::new(path).exists());
    }
}

#[test]
fn a_refused_command_line_writes_no_trace() {
    let path = temp("refused.json");
    let out = kvmmu(&["torture", "--ops", "0", "--trace", path.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!path.exists());
}
