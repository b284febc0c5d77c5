//! `kvmmu`: run workloads against the kvmmu library and report what happened.
//!
//! With no subcommand it runs the default workload: vCPU threads populate guest memory through the
//! TDP MMU, the host ages that memory through its MMU notifiers (lockless or locked), the vCPUs touch
//! part of it again, and aging tells hot pages from cold ones. Every value written is read back and
//! checked, and the VM's counters are checked for balance before the summary prints.

mod bench;
mod torture;
mod workload;

use clap::parser::ValueSource;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use kvmmu_cli::size;
pub use kvmmu_cli::{AgingArg, MmuArg};
use std::ffi::OsString;
use std::process::ExitCode;

/// kvmmu: KVM's x86 MMU on simulated hardware.
///
/// With no subcommand, runs the default workload: vCPUs populate guest memory, the host ages it
/// through MMU notifiers, the vCPUs touch a part of it again, and aging finds the hot pages.
#[derive(Debug, Parser)]
#[command(name = "kvmmu", version, about, args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// A workload other than the default one.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Options of the default workload (when no subcommand is given).
    #[command(flatten)]
    pub workload: WorkloadArgs,

    /// Also record the run as a Chrome trace-event JSON file (open it in Perfetto): one track per
    /// thread with vCPU exits and faults, aging, invalidations, mmu_lock waits and holds, remote
    /// TLB flushes and memslot swaps.
    #[arg(long, global = true, value_name = "FILE.json")]
    pub trace: Option<std::path::PathBuf>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the default workload (the same as giving no subcommand).
    Run(WorkloadArgs),
    /// KVM's access_tracking_perf_test: populate, mark idle, touch again; checks that aging sees
    /// the guest's accesses, and with -p times aging passes against populating vCPUs.
    AccessTracking(kvmmu_cli::access_tracking::AccessCommand),
    /// KVM's mmu_stress_test: aliased memslots, MMU reset, mprotect read-only under writing vCPUs,
    /// slot deletion and release at exit.
    MmuStress(kvmmu_cli::mmu_stress::StressCommand),
    /// KVM's dirty_log_test: vCPUs write the iteration number into random pages; every harvest
    /// must report exactly the pages written since the last one (-M dirty-log | clear-log | dirty-ring;
    /// a ring may also report pages of the iteration in flight when it fills).
    DirtyLogTest(kvmmu_cli::dirty_log_test::DirtyLogTestCommand),
    /// KVM's dirty_log_perf_test: populate, enable dirty logging, then per iteration dirty memory,
    /// get and clear the log, then disable it (-e: with the vCPUs running); phase times with
    /// pf_fast, pf_fixed and remote_tlb_flush counts.
    DirtyLogPerf(kvmmu_cli::dirty_log_perf::DirtyLogPerfCommand),
    /// KVM's x86/nx_huge_pages_test: reads and instruction fetches on three 2M hugetlb pages;
    /// checks (pages_2m, nx_lpage_splits) after each step, NX huge page recovery, and the re-read.
    NxHugePages(kvmmu_cli::nx_huge_pages::NxHugePagesCommand),
    /// Run one workload in several configurations, alternated; print medians and ratios.
    Compare(kvmmu_cli::compare::CompareArgs),
    /// Memory overcommit: vCPUs run a hot and a cold set under a host memory limit while reclaim
    /// ages and evicts to swap; reports invalidate_range_start latency, evictions and refaults.
    Reclaim(kvmmu_cli::reclaim::ReclaimCommand),
    /// Working-set estimation: bins of {idle age, bytes} per window, per memslot and per VM, with
    /// their accuracy against the vCPUs' actual accesses.
    Wss(kvmmu_cli::wss::WssArgs),
    /// Run every MMU actor at once under oracles (rcutorture-style); fails on any violation.
    Torture(torture::TortureArgs),
    /// Benchmark kvmmu against its hardware limits and its peers (medians and ratios).
    Bench(bench::BenchArgs),
    /// The populate / re-touch workload on real KVM (/dev/kvm) and on kvmmu (TDP, shadow), side
    /// by side: per-page costs and ratios.
    VsKvm(kvmmu_cli::vs_kvm::VsKvmArgs),
}

