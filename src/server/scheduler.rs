//! The server's heart, without I/O: worker registry, testruns, tasks,
//! per-routing-key queues, dispatch, timeouts and verdicts.
//!
//! The tokio shell (`server::shell::serving`) feeds it decoded messages
//! and clock ticks, each with its time, and carries out the [`Output`]s it
//! returns. It reads no clock itself. Every rule here can be tested with a
//! fake clock (`scheduler/tests.rs`).
//!
//! This file holds the state and the entry points (`on_message`,
//! `on_bad_frames`); below it:
//! - `settings` (its rules and bounds) and `model` (what it keeps of each
//!   worker, testrun and task);
//! - one concern per file: `registry` (hello, one live worker per name,
//!   the outbox to each worker), `intake` (what workers send about tasks:
//!   mandatory messages, orphans, logs), `uploads` (result files under
//!   credit), `inputs` (input files, client reads), `requests` (client
//!   requests), `access` (who may ask what), `timers` (the tick: liveness,
//!   timeouts, backstop), `dispatch` (queues and dispatch), `endings`
//!   (final states, verdicts, progress), `health` (device health checks),
//!   `notify` (events into the outbox), `retention` (pruning), `views`
//!   (what lists show), `persist` (rows and restore);
//! - sub-states that own an invariant: `followers` (who follows which
//!   testrun), `retention::Retained` (what is kept, oldest first),
//!   `pending` (what the next commit writes).

use crate::delivery::ranges::describe;
use crate::delivery::{DedupWindow, Outbox, SeqRanges};
use crate::protocol::codec::{Envelope, ProtocolError};
use crate::protocol::limits;
use crate::protocol::*;
use crate::server::distribution;
use crate::server::fairshare;
use crate::server::health::{HealthCheck, WorkerHealth};
use crate::server::store::db::HistoryRow;
use crate::server::store::{Store, StoreError};
use crate::server::verdict::{run_verdict, task_verdict};
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};
use tracing::{error, info, warn};

/// Routing identity of a connected peer (one per connection).
pub type PeerId = Bytes;

