//! `kvmmu`: run workloads against the kvmmu library and report what happened.
//!
//! With no subcommand it runs the default workload: vCPU threads populate guest memory through the
//! TDP MMU, the host ages that memory through its MMU notifiers (lockless or locked), the vCPUs touch
//! part of it again, and aging tells hot pages from cold ones. Every value written is read back and
//! checked, and the VM's counters are checked for balance before the summary prints.

mod bench;
mod torture;
mod workload;

use clap::{Args, Parser, Subcommand};
use kvmmu_cli::size;
pub use kvmmu_cli::{AgingArg, MmuArg};

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
    /// Run one workload in several configurations, alternated; print medians and ratios.
    Compare(kvmmu_cli::compare::CompareArgs),
    /// Run every MMU actor at once under oracles (rcutorture-style); fails on any violation.
    Torture(torture::TortureArgs),
    /// Benchmark kvmmu against its hardware limits and its peers (medians and ratios).
    Bench(bench::BenchArgs),
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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        None => print!("{}", workload::run(&cli.workload)?),
        Some(Command::Run(args)) => print!("{}", workload::run(&args)?),
        Some(Command::AccessTracking(cmd)) => kvmmu_cli::access_tracking::main(&cmd)?,
        Some(Command::MmuStress(cmd)) => kvmmu_cli::mmu_stress::main(&cmd)?,
        Some(Command::Compare(args)) => kvmmu_cli::compare::main(&args)?,
        Some(Command::Torture(args)) => print!("{}", torture::run(&args)?),
        Some(Command::Bench(args)) => print!("{}", bench::run(&args)?),
    }
    Ok(())
}
