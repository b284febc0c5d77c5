//! What a workload reports: timed phases, checks, counts and metrics, with one renderer per
//! audience (a table for people, JSON for machines, a plot for slides).
//!
//! The JSON schema is stable (`schema` names its version) and documented in the README.

pub mod plot;
pub mod progress;
pub mod table;

use crate::vcpus::PhaseTime;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// Version tag of [`Report`]'s JSON.
pub const REPORT_SCHEMA: &str = "kvmmu-report/1";

/// One timed phase.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Phase {
    /// The phase's name, as the original selftest prints it.
    pub name: String,
    /// Wall time in seconds: from the earliest start to the latest end of the threads doing the
    /// phase's work, each read on that thread.
    pub seconds: f64,
    /// Each working thread's own span in seconds (absent for a phase timed on one thread).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub thread_seconds: Vec<f64>,
}

/// The outcome of a check.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The property held.
    Pass,
    /// The property did not hold, and the policy says to warn only.
    Warn,
    /// The property did not hold: the run fails.
    Fail,
}

/// One checked property.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Whether it held.
    pub status: Status,
    /// The numbers behind the verdict.
    pub detail: String,
}

/// The result of one workload run.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Report {
    /// [`REPORT_SCHEMA`].
    pub schema: &'static str,
    /// The subcommand (`access-tracking`, `mmu-stress`).
    pub command: String,
    /// The configuration after defaults were applied.
    pub config: BTreeMap<String, serde_json::Value>,
    /// Timed phases in the order they ran.
    pub phases: Vec<Phase>,
    /// Checks in the order they ran.
    pub checks: Vec<Check>,
    /// Counts (pages, faults, passes, ...).
    pub counts: BTreeMap<String, u64>,
    /// Derived measurements in seconds (vCPU wall time, average aging pass, ...).
    pub metrics: BTreeMap<String, f64>,
    /// Remarks a reader needs to interpret the numbers.
    pub notes: Vec<String>,
    /// No check failed.
    pub passed: bool,
}

impl Report {
    /// An empty report for `command`.
    pub fn new(command: &str) -> Report {
        Report {
            schema: REPORT_SCHEMA,
            command: command.to_owned(),
            config: BTreeMap::new(),
            phases: Vec::new(),
            checks: Vec::new(),
            counts: BTreeMap::new(),
            metrics: BTreeMap::new(),
            notes: Vec::new(),
            passed: true,
        }
    }

    /// Records a configuration value.
    pub fn config(&mut self, key: &str, value: impl Serialize) {
        let v = serde_json::to_value(value).unwrap_or(serde_json::Value::Null);
        self.config.insert(key.to_owned(), v);
    }

    /// Records a phase timed on the one thread that did its work.
    pub fn phase(&mut self, name: impl Into<String>, d: Duration) {
        self.phases.push(Phase {
            name: name.into(),
            seconds: d.as_secs_f64(),
            thread_seconds: Vec::new(),
        });
    }

    /// Records a phase timed where its work happened, with every working thread's own span.
    pub fn phase_time(&mut self, name: impl Into<String>, t: &PhaseTime) {
        self.phases.push(Phase {
            name: name.into(),
            seconds: t.wall.as_secs_f64(),
            thread_seconds: t.per_thread.iter().map(Duration::as_secs_f64).collect(),
        });
    }

    /// Records a check; a [`Status::Fail`] makes the report fail.
    pub fn check(&mut self, name: impl Into<String>, status: Status, detail: impl Into<String>) {
        if status == Status::Fail {
            self.passed = false;
        }
        self.checks.push(Check {
            name: name.into(),
            status,
            detail: detail.into(),
        });
    }

    /// Records a check that passes when `ok`, and fails otherwise.
    pub fn require(&mut self, name: impl Into<String>, ok: bool, detail: impl Into<String>) {
        let s = if ok { Status::Pass } else { Status::Fail };
        self.check(name, s, detail);
    }

    /// Every value a comparison can take a median of: phases by name, then metrics. A phase
    /// name that repeats (the selftest marks memory idle twice) is kept apart: its second
    /// occurrence is `NAME #2`, and so on.
    pub fn measurements(&self) -> Vec<(String, f64)> {
        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        self.phases
            .iter()
            .map(|p| {
                let n = seen.entry(p.name.as_str()).or_insert(0);
                *n += 1;
                let name = if *n == 1 {
                    p.name.clone()
                } else {
                    format!("{} #{n}", p.name)
                };
                (name, p.seconds)
            })
            .chain(self.metrics.iter().map(|(k, v)| (k.clone(), *v)))
            .collect()
    }

    /// The failed checks, one line each (`check failed: NAME: DETAIL`).
    pub fn failure_lines(&self) -> Vec<String> {
        self.checks
            .iter()
            .filter(|c| c.status == Status::Fail)
            .map(|c| format!("check failed: {}: {}", c.name, c.detail))
            .collect()
    }

    /// The failed checks, one per line (for the error message of a failed run).
    pub fn failures(&self) -> String {
        self.failure_lines().join("\n")
    }
}

/// Refuses, before a run, output options whose files could not be written.
pub fn check_output(out: &crate::OutputArgs) -> anyhow::Result<()> {
    match &out.plot {
        Some(p) => crate::check_output_path("--plot", p, &["svg", "png"]),
        None => Ok(()),
    }
}

/// Draws the plot `out` asks for, if any (nothing printed).
pub fn plot_only(report: &Report, out: &crate::OutputArgs) -> anyhow::Result<()> {
    let Some(path) = &out.plot else {
        return Ok(());
    };
    // Repeated phase names are kept apart, as in compare.
    let measured: Vec<(String, f64)> = report
        .measurements()
        .into_iter()
        .take(report.phases.len())
        .collect();
    let series = [plot::Series {
        name: report.command.clone(),
        values: measured.iter().map(|(_, s)| *s).collect(),
    }];
    let cats: Vec<String> = measured.into_iter().map(|(n, _)| n).collect();
    let config: Vec<String> = ["vcpus", "mmu", "aging", "idle"]
        .iter()
        .filter_map(|k| {
            report.config.get(*k).map(|v| match v {
                serde_json::Value::String(t) => format!("{k} {t}"),
                other => format!("{k} {other}"),
            })
        })
        .collect();
    plot::bars(
        path,
        &format!(
            "kvmmu {}: phase times ({})",
            report.command,
            config.join(", ")
        ),
        &cats,
        &series,
    )
}

/// Prints `report` as the output options ask, draws the plot if asked, and turns failed checks
/// into an error (a non-zero exit naming the checks).
pub fn emit(report: &Report, out: &crate::OutputArgs) -> anyhow::Result<()> {
    if out.json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        print!("{}", table::render(report));
    }
    plot_only(report, out)?;
    if !report.passed {
        return Err(crate::error::ChecksFailed {
            lines: report.failure_lines(),
        }
        .into());
    }
    Ok(())
}
