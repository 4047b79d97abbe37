//! Small renderings of facts the pages share: times (UTC, with the
//! milliseconds on hover), how long things took, a testrun's devices.

use crate::protocol::{ProgressState, RunStatus, RunSummary, TaskStatus};
use maud::{html, Markup};

/// How long a listed testrun took, or has taken so far.
pub fn run_took(r: &RunSummary) -> String {
    match r.ended_ms {
        _ if r.submitted_ms == 0 => "—".into(),
        Some(e) => crate::text::took(e.saturating_sub(r.submitted_ms)),
        None => format!(
            "{} so far",
            crate::text::took(now_ms().saturating_sub(r.submitted_ms))
        ),
    }
}

/// Every device spec of a testrun: its first and each task's own.
pub fn devices(s: &RunStatus) -> Vec<String> {
    let mut out = vec![s.device.to_string()];
    for d in s.tasks.iter().filter_map(|t| t.device.as_ref()) {
        let d = d.to_string();
        if !out.contains(&d) {
            out.push(d);
        }
    }
    out
}

/// When a testrun was submitted and ended (Unix ms; 0: not known), from
/// its tasks' histories.
pub fn run_times(s: &RunStatus) -> (u64, Option<u64>) {
    let start = s
        .tasks
        .iter()
        .filter_map(|t| t.history.first().map(|h| h.at_ms))
        .min()
        .unwrap_or(0);
    let open = matches!(
        s.state,
        crate::protocol::RunState::Queued | crate::protocol::RunState::Running
    );
    let end = (!open)
        .then(|| {
            s.tasks
                .iter()
                .filter_map(|t| t.history.last().map(|h| h.at_ms))
                .max()
        })
        .flatten();
    (start, end)
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A time as `YYYY-MM-DD HH:MM:SS UTC` with the milliseconds on hover.
pub fn stamp(ms: u64) -> Markup {
    if ms == 0 {
        return html! { "—" };
    }
    let full = crate::clock::human(ms);
    let short = full
        .rsplit_once('.')
        .map_or(full.as_str(), |(s, _)| s)
        .to_string();
    html! { time datetime=(full.replace(' ', "T") + "Z") title={ (full) " UTC" } { (short) " UTC" } }
}

/// How long a task ran (its last attempt, from running to its end), or
/// has been running so far; its start on hover.
pub fn task_took(t: &TaskStatus) -> Markup {
    let started = t
        .history
        .iter()
        .rev()
        .find(|h| h.state == ProgressState::Running)
        .map(|h| h.at_ms);
    let ended = t
        .history
        .last()
        .filter(|h| matches!(h.state, ProgressState::Finished | ProgressState::Cancelled))
        .map(|h| h.at_ms);
    match (started, ended) {
        (Some(s), Some(e)) => {
            html! { span title={ "started " (crate::clock::human(s)) " UTC" } { (crate::text::took(e.saturating_sub(s))) } }
        }
        (Some(s), None) => {
            html! { span title={ "started " (crate::clock::human(s)) " UTC" } { (crate::text::took(now_ms().saturating_sub(s))) " so far" } }
        }
        _ => html! { "—" },
    }
}
