//! The server's heart, without I/O: worker registry, testruns, tasks,
//! per-routing-key queues, dispatch, timeouts and verdicts.
//!
//! The tokio shell ([`super::service`]) feeds it decoded messages and clock
//! ticks and carries out the [`Output`]s it returns. Every rule here can be
//! tested with a fake clock (see the tests at the bottom).

use crate::delivery::ranges::describe;
use crate::delivery::{ByteRanges, DedupWindow, Outbox, RetryPolicy, SeqRanges};
use crate::protocol::codec::{Envelope, ProtocolError};
use crate::protocol::limits;
use crate::protocol::*;
use crate::server::db::HistoryRow;
use crate::server::distribution;
use crate::server::store::{Store, StoreError};
use crate::server::verdict::{parse_junit, run_verdict, task_verdict};
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Routing identity of a connected peer (one per connection).
pub type PeerId = Bytes;

/// Largest chunk of a log or file sent to a client in one reply.
pub const MAX_READ_CHUNK: u64 = crate::protocol::limits::MAX_READ_BYTES;
/// Separate received byte ranges kept per result file: chunks normally
/// arrive in order and stay one range.
pub const MAX_FILE_RANGES: usize = 4096;
pub use crate::delivery::dedup::DEDUP_AHEAD;
/// Largest result file parsed as JUnit.
const MAX_JUNIT_BYTES: u64 = 64 * 1024 * 1024;

/// Timing and retry rules of the scheduler.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Server heartbeat interval; also what workers are expected to keep.
    pub heartbeat: Duration,
    /// Missed intervals before a worker counts as lost.
    pub liveness: u32,
    /// A dispatch is stale this long after it was sent.
    pub dispatch_ttl: Duration,
    /// How long a lost worker's task is held before it is re-queued.
    pub lost_grace: Duration,
    /// Attempts per task before it ends in ERROR.
    pub max_attempts: u32,
    /// A task nobody started within this ends in ERROR.
    pub queue_timeout: Duration,
    /// Server backstop: a running task ends in ERROR this long after its
    /// own execution timeout if the worker never reported.
    pub backstop_grace: Duration,
    /// Resend timing of the server's mandatory messages (dispatch, cancel).
    pub retry: RetryPolicy,
    /// Bounds on what peers can make the scheduler hold.
    pub limits: SchedulerLimits,
}

/// What peers can make the scheduler hold, at most. Each bound is
/// configurable (`[limits]` in `conf/server.toml`) and listed in the
/// README's Limits table with what a peer sees when it hits it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchedulerLimits {
    /// Unfinished tasks (queued, dispatched, running, held) in all. A submit
    /// that would exceed it is refused with `limit_reached`.
    pub max_open_tasks: usize,
    /// Bytes of one task attempt's stored log; lines past it are dropped
    /// and counted (`log_lines_over_limit`), the report says so.
    pub max_task_log_bytes: u64,
    /// Separate runs of received log line numbers kept per task; a line
    /// that would open one more is dropped and counted, so a peer sending
    /// every other number cannot make the accounting grow without bound.
    pub max_log_gaps: usize,
    /// Largest result file, and all result files of one task attempt.
    pub max_file_bytes: u64,
    pub max_task_file_bytes: u64,
    /// Times a task may be refused by workers (refusals use no attempt)
    /// before it ends in ERROR.
    pub max_refusals: u32,
}

impl Default for SchedulerLimits {
    fn default() -> Self {
        SchedulerLimits {
            max_open_tasks: 10_000,
            max_task_log_bytes: 256 * 1024 * 1024,
            max_log_gaps: 4096,
            max_file_bytes: 4 * 1024 * 1024 * 1024,
            max_task_file_bytes: 16 * 1024 * 1024 * 1024,
            max_refusals: 20,
        }
    }
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            heartbeat: Duration::from_secs(1),
            liveness: 3,
            dispatch_ttl: Duration::from_secs(30),
            lost_grace: Duration::from_secs(30),
            max_attempts: 3,
            queue_timeout: Duration::from_secs(24 * 3600),
            backstop_grace: Duration::from_secs(60),
            retry: RetryPolicy::default(),
            limits: SchedulerLimits::default(),
        }
    }
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Send on the ROUTER to one peer.
    Send {
        peer: PeerId,
        header: Header,
        body: Body,
        raw: Option<Bytes>,
    },
    /// Publish on PUB under `topic`.
    Publish { topic: String, body: Body },
}

struct Worker {
    name: String,
    device: DeviceProps,
    /// Process incarnation of the worker; dedup key with seq.
    session: String,
    peer: Option<PeerId>,
    state: WorkerState,
    /// Set while the worker asked for work and has none.
    ready_since: Option<Instant>,
    task: Option<TaskId>,
    last_heard: Instant,
    dedup: DedupWindow,
    /// The server's mandatory messages to this worker session, until acked.
    outbox: Outbox,
}

impl Worker {
    fn routing_keys(&self) -> Vec<String> {
        let d = &self.device;
        let mut keys = vec![d.devicegroup.clone()];
        if let Some(n) = &d.devicename {
            keys.push(format!("{}.{}", d.devicegroup, n));
            if let Some(i) = &d.deviceid {
                keys.push(format!("{}.{}.{}", d.devicegroup, n, i));
            }
        }
        keys
    }
}

struct Task {
    id: TaskId,
    run: RunId,
    packages: Vec<String>,
    state: TaskState,
    worker: Option<String>,
    attempts: u32,
    verdict: Option<Verdict>,
    reason: Option<String>,
    cases: Option<CaseCounts>,
    /// Sequence numbers of the log lines stored.
    log: SeqRanges,
    log_lines_produced: Option<u64>,
    files: Vec<FileInfo>,
    /// When the task entered its current state.
    since: Instant,
    /// When the task was first queued (queue timeout).
    queued_at: Instant,
    /// Global order of queueing, to compare heads of different queues.
    order: u64,
    cancel_requested: bool,
    /// Byte ranges received per result file, sorted and merged: chunks can
    /// arrive out of order, and in order they stay one range.
    received: BTreeMap<String, ByteRanges>,
    /// Every state change, oldest first.
    history: Vec<StateChange>,
    /// Bytes of this attempt's log stored, against `max_task_log_bytes`.
    log_bytes: u64,
    /// Log lines of this attempt refused by a limit (log size, gaps).
    log_refused: u64,
    /// Result files of this attempt the server refused, with the reason:
    /// the final report does not wait for them, and the verdict says why.
    file_errors: BTreeMap<String, String>,
    /// Times workers refused this task (a refusal uses no attempt).
    refusals: u32,
    /// Declared size of each result file of this attempt, as first offered.
    file_sizes: BTreeMap<String, u64>,
    /// SHA-256 of each result file so far, fed by chunks in order (not
    /// stored: after a restart a file is verified by reading it back).
    hashing: HashMap<String, StreamHash>,
}

