//! The MMU-notifier callbacks (spec §3.1–§3.2): how host page-table changes and host aging reach the
//! VM's SPTEs.
//!
//! # Protocol
//! 1. `invalidate_range_start`: `mn_active_invalidate_count += 1` under `mn_invalidate_lock` (this
//!    blocks memslot swaps until the matching end), then walk the memslots the hva range hits; on the
//!    first hit take `mmu_lock` write and call `begin`; for each hit add its gfn range to the
//!    invalidated range and zap its SPTEs; flush remote TLBs if anything was zapped, **before**
//!    `mmu_lock` is dropped. When start returns, no SPTE maps a page of the range and no vCPU holds a
//!    TLB entry for one (DESIGN invariant 2).
//! 2. `invalidate_range_end`: the same walk with `end` (seq += 1, in_progress -= 1) as the lock
//!    callback, then `mn_active_invalidate_count -= 1`, waking a waiting memslot update at zero. Since
//!    no swap happens in between, start and end find the same memslots (spec §4 item 3).
//! 3. Aging (`clear_young`, `clear_flush_young`, `test_young`): the same walk with no lock callback.
//!    In [`AgingMode::Lockless`](crate::config::AgingMode) it takes no `mmu_lock` at all: SRCU keeps
//!    the memslots alive and RCU the page tables. In `Locked` mode it takes `mmu_lock` write (the
//!    pre-series baseline). Aging never flushes TLBs unless `elide_tlb_flush_if_young` is off and the
//!    callback is `clear_flush_young`.
//! 4. Per-page aging (`clear_young_bitmap`): the walk of 3, once over the whole range; each MMU
//!    reports the gfns of its young leaves, and each is mapped back through its memslot to the bit
//!    of its hva. Aliased memslots (several slots, or address spaces, over one hva) OR into the
//!    same bit.
//!
//! The subscription holds only a `Weak` reference to the VM, so the host's subscriber list never
//! keeps a dropped VM alive.

use super::VmInner;
use crate::addr::{AsId, GfnRange, Hva};
use crate::host::{MmuNotifier, NotifierRange, YoungBitmap};
use crate::mmu::{RemoteTlbFlush, ZapBatch};
use crate::sync::atomic::Ordering;
use crate::sync::witness::MmuWriteGuard;
use crate::sync::{Arc, Weak};
use crate::vm::memslot::Memslot;

/// What the hva-range walk does for each memslot it hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Handler {
    /// `kvm_mmu_unmap_gfn_range`: widen the invalidated range, then zap.
    Unmap { may_block: bool },
    /// `kvm_age_gfn`: clear Accessed bits.
    Age,
    /// `kvm_test_age_gfn`: report whether any SPTE is young, change nothing.
    TestAge,
    /// No handler (`kvm_null_fn`): only the lock callback runs.
    None,
}

/// What runs once, right after `mmu_lock` is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OnLock {
    Begin,
    End,
    Nothing,
}

/// `struct kvm_mmu_notifier_range`.
#[derive(Clone, Copy, Debug)]
struct HvaRangeWalk {
    start: Hva,
    end: Hva,
    handler: Handler,
    on_lock: OnLock,
    flush_on_ret: bool,
    lockless: bool,
}

/// What the walk found: `kvm_mmu_notifier_return`.
#[derive(Clone, Copy, Debug, Default)]
struct WalkResult {
    ret: bool,
    found_memslot: bool,
}

impl VmInner {
    /// `kvm_handle_hva_range`: run `walk.handler` on every memslot (of every address space,
    /// aliases included) that the hva range hits.
    fn handle_hva_range(&self, walk: HvaRangeWalk) -> WalkResult {
        self.walk_hva_range(walk, |as_id, slot, gfns, mmu, zapped| {
            self.run_handler(walk.handler, as_id, slot, gfns, mmu, zapped)
        })
    }

