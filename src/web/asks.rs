//! What the dashboard asks the scheduler, as the signed-in user: workers,
//! the queue, testruns and their notifications, log ranges and tails,
//! device health, the audit log.

use super::pages::RunsQuery;
use super::sessions::Viewer;
use super::{Dashboard, Failure};
use crate::protocol::limits::{MAX_READ_BYTES, MAX_READ_OFFSET};
use crate::protocol::{Body, RunState, RunStatus, TaskState, Verdict};
use crate::web::extract::{ask_for, check_id, unexpected};
use axum::http::StatusCode;
use bytes::Bytes;
use serde::Deserialize;
use std::net::SocketAddr;

/// Bytes of log a page shows first (the tail), and an API read at most.
pub const TAIL_BYTES: u64 = 64 * 1024;
/// Testruns a page lists.
pub const RUNS_PER_PAGE: u32 = 50;

pub(super) async fn workers(
    d: &Dashboard,
    v: &Viewer,
    peer: SocketAddr,
) -> Result<Vec<crate::protocol::WorkerInfo>, Failure> {
    ask_for(
        d,
        v,
        peer,
        Body::ListWorkers { request: 0 },
        |b, _| match b {
            Body::Workers { workers, .. } => Ok(workers),
            other => Err(other.kind()),
        },
    )
    .await
}

pub(super) async fn queues(
    d: &Dashboard,
    v: &Viewer,
    peer: SocketAddr,
) -> Result<Vec<crate::protocol::QueueInfo>, Failure> {
    ask_for(d, v, peer, Body::ListQueue { request: 0 }, |b, _| match b {
        Body::Queue { queues, .. } => Ok(queues),
        other => Err(other.kind()),
    })
    .await
}

pub(super) async fn status(
    d: &Dashboard,
    v: &Viewer,
    peer: SocketAddr,
    run: &str,
) -> Result<RunStatus, Failure> {
    check_id("a testrun id", run)?;
    let run = run.to_string();
    ask_for(
        d,
        v,
        peer,
        Body::GetStatus { request: 0, run },
        |b, _| match b {
            Body::Status { status, .. } => Ok(status),
            other => Err(other.kind()),
        },
    )
    .await
}

/// A testrun's notification deliveries (as the signed-in user may see
/// them).
pub(super) async fn run_notifications(
    d: &Dashboard,
    v: &Viewer,
    peer: SocketAddr,
    run: &str,
) -> Result<Vec<crate::protocol::NotificationInfo>, Failure> {
    check_id("a testrun id", run)?;
    let body = Body::ListNotifications {
        request: 0,
        run: Some(run.to_string()),
        failed: false,
    };
    ask_for(d, v, peer, body, |b, _| match b {
        Body::Notifications { deliveries, .. } => Ok(deliveries),
        other => Err(other.kind()),
    })
    .await
}

/// The owner of a testrun, from the runs list (status does not carry it).
pub(super) async fn owner_of(
    d: &Dashboard,
    v: &Viewer,
    peer: SocketAddr,
    run: &str,
) -> Option<String> {
    let n: u64 = run.strip_prefix('r')?.parse().ok()?;
    let body = Body::ListRuns {
        request: 0,
        state: None,
        owner: None,
        limit: 1,
        verdict: None,
        devicegroup: None,
        before: Some(n.saturating_add(1)),
    };
    match d.ask(v, peer, body).await.ok()? {
        (Body::Runs { runs, .. }, _) => runs.into_iter().find(|r| r.run == run)?.owner,
        _ => None,
    }
}

pub(super) fn parse_filter(q: &RunsQuery) -> Result<(Option<RunState>, Option<Verdict>), Failure> {
    let bad = |what: &str, v: &str| {
        Failure::new(StatusCode::BAD_REQUEST, format!("unknown {what} {v:?}"))
    };
    let state = match q.state.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(
            serde_json::from_value(serde_json::Value::String(s.into()))
                .map_err(|_| bad("state", s))?,
        ),
    };
    let verdict = match q.verdict.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(
            serde_json::from_value(serde_json::Value::String(s.to_uppercase()))
                .or_else(|_| serde_json::from_value(serde_json::Value::String(s.into())))
                .map_err(|_| bad("verdict", s))?,
        ),
    };
    for (what, v) in [("owner", &q.owner), ("device group", &q.group)] {
        if let Some(v) = v.as_deref().filter(|v| !v.is_empty()) {
            check_id(what, v)?;
        }
    }
    Ok((state, verdict))
}

