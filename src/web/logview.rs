//! A task's log as a page, for logs of millions of lines: the page holds
//! a window of about 64 KiB of lines, never the log. Line numbers and
//! receive times come from the server's sparse index (`find_in_log`
//! by offset); `?line=N#LN` opens line N (every number is such a link);
//! `?q=TEXT&m=K` searches the whole log on the server, in 64 MiB pieces
//! off its loop, and opens the K-th matching line with the count;
//! `?at=failure` opens the first failing test case's line (else the first
//! line containing `web_failure_text`). ANSI SGR colours are drawn;
//! `::group::NAME` … `::endgroup::` lines fold. `/tasks/T/log.txt` is the
//! whole log, streamed.

use super::ansi::{self, Sgr};
use super::asks::{read_log, read_tail, status, task_ended, whole, TAIL_BYTES};
use super::bridge::AskError;
use super::pages;
use super::sessions::Viewer;
use super::{Dashboard, Failure};
use crate::protocol::limits::MAX_READ_OFFSET;
use crate::protocol::logfind::{LogFind, LogFinding, LogMatches, LogPlace, LogTime, SEARCH_CHUNK};
use crate::protocol::{Body, ErrorCode, TaskStatus};
use crate::web::extract::{page_error, run_of_task, Page, D};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use maud::{html, Markup};
use serde::Deserialize;
use std::net::SocketAddr;

/// Bytes of log before the line asked for that the window shows.
const CONTEXT_BEFORE: u64 = 4 * 1024;
/// Pieces a whole-log search reads at most per page (1 TiB at 64 MiB).
const MAX_SEARCH_PIECES: u32 = 16 * 1024;

/// What the log page was asked for.
#[derive(Deserialize, Default)]
pub(super) struct ViewQuery {
    /// Search the whole log for this text…
    #[serde(default)]
    q: Option<String>,
    /// …and open its `m`-th match (from 1).
    #[serde(default)]
    m: Option<u64>,
    #[serde(default)]
    line: Option<u64>,
    #[serde(default)]
    before: Option<u64>,
    #[serde(default)]
    after: Option<u64>,
    /// `failure`: the first failure.
    #[serde(default)]
    at: Option<String>,
}

/// A search's outcome on the page.
struct Found {
    text: String,
    count: u64,
    /// The match shown (from 1) and where its line starts.
    shown: Option<(u64, u64)>,
}

pub(super) async fn find_in_log(
    d: &Dashboard,
    v: &Viewer,
    peer: SocketAddr,
    task: &str,
    find: LogFind,
) -> Result<LogFinding, Failure> {
    // The server answers 16 reads at once (4 searches per user): past
    // them it says `limit_reached`, and the page asks again shortly.
    let mut backoff = std::time::Duration::from_millis(20);
    loop {
        let body = Body::FindInLog {
            request: 0,
            task: task.to_string(),
            find: find.clone(),
        };
        match d.ask(v, peer, body).await {
            Ok((Body::LogFound { found, .. }, _)) => return Ok(found),
            Ok((other, _)) => return Err(crate::web::extract::unexpected("find_in_log", &other)),
            Err(AskError::Busy)
            | Err(AskError::Refused {
                code: ErrorCode::LimitReached,
                ..
            }) if backoff < std::time::Duration::from_secs(5) => {
                tokio::time::sleep(backoff).await; // backoff before asking again, not synchronisation
                backoff *= 2;
            }
            Err(e) => return Err(Failure::from(e)),
        }
    }
}

async fn place(
    d: &Dashboard,
    v: &Viewer,
    peer: SocketAddr,
    task: &str,
    find: LogFind,
) -> Result<LogPlace, Failure> {
    match find_in_log(d, v, peer, task, find).await? {
        LogFinding::Place(p) => Ok(p),
        LogFinding::Matches(_) => Err(Failure::new(
            StatusCode::BAD_GATEWAY,
            "the server answered a place with matches",
        )),
    }
}

/// Searches the whole log: the number of lines holding `text`, and where
/// the `want`-th (from 1) starts.
async fn search(
    d: &Dashboard,
    v: &Viewer,
    peer: SocketAddr,
    task: &str,
    text: &str,
    want: u64,
    stop_at_first: bool,
) -> Result<(u64, Option<u64>), Failure> {
    let (mut count, mut at, mut offset) = (0u64, None, 0u64);
    for _ in 0..MAX_SEARCH_PIECES {
        let find = LogFind::Text {
            text: text.to_string(),
            offset,
            // A piece holds fewer matches than bytes: more is never asked.
            skip: want
                .saturating_sub(1)
                .saturating_sub(count)
                .min(SEARCH_CHUNK),
        };
        let LogFinding::Matches(LogMatches {
            to,
            eof,
            count: n,
            offsets,
            ..
        }) = find_in_log(d, v, peer, task, find).await?
        else {
            return Err(Failure::new(
                StatusCode::BAD_GATEWAY,
                "the server answered a search with a place",
            ));
        };
        if at.is_none() && count + n >= want {
            at = offsets.first().copied();
        }
        count += n;
        if eof || to <= offset || (stop_at_first && at.is_some()) {
            break;
        }
        offset = to;
    }
    Ok((count, at))
}

