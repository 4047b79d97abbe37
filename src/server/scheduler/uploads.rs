//! Result file uploads under credit-based flow control (PROTOCOL.md §7.7):
//! the worker offers a file, the server says how much it has and how far
//! the worker may send, chunks are written by the file desk off the loop,
//! and each byte written opens room for more. The credit every upload
//! holds comes out of one pool (`limits.file_buffer_bytes`), so the bytes
//! between the sockets and the disk stay bounded whatever the number of
//! workers or the size of their files.

use super::*;
use crate::server::files::{DeskError, FileDone, FileJob, Stored, UploadKey};
use tracing::error;

/// One upload of the current attempt of a task, in memory only: after a
/// server restart the worker offers again and the desk finds how much of
/// the incoming copy is on disk.
#[derive(Debug, Default)]
pub(super) struct Upload {
    size: u64,
    /// Bytes the desk wrote (and hashed), contiguous from 0.
    written: u64,
    /// Bytes accepted and handed to the desk: the next chunk starts here.
    accepted: u64,
    /// Chunks ending at or below this byte are accepted now.
    until: u64,
    /// The desk answered the open: `written` and `accepted` are known.
    opened: bool,
    /// The sender's whole-file SHA-256, once it said it sent everything.
    end: Option<String>,
    /// A finish job is with the desk.
    finishing: bool,
    /// The worker should hear where to resume once the desk has opened.
    resume_pending: bool,
}

impl<S: Store> Scheduler<S> {
    fn key(task: &TaskId, attempt: u32, name: &str) -> UploadKey {
        UploadKey {
            task: task.clone(),
            attempt,
            name: name.to_string(),
        }
    }

    fn file_job(&mut self, job: FileJob) {
        self.out.push(Output::File(job));
    }

    /// Credit the pool has left.
    fn pool_free(&self) -> u64 {
        self.cfg
            .limits
            .file_buffer_bytes
            .saturating_sub(self.upload_credit)
    }

    /// A result file message from `worker` (registered; its task checked
    /// below). Never mandatory: the offer/credit exchange is the retry.
    pub(super) fn on_file_message(
        &mut self,
        now: Instant,
        worker: &str,
        body: Body,
        raw: Option<Bytes>,
    ) {
        let (task, attempt) = match &body {
            Body::FileOffer { task, attempt, .. }
            | Body::FileChunk { task, attempt, .. }
            | Body::FileEnd { task, attempt, .. } => (task.clone(), *attempt),
            _ => unreachable!("only worker file messages come here"),
        };
        if !self.open_on(&task, worker, Some(attempt)) {
            self.count("orphan_file", 1);
            if self.noise.allow(now, "orphans") {
                warn!(worker, task = %task, kind = body.kind(), "orphan: file message for a closed or unknown task; answered task_closed");
            }
            self.send_to_worker(
                worker,
                Some(&task),
                Body::TaskClosed {
                    task: task.clone(),
                    attempt: Some(attempt),
                    reason: "task is closed or unknown on this server".into(),
                },
            );
            return;
        }
        match body {
            Body::FileOffer { name, size, .. } => {
                self.on_offer(worker, &task, attempt, &name, size, None)
            }
            Body::FileEnd {
                name, size, sha256, ..
            } => self.on_offer(worker, &task, attempt, &name, size, Some(sha256)),
            Body::FileChunk { name, offset, .. } => self.on_chunk(
                now,
                worker,
                &task,
                attempt,
                &name,
                offset,
                raw.unwrap_or_default(),
            ),
            _ => unreachable!(),
        }
    }

