//! TDP MMU behaviour, single-threaded: faults, spurious faults, zaps, aging, root invalidation and
//! teardown, plus a model-based check of random operation sequences against a `HashMap`.
#![cfg(not(loom))]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use kvmmu::internals::addr::{AsId, Gfn, GfnRange, Level, Pfn};
use kvmmu::internals::mmu::tdp::TdpMmu;
use kvmmu::internals::mmu::{FaultOutcome, HwWalk, MapRequest, RemoteTlbFlush, RetryReason};
use kvmmu::internals::sync::Arc;
use kvmmu::internals::sync::rcu::Rcu;
use kvmmu::internals::sync::witness::MmuLock;
use proptest::prelude::*;

const AS0: AsId = AsId::new(0);

#[derive(Default)]
struct CountingFlusher(AtomicUsize);

impl RemoteTlbFlush for CountingFlusher {
    fn flush_remote_tlbs(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

fn req(gfn: u64, write: bool) -> MapRequest {
    MapRequest {
        gfn: Gfn::new(gfn),
        pfn: Pfn::new(gfn + 1000),
        level: Level::L4K,
        host_writable: true,
        write_fault: write,
        prefetch: false,
    }
}

fn range(start: u64, end: u64) -> GfnRange {
    GfnRange::new(Gfn::new(start), Gfn::new(end)).unwrap()
}

struct Vm {
    rcu: Arc<Rcu>,
    lock: MmuLock,
    tdp: TdpMmu,
    flusher: CountingFlusher,
}

impl Vm {
    fn new() -> Vm {
        let rcu = Arc::new(Rcu::new());
        Vm {
            tdp: TdpMmu::new(2, Arc::clone(&rcu)),
            rcu,
            lock: MmuLock::new(),
            flusher: CountingFlusher::default(),
        }
    }
    fn map(&self, r: MapRequest) -> FaultOutcome {
        self.map_as(AS0, r)
    }
    fn map_as(&self, as_id: AsId, r: MapRequest) -> FaultOutcome {
        let mmu = self.lock.read();
        let root = self.tdp.get_root(as_id, mmu.witness());
        let rcu = self.rcu.pin();
        self.tdp.map(&root, &r, mmu.witness(), &rcu)
    }
    fn walk(&self, gfn: u64, write: bool) -> HwWalk {
        let root = {
            let mmu = self.lock.read();
            self.tdp.get_root(AS0, mmu.witness())
        };
        let rcu = self.rcu.pin();
        self.tdp.hardware_walk(&root, Gfn::new(gfn), write, &rcu)
    }
    fn zap(&self, start: u64, end: u64) -> bool {
        let mut mmu = self.lock.write();
        self.tdp
            .zap_leafs(AS0, range(start, end), &mut mmu, true, &self.flusher)
    }
    fn age(&self, start: u64, end: u64) -> bool {
        let rcu = self.rcu.pin();
        self.tdp.age_gfn_range(AS0, range(start, end), &rcu)
    }
    fn test_age(&self, start: u64, end: u64) -> bool {
        let rcu = self.rcu.pin();
        self.tdp.test_age_gfn_range(AS0, range(start, end), &rcu)
    }
    fn leaf(&self, gfn: u64) -> Option<kvmmu::internals::mmu::spte::Spte> {
        let rcu = self.rcu.pin();
        self.tdp.leaf(AS0, Gfn::new(gfn), &rcu).map(|(s, l)| {
            assert_eq!(l, Level::L4K);
            s
        })
    }
    fn teardown_and_check_no_leaks(self) {
        {
            let mut mmu = self.lock.write();
            self.tdp.teardown(&mut mmu, &self.flusher);
        }
        self.rcu.synchronize();
        let s = self.tdp.stats();
        assert_eq!(
            s.tables_allocated, s.tables_freed,
            "every page-table page is freed: {s:?}"
        );
        assert_eq!(
            s.roots_allocated, s.roots_freed,
            "every root is freed: {s:?}"
        );
        assert_eq!(self.rcu.pending(), 0);
    }
}

#[test]
fn map_then_hardware_walk_hits_with_the_pfn() {
    let vm = Vm::new();
    assert_eq!(vm.map(req(0x1234, false)), FaultOutcome::Fixed);
    assert_eq!(
        vm.walk(0x1234, false),
        HwWalk::Hit {
            pfn: Pfn::new(0x1234 + 1000),
            writable: false,
            dirty: false,
            executable: true,
            level: Level::L4K
        }
    );
    assert_eq!(
        vm.walk(0x1234, true),
        HwWalk::WriteProtected,
        "a read fault maps read-only"
    );
    assert_eq!(vm.walk(0x1235, false), HwWalk::NotPresent);
    assert_eq!(
        vm.map(req(0x1234, true)),
        FaultOutcome::Fixed,
        "a write fault upgrades the leaf"
    );
    assert_eq!(
        vm.walk(0x1234, true),
        HwWalk::Hit {
            pfn: Pfn::new(0x1234 + 1000),
            writable: true,
            dirty: true,
            executable: true,
            level: Level::L4K
        }
    );
    assert_eq!(vm.tdp.stats().leaves_installed, 2);
    vm.teardown_and_check_no_leaks();
}

#[test]
fn second_identical_map_is_spurious() {
    let vm = Vm::new();
    assert_eq!(vm.map(req(7, true)), FaultOutcome::Fixed);
    let before = vm.leaf(7).unwrap();
    assert_eq!(vm.map(req(7, true)), FaultOutcome::Spurious);
    assert_eq!(
        vm.map(req(7, false)),
        FaultOutcome::Spurious,
        "a writable leaf allows reads"
    );
    assert_eq!(
        vm.leaf(7).unwrap(),
        before,
        "a spurious fault changes nothing"
    );
    assert_eq!(vm.tdp.stats().leaves_installed, 1);
    vm.teardown_and_check_no_leaks();
}

#[test]
fn gfn_beyond_the_address_width_is_rejected_without_side_effects() {
    let vm = Vm::new();
    let limit = TdpMmu::GFN_LIMIT.raw();
    assert_eq!(vm.map(req(limit, false)), FaultOutcome::OutOfRange);
    assert_eq!(vm.walk(limit, false), HwWalk::NotPresent);
    assert!(!vm.zap(limit, limit + 10));
    let s = vm.tdp.stats();
    assert_eq!(
        (s.leaves_installed, s.tables_allocated),
        (0, 1),
        "only the root table exists"
    );
    vm.teardown_and_check_no_leaks();
}

#[test]
fn zap_leafs_removes_exactly_the_range_and_reports_flush() {
    let vm = Vm::new();
    let gfns: Vec<u64> = (500..530).chain([1 << 18, (1 << 27) + 5]).collect();
    for &g in &gfns {
        assert_eq!(vm.map(req(g, g % 2 == 0)), FaultOutcome::Fixed);
    }
    assert!(
        vm.zap(510, 520),
        "zapping present leaves of a valid root needs a flush"
    );
    assert_eq!(
        vm.tdp.stats().dirty_leaves_zapped,
        5,
        "the written (dirty) leaves among 510..520"
    );
    for &g in &gfns {
        assert_eq!(vm.leaf(g).is_some(), !(510..520).contains(&g), "gfn {g}");
    }
    assert!(!vm.zap(510, 520), "nothing left to zap: no flush needed");
    assert!(vm.zap(0, u64::MAX), "the whole space");
    assert!(gfns.iter().all(|&g| vm.leaf(g).is_none()));
    assert_eq!(vm.tdp.stats().leaves_zapped, gfns.len() as u64);
    vm.teardown_and_check_no_leaks();
}

#[test]
fn aging_clears_accessed_only_where_set_and_reports_young() {
    let vm = Vm::new();
    for g in 0..4 {
        assert_eq!(vm.map(req(g, true)), FaultOutcome::Fixed);
    }
    let prefetched = MapRequest {
        prefetch: true,
        ..req(10, true)
    };
    assert_eq!(vm.map(prefetched), FaultOutcome::Fixed);
    assert!(
        !vm.leaf(10).unwrap().is_accessed(),
        "a prefetched leaf starts old"
    );
    assert!(!vm.age(10, 11), "an old leaf is not young");
    assert_eq!(
        vm.tdp.stats().accessed_cleared,
        0,
        "nothing cleared where A was clear"
    );
    assert!(vm.age(0, 2));
    assert_eq!(vm.tdp.stats().accessed_cleared, 2);
    for g in 0..2 {
        let s = vm.leaf(g).unwrap();
        assert!(!s.is_accessed(), "aged gfn {g} is old");
        assert!(
            s.is_dirty() && s.is_writable(),
            "aging never touches D or W"
        );
    }
    assert!(
        vm.leaf(2).unwrap().is_accessed() && vm.leaf(3).unwrap().is_accessed(),
        "outside the range"
    );
    assert!(!vm.age(0, 2), "already old");
    assert_eq!(
        vm.walk(1, false),
        HwWalk::Hit {
            pfn: Pfn::new(1001),
            writable: true,
            dirty: true,
            executable: true,
            level: Level::L4K
        }
    );
    assert!(vm.age(0, 2), "the CPU's access made it young again");
    assert!(!vm.age(100, 200), "no leaves");
    vm.teardown_and_check_no_leaks();
}

#[test]
fn test_age_modifies_nothing() {
    let vm = Vm::new();
    for g in [3, 4, 600] {
        assert_eq!(vm.map(req(g, false)), FaultOutcome::Fixed);
    }
    assert!(vm.age(4, 5));
    let before: Vec<_> = [3, 4, 600].iter().map(|&g| vm.leaf(g)).collect();
    assert!(vm.test_age(0, 1000));
    assert!(vm.test_age(3, 4));
    assert!(!vm.test_age(4, 5), "gfn 4 was aged");
    assert!(!vm.test_age(5, 600));
    let after: Vec<_> = [3, 4, 600].iter().map(|&g| vm.leaf(g)).collect();
    assert_eq!(before, after, "test_age leaves every SPTE as it was");
    assert_eq!(vm.tdp.stats().accessed_cleared, 1);
    vm.teardown_and_check_no_leaks();
}

#[test]
fn invalid_roots_are_not_aged_but_are_zapped() {
    let vm = Vm::new();
    let old_root = {
        let mmu = vm.lock.read();
        vm.tdp.get_root(AS0, mmu.witness())
    };
    assert_eq!(vm.map(req(42, true)), FaultOutcome::Fixed);
    vm.tdp.invalidate_all_roots(vm.lock.write().witness());
    assert!(old_root.is_invalid());
    assert!(
        !vm.test_age(0, 100),
        "invalid roots are not looked at by test_age"
    );
    assert!(!vm.age(0, 100), "invalid roots are not aged");
    {
        let mmu = vm.lock.read();
        let rcu = vm.rcu.pin();
        assert_eq!(
            vm.tdp.leaf(AS0, Gfn::new(42), &rcu),
            None,
            "leaf() reads the valid root only"
        );
        assert!(matches!(
            vm.tdp.hardware_walk(&old_root, Gfn::new(42), false, &rcu),
            HwWalk::Hit { .. }
        ));
        assert_eq!(
            vm.tdp.map(&old_root, &req(43, false), mmu.witness(), &rcu),
            FaultOutcome::Retry(RetryReason::InvalidRoot),
            "nothing is installed into an invalid root"
        );
    }
    assert!(!vm.zap(0, 100), "zapping an invalid root needs no flush");
    {
        let rcu = vm.rcu.pin();
        assert_eq!(
            vm.tdp.hardware_walk(&old_root, Gfn::new(42), false, &rcu),
            HwWalk::NotPresent,
            "but it is zapped"
        );
    }
    assert_eq!(vm.tdp.stats().leaves_zapped, 1);
    // A new valid root is created on demand and is independent.
    assert_eq!(vm.map(req(42, false)), FaultOutcome::Fixed);
    {
        let mut mmu = vm.lock.write();
        vm.tdp.zap_invalidated_roots(&mut mmu, &vm.flusher);
    }
    vm.rcu.synchronize();
    assert_eq!(
        vm.tdp.stats().roots_freed,
        0,
        "our RootRef still holds the old root"
    );
    drop(old_root);
    vm.rcu.synchronize();
    assert_eq!(
        vm.tdp.stats().roots_freed,
        1,
        "the last put frees the invalid root"
    );
    assert!(vm.leaf(42).is_some(), "the new root still maps gfn 42");
    vm.teardown_and_check_no_leaks();
}

#[test]
fn address_spaces_have_separate_roots() {
    let vm = Vm::new();
    assert_eq!(vm.map_as(AsId::new(1), req(9, true)), FaultOutcome::Fixed);
    assert!(vm.leaf(9).is_none(), "as 0 does not see as 1's mapping");
    let rcu = vm.rcu.pin();
    assert!(vm.tdp.leaf(AsId::new(1), Gfn::new(9), &rcu).is_some());
    assert!(!vm.tdp.age_gfn_range(AS0, range(0, 100), &rcu));
    assert!(vm.tdp.age_gfn_range(AsId::new(1), range(0, 100), &rcu));
    drop(rcu);
    vm.teardown_and_check_no_leaks();
}

#[test]
fn teardown_frees_all_tables() {
    let vm = Vm::new();
    for g in (0..2048)
        .step_by(3)
        .chain([1 << 20, 1 << 30, (1 << 35) + 1])
    {
        assert_eq!(vm.map(req(g, true)), FaultOutcome::Fixed);
    }
    let s = vm.tdp.stats();
    assert!(s.tables_allocated > 8 && s.tables_freed == 0, "{s:?}");
    let flushes_before = vm.flusher.0.load(Ordering::Relaxed);
    {
        let mut mmu = vm.lock.write();
        vm.tdp.teardown(&mut mmu, &vm.flusher);
    }
    assert!(
        vm.flusher.0.load(Ordering::Relaxed) > flushes_before,
        "tables are retired only after a flush"
    );
    vm.teardown_and_check_no_leaks();
}

/// One step of a random sequence.
#[derive(Clone, Debug)]
enum Op {
    Map { gfn: u64, write: bool },
    Zap { start: u64, len: u64 },
    Age { start: u64, len: u64 },
    TestAge { start: u64, len: u64 },
    Hw { gfn: u64, write: bool },
}

/// Gfns spread over table boundaries at every level.
const BASES: [u64; 4] = [0, 510, (1 << 18) - 3, (1 << 27) + 500];

fn gfn_strategy() -> impl Strategy<Value = u64> {
    (0..BASES.len(), 0u64..8).prop_map(|(b, off)| BASES[b] + off)
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let len = 0u64..20;
    prop_oneof![
        3 => (gfn_strategy(), any::<bool>()).prop_map(|(gfn, write)| Op::Map { gfn, write }),
        1 => (gfn_strategy(), len.clone()).prop_map(|(start, len)| Op::Zap { start, len }),
        1 => (gfn_strategy(), len.clone()).prop_map(|(start, len)| Op::Age { start, len }),
        1 => (gfn_strategy(), len).prop_map(|(start, len)| Op::TestAge { start, len }),
        2 => (gfn_strategy(), any::<bool>()).prop_map(|(gfn, write)| Op::Hw { gfn, write }),
    ]
}

/// The model's view of one leaf.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct ModelLeaf {
    writable: bool,
    accessed: bool,
    dirty: bool,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn random_map_zap_age_sequences_match_a_hashmap_model(ops in proptest::collection::vec(op_strategy(), 1..60)) {
        let vm = Vm::new();
        let mut model: HashMap<u64, ModelLeaf> = HashMap::new();
        for op in &ops {
            match *op {
                Op::Map { gfn, write } => {
                    let expect = match model.get(&gfn) {
                        Some(l) if !write || l.writable => FaultOutcome::Spurious,
                        _ => FaultOutcome::Fixed,
                    };
                    if expect == FaultOutcome::Fixed {
                        model.insert(gfn, ModelLeaf { writable: write, accessed: true, dirty: write });
                    }
                    prop_assert_eq!(vm.map(req(gfn, write)), expect);
                }
                Op::Zap { start, len } => {
                    let end = start + len;
                    let any = model.keys().any(|g| (start..end).contains(g));
                    model.retain(|g, _| !(start..end).contains(g));
                    prop_assert_eq!(vm.zap(start, end), any);
                }
                Op::Age { start, len } => {
                    let end = start + len;
                    let mut young = false;
                    for (_, l) in model.iter_mut().filter(|(g, _)| (start..end).contains(*g)) {
                        young |= l.accessed;
                        l.accessed = false;
                    }
                    prop_assert_eq!(vm.age(start, end), young);
                }
                Op::TestAge { start, len } => {
                    let end = start + len;
                    let young = model.iter().any(|(g, l)| (start..end).contains(g) && l.accessed);
                    prop_assert_eq!(vm.test_age(start, end), young);
                }
                Op::Hw { gfn, write } => {
                    let expect = match model.get_mut(&gfn) {
                        None => HwWalk::NotPresent,
                        Some(l) if write && !l.writable => HwWalk::WriteProtected,
                        Some(l) => {
                            l.accessed = true;
                            l.dirty |= write;
                            HwWalk::Hit { pfn: Pfn::new(gfn + 1000), writable: l.writable, dirty: l.dirty, executable: true, level: Level::L4K }
                        }
                    };
                    prop_assert_eq!(vm.walk(gfn, write), expect);
                }
            }
        }
        for b in BASES {
            for gfn in b..b + 8 {
                let got = vm.leaf(gfn).map(|s| {
                    assert_eq!(s.pfn(), Pfn::new(gfn + 1000));
                    ModelLeaf { writable: s.is_writable(), accessed: s.is_accessed(), dirty: s.is_dirty() }
                });
                prop_assert_eq!(got, model.get(&gfn).copied(), "gfn {:#x}", gfn);
            }
        }
        vm.teardown_and_check_no_leaks();
    }
}

/// Page tables are retired through the TDP MMU's own RCU domain, so walking them under a guard of
/// another domain would not keep them alive: it is refused (review finding).
#[test]
#[should_panic(expected = "another RCU domain")]
fn walking_under_a_guard_of_another_rcu_domain_is_refused() {
    use kvmmu::internals::addr::{AsId, Gfn, GfnRange};
    use kvmmu::internals::mmu::tdp::TdpMmu;
    use kvmmu::internals::sync::Arc;
    use kvmmu::internals::sync::rcu::Rcu;
    let tdp = TdpMmu::new(1, Arc::new(Rcu::new()));
    let other = Rcu::new();
    let guard = other.pin();
    let range = GfnRange::from_len(Gfn::new(0), 16).unwrap();
    let _ = tdp.age_gfn_range(AsId::new(0), range, &guard);
}
