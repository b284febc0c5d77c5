//! Dirty logging with per-slot bitmaps (`KVM_MEM_LOG_DIRTY_PAGES`, `KVM_GET_DIRTY_LOG`,
//! `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`, `KVM_CLEAR_DIRTY_LOG`; `kvm_get_dirty_log_protect`,
//! `kvm_clear_dirty_log_protect` in `kvm_main.c`).
//!
//! # Protocol (docs/locking.md "Dirty logging", docs/invariants.md "Dirty logging")
//! - A slot with `LOG_DIRTY_PAGES` owns a [`DirtyBitmap`] (shared by its INVALID copy and by a
//!   flags-only or move successor that keeps logging). Every write fault that makes a leaf
//!   writable marks its page, before the vCPU's write: the slow path under `mmu_lock` before
//!   installing the leaf (as `make_spte` does), the fast path right after its CAS (D3).
//! - Enabling logging write-protects every leaf of the slot (clear W, keep MMU-writable) and
//!   flushes remote TLBs, after the new slot is published (so a fault either saw the logging slot
//!   and marks, or installed its leaf before the swap's SRCU wait ended and is write-protected).
//!   With manual protect and `INITIALLY_SET` the bitmap starts all set and nothing is
//!   write-protected until the user clears ranges.
//! - Harvesting (classic `get_dirty_log`, or `clear_dirty_log` in manual mode) takes each bitmap
//!   word with one atomic exchange (or AND), write-protects exactly the pages of that word under
//!   `mmu_lock` write, and flushes remote TLBs before returning (D1). A write after the exchange
//!   either lands before the write-protection and flush (its page is in the returned mask, and
//!   the user reads the page after the call returns) or faults and marks the page again.
//! - In [`DirtyTracking::DBit`] mode re-arming clears D instead of W (leaves stay writable), and
//!   every harvest first moves the slot's D bits into the bitmap under `mmu_lock` write (the
//!   kernel's PML-buffer flush), so both modes report the same pages.
//! - Disabling logging drops the bitmap and changes no SPTE: leaves stay write-protected with
//!   MMU-writable set, and the next write is fixed lazily by the fast page fault, as in the kernel.

use crate::addr::{AsId, Gfn, SlotId};
use crate::sync::Arc;
use crate::sync::atomic::{AtomicU64, Ordering};
use crate::sync::guest_mode::{self, InGuestMode};

use super::memslot::{MemFlags, Memslot};
use super::{Vm, VmInner};

/// Bits per bitmap word.
const BITS: u64 = 64;

/// A memslot's dirty bitmap: one bit per 4 KiB page, set by write faults, taken by harvests.
#[derive(Debug)]
pub struct DirtyBitmap {
    words: Box<[AtomicU64]>,
    npages: u64,
}

impl DirtyBitmap {
    /// A bitmap for `npages` pages, all clear, or all set (`KVM_DIRTY_LOG_INITIALLY_SET`).
    pub(crate) fn new(npages: u64, initially_set: bool) -> DirtyBitmap {
        let nwords = npages.div_ceil(BITS);
        let words = (0..nwords)
            .map(|i| {
                let v = if !initially_set {
                    0
                } else if (i + 1) * BITS <= npages {
                    u64::MAX
                } else {
                    (1u64 << (npages - i * BITS)) - 1
                };
                AtomicU64::new(v)
            })
            .collect();
        DirtyBitmap { words, npages }
    }

    /// Number of pages the bitmap covers (the slot's `npages`).
    pub fn npages(&self) -> u64 {
        self.npages
    }

    /// Marks the page at `offset` from the slot's base (`mark_page_dirty_in_slot`). Out-of-range
    /// offsets are ignored (callers pass offsets of gfns they found in the slot).
    #[inline]
    pub(crate) fn mark(&self, offset: u64) {
        if let Some(w) = self.words.get((offset / BITS) as usize) {
            // ORDERING: D3 — atomicity keeps every mark (it lands before a concurrent exchange
            // and is returned, or after it and stays). Release pairs with the Acquire of `take`:
            // a harvest that takes this mark then sees the fast page fault's CAS (sequenced
            // before the mark) when it snapshots the leaf to write-protect it, so it cannot
            // skip a leaf that was just made writable (found by the loom model
            // `fast_fault_rearm_and_ager_never_lose_a_dirty_bit`).
            w.fetch_or(1 << (offset % BITS), Ordering::Release);
        }
    }

