//! Session scenarios with a fake clock.

use super::*;
use crate::protocol::codec::Envelope;
use crate::worker::task::channel::{ResultFile, TaskEvent};

const HB: Duration = Duration::from_secs(1);

fn cfg() -> SessionConfig {
    SessionConfig {
        heartbeat: HB,
        liveness: 3,
        log_buffer_lines: 5,
        log_buffer_bytes: 1 << 20,
        log_batch_lines: 3,
        log_batch_delay: Duration::from_millis(20),
        retry: RetryPolicy {
            initial_ms: 500,
            factor: 2.0,
            cap_ms: 4000,
            jitter: false,
        },
        delivery: DeliveryPolicy::default(),
        on_server_lost: OnServerLost::Continue,
        file_chunk_bytes: 1024,
        file_window_bytes: 2048,
    }
}

fn env(body: Body) -> Envelope {
    Envelope {
        header: Header {
            v: PROTOCOL_VERSION,
            class: body.class(),
            mandatory: false,
            seq: 0,
            task: None,
            epoch: None,
        },
        body,
        raw: None,
    }
}

fn spec(task: &str, ttl_ms: u64) -> TaskSpec {
    TaskSpec {
        hold: None,
        on_lease: None,
        task: task.into(),
        run: "r".into(),
        attempt: 1,
        image: "img".into(),
        packages: vec!["p".into()],
        timeout_secs: 60,
        options: Default::default(),
        ttl_ms,
        sent_ms: 0,
        secrets: Default::default(),
        inputs: Default::default(),
        health_check: false,
        recover: false,
    }
}

fn arrival(at: Instant, wall_ms: u64) -> Arrival {
    Arrival { at, wall_ms }
}

fn started(actions: &[Action]) -> bool {
    actions.iter().any(|a| matches!(a, Action::StartTask(_)))
}

#[test]
fn expiry_ignores_clock_skew_but_sees_time_spent_in_transit() {
    let mut w = W::new();
    w.up();
    // The server's clock is 60 s behind ours; heartbeats take ~5 ms.
    let skew = 60_000;
    for i in 0..5u64 {
        let sent = 10_000 + i * 1000;
        w.s.on_message(
            w.now,
            arrival(w.now, sent + skew + 5),
            env(Body::ServerHeartbeat {
                server: "srv1".into(),
                heartbeat_ms: 1000,
                sent_ms: sent,
            }),
        );
    }
    // A dispatch sent at 20 000 (server clock) arriving promptly: fresh,
    // although our wall clock says it is 60 s old.
    let mut fresh = spec("t1", 1000);
    fresh.sent_ms = 20_000;
    let a = w.s.on_message(
        w.now,
        arrival(w.now, 20_000 + skew + 7),
        env(Body::Dispatch { spec: fresh }),
    );
    assert!(started(&a), "{a:?}");
    // Another worker, same skew: a dispatch that sat 2.5 s in a socket
    // buffer is stale.
    let mut w = W::new();
    w.up();
    for i in 0..5u64 {
        let sent = 10_000 + i * 1000;
        w.s.on_message(
            w.now,
            arrival(w.now, sent + skew + 5),
            env(Body::ServerHeartbeat {
                server: "srv1".into(),
                heartbeat_ms: 1000,
                sent_ms: sent,
            }),
        );
    }
    let mut stale = spec("t1", 1000);
    stale.sent_ms = 20_000;
    let a = w.s.on_message(
        w.now,
        arrival(w.now, 20_000 + skew + 2_500),
        env(Body::Dispatch { spec: stale }),
    );
    assert!(!started(&a));
    assert_eq!(w.s.stats.expired_dispatches, 1);
}

fn sent(actions: &[Action]) -> Vec<&'static str> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send { body, .. } => Some(body.kind()),
            _ => None,
        })
        .collect()
}

fn mandatory_seqs(actions: &[Action]) -> Vec<u64> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send { header, .. } if header.mandatory => Some(header.seq),
            _ => None,
        })
        .collect()
}

struct W {
    s: Session,
    now: Instant,
}

