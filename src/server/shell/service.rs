//! How `ots-server` starts: the configuration checked, the lease taken
//! (with PostgreSQL; a standby waits here), the state restored, the
//! sockets, the dashboard and the metrics endpoint bound, then the
//! serving loop ([`crate::server::shell::serving`]) spawned behind a
//! [`ServerHandle`]. Every way the server can fail is a [`ServerError`];
//! the binary chooses the exit status.

use crate::security::allow::{fingerprint, Fingerprint};
use crate::security::broadcast::Announcer;
use crate::security::Gate;
use crate::server::config::{ServerConfig, ServerCredentials};
use crate::server::scheduler::{Scheduler, SchedulerConfig};
pub use crate::server::shell::error::{Fatal, ServerError};
use crate::server::shell::reload::{watch_allow_lists, Reload};
use crate::server::shell::serving::{serve, Helpers, Leadership, Pace};
use crate::server::store::state::StateStore;
use crate::server::store::DiskStore;
use crate::shutdown::Stop;
use crate::transport;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

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
    stop: watch::Sender<Stop>,
    task: JoinHandle<Result<(), Fatal>>,
}

impl ServerHandle {
    /// Serves until `requested` resolves, then announces the shutdown to
    /// the workers and stops; or until the server fails by itself (the
    /// lease lost, a commit failed: the error says which).
    pub async fn run_until(
        self,
        requested: impl std::future::Future<Output = ()>,
    ) -> Result<(), ServerError> {
        let ServerHandle { stop, mut task, .. } = self;
        tokio::select! {
            ended = &mut task => return Ok(ended.map_err(ServerError::Task)??),
            () = requested => {}
        }
        let _ = stop.send(Stop::Gracefully);
        Ok(task.await.map_err(ServerError::Task)??)
    }

    /// Announces shutdown to workers and stops.
    pub async fn shutdown(self) -> Result<(), ServerError> {
        self.run_until(async {}).await
    }

    /// Waits until the server stops by itself (it does not, unless it fails).
    pub async fn wait(self) -> Result<(), ServerError> {
        self.run_until(std::future::pending()).await
    }
}

/// Entry point of the server.
pub struct Server;

/// How long a server that stepped down waits before it tries to lead
/// again, at first (doubling to [`RETRY_MAX`] while starting fails).
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);

impl Fatal {
    /// With PostgreSQL, whether a server that stopped for this becomes a
    /// standby in the same process: it lost the lease, or could not
    /// commit (the database is gone past the lease). Another server may
    /// lead meanwhile; this one leads again when the lease is free.
    fn steps_down(&self) -> bool {
        matches!(self, Fatal::Deposed { .. } | Fatal::Commit(_))
    }
}

impl ServerError {
    /// Starting failed for something that may come back by itself (the
    /// database, a port still held by the serving loop that just ended).
    fn may_pass(&self) -> bool {
        !self.is_configuration()
            && matches!(
                self,
                ServerError::State(_)
                    | ServerError::Transport(_)
                    | ServerError::Web(_)
                    | ServerError::Metrics { .. }
            )
    }
}

