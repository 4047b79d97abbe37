//! History read back (issue 36): with no ended testrun held in memory,
//! every request about one answers as it did when all were held — read
//! from the lab's real SQLite database — and nothing about history stays
//! in memory.

use super::*;

/// A lab that holds no ended testrun in memory.
fn forgetful() -> Lab {
    let mut lab = Lab::new();
    lab.s.cfg.history.cache_runs = 0;
    lab.register("w", "devicegroup:g");
    lab
}

/// A testrun of one task that passed on `w` with a log line and a result
/// file; committed, and let go of.
fn ended_run(lab: &mut Lab) -> (RunId, TaskId) {
    let run = run_id(&lab.submit("devicegroup:g", &["p"], Distribution::Default, false));
    let task = lab.status(&run).tasks[0].task.clone();
    lab.from(
        "w",
        Body::Log {
            task: task.clone(),
            attempt: 1,
            lines: vec![LogLine {
                seq: 1,
                stream: Stream::Stdout,
                text: "hello from the device".into(),
            }],
        },
    );
    lab.complete("w", &task, 0, Some(PASSING));
    lab.from("w", Body::Ready);
    // One turn writes its final rows, the next lets it go.
    lab.commit();
    lab.commit();
    assert!(!lab.s.runs.contains_key(&run), "{run} left memory");
    assert!(!lab.s.tasks.contains_key(&task));
    (run, task)
}

#[test]
fn an_ended_testrun_leaves_memory_and_answers_as_before() {
    let mut lab = forgetful();
    let (run, task) = ended_run(&mut lab);
    assert_eq!(lab.s.counters()["runs_evicted"], 1);

    let st = lab.status(&run);
    assert_eq!(
        (st.state, st.verdict),
        (RunState::Finished, Some(Verdict::Pass))
    );
    assert_eq!(st.tasks[0].files.len(), 1);
    assert_eq!(lab.s.counters()["runs_recalled"], 1);
    lab.commit();
    assert!(
        !lab.s.runs.contains_key(&run),
        "read back, then let go again"
    );

    // Its log, its events, its files: as if it had never left.
    match lab.request(Body::GetLog {
        request: 2,
        task: task.clone(),
        offset: 0,
        max: 1024,
    }) {
        Body::Data { eof, .. } => assert!(eof),
        other => panic!("{other:?}"),
    }
    lab.commit();
    match lab.request(Body::GetEvents {
        request: 3,
        run: run.clone(),
        from: 0,
    }) {
        Body::Events { events, .. } => assert!(!events.is_empty()),
        other => panic!("{other:?}"),
    }
    lab.commit();
    // Cancelling it says it ended, as it always did.
    match lab.request(Body::CancelRun {
        request: 4,
        run: run.clone(),
    }) {
        Body::Status { status, .. } => assert_eq!(status.state, RunState::Finished),
        Body::Error { code, .. } => assert_ne!(code, ErrorCode::UnknownRun),
        other => panic!("{other:?}"),
    }
    // A number never given out is not looked up: unknown at once.
    let reads = lab.s.counters()["history_reads"];
    match lab.request(Body::GetStatus {
        request: 5,
        run: "r999".into(),
    }) {
        Body::Error { code, .. } => assert_eq!(code, ErrorCode::UnknownRun),
        other => panic!("{other:?}"),
    }
    assert_eq!(lab.s.counters()["history_reads"], reads);
}

#[test]
fn the_runs_list_is_a_page_of_the_database() {
    let mut lab = forgetful();
    let runs: Vec<RunId> = (0..3).map(|_| ended_run(&mut lab).0).collect();
    let live = run_id(&lab.submit("devicegroup:g", &["p"], Distribution::Default, false));
    let list = |lab: &mut Lab, state, limit, before| match lab.request(Body::ListRuns {
        request: 9,
        state,
        owner: None,
        limit,
        verdict: None,
        devicegroup: Some("g".into()),
        before,
    }) {
        Body::Runs { runs, .. } => runs.into_iter().map(|r| r.run).collect::<Vec<_>>(),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        list(&mut lab, None, 10, None),
        vec![
            live.clone(),
            runs[2].clone(),
            runs[1].clone(),
            runs[0].clone()
        ]
    );
    assert_eq!(
        list(&mut lab, Some(RunState::Finished), 1, None),
        vec![runs[2].clone()]
    );
    let n: u64 = runs[1][1..].parse().unwrap();
    assert_eq!(list(&mut lab, None, 10, Some(n)), vec![runs[0].clone()]);
    assert!(lab.s.runs.len() <= 1, "a list reads no testrun into memory");
}