impl W {
    fn new() -> Self {
        let now = Instant::now();
        W {
            s: Session::new(
                cfg(),
                "w1".into(),
                "sess".into(),
                DeviceProps::parse("devicegroup:g").unwrap(),
                now,
            ),
            now,
        }
    }
    fn msg(&mut self, body: Body) -> Vec<Action> {
        self.s
            .on_message(self.now, arrival(self.now, 1_000), env(body))
    }
    fn welcome(&mut self, server: &str) -> Vec<Action> {
        self.msg(Body::Welcome {
            server: server.into(),
            heartbeat_ms: 1000,
            liveness: 3,
            sent_ms: 0,
            events_key: None,
            beat: 0,
        })
    }
    fn up(&mut self) -> Vec<Action> {
        let mut a = self.s.on_connected(self.now);
        a.extend(self.welcome("srv1"));
        a
    }
    fn advance(&mut self, d: Duration) -> Vec<Action> {
        self.now += d;
        self.s.on_tick(self.now)
    }
    /// Registered, runs task t1, which logs two lines and finishes: the
    /// actions of the finish.
    fn two_lines_then_the_report(&mut self) -> Vec<Action> {
        self.up();
        self.msg(Body::Dispatch {
            spec: spec("t1", 5_000),
        });
        self.msg(Body::Ack { seq: 1 });
        self.log("t1", 1);
        self.log("t1", 2);
        self.s.on_task_event(
            self.now,
            TaskEvent::Finished {
                task: "t1".into(),
                attempt: 1,
                outcome: Outcome::default(),
                log_lines: 2,
                files: vec![],
            },
        )
    }
    fn log(&mut self, task: &str, seq: u64) -> Vec<Action> {
        self.s.on_task_event(
            self.now,
            TaskEvent::Log {
                task: task.into(),
                attempt: 1,
                first: seq,
                text: crate::protocol::logtext::PackedText::line(
                    Stream::Stdout,
                    &format!("l{seq}"),
                ),
            },
        )
    }
}

#[test]
fn registers_then_asks_for_work() {
    let mut w = W::new();
    let a = w.s.on_connected(w.now);
    assert_eq!(sent(&a), vec!["hello"]);
    assert!(matches!(w.s.link(), Link::Registering { .. }));
    let a = w.welcome("srv1");
    assert_eq!(sent(&a), vec!["ready"]);
    assert_eq!(
        w.s.link(),
        &Link::Up {
            server: "srv1".into()
        }
    );
}

#[test]
fn hello_is_repeated_until_welcomed() {
    let mut w = W::new();
    w.s.on_connected(w.now);
    w.msg(Body::ServerHeartbeat {
        server: "srv1".into(),
        heartbeat_ms: 1000,
        sent_ms: 0,
    });
    let a = w.advance(HB);
    assert_eq!(sent(&a), vec!["hello"]);
}

#[test]
fn silent_server_is_lost_after_liveness_intervals_exactly_once() {
    let mut w = W::new();
    w.up();
    for _ in 0..3 {
        let a = w.advance(HB);
        assert!(!a.iter().any(|a| matches!(a, Action::Reconnect(_))));
    }
    let a = w.advance(Duration::from_millis(1));
    assert!(
        matches!(&a[..], [Action::Reconnect(LostReason::Silent { .. })]),
        "{a:?}"
    );
    assert_eq!(w.s.link(), &Link::Down);
    assert!(w.advance(HB).is_empty(), "no second loss while down");
}

#[test]
fn heartbeats_keep_the_server_alive_and_a_new_incarnation_means_restart() {
    let mut w = W::new();
    w.up();
    for _ in 0..10 {
        w.advance(HB);
        w.msg(Body::ServerHeartbeat {
            server: "srv1".into(),
            heartbeat_ms: 1000,
            sent_ms: 0,
        });
    }
    assert!(matches!(w.s.link(), Link::Up { .. }));
    let a = w.msg(Body::ServerHeartbeat {
        server: "srv2".into(),
        heartbeat_ms: 1000,
        sent_ms: 0,
    });
    assert!(matches!(
        &a[..],
        [Action::Reconnect(LostReason::ServerRestarted { .. })]
    ));
}

#[test]
fn worker_heartbeats_only_when_otherwise_silent() {
    let mut w = W::new();
    w.up();
    let a = w.advance(HB);
    assert_eq!(
        sent(&a),
        vec!["ready"],
        "an idle worker's heartbeat is a repeated ready"
    );
    w.msg(Body::Dispatch {
        spec: spec("t1", 5_000),
    });
    w.msg(Body::Ack { seq: 1 });
    let a = w.advance(HB);
    assert_eq!(sent(&a), vec!["heartbeat"]);
    w.msg(Body::ServerHeartbeat {
        server: "srv1".into(),
        heartbeat_ms: 1000,
        sent_ms: 0,
    });
    let a = w.advance(HB / 2);
    assert!(sent(&a).is_empty());
}

#[test]
fn dispatch_is_accepted_mandatorily_and_resent_until_acked() {
    let mut w = W::new();
    w.up();
    let a = w.msg(Body::Dispatch {
        spec: spec("t1", 5_000),
    });
    assert!(a
        .iter()
        .any(|a| matches!(a, Action::StartTask(s) if s.task == "t1")));
    assert_eq!(mandatory_seqs(&a), vec![1]);
    let a = w.advance(Duration::from_millis(500));
    assert_eq!(
        mandatory_seqs(&a),
        vec![1],
        "resent after the initial delay"
    );
    w.msg(Body::Ack { seq: 1 });
    let a = w.advance(Duration::from_secs(10));
    assert!(mandatory_seqs(&a).is_empty());
    assert_eq!(w.s.pending_mandatory(), 0);
}

