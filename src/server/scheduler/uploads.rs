//! File uploads under credit-based flow control (PROTOCOL.md §7.7): result
//! files from workers and input files from clients. The sender offers a
//! file, the server says how much it has and how far the sender may go,
//! chunks are written by the file desk off the loop, and each byte
//! written opens room for more. The credit every upload holds comes out of
//! one pool (`limits.file_buffer_bytes`), so the bytes between the sockets
//! and the disk stay bounded whatever the number of uploads or the size
//! of their files.

use super::*;
use crate::server::store::files::{DeskError, FileDone, FileJob, Stored, UploadKey};
use tracing::error;

/// One upload in progress, in memory only: after a server restart the
/// sender offers again and the desk finds how much of the incoming copy
/// is on disk.
#[derive(Debug, Default)]
pub(super) struct Upload {
    pub(super) size: u64,
    /// Bytes the desk wrote (and hashed), contiguous from 0.
    pub(super) written: u64,
    /// Bytes accepted and handed to the desk: the next chunk starts here.
    pub(super) accepted: u64,
    /// Chunks ending at or below this byte are accepted now.
    pub(super) until: u64,
    /// The desk answered the open: `written` and `accepted` are known.
    pub(super) opened: bool,
    /// The sender's whole-file SHA-256, once it said it sent everything.
    pub(super) end: Option<String>,
    /// A finish job is with the desk.
    pub(super) finishing: bool,
    /// The sender should hear where to resume once the desk has opened.
    pub(super) resume_pending: bool,
    /// SHA-256 mismatches so far (the second one refuses the file).
    pub(super) mismatches: u32,
}

/// What the server tells a sender about its upload.
pub(super) enum Tell {
    Credit { have: u64, until: u64, resume: bool },
    Stored { size: u64, sha256: String },
    Refused { code: ErrorCode, message: String },
}

/// Result files of one task in transfer at once, at most.
pub const MAX_UPLOADS_PER_TASK: usize = 16;

pub(super) fn result_key(task: &TaskId, attempt: u32, name: &str) -> UploadKey {
    UploadKey::Result {
        task: task.clone(),
        attempt,
        name: name.to_string(),
    }
}

impl<S: Store> Scheduler<S> {
    pub(super) fn file_job(&mut self, job: FileJob) {
        self.out.push(Output::File(job));
    }

    /// Credit the pool has left.
    pub(super) fn pool_free(&self) -> u64 {
        self.cfg
            .limits
            .file_buffer_bytes
            .saturating_sub(self.upload_credit)
    }

    pub(super) fn upload_mut(&mut self, key: &UploadKey) -> Option<&mut Upload> {
        match key {
            UploadKey::Result {
                task,
                attempt,
                name,
            } => self
                .tasks
                .get_mut(task)
                .filter(|t| t.attempts == *attempt && !t.state.is_final())
                .and_then(|t| t.uploads.get_mut(name)),
            UploadKey::Input { .. } => self.input_uploads.get_mut(key).map(|i| &mut i.upload),
        }
    }

    pub(super) fn upload_ref(&self, key: &UploadKey) -> Option<&Upload> {
        match key {
            UploadKey::Result {
                task,
                attempt,
                name,
            } => self
                .tasks
                .get(task)
                .filter(|t| t.attempts == *attempt && !t.state.is_final())
                .and_then(|t| t.uploads.get(name)),
            UploadKey::Input { .. } => self.input_uploads.get(key).map(|i| &i.upload),
        }
    }

