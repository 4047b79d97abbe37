//! Testruns on a lease (`run --lease`, PROTOCOL.md §18.5): the holder's
//! testrun runs at once on the leased device, no queue. Its tasks are
//! pinned to the lease's worker; the hold is told to let go (the device
//! stays the holder's: the lease does not end) and waits, pinned, behind
//! them; when they have run, the hold resumes (a new attempt of its task,
//! the transcript going on). The consoles stay attached throughout: the
//! testrun's tasks send the device's output as the hold does, and what
//! the holder types goes to whichever task has the device.

use super::*;

impl<S: Store> Scheduler<S> {
    /// The lease a task belongs to: its own (the hold), or the one its
    /// testrun runs on.
    pub(in crate::server::scheduler) fn lease_of_task(&self, task: &TaskId) -> Option<LeaseId> {
        let run = &self.tasks.get(task)?.run;
        if is_lease_id(run) {
            return Some(run.clone());
        }
        self.runs.get(run)?.request.on_lease.clone()
    }

    /// The worker holding a live, granted lease's device.
    pub(in crate::server::scheduler) fn lease_worker(&self, lease: &LeaseId) -> Option<String> {
        self.leases.live.get(lease)?.worker.clone()
    }

    /// The task that has the lease's device now (the hold, or a task of
    /// a testrun on it), if one runs.
    pub(in crate::server::scheduler) fn lease_task_now(&self, lease: &LeaseId) -> Option<TaskId> {
        let worker = self.lease_worker(lease)?;
        let task = self.workers.get(&worker)?.task.clone()?;
        (self.lease_of_task(&task).as_ref() == Some(lease)).then_some(task)
    }

    /// A `submit` with `on_lease`: only its holder's, on a granted lease;
    /// it runs on the lease's device whatever spec it named.
    pub(in crate::server::scheduler) fn check_run_on_lease(
        &self,
        peer: &PeerId,
        testrun: &mut TestrunRequest,
    ) -> Result<(), (ErrorCode, String)> {
        let Some(lease) = testrun.on_lease.clone() else {
            return Ok(());
        };
        let Some(r) = self.runs.get(&lease).filter(|r| r.request.lease.is_some()) else {
            return Err((
                ErrorCode::UnknownRun,
                format!("no lease {lease:?} on this server"),
            ));
        };
        if self.cfg.secure && self.owner(peer) != r.request.owner {
            return Err((
                ErrorCode::Forbidden,
                format!(
                    "lease {lease} is {}'s: only its holder runs testruns on it",
                    r.request.owner.as_deref().unwrap_or("nobody")
                ),
            ));
        }
        if self.lease_worker(&lease).is_none() || !self.leases.live.contains_key(&lease) {
            return Err((
                ErrorCode::BadRequest,
                format!("lease {lease} does not hold a device now (waiting or ended): ots-submit leases shows it"),
            ));
        }
        if let Some(other) = &self.leases.live[&lease].suspended_for {
            return Err((
                ErrorCode::BadRequest,
                format!("testrun {other} runs on lease {lease} now; submit the next when it ends"),
            ));
        }
        testrun.device = r.request.device.clone();
        testrun.devices.clear();
        Ok(())
    }

    /// The testrun `run` on `lease` was accepted: the hold lets go.
    pub(in crate::server::scheduler) fn suspend_for_run(
        &mut self,
        now: Instant,
        lease: &LeaseId,
        run: &RunId,
    ) {
        let Some(l) = self.leases.live.get_mut(lease) else {
            return;
        };
        l.suspended_for = Some(run.clone());
        l.hold.heard(now);
        let hold = l.task.clone();
        self.note_in_transcript(
            &hold,
            format!("testrun {run} runs on the device; the console stays open"),
        );
        info!(lease = %lease, run = %run, "a testrun runs on a lease");
        let t = self.tasks.get_mut(&hold).expect("hold task");
        if matches!(t.state, TaskState::Running | TaskState::Dispatched) {
            t.cancel_requested = true;
            self.pending.tasks.insert(hold.clone());
            let worker = t.worker.clone().expect("a running hold has a worker");
            self.send_mandatory(now, &worker, &hold, Body::Cancel { task: hold.clone() });
        }
    }

    /// The hold's report after it let go for a testrun: the hold waits,
    /// pinned to its worker, behind the testrun's tasks (true: handled).
    pub(in crate::server::scheduler) fn lease_paused(
        &mut self,
        now: Instant,
        task: &TaskId,
    ) -> bool {
        let run = self.tasks[task].run.clone();
        let Some(l) = self.leases.live.get(&run) else {
            return false;
        };
        if l.suspended_for.is_none() || l.task != *task {
            return false;
        }
        let worker = l.worker.clone();
        self.close_uploads(task);
        let t = self.tasks.get_mut(task).expect("hold task");
        t.state = TaskState::Queued;
        t.worker = None;
        t.since = now;
        t.cancel_requested = false;
        t.pinned = worker;
        self.pending.tasks.insert(task.clone());
        self.enqueue(task);
        self.progress(
            task,
            ProgressState::Requeued,
            None,
            Some("a testrun runs on the lease".into()),
        );
        true
    }
}
