//! Figures (medians of repeated samples) and ratios, printed as a table or as JSON.

use std::fmt::Write as _;

/// One measured quantity: the median of its samples.
pub struct Figure {
    /// Scenario it belongs to (`aging`, `slowdown`, ...).
    pub scenario: &'static str,
    /// Name within the scenario.
    pub name: String,
    /// Unit of the samples.
    pub unit: &'static str,
    /// The samples, in run order.
    pub samples: Vec<f64>,
}

impl Figure {
    /// The median sample (mean of the middle two for an even count; 0 with no samples).
    pub fn median(&self) -> f64 {
        median(&self.samples)
    }
}

/// The median of `v` (0 when empty).
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// A ratio between two medians, with the target when it has one.
pub struct Ratio {
    /// Name of the ratio.
    pub name: String,
    /// Its value.
    pub value: f64,
    /// What it means, in words.
    pub meaning: &'static str,
    /// The target and whether higher (true) or lower (false) is better.
    pub target: Option<(f64, bool)>,
}

impl Ratio {
    /// Whether the target is met (None without a target).
    pub fn meets(&self) -> Option<bool> {
        self.target.map(|(t, higher)| {
            if higher {
                self.value >= t
            } else {
                self.value <= t
            }
        })
    }
}

/// Everything one `kvmmu bench` run measured.
#[derive(Default)]
pub struct Report {
    /// Configuration lines (key, value) for the header.
    pub config: Vec<(&'static str, String)>,
    /// The figures.
    pub figures: Vec<Figure>,
    /// The ratios.
    pub ratios: Vec<Ratio>,
}

impl Report {
    /// Adds a figure and returns its median.
    pub fn figure(
        &mut self,
        scenario: &'static str,
        name: impl Into<String>,
        unit: &'static str,
        samples: Vec<f64>,
    ) -> f64 {
        let f = Figure {
            scenario,
            name: name.into(),
            unit,
            samples,
        };
        let m = f.median();
        self.figures.push(f);
        m
    }

    /// Adds a ratio.
    pub fn ratio(
        &mut self,
        name: impl Into<String>,
        value: f64,
        meaning: &'static str,
        target: Option<(f64, bool)>,
    ) {
        self.ratios.push(Ratio {
            name: name.into(),
            value,
            meaning,
            target,
        });
    }

    /// The human-readable table.
    pub fn to_text(&self) -> String {
        let mut s = String::from("kvmmu bench\n");
        for (k, v) in &self.config {
            let _ = writeln!(s, "  {k}: {v}");
        }
        // Sample counts are shown only where they differ from --reps.
        let reps = self
            .config
            .iter()
            .find(|(k, _)| *k == "reps")
            .and_then(|(_, v)| v.parse::<usize>().ok());
        let w = self.figures.iter().map(|f| f.name.len()).max().unwrap_or(0);
        let mut last = "";
        for f in &self.figures {
            if f.scenario != last {
                let _ = writeln!(s, "\n[{}]", f.scenario);
                last = f.scenario;
            }
            let n = if Some(f.samples.len()) == reps {
                String::new()
            } else {
                format!(" (n={})", f.samples.len())
            };
            let line = format!("  {:<w$} {:>10.3} {}{n}", f.name, f.median(), f.unit);
            s.push_str(&super::kvmmu_cli_fold(&line, "    "));
        }
        let _ = writeln!(s, "\n[ratios]");
        let w = self.ratios.iter().map(|r| r.name.len()).max().unwrap_or(0);
        for r in &self.ratios {
            let t = match (r.target, r.meets()) {
                (Some((t, higher)), Some(ok)) => format!(
                    "  {} (target {} {t})",
                    if ok { "MET" } else { "missed" },
                    if higher { ">=" } else { "<=" },
                ),
                _ => String::new(),
            };
            let line = format!("  {:<w$} {:>8.3}{t}", r.name, r.value);
            s.push_str(&super::kvmmu_cli_fold(&line, "    "));
            s.push_str(&super::kvmmu_cli_fold(
                &format!("      {}", r.meaning),
                "      ",
            ));
        }
        s
    }