#[test]
fn expired_dispatch_is_refused_and_never_started() {
    let mut w = W::new();
    w.up();
    // The copy arrived 2 s ago (it waited in a queue) with a ttl of 1 s.
    let received = w.now;
    w.now += Duration::from_secs(2);
    let a = w.s.on_message(
        w.now,
        arrival(received, 1_000),
        env(Body::Dispatch {
            spec: spec("t1", 1000),
        }),
    );
    assert!(!a.iter().any(|a| matches!(a, Action::StartTask(_))));
    assert!(a.iter().any(|a| matches!(
        a,
        Action::Send {
            body: Body::TaskRefused {
                reason: RefuseReason::Expired,
                ..
            },
            ..
        }
    )));
    assert_eq!(w.s.stats.expired_dispatches, 1);
    assert!(w.s.current_task().is_none());
}

#[test]
fn busy_worker_refuses_a_second_task() {
    let mut w = W::new();
    w.up();
    w.msg(Body::Dispatch {
        spec: spec("t1", 5_000),
    });
    let a = w.msg(Body::Dispatch {
        spec: spec("t2", 5_000),
    });
    assert!(a.iter().any(|a| matches!(
        a,
        Action::Send {
            body: Body::TaskRefused {
                reason: RefuseReason::Busy,
                ..
            },
            ..
        }
    )));
    // …but a resent dispatch of its own task is not refused.
    let a = w.msg(Body::Dispatch {
        spec: spec("t1", 5_000),
    });
    assert!(!a.iter().any(|a| matches!(
        a,
        Action::Send {
            body: Body::TaskRefused { .. },
            ..
        }
    )));
}

#[test]
fn logs_posted_before_finish_go_out_before_the_final_report() {
    let mut w = W::new();
    let a = w.two_lines_then_the_report();
    assert_eq!(sent(&a), vec!["log_packed", "task_finished"]);
}

#[test]
fn while_the_server_is_away_logs_are_bounded_and_the_report_waits() {
    let mut w = W::new();
    w.up();
    w.msg(Body::Dispatch {
        spec: spec("t1", 5_000),
    });
    w.msg(Body::Ack { seq: 1 });
    w.advance(Duration::from_secs(4)); // lost
    assert_eq!(w.s.link(), &Link::Down);
    for seq in 1..=8 {
        assert!(w.log("t1", seq).is_empty(), "nothing is sent while down");
    }
    assert_eq!(w.s.buffered_log_lines(), 5);
    assert_eq!(w.s.stats.log_lines_dropped, 3, "oldest dropped and counted");
    let a = w.s.on_task_event(
        w.now,
        TaskEvent::Finished {
            task: "t1".into(),
            attempt: 1,
            outcome: Outcome::default(),
            log_lines: 8,
            files: vec![],
        },
    );
    assert!(a.is_empty());
    // Back: hello names the task, then buffered logs (4..8, one batch:
    // they continue each other) before the report.
    let a = w.s.on_connected(w.now);
    assert!(
        matches!(&a[0], Action::Send { body: Body::Hello { running, .. }, .. } if running == &vec!["t1".to_string()])
    );
    let a = w.welcome("srv2");
    assert_eq!(sent(&a), vec!["log_packed", "task_finished"]);
    let seqs: Vec<u64> = a
        .iter()
        .filter_map(|a| match a {
            Action::Send {
                body: Body::LogPacked { parts, .. },
                ..
            } => Some(
                parts
                    .iter()
                    .flat_map(|p| p.first..p.first + u64::from(p.count))
                    .collect::<Vec<_>>(),
            ),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(seqs, vec![4, 5, 6, 7, 8]);
}

#[test]
fn task_closed_drops_pending_messages_and_stops_a_running_conductor() {
    let mut w = W::new();
    w.up();
    w.msg(Body::Dispatch {
        spec: spec("t1", 5_000),
    }); // accepted, not acked
    let a = w.msg(Body::TaskClosed {
        task: "t1".into(),
        attempt: Some(1),
        reason: "timed out".into(),
    });
    assert!(a
        .iter()
        .any(|a| matches!(a, Action::StopTask(t) if t == "t1")));
    assert_eq!(w.s.pending_mandatory(), 0);
    assert_eq!(w.s.stats.orphans_closed, 1);
    assert_eq!(sent(&a), vec!["ready"]);
    let a = w.advance(Duration::from_secs(60));
    assert!(mandatory_seqs(&a).is_empty(), "never resent after the nack");
}

fn reads(actions: &[Action]) -> Vec<ReadRequest> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::ReadChunk(r) => Some(r.clone()),
            _ => None,
        })
        .collect()
}

fn credit(have: u64, until: u64, resume: bool) -> Body {
    Body::FileCredit {
        task: "t1".into(),
        attempt: 1,
        name: "big.bin".into(),
        have,
        until,
        resume,
    }
}

/// What the shell's reader would answer, the digest on the last read.
fn read_done(r: &ReadRequest) -> ReadDone {
    let end = r.offset + r.len;
    ReadDone {
        task: r.task.clone(),
        attempt: r.attempt,
        name: r.name.clone(),
        offset: r.offset,
        epoch: r.epoch,
        result: Ok((
            Bytes::from(vec![7u8; r.len as usize]),
            (end == r.size).then(|| "ab".repeat(32)),
        )),
    }
}

