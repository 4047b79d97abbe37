//! The lists: runs, the queue, workers, and a task's logs.

use crate::cli::conn::Conn;
use crate::client::{exit, ClientError};
use crate::protocol::RunState;
use crate::text::{ago_short as ago, escape_controls};
use std::collections::BTreeMap;

pub(crate) fn now_ms() -> u64 {
    crate::protocol::limits::unix_ms_now()
}

/// `cases RUN [--failed]`: every page, printed as it comes (`--json`:
/// one document, the list).
pub(crate) async fn cases(conn: &Conn, run: &str, failed: bool) -> Result<i32, ClientError> {
    let mut client = conn.connect().await?;
    let mut all = Vec::new();
    let mut offset = 0u64;
    let page = crate::protocol::limits::MAX_CASES_PER_ANSWER;
    loop {
        let cases = client.cases(&run.to_string(), failed, offset, page).await?;
        let n = cases.len();
        offset += n as u64;
        if conn.json {
            all.extend(cases);
        } else {
            for c in &cases {
                crate::outln!(
                    "{:<5} {} {}{}{}{}",
                    c.status.as_str(),
                    c.task,
                    escape_controls(&c.name),
                    c.duration_ms
                        .map(|d| format!(" ({:.3} s)", d as f64 / 1000.0))
                        .unwrap_or_default(),
                    c.message
                        .as_deref()
                        .map(|m| format!(" — {}", escape_controls(m)))
                        .unwrap_or_default(),
                    c.log_offset
                        .map(|o| format!(" (log byte {o})"))
                        .unwrap_or_default()
                );
            }
        }
        if n < page as usize {
            break;
        }
    }
    if conn.json {
        crate::outln!(
            "{}",
            serde_json::to_string_pretty(&all).expect("cases serialise")
        );
    } else if offset == 0 {
        crate::outln!(
            "no {}test cases recorded for {run}",
            if failed { "failing " } else { "" }
        );
    }
    Ok(exit::PASS)
}

pub(crate) async fn runs(
    conn: &Conn,
    state: Option<RunState>,
    owner: Option<String>,
    limit: u32,
) -> Result<i32, ClientError> {
    let mut client = conn.connect().await?;
    let runs = client.runs(state, owner, limit).await?;
    if conn.json {
        crate::outln!(
            "{}",
            serde_json::to_string_pretty(&runs).expect("runs serialise")
        );
        return Ok(exit::PASS);
    }
    if runs.is_empty() {
        crate::outln!("no testruns");
        return Ok(exit::PASS);
    }
    crate::outln!(
        "{:<8} {:<10} {:<8} {:<12} {:>5} {:>8}  DEVICE",
        "RUN",
        "STATE",
        "VERDICT",
        "OWNER",
        "TASKS",
        "AGE"
    );
    let now = now_ms();
    for r in runs {
        crate::outln!(
            "{:<8} {:<10} {:<8} {:<12} {:>5} {:>8}  {}",
            r.run,
            format!("{:?}", r.state).to_lowercase(),
            r.verdict.map_or("-".to_string(), |v| v.to_string()),
            escape_controls(r.owner.as_deref().unwrap_or("-")),
            r.tasks,
            if r.submitted_ms == 0 {
                "?".to_string()
            } else {
                ago(now.saturating_sub(r.submitted_ms))
            },
            r.device
        );
    }
    Ok(exit::PASS)
}

