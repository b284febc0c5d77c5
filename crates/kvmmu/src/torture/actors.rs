//! The actor bodies. Each runs until its own operation budget is spent or the run stops, records
//! every oracle violation in [`Shared`], and never panics on an outcome the oracles allow.

use std::sync::atomic::Ordering;

use crate::addr::{AsId, Gpa, Hva, SlotId};
use crate::host::{GupError, HostError, HostMm, Prot};
use crate::vcpu::VcpuExit;
use crate::vm::Vm;
use crate::vm::memslot::{MemFlags, MemoryRegion};

use super::TortureConfig;
use super::oracle::{
    ALIAS_GPA, ActorId, DYN_GPA, Layout, MAIN_GPA, Progress, Shared, ViolationKind, decode_page,
    encode, op,
};
use super::rng::Rng;

const PAGE: u64 = 4096;

/// The region of slot 1 at guest base `DYN_GPA[at]`, with `flags`.
pub(super) fn dyn_region(l: &Layout, at: usize, flags: MemFlags) -> MemoryRegion {
    MemoryRegion {
        slot: SlotId::new(1),
        as_id: AsId::new(0),
        flags,
        gpa: Gpa::new(DYN_GPA[at]),
        size: l.dyn_pages * PAGE,
        hva: l.hva_of(l.main_pages),
    }
}

/// The region of the alias slot 2 (`size == 0` deletes it).
fn alias_region(l: &Layout, present: bool) -> MemoryRegion {
    MemoryRegion {
        slot: SlotId::new(2),
        as_id: AsId::new(0),
        flags: MemFlags::empty(),
        gpa: Gpa::new(ALIAS_GPA),
        size: if present { l.alias_pages * PAGE } else { 0 },
        hva: l.hva,
    }
}

/// The region of slot 0.
pub(super) fn main_region(l: &Layout) -> MemoryRegion {
    MemoryRegion {
        slot: SlotId::new(0),
        as_id: AsId::new(0),
        flags: MemFlags::empty(),
        gpa: Gpa::new(MAIN_GPA),
        size: l.main_pages * PAGE,
        hva: l.hva,
    }
}

/// What the owner of a page knows about it.
#[derive(Clone, Copy, Default)]
struct PageRecord {
    /// The last value written (0 if none, or after an observed discard).
    last: u64,
    /// The page's discard generation sampled before that write (protocol 2).
    discard: u64,
}

/// Checks a value read from host page `hp` against its owner's record (the data oracle).
/// Returns false on a violation, which it records.
fn check_read(
    sh: &Shared,
    actor: ActorId,
    gpa: Gpa,
    hp: u64,
    rec: &mut PageRecord,
    got: u64,
) -> bool {
    if got == rec.last {
        return true;
    }
    // A write sampled during a discard (odd generation) may have landed before it.
    if got == 0 && (rec.discard % 2 == 1 || sh.discard_gen(hp) != rec.discard) {
        // Discarded since the write: zero from now on until the next write.
        *rec = PageRecord {
            last: 0,
            discard: sh.discard_gen(hp),
        };
        return true;
    }
    let why = if got != 0 && decode_page(got) != hp {
        format!(
            " (the value belongs to host page {}: misdirected)",
            decode_page(got)
        )
    } else {
        String::new()
    };
    sh.violation(
        actor,
        ViolationKind::Data,
        Some(gpa.gfn()),
        format!(
            "read gpa {gpa} (host page {hp}) = {got:#x}, last write {:#x}{why}",
            rec.last
        ),
    );
    false
}

/// Classifies a vCPU exit: true if the oracles allow it for an access through `gpa`, whose
/// slot may legitimately be absent when `optional_slot`. Records a violation otherwise.
fn exit_allowed(sh: &Shared, actor: ActorId, gpa: Gpa, optional_slot: bool, e: &VcpuExit) -> bool {
    let kind = match e {
        VcpuExit::HostFault { .. } => return true,
        e if sh.nested && super::nested::exit_allowed(e) => return true,
        VcpuExit::NoMemslot { .. } | VcpuExit::ReadonlyMemslot { .. } if optional_slot => {
            return true;
        }
        VcpuExit::StaleTranslation { .. } => ViolationKind::StaleTranslation,
        _ => ViolationKind::UnexpectedError,
    };
    sh.violation(
        actor,
        kind,
        Some(gpa.gfn()),
        format!("access to gpa {gpa}: {e}"),
    );
    false
}

