//! Queues and dispatch: how a queued task reaches an idle worker, and how
//! a task goes back to its queue.

use super::*;

impl<S: Store> Scheduler<S> {
    pub(super) fn remove_from_queue(&mut self, id: &TaskId) {
        for q in self.queues.values_mut() {
            q.retain(|t| t != id);
        }
    }

    pub(super) fn requeue_or_fail(&mut self, now: Instant, id: &TaskId, why: String) {
        let attempts = self.tasks[id].attempts;
        if attempts >= self.cfg.max_attempts {
            let reason = format!("{why}; gave up after {attempts} attempts");
            self.end_task(now, id, TaskState::Finished, Some(Verdict::Error), reason);
        } else {
            self.requeue(now, id, why);
        }
    }

    pub(super) fn requeue(&mut self, now: Instant, id: &TaskId, why: String) {
        let t = self.tasks.get_mut(id).expect("task");
        info!(task = %id, reason = %why, "task re-queued");
        if let Some(w) = t.worker.as_deref().and_then(|w| self.workers.get_mut(w)) {
            w.outbox.drop_task(id, None);
        }
        t.state = TaskState::Queued;
        t.worker = None;
        t.since = now;
        t.reason = Some(why.clone());
        let key = self.runs[&t.run].request.device.routing_key();
        // Back to the front: it was first in line once already.
        self.queues.entry(key).or_default().push_front(id.clone());
        self.progress(id, ProgressState::Requeued, None, Some(why));
        self.try_dispatch(now);
    }

    /// Hands queued tasks to ready workers: the worker waiting longest
    /// first, the oldest matching task first.
    pub(super) fn try_dispatch(&mut self, now: Instant) {
        loop {
            let mut ready: Vec<(Instant, String)> = self
                .workers
                .values()
                .filter(|w| w.state == WorkerState::Idle && w.task.is_none() && w.peer.is_some())
                .filter_map(|w| w.ready_since.map(|t| (t, w.name.clone())))
                .collect();
            ready.sort();
            let mut dispatched = false;
            for (_, name) in ready {
                let keys = self.workers[&name].routing_keys();
                let best = keys
                    .iter()
                    .filter_map(|k| {
                        self.queues
                            .get(k)
                            .and_then(|q| q.front())
                            .map(|t| (self.tasks[t].order, k.clone()))
                    })
                    .min();
                if let Some((_, key)) = best {
                    let task = self
                        .queues
                        .get_mut(&key)
                        .and_then(|q| q.pop_front())
                        .expect("head");
                    self.dispatch(now, &name, &task);
                    dispatched = true;
                    break;
                }
            }
            if !dispatched {
                return;
            }
        }
    }

    pub(super) fn dispatch(&mut self, now: Instant, worker: &str, id: &TaskId) {
        let t = self.tasks.get_mut(id).expect("task");
        t.state = TaskState::Dispatched;
        t.worker = Some(worker.to_string());
        t.attempts += 1;
        t.since = now;
        // Each attempt is a channel of its own: its log lines count from 1
        // and its files arrive afresh.
        t.log = SeqRanges::default();
        t.log_bytes = 0;
        t.log_refused = 0;
        t.received.clear();
        t.file_errors.clear();
        t.file_sizes.clear();
        t.hashing.clear();
        t.files.clear();
        let attempt = t.attempts;
        if attempt > 1 {
            let marker = LogLine {
                seq: 0,
                stream: Stream::Worker,
                text: format!("---- attempt {attempt} on worker {worker} ----"),
            };
            if let Err(e) = self.store.append_log(id, &[marker]) {
                warn!(task = %id, error = %e, "storage error: cannot mark the new attempt in the log");
            }
        }
        let t = self.tasks.get_mut(id).expect("task");
        let req = &self.runs[&t.run].request;
        let spec = TaskSpec {
            task: id.clone(),
            run: t.run.clone(),
            attempt: t.attempts,
            image: req.image.clone(),
            packages: t.packages.clone(),
            timeout_secs: req.timeout_secs,
            options: req.options.clone(),
            sent_ms: self.wall_ms(now),
            ttl_ms: u64::try_from(self.cfg.dispatch_ttl.as_millis())
                .unwrap_or(u64::MAX)
                .clamp(*limits::TTL_MS.start(), *limits::TTL_MS.end()),
        };
        let w = self.workers.get_mut(worker).expect("worker");
        w.state = WorkerState::Busy;
        w.ready_since = None;
        w.task = Some(id.clone());
        info!(task = %id, worker, attempt = spec.attempt, "task dispatched");
        if let Some(r) = self.runs.get_mut(&spec.run) {
            if r.state == RunState::Queued {
                r.state = RunState::Running;
            }
        }
        self.send_mandatory(now, worker, id, Body::Dispatch { spec });
        self.progress(
            id,
            ProgressState::Dispatched,
            Some(worker.to_string()),
            None,
        );
    }
}
