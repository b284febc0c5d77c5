//! `--trace FILE`: the run as a Chrome trace-event JSON file (loads in Perfetto, `ui.perfetto.dev`,
//! and `chrome://tracing`), one track per thread.
//!
//! The library marks its interesting stretches with `tracing` spans: `vcpu_exit` (a vCPU out of
//! guest mode) and `page_fault` inside it, `age_hva_range` / `age_hva_range_bitmap` (aging
//! calls), `invalidate_range_start` / `invalidate_range_end`, `mmu_lock_read_wait` /
//! `mmu_lock_write_wait` (only when the lock was contended) and `mmu_lock_read` /
//! `mmu_lock_write` (holds), `flush_remote_tlbs` and `swap_memslots`. Without a subscriber each
//! of those costs one relaxed load; with `--trace` this module is the subscriber. It records each
//! span as one complete event (`"ph": "X"`, start and duration in microseconds) into a buffer
//! owned by the thread that ran it (no lock shared between threads while the run goes on), and
//! writes every buffer out when the run ends, with a `thread_name` record per thread.
//!
//! A thread keeps at most [`MAX_EVENTS_PER_THREAD`] events (the rest are counted in
//! `otherData.dropped_events`), so a long run cannot fill the machine's memory.

use serde_json::{Map, Value};
use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;
use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::{Interest, Subscriber};
use tracing::{Event, Metadata};

/// The most events one thread records; later ones are counted, not kept.
pub const MAX_EVENTS_PER_THREAD: usize = 1_000_000;

/// A trace being recorded: created by [`start`], written by [`Trace::finish`].
#[derive(Debug)]
pub struct Trace {
    collector: Arc<Collector>,
    path: PathBuf,
}

/// Checks `path` (as `--trace`, before the run) and starts recording every thread's spans.
///
/// Errors: a path the run could not write (a usage error); a second trace in one process (the
/// subscriber is process-wide).
pub fn start(path: &Path) -> anyhow::Result<Trace> {
    crate::check_output_path("--trace", path, &["json"])?;
    let collector = Arc::new(Collector {
        start: Instant::now(),
        next_span: AtomicU64::new(1),
        next_tid: AtomicU64::new(1),
        threads: Mutex::new(Vec::new()),
    });
    tracing::dispatcher::set_global_default(tracing::Dispatch::new(ChromeSubscriber(Arc::clone(
        &collector,
    ))))
    .map_err(|_| anyhow::anyhow!("--trace: a trace is already being recorded in this process"))?;
    Ok(Trace {
        collector,
        path: path.to_path_buf(),
    })
}

impl Trace {
    /// Writes the trace recorded so far to the file and returns how many events it holds.
    ///
    /// Errors: the file could not be written.
    pub fn finish(self) -> anyhow::Result<usize> {
        let write = || -> std::io::Result<usize> {
            let file = std::fs::File::create(&self.path)?;
            let mut out = std::io::BufWriter::new(file);
            let n = self.collector.write_json(&mut out)?;
            out.flush()?;
            Ok(n)
        };
        write().map_err(|e| anyhow::anyhow!("--trace {}: {e}", self.path.display()))
    }
}

#[derive(Debug)]
struct Collector {
    start: Instant,
    next_span: AtomicU64,
    next_tid: AtomicU64,
    /// Every thread's buffer, registered on the thread's first span.
    threads: Mutex<Vec<Arc<Mutex<ThreadBuf>>>>,
}

#[derive(Debug)]
struct ThreadBuf {
    tid: u64,
    name: String,
    events: Vec<Recorded>,
    dropped: u64,
    /// Spans created on this thread and not yet closed: name, fields, start of the current entry.
    spans: HashMap<u64, OpenSpan>,
}

#[derive(Debug)]
struct OpenSpan {
    name: &'static str,
    args: Option<Map<String, Value>>,
    entered_ns: Option<u64>,
}

#[derive(Debug)]
struct Recorded {
    name: &'static str,
    ts_ns: u64,
    /// `Some` for a span (a complete event), `None` for an instant event.
    dur_ns: Option<u64>,
    args: Option<Map<String, Value>>,
}

thread_local! {
    static LOCAL: RefCell<Option<Arc<Mutex<ThreadBuf>>>> = const { RefCell::new(None) };
}

impl Collector {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Runs `f` on this thread's buffer (registering it on first use). Does nothing while the
    /// thread's locals are being destroyed.
    fn with_local(&self, f: impl FnOnce(&mut ThreadBuf)) {
        let _ = LOCAL.try_with(|local| {
            let mut local = local.borrow_mut();
            let buf = local.get_or_insert_with(|| {
                // ORDERING: Relaxed: a unique number; nothing is published through it.
                let tid = self.next_tid.fetch_add(1, Ordering::Relaxed);
                let current = std::thread::current();
                let name = current
                    .name()
                    .map_or_else(|| format!("thread-{tid}"), str::to_owned);
                let buf = Arc::new(Mutex::new(ThreadBuf {
                    tid,
                    name,
                    events: Vec::new(),
                    dropped: 0,
                    spans: HashMap::new(),
                }));
                self.threads
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(Arc::clone(&buf));
                buf
            });
            f(&mut buf.lock().unwrap_or_else(PoisonError::into_inner));
        });
    }