impl Server {
    /// Serves until `requested` resolves (then stops gracefully). With
    /// PostgreSQL a server that steps down (its lease lapsed while the
    /// database was away, or another server took it) does not end: it
    /// becomes a standby in this same process — its sockets closed, its
    /// state dropped — and leads again, from the database's state, when
    /// the lease is free; a start that fails for a database still away is
    /// tried again. Nothing acknowledged is lost (acknowledgements follow
    /// commits) and nothing runs twice (the new leader's epoch fences the
    /// old one's commits). With SQLite, a stop is the end.
    pub async fn run(
        cfg: ServerConfig,
        requested: impl std::future::Future<Output = ()>,
    ) -> Result<(), ServerError> {
        let in_process = cfg.postgres().is_some();
        tokio::pin!(requested);
        let mut wait = RETRY_FIRST;
        let mut first = true;
        loop {
            let started = tokio::select! {
                s = Server::start(cfg.clone()) => s,
                () = &mut requested => return Ok(()),
            };
            let server = match started {
                Ok(s) => s,
                Err(e) if in_process && !first && e.may_pass() => {
                    warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "standby: cannot lead again yet; trying again");
                    tokio::select! {
                        // Backoff between attempts to lead again, not
                        // synchronisation.
                        () = tokio::time::sleep(wait) => {}
                        () = &mut requested => return Ok(()),
                    }
                    wait = (wait * 2).min(RETRY_MAX);
                    continue;
                }
                Err(e) => return Err(e),
            };
            first = false;
            wait = RETRY_FIRST;
            match server.run_until(&mut requested).await {
                Err(ServerError::Stopped(f)) if in_process && f.steps_down() => {
                    warn!(reason = %f, "stepped down: this server is a standby now, in this same process; it leads again when the lease is free");
                }
                other => return other,
            }
        }
    }

    /// Binds the sockets and starts serving in the background.
    pub async fn start(cfg: ServerConfig) -> Result<ServerHandle, ServerError> {
        let files_dir = prepare(&cfg)?;
        // Every target's secret and credentials are read before anything
        // is bound: a missing file is named at start, not at the first
        // testrun's end.
        let notify_rules = cfg.notify.rules(None)?;
        // Always running, even with nothing configured: deliveries kept
        // from an earlier configuration still get their answer (a target
        // that is gone fails them, listed) instead of stopping the server.
        let sender = crate::notify::sender::Sender::from_config(&cfg.notify)?;
        let mut db = StateStore::open(&cfg.state_dir, &files_dir, cfg.postgres().as_ref()).await?;
        let incarnation = format!("{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff);
        let leadership = lead(&cfg, &mut db, &incarnation).await?;
        // Taken before the lists are read: any change after it is reloaded.
        let listed = fingerprint(&cfg.workers_dir, &cfg.users_dir);
        let credentials = cfg.credentials()?;
        log_security(&cfg, credentials.as_ref());
        let store = DiskStore::open(&files_dir)?;
        let snapshot = db.load().await?;
        let history = db.history_reader().await?.with_logs(&files_dir);
        let mut socket_limits = cfg.limits.sockets();
        let chosen =
            cfg.limits.max_connections != crate::transport::SocketLimits::default().max_connections;
        socket_limits.max_connections =
            fit_connections_to_fd_limit(socket_limits.max_connections, chosen);
        let sockets = transport::bind_server(&cfg.control, &cfg.events, &socket_limits).await?;
        // With security, broadcasts are signed with a key of this
        // incarnation's own (PROTOCOL.md §15.4).
        let announcer = credentials.as_ref().map(|_| Announcer::generate());
        let settings = scheduler_config(
            &cfg,
            credentials.as_ref(),
            announcer.as_ref(),
            leadership.as_ref(),
            &sockets.control,
            notify_rules,
        );
        let mut scheduler = Scheduler::restore(
            settings,
            store,
            incarnation.clone(),
            &snapshot,
            (Instant::now(), crate::protocol::limits::unix_ms_now()),
        )
        .map_err(|source| ServerError::Restore {
            path: PathBuf::from(db.describe()),
            source,
        })?;
        scheduler.set_stored_inputs(crate::server::store::files::stored_inputs(&files_dir));
        let scrapes = start_metrics(&cfg).await?;
        let web = start_web(&cfg, credentials.as_ref()).await?;
        let web_url = web.as_ref().map(|w| w.dashboard.base_url.clone());
        scheduler.set_dashboard(web_url.clone());
        log_listening(&cfg, &sockets, web_url.as_deref(), &db, &incarnation);
        let (gate, reloads) = admit(&cfg, credentials, listed, &mut scheduler);
        let (stop, stop_rx) = watch::channel(Stop::Run);
        let (control, events) = (sockets.control.clone(), sockets.events.clone());
        let helpers = Helpers {
            desk: crate::server::store::files::spawn(&files_dir, Some(db.case_sink().await?)),
            notifications: Some(sender.spawn()),
            reloads,
            history: super::history::spawn(history),
        };
        let pace = Pace {
            heartbeat: cfg.heartbeat(),
            send_timeout: Duration::from_millis(cfg.send_timeout_ms),
            inbound_queue: cfg.limits.inbound_queue,
            inbound_queue_bytes: cfg.limits.inbound_queue_bytes,
            idle_timeout: Duration::from_millis(cfg.limits.idle_timeout_ms),
            scrapes,
            web,
            leadership,
        };
        let task = tokio::spawn(serve(
            scheduler,
            db,
            helpers,
            sockets,
            (gate, announcer),
            pace,
            stop_rx,
        ));
        Ok(ServerHandle {
            control,
            events,
            incarnation,
            web: web_url,
            stop,
            task,
        })
    }
}

/// Checks what can be checked before anything is opened: the settings,
/// the keys and allow-lists (a mistake is said at once, before a standby
/// waits), the folders and the audit log; returns the files folder.
#[allow(clippy::result_large_err)] // once, at start
fn prepare(cfg: &ServerConfig) -> Result<PathBuf, ServerError> {
    cfg.validate()?;
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
    Ok(files_dir)
}

