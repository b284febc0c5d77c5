//! Family 2, guest-visible data and exits: writes, reads and batches of writes through several
//! slots (some aliasing the same host pages, some read-only), with host `munmap`, `mprotect` RO/RW,
//! `madvise(MADV_DONTNEED)`, `mmap(MAP_FIXED)` at the same address and memslot changes in between.
//! Every access must give the same value and the same exit kind on both sides.
//!
//! Host operations act on whole chunks of the host buffer, only where both hosts can do them the
//! same way (kvmmu's `munmap` needs a mapped range and its `mmap_fixed` replaces nothing, so a
//! remap of a mapped chunk is `munmap` + `mmap_fixed` on kvmmu, one `MAP_FIXED` on Linux).

use std::sync::Arc;

use kvmmu::MmuKind;
use kvmmu::Prot;
use kvmmu::VcpuExit;
use kvmmu::prelude::{MemFlags, MemoryRegion, Vm};
use kvmmu::{AsId, Gpa, Hva, SlotId};

use super::access::{self, Answer, GuestAccess, SimAnswer};
use super::setup::{SimSide, real_side};
use super::{Divergence, FamilyError, Rng, Summary, errno_of, replay_command};
use crate::guest::Routine;
use crate::hostmem::{HostProt, HostRegion, PAGE};
use crate::runner::{KvmExit, KvmVm};

/// Pages per chunk of the host buffer (a hole stays within `hostmem::MAX_HOLE`).
const CHUNK_PAGES: u64 = 4;
/// Chunks in the host buffer.
const CHUNKS: u64 = 8;
const BUF_PAGES: u64 = CHUNK_PAGES * CHUNKS;
/// Guest physical window the slots live in.
const GPA_BASE: u64 = 0x10_0000;
const GPA_PAGES: u64 = 96;
/// Slot ids the family uses.
const SLOTS: u16 = 5;

/// The kind of an access's outcome, the vocabulary both sides are decoded into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The access completed; a read carries its value.
    Done(Option<u64>),
    /// KVM_EXIT_MMIO / kvmmu's `NoMemslot` or `ReadonlyMemslot`.
    Mmio,
    /// `KVM_RUN` `-EFAULT` / kvmmu's `HostFault`.
    HostFault,
    /// Anything else (a harness problem or a kvmmu bug such as a stale translation).
    Other,
}

/// One operation of the sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataOp {
    /// A guest access (write, read or batch of writes).
    Access(GuestAccess),
    /// Create or change a slot (or delete it with `pages == 0`).
    Slot {
        /// Slot id.
        id: u16,
        /// Read-only.
        readonly: bool,
        /// Dirty logging (`KVM_MEM_LOG_DIRTY_PAGES`).
        dirty: bool,
        /// First guest page in the window.
        gpa_page: u64,
        /// First page in the host buffer.
        buf_page: u64,
        /// Pages (0 deletes).
        pages: u64,
    },
    /// `munmap` of a mapped chunk.
    Munmap {
        /// Chunk.
        chunk: u64,
    },
    /// `mmap(MAP_FIXED)` of fresh read-write memory over a chunk.
    Remap {
        /// Chunk.
        chunk: u64,
    },
    /// `mprotect` of a mapped chunk.
    Mprotect {
        /// Chunk.
        chunk: u64,
        /// Read-only (else read-write).
        readonly: bool,
    },
    /// `madvise(MADV_DONTNEED)` of a mapped chunk.
    Dontneed {
        /// Chunk.
        chunk: u64,
    },
}

/// How the real host reports a guest access to host memory it refuses (unmapped, or a write to a
/// read-only mapping): probed once per run, see docs/kvm-differences.md.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostFaultStyle {
    /// `KVM_RUN` fails with `-EFAULT` (the kernel's documented behaviour).
    Efault,
    /// The access exits as MMIO (seen on nested, shadow-paging hosts).
    Mmio,
}

struct Sides {
    real: KvmVm,
    real_buf: Arc<HostRegion>,
    sim: SimSide,
    mapped: [bool; CHUNKS as usize],
    fault_style: HostFaultStyle,
}

fn kvm_outcome(a: &Answer<KvmExit>) -> Outcome {
    match a.exit {
        KvmExit::Hlt => Outcome::Done(a.value),
        KvmExit::Mmio { .. } => Outcome::Mmio,
        KvmExit::HostFault { .. } => Outcome::HostFault,
        KvmExit::Other(_) => Outcome::Other,
    }
}

