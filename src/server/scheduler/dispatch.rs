//! Queues and dispatch: how a queued task reaches an idle worker, and how
//! a task goes back to its queue.

use super::*;

impl<S: Store> Scheduler<S> {
    /// Takes a queued task out of its queue: the one of its testrun's
    /// routing key only (not every queue of the server).
    pub(super) fn remove_from_queue(&mut self, id: &TaskId) {
        let key = self
            .tasks
            .get(id)
            .and_then(|t| self.runs.get(&t.run))
            .map(|r| r.request.device.routing_key());
        match key.and_then(|k| self.queues.get_mut(&k)) {
            Some(q) => q.retain(|t| t != id),
            None => {
                for q in self.queues.values_mut() {
                    q.retain(|t| t != id);
                }
            }
        }
    }

    pub(super) fn requeue_or_fail(&mut self, now: Instant, id: &TaskId, why: String) {
        let attempts = self.tasks[id].attempts;
        let secrets_lost = self.runs[&self.tasks[id].run].secrets.is_none();
        if secrets_lost {
            let reason = format!("{why}; not re-queued: the testrun's secrets could not be restored after a server restart (server key changed?); resubmit it");
            self.end_task(now, id, TaskState::Finished, Some(Verdict::Error), reason);
        } else if attempts >= self.cfg.max_attempts {
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
        self.queues
            .entry(key.clone())
            .or_default()
            .push_front(id.clone());
        self.progress(id, ProgressState::Requeued, None, Some(why));
        self.try_dispatch_key(now, &key);
    }

    /// True if `name` may be given a task now.
    fn dispatchable(&self, name: &str) -> bool {
        self.workers
            .get(name)
            .is_some_and(|w| w.state == WorkerState::Idle && w.task.is_none() && w.peer.is_some())
            && !self.drained.contains(name)
    }

    /// The worker asked for work: it joins the ready index under each of
    /// its routing keys, in the order workers became ready.
    pub(super) fn set_ready(&mut self, now: Instant, name: &str) {
        if self.drained.contains(name) {
            return; // drained: finishes what it has, gets nothing new
        }
        let Some(w) = self.workers.get_mut(name) else {
            return;
        };
        if w.ready_since.is_some() {
            return;
        }
        w.ready_since = Some(now);
        for key in w.routing_keys() {
            self.ready
                .entry(key)
                .or_default()
                .insert((now, name.to_string()));
        }
    }

    /// The worker is no longer waiting for work (dispatched, lost,
    /// registering anew): it leaves the ready index.
    pub(super) fn clear_ready(&mut self, name: &str) {
        let Some(w) = self.workers.get_mut(name) else {
            return;
        };
        let Some(since) = w.ready_since.take() else {
            return;
        };
        for key in w.routing_keys() {
            if let Some(set) = self.ready.get_mut(&key) {
                set.remove(&(since, name.to_string()));
                if set.is_empty() {
                    self.ready.remove(&key);
                }
            }
        }
    }

    /// A worker became ready: it gets the oldest task at the head of any
    /// queue it matches. (No other ready worker can want that task: every
    /// queued task already went to the longest-waiting ready worker that
    /// matched it, so a ready worker never coexists with a task it
    /// matches.) Cost: its three routing keys, whatever the fleet size.
    pub(super) fn try_dispatch_worker(&mut self, now: Instant, name: &str) {
        if !self.dispatchable(name) {
            return;
        }
        let keys = self.workers[name].routing_keys();
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
            self.dispatch(now, name, &task);
        }
    }

    /// Tasks were queued under `key`: they go to the ready workers that
    /// match it, the one waiting longest first. Cost: what is dispatched,
    /// whatever the number of idle workers elsewhere.
    pub(super) fn try_dispatch_key(&mut self, now: Instant, key: &str) {
        while self.queues.get(key).is_some_and(|q| !q.is_empty()) {
            let Some((since, name)) = self.ready.get(key).and_then(|s| s.first().cloned()) else {
                return;
            };
            let current = self.workers.get(&name).and_then(|w| w.ready_since) == Some(since);
            if !current || !self.dispatchable(&name) {
                // Not ready any more under this entry: forget it.
                if let Some(set) = self.ready.get_mut(key) {
                    set.remove(&(since, name.clone()));
                }
                if !current {
                    continue;
                }
                self.clear_ready(&name);
                continue;
            }
            let task = self
                .queues
                .get_mut(key)
                .and_then(|q| q.pop_front())
                .expect("non-empty queue");
            self.dispatch(now, &name, &task);
        }
    }

    pub(super) fn dispatch(&mut self, now: Instant, worker: &str, id: &TaskId) {
        self.close_uploads(id);
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
        t.file_errors.clear();
        t.file_sizes.clear();
        t.junit.clear();
        // Stored files of an earlier attempt stay on disk until replaced;
        // they no longer count for this attempt.
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
            inputs: req.inputs.clone(),
            secrets: self.runs[&t.run].secrets.clone().unwrap_or_default(),
            sent_ms: self.wall_ms(now),
            ttl_ms: u64::try_from(self.cfg.dispatch_ttl.as_millis())
                .unwrap_or(u64::MAX)
                .clamp(*limits::TTL_MS.start(), *limits::TTL_MS.end()),
        };
        let w = self.workers.get_mut(worker).expect("worker");
        w.state = WorkerState::Busy;
        self.clear_ready(worker);
        self.touched_workers.insert(worker.to_string());
        let w = self.workers.get_mut(worker).expect("worker");
        w.task = Some(id.clone());
        info!(task = %id, worker, attempt = spec.attempt, "task dispatched");
        if let Some(r) = self.runs.get_mut(&spec.run) {
            if r.state == RunState::Queued {
                r.state = RunState::Running;
                self.touched_runs.insert(spec.run.clone());
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
