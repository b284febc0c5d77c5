//! Nested virtualization from L1's side: [`NestedGuest`], the small hypervisor an L1 program uses
//! to build EPT12 tables for an L2 guest in its own memory, and the vCPU's L2 mode.
//!
//! Every table write is an ordinary L1 vCPU write ([`Vcpu::write_u64`]), so once KVM shadows a
//! table (and write-protects it) the write faults and is emulated, exactly as on hardware. The
//! builder keeps its own model of what it mapped, so that misuse (unaligned, overlapping, out of
//! range, a mapping over its own table pool) is refused with a typed [`NestedError`] before any
//! entry is written. A failed vCPU write (a host fault) is reported as [`NestedError::Vcpu`];
//! the entries written before it stay written, as a real L1 that faulted mid-way leaves them.
//!
//! The EPT12 format is documented in `mmu/shadow/nested/ept12.rs` ([`Ept12Entry`]).

use std::collections::{BTreeMap, HashMap};

use super::{Vcpu, VcpuExit};
use crate::addr::{Gfn, Gpa, PAGE_SIZE};
use crate::mmu::shadow::nested::ept12::{
    EPT12_ENTRIES, EPT12_L2_LIMIT, EPT12_LEVELS, Ept12Entry, EptPerms, ept12_index,
};
use crate::mmu::{FaultOutcome, MmuRoot, RetryReason};
use crate::sync::Arc;
use crate::vm::VmInner;

/// Why the L1 builder API refused a request (nothing was written), or why it stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NestedError {
    /// An address or length is not a multiple of 4 KiB.
    #[error("{what} {value:#x} is not 4 KiB aligned")]
    Unaligned {
        /// Which argument.
        what: &'static str,
        /// Its value.
        value: u64,
    },
    /// A zero-length range.
    #[error("empty range")]
    EmptyRange,
    /// The L2 range runs past the 48 bits EPT12 translates.
    #[error("L2 range at {l2} ({len:#x} bytes) is beyond the 48-bit L2 address space")]
    L2OutOfRange {
        /// Start of the range.
        l2: Gpa,
        /// Length in bytes.
        len: u64,
    },
    /// Part of the L1 range is not covered by L1 memslots.
    #[error("L1 range at {l1} ({len:#x} bytes) is not all L1 memory")]
    NotL1Memory {
        /// Start of the range.
        l1: Gpa,
        /// Length in bytes.
        len: u64,
    },
    /// Part of the L2 range is already mapped.
    #[error("L2 gpa {l2} is already mapped")]
    Overlap {
        /// The first mapped page found.
        l2: Gpa,
    },
    /// Part of the L2 range is not mapped.
    #[error("L2 gpa {l2} is not mapped")]
    NotMapped {
        /// The first unmapped page found.
        l2: Gpa,
    },
    /// The permissions are not present (none) or not valid (write without read).
    #[error("permissions {0:?} are not a valid present mapping")]
    BadPerms(EptPerms),
    /// The L1 range overlaps the table pool (L1 would map its own EPT12 tables into L2).
    #[error("L1 range overlaps the EPT12 table pool")]
    MapsTablePool,
    /// The table pool has too few free pages for the tables this mapping needs.
    #[error("the EPT12 table pool needs {needed} more pages, {free} are free")]
    PoolExhausted {
        /// Tables the request needs.
        needed: u64,
        /// Pages left in the pool.
        free: u64,
    },
    /// The vCPU belongs to another VM than the guest's.
    #[error("the vCPU belongs to another VM")]
    ForeignVcpu,
    /// The builder needs an L1 vCPU, and this one runs in L2 mode.
    #[error("the vCPU is in L2 mode; the builder writes EPT12 as L1")]
    VcpuInL2,
    /// Nested guests are not enabled on this TDP-MMU VM (`Vm::enable_nested`).
    #[error("nested guests are not enabled on this VM (Vm::enable_nested)")]
    NestedNotEnabled,
    /// An L1 write to a table failed (the entries written before it stay written).
    #[error("L1 write failed: {0}")]
    Vcpu(#[from] VcpuExit),
}

