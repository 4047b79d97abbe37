//! What the dashboard asks of the scheduler (issue 22): the log's tail,
//! the runs list's filters and pages, a worker's recent tasks, sign-in
//! links — each under the same rules as any client's request.

use super::*;
use crate::security::{Identity, Role};

impl Lab {
    /// Asks `body` as `user` with `role` (security on for the request).
    fn ask_as(&mut self, user: &str, role: Role, body: Body) -> Body {
        let p = peer(&format!("web-{user}"));
        self.s.on_authenticated(
            &p,
            Identity::User {
                name: user.into(),
                role,
            },
            "web:127.0.0.1".into(),
        );
        self.s.cfg.secure = true;
        self.s.on_message(self.now, &p, env(false, 0, body));
        let out = self.outputs();
        self.s.cfg.secure = false;
        self.s.on_peer_closed(self.now, &p);
        out.into_iter()
            .find_map(|o| match o {
                Output::Send { peer: to, body, .. } if to == p => Some(body),
                _ => None,
            })
            .expect("an answer")
    }

    /// A finished, passing task of `user`'s on worker `w`.
    fn passed_run_of(&mut self, user: &str, w: &str) -> (RunId, TaskId) {
        let mut out = self.submit_as(user, &["p"], Priority::Normal);
        out.extend(self.from(w, Body::Ready));
        let (_, spec) = super::health_tests_specs(&out)
            .into_iter()
            .find(|(x, _)| x == w)
            .expect("dispatched");
        self.finish(w, &spec, 0);
        let run = self.s.tasks[&spec.task].run.clone();
        (run, spec.task)
    }
}

fn forbidden(b: &Body) -> bool {
    matches!(
        b,
        Body::Error {
            code: ErrorCode::Forbidden,
            ..
        }
    )
}

#[test]
fn the_log_tail_is_read_under_the_owners_rule() {
    let mut lab = Lab::new();
    lab.register("w", "devicegroup:g");
    let (_, task) = lab.passed_run_of("ann", "w");
    lab.s
        .store
        .append_log(
            &task,
            &[
                LogLine {
                    seq: 1,
                    stream: Stream::Stdout,
                    text: "one".into(),
                },
                LogLine {
                    seq: 2,
                    stream: Stream::Serial,
                    text: "two".into(),
                },
            ],
        )
        .unwrap();
    let tail = |lab: &mut Lab, user: &str, role: Role, max: u64| {
        lab.ask_as(
            user,
            role,
            Body::GetLogTail {
                request: 7,
                task: task.clone(),
                max,
            },
        )
    };
    // Its owner reads the last bytes and where they start.
    match tail(&mut lab, "ann", Role::Submit, 16) {
        Body::Data {
            request,
            offset,
            eof,
        } => {
            assert_eq!((request, eof), (7, true));
            let all = lab.s.store.logs[&task].clone();
            assert_eq!(offset, all.len() as u64 - 16);
        }
        other => panic!("{other:?}"),
    }
    // Another submit user is refused; an operator is not.
    assert!(forbidden(&tail(&mut lab, "bob", Role::Submit, 16)));
    assert!(matches!(
        tail(&mut lab, "ops", Role::Operator, 1 << 40),
        Body::Data { offset: 0, .. }
    ));
    // An unknown task is an error, not an empty log.
    let unknown = lab.ask_as(
        "ops",
        Role::Operator,
        Body::GetLogTail {
            request: 8,
            task: "r99.1".into(),
            max: 10,
        },
    );
    assert!(matches!(
        unknown,
        Body::Error {
            code: ErrorCode::UnknownTask,
            ..
        }
    ));
}

#[test]
fn runs_are_filtered_by_verdict_and_group_and_paged() {
    let mut lab = Lab::new();
    lab.register("w", "devicegroup:g");
    let mut runs = Vec::new();
    for _ in 0..5 {
        runs.push(lab.passed_run_of("ann", "w").0);
    }
    let (bob_run, _) = lab.passed_run_of("bob", "w");
    let list =
        |lab: &mut Lab, user: &str, role: Role, verdict, group: Option<&str>, before, limit| {
            match lab.ask_as(
                user,
                role,
                Body::ListRuns {
                    request: 1,
                    state: None,
                    owner: None,
                    limit,
                    verdict,
                    devicegroup: group.map(str::to_string),
                    before,
                },
            ) {
                Body::Runs { runs, .. } => runs.into_iter().map(|r| r.run).collect::<Vec<_>>(),
                other => panic!("{other:?}"),
            }
        };
    // Newest first; a submit user sees its own only.
    let ann = list(&mut lab, "ann", Role::Submit, None, None, None, 100);
    assert_eq!(ann, runs.iter().rev().cloned().collect::<Vec<_>>());
    assert!(!ann.contains(&bob_run));
    // Pages: two at a time, each below the last one shown.
    let page1 = list(&mut lab, "ann", Role::Submit, None, None, None, 2);
    let n: u64 = page1[1][1..].parse().unwrap();
    let page2 = list(&mut lab, "ann", Role::Submit, None, None, Some(n), 2);
    assert_eq!(page2, vec![runs[2].clone(), runs[1].clone()]);
    // Filters.
    assert_eq!(
        list(
            &mut lab,
            "ops",
            Role::Operator,
            Some(Verdict::Fail),
            None,
            None,
            100
        ),
        Vec::<String>::new()
    );
    assert_eq!(
        list(
            &mut lab,
            "ops",
            Role::Operator,
            Some(Verdict::Pass),
            Some("g"),
            None,
            100
        )
        .len(),
        6
    );
    assert!(list(
        &mut lab,
        "ops",
        Role::Operator,
        None,
        Some("other"),
        None,
        100
    )
    .is_empty());
}

