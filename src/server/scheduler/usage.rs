//! The lab's usage, on the scheduler's side: at every tick [`Usage`]
//! sees what each worker is doing (and, once a minute, each device
//! group's queue); task endings are told as they happen; its rows go out
//! with the commit ([`crate::server::usage`]).

use super::*;
use crate::protocol::Health;
use crate::server::usage::{Doing, Ended, QueueNow, WorkerNow};

impl<S: Store> Scheduler<S> {
    /// Shows the usage series what every worker is doing now.
    pub(super) fn observe_usage(&mut self, now: Instant) {
        let now_ms = self.wall_ms(now);
        let doing: Vec<(String, String, Doing, Option<String>)> = self
            .workers
            .values()
            .map(|w| {
                let (doing, owner) = self.usage_of(w);
                (w.name.clone(), w.device.devicegroup.clone(), doing, owner)
            })
            .collect();
        let seen = doing.iter().map(|(name, group, doing, owner)| WorkerNow {
            name,
            group,
            doing: *doing,
            owner: owner.as_deref(),
        });
        let mut usage = std::mem::take(&mut self.usage);
        usage.observe(now_ms, seen, || self.queues_now(now));
        self.usage = usage;
    }

    fn usage_of(&self, w: &Worker) -> (Doing, Option<String>) {
        if w.state.is_gone() {
            return (Doing::Offline, None);
        }
        if let Some(run) = w
            .task
            .as_ref()
            .and_then(|t| self.tasks.get(t))
            .and_then(|t| self.runs.get(&t.run))
        {
            let owner = run.request.owner.clone();
            return if run.request.lease.is_some() {
                (Doing::Leased, owner)
            } else {
                (Doing::Busy, owner)
            };
        }
        match w.health.health {
            Health::Suspect | Health::Bad | Health::Maintenance | Health::Retired => {
                (Doing::Broken, None)
            }
            _ => (Doing::Idle, None),
        }
    }

    /// Each device group's queued tasks and the longest wait among them.
    fn queues_now(&self, now: Instant) -> Vec<QueueNow> {
        let mut by: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for id in &self.active_tasks {
            let Some(t) = self.tasks.get(id) else {
                continue;
            };
            if t.state != TaskState::Queued {
                continue;
            }
            let group = self.task_device(id).devicegroup.clone();
            let waited = now.saturating_duration_since(t.queued_at).as_millis() as u64;
            let q = by.entry(group).or_default();
            q.0 += 1;
            q.1 = q.1.max(waited);
        }
        by.into_iter()
            .map(|(group, (queued, wait_max_ms))| QueueNow {
                group,
                queued,
                wait_max_ms,
            })
            .collect()
    }

    /// An attempt of task `id` ended on `worker`.
    pub(super) fn usage_task_ended(&mut self, now: Instant, id: &TaskId, worker: &str, how: Ended) {
        let Some(group) = self
            .workers
            .get(worker)
            .map(|w| w.device.devicegroup.clone())
        else {
            return;
        };
        let owner = (self.tasks.get(id))
            .and_then(|t| self.runs.get(&t.run))
            .and_then(|r| r.request.owner.clone());
        let now_ms = self.wall_ms(now);
        (self.usage).task_ended(now_ms, worker, &group, owner.as_deref(), how);
    }
}
