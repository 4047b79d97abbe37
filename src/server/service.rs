//! The tokio shell of `ots-server`: binds ROUTER and PUB, feeds the
//! [`Scheduler`] with decoded messages and heartbeat ticks, and carries out
//! its outputs with bounded sends.

use crate::protocol::{self, Body, ErrorCode, Header};
use crate::security::allow::fingerprint;
use crate::security::broadcast::Announcer;
use crate::security::gate::Verdict;
use crate::security::{AllowList, Gate};
use crate::server::config::ServerConfig;
use crate::server::scheduler::{Output, Scheduler, SchedulerConfig};
use crate::server::state::StateStore;
use crate::server::store::{DiskStore, StoreError};
use crate::transport::{self, to_message, TransportError};
use bytes::Bytes;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

/// Inbound messages handled per commit at most.
const MAX_BATCH: usize = 512;
/// Bytes of log and file data in replies a batch may produce before it is
/// committed and sent.
const OUTPUT_BUDGET: usize = 8 * 1024 * 1024;
/// Exit status when state cannot be committed (sysexits EX_IOERR).
const EXIT_STATE: i32 = 74;
use zeromq::prelude::*;
use zeromq::ZmqMessage;

/// Why the server could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] crate::settings::ConfigError),
    #[error(transparent)]
    Notify(#[from] crate::notify::config::NotifyConfigError),
    #[error(
        "state directory {path}: {source}{}",
        crate::durable::access_hint(path, source)
    )]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    State(#[from] crate::server::db::StateError),
    #[error("security: {0}")]
    Security(#[from] crate::security::SecurityError),
    #[error(transparent)]
    Web(#[from] crate::web::WebError),
    #[error("metrics endpoint {addr}: {source}")]
    Metrics {
        addr: String,
        source: std::io::Error,
    },
    #[error("state database {path}: {source}; restore a backup or move the state directory away")]
    Restore {
        path: PathBuf,
        source: crate::server::scheduler::RestoreError,
    },
}

impl ServerError {
    /// A mistake in the configuration or the files' ownership that a
    /// restart does not fix (ots-server exits 78, so systemd does not
    /// restart it in a loop), as opposed to a resource that may come
    /// back (exit 69).
    pub fn is_configuration(&self) -> bool {
        let denied = |e: &std::io::Error| e.kind() == std::io::ErrorKind::PermissionDenied;
        match self {
            ServerError::Config(_)
            | ServerError::Notify(_)
            | ServerError::Security(_)
            | ServerError::Web(crate::web::WebError::Tls { .. }) => true,
            ServerError::StateDir { source, .. } => denied(source),
            ServerError::State(crate::server::db::StateError::Lock { source, .. }) => {
                denied(source)
            }
            ServerError::State(crate::server::db::StateError::DatabaseConfig { .. }) => true,
            // Wrong password or database name: a restart does not fix it.
            ServerError::State(crate::server::db::StateError::Postgres { source, .. }) => {
                use tokio_postgres::error::SqlState;
                matches!(
                    source.code(),
                    Some(c) if *c == SqlState::INVALID_PASSWORD
                        || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
                        || *c == SqlState::INVALID_CATALOG_NAME
                )
            }
            _ => false,
        }
    }
}

/// A running server.
pub struct ServerHandle {
    /// The bound control endpoint (port resolved).
    pub control: String,
    /// The bound events endpoint (port resolved).
    pub events: String,
    /// This run's incarnation id.
    pub incarnation: String,
    /// The web dashboard's address (`http(s)://HOST:PORT`), if served.
    pub web: Option<String>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl ServerHandle {
    /// Announces shutdown to workers and stops.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }

    /// Waits until the server stops by itself (it does not, unless it fails).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Entry point of the server.
pub struct Server;

impl Server {
    /// Binds the sockets and starts serving in the background.
    pub async fn start(cfg: ServerConfig) -> Result<ServerHandle, ServerError> {
        cfg.validate()?;
        // Keys and allow-lists are checked before a standby waits (a
        // mistake is said at once), and read for use once it leads.
        cfg.credentials()?;
        let files_dir = cfg.files_dir();
        for dir in [&cfg.state_dir, &files_dir] {
            std::fs::create_dir_all(dir).map_err(|source| ServerError::StateDir {
                path: dir.clone(),
                source,
            })?;
        }
        // The audit log must take records from the first one on: a file
        // another user owns would lose them one by one, found too late.
        let audit = files_dir.join("audit.log");
        if audit.exists() {
            std::fs::OpenOptions::new()
                .append(true)
                .open(&audit)
                .map_err(|source| ServerError::StateDir {
                    path: audit.clone(),
                    source,
                })?;
        }
        // Every target's secret and credentials are read before anything
        // is bound: a missing file is named at start, not at the first
        // testrun's end.
        let notify_rules = cfg.notify.rules(None)?;
        // Always running, even with nothing configured: deliveries kept
        // from an earlier configuration still get their answer (a target
        // that is gone fails them, listed) instead of stopping the server.
        let sender = Some(crate::notify::sender::Sender::from_config(&cfg.notify)?);
        let mut db = StateStore::open(&cfg.state_dir, &files_dir, cfg.postgres().as_ref()).await?;
        let incarnation = format!("{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff);
        // With PostgreSQL: one leader among the servers sharing it. A
        // standby waits here, bound to nothing, until the lease is free.
        let policy = cfg.lease_policy();
        // Under systemd a standby is up (READY, its watchdog pinged while
        // it waits): a wait longer than TimeoutStartSec is not a failure.
        let mut standby_supervisor = crate::supervision::Supervisor::new();
        let mut told_ready = false;
        // Meanwhile the control endpoint answers `not_leader`, naming the
        // leader, so that workers and clients move on at once.
        let standby = match cfg.postgres() {
            Some(_) => {
                match crate::server::standby::Standby::bind(&cfg.control, &cfg.limits.sockets())
                    .await
                {
                    Ok(s) => Some(s),
                    // Taken (the leader on this host with the same
                    // `control`): wait without answering; peers then find
                    // the endpoint refused and move on all the same.
                    Err(e) => {
                        warn!(error = %e, control = %cfg.control, "standby: cannot bind the control endpoint to answer not_leader; waiting for the lease without answering");
                        None
                    }
                }
            }
            None => None,
        };
        let waiting = |v: Option<&crate::server::pg::LeaseView>| {
            if let Some(s) = &standby {
                s.tell(v);
            }
            let status = match v {
                Some(v) => format!(
                    "standby: {} leads (epoch {}, {})",
                    v.holder, v.epoch, v.address
                ),
                None => "standby: waiting for the lease".to_string(),
            };
            if !told_ready {
                standby_supervisor.ready(&status);
                told_ready = true;
            }
            standby_supervisor.tick(Instant::now(), || status);
        };
        let led = db.lead(&incarnation, &cfg.control, policy, waiting).await;
        if let Some(s) = standby {
            s.close().await;
        }
        let leadership = match led? {
            None => None,
            Some((epoch, granted)) => {
                info!(epoch, database = %db.describe(), "leader: this server holds the lease");
                let settings = cfg.postgres().expect("a lease only with PostgreSQL");
                let renewals = crate::server::pg::PgDb::spawn_renewer(
                    &settings,
                    incarnation.clone(),
                    epoch,
                    policy,
                )
                .await?;
                Some(Leadership {
                    tenure: crate::server::lease::Tenure::granted(policy, epoch, granted),
                    renewals,
                    renew_took: Duration::ZERO,
                    since_ms: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64),
                })
            }
        };
        // Taken before the lists are read: any change after it is reloaded.
        let listed = fingerprint(&cfg.workers_dir, &cfg.users_dir);
        let credentials = cfg.credentials()?;
        if credentials.as_ref().is_some_and(|c| c.allow.is_empty()) {
            warn!(workers_dir = %cfg.workers_dir.display(), users_dir = %cfg.users_dir.display(), "no identity is allowed: no worker or user can connect until a NAME.pub is put into workers_dir or users_dir");
        }
        match &credentials {
            None => warn!("security = \"none\": every peer that reaches the control port is trusted and nothing is encrypted; use this in a closed lab only"),
            Some(c) => info!(
                identities = c.allow.len(),
                workers_dir = %cfg.workers_dir.display(),
                users_dir = %cfg.users_dir.display(),
                "security on: Noise IK; peers authenticate with allow-listed keys"
            ),
        }
        let store = DiskStore::open(&files_dir)?;
        let snapshot = db.load().await?;
        let mut socket_limits = cfg.limits.sockets();
        socket_limits.max_connections = fit_connections_to_fd_limit(socket_limits.max_connections);
        let sockets = transport::bind_server(&cfg.control, &cfg.events, &socket_limits).await?;
        // With security, broadcasts are signed with a key of this
        // incarnation's own (PROTOCOL.md §15.4).
        let announcer = credentials.as_ref().map(|_| Announcer::generate());
        let scheduler = Scheduler::restore(
            SchedulerConfig {
                heartbeat: cfg.heartbeat(),
                liveness: cfg.liveness,
                dispatch_ttl: Duration::from_millis(cfg.dispatch_ttl_ms),
                lost_grace: Duration::from_millis(cfg.lost_grace_ms),
                max_attempts: cfg.max_attempts,
                queue_timeout: Duration::from_secs(cfg.queue_timeout_secs),
                backstop_grace: Duration::from_secs(cfg.backstop_grace_secs),
                retry: cfg.retry.clone(),
                limits: cfg.limits.scheduler(),
                retention_age: Duration::from_secs(
                    cfg.retention.max_age_hours.saturating_mul(3600),
                ),
                retention_bytes: cfg.retention.max_bytes,
                secure: credentials.is_some(),
                secrets_key: credentials
                    .as_ref()
                    .map(|c| c.keys[0].derive("ots testrun secrets at rest v1")),
                events_key: announcer.as_ref().map(Announcer::public_key),
                health: cfg.health_policy(),
                infrastructure_exit_codes: cfg.health.infrastructure_exit_codes.clone(),
                checks: cfg.health_checks(),
                weights: cfg.weights(),
                priority_lead: Duration::from_secs(cfg.fairshare.priority_lead_secs),
                web: !cfg.web.is_empty(),
                notify: notify_rules,
                epoch: leadership.as_ref().map(|l| l.tenure.epoch as u64),
                lease: leadership.as_ref().map(|l| crate::protocol::LeaseInfo {
                    epoch: l.tenure.epoch as u64,
                    since_ms: l.since_ms,
                    endpoint: sockets.control.to_string(),
                }),
            },
            store,
            incarnation.clone(),
            &snapshot,
            Instant::now(),
        )
        .map_err(|source| ServerError::Restore {
            path: PathBuf::from(db.describe()),
            source,
        })?;
        let mut scheduler = scheduler;
        scheduler.set_stored_inputs(crate::server::files::stored_inputs(&files_dir));
        let scrapes = if cfg.metrics.is_empty() {
            None
        } else {
            let listener = tokio::net::TcpListener::bind(&cfg.metrics)
                .await
                .map_err(|source| ServerError::Metrics {
                    addr: cfg.metrics.clone(),
                    source,
                })?;
            let (tx, rx) = mpsc::channel(8);
            tokio::spawn(crate::server::metrics::serve(listener, tx));
            Some(rx)
        };
        let web = match cfg.web_config()? {
            None => None,
            Some(web_cfg) => {
                let plain_on_network = !web_cfg.addr.ip().is_loopback() && web_cfg.tls.is_none();
                let users = credentials.as_ref().map(|c| c.allow.user_roles());
                let handle = crate::web::start(web_cfg, users).await?;
                if plain_on_network {
                    warn!(web = %handle.addr, "web_insecure = true: the dashboard serves plain HTTP on a network address; session cookies and sign-in links can be read on the way: set web_tls_cert and web_tls_key");
                }
                info!(url = %handle.dashboard.base_url, "web dashboard listening");
                Some(handle)
            }
        };
        let web_url = web.as_ref().map(|w| w.dashboard.base_url.clone());
        scheduler.set_dashboard(web_url.clone());
        if !cfg.notify.is_empty() {
            info!(
                webhooks = cfg.notify.webhook.len(),
                mail = cfg.notify.mail.len(),
                per_run_urls = !cfg.notify.allow_urls.is_empty(),
                "notifications on"
            );
        }
        info!(
            control = %sockets.control,
            events = %sockets.events,
            web = %web_url.as_deref().unwrap_or("off"),
            metrics = %if cfg.metrics.is_empty() { "off" } else { cfg.metrics.as_str() },
            state_dir = %cfg.state_dir.display(),
            database = %db.describe(),
            server = %incarnation,
            "server listening"
        );
        let mut scheduler = scheduler;
        let (gate, reloads) = match credentials {
            None => (None, None),
            Some(c) => {
                // Registry hygiene: workers whose key went while the server
                // was down are not listed (nor waited for).
                let allowed = c.allow.worker_names();
                scheduler.retain_workers(Instant::now(), |n| allowed.contains(n));
                for e in &c.refused {
                    warn!(error = %e, "allow-list entry denied: {e}; the other entries are in force");
                    scheduler.audit("server", "-", "denied", &e.to_string());
                }
                scheduler.count_shell_event("allow_list_entries_denied", c.refused.len() as u64);
                let reloads = watch_allow_lists(
                    cfg.workers_dir.clone(),
                    cfg.users_dir.clone(),
                    listed,
                    c.allow.clone(),
                );
                (Some(Gate::new(c.keys, c.allow)), Some(reloads))
            }
        };
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let control = sockets.control.clone();
        let events = sockets.events.clone();
        let send_timeout = Duration::from_millis(cfg.send_timeout_ms);
        let desk = crate::server::files::spawn(&files_dir);
        let notifications = sender.map(crate::notify::sender::Sender::spawn);
        let task = tokio::spawn(serve(
            scheduler,
            db,
            desk,
            notifications,
            sockets,
            gate,
            announcer,
            reloads,
            Pace {
                heartbeat: cfg.heartbeat(),
                send_timeout,
                inbound_queue: cfg.limits.inbound_queue,
                inbound_queue_bytes: cfg.limits.inbound_queue_bytes,
                idle_timeout: Duration::from_millis(cfg.limits.idle_timeout_ms),
                scrapes,
                web,
                leadership,
            },
            shutdown_rx,
        ));
        Ok(ServerHandle {
            control,
            events,
            incarnation,
            web: web_url,
            shutdown: shutdown_tx,
            task,
        })
    }
}

/// The bytes of received messages waiting for the scheduler, counted in
/// KiB permits (a message takes at least one, at most all of them).
#[derive(Clone)]
struct InboundBytes {
    permits: std::sync::Arc<tokio::sync::Semaphore>,
    total: u32,
}

impl InboundBytes {
    fn new(bytes: usize) -> Self {
        let total = (bytes / 1024).clamp(
            1,
            tokio::sync::Semaphore::MAX_PERMITS.min(u32::MAX as usize),
        ) as u32;
        InboundBytes {
            permits: std::sync::Arc::new(tokio::sync::Semaphore::new(total as usize)),
            total,
        }
    }

    fn cost(&self, msg: &ZmqMessage) -> u32 {
        let bytes: usize = msg.iter().map(|f| f.len()).sum();
        (bytes.div_ceil(1024).max(1)).min(self.total as usize) as u32
    }

    /// Waits until the message's bytes fit (reading pauses meanwhile).
    async fn take(&self, msg: &ZmqMessage) {
        if let Ok(p) = self.permits.acquire_many(self.cost(msg)).await {
            p.forget();
        }
    }

    fn give_back(&self, msg: &ZmqMessage) {
        self.permits.add_permits(self.cost(msg) as usize);
    }
}

/// The timings and queue size the serving loop runs with.
struct Pace {
    heartbeat: Duration,
    send_timeout: Duration,
    inbound_queue: usize,
    inbound_queue_bytes: usize,
    idle_timeout: Duration,
    /// Metrics scrapes waiting for a page (metrics endpoint on).
    scrapes: Option<mpsc::Receiver<crate::server::metrics::Scrape>>,
    /// The web dashboard, if served.
    web: Option<crate::web::WebHandle>,
    /// With PostgreSQL: the lease this server acts under.
    leadership: Option<Leadership>,
}

/// The lease held, and its renewer's reports.
struct Leadership {
    tenure: crate::server::lease::Tenure,
    renewals: mpsc::UnboundedReceiver<crate::server::pg::Renewal>,
    /// How long the last renewal took (metrics).
    renew_took: Duration,
    /// When this server took the lease (Unix ms), for `ping`.
    since_ms: u64,
}

impl Leadership {
    /// Takes the renewals that arrived; whether the lease is still ours
    /// at `now` (a takeover steps down at once).
    fn holds(&mut self, now: Instant) -> bool {
        while let Ok(r) = self.renewals.try_recv() {
            match r {
                crate::server::pg::Renewal::Renewed(sent, took) => {
                    self.tenure.renewed(sent);
                    self.renew_took = took;
                }
                crate::server::pg::Renewal::Deposed => {
                    step_down("another server took the lease over")
                }
            }
        }
        self.tenure.valid(now)
    }
}

/// Exit status of a leader that lost its lease: systemd starts it again,
/// and it comes back as a standby.
const EXIT_DEPOSED: i32 = 75;

/// Stops acting at once: no output of this turn leaves, the sockets close
/// with the process.
fn step_down(why: &str) -> ! {
    error!(reason = why, "stepping down: this server no longer holds the lease; it sends, dispatches and acknowledges nothing more (it comes back as a standby when restarted)");
    std::process::exit(EXIT_DEPOSED);
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    mut scheduler: Scheduler<DiskStore>,
    mut db: StateStore,
    desk: (
        mpsc::UnboundedSender<crate::server::files::FileJob>,
        mpsc::UnboundedReceiver<crate::server::files::FileDone>,
    ),
    notifications: Option<(
        mpsc::UnboundedSender<crate::notify::outbox::Job>,
        mpsc::UnboundedReceiver<crate::notify::outbox::Done>,
    )>,
    sockets: transport::ServerSockets,
    mut gate: Option<Gate>,
    announcer: Option<Announcer>,
    mut reloads: Option<mpsc::Receiver<Reload>>,
    pace: Pace,
    mut shutdown: watch::Receiver<bool>,
) {
    let Pace {
        heartbeat,
        send_timeout,
        inbound_queue,
        inbound_queue_bytes,
        idle_timeout,
        mut scrapes,
        web,
        mut leadership,
    } = pace;
    // The dashboard's requests: asked on a bounded queue, handled here in
    // batches like messages, answered after the commit like replies.
    let (dashboard, mut web_asks) = match web {
        Some(w) => (Some(w.dashboard), Some(w.asks)),
        None => (None, None),
    };
    let mut web_pending = crate::web::bridge::Pending::new();
    let mut metrics = crate::server::metrics::Metrics::new();
    let mut last_tick = Instant::now();
    let transport::ServerSockets {
        mut router,
        mut publisher,
        ..
    } = sockets;
    // Connections come and go here; each one's last sign of life is kept
    // so that one that stays silent is closed (idle connections would
    // otherwise hold their slots of `limits.max_connections` forever).
    let mut connections = router.monitor();
    let mut activity = ConnectionActivity::new(idle_timeout);
    let (mut router_tx, mut router_rx) = router.split();
    // Bounded: when the scheduler falls behind, the reader waits, the
    // sockets stop reading and TCP pushes back on the senders. The ROUTER
    // reads its peers in turn, so one flooding peer gets its share only.
    let (inbound_tx, mut inbound_rx) = mpsc::channel::<Received>(inbound_queue);
    // Bounded in bytes too (in KiB permits): a message waits for its
    // size's worth before it is queued, and gives it back once handled.
    let inbound_kib = InboundBytes::new(inbound_queue_bytes);
    let reader_kib = inbound_kib.clone();
    // Receiving in its own task keeps the select below free of
    // cancellation hazards inside the socket's recv. Connection events
    // travel the same queue as messages, in the order they happened: a
    // connection's close is reported when its last message was received
    // (the patched socket tears a peer down when its read half ends), so
    // everything it delivered is handled before its close is.
    let reader = tokio::spawn(async move {
        loop {
            let item = tokio::select! {
                biased;
                Some(event) = futures::StreamExt::next(&mut connections) => Received::Connection(event),
                msg = router_rx.recv() => match msg {
                    Ok(msg) => {
                        reader_kib.take(&msg).await;
                        Received::Message(msg)
                    }
                    Err(e) => {
                        warn!(error = %e, "control socket receive error");
                        continue;
                    }
                },
            };
            if inbound_tx.send(item).await.is_err() {
                return;
            }
        }
    });
    let mut ticker = tokio::time::interval(heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut send_failures = 0u64;
    let mut subscriptions_refused = 0u64;
    // Refused connections are logged and audited at a bounded rate (an
    // anonymous peer can open connections as fast as it likes); the
    // counters count every one.
    let mut refusals = crate::logging::Throttle::new(Duration::from_secs(10), 20);
    let (handshake_jobs, mut handshakes_done) = spawn_handshake_thread();
    let (desk_jobs, mut desk_done) = desk;
    let (notify_jobs, mut notify_done) = match notifications {
        Some((jobs, done)) => (Some(jobs), Some(done)),
        None => (None, None),
    };
    // Sockets bound, state restored: ready. Pings come from this loop.
    let mut supervisor = crate::supervision::Supervisor::new();
    supervisor.ready(&scheduler.status_line());
    // Woken when the next notification retry is due (between ticks: a
    // retry 1 s after a failure should not wait for a tick on top).
    let notify_wake = tokio::time::sleep(Duration::from_secs(3600));
    tokio::pin!(notify_wake);
    // Wakes when the lease would lapse unrenewed (then: step down).
    let lease_end = tokio::time::sleep(Duration::from_secs(3600));
    tokio::pin!(lease_end);
    // Sends, publishes and hands on what the scheduler produced.
    macro_rules! deliver_outputs {
        ($outputs:expr) => {
            deliver(
                $outputs,
                &mut scheduler,
                gate.as_mut(),
                &mut router_tx,
                (&mut publisher, announcer.as_ref()),
                (&desk_jobs, notify_jobs.as_ref()),
                send_timeout,
                &mut send_failures,
            )
            .await
        };
    }
    loop {
        let notify_due = scheduler.notifications_due_in(Instant::now());
        if let Some(d) = notify_due {
            notify_wake.as_mut().reset(tokio::time::Instant::now() + d);
        }
        if let Some(l) = &leadership {
            lease_end
                .as_mut()
                .reset(tokio::time::Instant::from_std(l.tenure.valid_until()));
        }
        tokio::select! {
            Some(renewal) = async { leadership.as_mut()?.renewals.recv().await }, if leadership.is_some() => {
                match renewal {
                    crate::server::pg::Renewal::Renewed(sent, took) => {
                        if let Some(l) = leadership.as_mut() {
                            l.tenure.renewed(sent);
                            l.renew_took = took;
                        }
                    }
                    crate::server::pg::Renewal::Deposed => step_down("another server took the lease over"),
                }
            }
            _ = &mut lease_end, if leadership.is_some() => {
                if leadership.as_mut().is_some_and(|l| !l.holds(Instant::now())) {
                    step_down("the lease could not be renewed in time (lease_ttl less one lease_renew)");
                }
            }
            _ = &mut notify_wake, if notify_due.is_some() => {
                scheduler.on_notifications_due(Instant::now());
            }
            Some(item) = inbound_rx.recv() => {
                // Take what else is waiting too: one commit for the batch,
                // up to MAX_BATCH messages or OUTPUT_BUDGET bytes of replies
                // (data requests answered with a MiB each must not pile up
                // before they are sent).
                let mut first = Some(item);
                let mut handled = 0usize;
                loop {
                    let item = match first.take() {
                        Some(m) => m,
                        None if handled >= MAX_BATCH
                            || scheduler.pending_output_bytes() >= OUTPUT_BUDGET => break,
                        None => match inbound_rx.try_recv() {
                            Ok(m) => m,
                            Err(_) => break,
                        },
                    };
                    handled += 1;
                    let msg = match item {
                        Received::Message(msg) => msg,
                        Received::Connection(event) => {
                            on_connection_event(event, gate.as_mut(), &mut scheduler, &mut activity);
                            continue;
                        }
                    };
                    inbound_kib.give_back(&msg);
                    let mut frames = msg.into_vec();
                    if frames.is_empty() {
                        continue;
                    }
                    let peer = frames.remove(0);
                    let now = Instant::now();
                    activity.heard(&peer, now);
                    let frames = match gate.as_mut() {
                        None => frames,
                        Some(gate) => match gate.inbound_from(now, &activity.address(&peer), &peer, frames) {
                            Verdict::Open(plain) => plain,
                            Verdict::Handshake { first, handshaker } => {
                                // Off the loop; the gate bounds how many wait.
                                let _ = handshake_jobs.send((peer, first, handshaker));
                                continue;
                            }
                            v @ (Verdict::Secured { .. } | Verdict::Refuse { .. }) => {
                                answer_handshake(v, &peer, now, &mut scheduler, &activity, &mut router_tx, &mut refusals, send_timeout).await;
                                continue;
                            }
                            Verdict::Close { reason } => {
                                if refusals.allow(now, "refused connections") {
                                    warn!(address = %activity.address(&peer), %reason, "closed a connection: its message does not authenticate");
                                }
                                gate.forget(&peer);
                                if let Ok(id) = zeromq::util::PeerIdentity::try_from(peer.clone()) {
                                    router_tx.disconnect_peer(&id);
                                }
                                scheduler.on_peer_closed(now, &peer);
                                continue;
                            }
                        },
                    };
                    match protocol::decode(frames) {
                        Ok(env) => scheduler.on_message(now, &peer, env),
                        Err(e) => scheduler.on_bad_frames(&peer, &e),
                    }
                }
            }
            Some(ask) = async { web_asks.as_mut()?.recv().await }, if web_asks.is_some() => {
                let now = Instant::now();
                web_pending.begin(&mut scheduler, now, ask);
                let mut handled = 1;
                while handled < MAX_BATCH && scheduler.pending_output_bytes() < OUTPUT_BUDGET {
                    let Some(Ok(ask)) = web_asks.as_mut().map(|r| r.try_recv()) else {
                        break;
                    };
                    web_pending.begin(&mut scheduler, now, ask);
                    handled += 1;
                }
            }
            Some(scrape) = async { scrapes.as_mut()?.recv().await }, if scrapes.is_some() => {
                // Serving means leading (a standby serves nothing).
                metrics.set_lease(
                    leadership.as_ref().map_or(0, |l| l.tenure.epoch),
                    leadership.as_ref().map(|l| l.renew_took),
                );
                let page = metrics.render(scheduler.metrics_snapshot(Instant::now()));
                let _ = scrape.send(page);
            }
            Some(done) = desk_done.recv() => {
                scheduler.on_file_done(Instant::now(), done);
                // What else the desk finished: one commit for all of it.
                while let Ok(done) = desk_done.try_recv() {
                    scheduler.on_file_done(Instant::now(), done);
                }
            }
            Some(done) = async { notify_done.as_mut()?.recv().await }, if notify_done.is_some() => {
                scheduler.on_notify_done(Instant::now(), done);
                while let Some(Ok(done)) = notify_done.as_mut().map(|r| r.try_recv()) {
                    scheduler.on_notify_done(Instant::now(), done);
                }
            }
            Some((peer, result)) = handshakes_done.recv() => {
                if let Some(v) = gate.as_mut().and_then(|g| g.complete(&peer, result)) {
                    answer_handshake(v, &peer, Instant::now(), &mut scheduler, &activity, &mut router_tx, &mut refusals, send_timeout).await;
                }
            }
            Some(Reload { list: allow, denied }) = async { reloads.as_mut()?.recv().await }, if reloads.is_some() => {
                if let Some(gate) = gate.as_mut() {
                    let now = Instant::now();
                    let identities = allow.len();
                    let allowed = allow.worker_names();
                    if let Some(d) = &dashboard {
                        let ended = d.set_users(allow.user_roles());
                        if ended > 0 {
                            info!(sessions = ended, "dashboard sessions ended: their user's key was removed or its role changed");
                        }
                    }
                    let revoked = gate.reload(allow);
                    info!(identities, revoked = revoked.len(), denied = denied.len(), "allow-lists reloaded");
                    scheduler.audit("server", "-", "reload", &format!("{identities} identities allowed, {} sessions revoked, {} entries denied", revoked.len(), denied.len()));
                    scheduler.count_shell_event("allow_list_entries_denied", denied.len() as u64);
                    for reason in denied.iter().take(20) {
                        scheduler.audit("server", "-", "denied", reason);
                    }
                    for (peer, identity) in revoked {
                        if let Ok(id) = zeromq::util::PeerIdentity::try_from(peer.clone()) {
                            router_tx.disconnect_peer(&id);
                        }
                        scheduler.on_revoked(now, &peer, &identity);
                    }
                    scheduler.retain_workers(now, |n| allowed.contains(n));
                }
            }
            _ = ticker.tick() => {
                let now = Instant::now();
                metrics.observe_tick_gap(now.saturating_duration_since(last_tick));
                last_tick = now;
                scheduler.on_tick(now);
                let refused = publisher.subscriptions_refused();
                if refused > subscriptions_refused {
                    scheduler.count_shell_event("subscriptions_refused", refused - subscriptions_refused);
                    subscriptions_refused = refused;
                }
                if let Some(d) = &dashboard {
                    let expired = web_pending.expire(&mut scheduler, now);
                    scheduler.count_shell_event("web_requests_expired", expired as u64);
                    for (name, n) in d.take_counters() {
                        scheduler.count_shell_event(name, n);
                    }
                }
                let idle = activity.take_idle(now);
                if !idle.is_empty() {
                    scheduler.count_shell_event("idle_connections_closed", idle.len() as u64);
                    debug!(closed = idle.len(), "closed connections silent for the idle timeout");
                    for peer in idle {
                        router_tx.disconnect_peer(&peer);
                    }
                }
            }
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    break;
                }
            }
        }
        // Sign-in links asked for over Noise: minted by the dashboard,
        // answered by the scheduler (audited there).
        for ask in scheduler.take_web_logins() {
            let link = match &dashboard {
                Some(d) => d.mint_link(ask.identity.clone()),
                None => Err("this server does not serve the web dashboard".to_string()),
            };
            scheduler.answer_web_login(&ask, link);
        }
        // Pongs say nothing durable: they leave before the commit (but,
        // like everything else, only from a leader inside its lease).
        let pongs = if leadership.as_mut().is_none_or(|l| l.holds(Instant::now())) {
            scheduler.take_pongs()
        } else {
            Vec::new()
        };
        if !pongs.is_empty() {
            deliver_outputs!(pongs);
        }
        // Durable first, then the acknowledgements that say so.
        supervisor.tick(Instant::now(), || scheduler.status_line());
        let changes = scheduler.take_changes();
        let committing = Instant::now();
        let committed = match leadership.as_mut() {
            None => db.commit(&changes).await,
            // A leader's commit must end inside its lease: one that hangs
            // (the database unreachable, packets dropped) would otherwise
            // keep a leader that cannot step down.
            Some(l) => {
                let commit = db.commit(&changes);
                tokio::pin!(commit);
                loop {
                    let until = tokio::time::Instant::from_std(l.tenure.valid_until());
                    match tokio::time::timeout_at(until, &mut commit).await {
                        Ok(r) => break r,
                        // Renewed meanwhile (a slow commit, a live
                        // database): wait on, to the new end of the lease.
                        Err(_) if l.holds(Instant::now()) => continue,
                        Err(_) => step_down("a commit did not finish within the lease (the database is unreachable or stalled)"),
                    }
                }
            }
        };
        if !changes.is_empty() {
            metrics.observe_commit(committing.elapsed());
        }
        if let Err(crate::server::db::StateError::Deposed { .. }) = &committed {
            step_down(&committed.expect_err("deposed").to_string());
        }
        if let Err(e) = committed {
            error!(error = %e, "storage error: cannot commit server state; stopping so that nothing is acknowledged that is not durable");
            std::process::exit(EXIT_STATE);
        }
        if let Some(gate) = gate.as_mut() {
            for (name, n) in gate.take_counters() {
                scheduler.count_shell_event(name, n);
            }
        }
        // A leader acts only inside its lease: after a stop longer than
        // it (SIGSTOP, a stalled machine) nothing of this turn leaves.
        if leadership
            .as_mut()
            .is_some_and(|l| !l.holds(Instant::now()))
        {
            step_down("the lease lapsed while this server was not running (stopped or stalled)");
        }
        let outputs = scheduler.take_outputs();
        let outputs = web_pending.answer(&mut scheduler, Instant::now(), outputs);
        deliver_outputs!(outputs);
    }
    info!("server shutting down");
    supervisor.stopping("shutting down: telling workers");
    let outputs = scheduler.shutdown_announcement(Instant::now());
    deliver_outputs!(outputs);
    // `send` only queued the shutdowns: wait (bounded) until they are
    // written to every connection, so that no worker learns of the stop
    // from a failing connection instead.
    let deadline = Instant::now() + SHUTDOWN_FLUSH;
    while router_tx.queued_bytes() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await; // polling the socket's queues, bounded by the deadline
    }
    let unsent = router_tx.queued_bytes();
    if unsent > 0 {
        warn!(
            unsent_bytes = unsent,
            "shutting down with messages still queued to peers that do not read"
        );
    }
    reader.abort();
}

/// How long an orderly stop waits for its last messages (the shutdowns)
/// to be written to the workers' connections.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(2);

/// What the control socket's reader hands the serving loop, in order.
enum Received {
    Message(ZmqMessage),
    /// Accepted, disconnected…: after every message received before it.
    Connection(zeromq::SocketEvent),
}

/// A connection came or went: a closed one's session and registration
/// end here, after everything it delivered was handled.
fn on_connection_event(
    event: zeromq::SocketEvent,
    gate: Option<&mut Gate>,
    scheduler: &mut Scheduler<DiskStore>,
    activity: &mut ConnectionActivity,
) {
    if let zeromq::SocketEvent::Disconnected(peer) = &event {
        let peer = Bytes::from(peer.clone());
        if let Some(gate) = gate {
            gate.forget(&peer);
        }
        scheduler.on_peer_closed(Instant::now(), &peer);
    }
    activity.on_event(Instant::now(), event);
}

type HandshakeJob = (Bytes, Bytes, crate::security::gate::Handshaker);
type HandshakeDone = (
    Bytes,
    Result<
        crate::security::handshake::Accepted<crate::security::Identity>,
        crate::security::SecurityError,
    >,
);

/// The thread that computes handshakes (four X25519 operations each,
/// about a millisecond) so that a reconnect storm never stalls the event
/// loop. The channels are unbounded here because the gate bounds the
/// handshakes in flight (`MAX_PENDING_HANDSHAKES`).
fn spawn_handshake_thread() -> (
    mpsc::UnboundedSender<HandshakeJob>,
    mpsc::UnboundedReceiver<HandshakeDone>,
) {
    crate::jobs::spawn(
        "ots-handshakes",
        |(peer, first, handshaker): HandshakeJob| Some((peer, handshaker.accept(&first))),
    )
}

/// Answers a completed handshake: the Noise answer when it was secured, a
/// plaintext `error{unauthenticated}` (logged and audited at a bounded
/// rate) when it was refused.
#[allow(clippy::too_many_arguments)]
async fn answer_handshake(
    verdict: Verdict,
    peer: &Bytes,
    now: Instant,
    scheduler: &mut Scheduler<DiskStore>,
    activity: &ConnectionActivity,
    router_tx: &mut zeromq::RouterSendHalf,
    refusals: &mut crate::logging::Throttle,
    send_timeout: Duration,
) {
    let mut out = vec![peer.clone()];
    match verdict {
        Verdict::Secured {
            answer, identity, ..
        } => {
            let address = activity.address(peer);
            debug!(identity = %identity.label(), %address, "handshake completed");
            scheduler.on_authenticated(peer, identity, address);
            out.extend(answer);
        }
        Verdict::Refuse {
            reason: reason @ crate::security::SecurityError::Busy(_),
        } => {
            // Admission control, not a refusal of the key: the peer
            // retries after its backoff (counted by the gate).
            let body = Body::Error {
                request: None,
                code: ErrorCode::LimitReached,
                message: reason.to_string(),
                seq: None,
            };
            out.extend(protocol::encode(
                &Header::best_effort(body.class(), None),
                &body,
                None,
            ));
        }
        Verdict::Refuse { reason } => {
            let address = activity.address(peer);
            if refusals.allow(now, "refused connections") {
                warn!(%address, %reason, "refused an unauthenticated connection");
                scheduler.audit("anonymous", &address, "refused", &reason.to_string());
            } else {
                scheduler.count_shell_event("audit_refusals_not_logged", 1);
            }
            let body = Body::Error {
                request: None,
                code: ErrorCode::Unauthenticated,
                message: reason.to_string(),
                seq: None,
            };
            out.extend(protocol::encode(
                &Header::best_effort(body.class(), None),
                &body,
                None,
            ));
        }
        _ => return,
    }
    if let Err(e) = transport::send_bounded(router_tx, to_message(out), send_timeout).await {
        debug!(error = %e, "handshake answer not sent");
    }
}

#[allow(clippy::too_many_arguments)]
/// Carries out the scheduler's outputs: sealed per connection with
/// security on (a connection without a channel gets nothing: nothing
/// leaves in the clear), bounded sends either way.
async fn deliver(
    outputs: Vec<Output>,
    scheduler: &mut Scheduler<DiskStore>,
    mut gate: Option<&mut Gate>,
    router_tx: &mut zeromq::RouterSendHalf,
    (publisher, announcer): (&mut zeromq::PubSocket, Option<&Announcer>),
    (desk, notify): (
        &mpsc::UnboundedSender<crate::server::files::FileJob>,
        Option<&mpsc::UnboundedSender<crate::notify::outbox::Job>>,
    ),
    send_timeout: Duration,
    send_failures: &mut u64,
) {
    for output in outputs {
        match output {
            Output::Send {
                peer,
                header,
                body,
                raw,
            } => {
                let plain = protocol::encode(&header, &body, raw);
                let wire = match gate.as_deref_mut() {
                    None => plain,
                    Some(gate) => match gate.seal(&peer, &plain) {
                        Some(sealed) => sealed,
                        None => {
                            scheduler.count_shell_event("send_dropped_not_secured", 1);
                            continue;
                        }
                    },
                };
                let mut frames = Vec::with_capacity(wire.len() + 1);
                frames.push(peer.clone());
                frames.extend(wire);
                match transport::send_bounded(router_tx, to_message(frames), send_timeout).await {
                    Ok(()) => {}
                    // Not reading: dropped at once (mandatory messages
                    // stay in the worker's outbox and are resent), so
                    // one stuck peer never stalls the others.
                    Err(TransportError::PeerBusy) => {
                        scheduler.count_shell_event("send_dropped_peer_busy", 1);
                        debug!(peer = %hex::encode(&peer), kind = body.kind(), "send dropped: peer not reading");
                    }
                    Err(e) => {
                        *send_failures += 1;
                        debug!(peer = %hex::encode(&peer), kind = body.kind(), error = %e, send_failures = *send_failures, "send to peer failed (peer gone?)");
                    }
                }
            }
            Output::Publish {
                topic,
                body,
                raw,
                beat,
            } => {
                let signer = match (announcer, beat) {
                    (None, _) => None,
                    (Some(a), Some(beat)) => Some((a, beat)),
                    // Security on and nothing to sign with: a testrun's
                    // traffic never goes out in the clear.
                    (Some(_), None) => {
                        scheduler.count_shell_event("publish_dropped_not_signed", 1);
                        continue;
                    }
                };
                publish(publisher, topic, &body, raw, signer, send_timeout).await
            }
            Output::File(job) => {
                if desk.send(job).is_err() {
                    error!("the file desk thread is gone; stopping so that systemd restarts the server");
                    std::process::exit(EXIT_STATE);
                }
            }
            Output::Notify(job) => {
                let sent = notify.is_some_and(|n| n.send(job).is_ok());
                if !sent {
                    // The sender task is gone (it never ends by itself).
                    error!("the notification sender is gone; stopping so that systemd restarts the server (the outbox is durable)");
                    std::process::exit(EXIT_STATE);
                }
            }
        }
    }
}

/// A reloaded allow-list and the entries it denied (each naming its file).
struct Reload {
    list: AllowList,
    denied: Vec<String>,
}

/// Reloads the allow-lists on SIGHUP and whenever a file in them changes
/// (checked every 250 ms, off the serving loop): a removed or changed key
/// takes effect within a second. Entries fail closed one by one (a bad
/// file denies its own identity, logged); a directory that cannot be
/// trusted adds no one, but removals from it still apply.
fn watch_allow_lists(
    workers: PathBuf,
    users: PathBuf,
    mut last: crate::security::allow::Fingerprint,
    mut current: AllowList,
) -> mpsc::Receiver<Reload> {
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, "cannot watch SIGHUP; allow-lists reload on file changes only");
                None
            }
        };
        // Told by the kernel when a file in either directory changes, the
        // server checks at once and re-reads everything only then; the
        // full check (a stat per file) also runs every few seconds in case
        // a change escaped the watch. Without inotify (a directory missing
        // at start, a filesystem without it), every 250 ms.
        let mut changes = watch_dirs(&[workers.clone(), users.clone()]);
        let every = if changes.is_some() {
            Duration::from_secs(5)
        } else {
            Duration::from_millis(250)
        };
        let mut tick = tokio::time::interval(every);
        loop {
            let forced = tokio::select! {
                _ = tick.tick() => false,
                event = async { changes.as_mut()?.recv().await }, if changes.is_some() => {
                    if event.is_none() {
                        // The watch ended: poll from now on.
                        changes = None;
                        tick = tokio::time::interval(Duration::from_millis(250));
                        continue;
                    }
                    // A burst of events (an editor's save, `echo > file`'s
                    // truncate and write) is one change: read it whole.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    while changes.as_mut().is_some_and(|c| c.try_recv().is_ok()) {}
                    false
                }
                Some(()) = async { hup.as_mut()?.recv().await }, if hup.is_some() => true,
            };
            let (w, u) = (workers.clone(), users.clone());
            let Ok(now) = tokio::task::spawn_blocking(move || fingerprint(&w, &u)).await else {
                continue;
            };
            if !forced && now == last {
                continue;
            }
            last = now;
            let (w, u) = (workers.clone(), users.clone());
            let Ok(list) = tokio::task::spawn_blocking(move || AllowList::load(&w, &u)).await
            else {
                continue;
            };
            match list {
                Ok(loaded) => {
                    let denied: Vec<String> = loaded.problems().map(|e| e.to_string()).collect();
                    for e in &denied {
                        error!(error = %e, "allow-list entry denied: {e}");
                    }
                    if !loaded.untrusted_dirs.is_empty() {
                        error!("an allow-list directory cannot be trusted: nobody new is admitted from it until it is fixed; removals still apply");
                    }
                    current = loaded.reloaded(&current);
                    let reload = Reload {
                        list: current.clone(),
                        denied,
                    };
                    if tx.send(reload).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    error!(error = %e, "allow-lists not reloaded: {e}; the previous lists stay in force — fix the directory")
                }
            }
        }
    });
    rx
}

