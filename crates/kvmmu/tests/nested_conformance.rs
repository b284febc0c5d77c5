//! Nested conformance, on both L1 MMUs: a seeded random run of L1 writes, L2 reads and writes,
//! EPT12 changes (map, unmap, remap, protect, INVEPT, raw entry writes), L1 memslot changes and
//! host munmap/mprotect/DONTNEED, checked against a model: every L2 read returns the last value
//! written to the same L1 page (by L1 or through any L2 alias), or the exit the model predicts.

use std::collections::HashMap;

use kvmmu::EptPerms;
use kvmmu::prelude::*;
use kvmmu::{EptExit, ViolationReason};

const MIB: u64 = 1 << 20;
/// L1: the table pool slot at 0, the data slot at `DATA` (`DATA_PAGES` pages).
const POOL: u64 = 0;
const DATA: u64 = 4 * MIB;
const DATA_PAGES: u64 = 32;
/// L2 pages `[0, L2_PAGES)` at `L2_BASE`.
const L2_BASE: u64 = 0x10_0000_0000;
const L2_PAGES: u64 = 24;

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct World {
    host: HostMm,
    vm: Vm,
    l1: Vcpu,
    l2: Vcpu,
    guest: NestedGuest,
    data_hva: Hva,
    /// L1 data page → (word 0 value).
    mem: HashMap<u64, u64>,
    /// L2 page → (L1 data page, perms).
    map: HashMap<u64, (u64, EptPerms)>,
    /// Data pages the host made read-only.
    readonly: Vec<u64>,
}

fn l1_gpa(p: u64) -> Gpa {
    Gpa::new(DATA + p * 4096)
}
fn l2_gpa(p: u64) -> Gpa {
    Gpa::new(L2_BASE + p * 4096)
}

fn data_slot(vm: &Vm, hva: Hva, size: u64) {
    vm.set_user_memory_region(MemoryRegion {
        slot: SlotId::new(1),
        as_id: AsId::new(0),
        flags: MemFlags::empty(),
        gpa: Gpa::new(DATA),
        size,
        hva,
    })
    .unwrap();
}

fn world(mmu: MmuKind) -> World {
    let host = HostMm::new(HostConfig { frames: 4096 }).unwrap();
    let vm = Vm::new(
        &host,
        VmConfig {
            mmu,
            ..VmConfig::default()
        },
    )
    .unwrap();
    vm.enable_nested().unwrap();
    let pool = host.mmap(MIB, Prot::READ | Prot::WRITE).unwrap();
    vm.set_user_memory_region(MemoryRegion {
        slot: SlotId::new(0),
        as_id: AsId::new(0),
        flags: MemFlags::empty(),
        gpa: Gpa::new(POOL),
        size: MIB,
        hva: pool,
    })
    .unwrap();
    let data_hva = host
        .mmap(DATA_PAGES * 4096, Prot::READ | Prot::WRITE)
        .unwrap();
    data_slot(&vm, data_hva, DATA_PAGES * 4096);
    let mut l1 = vm.create_vcpu().unwrap();
    let guest = NestedGuest::new(&mut l1, Gpa::new(POOL), MIB).unwrap();
    let mut l2 = vm.create_vcpu().unwrap();
    l2.enter_l2(&guest).unwrap();
    World {
        host,
        vm,
        l1,
        l2,
        guest,
        data_hva,
        mem: HashMap::new(),
        map: HashMap::new(),
        readonly: Vec::new(),
    }
}

impl World {
    fn expect_l2_read(&mut self, p: u64, step: usize) {
        let got = self.l2.read_u64(l2_gpa(p));
        match self.map.get(&p) {
            Some(&(d, _)) => {
                let want = self.mem.get(&d).copied().unwrap_or(0);
                assert_eq!(got, Ok(want), "step {step}: L2 page {p} -> L1 page {d}");
            }
            None => assert!(
                matches!(
                    got,
                    Err(VcpuExit::Ept(EptExit::Violation {
                        reason: ViolationReason::NotPresent { .. },
                        ..
                    }))
                ),
                "step {step}: unmapped L2 page {p} read gave {got:?}"
            ),
        }
    }

    fn l2_write(&mut self, p: u64, v: u64, step: usize) {
        let got = self.l2.write_u64(l2_gpa(p), v);
        match self.map.get(&p).copied() {
            Some((d, perms)) if perms.write() && !self.readonly.contains(&d) => {
                assert_eq!(got, Ok(()), "step {step}: L2 write to page {p}");
                self.mem.insert(d, v);
            }
            Some((d, perms)) if perms.write() => {
                assert!(
                    matches!(got, Err(VcpuExit::HostFault { .. })),
                    "step {step}: L2 write to host-read-only L1 page {d}: {got:?}"
                );
            }
            Some(_) => assert!(
                matches!(
                    got,
                    Err(VcpuExit::Ept(EptExit::Violation {
                        reason: ViolationReason::Permission { .. },
                        ..
                    }))
                ),
                "step {step}: L2 write to read-only page {p}: {got:?}"
            ),
            None => assert!(matches!(got, Err(VcpuExit::Ept(_))), "step {step}: {got:?}"),
        }
    }

