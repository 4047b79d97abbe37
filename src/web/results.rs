//! The pages of results and usage: a case's history (`/cases`), a
//! series' cases × workers (`/series/NAME`), the utilisation report
//! (`/report`), and the charts of the lab and worker pages — all asked of
//! the scheduler as the signed-in user (its rules apply) and drawn as SVG
//! on the server ([`super::charts`]).

use super::charts;
use super::pages::{page, when};
use super::sessions::Viewer;
use super::{Dashboard, Failure};
use crate::protocol::results::{CaseHistory, Report, SeriesMatrix, UsageLine};
use crate::protocol::Body;
use crate::web::extract::{ask_for, check_id, page_error, Page, D};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use maud::{html, Markup};
use serde::Deserialize;
use std::net::SocketAddr;

const DAY_MS: u64 = 24 * 3600 * 1000;

fn now_ms() -> u64 {
    crate::protocol::limits::unix_ms_now()
}

#[derive(Deserialize)]
pub(super) struct CaseQuery {
    name: String,
    #[serde(default)]
    series: Option<String>,
    #[serde(default)]
    group: Option<String>,
}

/// Empty text in a form field means "not given".
fn given(v: &Option<String>) -> Option<String> {
    v.clone().filter(|s| !s.trim().is_empty())
}

fn bad(message: String) -> Failure {
    Failure::new(StatusCode::BAD_REQUEST, message)
}

async fn case_history(
    d: &Dashboard,
    v: &Viewer,
    peer: SocketAddr,
    q: &CaseQuery,
) -> Result<CaseHistory, Failure> {
    if q.name.is_empty() || q.name.len() > crate::protocol::limits::MAX_CASE_NAME_BYTES {
        return Err(bad("a case name is 1–512 bytes".into()));
    }
    let (series, group) = (given(&q.series), given(&q.group));
    for id in series.iter().chain(&group) {
        check_id("a series or device group", id)?;
    }
    let body = Body::GetCaseHistory {
        request: 0,
        case: q.name.clone(),
        series,
        devicegroup: group,
        limit: 200,
    };
    ask_for(d, v, peer, body, |b, _| match b {
        Body::CaseHistory { history, .. } => Ok(history),
        other => Err(other.kind()),
    })
    .await
}

/// `/cases?name=…`: a case's status per testrun, per worker, over time.
pub(super) async fn case_page(
    State(d): D,
    Page(v, peer): Page,
    Query(q): Query<CaseQuery>,
) -> Response {
    let h = match case_history(&d, &v, peer, &q).await {
        Ok(h) => h,
        Err(e) => return page_error(&v, e),
    };
    page(
        &v,
        &h.case,
        html! {
            h1 { "Case " code { (h.case) } }
            p {
                "Last passed: " (link_run(h.last_passed.as_deref()))
                "; first failed since: " (link_run(h.first_failed.as_deref()))
                @if let Some(s) = given(&q.series) { " — series " a href={ "/series/" (s) } { (s) } }
            }
            figure #case-chart { (charts::case_history(&h.runs)) }
            table #case-runs {
                thead { tr { th { "testrun" } th { "status" } th { "worker" } th { "group" } th { "image" } th { "duration" } th { "message" } } }
                tbody { @for r in &h.runs {
                    tr {
                        td { a href={ "/runs/" (r.run) } { (r.run) } " " (r.task) }
                        td class={ "case " (r.status.as_str()) } { (r.status.as_str()) }
                        td { @if let Some(w) = &r.worker { a href={ "/workers/" (w) } { (w) } } }
                        td { (r.devicegroup.as_deref().unwrap_or("")) }
                        td { (r.image.as_deref().unwrap_or("")) }
                        td.num { @if let Some(ms) = r.duration_ms { (format!("{:.3} s", ms as f64 / 1000.0)) } }
                        td { (r.message.as_deref().unwrap_or("")) }
                    }
                } }
            }
        },
    )
}

fn link_run(run: Option<&str>) -> Markup {
    html! { @match run { Some(r) => a href={ "/runs/" (r) } { (r) }, None => "—" } }
}

