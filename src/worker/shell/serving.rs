//! The worker's loop: each turn waits for one [`Event`] (the table in
//! [`Sources::next`]), hands it to its handler, which asks the
//! [`Session`] what to do; the session's state is saved, then its
//! [`Action`]s are carried out ([`Serving::act`]), then the turn ends
//! (registration noticed, finished conductors reaped, the stop's progress
//! checked). Connection scheduling is the [`Dialer`]'s; protocol policy
//! (what may be sent when) is the session's.

use crate::protocol::{self, Body, ErrorCode, Header, TaskId, TaskSpec};
use crate::security::broadcast::BroadcastError;
use crate::security::Credentials;
use crate::shutdown::Stop;
use crate::transport::{self, to_message, TransportError};
use crate::worker::config::{StopPolicy, WorkerConfig};
use crate::worker::session::{
    Action, Link, LostReason, ReadDone, ReadRequest, SendOrder, Session, StopRules, StopStep,
};
use crate::worker::shell::error::WorkerError;
use crate::worker::shell::link::{
    attach, ConnectError, Connected, Connection, Dialer, Inbound, Opened,
};
use crate::worker::state::WorkerStore;
use crate::worker::task::channel::{HoldCommand, LogBudget, LogFull, TaskEvent};
use crate::worker::task::conductor;
use crate::worker::task::{attempt_dir, prune_task_dirs, run_task, TaskRun};
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// Messages from the server waiting for the loop, at most.
pub(super) const INBOUND_QUEUE: usize = 1024;
/// Task events handled per loop turn at most (one state save each turn).
const MAX_EVENTS_PER_TURN: usize = 1024;
/// Console inputs and power actions queued for a lease's hold, at most.
const HOLD_COMMANDS: usize = 4096;

/// What the loop waits on.
pub(super) struct Sources {
    pub(super) task_events: mpsc::UnboundedReceiver<TaskEvent>,
    pub(super) inbound: mpsc::Receiver<Inbound>,
    pub(super) reads_done: mpsc::UnboundedReceiver<ReadDone>,
    pub(super) ticker: tokio::time::Interval,
    pub(super) stop: watch::Receiver<Stop>,
    /// False once whoever sends stops is gone (the worker then runs on).
    pub(super) stop_open: bool,
}

/// One thing that happened, for one handler. One lives at a time, on the
/// loop's stack: its size does not matter, a box per message would.
#[allow(clippy::large_enum_variant)]
enum Event {
    Task(TaskEvent),
    Inbound(Inbound),
    /// The socket refused a chunk a moment ago: go on.
    Unpause,
    ReadDone(ReadDone),
    Tick,
    Connected(Result<Result<Connected, ConnectError>, tokio::task::JoinError>),
    Stop(Stop),
}

impl Sources {
    async fn next(
        &mut self,
        upload_paused: bool,
        connecting: &mut Option<crate::worker::shell::link::Connecting>,
    ) -> Event {
        let dialing = connecting.is_some();
        tokio::select! {
            Some(event) = self.task_events.recv() => Event::Task(event),
            Some(inbound) = self.inbound.recv() => Event::Inbound(inbound),
            // The socket refused a chunk: go on a moment later (its queue
            // drains into TCP within microseconds unless the server lags).
            _ = tokio::time::sleep(Duration::from_millis(1)), if upload_paused => Event::Unpause,
            Some(done) = self.reads_done.recv() => Event::ReadDone(done),
            _ = self.ticker.tick() => Event::Tick,
            result = async { connecting.as_mut().expect("guarded").await }, if dialing => {
                *connecting = None;
                Event::Connected(result)
            }
            changed = self.stop.changed(), if self.stop_open => match changed {
                Ok(()) => Event::Stop(*self.stop.borrow()),
                Err(_) => {
                    self.stop_open = false;
                    Event::Stop(Stop::Run)
                }
            },
        }
    }
}

