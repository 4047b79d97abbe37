//! The dashboard's routes, one table: pages (`html`), their JSON under
//! `/api/` (`json`), sign-in (`signin`), actions and downloads
//! (`download`). Each handler finds out who asks (`extract`), asks the
//! scheduler as that user (`asks`), and renders the answer; a refusal of
//! the scheduler's is shown as it is (403 for another user's testrun).

use super::{leases, pages};
use super::{Dashboard, MAX_REQUEST_BODY};
use crate::web::download::download;
use crate::web::html::{
    audit_page, cancel_form, drain_form, lab_page, queue_page, run_page, runs_page, worker_page,
};
use crate::web::json::{
    api_audit, api_cancel, api_drain, api_events, api_log, api_log_stream, api_me, api_queue,
    api_run, api_run_notifications, api_run_stream, api_runs, api_worker, api_workers,
};
use crate::web::signin::{login, login_confirmed, logout};
use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use std::sync::Arc;

/// The routes.
pub fn router(d: Arc<Dashboard>) -> Router {
    Router::new()
        .route("/", get(lab_page))
        .route("/queue", get(queue_page))
        .route("/runs", get(runs_page))
        .route("/runs/{run}", get(run_page))
        .route("/runs/{run}/cancel", post(cancel_form))
        .route("/tasks/{task}/log", get(super::logview::log_page))
        .route("/tasks/{task}/log.txt", get(super::download::raw_log))
        .route("/tasks/{task}/files/{*name}", get(download))
        .route("/workers/{name}", get(worker_page))
        .route("/workers/{name}/drain", post(drain_form))
        .route("/audit", get(audit_page))
        .route("/cases", get(super::results::case_page))
        .route("/series/{series}", get(super::results::series_page))
        .route("/report", get(super::results::report_page))
        .route(
            "/leases",
            get(leases::leases_page).post(leases::reserve_form),
        )
        .route("/leases/{lease}", get(leases::lease_page))
        .route("/leases/{lease}/act", post(leases::lease_form))
        .route("/leases/{lease}/input", post(leases::input_form))
        .route("/api/leases", get(leases::api_leases))
        .route("/api/leases/{lease}/input", post(leases::api_input))
        .route("/api/leases/{lease}/keep", post(leases::api_keep))
        .route("/login", get(login).post(login_confirmed))
        .route("/logout", post(logout))
        .route("/static/ots.css", get(css))
        .route("/favicon.svg", get(favicon))
        .route("/favicon.ico", get(favicon))
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

async fn not_found(uri: axum::http::Uri) -> Response {
    // An API caller gets JSON-less text; a browser the page with the way back.
    if uri.path().starts_with("/api/") {
        return (StatusCode::NOT_FOUND, "no such page").into_response();
    }
    pages::not_found()
}

async fn favicon() -> Response {
    static_asset("image/svg+xml", pages::FAVICON)
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

// ---------------------------------------------------------------------
// Asking the scheduler
// ---------------------------------------------------------------------

// ---------------------------------------------------------------------
// Pages
// ---------------------------------------------------------------------

// ---------------------------------------------------------------------
// Sign-in, actions
// ---------------------------------------------------------------------

// ---------------------------------------------------------------------
// JSON
// ---------------------------------------------------------------------
