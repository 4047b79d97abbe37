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
    #[serde(default)]
    history: Vec<StateChange>,
    #[serde(default)]
    log_bytes: u64,
    #[serde(default)]
    log_refused: u64,
    #[serde(default)]
    file_errors: BTreeMap<String, String>,
    #[serde(default)]
    refusals: u32,
    #[serde(default)]
    file_sizes: BTreeMap<String, u64>,
    /// What each stored JUnit file says (read once, when stored).
    #[serde(default)]
    junit: BTreeMap<String, Result<Option<CaseCounts>, String>>,
    #[serde(default)]
    avoid: Vec<String>,
    #[serde(default)]
    failed_on: Vec<String>,
    /// Fair-share rank; rows from before it rank by their queueing time.
    #[serde(default)]
    rank: Option<i64>,
    #[serde(default)]
    check_for: Option<String>,
    #[serde(default)]
    spec: usize,
}

#[derive(Serialize, Deserialize)]
struct RunRow {
    /// Without its secrets: those are only in `sealed_secrets`.
    request: TestrunRequest,
    #[serde(default)]
    sealed_secrets: Option<Vec<u8>>,
    tasks: Vec<TaskId>,
    state: RunState,
    verdict: Option<Verdict>,
    events: Vec<ProgressEvent>,
    #[serde(default)]
    submitted_ms: u64,
    #[serde(default)]
    ended_ms: Option<u64>,
    #[serde(default)]
    pruned: Option<Pruned>,
    #[serde(default)]
    role: Option<String>,
}

/// Only what must survive: identity, device, the task it has, and the dedup
/// window that keeps its resent reports from being applied twice.
#[derive(Serialize, Deserialize)]
struct WorkerRow {
    device: DeviceProps,
    session: String,
    task: Option<TaskId>,
    dedup: DedupWindow,
    #[serde(default)]
    drained: bool,
    /// Rows from before health tracking: `unknown`, checked if a check
    /// is configured.
    #[serde(default)]
    health: Option<WorkerHealth>,
    /// Its last tasks that ended, newest first.
    #[serde(default)]
    recent: Vec<TaskId>,
}

/// A stored row that does not decode.
#[derive(Debug, thiserror::Error)]
#[error("{table} row {key:?}: {reason}")]
pub struct RestoreError {
    pub table: &'static str,
    pub key: String,
    pub reason: String,
}