/// A SHA-256 computed while a file's chunks arrive in order.
#[derive(Default)]
struct StreamHash {
    hasher: sha2::Sha256,
    /// Bytes hashed so far, from offset 0.
    hashed: u64,
}

impl StreamHash {
    /// Feeds a chunk; only the part continuing what was hashed counts
    /// (resends of earlier bytes add nothing, a chunk beyond a gap stops
    /// the streaming for this file).
    fn update(&mut self, offset: u64, data: &[u8]) {
        use sha2::Digest;
        let end = offset.saturating_add(data.len() as u64);
        if offset <= self.hashed && end > self.hashed {
            let skip = (self.hashed - offset) as usize;
            self.hasher.update(&data[skip..]);
            self.hashed = end;
        }
    }

    /// The digest, if every byte of a file of `size` bytes was hashed.
    fn digest_if_whole(self, size: u64) -> Option<String> {
        use sha2::Digest;
        (self.hashed == size).then(|| hex::encode(self.hasher.finalize()))
    }
}

impl Task {
    /// Bytes of `name` received so far.
    fn covered(&self, name: &str) -> u64 {
        self.received.get(name).map_or(0, ByteRanges::covered)
    }
}

struct Testrun {
    request: TestrunRequest,
    tasks: Vec<TaskId>,
    state: RunState,
    verdict: Option<Verdict>,
    events: Vec<ProgressEvent>,
}

/// The scheduler. `S` stores logs and result files.
pub struct Scheduler<S: Store> {
    cfg: SchedulerConfig,
    store: S,
    /// This server's incarnation, announced in heartbeats and welcomes.
    incarnation: String,
    workers: BTreeMap<String, Worker>,
    peers: HashMap<PeerId, String>,
    runs: BTreeMap<RunId, Testrun>,
    tasks: HashMap<TaskId, Task>,
    /// Queued tasks per routing key, oldest first.
    queues: BTreeMap<String, VecDeque<TaskId>>,
    next_order: u64,
    next_run: u64,
    /// Sequence numbers of the server's non-mandatory messages (for logs
    /// and debugging; mandatory ones are numbered by each worker's outbox).
    next_seq: u64,
    last_tick: Option<Instant>,
    /// Maps the monotonic clock to Unix milliseconds, for dispatch expiry.
    wall_base: (Instant, u64),
    counters: BTreeMap<String, u64>,
    out: Vec<Output>,
    /// Tasks and runs that may have changed since the last commit: the
    /// unfinished ones, and those that finished since.
    active_tasks: BTreeSet<TaskId>,
    active_runs: BTreeSet<RunId>,
    /// Encoded rows as last committed, to write only what changed.
    persisted: HashMap<String, Vec<u8>>,
    /// Task state changes not yet committed.
    history: Vec<HistoryRow>,
    /// Tasks with a state change since the last commit. A queued task
    /// changes only through a state change, so the others are not re-encoded.
    touched: BTreeSet<TaskId>,
    persisted_next_run: u64,
    /// Stored rows that could not be restored, to move aside at the next
    /// commit.
    quarantined: Vec<RestoreError>,
    /// Log lines about peers' bad messages, limited (counters count all).
    noise: crate::logging::Throttle,
    /// The latest time an input brought (for inputs that carry none).
    latest: Instant,
}

pub use crate::protocol::limits::unix_ms_now;

fn header(class: Class, task: Option<&TaskId>) -> Header {
    Header {
        v: PROTOCOL_VERSION,
        class,
        mandatory: false,
        seq: 0,
        task: task.cloned(),
    }
}

impl<S: Store> Scheduler<S> {
    pub fn new(cfg: SchedulerConfig, store: S, incarnation: String) -> Self {
        Scheduler {
            cfg,
            store,
            incarnation,
            workers: BTreeMap::new(),
            peers: HashMap::new(),
            runs: BTreeMap::new(),
            tasks: HashMap::new(),
            queues: BTreeMap::new(),
            next_order: 0,
            next_run: 1,
            next_seq: 1,
            last_tick: None,
            wall_base: (Instant::now(), unix_ms_now()),
            counters: BTreeMap::new(),
            out: Vec::new(),
            active_tasks: BTreeSet::new(),
            active_runs: BTreeSet::new(),
            persisted: HashMap::new(),
            history: Vec::new(),
            touched: BTreeSet::new(),
            persisted_next_run: 0,
            quarantined: Vec::new(),
            noise: crate::logging::Throttle::new(Duration::from_secs(10), 20),
            latest: Instant::now(),
        }
    }

    /// Sets which Unix time `at` corresponds to (tests use a fake clock).
    pub fn set_wall_clock(&mut self, at: Instant, unix_ms: u64) {
        self.wall_base = (at, unix_ms);
    }

    fn wall_ms(&self, now: Instant) -> u64 {
        let (base, ms) = self.wall_base;
        if now >= base {
            ms + now.duration_since(base).as_millis() as u64
        } else {
            ms.saturating_sub(base.duration_since(now).as_millis() as u64)
        }
    }

    pub fn incarnation(&self) -> &str {
        &self.incarnation
    }

