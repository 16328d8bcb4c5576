//! Checkers: each workload's history judged against its model. A verdict is `true`, `false`
//! (with the anomalies found) or `unknown` (the search hit its time bound, or the history lacks
//! what the check needs, such as a final read).

pub mod idempotent;
pub mod linear;
pub mod register;
pub mod session;
pub mod set;
pub mod versions;

use std::time::Duration;

use serde::Serialize;

use crate::history::{self, Event, HistoryError};

#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Validity {
    #[serde(rename = "true")]
    Valid,
    #[serde(rename = "false")]
    Invalid,
    #[serde(rename = "unknown")]
    Unknown,
}

impl Validity {
    /// Combines verdicts: any `false` wins, then any `unknown`.
    pub fn and(self, other: Validity) -> Validity {
        use Validity::*;
        match (self, other) {
            (Invalid, _) | (_, Invalid) => Invalid,
            (Unknown, _) | (_, Unknown) => Unknown,
            _ => Valid,
        }
    }
}

impl std::fmt::Display for Validity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Validity::Valid => "true",
            Validity::Invalid => "false",
            Validity::Unknown => "unknown",
        })
    }
}

#[derive(Serialize, Clone, Debug)]
pub struct Verdict {
    pub valid: Validity,
    /// What is wrong (for `false`) or why it could not be decided (for `unknown`).
    pub anomalies: Vec<String>,
}

impl Verdict {
    pub fn from_anomalies(anomalies: Vec<String>) -> Verdict {
        let valid = if anomalies.is_empty() {
            Validity::Valid
        } else {
            Validity::Invalid
        };
        Verdict { valid, anomalies }
    }
    pub fn unknown(why: String) -> Verdict {
        Verdict {
            valid: Validity::Unknown,
            anomalies: vec![why],
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    Register,
    Set,
    Session,
    Idempotent,
    /// Artifact versions created through the metadata API: unique, gap-free, none lost.
    Versions,
}

impl std::fmt::Display for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Workload::Register => "register",
            Workload::Set => "set",
            Workload::Session => "session",
            Workload::Idempotent => "idempotent",
            Workload::Versions => "versions",
        })
    }
}

/// Checks a whole history for one workload. `budget` bounds the linearizability search.
pub fn check(
    workload: Workload,
    events: &[Event],
    budget: Duration,
) -> Result<Verdict, HistoryError> {
    let ops = history::pair(events)?;
    Ok(match workload {
        Workload::Register => register::check(&ops, budget),
        Workload::Set => set::check(&ops),
        Workload::Session => session::check(&ops),
        Workload::Idempotent => idempotent::check(&ops),
        Workload::Versions => versions::check(&ops),
    })
}

#[cfg(test)]
pub(crate) mod testkit {
    //! Builds hand-written histories tersely.
    use crate::history::{Event, Kind, F};

    pub struct H {
        pub events: Vec<Event>,
        t: u64,
    }

    impl H {
        pub fn new() -> H {
            H {
                events: Vec::new(),
                t: 0,
            }
        }
        /// Appends an event and returns it for further fields.
        pub fn ev(&mut self, process: u64, kind: Kind, f: F) -> &mut Event {
            self.t += 10;
            self.events.push(Event::new(process, kind, f, self.t));
            self.events.last_mut().expect("just pushed")
        }
        pub fn op(&mut self, process: u64, f: F, key: &str, kind: Kind) -> &mut Event {
            self.ev(process, Kind::Invoke, f).key = Some(key.into());
            let e = self.ev(process, kind, f);
            e.key = Some(key.into());
            e
        }
    }
}
