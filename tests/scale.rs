//! Scale, kept short enough for CI: 1000 simulated workers speaking the
//! real protocol over real sockets against the real server, secured (each
//! with a key of its own, a Noise handshake on every connection, every
//! message sealed). None is declared lost while the server is healthy, and
//! all register again after the server is SIGKILLed and restarted. (`examples/fleet.rs` runs the
//! same simulated workers at 5000 for the figures in the README.)

mod common;

use common::zmtp;
use common::*;
use std::time::{Duration, Instant};

const WORKERS: usize = 1000;

fn wait_until(limit: Duration, ok: impl Fn() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if ok() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50)); // polling interval, bounded by the deadline
    }
    None
}

#[test]
fn a_thousand_workers_stay_registered_and_all_come_back_after_a_server_restart() {
    zmtp::raise_fd_limit();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("server");
    let lab = keys();
    let fleet_keys = ots::fleet::fleet_keys(
        &lab.path().join("private"),
        &lab.workers_dir(),
        "sim",
        WORKERS,
    )
    .unwrap();
    let security = ots::fleet::FleetSecurity::Noise {
        server: ots::security::PublicKey::read(&lab.server_pub()).unwrap(),
        keys: std::sync::Arc::new(fleet_keys),
    };
    let mut server = start_server(&state, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0", &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let fleet = {
        let _guard = rt.enter();
        ots::fleet::start(&server.control, &server.events, "sim", WORKERS, 0, security)
    };
    let took = wait_until(Duration::from_secs(60), || fleet.registered() == WORKERS)
        .unwrap_or_else(|| panic!("only {} of {WORKERS} registered", fleet.registered()));
    eprintln!("{WORKERS} simulated workers registered in {took:?}");
    // Healthy for a few liveness windows: nobody is lost.
    let mark = server.proc.stderr.len();
    std::thread::sleep(Duration::from_secs(4)); // the observation window itself
    assert!(
        server
            .proc
            .stderr
            .wait_for_after(mark, "worker lost", Duration::from_millis(1))
            .is_none(),
        "a worker was declared lost while the server was healthy"
    );
    assert_eq!(fleet.registered(), WORKERS);
    let pid = server.proc.child.id() as i32;
    eprintln!(
        "server RSS with {WORKERS} workers: {} KiB",
        zmtp::rss_kib(pid)
    );

    // SIGKILL and restart on the same endpoints and state.
    let (control, events) = (server.control.clone(), server.events.clone());
    let welcomes = fleet.welcomes();
    server.proc.kill();
    let restarted = Instant::now();
    let server = start_server(&state, &control, &events, &[]);
    let took = wait_until(Duration::from_secs(30), || {
        fleet.registered() == WORKERS && fleet.welcomes() >= welcomes + WORKERS
    })
    .unwrap_or_else(|| {
        panic!(
            "after the restart only {} of {WORKERS} registered again",
            fleet.registered()
        )
    });
    eprintln!(
        "all {WORKERS} registered again {:?} after the restart ({took:?} of waiting)",
        restarted.elapsed()
    );
    std::thread::sleep(Duration::from_secs(4)); // a few liveness windows after the storm
    assert_eq!(
        server.proc.stderr.count("worker lost: no heartbeat"),
        0,
        "workers declared lost during the reconnect storm"
    );
    eprintln!(
        "longest heartbeat gap a worker saw: {:?}; failed handshakes: {}",
        fleet.worst_heartbeat_gap(),
        fleet.handshake_failures()
    );
    assert_eq!(fleet.handshake_failures(), 0, "a fleet key was refused");
    assert!(submit(&server, &["workers"], Duration::from_secs(10))
        .status
        .success());
    drop(rt);
}
