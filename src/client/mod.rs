//! The request/response client behind `ots-submit`: one DEALER with a
//! fresh identity, request ids to match replies, a deadline on every call
//! (the "give up and report" philosophy: an interactive caller never hangs).
//!
//! - [`follow`]: watching a testrun's progress and logs (PUB + catch-up).
//! - [`transfer`]: input files up and result files down, verified, with
//!   credit-based flow control.
//!
//! The `ots-submit` commands that print for people are `crate::cli`.

pub mod follow;
pub mod leases;
pub mod results;
pub mod transfer;

use crate::protocol::{
    self, Body, ErrorCode, Header, HealthAction, HealthChange, NotificationInfo, NotifyTargetInfo,
    RunId, RunStatus, TaskId, TestrunRequest, WorkerInfo, PROTOCOL_VERSION,
};
use crate::security::link::{self, LinkError};
use crate::security::{Channel, Credentials, Identity};
use crate::transport::{self, to_message, TransportError};
use bytes::Bytes;
use std::time::Duration;
use zeromq::prelude::*;
use zeromq::DealerSocket;

/// Exit statuses of `ots-submit` (sysexits.h where one fits).
pub mod exit {
    pub const PASS: i32 = 0;
    pub const FAIL: i32 = 1;
    pub const ERROR: i32 = 2;
    /// The testrun was cancelled.
    pub const CANCELLED: i32 = 3;
    /// EX_USAGE: bad command line.
    pub const USAGE: i32 = 64;
    /// EX_DATAERR: the server refused the request (no queue, unknown run…).
    pub const REFUSED: i32 = 65;
    /// EX_UNAVAILABLE: the server did not answer.
    pub const UNREACHABLE: i32 = 69;
    /// EX_SOFTWARE: the embedded local server or workers failed.
    pub const SOFTWARE: i32 = 70;
    /// EX_IOERR: fetched files could not be written.
    pub const IO: i32 = 74;
    /// EX_PROTOCOL: the server answered something unexpected.
    pub const PROTOCOL: i32 = 76;
    /// EX_NOPERM: the server did not accept our key, or our role may not
    /// do what was asked.
    pub const NOPERM: i32 = 77;
    /// EX_CONFIG: our own key files are missing or unusable.
    pub const CONFIG: i32 = 78;
}

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("server unreachable at {endpoint}: no answer within {} ms; is ots-server running there?", timeout.as_millis())]
    Unreachable { endpoint: String, timeout: Duration },
    #[error(
        "server at {endpoint} refused the connection ({reason}); is ots-server running there?"
    )]
    ConnectionRefused { endpoint: String, reason: String },
    #[error("server refused: {message}")]
    Refused { code: ErrorCode, message: String },
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("cannot write {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Credentials(String),
    /// The thread that hashes a download could not start or failed (this
    /// machine is out of threads or memory).
    #[error("cannot hash the download on this machine: {0}")]
    Hashing(String),
}

impl ClientError {
    /// The process exit status for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            ClientError::Unreachable { .. }
            | ClientError::ConnectionRefused { .. }
            | ClientError::Refused {
                code: ErrorCode::NotLeader,
                ..
            } => exit::UNREACHABLE,
            ClientError::Refused {
                code: ErrorCode::Forbidden | ErrorCode::Unauthenticated,
                ..
            } => exit::NOPERM,
            ClientError::Refused { .. } => exit::REFUSED,
            ClientError::Credentials(_) => exit::CONFIG,
            ClientError::Protocol(_) => exit::PROTOCOL,
            ClientError::Io { .. } | ClientError::Hashing(_) => exit::IO,
        }
    }
}

/// A connection to one server's control socket.
pub struct Client {
    endpoint: String,
    /// The endpoints as given (one, or the list of servers that may
    /// lead): what a reconnect tries.
    servers: String,
    timeout: Duration,
    socket: DealerSocket,
    next_request: u64,
    credentials: Credentials,
    /// The sealed channel (security on).
    channel: Option<Channel>,
    /// Who the server took us for (security on).
    identity: Option<Identity>,
    /// What the server answered the connect's ping: its incarnation and
    /// (PostgreSQL) the lease it leads under.
    pong: (String, Option<crate::protocol::LeaseInfo>),
}

