//! Scheduler scenarios with a fake clock and an in-memory store.

use super::*;
use crate::server::store::MemoryStore;
use sha2::{Digest, Sha256};

const HB: Duration = Duration::from_secs(1);

struct Lab {
    s: Scheduler<MemoryStore>,
    t0: Instant,
    now: Instant,
    seq: HashMap<String, u64>,
}

fn peer(name: &str) -> PeerId {
    Bytes::from(format!("peer-{name}"))
}

fn client() -> PeerId {
    Bytes::from_static(b"client")
}

fn env(mandatory: bool, seq: u64, body: Body) -> Envelope {
    Envelope {
        header: Header {
            v: PROTOCOL_VERSION,
            class: body.class(),
            mandatory,
            seq,
            task: None,
        },
        body,
        raw: None,
    }
}

const PASSING: &str = r#"<testsuite><testcase name="a"/><testcase name="b"/></testsuite>"#;
const FAILING: &str = r#"<testsuite><testcase name="a"><failure/></testcase></testsuite>"#;

impl Lab {
    fn new() -> Self {
        let cfg = SchedulerConfig {
            heartbeat: HB,
            liveness: 3,
            dispatch_ttl: Duration::from_secs(30),
            lost_grace: Duration::from_secs(10),
            max_attempts: 2,
            queue_timeout: Duration::from_secs(600),
            backstop_grace: Duration::from_secs(60),
            retry: RetryPolicy::default(),
            limits: Default::default(),
        };
        let t0 = Instant::now();
        let mut s = Scheduler::new(cfg, MemoryStore::default(), "srv1".into());
        s.set_wall_clock(t0, 1_000_000);
        Lab {
            s,
            t0,
            now: t0,
            seq: HashMap::new(),
        }
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
    }

    fn tick(&mut self) -> Vec<Output> {
        self.s.on_tick(self.now);
        self.s.take_outputs()
    }

    fn from(&mut self, worker: &str, body: Body) -> Vec<Output> {
        self.s
            .on_message(self.now, &peer(worker), env(false, 0, body));
        self.s.take_outputs()
    }

    fn mandatory(&mut self, worker: &str, body: Body) -> Vec<Output> {
        let seq = self.seq.entry(worker.to_string()).or_insert(0);
        *seq += 1;
        let seq = *seq;
        self.s
            .on_message(self.now, &peer(worker), env(true, seq, body));
        self.s.take_outputs()
    }

    fn register(&mut self, worker: &str, device: &str) -> Vec<Output> {
        let mut out = self.from(
            worker,
            Body::Hello {
                worker: worker.into(),
                session: format!("{worker}-session"),
                device: DeviceProps::parse(device).unwrap(),
                running: vec![],
            },
        );
        out.extend(self.from(worker, Body::Ready));
        out
    }

    fn request(&mut self, body: Body) -> Body {
        self.s.on_message(self.now, &client(), env(false, 0, body));
        let out = self.s.take_outputs();
        out.into_iter()
            .find_map(|o| match o {
                Output::Send { peer, body, .. } if peer == client() => Some(body),
                _ => None,
            })
            .expect("a reply to the client")
    }

    fn submit(
        &mut self,
        device: &str,
        packages: &[&str],
        distribution: Distribution,
        anyway: bool,
    ) -> Body {
        self.request(Body::Submit {
            request: 1,
            testrun: TestrunRequest {
                device: DeviceSpec::parse(device).unwrap(),
                image: "img".into(),
                packages: packages.iter().map(|p| p.to_string()).collect(),
                distribution,
                timeout_secs: 60,
                options: BTreeMap::new(),
                queue_anyway: anyway,
            },
        })
    }

