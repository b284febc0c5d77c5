//! `nested`: the vCPUs run as an L2 guest, and an L1 actor rewrites EPT12 under them.
//!
//! Set-up: L1's EPT12 tables live in their own memslot (slot 3 at [`POOL_GPA`], never churned);
//! EPT12 maps every guest address the vCPUs use to the L1 page the layout puts behind it: the
//! main slot at its own address, the alias window onto the main slot, both dynamic-slot windows
//! onto the dynamic slot's first base (when the slot sits at the other base, L2 accesses reach no
//! L1 memslot, an optional exit as before). The data oracles therefore apply unchanged.
//!
//! The L1 actor loops over: write-protect an EPT12 range and restore it, unmap and map it back,
//! rewrite an entry unchanged, INVEPT (the vCPUs may see EPT violations meanwhile: allowed), and
//! a probe of its own: an L2 vCPU it owns writes a private L1 page, L1 write-protects (or remaps)
//! that page in EPT12 and flushes, and the probe must then be refused (or read the new page). A
//! build that forgot to write-protect guest tables keeps the stale EPT02 entry, and the probe
//! reports it (`WriteToReadOnly` / `Data`).

use std::sync::Mutex;

use super::TortureConfig;
use super::oracle::{
    ALIAS_GPA, ActorId, DYN_GPA, Layout, MAIN_GPA, Progress, Shared, ViolationKind, op,
};
use super::rng::Rng;
use crate::addr::{AsId, Gpa, SlotId};
use crate::host::{HostMm, Prot};
use crate::mmu::shadow::nested::ept12::EptPerms;
use crate::mmu::shadow::nested::walk::{EptExit, ViolationReason};
use crate::vcpu::{NestedError, NestedGuest, Vcpu, VcpuExit};
use crate::vm::Vm;
use crate::vm::memslot::{MemFlags, MemoryRegion};

/// Guest base of L1's EPT12 table pool (slot 3).
pub const POOL_GPA: u64 = 5 << 32;
/// Guest base of the L1 actor's two probe pages (slot 4).
pub const PROBE_GPA: u64 = 6 << 32;
/// L2 address of the probe page.
pub const PROBE_L2: u64 = 7 << 32;
const PAGE: u64 = 4096;

/// The L2 guest the vCPUs run in.
pub(super) struct Nested {
    pub(super) guest: Mutex<NestedGuest>,
}

fn region(slot: u16, gpa: u64, size: u64, hva: crate::addr::Hva) -> MemoryRegion {
    MemoryRegion {
        slot: SlotId::new(slot),
        as_id: AsId::new(0),
        flags: MemFlags::empty(),
        gpa: Gpa::new(gpa),
        size,
        hva,
    }
}

/// Builds L1's EPT12 (after `Vm::enable_nested` and the layout's slots).
pub(super) fn setup(host: &HostMm, vm: &Vm, l: &Layout) -> Result<Nested, super::TortureError> {
    let mapped = l.main_pages + l.alias_pages + 2 * l.dyn_pages + 1;
    let pool_pages = mapped.div_ceil(512) * 3 + 12;
    let pool = host.mmap(pool_pages * PAGE, Prot::READ | Prot::WRITE)?;
    vm.set_user_memory_region(region(3, POOL_GPA, pool_pages * PAGE, pool))?;
    let probe = host.mmap(2 * PAGE, Prot::READ | Prot::WRITE)?;
    vm.set_user_memory_region(region(4, PROBE_GPA, 2 * PAGE, probe))?;
    let mut l1 = vm.create_vcpu()?;
    let mut g = NestedGuest::new(&mut l1, Gpa::new(POOL_GPA), pool_pages * PAGE)?;
    let mut map = |l2: u64, l1a: u64, pages: u64| {
        g.map(
            &mut l1,
            Gpa::new(l2),
            Gpa::new(l1a),
            pages * PAGE,
            EptPerms::RWX,
        )
    };
    map(MAIN_GPA, MAIN_GPA, l.main_pages)?;
    map(ALIAS_GPA, MAIN_GPA, l.alias_pages)?;
    map(DYN_GPA[0], DYN_GPA[0], l.dyn_pages)?;
    map(DYN_GPA[1], DYN_GPA[0], l.dyn_pages)?;
    map(PROBE_L2, PROBE_GPA, 1)?;
    Ok(Nested {
        guest: Mutex::new(g),
    })
}

/// Moves a vCPU to L2.
pub(super) fn enter(vcpu: &mut Vcpu, n: &Nested) -> Result<(), NestedError> {
    // A poisoned lock means the L1 actor panicked (reported as such); the guest's EPT pointer
    // is still the one to enter with.
    let g = n.guest.lock().unwrap_or_else(|e| e.into_inner());
    vcpu.enter_l2(&g)
}

