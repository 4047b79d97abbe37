//! Scheduler scenarios with a fake clock and an in-memory store.

use super::*;
use crate::delivery::RetryPolicy;
use crate::server::store::MemoryStore;
use sha2::{Digest, Sha256};

const HB: Duration = Duration::from_secs(1);

struct Lab {
    s: Scheduler<MemoryStore>,
    t0: Instant,
    now: Instant,
    seq: HashMap<String, u64>,
    /// The real file desk over a temporary folder, run synchronously.
    desk: crate::server::store::files::Desk,
    /// The real state database and history reader, in `dir` too: a
    /// question to the history commits the changes first, as the
    /// serving loop does before it hands questions over.
    db: crate::server::store::db::Db,
    history: crate::server::store::history::SqliteHistory,
    dir: tempfile::TempDir,
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
            epoch: None,
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
            retention_age: Duration::from_secs(3600),
            retention_bytes: u64::MAX,
            secure: false,
            secrets_key: None,
            events_key: None,
            ..SchedulerConfig::default()
        };
        let t0 = Instant::now();
        let mut s = Scheduler::new(cfg, MemoryStore::default(), "srv1".into(), t0, 1_000_000);
        s.set_wall_clock(t0, 1_000_000);
        let dir = tempfile::tempdir().unwrap();
        let db = crate::server::store::db::Db::open(dir.path()).unwrap();
        let history = crate::server::store::history::SqliteHistory::open(db.path()).unwrap();
        let cases = crate::server::store::cases::SqliteCases::open(db.path()).unwrap();
        Lab {
            s,
            t0,
            now: t0,
            seq: HashMap::new(),
            desk: crate::server::store::files::Desk::with_cases(dir.path(), Box::new(cases)),
            db,
            history,
            dir,
        }
    }

    /// The scheduler's outputs, with its file jobs carried out by the desk
    /// (and what they cause) until none is left.
    fn outputs(&mut self) -> Vec<Output> {
        let mut all = Vec::new();
        loop {
            let out = self.s.take_outputs();
            if out.is_empty() {
                return all;
            }
            for o in out {
                match o {
                    Output::File(job) => {
                        if let Some(done) = self.desk.run(job) {
                            self.s.on_file_done(self.now, done);
                        }
                    }
                    Output::Recall(job) => {
                        self.commit();
                        let found = self.history.recall(&job.recall).map_err(|e| e.to_string());
                        self.s.on_recalled(
                            self.now,
                            crate::server::store::history::Recalled {
                                ticket: job.ticket,
                                epoch: job.epoch,
                                found,
                            },
                        );
                    }
                    other => all.push(other),
                }
            }
        }
    }

    /// The changes so far, committed to the lab's database.
    fn commit(&mut self) {
        let changes = self.s.take_changes();
        self.db.commit(&changes).unwrap();
    }

    /// Uploads `data` as result file `name` the way ots-worker does:
    /// offer, chunks inside the credit, end.
    fn upload(&mut self, worker: &str, task: &TaskId, name: &str, data: &[u8]) -> Vec<Output> {
        self.upload_attempt(worker, task, 1, name, data)
    }

    fn upload_attempt(
        &mut self,
        worker: &str,
        task: &TaskId,
        attempt: u32,
        name: &str,
        data: &[u8],
    ) -> Vec<Output> {
        let size = data.len() as u64;
        let mut out = self.from(
            worker,
            Body::FileOffer {
                task: task.clone(),
                attempt,
                name: name.into(),
                size,
            },
        );
        let mut sent = 0u64;
        while sent < size {
            let until = out
                .iter()
                .rev()
                .find_map(|o| match o {
                    Output::Send {
                        body: Body::FileCredit { until, .. },
                        ..
                    } => Some(*until),
                    _ => None,
                })
                .unwrap_or_else(|| panic!("no credit: {out:?}"));
            let end = until.min(size).min(sent + 4);
            let mut e = env(
                false,
                0,
                Body::FileChunk {
                    task: task.clone(),
                    attempt,
                    name: name.into(),
                    offset: sent,
                },
            );
            e.raw = Some(Bytes::copy_from_slice(&data[sent as usize..end as usize]));
            self.s.on_message(self.now, &peer(worker), e);
            out.extend(self.outputs());
            sent = end;
        }
        out.extend(self.from(
            worker,
            Body::FileEnd {
                task: task.clone(),
                attempt,
                name: name.into(),
                size,
                sha256: hex::encode(Sha256::digest(data)),
            },
        ));
        out
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
    }

    fn tick(&mut self) -> Vec<Output> {
        self.s.on_tick(self.now);
        self.outputs()
    }

    fn from(&mut self, worker: &str, body: Body) -> Vec<Output> {
        self.s
            .on_message(self.now, &peer(worker), env(false, 0, body));
        self.outputs()
    }

    fn mandatory(&mut self, worker: &str, body: Body) -> Vec<Output> {
        let seq = self.seq.entry(worker.to_string()).or_insert(0);
        *seq += 1;
        let seq = *seq;
        self.s
            .on_message(self.now, &peer(worker), env(true, seq, body));
        self.outputs()
    }

    fn register(&mut self, worker: &str, device: &str) -> Vec<Output> {
        let mut out = self.from(
            worker,
            Body::Hello {
                worker: worker.into(),
                session: format!("{worker}-session"),
                device: DeviceProps::parse(device).unwrap(),
                running: vec![],
                version: None,
            },
        );
        out.extend(self.from(worker, Body::Ready));
        out
    }

    fn request(&mut self, body: Body) -> Body {
        self.s.on_message(self.now, &client(), env(false, 0, body));
        let out = self.outputs();
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
                lease: None,
                on_lease: None,
                series: None,
                device: DeviceSpec::parse(device).unwrap(),
                image: "img".into(),
                packages: packages.iter().map(|p| p.to_string()).collect(),
                distribution,
                timeout_secs: 60,
                options: BTreeMap::new(),
                queue_anyway: anyway,
                secrets: Default::default(),
                owner: None,
                inputs: Default::default(),
                priority: Default::default(),
                devices: Vec::new(),
                notify: Vec::new(),
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
            out.extend(self.upload(worker, task, "r.xml", xml.as_bytes()));
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
                file_problems: vec![],
            },
        ));
        out
    }

    /// A registered worker running the only task of a new testrun
    /// (dispatched and accepted).
    fn running_task(&mut self, worker: &str) -> (RunId, TaskId) {
        self.register(worker, "devicegroup:g");
        let run = run_id(&self.submit("devicegroup:g", &["p"], Distribution::Default, false));
        let task = self.status(&run).tasks[0].task.clone();
        self.mandatory(
            worker,
            Body::TaskAccepted {
                task: task.clone(),
                attempt: 1,
            },
        );
        (run, task)
    }

    /// The worker's final report of `task`: exit 0 after `log_lines` lines.
    fn report_ok(&mut self, worker: &str, task: &TaskId, log_lines: u64) -> Vec<Output> {
        self.mandatory(
            worker,
            Body::TaskFinished {
                task: task.clone(),
                attempt: 1,
                outcome: Outcome {
                    exit_code: Some(0),
                    ..Outcome::default()
                },
                log_lines,
                files: vec![],
                file_problems: vec![],
            },
        )
    }

    /// The testrun's status as `status` answers it (read back from the
    /// database when it is not in memory).
    fn status(&mut self, run: &RunId) -> RunStatus {
        if let Ok(status) = self.s.status(run) {
            return status;
        }
        self.s.on_message(
            self.now,
            &client(),
            env(
                false,
                0,
                Body::GetStatus {
                    request: 7_777,
                    run: run.clone(),
                },
            ),
        );
        self.outputs()
            .into_iter()
            .find_map(|o| match o {
                Output::Send {
                    body:
                        Body::Status {
                            request: 7_777,
                            status,
                        },
                    ..
                } => Some(status),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no status of {run}"))
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
    let (run, task) = lab.running_task("w");
    let finished = Body::TaskFinished {
        task: task.clone(),
        attempt: 1,
        outcome: Outcome {
            exit_code: Some(0),
            ..Outcome::default()
        },
        log_lines: 0,
        files: vec![],
        file_problems: vec![],
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
            file_problems: vec![],
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
    let (run, task) = lab.running_task("w1");
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
            file_problems: vec![],
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
    let (run, task) = lab.running_task("w1");
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
            version: None,
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
            file_problems: vec![],
        },
    );
    let st = lab.status(&run);
    assert_eq!(st.state, RunState::Cancelled);
    assert_eq!(st.verdict, None);
}

/// A packed log message of `lines` (one part per (stream, lines) group).
fn packed(task: &TaskId, groups: &[(u64, Stream, &[&str])]) -> Envelope {
    let mut parts = Vec::new();
    let mut raw = Vec::new();
    for (first, stream, lines) in groups {
        let start = raw.len();
        for l in *lines {
            crate::protocol::logtext::escape_into(&mut raw, l.as_bytes());
            raw.push(b'\n');
        }
        parts.push(LogPart {
            first: *first,
            count: lines.len() as u32,
            stream: *stream,
            bytes: (raw.len() - start) as u32,
        });
    }
    let mut e = env(
        false,
        0,
        Body::LogPacked {
            task: task.clone(),
            attempt: 1,
            parts,
        },
    );
    e.raw = Some(Bytes::from(raw));
    e
}

#[test]
fn packed_log_lines_are_stored_as_sent_once_with_prefixes_and_exact_gaps() {
    let mut lab = Lab::new();
    let (run, task) = lab.running_task("w");
    let now = lab.now;
    let send = |lab: &mut Lab, e: Envelope| {
        lab.s.on_message(now, &peer("w"), e);
        lab.outputs()
    };
    send(
        &mut lab,
        packed(
            &task,
            &[
                (1, Stream::Stdout, &["one", "two \\ back"]),
                (3, Stream::Stderr, &["oops\rcr"]),
            ],
        ),
    );
    // Resent and overlapping: only line 4 is new.
    send(
        &mut lab,
        packed(&task, &[(2, Stream::Stdout, &["two", "x", "four"])]),
    );
    // A gap (5..=6), then 7.
    send(&mut lab, packed(&task, &[(7, Stream::Worker, &["seven"])]));
    lab.report_ok("w", &task, 7);
    let t = &lab.status(&run).tasks[0];
    assert_eq!(t.log_lines_stored, 5);
    assert_eq!(t.log_gaps, vec![(5, 6)]);
    let stored = String::from_utf8(lab.s.store.logs[&task].clone()).unwrap();
    assert_eq!(
        stored,
        "one\ntwo \\\\ back\n[stderr] oops\\rcr\nfour\n[ots-worker] seven\n"
    );
    assert_eq!(lab.s.counters["log_packed_slow_path"], 1);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 64, ..Default::default() })]

    /// Packed parts in any order, overlapping, resent, of any stream:
    /// every line number is stored exactly once, and the stored log holds
    /// exactly those lines.
    #[test]
    fn packed_parts_in_any_order_and_overlap_are_stored_exactly_once(
        msgs in proptest::collection::vec((1u64..80, 1u32..12, 0u8..4, proptest::bool::ANY), 1..40)
    ) {
        let mut lab = Lab::new();
        let (_, task) = lab.running_task("w");
        let mut expected = std::collections::BTreeSet::new();
        for (first, count, stream, two_parts) in msgs {
            let stream = [Stream::Stdout, Stream::Stderr, Stream::Worker, Stream::Serial][stream as usize];
            let lines: Vec<String> = (first..first + u64::from(count))
                .map(|seq| format!("line {seq} \\ back\rcr"))
                .collect();
            let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
            // Sometimes the same lines as two parts of one message.
            let half = refs.len() / 2;
            let e = if two_parts && half > 0 {
                packed(&task, &[(first, stream, &refs[..half]), (first + half as u64, Stream::Stdout, &refs[half..])])
            } else {
                packed(&task, &[(first, stream, &refs)])
            };
            lab.s.on_message(lab.now, &peer("w"), e);
            lab.outputs();
            expected.extend(first..first + u64::from(count));
        }
        let t = &lab.s.tasks[&task];
        proptest::prop_assert_eq!(t.log.len(), expected.len() as u64);
        let stored = String::from_utf8(lab.s.store.logs[&task].clone()).unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for l in stored.lines() {
            let seq: u64 = l.split("line ").nth(1).and_then(|r| r.split(' ').next()).and_then(|n| n.parse().ok()).unwrap();
            proptest::prop_assert!(seen.insert(seq), "line {} stored twice", seq);
            proptest::prop_assert!(l.ends_with("\\\\ back\\rcr"), "{:?}", l);
        }
        proptest::prop_assert_eq!(seen, expected);
    }
}

