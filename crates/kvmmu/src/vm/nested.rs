//! Nested guests, the VM's side (`shadow/nested/mod.rs` has the protocol, N1–N4): enabling them,
//! L1's memory as the EPT12 walker and the builder see it, the L2 fault, L1's emulated writes to
//! write-tracked tables, and INVEPT.

use core::cell::RefCell;

use crate::addr::{AsId, Gfn, Gpa, Hva, Level, PAGE_SHIFT, Pfn};
use crate::host::{FrameTag, GupError};
use crate::mmu::shadow::nested::walk::{GuestWalk, L1AccessError, L1Memory, WalkError, walk_ept12};
use crate::mmu::{FaultOutcome, MapRequest, MmuRoot, RemoteTlbFlush, RetryReason};
use crate::sync::atomic::Ordering;
use crate::sync::guest_mode;
use crate::vm::dirty_log::mark_page_dirty;
use crate::vm::dirty_ring::DirtyRing;
use crate::vm::memslot::{MemFlags, Memslots};
use crate::vm::{VcpuExit, Vm, VmError, VmInner};

/// L1 memory through L1's memslots (address space 0) and the host, for the EPT12 walker. Every
/// page is looked up with GUP once (outside `mmu_lock`: GUP takes the host's `mmap_lock`, which
/// ranks before it) and then accessed through the frame arena with its tag, so a later re-read
/// under `mmu_lock` needs no host lock and a frame the host took away meanwhile is seen (the tag
/// check fails) instead of read.
struct L1View<'a> {
    vm: &'a VmInner,
    slots: &'a Memslots,
    /// The faulting vCPU's dirty ring: A/D updates dirty the table page
    /// (`FNAME(update_accessed_dirty_bits)` marks it).
    ring: Option<&'a DirtyRing>,
    pages: RefCell<Vec<(u64, Pfn, FrameTag, bool)>>,
    /// The last host refusal, for the exit the fault reports.
    host_error: RefCell<Option<(Gpa, Hva, GupError)>>,
}

impl L1View<'_> {
    fn page(&self, gfn: u64, write: bool) -> Result<(Pfn, FrameTag), L1AccessError> {
        if let Some(&(_, pfn, tag, w)) = self.pages.borrow().iter().find(|p| p.0 == gfn)
            && (w || !write)
        {
            return Ok((pfn, tag));
        }
        let slot = self
            .slots
            .find_by_gfn(Gfn::new(gfn))
            .ok_or(L1AccessError::NotL1Memory)?;
        if slot.is_invalid() {
            return Err(L1AccessError::Retry);
        }
        if write && slot.flags().contains(MemFlags::READONLY) {
            return Err(L1AccessError::Host);
        }
        let hva = slot
            .gfn_to_hva(Gfn::new(gfn))
            .ok_or(L1AccessError::NotL1Memory)?;
        let p = self.vm.host.get_user_page(hva, write).map_err(|e| {
            *self.host_error.borrow_mut() = Some((Gpa::new(gfn << PAGE_SHIFT), hva, e));
            L1AccessError::Host
        })?;
        self.pages.borrow_mut().push((gfn, p.pfn, p.tag, write));
        Ok((p.pfn, p.tag))
    }

    /// Re-reads word `index` of a page looked up before, without any host lock (under
    /// `mmu_lock`); `None` if the frame no longer backs it.
    fn reread(&self, gfn: u64, index: usize) -> Option<u64> {
        let (_, pfn, tag, _) = *self.pages.borrow().iter().find(|p| p.0 == gfn)?;
        self.vm.host.arena().read_tagged(pfn, index, tag).ok()
    }

    /// True if every entry `walk` used still holds what it read (A/D aside): nested N3.
    fn unchanged(&self, walk: &GuestWalk, l2_gfn: u64) -> bool {
        use crate::mmu::shadow::nested::ept12::{Ept12Entry, ept12_index};
        (1..=4u8).all(|level| {
            let li = usize::from(level - 1);
            self.reread(walk.tables[li], ept12_index(l2_gfn, level))
                .is_some_and(|v| {
                    Ept12Entry::from_raw(v).without_ad() == walk.gptes[li].without_ad()
                })
        })
    }
}

