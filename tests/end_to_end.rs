//! The real binaries over real ZeroMQ sockets on 127.0.0.1: testruns from
//! submission to verdict, routing, refusals.

mod common;

use common::*;
use std::time::Duration;

const RUN_LIMIT: Duration = Duration::from_secs(60);

fn fast() -> Vec<(&'static str, &'static str)> {
    vec![("OTS_SERVER_HEARTBEAT_INTERVAL_MS", "250")]
}

/// Six packages whose one test each takes a moment, so they overlap.
fn six_packages(dir: &std::path::Path) -> std::path::PathBuf {
    let pkgs = dir.join("packages");
    for i in 1..=6 {
        let p = pkgs.join(format!("p{i}"));
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(
            p.join("check.sh"),
            format!("echo package p{i} on $(hostname)\nsleep 0.3\n"),
        )
        .unwrap();
    }
    pkgs
}

#[test]
fn perpackage_testrun_spreads_over_the_matching_group_with_logs_and_junit() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(
        &dir.path().join("server"),
        "tcp://127.0.0.1:0",
        "tcp://127.0.0.1:0",
        &fast(),
    );
    let pkgs = six_packages(dir.path());
    let conductor = example_conductor();
    let argv: Vec<&str> = conductor.iter().map(String::as_str).collect();
    let env = [("OTS_EXAMPLE_PACKAGES", pkgs.to_str().unwrap())];
    let _a1 = start_worker(dir.path(), "a1", "devicegroup:alpha", &server, &argv, &env);
    let _a2 = start_worker(
        dir.path(),
        "a2",
        "devicegroup:alpha devicename:board deviceid:2",
        &server,
        &argv,
        &env,
    );
    let _b1 = start_worker(dir.path(), "b1", "devicegroup:beta", &server, &argv, &env);
    assert!(wait_for_workers(
        &server,
        Duration::from_secs(20),
        all_idle(&["a1", "a2", "b1"])
    ));

    let fetch = dir.path().join("fetched");
    let out = submit(
        &server,
        &[
            "run",
            "--device",
            "devicegroup:alpha",
            "--image",
            repo().join("examples/images/demo.img").to_str().unwrap(),
            "--packages",
            "p1,p2,p3,p4,p5,p6",
            "--distribution",
            "perpackage",
            "--json",
            "--fetch",
            fetch.to_str().unwrap(),
        ],
        RUN_LIMIT,
    );
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {stdout}\nstderr: {}",
        text(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(status["verdict"], "PASS");
    let tasks = status["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 6);
    let mut used = std::collections::BTreeSet::new();
    for t in tasks {
        assert_eq!(t["verdict"], "PASS", "{t}");
        let w = t["worker"].as_str().unwrap().to_string();
        assert!(
            w == "a1" || w == "a2",
            "task went to {w}, outside group alpha"
        );
        used.insert(w);
        assert_eq!(t["cases"]["cases"], 1);
        // Every file announced arrived and was fetched intact.
        let task = t["task"].as_str().unwrap();
        let pkg = t["packages"][0].as_str().unwrap();
        assert!(fetch.join(task).join(format!("{pkg}.xml")).is_file());
        assert_eq!(
            t["log_lines_stored"], t["log_lines_produced"],
            "no log line lost: {t}"
        );
    }
    assert_eq!(used.len(), 2, "both alpha workers took part");

    // The logs arrived and are served back.
    let run = status["run"].as_str().unwrap();
    let logs = submit(&server, &["logs", run], RUN_LIMIT);
    let logs = text(&logs.stdout);
    for i in 1..=6 {
        assert!(
            logs.contains(&format!("[p{i}/check] package p{i} on")),
            "{logs}"
        );
    }
}

#[test]
fn verdicts_for_passing_failing_and_crashing_conductors() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(
        &dir.path().join("server"),
        "tcp://127.0.0.1:0",
        "tcp://127.0.0.1:0",
        &fast(),
    );
    let conductor = example_conductor();
    let argv: Vec<&str> = conductor.iter().map(String::as_str).collect();
    let crash = dir.path().join("crash.sh");
    std::fs::write(&crash, "#!/bin/sh\necho about to crash\nkill -SEGV $$\n").unwrap();
    std::fs::set_permissions(&crash, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let _good = start_worker(dir.path(), "good", "devicegroup:good", &server, &argv, &[]);
    let _bad = start_worker(
        dir.path(),
        "bad",
        "devicegroup:crashy",
        &server,
        &[crash.to_str().unwrap()],
        &[],
    );
    assert!(wait_for_workers(
        &server,
        Duration::from_secs(20),
        all_idle(&["good", "bad"])
    ));
    let image = repo().join("examples/images/demo.img");
    let image = image.to_str().unwrap();

    let pass = submit(
        &server,
        &[
            "run",
            "--device",
            "devicegroup:good",
            "--image",
            image,
            "--packages",
            "smoke",
            "--wait",
        ],
        RUN_LIMIT,
    );
    assert_eq!(pass.status.code(), Some(0), "{}", text(&pass.stdout));
    assert!(
        text(&pass.stdout).contains("PASS — 2 test cases passed"),
        "{}",
        text(&pass.stdout)
    );

    let fail = submit(
        &server,
        &[
            "run",
            "--device",
            "devicegroup:good",
            "--image",
            image,
            "--packages",
            "failing",
            "--wait",
        ],
        RUN_LIMIT,
    );
    assert_eq!(fail.status.code(), Some(1), "{}", text(&fail.stdout));
    assert!(
        text(&fail.stdout).contains("FAIL — 1 of 2 test cases failed"),
        "{}",
        text(&fail.stdout)
    );

    let error = submit(
        &server,
        &[
            "run",
            "--device",
            "devicegroup:crashy",
            "--image",
            image,
            "--packages",
            "smoke",
            "--wait",
        ],
        RUN_LIMIT,
    );
    assert_eq!(error.status.code(), Some(2), "{}", text(&error.stdout));
    assert!(
        text(&error.stdout).contains("conductor killed by signal 11"),
        "{}",
        text(&error.stdout)
    );

    let missing = submit(
        &server,
        &[
            "run",
            "--device",
            "devicegroup:good",
            "--image",
            "/nonexistent.img",
            "--packages",
            "smoke",
            "--wait",
        ],
        RUN_LIMIT,
    );
    assert_eq!(missing.status.code(), Some(2), "{}", text(&missing.stdout));
    assert!(
        text(&missing.stdout).contains("exit status 3"),
        "{}",
        text(&missing.stdout)
    );
}

#[test]
fn testrun_for_an_unknown_group_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(
        &dir.path().join("server"),
        "tcp://127.0.0.1:0",
        "tcp://127.0.0.1:0",
        &fast(),
    );
    let conductor = example_conductor();
    let argv: Vec<&str> = conductor.iter().map(String::as_str).collect();
    let _w = start_idle_worker(dir.path(), "w", "devicegroup:alpha", &server, &argv, &[]);
    let out = submit(
        &server,
        &[
            "run",
            "--device",
            "devicegroup:gamma",
            "--image",
            "x",
            "--packages",
            "a",
        ],
        RUN_LIMIT,
    );
    assert_eq!(out.status.code(), Some(65));
    let err = text(&out.stderr);
    assert!(
        err.contains("no queue for gamma") && err.contains("alpha"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one line: {err}");
}

#[test]
fn submit_against_a_server_that_is_not_running_fails_fast_as_unreachable() {
    let port = free_port();
    let mut cmd = std::process::Command::new(bin("ots-submit"));
    cmd.args([
        "status",
        "r-1",
        "--server",
        &format!("tcp://127.0.0.1:{port}"),
        "--security",
        "none",
    ]);
    let started = std::time::Instant::now();
    let out = run_bounded(cmd, Duration::from_secs(20));
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(69), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("unreachable"), "{err}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

#[test]
fn usage_errors_and_bad_configuration_are_refused_with_the_reason() {
    let mut cmd = std::process::Command::new(bin("ots-submit"));
    cmd.args(["run", "--device", "devicegroup:x"]);
    let out = run_bounded(cmd, Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(64));

    let mut cmd = std::process::Command::new(bin("ots-submit"));
    cmd.args([
        "run",
        "--device",
        "group:x",
        "--image",
        "i",
        "--packages",
        "a",
    ]);
    let out = run_bounded(cmd, Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(64));
    assert!(
        text(&out.stderr).contains("--device"),
        "{}",
        text(&out.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("server.toml");
    std::fs::write(&cfg, "liveness = 1\n").unwrap();
    let mut cmd = std::process::Command::new(bin("ots-server"));
    cmd.arg("--config")
        .arg(&cfg)
        .arg("--state-dir")
        .arg(dir.path());
    let out = run_bounded(cmd, Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(78));
    assert!(
        text(&out.stderr).contains("`liveness`"),
        "{}",
        text(&out.stderr)
    );

    let mut cmd = std::process::Command::new(bin("ots-worker"));
    cmd.args(["--name", "w", "--device", "devicegroup:a.b", "--state-dir"])
        .arg(dir.path());
    let out = run_bounded(cmd, Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(78));
    assert!(
        text(&out.stderr).contains("device"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn local_run_prints_task_and_testrun_verdicts() {
    let mut cmd = std::process::Command::new(bin("ots-submit"));
    cmd.args(["run", "--local", "--distribution", "perpackage"])
        .current_dir(repo());
    let out = run_bounded(cmd, RUN_LIMIT);
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        text(&out.stderr)
    );
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.starts_with("task ") && l.contains(" PASS — "))
            .count(),
        3,
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("testrun ") && l.ends_with(": PASS")),
        "{stdout}"
    );
}
