//! Model-based test: random sequences of host operations against a plain per-page model. After
//! every step the host agrees with the model on mappings, protections, contents, present pages,
//! allocated frames and whether the notifier fired; after `release` no frame is left allocated.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use kvmmu::internals::addr::{Hva, PAGE_SIZE};
use kvmmu::internals::host::{
    GupError, HostConfig, HostError, HostMm, MmuNotifier, NotifierRange, Prot,
};
use proptest::prelude::*;

const P: u64 = PAGE_SIZE;
const WINDOW: u64 = 16;
const BASE: u64 = 0x2000_0000;

#[derive(Clone, Copy, Debug)]
enum Op {
    MmapFixed(u64, u64, Prot),
    Munmap(u64, u64),
    Mprotect(u64, u64, Prot),
    DontNeed(u64, u64),
    ClearYoung(u64, u64),
    Write(u64, u64),
    Read(u64),
}

fn prot() -> impl Strategy<Value = Prot> {
    prop_oneof![
        Just(Prot::READ | Prot::WRITE),
        Just(Prot::READ),
        Just(Prot::empty())
    ]
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    (0..WINDOW).prop_flat_map(|s| (Just(s), 1..=(WINDOW - s).min(6)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (range(), prot()).prop_map(|((s, n), p)| Op::MmapFixed(s, n, p)),
        1 => range().prop_map(|(s, n)| Op::Munmap(s, n)),
        1 => (range(), prot()).prop_map(|((s, n), p)| Op::Mprotect(s, n, p)),
        1 => range().prop_map(|(s, n)| Op::DontNeed(s, n)),
        1 => range().prop_map(|(s, n)| Op::ClearYoung(s, n)),
        3 => (0..WINDOW + 1, 1..u64::MAX).prop_map(|(p, v)| Op::Write(p, v)),
        3 => (0..WINDOW + 1).prop_map(Op::Read),
    ]
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct ModelPage {
    prot: Prot,
    value: u64,
    present: bool,
}

#[derive(Default)]
struct Pairs {
    starts: AtomicU64,
    ends: AtomicU64,
}

impl MmuNotifier for Pairs {
    fn invalidate_range_start(&self, _: &NotifierRange) {
        self.starts.fetch_add(1, Ordering::SeqCst);
    }
    fn invalidate_range_end(&self, _: &NotifierRange) {
        self.ends.fetch_add(1, Ordering::SeqCst);
    }
    fn clear_flush_young(&self, _: Hva, _: Hva) -> bool {
        false
    }
    fn clear_young(&self, _: Hva, _: Hva) -> bool {
        false
    }
    fn test_young(&self, _: Hva) -> bool {
        false
    }
    fn release(&self) {}
}

fn hva(page: u64) -> Hva {
    Hva::new(BASE + page * P)
}

fn run(ops: &[Op]) {
    let host = HostMm::new(HostConfig { frames: 64 }).unwrap();
    let pairs = Arc::new(Pairs::default());
    host.register_notifier(pairs.clone());
    let mut model: Vec<Option<ModelPage>> = vec![None; WINDOW as usize + 1];
    for (step, &op) in ops.iter().enumerate() {
        let starts_before = pairs.starts.load(Ordering::SeqCst);
        let span = |s: u64, n: u64| (s as usize)..((s + n) as usize);
        let all_mapped = |m: &[Option<ModelPage>], s, n| m[span(s, n)].iter().all(Option::is_some);
        let any_present = |m: &[Option<ModelPage>], s, n, f: &dyn Fn(&ModelPage) -> bool| {
            m[span(s, n)].iter().flatten().any(|p| p.present && f(p))
        };
        let mut expect_notify = false;
        match op {
            Op::MmapFixed(s, n, p) => {
                let r = host.mmap_fixed(hva(s), n * P, p);
                if model[span(s, n)].iter().all(Option::is_none) {
                    assert_eq!(r.unwrap(), hva(s));
                    for m in &mut model[span(s, n)] {
                        *m = Some(ModelPage {
                            prot: p,
                            value: 0,
                            present: false,
                        });
                    }
                } else {
                    assert!(
                        matches!(r, Err(HostError::Overlaps { .. })),
                        "{step}: {r:?}"
                    );
                }
            }
            Op::Munmap(s, n)
            | Op::DontNeed(s, n)
            | Op::Mprotect(s, n, _)
            | Op::ClearYoung(s, n) => {
                let ok = all_mapped(&model, s, n);
                let r = match op {
                    Op::Munmap(..) => host.munmap(hva(s), n * P),
                    Op::DontNeed(..) => host.madvise_dontneed(hva(s), n * P),
                    Op::Mprotect(_, _, p) => host.mprotect(hva(s), n * P, p),
                    _ => host.clear_young(hva(s), n * P).map(|_| ()),
                };
                if !ok {
                    assert!(
                        matches!(r, Err(HostError::NotMapped { .. })),
                        "{step}: {r:?}"
                    );
                } else {
                    r.unwrap();
                    match op {
                        Op::Munmap(..) => {
                            expect_notify = any_present(&model, s, n, &|_| true);
                            model[span(s, n)].fill(None);
                        }
                        Op::DontNeed(..) => {
                            expect_notify = any_present(&model, s, n, &|_| true);
                            for m in model[span(s, n)].iter_mut().flatten() {
                                m.value = 0;
                                m.present = false;
                            }
                        }
                        Op::Mprotect(_, _, p) => {
                            expect_notify = any_present(&model, s, n, &|m| m.prot != p);
                            for m in model[span(s, n)].iter_mut().flatten() {
                                m.prot = p;
                            }
                        }
                        _ => {}
                    }
                }
            }
            Op::Write(pg, v) => {
                let r = host.write_u64(hva(pg), v);
                match &mut model[pg as usize] {
                    None => assert!(matches!(r, Err(HostError::Gup(GupError::NotMapped { .. })))),
                    Some(m) if !m.prot.contains(Prot::WRITE) => assert!(matches!(
                        r,
                        Err(HostError::Gup(GupError::ProtectionViolation {
                            write: true,
                            ..
                        }))
                    )),
                    Some(m) => {
                        r.unwrap();
                        m.value = v;
                        m.present = true;
                    }
                }
            }
            Op::Read(pg) => {
                let r = host.read_u64(hva(pg));
                match &mut model[pg as usize] {
                    None => assert!(matches!(r, Err(HostError::Gup(GupError::NotMapped { .. })))),
                    Some(m) if m.prot.is_empty() => assert!(matches!(
                        r,
                        Err(HostError::Gup(GupError::ProtectionViolation {
                            write: false,
                            ..
                        }))
                    )),
                    Some(m) => {
                        assert_eq!(r.unwrap(), m.value, "step {step}: read of page {pg}");
                        m.present = true;
                    }
                }
            }
        }
        let notified = pairs.starts.load(Ordering::SeqCst) - starts_before;
        assert_eq!(notified, u64::from(expect_notify), "step {step}: {op:?}");
        assert_eq!(
            pairs.starts.load(Ordering::SeqCst),
            pairs.ends.load(Ordering::SeqCst)
        );
        for (i, m) in model.iter().enumerate() {
            let pte = host.host_pte(hva(i as u64));
            assert_eq!(pte.is_some(), m.is_some(), "step {step}: page {i} mapped");
            if let (Some(pte), Some(m)) = (pte, m) {
                assert_eq!(pte.present, m.present, "step {step}: page {i} present");
                assert_eq!(pte.writable, m.prot.contains(Prot::WRITE));
            }
        }
        let present = model.iter().flatten().filter(|m| m.present).count() as u64;
        assert_eq!(
            host.arena().stats().allocated,
            present,
            "step {step}: frames"
        );
    }
    host.release();
    let st = host.arena().stats();
    assert_eq!((st.allocated, st.stale_accesses), (0, 0));
    assert_eq!(st.total_allocs, st.total_frees);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn host_matches_page_model_and_frees_everything(ops in proptest::collection::vec(op(), 1..60)) {
        run(&ops);
    }
}
