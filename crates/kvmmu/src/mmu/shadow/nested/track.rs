//! Write tracking of guest tables (`page_track.c`, `kvm_mmu_track_write`, `detect_write_flooding`):
//! an L1 write to a table some indirect page shadows was refused by L1's own mapping (kept
//! read-only, N2), emulated by the VM under `mmu_lock` write, and lands here: every indirect page
//! shadowing that L1 gfn loses the SPTE the written entry produced (`mmu_pte_write`), or, when the
//! table is written again and again with no fault using the page in between, the whole page
//! (`mmu_flooded`). Unsync pages are not built: every write is seen at once.

use crate::addr::{AsId, Level};
use crate::geometry::ROOT_LEVEL;
use crate::mmu::types::ZapBatch;
use crate::sync::atomic::Ordering;
use crate::sync::witness::MmuWrite;

use super::super::mmu::{RmapLookup, ShadowMmu, add};
use super::super::page::Role;
use super::super::zap::InvalidList;

/// Writes to a shadowed table, with no fault through its page in between, after which the page
/// is zapped instead of one entry (KVM's threshold in `detect_write_flooding`).
pub const WRITE_FLOODING_THRESHOLD: u32 = 3;

impl ShadowMmu {
    /// L1 wrote word `word` (one EPT12 entry) of L1 page `gfn` (`kvm_mmu_track_write`): zap the
    /// SPTE each indirect page shadowing it derived from that entry, or the page itself if it is
    /// flooded. The returned batch (flush, then free) is committed before `mmu_lock` is dropped.
    pub(crate) fn track_write(
        &self,
        gfn: u64,
        word: usize,
        sets: &(impl RmapLookup + ?Sized),
        mmu: &MmuWrite,
    ) -> ZapBatch {
        self.check_lock(mmu.lock_id());
        if !self.write_tracked_in(gfn, gfn + 1) {
            return ZapBatch::empty();
        }
        let mut state = self.inner.state.lock();
        let mut invalid = InvalidList::default();
        let mut flush = false;
        let c = &self.inner.counters;
        let nr_as = state.roots.len();
        let mut level = Some(Level::L4K);
        while let Some(l) = level {
            for as_id in 0..nr_as {
                let role = Role {
                    level: l,
                    as_id: AsId::new(as_id as u8),
                    direct: false,
                };
                let Some(&sp) = state.hash.get(&(gfn, role)) else {
                    continue;
                };
                // SAFETY: in the hash, under `mmu_lock` write: live (S1).
                let page = unsafe { sp.get() };
                // ORDERING: Relaxed: changed only under `mmu_lock` write.
                let n = page.write_flooding_count.fetch_add(1, Ordering::Relaxed) + 1;
                if n >= WRITE_FLOODING_THRESHOLD {
                    self.prepare_zap(&mut state, sp, sets, mmu, &mut invalid);
                    add(&c.mmu_flooded, 1);
                } else if self.zap_spte(&mut state, sp, word, sets, mmu, &mut invalid) {
                    add(&c.mmu_pte_write, 1);
                    flush = true;
                }
            }
            level = if l == ROOT_LEVEL { None } else { l.up() };
        }
        drop(state);
        let mut batch = self.commit_zap(invalid);
        if flush {
            batch.flush_before_unlock();
        }
        batch
    }
}

impl ShadowMmu {
    /// Zaps every indirect page whose shadowed EPT12 table lies in L1 gfns `[start, end)`
    /// (`kvm_mmu_zap_memslot_pages_and_flush`): a memslot holding guest tables is going away, so
    /// nothing derived from them may survive. The batch is committed before `mmu_lock` drops.
    pub(crate) fn zap_indirect_in(
        &self,
        start: u64,
        end: u64,
        sets: &(impl RmapLookup + ?Sized),
        mmu: &MmuWrite,
    ) -> ZapBatch {
        self.check_lock(mmu.lock_id());
        if !self.write_tracked_in(start, end) {
            return ZapBatch::empty();
        }
        let mut state = self.inner.state.lock();
        let victims: Vec<_> = state
            .hash
            .iter()
            .filter(|((gfn, role), _)| !role.direct && (start..end).contains(gfn))
            .map(|(_, &sp)| sp)
            .collect();
        let mut invalid = InvalidList::default();
        for sp in victims {
            self.prepare_zap(&mut state, sp, sets, mmu, &mut invalid);
        }
        drop(state);
        self.commit_zap(invalid)
    }
}
