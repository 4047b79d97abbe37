//! Result file uploads, worker side (PROTOCOL.md §7.7), without I/O: the
//! session offers each file in turn, asks the shell to read chunks inside
//! the credit the server gave, sends what was read, and delivers the
//! task's final report once every file is stored or refused. The files
//! stay in the task's results folder until then: only their names, sizes
//! and progress are saved (in the slot), never their bytes.

use super::*;

/// How far the saved progress of an upload may lag behind the server's.
const ACKED_SAVE_STEP: u64 = 64 * 1024 * 1024;

/// One result file of the finished task, as saved.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Upload {
    pub name: String,
    pub size: u64,
    /// Modification time (ns since the epoch) when the task finished: a
    /// file changed after that is detected, not mixed.
    pub mtime_ns: u64,
    /// Bytes the server said it has, as last heard.
    #[serde(default)]
    pub acked: u64,
    /// Whole-file SHA-256, once the shell hashed all of it.
    #[serde(default)]
    pub sha256: Option<String>,
    pub state: UploadState,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UploadState {
    Pending,
    Stored,
    Failed { reason: String },
}

/// What the shell reads for the session: `len` bytes of `name` at
/// `offset`, hashing as it goes; a read that reaches the end of the file
/// also returns the whole file's SHA-256.
#[derive(Clone, Debug, PartialEq)]
pub struct ReadRequest {
    pub task: TaskId,
    pub attempt: u32,
    pub name: String,
    pub offset: u64,
    pub len: u64,
    pub size: u64,
    pub mtime_ns: u64,
    /// Reads of an older epoch are stale (the upload resumed elsewhere).
    pub epoch: u64,
}

/// What the shell read.
#[derive(Clone, Debug, PartialEq)]
pub struct ReadDone {
    pub task: TaskId,
    pub attempt: u32,
    pub name: String,
    pub offset: u64,
    pub epoch: u64,
    /// The bytes, and the whole file's SHA-256 if this read reached its
    /// end; or why the file cannot be sent (changed, gone, unreadable).
    pub result: Result<(Bytes, Option<String>), String>,
}

/// Where the current upload stands on this connection.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Phase {
    /// Not offered on this connection yet.
    Idle,
    /// Offered (or ended) at this time; waiting for the server's answer.
    Asked { at: Instant, end: bool },
    /// Sending inside the credit.
    Streaming {
        /// Next byte to ask the shell for.
        next: u64,
        /// Credit: bytes below this may be sent.
        until: u64,
        /// Bytes asked for and not yet sent.
        reading: u64,
        /// Last sign of progress from the server (for the stall timeout).
        heard: Instant,
        /// The socket refused a chunk: wait for the next tick.
        paused: bool,
    },
}

/// The in-memory state of the upload in progress.
#[derive(Clone, Debug)]
pub(super) struct Transfer {
    pub(super) phase: Phase,
    pub(super) epoch: u64,
    /// Bytes of the current file sent so far by this process (resends
    /// included): logged when it is stored.
    pub(super) sent: u64,
    /// When the current file was first offered (the give-up policy).
    pub(super) started: Option<Instant>,
}

impl Default for Transfer {
    fn default() -> Self {
        Transfer {
            phase: Phase::Idle,
            epoch: 0,
            sent: 0,
            started: None,
        }
    }
}

impl Session {
    /// The upload in progress: the first pending one of the finished task.
    fn current_upload(&self) -> Option<(TaskId, u32, usize)> {
        let slot = self.slot.as_ref()?;
        slot.report.as_ref()?;
        let i = slot
            .uploads
            .iter()
            .position(|u| u.state == UploadState::Pending)?;
        Some((slot.spec.task.clone(), slot.spec.attempt, i))
    }

    fn upload(&mut self, i: usize) -> &mut Upload {
        &mut self.slot.as_mut().expect("slot").uploads[i]
    }

