//! The scheduler's durable form: rows for testruns, tasks and workers,
//! produced as [`Changes`] after each batch of inputs (only what changed)
//! and read back by [`Scheduler::restore`] after a crash. Times are stored
//! as Unix milliseconds and mapped back onto the monotonic clock.

use super::*;
use crate::server::db::{Changes, Snapshot};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct TaskRow {
    run: RunId,
    packages: Vec<String>,
    state: TaskState,
    worker: Option<String>,
    attempts: u32,
    verdict: Option<Verdict>,
    reason: Option<String>,
    cases: Option<CaseCounts>,
    log: SeqRanges,
    log_lines_produced: Option<u64>,
    files: Vec<FileInfo>,
    since_ms: u64,
    queued_at_ms: u64,
    order: u64,
    cancel_requested: bool,
    received: BTreeMap<String, ByteRanges>,
    #[serde(default)]
    history: Vec<StateChange>,
}

#[derive(Serialize, Deserialize)]
struct RunRow {
    request: TestrunRequest,
    tasks: Vec<TaskId>,
    state: RunState,
    verdict: Option<Verdict>,
    events: Vec<ProgressEvent>,
}

/// Only what must survive: identity, device, the task it has, and the dedup
/// window that keeps its resent reports from being applied twice.
#[derive(Serialize, Deserialize)]
struct WorkerRow {
    device: DeviceProps,
    session: String,
    task: Option<TaskId>,
    dedup: DedupWindow,
}

/// A stored row that does not decode.
#[derive(Debug, thiserror::Error)]
#[error("{table} row {key:?}: {reason}")]
pub struct RestoreError {
    pub table: &'static str,
    pub key: String,
    pub reason: String,
}

fn encode<T: Serialize>(row: &T) -> Vec<u8> {
    rmp_serde::to_vec_named(row).expect("rows serialise")
}

fn decode<T: for<'de> Deserialize<'de>>(
    table: &'static str,
    key: &str,
    body: &[u8],
) -> Result<T, RestoreError> {
    rmp_serde::from_slice(body).map_err(|e| RestoreError {
        table,
        key: key.to_string(),
        reason: e.to_string(),
    })
}

impl<S: Store> Scheduler<S> {
    /// Everything that changed since the last call, encoded for the
    /// database. The shell commits it before sending any output, so no
    /// acknowledgement leaves before its effect is durable.
    pub fn take_changes(&mut self) -> Changes {
        let mut changes = Changes {
            history: std::mem::take(&mut self.history),
            ..Changes::default()
        };
        let touched = std::mem::take(&mut self.touched);
        for id in self.active_tasks.clone() {
            let t = &self.tasks[&id];
            let key = format!("t:{id}");
            // Waiting in a queue, untouched, already stored: unchanged.
            if t.state == TaskState::Queued
                && !touched.contains(&id)
                && self.persisted.contains_key(&key)
            {
                continue;
            }
            let row = TaskRow {
                run: t.run.clone(),
                packages: t.packages.clone(),
                state: t.state,
                worker: t.worker.clone(),
                attempts: t.attempts,
                verdict: t.verdict,
                reason: t.reason.clone(),
                cases: t.cases,
                log: t.log.clone(),
                log_lines_produced: t.log_lines_produced,
                files: t.files.clone(),
                since_ms: self.wall_ms(t.since),
                queued_at_ms: self.wall_ms(t.queued_at),
                order: t.order,
                cancel_requested: t.cancel_requested,
                received: t.received.clone(),
                history: t.history.clone(),
            };
            let bytes = encode(&row);
            let done = t.state.is_final();
            if self.persisted.get(&key) != Some(&bytes) {
                if done {
                    for f in &t.files {
                        changes
                            .files
                            .push((id.clone(), f.name.clone(), f.size, f.sha256.clone()));
                    }
                }
                changes
                    .tasks
                    .push((id.clone(), t.run.clone(), bytes.clone()));
                self.persisted.insert(key.clone(), bytes);
            }
            if done {
                self.active_tasks.remove(&id);
                self.persisted.remove(&key);
            }
        }
        for id in self.active_runs.clone() {
            let r = &self.runs[&id];
            let row = RunRow {
                request: r.request.clone(),
                tasks: r.tasks.clone(),
                state: r.state,
                verdict: r.verdict,
                events: r.events.clone(),
            };
            let bytes = encode(&row);
            let key = format!("r:{id}");
            let done = matches!(r.state, RunState::Finished | RunState::Cancelled);
            if self.persisted.get(&key) != Some(&bytes) {
                changes.runs.push((id.clone(), bytes.clone()));
                self.persisted.insert(key.clone(), bytes);
            }
            if done {
                self.active_runs.remove(&id);
                self.persisted.remove(&key);
            }
        }
        for w in self.workers.values() {
            let row = WorkerRow {
                device: w.device.clone(),
                session: w.session.clone(),
                task: w.task.clone(),
                dedup: w.dedup.clone(),
            };
            let bytes = encode(&row);
            let key = format!("w:{}", w.name);
            if self.persisted.get(&key) != Some(&bytes) {
                changes.workers.push((w.name.clone(), bytes.clone()));
                self.persisted.insert(key, bytes);
            }
        }
        if self.next_run != self.persisted_next_run {
            changes
                .meta
                .push(("next_run".into(), self.next_run.to_string()));
            self.persisted_next_run = self.next_run;
        }
        changes
    }