    /// Horizontal bar charts of the figures of `scenario` that share `unit`, scaled to the largest.
    pub fn to_plot(&self, scenario: &str, unit: &str) -> String {
        const WIDTH: f64 = 20.0;
        let figs: Vec<&Figure> = self
            .figures
            .iter()
            .filter(|f| f.scenario == scenario && f.unit == unit)
            .collect();
        let max = figs.iter().map(|f| f.median()).fold(0.0, f64::max);
        let w = figs.iter().map(|f| f.name.len()).max().unwrap_or(0);
        let mut s = format!("\n[{scenario} plot, {unit}]\n");
        for f in figs {
            let n = if max > 0.0 {
                (f.median() / max * WIDTH).round() as usize
            } else {
                0
            };
            let _ = writeln!(
                s,
                "  {:<w$} |{:<20}| {:.1}",
                f.name,
                "#".repeat(n),
                f.median()
            );
        }
        s
    }

    /// JSON, schema [`BENCH_SCHEMA`]: `{"schema", "config":{..}, "figures":[..], "ratios":[..]}`.
    /// Numbers are JSON numbers (config values too, where they are numbers; a non-finite value
    /// is `null`), and every figure and ratio has a stable `id` (its scenario and name, reduced
    /// to `[a-z0-9_.]`) for scripts that compare runs.
    pub fn to_json(&self) -> String {
        use serde_json::{Value, json};
        let config: serde_json::Map<String, Value> = self
            .config
            .iter()
            .map(|(k, v)| {
                let value = if let Ok(n) = v.parse::<u64>() {
                    json!(n)
                } else if let Ok(x) = v.parse::<f64>() {
                    json!(x)
                } else if let Ok(b) = v.parse::<bool>() {
                    json!(b)
                } else {
                    json!(v)
                };
                ((*k).to_owned(), value)
            })
            .collect();
        let figures: Vec<Value> = self
            .figures
            .iter()
            .map(|f| {
                json!({
                    "id": format!("{}.{}", f.scenario, slug(&f.name)),
                    "scenario": f.scenario,
                    "name": f.name,
                    "unit": f.unit,
                    "median": f.median(),
                    "samples": f.samples,
                })
            })
            .collect();
        let ratios: Vec<Value> = self
            .ratios
            .iter()
            .map(|r| {
                json!({
                    "id": format!("ratio.{}", slug(&r.name)),
                    "name": r.name,
                    "value": r.value,
                    "meaning": r.meaning,
                    "target": r.target.map(|(t, _)| t),
                    "higher_is_better": r.target.map(|(_, h)| h),
                    "meets": r.meets(),
                })
            })
            .collect();
        let v = json!({
            "schema": BENCH_SCHEMA,
            "config": config,
            "figures": figures,
            "ratios": ratios,
        });
        format!("{v}\n")
    }
}

/// Version tag of the bench JSON (2: numbers as numbers, `schema`, stable `id`s).
pub const BENCH_SCHEMA: &str = "kvmmu-bench/2";

/// `name` reduced to a stable identifier: lower case, `%` as `pct`, every other run of
/// characters outside `[a-z0-9]` as one `_`.
pub fn slug(name: &str) -> String {
    let mut out = String::new();
    for c in name.to_lowercase().replace('%', "pct").chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else if !out.ends_with('_') && !out.is_empty() {
            out.push('_');
        }
    }
    out.trim_end_matches('_').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_schema_numbers_and_stable_ids() {
        let mut r = Report {
            config: vec![("reps", "5".into()), ("mmu", "tdp".into())],
            ..Report::default()
        };
        r.figure(
            "aging",
            "kvmmu lockless pass, 0% young",
            "M SPTE/s",
            vec![f64::NAN, 2.0],
        );
        r.ratio(
            "aging lockless / limit, 0% young",
            0.5,
            "fraction",
            Some((0.3, true)),
        );
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).expect("valid JSON");
        assert_eq!(v["schema"], BENCH_SCHEMA);
        assert_eq!(v["config"]["reps"], 5);
        assert_eq!(v["config"]["mmu"], "tdp");
        assert_eq!(
            v["figures"][0]["id"],
            "aging.kvmmu_lockless_pass_0pct_young"
        );
        assert!(v["figures"][0]["samples"][0].is_null());
        assert_eq!(
            v["ratios"][0]["id"],
            "ratio.aging_lockless_limit_0pct_young"
        );
        assert_eq!(v["ratios"][0]["meets"], true);
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn plot_scales_bars_to_the_largest_median() {
        let mut r = Report::default();
        r.figure("aging", "a", "M SPTE/s", vec![10.0]);
        r.figure("aging", "b", "M SPTE/s", vec![5.0]);
        r.figure("aging", "c", "%", vec![100.0]);
        let p = r.to_plot("aging", "M SPTE/s");
        let bars: Vec<usize> = p.lines().skip(2).map(|l| l.matches('#').count()).collect();
        assert_eq!(bars, vec![20, 10], "{p}");
    }
}
