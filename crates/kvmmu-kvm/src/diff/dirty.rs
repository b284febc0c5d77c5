//! Family 3, dirty logging: one seeded sequence of guest writes (single stores and batches through
//! the guest's `StoreList`), reads, harvests, manual clears and dirty-log flag flips on a few
//! slots, run on kvmmu and on real KVM. Every harvest must return the same bitmap on both sides,
//! and every request the same accept/refuse (errno class, [`errno_of_dirty`]).
//!
//! Modes ([`DirtyMode`]): classic (`KVM_GET_DIRTY_LOG` returns and re-arms), manual protect
//! (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`, with or without `INITIALLY_SET`: GET only returns,
//! `KVM_CLEAR_DIRTY_LOG` re-arms 64-page-aligned ranges through a mask), and the dirty ring
//! (`KVM_CAP_DIRTY_LOG_RING`, only where the host offers it, [`ring_supported`]): each harvest
//! collects and resets the ring on both sides and compares the *set* of `(slot, page)` pushed
//! since the last one (KVM's emulator pushes a page once per emulated write, kvmmu once per
//! write fault; docs/kvm-differences.md).
//!
//! The guest's page tables, GDT, code, stack and gpa list live in the reserved region, whose slot
//! never logs, so KVM's own accesses there cannot show in a compared bitmap; the test slots are
//! compared exactly.

use std::collections::BTreeSet;

use kvmmu::prelude::{MemFlags, MemoryRegion};
use kvmmu::{AsId, DirtyLogError, DirtyLogProtect, Gpa, Hva, MmuKind, SlotId};

use super::access::{self, GuestAccess};
use super::setup::{SimSide, real_side};
use super::{Divergence, FamilyError, Rng, Summary, errno_of, replay_command};
use crate::hostmem::PAGE;
use crate::runner::KvmVm;

/// Guest physical base of the test slots.
const GPA_BASE: u64 = 0x10_0000;
/// The test slots: (id, first page from [`GPA_BASE`] and in the host buffer, pages). Sizes
/// exactly one bitmap word, a non-multiple of 64 (a partial last word) and several words; slot 3
/// starts without logging.
const SLOTS: [(u16, u64, u64); 4] = [(0, 0, 64), (1, 80, 100), (2, 200, 130), (3, 340, 24)];
/// Pages of the host buffer (and of the guest window the writes aim at, gaps included).
const BUF_PAGES: u64 = 364;

/// How the run logs and harvests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirtyMode {
    /// Bitmaps, harvested with `KVM_GET_DIRTY_LOG` (classic or manual protect).
    Bitmap(DirtyLogProtect),
    /// Per-vCPU dirty rings (`KVM_CAP_DIRTY_LOG_RING`).
    Ring,
}

/// Ring size of the ring mode, in entries (1 MiB of `kvm_dirty_gfn`s; harvests come every few
/// operations, so it never fills).
const RING_ENTRIES: u32 = 1 << 16;

/// One operation of the sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DirtyOp {
    /// A guest access (write, read, which must dirty nothing, or batch of writes).
    Access(GuestAccess),
    /// `KVM_GET_DIRTY_LOG` of a slot: the bitmaps are compared.
    Harvest {
        /// Slot id.
        slot: u16,
    },
    /// `KVM_CLEAR_DIRTY_LOG` (manual protect only).
    Clear {
        /// Slot id.
        slot: u16,
        /// First page (offset in the slot).
        first_page: u64,
        /// Pages.
        num_pages: u32,
        /// Mask, word `i` bit `b` = page `first_page + 64 * i + b`.
        mask: Vec<u64>,
    },
    /// Ring mode: collect and reset the rings; the sets of dirtied pages are compared.
    HarvestRing,
    /// Flips `KVM_MEM_LOG_DIRTY_PAGES` of a slot (a flags-only change).
    Toggle {
        /// Slot id.
        slot: u16,
        /// Logging after the change.
        log: bool,
    },
}

/// The errno KVM returns for a dirty-log request kvmmu refused with `e`: no slot or no bitmap is
/// `-ENOENT` (`kvm_get_dirty_log_protect`, `kvm_clear_dirty_log_protect`), a malformed range or
/// mask `-EINVAL`, a VM on the dirty ring `-ENXIO`.
pub fn errno_of_dirty(e: &DirtyLogError) -> i32 {
    match e {
        DirtyLogError::NoSuchSlot { .. } | DirtyLogError::NotLogging { .. } => libc::ENOENT,
        DirtyLogError::NotManualProtect
        | DirtyLogError::UnalignedRange { .. }
        | DirtyLogError::RangePastSlot { .. }
        | DirtyLogError::MaskTooShort { .. } => libc::EINVAL,
        DirtyLogError::RingInUse => libc::ENXIO,
        _ => -1,
    }
}

