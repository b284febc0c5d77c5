//! The opt-in actors, not in the default set: the reclaim thread (page-out to swap) and the
//! dirty-log harvester. Each runs until the run stops and records every oracle violation in
//! [`Shared`].

use crate::addr::{AsId, SlotId};
use crate::host::{HostError, HostMm, ReclaimError};
use crate::vm::Vm;

use super::TortureConfig;
use super::oracle::{ActorId, Progress, Shared, ViolationKind, op};
use super::rng::Rng;

const PAGE: u64 = 4096;

/// The reclaim thread: evicts random ranges of vCPU pages to swap (`madvise(MADV_PAGEOUT)`); the
/// vCPUs' next accesses refault them, and the data oracle checks they read what they wrote.
pub(super) fn reclaim(host: &HostMm, sh: &Shared, cfg: &TortureConfig, progress: &Progress) {
    let l = sh.layout;
    let mut rng = Rng::new(cfg.seed, 6000);
    while !sh.stopped() {
        let hp = rng.below(l.host_pages());
        let n = 1 + rng.below(8);
        if !(hp..hp + n).all(|p| p < l.host_pages() && !l.is_private(p)) {
            continue;
        }
        progress.start(op::PAGE_OUT, hp);
        match host.page_out(l.hva_of(hp), n * PAGE) {
            // The host actor may have the range unmapped for a remap right now.
            Ok(_) | Err(ReclaimError::Host(HostError::NotMapped { .. })) => {}
            Err(e) => sh.violation(
                ActorId::Reclaim,
                ViolationKind::UnexpectedError,
                None,
                format!("page_out: {e}"),
            ),
        }
        progress.done_op();
        std::thread::yield_now();
    }
}

/// The dirty-log harvester: harvests slot 1 (get, and clear in manual mode) back to back,
/// switching between classic and manual protect every 16 rounds. `NotLogging` and `NoSuchSlot`
/// are expected (the memslot thread toggles logging, moves and deletes the slot); any other
/// error is a violation.
pub(super) fn dirty_log(vm: &Vm, sh: &Shared, progress: &Progress) {
    use crate::vm::dirty_log::{DirtyLogError, DirtyLogProtect};
    let (as0, slot) = (AsId::new(0), SlotId::new(1));
    let mut round = 0u64;
    while !sh.stopped() {
        progress.start(op::HARVEST, 0);
        let manual = (round / 16) % 2 == 1;
        if round.is_multiple_of(16) {
            let mode = if manual {
                DirtyLogProtect::Manual {
                    initially_set: round % 64 == 16,
                }
            } else {
                DirtyLogProtect::Classic
            };
            if let Err(e) = vm.set_dirty_log_protect(mode) {
                sh.violation(
                    ActorId::DirtyLog,
                    ViolationKind::UnexpectedError,
                    None,
                    format!("set_dirty_log_protect: {e}"),
                );
                return;
            }
        }
        let result = vm.get_dirty_log(as0, slot).and_then(|words| {
            if manual {
                let npages = words.len() as u64 * 64;
                // The last word may be partial: clear up to the slot's end, which the bitmap's
                // length bounds; a shorter slot is refused as past-the-end and retried next round.
                match vm.clear_dirty_log(as0, slot, 0, npages, &words) {
                    Err(DirtyLogError::RangePastSlot { npages: n, .. }) => {
                        vm.clear_dirty_log(as0, slot, 0, n, &words)
                    }
                    r => r,
                }
            } else {
                Ok(())
            }
        });
        match result {
            Ok(()) | Err(DirtyLogError::NotLogging { .. } | DirtyLogError::NoSuchSlot { .. }) => {}
            Err(e) => {
                sh.violation(
                    ActorId::DirtyLog,
                    ViolationKind::UnexpectedError,
                    None,
                    format!("dirty-log harvest: {e}"),
                );
                return;
            }
        }
        round += 1;
        progress.done_op();
        std::thread::yield_now();
    }
}