    fn step(&mut self, rng: &mut Lcg, step: usize) {
        let p = rng.below(L2_PAGES);
        let d = rng.below(DATA_PAGES);
        let v = rng.next() | 1;
        match rng.below(20) {
            0..=4 => self.expect_l2_read(p, step),
            5..=7 => self.l2_write(p, v, step),
            8..=9 => {
                if !self.readonly.contains(&d) {
                    self.l1.write_u64(l1_gpa(d), v).unwrap();
                    self.mem.insert(d, v);
                }
            }
            10 => {
                let perms = if rng.below(2) == 0 {
                    EptPerms::RW
                } else {
                    EptPerms::R
                };
                if self.map.contains_key(&p) {
                    self.guest.unmap(&mut self.l1, l2_gpa(p), 4096).unwrap();
                    self.map.remove(&p);
                } else {
                    self.guest
                        .map(&mut self.l1, l2_gpa(p), l1_gpa(d), 4096, perms)
                        .unwrap();
                    self.map.insert(p, (d, perms));
                }
            }
            11 | 12 => {
                if let Some(e) = self.map.get_mut(&p) {
                    self.guest
                        .remap(&mut self.l1, l2_gpa(p), l1_gpa(d), 4096)
                        .unwrap();
                    e.0 = d;
                }
            }
            13 => {
                if let Some(e) = self.map.get_mut(&p) {
                    let perms = if e.1 == EptPerms::R {
                        EptPerms::RWX
                    } else {
                        EptPerms::R
                    };
                    self.guest
                        .protect(&mut self.l1, l2_gpa(p), 4096, perms)
                        .unwrap();
                    e.1 = perms;
                }
            }
            14 => self.guest.invept(&mut self.l1).unwrap(),
            15 => {
                // Host DONTNEED of a data page: it reads back as zero.
                let hva = Hva::new(self.data_hva.raw() + d * 4096);
                self.host.madvise_dontneed(hva, 4096).unwrap();
                self.mem.remove(&d);
            }
            16 => {
                let hva = Hva::new(self.data_hva.raw() + d * 4096);
                if let Some(i) = self.readonly.iter().position(|&x| x == d) {
                    self.host
                        .mprotect(hva, 4096, Prot::READ | Prot::WRITE)
                        .unwrap();
                    self.readonly.remove(i);
                } else {
                    self.host.mprotect(hva, 4096, Prot::READ).unwrap();
                    self.readonly.push(d);
                }
            }
            17 => {
                // munmap a data page and map fresh memory in its place via a new slot
                // (L1 memslot change): every page of the slot reads zero afterwards.
                data_slot(&self.vm, self.data_hva, 0);
                self.host.munmap(self.data_hva, DATA_PAGES * 4096).unwrap();
                self.data_hva = self
                    .host
                    .mmap(DATA_PAGES * 4096, Prot::READ | Prot::WRITE)
                    .unwrap();
                data_slot(&self.vm, self.data_hva, DATA_PAGES * 4096);
                self.mem.clear();
                self.readonly.clear();
            }
            _ => {
                // A raw EPT12 leaf rewrite by L1 (same meaning as the builder's model: the
                // entry it already holds, with the A/D bits cleared).
                if let (Some(&(dd, perms)), Some(at)) =
                    (self.map.get(&p), self.guest.entry_gpa(l2_gpa(p), 1))
                {
                    let e = kvmmu::Ept12Entry::new((DATA >> 12) + dd, perms);
                    self.l1.write_u64(at, e.raw()).unwrap();
                }
            }
        }
    }
}

fn run(mmu: MmuKind, seed: u64, steps: usize) {
    let mut w = world(mmu);
    let mut rng = Lcg(seed);
    // Start with a few aliases of the same L1 pages.
    for p in 0..L2_PAGES / 2 {
        let d = p % 4;
        w.guest
            .map(&mut w.l1, l2_gpa(p), l1_gpa(d), 4096, EptPerms::RW)
            .unwrap();
        w.map.insert(p, (d, EptPerms::RW));
    }
    for step in 0..steps {
        w.step(&mut rng, step);
    }
    for p in 0..L2_PAGES {
        w.expect_l2_read(p, steps);
    }
    assert_eq!(w.host.arena().stats().stale_accesses, 0);
    drop((w.l1, w.l2));
    let st = w.vm.shutdown().shadow;
    assert_eq!(st.pages_allocated, st.pages_freed, "{mmu:?}: {st:?}");
}

#[test]
fn every_l2_read_returns_the_last_write_through_ept12_and_host_changes_tdp_l1() {
    for seed in 1..=6 {
        run(MmuKind::Tdp, seed, 1500);
    }
}

#[test]
fn every_l2_read_returns_the_last_write_through_ept12_and_host_changes_shadow_l1() {
    for seed in 1..=6 {
        run(MmuKind::Shadow, seed, 1500);
    }
}
