//! The software walk of EPT12 (`FNAME(walk_addr)` in `paging_tmpl.h`, EPT flavour): what an L2
//! fault does before any shadow page is touched. It reads L1's tables through [`L1Memory`] (L1's
//! memslots and the host), checks every entry, ANDs the permissions, and sets Accessed on every
//! entry it used (and Dirty on the leaf for a write) as hardware does, with an atomic OR on the
//! L1 word. Bad guest state is never a host error: it becomes an [`EptExit`] for L1.

use crate::addr::Gpa;

use super::ept12::{
    EPT12_ACCESSED, EPT12_DIRTY, EPT12_L2_LIMIT, EPT12_LEVELS, Ept12Entry, EptPerms,
    MisconfigReason, ept12_index,
};

/// Why an EPT violation was raised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ViolationReason {
    /// The entry of `level` is not present.
    #[error("not present at level {level}")]
    NotPresent {
        /// EPT12 level (4 = root .. 1 = leaf).
        level: u8,
    },
    /// The walk's permissions do not allow the access.
    #[error("access not allowed by {allowed:?}")]
    Permission {
        /// What the walk allows.
        allowed: EptPerms,
    },
    /// The L2 address is beyond the 48 bits EPT12 translates.
    #[error("beyond the 48-bit L2 address space")]
    OutOfRange,
}

/// An exit to L1 caused by EPT12: what L1's hypervisor would receive as a VM exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EptExit {
    /// EPT violation: the L2 access is not mapped or not allowed.
    #[error("EPT violation at L2 gpa {l2_gpa} ({}): {reason}", if *write { "write" } else { "read" })]
    Violation {
        /// The faulting L2 address.
        l2_gpa: Gpa,
        /// The access was a write.
        write: bool,
        /// Why.
        reason: ViolationReason,
    },
    /// EPT misconfiguration: an entry L1 wrote is malformed.
    #[error("EPT misconfig at L2 gpa {l2_gpa}, level {level} entry {entry:#x}: {reason}")]
    Misconfig {
        /// The faulting L2 address.
        l2_gpa: Gpa,
        /// The level of the malformed entry.
        level: u8,
        /// Its raw value.
        entry: u64,
        /// What is wrong with it.
        reason: MisconfigReason,
    },
}

/// Why L1 memory could not be read or updated by the walker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L1AccessError {
    /// No valid L1 memslot covers the gfn.
    NotL1Memory,
    /// The access raced with a host change (an invalidation, a slot being deleted): retry the
    /// fault.
    Retry,
    /// The host refused the page (unmapped, or read-only for a write); the fault reports it.
    Host,
}

/// L1 guest memory as the walker sees it (implemented by the VM over L1's memslots and the host).
pub trait L1Memory {
    /// Reads word `index` of L1 page `gfn`.
    fn read(&self, gfn: u64, index: usize) -> Result<u64, L1AccessError>;
    /// ORs `bits` into word `index` of L1 page `gfn` (atomically).
    fn set_bits(&self, gfn: u64, index: usize, bits: u64) -> Result<(), L1AccessError>;
}

/// A completed walk: the tables it went through and the entries it used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestWalk {
    /// L1 gfn of the table of each level: `tables[level - 1]` (so `tables[3]` is the root).
    pub tables: [u64; EPT12_LEVELS as usize],
    /// The entries read, by level (`gptes[level - 1]`), as they were before A/D were set.
    pub gptes: [Ept12Entry; EPT12_LEVELS as usize],
    /// The permissions of the walk (the AND of every level).
    pub perms: EptPerms,
}

impl GuestWalk {
    /// The L1 gfn the leaf maps.
    pub fn l1_gfn(&self) -> u64 {
        self.gptes[0].l1_gfn()
    }
}

/// What the walk ended in, when it did not complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkError {
    /// An exit to L1.
    Exit(EptExit),
    /// L1 memory could not be accessed.
    L1(L1AccessError),
}