/// A vCPU thread: writes and reads the host pages it owns through every guest alias.
pub(super) fn vcpu(
    vm: &Vm,
    sh: &Shared,
    cfg: &TortureConfig,
    id: usize,
    l2: Option<&super::nested::Nested>,
    progress: &Progress,
) {
    let actor = ActorId::Vcpu(id);
    let mut vcpu = match vm.create_vcpu() {
        Ok(v) => v,
        Err(e) => {
            sh.violation(
                actor,
                ViolationKind::UnexpectedError,
                None,
                format!("create_vcpu: {e}"),
            );
            return;
        }
    };
    if let Some(n) = l2
        && let Err(e) = super::nested::enter(&mut vcpu, n)
    {
        sh.violation(
            actor,
            ViolationKind::UnexpectedError,
            None,
            format!("enter_l2: {e}"),
        );
        return;
    }
    let l = sh.layout;
    let owned: Vec<u64> = (0..l.host_pages())
        .filter(|&hp| !l.is_private(hp) && hp as usize % cfg.vcpus == id)
        .collect();
    if owned.is_empty() {
        return;
    }
    let mut records = vec![PageRecord::default(); l.host_pages() as usize];
    let mut rng = Rng::new(cfg.seed, id as u64 + 1);
    let mut seq = 0u64;
    let mut ops = 0u64;
    while !sh.stopped() && cfg.ops_per_vcpu.is_none_or(|n| ops < n) {
        // A short burst in guest mode, then leave it (requests are handled on entry). A write ends
        // the burst: its SPTE is checked outside guest mode, since reading an SPTE may take
        // `mmu_lock` (shadow MMU) and a vCPU in guest mode must never block (a flusher holding
        // `mmu_lock` waits for it).
        let mut check: Option<(Gpa, SpteCheck)> = None;
        let mut g = vcpu.enter();
        for _ in 0..16 {
            let hp = owned[rng.below(owned.len() as u64) as usize];
            let (gpa, optional) = l.gpa_for(hp, rng.next_u64());
            let rec = &mut records[hp as usize];
            ops += 1;
            if rng.percent(60) {
                progress.start(op::WRITE, hp);
                seq += 1;
                let v = encode(id, hp, seq);
                let discard = sh.discard_gen(hp);
                match g.write_u64(gpa, v) {
                    Ok(()) => {
                        *rec = PageRecord { last: v, discard };
                        check = Some((gpa, SpteCheck::Dirty));
                    }
                    Err(e) => {
                        if matches!(
                            e,
                            VcpuExit::HostFault {
                                error: GupError::OutOfFrames,
                                ..
                            }
                        ) {
                            // ORDERING: Relaxed: a statistic.
                            sh.out_of_frames_exits.fetch_add(1, Ordering::Relaxed);
                            check = Some((gpa, SpteCheck::NotInstalled));
                        }
                        if !exit_allowed(sh, actor, gpa, optional, &e) {
                            break;
                        }
                    }
                }
                progress.done_op();
                break;
            }
            progress.start(op::READ, hp);
            match g.read_u64(gpa) {
                Ok(got) => {
                    if !check_read(sh, actor, gpa, hp, rec, got) {
                        break;
                    }
                }
                Err(e) => {
                    if !exit_allowed(sh, actor, gpa, optional, &e) {
                        break;
                    }
                }
            }
            progress.done_op();
        }
        drop(g);
        if let Some((gpa, what)) = check {
            check_spte(vm, sh, actor, gpa, what);
        }
    }
}

