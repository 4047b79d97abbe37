//! Queues and dispatch: how a queued task reaches an idle worker, and how
//! a task goes back to its queue.
//!
//! Within a routing key the next task is the fair-share pick
//! ([`fairshare`]); a worker's health decides whether it takes ordinary
//! tasks at all, and a health check of a worker goes to it before
//! anything else.

use super::health::CHECK_REASON_OPTION;
use super::*;

/// Ready workers looked at per queued task before giving up for now (a
/// task an infrastructure failure keeps off some workers).
const READY_SCAN: usize = 16;

impl<S: Store> Scheduler<S> {
    /// The device spec a task runs on.
    pub(super) fn task_device(&self, id: &TaskId) -> &DeviceSpec {
        let t = &self.tasks[id];
        let r = &self.runs[&t.run].request;
        r.all_devices().nth(t.spec).unwrap_or(&r.device)
    }

    /// Owner, weight and fair-queue entry of a task.
    fn queue_entry(&self, id: &TaskId) -> (String, String, u32, fairshare::Entry) {
        let t = &self.tasks[id];
        let r = &self.runs[&t.run];
        let owner = r.request.owner.clone().unwrap_or_default();
        let weight = self
            .cfg
            .weights
            .get(&owner)
            .or_else(|| {
                r.role
                    .as_ref()
                    .and_then(|role| self.cfg.weights.get(&format!("role:{role}")))
            })
            .copied()
            .unwrap_or(1);
        (
            self.task_device(id).routing_key(),
            owner,
            weight,
            (t.rank, t.order, id.clone()),
        )
    }

    /// Puts a task in its routing key's queue (a health check waits for
    /// its worker instead). Returns the key.
    pub(super) fn enqueue(&mut self, id: &TaskId) -> Option<String> {
        if self.tasks[id].check_for.is_some() {
            return None;
        }
        if let Some(w) = self.tasks[id].pinned.clone() {
            let line = self.pinned.entry(w).or_default();
            if !line.contains(id) {
                line.push_back(id.clone());
            }
            return None;
        }
        let (key, owner, weight, entry) = self.queue_entry(id);
        self.queues
            .entry(key.clone())
            .or_default()
            .push(&owner, weight, entry);
        Some(key)
    }

    /// Takes a queued task out of its queue: the one of its testrun's
    /// routing key only (not every queue of the server).
    pub(super) fn remove_from_queue(&mut self, id: &TaskId) {
        if !self.tasks.contains_key(id) || self.tasks[id].check_for.is_some() {
            return;
        }
        if let Some(w) = self.tasks[id].pinned.clone() {
            if let Some(line) = self.pinned.get_mut(&w) {
                line.retain(|t| t != id);
                if line.is_empty() {
                    self.pinned.remove(&w);
                }
            }
            return;
        }
        let (key, owner, _, entry) = self.queue_entry(id);
        if let Some(q) = self.queues.get_mut(&key) {
            q.remove(&owner, &entry);
            if q.is_empty() {
                self.queues.remove(&key);
            }
        }
    }

    /// The rank of a task queued now with `priority`.
    pub(super) fn rank_of(&self, now: Instant, priority: Priority) -> fairshare::Rank {
        let lead = i64::try_from(self.cfg.priority_lead.as_millis()).unwrap_or(i64::MAX / 4);
        let at = i64::try_from(self.wall_ms(now)).unwrap_or(i64::MAX / 2);
        match priority {
            Priority::High => at.saturating_sub(lead),
            Priority::Normal => at,
            Priority::Low => at.saturating_add(lead),
        }
    }

    pub(super) fn requeue_or_fail(&mut self, now: Instant, id: &TaskId, why: String) {
        let attempts = self.tasks[id].attempts;
        let secrets_lost = self.runs[&self.tasks[id].run].secrets.is_none();
        if self.tasks[id].check_for.is_some() {
            // A health check is not retried: its failure is the answer.
            self.end_task(now, id, TaskState::Finished, Some(Verdict::Error), why);
        } else if secrets_lost {
            let reason = format!("{why}; not re-queued: the testrun's secrets could not be restored after a server restart (server key changed?); resubmit it");
            self.end_task(now, id, TaskState::Finished, Some(Verdict::Error), reason);
        } else if attempts >= self.cfg.max_attempts {
            let reason = format!("{why}; gave up after {attempts} attempts");
            self.end_task(now, id, TaskState::Finished, Some(Verdict::Error), reason);
        } else {
            self.requeue(now, id, why);
        }
    }

