//! The memory charge: how many frames host 4K pages use, against the limit of
//! [`HostMm::enable_reclaim`] (reclaim R1 and R5 in `docs/invariants.md`; C1-C6 in
//! `docs/locking.md`, "Reclaim: the charge accounting").
//!
//! Protocol (who charges and uncharges; "charged" = counted in `charged`):
//! - C1. A frame is charged exactly while a present host PTE outside a huge page names it, from
//!   before it is published until after its PTE left (a GUP or zap in flight may differ by its
//!   own frame). A frame of a whole huge page (THP or hugetlb; its span's marker set) is never
//!   charged.
//! - C2. **Charge one:** GUP's 4K slow path (first touch or refault of a swap entry) and the THP
//!   4K fallback charge before they allocate; a refused charge sends the caller to direct
//!   reclaim. The same call applies before and after `enable_reclaim` (the limit is then
//!   `u64::MAX`), so pages present before the limit was set are charged like the rest.
//! - C3. **Uncharge one:** the same GUP paths when the allocation fails or the CAS is lost (the frame
//!   was never published); a zap (`munmap`, `madvise(DONTNEED)`, `release`) of a present 4K PTE;
//!   an eviction, whose PTE becomes a swap entry. A swap-in charges (as a GUP), a zap of a swap
//!   entry does not uncharge (no frame).
//! - C4. **Split:** clearing a THP's marker turns its 512 frames into 4K pages: the splitter charges
//!   512 at once (`Reclaim::charge_forced`, no limit check: the frames exist already). Every
//!   split is a `split_cut` under `mmap_lock` write: a structural operation cutting a THP, or a
//!   zap whose range (a VMA of `release`) ends inside one.
//! - C5. **Collapse:** 512 charged 4K frames become one huge page: the collapser uncharges 512.
//!   A huge page freed whole (`zap_huge`) or faulted in whole (`install_huge`) changes nothing.
//!
//! C6. A decrement below zero is a host bug (an uncharge of a frame never charged): it is refused and
//! recorded as a [`ChargeUnderflow`] naming the call site ([`HostMm::charge_underflow`],
//! [`ReclaimStats::charge_underflows`](super::ReclaimStats)), never wrapped.

use core::ops::ControlFlow;
use core::panic::Location;

use super::HostMm;
use super::reclaim::Reclaim;
use super::swap::swap_slot;
use super::vma::pte;
use crate::sync::atomic::Ordering;

/// An uncharge of more frames than were charged (a host accounting bug; the counter is left as
/// it was).
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
#[error("reclaim charge underflow: {site} uncharged {frames} frame(s) with {charged} charged")]
pub struct ChargeUnderflow {
    /// The uncharging call site (file, line and column of the `uncharge` call).
    pub site: &'static Location<'static>,
    /// Frames it uncharged.
    pub frames: u64,
    /// The charge it found.
    pub charged: u64,
}

/// The charge next to what it should be ([`HostMm::charge_audit`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct ChargeAudit {
    /// The counter.
    pub charged: u64,
    /// Present host PTEs outside huge pages: the frames that are charged (R1).
    pub present_4k: u64,
    /// Present host PTEs of huge pages (never charged, R5).
    pub present_huge: u64,
    /// Swap entries in the host page table.
    pub swap_entries: u64,
}

impl Reclaim {
    /// Charges one frame; false if that would pass the limit (R1).
    #[inline]
    pub(super) fn try_charge(&self) -> bool {
        // ORDERING: Relaxed: the limit is set once, before the limit matters to anyone.
        let limit = self.limit.load(Ordering::Relaxed);
        // ORDERING: SeqCst: the charge and `wake_pending` form kswapd's wake-up handshake (a
        // Dekker pattern with kswapd's store of `wake_pending` then load of `charged`; see
        // `kswapd_main`): one of the two always sees the other's store. The increment is
        // computed only below the limit (`then`, not `then_some`: a charge that had wrapped to
        // `u64::MAX` must be refused, not overflow).
        let Ok(old) = self
            .charged
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| {
                (c < limit).then(|| c + 1)
            })
        else {
            return false;
        };
        if limit != u64::MAX && old + 1 > Self::watermarks(limit).0 {
            self.wake_kswapd();
        }
        true
    }

    /// Charges `n` frames without checking the limit: the 4K pages of a THP being split, which
    /// exist already and which a later zap or eviction uncharges one by one.
    pub(super) fn charge_forced(&self, n: u64) {
        if n != 0 {
            // ORDERING: Relaxed: as `uncharge`; a split holds `mmap_lock` write, whose release
            // orders it before any GUP, zap or eviction of the split pages.
            self.charged.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Uncharges `n` frames, or refuses (counter unchanged) if fewer are charged: the refusal is
    /// counted and kept as the first [`ChargeUnderflow`], which names the caller's location.
    #[track_caller]
    pub(super) fn uncharge(&self, n: u64) {
        // ORDERING: Relaxed: a frame count; a waiting charger retries through direct reclaim,
        // not through this store. The read-modify-write sees the latest value, so the check is
        // exact.
        let r = self
            .charged
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| c.checked_sub(n));
        if let Err(charged) = r {
            let e = ChargeUnderflow {
                site: Location::caller(),
                frames: n,
                charged,
            };
            super::reclaim::bump(&self.underflows, 1);
            let _ = self.first_underflow.set(e);
            tracing::error!("{e}");
        }
    }
}

impl HostMm {
    /// The first refused uncharge since the host was created (see [`ChargeUnderflow`]); `None`
    /// while the accounting has been exact.
    pub fn charge_underflow(&self) -> Option<ChargeUnderflow> {
        self.inner.reclaim.first_underflow.get().copied()
    }

    /// Counts the host page table against the charge (R1: `charged == present_4k` whenever no
    /// GUP, zap or eviction is in flight). For tests and oracles; walks every mapping under
    /// `mm_writer` and `mmap_lock` read, so no structural operation or eviction runs meanwhile.
    #[doc(hidden)]
    pub fn charge_audit(&self) -> ChargeAudit {
        let _w = self.inner.mm_writer.lock();
        let vmas = self.inner.mmap_lock.read();
        let mut a = ChargeAudit::default();
        for v in vmas.iter() {
            let _ = vmas
                .pt
                .for_each_leaf_huge(v.start, v.end, |_, ptes, marker| {
                    // ORDERING: Acquire, as `marker_level`; Relaxed for the PTEs: `mm_writer` keeps
                    // every present PTE in place (H1) and the counts are a snapshot.
                    let huge = marker.load(Ordering::Acquire) != 0;
                    for w in ptes {
                        let v = w.load(Ordering::Relaxed);
                        if v & pte::PRESENT != 0 {
                            if huge {
                                a.present_huge += 1;
                            } else {
                                a.present_4k += 1;
                            }
                        } else if swap_slot(v).is_some() {
                            a.swap_entries += 1;
                        }
                    }
                    ControlFlow::Continue(())
                });
        }
        // ORDERING: Relaxed: a snapshot, exact when nothing is in flight.
        a.charged = self.inner.reclaim.charged.load(Ordering::Relaxed);
        a
    }
}
