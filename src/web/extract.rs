//! Who is asking and how an answer or a failure is shown: the page and
//! API extractors (the signed-in viewer and the browser's address), the
//! one way every handler asks the scheduler, and errors as pages or JSON.

use super::http::{PeerAddr, Seen};
use super::live::{self};
use super::pages::{self};
use super::sessions::Viewer;
use super::{Counters, Dashboard, Failure};
use crate::protocol::limits::is_safe_id;
use crate::protocol::Body;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::Arc;

pub(super) type D = State<Arc<Dashboard>>;

/// A signed-in viewer of a page and where it connected from; an
/// anonymous visitor gets the sign-in page (no data) instead.
pub struct Page(pub Viewer, pub SocketAddr);

/// The same for `/api/`: an anonymous caller gets 401 (JSON).
pub struct Api(pub Viewer, pub SocketAddr);

pub(super) fn viewer_of(
    parts: &axum::http::request::Parts,
    d: &Dashboard,
) -> Result<(Viewer, SocketAddr), ()> {
    let peer = parts.extensions.get::<PeerAddr>().ok_or(())?.0;
    match parts.extensions.get::<Seen>().and_then(|s| s.0.clone()) {
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
            .map_err(|()| {
                let mut r = pages::sign_in(None);
                // The page asked for is where sign-in leads (a deep link
                // survives it): kept 15 minutes in a cookie of its own.
                let wanted = parts.uri.path_and_query().map_or("/", |p| p.as_str());
                if parts.method == axum::http::Method::GET && super::sessions::local_path(wanted) {
                    r.headers_mut().append(
                        axum::http::header::SET_COOKIE,
                        next_cookie(d, &hex::encode(wanted), 900),
                    );
                }
                r
            })
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

pub(super) fn api_error(f: Failure) -> Response {
    (f.status, Json(serde_json::json!({ "error": f.message }))).into_response()
}

pub(super) fn page_error(v: &Viewer, f: Failure) -> Response {
    pages::error(v, f.status, &f.message)
}

pub(super) fn unexpected(what: &str, b: &Body) -> Failure {
    Failure::new(
        StatusCode::BAD_GATEWAY,
        format!("unexpected answer to {what}: {}", b.kind()),
    )
}

pub(super) fn check_id(what: &str, id: &str) -> Result<(), Failure> {
    if is_safe_id(id) {
        Ok(())
    } else {
        Err(Failure::new(
            StatusCode::BAD_REQUEST,
            format!("{what} must be 1–64 characters of A–Z a–z 0–9 . _ -"),
        ))
    }
}

pub(super) fn run_of_task(task: &str) -> Result<String, Failure> {
    check_id("a task id", task)?;
    live::run_of(task)
        .ok_or_else(|| Failure::new(StatusCode::NOT_FOUND, format!("no task {task:?}")))
}

/// Asks `body` as `v`; `pick` takes the expected answer apart, or names
/// the kind of any other (reported as unexpected).
pub(super) async fn ask_for<T>(
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

pub(super) fn json<T: serde::Serialize>(r: Result<T, Failure>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => api_error(e),
    }
}

/// An API request that acts must carry the session's CSRF token in
/// `X-CSRF-Token`: none if it does, else the 403 to answer.
pub(super) fn api_csrf(
    d: &Dashboard,
    v: &Viewer,
    headers: &axum::http::HeaderMap,
) -> Option<Response> {
    let token = headers.get("x-csrf-token").and_then(|h| h.to_str().ok());
    (!d.csrf_ok(v, token)).then(|| {
        api_error(Failure::new(
            StatusCode::FORBIDDEN,
            "missing or wrong X-CSRF-Token (GET /api/me gives it)",
        ))
    })
}

/// The cookie naming the page to open after sign-in (hex of its path).
pub(super) const NEXT: &str = "ots_next";

pub(super) fn next_cookie(d: &Dashboard, value: &str, max_age: u64) -> HeaderValue {
    let secure = if d.secure_cookie { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{NEXT}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
    ))
    .expect("cookie is ASCII")
}