/// One page of testruns and the cursor of the next.
pub(super) async fn list_runs(
    d: &Dashboard,
    v: &Viewer,
    peer: SocketAddr,
    q: &RunsQuery,
) -> Result<(Vec<crate::protocol::RunSummary>, Option<u64>), Failure> {
    let (state, verdict) = parse_filter(q)?;
    let body = Body::ListRuns {
        request: 0,
        state,
        owner: q.owner.clone().filter(|o| !o.is_empty()),
        limit: RUNS_PER_PAGE + 1,
        verdict,
        devicegroup: q.group.clone().filter(|g| !g.is_empty()),
        before: q.before,
    };
    match d.ask(v, peer, body).await? {
        (Body::Runs { mut runs, .. }, _) => {
            let older = (runs.len() > RUNS_PER_PAGE as usize).then(|| {
                runs.truncate(RUNS_PER_PAGE as usize);
                runs.last()
                    .and_then(|r| r.run.strip_prefix('r')?.parse::<u64>().ok())
                    .unwrap_or(0)
            });
            Ok((runs, older))
        }
        (other, _) => Err(unexpected("list_runs", &other)),
    }
}

/// A read of a task's log: its start, bytes, and whether it reached the end.
pub(super) async fn read_log(
    d: &Dashboard,
    v: &Viewer,
    peer: SocketAddr,
    task: &str,
    offset: u64,
    max: u64,
) -> Result<(u64, Bytes, bool), Failure> {
    let task = task.to_string();
    let body = Body::GetLog {
        request: 0,
        task,
        offset,
        max,
    };
    ask_for(d, v, peer, body, |b, raw| match b {
        Body::Data { offset, eof, .. } => Ok((offset, raw.unwrap_or_default(), eof)),
        other => Err(other.kind()),
    })
    .await
}

pub(super) async fn read_tail(
    d: &Dashboard,
    v: &Viewer,
    peer: SocketAddr,
    task: &str,
    max: u64,
) -> Result<(u64, Bytes), Failure> {
    let task = task.to_string();
    let body = Body::GetLogTail {
        request: 0,
        task,
        max,
    };
    ask_for(d, v, peer, body, |b, raw| match b {
        Body::Data { offset, .. } => Ok((offset, raw.unwrap_or_default())),
        other => Err(other.kind()),
    })
    .await
}

/// Whole lines of a read at `start`: drops a partial first line (unless
/// the read starts the log) and a partial last one.
pub(super) fn whole(start: u64, bytes: &[u8]) -> (u64, &[u8]) {
    let head = if start == 0 {
        0
    } else {
        memchr::memchr(b'\n', bytes).map_or(bytes.len(), |i| i + 1)
    };
    let body = &bytes[head..];
    let tail = memchr::memrchr(b'\n', body).map_or(0, |i| i + 1);
    (start + head as u64, &body[..tail])
}

/// What a log request asks for: the tail, lines from `after`, or lines
/// before `before`.
#[derive(Deserialize, Default)]
pub(super) struct LogQuery {
    #[serde(default)]
    pub(super) before: Option<u64>,
    #[serde(default)]
    pub(super) after: Option<u64>,
    #[serde(default)]
    pub(super) max: Option<u64>,
}

