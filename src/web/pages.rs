//! The pages, rendered on the server (maud): readable without
//! JavaScript; `/static/ots.js` adds live updates where an element asks
//! for them with `data-*` attributes. Everything a peer sent (names,
//! reasons, log text) is escaped by the template, and control characters
//! in log lines are shown as `\xNN`.

use super::facts::{devices, now_ms, run_times, run_took, stamp};
use super::sessions::Viewer;
use crate::protocol::{
    HealthChange, QueueInfo, RecentTask, RunStatus, RunSummary, TaskStatus, WorkerInfo,
};
use crate::security::Role;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::{html, Markup, DOCTYPE};
use std::collections::BTreeMap;

/// The lowercase wire name of an enum value (`busy`, `pass`…).
pub fn name<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => "?".into(),
    }
}

fn opt_name<T: serde::Serialize>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "—".to_string(), name)
}

pub use crate::text::ago;

/// A Unix ms time as `YYYY-MM-DD HH:MM:SS.mmm UTC` (`—` if unknown).
pub fn when(ms: u64) -> String {
    if ms == 0 {
        return "—".into();
    }
    format!("{} UTC", crate::clock::human(ms))
}

/// Bytes as `512 B`, `3.2 KiB`, `1.0 GiB`.
pub fn size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Shows control characters (other than tab) as `\xNN` or `\u{N}`, as
/// `ots-submit logs` does.
pub fn visible(text: &str) -> std::borrow::Cow<'_, str> {
    crate::text::escape_controls(text)
}

/// A result file worth reading in the browser (shown as plain text).
fn text_file(name: &str) -> bool {
    let ext = name
        .rsplit_once('.')
        .map_or("", |(_, e)| e)
        .to_ascii_lowercase();
    matches!(
        ext.as_str(),
        "txt" | "log" | "xml" | "json" | "csv" | "out" | "yaml" | "yml" | "md" | "html" | "tap"
    )
}

/// The class of a stored log line by its stream prefix.
pub(super) fn line_class(line: &str) -> &'static str {
    if line.starts_with("[serial] ") {
        "l serial"
    } else if line.starts_with("[stderr] ") {
        "l stderr"
    } else if line.starts_with("[ots-worker] ") {
        "l worker"
    } else {
        "l"
    }
}

/// Lines of stored log text, each a `div` (serial console lines marked).
pub fn log_lines(text: &str, filter: Option<&str>) -> Markup {
    html! {
        @for line in text.split_terminator('\n') {
            @if filter.is_none_or(|f| line.contains(f)) {
                div class=(line_class(line)) { (visible(line)) }
            }
        }
    }
}