    /// An attempt failed because the device or the worker did: it counts
    /// against the worker's health, and the task runs again on another
    /// worker (never on one that failed it) within its attempts — or ends
    /// in ERROR, saying so, when no other worker could take it.
    pub(super) fn infrastructure_failure(
        &mut self,
        now: Instant,
        id: &TaskId,
        worker: &str,
        why: String,
    ) {
        self.count("infrastructure_failures", 1);
        self.usage_task_ended(now, id, worker, crate::server::usage::Ended::Infrastructure);
        self.health_event(
            now,
            worker,
            crate::server::health::Event::InfraFailure { reason: &why },
        );
        if self.tasks[id].check_for.is_some() {
            self.requeue_or_fail(now, id, why);
            return;
        }
        // Kept off the workers it failed on while another worker could
        // take it; off one it failed on twice in any case.
        let key = self.task_device(id).routing_key();
        let t = self.tasks.get_mut(id).expect("task");
        t.failed_on.push(worker.to_string());
        let mut failures: BTreeMap<&str, u32> = BTreeMap::new();
        for w in &t.failed_on {
            *failures.entry(w.as_str()).or_default() += 1;
        }
        let workers = &self.workers;
        let matching = |w: &str| {
            workers
                .get(w)
                .is_some_and(|w| w.routing_keys().contains(&key))
        };
        let known = self.known.get(&key).copied().unwrap_or(0);
        let hard: Vec<String> = failures
            .iter()
            .filter(|(_, n)| **n >= 2)
            .map(|(w, _)| w.to_string())
            .collect();
        let all: Vec<String> = failures.keys().map(|w| w.to_string()).collect();
        let hard_here = hard.iter().filter(|w| matching(w)).count();
        let all_here = all.iter().filter(|w| matching(w)).count();
        let (avoid, others) = if known > all_here {
            (all, known - all_here)
        } else {
            // Every worker failed it once: only the twice-failed stay off.
            (hard, known.saturating_sub(hard_here))
        };
        let tried = t.failed_on.join(", ");
        t.avoid = avoid;
        self.pending.tasks.insert(id.clone());
        if others == 0 && self.tasks[id].attempts < self.cfg.max_attempts {
            let reason = format!(
                "{why} (an infrastructure failure); no other worker for {key} to run it on (failed on: {tried})"
            );
            self.end_task(now, id, TaskState::Finished, Some(Verdict::Error), reason);
            return;
        }
        let elsewhere = if self.tasks[id].avoid.iter().any(|w| w == worker) {
            "runs again on another worker"
        } else {
            "no other worker for it: runs again on this one"
        };
        self.requeue_or_fail(
            now,
            id,
            format!("{why} (an infrastructure failure: {elsewhere})"),
        );
    }

    pub(super) fn requeue(&mut self, now: Instant, id: &TaskId, why: String) {
        // A lease is a person's hold on one device: it never moves to
        // another one behind their back; it ends, saying why.
        if leases::is_lease_id(&self.tasks[id].run) {
            self.end_task(
                now,
                id,
                TaskState::Cancelled,
                None,
                format!("the lease ended: {why}"),
            );
            return;
        }
        let t = self.tasks.get_mut(id).expect("task");
        info!(task = %id, reason = %why, "task re-queued");
        if let Some(w) = t.worker.as_deref().and_then(|w| self.workers.get_mut(w)) {
            w.outbox.drop_task(id, None);
        }
        t.state = TaskState::Queued;
        t.worker = None;
        t.since = now;
        t.reason = Some(why.clone());
        // Its rank is kept: it goes ahead of its owner's later tasks.
        let key = self.enqueue(id);
        self.progress(id, ProgressState::Requeued, None, Some(why));
        match key {
            Some(key) => self.try_dispatch_key(now, &key),
            None => {
                if let Some(w) = self.tasks[id].check_for.clone() {
                    self.try_dispatch_worker(now, &w);
                }
            }
        }
    }

    /// True if `name` is free to be given a task now (of some kind).
    fn free(&self, name: &str) -> bool {
        self.workers
            .get(name)
            .is_some_and(|w| w.state == WorkerState::Idle && w.task.is_none() && w.peer.is_some())
            && !self.drained.contains(name)
    }

    /// True if `name` may be given an ordinary task now: free, healthy,
    /// and no health check of it waiting.
    fn dispatchable(&self, name: &str) -> bool {
        self.free(name)
            && self.workers[name].health.takes_tasks()
            && !self.checks.contains_key(name)
    }

