//! Leases in the dashboard: the Leases page (held and waiting, and the
//! last that ended; reserve, renew and release with the page's CSRF
//! token), one lease's page with its power buttons and its console — the
//! transcript streamed live like any task log (the same session rules and
//! bounds), and a line of input posted to the server. Input carries the
//! page's own stream id and offset, so a form sent twice (a reload) or a
//! request retried after a lost answer types nothing twice
//! (PROTOCOL.md §18.4).

use super::pages::{self, log_lines, name, when};
use super::sessions::Viewer;
use super::{Dashboard, Failure};
use crate::protocol::{Body, DeviceLease, LeaseAction, LeaseState, PowerAction};
use crate::security::Role;
use crate::web::asks::{log_chunk, LogQuery};
use crate::web::extract::{api_csrf, ask_for, check_id, json, page_error, Api, Page, D};
use crate::web::signin::forbidden_csrf;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Form, Json};
use bytes::Bytes;
use maud::html;
use serde::Deserialize;
use std::net::SocketAddr;

/// A line typed in the browser, at most (the protocol's per-message limit).
const MAX_LINE: usize = crate::protocol::leasing::MAX_CONSOLE_INPUT_BYTES;

async fn list(d: &Dashboard, v: &Viewer, peer: SocketAddr) -> Result<Vec<DeviceLease>, Failure> {
    ask_for(
        d,
        v,
        peer,
        Body::ListLeases {
            request: 0,
            all: true,
        },
        |b, _| match b {
            Body::Leases { leases, .. } => Ok(leases),
            other => Err(other.kind()),
        },
    )
    .await
}

async fn act(
    d: &Dashboard,
    v: &Viewer,
    peer: SocketAddr,
    lease: &str,
    action: LeaseAction,
    force: bool,
    duration_ms: Option<u64>,
) -> Result<DeviceLease, Failure> {
    check_id("a lease id", lease)?;
    let body = Body::LeaseAct {
        request: 0,
        lease: lease.to_string(),
        action,
        force,
        duration_ms,
        user: None,
    };
    ask_for(d, v, peer, body, |b, _| match b {
        Body::Leases { mut leases, .. } if leases.len() == 1 => Ok(leases.remove(0)),
        other => Err(other.kind()),
    })
    .await
}

fn duration_ms(text: Option<&str>) -> Result<Option<u64>, Failure> {
    match text.map(str::trim).filter(|t| !t.is_empty()) {
        None => Ok(None),
        Some(t) => humantime::parse_duration(t)
            .map(|d| Some(d.as_millis().min(u128::from(u64::MAX)) as u64))
            .map_err(|e| {
                Failure::new(
                    StatusCode::BAD_REQUEST,
                    format!("duration {t:?}: {e} (e.g. 30m, 2h)"),
                )
            }),
    }
}

#[derive(Deserialize, Default)]
pub(super) struct LeaseForm {
    #[serde(default)]
    csrf: Option<String>,
    #[serde(default)]
    device: Option<String>,
    #[serde(default)]
    duration: Option<String>,
    #[serde(default)]
    reason: Option<String>,
    /// `release`, `force`, `renew`, or a power action.
    #[serde(default)]
    action: Option<String>,
    /// `yes`: a release was confirmed (a dialog, or the second step).
    #[serde(default)]
    confirm: Option<String>,
    /// The dashboard page to return to.
    #[serde(default)]
    back: Option<String>,
    #[serde(default)]
    stream: Option<String>,
    #[serde(default)]
    offset: Option<u64>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    eol: Option<String>,
}

pub(super) async fn leases_page(State(d): D, Page(v, peer): Page) -> Response {
    match list(&d, &v, peer).await {
        Ok(l) => leases_html(&v, &l),
        Err(e) => page_error(&v, e),
    }
}

