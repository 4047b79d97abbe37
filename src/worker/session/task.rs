//! The one task the worker owns: a dispatch accepted or refused, its
//! events (log lines, the final report) turned into messages, the
//! server's log-full and closing of it, and when it is done.

use super::{uploads, Slot};
use crate::protocol::*;
use crate::worker::session::{
    Action, Arrival, Link, PendingReport, Piece, Session, Upload, UploadState, MAX_OUTBOX,
};
use crate::worker::task::channel::{charge, ResultFile, TaskEvent};
use std::time::Instant;
use tracing::{info, warn};

impl Session {
    pub(super) fn on_dispatch(
        &mut self,
        now: Instant,
        received: Arrival,
        spec: TaskSpec,
        actions: &mut Vec<Action>,
    ) {
        let task = spec.task.clone();
        let attempt = spec.attempt;
        if self.stop_requested() && self.slot.is_none() {
            // Stopping: no new task (a refusal uses no attempt).
            let body = Body::TaskRefused {
                task: task.clone(),
                reason: RefuseReason::Busy,
                message: format!("worker {} is stopping", self.name),
            };
            self.deliver(now, &task, attempt, body, None);
            return;
        }
        if let Some(slot) = &self.slot {
            if slot.spec.task == task && slot.spec.attempt == attempt {
                return; // a resent dispatch we already accepted
            }
            // A refusal is a mandatory message: a server that keeps sending
            // dispatches and never acknowledges must not grow the outbox
            // (and worker.db) without bound.
            if self.outbox.len() >= MAX_OUTBOX {
                self.stats.dispatches_unanswered += 1;
                return;
            }
            let body = Body::TaskRefused {
                task: task.clone(),
                reason: RefuseReason::Busy,
                message: format!(
                    "worker {} is busy with {} attempt {}",
                    self.name, slot.spec.task, slot.spec.attempt
                ),
            };
            self.deliver(now, &task, attempt, body, None);
            return;
        }
        // Expiry is relative to when this copy arrived (monotonic clock):
        // it never depends on two machines agreeing on wall time. A copy
        // that waited in our own queue longer than its ttl is stale.
        let waited = now.saturating_duration_since(received.at).as_millis() as u64;
        let transit = self.clock.transit_ms(received.wall_ms, spec.sent_ms);
        let age = waited.saturating_add(transit);
        if age > spec.ttl_ms && self.outbox.len() >= MAX_OUTBOX {
            self.stats.dispatches_unanswered += 1;
            return;
        }
        if age > spec.ttl_ms {
            let late = age - spec.ttl_ms;
            self.stats.expired_dispatches += 1;
            warn!(task = %task, late_ms = late, "expired dispatch: refused to start a stale task");
            let body = Body::TaskRefused {
                task: task.clone(),
                reason: RefuseReason::Expired,
                message: format!(
                    "dispatch was started {late} ms after its ttl of {} ms",
                    spec.ttl_ms
                ),
            };
            self.deliver(now, &task, attempt, body, None);
            return;
        }
        info!(task = %task, attempt, "task accepted");
        let body = Body::TaskAccepted {
            task: task.clone(),
            attempt,
        };
        self.deliver(now, &task, attempt, body, None);
        self.slot = Some(Slot {
            spec: spec.clone(),
            aborted: false,
            finished: false,
            report: None,
            uploads: Vec::new(),
            stopped_for_exit: false,
            log_full: false,
        });
        self.ready_sent = false;
        actions.push(Action::StartTask(spec));
    }

    /// The server will store no more of this attempt's log: the lines
    /// waiting here go (counted), later ones are not sent, and the task
    /// runner is told to stop handing them over. Said again by a server
    /// while lines arrive; only the first time changes anything.
    pub(super) fn on_log_full(
        &mut self,
        task: TaskId,
        attempt: u32,
        reason: &str,
        actions: &mut Vec<Action>,
    ) {
        let Some(slot) = self
            .slot
            .as_mut()
            .filter(|s| s.spec.task == task && s.spec.attempt == attempt && !s.log_full)
        else {
            return;
        };
        slot.log_full = true;
        let mut dropped = 0u64;
        let (mut bytes, mut lines) = (0usize, 0usize);
        self.logs.retain(|p| {
            let keep = p.task != task || p.attempt != attempt;
            if !keep {
                dropped += u64::from(p.text.count);
                bytes += charge(&p.text);
                lines += p.text.count as usize;
            }
            keep
        });
        self.log_bytes -= bytes;
        self.log_lines -= lines;
        if self.logs.is_empty() {
            self.oldest_log_at = None;
        }
        self.stats.log_lines_not_sent_log_full += dropped;
        warn!(task = %task, attempt, reason, buffered_lines_dropped = dropped, "the server stores no more of this task's log: its further lines are counted, not sent (reported as lost)");
        actions.push(Action::LogFull(task));
    }