    /// Runs the conductor's part for `worker`: accept, upload `junit`, finish.
    fn complete(
        &mut self,
        worker: &str,
        task: &TaskId,
        exit_code: i32,
        junit: Option<&str>,
    ) -> Vec<Output> {
        let mut out = self.mandatory(
            worker,
            Body::TaskAccepted {
                task: task.clone(),
                attempt: 1,
            },
        );
        let mut files = vec![];
        if let Some(xml) = junit {
            let sha = hex::encode(Sha256::digest(xml.as_bytes()));
            let mut e = env(
                true,
                0,
                Body::FileChunk {
                    task: task.clone(),
                    attempt: 1,
                    name: "r.xml".into(),
                    offset: 0,
                    size: xml.len() as u64,
                    sha256: Some(sha.clone()),
                },
            );
            let seq = self.seq.entry(worker.to_string()).or_insert(0);
            *seq += 1;
            e.header.seq = *seq;
            e.raw = Some(Bytes::copy_from_slice(xml.as_bytes()));
            self.s.on_message(self.now, &peer(worker), e);
            out.extend(self.s.take_outputs());
            files.push(FileInfo {
                name: "r.xml".into(),
                size: xml.len() as u64,
                sha256: sha,
            });
        }
        out.extend(self.mandatory(
            worker,
            Body::TaskFinished {
                task: task.clone(),
                attempt: 1,
                outcome: Outcome {
                    exit_code: Some(exit_code),
                    ..Outcome::default()
                },
                log_lines: 0,
                files,
            },
        ));
        out
    }

    fn status(&self, run: &RunId) -> RunStatus {
        self.s.status(run).unwrap()
    }
}

/// The tasks dispatched in `out`, with the worker they went to.
fn dispatches(out: &[Output]) -> Vec<(String, TaskId)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Send {
                peer,
                body: Body::Dispatch { spec },
                ..
            } => Some((
                String::from_utf8_lossy(&peer[5..]).into_owned(),
                spec.task.clone(),
            )),
            _ => None,
        })
        .fold(Vec::new(), |mut v, d| {
            // An unacknowledged dispatch is resent; count it once.
            if !v.contains(&d) {
                v.push(d);
            }
            v
        })
}

fn run_id(reply: &Body) -> RunId {
    match reply {
        Body::Submitted { run, .. } => run.clone(),
        other => panic!("expected submitted, got {other:?}"),
    }
}

#[test]
fn perpackage_testrun_spreads_over_the_matching_group_only() {
    let mut lab = Lab::new();
    lab.register("a1", "devicegroup:alpha");
    lab.register("a2", "devicegroup:alpha devicename:x deviceid:1");
    lab.register("b1", "devicegroup:beta");
    let run = run_id(&lab.submit(
        "devicegroup:alpha",
        &["p1", "p2", "p3", "p4", "p5", "p6"],
        Distribution::Perpackage,
        false,
    ));
    // The submit itself dispatched to both idle alpha workers.
    let st = lab.status(&run);
    assert_eq!(st.tasks.len(), 6);
    let mut used = std::collections::BTreeSet::new();
    let mut pending: VecDeque<(String, TaskId)> = st
        .tasks
        .iter()
        .filter(|t| t.state == TaskState::Dispatched)
        .map(|t| (t.worker.clone().unwrap(), t.task.clone()))
        .collect();
    assert_eq!(pending.len(), 2, "one task per idle matching worker");
    while let Some((worker, task)) = pending.pop_front() {
        assert_ne!(worker, "b1", "beta worker must not get alpha tasks");
        used.insert(worker.clone());
        let mut out = lab.complete(&worker, &task, 0, Some(PASSING));
        out.extend(lab.from(&worker, Body::Ready));
        pending.extend(dispatches(&out));
    }
    assert_eq!(used.len(), 2);
    let st = lab.status(&run);
    assert_eq!(st.state, RunState::Finished);
    assert_eq!(st.verdict, Some(Verdict::Pass));
    assert!(st.tasks.iter().all(|t| t.cases.unwrap().cases == 2));
}

#[test]
fn name_and_id_specs_route_only_to_that_device() {
    let mut lab = Lab::new();
    lab.register("plain", "devicegroup:alpha");
    lab.register("named", "devicegroup:alpha devicename:x deviceid:7");
    let run = run_id(&lab.submit(
        "devicegroup:alpha devicename:x deviceid:7",
        &["p"],
        Distribution::Default,
        false,
    ));
    assert_eq!(lab.status(&run).tasks[0].worker.as_deref(), Some("named"));
}