impl W {
    /// Runs t1 to its end with one result file of `size` bytes.
    fn finished_with_a_file(&mut self, size: u64) -> Vec<Action> {
        self.up();
        self.msg(Body::Dispatch {
            spec: spec("t1", 5_000),
        });
        self.msg(Body::Ack { seq: 1 });
        self.s.on_task_event(
            self.now,
            TaskEvent::Finished {
                task: "t1".into(),
                attempt: 1,
                outcome: Outcome::default(),
                log_lines: 0,
                files: vec![ResultFile {
                    name: "big.bin".into(),
                    size,
                    mtime_ns: 42,
                }],
            },
        )
    }
}

#[test]
fn a_result_file_streams_inside_the_credit_before_the_final_report() {
    let mut w = W::new();
    let size = 4000;
    let a = w.finished_with_a_file(size);
    assert_eq!(
        sent(&a),
        vec!["file_offer"],
        "the report waits for the file"
    );
    // Credit for 3000 bytes; the worker reads ahead at most its window.
    let a = w.msg(credit(0, 3000, true));
    let r = reads(&a);
    assert_eq!(
        r.iter().map(|r| (r.offset, r.len)).collect::<Vec<_>>(),
        vec![(0, 1024), (1024, 1024)]
    );
    let a = w.s.on_read_done(w.now, read_done(&r[0]));
    assert_eq!(sent(&a), vec!["file_chunk"]);
    // 2048..3000 now fits the window: asked for, up to the credit only.
    assert_eq!(
        reads(&a)
            .iter()
            .map(|r| (r.offset, r.len))
            .collect::<Vec<_>>(),
        vec![(2048, 952)]
    );
    w.s.on_read_done(w.now, read_done(&r[1]));
    let a = w.s.on_read_done(w.now, read_done(&reads(&a)[0]));
    assert_eq!(sent(&a), vec!["file_chunk"]);
    assert!(reads(&a).is_empty(), "nothing beyond the credit");
    // More credit: the rest, then the end with the digest.
    let a = w.msg(credit(2048, size, false));
    let r = reads(&a);
    assert_eq!((r[0].offset, r[0].len), (3000, 1000));
    let a = w.s.on_read_done(w.now, read_done(&r[0]));
    assert_eq!(sent(&a), vec!["file_chunk", "file_end"]);
    let a = w.msg(Body::FileStored {
        task: "t1".into(),
        attempt: 1,
        name: "big.bin".into(),
        size,
        sha256: "ab".repeat(32),
    });
    let report = a.iter().find_map(|a| match a {
        Action::Send {
            body: Body::TaskFinished { files, .. },
            ..
        } => Some(files.clone()),
        _ => None,
    });
    assert_eq!(report.unwrap()[0].sha256, "ab".repeat(32));
}

#[test]
fn an_upload_resumes_from_the_server_after_a_reconnect_and_stale_reads_are_dropped() {
    let mut w = W::new();
    w.finished_with_a_file(4096);
    let a = w.msg(credit(0, 4096, true));
    let old = reads(&a);
    w.s.on_read_done(w.now, read_done(&old[0]));
    // The connection drops; after the new welcome the file is offered again.
    w.s.on_disconnected();
    let a = w.up();
    assert!(sent(&a).contains(&"file_offer"), "{:?}", sent(&a));
    let a = w.msg(credit(1024, 4096, true));
    let r = reads(&a);
    assert_eq!(r[0].offset, 1024);
    // A read asked for on the old connection comes back: dropped.
    let a = w.s.on_read_done(w.now, read_done(&old[1]));
    assert!(sent(&a).is_empty());
    // The server stays silent: offered again after the liveness window.
    w.msg(Body::ServerHeartbeat {
        server: "srv1".into(),
        heartbeat_ms: 1000,
        sent_ms: 0,
    });
    let mut again = false;
    for _ in 0..40 {
        w.now += Duration::from_millis(100);
        w.msg(Body::ServerHeartbeat {
            server: "srv1".into(),
            heartbeat_ms: 1000,
            sent_ms: 0,
        });
        again |= sent(&w.s.on_tick(w.now)).contains(&"file_offer");
    }
    assert!(again, "a stalled upload is offered again");
}

#[test]
fn a_refused_or_changed_file_is_reported_as_a_problem_not_waited_for() {
    let mut w = W::new();
    w.finished_with_a_file(10);
    let a = w.msg(credit(0, 10, true));
    let r = reads(&a);
    let mut done = read_done(&r[0]);
    done.result = Err("result file big.bin changed on disk".into());
    let a = w.s.on_read_done(w.now, done);
    let problems = a.iter().find_map(|a| match a {
        Action::Send {
            body:
                Body::TaskFinished {
                    file_problems,
                    files,
                    ..
                },
            ..
        } => Some((files.len(), file_problems.clone())),
        _ => None,
    });
    let (files, problems) = problems.expect("the report goes out");
    assert_eq!(files, 0);
    assert!(problems[0].reason.contains("changed on disk"));
}

