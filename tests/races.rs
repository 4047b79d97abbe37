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

/// Item 2: on SIGTERM the server tells every registered worker it is
/// shutting down before it closes, every time (it was seen in 4 of 9
/// tries: the others only saw their connection fail).
#[test]
fn every_sigterm_tells_the_registered_workers_the_server_shut_down() {
    let dir = tempfile::tempdir().unwrap();
    keys().worker("w1");
    keys().worker("w2");
    let state = dir.path().join("server");
    let mut server = start_server(&state, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0", &[]);
    let (control, events) = (server.control.clone(), server.events.clone());
    let workers: Vec<Proc> = ["w1", "w2"]
        .iter()
        .map(|n| start_worker(dir.path(), n, "devicegroup:g", &server, &["/bin/true"], &[]))
        .collect();
    for round in 0..5 {
        assert!(
            wait_for_workers(&server, LIMIT, all_idle(&["w1", "w2"])),
            "round {round}"
        );
        let marks: Vec<usize> = workers.iter().map(|w| w.stderr.len()).collect();
        server.proc.signal(Signal::SIGTERM);
        assert_eq!(server.proc.wait_exit(LIMIT), Some(0), "round {round}");
        for (w, mark) in workers.iter().zip(marks) {
            let (_, line) = w
                .stderr
                .wait_for_after(mark, "server lost", LIMIT)
                .unwrap_or_else(|| panic!("round {round}: {:?}", w.stderr.all()));
            assert!(line.contains("server shut down"), "round {round}: {line}");
        }
        server = start_server(&state, &control, &events, &[]);
    }
}

/// Item 3: an operator drains a worker, removes its key while it runs a
/// task and puts the key back. The worker registers again and every
/// dispatch it gets is accepted (the server's numbering for it goes on
/// where it was, so nothing it sends is taken for a duplicate and
/// dropped): the task runs again and passes, the next testrun too, and
/// the worker is still drained until undrained.
#[test]
fn a_worker_whose_key_is_removed_and_restored_mid_task_is_never_wedged() {
    let dir = tempfile::tempdir().unwrap();
    let keys = Keys::new();
    keys.worker("w");
    let server = start_server_keyed(
        &dir.path().join("server"),
        "tcp://127.0.0.1:0",
        "tcp://127.0.0.1:0",
        &[],
        Some(keys.clone()),
    );
    let (conductor, go) = gated_conductor(dir.path());
    let w = start_worker_with(
        dir.path(),
        "w",
        "devicegroup:g",
        &server.control,
        &server.events,
        &[conductor.to_str().unwrap()],
        &[],
        &keys.worker_toml("w"),
    );
    assert!(wait_for_workers(&server, LIMIT, all_idle(&["w"])));
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
    let out = submit(&server, &["drain", "w"], LIMIT);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let public = keys.workers_dir().join("w.pub");
    let saved = std::fs::read(&public).unwrap();
    let mark = server.proc.stderr.len();
    std::fs::remove_file(&public).unwrap();
    assert!(server
        .proc
        .stderr
        .wait_for_after(mark, "key revoked", LIMIT)
        .is_some());
    assert!(
        w.stderr
            .wait_for("refused this worker's handshake", LIMIT)
            .is_some(),
        "{:?}",
        w.stderr.all()
    );
    std::fs::write(&public, saved).unwrap();
    // Back, and still drained.
    assert!(wait_for_workers(&server, LIMIT, |ws| ws.len() == 1
        && ws[0]["drained"] == true));
    let out = submit(&server, &["undrain", "w"], LIMIT);
    assert!(out.status.success(), "{}", text(&out.stderr));
    std::fs::write(&go, "").unwrap();
    let st = wait_status(&server, &run, LIMIT, finished);
    assert_eq!(st["verdict"], "PASS", "{st:#}");
    // And the next testrun, at once.
    let next = submit_run(
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
    let st = wait_status(&server, &next, LIMIT, finished);
    assert_eq!(st["verdict"], "PASS", "{st:#}");
    // At most the revoked attempt's own report arrives for a task that
    // moved on (answered `task_closed`); nothing keeps being refused.
    assert!(
        st["counters"]["orphan_control"].as_u64().unwrap_or(0) <= 1,
        "{:#}",
        st["counters"]
    );
}

/// A tmpfs of `size` mounted on `dir` for the test's life (root only).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).ok()?;
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .ok()?
            .success();
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }

    fn resize(&self, size: &str) {
        let ok = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap()
            .success();
        assert!(ok, "remount failed");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Item 4: the state directory runs full while a task floods its log; the
/// server stops (it acknowledges nothing it cannot store) and is started
/// again with room. The stored log holds whole lines only: a write cut
/// short by the full disk is cut back, never merged with the next line.
#[test]
fn a_full_disk_leaves_no_torn_line_in_a_task_log() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let Some(fs) = Tmpfs::mount(&state, "3m") else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    keys().worker("w");
    let server = start_server(&state, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0", &[]);
    let (control, events) = (server.control.clone(), server.events.clone());
    let go = dir.path().join("go");
    let conductor = script(
        dir.path(),
        "flood.sh",
        &format!(
            "while [ ! -e {go:?} ]; do sleep 0.01; done\nfor i in $(seq 1 40); do seq 1 5000 | sed \"s/^/flood line $i./\"; sleep 0.05; done\n\
             mkdir -p \"$OTS_RESULTS_DIR\"; echo '<testsuite><testcase name=\"t\"/></testsuite>' > \"$OTS_RESULTS_DIR/r.xml\""
        ),
    );
    let _w = start_idle_worker(
        dir.path(),
        "w",
        "devicegroup:g",
        &server,
        &[conductor.to_str().unwrap()],
        &[("OTS_WORKER_LOG_BUFFER_LINES", "300000")],
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
    let mut server = server;
    // The disk fills; the server stops rather than acknowledge what it
    // cannot keep (or logs that it cannot store lines).
    let full = server.proc.wait_exit(LIMIT);
    assert!(
        full.is_some(),
        "the server never ran out of room: {:?}",
        server.proc.stderr.all()
    );
    let at_stop =
        std::fs::read(state.join("tasks").join(format!("{run}.1")).join("log")).unwrap_or_default();
    eprintln!(
        "log at the stop: {} bytes, ends with a newline: {}",
        at_stop.len(),
        at_stop.last() == Some(&b'\n')
    );
    fs.resize("256m");
    let server = start_server(&state, &control, &events, &[]);
    let st = wait_status(&server, &run, LIMIT, finished);
    let (produced, stored, lost) = log_accounting(&st["tasks"][0]);
    assert_eq!(stored + lost, produced, "{:#}", st["tasks"][0]);
    let log =
        std::fs::read_to_string(state.join("tasks").join(format!("{run}.1")).join("log")).unwrap();
    assert!(log.ends_with('\n'), "the log ends in a torn line");
    let mut flood = 0;
    for line in log
        .lines()
        .filter(|l| !l.starts_with("[ots-worker]") && (l.contains("flood") || l.contains("line")))
    {
        flood += 1;
        let whole = line
            .strip_prefix("flood line ")
            .and_then(|rest| rest.split_once('.'))
            .is_some_and(|(a, b)| a.parse::<u32>().is_ok() && b.parse::<u32>().is_ok());
        assert!(whole, "a torn or merged line in the stored log: {line:?}");
    }
    assert!(
        flood > 1000,
        "too few lines stored to prove anything: {flood}"
    );
}

/// Item 5: a request refused for its class, for a raw frame it does not
/// use, for a protocol version or an oversized header gets an error that
/// names the request (the client shows the refusal instead of timing out).
#[test]
fn refusals_of_a_readable_request_echo_its_request_id() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let server = start_server_insecure(
        &dir.path().join("server"),
        "tcp://127.0.0.1:0",
        "tcp://127.0.0.1:0",
        &[],
    );
    let ping = rmp_serde::to_vec_named(&ots::protocol::Body::Ping { request: 4242 }).unwrap();
    let header = |class: &str, v: u8| {
        rmp_serde::to_vec_named(&serde_json::json!({
            "v": v, "class": class, "mandatory": false, "seq": 1, "task": null
        }))
        .unwrap()
    };
    let cases: Vec<(&str, Vec<Vec<u8>>)> = vec![
        ("class", vec![header("log", 1), ping.clone()]),
        (
            "raw frame",
            vec![header("control", 1), ping.clone(), b"raw".to_vec()],
        ),
        ("version", vec![header("control", 9), ping.clone()]),
        ("header size", vec![vec![0x90; 5000], ping.clone()]),
    ];
    for (what, frames) in cases {
        let mut s = zmtp::handshake(&server.control, "DEALER").unwrap();
        let parts: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
        s.write_all(&zmtp::frames(&parts)).unwrap();
        let reply = zmtp::read_message(&mut s).unwrap();
        let body: serde_json::Value = rmp_serde::from_slice(&reply[1]).unwrap();
        assert_eq!(body["type"], "error", "{what}: {body}");
        assert_eq!(body["request"], 4242, "{what}: {body}");
    }
}