    /// An offer (`end` = None) or an end (`end` = the sender's SHA-256):
    /// both start or resume the upload; an end also asks to finish it.
    fn on_offer(
        &mut self,
        worker: &str,
        task: &TaskId,
        attempt: u32,
        name: &str,
        size: u64,
        end: Option<String>,
    ) {
        let t = &self.tasks[task];
        if let Some(why) = t.file_errors.get(name) {
            let why = why.clone();
            self.send_refused(worker, task, attempt, name, ErrorCode::LimitReached, why);
            return;
        }
        // Stored already (a resend after a lost answer, or the same file
        // offered twice): stored once, answered from what is known.
        if let Some(stored) = t.files.iter().find(|f| f.name == name).cloned() {
            match end {
                _ if stored.size != size => {
                    let why = format!("result file {name:?} is already stored with {} bytes; offered again with {size}", stored.size);
                    self.send_refused(worker, task, attempt, name, ErrorCode::Invalid, why);
                }
                None => self.send_to_worker(
                    worker,
                    Some(task),
                    Body::FileCredit {
                        task: task.clone(),
                        attempt,
                        name: name.to_string(),
                        have: size,
                        until: size,
                        resume: true,
                    },
                ),
                Some(sha) if sha == stored.sha256 => self.send_to_worker(
                    worker,
                    Some(task),
                    Body::FileStored {
                        task: task.clone(),
                        attempt,
                        name: name.to_string(),
                        size,
                        sha256: sha,
                    },
                ),
                Some(sha) => {
                    let why = format!(
                        "result file {name:?} is already stored with SHA-256 {}; offered again with {sha}",
                        stored.sha256
                    );
                    self.send_refused(worker, task, attempt, name, ErrorCode::Damaged, why);
                }
            }
            return;
        }
        if let Some(u) = self.tasks[task].uploads.get(name) {
            if u.size != size {
                let why = format!(
                    "result file {name:?} changed size during its transfer ({} bytes, now {size})",
                    u.size
                );
                self.refuse_upload(worker, task, attempt, name, ErrorCode::Invalid, why);
                return;
            }
        } else {
            if let Some((code, why)) = self.offer_refusal(task, name, size) {
                self.refuse_upload(worker, task, attempt, name, code, why);
                return;
            }
            let t = self.tasks.get_mut(task).expect("open task");
            t.file_sizes.insert(name.to_string(), size);
            t.uploads.insert(
                name.to_string(),
                Upload {
                    size,
                    ..Upload::default()
                },
            );
            self.touched.insert(task.clone());
            self.uploading_bytes = self.uploading_bytes.saturating_add(size);
            self.count("file_uploads_started", 1);
            self.file_job(FileJob::Open {
                key: Self::key(task, attempt, name),
            });
        }
        let u = self
            .tasks
            .get_mut(task)
            .expect("open task")
            .uploads
            .get_mut(name)
            .expect("just found or made");
        if !u.opened {
            u.resume_pending = true;
            if end.is_some() {
                u.end = end;
            }
            return;
        }
        if let Some(sha) = end {
            if u.accepted < size {
                // Chunks sent before the end were lost with a connection.
                self.resume(worker, task, attempt, name);
                return;
            }
            u.end = Some(sha);
            self.maybe_finish(task, attempt, name);
        } else {
            self.resume(worker, task, attempt, name);
        }
    }

    /// Why a new offer of `size` bytes cannot be taken, checked before
    /// any byte is: the per-file and per-task limits and the store quota.
    fn offer_refusal(&self, task: &TaskId, name: &str, size: u64) -> Option<(ErrorCode, String)> {
        let limits = &self.cfg.limits;
        let t = &self.tasks[task];
        if size > limits.max_file_bytes {
            return Some((
                ErrorCode::LimitReached,
                format!(
                    "result file {name:?} is {size} bytes, over the server's limit of {} (limits.max_file_bytes)",
                    limits.max_file_bytes
                ),
            ));
        }
        let others: u64 = t
            .file_sizes
            .iter()
            .filter(|(n, _)| n.as_str() != name)
            .map(|(_, size)| *size)
            .fold(0u64, u64::saturating_add);
        if others.saturating_add(size) > limits.max_task_file_bytes {
            return Some((
                ErrorCode::LimitReached,
                format!(
                    "result files of this task would exceed {} bytes (limits.max_task_file_bytes)",
                    limits.max_task_file_bytes
                ),
            ));
        }
        if self
            .stored_bytes
            .saturating_add(self.uploading_bytes)
            .saturating_add(size)
            > limits.max_stored_file_bytes
        {
            return Some((
                ErrorCode::StorageFailed,
                format!(
                    "the server's result area would exceed {} bytes (limits.max_stored_file_bytes; {} stored, {} being uploaded): free space or raise the limit",
                    limits.max_stored_file_bytes, self.stored_bytes, self.uploading_bytes
                ),
            ));
        }
        if t.uploads.len() >= MAX_UPLOADS_PER_TASK {
            return Some((
                ErrorCode::LimitReached,
                format!(
                    "more than {MAX_UPLOADS_PER_TASK} result files of one task in transfer at once"
                ),
            ));
        }
        None
    }