/// Whether this host's KVM offers the dirty ring (`KVM_CAP_DIRTY_LOG_RING`); the family compares
/// bitmaps only, so a caller prints one line and skips the ring either way when this is false.
pub fn ring_supported(real: &KvmVm) -> bool {
    real.check_extension(kvm_bindings::KVM_CAP_DIRTY_LOG_RING) > 0
}

struct Sides {
    real: KvmVm,
    sim: SimSide,
    real_base: u64,
    logging: [bool; SLOTS.len()],
    /// The last bitmap harvested per slot (masks of clears are drawn from it).
    last: [Vec<u64>; SLOTS.len()],
    mode: DirtyMode,
}

fn flags(log: bool) -> MemFlags {
    if log {
        MemFlags::LOG_DIRTY_PAGES
    } else {
        MemFlags::empty()
    }
}

impl Sides {
    fn new(mmu: MmuKind, mode: DirtyMode) -> Result<Sides, FamilyError> {
        let (real, real_buf) = real_side(BUF_PAGES * PAGE, |real| {
            if mode == DirtyMode::Ring {
                real.enable_dirty_ring(RING_ENTRIES * 16).map_err(|e| {
                    FamilyError::Setup(format!("KVM_CAP_DIRTY_LOG_RING: errno {e}"))
                })?;
            }
            Ok(())
        })?;
        let real_base = real_buf.base();
        let sim = SimSide::new(mmu, 1024, BUF_PAGES * PAGE, |vm| {
            if mode == DirtyMode::Ring {
                vm.enable_dirty_ring(RING_ENTRIES)
                    .map_err(FamilyError::setup)?;
            }
            Ok(())
        })?;
        if let DirtyMode::Bitmap(protect) = mode {
            if let DirtyLogProtect::Manual { initially_set } = protect {
                real.enable_manual_dirty_log_protect(initially_set)
                    .map_err(|e| {
                        FamilyError::Setup(format!("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: errno {e}"))
                    })?;
            }
            sim.vm
                .set_dirty_log_protect(protect)
                .map_err(FamilyError::setup)?;
        }
        let mut sides = Sides {
            real,
            sim,
            real_base,
            logging: [false; SLOTS.len()],
            last: Default::default(),
            mode,
        };
        for (i, &(id, _, _)) in SLOTS.iter().enumerate() {
            let (s, k) = sides.set_slot(i, id != 3)?;
            if !(s.starts_with("errno 0") && k == "errno 0") {
                return Err(FamilyError::Setup(format!(
                    "creating slot {id}: kvmmu {s}, kvm {k}"
                )));
            }
        }
        Ok(sides)
    }

    /// Creates slot `i` or changes its logging flag, on both sides.
    fn set_slot(&mut self, i: usize, log: bool) -> Result<(String, String), FamilyError> {
        let (id, first, pages) = SLOTS[i];
        let gpa = GPA_BASE + first * PAGE;
        let k = self
            .real
            .set_user_memory_region(
                0,
                id,
                flags(log).bits(),
                gpa,
                pages * PAGE,
                self.real_base + first * PAGE,
            )
            .map_err(FamilyError::setup)?;
        let s = self.sim.vm.set_user_memory_region(MemoryRegion {
            slot: SlotId::new(id),
            as_id: AsId::new(0),
            flags: flags(log),
            gpa: Gpa::new(gpa),
            size: pages * PAGE,
            hva: Hva::new(self.sim.buf.raw() + first * PAGE),
        });
        if s.is_ok() && k.is_ok() {
            self.logging[i] = log;
        }
        let se = s.as_ref().err().map(errno_of).unwrap_or(0);
        Ok((
            format!("errno {se} {s:?}"),
            format!("errno {}", k.err().unwrap_or(0)),
        ))
    }