/// Watches `dirs` with inotify on a thread of its own: one message per
/// batch of events. None if a directory cannot be watched (the caller
/// polls instead).
fn watch_dirs(dirs: &[PathBuf]) -> Option<mpsc::UnboundedReceiver<()>> {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC).ok()?;
    let flags = AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF;
    for dir in dirs {
        if let Err(e) = inotify.add_watch(dir, flags) {
            debug!(dir = %dir.display(), error = %e, "cannot watch the allow-list directory; polling it");
            return None;
        }
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let spawned = std::thread::Builder::new()
        .name("ots-allow-watch".into())
        .spawn(move || loop {
            match inotify.read_events() {
                Ok(_) => {
                    if tx.send(()).is_err() {
                        return;
                    }
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    warn!(error = %e, "the allow-list watch failed; changes are found by the periodic check");
                    return;
                }
            }
        });
    spawned.ok()?;
    Some(rx)
}

/// Publishes on PUB; with security signed (`[topic, header, body,
/// signature]`, PROTOCOL.md §15.4).
async fn publish(
    publisher: &mut zeromq::PubSocket,
    topic: String,
    body: &Body,
    raw: Option<Bytes>,
    signer: Option<(&Announcer, u64)>,
    timeout: Duration,
) {
    let header = Header::best_effort(body.class(), None);
    let mut frames = vec![Bytes::from(topic)];
    frames.extend(protocol::encode(&header, body, raw));
    if let Some((announcer, beat)) = signer {
        let signature = announcer.sign(beat, &frames[1], &frames[2]);
        frames.truncate(3);
        frames.push(signature);
    }
    if let Err(e) = transport::send_bounded(publisher, to_message(frames), timeout).await {
        debug!(error = %e, "publish failed");
    }
}