/// Walks EPT12 rooted at L1 gfn `root` for L2 gfn `l2_gfn`, for a read or a write. On success the
/// A bits (and D for a write) are set in the entries used. A table pointer whose frame L1 memory
/// does not hold is a misconfiguration.
pub fn walk_ept12(
    mem: &impl L1Memory,
    root: u64,
    l2_gfn: u64,
    write: bool,
) -> Result<GuestWalk, WalkError> {
    let l2_gpa = Gpa::new(l2_gfn << 12);
    if l2_gfn >= EPT12_L2_LIMIT >> 12 {
        return Err(WalkError::Exit(EptExit::Violation {
            l2_gpa,
            write,
            reason: ViolationReason::OutOfRange,
        }));
    }
    let mut walk = GuestWalk {
        tables: [0; EPT12_LEVELS as usize],
        gptes: [Ept12Entry::NOT_PRESENT; EPT12_LEVELS as usize],
        perms: EptPerms::RWX,
    };
    let mut table = root;
    for level in (1..=EPT12_LEVELS).rev() {
        let li = usize::from(level - 1);
        walk.tables[li] = table;
        let entry = match mem.read(table, ept12_index(l2_gfn, level)) {
            Ok(v) => Ept12Entry::from_raw(v),
            // Only the root can be outside L1 memory here: lower tables were checked when the
            // entry pointing at them was read.
            Err(L1AccessError::NotL1Memory) => {
                return Err(WalkError::Exit(EptExit::Misconfig {
                    l2_gpa,
                    level,
                    entry: table << 12,
                    reason: MisconfigReason::TableOutsideL1Memory,
                }));
            }
            Err(e) => return Err(WalkError::L1(e)),
        };
        if !entry.is_present() {
            return Err(WalkError::Exit(EptExit::Violation {
                l2_gpa,
                write,
                reason: ViolationReason::NotPresent { level },
            }));
        }
        if let Some(reason) = entry.misconfig() {
            return Err(WalkError::Exit(EptExit::Misconfig {
                l2_gpa,
                level,
                entry: entry.raw(),
                reason,
            }));
        }
        walk.gptes[li] = entry;
        walk.perms = walk.perms.and(entry.perms());
        table = entry.l1_gfn();
        if level > 1 {
            // The next table must be L1 memory: probe it before following the pointer.
            match mem.read(table, 0) {
                Ok(_) => {}
                Err(L1AccessError::NotL1Memory) => {
                    return Err(WalkError::Exit(EptExit::Misconfig {
                        l2_gpa,
                        level,
                        entry: entry.raw(),
                        reason: MisconfigReason::TableOutsideL1Memory,
                    }));
                }
                Err(e) => return Err(WalkError::L1(e)),
            }
        }
    }
    if !walk.perms.allows(write) {
        return Err(WalkError::Exit(EptExit::Violation {
            l2_gpa,
            write,
            reason: ViolationReason::Permission {
                allowed: walk.perms,
            },
        }));
    }
    // Hardware sets A on every entry used and D on the leaf of a write (atomic ORs on L1 memory;
    // a shadow page never depends on A/D, see `Ept12Entry::without_ad`).
    for level in (1..=EPT12_LEVELS).rev() {
        let li = usize::from(level - 1);
        let mut bits = EPT12_ACCESSED;
        if level == 1 && write {
            bits |= EPT12_DIRTY;
        }
        if walk.gptes[li].raw() & bits != bits {
            mem.set_bits(walk.tables[li], ept12_index(l2_gfn, level), bits)
                .map_err(WalkError::L1)?;
        }
    }
    Ok(walk)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// L1 memory as a map of pages; pages listed in `mem` exist.
    struct Mem(Mutex<HashMap<u64, [u64; 512]>>);
    impl L1Memory for Mem {
        fn read(&self, gfn: u64, i: usize) -> Result<u64, L1AccessError> {
            let m = self.0.lock().unwrap();
            m.get(&gfn).map(|p| p[i]).ok_or(L1AccessError::NotL1Memory)
        }
        fn set_bits(&self, gfn: u64, i: usize, bits: u64) -> Result<(), L1AccessError> {
            let mut m = self.0.lock().unwrap();
            let p = m.get_mut(&gfn).ok_or(L1AccessError::NotL1Memory)?;
            p[i] |= bits;
            Ok(())
        }
    }

    /// Tables at L1 gfns 10 (root), 11, 12, 13; L2 gfn 0 → L1 gfn 100 with `perms`.
    fn mem(perms: EptPerms) -> Mem {
        let mut m = HashMap::new();
        for g in [10, 11, 12, 13, 100] {
            m.insert(g, [0u64; 512]);
        }
        m.get_mut(&10).unwrap()[0] = Ept12Entry::new(11, EptPerms::RWX).raw();
        m.get_mut(&11).unwrap()[0] = Ept12Entry::new(12, EptPerms::RWX).raw();
        m.get_mut(&12).unwrap()[0] = Ept12Entry::new(13, EptPerms::RWX).raw();
        m.get_mut(&13).unwrap()[0] = Ept12Entry::new(100, perms).raw();
        Mem(Mutex::new(m))
    }

    #[test]
    fn a_write_walk_sets_accessed_everywhere_and_dirty_on_the_leaf() {
        let m = mem(EptPerms::RW);
        let w = walk_ept12(&m, 10, 0, true).unwrap();
        assert_eq!((w.l1_gfn(), w.perms), (100, EptPerms::RW));
        assert_eq!(w.tables, [13, 12, 11, 10]);
        let leaf = Ept12Entry::from_raw(m.read(13, 0).unwrap());
        assert!(leaf.accessed() && leaf.dirty());
        let root = Ept12Entry::from_raw(m.read(10, 0).unwrap());
        assert!(root.accessed() && !root.dirty());
    }

    #[test]
    fn malformed_or_missing_entries_become_typed_exits() {
        let m = mem(EptPerms::R);
        let v = walk_ept12(&m, 10, 0, true).unwrap_err();
        assert!(matches!(
            v,
            WalkError::Exit(EptExit::Violation {
                reason: ViolationReason::Permission { .. },
                ..
            })
        ));
        let leaf = Ept12Entry::from_raw(m.read(13, 0).unwrap());
        assert!(!leaf.accessed(), "a failed walk sets no A bit");
        assert!(matches!(
            walk_ept12(&m, 10, 1, false),
            Err(WalkError::Exit(EptExit::Violation {
                reason: ViolationReason::NotPresent { level: 1 },
                ..
            }))
        ));
        m.0.lock().unwrap().get_mut(&12).unwrap()[0] = Ept12Entry::new(999, EptPerms::RWX).raw();
        assert!(matches!(
            walk_ept12(&m, 10, 0, false),
            Err(WalkError::Exit(EptExit::Misconfig {
                level: 2,
                reason: MisconfigReason::TableOutsideL1Memory,
                ..
            }))
        ));
        m.0.lock().unwrap().get_mut(&11).unwrap()[0] = 2 | (12 << 12);
        assert!(matches!(
            walk_ept12(&m, 10, 0, false),
            Err(WalkError::Exit(EptExit::Misconfig {
                level: 3,
                reason: MisconfigReason::WriteWithoutRead,
                ..
            }))
        ));
        assert!(matches!(
            walk_ept12(&m, 10, 1 << 36, false),
            Err(WalkError::Exit(EptExit::Violation {
                reason: ViolationReason::OutOfRange,
                ..
            }))
        ));
    }
}
