//! Results across testruns (PROTOCOL.md §5.6): what `compare`,
//! `case_history`, `list_flaky` and the known-issue requests answer, and
//! what a `testrun_finished` event says against its series. Wire data.

use crate::protocol::{CaseStatus, RunId, TaskId};
use serde::{Deserialize, Serialize};

/// Cases each list of a [`Comparison`] carries at most (its `totals`
/// count them all).
pub const MAX_COMPARED_LISTED: usize = 200;
/// Failing cases of one testrun checked for flakiness, device-specificity
/// and known issues at most; past it they count as regressions or still
/// failing, and the comparison's `note` says how many were not checked.
pub const MAX_TRIAGED: usize = 1000;
/// Runs one `case_history` answer carries at most.
pub const MAX_HISTORY_ROWS: u32 = 500;
/// Flaky cases one `flaky` answer carries at most.
pub const MAX_FLAKY_LISTED: usize = 500;
/// Known-issue rules added at run time, at most (those of `server.toml`
/// count apart).
pub const MAX_KNOWN_RULES: usize = 256;
/// Bytes of a known-issue rule's pattern and label.
pub const MAX_KNOWN_PATTERN_BYTES: usize = 512;
pub const MAX_KNOWN_LABEL_BYTES: usize = 128;

/// One failing, fixed, new or removed case of a comparison.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaseChange {
    /// `classname::name`, as its result file names it.
    pub name: String,
    /// Its task in the newer testrun (the base's for a removed case).
    pub task: TaskId,
    /// Its status in the newer testrun (none: removed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<CaseStatus>,
    /// Its status in the base (none: new, or no base).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_status: Option<CaseStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// The label of the known issue it matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub known: Option<String>,
    /// Why it is flaky or device-specific, in one line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<String>,
    /// The last testrun of the series before this one where it passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_passed: Option<RunId>,
}

/// How many cases fall in each list of a [`Comparison`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompareTotals {
    pub cases: u64,
    pub base_cases: u64,
    pub regressions: u64,
    pub fixed: u64,
    pub still_failing: u64,
    pub flaky: u64,
    pub device_specific: u64,
    pub known: u64,
    pub new_cases: u64,
    pub removed_cases: u64,
}

/// A testrun's cases against a base (its series' last finished testrun
/// before it, or one chosen). A case is the same case in both when it has
/// the same name in the task of the same number. Every failing case of
/// the newer testrun is in exactly one of `known`, `device_specific`,
/// `flaky`, `regressions` (not failing in the base) and `still_failing`,
/// in that order of precedence.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Comparison {
    pub run: RunId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<RunId>,
    pub series: String,
    pub regressions: Vec<CaseChange>,
    pub fixed: Vec<CaseChange>,
    pub still_failing: Vec<CaseChange>,
    pub flaky: Vec<CaseChange>,
    pub device_specific: Vec<CaseChange>,
    pub known: Vec<CaseChange>,
    pub new_cases: Vec<CaseChange>,
    pub removed_cases: Vec<CaseChange>,
    pub totals: CompareTotals,
    /// What was not compared, and why (no base, cases past a bound).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// One result of a case in its history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaseRun {
    pub run: RunId,
    pub task: TaskId,
    pub attempt: u32,
    pub status: CaseStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devicegroup: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub series: Option<String>,
    /// When its testrun ended (Unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_ms: Option<u64>,
}

/// A case's results, newest first, and when it last passed and first
/// failed (the first failure since it last passed).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaseHistory {
    pub case: String,
    pub runs: Vec<CaseRun>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_passed: Option<RunId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_failed: Option<RunId>,
}

/// A case that passed and failed on one series and image in the window.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlakyCase {
    pub name: String,
    pub series: String,
    pub image: String,
    pub passed: u64,
    pub failed: u64,
    /// Testruns where it failed (newest first, at most 10).
    pub failed_in: Vec<RunId>,
    /// Workers it failed on.
    pub workers: Vec<String>,
}

/// What a known-issue rule's pattern is matched against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KnownOn {
    /// The case's name (`classname::name`).
    Name,
    /// The first line of its failure message.
    Message,
    /// Its task's log (the last `limits::KNOWN_LOG_BYTES` of it).
    Log,
}

impl KnownOn {
    pub fn as_str(self) -> &'static str {
        match self {
            KnownOn::Name => "name",
            KnownOn::Message => "message",
            KnownOn::Log => "log",
        }
    }
}

impl std::str::FromStr for KnownOn {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "name" => Ok(KnownOn::Name),
            "message" => Ok(KnownOn::Message),
            "log" => Ok(KnownOn::Log),
            other => Err(format!("{other:?} is not name, message or log")),
        }
    }
}

