//! EPT12: the format of the extended page tables an L1 hypervisor builds for its L2 guest, in L1
//! memory. It is EPT-like and deliberately small:
//!
//! | bits   | meaning                                                                        |
//! |--------|--------------------------------------------------------------------------------|
//! | 0–2    | R, W, X. An entry with none of them is not present; W without R is a misconfig |
//! | 3–7    | reserved (memory type, ignore-PAT and PS in real EPT: EPT12 has no huge leaves) |
//! | 8      | Accessed: set by the walker on every entry it uses                              |
//! | 9      | Dirty: set by the walker on a leaf it writes through                            |
//! | 10–11  | ignored (free for L1's own use)                                                 |
//! | 12–51  | the L1 frame: of the next table (levels 4–2) or of the mapped page (level 1)    |
//! | 52–63  | reserved                                                                        |
//!
//! Four levels of 512 entries translate a 48-bit L2 guest-physical address; the EPT pointer is
//! the L1 address of the level-4 table. Permissions are the AND of every level's R/W/X, as in
//! EPT. A present entry with a reserved bit set, or with W but not R, is an EPT misconfiguration
//! (exit to L1); a walk that meets a not-present entry or lacks a permission is an EPT violation.

use core::fmt;

/// Entries per EPT12 table.
pub const EPT12_ENTRIES: usize = 512;
/// Levels of EPT12 (level 4 is the root, level 1 holds leaves).
pub const EPT12_LEVELS: u8 = 4;
/// L2 guest-physical addresses EPT12 translates: `[0, 2^48)`.
pub const EPT12_L2_LIMIT: u64 = 1 << 48;

const READ: u64 = 1 << 0;
const WRITE: u64 = 1 << 1;
const EXEC: u64 = 1 << 2;
const PERM_MASK: u64 = READ | WRITE | EXEC;
/// The Accessed bit.
pub const EPT12_ACCESSED: u64 = 1 << 8;
/// The Dirty bit.
pub const EPT12_DIRTY: u64 = 1 << 9;
/// The L1 frame field (bits 12–51).
pub const EPT12_ADDR_MASK: u64 = ((1 << 52) - 1) & !((1 << 12) - 1);
/// Bits that must be zero in a present entry.
pub const EPT12_RESERVED_MASK: u64 = (0b1_1111 << 3) | !((1 << 52) - 1);

/// R/W/X permissions of an EPT12 entry (bits 0–2).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct EptPerms(u8);

impl EptPerms {
    /// No access (the entry is not present).
    pub const NONE: EptPerms = EptPerms(0);
    /// Read only.
    pub const R: EptPerms = EptPerms(READ as u8);
    /// Read and write.
    pub const RW: EptPerms = EptPerms((READ | WRITE) as u8);
    /// Read and execute.
    pub const RX: EptPerms = EptPerms((READ | EXEC) as u8);
    /// Read, write and execute.
    pub const RWX: EptPerms = EptPerms(PERM_MASK as u8);
    /// Execute only (allowed, as with EPT's execute-only support).
    pub const X: EptPerms = EptPerms(EXEC as u8);

    /// Permissions from bits 0–2 of `bits` (the rest is ignored).
    pub const fn from_bits_truncate(bits: u64) -> EptPerms {
        EptPerms((bits & PERM_MASK) as u8)
    }
    /// The permission bits.
    pub const fn bits(self) -> u64 {
        self.0 as u64
    }
    /// Readable.
    pub const fn read(self) -> bool {
        self.0 as u64 & READ != 0
    }
    /// Writable.
    pub const fn write(self) -> bool {
        self.0 as u64 & WRITE != 0
    }
    /// Executable.
    pub const fn exec(self) -> bool {
        self.0 as u64 & EXEC != 0
    }
    /// No permission at all: such an entry is not present.
    pub const fn is_none(self) -> bool {
        self.0 == 0
    }
    /// A combination EPT12 accepts in a present entry: not W without R.
    pub const fn is_valid(self) -> bool {
        !self.write() || self.read()
    }
    /// The permissions both grant (a walk ANDs the levels).
    pub const fn and(self, other: EptPerms) -> EptPerms {
        EptPerms(self.0 & other.0)
    }
    /// True if these permissions allow an access (a read, or a write when `write`).
    pub const fn allows(self, write: bool) -> bool {
        if write { self.write() } else { self.read() }
    }
}

impl fmt::Debug for EptPerms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = |on: bool, ch: char| if on { ch } else { '-' };
        write!(
            f,
            "{}{}{}",
            c(self.read(), 'r'),
            c(self.write(), 'w'),
            c(self.exec(), 'x')
        )
    }
}

