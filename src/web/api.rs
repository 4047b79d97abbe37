//! The dashboard's routes: pages, their JSON under `/api/`, sign-in,
//! actions and downloads. Each handler finds out who asks ([`Dashboard::viewer`]),
//! asks the scheduler as that user, and renders the answer; a refusal of
//! the scheduler's is shown as it is (403 for another user's testrun).

use super::bridge::AskError;
use super::http::PeerAddr;
use super::live::{self, Live};
use super::pages::{self, LogView, RunsQuery};
use super::sessions::Viewer;
use super::{Counters, Dashboard, Failure, COOKIE, MAX_REQUEST_BODY};
use crate::protocol::limits::{is_safe_id, MAX_READ_BYTES, MAX_READ_OFFSET};
use crate::protocol::{Body, ErrorCode, RunState, RunStatus, TaskState, Verdict};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use bytes::Bytes;
use serde::Deserialize;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

type D = State<Arc<Dashboard>>;

/// Bytes of log a page shows first (the tail), and an API read at most.
pub const TAIL_BYTES: u64 = 64 * 1024;
/// Testruns a page lists.
pub const RUNS_PER_PAGE: u32 = 50;

/// The routes.
pub fn router(d: Arc<Dashboard>) -> Router {
    Router::new()
        .route("/", get(lab_page))
        .route("/queue", get(queue_page))
        .route("/runs", get(runs_page))
        .route("/runs/{run}", get(run_page))
        .route("/runs/{run}/cancel", post(cancel_form))
        .route("/tasks/{task}/log", get(log_page))
        .route("/tasks/{task}/files/{*name}", get(download))
        .route("/workers/{name}", get(worker_page))
        .route("/workers/{name}/drain", post(drain_form))
        .route("/audit", get(audit_page))
        .route("/login", get(login))
        .route("/logout", post(logout))
        .route("/static/ots.css", get(css))
        .route("/static/ots.js", get(js))
        .route("/api/me", get(api_me))
        .route("/api/workers", get(api_workers))
        .route("/api/workers/{name}", get(api_worker))
        .route("/api/workers/{name}/drain", post(api_drain))
        .route("/api/queue", get(api_queue))
        .route("/api/runs", get(api_runs))
        .route("/api/runs/{run}", get(api_run))
        .route("/api/runs/{run}/events", get(api_events))
        .route("/api/runs/{run}/notifications", get(api_run_notifications))
        .route("/api/runs/{run}/stream", get(api_run_stream))
        .route("/api/runs/{run}/cancel", post(api_cancel))
        .route("/api/tasks/{task}/log", get(api_log))
        .route("/api/tasks/{task}/log/stream", get(api_log_stream))
        .route("/api/audit", get(api_audit))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BODY))
        .layer(axum::middleware::map_response(harden))
        .with_state(d)
}

async fn harden(mut r: Response) -> Response {
    super::harden(&mut r);
    r
}

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "no such page").into_response()
}

async fn css() -> Response {
    static_asset("text/css; charset=utf-8", pages::CSS)
}

async fn js() -> Response {
    static_asset("text/javascript; charset=utf-8", pages::JS)
}

fn static_asset(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(kind)),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("private, max-age=300"),
            ),
        ],
        body,
    )
        .into_response()
}

/// A signed-in viewer of a page and where it connected from; an
/// anonymous visitor gets the sign-in page (no data) instead.
pub struct Page(pub Viewer, pub SocketAddr);

/// The same for `/api/`: an anonymous caller gets 401 (JSON).
pub struct Api(pub Viewer, pub SocketAddr);

fn viewer_of(
    parts: &axum::http::request::Parts,
    d: &Dashboard,
) -> Result<(Viewer, SocketAddr), ()> {
    let peer = parts.extensions.get::<PeerAddr>().ok_or(())?.0;
    match d.viewer(&parts.headers, peer) {
        Some(v) => Ok((v, peer)),
        None => {
            Counters::bump(&d.counters.anonymous);
            Err(())
        }
    }
}

impl axum::extract::FromRequestParts<Arc<Dashboard>> for Page {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        d: &Arc<Dashboard>,
    ) -> Result<Self, Response> {
        viewer_of(parts, d)
            .map(|(v, peer)| Page(v, peer))
            .map_err(|()| pages::sign_in(None))
    }
}

impl axum::extract::FromRequestParts<Arc<Dashboard>> for Api {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        d: &Arc<Dashboard>,
    ) -> Result<Self, Response> {
        viewer_of(parts, d)
            .map(|(v, peer)| Api(v, peer))
            .map_err(|()| {
                api_error(Failure::new(
                    StatusCode::UNAUTHORIZED,
                    "not signed in: run `ots-submit web` and open the link it prints",
                ))
            })
    }
}

