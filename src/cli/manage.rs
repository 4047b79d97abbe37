//! The commands that act on the lab or ask about it: cancel, drain,
//! health, notifications, leader, web, audit, whoami.

use crate::cli::conn::Conn;
use crate::cli::lists::now_ms;
use crate::cli::run::datetime;
use crate::client::{exit, Client, ClientError};
use crate::protocol::{HealthAction, RunState};
use crate::text::{ago_short as ago, escape_controls};

pub(crate) async fn cancel(conn: &Conn, run: &str) -> Result<i32, ClientError> {
    let mut client = conn.connect().await?;
    let before = client.status(&run.to_string()).await?;
    if matches!(before.state, RunState::Finished | RunState::Cancelled) {
        let how = match (before.state, before.verdict) {
            (RunState::Cancelled, _) => "was already cancelled".to_string(),
            (_, Some(v)) => format!("already finished with verdict {v}"),
            _ => "already finished".to_string(),
        };
        if conn.json {
            crate::outln!(
                "{}",
                serde_json::to_string(&before).expect("status serialises")
            );
        } else {
            crate::outln!("testrun {run} {how}; nothing to cancel");
        }
        return Ok(exit::PASS);
    }
    let status = client.cancel(&run.to_string()).await?;
    if conn.json {
        crate::outln!(
            "{}",
            serde_json::to_string(&status).expect("status serialises")
        );
    } else {
        let queued = before
            .tasks
            .iter()
            .filter(|t| t.state == crate::protocol::TaskState::Queued)
            .count();
        let running = before
            .tasks
            .iter()
            .filter(|t| !t.state.is_final() && t.state != crate::protocol::TaskState::Queued)
            .count();
        crate::outln!(
            "cancel requested for {}: {queued} queued task(s) cancelled, {running} running task(s) being stopped",
            status.run
        );
    }
    Ok(exit::PASS)
}

pub(crate) async fn drain(conn: &Conn, worker: &str, drain: bool) -> Result<i32, ClientError> {
    let mut client = conn.connect().await?;
    let w = client.drain(worker, drain).await?;
    if conn.json {
        crate::outln!(
            "{}",
            serde_json::to_string_pretty(&w).expect("worker serialises")
        );
    } else if drain {
        crate::outln!(
            "worker {} drained: {}",
            w.name,
            match &w.task {
                Some(t) => format!("it finishes task {t}, then takes no new one"),
                None => "it takes no new task".into(),
            }
        );
    } else {
        crate::outln!("worker {} takes tasks again", w.name);
    }
    Ok(exit::PASS)
}

pub(crate) fn delivery_line(d: &crate::protocol::NotificationInfo) -> String {
    let next = match d.next_ms {
        Some(ms) if d.state == "pending" => {
            let now = crate::protocol::limits::unix_ms_now();
            if ms <= now {
                "now".to_string()
            } else {
                format!("in {}", ago(ms - now))
            }
        }
        _ => "-".to_string(),
    };
    format!(
        "{:<36} {:<21} {:<7} {:<9} {:>8} {:<24} {:<10} {}",
        d.id,
        serde_json::to_value(d.event)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        d.run.as_deref().unwrap_or("-"),
        d.state,
        d.attempts,
        escape_controls(d.last.as_deref().unwrap_or("-"))
            .chars()
            .take(24)
            .collect::<String>(),
        next,
        escape_controls(&d.target)
    )
}

pub(crate) async fn notifications(
    conn: &Conn,
    run: Option<&str>,
    failed: bool,
) -> Result<i32, ClientError> {
    let mut client = conn.connect().await?;
    let (deliveries, targets) = client.notifications(run, failed).await?;
    if conn.json {
        let v = serde_json::json!({ "deliveries": deliveries, "targets": targets });
        crate::outln!(
            "{}",
            serde_json::to_string_pretty(&v).expect("notifications serialise")
        );
        return Ok(exit::PASS);
    }
    if !targets.is_empty() {
        crate::outln!(
            "{:<20} {:<8} {:>7} {:>9} {:>8}  {:<20} LAST ERROR",
            "TARGET",
            "KIND",
            "PENDING",
            "IN FLIGHT",
            "FAILURES",
            "FAILING SINCE"
        );
        for t in &targets {
            let since = match t.failing_since_ms {
                Some(ms) => format!(
                    "{}{}",
                    ago(crate::protocol::limits::unix_ms_now().saturating_sub(ms)),
                    if t.alert { " ago ALERT" } else { " ago" }
                ),
                None => "-".into(),
            };
            crate::outln!(
                "{:<20} {:<8} {:>7} {:>9} {:>8}  {:<20} {}",
                t.name,
                t.kind,
                t.pending,
                t.in_flight,
                t.failures,
                since,
                escape_controls(t.last_error.as_deref().unwrap_or("-"))
            );
        }
        crate::outln!();
    }
    if deliveries.is_empty() {
        crate::outln!(
            "no {}notifications{}",
            if failed { "failed " } else { "" },
            run.map(|r| format!(" for {r}")).unwrap_or_default()
        );
    } else {
        crate::outln!(
            "{:<36} {:<21} {:<7} {:<9} {:>8} {:<24} {:<10} TARGET",
            "ID",
            "EVENT",
            "RUN",
            "STATE",
            "ATTEMPTS",
            "LAST",
            "NEXT"
        );
        for d in &deliveries {
            crate::outln!("{}", delivery_line(d));
        }
    }
    Ok(exit::PASS)
}