#[test]
fn a_restart_loads_only_what_is_alive() {
    let mut lab = forgetful();
    lab.s.cfg.history.cache_runs = 256;
    let (old, _) = ended_run_kept(&mut lab);
    let live = run_id(&lab.submit("devicegroup:x", &["p"], Distribution::Default, true));
    crash_and_restart(&mut lab);
    assert!(lab.s.runs.contains_key(&live));
    assert!(
        !lab.s.runs.contains_key(&old),
        "the history stays in the database"
    );
    assert_eq!(lab.status(&old).verdict, Some(Verdict::Pass));
    // Numbering goes on after the highest stored testrun.
    let next = run_id(&lab.submit("devicegroup:g", &["p"], Distribution::Default, false));
    assert!(next[1..].parse::<u64>().unwrap() > live[1..].parse::<u64>().unwrap());
}

/// Like [`ended_run`], with the cache as configured.
fn ended_run_kept(lab: &mut Lab) -> (RunId, TaskId) {
    let run = run_id(&lab.submit("devicegroup:g", &["p"], Distribution::Default, false));
    let task = lab.status(&run).tasks[0].task.clone();
    lab.complete("w", &task, 0, Some(PASSING));
    lab.from("w", Body::Ready);
    lab.commit();
    (run, task)
}

#[test]
fn retention_prunes_testruns_it_reads_back() {
    let mut lab = forgetful();
    lab.s.cfg.retention_age = Duration::from_secs(3600);
    let (run, task) = ended_run(&mut lab);
    assert!(lab
        .dir
        .path()
        .join("tasks")
        .join(&task)
        .join("files/r.xml")
        .exists());
    lab.advance(Duration::from_secs(3601));
    lab.from("w", Body::Heartbeat);
    lab.tick();
    assert_eq!(lab.s.counters()["runs_pruned"], 1);
    assert!(!lab.dir.path().join("tasks").join(&task).exists());
    lab.commit();
    lab.commit();
    let st = lab.status(&run);
    assert!(st.pruned.expect("pruned").reason.contains("max_age_hours"));
    // Nothing more to prune: the next ticks read nothing.
    let reads = lab.s.counters()["history_reads"];
    lab.tick();
    lab.tick();
    assert_eq!(lab.s.counters()["history_reads"], reads);
}

