//! `run`, `wait` and `status`: a testrun submitted, followed and summed
//! up, with the exit status its verdict says.

use crate::cli::args::{local_image, RunArgs};
use crate::cli::conn::{fail, verdict_exit, Conn};
use crate::cli::fetch::{fetch, progress_for, FetchReport};
use crate::client::follow::{follow, FollowItem};
use crate::client::{exit, Client, ClientError};
use crate::delivery::ranges::describe;
use crate::protocol::{DeviceSpec, ProgressState, RunState, RunStatus, TestrunRequest};
use crate::text::escape_controls;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

pub(crate) async fn run(mut args: RunArgs) -> i32 {
    let device = args.device.clone().unwrap_or_else(|| {
        if args.lease.is_some() {
            // Replaced by the lease's device on the server.
            "devicegroup:lease".into()
        } else {
            "devicegroup:example".into()
        }
    });
    let mut specs = Vec::new();
    for part in device.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        match DeviceSpec::parse(part) {
            Ok(d) => specs.push(d),
            Err(e) => {
                crate::errln!("ots-submit: --device: {e}");
                return exit::USAGE;
            }
        }
    }
    if specs.is_empty() {
        crate::errln!(
            "ots-submit: --device: no device spec given; write e.g. \"devicegroup:n900\""
        );
        return exit::USAGE;
    }
    let device = specs.remove(0);
    let more_devices = specs;
    let mut lab = None;
    if args.local {
        match crate::local::Lab::start(&device, args.local_workers, args.conductor.clone()).await {
            Ok(l) => {
                args.conn.server = l.control().to_string();
                args.conn.security = crate::security::SecurityMode::Noise;
                args.conn.key = Some(l.user_key());
                args.conn.server_key = Some(l.server_key());
                if !args.conn.json {
                    crate::outln!(
                        "local lab: server {} with {} worker(s) for {}, state in {}",
                        l.control(),
                        args.local_workers,
                        device,
                        l.state_dir().display()
                    );
                }
                lab = Some(l);
            }
            Err(e) => {
                crate::errln!("ots-submit: cannot start the local lab: {e}");
                return exit::SOFTWARE;
            }
        }
        args.wait = true;
        if args.image.is_none() {
            args.image = Some(crate::local::example_image().display().to_string());
        }
        if let Some(image) = args.image.as_deref().filter(|i| !i.contains("://")) {
            if !Path::new(image).exists() {
                crate::errln!("ots-submit: --image {image}: no such file here (with --local the workers run on this machine and read the image from this path)");
                lab.take().expect("just started").shutdown().await;
                return exit::USAGE;
            }
        }
        if args.packages.is_empty() {
            args.packages = vec!["smoke".into(), "network".into(), "storage".into()];
        }
    }
    let code = submit_and_watch(&args, device, more_devices).await;
    if let Some(lab) = lab {
        lab.shutdown().await;
    }
    code
}

