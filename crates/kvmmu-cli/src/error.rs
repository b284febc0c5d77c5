//! How the command fails: one `error: ...` line on stderr (and a `hint: ...` line where one
//! helps), never a backtrace, and an exit status that tells a script what went wrong:
//!
//! | status | meaning |
//! |---|---|
//! | 0 | the run passed every check |
//! | 1 | a check failed, or the run could not complete |
//! | 2 | the command line was refused before any work started |
//! | 130 | interrupted (Ctrl-C); the partial report was printed |
//!
//! Usage errors are [`UsageError`]s somewhere in an `anyhow` chain; failed checks are
//! [`ChecksFailed`]. Everything else is a run-time failure.

use std::fmt;
use std::process::ExitCode;

/// Exit status of a refused command line.
pub const EXIT_USAGE: u8 = 2;
/// Exit status of a failed check or a run that could not complete.
pub const EXIT_FAILED: u8 = 1;
/// Exit status of a run interrupted by Ctrl-C (128 + SIGINT, as shells report it).
pub const EXIT_INTERRUPTED: u8 = 130;

/// A command line the tool refuses, with an optional hint at what to type instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError {
    /// What is wrong, in the user's flag names.
    pub message: String,
    /// What to do instead.
    pub hint: Option<String>,
}

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for UsageError {}

/// A refused command line, as an `anyhow` error.
pub fn usage(message: impl Into<String>) -> anyhow::Error {
    UsageError {
        message: message.into(),
        hint: None,
    }
    .into()
}

/// A refused command line with a hint, as an `anyhow` error.
pub fn usage_hint(message: impl Into<String>, hint: impl Into<String>) -> anyhow::Error {
    UsageError {
        message: message.into(),
        hint: Some(hint.into()),
    }
    .into()
}

/// Refuses the command line with `message` unless `cond` holds.
pub fn require(cond: bool, message: impl FnOnce() -> String) -> anyhow::Result<()> {
    if cond { Ok(()) } else { Err(usage(message())) }
}

/// Turns any error into a usage error (for validation code written with `anyhow::ensure!`).
pub fn as_usage(e: anyhow::Error) -> anyhow::Error {
    if e.chain().any(|c| c.downcast_ref::<UsageError>().is_some()) {
        return e;
    }
    usage(one_line(&e))
}

/// True if `result` is a refused command line (nothing ran, so nothing should be written).
pub fn is_usage<T>(result: &anyhow::Result<T>) -> bool {
    result
        .as_ref()
        .is_err_and(|e| e.chain().any(|c| c.is::<UsageError>()))
}

/// Checks that failed: each line names the check and the numbers behind the verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChecksFailed {
    /// One line per failed check.
    pub lines: Vec<String>,
}

impl fmt::Display for ChecksFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.lines.join("; "))
    }
}

impl std::error::Error for ChecksFailed {}

/// Ctrl-C stopped the run; a partial report was printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interrupted;

impl fmt::Display for Interrupted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("interrupted (Ctrl-C); the report covers the work that completed")
    }
}

impl std::error::Error for Interrupted {}

/// An error and its causes on one line, each cause once: a cause whose text its parent already
/// quotes (a `#[from]` error whose message embeds its source) is not repeated.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out.replace('\n', " ")
}

/// Prints `e` as the module doc says and returns the exit status.
pub fn report(e: &anyhow::Error) -> ExitCode {
    crate::report::progress::clear();
    if e.chain().any(|c| c.is::<Interrupted>()) {
        eprintln!("error: {}", one_line(e));
        return ExitCode::from(EXIT_INTERRUPTED);
    }
    if let Some(u) = e.chain().find_map(|c| c.downcast_ref::<UsageError>()) {
        let context: Vec<String> = e
            .chain()
            .take_while(|c| c.downcast_ref::<UsageError>().is_none())
            .map(ToString::to_string)
            .collect();
        let mut msg = context.join(": ");
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&u.message);
        eprintln!("error: {msg}");
        if let Some(h) = &u.hint {
            eprintln!("hint: {h}");
        }
        return ExitCode::from(EXIT_USAGE);
    }
    if let Some(c) = e.chain().find_map(|c| c.downcast_ref::<ChecksFailed>()) {
        let context: Vec<String> = e
            .chain()
            .take_while(|c| c.downcast_ref::<ChecksFailed>().is_none())
            .map(ToString::to_string)
            .collect();
        let prefix = if context.is_empty() {
            String::new()
        } else {
            format!("{}: ", context.join(": "))
        };
        for l in &c.lines {
            eprintln!("error: {prefix}{l}");
        }
        return ExitCode::from(EXIT_FAILED);
    }
    eprintln!("error: {}", one_line(e));
    ExitCode::from(EXIT_FAILED)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Inner;
    impl fmt::Display for Inner {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("shadow MMU not available")
        }
    }
    impl std::error::Error for Inner {}

    #[derive(Debug)]
    struct Outer(Inner);
    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "VM configuration refused: {}", self.0)
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn a_cause_quoted_by_its_parent_is_printed_once() {
        let e = anyhow::Error::new(Outer(Inner)).context("--mmu shadow");
        assert_eq!(
            one_line(&e),
            "--mmu shadow: VM configuration refused: shadow MMU not available"
        );
    }

    #[test]
    fn usage_errors_survive_context_and_conversion() {
        let e = usage("bad").context("outer");
        assert!(as_usage(e).chain().any(|c| c.is::<UsageError>()));
        let e = as_usage(anyhow::anyhow!("plain"));
        assert_eq!(e.to_string(), "plain");
        assert!(e.is::<UsageError>());
    }
}