pub(super) async fn reserve_form(
    State(d): D,
    Page(v, peer): Page,
    Form(f): Form<LeaseForm>,
) -> Response {
    if !d.csrf_ok(&v, f.csrf.as_deref()) {
        return forbidden_csrf(&v);
    }
    let result = async {
        let spec = f.device.as_deref().unwrap_or("").trim();
        let device = crate::protocol::DeviceSpec::parse(spec).map_err(|e| {
            Failure::new(
                StatusCode::BAD_REQUEST,
                format!("device spec {spec:?}: {e}"),
            )
        })?;
        let ms = duration_ms(f.duration.as_deref())?.unwrap_or(3_600_000);
        let body = Body::Reserve {
            request: 0,
            device,
            duration_ms: ms,
            reason: f.reason.clone().unwrap_or_default(),
            priority: crate::protocol::Priority::Normal,
            queue_anyway: false,
        };
        ask_for(&d, &v, peer, body, |b, _| match b {
            Body::Leases { mut leases, .. } if leases.len() == 1 => Ok(leases.remove(0)),
            other => Err(other.kind()),
        })
        .await
    }
    .await;
    match result {
        Ok(l) => Redirect::to(&format!("/leases/{}", l.lease)).into_response(),
        Err(e) => page_error(&v, e),
    }
}

#[derive(Deserialize, Default)]
pub(super) struct LeaseQuery {
    #[serde(default)]
    power: Option<String>,
}

pub(super) async fn lease_page(
    State(d): D,
    Page(v, peer): Page,
    Path(lease): Path<String>,
    Query(q): Query<LeaseQuery>,
) -> Response {
    if let Err(e) = check_id("a lease id", &lease) {
        return page_error(&v, e);
    }
    let l = match list(&d, &v, peer).await {
        Ok(all) => match all.into_iter().find(|l| l.lease == lease) {
            Some(l) => l,
            None => {
                return page_error(
                    &v,
                    Failure::new(
                        StatusCode::NOT_FOUND,
                        format!("no lease {lease} you may see"),
                    ),
                )
            }
        },
        Err(e) => return page_error(&v, e),
    };
    let task = format!("{lease}.1");
    let log = log_chunk(&d, &v, peer, &task, &LogQuery::default()).await;
    let stream = format!("web-{:016x}", rand::random::<u64>());
    lease_html(&v, &l, log.ok(), &stream, q.power.as_deref())
}

pub(super) async fn lease_form(
    State(d): D,
    Page(v, peer): Page,
    Path(lease): Path<String>,
    Form(f): Form<LeaseForm>,
) -> Response {
    if !d.csrf_ok(&v, f.csrf.as_deref()) {
        return forbidden_csrf(&v);
    }
    let action = f.action.as_deref().unwrap_or("");
    let back = match f.back.as_deref() {
        Some(b) if super::sessions::local_path(b) => b.to_string(),
        _ => format!("/leases/{lease}"),
    };
    if matches!(action, "release" | "force") && f.confirm.as_deref() != Some("yes") {
        return pages::confirm(
            &v,
            &format!("End lease {lease}?"),
            &format!("/leases/{lease}/act"),
            &[("action", action)],
            "Yes, release it (its consoles close, the device goes back to CI)",
            &back,
        );
    }
    let result = match action {
        "release" => act(&d, &v, peer, &lease, LeaseAction::Release, false, None)
            .await
            .map(|_| None),
        "force" => act(&d, &v, peer, &lease, LeaseAction::Release, true, None)
            .await
            .map(|_| None),
        "renew" => match duration_ms(f.duration.as_deref()) {
            Ok(ms) => act(&d, &v, peer, &lease, LeaseAction::Renew, false, ms)
                .await
                .map(|_| None),
            Err(e) => Err(e),
        },
        "on" | "off" | "cycle" | "status" => power(&d, &v, peer, &lease, action).await.map(Some),
        other => Err(Failure::new(
            StatusCode::BAD_REQUEST,
            format!("unknown action {other:?}"),
        )),
    };
    match result {
        Ok(None) => Redirect::to(&back).into_response(),
        Ok(Some(said)) => Redirect::to(&format!(
            "/leases/{lease}?power={}",
            pages::url_escape(&said)
        ))
        .into_response(),
        Err(e) => page_error(&v, e),
    }
}