/// An L1 hypervisor's EPT12 for one L2 guest: tables in L1 memory (a pool the caller lends), a
/// model of what is mapped, and the EPT pointer a vCPU runs L2 with ([`Vcpu::enter_l2`]).
pub struct NestedGuest {
    vm: Arc<VmInner>,
    eptp: Gpa,
    pool_start: u64,
    pool_pages: u64,
    pool_used: u64,
    /// (level, l2 gfn >> (9 * level)) → L1 gfn of the table of that level (levels 1..=3; the root
    /// is `eptp`).
    tables: HashMap<(u8, u64), u64>,
    /// L2 gfn → (L1 gfn, permissions).
    leaves: BTreeMap<u64, (u64, EptPerms)>,
}

impl core::fmt::Debug for NestedGuest {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("NestedGuest")
            .field("eptp", &self.eptp)
            .field("tables", &(self.pool_used))
            .field("mapped_pages", &self.leaves.len())
            .finish_non_exhaustive()
    }
}

fn aligned(what: &'static str, value: u64) -> Result<(), NestedError> {
    if value.is_multiple_of(PAGE_SIZE) {
        Ok(())
    } else {
        Err(NestedError::Unaligned { what, value })
    }
}

impl NestedGuest {
    /// Creates the EPT12 of a new L2 guest, whose tables live in `[pool, pool + pool_len)` of L1
    /// memory; the first pool page becomes the root (written zero by `vcpu`, an L1 vCPU).
    ///
    /// Errors: [`NestedError::Unaligned`], [`NestedError::EmptyRange`], [`NestedError::NotL1Memory`]
    /// for a bad pool, [`NestedError::VcpuInL2`], and [`NestedError::Vcpu`] if zeroing the root
    /// faulted.
    pub fn new(vcpu: &mut Vcpu, pool: Gpa, pool_len: u64) -> Result<NestedGuest, NestedError> {
        aligned("pool", pool.raw())?;
        aligned("pool length", pool_len)?;
        if pool_len == 0 {
            return Err(NestedError::EmptyRange);
        }
        if vcpu.in_l2() {
            return Err(NestedError::VcpuInL2);
        }
        if !vcpu.vm.nested_enabled() {
            return Err(NestedError::NestedNotEnabled);
        }
        let start = pool.gfn().raw();
        let pages = pool_len / PAGE_SIZE;
        if !vcpu.vm.l1_covers(start, pages) {
            return Err(NestedError::NotL1Memory {
                l1: pool,
                len: pool_len,
            });
        }
        let g = NestedGuest {
            vm: Arc::clone(&vcpu.vm),
            eptp: pool,
            pool_start: start,
            pool_pages: pages,
            pool_used: 1,
            tables: HashMap::new(),
            leaves: BTreeMap::new(),
        };
        g.zero_table(vcpu, start)?;
        Ok(g)
    }

    /// The EPT pointer: the L1 address of the root table.
    pub fn eptp(&self) -> Gpa {
        self.eptp
    }

    /// Pages mapped now.
    pub fn mapped_pages(&self) -> u64 {
        self.leaves.len() as u64
    }

    /// Table pages taken from the pool (the root included).
    pub fn table_pages(&self) -> u64 {
        self.pool_used
    }

    /// The L1 gfns of the table pool.
    pub fn pool(&self) -> (Gfn, u64) {
        (Gfn::new(self.pool_start), self.pool_pages)
    }

    /// The L1 page and permissions `l2` maps to in the builder's model.
    pub fn translate(&self, l2: Gpa) -> Option<(Gpa, EptPerms)> {
        let (l1, p) = *self.leaves.get(&l2.gfn().raw())?;
        Gfn::new(l1).gpa().map(|a| (a, p))
    }

    /// The L1 address of the EPT12 entry of `level` (1 = leaf .. 4 = root) that translates `l2`,
    /// if its table exists: where an L1 program (or a test) writes to change that entry directly.
    pub fn entry_gpa(&self, l2: Gpa, level: u8) -> Option<Gpa> {
        if !(1..=EPT12_LEVELS).contains(&level) || l2.raw() >= EPT12_L2_LIMIT {
            return None;
        }
        let g = l2.gfn().raw();
        let table = if level == EPT12_LEVELS {
            self.pool_start
        } else {
            *self.tables.get(&(level, g >> (9 * u32::from(level))))?
        };
        Gpa::new(table << 12).checked_add(8 * ept12_index(g, level) as u64)
    }

    fn check_vcpu(&self, vcpu: &Vcpu) -> Result<(), NestedError> {
        if !Arc::ptr_eq(&self.vm, &vcpu.vm) {
            return Err(NestedError::ForeignVcpu);
        }
        if vcpu.in_l2() {
            return Err(NestedError::VcpuInL2);
        }
        Ok(())
    }

