//! Huge pages at the VM level: eager splitting and recovery over a gfn range, slot by slot
//! (`kvm_mmu_try_split_huge_pages`, `kvm_mmu_recover_huge_pages`). The level rule of a fault
//! (`vm/fault.rs`) decides what faults install; these entry points change what is installed.

use std::collections::HashSet;

use crate::addr::{AsId, GfnRange, Level};
use crate::sync::guest_mode;
use crate::vm::memslot::MemFlags;
use crate::vm::{Vm, VmInner};

impl Vm {
    /// Makes `gfns` of address space `as_id` map at most `target` (eager page splitting, before
    /// dirty logging): TDP huge leaves are split in place, shadow ones dropped. Returns the number
    /// of huge leaves split or dropped. The guest's data stays where it is (host frames).
    ///
    /// # Panics
    /// From a thread that holds a vCPU in guest mode (it takes `mmu_lock` and may flush), before
    /// anything changed.
    pub fn split_huge_pages(&self, as_id: AsId, gfns: GfnRange, target: Level) -> u64 {
        guest_mode::refuse("Vm::split_huge_pages");
        let vm = &*self.inner;
        let srcu = vm.srcu_read();
        let Some(cell) = vm.memslots.get(as_id.index()) else {
            return 0;
        };
        let mut n = 0;
        for slot in cell.load(&srcu).iter() {
            if let Some(r) = slot.gfn_range().intersect(&gfns) {
                n += vm
                    .mmu
                    .split_huge_pages(&vm.mmu_lock, as_id, slot.rmaps(), r, target, vm);
            }
        }
        n
    }

    /// Recovers huge mappings over `gfns` of `as_id` (`kvm_mmu_recover_huge_pages`): every 2M or
    /// 1G block that the memslot (alignment, `disallow_lpage`, no dirty logging) and the host
    /// (a huge page backs it) allow is mapped by one huge leaf again, built in place by both
    /// MMUs from a fully populated table. Skipped (0) if a host invalidation ran or
    /// runs meanwhile. Returns what [`crate::mmu::Mmu::recover_huge_pages`] counts.
    ///
    /// # Panics
    /// As [`Vm::split_huge_pages`].
    pub fn recover_huge_pages(&self, as_id: AsId, gfns: GfnRange) -> u64 {
        guest_mode::refuse("Vm::recover_huge_pages");
        self.inner.recover_huge_pages(as_id, gfns)
    }
}

impl VmInner {
    /// The body of [`Vm::recover_huge_pages`], also run when dirty logging is switched off on a
    /// slot (`kvm_mmu_slot_apply_flags`). The caller is not in guest mode.
    pub(crate) fn recover_huge_pages(&self, as_id: AsId, gfns: GfnRange) -> u64 {
        let vm = self;
        let srcu = vm.srcu_read();
        let Some(cell) = vm.memslots.get(as_id.index()) else {
            return 0;
        };
        let mut n = 0;
        for slot in cell.load(&srcu).iter() {
            let Some(r) = slot.gfn_range().intersect(&gfns) else {
                continue;
            };
            if slot.flags().contains(MemFlags::LOG_DIRTY_PAGES) || slot.is_invalid() {
                continue;
            }
            // The host's level is read before `mmu_lock` (the host's locks rank above it), with
            // the invalidation sequence: a host change in between is seen below and skips.
            let before = vm.invalidate.counters();
            let mut ok: HashSet<(u64, Level)> = HashSet::new();
            for level in [Level::L1G, Level::L2M] {
                let n = level.pages();
                let mut g = r.start().raw().next_multiple_of(n);
                while g + n <= r.end().raw() {
                    let gfn = crate::addr::Gfn::new(g);
                    let host_ok = slot
                        .gfn_to_hva(gfn)
                        .and_then(|h| vm.host.host_pte(h))
                        .is_some_and(|p| p.present && p.level >= level);
                    if host_ok && slot.max_mapping_level(gfn) >= level {
                        ok.insert((g, level));
                    }
                    g += n;
                }
            }
            if ok.is_empty() {
                continue;
            }
            let mmu = vm.mmu_lock.write();
            let now = vm.invalidate.counters();
            if now.in_progress != 0 || now.seq != before.seq {
                continue;
            }
            let allowed = |g: u64, l: Level| ok.contains(&(g, l));
            n += vm
                .mmu
                .recover_huge_pages(&mmu, as_id, slot.rmaps(), r, &allowed, vm);
            drop(mmu);
        }
        n
    }
}