pub(crate) async fn notify_retry(conn: &Conn, id: &str) -> Result<i32, ClientError> {
    let mut client = conn.connect().await?;
    let d = client.retry_notification(id).await?;
    if conn.json {
        crate::outln!(
            "{}",
            serde_json::to_string_pretty(&d).expect("notification serialises")
        );
    } else {
        crate::outln!(
            "notification {} to {} is sent again now (attempt {})",
            d.id,
            escape_controls(&d.target),
            d.attempts + 1
        );
    }
    Ok(exit::PASS)
}

/// What one endpoint answered `leader`.
#[derive(serde::Serialize)]
pub(crate) struct Standing {
    endpoint: String,
    /// `leader` (it answered), `no answer` or `refused`.
    state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    server: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lease: Option<crate::protocol::LeaseInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

pub(crate) async fn leader(conn: &Conn) -> Result<i32, ClientError> {
    let credentials = conn.credentials()?;
    let endpoints = crate::settings::endpoints(&conn.server);
    if endpoints.is_empty() || endpoints.len() > 16 {
        crate::errln!(
            "ots-submit: --server {:?} (or OTS_SERVER): give 1 to 16 endpoints, comma-separated",
            conn.server
        );
        return Ok(exit::USAGE);
    }
    let asked = endpoints.iter().map(|ep| {
        let credentials = credentials.clone();
        async move {
            match Client::connect_fail_fast(ep, conn.connect_timeout, &credentials).await {
                Ok(c) => {
                    let (server, lease) = c.leader();
                    Standing {
                        endpoint: ep.clone(),
                        state: "leader",
                        server: Some(server.to_string()),
                        lease: lease.cloned(),
                        error: None,
                    }
                }
                // A standby's own words (the endpoint is printed already).
                Err(ClientError::Refused {
                    code: crate::protocol::ErrorCode::NotLeader,
                    message,
                }) => Standing {
                    endpoint: ep.clone(),
                    state: "standby",
                    server: None,
                    lease: None,
                    error: Some(
                        message
                            .strip_prefix(&format!("{ep}: "))
                            .unwrap_or(&message)
                            .to_string(),
                    ),
                },
                Err(e) => Standing {
                    endpoint: ep.clone(),
                    state: if matches!(
                        e,
                        ClientError::Unreachable { .. } | ClientError::ConnectionRefused { .. }
                    ) {
                        "no answer"
                    } else {
                        "refused"
                    },
                    server: None,
                    lease: None,
                    error: Some(e.to_string()),
                },
            }
        }
    });
    let standings = futures::future::join_all(asked).await;
    let leaders = standings.iter().filter(|s| s.state == "leader").count();
    if conn.json {
        crate::outln!(
            "{}",
            serde_json::to_string_pretty(&standings).expect("standings serialise")
        );
    } else {
        let now = now_ms();
        for s in &standings {
            let what = match (&s.lease, &s.server, &s.error) {
                (Some(l), Some(server), _) => format!(
                    "leader  epoch {}  since {} ({} ago)  server {}",
                    l.epoch,
                    crate::clock::iso(l.since_ms),
                    ago(now.saturating_sub(l.since_ms)),
                    escape_controls(server)
                ),
                (None, Some(server), _) => format!(
                    "serving alone (state in SQLite, no lease)  server {}",
                    escape_controls(server)
                ),
                (_, None, Some(e)) if s.state == "no answer" => {
                    format!("no answer: down or unreachable ({})", escape_controls(e))
                }
                (_, None, Some(e)) if s.state == "standby" => escape_controls(e).to_string(),
                (_, _, e) => format!("refused: {}", escape_controls(e.as_deref().unwrap_or("?"))),
            };
            crate::outln!("{}  {what}", s.endpoint);
        }
    }
    Ok(if leaders > 0 {
        exit::PASS
    } else {
        exit::UNREACHABLE
    })
}

pub(crate) async fn web(conn: &Conn) -> Result<i32, ClientError> {
    let mut client = conn.connect().await?;
    let (url, expires_ms) = client.web_login().await?;
    if conn.json {
        let v = serde_json::json!({ "url": url, "expires_ms": expires_ms });
        crate::outln!("{v}");
        return Ok(exit::PASS);
    }
    if let Some(browser) = std::env::var_os("BROWSER").filter(|b| !b.is_empty()) {
        // Like xdg-open: the browser gets the link as its argument; it is
        // not waited for (it may stay open for the whole session).
        match std::process::Command::new(&browser)
            .arg(&url)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
        {
            Ok(_) => crate::errln!("opened with $BROWSER ({})", browser.to_string_lossy()),
            Err(e) => crate::errln!(
                "could not start $BROWSER ({}): {e}; open the link yourself",
                browser.to_string_lossy()
            ),
        }
    }
    crate::errln!(
        "open this link within 60 s (it works once; until {} UTC):",
        datetime(expires_ms)
    );
    crate::outln!("{url}");
    Ok(exit::PASS)
}

pub(crate) async fn health(
    conn: &Conn,
    worker: &str,
    action: Option<HealthAction>,
    reason: &str,
) -> Result<i32, ClientError> {
    let mut client = conn.connect().await?;
    let (w, history) = client.worker_health(worker, action, reason).await?;
    if conn.json {
        let v = serde_json::json!({ "worker": w, "history": history });
        crate::outln!(
            "{}",
            serde_json::to_string_pretty(&v).expect("report serialises")
        );
        return Ok(exit::PASS);
    }
    match action {
        Some(HealthAction::Check) => crate::outln!(
            "health check of {} queued: it runs before any other task",
            w.name
        ),
        Some(_) => crate::outln!("worker {} is now {}", w.name, w.health),
        None => {}
    }
    crate::outln!(
        "{}: {} since {} UTC: {}",
        w.name,
        w.health,
        datetime(w.health_since_ms),
        escape_controls(&w.health_reason)
    );
    if w.drained {
        crate::outln!(
            "drained (it stays drained whatever its health: ots-submit undrain {})",
            w.name
        );
    }
    if action.is_none() {
        crate::outln!("history (oldest first):");
        for c in &history {
            let what = if c.from == c.to {
                format!("{}", c.to)
            } else {
                format!("{} -> {}", c.from, c.to)
            };
            crate::outln!(
                "  {} UTC  {:<24} {}",
                datetime(c.at_ms),
                what,
                escape_controls(&c.reason)
            );
        }
    }
    Ok(exit::PASS)
}

pub(crate) async fn audit(conn: &Conn) -> Result<i32, ClientError> {
    let mut client = conn.connect().await?;
    let text = client.audit().await?;
    let text = String::from_utf8_lossy(&text);
    if conn.json {
        // One document, as every list prints: the entries, oldest first
        // (a line the server could not have written is kept as text).
        let entries: Vec<serde_json::Value> = text
            .lines()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|_| serde_json::Value::String(l.to_string()))
            })
            .collect();
        crate::outln!("{}", serde_json::Value::Array(entries));
        return Ok(exit::PASS);
    }
    // For people: the date, who, from where, what.
    for line in text.lines() {
        match serde_json::from_str::<serde_json::Value>(line) {
            Ok(v) => crate::outln!(
                "{} UTC  {:<24} {:<22} {:<10} {}",
                datetime(v["at_ms"].as_u64().unwrap_or(0)),
                escape_controls(v["identity"].as_str().unwrap_or("-")),
                escape_controls(v["address"].as_str().unwrap_or("-")),
                escape_controls(v["event"].as_str().unwrap_or("-")),
                escape_controls(v["detail"].as_str().unwrap_or(""))
            ),
            Err(_) => crate::outln!("{}", escape_controls(line)),
        }
    }
    Ok(exit::PASS)
}

pub(crate) async fn whoami(conn: &Conn) -> Result<i32, ClientError> {
    let client = conn.connect().await?;
    if conn.json {
        let who = match client.identity() {
            Some(crate::security::Identity::User { name, role }) => {
                serde_json::json!({"kind": "user", "name": name, "role": role.as_str()})
            }
            Some(crate::security::Identity::Worker { name, .. }) => {
                serde_json::json!({"kind": "worker", "name": name})
            }
            None => serde_json::json!({"kind": "anonymous"}),
        };
        crate::outln!("{who}");
        return Ok(exit::PASS);
    }
    match client.identity() {
        Some(crate::security::Identity::User { name, role }) => {
            crate::outln!("user {name}, role {}", role.as_str())
        }
        Some(crate::security::Identity::Worker { name, .. }) => crate::outln!("worker {name}"),
        None => crate::outln!("anonymous (the server runs with security = \"none\")"),
    }
    Ok(exit::PASS)
}
