//! Family 4, statistics: the same workload (populate N pages, re-touch them, drop them with
//! `madvise(MADV_DONTNEED)`, touch them again) on both sides, with KVM's binary statistics
//! (`KVM_GET_STATS_FD` of the VM and of the vCPU) next to kvmmu's `VmStats`, as deltas per phase.
//!
//! Each row says whether the two are the same quantity ([`Relation::Same`], checked for equality)
//! or only related ([`Relation::Related`], printed side by side, never asserted). Today every row
//! is `Related`: on the project's hosts KVM runs this guest in its instruction emulator (the
//! `vcpu.insn_emulation` row), so its MMU counters stay 0; on a host with hardware
//! virtualization `pf_fixed` and `pages_4k` would count the same faults and leaves as kvmmu, up
//! to the shadow MMU's prefetch (docs/kvm-differences.md).

use kvmmu::MmuKind;
use kvmmu::prelude::{MemFlags, MemoryRegion, Vm, VmStats};
use kvmmu::{AsId, Gpa, SlotId};

use super::FamilyError;
use super::setup::{SimSide, real_side};
use crate::guest::Routine;
use crate::hostmem::PAGE;
use crate::runner::{KvmExit, KvmVm};
use crate::stats::KvmStats;

const GPA: u64 = 0x10_0000;

/// Whether a row's two numbers are the same quantity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Relation {
    /// The same events counted by both: must be equal.
    Same,
    /// Related but counted differently: reported only.
    Related,
}

/// One row of the side-by-side table: a delta over one phase.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatsRow {
    /// The phase.
    pub phase: &'static str,
    /// KVM's statistic (`vm.NAME` or `vcpu.NAME`).
    pub kvm_name: &'static str,
    /// Its delta over the phase.
    pub kvm: i64,
    /// kvmmu's field.
    pub kvmmu_name: &'static str,
    /// Its delta over the phase.
    pub kvmmu: i64,
    /// How they relate.
    pub relation: Relation,
}

struct Snap {
    vm: KvmStats,
    vcpu: KvmStats,
    sim: VmStats,
}

fn live_leaves(s: &VmStats, mmu: MmuKind) -> i64 {
    match mmu {
        MmuKind::Tdp => s.tdp.leaves_installed as i64 - s.tdp.leaves_zapped as i64,
        MmuKind::Shadow => s.shadow.leaves_installed as i64 - s.shadow.leaves_zapped as i64,
    }
}

/// Runs the workload over `pages` pages with kvmmu's `mmu`; returns the rows (every phase).
pub fn run(pages: u64, mmu: MmuKind) -> Result<Vec<StatsRow>, FamilyError> {
    let (mut real, buf) = real_side(pages * PAGE, |_| Ok(()))?;
    real.set_user_memory_region(0, 0, 0, GPA, pages * PAGE, buf.base())
        .map_err(FamilyError::setup)?
        .map_err(FamilyError::setup)?;
    let SimSide {
        host,
        vm,
        mut vcpu,
        buf: hva,
    } = SimSide::new(mmu, (pages as usize) * 2 + 64, pages * PAGE, |_| Ok(()))?;
    vm.set_user_memory_region(MemoryRegion {
        slot: SlotId::new(0),
        as_id: AsId::new(0),
        flags: MemFlags::empty(),
        gpa: Gpa::new(GPA),
        size: pages * PAGE,
        hva,
    })
    .map_err(FamilyError::setup)?;
    // Warm the guest's own pages (code, tables) so the phases count only the workload's pages.
    real.run(Routine::Halt, 0, 0, 0)
        .map_err(FamilyError::setup)?;
    let snap = |real: &KvmVm, vm: &Vm| -> Result<Snap, FamilyError> {
        Ok(Snap {
            vm: real.vm_stats().map_err(FamilyError::setup)?,
            vcpu: real.vcpu_stats().map_err(FamilyError::setup)?,
            sim: vm.stats(),
        })
    };
    let mut rows = Vec::new();
    let phases: [&'static str; 4] = ["populate", "re-touch", "madvise(DONTNEED)", "touch again"];
    for phase in phases {
        let before = snap(&real, &vm)?;
        if phase == "madvise(DONTNEED)" {
            buf.madvise_dontneed(0, pages * PAGE)
                .map_err(FamilyError::setup)?;
            host.madvise_dontneed(hva, pages * PAGE)
                .map_err(FamilyError::setup)?;
        } else {
            let out = real
                .run(Routine::StoreStride, GPA, 1, GPA + pages * PAGE)
                .map_err(FamilyError::setup)?;
            if out.exit != KvmExit::Hlt {
                return Err(FamilyError::Setup(format!(
                    "{phase}: guest exited {:?}",
                    out.exit
                )));
            }
            for p in 0..pages {
                vcpu.write_u64(Gpa::new(GPA + p * PAGE), 1)
                    .map_err(FamilyError::setup)?;
            }
        }
        let after = snap(&real, &vm)?;
        let d = |s: &KvmStats, t: &KvmStats, n: &str| {
            t.get(n).unwrap_or(0) as i64 - s.get(n).unwrap_or(0) as i64
        };
        let mut row = |kvm_name, kvm, kvmmu_name, kvmmu, relation| {
            rows.push(StatsRow {
                phase,
                kvm_name,
                kvm,
                kvmmu_name,
                kvmmu,
                relation,
            })
        };
        row(
            "vcpu.pf_fixed",
            d(&before.vcpu, &after.vcpu, "pf_fixed"),
            "faults - fault_retries",
            (after.sim.faults - after.sim.fault_retries) as i64
                - (before.sim.faults - before.sim.fault_retries) as i64,
            Relation::Related,
        );
        row(
            "vcpu.pf_taken",
            d(&before.vcpu, &after.vcpu, "pf_taken"),
            "faults",
            after.sim.faults as i64 - before.sim.faults as i64,
            Relation::Related,
        );
        row(
            "vm.pages_4k",
            d(&before.vm, &after.vm, "pages_4k"),
            "live leaf SPTEs",
            live_leaves(&after.sim, mmu) - live_leaves(&before.sim, mmu),
            Relation::Related,
        );
        row(
            "vm.remote_tlb_flush",
            d(&before.vm, &after.vm, "remote_tlb_flush"),
            "remote_tlb_flush",
            after.sim.remote_tlb_flush as i64 - before.sim.remote_tlb_flush as i64,
            Relation::Related,
        );
        row(
            "vcpu.insn_emulation",
            d(&before.vcpu, &after.vcpu, "insn_emulation"),
            "(kvmmu emulates nothing)",
            0,
            Relation::Related,
        );
        row(
            "vm.mmu_shadow_zapped",
            d(&before.vm, &after.vm, "mmu_shadow_zapped"),
            "shadow.pages_freed",
            after.sim.shadow.pages_freed as i64 - before.sim.shadow.pages_freed as i64,
            Relation::Related,
        );
    }
    Ok(rows)
}

/// The rows as a table.
pub fn render(rows: &[StatsRow]) -> String {
    let mut s = format!(
        "{:<18} {:<22} {:>8}   {:<24} {:>8}  relation\n",
        "phase", "KVM", "delta", "kvmmu", "delta"
    );
    for r in rows {
        s += &format!(
            "{:<18} {:<22} {:>8}   {:<24} {:>8}  {:?}\n",
            r.phase, r.kvm_name, r.kvm, r.kvmmu_name, r.kvmmu, r.relation
        );
    }
    s
}
