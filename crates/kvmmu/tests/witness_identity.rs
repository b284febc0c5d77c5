//! Lock witnesses prove *which* `mmu_lock` is held: every entry point that trusts `mmu_lock` (or an
//! RCU domain) refuses a witness of another one, in debug and release builds, before it reads or
//! changes anything. Without the identity check each of these calls would run under a lock that
//! does not exclude the other VM's writers (tables freed under a walker, descriptors freed under a
//! chain walk).
#![cfg(not(loom))]

use std::sync::atomic::AtomicU64;

use kvmmu::internals::addr::{AsId, Gfn, GfnRange, Level, Pfn};
use kvmmu::internals::mmu::shadow::rmap::{RmapHead, RmapStats, SptePtr};
use kvmmu::internals::mmu::shadow::{ShadowMmu, SlotRmaps};
use kvmmu::internals::mmu::tdp::TdpMmu;
use kvmmu::internals::mmu::{FaultOutcome, MapRequest, RemoteTlbFlush};
use kvmmu::internals::sync::Arc;
use kvmmu::internals::sync::rcu::Rcu;
use kvmmu::internals::sync::witness::MmuLock;
use kvmmu::internals::vm::seq::InvalidateState;

const AS0: AsId = AsId::new(0);

struct NoVcpus;
impl RemoteTlbFlush for NoVcpus {
    fn flush_remote_tlbs(&self) {}
}

fn req(gfn: u64) -> MapRequest {
    MapRequest {
        gfn: Gfn::new(gfn),
        pfn: Pfn::new(gfn + 7),
        level: Level::L4K,
        host_writable: true,
        write_fault: true,
        prefetch: false,
    }
}

fn range(start: u64, end: u64) -> GfnRange {
    GfnRange::new(Gfn::new(start), Gfn::new(end)).unwrap()
}

/// A TDP MMU that has mapped gfns 0..64 under `lock`.
fn tdp_mapped_under(lock: &MmuLock) -> (Arc<Rcu>, TdpMmu) {
    let rcu = Arc::new(Rcu::new());
    let tdp = TdpMmu::new(1, Arc::clone(&rcu));
    tdp.bind_lock(lock);
    {
        let r = lock.read();
        let root = tdp.get_root(AS0, r.witness());
        let g = rcu.pin();
        for gfn in 0..64 {
            assert_eq!(
                tdp.map(&root, &req(gfn), r.witness(), &g),
                FaultOutcome::Fixed
            );
        }
    }
    (rcu, tdp)
}

#[test]
#[should_panic(expected = "witness of another mmu_lock")]
fn a_tdp_zap_under_another_vms_lock_is_refused() {
    let (mine, other) = (MmuLock::new(), MmuLock::new());
    let (_rcu, tdp) = tdp_mapped_under(&mine);
    // A fault may hold `mine` for read right now: a zap under `other` would free its tables.
    let mut w = other.write();
    let _ = tdp.zap_leafs(AS0, range(0, 64), &mut w, true, &NoVcpus);
}

#[test]
#[should_panic(expected = "witness of another mmu_lock")]
fn a_tdp_fault_under_another_vms_lock_is_refused() {
    let (mine, other) = (MmuLock::new(), MmuLock::new());
    let (rcu, tdp) = tdp_mapped_under(&mine);
    let root = {
        let r = mine.read();
        tdp.get_root(AS0, r.witness())
    };
    // A zap may hold `mine` for write right now: a map under `other` would walk its tables.
    let r = other.read();
    let g = rcu.pin();
    let _ = tdp.map(&root, &req(100), r.witness(), &g);
}

#[test]
#[should_panic(expected = "witness of another mmu_lock")]
fn a_tdp_get_root_under_another_vms_lock_is_refused() {
    let (mine, other) = (MmuLock::new(), MmuLock::new());
    let (_rcu, tdp) = tdp_mapped_under(&mine);
    let r = other.read();
    let _ = tdp.get_root(AS0, r.witness());
}

#[test]
#[should_panic(expected = "another RCU domain")]
fn a_tdp_map_under_another_rcu_domain_is_refused() {
    let lock = MmuLock::new();
    let (_rcu, tdp) = tdp_mapped_under(&lock);
    let foreign = Rcu::new();
    let r = lock.read();
    let root = tdp.get_root(AS0, r.witness());
    let g = foreign.pin();
    let _ = tdp.map(&root, &req(100), r.witness(), &g);
}

#[test]
#[should_panic(expected = "witness of another mmu_lock")]
fn a_shadow_zap_under_another_vms_lock_is_refused() {
    let (mine, other) = (MmuLock::new(), MmuLock::new());
    let shadow = ShadowMmu::new(1);
    shadow.bind_lock(&mine);
    let rmaps = SlotRmaps::new(range(0, 64)).unwrap();
    {
        let w = mine.write();
        let root = shadow.get_root(AS0, w.witness());
        for gfn in 0..64 {
            assert_eq!(
                shadow.map(&root, &req(gfn), &rmaps, w.witness(), &NoVcpus),
                FaultOutcome::Fixed
            );
        }
        drop(w);
        let mut w = other.write();
        let _ = shadow.zap_gfn_range(&rmaps, range(0, 64), &mut w, false, &NoVcpus);
    }
}

#[test]
fn rmap_count_and_shape_refuse_a_foreign_witness() {
    let (mine, other) = (MmuLock::new(), MmuLock::new());
    let stats = RmapStats::new();
    stats.bind_lock(&mine);
    let head = RmapHead::new();
    let slots: Vec<AtomicU64> = (0..8).map(|_| AtomicU64::new(0)).collect();
    {
        let w = mine.write();
        for s in &slots {
            // SAFETY: `slots` outlives every use of the pointers (they are removed below).
            let _ = head.pte_list_add(w.witness(), &stats, unsafe { SptePtr::new(s) });
        }
        assert_eq!(head.count(w.witness(), &stats), 8);
    }
    let w = other.write();
    let count = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        head.count(w.witness(), &stats)
    }));
    assert!(
        count.is_err(),
        "count under another VM's lock must be refused"
    );
    let shape = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        head.shape(w.witness(), &stats)
    }));
    assert!(
        shape.is_err(),
        "shape under another VM's lock must be refused"
    );
    drop(w);
    let w = mine.write();
    let _ = head.zap_all(w.witness(), &stats, |_| {});
    assert_eq!(
        head.count(w.witness(), &stats),
        0,
        "the owner's witness still works"
    );
}

#[test]
#[should_panic(expected = "witness of another mmu_lock")]
fn invalidation_counters_refuse_a_foreign_witness() {
    let (mine, other) = (MmuLock::new(), MmuLock::new());
    let state = InvalidateState::bound_to(&mine);
    state.begin(mine.write().witness());
    state.end(other.write().witness()).unwrap();
}