/// True if `e` is an exit the L1 actor may cause (an EPT violation while it rewrites EPT12).
pub(super) fn exit_allowed(e: &VcpuExit) -> bool {
    matches!(e, VcpuExit::Ept(EptExit::Violation { .. }))
}

/// The L1 actor (module doc).
pub(super) fn l1(vm: &Vm, sh: &Shared, cfg: &TortureConfig, n: &Nested, progress: &Progress) {
    let actor = ActorId::L1;
    let fail = |kind, what: String| sh.violation(actor, kind, None, what);
    let (mut l1, mut probe) = match (vm.create_vcpu(), vm.create_vcpu()) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            return fail(ViolationKind::UnexpectedError, format!("create_vcpu: {e}"));
        }
    };
    if let Err(e) = enter(&mut probe, n) {
        return fail(ViolationKind::UnexpectedError, format!("enter_l2: {e}"));
    }
    let l = sh.layout;
    let mut rng = Rng::new(cfg.seed, 7000);
    let mut seq = 0u64;
    let churn = l.main_pages - l.private;
    while !sh.stopped() {
        let p = rng.below(churn);
        let n_pages = 1 + rng.below(4).min(churn - p - 1);
        let l2 = Gpa::new(MAIN_GPA + p * PAGE);
        let len = n_pages * PAGE;
        progress.start(op::L1_EPT, p);
        let Ok(mut g) = n.guest.lock() else {
            return fail(ViolationKind::Panic, "nested guest lock poisoned".into());
        };
        let unexpected =
            |what: &str, e: NestedError| (ViolationKind::UnexpectedError, format!("{what}: {e}"));
        let r: Result<(), (ViolationKind, String)> = match rng.below(5) {
            0 => g
                .protect(&mut l1, l2, len, EptPerms::R)
                .and_then(|()| g.protect(&mut l1, l2, len, EptPerms::RWX))
                .map_err(|e| unexpected("protect", e)),
            1 => g
                .unmap(&mut l1, l2, len)
                .and_then(|()| {
                    g.map(
                        &mut l1,
                        l2,
                        Gpa::new(MAIN_GPA + p * PAGE),
                        len,
                        EptPerms::RWX,
                    )
                })
                .map_err(|e| unexpected("unmap/map", e)),
            2 => g
                .remap(&mut l1, l2, Gpa::new(MAIN_GPA + p * PAGE), len)
                .map_err(|e| unexpected("remap", e)),
            3 => g.invept(&mut l1).map_err(|e| unexpected("invept", e)),
            _ => {
                seq += 1;
                probe_round(&mut g, &mut l1, &mut probe, seq)
            }
        };
        drop(g);
        if let Err((kind, what)) = r {
            return fail(kind, what);
        }
        progress.done_op();
    }
}

/// One probe round: write through L2, write-protect in EPT12, check the write is refused;
/// remap to the other probe page, check L2 reads it; restore. A violation comes back with its
/// oracle kind.
fn probe_round(
    g: &mut NestedGuest,
    l1: &mut Vcpu,
    probe: &mut Vcpu,
    seq: u64,
) -> Result<(), (ViolationKind, String)> {
    let l2 = Gpa::new(PROBE_L2);
    let (a, b) = (Gpa::new(PROBE_GPA), Gpa::new(PROBE_GPA + PAGE));
    let exit = |e: VcpuExit| (ViolationKind::UnexpectedError, format!("probe access: {e}"));
    let builder = |e: NestedError| (ViolationKind::UnexpectedError, format!("probe EPT12: {e}"));
    probe.write_u64(l2, seq).map_err(exit)?;
    g.protect(l1, l2, PAGE, EptPerms::R).map_err(builder)?;
    g.invept(l1).map_err(builder)?;
    match probe.write_u64(l2, seq + 1) {
        Err(VcpuExit::Ept(EptExit::Violation {
            reason: ViolationReason::Permission { .. },
            ..
        })) => {}
        Ok(()) => {
            return Err((
                ViolationKind::WriteToReadOnly,
                "probe: an L2 write succeeded after L1 write-protected it in EPT12 and ran INVEPT"
                    .into(),
            ));
        }
        Err(e) => return Err(exit(e)),
    }
    g.protect(l1, l2, PAGE, EptPerms::RWX).map_err(builder)?;
    l1.write_u64(b, !seq).map_err(exit)?;
    g.remap(l1, l2, b, PAGE).map_err(builder)?;
    g.invept(l1).map_err(builder)?;
    let got = probe.read_u64(l2).map_err(exit)?;
    if got != !seq {
        return Err((
            ViolationKind::Data,
            format!(
                "probe: stale data: L2 read {got:#x} after a remap to a page holding {:#x}",
                !seq
            ),
        ));
    }
    g.remap(l1, l2, a, PAGE).map_err(builder)?;
    Ok(())
}