/// Options of the default workload.
#[derive(Debug, Clone, Args)]
pub struct WorkloadArgs {
    /// Number of vCPU threads.
    #[arg(short = 'v', long, default_value_t = 2)]
    pub vcpus: usize,

    /// Guest memory per vCPU (bytes; suffixes K, M, G accepted, e.g. 256M).
    #[arg(short = 'b', long, default_value = "256M", value_parser = size::parse_size)]
    pub bytes_per_vcpu: u64,

    /// Which MMU maps guest memory.
    #[arg(long, value_enum, default_value_t = MmuArg::Tdp)]
    pub mmu: MmuArg,

    /// How aging reaches the SPTEs: without mmu_lock (the 6.15 series) or under it (the baseline).
    #[arg(long, value_enum, default_value_t = AgingArg::Lockless)]
    pub aging: AgingArg,

    /// Number of full aging passes to time after population.
    #[arg(long, default_value_t = 5)]
    pub passes: u32,

    /// Percentage of pages the vCPUs touch again before the hot/cold pass.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub hot_percent: u8,

    /// Entries in each vCPU's software TLB.
    #[arg(long, default_value_t = 2048)]
    pub tlb_entries: usize,

    /// Host backing of guest memory, as the selftests' -s: anonymous (4K pages), anonymous_thp
    /// (2M THPs), anonymous_hugetlb_2mb, anonymous_hugetlb_1gb; guest memory must be a multiple
    /// of its page size.
    #[arg(short = 's', long = "backing-src", default_value = "anonymous")]
    pub backing_src: kvmmu::BackingSrc,

    /// Output.
    #[command(flatten)]
    pub out: kvmmu_cli::OutputArgs,
}

fn main() -> ExitCode {
    restore_sigpipe();
    let args = hoist_compare_flags(std::env::args_os().collect());
    let matches = match Cli::command().try_get_matches_from(&args) {
        Ok(m) => m,
        Err(e) => return clap_error(e),
    };
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => return clap_error(e),
    };
    match run(cli, &matches) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => kvmmu_cli::error::report(&e),
    }
}

/// Rust starts programs with SIGPIPE ignored, so a closed pipe (`kvmmu ... | head`) turns the
/// next `print!` into a panic with a backtrace; a command-line tool should end quietly instead,
/// as `cat` does.
fn restore_sigpipe() {
    #[cfg(unix)]
    // SAFETY: called first thing in `main`, before any other thread exists, so no thread can be
    // relying on the old disposition; SIG_DFL is a valid disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn run(cli: Cli, matches: &clap::ArgMatches) -> anyhow::Result<()> {
    kvmmu_cli::report::progress::install_interrupt_handler();
    let trace = cli
        .trace
        .as_deref()
        .map(kvmmu_cli::trace::start)
        .transpose()?;
    let result = run_command(cli, matches);
    match trace {
        Some(t) if !kvmmu_cli::error::is_usage(&result) => result.and(t.finish().map(drop)),
        _ => result,
    }
}

