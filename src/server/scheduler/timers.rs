//! Time: the heartbeat tick, worker liveness, held tasks, queue timeouts,
//! the execution-timeout backstop and unanswered dispatches.

use super::*;

/// What a deadline on the heap is for.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Due {
    /// The worker's liveness window.
    Worker(String),
    /// Whatever timeout the task's state has (hold, queue, backstop,
    /// unanswered dispatch).
    Task(TaskId),
    /// The worker's next health check or retry, due at this Unix ms.
    Health(String, u64),
}

impl<S: Store> Scheduler<S> {
    /// When the task's current state times out, if it does.
    pub(super) fn task_deadline(&self, id: &TaskId) -> Option<Instant> {
        let t = self.tasks.get(id)?;
        let limit = self.cfg.heartbeat * self.cfg.liveness;
        match t.state {
            TaskState::Held => t.since.checked_add(self.cfg.lost_grace),
            TaskState::Queued => t.queued_at.checked_add(self.cfg.queue_timeout),
            TaskState::Running => {
                let timeout = Duration::from_secs(self.runs.get(&t.run)?.request.timeout_secs);
                t.since
                    .checked_add(timeout.saturating_add(self.cfg.backstop_grace))
            }
            TaskState::Dispatched => t
                .since
                .checked_add(self.cfg.dispatch_ttl.saturating_add(limit)),
            TaskState::Finished | TaskState::Cancelled => None,
        }
    }

    /// Arms the deadline of the task's current state.
    pub(super) fn schedule_task(&mut self, id: &TaskId) {
        if let Some(at) = self.task_deadline(id) {
            self.deadlines
                .push(std::cmp::Reverse((at, Due::Task(id.clone()))));
            self.compact_deadlines();
        }
    }

    /// A task's earlier deadlines stay on the heap until they come due
    /// (a queued task's is `queue_timeout` away, a day by default), also
    /// once it ended: past twice what is live the heap is rebuilt with
    /// the entries of unfinished tasks only, so it is bounded by the
    /// lab's current load, not by the tasks of the last day. Amortised:
    /// each rebuild at least halves it.
    fn compact_deadlines(&mut self) {
        let live = self.active_tasks.len() + 2 * self.workers.len() + 1024;
        if self.deadlines.len() <= 2 * live {
            return;
        }
        let before = self.deadlines.len();
        let heap = std::mem::take(&mut self.deadlines).into_vec();
        self.deadlines = heap
            .into_iter()
            .filter(|std::cmp::Reverse((_, due))| match due {
                Due::Task(id) => self.active_tasks.contains(id),
                Due::Worker(_) | Due::Health(..) => true,
            })
            .collect();
        self.count(
            "deadlines_forgotten",
            before.saturating_sub(self.deadlines.len()) as u64,
        );
    }

    /// Arms the worker's liveness deadline, once: a worker has at most one
    /// entry on the heap, re-armed from its last sign of life when it comes
    /// due, so repeated hellos or reconnects never pile entries up.
    pub(super) fn schedule_worker(&mut self, name: &str) {
        if self.armed.contains(name) {
            return;
        }
        let limit = self.cfg.heartbeat * self.cfg.liveness;
        if let Some(at) = self
            .workers
            .get(name)
            .and_then(|w| w.last_heard.checked_add(limit))
        {
            self.deadlines
                .push(std::cmp::Reverse((at, Due::Worker(name.to_string()))));
            self.armed.insert(name.to_string());
        }
    }

    /// Called every heartbeat interval: heartbeat, liveness and timeouts.
    pub fn on_tick(&mut self, now: Instant) {
        self.latest = self.latest.max(now);
        self.heartbeat(now);
        self.observe_usage(now);
        self.apply_retention(now);
        self.notify_tick(now);
        self.forgive_own_stall(now);
        self.lease_tick(now);
        let due_tasks = self.take_due(now);
        self.expire_tasks(now, due_tasks);
        self.resend_outboxes(now);
    }

