//! The tokio shell of `ots-worker`: owns the sockets, reconnects them with
//! randomized exponential backoff (`backon`) for as long as it runs, runs
//! conductors, and moves messages between all of these and the
//! [`Session`] state machine.

use crate::protocol::Body;
use crate::protocol::ErrorCode;
use crate::protocol::{self, Outcome, Stream, TaskId, TaskSpec};
use crate::security::broadcast::{BroadcastError, Listener};
use crate::security::link::{self, LinkError};
use crate::security::{Channel, Credentials};
use crate::transport::{self, to_message, TransportError};
use crate::worker::channel::{LogBudget, ResponseChannel, ResultFile, TaskEvent};
use crate::worker::conductor::{self, Stop, TaskContext};
use crate::worker::config::WorkerConfig;
use crate::worker::session::{Action, Arrival, Link, LostReason, Session, SessionConfig};
use crate::worker::state::WorkerStore;
use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use bytes::Bytes;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};
use zeromq::prelude::*;
use zeromq::{DealerSendHalf, DealerSocket, SubSocket, ZmqMessage};

/// Why the worker could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Config(#[from] crate::settings::ConfigError),
    #[error("state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    State(#[from] crate::worker::state::WorkerStateError),
    #[error("worker name {name:?} refused by the server: {message}")]
    NameInUse { name: String, message: String },
    #[error("the server does not allow this worker's key to register as {name:?} with its device: {message}; the key's name in the server's workers.d must match `name`, and its device the pin there (NAME.device, or its first registration)")]
    Forbidden { name: String, message: String },
    #[error("security: {0}")]
    Security(#[from] crate::security::SecurityError),
    /// The session could not be saved: the worker stops so that nothing
    /// is acknowledged that is not durable (ots-worker exits 74).
    #[error("storage error: cannot save the worker's state: {0}; stopping so that nothing is acknowledged that is not durable (free space or fix the state directory's disk, then restart)")]
    Save(crate::worker::state::WorkerStateError),
}

fn arrival() -> Arrival {
    Arrival {
        at: Instant::now(),
        wall_ms: crate::protocol::limits::unix_ms_now(),
    }
}

/// Messages from the server waiting for the loop, at most.
const INBOUND_QUEUE: usize = 1024;
/// Task events handled per loop turn at most (one state save each turn).
const MAX_EVENTS_PER_TURN: usize = 1024;

enum Inbound {
    Frames {
        generation: u64,
        from_sub: bool,
        msg: ZmqMessage,
        /// When the frames came off the socket: dispatch expiry counts
        /// from here, not from when the loop got to them.
        received: Arrival,
    },
    Closed {
        generation: u64,
        error: String,
    },
}

struct Connection {
    dealer: DealerSendHalf,
    readers: Vec<JoinHandle<()>>,
    /// The sealed channel to the server (security on).
    channel: Option<Channel>,
    /// Checks the signed broadcasts on the events port (security on),
    /// from the key and beat this connection's welcome named.
    listener: Option<Listener>,
}

/// What a received message is, once opened.
enum Opened {
    /// Authentic (or plaintext without security): decode it.
    Frames(Vec<Bytes>),
    /// A control message that does not authenticate: the connection
    /// cannot be trusted (reconnect).
    Unauthentic(String),
    /// A broadcast that is not a sign of this server's life: ignored.
    Refused(BroadcastError),
}

impl Connection {
    fn open(&mut self, now: Instant, from_sub: bool, mut frames: Vec<Bytes>) -> Opened {
        match (from_sub, self.channel.as_mut()) {
            (false, Some(channel)) => match channel.open(frames) {
                Ok(f) => Opened::Frames(f),
                Err(e) => Opened::Unauthentic(e.to_string()),
            },
            (false, None) => Opened::Frames(frames),
            // With security, only what the welcomed server signed.
            (true, Some(_)) => match self.listener.as_mut() {
                None => Opened::Refused(BroadcastError::NoKey),
                Some(l) => match l.open(now, frames) {
                    Ok(f) => Opened::Frames(f),
                    Err(e) => Opened::Refused(e),
                },
            },
            (true, None) => {
                if !frames.is_empty() {
                    frames.remove(0); // topic
                }
                Opened::Frames(frames)
            }
        }
    }

    /// A welcome on the control connection names the key and beat its
    /// server signs broadcasts with.
    fn welcomed(&mut self, now: Instant, body: &Body) {
        if self.channel.is_some() {
            if let Some(listener) = Listener::from_welcome(body, now) {
                self.listener = Some(listener);
            }
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        for r in &self.readers {
            r.abort();
        }
    }
}

/// A connection being made: the DEALER, with security its channel, and
/// without security the SUB for heartbeats.
type Connecting = JoinHandle<Result<Connected, ConnectError>>;

struct Connected {
    dealer: DealerSocket,
    channel: Option<Channel>,
    sub: Option<SubSocket>,
}

#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Link(#[from] LinkError),
}

/// Connects to the server: the DEALER (with security, and its Noise
/// handshake) and the SUB for heartbeats (signed with security).
async fn connect(
    server: String,
    events: String,
    credentials: Credentials,
    timeout: Duration,
) -> Result<Connected, ConnectError> {
    let mut dealer = transport::connect_dealer(&server, timeout).await?;
    match &credentials {
        Credentials::Noise { key, server } => {
            let (channel, _) = link::handshake(&mut dealer, key, server, timeout).await?;
            let sub = transport::connect_sub(&events, &["hb"], timeout).await?;
            Ok(Connected {
                dealer,
                channel: Some(channel),
                sub: Some(sub),
            })
        }
        Credentials::None => {
            let sub = transport::connect_sub(&events, &["hb"], timeout).await?;
            Ok(Connected {
                dealer,
                channel: None,
                sub: Some(sub),
            })
        }
    }
}

fn reconnect_backoff(cfg: &WorkerConfig) -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(cfg.reconnect_min_ms))
        .with_max_delay(Duration::from_millis(cfg.reconnect_max_ms))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// How long to wait before trying the next server after `attempts`
/// failed ones in this outage: at once within a round of the list, with
/// backoff after each whole round.
fn next_server_delay(
    attempts: u32,
    servers: usize,
    backoff: &mut ExponentialBackoff,
    cfg: &WorkerConfig,
) -> Duration {
    if !(attempts as usize).is_multiple_of(servers) {
        Duration::ZERO
    } else {
        backoff
            .next()
            .unwrap_or(Duration::from_millis(cfg.reconnect_max_ms))
    }
}

