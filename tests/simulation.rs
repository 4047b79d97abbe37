//! Deterministic simulation: the real scheduler and real worker sessions
//! (the I/O-free state machines) connected by a simulated network that
//! drops, duplicates, delays and reorders messages from a seeded RNG, with a
//! fake clock. Thousands of seeds in seconds; each checks the invariants:
//! every task ends exactly once, no mandatory message has its effect twice,
//! every best-effort log line is stored once or accounted as lost.

use bytes::Bytes;
use ots::delivery::RetryPolicy;
use ots::protocol::*;
use ots::server::scheduler::{Output, Scheduler, SchedulerConfig};
use ots::server::store::MemoryStore;
use ots::worker::channel::{ResultFile, TaskEvent};
use ots::worker::session::{Action, Session, SessionConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::time::{Duration, Instant};

const JUNIT: &str = r#"<testsuite><testcase name="a"/></testsuite>"#;
const WALL0: u64 = 1_700_000_000_000;

#[derive(Clone, Copy)]
struct Faults {
    drop: f64,
    dup: f64,
    max_delay_ms: u64,
}

enum Event {
    /// Frames for the server from a worker connection.
    ToServer { peer: Bytes, frames: Vec<Bytes> },
    /// Frames for worker `w` on connection `conn`.
    ToWorker {
        w: usize,
        conn: u64,
        frames: Vec<Bytes>,
    },
    /// The fake conductor of worker `w` produces its next event.
    Conductor {
        w: usize,
        task: TaskId,
        attempt: u32,
        step: u32,
    },
    /// Worker `w` finished connecting (connection `conn`).
    Connected { w: usize, conn: u64 },
}

struct SimWorker {
    session: Session,
    conn: Option<u64>,
    next_conn: u64,
    /// Lines the conductor of each (task, attempt) will produce.
    produced: HashMap<(TaskId, u32), u64>,
    stopped: HashMap<(TaskId, u32), bool>,
}

struct Sim {
    rng: StdRng,
    t0: Instant,
    now_ms: u64,
    faults: Faults,
    queue: BinaryHeap<Reverse<(u64, u64, usize)>>,
    events: Vec<Option<Event>>,
    seq: u64,
    server: Scheduler<MemoryStore>,
    workers: Vec<SimWorker>,
    /// How many times each (task, attempt) was started anywhere.
    starts: HashMap<(TaskId, u32), u32>,
    /// Per directed link (worker, connection, direction): the latest
    /// delivery time, so each link is FIFO like the TCP under ZeroMQ.
    links: HashMap<(usize, u64, u8), u64>,
    desk: ots::server::files::Desk,
    _dir: tempfile::TempDir,
}

fn peer_of(w: usize, conn: u64) -> Bytes {
    Bytes::from(format!("w{w}-c{conn}"))
}

impl Sim {
    fn new(seed: u64, faults: Faults, workers: usize) -> Sim {
        let t0 = Instant::now();
        let cfg = SchedulerConfig {
            heartbeat: Duration::from_secs(1),
            liveness: 3,
            dispatch_ttl: Duration::from_secs(30),
            lost_grace: Duration::from_secs(5),
            max_attempts: 50,
            queue_timeout: Duration::from_secs(3600),
            backstop_grace: Duration::from_secs(60),
            retry: RetryPolicy {
                initial_ms: 300,
                factor: 2.0,
                cap_ms: 2000,
                jitter: true,
            },
            limits: Default::default(),
            retention_age: Duration::from_secs(3600),
            retention_bytes: u64::MAX,
            secure: false,
            secrets_key: None,
            events_key: None,
            ..SchedulerConfig::default()
        };
        let mut cfg = cfg;
        // The simulation is about delivery over a lossy network: lost
        // workers are the network's doing here, so none is taken out of
        // service for them (device health has its own tests).
        cfg.health.suspect_after = u32::MAX;
        // Small chunks and credit, so a 44-byte result file takes several
        // round trips through the lossy network.
        cfg.limits.file_window_bytes = 20;
        let mut server =
            Scheduler::new(cfg, MemoryStore::default(), format!("srv{seed}"), t0, WALL0);
        server.set_wall_clock(t0, WALL0);
        let dir = tempfile::tempdir().unwrap();
        let workers = (0..workers)
            .map(|i| SimWorker {
                session: Session::new(
                    SessionConfig {
                        heartbeat: Duration::from_secs(1),
                        liveness: 3,
                        log_buffer_lines: 40,
                        log_buffer_bytes: 1 << 20,
                        log_batch_lines: 7,
                        log_batch_delay: Duration::from_millis(20),
                        retry: RetryPolicy {
                            initial_ms: 300,
                            factor: 2.0,
                            cap_ms: 2000,
                            jitter: true,
                        },
                        delivery: Default::default(),
                        on_server_lost: Default::default(),
                        file_chunk_bytes: 16,
                        file_window_bytes: 32,
                    },
                    format!("w{i}"),
                    format!("sess{i}"),
                    DeviceProps::parse("devicegroup:g").unwrap(),
                    t0,
                ),
                conn: None,
                next_conn: 0,
                produced: HashMap::new(),
                stopped: HashMap::new(),
            })
            .collect();
        Sim {
            rng: StdRng::seed_from_u64(seed),
            t0,
            now_ms: 0,
            faults,
            queue: BinaryHeap::new(),
            events: Vec::new(),
            seq: 0,
            server,
            workers,
            starts: HashMap::new(),
            links: HashMap::new(),
            desk: ots::server::files::Desk::new(dir.path()),
            _dir: dir,
        }
    }

    fn now(&self) -> Instant {
        self.t0 + Duration::from_millis(self.now_ms)
    }

    fn at(&mut self, delay_ms: u64, event: Event) {
        self.seq += 1;
        self.events.push(Some(event));
        self.queue.push(Reverse((
            self.now_ms + delay_ms,
            self.seq,
            self.events.len() - 1,
        )));
    }

    /// Puts a message on a lossy, duplicating, delaying link. Within one
    /// link order is kept (TCP); across links and connections it is not.
    fn transmit(&mut self, link: (usize, u64, u8), make: impl Fn() -> Event) {
        if self.rng.gen_bool(self.faults.drop) {
            return;
        }
        let copies = if self.rng.gen_bool(self.faults.dup) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = self.rng.gen_range(1..=self.faults.max_delay_ms);
            let last = self.links.entry(link).or_insert(0);
            let at = (self.now_ms + delay).max(*last);
            *last = at;
            self.at(at - self.now_ms, make());
        }
    }

    fn server_outputs(&mut self) {
        loop {
            let outs = self.server.take_outputs();
            if outs.is_empty() {
                return;
            }
            self.server_outputs_once(outs);
        }
    }

    fn server_outputs_once(&mut self, outs: Vec<Output>) {
        for out in outs {
            match out {
                // The real file desk, synchronously: disk I/O is not what
                // this simulation is about.
                Output::File(job) => {
                    if let Some(done) = self.desk.run(job) {
                        let now = self.now();
                        self.server.on_file_done(now, done);
                    }
                }
                Output::Send {
                    peer,
                    header,
                    body,
                    raw,
                } => {
                    let frames = encode(&header, &body, raw);
                    let text = String::from_utf8_lossy(&peer).into_owned();
                    let Some((w, conn)) = text
                        .strip_prefix('w')
                        .and_then(|r| r.split_once("-c"))
                        .and_then(|(w, c)| Some((w.parse().ok()?, c.parse().ok()?)))
                    else {
                        continue; // the client: replies are not needed here
                    };
                    self.transmit((w, conn, 0), || Event::ToWorker {
                        w,
                        conn,
                        frames: frames.clone(),
                    });
                }
                // No notification targets in the simulation.
                Output::Notify(job) => panic!("unexpected notification {job:?}"),
                // A finished testrun is triaged against its series: there
                // is no database here, so the triage fails (its event
                // would leave without it). Its one testrun stays in
                // memory: nothing else is read.
                Output::Recall(job) => {
                    assert!(
                        matches!(job.recall, ots::server::store::history::Recall::Results(_)),
                        "unexpected history read {job:?}"
                    );
                    let now = self.now();
                    self.server.on_recalled(
                        now,
                        ots::server::store::history::Recalled {
                            ticket: job.ticket,
                            epoch: job.epoch,
                            found: Err("no database in the simulation".into()),
                        },
                    );
                }
                Output::Publish { topic, body, .. } if topic == "hb" => {
                    let header = Header {
                        v: PROTOCOL_VERSION,
                        class: body.class(),
                        mandatory: false,
                        seq: 0,
                        task: None,
                        epoch: None,
                    };
                    let frames = encode(&header, &body, None);
                    for w in 0..self.workers.len() {
                        if let Some(conn) = self.workers[w].conn {
                            self.transmit((w, conn, 1), || Event::ToWorker {
                                w,
                                conn,
                                frames: frames.clone(),
                            });
                        }
                    }
                }
                Output::Publish { .. } => {}
            }
        }
    }

    fn worker_actions(&mut self, w: usize, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Send { header, body, raw } => {
                    let Some(conn) = self.workers[w].conn else {
                        continue;
                    };
                    let frames = encode(&header, &body, raw);
                    let peer = peer_of(w, conn);
                    self.transmit((w, conn, 2), || Event::ToServer {
                        peer: peer.clone(),
                        frames: frames.clone(),
                    });
                }
                Action::Refused(_, why) => panic!("worker {w} refused by the server: {why}"),
                // The simulated conductors print far below the log limit.
                Action::LogFull(task) => panic!("worker {w}: log of {task} full"),
                // The simulation submits testruns, never leases.
                Action::Hold { task, .. } => panic!("worker {w}: a lease command for {task}"),
                Action::Reconnect(_) => {
                    let sw = &mut self.workers[w];
                    sw.conn = None;
                    sw.session.on_disconnected();
                    sw.next_conn += 1;
                    let conn = sw.next_conn;
                    let delay = self.rng.gen_range(50..500);
                    self.at(delay, Event::Connected { w, conn });
                }
                Action::StartTask(spec) => {
                    let key = (spec.task.clone(), spec.attempt);
                    *self.starts.entry(key.clone()).or_default() += 1;
                    let lines = self.rng.gen_range(0..60);
                    self.workers[w].produced.insert(key.clone(), lines);
                    self.workers[w].stopped.insert(key, false);
                    self.at(
                        10,
                        Event::Conductor {
                            w,
                            task: spec.task,
                            attempt: spec.attempt,
                            step: 0,
                        },
                    );
                }
                Action::StopTask(task) => {
                    for (key, stopped) in self.workers[w].stopped.iter_mut() {
                        if key.0 == task {
                            *stopped = true;
                        }
                    }
                }
                // The result file is JUNIT; read at once, hashed whole.
                Action::ReadChunk(r) => {
                    let data = JUNIT.as_bytes();
                    let end = (r.offset + r.len).min(data.len() as u64);
                    let done = ots::worker::session::ReadDone {
                        task: r.task,
                        attempt: r.attempt,
                        name: r.name,
                        offset: r.offset,
                        epoch: r.epoch,
                        result: Ok((
                            Bytes::copy_from_slice(&data[r.offset as usize..end as usize]),
                            Some(hex::encode(Sha256::digest(data))),
                        )),
                    };
                    let now = self.now();
                    let actions = self.workers[w].session.on_read_done(now, done);
                    self.worker_actions(w, actions);
                }
                Action::TaskDone { .. } => {}
            }
        }
    }

    fn step_conductor(&mut self, w: usize, task: TaskId, attempt: u32, step: u32) {
        let key = (task.clone(), attempt);
        let produced = self.workers[w].produced[&key];
        let stopped = self.workers[w].stopped.get(&key).copied().unwrap_or(false);
        let event = if (step as u64) < produced && !stopped {
            let text = ots::protocol::logtext::PackedText::line(
                Stream::Stdout,
                &format!("{task} line {}", step + 1),
            );
            let delay = self.rng.gen_range(1..30);
            self.at(
                delay,
                Event::Conductor {
                    w,
                    task: task.clone(),
                    attempt,
                    step: step + 1,
                },
            );
            TaskEvent::Log {
                task,
                attempt,
                first: step as u64 + 1,
                text,
            }
        } else {
            let file = ResultFile {
                name: "r.xml".into(),
                size: JUNIT.len() as u64,
                mtime_ns: 1,
            };
            TaskEvent::Finished {
                task,
                attempt,
                outcome: Outcome {
                    exit_code: Some(0),
                    cancelled: stopped,
                    ..Outcome::default()
                },
                log_lines: (step as u64).min(produced),
                files: vec![file],
            }
        };
        let now = self.now();
        let actions = self.workers[w].session.on_task_event(now, event);
        self.worker_actions(w, actions);
    }

    fn run(&mut self, packages: usize, limit: Duration) -> RunStatus {
        for w in 0..self.workers.len() {
            self.workers[w].next_conn = 1;
            let delay = self.rng.gen_range(0..100);
            self.at(delay, Event::Connected { w, conn: 1 });
        }
        let now = self.now();
        let testrun = TestrunRequest {
            lease: None,
            on_lease: None,
            series: None,
            device: DeviceSpec::parse("devicegroup:g").unwrap(),
            image: "img".into(),
            packages: (1..=packages).map(|i| format!("p{i}")).collect(),
            distribution: Distribution::Perpackage,
            timeout_secs: 3600,
            options: BTreeMap::new(),
            queue_anyway: true,
            secrets: Default::default(),
            owner: None,
            inputs: Default::default(),
            priority: Default::default(),
            devices: Vec::new(),
            notify: Vec::new(),
        };
        let client = Bytes::from_static(b"client");
        let submit = Body::Submit {
            request: 1,
            testrun,
        };
        let header = Header {
            v: PROTOCOL_VERSION,
            class: Class::Control,
            mandatory: false,
            seq: 1,
            task: None,
            epoch: None,
        };
        self.server.on_message(
            now,
            &client,
            decode(encode(&header, &submit, None)).unwrap(),
        );
        let run = self
            .server
            .take_outputs()
            .into_iter()
            .find_map(|o| match o {
                Output::Send {
                    body: Body::Submitted { run, .. },
                    ..
                } => Some(run),
                _ => None,
            })
            .expect("submitted");
        let mut next_server_tick = 1000;
        let mut next_worker_tick = 20;
        while self.now_ms < limit.as_millis() as u64 {
            let next_event = self
                .queue
                .peek()
                .map(|Reverse((t, _, _))| *t)
                .unwrap_or(u64::MAX);
            let t = next_event.min(next_server_tick).min(next_worker_tick);
            self.now_ms = t;
            let now = self.now();
            if t == next_server_tick {
                next_server_tick += 1000;
                self.server.on_tick(now);
                self.server_outputs();
                let st = self.server.status(&run).unwrap();
                if st.state == RunState::Finished {
                    return st;
                }
            } else if t == next_worker_tick {
                next_worker_tick += 20;
                for w in 0..self.workers.len() {
                    let actions = self.workers[w].session.on_tick(now);
                    self.worker_actions(w, actions);
                }
            } else {
                let Reverse((_, _, idx)) = self.queue.pop().unwrap();
                match self.events[idx].take().unwrap() {
                    Event::ToServer { peer, frames } => {
                        let env = decode(frames).expect("our own frames decode");
                        self.server.on_message(now, &peer, env);
                        self.server_outputs();
                    }
                    Event::ToWorker { w, conn, frames } => {
                        if self.workers[w].conn != Some(conn) {
                            continue; // that connection is gone
                        }
                        let mut frames = frames;
                        if frames.len() == 3 && frames[2].is_empty() {
                            frames.pop();
                        }
                        let env = decode(frames).expect("our own frames decode");
                        let actions = self.workers[w].session.on_message(
                            now,
                            ots::worker::session::Arrival {
                                at: now,
                                wall_ms: WALL0 + self.now_ms,
                            },
                            env,
                        );
                        self.worker_actions(w, actions);
                    }
                    Event::Conductor {
                        w,
                        task,
                        attempt,
                        step,
                    } => self.step_conductor(w, task, attempt, step),
                    Event::Connected { w, conn } => {
                        if self.workers[w].next_conn != conn {
                            continue;
                        }
                        self.workers[w].conn = Some(conn);
                        let actions = self.workers[w].session.on_connected(now);
                        self.worker_actions(w, actions);
                    }
                }
            }
        }
        panic!(
            "testrun did not finish within {limit:?}: {:#?}",
            self.server.status(&run).unwrap()
        );
    }
}