    /// Word `i`, read without changing it.
    fn load(&self, i: usize) -> u64 {
        // ORDERING: as `mark`: the value, not its ordering, is what a harvest reports.
        self.words[i].load(Ordering::Relaxed)
    }

    /// Takes word `i` (exchanges it with 0).
    fn take(&self, i: usize) -> u64 {
        // ORDERING: D1 — one atomic exchange, so a concurrent `mark` is either returned or kept;
        // Acquire pairs with `mark`'s Release (D3).
        self.words[i].swap(0, Ordering::Acquire)
    }

    /// Clears `mask` in word `i`; returns the bits of `mask` that were set.
    fn take_bits(&self, i: usize, mask: u64) -> u64 {
        // ORDERING: as `take` (D1, D3).
        self.words[i].fetch_and(!mask, Ordering::Acquire) & mask
    }

    fn nwords(&self) -> usize {
        self.words.len()
    }
}

/// How harvesting re-arms tracking (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DirtyLogProtect {
    /// `get_dirty_log` returns and re-arms (the default).
    #[default]
    Classic,
    /// `get_dirty_log` only returns; `clear_dirty_log` re-arms chosen ranges.
    Manual {
        /// `KVM_DIRTY_LOG_INITIALLY_SET`: a slot's bitmap starts all set and enabling logging
        /// write-protects nothing.
        initially_set: bool,
    },
}

impl DirtyLogProtect {
    fn encode(self) -> u64 {
        match self {
            DirtyLogProtect::Classic => 0,
            DirtyLogProtect::Manual { initially_set } => 1 + u64::from(initially_set),
        }
    }
    fn decode(v: u64) -> DirtyLogProtect {
        match v {
            0 => DirtyLogProtect::Classic,
            v => DirtyLogProtect::Manual {
                initially_set: v == 2,
            },
        }
    }
}

/// How pages are re-armed for logging (the kernel's write-protection, or PML's D bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DirtyTracking {
    /// Re-arm by clearing W (keeping MMU-writable); the next write faults and marks the page
    /// (the fast page fault fixes it without `mmu_lock`).
    #[default]
    WriteProtect,
    /// Re-arm by clearing D and flushing TLBs, as with PML: leaves stay writable, the CPU sets D
    /// on the next write, and each harvest first moves the slot's D bits into its bitmap (the
    /// kernel's PML-buffer flush). Gives the same bitmaps as [`DirtyTracking::WriteProtect`].
    DBit,
}

/// The VM's dirty-log mode.
#[derive(Debug, Default)]
pub(crate) struct DirtyLogState {
    /// [`DirtyLogProtect`], encoded; written under `slots_lock`.
    protect: AtomicU64,
    /// [`DirtyTracking`]: 0 write-protect, 1 D bit; written under `slots_lock`.
    tracking: AtomicU64,
}

/// Why a dirty-log call was refused; nothing changed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum DirtyLogError {
    /// [`DirtyTracking::DBit`] needs hardware Dirty bits, which a VM with
    /// `VmConfig::ad_bits = AdBits::Disabled` does not have (KVM disables PML without EPT A/D).
    #[error("D-bit dirty tracking needs A/D bits (the VM has ad_bits = Disabled)")]
    DBitNeedsAdBits,
    /// No memslot with this id in this address space.
    #[error("no memslot {slot:?} in address space {as_id:?}")]
    NoSuchSlot {
        /// The address space.
        as_id: AsId,
        /// The slot.
        slot: SlotId,
    },
    /// The slot does not have `LOG_DIRTY_PAGES` (KVM: `-ENOENT`).
    #[error("memslot {slot:?} does not log dirty pages")]
    NotLogging {
        /// The slot.
        slot: SlotId,
    },
    /// `clear_dirty_log` needs manual protect mode (KVM: `-EINVAL`).
    #[error("clear_dirty_log needs manual dirty-log protect mode")]
    NotManualProtect,
    /// The range does not start at a multiple of 64 pages, or its length is not a multiple of
    /// 64 pages and it does not end at the slot's end.
    #[error("dirty-log range [{first_page}, +{num_pages}) is not 64-page aligned")]
    UnalignedRange {
        /// The first page (offset in the slot).
        first_page: u64,
        /// The number of pages.
        num_pages: u64,
    },
    /// The range runs past the slot's last page.
    #[error("dirty-log range [{first_page}, +{num_pages}) runs past the slot's {npages} pages")]
    RangePastSlot {
        /// The first page.
        first_page: u64,
        /// The number of pages.
        num_pages: u64,
        /// The slot's size in pages.
        npages: u64,
    },
    /// The clear mask has fewer words than the range needs.
    #[error("clear mask has {words} words, the range needs {needed}")]
    MaskTooShort {
        /// Words given.
        words: usize,
        /// Words needed (`num_pages.div_ceil(64)`).
        needed: u64,
    },
    /// The tracking mode cannot change while a memslot logs dirty pages.
    #[error("the dirty tracking mode cannot change while memslot {slot:?} logs dirty pages")]
    TrackingInUse {
        /// A slot that logs.
        slot: SlotId,
    },
    /// The VM uses the dirty ring, not bitmaps (KVM: `-ENXIO`); or D-bit tracking was asked
    /// for, which cannot feed a ring.
    #[error("the VM logs dirty pages into dirty rings")]
    RingInUse,
    /// The VM was torn down.
    #[error("the VM has been torn down")]
    Dead,
    /// The calling thread holds a vCPU in guest mode (re-arming waits for TLB-flush
    /// acknowledgements).
    #[error(transparent)]
    InGuestMode(#[from] InGuestMode),
}

