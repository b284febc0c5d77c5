//! The raw-walk limit of the TLB-miss figure: a 4-level radix tree of the TDP MMU's geometry (512
//! 8-byte entries per 4 KiB table, the gfn's 9-bit index per level) holding the benchmark guest's
//! gfns, walked by a bare loop (one `Acquire` load per level, then the load of the word the leaf
//! names), in the same process and run as the vCPU's TLB-miss figure.
//!
//! The tree is a replica of the VM's tables (same shape, same gfns, same table count per level),
//! not the VM's own tables: the CLI uses only the library's public face. What the limit leaves out
//! is exactly what a vCPU's miss adds: the TLB lookup and fill, the A/D check, the frame owner-tag
//! check and the access counters.
//!
//! The data word a leaf names sits `stride_words` words after the previous page's:
//! [`PAGE_STRIDE_WORDS`] puts each at the start of its own 4 KiB page, the guest's own access
//! pattern (word 0 of every guest page: every word maps to the same cache sets and each to its own
//! host page, as the vCPU's frame reads do); [`LINE_STRIDE_WORDS`] packs them one per 64-byte line,
//! a limit no access of that pattern can reach (the bench reports both).

use std::sync::atomic::{AtomicU64, Ordering};

const ENTRIES: usize = 512;
const LEVELS: u32 = 4;
/// Marks a present entry.
const PRESENT: u64 = 1 << 63;

/// One table: 512 entries on one 4 KiB page.
#[repr(C, align(4096))]
struct Table([AtomicU64; ENTRIES]);

impl Table {
    fn new() -> Box<Table> {
        Box::new(Table(std::array::from_fn(|_| AtomicU64::new(0))))
    }
}

/// Data words per page at the guest's own stride: one word at the start of every 4 KiB page.
pub const PAGE_STRIDE_WORDS: u64 = 512;
/// Data words per page packed one per 64-byte line.
pub const LINE_STRIDE_WORDS: u64 = 8;

/// The replica tree plus the data words its leaves name (one every `stride_words` words).
pub struct RawTree {
    /// `tables[0]` is the root; a non-leaf entry holds `PRESENT | child index`.
    tables: Vec<Box<Table>>,
    /// The words the leaves name, one per `stride_words` (the rest are never read).
    data: Vec<AtomicU64>,
    first_gfn: u64,
    pages: u64,
}

fn index(gfn: u64, level: u32) -> usize {
    ((gfn >> (9 * (level - 1))) as usize) & (ENTRIES - 1)
}

impl RawTree {
    /// A tree mapping gfns `first_gfn .. first_gfn + pages`, each leaf naming page `i`'s word at
    /// `i * stride_words` (every word is allocated and written, so the limit is not timing the
    /// process's own first-touch page faults).
    pub fn new(first_gfn: u64, pages: u64, stride_words: u64) -> RawTree {
        let mut tables = vec![Table::new()];
        for i in 0..pages {
            let gfn = first_gfn + i;
            let mut t = 0usize;
            for level in (2..=LEVELS).rev() {
                // ORDERING: Relaxed: single-threaded construction.
                let e = tables[t].0[index(gfn, level)].load(Ordering::Relaxed);
                t = if e & PRESENT != 0 {
                    (e & !PRESENT) as usize
                } else {
                    tables.push(Table::new());
                    let child = tables.len() - 1;
                    // ORDERING: Relaxed: single-threaded construction.
                    tables[t].0[index(gfn, level)].store(PRESENT | child as u64, Ordering::Relaxed);
                    child
                };
            }
            // ORDERING: Relaxed: single-threaded construction.
            tables[t].0[index(gfn, 1)].store(PRESENT | (i * stride_words), Ordering::Relaxed);
        }
        RawTree {
            tables,
            data: (0..pages * stride_words)
                .map(|_| AtomicU64::new(1))
                .collect(),
            first_gfn,
            pages,
        }
    }

    /// Page tables in the tree.
    pub fn tables(&self) -> usize {
        self.tables.len()
    }

    /// Walks every gfn once in order and loads the word its leaf names; returns a checksum.
    pub fn walk_all(&self) -> u64 {
        let mut sum = 0u64;
        for gfn in self.first_gfn..self.first_gfn + self.pages {
            let mut t = 0usize;
            for level in (2..=LEVELS).rev() {
                // ORDERING: Acquire, as the vCPU's walk loads every SPTE (spte.rs O1).
                let e = self.tables[t].0[index(gfn, level)].load(Ordering::Acquire);
                t = (e & !PRESENT) as usize;
            }
            // ORDERING: Acquire, as above.
            let leaf = self.tables[t].0[index(gfn, 1)].load(Ordering::Acquire);
            // ORDERING: Relaxed: the guest's plain load.
            sum = sum.wrapping_add(self.data[(leaf & !PRESENT) as usize].load(Ordering::Relaxed));
        }
        sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_walk_reaches_every_page_word_once() {
        for stride in [LINE_STRIDE_WORDS, PAGE_STRIDE_WORDS] {
            let t = RawTree::new((1 << 32) >> 12, 1024, stride);
            assert_eq!(t.walk_all(), 1024, "every data word is 1");
            // 1024 pages from a 1 GiB-aligned gfn: one table per upper level, two leaf tables.
            assert_eq!(t.tables(), 1 + 1 + 1 + 2);
        }
    }
}
