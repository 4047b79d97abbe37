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
    let _w = start_idle_worker(
        dir.path(),
        "w",
        "devicegroup:g",
        &server,
        &[conductor.to_str().unwrap()],
        &[],
    );
    let o = submit(&server, &["drain", "w"], LIMIT);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let run = submit_gated(&server);
    // Drained: the task stays queued.
    std::thread::sleep(Duration::from_millis(500)); // a window in which nothing may happen
    let st = current_status(&server, &run);
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
    let w = start_idle_worker(
        dir.path(),
        "w",
        "devicegroup:g",
        &server,
        &[conductor.to_str().unwrap()],
        &[],
    );
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

/// What a systemd would receive on NOTIFY_SOCKET, as (datagram) lines.
struct NotifySocket {
    socket: std::os::unix::net::UnixDatagram,
    path: std::path::PathBuf,
}

impl NotifySocket {
    fn new(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        NotifySocket { socket, path }
    }

    /// The next datagram within `limit`, if any.
    fn next(&self, limit: Duration) -> Option<String> {
        self.socket.set_read_timeout(Some(limit)).unwrap();
        let mut buf = [0u8; 4096];
        let n = self.socket.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Waits for a datagram containing `needle`.
    fn wait_for(&self, needle: &str, limit: Duration) -> Option<String> {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if let Some(m) = self.next(Duration::from_millis(200)) {
                if m.contains(needle) {
                    return Some(m);
                }
            }
        }
        None
    }
}

#[test]
fn under_systemd_the_server_says_ready_pings_the_watchdog_from_its_loop_and_a_wedged_loop_stops() {
    let dir = tempfile::tempdir().unwrap();
    let notify = NotifySocket::new(dir.path());
    let path = notify.path.to_str().unwrap().to_string();
    let server = start_server(
        &dir.path().join("server"),
        "tcp://127.0.0.1:0",
        "tcp://127.0.0.1:0",
        &[
            FAST[0],
            ("NOTIFY_SOCKET", path.as_str()),
            ("WATCHDOG_USEC", "1000000"),
            ("OTS_TEST_WEDGE_ON_SIGUSR1", "1"),
        ],
    );
    let ready = notify
        .wait_for("READY=1", Duration::from_secs(10))
        .expect("READY=1");
    assert!(ready.contains("STATUS=serving"), "{ready}");
    for _ in 0..3 {
        assert!(notify
            .wait_for("WATCHDOG=1", Duration::from_secs(2))
            .is_some());
    }
    server.proc.signal(Signal::SIGUSR1);
    assert!(server
        .proc
        .stderr
        .wait_for("wedging the main loop", Duration::from_secs(5))
        .is_some());
    // Whatever was in flight drains; then silence, as systemd would see
    // it before killing the process (WatchdogSec=1s here).
    while notify.next(Duration::from_millis(300)).is_some() {}
    assert!(
        notify
            .wait_for("WATCHDOG=1", Duration::from_millis(1500))
            .is_none(),
        "a wedged loop kept pinging"
    );
}

#[test]
fn check_config_shows_where_each_value_comes_from_and_refuses_unknown_keys() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("worker.toml");
    std::fs::write(
        &base,
        format!(
            "name = \"w\"\ndevice = \"devicegroup:base\"\nheartbeat_interval_ms = \"2s\"\nsecurity = \"none\"\nstate_dir = {:?}\n[conductor]\ncommand = [\"/bin/true\"]\n",
            dir.path().join("state").display().to_string()
        ),
    )
    .unwrap();
    let instance = dir.path().join("w.toml");
    std::fs::write(
        &instance,
        "device = \"devicegroup:mine devicename:board\"\n",
    )
    .unwrap();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = std::process::Command::new(bin("ots-worker"));
        cmd.args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        run_bounded(cmd, LIMIT)
    };
    let o = run(
        &[
            "--config",
            base.to_str().unwrap(),
            "--instance-config",
            instance.to_str().unwrap(),
            "--check-config",
        ],
        &[("OTS_WORKER_LIVENESS", "5")],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let shown = text(&o.stdout);
    assert!(
        shown.contains(&format!(
            "device = \"devicegroup:mine devicename:board\"  # file {}",
            instance.display()
        )),
        "{shown}"
    );
    assert!(
        shown.contains("heartbeat_interval_ms = 2000  # file"),
        "{shown}"
    );
    assert!(
        shown.contains("liveness = 5  # env OTS_WORKER_LIVENESS"),
        "{shown}"
    );
    assert!(shown.contains("log_batch_ms = 20  # default"), "{shown}");
    // An unknown key: named, exit 78; a bad flag: 78 too (not clap's 2).
    std::fs::write(&instance, "devise = \"typo\"\n").unwrap();
    let o = run(
        &[
            "--config",
            base.to_str().unwrap(),
            "--instance-config",
            instance.to_str().unwrap(),
            "--check-config",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(78));
    assert!(text(&o.stderr).contains("devise"), "{}", text(&o.stderr));
    let o = run(&["--no-such-flag"], &[]);
    assert_eq!(o.status.code(), Some(78));
    let mut cmd = std::process::Command::new(bin("ots-server"));
    cmd.args([
        "--check-config",
        "--control",
        "tcp://127.0.0.1:7000",
        "--state-dir",
    ])
    .arg(dir.path().join("server"))
    .env("OTS_SERVER_SECURITY", "none");
    let o = run_bounded(cmd, LIMIT);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("control = \"tcp://127.0.0.1:7000\"  # flag"));
}