impl Vm {
    /// `KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)`: chooses how harvests re-arm. Applies
    /// to later `get_dirty_log` / `clear_dirty_log` calls, and `initially_set` to slots that start
    /// logging afterwards.
    ///
    /// Errors: [`DirtyLogError::Dead`], [`DirtyLogError::InGuestMode`].
    pub fn set_dirty_log_protect(&self, mode: DirtyLogProtect) -> Result<(), DirtyLogError> {
        guest_mode::check("set_dirty_log_protect")?;
        let _slots = self.inner.slots_lock.lock();
        if self.inner.dead.load(Ordering::Acquire) {
            return Err(DirtyLogError::Dead);
        }
        // ORDERING: written and read under `slots_lock`, which orders them.
        self.inner
            .dirty_log
            .protect
            .store(mode.encode(), Ordering::Relaxed);
        Ok(())
    }

    /// Chooses how pages are re-armed ([`DirtyTracking`]); only while no memslot logs.
    ///
    /// Errors (nothing changes): [`DirtyLogError::TrackingInUse`], [`DirtyLogError::Dead`],
    /// [`DirtyLogError::InGuestMode`], [`DirtyLogError::DBitNeedsAdBits`].
    pub fn set_dirty_tracking(&self, mode: DirtyTracking) -> Result<(), DirtyLogError> {
        guest_mode::check("set_dirty_tracking")?;
        let _slots = self.inner.slots_lock.lock();
        if self.inner.dead.load(Ordering::Acquire) {
            return Err(DirtyLogError::Dead);
        }
        for set in &self.inner.memslots {
            if let Some(s) = set.current().iter().find(|s| s.dirty_bitmap().is_some()) {
                return Err(DirtyLogError::TrackingInUse { slot: s.id() });
            }
        }
        if mode == DirtyTracking::DBit && self.inner.dirty_ring_enabled() {
            return Err(DirtyLogError::RingInUse);
        }
        if mode == DirtyTracking::DBit && self.inner.ad_disabled {
            return Err(DirtyLogError::DBitNeedsAdBits);
        }
        // ORDERING: written and read under `slots_lock`, which orders them.
        self.inner
            .dirty_log
            .tracking
            .store(u64::from(mode == DirtyTracking::DBit), Ordering::Relaxed);
        Ok(())
    }

    /// The current dirty tracking mode.
    pub fn dirty_tracking(&self) -> DirtyTracking {
        self.inner.dirty_tracking()
    }

    /// The current dirty-log protect mode.
    pub fn dirty_log_protect(&self) -> DirtyLogProtect {
        self.inner.dirty_log_protect()
    }

    /// `KVM_GET_DIRTY_LOG`: the slot's bitmap, one bit per page from its base (word `i` bit `b` is
    /// page `64 * i + b`). In classic mode the returned bits are cleared and their pages
    /// write-protected again, with a remote TLB flush before returning; in manual mode nothing
    /// changes (re-arm with [`Vm::clear_dirty_log`]). Read the reported pages after this returns.
    ///
    /// Errors (nothing changes): [`DirtyLogError::NoSuchSlot`], [`DirtyLogError::NotLogging`],
    /// [`DirtyLogError::Dead`], [`DirtyLogError::InGuestMode`].
    pub fn get_dirty_log(&self, as_id: AsId, slot: SlotId) -> Result<Vec<u64>, DirtyLogError> {
        guest_mode::check("get_dirty_log")?;
        self.inner.get_dirty_log(as_id, slot)
    }

