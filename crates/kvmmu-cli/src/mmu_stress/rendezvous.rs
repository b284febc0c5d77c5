//! The meeting points of `kvmmu mmu-stress` (the selftest's rendezvous) and the stage times read
//! from when each participant arrived at and left them.

use super::{MAX_WAIT_MS, Shared};
use crate::vcpus::{PhaseTime, Span};
use anyhow::{anyhow, bail};
use std::sync::atomic::Ordering;
use std::sync::{Condvar, Mutex};
use std::time::Duration;
use std::time::Instant;

/// A rendezvous of `parties` threads that any party can abort (so a failing vCPU never leaves the
/// others waiting): the selftest's sign-flipping counter, with a condition variable.
pub(super) struct Rendezvous {
    parties: usize,
    state: Mutex<(u64, usize, bool)>,
    cv: Condvar,
}

impl Rendezvous {
    pub(super) fn new(parties: usize) -> Rendezvous {
        Rendezvous {
            parties,
            state: Mutex::new((0, 0, false)),
            cv: Condvar::new(),
        }
    }

    pub(super) fn wait(&self) -> anyhow::Result<()> {
        let mut s = self
            .state
            .lock()
            .map_err(|_| anyhow!("rendezvous poisoned"))?;
        if s.2 {
            bail!("aborted: another thread failed");
        }
        let generation = s.0;
        s.1 += 1;
        if s.1 == self.parties {
            s.0 += 1;
            s.1 = 0;
            self.cv.notify_all();
            return Ok(());
        }
        while s.0 == generation && !s.2 {
            s = self
                .cv
                .wait(s)
                .map_err(|_| anyhow!("rendezvous poisoned"))?;
        }
        if s.0 == generation {
            bail!("aborted: another thread failed");
        }
        Ok(())
    }

    /// [`Rendezvous::wait`], recording on the calling thread when it arrived and when it left.
    pub(super) fn wait_marked(&self, marks: &mut Vec<Span>) -> anyhow::Result<()> {
        let start = Instant::now();
        self.wait()?;
        marks.push(Span {
            start,
            end: Instant::now(),
        });
        Ok(())
    }

    pub(super) fn is_aborted(&self) -> bool {
        self.state.lock().map_or(true, |s| s.2)
    }

    pub(super) fn abort(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.2 = true;
        }
        self.cv.notify_all();
    }
}

/// Aborts the rendezvous when dropped unless disarmed: covers early returns and panics.
pub(super) struct AbortOnDrop<'a>(pub(super) &'a Rendezvous, pub(super) bool);

impl Drop for AbortOnDrop<'_> {
    fn drop(&mut self) {
        if !self.1 {
            self.0.abort();
        }
    }
}

/// The stages between consecutive rendezvous: stage `k` runs from the earliest time a participant
/// left rendezvous `k` to the latest time one arrived at rendezvous `k + 1`, every instant read by
/// the participant itself; each participant's own share is its leave-to-arrive interval.
pub(super) fn stage_times(marks: &[Vec<Span>], stages: usize) -> Vec<PhaseTime> {
    (0..stages)
        .map(|k| {
            let spans: Vec<Span> = marks
                .iter()
                .filter_map(|m| {
                    Some(Span {
                        start: m.get(k)?.end,
                        end: m.get(k + 1)?.start,
                    })
                })
                .collect();
            PhaseTime::from_spans(&spans)
        })
        .collect()
}

/// Waits (sleeping, bounded by [`MAX_WAIT_MS`] iterations) until every vCPU saw the EFAULT exit.
pub(super) fn wait_all_hit(i: usize, sh: &Shared, rv: &Rendezvous) -> anyhow::Result<()> {
    for _ in 0..MAX_WAIT_MS {
        // ORDERING: Acquire pairs with the Release of the last vCPU to hit the fault.
        if sh.all_hit_ro.load(Ordering::Acquire) {
            return Ok(());
        }
        if rv.is_aborted() {
            bail!("aborted: another thread failed");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    bail!(
        "check 'every vCPU sees the EFAULT exit' failed: vCPU {i} waited {MAX_WAIT_MS} ms after \
         its own; {} of {} vCPUs hit it",
        sh.nr_ro_faults.load(Ordering::Acquire),
        sh.vcpus
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendezvous_abort_releases_waiters() {
        let rv = Rendezvous::new(3);
        std::thread::scope(|s| {
            let h = s.spawn(|| rv.wait());
            // Aborting while one party waits must wake it with an error.
            for _ in 0..1_000_000 {
                if rv.state.lock().unwrap().1 == 1 {
                    break;
                }
                std::thread::yield_now();
            }
            rv.abort();
            assert!(h.join().unwrap().is_err());
        });
    }
}