async fn power(
    d: &Dashboard,
    v: &Viewer,
    peer: SocketAddr,
    lease: &str,
    action: &str,
) -> Result<String, Failure> {
    check_id("a lease id", lease)?;
    let action = match action {
        "on" => PowerAction::On,
        "off" => PowerAction::Off,
        "cycle" => PowerAction::Cycle,
        _ => PowerAction::Status,
    };
    let body = Body::Power {
        request: 0,
        lease: lease.to_string(),
        action,
    };
    ask_for(d, v, peer, body, |b, _| match b {
        Body::PowerResult {
            ok, state, message, ..
        } => Ok(format!(
            "{action}: {}, state {state}{}",
            if ok { "done" } else { "failed" },
            if message.is_empty() {
                String::new()
            } else {
                format!(" ({message})")
            }
        )),
        other => Err(other.kind()),
    })
    .await
}

async fn input(
    d: &Dashboard,
    v: &Viewer,
    peer: SocketAddr,
    lease: &str,
    stream: &str,
    offset: u64,
    bytes: Vec<u8>,
) -> Result<u64, Failure> {
    check_id("a lease id", lease)?;
    check_id("an input stream id", stream)?;
    if bytes.len() > MAX_LINE {
        return Err(Failure::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("{} bytes of input at once; at most {MAX_LINE}", bytes.len()),
        ));
    }
    // The server answers at once with what the worker has acknowledged;
    // the same bytes asked again (a repeat: nothing typed twice) until the
    // worker has them too, for a little while.
    let end = offset.saturating_add(bytes.len() as u64);
    let bytes = Bytes::from(bytes);
    let deadline = tokio::time::Instant::now() + INPUT_WAIT;
    loop {
        let body = Body::ConsoleInput {
            request: 0,
            lease: lease.to_string(),
            stream: stream.to_string(),
            offset,
        };
        let have = match d.ask_raw(v, peer, body, Some(bytes.clone())).await? {
            (Body::ConsoleInputAck { have, .. }, _) => have,
            (other, _) => {
                return Err(Failure::new(
                    StatusCode::BAD_GATEWAY,
                    format!("unexpected answer to console_input: {}", other.kind()),
                ))
            }
        };
        if have >= end || tokio::time::Instant::now() >= deadline {
            return Ok(have);
        }
        tokio::time::sleep(INPUT_POLL).await;
    }
}

/// How long a page's input request waits for the worker's
/// acknowledgement, asking every [`INPUT_POLL`] (the browser sends it
/// again after that).
const INPUT_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
const INPUT_POLL: std::time::Duration = std::time::Duration::from_millis(10);

fn typed(f: &LeaseForm) -> Vec<u8> {
    let mut bytes = f.text.clone().unwrap_or_default().into_bytes();
    match f.eol.as_deref() {
        Some("none") => {}
        Some("cr") => bytes.push(b'\r'),
        _ => bytes.push(b'\n'),
    }
    bytes
}

/// The form without JavaScript: one line per page (its stream from the
/// page, offset 0), so sending the same form again types nothing.
pub(super) async fn input_form(
    State(d): D,
    Page(v, peer): Page,
    Path(lease): Path<String>,
    Form(f): Form<LeaseForm>,
) -> Response {
    if !d.csrf_ok(&v, f.csrf.as_deref()) {
        return forbidden_csrf(&v);
    }
    let stream = f.stream.clone().unwrap_or_default();
    match input(
        &d,
        &v,
        peer,
        &lease,
        &stream,
        f.offset.unwrap_or(0),
        typed(&f),
    )
    .await
    {
        Ok(_) => Redirect::to(&format!("/leases/{lease}")).into_response(),
        Err(e) => page_error(&v, e),
    }
}

pub(super) async fn api_leases(State(d): D, Api(v, peer): Api) -> Response {
    json(list(&d, &v, peer).await)
}