/// File descriptors kept free for the state database, task logs, result
/// files and the listeners themselves.
const FD_RESERVE: u64 = 512;

/// Caps the per-endpoint connection limit so that both endpoints together
/// stay below the process's file descriptor limit (`LimitNOFILE=`): the
/// server refuses connections cleanly instead of failing `accept` in a loop.
fn fit_connections_to_fd_limit(wanted: usize) -> usize {
    let soft = match nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
        Ok((soft, _)) => soft,
        Err(_) => return wanted,
    };
    let fit = usize::try_from(soft.saturating_sub(FD_RESERVE) / 2)
        .unwrap_or(usize::MAX)
        .max(16);
    if fit < wanted {
        warn!(
            wanted,
            allowed = fit,
            fd_limit = soft,
            "limits.max_connections lowered to fit the file descriptor limit; raise LimitNOFILE to allow more"
        );
        fit
    } else {
        wanted
    }
}

/// When each control connection was last heard from, to close the ones
/// that stay silent past the idle timeout. Fed by the socket monitor
/// (accepted, disconnected) and every received message; scanned at most
/// four times per timeout, so its cost per message is one map update.
struct ConnectionActivity {
    idle_timeout: Duration,
    last: std::collections::HashMap<Bytes, Instant>,
    /// The remote address of each connection, for logs and the audit log.
    addresses: std::collections::HashMap<Bytes, String>,
    scanned: Instant,
}

