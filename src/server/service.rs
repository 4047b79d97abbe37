//! The tokio shell of `ots-server`: binds ROUTER and PUB, feeds the
//! [`Scheduler`] with decoded messages and heartbeat ticks, and carries out
//! its outputs with bounded sends.

use crate::config::ServerConfig;
use crate::protocol::{self, Body, Header, PROTOCOL_VERSION};
use crate::server::db::Db;
use crate::server::scheduler::{Output, Scheduler, SchedulerConfig};
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
/// Exit status when state cannot be committed (sysexits EX_IOERR).
const EXIT_STATE: i32 = 74;
use zeromq::prelude::*;
use zeromq::ZmqMessage;

/// Why the server could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("state directory {path}: {source}")]
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
    #[error("state database {path}: {source}; restore a backup or move the state directory away")]
    Restore {
        path: PathBuf,
        source: crate::server::scheduler::RestoreError,
    },
}

/// A running server.
pub struct ServerHandle {
    /// The bound control endpoint (port resolved).
    pub control: String,
    /// The bound events endpoint (port resolved).
    pub events: String,
    /// This run's incarnation id.
    pub incarnation: String,
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
        std::fs::create_dir_all(&cfg.state_dir).map_err(|source| ServerError::StateDir {
            path: cfg.state_dir.clone(),
            source,
        })?;
        let db = Db::open(&cfg.state_dir)?;
        let store = DiskStore::open(&cfg.state_dir)?;
        let snapshot = db.load()?;
        let mut socket_limits = cfg.limits.sockets();
        socket_limits.max_connections = fit_connections_to_fd_limit(socket_limits.max_connections);
        let sockets = transport::bind_server(&cfg.control, &cfg.events, &socket_limits).await?;
        let incarnation = format!("{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff);
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
            },
            store,
            incarnation.clone(),
            &snapshot,
            Instant::now(),
        )
        .map_err(|source| ServerError::Restore {
            path: db.path().to_path_buf(),
            source,
        })?;
        info!(
            control = %sockets.control,
            events = %sockets.events,
            state_dir = %cfg.state_dir.display(),
            server = %incarnation,
            "server listening"
        );
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let control = sockets.control.clone();
        let events = sockets.events.clone();
        let send_timeout = Duration::from_millis(cfg.send_timeout_ms);
        let task = tokio::spawn(serve(
            scheduler,
            db,
            sockets,
            Pace {
                heartbeat: cfg.heartbeat(),
                send_timeout,
                inbound_queue: cfg.limits.inbound_queue,
                idle_timeout: Duration::from_millis(cfg.limits.idle_timeout_ms),
            },
            shutdown_rx,
        ));
        Ok(ServerHandle {
            control,
            events,
            incarnation,
            shutdown: shutdown_tx,
            task,
        })
    }
}

/// The timings and queue size the serving loop runs with.
struct Pace {
    heartbeat: Duration,
    send_timeout: Duration,
    inbound_queue: usize,
    idle_timeout: Duration,
}