#[test]
fn a_ready_worker_gets_work_the_moment_it_is_submitted() {
    let mut lab = Lab::new();
    lab.register("w", "devicegroup:g");
    let reply = lab.submit("devicegroup:g", &["p"], Distribution::Default, false);
    let run = run_id(&reply);
    assert_eq!(lab.status(&run).tasks[0].state, TaskState::Dispatched);
}

#[test]
fn unknown_group_is_refused_unless_queued_anyway() {
    let mut lab = Lab::new();
    lab.register("w", "devicegroup:alpha");
    match lab.submit("devicegroup:gamma", &["p"], Distribution::Default, false) {
        Body::Error { code, message, .. } => {
            assert_eq!(code, ErrorCode::NoMatchingWorker);
            assert!(message.contains("no queue for gamma"), "{message}");
            assert!(message.contains("alpha"), "{message}");
        }
        other => panic!("expected refusal, got {other:?}"),
    }
    let run = run_id(&lab.submit("devicegroup:gamma", &["p"], Distribution::Default, true));
    assert_eq!(lab.status(&run).tasks[0].state, TaskState::Queued);
    // …and a gamma worker that shows up later takes it.
    let out = lab.register("g", "devicegroup:gamma");
    assert_eq!(dispatches(&out).len(), 1);
}

#[test]
fn verdicts_follow_exit_status_and_junit() {
    let mut lab = Lab::new();
    lab.register("w", "devicegroup:g");
    let run = run_id(&lab.submit(
        "devicegroup:g",
        &["p1", "p2", "p3"],
        Distribution::Perpackage,
        false,
    ));
    let mut next = lab.status(&run).tasks[0].task.clone();
    let results = [(0, Some(PASSING)), (0, Some(FAILING)), (139, None)];
    for (exit, junit) in results {
        let mut out = lab.complete("w", &next, exit, junit);
        out.extend(lab.from("w", Body::Ready));
        if let Some((_, t)) = dispatches(&out).first() {
            next = t.clone();
        }
    }
    let st = lab.status(&run);
    let verdicts: Vec<_> = st.tasks.iter().map(|t| t.verdict).collect();
    assert_eq!(
        verdicts,
        vec![
            Some(Verdict::Pass),
            Some(Verdict::Fail),
            Some(Verdict::Error)
        ]
    );
    assert_eq!(st.verdict, Some(Verdict::Error));
}

#[test]
fn duplicate_final_report_is_acked_again_but_applied_once() {
    let mut lab = Lab::new();
    lab.register("w", "devicegroup:g");
    let run = run_id(&lab.submit("devicegroup:g", &["p"], Distribution::Default, false));
    let task = lab.status(&run).tasks[0].task.clone();
    lab.mandatory(
        "w",
        Body::TaskAccepted {
            task: task.clone(),
            attempt: 1,
        },
    );
    let finished = Body::TaskFinished {
        task: task.clone(),
        attempt: 1,
        outcome: Outcome {
            exit_code: Some(0),
            ..Outcome::default()
        },
        log_lines: 0,
        files: vec![],
    };
    let out = lab.mandatory("w", finished.clone());
    assert!(
        matches!(
            &out[0],
            Output::Send {
                body: Body::Ack { seq: 2 },
                ..
            }
        ),
        "ack first: {out:?}"
    );
    let events_before = lab.s.runs[&run].events.len();
    // The ack was lost; the worker resends the same seq.
    lab.s
        .on_message(lab.now, &peer("w"), env(true, 2, finished));
    let out = lab.s.take_outputs();
    assert_eq!(out.len(), 1);
    assert!(matches!(
        &out[0],
        Output::Send {
            body: Body::Ack { seq: 2 },
            ..
        }
    ));
    assert_eq!(lab.s.runs[&run].events.len(), events_before, "applied once");
    assert_eq!(lab.s.counters()["duplicate_mandatory"], 1);
}

