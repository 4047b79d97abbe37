//! Operations with real processes: a worker stopped with SIGTERM finishes
//! (or aborts) its task and says `bye`, so the server records a clean
//! stop; drain and undrain; a server stopped with SIGTERM tells its
//! workers, which register again as soon as it is back.

mod common;

use common::*;
use nix::sys::signal::Signal;
use std::path::Path;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);
const FAST: [(&str, &str); 1] = [("OTS_SERVER_HEARTBEAT_INTERVAL_MS", "250")];

fn server(dir: &Path) -> ServerProc {
    start_server(
        &dir.join("server"),
        "tcp://127.0.0.1:0",
        "tcp://127.0.0.1:0",
        &FAST,
    )
}

/// A conductor that waits for `go` before it writes its JUnit result.
fn gated(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let go = dir.join("go");
    let conductor = script(
        dir,
        "gated.sh",
        &format!(
            "echo started\nwhile [ ! -e {go:?} ]; do sleep 0.05; done\necho '<testsuite><testcase name=\"g\"/></testsuite>' > \"$OTS_RESULTS_DIR/r.xml\""
        ),
    );
    (conductor, go)
}

fn worker_state(server: &ServerProc, name: &str) -> Option<String> {
    let out = submit(server, &["workers", "--json"], Duration::from_secs(10));
    let ws: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    ws.as_array()?
        .iter()
        .find(|w| w["name"] == name)
        .map(|w| w["state"].as_str().unwrap_or("").to_string())
}

fn submit_gated(server: &ServerProc) -> String {
    submit_run(
        server,
        &[
            "--device",
            "devicegroup:g",
            "--image",
            "i",
            "--packages",
            "p",
            "--queue-anyway",
        ],
    )
}

#[test]
fn sigterm_with_finish_lets_the_task_end_delivers_it_and_says_bye() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path());
    let (conductor, go) = gated(dir.path());
    let mut w = start_worker(
        dir.path(),
        "w",
        "devicegroup:g",
        &server,
        &[conductor.to_str().unwrap()],
        &[],
    );
    let run = submit_gated(&server);
    wait_status(&server, &run, LIMIT, running);
    w.signal(Signal::SIGTERM);
    assert!(w.stderr.wait_for("stop requested", LIMIT).is_some());
    // Still running: the worker waits for its task.
    assert!(
        w.wait_exit(Duration::from_millis(300)).is_none(),
        "the worker left its task"
    );
    std::fs::write(&go, "").unwrap();
    assert_eq!(w.wait_exit(LIMIT), Some(0), "{:?}", w.stderr.all());
    let st = wait_status(&server, &run, LIMIT, finished);
    assert_eq!(st["verdict"], "PASS", "{st:#}");
    assert_eq!(st["tasks"][0]["attempts"], 1);
    assert!(w.stderr.all().iter().any(|l| l.contains("said bye")));
    assert_eq!(worker_state(&server, "w").as_deref(), Some("stopped"));
    assert!(server
        .proc
        .stderr
        .wait_for("worker stopped cleanly", Duration::from_secs(5))
        .is_some());
    assert_eq!(
        server.proc.stderr.count("worker lost"),
        0,
        "{:?}",
        server.proc.stderr.all()
    );
}

#[test]
fn sigterm_with_abort_stops_the_task_which_runs_again_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path());
    let (conductor, go) = gated(dir.path());
    let mut w1 = start_worker(
        dir.path(),
        "w1",
        "devicegroup:g",
        &server,
        &[conductor.to_str().unwrap()],
        &[("OTS_WORKER_STOP_POLICY", "abort")],
    );
    assert!(wait_for_workers(&server, LIMIT, all_idle(&["w1"])));
    let run = submit_gated(&server);
    wait_status(&server, &run, LIMIT, running);
    w1.signal(Signal::SIGTERM);
    assert_eq!(w1.wait_exit(LIMIT), Some(0), "{:?}", w1.stderr.all());
    // Re-queued at once (no grace period: the worker said why it left).
    let st = wait_status(&server, &run, LIMIT, |st| {
        st["tasks"][0]["state"] == "queued"
    });
    let reason = st["tasks"][0]["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|h| h["reason"].as_str())
        .collect::<Vec<_>>()
        .join(" | ");
    assert!(
        reason.contains("interrupted") || reason.contains("stopped"),
        "{reason}"
    );
    std::fs::write(&go, "").unwrap();
    let _w2 = start_worker(
        dir.path(),
        "w2",
        "devicegroup:g",
        &server,
        &[conductor.to_str().unwrap()],
        &[],
    );
    let st = wait_status(&server, &run, LIMIT, finished);
    assert_eq!(st["verdict"], "PASS", "{st:#}");
    assert_eq!(st["tasks"][0]["worker"], "w2");
    assert_eq!(worker_state(&server, "w1").as_deref(), Some("stopped"));
}

#[test]
fn drain_then_undrain_a_worker() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path());
    let conductor = script(
        dir.path(),
        "ok.sh",
        "echo '<testsuite><testcase name=\"d\"/></testsuite>' > \"$OTS_RESULTS_DIR/r.xml\"",
    );
    let _w = start_worker(
        dir.path(),
        "w",
        "devicegroup:g",
        &server,
        &[conductor.to_str().unwrap()],
        &[],
    );
    assert!(wait_for_workers(&server, LIMIT, all_idle(&["w"])));
    let o = submit(&server, &["drain", "w"], LIMIT);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let run = submit_gated(&server);
    // Drained: the task stays queued.
    std::thread::sleep(Duration::from_millis(500)); // a window in which nothing may happen
    let st = status_json(&server, &run).unwrap();
    assert_eq!(st["tasks"][0]["state"], "queued", "{st:#}");
    let o = submit(&server, &["undrain", "w"], LIMIT);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let st = wait_status(&server, &run, LIMIT, finished);
    assert_eq!(st["verdict"], "PASS", "{st:#}");
}

#[test]
fn a_server_stopped_with_sigterm_tells_its_workers_who_come_back_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = server(dir.path());
    let conductor = script(dir.path(), "noop.sh", "true");
    let w = start_worker(
        dir.path(),
        "w",
        "devicegroup:g",
        &server,
        &[conductor.to_str().unwrap()],
        &[],
    );
    assert!(wait_for_workers(&server, LIMIT, all_idle(&["w"])));
    let (control, events, state) = (
        server.control.clone(),
        server.events.clone(),
        server.state_dir.clone(),
    );
    let mark = w.stderr.len();
    server.proc.signal(Signal::SIGTERM);
    assert_eq!(server.proc.wait_exit(LIMIT), Some(0));
    let (_, line) = w
        .stderr
        .wait_for_after(mark, "server shut down", Duration::from_secs(5))
        .expect("the worker heard the shutdown");
    assert!(line.contains("server lost"), "{line}");
    let server = start_server(&state, &control, &events, &FAST);
    assert!(
        w.stderr
            .wait_for_after(mark, "registered with the server again", LIMIT)
            .is_some(),
        "{:?}",
        w.stderr.all()
    );
    assert!(wait_for_workers(&server, LIMIT, all_idle(&["w"])));
}
