//! `kvmmu compare`: one workload in several configurations, in one process, alternating the
//! configurations over repeated runs (so drift in the machine's speed hits all of them alike),
//! then the median of every measurement per configuration and its ratio to the first.

use crate::access_tracking::{self, AccessArgs};
use crate::dirty_log_perf::{self, DirtyLogPerfArgs};
use crate::mmu_stress::{self, StressArgs};
use crate::reclaim::{self, ReclaimArgs};
use crate::report::{Report, plot, progress, table::value};
use crate::{AgingArg, MmuArg, OutputArgs, TrackingArg};
use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;
use std::fmt::Write;

/// Version tag of [`Comparison`]'s JSON.
pub const COMPARE_SCHEMA: &str = "kvmmu-compare/1";

/// One configuration: a change applied to the workload's flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConfigArg {
    /// `--aging lockless`.
    Lockless,
    /// `--aging locked`.
    Locked,
    /// `--mmu tdp`.
    Tdp,
    /// `--mmu shadow`.
    Shadow,
    /// No aging thread (access-tracking `-p`: the "no aging" column; mmu-stress: without `--age`).
    NoAging,
    /// dirty-log-perf `-g`: classic dirty log (GET re-arms).
    ClassicLog,
    /// dirty-log-perf without `-g`: manual protect (GET, then CLEAR re-arms).
    ManualLog,
    /// dirty-log-perf `--tracking write-protect`.
    WriteProtect,
    /// dirty-log-perf `--tracking d-bit`.
    DBit,
    /// dirty-log-perf `--dirty-ring` with the smallest ring that holds one iteration.
    DirtyRing,
}

/// The workload to compare.
#[derive(Debug, Clone, Subcommand)]
pub enum CompareWorkload {
    /// `access-tracking` with these flags.
    AccessTracking(AccessArgs),
    /// `mmu-stress` with these flags.
    MmuStress(StressArgs),
    /// `reclaim` with these flags.
    Reclaim(ReclaimArgs),
    /// `dirty-log-perf` with these flags.
    DirtyLogPerf(DirtyLogPerfArgs),
}

/// Options of `compare`.
#[derive(Debug, Clone, Args)]
pub struct CompareArgs {
    /// Configurations, comma separated; ratios are relative to the first.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "lockless,locked"
    )]
    pub configs: Vec<ConfigArg>,

    /// Runs of each configuration (alternated: run k starts with configuration k mod n).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,

    /// Output.
    #[command(flatten)]
    pub out: OutputArgs,

    /// The workload and its flags.
    #[command(subcommand)]
    pub workload: CompareWorkload,

    /// The workload flags given on the command line rather than defaulted (argument ids, e.g.
    /// `aging`): a configuration may not silently override one of them.
    #[arg(skip)]
    pub explicit: Vec<String>,
}

/// One measurement across configurations.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Row {
    /// Phase or metric name.
    pub name: String,
    /// Median per configuration (seconds), in `configs` order; `null` where it was not measured.
    pub medians: Vec<Option<f64>>,
    /// Median divided by the first configuration's median.
    pub ratios: Vec<Option<f64>>,
}

/// The result of a comparison.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Comparison {
    /// [`COMPARE_SCHEMA`].
    pub schema: &'static str,
    /// The workload's subcommand name.
    pub workload: String,
    /// Configuration names, in order.
    pub configs: Vec<String>,
    /// Runs per configuration.
    pub runs: usize,
    /// One row per measurement.
    pub rows: Vec<Row>,
    /// Every run passed its checks.
    pub passed: bool,
    /// Every failed check, naming its configuration and run (empty when `passed`).
    pub failures: Vec<String>,
    /// Ctrl-C stopped the comparison early: medians are over the runs that completed.
    pub interrupted: bool,
}