/// Runs a worker until `shutdown` says stop: 1 = gracefully, by
/// `stop_policy` (no new task; the running one finished or stopped,
/// delivered, then `bye`), 2 = at once.
pub async fn run(
    cfg: WorkerConfig,
    mut shutdown: watch::Receiver<crate::shutdown::Stop>,
) -> Result<(), WorkerError> {
    cfg.validate()?;
    let device = cfg.device_props()?;
    let credentials = cfg.credentials()?;
    for warning in cfg.secret_argv_warnings() {
        warn!("{warning}");
    }
    if let Credentials::Noise { key, .. } = &credentials {
        info!(key = %key.public, "security on: this worker's public key (the server needs it in workers.d/{}.pub)", cfg.name);
    } else {
        warn!("security = \"none\": the server is not authenticated and nothing is encrypted; use this in a closed lab only");
    }
    let tasks_dir = cfg.state_dir.join("tasks");
    std::fs::create_dir_all(&tasks_dir).map_err(|source| WorkerError::StateDir {
        path: tasks_dir.clone(),
        source,
    })?;
    let (mut store, saved) = WorkerStore::open(&cfg.state_dir)?;
    let now = Instant::now();
    let session_cfg = SessionConfig {
        heartbeat: cfg.heartbeat(),
        liveness: cfg.liveness,
        log_buffer_lines: cfg.log_buffer_lines,
        log_buffer_bytes: cfg.log_buffer_bytes,
        log_batch_lines: cfg.log_batch_lines,
        log_batch_delay: Duration::from_millis(cfg.log_batch_ms),
        retry: cfg.retry.clone(),
        delivery: cfg.delivery.clone(),
        on_server_lost: cfg.on_server_lost,
        file_chunk_bytes: cfg.file_chunk_bytes,
        file_window_bytes: cfg.file_window_bytes,
    };
    let (task_tx, mut task_rx) = mpsc::unbounded_channel::<TaskEvent>();
    // Bounds the log bytes between the conductors and the session: the
    // channel above holds at most this much log text, whatever the
    // conductor's rate (lines over it are dropped and counted).
    let log_budget = LogBudget::new(cfg.log_buffer_bytes);
    let mut session = match saved {
        Some(saved) => {
            let pending = saved.outbox.len();
            let (session, interrupted) =
                Session::restore(session_cfg, cfg.name.clone(), device.clone(), now, saved);
            info!(
                pending,
                "continuing the saved session: unacknowledged messages will be delivered"
            );
            if let Some((task, attempt)) = interrupted {
                let dir = attempt_dir(&cfg, &task, attempt);
                if conductor::kill_leftover(&dir.join("conductor.pgid")) {
                    warn!(task = %task, "killed the conductor the previous worker process left running");
                }
                warn!(task = %task, attempt, "the worker restarted while this task ran: reporting it as interrupted");
                let _ = task_tx.send(TaskEvent::Finished {
                    task,
                    attempt,
                    outcome: Outcome {
                        interrupted: true,
                        failure: Some(
                            "interrupted: the worker restarted while the conductor ran".into(),
                        ),
                        ..Outcome::default()
                    },
                    log_lines: 0,
                    files: Vec::new(),
                });
            }
            session
        }
        None => Session::new(
            session_cfg,
            cfg.name.clone(),
            format!("{:016x}", rand::random::<u64>()),
            device.clone(),
            now,
        ),
    };
    let session_id = session.saved().session_id;
    store.save(&session.saved())?;
    info!(worker = %cfg.name, device = %device, server = %cfg.server, session = %session_id, "worker starting");

    // Bounded: a server (or an impostor) flooding us is read at the pace
    // the loop handles, never buffered without limit.
    let (inbound_tx, mut inbound_rx) = mpsc::channel::<Inbound>(INBOUND_QUEUE);
    // Conductors in flight: how to stop each, and its runner to wait for.
    let mut running: HashMap<TaskId, (watch::Sender<Stop>, JoinHandle<()>)> = HashMap::new();
    // Benchmark hook: behave as a worker that does not know `log_full`
    // (`cargo bench --bench flood` measures the server against both).
    let ignore_log_full = std::env::var_os("OTS_TEST_IGNORE_LOG_FULL").is_some();
    // Per running task: set when the server says its log is full.
    let mut log_full: HashMap<TaskId, crate::worker::channel::LogFull> = HashMap::new();
    let mut conn: Option<Connection> = None;
    let mut connecting: Option<Connecting> = None;
    let mut generation = 0u64;
    let mut backoff = reconnect_backoff(&cfg);
    let mut retry_at = Some(now);
    let mut outage: Option<(Instant, u32)> = None;
    // The servers that may lead, tried in turn: the one that answered
    // is kept; a failed connect moves to the next at once, and only a
    // whole round of failures waits for the backoff.
    let servers = crate::settings::endpoint_pairs(&cfg.server, &cfg.events)?;
    let mut current = 0usize;
    let mut ticker = tokio::time::interval(Duration::from_millis(cfg.log_batch_ms.clamp(5, 100)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let send_timeout = Duration::from_millis(cfg.connect_timeout_ms);

    let (read_tx, mut read_rx) = crate::worker::reader::spawn(&cfg.state_dir);
    // The device's console, read from now on (boot output included).
    let console = if cfg.serial.port.is_empty() {
        None
    } else {
        match crate::worker::console::Console::start(&cfg.serial, &cfg.state_dir) {
            Ok(c) => Some(c),
            Err(e) => {
                return Err(WorkerError::StateDir {
                    path: cfg.state_dir.join("console"),
                    source: e,
                })
            }
        }
    };
    // State restored: ready. Pings come from this loop.
    let mut supervisor = crate::supervision::Supervisor::new();
    supervisor.ready(&session.status_line());
    // Folders of tasks whose results were delivered, oldest first; kept
    // up to `keep_task_dirs` for debugging, then removed (off the loop).
    let mut finished_dirs: std::collections::VecDeque<PathBuf> = std::collections::VecDeque::new();
    let mut console_told: Option<String> = None;
    // Set on the first stop request: when to give up waiting for the
    // running task (then: stop it), and when to leave regardless.
    let mut stop_deadline: Option<(Instant, bool)> = None;
    // When a bye went out: the time by which its ack must come.
    let mut bye_sent: Option<Instant> = None;
    let mut refused: Option<(ErrorCode, String)> = None;
    // A rogue server cannot flood the worker's log either.
    let mut noise = crate::logging::Throttle::new(Duration::from_secs(10), 20);
    while refused.is_none() {
        let was_up = matches!(session.link(), Link::Up { .. });
        let mut report_saved: Option<TaskId> = None;
        let actions = tokio::select! {
            Some(event) = task_rx.recv() => {
                // Take what else is waiting too (bounded): one state save
                // for the batch, however fast the conductor prints.
                let mut actions = Vec::new();
                let mut next = Some(event);
                let mut taken = 0;
                while let Some(event) = next.take() {
                    match &event {
                        TaskEvent::Finished { task, .. } => report_saved = Some(task.clone()),
                        TaskEvent::Log { text, .. } => log_budget.buffered(crate::worker::channel::charge(text)),
                    }
                    actions.extend(session.on_task_event(Instant::now(), event));
                    taken += 1;
                    if taken < MAX_EVENTS_PER_TURN {
                        next = task_rx.try_recv().ok();
                    }
                }
                actions
            }
            Some(inbound) = inbound_rx.recv() => match inbound {
                Inbound::Frames { generation: g, from_sub, msg, received } if g == generation => {
                    let now = Instant::now();
                    let opened = match conn.as_mut() {
                        Some(c) => c.open(now, from_sub, msg.into_vec()),
                        None => Opened::Refused(BroadcastError::NoKey),
                    };
                    match opened {
                        Opened::Unauthentic(e) => {
                            // Tampered with, replayed or not from the server
                            // we pinned: this connection cannot be trusted.
                            session.stats.server_errors += 1;
                            warn!(error = %e, "a message on the control connection does not authenticate; reconnecting");
                            vec![Action::Reconnect(LostReason::ConnectionClosed(format!("unauthentic message: {e}")))]
                        }
                        Opened::Refused(e) => {
                            // Not a sign of life: a forgery, a replay, or
                            // a broadcast held back on the way.
                            session.stats.broadcasts_refused += 1;
                            if matches!(e, BroadcastError::Forged | BroadcastError::Shape(_)) && noise.allow(now, "refused broadcasts") {
                                warn!(error = %e, "a broadcast on the events port is not from the server that welcomed us");
                            } else {
                                debug!(error = %e, "broadcast ignored");
                            }
                            Vec::new()
                        }
                        Opened::Frames(frames) => match protocol::decode(frames) {
                        Ok(env) => {
                            if !from_sub {
                                if let Some(c) = conn.as_mut() {
                                    c.welcomed(now, &env.body);
                                }
                            }
                            if ignore_log_full && matches!(env.body, Body::LogFull { .. }) {
                                Vec::new()
                            } else {
                                session.on_message(now, received, env)
                            }
                        }
                        Err(e) => {
                            session.stats.server_errors += 1;
                            if noise.allow(Instant::now(), "protocol errors") {
                                warn!(error = %e, from_sub, "protocol error: refused a message from the server (a rogue or newer server?); ignored");
                            }
                            Vec::new()
                        }
                        },
                    }
                }
                Inbound::Frames { .. } => Vec::new(),
                Inbound::Closed { generation: g, error } if g == generation => {
                    vec![Action::Reconnect(LostReason::ConnectionClosed(error))]
                }
                _ => Vec::new(), // from an older connection
            },
            // The socket refused a chunk: go on a moment later (its queue
            // drains into TCP within microseconds unless the server lags).
            _ = tokio::time::sleep(Duration::from_millis(1)), if session.upload_paused() => {
                session.unpause_upload(Instant::now())
            }
            Some(done) = read_rx.recv() => {
                let mut actions = session.on_read_done(Instant::now(), done);
                while let Ok(done) = read_rx.try_recv() {
                    actions.extend(session.on_read_done(Instant::now(), done));
                }
                actions
            }
            _ = ticker.tick() => {
                let now = Instant::now();
                if conn.is_none() && connecting.is_none() && retry_at.is_some_and(|t| now >= t) {
                    retry_at = None;
                    let timeout = Duration::from_millis(cfg.connect_timeout_ms);
                    let (server, events) = servers[current].clone();
                    connecting = Some(tokio::spawn(connect(
                        server,
                        events,
                        credentials.clone(),
                        timeout,
                    )));
                }
                let mut actions = session.on_tick(now);
                // The console's state, told after each registration and
                // whenever it changes (shown by `ots-submit workers`).
                if let Some(c) = &console {
                    if matches!(session.link(), Link::Up { .. }) {
                        let status = match c.available() {
                            Ok(()) => "ok".to_string(),
                            Err(why) => format!("unavailable: {why}"),
                        };
                        if console_told.as_deref() != Some(status.as_str()) {
                            actions.extend(session.console_status(now, &status));
                            console_told = Some(status);
                        }
                    } else {
                        console_told = None;
                    }
                }
                actions
            }
            result = async { connecting.as_mut().expect("guarded").await }, if connecting.is_some() => {
                connecting = None;
                match result {
                    Ok(Ok(Connected { dealer, channel, sub })) => {
                        generation += 1;
                        conn = Some(attach(generation, dealer, channel, sub, inbound_tx.clone()));
                        debug!(generation, "connected; registering");
                        session.on_connected(Instant::now())
                    }
                    Ok(Err(e)) => {
                        let (_, attempts) = outage.get_or_insert((Instant::now(), 0));
                        *attempts += 1;
                        if let ConnectError::Link(LinkError::Refused(_) | LinkError::Handshake(_)) = &e {
                            // Not a network problem: say so loudly, once per
                            // outage (the operator may be adding the key).
                            if *attempts == 1 {
                                error!(error = %e, key = %cfg.key_path().display(), "the server refused this worker's handshake; retrying with backoff until its key is allowed");
                            }
                        }
                        let failed = &servers[current].0;
                        current = (current + 1) % servers.len();
                        let delay = next_server_delay(*attempts, servers.len(), &mut backoff, &cfg);
                        debug!(error = %e, server = %failed, attempt = *attempts, next = %servers[current].0, retry_in_ms = delay.as_millis() as u64, "connect failed");
                        retry_at = Some(Instant::now() + delay);
                        Vec::new()
                    }
                    Err(join) => {
                        warn!(error = %join, "connect task failed");
                        retry_at = Some(Instant::now() + Duration::from_millis(cfg.reconnect_max_ms));
                        Vec::new()
                    }
                }
            }
            _ = shutdown.changed() => {
                let requested = *shutdown.borrow();
                match requested {
                    crate::shutdown::Stop::Run => Vec::new(),
                    crate::shutdown::Stop::Gracefully if stop_deadline.is_none() => {
                        let abort = cfg.stop_policy == crate::worker::config::StopPolicy::Abort;
                        info!(policy = ?cfg.stop_policy, timeout_ms = cfg.stop_timeout_ms, "stop requested: taking no new task; finishing and delivering what runs (a second SIGTERM stops at once)");
                        stop_deadline = Some((Instant::now() + Duration::from_millis(cfg.stop_timeout_ms), abort));
                        supervisor.stopping("stopping: finishing and delivering the running task");
                        session.begin_stop(abort)
                    }
                    crate::shutdown::Stop::Gracefully => Vec::new(),
                    crate::shutdown::Stop::Now => {
                        if stop_deadline.is_some() {
                            warn!("stop requested again: stopping at once");
                        } else {
                            info!("stop requested: stopping at once");
                        }
                        break;
                    }
                }
            }
        };
        // What the actions are about to announce (acks, accepted tasks) is
        // on disk first.
        store.save(&session.saved()).map_err(WorkerError::Save)?;
        if let Some(task) = report_saved {
            info!(task = %task, "final report saved; it will be delivered even if this worker restarts");
        }
        let mut queue: std::collections::VecDeque<Action> = actions.into();
        // Log batches the socket would not take this turn, in order: they
        // go back to the session (back-pressure, not loss).
        let mut unsent_logs: Vec<(protocol::Body, Option<bytes::Bytes>)> = Vec::new();
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Send {
                    body: body @ protocol::Body::LogPacked { .. },
                    raw,
                    header,
                } if !unsent_logs.is_empty() && !header.mandatory => {
                    unsent_logs.push((body, raw));
                }
                // Nor does a final report overtake the lines held back.
                Action::Send {
                    header,
                    body: protocol::Body::TaskFinished { .. },
                    ..
                } if !unsent_logs.is_empty() && header.mandatory => {
                    session.unsend(header.seq);
                }
                Action::Send { header, body, raw } => {
                    let Some(c) = conn.as_mut() else { continue };
                    let raw_len = raw.as_ref().map_or(0, |r| r.len() as u64);
                    let kept_raw = matches!(body, protocol::Body::LogPacked { .. })
                        .then(|| raw.clone())
                        .flatten();
                    let mut frames = protocol::encode(&header, &body, raw);
                    if let Some(channel) = c.channel.as_mut() {
                        frames = channel.seal(&frames);
                    }
                    let msg = to_message(frames);
                    let mandatory = header.mandatory;
                    match transport::send_bounded(&mut c.dealer, msg, send_timeout).await {
                        Ok(()) => {}
                        // The server reads slower than we produce: a
                        // best-effort message is dropped and counted, a
                        // mandatory one stays in the outbox for its resend.
                        Err(TransportError::PeerBusy) => {
                            if let protocol::Body::FileChunk {
                                task,
                                attempt,
                                name,
                                offset,
                            } = &body
                            {
                                // Read again and sent at the next tick.
                                session.chunk_unsent(task, *attempt, name, *offset, raw_len);
                            } else if matches!(body, protocol::Body::LogPacked { .. }) && !mandatory
                            {
                                unsent_logs.push((body, kept_raw));
                            } else if !mandatory {
                                session.note_unsent(&body);
                            }
                        }
                        Err(e) => {
                            queue.clear();
                            queue.push_back(Action::Reconnect(LostReason::SendFailed(
                                e.to_string(),
                            )));
                        }
                    }
                }
                Action::Reconnect(LostReason::NotLeader(said)) => {
                    // A standby (security off: it answered our hello): the
                    // next server of the list, at once, and after a whole
                    // round of them with backoff, as for a failed connect.
                    let (_, attempts) = outage.get_or_insert((Instant::now(), 0));
                    *attempts += 1;
                    let delay = next_server_delay(*attempts, servers.len(), &mut backoff, &cfg);
                    debug!(server = %servers[current].0, said = %said, retry_in_ms = delay.as_millis() as u64, "not the leader; trying the next server");
                    current = (current + 1) % servers.len();
                    conn = None;
                    session.on_disconnected();
                    retry_at = Some(Instant::now() + delay);
                    queue.clear();
                }
                Action::Reconnect(reason) => {
                    if conn.is_some() {
                        warn!(%reason, "server lost; dropping both sockets and reconnecting with backoff");
                        outage = Some((Instant::now(), 0));
                    }
                    conn = None;
                    session.on_disconnected();
                    retry_at = Some(Instant::now());
                    queue.clear();
                }
                Action::StartTask(spec) => {
                    let (stop_tx, stop_rx) = watch::channel(Stop::Running);
                    let task = spec.task.clone();
                    let full = crate::worker::channel::LogFull::default();
                    let runner = tokio::spawn(run_task(
                        cfg.clone(),
                        credentials.clone(),
                        console.clone(),
                        device.clone(),
                        spec,
                        task_tx.clone(),
                        (log_budget.clone(), full.clone()),
                        stop_rx,
                    ));
                    log_full.insert(task.clone(), full);
                    running.insert(task, (stop_tx, runner));
                }
                Action::LogFull(task) => {
                    if let Some(full) = log_full.get(&task) {
                        full.set();
                    }
                }
                Action::StopTask(task) => {
                    if let Some((stop, _)) = running.get(&task) {
                        let _ = stop.send(Stop::Cancel);
                    }
                }
                Action::Refused(code, message) => {
                    refused = Some((code, message));
                    queue.clear();
                }
                Action::ReadChunk(req) => {
                    let _ = read_tx.send(req);
                }
                Action::TaskDone { task, attempt } => {
                    finished_dirs.push_back(attempt_dir(&cfg, &task, attempt));
                    prune_task_dirs(&mut finished_dirs, cfg.keep_task_dirs);
                }
            }
        }
        if !unsent_logs.is_empty() {
            session.requeue_unsent_logs(Instant::now(), unsent_logs);
        }
        log_budget.set_backlog(match session.link() {
            Link::Up { .. } => session.buffered_log_bytes(),
            _ => 0,
        });
        if let Link::Up { server } = session.link() {
            if !was_up {
                match outage.take() {
                    Some((since, attempts)) => info!(
                        server = %server,
                        away_ms = since.elapsed().as_millis() as u64,
                        attempts,
                        "registered with the server again"
                    ),
                    None => info!(server = %server, "registered with the server"),
                }
                backoff = reconnect_backoff(&cfg);
            }
        }
        running.retain(|_, (_, runner)| !runner.is_finished());
        log_full.retain(|task, _| running.contains_key(task));
        supervisor.tick(Instant::now(), || session.status_line());
        if let Some((deadline, escalated)) = stop_deadline {
            if let Some(answer_by) = bye_sent {
                // Closed only once the server recorded the stop (or did
                // not answer in time): a close it saw first would be a loss.
                if session.bye_acknowledged() {
                    info!("said bye to the server");
                    break;
                }
                if Instant::now() >= answer_by {
                    warn!("the server did not acknowledge the bye in time; stopping anyway");
                    break;
                }
            } else if session.stop_complete() {
                let reason = "stopped (SIGTERM) with nothing left to deliver";
                let (actions, sent) = session.bye(Instant::now(), reason);
                if !sent {
                    info!("stopping; the server is unreachable, so no bye");
                    break;
                }
                bye_sent = Some(Instant::now() + session.liveness_window());
                for action in actions {
                    if let (Action::Send { header, body, raw }, Some(c)) = (action, conn.as_mut()) {
                        let mut frames = protocol::encode(&header, &body, raw);
                        if let Some(channel) = c.channel.as_mut() {
                            frames = channel.seal(&frames);
                        }
                        let _ = transport::send_bounded(
                            &mut c.dealer,
                            to_message(frames),
                            send_timeout,
                        )
                        .await;
                    }
                }
                continue;
            }
            if Instant::now() >= deadline {
                if escalated {
                    warn!("stop: what remains could not be delivered in time; it stays in worker.db for the next start");
                    break;
                }
                warn!(
                    timeout_ms = cfg.stop_timeout_ms,
                    "stop: the running task did not end within stop_timeout_ms; stopping it"
                );
                let grace =
                    Duration::from_millis(cfg.conductor.kill_grace_ms) + Duration::from_secs(10);
                stop_deadline = Some((Instant::now() + grace, true));
                for action in session.begin_stop(true) {
                    if let Action::StopTask(task) = action {
                        if let Some((stop, _)) = running.get(&task) {
                            let _ = stop.send(Stop::Cancel);
                        }
                    }
                }
            }
        }
    }
    if let Some((code, message)) = &refused {
        if *code == ErrorCode::Forbidden {
            error!(worker = %cfg.name, %message, "the server refused this worker: its key does not allow this name or device; stopping");
        } else {
            error!(worker = %cfg.name, %message, "the server refused this worker: another live worker uses the name; stopping");
        }
    } else {
        info!(worker = %cfg.name, "worker stopping");
    }
    // A stopping worker leaves nothing behind: each conductor's process
    // group gets TERM, then KILL after the grace period. The interrupted task
    // is re-run elsewhere once the server counts this worker as lost.
    for (task, (stop, runner)) in running {
        warn!(task = %task, "worker stopping: terminating the running conductor");
        let _ = stop.send(Stop::Cancel);
        let limit = Duration::from_millis(cfg.conductor.kill_grace_ms) + Duration::from_secs(5);
        let _ = tokio::time::timeout(limit, runner).await;
    }
    match refused {
        Some((ErrorCode::Forbidden, message)) => Err(WorkerError::Forbidden {
            name: cfg.name.clone(),
            message,
        }),
        Some((_, message)) => Err(WorkerError::NameInUse {
            name: cfg.name.clone(),
            message,
        }),
        None => Ok(()),
    }
}

