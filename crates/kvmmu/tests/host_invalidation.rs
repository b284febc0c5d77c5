//! Host invalidation protocol: every change of a present host PTE is bracketed by
//! `invalidate_range_start` / `invalidate_range_end`, frames are freed only after start returned,
//! bad input changes nothing and calls nobody, and callbacks may query the host.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use kvmmu::internals::addr::{Hva, PAGE_SIZE};
use kvmmu::internals::host::{
    FrameStats, FrameTag, HostConfig, HostError, HostMm, HostPte, InvalidateEvent, MmuNotifier,
    NotifierRange, Prot,
};

#[derive(Clone, Debug, PartialEq)]
enum Ev {
    Start(NotifierRange),
    End(NotifierRange),
    ClearYoung(Hva, Hva),
    ClearFlushYoung(Hva, Hva),
    TestYoung(Hva),
    Release,
}

/// Records every callback; inside `start` and `release` it snapshots the host PTEs of the range
/// and checks that every present PTE's frame is still allocated with the PTE's tag.
#[derive(Default)]
struct Recorder {
    host: Mutex<Option<HostMm>>,
    events: Mutex<Vec<Ev>>,
    young: AtomicBool,
    seen_in_start: Mutex<Vec<(Hva, HostPte)>>,
    freed_too_early: AtomicUsize,
}

impl Recorder {
    fn attach(host: &HostMm) -> Arc<Recorder> {
        let r = Arc::new(Recorder::default());
        *r.host.lock().unwrap() = Some(host.clone());
        host.register_notifier(r.clone());
        r
    }

    fn events(&self) -> Vec<Ev> {
        self.events.lock().unwrap().clone()
    }

    fn check_pages(&self, start: Hva, end: Hva) {
        let host = self.host.lock().unwrap().clone().unwrap();
        let mut a = start.raw();
        while a < end.raw() {
            let hva = Hva::new(a);
            if let Some(p) = host.host_pte(hva)
                && p.present
            {
                if host.arena().tag(p.pfn) != p.tag {
                    self.freed_too_early.fetch_add(1, Ordering::SeqCst);
                }
                self.seen_in_start.lock().unwrap().push((hva, p));
            }
            a += PAGE_SIZE;
        }
    }
}

impl MmuNotifier for Recorder {
    fn invalidate_range_start(&self, range: &NotifierRange) {
        self.events.lock().unwrap().push(Ev::Start(*range));
        self.check_pages(range.start, range.end);
    }
    fn invalidate_range_end(&self, range: &NotifierRange) {
        self.events.lock().unwrap().push(Ev::End(*range));
    }
    fn clear_flush_young(&self, start: Hva, end: Hva) -> bool {
        self.events
            .lock()
            .unwrap()
            .push(Ev::ClearFlushYoung(start, end));
        self.young.load(Ordering::SeqCst)
    }
    fn clear_young(&self, start: Hva, end: Hva) -> bool {
        self.events.lock().unwrap().push(Ev::ClearYoung(start, end));
        self.young.load(Ordering::SeqCst)
    }
    fn test_young(&self, addr: Hva) -> bool {
        self.events.lock().unwrap().push(Ev::TestYoung(addr));
        self.young.load(Ordering::SeqCst)
    }
    fn release(&self) {
        self.events.lock().unwrap().push(Ev::Release);
        let host = self.host.lock().unwrap().clone().unwrap();
        for (start, len, _) in host.mappings() {
            self.check_pages(start, Hva::new(start.raw() + len));
        }
    }
}

const P: u64 = PAGE_SIZE;

fn setup(pages: u64) -> (HostMm, Arc<Recorder>, Hva) {
    let host = HostMm::new(HostConfig { frames: 256 }).unwrap();
    let rec = Recorder::attach(&host);
    let hva = host.mmap(pages * P, Prot::READ | Prot::WRITE).unwrap();
    (host, rec, hva)
}

fn at(hva: Hva, page: u64) -> Hva {
    Hva::new(hva.raw() + page * P)
}

fn ptes(host: &HostMm, hva: Hva, pages: u64) -> Vec<Option<HostPte>> {
    (0..pages).map(|i| host.host_pte(at(hva, i))).collect()
}

fn range(start: Hva, end: Hva, event: InvalidateEvent) -> NotifierRange {
    NotifierRange {
        start,
        end,
        event,
        blockable: true,
    }
}