/// Checks a stored testrun against today's limits (an older server, or a
/// row written before a limit existed, may hold values that are not safe).
fn check_run(id: &str, row: &RunRow) -> Result<(), String> {
    use crate::protocol::limits;
    if !limits::is_safe_id(id) {
        return Err("testrun id outside the protocol's limits".into());
    }
    if !(1..=limits::MAX_TIMEOUT_SECS).contains(&row.request.timeout_secs) {
        return Err(format!(
            "timeout of {} s is outside 1–{} s",
            row.request.timeout_secs,
            limits::MAX_TIMEOUT_SECS
        ));
    }
    if let Some(p) = row
        .request
        .packages
        .iter()
        .find(|p| !limits::is_safe_package(p))
    {
        return Err(format!("test package name {p:?} is not safe"));
    }
    if let Some(t) = row.tasks.iter().find(|t| !limits::is_safe_id(t)) {
        return Err(format!("task id {t:?} is not safe"));
    }
    Ok(())
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

/// How far apart log accounting alone is committed.
pub(super) const LOG_ACCOUNTING_EVERY: Duration = Duration::from_millis(200);

impl<S: Store> Scheduler<S> {
    /// Everything that changed since the last call, encoded for the
    /// database. The shell commits it before sending any output, so no
    /// acknowledgement leaves before its effect is durable.
    /// `tasks` tasks and `runs` testruns of `owner` ended (quota counts).
    fn owner_closed(&mut self, owner: Option<&str>, tasks: usize, runs: usize) {
        let Some(owner) = owner else { return };
        if let Some(open) = self.open_by_owner.get_mut(owner) {
            open.0 = open.0.saturating_sub(tasks);
            open.1 = open.1.saturating_sub(runs);
            if *open == (0, 0) {
                self.open_by_owner.remove(owner);
            }
        }
    }

    pub fn take_changes(&mut self) -> Changes {
        if !self.log_touched.is_empty()
            && self.latest.saturating_duration_since(self.log_flushed_at) >= LOG_ACCOUNTING_EVERY
        {
            self.log_flushed_at = self.latest;
            let mut logs = std::mem::take(&mut self.log_touched);
            self.touched.append(&mut logs);
        }
        let mut changes = Changes {
            removed_workers: std::mem::take(&mut self.removed_workers),
            pruned_tasks: std::mem::take(&mut self.pruned_tasks),
            input_owners: std::mem::take(&mut self.touched_input_owners),
            history: std::mem::take(&mut self.history),
            notifications: Vec::new(),
            removed_notifications: Vec::new(),
            quarantine: std::mem::take(&mut self.quarantined)
                .into_iter()
                .map(|q| (q.table, q.key, q.reason))
                .collect(),
            ..Changes::default()
        };
        (changes.notifications, changes.removed_notifications) = self.notification_changes();
        for id in std::mem::take(&mut self.touched) {
            let Some(t) = self.tasks.get(&id) else {
                continue;
            };
            let key = format!("t:{id}");
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
                history: t.history.clone(),
                log_bytes: t.log_bytes,
                log_refused: t.log_refused,
                file_errors: t.file_errors.clone(),
                refusals: t.refusals,
                file_sizes: t.file_sizes.clone(),
                junit: t.junit.clone(),
                avoid: t.avoid.clone(),
                failed_on: t.failed_on.clone(),
                rank: Some(t.rank),
                check_for: t.check_for.clone(),
                spec: t.spec,
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
                if self.active_tasks.remove(&id) {
                    let owner = self.runs.get(&t.run).and_then(|r| r.request.owner.clone());
                    self.owner_closed(owner.as_deref(), 1, 0);
                }
                self.persisted.remove(&key);
            }
        }
        for id in std::mem::take(&mut self.touched_runs) {
            let Some(r) = self.runs.get(&id) else {
                continue;
            };
            let row = RunRow {
                sealed_secrets: r.sealed_secrets.clone(),
                request: r.request.clone(),
                tasks: r.tasks.clone(),
                state: r.state,
                verdict: r.verdict,
                events: r.events.clone(),
                submitted_ms: r.submitted_ms,
                ended_ms: r.ended_ms,
                pruned: r.pruned.clone(),
                role: r.role.clone(),
            };
            let bytes = encode(&row);
            let key = format!("r:{id}");
            let done = matches!(r.state, RunState::Finished | RunState::Cancelled);
            if self.persisted.get(&key) != Some(&bytes) {
                changes.runs.push((id.clone(), bytes.clone()));
                self.persisted.insert(key.clone(), bytes);
            }
            if done {
                if self.active_runs.remove(&id) {
                    let owner = r.request.owner.clone();
                    self.owner_closed(owner.as_deref(), 0, 1);
                }
                self.persisted.remove(&key);
            }
        }
        for name in std::mem::take(&mut self.touched_workers) {
            let Some(w) = self.workers.get(&name) else {
                continue;
            };
            let row = WorkerRow {
                device: w.device.clone(),
                session: w.session.clone(),
                task: w.task.clone(),
                dedup: w.dedup.clone(),
                drained: self.drained.contains(&name),
                health: Some(w.health.clone()),
                recent: w.recent.iter().cloned().collect(),
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
        for (sha256, owner) in &snap.input_owners {
            s.input_owners
                .entry(sha256.clone())
                .or_default()
                .insert(owner.clone());
        }
        for (key, value) in &snap.meta {
            if key == "next_run" {
                match value.parse() {
                    Ok(n) => s.next_run = n,
                    Err(_) => {
                        warn!(value = %value, "state: meta next_run is not a number; numbering new testruns after the highest stored one")
                    }
                }
            }
        }
        // A row that cannot be applied is moved aside (quarantine table)
        // with a log line naming it: the server starts and serves the rest,
        // instead of failing the same way at every restart.
        let mut quarantined = Vec::new();
        let mut quarantine = |table: &'static str, key: &str, reason: String| {
            tracing::error!(table, key, %reason, "state: row cannot be restored; moved to the quarantine table (inspect with sqlite3, then delete)");
            quarantined.push(RestoreError {
                table,
                key: key.to_string(),
                reason,
            });
        };
        let mut runs = BTreeMap::new();
        for (id, body) in &snap.runs {
            let row: RunRow = match decode("runs", id, body) {
                Ok(row) => row,
                Err(e) => {
                    quarantine("runs", id, e.reason);
                    continue;
                }
            };
            if let Err(e) = check_run(id, &row) {
                quarantine("runs", id, e);
                continue;
            }
            runs.insert(id.clone(), row);
        }
        let mut tasks = BTreeMap::new();
        for (id, body) in &snap.tasks {
            let row: TaskRow = match decode("tasks", id, body) {
                Ok(row) => row,
                Err(e) => {
                    quarantine("tasks", id, e.reason);
                    continue;
                }
            };
            if !runs.contains_key(&row.run) {
                quarantine(
                    "tasks",
                    id,
                    format!("belongs to testrun {} which is not restored", row.run),
                );
                continue;
            }
            tasks.insert(id.clone(), row);
        }
        // A testrun missing one of its tasks cannot be judged: it goes
        // aside with the tasks it has.
        let broken: Vec<RunId> = runs
            .iter()
            .filter(|(_, r)| r.tasks.iter().any(|t| !tasks.contains_key(t)))
            .map(|(id, _)| id.clone())
            .collect();
        for run in broken {
            let r = runs.remove(&run).expect("listed");
            quarantine("runs", &run, "one of its tasks is not restored".into());
            for t in &r.tasks {
                if tasks.remove(t).is_some() {
                    quarantine("tasks", t, format!("its testrun {run} is quarantined"));
                }
            }
        }
        let highest = runs
            .keys()
            .filter_map(|id| id.strip_prefix('r').and_then(|n| n.parse::<u64>().ok()))
            .max()
            .unwrap_or(0);
        s.next_run = s.next_run.max(highest.saturating_add(1));
        s.persisted_next_run = s.next_run;
        for (id, row) in runs {
            let id = &id;
            if !matches!(row.state, RunState::Finished | RunState::Cancelled) {
                s.active_runs.insert(id.clone());
            }
            let secrets = match &row.sealed_secrets {
                None => Some(BTreeMap::new()),
                Some(sealed) => {
                    let opened = s.open_secrets(id, sealed);
                    if opened.is_none() {
                        warn!(run = %id, "state: the testrun's secrets cannot be opened with this server key; its queued tasks end in ERROR");
                    }
                    opened
                }
            };
            s.runs.insert(
                id.clone(),
                Testrun {
                    secrets,
                    sealed_secrets: row.sealed_secrets,
                    request: row.request,
                    tasks: row.tasks,
                    state: row.state,
                    verdict: row.verdict,
                    events: row.events,
                    submitted_ms: row.submitted_ms,
                    ended_ms: row.ended_ms,
                    pruned: row.pruned,
                    role: row.role,
                },
            );
        }
        let mut queued = Vec::new();
        for (id, row) in tasks {
            let id = &id;
            let mut state = row.state;
            let mut since = instant(row.since_ms);
            if matches!(
                state,
                TaskState::Dispatched | TaskState::Running | TaskState::Held
            ) {
                // Its worker gets the grace period to come back and report.
                state = TaskState::Held;
                since = now;
                s.touched.insert(id.clone());
            }
            if state == TaskState::Queued {
                queued.push((row.order, id.clone()));
            }
            if !state.is_final() {
                s.active_tasks.insert(id.clone());
            }
            s.next_order = s.next_order.max(row.order.saturating_add(1));
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
                    history: row.history,
                    log_bytes: row.log_bytes,
                    log_refused: row.log_refused,
                    log_full_told: None,
                    file_errors: row.file_errors,
                    refusals: row.refusals,
                    file_sizes: row.file_sizes,
                    uploads: BTreeMap::new(),
                    junit: row.junit,
                    avoid: row.avoid,
                    failed_on: row.failed_on,
                    rank: row
                        .rank
                        .unwrap_or(i64::try_from(row.queued_at_ms).unwrap_or(i64::MAX)),
                    check_for: row.check_for,
                    spec: row.spec,
                },
            );
        }
        s.stored_bytes = s
            .tasks
            .values()
            .flat_map(|t| t.files.iter())
            .map(|f| f.size)
            .fold(0u64, u64::saturating_add);
        let ended: Vec<RunId> = s
            .runs
            .iter()
            .filter(|(_, r)| r.ended_ms.is_some() && r.pruned.is_none())
            .map(|(id, _)| id.clone())
            .collect();
        for run in ended {
            s.retain(&run);
        }
        queued.sort();
        for (_, id) in queued {
            s.enqueue(&id);
        }
        // Unfinished health checks wait for (or run on) their workers.
        let checks: Vec<(String, TaskId)> = s
            .active_tasks
            .iter()
            .filter_map(|id| Some((s.tasks.get(id)?.check_for.clone()?, id.clone())))
            .collect();
        for (w, id) in checks {
            s.checks.insert(w, id);
        }
        for (name, body) in &snap.workers {
            let row: WorkerRow = match decode("workers", name, body) {
                Ok(row) => row,
                Err(e) => {
                    quarantine("workers", name, e.reason);
                    continue;
                }
            };
            if !crate::protocol::limits::is_safe_id(name) || row.device.validate().is_err() {
                quarantine(
                    "workers",
                    name,
                    "name or device outside the protocol's limits".into(),
                );
                continue;
            }
            // The task it held must exist, be unfinished and be on this
            // worker; anything else (a quarantined task, a row from
            // another time) is forgotten, so no later step trips on it.
            let task = row.task.clone().filter(|t| {
                s.tasks.get(t).is_some_and(|task| {
                    !task.state.is_final() && task.worker.as_deref() == Some(name.as_str())
                })
            });
            if task.is_none() {
                if let Some(t) = &row.task {
                    warn!(worker = %name, task = %t, "state: the worker's task is not restored on it; the worker starts without it");
                }
            }
            if row.drained {
                s.drained.insert(name.clone());
            }
            s.workers.insert(
                name.clone(),
                Worker {
                    name: name.clone(),
                    device: row.device,
                    session: row.session,
                    peer: None,
                    state: WorkerState::Lost,
                    ready_since: None,
                    task,
                    last_heard: now,
                    dedup: row.dedup,
                    outbox: Outbox::new(s.cfg.retry.clone()),
                    health: row
                        .health
                        .unwrap_or_else(|| WorkerHealth::new(s.wall_ms(now))),
                    recent: row.recent.into_iter().take(RECENT_KEPT).collect(),
                },
            );
        }
        for (id, body) in &snap.notifications {
            let row: crate::notify::outbox::Entry = match decode("notifications", id, body) {
                Ok(row) => row,
                Err(e) => {
                    quarantine("notifications", id, e.reason);
                    continue;
                }
            };
            if row.delivery.id != *id {
                quarantine("notifications", id, "its id does not match its key".into());
                continue;
            }
            s.restore_notification(row);
        }
        let keys: Vec<Vec<String>> = s.workers.values().map(Worker::routing_keys).collect();
        for k in keys {
            s.index_device(Vec::new(), k);
        }
        let names: Vec<String> = s.workers.keys().cloned().collect();
        for name in &names {
            s.arm_health(now, name);
        }
        let ids: Vec<TaskId> = s.active_tasks.iter().cloned().collect();
        for id in &ids {
            // A log write cut short (a crash, a full disk) leaves a torn
            // line that the next lines would merge with: cut it.
            match s.store.repair_log(id) {
                Ok(0) => {}
                Ok(cut) => {
                    warn!(task = %id, bytes = cut, "task log ended in a torn line (a write cut short); cut back to the last whole line")
                }
                Err(e) => {
                    warn!(task = %id, error = %e, "storage error: cannot check the task log for a torn line")
                }
            }
        }
        for id in ids {
            s.schedule_task(&id);
        }
        // The per-owner quotas count what is unfinished.
        for id in &s.active_tasks {
            if let Some(owner) = s
                .tasks
                .get(id)
                .and_then(|t| s.runs.get(&t.run))
                .and_then(|r| r.request.owner.clone())
            {
                s.open_by_owner.entry(owner).or_default().0 += 1;
            }
        }
        for id in &s.active_runs {
            if let Some(owner) = s.runs.get(id).and_then(|r| r.request.owner.clone()) {
                s.open_by_owner.entry(owner).or_default().1 += 1;
            }
        }
        // Rows sanitized on the way in are written back at the first commit.
        s.touched_workers = s.workers.keys().cloned().collect();
        s.quarantined = quarantined;
        info!(
            runs = s.runs.len(),
            unfinished_tasks = s.active_tasks.len(),
            workers = s.workers.len(),
            "state restored"
        );
        Ok(s)
    }
}
