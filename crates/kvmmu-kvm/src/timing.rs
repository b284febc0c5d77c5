//! Timing side by side: the default run's populate / re-touch workload on real KVM and on kvmmu
//! (TDP and shadow), in one process, as per-page costs and ratios to real KVM.
//!
//! One vCPU on each side. Populate writes one word in every page of one memslot (a fault each);
//! re-touch reads one word in the first `hot_percent` of the pages (no faults: the mappings are
//! there). Host memory is populated beforehand on both sides (`MADV_POPULATE_WRITE` for real
//! KVM, `HostMm::prefault` for kvmmu), so a first touch measures the MMU's fault path, not the
//! host's page allocator. Each configuration runs `runs` times, alternated; medians are reported.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvmmu::MmuKind;
use kvmmu::prelude::{MemFlags, MemoryRegion, Vm, VmConfig};
use kvmmu::{AsId, Gpa, SlotId};
use kvmmu::{HostConfig, HostMm, Prot};

use crate::guest::{GUEST_GPA_LIMIT, Routine};
use crate::hostmem::{HostRegion, PAGE};
use crate::runner::{KvmExit, KvmVm};

/// Guest physical base of the workload's memslot.
const GPA: u64 = 0x4000_0000;

/// Why the timing workload could not run.
#[derive(Debug, thiserror::Error)]
pub enum TimingError {
    /// Real KVM is not available here.
    #[error(transparent)]
    Unavailable(#[from] crate::runner::KvmUnavailable),
    /// The guest memory does not fit under the identity map (`GUEST_GPA_LIMIT`).
    #[error("{bytes:#x} bytes of guest memory do not fit (at most {max:#x})")]
    TooLarge {
        /// Requested bytes.
        bytes: u64,
        /// The maximum.
        max: u64,
    },
    /// A side failed.
    #[error("{side}: {detail}")]
    Side {
        /// Which side.
        side: &'static str,
        /// What happened.
        detail: String,
    },
}

fn side(side: &'static str) -> impl Fn(&dyn std::fmt::Display) -> TimingError {
    move |e| TimingError::Side {
        side,
        detail: e.to_string(),
    }
}

/// What to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimingConfig {
    /// Guest memory in bytes (a multiple of 4 KiB).
    pub bytes: u64,
    /// Percentage of the pages re-touched.
    pub hot_percent: u8,
    /// Runs per configuration.
    pub runs: usize,
}

/// Which backend a row measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// Real KVM on `/dev/kvm`.
    Kvm,
    /// kvmmu, TDP MMU.
    KvmmuTdp,
    /// kvmmu, shadow MMU.
    KvmmuShadow,
}

impl Backend {
    /// Every backend, real KVM first (ratios are to it).
    pub const ALL: [Backend; 3] = [Backend::Kvm, Backend::KvmmuTdp, Backend::KvmmuShadow];

    /// A short name.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Kvm => "kvm",
            Backend::KvmmuTdp => "kvmmu-tdp",
            Backend::KvmmuShadow => "kvmmu-shadow",
        }
    }
}

/// Per-page medians of one backend.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct TimingRow {
    /// The backend.
    pub backend: Backend,
    /// Populate: nanoseconds per page (one fault each).
    pub populate_ns_per_page: f64,
    /// Re-touch: nanoseconds per page (no fault).
    pub retouch_ns_per_page: f64,
    /// `populate_ns_per_page` over real KVM's.
    pub populate_ratio: f64,
    /// `retouch_ns_per_page` over real KVM's.
    pub retouch_ratio: f64,
}

/// One run: populate and re-touch durations.
type Sample = (Duration, Duration);

fn run_kvm(pages: u64, hot: u64) -> Result<Sample, TimingError> {
    let s = side("kvm");
    let mut vm = KvmVm::open()?;
    vm.enable_guest().map_err(|e| s(&e))?;
    let buf = Arc::new(HostRegion::new(pages * PAGE).map_err(|e| s(&e))?);
    buf.populate_write().map_err(|e| s(&e))?;
    vm.adopt(Arc::clone(&buf));
    vm.set_user_memory_region(0, 0, 0, GPA, pages * PAGE, buf.base())
        .map_err(|e| s(&e))?
        .map_err(|e| s(&std::io::Error::from_raw_os_error(e)))?;
    vm.run(Routine::Halt, 0, 0, 0).map_err(|e| s(&e))?;
    let mut timed = |r: Routine, n: u64| -> Result<Duration, TimingError> {
        let t = Instant::now();
        let out = vm.run(r, GPA, 1, GPA + n * PAGE).map_err(|e| s(&e))?;
        let d = t.elapsed();
        if out.exit != KvmExit::Hlt {
            return Err(s(&format!("guest exited {:?}", out.exit)));
        }
        Ok(d)
    };
    Ok((
        timed(Routine::StoreStride, pages)?,
        timed(Routine::LoadStride, hot)?,
    ))
}