    /// If this server was not scheduled for a while (SIGSTOP, overload),
    /// the silence was ours: do not blame the workers for it.
    fn forgive_own_stall(&mut self, now: Instant) {
        if let Some(last) = self.last_tick {
            let gap = now.saturating_duration_since(last);
            if gap > self.cfg.heartbeat * 2 {
                warn!(
                    stalled_ms = gap.as_millis() as u64,
                    "server was not running for a while; giving workers a fresh liveness window"
                );
                for w in self.workers.values_mut() {
                    w.last_heard = now;
                }
            }
        }
        self.last_tick = Some(now);
    }

    /// Only what is due: deadlines come off a heap, each checked against
    /// the worker's or task's current state (an entry made stale by a
    /// later message or state change is re-armed or dropped). Silent
    /// workers are lost and health deadlines acted on here; the tasks
    /// due are returned.
    fn take_due(&mut self, now: Instant) -> Vec<TaskId> {
        let limit = self.cfg.heartbeat * self.cfg.liveness;
        let mut lost = Vec::new();
        let mut due_tasks = Vec::new();
        let mut due_health = Vec::new();
        while let Some(std::cmp::Reverse((at, _))) = self.deadlines.peek() {
            if *at >= now {
                break;
            }
            let std::cmp::Reverse((_, due)) = self.deadlines.pop().expect("peeked");
            match due {
                Due::Worker(name) => {
                    self.armed.remove(&name);
                    let Some(w) = self.workers.get(&name) else {
                        continue;
                    };
                    if w.state.is_gone() {
                        continue;
                    }
                    if now.saturating_duration_since(w.last_heard) > limit {
                        lost.push(name);
                    } else {
                        self.schedule_worker(&name);
                    }
                }
                Due::Health(name, ms) => due_health.push((name, ms)),
                Due::Task(id) => match self.task_deadline(&id) {
                    Some(at) if now > at => due_tasks.push(id),
                    Some(at) => self.deadlines.push(std::cmp::Reverse((at, Due::Task(id)))),
                    None => {}
                },
            }
        }
        lost.sort();
        lost.dedup();
        for name in lost {
            self.worker_lost(now, &name, "no heartbeat");
        }
        due_tasks.sort();
        due_tasks.dedup();
        for (name, ms) in due_health {
            self.health_due(now, &name, ms);
        }
        due_tasks
    }

    /// Tasks whose deadline passed: a hold its worker did not come back
    /// for, a queue timeout, the execution backstop, a dispatch never
    /// accepted.
    fn expire_tasks(&mut self, now: Instant, due_tasks: Vec<TaskId>) {
        let limit = self.cfg.heartbeat * self.cfg.liveness;
        let mut expired_holds = Vec::new();
        let mut queue_timeouts = Vec::new();
        let mut backstops = Vec::new();
        let mut unanswered = Vec::new();
        for id in due_tasks {
            // Still due after what the lost workers above changed?
            if self.task_deadline(&id).is_none_or(|at| now <= at) {
                continue;
            }
            let t = &self.tasks[&id];
            let age = now.saturating_duration_since(t.since);
            match t.state {
                TaskState::Held if age > self.cfg.lost_grace => expired_holds.push(t.id.clone()),
                TaskState::Queued
                    if now.saturating_duration_since(t.queued_at) > self.cfg.queue_timeout =>
                {
                    queue_timeouts.push(t.id.clone())
                }
                TaskState::Running => {
                    // Saturating: a timeout from a peer (or an old state row)
                    // must never overflow the clock arithmetic.
                    let timeout = Duration::from_secs(self.runs[&t.run].request.timeout_secs);
                    if age > timeout.saturating_add(self.cfg.backstop_grace) {
                        backstops.push(t.id.clone());
                    }
                }
                TaskState::Dispatched if age > self.cfg.dispatch_ttl.saturating_add(limit) => {
                    unanswered.push(t.id.clone())
                }
                _ => {}
            }
        }
        for id in expired_holds {
            let worker = self.tasks[&id].worker.clone().unwrap_or_default();
            if let Some(w) = self.workers.get_mut(&worker) {
                w.task = None;
            }
            self.pending.workers.insert(worker.clone());
            let why = format!(
                "worker {worker} lost and did not come back within {} ms",
                self.cfg.lost_grace.as_millis()
            );
            self.infrastructure_failure(now, &id, &worker, why);
        }
        for id in queue_timeouts {
            self.remove_from_queue(&id);
            let reason = format!(
                "queue timeout: no worker started the task within {} s",
                self.cfg.queue_timeout.as_secs()
            );
            self.end_task(now, &id, TaskState::Finished, Some(Verdict::Error), reason);
        }
        for id in backstops {
            self.backstop(now, &id);
        }
        for id in unanswered {
            let worker = self.tasks[&id].worker.clone().unwrap_or_default();
            self.pending.workers.insert(worker.clone());
            if let Some(w) = self.workers.get_mut(&worker) {
                w.task = None;
                w.state = WorkerState::Idle;
            }
            let why = format!("worker {worker} never accepted the dispatch");
            self.infrastructure_failure(now, &id, &worker, why);
        }
    }

