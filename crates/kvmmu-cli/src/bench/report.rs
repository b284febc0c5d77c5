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
        let mut last = "";
        for f in &self.figures {
            if f.scenario != last {
                let _ = writeln!(s, "\n[{}]", f.scenario);
                last = f.scenario;
            }
            let _ = writeln!(
                s,
                "  {:<52} {:>14.3} {:<10} (n={})",
                f.name,
                f.median(),
                f.unit,
                f.samples.len()
            );
        }
        let _ = writeln!(s, "\n[ratios]");
        for r in &self.ratios {
            let t = match (r.target, r.meets()) {
                (Some((t, higher)), Some(ok)) => format!(
                    "target {} {t}: {}",
                    if higher { ">=" } else { "<=" },
                    if ok { "MET" } else { "missed" }
                ),
                _ => String::new(),
            };
            let _ = writeln!(
                s,
                "  {:<52} {:>9.3}  {:<40} {t}",
                r.name, r.value, r.meaning
            );
        }
        s
    }

    /// Horizontal bar charts of the figures of `scenario` that share `unit`, scaled to the largest.
    pub fn to_plot(&self, scenario: &str, unit: &str) -> String {
        const WIDTH: f64 = 50.0;
        let figs: Vec<&Figure> = self
            .figures
            .iter()
            .filter(|f| f.scenario == scenario && f.unit == unit)
            .collect();
        let max = figs.iter().map(|f| f.median()).fold(0.0, f64::max);
        let mut s = format!("\n[{scenario} plot, {unit}]\n");
        for f in figs {
            let n = if max > 0.0 {
                (f.median() / max * WIDTH).round() as usize
            } else {
                0
            };
            let _ = writeln!(
                s,
                "  {:<52} |{:<50}| {:.1}",
                f.name,
                "#".repeat(n),
                f.median()
            );
        }
        s
    }

    /// JSON: `{"config":{..},"figures":[..],"ratios":[..]}`.
    pub fn to_json(&self) -> String {
        let mut s = String::from("{\"config\":{");
        for (i, (k, v)) in self.config.iter().enumerate() {
            let _ = write!(s, "{}{}:{}", sep(i), jstr(k), jstr(v));
        }
        s.push_str("},\"figures\":[");
        for (i, f) in self.figures.iter().enumerate() {
            let samples: Vec<String> = f.samples.iter().map(|x| jnum(*x)).collect();
            let _ = write!(
                s,
                "{}{{\"scenario\":{},\"name\":{},\"unit\":{},\"median\":{},\"samples\":[{}]}}",
                sep(i),
                jstr(f.scenario),
                jstr(&f.name),
                jstr(f.unit),
                jnum(f.median()),
                samples.join(",")
            );
        }
        s.push_str("],\"ratios\":[");
        for (i, r) in self.ratios.iter().enumerate() {
            let (target, higher, meets) = match (r.target, r.meets()) {
                (Some((t, h)), Some(m)) => (jnum(t), h.to_string(), m.to_string()),
                _ => ("null".into(), "null".into(), "null".into()),
            };
            let _ = write!(
                s,
                "{}{{\"name\":{},\"value\":{},\"meaning\":{},\"target\":{target},\"higher_is_better\":{higher},\"meets\":{meets}}}",
                sep(i),
                jstr(&r.name),
                jnum(r.value),
                jstr(r.meaning)
            );
        }
        s.push_str("]}\n");
        s
    }
}

fn sep(i: usize) -> &'static str {
    if i == 0 { "" } else { "," }
}

fn jnum(x: f64) -> String {
    if x.is_finite() {
        format!("{x}")
    } else {
        "null".into()
    }
}

fn jstr(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(bars, vec![50, 25], "{p}");
    }

    #[test]
    fn json_escapes_strings_and_nulls_non_finite() {
        assert_eq!(jstr("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
        assert_eq!(jnum(f64::INFINITY), "null");
    }
}
