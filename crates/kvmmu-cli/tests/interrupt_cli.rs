//! Ctrl-C (SIGINT) ends a run with exit status 130 and says what it knows (torture: the seed to
//! replay), instead of losing everything.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};

#[test]
fn sigint_during_torture_exits_130_and_prints_the_seed() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvmmu"))
        .args(["torture", "--duration", "10m", "--seed", "0x5eed"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kvmmu starts");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
    // The banner is printed after the handler is installed: the signal cannot come too early.
    let mut banner = String::new();
    stderr.read_line(&mut banner).expect("banner");
    stderr.read_line(&mut banner).expect("seed line");
    assert!(banner.contains("seed 0x5eed"), "{banner}");
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let status = child.wait().expect("kvmmu exits");
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).expect("stderr");
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut stdout)
        .expect("stdout");
    assert_eq!(status.code(), Some(130), "stderr: {rest}");
    assert!(
        rest.starts_with("error: interrupted") && rest.contains("--seed 0x5eed"),
        "{rest}"
    );
    assert!(stdout.is_empty(), "{stdout}");
}
