//! What operators and supervisors see of the scheduler: the queue list
//! (`queue`; the `runs` list is read from the database, `recall`), a
//! metrics scrape, systemd's STATUS line.
//! Each is built on request, never per message.

use super::*;
use crate::server::estimate::{self, Candidate, Doing, Queued};

/// Queued tasks listed per routing key at most.
const QUEUE_SHOWN: usize = 1000;

/// Workers listed per queue at most (all are counted).
const QUEUE_WORKERS_SHOWN: usize = 64;

impl<S: Store> Scheduler<S> {
    /// The queues, each with its first 1000 tasks.
    /// The queues, and why their tasks wait: for each task its owner and
    /// who is ahead, for each queue the workers that could take it and
    /// what each is doing. One pass over the workers, then per queue at
    /// most [`QUEUE_SHOWN`] tasks: the cost does not grow with what a
    /// client queued.
    pub(super) fn list_queue(&self, now: Instant) -> Vec<QueueInfo> {
        let mut by_key: HashMap<&str, Vec<&Worker>> = HashMap::new();
        let keys: Vec<(String, &Worker)> = self
            .workers
            .values()
            .flat_map(|w| w.routing_keys().into_iter().map(move |k| (k, w)))
            .collect();
        for (k, w) in &keys {
            by_key.entry(k.as_str()).or_default().push(w);
        }
        self.queues
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .map(|(key, q)| {
                let able = by_key.get(key.as_str()).map(Vec::as_slice).unwrap_or(&[]);
                let order = q.dispatch_order(QUEUE_SHOWN);
                let ids: Vec<&TaskId> = order.iter().map(|(_, (_, _, id))| id).collect();
                let mut forecasts = self.forecast(now, able, &ids).into_iter();
                let mut seen: HashMap<&str, u64> = HashMap::new();
                let tasks = order
                    .into_iter()
                    .enumerate()
                    .filter_map(|(i, (owner, (_, _, id)))| {
                        let forecast = forecasts.next().flatten();
                        let t = self.tasks.get(id)?;
                        let own = seen.get(owner).copied().unwrap_or(0);
                        *seen.entry(owner).or_default() += 1;
                        Some(QueuedTask {
                            task: id.clone(),
                            run: t.run.clone(),
                            position: i as u64 + 1,
                            age_ms: now.saturating_duration_since(t.queued_at).as_millis() as u64,
                            owner: (!owner.is_empty()).then(|| owner.to_string()),
                            ahead_own: own,
                            ahead_others: i as u64 - own,
                            estimate_ms: forecast.as_ref().and_then(|f| f.ms),
                            forecast,
                        })
                    })
                    .collect();
                QueueInfo {
                    key: key.clone(),
                    length: q.len() as u64,
                    tasks,
                    workers: able
                        .iter()
                        .take(QUEUE_WORKERS_SHOWN)
                        .map(|w| QueueWorker {
                            name: w.name.clone(),
                            doing: self.doing(w),
                        })
                        .collect(),
                    workers_total: able.len() as u64,
                }
            })
            .collect()
    }

    /// Why the queued tasks of `run` wait (task → its standing): one pass
    /// over its routing key's queue and one over the workers.
    pub(super) fn waiting_of(&self, run: &RunId) -> HashMap<TaskId, Waiting> {
        let mut out = HashMap::new();
        let Some(r) = self.runs.get(run) else {
            return out;
        };
        if !r.tasks.iter().any(|t| {
            self.tasks
                .get(t)
                .is_some_and(|t| t.state == TaskState::Queued)
        }) {
            return out;
        }
        let owner = r.request.owner.as_deref().unwrap_or_default();
        let keys: BTreeSet<String> = r.all_keys();
        for key in keys {
            self.waiting_under(run, owner, &key, &mut out);
        }
        out
    }

    /// [`Self::waiting_of`] for the run's tasks under one routing key.
    fn waiting_under(
        &self,
        run: &RunId,
        owner: &str,
        key: &str,
        out: &mut HashMap<TaskId, Waiting>,
    ) {
        let able: Vec<&Worker> = self
            .workers
            .values()
            .filter(|w| w.routing_keys().iter().any(|k| k == key))
            .collect();
        let workers: Vec<QueueWorker> = able
            .iter()
            .take(QUEUE_WORKERS_SHOWN)
            .map(|w| QueueWorker {
                name: w.name.clone(),
                doing: self.doing(w),
            })
            .collect();
        let (mut own, mut others) = (0u64, 0u64);
        // The whole queue in dispatch order: bounded by
        // limits.max_open_tasks, and asked for per status request only;
        // played forward for its first QUEUE_SHOWN.
        let order = self
            .queues
            .get(key)
            .map(|q| q.dispatch_order(q.len()))
            .unwrap_or_default();
        let ids: Vec<&TaskId> = order
            .iter()
            .take(QUEUE_SHOWN)
            .map(|(_, (_, _, id))| id)
            .collect();
        // A status request has no clock of its own: the latest event's.
        let mut forecasts = self.forecast(self.latest, &able, &ids).into_iter();
        for (i, (task_owner, (_, _, id))) in order.into_iter().enumerate() {
            let forecast = forecasts.next().flatten();
            let Some(t) = self.tasks.get(id) else {
                continue;
            };
            if t.run == *run {
                out.insert(
                    id.clone(),
                    Waiting {
                        key: key.to_string(),
                        position: i as u64 + 1,
                        ahead_own: own,
                        ahead_others: others,
                        workers: workers.clone(),
                        workers_total: able.len() as u64,
                        estimate_ms: forecast.as_ref().and_then(|f| f.ms),
                        forecast,
                    },
                );
            }
            if task_owner == owner {
                own += 1;
            } else {
                others += 1;
            }
        }
    }

