//! What a notification mail says: a subject that carries the verdict (so
//! a mail filter or a glance at the inbox is enough) and a plain-text
//! body, both made from the event's JSON body — the same facts a webhook
//! receives.

use serde_json::Value;

/// A mail address as lettre reads it.
pub fn check_address(a: &str) -> Result<(), String> {
    if a.len() > 254 {
        return Err("is longer than 254 bytes".into());
    }
    a.parse::<lettre::Address>()
        .map(|_| ())
        .map_err(|e| format!("is not a mail address ({e})"))
}

/// Characters a peer put into a name never reach a header unescaped.
fn plain(v: &Value) -> String {
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_string(),
        other => other.to_string(),
    };
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(200)
        .collect()
}

/// What the testrun's comparison with its series found (empty when it
/// was not compared).
fn triage_text(v: &Value) -> String {
    let t = &v["triage"];
    if !t.is_object() {
        return String::new();
    }
    let mut text = format!(
        "\nAgainst {} (series {}): {} regressions, {} fixed, {} flaky, {} device-specific, {} known issues\n",
        plain(&v["base"]),
        plain(&v["series"]),
        plain(&t["regressions"]),
        plain(&t["fixed"]),
        plain(&t["flaky"]),
        plain(&t["device_specific"]),
        plain(&t["known"])
    );
    for (key, label) in [
        ("regressions", "regression"),
        ("fixed", "fixed"),
        ("flaky", "flaky"),
        ("device_specific", "device-specific"),
        ("known", "known issue"),
    ] {
        for c in v[key].as_array().into_iter().flatten() {
            text.push_str(&format!(
                "  {label}: {} ({})",
                plain(&c["name"]),
                plain(&c["task"])
            ));
            if c["message"].is_string() {
                text.push_str(&format!(" — {}", plain(&c["message"])));
            }
            if c["last_passed"].is_string() {
                text.push_str(&format!(", last passed in {}", plain(&c["last_passed"])));
            }
            for extra in ["known", "evidence"] {
                if c[extra].is_string() {
                    text.push_str(&format!(" [{}]", plain(&c[extra])));
                }
            }
            text.push('\n');
        }
    }
    if v["triage_note"].is_string() {
        text.push_str(&format!("  note: {}\n", plain(&v["triage_note"])));
    }
    text.push_str(&format!("  (ots-submit compare {})\n", plain(&v["run"])));
    text
}