impl L1Memory for L1View<'_> {
    fn read(&self, gfn: u64, index: usize) -> Result<u64, L1AccessError> {
        let (pfn, tag) = self.page(gfn, false)?;
        self.vm
            .host
            .arena()
            .read_tagged(pfn, index, tag)
            .map_err(|_| L1AccessError::Retry)
    }

    fn set_bits(&self, gfn: u64, index: usize, bits: u64) -> Result<(), L1AccessError> {
        let (pfn, tag) = self.page(gfn, true)?;
        // Marked before the write, as every kvmmu write is (dirty logging D3).
        if let Some(slot) = self.slots.find_by_gfn(Gfn::new(gfn)) {
            mark_page_dirty(slot, Gfn::new(gfn), self.ring);
        }
        self.vm
            .host
            .arena()
            .write_masked_tagged(pfn, index, tag, bits, bits)
            .map(|_| ())
            .map_err(|_| L1AccessError::Retry)
    }
}

impl Vm {
    /// Enables nested guests on a VM whose L1 runs on the TDP MMU: memslots created from now on
    /// get rmap arrays, which indirect shadow pages need (KVM allocates them when the first
    /// shadow root is made). A shadow-MMU VM always supports nesting. Call it before creating any
    /// memslot.
    ///
    /// Errors: [`VmError::NestedAfterMemslots`] if a memslot exists, [`VmError::InGuestMode`]
    /// from a thread holding a vCPU in guest mode (nothing changed).
    pub fn enable_nested(&self) -> Result<(), VmError> {
        guest_mode::check("Vm::enable_nested")?;
        let vm = self.inner();
        let _slots = vm.slots_lock.lock();
        let srcu = vm.srcu_read();
        if vm
            .memslots
            .iter()
            .any(|c| c.load(&srcu).iter().next().is_some())
        {
            return Err(VmError::NestedAfterMemslots);
        }
        vm.mmu.enable_nested();
        Ok(())
    }
}

impl Vm {
    /// The number of SPTEs in the 4K rmap of `gfn` (address space `as_id`): with nested guests,
    /// one per L2 address mapping the L1 page (plus L1's own leaf with the shadow MMU). 0 when
    /// the memslot has no rmaps. Diagnostics: takes `mmu_lock` for write.
    ///
    /// # Panics
    /// From a thread in guest mode (it takes `mmu_lock`).
    pub fn rmap_len(&self, as_id: AsId, gfn: Gfn) -> usize {
        guest_mode::refuse("Vm::rmap_len");
        let vm = self.inner();
        let srcu = vm.srcu_read();
        let Some(cell) = vm.memslots.get(as_id.index()) else {
            return 0;
        };
        let slots = cell.load(&srcu);
        slots
            .find_by_gfn(gfn)
            .and_then(|s| s.rmaps())
            .map_or(0, |r| vm.mmu.rmap_chain_len(&vm.mmu_lock, r, gfn))
    }

    /// The longest 4K rmap chain over every memslot of `as_id` (diagnostics; walks every gfn
    /// under `mmu_lock` write, one rmap at a time).
    ///
    /// # Panics
    /// From a thread in guest mode.
    pub fn max_rmap_len(&self, as_id: AsId) -> usize {
        guest_mode::refuse("Vm::max_rmap_len");
        let vm = self.inner();
        let srcu = vm.srcu_read();
        let Some(cell) = vm.memslots.get(as_id.index()) else {
            return 0;
        };
        let slots = cell.load(&srcu);
        let mut max = 0;
        for slot in slots.iter() {
            let Some(r) = slot.rmaps() else { continue };
            let range = slot.gfn_range();
            for g in range.start().raw()..range.end().raw() {
                max = max.max(vm.mmu.rmap_chain_len(&vm.mmu_lock, r, Gfn::new(g)));
            }
        }
        max
    }
}

impl VmInner {
    /// True if nested guests may run on this VM.
    pub(crate) fn nested_enabled(&self) -> bool {
        self.mmu.nested_enabled()
    }