    /// The tasks `ids` (a queue's, in dispatch order) played forward on
    /// the workers `able` to take them ([`estimate::plan`]).
    fn forecast(&self, now: Instant, able: &[&Worker], ids: &[&TaskId]) -> Vec<Option<Forecast>> {
        let workers: Vec<Candidate> = able
            .iter()
            .map(|w| Candidate {
                name: w.name.clone(),
                doing: self.doing_for_queue(now, w),
            })
            .collect();
        let queued: Vec<Queued<'_>> = ids
            .iter()
            .map(|id| Queued {
                id,
                avoid: self.tasks.get(*id).map_or(&[][..], |t| t.avoid.as_slice()),
                spread: self.spread_of(id),
            })
            .collect();
        estimate::plan(&workers, &queued)
            .into_iter()
            .map(|e| {
                Some(match e {
                    // No worker may take it for this attempt: said so.
                    None => Forecast::default(),
                    Some(e) => Forecast {
                        worker: e.worker,
                        after: e.busy_with,
                        min_ms: e.starts.map(|r| r.low),
                        ms: e.starts.map(|r| r.mean),
                        max_ms: e.starts.map(|r| r.high),
                        could_run_on: e.could_run_on,
                    },
                })
            })
            .collect()
    }

    /// A worker as a queued task sees it: free, busy (for how long so
    /// far, and how long such tasks take), or away (drained, bad, held by
    /// a lease, lost, stopped, waiting for its health check).
    fn doing_for_queue(&self, now: Instant, w: &Worker) -> Doing {
        if let Some(task) = &w.task {
            let Some(t) = self.tasks.get(task) else {
                return Doing::Away;
            };
            if leases::is_lease_id(&t.run) {
                return Doing::Away;
            }
            return Doing::Busy {
                task: task.clone(),
                elapsed_ms: now.saturating_duration_since(t.since).as_millis() as u64,
                spread: self.spread_of(task),
            };
        }
        let away = matches!(w.state, WorkerState::Lost | WorkerState::Stopped)
            || self.drained.contains(&w.name)
            || self.checks.contains_key(&w.name)
            || !w.health.takes_tasks();
        if away {
            Doing::Away
        } else {
            Doing::Free
        }
    }

    /// What keeps a worker from a queued task, in a word or two.
    fn doing(&self, w: &Worker) -> String {
        if let Some(task) = &w.task {
            return format!("busy with {task}");
        }
        match w.state {
            WorkerState::Lost => "lost".into(),
            WorkerState::Stopped => "stopped".into(),
            _ if self.drained.contains(&w.name) => "drained".into(),
            _ if self.checks.contains_key(&w.name) => "waiting for its health check".into(),
            _ if !w.health.takes_tasks() => {
                format!("{} ({})", w.health.health, w.health.reason)
            }
            _ if w.ready_since.is_some() => "idle".into(),
            _ => "registering".into(),
        }
    }

    /// What a metrics scrape shows (called per scrape, not per message).
    pub fn metrics_snapshot(&self, now: Instant) -> crate::server::shell::metrics::Snapshot {
        let mut workers_by_state = BTreeMap::new();
        for w in self.workers.values() {
            *workers_by_state
                .entry((
                    format!("{:?}", w.state).to_lowercase(),
                    w.health.health.to_string(),
                ))
                .or_insert(0u64) += 1;
        }
        let mut tasks_by_state = BTreeMap::new();
        for t in self.active_tasks.iter().filter_map(|id| self.tasks.get(id)) {
            *tasks_by_state
                .entry(format!("{:?}", t.state).to_lowercase())
                .or_insert(0u64) += 1;
        }
        let queues = self
            .queues
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .map(|(key, q)| {
                let age = q
                    .oldest()
                    .and_then(|(_, _, id)| self.tasks.get(id))
                    .map_or(0.0, |t| {
                        now.saturating_duration_since(t.queued_at).as_secs_f64()
                    });
                (key.clone(), q.len() as u64, age)
            })
            .collect();
        crate::server::shell::metrics::Snapshot {
            workers_by_state,
            tasks_by_state,
            queues,
            counters: self.counters.clone(),
            notifications: self
                .notifier
                .states()
                .iter()
                .map(|(s, n)| (s.to_string(), *n))
                .collect(),
            notify_targets: self
                .notifier
                .targets()
                .into_iter()
                .map(|t| (t.name, t.failures, t.alert))
                .collect(),
        }
    }

    /// One line for systemd's STATUS: what the server is doing.
    pub fn status_line(&self) -> String {
        let queued: usize = self.queues.values().map(|q| q.len()).sum::<usize>()
            + self
                .checks
                .values()
                .filter(|id| {
                    self.tasks
                        .get(*id)
                        .is_some_and(|t| t.state == TaskState::Queued)
                })
                .count();
        // Only the unfinished (and just finished) tasks: not the history.
        let running = self
            .active_tasks
            .iter()
            .filter_map(|id| self.tasks.get(id))
            .filter(|t| matches!(t.state, TaskState::Running | TaskState::Dispatched))
            .count();
        format!(
            "serving {} connected workers ({} known), {queued} tasks queued, {running} running",
            self.peers.len(),
            self.workers.len()
        )
    }
}
