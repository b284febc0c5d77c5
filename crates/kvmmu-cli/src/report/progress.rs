//! Progress on stderr: one [`MultiProgress`] per process, so nested bars (compare's runs and the
//! workload's phases inside each) share one screen area and leave nothing behind when cleared;
//! templates fit 80 columns; every bar ticks steadily so its elapsed time moves even while a
//! phase makes no countable progress. Nothing is drawn unless stderr is a terminal (so piped or
//! captured output, and `--json`, stay clean); stdout only ever carries the result.
//!
//! Ctrl-C ([`install_interrupt_handler`]): a command that can stop between units of work (compare
//! between runs, bench between scenarios) polls [`interrupted`] and prints a partial report; every
//! other command prints what it knows ([`set_interrupt_note`]) and exits at once. A second Ctrl-C
//! always exits at once. Either way the exit status is 130.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// How often a bar redraws by itself.
const TICK: Duration = Duration::from_millis(200);

/// A bar: name (truncated to 30 columns), bar, percent, elapsed: 72 columns.
const BAR: &str = "{msg:30!} [{bar:25}] {percent:>3}% {elapsed_precise}";
/// A bar with free text after it (rates, counts): 14 + 2 + 20 + 2 + 8 + 1 + 32 = 79 columns.
const BAR_WITH_PREFIX: &str = "{msg:14!} [{bar:20}] {elapsed_precise} {prefix:32!}";
/// A spinner for work without a known length: 30 + 2 + 8 + 1 + 30 columns.
const SPINNER: &str = "{msg:30!} {spinner} {elapsed_precise} {prefix:30!}";

fn multi() -> &'static MultiProgress {
    static MULTI: OnceLock<MultiProgress> = OnceLock::new();
    MULTI.get_or_init(|| {
        if std::io::stderr().is_terminal() {
            MultiProgress::with_draw_target(ProgressDrawTarget::stderr())
        } else {
            MultiProgress::with_draw_target(ProgressDrawTarget::hidden())
        }
    })
}

fn styled(pb: ProgressBar, template: &str, msg: &str) -> ProgressBar {
    if let Ok(style) = ProgressStyle::with_template(template) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(msg.to_owned());
    pb.enable_steady_tick(TICK);
    pb
}

/// A bar of `len` steps titled `msg`; hidden unless stderr is a terminal.
pub fn bar(len: u64, msg: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    styled(multi().add(ProgressBar::new(len)), BAR, msg)
}

/// A bar of `len` steps with a short title (`msg`, 14 columns) and free text in its prefix
/// (rates, counts; 32 columns); hidden unless stderr is a terminal.
pub fn bar_with_prefix(len: u64, msg: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    styled(multi().add(ProgressBar::new(len)), BAR_WITH_PREFIX, msg)
}

/// A spinner titled `msg` for work of unknown length, with free text in its prefix (rates,
/// counts); hidden unless stderr is a terminal.
pub fn spinner(msg: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    styled(multi().add(ProgressBar::new_spinner()), SPINNER, msg)
}

/// Runs `f` (which prints to stderr) with the bars out of the way.
pub fn suspend<T>(f: impl FnOnce() -> T) -> T {
    multi().suspend(f)
}