/// Largest chunk of a log or file sent to a client in one reply.
pub const MAX_READ_CHUNK: u64 = crate::protocol::limits::MAX_READ_BYTES;
pub use crate::delivery::dedup::DEDUP_AHEAD;

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
    /// Publish on PUB under `topic`. With security only heartbeats and
    /// shutdown are published, each with its `beat` for the signature.
    Publish {
        topic: String,
        body: Body,
        raw: Option<Bytes>,
        beat: Option<u64>,
    },
    /// Hand to the file desk (result file I/O, off the loop).
    File(crate::server::store::files::FileJob),
    /// Hand to the notification sender: one attempt (after the commit
    /// that made or last changed its delivery).
    Notify(crate::notify::outbox::Job),
    /// Hand to the history reader (after the turn's commit, so it reads
    /// what this turn wrote); answered with [`Scheduler::on_recalled`].
    Recall(crate::server::store::history::RecallJob),
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
    /// Queued tasks per routing key, in fair-share order.
    queues: BTreeMap<String, fairshare::FairQueue>,
    /// The unfinished health check of each worker that has one.
    checks: BTreeMap<String, TaskId>,
    /// Recent task durations (ms) per routing key, for the estimate of
    /// when a queued task starts.
    durations: HashMap<String, VecDeque<u64>>,
    /// The notification outbox (its rows commit with the events).
    notifier: crate::notify::outbox::Notifier,
    /// The health deadline on the heap per worker (Unix ms), at most one.
    health_armed: HashMap<String, u64>,
    next_order: u64,
    next_run: u64,
    /// Sequence numbers of the server's non-mandatory messages (for logs
    /// and debugging; mandatory ones are numbered by each worker's outbox).
    next_seq: u64,
    last_tick: Option<Instant>,
    /// Maps the monotonic clock to Unix milliseconds, for dispatch expiry.
    wall_base: (Instant, u64),
    /// Numbers the broadcasts (heartbeats, shutdown) this incarnation
    /// publishes; signed with them under security (PROTOCOL.md §15.4).
    beats: crate::security::broadcast::Beats,
    counters: BTreeMap<String, u64>,
    out: Vec<Output>,
    /// Bytes of raw frames (log and file data) in `out`: the shell stops
    /// taking more requests into a batch past a budget, so a burst of
    /// data requests cannot pile up replies in memory before they are sent.
    out_raw_bytes: usize,
    /// Tasks and runs that may have changed since the last commit: the
    /// unfinished ones, and those that finished since.
    active_tasks: BTreeSet<TaskId>,
    active_runs: BTreeSet<RunId>,
    /// Encoded rows as last committed, to write only what changed.
    persisted: HashMap<String, Vec<u8>>,
    persisted_next_run: u64,
    /// What the next commit writes: every change since the last one.
    pending: pending::Pending,
    /// Ready workers (idle, connected, asked for work) under each routing
    /// key they match, longest waiting first: a new task finds its worker
    /// without looking at the rest of the fleet.
    ready: HashMap<String, BTreeSet<(Instant, String)>>,
    /// Registered workers (any state) per routing key: whether a testrun
    /// can ever run, answered with one lookup.
    known: BTreeMap<String, usize>,
    /// Liveness and task deadlines, soonest first: a tick looks only at
    /// what is due.
    deadlines: std::collections::BinaryHeap<std::cmp::Reverse<(Instant, timers::Due)>>,
    /// Workers with messages in their outbox (resent from the tick).
    outboxes: BTreeSet<String>,
    /// Workers with a liveness deadline on the heap.
    armed: HashSet<String>,
    /// Log lines about peers' bad messages, limited (counters count all).
    noise: crate::logging::Throttle,
    /// The latest time an input brought (for inputs that carry none).
    latest: Instant,
    /// Who each secured connection is (security on only).
    callers: HashMap<PeerId, access::Caller>,
    /// Who follows which testrun.
    followers: followers::Followers,
    /// Workers an operator drained: no new tasks for them.
    drained: BTreeSet<String>,
    /// Credit all uploads hold (`limits.file_buffer_bytes` at most).
    upload_credit: u64,
    /// Uploads waiting for credit from the pool, oldest first.
    starved: VecDeque<crate::server::store::files::UploadKey>,
    /// Input files in transfer from clients, by SHA-256.
    /// Input uploads in progress, per user and content.
    input_uploads: HashMap<crate::server::store::files::UploadKey, inputs::InputUpload>,
    /// Who uploaded each stored input (PROTOCOL.md §7.7): a submit names
    /// only inputs its user uploaded.
    input_owners: HashMap<String, BTreeSet<String>>,
    /// Input files stored, by SHA-256, with their sizes.
    stored_inputs: HashMap<String, u64>,
    /// The software version each registered worker said it runs.
    versions: HashMap<String, String>,
    /// Unfinished tasks and testruns per owner (security on), kept as
    /// `active_tasks`/`active_runs` are: for the per-owner quotas.
    open_by_owner: HashMap<String, (usize, usize)>,
    /// Workers removed from the registry in this incarnation, by name:
    /// their numbering continues if their key comes back.
    departed: HashMap<String, access::Departed>,
    /// The devices each worker's key may serve, as `workers` shows them
    /// (security on): its pin, or the device of its first registration.
    pins: HashMap<String, String>,
    /// What each worker last said about its device's console.
    consoles: HashMap<String, String>,
    /// Bytes of stored result files, and of files in transfer (as offered).
    stored_bytes: u64,
    uploading_bytes: u64,
    /// Client file reads handed to the desk and not answered yet.
    reads_in_flight: usize,
    /// `find_in_log`s on the desk, by asker (peer, request) → user.
    finds: HashMap<(PeerId, u64), String>,
    /// Ended testruns whose files and logs are still kept, oldest first,
    /// and their bytes: the retention policy looks only at the front.
    retained: retention::Retained,
    /// `web_login` requests for the shell to answer, since it last took
    /// them (each loop turn: at most a batch's worth).
    web_logins: Vec<WebLoginAsk>,
    /// Leases waiting or held, their consoles and power actions.
    leases: leases::Leases,
    /// Tasks pinned to a worker (a testrun on its lease, the lease's
    /// hold after it), in order: it takes them before anything queued.
    pinned: BTreeMap<String, VecDeque<TaskId>>,
    /// Which ended testruns are held, and the reads of the others.
    recall: recall::Recollection,
    /// Known-issue rules; what triage needs.
    results: triage::Results,
    /// The lab's usage series, until the next commit takes its rows.
    usage: crate::server::usage::Usage,
}

/// A connection asked for a dashboard sign-in link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebLoginAsk {
    pub peer: PeerId,
    pub request: u64,
    /// Who it authenticated as; none without security.
    pub identity: Option<crate::security::Identity>,
}

pub use crate::protocol::limits::unix_ms_now;

