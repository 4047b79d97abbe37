//! The JSON API under `/api/`, and the live streams (server-sent events,
//! resumable by offset).

use super::live::{self, Live};
use super::pages::RunsQuery;
use super::Failure;
use crate::protocol::limits::MAX_READ_OFFSET;
use crate::protocol::Body;
use crate::web::asks::{
    audit_read, health, list_runs, log_chunk, queues, run_notifications, status, task_ended,
    workers, AuditQuery, LogQuery,
};
use crate::web::extract::{api_csrf, api_error, check_id, json, run_of_task, unexpected, Api, D};
use crate::web::html::{cancel, drain, drain_value};
use crate::web::signin::CsrfForm;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

pub(super) async fn api_me(Api(v, _): Api) -> Response {
    Json(serde_json::json!({ "user": v.name(), "role": v.role().as_str(), "csrf": v.csrf }))
        .into_response()
}

#[derive(Deserialize, Default)]
pub(super) struct FromQuery {
    #[serde(default)]
    pub(super) from: Option<u64>,
}

/// Where a stream resumes: `Last-Event-ID` (a reconnect) over `?from=`.
pub(super) fn resume_from(headers: &HeaderMap, q: &FromQuery) -> Result<u64, Failure> {
    let from = match headers.get("last-event-id") {
        Some(h) => h
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or_else(|| {
                Failure::new(
                    StatusCode::BAD_REQUEST,
                    "Last-Event-ID must be a byte offset",
                )
            })?,
        None => q.from.unwrap_or(0),
    };
    if from > MAX_READ_OFFSET {
        return Err(Failure::new(StatusCode::BAD_REQUEST, "offset out of range"));
    }
    Ok(from)
}

pub(super) fn sse(rx: tokio::sync::mpsc::Receiver<axum::response::sse::Event>) -> Response {
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|e| (Ok::<_, std::convert::Infallible>(e), rx))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

pub(super) async fn api_workers(State(d): D, Api(v, peer): Api) -> Response {
    json(workers(&d, &v, peer).await)
}

pub(super) async fn api_worker(
    State(d): D,
    Api(v, peer): Api,
    Path(name): Path<String>,
) -> Response {
    json(health(&d, &v, peer, &name).await.map(|(worker, history, recent)| {
        serde_json::json!({ "worker": worker, "history": history, "recent": recent })
    }))
}

pub(super) async fn api_queue(State(d): D, Api(v, peer): Api) -> Response {
    json(queues(&d, &v, peer).await)
}

pub(super) async fn api_runs(
    State(d): D,
    Api(v, peer): Api,
    Query(q): Query<RunsQuery>,
) -> Response {
    json(
        list_runs(&d, &v, peer, &q)
            .await
            .map(|(runs, older)| serde_json::json!({ "runs": runs, "next_before": older })),
    )
}

pub(super) async fn api_run(State(d): D, Api(v, peer): Api, Path(run): Path<String>) -> Response {
    json(status(&d, &v, peer, &run).await)
}

pub(super) async fn api_run_notifications(
    State(d): D,
    Api(v, peer): Api,
    Path(run): Path<String>,
) -> Response {
    json(run_notifications(&d, &v, peer, &run).await)
}

pub(super) async fn api_events(
    State(d): D,
    Api(v, peer): Api,
    Path(run): Path<String>,
    Query(q): Query<FromQuery>,
) -> Response {
    if let Err(e) = check_id("a testrun id", &run) {
        return api_error(e);
    }
    let body = Body::GetEvents {
        request: 0,
        run,
        from: q.from.unwrap_or(0).min(crate::protocol::limits::MAX_SEQ),
    };
    json(match d.ask(&v, peer, body).await {
        Ok((Body::Events { events, .. }, _)) => Ok(events),
        Ok((other, _)) => Err(unexpected("get_events", &other)),
        Err(e) => Err(e.into()),
    })
}

