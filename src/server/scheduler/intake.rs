//! What workers send about their tasks: the mandatory messages applied once
//! (accepted, refused, file chunks, final report), orphans, log lines, and
//! result files with their limits and streaming verification.

use super::*;

/// How often, at most, a worker that keeps sending lines of a full log
/// is told `log_full` again (the message is best effort: one lost is
/// said again while lines still come).
pub const LOG_FULL_REPEAT: Duration = Duration::from_secs(1);

/// A worker's final report of a task, as applied.
pub(super) struct Report {
    outcome: Outcome,
    log_lines: u64,
    files: Vec<FileInfo>,
    file_problems: Vec<FileProblem>,
}

impl<S: Store> Scheduler<S> {
    /// True if the task is open on this worker's channel.
    /// True if `attempt` (any, for `None`) of the task is open on this
    /// worker's channel.
    pub(super) fn open_on(&self, task: &TaskId, worker: &str, attempt: Option<u32>) -> bool {
        self.tasks.get(task).is_some_and(|t| {
            !t.state.is_final()
                && t.state != TaskState::Queued
                && t.worker.as_deref() == Some(worker)
                && attempt.is_none_or(|a| a == t.attempts)
        })
    }

    /// Applies a mandatory message once. Returns true if it should be acked
    /// (false: it was answered with a nack instead).
    pub(super) fn apply_mandatory(
        &mut self,
        now: Instant,
        worker: &str,
        body: Body,
        raw: Option<Bytes>,
    ) -> bool {
        // A bye sent mandatory: acknowledged once the stop is recorded, so
        // the worker closes its connection only after that (a close seen
        // before the bye would count as a loss).
        if let Body::Bye { reason } = &body {
            self.worker_stopped(now, worker, reason);
            return true;
        }
        let (task, attempt) = match &body {
            Body::TaskAccepted { task, attempt }
            | Body::Log { task, attempt, .. }
            | Body::LogPacked { task, attempt, .. }
            | Body::TaskFinished { task, attempt, .. }
            | Body::PowerDone { task, attempt, .. } => (task.clone(), Some(*attempt)),
            Body::TaskRefused { task, .. } => (task.clone(), None),
            other => {
                self.count("unexpected_message", 1);
                let kind = other.kind();
                if self.noise.allow(self.latest, "protocol errors") {
                    warn!(worker, kind, "protocol error: message cannot be mandatory");
                }
                self.send_to_worker(
                    worker,
                    None,
                    Body::Error {
                        request: None,
                        code: ErrorCode::Malformed,
                        message: format!("{kind} is not a mandatory message"),
                        seq: None,
                    },
                );
                return true;
            }
        };
        if !self.open_on(&task, worker, attempt) {
            let class = body.class();
            let counter = match class {
                Class::File => "orphan_file",
                Class::Log => "orphan_log_batches",
                _ => "orphan_control",
            };
            self.count(counter, 1);
            if self.noise.allow(self.latest, "orphans") {
                warn!(worker, task = %task, kind = body.kind(), "orphan: message for a closed or unknown task; answered task_closed");
            }
            self.send_to_worker(
                worker,
                Some(&task),
                Body::TaskClosed {
                    task: task.clone(),
                    attempt,
                    reason: "task is closed or unknown on this server".into(),
                },
            );
            return false;
        }
        match body {
            Body::Log {
                task,
                attempt,
                lines,
            } => self.on_log(worker, task, attempt, lines),
            Body::LogPacked {
                task,
                attempt,
                parts,
            } => self.on_log_packed(worker, task, attempt, parts, raw),
            Body::TaskAccepted { task, .. } => {
                let t = self.tasks.get_mut(&task).expect("open task");
                if t.state == TaskState::Dispatched || t.state == TaskState::Held {
                    t.state = TaskState::Running;
                    t.since = now;
                    self.progress(&task, ProgressState::Running, None, None);
                }
            }
            Body::TaskRefused {
                task,
                reason,
                message,
            } => {
                warn!(worker, task = %task, reason = %crate::text::wire(&reason), %message, "worker refused a dispatch");
                let w = self.workers.get_mut(worker).expect("worker");
                w.task = None;
                w.state = WorkerState::Idle;
                let t = self.tasks.get_mut(&task).expect("open task");
                // A refused dispatch did not run: it does not use up an
                // attempt, but refusals are bounded so a task cannot bounce
                // between a broken worker and the queue forever.
                t.attempts = t.attempts.saturating_sub(1);
                t.refusals = t.refusals.saturating_add(1);
                if t.refusals > self.cfg.limits.max_refusals {
                    let reason = format!(
                        "refused by workers {} times (last: worker {worker}: {message})",
                        t.refusals
                    );
                    self.end_task(
                        now,
                        &task,
                        TaskState::Finished,
                        Some(Verdict::Error),
                        reason,
                    );
                } else {
                    self.requeue(now, &task, format!("worker {worker} refused it: {message}"));
                }
            }
            Body::TaskFinished {
                task,
                attempt: _,
                outcome,
                log_lines,
                files,
                file_problems,
            } => {
                // A report that overtook one of its files (a worker that
                // does not wait for `file_stored`) waits: not acknowledged,
                // so the worker resends it once the upload is done.
                let t = &self.tasks[&task];
                let missing = files.iter().find(|f| t.uploads.contains_key(&f.name));
                if let Some(f) = missing {
                    info!(task = %task, file = %f.name, "final report arrived while its result file is still in transfer; waiting for the resend");
                    self.count("report_before_files", 1);
                    return false;
                }
                let report = Report {
                    outcome,
                    log_lines,
                    files,
                    file_problems,
                };
                self.on_finished(now, worker, &task, report)
            }
            body @ Body::PowerDone { .. } => self.on_power_done(worker, body),
            _ => unreachable!("filtered above"),
        }
        true
    }

