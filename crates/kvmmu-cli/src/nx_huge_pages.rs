//! `kvmmu nx-huge-pages`: KVM's `x86/nx_huge_pages_test` on kvmmu.
//!
//! Protocol (the selftest's): a memslot of three 2M hugetlb pages, filled with the `RET` opcode
//! (0xc3) at the start of every page, and a guest that runs six steps — read hpage 1, read hpage 2, execute hpage 1,
//! execute hpage 3, read hpage 1 again, then (after NX huge page recovery) read hpage 3. After
//! each step the VM's `(pages_2m, nx_lpage_splits)` must be, with the mitigation on,
//! `(1,0) (2,0) (1,1) (1,2) (1,2)`, `(1,0)` after recovery and `(2,0)` after the final read; with
//! `--disable-nx-huge-pages` the fetches keep their huge leaves: `(1,0) (2,0) (2,0) (3,0) (3,0)`,
//! then `(3,0)` and `(3,0)`. Recovery runs with ratio 1 (every split is zapped), once on demand,
//! or with `--worker` from the background worker every `-p` milliseconds. The run stops at the
//! first step whose counts differ, as the selftest's assertion does, so a failure is one line
//! (e.g. with `--no-recovery`, which sets the recovery ratio to 0).

use crate::report::Report;
use crate::{MmuArg, OutputArgs, vm_config};
use clap::Args;
use kvmmu::prelude::*;
use std::time::{Duration, Instant};

/// Guest physical address of the huge page memslot (the selftest's `HPAGE_GPA`, 4G).
const HPAGE_GPA: u64 = 4 << 30;
/// The memslot (the selftest's `HPAGE_SLOT`).
const HPAGE_SLOT: u16 = 10;
/// Bytes of one 2M huge page.
const HPAGE_SIZE: u64 = 2 << 20;
/// The three huge pages' bytes.
const SLOT_BYTES: u64 = 3 * HPAGE_SIZE;
/// Host frames: the guest's 1536 and the arena's alignment slack for 2M runs.
const HOST_FRAMES: usize = 4096;
/// The `RET` opcode the selftest fills guest memory with, as one word.
const RETURN_WORD: u64 = 0xc3c3_c3c3_c3c3_c3c3;

/// Options of `nx-huge-pages`.
#[derive(Debug, Clone, Args)]
pub struct NxHugePagesArgs {
    /// Which MMU maps guest memory.
    #[arg(long, value_enum, default_value_t = MmuArg::Tdp)]
    pub mmu: MmuArg,

    /// Turn the NX huge pages mitigation off (`KVM_CAP_VM_DISABLE_NX_HUGE_PAGES`): executed huge
    /// pages stay huge, nothing is split.
    #[arg(short = 'x', long)]
    pub disable_nx_huge_pages: bool,

    /// Disable NX huge page recovery (ratio 0): the splits stay and the run fails its
    /// after-recovery step.
    #[arg(long)]
    pub no_recovery: bool,

    /// Recover with the background worker (every `-p` ms) instead of one round on demand.
    #[arg(long)]
    pub worker: bool,

    /// The worker's period in milliseconds (`nx_huge_pages_recovery_period_ms`).
    #[arg(short = 'p', long, default_value_t = 100)]
    pub reclaim_period_ms: u64,
}

/// `nx-huge-pages` with its output options.
#[derive(Debug, Clone, Args)]
pub struct NxHugePagesCommand {
    /// The workload.
    #[command(flatten)]
    pub args: NxHugePagesArgs,
    /// Output.
    #[command(flatten)]
    pub out: OutputArgs,
}

/// One guest step: what it does and the counts expected after it (mitigation on, off).
struct Step {
    name: &'static str,
    run: fn(&mut Vcpu) -> Result<u64, VcpuExit>,
    on: (u64, u64),
    off: (u64, u64),
}

fn hpage(i: u64) -> Gpa {
    Gpa::new(HPAGE_GPA + i * HPAGE_SIZE)
}

const STEPS: [Step; 5] = [
    Step {
        name: "read hpage 1",
        run: |v| v.read_u64(hpage(0)),
        on: (1, 0),
        off: (1, 0),
    },
    Step {
        name: "read hpage 2",
        run: |v| v.read_u64(hpage(1)),
        on: (2, 0),
        off: (2, 0),
    },
    Step {
        name: "execute hpage 1",
        run: |v| v.fetch_u64(hpage(0)),
        on: (1, 1),
        off: (2, 0),
    },
    Step {
        name: "execute hpage 3",
        run: |v| v.fetch_u64(hpage(2)),
        on: (1, 2),
        off: (3, 0),
    },
    Step {
        name: "read hpage 1 again",
        run: |v| v.read_u64(hpage(0)),
        on: (1, 2),
        off: (3, 0),
    },
];

/// The final step, after recovery.
const FINAL: Step = Step {
    name: "read hpage 3",
    run: |v| v.read_u64(hpage(2)),
    on: (2, 0),
    off: (3, 0),
};

fn counts(vm: &Vm) -> (u64, u64) {
    let s = vm.stats();
    (s.pages_2m, s.nx_lpage_splits)
}

/// Records the counts check of `what` (and the counts under `key`: `KEY_pages_2m`,
/// `KEY_nx_lpage_splits`); false if they differ (the run then stops).
fn expect(r: &mut Report, what: &str, key: &str, got: (u64, u64), want: (u64, u64)) -> bool {
    r.counts.insert(format!("{key}_pages_2m"), got.0);
    r.counts.insert(format!("{key}_nx_lpage_splits"), got.1);
    let mut detail = format!("(pages_2m, nx_lpage_splits) = ({}, {})", got.0, got.1);
    if got != want {
        detail.push_str(&format!(", expected ({}, {})", want.0, want.1));
    }
    r.require(what, got == want, detail);
    got == want
}