fn layout(viewer: Option<&Viewer>, title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " — ots" }
                link rel="stylesheet" href="/static/ots.css";
                link rel="icon" type="image/svg+xml" href="/favicon.svg";
                script src="/static/ots.js" defer {}
            }
            body {
                header {
                    nav {
                        a.brand href="/" { "ots" }
                        @if let Some(v) = viewer {
                            a href="/" { "Lab" }
                            a href="/queue" { "Queue" }
                            a href="/runs" { "Runs" }
                            a href="/leases" { "Leases" }
                            a href="/report" { "Report" }
                            @if v.role() >= Role::Admin {
                                a href="/audit" { "Audit" }
                            }
                            span.who { (v.name()) " (" (v.role().as_str()) ")" }
                            form.inline method="post" action="/logout" {
                                input type="hidden" name="csrf" value=(v.csrf);
                                button type="submit" { "Sign out" }
                            }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

pub(super) fn page(viewer: &Viewer, title: &str, body: Markup) -> Response {
    layout(Some(viewer), title, body).into_response()
}

/// The dashboard's icon: a green square with a tick (SVG, no script).
pub const FAVICON: &str = "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 16 16\"><rect width=\"16\" height=\"16\" rx=\"3\" fill=\"#1a7f37\"/><path d=\"M4 8.5l2.5 2.5L12 5.5\" stroke=\"#fff\" stroke-width=\"2\" fill=\"none\"/></svg>";

/// A path the dashboard does not serve: said, with the way back (the
/// navigation leads to sign-in for an anonymous visitor; no data here).
pub fn not_found() -> Response {
    let body = html! {
        h1 { "Not found" }
        p { "The dashboard has no such page. Go to:" }
        nav.lognav {
            a href="/" { "Lab" } a href="/queue" { "Queue" } a href="/runs" { "Runs" }
            a href="/leases" { "Leases" } a href="/report" { "Report" }
        }
    };
    (
        StatusCode::NOT_FOUND,
        layout(None, "Not found", body).into_response(),
    )
        .into_response()
}

/// What anonymous visitors get: how to sign in, no data.
pub fn sign_in(message: Option<&str>) -> Response {
    let body = html! {
        h1 { "Sign in" }
        @if let Some(m) = message { p.error { (m) } }
        p { "The dashboard signs you in with your ots key, not a password. On a machine with your key, run:" }
        pre { "ots-submit web" }
        p { "and open the link it prints (it works once, within 60 seconds)." }
    };
    (
        StatusCode::UNAUTHORIZED,
        layout(None, "Sign in", body).into_response(),
    )
        .into_response()
}

/// The page a sign-in link shows when it would not be followed at once:
/// opened from another site, or in a browser signed in as someone else.
/// It names the user the link signs in as; only its button (a same-site
/// POST) signs in.
pub fn confirm_sign_in(as_who: &str, current: Option<&str>, token: &str) -> Response {
    let body = html! {
        h1 { "Sign in as " (as_who) "?" }
        @if let Some(c) = current {
            p.error { "This browser is signed in as " (c) ". The link you opened signs it in as " (as_who) " instead." }
        } @else {
            p { "You opened a sign-in link from another site. It signs this browser in as " strong { (as_who) } "." }
        }
        p { "Continue only if you ran " code { "ots-submit web" } " yourself as " (as_who) " and opened the link it printed." }
        form method="post" action="/login" {
            input type="hidden" name="token" value=(token);
            button type="submit" { "Sign in as " (as_who) }
        }
        p { a href="/" { "Cancel" } }
    };
    let mut r = (
        StatusCode::OK,
        layout(None, "Sign in", body).into_response(),
    )
        .into_response();
    r.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-store"),
    );
    r
}

/// An error page for a signed-in viewer.
pub fn error(viewer: &Viewer, status: StatusCode, message: &str) -> Response {
    let body = html! {
        h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or("")) }
        p.error { (message) }
    };
    (status, page(viewer, "Error", body)).into_response()
}

fn csrf_field(v: &Viewer) -> Markup {
    html! { input type="hidden" name="csrf" value=(v.csrf); }
}

fn drain_form(v: &Viewer, w: &WorkerInfo, back: &str) -> Markup {
    html! {
        @if v.role() >= Role::Operator {
            form.inline method="post" action={ "/workers/" (w.name) "/drain" } {
                (csrf_field(v))
                input type="hidden" name="back" value=(back);
                input type="hidden" name="drain" value=(if w.drained { "off" } else { "on" });
                @if w.drained {
                    input type="hidden" name="confirm" value="yes";
                    button type="submit" { "Undrain" }
                } @else {
                    input type="hidden" name="confirm" value="";
                    button type="submit" data-confirm={ "Drain " (w.name) "? It takes no new task until undrained." } { "Drain" }
                }
            }
        }
    }
}

/// The second step of an action that ends or stops something, for a
/// browser without JavaScript (with it, a dialog asked already): the
/// same form again with `confirm=yes`, and the way back.
pub fn confirm(
    v: &Viewer,
    question: &str,
    action: &str,
    fields: &[(&str, &str)],
    yes: &str,
    back: &str,
) -> Response {
    let body = html! {
        h1 { (question) }
        form method="post" action=(action) {
            (csrf_field(v))
            @for (k, val) in fields { input type="hidden" name=(k) value=(val); }
            input type="hidden" name="back" value=(back);
            input type="hidden" name="confirm" value="yes";
            div.actions {
                button.danger type="submit" { (yes) }
                a href=(back) { "No, go back" }
            }
        }
    };
    page(v, question, body)
}

/// The lab: every worker, and counts per device group.
/// The lab; `charts` (the full page, not the refreshed part): its
/// groups over time.
pub fn lab(v: &Viewer, workers: &[WorkerInfo], charts: Option<Markup>) -> Response {
    let mut groups: BTreeMap<&str, BTreeMap<String, u64>> = BTreeMap::new();
    for w in workers {
        let g = groups.entry(w.device.devicegroup.as_str()).or_default();
        *g.entry("workers".into()).or_default() += 1;
        *g.entry(name(&w.state)).or_default() += 1;
        *g.entry(w.health.as_str().to_string()).or_default() += 1;
    }
    let columns = [
        "workers",
        "idle",
        "busy",
        "lost",
        "stopped",
        "good",
        "suspect",
        "bad",
        "maintenance",
    ];
    let content = html! {
        h2 { "Device groups" }
        table #groups {
            thead { tr { th { "group" } @for c in columns { th { (c) } } } }
            tbody {
                @for (g, counts) in &groups {
                    tr { td { (g) } @for c in columns { td.num { (counts.get(c).copied().unwrap_or(0)) } } }
                }
            }
        }
        h2 { "Workers (" (workers.len()) ")" }
        table.cards #workers {
            thead { tr {
                th { "worker" } th { "state" } th { "health" } th { "device" } th { "task" }
                th { "last heard" } th { "console" } th { "drained" } th {}
            } }
            tbody {
                @for w in workers {
                    tr data-worker=(w.name) {
                        td { a href={ "/workers/" (w.name) } { (w.name) } }
                        td class={ "state " (name(&w.state)) } { (name(&w.state)) }
                        td class={ "health " (w.health.as_str()) } title=(w.health_reason) { (w.health.as_str()) }
                        td { (w.device) }
                        td { @if let Some(t) = &w.task { a href={ "/tasks/" (t) "/log" } { (t) } } @else { "—" } }
                        td { (ago(w.last_heard_ms_ago)) " ago" }
                        td { (w.console.as_deref().unwrap_or("—")) }
                        td { (if w.drained { "yes" } else { "no" }) }
                        td { (drain_form(v, w, "/")) }
                    }
                }
            }
        }
    };
    let Some(charts) = charts else {
        return content.into_response();
    };
    page(
        v,
        "Lab",
        html! {
            h1 { "Lab" }
            div data-refresh="/?fragment=1" data-every="3000" { (content) }
            (charts)
        },
    )
}