async fn serve(
    mut scheduler: Scheduler<DiskStore>,
    mut db: Db,
    sockets: transport::ServerSockets,
    pace: Pace,
    mut shutdown: watch::Receiver<bool>,
) {
    let Pace {
        heartbeat,
        send_timeout,
        inbound_queue,
        idle_timeout,
    } = pace;
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
    let (inbound_tx, mut inbound_rx) = mpsc::channel::<ZmqMessage>(inbound_queue);
    // Receiving in its own task keeps the select below free of
    // cancellation hazards inside the socket's recv.
    let reader = tokio::spawn(async move {
        loop {
            match router_rx.recv().await {
                Ok(msg) => {
                    if inbound_tx.send(msg).await.is_err() {
                        return;
                    }
                }
                Err(e) => warn!(error = %e, "control socket receive error"),
            }
        }
    });
    let mut ticker = tokio::time::interval(heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut send_failures = 0u64;
    loop {
        tokio::select! {
            Some(msg) = inbound_rx.recv() => {
                // Take what else is waiting too: one commit for the batch.
                let mut batch = vec![msg];
                while batch.len() < MAX_BATCH {
                    match inbound_rx.try_recv() {
                        Ok(m) => batch.push(m),
                        Err(_) => break,
                    }
                }
                for msg in batch {
                    let mut frames = msg.into_vec();
                    if frames.is_empty() {
                        continue;
                    }
                    let peer = frames.remove(0);
                    activity.heard(&peer, Instant::now());
                    match protocol::decode(frames) {
                        Ok(env) => scheduler.on_message(Instant::now(), &peer, env),
                        Err(e) => scheduler.on_bad_frames(&peer, &e),
                    }
                }
            }
            Some(event) = futures::StreamExt::next(&mut connections) => {
                if let zeromq::SocketEvent::Disconnected(peer) = &event {
                    scheduler.on_peer_closed(Instant::now(), &Bytes::from(peer.clone()));
                }
                activity.on_event(Instant::now(), event);
            }
            _ = ticker.tick() => {
                let now = Instant::now();
                scheduler.on_tick(now);
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
        // Durable first, then the acknowledgements that say so.
        let changes = scheduler.take_changes();
        if let Err(e) = db.commit(&changes) {
            error!(error = %e, "storage error: cannot commit server state; stopping so that nothing is acknowledged that is not durable");
            std::process::exit(EXIT_STATE);
        }
        for output in scheduler.take_outputs() {
            match output {
                Output::Send {
                    peer,
                    header,
                    body,
                    raw,
                } => {
                    let mut frames = vec![peer.clone()];
                    frames.extend(protocol::encode(&header, &body, raw));
                    match transport::send_bounded(&mut router_tx, to_message(frames), send_timeout)
                        .await
                    {
                        Ok(()) => {}
                        // Not reading: dropped at once (mandatory messages
                        // stay in the worker's outbox and are resent), so
                        // one stuck peer never stalls the others.
                        Err(TransportError::PeerBusy) => {
                            scheduler.count_shell_event("send_dropped_peer_busy", 1);
                            debug!(peer = %hex::encode(&peer), kind = body.kind(), "send dropped: peer not reading");
                        }
                        Err(e) => {
                            send_failures += 1;
                            debug!(peer = %hex::encode(&peer), kind = body.kind(), error = %e, send_failures, "send to peer failed (peer gone?)");
                        }
                    }
                }
                Output::Publish { topic, body } => {
                    publish(&mut publisher, topic, &body, send_timeout).await
                }
            }
        }
    }
    info!("server shutting down");
    let body = Body::Shutdown {
        server: scheduler.incarnation().to_string(),
    };
    publish(&mut publisher, "hb".into(), &body, send_timeout).await;
    reader.abort();
}

async fn publish(publisher: &mut zeromq::PubSocket, topic: String, body: &Body, timeout: Duration) {
    let header = Header {
        v: PROTOCOL_VERSION,
        class: body.class(),
        mandatory: false,
        seq: 0,
        task: None,
    };
    let mut frames = vec![Bytes::from(topic)];
    frames.extend(protocol::encode(&header, body, None));
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
    scanned: Instant,
}

impl ConnectionActivity {
    fn new(idle_timeout: Duration) -> Self {
        ConnectionActivity {
            idle_timeout,
            last: std::collections::HashMap::new(),
            scanned: Instant::now(),
        }
    }

    fn on_event(&mut self, now: Instant, event: zeromq::SocketEvent) {
        match event {
            zeromq::SocketEvent::Accepted(_, peer) => {
                self.last.insert(Bytes::from(peer), now);
            }
            zeromq::SocketEvent::Disconnected(peer) => {
                self.last.remove(&Bytes::from(peer));
            }
            _ => {}
        }
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
                zeromq::util::PeerIdentity::try_from(p).ok()
            })
            .collect()
    }
}
