//! Running guest code on every vCPU at once, and timing a phase where its work happens.
//!
//! Protocol: every thread that does a phase's work reads the clock itself, right before its first
//! access and right after its last (a [`Span`]); the phase lasts from the earliest start to the
//! latest end ([`PhaseTime::from_spans`]). A coordinating thread never times the phase: if it were
//! descheduled between the start barrier and its clock read, the vCPUs could be done before it
//! started timing, and a phase of 16,384 faults would print as a microsecond.
//!
//! Invariant: a phase's wall time is never shorter than any of its threads' own spans (each span
//! lies inside `[earliest start, latest end]`); `tests/phase_timing.rs` checks it under a CPU hog.

use anyhow::{Context, bail};
use kvmmu::prelude::Vcpu;
use std::sync::Barrier;
use std::time::{Duration, Instant};

/// Where one thread's share of a phase started and ended, both read on that thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    /// Read right before the thread's first piece of work.
    pub start: Instant,
    /// Read right after its last.
    pub end: Instant,
}

impl Span {
    /// Runs `f` on the calling thread and returns its result with the span it took.
    pub fn measure<T>(f: impl FnOnce() -> T) -> (T, Span) {
        let start = Instant::now();
        let r = f();
        (
            r,
            Span {
                start,
                end: Instant::now(),
            },
        )
    }

    /// The span's length.
    pub fn duration(&self) -> Duration {
        self.end.saturating_duration_since(self.start)
    }
}

/// A phase's timing: the wall time from the earliest start to the latest end of its threads, and
/// each thread's own span length.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PhaseTime {
    /// Earliest start to latest end.
    pub wall: Duration,
    /// Each thread's own work, in thread order.
    pub per_thread: Vec<Duration>,
}

impl PhaseTime {
    /// The phase made of `spans` (zero when there are none).
    pub fn from_spans(spans: &[Span]) -> PhaseTime {
        let start = spans.iter().map(|s| s.start).min();
        let end = spans.iter().map(|s| s.end).max();
        PhaseTime {
            wall: match (start, end) {
                (Some(s), Some(e)) => e.saturating_duration_since(s),
                _ => Duration::ZERO,
            },
            per_thread: spans.iter().map(Span::duration).collect(),
        }
    }

    /// A phase done by the calling thread alone.
    pub fn single(span: Span) -> PhaseTime {
        PhaseTime::from_spans(&[span])
    }
}

/// Runs `f` on every vCPU in its own thread, all released together by a barrier once every thread
/// is running (memstress: thread creation must not disturb the measured phase); each vCPU thread
/// times its own work, and the phase is the earliest start to the latest finish.
pub fn run_vcpus(
    vcpus: &mut [Vcpu],
    f: impl Fn(usize, &mut Vcpu) -> anyhow::Result<()> + Sync,
) -> anyhow::Result<PhaseTime> {
    let barrier = Barrier::new(vcpus.len());
    std::thread::scope(|s| {
        let handles: Vec<_> = vcpus
            .iter_mut()
            .enumerate()
            .map(|(i, v)| {
                let (f, barrier) = (&f, &barrier);
                spawn_named(s, format!("vcpu-{i}"), move || {
                    barrier.wait();
                    Span::measure(|| f(i, v))
                })
            })
            .collect();
        let mut first_err = None;
        let mut spans = Vec::with_capacity(handles.len());
        for (i, h) in handles.into_iter().enumerate() {
            let r = match h.join() {
                Ok((r, span)) => {
                    spans.push(span);
                    r.with_context(|| format!("vCPU {i}"))
                }
                Err(_) => Err(anyhow::anyhow!("vCPU {i} panicked")),
            };
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            Some(e) => bail!(e),
            None => Ok(PhaseTime::from_spans(&spans)),
        }
    })
}

/// Spawns a scoped thread named `name` (the name shows in `--trace`'s tracks and in debuggers).
///
/// # Panics
/// If the OS cannot create the thread, as `std::thread::Scope::spawn` does.
pub fn spawn_named<'scope, 'env, T: Send + 'scope>(
    s: &'scope std::thread::Scope<'scope, 'env>,
    name: String,
    f: impl FnOnce() -> T + Send + 'scope,
) -> std::thread::ScopedJoinHandle<'scope, T> {
    std::thread::Builder::new()
        .name(name)
        .spawn_scoped(s, f)
        .expect("failed to spawn thread")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_covers_every_span_from_earliest_start_to_latest_end() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let spans = [
            Span {
                start: at(5),
                end: at(20),
            },
            Span {
                start: at(0),
                end: at(10),
            },
        ];
        let p = PhaseTime::from_spans(&spans);
        assert_eq!(p.wall, Duration::from_millis(20));
        assert_eq!(
            p.per_thread,
            [Duration::from_millis(15), Duration::from_millis(10)]
        );
        assert!(p.per_thread.iter().all(|d| *d <= p.wall));
        assert_eq!(PhaseTime::from_spans(&[]).wall, Duration::ZERO);
    }
}