impl Client {
    /// Connects and pings; fails with [`ClientError::Unreachable`] within
    /// about `timeout` if nothing answers. A server busy admitting other
    /// connections (a reconnect storm) is retried until `timeout`.
    /// Connects to the server at `endpoint`, or to the first of a list
    /// (`tcp://a:5555, tcp://b:5555`) that answers as the leader (a
    /// standby answers `not_leader`, and the next one is tried).
    pub async fn connect(
        endpoint: &str,
        timeout: Duration,
        credentials: &Credentials,
    ) -> Result<Self, ClientError> {
        let list = crate::settings::endpoints(endpoint);
        // With a list, a server that is down (its port refused) is
        // passed at once: the call costs nothing for it.
        let fail_fast = list.len() > 1;
        let mut last = None;
        for ep in list.iter() {
            match Self::connect_to(ep, timeout, credentials, fail_fast).await {
                // A standby says so at once: the next server may lead.
                Err(
                    e @ (ClientError::Unreachable { .. }
                    | ClientError::ConnectionRefused { .. }
                    | ClientError::Refused {
                        code: ErrorCode::NotLeader,
                        ..
                    }),
                ) => last = Some(e),
                Ok(mut c) => {
                    c.servers = endpoint.to_string();
                    return Ok(c);
                }
                other => return other,
            }
        }
        Err(last.unwrap_or(ClientError::Unreachable {
            endpoint: endpoint.to_string(),
            timeout,
        }))
    }

    /// Connects to exactly `endpoint`, a refused connection failing at
    /// once ([`ClientError::ConnectionRefused`]): asking several servers
    /// where each stands (`ots-submit leader`).
    pub async fn connect_fail_fast(
        endpoint: &str,
        timeout: Duration,
        credentials: &Credentials,
    ) -> Result<Self, ClientError> {
        Self::connect_to(endpoint, timeout, credentials, true).await
    }

