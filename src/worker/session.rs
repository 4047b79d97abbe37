//! The worker's session with the server, without I/O: registration,
//! liveness, the outbox of mandatory messages, the bounded log buffer, and
//! the one task the worker owns. The shell ([`super::service`]) feeds it
//! messages, task events and ticks, and carries out its [`Action`]s.

use crate::delivery::dedup::DEDUP_AHEAD;
use crate::delivery::outbox::Outgoing;
use crate::delivery::{DedupWindow, DeliveryPolicy, OnServerLost, Outbox, Policy, RetryPolicy};
use crate::protocol::codec::Envelope;
use crate::protocol::logtext::{PackedText, MAX_LOG_PARTS};
use crate::protocol::*;
use crate::worker::channel::{charge, ResultFile, TaskEvent};
use bytes::Bytes;
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};
use tracing::{info, warn};
pub use uploads::{ReadDone, ReadRequest, Upload, UploadState};

/// Mandatory messages the worker holds at most before it stops answering
/// dispatches it would refuse (a server that never acknowledges cannot grow
/// the outbox, or worker.db, without bound).
pub const MAX_OUTBOX: usize = 100_000;

/// A log batch stops growing at about this many bytes: many small lines per
/// message is what keeps the `zeromq` ROUTER fast with many active workers.
pub const MAX_LOG_BATCH_BYTES: usize = 256 * 1024;

/// Session rules, from the worker configuration.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    pub heartbeat: Duration,
    pub liveness: u32,
    pub log_buffer_lines: usize,
    /// Bytes of log text buffered at most (oldest dropped first).
    pub log_buffer_bytes: usize,
    pub log_batch_lines: usize,
    pub log_batch_delay: Duration,
    pub retry: RetryPolicy,
    pub delivery: DeliveryPolicy,
    pub on_server_lost: OnServerLost,
    /// Bytes of a result file per chunk, and read ahead at most.
    pub file_chunk_bytes: u64,
    pub file_window_bytes: u64,
}

/// Why the worker gave up on its connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LostReason {
    /// No heartbeat or other message for `liveness` intervals.
    Silent { silent_ms: u64 },
    /// Heartbeats now come from another server incarnation.
    ServerRestarted { old: String, new: String },
    /// The server announced an orderly shutdown.
    ServerShutdown,
    /// The socket refused a send.
    SendFailed(String),
    /// A socket reported its connection closed.
    ConnectionClosed(String),
    /// No welcome within the liveness window after the first hello.
    RegistrationTimeout { waited_ms: u64 },
    /// The server is a standby (`not_leader`): the next one may lead.
    NotLeader(String),
}

impl std::fmt::Display for LostReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LostReason::Silent { silent_ms } => {
                write!(f, "server unreachable: nothing heard for {silent_ms} ms")
            }
            LostReason::ServerRestarted { old, new } => {
                write!(f, "server restarted (incarnation {old} → {new})")
            }
            LostReason::ServerShutdown => write!(f, "server shut down"),
            LostReason::SendFailed(e) => write!(f, "server unreachable: send failed: {e}"),
            LostReason::ConnectionClosed(e) => {
                write!(f, "server unreachable: connection closed: {e}")
            }
            LostReason::NotLeader(said) => write!(f, "not the leader: {said}"),
            LostReason::RegistrationTimeout { waited_ms } => {
                write!(f, "server unreachable: no welcome {waited_ms} ms after the first hello (heartbeats arrive, the control connection does not answer)")
            }
        }
    }
}

/// What the shell must do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    Send {
        header: Header,
        body: Body,
        raw: Option<Bytes>,
    },
    /// Drop both sockets and connect anew (with backoff).
    Reconnect(LostReason),
    /// Start the conductor for this task.
    StartTask(TaskSpec),
    /// The server's log of this task is full: its runner stops handing
    /// over lines (it only counts them, so the numbering stays exact).
    LogFull(TaskId),
    /// Stop the conductor of this task (TERM, grace, KILL).
    StopTask(TaskId),
    /// The server refused this worker for good (its name is in use by
    /// another live worker): stop the worker with this message.
    Refused(ErrorCode, String),
    /// Read (and hash) part of a result file for its upload.
    ReadChunk(ReadRequest),
    /// The task's report was acknowledged (or the server closed the
    /// task): its folder may go.
    TaskDone { task: TaskId, attempt: u32 },
}