/// Why a present EPT12 entry is malformed (an EPT misconfiguration).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MisconfigReason {
    /// A reserved bit (3–7 or 52–63) is set; the value holds the offending bits.
    #[error("reserved bits {0:#x} set")]
    ReservedBits(u64),
    /// W without R.
    #[error("write permission without read")]
    WriteWithoutRead,
    /// A table pointer (levels 4–2) names an L1 frame that no L1 memslot covers.
    #[error("table pointer outside L1 memory")]
    TableOutsideL1Memory,
}

/// One EPT12 entry, as L1 wrote it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Ept12Entry(u64);

impl Ept12Entry {
    /// The not-present entry.
    pub const NOT_PRESENT: Ept12Entry = Ept12Entry(0);

    /// An entry from its raw value.
    pub const fn from_raw(raw: u64) -> Ept12Entry {
        Ept12Entry(raw)
    }
    /// A present entry pointing at L1 frame `l1_gfn` with `perms` (A and D clear). `l1_gfn` must
    /// fit the 40-bit frame field; higher bits are dropped.
    pub const fn new(l1_gfn: u64, perms: EptPerms) -> Ept12Entry {
        Ept12Entry(((l1_gfn << 12) & EPT12_ADDR_MASK) | perms.bits())
    }
    /// The raw value.
    pub const fn raw(self) -> u64 {
        self.0
    }
    /// The entry's R/W/X.
    pub const fn perms(self) -> EptPerms {
        EptPerms::from_bits_truncate(self.0)
    }
    /// Present: at least one of R/W/X.
    pub const fn is_present(self) -> bool {
        !self.perms().is_none()
    }
    /// The L1 frame the entry names.
    pub const fn l1_gfn(self) -> u64 {
        (self.0 & EPT12_ADDR_MASK) >> 12
    }
    /// Accessed.
    pub const fn accessed(self) -> bool {
        self.0 & EPT12_ACCESSED != 0
    }
    /// Dirty.
    pub const fn dirty(self) -> bool {
        self.0 & EPT12_DIRTY != 0
    }
    /// The entry with A and D cleared: what a shadow page depends on (the walker sets A/D itself,
    /// so a change of A/D alone never invalidates a shadow entry).
    pub const fn without_ad(self) -> Ept12Entry {
        Ept12Entry(self.0 & !(EPT12_ACCESSED | EPT12_DIRTY))
    }
    /// The entry's own misconfiguration, if any (only meaningful if present). The table-pointer
    /// check needs L1's memslots and is the walker's.
    pub const fn misconfig(self) -> Option<MisconfigReason> {
        let reserved = self.0 & EPT12_RESERVED_MASK;
        if reserved != 0 {
            return Some(MisconfigReason::ReservedBits(reserved));
        }
        if !self.perms().is_valid() {
            return Some(MisconfigReason::WriteWithoutRead);
        }
        None
    }
}

impl fmt::Debug for Ept12Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Ept12Entry({:#x} {:?}{}{})",
            self.l1_gfn(),
            self.perms(),
            if self.accessed() { " A" } else { "" },
            if self.dirty() { " D" } else { "" }
        )
    }
}

/// The index of L2 gfn `l2_gfn` in an EPT12 table of `level` (1..=4).
pub const fn ept12_index(l2_gfn: u64, level: u8) -> usize {
    ((l2_gfn >> (9 * (level as u32 - 1))) & (EPT12_ENTRIES as u64 - 1)) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_round_trips_frame_and_permissions() {
        let e = Ept12Entry::new(0x12345, EptPerms::RW);
        assert_eq!(e.l1_gfn(), 0x12345);
        assert_eq!(e.perms(), EptPerms::RW);
        assert!(e.is_present() && !e.accessed() && !e.dirty());
        assert_eq!(e.misconfig(), None);
        let ad = Ept12Entry::from_raw(e.raw() | EPT12_ACCESSED | EPT12_DIRTY);
        assert_eq!(ad.without_ad(), e);
    }

    #[test]
    fn misconfigurations_are_reserved_bits_and_write_without_read() {
        let w = Ept12Entry::from_raw(WRITE | (5 << 12));
        assert_eq!(w.misconfig(), Some(MisconfigReason::WriteWithoutRead));
        let r = Ept12Entry::from_raw(READ | (1 << 7));
        assert_eq!(r.misconfig(), Some(MisconfigReason::ReservedBits(1 << 7)));
        let hi = Ept12Entry::from_raw(READ | (1 << 60));
        assert_eq!(hi.misconfig(), Some(MisconfigReason::ReservedBits(1 << 60)));
        assert_eq!(
            Ept12Entry::new(1, EptPerms::X).misconfig(),
            None,
            "execute-only is allowed"
        );
    }

    #[test]
    fn index_takes_nine_bits_per_level() {
        let gfn = (3 << 27) | (5 << 18) | (7 << 9) | 11;
        assert_eq!([1, 2, 3, 4].map(|l| ept12_index(gfn, l)), [11, 7, 5, 3]);
    }
}