    /// True if every gfn of `[start, start + pages)` is in a valid L1 memslot (address space 0).
    pub(crate) fn l1_covers(&self, start: u64, pages: u64) -> bool {
        let Some(end) = start.checked_add(pages) else {
            return false;
        };
        let srcu = self.srcu_read();
        let slots = self.memslots[0].load(&srcu);
        let mut g = start;
        while g < end {
            match slots.find_by_gfn(Gfn::new(g)) {
                Some(s) if !s.is_invalid() => g = s.gfn_range().end().raw(),
                _ => return false,
            }
        }
        true
    }

    /// INVEPT from L1: flush every vCPU's cached translations (EPT02 itself is kept in sync by
    /// write tracking, N3).
    pub(crate) fn nested_invept(&self) {
        self.flush_remote_tlbs();
    }

    /// `kvm_mmu_load` in L2 mode: the indirect root for the EPT12 rooted at L1 address `eptp`.
    pub(crate) fn load_nested_root(&self, eptp: Gpa) -> Option<MmuRoot> {
        let srcu = self.srcu_read();
        let sets: Vec<&Memslots> = self.memslots.iter().map(|c| c.load(&srcu)).collect();
        self.mmu.load_nested_root(
            &self.mmu_lock,
            eptp.gfn().raw(),
            sets.as_slice(),
            self,
            // ORDERING: Acquire pairs with teardown's store, as `VmInner::load_root`'s check:
            // read under `mmu_lock`, so no root is allocated after the final zap.
            || !self.dead.load(Ordering::Acquire),
        )
    }

    /// An L2 fault (nested protocol steps 1–2) on L2 address `l2_gpa` for a vCPU whose EPT12
    /// root is at `eptp` and whose EPT02 root is `root`.
    pub(crate) fn l2_page_fault(
        &self,
        root: &MmuRoot,
        eptp: Gpa,
        l2_gpa: Gpa,
        write: bool,
        ring: Option<&DirtyRing>,
    ) -> Result<FaultOutcome, VcpuExit> {
        let _trace = tracing::trace_span!("l2_page_fault", gfn = l2_gpa.gfn().raw()).entered();
        let outcome = self.l2_page_fault_inner(root, eptp, l2_gpa, write, ring);
        // Counted once (DESIGN invariant 8): a `Fixed` outcome in `pf_fixed`, by the inner
        // function, every other one here (`VmStats::faults` is the sum).
        if !matches!(outcome, Ok(FaultOutcome::Fixed)) {
            self.counters.faults_unfixed.add(1);
        }
        outcome
    }