    /// `KVM_CLEAR_DIRTY_LOG` (manual mode): for each page `first_page + 64 * i + b` of
    /// `[first_page, first_page + num_pages)` whose bit `b` is set in `mask[i]` (the bits a
    /// previous [`Vm::get_dirty_log`] returned, shifted to `first_page`), clears its dirty bit and
    /// write-protects it if the bit was set, flushing remote TLBs before returning. Pages whose
    /// mask bit is clear keep their dirty bit: a page dirtied after the user's GET is not lost.
    /// `first_page` must be a multiple of 64, and `num_pages` too unless the range ends at the
    /// slot's end; `mask` needs `num_pages.div_ceil(64)` words (bits past `num_pages` are
    /// ignored).
    ///
    /// Errors (nothing changes): [`DirtyLogError::NoSuchSlot`], [`DirtyLogError::NotLogging`],
    /// [`DirtyLogError::NotManualProtect`], [`DirtyLogError::UnalignedRange`],
    /// [`DirtyLogError::RangePastSlot`], [`DirtyLogError::MaskTooShort`], [`DirtyLogError::Dead`],
    /// [`DirtyLogError::InGuestMode`].
    pub fn clear_dirty_log(
        &self,
        as_id: AsId,
        slot: SlotId,
        first_page: u64,
        num_pages: u64,
        mask: &[u64],
    ) -> Result<(), DirtyLogError> {
        guest_mode::check("clear_dirty_log")?;
        self.inner
            .clear_dirty_log(as_id, slot, first_page, num_pages, mask)
    }
}

impl VmInner {
    pub(crate) fn dirty_log_protect(&self) -> DirtyLogProtect {
        // ORDERING: a mode flag; callers that act on it hold `slots_lock` (see the setter).
        DirtyLogProtect::decode(self.dirty_log.protect.load(Ordering::Relaxed))
    }

    pub(crate) fn dirty_tracking(&self) -> DirtyTracking {
        // ORDERING: a mode flag, written and acted on under `slots_lock`.
        if self.dirty_log.tracking.load(Ordering::Relaxed) == 1 {
            DirtyTracking::DBit
        } else {
            DirtyTracking::WriteProtect
        }
    }

    /// D-bit mode: moves the D bits of `slot`'s leaves into its bitmap (clearing them), as the
    /// kernel flushes PML buffers before reading the bitmap. Returns true if a leaf lost D.
    fn sync_dbits(
        &self,
        slot: &Memslot,
        bitmap: &DirtyBitmap,
        mmu: &crate::sync::witness::MmuWrite,
    ) -> bool {
        if self.dirty_tracking() != DirtyTracking::DBit {
            return false;
        }
        let base = slot.base_gfn().raw();
        self.mmu.clear_dirty_gfns(
            slot.as_id(),
            slot.rmaps(),
            slot.gfn_range(),
            |_| true,
            &mut |g| bitmap.mark(g.raw() - base),
            mmu,
        )
    }

    /// The slot `slot` of `as_id` if it logs dirty pages. Caller holds `slots_lock`.
    fn logging_slot(&self, as_id: AsId, slot: SlotId) -> Result<Arc<Memslot>, DirtyLogError> {
        if self.dead.load(Ordering::Acquire) {
            return Err(DirtyLogError::Dead);
        }
        if self.dirty_ring_enabled() {
            return Err(DirtyLogError::RingInUse);
        }
        let no_slot = DirtyLogError::NoSuchSlot { as_id, slot };
        let set = self.memslots.get(as_id.index()).ok_or(no_slot.clone())?;
        let s = set.current().get(slot).cloned().ok_or(no_slot)?;
        if s.dirty_bitmap().is_none() {
            return Err(DirtyLogError::NotLogging { slot });
        }
        Ok(s)
    }