    /// Checks an L2 range; returns its first gfn and page count.
    fn l2_range(l2: Gpa, len: u64) -> Result<(u64, u64), NestedError> {
        aligned("L2 address", l2.raw())?;
        aligned("length", len)?;
        if len == 0 {
            return Err(NestedError::EmptyRange);
        }
        if l2.raw().checked_add(len).is_none_or(|e| e > EPT12_L2_LIMIT) {
            return Err(NestedError::L2OutOfRange { l2, len });
        }
        Ok((l2.gfn().raw(), len / PAGE_SIZE))
    }

    fn check_perms(perms: EptPerms) -> Result<(), NestedError> {
        if perms.is_none() || !perms.is_valid() {
            return Err(NestedError::BadPerms(perms));
        }
        Ok(())
    }

    fn l2_gpa(gfn: u64) -> Gpa {
        Gpa::new(gfn << 12)
    }

    /// Maps `[l2, l2 + len)` to `[l1, l1 + len)` with `perms`, allocating tables from the pool.
    ///
    /// Errors (nothing written): [`NestedError::Unaligned`], [`NestedError::EmptyRange`],
    /// [`NestedError::L2OutOfRange`], [`NestedError::NotL1Memory`], [`NestedError::MapsTablePool`],
    /// [`NestedError::Overlap`], [`NestedError::BadPerms`], [`NestedError::PoolExhausted`],
    /// [`NestedError::ForeignVcpu`], [`NestedError::VcpuInL2`]. [`NestedError::Vcpu`] if a
    /// table write faulted (the earlier writes stay).
    pub fn map(
        &mut self,
        vcpu: &mut Vcpu,
        l2: Gpa,
        l1: Gpa,
        len: u64,
        perms: EptPerms,
    ) -> Result<(), NestedError> {
        self.check_vcpu(vcpu)?;
        let (g2, pages) = Self::l2_range(l2, len)?;
        aligned("L1 address", l1.raw())?;
        Self::check_perms(perms)?;
        let g1 = l1.gfn().raw();
        if g1.checked_add(pages).is_none() || !self.vm.l1_covers(g1, pages) {
            return Err(NestedError::NotL1Memory { l1, len });
        }
        if g1 < self.pool_start + self.pool_pages && self.pool_start < g1 + pages {
            return Err(NestedError::MapsTablePool);
        }
        if let Some((&first, _)) = self.leaves.range(g2..g2 + pages).next() {
            return Err(NestedError::Overlap {
                l2: Self::l2_gpa(first),
            });
        }
        let needed = self.tables_needed(g2, pages);
        let free = self.pool_pages - self.pool_used;
        if needed > free {
            return Err(NestedError::PoolExhausted { needed, free });
        }
        for i in 0..pages {
            let g = g2 + i;
            let leaf_table = self.ensure_tables(vcpu, g)?;
            let entry = Ept12Entry::new(g1 + i, perms);
            vcpu.write_u64(Self::entry_in(leaf_table, g, 1), entry.raw())?;
            self.leaves.insert(g, (g1 + i, perms));
        }
        Ok(())
    }

    /// Unmaps `[l2, l2 + len)` (every page must be mapped). Tables stay.
    ///
    /// Errors (nothing written): as [`NestedGuest::map`]'s range checks, and
    /// [`NestedError::NotMapped`]; [`NestedError::Vcpu`] if a table write faulted.
    pub fn unmap(&mut self, vcpu: &mut Vcpu, l2: Gpa, len: u64) -> Result<(), NestedError> {
        self.check_vcpu(vcpu)?;
        let (g2, pages) = Self::l2_range(l2, len)?;
        self.all_mapped(g2, pages)?;
        for g in g2..g2 + pages {
            let table = self.leaf_table(g);
            vcpu.write_u64(Self::entry_in(table, g, 1), Ept12Entry::NOT_PRESENT.raw())?;
            self.leaves.remove(&g);
        }
        Ok(())
    }