    async fn connect_to(
        endpoint: &str,
        timeout: Duration,
        credentials: &Credentials,
        fail_fast: bool,
    ) -> Result<Self, ClientError> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match Self::connect_once(endpoint, timeout, credentials, fail_fast).await {
                Err(ClientError::Refused {
                    code: ErrorCode::LimitReached,
                    ..
                }) if std::time::Instant::now() + Duration::from_millis(500) < deadline => {
                    // A retry pause with jitter, not a synchronisation.
                    let pause = 100 + rand::random::<u64>() % 400;
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
                other => return other,
            }
        }
    }

    async fn connect_once(
        endpoint: &str,
        timeout: Duration,
        credentials: &Credentials,
        fail_fast: bool,
    ) -> Result<Self, ClientError> {
        let unreachable = || ClientError::Unreachable {
            endpoint: endpoint.to_string(),
            timeout,
        };
        let connected = match fail_fast {
            true => transport::connect_dealer_fail_fast(endpoint, timeout).await,
            false => transport::connect_dealer(endpoint, timeout).await,
        };
        let mut socket = match connected {
            Ok(s) => s,
            Err(TransportError::ConnectTimeout { .. }) => return Err(unreachable()),
            Err(TransportError::Connect {
                source: zeromq::ZmqError::Network(e),
                ..
            }) if fail_fast => {
                return Err(ClientError::ConnectionRefused {
                    endpoint: endpoint.to_string(),
                    reason: e.to_string(),
                })
            }
            Err(e) => {
                return Err(ClientError::Protocol(format!(
                    "cannot connect to {endpoint}: {e}"
                )));
            }
        };
        let (channel, identity) = match credentials {
            Credentials::None => (None, None),
            Credentials::Noise { key, server } => {
                match link::handshake(&mut socket, key, server, timeout).await {
                    Ok((channel, identity)) => (Some(channel), Some(identity)),
                    Err(LinkError::Timeout(_) | LinkError::Transport(_)) => {
                        return Err(unreachable())
                    }
                    Err(LinkError::Busy(message)) => {
                        return Err(ClientError::Refused {
                            code: ErrorCode::LimitReached,
                            message,
                        })
                    }
                    Err(LinkError::NotLeader(message)) => {
                        return Err(ClientError::Refused {
                            code: ErrorCode::NotLeader,
                            message: format!("{endpoint}: {message}"),
                        })
                    }
                    Err(LinkError::Refused(message)) => {
                        return Err(ClientError::Refused {
                            code: ErrorCode::Unauthenticated,
                            message: format!("{message} (our key: {})", key.public),
                        })
                    }
                    Err(e @ LinkError::Handshake(_)) => {
                        return Err(ClientError::Refused {
                            code: ErrorCode::Unauthenticated,
                            message: e.to_string(),
                        })
                    }
                }
            }
        };
        let mut client = Client {
            endpoint: endpoint.to_string(),
            servers: endpoint.to_string(),
            timeout,
            socket,
            next_request: 1,
            credentials: credentials.clone(),
            channel,
            identity,
            pong: (String::new(), None),
        };
        match client.request(|request| Body::Ping { request }).await? {
            (Body::Pong { server, lease, .. }, _) => {
                client.pong = (server, lease);
                Ok(client)
            }
            (other, _) => Err(ClientError::Protocol(format!(
                "expected pong, got {}",
                other.kind()
            ))),
        }
    }

    /// The server's incarnation id and, with PostgreSQL, the lease it
    /// leads under, as its `pong` said at connect.
    pub fn leader(&self) -> (&str, Option<&crate::protocol::LeaseInfo>) {
        (&self.pong.0, self.pong.1.as_ref())
    }

    /// The endpoint this connection is to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The endpoints as given to [`Client::connect`]: a reconnect tries
    /// them all (after a failover the leader is another one).
    pub fn servers(&self) -> &str {
        &self.servers
    }

    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    /// Who the server authenticated us as (security on).
    pub fn identity(&self) -> Option<&Identity> {
        self.identity.as_ref()
    }

    /// Sends one message, sealed if the connection is secured.
    async fn send_body(
        &mut self,
        header: &Header,
        body: &Body,
        raw: Option<Bytes>,
    ) -> Result<(), TransportError> {
        let mut frames = protocol::encode(header, body, raw);
        if let Some(channel) = self.channel.as_mut() {
            frames = channel.seal(&frames);
        }
        transport::send_bounded(&mut self.socket, to_message(frames), self.timeout).await
    }

    /// Receives one message before `deadline`, opened if secured.
    async fn recv_envelope(
        &mut self,
        deadline: tokio::time::Instant,
    ) -> Result<Option<protocol::Envelope>, ClientError> {
        let msg = match tokio::time::timeout_at(deadline, self.socket.recv()).await {
            Err(_) => return Ok(None),
            Ok(Err(_)) => {
                return Err(ClientError::Unreachable {
                    endpoint: self.endpoint.clone(),
                    timeout: self.timeout,
                })
            }
            Ok(Ok(msg)) => msg,
        };
        let mut frames = msg.into_vec();
        if let Some(channel) = self.channel.as_mut() {
            frames = channel.open(frames).map_err(|e| {
                ClientError::Protocol(format!(
                    "a message from the server does not authenticate: {e}"
                ))
            })?;
        }
        protocol::decode(frames)
            .map(Some)
            .map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Starts following `run` on this connection and turns it into a
    /// stream of what the server tells (progress, log lines), delivered
    /// to `tx` until the connection fails or `tx` is dropped.
    pub async fn into_follower(
        mut self,
        run: &RunId,
        logs: bool,
        tx: tokio::sync::mpsc::UnboundedSender<Body>,
    ) -> Result<tokio::task::JoinHandle<()>, ClientError> {
        let run = run.clone();
        match self
            .request(|request| Body::Follow { request, run, logs })
            .await?
        {
            (Body::Following { .. }, _) => {}
            (other, _) => return Err(unexpected("following", &other)),
        }
        Ok(tokio::spawn(async move {
            loop {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(3600);
                match self.recv_envelope(deadline).await {
                    Ok(Some(env)) => {
                        if tx.send(unpack_log_lines(env.body, env.raw)).is_err() {
                            return;
                        }
                    }
                    Ok(None) => continue,
                    Err(_) => return,
                }
            }
        }))
    }

    /// The deadline of each request.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sends one request and waits for its reply (other replies, e.g. late
    /// answers to earlier timed-out requests, are skipped).
    pub async fn request(
        &mut self,
        make: impl FnOnce(u64) -> Body,
    ) -> Result<(Body, Option<Bytes>), ClientError> {
        let request = self.next_request;
        self.next_request += 1;
        let body = make(request);
        let header = Header {
            v: PROTOCOL_VERSION,
            class: body.class(),
            mandatory: false,
            seq: request,
            task: None,
            epoch: None,
        };
        let unreachable = ClientError::Unreachable {
            endpoint: self.endpoint.clone(),
            timeout: self.timeout,
        };
        if self.send_body(&header, &body, None).await.is_err() {
            return Err(unreachable);
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let Some(env) = self.recv_envelope(deadline).await? else {
                return Err(unreachable);
            };
            match env.body.request() {
                Some(r) if r == request => {
                    if let Body::Error { code, message, .. } = env.body {
                        return Err(ClientError::Refused { code, message });
                    }
                    return Ok((env.body, env.raw));
                }
                None => {
                    if let Body::Error { code, message, .. } = env.body {
                        return Err(ClientError::Protocol(format!("{code:?}: {message}")));
                    }
                }
                _ => {} // a late reply to an earlier request
            }
        }
    }

    pub async fn submit(
        &mut self,
        testrun: TestrunRequest,
    ) -> Result<(RunId, Vec<TaskId>), ClientError> {
        match self
            .request(|request| Body::Submit { request, testrun })
            .await?
        {
            (Body::Submitted { run, tasks, .. }, _) => Ok((run, tasks)),
            (other, _) => Err(unexpected("submitted", &other)),
        }
    }

    pub async fn status(&mut self, run: &RunId) -> Result<RunStatus, ClientError> {
        let run = run.clone();
        match self
            .request(|request| Body::GetStatus { request, run })
            .await?
        {
            (Body::Status { status, .. }, _) => Ok(status),
            (other, _) => Err(unexpected("status", &other)),
        }
    }

    pub async fn events(
        &mut self,
        run: &RunId,
        from: u64,
    ) -> Result<Vec<protocol::ProgressEvent>, ClientError> {
        let run = run.clone();
        match self
            .request(|request| Body::GetEvents { request, run, from })
            .await?
        {
            (Body::Events { events, .. }, _) => Ok(events),
            (other, _) => Err(unexpected("events", &other)),
        }
    }

    pub async fn cancel(&mut self, run: &RunId) -> Result<RunStatus, ClientError> {
        let run = run.clone();
        match self
            .request(|request| Body::CancelRun { request, run })
            .await?
        {
            (Body::Status { status, .. }, _) => Ok(status),
            (other, _) => Err(unexpected("status", &other)),
        }
    }

    pub async fn workers(&mut self) -> Result<Vec<WorkerInfo>, ClientError> {
        match self
            .request(|request| Body::ListWorkers { request })
            .await?
        {
            (Body::Workers { workers, .. }, _) => Ok(workers),
            (other, _) => Err(unexpected("workers", &other)),
        }
    }

    pub async fn runs(
        &mut self,
        state: Option<protocol::RunState>,
        owner: Option<String>,
        limit: u32,
    ) -> Result<Vec<protocol::RunSummary>, ClientError> {
        match self
            .request(|request| Body::ListRuns {
                request,
                state,
                owner,
                limit,
                verdict: None,
                devicegroup: None,
                before: None,
            })
            .await?
        {
            (Body::Runs { runs, .. }, _) => Ok(runs),
            (other, _) => Err(unexpected("runs", &other)),
        }
    }

    /// One page of a testrun's test cases.
    pub async fn cases(
        &mut self,
        run: &RunId,
        failed: bool,
        offset: u64,
        limit: u32,
    ) -> Result<Vec<protocol::TestCase>, ClientError> {
        let run = run.clone();
        match self
            .request(|request| Body::ListCases {
                request,
                run,
                failed,
                offset,
                limit,
            })
            .await?
        {
            (Body::Cases { cases, .. }, _) => Ok(cases),
            (other, _) => Err(unexpected("cases", &other)),
        }
    }

    pub async fn queue(&mut self) -> Result<Vec<protocol::QueueInfo>, ClientError> {
        match self.request(|request| Body::ListQueue { request }).await? {
            (Body::Queue { queues, .. }, _) => Ok(queues),
            (other, _) => Err(unexpected("queue", &other)),
        }
    }

    /// Reads a whole task log, or a result file when `file` is given.
    pub async fn read_all(
        &mut self,
        task: &TaskId,
        file: Option<&str>,
    ) -> Result<Vec<u8>, ClientError> {
        self.read_chunks(|request, offset, max| match file {
            None => Body::GetLog {
                request,
                task: task.clone(),
                offset,
                max,
            },
            Some(name) => Body::GetFile {
                request,
                task: task.clone(),
                name: name.to_string(),
                offset,
                max,
            },
        })
        .await
    }

    /// Reads something the server serves in `data` chunks, from offset 0
    /// to its end.
    async fn read_chunks(
        &mut self,
        make: impl Fn(u64, u64, u64) -> Body,
    ) -> Result<Vec<u8>, ClientError> {
        let mut out = Vec::new();
        loop {
            let offset = out.len() as u64;
            let max = crate::protocol::limits::MAX_READ_BYTES;
            match self.request(|request| make(request, offset, max)).await? {
                (Body::Data { eof, .. }, raw) => {
                    let raw = raw.unwrap_or_default();
                    out.extend_from_slice(&raw);
                    if eof || raw.is_empty() {
                        return Ok(out);
                    }
                }
                (other, _) => return Err(unexpected("data", &other)),
            }
        }
    }
}