    /// Tells the worker where to continue, with fresh credit.
    fn resume(&mut self, worker: &str, task: &TaskId, attempt: u32, name: &str) {
        self.grant(task, name);
        let u = &self.tasks[task].uploads[name];
        let body = Body::FileCredit {
            task: task.clone(),
            attempt,
            name: name.to_string(),
            have: u.accepted,
            until: u.until.max(u.accepted),
            resume: true,
        };
        self.send_to_worker(worker, Some(task), body);
    }

    /// Raises the upload's credit to `written + window`, as far as the
    /// pool allows; an upload left without any credit waits in line.
    /// Returns true if the credit grew.
    fn grant(&mut self, task: &TaskId, name: &str) -> bool {
        let window = self.cfg.limits.file_window_bytes.max(1);
        let free = self.pool_free();
        let u = self
            .tasks
            .get_mut(task)
            .expect("open task")
            .uploads
            .get_mut(name)
            .expect("upload");
        let floor = u.until.max(u.accepted);
        let want = u.size.min(u.written.saturating_add(window));
        let until = want.min(floor.saturating_add(free)).max(floor);
        let grown = until - floor;
        let (accepted, size) = (u.accepted, u.size);
        u.until = until;
        self.upload_credit += grown;
        if until == accepted && accepted < size {
            let key = (task.clone(), name.to_string());
            if !self.starved.contains(&key) {
                self.starved.push_back(key);
            }
        }
        grown > 0
    }

    /// Credit came back to the pool: uploads waiting for it get some, in
    /// the order they started waiting.
    fn feed_starved(&mut self) {
        while self.pool_free() > 0 {
            let Some((task, name)) = self.starved.pop_front() else {
                return;
            };
            let Some(t) = self.tasks.get(&task) else {
                continue;
            };
            let (Some(worker), attempt) = (t.worker.clone(), t.attempts) else {
                continue;
            };
            if !t.uploads.contains_key(&name) {
                continue;
            }
            if self.grant(&task, &name) {
                self.send_credit(&worker, &task, attempt, &name);
            }
        }
    }

    fn send_credit(&mut self, worker: &str, task: &TaskId, attempt: u32, name: &str) {
        let u = &self.tasks[task].uploads[name];
        let body = Body::FileCredit {
            task: task.clone(),
            attempt,
            name: name.to_string(),
            have: u.written,
            until: u.until.max(u.written),
            resume: false,
        };
        self.send_to_worker(worker, Some(task), body);
    }

