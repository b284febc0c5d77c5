//! Statistics bumped on the fault and aging paths are striped (`StripedCounter`, issue 9 item 7):
//! each thread counts on its own cache line. Checked here: the totals stay exact while several
//! vCPUs fault at once.

mod common;

use common::*;
use kvmmu::prelude::*;

const VCPUS: u64 = 4;
const PAGES_EACH: u64 = 64;

#[test]
fn fault_and_install_counters_are_exact_under_concurrent_vcpus() {
    for mmu in [MmuKind::Tdp, MmuKind::Shadow] {
        let config = VmConfig {
            mmu,
            ..VmConfig::default()
        };
        let f = fixture(VCPUS * PAGES_EACH * 4096, config);
        let per_vcpu: Vec<(u64, u64)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..VCPUS)
                .map(|id| {
                    let vm = &f.vm;
                    s.spawn(move || {
                        let mut vcpu = vm.create_vcpu().unwrap();
                        for p in id * PAGES_EACH..(id + 1) * PAGES_EACH {
                            vcpu.write_u64(gpa(p), p).unwrap();
                        }
                        let st = vcpu.stats();
                        (st.faults, st.fault_retries)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let st = f.vm.stats();
        let faults: u64 = per_vcpu.iter().map(|c| c.0).sum();
        let retries: u64 = per_vcpu.iter().map(|c| c.1).sum();
        assert_eq!(st.faults, faults, "{mmu:?}: every vCPU fault counted once");
        assert_eq!(st.fault_retries, retries, "{mmu:?}");
        let installed = match mmu {
            MmuKind::Tdp => st.tdp.leaves_installed,
            MmuKind::Shadow => st.shadow.leaves_installed,
        };
        assert_eq!(
            installed,
            VCPUS * PAGES_EACH,
            "{mmu:?}: one leaf per written page"
        );
        let fin = f.vm.shutdown();
        assert_eq!(fin.tdp.tables_allocated, fin.tdp.tables_freed, "{mmu:?}");
        assert_eq!(
            fin.shadow.pages_allocated, fin.shadow.pages_freed,
            "{mmu:?}"
        );
    }
}