pub(crate) async fn submit_and_watch(
    args: &RunArgs,
    device: DeviceSpec,
    devices: Vec<DeviceSpec>,
) -> i32 {
    let testrun = TestrunRequest {
        lease: None,
        on_lease: args.lease.clone(),
        series: args.series.clone(),
        device,
        devices,
        image: local_image(args.image.clone().unwrap_or_default(), !args.local),
        packages: args.packages.clone(),
        distribution: args.distribution,
        timeout_secs: args.timeout.as_secs(),
        options: args.options.iter().cloned().collect::<BTreeMap<_, _>>(),
        queue_anyway: args.queue_anyway,
        secrets: args.secrets.iter().cloned().collect::<BTreeMap<_, _>>(),
        inputs: Vec::new(),
        owner: None,
        priority: args.priority,
        notify: args.notify.clone(),
    };
    let mut testrun = testrun;
    let mut client = match args.conn.connect().await {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    for (name, path) in &args.inputs {
        let mut progress = progress_for(args.conn.json, "uploading");
        match client.upload_input(name, path, progress.as_mut()).await {
            Ok(input) => testrun.inputs.push(input),
            Err(e) => {
                crate::errln!("ots-submit: input file {}: {e}", path.display());
                return e.exit_code();
            }
        }
    }
    let (run, tasks) = match client.submit(testrun).await {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    let json = args.conn.json;
    let wait = args.wait || args.follow || args.fetch.is_some();
    if !wait {
        if json {
            crate::outln!("{}", serde_json::json!({ "run": run, "tasks": tasks }));
        } else {
            crate::outln!("{run}");
        }
        return exit::PASS;
    }
    if json {
        crate::outln!(
            "{}",
            typed(
                "submitted",
                serde_json::json!({ "run": run, "tasks": tasks })
            )
        );
    } else {
        crate::outln!("testrun {run} submitted: {} task(s)", tasks.len());
    }
    watch(
        &mut client,
        &args.conn,
        &run,
        args.follow,
        args.fetch.as_deref(),
    )
    .await
}

pub(crate) async fn wait(conn: &Conn, run: &str, logs: bool, fetch_dir: Option<&Path>) -> i32 {
    let mut client = match conn.connect().await {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    watch(&mut client, conn, &run.to_string(), logs, fetch_dir).await
}

/// Follows a testrun to its end, prints the summary, fetches results;
/// returns the exit status for its verdict.
pub(crate) async fn watch(
    client: &mut Client,
    conn: &Conn,
    run: &String,
    logs: bool,
    fetch_dir: Option<&Path>,
) -> i32 {
    let json = conn.json;
    let started = Instant::now();
    let status = follow(client, run, logs, |item| print_item(&item, started, json)).await;
    let status = match status {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    if json {
        crate::outln!(
            "{}",
            typed(
                "status",
                serde_json::to_value(&status).expect("status serialises")
            )
        );
    } else {
        print_summary(&status);
    }
    if let Some(dir) = fetch_dir {
        // In JSON mode the status line above already lists the files.
        let report = if json {
            FetchReport::Quiet
        } else {
            FetchReport::Text
        };
        if let Err(e) = fetch(client, &status, dir, report).await {
            return fail(&e);
        }
    }
    verdict_exit(&status)
}

/// One JSON Lines record of the streaming commands (`run --wait`,
/// `--follow`, `wait` with `--json`): `value`'s fields and `type` (one of
/// `submitted`, `event`, `log`, `status`).
pub(crate) fn typed(kind: &str, value: serde_json::Value) -> String {
    let mut map = match value {
        serde_json::Value::Object(m) => m,
        other => {
            let mut m = serde_json::Map::new();
            m.insert("value".into(), other);
            m
        }
    };
    map.insert("type".into(), serde_json::Value::String(kind.to_string()));
    serde_json::Value::Object(map).to_string()
}

pub(crate) fn print_item(item: &FollowItem, started: Instant, json: bool) {
    let t = started.elapsed().as_secs_f32();
    match item {
        FollowItem::Event(e) if json => crate::outln!(
            "{}",
            typed("event", serde_json::to_value(e).expect("event serialises"))
        ),
        FollowItem::Event(e) => {
            let what = match e.state {
                ProgressState::Queued => "queued".to_string(),
                ProgressState::Dispatched => {
                    format!("dispatched to {}", e.worker.as_deref().unwrap_or("?"))
                }
                ProgressState::Running => "running".to_string(),
                ProgressState::Requeued => {
                    format!(
                        "re-queued: {}",
                        escape_controls(e.reason.as_deref().unwrap_or(""))
                    )
                }
                ProgressState::Finished => format!(
                    "{}: {}",
                    e.verdict.map_or("ended".to_string(), |v| v.to_string()),
                    escape_controls(e.reason.as_deref().unwrap_or(""))
                ),
                ProgressState::Cancelled => {
                    format!(
                        "cancelled: {}",
                        escape_controls(e.reason.as_deref().unwrap_or(""))
                    )
                }
                ProgressState::RunFinished => format!(
                    "testrun finished: {}",
                    e.verdict
                        .map_or("no verdict".to_string(), |v| v.to_string())
                ),
                ProgressState::RunCancelled => "testrun cancelled".to_string(),
            };
            match &e.task {
                Some(task) => crate::outln!("[{t:6.1}s] {task} {what}"),
                None => crate::outln!("[{t:6.1}s] {what}"),
            }
        }
        FollowItem::Lines { task, lines } => {
            for l in lines {
                if json {
                    crate::outln!(
                        "{}",
                        typed(
                            "log",
                            serde_json::json!({ "task": task, "seq": l.seq, "stream": l.stream, "text": l.text })
                        )
                    );
                } else {
                    // The stored form: the source from the stream, never
                    // from the text.
                    let line = crate::protocol::logtext::render_line(l);
                    crate::out!("  {task} | {}", escape_controls(&line));
                }
            }
        }
        FollowItem::Missed { task, lines } => {
            crate::errln!("  {task} | ({lines} live log lines not received here; `ots-submit logs` shows what the server stored)");
        }
        FollowItem::ServerAway(e) => {
            crate::errln!("ots-submit: {e}; the server went away, waiting for it to come back (Ctrl-C to stop waiting)")
        }
        FollowItem::ServerBack => crate::errln!("ots-submit: the server is back; still following"),
        FollowItem::NoLiveEvents(e) => {
            crate::errln!("ots-submit: no live events ({e}); polling the server instead")
        }
    }
}

/// The task's failing test cases by name, with their messages, and how
/// many more there are.
fn print_failing(status: &RunStatus, t: &crate::protocol::TaskStatus) {
    for c in &t.failing {
        let message = c
            .message
            .as_deref()
            .map(|m| format!(" — {}", escape_controls(m)))
            .unwrap_or_default();
        crate::outln!(
            "  {}: {}{message}",
            c.status.as_str(),
            escape_controls(&c.name)
        );
    }
    let failing = t.cases.map_or(0, |c| c.failures + c.errors);
    let more = failing.saturating_sub(t.failing.len() as u64);
    if more > 0 {
        crate::outln!(
            "  … and {more} more failing (ots-submit cases {} --failed)",
            status.run
        );
    }
}

pub(crate) fn print_summary(status: &RunStatus) {
    for t in &status.tasks {
        let verdict = match (t.state, t.verdict) {
            (crate::protocol::TaskState::Cancelled, _) => "CANCELLED".to_string(),
            (_, Some(v)) => v.to_string(),
            (s, None) => format!("{s:?}").to_uppercase(),
        };
        let on = match &t.device {
            Some(d) => format!(" on {d}"),
            None => String::new(),
        };
        crate::outln!(
            "task {}{on} [{}] {} — {} (worker {}, attempt {})",
            t.task,
            t.packages.join(","),
            verdict,
            escape_controls(t.reason.as_deref().unwrap_or("")),
            t.worker.as_deref().unwrap_or("-"),
            t.attempts
        );
        print_failing(status, t);
        if let Some(w) = &t.waiting {
            let could = if w.workers_total == 0 {
                "no registered worker has this device".to_string()
            } else {
                let shown: Vec<String> = w
                    .workers
                    .iter()
                    .map(|x| {
                        format!(
                            "{} ({})",
                            escape_controls(&x.name),
                            escape_controls(&x.doing)
                        )
                    })
                    .collect();
                let more = w.workers_total.saturating_sub(w.workers.len() as u64);
                format!(
                    "could run on {}{}",
                    shown.join(", "),
                    if more > 0 {
                        format!(" and {more} more")
                    } else {
                        String::new()
                    }
                )
            };
            let estimate = match &w.forecast {
                Some(f) => format!("; {}", crate::text::forecast(f)),
                None => String::new(),
            };
            crate::outln!(
                "    waiting: position {} under {} ({} of the same owner and {} of others ahead); {could}{estimate}",
                w.position, w.key, w.ahead_own, w.ahead_others
            );
        }
        if !t.log_gaps.is_empty() {
            let lost: u64 = t.log_gaps.iter().map(|(a, b)| b - a + 1).sum();
            crate::outln!(
                "    {lost} log lines lost, seq {} (of {} produced; never arrived at the server)",
                describe(&t.log_gaps),
                t.log_lines_produced.unwrap_or(0)
            );
        }
    }
    let verdict = match (status.state, status.verdict) {
        (RunState::Cancelled, _) => "CANCELLED".to_string(),
        (_, Some(v)) => v.to_string(),
        (s, None) => format!("{s:?}").to_uppercase(),
    };
    crate::outln!("testrun {}: {verdict}", status.run);
}

/// "2026-11-26 13:47:14.123" (UTC) for a Unix time in ms.
pub(crate) fn datetime(ms: u64) -> String {
    crate::clock::human(ms)
}

pub(crate) fn print_history(status: &RunStatus) {
    for t in &status.tasks {
        crate::outln!("history of {} (UTC):", t.task);
        for h in &t.history {
            let state = format!("{:?}", h.state).to_lowercase();
            let mut line = format!(
                "    {}  {state:<10} attempt {}",
                datetime(h.at_ms),
                h.attempt
            );
            if let Some(w) = &h.worker {
                line.push_str(&format!("  worker {w}"));
            }
            if let Some(r) = &h.reason {
                line.push_str(&format!("  {}", escape_controls(r)));
            }
            crate::outln!("{line}");
        }
    }
}

pub(crate) async fn status(conn: &Conn, run: &str) -> Result<i32, ClientError> {
    let mut client = conn.connect().await?;
    let status = client.status(&run.to_string()).await?;
    if conn.json {
        crate::outln!(
            "{}",
            serde_json::to_string_pretty(&status).expect("status serialises")
        );
    } else {
        crate::outln!(
            "testrun {} for {} image {}: {:?}",
            status.run,
            status.device,
            status.image,
            status.state
        );
        print_summary(&status);
        print_history(&status);
        if let Some(p) = &status.pruned {
            crate::outln!(
                "result files and logs pruned at {} UTC ({} bytes): {}",
                datetime(p.at_ms),
                p.bytes,
                escape_controls(&p.reason)
            );
        }
        let interesting: Vec<String> = status
            .counters
            .iter()
            .filter(|(k, _)| {
                k.starts_with("orphan")
                    || k.contains("lost")
                    || k.contains("malformed")
                    || k.contains("version")
            })
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if !interesting.is_empty() {
            crate::outln!("server counters: {}", interesting.join(" "));
        }
    }
    Ok(
        if matches!(status.state, RunState::Finished | RunState::Cancelled) {
            verdict_exit(&status)
        } else {
            exit::PASS
        },
    )
}