#[test]
fn report_for_unknown_task_is_nacked_as_orphan() {
    let mut lab = Lab::new();
    lab.register("w", "devicegroup:g");
    let out = lab.mandatory(
        "w",
        Body::TaskFinished {
            task: "nope.1".into(),
            attempt: 1,
            outcome: Outcome::default(),
            log_lines: 3,
            files: vec![],
        },
    );
    assert!(out.iter().any(|o| matches!(o, Output::Send { body: Body::TaskClosed { task, .. }, .. } if task == "nope.1")));
    assert!(!out.iter().any(|o| matches!(
        o,
        Output::Send {
            body: Body::Ack { .. },
            ..
        }
    )));
    assert_eq!(lab.s.counters()["orphan_control"], 1);
    lab.from(
        "w",
        Body::Log {
            task: "nope.1".into(),
            attempt: 1,
            lines: vec![LogLine {
                seq: 1,
                stream: Stream::Stdout,
                text: "x".into(),
            }],
        },
    );
    assert_eq!(lab.s.counters()["orphan_log_lines"], 1);
}

#[test]
fn lost_worker_task_is_held_then_requeued_to_another_worker() {
    let mut lab = Lab::new();
    lab.register("w1", "devicegroup:g");
    let run = run_id(&lab.submit("devicegroup:g", &["p"], Distribution::Default, false));
    let task = lab.status(&run).tasks[0].task.clone();
    lab.mandatory(
        "w1",
        Body::TaskAccepted {
            task: task.clone(),
            attempt: 1,
        },
    );
    lab.register("w2", "devicegroup:g");
    // w2 stays alive, w1 goes silent.
    for _ in 0..5 {
        lab.advance(HB);
        lab.from("w2", Body::Heartbeat);
        lab.tick();
    }
    assert_eq!(lab.status(&run).tasks[0].state, TaskState::Held);
    let mut out = Vec::new();
    for _ in 0..12 {
        lab.advance(HB);
        lab.from("w2", Body::Heartbeat);
        out.extend(lab.tick());
    }
    assert_eq!(dispatches(&out), vec![("w2".to_string(), task.clone())]);
    let t = &lab.status(&run).tasks[0];
    assert_eq!((t.attempts, t.worker.as_deref()), (2, Some("w2")));
    // w1 comes back late with a result: orphan nack.
    lab.register("w1", "devicegroup:g");
    let out = lab.mandatory(
        "w1",
        Body::TaskFinished {
            task: task.clone(),
            attempt: 1,
            outcome: Outcome::default(),
            log_lines: 0,
            files: vec![],
        },
    );
    assert!(out.iter().any(|o| matches!(
        o,
        Output::Send {
            body: Body::TaskClosed { .. },
            ..
        }
    )));
}

#[test]
fn worker_back_within_grace_keeps_its_task() {
    let mut lab = Lab::new();
    lab.register("w1", "devicegroup:g");
    let run = run_id(&lab.submit("devicegroup:g", &["p"], Distribution::Default, false));
    let task = lab.status(&run).tasks[0].task.clone();
    lab.mandatory(
        "w1",
        Body::TaskAccepted {
            task: task.clone(),
            attempt: 1,
        },
    );
    for _ in 0..5 {
        lab.advance(HB);
        lab.tick();
    }
    assert_eq!(lab.status(&run).tasks[0].state, TaskState::Held);
    lab.from(
        "w1",
        Body::Hello {
            worker: "w1".into(),
            session: "w1-session".into(),
            device: DeviceProps::parse("devicegroup:g").unwrap(),
            running: vec![task.clone()],
        },
    );
    assert_eq!(lab.status(&run).tasks[0].state, TaskState::Running);
    lab.complete("w1", &task, 0, Some(PASSING));
    assert_eq!(lab.status(&run).verdict, Some(Verdict::Pass));
}

#[test]
fn after_max_attempts_a_lost_task_ends_in_error() {
    let mut lab = Lab::new();
    lab.register("w1", "devicegroup:g");
    let run = run_id(&lab.submit("devicegroup:g", &["p"], Distribution::Default, false));
    for _ in 0..2 {
        // Each time: the worker takes it and is lost for good.
        for _ in 0..20 {
            lab.advance(HB);
            lab.tick();
        }
        lab.register("w1", "devicegroup:g");
    }
    let st = lab.status(&run);
    assert_eq!(st.tasks[0].verdict, Some(Verdict::Error));
    assert!(
        st.tasks[0]
            .reason
            .as_deref()
            .unwrap()
            .contains("gave up after 2 attempts"),
        "{:?}",
        st.tasks[0].reason
    );
    assert_eq!(st.verdict, Some(Verdict::Error));
}

