//! Every refused command line fails fast and plainly: exit status 2, one `error:` line on stderr
//! (plus at most one `hint:` line), nothing on stdout, no output file, no backtrace even with
//! `RUST_BACKTRACE=1`, and no progress or phase output (the refusal comes before any work).

use std::path::PathBuf;
use std::process::{Command, Output};

fn kvmmu(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kvmmu"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("the kvmmu binary runs")
}

/// A path in a fresh directory of the test's own, and that directory.
fn scratch(name: &str) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("kvmmu-bad-input-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch directory");
    (dir.join("out.svg"), dir)
}

/// Runs `args` and asserts the refusal contract; `mentions` must appear in the error line.
fn assert_refused(args: &[&str], mentions: &str) {
    let out = kvmmu(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "kvmmu {args:?} should exit 2; stderr:\n{stderr}"
    );
    assert!(
        out.stdout.is_empty(),
        "kvmmu {args:?} printed on stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(
        (1..=2).contains(&lines.len()),
        "kvmmu {args:?}: expected one error line and at most one hint, got:\n{stderr}"
    );
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(
        lines[0].contains(mentions),
        "kvmmu {args:?}: the error should mention {mentions:?}: {}",
        lines[0]
    );
    if let Some(h) = lines.get(1) {
        assert!(h.starts_with("hint: "), "{stderr}");
    }
}

/// [`assert_refused`] with `--plot FILE` added where `plot_at` says, then checks no file appeared.
fn assert_refused_without_output(args: &[&str], plot_at: usize, mentions: &str, name: &str) {
    let (file, dir) = scratch(name);
    let f = file.to_str().expect("utf-8 temp path");
    let mut a: Vec<&str> = args.to_vec();
    a.splice(plot_at..plot_at, ["--plot", f]);
    assert_refused(&a, mentions);
    let left: Vec<_> = std::fs::read_dir(&dir)
        .expect("scratch directory")
        .collect();
    assert!(left.is_empty(), "kvmmu {a:?} wrote {left:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn torture_zero_duration_is_refused() {
    assert_refused(&["torture", "--duration", "0s"], "--duration");
}

#[test]
fn torture_zero_stall_timeout_is_refused() {
    assert_refused(&["torture", "--stall-timeout", "0s"], "--stall-timeout");
}

#[test]
fn torture_errors_name_the_flags_not_internal_fields() {
    assert_refused(&["torture", "--dyn-pages", "0"], "--dyn-pages");
    assert_refused(&["torture", "--pages", "3"], "--pages");
    assert_refused(&["torture", "--vcpus", "65"], "--vcpus");
}

#[test]
fn compare_duplicate_configs_are_refused() {
    assert_refused_without_output(
        &["compare", "--configs", "locked,locked", "access-tracking"],
        1,
        "locked twice",
        "dup",
    );
}

#[test]
fn compare_config_overriding_a_workload_flag_is_refused() {
    // --plot after the workload name is accepted and checked like any other.
    assert_refused_without_output(
        &[
            "compare",
            "--configs",
            "locked",
            "access-tracking",
            "--aging",
            "lockless",
        ],
        6,
        "--aging",
        "override",
    );
    assert_refused(
        &[
            "compare",
            "--configs",
            "lockless,shadow",
            "access-tracking",
            "--mmu",
            "tdp",
        ],
        "--mmu",
    );
}

#[test]
fn compare_no_aging_without_p_is_refused() {
    assert_refused(
        &[
            "compare",
            "--configs",
            "lockless,no-aging",
            "access-tracking",
        ],
        "-p",
    );
}

#[test]
fn compare_aging_configs_on_mmu_stress_without_age_are_refused() {
    assert_refused(
        &["compare", "--configs", "lockless,locked", "mmu-stress"],
        "--age",
    );
}

#[test]
fn mmu_stress_locked_aging_without_age_is_refused() {
    assert_refused_without_output(&["mmu-stress", "--aging", "locked"], 1, "--age", "stress");
}

#[test]
fn bench_quick_only_scaling_is_refused() {
    assert_refused(&["bench", "--quick", "--only", "scaling"], "--only scaling");
}

#[test]
fn absurd_pass_count_is_refused() {
    assert_refused(&["--passes", "100000000"], "--passes");
}

#[test]
fn plot_to_a_missing_directory_or_unknown_extension_is_refused_before_the_run() {
    assert_refused(
        &["access-tracking", "--plot", "/nonexistent-kvmmu-dir/x.svg"],
        "does not exist",
    );
    let (file, dir) = scratch("ext");
    let jpg = file.with_extension("jpg");
    assert_refused(
        &["access-tracking", "--plot", jpg.to_str().expect("utf-8")],
        ".svg or .png",
    );
    assert!(!jpg.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_workload_flags_are_refused() {
    assert_refused_without_output(&["access-tracking", "-v", "0"], 1, "--vcpus", "vcpus");
    assert_refused(&["access-tracking", "--tlb-entries", "0"], "--tlb-entries");
    assert_refused(&["--mmu", "bogus"], "bogus");
}

#[test]
fn failed_compare_run_names_its_configuration_and_check_and_exits_1() {
    // A 1 MiB guest fits in the vCPU TLB: re-touches set no Accessed bit, and -w 0 makes that
    // fatal, so every run fails its generation check.
    let out = kvmmu(&[
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
        "-w",
        "0",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for config in ["lockless", "locked"] {
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with("error: configuration ")
                    && l.contains(&format!("configuration {config},"))
                    && l.contains("check failed: mark idle")),
            "{stderr}"
        );
    }
    assert!(!stderr.contains("stack backtrace"), "{stderr}");
}
