//! Device health in the scheduler: feeding events to each worker's
//! [`WorkerHealth`], and doing what its health asks for — a health check
//! (a testrun of the server's, dispatched to that worker before anything
//! else), a timer for the next check or retry, its place among the
//! workers that take ordinary tasks. Every change goes through
//! [`Scheduler::health_changed`]: the log, the audit log, the counters and
//! the list a notifier takes them from.

use super::*;
use crate::server::estimate::Spread;
use crate::server::health::{CheckReason, Event};

/// Option of a health check's testrun saying why it runs (`new`,
/// `suspect`, `retry`, `periodic`, `operator`): visible in `status`, and
/// what makes the dispatch ask for the recovery command.
pub(super) const CHECK_REASON_OPTION: &str = "ots.health_check";

/// Owner of the server's health-check testruns: not a possible user name
/// (`@` is not allowed in one), so no user sees them as its own.
pub const CHECK_OWNER: &str = "@health";

/// Task durations remembered per routing key (for the estimate), and
/// routing keys remembered.
const DURATIONS_KEPT: usize = 20;
const DURATION_KEYS: usize = 4096;

impl CheckReason {
    fn as_str(self) -> &'static str {
        match self {
            CheckReason::New => "new",
            CheckReason::Suspect => "suspect",
            CheckReason::Retry => "retry",
            CheckReason::Periodic => "periodic",
            CheckReason::Operator => "operator",
            CheckReason::Lease => "lease",
        }
    }
}

impl<S: Store> Scheduler<S> {
    /// The health check configured for the worker's device group.
    pub(super) fn check_of(&self, worker: &str) -> Option<&HealthCheck> {
        let w = self.workers.get(worker)?;
        self.cfg.checks.get(&w.device.devicegroup)
    }

    /// Applies `event` to the worker's health and follows up.
    pub(super) fn health_event(&mut self, now: Instant, worker: &str, event: Event<'_>) {
        let now_ms = self.wall_ms(now);
        let Some(w) = self.workers.get_mut(worker) else {
            return;
        };
        let change = w.health.apply(event, now_ms, &self.cfg.health);
        self.pending.workers.insert(worker.to_string());
        if let Some(c) = change {
            self.health_changed(worker, c);
        }
        self.follow_health(now, worker);
    }

    /// One place for every health change: logged, audited, counted and
    /// told to notification targets (`worker_health_changed`).
    pub(super) fn health_changed(&mut self, worker: &str, change: HealthChange) {
        match change.to {
            Health::Good | Health::Unknown => {
                info!(worker, from = %change.from, to = %change.to, reason = %change.reason, "worker health changed")
            }
            _ => {
                warn!(worker, from = %change.from, to = %change.to, reason = %change.reason, "worker health changed")
            }
        }
        self.count(&format!("health_changes_to_{}", change.to), 1);
        self.audit(
            self.latest,
            "server",
            "-",
            "health",
            &format!(
                "worker {worker}: {} -> {}: {}",
                change.from, change.to, change.reason
            ),
        );
        self.notify_health_changed(worker, &change);
    }

    /// Does what the worker's health asks for: the check it wants (or,
    /// with no check configured for its group, the answer without one),
    /// its next timer, and its place among the ready workers.
    pub(super) fn follow_health(&mut self, now: Instant, worker: &str) {
        let Some(w) = self.workers.get(worker) else {
            return;
        };
        let health = w.health.health;
        if health == Health::Retired {
            if let Some(check) = self.checks.get(worker).cloned() {
                if self
                    .tasks
                    .get(&check)
                    .is_some_and(|t| t.state == TaskState::Queued)
                {
                    self.end_task(
                        now,
                        &check,
                        TaskState::Cancelled,
                        None,
                        format!("worker {worker} was retired"),
                    );
                }
            }
        }
        let w = &self.workers[worker];
        if let Some(reason) = w.health.wanted {
            if !self.checks.contains_key(worker) {
                if self.check_of(worker).is_some() {
                    self.start_check(now, worker, reason);
                } else {
                    let group = w.device.devicegroup.clone();
                    let now_ms = self.wall_ms(now);
                    let w = self.workers.get_mut(worker).expect("worker");
                    w.health.wanted = None;
                    if w.health.health == Health::Suspect {
                        let why = format!(
                            "{}; device group {group} has no health check to clear it ([[health.check]] in server.toml)",
                            w.health.reason
                        );
                        if let Some(c) = w.health.fail(now_ms, &self.cfg.health, why) {
                            self.health_changed(worker, c);
                        }
                    }
                }
            }
        }
        self.arm_health(now, worker);
        self.reconsider(now, worker);
    }