/// A conductor in flight: how to stop it, its runner, and the flag its
/// runner reads when the server's log of the task is full.
struct Running {
    stop: watch::Sender<conductor::Stop>,
    runner: JoinHandle<()>,
    log_full: LogFull,
    /// A lease's hold takes console input and power actions here.
    commands: mpsc::Sender<HoldCommand>,
}

/// What the end of a turn says about the loop.
enum Next {
    Serve,
    Leave,
}

/// What the worker's tasks need from it, handed to each runner.
pub(super) struct Parts {
    pub(super) cfg: WorkerConfig,
    pub(super) credentials: Credentials,
    pub(super) console: Option<crate::worker::task::console::Console>,
    pub(super) device: crate::protocol::DeviceProps,
    pub(super) session: Session,
    pub(super) store: WorkerStore,
    pub(super) log_budget: LogBudget,
    pub(super) task_events: mpsc::UnboundedSender<TaskEvent>,
    pub(super) reads: mpsc::UnboundedSender<ReadRequest>,
    pub(super) inbound: mpsc::Sender<Inbound>,
    pub(super) dialer: Dialer,
}

/// Everything the loop's handlers act on.
pub(super) struct Serving {
    cfg: WorkerConfig,
    credentials: Credentials,
    console: Option<crate::worker::task::console::Console>,
    device: crate::protocol::DeviceProps,
    session: Session,
    store: WorkerStore,
    log_budget: LogBudget,
    task_events: mpsc::UnboundedSender<TaskEvent>,
    reads: mpsc::UnboundedSender<ReadRequest>,
    inbound: mpsc::Sender<Inbound>,
    dialer: Dialer,
    conn: Option<Connection>,
    running: HashMap<TaskId, Running>,
    /// Commands a lease's hold did not take in time (never expected).
    hold_commands_dropped: u64,
    /// Benchmark hook: behave as a worker that does not know `log_full`
    /// (`cargo bench --bench flood` measures the server against both).
    ignore_log_full: bool,
    send_timeout: Duration,
    supervisor: crate::supervision::Supervisor,
    /// Folders of tasks whose results were delivered, oldest first; kept
    /// up to `keep_task_dirs` for debugging, then removed (off the loop).
    finished_dirs: VecDeque<PathBuf>,
    /// The console's state as last told to the server.
    console_told: Option<String>,
    /// The server refused this worker for good.
    refused: Option<(ErrorCode, String)>,
    /// A rogue server cannot flood the worker's log either.
    noise: crate::logging::Throttle,
}

impl Serving {
    pub(super) fn new(parts: Parts) -> Serving {
        let send_timeout = Duration::from_millis(parts.cfg.connect_timeout_ms);
        // State restored: ready. Pings come from this loop.
        let mut supervisor = crate::supervision::Supervisor::new();
        supervisor.ready(&parts.session.status_line());
        Serving {
            cfg: parts.cfg,
            credentials: parts.credentials,
            console: parts.console,
            device: parts.device,
            session: parts.session,
            store: parts.store,
            log_budget: parts.log_budget,
            task_events: parts.task_events,
            reads: parts.reads,
            inbound: parts.inbound,
            dialer: parts.dialer,
            conn: None,
            running: HashMap::new(),
            hold_commands_dropped: 0,
            ignore_log_full: std::env::var_os("OTS_TEST_IGNORE_LOG_FULL").is_some(),
            send_timeout,
            supervisor,
            finished_dirs: VecDeque::new(),
            console_told: None,
            refused: None,
            noise: crate::logging::Throttle::new(Duration::from_secs(10), 20),
        }
    }