/// The queues and why their tasks wait.
pub fn queue(v: &Viewer, queues: &[QueueInfo], fragment: bool) -> Response {
    let content = html! {
        @if queues.is_empty() { p { "Nothing is waiting." } }
        @for q in queues {
            section.queue {
                h2 { (q.key) " — " (q.length) " waiting" }
                p.workers {
                    "Workers that could take them (" (q.workers_total) "): "
                    @for w in &q.workers { span.worker { a href={ "/workers/" (w.name) } { (w.name) } ": " (w.doing) } " " }
                }
                table.cards {
                    thead { tr { th { "#" } th { "task" } th { "testrun" } th { "owner" } th { "age" } th { "ahead (own / others)" } th { "waits for" } } }
                    tbody {
                        @for t in &q.tasks {
                            tr {
                                td.num { (t.position) }
                                td { (t.task) }
                                td { a href={ "/runs/" (t.run) } { (t.run) } }
                                td { (t.owner.as_deref().unwrap_or("—")) }
                                td { (ago(t.age_ms)) }
                                td { (t.ahead_own) " / " (t.ahead_others) }
                                td { @if let Some(f) = &t.forecast { (crate::text::forecast(f)) } @else { "—" } }
                            }
                        }
                    }
                }
            }
        }
    };
    if fragment {
        return content.into_response();
    }
    page(
        v,
        "Queue",
        html! {
            h1 { "Queue" }
            div data-refresh="/queue?fragment=1" data-every="3000" { (content) }
        },
    )
}

