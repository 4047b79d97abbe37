//! Issue 20: correctness races at a connection's end and under load, with
//! the real binaries over real sockets.

mod common;

use common::*;
use nix::sys::signal::Signal;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);

/// Item 1: a worker streams log lines; the server is SIGSTOPped long
/// enough for the worker to give up on its connection (closing it after
/// its last lines reached the server's kernel) and resumed. Everything
/// the old connection delivered is handled before its close: every line
/// is stored, none counted lost, and nothing is refused as
/// unauthenticated.
#[test]
fn lines_a_closed_connection_delivered_are_all_handled_before_its_close() {
    let dir = tempfile::tempdir().unwrap();
    keys().worker("w"); // allow-listed before the server starts
    let server = start_fresh_server(dir.path(), &[]);
    let go = dir.path().join("go");
    let conductor = script(
        dir.path(),
        "stream.sh",
        &format!(
            "while [ ! -e {go:?} ]; do sleep 0.01; done\nfor i in $(seq 1 1500); do echo \"streamed line $i\"; sleep 0.005; done\n\
             mkdir -p \"$OTS_RESULTS_DIR\"; echo '<testsuite><testcase name=\"t\"/></testsuite>' > \"$OTS_RESULTS_DIR/r.xml\""
        ),
    );
    let w = start_idle_worker(
        dir.path(),
        "w",
        "devicegroup:g",
        &server,
        &[conductor.to_str().unwrap()],
        &[],
    );
    let run = submit_run(
        &server,
        &[
            "--device",
            "devicegroup:g",
            "--image",
            "i",
            "--packages",
            "p",
        ],
    );
    wait_status(&server, &run, LIMIT, running);
    std::fs::write(&go, "").unwrap();
    // Let some lines flow, then stop the server until the worker has
    // given up on its connection.
    let mark = w.stderr.len();
    server.proc.signal(Signal::SIGSTOP);
    let lost = w.stderr.wait_for_after(mark, "server lost", LIMIT);
    server.proc.signal(Signal::SIGCONT);
    assert!(lost.is_some(), "{:?}", w.stderr.all());
    let st = wait_status(&server, &run, LIMIT, finished);
    assert_eq!(st["verdict"], "PASS", "{st:#}");
    let (produced, stored, lost) = log_accounting(&st["tasks"][0]);
    assert!(produced >= 1500, "{:#}", st["tasks"][0]);
    assert_eq!((stored, lost), (produced, 0), "{:#}", st["tasks"][0]);
    let server_log = server.proc.stderr.all().join("\n");
    // What the race logged: sealed messages of the closed connection
    // taken for plaintext, and their lines counted lost.
    assert!(
        !server_log.contains("requires a Noise handshake first")
            && !server_log.contains("lost in transit"),
        "{server_log}"
    );
}