    #[allow(clippy::too_many_arguments)]
    fn on_chunk(
        &mut self,
        now: Instant,
        worker: &str,
        task: &TaskId,
        attempt: u32,
        name: &str,
        offset: u64,
        data: Bytes,
    ) {
        let Some(u) = self
            .tasks
            .get_mut(task)
            .expect("open task")
            .uploads
            .get_mut(name)
        else {
            // Not offered (or already finished or refused): dropped.
            self.count("file_chunks_unexpected", 1);
            return;
        };
        let end = offset.saturating_add(data.len() as u64);
        if !u.opened || offset != u.accepted {
            // Left over from before a resume: the worker sends them again.
            self.count("file_chunks_out_of_order", 1);
            return;
        }
        if end > u.size {
            let why = format!(
                "chunk of {} bytes at offset {offset} does not fit result file {name:?} of {} bytes",
                data.len(),
                u.size
            );
            self.refuse_upload(worker, task, attempt, name, ErrorCode::Invalid, why);
            return;
        }
        if end > u.until {
            let until = u.until;
            self.count("file_chunks_over_credit", 1);
            if self.noise.allow(now, "protocol errors") {
                warn!(worker, task = %task, file = name, offset, end, until, "protocol error: result file chunk beyond the credit given; dropped");
            }
            return;
        }
        u.accepted = end;
        self.count("file_bytes_received", data.len() as u64);
        self.file_job(FileJob::Write {
            key: Self::key(task, attempt, name),
            offset,
            data,
        });
    }

    fn maybe_finish(&mut self, task: &TaskId, attempt: u32, name: &str) {
        let u = self
            .tasks
            .get_mut(task)
            .expect("open task")
            .uploads
            .get_mut(name)
            .expect("upload");
        if u.finishing || u.written < u.size {
            return;
        }
        let Some(sha256) = u.end.clone() else { return };
        u.finishing = true;
        let size = u.size;
        self.file_job(FileJob::Finish {
            key: Self::key(task, attempt, name),
            size,
            sha256,
        });
    }

    /// What the file desk did. Results for an upload that is gone (its
    /// attempt ended, or it was refused meanwhile) change nothing.
    pub fn on_file_done(&mut self, now: Instant, done: FileDone) {
        self.latest = self.latest.max(now);
        match done {
            FileDone::Read {
                peer,
                request,
                offset,
                result,
            } => {
                self.reads_in_flight = self.reads_in_flight.saturating_sub(1);
                self.answer_read(&peer, request, offset, result)
            }
            FileDone::Opened { key, have } => {
                let Some(worker) = self.upload_owner(&key) else {
                    return;
                };
                match have {
                    Err(e) => self.upload_failed(&worker, &key, e),
                    Ok(have) => {
                        let u = self.upload_mut(&key).expect("owner checked");
                        if have > u.size {
                            // An incoming copy longer than the file: from
                            // an offer of another size before a restart.
                            u.opened = false;
                            self.file_job(FileJob::Discard { key: key.clone() });
                            self.file_job(FileJob::Open { key });
                            return;
                        }
                        u.opened = true;
                        u.written = have;
                        u.accepted = have;
                        let pending = std::mem::take(&mut u.resume_pending);
                        let ended = u.end.is_some();
                        let size = u.size;
                        self.count("file_bytes_resumed", have);
                        if ended && have == size {
                            self.maybe_finish(&key.task, key.attempt, &key.name);
                        } else if pending || ended {
                            self.resume(&worker, &key.task, key.attempt, &key.name);
                        }
                    }
                }
            }
            FileDone::Written { key, have } => {
                let Some(worker) = self.upload_owner(&key) else {
                    return;
                };
                match have {
                    Err(e) => self.upload_failed(&worker, &key, e),
                    Ok(have) => {
                        let u = self.upload_mut(&key).expect("owner checked");
                        let released = have.saturating_sub(u.written);
                        u.written = have;
                        self.upload_credit = self.upload_credit.saturating_sub(released);
                        if self.grant(&key.task, &key.name) {
                            self.send_credit(&worker, &key.task, key.attempt, &key.name);
                        }
                        self.maybe_finish(&key.task, key.attempt, &key.name);
                        self.feed_starved();
                    }
                }
            }
            FileDone::Finished { key, result } => {
                let Some(worker) = self.upload_owner(&key) else {
                    return;
                };
                match result {
                    Ok(stored) => self.upload_stored(&worker, &key, stored),
                    Err(DeskError::Mismatch { expected, actual }) => {
                        self.count("file_hash_mismatches", 1);
                        let t = self.tasks.get_mut(&key.task).expect("open task");
                        let n = t.file_mismatches.entry(key.name.clone()).or_default();
                        *n += 1;
                        warn!(worker, task = %key.task, file = %key.name, %expected, %actual, mismatches = *n, "result file arrived damaged (SHA-256 mismatch)");
                        if *n >= 2 {
                            let why = format!("result file {:?} arrived damaged twice: SHA-256 {actual} of the bytes received, {expected} on the worker", key.name);
                            self.refuse_upload(
                                &worker,
                                &key.task,
                                key.attempt,
                                &key.name,
                                ErrorCode::Damaged,
                                why,
                            );
                        } else {
                            // Once more from the first byte: the desk
                            // removed the copy, the new open finds nothing.
                            self.release_upload(&key);
                            let t = self.tasks.get_mut(&key.task).expect("open task");
                            let size = t.file_sizes.get(&key.name).copied().unwrap_or(0);
                            self.uploading_bytes = self.uploading_bytes.saturating_add(size);
                            let t = self.tasks.get_mut(&key.task).expect("open task");
                            t.uploads.insert(
                                key.name.clone(),
                                Upload {
                                    size,
                                    resume_pending: true,
                                    ..Upload::default()
                                },
                            );
                            self.file_job(FileJob::Open { key });
                        }
                    }
                    Err(DeskError::Short { .. }) => {
                        let u = self.upload_mut(&key).expect("owner checked");
                        u.finishing = false;
                        self.resume(&worker, &key.task, key.attempt, &key.name);
                    }
                    Err(e) => self.upload_failed(&worker, &key, e),
                }
            }
        }
    }