pub(super) async fn api_cancel(
    State(d): D,
    Api(v, peer): Api,
    headers: HeaderMap,
    Path(run): Path<String>,
) -> Response {
    if let Some(refused) = api_csrf(&d, &v, &headers) {
        return refused;
    }
    json(cancel(&d, &v, peer, &run).await)
}

pub(super) async fn api_drain(
    State(d): D,
    Api(v, peer): Api,
    headers: HeaderMap,
    Path(name): Path<String>,
    Query(f): Query<CsrfForm>,
) -> Response {
    if let Some(refused) = api_csrf(&d, &v, &headers) {
        return refused;
    }
    let on = match drain_value(f.drain.as_deref()) {
        Ok(on) => on,
        Err(e) => return api_error(e),
    };
    json(drain(&d, &v, peer, &name, on).await.map(|b| match b {
        Body::Workers { workers, .. } => serde_json::json!({ "workers": workers }),
        other => serde_json::json!({ "answer": other.kind() }),
    }))
}

pub(super) async fn api_log(
    State(d): D,
    Api(v, peer): Api,
    Path(task): Path<String>,
    Query(q): Query<LogQuery>,
) -> Response {
    if let Err(e) = run_of_task(&task) {
        return api_error(e);
    }
    json(log_chunk(&d, &v, peer, &task, &q).await.map(|(start, end, text, eof)| {
        serde_json::json!({ "start": start, "end": end, "eof": eof, "text": text })
    }))
}

pub(super) async fn api_audit(
    State(d): D,
    Api(v, peer): Api,
    Query(q): Query<AuditQuery>,
) -> Response {
    // Oldest first from `offset` (`next`: where the following page
    // starts), or with `before` the page that ends there (`previous`:
    // where the one before it ends).
    let offset = q.offset.unwrap_or(0);
    json(audit_read(&d, &v, peer, offset, q.before).await.map(|(text, start, end, eof)| {
        let entries: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let next = (!eof && end > start).then_some(end);
        let previous = (q.before.is_some() && start > 0).then_some(start);
        serde_json::json!({ "offset": start, "next": next, "previous": previous, "entries": entries })
    }))
}

pub(super) async fn api_log_stream(
    State(d): D,
    Api(v, peer): Api,
    headers: HeaderMap,
    Path(task): Path<String>,
    Query(q): Query<FromQuery>,
) -> Response {
    let run = match run_of_task(&task) {
        Ok(r) => r,
        Err(e) => return api_error(e),
    };
    let from = match resume_from(&headers, &q) {
        Ok(f) => f,
        Err(e) => return api_error(e),
    };
    // Asked as the viewer: another user's task is refused here.
    let s = match status(&d, &v, peer, &run).await {
        Ok(s) => s,
        Err(e) => return api_error(e),
    };
    if !s.tasks.iter().any(|t| t.task == task) {
        return api_error(Failure::new(
            StatusCode::NOT_FOUND,
            format!("testrun {run} has no task {task}"),
        ));
    }
    let slot = match Live::slot(&d, &run, &v) {
        Ok(s) => s,
        Err(e) => return api_error(e),
    };
    let ended = task_ended(&s, &task);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let view = live::LogStream {
        d: d.clone(),
        viewer: v,
        peer,
        task,
        run,
        from,
        ended,
    };
    tokio::spawn(live::stream_log(view, tx, slot));
    sse(rx)
}

pub(super) async fn api_run_stream(
    State(d): D,
    Api(v, peer): Api,
    headers: HeaderMap,
    Path(run): Path<String>,
    Query(q): Query<FromQuery>,
) -> Response {
    let from = match resume_from(&headers, &q) {
        Ok(f) => f.min(crate::protocol::limits::MAX_SEQ),
        Err(e) => return api_error(e),
    };
    if let Err(e) = status(&d, &v, peer, &run).await {
        return api_error(e);
    }
    let slot = match Live::slot(&d, &run, &v) {
        Ok(s) => s,
        Err(e) => return api_error(e),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(live::stream_progress(
        d.clone(),
        v,
        peer,
        run,
        from,
        tx,
        slot,
    ));
    sse(rx)
}