#[test]
fn munmap_is_bracketed_and_frees_frames_only_after_start() {
    let (host, rec, hva) = setup(4);
    host.write_u64(at(hva, 0), 1).unwrap();
    host.write_u64(at(hva, 2), 2).unwrap();
    let before = ptes(&host, hva, 4);
    host.munmap(hva, 4 * P).unwrap();
    let r = range(hva, at(hva, 4), InvalidateEvent::Unmap);
    assert_eq!(rec.events(), vec![Ev::Start(r), Ev::End(r)]);
    assert_eq!(rec.freed_too_early.load(Ordering::SeqCst), 0);
    let seen = rec.seen_in_start.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "start saw both present PTEs unchanged");
    for (hva_seen, pte) in &seen {
        let i = (hva_seen.raw() - hva.raw()) / P;
        assert_eq!(Some(*pte), before[i as usize]);
        assert_ne!(
            host.arena().tag(pte.pfn),
            pte.tag,
            "frame freed after the munmap"
        );
    }
    assert_eq!(host.host_pte(hva), None);
    assert_eq!(host.arena().stats().allocated, 0);
}

#[test]
fn mprotect_removing_write_is_bracketed_and_keeps_frames() {
    let (host, rec, hva) = setup(2);
    host.write_u64(at(hva, 1), 5).unwrap();
    let before = host.host_pte(at(hva, 1)).unwrap();
    host.mprotect(hva, 2 * P, Prot::READ).unwrap();
    let r = range(hva, at(hva, 2), InvalidateEvent::Protect);
    assert_eq!(rec.events(), vec![Ev::Start(r), Ev::End(r)]);
    let seen = rec.seen_in_start.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![(at(hva, 1), before)],
        "start saw the writable PTE"
    );
    let after = host.host_pte(at(hva, 1)).unwrap();
    assert_eq!(
        (after.pfn, after.tag, after.writable),
        (before.pfn, before.tag, false)
    );
    assert_eq!(host.read_u64(at(hva, 1)).unwrap(), 5);
}

#[test]
fn dontneed_is_bracketed_and_frees_after_start() {
    let (host, rec, hva) = setup(3);
    host.write_u64(at(hva, 1), 9).unwrap();
    let before = host.host_pte(at(hva, 1)).unwrap();
    host.madvise_dontneed(hva, 3 * P).unwrap();
    let r = range(hva, at(hva, 3), InvalidateEvent::DontNeed);
    assert_eq!(rec.events(), vec![Ev::Start(r), Ev::End(r)]);
    assert_eq!(rec.freed_too_early.load(Ordering::SeqCst), 0);
    assert_eq!(
        *rec.seen_in_start.lock().unwrap(),
        vec![(at(hva, 1), before)]
    );
    assert!(!host.host_pte(at(hva, 1)).unwrap().present);
    assert_eq!(host.arena().tag(before.pfn), FrameTag::FREE);
}

#[test]
fn changes_without_present_pages_skip_the_notifier() {
    let (host, rec, hva) = setup(4);
    host.mprotect(hva, 4 * P, Prot::READ).unwrap();
    host.madvise_dontneed(hva, 4 * P).unwrap();
    host.munmap(hva, 2 * P).unwrap();
    assert_eq!(rec.events(), vec![]);
    // A present page whose protection does not change needs no notification either.
    host.read_u64(at(hva, 3)).unwrap();
    host.mprotect(at(hva, 2), 2 * P, Prot::READ).unwrap();
    assert_eq!(rec.events(), vec![]);
}

#[test]
fn partial_munmap_notifies_only_the_unmapped_part_and_splits_the_mapping() {
    let (host, rec, hva) = setup(4);
    for i in 0..4 {
        host.write_u64(at(hva, i), 10 + i).unwrap();
    }
    host.munmap(at(hva, 1), 2 * P).unwrap();
    let r = range(at(hva, 1), at(hva, 3), InvalidateEvent::Unmap);
    assert_eq!(rec.events(), vec![Ev::Start(r), Ev::End(r)]);
    assert_eq!(
        host.mappings(),
        vec![
            (hva, P, Prot::READ | Prot::WRITE),
            (at(hva, 3), P, Prot::READ | Prot::WRITE)
        ]
    );
    assert_eq!(host.read_u64(at(hva, 0)).unwrap(), 10);
    assert_eq!(host.read_u64(at(hva, 3)).unwrap(), 13);
    assert_eq!(host.arena().stats().allocated, 2);
}