fn sim_outcome(a: &SimAnswer) -> Outcome {
    match &a.exit {
        None => Outcome::Done(a.value),
        Some(VcpuExit::NoMemslot { .. } | VcpuExit::ReadonlyMemslot { .. }) => Outcome::Mmio,
        Some(VcpuExit::HostFault { .. }) => Outcome::HostFault,
        Some(_) => Outcome::Other,
    }
}

impl Sides {
    fn new(mmu: MmuKind) -> Result<Sides, FamilyError> {
        let (real, real_buf) = real_side(BUF_PAGES * PAGE, |_| Ok(()))?;
        let sim = SimSide::new(mmu, 1024, BUF_PAGES * PAGE, |_| Ok(()))?;
        let mut sides = Sides {
            real,
            real_buf,
            sim,
            mapped: [true; CHUNKS as usize],
            fault_style: HostFaultStyle::Efault,
        };
        sides.fault_style = sides.probe_fault_style()?;
        Ok(sides)
    }

    /// Reads through a slot whose only page is unmapped, to learn how this host reports it.
    fn probe_fault_style(&mut self) -> Result<HostFaultStyle, FamilyError> {
        let off = (CHUNKS - 1) * CHUNK_PAGES * PAGE;
        self.real_buf
            .munmap(off, PAGE)
            .map_err(FamilyError::setup)?;
        self.real
            .set_user_memory_region(0, 0, 0, GPA_BASE, PAGE, self.real_buf.base() + off)
            .map_err(FamilyError::setup)?
            .map_err(FamilyError::setup)?;
        let out = self
            .real
            .run(Routine::Load, GPA_BASE, 0, 0)
            .map_err(FamilyError::setup)?;
        self.real
            .set_user_memory_region(0, 0, 0, 0, 0, 0)
            .map_err(FamilyError::setup)?
            .map_err(FamilyError::setup)?;
        self.real_buf
            .mmap_fixed(off, PAGE, HostProt::ReadWrite)
            .map_err(FamilyError::setup)?;
        match out.exit {
            KvmExit::HostFault { .. } => Ok(HostFaultStyle::Efault),
            KvmExit::Mmio { .. } => Ok(HostFaultStyle::Mmio),
            other => Err(FamilyError::Setup(format!(
                "probe of an unmapped page gave {other:?}"
            ))),
        }
    }

    /// Whether `sim` (kvmmu) and `kvm` outcomes agree, given how this host reports host faults.
    fn agree(&self, sim: Outcome, kvm: Outcome) -> bool {
        sim == kvm
            || (self.fault_style == HostFaultStyle::Mmio
                && sim == Outcome::HostFault
                && kvm == Outcome::Mmio)
    }

