//! The history: every client operation as JSON lines (invoke, then ok / fail / info), as Jepsen
//! records it. `fail` means the operation definitely did not take effect; `info` means its outcome
//! is unknown (a timeout, a lost connection) and the checkers treat it as possibly applied.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Invoke,
    Ok,
    Fail,
    Info,
}

/// The operation's function.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum F {
    /// Linearizable read of a register (`value`: what was read, absent = no key).
    Read,
    /// Blind write of `value`.
    Write,
    /// Compare-and-set from `expected` to `value`; `fail` = the compare did not hold.
    Cas,
    /// Set workload: add the unique element `value`.
    Add,
    /// Final read after healing: `values` (set) or `version` (idempotent counter).
    FinalRead,
    /// SESSION read: invoke `index` = min revision asked for; ok `index` = applied index served at.
    SessionRead,
    /// STALE read: ok `index` = the applied index the reply reports.
    StaleRead,
    /// A write carrying an explicit request id, retried with the same id.
    IdemWrite,
    /// Versions workload: create an artifact version tagged `value`; ok `version` = its number.
    AddVersion,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub process: u64,
    #[serde(rename = "type")]
    pub kind: Kind,
    pub f: F,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<Vec<i64>>,
    /// A write's revision, or the mod revision of what a read returned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
    /// A read's applied index (ok) or min revision asked for (invoke).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<u64>,
    /// Monotonic nanoseconds since the run started.
    pub time_ns: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Event {
    pub fn new(process: u64, kind: Kind, f: F, time_ns: u64) -> Event {
        Event {
            process,
            kind,
            f,
            key: None,
            value: None,
            expected: None,
            values: None,
            revision: None,
            index: None,
            version: None,
            request_id: None,
            node: None,
            time_ns,
            error: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}: not a history event: {msg}")]
    Parse {
        path: String,
        line: usize,
        msg: String,
    },
    #[error("event {index} (process {process}): {msg}")]
    Malformed {
        index: usize,
        process: u64,
        msg: String,
    },
}

pub fn read_jsonl(path: &Path) -> Result<Vec<Event>, HistoryError> {
    let p = path.display().to_string();
    let f = std::fs::File::open(path).map_err(|source| HistoryError::Io {
        path: p.clone(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|source| HistoryError::Io {
            path: p.clone(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let ev: Event = serde_json::from_str(&line).map_err(|e| HistoryError::Parse {
            path: p.clone(),
            line: i + 1,
            msg: e.to_string(),
        })?;
        out.push(ev);
    }
    Ok(out)
}

pub fn write_jsonl(path: &Path, events: &[Event]) -> std::io::Result<()> {
    let mut w = std::io::BufWriter::new(std::fs::File::create(path)?);
    for e in events {
        serde_json::to_writer(&mut w, e)?;
        w.write_all(b"\n")?;
    }
    w.flush()
}

/// One operation: its invocation and, unless the run ended first, its completion.
#[derive(Clone, Debug)]
pub struct Op<'a> {
    pub invoke: &'a Event,
    pub complete: Option<&'a Event>,
}

impl Op<'_> {
    /// The completion kind; a missing completion counts as `info` (outcome unknown).
    pub fn kind(&self) -> Kind {
        self.complete.map(|c| c.kind).unwrap_or(Kind::Info)
    }
    pub fn f(&self) -> F {
        self.invoke.f
    }
}

/// Pairs each invocation with the next completion of the same process. A process has at most
/// one operation in flight; anything else is a malformed history.
pub fn pair(events: &[Event]) -> Result<Vec<Op<'_>>, HistoryError> {
    let mut open: HashMap<u64, usize> = HashMap::new();
    let mut ops: Vec<Op> = Vec::new();
    for (i, e) in events.iter().enumerate() {
        let bad = |msg: &str| HistoryError::Malformed {
            index: i,
            process: e.process,
            msg: msg.to_string(),
        };
        match e.kind {
            Kind::Invoke => {
                if open.contains_key(&e.process) {
                    return Err(bad("invoked while its previous operation is still open"));
                }
                open.insert(e.process, ops.len());
                ops.push(Op {
                    invoke: e,
                    complete: None,
                });
            }
            _ => {
                let at = open
                    .remove(&e.process)
                    .ok_or_else(|| bad("completion without an invocation"))?;
                if ops[at].invoke.f != e.f {
                    return Err(bad("completion of a different function than invoked"));
                }
                if e.time_ns < ops[at].invoke.time_ns {
                    return Err(bad("completes before it was invoked"));
                }
                ops[at].complete = Some(e);
            }
        }
    }
    Ok(ops)
}

/// ok / fail / info counts per function, for the summary.
pub fn counts(ops: &[Op]) -> std::collections::BTreeMap<String, [u64; 3]> {
    let mut m = std::collections::BTreeMap::new();
    for op in ops {
        let name = serde_json::to_value(op.f())
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let c: &mut [u64; 3] = m.entry(name).or_default();
        match op.kind() {
            Kind::Ok => c[0] += 1,
            Kind::Fail => c[1] += 1,
            _ => c[2] += 1,
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_round_trip_and_pairing() {
        let mut a = Event::new(1, Kind::Invoke, F::Write, 10);
        a.key = Some("k".into());
        a.value = Some(3);
        let mut b = a.clone();
        b.kind = Kind::Ok;
        b.time_ns = 20;
        b.revision = Some(7);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("h.jsonl");
        write_jsonl(&p, &[a.clone(), b.clone()]).unwrap();
        let back = read_jsonl(&p).unwrap();
        assert_eq!(back, vec![a, b]);
        let ops = pair(&back).unwrap();
        assert_eq!(ops.len(), 1);
        assert_eq!(ops[0].kind(), Kind::Ok);
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains(r#""type":"invoke""#), "{text}");
    }

    #[test]
    fn malformed_histories_are_named() {
        let a = Event::new(1, Kind::Ok, F::Read, 10);
        let e = pair(std::slice::from_ref(&a)).unwrap_err();
        assert!(e.to_string().contains("without an invocation"), "{e}");
        let i = Event::new(1, Kind::Invoke, F::Read, 10);
        let e = pair(&[i.clone(), i]).unwrap_err();
        assert!(e.to_string().contains("still open"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.jsonl");
        std::fs::write(&p, "{\"process\":1}\n").unwrap();
        let e = read_jsonl(&p).unwrap_err();
        assert!(e.to_string().contains("bad.jsonl:1"), "{e}");
    }
}