    /// Moves the finished task forward: offers the next pending file or,
    /// when none is left, delivers the final report.
    pub(super) fn advance_uploads(&mut self, now: Instant, actions: &mut Vec<Action>) {
        let Some(slot) = self.slot.as_ref() else {
            return;
        };
        if slot.report.is_none() {
            return;
        }
        match self.current_upload() {
            Some((task, attempt, i)) => {
                if !matches!(self.link, Link::Up { .. }) {
                    self.transfer.phase = Phase::Idle;
                    return;
                }
                if self.transfer.phase == Phase::Idle {
                    let u = &self.slot.as_ref().expect("slot").uploads[i];
                    let body = Body::FileOffer {
                        task: task.clone(),
                        attempt,
                        name: u.name.clone(),
                        size: u.size,
                    };
                    self.transfer.phase = Phase::Asked {
                        at: now,
                        end: false,
                    };
                    self.transfer.started.get_or_insert(now);
                    self.send(
                        now,
                        actions,
                        Header::best_effort(Class::File, Some(&task)),
                        body,
                        None,
                    );
                }
            }
            None => self.deliver_report(now, actions),
        }
    }

    /// Every file is stored or refused: the report goes to the outbox.
    fn deliver_report(&mut self, now: Instant, actions: &mut Vec<Action>) {
        let slot = self.slot.as_mut().expect("slot");
        let Some(report) = slot.report.take() else {
            return;
        };
        let (task, attempt) = (slot.spec.task.clone(), slot.spec.attempt);
        let mut files = Vec::new();
        let mut file_problems = Vec::new();
        for u in &slot.uploads {
            match &u.state {
                UploadState::Stored => files.push(FileInfo {
                    name: u.name.clone(),
                    size: u.size,
                    sha256: u.sha256.clone().unwrap_or_default(),
                }),
                UploadState::Failed { reason } => file_problems.push(FileProblem {
                    name: u.name.clone(),
                    reason: reason.clone(),
                }),
                UploadState::Pending => unreachable!("no pending upload is left"),
            }
        }
        self.transfer = Transfer::default();
        let body = Body::TaskFinished {
            task: task.clone(),
            attempt,
            outcome: report.outcome,
            log_lines: report.log_lines,
            files,
            file_problems,
        };
        self.deliver(now, &task, attempt, body, None);
        if matches!(self.link, Link::Up { .. }) {
            self.flush(now, actions, false);
        }
    }

    /// Is this message about the upload in progress? Its index if so.
    fn upload_matches(&self, task: &TaskId, attempt: u32, name: &str) -> Option<usize> {
        let (t, a, i) = self.current_upload()?;
        (t == *task && a == attempt && self.slot.as_ref()?.uploads[i].name == name).then_some(i)
    }

    fn finish_upload(
        &mut self,
        now: Instant,
        i: usize,
        state: UploadState,
        actions: &mut Vec<Action>,
    ) {
        let sent = self.transfer.sent;
        let u = self.upload(i);
        match &state {
            UploadState::Failed { reason } => {
                warn!(file = %u.name, %reason, "result file not delivered");
                self.stats.files_failed += 1;
            }
            _ => {
                info!(file = %u.name, size = u.size, sent, "result file stored by the server");
                self.stats.files_stored += 1;
            }
        }
        let u = self.upload(i);
        u.state = state;
        self.transfer = Transfer {
            phase: Phase::Idle,
            epoch: self.transfer.epoch + 1,
            sent: 0,
            started: None,
        };
        self.advance_uploads(now, actions);
    }

