//! The web dashboard (`web = "127.0.0.1:8080"` in `server.toml`): the lab,
//! the queue, testruns, live task logs, workers and the audit log, as
//! server-rendered HTML with a little plain JavaScript for live updates,
//! and the same as JSON under `/api/`.
//!
//! The dashboard is another client: every page asks the
//! scheduler through [`bridge`] as the signed-in user, so it sees what the
//! `access` rules let that user see and nothing else. Identity comes from
//! the user's key: `ots-submit web` asks over Noise for a single-use link
//! ([`sessions`]); no passwords. Sites that authenticate at a reverse
//! proxy can have the proxy name the user in a header instead.
//!
//! - [`sessions`]: sign-in links and sessions (I/O-free).
//! - [`bridge`]: the bounded request path into the serving loop.
//! - [`api`]: the router, one table; its handlers by kind: `html` (pages
//!   and the forms that act), `json` (`/api/` and the live streams),
//!   `signin` (links, the session cookie, CSRF), `download` (logs and
//!   files); `extract` (who asks, errors as pages or JSON) and `asks`
//!   (what the dashboard asks the scheduler) beneath them.
//! - [`live`]: live log lines and progress (server-sent events, resumable
//!   by offset).
//! - [`pages`]: the HTML itself.
//! - [`http`]: the listener (timeouts, TLS), letting connections in
//!   through [`door`] (shares per user, per address, for strangers).

mod ansi;
pub mod api;
mod asks;
pub mod bridge;
mod charts;
pub mod door;
mod download;
mod extract;
mod facts;
mod html;
pub mod http;
mod json;
mod leases;
pub mod live;
mod logview;
pub mod pages;
mod results;
pub mod sessions;
mod signin;

use crate::protocol::{Body, ErrorCode};
use crate::security::{Identity, Role};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bridge::{AskError, Asker};
use bytes::Bytes;
use sessions::{Grants, Sessions, Viewer};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The session cookie's name.
pub const COOKIE: &str = "ots_session";
/// Bytes of a form or JSON body the dashboard accepts, at most.
pub const MAX_REQUEST_BODY: usize = 16 * 1024;

/// How the dashboard is served (from `server.toml`).
#[derive(Clone, Debug)]
pub struct WebConfig {
    pub addr: SocketAddr,
    /// `web_tls_cert`, `web_tls_key` (PEM): HTTPS with rustls.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// The address links are made with (`web_url`, behind a proxy);
    /// default: the bound address.
    pub url: Option<String>,
    /// `web_proxy_user_header`: a reverse proxy that authenticated the
    /// user names it in this header…
    pub proxy_user_header: Option<String>,
    /// …trusted only on connections from these addresses.
    pub trusted_proxies: Vec<IpAddr>,
    /// Security on: sessions carry identities from the allow-lists.
    pub secure: bool,
    /// `web_failure_text`: the log viewer's "first failure" without a
    /// failing test case.
    pub failure_text: String,
}

/// Why the dashboard could not start.
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error("web dashboard address {addr} (setting `web`): {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("web dashboard TLS (settings `web_tls_cert`, `web_tls_key`): {path}: {reason}")]
    Tls { path: PathBuf, reason: String },
}

/// What the dashboard counts (reported with the server's counters).
#[derive(Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub busy: AtomicU64,
    pub anonymous: AtomicU64,
    pub csrf_refused: AtomicU64,
    pub streams_refused: AtomicU64,
    pub connections_refused: AtomicU64,
    /// Anonymous connections ended to make room for newcomers.
    pub connections_ended: AtomicU64,
    pub sign_ins: AtomicU64,
    /// Sign-in links answered with a confirmation page (opened from
    /// another site, or switching users).
    pub sign_ins_confirmed: AtomicU64,
}

impl Counters {
    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn take(c: &AtomicU64) -> u64 {
        c.swap(0, Ordering::Relaxed)
    }
}

/// The dashboard's shared state.
pub struct Dashboard {
    pub sessions: Mutex<Sessions>,
    pub asker: Asker,
    pub live: live::Live,
    pub counters: Counters,
    /// Where links point (`http(s)://HOST:PORT`, no trailing slash).
    pub base_url: String,
    /// Cookies get `Secure` (HTTPS, directly or at the proxy).
    pub secure_cookie: bool,
    proxy_user_header: Option<axum::http::HeaderName>,
    trusted_proxies: Vec<IpAddr>,
    /// Keys the CSRF tokens of trusted-proxy viewers (they have no
    /// session to hold one).
    proxy_secret: [u8; 32],
    /// `web_failure_text`.
    pub failure_text: String,
}