/// A known issue: failures whose `on` matches `pattern` (a regular
/// expression, Rust `regex` syntax) carry `label` and are not regressions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KnownRule {
    /// 0 for a rule of `server.toml`; from 1 for those added at run time.
    pub id: u64,
    pub pattern: String,
    pub on: KnownOn,
    pub label: String,
    /// Who added it (run time), or `server.toml`.
    pub by: String,
    #[serde(default)]
    pub added_ms: u64,
}

/// Time and tasks of a device group, a device or in all
/// (`get_report`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageLine {
    /// The group's or the worker's name.
    pub name: String,
    /// A worker's group (empty for a group's line).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub devicegroup: String,
    #[serde(flatten)]
    pub time: DeviceTime,
}

/// What a device (or all of a group's) did in a span: time in each state
/// and the tasks that ended, by how. One set of counters for the report,
/// the worker's hours and the rows the server adds up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceTime {
    pub busy_ms: u64,
    pub idle_ms: u64,
    pub leased_ms: u64,
    pub broken_ms: u64,
    pub offline_ms: u64,
    pub tasks: u64,
    pub passed: u64,
    pub failed: u64,
    pub infra_errors: u64,
}

impl DeviceTime {
    /// Every state's time together: the span it covers.
    pub fn total_ms(&self) -> u64 {
        [
            self.busy_ms,
            self.idle_ms,
            self.leased_ms,
            self.broken_ms,
            self.offline_ms,
        ]
        .into_iter()
        .fold(0, u64::saturating_add)
    }

    /// Time people and CI had of it (busy and leased).
    pub fn used_ms(&self) -> u64 {
        self.busy_ms.saturating_add(self.leased_ms)
    }
}

/// Device time one owner used on one group.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerLine {
    pub owner: String,
    pub devicegroup: String,
    pub busy_ms: u64,
    pub leased_ms: u64,
}

/// The utilisation report: per device group, per device, per owner.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub since_ms: u64,
    pub groups: Vec<UsageLine>,
    pub devices: Vec<UsageLine>,
    pub owners: Vec<OwnerLine>,
}

/// A device group at one time (`get_lab_series`): its workers by state
/// (averaged over the step), tasks queued (average) and the longest wait.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LabPoint {
    pub at_ms: u64,
    pub devicegroup: String,
    pub workers: f64,
    pub busy: f64,
    pub idle: f64,
    pub leased: f64,
    pub broken: f64,
    pub queued: f64,
    pub wait_max_ms: u64,
}

/// A worker in one hour (`get_worker_series`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerHour {
    pub hour_ms: u64,
    #[serde(flatten)]
    pub time: DeviceTime,
}

/// Cases × workers over a series' recent testruns (`get_series_matrix`):
/// for each case that failed at least once, its passes and failures on
/// each worker (`cells` in the order of `workers`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeriesMatrix {
    pub series: String,
    /// The testruns looked at, newest first.
    pub runs: Vec<RunId>,
    pub workers: Vec<String>,
    pub cases: Vec<MatrixRow>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MatrixRow {
    pub name: String,
    /// (passed, failed) per worker.
    pub cells: Vec<(u64, u64)>,
}

/// Days a report or a series looks back at most.
pub const MAX_REPORT_DAYS: u64 = 400;
/// Cases a series matrix shows at most (those failing most first), and
/// workers.
pub const MAX_MATRIX_CASES: usize = 50;
pub const MAX_MATRIX_WORKERS: usize = 64;
/// Testruns a series matrix looks at, at most.
pub const MAX_MATRIX_RUNS: u32 = 200;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_time_travels_flat_as_the_nine_fields_it_always_was() {
        let hour = WorkerHour {
            hour_ms: 3_600_000,
            time: DeviceTime {
                busy_ms: 1,
                idle_ms: 2,
                leased_ms: 3,
                broken_ms: 4,
                offline_ms: 5,
                tasks: 6,
                passed: 7,
                failed: 8,
                infra_errors: u64::MAX,
            },
        };
        let json = serde_json::to_value(&hour).unwrap();
        assert_eq!(json["busy_ms"], 1);
        assert_eq!(json["infra_errors"], u64::MAX);
        assert!(json.get("time").is_none(), "{json}");
        let wire = rmp_serde::to_vec_named(&hour).unwrap();
        assert_eq!(rmp_serde::from_slice::<WorkerHour>(&wire).unwrap(), hour);
        let line = UsageLine {
            name: "w1".into(),
            devicegroup: "g".into(),
            time: hour.time,
        };
        let wire = rmp_serde::to_vec_named(&line).unwrap();
        assert_eq!(rmp_serde::from_slice::<UsageLine>(&wire).unwrap(), line);
        assert_eq!((hour.time.total_ms(), hour.time.used_ms()), (15, 4));
    }
}
