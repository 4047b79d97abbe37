//! Notifications, on the scheduler's side: the events (a testrun's end, a
//! worker's health change, a lost worker) go into the outbox in the same
//! batch — so the same commit — as the state change that causes them;
//! due attempts leave as [`Output::Notify`] after that commit; results
//! come back through [`Scheduler::on_notify_done`]. Listing and retrying
//! are client requests.

use super::*;
use crate::notify::event;
use crate::notify::outbox::{Done, Notice};

/// Most deliveries one `list_notifications` answer carries.
pub const MAX_LISTED: usize = 500;

impl<S: Store> Scheduler<S> {
    /// Links in events point at the dashboard served at `url`.
    pub fn set_dashboard(&mut self, url: Option<String>) {
        self.notifier.set_dashboard(url);
    }

    /// Restores one stored delivery (a `notifications` row).
    pub(super) fn restore_notification(&mut self, entry: crate::notify::outbox::Entry) {
        self.notifier.restore(entry);
    }

    /// The outbox's changed rows, for the commit.
    pub(super) fn notification_changes(&mut self) -> crate::notify::outbox::Changes {
        self.notifier.take_changes()
    }

    /// Checks a submit's `notify` entries.
    pub(super) fn check_notify(&self, entries: &[String]) -> Result<(), String> {
        if entries.is_empty() {
            return Ok(());
        }
        self.notifier.check_per_run(entries)
    }

    /// Hands out the attempts that are due and have room.
    pub(super) fn pump_notifications(&mut self, now: Instant) {
        let now_ms = self.wall_ms(now);
        for job in self.notifier.take_due(now_ms) {
            self.out.push(Output::Notify(job));
        }
        self.note_notifier();
    }

    /// Logs what the outbox noticed and moves its counters over.
    fn note_notifier(&mut self) {
        for (name, n) in self.notifier.take_counters() {
            self.count(name, n);
        }
        for notice in self.notifier.take_notices() {
            match notice {
                Notice::TargetFailing {
                    target,
                    since_ms,
                    last_error,
                } => {
                    error!(target = %target, failing_for_s = self.wall_ms(self.latest).saturating_sub(since_ms) / 1000, last_error = %last_error, "notification target has been failing for longer than notify.alert_after; its deliveries are kept and retried (ots-submit notifications shows them): fix the receiver or its settings in [notify]");
                    self.count("notification_targets_alerted", 1);
                }
                Notice::Failed { id, target, why } => {
                    warn!(id = %id, target = %target, last = %why, "notification failed for good (ots-submit notify-retry ID sends it again)");
                }
                Notice::Refused { target, why } => {
                    if self.noise.allow(self.latest, "notifications refused") {
                        warn!(target = %target, reason = %why, "notification refused");
                    }
                }
            }
        }
    }

    /// A testrun ended (and was triaged, when it has test cases): its one
    /// `testrun_finished` (health checks are told as
    /// `worker_health_changed` instead).
    pub(super) fn notify_run_finished(
        &mut self,
        now: Instant,
        run: &RunId,
        triage: Option<&crate::protocol::results::Comparison>,
    ) {
        if !self.notifier.is_active() {
            return;
        }
        let Some(r) = self.runs.get(run) else { return };
        if r.request.owner.as_deref() == Some(health::CHECK_OWNER) || r.request.lease.is_some() {
            return;
        }
        let per_run = r.request.notify.clone();
        let owner = r.request.owner.clone();
        let devices: Vec<DeviceSpec> = r.request.all_devices().cloned().collect();
        let Ok(status) = self.status(run) else { return };
        let at_ms = self.wall_ms(now);
        let e = event::testrun_finished(
            &status,
            owner.as_deref(),
            &devices,
            self.notifier.rules().dashboard.as_deref(),
            at_ms,
            self.notifier.rules().bounds.max_payload_bytes,
            triage,
        );
        self.notifier.on_event(&e, &per_run, at_ms);
        self.pump_notifications(now);
    }