#[test]
fn packed_lines_past_the_task_log_limit_are_refused_and_counted_as_lost() {
    let mut lab = Lab::new();
    lab.s.cfg.limits.max_task_log_bytes = 25;
    let (_, task) = lab.running_task("w");
    let now = lab.now;
    // 5 lines of 5 bytes fill the 25 bytes, the 6th would pass them: the
    // message goes line by line. Then the log is full and later messages
    // are refused whole, without looking at their lines.
    for e in [
        packed(
            &task,
            &[(
                1,
                Stream::Stdout,
                &["1111", "2222", "3333", "4444", "5555", "6666"],
            )],
        ),
        packed(&task, &[(7, Stream::Stdout, &["x"])]),
        packed(&task, &[(8, Stream::Stdout, &["y", "z"])]),
        packed(&task, &[(10, Stream::Stderr, &["w"])]),
    ] {
        lab.s.on_message(now, &peer("w"), e);
        lab.outputs();
    }
    let t = &lab.s.tasks[&task];
    assert_eq!(t.log_bytes, 25);
    assert_eq!(t.log.len(), 5, "1-5 stored");
    assert_eq!(t.log_refused, 5, "6, 7, 8, 9, 10");
    assert_eq!(lab.s.counters["log_lines_over_limit"], 5);
    assert_eq!(lab.s.counters["log_packed_slow_path"], 1);
    let stored = String::from_utf8(lab.s.store.logs[&task].clone()).unwrap();
    assert_eq!(stored, "1111\n2222\n3333\n4444\n5555\n");
}

