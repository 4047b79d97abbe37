//! Endings and progress: a task's final state, the testrun's verdict, and
//! the progress events followers see.

use super::*;

impl<S: Store> Scheduler<S> {
    pub(super) fn end_task(
        &mut self,
        now: Instant,
        id: &TaskId,
        state: TaskState,
        verdict: Option<Verdict>,
        reason: String,
    ) {
        self.close_uploads(id);
        let t = self.tasks.get_mut(id).expect("task");
        let held = leases::is_lease_id(&t.run) && t.worker.is_some();
        let ran = (t.state == TaskState::Running && state == TaskState::Finished && !held)
            .then(|| now.saturating_duration_since(t.since).as_millis() as u64);
        t.state = state;
        t.verdict = verdict;
        t.since = now;
        t.reason = Some(reason.clone());
        let run = t.run.clone();
        let worker = t.worker.clone();
        info!(task = %id, verdict = %crate::text::or_none(verdict), %reason, "task ended");
        if let Some(w) = worker.as_deref().and_then(|w| self.workers.get_mut(w)) {
            w.outbox.drop_task(id, None);
            w.recent.retain(|t| t != id);
            w.recent.push_front(id.clone());
            w.recent.truncate(RECENT_KEPT);
            let name = w.name.clone();
            self.pending.workers.insert(name);
        }
        if let Some(w) = worker.as_deref() {
            use crate::server::usage::Ended;
            let how = match verdict {
                Some(Verdict::Pass) => Ended::Passed,
                Some(Verdict::Fail) => Ended::Failed,
                _ => Ended::Other,
            };
            self.usage_task_ended(now, id, w, how);
            let attempt = Some(self.tasks[id].attempts);
            self.send_to_worker(
                w,
                Some(id),
                Body::TaskClosed {
                    task: id.clone(),
                    attempt,
                    reason: reason.clone(),
                },
            );
        }
        let pstate = if state == TaskState::Cancelled {
            ProgressState::Cancelled
        } else {
            ProgressState::Finished
        };
        self.progress(id, pstate, worker.clone(), Some(reason));
        if let Some(ms) = ran {
            let key = self.task_device(id).routing_key();
            let by_packages = super::health::packages_key(&key, &self.tasks[id].packages);
            self.record_duration(&key, ms);
            self.record_duration(&by_packages, ms);
        }
        self.check_ended(now, id);
        if leases::is_lease_id(&run) {
            self.lease_task_ended(now, id, worker.as_deref(), held);
        }
        self.maybe_finish_run(now, &run);
    }

    pub(super) fn maybe_finish_run(&mut self, now: Instant, run: &RunId) {
        let r = &self.runs[run];
        if matches!(r.state, RunState::Finished | RunState::Cancelled) {
            return;
        }
        let tasks: Vec<&Task> = r.tasks.iter().map(|t| &self.tasks[t]).collect();
        if !tasks.iter().all(|t| t.state.is_final()) {
            return;
        }
        let cancelled = tasks.iter().any(|t| t.state == TaskState::Cancelled);
        let verdict = if cancelled {
            None
        } else {
            run_verdict(
                tasks
                    .iter()
                    .map(|t| (t.verdict.unwrap_or(Verdict::Error), t.cases.as_ref())),
            )
        };
        let r = self.runs.get_mut(run).expect("run");
        r.verdict = verdict;
        r.state = if cancelled {
            RunState::Cancelled
        } else {
            RunState::Finished
        };
        info!(run = %run, verdict = %crate::text::or_none(verdict), cancelled, "testrun ended");
        self.retain(run);
        let state = if cancelled {
            ProgressState::RunCancelled
        } else {
            ProgressState::RunFinished
        };
        self.push_event(run, None, state, None, verdict, None);
        if !cancelled {
            self.judge_shared(now, run);
        }
        self.run_ended(now, run);
    }

    pub(super) fn progress(
        &mut self,
        task: &TaskId,
        state: ProgressState,
        worker: Option<String>,
        reason: Option<String>,
    ) {
        self.schedule_task(task);
        let t = &self.tasks[task];
        let (run, verdict) = (t.run.clone(), t.verdict);
        let change = StateChange {
            at_ms: self.wall_ms(t.since),
            state,
            attempt: t.attempts,
            worker: worker.clone(),
            reason: reason.clone(),
        };
        self.pending.history.push(HistoryRow {
            task: task.clone(),
            at_ms: change.at_ms,
            state: format!("{state:?}").to_lowercase(),
            attempt: change.attempt,
            worker: worker.clone(),
            reason: reason.clone(),
        });
        self.tasks.get_mut(task).expect("task").history.push(change);
        self.pending.tasks.insert(task.clone());
        self.push_event(&run, Some(task.clone()), state, worker, verdict, reason);
    }

    pub(super) fn push_event(
        &mut self,
        run: &RunId,
        task: Option<TaskId>,
        state: ProgressState,
        worker: Option<String>,
        verdict: Option<Verdict>,
        reason: Option<String>,
    ) {
        let r = self.runs.get_mut(run).expect("run");
        let event = ProgressEvent {
            index: r.events.len() as u64,
            task,
            state,
            worker,
            verdict,
            reason,
        };
        r.events.push(event.clone());
        self.pending.runs.insert(run.clone());
        self.tell_followers(
            run,
            format!("run/{run}"),
            Body::Progress {
                run: run.clone(),
                event,
            },
            None,
            false,
        );
    }
}
