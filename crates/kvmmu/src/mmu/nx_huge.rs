//! NX huge pages (the iTLB-multihit mitigation, KVM's `nx_huge_pages` module parameter): the
//! list of splits the mitigation caused and their recovery (`account_nx_huge_page`,
//! `kvm_recover_nx_huge_pages`).
//!
//! With the mitigation on, huge leaves are installed without X (`mmu/hugepage.rs`). An
//! instruction fetch through one faults; the fault handler (`vm/fault.rs`) then maps the page
//! with a 4K leaf (`disallowed_hugepage_adjust`), which splits the huge leaf or links a table
//! where it would have gone, and records each block whose huge mapping was disallowed only by
//! the mitigation ([`Mmu::account_nx_huge_page`]). `nx_lpage_splits` is the number of recorded
//! blocks whose table is still in place. Recovery ([`Mmu::recover_nx_huge_pages`]) zaps the
//! tables of the oldest `ceil(splits / ratio)` records, so their blocks fault huge again (and
//! split again if executed).
//!
//! The records are kept here rather than in each table (the kernel's `sp->possible_nx_huge_page`
//! link), so a table zapped by another path (a host invalidation that unlinks it, a memslot
//! deletion, a reset) leaves a record behind: records are checked against the page tables
//! (`table_at`) whenever they are counted or recovered, and dropped once their table is gone.
//! Under concurrent faults the count is a snapshot.

use std::collections::VecDeque;

use crate::addr::{AsId, Gfn, Level};
use crate::mmu::hugepage::max_leaf_level;
use crate::mmu::types::RemoteTlbFlush;
use crate::sync::Mutex;
use crate::sync::atomic::{AtomicU64, Ordering};
use crate::sync::witness::MmuWriteGuard;

use super::Mmu;
use crate::mmu::shadow::RmapLookup;

/// One block whose huge mapping the mitigation disallowed: the entry at `level` covering `gfn`
/// links a table instead of holding a huge leaf.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct NxSplit {
    as_id: AsId,
    gfn: u64,
    level: Level,
}

/// The records of [`NxSplit`]s, oldest first (`possible_nx_huge_pages`). A leaf lock: never
/// held while another lock is taken, except the MMUs' internal leaf locks (roots list, shadow
/// page hash) during a check.
#[derive(Default, Debug)]
pub(super) struct NxSplits {
    list: Mutex<VecDeque<NxSplit>>,
    /// The list's length, published after every change under the list lock, for readers that
    /// must not block (a thread in guest mode).
    len: AtomicU64,
}

impl NxSplits {
    /// Publishes the length of `l` (the list, locked by the caller).
    fn publish(&self, l: &VecDeque<NxSplit>) {
        // ORDERING: Relaxed: a statistic; it orders nothing.
        self.len.store(l.len() as u64, Ordering::Relaxed);
    }
}

impl Mmu {
    /// Turns the NX huge pages mitigation on or off in both MMUs (the VM does it once, from
    /// `VmConfig::nx_huge_pages`, before any fault).
    pub fn set_nx_huge_pages(&self, on: bool) {
        self.tdp.set_nx_huge_pages(on);
        self.shadow.set_nx_huge_pages(on);
    }

    /// Whether the table of `s` is in place (no `mmu_lock` needed: the TDP check walks under
    /// RCU, the shadow check looks the page hash up under its own lock).
    fn nx_table_at(&self, s: NxSplit) -> bool {
        if self.shadow_enabled() {
            self.shadow.table_at(s.as_id, s.gfn, s.level)
        } else {
            self.tdp.table_at(s.as_id, s.gfn, s.level)
        }
    }

    /// Records the blocks around `gfn` (levels 2M up to `max_level`, the level the fault would
    /// have mapped without the mitigation) whose table is now in place, after an instruction
    /// fetch was served by a 4K leaf because of the mitigation (`account_nx_huge_page`). Call it
    /// without `mmu_lock`.
    pub fn account_nx_huge_page(&self, as_id: AsId, gfn: Gfn, max_level: Level) {
        for level in [Level::L2M, Level::L1G] {
            if level > max_level || level > max_leaf_level() {
                break;
            }
            let s = NxSplit {
                as_id,
                gfn: gfn.align_down(level).raw(),
                level,
            };
            if self.nx.list.lock().contains(&s) || !self.nx_table_at(s) {
                continue;
            }
            let mut l = self.nx.list.lock();
            if !l.contains(&s) {
                l.push_back(s);
                self.nx.publish(&l);
            }
        }
    }

    /// `nx_lpage_splits`: the recorded blocks whose table is still in place (records of tables
    /// zapped meanwhile are dropped). Call it without `mmu_lock`, outside guest mode (the
    /// shadow check takes the page-hash lock, which a fault may hold across a remote flush).
    pub fn nx_lpage_splits(&self) -> u64 {
        let snapshot: Vec<NxSplit> = self.nx.list.lock().iter().copied().collect();
        let gone: Vec<NxSplit> = snapshot
            .into_iter()
            .filter(|s| !self.nx_table_at(*s))
            .collect();
        let mut l = self.nx.list.lock();
        if !gone.is_empty() {
            l.retain(|s| !gone.contains(s));
            self.nx.publish(&l);
        }
        l.len() as u64
    }

    /// One round of NX huge page recovery (`kvm_recover_nx_huge_pages`), under `mmu_lock` write:
    /// drops the records whose table is gone, then zaps the tables of the oldest
    /// `ceil(records / ratio)` records (none if `ratio` is 0), so their blocks fault huge again.
    /// Remote TLBs are flushed once for the round (TDP: before the RCU guard over the unlinked
    /// tables is dropped; shadow: the commit-zap, before the pages are freed). `sets` find the
    /// rmaps of shadow leaves (the memslot sets, loaded after `mmu_lock` was taken). Returns the
    /// number of tables zapped.
    pub(crate) fn recover_nx_huge_pages(
        &self,
        mmu: &mut MmuWriteGuard<'_>,
        sets: &(impl RmapLookup + ?Sized),
        ratio: u32,
        flusher: &impl RemoteTlbFlush,
    ) -> u64 {
        let victims: Vec<NxSplit> = {
            let mut l = self.nx.list.lock();
            l.retain(|s| self.nx_table_at(*s));
            let to_zap = if ratio == 0 {
                0
            } else {
                l.len().div_ceil(ratio as usize)
            };
            let v = l.drain(..to_zap).collect();
            self.nx.publish(&l);
            v
        };
        let mut zapped = 0;
        let mut as_ids: Vec<AsId> = victims.iter().map(|s| s.as_id).collect();
        as_ids.sort_by_key(|a| a.index());
        as_ids.dedup();
        for as_id in as_ids {
            let blocks: Vec<(u64, Level)> = victims
                .iter()
                .filter(|s| s.as_id == as_id)
                .map(|s| (s.gfn, s.level))
                .collect();
            if self.shadow_enabled() {
                let (n, batch) = self
                    .shadow
                    .zap_pages_at(as_id, &blocks, sets, mmu.witness());
                batch.commit(flusher);
                zapped += n;
            } else {
                zapped += self
                    .tdp
                    .zap_tables_at(as_id, &blocks, mmu.witness(), flusher);
            }
        }
        zapped
    }

    /// The number of records, unchecked and without taking a lock (for a caller in guest mode;
    /// see [`Mmu::nx_lpage_splits`]).
    pub fn nx_lpage_splits_recorded(&self) -> u64 {
        // ORDERING: Relaxed: a statistic (`NxSplits::len`).
        self.nx.len.load(Ordering::Relaxed)
    }
}