    fn get_dirty_log(&self, as_id: AsId, slot: SlotId) -> Result<Vec<u64>, DirtyLogError> {
        let _slots = self.slots_lock.lock();
        let s = self.logging_slot(as_id, slot)?;
        let Some(bitmap) = s.dirty_bitmap() else {
            return Err(DirtyLogError::NotLogging { slot });
        };
        if matches!(self.dirty_log_protect(), DirtyLogProtect::Manual { .. }) {
            if self.dirty_tracking() == DirtyTracking::DBit {
                // No flush: a synced page stays set until the user clears it, and the clear
                // flushes before the user reads the page.
                let mmu = self.mmu_lock.write();
                self.sync_dbits(&s, bitmap, mmu.witness());
            }
            return Ok((0..bitmap.nwords()).map(|i| bitmap.load(i)).collect());
        }
        let mut out = vec![0u64; bitmap.nwords()];
        let mut flush = false;
        {
            let mmu = self.mmu_lock.write();
            flush |= self.sync_dbits(&s, bitmap, mmu.witness());
            for (i, word) in out.iter_mut().enumerate() {
                if bitmap.load(i) == 0 {
                    continue;
                }
                *word = bitmap.take(i);
                flush |= self.rearm(&s, i, *word, mmu.witness());
            }
        }
        // The kernel flushes after dropping `mmu_lock` and before returning (D1).
        self.flush_after_rearm(flush || out.iter().any(|&w| w != 0));
        Ok(out)
    }

    fn clear_dirty_log(
        &self,
        as_id: AsId,
        slot: SlotId,
        first_page: u64,
        num_pages: u64,
        user_mask: &[u64],
    ) -> Result<(), DirtyLogError> {
        let _slots = self.slots_lock.lock();
        // KVM refuses an unaligned start before it looks the slot up (found by kvmmu-kvm's
        // dirty-log family: a clear of an unaligned range of a non-logging slot is -EINVAL).
        if !first_page.is_multiple_of(BITS) {
            return Err(DirtyLogError::UnalignedRange {
                first_page,
                num_pages,
            });
        }
        let s = self.logging_slot(as_id, slot)?;
        let Some(bitmap) = s.dirty_bitmap() else {
            return Err(DirtyLogError::NotLogging { slot });
        };
        if self.dirty_log_protect() == DirtyLogProtect::Classic {
            return Err(DirtyLogError::NotManualProtect);
        }
        let npages = bitmap.npages();
        let end = first_page.checked_add(num_pages);
        if end.is_none_or(|e| e > npages) {
            return Err(DirtyLogError::RangePastSlot {
                first_page,
                num_pages,
                npages,
            });
        }
        let end = end.unwrap_or(npages);
        if !first_page.is_multiple_of(BITS) || (!num_pages.is_multiple_of(BITS) && end != npages) {
            return Err(DirtyLogError::UnalignedRange {
                first_page,
                num_pages,
            });
        }
        let need = num_pages.div_ceil(BITS);
        if (user_mask.len() as u64) < need {
            return Err(DirtyLogError::MaskTooShort {
                words: user_mask.len(),
                needed: need,
            });
        }
        let mut any = false;
        {
            let mmu = self.mmu_lock.write();
            let mut page = first_page;
            while page < end {
                let i = (page / BITS) as usize;
                let n = (end - page).min(BITS);
                let mask = if n == BITS { u64::MAX } else { (1u64 << n) - 1 };
                let mask = mask & user_mask[((page - first_page) / BITS) as usize];
                let taken = bitmap.take_bits(i, mask);
                if taken != 0 {
                    any = true;
                    self.rearm(&s, i, taken, mmu.witness());
                }
                page += BITS;
            }
        }
        self.flush_after_rearm(any);
        Ok(())
    }

    /// Write-protects the pages of word `i` of `slot`'s bitmap whose bit is in `mask`; returns
    /// true if a leaf lost W.
    fn rearm(
        &self,
        slot: &Memslot,
        i: usize,
        mask: u64,
        mmu: &crate::sync::witness::MmuWrite,
    ) -> bool {
        if mask == 0 {
            return false;
        }
        let base = slot.base_gfn().raw() + i as u64 * BITS;
        let first = base + u64::from(mask.trailing_zeros());
        let last = base + u64::from(BITS as u32 - mask.leading_zeros());
        let Some(range) = crate::addr::GfnRange::new(Gfn::new(first), Gfn::new(last)) else {
            return false;
        };
        if self.dirty_tracking() == DirtyTracking::DBit {
            return self.mmu.clear_dirty_gfns(
                slot.as_id(),
                slot.rmaps(),
                range,
                |g| mask & (1 << (g.raw() - base)) != 0,
                &mut |_| {},
                mmu,
            );
        }
        self.mmu.write_protect_gfns(
            slot.as_id(),
            slot.rmaps(),
            range,
            |g| mask & (1 << (g.raw() - base)) != 0,
            mmu,
        )
    }