fn attach(
    generation: u64,
    mut dealer: DealerSocket,
    channel: Option<Channel>,
    sub: Option<SubSocket>,
    tx: mpsc::Sender<Inbound>,
) -> Connection {
    // The socket monitor reports the TCP connection closing at once (a
    // SIGKILLed server, a restart): the worker reconnects without waiting
    // for its next send or for heartbeats to go missing. A hung server
    // keeps its connection open and is still caught by heartbeats.
    let mut events = dealer.monitor();
    let (dealer_tx, mut dealer_rx) = dealer.split();
    // One task reads both, so a close is told after every message the
    // connection delivered (the patched socket reports it when the read
    // half ends): the server's last words (a `shutdown`, an ack) are
    // handled before the worker reconnects.
    let t1 = tx.clone();
    let dealer_reader = tokio::spawn(async move {
        let mut watching = true;
        loop {
            let inbound = tokio::select! {
                biased;
                event = futures::StreamExt::next(&mut events), if watching => match event {
                    Some(zeromq::SocketEvent::Disconnected(_)) => Inbound::Closed {
                        generation,
                        error: "the server closed the control connection".into(),
                    },
                    Some(_) => continue,
                    None => {
                        watching = false;
                        continue;
                    }
                },
                msg = dealer_rx.recv() => match msg {
                    Ok(msg) => Inbound::Frames {
                        generation,
                        from_sub: false,
                        msg,
                        received: arrival(),
                    },
                    Err(e) => Inbound::Closed {
                        generation,
                        error: e.to_string(),
                    },
                },
            };
            let closed = matches!(inbound, Inbound::Closed { .. });
            if t1.send(inbound).await.is_err() || closed {
                return;
            }
        }
    });
    let Some(mut sub) = sub else {
        return Connection {
            dealer: dealer_tx,
            readers: vec![dealer_reader],
            channel,
            listener: None,
        };
    };
    let sub_reader = tokio::spawn(async move {
        loop {
            match sub.recv().await {
                Ok(msg) => {
                    if tx
                        .send(Inbound::Frames {
                            generation,
                            from_sub: true,
                            msg,
                            received: arrival(),
                        })
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx
                        .send(Inbound::Closed {
                            generation,
                            error: e.to_string(),
                        })
                        .await;
                    return;
                }
            }
        }
    });
    Connection {
        dealer: dealer_tx,
        readers: vec![dealer_reader, sub_reader],
        channel,
        listener: None,
    }
}

