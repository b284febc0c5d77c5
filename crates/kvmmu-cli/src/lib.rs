//! The workloads and reports behind the `kvmmu` command, as a library so that integration tests
//! can drive them directly (and inject faults the command line does not offer).
//!
//! - [`access_tracking`]: KVM's `access_tracking_perf_test` (spec §5.2), page-idle or MGLRU aging.
//! - [`mmu_stress`]: KVM's `mmu_stress_test` (spec §5.3): aliased memslots, the stage protocol,
//!   `mprotect` read-only under running vCPUs, slot deletion and `release` at exit.
//! - [`dirty_log_test`], [`dirty_log_perf`]: KVM's `dirty_log_test` and `dirty_log_perf_test`.
//! - [`nested`]: `--nested`, the workload's vCPUs as an L2 guest over L1-built EPT12.
//! - [`nx_huge_pages`]: KVM's `x86/nx_huge_pages_test` (NX huge page splits and recovery).
//! - [`compare`]: one workload in several configurations, alternated, medians and ratios.
//! - [`report`]: the result every workload returns, rendered as a table, JSON or a plot.
//! - [`trace`]: `--trace FILE`, the run as a Chrome trace-event (Perfetto) JSON file.
//! - [`error`]: how the command fails (one line, an exit status per kind of failure).

pub mod access_tracking;
pub mod compare;
pub mod dirty_log_perf;
pub mod dirty_log_test;
pub mod error;
pub mod mmu_stress;
pub mod nested;
pub mod nx_huge_pages;
pub mod reclaim;
pub mod report;
pub mod size;
pub mod trace;
pub mod vcpus;
pub mod vs_kvm;
pub mod wss;

use clap::{Args, ValueEnum};
use kvmmu::prelude::{AgingMode, MmuKind, VmConfig};
use std::path::PathBuf;

/// `--mmu`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MmuArg {
    /// The TDP MMU.
    Tdp,
    /// The shadow MMU (reverse maps).
    Shadow,
}

/// `--aging`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AgingArg {
    /// No mmu_lock: SRCU for memslots, RCU for page tables.
    Lockless,
    /// mmu_lock held for write on every aging call (the pre-series baseline).
    Locked,
}

/// `--tracking`: how dirty logging re-arms pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrackingArg {
    /// Clear W (keep MMU-writable): the next write faults (fast page fault) and marks the page.
    WriteProtect,
    /// Clear D and flush (PML-like): harvests collect the D bits.
    DBit,
}

impl TrackingArg {
    /// The library's mode.
    pub fn mode(self) -> kvmmu::prelude::DirtyTracking {
        match self {
            TrackingArg::WriteProtect => kvmmu::prelude::DirtyTracking::WriteProtect,
            TrackingArg::DBit => kvmmu::prelude::DirtyTracking::DBit,
        }
    }
}

/// The A/D format of a `--ad-disabled` flag.
pub fn ad_bits(ad_disabled: bool) -> kvmmu::AdBits {
    if ad_disabled {
        kvmmu::AdBits::Disabled
    } else {
        kvmmu::AdBits::Enabled
    }
}

/// The VM configuration for the common flags.
pub fn vm_config(mmu: MmuArg, aging: AgingArg, tlb_entries: usize) -> VmConfig {
    VmConfig {
        mmu: match mmu {
            MmuArg::Tdp => MmuKind::Tdp,
            MmuArg::Shadow => MmuKind::Shadow,
        },
        aging: match aging {
            AgingArg::Lockless => AgingMode::Lockless,
            AgingArg::Locked => AgingMode::Locked,
        },
        tlb_entries,
        ..VmConfig::default()
    }
}

/// Output options shared by the subcommands.
#[derive(Debug, Clone, Default, Args)]
pub struct OutputArgs {
    /// Print the report as JSON (schema in the README, "JSON output") instead of a table.
    #[arg(long)]
    pub json: bool,

    /// Also draw the phase times to FILE; the format follows the extension (.svg or .png).
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
}