    /// Makes the health-check testrun of `worker`; it is dispatched to
    /// that worker as soon as it is free, before any other task.
    fn start_check(&mut self, now: Instant, worker: &str, reason: CheckReason) {
        let Some(check) = self.check_of(worker).cloned() else {
            return;
        };
        let w = self.workers.get_mut(worker).expect("worker");
        w.health.wanted = None;
        let d = &w.device;
        let mut options = check.options.clone();
        options.insert(CHECK_REASON_OPTION.into(), reason.as_str().into());
        let testrun = TestrunRequest {
            lease: None,
            on_lease: None,
            series: None,
            device: DeviceSpec {
                devicegroup: d.devicegroup.clone(),
                devicename: d.devicename.clone(),
                deviceid: d.deviceid.clone(),
            },
            image: check.image.clone(),
            packages: check.packages.clone(),
            distribution: Distribution::Default,
            timeout_secs: check.timeout_secs,
            options,
            queue_anyway: true,
            secrets: BTreeMap::new(),
            inputs: Vec::new(),
            owner: Some(CHECK_OWNER.into()),
            priority: Priority::Normal,
            devices: Vec::new(),
            notify: Vec::new(),
        };
        self.count("health_checks_started", 1);
        let (run, _) = self.create_run(now, testrun, None, Some(worker.to_string()));
        info!(worker, run = %run, reason = reason.as_str(), "health check queued for the worker");
        self.audit(
            self.latest,
            "server",
            "-",
            "health_check",
            &format!("worker {worker}: {run} ({})", reason.as_str()),
        );
    }

    /// A task ended: if it was a health check, its verdict is the
    /// worker's health.
    pub(super) fn check_ended(&mut self, now: Instant, id: &TaskId) {
        let t = &self.tasks[id];
        let Some(worker) = t.check_for.clone() else {
            return;
        };
        if self.checks.get(&worker) == Some(id) {
            self.checks.remove(&worker);
        }
        let (state, verdict) = (t.state, t.verdict);
        let reason = t.reason.clone().unwrap_or_default();
        if state == TaskState::Cancelled || !self.workers.contains_key(&worker) {
            self.follow_health(now, &worker);
            return;
        }
        if verdict == Some(Verdict::Pass) {
            self.count("health_checks_passed", 1);
            self.health_event(now, &worker, Event::CheckPassed { task: id });
        } else {
            self.count("health_checks_failed", 1);
            self.health_event(
                now,
                &worker,
                Event::CheckFailed {
                    task: id,
                    reason: &reason,
                },
            );
        }
    }

    /// When the worker's health next needs the clock: a bad worker's
    /// retry, a good one's periodic check.
    fn health_due_ms(&self, worker: &str) -> Option<u64> {
        let w = self.workers.get(worker)?;
        let h = &w.health;
        match h.health {
            Health::Bad => h.retry_at_ms,
            Health::Good => {
                let interval = self.check_of(worker)?.interval;
                let last = h.checked_ms.unwrap_or(h.since_ms);
                let ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
                Some(last.saturating_add(ms))
            }
            _ => None,
        }
    }

    /// Puts the worker's next health deadline on the heap, once.
    pub(super) fn arm_health(&mut self, now: Instant, worker: &str) {
        let Some(due_ms) = self.health_due_ms(worker) else {
            self.health_armed.remove(worker);
            return;
        };
        if self.health_armed.get(worker) == Some(&due_ms) {
            return;
        }
        self.health_armed.insert(worker.to_string(), due_ms);
        let wait = Duration::from_millis(due_ms.saturating_sub(self.wall_ms(now)));
        let at = now
            .checked_add(wait)
            .unwrap_or(now + Duration::from_secs(365 * 86_400));
        self.deadlines.push(std::cmp::Reverse((
            at,
            timers::Due::Health(worker.to_string(), due_ms),
        )));
    }

    /// A health deadline came due (from the tick).
    pub(super) fn health_due(&mut self, now: Instant, worker: &str, due_ms: u64) {
        // An entry made stale by a later change (a check passed since):
        // the current one is on the heap too.
        if self.health_armed.get(worker) != Some(&due_ms) {
            return;
        }
        self.health_armed.remove(worker);
        if self.health_due_ms(worker) != Some(due_ms) {
            self.arm_health(now, worker);
            return;
        }
        let Some(w) = self.workers.get_mut(worker) else {
            return;
        };
        match w.health.health {
            Health::Bad if self.cfg.checks.contains_key(&w.device.devicegroup) => {
                w.health.wanted = Some(CheckReason::Retry);
                self.follow_health(now, worker);
            }
            Health::Bad => self.health_event(now, worker, Event::RetryWithoutCheck),
            Health::Good => {
                let w = self.workers.get_mut(worker).expect("worker");
                w.health.wanted = Some(CheckReason::Periodic);
                // Not yet due again while this check waits or runs.
                w.health.checked_ms = Some(due_ms);
                self.pending.workers.insert(worker.to_string());
                self.follow_health(now, worker);
            }
            _ => {}
        }
    }

