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
//! The subscription holds a strong reference to the VM (no `Weak::upgrade` per call); `Vm`'s drop,
//! `Vm::shutdown` and the host's `release` take it off the host's list, so a dropped VM is freed
//! (see [`VmNotifier`]).

use super::VmInner;
use crate::addr::{AsId, GfnRange, Hva};
use crate::host::{MmuNotifier, NotifierRange, YoungBitmap};
use crate::mmu::{RemoteTlbFlush, ZapBatch};
use crate::sync::Arc;
use crate::sync::atomic::Ordering;
use crate::sync::witness::MmuWriteGuard;
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
        let _trace =
            tracing::trace_span!("age_hva_range", start = start.raw(), end = end.raw()).entered();
        self.counters.age_calls.add(1);
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
            self.counters.age_young.add(1);
        }
        young
    }

    /// Ages `[young.start(), young.end())` in one hva-range walk (notifier step 4, as in the
    /// module doc and docs/invariants.md "Notifier callbacks"), setting the
    /// bit of every page some memslot maps to a young leaf; never clears a bit.
    fn age_hva_range_bitmap(&self, young: &mut YoungBitmap) {
        let _trace = tracing::trace_span!("age_hva_range_bitmap").entered();
        self.counters.age_calls.add(1);
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
            self.counters.age_young.add(1);
        }
    }

    fn invalidate_range_start(&self, range: &NotifierRange) {
        let _trace =
            tracing::trace_span!("invalidate_range_start", start = range.start.raw()).entered();
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
        let _trace =
            tracing::trace_span!("invalidate_range_end", start = range.start.raw()).entered();
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
///
/// It holds a strong reference: a notifier call reaches the VM through a plain pointer, with no
/// `Weak::upgrade` (an atomic read-modify-write on the VM's one shared reference count, from every
/// ager and invalidation at once; issue 9 item 7). The reference cycle this makes (VM → host →
/// subscriber list → subscription → VM) is broken by whichever comes first of `Vm`'s drop or
/// `shutdown` (teardown, then unsubscribe: docs/locking.md "Teardown before unsubscribe") and the
/// host's `release` (which takes every subscriber off the list). A `Vm` whose drop was refused
/// because its thread held a vCPU in guest mode stays subscribed, and therefore alive, until the
/// host's `release`: it was never torn down, so the host must keep reaching it.
pub(crate) struct VmNotifier {
    vm: Arc<VmInner>,
}

impl VmNotifier {
    pub(crate) fn new(vm: &Arc<VmInner>) -> VmNotifier {
        VmNotifier { vm: Arc::clone(vm) }
    }
}

impl MmuNotifier for VmNotifier {
    fn invalidate_range_start(&self, range: &NotifierRange) {
        self.vm.invalidate_range_start(range);
    }

    fn invalidate_range_end(&self, range: &NotifierRange) {
        self.vm.invalidate_range_end(range);
    }

    fn clear_flush_young(&self, start: Hva, end: Hva) -> bool {
        let flush = !self.vm.config.elide_tlb_flush_if_young;
        self.vm.age_hva_range(start, end, Handler::Age, flush)
    }

    fn clear_young(&self, start: Hva, end: Hva) -> bool {
        self.vm.age_hva_range(start, end, Handler::Age, false)
    }

    fn clear_young_bitmap(&self, young: &mut YoungBitmap) {
        self.vm.age_hva_range_bitmap(young);
    }

    fn test_young(&self, addr: Hva) -> bool {
        let end = addr.checked_add(1).unwrap_or(addr);
        self.vm.age_hva_range(addr, end, Handler::TestAge, false)
    }

    fn release(&self) {
        self.vm.teardown();
    }
}

#[cfg(test)]
mod tests {
    use crate::addr::{AsId, Gpa, SlotId};
    use crate::config::{MmuKind, VmConfig};
    use crate::host::{HostConfig, HostMm, Prot};
    use crate::sync::Arc;
    use crate::vm::Vm;
    use crate::vm::memslot::{MemFlags, MemoryRegion};

    /// A VM with one 64 KiB memslot at gpa 0, and a vCPU that wrote a page (so it has SPTEs).
    fn vm_with_sptes(host: &HostMm, mmu: MmuKind) -> Vm {
        let vm = Vm::new(
            host,
            VmConfig {
                mmu,
                ..VmConfig::default()
            },
        )
        .unwrap();
        let hva = host.mmap(1 << 16, Prot::READ | Prot::WRITE).unwrap();
        vm.set_user_memory_region(MemoryRegion {
            slot: SlotId::new(0),
            as_id: AsId::new(0),
            flags: MemFlags::empty(),
            gpa: Gpa::new(0),
            size: 1 << 16,
            hva,
        })
        .unwrap();
        let mut vcpu = vm.create_vcpu().unwrap();
        vcpu.write_u64(Gpa::new(0x1000), 7).unwrap();
        drop(vcpu);
        vm
    }

    #[test]
    fn dropping_a_vm_frees_it_although_its_subscription_holds_it_strongly() {
        for mmu in [MmuKind::Tdp, MmuKind::Shadow] {
            let host = HostMm::new(HostConfig { frames: 256 }).unwrap();
            let vm = vm_with_sptes(&host, mmu);
            let weak = Arc::downgrade(vm.inner());
            drop(vm);
            assert!(weak.upgrade().is_none(), "{mmu:?}: the VM leaked");
            assert_eq!(host.stats().subscribers, 0);
        }
    }

    #[test]
    fn shutting_a_vm_down_frees_it() {
        let host = HostMm::new(HostConfig { frames: 256 }).unwrap();
        let vm = vm_with_sptes(&host, MmuKind::Tdp);
        let weak = Arc::downgrade(vm.inner());
        let _ = vm.shutdown();
        assert!(weak.upgrade().is_none(), "the VM leaked");
    }

    #[test]
    fn a_vm_released_by_its_host_is_freed_when_dropped_and_the_host_when_both_go() {
        let host = HostMm::new(HostConfig { frames: 256 }).unwrap();
        let vm = vm_with_sptes(&host, MmuKind::Shadow);
        let weak = Arc::downgrade(vm.inner());
        host.release();
        assert!(vm.is_dead());
        assert_eq!(host.stats().subscribers, 0);
        drop(vm);
        assert!(weak.upgrade().is_none(), "the VM leaked");
    }

    #[test]
    fn aging_counters_are_exact_under_concurrent_agers() {
        const AGERS: u64 = 4;
        const ROUNDS: u64 = 200;
        let host = HostMm::new(HostConfig { frames: 256 }).unwrap();
        let vm = vm_with_sptes(&host, MmuKind::Tdp);
        let hva = vm.memslots(AsId::new(0)).unwrap()[0].userspace_addr();
        std::thread::scope(|s| {
            for _ in 0..AGERS {
                s.spawn(|| {
                    for _ in 0..ROUNDS {
                        host.clear_young(hva, 1 << 16).unwrap();
                        host.test_young(hva).unwrap();
                    }
                });
            }
        });
        let (v, h) = (vm.stats(), host.stats());
        assert_eq!(
            v.age_calls,
            2 * AGERS * ROUNDS,
            "every VM aging call counted once"
        );
        assert_eq!(h.aging_calls, 2 * AGERS * ROUNDS, "one subscriber per call");
        assert!(v.age_young >= 1 && v.age_young <= v.age_calls);
    }
}