    /// Sends `what` to whoever sends the file: the task's worker, or the
    /// client connection of an input upload.
    pub(super) fn tell(&mut self, key: &UploadKey, what: Tell) {
        match key {
            UploadKey::Result {
                task,
                attempt,
                name,
            } => {
                let Some(worker) = self.tasks.get(task).and_then(|t| t.worker.clone()) else {
                    return;
                };
                let (task, attempt, name) = (task.clone(), *attempt, name.clone());
                let body = match what {
                    Tell::Credit {
                        have,
                        until,
                        resume,
                    } => Body::FileCredit {
                        task: task.clone(),
                        attempt,
                        name,
                        have,
                        until,
                        resume,
                    },
                    Tell::Stored { size, sha256 } => Body::FileStored {
                        task: task.clone(),
                        attempt,
                        name,
                        size,
                        sha256,
                    },
                    Tell::Refused { code, message } => Body::FileRefused {
                        task: task.clone(),
                        attempt,
                        name,
                        code,
                        message,
                    },
                };
                self.send_to_worker(&worker, Some(&task), body);
            }
            UploadKey::Input { sha256, .. } => {
                let Some((peer, request)) = self
                    .input_uploads
                    .get(key)
                    .map(|i| (i.peer.clone(), i.request))
                else {
                    return;
                };
                self.tell_client(&peer, request, sha256, what);
            }
        }
    }