/// `POST /api/leases/{lease}/keep` with `X-CSRF-Token`: the holder is
/// still there (an open console page says so every minute).
pub(super) async fn api_keep(
    State(d): D,
    Api(v, peer): Api,
    headers: HeaderMap,
    Path(lease): Path<String>,
) -> Response {
    if let Some(refused) = api_csrf(&d, &v, &headers) {
        return refused;
    }
    json(act(&d, &v, peer, &lease, LeaseAction::Keep, false, None).await)
}

#[derive(Deserialize)]
pub(super) struct InputJson {
    stream: String,
    offset: u64,
    text: String,
}

/// `POST /api/leases/{lease}/input` `{stream, offset, text}` with
/// `X-CSRF-Token`: answers `{have}` (how much of the stream the server
/// applied; resend from there).
pub(super) async fn api_input(
    State(d): D,
    Api(v, peer): Api,
    headers: HeaderMap,
    Path(lease): Path<String>,
    Json(i): Json<InputJson>,
) -> Response {
    if let Some(refused) = api_csrf(&d, &v, &headers) {
        return refused;
    }
    json(
        input(
            &d,
            &v,
            peer,
            &lease,
            &i.stream,
            i.offset,
            i.text.into_bytes(),
        )
        .await
        .map(|have| serde_json::json!({ "have": have })),
    )
}

fn span(ms: u64) -> String {
    crate::text::span_ms(ms)
}

fn leases_html(v: &Viewer, leases: &[DeviceLease]) -> Response {
    let now = crate::protocol::limits::unix_ms_now();
    let operator = v.role() >= Role::Operator;
    pages::page(
        v,
        "Leases",
        html! {
            h1 { "Leases" }
            p { "A device for a person: it waits in the same queue as tasks, and the device takes no task while it is held. It ends at its time, on release, or when its holder has not been heard for a while." }
            form.filters method="post" action="/leases" {
                input type="hidden" name="csrf" value=(v.csrf);
                label { "device " input name="device" size="28" placeholder="devicegroup:NAME" required; }
                label { " for " input name="duration" size="6" value="1h"; }
                label { " why " input name="reason" size="30"; }
                button type="submit" { "Reserve" }
            }
            @if leases.is_empty() {
                p { "No leases." }
            } @else {
                div.scroll { table {
                    thead { tr { th { "Lease" } th { "State" } th { "Holder" } th { "Device" } th { "Worker" } th { "Since" } th { "Until" } th { "Reason" } th { "" } } }
                    tbody {
                        @for l in leases {
                            @let mine = l.holder.as_deref() == Some(v.name());
                            tr {
                                td { a href={ "/leases/" (l.lease) } { (l.lease) } }
                                td { span class={ "state " (name(&l.state)) } { (name(&l.state)) }
                                    @if let Some(p) = l.position { " #" (p) } }
                                td { (l.holder.as_deref().unwrap_or("-")) }
                                td { (l.device.to_string()) }
                                td { @if let Some(w) = &l.worker { a href={ "/workers/" (w) } { (w) } } @else { "-" } }
                                td { (when(l.granted_ms.unwrap_or(l.requested_ms))) }
                                td { @match (l.state, l.until_ms, l.ended_ms) {
                                    (LeaseState::Ended, _, Some(e)) => { "ended " (when(e)) ": " (l.ended.as_deref().unwrap_or("-")) }
                                    (_, Some(u), _) => { (when(u)) " (" (crate::text::ago(u.saturating_sub(now))) " left)" }
                                    _ => { (span(l.duration_ms)) " once granted" }
                                } }
                                td { (l.reason) }
                                td {
                                    @if l.state != LeaseState::Ended && (mine || operator) {
                                        form.inline method="post" action={ "/leases/" (l.lease) "/act" } {
                                            input type="hidden" name="csrf" value=(v.csrf);
                                            input type="hidden" name="action" value=(if mine { "release" } else { "force" });
                                            input type="hidden" name="confirm" value="";
                                            input type="hidden" name="back" value="/leases";
                                            button type="submit" data-confirm={ "End lease " (l.lease) "?" } { @if mine { "Release" } @else { "Release (force)" } }
                                        }
                                    }
                                }
                            }
                        }
                    }
                } }
            }
        },
    )
}

