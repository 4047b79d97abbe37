//! What the server reports: verdicts, task and testrun states and their
//! history, workers and their health, the queue, notifications, progress
//! events. Wire data (field names are the wire names).

use crate::protocol::device::{DeviceProps, DeviceSpec};
use crate::protocol::testrun::{FileInfo, RunId, TaskId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Final verdicts, ordered by severity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Verdict {
    Pass,
    Fail,
    Error,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
            Verdict::Error => "ERROR",
        })
    }
}

/// Task lifecycle as the server sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    Queued,
    /// Sent to a worker, not yet accepted.
    Dispatched,
    Running,
    /// The worker was lost while running this task; held for a grace period.
    Held,
    Finished,
    Cancelled,
}

impl TaskState {
    pub fn is_final(self) -> bool {
        matches!(self, TaskState::Finished | TaskState::Cancelled)
    }
}

/// What one test case came to (JUnit: no child, `<failure>`, `<error>`,
/// `<skipped>` — pytest's xfail is a skip).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CaseStatus {
    Pass,
    Fail,
    Error,
    Skip,
}

impl CaseStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CaseStatus::Pass => "pass",
            CaseStatus::Fail => "fail",
            CaseStatus::Error => "error",
            CaseStatus::Skip => "skip",
        }
    }

    pub fn from_word(word: &str) -> Option<CaseStatus> {
        Some(match word {
            "pass" => CaseStatus::Pass,
            "fail" => CaseStatus::Fail,
            "error" => CaseStatus::Error,
            "skip" => CaseStatus::Skip,
            _ => return None,
        })
    }

    /// A failure of the software under test (fail or error).
    pub fn failed(self) -> bool {
        matches!(self, CaseStatus::Fail | CaseStatus::Error)
    }
}

/// A failing test case as `status` names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailingCase {
    pub name: String,
    pub status: CaseStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Where the task's log shows it (bytes from the log's start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_offset: Option<u64>,
}

/// One test case of a testrun (`list_cases`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestCase {
    pub task: TaskId,
    /// The result file it was read from.
    pub file: String,
    pub suite: String,
    pub name: String,
    pub status: CaseStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Where the task's log shows it, for a failing case (bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_offset: Option<u64>,
}

/// Testrun lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Queued,
    Running,
    Finished,
    Cancelled,
}

/// Test case counts parsed from JUnit XML result files.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaseCounts {
    pub cases: u64,
    pub failures: u64,
    pub errors: u64,
    pub skipped: u64,
}

impl CaseCounts {
    pub fn add(&mut self, other: CaseCounts) {
        self.cases += other.cases;
        self.failures += other.failures;
        self.errors += other.errors;
        self.skipped += other.skipped;
    }
}

/// What `status` shows about one task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStatus {
    pub task: TaskId,
    pub packages: Vec<String>,
    pub state: TaskState,
    pub worker: Option<String>,
    pub attempts: u32,
    pub verdict: Option<Verdict>,
    /// Why the verdict is what it is, in one line.
    pub reason: Option<String>,
    pub cases: Option<CaseCounts>,
    /// Log lines the server stored for the task.
    pub log_lines_stored: u64,
    /// Log lines the worker says the task produced (known once finished).
    pub log_lines_produced: Option<u64>,
    /// Inclusive ranges of log line numbers that never arrived (known once
    /// finished): lost in transit or dropped while the server was away.
    #[serde(default)]
    pub log_gaps: Vec<(u64, u64)>,
    pub files: Vec<FileInfo>,
    /// Every state change of the task, oldest first.
    #[serde(default)]
    pub history: Vec<StateChange>,
    /// While queued: why it waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<Waiting>,
    /// The device spec it runs on, when its testrun has several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceSpec>,
    /// Its first failing test cases (at most 5; `cases` counts them all;
    /// `list_cases` lists every one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failing: Vec<FailingCase>,
}

/// Why a queued task waits: where it stands under its routing key and
/// what the workers that could take it are doing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Waiting {
    pub key: String,
    /// 1 = next to be dispatched under the key.
    pub position: u64,
    /// Tasks ahead of it: of the same owner, and of others.
    pub ahead_own: u64,
    pub ahead_others: u64,
    /// At most 64 listed; `workers_total` counts all.
    pub workers: Vec<QueueWorker>,
    pub workers_total: u64,
    /// As in `QueuedTask`.
    #[serde(default)]
    pub estimate_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forecast: Option<Forecast>,
}

/// For whom a queued task waits and when it may start: the queue played
/// forward from now (PROTOCOL.md §5.3 `list_queue`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forecast {
    /// The worker expected to take it (empty: none may, for this
    /// attempt), and the task that worker runs before it.
    pub worker: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// Earliest, expected and latest start, ms from now, by the shortest,
    /// mean and longest of recent durations; absent: not known (no
    /// duration to go by for a task it waits behind).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ms: Option<u64>,
    /// The workers it may use for this attempt: not away (drained, bad,
    /// leased, lost…) and not excluded by its failed attempts (≤ 64).
    #[serde(default)]
    pub could_run_on: Vec<String>,
}