#[test]
fn log_lines_are_stored_once_and_gaps_are_reported_exactly() {
    let mut lab = Lab::new();
    let (run, task) = lab.running_task("w");
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
    lab.report_ok("w", &task, 30);
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

/// What the server told `worker` about result file `name`.
fn file_answers<'a>(out: &'a [Output], name: &str) -> Vec<&'a Body> {
    out.iter()
        .filter_map(|o| match o {
            Output::Send { body, .. } => match body {
                Body::FileCredit { name: n, .. }
                | Body::FileStored { name: n, .. }
                | Body::FileRefused { name: n, .. }
                    if n == name =>
                {
                    Some(body)
                }
                _ => None,
            },
            _ => None,
        })
        .collect()
}

fn refused_code(out: &[Output], name: &str) -> Option<ErrorCode> {
    file_answers(out, name).into_iter().find_map(|b| match b {
        Body::FileRefused { code, .. } => Some(*code),
        _ => None,
    })
}

fn accepted_task(lab: &mut Lab) -> (RunId, TaskId) {
    let (run, task) = lab.running_task("w");
    (run, task)
}

#[test]
fn traversal_in_result_file_names_is_refused_with_a_typed_error() {
    let mut lab = Lab::new();
    let (_, task) = accepted_task(&mut lab);
    let out = lab.from(
        "w",
        Body::FileOffer {
            task: task.clone(),
            attempt: 1,
            name: "../../etc/passwd".into(),
            size: 1,
        },
    );
    assert_eq!(
        refused_code(&out, "../../etc/passwd"),
        Some(ErrorCode::BadFileName),
        "{out:?}"
    );
    assert!(!lab.dir.path().join("etc").exists());
    assert!(!lab
        .dir
        .path()
        .join("tasks")
        .join(&task)
        .join("files")
        .exists());
}

#[test]
fn an_upload_is_stored_once_verified_and_resumes_where_the_server_has_it() {
    let mut lab = Lab::new();
    lab.s.cfg.limits.file_window_bytes = 8;
    let (_, task) = accepted_task(&mut lab);
    let data = b"0123456789abcdef";
    let out = lab.upload("w", &task, "a.bin", data);
    assert!(
        matches!(
            file_answers(&out, "a.bin").last(),
            Some(Body::FileStored { size: 16, .. })
        ),
        "{out:?}"
    );
    let stored = lab.dir.path().join("tasks").join(&task).join("files/a.bin");
    assert_eq!(std::fs::read(stored).unwrap(), data);
    // Offered again (an answer was lost): stored once, answered at once.
    let out = lab.from(
        "w",
        Body::FileOffer {
            task: task.clone(),
            attempt: 1,
            name: "a.bin".into(),
            size: 16,
        },
    );
    assert!(
        matches!(
            file_answers(&out, "a.bin")[..],
            [Body::FileCredit {
                have: 16,
                resume: true,
                ..
            }]
        ),
        "{out:?}"
    );

    // Half sent, then the connection is lost: the new offer resumes at 8.
    let offer = |lab: &mut Lab| {
        lab.from(
            "w",
            Body::FileOffer {
                task: task.clone(),
                attempt: 1,
                name: "c.bin".into(),
                size: 16,
            },
        )
    };
    let chunk = |lab: &mut Lab, offset: usize, end: usize| {
        let mut e = env(
            false,
            0,
            Body::FileChunk {
                task: task.clone(),
                attempt: 1,
                name: "c.bin".into(),
                offset: offset as u64,
            },
        );
        e.raw = Some(Bytes::copy_from_slice(&data[offset..end]));
        lab.s.on_message(lab.now, &peer("w"), e);
        lab.outputs()
    };
    let out = offer(&mut lab);
    assert!(
        matches!(
            file_answers(&out, "c.bin")[..],
            [Body::FileCredit {
                have: 0,
                until: 8,
                resume: true,
                ..
            }]
        ),
        "{out:?}"
    );
    // Beyond the credit: dropped and counted.
    chunk(&mut lab, 0, 12);
    assert_eq!(lab.s.counters()["file_chunks_over_credit"], 1);
    chunk(&mut lab, 0, 8);
    // A late chunk of an older connection: dropped, counted.
    chunk(&mut lab, 2, 4);
    assert_eq!(lab.s.counters()["file_chunks_out_of_order"], 1);
    let out = offer(&mut lab);
    assert!(
        matches!(
            file_answers(&out, "c.bin")[..],
            [Body::FileCredit {
                have: 8,
                until: 16,
                resume: true,
                ..
            }]
        ),
        "{out:?}"
    );
    chunk(&mut lab, 8, 16);
    let out = lab.from(
        "w",
        Body::FileEnd {
            task: task.clone(),
            attempt: 1,
            name: "c.bin".into(),
            size: 16,
            sha256: hex::encode(Sha256::digest(data)),
        },
    );
    assert!(
        matches!(file_answers(&out, "c.bin")[..], [Body::FileStored { .. }]),
        "{out:?}"
    );
    assert_eq!(lab.s.upload_credit, 0, "every credit back in the pool");
}

