//! The set-up every guest-running family shares: a real VM with the guest and a host buffer, and
//! kvmmu's host, VM, vCPU and the same buffer mapped read-write.

use std::sync::Arc;

use kvmmu::prelude::{Vm, VmConfig};
use kvmmu::{HostConfig, HostMm, Hva, MmuKind, Prot, Vcpu};

use super::FamilyError;
use crate::hostmem::HostRegion;
use crate::runner::KvmVm;

/// Opens a real VM, lets `prepare` enable what must precede the vCPU (the dirty ring), sets up the
/// guest and adopts a fresh host buffer of `bytes` bytes, which it returns next to the VM.
pub fn real_side(
    bytes: u64,
    prepare: impl FnOnce(&mut KvmVm) -> Result<(), FamilyError>,
) -> Result<(KvmVm, Arc<HostRegion>), FamilyError> {
    let mut real = KvmVm::open().map_err(FamilyError::setup)?;
    prepare(&mut real)?;
    real.enable_guest().map_err(FamilyError::setup)?;
    let buf = Arc::new(HostRegion::new(bytes).map_err(FamilyError::setup)?);
    real.adopt(Arc::clone(&buf));
    Ok((real, buf))
}

/// kvmmu's side of a run: its host, the VM on it with one vCPU, and the host buffer.
pub struct SimSide {
    // Field order is drop order: the vCPU, then the VM, then the host it runs on.
    /// The VM's vCPU.
    pub vcpu: Vcpu,
    /// The VM.
    pub vm: Vm,
    /// The simulated host.
    pub host: HostMm,
    /// The host buffer, mapped read-write.
    pub buf: Hva,
}

impl SimSide {
    /// A host of `frames` frames, a VM with `mmu` on it (`prepare` runs before its vCPU is
    /// created), and a read-write buffer of `bytes` bytes.
    pub fn new(
        mmu: MmuKind,
        frames: usize,
        bytes: u64,
        prepare: impl FnOnce(&Vm) -> Result<(), FamilyError>,
    ) -> Result<SimSide, FamilyError> {
        let host = HostMm::new(HostConfig { frames }).map_err(FamilyError::setup)?;
        let vm = Vm::new(
            &host,
            VmConfig {
                mmu,
                ..VmConfig::default()
            },
        )
        .map_err(FamilyError::setup)?;
        prepare(&vm)?;
        let vcpu = vm.create_vcpu().map_err(FamilyError::setup)?;
        let buf = host
            .mmap(bytes, Prot::READ | Prot::WRITE)
            .map_err(FamilyError::setup)?;
        Ok(SimSide {
            vcpu,
            vm,
            host,
            buf,
        })
    }
}