impl ConnectionActivity {
    fn new(idle_timeout: Duration) -> Self {
        ConnectionActivity {
            idle_timeout,
            last: std::collections::HashMap::new(),
            addresses: std::collections::HashMap::new(),
            scanned: Instant::now(),
        }
    }

    fn on_event(&mut self, now: Instant, event: zeromq::SocketEvent) {
        match event {
            zeromq::SocketEvent::Accepted(endpoint, peer) => {
                let peer = Bytes::from(peer);
                self.addresses.insert(peer.clone(), endpoint.to_string());
                self.last.insert(peer, now);
            }
            zeromq::SocketEvent::Disconnected(peer) => {
                let peer = Bytes::from(peer);
                self.last.remove(&peer);
                self.addresses.remove(&peer);
            }
            _ => {}
        }
    }

    fn address(&self, peer: &Bytes) -> String {
        self.addresses
            .get(peer)
            .cloned()
            .unwrap_or_else(|| "-".to_string())
    }

    fn heard(&mut self, peer: &Bytes, now: Instant) {
        if let Some(t) = self.last.get_mut(peer) {
            *t = now;
        }
    }

    /// Connections silent for longer than the idle timeout, forgotten here.
    fn take_idle(&mut self, now: Instant) -> Vec<zeromq::util::PeerIdentity> {
        if now.saturating_duration_since(self.scanned) < self.idle_timeout / 4 {
            return Vec::new();
        }
        self.scanned = now;
        let timeout = self.idle_timeout;
        let idle: Vec<Bytes> = self
            .last
            .iter()
            .filter(|(_, t)| now.saturating_duration_since(**t) > timeout)
            .map(|(p, _)| p.clone())
            .collect();
        idle.into_iter()
            .filter_map(|p| {
                self.last.remove(&p);
                self.addresses.remove(&p);
                zeromq::util::PeerIdentity::try_from(p).ok()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn received_bytes_are_bounded_and_given_back_once_handled() {
        let kib = InboundBytes::new(64 * 1024);
        let big = ZmqMessage::from(vec![0u8; 40 * 1024]);
        let small = ZmqMessage::from(vec![0u8; 10]);
        assert_eq!(kib.cost(&big), 40);
        assert_eq!(kib.cost(&small), 1, "every message costs something");
        let huge = ZmqMessage::from(vec![0u8; 1024 * 1024]);
        assert_eq!(
            kib.cost(&huge),
            64,
            "a message larger than the bound still fits alone"
        );
        kib.take(&big).await;
        // A second 40 KiB message does not fit until the first is handled.
        let waiting = kib.take(&big);
        tokio::pin!(waiting);
        assert!(
            futures::poll!(waiting.as_mut()).is_pending(),
            "the reader must wait"
        );
        kib.give_back(&big);
        waiting.await;
    }
}