    /// Packed log lines: checked by the codec already; stored as they are
    /// when every part is new, in order and within the task's limits (the
    /// normal case: one append, one range per part, no work per line).
    /// Anything else (a resent or overlapping part, the limits reached)
    /// goes line by line through [`Self::on_log`].
    pub(super) fn on_log_packed(
        &mut self,
        worker: &str,
        task: TaskId,
        attempt: u32,
        parts: Vec<LogPart>,
        raw: Option<Bytes>,
    ) {
        let raw = raw.unwrap_or_default();
        let lines: u64 = parts.iter().map(|p| u64::from(p.count)).sum();
        if !self.open_on(&task, worker, Some(attempt)) {
            self.count("orphan_log_lines", lines);
            return;
        }
        let t = &self.tasks[&task];
        let limits = &self.cfg.limits;
        // The task's log is full: none of these new lines can be stored
        // (every line takes at least its newline); no need to look at
        // them one by one, and the worker is told to stop sending them.
        if (t.log_bytes >= limits.max_task_log_bytes || t.log_full_told.is_some())
            && !parts.iter().any(|p| t.log.overlaps(p.first, p.last()))
        {
            self.refuse_log_lines(&task, lines);
            self.tell_log_full(&task);
            return;
        }
        let Some(bytes) = packed_fits(t, &parts, limits) else {
            self.count("log_packed_slow_path", 1);
            let all = crate::protocol::logtext::unpack(&parts, &raw);
            return self.on_log(worker, task, attempt, all);
        };
        let texts: Vec<(Stream, &[u8])> = crate::protocol::logtext::part_texts(&parts, &raw)
            .map(|(p, text)| (p.stream, text))
            .collect();
        if let Err(e) = self.store.append_log_packed(&task, &texts) {
            warn!(task = %task, error = %e, lines, "storage error: log lines not stored");
            self.count("log_lines_store_failed", lines);
            return;
        }
        self.pending.task_log(&task);
        let t = self.tasks.get_mut(&task).expect("open task");
        for p in &parts {
            t.log.insert_range(p.first, p.last());
        }
        t.log_bytes = bytes;
        let run = t.run.clone();
        self.count("log_lines_stored", lines);
        let topic = format!("log/{run}");
        self.tell_followers(
            &run.clone(),
            topic,
            Body::LogLinesPacked { run, task, parts },
            Some(raw),
            true,
        );
    }

    /// Lines of an open task dropped at the task's log limits: counted,
    /// reported as lost, said once per task.
    fn refuse_log_lines(&mut self, task: &TaskId, refused: u64) {
        let t = self.tasks.get_mut(task).expect("open task");
        if t.log_refused == 0 {
            warn!(task = %task, "log limit reached (limits.max_task_log_bytes or max_log_gaps): further lines are dropped and reported as lost");
        }
        t.log_refused += refused;
        self.pending.task_log(task);
        self.count("log_lines_over_limit", refused);
    }

