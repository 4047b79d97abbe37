//! Property tests (proptest) for everything a peer's bytes reach: the frame
//! decoder, every message body, the scheduler and the worker session are
//! fed arbitrary and malformed sequences. Invariants: no panic, every
//! refusal counted, every mandatory message answered (ack or typed error),
//! nothing applied twice. CI runs a bounded number of cases
//! (`PROPTEST_CASES`, default below); `fuzz/` holds a `cargo fuzz` target
//! for the codec for longer, coverage-guided runs.

use bytes::Bytes;
use ots::protocol::*;
use ots::server::scheduler::{Output, Scheduler, SchedulerConfig};
use ots::server::store::MemoryStore;
use ots::worker::session::{Action, Arrival, Session, SessionConfig};
use proptest::prelude::*;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

fn id() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("r1.1".to_string()),
        Just("r1.2".to_string()),
        Just("r2.1".to_string()),
        Just("../../etc".to_string()),
        Just("/abs".to_string()),
        Just(String::new()),
        "[a-z0-9.]{1,8}",
        ".{0,80}",
    ]
}

fn number() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..8,
        Just(u64::MAX),
        Just(1 << 53),
        Just((1 << 53) + 1),
        Just(1 << 62),
        any::<u64>(),
    ]
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![".{0,40}", Just("a\nb\u{1b}[2J".to_string())]
}

fn device() -> DeviceProps {
    DeviceProps::parse("devicegroup:g").unwrap()
}

/// Bodies a worker or client could send, with hostile values mixed in.
fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        (id(), id()).prop_map(|(w, s)| Body::Hello {
            worker: w,
            session: s,
            device: device(),
            running: vec![],
            version: None,
        }),
        Just(Body::Ready),
        Just(Body::Heartbeat),
        (id(), 0u32..4).prop_map(|(task, attempt)| Body::TaskAccepted { task, attempt }),
        (id(), text()).prop_map(|(task, message)| Body::TaskRefused {
            task,
            reason: RefuseReason::Busy,
            message,
        }),
        (
            id(),
            0u32..4,
            prop::collection::vec((number(), text()), 0..20)
        )
            .prop_map(|(task, attempt, lines)| Body::Log {
                task,
                attempt,
                lines: lines
                    .into_iter()
                    .map(|(seq, text)| LogLine {
                        seq,
                        stream: Stream::Stdout,
                        text,
                    })
                    .collect(),
            }),
        (
            id(),
            0u32..4,
            prop::collection::vec((number(), any::<u32>(), 0u8..4, 0u32..40), 0..4)
        )
            .prop_map(|(task, attempt, parts)| Body::LogPacked {
                task,
                attempt,
                parts: parts
                    .into_iter()
                    .map(|(first, count, stream, bytes)| LogPart {
                        first,
                        count,
                        stream: [
                            Stream::Stdout,
                            Stream::Stderr,
                            Stream::Worker,
                            Stream::Serial
                        ][stream as usize],
                        bytes,
                    })
                    .collect(),
            }),
        (id(), 0u32..4, id(), number()).prop_map(|(task, attempt, name, offset)| {
            Body::FileChunk {
                task,
                attempt,
                name,
                offset,
            }
        }),
        (id(), 0u32..4, id(), number()).prop_map(|(task, attempt, name, size)| {
            Body::FileOffer {
                task,
                attempt,
                name,
                size,
            }
        }),
        (id(), 0u32..4, id(), number(), number(), any::<bool>()).prop_map(
            |(task, attempt, name, have, until, resume)| {
                Body::FileCredit {
                    task,
                    attempt,
                    name,
                    have,
                    until,
                    resume,
                }
            }
        ),
        (id(), 0u32..4, number(), any::<Option<i32>>()).prop_map(
            |(task, attempt, log_lines, exit_code)| Body::TaskFinished {
                task,
                attempt,
                outcome: Outcome {
                    exit_code,
                    ..Outcome::default()
                },
                log_lines,
                files: vec![],
                file_problems: vec![],
            }
        ),
        number().prop_map(|seq| Body::Ack { seq }),
        (number(), number(), prop::collection::vec(id(), 0..4)).prop_map(
            |(request, timeout_secs, packages)| Body::Submit {
                request,
                testrun: TestrunRequest {
                    lease: None,
                    on_lease: None,
                    series: None,
                    device: DeviceSpec::parse("devicegroup:g").unwrap(),
                    image: "img".into(),
                    packages,
                    distribution: Distribution::Perpackage,
                    timeout_secs,
                    options: BTreeMap::new(),
                    queue_anyway: true,
                    secrets: Default::default(),
                    owner: None,
                    inputs: Default::default(),
                    priority: Default::default(),
                    devices: Vec::new(),
                    notify: Vec::new(),
                },
            }
        ),
        (number(), id()).prop_map(|(request, run)| Body::GetStatus { request, run }),
        (number(), id(), number()).prop_map(|(request, run, from)| Body::GetEvents {
            request,
            run,
            from
        }),
        (number(), id()).prop_map(|(request, run)| Body::CancelRun { request, run }),
        (number(), id(), number(), number()).prop_map(|(request, task, offset, max)| {
            Body::GetLog {
                request,
                task,
                offset,
                max,
            }
        }),
    ]
}

