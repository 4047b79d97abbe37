//! The columns a testrun row is found by (schema 7), and the queries a
//! start runs on both backends: what the writers ([`super::db`],
//! [`super::pg`]) and the history reader ([`super::history`]) share.

use crate::protocol::{RunState, Verdict};

/// What a testrun row is found by, written with its body.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunIndex {
    /// Its number (`r12` → 12; one numbering for testruns and leases).
    pub num: u64,
    /// `r` (a testrun) or `l` (a lease).
    pub kind: String,
    /// [`state_token`] of its state, [`verdict_token`] of its verdict.
    pub state: String,
    pub verdict: Option<String>,
    pub owner: Option<String>,
    /// Its device groups, each between commas: `,arm,x86,`.
    pub groups: String,
    /// Not finished or cancelled: loaded at every start.
    pub live: bool,
    pub ended_ms: Option<u64>,
    /// Bytes of result files and logs it keeps: set once it ended, none
    /// once retention pruned them (what retention looks at).
    pub kept_bytes: Option<u64>,
    /// Its line of the `runs` list ([`RunSummary`], MessagePack).
    pub summary: Vec<u8>,
    /// Its series and image (testruns; none for a lease): what its
    /// results are compared with.
    pub series: Option<String>,
    pub image: Option<String>,
}

/// The word a state is stored as (its protocol name).
pub fn state_token(state: RunState) -> String {
    token(&state)
}

/// The word a verdict is stored as (its protocol name).
pub fn verdict_token(verdict: Verdict) -> String {
    token(&verdict)
}

fn token<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(), // every state and verdict is a word
    }
}

/// A count or a time as SQL stores it (a signed 64-bit integer).
pub fn sql_int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The live rows a start loads, and the sums it needs of the rest (the
/// same SQL on both backends). Each part finds its rows by an index
/// (`runs_live`, the partial `runs_unindexed`, `tasks_run`; the sum of
/// kept bytes reads the covering `runs_kept`), never by a scan of the
/// history's rows.
pub(crate) const LIVE_RUNS: &str = "SELECT id, body FROM runs WHERE live = 1
     UNION ALL SELECT id, body FROM runs WHERE num IS NULL";
pub(crate) const LIVE_TASKS: &str = "SELECT id, body FROM tasks WHERE run IN
     (SELECT id FROM runs WHERE live = 1 UNION ALL SELECT id FROM runs WHERE num IS NULL)";
pub(crate) const KEPT_BYTES: &str =
    "SELECT CAST(SUM(kept_bytes) AS BIGINT) FROM runs WHERE kept_bytes IS NOT NULL";
pub(crate) const OLDEST_KEPT: &str = "SELECT MIN(ended_ms) FROM runs WHERE kept_bytes IS NOT NULL";
pub(crate) const FILE_BYTES: &str = "SELECT CAST(SUM(size) AS BIGINT) FROM files";
pub(crate) const HIGHEST_RUN: &str = "SELECT MAX(num) FROM runs";