    /// Serves until a stop completes, a second stop request, or the
    /// server refuses this worker for good; then stops what runs.
    pub(super) async fn run(mut self, sources: &mut Sources) -> Result<(), WorkerError> {
        while self.refused.is_none() {
            let was_up = matches!(self.session.link(), Link::Up { .. });
            let mut report_saved = None;
            let event = sources
                .next(self.session.upload_paused(), &mut self.dialer.connecting)
                .await;
            let actions = match event {
                Event::Task(e) => {
                    self.on_task_events(e, &mut sources.task_events, &mut report_saved)
                }
                Event::Inbound(inbound) => self.on_inbound(inbound),
                Event::Unpause => self.session.unpause_upload(Instant::now()),
                Event::ReadDone(done) => self.on_reads_done(done, &mut sources.reads_done),
                Event::Tick => self.on_tick(),
                Event::Connected(result) => self.on_connected(result),
                Event::Stop(Stop::Now) => {
                    self.on_stop_now();
                    break;
                }
                Event::Stop(asked) => self.on_stop_request(asked),
            };
            // What the actions are about to announce (acks, accepted
            // tasks) is on disk first.
            self.store
                .save(&self.session.saved())
                .map_err(WorkerError::Save)?;
            if let Some(task) = report_saved {
                info!(task = %task, "final report saved; it will be delivered even if this worker restarts");
            }
            self.act(actions).await;
            self.end_turn(was_up);
            if let Next::Leave = self.stop_step().await {
                break;
            }
        }
        self.shut_down().await
    }

    /// Task events, with what else is waiting (bounded): one state save
    /// for the batch, however fast the conductor prints.
    fn on_task_events(
        &mut self,
        first: TaskEvent,
        more: &mut mpsc::UnboundedReceiver<TaskEvent>,
        report_saved: &mut Option<TaskId>,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(event) = next.take() {
            match &event {
                TaskEvent::Finished { task, .. } => *report_saved = Some(task.clone()),
                TaskEvent::Log { text, .. } => self
                    .log_budget
                    .buffered(crate::worker::task::channel::charge(text)),
                TaskEvent::ConsoleBytes { .. } | TaskEvent::PowerDone { .. } => {}
            }
            actions.extend(self.session.on_task_event(Instant::now(), event));
            taken += 1;
            if taken < MAX_EVENTS_PER_TURN {
                next = more.try_recv().ok();
            }
        }
        actions
    }

    /// A message from the current connection (one from an older
    /// connection is dropped): opened, decoded, handed to the session.
    fn on_inbound(&mut self, inbound: Inbound) -> Vec<Action> {
        let generation = self.dialer.generation;
        match inbound {
            Inbound::Frames {
                generation: g,
                from_sub,
                msg,
                received,
            } if g == generation => {
                let now = Instant::now();
                let opened = match self.conn.as_mut() {
                    Some(c) => c.open(now, from_sub, msg.into_vec()),
                    None => Opened::Refused(BroadcastError::NoKey),
                };
                match opened {
                    Opened::Unauthentic(e) => {
                        // Tampered with, replayed or not from the server
                        // we pinned: this connection cannot be trusted.
                        self.session.stats.server_errors += 1;
                        warn!(error = %e, "a message on the control connection does not authenticate; reconnecting");
                        vec![Action::Reconnect(LostReason::ConnectionClosed(format!(
                            "unauthentic message: {e}"
                        )))]
                    }
                    Opened::Refused(e) => {
                        self.on_refused_broadcast(now, e);
                        Vec::new()
                    }
                    Opened::Frames(frames) => self.on_frames(now, from_sub, frames, received),
                }
            }
            Inbound::Frames { .. } => Vec::new(),
            Inbound::Closed {
                generation: g,
                error,
            } if g == generation => vec![Action::Reconnect(LostReason::ConnectionClosed(error))],
            Inbound::Closed { .. } => Vec::new(), // from an older connection
        }
    }

    /// Not a sign of life: a forgery, a replay, or a broadcast held back
    /// on the way.
    fn on_refused_broadcast(&mut self, now: Instant, e: BroadcastError) {
        self.session.stats.broadcasts_refused += 1;
        if matches!(e, BroadcastError::Forged | BroadcastError::Shape(_))
            && self.noise.allow(now, "refused broadcasts")
        {
            warn!(error = %e, "a broadcast on the events port is not from the server that welcomed us");
        } else {
            debug!(error = %e, "broadcast ignored");
        }
    }