    /// The attempt's log is full: from now on its lines are refused
    /// whole, and its worker hears `log_full` (again at most every
    /// [`LOG_FULL_REPEAT`] while lines keep coming: the message is best
    /// effort), so that it stops reading, sealing and sending lines that
    /// will never be stored.
    fn tell_log_full(&mut self, task: &TaskId) {
        let now = self.latest;
        let max = self.cfg.limits.max_task_log_bytes;
        let t = self.tasks.get_mut(task).expect("open task");
        if t.log_full_told
            .is_some_and(|at| now.saturating_duration_since(at) < LOG_FULL_REPEAT)
        {
            return;
        }
        let first = t.log_full_told.is_none();
        t.log_full_told = Some(now);
        let (attempt, worker) = (t.attempts, t.worker.clone());
        if first {
            info!(task = %task, attempt, stored_bytes = t.log_bytes, "task log full (limits.max_task_log_bytes): its worker is told to stop sending lines");
        }
        self.count("log_full_told", 1);
        if let Some(worker) = worker {
            self.send_to_worker(
                &worker,
                Some(task),
                Body::LogFull {
                    task: task.clone(),
                    attempt,
                    reason: format!(
                        "the task's log holds limits.max_task_log_bytes ({max} bytes): further lines are not stored"
                    ),
                },
            );
        }
    }

    pub(super) fn on_log(&mut self, worker: &str, task: TaskId, attempt: u32, lines: Vec<LogLine>) {
        if !self.open_on(&task, worker, Some(attempt)) {
            self.count("orphan_log_lines", lines.len() as u64);
            return;
        }
        let t = &self.tasks[&task];
        let mut fresh: Vec<LogLine> = lines
            .into_iter()
            .filter(|l| l.seq > 0 && !t.log.contains(l.seq))
            .collect();
        fresh.sort_by_key(|l| l.seq);
        fresh.dedup_by_key(|l| l.seq);
        // Bounded: bytes on disk per attempt, and separate runs of line
        // numbers (a peer numbering every other line would otherwise grow
        // the accounting with every line). Refused lines count as lost.
        let limits = &self.cfg.limits;
        let mut bytes = t.log_bytes;
        // A line opens a new run unless it continues the line before it in
        // this (sorted) batch or touches a stored run; runs that merge are
        // not counted back, which errs on the side of refusing.
        let mut runs = t.log.runs();
        let mut prev: Option<u64> = None;
        let before = fresh.len();
        let mut full = t.log_full_told.is_some();
        fresh.retain(|l| {
            let size = crate::server::store::rendered_len(l);
            // Once one line did not fit, none after it is stored either
            // (a shorter one could, but the log is closed: what the
            // worker is told and what is stored agree).
            if full || bytes.saturating_add(size) > limits.max_task_log_bytes {
                full = true;
                return false;
            }
            let below = l.seq - 1; // seq ≥ 1 (filtered above)
            let joins = prev == Some(below)
                || t.log.contains(below)
                || l.seq.checked_add(1).is_some_and(|n| t.log.contains(n));
            if !joins {
                if runs >= limits.max_log_gaps {
                    return false;
                }
                runs += 1;
            }
            prev = Some(l.seq);
            bytes += size;
            true
        });
        let refused = (before - fresh.len()) as u64;
        let run = t.run.clone();
        if refused > 0 {
            self.refuse_log_lines(&task, refused);
        }
        if full {
            self.tell_log_full(&task);
        }
        if fresh.is_empty() {
            return;
        }
        if let Err(e) = self.store.append_log(&task, &fresh) {
            // Best-effort class: the lines count as lost, the task goes on.
            warn!(task = %task, error = %e, lines = fresh.len(), "storage error: log lines not stored");
            self.count("log_lines_store_failed", fresh.len() as u64);
            return;
        }
        self.pending.task_log(&task);
        let t = self.tasks.get_mut(&task).expect("open task");
        for l in &fresh {
            t.log.insert(l.seq);
        }
        // The total the limit check above added up, line by line.
        t.log_bytes = bytes;
        self.count("log_lines_stored", fresh.len() as u64);
        let topic = format!("log/{run}");
        self.tell_followers(
            &run.clone(),
            topic,
            Body::LogLines {
                run,
                task,
                lines: fresh,
            },
            None,
            true,
        );
    }