/// Returns how many extra attempts the testrun needed.
fn check(seed: u64, faults: Faults) -> u32 {
    check_with(seed, faults, 2)
}

/// [`check`] with `workers` workers.
fn check_with(seed: u64, faults: Faults, workers: usize) -> u32 {
    let mut sim = Sim::new(seed, faults, workers);
    let status = sim.run(4, Duration::from_secs(600));
    assert_eq!(
        status.verdict,
        Some(Verdict::Pass),
        "seed {seed}: {status:#?}"
    );
    for t in &status.tasks {
        assert_eq!(t.state, TaskState::Finished, "seed {seed}");
        let produced = t.log_lines_produced.expect("report applied");
        let lost: u64 = t.log_gaps.iter().map(|(a, b)| b - a + 1).sum();
        assert_eq!(
            t.log_lines_stored + lost,
            produced,
            "seed {seed}: stored + lost = produced for {}",
            t.task
        );
        assert_eq!(t.files.len(), 1, "seed {seed}: result file stored once");
        assert_eq!(t.cases.map(|c| c.cases), Some(1), "seed {seed}");
    }
    // Each task ended exactly once: one `finished` progress event per task.
    let client = Bytes::from_static(b"client");
    let get = Body::GetEvents {
        request: 9,
        run: status.run.clone(),
        from: 0,
    };
    let header = Header {
        v: PROTOCOL_VERSION,
        class: Class::Control,
        mandatory: false,
        seq: 9,
        task: None,
        epoch: None,
    };
    sim.server.on_message(
        sim.now(),
        &client,
        decode(encode(&header, &get, None)).unwrap(),
    );
    let events = sim
        .server
        .take_outputs()
        .into_iter()
        .find_map(|o| match o {
            Output::Send {
                body: Body::Events { events, .. },
                ..
            } => Some(events),
            _ => None,
        })
        .expect("events reply");
    for t in &status.tasks {
        let ends = events
            .iter()
            .filter(|e| e.task.as_ref() == Some(&t.task) && e.state == ProgressState::Finished)
            .count();
        assert_eq!(ends, 1, "seed {seed}: {} ended {ends} times", t.task);
    }
    // Each (task, attempt) dispatch started at most once, anywhere.
    for ((task, attempt), n) in &sim.starts {
        assert_eq!(
            *n, 1,
            "seed {seed}: {task} attempt {attempt} started {n} times"
        );
    }
    status.tasks.iter().map(|t| t.attempts - 1).sum()
}