#[test]
fn release_calls_release_before_freeing_and_drops_subscribers() {
    let (host, rec, hva) = setup(2);
    host.write_u64(hva, 1).unwrap();
    host.write_u64(at(hva, 1), 2).unwrap();
    assert_eq!(Arc::strong_count(&rec), 2);
    host.release();
    assert_eq!(rec.events(), vec![Ev::Release]);
    assert_eq!(
        rec.seen_in_start.lock().unwrap().len(),
        2,
        "release saw the frames mapped"
    );
    assert_eq!(rec.freed_too_early.load(Ordering::SeqCst), 0);
    assert_eq!(
        Arc::strong_count(&rec),
        1,
        "the host dropped its subscriber"
    );
    let st = host.arena().stats();
    assert_eq!((st.allocated, st.total_allocs, st.total_frees), (0, 2, 2));
    assert!(host.mappings().is_empty());
    host.release();
    assert_eq!(rec.events(), vec![Ev::Release], "release is idempotent");
    assert_eq!(host.arena().stats(), st);
}

/// Everything a test can observe about the host, to compare before and after a failed call.
type Snapshot = (Vec<(Hva, u64, Prot)>, Vec<Option<HostPte>>, FrameStats);

fn snapshot(host: &HostMm, hva: Hva, pages: u64) -> Snapshot {
    (
        host.mappings(),
        ptes(host, hva, pages),
        host.arena().stats(),
    )
}

#[test]
fn bad_input_changes_nothing_and_calls_no_subscriber() {
    let (host, rec, hva) = setup(4);
    host.write_u64(hva, 1).unwrap();
    host.write_u64(at(hva, 3), 2).unwrap();
    let before = snapshot(&host, hva, 6);
    let end_of_map = at(hva, 4);
    let checks: Vec<(&str, Result<(), HostError>)> = vec![
        ("munmap unaligned", host.munmap(Hva::new(hva.raw() + 8), P)),
        ("munmap unaligned len", host.munmap(hva, P + 1)),
        ("munmap zero", host.munmap(hva, 0)),
        (
            "munmap overflow",
            host.munmap(Hva::new(u64::MAX - P + 1), 2 * P),
        ),
        ("munmap out of range", host.munmap(Hva::new(0), P)),
        ("munmap partial", host.munmap(at(hva, 2), 4 * P)),
        ("munmap unmapped", host.munmap(end_of_map, P)),
        (
            "mprotect partial",
            host.mprotect(at(hva, 3), 2 * P, Prot::READ),
        ),
        ("mprotect zero", host.mprotect(hva, 0, Prot::READ)),
        ("dontneed partial", host.madvise_dontneed(at(hva, 3), 3 * P)),
        ("dontneed unaligned", host.madvise_dontneed(hva, 12)),
        (
            "mmap_fixed overlap",
            host.mmap_fixed(at(hva, 3), 2 * P, Prot::READ).map(|_| ()),
        ),
        (
            "mmap_fixed unaligned",
            host.mmap_fixed(Hva::new(hva.raw() + 1), P, Prot::READ)
                .map(|_| ()),
        ),
        ("mmap zero", host.mmap(0, Prot::READ).map(|_| ())),
        ("mmap unaligned", host.mmap(100, Prot::READ).map(|_| ())),
        (
            "clear_young partial",
            host.clear_young(at(hva, 3), 2 * P).map(|_| ()),
        ),
        (
            "clear_flush_young zero",
            host.clear_flush_young(hva, 0).map(|_| ()),
        ),
        (
            "test_young unmapped",
            host.test_young(end_of_map).map(|_| ()),
        ),
        (
            "write unaligned",
            host.write_u64(Hva::new(hva.raw() + 4), 1),
        ),
        ("read unmapped", host.read_u64(end_of_map).map(|_| ())),
    ];
    for (name, r) in checks {
        let err = r.expect_err(name);
        let expected = match name {
            "write unaligned" => matches!(err, HostError::UnalignedAccess { .. }),
            n if n.ends_with("unaligned") || n.ends_with("unaligned len") => {
                matches!(err, HostError::Unaligned { .. })
            }
            n if n.ends_with("zero") => matches!(err, HostError::ZeroLength),
            n if n.ends_with("overflow") => matches!(err, HostError::Overflow { .. }),
            n if n.ends_with("out of range") => matches!(err, HostError::OutOfRange { .. }),
            n if n.ends_with("partial") || n == "munmap unmapped" || n == "test_young unmapped" => {
                matches!(err, HostError::NotMapped { hva } if hva == end_of_map)
            }
            "mmap_fixed overlap" => {
                matches!(err, HostError::Overlaps { existing, .. } if existing == hva)
            }
            "read unmapped" => {
                matches!(
                    err,
                    HostError::Gup(kvmmu::internals::host::GupError::NotMapped { .. })
                )
            }
            _ => false,
        };
        assert!(expected, "{name}: unexpected error {err:?}");
        assert_eq!(snapshot(&host, hva, 6), before, "{name} changed state");
    }
    assert_eq!(rec.events(), vec![], "no subscriber was called");
    assert_eq!(host.stats().invalidate_start, 0);
}

