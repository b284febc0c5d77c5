//! Translation in guest mode: TLB lookup, page walk on a miss, and the checked frame access.
//!
//! The checks that make a stale translation visible (DESIGN invariant 2):
//! - a TLB entry remembers the owner tag of the frame it was filled from; every access compares it
//!   with the frame's current tag (a frame freed or reused since the fill fails the check);
//! - a fill validates that the frame backs the host page the leaf's installer recorded beside the
//!   leaf (G3 in docs/locking.md; G5 for the shadow MMU's direct pages): no lock, no RCU, no SRCU
//!   and no memslot lookup, as hardware. Where no owner was recorded (L2 leaves, in indirect
//!   shadow pages; leaves split from, or recovered out of, leaves without one) or the frame
//!   disagrees with it, the fill falls back to the memslot check under SRCU (loaded *after* the
//!   walk; see `walk_and_access` for why that is both free of false alarms and complete), so the
//!   recorded owner only ever speeds a fill up and never decides a report.

use super::tlb::TlbEntry;
use super::{Vcpu, VcpuExit};
use crate::addr::{Gfn, Gpa, PAGE_SHIFT, Pfn};
use crate::host::{FrameTag, StaleAccess};
use crate::mmu::HwWalk;
use crate::vm::VmInner;

/// The result of one attempt at an access.
pub(super) enum Access {
    /// The access completed; a read returns the value, a write returns the value written.
    Done(u64),
    /// The translation is missing or forbids the access: take a page fault.
    Fault,
}

/// Translates through the TLB alone and, on a hit that allows the access, performs it: `None` on
/// a TLB miss, or on a write through an entry without write permission or Dirty (hardware
/// re-walks then), or on an instruction fetch (`fetch`) through an entry without X, with nothing
/// done. The fast path of every guest access; callers have checked requests and the root just
/// before.
#[inline(always)]
pub(super) fn tlb_access(
    vcpu: &mut Vcpu,
    gpa: Gpa,
    write: Option<u64>,
    mask: u64,
    fetch: bool,
) -> Option<Result<u64, StaleAccess>> {
    let e = vcpu.tlb.lookup(gpa.gfn())?;
    if (write.is_some() && !(e.writable && e.dirty)) || (fetch && !e.executable) {
        return None;
    }
    let (pfn, tag) = (e.pfn, FrameTag::from_raw(e.tag));
    Some(frame_access(&vcpu.vm, gpa, pfn, tag, write, mask))
}

/// One attempt at an access: the TLB, else a walk and a fill.
pub(super) fn translate_and_access(
    vcpu: &mut Vcpu,
    gpa: Gpa,
    write: Option<u64>,
    mask: u64,
    fetch: bool,
) -> Result<Access, VcpuExit> {
    match tlb_access(vcpu, gpa, write, mask, fetch) {
        Some(r) => r
            .map(Access::Done)
            .map_err(|source| VcpuExit::StaleTranslation { gpa, source }),
        None => walk_and_access(vcpu, gpa, write, mask, fetch),
    }
}

/// The TLB-miss half of an access: walk the root, validate and fill the TLB, then access. An
/// instruction fetch (`fetch`) through a leaf without X is a fault (the walk still set A).
/// Inlined into `GuestMode::access_slow`, which is already out of line: a call of its own cost a
/// second prologue and a `Result` returned through memory on every TLB miss (issue 15).
#[inline(always)]
pub(super) fn walk_and_access(
    vcpu: &mut Vcpu,
    gpa: Gpa,
    write: Option<u64>,
    mask: u64,
    fetch: bool,
) -> Result<Access, VcpuExit> {
    let gfn = gpa.gfn();
    let is_write = write.is_some();

    // TLB miss (or a write through an entry whose Dirty bit is not yet set: hardware re-walks).
    vcpu.stats.tlb_misses += 1;
    // Borrow the VM through the field rather than cloning its `Arc`: a clone is two atomic RMWs
    // on a reference count every vCPU of the VM shares, i.e. a contended cache line per miss.
    let vm = &*vcpu.vm;
    let Some(root) = vcpu.root.as_ref() else {
        return Ok(Access::Fault);
    };
    let as_index = root.as_id().index();
    // In L2 mode the frame is checked against the L1 gfn the leaf maps (nested N1).
    // SAFETY (every walk below): this vCPU is in guest mode (`GuestMode::access` calls us between
    // two request checks, i.e. inside one instruction), so no table or shadow page it reaches is
    // freed before it acknowledges the next remote TLB flush (TDP G1-G2 in docs/locking.md,
    // shadow S2).
    let (hit, check_gfn, expected_host_page) = if vcpu.l2.is_some() {
        // SAFETY: as above.
        let (hit, l1_gfn) = unsafe { vm.mmu.hardware_walk_l2(root, gfn, is_write) };
        (hit, l1_gfn, None)
    } else {
        // SAFETY: as above.
        let (mut hit, mut host_page) = unsafe { vm.mmu.hardware_walk(root, gfn, is_write) };
        // The shadow MMU's fast page fault runs here, still in guest mode (vm/fault.rs); not in
        // L2 mode, whose gfns are L2 gfns that no memslot maps (L2 faults go to vm/nested.rs).
        let miss = !matches!(hit, HwWalk::Hit { .. });
        let fixed = miss && {
            let ring = vcpu.dirty_ring.as_deref();
            // SAFETY: as above (shadow S2).
            unsafe { vm.fast_fault_in_guest(root, gfn, is_write, ring) }
        };
        if fixed {
            // SAFETY: as above.
            (hit, host_page) = unsafe { vm.mmu.hardware_walk(root, gfn, is_write) };
        }
        (hit, gfn, host_page)
    };
    let HwWalk::Hit {
        pfn,
        writable,
        dirty,
        executable,
        ..
    } = hit
    else {
        return Ok(Access::Fault);
    };
    if fetch && !executable {
        return Ok(Access::Fault);
    }
    let tag = vm.host.arena().tag(pfn);
    // G3: the frame still backs the host page the leaf's installer recorded: fill without SRCU
    // or memslots. Otherwise decide on the memslots (in L2 mode, those of the L1 gfn the leaf
    // maps).
    if !(expected_host_page.is_some_and(|hp| !tag.is_free() && tag.host_page() == hp)) {
        check_against_memslots(vm, as_index, check_gfn, gpa, pfn, tag)?;
    }
    vcpu.tlb.insert(TlbEntry {
        gfn,
        pfn,
        tag: tag.raw(),
        writable,
        dirty,
        executable,
    });
    // The fill's own `Acquire` load of the tag above is the check before the access (frame arena
    // invariants 3-4): one tag load fewer than `frame_access`.
    let word = (gpa.page_offset() / 8) as usize;
    let arena = vm.host.arena();
    match write {
        Some(v) if mask == u64::MAX => arena.write_after_tag(pfn, word, tag, v).map(|()| v),
        Some(v) => arena.write_masked_tagged(pfn, word, tag, v, mask),
        None => arena.read_after_tag(pfn, word, tag),
    }
    .map(Access::Done)
    .map_err(|source| VcpuExit::StaleTranslation { gpa, source })
}

