//! The human-readable rendering of a [`Report`].

use super::{Report, Status};
use std::fmt::Write;

/// Columns the table keeps within (a terminal's default width).
pub const WIDTH: usize = 80;

/// `text` broken at spaces into lines of at most `width` columns (a word longer than a line
/// stands alone), the first indented by `first`, the rest by `rest`; every line ends in `\n`.
pub fn wrap(text: &str, first: &str, rest: &str, width: usize) -> String {
    let mut out = String::new();
    let mut line = first.to_owned();
    let mut fresh = true;
    for word in text.split_whitespace() {
        if !fresh && line.chars().count() + 1 + word.chars().count() > width {
            out.push_str(&line);
            out.push('\n');
            line = rest.to_owned();
            fresh = true;
        }
        if !fresh && !line.ends_with(' ') {
            line.push(' ');
        }
        line.push_str(word);
        fresh = false;
    }
    out.push_str(&line);
    out.push('\n');
    out
}

/// Every line of `text` longer than `width` columns folded at its last fitting space (spacing
/// before the fold kept as it is, so aligned columns stay aligned), continued after `indent`.
pub fn fold(text: &str, width: usize, indent: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let mut rest = line.to_owned();
        while rest.chars().count() > width {
            let cut = rest
                .char_indices()
                .take_while(|(i, _)| *i <= width)
                .filter(|(i, c)| *c == ' ' && *i > indent.len() && !rest[..*i].trim().is_empty())
                .map(|(i, _)| i)
                .last();
            let Some(cut) = cut else { break };
            out.push_str(rest[..cut].trim_end());
            out.push('\n');
            rest = format!("{indent}{}", rest[cut..].trim_start());
        }
        out.push_str(&rest);
        out.push('\n');
    }
    out
}

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
    let _ = writeln!(s, "kvmmu {}", r.command);
    s.push_str(&wrap(&cfg.join(" "), "  ", "  ", WIDTH));
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
            let _ = writeln!(s, "  {k:<w$}  {:>12}", value(k, *v));
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
        s.push_str(&wrap(
            &format!("{}: {}", c.name, c.detail),
            &format!("  [{tag}] "),
            "         ",
            WIDTH,
        ));
    }
    for n in &r.notes {
        s.push_str(&wrap(&format!("note: {n}"), "  ", "        ", WIDTH));
    }
    let _ = writeln!(s, "\n  result: {}", if r.passed { "PASS" } else { "FAIL" });
    s
}

/// A metric's value in its unit: a rate for names ending in `/s`, else seconds.
pub fn value(name: &str, v: f64) -> String {
    if name.ends_with("/s") {
        format!("{v:.0}/s")
    } else if v > 0.0 && v < 1e-3 {
        // Latencies of a few microseconds would all print as 0.000 ms.
        format!("{:.3} us", v * 1e6)
    } else {
        seconds(v)
    }
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
    fn long_configuration_checks_and_notes_wrap_within_80_columns() {
        let mut r = Report::new("demo");
        for k in [
            "alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta",
        ] {
            r.config(&format!("{k}_setting"), "some-long-value");
        }
        r.require("a check", true, "x ".repeat(100));
        r.notes.push("y ".repeat(100));
        let t = render(&r);
        for l in t.lines() {
            assert!(
                l.chars().count() <= WIDTH,
                "{} columns: {l}",
                l.chars().count()
            );
        }
        assert!(t.contains("theta_setting=some-long-value"));
        assert_eq!(wrap("a b", "  ", "    ", 3), "  a\n    b\n");
        assert_eq!(
            fold("  x   1 ms  long tail", 13, "    "),
            "  x   1 ms\n    long tail\n"
        );
    }

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