/// Input files kept in the worker's cache at most (bytes): past it, the
/// files the current task does not use are removed.
const INPUT_CACHE_BYTES: u64 = 4 << 30;

/// Ends the task's channel with `failure`: it could not get as far as
/// the conductor (an infrastructure failure, PROTOCOL.md §7.5).
fn fail_before_conductor(channel: ResponseChannel, failure: String) {
    channel.finish(
        Outcome {
            failure: Some(failure),
            ..Outcome::default()
        },
        Vec::new(),
    );
}

/// Runs the worker's `[recovery] command` before a health check that
/// follows a failure (PROTOCOL.md §5.5): a power cycle, a USB reset. Its
/// output goes into the check's log; it must exit 0 within its timeout,
/// or the check fails saying why.
async fn recover(
    cfg: &WorkerConfig,
    device: &crate::protocol::DeviceProps,
    work_dir: &Path,
    channel: &mut ResponseChannel,
    stop: watch::Receiver<Stop>,
) -> Result<(), String> {
    let r = &cfg.recovery;
    if r.command.is_empty() {
        channel.log(
            Stream::Worker,
            "health check after a failure: this worker has no [recovery] command; checking the device as it is".into(),
        );
        return Ok(());
    }
    let timeout = Duration::from_secs(r.timeout_secs);
    channel.log(
        Stream::Worker,
        format!(
            "recovery: running {:?} (timeout {})",
            r.command,
            humantime::format_duration(timeout)
        ),
    );
    info!(command = ?r.command, "running the recovery command before a health check");
    let (line_tx, mut line_rx) = mpsc::channel(4);
    let run = conductor::Run {
        argv: r.command.clone(),
        work_dir: work_dir.to_path_buf(),
        timeout,
        kill_grace: Duration::from_millis(cfg.conductor.kill_grace_ms),
        env: vec![
            ("OTS_WORKER_NAME".into(), cfg.name.clone()),
            ("OTS_DEVICE".into(), device.to_string()),
        ],
        pgid_file: None,
        masker: conductor::Masker::new(&std::collections::BTreeMap::new()),
        log_full: Default::default(),
    };
    let handle = tokio::spawn(conductor::run(run, line_tx, stop));
    while let Some(packed) = line_rx.recv().await {
        channel.wait_for_room().await;
        channel.log_packed(packed);
    }
    let outcome = handle
        .await
        .map_err(|e| format!("worker bug: recovery runner failed: {e}"))?;
    let failed = match (
        &outcome.failure,
        outcome.timed_out,
        outcome.signal,
        outcome.exit_code,
    ) {
        (Some(f), ..) => Some(format!("cannot run it: {f}")),
        (None, true, ..) => Some(format!(
            "still running after {}, killed",
            humantime::format_duration(timeout)
        )),
        (None, false, Some(sig), _) => Some(format!("killed by signal {sig}")),
        (None, false, None, Some(0)) => None,
        (None, false, None, Some(code)) => Some(format!("exit status {code}")),
        (None, false, None, None) => Some("ended without an exit status".into()),
    };
    match failed {
        None => {
            channel.log(Stream::Worker, "recovery: done (exit 0)".into());
            Ok(())
        }
        Some(why) => Err(format!(
            "device/host failure: the recovery command {:?} ([recovery] command in the worker's configuration) failed: {why}",
            r.command
        )),
    }
}