fn unexpected(wanted: &str, got: &Body) -> ClientError {
    ClientError::Protocol(format!("expected a {wanted} reply, got {}", got.kind()))
}

impl Client {
    /// Drains (or undrains) a worker; returns what the server now says of it.
    pub async fn drain(&mut self, worker: &str, drain: bool) -> Result<WorkerInfo, ClientError> {
        let worker = worker.to_string();
        match self
            .request(|request| Body::DrainWorker {
                request,
                worker,
                drain,
            })
            .await?
        {
            (Body::Workers { mut workers, .. }, _) if workers.len() == 1 => Ok(workers.remove(0)),
            (other, _) => Err(unexpected("workers", &other)),
        }
    }

    /// A worker's health and history, after `action` if any (operator).
    /// A single-use sign-in link to the web dashboard for this
    /// connection's user, and when it expires (Unix ms).
    pub async fn web_login(&mut self) -> Result<(String, u64), ClientError> {
        match self.request(|request| Body::WebLogin { request }).await? {
            (
                Body::WebLink {
                    url, expires_ms, ..
                },
                _,
            ) => Ok((url, expires_ms)),
            (other, _) => Err(unexpected("web_link", &other)),
        }
    }

    /// Notification deliveries (of one testrun, or all) and, for an
    /// operator, each target's standing.
    pub async fn notifications(
        &mut self,
        run: Option<&str>,
        failed: bool,
    ) -> Result<(Vec<NotificationInfo>, Vec<NotifyTargetInfo>), ClientError> {
        let run = run.map(str::to_string);
        match self
            .request(|request| Body::ListNotifications {
                request,
                run,
                failed,
            })
            .await?
        {
            (
                Body::Notifications {
                    deliveries,
                    targets,
                    ..
                },
                _,
            ) => Ok((deliveries, targets)),
            (other, _) => Err(unexpected("notifications", &other)),
        }
    }