fn run_command(cli: Cli, matches: &clap::ArgMatches) -> anyhow::Result<()> {
    match cli.command {
        None => workload::main(&cli.workload)?,
        Some(Command::Run(args)) => workload::main(&args)?,
        Some(Command::AccessTracking(cmd)) => kvmmu_cli::access_tracking::main(&cmd)?,
        Some(Command::MmuStress(cmd)) => kvmmu_cli::mmu_stress::main(&cmd)?,
        Some(Command::NxHugePages(cmd)) => kvmmu_cli::nx_huge_pages::main(&cmd)?,
        Some(Command::Reclaim(cmd)) => kvmmu_cli::reclaim::main(&cmd)?,
        Some(Command::Wss(args)) => kvmmu_cli::wss::main(&args)?,
        Some(Command::DirtyLogTest(cmd)) => kvmmu_cli::dirty_log_test::main(&cmd)?,
        Some(Command::DirtyLogPerf(cmd)) => kvmmu_cli::dirty_log_perf::main(&cmd)?,
        Some(Command::Compare(mut args)) => {
            args.explicit = explicit_workload_flags(matches);
            kvmmu_cli::compare::main(&args)?
        }
        Some(Command::Torture(args)) => print!("{}", torture::run(&args)?),
        Some(Command::Bench(args)) => print!("{}", bench::run(&args)?),
        Some(Command::VsKvm(args)) => kvmmu_cli::vs_kvm::main(&args)?,
    }
    Ok(())
}

/// The workload flags given on `compare`'s command line (not defaulted), by argument id.
fn explicit_workload_flags(matches: &clap::ArgMatches) -> Vec<String> {
    let Some((_, w)) = matches
        .subcommand_matches("compare")
        .and_then(|c| c.subcommand())
    else {
        return Vec::new();
    };
    w.ids()
        .filter(|id| w.value_source(id.as_str()) == Some(ValueSource::CommandLine))
        .map(|id| id.as_str().to_owned())
        .collect()
}

/// `compare`'s own options are accepted after the workload name too: they are moved in front
/// of it (the workloads have no option of these names, so nothing is ambiguous).
fn hoist_compare_flags(args: Vec<OsString>) -> Vec<OsString> {
    const OWN: [&str; 4] = ["--plot", "--json", "--runs", "--configs"];
    const TAKES_VALUE: [&str; 3] = ["--plot", "--runs", "--configs"];
    if args.get(1).and_then(|a| a.to_str()) != Some("compare") {
        return args;
    }
    let Some(w) = args.iter().position(|a| {
        matches!(
            a.to_str(),
            Some("access-tracking" | "mmu-stress" | "reclaim" | "dirty-log-perf")
        )
    }) else {
        return args;
    };
    let (mut head, mut moved, mut tail) = (args[..w].to_vec(), Vec::new(), Vec::new());
    let mut rest = args[w..].iter();
    while let Some(a) = rest.next() {
        let s = a.to_str().unwrap_or("");
        let name = s.split('=').next().unwrap_or("");
        if OWN.contains(&name) {
            moved.push(a.clone());
            if TAKES_VALUE.contains(&s)
                && let Some(v) = rest.next()
            {
                moved.push(v.clone());
            }
        } else {
            tail.push(a.clone());
        }
    }
    head.extend(moved);
    head.extend(tail);
    head
}

/// A command line clap refused: its first line as the error, its tip (if any) as the hint.
fn clap_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    let text = e.render().to_string();
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or("error: invalid command line");
    let first = first.strip_prefix("error: ").unwrap_or(first);
    eprintln!("error: {first}");
    let tip = lines.find_map(|l| l.strip_prefix("tip: "));
    match tip {
        Some(t) => eprintln!("hint: {t}"),
        None => eprintln!("hint: --help lists every option"),
    }
    ExitCode::from(kvmmu_cli::error::EXIT_USAGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn compare_flags_after_the_workload_name_are_moved_before_it() {
        let got = hoist_compare_flags(os(&[
            "kvmmu",
            "compare",
            "access-tracking",
            "-v",
            "1",
            "--plot",
            "x.svg",
            "--json",
            "--runs=2",
        ]));
        assert_eq!(
            got,
            os(&[
                "kvmmu",
                "compare",
                "--plot",
                "x.svg",
                "--json",
                "--runs=2",
                "access-tracking",
                "-v",
                "1"
            ])
        );
        let other = os(&["kvmmu", "access-tracking", "--plot", "x.svg"]);
        assert_eq!(hoist_compare_flags(other.clone()), other);
    }
}