    fn apply(&mut self, op: &DirtyOp) -> Result<(String, String, bool), FamilyError> {
        let errno = |r: &Result<(), i32>| r.err().unwrap_or(0);
        Ok(match op {
            DirtyOp::Access(a) => {
                let (s, k) = access::run_both(&mut self.real, &mut self.sim.vcpu, a)?;
                let ok = s.completed() == k.completed()
                    && s.done == k.answer.done
                    && s.value == k.answer.value;
                (s.describe(a), k.describe(), ok)
            }
            DirtyOp::Harvest { slot } => {
                let (id, _, pages) = SLOTS[usize::from(*slot)];
                let k = self.real.get_dirty_log(0, id, pages);
                let s = self.sim.vm.get_dirty_log(AsId::new(0), SlotId::new(id));
                if let Ok(bm) = &s {
                    self.last[usize::from(*slot)] = bm.clone();
                }
                let ok = match (&s, &k) {
                    (Ok(a), Ok(b)) => a == b,
                    (Err(e), Err(n)) => errno_of_dirty(e) == *n,
                    _ => false,
                };
                (
                    show_bitmap(&s.map_err(|e| errno_of_dirty(&e))),
                    show_bitmap(&k),
                    ok,
                )
            }
            DirtyOp::Clear {
                slot,
                first_page,
                num_pages,
                mask,
            } => {
                let id = SLOTS[usize::from(*slot)].0;
                let k = self
                    .real
                    .clear_dirty_log(0, id, *first_page, *num_pages, mask);
                let s = self.sim.vm.clear_dirty_log(
                    AsId::new(0),
                    SlotId::new(id),
                    *first_page,
                    u64::from(*num_pages),
                    mask,
                );
                let se = s.as_ref().err().map(errno_of_dirty).unwrap_or(0);
                (
                    format!("errno {se} {s:?}"),
                    format!("errno {}", errno(&k)),
                    se == errno(&k),
                )
            }
            DirtyOp::HarvestRing => {
                let k = self.real.harvest_dirty_ring().map_err(FamilyError::setup)?;
                let s = self.sim.vm.collect_dirty_rings();
                let r = self.sim.vm.reset_dirty_rings();
                let sim: Result<BTreeSet<(u32, u64)>, String> = match (s, r) {
                    (Ok(es), Ok(_)) => Ok(es
                        .iter()
                        .map(|e| {
                            (
                                (u32::from(e.as_id.get()) << 16) | u32::from(e.slot.get()),
                                e.offset,
                            )
                        })
                        .collect()),
                    (Err(e), _) | (_, Err(e)) => Err(e.to_string()),
                };
                let kvm: BTreeSet<(u32, u64)> = k.into_iter().collect();
                let ok = sim.as_ref().is_ok_and(|s| *s == kvm);
                (format!("{sim:?}"), format!("Ok({kvm:?})"), ok)
            }
            DirtyOp::Toggle { slot, log } => {
                let (s, k) = self.set_slot(usize::from(*slot), *log)?;
                let ok = s.split(' ').nth(1) == k.split(' ').nth(1);
                (s, k, ok)
            }
        })
    }

    fn gen_gpa(&self, rng: &mut Rng) -> u64 {
        let page = if rng.chance(90) {
            let (_, first, pages) = SLOTS[rng.below(SLOTS.len() as u64) as usize];
            first + rng.below(pages)
        } else {
            // Now and then a gap between slots (an MMIO exit on both sides).
            rng.below(BUF_PAGES)
        };
        GPA_BASE + page * PAGE + [0, 8, 0x800, 0xff8][rng.below(4) as usize]
    }

    fn gen_clear(&self, rng: &mut Rng) -> DirtyOp {
        let i = rng.below(SLOTS.len() as u64) as usize;
        let npages = SLOTS[i].2;
        let words = npages.div_ceil(64);
        let w0 = rng.below(words);
        let (first_page, num_pages) = if rng.chance(5) {
            // A malformed range: unaligned start, or past the slot's end.
            if rng.chance(50) {
                (w0 * 64 + 1 + rng.below(63), 1)
            } else {
                (w0 * 64, (npages - w0 * 64 + 1 + rng.below(64)) as u32)
            }
        } else {
            let nw = 1 + rng.below(words - w0);
            (w0 * 64, (npages.min((w0 + nw) * 64) - w0 * 64) as u32)
        };
        let nw = u64::from(num_pages).div_ceil(64) as usize;
        let last = &self.last[i];
        let mask = (0..nw)
            .map(|j| {
                let from_last = last.get(w0 as usize + j).copied().unwrap_or(0);
                match rng.below(4) {
                    0 => u64::MAX,
                    1 => rng.next_u64(),
                    _ => from_last & (rng.next_u64() | rng.next_u64()),
                }
            })
            .collect();
        DirtyOp::Clear {
            slot: i as u16,
            first_page,
            num_pages,
            mask,
        }
    }

