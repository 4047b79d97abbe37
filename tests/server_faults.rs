//! The server dies or hangs; the workers cope without anyone touching them.

mod common;

use common::*;
use nix::sys::signal::Signal;
use std::time::{Duration, Instant};

#[test]
fn server_sigkilled_while_workers_idle_gets_them_back_within_5s_and_runs_again() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("server");
    // Default heartbeat (1 s, liveness 3): the numbers an operator runs with.
    let mut server = start_server(&state, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0", &[]);
    let conductor = example_conductor();
    let argv: Vec<&str> = conductor.iter().map(String::as_str).collect();
    let w1 = start_worker(dir.path(), "w1", "devicegroup:g", &server, &argv, &[]);
    let w2 = start_worker(dir.path(), "w2", "devicegroup:g", &server, &argv, &[]);
    assert!(wait_for_workers(
        &server,
        Duration::from_secs(20),
        all_idle(&["w1", "w2"])
    ));
    let (w1_mark, w2_mark) = (w1.stderr.len(), w2.stderr.len());

    let (control, events) = (server.control.clone(), server.events.clone());
    server.proc.kill();
    let restarted_at = Instant::now();
    let server = start_server(&state, &control, &events, &[]);
    assert!(
        wait_for_workers(&server, Duration::from_secs(5), all_idle(&["w1", "w2"])),
        "workers not registered again within 5 s of the restart"
    );
    let took = restarted_at.elapsed();
    eprintln!("both workers registered again {took:?} after the server restart");
    // Each worker noticed and re-registered by itself.
    for (w, mark) in [(&w1, w1_mark), (&w2, w2_mark)] {
        assert!(
            w.stderr
                .wait_for_after(
                    mark,
                    "registered with the server again",
                    Duration::from_secs(5)
                )
                .is_some(),
            "{:?}",
            w.stderr.all()
        );
    }
    assert_smoke_passes(&server, "g");
}

#[test]
fn server_sigstopped_workers_notice_within_the_liveness_window_and_return_after_sigcont() {
    let dir = tempfile::tempdir().unwrap();
    let interval_ms = 500u64;
    let liveness = 3u64;
    let env = [("OTS_SERVER_HEARTBEAT_INTERVAL_MS", "500")];
    let server = start_fresh_server(dir.path(), &env);
    let conductor = example_conductor();
    let argv: Vec<&str> = conductor.iter().map(String::as_str).collect();
    let w = start_idle_worker(dir.path(), "w", "devicegroup:g", &server, &argv, &[]);
    // Heartbeats flowing for a while before the hang.
    let mark = w.stderr.len();

    server.proc.signal(Signal::SIGSTOP);
    let line = w
        .stderr
        .wait_for_after(mark, "server lost", Duration::from_secs(10))
        .expect("the worker never noticed the hung server")
        .1;
    // The worker's own measurement of the silence it tolerated.
    let silent_ms = silence_ms(&line);
    assert!(
        silent_ms <= liveness * interval_ms + interval_ms,
        "noticed after {silent_ms} ms of silence; allowed {} ms",
        liveness * interval_ms + interval_ms
    );
    // While the server stays stopped, the worker keeps trying quietly.
    let mark_lost = w.stderr.len();
    std::thread::park_timeout(Duration::from_secs(2)); // the hang lasts a while; nothing is awaited here
    server.proc.signal(Signal::SIGCONT);
    assert!(
        w.stderr
            .wait_for_after(
                mark_lost,
                "registered with the server again",
                Duration::from_secs(10)
            )
            .is_some(),
        "{:?}",
        w.stderr.all()
    );
    assert_eq!(
        w.stderr.count("server lost"),
        1,
        "loss logged once: {:?}",
        w.stderr.all()
    );
    assert!(wait_for_workers(
        &server,
        Duration::from_secs(5),
        all_idle(&["w"])
    ));
    assert_smoke_passes(&server, "g");
}

#[test]
fn a_sigkilled_server_is_noticed_when_its_connection_closes_not_after_the_liveness_window() {
    let dir = tempfile::tempdir().unwrap();
    // Heartbeats alone would take 10 s (1 s x liveness 10) to notice.
    let env = [("OTS_SERVER_LIVENESS", "10")];
    let mut server = start_fresh_server(dir.path(), &env);
    let conductor = example_conductor();
    let argv: Vec<&str> = conductor.iter().map(String::as_str).collect();
    let w = start_idle_worker(dir.path(), "w1", "devicegroup:g", &server, &argv, &[]);
    let mark = w.stderr.len();
    let killed = Instant::now();
    server.proc.kill();
    let line = w.stderr.wait_for_after(
        mark,
        "closed the control connection",
        Duration::from_secs(5),
    );
    assert!(line.is_some(), "{:?}", w.stderr.all());
    eprintln!(
        "worker noticed the SIGKILLed server after {:?}",
        killed.elapsed()
    );
}

#[test]
fn a_sigkilled_worker_is_lost_when_its_connection_closes_not_after_the_liveness_window() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("OTS_SERVER_LIVENESS", "10")];
    let server = start_fresh_server(dir.path(), &env);
    let conductor = example_conductor();
    let argv: Vec<&str> = conductor.iter().map(String::as_str).collect();
    let mut w = start_idle_worker(dir.path(), "w1", "devicegroup:g", &server, &argv, &[]);
    let killed = Instant::now();
    w.kill();
    assert!(
        wait_for_workers(&server, Duration::from_secs(5), |ws| ws
            .iter()
            .any(|w| w["name"] == "w1" && w["state"] == "lost")),
        "{:?}",
        server.proc.stderr.all()
    );
    eprintln!(
        "server counted the SIGKILLed worker lost after {:?}",
        killed.elapsed()
    );
    assert!(server
        .proc
        .stderr
        .wait_for("worker lost: its connection closed", Duration::from_secs(1))
        .is_some());
}
