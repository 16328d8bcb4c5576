//! What the nodes' logs say: every panic (a run with one fails, wherever it happened, including
//! tasks that do not stop the process) and the warnings and errors counted by kind, so that a new
//! flood of one message stands out in the summary.
//!
//! A node logs through `tracing`'s plain format on stderr:
//! `2026-12-07T20:31:00.123456Z  WARN span{f=1}: message field=value ...`; Rust's panic hook
//! writes `thread '...' panicked at <file:line:col>:` and the message on the next line. A kind
//! is the level and the message without its spans and fields, with digits folded to `#` so that
//! "peer 10.77.0.3:7101" and "peer 10.77.0.4:7101" count as one kind.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

/// The panics and warning/error kinds of one or more logs.
#[derive(Serialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct LogReport {
    /// Every panic seen.
    pub panics: u64,
    /// The first few panics: where, and the message.
    pub panic_examples: Vec<String>,
    /// Warning lines by kind.
    pub warnings: BTreeMap<String, u64>,
    /// Error lines by kind.
    pub errors: BTreeMap<String, u64>,
}

/// How many panics are quoted in full.
const EXAMPLES: usize = 5;
/// Kinds are cut to this many characters.
const KIND_CHARS: usize = 120;

impl LogReport {
    /// Adds the lines of one log (`node` names it in the examples).
    pub fn scan(&mut self, node: &str, text: &str) {
        let mut lines = text.lines().peekable();
        while let Some(line) = lines.next() {
            // The panic hook's line, not a log line that quotes one.
            if let Some(at) = line
                .starts_with("thread '")
                .then(|| line.find(" panicked at "))
                .flatten()
                .map(|at| at + 1)
            {
                self.panics += 1;
                if self.panic_examples.len() < EXAMPLES {
                    let what = lines.peek().map(|l| l.trim()).unwrap_or("");
                    self.panic_examples
                        .push(format!("{node}: {} {what}", line[at..].trim()));
                }
                continue;
            }
            match level_and_rest(line) {
                Some(("WARN", rest)) => *self.warnings.entry(kind(rest)).or_default() += 1,
                Some(("ERROR", rest)) => *self.errors.entry(kind(rest)).or_default() += 1,
                _ => {}
            }
        }
    }