    fn on_frames(
        &mut self,
        now: Instant,
        from_sub: bool,
        frames: Vec<Bytes>,
        received: crate::worker::session::Arrival,
    ) -> Vec<Action> {
        match protocol::decode(frames) {
            Ok(env) => {
                if !from_sub {
                    if let Some(c) = self.conn.as_mut() {
                        c.welcomed(now, &env.body);
                    }
                }
                if self.ignore_log_full && matches!(env.body, Body::LogFull { .. }) {
                    Vec::new()
                } else {
                    self.session.on_message(now, received, env)
                }
            }
            Err(e) => {
                self.session.stats.server_errors += 1;
                if self.noise.allow(Instant::now(), "protocol errors") {
                    warn!(error = %e, from_sub, "protocol error: refused a message from the server (a rogue or newer server?); ignored");
                }
                Vec::new()
            }
        }
    }

    fn on_reads_done(
        &mut self,
        done: ReadDone,
        more: &mut mpsc::UnboundedReceiver<ReadDone>,
    ) -> Vec<Action> {
        let mut actions = self.session.on_read_done(Instant::now(), done);
        while let Ok(done) = more.try_recv() {
            actions.extend(self.session.on_read_done(Instant::now(), done));
        }
        actions
    }

    /// The tick: a connection attempt if one is due, the session's
    /// timers, and the console's state told after each registration and
    /// whenever it changes (shown by `ots-submit workers`).
    fn on_tick(&mut self) -> Vec<Action> {
        let now = Instant::now();
        self.dialer
            .dial_if_due(now, self.conn.is_some(), &self.cfg, &self.credentials);
        let mut actions = self.session.on_tick(now);
        if let Some(c) = &self.console {
            if matches!(self.session.link(), Link::Up { .. }) {
                let status = match c.available() {
                    Ok(()) => "ok".to_string(),
                    Err(why) => format!("unavailable: {why}"),
                };
                if self.console_told.as_deref() != Some(status.as_str()) {
                    actions.extend(self.session.console_status(now, &status));
                    self.console_told = Some(status);
                }
            } else {
                self.console_told = None;
            }
        }
        actions
    }

    fn on_connected(
        &mut self,
        result: Result<Result<Connected, ConnectError>, tokio::task::JoinError>,
    ) -> Vec<Action> {
        match result {
            Ok(Ok(Connected {
                dealer,
                channel,
                sub,
            })) => {
                self.dialer.generation += 1;
                let generation = self.dialer.generation;
                self.conn = Some(attach(
                    generation,
                    dealer,
                    channel,
                    sub,
                    self.inbound.clone(),
                ));
                debug!(generation, "connected; registering");
                self.session.on_connected(Instant::now())
            }
            Ok(Err(e)) => {
                self.dialer.failed(&e, &self.cfg);
                Vec::new()
            }
            Err(join) => {
                warn!(error = %join, "connect task failed");
                self.dialer.crashed(&self.cfg);
                Vec::new()
            }
        }
    }

    /// The first stop request: no new task; the running one finished (or
    /// stopped, by `stop_policy`) and delivered, then `bye`.
    fn on_stop_request(&mut self, asked: Stop) -> Vec<Action> {
        if asked != Stop::Gracefully || self.session.stop_requested() {
            return Vec::new();
        }
        info!(policy = %crate::text::wire(&self.cfg.stop_policy), timeout_ms = self.cfg.stop_timeout_ms, "stop requested: taking no new task; finishing and delivering what runs (a second SIGTERM stops at once)");
        self.supervisor
            .stopping("stopping: finishing and delivering the running task");
        let rules = StopRules {
            abort: self.cfg.stop_policy == StopPolicy::Abort,
            timeout: Duration::from_millis(self.cfg.stop_timeout_ms),
            kill_grace: Duration::from_millis(self.cfg.conductor.kill_grace_ms),
        };
        self.session.begin_stop(Instant::now(), rules)
    }