/// The fill check of a leaf without a usable recorded owner: the frame must back the host page
/// the memslot maps `gfn` to (the accessed gfn, or in L2 mode the L1 gfn the leaf maps; `gpa` is
/// the accessed address, for the report). (Not `#[cold]`: every L2 fill takes it.)
#[inline(never)]
fn check_against_memslots(
    vm: &VmInner,
    as_index: usize,
    gfn: Gfn,
    gpa: Gpa,
    pfn: Pfn,
    tag: FrameTag,
) -> Result<(), VcpuExit> {
    // The memslot set is loaded *after* the walk. Loading it before could miss a slot created (or
    // moved here) between the load and the walk, whose leaf another vCPU installed meanwhile: a
    // false alarm. Loading after is complete for deletions too: a slot whose SPTEs we just walked
    // is still visible (as itself or as its INVALID copy), because its deletion zaps, then waits for
    // this in-guest vCPU to acknowledge a TLB flush, and only then publishes the set without it.
    let srcu = vm.srcu_read();
    let slots = vm.memslots[as_index].load(&srcu);
    let expected_page = slots
        .find_by_gfn(gfn)
        .and_then(|s| s.gfn_to_hva(gfn))
        .map(|hva| hva.raw() >> PAGE_SHIFT);
    if tag.is_free() || expected_page != Some(tag.host_page()) {
        let source = vm.host.arena().report_stale(pfn, FrameTag::FREE, tag);
        return Err(VcpuExit::StaleTranslation { gpa, source });
    }
    drop(srcu);
    Ok(())
}

/// The checked word access to the frame a translation names (DESIGN invariant 2). A write stores
/// the bits of `write` selected by `mask` (all of them for a word access, where the constant mask
/// folds the branch away) and keeps the others, atomically; it returns the word's new value.
#[inline(always)]
fn frame_access(
    vm: &VmInner,
    gpa: Gpa,
    pfn: Pfn,
    tag: FrameTag,
    write: Option<u64>,
    mask: u64,
) -> Result<u64, StaleAccess> {
    let word = (gpa.page_offset() / 8) as usize;
    let arena = vm.host.arena();
    match write {
        Some(v) if mask == u64::MAX => arena.write_tagged(pfn, word, tag, v).map(|()| v),
        Some(v) => arena.write_masked_tagged(pfn, word, tag, v, mask),
        None => arena.read_tagged(pfn, word, tag),
    }
}

/// Caches the translation of `gfn` a fault of this vCPU has just installed, instead of walking the
/// new leaf again (F2 in docs/locking.md). Called outside guest mode, after the fault and before
/// re-entry: a flush posted since the install is taken on entry (request invariant 3) and drops
/// the entry. The access checks the frame against the tag GUP read, which names the host page the
/// leaf's owner word records (the check a walked fill makes, G3).
pub(super) fn fill_from_fault(vcpu: &mut Vcpu, gfn: Gfn, fill: crate::vm::FaultFill) {
    vcpu.tlb.insert(TlbEntry {
        gfn,
        pfn: fill.leaf.pfn,
        tag: fill.tag.raw(),
        writable: fill.leaf.writable,
        dirty: fill.leaf.dirty,
        executable: fill.leaf.executable,
    });
}