/// `/series/NAME`: the cases that failed lately, per worker.
pub(super) async fn series_page(
    State(d): D,
    Page(v, peer): Page,
    Path(series): Path<String>,
) -> Response {
    let m = match matrix(&d, &v, peer, &series).await {
        Ok(m) => m,
        Err(e) => return page_error(&v, e),
    };
    page(
        &v,
        &series,
        html! {
            h1 { "Series " (m.series) }
            p { "Cases that failed in its last " (m.runs.len()) " finished testruns, per worker: the redder, the more often it failed there." }
            @if m.cases.is_empty() {
                p { "No case failed in them." }
            } @else {
                figure #series-matrix { (charts::matrix(&m)) }
                ul { @for c in &m.cases {
                    li { a href={ "/cases?name=" (super::pages::url_escape(&c.name)) "&series=" (m.series) } { (c.name) } }
                } }
            }
        },
    )
}

async fn matrix(
    d: &Dashboard,
    v: &Viewer,
    peer: SocketAddr,
    series: &str,
) -> Result<SeriesMatrix, Failure> {
    check_id("a series", series)?;
    let body = Body::GetSeriesMatrix {
        request: 0,
        series: series.to_string(),
        runs: 50,
    };
    ask_for(d, v, peer, body, |b, _| match b {
        Body::SeriesMatrix { matrix, .. } => Ok(matrix),
        other => Err(other.kind()),
    })
    .await
}

#[derive(Deserialize, Default)]
pub(super) struct ReportQuery {
    #[serde(default)]
    days: Option<u64>,
    #[serde(default)]
    group: Option<String>,
}

async fn report(
    d: &Dashboard,
    v: &Viewer,
    peer: SocketAddr,
    days: u64,
    group: Option<String>,
) -> Result<Report, Failure> {
    if let Some(g) = &group {
        check_id("a device group", g)?;
    }
    let body = Body::GetReport {
        request: 0,
        since_ms: now_ms().saturating_sub(days.saturating_mul(DAY_MS)),
        devicegroup: group,
    };
    ask_for(d, v, peer, body, |b, _| match b {
        Body::Report { report, .. } => Ok(report),
        other => Err(other.kind()),
    })
    .await
}

fn hours(ms: u64) -> String {
    format!("{:.1}", ms as f64 / 3_600_000.0)
}

fn usage_row(label: Markup, l: &UsageLine) -> Markup {
    let total = l.time.total_ms();
    let used = if total == 0 {
        "–".to_string()
    } else {
        format!("{:.0}%", l.time.used_ms() as f64 * 100.0 / total as f64)
    };
    html! {
        tr {
            td { (label) }
            td.num { (used) }
            @let t = &l.time;
            td.num { (hours(t.busy_ms)) } td.num { (hours(t.idle_ms)) } td.num { (hours(t.leased_ms)) }
            td.num { (hours(t.broken_ms)) } td.num { (hours(t.offline_ms)) }
            td.num { (t.tasks) } td.num { (t.passed) } td.num { (t.failed) } td.num { (t.infra_errors) }
        }
    }
}

/// `/report?days=30&group=G`: what the devices did.
pub(super) async fn report_page(
    State(d): D,
    Page(v, peer): Page,
    Query(q): Query<ReportQuery>,
) -> Response {
    let days = q
        .days
        .unwrap_or(30)
        .clamp(1, crate::protocol::results::MAX_REPORT_DAYS);
    let r = match report(&d, &v, peer, days, given(&q.group)).await {
        Ok(r) => r,
        Err(e) => return page_error(&v, e),
    };
    let head = html! { tr {
        th { "" } th { "used" } th { "busy h" } th { "idle h" } th { "leased h" } th { "broken h" } th { "offline h" }
        th { "task attempts" } th { "passed" } th { "failed" } th { "infra errors" }
    } };
    page(
        &v,
        "Report",
        html! {
            h1 { "Usage since " (when(r.since_ms)) }
            form.inline method="get" action="/report" {
                label { "days " input type="number" name="days" min="1" max="400" value=(days); }
                " "
                label { "group " input type="text" name="group" value=(q.group.as_deref().unwrap_or("")); }
                " " button type="submit" { "Show" }
            }
            h2 { "Device groups and devices" }
            table #report-devices {
                thead { (head) }
                tbody {
                    @for g in &r.groups {
                        (usage_row(html! { strong { (g.name) } }, g))
                        @for dv in r.devices.iter().filter(|x| x.devicegroup == g.name) {
                            (usage_row(html! { "\u{a0}\u{a0}" a href={ "/workers/" (dv.name) } { (dv.name) } }, dv))
                        }
                    }
                }
            }
            h2 { "Device hours per owner" }
            table #report-owners {
                thead { tr { th { "owner" } th { "group" } th { "device hours" } th { "testruns h" } th { "leased h" } } }
                tbody { @for o in &r.owners {
                    tr { td { (o.owner) } td { (o.devicegroup) } td.num { (hours(o.busy_ms + o.leased_ms)) }
                         td.num { (hours(o.busy_ms)) } td.num { (hours(o.leased_ms)) } }
                } }
            }
        },
    )
}

