//! What workers send about their tasks: the mandatory messages applied once
//! (accepted, refused, file chunks, final report), orphans, log lines, and
//! result files with their limits and streaming verification.

use super::*;

/// A SHA-256 computed while a file's chunks arrive in order.
#[derive(Default)]
pub(super) struct StreamHash {
    hasher: sha2::Sha256,
    /// Bytes hashed so far, from offset 0.
    hashed: u64,
}

impl StreamHash {
    /// Feeds a chunk; only the part continuing what was hashed counts
    /// (resends of earlier bytes add nothing, a chunk beyond a gap stops
    /// the streaming for this file).
    pub(super) fn update(&mut self, offset: u64, data: &[u8]) {
        use sha2::Digest;
        let end = offset.saturating_add(data.len() as u64);
        if offset <= self.hashed && end > self.hashed {
            let skip = (self.hashed - offset) as usize;
            self.hasher.update(&data[skip..]);
            self.hashed = end;
        }
    }

    /// The digest, if every byte of a file of `size` bytes was hashed.
    pub(super) fn digest_if_whole(self, size: u64) -> Option<String> {
        use sha2::Digest;
        (self.hashed == size).then(|| hex::encode(self.hasher.finalize()))
    }
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
        seq: Option<u64>,
        body: Body,
        raw: Option<Bytes>,
    ) -> bool {
        let (task, attempt) = match &body {
            Body::TaskAccepted { task, attempt }
            | Body::FileChunk { task, attempt, .. }
            | Body::Log { task, attempt, .. }
            | Body::TaskFinished { task, attempt, .. } => (task.clone(), Some(*attempt)),
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
                warn!(worker, task = %task, ?reason, %message, "worker refused a dispatch");
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
            Body::FileChunk {
                task,
                attempt: _,
                name,
                offset,
                size,
                sha256,
            } => {
                let data = raw.unwrap_or_default();
                // Checked before any byte is written.
                let end = offset.saturating_add(data.len() as u64);
                if let Some((code, why)) = self.file_refusal(&task, &name, size, offset, end) {
                    return self.refuse_file(worker, &task, seq, &name, code, why);
                }
                if let Err(e) = self.store.write_chunk(&task, &name, offset, &data) {
                    return self.file_problem(worker, &task, seq, &name, e);
                }
                self.touched.insert(task.clone());
                // Chunks may arrive out of order after resends: check the
                // whole file only once all of it is here.
                let t = self.tasks.get_mut(&task).expect("open task");
                t.file_sizes.insert(name.clone(), size);
                t.received
                    .entry(name.clone())
                    .or_default()
                    .insert(offset, end);
                t.hashing
                    .entry(name.clone())
                    .or_default()
                    .update(offset, &data);
                let complete = t.covered(&name) >= size;
                if complete {
                    if let Some(sha) = sha256 {
                        // Hashed as the bytes came (in order, the usual
                        // case): no re-read of the whole file on the loop.
                        // Out of order, the store reads it back once.
                        let streamed = t
                            .hashing
                            .remove(&name)
                            .and_then(|h| h.digest_if_whole(size));
                        let verdict = match streamed {
                            Some(actual) if actual == sha => Ok(()),
                            Some(actual) => Err(StoreError::Mismatch {
                                task: task.clone(),
                                name: name.clone(),
                                size,
                                sha: sha.clone(),
                                actual_size: size,
                                actual_sha: actual,
                            }),
                            None => self.store.verify_file(&task, &name, size, &sha),
                        };
                        if let Err(e) = verdict {
                            return self.file_problem(worker, &task, seq, &name, e);
                        }
                        let t = self.tasks.get_mut(&task).expect("open task");
                        t.files.retain(|f| f.name != name);
                        t.files.push(FileInfo {
                            name,
                            size,
                            sha256: sha,
                        });
                    }
                }
            }
            Body::TaskFinished {
                task,
                attempt: _,
                outcome,
                log_lines,
                files,
            } => {
                // A report that overtook one of its file chunks waits: not
                // acknowledged, so the worker resends it after the chunk.
                let t = &self.tasks[&task];
                // (A refused name never arrives; judged as damaged below.)
                let missing = files.iter().find(|f| {
                    crate::server::store::safe_relative_path(&f.name).is_ok()
                        && !t.file_errors.contains_key(&f.name)
                        && t.covered(&f.name) < f.size
                });
                if let Some(f) = missing {
                    info!(task = %task, file = %f.name, "final report arrived before all of its result file; waiting for the resend");
                    self.count("report_before_files", 1);
                    return false;
                }
                self.on_finished(now, worker, &task, outcome, log_lines, files)
            }
            _ => unreachable!("filtered above"),
        }
        true
    }

    /// Why a chunk `offset..end` of result file `name` (declared `size`)
    /// cannot be taken, if it cannot: the file was refused before, is over
    /// a size limit, changed size, or arrived in too many pieces. The codec
    /// already checked that the chunk lies inside the declared size.
    fn file_refusal(
        &self,
        task: &TaskId,
        name: &str,
        size: u64,
        offset: u64,
        end: u64,
    ) -> Option<(ErrorCode, String)> {
        let limits = &self.cfg.limits;
        let t = &self.tasks[task];
        if let Some(why) = t.file_errors.get(name) {
            return Some((ErrorCode::LimitReached, why.clone()));
        }
        let others: u64 = t
            .file_sizes
            .iter()
            .filter(|(n, _)| n.as_str() != name)
            .map(|(_, size)| *size)
            .fold(0u64, u64::saturating_add);
        if size > limits.max_file_bytes {
            return Some((
                ErrorCode::LimitReached,
                format!(
                    "result file {name:?} is {size} bytes, over the server's limit of {} (limits.max_file_bytes)",
                    limits.max_file_bytes
                ),
            ));
        }
        if others.saturating_add(size) > limits.max_task_file_bytes {
            return Some((
                ErrorCode::LimitReached,
                format!(
                    "result files of this task would exceed {} bytes (limits.max_task_file_bytes)",
                    limits.max_task_file_bytes
                ),
            ));
        }
        if t.file_sizes.get(name).is_some_and(|s| *s != size) {
            return Some((
                ErrorCode::Invalid,
                format!("result file {name:?} changed size during its transfer (now {size} bytes)"),
            ));
        }
        if t.received
            .get(name)
            .is_some_and(|r| r.runs() >= MAX_FILE_RANGES && !r.extends(offset, end))
        {
            return Some((
                ErrorCode::Invalid,
                format!(
                    "result file {name:?} arrived in more than {MAX_FILE_RANGES} separate pieces"
                ),
            ));
        }
        None
    }

    /// A result file the server will not take: the chunk is answered with
    /// a typed error carrying its seq (the worker stops resending it), the
    /// file is marked so the final report does not wait for it, and the
    /// verdict names the reason.
    pub(super) fn refuse_file(
        &mut self,
        worker: &str,
        task: &TaskId,
        seq: Option<u64>,
        name: &str,
        code: ErrorCode,
        why: String,
    ) -> bool {
        self.count("file_chunks_refused", 1);
        let t = self.tasks.get_mut(task).expect("open task");
        if !t.file_errors.contains_key(name) {
            warn!(worker, task = %task, file = name, reason = %why, "refused a result file");
            t.file_errors.insert(name.to_string(), why.clone());
        }
        self.touched.insert(task.clone());
        match seq {
            Some(seq) => self.refuse_mandatory(worker, Some(task), seq, code, why),
            None => self.send_to_worker(
                worker,
                Some(task),
                Body::Error {
                    request: None,
                    code,
                    message: why,
                    seq: None,
                },
            ),
        }
        false
    }

    pub(super) fn file_problem(
        &mut self,
        worker: &str,
        task: &TaskId,
        seq: Option<u64>,
        name: &str,
        e: StoreError,
    ) -> bool {
        match e {
            StoreError::BadFileName(_) => {
                self.count("bad_file_name", 1);
                self.refuse_file(
                    worker,
                    task,
                    seq,
                    name,
                    ErrorCode::BadFileName,
                    e.to_string(),
                )
            }
            StoreError::Mismatch { .. } => {
                self.count("file_mismatch", 1);
                warn!(worker, task = %task, error = %e, "result file does not match its checksum");
                true
            }
            other => {
                // Disk full, a name clash, an I/O error: answered, never
                // left to a resend loop; the operator sees why.
                self.count("store_errors", 1);
                let why = format!("storage error on the server: {other}");
                self.refuse_file(worker, task, seq, name, ErrorCode::StorageFailed, why)
            }
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
        fresh.retain(|l| {
            let size = crate::server::store::rendered_len(l);
            if bytes.saturating_add(size) > limits.max_task_log_bytes {
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
            let t = self.tasks.get_mut(&task).expect("open task");
            if t.log_refused == 0 {
                warn!(task = %task, "log limit reached (limits.max_task_log_bytes or max_log_gaps): further lines are dropped and reported as lost");
            }
            t.log_refused += refused;
            self.touched.insert(task.clone());
            self.count("log_lines_over_limit", refused);
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
        self.touched.insert(task.clone());
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
            true,
        );
    }

    pub(super) fn on_finished(
        &mut self,
        now: Instant,
        worker: &str,
        task: &TaskId,
        outcome: Outcome,
        log_lines: u64,
        files: Vec<FileInfo>,
    ) {
        let run = self.tasks[task].run.clone();
        let timeout = self.runs[&run].request.timeout_secs;
        // Check every announced file arrived whole, then read JUnit results.
        let mut junit: Result<Option<CaseCounts>, String> = Ok(None);
        for f in &files {
            if let Some(why) = self.tasks[task].file_errors.get(&f.name) {
                junit = Err(format!("result file {} was refused: {why}", f.name));
                break;
            }
            // Verified when its last byte arrived: not hashed again.
            let verified = self.tasks[task].files.iter().any(|v| v == f);
            let intact = if verified {
                Ok(())
            } else {
                self.store.verify_file(task, &f.name, f.size, &f.sha256)
            };
            if let Err(e) = intact {
                junit = Err(format!("result file {} did not arrive intact: {e}", f.name));
                break;
            }
            if !f.name.ends_with(".xml") {
                continue;
            }
            let parsed = self
                .store
                .read_file(task, &f.name, 0, MAX_JUNIT_BYTES)
                .map_err(|e| e.to_string())
                .and_then(|(xml, _)| {
                    parse_junit(&xml).map_err(|e| format!("result file {}: {e}", f.name))
                });
            match (parsed, &mut junit) {
                (Err(e), _) => {
                    junit = Err(e);
                    break;
                }
                (Ok(Some(c)), Ok(total)) => total.get_or_insert_with(CaseCounts::default).add(c),
                _ => {}
            }
        }
        if outcome.interrupted {
            let w = self.workers.get_mut(worker).expect("worker");
            w.task = None;
            w.state = WorkerState::Idle;
            let why = format!(
                "worker {worker} restarted while running attempt {}",
                self.tasks[task].attempts
            );
            self.requeue_or_fail(now, task, why);
            return;
        }
        let (verdict, reason) = task_verdict(&outcome, timeout, junit.clone());
        let cancelled = outcome.cancelled || self.tasks[task].cancel_requested;
        let t = self.tasks.get_mut(task).expect("open task");
        t.log_lines_produced = Some(log_lines);
        t.files = files;
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
        if cancelled {
            self.end_task(
                now,
                task,
                TaskState::Cancelled,
                None,
                "cancelled by request".into(),
            );
        } else {
            self.end_task(now, task, TaskState::Finished, Some(verdict), reason);
        }
    }
}
