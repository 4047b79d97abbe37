//! The request/response client behind `ots-submit`: one DEALER with a
//! fresh identity, request ids to match replies, a deadline on every call
//! (the "give up and report" philosophy: an interactive caller never hangs).
//!
//! - [`follow`]: watching a testrun's progress and logs (PUB + catch-up).
//! - [`commands`]: the `ots-submit` sub-commands, printing for people or JSON.

pub mod commands;
pub mod follow;

use crate::protocol::{
    self, Body, ErrorCode, Header, RunId, RunStatus, TaskId, TestrunRequest, WorkerInfo,
    PROTOCOL_VERSION,
};
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
}

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("server unreachable at {endpoint}: no answer within {} ms; is ots-server running there?", timeout.as_millis())]
    Unreachable { endpoint: String, timeout: Duration },
    #[error("server refused: {message}")]
    Refused { code: ErrorCode, message: String },
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("cannot write {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

impl ClientError {
    /// The process exit status for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            ClientError::Unreachable { .. } => exit::UNREACHABLE,
            ClientError::Refused { .. } => exit::REFUSED,
            ClientError::Protocol(_) => exit::PROTOCOL,
            ClientError::Io { .. } => exit::IO,
        }
    }
}

/// A connection to one server's control socket.
pub struct Client {
    endpoint: String,
    timeout: Duration,
    socket: DealerSocket,
    next_request: u64,
}

impl Client {
    /// Connects and pings; fails with [`ClientError::Unreachable`] within
    /// about `timeout` if nothing answers.
    pub async fn connect(endpoint: &str, timeout: Duration) -> Result<Self, ClientError> {
        let unreachable = || ClientError::Unreachable {
            endpoint: endpoint.to_string(),
            timeout,
        };
        let socket = match transport::connect_dealer(endpoint, timeout).await {
            Ok(s) => s,
            Err(TransportError::ConnectTimeout { .. }) => return Err(unreachable()),
            Err(e) => {
                return Err(ClientError::Protocol(format!(
                    "cannot connect to {endpoint}: {e}"
                )));
            }
        };
        let mut client = Client {
            endpoint: endpoint.to_string(),
            timeout,
            socket,
            next_request: 1,
        };
        match client.request(|request| Body::Ping { request }).await? {
            (Body::Pong { .. }, _) => Ok(client),
            (other, _) => Err(ClientError::Protocol(format!(
                "expected pong, got {}",
                other.kind()
            ))),
        }
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
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
        };
        let unreachable = ClientError::Unreachable {
            endpoint: self.endpoint.clone(),
            timeout: self.timeout,
        };
        let msg = to_message(protocol::encode(&header, &body, None));
        if transport::send_bounded(&mut self.socket, msg, self.timeout)
            .await
            .is_err()
        {
            return Err(unreachable);
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let msg = match tokio::time::timeout_at(deadline, self.socket.recv()).await {
                Err(_) => return Err(unreachable),
                Ok(Err(_)) => return Err(unreachable),
                Ok(Ok(msg)) => msg,
            };
            let env = protocol::decode(msg.into_vec())
                .map_err(|e| ClientError::Protocol(e.to_string()))?;
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

    /// Reads a whole task log, or a result file when `file` is given.
    pub async fn read_all(
        &mut self,
        task: &TaskId,
        file: Option<&str>,
    ) -> Result<Vec<u8>, ClientError> {
        let mut out = Vec::new();
        loop {
            let offset = out.len() as u64;
            let (task, max) = (task.clone(), crate::protocol::limits::MAX_READ_BYTES);
            let reply = match file {
                None => {
                    self.request(|request| Body::GetLog {
                        request,
                        task,
                        offset,
                        max,
                    })
                    .await?
                }
                Some(name) => {
                    let name = name.to_string();
                    self.request(|request| Body::GetFile {
                        request,
                        task,
                        name,
                        offset,
                        max,
                    })
                    .await?
                }
            };
            match reply {
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

/// The events endpoint conventionally next to a control endpoint
/// (`tcp://host:5555` → `tcp://host:5556`).
pub fn default_events_endpoint(control: &str) -> Option<String> {
    let (base, port) = control.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    Some(format!("{base}:{}", port.checked_add(1)?))
}
