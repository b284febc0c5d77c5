//! NX huge page recovery at the VM level (`kvm_nx_huge_page_recovery_worker`): one round on
//! demand ([`Vm::recover_nx_huge_pages`]) and an optional background worker that runs a round
//! every period ([`Vm::spawn_nx_recovery_worker`]). The mechanism is in `mmu/nx_huge.rs`.

#[cfg(not(feature = "shuttle"))]
use core::time::Duration;

use crate::sync::guest_mode;
#[cfg(not(feature = "shuttle"))]
use crate::sync::{Arc, Condvar, Mutex, Weak};
use crate::vm::memslot::Memslots;
use crate::vm::{Vm, VmInner};

impl VmInner {
    /// One recovery round with `ratio` (module doc); 0 once the VM is dead.
    fn recover_nx_round(&self, ratio: u32) -> u64 {
        // The memslot sets (for shadow rmaps) are loaded after `mmu_lock` is taken, as a reset
        // loads them (shadow S6).
        let srcu = self.srcu_read();
        let mut mmu = self.mmu_lock.write();
        if self.dead.load(crate::sync::atomic::Ordering::Acquire) {
            return 0;
        }
        let sets: Vec<&Memslots> = self.memslots.iter().map(|c| c.load(&srcu)).collect();
        let n = self
            .mmu
            .recover_nx_huge_pages(&mut mmu, sets.as_slice(), ratio, self);
        drop(mmu);
        n
    }

    /// The worker's period (`calc_nx_huge_pages_recovery_period`): the configured period, or
    /// one hour divided by the ratio; `None` when the mitigation or recovery is off.
    #[cfg(not(feature = "shuttle"))]
    fn nx_recovery_period(&self) -> Option<Duration> {
        let c = &self.config;
        if !c.nx_huge_pages || c.nx_huge_pages_recovery_ratio == 0 {
            return None;
        }
        let ms = match c.nx_huge_pages_recovery_period_ms {
            0 => 3_600_000 / u64::from(c.nx_huge_pages_recovery_ratio),
            ms => ms,
        };
        Some(Duration::from_millis(ms.max(1)))
    }
}

impl Vm {
    /// Runs one NX huge page recovery round now (`kvm_recover_nx_huge_pages`): the tables of the
    /// oldest `ceil(nx_lpage_splits / ratio)` splits the mitigation caused are zapped, so those
    /// ranges fault huge again. Returns the number of tables zapped; 0 if the mitigation is off
    /// (`VmConfig::nx_huge_pages`) or the ratio is 0 (recovery disabled).
    ///
    /// # Panics
    /// From a thread that holds a vCPU in guest mode (it takes `mmu_lock` and flushes), before
    /// anything changed.
    pub fn recover_nx_huge_pages(&self) -> u64 {
        guest_mode::refuse("Vm::recover_nx_huge_pages");
        let c = &self.inner().config;
        if !c.nx_huge_pages {
            return 0;
        }
        self.inner()
            .recover_nx_round(c.nx_huge_pages_recovery_ratio)
    }

    /// Starts the background recovery worker: a thread that runs a round
    /// ([`Vm::recover_nx_huge_pages`]) every `nx_huge_pages_recovery_period_ms` (or one hour /
    /// ratio). `None` if the mitigation or recovery is off. The worker holds no reference that
    /// keeps the VM alive; it stops when the handle is dropped or the VM is gone.
    ///
    /// Errors: the thread could not be spawned. (Not built with feature `shuttle`, whose
    /// condition variables have no timed wait.)
    #[cfg(not(feature = "shuttle"))]
    pub fn spawn_nx_recovery_worker(&self) -> std::io::Result<Option<NxRecoveryWorker>> {
        let Some(period) = self.inner().nx_recovery_period() else {
            return Ok(None);
        };
        let ratio = self.inner().config.nx_huge_pages_recovery_ratio;
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let weak: Weak<VmInner> = Arc::downgrade(self.inner());
        let stop2 = Arc::clone(&stop);
        let handle = std::thread::Builder::new()
            .name("kvm-nx-lpage-recovery".into())
            .spawn(move || {
                let (flag, cv) = &*stop2;
                loop {
                    {
                        let mut stopped = flag.lock();
                        if !*stopped {
                            let _ = cv.wait_for(&mut stopped, period);
                        }
                        if *stopped {
                            return;
                        }
                    }
                    let Some(vm) = weak.upgrade() else { return };
                    let _ = vm.recover_nx_round(ratio);
                }
            })?;
        Ok(Some(NxRecoveryWorker {
            stop,
            handle: Some(handle),
        }))
    }
}

/// The background NX huge page recovery worker ([`Vm::spawn_nx_recovery_worker`]); dropping it
/// stops and joins the thread.
#[derive(Debug)]
#[cfg(not(feature = "shuttle"))]
pub struct NxRecoveryWorker {
    stop: Arc<(Mutex<bool>, Condvar)>,
    handle: Option<std::thread::JoinHandle<()>>,
}

#[cfg(not(feature = "shuttle"))]
impl Drop for NxRecoveryWorker {
    fn drop(&mut self) {
        *self.stop.0.lock() = true;
        self.stop.1.notify_all();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
