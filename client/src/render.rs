//! Rendering helpers shared by commands, and the only way the CLI writes to stdout.
//!
//! `println!` panics when stdout is gone (`banger ps | head -1`: the reader exited, the
//! write fails with EPIPE) — exit 101 and a backtrace. Every line goes through [`outln!`]
//! / [`out!`] / [`stdout_bytes`] instead, which end the process quietly when the reader has
//! gone: no message, status [`exit::BROKEN_PIPE`] (141, what a shell reports for a
//! program killed by SIGPIPE, as coreutils, git, docker and gh are). Killing ourselves
//! with SIGPIPE itself would need `unsafe` (restoring the signal's default disposition,
//! which Rust's runtime sets to ignore), which this crate forbids; to a shell, and to
//! `set -o pipefail`, the two look the same. Any other write error (a full disk behind a
//! redirect) is said on stderr and exits 1. `clippy::print_stdout` is on for the crate so
//! a new `println!` is caught.

use std::io::Write;

use serde::Serialize;

use crate::exit::{self, CliError};

/// `println!` that ends the process quietly when stdout's reader has gone.
macro_rules! outln {
    () => {
        $crate::render::stdout_fmt(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::render::stdout_fmt(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` that ends the process quietly when stdout's reader has gone.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::render::stdout_fmt(format_args!($($arg)*))
    };
}

/// Write formatted text to stdout and flush it (see the module docs for errors).
pub fn stdout_fmt(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    let result = out.write_fmt(args).and_then(|()| out.flush());
    if let Err(e) = result {
        stdout_failed(e);
    }
}

/// Write bytes to stdout and flush them (see the module docs for errors).
pub fn stdout_bytes(bytes: &[u8]) {
    let mut out = std::io::stdout().lock();
    let result = out.write_all(bytes).and_then(|()| out.flush());
    if let Err(e) = result {
        stdout_failed(e);
    }
}

/// Stdout cannot be written: end the process (quietly when its reader has gone).
fn stdout_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(i32::from(exit::BROKEN_PIPE));
    }
    let _ = writeln!(std::io::stderr(), "banger: cannot write to stdout: {e}");
    std::process::exit(i32::from(exit::FAILURE));
}

/// Print `value` as pretty JSON on stdout.
pub fn json<T: Serialize>(value: &T) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| CliError::Other(e.to_string()))?;
    outln!("{text}");
    Ok(())
}

/// `3725` → `1h 2m 5s`.
pub fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m {s}s"),
        _ => format!("{d}d {h}h {m}m"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration(0), "0s");
        assert_eq!(duration(59), "59s");
        assert_eq!(duration(61), "1m 1s");
        assert_eq!(duration(3725), "1h 2m 5s");
        assert_eq!(duration(90_061), "1d 1h 1m");
    }
}

/// A table with each column as wide as its widest cell (header included), two spaces
/// apart, no trailing spaces; columns whose `right` is true are right-aligned (numbers).
/// Lines end with a newline.
pub fn table(head: &[&str], right: &[bool], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut l = String::new();
        for (i, c) in cells.into_iter().enumerate() {
            let pad = width[i].saturating_sub(c.chars().count());
            if i > 0 {
                l.push_str("  ");
            }
            if right.get(i).copied().unwrap_or(false) {
                l.extend(std::iter::repeat_n(' ', pad));
                l.push_str(c);
            } else {
                l.push_str(c);
                if i < last {
                    l.extend(std::iter::repeat_n(' ', pad));
                }
            }
        }
        l.push('\n');
        l
    };
    let mut out = line(head.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod table_tests {
    use super::table;

    /// Columns fit their content: a long name widens its column, short ones do not pad
    /// to a fixed 20; numbers line up on the right; nothing trails.
    #[test]
    fn columns_are_sized_to_their_content() {
        let rows = vec![
            vec![
                "a".to_owned(),
                "running".to_owned(),
                "2".to_owned(),
                "img".to_owned(),
            ],
            vec![
                "a-much-longer-vm-name-than-twenty".to_owned(),
                "stopped".to_owned(),
                "16".to_owned(),
                "debian-bookworm".to_owned(),
            ],
        ];
        let t = table(
            &["NAME", "STATE", "VCPU", "IMAGE"],
            &[false, false, true, false],
            &rows,
        );
        assert_eq!(
            t,
            "NAME                               STATE    VCPU  IMAGE\n\
             a                                  running     2  img\n\
             a-much-longer-vm-name-than-twenty  stopped    16  debian-bookworm\n"
        );
        let t = table(
            &["NAME", "STATE"],
            &[false, false],
            &[vec!["a".into(), "x".into()]],
        );
        assert_eq!(t, "NAME  STATE\na     x\n");
    }
}
