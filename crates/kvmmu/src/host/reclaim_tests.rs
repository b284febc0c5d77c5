//! Tests of the reclaim charge (`reclaim.rs`, `charge.rs`) that need a seam inside eviction or
//! the counter itself; the transitions seen from outside are in `tests/reclaim_charge.rs`.

use super::*;
use crate::host::{BackingSrc, HostConfig, Prot};
use core::cell::RefCell;

const PAGE: u64 = 4096;

thread_local! {
    /// Run once by `evict_page` on this thread between its `mmap_lock` read check and its
    /// invalidation (the window a concurrent huge-page install can finish in).
    static AFTER_CHECK: RefCell<Option<Box<dyn FnOnce()>>> = RefCell::new(None);
}

/// The seam `evict_page` calls (test builds only).
pub(super) fn after_evict_check() {
    if let Some(f) = AFTER_CHECK.with(|h| h.borrow_mut().take()) {
        f();
    }
}

fn thp_host() -> (HostMm, Hva) {
    let host = HostMm::new(HostConfig { frames: 2048 }).unwrap();
    host.enable_reclaim(ReclaimConfig {
        limit_frames: 1024,
        swap_slots: 64,
        aging: ReclaimAging::Generations,
    })
    .unwrap();
    let hva = host
        .mmap_backed(
            512 * PAGE,
            Prot::READ | Prot::WRITE,
            BackingSrc::AnonymousThp,
        )
        .unwrap();
    (host, hva)
}

fn set_marker(host: &HostMm, hva: Hva, level: u64) {
    let vmas = host.inner.mmap_lock.read();
    // ORDERING: Release, as `install_huge`'s marker store.
    vmas.pt
        .huge_marker_or_alloc(hva.page())
        .store(level, Ordering::Release);
}

#[test]
fn eviction_skips_a_page_whose_huge_marker_lands_between_its_check_and_its_eviction() {
    let (host, hva) = thp_host();
    for p in 0..512 {
        host.write_u64(Hva::new(hva.raw() + p * PAGE), p + 1)
            .unwrap();
    }
    assert_eq!(host.host_pte(hva).unwrap().level, Level::L2M);
    assert_eq!(
        host.reclaim_stats().charged,
        0,
        "a whole THP is not charged"
    );
    // A THP install in flight: every PTE written (present), the marker not yet (`install_huge`
    // stores the marker last). The evictor's read check sees a present 4K page ...
    set_marker(&host, hva, 0);
    // ... and the install finishes before the evictor takes `mmap_lock` for write.
    let h = host.clone();
    AFTER_CHECK.with(|c| *c.borrow_mut() = Some(Box::new(move || set_marker(&h, hva, 2))));
    let victim = Hva::new(hva.raw() + 5 * PAGE);
    assert_eq!(
        host.page_out(victim, PAGE).unwrap(),
        0,
        "a page of a THP stays"
    );
    assert!(AFTER_CHECK.with(|c| c.borrow().is_none()), "the seam ran");
    assert_eq!(
        host.charge_underflow(),
        None,
        "nothing uncharged a frame never charged"
    );
    let a = host.charge_audit();
    assert_eq!((a.charged, a.present_4k, a.present_huge), (0, 0, 512));
    assert_eq!(host.host_pte(victim).unwrap().level, Level::L2M);
    assert_eq!(
        host.read_u64(victim).unwrap(),
        6,
        "the page kept its contents"
    );
    host.release();
    assert_eq!(host.arena().stats().allocated, 0);
    assert_eq!(
        host.arena().stats().stale_accesses,
        0,
        "the run was freed whole"
    );
}

#[test]
fn a_charge_found_at_u64_max_is_refused_without_overflowing() {
    let r = Reclaim::default();
    r.charged.store(u64::MAX, Ordering::Relaxed);
    assert!(!r.try_charge(), "no room above u64::MAX");
    assert_eq!(r.charged.load(Ordering::Relaxed), u64::MAX);
}

#[test]
fn an_uncharge_below_zero_is_refused_and_names_its_caller() {
    let r = Reclaim::default();
    assert!(r.try_charge());
    let line = line!() + 1;
    r.uncharge(2);
    assert_eq!(
        r.charged.load(Ordering::Relaxed),
        1,
        "the counter did not wrap"
    );
    assert_eq!(r.underflows.load(Ordering::Relaxed), 1);
    let e = *r.first_underflow.get().unwrap();
    assert_eq!((e.frames, e.charged), (2, 1));
    assert_eq!(
        (e.site.file(), e.site.line()),
        (file!(), line),
        "the caller is named"
    );
    assert!(e.to_string().contains("reclaim_tests.rs"), "{e}");
    r.uncharge(1);
    assert_eq!(r.charged.load(Ordering::Relaxed), 0);
    assert_eq!(r.underflows.load(Ordering::Relaxed), 1);
}