#[test]
fn a_damaged_upload_is_restarted_once_then_refused_as_damaged() {
    let mut lab = Lab::new();
    let (run, task) = accepted_task(&mut lab);
    let data = b"the true content";
    let send_with = |lab: &mut Lab, sha: &str| {
        let mut e = env(
            false,
            0,
            Body::FileChunk {
                task: task.clone(),
                attempt: 1,
                name: "b.bin".into(),
                offset: 0,
            },
        );
        e.raw = Some(Bytes::copy_from_slice(data));
        lab.s.on_message(lab.now, &peer("w"), e);
        lab.outputs();
        lab.from(
            "w",
            Body::FileEnd {
                task: task.clone(),
                attempt: 1,
                name: "b.bin".into(),
                size: data.len() as u64,
                sha256: sha.into(),
            },
        )
    };
    lab.from(
        "w",
        Body::FileOffer {
            task: task.clone(),
            attempt: 1,
            name: "b.bin".into(),
            size: data.len() as u64,
        },
    );
    let wrong = "0".repeat(64);
    let out = send_with(&mut lab, &wrong);
    assert!(
        matches!(
            file_answers(&out, "b.bin")[..],
            [Body::FileCredit {
                have: 0,
                resume: true,
                ..
            }]
        ),
        "restarted from 0: {out:?}"
    );
    let out = send_with(&mut lab, &wrong);
    assert_eq!(
        refused_code(&out, "b.bin"),
        Some(ErrorCode::Damaged),
        "{out:?}"
    );
    assert_eq!(lab.s.counters()["file_hash_mismatches"], 2);
    let out = lab.mandatory(
        "w",
        Body::TaskFinished {
            task: task.clone(),
            attempt: 1,
            outcome: Outcome {
                exit_code: Some(0),
                ..Outcome::default()
            },
            log_lines: 0,
            files: vec![FileInfo {
                name: "b.bin".into(),
                size: data.len() as u64,
                sha256: wrong.clone(),
            }],
            file_problems: vec![],
        },
    );
    assert_eq!(acks_to(&out, "w").len(), 1, "{out:?}");
    let st = lab.status(&run);
    assert_eq!(st.tasks[0].verdict, Some(Verdict::Error));
    assert!(
        st.tasks[0].reason.as_deref().unwrap().contains("damaged"),
        "{:?}",
        st.tasks[0].reason
    );
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
/// The scheduler stops dead; a new one restores what the lab's database
/// holds (what ended is read back from it on demand).
fn crash_and_restart(lab: &mut Lab) {
    lab.commit();
    let snap = lab.db.load().unwrap();
    let cfg = lab.s.cfg.clone();
    lab.s = Scheduler::restore(
        cfg,
        MemoryStore::default(),
        "srv2".into(),
        &snap,
        (lab.now, unix_ms_now()),
    )
    .unwrap();
    lab.s.set_wall_clock(lab.t0, 1_000_000);
}

#[test]
fn after_a_restart_a_resent_report_that_was_applied_is_acked_not_reapplied() {
    let mut lab = Lab::new();
    let (run, task) = lab.running_task("w");
    let finished = Body::TaskFinished {
        task: task.clone(),
        attempt: 1,
        outcome: Outcome {
            exit_code: Some(0),
            ..Outcome::default()
        },
        log_lines: 0,
        files: vec![],
        file_problems: vec![],
    };
    lab.mandatory("w", finished.clone()); // applied; the ack is lost in the crash
    crash_and_restart(&mut lab);
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
    crash_and_restart(&mut lab);
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
            version: None,
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
    crash_and_restart(&mut lab);
    let next = run_id(&lab.submit("devicegroup:g", &["p"], Distribution::Default, false));
    assert_ne!(next, run);
}

/// A dispatch lost with the server (committed, never acknowledged): the
/// worker that comes back without the task gets the same attempt again,
/// and no infrastructure failure is counted against it. One it had
/// accepted and lost is a failure, as before.
#[test]
fn after_a_restart_a_dispatch_never_accepted_goes_to_its_worker_again() {
    let mut lab = Lab::new();
    lab.register("w", "devicegroup:g");
    let run = run_id(&lab.submit("devicegroup:g", &["p"], Distribution::Default, false));
    let task = lab.status(&run).tasks[0].task.clone();
    assert_eq!(lab.status(&run).tasks[0].state, TaskState::Dispatched);
    crash_and_restart(&mut lab);
    assert_eq!(lab.status(&run).tasks[0].state, TaskState::Held);
    let out = lab.from("w", hello("w", "w-session"));
    let sent: Vec<u32> = out
        .iter()
        .filter_map(|o| match o {
            Output::Send {
                body: Body::Dispatch { spec },
                ..
            } if spec.task == task => Some(spec.attempt),
            _ => None,
        })
        .collect();
    assert_eq!(sent, vec![1], "the same attempt, once: {out:?}");
    let st = lab.status(&run);
    assert_eq!(
        (st.tasks[0].state, st.tasks[0].attempts),
        (TaskState::Dispatched, 1)
    );
    assert_eq!(
        lab.s
            .counters()
            .get("infrastructure_failures")
            .copied()
            .unwrap_or(0),
        0
    );
    assert_eq!(
        lab.s
            .counters()
            .get("dispatches_resent")
            .copied()
            .unwrap_or(0),
        1
    );
    lab.complete("w", &task, 0, Some(PASSING));
    assert_eq!(lab.status(&run).verdict, Some(Verdict::Pass));

    // Accepted, then gone from the worker: a failure, re-run elsewhere.
    lab.from("w", Body::Ready);
    let run = run_id(&lab.submit("devicegroup:g", &["p"], Distribution::Default, false));
    let task = lab.status(&run).tasks[0].task.clone();
    lab.mandatory(
        "w",
        Body::TaskAccepted {
            task: task.clone(),
            attempt: 1,
        },
    );
    crash_and_restart(&mut lab);
    lab.from("w", hello("w", "w-session"));
    assert_eq!(
        lab.s
            .counters()
            .get("infrastructure_failures")
            .copied()
            .unwrap_or(0),
        1
    );
    let st = lab.status(&run);
    assert!(
        st.tasks[0]
            .history
            .iter()
            .any(|h| h.state == ProgressState::Requeued),
        "{st:?}"
    );
}

#[test]
fn an_interrupted_attempt_is_requeued() {
    let mut lab = Lab::new();
    let (run, task) = lab.running_task("w");
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
            file_problems: vec![],
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
        },
        Body::FileOffer {
            task: task.clone(),
            attempt: 1,
            name: "a/b.xml".into(),
            size: 9,
        },
        Body::FileEnd {
            task: task.clone(),
            attempt: 1,
            name: "a/b.xml".into(),
            size: 9,
            sha256: "0".repeat(64),
        },
        Body::TaskFinished {
            task: task.clone(),
            attempt: 1,
            outcome: Outcome::default(),
            log_lines: 9,
            files: vec![],
            file_problems: vec![],
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
        let mut h = Header::best_effort(body.class(), Some(&task));
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

// ---- issue 7: hostile and broken peers ------------------------------------

fn errors_to(out: &[Output], who: &str) -> Vec<(ErrorCode, Option<u64>, String)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Send {
                peer: p,
                body: Body::Error {
                    code, seq, message, ..
                },
                ..
            } if *p == peer(who) => Some((*code, *seq, message.clone())),
            _ => None,
        })
        .collect()
}