    /// A file message from the server.
    pub(super) fn on_file_message(&mut self, now: Instant, body: Body, actions: &mut Vec<Action>) {
        match body {
            Body::FileCredit {
                task,
                attempt,
                name,
                have,
                until,
                resume,
            } => {
                let Some(i) = self.upload_matches(&task, attempt, &name) else {
                    return;
                };
                let size = self.upload(i).size;
                let (have, until) = (have.min(size), until.min(size));
                // Saved with the slot in steps, not at every credit: the
                // server is asked again after a restart anyway.
                let u = self.upload(i);
                if have >= u.acked.saturating_add(ACKED_SAVE_STEP) || (resume && have != u.acked) {
                    u.acked = have;
                }
                let phase = std::mem::replace(&mut self.transfer.phase, Phase::Idle);
                self.transfer.phase = match phase {
                    Phase::Streaming {
                        next,
                        until: old,
                        reading,
                        paused,
                        ..
                    } if !resume => Phase::Streaming {
                        next,
                        until: old.max(until),
                        reading,
                        heard: now,
                        paused,
                    },
                    // From where the server has it: what was sent beyond
                    // was lost; reads still out are stale.
                    _ => {
                        self.transfer.epoch += 1;
                        Phase::Streaming {
                            next: have,
                            until: until.max(have),
                            reading: 0,
                            heard: now,
                            paused: false,
                        }
                    }
                };
                self.pump(now, i, actions);
            }
            Body::FileStored {
                task,
                attempt,
                name,
                size,
                sha256,
            } => {
                let Some(i) = self.upload_matches(&task, attempt, &name) else {
                    return;
                };
                let u = self.upload(i);
                if u.size != size || u.sha256.as_ref().is_some_and(|s| *s != sha256) {
                    // Not what was sent: the server mixed something up.
                    let reason = format!("the server stored {size} bytes with SHA-256 {sha256}, not the {} bytes sent", u.size);
                    self.finish_upload(now, i, UploadState::Failed { reason }, actions);
                    return;
                }
                u.sha256 = Some(sha256);
                u.acked = size;
                self.finish_upload(now, i, UploadState::Stored, actions);
            }
            Body::FileRefused {
                task,
                attempt,
                name,
                code,
                message,
            } => {
                let Some(i) = self.upload_matches(&task, attempt, &name) else {
                    return;
                };
                let reason = format!("refused by the server ({code:?}): {message}");
                self.finish_upload(now, i, UploadState::Failed { reason }, actions);
            }
            _ => {}
        }
    }

    /// Asks for reads inside the credit (at most the read-ahead window
    /// outstanding), and ends the upload when every byte went out.
    fn pump(&mut self, now: Instant, i: usize, actions: &mut Vec<Action>) {
        let (task, attempt) = {
            let s = self.slot.as_ref().expect("slot");
            (s.spec.task.clone(), s.spec.attempt)
        };
        let chunk = self.cfg.file_chunk_bytes.max(1);
        let window = self.cfg.file_window_bytes.max(chunk);
        let epoch = self.transfer.epoch;
        let u = self.slot.as_ref().expect("slot").uploads[i].clone();
        let Phase::Streaming {
            next,
            until,
            reading,
            paused,
            ..
        } = &mut self.transfer.phase
        else {
            return;
        };
        if *paused || *next > u.size {
            return; // a full socket, or waiting for the hash-only read
        }
        while *next < u.size && *next < *until && *reading < window {
            let len = chunk.min(u.size - *next).min(*until - *next);
            actions.push(Action::ReadChunk(ReadRequest {
                task: task.clone(),
                attempt,
                name: u.name.clone(),
                offset: *next,
                len,
                size: u.size,
                mtime_ns: u.mtime_ns,
                epoch,
            }));
            *next += len;
            *reading += len;
        }
        if *next >= u.size && *reading == 0 {
            match u.sha256 {
                Some(sha256) => {
                    let body = Body::FileEnd {
                        task: task.clone(),
                        attempt,
                        name: u.name.clone(),
                        size: u.size,
                        sha256,
                    };
                    self.transfer.phase = Phase::Asked { at: now, end: true };
                    self.send(
                        now,
                        actions,
                        Header::best_effort(Class::File, Some(&task)),
                        body,
                        None,
                    );
                }
                // Everything is with the server but the hash is not
                // known here (a restart): read nothing, hash the file.
                None => {
                    *reading = 0;
                    actions.push(Action::ReadChunk(ReadRequest {
                        task,
                        attempt,
                        name: u.name,
                        offset: u.size,
                        len: 0,
                        size: u.size,
                        mtime_ns: u.mtime_ns,
                        epoch,
                    }));
                    // Counted as one outstanding read of nothing.
                    if let Phase::Streaming { next, .. } = &mut self.transfer.phase {
                        *next = u.size + 1;
                    }
                }
            }
        }
    }