    /// A testrun ended: for every worker that ran a task of it beside
    /// other workers, whether it failed alone (the rule that catches a
    /// device failing tests its group passes). Cost: the run's tasks.
    pub(super) fn judge_shared(&mut self, now: Instant, run: &RunId) {
        let r = &self.runs[run];
        if r.request.owner.as_deref() == Some(CHECK_OWNER) || r.tasks.len() < 2 {
            return;
        }
        let mut per_worker: BTreeMap<String, bool> = BTreeMap::new();
        for t in r.tasks.iter().filter_map(|id| self.tasks.get(id)) {
            if let Some(w) = &t.worker {
                let ok = t.verdict == Some(Verdict::Pass);
                let e = per_worker.entry(w.clone()).or_insert(true);
                *e &= ok;
            }
        }
        if per_worker.len() < 2 {
            return;
        }
        let failed: Vec<&String> = per_worker
            .iter()
            .filter(|(_, ok)| !**ok)
            .map(|(w, _)| w)
            .collect();
        let alone = (failed.len() == 1).then(|| failed[0].clone());
        let workers: Vec<String> = per_worker.into_keys().collect();
        for w in workers {
            let failed_alone = alone.as_ref() == Some(&w);
            self.health_event(now, &w, Event::Shared { failed_alone });
        }
    }

    /// Remembers how long a task ran, for the estimate of queued ones.
    pub(super) fn record_duration(&mut self, key: &str, ms: u64) {
        if !self.durations.contains_key(key) {
            if self.durations.len() >= DURATION_KEYS {
                return;
            }
            self.durations.insert(key.to_string(), VecDeque::new());
        }
        let d = self.durations.get_mut(key).expect("just made");
        if d.len() >= DURATIONS_KEPT {
            d.pop_front();
        }
        d.push_back(ms);
    }

    /// How long a task like `id` takes: the recent durations of its
    /// packages under its routing key, else of any task under the key.
    pub(super) fn spread_of(&self, id: &TaskId) -> Option<Spread> {
        let t = self.tasks.get(id)?;
        let key = self.task_device(id).routing_key();
        self.durations
            .get(&packages_key(&key, &t.packages))
            .or_else(|| self.durations.get(&key))
            .and_then(|d| Spread::of(d.iter().copied()))
    }

    /// `worker_health`: the report, after an operator's action if any.
    pub(super) fn worker_health(
        &mut self,
        now: Instant,
        peer: &PeerId,
        request: u64,
        name: &str,
        action: Option<HealthAction>,
        reason: &str,
    ) -> Result<Body, (ErrorCode, String)> {
        if !self.workers.contains_key(name) {
            return Err((
                ErrorCode::BadRequest,
                format!("no worker {name:?} on this server (ots-submit workers lists them)"),
            ));
        }
        if let Some(action) = action {
            let reason = if reason.is_empty() {
                "(no reason given)"
            } else {
                reason
            };
            let event = match action {
                HealthAction::Check => {
                    if self.check_of(name).is_none() {
                        let group = self.workers[name].device.devicegroup.clone();
                        return Err((
                            ErrorCode::BadRequest,
                            format!("device group {group} has no health check: add a [[health.check]] with devicegroup = \"{group}\" to server.toml"),
                        ));
                    }
                    if self.workers[name].health.health == Health::Retired {
                        return Err((
                            ErrorCode::BadRequest,
                            format!("worker {name} is retired; take it out of retirement first (ots-submit maintenance {name} off)"),
                        ));
                    }
                    Event::CheckRequested
                }
                HealthAction::MaintenanceOn | HealthAction::MaintenanceOff => Event::Maintenance {
                    on: action == HealthAction::MaintenanceOn,
                    reason,
                    has_check: self.check_of(name).is_some(),
                },
                HealthAction::Retire => Event::Retire { reason },
            };
            let what = match action {
                HealthAction::Check => "health_check_requested",
                HealthAction::MaintenanceOn => "maintenance_on",
                HealthAction::MaintenanceOff => "maintenance_off",
                HealthAction::Retire => "retire",
            };
            self.audit_peer(peer, what, &format!("worker {name}: {reason}"));
            self.health_event(now, name, event);
        }
        // A submit user sees the tasks of its own testruns only.
        let only = match (self.cfg.secure, self.caller_role(peer)) {
            (true, Some(crate::security::Role::Submit)) => self.owner(peer),
            _ => None,
        };
        let recent = self.workers[name]
            .recent
            .iter()
            .filter_map(|id| {
                let t = self.tasks.get(id)?;
                if let Some(user) = &only {
                    let owner = self.runs.get(&t.run)?.request.owner.as_deref();
                    if owner != Some(user.as_str()) {
                        return None;
                    }
                }
                Some(crate::protocol::RecentTask {
                    task: id.clone(),
                    run: t.run.clone(),
                    state: t.state,
                    verdict: t.verdict,
                    reason: t.reason.clone(),
                })
            })
            .collect();
        Ok(Body::HealthReport {
            request,
            worker: self.worker_info(now, name),
            history: self.workers[name].health.history.iter().cloned().collect(),
            recent,
        })
    }
}

/// Where the durations of tasks of these packages under `key` are kept.
pub(super) fn packages_key(key: &str, packages: &[String]) -> String {
    format!("{key}\u{1f}{}", packages.join(","))
}
