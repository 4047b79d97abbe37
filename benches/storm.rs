//! Benchmark: the reconnect storm after a server restart, with and
//! without security.
//!
//! `cargo bench --bench storm` starts the real `ots-server` binary, lets N
//! simulated workers (`ots::fleet`, the real protocol over real sockets,
//! each secured worker with a key of its own) register, SIGKILLs the
//! server, restarts it on the same endpoints and state, and prints how long
//! until every worker is registered again, how many the server declared
//! lost over the next liveness windows, and the longest heartbeat gap a
//! worker saw (secured: the signed heartbeats each worker verifies on its
//! SUB). Once with `security = "none"`, once with Noise.
//!
//! Environment: OTS_STORM_WORKERS (default 1000).

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use ots::fleet::{FleetCounters, FleetSecurity};
use ots::security::PublicKey;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn wait_until(limit: Duration, ok: impl Fn() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if ok() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10)); // polling interval, bounded by the deadline
    }
    None
}

/// The harness's server, secured with its keys or without security.
fn server(secure: bool, state: &std::path::Path, control: &str, events: &str) -> ServerProc {
    if secure {
        start_server(state, control, events, &[])
    } else {
        start_server_insecure(state, control, events, &[])
    }
}

fn storm(n: usize, secure: bool) {
    let mode = if secure { "noise" } else { "none " };
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("state");
    let security = if secure {
        let lab = keys();
        let fleet =
            ots::fleet::fleet_keys(&lab.path().join("private"), &lab.workers_dir(), "storm", n)
                .expect("fleet keys");
        FleetSecurity::Noise {
            server: PublicKey::read(&lab.server_pub()).expect("server.pub"),
            keys: Arc::new(fleet),
        }
    } else {
        FleetSecurity::None
    };
    let mut first_server = server(secure, &state, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let fleet: FleetCounters = {
        let _guard = rt.enter();
        ots::fleet::start(
            &first_server.control,
            &first_server.events,
            "storm",
            n,
            0,
            security,
        )
    };
    let Some(first) = wait_until(Duration::from_secs(120), || fleet.registered() == n) else {
        println!(
            "{mode}: only {} of {n} registered in 120 s",
            fleet.registered()
        );
        return;
    };
    let (control, events) = (first_server.control.clone(), first_server.events.clone());
    let welcomes = fleet.welcomes();
    first_server.proc.kill();
    let restarted = Instant::now();
    let server = server(secure, &state, &control, &events);
    let back = wait_until(Duration::from_secs(120), || {
        fleet.registered() == n && fleet.welcomes() >= welcomes + n
    });
    let back_after = restarted.elapsed();
    // A few liveness windows after the storm: nobody may be lost.
    std::thread::sleep(Duration::from_secs(5)); // the observation window itself
    let lost = server.proc.stderr.count("worker lost");
    match back {
        Some(_) => println!(
            "{mode}: {n} workers registered in {:.2} s; after SIGKILL + restart all back in {:.2} s; \
             declared lost afterwards: {lost}; turned away as busy: {}; failed handshakes: {}; \
             longest heartbeat gap seen by a worker: {}",
            first.as_secs_f64(),
            back_after.as_secs_f64(),
            fleet.handshakes_busy(),
            fleet.handshake_failures(),
            if secure {
                format!("{} ms", fleet.worst_heartbeat_gap().as_millis())
            } else {
                "(on PUB, not measured here)".into()
            }
        ),
        None => println!(
            "{mode}: after the restart only {} of {n} back within 120 s",
            fleet.registered()
        ),
    }
    drop(server);
    drop(rt);
}

fn main() {
    let n: usize = std::env::var("OTS_STORM_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    // Thousands of sockets in one process.
    zmtp::raise_fd_limit();
    storm(n, false);
    storm(n, true);
}