    /// Outputs produced since the last call, in order.
    pub fn take_outputs(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.out)
    }

    pub fn counters(&self) -> &BTreeMap<String, u64> {
        &self.counters
    }

    /// Something the shell did to a peer (a send dropped because the peer
    /// was not reading, an idle connection closed): counted with the rest.
    pub fn count_shell_event(&mut self, counter: &str, n: u64) {
        self.count(counter, n);
    }

    fn count(&mut self, name: &str, n: u64) {
        *self.counters.entry(name.to_string()).or_default() += n;
    }

    fn send(&mut self, peer: &PeerId, task: Option<&TaskId>, body: Body, raw: Option<Bytes>) {
        let mut h = header(body.class(), task);
        h.seq = self.next_seq;
        self.next_seq += 1;
        self.out.push(Output::Send {
            peer: peer.clone(),
            header: h,
            body,
            raw,
        });
    }

    fn send_error(
        &mut self,
        peer: &PeerId,
        request: Option<u64>,
        code: ErrorCode,
        message: String,
    ) {
        self.send(
            peer,
            None,
            Body::Error {
                request,
                code,
                message,
                seq: None,
            },
            None,
        );
    }

    /// Answers a worker's mandatory message `seq` with a typed error
    /// instead of an ack: the worker stops resending it and reports why.
    fn refuse_mandatory(
        &mut self,
        worker: &str,
        task: Option<&TaskId>,
        seq: u64,
        code: ErrorCode,
        message: String,
    ) {
        self.send_to_worker(
            worker,
            task,
            Body::Error {
                request: None,
                code,
                message,
                seq: Some(seq),
            },
        );
    }

    fn send_to_worker(&mut self, worker: &str, task: Option<&TaskId>, body: Body) {
        if let Some(peer) = self.workers.get(worker).and_then(|w| w.peer.clone()) {
            self.send(&peer, task, body, None);
        }
    }

    // ------------------------------------------------------------------
    // Inputs
    // ------------------------------------------------------------------

    /// Frames from `peer` could not be decoded: reply, count, log.
    pub fn on_bad_frames(&mut self, peer: &PeerId, error: &ProtocolError) {
        self.count(error.counter(), 1);
        let worker = self.peers.get(peer).cloned();
        if self.noise.allow(self.latest, "protocol errors") {
            warn!(peer = %hex::encode(peer), worker = worker.as_deref().unwrap_or("-"), error = %error, "protocol error: refused a message");
        }
        self.send(
            peer,
            None,
            Body::Error {
                request: error.request(),
                code: error.code(),
                message: error.to_string(),
                seq: error.seq(),
            },
            None,
        );
    }

    /// A decoded message from `peer`.
    pub fn on_message(&mut self, now: Instant, peer: &PeerId, env: Envelope) {
        self.latest = self.latest.max(now);
        let Envelope { header, body, raw } = env;
        if let Some(request) = body.request() {
            self.on_client_request(now, peer, request, body);
            return;
        }
        if let Body::Hello {
            worker,
            session,
            device,
            running,
        } = body
        {
            self.on_hello(now, peer, worker, session, device, running);
            return;
        }
        let Some(name) = self.peers.get(peer).cloned() else {
            self.count("not_registered", 1);
            self.send_error(
                peer,
                None,
                ErrorCode::NotRegistered,
                format!(
                    "{} from an unregistered connection; send hello first",
                    body.kind()
                ),
            );
            return;
        };
        let worker = self.workers.get_mut(&name).expect("peer maps to a worker");
        worker.last_heard = now;
        if worker.state == WorkerState::Lost {
            worker.state = if worker.task.is_some() {
                WorkerState::Busy
            } else {
                WorkerState::Idle
            };
        }
        if header.mandatory {
            let floor = worker.dedup.floor();
            if header.seq > floor.saturating_add(DEDUP_AHEAD) {
                // Numbers run consecutively; one this far ahead would make
                // the dedup window hold every number in between.
                self.count("mandatory_seq_too_far_ahead", 1);
                if self.noise.allow(now, "protocol errors") {
                    warn!(worker = %name, seq = header.seq, floor, "protocol error: refused a mandatory message numbered too far ahead");
                }
                self.refuse_mandatory(
                    &name,
                    header.task.as_ref(),
                    header.seq,
                    ErrorCode::Invalid,
                    format!(
                        "seq {} is more than {DEDUP_AHEAD} ahead of the last consecutive seq {floor}",
                        header.seq
                    ),
                );
                return;
            }
            if worker.dedup.seen(header.seq) {
                self.count("duplicate_mandatory", 1);
                self.send(
                    peer,
                    header.task.as_ref(),
                    Body::Ack { seq: header.seq },
                    None,
                );
                return;
            }
            // The ack goes before anything the message causes (a task_closed
            // after a final report), so the worker sees its report acked first.
            let mark = self.out.len();
            if self.apply_mandatory(now, &name, Some(header.seq), body, raw) {
                let worker = self.workers.get_mut(&name).expect("worker");
                worker.dedup.record(header.seq);
                self.send(
                    peer,
                    header.task.as_ref(),
                    Body::Ack { seq: header.seq },
                    None,
                );
                let ack = self.out.pop().expect("just pushed");
                self.out.insert(mark, ack);
            }
            return;
        }
        match body {
            Body::Heartbeat => {}
            Body::Ack { seq } => {
                let worker = self.workers.get_mut(&name).expect("worker");
                worker.outbox.ack(seq);
            }
            Body::Ready => {
                let worker = self.workers.get_mut(&name).expect("worker");
                if worker.task.is_none() {
                    worker.state = WorkerState::Idle;
                    worker.ready_since.get_or_insert(now);
                    self.try_dispatch(now);
                }
            }
            Body::Log {
                task,
                attempt,
                lines,
            } => self.on_log(&name, task, attempt, lines),
            // Sent under the guarantee-nothing policy: applied, never acked.
            body @ (Body::TaskAccepted { .. }
            | Body::TaskRefused { .. }
            | Body::FileChunk { .. }
            | Body::TaskFinished { .. }) => {
                self.apply_mandatory(now, &name, None, body, raw);
            }
            other => {
                self.count("unexpected_message", 1);
                if self.noise.allow(now, "protocol errors") {
                    warn!(worker = %name, kind = other.kind(), "protocol error: message not valid from a worker or must be mandatory");
                }
                self.send_error(
                    peer,
                    None,
                    ErrorCode::Malformed,
                    format!(
                        "{} is not a message a worker sends without the mandatory flag",
                        other.kind()
                    ),
                );
            }
        }
    }

    fn on_hello(
        &mut self,
        now: Instant,
        peer: &PeerId,
        name: String,
        session: String,
        device: DeviceProps,
        running: Vec<TaskId>,
    ) {
        if let Err(e) = device.validate() {
            self.send_error(
                peer,
                None,
                ErrorCode::BadRequest,
                format!("hello from {name:?}: {e}"),
            );
            return;
        }
        // Two live workers with one name would steal each other's tasks and
        // messages: the one already registered keeps the name. A worker
        // restarted on the same state directory keeps its session, so it
        // takes over at once; a silent or lost one can be replaced.
        let liveness = self.cfg.heartbeat.saturating_mul(self.cfg.liveness);
        if let Some(w) = self.workers.get(&name) {
            let alive = w.peer.is_some()
                && w.state != WorkerState::Lost
                && now.saturating_duration_since(w.last_heard) <= liveness;
            if alive && w.session != session {
                let registered = w.session.clone();
                self.count("hello_name_in_use", 1);
                if self.noise.allow(now, "refused hellos") {
                    warn!(worker = %name, session = %session, registered_session = %registered, "refused a hello: the worker name is in use by a live worker with another session (two workers started with the same name?)");
                }
                self.send_error(
                    peer,
                    None,
                    ErrorCode::NameInUse,
                    format!(
                        "worker name {name:?} is in use by a live worker (session {registered}); give each worker its own name, or stop the other one"
                    ),
                );
                return;
            }
        }
        let worker = self.workers.entry(name.clone()).or_insert_with(|| Worker {
            name: name.clone(),
            device: device.clone(),
            session: session.clone(),
            peer: None,
            state: WorkerState::Idle,
            ready_since: None,
            task: None,
            last_heard: now,
            dedup: DedupWindow::default(),
            outbox: Outbox::new(self.cfg.retry.clone()),
        });
        if let Some(old) = worker.peer.take() {
            self.peers.remove(&old);
        }
        if worker.session != session {
            info!(worker = %name, "worker process restarted (new session)");
            worker.session = session;
            worker.dedup = DedupWindow::default();
            // What was pending for the old process is moot; its task is
            // reconciled from `running` below. Numbering goes on where it
            // was: the worker deduplicates per server incarnation, so a
            // number must never be reused within one.
            worker.outbox =
                Outbox::restore(self.cfg.retry.clone(), worker.outbox.next_seq(), Vec::new());
        } else {
            worker.outbox.resend_all();
        }
        worker.device = device;
        worker.peer = Some(peer.clone());
        worker.last_heard = now;
        worker.ready_since = None;
        self.peers.insert(peer.clone(), name.clone());
        info!(worker = %name, device = %self.workers[&name].device, "worker registered");

        // Reconcile what the worker runs with what we think it runs.
        let ours = self.workers[&name].task.clone();
        if let Some(task) = ours {
            if running.contains(&task) {
                if let Some(t) = self.tasks.get_mut(&task) {
                    if t.state == TaskState::Held {
                        t.state = TaskState::Running;
                        t.since = now;
                        info!(worker = %name, task = %task, "worker is back; it still has the held task");
                    }
                }
            } else {
                self.workers.get_mut(&name).expect("worker").task = None;
                self.requeue_or_fail(
                    now,
                    &task,
                    format!("worker {name} came back without the task"),
                );
            }
        }
        for task in running {
            if self.workers[&name].task.as_ref() != Some(&task) {
                self.count("orphan_control", 1);
                self.send(
                    peer,
                    Some(&task),
                    Body::TaskClosed {
                        task: task.clone(),
                        attempt: None,
                        reason: "the server does not know this task on this worker".into(),
                    },
                    None,
                );
            }
        }
        let w = self.workers.get_mut(&name).expect("worker");
        w.state = if w.task.is_some() {
            WorkerState::Busy
        } else {
            WorkerState::Idle
        };
        let welcome = Body::Welcome {
            server: self.incarnation.clone(),
            heartbeat_ms: self.cfg.heartbeat.as_millis() as u64,
            liveness: self.cfg.liveness,
            sent_ms: self.wall_ms(now),
        };
        self.send(peer, None, welcome, None);
        self.flush_worker(now, &name);
    }

    /// Sends the worker's due mandatory messages (first sends and resends).
    fn flush_worker(&mut self, now: Instant, name: &str) {
        let Some(w) = self.workers.get_mut(name) else {
            return;
        };
        let Some(peer) = w.peer.clone() else { return };
        if w.state == WorkerState::Lost {
            return;
        }
        for o in w.outbox.due(now) {
            self.out.push(Output::Send {
                peer: peer.clone(),
                header: o.header,
                body: o.body,
                raw: o.raw,
            });
        }
    }

    /// Queues a mandatory message to a worker and sends it at once.
    fn send_mandatory(&mut self, now: Instant, worker: &str, task: &TaskId, body: Body) {
        let attempt = self.tasks.get(task).map(|t| t.attempts);
        if let Some(w) = self.workers.get_mut(worker) {
            w.outbox.push(Some(task.clone()), attempt, body, None);
        }
        self.flush_worker(now, worker);
    }

    /// True if the task is open on this worker's channel.
    /// True if `attempt` (any, for `None`) of the task is open on this
    /// worker's channel.
    fn open_on(&self, task: &TaskId, worker: &str, attempt: Option<u32>) -> bool {
        self.tasks.get(task).is_some_and(|t| {
            !t.state.is_final()
                && t.state != TaskState::Queued
                && t.worker.as_deref() == Some(worker)
                && attempt.is_none_or(|a| a == t.attempts)
        })
    }

    /// Applies a mandatory message once. Returns true if it should be acked
    /// (false: it was answered with a nack instead).
    fn apply_mandatory(
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
                // Checked before any byte is written: the file's declared
                // size against the limits (the codec already checked that
                // the chunk lies inside it).
                let limits = &self.cfg.limits;
                let t = &self.tasks[&task];
                if let Some(why) = t.file_errors.get(&name) {
                    let why = why.clone();
                    return self.refuse_file(
                        worker,
                        &task,
                        seq,
                        &name,
                        ErrorCode::LimitReached,
                        why,
                    );
                }
                let others: u64 = t
                    .file_sizes
                    .iter()
                    .filter(|(n, _)| **n != name)
                    .map(|(_, size)| *size)
                    .fold(0u64, u64::saturating_add);
                if size > limits.max_file_bytes {
                    let why = format!(
                        "result file {name:?} is {size} bytes, over the server's limit of {} (limits.max_file_bytes)",
                        limits.max_file_bytes
                    );
                    return self.refuse_file(
                        worker,
                        &task,
                        seq,
                        &name,
                        ErrorCode::LimitReached,
                        why,
                    );
                }
                if others.saturating_add(size) > limits.max_task_file_bytes {
                    let why = format!(
                        "result files of this task would exceed {} bytes (limits.max_task_file_bytes)",
                        limits.max_task_file_bytes
                    );
                    return self.refuse_file(
                        worker,
                        &task,
                        seq,
                        &name,
                        ErrorCode::LimitReached,
                        why,
                    );
                }
                if t.file_sizes.get(&name).is_some_and(|s| *s != size) {
                    let why = format!(
                        "result file {name:?} changed size during its transfer (now {size} bytes)"
                    );
                    return self.refuse_file(worker, &task, seq, &name, ErrorCode::Invalid, why);
                }
                if t.received
                    .get(&name)
                    .is_some_and(|r| r.runs() >= MAX_FILE_RANGES)
                    && !t.received[&name].extends(offset, offset + data.len() as u64)
                {
                    let why = format!(
                        "result file {name:?} arrived in more than {MAX_FILE_RANGES} separate pieces"
                    );
                    return self.refuse_file(worker, &task, seq, &name, ErrorCode::Invalid, why);
                }
                if let Err(e) = self.store.write_chunk(&task, &name, offset, &data) {
                    return self.file_problem(worker, &task, seq, &name, e);
                }
                // Chunks may arrive out of order after resends: check the
                // whole file only once all of it is here.
                let t = self.tasks.get_mut(&task).expect("open task");
                let end = offset + data.len() as u64;
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

    /// A result file the server will not take: the chunk is answered with
    /// a typed error carrying its seq (the worker stops resending it), the
    /// file is marked so the final report does not wait for it, and the
    /// verdict names the reason.
    fn refuse_file(
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

    fn file_problem(
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

    fn on_log(&mut self, worker: &str, task: TaskId, attempt: u32, lines: Vec<LogLine>) {
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
        // A copy bounded by `max_log_gaps` runs, to judge the batch.
        let mut ranges = t.log.clone();
        let before = fresh.len();
        fresh.retain(|l| {
            let size = crate::server::store::rendered_len(l);
            if bytes.saturating_add(size) > limits.max_task_log_bytes {
                return false;
            }
            if !ranges.insert_bounded(l.seq, limits.max_log_gaps) {
                return false;
            }
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
        let t = self.tasks.get_mut(&task).expect("open task");
        for l in &fresh {
            t.log.insert(l.seq);
            t.log_bytes = t
                .log_bytes
                .saturating_add(crate::server::store::rendered_len(l));
        }
        self.count("log_lines_stored", fresh.len() as u64);
        self.out.push(Output::Publish {
            topic: format!("log/{run}"),
            body: Body::LogLines {
                run,
                task,
                lines: fresh,
            },
        });
    }

    fn on_finished(
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

    // ------------------------------------------------------------------
    // Client requests
    // ------------------------------------------------------------------

    fn on_client_request(&mut self, now: Instant, peer: &PeerId, request: u64, body: Body) {
        let reply = match body {
            Body::Ping { .. } => Ok(Body::Pong {
                request,
                server: self.incarnation.clone(),
            }),
            Body::Submit { testrun, .. } => self.submit(now, request, testrun),
            Body::GetStatus { run, .. } => self
                .status(&run)
                .map(|status| Body::Status { request, status }),
            Body::GetEvents { run, from, .. } => match self.runs.get(&run) {
                Some(r) => Ok(Body::Events {
                    request,
                    run: run.clone(),
                    events: r.events.iter().skip(from as usize).cloned().collect(),
                }),
                None => Err((
                    ErrorCode::UnknownRun,
                    format!("no testrun {run:?} on this server"),
                )),
            },
            Body::CancelRun { run, .. } => self.cancel_run(now, &run).and_then(|()| {
                self.status(&run)
                    .map(|status| Body::Status { request, status })
            }),
            Body::ListWorkers { .. } => Ok(Body::Workers {
                request,
                workers: self
                    .workers
                    .values()
                    .map(|w| WorkerInfo {
                        name: w.name.clone(),
                        device: w.device.clone(),
                        state: w.state,
                        task: w.task.clone(),
                        last_heard_ms_ago: now.saturating_duration_since(w.last_heard).as_millis()
                            as u64,
                    })
                    .collect(),
            }),
            Body::GetLog {
                task, offset, max, ..
            } => {
                if !self.tasks.contains_key(&task) {
                    Err((
                        ErrorCode::UnknownTask,
                        format!("no task {task:?} on this server"),
                    ))
                } else {
                    match self.store.read_log(&task, offset, max.min(MAX_READ_CHUNK)) {
                        Ok((bytes, eof)) => {
                            self.send(
                                peer,
                                None,
                                Body::Data {
                                    request,
                                    offset,
                                    eof,
                                },
                                Some(bytes.into()),
                            );
                            return;
                        }
                        Err(e) => Err((ErrorCode::UnknownTask, e.to_string())),
                    }
                }
            }
            Body::GetFile {
                task,
                name,
                offset,
                max,
                ..
            } => {
                let known = self
                    .tasks
                    .get(&task)
                    .is_some_and(|t| t.files.iter().any(|f| f.name == name));
                if !known {
                    Err((
                        ErrorCode::UnknownTask,
                        format!("task {task:?} has no result file {name:?}"),
                    ))
                } else {
                    match self
                        .store
                        .read_file(&task, &name, offset, max.min(MAX_READ_CHUNK))
                    {
                        Ok((bytes, eof)) => {
                            self.send(
                                peer,
                                None,
                                Body::Data {
                                    request,
                                    offset,
                                    eof,
                                },
                                Some(bytes.into()),
                            );
                            return;
                        }
                        Err(e) => Err((ErrorCode::UnknownTask, e.to_string())),
                    }
                }
            }
            other => Err((
                ErrorCode::Malformed,
                format!("{} is not a client request", other.kind()),
            )),
        };
        match reply {
            Ok(body) => self.send(peer, None, body, None),
            Err((code, message)) => self.send_error(peer, Some(request), code, message),
        }
    }

    fn submit(
        &mut self,
        now: Instant,
        request: u64,
        testrun: TestrunRequest,
    ) -> Result<Body, (ErrorCode, String)> {
        let bad = |m: String| Err((ErrorCode::BadRequest, m));
        if testrun.packages.is_empty() {
            return bad("no test packages given".into());
        }
        if let Some(p) = testrun.packages.iter().find(|p| {
            p.is_empty() || p.len() > 200 || p.contains(|c: char| c.is_whitespace() || c == ',')
        }) {
            return bad(format!(
                "test package name {p:?} is empty, too long or contains whitespace or ','"
            ));
        }
        if testrun.image.trim().is_empty() {
            return bad("no image given".into());
        }
        if testrun.timeout_secs == 0 {
            return bad("timeout must be at least 1 second".into());
        }
        let asked = DeviceProps {
            devicegroup: testrun.device.devicegroup.clone(),
            devicename: testrun.device.devicename.clone(),
            deviceid: testrun.device.deviceid.clone(),
        };
        if let Err(e) = asked.validate() {
            return bad(e.to_string());
        }
        let matching = self
            .workers
            .values()
            .any(|w| testrun.device.matches(&w.device));
        if !matching && !testrun.queue_anyway {
            let mut groups: Vec<_> = self
                .workers
                .values()
                .map(|w| w.device.devicegroup.clone())
                .collect();
            groups.dedup();
            groups.sort();
            groups.dedup();
            return Err((
                ErrorCode::NoMatchingWorker,
                format!(
                    "no queue for {}: no known worker has such a device (known device groups: {}); use --queue-anyway to queue it regardless",
                    testrun.device.routing_key(),
                    if groups.is_empty() { "none".to_string() } else { groups.join(", ") }
                ),
            ));
        }
        let new_tasks = distribution::split(testrun.distribution, &testrun.packages).len();
        let open = self.active_tasks.len();
        if open.saturating_add(new_tasks) > self.cfg.limits.max_open_tasks {
            self.count("submits_over_limit", 1);
            return Err((
                ErrorCode::LimitReached,
                format!(
                    "the server holds {open} unfinished tasks; {new_tasks} more would exceed its limit of {} (limits.max_open_tasks): try again when the queue is shorter",
                    self.cfg.limits.max_open_tasks
                ),
            ));
        }
        let run: RunId = format!("r{}", self.next_run);
        self.next_run += 1;
        let key = testrun.device.routing_key();
        let mut task_ids = Vec::new();
        for (i, packages) in distribution::split(testrun.distribution, &testrun.packages)
            .into_iter()
            .enumerate()
        {
            let id = format!("{run}.{}", i + 1);
            self.tasks.insert(
                id.clone(),
                Task {
                    id: id.clone(),
                    run: run.clone(),
                    packages,
                    state: TaskState::Queued,
                    worker: None,
                    attempts: 0,
                    verdict: None,
                    reason: None,
                    cases: None,
                    log: SeqRanges::default(),
                    log_lines_produced: None,
                    files: Vec::new(),
                    since: now,
                    queued_at: now,
                    order: self.next_order,
                    cancel_requested: false,
                    received: BTreeMap::new(),
                    history: Vec::new(),
                    log_bytes: 0,
                    log_refused: 0,
                    file_errors: BTreeMap::new(),
                    refusals: 0,
                    file_sizes: BTreeMap::new(),
                    hashing: HashMap::new(),
                },
            );
            self.next_order += 1;
            self.active_tasks.insert(id.clone());
            self.queues
                .entry(key.clone())
                .or_default()
                .push_back(id.clone());
            task_ids.push(id);
        }
        info!(run = %run, device = %testrun.device, tasks = task_ids.len(), "testrun accepted");
        self.active_runs.insert(run.clone());
        self.runs.insert(
            run.clone(),
            Testrun {
                request: testrun,
                tasks: task_ids.clone(),
                state: RunState::Queued,
                verdict: None,
                events: Vec::new(),
            },
        );
        for id in &task_ids {
            self.progress(id, ProgressState::Queued, None, None);
        }
        self.try_dispatch(now);
        Ok(Body::Submitted {
            request,
            run,
            tasks: task_ids,
        })
    }

    /// The status of a testrun as `ots-submit status` shows it.
    pub fn status(&self, run: &RunId) -> Result<RunStatus, (ErrorCode, String)> {
        let r = self.runs.get(run).ok_or_else(|| {
            (
                ErrorCode::UnknownRun,
                format!("no testrun {run:?} on this server"),
            )
        })?;
        Ok(RunStatus {
            run: run.clone(),
            state: r.state,
            verdict: r.verdict,
            device: r.request.device.clone(),
            image: r.request.image.clone(),
            tasks: r
                .tasks
                .iter()
                .map(|id| {
                    let t = &self.tasks[id];
                    TaskStatus {
                        task: id.clone(),
                        packages: t.packages.clone(),
                        state: t.state,
                        worker: t.worker.clone(),
                        attempts: t.attempts,
                        verdict: t.verdict,
                        reason: t.reason.clone(),
                        cases: t.cases,
                        log_lines_stored: t.log.len(),
                        log_lines_produced: t.log_lines_produced,
                        log_gaps: t
                            .log_lines_produced
                            .map(|n| t.log.missing(n))
                            .unwrap_or_default(),
                        files: t.files.clone(),
                        history: t.history.clone(),
                    }
                })
                .collect(),
            counters: self.counters.clone(),
        })
    }

    fn cancel_run(&mut self, now: Instant, run: &RunId) -> Result<(), (ErrorCode, String)> {
        let tasks = self
            .runs
            .get(run)
            .ok_or_else(|| {
                (
                    ErrorCode::UnknownRun,
                    format!("no testrun {run:?} on this server"),
                )
            })?
            .tasks
            .clone();
        info!(run = %run, "cancel requested");
        for id in tasks {
            let t = self.tasks.get_mut(&id).expect("task of run");
            match t.state {
                TaskState::Queued => {
                    self.remove_from_queue(&id);
                    self.end_task(
                        now,
                        &id,
                        TaskState::Cancelled,
                        None,
                        "cancelled while queued".into(),
                    );
                }
                TaskState::Dispatched | TaskState::Running => {
                    t.cancel_requested = true;
                    let worker = t.worker.clone().expect("running task has a worker");
                    self.send_mandatory(now, &worker, &id, Body::Cancel { task: id.clone() });
                }
                TaskState::Held => {
                    let worker = t.worker.clone();
                    if let Some(w) = worker.and_then(|w| self.workers.get_mut(&w)) {
                        w.task = None;
                    }
                    self.end_task(
                        now,
                        &id,
                        TaskState::Cancelled,
                        None,
                        "cancelled while its worker was away".into(),
                    );
                }
                TaskState::Finished | TaskState::Cancelled => {}
            }
        }
        Ok(())
    }

    // ------------------------------------------------------------------
    // Time
    // ------------------------------------------------------------------

    /// Called every heartbeat interval: heartbeat, liveness and timeouts.
    pub fn on_tick(&mut self, now: Instant) {
        self.latest = self.latest.max(now);
        self.out.push(Output::Publish {
            topic: "hb".into(),
            body: Body::ServerHeartbeat {
                server: self.incarnation.clone(),
                heartbeat_ms: self.cfg.heartbeat.as_millis() as u64,
                sent_ms: self.wall_ms(now),
            },
        });
        // If this server was not scheduled for a while (SIGSTOP, overload),
        // the silence was ours: do not blame the workers for it.
        if let Some(last) = self.last_tick {
            let gap = now.saturating_duration_since(last);
            if gap > self.cfg.heartbeat * 2 {
                warn!(
                    stalled_ms = gap.as_millis() as u64,
                    "server was not running for a while; giving workers a fresh liveness window"
                );
                for w in self.workers.values_mut() {
                    w.last_heard = now;
                }
            }
        }
        self.last_tick = Some(now);

        let limit = self.cfg.heartbeat * self.cfg.liveness;
        let lost: Vec<String> = self
            .workers
            .values()
            .filter(|w| {
                w.state != WorkerState::Lost && now.saturating_duration_since(w.last_heard) > limit
            })
            .map(|w| w.name.clone())
            .collect();
        for name in lost {
            self.worker_lost(now, &name);
        }

        let mut expired_holds = Vec::new();
        let mut queue_timeouts = Vec::new();
        let mut backstops = Vec::new();
        let mut unanswered = Vec::new();
        for t in self.tasks.values() {
            let age = now.saturating_duration_since(t.since);
            match t.state {
                TaskState::Held if age > self.cfg.lost_grace => expired_holds.push(t.id.clone()),
                TaskState::Queued
                    if now.saturating_duration_since(t.queued_at) > self.cfg.queue_timeout =>
                {
                    queue_timeouts.push(t.id.clone())
                }
                TaskState::Running => {
                    // Saturating: a timeout from a peer (or an old state row)
                    // must never overflow the clock arithmetic.
                    let timeout = Duration::from_secs(self.runs[&t.run].request.timeout_secs);
                    if age > timeout.saturating_add(self.cfg.backstop_grace) {
                        backstops.push(t.id.clone());
                    }
                }
                TaskState::Dispatched if age > self.cfg.dispatch_ttl.saturating_add(limit) => {
                    unanswered.push(t.id.clone())
                }
                _ => {}
            }
        }
        for id in expired_holds {
            let worker = self.tasks[&id].worker.clone().unwrap_or_default();
            if let Some(w) = self.workers.get_mut(&worker) {
                w.task = None;
            }
            self.requeue_or_fail(
                now,
                &id,
                format!(
                    "worker {worker} lost and did not come back within {} ms",
                    self.cfg.lost_grace.as_millis()
                ),
            );
        }
        for id in queue_timeouts {
            self.remove_from_queue(&id);
            let reason = format!(
                "queue timeout: no worker started the task within {} s",
                self.cfg.queue_timeout.as_secs()
            );
            self.end_task(now, &id, TaskState::Finished, Some(Verdict::Error), reason);
        }
        for id in backstops {
            let worker = self.tasks[&id]
                .worker
                .clone()
                .expect("running task has a worker");
            self.send_mandatory(now, &worker, &id, Body::Cancel { task: id.clone() });
            self.send_to_worker(
                &worker,
                Some(&id),
                Body::TaskClosed {
                    task: id.clone(),
                    attempt: Some(self.tasks[&id].attempts),
                    reason: "server backstop: execution timeout passed without a report".into(),
                },
            );
            if let Some(w) = self.workers.get_mut(&worker) {
                w.task = None;
            }
            let timeout = self.runs[&self.tasks[&id].run].request.timeout_secs;
            let reason = format!(
                "execution timeout: no report {} s after the {timeout} s timeout (server backstop)",
                self.cfg.backstop_grace.as_secs()
            );
            self.end_task(now, &id, TaskState::Finished, Some(Verdict::Error), reason);
        }
        for id in unanswered {
            let worker = self.tasks[&id].worker.clone().unwrap_or_default();
            if let Some(w) = self.workers.get_mut(&worker) {
                w.task = None;
                w.state = WorkerState::Idle;
            }
            self.requeue_or_fail(
                now,
                &id,
                format!("worker {worker} never accepted the dispatch"),
            );
        }
        let names: Vec<String> = self.workers.keys().cloned().collect();
        for name in names {
            self.flush_worker(now, &name);
        }
    }

    fn worker_lost(&mut self, now: Instant, name: &str) {
        let w = self.workers.get_mut(name).expect("worker");
        warn!(worker = %name, silent_ms = now.saturating_duration_since(w.last_heard).as_millis() as u64, "worker lost: no heartbeat");
        w.state = WorkerState::Lost;
        w.ready_since = None;
        // The peer mapping stays: if the same connection speaks again (a
        // partition healed), the worker is alive again without a new hello.
        if let Some(task) = w.task.clone() {
            let t = self.tasks.get_mut(&task).expect("worker task");
            if t.cancel_requested {
                w.task = None;
                self.end_task(
                    now,
                    &task,
                    TaskState::Cancelled,
                    None,
                    "cancelled; its worker was lost".into(),
                );
            } else {
                t.state = TaskState::Held;
                t.since = now;
            }
        }
    }

    // ------------------------------------------------------------------
    // Queues and dispatch
    // ------------------------------------------------------------------

    fn remove_from_queue(&mut self, id: &TaskId) {
        for q in self.queues.values_mut() {
            q.retain(|t| t != id);
        }
    }

    fn requeue_or_fail(&mut self, now: Instant, id: &TaskId, why: String) {
        let attempts = self.tasks[id].attempts;
        if attempts >= self.cfg.max_attempts {
            let reason = format!("{why}; gave up after {attempts} attempts");
            self.end_task(now, id, TaskState::Finished, Some(Verdict::Error), reason);
        } else {
            self.requeue(now, id, why);
        }
    }

    fn requeue(&mut self, now: Instant, id: &TaskId, why: String) {
        let t = self.tasks.get_mut(id).expect("task");
        info!(task = %id, reason = %why, "task re-queued");
        if let Some(w) = t.worker.as_deref().and_then(|w| self.workers.get_mut(w)) {
            w.outbox.drop_task(id, None);
        }
        t.state = TaskState::Queued;
        t.worker = None;
        t.since = now;
        t.reason = Some(why.clone());
        let key = self.runs[&t.run].request.device.routing_key();
        // Back to the front: it was first in line once already.
        self.queues.entry(key).or_default().push_front(id.clone());
        self.progress(id, ProgressState::Requeued, None, Some(why));
        self.try_dispatch(now);
    }

    /// Hands queued tasks to ready workers: the worker waiting longest
    /// first, the oldest matching task first.
    fn try_dispatch(&mut self, now: Instant) {
        loop {
            let mut ready: Vec<(Instant, String)> = self
                .workers
                .values()
                .filter(|w| w.state == WorkerState::Idle && w.task.is_none() && w.peer.is_some())
                .filter_map(|w| w.ready_since.map(|t| (t, w.name.clone())))
                .collect();
            ready.sort();
            let mut dispatched = false;
            for (_, name) in ready {
                let keys = self.workers[&name].routing_keys();
                let best = keys
                    .iter()
                    .filter_map(|k| {
                        self.queues
                            .get(k)
                            .and_then(|q| q.front())
                            .map(|t| (self.tasks[t].order, k.clone()))
                    })
                    .min();
                if let Some((_, key)) = best {
                    let task = self
                        .queues
                        .get_mut(&key)
                        .and_then(|q| q.pop_front())
                        .expect("head");
                    self.dispatch(now, &name, &task);
                    dispatched = true;
                    break;
                }
            }
            if !dispatched {
                return;
            }
        }
    }

    fn dispatch(&mut self, now: Instant, worker: &str, id: &TaskId) {
        let t = self.tasks.get_mut(id).expect("task");
        t.state = TaskState::Dispatched;
        t.worker = Some(worker.to_string());
        t.attempts += 1;
        t.since = now;
        // Each attempt is a channel of its own: its log lines count from 1
        // and its files arrive afresh.
        t.log = SeqRanges::default();
        t.log_bytes = 0;
        t.log_refused = 0;
        t.received.clear();
        t.file_errors.clear();
        t.file_sizes.clear();
        t.hashing.clear();
        t.files.clear();
        let attempt = t.attempts;
        if attempt > 1 {
            let marker = LogLine {
                seq: 0,
                stream: Stream::Worker,
                text: format!("---- attempt {attempt} on worker {worker} ----"),
            };
            if let Err(e) = self.store.append_log(id, &[marker]) {
                warn!(task = %id, error = %e, "storage error: cannot mark the new attempt in the log");
            }
        }
        let t = self.tasks.get_mut(id).expect("task");
        let req = &self.runs[&t.run].request;
        let spec = TaskSpec {
            task: id.clone(),
            run: t.run.clone(),
            attempt: t.attempts,
            image: req.image.clone(),
            packages: t.packages.clone(),
            timeout_secs: req.timeout_secs,
            options: req.options.clone(),
            sent_ms: self.wall_ms(now),
            ttl_ms: u64::try_from(self.cfg.dispatch_ttl.as_millis())
                .unwrap_or(u64::MAX)
                .clamp(*limits::TTL_MS.start(), *limits::TTL_MS.end()),
        };
        let w = self.workers.get_mut(worker).expect("worker");
        w.state = WorkerState::Busy;
        w.ready_since = None;
        w.task = Some(id.clone());
        info!(task = %id, worker, attempt = spec.attempt, "task dispatched");
        if let Some(r) = self.runs.get_mut(&spec.run) {
            if r.state == RunState::Queued {
                r.state = RunState::Running;
            }
        }
        self.send_mandatory(now, worker, id, Body::Dispatch { spec });
        self.progress(
            id,
            ProgressState::Dispatched,
            Some(worker.to_string()),
            None,
        );
    }

    // ------------------------------------------------------------------
    // Endings and progress
    // ------------------------------------------------------------------

    fn end_task(
        &mut self,
        now: Instant,
        id: &TaskId,
        state: TaskState,
        verdict: Option<Verdict>,
        reason: String,
    ) {
        let t = self.tasks.get_mut(id).expect("task");
        t.state = state;
        t.verdict = verdict;
        t.since = now;
        t.reason = Some(reason.clone());
        let run = t.run.clone();
        let worker = t.worker.clone();
        info!(task = %id, ?verdict, %reason, "task ended");
        if let Some(w) = worker.as_deref().and_then(|w| self.workers.get_mut(w)) {
            w.outbox.drop_task(id, None);
        }
        if let Some(w) = worker.as_deref() {
            let attempt = Some(self.tasks[id].attempts);
            self.send_to_worker(
                w,
                Some(id),
                Body::TaskClosed {
                    task: id.clone(),
                    attempt,
                    reason: reason.clone(),
                },
            );
        }
        let pstate = if state == TaskState::Cancelled {
            ProgressState::Cancelled
        } else {
            ProgressState::Finished
        };
        self.progress(id, pstate, worker, Some(reason));
        self.maybe_finish_run(&run);
    }

    fn maybe_finish_run(&mut self, run: &RunId) {
        let r = &self.runs[run];
        if matches!(r.state, RunState::Finished | RunState::Cancelled) {
            return;
        }
        let tasks: Vec<&Task> = r.tasks.iter().map(|t| &self.tasks[t]).collect();
        if !tasks.iter().all(|t| t.state.is_final()) {
            return;
        }
        let cancelled = tasks.iter().any(|t| t.state == TaskState::Cancelled);
        let verdict = if cancelled {
            None
        } else {
            run_verdict(
                tasks
                    .iter()
                    .map(|t| (t.verdict.unwrap_or(Verdict::Error), t.cases.as_ref())),
            )
        };
        let r = self.runs.get_mut(run).expect("run");
        r.verdict = verdict;
        r.state = if cancelled {
            RunState::Cancelled
        } else {
            RunState::Finished
        };
        info!(run = %run, ?verdict, cancelled, "testrun ended");
        let state = if cancelled {
            ProgressState::RunCancelled
        } else {
            ProgressState::RunFinished
        };
        self.push_event(run, None, state, None, verdict, None);
    }

    fn progress(
        &mut self,
        task: &TaskId,
        state: ProgressState,
        worker: Option<String>,
        reason: Option<String>,
    ) {
        let t = &self.tasks[task];
        let (run, verdict) = (t.run.clone(), t.verdict);
        let change = StateChange {
            at_ms: self.wall_ms(t.since),
            state,
            attempt: t.attempts,
            worker: worker.clone(),
            reason: reason.clone(),
        };
        self.history.push(HistoryRow {
            task: task.clone(),
            at_ms: change.at_ms,
            state: format!("{state:?}").to_lowercase(),
            attempt: change.attempt,
            worker: worker.clone(),
            reason: reason.clone(),
        });
        self.tasks.get_mut(task).expect("task").history.push(change);
        self.touched.insert(task.clone());
        self.push_event(&run, Some(task.clone()), state, worker, verdict, reason);
    }

    fn push_event(
        &mut self,
        run: &RunId,
        task: Option<TaskId>,
        state: ProgressState,
        worker: Option<String>,
        verdict: Option<Verdict>,
        reason: Option<String>,
    ) {
        let r = self.runs.get_mut(run).expect("run");
        let event = ProgressEvent {
            index: r.events.len() as u64,
            task,
            state,
            worker,
            verdict,
            reason,
        };
        r.events.push(event.clone());
        self.out.push(Output::Publish {
            topic: format!("run/{run}"),
            body: Body::Progress {
                run: run.clone(),
                event,
            },
        });
    }
}

mod persist;
pub use persist::RestoreError;
#[cfg(test)]
mod tests;