/// Fetches the task's input files from the server (with this worker's
/// key, over a connection of their own) into the worker's cache, resuming
/// and verifying each, and links them into the task's inputs folder under
/// their names. An error says which file and why: the task then fails
/// before its conductor starts.
async fn fetch_inputs(
    cfg: &WorkerConfig,
    credentials: &Credentials,
    spec: &TaskSpec,
    inputs_dir: &Path,
    channel: &mut ResponseChannel,
) -> Result<(), String> {
    if spec.inputs.is_empty() {
        return Ok(());
    }
    let cache = cfg.state_dir.join("inputs");
    let timeout = Duration::from_millis(cfg.connect_timeout_ms.max(1000) * 5);
    let mut client = crate::client::Client::connect(&cfg.server, timeout, credentials)
        .await
        .map_err(|e| format!("device/host failure: cannot fetch the input files: {e}"))?;
    let total = spec
        .inputs
        .iter()
        .map(|i| i.size)
        .fold(0u64, u64::saturating_add);
    if total > INPUT_CACHE_BYTES {
        return Err(format!(
            "the testrun's input files are {total} bytes, more than this worker's input cache holds ({INPUT_CACHE_BYTES})"
        ));
    }
    for input in &spec.inputs {
        let cached = cache.join(&input.sha256);
        let source = crate::client::transfer::Source::Input {
            sha256: input.sha256.clone(),
        };
        let fetched = client
            .download_to(
                &source,
                input.size,
                &input.sha256,
                &cached,
                &mut crate::client::transfer::Silent,
            )
            .await
            .map_err(|e| format!("input file {} could not be fetched: {e}", input.name))?;
        let rel = crate::protocol::check::relative_path(&input.name)
            .ok_or_else(|| format!("input file name {:?} is not a relative path", input.name))?;
        let target = inputs_dir.join(rel);
        let placed = (|| {
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::hard_link(&cached, &target)
                .or_else(|_| std::fs::copy(&cached, &target).map(|_| ()))
        })();
        placed.map_err(|e| {
            format!(
                "input file {} cannot be placed at {}: {e}",
                input.name,
                target.display()
            )
        })?;
        channel.log(
            Stream::Worker,
            format!(
                "input file {} ({} bytes, {}): {}",
                input.name,
                input.size,
                &input.sha256[..12],
                if fetched > 0 { "fetched" } else { "cached" }
            ),
        );
    }
    prune_input_cache(&cache, &spec.inputs);
    Ok(())
}

