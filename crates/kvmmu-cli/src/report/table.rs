//! The human-readable rendering of a [`Report`].

use super::{Report, Status};
use std::fmt::Write;

/// Renders `r` as aligned text: configuration, phases with times, counts, metrics, checks, notes.
pub fn render(r: &Report) -> String {
    let mut s = String::new();
    let cfg: Vec<String> = r
        .config
        .iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(x) => format!("{k}={x}"),
            other => format!("{k}={other}"),
        })
        .collect();
    let _ = writeln!(s, "kvmmu {}: {}", r.command, cfg.join(" "));
    let w = r
        .phases
        .iter()
        .map(|p| p.name.len())
        .chain(r.metrics.keys().map(String::len))
        .chain(r.counts.keys().map(String::len))
        .max()
        .unwrap_or(0)
        .max(8);
    if !r.phases.is_empty() {
        let _ = writeln!(s, "\n  {:<w$}  {:>12}", "phase", "time");
        for p in &r.phases {
            let _ = writeln!(s, "  {:<w$}  {:>12}", p.name, seconds(p.seconds));
        }
    }
    if !r.metrics.is_empty() {
        let _ = writeln!(s);
        for (k, v) in &r.metrics {
            let _ = writeln!(s, "  {k:<w$}  {:>12}", seconds(*v));
        }
    }
    if !r.counts.is_empty() {
        let _ = writeln!(s);
        for (k, v) in &r.counts {
            let _ = writeln!(s, "  {k:<w$}  {v:>12}");
        }
    }
    let _ = writeln!(s, "\n  checks");
    for c in &r.checks {
        let tag = match c.status {
            Status::Pass => "ok  ",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        };
        let _ = writeln!(s, "  [{tag}] {}: {}", c.name, c.detail);
    }
    for n in &r.notes {
        let _ = writeln!(s, "  note: {n}");
    }
    let _ = writeln!(s, "\n  result: {}", if r.passed { "PASS" } else { "FAIL" });
    s
}

/// `0.123456` → `"123.456 ms"`, `2.5` → `"2.500 s"`.
pub fn seconds(v: f64) -> String {
    if v < 1.0 {
        format!("{:.3} ms", v * 1e3)
    } else {
        format!("{v:.3} s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn table_lists_every_phase_and_check_and_the_verdict() {
        let mut r = Report::new("demo");
        r.config("vcpus", 2);
        r.phase("Populating memory", Duration::from_millis(12));
        r.require("no stale translation", true, "0 stale accesses");
        r.check("idle pages", Status::Warn, "40% still idle");
        let t = render(&r);
        assert!(t.contains("vcpus=2"));
        assert!(t.contains("Populating memory") && t.contains("12.000 ms"));
        assert!(t.contains("[ok  ] no stale translation"));
        assert!(t.contains("[WARN] idle pages"));
        assert!(t.contains("result: PASS"));
        r.require("balanced", false, "1 in progress");
        assert!(render(&r).contains("result: FAIL"));
        assert_eq!(r.failures(), "check failed: balanced: 1 in progress");
    }
}