/// The VM's counters for a report, under KVM's binary-stat names where KVM has one
/// (`pf_taken`, `remote_tlb_flush`, `mmu_invalidate_seq`, ...) and descriptive names otherwise.
pub fn vm_counts(s: &kvmmu::VmStats) -> std::collections::BTreeMap<String, u64> {
    [
        ("pf_taken", s.faults),
        ("fault_retries", s.fault_retries),
        ("remote_tlb_flush", s.remote_tlb_flush),
        ("mmu_invalidate_seq", s.invalidate.seq),
        ("invalidate_starts", s.invalidate_starts),
        ("invalidate_ends", s.invalidate_ends),
        ("memslot_swaps", s.memslot_swaps),
        ("age_calls", s.age_calls),
        ("age_young", s.age_young),
        ("mmu_lock_read_acquisitions", s.mmu_lock.read_acquisitions),
        ("mmu_lock_write_acquisitions", s.mmu_lock.write_acquisitions),
        ("mmu_lock_contended_reads", s.mmu_lock.contended_reads),
        ("mmu_lock_contended_writes", s.mmu_lock.contended_writes),
        ("tdp_leaves_installed", s.tdp.leaves_installed),
        ("tdp_leaves_zapped", s.tdp.leaves_zapped),
        ("tdp_cas_retries", s.tdp.cas_retries),
        ("pages_4k", s.pages_4k),
        ("pages_2m", s.pages_2m),
        ("pages_1g", s.pages_1g),
        ("nx_lpage_splits", s.nx_lpage_splits),
        ("max_mmu_rmap_size", s.max_mmu_rmap_size),
        (
            "rmap_aged_sptes",
            s.shadow.aged_sptes_lockless + s.shadow.aged_sptes_locked,
        ),
        (
            "rmap_lock_contended_writer",
            s.shadow.rmap.lock_contended_writer,
        ),
        (
            "rmap_lock_contended_readonly",
            s.shadow.rmap.lock_contended_readonly,
        ),
        (
            "accessed_cleared",
            s.tdp.accessed_cleared + s.shadow.accessed_cleared,
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// The most vCPU threads any subcommand runs (KVM's selftests go to 512 on large hosts).
pub const MAX_VCPUS: usize = 512;

/// Refuses a vCPU count outside `1..=MAX_VCPUS`, naming the flag (`flag`, e.g. `-v/--vcpus`).
pub fn check_vcpus(flag: &str, vcpus: usize) -> anyhow::Result<()> {
    error::require((1..=MAX_VCPUS).contains(&vcpus), || {
        format!("{flag} must be between 1 and {MAX_VCPUS} (got {vcpus})")
    })
}

/// Refuses a byte size that is not a non-zero multiple of the 4 KiB page, naming the flag.
pub fn check_pages(flag: &str, bytes: u64) -> anyhow::Result<()> {
    use kvmmu::PAGE_SIZE;
    error::require(
        bytes >= PAGE_SIZE && bytes.is_multiple_of(PAGE_SIZE),
        || format!("{flag} must be a non-zero multiple of 4K (4096 bytes; got {bytes})"),
    )
}

/// Refuses an output file the run could not write, before the run starts: `flag` names the
/// option (`--plot`), `extensions` the accepted ones (lower case, without the dot). The
/// directory must exist and take a new file (probed by creating and removing one).
pub fn check_output_path(
    flag: &str,
    path: &std::path::Path,
    extensions: &[&str],
) -> anyhow::Result<()> {
    let shown = path.display();
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    if !extensions.is_empty() && !ext.as_deref().is_some_and(|e| extensions.contains(&e)) {
        let list: Vec<String> = extensions.iter().map(|e| format!(".{e}")).collect();
        return Err(error::usage_hint(
            format!(
                "{flag} {shown}: the file name must end in {}",
                list.join(" or ")
            ),
            format!("e.g. {flag} out{}", list[0]),
        ));
    }
    if path.is_dir() {
        return Err(error::usage(format!(
            "{flag} {shown}: is a directory, not a file"
        )));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(error::usage(format!(
            "{flag} {shown}: directory {} does not exist",
            dir.display()
        )));
    }
    let probe = dir.join(format!(".kvmmu-write-probe-{}", std::process::id()));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(error::usage(format!(
            "{flag} {shown}: cannot write in directory {}: {e}",
            dir.display()
        ))),
    }
}

/// Refuses a frame arena of `frames` 4 KiB frames that the machine could not back: the workloads
/// prefault the whole arena, so asking for more than the available memory would end in the OOM
/// killer rather than an error. Skipped where `/proc/meminfo` cannot be read.
pub fn check_host_memory(frames: u64) -> anyhow::Result<()> {
    let Ok(info) = std::fs::read_to_string("/proc/meminfo") else {
        return Ok(());
    };
    let avail_kib = info
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
    if let Some(kib) = avail_kib {
        let need_kib = frames.saturating_mul(4);
        error::require(need_kib <= kib, || {
            format!(
                "the host's frame arena would need {} MiB, but this machine has {} MiB available",
                need_kib >> 10,
                kib >> 10
            )
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arena_larger_than_available_memory_is_refused() {
        assert!(check_host_memory(16).is_ok());
        if std::path::Path::new("/proc/meminfo").exists() {
            let err = check_host_memory(u64::MAX / 8).unwrap_err().to_string();
            assert!(
                err.contains("frame arena") && err.contains("available"),
                "{err}"
            );
        }
    }

    #[test]
    fn output_paths_are_checked_for_extension_directory_and_writability() {
        let p = std::path::Path::new;
        let ok = std::env::temp_dir().join("kvmmu-check-output.svg");
        assert!(check_output_path("--plot", &ok, &["svg", "png"]).is_ok());
        assert!(!ok.exists(), "checking must not create the file");
        let e = check_output_path("--plot", p("x.jpg"), &["svg", "png"]).unwrap_err();
        assert!(e.to_string().contains(".svg or .png"), "{e}");
        let e = check_output_path("--plot", p("/no/such/dir/x.svg"), &["svg"]).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        assert!(check_output_path("--plot", &std::env::temp_dir(), &[]).is_err());
    }

    #[test]
    fn vm_config_maps_the_flags() {
        let c = vm_config(MmuArg::Tdp, AgingArg::Locked, 32);
        assert_eq!(c.mmu, MmuKind::Tdp);
        assert_eq!(c.aging, AgingMode::Locked);
        assert_eq!(c.tlb_entries, 32);
        assert_eq!(
            vm_config(MmuArg::Shadow, AgingArg::Lockless, 1).mmu,
            MmuKind::Shadow
        );
    }
}