#[test]
fn a_workers_recent_tasks_show_only_a_submit_users_own() {
    let mut lab = Lab::new();
    lab.register("w", "devicegroup:g");
    let (_, ann_task) = lab.passed_run_of("ann", "w");
    let (_, bob_task) = lab.passed_run_of("bob", "w");
    let recent = |lab: &mut Lab, user: &str, role: Role| match lab.ask_as(
        user,
        role,
        Body::WorkerHealth {
            request: 1,
            worker: "w".into(),
            action: None,
            reason: String::new(),
        },
    ) {
        Body::HealthReport { recent, .. } => recent.into_iter().map(|t| t.task).collect::<Vec<_>>(),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        recent(&mut lab, "ops", Role::Operator),
        vec![bob_task.clone(), ann_task.clone()]
    );
    assert_eq!(
        recent(&mut lab, "ann", Role::Submit),
        vec![ann_task.clone()]
    );
    // Kept in the worker's row: a restart keeps them.
    super::crash_and_restart(&mut lab);
    lab.register("w", "devicegroup:g");
    assert_eq!(
        recent(&mut lab, "ops", Role::Operator),
        vec![bob_task, ann_task]
    );
}

#[test]
fn a_web_login_is_handed_to_the_shell_only_when_the_dashboard_is_served() {
    let mut lab = Lab::new();
    let off = lab.ask_as("ann", Role::Submit, Body::WebLogin { request: 3 });
    match off {
        Body::Error {
            code: ErrorCode::BadRequest,
            message,
            ..
        } => assert!(message.contains("web = "), "{message}"),
        other => panic!("{other:?}"),
    }
    lab.s.cfg.web = true;
    let p = peer("web-ann");
    lab.s.on_authenticated(
        &p,
        Identity::User {
            name: "ann".into(),
            role: Role::Submit,
        },
        "tcp://127.0.0.1:9".into(),
    );
    lab.s.cfg.secure = true;
    lab.s
        .on_message(lab.now, &p, env(false, 0, Body::WebLogin { request: 4 }));
    let asks = lab.s.take_web_logins();
    assert_eq!(asks.len(), 1);
    assert_eq!(
        asks[0].identity,
        Some(Identity::User {
            name: "ann".into(),
            role: Role::Submit
        })
    );
    lab.s.answer_web_login(
        &asks[0],
        Ok(("http://127.0.0.1:8080/login?token=x".into(), 1)),
    );
    let out = lab.s.take_outputs();
    assert!(out.iter().any(|o| matches!(
        o,
        Output::Send {
            body: Body::WebLink { request: 4, .. },
            ..
        }
    )));
    // A worker's key may not ask for one.
    let wp = peer("web-worker");
    lab.s.on_authenticated(
        &wp,
        Identity::Worker {
            name: "w".into(),
            pin: None,
        },
        "tcp://127.0.0.1:9".into(),
    );
    lab.s
        .on_message(lab.now, &wp, env(false, 0, Body::WebLogin { request: 5 }));
    assert!(lab.s.take_web_logins().is_empty());
}

/// `find_in_log` goes to the file desk under the owners' rule, and one
/// user's searches never hold every read: 4 each at most.
#[test]
fn log_searches_are_the_owners_and_bounded_per_user() {
    use crate::protocol::logfind::LogFind;
    let mut lab = Lab::new();
    lab.register("w", "devicegroup:g");
    let (_, task) = lab.passed_run_of("ann", "w");
    let find = |lab: &mut Lab, user: &str, role: Role, request: u64| {
        let p = peer(&format!("web-{user}"));
        lab.s.on_authenticated(
            &p,
            Identity::User {
                name: user.into(),
                role,
            },
            "web:127.0.0.1".into(),
        );
        lab.s.cfg.secure = true;
        let body = Body::FindInLog {
            request,
            task: task.clone(),
            find: LogFind::Line { line: 1 },
        };
        lab.s.on_message(lab.now, &p, env(false, 0, body));
        lab.s.cfg.secure = false;
        // The desk's jobs are left undone: the searches stay in progress.
        let out = lab.s.take_outputs();
        let desk = out.iter().any(|o| {
            matches!(
                o,
                Output::File(crate::server::store::files::FileJob::FindInLog { .. })
            )
        });
        let refused = out.iter().find_map(|o| match o {
            Output::Send {
                body: Body::Error { code, .. },
                ..
            } => Some(*code),
            _ => None,
        });
        (desk, refused)
    };
    // Another submit user may not search ann's log.
    assert_eq!(
        find(&mut lab, "bob", Role::Submit, 1),
        (false, Some(ErrorCode::Forbidden))
    );
    for r in 1..=4 {
        assert_eq!(
            find(&mut lab, "ann", Role::Submit, r),
            (true, None),
            "search {r}"
        );
    }
    assert_eq!(
        find(&mut lab, "ann", Role::Submit, 5),
        (false, Some(ErrorCode::LimitReached))
    );
    // Others are not locked out by ann's searches.
    assert_eq!(find(&mut lab, "opal", Role::Operator, 1), (true, None));
}