/// Where "first failure" is: the first failing case's line, or the first
/// line containing `web_failure_text`.
async fn first_failure(
    d: &Dashboard,
    v: &Viewer,
    peer: SocketAddr,
    t: &TaskStatus,
) -> Result<Option<u64>, Failure> {
    if let Some(o) = t.failing.iter().filter_map(|c| c.log_offset).min() {
        return Ok(Some(o));
    }
    Ok(search(d, v, peer, &t.task, &d.failure_text, 1, true)
        .await?
        .1)
}

pub(super) async fn log_page(
    State(d): D,
    Page(v, peer): Page,
    Path(task): Path<String>,
    Query(q): Query<ViewQuery>,
) -> Response {
    match view(&d, &v, peer, &task, q).await {
        Ok(r) => r,
        Err(e) => page_error(&v, e),
    }
}

async fn view(
    d: &Dashboard,
    v: &Viewer,
    peer: SocketAddr,
    task: &str,
    q: ViewQuery,
) -> Result<Response, Failure> {
    let run = run_of_task(task)?;
    let s = status(d, v, peer, &run).await?;
    let Some(t) = s.tasks.iter().find(|t| t.task == task) else {
        return Err(Failure::new(
            StatusCode::NOT_FOUND,
            format!("testrun {run} has no task {task}"),
        ));
    };
    let mut notice = None;
    let mut found = None;
    // Where the window starts: a line asked for (shown with context),
    // an offset, or the tail.
    let mut target: Option<u64> = None;
    let text =
        q.q.as_deref()
            .unwrap_or("")
            .trim_end_matches(['\r', '\n'])
            .to_string();
    if !text.is_empty() {
        if text.len() > crate::protocol::logfind::MAX_FIND_TEXT {
            return Err(Failure::new(
                StatusCode::BAD_REQUEST,
                "a search text is at most 256 bytes",
            ));
        }
        let want = q.m.unwrap_or(1).max(1);
        let (count, at) = search(d, v, peer, task, &text, want, false).await?;
        if count == 0 {
            notice = Some(format!("No line of the log contains “{text}”."));
        } else if at.is_none() {
            notice = Some(format!(
                "{count} lines contain “{text}”: there is no match {want}."
            ));
        }
        let shown = at.map(|o| (want.min(count), o));
        target = shown.map(|(_, o)| o);
        found = Some(Found { text, count, shown });
    } else if q.at.as_deref() == Some("failure") {
        target = first_failure(d, v, peer, t).await?;
        if target.is_none() {
            notice = Some(format!(
                "No failing test case, and no line contains “{}” (web_failure_text).",
                d.failure_text
            ));
        }
    } else if let Some(n) = q.line {
        let line = n.clamp(1, MAX_READ_OFFSET + 1);
        let p = place(d, v, peer, task, LogFind::Line { line }).await?;
        if p.line > p.lines {
            notice = Some(format!("The log has {} lines; this is its end.", p.lines));
        } else {
            target = Some(p.offset);
        }
    }
    let live_tail = target.is_none() && q.before.is_none() && q.after.is_none();
    let (start, bytes) = match (target, q.before, q.after) {
        (Some(o), _, _) => {
            let from = o.saturating_sub(CONTEXT_BEFORE);
            let (s, b, _) = read_log(d, v, peer, task, from, TAIL_BYTES).await?;
            let (s, lines) = whole(s, &b);
            (s, lines.to_vec())
        }
        (None, Some(before), _) => {
            let from = before.saturating_sub(TAIL_BYTES);
            let (s, b, _) = read_log(d, v, peer, task, from, before - from).await?;
            let (s, lines) = whole(s, &b);
            (s, lines.to_vec())
        }
        (None, None, Some(after)) => {
            let (s, b, _) = read_log(d, v, peer, task, after, TAIL_BYTES).await?;
            let (s, lines) = whole(s, &b);
            (s, lines.to_vec())
        }
        (None, None, None) => {
            let (s, b) = read_tail(d, v, peer, task, TAIL_BYTES).await?;
            let (s, lines) = whole(s, &b);
            (s, lines.to_vec())
        }
    };
    // A log that does not exist yet has no place: nothing to number.
    let first = match place(d, v, peer, task, LogFind::Offset { offset: start }).await {
        Ok(p) => p,
        Err(f) if f.status == StatusCode::NOT_FOUND => LogPlace::default(),
        Err(f) => return Err(f),
    };
    let text_window = String::from_utf8_lossy(&bytes).into_owned();
    let ended = task_ended(&s, task);
    Ok(pages::page(
        v,
        &format!("{task} log"),
        render(&Window {
            task,
            run: &run,
            t,
            start,
            first: &first,
            text: &text_window,
            target,
            found: found.as_ref(),
            notice: notice.as_deref(),
            live: live_tail && !ended,
            ended,
        }),
    ))
}