    fn upload_mut(&mut self, key: &UploadKey) -> Option<&mut Upload> {
        self.tasks.get_mut(&key.task)?.uploads.get_mut(&key.name)
    }

    /// The worker an upload's answers go to, if the upload still counts.
    fn upload_owner(&self, key: &UploadKey) -> Option<String> {
        let t = self.tasks.get(&key.task)?;
        if t.state.is_final() || t.attempts != key.attempt || !t.uploads.contains_key(&key.name) {
            return None;
        }
        t.worker.clone()
    }

    fn upload_stored(&mut self, worker: &str, key: &UploadKey, stored: Stored) {
        self.release_upload(key);
        self.count("files_stored", 1);
        self.stored_bytes = self.stored_bytes.saturating_add(stored.info.size);
        let t = self.tasks.get_mut(&key.task).expect("open task");
        t.files.retain(|f| f.name != key.name);
        t.files.push(stored.info.clone());
        if let Some(junit) = stored.junit {
            t.junit.insert(key.name.clone(), junit);
        }
        self.touched.insert(key.task.clone());
        info!(worker, task = %key.task, file = %key.name, size = stored.info.size, "result file stored");
        self.send_to_worker(
            worker,
            Some(&key.task),
            Body::FileStored {
                task: key.task.clone(),
                attempt: key.attempt,
                name: key.name.clone(),
                size: stored.info.size,
                sha256: stored.info.sha256,
            },
        );
        self.feed_starved();
    }

    fn upload_failed(&mut self, worker: &str, key: &UploadKey, e: DeskError) {
        let code = match e {
            DeskError::Io(_) => ErrorCode::StorageFailed,
            DeskError::BadName(_) => ErrorCode::BadFileName,
            _ => ErrorCode::Invalid,
        };
        self.count("file_storage_failures", 1);
        error!(worker, task = %key.task, file = %key.name, error = %e, "result file could not be stored");
        let why = format!(
            "result file {:?} could not be stored on the server: {e}",
            key.name
        );
        self.refuse_upload(worker, &key.task, key.attempt, &key.name, code, why);
    }

