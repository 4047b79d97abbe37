//! Notifications on the scheduler's side (issue 23): a testrun's end and
//! its delivery are in the same commit, attempts leave only as outputs
//! (sent after that commit), a restart sends what was not delivered, and
//! listing follows the owner's rule.

use super::*;
use crate::notify::event::{Filter, Kind};
use crate::notify::outbox::{Notifier, Rules, TargetKind, TargetRule};
use crate::security::{Identity, Role};

fn rules() -> Rules {
    Rules {
        targets: vec![TargetRule {
            name: "ci".into(),
            kind: TargetKind::Webhook,
            filter: Filter {
                events: vec![Kind::TestrunFinished],
                ..Filter::default()
            },
            per_run_only: false,
            concurrency: 2,
        }],
        ..Rules::default()
    }
}

fn notify_jobs(out: &[Output]) -> Vec<crate::notify::outbox::Job> {
    out.iter()
        .filter_map(|o| match o {
            Output::Notify(j) => Some(j.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_testruns_end_and_its_notification_commit_together_and_survive_a_restart() {
    let mut lab = Lab::new();
    lab.s.notifier = Notifier::new(rules());
    lab.register("w", "devicegroup:g");
    let mut out = lab.submit_as("ann", &["p"], Priority::Normal);
    out.extend(lab.from("w", Body::Ready));
    let (_, spec) = super::health_tests_specs(&out)
        .into_iter()
        .find(|(x, _)| x == "w")
        .expect("dispatched");
    let _ = lab.s.take_changes();
    let run = lab.s.tasks[&spec.task].run.clone();
    // `finish` takes the outputs; the changes are still to be taken.
    let finished = lab.finish("w", &spec, 0);
    let changes = lab.s.take_changes();
    assert!(
        changes.runs.iter().any(|(id, _, _)| *id == run),
        "the run's end is in this commit"
    );
    assert_eq!(changes.notifications.len(), 1, "and so is its delivery");
    assert_eq!(changes.notifications[0].1.as_deref(), Some(run.as_str()));
    let jobs = notify_jobs(&finished);
    assert_eq!(
        jobs.len(),
        1,
        "its attempt is an output, sent after the commit"
    );
    let body: serde_json::Value = serde_json::from_str(&jobs[0].body).unwrap();
    assert_eq!(body["run"], run.as_str());
    assert_eq!(body["verdict"], "PASS");
    assert_eq!(body["owner"], "ann");

    // A crash before the answer: the restored server sends it again,
    // under the same id.
    let snap = crate::server::store::db::Snapshot {
        notifications: changes
            .notifications
            .iter()
            .map(|(id, _, body)| (id.clone(), body.clone()))
            .collect(),
        ..Default::default()
    };
    let cfg = SchedulerConfig {
        notify: rules(),
        ..SchedulerConfig::default()
    };
    let mut again = Scheduler::restore(
        cfg,
        MemoryStore::default(),
        "srv2".into(),
        &snap,
        (lab.now, unix_ms_now()),
    )
    .unwrap();
    again.on_tick(lab.now + Duration::from_secs(1));
    let resent = notify_jobs(&again.take_outputs());
    assert_eq!(resent.len(), 1);
    assert_eq!(
        (resent[0].id.as_str(), resent[0].attempt),
        (jobs[0].id.as_str(), 1)
    );
}

#[test]
fn per_run_entries_are_checked_at_submit_and_listing_follows_the_owner() {
    let mut lab = Lab::new();
    lab.s.notifier = Notifier::new(rules());
    lab.register("w", "devicegroup:g");
    let p = peer("user-ann");
    lab.s.on_authenticated(
        &p,
        Identity::User {
            name: "ann".into(),
            role: Role::Submit,
        },
        "127.0.0.1".into(),
    );
    let mut testrun = TestrunRequest {
        lease: None,
        on_lease: None,
        series: None,
        device: DeviceSpec::parse("devicegroup:g").unwrap(),
        devices: Vec::new(),
        image: "img".into(),
        packages: vec!["p".into()],
        distribution: Distribution::Default,
        timeout_secs: 60,
        options: BTreeMap::new(),
        queue_anyway: false,
        secrets: BTreeMap::new(),
        inputs: Vec::new(),
        owner: None,
        priority: Priority::Normal,
        notify: vec!["http://127.0.0.1:9/hook".into()],
    };
    lab.s.cfg.secure = true;
    lab.s.on_message(
        lab.now,
        &p,
        env(
            false,
            0,
            Body::Submit {
                request: 1,
                testrun: testrun.clone(),
            },
        ),
    );
    let refused = lab.s.take_outputs();
    assert!(
        refused.iter().any(|o| matches!(o, Output::Send { body: Body::Error { code: ErrorCode::BadRequest, message, .. }, .. } if message.contains("allow_urls"))),
        "{refused:?}"
    );
    testrun.notify = vec!["nobody".into()];
    lab.s.on_message(
        lab.now,
        &p,
        env(
            false,
            0,
            Body::Submit {
                request: 2,
                testrun,
            },
        ),
    );
    let refused = lab.s.take_outputs();
    assert!(
        refused.iter().any(|o| matches!(o, Output::Send { body: Body::Error { message, .. }, .. } if message.contains("configured: ci"))),
        "{refused:?}"
    );
    // A submit user may not resend.
    lab.s.on_message(
        lab.now,
        &p,
        env(
            false,
            0,
            Body::RetryNotification {
                request: 3,
                id: format!("msg_{}", "0".repeat(32)),
            },
        ),
    );
    let out = lab.s.take_outputs();
    assert!(
        out.iter().any(|o| matches!(
            o,
            Output::Send {
                body: Body::Error {
                    code: ErrorCode::Forbidden,
                    ..
                },
                ..
            }
        )),
        "{out:?}"
    );
    lab.s.cfg.secure = false;
}

#[test]
fn a_lost_worker_is_told_to_operator_targets_only_once() {
    let mut lab = Lab::new();
    lab.s.notifier = Notifier::new(Rules {
        targets: vec![TargetRule {
            name: "ops".into(),
            kind: TargetKind::Webhook,
            filter: Filter {
                events: vec![Kind::WorkerLost],
                ..Filter::default()
            },
            per_run_only: false,
            concurrency: 1,
        }],
        ..Rules::default()
    });
    lab.register("w1", "devicegroup:g");
    let mut jobs = Vec::new();
    for _ in 0..10 {
        lab.advance(HB);
        jobs.extend(notify_jobs(&lab.tick()));
    }
    assert_eq!(lab.s.workers["w1"].state, WorkerState::Lost);
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    let body: serde_json::Value = serde_json::from_str(&jobs[0].body).unwrap();
    assert_eq!(body["type"], "worker_lost");
    assert_eq!(body["worker"], "w1");
    assert_eq!(body["devicegroup"], "g");
}