    /// The remote TLB flush that ends a re-arm (D1): without it a vCPU could keep writing through
    /// a TLB entry cached while the page was writable, and the write would never be logged.
    /// Flushes whenever a page was re-armed, as the kernel does (a TLB entry may outlive an SPTE
    /// the fast path made writable and this harvest write-protected again).
    pub(super) fn flush_after_rearm(&self, rearmed: bool) {
        #[cfg(not(feature = "broken-rearm-no-flush"))]
        if rearmed {
            use crate::mmu::RemoteTlbFlush;
            self.flush_remote_tlbs();
        }
        #[cfg(feature = "broken-rearm-no-flush")]
        let _ = rearmed;
    }

    /// Gives `new` its dirty bitmap as `kvm_prepare_memory_region` does: none without
    /// `LOG_DIRTY_PAGES`; the old slot's if it logged already; else a fresh one (all set with
    /// manual protect and `INITIALLY_SET`). Caller holds `slots_lock`.
    pub(crate) fn attach_dirty_bitmap(&self, old: Option<&Memslot>, new: &mut Memslot) {
        if !new.flags().contains(MemFlags::LOG_DIRTY_PAGES) || self.dirty_ring_enabled() {
            new.set_dirty_bitmap(None);
            return;
        }
        if let Some(bm) = old.and_then(Memslot::dirty_bitmap_arc) {
            new.set_dirty_bitmap(Some(bm));
            return;
        }
        let initially_set = self.dirty_log_protect()
            == DirtyLogProtect::Manual {
                initially_set: true,
            };
        new.set_dirty_bitmap(Some(Arc::new(DirtyBitmap::new(
            new.npages(),
            initially_set,
        ))));
    }

    /// `kvm_mmu_slot_apply_flags` after a flags-only change was published: when logging starts,
    /// split the slot's huge leaves to 4K (eager page splitting, `VmConfig::eager_page_split`:
    /// TDP in place under `mmu_lock` read; the shadow MMU drops its huge leaves under write,
    /// always, since its 4K-only re-arm would miss a huge leaf), then write-protect the whole slot
    /// and flush (unless `INITIALLY_SET`, where the user's clears re-arm). With eager splitting
    /// off, a TDP huge leaf is write-protected whole and split by the first write's fault. When
    /// logging stops, huge leaves are recovered where the host and the slot allow them
    /// (`kvm_mmu_recover_huge_pages`); writable 4K leaves come back lazily through the fast page
    /// fault. Caller holds `slots_lock`.
    pub(crate) fn dirty_log_flags_changed(&self, old: &Memslot, new: &Memslot) {
        let was = old.flags().contains(MemFlags::LOG_DIRTY_PAGES);
        let is = new.flags().contains(MemFlags::LOG_DIRTY_PAGES);
        if was && !is {
            self.recover_huge_pages(new.as_id(), new.gfn_range());
            return;
        }
        if was || !is {
            return;
        }
        if self.config.eager_page_split || self.mmu.kind() == crate::config::MmuKind::Shadow {
            self.mmu.split_huge_pages(
                &self.mmu_lock,
                new.as_id(),
                new.rmaps(),
                new.gfn_range(),
                crate::addr::Level::L4K,
                self,
            );
        }
        if self.dirty_log_protect()
            == (DirtyLogProtect::Manual {
                initially_set: true,
            })
        {
            return;
        }
        let flush = {
            let mmu = self.mmu_lock.write();
            if self.dirty_tracking() == DirtyTracking::DBit {
                self.mmu.clear_dirty_gfns(
                    new.as_id(),
                    new.rmaps(),
                    new.gfn_range(),
                    |_| true,
                    &mut |_| {},
                    mmu.witness(),
                )
            } else {
                self.mmu.write_protect_gfns(
                    new.as_id(),
                    new.rmaps(),
                    new.gfn_range(),
                    |_| true,
                    mmu.witness(),
                )
            }
        };
        self.flush_after_rearm(flush);
    }
}

/// Marks `gfn` dirty in `slot` if it logs (`mark_page_dirty_in_slot`): in its bitmap, or, with
/// the dirty ring, in the faulting vCPU's `ring`.
#[inline]
pub(crate) fn mark_page_dirty(
    slot: &Memslot,
    gfn: Gfn,
    ring: Option<&crate::vm::dirty_ring::DirtyRing>,
) {
    let offset = gfn.raw() - slot.base_gfn().raw();
    if let Some(bm) = slot.dirty_bitmap() {
        bm.mark(offset);
    } else if let Some(ring) = ring
        && slot.flags().contains(MemFlags::LOG_DIRTY_PAGES)
    {
        let tag = (u64::from(slot.as_id().index() as u16) << 16) | u64::from(slot.id().get());
        ring.push(tag, offset);
    }
}