#[test]
fn not_registered_error_triggers_a_new_hello() {
    let mut w = W::new();
    w.up();
    let a = w.msg(Body::Error {
        request: None,
        code: ErrorCode::NotRegistered,
        message: "who?".into(),
        seq: None,
    });
    assert_eq!(sent(&a), vec!["hello"]);
}

#[test]
fn a_standby_s_not_leader_answer_moves_on_to_the_next_server() {
    let mut w = W::new();
    w.s.on_connected(w.now);
    let a = w.msg(Body::Error {
        request: None,
        code: ErrorCode::NotLeader,
        message: "this server is a standby; s1 leads".into(),
        seq: None,
    });
    assert!(
        matches!(&a[..], [Action::Reconnect(LostReason::NotLeader(m))] if m.contains("s1 leads")),
        "{a:?}"
    );
    assert!(matches!(w.s.link(), Link::Down));
}

#[test]
fn a_full_log_stops_the_lines_of_that_task_and_counts_them() {
    let mut w = W::new();
    w.up();
    let mut e = env(Body::Dispatch {
        spec: spec("t1", 5_000),
    });
    e.header.mandatory = true;
    e.header.seq = 1;
    w.s.on_message(w.now, arrival(w.now, 1_000), e);
    let piece = |first: u64| TaskEvent::Log {
        task: "t1".into(),
        attempt: 1,
        first,
        text: crate::protocol::logtext::PackedText::line(Stream::Stdout, "x"),
    };
    w.s.on_task_event(w.now, piece(1));
    w.s.on_task_event(w.now, piece(2));
    assert_eq!(w.s.buffered_log_lines(), 2);
    let a = w.msg(Body::LogFull {
        task: "t1".into(),
        attempt: 1,
        reason: "full".into(),
    });
    assert!(matches!(&a[..], [Action::LogFull(t)] if t == "t1"), "{a:?}");
    assert_eq!(w.s.buffered_log_lines(), 0, "the buffered lines went");
    w.s.on_task_event(w.now, piece(3));
    assert_eq!(w.s.buffered_log_lines(), 0, "later ones are not taken");
    assert_eq!(w.s.stats.log_lines_not_sent_log_full, 3);
    // Said again: nothing more to do. Another attempt's: not ours.
    for attempt in [1, 2] {
        let a = w.msg(Body::LogFull {
            task: "t1".into(),
            attempt,
            reason: "full".into(),
        });
        assert!(a.is_empty(), "{a:?}");
    }
}

#[test]
fn server_mandatory_messages_are_acked_every_time_and_applied_once() {
    let mut w = W::new();
    w.up();
    let mut e = env(Body::Dispatch {
        spec: spec("t1", 5_000),
    });
    e.header.mandatory = true;
    e.header.seq = 1;
    let a = w.s.on_message(w.now, arrival(w.now, 1_000), e.clone());
    assert!(matches!(
        &a[0],
        Action::Send {
            body: Body::Ack { seq: 1 },
            ..
        }
    ));
    assert_eq!(
        a.iter()
            .filter(|a| matches!(a, Action::StartTask(_)))
            .count(),
        1
    );
    let a = w.s.on_message(w.now, arrival(w.now, 1_000), e);
    assert_eq!(sent(&a), vec!["ack"], "a duplicate is acked and ignored");
    // A restarted server numbers from 1 again.
    w.welcome("srv2");
    let mut e = env(Body::Cancel { task: "t1".into() });
    e.header.mandatory = true;
    e.header.seq = 1;
    let a = w.s.on_message(w.now, arrival(w.now, 1_000), e);
    assert!(a.iter().any(|a| matches!(a, Action::StopTask(_))));
}

#[test]
fn closing_an_old_attempt_leaves_the_current_one_alone() {
    let mut w = W::new();
    w.up();
    let mut second = spec("t1", 5_000);
    second.attempt = 2;
    w.msg(Body::Dispatch { spec: second });
    let a = w.msg(Body::TaskClosed {
        task: "t1".into(),
        attempt: Some(1),
        reason: "late nack for attempt 1".into(),
    });
    assert!(!a.iter().any(|a| matches!(a, Action::StopTask(_))));
    assert_eq!(w.s.current_task().map(String::as_str), Some("t1"));
    assert_eq!(
        w.s.pending_mandatory(),
        1,
        "attempt 2's acceptance still pending"
    );
}

fn with(delivery: DeliveryPolicy, on_server_lost: OnServerLost) -> W {
    let now = Instant::now();
    let mut c = cfg();
    c.delivery = delivery;
    c.on_server_lost = on_server_lost;
    W {
        s: Session::new(
            c,
            "w1".into(),
            "sess".into(),
            DeviceProps::parse("devicegroup:g").unwrap(),
            now,
        ),
        now,
    }
}