fn api_error(f: Failure) -> Response {
    (f.status, Json(serde_json::json!({ "error": f.message }))).into_response()
}

fn page_error(v: &Viewer, f: Failure) -> Response {
    pages::error(v, f.status, &f.message)
}

fn unexpected(what: &str, b: &Body) -> Failure {
    Failure::new(
        StatusCode::BAD_GATEWAY,
        format!("unexpected answer to {what}: {}", b.kind()),
    )
}

fn check_id(what: &str, id: &str) -> Result<(), Failure> {
    if is_safe_id(id) {
        Ok(())
    } else {
        Err(Failure::new(
            StatusCode::BAD_REQUEST,
            format!("{what} must be 1–64 characters of A–Z a–z 0–9 . _ -"),
        ))
    }
}

fn run_of_task(task: &str) -> Result<String, Failure> {
    check_id("a task id", task)?;
    live::run_of(task)
        .ok_or_else(|| Failure::new(StatusCode::NOT_FOUND, format!("no task {task:?}")))
}

// ---------------------------------------------------------------------
// Asking the scheduler
// ---------------------------------------------------------------------

/// Asks `body` as `v`; `pick` takes the expected answer apart, or names
/// the kind of any other (reported as unexpected).
async fn ask_for<T>(
    d: &Dashboard,
    v: &Viewer,
    peer: SocketAddr,
    body: Body,
    pick: impl FnOnce(Body, Option<Bytes>) -> Result<T, &'static str>,
) -> Result<T, Failure> {
    let what = body.kind();
    let (answer, raw) = d.ask(v, peer, body).await?;
    pick(answer, raw).map_err(|other| {
        Failure::new(
            StatusCode::BAD_GATEWAY,
            format!("unexpected answer to {what}: {other}"),
        )
    })
}

