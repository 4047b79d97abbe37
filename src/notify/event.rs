//! What a notification says: the events, their JSON (a stable schema,
//! README "Notifications"), the `webhook-id` of an event at a target,
//! and which targets an event goes to.

use crate::protocol::results::{CaseChange, Comparison};
use crate::protocol::{DeviceSpec, Health, RunState, RunStatus, Verdict};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The events a target may ask for (wire data: `notifications` lists
/// them, so the type lives in the protocol).
pub use crate::protocol::NotifyEventKind as Kind;

/// One event, with what the filters look at.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub kind: Kind,
    /// Unique on this server: `testrun_finished/r12`, `worker_lost/w1/…`.
    pub key: String,
    pub owner: Option<String>,
    pub devicegroups: Vec<String>,
    pub verdict: Option<Verdict>,
    /// `testrun_finished`: its regressions against its series (none: not
    /// triaged — no test cases, or the database could not say).
    pub regressions: Option<u64>,
    /// The body sent (JSON).
    pub body: serde_json::Value,
}

/// A target's filters: an empty list lets everything through.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Filter {
    pub events: Vec<Kind>,
    pub owners: Vec<String>,
    pub devicegroups: Vec<String>,
    pub verdicts: Vec<Verdict>,
    /// Of `testrun_finished` events, only those with at least one
    /// regression (other events are not affected).
    pub only_regressions: bool,
}

impl Filter {
    pub fn matches(&self, e: &Event) -> bool {
        (self.events.is_empty() || self.events.contains(&e.kind))
            && (self.owners.is_empty() || e.owner.as_ref().is_some_and(|o| self.owners.contains(o)))
            && (self.devicegroups.is_empty()
                || e.devicegroups.iter().any(|g| self.devicegroups.contains(g)))
            && (self.verdicts.is_empty() || e.verdict.is_some_and(|v| self.verdicts.contains(&v)))
            && (!self.only_regressions
                || e.kind != Kind::TestrunFinished
                || e.regressions.is_some_and(|n| n > 0))
    }
}

/// The `webhook-id` of `event` at `target`: the same on every attempt and
/// after a restart, different per target (`msg_` and 32 hex digits).
pub fn webhook_id(event_key: &str, target: &str) -> String {
    let mut h = Sha256::new();
    h.update(event_key.as_bytes());
    h.update([0]);
    h.update(target.as_bytes());
    format!("msg_{}", hex::encode(&h.finalize()[..16]))
}

/// `testrun_finished`: once per testrun, never per task.
pub fn testrun_finished(
    status: &RunStatus,
    owner: Option<&str>,
    devices: &[DeviceSpec],
    dashboard: Option<&str>,
    at_ms: u64,
    max_bytes: usize,
    triage: Option<&Comparison>,
) -> Event {
    let triaged = triage.map(|c| triage_json(c, max_bytes / 2));
    let mut tasks: Vec<serde_json::Value> = status
        .tasks
        .iter()
        .map(|t| {
            let lost: u64 = t
                .log_gaps
                .iter()
                .map(|(a, b)| b.saturating_sub(*a).saturating_add(1))
                .fold(0, u64::saturating_add);
            serde_json::json!({
                "task": t.task,
                "packages": t.packages,
                "device": t.device,
                "worker": t.worker,
                "attempts": t.attempts,
                "verdict": t.verdict,
                "reason": t.reason,
                "log_lines_stored": t.log_lines_stored,
                "log_lines_lost": lost,
                "cases": t.cases,
                "failing": t.failing,
                "files": t.files.iter().map(|f| serde_json::json!({"name": f.name, "size": f.size, "sha256": f.sha256})).collect::<Vec<_>>(),
            })
        })
        .collect();
    // Bounded: past `max_bytes` the first tasks that fit are listed and
    // `tasks_omitted` says how many were left out.
    let mut omitted = 0usize;
    let sizes: Vec<usize> = tasks.iter().map(|t| t.to_string().len() + 1).collect();
    let room = max_bytes
        .saturating_sub(2048)
        .saturating_sub(triaged.as_ref().map_or(0, |t| t.to_string().len()));
    if sizes.iter().sum::<usize>() > room {
        let mut used = 0;
        let keep = sizes
            .iter()
            .take_while(|s| {
                used += **s;
                used <= room
            })
            .count();
        omitted = tasks.len() - keep;
        tasks.truncate(keep);
    }
    let mut body = serde_json::json!({
        "type": "testrun_finished",
        "at_ms": at_ms,
        "run": status.run,
        "owner": owner,
        "devices": devices.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
        "image": status.image,
        "state": status.state,
        "verdict": status.verdict,
        "tasks": tasks,
        "url": dashboard.map(|d| format!("{}/runs/{}", d.trim_end_matches('/'), status.run)),
    });
    if omitted > 0 {
        body["tasks_omitted"] = omitted.into();
    }
    if let (Some(serde_json::Value::Object(fields)), Some(map)) = (triaged, body.as_object_mut()) {
        map.extend(fields);
    }
    Event {
        kind: Kind::TestrunFinished,
        key: format!("testrun_finished/{}", status.run),
        owner: owner.map(str::to_string),
        devicegroups: devices.iter().map(|d| d.devicegroup.clone()).collect(),
        verdict: match status.state {
            RunState::Cancelled => None,
            _ => status.verdict,
        },
        regressions: triage.map(|c| c.totals.regressions),
        body,
    }
}