    /// The body of [`VmInner::handle_hva_range`] with the per-slot work as a closure (SRCU,
    /// the lock callback, `mmu_lock` unless lockless, and the flush on return); `walk.handler`
    /// is not looked at. `handler` gets `mmu_lock` write iff the walk is not lockless.
    fn walk_hva_range(
        &self,
        walk: HvaRangeWalk,
        mut handler: impl FnMut(
            AsId,
            &Memslot,
            GfnRange,
            Option<&mut MmuWriteGuard<'_>>,
            &mut ZapBatch,
        ) -> bool,
    ) -> WalkResult {
        let mut result = WalkResult::default();
        if walk.end <= walk.start {
            return result;
        }
        let srcu = self.srcu_read();
        let mut mmu: Option<MmuWriteGuard<'_>> = None;
        let mut zapped = ZapBatch::empty();
        for (as_idx, cell) in self.memslots.iter().enumerate() {
            let as_id = AsId::new(as_idx as u8);
            let slots = cell.load(&srcu);
            slots.for_each_hva_overlap(walk.start, walk.end, |slot, gfns| {
                if !result.found_memslot {
                    result.found_memslot = true;
                    if !walk.lockless {
                        let guard = self.mmu_lock.write();
                        match walk.on_lock {
                            OnLock::Begin => self.invalidate.begin(guard.witness()),
                            OnLock::End => {
                                if let Err(e) = self.invalidate.end(guard.witness()) {
                                    panic!(
                                        "kvmmu bug: unbalanced invalidation ({e}) (spec §4 item 4)"
                                    );
                                }
                            }
                            OnLock::Nothing => {}
                        }
                        mmu = Some(guard);
                    }
                }
                result.ret |= handler(as_id, slot, gfns, mmu.as_mut(), &mut zapped);
            });
        }
        // `flush_on_ret`, before `mmu_lock` is dropped: one flush for everything the handlers
        // zapped (the batch), or for the young SPTEs `clear_flush_young` aged.
        let aged_flush = walk.flush_on_ret && result.ret && !zapped.needs_flush();
        zapped.commit(self);
        if aged_flush {
            self.flush_remote_tlbs();
        }
        drop(mmu);
        drop(srcu);
        result
    }

    fn run_handler(
        &self,
        handler: Handler,
        as_id: AsId,
        slot: &Memslot,
        gfns: GfnRange,
        mmu: Option<&mut MmuWriteGuard<'_>>,
        zapped: &mut ZapBatch,
    ) -> bool {
        let locked = mmu.as_ref().map(|m| m.witness());
        match handler {
            Handler::None => false,
            Handler::Unmap { may_block } => {
                let Some(mmu) = mmu else {
                    panic!("kvmmu bug: unmap handler without mmu_lock");
                };
                if let Err(e) = self.invalidate.range_add(gfns, mmu.witness()) {
                    panic!("kvmmu bug: {e} (spec §4 item 5)");
                }
                // `kvm_unmap_gfn_range`: rmaps first (if the slot has them), then the TDP MMU.
                let batch =
                    self.mmu
                        .unmap_gfn_range(as_id, slot.rmaps(), gfns, mmu, may_block, self);
                let flush = batch.needs_flush();
                zapped.merge(batch);
                flush
            }
            // `kvm_age_gfn` (spec §3.8 dispatch inside `Mmu`).
            Handler::Age => self
                .mmu
                .age_gfn_range(as_id, slot.rmaps(), gfns, locked, None),
            // `kvm_test_age_gfn`.
            Handler::TestAge => self
                .mmu
                .test_age_gfn_range(as_id, slot.rmaps(), gfns, locked),
        }
    }

    fn age_hva_range(&self, start: Hva, end: Hva, handler: Handler, flush_on_ret: bool) -> bool {
        self.counters.age_calls.fetch_add(1, Ordering::Relaxed);
        let young = self
            .handle_hva_range(HvaRangeWalk {
                start,
                end,
                handler,
                on_lock: OnLock::Nothing,
                flush_on_ret,
                lockless: self.aging_lockless(),
            })
            .ret;
        if young {
            self.counters.age_young.fetch_add(1, Ordering::Relaxed);
        }
        young
    }