/// What the SPTE of a gfn must look like right after an access by its only writer.
#[derive(Clone, Copy)]
enum SpteCheck {
    /// The write succeeded: the SPTE is absent, or present with Dirty (oracle 4).
    Dirty,
    /// The write's fault failed for lack of frames: nothing is installed (oracle 5).
    NotInstalled,
}

/// Runs an SPTE oracle. Only the owner vCPU faults its gfns in at 4K and it has not accessed
/// `gpa` since, so a present 4K SPTE is the one its access went through (zaps only remove SPTEs).
fn check_spte(vm: &Vm, sh: &Shared, actor: ActorId, gpa: Gpa, what: SpteCheck) {
    let Some((spte, level)) = vm.spte(AsId::new(0), gpa.gfn()) else {
        return;
    };
    // A huge leaf also maps other vCPUs' gfns: any of them may have faulted it in after this
    // vCPU's leaf was zapped (a host THP split, a reset), so the premise above holds for 4K
    // leaves only.
    if !spte.is_present_leaf(level) || level != crate::addr::Level::L4K {
        return;
    }
    match what {
        SpteCheck::Dirty if !spte.is_dirty() => sh.violation(
            actor,
            ViolationKind::DirtyLost,
            Some(gpa.gfn()),
            format!("write to gpa {gpa} succeeded, SPTE {spte:?} lacks Dirty"),
        ),
        SpteCheck::NotInstalled => sh.violation(
            actor,
            ViolationKind::HalfInstalled,
            Some(gpa.gfn()),
            format!("write fault failed (out of frames) but {spte:?} is installed"),
        ),
        SpteCheck::Dirty => {}
    }
}

/// Ranges the host actor works on: `n` pages from a random churnable page.
fn churn_range(rng: &mut Rng, l: &Layout) -> (u64, u64) {
    loop {
        let hp = rng.below(l.host_pages());
        let n = 1 + rng.below(4);
        if (hp..hp + n).all(|p| p < l.host_pages() && l.churnable(p)) {
            return (hp, n);
        }
    }
}

/// The host thread: munmap/mmap, mprotect RO/RW (checking no write lands while RO) and
/// madvise(DONTNEED) on random ranges.
pub(super) fn host(host: &HostMm, sh: &Shared, cfg: &TortureConfig, progress: &Progress) {
    let actor = ActorId::Host;
    let l = sh.layout;
    let mut rng = Rng::new(cfg.seed, 1000);
    let fail = |what: &str, e: HostError| {
        sh.violation(
            actor,
            ViolationKind::UnexpectedError,
            None,
            format!("{what}: {e}"),
        );
    };
    let thp = cfg.backing == crate::host::BackingSrc::AnonymousThp;
    while !sh.stopped() {
        let (hp, n) = churn_range(&mut rng, &l);
        let (hva, len) = (l.hva_of(hp), n * PAGE);
        // With THP backing, now and then collapse the 2 MiB span around the range (khugepaged):
        // data stays, so no discard is recorded; only churnable spans, like every host op.
        if thp && rng.below(4) == 0 {
            let span = 512;
            let base = l.hva_of(0).page();
            let aligned = (base + hp) & !(span - 1);
            let first = aligned.wrapping_sub(base);
            if aligned >= base
                && (first..first + span).all(|p| p < l.host_pages() && l.churnable(p))
            {
                progress.start(op::COLLAPSE, first);
                if let Err(e) = host.collapse(l.hva_of(first)) {
                    fail("collapse", e);
                }
                progress.done_op();
                continue;
            }
        }
        match rng.below(3) {
            0 => {
                progress.start(op::DONTNEED, hp);
                sh.bump_discard(hp, n);
                if let Err(e) = host.madvise_dontneed(hva, len) {
                    fail("madvise_dontneed", e);
                }
                sh.bump_discard(hp, n);
            }
            1 => {
                progress.start(op::MPROTECT, hp);
                if let Err(e) = host.mprotect(hva, len, Prot::READ) {
                    fail("mprotect(READ)", e);
                    break;
                }
                // After invalidate_range_start returned, no guest write may land: snapshot, let
                // the vCPUs run, compare (host reads fault pages in, which the oracle allows).
                let snap: Vec<Result<u64, HostError>> =
                    (0..n).map(|i| host.read_u64(l.hva_of(hp + i))).collect();
                std::thread::yield_now();
                for (i, before) in snap.into_iter().enumerate() {
                    let p = hp + i as u64;
                    if let (Ok(b), Ok(a)) = (before, host.read_u64(l.hva_of(p)))
                        && a != b
                    {
                        let (gpa, _) = l.gpa_for(p, 1);
                        sh.violation(
                            actor,
                            ViolationKind::WriteToReadOnly,
                            Some(gpa.gfn()),
                            format!("host page {p} changed from {b:#x} to {a:#x} while read-only"),
                        );
                    }
                }
                if let Err(e) = host.mprotect(hva, len, Prot::READ | Prot::WRITE) {
                    fail("mprotect(READ|WRITE)", e);
                }
            }
            _ => {
                progress.start(op::REMAP, hp);
                sh.bump_discard(hp, n);
                if let Err(e) = host.munmap(hva, len) {
                    fail("munmap", e);
                    break;
                }
                std::thread::yield_now();
                if let Err(e) = host.mmap_fixed(hva, len, Prot::READ | Prot::WRITE) {
                    fail("mmap_fixed", e);
                } else if cfg.backing == crate::host::BackingSrc::AnonymousThp
                    && let Err(e) = host.madvise_hugepage(hva, len, true)
                {
                    fail("madvise_hugepage", e);
                }
                sh.bump_discard(hp, n);
            }
        }
        progress.done_op();
    }
}