/// The filters of the runs page, as given.
#[derive(Default, serde::Deserialize, serde::Serialize)]
pub struct RunsQuery {
    #[serde(default)]
    pub owner: Option<String>,
    #[serde(default)]
    pub state: Option<String>,
    #[serde(default)]
    pub verdict: Option<String>,
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub before: Option<u64>,
}

/// Testruns, newest first, filtered and paginated.
pub fn runs(v: &Viewer, q: &RunsQuery, runs: &[RunSummary], older: Option<u64>) -> Response {
    let sel = |field: &Option<String>, value: &str| field.as_deref() == Some(value);
    let next = older.map(|before| {
        let mut q2 = serde_urlencoded_pairs(q);
        q2.push(("before".into(), before.to_string()));
        let query: Vec<String> = q2
            .iter()
            .map(|(k, v)| format!("{k}={}", url_escape(v)))
            .collect();
        format!("/runs?{}", query.join("&"))
    });
    page(
        v,
        "Runs",
        html! {
            h1 { "Runs" }
            form.filters method="get" action="/runs" {
                label { "owner " input name="owner" value=(q.owner.as_deref().unwrap_or("")) size="12"; }
                label { "state "
                    select name="state" {
                        option value="" { "any" }
                        @for s in ["queued", "running", "finished", "cancelled"] {
                            option value=(s) selected[sel(&q.state, s)] { (s) }
                        }
                    }
                }
                label { "verdict "
                    select name="verdict" {
                        option value="" { "any" }
                        @for s in ["pass", "fail", "error"] {
                            option value=(s) selected[sel(&q.verdict, s)] { (s) }
                        }
                    }
                }
                label { "device group " input name="group" value=(q.group.as_deref().unwrap_or("")) size="12"; }
                button type="submit" { "Filter" }
            }
            table.cards #runs {
                thead { tr { th { "testrun" } th { "state" } th { "verdict" } th { "owner" } th { "device" } th { "tasks" } th { "submitted" } th { "ended" } th { "took" } } }
                tbody {
                    @for r in runs {
                        tr {
                            td { a href={ "/runs/" (r.run) } { (r.run) } }
                            td class={ "state " (name(&r.state)) } { (name(&r.state)) }
                            td class={ "verdict " (opt_name(&r.verdict)) } { (opt_name(&r.verdict)) }
                            td { (r.owner.as_deref().unwrap_or("—")) }
                            td { (r.device) }
                            td.num { (r.tasks) }
                            td { (stamp(r.submitted_ms)) }
                            td { (stamp(r.ended_ms.unwrap_or(0))) }
                            td.num { (run_took(r)) }
                        }
                    }
                }
            }
            @if runs.is_empty() { p { "No testruns match." } }
            @if let Some(n) = next { p { a.next href=(n) { "Older testruns →" } } }
        },
    )
}

fn serde_urlencoded_pairs(q: &RunsQuery) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (k, v) in [
        ("owner", &q.owner),
        ("state", &q.state),
        ("verdict", &q.verdict),
        ("group", &q.group),
    ] {
        if let Some(v) = v.as_deref().filter(|v| !v.is_empty()) {
            out.push((k.to_string(), v.to_string()));
        }
    }
    out
}

/// Percent-encodes everything but unreserved characters.
pub fn url_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A result file's download path (each path segment escaped).
pub fn file_href(task: &str, file: &str) -> String {
    let segments: Vec<String> = file.split('/').map(url_escape).collect();
    format!("/tasks/{task}/files/{}", segments.join("/"))
}