impl<S: Store> Scheduler<S> {
    /// A scheduler with no state, starting at `now`, which is `unix_ms`
    /// on the wall clock: the core reads no clock; every input brings its
    /// time.
    pub fn new(
        cfg: SchedulerConfig,
        store: S,
        incarnation: String,
        now: Instant,
        unix_ms: u64,
    ) -> Self {
        let heartbeat = cfg.heartbeat;
        let notifier = crate::notify::outbox::Notifier::new(cfg.notify.clone());
        let results = triage::Results::new(&cfg.results.known);
        let usage_flush_ms = cfg.results.usage_flush_ms;
        Scheduler {
            cfg,
            store,
            incarnation,
            workers: BTreeMap::new(),
            peers: HashMap::new(),
            runs: BTreeMap::new(),
            tasks: HashMap::new(),
            queues: BTreeMap::new(),
            checks: BTreeMap::new(),
            durations: HashMap::new(),
            notifier,
            health_armed: HashMap::new(),
            next_order: 0,
            next_run: 1,
            next_seq: 1,
            last_tick: None,
            wall_base: (now, unix_ms),
            beats: crate::security::broadcast::Beats::new(now, heartbeat),
            counters: BTreeMap::new(),
            out: Vec::new(),
            out_raw_bytes: 0,
            active_tasks: BTreeSet::new(),
            active_runs: BTreeSet::new(),
            persisted: HashMap::new(),
            persisted_next_run: 0,
            pending: pending::Pending::new(now),
            ready: HashMap::new(),
            known: BTreeMap::new(),
            deadlines: std::collections::BinaryHeap::new(),
            outboxes: BTreeSet::new(),
            armed: HashSet::new(),
            noise: crate::logging::Throttle::new(Duration::from_secs(10), 20),
            latest: now,
            callers: HashMap::new(),
            web_logins: Vec::new(),
            followers: followers::Followers::default(),
            drained: BTreeSet::new(),
            upload_credit: 0,
            starved: VecDeque::new(),
            input_uploads: HashMap::new(),
            input_owners: HashMap::new(),
            stored_inputs: HashMap::new(),
            versions: HashMap::new(),
            open_by_owner: HashMap::new(),
            departed: HashMap::new(),
            pins: HashMap::new(),
            consoles: HashMap::new(),
            stored_bytes: 0,
            uploading_bytes: 0,
            reads_in_flight: 0,
            finds: HashMap::new(),
            retained: retention::Retained::default(),
            leases: leases::Leases::default(),
            pinned: BTreeMap::new(),
            recall: recall::Recollection::default(),
            results,
            usage: crate::server::usage::Usage::with_flush(usage_flush_ms),
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
        self.out_raw_bytes = 0;
        let mut out = std::mem::take(&mut self.out);
        self.stamp_epoch(&mut out);
        out
    }

    /// Everything a leader sends carries its lease's epoch: a worker
    /// ignores commands from an older one (PROTOCOL.md §13.1).
    fn stamp_epoch(&self, out: &mut [Output]) {
        if let Some(epoch) = self.cfg.epoch {
            for o in out {
                if let Output::Send { header, .. } = o {
                    header.epoch = Some(epoch);
                }
            }
        }
    }

    /// The pongs among the outputs not yet taken, taken out of them (the
    /// rest keep their order). A pong acknowledges nothing durable, so the
    /// loop sends it before the turn's commit: a ping measures the loop,
    /// not a disk busy writing back a large file (whose fsyncs could hold
    /// a pong 50–150 ms).
    pub fn take_pongs(&mut self) -> Vec<Output> {
        let is_pong = |o: &Output| {
            matches!(
                o,
                Output::Send {
                    body: Body::Pong { .. },
                    ..
                }
            )
        };
        if !self.out.iter().any(is_pong) {
            return Vec::new();
        }
        let (mut pongs, rest): (Vec<Output>, Vec<Output>) =
            std::mem::take(&mut self.out).into_iter().partition(is_pong);
        self.out = rest;
        self.stamp_epoch(&mut pongs);
        pongs
    }

    /// Bytes of log and file data in the outputs not yet taken.
    pub fn pending_output_bytes(&self) -> usize {
        self.out_raw_bytes
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
        let mut h = Header::best_effort(body.class(), task);
        h.seq = self.next_seq;
        self.next_seq += 1;
        self.out_raw_bytes += raw.as_ref().map_or(0, |r| r.len());
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
        if let Some(env) = self.recall_first(now, peer, env) {
            self.handle_message(now, peer, env);
        }
    }

    /// A message whose testruns are in memory (or not stored at all).
    fn handle_message(&mut self, now: Instant, peer: &PeerId, env: Envelope) {
        let Envelope { header, body, raw } = env;
        if !self.authorize(now, peer, &body) {
            return;
        }
        if let Some(request) = body.request() {
            self.on_client_request(now, peer, request, body, raw);
            return;
        }
        if let Body::Hello { .. } = body {
            self.on_hello_message(now, peer, body);
            return;
        }
        let Some(name) = self.heard_from(now, peer, &body) else {
            return;
        };
        if header.mandatory {
            self.on_mandatory(now, peer, &name, &header, body, raw);
        } else {
            self.on_worker_message(now, peer, &name, body, raw);
        }
    }

    /// A `hello`: registration, and the version the worker says it runs.
    fn on_hello_message(&mut self, now: Instant, peer: &PeerId, body: Body) {
        let Body::Hello {
            worker,
            session,
            device,
            running,
            version,
        } = body
        else {
            return;
        };
        let name = worker.clone();
        self.on_hello(now, peer, worker, session, device, running);
        if self.peers.get(peer) == Some(&name) {
            match version {
                Some(v) => self.versions.insert(name, v),
                None => self.versions.remove(&name),
            };
        }
    }

    /// The registered worker this connection is (none: told to register
    /// first); it was heard now, and a lost one is alive again.
    fn heard_from(&mut self, now: Instant, peer: &PeerId, body: &Body) -> Option<String> {
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
            return None;
        };
        self.pending.workers.insert(name.clone());
        let worker = self.workers.get_mut(&name).expect("peer maps to a worker");
        worker.last_heard = now;
        // A lost worker that speaks again is alive again (a partition
        // healed). A stopped one said bye: only a new hello brings it back,
        // not what it still sends while it closes.
        if worker.state == WorkerState::Lost {
            worker.state = if worker.task.is_some() {
                WorkerState::Busy
            } else {
                WorkerState::Idle
            };
            // Alive again on the same connection: its liveness counts anew.
            self.schedule_worker(&name);
        }
        Some(name)
    }

