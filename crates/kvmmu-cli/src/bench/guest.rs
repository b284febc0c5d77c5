//! A benchmark guest: host memory, one VM, one memslot, vCPUs — built exactly as a user of the library
//! builds it, so every timed operation runs the library's real code path.

use anyhow::Context;
use kvmmu::PAGE_SIZE;
use kvmmu::prelude::*;

/// Guest physical address of the benchmark memslot (as the default workload).
pub const GUEST_GPA: u64 = 1 << 32;

/// One benchmark guest.
pub struct Guest {
    /// The simulated host.
    pub host: HostMm,
    /// The VM (dropped before `host` by field order).
    pub vm: Vm,
    /// Where guest memory lives in the host.
    pub hva: Hva,
    /// Guest pages.
    pub pages: u64,
    /// The vCPUs.
    pub vcpus: Vec<Vcpu>,
}

impl Guest {
    /// Builds a guest of `pages` pages with `nvcpus` vCPUs; the frame arena is prefaulted so that the
    /// simulator's own first-touch page faults are not timed.
    pub fn new(
        pages: u64,
        mmu: MmuKind,
        aging: AgingMode,
        nvcpus: usize,
        tlb_entries: usize,
    ) -> anyhow::Result<Guest> {
        Guest::new_backed(
            pages,
            mmu,
            aging,
            nvcpus,
            tlb_entries,
            BackingSrc::Anonymous,
        )
    }

    /// As [`Guest::new`], with guest memory backed by `src` (THP or hugetlb pages).
    pub fn new_backed(
        pages: u64,
        mmu: MmuKind,
        aging: AgingMode,
        nvcpus: usize,
        tlb_entries: usize,
        src: BackingSrc,
    ) -> anyhow::Result<Guest> {
        let host = HostMm::new(HostConfig {
            frames: usize::try_from(pages + 1024).context("guest too large")?,
        })?;
        host.prefault()?;
        let vm = Vm::new(
            &host,
            VmConfig {
                mmu,
                aging,
                tlb_entries,
                ..VmConfig::default()
            },
        )?;
        let total = pages * PAGE_SIZE;
        let hva = host.mmap_backed(total, Prot::READ | Prot::WRITE, src)?;
        vm.set_user_memory_region(MemoryRegion {
            slot: SlotId::new(0),
            as_id: AsId::new(0),
            flags: MemFlags::empty(),
            gpa: Gpa::new(GUEST_GPA),
            size: total,
            hva,
        })?;
        let vcpus = (0..nvcpus)
            .map(|_| vm.create_vcpu())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Guest {
            host,
            vm,
            hva,
            pages,
            vcpus,
        })
    }

    /// Bytes of guest memory.
    pub fn bytes(&self) -> u64 {
        self.pages * PAGE_SIZE
    }

    /// One full aging pass through the host's notifier path (`clear_young` over the whole guest).
    pub fn age(&self) -> anyhow::Result<bool> {
        Ok(self.host.clear_young(self.hva, self.bytes())?)
    }

    /// SPTEs whose Accessed bit aging has cleared so far, in either MMU.
    pub fn accessed_cleared(&self) -> u64 {
        let s = self.vm.stats();
        s.tdp.accessed_cleared + s.shadow.accessed_cleared
    }
}

/// The address of the first word of guest page `page`.
pub fn gpa(page: u64) -> Gpa {
    Gpa::new(GUEST_GPA + page * PAGE_SIZE)
}

/// Writes the first word of every page in `pages` (one fault each on a fresh guest).
pub fn touch_write(vcpu: &mut Vcpu, pages: std::ops::Range<u64>) -> anyhow::Result<()> {
    let mut g = vcpu.enter();
    for p in pages {
        g.write_u64(gpa(p), p ^ 0xA5)?;
    }
    Ok(())
}

/// Reads the first word of every `step`-th page of `0..pages`; returns a checksum so the reads are
/// not optimised away.
pub fn touch_read(vcpu: &mut Vcpu, pages: u64, step: u64) -> anyhow::Result<u64> {
    let mut g = vcpu.enter();
    let mut sum = 0u64;
    let mut p = 0;
    while p < pages {
        sum = sum.wrapping_add(g.read_u64(gpa(p))?);
        p += step;
    }
    Ok(sum)
}