fn task_row(t: &TaskStatus) -> Markup {
    let lost = t
        .log_gaps
        .iter()
        .map(|(a, b)| b.saturating_sub(*a).saturating_add(1))
        .fold(0u64, u64::saturating_add);
    html! {
        tr data-task=(t.task) {
            td { a href={ "/tasks/" (t.task) "/log" } { (t.task) } }
            td { (t.packages.join(", ")) }
            td class={ "state " (name(&t.state)) } { (name(&t.state)) }
            td { @if let Some(w) = &t.worker { a href={ "/workers/" (w) } { (w) } } @else { "—" } }
            td.num { (t.attempts) }
            td class={ "verdict " (opt_name(&t.verdict)) } { (opt_name(&t.verdict)) }
            td { (t.reason.as_deref().unwrap_or(""))
                @if !t.failing.is_empty() {
                    ul.failing { @for c in &t.failing {
                        li { span class={ "case " (c.status.as_str()) } { (c.status.as_str()) } " "
                            a href={ "/cases?name=" (url_escape(&c.name)) } { code { (c.name) } }
                            @if let Some(o) = c.log_offset { " " a.log href={ "/tasks/" (t.task) "/log?after=" (o) } { "log" } }
                            @if let Some(m) = &c.message { " — " (m) } }
                    } }
                }
            }
            td.num { (super::facts::task_took(t)) }
            td.num { (t.log_lines_stored) " stored"
                @if let Some(p) = t.log_lines_produced { " of " (p) }
                @if lost > 0 { ", " span.lost { (lost) " lost" } } }
        }
        @if !t.files.is_empty() || !t.history.is_empty() || t.waiting.is_some() {
            tr.details { td colspan="9" {
                @if let Some(w) = &t.waiting {
                    p.waiting { "Waiting under " (w.key) ": position " (w.position) ", "
                        (w.ahead_own) " of its owner's and " (w.ahead_others) " of others ahead"
                        @if let Some(f) = &w.forecast { "; " (crate::text::forecast(f)) } "." }
                }
                @if !t.files.is_empty() {
                    table.files.cards {
                        thead { tr { th { "result file" } th { "size" } th { "SHA-256" } } }
                        tbody { @for f in &t.files {
                            tr {
                                td { a.download href=(file_href(&t.task, &f.name)) download { (f.name) }
                                     @if text_file(&f.name) { " " a.view href={ (file_href(&t.task, &f.name)) "?view=1" } { "view" } } }
                                td.num { (size(f.size)) }
                                td.hash { code { (f.sha256) } }
                            }
                        } }
                    }
                }
                @if !t.history.is_empty() {
                    details { summary { "History (" (t.history.len()) ")" }
                        table.history {
                            thead { tr { th { "at" } th { "state" } th { "attempt" } th { "worker" } th { "reason" } } }
                            tbody { @for h in &t.history {
                                tr { td { (when(h.at_ms)) } td { (name(&h.state)) } td.num { (h.attempt) }
                                     td { (h.worker.as_deref().unwrap_or("—")) } td { (h.reason.as_deref().unwrap_or("")) } }
                            } }
                        }
                    }
                }
            } }
        }
    }
}