#[test]
fn reliable_network_every_task_passes_and_nothing_is_lost() {
    for seed in 0..50 {
        let mut sim = Sim::new(
            seed,
            Faults {
                drop: 0.0,
                dup: 0.0,
                max_delay_ms: 5,
            },
            2,
        );
        let status = sim.run(4, Duration::from_secs(120));
        assert_eq!(status.verdict, Some(Verdict::Pass));
        for t in &status.tasks {
            assert!(t.log_gaps.is_empty(), "seed {seed}: {t:?}");
            assert_eq!(t.attempts, 1);
        }
    }
}

#[test]
fn lossy_duplicating_reordering_network_many_seeds() {
    let faults = Faults {
        drop: 0.15,
        dup: 0.1,
        max_delay_ms: 150,
    };
    for seed in 0..300 {
        check(seed, faults);
    }
}

#[test]
fn very_lossy_network_still_converges() {
    let faults = Faults {
        drop: 0.35,
        dup: 0.2,
        max_delay_ms: 400,
    };
    // Four workers: an attempt lost with its worker runs again elsewhere,
    // and never on a worker that lost it twice (issue 21), so a task
    // needs more workers than losses of it to converge.
    let retries: u32 = (1000..1100).map(|seed| check_with(seed, faults, 4)).sum();
    // The point of this profile: workers are lost and tasks re-run.
    assert!(
        retries > 0,
        "no seed exercised a lost worker and a re-queued task"
    );
    eprintln!("very lossy: {retries} extra attempts over 100 seeds");
}