/// One state change of a task, as kept in its history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateChange {
    /// Unix milliseconds (server clock).
    pub at_ms: u64,
    pub state: ProgressState,
    pub attempt: u32,
    pub worker: Option<String>,
    pub reason: Option<String>,
}

/// The lease a leading server holds (`pong.lease`, `ots-submit leader`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseInfo {
    /// The fencing epoch: one more at every takeover.
    pub epoch: u64,
    /// When this server took the lease (Unix ms, its clock).
    pub since_ms: u64,
    /// The control endpoint it serves on.
    pub endpoint: String,
}

/// What `status` shows about a testrun.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunStatus {
    pub run: RunId,
    pub state: RunState,
    pub verdict: Option<Verdict>,
    pub device: DeviceSpec,
    pub image: String,
    /// The series its results are compared with (§5.6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub series: Option<String>,
    pub tasks: Vec<TaskStatus>,
    /// Server-wide counters (orphans, malformed messages…) at the time of the answer.
    pub counters: BTreeMap<String, u64>,
    /// Set once the retention policy removed the testrun's result files
    /// and logs (the record stays).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pruned: Option<Pruned>,
}

/// What the retention policy removed of a testrun, when and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pruned {
    /// Unix ms (server clock).
    pub at_ms: u64,
    /// Bytes of result files and logs removed.
    pub bytes: u64,
    pub reason: String,
}

/// The events a target may ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotifyEventKind {
    TestrunFinished,
    WorkerHealthChanged,
    WorkerLost,
}

/// One notification delivery (an event to one recipient), as
/// `notifications` lists it (PROTOCOL.md §5.3).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotificationInfo {
    /// The `webhook-id`: the same on every attempt.
    pub id: String,
    pub event: NotifyEventKind,
    #[serde(default)]
    pub run: Option<RunId>,
    /// Where it goes: a target name, `mailto:ADDR`, or a per-run URL.
    pub target: String,
    /// The configured target that carries it (`per-run-urls` for URLs).
    pub via: String,
    /// `pending`, `sending`, `delivered` or `failed`.
    pub state: String,
    pub attempts: u32,
    /// The last attempt's result: an HTTP status, `timeout`, or why.
    #[serde(default)]
    pub last: Option<String>,
    pub created_ms: u64,
    /// When it is tried next (pending only).
    #[serde(default)]
    pub next_ms: Option<u64>,
    #[serde(default)]
    pub ended_ms: Option<u64>,
}

/// A notification target's standing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotifyTargetInfo {
    pub name: String,
    /// `webhook` or `mail`.
    pub kind: String,
    pub pending: u64,
    pub in_flight: u64,
    /// Failed attempts since the server started (any delivery).
    pub failures: u64,
    /// Failing since (Unix ms) with no success in between.
    #[serde(default)]
    pub failing_since_ms: Option<u64>,
    /// Failing for longer than `notify.alert_after`.
    #[serde(default)]
    pub alert: bool,
    #[serde(default)]
    pub last_error: Option<String>,
}

/// What `workers` shows about one worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub name: String,
    pub device: DeviceProps,
    pub state: WorkerState,
    pub task: Option<TaskId>,
    pub last_heard_ms_ago: u64,
    /// Drained by an operator: finishes its task, takes no new one.
    #[serde(default)]
    pub drained: bool,
    /// What the worker said it runs, in its hello.
    #[serde(default)]
    pub version: Option<String>,
    /// Its device's serial console: `ok`, or why it is unavailable; none
    /// if the worker has no console configured.
    #[serde(default)]
    pub console: Option<String>,
    /// With security: the devices the worker's key may serve — its pin
    /// (`workers.d/NAME.device`) or the device of its first registration.
    #[serde(default)]
    pub pinned: Option<String>,
    /// What the server believes about its device (PROTOCOL.md §5.5), why,
    /// and since when (Unix ms).
    #[serde(default)]
    pub health: Health,
    #[serde(default)]
    pub health_reason: String,
    #[serde(default)]
    pub health_since_ms: u64,
}

/// A worker's device health (PROTOCOL.md §5.5): only `good` workers get
/// ordinary tasks; `unknown`, `suspect` and `bad` ones get health checks.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// New, or its device changed: not checked yet.
    #[default]
    Unknown,
    Good,
    /// Infrastructure failures: no ordinary task until a check passes.
    Suspect,
    /// A health check failed: checked again after a backoff.
    Bad,
    /// Set by an operator: no tasks, no checks until it is set off.
    Maintenance,
    /// Set by an operator: out of service for good.
    Retired,
}