fn run_kvmmu(pages: u64, hot: u64, mmu: MmuKind) -> Result<Sample, TimingError> {
    let s = side(if mmu == MmuKind::Tdp {
        "kvmmu-tdp"
    } else {
        "kvmmu-shadow"
    });
    let host = HostMm::new(HostConfig {
        frames: (pages + 1024) as usize,
    })
    .map_err(|e| s(&e))?;
    host.prefault().map_err(|e| s(&e))?;
    let vm = Vm::new(
        &host,
        VmConfig {
            mmu,
            ..VmConfig::default()
        },
    )
    .map_err(|e| s(&e))?;
    let hva = host
        .mmap(pages * PAGE, Prot::READ | Prot::WRITE)
        .map_err(|e| s(&e))?;
    vm.set_user_memory_region(MemoryRegion {
        slot: SlotId::new(0),
        as_id: AsId::new(0),
        flags: MemFlags::empty(),
        gpa: Gpa::new(GPA),
        size: pages * PAGE,
        hva,
    })
    .map_err(|e| s(&e))?;
    let mut vcpu = vm.create_vcpu().map_err(|e| s(&e))?;
    let mut g = vcpu.enter();
    let t = Instant::now();
    for p in 0..pages {
        g.write_u64(Gpa::new(GPA + p * PAGE), 1)
            .map_err(|e| s(&e))?;
    }
    let populate = t.elapsed();
    let t = Instant::now();
    for p in 0..hot {
        g.read_u64(Gpa::new(GPA + p * PAGE)).map_err(|e| s(&e))?;
    }
    Ok((populate, t.elapsed()))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// Runs every backend `cfg.runs` times, alternated, and returns one row per backend.
pub fn run(cfg: &TimingConfig) -> Result<Vec<TimingRow>, TimingError> {
    let max = GUEST_GPA_LIMIT - GPA;
    if cfg.bytes == 0 || cfg.bytes > max || !cfg.bytes.is_multiple_of(PAGE) {
        return Err(TimingError::TooLarge {
            bytes: cfg.bytes,
            max,
        });
    }
    let pages = cfg.bytes / PAGE;
    let hot = pages * u64::from(cfg.hot_percent.min(100)) / 100;
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); Backend::ALL.len()];
    for _ in 0..cfg.runs.max(1) {
        for (k, b) in Backend::ALL.iter().enumerate() {
            let sample = match b {
                Backend::Kvm => {
                    let _g = crate::kvm_lock();
                    run_kvm(pages, hot)?
                }
                Backend::KvmmuTdp => run_kvmmu(pages, hot, MmuKind::Tdp)?,
                Backend::KvmmuShadow => run_kvmmu(pages, hot, MmuKind::Shadow)?,
            };
            samples[k].push(sample);
        }
    }
    let per_page = |d: Duration, n: u64| d.as_nanos() as f64 / n.max(1) as f64;
    let meds: Vec<(f64, f64)> = samples
        .into_iter()
        .map(|s| {
            (
                per_page(median(s.iter().map(|x| x.0).collect()), pages),
                per_page(median(s.iter().map(|x| x.1).collect()), hot),
            )
        })
        .collect();
    let (kp, kr) = meds[0];
    Ok(Backend::ALL
        .iter()
        .zip(meds)
        .map(|(b, (p, r))| TimingRow {
            backend: *b,
            populate_ns_per_page: p,
            retouch_ns_per_page: r,
            populate_ratio: p / kp,
            retouch_ratio: if kr > 0.0 { r / kr } else { f64::NAN },
        })
        .collect())
}

/// The rows as a table.
pub fn render(rows: &[TimingRow], cfg: &TimingConfig) -> String {
    let pages = cfg.bytes / PAGE;
    let mut s = format!(
        "populate {pages} pages, re-touch {}% (medians of {} runs; ratios to real KVM)\n",
        cfg.hot_percent,
        cfg.runs.max(1)
    );
    s += &format!(
        "{:<14} {:>16} {:>9} {:>16} {:>9}\n",
        "backend", "populate ns/page", "ratio", "re-touch ns/page", "ratio"
    );
    for r in rows {
        s += &format!(
            "{:<14} {:>16.1} {:>8.3}x {:>16.1} {:>8.3}x\n",
            r.backend.name(),
            r.populate_ns_per_page,
            r.populate_ratio,
            r.retouch_ns_per_page,
            r.retouch_ratio
        );
    }
    s
}