fn acks_to(out: &[Output], who: &str) -> Vec<u64> {
    out.iter()
        .filter_map(|o| match o {
            Output::Send {
                peer: p,
                body: Body::Ack { seq },
                ..
            } if *p == peer(who) => Some(*seq),
            _ => None,
        })
        .collect()
}

fn hello(worker: &str, session: &str) -> Body {
    Body::Hello {
        worker: worker.into(),
        session: session.into(),
        device: DeviceProps::parse("devicegroup:g").unwrap(),
        running: vec![],
        version: None,
    }
}

#[test]
fn a_second_live_worker_with_the_same_name_is_refused_and_numbering_never_restarts() {
    let mut lab = Lab::new();
    lab.register("w1", "devicegroup:g");
    let run = run_id(&lab.submit("devicegroup:g", &["p"], Distribution::Default, false));
    let first_seq = lab
        .s
        .workers
        .get("w1")
        .map(|w| w.outbox.next_seq())
        .unwrap();
    assert!(first_seq > 1, "a dispatch was numbered");
    // Same name, another session, on another connection: refused.
    lab.s.on_message(
        lab.now,
        &peer("impostor"),
        env(false, 0, hello("w1", "other-session")),
    );
    let out = lab.s.take_outputs();
    let errs = errors_to(&out, "impostor");
    assert_eq!(errs.len(), 1, "{out:?}");
    assert_eq!(errs[0].0, ErrorCode::NameInUse);
    assert!(errs[0].2.contains("in use"));
    assert_eq!(lab.s.counters()["hello_name_in_use"], 1);
    // The real worker's task is untouched.
    assert_eq!(lab.status(&run).tasks[0].worker.as_deref(), Some("w1"));
    // Once the first is lost, a new session may take the name; the
    // server's numbering for it goes on, never back to 1.
    lab.advance(HB * 10);
    lab.tick();
    lab.s.on_message(
        lab.now,
        &peer("w1b"),
        env(false, 0, hello("w1", "other-session")),
    );
    lab.s.take_outputs();
    assert!(lab.s.workers["w1"].outbox.next_seq() >= first_seq);
}

#[test]
fn a_restarted_worker_with_its_session_takes_over_at_once() {
    let mut lab = Lab::new();
    lab.register("w1", "devicegroup:g");
    // Same session id (same state directory), new connection: welcomed.
    lab.s.on_message(
        lab.now,
        &peer("w1-again"),
        env(false, 0, hello("w1", "w1-session")),
    );
    let out = lab.s.take_outputs();
    assert!(errors_to(&out, "w1-again").is_empty(), "{out:?}");
    assert!(out.iter().any(|o| matches!(
        o,
        Output::Send {
            body: Body::Welcome { .. },
            ..
        }
    )));
}

#[test]
fn oversized_files_and_a_full_result_area_are_refused_at_the_offer() {
    let mut lab = Lab::new();
    lab.s.cfg.limits.max_file_bytes = 1000;
    lab.s.cfg.limits.max_stored_file_bytes = 2000;
    let (run, task) = accepted_task(&mut lab);
    let offer = |lab: &mut Lab, name: &str, size: u64| {
        lab.from(
            "w",
            Body::FileOffer {
                task: task.clone(),
                attempt: 1,
                name: name.into(),
                size,
            },
        )
    };
    // Over the per-file limit: refused before any byte is sent.
    let out = offer(&mut lab, "big.bin", 5000);
    assert_eq!(
        refused_code(&out, "big.bin"),
        Some(ErrorCode::LimitReached),
        "{out:?}"
    );
    // The result area's quota: 900 + 900 fit, 900 more do not.
    lab.upload("w", &task, "one.bin", &[1u8; 900]);
    let out = offer(&mut lab, "two.bin", 900);
    assert!(refused_code(&out, "two.bin").is_none(), "{out:?}");
    let out = offer(&mut lab, "r.xml", 900);
    assert_eq!(
        refused_code(&out, "r.xml"),
        Some(ErrorCode::StorageFailed),
        "{out:?}"
    );
    // The final report does not wait for refused files; the verdict says why.
    let out = lab.mandatory(
        "w",
        Body::TaskFinished {
            task: task.clone(),
            attempt: 1,
            outcome: Outcome {
                exit_code: Some(0),
                ..Outcome::default()
            },
            log_lines: 0,
            files: vec![FileInfo {
                name: "r.xml".into(),
                size: 900,
                sha256: "0".repeat(64),
            }],
            file_problems: vec![],
        },
    );
    assert_eq!(acks_to(&out, "w").len(), 1, "{out:?}");
    let st = lab.status(&run);
    assert_eq!(st.tasks[0].verdict, Some(Verdict::Error));
    assert!(
        st.tasks[0].reason.as_deref().unwrap().contains("refused"),
        "{:?}",
        st.tasks[0].reason
    );
}

#[test]
fn log_lines_every_other_number_and_past_the_size_limit_are_bounded_and_counted() {
    let mut lab = Lab::new();
    lab.s.cfg.limits.max_log_gaps = 100;
    lab.s.cfg.limits.max_task_log_bytes = 100_000;
    let (run, task) = lab.running_task("w1");
    let lines: Vec<LogLine> = (1..=5000u64)
        .map(|i| LogLine {
            seq: i * 2,
            stream: Stream::Stdout,
            text: "x".into(),
        })
        .collect();
    lab.from(
        "w1",
        Body::Log {
            task: task.clone(),
            attempt: 1,
            lines,
        },
    );
    let t = &lab.s.tasks[&task];
    assert!(t.log.runs() <= 100, "{} runs", t.log.runs());
    assert_eq!(lab.s.counters()["log_lines_over_limit"], 4900);
    // Consecutive lines still extend a run; the size limit stops them.
    let lines: Vec<LogLine> = (10_001..=20_000u64)
        .map(|i| LogLine {
            seq: i,
            stream: Stream::Stdout,
            text: "y".repeat(100),
        })
        .collect();
    lab.from(
        "w1",
        Body::Log {
            task: task.clone(),
            attempt: 1,
            lines,
        },
    );
    assert!(lab.s.tasks[&task].log_bytes <= 100_000);
    // Accounting holds: stored + lost = produced.
    lab.report_ok("w1", &task, 20_000);
    let st = lab.status(&run);
    let t = &st.tasks[0];
    let lost: u64 = t.log_gaps.iter().map(|(a, b)| b - a + 1).sum();
    assert_eq!(t.log_lines_stored + lost, 20_000);
}