    /// Scans each `(node name, log file)`; a missing file adds nothing.
    pub fn scan_files<'a>(logs: impl IntoIterator<Item = (String, &'a Path)>) -> LogReport {
        let mut r = LogReport::default();
        for (node, path) in logs {
            if let Ok(bytes) = std::fs::read(path) {
                r.scan(&node, &String::from_utf8_lossy(&bytes));
            }
        }
        r
    }

    pub fn warning_total(&self) -> u64 {
        self.warnings.values().sum()
    }

    pub fn error_total(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// The level word after the timestamp, and what follows it.
fn level_and_rest(line: &str) -> Option<(&str, &str)> {
    let mut words = line.splitn(2, ' ');
    let stamp = words.next()?;
    if !stamp.ends_with('Z') || !stamp.contains('T') {
        return None;
    }
    let rest = words.next()?.trim_start();
    let (level, rest) = rest.split_once(' ')?;
    matches!(level, "TRACE" | "DEBUG" | "INFO" | "WARN" | "ERROR").then_some((level, rest))
}

/// The message of a log line's remainder: spans dropped, fields dropped, digits folded.
fn kind(rest: &str) -> String {
    let mut msg = rest.trim_start();
    // Spans: `name{fields}: ` or `name: ` before the message.
    while let Some((_, tail)) = split_span(msg) {
        msg = tail;
    }
    let end = first_field(msg).unwrap_or(msg.len());
    let folded: String = msg[..end]
        .trim()
        .chars()
        .map(|c| if c.is_ascii_digit() { '#' } else { c })
        .take(KIND_CHARS)
        .collect();
    if folded.is_empty() {
        "(fields only)".into()
    } else {
        folded
    }
}

/// `name{...}: tail` or `name: tail` where name is an identifier path: (name, tail).
fn split_span(s: &str) -> Option<(&str, &str)> {
    let name_end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(s.len());
    let (name, after) = s.split_at(name_end);
    let name = name.trim_end_matches(':');
    if name.is_empty() {
        return None;
    }
    if let Some(fields) = after.strip_prefix('{') {
        let close = fields.find("}: ")?;
        return Some((name, &fields[close + 3..]));
    }
    // `name: ` only counts as a span when the name is a plain identifier followed by ": ".
    let bare = &s[..name_end];
    bare.strip_suffix(':')
        .filter(|n| !n.is_empty() && !n.contains(':') && after.starts_with(' '))
        .map(|n| (n, after.trim_start()))
}

/// Where the first ` key=value` field starts (outside brackets: "Worker(id=3, target=1) failed"
/// is all message).
fn first_field(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    let mut depth = 0i32;
    for i in 0..b.len() {
        match b[i] {
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => depth -= 1,
            b' ' if depth <= 0 => {
                let start = i + 1;
                let mut j = start;
                while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_' || b[j] == b'.')
                {
                    j += 1;
                }
                if j > start && j < b.len() && b[j] == b'=' && !b[start].is_ascii_digit() {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "\
2026-12-07T20:31:00.123456Z  INFO serving addr=127.0.0.1:7001
2026-12-07T20:31:01.000001Z  WARN replication to peer failed peer=10.77.0.3:7101 error=\"connection refused\"
2026-12-07T20:31:01.000002Z  WARN replication to peer failed peer=10.77.0.4:7101 error=\"timeout\"
2026-12-07T20:31:02.000000Z  WARN append{target=2}: peer 2 answered 17 conflicts
2026-12-07T20:31:03.000000Z ERROR apply stopped index=17
2026-12-07T20:31:03.500000Z  WARN a peer said: thread 'x' panicked at y.rs:1:1
thread 'tokio-runtime-worker' panicked at /x/futures-util/src/stream/unfold.rs:108:21:
Unfold must not be polled after it returned `Poll::Ready(None)`
note: run with `RUST_BACKTRACE=full` for a verbose backtrace.
2026-12-07T20:31:04.000000Z  WARN recv_reset; remotely-reset pending-accept streams reached limit (20)
2026-12-07T21:26:32.488574Z  WARN HeartbeatWorker(id=3, target=1) failed to send a heartbeat: Err(Elapsed(()))
";

    #[test]
    fn panics_and_kinds_are_counted() {
        let mut r = LogReport::default();
        r.scan("n1", LOG);
        r.scan("n2", LOG);
        assert_eq!(r.panics, 2);
        assert_eq!(r.panic_examples.len(), 2);
        assert!(
            r.panic_examples[0].starts_with("n1: panicked at /x/futures-util"),
            "{:?}",
            r.panic_examples
        );
        assert!(r.panic_examples[0].contains("Unfold must not be polled"));
        assert_eq!(r.warnings["replication to peer failed"], 4);
        assert_eq!(r.warnings["peer # answered ## conflicts"], 2);
        assert_eq!(
            r.warnings["recv_reset; remotely-reset pending-accept streams reached limit (##)"],
            2
        );
        assert_eq!(
            r.warnings
                ["HeartbeatWorker(id=#, target=#) failed to send a heartbeat: Err(Elapsed(()))"],
            2
        );
        assert_eq!(r.errors["apply stopped"], 2);
        assert_eq!(
            r.warnings["a peer said: thread 'x' panicked at y.rs:#:#"],
            2
        );
        assert_eq!(r.warning_total(), 12);
        assert_eq!(r.error_total(), 2);
    }

    #[test]
    fn a_clean_log_reports_nothing_and_a_missing_file_is_empty() {
        let mut r = LogReport::default();
        r.scan(
            "n1",
            "2026-12-07T20:31:00.123456Z  INFO serving addr=x\nplain text = 1\n",
        );
        assert_eq!(r, LogReport::default());
        let p = std::path::PathBuf::from("/nonexistent/metaraft-jepsen/log.txt");
        assert_eq!(
            LogReport::scan_files([("n1".to_string(), p.as_path())]),
            LogReport::default()
        );
    }
}