    pub(super) fn on_task_closed(
        &mut self,
        task: TaskId,
        attempt: Option<u32>,
        reason: String,
        actions: &mut Vec<Action>,
    ) {
        let mut dropped = self.outbox.drop_task(&task, attempt);
        let matches = |t: &TaskId, a: u32| *t == task && attempt.is_none_or(|x| x == a);
        let ours = self
            .slot
            .as_ref()
            .is_some_and(|s| matches(&s.spec.task, s.spec.attempt));
        let finished = self.slot.as_ref().is_some_and(|s| s.finished);
        if ours && self.slot.as_ref().is_some_and(|s| s.report.is_some()) {
            // The report (and the uploads it waited for) go too.
            dropped += 1;
        }
        if dropped > 0 {
            self.stats.orphans_closed += dropped as u64;
            warn!(task = %task, %reason, dropped, "orphan: server closed the task; dropped its unacknowledged messages");
        } else if ours && !finished {
            warn!(task = %task, %reason, "server closed the running task; stopping its conductor");
        } else {
            info!(task = %task, %reason, "task channel closed by the server");
        }
        self.logs.retain(|p| !matches(&p.task, p.attempt));
        self.log_bytes = self.logs.iter().map(|p| charge(&p.text)).sum();
        self.log_lines = self.logs.iter().map(|p| p.text.count as usize).sum();
        if ours {
            if !finished {
                actions.push(Action::StopTask(task.clone()));
            }
            if let Some(s) = self.slot.take() {
                actions.push(Action::TaskDone {
                    task: s.spec.task,
                    attempt: s.spec.attempt,
                });
            }
            self.transfer = uploads::Transfer::default();
        }
    }

    /// The current task is over once its final report is acknowledged.
    pub(super) fn maybe_done(&mut self, actions: &mut Vec<Action>) {
        if let Some(slot) = &self.slot {
            if slot.finished && slot.report.is_none() && !self.outbox.has_task(&slot.spec.task) {
                info!(task = %slot.spec.task, "final report acknowledged");
                actions.push(Action::TaskDone {
                    task: slot.spec.task.clone(),
                    attempt: slot.spec.attempt,
                });
                self.slot = None;
            }
        }
    }

    pub fn on_task_event(&mut self, now: Instant, event: TaskEvent) -> Vec<Action> {
        let mut actions = Vec::new();
        match event {
            TaskEvent::Log {
                task,
                attempt,
                first,
                text,
            } => {
                if !self.is_current(&task, attempt) {
                    return actions; // the task was closed under it; dropped on purpose
                }
                if self.slot.as_ref().is_some_and(|s| s.log_full) {
                    // Handed over before the runner heard of it.
                    self.stats.log_lines_not_sent_log_full += u64::from(text.count);
                    return actions;
                }
                self.buffer_log(
                    now,
                    Piece {
                        task,
                        attempt,
                        first,
                        text,
                    },
                );
            }
            TaskEvent::ConsoleBytes {
                task,
                attempt,
                offset,
                bytes,
            } => {
                if !self.is_current(&task, attempt) {
                    return actions;
                }
                if !matches!(self.link, Link::Up { .. }) {
                    // Best effort: the consoles see a gap, counted.
                    self.stats.console_bytes_unsent += bytes.len() as u64;
                    return actions;
                }
                let header = Header::best_effort(Class::Log, Some(&task));
                self.send(
                    now,
                    &mut actions,
                    header,
                    Body::ConsoleData {
                        task,
                        attempt,
                        offset,
                    },
                    Some(bytes),
                );
            }
            TaskEvent::PowerDone {
                task,
                attempt,
                id,
                action,
                state,
                ok,
                message,
            } => {
                if !self.is_current(&task, attempt) {
                    return actions;
                }
                let body = Body::PowerDone {
                    task: task.clone(),
                    attempt,
                    id,
                    action,
                    state,
                    ok,
                    message,
                };
                self.deliver(now, &task, attempt, body, None);
                if matches!(self.link, Link::Up { .. }) {
                    self.flush(now, &mut actions, false);
                }
            }
            TaskEvent::Finished {
                task,
                attempt,
                outcome,
                log_lines,
                files,
            } => {
                let Some(slot) = self
                    .slot
                    .as_mut()
                    .filter(|s| s.spec.task == task && s.spec.attempt == attempt)
                else {
                    info!(task = %task, "conductor ended for a task the server already closed");
                    return actions;
                };
                slot.finished = true;
                let mut outcome = outcome;
                if slot.stopped_for_exit {
                    outcome.cancelled = false;
                    outcome.interrupted = true;
                    outcome.failure = Some(
                        "interrupted: the worker was stopped (stop_policy = abort, or its stop_timeout passed)".into(),
                    );
                }
                if slot.aborted {
                    outcome.cancelled = false;
                    outcome.failure = Some(
                        "aborted: the server was unreachable and on_server_lost = abort".into(),
                    );
                }
                if let Some(n) = self.dropped_per_task.remove(&task) {
                    warn!(task = %task, dropped = n, "log lines dropped from the full buffer while the server was unreachable");
                }
                info!(task = %task, %outcome, log_lines, files = files.len(), "task finished; reporting once its result files are delivered");
                // Logs first: they must precede the report on the wire.
                if matches!(self.link, Link::Up { .. }) {
                    self.flush_logs(now, &mut actions, true);
                }
                let slot = self.slot.as_mut().expect("checked above");
                slot.report = Some(PendingReport { outcome, log_lines });
                slot.uploads = files
                    .into_iter()
                    .map(
                        |ResultFile {
                             name,
                             size,
                             mtime_ns,
                         }| Upload {
                            name,
                            size,
                            mtime_ns,
                            acked: 0,
                            sha256: None,
                            state: UploadState::Pending,
                        },
                    )
                    .collect();
                self.transfer = uploads::Transfer::default();
                self.advance_uploads(now, &mut actions);
            }
        }
        if matches!(self.link, Link::Up { .. }) {
            self.flush(now, &mut actions, false);
        }
        actions
    }

    /// True if (task, attempt) is the task this worker owns now.
    pub(super) fn is_current(&self, task: &TaskId, attempt: u32) -> bool {
        self.slot
            .as_ref()
            .is_some_and(|s| s.spec.task == *task && s.spec.attempt == attempt)
    }

    /// The task the worker owns, if any.
    pub fn current_task(&self) -> Option<&TaskId> {
        self.slot.as_ref().map(|s| &s.spec.task)
    }
}