/// The part of the run page that live updates replace (the cancel
/// button goes with it once the testrun ended).
pub fn run_tasks(v: &Viewer, s: &RunStatus, owner: Option<&str>) -> Markup {
    let open = matches!(
        s.state,
        crate::protocol::RunState::Queued | crate::protocol::RunState::Running
    );
    let may_cancel = open && (v.role() >= Role::Operator || owner == Some(v.name()));
    html! {
        @if may_cancel {
            form.inline method="post" action={ "/runs/" (s.run) "/cancel" } {
                (csrf_field(v))
                input type="hidden" name="confirm" value="";
                button.danger type="submit" data-confirm={ "Cancel testrun " (s.run) "? Its running tasks are stopped." } { "Cancel testrun" }
            }
        }
        p #summary {
            "State " span #run-state class={ "state " (name(&s.state)) } { (name(&s.state)) }
            ", verdict " span #run-verdict class={ "verdict " (opt_name(&s.verdict)) } { (opt_name(&s.verdict)) }
            @if let Some(p) = &s.pruned { " — logs and files pruned " (when(p.at_ms)) ": " (p.reason) }
        }
        table.cards #tasks {
            thead { tr { th { "task" } th { "packages" } th { "state" } th { "worker" } th { "attempts" } th { "verdict" } th { "reason" } th { "took" } th { "log lines" } } }
            tbody { @for t in &s.tasks { (task_row(t)) } }
        }
    }
}

/// One testrun.
pub fn run(
    v: &Viewer,
    s: &RunStatus,
    owner: Option<&str>,
    deliveries: &[crate::protocol::NotificationInfo],
    fragment: bool,
) -> Response {
    if fragment {
        return run_tasks(v, s, owner).into_response();
    }
    let open = matches!(
        s.state,
        crate::protocol::RunState::Queued | crate::protocol::RunState::Running
    );
    page(
        v,
        &s.run,
        html! {
            h1 { "Testrun " (s.run) }
            p { (if devices(s).len() > 1 { "Devices " } else { "Device " })
                @for (i, d) in devices(s).iter().enumerate() { @if i > 0 { ", " } code { (d) } }
                ", image " code { (s.image) } @if let Some(o) = owner { ", owner " (o) }
                @if let Some(series) = &s.series { ", series " a href={ "/series/" (series) } { (series) } } }
            @let (start, end) = run_times(s);
            p #times { "Submitted " (stamp(start))
                @if let Some(e) = end { ", ended " (stamp(e)) ", took " (crate::text::took(e.saturating_sub(start))) }
                @else if start > 0 { ", running for " (crate::text::took(now_ms().saturating_sub(start))) } }
            div #run data-run=(s.run) data-live=(if open { "1" } else { "0" }) { (run_tasks(v, s, owner)) }
            @if !deliveries.is_empty() {
                h2 { "Notifications" }
                table.cards #notifications {
                    thead { tr { th { "id" } th { "to" } th { "state" } th { "attempts" } th { "last" } th { "next try" } } }
                    tbody { @for n in deliveries {
                        tr { td { code { (n.id) } } td { (n.target) } td class={ "state " (n.state) } { (n.state) }
                             td { (n.attempts) } td { (n.last.as_deref().unwrap_or("—")) }
                             td { @if let Some(ms) = n.next_ms { (when(ms)) } @else { "—" } } }
                    } }
                }
            }
        },
    )
}