/// A byte-level mutation of an encoded message.
#[derive(Clone, Debug)]
enum Mutation {
    None,
    Flip { frame: usize, at: usize, bits: u8 },
    Truncate { frame: usize, len: usize },
    Drop { frame: usize },
    Junk { frame: usize, bytes: Vec<u8> },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => Just(Mutation::None),
        2 => (0usize..3, any::<usize>(), 1u8..=255).prop_map(|(frame, at, bits)| Mutation::Flip { frame, at, bits }),
        1 => (0usize..3, any::<usize>()).prop_map(|(frame, len)| Mutation::Truncate { frame, len }),
        1 => (0usize..3).prop_map(|frame| Mutation::Drop { frame }),
        1 => (0usize..3, prop::collection::vec(any::<u8>(), 0..64)).prop_map(|(frame, bytes)| Mutation::Junk { frame, bytes }),
    ]
}

fn apply(mut frames: Vec<Bytes>, m: &Mutation) -> Vec<Bytes> {
    match m {
        Mutation::None => {}
        Mutation::Flip { frame, at, bits } => {
            if let Some(f) = frames.get_mut(*frame) {
                if !f.is_empty() {
                    let mut v = f.to_vec();
                    let i = at % v.len();
                    v[i] ^= bits;
                    *f = v.into();
                }
            }
        }
        Mutation::Truncate { frame, len } => {
            if let Some(f) = frames.get_mut(*frame) {
                let keep = if f.is_empty() { 0 } else { len % f.len() };
                *f = f.slice(..keep);
            }
        }
        Mutation::Drop { frame } => {
            if *frame < frames.len() {
                frames.remove(*frame);
            }
        }
        Mutation::Junk { frame, bytes } => {
            if let Some(f) = frames.get_mut(*frame) {
                *f = Bytes::from(bytes.clone());
            }
        }
    }
    frames
}

/// One input of the scheduler's world.
#[derive(Clone, Debug)]
struct Input {
    peer: u8,
    mandatory: bool,
    seq: u64,
    body: Body,
    raw: Option<Vec<u8>>,
    mutation: Mutation,
    advance_ms: u64,
}