    pub(super) fn on_finished(
        &mut self,
        now: Instant,
        worker: &str,
        task: &TaskId,
        report: Report,
    ) {
        let Report {
            outcome,
            log_lines,
            files,
            file_problems,
        } = report;
        let run = self.tasks[task].run.clone();
        let timeout = self.runs[&run].request.timeout_secs;
        // Every announced file must be stored, verified, as announced;
        // JUnit results were read when the desk stored each file.
        let mut junit: Result<Option<CaseCounts>, String> = Ok(None);
        if let Some(p) = file_problems.first() {
            junit = Err(format!(
                "result file {} could not be delivered: {}",
                p.name, p.reason
            ));
        }
        for f in &files {
            if junit.is_err() {
                break;
            }
            let t = &self.tasks[task];
            if let Some(why) = t.file_errors.get(&f.name) {
                junit = Err(format!("result file {} was refused: {why}", f.name));
                break;
            }
            match t.files.iter().find(|s| s.name == f.name) {
                None => {
                    junit = Err(format!(
                        "result file {} was announced but never arrived",
                        f.name
                    ));
                    break;
                }
                Some(stored) if stored != f => {
                    junit = Err(format!(
                        "result file {} did not arrive intact: stored {} bytes with SHA-256 {}, the report says {} bytes with {}",
                        f.name, stored.size, stored.sha256, f.size, f.sha256
                    ));
                    break;
                }
                Some(_) => {}
            }
            match (t.junit.get(&f.name), &mut junit) {
                (Some(Err(e)), _) => junit = Err(e.clone()),
                (Some(Ok(Some(c))), Ok(total)) => {
                    total.get_or_insert_with(CaseCounts::default).add(*c)
                }
                _ => {}
            }
        }
        if outcome.interrupted {
            let w = self.workers.get_mut(worker).expect("worker");
            w.task = None;
            w.state = WorkerState::Idle;
            // The worker says why (restarted, or stopped with
            // stop_policy = abort); an older one only that it was.
            let why = match &outcome.failure {
                Some(f) => format!(
                    "worker {worker}, attempt {}: {f}",
                    self.tasks[task].attempts
                ),
                None => format!(
                    "worker {worker} restarted while running attempt {}",
                    self.tasks[task].attempts
                ),
            };
            self.requeue_or_fail(now, task, why);
            return;
        }
        let (verdict, reason) = task_verdict(&outcome, timeout, junit.clone());
        let cancelled = outcome.cancelled || self.tasks[task].cancel_requested;
        // The device or the worker failed, not the test (PROTOCOL.md
        // §7.5): the attempt runs again elsewhere and counts against it.
        let infrastructure = !cancelled
            && !outcome.timed_out
            && !outcome.by_testrun
            && (outcome.failure.is_some()
                || outcome
                    .exit_code
                    .is_some_and(|c| self.cfg.infrastructure_exit_codes.contains(&c)));
        let t = self.tasks.get_mut(task).expect("open task");
        t.log_lines_produced = Some(log_lines);
        t.cases = junit.ok().flatten();
        let missing = t.log.missing(log_lines);
        let lost: u64 = missing
            .iter()
            .map(|(a, b)| b - a + 1)
            .fold(0u64, u64::saturating_add);
        let w = self.workers.get_mut(worker).expect("worker");
        w.task = None;
        w.state = WorkerState::Idle;
        if lost > 0 {
            warn!(task = %task, lost, ranges = %describe(&missing), "log lines lost in transit");
            self.count("log_lines_lost", lost);
        }
        if cancelled && self.lease_paused(now, task) {
            // The hold let go for a testrun on its lease: it waits.
        } else if cancelled {
            self.end_task(
                now,
                task,
                TaskState::Cancelled,
                None,
                "cancelled by request".into(),
            );
        } else if infrastructure {
            let why = format!(
                "worker {worker}, attempt {}: {reason}",
                self.tasks[task].attempts
            );
            self.infrastructure_failure(now, task, worker, why);
        } else {
            if matches!(outcome.exit_code, Some(0) | Some(1)) && outcome.signal.is_none() {
                self.health_event(now, worker, crate::server::health::Event::TestResult);
            }
            self.end_task(now, task, TaskState::Finished, Some(verdict), reason);
        }
    }
}

/// The task's stored log bytes once `parts` are stored as they came, if
/// they can be: every line new, parts in increasing order, within the
/// task's byte and gap limits. `None` sends them line by line.
fn packed_fits(t: &Task, parts: &[LogPart], limits: &SchedulerLimits) -> Option<u64> {
    let mut bytes = t.log_bytes;
    let mut runs = t.log.runs();
    let mut prev_last: Option<u64> = None;
    for p in parts {
        let size = u64::from(p.bytes)
            + crate::server::store::prefix(p.stream).len() as u64 * u64::from(p.count);
        let in_order = prev_last.is_none_or(|pl| p.first > pl);
        if !in_order
            || t.log.overlaps(p.first, p.last())
            || bytes.saturating_add(size) > limits.max_task_log_bytes
        {
            return None;
        }
        let joins = prev_last.is_some_and(|pl| pl + 1 == p.first) || t.log.joins(p.first, p.last());
        if !joins {
            if runs >= limits.max_log_gaps {
                return None;
            }
            runs += 1;
        }
        bytes += size;
        prev_last = Some(p.last());
    }
    Some(bytes)
}