    fn gen_op(&self, rng: &mut Rng) -> DirtyOp {
        let manual = matches!(self.mode, DirtyMode::Bitmap(DirtyLogProtect::Manual { .. }));
        match rng.below(100) {
            0..=34 => DirtyOp::Access(GuestAccess::Write {
                gpa: self.gen_gpa(rng),
                value: rng.next_u64(),
            }),
            35..=44 => DirtyOp::Access(GuestAccess::Read {
                gpa: self.gen_gpa(rng),
            }),
            45..=64 => {
                let n = 1 + rng.below(32);
                DirtyOp::Access(GuestAccess::Batch {
                    gpas: (0..n).map(|_| self.gen_gpa(rng)).collect(),
                    base: rng.next_u64() >> 8,
                })
            }
            65..=79 if manual => self.gen_clear(rng),
            94..=96 => {
                let slot = rng.below(SLOTS.len() as u64) as u16;
                DirtyOp::Toggle {
                    slot,
                    log: !self.logging[usize::from(slot)],
                }
            }
            _ if self.mode == DirtyMode::Ring => DirtyOp::HarvestRing,
            _ => DirtyOp::Harvest {
                slot: rng.below(SLOTS.len() as u64) as u16,
            },
        }
    }
}

/// A bitmap as hex words (or its errno), for divergence reports.
fn show_bitmap(r: &Result<Vec<u64>, i32>) -> String {
    match r {
        Ok(w) => {
            let words: Vec<String> = w.iter().map(|x| format!("{x:016x}")).collect();
            format!("[{}]", words.join(" "))
        }
        Err(e) => format!("errno {e}"),
    }
}

/// Runs `ops` operations from `seed` in `mode` with kvmmu's `mmu` against real KVM,
/// then harvests every slot once more; the first diverging answer stops the run.
pub fn run(
    seed: u64,
    ops: usize,
    mode: DirtyMode,
    mmu: MmuKind,
    test: &str,
) -> Result<Summary, FamilyError> {
    let mut sides = Sides::new(mmu, mode)?;
    let mut rng = Rng::new(seed);
    let mut summary = Summary::default();
    let finals: Vec<DirtyOp> = if mode == DirtyMode::Ring {
        vec![DirtyOp::HarvestRing]
    } else {
        (0..SLOTS.len() as u16)
            .map(|slot| DirtyOp::Harvest { slot })
            .collect()
    };
    for index in 0..ops + finals.len() {
        let op = match index.checked_sub(ops) {
            None => sides.gen_op(&mut rng),
            Some(i) => finals[i].clone(),
        };
        let (sim, kvm, ok) = sides.apply(&op)?;
        if !ok {
            return Err(FamilyError::Divergence(Box::new(Divergence {
                family: "dirty",
                seed,
                index,
                op: format!("{op:?} (mode {mode:?}, kvmmu {mmu:?})"),
                kvmmu: sim,
                kvm,
                replay: replay_command(test, seed, (index + 1).min(ops)),
            })));
        }
        let refused =
            sim.starts_with("Err") || (sim.starts_with("errno") && !sim.starts_with("errno 0"));
        if refused {
            summary.refused += 1;
        } else {
            summary.accepted += 1;
        }
        summary.ops += 1;
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_of_dirty_maps_missing_slots_to_enoent_and_bad_ranges_to_einval() {
        let slot = SlotId::new(3);
        assert_eq!(
            errno_of_dirty(&DirtyLogError::NotLogging { slot }),
            libc::ENOENT
        );
        assert_eq!(
            errno_of_dirty(&DirtyLogError::NoSuchSlot {
                as_id: AsId::new(0),
                slot
            }),
            libc::ENOENT
        );
        let unaligned = DirtyLogError::UnalignedRange {
            first_page: 1,
            num_pages: 1,
        };
        assert_eq!(errno_of_dirty(&unaligned), libc::EINVAL);
        assert_eq!(errno_of_dirty(&DirtyLogError::RingInUse), libc::ENXIO);
    }

    #[test]
    fn test_slots_fit_the_buffer_and_do_not_overlap() {
        for w in SLOTS.windows(2) {
            assert!(w[0].1 + w[0].2 <= w[1].1, "{:?} overlaps {:?}", w[0], w[1]);
        }
        let last = SLOTS[SLOTS.len() - 1];
        assert!(last.1 + last.2 <= BUF_PAGES);
    }
}