struct Window<'a> {
    task: &'a str,
    run: &'a str,
    t: &'a TaskStatus,
    start: u64,
    first: &'a LogPlace,
    text: &'a str,
    target: Option<u64>,
    found: Option<&'a Found>,
    notice: Option<&'a str>,
    live: bool,
    ended: bool,
}

/// A line of the window, or a fold of them.
enum Node {
    Line(usize),
    Group(usize, Vec<Node>),
}

/// Folds: `::group::NAME` opens one, `::endgroup::` closes it (a close
/// without an open is a line like any other).
fn fold(lines: &[&str]) -> Vec<Node> {
    let mut stack: Vec<(usize, Vec<Node>)> = Vec::new();
    let mut top: Vec<Node> = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let body = strip_prefix(l);
        if body.starts_with("::group::") && stack.len() < 16 {
            stack.push((i, std::mem::take(&mut top)));
        } else if body.starts_with("::endgroup::") && !stack.is_empty() {
            let (opened, outer) = stack.pop().expect("not empty");
            let inner = std::mem::replace(&mut top, outer);
            let mut inner = inner;
            inner.push(Node::Line(i));
            top.push(Node::Group(opened, inner));
        } else {
            top.push(Node::Line(i));
        }
    }
    while let Some((opened, outer)) = stack.pop() {
        let inner = std::mem::replace(&mut top, outer);
        top.push(Node::Group(opened, inner));
    }
    top
}

/// A stored line without its stream's prefix.
fn strip_prefix(l: &str) -> &str {
    for p in ["[serial] ", "[stderr] ", "[ots-worker] "] {
        if let Some(rest) = l.strip_prefix(p) {
            return rest;
        }
    }
    l
}

/// Each line's number, offset, receive time and rendering.
struct Lines<'a> {
    lines: Vec<&'a str>,
    offsets: Vec<u64>,
    times: Vec<Option<u64>>,
}

fn number<'a>(text: &'a str, start: u64, times: &[LogTime]) -> Lines<'a> {
    let lines: Vec<&str> = text.split_terminator('\n').collect();
    let mut offsets = Vec::with_capacity(lines.len());
    let mut at = start;
    for l in &lines {
        offsets.push(at);
        at += l.len() as u64 + 1;
    }
    let mut k = 0usize;
    let times = offsets
        .iter()
        .map(|&o| {
            while k + 1 < times.len() && times[k + 1].offset <= o {
                k += 1;
            }
            times.get(k).filter(|t| t.offset <= o).map(|t| t.at_ms)
        })
        .collect();
    Lines {
        lines,
        offsets,
        times,
    }
}