fn input() -> impl Strategy<Value = Input> {
    (
        0u8..4,
        any::<bool>(),
        prop_oneof![0u64..16, number()],
        body(),
        prop::option::of(prop::collection::vec(any::<u8>(), 0..32)),
        mutation(),
        prop_oneof![Just(0u64), 0u64..3000],
    )
        .prop_map(
            |(peer, mandatory, seq, body, raw, mutation, advance_ms)| Input {
                peer,
                mandatory,
                seq,
                body,
                raw,
                mutation,
                advance_ms,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn the_decoder_never_panics_on_arbitrary_frames(
        frames in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..5)
    ) {
        let frames: Vec<Bytes> = frames.into_iter().map(Bytes::from).collect();
        if let Ok(env) = decode(frames) {
            // Whatever decodes is within every documented limit.
            prop_assert!(ots::protocol::check::check(&env).is_ok());
        }
    }

    #[test]
    fn the_decoder_never_panics_on_mutated_messages(
        body in body(), mandatory in any::<bool>(), seq in number(), m in mutation()
    ) {
        let h = Header { v: PROTOCOL_VERSION, class: body.class(), mandatory, seq, task: None , epoch: None };
        let frames = apply(encode(&h, &body, None), &m);
        match decode(frames) {
            Ok(env) => prop_assert!(ots::protocol::check::check(&env).is_ok()),
            Err(e) => {
                // A refusal names what was wrong.
                prop_assert!(!e.to_string().is_empty());
                if matches!(m, Mutation::None) {
                    if let Some(s) = e.seq() { prop_assert!(mandatory && s == seq); }
                }
            }
        }
    }

    #[test]
    fn the_scheduler_survives_any_sequence_and_answers_every_mandatory_message(
        inputs in prop::collection::vec(input(), 1..60)
    ) {
        let t0 = Instant::now();
        let mut now = t0;
        let mut s = Scheduler::new(
            SchedulerConfig::default(),
            MemoryStore::default(),
            "srv".into(),
            t0,
            ots::protocol::limits::unix_ms_now(),
        );
        // One well-behaved worker so that tasks exist and run.
        let good = Bytes::from_static(b"good");
        s.on_message(now, &good, decode(encode(
            &Header { v: PROTOCOL_VERSION, class: Class::Control, mandatory: false, seq: 0, task: None , epoch: None },
            &Body::Hello { worker: "good".into(), session: "s".into(), device: device(), running: vec![], version: None },
            None,
        )).unwrap());
        s.take_outputs();
        let mut final_states: HashMap<String, TaskState> = HashMap::new();
        for inp in inputs {
            now += Duration::from_millis(inp.advance_ms);
            let peer = Bytes::from(vec![b'p', inp.peer]);
            let h = Header { v: PROTOCOL_VERSION, class: inp.body.class(), mandatory: inp.mandatory, seq: inp.seq, task: None , epoch: None };
            let frames = apply(encode(&h, &inp.body, inp.raw.clone().map(Bytes::from)), &inp.mutation);
            let refusals_before: u64 = ["malformed", "invalid_field", "too_large", "unsupported_version"]
                .iter().map(|c| s.counters().get(*c).copied().unwrap_or(0)).sum();
            match decode(frames) {
                Ok(env) => {
                    let mandatory = env.header.mandatory.then_some(env.header.seq);
                    let registered_before = s.counters().get("not_registered").copied().unwrap_or(0);
                    let waits_before = s.counters().get("report_before_files").copied().unwrap_or(0);
                    s.on_message(now, &peer, env);
                    let out = s.take_outputs();
                    if let Some(seq) = mandatory {
                        let answers = |o: &Output| match o {
                            Output::Send { peer: p, body, .. } if *p == peer => match body {
                                Body::Ack { seq: a } => *a == seq,
                                Body::Error { .. } | Body::TaskClosed { .. } => true,
                                _ => false,
                            },
                            _ => false,
                        };
                        let answered = out.iter().any(answers);
                        let not_registered = s.counters().get("not_registered").copied().unwrap_or(0) > registered_before;
                        let waits = s.counters().get("report_before_files").copied().unwrap_or(0) > waits_before;
                        prop_assert!(answered || not_registered || waits, "mandatory seq {} unanswered: {:?}", seq, out);
                    }
                }
                Err(e) => {
                    s.on_bad_frames(&peer, &e);
                    let out = s.take_outputs();
                    let after: u64 = ["malformed", "invalid_field", "too_large", "unsupported_version"]
                        .iter().map(|c| s.counters().get(*c).copied().unwrap_or(0)).sum();
                    prop_assert_eq!(after, refusals_before + 1, "every refusal counted");
                    let replied = out.iter().any(|o| matches!(o, Output::Send { body: Body::Error { .. }, .. }));
                    prop_assert!(replied, "a refusal gets an error reply");
                }
            }
            s.on_tick(now);
            s.take_outputs();
            let _ = s.take_changes();
            // A task that ended stays ended, with the same state.
            for (task, state) in &final_states {
                if let Some(run) = task.split('.').next() {
                    if let Ok(st) = s.status(&run.to_string()) {
                        if let Some(t) = st.tasks.iter().find(|t| &t.task == task) {
                            prop_assert_eq!(t.state, *state);
                        }
                    }
                }
            }
            for n in 1..=3 {
                if let Ok(st) = s.status(&format!("r{n}")) {
                    for t in st.tasks.iter().filter(|t| t.state.is_final()) {
                        final_states.entry(t.task.clone()).or_insert(t.state);
                    }
                }
            }
        }
    }

    #[test]
    fn the_worker_session_survives_any_sequence_and_starts_each_dispatch_once(
        msgs in prop::collection::vec((
            prop_oneof![0u64..6, number()],
            any::<bool>(),
            prop_oneof![
                3 => (id(), 1u32..3, 1u64..60_000).prop_map(|(task, attempt, ttl_ms)| Body::Dispatch { spec: TaskSpec {
                    hold: None,
                    on_lease: None,
                    task, run: "r1".into(), attempt, image: "i".into(), packages: vec!["p".into()],
                    timeout_secs: 60, options: BTreeMap::new(), ttl_ms, sent_ms: 0, secrets: Default::default(),
                    inputs: Default::default(), health_check: false,recover: false, } }),
                1 => id().prop_map(|task| Body::Cancel { task }),
                1 => (id(), prop::option::of(1u32..3)).prop_map(|(task, attempt)| Body::TaskClosed { task, attempt, reason: "x".into() }),
                1 => number().prop_map(|seq| Body::Ack { seq }),
                1 => (any::<bool>(), number()).prop_map(|(restart, sent_ms)| Body::ServerHeartbeat {
                    server: if restart { "srv2".into() } else { "srv1".into() }, heartbeat_ms: 1000, sent_ms }),
                1 => prop::option::of(number()).prop_map(|seq| Body::Error { request: None, code: ErrorCode::Invalid, message: "no".into(), seq }),
            ],
            mutation(),
            0u64..2000,
        ), 1..60)
    ) {
        let mut now = Instant::now();
        let cfg = SessionConfig {
            heartbeat: Duration::from_secs(1),
            liveness: 3,
            log_buffer_lines: 100,
            log_buffer_bytes: 1 << 20,
            log_batch_lines: 10,
            log_batch_delay: Duration::from_millis(20),
            retry: Default::default(),
            delivery: Default::default(),
            on_server_lost: Default::default(),
            file_chunk_bytes: 4096,
            file_window_bytes: 8192,
        };
        let mut w = Session::new(cfg, "w1".into(), "sess".into(), device(), now);
        w.on_connected(now);
        let welcome = Header { v: PROTOCOL_VERSION, class: Class::Control, mandatory: false, seq: 0, task: None , epoch: None };
        w.on_message(now, Arrival { at: now, wall_ms: 1000 }, decode(encode(&welcome,
            &Body::Welcome { server: "srv1".into(), heartbeat_ms: 1000, liveness: 3, sent_ms: 0, events_key: None, beat: 0 }, None)).unwrap());
        let mut applied: HashSet<u64> = HashSet::new();
        for (seq, mandatory, body, m, advance) in msgs {
            now += Duration::from_millis(advance);
            let h = Header { v: PROTOCOL_VERSION, class: body.class(), mandatory, seq, task: None , epoch: None };
            let Ok(env) = decode(apply(encode(&h, &body, None), &m)) else { continue };
            let (mandatory, seq) = (env.header.mandatory, env.header.seq);
            let restart = matches!(&env.body, Body::ServerHeartbeat { server, .. } if server == "srv2");
            let actions = w.on_message(now, Arrival { at: now, wall_ms: 1000 + advance }, env);
            if restart { break; } // a new incarnation numbers afresh
            let started = actions.iter().any(|a| matches!(a, Action::StartTask(_)));
            if started {
                prop_assert!(mandatory, "a dispatch without the mandatory flag started a task");
                prop_assert!(applied.insert(seq), "mandatory seq {} applied twice", seq);
            }
            let _ = w.on_tick(now);
        }
    }
}