    fn on_stop_now(&self) {
        if self.session.stop_requested() {
            warn!("stop requested again: stopping at once");
        } else {
            info!("stop requested: stopping at once");
        }
    }

    /// Carries out the session's actions in order. Log batches the socket
    /// would not take this turn go back to the session (back-pressure,
    /// not loss), and what may not overtake them waits (the session's
    /// [`SendOrder`]).
    async fn act(&mut self, actions: Vec<Action>) {
        let mut queue: VecDeque<Action> = actions.into();
        let mut held: Vec<(Body, Option<Bytes>)> = Vec::new();
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Send { header, body, raw } => {
                    match self.session.send_order(&header, &body, !held.is_empty()) {
                        SendOrder::HoldBack => held.push((body, raw)),
                        SendOrder::Withdraw => self.session.unsend(header.seq),
                        SendOrder::Now => {
                            if let Err(lost) = self.send(header, body, raw, &mut held).await {
                                queue.clear();
                                queue.push_back(Action::Reconnect(lost));
                            }
                        }
                    }
                }
                Action::Reconnect(LostReason::NotLeader(said)) => {
                    self.dialer.not_leader(&said, &self.cfg);
                    self.conn = None;
                    self.session.on_disconnected();
                    queue.clear();
                }
                Action::Reconnect(reason) => {
                    if self.conn.is_some() {
                        warn!(%reason, "server lost; dropping both sockets and reconnecting with backoff");
                    }
                    self.dialer.lost(self.conn.is_some());
                    self.conn = None;
                    self.session.on_disconnected();
                    queue.clear();
                }
                Action::StartTask(spec) => self.start_task(spec),
                Action::LogFull(task) => {
                    if let Some(r) = self.running.get(&task) {
                        r.log_full.set();
                    }
                }
                Action::StopTask(task) => self.stop_task(&task),
                Action::Hold { task, command } => self.pass_to_hold(&task, *command),
                Action::Refused(code, message) => {
                    self.refused = Some((code, message));
                    queue.clear();
                }
                Action::ReadChunk(req) => {
                    let _ = self.reads.send(req);
                }
                Action::TaskDone { task, attempt } => {
                    self.finished_dirs
                        .push_back(attempt_dir(&self.cfg, &task, attempt));
                    prune_task_dirs(&mut self.finished_dirs, self.cfg.keep_task_dirs);
                }
            }
        }
        if !held.is_empty() {
            self.session.requeue_unsent_logs(Instant::now(), held);
        }
    }

    /// Encodes, seals (with security) and sends one message on the control
    /// connection (none: nothing to do). A peer that reads slower than we
    /// produce is the session's to handle; a failed send loses the
    /// connection.
    async fn send(
        &mut self,
        header: Header,
        body: Body,
        raw: Option<Bytes>,
        held: &mut Vec<(Body, Option<Bytes>)>,
    ) -> Result<(), LostReason> {
        match self.transmit(&header, &body, raw.clone()).await {
            None | Some(Ok(())) => Ok(()),
            Some(Err(TransportError::PeerBusy)) => {
                held.extend(self.session.on_peer_busy(&header, body, raw));
                Ok(())
            }
            Some(Err(e)) => Err(LostReason::SendFailed(e.to_string())),
        }
    }

    /// One message on the wire; none without a connection.
    async fn transmit(
        &mut self,
        header: &Header,
        body: &Body,
        raw: Option<Bytes>,
    ) -> Option<Result<(), TransportError>> {
        let c = self.conn.as_mut()?;
        let mut frames = protocol::encode(header, body, raw);
        if let Some(channel) = c.channel.as_mut() {
            frames = channel.seal(&frames);
        }
        Some(transport::send_bounded(&mut c.dealer, to_message(frames), self.send_timeout).await)
    }

    /// Runs the task's attempt in a task of its own.
    fn start_task(&mut self, spec: TaskSpec) {
        let (stop, stop_rx) = watch::channel(conductor::Stop::Running);
        let task = spec.task.clone();
        let log_full = LogFull::default();
        let (commands, commands_rx) = mpsc::channel(HOLD_COMMANDS);
        let run = TaskRun {
            cfg: self.cfg.clone(),
            credentials: self.credentials.clone(),
            console: self.console.clone(),
            device: self.device.clone(),
        };
        let runner = tokio::spawn(run_task(
            run,
            spec,
            self.task_events.clone(),
            (self.log_budget.clone(), log_full.clone()),
            stop_rx,
            commands_rx,
        ));
        self.running.insert(
            task,
            Running {
                stop,
                runner,
                log_full,
                commands,
            },
        );
    }

    /// Hands a server's command to the lease's hold. The queue is ample
    /// (the server holds input to a rate); one refused is said, loudly.
    fn pass_to_hold(&mut self, task: &TaskId, command: HoldCommand) {
        let Some(r) = self.running.get(task) else {
            return;
        };
        if r.commands.try_send(command).is_err() {
            self.hold_commands_dropped += 1;
            warn!(task = %task, "a lease's hold did not take a console input or power command in time; it is lost");
        }
    }

    fn stop_task(&self, task: &TaskId) {
        if let Some(r) = self.running.get(task) {
            let _ = r.stop.send(conductor::Stop::Cancel);
        }
    }

    /// The end of a turn: the log budget told what waits, a registration
    /// noticed, finished runners reaped, the watchdog fed.
    fn end_turn(&mut self, was_up: bool) {
        self.log_budget.set_backlog(match self.session.link() {
            Link::Up { .. } => self.session.buffered_log_bytes(),
            _ => 0,
        });
        if let Link::Up { server } = self.session.link() {
            if !was_up {
                let server = server.clone();
                self.dialer.registered(&server, &self.cfg);
            }
        }
        self.running.retain(|_, r| !r.runner.is_finished());
        let session = &self.session;
        self.supervisor
            .tick(Instant::now(), || session.status_line());
    }

    /// A stop's progress, as the session says (see `session::stop`):
    /// the bye sent, the running task stopped, or the loop left.
    async fn stop_step(&mut self) -> Next {
        match self.session.poll_stop(Instant::now()) {
            StopStep::Wait => Next::Serve,
            StopStep::Leave => Next::Leave,
            StopStep::Bye(actions) => {
                for action in actions {
                    if let Action::Send { header, body, raw } = action {
                        let _ = self.transmit(&header, &body, raw).await;
                    }
                }
                Next::Serve
            }
            StopStep::StopTasks(actions) => {
                for action in actions {
                    if let Action::StopTask(task) = action {
                        self.stop_task(&task);
                    }
                }
                Next::Serve
            }
        }
    }

    /// Leaving: says why, and leaves nothing behind — each conductor's
    /// process group gets TERM, then KILL after the grace period. The
    /// interrupted task is re-run elsewhere once the server counts this
    /// worker as lost.
    async fn shut_down(self) -> Result<(), WorkerError> {
        let name = self.cfg.name.clone();
        match &self.refused {
            Some((ErrorCode::Forbidden, message)) => {
                tracing::error!(worker = %name, %message, "the server refused this worker: its key does not allow this name or device; stopping")
            }
            Some((_, message)) => {
                tracing::error!(worker = %name, %message, "the server refused this worker: another live worker uses the name; stopping")
            }
            None => info!(worker = %name, "worker stopping"),
        }
        let limit =
            Duration::from_millis(self.cfg.conductor.kill_grace_ms) + Duration::from_secs(5);
        for (task, r) in self.running {
            warn!(task = %task, "worker stopping: terminating the running conductor");
            let _ = r.stop.send(conductor::Stop::Cancel);
            let _ = tokio::time::timeout(limit, r.runner).await;
        }
        match self.refused {
            Some((ErrorCode::Forbidden, message)) => Err(WorkerError::Forbidden { name, message }),
            Some((_, message)) => Err(WorkerError::NameInUse { name, message }),
            None => Ok(()),
        }
    }
}