    // ------------------------------------------------------------------
    // Result files, from workers
    // ------------------------------------------------------------------

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
                self.on_result_offer(&task, attempt, &name, size, None)
            }
            Body::FileEnd {
                name, size, sha256, ..
            } => self.on_result_offer(&task, attempt, &name, size, Some(sha256)),
            Body::FileChunk { name, offset, .. } => {
                let key = result_key(&task, attempt, &name);
                self.on_chunk(now, &key, offset, raw.unwrap_or_default());
            }
            _ => unreachable!(),
        }
    }

    /// An offer (`end` = None) or an end (`end` = the sender's SHA-256)
    /// of a result file: both start or resume the upload; an end also
    /// asks to finish it.
    pub(super) fn on_result_offer(
        &mut self,
        task: &TaskId,
        attempt: u32,
        name: &str,
        size: u64,
        end: Option<String>,
    ) {
        let key = result_key(task, attempt, name);
        let t = &self.tasks[task];
        if let Some(why) = t.file_errors.get(name) {
            let message = why.clone();
            self.tell(
                &key,
                Tell::Refused {
                    code: ErrorCode::LimitReached,
                    message,
                },
            );
            return;
        }
        // Stored already (a resend after a lost answer, or the same file
        // offered twice): stored once, answered from what is known.
        if let Some(stored) = t.files.iter().find(|f| f.name == name).cloned() {
            self.answer_stored(&key, stored.size, &stored.sha256, size, end);
            return;
        }
        if let Some(u) = self.tasks[task].uploads.get(name) {
            if u.size != size {
                let why = format!(
                    "result file {name:?} changed size during its transfer ({} bytes, now {size})",
                    u.size
                );
                self.refuse(&key, ErrorCode::Invalid, why);
                return;
            }
        } else {
            if let Some((code, why)) = self.result_offer_refusal(task, name, size) {
                self.refuse(&key, code, why);
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
            self.pending.tasks.insert(task.clone());
            self.start_upload(&key, size);
        }
        self.offered(&key, size, end);
    }

    /// The answer to an offer or end of a file that is stored already.
    pub(super) fn answer_stored(
        &mut self,
        key: &UploadKey,
        stored_size: u64,
        stored_sha: &str,
        size: u64,
        end: Option<String>,
    ) {
        match end {
            _ if stored_size != size => {
                let why = format!(
                    "{} is already stored with {stored_size} bytes; offered again with {size}",
                    describe_key(key)
                );
                self.tell(
                    key,
                    Tell::Refused {
                        code: ErrorCode::Invalid,
                        message: why,
                    },
                );
            }
            None => self.tell(
                key,
                Tell::Credit {
                    have: size,
                    until: size,
                    resume: true,
                },
            ),
            Some(sha) if sha == stored_sha => self.tell(key, Tell::Stored { size, sha256: sha }),
            Some(sha) => {
                let why = format!(
                    "{} is already stored with SHA-256 {stored_sha}; offered again with {sha}",
                    describe_key(key)
                );
                self.tell(
                    key,
                    Tell::Refused {
                        code: ErrorCode::Damaged,
                        message: why,
                    },
                );
            }
        }
    }

    pub(super) fn start_upload(&mut self, key: &UploadKey, size: u64) {
        self.uploading_bytes = self.uploading_bytes.saturating_add(size);
        self.count("file_uploads_started", 1);
        self.file_job(FileJob::Open { key: key.clone() });
    }

    /// An upload was offered (or ended): resume, wait for the desk, or
    /// finish.
    pub(super) fn offered(&mut self, key: &UploadKey, size: u64, end: Option<String>) {
        let u = self.upload_mut(key).expect("just found or made");
        if !u.opened {
            u.resume_pending = true;
            if end.is_some() {
                u.end = end;
            }
            return;
        }
        match end {
            // Chunks sent before the end were lost with a connection.
            Some(_) if u.accepted < size => self.resume(key),
            Some(sha) => {
                u.end = Some(sha);
                self.maybe_finish(key);
            }
            None => self.resume(key),
        }
    }

    /// Why a new offer of a result file cannot be taken, checked before
    /// any byte is: the per-file and per-task limits and the store quota.
    pub(super) fn result_offer_refusal(
        &self,
        task: &TaskId,
        name: &str,
        size: u64,
    ) -> Option<(ErrorCode, String)> {
        let limits = &self.cfg.limits;
        let t = &self.tasks[task];
        if let Some(r) = self.size_refusal(&format!("result file {name:?}"), size) {
            return Some(r);
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

    // ------------------------------------------------------------------
    // Both kinds
    // ------------------------------------------------------------------

    /// Tells the sender where to continue, with fresh credit.
    pub(super) fn resume(&mut self, key: &UploadKey) {
        self.grant(key);
        let u = self.upload_ref(key).expect("upload");
        let (have, until) = (u.accepted, u.until.max(u.accepted));
        self.tell(
            key,
            Tell::Credit {
                have,
                until,
                resume: true,
            },
        );
    }

    /// Raises the upload's credit to `written + window`, as far as the
    /// pool allows; an upload left without any credit waits in line.
    /// Returns true if the credit grew.
    pub(super) fn grant(&mut self, key: &UploadKey) -> bool {
        let window = self.cfg.limits.file_window_bytes.max(1);
        let free = self.pool_free();
        let u = self.upload_mut(key).expect("upload");
        let floor = u.until.max(u.accepted);
        let want = u.size.min(u.written.saturating_add(window));
        let until = want.min(floor.saturating_add(free)).max(floor);
        let grown = until - floor;
        let starved = until == u.accepted && u.accepted < u.size;
        u.until = until;
        self.upload_credit += grown;
        if starved && !self.starved.contains(key) {
            self.starved.push_back(key.clone());
        }
        grown > 0
    }

    /// Credit came back to the pool: uploads waiting for it get some, in
    /// the order they started waiting.
    pub(super) fn feed_starved(&mut self) {
        while self.pool_free() > 0 {
            let Some(key) = self.starved.pop_front() else {
                return;
            };
            if self.upload_ref(&key).is_none() {
                continue;
            }
            if self.grant(&key) {
                self.send_credit(&key);
            }
        }
    }

    pub(super) fn send_credit(&mut self, key: &UploadKey) {
        let u = self.upload_ref(key).expect("upload");
        let (have, until) = (u.written, u.until.max(u.written));
        self.tell(
            key,
            Tell::Credit {
                have,
                until,
                resume: false,
            },
        );
    }

    pub(super) fn on_chunk(&mut self, now: Instant, key: &UploadKey, offset: u64, data: Bytes) {
        let Some(u) = self.upload_mut(key) else {
            // Not offered (or already finished or refused): dropped.
            self.count("file_chunks_unexpected", 1);
            return;
        };
        let end = offset.saturating_add(data.len() as u64);
        if !u.opened || offset != u.accepted {
            // Left over from before a resume: the sender sends it again.
            self.count("file_chunks_out_of_order", 1);
            return;
        }
        if end > u.size {
            let why = format!(
                "chunk of {} bytes at offset {offset} does not fit {} of {} bytes",
                data.len(),
                describe_key(key),
                u.size
            );
            self.refuse(key, ErrorCode::Invalid, why);
            return;
        }
        if end > u.until {
            let until = u.until;
            self.count("file_chunks_over_credit", 1);
            if self.noise.allow(now, "protocol errors") {
                warn!(upload = %describe_key(key), offset, end, until, "protocol error: chunk beyond the credit given; dropped");
            }
            return;
        }
        u.accepted = end;
        self.count("file_bytes_received", data.len() as u64);
        self.file_job(FileJob::Write {
            key: key.clone(),
            offset,
            data,
        });
    }

    pub(super) fn maybe_finish(&mut self, key: &UploadKey) {
        let u = self.upload_mut(key).expect("upload");
        if u.finishing || u.written < u.size {
            return;
        }
        let Some(sha256) = u.end.clone() else { return };
        u.finishing = true;
        let size = u.size;
        self.file_job(FileJob::Finish {
            key: key.clone(),
            size,
            sha256,
            about: self.case_about(key),
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
            FileDone::Found {
                peer,
                request,
                result,
            } => self.answer_find(&peer, request, result),
            FileDone::Opened { key, have } => {
                if self.upload_ref(&key).is_none() {
                    return;
                }
                match have {
                    Err(e) => self.upload_failed(&key, e),
                    Ok(have) => {
                        let u = self.upload_mut(&key).expect("checked");
                        if have > u.size {
                            // An incoming copy longer than the file (from
                            // an offer of another size before a restart).
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
                            self.maybe_finish(&key);
                        } else if pending || ended {
                            self.resume(&key);
                        }
                    }
                }
            }
            FileDone::Written { key, have } => {
                if self.upload_ref(&key).is_none() {
                    return;
                }
                match have {
                    Err(e) => self.upload_failed(&key, e),
                    Ok(have) => {
                        let u = self.upload_mut(&key).expect("checked");
                        let released = have.saturating_sub(u.written);
                        u.written = have;
                        self.upload_credit = self.upload_credit.saturating_sub(released);
                        if self.grant(&key) {
                            self.send_credit(&key);
                        }
                        self.maybe_finish(&key);
                        self.feed_starved();
                    }
                }
            }
            FileDone::Finished { key, result } => {
                if self.upload_ref(&key).is_none() {
                    return;
                }
                match result {
                    Ok(stored) => self.upload_stored(&key, stored),
                    Err(DeskError::Mismatch { expected, actual }) => {
                        self.count("file_hash_mismatches", 1);
                        let u = self.upload_mut(&key).expect("checked");
                        u.mismatches += 1;
                        let (mismatches, size) = (u.mismatches, u.size);
                        warn!(upload = %describe_key(&key), %expected, %actual, mismatches, "file arrived damaged (SHA-256 mismatch)");
                        if mismatches >= 2 {
                            let why = format!("{} arrived damaged twice: SHA-256 {actual} of the bytes received, {expected} on the sender", describe_key(&key));
                            self.refuse(&key, ErrorCode::Damaged, why);
                        } else {
                            // Once more from the first byte: the desk
                            // removed the copy, the new open finds nothing.
                            let held = {
                                let u = self.upload_mut(&key).expect("checked");
                                let held = u.until.saturating_sub(u.written);
                                *u = Upload {
                                    size,
                                    mismatches,
                                    resume_pending: true,
                                    ..Upload::default()
                                };
                                held
                            };
                            self.upload_credit = self.upload_credit.saturating_sub(held);
                            self.file_job(FileJob::Open { key });
                        }
                    }
                    Err(DeskError::Short { .. }) => {
                        let u = self.upload_mut(&key).expect("checked");
                        u.finishing = false;
                        self.resume(&key);
                    }
                    Err(e) => self.upload_failed(&key, e),
                }
            }
        }
    }

    pub(super) fn upload_stored(&mut self, key: &UploadKey, stored: Stored) {
        let size = stored.info.size;
        let sha256 = stored.info.sha256.clone();
        self.count("files_stored", 1);
        self.stored_bytes = self.stored_bytes.saturating_add(size);
        // The incoming copy goes once this turn's commit says the file is
        // stored (file jobs are delivered after the commit): until then it
        // is what a restarted or new leader resumes from.
        self.file_job(FileJob::Discard { key: key.clone() });
        match key {
            UploadKey::Result { task, name, .. } => {
                self.tell(
                    key,
                    Tell::Stored {
                        size,
                        sha256: sha256.clone(),
                    },
                );
                self.release_upload(key);
                if let Some(note) = &stored.cases_note {
                    self.count("result_files_with_cases_not_recorded", 1);
                    warn!(task = %task, note = %note, "test cases not all recorded");
                }
                let t = self.tasks.get_mut(task).expect("open task");
                t.files.retain(|f| f.name != *name);
                t.files.push(stored.info);
                if let Some(junit) = stored.junit {
                    t.junit.insert(name.clone(), junit);
                }
                // The first failing cases of all its files, a file stored
                // again replacing its own.
                t.failing.retain(|(file, _)| file != name);
                for case in stored.failing {
                    if t.failing.len() < crate::protocol::limits::FAILING_CASES_SHOWN {
                        t.failing.push((name.clone(), case));
                    }
                }
                self.pending.tasks.insert(task.clone());
                info!(task = %task, file = %name, size, "result file stored");
            }
            UploadKey::Input { sha256: sha, owner } => {
                self.tell(key, Tell::Stored { size, sha256 });
                self.release_upload(key);
                // The same content uploaded by another user is stored once:
                // its bytes replaced identical ones, they are not new.
                if self.stored_inputs.insert(sha.clone(), size).is_some() {
                    self.stored_bytes = self.stored_bytes.saturating_sub(size);
                }
                self.add_input_owner(sha, owner);
                info!(input = %sha, size, owner = %owner, "input file stored");
            }
        }
        self.feed_starved();
    }

    pub(super) fn upload_failed(&mut self, key: &UploadKey, e: DeskError) {
        let code = match e {
            DeskError::Io(_) => ErrorCode::StorageFailed,
            DeskError::BadName(_) => ErrorCode::BadFileName,
            _ => ErrorCode::Invalid,
        };
        self.count("file_storage_failures", 1);
        error!(upload = %describe_key(key), error = %e, "file could not be stored");
        let why = format!(
            "{} could not be stored on the server: {e}",
            describe_key(key)
        );
        self.refuse(key, code, why);
    }

    /// Gives the upload's credit back to the pool and forgets it.
    pub(super) fn release_upload(&mut self, key: &UploadKey) {
        let removed = match key {
            UploadKey::Result { task, name, .. } => self
                .tasks
                .get_mut(task)
                .and_then(|t| t.uploads.remove(name)),
            UploadKey::Input { .. } => self.input_uploads.remove(key).map(|i| i.upload),
        };
        if let Some(u) = removed {
            let held = u.until.saturating_sub(u.written);
            self.upload_credit = self.upload_credit.saturating_sub(held);
            self.uploading_bytes = self.uploading_bytes.saturating_sub(u.size);
        }
        self.starved.retain(|k| k != key);
    }

    /// The server will not take this file: the sender is told, the
    /// incoming copy removed; a result file is marked for the verdict
    /// (the report does not wait for it).
    pub(super) fn refuse(&mut self, key: &UploadKey, code: ErrorCode, why: String) {
        self.count("files_refused", 1);
        self.tell(
            key,
            Tell::Refused {
                code,
                message: why.clone(),
            },
        );
        if self.upload_ref(key).is_some() {
            self.release_upload(key);
            self.file_job(FileJob::Discard { key: key.clone() });
        }
        if let UploadKey::Result { task, name, .. } = key {
            if let Some(t) = self.tasks.get_mut(task) {
                if !t.file_errors.contains_key(name) {
                    warn!(task = %task, file = %name, reason = %why, "refused a result file");
                    t.file_errors.insert(name.clone(), why);
                }
                self.pending.tasks.insert(task.clone());
            }
        } else {
            warn!(upload = %describe_key(key), reason = %why, "refused an input file");
        }
        self.feed_starved();
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
            let key = result_key(task, attempt, &name);
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
}

/// How messages and logs name an upload.
pub(super) fn describe_key(key: &UploadKey) -> String {
    match key {
        UploadKey::Result { task, name, .. } => format!("result file {name:?} of task {task}"),
        UploadKey::Input { sha256, .. } => format!("input file {sha256}"),
    }
}