fn lease_html(
    v: &Viewer,
    l: &DeviceLease,
    log: Option<(u64, u64, String, bool)>,
    stream: &str,
    said: Option<&str>,
) -> Response {
    let now = crate::protocol::limits::unix_ms_now();
    let mine = l.holder.as_deref() == Some(v.name());
    let operator = v.role() >= Role::Operator;
    let live = l.state != LeaseState::Ended;
    let task = format!("{}.1", l.lease);
    pages::page(
        v,
        &format!("Lease {}", l.lease),
        html! {
            h1 { "Lease " (l.lease) }
            p {
                span class={ "state " (name(&l.state)) } { (name(&l.state)) }
                " · " (l.holder.as_deref().unwrap_or("-")) " · " (l.device.to_string())
                @if let Some(w) = &l.worker { " on " a href={ "/workers/" (w) } { (w) } }
                @if let Some(u) = l.until_ms { @if live { " · until " (when(u)) " (" (crate::text::ago(u.saturating_sub(now))) " left)" } }
                @if let Some(e) = &l.ended { " · ended: " (e) }
                @if !l.reason.is_empty() { " · " (l.reason) }
                @if !l.shared.is_empty() { " · shared with " (l.shared.join(", ")) }
            }
            @if let Some(s) = said { p.notice { "Power " (s) } }
            @if live && (mine || operator) {
                div.actions {
                    @if l.state == LeaseState::Held {
                        @for a in ["on", "off", "cycle", "status"] {
                            form.inline method="post" action={ "/leases/" (l.lease) "/act" } {
                                input type="hidden" name="csrf" value=(v.csrf);
                                input type="hidden" name="action" value=(a);
                                button type="submit" data-confirm=(if a == "status" { "" } else { "Power the device?" }) { "Power " (a) }
                            }
                        }
                    }
                    @if mine {
                        form.inline method="post" action={ "/leases/" (l.lease) "/act" } {
                            input type="hidden" name="csrf" value=(v.csrf);
                            input type="hidden" name="action" value="renew";
                            input name="duration" size="5" value=(span(l.duration_ms));
                            button type="submit" { "Renew" }
                        }
                    }
                    form.inline method="post" action={ "/leases/" (l.lease) "/act" } {
                        input type="hidden" name="csrf" value=(v.csrf);
                        input type="hidden" name="action" value=(if mine { "release" } else { "force" });
                        input type="hidden" name="confirm" value="";
                        button type="submit" data-confirm={ "End lease " (l.lease) "?" } { @if mine { "Release" } @else { "Release (force)" } }
                    }
                }
            }
            h2 { "Console and transcript" }
            @match &log {
                Some((start, end, text, _)) => {
                    div #log .console data-task=(task) data-run=(l.lease) data-start=(start) data-end=(end)
                        data-live=(if live && l.state == LeaseState::Held { "1" } else { "0" }) {
                        (log_lines(text, None))
                    }
                    p { a href={ "/tasks/" (task) "/log" } { "The whole transcript" } }
                }
                None => { p { "No transcript yet (the lease is waiting for its device)." } }
            }
            @if mine && l.state == LeaseState::Held {
                form #console-input method="post" action={ "/leases/" (l.lease) "/input" } data-lease=(l.lease) {
                    input type="hidden" name="csrf" value=(v.csrf);
                    input type="hidden" name="stream" value=(stream);
                    input type="hidden" name="offset" value="0";
                    input name="text" size="50" autocomplete="off" placeholder="a line for the device" maxlength="4000";
                    select name="eol" { option value="lf" { "⏎ LF" } option value="cr" { "⏎ CR" } option value="none" { "no newline" } }
                    button type="submit" { "Send" }
                }
            } @else if live {
                p { "You are watching: only the holder types." }
            }
        },
    )
}