/// Keeps the input cache under [`INPUT_CACHE_BYTES`], never removing what
/// the current task uses.
fn prune_input_cache(cache: &Path, keep: &[crate::protocol::InputFile]) {
    let Ok(entries) = std::fs::read_dir(cache) else {
        return;
    };
    let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            Some((m.modified().ok()?, m.len(), e.path()))
        })
        .collect();
    let mut total: u64 = files.iter().map(|f| f.1).sum();
    files.sort();
    for (_, len, path) in files {
        if total <= INPUT_CACHE_BYTES {
            return;
        }
        let used = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| keep.iter().any(|i| i.sha256 == n));
        if !used && std::fs::remove_file(&path).is_ok() {
            total -= len;
        }
    }
}

/// Removes the oldest finished task folders beyond `keep`, on a blocking
/// thread (a results folder can hold gigabytes).
fn prune_task_dirs(dirs: &mut std::collections::VecDeque<PathBuf>, keep: usize) {
    while dirs.len() > keep {
        let Some(dir) = dirs.pop_front() else { return };
        tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
            Ok(()) => debug!(dir = %dir.display(), "removed a finished task's folder"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(dir = %dir.display(), error = %e, "cannot remove a finished task's folder")
            }
        });
    }
}

/// A folder per attempt: a new attempt never races the cleanup of an old one.
fn attempt_dir(cfg: &WorkerConfig, task: &str, attempt: u32) -> PathBuf {
    cfg.state_dir
        .join("tasks")
        .join(format!("{task}-attempt{attempt}"))
}