    /// Changes the permissions of `[l2, l2 + len)` (every page must be mapped); the L1 frames
    /// stay, A and D are cleared.
    ///
    /// Errors (nothing written): as [`NestedGuest::unmap`], and [`NestedError::BadPerms`].
    pub fn protect(
        &mut self,
        vcpu: &mut Vcpu,
        l2: Gpa,
        len: u64,
        perms: EptPerms,
    ) -> Result<(), NestedError> {
        self.check_vcpu(vcpu)?;
        let (g2, pages) = Self::l2_range(l2, len)?;
        Self::check_perms(perms)?;
        self.all_mapped(g2, pages)?;
        for g in g2..g2 + pages {
            let table = self.leaf_table(g);
            let (l1, _) = self.leaves[&g];
            vcpu.write_u64(
                Self::entry_in(table, g, 1),
                Ept12Entry::new(l1, perms).raw(),
            )?;
            self.leaves.insert(g, (l1, perms));
        }
        Ok(())
    }

    /// Remaps `[l2, l2 + len)` (every page mapped) to `[l1, l1 + len)` keeping each page's
    /// permissions: unmap and map in one table write per page.
    ///
    /// Errors (nothing written): as [`NestedGuest::map`] except `Overlap`, and
    /// [`NestedError::NotMapped`].
    pub fn remap(
        &mut self,
        vcpu: &mut Vcpu,
        l2: Gpa,
        l1: Gpa,
        len: u64,
    ) -> Result<(), NestedError> {
        self.check_vcpu(vcpu)?;
        let (g2, pages) = Self::l2_range(l2, len)?;
        aligned("L1 address", l1.raw())?;
        let g1 = l1.gfn().raw();
        if g1.checked_add(pages).is_none() || !self.vm.l1_covers(g1, pages) {
            return Err(NestedError::NotL1Memory { l1, len });
        }
        if g1 < self.pool_start + self.pool_pages && self.pool_start < g1 + pages {
            return Err(NestedError::MapsTablePool);
        }
        self.all_mapped(g2, pages)?;
        for i in 0..pages {
            let g = g2 + i;
            let table = self.leaf_table(g);
            let (_, perms) = self.leaves[&g];
            vcpu.write_u64(
                Self::entry_in(table, g, 1),
                Ept12Entry::new(g1 + i, perms).raw(),
            )?;
            self.leaves.insert(g, (g1 + i, perms));
        }
        Ok(())
    }

    /// INVEPT (single context): L1 tells the CPU that EPT12 changed. Every vCPU's cached
    /// translations are flushed (KVM keeps the shadow EPT02 in sync by write tracking, so only
    /// the TLBs can hold older translations).
    ///
    /// Errors: [`NestedError::ForeignVcpu`], [`NestedError::VcpuInL2`], and
    /// [`NestedError::Vcpu`] with [`VcpuExit::InGuestMode`] from a thread holding a vCPU in guest
    /// mode (nothing done).
    pub fn invept(&self, vcpu: &mut Vcpu) -> Result<(), NestedError> {
        self.check_vcpu(vcpu)?;
        // The flush waits for every vCPU in guest mode: refuse a caller that is one.
        crate::sync::guest_mode::check("INVEPT").map_err(VcpuExit::from)?;
        self.vm.nested_invept();
        Ok(())
    }

    fn all_mapped(&self, g2: u64, pages: u64) -> Result<(), NestedError> {
        if self.leaves.range(g2..g2 + pages).count() as u64 == pages {
            return Ok(());
        }
        let missing = (g2..g2 + pages)
            .find(|g| !self.leaves.contains_key(g))
            .unwrap_or(g2);
        Err(NestedError::NotMapped {
            l2: Self::l2_gpa(missing),
        })
    }

    /// Tables (levels 1..=3) that mapping `pages` pages from `g2` would allocate.
    fn tables_needed(&self, g2: u64, pages: u64) -> u64 {
        let mut n = 0;
        for level in 1..EPT12_LEVELS {
            let shift = 9 * u32::from(level);
            let (first, last) = (g2 >> shift, (g2 + pages - 1) >> shift);
            n += (first..=last)
                .filter(|p| !self.tables.contains_key(&(level, *p)))
                .count() as u64;
        }
        n
    }

    fn leaf_table(&self, g: u64) -> u64 {
        self.tables[&(1, g >> 9)]
    }

    fn entry_in(table: u64, g: u64, level: u8) -> Gpa {
        Gpa::new((table << 12) + 8 * ept12_index(g, level) as u64)
    }

