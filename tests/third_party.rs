//! A worker written by a third party from `docs/PROTOCOL.md` alone: the
//! Python program in `tests/python/secure_worker.py` (pyzmq, msgpack,
//! noiseprotocol, cryptography; no ots code) registers with a secured
//! server, takes a task, streams a log line, uploads a JUnit file and
//! reports, and the testrun passes. If the document and the code part
//! ways on framing, the handshake or sealing, this fails.
//!
//! The Python packages are installed from PyPI into `target/python-deps`
//! on first use (a fresh machine has CPython and pip).

mod common;

use common::*;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

const PACKAGES: [&str; 4] = ["pyzmq", "msgpack", "noiseprotocol", "cryptography"];

/// `target/python-deps`, with the packages in it.
fn python_deps() -> PathBuf {
    let deps = repo().join("target").join("python-deps");
    let importable = || {
        let mut cmd = Command::new("python3");
        cmd.env("PYTHONPATH", &deps)
            .args(["-c", "import zmq, msgpack, noise, cryptography"]);
        run_bounded(cmd, Duration::from_secs(60)).status.success()
    };
    if !importable() {
        let mut cmd = Command::new("python3");
        cmd.args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--target",
        ])
        .arg(&deps)
        .args(PACKAGES);
        let out = run_bounded(cmd, Duration::from_secs(300));
        assert!(
            out.status.success() && importable(),
            "cannot install the Python packages {PACKAGES:?} into {} (needs pip and PyPI): {}",
            deps.display(),
            text(&out.stderr)
        );
    }
    deps
}

#[test]
fn a_python_worker_written_from_the_protocol_document_runs_a_task_secured() {
    let deps = python_deps();
    let dir = tempfile::tempdir().unwrap();
    // The worker's key is allow-listed before the server starts: it reads
    // the list at start (a key added later is picked up within 250 ms,
    // and this worker does not retry a refused handshake).
    let worker_key = keys().worker("py1");
    let server = start_fresh_server(dir.path(), &[]);
    let keys = server.keys.clone().expect("a secured server");
    let run = submit_run(
        &server,
        &[
            "--device",
            "devicegroup:python",
            "--image",
            "i",
            "--packages",
            "p",
            "--queue-anyway",
        ],
    );
    let mut cmd = Command::new("python3");
    cmd.env("PYTHONPATH", &deps)
        .arg(repo().join("tests/python/secure_worker.py"))
        .arg(&server.control)
        .arg(&server.events)
        .arg(keys.server_pub())
        .arg(&worker_key)
        .args(["py1", "python"]);
    let out = run_bounded(cmd, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "the Python worker failed: {}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    // It verified the signed heartbeats on the events port (§15.4).
    assert!(
        text(&out.stdout).contains("verified heartbeat"),
        "{}",
        text(&out.stdout)
    );
    let st = wait_status(&server, &run, Duration::from_secs(20), finished);
    assert_eq!(st["verdict"], "PASS", "{st:#}");
    let task = &st["tasks"][0];
    assert_eq!(task["worker"], "py1", "{task:#}");
    let log = submit(&server, &["logs", &run], Duration::from_secs(10));
    let shown = text(&log.stdout);
    assert!(shown.contains("hello from a python worker"), "{shown}");
    // Packed lines (PROTOCOL §4.2.1) from a worker written in Python.
    assert!(shown.contains("packed from python"), "{shown}");
    assert!(shown.contains("[stderr] packed on stderr"), "{shown}");
    assert_eq!(log_accounting(task), (3, 3, 0), "{task:#}");
}