    /// A mandatory message from a worker: applied once, acknowledged every
    /// time (the ack before anything it causes).
    fn on_mandatory(
        &mut self,
        now: Instant,
        peer: &PeerId,
        name: &str,
        header: &Header,
        body: Body,
        raw: Option<Bytes>,
    ) {
        let name = name.to_string();
        let worker = self.workers.get_mut(&name).expect("peer maps to a worker");
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
        if self.apply_mandatory(now, &name, body, raw) {
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
    }

    /// A best-effort message from a worker.
    fn on_worker_message(
        &mut self,
        now: Instant,
        peer: &PeerId,
        name: &str,
        body: Body,
        raw: Option<Bytes>,
    ) {
        let name = name.to_string();
        match body {
            Body::Heartbeat => {}
            Body::Bye { reason } => self.worker_stopped(now, &name, &reason),
            Body::ConsoleStatus { status } => {
                // Bounded: one entry per registered worker name.
                self.consoles.insert(name.clone(), status);
            }
            Body::Ack { seq } => {
                let worker = self.workers.get_mut(&name).expect("worker");
                if worker.outbox.ack(seq) {
                    self.console_input_acked(&name, seq);
                }
            }
            Body::Ready => {
                let worker = self.workers.get_mut(&name).expect("worker");
                if worker.task.is_none() {
                    worker.state = WorkerState::Idle;
                    self.set_ready(now, &name);
                    self.try_dispatch_worker(now, &name);
                }
            }
            Body::Log {
                task,
                attempt,
                lines,
            } => self.on_log(&name, task, attempt, lines),
            Body::ConsoleData {
                task,
                attempt,
                offset,
            } => self.on_console_data(now, &name, task, attempt, offset, raw),
            Body::LogPacked {
                task,
                attempt,
                parts,
            } => self.on_log_packed(&name, task, attempt, parts, raw),
            body @ (Body::FileOffer { .. } | Body::FileChunk { .. } | Body::FileEnd { .. }) => {
                self.on_file_message(now, &name, body, raw);
            }
            // Sent under the guarantee-nothing policy: applied, never acked.
            body @ (Body::TaskAccepted { .. }
            | Body::TaskRefused { .. }
            | Body::TaskFinished { .. }) => {
                self.apply_mandatory(now, &name, body, None);
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
}

mod access;
mod dispatch;
mod endings;
mod followers;
mod health;
mod inputs;
mod intake;
mod leases;
mod model;
mod notify;
mod pending;
mod persist;
mod recall;
mod registry;
mod requests;
pub(super) mod retention;
mod settings;
mod timers;
mod triage;
mod uploads;
mod usage;
mod views;
pub use access::Caller;
pub use followers::MAX_FOLLOWERS_PER_RUN;
pub use health::CHECK_OWNER;
pub use model::RECENT_KEPT;
use model::{Task, Testrun, Worker};
pub use persist::RestoreError;
pub use settings::{HistoryRules, ResultsRules, SchedulerConfig, SchedulerLimits};
#[cfg(test)]
mod tests;