/// With PostgreSQL: one leader among the servers sharing it. A standby
/// waits here, bound to nothing but the control endpoint, where it answers
/// `not_leader` naming the leader, so that workers and clients move on at
/// once. Under systemd a standby is up (READY, its watchdog pinged while
/// it waits): a wait longer than TimeoutStartSec is not a failure.
async fn lead(
    cfg: &ServerConfig,
    db: &mut StateStore,
    incarnation: &str,
) -> Result<Option<Leadership>, ServerError> {
    let policy = cfg.lease_policy();
    let mut standby_supervisor = crate::supervision::Supervisor::new();
    let mut told_ready = false;
    let standby = match cfg.postgres() {
        Some(_) => {
            match crate::server::shell::standby::Standby::bind(&cfg.control, &cfg.limits.sockets())
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
    let waiting = |v: Option<&crate::server::store::pg::LeaseView>| {
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
    let led = db.lead(incarnation, &cfg.control, policy, waiting).await;
    if let Some(s) = standby {
        s.close().await;
    }
    let Some((epoch, granted)) = led? else {
        return Ok(None);
    };
    info!(epoch, database = %db.describe(), "leader: this server holds the lease");
    let settings = cfg.postgres().expect("a lease only with PostgreSQL");
    let renewals = crate::server::store::pg::PgDb::spawn_renewer(
        &settings,
        incarnation.to_string(),
        epoch,
        policy,
    )
    .await?;
    Ok(Some(Leadership {
        tenure: crate::server::lease::Tenure::granted(policy, epoch, granted),
        renewals,
        renew_took: Duration::ZERO,
        since_ms: crate::protocol::limits::unix_ms_now(),
    }))
}

/// Says at start who can connect, and warns where no one can.
fn log_security(cfg: &ServerConfig, credentials: Option<&ServerCredentials>) {
    if credentials.is_some_and(|c| c.allow.is_empty()) {
        warn!(workers_dir = %cfg.workers_dir.display(), users_dir = %cfg.users_dir.display(), "no identity is allowed: no worker or user can connect until a NAME.pub is put into workers_dir or users_dir");
    }
    match credentials {
        None => warn!("security = \"none\": every peer that reaches the control port is trusted and nothing is encrypted; use this in a closed lab only"),
        Some(c) => info!(
            identities = c.allow.len(),
            workers_dir = %cfg.workers_dir.display(),
            users_dir = %cfg.users_dir.display(),
            "security on: Noise IK; peers authenticate with allow-listed keys"
        ),
    }
}

/// The scheduler's own settings, made of the server's.
fn scheduler_config(
    cfg: &ServerConfig,
    credentials: Option<&ServerCredentials>,
    announcer: Option<&Announcer>,
    leadership: Option<&Leadership>,
    control: &str,
    notify: crate::notify::outbox::Rules,
) -> SchedulerConfig {
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
        retention_age: Duration::from_secs(cfg.retention.max_age_hours.saturating_mul(3600)),
        retention_bytes: cfg.retention.max_bytes,
        history: cfg.history.rules(),
        results: cfg.results.rules(),
        secure: credentials.is_some(),
        secrets_key: credentials.map(|c| c.keys[0].derive("ots testrun secrets at rest v1")),
        events_key: announcer.map(Announcer::public_key),
        health: cfg.health_policy(),
        infrastructure_exit_codes: cfg.health.infrastructure_exit_codes.clone(),
        checks: cfg.health_checks(),
        weights: cfg.weights(),
        priority_lead: Duration::from_secs(cfg.fairshare.priority_lead_secs),
        leases: cfg.leases.rules(),
        web: !cfg.web.is_empty(),
        notify,
        epoch: leadership.map(|l| l.tenure.epoch as u64),
        lease: leadership.map(|l| crate::protocol::LeaseInfo {
            epoch: l.tenure.epoch as u64,
            since_ms: l.since_ms,
            endpoint: control.to_string(),
        }),
    }
}

/// The metrics endpoint (`GET /metrics`), when configured: its scrapes
/// are answered by the serving loop.
async fn start_metrics(
    cfg: &ServerConfig,
) -> Result<Option<mpsc::Receiver<crate::server::shell::metrics::Scrape>>, ServerError> {
    if cfg.metrics.is_empty() {
        return Ok(None);
    }
    let listener = tokio::net::TcpListener::bind(&cfg.metrics)
        .await
        .map_err(|source| ServerError::Metrics {
            addr: cfg.metrics.clone(),
            source,
        })?;
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(crate::server::shell::metrics::serve(listener, tx));
    Ok(Some(rx))
}

/// The web dashboard, when configured.
async fn start_web(
    cfg: &ServerConfig,
    credentials: Option<&ServerCredentials>,
) -> Result<Option<crate::web::WebHandle>, ServerError> {
    let Some(web_cfg) = cfg.web_config()? else {
        return Ok(None);
    };
    let plain_on_network = !web_cfg.addr.ip().is_loopback() && web_cfg.tls.is_none();
    let proxy = web_cfg.proxy_user_header.clone().map(|h| {
        let from: Vec<String> = web_cfg
            .trusted_proxies
            .iter()
            .map(ToString::to_string)
            .collect();
        (h, from.join(", "))
    });
    let users = credentials.map(|c| c.allow.user_grants());
    let handle = crate::web::start(web_cfg, users).await?;
    if let Some((header, from)) = proxy {
        warn!(
            header = %header,
            trusted = %from,
            "web_proxy_user_header is set: any process that connects to the dashboard from a web_trusted_proxies address acts as whichever user it names in this header, with that user's role (on a loopback address: every local user and process); list only the proxy's own address there, bind `web` where only the proxy reaches it, and have the proxy strip the header from what clients send"
        );
    }
    if plain_on_network {
        warn!(web = %handle.addr, "web_insecure = true: the dashboard serves plain HTTP on a network address; session cookies and sign-in links can be read on the way: set web_tls_cert and web_tls_key");
    }
    info!(url = %handle.dashboard.base_url, "web dashboard listening");
    Ok(Some(handle))
}

fn log_listening(
    cfg: &ServerConfig,
    sockets: &transport::ServerSockets,
    web_url: Option<&str>,
    db: &StateStore,
    incarnation: &str,
) {
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
        web = %web_url.unwrap_or("off"),
        metrics = %if cfg.metrics.is_empty() { "off" } else { cfg.metrics.as_str() },
        state_dir = %cfg.state_dir.display(),
        database = %db.describe(),
        server = %incarnation,
        "server listening"
    );
}

/// With security: the gate every connection passes, and the allow-lists
/// watched for changes. Workers whose key went while the server was down
/// are not listed (nor waited for); denied entries are logged and audited.
fn admit(
    cfg: &ServerConfig,
    credentials: Option<ServerCredentials>,
    listed: Fingerprint,
    scheduler: &mut Scheduler<DiskStore>,
) -> (Option<Gate>, Option<mpsc::Receiver<Reload>>) {
    let Some(c) = credentials else {
        return (None, None);
    };
    let allowed = c.allow.worker_names();
    scheduler.retain_workers(Instant::now(), |n| allowed.contains(n));
    for e in &c.refused {
        warn!(error = %e, "allow-list entry denied: {e}; the other entries are in force");
        scheduler.audit(Instant::now(), "server", "-", "denied", &e.to_string());
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

/// File descriptors kept free for the state database, task logs, result
/// files and the listeners themselves.
const FD_RESERVE: u64 = 512;

/// Caps the per-endpoint connection limit so that both endpoints together
/// stay below the process's file descriptor limit (`LimitNOFILE=`): the
/// server refuses connections cleanly instead of failing `accept` in a loop.
/// Only a limit the operator chose (`chosen`) is worth a warning when it
/// does not fit; the default one is fitted quietly (said at info).
fn fit_connections_to_fd_limit(wanted: usize, chosen: bool) -> usize {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (mut soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(_) => return wanted,
    };
    // The soft limit (1024 on most shells) is raised as far as the hard
    // one allows first, as systemd does for services: a lab started from
    // a terminal needs no LimitNOFILE and says nothing about it.
    let needed = (wanted as u64).saturating_mul(2).saturating_add(FD_RESERVE);
    if soft < needed {
        let raised = needed.min(hard);
        if raised > soft && setrlimit(Resource::RLIMIT_NOFILE, raised, hard).is_ok() {
            soft = raised;
        }
    }
    let fit = usize::try_from(soft.saturating_sub(FD_RESERVE) / 2)
        .unwrap_or(usize::MAX)
        .max(16);
    if fit < wanted && chosen {
        warn!(
            wanted,
            allowed = fit,
            fd_limit = soft,
            "limits.max_connections lowered to fit the file descriptor limit (its hard limit too); raise LimitNOFILE (systemd) or `ulimit -Hn` to allow more"
        );
        fit
    } else if fit < wanted {
        info!(
            allowed = fit,
            fd_limit = soft,
            "connections per endpoint lowered to fit the file descriptor limit"
        );
        fit
    } else {
        wanted
    }
}