    /// What the shell read for an upload.
    pub fn on_read_done(&mut self, now: Instant, done: ReadDone) -> Vec<Action> {
        let mut actions = Vec::new();
        if done.epoch != self.transfer.epoch {
            return actions; // stale: the upload resumed elsewhere
        }
        let Some(i) = self.upload_matches(&done.task, done.attempt, &done.name) else {
            return actions;
        };
        let (data, digest) = match done.result {
            Ok(r) => r,
            Err(reason) => {
                self.finish_upload(now, i, UploadState::Failed { reason }, &mut actions);
                return actions;
            }
        };
        if let Some(d) = digest {
            // Saved with the slot: a restarted worker need not hash again.
            self.upload(i).sha256 = Some(d);
        }
        let size = self.upload(i).size;
        if let Phase::Streaming { reading, next, .. } = &mut self.transfer.phase {
            *reading = reading.saturating_sub(data.len() as u64);
            if *next > size {
                *next = size; // the hash-only read is back
            }
        }
        if !data.is_empty() && matches!(self.link, Link::Up { .. }) {
            self.transfer.sent += data.len() as u64;
            let body = Body::FileChunk {
                task: done.task.clone(),
                attempt: done.attempt,
                name: done.name,
                offset: done.offset,
            };
            self.send(
                now,
                &mut actions,
                Header::best_effort(Class::File, Some(&done.task)),
                body,
                Some(data),
            );
        }
        self.pump(now, i, &mut actions);
        actions
    }

    /// The socket did not take a chunk (the server reads slower than the
    /// disk): continue from it at the next tick.
    pub fn chunk_unsent(&mut self, task: &TaskId, attempt: u32, name: &str, offset: u64, len: u64) {
        if self.upload_matches(task, attempt, name).is_none() {
            return;
        }
        self.transfer.sent = self.transfer.sent.saturating_sub(len);
        if let Phase::Streaming {
            next,
            reading,
            paused,
            ..
        } = &mut self.transfer.phase
        {
            if offset < *next {
                *next = offset;
                *reading = 0;
                *paused = true;
                self.transfer.epoch += 1;
            }
        }
    }

    /// True while the socket refused a chunk and the upload waits to go on.
    pub fn upload_paused(&self) -> bool {
        matches!(self.transfer.phase, Phase::Streaming { paused: true, .. })
    }

    /// Goes on after a full socket (the shell calls this a moment later).
    pub fn unpause_upload(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        let Some((_, _, i)) = self.current_upload() else {
            return actions;
        };
        if let Phase::Streaming { paused, .. } = &mut self.transfer.phase {
            *paused = false;
        }
        self.pump(now, i, &mut actions);
        actions
    }

    /// From the tick: resend an unanswered offer or end, restart a stalled
    /// stream with a new offer, unpause after a full socket.
    pub(super) fn tick_uploads(&mut self, now: Instant, actions: &mut Vec<Action>) {
        let Some((task, attempt, i)) = self.current_upload() else {
            return;
        };
        let patience = self.heartbeat * self.liveness;
        let stalled = match &mut self.transfer.phase {
            Phase::Idle => true,
            Phase::Asked { at, .. } => now.saturating_duration_since(*at) >= self.heartbeat * 2,
            Phase::Streaming { heard, paused, .. } => {
                if *paused {
                    *paused = false;
                    self.pump(now, i, actions);
                    return;
                }
                now.saturating_duration_since(*heard) >= patience
            }
        };
        let _ = (task, attempt);
        // `[delivery] file`: retry (default) offers again for as long as it
        // takes; give-up stops after give_up_after_ms; guarantee-nothing
        // takes one go, and a stall or a lost connection ends it.
        let policy = self.cfg.delivery.for_class(Class::File);
        let give_up = Duration::from_millis(self.cfg.delivery.give_up_after_ms);
        let started = self.transfer.started;
        let failure = match policy {
            Policy::GiveUp if started.is_some_and(|s| now.saturating_duration_since(s) >= give_up) => {
                Some(format!(
                    "given up {} ms after it was first offered (delivery.file = give-up)",
                    give_up.as_millis()
                ))
            }
            Policy::GuaranteeNothing if stalled && started.is_some() => Some(
                "not delivered in one go: the transfer stalled or the connection was lost (delivery.file = guarantee-nothing)"
                    .to_string(),
            ),
            _ => None,
        };
        if let Some(reason) = failure {
            self.stats.given_up += 1;
            self.finish_upload(now, i, UploadState::Failed { reason }, actions);
            return;
        }
        if stalled {
            self.transfer.phase = Phase::Idle;
            self.transfer.epoch += 1;
            self.advance_uploads(now, actions);
        }
    }
}