    /// Ages `[young.start(), young.end())` in one hva-range walk (module protocol 4), setting the
    /// bit of every page some memslot maps to a young leaf; never clears a bit.
    fn age_hva_range_bitmap(&self, young: &mut YoungBitmap) {
        self.counters.age_calls.fetch_add(1, Ordering::Relaxed);
        let walk = HvaRangeWalk {
            start: young.start(),
            end: young.end(),
            handler: Handler::Age,
            on_lock: OnLock::Nothing,
            flush_on_ret: false,
            lockless: self.aging_lockless(),
        };
        let any = self
            .walk_hva_range(walk, |as_id, slot, gfns, mmu, _zapped| {
                let mut report = |g: GfnRange| {
                    // Every reported gfn lies in `gfns`, which lies in the slot.
                    if let Some(hva) = slot.gfn_to_hva(g.start()) {
                        young.set_hva_pages(hva, g.len());
                    }
                };
                let locked = mmu.as_ref().map(|m| m.witness());
                self.mmu
                    .age_gfn_range(as_id, slot.rmaps(), gfns, locked, Some(&mut report))
            })
            .ret;
        if any {
            self.counters.age_young.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn invalidate_range_start(&self, range: &NotifierRange) {
        self.counters
            .invalidate_starts
            .fetch_add(1, Ordering::Relaxed);
        *self.mn_invalidate.lock() += 1;
        // The host calls no end for a subscriber whose start panicked, so if the walk below
        // panics (a kvmmu bug: every caller that could deadlock is refused at the host's entry)
        // this start ends itself while unwinding. `mn_active_invalidate_count` is raised, so no
        // memslot swap happens in between: end's walk finds the memslots start's walk found and
        // lowers exactly what it raised (DESIGN invariant 1).
        struct EndOnUnwind<'a>(&'a VmInner, &'a NotifierRange);
        impl Drop for EndOnUnwind<'_> {
            fn drop(&mut self) {
                self.0.invalidate_range_end(self.1);
            }
        }
        let end_on_unwind = EndOnUnwind(self, range);
        self.handle_hva_range(HvaRangeWalk {
            start: range.start,
            end: range.end,
            handler: Handler::Unmap {
                may_block: range.blockable,
            },
            on_lock: OnLock::Begin,
            flush_on_ret: true,
            lockless: false,
        });
        core::mem::forget(end_on_unwind);
    }

    fn invalidate_range_end(&self, range: &NotifierRange) {
        self.handle_hva_range(HvaRangeWalk {
            start: range.start,
            end: range.end,
            handler: Handler::None,
            on_lock: OnLock::End,
            flush_on_ret: false,
            lockless: false,
        });
        let mut mn = self.mn_invalidate.lock();
        if *mn == 0 {
            panic!("kvmmu bug: invalidate_range_end without start (spec §4 item 1)");
        }
        *mn -= 1;
        let wake = *mn == 0;
        drop(mn);
        if wake {
            self.mn_memslots_update.notify_all();
        }
        self.counters
            .invalidate_ends
            .fetch_add(1, Ordering::Relaxed);
    }
}

/// The VM's subscription to its host's MMU notifiers.
pub(crate) struct VmNotifier {
    vm: Weak<VmInner>,
}

impl VmNotifier {
    pub(crate) fn new(vm: &Arc<VmInner>) -> VmNotifier {
        VmNotifier {
            vm: Arc::downgrade(vm),
        }
    }
}

impl MmuNotifier for VmNotifier {
    fn invalidate_range_start(&self, range: &NotifierRange) {
        if let Some(vm) = self.vm.upgrade() {
            vm.invalidate_range_start(range);
        }
    }

    fn invalidate_range_end(&self, range: &NotifierRange) {
        if let Some(vm) = self.vm.upgrade() {
            vm.invalidate_range_end(range);
        }
    }

    fn clear_flush_young(&self, start: Hva, end: Hva) -> bool {
        self.vm.upgrade().is_some_and(|vm| {
            let flush = !vm.config.elide_tlb_flush_if_young;
            vm.age_hva_range(start, end, Handler::Age, flush)
        })
    }

    fn clear_young(&self, start: Hva, end: Hva) -> bool {
        self.vm
            .upgrade()
            .is_some_and(|vm| vm.age_hva_range(start, end, Handler::Age, false))
    }

    fn clear_young_bitmap(&self, young: &mut YoungBitmap) {
        if let Some(vm) = self.vm.upgrade() {
            vm.age_hva_range_bitmap(young);
        }
    }

    fn test_young(&self, addr: Hva) -> bool {
        self.vm.upgrade().is_some_and(|vm| {
            let end = addr.checked_add(1).unwrap_or(addr);
            vm.age_hva_range(addr, end, Handler::TestAge, false)
        })
    }

    fn release(&self) {
        if let Some(vm) = self.vm.upgrade() {
            vm.teardown();
        }
    }
}
