//! Benchmark: how fast a connected worker notices that its server is gone.
//!
//! `cargo bench --bench notice` runs the real `ots-server` and one real
//! `ots-worker` (release binaries, secured, default heartbeat: 1 s,
//! liveness 3) and, in turn:
//! - SIGKILLs the server OTS_BENCH_TRIALS times (default 10): the time from
//!   the kill to the worker's "closed the control connection" line (the
//!   socket monitor sees the TCP close), then restarts the server on the
//!   same endpoints and state and waits for the worker to be back;
//! - SIGSTOPs it OTS_BENCH_STOP_TRIALS times (default 3): nothing closes,
//!   only the heartbeats stop; the silence the worker tolerated before it
//!   said "server lost", against liveness × interval + one interval.
//!
//! Prints the median and the worst of each.

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use nix::sys::signal::Signal;
use std::time::{Duration, Instant};

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
        .max(1)
}

fn median(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[v.len() - 1])
}

fn main() {
    let kills = env_count("OTS_BENCH_TRIALS", 10);
    let stops = env_count("OTS_BENCH_STOP_TRIALS", 3);
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("server");
    let mut server = start_server(&state, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0", &[]);
    let conductor = example_conductor();
    let argv: Vec<&str> = conductor.iter().map(String::as_str).collect();
    let worker = start_idle_worker(dir.path(), "w1", "devicegroup:g", &server, &argv, &[]);
    let (control, events) = (server.control.clone(), server.events.clone());

    let mut killed_ms = Vec::new();
    for trial in 1..=kills {
        let mark = worker.stderr.len();
        let killed = Instant::now();
        server.proc.kill();
        worker
            .stderr
            .wait_for_after(
                mark,
                "closed the control connection",
                Duration::from_secs(10),
            )
            .unwrap_or_else(|| panic!("trial {trial}: the worker did not notice the SIGKILL"));
        killed_ms.push(killed.elapsed().as_secs_f64() * 1000.0);
        server = start_server(&state, &control, &events, &[]);
        assert!(
            wait_for_workers(&server, Duration::from_secs(20), all_idle(&["w1"])),
            "trial {trial}: the worker did not come back"
        );
    }

    let (interval_ms, liveness) = (1000.0, 3.0);
    let mut silent_ms = Vec::new();
    for trial in 1..=stops {
        let mark = worker.stderr.len();
        server.proc.signal(Signal::SIGSTOP);
        let line = worker
            .stderr
            .wait_for_after(mark, "server lost", Duration::from_secs(20))
            .unwrap_or_else(|| panic!("trial {trial}: the worker did not notice the SIGSTOP"))
            .1;
        silent_ms.push(silence_ms(&line) as f64);
        server.proc.signal(Signal::SIGCONT);
        assert!(
            wait_for_workers(&server, Duration::from_secs(20), all_idle(&["w1"])),
            "trial {trial}: the worker did not come back after SIGCONT"
        );
    }

    let (k_med, k_max) = median(killed_ms);
    let (s_med, s_max) = median(silent_ms);
    println!(
        "server SIGKILL → worker noticed (TCP close): median {k_med:.1} ms, worst {k_max:.1} ms over {kills} trials (goal: median ≤ 50 ms)"
    );
    println!(
        "server SIGSTOP → worker noticed (heartbeats): median {s_med:.0} ms, worst {s_max:.0} ms of silence over {stops} trials (bound: liveness × interval + interval = {:.0} ms)",
        liveness * interval_ms + interval_ms
    );
}
