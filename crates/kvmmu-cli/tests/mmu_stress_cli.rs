//! `kvmmu mmu-stress` end to end: the stages of spec §5.3 and its checks.

mod common;
use common::*;

#[test]
fn stress_run_times_every_stage_and_passes_every_check() {
    let r = json(&[
        "mmu-stress",
        "-c",
        "2",
        "-m",
        "4M",
        "-s",
        "1M",
        "--age",
        "--tlb-entries",
        "32",
    ]);
    assert_all_checks_pass(&r);
    let ph = phases(&r);
    for p in ["run 1", "reset", "run 2", "ro", "rw", "exit (release)"] {
        assert!(ph.iter().any(|x| x == p), "{p} missing from {ph:?}");
    }
    assert_eq!(r["counts"]["slots"], 4);
    assert_eq!(r["counts"]["guest_pages"], 4 * 256);
    assert_eq!(r["counts"]["buffer_pages"], 256);
    // Every page of every alias faulted in at least once.
    assert!(r["counts"]["faults"].as_u64().unwrap() >= 1024);
    assert_eq!(r["config"]["age"], true);
}

#[test]
fn stress_under_locked_aging_passes() {
    let r = json(&[
        "mmu-stress",
        "-c",
        "3",
        "-m",
        "3M",
        "-s",
        "1M",
        "--age",
        "--aging",
        "locked",
    ]);
    assert_all_checks_pass(&r);
    assert_eq!(r["counts"]["slots"], 3);
}

#[test]
fn bad_flags_fail_before_running() {
    for (args, msg) in [
        (&["mmu-stress", "-c", "0"][..], "--vcpus"),
        (
            &["mmu-stress", "-m", "1M", "-s", "2M"][..],
            "at least one slot",
        ),
        (&["mmu-stress", "-s", "4T", "-m", "8T"][..], "frame arena"),
        (&["mmu-stress", "--mmu", "nested"][..], "invalid value"),
    ] {
        let out = kvmmu(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(msg), "{args:?}: {err}");
    }
}
