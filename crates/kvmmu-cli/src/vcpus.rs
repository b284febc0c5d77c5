//! Running guest code on every vCPU at once.

use anyhow::{Context, bail};
use kvmmu::prelude::Vcpu;
use std::sync::Barrier;
use std::time::{Duration, Instant};

/// Runs `f` on every vCPU in its own thread, all released together by a barrier once every thread
/// is running (memstress: thread creation must not disturb the measured phase); returns the wall
/// time from the release to the last vCPU's finish.
pub fn run_vcpus(
    vcpus: &mut [Vcpu],
    f: impl Fn(usize, &mut Vcpu) -> anyhow::Result<()> + Sync,
) -> anyhow::Result<Duration> {
    let barrier = Barrier::new(vcpus.len() + 1);
    std::thread::scope(|s| {
        let handles: Vec<_> = vcpus
            .iter_mut()
            .enumerate()
            .map(|(i, v)| {
                let (f, barrier) = (&f, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    f(i, v)
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        let mut first_err = None;
        for (i, h) in handles.into_iter().enumerate() {
            let r = match h.join() {
                Ok(r) => r.with_context(|| format!("vCPU {i}")),
                Err(_) => Err(anyhow::anyhow!("vCPU {i} panicked")),
            };
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            Some(e) => bail!(e),
            None => Ok(start.elapsed()),
        }
    })
}
