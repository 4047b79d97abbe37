//! What the scheduler keeps of each worker, testrun and task.

use super::uploads;
use super::PeerId;
use crate::delivery::{DedupWindow, Outbox, SeqRanges};
use crate::protocol::*;
use crate::server::fairshare;
use crate::server::health::WorkerHealth;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Instant;

pub(super) struct Worker {
    pub(super) name: String,
    pub(super) device: DeviceProps,
    /// Process incarnation of the worker; dedup key with seq.
    pub(super) session: String,
    pub(super) peer: Option<PeerId>,
    pub(super) state: WorkerState,
    /// Set while the worker asked for work and has none.
    pub(super) ready_since: Option<Instant>,
    pub(super) task: Option<TaskId>,
    pub(super) last_heard: Instant,
    pub(super) dedup: DedupWindow,
    /// The server's mandatory messages to this worker session, until acked.
    pub(super) outbox: Outbox,
    /// What the server believes about its device.
    pub(super) health: WorkerHealth,
    /// Its last tasks that ended, newest first (at most [`RECENT_KEPT`]).
    pub(super) recent: VecDeque<TaskId>,
}

/// Ended tasks each worker remembers for its page (`health_report`).
pub const RECENT_KEPT: usize = 20;

impl Testrun {
    /// The routing keys of its device specs.
    pub(super) fn all_keys(&self) -> BTreeSet<String> {
        self.request
            .all_devices()
            .map(DeviceSpec::routing_key)
            .collect()
    }
}

impl Worker {
    pub(super) fn routing_keys(&self) -> Vec<String> {
        let d = &self.device;
        let mut keys = vec![d.devicegroup.clone()];
        if let Some(n) = &d.devicename {
            keys.push(format!("{}.{}", d.devicegroup, n));
            if let Some(i) = &d.deviceid {
                keys.push(format!("{}.{}.{}", d.devicegroup, n, i));
            }
        }
        keys
    }
}

pub(super) struct Task {
    pub(super) id: TaskId,
    pub(super) run: RunId,
    pub(super) packages: Vec<String>,
    pub(super) state: TaskState,
    pub(super) worker: Option<String>,
    pub(super) attempts: u32,
    pub(super) verdict: Option<Verdict>,
    pub(super) reason: Option<String>,
    pub(super) cases: Option<CaseCounts>,
    /// Sequence numbers of the log lines stored.
    pub(super) log: SeqRanges,
    pub(super) log_lines_produced: Option<u64>,
    pub(super) files: Vec<FileInfo>,
    /// When the task entered its current state.
    pub(super) since: Instant,
    /// When the task was first queued (queue timeout).
    pub(super) queued_at: Instant,
    /// Global order of queueing, to compare heads of different queues.
    pub(super) order: u64,
    pub(super) cancel_requested: bool,
    /// Every state change, oldest first.
    pub(super) history: Vec<StateChange>,
    /// Bytes of this attempt's log stored, against `max_task_log_bytes`.
    pub(super) log_bytes: u64,
    /// Log lines of this attempt refused by a limit (log size, gaps).
    pub(super) log_refused: u64,
    /// The attempt's log is full (a line was refused for
    /// `max_task_log_bytes`) and when its worker was last told so
    /// (`log_full`). In memory only: after a restart the next refusal
    /// finds it again.
    pub(super) log_full_told: Option<Instant>,
    /// Result files of this attempt the server refused, with the reason:
    /// the final report does not wait for them, and the verdict says why.
    pub(super) file_errors: BTreeMap<String, String>,
    /// Times workers refused this task (a refusal uses no attempt).
    pub(super) refusals: u32,
    /// Declared size of each result file of this attempt, as first offered.
    pub(super) file_sizes: BTreeMap<String, u64>,
    /// Result files of this attempt in transfer (not stored: after a
    /// restart the worker offers them again).
    pub(super) uploads: BTreeMap<String, uploads::Upload>,
    /// What each stored JUnit file of this attempt says, read by the file
    /// desk when it stored it.
    pub(super) junit: BTreeMap<String, Result<Option<CaseCounts>, String>>,
    /// Workers on which an attempt failed for infrastructure reasons, one
    /// entry per failure (bounded by the attempts).
    pub(super) failed_on: Vec<String>,
    /// Workers it is not given to again: where it failed, when another
    /// worker could take it, or where it failed twice.
    pub(super) avoid: Vec<String>,
    /// Its standing among its owner's queued tasks (fair share).
    pub(super) rank: fairshare::Rank,
    /// A health check of this worker: never queued, dispatched to it
    /// before anything else.
    pub(super) check_for: Option<String>,
    /// A task that runs only on this worker, before anything else queued
    /// (a testrun on a lease, `run --lease`; a lease's hold resuming
    /// after one): never in a routing queue.
    pub(super) pinned: Option<String>,
    /// Which of its testrun's device specs it runs on (0: `device`, then
    /// `devices` in order).
    pub(super) spec: usize,
    /// Its first failing test cases, with the result file of each (at
    /// most `limits::FAILING_CASES_SHOWN`; the counts say how many).
    pub(super) failing: Vec<(String, FailingCase)>,
}

pub(super) struct Testrun {
    /// As submitted, with `secrets` taken out (they are below).
    pub(super) request: TestrunRequest,
    /// The testrun's secrets: `None` if they could not be restored after a
    /// restart (sealed under another server key).
    pub(super) secrets: Option<BTreeMap<String, String>>,
    /// The secrets sealed for the state database, made once at submit.
    pub(super) sealed_secrets: Option<Vec<u8>>,
    pub(super) tasks: Vec<TaskId>,
    pub(super) state: RunState,
    pub(super) verdict: Option<Verdict>,
    pub(super) events: Vec<ProgressEvent>,
    /// When it was submitted and when it ended (Unix ms, server clock).
    pub(super) submitted_ms: u64,
    pub(super) ended_ms: Option<u64>,
    /// What the retention policy removed, once it has.
    pub(super) pruned: Option<Pruned>,
    /// The owner's role at submit (for its fair-share weight).
    pub(super) role: Option<String>,
    /// Finished; its triage against its series is asked and its
    /// `testrun_finished` waits for it (kept loaded until then).
    pub(super) awaiting_triage: bool,
}
