//! Byte-slice guest memory access (`Vcpu::read_bytes` / `write_bytes`): any alignment, page
//! crossing, partial words merged atomically, typed errors for ranges that cannot be accessed.

use kvmmu::prelude::*;
use std::sync::Barrier;

const PAGE: u64 = 4096;

fn vm_with(pages: u64, mmu: MmuKind) -> (HostMm, Vm, Hva) {
    let host = HostMm::new(HostConfig { frames: 1024 }).unwrap();
    let vm = Vm::new(
        &host,
        VmConfig {
            mmu,
            ..VmConfig::default()
        },
    )
    .unwrap();
    let hva = host.mmap(pages * PAGE, Prot::READ | Prot::WRITE).unwrap();
    vm.set_user_memory_region(MemoryRegion::new(
        SlotId::new(0),
        Gpa::new(0),
        pages * PAGE,
        hva,
    ))
    .unwrap();
    (host, vm, hva)
}

#[test]
fn bytes_written_at_any_alignment_across_pages_read_back_and_reach_host_memory() {
    for mmu in [MmuKind::Tdp, MmuKind::Shadow] {
        let (host, vm, hva) = vm_with(4, mmu);
        let mut vcpu = vm.create_vcpu().unwrap();
        // Ranges that start and end inside words, span whole words and cross page boundaries.
        for (start, len) in [
            (0u64, 1usize),
            (3, 5),
            (5, 13),
            (PAGE - 3, 7),
            (PAGE - 8, 16),
        ] {
            let data: Vec<u8> = (0..len)
                .map(|i| (start as usize + i * 7) as u8 | 1)
                .collect();
            vcpu.write_bytes(Gpa::new(start + PAGE), &data).unwrap();
            let mut back = vec![0u8; len];
            vcpu.read_bytes(Gpa::new(start + PAGE), &mut back).unwrap();
            assert_eq!(back, data, "{mmu:?}: {len} bytes at {start:#x}");
            // The host sees the same bytes (little-endian words, as on x86).
            for (i, b) in data.iter().enumerate() {
                let at = start + PAGE + i as u64;
                let word = host.read_u64(hva.checked_add(at & !7).unwrap()).unwrap();
                assert_eq!(
                    (word >> (8 * (at & 7))) as u8,
                    *b,
                    "{mmu:?}: host byte {at:#x}"
                );
            }
        }
    }
}

#[test]
fn a_partial_word_write_keeps_the_other_bytes_of_the_word() {
    let (_host, vm, _hva) = vm_with(1, MmuKind::Tdp);
    let mut vcpu = vm.create_vcpu().unwrap();
    vcpu.write_u64(Gpa::new(0x40), 0x1122_3344_5566_7788)
        .unwrap();
    vcpu.write_bytes(Gpa::new(0x42), &[0xaa, 0xbb, 0xcc])
        .unwrap();
    assert_eq!(
        vcpu.read_u64(Gpa::new(0x40)).unwrap(),
        0x1122_33cc_bbaa_7788
    );
}

#[test]
fn concurrent_byte_writes_to_one_word_are_never_lost() {
    // Two vCPUs write different bytes of the same words over and over; a read-modify-write that
    // is not atomic would overwrite the other vCPU's byte with a stale value now and then.
    let (_host, vm, _hva) = vm_with(1, MmuKind::Tdp);
    let rounds = 20_000u32;
    let barrier = Barrier::new(2);
    std::thread::scope(|s| {
        for lane in 0..2u64 {
            let mut vcpu = vm.create_vcpu().unwrap();
            let barrier = &barrier;
            s.spawn(move || {
                barrier.wait();
                let mut g = vcpu.enter();
                for i in 1..=rounds {
                    let v = (i % 255 + 1) as u8;
                    for w in 0..4u64 {
                        g.write_bytes(Gpa::new(w * 8 + lane), &[v]).unwrap();
                    }
                    for w in 0..4u64 {
                        let mut b = [0u8];
                        g.read_bytes(Gpa::new(w * 8 + lane), &mut b).unwrap();
                        assert_eq!(
                            b[0], v,
                            "lane {lane} lost its byte in word {w} at round {i}"
                        );
                    }
                }
            });
        }
    });
}

#[test]
fn a_range_past_the_end_of_the_address_space_is_refused_before_any_access() {
    let (_host, vm, _hva) = vm_with(1, MmuKind::Tdp);
    let mut vcpu = vm.create_vcpu().unwrap();
    let mut buf = [0u8; 16];
    let gpa = Gpa::new(u64::MAX - 7);
    assert_eq!(
        vcpu.read_bytes(gpa, &mut buf),
        Err(VcpuExit::AddressOverflow { gpa, len: 16 })
    );
    assert_eq!(
        vcpu.write_bytes(gpa, &buf),
        Err(VcpuExit::AddressOverflow { gpa, len: 16 })
    );
    assert_eq!(vcpu.stats().faults, 0, "nothing was accessed");
}

#[test]
fn a_write_running_off_the_memslot_exits_there_with_the_bytes_before_it_written() {
    let (_host, vm, _hva) = vm_with(1, MmuKind::Shadow);
    let mut vcpu = vm.create_vcpu().unwrap();
    let data = [0x5au8; 16];
    let r = vcpu.write_bytes(Gpa::new(PAGE - 8), &data);
    assert_eq!(
        r,
        Err(VcpuExit::NoMemslot {
            gpa: Gpa::new(PAGE)
        })
    );
    let mut back = [0u8; 8];
    vcpu.read_bytes(Gpa::new(PAGE - 8), &mut back).unwrap();
    assert_eq!(back, [0x5a; 8]);
    // An empty range touches nothing, wherever it is.
    vcpu.write_bytes(Gpa::new(1 << 40), &[]).unwrap();
}

#[test]
fn vm_vcpu_and_guest_mode_print_for_debugging() {
    let (_host, vm, _hva) = vm_with(1, MmuKind::Tdp);
    let mut vcpu = vm.create_vcpu().unwrap();
    vcpu.write_u64(Gpa::new(0), 1).unwrap();
    assert!(format!("{vm:?}").starts_with("Vm {"));
    let v = format!("{vcpu:?}");
    assert!(v.contains("accesses: 1"), "{v}");
    assert!(format!("{:?}", vcpu.enter()).starts_with("GuestMode"));
}
