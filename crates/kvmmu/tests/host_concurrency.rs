//! Concurrency: GUP and userspace accesses racing with munmap / mmap_fixed / mprotect / dontneed /
//! aging on overlapping ranges. No panic, balanced notifier pairs, no frame freed before start,
//! data never misdirected, and frame accounting that matches the host PTEs and ends at zero.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use kvmmu::internals::addr::{Hva, PAGE_SIZE};
use kvmmu::internals::host::{
    GupError, HostConfig, HostError, HostMm, MmuNotifier, NotifierRange, Prot,
};

const P: u64 = PAGE_SIZE;
const PAGES: u64 = 32;
const BASE: u64 = 0x4000_0000;
const WORKERS: u64 = 3;
const ITERS: usize = 20_000;
const MUTATIONS: usize = 2_000;

/// Counts pairs and checks, inside start, that every present PTE of the range still names an
/// allocated frame with the PTE's tag.
struct Counter {
    host: HostMm,
    starts: AtomicU64,
    ends: AtomicU64,
    in_flight: AtomicI64,
    violations: AtomicU64,
}

impl MmuNotifier for Counter {
    fn invalidate_range_start(&self, r: &NotifierRange) {
        self.starts.fetch_add(1, Ordering::SeqCst);
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let mut a = r.start.raw();
        while a < r.end.raw() {
            if let Some(p) = self.host.host_pte(Hva::new(a))
                && p.present
                && self.host.arena().tag(p.pfn) != p.tag
            {
                self.violations.fetch_add(1, Ordering::SeqCst);
            }
            a += P;
        }
    }
    fn invalidate_range_end(&self, _: &NotifierRange) {
        self.ends.fetch_add(1, Ordering::SeqCst);
        if self.in_flight.fetch_sub(1, Ordering::SeqCst) <= 0 {
            self.violations.fetch_add(1, Ordering::SeqCst);
        }
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

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn page(i: u64) -> Hva {
    Hva::new(BASE + i * P)
}

fn tolerated(e: &HostError) -> bool {
    matches!(
        e,
        HostError::NotMapped { .. }
            | HostError::Overlaps { .. }
            | HostError::Gup(GupError::NotMapped { .. } | GupError::ProtectionViolation { .. })
    )
}

#[test]
fn racing_accesses_and_mapping_changes_keep_pairs_and_frames_balanced() {
    let host = HostMm::new(HostConfig { frames: 1024 }).unwrap();
    host.mmap_fixed(page(0), PAGES * P, Prot::READ | Prot::WRITE)
        .unwrap();
    let counter = Arc::new(Counter {
        host: host.clone(),
        starts: AtomicU64::new(0),
        ends: AtomicU64::new(0),
        in_flight: AtomicI64::new(0),
        violations: AtomicU64::new(0),
    });
    host.register_notifier(counter.clone());
    let workers_done = AtomicU64::new(0);
    std::thread::scope(|s| {
        for w in 0..WORKERS {
            let host = &host;
            let workers_done = &workers_done;
            s.spawn(move || {
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (w + 1));
                // Word `w` of every page is written only by this worker: a read returns either
                // what it last wrote there or 0 (the page was discarded or remapped).
                let mut last = vec![0u64; PAGES as usize + 2];
                for i in 0..ITERS {
                    let pg = rng.below(PAGES + 2); // a little past the end: unmapped
                    let hva = Hva::new(page(pg).raw() + w * 8);
                    match rng.below(3) {
                        0 => match host.get_user_page(hva, rng.below(2) == 0) {
                            Ok(p) => assert_eq!(p.tag.host_page(), hva.page()),
                            Err(GupError::OutOfFrames) => panic!("arena too small"),
                            Err(_) => {}
                        },
                        1 => {
                            let v = (w << 48) | i as u64 | 1;
                            match host.write_u64(hva, v) {
                                Ok(()) => last[pg as usize] = v,
                                Err(e) => assert!(tolerated(&e), "write: {e}"),
                            }
                        }
                        _ => match host.read_u64(hva) {
                            Ok(v) => {
                                assert!(
                                    v == 0 || v == last[pg as usize],
                                    "worker {w} page {pg}: read {v:#x}, wrote {:#x}",
                                    last[pg as usize]
                                );
                                last[pg as usize] = v;
                            }
                            Err(e) => assert!(tolerated(&e), "read: {e}"),
                        },
                    }
                }
                workers_done.fetch_add(1, Ordering::SeqCst);
            });
        }
        let host = &host;
        let workers_done = &workers_done;
        s.spawn(move || {
            let mut rng = Rng(0xdead_beef);
            let mut done = 0;
            // Mutate at least MUTATIONS times and for as long as any worker runs.
            while done < MUTATIONS || workers_done.load(Ordering::SeqCst) < WORKERS {
                done += 1;
                let first = rng.below(PAGES);
                let n = 1 + rng.below((PAGES - first).min(8));
                let (hva, len) = (page(first), n * P);
                let r = match rng.below(6) {
                    0 => host.munmap(hva, len),
                    1 => host
                        .mmap_fixed(hva, len, Prot::READ | Prot::WRITE)
                        .map(|_| ()),
                    2 => host.mprotect(hva, len, Prot::READ),
                    3 => host.mprotect(hva, len, Prot::READ | Prot::WRITE),
                    4 => host.madvise_dontneed(hva, len),
                    _ => host.clear_young(hva, len).map(|_| ()),
                };
                if let Err(e) = r {
                    assert!(tolerated(&e), "mutation: {e}");
                }
            }
        });
    });

    let starts = counter.starts.load(Ordering::SeqCst);
    assert!(
        starts > 0,
        "the race exercised the notifier ({starts} pairs)"
    );
    let hs = host.stats();
    assert!(
        hs.munmap > 0 && hs.mprotect > 0 && hs.dontneed > 0 && hs.mmap > 1,
        "{hs:?}"
    );
    assert_eq!(
        starts,
        counter.ends.load(Ordering::SeqCst),
        "no lost notifier pair"
    );
    assert_eq!(counter.in_flight.load(Ordering::SeqCst), 0);
    assert_eq!(
        counter.violations.load(Ordering::SeqCst),
        0,
        "frame freed before start"
    );

    let present = (0..PAGES + 2)
        .filter_map(|i| host.host_pte(page(i)))
        .filter(|p| p.present)
        .count() as u64;
    let st = host.arena().stats();
    assert_eq!(
        st.allocated, present,
        "every allocated frame backs a present PTE"
    );
    assert_eq!(st.allocated, st.total_allocs - st.total_frees);
    assert_eq!(st.stale_accesses, 0, "host accesses are never stale");

    host.release();
    let st = host.arena().stats();
    assert_eq!(st.allocated, 0);
    assert_eq!(st.total_allocs, st.total_frees, "release freed everything");
    assert_eq!(
        Arc::strong_count(&counter),
        1,
        "release dropped the subscriber"
    );
}

#[test]
fn concurrent_gup_of_one_page_installs_exactly_one_frame() {
    let host = HostMm::new(HostConfig { frames: 64 }).unwrap();
    let hva = host.mmap(P, Prot::READ | Prot::WRITE).unwrap();
    for _ in 0..50 {
        let pages: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|_| s.spawn(|| host.get_user_page(hva, true).unwrap()))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(
            pages.windows(2).all(|w| w[0] == w[1]),
            "all racers got the same frame"
        );
        assert_eq!(
            host.arena().stats().allocated,
            1,
            "losers freed their frames"
        );
        host.madvise_dontneed(hva, P).unwrap();
    }
}