#[test]
fn a_stalled_server_does_not_declare_its_workers_lost() {
    let mut lab = Lab::new();
    lab.register("w", "devicegroup:g");
    lab.tick();
    lab.advance(Duration::from_secs(30)); // SIGSTOP for 30 s
    lab.tick();
    let workers = match lab.request(Body::ListWorkers { request: 1 }) {
        Body::Workers { workers, .. } => workers,
        other => panic!("{other:?}"),
    };
    assert_eq!(workers[0].state, WorkerState::Idle);
}

#[test]
fn queued_task_past_the_queue_timeout_ends_in_error() {
    let mut lab = Lab::new();
    let run = run_id(&lab.submit("devicegroup:g", &["p"], Distribution::Default, true));
    for _ in 0..601 {
        lab.advance(HB);
        lab.tick();
    }
    let st = lab.status(&run);
    assert_eq!(st.tasks[0].verdict, Some(Verdict::Error));
    assert!(st.tasks[0]
        .reason
        .as_deref()
        .unwrap()
        .starts_with("queue timeout"));
    assert_eq!(lab.now.duration_since(lab.t0), Duration::from_secs(601));
}

#[test]
fn cancel_stops_queued_tasks_at_once_and_asks_workers_to_stop_running_ones() {
    let mut lab = Lab::new();
    lab.register("w", "devicegroup:g");
    let run = run_id(&lab.submit(
        "devicegroup:g",
        &["p1", "p2"],
        Distribution::Perpackage,
        false,
    ));
    let running = lab.status(&run).tasks[0].task.clone();
    lab.mandatory(
        "w",
        Body::TaskAccepted {
            task: running.clone(),
            attempt: 1,
        },
    );
    lab.s.on_message(
        lab.now,
        &client(),
        env(
            false,
            0,
            Body::CancelRun {
                request: 2,
                run: run.clone(),
            },
        ),
    );
    let out = lab.s.take_outputs();
    assert!(out.iter().any(
        |o| matches!(o, Output::Send { body: Body::Cancel { task }, .. } if *task == running)
    ));
    assert_eq!(lab.status(&run).tasks[1].state, TaskState::Cancelled);
    lab.mandatory(
        "w",
        Body::TaskFinished {
            task: running,
            attempt: 1,
            outcome: Outcome {
                signal: Some(15),
                cancelled: true,
                ..Outcome::default()
            },
            log_lines: 0,
            files: vec![],
        },
    );
    let st = lab.status(&run);
    assert_eq!(st.state, RunState::Cancelled);
    assert_eq!(st.verdict, None);
}

#[test]
fn log_lines_are_stored_once_and_gaps_are_reported_exactly() {
    let mut lab = Lab::new();
    lab.register("w", "devicegroup:g");
    let run = run_id(&lab.submit("devicegroup:g", &["p"], Distribution::Default, false));
    let task = lab.status(&run).tasks[0].task.clone();
    lab.mandatory(
        "w",
        Body::TaskAccepted {
            task: task.clone(),
            attempt: 1,
        },
    );
    let line = |seq| LogLine {
        seq,
        stream: Stream::Stdout,
        text: format!("line {seq}"),
    };
    lab.from(
        "w",
        Body::Log {
            task: task.clone(),
            attempt: 1,
            lines: (1..=10).map(line).collect(),
        },
    );
    lab.from(
        "w",
        Body::Log {
            task: task.clone(),
            attempt: 1,
            lines: (5..=12).map(line).collect(),
        },
    ); // overlap
    lab.from(
        "w",
        Body::Log {
            task: task.clone(),
            attempt: 1,
            lines: (20..=25).map(line).collect(),
        },
    );
    lab.mandatory(
        "w",
        Body::TaskFinished {
            task: task.clone(),
            attempt: 1,
            outcome: Outcome {
                exit_code: Some(0),
                ..Outcome::default()
            },
            log_lines: 30,
            files: vec![],
        },
    );
    let t = &lab.status(&run).tasks[0];
    assert_eq!(t.log_lines_stored, 18);
    assert_eq!(t.log_gaps, vec![(13, 19), (26, 30)]);
    assert_eq!(
        t.log_lines_stored + t.log_gaps.iter().map(|(a, b)| b - a + 1).sum::<u64>(),
        30
    );
    let stored = String::from_utf8(lab.s.store.logs[&task].clone()).unwrap();
    assert_eq!(stored.lines().count(), 18);
}

