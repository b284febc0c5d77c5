//! VM configuration: the kernel's Kconfig options and module parameters, as values.

use crate::addr::AsId;
pub use crate::mmu::spte::AdBits;

/// Which MMU builds the guest's stage-2 translations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum MmuKind {
    /// The TDP MMU (`tdp_mmu=Y`): faults run under `mmu_lock` read with atomic SPTE updates.
    #[default]
    Tdp,
    /// The shadow MMU (`tdp_mmu=N`): shadow pages and reverse maps under `mmu_lock` write.
    Shadow,
}

/// How the aging notifiers (`clear_young`, `clear_flush_young`, `test_young`) reach the SPTEs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum AgingMode {
    /// `CONFIG_KVM_MMU_LOCKLESS_AGING`: no `mmu_lock`; SRCU for memslots, RCU for page tables.
    #[default]
    Lockless,
    /// The pre-series baseline: every aging call takes `mmu_lock` for write.
    Locked,
}

/// Configuration of one VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// Which MMU the VM uses.
    pub mmu: MmuKind,
    /// Lockless or locked aging.
    pub aging: AgingMode,
    /// Whether leaves use hardware Accessed/Dirty bits (`ept_ad` / `kvm_ad_enabled`). With
    /// [`AdBits::Disabled`] aging marks leaves for access tracking, the next access faults and
    /// is fixed by the fast page fault, and dirty logging must write-protect
    /// ([`crate::DirtyTracking::DBit`] is refused).
    pub ad_bits: AdBits,
    /// Split huge leaves when dirty logging is enabled on a memslot
    /// (`eager_page_split`, on by default as in KVM); off, they are split on the first write.
    pub eager_page_split: bool,
    /// `CONFIG_KVM_ELIDE_TLB_FLUSH_IF_YOUNG`: `clear_flush_young` does not flush TLBs (x86 since 6.13).
    pub elide_tlb_flush_if_young: bool,
    /// Entries in each vCPU's software TLB.
    pub tlb_entries: usize,
    /// Number of address spaces (1, or 2 with SMM).
    pub address_spaces: usize,
    /// The NX huge pages mitigation (KVM's `nx_huge_pages`): huge leaves are not executable, an
    /// instruction fetch maps its page with a 4K leaf (counted in `VmStats::nx_lpage_splits`).
    pub nx_huge_pages: bool,
    /// `nx_huge_pages_recovery_ratio`: each recovery round zaps `ceil(splits / ratio)` of the
    /// NX splits; 0 disables recovery.
    pub nx_huge_pages_recovery_ratio: u32,
    /// `nx_huge_pages_recovery_period_ms`: the background worker's period; 0 means one hour
    /// divided by the ratio, as in KVM.
    pub nx_huge_pages_recovery_period_ms: u64,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            mmu: MmuKind::Tdp,
            aging: AgingMode::Lockless,
            ad_bits: AdBits::Enabled,
            eager_page_split: true,
            elide_tlb_flush_if_young: true,
            tlb_entries: 2048,
            address_spaces: 1,
            nx_huge_pages: false,
            nx_huge_pages_recovery_ratio: 60,
            nx_huge_pages_recovery_period_ms: 0,
        }
    }
}

/// Why a [`VmConfig`] was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// `address_spaces` must be 1 or 2.
    #[error("address_spaces must be between 1 and {max}, got {got}")]
    AddressSpaces {
        /// What was asked for.
        got: usize,
        /// The largest supported value.
        max: usize,
    },
    /// The TLB needs at least one entry and at most 2^20.
    #[error("tlb_entries must be between 1 and 1048576, got {0}")]
    TlbEntries(usize),
}

impl VmConfig {
    /// Checks the configuration, returning the first problem found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.address_spaces == 0 || self.address_spaces > AsId::MAX_ADDRESS_SPACES {
            return Err(ConfigError::AddressSpaces {
                got: self.address_spaces,
                max: AsId::MAX_ADDRESS_SPACES,
            });
        }
        if self.tlb_entries == 0 || self.tlb_entries > 1 << 20 {
            return Err(ConfigError::TlbEntries(self.tlb_entries));
        }
        Ok(())
    }
}