pub(crate) async fn queue(conn: &Conn) -> Result<i32, ClientError> {
    let mut client = conn.connect().await?;
    let queues = client.queue().await?;
    if conn.json {
        crate::outln!(
            "{}",
            serde_json::to_string_pretty(&queues).expect("queues serialise")
        );
        return Ok(exit::PASS);
    }
    if queues.is_empty() {
        crate::outln!("nothing queued");
        return Ok(exit::PASS);
    }
    crate::outln!(
        "{:<24} {:>4} {:<14} {:<8} {:<12} {:>8} {:>9}  AHEAD (OWN / OTHERS)",
        "ROUTING KEY",
        "POS",
        "TASK",
        "RUN",
        "OWNER",
        "WAITING",
        "STARTS IN"
    );
    for q in queues {
        for t in &q.tasks {
            crate::outln!(
                "{:<24} {:>4} {:<14} {:<8} {:<12} {:>8} {:>9}  {} / {}",
                q.key,
                t.position,
                t.task,
                t.run,
                escape_controls(t.owner.as_deref().unwrap_or("-")),
                ago(t.age_ms),
                t.estimate_ms
                    .map_or("?".to_string(), |ms| format!("~{}", ago(ms))),
                t.ahead_own,
                t.ahead_others
            );
            if let Some(f) = &t.forecast {
                crate::outln!("{:<24}      {}", "", crate::text::forecast(f));
            }
        }
        if q.length > q.tasks.len() as u64 {
            crate::outln!("{:<24} … {} more", q.key, q.length - q.tasks.len() as u64);
        }
        // Why they wait: who could take them, and what each is doing.
        if q.workers_total == 0 {
            crate::outln!(
                "{:<24} waiting for a worker with this device: none is registered",
                q.key
            );
        } else {
            let shown: Vec<String> = q
                .workers
                .iter()
                .map(|w| {
                    format!(
                        "{} ({})",
                        escape_controls(&w.name),
                        escape_controls(&w.doing)
                    )
                })
                .collect();
            let more = q.workers_total.saturating_sub(q.workers.len() as u64);
            crate::outln!(
                "{:<24} could run on: {}{}",
                q.key,
                shown.join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            );
        }
    }
    Ok(exit::PASS)
}

pub(crate) async fn workers(conn: &Conn) -> Result<i32, ClientError> {
    let mut client = conn.connect().await?;
    let workers = client.workers().await?;
    if conn.json {
        crate::outln!(
            "{}",
            serde_json::to_string_pretty(&workers).expect("workers serialise")
        );
    } else if workers.is_empty() {
        crate::outln!("no workers registered");
    } else {
        crate::outln!(
            "{:<20} {:<8} {:<11} {:<7} {:<14} {:>10} {:<10} {:<12} DEVICE",
            "NAME",
            "STATE",
            "HEALTH",
            "DRAINED",
            "TASK",
            "LAST HEARD",
            "VERSION",
            "CONSOLE"
        );
        for w in workers {
            let pinned = match &w.pinned {
                Some(p) => format!(" (may serve: {})", escape_controls(p)),
                None => String::new(),
            };
            crate::outln!(
                "{:<20} {:<8} {:<11} {:<7} {:<14} {:>10} {:<10} {:<12} {}{pinned}",
                w.name,
                format!("{:?}", w.state).to_lowercase(),
                w.health.as_str(),
                if w.drained { "yes" } else { "no" },
                w.task.as_deref().unwrap_or("-"),
                format!("{} ago", ago(w.last_heard_ms_ago)),
                escape_controls(w.version.as_deref().unwrap_or("-")),
                match w.console.as_deref() {
                    None => "-".to_string(),
                    Some("ok") => "ok".to_string(),
                    Some(_) => "unavailable".to_string(),
                },
                w.device
            );
        }
    }
    Ok(exit::PASS)
}

pub(crate) async fn logs(
    conn: &Conn,
    run: &str,
    only: Option<&str>,
    raw: bool,
) -> Result<i32, ClientError> {
    let mut client = conn.connect().await?;
    let status = client.status(&run.to_string()).await?;
    if let Some(task) = only {
        if !status.tasks.iter().any(|t| t.task == task) {
            let known: Vec<&str> = status.tasks.iter().map(|t| t.task.as_str()).collect();
            crate::errln!(
                "ots-submit: testrun {run} has no task {task:?} (its tasks: {})",
                known.join(", ")
            );
            return Ok(exit::USAGE);
        }
    }
    let mut all = BTreeMap::new();
    for t in status
        .tasks
        .iter()
        .filter(|t| only.is_none_or(|o| o == t.task))
    {
        let text = client.read_all(&t.task, None).await?;
        let text = String::from_utf8_lossy(&text).into_owned();
        if conn.json {
            all.insert(t.task.clone(), text);
        } else {
            crate::outln!("==== {} [{}] ====", t.task, t.packages.join(","));
            if raw {
                crate::out!("{text}");
            } else {
                crate::out!("{}", escape_controls(&text));
            }
        }
    }
    if conn.json {
        crate::outln!("{}", serde_json::to_string(&all).expect("logs serialise"));
    }
    Ok(exit::PASS)
}