#[test]
fn give_up_policy_stops_resending_after_its_bound() {
    let mut w = with(
        DeliveryPolicy {
            control: Policy::GiveUp,
            give_up_after_ms: 3000,
            ..DeliveryPolicy::default()
        },
        OnServerLost::Continue,
    );
    w.up();
    w.msg(Body::Dispatch {
        spec: spec("t1", 5_000),
    }); // task_accepted, never acked
    w.msg(Body::ServerHeartbeat {
        server: "srv1".into(),
        heartbeat_ms: 1000,
        sent_ms: 0,
    });
    let mut resent = 0;
    for _ in 0..10 {
        let a = w.advance(Duration::from_millis(500));
        resent += mandatory_seqs(&a).len();
        w.msg(Body::ServerHeartbeat {
            server: "srv1".into(),
            heartbeat_ms: 1000,
            sent_ms: 0,
        });
    }
    assert!(resent >= 1, "resent while within the bound");
    assert_eq!(w.s.stats.given_up, 1);
    assert_eq!(w.s.pending_mandatory(), 0);
}

#[test]
fn guarantee_nothing_control_is_sent_once_unacknowledged() {
    let mut w = with(
        DeliveryPolicy {
            control: Policy::GuaranteeNothing,
            ..DeliveryPolicy::default()
        },
        OnServerLost::Continue,
    );
    w.up();
    let a = w.msg(Body::Dispatch {
        spec: spec("t1", 5_000),
    });
    let accepted: Vec<_> = a
        .iter()
        .filter_map(|a| match a {
            Action::Send {
                header,
                body: Body::TaskAccepted { .. },
                ..
            } => Some(header.mandatory),
            _ => None,
        })
        .collect();
    assert_eq!(accepted, vec![false]);
    assert_eq!(w.s.pending_mandatory(), 0);
}