/// Prepares a fresh working folder, runs the conductor, collects result
/// files, and reports through the task's response channel.
#[allow(clippy::too_many_arguments)]
async fn run_task(
    cfg: WorkerConfig,
    credentials: Credentials,
    console: Option<crate::worker::console::Console>,
    device: crate::protocol::DeviceProps,
    spec: TaskSpec,
    events: mpsc::UnboundedSender<TaskEvent>,
    (budget, log_full): (LogBudget, crate::worker::channel::LogFull),
    stop: watch::Receiver<Stop>,
) {
    let mut channel = ResponseChannel::open(spec.task.clone(), spec.attempt, events)
        .with_budget(budget)
        .with_log_full(log_full.clone());
    let task_dir = attempt_dir(&cfg, &spec.task, spec.attempt);
    let work_dir = task_dir.join("work");
    let results_dir = task_dir.join("results");
    let inputs_dir = task_dir.join("inputs");
    let prepared = (|| {
        if task_dir.exists() {
            std::fs::remove_dir_all(&task_dir)?;
        }
        std::fs::create_dir_all(&work_dir)?;
        std::fs::create_dir_all(&inputs_dir)?;
        std::fs::create_dir_all(&results_dir)
    })();
    if let Err(e) = prepared {
        let failure = format!(
            "device/host failure: cannot prepare {}: {e}",
            task_dir.display()
        );
        warn!(task = %spec.task, %failure, "task failed before the conductor started");
        fail_before_conductor(channel, failure);
        return;
    }
    if spec.recover {
        if let Err(failure) = recover(&cfg, &device, &work_dir, &mut channel, stop.clone()).await {
            warn!(task = %spec.task, %failure, "health check failed before the conductor started");
            fail_before_conductor(channel, failure);
            return;
        }
    }
    if let Err(failure) = fetch_inputs(&cfg, &credentials, &spec, &inputs_dir, &mut channel).await {
        warn!(task = %spec.task, %failure, "task failed before the conductor started");
        fail_before_conductor(channel, failure);
        return;
    }
    // The console: its record from `pre_task` ago goes into serial.log;
    // its lines go to the task's log live; the testrun's console actions
    // (`console.send`, `console.expect`) run before the conductor.
    let console_since = crate::protocol::limits::unix_ms_now().saturating_sub(
        console
            .as_ref()
            .map_or(0, |c| c.pre_task().as_millis() as u64),
    );
    let mut console_rx = console.as_ref().map(|c| c.tap());
    let console_done = |channel: &mut ResponseChannel| {
        if let Some(c) = &console {
            let dropped = c.untap();
            if dropped > 0 {
                channel.log(
                    Stream::Worker,
                    format!("{dropped} console lines were not shown live (the task's serial.log has them)"),
                );
            }
            let name = if results_dir.join("serial.log").exists() {
                "ots-serial.log"
            } else {
                "serial.log"
            };
            if let Err(e) = c.extract(console_since, &results_dir.join(name)) {
                channel.log(
                    Stream::Worker,
                    format!("cannot write the console record {name}: {e}"),
                );
            }
        }
    };
    if let Some(c) = &console {
        if let Err(why) = c.available() {
            channel.log(
                Stream::Worker,
                format!("the device's console is unavailable: {why}"),
            );
        }
        let send = spec
            .options
            .get("console.send")
            .map(String::as_str)
            .unwrap_or(c.actions().0);
        if !send.is_empty() {
            c.send(crate::worker::console::unescape(send));
        }
    }
    let configured = console.as_ref().map(|c| c.actions());
    // Whose pattern it is: a testrun's own that never appears is the
    // user's failure; the worker's configured one, the device's.
    let by_testrun = spec
        .options
        .get("console.expect")
        .is_some_and(|p| !p.is_empty());
    let expect = spec
        .options
        .get("console.expect")
        .cloned()
        .or_else(|| configured.map(|a| a.1.to_string()))
        .filter(|p| !p.is_empty());
    if let Some(pattern) = expect {
        let limit = spec
            .options
            .get("console.expect_timeout")
            .and_then(|t| humantime::parse_duration(t).ok())
            .or(configured.map(|a| a.2))
            .unwrap_or(Duration::from_secs(60))
            // A testrun's option cannot hold the device longer than its
            // own execution timeout.
            .min(Duration::from_secs(spec.timeout_secs));
        let seen = match console_rx.as_mut() {
            None => Err("the worker has no console configured ([serial] port)".to_string()),
            Some(rx) => {
                let deadline = tokio::time::Instant::now() + limit;
                let mut text = String::new();
                loop {
                    match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Some(line)) => {
                            let shown = crate::worker::console::escape(&line.bytes);
                            text.push_str(&shown);
                            if line.complete {
                                text.push('\n');
                            }
                            channel.log(Stream::Serial, shown);
                            if text.contains(pattern.as_str()) {
                                break Ok(());
                            }
                            // Only the recent output matters for a match.
                            if text.len() > 64 * 1024 {
                                text.drain(..text.len() - 8 * 1024);
                            }
                        }
                        Ok(None) | Err(_) => {
                            break Err(format!(
                                "console: expected {pattern:?} within {}, not seen",
                                humantime::format_duration(limit)
                            ))
                        }
                    }
                }
            }
        };
        if let Err(failure) = seen {
            warn!(task = %spec.task, %failure, "task failed before the conductor started");
            console_done(&mut channel);
            let files = collect_results(&results_dir, &cfg.conductor, &mut channel);
            channel.finish(
                Outcome {
                    failure: Some(failure),
                    by_testrun,
                    ..Outcome::default()
                },
                files,
            );
            return;
        }
    }
    // The console for the conductor, on a pseudo-terminal of its own.
    let export = match &console {
        Some(c)
            if cfg
                .conductor
                .command
                .iter()
                .any(|a| a.contains("{console}")) =>
        {
            match c.export() {
                Ok(e) => Some(e),
                Err(e) => {
                    channel.log(Stream::Worker, format!("cannot re-export the console: {e}"));
                    None
                }
            }
        }
        _ => None,
    };
    let ctx = TaskContext {
        spec: &spec,
        device: &device,
        work_dir: &work_dir,
        results_dir: &results_dir,
        inputs_dir: &inputs_dir,
        console: export.as_ref().map(|(p, _)| p.as_path()),
    };
    let argv = match conductor::expand(&cfg.conductor.command, &ctx) {
        Ok(argv) => argv,
        Err(e) => {
            warn!(task = %spec.task, error = %e, "conductor failure: cannot build the command line");
            channel.finish(
                Outcome {
                    failure: Some(e.to_string()),
                    ..Outcome::default()
                },
                Vec::new(),
            );
            return;
        }
    };
    let masker = conductor::Masker::new(&spec.secrets);
    channel.log(
        Stream::Worker,
        masker.mask(format!(
            "worker {} runs attempt {} of task {}: {:?}",
            cfg.name, spec.attempt, spec.task, argv
        )),
    );
    // Bounded: a conductor printing faster than lines can be numbered
    // and queued waits on its pipe, like any pipe writer. Each item is the
    // lines of one pipe read (at most 64 KiB of text).
    let (line_tx, mut line_rx) = mpsc::channel(4);
    let run = conductor::Run {
        argv,
        work_dir: work_dir.clone(),
        timeout: Duration::from_secs(spec.timeout_secs),
        kill_grace: Duration::from_millis(cfg.conductor.kill_grace_ms),
        env: [
            ("OTS_TASK_ID".into(), spec.task.clone()),
            ("OTS_RUN_ID".into(), spec.run.clone()),
            ("OTS_RESULTS_DIR".into(), results_dir.display().to_string()),
            ("OTS_INPUTS_DIR".into(), inputs_dir.display().to_string()),
            (
                "OTS_CONSOLE".into(),
                export
                    .as_ref()
                    .map_or(String::new(), |(p, _)| p.display().to_string()),
            ),
            ("OTS_WORK_DIR".into(), work_dir.display().to_string()),
        ]
        .into_iter()
        .chain(conductor::Masker::env(&spec.secrets))
        .collect(),
        pgid_file: Some(task_dir.join("conductor.pgid")),
        masker: masker.clone(),
        log_full,
    };
    let conductor = tokio::spawn(conductor::run(run, line_tx, stop));
    loop {
        tokio::select! {
            got = line_rx.recv() => match got {
                Some(packed) => {
                    // Delivery behind: wait here, so the conductor waits on its pipe.
                    channel.wait_for_room().await;
                    channel.log_packed(packed);
                }
                None => break,
            },
            Some(line) = async { console_rx.as_mut()?.recv().await }, if console_rx.is_some() => {
                let shown = masker.mask(crate::worker::console::escape(&line.bytes));
                channel.log(Stream::Serial, shown);
            }
        }
    }
    let outcome = match conductor.await {
        Ok(outcome) => outcome,
        Err(e) => Outcome {
            failure: Some(format!("worker bug: conductor runner failed: {e}")),
            ..Outcome::default()
        },
    };
    if outcome.failure.is_some()
        || outcome.signal.is_some()
        || !matches!(outcome.exit_code, Some(0) | Some(1))
    {
        warn!(task = %spec.task, ?outcome, "conductor/device failure: the conductor did not end normally");
    }
    drop(export);
    // Live lines still queued, then the record of the task's window.
    if let Some(rx) = console_rx.as_mut() {
        while let Ok(line) = rx.try_recv() {
            let shown = masker.mask(crate::worker::console::escape(&line.bytes));
            channel.log(Stream::Serial, shown);
        }
    }
    console_done(&mut channel);
    let files = collect_results(&results_dir, &cfg.conductor, &mut channel);
    channel.finish(outcome, files);
}