#[test]
fn submits_past_the_open_task_limit_are_refused_with_limit_reached() {
    let mut lab = Lab::new();
    lab.s.cfg.limits.max_open_tasks = 5;
    lab.register("w1", "devicegroup:g");
    let reply = lab.submit(
        "devicegroup:g",
        &["a", "b", "c"],
        Distribution::Perpackage,
        false,
    );
    run_id(&reply);
    lab.s.take_changes(); // a commit: the open set is what is unfinished
    let reply = lab.submit(
        "devicegroup:g",
        &["d", "e", "f"],
        Distribution::Perpackage,
        false,
    );
    match reply {
        Body::Error {
            code,
            message,
            request,
            ..
        } => {
            assert_eq!(code, ErrorCode::LimitReached);
            assert_eq!(request, Some(1));
            assert!(message.contains("max_open_tasks"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn a_huge_timeout_never_overflows_the_clock_arithmetic() {
    // Decoding refuses it at the edge; the scheduler is safe regardless.
    let mut lab = Lab::new();
    lab.register("w1", "devicegroup:g");
    let reply = lab.request(Body::Submit {
        request: 1,
        testrun: TestrunRequest {
            lease: None,
            on_lease: None,
            series: None,
            device: DeviceSpec::parse("devicegroup:g").unwrap(),
            image: "img".into(),
            packages: vec!["p".into()],
            distribution: Distribution::Default,
            timeout_secs: u64::MAX,
            options: BTreeMap::new(),
            queue_anyway: false,
            secrets: Default::default(),
            owner: None,
            inputs: Default::default(),
            priority: Default::default(),
            devices: Vec::new(),
            notify: Vec::new(),
        },
    });
    let run = run_id(&reply);
    let task = lab.status(&run).tasks[0].task.clone();
    lab.mandatory("w1", Body::TaskAccepted { task, attempt: 1 });
    for _ in 0..5 {
        lab.advance(HB);
        lab.from("w1", Body::Heartbeat);
        lab.tick();
    }
    assert_eq!(lab.status(&run).tasks[0].state, TaskState::Running);
}

#[test]
fn a_task_refused_again_and_again_ends_in_error_instead_of_bouncing_forever() {
    let mut lab = Lab::new();
    lab.s.cfg.limits.max_refusals = 3;
    lab.register("w1", "devicegroup:g");
    let run = run_id(&lab.submit("devicegroup:g", &["p"], Distribution::Default, false));
    let task = lab.status(&run).tasks[0].task.clone();
    for _ in 0..4 {
        lab.mandatory(
            "w1",
            Body::TaskRefused {
                task: task.clone(),
                reason: RefuseReason::Expired,
                message: "stale".into(),
            },
        );
        lab.from("w1", Body::Ready);
    }
    let st = lab.status(&run);
    assert_eq!(st.tasks[0].verdict, Some(Verdict::Error));
    assert!(st.tasks[0]
        .reason
        .as_deref()
        .unwrap()
        .contains("refused by workers 4 times"));
}

#[test]
fn mandatory_numbers_far_ahead_are_refused_so_the_dedup_window_stays_small() {
    let mut lab = Lab::new();
    lab.register("w1", "devicegroup:g");
    lab.s.on_message(
        lab.now,
        &peer("w1"),
        env(
            true,
            DEDUP_AHEAD + 10,
            Body::TaskAccepted {
                task: "r1.1".into(),
                attempt: 1,
            },
        ),
    );
    let out = lab.s.take_outputs();
    let errs = errors_to(&out, "w1");
    assert_eq!(errs[0].0, ErrorCode::Invalid);
    assert_eq!(errs[0].1, Some(DEDUP_AHEAD + 10));
    assert_eq!(lab.s.workers["w1"].dedup.pending_gaps(), 0);
}

#[test]
fn the_worker_registry_is_bounded() {
    let mut lab = Lab::new();
    lab.s.cfg.limits.max_workers = 3;
    for i in 0..3 {
        lab.register(&format!("w{i}"), "devicegroup:g");
    }
    lab.s
        .on_message(lab.now, &peer("ghost"), env(false, 0, hello("ghost", "s")));
    let out = lab.s.take_outputs();
    assert_eq!(errors_to(&out, "ghost")[0].0, ErrorCode::LimitReached);
    assert_eq!(lab.s.workers.len(), 3);
    // A known name still registers again.
    lab.s.on_message(
        lab.now,
        &peer("w0b"),
        env(false, 0, hello("w0", "w0-session")),
    );
    let out = lab.s.take_outputs();
    assert!(errors_to(&out, "w0b").is_empty(), "{out:?}");
}

#[test]
fn the_worker_waiting_longest_gets_the_next_task_and_lost_workers_leave_the_ready_index() {
    let mut lab = Lab::new();
    for name in ["w2", "w0", "w1"] {
        lab.register(name, "devicegroup:g");
        lab.advance(Duration::from_millis(10));
    }
    lab.register("other", "devicegroup:h");
    assert_eq!(lab.s.ready["g"].len(), 3);
    let run = run_id(&lab.submit(
        "devicegroup:g",
        &["a", "b"],
        Distribution::Perpackage,
        false,
    ));
    let st = lab.status(&run);
    let workers: Vec<_> = st.tasks.iter().map(|t| t.worker.clone().unwrap()).collect();
    assert_eq!(workers, vec!["w2".to_string(), "w0".to_string()]);
    assert_eq!(lab.s.ready["g"].len(), 1, "only w1 still waits");
    // w1 is lost: it leaves the index, and a new task waits in the queue.
    lab.advance(HB * 2);
    for w in ["w2", "w0", "other"] {
        lab.from(w, Body::Heartbeat);
    }
    lab.advance(HB * 2);
    for w in ["w2", "w0", "other"] {
        lab.from(w, Body::Heartbeat);
    }
    lab.tick();
    assert!(!lab.s.ready.contains_key("g"), "{:?}", lab.s.ready);
    let run = run_id(&lab.submit("devicegroup:g", &["c"], Distribution::Default, false));
    assert_eq!(lab.status(&run).tasks[0].state, TaskState::Queued);
}

#[test]
fn repeated_hellos_keep_one_liveness_deadline_and_silence_is_still_caught() {
    let mut lab = Lab::new();
    lab.register("w1", "devicegroup:g");
    for _ in 0..100 {
        lab.s.on_message(
            lab.now,
            &peer("w1"),
            env(false, 0, hello("w1", "w1-session")),
        );
    }
    lab.s.take_outputs();
    let entries = |lab: &Lab| {
        lab.s
            .deadlines
            .iter()
            .filter(|d| matches!(&(d.0).1, timers::Due::Worker(n) if n == "w1"))
            .count()
    };
    assert_eq!(entries(&lab), 1);
    // Heard from within each window: still one entry, never lost.
    for _ in 0..10 {
        lab.advance(HB);
        lab.from("w1", Body::Heartbeat);
        lab.tick();
        assert_eq!(entries(&lab), 1);
    }
    assert_eq!(lab.s.workers["w1"].state, WorkerState::Idle);
    // Silent past the liveness window (ticking on time): lost.
    for _ in 0..5 {
        lab.advance(HB);
        lab.tick();
    }
    assert_eq!(lab.s.workers["w1"].state, WorkerState::Lost);
}

#[test]
fn retention_prunes_the_oldest_ended_testruns_past_the_size_limit() {
    let mut lab = Lab::new();
    // Keep at most one run's worth (each has an r.xml of PASSING).
    lab.s.cfg.retention_bytes = PASSING.len() as u64 + 10;
    lab.register("w", "devicegroup:g");
    let mut runs = Vec::new();
    for _ in 0..2 {
        let run = run_id(&lab.submit("devicegroup:g", &["p"], Distribution::Default, false));
        let task = lab.status(&run).tasks[0].task.clone();
        let dispatched = lab.tick();
        let seq = dispatched.iter().find_map(|o| match o {
            Output::Send {
                header,
                body: Body::Dispatch { .. },
                ..
            } => Some(header.seq),
            _ => None,
        });
        if let Some(seq) = seq {
            lab.from("w", Body::Ack { seq });
        }
        lab.complete("w", &task, 0, Some(PASSING));
        lab.from("w", Body::Ready);
        assert_eq!(lab.status(&run).verdict, Some(Verdict::Pass));
        runs.push((run, task));
    }
    lab.tick();
    let first = lab.status(&runs[0].0);
    let pruned = first.pruned.expect("the older run is pruned");
    assert!(pruned.reason.contains("retention.max_bytes"), "{pruned:?}");
    assert!(first.tasks[0].files.is_empty());
    assert!(!lab.dir.path().join("tasks").join(&runs[0].1).exists());
    // The newer one fits and stays, files and all.
    let second = lab.status(&runs[1].0);
    assert!(second.pruned.is_none());
    assert_eq!(second.tasks[0].files.len(), 1);
    assert!(lab
        .dir
        .path()
        .join("tasks")
        .join(&runs[1].1)
        .join("files/r.xml")
        .exists());
    assert_eq!(lab.s.counters()["runs_pruned"], 1);
    // Past the age limit, the newer one goes too.
    lab.s.cfg.retention_age = Duration::from_secs(3600);
    lab.advance(Duration::from_secs(3601));
    lab.from("w", Body::Heartbeat);
    lab.tick();
    let second = lab.status(&runs[1].0);
    assert!(second
        .pruned
        .expect("pruned by age")
        .reason
        .contains("max_age_hours"));
}

/// Issue 19, finding 3: input uploads are per user. While alice uploads
/// content X, bob offering X (same size) starts an upload of his own from
/// byte 0 — he neither learns alice's progress nor takes her upload over
/// — and his chunks never reach hers; alice's upload completes. Bob may
/// not name X in a submit until he has uploaded it himself.
#[test]
fn an_input_upload_in_progress_is_its_users_alone() {
    let mut lab = Lab::new();
    lab.s.cfg.secure = true;
    let data = b"eight by";
    let sha = hex::encode(Sha256::digest(data));
    let (alice, bob) = (peer("alice"), peer("bob"));
    for (p, name) in [(&alice, "alice"), (&bob, "bob")] {
        lab.s.on_authenticated(
            p,
            crate::security::Identity::User {
                name: name.into(),
                role: crate::security::Role::Submit,
            },
            "tcp://127.0.0.1:1".into(),
        );
    }
    let offer = |lab: &mut Lab, p: &PeerId, request: u64| {
        lab.s.on_message(
            lab.now,
            p,
            env(
                false,
                0,
                Body::InputOffer {
                    request,
                    sha256: sha.clone(),
                    size: 8,
                },
            ),
        );
        lab.outputs()
    };
    let chunk = |lab: &mut Lab, p: &PeerId, request: u64, offset: u64, bytes: &'static [u8]| {
        let mut e = env(
            false,
            0,
            Body::InputChunk {
                request,
                sha256: sha.clone(),
                offset,
            },
        );
        e.raw = Some(Bytes::from_static(bytes));
        lab.s.on_message(lab.now, p, e);
        lab.outputs()
    };
    let credit_have = |out: &[Output], to: &PeerId| {
        out.iter().find_map(|o| match o {
            Output::Send {
                peer,
                body: Body::InputCredit { have, .. },
                ..
            } if peer == to => Some(*have),
            _ => None,
        })
    };
    let out = offer(&mut lab, &alice, 1);
    assert_eq!(credit_have(&out, &alice), Some(0), "{out:?}");
    chunk(&mut lab, &alice, 1, 0, b"eigh");
    // Bob offers the same content: an upload of his own, from 0.
    let out = offer(&mut lab, &bob, 7);
    assert_eq!(credit_have(&out, &bob), Some(0), "{out:?}");
    assert_eq!(credit_have(&out, &alice), None, "{out:?}");
    chunk(&mut lab, &bob, 7, 0, b"EVIL");
    chunk(&mut lab, &alice, 1, 4, b"t by");
    lab.s.on_message(
        lab.now,
        &alice,
        env(
            false,
            0,
            Body::InputEnd {
                request: 1,
                sha256: sha.clone(),
                size: 8,
            },
        ),
    );
    let out = lab.outputs();
    assert!(
        out.iter().any(|o| matches!(o, Output::Send { peer, body: Body::InputStored { .. }, .. } if *peer == alice)),
        "{out:?}"
    );
    assert!(lab.s.may_use_input(&alice, &sha));
    assert!(
        !lab.s.may_use_input(&bob, &sha),
        "bob uploaded 4 wrong bytes only"
    );
    // A second offer from alice: stored, nothing to send.
    let out = offer(&mut lab, &alice, 2);
    assert!(
        out.iter().any(|o| matches!(
            o,
            Output::Send {
                body: Body::InputStored { .. },
                ..
            }
        )),
        "{out:?}"
    );
}

/// Issue 20, item 3: a worker removed from the registry (its key went)
/// and registered again in the same incarnation gets dispatches numbered
/// after the ones it saw before: the worker deduplicates per server
/// incarnation, so a reused number would be acknowledged and dropped.
#[test]
fn a_worker_removed_and_registered_again_keeps_the_numbering_of_its_dispatches() {
    let mut lab = Lab::new();
    let dispatch_seq = |out: &[Output]| {
        out.iter().find_map(|o| match o {
            Output::Send {
                header,
                body: Body::Dispatch { .. },
                ..
            } => Some(header.seq),
            _ => None,
        })
    };
    lab.register("w", "devicegroup:g");
    let submit = Body::Submit {
        request: 1,
        testrun: TestrunRequest {
            lease: None,
            on_lease: None,
            series: None,
            device: DeviceSpec::parse("devicegroup:g").unwrap(),
            image: "img".into(),
            packages: vec!["p".into()],
            distribution: Distribution::Default,
            timeout_secs: 60,
            options: BTreeMap::new(),
            queue_anyway: false,
            secrets: Default::default(),
            owner: None,
            inputs: Default::default(),
            priority: Default::default(),
            devices: Vec::new(),
            notify: Vec::new(),
        },
    };
    lab.s.on_message(lab.now, &client(), env(false, 0, submit));
    let first = dispatch_seq(&lab.outputs()).expect("a dispatch");
    lab.s.retain_workers(lab.now, |_| false);
    let out = lab.register("w", "devicegroup:g");
    let again = dispatch_seq(&out).expect("the re-queued task dispatched again");
    assert!(again > first, "dispatch numbered {again} after {first}");
}

/// Issue 21 (quotas): a user's unfinished tasks count against its own
/// quota until they end; another user is not held back by them.
#[test]
fn a_users_quota_counts_its_unfinished_tasks_until_they_end() {
    let mut lab = Lab::new();
    lab.s.cfg.secure = true;
    lab.s.cfg.limits.max_open_tasks_per_owner = 2;
    let (alice, bob) = (peer("alice"), peer("bob"));
    for (p, name) in [(&alice, "alice"), (&bob, "bob")] {
        lab.s.on_authenticated(
            p,
            crate::security::Identity::User {
                name: name.into(),
                role: crate::security::Role::Submit,
            },
            "tcp://127.0.0.1:1".into(),
        );
    }
    let submit = |lab: &mut Lab, p: &PeerId, packages: &[&str]| {
        let body = Body::Submit {
            request: 9,
            testrun: TestrunRequest {
                lease: None,
                on_lease: None,
                series: None,
                device: DeviceSpec::parse("devicegroup:nobody").unwrap(),
                image: "img".into(),
                packages: packages.iter().map(|p| p.to_string()).collect(),
                distribution: Distribution::Perpackage,
                timeout_secs: 60,
                options: BTreeMap::new(),
                queue_anyway: true,
                secrets: Default::default(),
                owner: None,
                inputs: Default::default(),
                priority: Default::default(),
                devices: Vec::new(),
                notify: Vec::new(),
            },
        };
        lab.s.on_message(lab.now, p, env(false, 0, body));
        let out = lab.outputs();
        lab.s.take_changes();
        out.into_iter().find_map(|o| match o {
            Output::Send { peer, body, .. } if peer == *p => Some(body),
            _ => None,
        })
    };
    let run = match submit(&mut lab, &alice, &["a", "b"]) {
        Some(Body::Submitted { run, .. }) => run,
        other => panic!("{other:?}"),
    };
    match submit(&mut lab, &alice, &["c"]) {
        Some(Body::Error {
            code: ErrorCode::LimitReached,
            message,
            ..
        }) => {
            assert!(message.contains("max_open_tasks_per_owner"), "{message}")
        }
        other => panic!("alice over her quota: {other:?}"),
    }
    assert!(matches!(
        submit(&mut lab, &bob, &["x", "y"]),
        Some(Body::Submitted { .. })
    ));
    // Alice's testrun ends (cancelled): her quota is free again.
    lab.s.on_message(
        lab.now,
        &alice,
        env(false, 0, Body::CancelRun { request: 10, run }),
    );
    lab.outputs();
    lab.s.take_changes();
    assert!(matches!(
        submit(&mut lab, &alice, &["c"]),
        Some(Body::Submitted { .. })
    ));
}

#[path = "estimate_tests.rs"]
mod estimate_tests;
#[path = "health_tests.rs"]
mod health_tests;
#[path = "notify_tests.rs"]
mod notify_tests;
#[path = "recall_tests.rs"]
mod recall_tests;
#[path = "web_tests.rs"]
mod web_tests;

/// The dispatches in `out` (for the dashboard's tests).
fn health_tests_specs(out: &[Output]) -> Vec<(String, TaskSpec)> {
    health_tests::specs(out)
}

/// Pongs leave before the turn's commit: `take_pongs` takes exactly them
/// and leaves every other output, in order, for after it.
#[test]
fn pongs_are_taken_apart_from_the_replies_that_wait_for_the_commit() {
    let mut lab = Lab::new();
    lab.s.on_message(
        lab.now,
        &client(),
        env(false, 0, Body::ListWorkers { request: 1 }),
    );
    lab.s
        .on_message(lab.now, &client(), env(false, 0, Body::Ping { request: 2 }));
    lab.s.on_message(
        lab.now,
        &client(),
        env(false, 0, Body::ListWorkers { request: 3 }),
    );
    let pongs = lab.s.take_pongs();
    assert_eq!(pongs.len(), 1);
    assert!(matches!(
        &pongs[0],
        Output::Send {
            body: Body::Pong { request: 2, .. },
            ..
        }
    ));
    let rest: Vec<u64> = lab
        .s
        .take_outputs()
        .into_iter()
        .filter_map(|o| match o {
            Output::Send {
                body: Body::Workers { request, .. },
                ..
            } => Some(request),
            _ => None,
        })
        .collect();
    assert_eq!(rest, vec![1, 3], "the other replies, in order");
    assert!(lab.s.take_pongs().is_empty());
}