    /// Sends a notification again now (operator, admin).
    pub async fn retry_notification(&mut self, id: &str) -> Result<NotificationInfo, ClientError> {
        let id = id.to_string();
        match self
            .request(|request| Body::RetryNotification { request, id })
            .await?
        {
            (Body::Notifications { mut deliveries, .. }, _) if deliveries.len() == 1 => {
                Ok(deliveries.remove(0))
            }
            (other, _) => Err(unexpected("notifications", &other)),
        }
    }

    pub async fn worker_health(
        &mut self,
        worker: &str,
        action: Option<HealthAction>,
        reason: &str,
    ) -> Result<(WorkerInfo, Vec<HealthChange>), ClientError> {
        let (worker, reason) = (worker.to_string(), reason.to_string());
        match self
            .request(|request| Body::WorkerHealth {
                request,
                worker,
                action,
                reason,
            })
            .await?
        {
            (
                Body::HealthReport {
                    worker, history, ..
                },
                _,
            ) => Ok((worker, history)),
            (other, _) => Err(unexpected("health_report", &other)),
        }
    }

    /// Reads the whole audit log (admin).
    pub async fn audit(&mut self) -> Result<Vec<u8>, ClientError> {
        self.read_chunks(|request, offset, max| Body::GetAudit {
            request,
            offset,
            max,
            before: None,
        })
        .await
    }
}

/// Packed log lines (checked by the codec) as lines with their stream and
/// original text; anything else as it is.
fn unpack_log_lines(body: Body, raw: Option<Bytes>) -> Body {
    let Body::LogLinesPacked { run, task, parts } = body else {
        return body;
    };
    let raw = raw.unwrap_or_default();
    let lines = crate::protocol::logtext::unpack(&parts, &raw);
    Body::LogLines { run, task, lines }
}