fn apply(w: &CompareWorkload, c: ConfigArg) -> CompareWorkload {
    let mut w = w.clone();
    match &mut w {
        CompareWorkload::AccessTracking(a) => match c {
            ConfigArg::Lockless => a.aging = AgingArg::Lockless,
            ConfigArg::Locked => a.aging = AgingArg::Locked,
            ConfigArg::Tdp => a.mmu = MmuArg::Tdp,
            ConfigArg::Shadow => a.mmu = MmuArg::Shadow,
            ConfigArg::NoAging => a.no_aging_thread = true,
            ConfigArg::ClassicLog
            | ConfigArg::ManualLog
            | ConfigArg::WriteProtect
            | ConfigArg::DBit
            | ConfigArg::DirtyRing => {}
        },
        CompareWorkload::MmuStress(s) => match c {
            ConfigArg::Lockless => s.aging = AgingArg::Lockless,
            ConfigArg::Locked => s.aging = AgingArg::Locked,
            ConfigArg::Tdp => s.mmu = MmuArg::Tdp,
            ConfigArg::Shadow => s.mmu = MmuArg::Shadow,
            ConfigArg::NoAging => s.age = false,
            ConfigArg::ClassicLog
            | ConfigArg::ManualLog
            | ConfigArg::WriteProtect
            | ConfigArg::DBit
            | ConfigArg::DirtyRing => {}
        },
        CompareWorkload::DirtyLogPerf(d) => match c {
            ConfigArg::Tdp => d.mmu = MmuArg::Tdp,
            ConfigArg::Shadow => d.mmu = MmuArg::Shadow,
            ConfigArg::ClassicLog => d.no_manual_protect = true,
            ConfigArg::ManualLog => d.no_manual_protect = false,
            ConfigArg::WriteProtect => d.tracking = TrackingArg::WriteProtect,
            ConfigArg::DBit => d.tracking = TrackingArg::DBit,
            ConfigArg::DirtyRing => {
                d.dirty_ring = (d.bytes_per_vcpu / 4096 + 64)
                    .next_power_of_two()
                    .try_into()
                    .unwrap_or(u32::MAX)
            }
            ConfigArg::Lockless | ConfigArg::Locked | ConfigArg::NoAging => {}
        },
        CompareWorkload::Reclaim(r) => match c {
            ConfigArg::Lockless => r.aging = AgingArg::Lockless,
            ConfigArg::Locked => r.aging = AgingArg::Locked,
            ConfigArg::Tdp => r.mmu = MmuArg::Tdp,
            ConfigArg::Shadow => r.mmu = MmuArg::Shadow,
            ConfigArg::NoAging => r.no_aging = true,
            ConfigArg::ClassicLog
            | ConfigArg::ManualLog
            | ConfigArg::WriteProtect
            | ConfigArg::DBit
            | ConfigArg::DirtyRing => {}
        },
    }
    w
}

fn run_one(w: &CompareWorkload) -> anyhow::Result<Report> {
    match w {
        CompareWorkload::AccessTracking(a) => access_tracking::run(a),
        CompareWorkload::MmuStress(s) => mmu_stress::run(s),
        CompareWorkload::Reclaim(r) => reclaim::run(r),
        CompareWorkload::DirtyLogPerf(d) => dirty_log_perf::run(d),
    }
}

/// The median of `v` (mean of the middle two for an even count); `None` when empty.
pub fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Runs the comparison.
pub fn run(a: &CompareArgs) -> anyhow::Result<Comparison> {
    let workloads = check(a)?;
    let n = a.configs.len();
    let names = config_names(&a.configs);
    let mut reports: Vec<Vec<Report>> = vec![Vec::new(); n];
    let mut failures: Vec<String> = Vec::new();
    let pb = progress::bar((a.runs * n) as u64, "compare");
    let mut interrupted = false;
    'runs: for run in 0..a.runs {
        for k in 0..n {
            if progress::interrupted() {
                interrupted = true;
                break 'runs;
            }
            let c = (run + k) % n;
            pb.set_message(format!("compare: {} run {}/{}", names[c], run + 1, a.runs));
            let r = run_one(&workloads[c]).with_context(|| {
                format!("configuration {}, run {} of {}", names[c], run + 1, a.runs)
            })?;
            for l in r.failure_lines() {
                failures.push(format!(
                    "configuration {}, run {} of {}: {l}",
                    names[c],
                    run + 1,
                    a.runs
                ));
            }
            reports[c].push(r);
            pb.inc(1);
        }
    }
    pb.finish_and_clear();
    let mut measured: Vec<String> = Vec::new();
    for r in reports.iter().flatten() {
        for (name, _) in r.measurements() {
            if !measured.contains(&name) {
                measured.push(name);
            }
        }
    }
    let rows = measured
        .into_iter()
        .map(|name| {
            let medians: Vec<Option<f64>> = reports
                .iter()
                .map(|rs| {
                    let mut v: Vec<f64> = rs
                        .iter()
                        .flat_map(|r| r.measurements())
                        .filter(|(n, _)| *n == name)
                        .map(|(_, x)| x)
                        .collect();
                    median(&mut v)
                })
                .collect();
            let ratios = medians
                .iter()
                .map(|m| match (m, medians[0]) {
                    (Some(x), Some(b)) if b > 0.0 => Some(x / b),
                    _ => None,
                })
                .collect();
            Row {
                name,
                medians,
                ratios,
            }
        })
        .collect();
    Ok(Comparison {
        schema: COMPARE_SCHEMA,
        workload: match a.workload {
            CompareWorkload::AccessTracking(_) => "access-tracking".into(),
            CompareWorkload::MmuStress(_) => "mmu-stress".into(),
            CompareWorkload::Reclaim(_) => "reclaim".into(),
            CompareWorkload::DirtyLogPerf(_) => "dirty-log-perf".into(),
        },
        configs: names,
        runs: a.runs,
        rows,
        passed: failures.is_empty(),
        failures,
        interrupted,
    })
}