/// Cases each triage list of an event names at most, and the bytes of a
/// message shown.
const EVENT_CASES: usize = 10;
const EVENT_MESSAGE_BYTES: usize = 200;

/// The triage fields of `testrun_finished`: `series`, `base`,
/// `regressions`, `fixed`, `flaky`, `device_specific`, `known` (each the
/// first cases, the totals say how many), `triage` (the totals) and
/// `triage_note`; within `room` bytes (lists shortened to fit).
fn triage_json(c: &Comparison, room: usize) -> serde_json::Value {
    let list = |cases: &[CaseChange], n: usize| -> Vec<serde_json::Value> {
        cases
            .iter()
            .take(n)
            .map(|x| {
                serde_json::json!({
                    "name": x.name,
                    "task": x.task,
                    "status": x.status,
                    "worker": x.worker,
                    "message": x.message.as_deref().map(|m| crate::text::clip_bytes(m, EVENT_MESSAGE_BYTES)),
                    "last_passed": x.last_passed,
                    "evidence": x.evidence,
                    "known": x.known,
                })
            })
            .collect()
    };
    let mut n = EVENT_CASES;
    loop {
        let v = serde_json::json!({
            "series": c.series,
            "base": c.base,
            "regressions": list(&c.regressions, n),
            "fixed": list(&c.fixed, n),
            "flaky": list(&c.flaky, n),
            "device_specific": list(&c.device_specific, n),
            "known": list(&c.known, n),
            "triage": c.totals,
            "triage_note": c.note,
        });
        if n == 0 || v.to_string().len() <= room {
            return v;
        }
        n /= 2;
    }
}

/// `worker_health_changed` (operator targets only).
pub fn worker_health_changed(
    worker: &str,
    devicegroup: &str,
    from: Health,
    to: Health,
    reason: &str,
    at_ms: u64,
    dashboard: Option<&str>,
) -> Event {
    Event {
        kind: Kind::WorkerHealthChanged,
        key: format!("worker_health_changed/{worker}/{at_ms}/{}", to.as_str()),
        owner: None,
        devicegroups: vec![devicegroup.to_string()],
        verdict: None,
        regressions: None,
        body: serde_json::json!({
            "type": "worker_health_changed",
            "at_ms": at_ms,
            "worker": worker,
            "devicegroup": devicegroup,
            "from": from.as_str(),
            "to": to.as_str(),
            "reason": reason,
            "url": dashboard.map(|d| format!("{}/workers/{worker}", d.trim_end_matches('/'))),
        }),
    }
}