#[test]
fn malformed_frames_get_an_error_reply_and_a_counter() {
    let mut lab = Lab::new();
    let frames = vec![Bytes::from_static(b"\x92"), Bytes::new()];
    let err = crate::protocol::decode(frames).unwrap_err();
    lab.s.on_bad_frames(&client(), &err);
    let out = lab.s.take_outputs();
    assert!(matches!(
        &out[0],
        Output::Send {
            body: Body::Error {
                code: ErrorCode::Malformed,
                ..
            },
            ..
        }
    ));
    assert_eq!(lab.s.counters()["malformed"], 1);
}

#[test]
fn traversal_in_result_file_names_is_refused_with_a_typed_error() {
    let mut lab = Lab::new();
    lab.register("w", "devicegroup:g");
    let run = run_id(&lab.submit("devicegroup:g", &["p"], Distribution::Default, false));
    let task = lab.status(&run).tasks[0].task.clone();
    lab.mandatory(
        "w",
        Body::TaskAccepted {
            task: task.clone(),
            attempt: 1,
        },
    );
    let mut e = env(
        true,
        99,
        Body::FileChunk {
            task: task.clone(),
            attempt: 1,
            name: "../../etc/passwd".into(),
            offset: 0,
            size: 1,
            sha256: None,
        },
    );
    e.raw = Some(Bytes::from_static(b"x"));
    lab.s.on_message(lab.now, &peer("w"), e);
    let out = lab.s.take_outputs();
    assert!(out.iter().any(|o| matches!(
        o,
        Output::Send {
            body: Body::Error {
                code: ErrorCode::BadFileName,
                ..
            },
            ..
        }
    )));
    assert!(lab.s.store.files.is_empty());
}

#[test]
fn dispatch_is_resent_until_the_worker_acks_it() {
    let mut lab = Lab::new();
    lab.register("w", "devicegroup:g");
    let run = run_id(&lab.submit("devicegroup:g", &["p"], Distribution::Default, false));
    let count = |out: &[Output]| {
        out.iter()
            .filter(|o| {
                matches!(
                    o,
                    Output::Send {
                        body: Body::Dispatch { .. },
                        ..
                    }
                )
            })
            .count()
    };
    lab.advance(Duration::from_millis(1500));
    lab.from("w", Body::Heartbeat);
    let out = lab.tick();
    assert_eq!(count(&out), 1, "resent after the initial delay");
    let seq = out
        .iter()
        .find_map(|o| match o {
            Output::Send {
                header,
                body: Body::Dispatch { .. },
                ..
            } => Some(header.seq),
            _ => None,
        })
        .unwrap();
    lab.from("w", Body::Ack { seq });
    for _ in 0..30 {
        lab.advance(HB);
        lab.from("w", Body::Heartbeat);
        assert_eq!(count(&lab.tick()), 0, "never resent once acked");
    }
    assert_eq!(lab.status(&run).tasks[0].state, TaskState::Dispatched);
}

/// Commits what changed to a real database and restores a new scheduler
/// from it, as a crash and restart would.
fn crash_and_restart(lab: &mut Lab, db: &mut crate::server::db::Db) {
    db.commit(&lab.s.take_changes()).unwrap();
    let snap = db.load().unwrap();
    let cfg = lab.s.cfg.clone();
    lab.s = Scheduler::restore(cfg, MemoryStore::default(), "srv2".into(), &snap, lab.now).unwrap();
    lab.s.set_wall_clock(lab.t0, 1_000_000);
}