    pub(super) fn notify_health_changed(&mut self, worker: &str, change: &HealthChange) {
        // A new worker found good is no news (a fleet starting would
        // send one per worker); every other change is.
        if !self.notifier.is_active()
            || (change.from == Health::Unknown && change.to == Health::Good)
        {
            return;
        }
        let group = self
            .workers
            .get(worker)
            .map(|w| w.device.devicegroup.clone())
            .unwrap_or_default();
        let e = event::worker_health_changed(
            worker,
            &group,
            change.from,
            change.to,
            &change.reason,
            change.at_ms,
            self.notifier.rules().dashboard.as_deref(),
        );
        self.notifier.on_event(&e, &[], change.at_ms);
        let latest = self.latest;
        self.pump_notifications(latest);
    }

    pub(super) fn notify_worker_lost(&mut self, now: Instant, worker: &str, why: &str) {
        if !self.notifier.is_active() {
            return;
        }
        let Some(w) = self.workers.get(worker) else {
            return;
        };
        let at_ms = self.wall_ms(now);
        let e = event::worker_lost(
            worker,
            &w.device.devicegroup,
            why,
            w.task.as_deref(),
            at_ms,
            self.notifier.rules().dashboard.as_deref(),
        );
        self.notifier.on_event(&e, &[], at_ms);
        self.pump_notifications(now);
    }

    /// The sender's report of one attempt.
    pub fn on_notify_done(&mut self, now: Instant, done: Done) {
        self.latest = self.latest.max(now);
        let jitter = rand::random::<f64>();
        let now_ms = self.wall_ms(now);
        self.notifier.on_done(done, now_ms, jitter);
        self.pump_notifications(now);
    }

    /// How long until the next attempt is due (none waiting: None). The
    /// shell wakes then and calls [`Scheduler::on_notifications_due`].
    pub fn notifications_due_in(&self, now: Instant) -> Option<Duration> {
        let at = self.notifier.next_due_ms()?;
        Some(Duration::from_millis(at.saturating_sub(self.wall_ms(now))))
    }

    /// A retry's time came: hand out what is due.
    pub fn on_notifications_due(&mut self, now: Instant) {
        self.latest = self.latest.max(now);
        self.pump_notifications(now);
    }

    /// The tick's share: forget old deliveries, hand out retries.
    pub(super) fn notify_tick(&mut self, now: Instant) {
        let now_ms = self.wall_ms(now);
        self.notifier.prune(now_ms);
        self.pump_notifications(now);
    }

    /// `list_notifications`: a `submit` user sees its own testruns'.
    pub(super) fn list_notifications(
        &self,
        peer: &PeerId,
        request: u64,
        run: Option<RunId>,
        failed: bool,
    ) -> Result<Body, (ErrorCode, String)> {
        let me = match (self.cfg.secure, self.caller_role(peer)) {
            (true, Some(crate::security::Role::Submit)) => self.owner(peer),
            _ => None,
        };
        if let (Some(r), Some(me)) = (&run, &me) {
            match self.runs.get(r) {
                Some(t) if t.request.owner.as_deref() != Some(me.as_str()) => {
                    return Err((
                        ErrorCode::Forbidden,
                        format!("{r} is not your testrun; you may list only your own testruns' notifications"),
                    ))
                }
                _ => {}
            }
        }
        let visible = |e: &crate::notify::outbox::Entry| match &me {
            None => true,
            Some(me) => e.owner.as_deref() == Some(me.as_str()),
        };
        let now_ms = self.wall_ms(self.latest);
        Ok(Body::Notifications {
            request,
            deliveries: self
                .notifier
                .list(run.as_deref(), failed, MAX_LISTED, visible, now_ms),
            targets: if me.is_none() {
                self.notifier.targets()
            } else {
                Vec::new()
            },
        })
    }

    /// `retry_notification` (operator, admin: checked by `access`).
    pub(super) fn retry_notification(
        &mut self,
        now: Instant,
        peer: &PeerId,
        request: u64,
        id: &str,
    ) -> Result<Body, (ErrorCode, String)> {
        let now_ms = self.wall_ms(now);
        let info = self
            .notifier
            .retry(id, now_ms)
            .map_err(|why| (ErrorCode::BadRequest, why))?;
        self.audit_peer(peer, "notify_retry", &format!("{id} to {}", info.target));
        self.pump_notifications(now);
        Ok(Body::Notifications {
            request,
            deliveries: vec![info],
            targets: Vec::new(),
        })
    }
}