/// Connection state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Link {
    Down,
    Registering {
        hello_sent: Instant,
        /// The first hello on this connection: registration must finish
        /// within the liveness window, whatever else is heard.
        since: Instant,
    },
    Up {
        server: String,
    },
}

/// The task a worker owns, as saved to disk.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SavedSlot {
    pub spec: TaskSpec,
    pub finished: bool,
    pub aborted: bool,
    /// The final report, while result files are still being uploaded.
    #[serde(default)]
    pub report: Option<PendingReport>,
    #[serde(default)]
    pub uploads: Vec<Upload>,
}

/// What the final report will say, kept until the files are delivered.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PendingReport {
    pub outcome: Outcome,
    pub log_lines: u64,
}

/// Everything of a session that must survive a worker restart.
#[derive(Clone, Debug, PartialEq)]
pub struct SavedSession {
    pub session_id: String,
    pub next_seq: u64,
    pub outbox: Vec<crate::delivery::outbox::SavedMessage>,
    pub slot: Option<SavedSlot>,
    pub server_session: Option<String>,
    pub server_dedup: DedupWindow,
}

struct Slot {
    spec: TaskSpec,
    /// Stopped because the server was lost and `on_server_lost = abort`.
    aborted: bool,
    /// The conductor ended: its report is pending (below) or in the outbox.
    finished: bool,
    /// Set while result files are uploaded: the report waits for them.
    report: Option<PendingReport>,
    uploads: Vec<Upload>,
    /// Stopped because the worker is stopping with `stop_policy = abort`
    /// (or its finish bound passed): reported as interrupted.
    stopped_for_exit: bool,
    /// The server said the task's log is full (`log_full`): its lines are
    /// no longer sent, only counted (they are lost in the accounting).
    log_full: bool,
}

/// Counters shown in the worker's log and useful to tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Log lines dropped from the full buffer while the server was away.
    pub log_lines_dropped: u64,
    /// Mandatory messages dropped because the server closed their task.
    pub orphans_closed: u64,
    /// Dispatches refused because they had expired.
    pub expired_dispatches: u64,
    /// Error replies received from the server.
    pub server_errors: u64,
    /// Commands ignored because they came from an older lease epoch.
    pub stale_epoch: u64,
    /// Broadcasts on the events port not taken as the server's: forged,
    /// replayed or held back (security on, PROTOCOL.md §15.4).
    pub broadcasts_refused: u64,
    /// Messages given up under the give-up policy.
    pub given_up: u64,
    /// Log lines not sent because the server said the task's log is full
    /// (those in the buffer then and those that reached the session
    /// after; the task runner counts the rest, see `log_full`).
    pub log_lines_not_sent_log_full: u64,
    /// Mandatory messages the server answered with an error (not resent).
    pub refused_by_server: u64,
    /// Dispatches left unanswered because the outbox was full.
    pub dispatches_unanswered: u64,
    /// Guarantee-nothing messages dropped because the server was unreachable.
    pub unsent_dropped: u64,
    /// Result files stored by the server, and not delivered (refused,
    /// changed on disk, unreadable).
    pub files_stored: u64,
    pub files_failed: u64,
}

/// The session state machine.
pub struct Session {
    cfg: SessionConfig,
    name: String,
    session_id: String,
    device: DeviceProps,
    link: Link,
    /// Heartbeat rules in force (the server's, once welcomed).
    heartbeat: Duration,
    liveness: u32,
    last_heard: Instant,
    last_sent: Instant,
    outbox: Outbox,
    /// Buffered log lines, packed, with the (task, attempt) channel they
    /// belong to.
    logs: VecDeque<Piece>,
    /// What `logs` costs ([`charge`]) and the lines it holds.
    log_bytes: usize,
    log_lines: usize,
    oldest_log_at: Option<Instant>,
    slot: Option<Slot>,
    ready_sent: bool,
    pub stats: SessionStats,
    dropped_per_task: BTreeMap<TaskId, u64>,
    /// The server incarnation whose mandatory messages `server_dedup` tracks.
    server_session: Option<String>,
    /// The newest lease epoch heard from a server (0: none, or SQLite).
    epoch: u64,
    server_dedup: DedupWindow,
    /// Guarantee-nothing messages waiting for the next flush.
    unreliable: VecDeque<Outgoing>,
    /// What the server's heartbeats say about its clock against ours.
    clock: ClockOffset,
    /// The result file upload in progress, on this connection.
    transfer: uploads::Transfer,
    /// The worker was asked to stop: no new tasks, the current one is
    /// finished (or stopped) and delivered, then `bye`.
    stopping: bool,
}

