//! Loom models of dirty logging on the production TDP code: the fast page fault's CAS
//! (`TdpMmu::fast_page_fault`), the re-arm (`TdpMmu::write_protect_range` under `mmu_lock`
//! write, after taking the bitmap word), the lockless ager (`age_gfn_range`), a zap
//! (`zap_leafs`) and the CPU's walk. The bitmap word is modelled here with the VM's protocol
//! (vm/dirty_log.rs: mark after a fixed fast fault, before the write; exchange under `mmu_lock`
//! write before write-protecting).
//!
//! Run: `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target-loom cargo test --release -p kvmmu --test loom_dirty`
#![cfg(loom)]

use kvmmu::internals::addr::{AsId, Gfn, GfnRange, Level, Pfn};
use kvmmu::internals::mmu::tdp::dirty::FastFault;
use kvmmu::internals::mmu::tdp::{RootRef, TdpMmu};
use kvmmu::internals::mmu::{FaultOutcome, HwWalk, MapRequest, RemoteTlbFlush};
use kvmmu::internals::sync::Arc;
use kvmmu::internals::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use kvmmu::internals::sync::rcu::Rcu;
use kvmmu::internals::sync::witness::MmuLock;
use loom::thread;

const AS0: AsId = AsId::new(0);

struct Flusher(AtomicUsize);

impl RemoteTlbFlush for Flusher {
    fn flush_remote_tlbs(&self) {
        // ORDERING: a counter only.
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

fn range(start: u64, end: u64) -> GfnRange {
    GfnRange::new(Gfn::new(start), Gfn::new(end)).unwrap()
}

struct World {
    rcu: Arc<Rcu>,
    lock: Arc<MmuLock>,
    tdp: Arc<TdpMmu>,
    /// Bit 0: gfn 0's dirty bit.
    bitmap: Arc<AtomicU64>,
}

impl World {
    /// gfn 0 mapped writable, then harvested and re-armed: write-protected, MMU-writable, clean
    /// bitmap.
    fn rearmed() -> World {
        let rcu = Arc::new(Rcu::new());
        let w = World {
            tdp: Arc::new(TdpMmu::new(1, Arc::clone(&rcu))),
            rcu,
            lock: Arc::new(MmuLock::new()),
            bitmap: Arc::new(AtomicU64::new(0)),
        };
        {
            let mmu = w.lock.read();
            let root = w.tdp.get_root(AS0, mmu.witness());
            let g = w.rcu.pin();
            let req = MapRequest {
                gfn: Gfn::new(0),
                pfn: Pfn::new(100),
                level: Level::L4K,
                host_writable: true,
                write_fault: true,
                prefetch: false,
            };
            assert_eq!(
                w.tdp.map(&root, &req, mmu.witness(), &g),
                FaultOutcome::Fixed
            );
        }
        {
            let mmu = w.lock.write();
            let g = w.rcu.pin();
            assert!(
                w.tdp
                    .write_protect_range(AS0, range(0, 1), |_| true, mmu.witness(), &g)
            );
        }
        w
    }
    fn root(&self) -> RootRef {
        let mmu = self.lock.read();
        self.tdp.get_root(AS0, mmu.witness())
    }
    /// A vCPU's write to gfn 0: the fast page fault (marking on success), then the walk. Returns
    /// true if the write was performed.
    fn vcpu(&self) -> thread::JoinHandle<bool> {
        let (tdp, rcu, bitmap) = (
            Arc::clone(&self.tdp),
            Arc::clone(&self.rcu),
            Arc::clone(&self.bitmap),
        );
        let root = self.root();
        thread::spawn(move || {
            let g = rcu.pin();
            if tdp.fast_page_fault(&root, Gfn::new(0), &g) == FastFault::Fixed {
                // ORDERING: as DirtyBitmap::mark (D3).
                bitmap.fetch_or(1, Ordering::Release);
            }
            match tdp.hardware_walk(&root, Gfn::new(0), true, &g) {
                HwWalk::Hit { pfn, writable, .. } => {
                    assert_eq!(pfn, Pfn::new(100), "a write through another pfn");
                    assert!(writable);
                    true
                }
                HwWalk::WriteProtected | HwWalk::NotPresent => false,
            }
        })
    }
    fn ager(&self) -> thread::JoinHandle<bool> {
        let (tdp, rcu) = (Arc::clone(&self.tdp), Arc::clone(&self.rcu));
        thread::spawn(move || {
            let g = rcu.pin();
            tdp.age_gfn_range(AS0, range(0, 4), &g)
        })
    }
    fn finish(self) {
        let World { rcu, lock, tdp, .. } = self;
        {
            let mut mmu = lock.write();
            tdp.teardown(&mut mmu, &Flusher(AtomicUsize::new(0)));
        }
        let tdp = Arc::try_unwrap(tdp).expect("every thread dropped its TdpMmu handle");
        drop(tdp);
        rcu.synchronize();
    }
}

/// Fast page fault vs re-arm vs lockless ager: a performed write is in the harvest or still in
/// the bitmap, a writable leaf always has its bitmap bit set (so no later write escapes), and the
/// leaf keeps D.
#[test]
fn fast_fault_rearm_and_ager_never_lose_a_dirty_bit() {
    loom::model(|| {
        let w = World::rearmed();
        let vcpu = w.vcpu();
        let ager = w.ager();
        // The harvester: take the word, write-protect, under mmu_lock write (vm/dirty_log.rs).
        let taken = {
            let mmu = w.lock.write();
            // ORDERING: as DirtyBitmap::take (D1, D3).
            let taken = w.bitmap.swap(0, Ordering::Acquire);
            let g = w.rcu.pin();
            w.tdp
                .write_protect_range(AS0, range(0, 1), |_| true, mmu.witness(), &g);
            taken
        };
        let wrote = vcpu.join().unwrap();
        ager.join().unwrap();
        let left = w.bitmap.load(Ordering::Relaxed);
        if wrote {
            assert_eq!((taken | left) & 1, 1, "a performed write was never logged");
        }
        let g = w.rcu.pin();
        let (leaf, _) = w
            .tdp
            .leaf(AS0, Gfn::new(0), &g)
            .expect("nothing zaps gfn 0");
        drop(g);
        if leaf.is_writable() {
            assert_eq!(
                left & 1,
                1,
                "a writable leaf whose page is not logged: {leaf:?}"
            );
        }
        assert!(leaf.is_dirty(), "D was lost: {leaf:?}");
        assert!(leaf.is_mmu_writable());
        w.finish();
    });
}

/// Fast page fault vs zap vs lockless ager: the fast path never brings back a zapped leaf (its
/// CAS compares the whole word), so no write goes through a pfn the zap removed.
#[test]
fn fast_fault_never_resurrects_a_zapped_leaf() {
    loom::model(|| {
        let w = World::rearmed();
        let vcpu = w.vcpu();
        let ager = w.ager();
        let flusher = Flusher(AtomicUsize::new(0));
        {
            let mut mmu = w.lock.write();
            let _ = w.tdp.zap_leafs(AS0, range(0, 1), &mut mmu, false, &flusher);
        }
        vcpu.join().unwrap();
        ager.join().unwrap();
        let g = w.rcu.pin();
        assert!(
            w.tdp.leaf(AS0, Gfn::new(0), &g).is_none(),
            "the zapped leaf came back"
        );
        drop(g);
        w.finish();
    });
}