/// One worker: device, health and its history, recent tasks.
pub fn worker(
    v: &Viewer,
    w: &WorkerInfo,
    history: &[HealthChange],
    recent: &[RecentTask],
    chart: Markup,
) -> Response {
    page(
        v,
        &w.name,
        html! {
            h1 { "Worker " (w.name) }
            table.facts {
                tr { th { "device" } td { (w.device) } }
                tr { th { "state" } td class={ "state " (name(&w.state)) } { (name(&w.state)) } }
                tr { th { "health" } td class={ "health " (w.health.as_str()) } { (w.health.as_str()) " since " (when(w.health_since_ms)) ": " (w.health_reason) } }
                tr { th { "task" } td { @if let Some(t) = &w.task { a href={ "/tasks/" (t) "/log" } { (t) } } @else { "—" } } }
                tr { th { "last heard" } td { (ago(w.last_heard_ms_ago)) " ago" } }
                tr { th { "console" } td { (w.console.as_deref().unwrap_or("—")) } }
                tr { th { "drained" } td { (if w.drained { "yes" } else { "no" }) " " (drain_form(v, w, &format!("/workers/{}", w.name))) } }
                tr { th { "version" } td { (w.version.as_deref().unwrap_or("—")) } }
                @if let Some(p) = &w.pinned { tr { th { "key serves" } td { (p) } } }
            }
            (chart)
            h2 { "Health history" }
            table.cards #health {
                thead { tr { th { "at" } th { "from" } th { "to" } th { "reason" } } }
                tbody { @for h in history.iter().rev() {
                    tr { td { (when(h.at_ms)) } td { (h.from.as_str()) } td class={ "health " (h.to.as_str()) } { (h.to.as_str()) } td { (h.reason) } }
                } }
            }
            h2 { "Recent tasks" }
            table.cards #recent {
                thead { tr { th { "task" } th { "testrun" } th { "state" } th { "verdict" } th { "reason" } } }
                tbody { @for t in recent {
                    tr { td { a href={ "/tasks/" (t.task) "/log" } { (t.task) } } td { a href={ "/runs/" (t.run) } { (t.run) } }
                         td { (name(&t.state)) } td class={ "verdict " (opt_name(&t.verdict)) } { (opt_name(&t.verdict)) }
                         td { (t.reason.as_deref().unwrap_or("")) } }
                } }
            }
        },
    )
}

/// What the audit page shows.
pub struct AuditView {
    pub entries: Vec<serde_json::Value>,
    /// Where older entries end (newest first), newer ones start (oldest first).
    pub older: Option<u64>,
    pub newer: Option<u64>,
    /// The byte the entries shown were read from.
    pub from: u64,
    pub oldest_first: bool,
    /// The filters asked for, for the form and the links.
    pub filters: AuditFilters,
}

/// The audit page's filters, as asked.
#[derive(Default, Clone)]
pub struct AuditFilters {
    pub event: Option<String>,
    pub identity: Option<String>,
    pub q: Option<String>,
}

/// The audit log (admin): newest first, filtered by event, identity or text.
pub fn audit(v: &Viewer, a: &AuditView) -> Response {
    let q = &a.filters;
    let field = |e: &serde_json::Value, k: &str| match e.get(k) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => String::new(),
    };
    let filters = format!(
        "&event={}&identity={}&q={}",
        url_escape(q.event.as_deref().unwrap_or("")),
        url_escape(q.identity.as_deref().unwrap_or("")),
        url_escape(q.q.as_deref().unwrap_or(""))
    );
    page(
        v,
        "Audit",
        html! {
            h1 { "Audit log" }
            form.filters method="get" action="/audit" {
                label { "event " input name="event" value=(q.event.as_deref().unwrap_or("")) size="14" placeholder="cancel, drain…"; }
                label { "identity " input name="identity" value=(q.identity.as_deref().unwrap_or("")) size="14"; }
                label { "text " input name="q" value=(q.q.as_deref().unwrap_or("")) size="16"; }
                button type="submit" { "Filter" }
            }
            p { @if a.oldest_first { "Oldest first from byte " (a.from) "." } @else { "Newest first." }
                " " (a.entries.len()) " entries shown." }
            table.cards #audit {
                thead { tr { th { "at" } th { "identity" } th { "address" } th { "event" } th { "detail" } } }
                tbody { @for e in &a.entries {
                    tr { td { (stamp(e.get("at_ms").and_then(|v| v.as_u64()).unwrap_or(0))) }
                         td { (field(e, "identity")) } td { (field(e, "address")) }
                         td { (field(e, "event")) } td { (visible(&field(e, "detail"))) } }
                } }
            }
            @if let Some(n) = a.older { p { a href={ "/audit?before=" (n) (filters) } { "Older entries →" } } }
            @if let Some(n) = a.newer { p { a href={ "/audit?offset=" (n) (filters) } { "Later entries →" } } }
        },
    )
}

/// The stylesheet and the script.
pub const CSS: &str = include_str!("assets/ots.css");
pub const JS: &str = include_str!("assets/ots.js");