    /// Rebuilds the scheduler from stored rows after a restart. Queued
    /// tasks stay queued; tasks that were dispatched or running are held for
    /// their worker to come back and say where it is (still running →
    /// continue; finished → its report is applied; gone → re-queued per the
    /// retry rules); workers count as lost until they register again.
    pub fn restore(
        cfg: SchedulerConfig,
        store: S,
        incarnation: String,
        snap: &Snapshot,
        now: Instant,
    ) -> Result<Self, RestoreError> {
        let mut s = Scheduler::new(cfg, store, incarnation);
        let wall_now = s.wall_ms(now);
        let instant = |ms: u64| {
            now.checked_sub(Duration::from_millis(wall_now.saturating_sub(ms)))
                .unwrap_or(now)
        };
        for (key, value) in &snap.meta {
            if key == "next_run" {
                s.next_run = value.parse().map_err(|_| RestoreError {
                    table: "meta",
                    key: key.clone(),
                    reason: format!("{value:?} is not a number"),
                })?;
            }
        }
        s.persisted_next_run = s.next_run;
        for (id, body) in &snap.runs {
            let row: RunRow = decode("runs", id, body)?;
            if !matches!(row.state, RunState::Finished | RunState::Cancelled) {
                s.active_runs.insert(id.clone());
            }
            s.runs.insert(
                id.clone(),
                Testrun {
                    request: row.request,
                    tasks: row.tasks,
                    state: row.state,
                    verdict: row.verdict,
                    events: row.events,
                },
            );
        }
        let mut queued = Vec::new();
        for (id, body) in &snap.tasks {
            let row: TaskRow = decode("tasks", id, body)?;
            if !s.runs.contains_key(&row.run) {
                return Err(RestoreError {
                    table: "tasks",
                    key: id.clone(),
                    reason: format!("belongs to testrun {} which is not stored", row.run),
                });
            }
            let mut state = row.state;
            let mut since = instant(row.since_ms);
            if matches!(
                state,
                TaskState::Dispatched | TaskState::Running | TaskState::Held
            ) {
                // Its worker gets the grace period to come back and report.
                state = TaskState::Held;
                since = now;
            }
            if state == TaskState::Queued {
                queued.push((row.order, id.clone()));
            }
            if !state.is_final() {
                s.active_tasks.insert(id.clone());
            }
            s.next_order = s.next_order.max(row.order + 1);
            s.tasks.insert(
                id.clone(),
                Task {
                    id: id.clone(),
                    run: row.run,
                    packages: row.packages,
                    state,
                    worker: row.worker,
                    attempts: row.attempts,
                    verdict: row.verdict,
                    reason: row.reason,
                    cases: row.cases,
                    log: row.log,
                    log_lines_produced: row.log_lines_produced,
                    files: row.files,
                    since,
                    queued_at: instant(row.queued_at_ms),
                    order: row.order,
                    cancel_requested: row.cancel_requested,
                    received: row.received,
                    history: row.history,
                },
            );
        }
        queued.sort();
        for (_, id) in queued {
            let key = s.runs[&s.tasks[&id].run].request.device.routing_key();
            s.queues.entry(key).or_default().push_back(id);
        }
        for (name, body) in &snap.workers {
            let row: WorkerRow = decode("workers", name, body)?;
            s.workers.insert(
                name.clone(),
                Worker {
                    name: name.clone(),
                    device: row.device,
                    session: row.session,
                    peer: None,
                    state: WorkerState::Lost,
                    ready_since: None,
                    task: row.task,
                    last_heard: now,
                    dedup: row.dedup,
                    outbox: Outbox::new(s.cfg.retry.clone()),
                },
            );
        }
        info!(
            runs = s.runs.len(),
            unfinished_tasks = s.active_tasks.len(),
            workers = s.workers.len(),
            "state restored"
        );
        Ok(s)
    }
}
