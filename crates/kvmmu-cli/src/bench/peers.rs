//! The peers: translation tables a userspace VMM author would build instead of an MMU — a map from
//! gfn to (frame, accessed) — doing the same fault / translate / age operations as kvmmu.
//!
//! Every peer gets its frames from the same simulated host through GUP (as kvmmu's fault path does)
//! and reads guest words through the same tag-checked frame access, so the only difference measured
//! is the translation structure itself.

use anyhow::Context;
use kvmmu::FrameTag;
use kvmmu::prelude::*;
use kvmmu::{PAGE_SIZE, Pfn};
use std::collections::HashMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};

/// One translation: the frame, its tag at fault time, and a software Accessed bit.
pub struct Entry {
    pfn: Pfn,
    tag: FrameTag,
    accessed: AtomicBool,
}

/// A translation table keyed by gfn.
pub trait Peer: Sync {
    /// The peer's name in reports.
    fn name(&self) -> &'static str;
    /// Installs one translation (the "fault").
    fn insert(&self, gfn: u64, e: Entry);
    /// Runs `f` on every gfn in `0..pages` with its entry (None if unmapped); batch so that a peer
    /// may pin or lock once per batch, as a careful VMM author would.
    fn for_each_lookup(&self, pages: u64, f: &mut dyn FnMut(u64, Option<&Entry>));
    /// One aging pass: test-and-clear every entry's Accessed bit; returns how many were young.
    fn age(&self) -> u64;
}

/// Faults every page of `0..pages` into `peer`: GUP (host frame allocation) plus an insert.
pub fn fault_all(peer: &dyn Peer, host: &HostMm, hva: Hva, pages: u64) -> anyhow::Result<()> {
    for gfn in 0..pages {
        let a = hva.checked_add(gfn * PAGE_SIZE).context("hva overflow")?;
        let g = host.get_user_page(a, true)?;
        peer.insert(
            gfn,
            Entry {
                pfn: g.pfn,
                tag: g.tag,
                accessed: AtomicBool::new(true),
            },
        );
    }
    Ok(())
}

/// Translates and reads the first word of every page (what a vCPU access does), setting Accessed
/// with a test first so that an already-young entry is not written. Returns a checksum.
pub fn translate_all(peer: &dyn Peer, host: &HostMm, pages: u64) -> anyhow::Result<u64> {
    let arena = host.arena();
    let mut sum = 0u64;
    let mut err = None;
    peer.for_each_lookup(pages, &mut |gfn, e| match e {
        Some(e) => {
            // ORDERING: Relaxed: Accessed is a hint (spec: false positives/negatives tolerated).
            if !e.accessed.load(Ordering::Relaxed) {
                e.accessed.store(true, Ordering::Relaxed);
            }
            match arena.read_u64(e.pfn, 0, e.tag) {
                Ok(v) => sum = sum.wrapping_add(v),
                Err(x) => err = Some(anyhow::Error::from(x)),
            }
        }
        None => err = Some(anyhow::anyhow!("peer lost gfn {gfn}")),
    });
    match err {
        Some(e) => Err(e),
        None => Ok(sum),
    }
}

fn age_entry(e: &Entry) -> u64 {
    // ORDERING: Relaxed: Accessed is a hint; test first so old entries are never written.
    if e.accessed.load(Ordering::Relaxed) {
        e.accessed.store(false, Ordering::Relaxed);
        1
    } else {
        0
    }
}

/// `dashmap::DashMap` (sharded RwLocks).
#[derive(Default)]
pub struct DashPeer(dashmap::DashMap<u64, Entry>);

impl Peer for DashPeer {
    fn name(&self) -> &'static str {
        "dashmap"
    }
    fn insert(&self, gfn: u64, e: Entry) {
        self.0.insert(gfn, e);
    }
    fn for_each_lookup(&self, pages: u64, f: &mut dyn FnMut(u64, Option<&Entry>)) {
        for gfn in 0..pages {
            match self.0.get(&gfn) {
                Some(r) => f(gfn, Some(r.value())),
                None => f(gfn, None),
            }
        }
    }
    fn age(&self) -> u64 {
        self.0.iter().map(|r| age_entry(r.value())).sum()
    }
}

/// `papaya::HashMap` (lock-free reads, epoch reclamation).
#[derive(Default)]
pub struct PapayaPeer(papaya::HashMap<u64, Entry>);

impl Peer for PapayaPeer {
    fn name(&self) -> &'static str {
        "papaya"
    }
    fn insert(&self, gfn: u64, e: Entry) {
        self.0.pin().insert(gfn, e);
    }
    fn for_each_lookup(&self, pages: u64, f: &mut dyn FnMut(u64, Option<&Entry>)) {
        let m = self.0.pin();
        for gfn in 0..pages {
            f(gfn, m.get(&gfn));
        }
    }
    fn age(&self) -> u64 {
        self.0.pin().iter().map(|(_, e)| age_entry(e)).sum()
    }
}

/// `RwLock<HashMap>`: the first thing anyone writes.
#[derive(Default)]
pub struct RwLockPeer(RwLock<HashMap<u64, Entry>>);

impl Peer for RwLockPeer {
    fn name(&self) -> &'static str {
        "rwlock-hashmap"
    }
    fn insert(&self, gfn: u64, e: Entry) {
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(gfn, e);
    }
    fn for_each_lookup(&self, pages: u64, f: &mut dyn FnMut(u64, Option<&Entry>)) {
        // One read acquisition per access, as a vCPU thread serving one access at a time would.
        for gfn in 0..pages {
            let m = self.0.read().unwrap_or_else(|p| p.into_inner());
            f(gfn, m.get(&gfn));
        }
    }
    fn age(&self) -> u64 {
        let m = self.0.read().unwrap_or_else(|p| p.into_inner());
        m.values().map(age_entry).sum()
    }
}