    /// The worker asked for work: it joins the ready index under each of
    /// its routing keys, in the order workers became ready. Only a worker
    /// that takes ordinary tasks is indexed; one with a health check due
    /// gets it from [`Self::try_dispatch_worker`].
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
        if !self.dispatchable(name) {
            return;
        }
        let w = &self.workers[name];
        for key in w.routing_keys() {
            self.ready
                .entry(key)
                .or_default()
                .insert((now, name.to_string()));
        }
    }

    /// The worker's eligibility changed (health, a check created or
    /// ended): re-index it if it is waiting for work, and try it.
    pub(super) fn reconsider(&mut self, now: Instant, name: &str) {
        let Some(since) = self.workers.get(name).and_then(|w| w.ready_since) else {
            return;
        };
        self.clear_ready(name);
        // Keeps its place in line: it has been waiting since then.
        self.set_ready(since, name);
        self.try_dispatch_worker(now, name);
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

    /// A worker became ready: its health check if one waits, otherwise
    /// (if it is healthy) the fair-share pick of the queues it matches —
    /// among its routing keys the one whose pick has waited longest.
    /// Cost: its three routing keys, whatever the fleet size.
    pub(super) fn try_dispatch_worker(&mut self, now: Instant, name: &str) {
        if !self.free(name) || self.workers[name].ready_since.is_none() {
            return;
        }
        // Pinned work first: the person holding the device asked for it.
        if let Some(id) = self.pinned.get(name).and_then(|l| l.front()).cloned() {
            self.remove_from_queue(&id);
            self.dispatch(now, name, &id);
            return;
        }
        if let Some(check) = self.checks.get(name).cloned() {
            if self
                .tasks
                .get(&check)
                .is_some_and(|t| t.state == TaskState::Queued)
            {
                self.dispatch(now, name, &check);
            }
            return;
        }
        if !self.dispatchable(name) {
            return;
        }
        let keys = self.workers[name].routing_keys();
        let (tasks, runs) = (&self.tasks, &self.runs);
        let at_limit = self.holders_at_limit();
        let fits = |id: &str| {
            tasks.get(id).is_none_or(|t| {
                !t.avoid.iter().any(|w| w == name) && !leases::over_held_limit(runs, t, &at_limit)
            })
        };
        let best = keys
            .iter()
            .filter_map(|k| {
                let (owner, e) = self.queues.get(k)?.peek(fits)?;
                Some((e.clone(), owner.to_string(), k))
            })
            .min();
        if let Some((entry, owner, key)) = best {
            let key = key.clone();
            let q = self.queues.get_mut(&key).expect("peeked");
            q.take(&owner, &entry);
            if q.is_empty() {
                self.queues.remove(&key);
            }
            self.dispatch(now, name, &entry.2);
        }
    }

    /// Tasks were queued under `key`: they go to the ready workers that
    /// match it, the one waiting longest first (skipping, for a task, the
    /// workers it must avoid). Cost: what is dispatched, plus at most
    /// [`READY_SCAN`] workers per task, whatever the fleet size.
    pub(super) fn try_dispatch_key(&mut self, now: Instant, key: &str) {
        'next: while self.queues.get(key).is_some_and(|q| !q.is_empty()) {
            let candidates: Vec<(Instant, String)> = self
                .ready
                .get(key)
                .map(|s| s.iter().take(READY_SCAN).cloned().collect())
                .unwrap_or_default();
            if candidates.is_empty() {
                return;
            }
            for (since, name) in candidates {
                let current = self.workers.get(&name).and_then(|w| w.ready_since) == Some(since);
                if !current || !self.dispatchable(&name) {
                    // Not ready any more under this entry: forget it.
                    if let Some(set) = self.ready.get_mut(key) {
                        set.remove(&(since, name.clone()));
                    }
                    if current {
                        self.clear_ready(&name);
                    }
                    continue 'next;
                }
                let at_limit = self.holders_at_limit();
                let (tasks, runs) = (&self.tasks, &self.runs);
                let fits = |id: &str| {
                    tasks.get(id).is_none_or(|t| {
                        !t.avoid.contains(&name) && !leases::over_held_limit(runs, t, &at_limit)
                    })
                };
                let Some((_, (_, _, task))) = self.queues.get_mut(key).and_then(|q| q.pop(fits))
                else {
                    continue;
                };
                if self.queues.get(key).is_some_and(|q| q.is_empty()) {
                    self.queues.remove(key);
                }
                self.dispatch(now, &name, &task);
                continue 'next;
            }
            return;
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
        t.log_full_told = None;
        t.file_errors.clear();
        t.file_sizes.clear();
        t.junit.clear();
        t.failing.clear();
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
        let check = t.check_for.is_some();
        let recover = check
            && req
                .options
                .get(CHECK_REASON_OPTION)
                .is_some_and(|r| matches!(r.as_str(), "suspect" | "retry" | "lease"));
        let hold = req.lease.as_ref().map(|terms| HoldSpec {
            lease: t.run.clone(),
            holder: req.owner.clone(),
            reason: terms.reason.clone(),
        });
        let spec = TaskSpec {
            hold,
            on_lease: req.on_lease.clone(),
            health_check: check,
            recover,
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
        self.pending.workers.insert(worker.to_string());
        let w = self.workers.get_mut(worker).expect("worker");
        w.task = Some(id.clone());
        info!(task = %id, worker, attempt = spec.attempt, "task dispatched");
        if let Some(r) = self.runs.get_mut(&spec.run) {
            if r.state == RunState::Queued {
                r.state = RunState::Running;
                self.pending.runs.insert(spec.run.clone());
            }
        }
        let (run, is_lease) = (spec.run.clone(), spec.hold.is_some());
        self.send_mandatory(now, worker, id, Body::Dispatch { spec });
        if is_lease {
            self.lease_granted(now, &run, worker);
        }
        self.progress(
            id,
            ProgressState::Dispatched,
            Some(worker.to_string()),
            None,
        );
    }
}