/// Lists the result files below `dir` that match any glob (names, sizes,
/// modification times; nothing is read here). Symlinks, devices, FIFOs
/// and sockets are skipped with a line in the task's log, so a conductor
/// cannot make the worker upload anything from outside its results
/// folder.
fn collect_results(
    dir: &Path,
    conductor: &crate::worker::config::ConductorConfig,
    channel: &mut ResponseChannel,
) -> Vec<ResultFile> {
    let globs = &conductor.result_globs;
    let mut total = 0u64;
    let patterns: Vec<glob::Pattern> = globs
        .iter()
        .filter_map(|g| glob::Pattern::new(g).ok())
        .collect();
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) => {
                channel.log(
                    Stream::Worker,
                    format!("cannot list results folder {}: {e}", d.display()),
                );
                continue;
            }
        };
        let mut entries: Vec<_> = entries.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                stack.push(path);
                continue;
            }
            if !kind.is_file() {
                channel.log(
                    Stream::Worker,
                    format!("not uploading {} (not a regular file)", path.display()),
                );
                continue;
            }
            let Ok(rel) = path.strip_prefix(dir) else {
                continue;
            };
            let Some(name) = rel.to_str().map(str::to_string) else {
                channel.log(
                    Stream::Worker,
                    format!("not uploading {} (name is not UTF-8)", path.display()),
                );
                continue;
            };
            let options = glob::MatchOptions {
                require_literal_separator: false,
                ..Default::default()
            };
            if !patterns.iter().any(|p| p.matches_with(&name, options)) {
                continue;
            }
            // The server would refuse the name (PROTOCOL.md §14): say so here.
            if let Err(e) = crate::protocol::check::check_file_name("file_chunk", &name) {
                channel.log(Stream::Worker, format!("not uploading a result file: {e}"));
                continue;
            }
            // Bounded before anything is sent; the server checks its own
            // limits at the offer.
            let size = entry.metadata().map_or(0, |m| m.len());
            if size > conductor.max_result_file_bytes
                || total.saturating_add(size) > conductor.max_result_bytes
            {
                channel.log(
                    Stream::Worker,
                    format!(
                        "not uploading {name}: {size} bytes would exceed conductor.max_result_file_bytes ({}) or max_result_bytes ({})",
                        conductor.max_result_file_bytes, conductor.max_result_bytes
                    ),
                );
                continue;
            }
            total = total.saturating_add(size);
            let mtime_ns = entry
                .metadata()
                .map_or(0, |m| crate::worker::reader::mtime_ns(&m));
            files.push(ResultFile {
                name,
                size,
                mtime_ns,
            });
        }
    }
    files
}