#[test]
fn reads_waiting_are_bounded_per_user_and_in_all() {
    let mut lab = forgetful();
    lab.s.cfg.history.max_reads_per_user = 1;
    let (a, _) = ended_run(&mut lab);
    let (b, _) = ended_run(&mut lab);
    let ask = |lab: &mut Lab, run: &RunId, request| {
        lab.s.on_message(
            lab.now,
            &client(),
            env(
                false,
                0,
                Body::GetStatus {
                    request,
                    run: run.clone(),
                },
            ),
        );
    };
    ask(&mut lab, &a, 1);
    ask(&mut lab, &b, 2);
    let out = lab.outputs();
    let refused: Vec<(ErrorCode, Option<u64>, String)> = out
        .iter()
        .filter_map(|o| match o {
            Output::Send {
                body:
                    Body::Error {
                        code,
                        request,
                        message,
                        ..
                    },
                ..
            } => Some((*code, *request, message.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(refused.len(), 1, "{out:?}");
    assert_eq!(
        (refused[0].0, refused[0].1),
        (ErrorCode::LimitReached, Some(2))
    );
    assert!(
        refused[0].2.contains("history.max_reads_per_user"),
        "{}",
        refused[0].2
    );
    assert_eq!(lab.s.counters()["history_reads_refused"], 1);
    // The first is answered, and then the user may ask again.
    assert!(out.iter().any(|o| matches!(
        o,
        Output::Send {
            body: Body::Status { request: 1, .. },
            ..
        }
    )));
    assert_eq!(lab.status(&b).verdict, Some(Verdict::Pass));
}

#[test]
fn a_followed_testrun_stays_until_its_follower_goes() {
    let mut lab = forgetful();
    let run = run_id(&lab.submit("devicegroup:g", &["p"], Distribution::Default, false));
    let follower = peer("follower");
    lab.s.on_message(
        lab.now,
        &follower,
        env(
            false,
            0,
            Body::Follow {
                request: 1,
                run: run.clone(),
                logs: false,
            },
        ),
    );
    let task = lab.status(&run).tasks[0].task.clone();
    lab.complete("w", &task, 0, None);
    lab.commit();
    lab.commit();
    assert!(lab.s.runs.contains_key(&run), "a follower refers to it");
    lab.s.on_peer_closed(lab.now, &follower);
    lab.commit();
    assert!(!lab.s.runs.contains_key(&run));
}

#[test]
fn rows_from_before_the_index_are_indexed_once_at_the_first_start() {
    let mut lab = forgetful();
    let (run, _) = ended_run(&mut lab);
    // As an older server wrote it: no index columns.
    lab.db
        .execute_batch(
            "UPDATE runs SET num = NULL, kind = NULL, state = NULL, verdict = NULL, owner = NULL,
                 groups = NULL, live = NULL, ended_ms = NULL, kept_bytes = NULL, summary = NULL",
        )
        .unwrap();
    let snap = lab.db.load().unwrap();
    assert!(snap.runs.iter().any(|(id, _)| *id == run), "loaded once");
    assert_eq!(snap.kept_bytes, 0);
    crash_and_restart(&mut lab);
    // The first commit writes it back with its index; then it goes.
    lab.commit();
    lab.commit();
    assert!(!lab.s.runs.contains_key(&run));
    let snap = lab.db.load().unwrap();
    assert!(!snap.runs.iter().any(|(id, _)| *id == run), "indexed now");
    assert!(snap.kept_bytes > 0, "its files count for retention");
    match lab.request(Body::ListRuns {
        request: 3,
        state: None,
        owner: None,
        limit: 10,
        verdict: Some(Verdict::Pass),
        devicegroup: None,
        before: None,
    }) {
        Body::Runs { runs, .. } => assert_eq!(runs[0].run, run),
        other => panic!("{other:?}"),
    }
}

#[test]
fn deadlines_of_ended_tasks_do_not_pile_up() {
    let mut lab = forgetful();
    for _ in 0..1500 {
        let run = run_id(&lab.submit("devicegroup:g", &["p"], Distribution::Default, false));
        let task = lab.s.runs[&run].tasks[0].clone();
        lab.complete("w", &task, 0, None);
        lab.from("w", Body::Ready);
        lab.commit();
    }
    // Each task left a day-long queue deadline behind: forgotten in
    // batches, the heap stays near what is live.
    assert!(lab.s.counters()["deadlines_forgotten"] > 0);
    assert!(
        lab.s.deadlines.len() <= 2 * (2 + 1024),
        "{}",
        lab.s.deadlines.len()
    );
    assert!(lab.s.runs.len() <= 2, "and the testruns left memory");
}

#[test]
fn failing_cases_are_named_in_status_and_listed_from_the_database() {
    let mut lab = forgetful();
    let xml = r#"<testsuite name="s"><testcase classname="m" name="ok"/><testcase classname="m" name="bad"><failure message="expected 1, got 2">trace</failure></testcase><testcase classname="m" name="skip"><skipped/></testcase></testsuite>"#;
    let run = run_id(&lab.submit("devicegroup:g", &["p"], Distribution::Default, false));
    let task = lab.status(&run).tasks[0].task.clone();
    lab.complete("w", &task, 1, Some(xml));
    let st = lab.status(&run);
    assert_eq!(st.verdict, Some(Verdict::Fail));
    assert_eq!(st.tasks[0].failing.len(), 1);
    assert_eq!(st.tasks[0].failing[0].name, "m::bad");
    assert_eq!(
        st.tasks[0].failing[0].message.as_deref(),
        Some("expected 1, got 2")
    );
    lab.commit();
    lab.commit();
    let list = |lab: &mut Lab, failed| match lab.request(Body::ListCases {
        request: 4,
        run: run.clone(),
        failed,
        offset: 0,
        limit: 10,
    }) {
        Body::Cases { cases, .. } => cases,
        other => panic!("{other:?}"),
    };
    let all = list(&mut lab, false);
    let names: Vec<(&str, CaseStatus)> = all.iter().map(|c| (c.name.as_str(), c.status)).collect();
    assert_eq!(
        names,
        [
            ("m::ok", CaseStatus::Pass),
            ("m::bad", CaseStatus::Fail),
            ("m::skip", CaseStatus::Skip)
        ]
    );
    assert_eq!(all[1].file, "r.xml");
    let failing = list(&mut lab, true);
    assert_eq!(failing.len(), 1);
    assert_eq!(failing[0].message.as_deref(), Some("expected 1, got 2"));
}
