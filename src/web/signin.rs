//! Signing in with a single-use link and out again; the session cookie
//! and the CSRF check every form passes.

use super::pages::{self};
use super::sessions::local_path;
use super::sessions::Viewer;
use super::{Counters, Dashboard, COOKIE};
use crate::web::extract::{next_cookie, Page, D, NEXT};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
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

/// The page to open after sign-in: the one asked for before it, if it is
/// a path of this dashboard; else the lab.
fn next_page(headers: &HeaderMap) -> String {
    super::cookie_value(headers, NEXT)
        .filter(|v| v.len() <= 2048)
        .and_then(|v| hex::decode(v).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .filter(|p| local_path(p) && !p.starts_with("/login"))
        .unwrap_or_else(|| "/".to_string())
}

/// Where a request came from, as the browser says (`Sec-Fetch-Site`,
/// else `Origin`): true when it is this site or the user's own action
/// (typed, pasted, opened from a terminal), false from another site or
/// when the browser does not say.
fn own_action(d: &Dashboard, headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        return site == "same-origin" || site == "none";
    }
    headers
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|o| o == d.base_url)
}

/// `GET /login?token=…`: signs in at once when the user opened the link
/// themselves in a browser not signed in as someone else; otherwise (a
/// visit from another site: login CSRF; or a different user's session
/// in this browser) a page names the user and asks (its button posts).
pub(super) async fn login(
    State(d): D,
    headers: HeaderMap,
    Query(q): Query<LoginQuery>,
) -> Response {
    if !well_formed(&q.token) {
        return pages::sign_in(Some("This sign-in link is malformed."));
    }
    let now = Instant::now();
    let (holder, current) = {
        let sessions = d.sessions.lock().expect("sessions");
        let current = super::cookie_value(&headers, COOKIE)
            .and_then(|c| sessions.viewer(now, c))
            .map(|v| v.label());
        (sessions.link_holder(now, &q.token), current)
    };
    let Some(holder) = holder else {
        return sign_in_with(&d, &q.token, &headers);
    };
    let as_who = holder
        .as_ref()
        .map_or_else(|| "local".to_string(), |i| i.label());
    let switching = current.as_ref().is_some_and(|c| *c != as_who);
    if own_action(&d, &headers) && !switching {
        return sign_in_with(&d, &q.token, &headers);
    }
    Counters::bump(&d.counters.sign_ins_confirmed);
    pages::confirm_sign_in(&as_who, current.as_deref(), &q.token)
}

#[derive(Deserialize)]
pub(super) struct LoginForm {
    pub(super) token: String,
}

/// `POST /login`: the confirmation page's button. Refused from another
/// site (the browser says where a form came from).
pub(super) async fn login_confirmed(
    State(d): D,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Response {
    if !own_action(&d, &headers) {
        Counters::bump(&d.counters.csrf_refused);
        return pages::sign_in(Some(
            "This sign-in came from another site and was refused: open the link `ots-submit web` printed yourself.",
        ));
    }
    if !well_formed(&f.token) {
        return pages::sign_in(Some("This sign-in link is malformed."));
    }
    sign_in_with(&d, &f.token, &headers)
}

fn well_formed(token: &str) -> bool {
    token.len() == 64 && token.bytes().all(|b| b.is_ascii_hexdigit())
}

fn sign_in_with(d: &Dashboard, token: &str, headers: &HeaderMap) -> Response {
    let signed = d.sessions.lock().expect("sessions").sign_in(
        Instant::now(),
        token,
        super::secret(),
        super::secret(),
    );
    match signed {
        Ok((cookie, _)) => {
            Counters::bump(&d.counters.sign_ins);
            let mut r = Redirect::to(&next_page(headers)).into_response();
            r.headers_mut().insert(
                header::SET_COOKIE,
                session_cookie(d, &cookie, super::sessions::SESSION_MAX_AGE.as_secs()),
            );
            if super::cookie_value(headers, NEXT).is_some() {
                r.headers_mut()
                    .append(header::SET_COOKIE, next_cookie(d, "", 0));
            }
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
    /// `yes`: the action was confirmed (a dialog, or the second step).
    #[serde(default)]
    pub(super) confirm: Option<String>,
    /// The dashboard page to return to (a path of this dashboard only).
    #[serde(default)]
    pub(super) back: Option<String>,
}

impl CsrfForm {
    pub(super) fn confirmed(&self) -> bool {
        self.confirm.as_deref() == Some("yes")
    }

    /// `back` if it is a path of this dashboard, else `default`.
    pub(super) fn back_or(&self, default: &str) -> String {
        match self.back.as_deref() {
            Some(b) if local_path(b) => b.to_string(),
            _ => default.to_string(),
        }
    }
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