#[test]
fn callbacks_may_query_and_fault_without_deadlock() {
    struct Querier {
        host: HostMm,
        other: Hva,
        ok: AtomicUsize,
    }
    impl MmuNotifier for Querier {
        fn invalidate_range_start(&self, r: &NotifierRange) {
            let pte = self.host.host_pte(r.start);
            let gup = self.host.get_user_page(self.other, true);
            let read = self.host.read_u64(self.other);
            let young = self.host.clear_young(self.other, PAGE_SIZE);
            let _ = self.host.stats();
            if pte.is_some() && gup.is_ok() && read.is_ok() && young.is_ok() {
                self.ok.fetch_add(1, Ordering::SeqCst);
            }
        }
        fn invalidate_range_end(&self, r: &NotifierRange) {
            self.invalidate_range_start(r);
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
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let host = HostMm::new(HostConfig { frames: 64 }).unwrap();
        let hva = host.mmap(2 * P, Prot::READ | Prot::WRITE).unwrap();
        let other = host.mmap(P, Prot::READ | Prot::WRITE).unwrap();
        let q = Arc::new(Querier {
            host: host.clone(),
            other,
            ok: AtomicUsize::new(0),
        });
        host.register_notifier(q.clone());
        host.write_u64(hva, 1).unwrap();
        host.mprotect(hva, 2 * P, Prot::READ).unwrap();
        host.madvise_dontneed(hva, 2 * P).unwrap();
        host.read_u64(hva).unwrap();
        host.munmap(hva, 2 * P).unwrap();
        tx.send(q.ok.load(Ordering::SeqCst)).unwrap();
    });
    let ok = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("a callback deadlocked");
    // The host_pte query fails only in the last end (the range is unmapped by then).
    assert_eq!(ok, 5, "every callback could query, fault and age");
}

#[test]
fn aging_ors_host_and_subscribers_with_one_call_per_range() {
    let (host, rec, hva) = setup(8);
    let end = at(hva, 8);
    assert!(
        !host.clear_young(hva, 8 * P).unwrap(),
        "nothing touched yet"
    );
    assert_eq!(rec.events(), vec![Ev::ClearYoung(hva, end)]);
    rec.young.store(true, Ordering::SeqCst);
    assert!(host.clear_young(hva, 8 * P).unwrap(), "subscriber young");
    assert!(host.clear_flush_young(hva, 8 * P).unwrap());
    assert!(host.test_young(at(hva, 3)).unwrap());
    rec.young.store(false, Ordering::SeqCst);
    host.read_u64(at(hva, 5)).unwrap();
    assert!(
        host.test_young(Hva::new(at(hva, 5).raw() + 16)).unwrap(),
        "host young"
    );
    assert_eq!(
        rec.events()[1..],
        [
            Ev::ClearYoung(hva, end),
            Ev::ClearFlushYoung(hva, end),
            Ev::TestYoung(at(hva, 3)),
            Ev::TestYoung(Hva::new(at(hva, 5).raw() + 16)),
        ]
    );
}

#[test]
fn unregistered_subscribers_are_not_called() {
    let (host, rec, hva) = setup(1);
    let rec2 = Recorder::attach(&host);
    let id_probe = Arc::new(Recorder::default());
    let id = host.register_notifier(id_probe.clone());
    assert!(host.unregister_notifier(id));
    assert!(
        !host.unregister_notifier(id),
        "second unregister finds nothing"
    );
    host.write_u64(hva, 3).unwrap();
    host.munmap(hva, P).unwrap();
    assert_eq!(rec.events().len(), 2);
    assert_eq!(rec2.events().len(), 2);
    assert!(id_probe.events().is_empty());
    assert_eq!(host.stats().subscribers, 2);
    assert_eq!(
        (host.stats().invalidate_start, host.stats().invalidate_end),
        (2, 2)
    );
}