/// Accepts the outcomes aging may have while the host churns: young or not, or a range with a
/// hole (`NotMapped`, which changes nothing).
fn aging_ok(sh: &Shared, what: &str, r: Result<bool, HostError>) -> Option<bool> {
    match r {
        Ok(y) => Some(y),
        Err(HostError::NotMapped { .. }) => None,
        Err(e) => {
            sh.violation(
                ActorId::Aging,
                ViolationKind::UnexpectedError,
                None,
                format!("{what}: {e}"),
            );
            None
        }
    }
}

/// The aging thread: random-range aging, plus (with the accessed oracle on) rounds over its
/// private pages through its own vCPU: clear_young, write, test_young must say young unless the
/// write hit the TLB or an MMU reset intervened.
pub(super) fn aging(vm: &Vm, sh: &Shared, cfg: &TortureConfig, progress: &Progress) {
    let actor = ActorId::Aging;
    let l = sh.layout;
    let host = vm.host();
    let mut rng = Rng::new(cfg.seed, 2000);
    let mut vcpu = if cfg.actors.contains(super::Actors::ACCESSED) {
        match vm.create_vcpu() {
            Ok(v) => Some(v),
            Err(e) => {
                sh.violation(
                    actor,
                    ViolationKind::UnexpectedError,
                    None,
                    format!("create_vcpu: {e}"),
                );
                return;
            }
        }
    } else {
        None
    };
    let mut last = vec![0u64; l.private as usize];
    let mut seq = 0u64;
    while !sh.stopped() {
        progress.start(op::AGE, 0);
        // Random ranges avoid the oracle's private pages, so that in strict mode only its own
        // clear_flush_young clears their Accessed bits.
        let first_private = l.main_pages - l.private;
        let (lo, hi) = if rng.percent(50) {
            (0, first_private)
        } else {
            (l.main_pages, l.host_pages())
        };
        let hp = lo + rng.below(hi - lo);
        let n = 1 + rng.below(hi - hp);
        let (hva, len) = (l.hva_of(hp), n * PAGE);
        match rng.below(3) {
            0 => {
                aging_ok(sh, "clear_young", host.clear_young(hva, len));
            }
            1 => {
                aging_ok(sh, "test_young", host.test_young(hva));
            }
            _ => {
                aging_ok(sh, "clear_flush_young", host.clear_flush_young(hva, len));
            }
        }
        progress.done_op();
        let Some(vcpu) = vcpu.as_mut() else {
            std::thread::yield_now();
            continue;
        };
        progress.start(op::ACCESSED, first_private);
        let mut hidden = 0u64;
        for i in 0..l.private {
            let hp = first_private + i;
            let hva: Hva = l.hva_of(hp);
            let gpa = Gpa::new(MAIN_GPA + hp * PAGE);
            let cleared = if cfg.elide_tlb_flush_if_young {
                host.clear_young(hva, PAGE)
            } else {
                host.clear_flush_young(hva, PAGE)
            };
            if aging_ok(sh, "clear_young", cleared).is_none() {
                return;
            }
            let reset_before = sh.reset_gen();
            let before = vcpu.stats();
            seq += 1;
            let v = encode(0xFF, hp, seq);
            if let Err(e) = vcpu.write_u64(gpa, v) {
                if !exit_allowed(sh, actor, gpa, false, &e) {
                    return;
                }
                continue;
            }
            last[i as usize] = v;
            let hit = vcpu.stats().tlb_misses == before.tlb_misses;
            let young = aging_ok(sh, "test_young", host.test_young(hva));
            // Whether a leaf mapped the page at test_young, sampled now: the read below faults a
            // missing leaf back in (with Accessed set), which would hide that there was none.
            let unmapped_at_test = young == Some(false)
                && cfg.backing == crate::host::BackingSrc::AnonymousThp
                && vm
                    .spte(crate::addr::AsId::new(0), gpa.gfn())
                    .is_none_or(|(s, level)| level > crate::addr::Level::L4K && s.is_accessed());
            // The follow-up read checks the data and, if an MMU reset invalidated the root the
            // write walked, makes the vCPU load a new one (which `root_loads` shows).
            match vcpu.read_u64(gpa) {
                Ok(got) if got == last[i as usize] => {}
                Ok(got) => {
                    sh.violation(
                        actor,
                        ViolationKind::Data,
                        Some(gpa.gfn()),
                        format!(
                            "read gpa {gpa} = {got:#x}, last write {:#x}",
                            last[i as usize]
                        ),
                    );
                    return;
                }
                Err(e) => {
                    if !exit_allowed(sh, actor, gpa, false, &e) {
                        return;
                    }
                }
            }
            if young == Some(false) {
                let reset_now = sh.reset_gen();
                if vcpu.stats().root_loads != before.root_loads
                    || reset_before % 2 == 1
                    || reset_now != reset_before
                {
                    // A reset ran (or moved the vCPU to a new root) since the sample: the
                    // Accessed bit the write set may have been zapped with its SPTE, or be in an
                    // invalidated root, which test_young does not look at.
                    // ORDERING: Relaxed: a statistic.
                    sh.accessed_excused_by_reset.fetch_add(1, Ordering::Relaxed);
                } else if hit {
                    hidden += 1;
                } else if unmapped_at_test {
                    // With THP backing the private page shares a huge page (and a huge leaf) with
                    // churned pages: a host operation on one of them splits the THP and
                    // invalidates its whole 2 MiB, zapping the leaf the write set Accessed in.
                    // No leaf mapped the page just after test_young, so nothing was young; a
                    // leaf that is present but old is still a violation. The sample must precede
                    // the read, which faults the page back in. Only this thread's vCPU touches a
                    // private page, so a young leaf found by the sample but not by test_young
                    // can only be a huge leaf another vCPU installed (a fault's leaf has Accessed
                    // set) or accessed meanwhile: excused too (this blind spot is a 2 MiB leaf
                    // present and old at test time that another vCPU touches within the window);
                    // a 4K leaf or an old one is not.
                    // ORDERING: Relaxed: a statistic.
                    sh.accessed_excused_by_reset.fetch_add(1, Ordering::Relaxed);
                } else {
                    sh.violation(
                        actor,
                        ViolationKind::AccessedLost,
                        Some(gpa.gfn()),
                        format!(
                            "wrote gpa {gpa} after clear_young through a page walk, on a root \
                             still current; test_young says old"
                        ),
                    );
                    return;
                }
            }
        }
        // ORDERING: Relaxed: a statistic.
        sh.accessed_hidden_by_tlb
            .fetch_add(hidden, Ordering::Relaxed);
        if hidden > cfg.tlb_entries as u64 {
            sh.violation(
                actor,
                ViolationKind::AccessedLost,
                None,
                format!(
                    "{hidden} accesses hidden by a TLB of {} entries in one round",
                    cfg.tlb_entries
                ),
            );
            return;
        }
        progress.done_op();
    }
}