/// A chunk of whole lines: (start, end, text, eof).
pub(super) async fn log_chunk(
    d: &Dashboard,
    v: &Viewer,
    peer: SocketAddr,
    task: &str,
    q: &LogQuery,
) -> Result<(u64, u64, String, bool), Failure> {
    let max = q.max.unwrap_or(TAIL_BYTES).clamp(1, MAX_READ_BYTES);
    for o in [q.before, q.after].into_iter().flatten() {
        if o > MAX_READ_OFFSET {
            return Err(Failure::new(StatusCode::BAD_REQUEST, "offset out of range"));
        }
    }
    let (start, bytes, eof, from_line_start) = match (q.before, q.after) {
        (Some(before), _) => {
            let from = before.saturating_sub(max);
            let (s, b, _) = read_log(d, v, peer, task, from, before - from).await?;
            (s, b, false, from == 0)
        }
        (None, Some(after)) => {
            let (s, b, eof) = read_log(d, v, peer, task, after, max).await?;
            (s, b, eof, true)
        }
        (None, None) => {
            let (s, b) = read_tail(d, v, peer, task, max).await?;
            (s, b, true, s == 0)
        }
    };
    let (s, lines) = if from_line_start {
        let tail = memchr::memrchr(b'\n', &bytes).map_or(0, |i| i + 1);
        (start, &bytes[..tail])
    } else {
        whole(start, &bytes)
    };
    let end = s + lines.len() as u64;
    Ok((s, end, String::from_utf8_lossy(lines).into_owned(), eof))
}

pub(super) fn task_ended(s: &RunStatus, task: &str) -> bool {
    s.tasks
        .iter()
        .find(|t| t.task == task)
        .is_none_or(|t| matches!(t.state, TaskState::Finished | TaskState::Cancelled))
}

pub(super) type Report = (
    crate::protocol::WorkerInfo,
    Vec<crate::protocol::HealthChange>,
    Vec<crate::protocol::RecentTask>,
);

pub(super) async fn health(
    d: &Dashboard,
    v: &Viewer,
    peer: SocketAddr,
    name: &str,
) -> Result<Report, Failure> {
    check_id("a worker name", name)?;
    let body = Body::WorkerHealth {
        request: 0,
        worker: name.to_string(),
        action: None,
        reason: String::new(),
    };
    match d.ask(v, peer, body).await? {
        (
            Body::HealthReport {
                worker,
                history,
                recent,
                ..
            },
            _,
        ) => Ok((worker, history, recent)),
        (other, _) => Err(unexpected("worker_health", &other)),
    }
}

#[derive(Deserialize, Default)]
pub(super) struct AuditQuery {
    /// Oldest first from this byte (the old pages' links).
    #[serde(default)]
    pub(super) offset: Option<u64>,
    /// Newest first, the entries before this byte (default: the end).
    #[serde(default)]
    pub(super) before: Option<u64>,
    /// Only entries of this event (`cancel`, `lease_release`…), of this
    /// identity, or whose line contains this text.
    #[serde(default)]
    pub(super) event: Option<String>,
    #[serde(default)]
    pub(super) identity: Option<String>,
    #[serde(default)]
    pub(super) q: Option<String>,
}

/// Bytes of the audit log a page reads at a time…
pub(super) const AUDIT_PAGE: u64 = 256 * 1024;
/// …and at most, looking back for entries that match its filters.
pub(super) const AUDIT_SEARCH: u64 = 16 * AUDIT_PAGE;
/// Entries a page shows at most.
pub(super) const AUDIT_SHOWN: usize = 500;

/// Reads the audit log: oldest first from `offset`, or newest first
/// before `before`. Returns whole lines, where they start and end.
pub(super) async fn audit_read(
    d: &Dashboard,
    v: &Viewer,
    peer: SocketAddr,
    offset: u64,
    before: Option<u64>,
) -> Result<(String, u64, u64, bool), Failure> {
    if offset > MAX_READ_OFFSET || before.is_some_and(|b| b > MAX_READ_OFFSET) {
        return Err(Failure::new(StatusCode::BAD_REQUEST, "offset out of range"));
    }
    let body = Body::GetAudit {
        request: 0,
        offset,
        max: AUDIT_PAGE,
        before,
    };
    match d.ask(v, peer, body).await? {
        (Body::Data { offset, eof, .. }, raw) => {
            let raw = raw.unwrap_or_default();
            let n = memchr::memrchr(b'\n', &raw).map_or(0, |i| i + 1);
            let text = String::from_utf8_lossy(&raw[..n]).into_owned();
            Ok((text, offset, offset + n as u64, eof && n == raw.len()))
        }
        (other, _) => Err(unexpected("get_audit", &other)),
    }
}
