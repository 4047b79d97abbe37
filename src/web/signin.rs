//! Signing in with a single-use link and out again; the session cookie
//! and the CSRF check every form passes.

use super::pages::{self};
use super::sessions::Viewer;
use super::{Counters, Dashboard, COOKIE};
use crate::web::extract::{Page, D};
use axum::extract::{Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use serde::Deserialize;
use std::time::Instant;

#[derive(Deserialize)]
pub(super) struct LoginQuery {
    pub(super) token: String,
}

pub(super) fn session_cookie(d: &Dashboard, value: &str, max_age: u64) -> HeaderValue {
    let secure = if d.secure_cookie { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
    ))
    .expect("cookie is ASCII")
}

pub(super) async fn login(State(d): D, Query(q): Query<LoginQuery>) -> Response {
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
pub(super) struct CsrfForm {
    #[serde(default)]
    pub(super) csrf: Option<String>,
    #[serde(default)]
    pub(super) drain: Option<String>,
}

pub(super) fn forbidden_csrf(v: &Viewer) -> Response {
    pages::error(
        v,
        StatusCode::FORBIDDEN,
        "this request did not carry the page's CSRF token; reload the page and try again",
    )
}

pub(super) async fn logout(State(d): D, Page(v, _): Page, Form(f): Form<CsrfForm>) -> Response {
    if !d.csrf_ok(&v, f.csrf.as_deref()) {
        return forbidden_csrf(&v);
    }
    d.sessions.lock().expect("sessions").sign_out(&v.key);
    let mut r = pages::sign_in(Some("Signed out."));
    r.headers_mut()
        .insert(header::SET_COOKIE, session_cookie(&d, "", 0));
    r
}