#[test]
fn after_a_restart_a_resent_report_that_was_applied_is_acked_not_reapplied() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = crate::server::db::Db::open(dir.path()).unwrap();
    let mut lab = Lab::new();
    lab.register("w", "devicegroup:g");
    let run = run_id(&lab.submit("devicegroup:g", &["p"], Distribution::Default, false));
    let task = lab.status(&run).tasks[0].task.clone();
    lab.mandatory(
        "w",
        Body::TaskAccepted {
            task: task.clone(),
            attempt: 1,
        },
    );
    let finished = Body::TaskFinished {
        task: task.clone(),
        attempt: 1,
        outcome: Outcome {
            exit_code: Some(0),
            ..Outcome::default()
        },
        log_lines: 0,
        files: vec![],
    };
    lab.mandatory("w", finished.clone()); // applied; the ack is lost in the crash
    crash_and_restart(&mut lab, &mut db);
    let st = lab.status(&run);
    assert_eq!(
        (st.state, st.tasks[0].verdict),
        (RunState::Finished, Some(Verdict::Fail))
    );
    // The worker (same session) registers again and resends seq 2.
    lab.register("w", "devicegroup:g");
    lab.s
        .on_message(lab.now, &peer("w"), env(true, 2, finished));
    let out = lab.s.take_outputs();
    assert!(
        matches!(
            &out[..],
            [Output::Send {
                body: Body::Ack { seq: 2 },
                ..
            }]
        ),
        "{out:?}"
    );
}

#[test]
fn after_a_restart_queued_tasks_stay_queued_and_running_ones_wait_for_their_worker() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = crate::server::db::Db::open(dir.path()).unwrap();
    let mut lab = Lab::new();
    lab.register("w", "devicegroup:g");
    let run = run_id(&lab.submit(
        "devicegroup:g",
        &["p1", "p2"],
        Distribution::Perpackage,
        false,
    ));
    let (first, second) = (
        lab.status(&run).tasks[0].task.clone(),
        lab.status(&run).tasks[1].task.clone(),
    );
    lab.mandatory(
        "w",
        Body::TaskAccepted {
            task: first.clone(),
            attempt: 1,
        },
    );
    crash_and_restart(&mut lab, &mut db);
    let st = lab.status(&run);
    assert_eq!(st.tasks[0].state, TaskState::Held);
    assert_eq!(st.tasks[1].state, TaskState::Queued);
    // The worker comes back still running the first task.
    lab.from(
        "w",
        Body::Hello {
            worker: "w".into(),
            session: "w-session".into(),
            device: DeviceProps::parse("devicegroup:g").unwrap(),
            running: vec![first.clone()],
        },
    );
    assert_eq!(lab.status(&run).tasks[0].state, TaskState::Running);
    let mut out = lab.complete("w", &first, 0, Some(PASSING));
    out.extend(lab.from("w", Body::Ready));
    assert_eq!(dispatches(&out), vec![("w".to_string(), second.clone())]);
    lab.complete("w", &second, 0, Some(PASSING));
    let st = lab.status(&run);
    assert_eq!(st.verdict, Some(Verdict::Pass));
    assert_eq!(
        st.tasks.iter().map(|t| t.attempts).collect::<Vec<_>>(),
        vec![1, 1]
    );
    // Run ids keep counting across restarts.
    crash_and_restart(&mut lab, &mut db);
    let next = run_id(&lab.submit("devicegroup:g", &["p"], Distribution::Default, false));
    assert_ne!(next, run);
}

#[test]
fn an_interrupted_attempt_is_requeued() {
    let mut lab = Lab::new();
    lab.register("w", "devicegroup:g");
    let run = run_id(&lab.submit("devicegroup:g", &["p"], Distribution::Default, false));
    let task = lab.status(&run).tasks[0].task.clone();
    lab.mandatory(
        "w",
        Body::TaskAccepted {
            task: task.clone(),
            attempt: 1,
        },
    );
    let mut out = lab.mandatory(
        "w",
        Body::TaskFinished {
            task: task.clone(),
            attempt: 1,
            outcome: Outcome {
                interrupted: true,
                ..Outcome::default()
            },
            log_lines: 0,
            files: vec![],
        },
    );
    out.extend(lab.from("w", Body::Ready));
    assert_eq!(dispatches(&out), vec![("w".to_string(), task.clone())]);
    assert_eq!(lab.status(&run).tasks[0].attempts, 2);
}

