//! Nested guests, the VM's side: L1's memory as the builder sees it, INVEPT, and (with the shadow
//! MMU's `nested/` module) the L2 fault path.

use crate::addr::Gfn;
use crate::mmu::RemoteTlbFlush;
use crate::vm::VmInner;

impl VmInner {
    /// True if every gfn of `[start, start + pages)` is in a valid L1 memslot (address space 0).
    pub(crate) fn l1_covers(&self, start: u64, pages: u64) -> bool {
        let Some(end) = start.checked_add(pages) else {
            return false;
        };
        let srcu = self.srcu_read();
        let slots = self.memslots[0].load(&srcu);
        let mut g = start;
        while g < end {
            match slots.find_by_gfn(Gfn::new(g)) {
                Some(s) if !s.is_invalid() => g = s.gfn_range().end().raw(),
                _ => return false,
            }
        }
        true
    }

    /// INVEPT from L1: flush every vCPU's cached translations (EPT02 itself is kept in sync by
    /// write tracking).
    pub(crate) fn nested_invept(&self) {
        self.flush_remote_tlbs();
    }
}