    /// A running task past its timeout and the grace with no report: the
    /// worker is told to stop it and that it is closed, and it ends in
    /// ERROR.
    fn backstop(&mut self, now: Instant, id: &TaskId) {
        let id = id.clone();
        let worker = self.tasks[&id]
            .worker
            .clone()
            .expect("running task has a worker");
        self.send_mandatory(now, &worker, &id, Body::Cancel { task: id.clone() });
        self.send_to_worker(
            &worker,
            Some(&id),
            Body::TaskClosed {
                task: id.clone(),
                attempt: Some(self.tasks[&id].attempts),
                reason: "server backstop: execution timeout passed without a report".into(),
            },
        );
        if let Some(w) = self.workers.get_mut(&worker) {
            w.task = None;
        }
        self.pending.workers.insert(worker.clone());
        let timeout = self.runs[&self.tasks[&id].run].request.timeout_secs;
        let reason = format!(
            "execution timeout: no report {} s after the {timeout} s timeout (server backstop)",
            self.cfg.backstop_grace.as_secs()
        );
        self.end_task(now, &id, TaskState::Finished, Some(Verdict::Error), reason);
    }

    /// Resends: only workers with something in their outbox.
    fn resend_outboxes(&mut self, now: Instant) {
        let pending: Vec<String> = self.outboxes.iter().cloned().collect();
        for name in pending {
            let empty = self.workers.get(&name).is_none_or(|w| w.outbox.is_empty());
            if empty {
                self.outboxes.remove(&name);
            } else {
                self.flush_worker(now, &name);
            }
        }
    }

    /// The worker said `bye`: a clean stop, recorded as such. A task it
    /// still holds (stopped without a report) is re-queued at once.
    pub(super) fn worker_stopped(&mut self, now: Instant, name: &str, reason: &str) {
        self.clear_ready(name);
        self.pending.workers.insert(name.to_string());
        self.count("workers_stopped", 1);
        let w = self.workers.get_mut(name).expect("worker");
        info!(worker = %name, %reason, "worker stopped cleanly (bye)");
        w.state = WorkerState::Stopped;
        if let Some(task) = w.task.take() {
            self.pause_uploads(&task);
            self.requeue_or_fail(
                now,
                &task,
                format!("worker {name} stopped while running it ({reason})"),
            );
        }
    }

    pub(super) fn worker_lost(&mut self, now: Instant, name: &str, why: &str) {
        self.clear_ready(name);
        self.pending.workers.insert(name.to_string());
        let w = self.workers.get_mut(name).expect("worker");
        warn!(worker = %name, silent_ms = now.saturating_duration_since(w.last_heard).as_millis() as u64, "worker lost: {why}");
        w.state = WorkerState::Lost;
        self.notify_worker_lost(now, name, why);
        let w = self.workers.get_mut(name).expect("worker");
        // The peer mapping stays: if the same connection speaks again (a
        // partition healed), the worker is alive again without a new hello.
        if let Some(task) = w.task.clone() {
            let t = self.tasks.get_mut(&task).expect("worker task");
            if t.cancel_requested {
                w.task = None;
                self.end_task(
                    now,
                    &task,
                    TaskState::Cancelled,
                    None,
                    "cancelled; its worker was lost".into(),
                );
            } else {
                t.state = TaskState::Held;
                t.since = now;
                self.pending.tasks.insert(task.clone());
                self.schedule_task(&task);
                self.pause_uploads(&task);
            }
        }
    }
}