/// Mutated and random frames from registered and unknown peers: every one
/// is either applied or answered with a typed error; nothing panics.
#[test]
fn mutated_messages_never_panic_the_scheduler() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut lab = Lab::new();
    lab.register("w", "devicegroup:g");
    let run = run_id(&lab.submit(
        "devicegroup:g",
        &["p1", "p2"],
        Distribution::Perpackage,
        false,
    ));
    let task = lab.status(&run).tasks[0].task.clone();
    let samples = [
        Body::TaskAccepted {
            task: task.clone(),
            attempt: 1,
        },
        Body::Log {
            task: task.clone(),
            attempt: 1,
            lines: vec![LogLine {
                seq: 3,
                stream: Stream::Stderr,
                text: "x".into(),
            }],
        },
        Body::FileChunk {
            task: task.clone(),
            attempt: 1,
            name: "a/b.xml".into(),
            offset: 4,
            size: 9,
            sha256: Some("00".into()),
        },
        Body::TaskFinished {
            task: task.clone(),
            attempt: 1,
            outcome: Outcome::default(),
            log_lines: 9,
            files: vec![],
        },
        Body::GetFile {
            request: 1,
            task: task.clone(),
            name: "../x".into(),
            offset: 0,
            max: 10,
        },
        Body::CancelRun {
            request: 2,
            run: run.clone(),
        },
        Body::Ready,
    ];
    let mut applied = 0;
    for i in 0..20_000 {
        let body = &samples[i % samples.len()];
        let mut h = header(body.class(), Some(&task));
        h.mandatory = rng.gen_bool(0.5);
        h.seq = rng.gen_range(0..50);
        let raw = matches!(body, Body::FileChunk { .. }).then(|| Bytes::from_static(b"abcde"));
        let mut frames = crate::protocol::encode(&h, body, raw);
        for _ in 0..rng.gen_range(0..4) {
            let f = rng.gen_range(0..frames.len());
            let mut bytes = frames[f].to_vec();
            if !bytes.is_empty() {
                let at = rng.gen_range(0..bytes.len());
                bytes[at] = rng.gen();
            }
            frames[f] = Bytes::from(bytes);
        }
        let who = if rng.gen_bool(0.8) {
            peer("w")
        } else {
            Bytes::from_static(b"stranger")
        };
        match crate::protocol::decode(frames) {
            Ok(env) => {
                applied += 1;
                lab.s.on_message(lab.now, &who, env);
            }
            Err(e) => lab.s.on_bad_frames(&who, &e),
        }
        lab.s.take_outputs();
        if i % 1000 == 0 {
            lab.advance(HB);
            lab.tick();
        }
    }
    assert!(
        applied > 1000,
        "the mutations should leave many messages decodable ({applied})"
    );
}

#[test]
fn only_changed_rows_are_written_and_queued_tasks_once() {
    let mut lab = Lab::new();
    lab.register("w", "devicegroup:g");
    let run = run_id(&lab.submit(
        "devicegroup:nobody",
        &["p1", "p2"],
        Distribution::Perpackage,
        true,
    ));
    let first = lab.s.take_changes();
    assert_eq!(first.tasks.len(), 2);
    assert_eq!(first.runs.len(), 1);
    // Heartbeats and ticks change nothing stored.
    for _ in 0..5 {
        lab.advance(HB);
        lab.from("w", Body::Heartbeat);
        lab.tick();
    }
    let idle = lab.s.take_changes();
    assert!(idle.tasks.is_empty() && idle.runs.is_empty(), "{idle:?}");
    // A cancel changes both tasks and the run.
    lab.request(Body::CancelRun { request: 3, run });
    let cancelled = lab.s.take_changes();
    assert_eq!(cancelled.tasks.len(), 2);
    assert_eq!(cancelled.runs.len(), 1);
    assert_eq!(
        cancelled.history.len(),
        2,
        "one state change per task: {:?}",
        cancelled.history
    );
}