fn config_names(configs: &[ConfigArg]) -> Vec<String> {
    configs
        .iter()
        .map(|c| {
            c.to_possible_value()
                .map(|v| v.get_name().to_owned())
                .unwrap_or_default()
        })
        .collect()
}

/// Refuses, before any run, a comparison that could not mean anything: no or repeated
/// configurations, a configuration that would override a flag given to the workload, a
/// configuration the workload's flags make a no-op, or bad workload flags. Returns the
/// workload of every configuration.
pub fn check(a: &CompareArgs) -> anyhow::Result<Vec<CompareWorkload>> {
    use crate::error::{require, usage_hint};
    require(!a.configs.is_empty(), || {
        "--configs needs at least one configuration".into()
    })?;
    require((1..=1000).contains(&a.runs), || {
        format!("--runs must be between 1 and 1000 (got {})", a.runs)
    })?;
    let names = config_names(&a.configs);
    for (i, c) in a.configs.iter().enumerate() {
        if a.configs[..i].contains(c) {
            return Err(usage_hint(
                format!("--configs names {} twice", names[i]),
                "give each configuration once; --runs sets how often each runs",
            ));
        }
    }
    let given = |id: &str| a.explicit.iter().any(|e| e == id);
    let (workload, is_stress, age) = match &a.workload {
        CompareWorkload::AccessTracking(_) => ("access-tracking", false, true),
        // Under --reclaim, kswapd's aging passes reach the VM: the aging mode matters.
        CompareWorkload::MmuStress(s) => ("mmu-stress", true, s.age || s.reclaim),
        CompareWorkload::Reclaim(_) => ("reclaim", false, true),
        CompareWorkload::DirtyLogPerf(_) => ("dirty-log-perf", false, false),
    };
    let is_dirty = workload == "dirty-log-perf";
    for (c, name) in a.configs.iter().zip(&names) {
        let flag = match c {
            ConfigArg::Lockless | ConfigArg::Locked => "aging",
            ConfigArg::Tdp | ConfigArg::Shadow => "mmu",
            ConfigArg::NoAging => "",
            ConfigArg::ClassicLog | ConfigArg::ManualLog => "no_manual_protect",
            ConfigArg::WriteProtect | ConfigArg::DBit => "tracking",
            ConfigArg::DirtyRing => "dirty_ring",
        };
        let dirty_only = matches!(
            c,
            ConfigArg::ClassicLog
                | ConfigArg::ManualLog
                | ConfigArg::WriteProtect
                | ConfigArg::DBit
                | ConfigArg::DirtyRing
        );
        if dirty_only != is_dirty
            && (dirty_only || !matches!(c, ConfigArg::Tdp | ConfigArg::Shadow))
        {
            return Err(usage_hint(
                format!("--configs {name} changes nothing for {workload}"),
                "dirty-log-perf takes tdp, shadow, classic-log, manual-log, write-protect, d-bit and dirty-ring; the other \
                 workloads take lockless, locked, tdp, shadow and no-aging",
            ));
        }
        if !flag.is_empty() && given(flag) {
            return Err(usage_hint(
                format!(
                    "--configs {name} would override the workload's --{flag}, so the \
                     comparison would not run what the command line says"
                ),
                format!("drop --{flag} from the {workload} flags, or {name} from --configs"),
            ));
        }
        if let CompareWorkload::Reclaim(r) = &a.workload
            && r.no_aging
            && matches!(c, ConfigArg::Lockless | ConfigArg::Locked)
        {
            return Err(usage_hint(
                format!(
                    "--configs {name} changes nothing for reclaim with --no-aging (no aging \
                     call reaches the VM)"
                ),
                "drop --no-aging from the reclaim flags (no-aging is a configuration of its own)",
            ));
        }
        if is_stress && !age && matches!(c, ConfigArg::Lockless | ConfigArg::Locked) {
            return Err(usage_hint(
                format!(
                    "--configs {name} changes nothing for mmu-stress without --age or --reclaim \
                     (no aging reaches the VM)"
                ),
                "add --age (or --reclaim) to the mmu-stress flags",
            ));
        }
    }
    let workloads: Vec<CompareWorkload> =
        a.configs.iter().map(|c| apply(&a.workload, *c)).collect();
    for (w, name) in workloads.iter().zip(&names) {
        match w {
            CompareWorkload::AccessTracking(x) => access_tracking::check(x).map(|_| ()),
            CompareWorkload::MmuStress(x) => mmu_stress::check(x).map(|_| ()),
            CompareWorkload::Reclaim(x) => reclaim::check(x).map(|_| ()),
            CompareWorkload::DirtyLogPerf(x) => dirty_log_perf::check(x),
        }
        .map_err(|e| e.context(format!("configuration {name}")))?;
    }
    Ok(workloads)
}

