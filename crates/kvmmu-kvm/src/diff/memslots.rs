//! Family 1, memslots: random create / delete / move / flag changes, overlaps, unaligned and
//! oversized regions, slot ids and address-space ids at the limits, read-only and dirty-log flags.
//! Every request must be accepted by both or refused by both with the same errno class
//! ([`super::ERRNO_TABLE`]).
//!
//! Addresses are generated symbolically and resolved per side: offsets into each side's own host
//! buffer, and distances below each side's own ends of the host user address space and of the
//! guest physical space ([`HostLimits`], probed on the real host), because kvmmu's simulated host
//! (48-bit gpa, where this host's shadow-paging KVM allows 52) is smaller than the real one. No guest runs in this family, so
//! memslots may point anywhere.

use kvmmu::prelude::{MemFlags, MemoryRegion, Vm, VmConfig};
use kvmmu::{AsId, Gpa, Hva, SlotId};
use kvmmu::{HostConfig, HostMm, Prot};

use super::{Divergence, FamilyError, Rng, Summary, errno_of, replay_command};
use crate::hostmem::{HostRegion, PAGE};
use crate::runner::{HostLimits, KvmVm};

/// Pages of the host buffer each side's slots point into.
const BUF_PAGES: u64 = 64;

/// kvmmu's limits: x86-64's 4-level user address space (`USER_ADDR_END`, as `access_ok`) and
/// its 4-level guest physical space.
pub const KVMMU_LIMITS: HostLimits = HostLimits {
    hva_end: kvmmu::USER_ADDR_END,
    gpa_end: 1 << 48,
};

/// A guest physical address, resolved per side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpaSpec {
    /// The same address on both sides.
    Abs(u64),
    /// `gpa_end - n` bytes on each side.
    EndMinus(u64),
}

/// A host address, resolved per side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HvaSpec {
    /// `buffer base + offset` on each side.
    Buf(u64),
    /// `hva_end - n` bytes on each side.
    EndMinus(u64),
    /// The same address on both sides.
    Abs(u64),
}

/// One `set_user_memory_region` request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotOp {
    /// Address space id (`slot >> 16`).
    pub as_id: u16,
    /// Slot id.
    pub id: u16,
    /// `KVM_MEM_*` flags.
    pub flags: u32,
    /// Guest physical base.
    pub gpa: GpaSpec,
    /// Size in bytes (0 deletes).
    pub size: u64,
    /// Host address.
    pub hva: HvaSpec,
}

fn resolve_gpa(g: GpaSpec, l: &HostLimits) -> u64 {
    match g {
        GpaSpec::Abs(a) => a,
        GpaSpec::EndMinus(n) => l.gpa_end.wrapping_sub(n),
    }
}

fn resolve_hva(h: HvaSpec, base: u64, l: &HostLimits) -> u64 {
    match h {
        HvaSpec::Buf(off) => base + off,
        HvaSpec::EndMinus(n) => l.hva_end.wrapping_sub(n),
        HvaSpec::Abs(a) => a,
    }
}

/// Generates the next request. Most requests are plausible (small slots in a small gpa window, so
/// overlaps, moves and flag flips are frequent); a fifth are at or beyond a limit.
pub fn gen_op(rng: &mut Rng, nr_as: u16, slots: &[u16]) -> SlotOp {
    let pick_id = |rng: &mut Rng| -> u16 {
        if rng.chance(8) {
            [
                SlotId::MAX - 1,
                SlotId::MAX,
                SlotId::MAX + 1,
                u16::MAX,
                slots[0],
            ][rng.below(5) as usize]
        } else {
            slots[rng.below(slots.len() as u64) as usize]
        }
    };
    let as_id = if rng.chance(8) {
        [nr_as.saturating_sub(1), nr_as, nr_as + 1, 255][rng.below(4) as usize]
    } else {
        rng.below(u64::from(nr_as)) as u16
    };
    let id = pick_id(rng);
    let mut flags = [0, 0, 0, 1, 2, 3][rng.below(6) as usize];
    if rng.chance(3) {
        flags |= [4, 8, 1 << 16][rng.below(3) as usize];
    }
    let npages = 1 + rng.below(8);
    let mut size = if rng.chance(15) { 0 } else { npages * PAGE };
    let mut gpa = GpaSpec::Abs(rng.below(64) * PAGE);
    let mut hva = HvaSpec::Buf(rng.below(BUF_PAGES - npages) * PAGE);
    match rng.below(40) {
        0 => size += 1 + rng.below(PAGE - 1),
        1 => gpa = GpaSpec::Abs(rng.below(32) * PAGE + 1 + rng.below(PAGE - 1)),
        2 => hva = HvaSpec::Buf(rng.below(BUF_PAGES - npages) * PAGE + 8),
        3 => size = (kvmmu::KVM_MEM_MAX_NR_PAGES + 1 + rng.below(2)) * PAGE,
        4 => size = !(PAGE - 1),
        5 => gpa = GpaSpec::Abs(!(PAGE - 1)),
        6 => hva = HvaSpec::Abs(!(PAGE - 1)),
        7 | 8 => gpa = GpaSpec::EndMinus(size.max(PAGE) + PAGE * rng.below(3)),
        9 | 10 => gpa = GpaSpec::EndMinus(size.saturating_sub(PAGE).max(PAGE)),
        11 | 12 => hva = HvaSpec::EndMinus(size.max(PAGE) + PAGE * rng.below(3)),
        13 => hva = HvaSpec::EndMinus(size.saturating_sub(PAGE).max(PAGE)),
        _ => {}
    }
    SlotOp {
        as_id,
        id,
        flags,
        gpa,
        size,
        hva,
    }
}