/// Runs the test and returns its report (failed checks make `passed` false).
pub fn run(a: &NxHugePagesArgs) -> anyhow::Result<Report> {
    crate::error::require(a.reclaim_period_ms >= 1, || {
        format!(
            "-p/--reclaim-period-ms must be at least 1 (got {})",
            a.reclaim_period_ms
        )
    })?;
    let nx = !a.disable_nx_huge_pages;
    let ratio = if a.no_recovery { 0 } else { 1 };
    let mut r = Report::new("nx-huge-pages");
    r.config("mmu", a.mmu);
    r.config("nx_huge_pages", nx);
    r.config("nx_huge_pages_recovery_ratio", ratio);
    r.config("recovery", if a.worker { "worker" } else { "on demand" });
    if a.worker {
        r.config("nx_huge_pages_recovery_period_ms", a.reclaim_period_ms);
    }
    r.config("backing_src", BackingSrc::AnonymousHugetlb2M.name());

    let host = HostMm::new(HostConfig {
        frames: HOST_FRAMES,
    })?;
    let vm = Vm::new(
        &host,
        VmConfig {
            nx_huge_pages: nx,
            nx_huge_pages_recovery_ratio: ratio,
            nx_huge_pages_recovery_period_ms: a.reclaim_period_ms,
            ..vm_config(a.mmu, crate::AgingArg::Lockless, 2048)
        },
    )?;
    let hva = host.mmap_backed(
        SLOT_BYTES,
        Prot::READ | Prot::WRITE,
        BackingSrc::AnonymousHugetlb2M,
    )?;
    // The first word of every 4K page holds the opcode (the steps touch only those words).
    for off in (0..SLOT_BYTES).step_by(4096) {
        let at = hva
            .checked_add(off)
            .ok_or_else(|| anyhow::anyhow!("the mapping's addresses overflow"))?;
        host.write_u64(at, RETURN_WORD)?;
    }
    vm.set_user_memory_region(MemoryRegion {
        slot: SlotId::new(HPAGE_SLOT),
        as_id: AsId::new(0),
        flags: MemFlags::empty(),
        gpa: Gpa::new(HPAGE_GPA),
        size: SLOT_BYTES,
        hva,
    })?;
    let mut v = vm.create_vcpu()?;
    let pick = |s: &Step| if nx { s.on } else { s.off };

    let mut bad_words = Vec::new();
    if !expect(&mut r, "VM created", "created", counts(&vm), (0, 0)) {
        return finish(r, &vm);
    }
    for (i, s) in STEPS.iter().enumerate() {
        let t = Instant::now();
        let word = (s.run)(&mut v)?;
        r.phase(format!("step {}: {}", i + 1, s.name), t.elapsed());
        if word != RETURN_WORD {
            bad_words.push(format!("step {}: {word:#x}", i + 1));
        }
        let what = format!("step {}: {}", i + 1, s.name);
        let key = format!("step{}", i + 1);
        if !expect(&mut r, &what, &key, counts(&vm), pick(s)) {
            return finish(r, &vm);
        }
    }

    let t = Instant::now();
    let recovered = if a.worker {
        recover_with_worker(&vm, a.reclaim_period_ms)?
    } else {
        vm.recover_nx_huge_pages()
    };
    r.phase("recovery", t.elapsed());
    if !a.worker {
        r.counts.insert("recovered_tables".into(), recovered);
    }
    let after_recovery = if nx { (1, 0) } else { (3, 0) };
    if !expect(
        &mut r,
        "NX huge page recovery",
        "recovery",
        counts(&vm),
        after_recovery,
    ) {
        return finish(r, &vm);
    }

    let t = Instant::now();
    let word = (FINAL.run)(&mut v)?;
    r.phase(format!("step 6: {}", FINAL.name), t.elapsed());
    if word != RETURN_WORD {
        bad_words.push(format!("step 6: {word:#x}"));
    }
    expect(
        &mut r,
        &format!("step 6: {}", FINAL.name),
        "step6",
        counts(&vm),
        pick(&FINAL),
    );
    r.require(
        "every step read the RET opcode the host wrote",
        bad_words.is_empty(),
        if bad_words.is_empty() {
            format!("{RETURN_WORD:#x}")
        } else {
            bad_words.join(", ")
        },
    );
    finish(r, &vm)
}

/// Starts the background worker and waits (bounded: 20 periods, at least 2 s) until no split is
/// left; returns 0 (the worker does not report its rounds). Without recovery the wait ends at
/// the bound and the caller's check fails.
fn recover_with_worker(vm: &Vm, period_ms: u64) -> anyhow::Result<u64> {
    let worker = vm.spawn_nx_recovery_worker()?;
    let bound = Duration::from_millis(period_ms.saturating_mul(20)).max(Duration::from_secs(2));
    let start = Instant::now();
    if worker.is_some() {
        while vm.stats().nx_lpage_splits != 0 && start.elapsed() < bound {
            std::thread::sleep(Duration::from_millis(period_ms.clamp(1, 10)));
        }
    }
    drop(worker);
    Ok(0)
}

fn finish(mut r: Report, vm: &Vm) -> anyhow::Result<Report> {
    let s = vm.stats();
    r.counts.extend(crate::vm_counts(&s));
    Ok(r)
}

/// `kvmmu nx-huge-pages`.
pub fn main(cmd: &NxHugePagesCommand) -> anyhow::Result<()> {
    crate::report::check_output(&cmd.out)?;
    let r = run(&cmd.args)?;
    crate::report::emit(&r, &cmd.out)
}
