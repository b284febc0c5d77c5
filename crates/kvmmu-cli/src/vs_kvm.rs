//! `kvmmu vs-kvm`: the default run's populate / re-touch workload on real KVM (`/dev/kvm`) and on
//! kvmmu (TDP and shadow) in one process, as per-page costs and ratios to real KVM
//! (`kvmmu_kvm::timing`).

use anyhow::Context;
use clap::Args;

/// Options of `vs-kvm`.
#[derive(Debug, Clone, Args)]
pub struct VsKvmArgs {
    /// Guest memory (bytes; suffixes K, M, G accepted). One vCPU on each side.
    #[arg(short = 'b', long, default_value = "256M", value_parser = crate::size::parse_size)]
    pub bytes: u64,

    /// Percentage of pages touched again after populating (reads).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub hot_percent: u8,

    /// Runs per backend (alternated; medians are reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,

    /// Print one JSON object (`"schema": "kvmmu-vs-kvm/1"`) instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Runs `vs-kvm`.
pub fn main(args: &VsKvmArgs) -> anyhow::Result<()> {
    let cfg = kvmmu_kvm::timing::TimingConfig {
        bytes: args.bytes,
        hot_percent: args.hot_percent,
        runs: args.runs,
    };
    crate::check_host_memory(2 * (args.bytes / 4096) + 2048)?;
    let rows = kvmmu_kvm::timing::run(&cfg).context("vs-kvm")?;
    if args.json {
        let v = serde_json::json!({
            "schema": "kvmmu-vs-kvm/1",
            "bytes": args.bytes,
            "pages": args.bytes / 4096,
            "hot_percent": args.hot_percent,
            "runs": args.runs,
            "rows": rows,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", kvmmu_kvm::timing::render(&rows, &cfg));
    }
    Ok(())
}