/// Subject and text of the mail for an event body.
pub fn render(body: &str) -> (String, String) {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let url = v.get("url").and_then(Value::as_str).map(str::to_string);
    match v.get("type").and_then(Value::as_str) {
        Some("testrun_finished") => {
            let verdict = match (v.get("state").and_then(Value::as_str), v.get("verdict")) {
                (Some("cancelled"), _) => "CANCELLED".to_string(),
                (_, Some(Value::String(s))) => s.clone(),
                _ => "NO VERDICT".to_string(),
            };
            let devices: Vec<String> = v
                .get("devices")
                .and_then(Value::as_array)
                .map(|a| a.iter().map(plain).collect())
                .unwrap_or_default();
            let regressions = v["triage"]["regressions"].as_u64().unwrap_or(0);
            let subject = format!(
                "[ots] {} {} on {}{}",
                plain(&v["run"]),
                verdict,
                devices.join(", "),
                match regressions {
                    0 => String::new(),
                    1 => " — 1 regression".to_string(),
                    n => format!(" — {n} regressions"),
                }
            );
            let mut text = format!(
                "Testrun {} of {} ended: {}\nImage: {}\nDevices: {}\n\n",
                plain(&v["run"]),
                plain(&v["owner"]),
                verdict,
                plain(&v["image"]),
                devices.join(", ")
            );
            for t in v
                .get("tasks")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                text.push_str(&format!(
                    "  {}  {}  {}  ({} log lines stored, {} lost; {} result files)\n      {}\n",
                    plain(&t["task"]),
                    plain(&t["verdict"]),
                    plain(&t["device"]),
                    plain(&t["log_lines_stored"]),
                    plain(&t["log_lines_lost"]),
                    t["files"].as_array().map_or(0, Vec::len),
                    plain(&t["reason"]),
                ));
                for c in t["failing"].as_array().into_iter().flatten() {
                    text.push_str(&format!(
                        "      {}: {}{}\n",
                        plain(&c["status"]),
                        plain(&c["name"]),
                        c.get("message")
                            .filter(|m| m.is_string())
                            .map(|m| format!(" — {}", plain(m)))
                            .unwrap_or_default()
                    ));
                }
                let failing = t["cases"]["failures"].as_u64().unwrap_or(0)
                    + t["cases"]["errors"].as_u64().unwrap_or(0);
                let shown = t["failing"].as_array().map_or(0, Vec::len) as u64;
                if failing > shown {
                    text.push_str(&format!(
                        "      … and {} more failing (ots-submit cases {} --failed)\n",
                        failing - shown,
                        plain(&v["run"])
                    ));
                }
            }
            if let Some(n) = v.get("tasks_omitted").and_then(Value::as_u64) {
                text.push_str(&format!("  … and {n} more tasks (ots-submit status)\n"));
            }
            text.push_str(&triage_text(&v));
            if let Some(u) = url {
                text.push_str(&format!("\n{u}\n"));
            }
            (subject, text)
        }
        Some(kind @ ("worker_health_changed" | "worker_lost")) => {
            let worker = plain(&v["worker"]);
            let subject = if kind == "worker_lost" {
                format!("[ots] worker {worker} lost")
            } else {
                format!("[ots] worker {worker} is {}", plain(&v["to"]))
            };
            let mut text = if kind == "worker_lost" {
                format!(
                    "Worker {worker} ({}) stopped answering: {}\n",
                    plain(&v["devicegroup"]),
                    plain(&v["reason"])
                )
            } else {
                format!(
                    "Worker {worker} ({}) went from {} to {}: {}\n",
                    plain(&v["devicegroup"]),
                    plain(&v["from"]),
                    plain(&v["to"]),
                    plain(&v["reason"])
                )
            };
            if let Some(u) = url {
                text.push_str(&format!("\n{u}\n"));
            }
            (subject, text)
        }
        _ => ("[ots] notification".to_string(), body.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verdict_is_in_the_subject_and_names_are_defanged() {
        let body = serde_json::json!({
            "type": "testrun_finished", "run": "r7", "owner": "ann", "state": "finished",
            "verdict": "FAIL", "devices": ["devicegroup:n900"], "image": "img",
            "tasks": [{"task": "r7.1", "verdict": "FAIL", "device": "w1\r\nBcc: x", "reason": "exit 1",
                       "log_lines_stored": 3, "log_lines_lost": 0, "files": [],
                       "cases": {"cases": 9, "failures": 2, "errors": 1, "skipped": 0},
                       "failing": [{"name": "net::dhcp", "status": "fail", "message": "no lease\r\nX"}]}],
            "url": "https://ots.lab/runs/r7"
        })
        .to_string();
        let (subject, text) = render(&body);
        assert_eq!(subject, "[ots] r7 FAIL on devicegroup:n900");
        assert!(text.contains("r7.1  FAIL  w1??Bcc: x"));
        assert!(
            text.contains("      fail: net::dhcp — no lease??X\n"),
            "{text}"
        );
        assert!(
            text.contains("… and 2 more failing (ots-submit cases r7 --failed)"),
            "{text}"
        );
        assert!(text.ends_with("https://ots.lab/runs/r7\n"));
        let (s, _) = render(
            &serde_json::json!({"type": "worker_health_changed", "worker": "w1", "to": "bad"})
                .to_string(),
        );
        assert_eq!(s, "[ots] worker w1 is bad");
    }

    #[test]
    fn a_compared_testrun_names_its_regressions_in_subject_and_text() {
        let body = serde_json::json!({
            "type": "testrun_finished", "run": "r9", "state": "finished", "verdict": "FAIL",
            "devices": ["devicegroup:g"], "tasks": [], "series": "nightly", "base": "r8",
            "regressions": [{"name": "net::dhcp", "task": "r9.1", "message": "no lease", "last_passed": "r8"}],
            "flaky": [{"name": "ui::tap", "task": "r9.1", "evidence": "passed 3 and failed 1 times on image i"}],
            "triage": {"regressions": 1, "fixed": 0, "flaky": 1, "device_specific": 0, "known": 0},
        })
        .to_string();
        let (subject, text) = render(&body);
        assert_eq!(subject, "[ots] r9 FAIL on devicegroup:g — 1 regression");
        assert!(
            text.contains("  regression: net::dhcp (r9.1) — no lease, last passed in r8\n"),
            "{text}"
        );
        assert!(
            text.contains("  flaky: ui::tap (r9.1) [passed 3 and failed 1 times on image i]"),
            "{text}"
        );
        assert!(
            text.contains("Against r8 (series nightly): 1 regressions"),
            "{text}"
        );
    }
}
