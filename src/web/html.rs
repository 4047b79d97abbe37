//! The HTML pages: the lab, the queue, testruns, a run, a task's log, a
//! worker, the audit log; and the forms that act (cancel, drain).

use super::pages::{self, RunsQuery};
use super::sessions::Viewer;
use super::{Dashboard, Failure};
use crate::protocol::{Body, RunStatus};
use crate::web::asks::{
    audit_read, health, list_runs, owner_of, queues, run_notifications, status, workers,
    AuditQuery, AUDIT_SEARCH, AUDIT_SHOWN,
};
use crate::web::extract::{ask_for, check_id, page_error, Page, D};
use crate::web::signin::{forbidden_csrf, CsrfForm};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use serde::Deserialize;
use std::net::SocketAddr;

#[derive(Deserialize, Default)]
pub(super) struct Fragment {
    #[serde(default)]
    pub(super) fragment: Option<u8>,
}

pub(super) async fn lab_page(
    State(d): D,
    Page(v, peer): Page,
    Query(f): Query<Fragment>,
) -> Response {
    let charts = match f.fragment {
        Some(_) => None,
        None => Some(super::results::lab_charts(&d, &v, peer).await),
    };
    match workers(&d, &v, peer).await {
        Ok(w) => pages::lab(&v, &w, charts),
        Err(e) => page_error(&v, e),
    }
}

pub(super) async fn queue_page(
    State(d): D,
    Page(v, peer): Page,
    Query(f): Query<Fragment>,
) -> Response {
    match queues(&d, &v, peer).await {
        Ok(q) => pages::queue(&v, &q, f.fragment.is_some()),
        Err(e) => page_error(&v, e),
    }
}

pub(super) async fn runs_page(
    State(d): D,
    Page(v, peer): Page,
    Query(q): Query<RunsQuery>,
) -> Response {
    match list_runs(&d, &v, peer, &q).await {
        Ok((runs, older)) => pages::runs(&v, &q, &runs, older),
        Err(e) => page_error(&v, e),
    }
}

pub(super) async fn run_page(
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

pub(super) async fn worker_page(
    State(d): D,
    Page(v, peer): Page,
    Path(name): Path<String>,
) -> Response {
    match health(&d, &v, peer, &name).await {
        Ok((w, history, recent)) => {
            let chart = super::results::worker_chart(&d, &v, peer, &name).await;
            pages::worker(&v, &w, &history, &recent, chart)
        }
        Err(e) => page_error(&v, e),
    }
}

pub(super) async fn audit_page(
    State(d): D,
    Page(v, peer): Page,
    Query(q): Query<AuditQuery>,
) -> Response {
    match audit_entries(&d, &v, peer, &q).await {
        Ok(view) => pages::audit(&v, &view),
        Err(e) => page_error(&v, e),
    }
}

fn filters(q: &AuditQuery) -> pages::AuditFilters {
    pages::AuditFilters {
        event: q.event.clone(),
        identity: q.identity.clone(),
        q: q.q.clone(),
    }
}

/// The audit entries a page shows: oldest first from `offset`, or
/// newest first before `before` — reading further back (up to
/// `AUDIT_SEARCH` bytes) while filters leave the page short.
async fn audit_entries(
    d: &Dashboard,
    v: &crate::web::sessions::Viewer,
    peer: SocketAddr,
    q: &AuditQuery,
) -> Result<pages::AuditView, Failure> {
    let keep = |e: &serde_json::Value| {
        let field = |k: &str| e.get(k).and_then(|x| x.as_str()).unwrap_or("");
        q.event
            .as_deref()
            .filter(|f| !f.is_empty())
            .is_none_or(|f| field("event") == f)
            && q.identity
                .as_deref()
                .filter(|f| !f.is_empty())
                .is_none_or(|f| field("identity").contains(f))
            && q.q
                .as_deref()
                .filter(|f| !f.is_empty())
                .is_none_or(|f| e.to_string().contains(f))
    };
    let parse = |text: &str| -> Vec<serde_json::Value> {
        text.lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    if let Some(offset) = q.offset {
        let (text, _, end, eof) = audit_read(d, v, peer, offset, None).await?;
        let entries = parse(&text)
            .into_iter()
            .filter(|e| keep(e))
            .take(AUDIT_SHOWN)
            .collect();
        return Ok(pages::AuditView {
            entries,
            older: None,
            newer: (!eof).then_some(end),
            from: offset,
            oldest_first: true,
            filters: filters(q),
        });
    }
    let mut before = q.before.unwrap_or(crate::protocol::limits::MAX_READ_OFFSET);
    let mut entries = Vec::new();
    let mut read = 0u64;
    let mut start;
    loop {
        let (text, s, end, _) = audit_read(d, v, peer, 0, Some(before)).await?;
        start = s;
        read += end - s;
        entries.extend(parse(&text).into_iter().rev().filter(|e| keep(e)));
        if s == 0 || entries.len() >= AUDIT_SHOWN || read >= AUDIT_SEARCH || end == s {
            break;
        }
        before = s;
    }
    entries.truncate(AUDIT_SHOWN);
    Ok(pages::AuditView {
        entries,
        older: (start > 0).then_some(start),
        newer: None,
        from: start,
        oldest_first: false,
        filters: filters(q),
    })
}

pub(super) async fn cancel_form(
    State(d): D,
    Page(v, peer): Page,
    Path(run): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Response {
    if !d.csrf_ok(&v, f.csrf.as_deref()) {
        return forbidden_csrf(&v);
    }
    let back = f.back_or(&format!("/runs/{run}"));
    if !f.confirmed() {
        return pages::confirm(
            &v,
            &format!("Cancel testrun {run}?"),
            &format!("/runs/{run}/cancel"),
            &[],
            "Yes, cancel it (running tasks are stopped)",
            &back,
        );
    }
    match cancel(&d, &v, peer, &run).await {
        Ok(_) => Redirect::to(&back).into_response(),
        Err(e) => page_error(&v, e),
    }
}

pub(super) async fn drain_form(
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
    let back = f.back_or(&format!("/workers/{name}"));
    if on && !f.confirmed() {
        return pages::confirm(
            &v,
            &format!("Drain worker {name}?"),
            &format!("/workers/{name}/drain"),
            &[("drain", "on")],
            "Yes, drain it (it takes no new task until undrained)",
            &back,
        );
    }
    match drain(&d, &v, peer, &name, on).await {
        Ok(_) => Redirect::to(&back).into_response(),
        Err(e) => page_error(&v, e),
    }
}

pub(super) async fn cancel(
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

pub(super) async fn drain(
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

pub(super) fn drain_value(s: Option<&str>) -> Result<bool, Failure> {
    match s {
        Some("on") | Some("true") => Ok(true),
        Some("off") | Some("false") => Ok(false),
        _ => Err(Failure::new(
            StatusCode::BAD_REQUEST,
            "drain must be on or off",
        )),
    }
}