/// When a message came off the socket, by both of the worker's clocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arrival {
    pub at: Instant,
    /// Worker wall clock, Unix ms.
    pub wall_ms: u64,
}

/// Heartbeats observed to estimate how far a dispatch travelled.
const CLOCK_WINDOW: usize = 32;

/// The difference between the worker's and the server's wall clocks as
/// heartbeats show it: `worker wall at arrival − server wall at send`,
/// the smallest of the last [`CLOCK_WINDOW`] heartbeats. That is the clock
/// skew plus the fastest transit, so a dispatch's extra delay in transit
/// is `arrival − sent − offset`, whatever the skew: two clocks 60 s apart
/// do not make fresh dispatches look stale, and a dispatch that waited in
/// a socket buffer while the worker was stopped does.
#[derive(Clone, Debug, Default)]
struct ClockOffset {
    samples: VecDeque<i128>,
}

impl ClockOffset {
    fn observe(&mut self, arrived_ms: u64, sent_ms: u64) {
        if self.samples.len() == CLOCK_WINDOW {
            self.samples.pop_front();
        }
        self.samples
            .push_back(i128::from(arrived_ms) - i128::from(sent_ms));
    }

    /// Estimated delay in transit beyond the fastest, in ms (0 if unknown).
    fn transit_ms(&self, arrived_ms: u64, sent_ms: u64) -> u64 {
        let Some(offset) = self.samples.iter().min() else {
            return 0;
        };
        if sent_ms == 0 {
            return 0;
        }
        let extra = i128::from(arrived_ms) - i128::from(sent_ms) - offset;
        u64::try_from(extra.max(0)).unwrap_or(u64::MAX)
    }
}

impl Session {
    pub fn new(
        cfg: SessionConfig,
        name: String,
        session_id: String,
        device: DeviceProps,
        now: Instant,
    ) -> Self {
        Session {
            heartbeat: cfg.heartbeat,
            liveness: cfg.liveness,
            outbox: Outbox::new(cfg.retry.clone()),
            cfg,
            name,
            session_id,
            device,
            link: Link::Down,
            last_heard: now,
            last_sent: now,
            logs: VecDeque::new(),
            log_bytes: 0,
            log_lines: 0,
            oldest_log_at: None,
            slot: None,
            ready_sent: false,
            stats: SessionStats::default(),
            dropped_per_task: BTreeMap::new(),
            server_session: None,
            epoch: 0,
            server_dedup: DedupWindow::default(),
            unreliable: VecDeque::new(),
            clock: ClockOffset::default(),
            transfer: uploads::Transfer::default(),
            stopping: false,
        }
    }

    pub fn link(&self) -> &Link {
        &self.link
    }

    /// The state to save so a restarted worker continues this session.
    pub fn saved(&self) -> SavedSession {
        SavedSession {
            session_id: self.session_id.clone(),
            next_seq: self.outbox.next_seq(),
            // A bye is never carried into the next start.
            outbox: self
                .outbox
                .entries()
                .filter(|(_, p)| !matches!(p.body, Body::Bye { .. }))
                .map(|(seq, p)| crate::delivery::outbox::SavedMessage {
                    seq,
                    task: p.task.clone(),
                    attempt: p.attempt,
                    body: p.body.clone(),
                    raw: p.raw.clone(),
                })
                .collect(),
            slot: self.slot.as_ref().map(|s| SavedSlot {
                // Secrets stay in memory: a restarted worker reports the
                // task interrupted and never needs them again.
                spec: TaskSpec {
                    secrets: Default::default(),
                    ..s.spec.clone()
                },
                finished: s.finished,
                aborted: s.aborted,
                report: s.report.clone(),
                uploads: s.uploads.clone(),
            }),
            server_session: self.server_session.clone(),
            server_dedup: self.server_dedup.clone(),
        }
    }

    /// Continues a saved session after a restart. Returns the session and,
    /// if the worker died while a conductor ran, that task's (id, attempt):
    /// the caller reports it as interrupted.
    pub fn restore(
        cfg: SessionConfig,
        name: String,
        device: DeviceProps,
        now: Instant,
        saved: SavedSession,
    ) -> (Self, Option<(TaskId, u32)>) {
        let mut s = Session::new(cfg, name, saved.session_id, device, now);
        s.outbox = Outbox::restore(s.cfg.retry.clone(), saved.next_seq, saved.outbox);
        s.server_session = saved.server_session;
        s.server_dedup = saved.server_dedup;
        let interrupted = saved
            .slot
            .as_ref()
            .filter(|slot| !slot.finished)
            .map(|slot| (slot.spec.task.clone(), slot.spec.attempt));
        s.slot = saved.slot.map(|slot| Slot {
            spec: slot.spec,
            aborted: slot.aborted,
            finished: slot.finished,
            report: slot.report,
            uploads: slot.uploads,
            stopped_for_exit: false,
            log_full: false,
        });
        (s, interrupted)
    }