/// Runs `ops` requests from `seed` on a fresh kvmmu VM and a fresh real VM.
pub fn run(seed: u64, ops: usize, test: &str) -> Result<Summary, FamilyError> {
    let probe = KvmVm::open().map_err(FamilyError::setup)?;
    let real_limits = probe.probe_limits().map_err(FamilyError::setup)?;
    drop(probe);
    let real = KvmVm::open().map_err(FamilyError::setup)?;
    let nr_as = real.nr_address_spaces();
    let real_buf = HostRegion::new(BUF_PAGES * PAGE).map_err(FamilyError::setup)?;
    let host = HostMm::new(HostConfig { frames: 1024 }).map_err(FamilyError::setup)?;
    let vm = Vm::new(
        &host,
        VmConfig {
            address_spaces: nr_as,
            ..VmConfig::default()
        },
    )
    .map_err(FamilyError::setup)?;
    let sim_buf = host
        .mmap(BUF_PAGES * PAGE, Prot::READ | Prot::WRITE)
        .map_err(FamilyError::setup)?;
    let slot_ids: Vec<u16> = (0..6).chain([SlotId::MAX - 1]).collect();
    let mut rng = Rng::new(seed);
    let mut summary = Summary::default();
    for index in 0..ops {
        let op = gen_op(&mut rng, nr_as as u16, &slot_ids);
        let kvm = real
            .set_user_memory_region(
                op.as_id,
                op.id,
                op.flags,
                resolve_gpa(op.gpa, &real_limits),
                op.size,
                resolve_hva(op.hva, real_buf.base(), &real_limits),
            )
            .map_err(FamilyError::setup)?;
        let sim = if op.as_id > u16::from(u8::MAX) {
            None
        } else {
            let region = MemoryRegion {
                slot: SlotId::new(op.id),
                as_id: AsId::new(op.as_id as u8),
                flags: MemFlags::from_bits_retain(op.flags),
                gpa: Gpa::new(resolve_gpa(op.gpa, &KVMMU_LIMITS)),
                size: op.size,
                hva: Hva::new(resolve_hva(op.hva, sim_buf.raw(), &KVMMU_LIMITS)),
            };
            // A kvmmu panic (a broken invariant) is an answer too: report it as the divergence.
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                vm.set_user_memory_region(region)
            })) {
                Ok(r) => Some(r),
                Err(p) => {
                    let msg = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    return Err(FamilyError::Divergence(Box::new(Divergence {
                        family: "memslots",
                        seed,
                        index,
                        op: format!("{op:?}"),
                        kvmmu: format!("panicked: {msg}"),
                        kvm: format!("{kvm:?}"),
                        replay: replay_command(test, seed, index + 1),
                    })));
                }
            }
        };
        let sim_errno = match &sim {
            Some(Ok(())) => 0,
            Some(Err(e)) => errno_of(e),
            None => libc::EINVAL,
        };
        let kvm_errno = kvm.err().unwrap_or(0);
        if sim_errno != kvm_errno {
            return Err(FamilyError::Divergence(Box::new(Divergence {
                family: "memslots",
                seed,
                index,
                op: format!("{op:?}"),
                kvmmu: match sim {
                    Some(Ok(())) => "accepted".into(),
                    Some(Err(e)) => format!("refused (errno {sim_errno}): {e}"),
                    None => "refused: as_id does not fit kvmmu's AsId".into(),
                },
                kvm: if kvm_errno == 0 {
                    "accepted".into()
                } else {
                    format!("refused: {}", std::io::Error::from_raw_os_error(kvm_errno))
                },
                replay: replay_command(test, seed, index + 1),
            })));
        }
        summary.ops += 1;
        if kvm_errno == 0 {
            summary.accepted += 1;
        } else {
            summary.refused += 1;
        }
    }
    Ok(summary)
}