    /// Gives the upload's credit back to the pool and forgets it.
    fn release_upload(&mut self, key: &UploadKey) {
        if let Some(u) = self
            .tasks
            .get_mut(&key.task)
            .and_then(|t| t.uploads.remove(&key.name))
        {
            let held = u.until.saturating_sub(u.written);
            self.upload_credit = self.upload_credit.saturating_sub(held);
            self.uploading_bytes = self.uploading_bytes.saturating_sub(u.size);
        }
        self.starved
            .retain(|(t, n)| !(t == &key.task && n == &key.name));
    }

    /// The server will not take this file: marked for the verdict (the
    /// report does not wait for it), the incoming copy removed, the
    /// worker told.
    pub(super) fn refuse_upload(
        &mut self,
        worker: &str,
        task: &TaskId,
        attempt: u32,
        name: &str,
        code: ErrorCode,
        why: String,
    ) {
        let key = Self::key(task, attempt, name);
        if self.tasks[task].uploads.contains_key(name) {
            self.release_upload(&key);
            self.file_job(FileJob::Discard { key });
        }
        self.count("files_refused", 1);
        let t = self.tasks.get_mut(task).expect("open task");
        if !t.file_errors.contains_key(name) {
            warn!(worker, task = %task, file = name, reason = %why, "refused a result file");
            t.file_errors.insert(name.to_string(), why.clone());
        }
        self.touched.insert(task.clone());
        self.send_refused(worker, task, attempt, name, code, why);
    }

    fn send_refused(
        &mut self,
        worker: &str,
        task: &TaskId,
        attempt: u32,
        name: &str,
        code: ErrorCode,
        why: String,
    ) {
        self.send_to_worker(
            worker,
            Some(task),
            Body::FileRefused {
                task: task.clone(),
                attempt,
                name: name.to_string(),
                code,
                message: why,
            },
        );
    }

    /// The attempt's uploads end (the task ended, was re-queued or
    /// dispatched afresh): credit back to the pool, incoming copies gone.
    pub(super) fn close_uploads(&mut self, task: &TaskId) {
        let Some(t) = self.tasks.get(task) else {
            return;
        };
        let attempt = t.attempts;
        let names: Vec<String> = t.uploads.keys().cloned().collect();
        for name in names {
            let key = Self::key(task, attempt, &name);
            self.release_upload(&key);
            self.file_job(FileJob::Discard { key });
        }
        self.feed_starved();
    }

    /// The worker of this task is unreachable: its uploads keep what was
    /// accepted but give their unused credit back until it offers again.
    pub(super) fn pause_uploads(&mut self, task: &TaskId) {
        let Some(t) = self.tasks.get_mut(task) else {
            return;
        };
        let mut released = 0u64;
        for u in t.uploads.values_mut() {
            let floor = u.accepted.max(u.written);
            released += u.until.saturating_sub(floor);
            u.until = u.until.min(floor);
        }
        self.upload_credit = self.upload_credit.saturating_sub(released);
        self.feed_starved();
    }

    /// A client's read of a stored result file, answered from the desk.
    fn answer_read(
        &mut self,
        peer: &PeerId,
        request: u64,
        offset: u64,
        result: Result<(Vec<u8>, bool), DeskError>,
    ) {
        match result {
            Ok((bytes, eof)) => {
                self.out_raw_bytes = self.out_raw_bytes.saturating_add(bytes.len());
                self.send(
                    peer,
                    None,
                    Body::Data {
                        request,
                        offset,
                        eof,
                    },
                    Some(Bytes::from(bytes)),
                )
            }
            Err(DeskError::NotFound) => self.send_error(
                peer,
                Some(request),
                ErrorCode::UnknownTask,
                "no such result file".into(),
            ),
            Err(e) => {
                error!(error = %e, "result file could not be read");
                self.send_error(peer, Some(request), ErrorCode::StorageFailed, e.to_string())
            }
        }
    }
}

/// Client reads of result files with the desk at once, at most (each
/// up to 1 MiB): more are answered `limit_reached`, retried by clients.
pub const MAX_READS_IN_FLIGHT: usize = 16;

/// Result files of one task in transfer at once, at most.
pub const MAX_UPLOADS_PER_TASK: usize = 16;