    /// A message the shell could not send because the server's queue was
    /// full: a best-effort one is dropped here and counted.
    /// Log batches the socket could not take (the server reads slower than
    /// the conductor prints), in the order they were made: their lines go
    /// back to the front of the buffer, to be sent at the next flush. The
    /// buffer's bounds still hold (the oldest go first, counted).
    pub fn requeue_unsent_logs(&mut self, now: Instant, batches: Vec<(Body, Option<Bytes>)>) {
        for (body, raw) in batches.into_iter().rev() {
            let Body::LogPacked {
                task,
                attempt,
                parts,
            } = body
            else {
                continue;
            };
            if !self.is_current(&task, attempt) {
                continue; // the task was closed meanwhile; dropped on purpose
            }
            if self.slot.as_ref().is_some_and(|s| s.log_full) {
                let lines: u64 = parts.iter().map(|p| u64::from(p.count)).sum();
                self.stats.log_lines_not_sent_log_full += lines;
                continue;
            }
            let raw = raw.unwrap_or_default();
            let mut end = raw.len();
            for p in parts.into_iter().rev() {
                let start = end.saturating_sub(p.bytes as usize);
                let piece = Piece {
                    task: task.clone(),
                    attempt,
                    first: p.first,
                    text: PackedText {
                        stream: p.stream,
                        count: p.count,
                        text: raw[start..end].to_vec(),
                    },
                };
                end = start;
                self.log_bytes += charge(&piece.text);
                self.log_lines += piece.text.count as usize;
                self.logs.push_front(piece);
            }
        }
        self.shed_oldest_logs(0, 0);
        if !self.logs.is_empty() {
            self.oldest_log_at = Some(now);
        }
    }

    /// A mandatory message the shell did not send after all (to keep it
    /// behind log lines the socket could not take): sent again at the next
    /// flush.
    pub fn unsend(&mut self, seq: u64) {
        self.outbox.unsend(seq);
    }

    /// Bytes of log lines waiting to be sent.
    pub fn buffered_log_bytes(&self) -> usize {
        self.log_bytes
    }

    pub fn note_unsent(&mut self, body: &Body) {
        self.stats.unsent_dropped += 1;
        if let Body::LogPacked { task, parts, .. } = body {
            let lines: u64 = parts.iter().map(|p| u64::from(p.count)).sum();
            self.stats.log_lines_dropped += lines;
            *self.dropped_per_task.entry(task.clone()).or_default() += lines;
        }
    }

    /// The worker was asked to stop (SIGTERM): it takes no new task; with
    /// `abort` its running conductor is stopped and reported interrupted,
    /// otherwise it runs to its end and is delivered. Calling it again
    /// with `abort` escalates.
    pub fn begin_stop(&mut self, abort: bool) -> Vec<Action> {
        let mut actions = Vec::new();
        self.stopping = true;
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
        self.stopping && self.slot.is_none() && self.outbox.is_empty()
    }

    /// Tells the server what its device's console is doing (`ok` or why
    /// not); told again after each registration by the shell.
    pub fn console_status(&mut self, now: Instant, status: &str) -> Vec<Action> {
        let body = Body::ConsoleStatus {
            status: status.to_string(),
        };
        self.send_now_if_up(now, body)
    }

