//! An untouched host range costs nothing to zap, free, protect or age: the host page table is
//! sparse (tables allocated on first touch), so `madvise_dontneed`, `munmap`, `mprotect` and the
//! aging calls over 64 GiB nobody touched neither grow the process's resident memory nor allocate
//! a page table.
//!
//! One test in a binary of its own: resident memory is a process-wide number, and any test running
//! beside it would move it.

use kvmmu::internals::host::{HostConfig, HostMm, Prot};
use kvmmu::prelude::*;

const PAGE: u64 = 4096;
const LEN: u64 = 64 << 30;
const ONE_MIB: u64 = 1 << 20;

/// Resident bytes of this process (`/proc/self/statm`, second field, in pages).
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("read /proc/self/statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|f| f.parse().ok())
        .expect("statm has a resident field");
    pages * PAGE
}

/// A host with a 64 GiB mapping whose first and last pages (only) were touched.
fn host_with_untouched_64_gib() -> (HostMm, Hva) {
    let host = HostMm::new(HostConfig { frames: 64 }).expect("host");
    let hva = host
        .mmap(LEN, Prot::READ | Prot::WRITE)
        .expect("mmap 64 GiB");
    host.write_u64(hva, 1).expect("first page");
    host.write_u64(Hva::new(hva.raw() + LEN - PAGE), 2)
        .expect("last page");
    (host, hva)
}

/// Runs `op` and returns how much it grew resident memory and the host's page tables.
fn growth(host: &HostMm, op: impl FnOnce()) -> (i64, i64) {
    let (rss, tables) = (rss_bytes(), host.stats().page_table_bytes);
    op();
    (
        rss_bytes() as i64 - rss as i64,
        host.stats().page_table_bytes as i64 - tables as i64,
    )
}

#[test]
fn zapping_protecting_and_aging_64_gib_untouched_grow_rss_by_under_1_mib_and_no_page_table() {
    // madvise(MADV_DONTNEED): the acceptance case of issue 9.
    let (host, hva) = host_with_untouched_64_gib();
    let (rss, tables) = growth(&host, || {
        host.madvise_dontneed(hva, LEN).expect("dontneed");
    });
    assert!(
        rss < ONE_MIB as i64,
        "madvise_dontneed grew RSS by {rss} bytes"
    );
    assert_eq!(tables, 0, "madvise_dontneed allocated page tables");
    assert_eq!(
        host.read_u64(hva).expect("refault"),
        0,
        "the page was discarded"
    );

    // Aging reads only allocated leaves.
    let (rss, tables) = growth(&host, || {
        host.clear_young(hva, LEN).expect("clear_young");
        host.clear_flush_young(hva, LEN).expect("clear_flush_young");
        host.test_young(Hva::new(hva.raw() + LEN / 2))
            .expect("test_young");
    });
    assert!(rss < ONE_MIB as i64, "aging grew RSS by {rss} bytes");
    assert_eq!(tables, 0, "aging allocated page tables");
    let (_, tables) = growth(&host, || {
        let young = host.clear_young_range(hva, LEN).expect("clear_young_range");
        assert_eq!(young.pages(), LEN / PAGE);
    });
    assert_eq!(tables, 0, "clear_young_range allocated page tables");

    // mprotect and munmap.
    let (rss, tables) = growth(&host, || {
        host.mprotect(hva, LEN, Prot::READ).expect("mprotect");
    });
    assert!(rss < ONE_MIB as i64, "mprotect grew RSS by {rss} bytes");
    assert_eq!(tables, 0, "mprotect allocated page tables");
    let (rss, tables) = growth(&host, || host.munmap(hva, LEN).expect("munmap"));
    assert!(rss < ONE_MIB as i64, "munmap grew RSS by {rss} bytes");
    assert!(tables < 0, "munmap freed the tables of the touched pages");
    let empty = HostMm::new(HostConfig { frames: 1 }).expect("host");
    assert_eq!(
        host.stats().page_table_bytes,
        empty.stats().page_table_bytes,
        "after munmap only the root table is left"
    );
}