/// Clears every bar (before a result is printed, or on exit).
pub fn clear() {
    let _ = multi().clear();
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static STOPS_BETWEEN_UNITS: AtomicBool = AtomicBool::new(false);
static NOTE: Mutex<String> = Mutex::new(String::new());

/// Installs the Ctrl-C handler (once; a failure to install leaves the default behaviour).
pub fn install_interrupt_handler() {
    let _ = ctrlc::set_handler(|| {
        // ORDERING: SeqCst on a flag read by polling loops; no data is published through it
        // beyond the flag itself.
        let again = INTERRUPTED.swap(true, Ordering::SeqCst);
        if !again && STOPS_BETWEEN_UNITS.load(Ordering::SeqCst) {
            suspend(|| {
                eprintln!("interrupted: stopping after the current run (Ctrl-C again to quit now)")
            });
            return;
        }
        let note = NOTE.lock().map(|n| n.clone()).unwrap_or_default();
        // Exit inside `suspend`: the bars are cleared and their ticker cannot redraw them
        // between the message and the exit.
        suspend(|| {
            if note.is_empty() {
                eprintln!("error: interrupted");
            } else {
                eprintln!("error: interrupted: {note}");
            }
            std::process::exit(i32::from(crate::error::EXIT_INTERRUPTED));
        })
    });
}

/// Declares that this command polls [`interrupted`] and stops between units of work.
pub fn stop_between_units() {
    // ORDERING: see the handler.
    STOPS_BETWEEN_UNITS.store(true, Ordering::SeqCst);
}

/// True once Ctrl-C was pressed.
pub fn interrupted() -> bool {
    // ORDERING: see the handler.
    INTERRUPTED.load(Ordering::SeqCst)
}

/// What to print if Ctrl-C ends this command at once (e.g. the seed to replay).
pub fn set_interrupt_note(note: impl Into<String>) {
    if let Ok(mut n) = NOTE.lock() {
        *n = note.into();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use indicatif::TermLike;
    use std::sync::Arc;

    /// A 200-column terminal that keeps every line drawn on it.
    #[derive(Debug, Default)]
    struct Capture(Mutex<Vec<String>>);

    impl TermLike for Capture {
        fn width(&self) -> u16 {
            200
        }
        fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn write_line(&self, s: &str) -> std::io::Result<()> {
            self.write_str(s)
        }
        fn write_str(&self, s: &str) -> std::io::Result<()> {
            if let Ok(mut l) = self.0.lock() {
                l.extend(s.lines().map(str::to_owned));
            }
            Ok(())
        }
        fn clear_line(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[derive(Debug, Clone, Default)]
    struct Shared(Arc<Capture>);

    impl TermLike for Shared {
        fn width(&self) -> u16 {
            self.0.width()
        }
        fn move_cursor_up(&self, n: usize) -> std::io::Result<()> {
            self.0.move_cursor_up(n)
        }
        fn move_cursor_down(&self, n: usize) -> std::io::Result<()> {
            self.0.move_cursor_down(n)
        }
        fn move_cursor_right(&self, n: usize) -> std::io::Result<()> {
            self.0.move_cursor_right(n)
        }
        fn move_cursor_left(&self, n: usize) -> std::io::Result<()> {
            self.0.move_cursor_left(n)
        }
        fn write_line(&self, s: &str) -> std::io::Result<()> {
            self.0.write_line(s)
        }
        fn write_str(&self, s: &str) -> std::io::Result<()> {
            self.0.write_str(s)
        }
        fn clear_line(&self) -> std::io::Result<()> {
            self.0.clear_line()
        }
        fn flush(&self) -> std::io::Result<()> {
            self.0.flush()
        }
    }

    #[test]
    fn bars_and_spinners_fit_80_columns_even_with_long_names() {
        let term = Shared::default();
        let long = "Mark memory idle (lru_gen) in configuration no-aging, run 12 of 100";
        for (template, len) in [(BAR, Some(1_000_000)), (SPINNER, None)] {
            let pb = ProgressBar::with_draw_target(
                len,
                ProgressDrawTarget::term_like(Box::new(term.clone())),
            );
            let pb = styled(pb, template, long);
            pb.set_prefix("123456789 ops/s, 0 violations, 29m 59s left");
            pb.set_position(123_456);
            pb.tick();
            pb.finish();
        }
        let lines = term.0.0.lock().map(|l| l.clone()).unwrap_or_default();
        assert!(!lines.is_empty(), "nothing was drawn");
        // indicatif pads with spaces when it erases a line; only drawn text counts.
        for l in lines.iter().map(|l| l.trim_end()) {
            assert!(
                l.chars().count() <= 80,
                "{} columns: {l:?}",
                l.chars().count()
            );
        }
        assert!(lines.iter().any(|l| l.contains("Mark memory idle")));
    }
}