    /// Tells the server this worker stops on purpose, as a mandatory
    /// message: [`Session::bye_acknowledged`] says when the server has
    /// recorded it. Nothing (and false) if the server is unreachable.
    pub fn bye(&mut self, now: Instant, reason: &str) -> (Vec<Action>, bool) {
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
    pub fn bye_acknowledged(&self) -> bool {
        self.outbox.is_empty()
    }

    /// A control message sent at once if the server is reachable, else
    /// not at all (the caller says it again when it matters).
    fn send_now_if_up(&mut self, now: Instant, body: Body) -> Vec<Action> {
        let mut actions = Vec::new();
        if matches!(self.link, Link::Up { .. }) {
            self.send(
                now,
                &mut actions,
                Header::best_effort(Class::Control, None),
                body,
                None,
            );
        }
        actions
    }

    /// One line for systemd's STATUS: the link and the task.
    pub fn status_line(&self) -> String {
        let link = match &self.link {
            Link::Down => "server unreachable, reconnecting".to_string(),
            Link::Registering { .. } => "registering with the server".to_string(),
            Link::Up { .. } => "registered".to_string(),
        };
        let work = match &self.slot {
            None if self.stopping => "stopping".to_string(),
            None => "idle".to_string(),
            Some(s) if !s.finished => format!("running task {}", s.spec.task),
            Some(s) if s.report.is_some() => {
                format!("uploading the results of task {}", s.spec.task)
            }
            Some(s) => format!("delivering the report of task {}", s.spec.task),
        };
        format!("{link}; {work}")
    }

    /// The task the worker owns, if any.
    pub fn current_task(&self) -> Option<&TaskId> {
        self.slot.as_ref().map(|s| &s.spec.task)
    }

    pub fn pending_mandatory(&self) -> usize {
        self.outbox.len()
    }

    pub fn buffered_log_lines(&self) -> usize {
        self.log_lines
    }

    /// How long the server may stay silent before it counts as lost.
    pub fn liveness_window(&self) -> Duration {
        self.heartbeat * self.liveness
    }

    fn send(
        &mut self,
        now: Instant,
        actions: &mut Vec<Action>,
        header: Header,
        body: Body,
        raw: Option<Bytes>,
    ) {
        self.last_sent = now;
        actions.push(Action::Send { header, body, raw });
    }

    fn hello(&mut self, now: Instant, actions: &mut Vec<Action>) {
        let since = match self.link {
            Link::Registering { since, .. } => since,
            _ => now,
        };
        self.link = Link::Registering {
            hello_sent: now,
            since,
        };
        let body = Body::Hello {
            worker: self.name.clone(),
            session: self.session_id.clone(),
            device: self.device.clone(),
            running: self.slot.iter().map(|s| s.spec.task.clone()).collect(),
            version: Some(env!("CARGO_PKG_VERSION").to_string()),
        };
        self.send(
            now,
            actions,
            Header::best_effort(Class::Control, None),
            body,
            None,
        );
    }

    /// New sockets are connected: register.
    pub fn on_connected(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        self.last_heard = now;
        self.ready_sent = false;
        self.hello(now, &mut actions);
        actions
    }

    /// The sockets are gone (the shell gave up on them).
    pub fn on_disconnected(&mut self) {
        self.link = Link::Down;
    }

    fn lost(&mut self, reason: LostReason) -> Vec<Action> {
        self.link = Link::Down;
        let mut actions = vec![Action::Reconnect(reason)];
        let dropped = self.unreliable.len() as u64;
        if dropped > 0 {
            self.stats.unsent_dropped += dropped;
            warn!(
                dropped,
                "server unreachable: dropped guarantee-nothing messages"
            );
            self.unreliable.clear();
        }
        if self.cfg.on_server_lost == OnServerLost::Abort {
            if let Some(slot) = self.slot.as_mut().filter(|s| !s.finished && !s.aborted) {
                slot.aborted = true;
                warn!(task = %slot.spec.task, "server unreachable and on_server_lost = abort: stopping the task");
                actions.push(Action::StopTask(slot.spec.task.clone()));
            }
        }
        actions
    }

    /// Hands a message to the delivery policy of its class.
    fn deliver(
        &mut self,
        now: Instant,
        task: &TaskId,
        attempt: u32,
        body: Body,
        raw: Option<Bytes>,
    ) {
        match self.cfg.delivery.for_class(body.class()) {
            Policy::Retry => {
                self.outbox
                    .push(Some(task.clone()), Some(attempt), body, raw);
            }
            Policy::GiveUp => {
                let deadline = now + Duration::from_millis(self.cfg.delivery.give_up_after_ms);
                self.outbox.push_until(
                    Some(task.clone()),
                    Some(attempt),
                    body,
                    raw,
                    Some(deadline),
                );
            }
            Policy::GuaranteeNothing => {
                let header = Header::best_effort(body.class(), Some(task));
                self.unreliable.push_back(Outgoing { header, body, raw });
            }
        }
    }

    /// A message from the server (DEALER or SUB).
    /// `received` is when the frames came off the socket (before any wait
    /// in the shell's queue); dispatch expiry counts from it.
    pub fn on_message(&mut self, now: Instant, received: Arrival, env: Envelope) -> Vec<Action> {
        if self.link == Link::Down {
            return Vec::new();
        }
        // A leader's messages carry its lease's epoch: a command from an
        // older leader than one we have heard (a deposed one that has not
        // noticed) is ignored — neither applied nor acknowledged.
        if let Some(epoch) = env.header.epoch {
            if epoch < self.epoch
                && matches!(
                    env.body,
                    Body::Welcome { .. } | Body::Dispatch { .. } | Body::Cancel { .. }
                )
            {
                self.stats.stale_epoch += 1;
                warn!(
                    epoch,
                    newest = self.epoch,
                    kind = env.body.kind(),
                    "ignored a command from a server with an older lease epoch (a deposed leader)"
                );
                return Vec::new();
            }
            self.epoch = self.epoch.max(epoch);
        }
        self.last_heard = now;
        let mut actions = Vec::new();
        if env.header.mandatory {
            let seq = env.header.seq;
            // Numbers run consecutively; one far ahead (a rogue or broken
            // server) would make the dedup window hold every number between.
            if seq > self.server_dedup.floor().saturating_add(DEDUP_AHEAD) {
                self.stats.server_errors += 1;
                return Vec::new();
            }
            // Acknowledge every copy; apply only the first.
            let header = Header::best_effort(Class::Control, env.header.task.as_ref());
            self.send(now, &mut actions, header, Body::Ack { seq }, None);
            if !self.server_dedup.record(seq) {
                return actions;
            }
        }
        match env.body {
            Body::ServerHeartbeat {
                server, sent_ms, ..
            } => {
                if sent_ms > 0 {
                    self.clock.observe(received.wall_ms, sent_ms);
                }
                if let Link::Up { server: ours } = &self.link {
                    if *ours != server {
                        return self.lost(LostReason::ServerRestarted {
                            old: ours.clone(),
                            new: server,
                        });
                    }
                }
            }
            Body::Shutdown { .. } => return self.lost(LostReason::ServerShutdown),
            Body::Welcome {
                server,
                heartbeat_ms,
                liveness,
                sent_ms,
                ..
            } => {
                // Adopt the server's rhythm: mismatched heartbeat settings
                // are the classic cause of false disconnects.
                self.heartbeat = Duration::from_millis(heartbeat_ms.max(10));
                self.liveness = liveness.max(2);
                if self.server_session.as_ref() != Some(&server) {
                    // A new server incarnation numbers its messages afresh
                    // (and may run on another host, with another clock).
                    self.server_session = Some(server.clone());
                    self.server_dedup = DedupWindow::default();
                    self.clock = ClockOffset::default();
                }
                if sent_ms > 0 {
                    self.clock.observe(received.wall_ms, sent_ms);
                }
                self.link = Link::Up { server };
                self.outbox.resend_all();
                self.flush(now, &mut actions, true);
                self.transfer.phase = uploads::Phase::Idle;
                self.advance_uploads(now, &mut actions);
            }
            Body::Ack { seq } => {
                self.outbox.ack(seq);
                self.maybe_done(&mut actions);
            }
            body @ (Body::FileCredit { .. }
            | Body::FileStored { .. }
            | Body::FileRefused { .. }) => {
                self.on_file_message(now, body, &mut actions);
            }
            Body::LogFull {
                task,
                attempt,
                reason,
            } => self.on_log_full(task, attempt, &reason, &mut actions),
            Body::Dispatch { spec } => self.on_dispatch(now, received, spec, &mut actions),
            Body::Cancel { task } => {
                if let Some(slot) = &self.slot {
                    if slot.spec.task == task && !slot.finished {
                        info!(task = %task, "server cancelled the task");
                        actions.push(Action::StopTask(task));
                    }
                }
            }
            Body::TaskClosed {
                task,
                attempt,
                reason,
            } => self.on_task_closed(task, attempt, reason, &mut actions),
            Body::Error {
                code: ErrorCode::NotRegistered,
                ..
            } => {
                warn!("server does not know this connection (it restarted or forgot us): registering again");
                self.hello(now, &mut actions);
            }
            Body::Error {
                code: ErrorCode::NotLeader,
                message,
                ..
            } => {
                self.link = Link::Down;
                return vec![Action::Reconnect(LostReason::NotLeader(message))];
            }
            Body::Error {
                code: code @ (ErrorCode::NameInUse | ErrorCode::Forbidden),
                message,
                seq: None,
                ..
            } => {
                self.link = Link::Down;
                return vec![Action::Refused(code, message)];
            }
            Body::Error {
                code,
                message,
                seq: Some(seq),
                ..
            } => {
                // The server answered a mandatory message with a typed
                // error instead of an ack: resending cannot help.
                self.stats.server_errors += 1;
                if let Some(p) = self.outbox.take(seq) {
                    self.stats.refused_by_server += 1;
                    warn!(seq, kind = p.body.kind(), task = ?p.task, ?code, %message, "the server refused a message; not resending it");
                    self.maybe_done(&mut actions);
                } else {
                    warn!(seq, ?code, %message, "the server refused a message no longer pending");
                }
            }
            Body::Error { code, message, .. } => {
                self.stats.server_errors += 1;
                warn!(?code, %message, "protocol error reported by the server");
            }
            other => {
                warn!(
                    kind = other.kind(),
                    "protocol error: unexpected message from the server; ignored"
                );
            }
        }
        if matches!(self.link, Link::Up { .. }) {
            self.flush(now, &mut actions, false);
        }
        actions
    }

    fn on_dispatch(
        &mut self,
        now: Instant,
        received: Arrival,
        spec: TaskSpec,
        actions: &mut Vec<Action>,
    ) {
        let task = spec.task.clone();
        let attempt = spec.attempt;
        if self.stopping && self.slot.is_none() {
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
    fn on_log_full(&mut self, task: TaskId, attempt: u32, reason: &str, actions: &mut Vec<Action>) {
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

    fn on_task_closed(
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
    fn maybe_done(&mut self, actions: &mut Vec<Action>) {
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

    /// Something from the running task.
    /// Drops the oldest buffered lines (each counted, and reported as lost)
    /// until `lines` more lines of `bytes` more bytes fit the buffer's
    /// bounds.
    fn shed_oldest_logs(&mut self, lines: usize, bytes: usize) {
        while !self.logs.is_empty()
            && (self.log_lines + lines > self.cfg.log_buffer_lines
                || self.log_bytes + bytes > self.cfg.log_buffer_bytes)
        {
            if let Some(old) = self.logs.pop_front() {
                let n = old.text.count as usize;
                self.log_bytes -= charge(&old.text);
                self.log_lines -= n;
                self.stats.log_lines_dropped += n as u64;
                *self.dropped_per_task.entry(old.task).or_default() += n as u64;
            }
        }
    }

    /// Queues one log line for sending. Bounded in lines and in bytes: the
    /// oldest go first, and each one dropped is counted (the server
    /// reports the gap).
    fn buffer_log(&mut self, now: Instant, piece: Piece) {
        let (lines, bytes) = (piece.text.count as usize, charge(&piece.text));
        self.shed_oldest_logs(lines, bytes);
        self.log_bytes += bytes;
        self.log_lines += lines;
        self.logs.push_back(piece);
        self.oldest_log_at.get_or_insert(now);
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
                info!(task = %task, ?outcome, log_lines, files = files.len(), "task finished; reporting once its result files are delivered");
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
    fn is_current(&self, task: &TaskId, attempt: u32) -> bool {
        self.slot
            .as_ref()
            .is_some_and(|s| s.spec.task == *task && s.spec.attempt == attempt)
    }

    /// Called often (every log batch interval): liveness, batching,
    /// resends, heartbeats.
    pub fn on_tick(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.link == Link::Down {
            return actions;
        }
        let silent = now.saturating_duration_since(self.last_heard);
        if silent > self.liveness_window() {
            return self.lost(LostReason::Silent {
                silent_ms: silent.as_millis() as u64,
            });
        }
        match self.link {
            // Heartbeats on SUB keep `last_heard` fresh even when the
            // DEALER never reached the server: registration has its own
            // deadline.
            Link::Registering { since, .. }
                if now.saturating_duration_since(since) > self.liveness_window() =>
            {
                return self.lost(LostReason::RegistrationTimeout {
                    waited_ms: now.saturating_duration_since(since).as_millis() as u64,
                });
            }
            Link::Registering { hello_sent, .. }
                if now.saturating_duration_since(hello_sent) >= self.heartbeat =>
            {
                self.hello(now, &mut actions);
            }
            Link::Up { .. } => {
                self.flush(now, &mut actions, false);
                self.tick_uploads(now, &mut actions);
                if now.saturating_duration_since(self.last_sent) >= self.heartbeat {
                    // An idle worker repeats `ready` instead of `heartbeat`:
                    // a lost `ready` would otherwise leave it idle forever.
                    let (class, body) = if self.slot.is_none() && !self.stopping {
                        (Class::Control, Body::Ready)
                    } else {
                        (Class::Heartbeat, Body::Heartbeat)
                    };
                    self.send(
                        now,
                        &mut actions,
                        Header::best_effort(class, None),
                        body,
                        None,
                    );
                }
            }
            _ => {}
        }
        actions
    }

    /// Sends what is due: log batches, mandatory messages, ready.
    fn flush(&mut self, now: Instant, actions: &mut Vec<Action>, all_logs: bool) {
        self.flush_logs(now, actions, all_logs);
        while let Some(Outgoing { header, body, raw }) = self.unreliable.pop_front() {
            self.send(now, actions, header, body, raw);
        }
        for (seq, p) in self.outbox.expire(now) {
            self.stats.given_up += 1;
            warn!(seq, kind = p.body.kind(), task = ?p.task, sends = p.sends, "gave up delivering a message (give-up policy)");
        }
        // A final report never overtakes its task's log lines: while any
        // are still queued (the socket could not take them), it waits.
        let logs = &self.logs;
        let due = self.outbox.due_unless(now, |p| {
            matches!(p.body, Body::TaskFinished { .. })
                && p.task
                    .as_ref()
                    .is_some_and(|t| logs.iter().any(|l| l.task == *t))
        });
        for Outgoing { header, body, raw } in due {
            self.send(now, actions, header, body, raw);
        }
        if self.slot.is_none() && !self.ready_sent {
            self.ready_sent = true;
            self.send(
                now,
                actions,
                Header::best_effort(Class::Control, None),
                Body::Ready,
                None,
            );
        }
    }

    fn flush_logs(&mut self, now: Instant, actions: &mut Vec<Action>, all: bool) {
        let due = all
            || self.log_lines >= self.cfg.log_batch_lines
            || self
                .oldest_log_at
                .is_some_and(|t| now.saturating_duration_since(t) >= self.cfg.log_batch_delay);
        if !due {
            return;
        }
        while let Some(front) = self.logs.front() {
            let (task, attempt) = (front.task.clone(), front.attempt);
            // One message: pieces of this channel, up to the batch size;
            // a piece continuing the one before it (same stream, next
            // line number) extends its part.
            let mut parts: Vec<LogPart> = Vec::new();
            let mut raw: Vec<u8> = Vec::new();
            while let Some(p) = self.logs.front() {
                if p.task != task || p.attempt != attempt {
                    break;
                }
                let fits = raw.len() + p.text.text.len() <= MAX_LOG_BATCH_BYTES;
                let continues = parts.last().is_some_and(|l| {
                    l.stream == p.text.stream
                        && l.last() + 1 == p.first
                        && l.count.checked_add(p.text.count).is_some()
                });
                if !parts.is_empty() && (!fits || (!continues && parts.len() >= MAX_LOG_PARTS)) {
                    break;
                }
                let p = self.logs.pop_front().expect("front");
                self.log_bytes -= charge(&p.text);
                self.log_lines -= p.text.count as usize;
                raw.extend_from_slice(&p.text.text);
                match parts.last_mut() {
                    Some(l) if continues => {
                        l.count += p.text.count;
                        l.bytes += p.text.text.len() as u32;
                    }
                    _ => parts.push(LogPart {
                        first: p.first,
                        count: p.text.count,
                        stream: p.text.stream,
                        bytes: p.text.text.len() as u32,
                    }),
                }
            }
            let body = Body::LogPacked {
                task: task.clone(),
                attempt,
                parts,
            };
            let raw = Some(Bytes::from(raw));
            if self.cfg.delivery.log == Policy::GuaranteeNothing {
                self.send(
                    now,
                    actions,
                    Header::best_effort(Class::Log, Some(&task)),
                    body,
                    raw,
                );
            } else {
                self.deliver(now, &task, attempt, body, raw);
            }
            if !all && self.log_lines < self.cfg.log_batch_lines {
                break;
            }
        }
        self.oldest_log_at = if self.logs.is_empty() {
            None
        } else {
            Some(now)
        };
    }
}

/// Packed lines of one task waiting to be sent, numbered from `first`.
#[derive(Debug)]
struct Piece {
    task: TaskId,
    attempt: u32,
    first: u64,
    text: PackedText,
}

#[cfg(test)]
mod tests;
mod uploads;