/// Renders a comparison as two tables that fit 80 columns for up to four configurations: the
/// medians per configuration, then each configuration's ratio to the first.
pub fn render(c: &Comparison) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "kvmmu compare {}: {} runs per configuration, alternated",
        c.workload, c.runs
    );
    let w = c
        .rows
        .iter()
        .map(|r| r.name.len())
        .max()
        .unwrap_or(8)
        .max(11);
    let mut head = format!("\n  {:<w$}", "median");
    for name in &c.configs {
        let _ = write!(head, " {name:>12}");
    }
    let _ = writeln!(s, "{head}");
    for r in &c.rows {
        let _ = write!(s, "  {:<w$}", r.name);
        for m in &r.medians {
            let _ = write!(s, " {:>12}", m.map_or("-".into(), |v| value(&r.name, v)));
        }
        let _ = writeln!(s);
    }
    if c.configs.len() > 1 {
        let mut head = format!("\n  {:<w$}", format!("ratio to {}", c.configs[0]));
        for name in c.configs.iter().skip(1) {
            let _ = write!(head, " {name:>12}");
        }
        let _ = writeln!(s, "{head}");
        for r in &c.rows {
            let _ = write!(s, "  {:<w$}", r.name);
            for x in r.ratios.iter().skip(1) {
                let _ = write!(s, " {:>12}", x.map_or("-".into(), |x| format!("{x:.2}x")));
            }
            let _ = writeln!(s);
        }
    }
    let _ = writeln!(
        s,
        "\n  result: {}",
        if c.interrupted {
            "INTERRUPTED (medians of the runs that completed)"
        } else if c.passed {
            "PASS"
        } else {
            "FAIL (a run failed its checks)"
        }
    );
    s
}

/// `kvmmu compare`.
pub fn main(a: &CompareArgs) -> anyhow::Result<()> {
    crate::report::check_output(&a.out)?;
    progress::stop_between_units();
    let c = run(a)?;
    if a.out.json {
        println!("{}", serde_json::to_string_pretty(&c)?);
    } else {
        print!("{}", render(&c));
    }
    // The plot's axis is time: rates (`/s` rows) are left to the table.
    let timed: Vec<&Row> = c.rows.iter().filter(|r| !r.name.ends_with("/s")).collect();
    if let Some(path) = a.out.plot.as_ref().filter(|_| !timed.is_empty()) {
        let cats: Vec<String> = timed.iter().map(|r| r.name.clone()).collect();
        let series: Vec<plot::Series> = c
            .configs
            .iter()
            .enumerate()
            .map(|(k, name)| plot::Series {
                name: name.clone(),
                values: timed.iter().map(|r| r.medians[k].unwrap_or(0.0)).collect(),
            })
            .collect();
        plot::bars(
            path,
            &format!(
                "kvmmu compare {}: medians of {} runs ({})",
                c.workload,
                c.runs,
                c.configs.join(" vs ")
            ),
            &cats,
            &series,
        )?;
    }
    if c.interrupted {
        return Err(crate::error::Interrupted.into());
    }
    if !c.passed {
        return Err(crate::error::ChecksFailed {
            lines: c.failures.clone(),
        }
        .into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_fits_80_columns_with_three_configurations() {
        let row = |name: &str| Row {
            name: name.into(),
            medians: vec![Some(1234.5), Some(0.1), None],
            ratios: vec![Some(1.0), Some(0.00008), None],
        };
        let c = Comparison {
            schema: COMPARE_SCHEMA,
            workload: "access-tracking".into(),
            configs: vec!["lockless".into(), "locked".into(), "no-aging".into()],
            runs: 3,
            rows: vec![
                row("Reading from populated memory"),
                row("Mark memory idle (lru_gen) #2"),
            ],
            passed: true,
            failures: Vec::new(),
            interrupted: false,
        };
        let t = render(&c);
        for l in t.lines() {
            assert!(
                l.chars().count() <= 80,
                "{} columns: {l}",
                l.chars().count()
            );
        }
        assert!(
            t.contains("ratio to lockless") && t.contains("0.00x"),
            "{t}"
        );
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&mut []), None);
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }
}