#[test]
fn abort_policy_stops_the_task_when_the_server_is_lost_and_reports_why() {
    let mut w = with(DeliveryPolicy::default(), OnServerLost::Abort);
    w.up();
    w.msg(Body::Dispatch {
        spec: spec("t1", 5_000),
    });
    let a = w.advance(Duration::from_secs(4));
    assert!(
        a.iter()
            .any(|a| matches!(a, Action::StopTask(t) if t == "t1")),
        "{a:?}"
    );
    w.s.on_task_event(
        w.now,
        TaskEvent::Finished {
            task: "t1".into(),
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
    w.s.on_connected(w.now);
    let a = w.welcome("srv1");
    let outcome = a
        .iter()
        .find_map(|a| match a {
            Action::Send {
                body: Body::TaskFinished { outcome, .. },
                ..
            } => Some(outcome.clone()),
            _ => None,
        })
        .expect("report sent after reconnect");
    assert!(!outcome.cancelled);
    assert!(outcome.failure.unwrap().contains("on_server_lost = abort"));
}

#[test]
fn continue_policy_keeps_the_task_running_while_the_server_is_away() {
    let mut w = W::new();
    w.up();
    w.msg(Body::Dispatch {
        spec: spec("t1", 5_000),
    });
    let a = w.advance(Duration::from_secs(4));
    assert!(!a.iter().any(|a| matches!(a, Action::StopTask(_))));
}

/// Mutated server messages never panic the worker session.
#[test]
fn mutated_server_messages_never_panic_the_session() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut w = W::new();
    w.up();
    let samples = [
        Body::Dispatch {
            spec: spec("t1", 5_000),
        },
        Body::Cancel { task: "t1".into() },
        Body::TaskClosed {
            task: "t1".into(),
            attempt: Some(1),
            reason: "r".into(),
        },
        Body::Ack { seq: 1 },
        Body::Welcome {
            server: "srv1".into(),
            heartbeat_ms: 1000,
            liveness: 3,
            sent_ms: 0,
            events_key: Some("ab".repeat(32)),
            beat: 7,
        },
        Body::ServerHeartbeat {
            server: "srv1".into(),
            heartbeat_ms: 1000,
            sent_ms: 0,
        },
        Body::Error {
            request: None,
            code: ErrorCode::NotRegistered,
            message: "m".into(),
            seq: None,
        },
    ];
    for i in 0..20_000 {
        let body = &samples[i % samples.len()];
        let mut h = Header::best_effort(body.class(), None);
        h.mandatory = rng.gen_bool(0.5);
        h.seq = rng.gen_range(0..20);
        let mut frames = crate::protocol::encode(&h, body, None);
        let f = rng.gen_range(0..frames.len());
        let mut bytes = frames[f].to_vec();
        let at = rng.gen_range(0..bytes.len());
        bytes[at] = rng.gen();
        frames[f] = Bytes::from(bytes);
        if let Ok(env) = crate::protocol::decode(frames) {
            w.s.on_message(w.now, arrival(w.now, 1_000), env);
        }
        if i % 500 == 0 {
            w.advance(Duration::from_millis(700));
            if matches!(w.s.link(), Link::Down) {
                w.s.on_connected(w.now);
            }
        }
    }
}

#[test]
fn log_batches_the_socket_refused_go_back_in_order_and_the_report_waits_behind_them() {
    let mut w = W::new();
    let a = w.two_lines_then_the_report();
    // The shell could not send the log batch (socket full): it gives the
    // batch back and holds the report it had not sent either.
    let (mut refused, mut report) = (Vec::new(), None);
    for action in a {
        if let Action::Send { header, body, raw } = action {
            match body {
                Body::LogPacked { .. } => refused.push((body, raw)),
                Body::TaskFinished { .. } => report = Some(header.seq),
                _ => {}
            }
        }
    }
    assert_eq!(refused.len(), 1);
    w.s.requeue_unsent_logs(w.now, refused);
    w.s.unsend(report.expect("the report was due"));
    assert_eq!(w.s.buffered_log_lines(), 2);
    assert_eq!(w.s.stats.log_lines_dropped, 0);
    // Before the lines are due again, the report is held behind them.
    let a = w.s.on_tick(w.now);
    assert!(!sent(&a).contains(&"task_finished"), "{:?}", sent(&a));
    // The next flush sends the lines again, in order, and only then the
    // report (due at once, not after a resend backoff).
    let a = w.advance(Duration::from_millis(100));
    let order: Vec<&str> = sent(&a);
    let log_at = order
        .iter()
        .position(|k| *k == "log_packed")
        .expect("log resent");
    let report_at = order
        .iter()
        .position(|k| *k == "task_finished")
        .expect("report sent at the next flush");
    assert!(log_at < report_at, "{order:?}");
    let seqs: Vec<u64> = a
        .iter()
        .filter_map(|x| match x {
            Action::Send {
                body: Body::LogPacked { parts, .. },
                ..
            } => Some(
                parts
                    .iter()
                    .flat_map(|p| p.first..p.first + u64::from(p.count))
                    .collect::<Vec<_>>(),
            ),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(seqs, vec![1, 2]);
}

#[test]
fn under_give_up_an_upload_the_server_never_takes_ends_as_a_named_problem() {
    let mut w = W::new();
    w.s.cfg.delivery.file = Policy::GiveUp;
    w.s.cfg.delivery.give_up_after_ms = 2000;
    w.finished_with_a_file(10);
    let mut report = None;
    for _ in 0..40 {
        w.now += Duration::from_millis(100);
        w.msg(Body::ServerHeartbeat {
            server: "srv1".into(),
            heartbeat_ms: 1000,
            sent_ms: 0,
        });
        for a in w.s.on_tick(w.now) {
            if let Action::Send {
                body: Body::TaskFinished { file_problems, .. },
                ..
            } = a
            {
                report = Some(file_problems);
            }
        }
    }
    let problems = report.expect("the report went out without the file");
    assert!(problems[0].reason.contains("give-up"), "{problems:?}");
    assert_eq!(w.s.stats.given_up, 1);
}

#[test]
fn pieces_that_continue_each_other_share_a_part_and_streams_get_their_own() {
    use crate::protocol::logtext::PackedText;
    let mut w = W::new();
    w.up();
    w.msg(Body::Dispatch {
        spec: spec("t1", 5_000),
    });
    let post = |w: &mut W, first: u64, stream: Stream, text: &str| {
        w.s.on_task_event(
            w.now,
            TaskEvent::Log {
                task: "t1".into(),
                attempt: 1,
                first,
                text: PackedText::line(stream, text),
            },
        )
    };
    // log_batch_lines is 3 here: the third line sends the batch.
    let mut a = post(&mut w, 1, Stream::Stdout, "a");
    a.extend(post(&mut w, 2, Stream::Stdout, "b"));
    a.extend(post(&mut w, 3, Stream::Stderr, "c"));
    a.extend(post(&mut w, 5, Stream::Stderr, "e")); // line 4 was dropped: a new part
    a.extend(w.advance(Duration::from_millis(100)));
    type Shape = (u64, u32, Stream, u32);
    let batches: Vec<(Vec<Shape>, Bytes)> = a
        .iter()
        .filter_map(|x| match x {
            Action::Send {
                body: Body::LogPacked { parts, .. },
                raw,
                ..
            } => Some((
                parts
                    .iter()
                    .map(|p| (p.first, p.count, p.stream, p.bytes))
                    .collect(),
                raw.clone().unwrap(),
            )),
            _ => None,
        })
        .collect();
    assert_eq!(batches.len(), 2, "{batches:?}");
    assert_eq!(
        batches[0].0,
        vec![(1, 2, Stream::Stdout, 4), (3, 1, Stream::Stderr, 2)]
    );
    assert_eq!(&batches[0].1[..], b"a\nb\nc\n");
    assert_eq!(batches[1].0, vec![(5, 1, Stream::Stderr, 2)]);
    assert_eq!(&batches[1].1[..], b"e\n");
    assert_eq!(w.s.buffered_log_lines(), 0);
}

#[test]
fn commands_from_an_older_lease_epoch_are_ignored() {
    let mut w = W::new();
    w.up();
    // The new leader (epoch 3) is heard first…
    let mut e = env(Body::Dispatch {
        spec: spec("t1", 5_000),
    });
    e.header.mandatory = true;
    e.header.seq = 1;
    e.header.epoch = Some(3);
    let a = w.s.on_message(w.now, arrival(w.now, 1_000), e);
    assert!(a.iter().any(|a| matches!(a, Action::StartTask(_))));
    // …then a deposed one (epoch 2) cancels: neither applied nor acked.
    let mut e = env(Body::Cancel { task: "t1".into() });
    e.header.mandatory = true;
    e.header.seq = 2;
    e.header.epoch = Some(2);
    let a = w.s.on_message(w.now, arrival(w.now, 1_000), e);
    assert!(a.is_empty(), "{a:?}");
    assert_eq!(w.s.stats.stale_epoch, 1);
    // The leader's own cancel still works.
    let mut e = env(Body::Cancel { task: "t1".into() });
    e.header.mandatory = true;
    e.header.seq = 2;
    e.header.epoch = Some(3);
    let a = w.s.on_message(w.now, arrival(w.now, 1_000), e);
    assert!(a.iter().any(|a| matches!(a, Action::StopTask(_))));
}

fn rules(abort: bool) -> StopRules {
    StopRules {
        abort,
        timeout: Duration::from_secs(60),
        kill_grace: Duration::from_secs(5),
    }
}

#[test]
fn an_idle_worker_says_bye_and_leaves_once_it_is_acknowledged() {
    let mut w = W::new();
    w.up();
    assert_eq!(w.s.poll_stop(w.now), StopStep::Wait, "no stop asked");
    assert!(w.s.begin_stop(w.now, rules(false)).is_empty());
    let StopStep::Bye(actions) = w.s.poll_stop(w.now) else {
        panic!("an idle worker with nothing to deliver says bye");
    };
    assert_eq!(sent(&actions), vec!["bye"]);
    let seq = mandatory_seqs(&actions)[0];
    assert_eq!(w.s.poll_stop(w.now), StopStep::Wait, "waiting for the ack");
    w.msg(Body::Ack { seq });
    assert_eq!(w.s.poll_stop(w.now), StopStep::Leave);
}

#[test]
fn an_unanswered_bye_is_given_up_after_the_liveness_window() {
    let mut w = W::new();
    w.up();
    w.s.begin_stop(w.now, rules(false));
    assert!(matches!(w.s.poll_stop(w.now), StopStep::Bye(_)));
    w.now += w.s.liveness_window() - Duration::from_millis(1);
    assert_eq!(w.s.poll_stop(w.now), StopStep::Wait);
    w.now += Duration::from_millis(1);
    assert_eq!(w.s.poll_stop(w.now), StopStep::Leave);
}

#[test]
fn a_task_past_the_stop_timeout_is_stopped_and_what_is_left_kept_for_the_next_start() {
    let mut w = W::new();
    w.up();
    w.msg(Body::Dispatch {
        spec: spec("t1", 5_000),
    });
    w.s.begin_stop(w.now, rules(false));
    assert_eq!(w.s.poll_stop(w.now), StopStep::Wait, "the task may finish");
    w.now += Duration::from_secs(60) - Duration::from_millis(1);
    assert_eq!(
        w.s.poll_stop(w.now),
        StopStep::Wait,
        "not at the timeout yet"
    );
    w.now += Duration::from_millis(1);
    assert_eq!(
        w.s.poll_stop(w.now),
        StopStep::StopTasks(vec![Action::StopTask("t1".into())])
    );
    // Its report never comes: after the kill grace (and 10 s) the worker
    // leaves, the outbox kept in worker.db.
    w.now += Duration::from_secs(15) - Duration::from_millis(1);
    assert_eq!(w.s.poll_stop(w.now), StopStep::Wait);
    w.now += Duration::from_millis(1);
    assert_eq!(w.s.poll_stop(w.now), StopStep::Leave);
}

#[test]
fn a_stopping_worker_whose_server_shut_down_after_the_report_leaves_at_once() {
    let mut w = W::new();
    w.two_lines_then_the_report();
    w.s.begin_stop(w.now, rules(false));
    assert_eq!(
        w.s.poll_stop(w.now),
        StopStep::Wait,
        "the report's ack may come"
    );
    let a = w.msg(Body::Shutdown {
        server: "s1".into(),
    });
    assert!(a.iter().any(|a| matches!(a, Action::Reconnect(_))), "{a:?}");
    assert!(!w.s.outbox.is_empty(), "the report is still owed");
    assert_eq!(
        w.s.poll_stop(w.now),
        StopStep::Leave,
        "no ack is coming: the report stays in worker.db"
    );
}

#[test]
fn an_unreachable_server_gets_no_bye() {
    let mut w = W::new();
    w.s.begin_stop(w.now, rules(true));
    assert_eq!(w.s.poll_stop(w.now), StopStep::Leave);
}
