//! The scheduler's durable form: rows for testruns, tasks and workers,
//! produced as [`Changes`] after each batch of inputs (only what changed)
//! and read back by [`Scheduler::restore`] after a crash. Times are stored
//! as Unix milliseconds and mapped back onto the monotonic clock.

use super::*;
use crate::server::store::db::{Changes, Snapshot};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
pub(super) struct TaskRow {
    run: RunId,
    packages: Vec<String>,
    pub(super) state: TaskState,
    worker: Option<String>,
    attempts: u32,
    verdict: Option<Verdict>,
    reason: Option<String>,
    cases: Option<CaseCounts>,
    log: SeqRanges,
    log_lines_produced: Option<u64>,
    files: Vec<FileInfo>,
    pub(super) since_ms: u64,
    pub(super) queued_at_ms: u64,
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pinned: Option<String>,
    #[serde(default)]
    spec: usize,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    failing: Vec<(String, FailingCase)>,
}

#[derive(Serialize, Deserialize)]
pub(super) struct RunRow {
    /// Without its secrets: those are only in `sealed_secrets`.
    request: TestrunRequest,
    #[serde(default)]
    sealed_secrets: Option<Vec<u8>>,
    pub(super) tasks: Vec<TaskId>,
    pub(super) state: RunState,
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
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    awaiting_triage: bool,
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
pub(super) fn check_run(id: &str, row: &RunRow) -> Result<(), String> {
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

pub(super) fn encode<T: Serialize>(row: &T) -> Vec<u8> {
    rmp_serde::to_vec_named(row).expect("rows serialise")
}

pub(super) fn decode<T: for<'de> Deserialize<'de>>(
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
        self.evict_past_cache();
        self.pending.due_log_accounting(self.latest);
        let mut changes = Changes {
            removed_workers: std::mem::take(&mut self.pending.removed_workers),
            pruned_tasks: std::mem::take(&mut self.pending.pruned_tasks),
            input_owners: std::mem::take(&mut self.pending.input_owners),
            history: std::mem::take(&mut self.pending.history),
            notifications: Vec::new(),
            removed_notifications: Vec::new(),
            quarantine: std::mem::take(&mut self.pending.quarantined)
                .into_iter()
                .map(|q| (q.table, q.key, q.reason))
                .collect(),
            ..Changes::default()
        };
        (changes.notifications, changes.removed_notifications) = self.notification_changes();
        for id in self.pending.take_tasks() {
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
                pinned: t.pinned.clone(),
                spec: t.spec,
                failing: t.failing.clone(),
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
        for id in std::mem::take(&mut self.pending.runs) {
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
                awaiting_triage: r.awaiting_triage,
            };
            let bytes = encode(&row);
            let key = format!("r:{id}");
            let done = matches!(r.state, RunState::Finished | RunState::Cancelled);
            if self.persisted.get(&key) != Some(&bytes) {
                changes
                    .runs
                    .push((id.clone(), bytes.clone(), self.index_of(&id, r)));
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
        for name in std::mem::take(&mut self.pending.workers) {
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
        self.known_changes(&mut changes.meta);
        changes.usage = self.usage.take_rows();
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
        (now, unix_ms): (Instant, u64),
    ) -> Result<Self, RestoreError> {
        let mut s = Scheduler::new(cfg, store, incarnation, now, unix_ms);
        let mut quarantine = Quarantine::default();
        s.restore_meta(snap);
        let (runs, tasks) = decode_runs_and_tasks(snap, &mut quarantine);
        s.restore_runs(runs, snap.highest_run);
        let awaiting: Vec<RunId> = (s.runs.iter())
            .filter(|(_, r)| r.awaiting_triage)
            .map(|(id, _)| id.clone())
            .collect();
        for run in &awaiting {
            s.ask_triage(run);
        }
        let queued = s.restore_tasks(tasks, now);
        s.rebuild_queues(queued, snap);
        s.restore_workers(snap, now, &mut quarantine);
        s.restore_notifications(snap, &mut quarantine);
        s.restore_leases(now);
        s.rearm(now);
        // Rows sanitized on the way in are written back at the first commit.
        s.pending.workers = s.workers.keys().cloned().collect();
        s.pending.quarantined = quarantine.rows;
        info!(
            runs = s.runs.len(),
            unfinished_runs = s.active_runs.len(),
            unfinished_tasks = s.active_tasks.len(),
            workers = s.workers.len(),
            "state restored"
        );
        Ok(s)
    }

    /// Who uploaded each input; where testrun numbering goes on.
    fn restore_meta(&mut self, snap: &Snapshot) {
        for (sha256, owner) in &snap.input_owners {
            self.input_owners
                .entry(sha256.clone())
                .or_default()
                .insert(owner.clone());
        }
        for (key, value) in &snap.meta {
            if Self::is_known_meta(key) {
                self.restore_known(value);
            }
            if key == "next_run" {
                match value.parse() {
                    Ok(n) => self.next_run = n,
                    Err(_) => {
                        warn!(value = %value, "state: meta next_run is not a number; numbering new testruns after the highest stored one")
                    }
                }
            }
        }
    }

    /// The unfinished testruns (and, once after the migration to schema
    /// 7, ended ones stored without their index: written back with it,
    /// then let go like any ended testrun).
    fn restore_runs(&mut self, runs: BTreeMap<RunId, RunRow>, highest_stored: u64) {
        let highest = runs
            .keys()
            .filter_map(|id| {
                id.strip_prefix(['r', 'l'])
                    .and_then(|n| n.parse::<u64>().ok())
            })
            .max()
            .unwrap_or(0)
            .max(highest_stored);
        self.next_run = self.next_run.max(highest.saturating_add(1));
        self.persisted_next_run = self.next_run;
        for (id, row) in runs {
            let done = matches!(row.state, RunState::Finished | RunState::Cancelled);
            if !done {
                self.active_runs.insert(id.clone());
            }
            let secrets = match &row.sealed_secrets {
                None => Some(BTreeMap::new()),
                Some(_) if done => None,
                Some(sealed) => {
                    let opened = self.open_secrets(&id, sealed);
                    if opened.is_none() {
                        warn!(run = %id, "state: the testrun's secrets cannot be opened with this server key; its queued tasks end in ERROR");
                    }
                    opened
                }
            };
            // Written back with the columns of schema 7 at the first commit.
            self.pending.runs.insert(id.clone());
            self.runs.insert(id, testrun_of_row(row, secrets));
        }
    }

    /// The tasks, with their times mapped back onto the monotonic clock;
    /// returns the queued ones with their order.
    fn restore_tasks(
        &mut self,
        tasks: BTreeMap<TaskId, TaskRow>,
        now: Instant,
    ) -> Vec<(u64, TaskId)> {
        let mut queued = Vec::new();
        for (id, row) in tasks {
            let mut state = row.state;
            let mut since = self.instant_of(now, row.since_ms);
            if matches!(
                state,
                TaskState::Dispatched | TaskState::Running | TaskState::Held
            ) {
                // Its worker gets the grace period to come back and report.
                state = TaskState::Held;
                since = now;
                self.pending.tasks.insert(id.clone());
            }
            if state == TaskState::Queued {
                queued.push((row.order, id.clone()));
            }
            if !state.is_final() {
                self.active_tasks.insert(id.clone());
            }
            self.next_order = self.next_order.max(row.order.saturating_add(1));
            let queued_at = self.instant_of(now, row.queued_at_ms);
            self.tasks
                .insert(id.clone(), task_of_row(id, row, state, since, queued_at));
        }
        queued
    }

    /// Stored bytes, kept files, queues in their order, health checks.
    /// Of the ended testruns only sums are loaded (`snap`); those read
    /// once after the migration count here and go to the cache.
    fn rebuild_queues(&mut self, mut queued: Vec<(u64, TaskId)>, snap: &Snapshot) {
        self.stored_bytes = self
            .tasks
            .values()
            .filter(|t| !t.state.is_final())
            .flat_map(|t| t.files.iter())
            .map(|f| f.size)
            .fold(snap.file_bytes, u64::saturating_add);
        self.retained.restore(snap.kept_bytes, snap.oldest_kept_ms);
        let ended: Vec<RunId> = self
            .runs
            .iter()
            .filter(|(_, r)| matches!(r.state, RunState::Finished | RunState::Cancelled))
            .map(|(id, _)| id.clone())
            .collect();
        for run in ended {
            if self.runs[&run].ended_ms.is_some() && self.runs[&run].pruned.is_none() {
                self.retain(&run);
            } else {
                self.recall.cached.push_back(run);
            }
        }
        queued.sort();
        for (_, id) in queued {
            self.enqueue(&id);
        }
        // Unfinished health checks wait for (or run on) their workers.
        let checks: Vec<(String, TaskId)> = self
            .active_tasks
            .iter()
            .filter_map(|id| Some((self.tasks.get(id)?.check_for.clone()?, id.clone())))
            .collect();
        for (w, id) in checks {
            self.checks.insert(w, id);
        }
    }

    /// The registry: every worker lost until it registers again.
    fn restore_workers(&mut self, snap: &Snapshot, now: Instant, quarantine: &mut Quarantine) {
        for (name, body) in &snap.workers {
            let row: WorkerRow = match decode("workers", name, body) {
                Ok(row) => row,
                Err(e) => {
                    quarantine.put("workers", name, e.reason);
                    continue;
                }
            };
            if !crate::protocol::limits::is_safe_id(name) || row.device.validate().is_err() {
                quarantine.put(
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
                self.tasks.get(t).is_some_and(|task| {
                    !task.state.is_final() && task.worker.as_deref() == Some(name.as_str())
                })
            });
            if task.is_none() {
                if let Some(t) = &row.task {
                    warn!(worker = %name, task = %t, "state: the worker's task is not restored on it; the worker starts without it");
                }
            }
            if row.drained {
                self.drained.insert(name.clone());
            }
            let health = row
                .health
                .unwrap_or_else(|| WorkerHealth::new(self.wall_ms(now)));
            self.workers.insert(
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
                    outbox: Outbox::new(self.cfg.retry.clone()),
                    health,
                    recent: row.recent.into_iter().take(RECENT_KEPT).collect(),
                },
            );
        }
    }

    fn restore_notifications(&mut self, snap: &Snapshot, quarantine: &mut Quarantine) {
        for (id, body) in &snap.notifications {
            let row: crate::notify::outbox::Entry = match decode("notifications", id, body) {
                Ok(row) => row,
                Err(e) => {
                    quarantine.put("notifications", id, e.reason);
                    continue;
                }
            };
            if row.delivery.id != *id {
                quarantine.put("notifications", id, "its id does not match its key".into());
                continue;
            }
            self.restore_notification(row);
        }
    }

    /// Indexes, health deadlines, torn log lines cut, task deadlines, the
    /// per-owner quotas of what is unfinished.
    fn rearm(&mut self, now: Instant) {
        let keys: Vec<Vec<String>> = self.workers.values().map(Worker::routing_keys).collect();
        for k in keys {
            self.index_device(Vec::new(), k);
        }
        let names: Vec<String> = self.workers.keys().cloned().collect();
        for name in &names {
            self.arm_health(now, name);
        }
        let ids: Vec<TaskId> = self.active_tasks.iter().cloned().collect();
        for id in &ids {
            // A log write cut short (a crash, a full disk) leaves a torn
            // line that the next lines would merge with: cut it.
            match self.store.repair_log(id) {
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
            self.schedule_task(&id);
        }
        for id in &self.active_tasks {
            if let Some(owner) = self
                .tasks
                .get(id)
                .and_then(|t| self.runs.get(&t.run))
                .and_then(|r| r.request.owner.clone())
            {
                self.open_by_owner.entry(owner).or_default().0 += 1;
            }
        }
        for id in &self.active_runs {
            if let Some(owner) = self.runs.get(id).and_then(|r| r.request.owner.clone()) {
                self.open_by_owner.entry(owner).or_default().1 += 1;
            }
        }
    }
}

/// Rows that cannot be applied are moved aside (quarantine table) with a
/// log line naming each: the server starts and serves the rest, instead
/// of failing the same way at every restart.
#[derive(Default)]
struct Quarantine {
    rows: Vec<RestoreError>,
}

impl Quarantine {
    fn put(&mut self, table: &'static str, key: &str, reason: String) {
        tracing::error!(table, key, %reason, "state: row cannot be restored; moved to the quarantine table (inspect with sqlite3, then delete)");
        self.rows.push(RestoreError {
            table,
            key: key.to_string(),
            reason,
        });
    }
}

/// The testruns and tasks that decode and check; a testrun missing one of
/// its tasks cannot be judged, so it goes aside with the tasks it has.
fn decode_runs_and_tasks(
    snap: &Snapshot,
    quarantine: &mut Quarantine,
) -> (BTreeMap<RunId, RunRow>, BTreeMap<TaskId, TaskRow>) {
    let mut runs = BTreeMap::new();
    for (id, body) in &snap.runs {
        let row: RunRow = match decode("runs", id, body) {
            Ok(row) => row,
            Err(e) => {
                quarantine.put("runs", id, e.reason);
                continue;
            }
        };
        if let Err(e) = check_run(id, &row) {
            quarantine.put("runs", id, e);
            continue;
        }
        runs.insert(id.clone(), row);
    }
    let mut tasks = BTreeMap::new();
    for (id, body) in &snap.tasks {
        let row: TaskRow = match decode("tasks", id, body) {
            Ok(row) => row,
            Err(e) => {
                quarantine.put("tasks", id, e.reason);
                continue;
            }
        };
        if !runs.contains_key(&row.run) {
            quarantine.put(
                "tasks",
                id,
                format!("belongs to testrun {} which is not restored", row.run),
            );
            continue;
        }
        tasks.insert(id.clone(), row);
    }
    let broken: Vec<RunId> = runs
        .iter()
        .filter(|(_, r)| r.tasks.iter().any(|t| !tasks.contains_key(t)))
        .map(|(id, _)| id.clone())
        .collect();
    for run in broken {
        let r = runs.remove(&run).expect("listed");
        quarantine.put("runs", &run, "one of its tasks is not restored".into());
        for t in &r.tasks {
            if tasks.remove(t).is_some() {
                quarantine.put("tasks", t, format!("its testrun {run} is quarantined"));
            }
        }
    }
    (runs, tasks)
}

/// A task as the scheduler holds it, from its row.
pub(super) fn task_of_row(
    id: TaskId,
    row: TaskRow,
    state: TaskState,
    since: Instant,
    queued_at: Instant,
) -> Task {
    Task {
        id,
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
        queued_at,
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
        pinned: row.pinned,
        spec: row.spec,
        failing: row.failing,
    }
}

/// A testrun as the scheduler holds it, from its row.
pub(super) fn testrun_of_row(row: RunRow, secrets: Option<BTreeMap<String, String>>) -> Testrun {
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
        awaiting_triage: row.awaiting_triage,
    }
}
