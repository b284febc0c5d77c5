//! The guest accesses the data and dirty-logging families share, and the one executor that runs an
//! access on both sides: the real vCPU through the guest's routines, kvmmu's vCPU directly. Each
//! family keeps its own rule for when the two [`Answer`]s agree.

use kvmmu::{Gpa, Vcpu, VcpuExit};

use super::FamilyError;
use crate::guest::{self, Routine};
use crate::runner::{KvmExit, KvmVm, RunOutcome};

/// A guest access.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestAccess {
    /// Guest write of `value` at `gpa` (`Routine::Store`).
    Write {
        /// Address.
        gpa: u64,
        /// Value.
        value: u64,
    },
    /// Guest read at `gpa` (`Routine::Load`).
    Read {
        /// Address.
        gpa: u64,
    },
    /// Guest writes `base + i` at `gpas[i]`, in order, stopping at the first exit
    /// (`Routine::StoreList`).
    Batch {
        /// Addresses.
        gpas: Vec<u64>,
        /// Value of the first write.
        base: u64,
    },
}

impl GuestAccess {
    /// The addresses it writes (none for a read).
    pub fn written(&self) -> &[u64] {
        match self {
            GuestAccess::Write { gpa, .. } => std::slice::from_ref(gpa),
            GuestAccess::Read { .. } => &[],
            GuestAccess::Batch { gpas, .. } => gpas,
        }
    }

    /// How many accesses it makes.
    pub fn len(&self) -> usize {
        match self {
            GuestAccess::Write { .. } | GuestAccess::Read { .. } => 1,
            GuestAccess::Batch { gpas, .. } => gpas.len(),
        }
    }

    /// Whether it makes no access (an empty batch).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One side's answer to a [`GuestAccess`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer<X> {
    /// Accesses that completed before the one that exited (all of them when none did).
    pub done: usize,
    /// The value a completed read returned.
    pub value: Option<u64>,
    /// How it ended: kvmmu's exit (`None` when every access completed), or the real run's exit
    /// (`KvmExit::Hlt` when it completed).
    pub exit: X,
}

/// kvmmu's answer.
pub type SimAnswer = Answer<Option<VcpuExit>>;

/// The real vCPU's answer, with the registers it ended with.
#[derive(Clone, Debug)]
pub struct KvmAnswer {
    /// Completed accesses, read value and exit, as kvmmu's.
    pub answer: Answer<KvmExit>,
    /// The run it came from.
    pub run: RunOutcome,
}

impl SimAnswer {
    /// Whether every access completed.
    pub fn completed(&self) -> bool {
        self.exit.is_none()
    }

    /// The answer for a divergence report: a single access as its `Result`, a batch as where it
    /// stopped.
    pub fn describe(&self, access: &GuestAccess) -> String {
        match (access, &self.exit) {
            (GuestAccess::Batch { .. }, exit) => {
                format!("stopped at {} with {exit:?}", self.done)
            }
            (_, Some(e)) => format!("Err({e:?})"),
            (GuestAccess::Read { .. }, None) => format!("Ok({:#x})", self.value.unwrap_or(0)),
            (GuestAccess::Write { .. }, None) => "Ok(())".into(),
        }
    }
}

impl KvmAnswer {
    /// Whether every access completed (the routine reached its `hlt`).
    pub fn completed(&self) -> bool {
        self.answer.exit == KvmExit::Hlt
    }

    /// The answer for a divergence report.
    pub fn describe(&self) -> String {
        format!(
            "{:?} rax {:#x} rcx {}",
            self.answer.exit, self.run.regs.rax, self.run.regs.rcx
        )
    }
}

/// Runs `access` on the real vCPU.
pub fn run_kvm(real: &mut KvmVm, access: &GuestAccess) -> Result<KvmAnswer, FamilyError> {
    let run = match access {
        GuestAccess::Write { gpa, value } => real.run(Routine::Store, *gpa, *value, 0),
        GuestAccess::Read { gpa } => real.run(Routine::Load, *gpa, 0, 0),
        GuestAccess::Batch { gpas, base } => {
            real.set_list(gpas).map_err(FamilyError::setup)?;
            real.run(
                Routine::StoreList,
                guest::RESERVED_GPA + guest::LIST_OFFSET,
                *base,
                gpas.len() as u64,
            )
        }
    }
    .map_err(FamilyError::setup)?;
    let completed = run.exit == KvmExit::Hlt;
    let done = match access {
        _ if completed => access.len(),
        // StoreList counts its completed writes in rcx.
        GuestAccess::Batch { .. } => run.regs.rcx as usize,
        _ => 0,
    };
    let value = match access {
        GuestAccess::Read { .. } if completed => Some(run.regs.rax),
        _ => None,
    };
    Ok(KvmAnswer {
        answer: Answer {
            done,
            value,
            exit: run.exit.clone(),
        },
        run,
    })
}

/// Runs `access` on kvmmu's vCPU.
pub fn run_sim(vcpu: &mut Vcpu, access: &GuestAccess) -> SimAnswer {
    let (done, value, exit) = match access {
        GuestAccess::Write { gpa, value } => match vcpu.write_u64(Gpa::new(*gpa), *value) {
            Ok(()) => (1, None, None),
            Err(e) => (0, None, Some(e)),
        },
        GuestAccess::Read { gpa } => match vcpu.read_u64(Gpa::new(*gpa)) {
            Ok(v) => (1, Some(v), None),
            Err(e) => (0, None, Some(e)),
        },
        GuestAccess::Batch { gpas, base } => {
            let mut stop = (gpas.len(), None);
            for (i, g) in gpas.iter().enumerate() {
                if let Err(e) = vcpu.write_u64(Gpa::new(*g), base + i as u64) {
                    stop = (i, Some(e));
                    break;
                }
            }
            (stop.0, None, stop.1)
        }
    };
    Answer { done, value, exit }
}

/// Runs `access` on the real vCPU, then on kvmmu's.
pub fn run_both(
    real: &mut KvmVm,
    vcpu: &mut Vcpu,
    access: &GuestAccess,
) -> Result<(SimAnswer, KvmAnswer), FamilyError> {
    let k = run_kvm(real, access)?;
    Ok((run_sim(vcpu, access), k))
}