/// The memslot thread: moves slot 1 between its two bases, toggles its dirty logging, deletes
/// and re-creates it (sometimes read-only), and creates and deletes the alias slot 2.
pub(super) fn memslot(vm: &Vm, sh: &Shared, cfg: &TortureConfig, progress: &Progress) {
    let actor = ActorId::Memslot;
    let l = sh.layout;
    let mut rng = Rng::new(cfg.seed, 3000);
    let (mut at, mut flags, mut present, mut alias) = (0usize, MemFlags::empty(), true, false);
    while !sh.stopped() {
        progress.start(op::MEMSLOT, l.main_pages);
        let (req, what) = match rng.below(4) {
            0 if present => {
                at ^= 1;
                (dyn_region(&l, at, flags), "move slot 1")
            }
            1 if present && !flags.contains(MemFlags::READONLY) => {
                flags.toggle(MemFlags::LOG_DIRTY_PAGES);
                (dyn_region(&l, at, flags), "toggle dirty logging of slot 1")
            }
            0..=2 => {
                if present {
                    present = false;
                    let mut r = dyn_region(&l, at, flags);
                    r.size = 0;
                    (r, "delete slot 1")
                } else {
                    present = true;
                    flags = if rng.percent(25) {
                        MemFlags::READONLY
                    } else {
                        MemFlags::empty()
                    };
                    (dyn_region(&l, at, flags), "create slot 1")
                }
            }
            _ => {
                if l.alias_pages == 0 {
                    continue;
                }
                alias = !alias;
                (alias_region(&l, alias), "create/delete alias slot 2")
            }
        };
        if let Err(e) = vm.set_user_memory_region(req) {
            sh.violation(
                actor,
                ViolationKind::UnexpectedError,
                None,
                format!("{what}: {e}"),
            );
            return;
        }
        progress.done_op();
        std::thread::yield_now();
    }
}