async fn workers(
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

async fn queues(
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

async fn status(
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
async fn run_notifications(
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
async fn owner_of(d: &Dashboard, v: &Viewer, peer: SocketAddr, run: &str) -> Option<String> {
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

fn parse_filter(q: &RunsQuery) -> Result<(Option<RunState>, Option<Verdict>), Failure> {
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
async fn list_runs(
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
async fn read_log(
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

async fn read_tail(
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
fn whole(start: u64, bytes: &[u8]) -> (u64, &[u8]) {
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
struct LogQuery {
    #[serde(default)]
    q: Option<String>,
    #[serde(default)]
    before: Option<u64>,
    #[serde(default)]
    after: Option<u64>,
    #[serde(default)]
    max: Option<u64>,
}

/// A chunk of whole lines: (start, end, text, eof).
async fn log_chunk(
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

fn task_ended(s: &RunStatus, task: &str) -> bool {
    s.tasks
        .iter()
        .find(|t| t.task == task)
        .is_none_or(|t| matches!(t.state, TaskState::Finished | TaskState::Cancelled))
}

// ---------------------------------------------------------------------
// Pages
// ---------------------------------------------------------------------

#[derive(Deserialize, Default)]
struct Fragment {
    #[serde(default)]
    fragment: Option<u8>,
}

async fn lab_page(State(d): D, Page(v, peer): Page, Query(f): Query<Fragment>) -> Response {
    match workers(&d, &v, peer).await {
        Ok(w) => pages::lab(&v, &w, f.fragment.is_some()),
        Err(e) => page_error(&v, e),
    }
}

async fn queue_page(State(d): D, Page(v, peer): Page, Query(f): Query<Fragment>) -> Response {
    match queues(&d, &v, peer).await {
        Ok(q) => pages::queue(&v, &q, f.fragment.is_some()),
        Err(e) => page_error(&v, e),
    }
}

async fn runs_page(State(d): D, Page(v, peer): Page, Query(q): Query<RunsQuery>) -> Response {
    match list_runs(&d, &v, peer, &q).await {
        Ok((runs, older)) => pages::runs(&v, &q, &runs, older),
        Err(e) => page_error(&v, e),
    }
}

async fn run_page(
    State(d): D,
    Page(v, peer): Page,
    Path(run): Path<String>,
    Query(f): Query<Fragment>,
) -> Response {
    match status(&d, &v, peer, &run).await {
        Ok(s) => {
            let (owner, deliveries) = if f.fragment.is_some() {
                (None, Vec::new())
            } else {
                (
                    owner_of(&d, &v, peer, &run).await,
                    // A page without them rather than no page.
                    run_notifications(&d, &v, peer, &run)
                        .await
                        .unwrap_or_default(),
                )
            };
            pages::run(&v, &s, owner.as_deref(), &deliveries, f.fragment.is_some())
        }
        Err(e) => page_error(&v, e),
    }
}

async fn log_page(
    State(d): D,
    Page(v, peer): Page,
    Path(task): Path<String>,
    Query(q): Query<LogQuery>,
) -> Response {
    let run = match run_of_task(&task) {
        Ok(r) => r,
        Err(e) => return page_error(&v, e),
    };
    let s = match status(&d, &v, peer, &run).await {
        Ok(s) => s,
        Err(e) => return page_error(&v, e),
    };
    let Some(t) = s.tasks.iter().find(|t| t.task == task) else {
        return page_error(
            &v,
            Failure::new(
                StatusCode::NOT_FOUND,
                format!("testrun {run} has no task {task}"),
            ),
        );
    };
    match log_chunk(&d, &v, peer, &task, &q).await {
        Ok((start, end, text, _)) => pages::task_log(
            &v,
            &LogView {
                task: &task,
                run: &run,
                status: Some(t),
                start,
                end,
                text: &text,
                ended: task_ended(&s, &task),
                filter: q.q.as_deref().filter(|f| !f.is_empty()),
                paged: q.before.is_some() || q.after.is_some(),
            },
        ),
        Err(e) => page_error(&v, e),
    }
}

async fn worker_page(State(d): D, Page(v, peer): Page, Path(name): Path<String>) -> Response {
    match health(&d, &v, peer, &name).await {
        Ok((w, history, recent)) => pages::worker(&v, &w, &history, &recent),
        Err(e) => page_error(&v, e),
    }
}

type Report = (
    crate::protocol::WorkerInfo,
    Vec<crate::protocol::HealthChange>,
    Vec<crate::protocol::RecentTask>,
);

async fn health(
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
struct AuditQuery {
    #[serde(default)]
    offset: Option<u64>,
}

/// Bytes of the audit log a page shows.
const AUDIT_PAGE: u64 = 256 * 1024;

async fn audit_read(
    d: &Dashboard,
    v: &Viewer,
    peer: SocketAddr,
    offset: u64,
) -> Result<(String, Option<u64>), Failure> {
    if offset > MAX_READ_OFFSET {
        return Err(Failure::new(StatusCode::BAD_REQUEST, "offset out of range"));
    }
    match d
        .ask(
            v,
            peer,
            Body::GetAudit {
                request: 0,
                offset,
                max: AUDIT_PAGE,
            },
        )
        .await?
    {
        (Body::Data { eof, .. }, raw) => {
            let raw = raw.unwrap_or_default();
            let n = memchr::memrchr(b'\n', &raw).map_or(0, |i| i + 1);
            let next = (!eof || n < raw.len())
                .then_some(offset + n as u64)
                .filter(|_| n > 0);
            Ok((String::from_utf8_lossy(&raw[..n]).into_owned(), next))
        }
        (other, _) => Err(unexpected("get_audit", &other)),
    }
}

async fn audit_page(State(d): D, Page(v, peer): Page, Query(q): Query<AuditQuery>) -> Response {
    let offset = q.offset.unwrap_or(0);
    match audit_read(&d, &v, peer, offset).await {
        Ok((text, next)) => pages::audit(&v, offset, next, &text),
        Err(e) => page_error(&v, e),
    }
}

// ---------------------------------------------------------------------
// Sign-in, actions
// ---------------------------------------------------------------------

#[derive(Deserialize)]
struct LoginQuery {
    token: String,
}

fn session_cookie(d: &Dashboard, value: &str, max_age: u64) -> HeaderValue {
    let secure = if d.secure_cookie { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
    ))
    .expect("cookie is ASCII")
}

async fn login(State(d): D, Query(q): Query<LoginQuery>) -> Response {
    if q.token.len() != 64 || !q.token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return pages::sign_in(Some("This sign-in link is malformed."));
    }
    let signed = d.sessions.lock().expect("sessions").sign_in(
        Instant::now(),
        &q.token,
        super::secret(),
        super::secret(),
    );
    match signed {
        Ok((cookie, _)) => {
            Counters::bump(&d.counters.sign_ins);
            let mut r = Redirect::to("/").into_response();
            r.headers_mut().insert(
                header::SET_COOKIE,
                session_cookie(&d, &cookie, super::sessions::SESSION_MAX_AGE.as_secs()),
            );
            r
        }
        Err(e) => pages::sign_in(Some(&e.to_string())),
    }
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: Option<String>,
    #[serde(default)]
    drain: Option<String>,
}

fn forbidden_csrf(v: &Viewer) -> Response {
    pages::error(
        v,
        StatusCode::FORBIDDEN,
        "this request did not carry the page's CSRF token; reload the page and try again",
    )
}

async fn logout(State(d): D, Page(v, _): Page, Form(f): Form<CsrfForm>) -> Response {
    if !d.csrf_ok(&v, f.csrf.as_deref()) {
        return forbidden_csrf(&v);
    }
    d.sessions.lock().expect("sessions").sign_out(&v.key);
    let mut r = pages::sign_in(Some("Signed out."));
    r.headers_mut()
        .insert(header::SET_COOKIE, session_cookie(&d, "", 0));
    r
}

async fn cancel(
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
        Body::CancelRun { request: 0, run },
        |b, _| match b {
            Body::Status { status, .. } => Ok(status),
            other => Err(other.kind()),
        },
    )
    .await
}

async fn cancel_form(
    State(d): D,
    Page(v, peer): Page,
    Path(run): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Response {
    if !d.csrf_ok(&v, f.csrf.as_deref()) {
        return forbidden_csrf(&v);
    }
    match cancel(&d, &v, peer, &run).await {
        Ok(_) => Redirect::to(&format!("/runs/{run}")).into_response(),
        Err(e) => page_error(&v, e),
    }
}

async fn drain(
    d: &Dashboard,
    v: &Viewer,
    peer: SocketAddr,
    name: &str,
    on: bool,
) -> Result<Body, Failure> {
    check_id("a worker name", name)?;
    let body = Body::DrainWorker {
        request: 0,
        worker: name.to_string(),
        drain: on,
    };
    Ok(d.ask(v, peer, body).await?.0)
}

fn drain_value(s: Option<&str>) -> Result<bool, Failure> {
    match s {
        Some("on") | Some("true") => Ok(true),
        Some("off") | Some("false") => Ok(false),
        _ => Err(Failure::new(
            StatusCode::BAD_REQUEST,
            "drain must be on or off",
        )),
    }
}

async fn drain_form(
    State(d): D,
    Page(v, peer): Page,
    Path(name): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Response {
    if !d.csrf_ok(&v, f.csrf.as_deref()) {
        return forbidden_csrf(&v);
    }
    let on = match drain_value(f.drain.as_deref()) {
        Ok(on) => on,
        Err(e) => return page_error(&v, e),
    };
    match drain(&d, &v, peer, &name, on).await {
        Ok(_) => Redirect::to(&format!("/workers/{name}")).into_response(),
        Err(e) => page_error(&v, e),
    }
}

/// Streams a result file (read in chunks through the request path).
async fn download(
    State(d): D,
    Page(v, peer): Page,
    Path((task, name)): Path<(String, String)>,
) -> Response {
    if let Err(e) = run_of_task(&task) {
        return page_error(&v, e);
    }
    if name.len() > 1024
        || name
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return page_error(
            &v,
            Failure::new(StatusCode::BAD_REQUEST, "bad result file name"),
        );
    }
    let read = {
        let (d, v, task, name) = (d.clone(), v.clone(), task.clone(), name.clone());
        move |offset: u64| {
            let (d, v, task, name) = (d.clone(), v.clone(), task.clone(), name.clone());
            async move {
                // The server answers at most 16 file reads at once
                // (`limit_reached` past it): wait a little and ask again
                // rather than break the download.
                let mut backoff = Duration::from_millis(20);
                loop {
                    let asked = d
                        .ask(
                            &v,
                            peer,
                            Body::GetFile {
                                request: 0,
                                task: task.clone(),
                                name: name.clone(),
                                offset,
                                max: MAX_READ_BYTES,
                            },
                        )
                        .await;
                    match asked {
                        Ok((Body::Data { eof, .. }, raw)) => {
                            return Ok((raw.unwrap_or_default(), eof))
                        }
                        Ok((other, _)) => return Err(unexpected("get_file", &other)),
                        Err(AskError::Busy)
                        | Err(AskError::Refused {
                            code: ErrorCode::LimitReached,
                            ..
                        }) if backoff < Duration::from_secs(5) => {
                            tokio::time::sleep(backoff).await; // backoff before asking again, not synchronisation
                            backoff *= 2;
                        }
                        Err(e) => return Err(Failure::from(e)),
                    }
                }
            }
        }
    };
    // The first chunk here: a refusal is an error page, not a broken download.
    let (first, eof) = match read(0).await {
        Ok(r) => r,
        Err(e) => return page_error(&v, e),
    };
    let stream = futures::stream::unfold((Some(first), eof, 0u64), move |(chunk, eof, offset)| {
        let read = read.clone();
        async move {
            if let Some(c) = chunk {
                let next = offset + c.len() as u64;
                return Some((Ok::<Bytes, std::io::Error>(c), (None, eof, next)));
            }
            if eof {
                return None;
            }
            match read(offset).await {
                Ok((c, eof)) if !c.is_empty() => {
                    let next = offset + c.len() as u64;
                    Some((Ok(c), (None, eof, next)))
                }
                Ok(_) => None,
                Err(f) => Some((Err(std::io::Error::other(f.message)), (None, true, offset))),
            }
        }
    });
    let file = name.rsplit('/').next().unwrap_or("result");
    let safe: String = file
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let disposition = format!("attachment; filename=\"{safe}\"");
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            ),
            (
                header::CONTENT_DISPOSITION,
                HeaderValue::from_str(&disposition)
                    .unwrap_or(HeaderValue::from_static("attachment")),
            ),
        ],
        axum::body::Body::from_stream(stream),
    )
        .into_response()
}

// ---------------------------------------------------------------------
// JSON
// ---------------------------------------------------------------------

fn json<T: serde::Serialize>(r: Result<T, Failure>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => api_error(e),
    }
}

async fn api_me(Api(v, _): Api) -> Response {
    Json(serde_json::json!({ "user": v.name(), "role": v.role().as_str(), "csrf": v.csrf }))
        .into_response()
}

async fn api_workers(State(d): D, Api(v, peer): Api) -> Response {
    json(workers(&d, &v, peer).await)
}

async fn api_worker(State(d): D, Api(v, peer): Api, Path(name): Path<String>) -> Response {
    json(health(&d, &v, peer, &name).await.map(|(worker, history, recent)| {
        serde_json::json!({ "worker": worker, "history": history, "recent": recent })
    }))
}

async fn api_queue(State(d): D, Api(v, peer): Api) -> Response {
    json(queues(&d, &v, peer).await)
}

async fn api_runs(State(d): D, Api(v, peer): Api, Query(q): Query<RunsQuery>) -> Response {
    json(
        list_runs(&d, &v, peer, &q)
            .await
            .map(|(runs, older)| serde_json::json!({ "runs": runs, "next_before": older })),
    )
}

async fn api_run(State(d): D, Api(v, peer): Api, Path(run): Path<String>) -> Response {
    json(status(&d, &v, peer, &run).await)
}

async fn api_run_notifications(
    State(d): D,
    Api(v, peer): Api,
    Path(run): Path<String>,
) -> Response {
    json(run_notifications(&d, &v, peer, &run).await)
}

#[derive(Deserialize, Default)]
struct FromQuery {
    #[serde(default)]
    from: Option<u64>,
}

async fn api_events(
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

async fn api_cancel(
    State(d): D,
    Api(v, peer): Api,
    headers: HeaderMap,
    Path(run): Path<String>,
) -> Response {
    let token = headers.get("x-csrf-token").and_then(|h| h.to_str().ok());
    if !d.csrf_ok(&v, token) {
        return api_error(Failure::new(
            StatusCode::FORBIDDEN,
            "missing or wrong X-CSRF-Token (GET /api/me gives it)",
        ));
    }
    json(cancel(&d, &v, peer, &run).await)
}

async fn api_drain(
    State(d): D,
    Api(v, peer): Api,
    headers: HeaderMap,
    Path(name): Path<String>,
    Query(f): Query<CsrfForm>,
) -> Response {
    let token = headers.get("x-csrf-token").and_then(|h| h.to_str().ok());
    if !d.csrf_ok(&v, token) {
        return api_error(Failure::new(
            StatusCode::FORBIDDEN,
            "missing or wrong X-CSRF-Token (GET /api/me gives it)",
        ));
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

async fn api_log(
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

async fn api_audit(State(d): D, Api(v, peer): Api, Query(q): Query<AuditQuery>) -> Response {
    let offset = q.offset.unwrap_or(0);
    json(audit_read(&d, &v, peer, offset).await.map(|(text, next)| {
        let entries: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        serde_json::json!({ "offset": offset, "next": next, "entries": entries })
    }))
}

/// Where a stream resumes: `Last-Event-ID` (a reconnect) over `?from=`.
fn resume_from(headers: &HeaderMap, q: &FromQuery) -> Result<u64, Failure> {
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

fn sse(rx: tokio::sync::mpsc::Receiver<axum::response::sse::Event>) -> Response {
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|e| (Ok::<_, std::convert::Infallible>(e), rx))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn api_log_stream(
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
    let slot = match Live::slot(&d, &run) {
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

async fn api_run_stream(
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
    let slot = match Live::slot(&d, &run) {
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