    fn apply(&mut self, op: &DataOp) -> Result<(String, String, bool), FamilyError> {
        let chunk_off = |c: u64| c * CHUNK_PAGES * PAGE;
        let len = CHUNK_PAGES * PAGE;
        let sim_at = |base: Hva, off: u64| Hva::new(base.raw() + off);
        Ok(match op {
            DataOp::Access(a) => {
                let (s, mut k) = access::run_both(&mut self.real, &mut self.sim.vcpu, a)?;
                let so = sim_outcome(&s);
                let mut ko = kvm_outcome(&k.answer);
                if matches!(a, GuestAccess::Read { .. })
                    && so == Outcome::HostFault
                    && !self.agree(so, ko)
                {
                    // Once, under heavy load, the real host completed a read of a page this
                    // process had unmapped (docs/kvm-differences.md, "a read of unmapped memory
                    // that succeeds"): ask the real side once more before calling it a divergence.
                    std::thread::sleep(std::time::Duration::from_millis(1));
                    k = access::run_kvm(&mut self.real, a)?;
                    ko = kvm_outcome(&k.answer);
                }
                let ok = s.done == k.answer.done && self.agree(so, ko);
                let sim = match a {
                    // Counted as refused by `run` whatever the outcome, as before the batch
                    // shared its executor.
                    GuestAccess::Batch { .. } => format!("{} ({so:?})", s.describe(a)),
                    _ => format!("{so:?} {}", s.describe(a)),
                };
                (sim, format!("{ko:?} {}", k.describe()), ok)
            }
            DataOp::Slot {
                id,
                readonly,
                dirty,
                gpa_page,
                buf_page,
                pages,
            } => {
                let mut flags = if *readonly {
                    MemFlags::READONLY
                } else {
                    MemFlags::empty()
                };
                if *dirty {
                    flags |= MemFlags::LOG_DIRTY_PAGES;
                }
                let gpa = GPA_BASE + gpa_page * PAGE;
                let (size, off) = (pages * PAGE, buf_page * PAGE);
                let real_hva = if *pages == 0 {
                    0
                } else {
                    self.real_buf.base() + off
                };
                let sim_hva = if *pages == 0 {
                    Hva::new(0)
                } else {
                    sim_at(self.sim.buf, off)
                };
                let k = self
                    .real
                    .set_user_memory_region(0, *id, flags.bits(), gpa, size, real_hva)
                    .map_err(FamilyError::setup)?;
                let s = self.sim.vm.set_user_memory_region(MemoryRegion {
                    slot: SlotId::new(*id),
                    as_id: AsId::new(0),
                    flags,
                    gpa: Gpa::new(gpa),
                    size,
                    hva: sim_hva,
                });
                let se = s.as_ref().err().map(errno_of).unwrap_or(0);
                let ke = k.err().unwrap_or(0);
                (format!("errno {se} {s:?}"), format!("errno {ke}"), se == ke)
            }
            DataOp::Munmap { chunk } => {
                self.real_buf
                    .munmap(chunk_off(*chunk), len)
                    .map_err(FamilyError::setup)?;
                let s = self
                    .sim
                    .host
                    .munmap(sim_at(self.sim.buf, chunk_off(*chunk)), len);
                self.mapped[*chunk as usize] = false;
                (format!("{s:?}"), "Ok".into(), s.is_ok())
            }
            DataOp::Remap { chunk } => {
                self.real_buf
                    .mmap_fixed(chunk_off(*chunk), len, HostProt::ReadWrite)
                    .map_err(FamilyError::setup)?;
                let at = sim_at(self.sim.buf, chunk_off(*chunk));
                let unmapped = if self.mapped[*chunk as usize] {
                    self.sim.host.munmap(at, len).map(|_| ())
                } else {
                    Ok(())
                };
                let s = unmapped
                    .and_then(|()| self.sim.host.mmap_fixed(at, len, Prot::READ | Prot::WRITE));
                self.mapped[*chunk as usize] = true;
                (format!("{s:?}"), "Ok".into(), s.is_ok())
            }
            DataOp::Mprotect { chunk, readonly } => {
                let (hp, sp) = if *readonly {
                    (HostProt::Read, Prot::READ)
                } else {
                    (HostProt::ReadWrite, Prot::READ | Prot::WRITE)
                };
                self.real_buf
                    .mprotect(chunk_off(*chunk), len, hp)
                    .map_err(FamilyError::setup)?;
                let s = self
                    .sim
                    .host
                    .mprotect(sim_at(self.sim.buf, chunk_off(*chunk)), len, sp);
                (format!("{s:?}"), "Ok".into(), s.is_ok())
            }
            DataOp::Dontneed { chunk } => {
                self.real_buf
                    .madvise_dontneed(chunk_off(*chunk), len)
                    .map_err(FamilyError::setup)?;
                let s = self
                    .sim
                    .host
                    .madvise_dontneed(sim_at(self.sim.buf, chunk_off(*chunk)), len);
                (format!("{s:?}"), "Ok".into(), s.is_ok())
            }
        })
    }
}

fn gen_gpa(rng: &mut Rng, vm: &Vm) -> u64 {
    let slots = vm.memslots(AsId::new(0)).unwrap_or_default();
    let in_slot = slots
        .iter()
        .filter(|s| s.id().get() < SLOTS)
        .collect::<Vec<_>>();
    let page = if !in_slot.is_empty() && rng.chance(80) {
        let s = in_slot[rng.below(in_slot.len() as u64) as usize];
        s.base_gfn().raw() + rng.below(s.npages())
    } else {
        GPA_BASE / PAGE + rng.below(GPA_PAGES + 4)
    };
    // A few word offsets per page, so that reads meet earlier writes often.
    page * PAGE + [0, 8, 0x800, 0xff8][rng.below(4) as usize]
}