    /// The level-1 table for `g`, creating the missing tables above it (each zeroed before the
    /// entry linking it is written, so L2 never walks into garbage).
    fn ensure_tables(&mut self, vcpu: &mut Vcpu, g: u64) -> Result<u64, NestedError> {
        let mut table = self.pool_start;
        for level in (1..EPT12_LEVELS).rev() {
            let key = (level, g >> (9 * u32::from(level)));
            table = match self.tables.get(&key) {
                Some(&t) => t,
                None => {
                    let t = self.pool_start + self.pool_used;
                    self.zero_table(vcpu, t)?;
                    self.pool_used += 1;
                    let link = Ept12Entry::new(t, EptPerms::RWX);
                    vcpu.write_u64(Self::entry_in(table, g, level + 1), link.raw())?;
                    self.tables.insert(key, t);
                    t
                }
            };
        }
        Ok(table)
    }

    fn zero_table(&self, vcpu: &mut Vcpu, table: u64) -> Result<(), NestedError> {
        let mut guest = vcpu.try_enter()?;
        for i in 0..EPT12_ENTRIES as u64 {
            guest.write_u64(Gpa::new((table << 12) + 8 * i), 0)?;
        }
        Ok(())
    }
}

/// The L2 context of a vCPU in L2 mode: the EPT pointer it translates through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct L2Context {
    /// L1 address of the EPT12 root.
    pub(crate) eptp: Gpa,
}

impl Vcpu {
    /// Enters L2 mode (VM entry to L2 with `guest`'s EPT pointer): from now on every access is an
    /// L2 guest-physical address translated through EPT12, then L1's memslots. The vCPU drops
    /// its root and TLB.
    ///
    /// Errors: [`NestedError::ForeignVcpu`].
    pub fn enter_l2(&mut self, guest: &NestedGuest) -> Result<(), NestedError> {
        if !Arc::ptr_eq(&guest.vm, &self.vm) {
            return Err(NestedError::ForeignVcpu);
        }
        self.l2 = Some(L2Context { eptp: guest.eptp });
        self.root = None;
        self.tlb.flush_all();
        Ok(())
    }

    /// Leaves L2 mode (a VM exit to L1): accesses are L1 addresses again.
    pub fn leave_l2(&mut self) {
        if self.l2.take().is_some() {
            self.root = None;
            self.tlb.flush_all();
        }
    }

    /// True in L2 mode.
    pub fn in_l2(&self) -> bool {
        self.l2.is_some()
    }
}

/// What a vCPU's fault came to.
pub(super) enum FaultResult {
    /// The fault handler's outcome; the access is re-executed.
    Outcome(FaultOutcome),
    /// An L1 write to a write-tracked table was emulated (nested N2): the access is done and this
    /// is the word's new value.
    Emulated(u64),
}

impl Vcpu {
    /// Runs the fault for an access to `gpa` that missed: the L2 fault in L2 mode, the emulation
    /// of an L1 write to a write-tracked table, or the ordinary fault. `fetch`: an instruction
    /// fetch (NX huge pages; L1 only: EPT02 leaves are built executable, EPT12's X permission is
    /// not enforced on L2 fetches). `fill`: as [`VmInner::page_fault`](crate::vm::VmInner)'s
    /// (the ordinary fault only).
    pub(super) fn handle_fault(
        &self,
        root: &MmuRoot,
        gpa: Gpa,
        write: Option<u64>,
        mask: u64,
        fetch: bool,
        fill: &mut Option<crate::vm::FaultFill>,
    ) -> Result<FaultResult, VcpuExit> {
        let ring = self.dirty_ring.as_deref();
        if let Some(l2) = self.l2 {
            return self
                .vm
                .l2_page_fault(root, l2.eptp, gpa, write.is_some(), ring)
                .map(FaultResult::Outcome);
        }
        let g = gpa.gfn().raw();
        if let Some(value) = write
            && self.as_id.index() == 0
            && self.vm.mmu.write_tracked_in(g, g + 1)
        {
            return Ok(
                match self.vm.emulate_tracked_write(gpa, value, mask, ring)? {
                    Some(new) => FaultResult::Emulated(new),
                    None => FaultResult::Outcome(FaultOutcome::Retry(RetryReason::Invalidation)),
                },
            );
        }
        self.vm
            .page_fault(root, gpa, write.is_some(), fetch, ring, fill)
            .map(FaultResult::Outcome)
    }

    /// `kvm_mmu_load` for the vCPU's mode: the EPT02 root in L2 mode, the address space's root
    /// otherwise.
    pub(super) fn load_root_for_mode(&self) -> Option<MmuRoot> {
        match self.l2 {
            Some(l2) => self.vm.load_nested_root(l2.eptp),
            None => self.vm.load_root(self.as_id),
        }
    }
}