fn render(w: &Window<'_>) -> Markup {
    let Window {
        task,
        run,
        t,
        start,
        first,
        text,
        target,
        found,
        notice,
        live,
        ended,
    } = *w;
    let numbered = number(text, start, &first.times);
    let end = start + text.len() as u64;
    let base = format!("/tasks/{task}/log");
    let first_no = first.line.max(1);
    let mark = found.map(|f| f.text.as_str());
    let nodes = fold(&numbered.lines);
    let lines_html = Drawing {
        n: &numbered,
        first_no,
        target,
        mark,
        style: Sgr::default(),
    }
    .nodes(&nodes);
    html! {
        h1 { "Log of task " (task) }
        p {
            "Testrun " a href={ "/runs/" (run) } { (run) }
            ", " span #task-state class={ "state " (pages::name(&t.state)) } { (pages::name(&t.state)) }
            @if let Some(vd) = &t.verdict { ", verdict " span class={ "verdict " (pages::name(vd)) } { (pages::name(vd)) } }
            @if let Some(wk) = &t.worker { " on " a href={ "/workers/" (wk) } { (wk) } }
            ", " (first.lines) " lines, " (pages::size(first.size))
        }
        nav.lognav {
            a href={ (base) "?line=1#L1" } { "First line" }
            @if start > 0 { a #earlier href={ (base) "?before=" (start) } { "Earlier" } }
            @if end < first.size { a href={ (base) "?after=" (end) } { "Later" } }
            a href={ (base) "#end" } { "Last line" }
            a href={ (base) "?at=failure" } { "First failure" }
            a href={ (base) ".txt" } { "Raw" }
            a href={ (base) ".txt" } download={ (task) ".log" } { "Download" }
        }
        div.logforms {
            form.filters method="get" action=(base) {
                label { "search the whole log " input #search name="q" value=(mark.unwrap_or("")) size="24" maxlength="256" placeholder="text the lines contain"; }
                button type="submit" { "Search" }
            }
            form.filters method="get" action=(base) {
                label { "line " input name="line" type="number" min="1" size="8"; }
                button type="submit" { "Go" }
            }
            span #live-status { @if ended { "task ended" } }
        }
        @if let Some(n) = notice { p.notice { (n) } }
        @if let Some(f) = found {
            @if let Some((k, _)) = f.shown {
                p #matches {
                    "Match " strong #match-no { (k) } " of " strong #match-count { (f.count) } " lines containing “" (f.text) "”"
                    @if k > 1 { " · " a href={ (base) "?q=" (urlenc(&f.text)) "&m=" (k - 1) } { "previous" } }
                    @if k < f.count { " · " a href={ (base) "?q=" (urlenc(&f.text)) "&m=" (k + 1) } { "next" } }
                }
            }
        }
        div #log data-task=(task) data-run=(run) data-start=(start) data-end=(end)
            data-next-line=(first_no + numbered.lines.len() as u64)
            data-live=(if live { "1" } else { "0" }) {
            (lines_html)
        }
        span #end {}
    }
}

/// Draws the window's lines: what each needs besides its index, and
/// the colour a line leaves for the next.
struct Drawing<'a> {
    n: &'a Lines<'a>,
    first_no: u64,
    target: Option<u64>,
    mark: Option<&'a str>,
    style: Sgr,
}

impl Drawing<'_> {
    fn nodes(&mut self, nodes: &[Node]) -> Markup {
        html! {
            @for node in nodes {
                @match node {
                    Node::Line(i) => (self.line(*i)),
                    Node::Group(open, inner) => {
                        details.fold open {
                            summary { (self.line(*open)) }
                            (self.nodes(inner))
                        }
                    }
                }
            }
        }
    }

    fn line(&mut self, i: usize) -> Markup {
        let no = self.first_no + i as u64;
        let text = self.n.lines[i];
        let hit = self.mark.is_some_and(|m| text.contains(m));
        let here = self.target == Some(self.n.offsets[i]);
        let (body, after) = ansi::render(text, self.style, self.mark.filter(|_| hit));
        self.style = after;
        let class = format!(
            "{}{}{}",
            pages::line_class(text),
            if hit { " hit" } else { "" },
            if here { " here" } else { "" }
        );
        let at = self.n.times[i];
        html! {
            div class=(class) id={ "L" (no) } {
                a.n href={ "?line=" (no) "#L" (no) } title=[at.map(|ms| format!("received {} UTC", crate::clock::human(ms)))] { (no) }
                // The second is what a mark holds: HH:MM:SS of time_of_day.
                span.t { (at.map(|ms| crate::clock::time_of_day(ms)[..8].to_string()).unwrap_or_default()) }
                span.x { (body) }
            }
        }
    }
}

/// A query value, percent-encoded.
fn urlenc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_fold_and_a_lone_endgroup_is_a_line() {
        let lines = [
            "a",
            "::group::pkg one",
            "b",
            "::endgroup::",
            "::endgroup::",
            "::group::open",
            "c",
        ];
        let nodes = fold(&lines);
        let shape: Vec<String> = nodes
            .iter()
            .map(|n| match n {
                Node::Line(i) => format!("L{i}"),
                Node::Group(o, inner) => format!("G{o}:{}", inner.len()),
            })
            .collect();
        assert_eq!(shape, ["L0", "G1:2", "L4", "G5:1"]);
    }

    #[test]
    fn lines_get_offsets_and_the_time_of_the_mark_before_them() {
        let times = [
            LogTime {
                offset: 0,
                line: 0,
                at_ms: 1_000,
            },
            LogTime {
                offset: 4,
                line: 2,
                at_ms: 61_000,
            },
        ];
        let n = number("a\nb\nc\nd\n", 0, &times);
        assert_eq!(n.offsets, [0, 2, 4, 6]);
        assert_eq!(
            n.times,
            [Some(1_000), Some(1_000), Some(61_000), Some(61_000)]
        );
        assert_eq!(urlenc("a b&c"), "a%20b%26c");
    }
}
