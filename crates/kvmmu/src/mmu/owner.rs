//! Owner words: what the installer of a leaf expected the leaf's frames to back, recorded beside
//! the leaf so that a vCPU's guest-mode TLB fill can check a frame without SRCU or the memslots
//! (docs/locking.md, "The guest-mode TLB miss", G3; G4 for split and recovery; G5 for the shadow
//! MMU). Both MMUs keep one word per entry beside their tables (TDP: `tdp/table.rs` `Owners`;
//! shadow: `shadow/page.rs` beside a direct page's SPTEs) and share this encoding.
//!
//! Encoding: bits 0..32 hold the host page (`hva >> 12`) of the leaf's first frame plus one, bits
//! 32..64 the low 32 bits of the leaf's first pfn; 0 means unknown. A reader that finds an unknown
//! word, or one whose pfn bits do not match the leaf it walked, falls back to the memslot check, so
//! a stale or missing word can cost time but never decides a stale-translation report.

/// The owner word of a leaf whose first frame `base_pfn` backs host page `base_host_page`.
#[inline]
pub(crate) fn encode(base_host_page: u64, base_pfn: u64) -> u64 {
    (base_pfn << 32) | (base_host_page.wrapping_add(1) & 0xffff_ffff)
}

/// The host page that frame `pfn` of a leaf whose first frame is `base_pfn` must back, if `word`
/// recorded an owner for exactly that leaf.
#[inline]
pub(crate) fn expected_host_page(word: u64, base_pfn: u64, pfn: u64) -> Option<u64> {
    let hp1 = word & 0xffff_ffff;
    if hp1 == 0 || (word >> 32) != (base_pfn & 0xffff_ffff) {
        return None;
    }
    Some(hp1 - 1 + (pfn - base_pfn))
}

/// The owner word of a leaf that is `gfn`'s leaf of `level_pages` pages, given the host page of
/// `gfn`'s own frame (the fault's GUP) and the leaf's first pfn: the claim moved to the leaf's
/// first frame; unknown (0) if there is no claim or the block's host pages would start below 0.
#[inline]
pub(crate) fn for_leaf(host_page: Option<u64>, offset_in_leaf: u64, base_pfn: u64) -> u64 {
    host_page
        .and_then(|hp| hp.checked_sub(offset_in_leaf))
        .map_or(0, |base| encode(base, base_pfn))
}

/// The owner word of a huge leaf recovered from a table of `n` leaves of `step` pages each, the
/// first at `base_pfn`, whose words `word(i)` are given: the union of the children's claims if
/// every child recorded one and together they form one run (child `i` claims host page
/// `hp0 + i * step` for pfn `base_pfn + i * step`), otherwise unknown (0).
pub(crate) fn recovered(n: usize, step: u64, base_pfn: u64, word: impl Fn(usize) -> u64) -> u64 {
    let Some(hp0) = expected_host_page(word(0), base_pfn, base_pfn) else {
        return 0;
    };
    let run = (0..n).all(|i| {
        let pfn = base_pfn + i as u64 * step;
        expected_host_page(word(i), pfn, pfn) == Some(hp0 + i as u64 * step)
    });
    if run { encode(hp0, base_pfn) } else { 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_word_names_the_host_page_of_each_frame_of_its_own_leaf_only() {
        let w = encode(100, 7);
        assert_eq!(expected_host_page(w, 7, 7), Some(100));
        assert_eq!(expected_host_page(w, 7, 9), Some(102));
        assert_eq!(expected_host_page(w, 8, 8), None, "another leaf's pfn bits");
        assert_eq!(expected_host_page(0, 7, 7), None, "unknown");
        // A 2M leaf whose first frame 0x2000 backs host page 0x9000 (moved from tdp/table.rs).
        let w = encode(0x9000, 0x2000);
        assert_eq!(expected_host_page(w, 0x2000, 0x2000), Some(0x9000));
        assert_eq!(expected_host_page(w, 0x2000, 0x2005), Some(0x9005));
        // Another leaf (another first frame) in the same slot: not this word's.
        assert_eq!(expected_host_page(w, 0x3000, 0x3000), None);
        // Never recorded.
        assert_eq!(expected_host_page(0, 0x2000, 0x2000), None);
        // Host page 0 is a real page, distinct from "unknown".
        assert_eq!(expected_host_page(encode(0, 7), 7, 7), Some(0));
    }

    #[test]
    fn a_leaf_word_moves_the_claim_to_the_first_frame_or_records_unknown() {
        assert_eq!(for_leaf(Some(105), 5, 40), encode(100, 40));
        assert_eq!(
            for_leaf(Some(3), 5, 40),
            0,
            "host pages would start below 0"
        );
        assert_eq!(for_leaf(None, 0, 40), 0);
    }

    #[test]
    fn recovery_keeps_a_run_of_claims_and_forgets_anything_else() {
        let run = |i: usize| encode(200 + i as u64, 10 + i as u64);
        assert_eq!(recovered(4, 1, 10, run), encode(200, 10));
        let hole = |i: usize| if i == 2 { 0 } else { run(i) };
        assert_eq!(recovered(4, 1, 10, hole), 0);
        let moved = |i: usize| if i == 3 { encode(999, 13) } else { run(i) };
        assert_eq!(recovered(4, 1, 10, moved), 0);
    }
}