#[test]
fn the_operators_view_lists_runs_queues_and_workers_and_streams_typed_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path());
    let conductor = script(
        dir.path(),
        "ok.sh",
        // Lines over a second, so a follower that starts late still sees some live.
        "for i in 1 2 3 4 5 6 7 8 9 10; do echo hello $i; sleep 0.1; done\necho '<testsuite><testcase name=\"v\"/></testsuite>' > \"$OTS_RESULTS_DIR/r.xml\"",
    );
    let _w = start_idle_worker(
        dir.path(),
        "w",
        "devicegroup:g",
        &server,
        &[conductor.to_str().unwrap()],
        &[],
    );
    // Streaming JSON Lines: every line one object with a type.
    let out = submit(
        &server,
        &[
            "run",
            "--device",
            "devicegroup:g",
            "--image",
            "i",
            "--packages",
            "p",
            "--follow",
            "--json",
        ],
        LIMIT,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut kinds = std::collections::BTreeSet::new();
    for line in text(&out.stdout).lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        kinds.insert(
            v["type"]
                .as_str()
                .expect("a type on every line")
                .to_string(),
        );
    }
    for k in ["submitted", "event", "log", "status"] {
        assert!(kinds.contains(k), "{kinds:?}");
    }
    // Two testruns for a group nobody serves: queued, in order.
    let a = submit_run(
        &server,
        &[
            "--device",
            "devicegroup:none",
            "--image",
            "i",
            "--packages",
            "p",
            "--queue-anyway",
        ],
    );
    let b = submit_run(
        &server,
        &[
            "--device",
            "devicegroup:none",
            "--image",
            "i",
            "--packages",
            "p",
            "--queue-anyway",
        ],
    );
    let q: serde_json::Value =
        serde_json::from_slice(&submit(&server, &["queue", "--json"], LIMIT).stdout).unwrap();
    let none = q
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key"] == "none")
        .expect("queue none");
    assert_eq!(none["length"], 2);
    assert_eq!(none["tasks"][0]["run"], a.as_str());
    assert_eq!(none["tasks"][1]["position"], 2);
    let shown = text(&submit(&server, &["queue"], LIMIT).stdout);
    assert!(shown.starts_with("ROUTING KEY"), "{shown}");
    let runs: serde_json::Value =
        serde_json::from_slice(&submit(&server, &["runs", "--json"], LIMIT).stdout).unwrap();
    let ids: Vec<&str> = runs
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["run"].as_str().unwrap())
        .collect();
    assert_eq!(ids[..2], [b.as_str(), a.as_str()], "newest first");
    let queued: serde_json::Value = serde_json::from_slice(
        &submit(&server, &["runs", "--state", "finished", "--json"], LIMIT).stdout,
    )
    .unwrap();
    assert_eq!(queued.as_array().unwrap().len(), 1);
    let shown = text(&submit(&server, &["runs"], LIMIT).stdout);
    assert!(
        shown.starts_with("RUN") && shown.contains("PASS"),
        "{shown}"
    );
    let shown = text(&submit(&server, &["workers"], LIMIT).stdout);
    assert!(shown.starts_with("NAME"), "{shown}");
    assert!(shown.contains(env!("CARGO_PKG_VERSION")), "{shown}");
}

fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

/// The value of the first sample line starting with `prefix`.
fn sample(page: &str, prefix: &str) -> Option<f64> {
    page.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn the_metrics_endpoint_serves_counters_that_move_with_a_testrun() {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let server = start_server(
        &dir.path().join("server"),
        "tcp://127.0.0.1:0",
        "tcp://127.0.0.1:0",
        &[FAST[0], ("OTS_SERVER_METRICS", addr.as_str())],
    );
    let conductor = script(
        dir.path(),
        "ok.sh",
        "echo one\necho two\necho '<testsuite><testcase name=\"m\"/></testsuite>' > \"$OTS_RESULTS_DIR/r.xml\"",
    );
    let _w = start_idle_worker(
        dir.path(),
        "w",
        "devicegroup:g",
        &server,
        &[conductor.to_str().unwrap()],
        &[],
    );
    let before = scrape(&addr);
    assert!(
        before.contains("ots_workers{state=\"idle\",health=\"good\"} 1"),
        "{before}"
    );
    assert!(
        before.contains("# TYPE ots_state_commit_seconds histogram"),
        "{before}"
    );
    let stored_before =
        sample(&before, "ots_events_total{event=\"log_lines_stored\"}").unwrap_or(0.0);
    let run = submit_gated(&server);
    let st = wait_status(&server, &run, LIMIT, finished);
    assert_eq!(st["verdict"], "PASS", "{st:#}");
    let after = scrape(&addr);
    let stored_after = sample(&after, "ots_events_total{event=\"log_lines_stored\"}").unwrap();
    assert!(
        stored_after >= stored_before + 3.0,
        "{before}\n---\n{after}"
    );
    assert!(sample(&after, "ots_events_total{event=\"files_stored\"}").unwrap() >= 1.0);
    // Anything but GET /metrics: 404, and the server goes on.
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 404"), "{out}");
}