/// The MMU-reset thread: invalidates every root (`kvm_mmu_reset_context` / fast zap).
pub(super) fn reset(vm: &Vm, sh: &Shared, thp: bool, progress: &Progress) {
    let everything = crate::addr::GfnRange::new(
        crate::addr::Gfn::new(0),
        crate::addr::Gfn::new(crate::geometry::GFN_LIMIT),
    )
    .expect("a non-empty range");
    let mut round = 0u64;
    while !sh.stopped() {
        progress.start(op::RESET, 0);
        // ORDERING: SeqCst around the reset (oracle protocol 3).
        sh.reset_gen.fetch_add(1, Ordering::SeqCst);
        // With THP backing, rounds alternate between a reset, an eager split of every huge leaf
        // and an in-place recovery; a shadow split or recovery drops leaves (and their A bits)
        // like a reset, so each is bracketed the same way.
        round += 1;
        match round % 3 {
            1 if thp => {
                vm.split_huge_pages(AsId::new(0), everything, crate::addr::Level::L4K);
            }
            2 if thp => {
                vm.recover_huge_pages(AsId::new(0), everything);
            }
            _ => vm.reset_mmu(),
        }
        // ORDERING: as above.
        sh.reset_gen.fetch_add(1, Ordering::SeqCst);
        progress.done_op();
        // Pace resets so that most accessed-oracle rounds run without one in progress.
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}
