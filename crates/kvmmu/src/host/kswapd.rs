//! kswapd: the background reclaimer of a host under a memory limit (`mm/vmscan.c`'s `kswapd`).
//!
//! Protocol: the thread sleeps on a condition variable until a charge takes the host above the
//! high watermark (`Reclaim::try_charge` wakes it, see the wake-up handshake in
//! `docs/invariants.md`, "kswapd wake-up"); then, while the charge is above the low watermark, it
//! ages when fewer than [`MAX_NR_GENS`] generations exist and evicts a batch of
//! [`SWAP_CLUSTER_MAX`] pages from the oldest generation. A round that evicts nothing (swap full,
//! nothing evictable) sends it back to sleep until the next wake-up instead of spinning.
//! Dropping the [`Kswapd`] handle stops and joins the thread.

use super::ReclaimError;
use super::mm::HostMm;
use super::reclaim::{MAX_NR_GENS, Reclaim, SWAP_CLUSTER_MAX, bump};
use crate::sync::atomic::Ordering;

impl HostMm {
    /// Starts this host's kswapd thread (module doc); it stops when the handle is dropped.
    ///
    /// Errors: [`ReclaimError::NotEnabled`], [`ReclaimError::KswapdRunning`],
    /// [`ReclaimError::Spawn`].
    pub fn spawn_kswapd(&self) -> Result<Kswapd, ReclaimError> {
        let r = &self.inner.reclaim;
        if r.active.get().is_none() {
            return Err(ReclaimError::NotEnabled);
        }
        {
            let mut st = r.kswapd.lock();
            if st.running {
                return Err(ReclaimError::KswapdRunning);
            }
            st.running = true;
            st.stop = false;
        }
        let host = self.clone();
        let spawned = std::thread::Builder::new()
            .name("kswapd".into())
            .spawn(move || host.kswapd_main());
        match spawned {
            Ok(handle) => Ok(Kswapd {
                host: self.clone(),
                handle: Some(handle),
            }),
            Err(e) => {
                r.kswapd.lock().running = false;
                Err(ReclaimError::Spawn(e))
            }
        }
    }

    fn kswapd_main(&self) {
        let r = &self.inner.reclaim;
        let Some(a) = r.active.get() else { return };
        let (high, low) = Reclaim::watermarks(a.cfg.limit_frames);
        // Set when a round evicted nothing: sleep until the next wake-up even above the high
        // watermark, instead of spinning on a memory that cannot shrink.
        let mut stalled = false;
        loop {
            {
                let mut st = r.kswapd.lock();
                loop {
                    if st.stop {
                        return;
                    }
                    // ORDERING: SeqCst: the wake-up handshake of `try_charge`: clear the flag,
                    // then look at the charge; a charger bumps the charge, then sets the flag.
                    r.wake_pending.store(false, Ordering::SeqCst);
                    if r.over(high) && !stalled {
                        break;
                    }
                    stalled = false;
                    r.kswapd_cv.wait(&mut st);
                }
            }
            bump(&r.wakeups, 1);
            while r.over(low) {
                if r.kswapd.lock().stop {
                    return;
                }
                let (min, max) = a.gens.seqs();
                if max + 1 - min < MAX_NR_GENS {
                    self.age_generations(a);
                }
                if self.evict_batch(a, SWAP_CLUSTER_MAX) == 0 {
                    stalled = true;
                    break;
                }
            }
        }
    }
}

/// A running kswapd thread; dropping the handle stops and joins it.
pub struct Kswapd {
    host: HostMm,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl core::fmt::Debug for Kswapd {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Kswapd").finish_non_exhaustive()
    }
}

impl Drop for Kswapd {
    fn drop(&mut self) {
        let r = &self.host.inner.reclaim;
        {
            let mut st = r.kswapd.lock();
            st.stop = true;
            r.kswapd_cv.notify_all();
        }
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        r.kswapd.lock().running = false;
    }
}