    fn write_json(&self, out: &mut impl Write) -> std::io::Result<usize> {
        let threads = self
            .threads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut n = 0usize;
        let mut dropped = 0u64;
        out.write_all(b"{\"traceEvents\":[\n")?;
        let mut first = true;
        let mut emit = |out: &mut dyn Write, v: &Value| -> std::io::Result<()> {
            if !first {
                out.write_all(b",\n")?;
            }
            first = false;
            serde_json::to_writer(&mut *out, v).map_err(std::io::Error::other)
        };
        emit(
            out,
            &serde_json::json!({"ph": "M", "pid": 1, "tid": 0, "name": "process_name",
                "args": {"name": "kvmmu"}}),
        )?;
        for t in &threads {
            let t = t.lock().unwrap_or_else(PoisonError::into_inner);
            dropped += t.dropped;
            emit(
                out,
                &serde_json::json!({"ph": "M", "pid": 1, "tid": t.tid, "name": "thread_name",
                    "args": {"name": t.name}}),
            )?;
            for e in &t.events {
                let mut v = serde_json::json!({
                    "name": e.name,
                    "cat": "kvmmu",
                    "ph": if e.dur_ns.is_some() { "X" } else { "i" },
                    "ts": e.ts_ns as f64 / 1000.0,
                    "pid": 1,
                    "tid": t.tid,
                });
                match e.dur_ns {
                    Some(d) => v["dur"] = (d as f64 / 1000.0).into(),
                    None => v["s"] = "t".into(),
                }
                if let Some(a) = &e.args {
                    v["args"] = Value::Object(a.clone());
                }
                emit(out, &v)?;
                n += 1;
            }
        }
        write!(
            out,
            "\n],\"displayTimeUnit\":\"ns\",\"otherData\":{{\"tool\":\"kvmmu\",\"dropped_events\":{dropped}}}}}\n"
        )?;
        Ok(n)
    }
}

impl ThreadBuf {
    fn push(&mut self, e: Recorded) {
        if self.events.len() < MAX_EVENTS_PER_THREAD {
            self.events.push(e);
        } else {
            self.dropped += 1;
        }
    }
}

/// The process-wide subscriber `--trace` installs.
struct ChromeSubscriber(Arc<Collector>);

/// Collects a span's or event's fields as JSON.
struct Fields<'a>(&'a mut Map<String, Value>);

impl Visit for Fields<'_> {
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().to_owned(), format!("{value:?}").into());
    }
}

fn fields_of(record: impl FnOnce(&mut Fields<'_>)) -> Option<Map<String, Value>> {
    let mut map = Map::new();
    record(&mut Fields(&mut map));
    (!map.is_empty()).then_some(map)
}

impl Subscriber for ChromeSubscriber {
    fn register_callsite(&self, _: &'static Metadata<'static>) -> Interest {
        Interest::always()
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(LevelFilter::TRACE)
    }

    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, span: &Attributes<'_>) -> Id {
        // ORDERING: Relaxed: a unique number; nothing is published through it.
        let id = self.0.next_span.fetch_add(1, Ordering::Relaxed);
        let args = fields_of(|f| span.record(f));
        let name = span.metadata().name();
        self.0.with_local(|t| {
            t.spans.insert(
                id,
                OpenSpan {
                    name,
                    args,
                    entered_ns: None,
                },
            );
        });
        Id::from_u64(id)
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let ts_ns = self.0.now_ns();
        let args = fields_of(|f| event.record(f));
        let name = event.metadata().name();
        self.0.with_local(|t| {
            t.push(Recorded {
                name,
                ts_ns,
                dur_ns: None,
                args,
            })
        });
    }

    fn enter(&self, span: &Id) {
        let now = self.0.now_ns();
        self.0.with_local(|t| {
            if let Some(s) = t.spans.get_mut(&span.into_u64()) {
                s.entered_ns = Some(now);
            }
        });
    }

    fn exit(&self, span: &Id) {
        let now = self.0.now_ns();
        self.0.with_local(|t| {
            let Some(s) = t.spans.get_mut(&span.into_u64()) else {
                return;
            };
            if let Some(start) = s.entered_ns.take() {
                let e = Recorded {
                    name: s.name,
                    ts_ns: start,
                    dur_ns: Some(now.saturating_sub(start)),
                    args: s.args.clone(),
                };
                t.push(e);
            }
        });
    }

    fn try_close(&self, span: Id) -> bool {
        self.0.with_local(|t| {
            t.spans.remove(&span.into_u64());
        });
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_collector_writes_spans_as_complete_events_with_thread_names() {
        let c = Arc::new(Collector {
            start: Instant::now(),
            next_span: AtomicU64::new(1),
            next_tid: AtomicU64::new(1),
            threads: Mutex::new(Vec::new()),
        });
        let d = tracing::Dispatch::new(ChromeSubscriber(Arc::clone(&c)));
        std::thread::Builder::new()
            .name("vcpu-7".into())
            .spawn(move || {
                tracing::dispatcher::with_default(&d, || {
                    let _s = tracing::trace_span!("probe", gfn = 5u64).entered();
                });
            })
            .unwrap()
            .join()
            .unwrap();
        let mut out = Vec::new();
        assert_eq!(c.write_json(&mut out).unwrap(), 1);
        let v: Value = serde_json::from_slice(&out).unwrap();
        let ev = v["traceEvents"].as_array().unwrap();
        assert!(
            ev.iter()
                .any(|e| e["ph"] == "M" && e["args"]["name"] == "vcpu-7")
        );
        let x = ev.iter().find(|e| e["ph"] == "X").unwrap();
        assert_eq!(x["name"], "probe");
        assert_eq!(x["args"]["gfn"], 5);
        assert!(x["dur"].as_f64().unwrap() >= 0.0);
    }
}
