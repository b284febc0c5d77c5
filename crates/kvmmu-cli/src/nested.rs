//! `--nested`: run a workload's vCPUs as an L2 guest (the selftests' `-n`, nested TDP). L1's
//! first vCPU builds EPT12 in a small table memslot at gpa 0 with ordinary writes: the test
//! memory is mapped at its own address (the window the workload uses) and, for access-tracking,
//! once more per alias window from [`ALIAS_L2_GPA`]; every vCPU then enters L2 and reads its
//! pages through each alias once, so that each L1 page has `1 + aliases` indirect leaves (rmap
//! chains that long) before the timed phases start.

use anyhow::Context;
use kvmmu::prelude::*;
use kvmmu::{EptPerms, PAGE_SIZE};

/// Where the first alias window of the test memory starts in L2 (window `k` at `(k + 1) << 40`).
pub const ALIAS_L2_GPA: u64 = 1 << 40;
/// The most alias windows `--nested-aliases` takes (each is a 1 TiB slice of the 48-bit L2 space).
pub const MAX_ALIASES: u64 = 200;
/// The memslot of L1's EPT12 tables (a high id no workload uses).
const TABLE_SLOT: u16 = 32_000;

/// Host frames the EPT12 tables of `test_pages` pages mapped in `windows` L2 windows need.
pub fn table_frames(test_pages: u64, windows: u64) -> u64 {
    windows * (test_pages.div_ceil(512) + 3) + 16
}

/// Builds EPT12 for test memory `[test_gpa, test_gpa + total)` (a memslot that must not exist yet
/// is added for the tables at gpa 0, after `Vm::enable_nested`, which the caller ran before any
/// memslot), moves every vCPU to L2 and, with `alias_regions`, maps the alias window too and
/// touches every page of each vCPU's region (first page, count) through it.
pub fn enter_l2(
    host: &HostMm,
    vm: &Vm,
    vcpus: &mut [Vcpu],
    test_gpa: u64,
    total: u64,
    aliases: u64,
    alias_regions: Option<&dyn Fn(usize) -> (u64, u64)>,
) -> anyhow::Result<NestedGuest> {
    let aliases = if alias_regions.is_some() { aliases } else { 0 };
    let pages = table_frames(total / PAGE_SIZE, 1 + aliases);
    let hva = host.mmap(pages * PAGE_SIZE, Prot::READ | Prot::WRITE)?;
    vm.set_user_memory_region(MemoryRegion {
        slot: SlotId::new(TABLE_SLOT),
        as_id: AsId::new(0),
        flags: MemFlags::empty(),
        gpa: Gpa::new(0),
        size: pages * PAGE_SIZE,
        hva,
    })?;
    let Some(l1) = vcpus.first_mut() else {
        anyhow::bail!("--nested needs at least one vCPU");
    };
    let mut guest = NestedGuest::new(l1, Gpa::new(0), pages * PAGE_SIZE)?;
    let windows: Vec<u64> = core::iter::once(test_gpa)
        .chain((0..aliases).map(|k| ALIAS_L2_GPA * (k + 1)))
        .collect();
    for &l2 in &windows {
        guest
            .map(l1, Gpa::new(l2), Gpa::new(test_gpa), total, EptPerms::RWX)
            .context("building EPT12")?;
    }
    for (i, v) in vcpus.iter_mut().enumerate() {
        v.enter_l2(&guest)?;
        let Some(regions) = alias_regions else {
            continue;
        };
        let (first, n) = regions(i);
        let mut g = v.enter();
        for &w in &windows[1..] {
            for p in first..first + n {
                g.read_u64(Gpa::new(w + p * PAGE_SIZE))
                    .with_context(|| format!("L2 vCPU {i}: alias page {p} at {w:#x}"))?;
            }
        }
    }
    Ok(guest)
}

/// The nested counts and checks of a report: indirect pages exist and (with `aliases`) rmap
/// chains reached 2.
pub fn report(vm: &Vm, r: &mut crate::report::Report, aliases: bool) {
    let s = vm.stats().shadow;
    let chain = vm.max_rmap_len(AsId::new(0)) as u64;
    r.counts
        .insert("indirect_shadow_pages".into(), s.indirect_shadow_pages);
    // The longest chain now (a scan); `max_mmu_rmap_size` (KVM's stat: the most entries an
    // insertion found before it) comes with every report's VM counts.
    r.counts.insert("max_rmap_len".into(), chain);
    r.counts.insert("nested_faults".into(), s.nested_faults);
    r.counts.insert("mmu_pte_write".into(), s.mmu_pte_write);
    r.counts.insert("mmu_flooded".into(), s.mmu_flooded);
    r.counts.insert("rmap_age_walks".into(), s.rmap_age_walks);
    r.counts
        .insert("aged_sptes_lockless".into(), s.aged_sptes_lockless);
    r.counts
        .insert("aged_sptes_locked".into(), s.aged_sptes_locked);
    r.counts
        .insert("rmap_lock_contended".into(), s.rmap.lock_contended);
    r.require(
        "indirect shadow pages exist",
        s.indirect_shadow_pages > 0,
        format!("{} indirect pages", s.indirect_shadow_pages),
    );
    if aliases {
        r.require(
            "rmap chains hold several SPTEs",
            chain >= 2 && s.max_mmu_rmap_size >= 1,
            format!(
                "longest chain {chain}, max_mmu_rmap_size {}",
                s.max_mmu_rmap_size
            ),
        );
    }
}
