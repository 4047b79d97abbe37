//! The worker's orderly stop, without I/O: no new task from the first
//! request on; the running task finished (or stopped, with `stop_policy =
//! abort`) and everything delivered; then `bye`, and the worker leaves
//! once the server acknowledged it (or did not in time: a close the
//! server saw first would be a loss). A task that outlasts
//! `stop_timeout` is stopped; what still cannot be delivered after the
//! conductor's kill grace stays in worker.db for the next start. The
//! shell asks [`Session::poll_stop`] each turn and does what it says.

use super::{Action, Link, Session};
use crate::protocol::Body;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// How long a stop may take, from the worker's settings.
#[derive(Clone, Copy, Debug)]
pub struct StopRules {
    /// `stop_policy = abort`: the running task is stopped at once.
    pub abort: bool,
    /// `stop_timeout_ms`: how long the running task may still take.
    pub timeout: Duration,
    /// The conductor's kill grace: how long stopping it may take.
    pub kill_grace: Duration,
}

/// Where a stop stands.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Stopping {
    /// When to give up waiting (then: stop the task, later: leave), and
    /// whether the task was stopped for it already.
    deadline: Option<(Instant, bool)>,
    kill_grace: Duration,
    /// When a bye went out: the time by which its ack must come.
    bye_answer_by: Option<Instant>,
}

/// What the shell does about a stop this turn.
#[derive(Debug, PartialEq)]
pub enum StopStep {
    /// Nothing yet (no stop asked, or waiting for the task or an ack).
    Wait,
    /// Send the `bye` (these actions' messages), then wait for its ack.
    Bye(Vec<Action>),
    /// The running task outlasted the stop timeout: carry these out.
    StopTasks(Vec<Action>),
    /// The stop is over: leave.
    Leave,
}

impl Session {
    /// A stop was asked for: no new task from now on; with `abort` the
    /// running one is stopped at once (the actions say so).
    pub fn begin_stop(&mut self, now: Instant, rules: StopRules) -> Vec<Action> {
        if self.stop.deadline.is_none() {
            self.stop.deadline = Some((now + rules.timeout, rules.abort));
            self.stop.kill_grace = rules.kill_grace;
        }
        self.stop_task_now(rules.abort)
    }

    /// Whether a stop was asked for.
    pub fn stop_requested(&self) -> bool {
        self.stop.deadline.is_some()
    }

    fn stop_task_now(&mut self, abort: bool) -> Vec<Action> {
        let mut actions = Vec::new();
        if abort {
            if let Some(slot) = self.slot.as_mut().filter(|s| !s.finished) {
                if !slot.stopped_for_exit {
                    slot.stopped_for_exit = true;
                    warn!(task = %slot.spec.task, "worker stopping: stopping the running conductor; the task is reported interrupted");
                    actions.push(Action::StopTask(slot.spec.task.clone()));
                }
            }
        }
        actions
    }

    /// Stopping, and nothing left to deliver: time for `bye`.
    pub fn stop_complete(&self) -> bool {
        self.stop_requested() && self.slot.is_none() && self.outbox.is_empty()
    }

    /// The stop's next step at `now` (see [`StopStep`]).
    pub fn poll_stop(&mut self, now: Instant) -> StopStep {
        let Some((deadline, escalated)) = self.stop.deadline else {
            return StopStep::Wait;
        };
        if let Some(answer_by) = self.stop.bye_answer_by {
            if self.bye_acknowledged() {
                info!("said bye to the server");
                return StopStep::Leave;
            }
            if now >= answer_by {
                warn!("the server did not acknowledge the bye in time; stopping anyway");
                return StopStep::Leave;
            }
        } else if self.slot.as_ref().is_none_or(|s| s.finished)
            && !self.outbox.is_empty()
            && !matches!(self.link, Link::Up { .. })
        {
            // Nothing runs any more and the server is gone (it said
            // `shutdown`, or went silent): an ack is not coming, and a
            // stop must not wait `stop_timeout` for one. What is left is
            // in worker.db and goes out at the next start.
            warn!(
                undelivered = self.outbox.len(),
                "stopping while the server is unreachable: the undelivered messages stay in worker.db for the next start"
            );
            return StopStep::Leave;
        } else if self.stop_complete() {
            let (actions, sent) = self.bye(now, "stopped (SIGTERM) with nothing left to deliver");
            if !sent {
                info!("stopping; the server is unreachable, so no bye");
                return StopStep::Leave;
            }
            self.stop.bye_answer_by = Some(now + self.liveness_window());
            return StopStep::Bye(actions);
        }
        if now < deadline {
            return StopStep::Wait;
        }
        if escalated {
            warn!("stop: what remains could not be delivered in time; it stays in worker.db for the next start");
            return StopStep::Leave;
        }
        warn!("stop: the running task did not end within stop_timeout_ms; stopping it");
        let grace = self.stop.kill_grace + Duration::from_secs(10);
        self.stop.deadline = Some((now + grace, true));
        StopStep::StopTasks(self.stop_task_now(true))
    }

    /// Tells the server this worker stops on purpose, as a mandatory
    /// message: [`Session::bye_acknowledged`] says when the server has
    /// recorded it. Nothing (and false) if the server is unreachable.
    fn bye(&mut self, now: Instant, reason: &str) -> (Vec<Action>, bool) {
        let mut actions = Vec::new();
        if !matches!(self.link, Link::Up { .. }) {
            return (actions, false);
        }
        let body = Body::Bye {
            reason: reason.to_string(),
        };
        self.outbox.push(None, None, body, None);
        self.flush(now, &mut actions, false);
        (actions, true)
    }

    /// The bye (the last thing in the outbox) was acknowledged.
    fn bye_acknowledged(&self) -> bool {
        self.outbox.is_empty()
    }
}