/// A change of an existing slot: a move (same host range, new gpa) or a flip of the dirty-log
/// flag, as KVM's `KVM_MR_MOVE` and `KVM_MR_FLAGS_ONLY`.
fn gen_slot_change(rng: &mut Rng, vm: &Vm, sim_buf: Hva) -> Option<DataOp> {
    let slots = vm.memslots(AsId::new(0)).unwrap_or_default();
    let ours: Vec<_> = slots.iter().filter(|s| s.id().get() < SLOTS).collect();
    let s = ours.get(rng.below(ours.len().max(1) as u64) as usize)?;
    let off = s.userspace_addr().raw().checked_sub(sim_buf.raw())?;
    let flags = s.flags();
    let (gpa_page, dirty) = if rng.chance(60) {
        (
            rng.below(GPA_PAGES - 12),
            flags.contains(MemFlags::LOG_DIRTY_PAGES),
        )
    } else {
        (
            s.base_gfn().raw() - GPA_BASE / PAGE,
            !flags.contains(MemFlags::LOG_DIRTY_PAGES),
        )
    };
    Some(DataOp::Slot {
        id: s.id().get(),
        readonly: flags.contains(MemFlags::READONLY),
        dirty,
        gpa_page,
        buf_page: off / PAGE,
        pages: s.npages(),
    })
}

/// Generates the next operation; `mapped` says which chunks are mapped on both hosts, `written`
/// holds recently written gpas (half the reads go there).
pub fn gen_op(rng: &mut Rng, vm: &Vm, sim_buf: Hva, mapped: &[bool], written: &[u64]) -> DataOp {
    let chunk = rng.below(CHUNKS);
    if rng.chance(6)
        && let Some(op) = gen_slot_change(rng, vm, sim_buf)
    {
        return op;
    }
    let is_mapped = mapped[chunk as usize];
    match rng.below(100) {
        0..=29 => DataOp::Access(GuestAccess::Write {
            gpa: gen_gpa(rng, vm),
            value: rng.next_u64(),
        }),
        30..=44 if !written.is_empty() => DataOp::Access(GuestAccess::Read {
            gpa: written[rng.below(written.len() as u64) as usize],
        }),
        30..=59 => DataOp::Access(GuestAccess::Read {
            gpa: gen_gpa(rng, vm),
        }),
        60..=67 => {
            let n = 1 + rng.below(12);
            DataOp::Access(GuestAccess::Batch {
                gpas: (0..n).map(|_| gen_gpa(rng, vm)).collect(),
                base: rng.next_u64() >> 8,
            })
        }
        68..=81 => {
            let pages = if rng.chance(20) { 0 } else { 1 + rng.below(12) };
            DataOp::Slot {
                id: rng.below(u64::from(SLOTS)) as u16,
                readonly: rng.chance(25),
                dirty: rng.chance(20),
                gpa_page: rng.below(GPA_PAGES - 12),
                buf_page: rng.below(BUF_PAGES - 12),
                pages,
            }
        }
        82..=85 if is_mapped => DataOp::Munmap { chunk },
        82..=87 => DataOp::Remap { chunk },
        88..=93 if is_mapped => DataOp::Mprotect {
            chunk,
            readonly: rng.chance(50),
        },
        _ if is_mapped => DataOp::Dontneed { chunk },
        _ => DataOp::Remap { chunk },
    }
}

/// Runs `ops` operations from `seed` with kvmmu's `mmu` against real KVM.
pub fn run(seed: u64, ops: usize, mmu: MmuKind, test: &str) -> Result<Summary, FamilyError> {
    let mut sides = Sides::new(mmu)?;
    let mut rng = Rng::new(seed);
    let mut summary = Summary::default();
    let mut written: Vec<u64> = Vec::new();
    for index in 0..ops {
        let op = gen_op(
            &mut rng,
            &sides.sim.vm,
            sides.sim.buf,
            &sides.mapped,
            &written,
        );
        if let DataOp::Access(a) = &op {
            written.extend(a.written());
        }
        if written.len() > 64 {
            written.drain(..written.len() - 64);
        }
        let (sim, kvm, ok) = sides.apply(&op)?;
        if !ok {
            return Err(FamilyError::Divergence(Box::new(Divergence {
                family: "data",
                seed,
                index,
                op: format!(
                    "{op:?} (kvmmu {mmu:?}, host faults reported as {:?})",
                    sides.fault_style
                ),
                kvmmu: sim,
                kvm,
                replay: replay_command(test, seed, index + 1),
            })));
        }
        summary.ops += 1;
        if sim.starts_with("Done") || sim.starts_with("Ok") || sim.starts_with("errno 0") {
            summary.accepted += 1;
        } else {
            summary.refused += 1;
        }
    }
    Ok(summary)
}