    fn l2_page_fault_inner(
        &self,
        root: &MmuRoot,
        eptp: Gpa,
        l2_gpa: Gpa,
        write: bool,
        ring: Option<&DirtyRing>,
    ) -> Result<FaultOutcome, VcpuExit> {
        let srcu = self.srcu_read();
        let sets: Vec<&Memslots> = self.memslots.iter().map(|c| c.load(&srcu)).collect();
        let slots = sets[0];
        let view = L1View {
            vm: self,
            slots,
            ring,
            pages: RefCell::new(Vec::with_capacity(5)),
            host_error: RefCell::new(None),
        };
        let l2_gfn = l2_gpa.gfn().raw();
        let retry = Ok(FaultOutcome::Retry(RetryReason::Invalidation));
        let walk = match walk_ept12(&view, eptp.gfn().raw(), l2_gfn, write) {
            Ok(w) => w,
            Err(WalkError::Exit(e)) => return Err(VcpuExit::Ept(e)),
            Err(WalkError::L1(L1AccessError::Host)) => {
                return match view.host_error.borrow_mut().take() {
                    Some((gpa, hva, error)) => Err(VcpuExit::HostFault { gpa, hva, error }),
                    None => Err(VcpuExit::ReadonlyMemslot { gpa: eptp }),
                };
            }
            Err(WalkError::L1(_)) => return retry,
        };
        let l1_gfn = Gfn::new(walk.l1_gfn());
        let l1_gpa = Gpa::new(l1_gfn.raw() << PAGE_SHIFT);
        let Some(slot) = slots.find_by_gfn(l1_gfn) else {
            return Err(VcpuExit::NoMemslot { gpa: l1_gpa });
        };
        if slot.is_invalid() {
            return Ok(FaultOutcome::Retry(RetryReason::InvalidSlot));
        }
        let readonly_slot = slot.flags().contains(MemFlags::READONLY);
        if write && readonly_slot {
            return Err(VcpuExit::ReadonlyMemslot { gpa: l1_gpa });
        }
        let Some(hva) = slot.gfn_to_hva(l1_gfn) else {
            return Err(VcpuExit::NoMemslot { gpa: l1_gpa });
        };
        let snap = self.invalidate.snapshot();
        if self.invalidate.retry_gfn_unsafe(snap, l1_gfn) {
            return retry;
        }
        let page = match self.host.get_user_page(hva, write) {
            Ok(p) => p,
            Err(error) => {
                return Err(VcpuExit::HostFault {
                    gpa: l1_gpa,
                    hva,
                    error,
                });
            }
        };
        let req = MapRequest {
            gfn: l1_gfn,
            pfn: page.pfn,
            level: Level::L4K,
            // On a dirty-logging slot only a write fault maps writable, so the first L2 write
            // to the page faults and is logged (D3).
            host_writable: page.writable
                && !readonly_slot
                && (write || !slot.flags().contains(MemFlags::LOG_DIRTY_PAGES)),
            write_fault: write,
            prefetch: false,
        };
        let outcome = self.mmu.map_nested(
            &self.mmu_lock,
            root,
            l2_gfn,
            &walk,
            &req,
            slot.rmaps(),
            sets.as_slice(),
            self,
            |mmu| {
                // ORDERING: as the L1 fault's check (vm/fault.rs): Acquire under `mmu_lock`.
                if self.dead.load(Ordering::Acquire) {
                    return Err(Err(VcpuExit::VmDead));
                }
                if self.invalidate.retry_gfn(snap, l1_gfn, mmu) {
                    return Err(retry.clone());
                }
                if write && req.host_writable {
                    // As an L1 write fault (vm/fault.rs, D3): L2 dirties the L1 page.
                    mark_page_dirty(slot, l1_gfn, ring);
                }
                Ok(())
            },
            || view.unchanged(&walk, l2_gfn),
        );
        let outcome = match outcome {
            Ok(o) => o,
            Err(early) => return early,
        };
        drop(srcu);
        if outcome == FaultOutcome::Fixed {
            self.counters.pf_fixed.add(1);
        }
        Ok(outcome)
    }

    /// Emulates L1's write of `value` (the bits in `mask`) to `gpa` in address space 0, a page
    /// that is write-tracked (`kvm_mmu_track_write` after `emulator_write_phys`): the store goes
    /// to the host frame under `mmu_lock` write, then every shadow entry derived from the written
    /// EPT12 entry is zapped (N2, N3). Returns the word's new value, or `None` to retry (the
    /// frame changed under us).
    pub(crate) fn emulate_tracked_write(
        &self,
        gpa: Gpa,
        value: u64,
        mask: u64,
        ring: Option<&DirtyRing>,
    ) -> Result<Option<u64>, VcpuExit> {
        guest_mode::refuse("an emulated L1 write");
        let gfn = gpa.gfn();
        let srcu = self.srcu_read();
        let sets: Vec<&Memslots> = self.memslots.iter().map(|c| c.load(&srcu)).collect();
        let Some(slot) = sets[0].find_by_gfn(gfn) else {
            return Err(VcpuExit::NoMemslot { gpa });
        };
        if slot.is_invalid() {
            return Ok(None);
        }
        if slot.flags().contains(MemFlags::READONLY) {
            return Err(VcpuExit::ReadonlyMemslot { gpa });
        }
        let Some(hva) = slot.gfn_to_hva(gfn) else {
            return Err(VcpuExit::NoMemslot { gpa });
        };
        let page = self
            .host
            .get_user_page(hva, true)
            .map_err(|error| VcpuExit::HostFault { gpa, hva, error })?;
        let word = (gpa.page_offset() / 8) as usize;
        let mmu = self.mmu_lock.write();
        let Ok(new) = self
            .host
            .arena()
            .write_masked_tagged(page.pfn, word, page.tag, value, mask)
        else {
            return Ok(None);
        };
        mark_page_dirty(slot, gfn, ring);
        self.mmu
            .track_write(gfn.raw(), word, sets.as_slice(), mmu.witness())
            .commit(self);
        drop(mmu);
        Ok(Some(new))
    }
}
