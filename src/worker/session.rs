//! The worker's session with the server, without I/O: registration,
//! liveness, the outbox of mandatory messages, the bounded log buffer, and
//! the one task the worker owns. The shell ([`super::service`]) feeds it
//! messages, task events and ticks, and carries out its [`Action`]s.

use crate::delivery::dedup::DEDUP_AHEAD;
use crate::delivery::outbox::Outgoing;
use crate::delivery::{DedupWindow, DeliveryPolicy, OnServerLost, Outbox, Policy, RetryPolicy};
use crate::protocol::codec::Envelope;
use crate::protocol::*;
use crate::worker::task::channel::HoldCommand;
pub use action::{Action, LostReason, SendOrder};
use bytes::Bytes;
pub use clock::Arrival;
use clock::ClockOffset;
use logs::Piece;
pub use saved::{PendingReport, SavedSession, SavedSlot};
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};
pub use stop::{StopRules, StopStep};
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
    /// Console bytes of a lease not sent because the server was away.
    pub console_bytes_unsent: u64,
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
    /// Where a stop stands (deadlines, the bye).
    stop: stop::Stopping,
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
            stop: stop::Stopping::default(),
        }
    }

    pub fn link(&self) -> &Link {
        &self.link
    }

    /// A mandatory message the shell did not send after all (to keep it
    /// behind log lines the socket could not take): sent again at the next
    /// flush.
    pub fn unsend(&mut self, seq: u64) {
        self.outbox.unsend(seq);
    }

    /// Bytes of log lines waiting to be sent.
    /// Where a message stands among this turn's sends (see [`SendOrder`]).
    pub fn send_order(&self, header: &Header, body: &Body, held_back: bool) -> SendOrder {
        match body {
            Body::LogPacked { .. } if held_back && !header.mandatory => SendOrder::HoldBack,
            Body::TaskFinished { .. } if held_back && header.mandatory => SendOrder::Withdraw,
            _ => SendOrder::Now,
        }
    }

    /// The socket would not take a message now (the server reads slower
    /// than we produce): a file chunk is read again and sent at the next
    /// tick; a best-effort log batch is handed back to be held (it returns
    /// to the buffer, in order, through [`Session::requeue_unsent_logs`]);
    /// another best-effort message is dropped and counted; a mandatory one
    /// stays in the outbox for its resend.
    pub fn on_peer_busy(
        &mut self,
        header: &Header,
        body: Body,
        raw: Option<Bytes>,
    ) -> Option<(Body, Option<Bytes>)> {
        if let Body::FileChunk {
            task,
            attempt,
            name,
            offset,
        } = &body
        {
            let len = raw.as_ref().map_or(0, |r| r.len() as u64);
            self.chunk_unsent(task, *attempt, name, *offset, len);
            None
        } else if matches!(body, Body::LogPacked { .. }) && !header.mandatory {
            Some((body, raw))
        } else {
            if !header.mandatory {
                self.note_unsent(&body);
            }
            None
        }
    }

    /// Tells the server what its device's console is doing (`ok` or why
    /// not); told again after each registration by the shell.
    pub fn console_status(&mut self, now: Instant, status: &str) -> Vec<Action> {
        let body = Body::ConsoleStatus {
            status: status.to_string(),
        };
        self.send_now_if_up(now, body)
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
            None if self.stop_requested() => "stopping".to_string(),
            None => "idle".to_string(),
            Some(s) if !s.finished => format!("running task {}", s.spec.task),
            Some(s) if s.report.is_some() => {
                format!("uploading the results of task {}", s.spec.task)
            }
            Some(s) => format!("delivering the report of task {}", s.spec.task),
        };
        format!("{link}; {work}")
    }

    pub fn pending_mandatory(&self) -> usize {
        self.outbox.len()
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
        let mut actions = Vec::new();
        if !self.admit(now, &env, &mut actions) {
            return actions;
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
                let rhythm = (heartbeat_ms, liveness);
                self.on_welcome(now, received, server, rhythm, sent_ms, &mut actions);
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
            Body::LeaseInput {
                task,
                by,
                stream,
                offset,
                ..
            } => {
                let bytes = env.raw.unwrap_or_default();
                let command = HoldCommand::Input {
                    by,
                    stream,
                    offset,
                    bytes,
                };
                self.pass_to_hold(task, command, &mut actions);
            }
            Body::PowerRequest {
                task,
                id,
                action,
                by,
                ..
            } => self.pass_to_hold(task, HoldCommand::Power { id, action, by }, &mut actions),
            Body::Error {
                code, message, seq, ..
            } => {
                if let Some(instead) = self.on_server_error(now, code, message, seq, &mut actions) {
                    return instead;
                }
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

    /// A lease's command for the hold running `task` (a hold that ended
    /// meanwhile: nothing to do; the server learns of the end).
    fn pass_to_hold(&mut self, task: TaskId, command: HoldCommand, actions: &mut Vec<Action>) {
        if let Some(slot) = &self.slot {
            let on_lease = slot.spec.hold.is_some() || slot.spec.on_lease.is_some();
            if slot.spec.task == task && !slot.finished && on_lease {
                actions.push(Action::Hold {
                    task,
                    command: Box::new(command),
                });
            }
        }
    }

    /// Whether a message is applied: not while down, not a command from
    /// a deposed leader, and a mandatory one only once (every copy is
    /// acknowledged, into `actions`).
    fn admit(&mut self, now: Instant, env: &Envelope, actions: &mut Vec<Action>) -> bool {
        if self.link == Link::Down {
            return false;
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
                return false;
            }
            self.epoch = self.epoch.max(epoch);
        }
        self.last_heard = now;
        if env.header.mandatory {
            let seq = env.header.seq;
            // Numbers run consecutively; one far ahead (a rogue or broken
            // server) would make the dedup window hold every number between.
            if seq > self.server_dedup.floor().saturating_add(DEDUP_AHEAD) {
                self.stats.server_errors += 1;
                return false;
            }
            // Acknowledge every copy; apply only the first.
            let header = Header::best_effort(Class::Control, env.header.task.as_ref());
            self.send(now, actions, header, Body::Ack { seq }, None);
            if !self.server_dedup.record(seq) {
                return false;
            }
        }
        true
    }

    /// Registered: the server's rhythm adopted (mismatched heartbeat
    /// settings are the classic cause of false disconnects), a new
    /// incarnation's numbering and clock started afresh, everything
    /// pending sent again.
    fn on_welcome(
        &mut self,
        now: Instant,
        received: Arrival,
        server: String,
        (heartbeat_ms, liveness): (u64, u32),
        sent_ms: u64,
        actions: &mut Vec<Action>,
    ) {
        self.heartbeat = Duration::from_millis(heartbeat_ms.max(10));
        self.liveness = liveness.max(2);
        if self.server_session.as_ref() != Some(&server) {
            // A new server incarnation numbers its messages afresh (and
            // may run on another host, with another clock).
            self.server_session = Some(server.clone());
            self.server_dedup = DedupWindow::default();
            self.clock = ClockOffset::default();
        }
        if sent_ms > 0 {
            self.clock.observe(received.wall_ms, sent_ms);
        }
        self.link = Link::Up { server };
        self.outbox.resend_all();
        self.flush(now, actions, true);
        self.transfer.phase = uploads::Phase::Idle;
        self.advance_uploads(now, actions);
    }

    /// An `error` from the server. Some replace everything else this
    /// message would have done (returned): not the leader (reconnect
    /// elsewhere), refused for good.
    fn on_server_error(
        &mut self,
        now: Instant,
        code: ErrorCode,
        message: String,
        seq: Option<u64>,
        actions: &mut Vec<Action>,
    ) -> Option<Vec<Action>> {
        match (code, seq) {
            (ErrorCode::NotRegistered, _) => {
                warn!("server does not know this connection (it restarted or forgot us): registering again");
                self.hello(now, actions);
            }
            (ErrorCode::NotLeader, _) => {
                self.link = Link::Down;
                return Some(vec![Action::Reconnect(LostReason::NotLeader(message))]);
            }
            (ErrorCode::NameInUse | ErrorCode::Forbidden, None) => {
                self.link = Link::Down;
                return Some(vec![Action::Refused(code, message)]);
            }
            (_, Some(seq)) => {
                // The server answered a mandatory message with a typed
                // error instead of an ack: resending cannot help.
                self.stats.server_errors += 1;
                if let Some(p) = self.outbox.take(seq) {
                    self.stats.refused_by_server += 1;
                    warn!(seq, kind = p.body.kind(), task = %crate::text::or_none(p.task.as_ref()), code = %crate::text::wire(&code), %message, "the server refused a message; not resending it");
                    self.maybe_done(actions);
                } else {
                    warn!(seq, code = %crate::text::wire(&code), %message, "the server refused a message no longer pending");
                }
            }
            (_, None) => {
                self.stats.server_errors += 1;
                warn!(code = %crate::text::wire(&code), %message, "protocol error reported by the server");
            }
        }
        None
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
                    let (class, body) = if self.slot.is_none() && !self.stop_requested() {
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
            warn!(seq, kind = p.body.kind(), task = %crate::text::or_none(p.task.as_ref()), sends = p.sends, "gave up delivering a message (give-up policy)");
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
}

mod action;
mod clock;
mod logs;
mod saved;
mod stop;
mod task;
#[cfg(test)]
mod tests;
mod uploads;