impl Health {
    pub const ALL: [Health; 6] = [
        Health::Unknown,
        Health::Good,
        Health::Suspect,
        Health::Bad,
        Health::Maintenance,
        Health::Retired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Good => "good",
            Health::Suspect => "suspect",
            Health::Bad => "bad",
            Health::Maintenance => "maintenance",
            Health::Retired => "retired",
        }
    }
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One change of a worker's health (or a note on it: `from == to`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthChange {
    pub at_ms: u64,
    pub from: Health,
    pub to: Health,
    pub reason: String,
}

/// A task that ended on a worker, as `health_report` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecentTask {
    pub task: TaskId,
    pub run: RunId,
    pub state: TaskState,
    pub verdict: Option<Verdict>,
    pub reason: Option<String>,
}

/// One testrun as `runs` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSummary {
    pub run: RunId,
    pub state: RunState,
    pub verdict: Option<Verdict>,
    pub owner: Option<String>,
    pub device: DeviceSpec,
    pub tasks: u32,
    /// Unix ms (server clock); 0 if unknown (a testrun from before).
    pub submitted_ms: u64,
    pub ended_ms: Option<u64>,
}

/// The queued tasks of one routing key, oldest first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueInfo {
    pub key: String,
    /// Queued tasks under the key in all (the list may be cut short).
    pub length: u64,
    pub tasks: Vec<QueuedTask>,
    /// Why they wait: the workers that could take them and what each is
    /// doing (at most 64 listed; `workers_total` counts all).
    #[serde(default)]
    pub workers: Vec<QueueWorker>,
    #[serde(default)]
    pub workers_total: u64,
}

/// A worker that could take a queue's tasks, and what keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueWorker {
    pub name: String,
    /// `busy with TASK`, `idle`, `drained`, `lost`, `stopped` or
    /// `registering` (connected, not asked for work yet).
    pub doing: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedTask {
    pub task: TaskId,
    pub run: RunId,
    /// 1 = next to be dispatched under this key.
    pub position: u64,
    pub age_ms: u64,
    /// Who submitted it (with security).
    #[serde(default)]
    pub owner: Option<String>,
    /// Tasks ahead of it under this key: its owner's, and others'.
    #[serde(default)]
    pub ahead_own: u64,
    #[serde(default)]
    pub ahead_others: u64,
    /// When it may start (ms from now): `forecast.ms`.
    #[serde(default)]
    pub estimate_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forecast: Option<Forecast>,
}

/// Worker state in the server's registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    Idle,
    Busy,
    Lost,
    /// Said `bye`: stopped on purpose (SIGTERM, systemctl stop), not lost.
    Stopped,
}

impl WorkerState {
    /// Lost or stopped: not serving, not expected to speak.
    pub fn is_gone(self) -> bool {
        matches!(self, WorkerState::Lost | WorkerState::Stopped)
    }
}

/// One progress event of a testrun; `index` counts from 0 per testrun so a
/// follower can detect gaps in what PUB delivered and fetch the rest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressEvent {
    pub index: u64,
    pub task: Option<TaskId>,
    pub state: ProgressState,
    pub worker: Option<String>,
    pub verdict: Option<Verdict>,
    pub reason: Option<String>,
}

/// What a progress event announces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProgressState {
    Queued,
    Dispatched,
    Running,
    Requeued,
    Finished,
    Cancelled,
    /// The whole testrun ended; `verdict` is the testrun verdict.
    RunFinished,
    RunCancelled,
}

/// A lease as `leases` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceLease {
    pub lease: crate::protocol::leasing::LeaseId,
    pub state: crate::protocol::leasing::LeaseState,
    #[serde(default)]
    pub holder: Option<String>,
    pub device: DeviceSpec,
    /// The worker that holds the device (held or ended after a grant).
    #[serde(default)]
    pub worker: Option<String>,
    pub reason: String,
    pub priority: crate::protocol::testrun::Priority,
    /// Unix ms (server clock).
    pub requested_ms: u64,
    #[serde(default)]
    pub granted_ms: Option<u64>,
    #[serde(default)]
    pub until_ms: Option<u64>,
    #[serde(default)]
    pub ended_ms: Option<u64>,
    /// Why it ended.
    #[serde(default)]
    pub ended: Option<String>,
    /// Asked-for duration.
    pub duration_ms: u64,
    /// Milliseconds since the holder was last heard (held leases).
    #[serde(default)]
    pub idle_ms: Option<u64>,
    /// Its place in its queue (1: next), while waiting.
    #[serde(default)]
    pub position: Option<u64>,
    #[serde(default)]
    pub shared: Vec<String>,
    /// Consoles attached now.
    #[serde(default)]
    pub consoles: u32,
}
