//! The page-fault path: memslot lookup, sequence snapshot, GUP, and the locked install (see the
//! module doc of [`crate::mmu`] for the numbered protocol).

use crate::addr::{Gfn, Gpa, Hva, Level};
use crate::host::GupError;
use crate::mmu::MmuRoot;
use crate::mmu::tdp::{FaultOutcome, MapRequest, RetryReason};
use crate::sync::atomic::Ordering;
use crate::vm::VmInner;

/// A fault KVM cannot resolve: the vCPU exits to its user with this reason.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum FaultError {
    /// No memslot covers the address (KVM would exit with MMIO).
    #[error("no memslot covers gpa {gpa}")]
    NoMemslot {
        /// The faulting guest physical address.
        gpa: Gpa,
    },
    /// A write to a memslot created with `READONLY` (KVM would exit with MMIO).
    #[error("write to read-only memslot at gpa {gpa}")]
    ReadonlyMemslot {
        /// The faulting guest physical address.
        gpa: Gpa,
    },
    /// The host refused the page (`-EFAULT`): unmapped, or a write to a read-only mapping.
    #[error("host fault at gpa {gpa} (hva {hva}): {error}")]
    HostFault {
        /// The faulting guest physical address.
        gpa: Gpa,
        /// The host address the memslot maps it to.
        hva: Hva,
        /// What the host said.
        error: GupError,
    },
    /// The VM has been torn down.
    #[error("the VM has been torn down")]
    VmDead,
}

impl VmInner {
    /// Handles one fault on `gpa` for a vCPU whose current root is `root`.
    pub(crate) fn page_fault(
        &self,
        root: &MmuRoot,
        gpa: Gpa,
        write: bool,
    ) -> Result<FaultOutcome, FaultError> {
        self.counters.faults.fetch_add(1, Ordering::Relaxed);
        let outcome = self.page_fault_inner(root, gpa.gfn(), gpa, write)?;
        if matches!(outcome, FaultOutcome::Retry(_)) {
            self.counters.fault_retries.fetch_add(1, Ordering::Relaxed);
        }
        Ok(outcome)
    }

    fn page_fault_inner(
        &self,
        root: &MmuRoot,
        gfn: Gfn,
        gpa: Gpa,
        write: bool,
    ) -> Result<FaultOutcome, FaultError> {
        let srcu = self.srcu_read();
        let Some(cell) = self.memslots.get(root.as_id().index()) else {
            return Err(FaultError::NoMemslot { gpa });
        };
        let slots = cell.load(&srcu);
        let Some(slot) = slots.find_by_gfn(gfn) else {
            return Err(FaultError::NoMemslot { gpa });
        };
        if slot.is_invalid() {
            return Ok(FaultOutcome::Retry(RetryReason::InvalidSlot));
        }
        let readonly_slot = slot
            .flags()
            .contains(crate::vm::memslot::MemFlags::READONLY);
        if write && readonly_slot {
            return Err(FaultError::ReadonlyMemslot { gpa });
        }
        let Some(hva) = slot.gfn_to_hva(gfn) else {
            return Err(FaultError::NoMemslot { gpa });
        };

        let snap = self.invalidate.snapshot();
        if self.invalidate.retry_gfn_unsafe(snap, gfn) {
            return Ok(FaultOutcome::Retry(RetryReason::Invalidation));
        }
        let page = match self.host.get_user_page(hva, write) {
            Ok(p) => p,
            Err(error) => return Err(FaultError::HostFault { gpa, hva, error }),
        };
        if self.invalidate.retry_gfn_unsafe(snap, gfn) {
            return Ok(FaultOutcome::Retry(RetryReason::Invalidation));
        }

        let req = MapRequest {
            gfn,
            pfn: page.pfn,
            level: Level::L4K,
            host_writable: page.writable && !readonly_slot,
            write_fault: write,
            prefetch: false,
        };
        let outcome = match root {
            MmuRoot::Tdp(root) => {
                let mmu = self.mmu_lock.read();
                if self.dead.load(Ordering::Acquire) {
                    return Err(FaultError::VmDead);
                }
                if root.is_invalid() {
                    return Ok(FaultOutcome::Retry(RetryReason::InvalidRoot));
                }
                if self.invalidate.retry_gfn(snap, gfn, mmu.witness()) {
                    return Ok(FaultOutcome::Retry(RetryReason::Invalidation));
                }
                let rcu = self.rcu.pin();
                let outcome = self.tdp.map(root, &req, mmu.witness(), &rcu);
                drop(rcu);
                drop(mmu);
                outcome
            }
            // Spec §3.4 shadow path: the same checks, under `mmu_lock` write.
            MmuRoot::Shadow(root) => {
                let mmu = self.mmu_lock.write();
                if self.dead.load(Ordering::Acquire) {
                    return Err(FaultError::VmDead);
                }
                if root.is_invalid() {
                    return Ok(FaultOutcome::Retry(RetryReason::InvalidRoot));
                }
                if self.invalidate.retry_gfn(snap, gfn, mmu.read_witness()) {
                    return Ok(FaultOutcome::Retry(RetryReason::Invalidation));
                }
                let Some(rmaps) = slot.rmaps() else {
                    panic!(
                        "kvmmu bug: a shadow-MMU VM published memslot {:?} without rmaps",
                        slot.id()
                    );
                };
                let outcome = self.shadow.map(root, &req, rmaps, mmu.witness(), self);
                drop(mmu);
                outcome
            }
        };
        drop(srcu);
        match outcome {
            // Beyond what a root can map: no memslot can legitimately cover it either.
            FaultOutcome::OutOfRange => Err(FaultError::NoMemslot { gpa }),
            o => Ok(o),
        }
    }
}