/// A running dashboard: what the serving loop needs of it.
pub struct WebHandle {
    pub dashboard: Arc<Dashboard>,
    pub asks: tokio::sync::mpsc::Receiver<bridge::Ask>,
    /// The bound address (port resolved).
    pub addr: SocketAddr,
}

/// The identity dashboard-internal reads use (live log polling for many
/// viewers at once, each checked as itself when it opened its stream).
pub fn internal_identity(secure: bool) -> Option<Identity> {
    secure.then(|| Identity::User {
        name: "@dashboard".into(),
        role: Role::Operator,
    })
}

/// Binds the dashboard and starts serving it.
pub async fn start(cfg: WebConfig, users: Option<Grants>) -> Result<WebHandle, WebError> {
    let tls = match &cfg.tls {
        None => None,
        Some((cert, key)) => Some(http::load_tls(cert, key)?),
    };
    let listener = tokio::net::TcpListener::bind(cfg.addr)
        .await
        .map_err(|source| WebError::Bind {
            addr: cfg.addr,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| WebError::Bind {
        addr: cfg.addr,
        source,
    })?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let base_url = cfg
        .url
        .clone()
        .map(|u| u.trim_end_matches('/').to_string())
        .unwrap_or_else(|| format!("{scheme}://{addr}"));
    let (asker, asks) = Asker::new();
    let dashboard = Arc::new(Dashboard {
        sessions: Mutex::new(Sessions::new(users.filter(|_| cfg.secure))),
        live: live::Live::new(asker.clone(), cfg.secure),
        asker,
        counters: Counters::default(),
        secure_cookie: tls.is_some() || base_url.starts_with("https://"),
        base_url,
        proxy_user_header: cfg
            .proxy_user_header
            .as_deref()
            .and_then(|h| axum::http::HeaderName::from_bytes(h.as_bytes()).ok()),
        trusted_proxies: cfg.trusted_proxies.clone(),
        proxy_secret: rand::random(),
        failure_text: cfg.failure_text.clone(),
    });
    let app = api::router(dashboard.clone());
    tokio::spawn(http::serve(listener, tls, app, dashboard.clone()));
    Ok(WebHandle {
        dashboard,
        asks,
        addr,
    })
}

/// Bytes for a secret, from the thread's CSPRNG.
fn secret<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut b);
    b
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Dashboard {
    /// A sign-in link for `identity`, which authenticated with `key` (a
    /// `web_login` over Noise): the URL and its expiry (Unix ms), or why
    /// none.
    pub fn mint_link(
        &self,
        identity: Option<Identity>,
        key: Option<crate::security::PublicKey>,
    ) -> Result<(String, u64), String> {
        let token = self.sessions.lock().expect("sessions").mint_link(
            Instant::now(),
            identity,
            key,
            secret(),
        )?;
        let expires = crate::protocol::limits::unix_ms_now()
            .saturating_add(sessions::LINK_VALID.as_millis() as u64);
        Ok((format!("{}/login?token={token}", self.base_url), expires))
    }

    /// The allow-lists were read again: ends sessions of users who went
    /// or changed role or key (and their live streams, within their next
    /// check).
    pub fn set_users(&self, users: Grants) -> usize {
        self.sessions.lock().expect("sessions").set_users(users)
    }

    /// The counters since the last call, as `web_*` names.
    pub fn take_counters(&self) -> Vec<(&'static str, u64)> {
        let c = &self.counters;
        let mut out = vec![
            ("web_requests", Counters::take(&c.requests)),
            ("web_requests_busy", Counters::take(&c.busy)),
            ("web_requests_anonymous", Counters::take(&c.anonymous)),
            ("web_csrf_refused", Counters::take(&c.csrf_refused)),
            ("web_streams_refused", Counters::take(&c.streams_refused)),
            (
                "web_connections_refused",
                Counters::take(&c.connections_refused),
            ),
            (
                "web_connections_ended",
                Counters::take(&c.connections_ended),
            ),
            ("web_sign_ins", Counters::take(&c.sign_ins)),
            (
                "web_sign_ins_confirmed",
                Counters::take(&c.sign_ins_confirmed),
            ),
        ];
        let mut s = self.sessions.lock().expect("sessions");
        out.push(("web_sessions_revoked", std::mem::take(&mut s.revoked)));
        out.push(("web_sign_ins_refused", std::mem::take(&mut s.refused)));
        out.push(("web_sessions_replaced", std::mem::take(&mut s.replaced)));
        out.retain(|(_, n)| *n > 0);
        out
    }

    /// Who sent a request: its session cookie, or (trusted-proxy mode)
    /// the user a trusted proxy named.
    pub fn viewer(&self, headers: &HeaderMap, peer: SocketAddr) -> Option<Viewer> {
        if let Some(cookie) = cookie_value(headers, COOKIE) {
            let now = Instant::now();
            if let Some(v) = self.sessions.lock().expect("sessions").viewer(now, cookie) {
                return Some(v);
            }
        }
        let header = self.proxy_user_header.as_ref()?;
        if !self.trusted_proxies.contains(&peer.ip()) {
            return None;
        }
        let name = headers.get(header)?.to_str().ok()?;
        if !crate::protocol::limits::is_safe_id(name) {
            return None;
        }
        let sessions = self.sessions.lock().expect("sessions");
        let role = sessions.role_of(name)?;
        let identity = sessions.secure().then(|| Identity::User {
            name: name.to_string(),
            role,
        });
        Some(self.proxy_viewer(identity, name))
    }

    fn proxy_viewer(&self, identity: Option<Identity>, name: &str) -> Viewer {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(self.proxy_secret);
        h.update(b"proxy csrf ");
        h.update(name.as_bytes());
        let key: [u8; 32] = h.finalize().into();
        Viewer {
            identity,
            csrf: hex::encode(&key[..16]),
            key,
        }
    }

    /// Whether `viewer` may still see anything: its session is valid (or,
    /// through a proxy, its user still has that role).
    pub fn still_valid(&self, viewer: &Viewer) -> bool {
        let sessions = self.sessions.lock().expect("sessions");
        if sessions.session(Instant::now(), &viewer.key).is_some() {
            return true;
        }
        // A trusted-proxy viewer has no session: its user must still be
        // granted the same role.
        self.proxy_user_header.is_some()
            && match &viewer.identity {
                Some(Identity::User { name, role }) => {
                    sessions.role_of(name) == Some(*role)
                        && self.proxy_viewer(viewer.identity.clone(), name).key == viewer.key
                }
                Some(Identity::Worker { .. }) => false,
                // Without security nothing is revoked.
                None => !sessions.secure(),
            }
    }

    /// Checks a state-changing request's CSRF token.
    pub fn csrf_ok(&self, viewer: &Viewer, token: Option<&str>) -> bool {
        let ok = token.is_some_and(|t| constant_time_eq(t.as_bytes(), viewer.csrf.as_bytes()));
        if !ok {
            Counters::bump(&self.counters.csrf_refused);
        }
        ok
    }

    /// Asks the scheduler `body` as `viewer`.
    pub async fn ask(
        &self,
        viewer: &Viewer,
        peer: SocketAddr,
        body: Body,
    ) -> Result<(Body, Option<Bytes>), AskError> {
        self.ask_raw(viewer, peer, body, None).await
    }

    /// [`Self::ask`] with a raw frame (console input).
    pub async fn ask_raw(
        &self,
        viewer: &Viewer,
        peer: SocketAddr,
        body: Body,
        raw: Option<Bytes>,
    ) -> Result<(Body, Option<Bytes>), AskError> {
        Counters::bump(&self.counters.requests);
        let r = self
            .asker
            .ask_raw(
                viewer.identity.clone(),
                format!("web:{}", peer.ip()),
                body,
                raw,
            )
            .await;
        if matches!(r, Err(AskError::Busy)) {
            Counters::bump(&self.counters.busy);
        }
        r
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// An answer the dashboard cannot show as asked.
pub struct Failure {
    pub status: StatusCode,
    pub message: String,
}

impl Failure {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Failure {
            status,
            message: message.into(),
        }
    }
}

impl From<AskError> for Failure {
    fn from(e: AskError) -> Self {
        let status = match &e {
            AskError::Busy | AskError::Stopped => StatusCode::SERVICE_UNAVAILABLE,
            AskError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            AskError::Refused { code, .. } => match code {
                ErrorCode::Forbidden | ErrorCode::Unauthenticated => StatusCode::FORBIDDEN,
                ErrorCode::UnknownRun | ErrorCode::UnknownTask => StatusCode::NOT_FOUND,
                ErrorCode::LimitReached => StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::StorageFailed => StatusCode::INTERNAL_SERVER_ERROR,
                _ => StatusCode::BAD_REQUEST,
            },
        };
        Failure {
            status,
            message: e.to_string(),
        }
    }
}

/// Headers every response carries: no framing, no sniffing, no referrer
/// (a sign-in link must not leak), scripts and styles from here only.
pub fn harden(response: &mut Response) {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.status, self.message).into_response()
    }
}