/// `worker_lost` (operator targets only): it stopped answering.
pub fn worker_lost(
    worker: &str,
    devicegroup: &str,
    reason: &str,
    task: Option<&str>,
    at_ms: u64,
    dashboard: Option<&str>,
) -> Event {
    Event {
        kind: Kind::WorkerLost,
        key: format!("worker_lost/{worker}/{at_ms}"),
        owner: None,
        devicegroups: vec![devicegroup.to_string()],
        verdict: None,
        regressions: None,
        body: serde_json::json!({
            "type": "worker_lost",
            "at_ms": at_ms,
            "worker": worker,
            "devicegroup": devicegroup,
            "reason": reason,
            "task": task,
            "url": dashboard.map(|d| format!("{}/workers/{worker}", d.trim_end_matches('/'))),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{TaskState, TaskStatus};
    use std::collections::BTreeMap;

    fn status() -> RunStatus {
        let task = |n: u32, verdict| TaskStatus {
            task: format!("r7.{n}"),
            packages: vec![format!("p{n}")],
            state: TaskState::Finished,
            worker: Some("w1".into()),
            attempts: 1,
            verdict: Some(verdict),
            reason: Some("why".into()),
            cases: None,
            log_lines_stored: 10,
            log_lines_produced: Some(12),
            log_gaps: vec![(3, 4)],
            files: vec![],
            history: vec![],
            waiting: None,
            device: None,
            failing: vec![],
        };
        RunStatus {
            run: "r7".into(),
            state: RunState::Finished,
            verdict: Some(Verdict::Fail),
            device: DeviceSpec::parse("devicegroup:n900").unwrap(),
            image: "img".into(),
            series: None,
            tasks: vec![task(1, Verdict::Pass), task(2, Verdict::Fail)],
            counters: BTreeMap::new(),
            pruned: None,
        }
    }

    #[test]
    fn a_finished_testrun_is_one_event_with_every_task() {
        let s = status();
        let e = testrun_finished(
            &s,
            Some("ann"),
            std::slice::from_ref(&s.device),
            Some("https://ots.lab/"),
            5,
            1 << 20,
            None,
        );
        assert_eq!(e.body["type"], "testrun_finished");
        assert_eq!(e.body["verdict"], "FAIL");
        assert_eq!(e.body["tasks"].as_array().unwrap().len(), 2);
        assert_eq!(e.body["tasks"][1]["verdict"], "FAIL");
        assert_eq!(e.body["tasks"][0]["log_lines_lost"], 2);
        assert_eq!(e.body["url"], "https://ots.lab/runs/r7");
        assert_eq!(e.key, "testrun_finished/r7");
    }

    #[test]
    fn filters_and_ids() {
        let s = status();
        let e = testrun_finished(
            &s,
            Some("ann"),
            std::slice::from_ref(&s.device),
            None,
            5,
            1 << 20,
            None,
        );
        assert!(Filter::default().matches(&e));
        let f = |toml: &str| -> Filter { toml_like(toml) };
        assert!(f(r#"{"events":["testrun_finished"],"owners":["ann"]}"#).matches(&e));
        assert!(!f(r#"{"owners":["bob"]}"#).matches(&e));
        assert!(!f(r#"{"events":["worker_lost"]}"#).matches(&e));
        assert!(f(r#"{"devicegroups":["n900"],"verdicts":["FAIL"]}"#).matches(&e));
        assert!(!f(r#"{"verdicts":["PASS"]}"#).matches(&e));
        let a = webhook_id(&e.key, "ci");
        assert_eq!(a, webhook_id(&e.key, "ci"));
        assert_ne!(a, webhook_id(&e.key, "chat"));
        assert!(a.starts_with("msg_") && a.len() == 36);
    }

    #[test]
    fn a_body_past_its_bound_lists_the_first_tasks_and_counts_the_rest() {
        let mut s = status();
        let t = s.tasks[0].clone();
        s.tasks = (0..200).map(|_| t.clone()).collect();
        let e = testrun_finished(
            &s,
            None,
            std::slice::from_ref(&s.device),
            None,
            5,
            8192,
            None,
        );
        assert!(e.body.to_string().len() <= 8192);
        let listed = e.body["tasks"].as_array().unwrap().len();
        assert!(listed > 0 && listed < 200);
        assert_eq!(e.body["tasks_omitted"], 200 - listed);
    }

    fn toml_like(json: &str) -> Filter {
        serde_json::from_str(json).unwrap()
    }
}