/// The lab page's charts: per device group, utilisation, queue and
/// the longest wait over the last 24 hours and 7 days.
pub(super) async fn lab_charts(d: &Dashboard, v: &Viewer, peer: SocketAddr) -> Markup {
    let mut parts = Vec::new();
    for (label, span, step) in [("24 h", DAY_MS, 5 * 60_000), ("7 d", 7 * DAY_MS, 3_600_000)] {
        let body = Body::GetLabSeries {
            request: 0,
            since_ms: now_ms().saturating_sub(span),
            step_ms: step,
            devicegroup: None,
        };
        let points = ask_for(d, v, peer, body, |b, _| match b {
            Body::LabSeries { points, .. } => Ok(points),
            other => Err(other.kind()),
        })
        .await;
        parts.push((label, points));
    }
    html! {
        h2 { "Over time " a href="/report" { "(report)" } }
        @for (label, points) in &parts {
            @match points {
                Err(e) => p.error { (label) ": " (e.message) },
                Ok(points) => {
                    @let groups: std::collections::BTreeSet<&str> = points.iter().map(|p| p.devicegroup.as_str()).collect();
                    @if groups.is_empty() { p { (label) ": no usage recorded yet." } }
                    @for g in groups {
                        @let mine: Vec<_> = points.iter().filter(|p| p.devicegroup == g).collect();
                        @let used: Vec<(u64, Vec<f64>)> = mine.iter().map(|p| (p.at_ms, vec![
                            if p.workers > 0.0 { (p.busy + p.leased) * 100.0 / p.workers } else { 0.0 },
                            if p.workers > 0.0 { p.broken * 100.0 / p.workers } else { 0.0 },
                        ])).collect();
                        @let queue: Vec<(u64, Vec<f64>)> = mine.iter().map(|p| (p.at_ms, vec![p.queued, p.wait_max_ms as f64 / 60_000.0])).collect();
                        div.charts data-group=(g) {
                            (charts::lines(&format!("{g}: utilisation, {label}"), &["busy or leased", "broken"], &used, Some(100.0), "%"))
                            (charts::lines(&format!("{g}: queue, {label}"), &["tasks queued", "longest wait (min)"], &queue, None, ""))
                        }
                    }
                }
            }
        }
    }
}

/// A worker page's chart: its busy share, pass rate and infrastructure
/// errors per hour over the last 7 days.
pub(super) async fn worker_chart(
    d: &Dashboard,
    v: &Viewer,
    peer: SocketAddr,
    worker: &str,
) -> Markup {
    let body = Body::GetWorkerSeries {
        request: 0,
        worker: worker.to_string(),
        since_ms: now_ms().saturating_sub(7 * DAY_MS),
    };
    let hours = ask_for(d, v, peer, body, |b, _| match b {
        Body::WorkerSeries { hours, .. } => Ok(hours),
        other => Err(other.kind()),
    })
    .await;
    match hours {
        Err(e) => html! { p.error { (e.message) } },
        Ok(hours) => {
            let share: Vec<(u64, Vec<f64>)> = hours
                .iter()
                .map(|h| {
                    let total = h.time.total_ms().max(1) as f64;
                    let rate = if h.time.passed + h.time.failed > 0 {
                        h.time.passed as f64 * 100.0 / (h.time.passed + h.time.failed) as f64
                    } else {
                        0.0
                    };
                    (
                        h.hour_ms,
                        vec![h.time.used_ms() as f64 * 100.0 / total, rate],
                    )
                })
                .collect();
            let errors: Vec<(u64, Vec<f64>)> = hours
                .iter()
                .map(|h| {
                    (
                        h.hour_ms,
                        vec![h.time.infra_errors as f64, h.time.tasks as f64],
                    )
                })
                .collect();
            html! {
                h2 { "Last 7 days" }
                div.charts #worker-charts {
                    (charts::lines("busy and pass rate per hour", &["busy %", "passed %"], &share, Some(100.0), "%"))
                    (charts::lines("task attempts and infrastructure errors per hour", &["infrastructure errors", "task attempts"], &errors, None, ""))
                }
            }
        }
    }
}
