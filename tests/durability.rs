//! Crashes for real: the server or a worker is SIGKILLed at the awkward
//! moments and restarted on the same state directory. Nobody re-submits
//! anything; every testrun ends with the right verdict; nothing is lost or
//! applied twice.

mod common;

use common::*;
use nix::sys::signal::Signal;
use std::path::Path;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);
const FAST: [(&str, &str); 1] = [("OTS_SERVER_HEARTBEAT_INTERVAL_MS", "250")];

fn junit(name: &str) -> String {
    format!(
        r#"mkdir -p "$OTS_RESULTS_DIR"; echo '<testsuite><testcase name="{name}"/></testsuite>' > "$OTS_RESULTS_DIR/r.xml""#
    )
}

/// Where the servers of a test keep their state: the embedded SQLite, or
/// a fresh database of the test binary's PostgreSQL cluster. Every test
/// here runs on both (the `sqlite::` and `postgres::` modules below).
#[derive(Clone)]
struct Backend(Option<String>);

impl Backend {
    fn sqlite() -> Backend {
        Backend(None)
    }

    fn postgres() -> Backend {
        Backend(Some(pg::cluster().database()))
    }

    /// `env` and, on PostgreSQL, `OTS_SERVER_DATABASE`.
    fn env<'a>(&'a self, env: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        let mut all = env.to_vec();
        if let Some(url) = &self.0 {
            all.push(("OTS_SERVER_DATABASE", url));
        }
        all
    }
}

/// Kills the server and starts a new one on the same ports and state.
fn restart(server: &mut ServerProc, backend: &Backend) -> ServerProc {
    let (control, events, state) = (
        server.control.clone(),
        server.events.clone(),
        server.state_dir.clone(),
    );
    server.proc.kill();
    start_server(&state, &control, &events, &backend.env(&FAST))
}

/// `ots-submit wait RUN` in the background, once it follows the testrun
/// (it printed the first progress event).
fn waiter(server: &ServerProc, run: &str) -> Proc {
    let mut cmd = std::process::Command::new(bin("ots-submit"));
    cmd.args(["wait", run])
        .env("OTS_SERVER", &server.control)
        .envs(submit_envs(server));
    let p = Proc::spawn("waiter", cmd);
    assert!(
        p.stdout.wait_for(" queued", LIMIT).is_some(),
        "the waiter never followed: {:?}",
        p.stderr.all()
    );
    p
}

fn one_task(st: &serde_json::Value) -> &serde_json::Value {
    assert_eq!(st["tasks"].as_array().unwrap().len(), 1);
    &st["tasks"][0]
}

fn server_killed_with_tasks_queued_keeps_them_and_a_waiting_client_sees_it_through(
    backend: Backend,
) {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start_fresh_server(dir.path(), &backend.env(&FAST));
    let run = submit_run(
        &server,
        &[
            "--device",
            "devicegroup:later",
            "--image",
            "i",
            "--packages",
            "a,b",
            "--distribution",
            "perpackage",
            "--queue-anyway",
        ],
    );
    let mut waiting = waiter(&server, &run);
    wait_status(&server, &run, LIMIT, |st| st["state"] == "queued");

    let server2 = restart(&mut server, &backend);
    let st = status_json(&server2, &run).expect("the testrun survived the crash");
    assert!(
        st["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["state"] == "queued"),
        "{st}"
    );
    let conductor = script(dir.path(), "ok.sh", &junit("t"));
    let _w = start_worker(
        dir.path(),
        "w",
        "devicegroup:later",
        &server2,
        &[conductor.to_str().unwrap()],
        &[],
    );

    assert_eq!(
        waiting.wait_exit(LIMIT),
        Some(0),
        "{:?}\n{:?}",
        waiting.stdout.all(),
        waiting.stderr.all()
    );
    assert_eq!(
        waiting.stderr.count("the server went away"),
        1,
        "{:?}",
        waiting.stderr.all()
    );
    assert!(
        waiting
            .stdout
            .all()
            .iter()
            .any(|l| l == &format!("testrun {run}: PASS")),
        "{:?}",
        waiting.stdout.all()
    );
}

fn server_killed_while_a_task_runs_gets_its_result_when_the_worker_is_back(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start_fresh_server(dir.path(), &backend.env(&FAST));
    let conductor = script(
        dir.path(),
        "slow.sh",
        &format!("echo start\nsleep 2\necho end\n{}", junit("t")),
    );
    let _w = start_idle_worker(
        dir.path(),
        "w",
        "devicegroup:g",
        &server,
        &[conductor.to_str().unwrap()],
        &[],
    );
    let out = std::thread::scope(|scope| {
        let run_cmd = {
            let mut c = std::process::Command::new(bin("ots-submit"));
            c.args([
                "run",
                "--device",
                "devicegroup:g",
                "--image",
                "i",
                "--packages",
                "p",
                "--wait",
                "--json",
            ])
            .env("OTS_SERVER", &server.control)
            .envs(submit_envs(&server));
            c
        };
        let waiting = scope.spawn(move || run_bounded(run_cmd, LIMIT));
        // Find the run once it runs, then crash the server under it.
        let deadline = std::time::Instant::now() + LIMIT;
        let run = loop {
            assert!(std::time::Instant::now() < deadline, "no running task");
            if let Some(st) = status_json(&server, "r1") {
                if running(&st) {
                    break "r1".to_string();
                }
            }
            std::thread::sleep(Duration::from_millis(50)); // polling interval
        };
        let server2 = restart(&mut server, &backend);
        let out = waiting.join().unwrap();
        (out, run, server2)
    });
    let (out, run, server2) = out;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let st = current_status(&server2, &run);
    let t = one_task(&st);
    assert_eq!(
        (t["verdict"].as_str(), t["attempts"].as_u64()),
        (Some("PASS"), Some(1)),
        "{st}"
    );
    assert_eq!(t["files"].as_array().unwrap().len(), 1);
}

fn server_killed_after_the_report_was_sent_but_before_it_was_acked(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start_fresh_server(dir.path(), &backend.env(&FAST));
    let go = dir.path().join("go");
    let conductor = script(
        dir.path(),
        "gated.sh",
        &format!("while [ ! -e {go:?} ]; do sleep 0.02; done\n{}", junit("t")),
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

    // The report goes out to a server that will never answer it.
    let mark = w.stderr.len();
    server.proc.signal(Signal::SIGSTOP);
    std::fs::write(&go, "").unwrap();
    assert!(w
        .stderr
        .wait_for_after(mark, "task finished; reporting", LIMIT)
        .is_some());
    let server2 = restart(&mut server, &backend);

    let st = wait_status(&server2, &run, LIMIT, finished);
    let t = one_task(&st);
    assert_eq!(
        (t["verdict"].as_str(), t["attempts"].as_u64()),
        (Some("PASS"), Some(1)),
        "{st}"
    );
    assert_eq!(
        t["files"].as_array().unwrap().len(),
        1,
        "the result file once: {t}"
    );
    let fetched = dir.path().join("fetched");
    let out = submit(&server2, &["fetch", &run, fetched.to_str().unwrap()], LIMIT);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let task = t["task"].as_str().unwrap();
    assert!(std::fs::read_to_string(fetched.join(task).join("r.xml"))
        .unwrap()
        .contains("testcase"));
}

fn worker_killed_before_its_report_was_acked_delivers_it_once_after_restart(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let server = start_fresh_server(dir.path(), &backend.env(&FAST));
    let go = dir.path().join("go");
    let conductor = script(
        dir.path(),
        "gated.sh",
        &format!("echo waiting\nwhile [ ! -e {go:?} ]; do sleep 0.02; done\nhead -c 600000 /dev/urandom > \"$OTS_RESULTS_DIR/blob.bin\"\n{}", junit("t")),
    );
    let argv = [conductor.to_str().unwrap()];
    let mut w = start_idle_worker(dir.path(), "w", "devicegroup:g", &server, &argv, &[]);
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

    // No acks while the server is stopped; the worker dies with its report pending.
    let mark = w.stderr.len();
    server.proc.signal(Signal::SIGSTOP);
    std::fs::write(&go, "").unwrap();
    assert!(w
        .stderr
        .wait_for_after(mark, "final report saved", LIMIT)
        .is_some());
    w.kill();
    let blob = std::fs::read(
        Path::new(&dir.path().join("w/tasks"))
            .read_dir()
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path()
            .join("results/blob.bin"),
    )
    .unwrap();
    server.proc.signal(Signal::SIGCONT);

    let w2 = start_worker(dir.path(), "w", "devicegroup:g", &server, &argv, &[]);
    assert!(
        w2.stderr
            .wait_for("continuing the saved session", LIMIT)
            .is_some(),
        "{:?}",
        w2.stderr.all()
    );
    let st = wait_status(&server, &run, LIMIT, finished);
    let t = one_task(&st);
    assert_eq!(
        (t["verdict"].as_str(), t["attempts"].as_u64()),
        (Some("PASS"), Some(1)),
        "{st}"
    );
    let files = t["files"].as_array().unwrap();
    assert_eq!(files.len(), 2, "{t}");
    let fetched = dir.path().join("fetched");
    assert!(
        submit(&server, &["fetch", &run, fetched.to_str().unwrap()], LIMIT)
            .status
            .success()
    );
    let task = t["task"].as_str().unwrap();
    assert_eq!(
        std::fs::read(fetched.join(task).join("blob.bin")).unwrap(),
        blob,
        "file arrived intact, once"
    );
}

fn worker_killed_mid_task_reports_it_interrupted_and_it_runs_again(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let server = start_fresh_server(
        dir.path(),
        &backend.env(&[
            ("OTS_SERVER_HEARTBEAT_INTERVAL_MS", "250"),
            ("OTS_SERVER_LOST_GRACE_MS", "30000"),
        ]),
    );
    let marker = dir.path().join("runs");
    let conductor = script(
        dir.path(),
        "once_slow.sh",
        &format!(
            "echo run >> {marker:?}\nif [ $(wc -l < {marker:?}) -lt 2 ]; then sleep 120; fi\n{}",
            junit("t")
        ),
    );
    let argv = [conductor.to_str().unwrap()];
    let mut w = start_idle_worker(dir.path(), "w", "devicegroup:g", &server, &argv, &[]);
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
    w.kill();
    let w2 = start_worker(dir.path(), "w", "devicegroup:g", &server, &argv, &[]);
    assert!(
        w2.stderr
            .wait_for("reporting it as interrupted", LIMIT)
            .is_some(),
        "{:?}",
        w2.stderr.all()
    );
    let st = wait_status(&server, &run, LIMIT, finished);
    let t = one_task(&st);
    assert_eq!(
        (t["verdict"].as_str(), t["attempts"].as_u64()),
        (Some("PASS"), Some(2)),
        "{st}"
    );
    assert!(
        w2.stderr
            .count("killed the conductor the previous worker process left running")
            == 1,
        "{:?}",
        w2.stderr.all()
    );
}

fn log_flood_across_a_server_crash_is_stored_or_accounted_exactly(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start_fresh_server(dir.path(), &backend.env(&FAST));
    let (conductor, go, done) = flood_conductor(dir.path());
    let w = start_idle_worker(
        dir.path(),
        "w",
        "devicegroup:g",
        &server,
        &[conductor.to_str().unwrap()],
        &[("OTS_WORKER_LOG_BUFFER_LINES", "30000")],
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

    // The flood starts while the server is up and goes on across its crash.
    let mark = w.stderr.len();
    std::fs::write(&go, "").unwrap();
    server.proc.kill();
    assert!(wait_for_file(&done, LIMIT));
    assert!(w
        .stderr
        .wait_for_after(mark, "task finished; reporting", LIMIT)
        .is_some());
    let server2 = restart(&mut server, &backend);

    let st = wait_status(&server2, &run, LIMIT, finished);
    let t = one_task(&st);
    assert_eq!(t["verdict"], "PASS", "{st}");
    let (produced, stored, lost) = log_accounting(t);
    assert_eq!(produced, 100_002);
    assert_eq!(
        stored + lost,
        produced,
        "stored {stored} + lost {lost} != produced {produced}"
    );
    eprintln!("flood across a crash: produced {produced}, stored {stored}, lost {lost}");
}

#[test]
fn corrupt_foreign_or_locked_state_is_a_clear_startup_error() {
    let dir = tempfile::tempdir().unwrap();
    let start = |state: &Path| {
        let mut cmd = std::process::Command::new(bin("ots-server"));
        cmd.args([
            "--control",
            "tcp://127.0.0.1:0",
            "--events",
            "tcp://127.0.0.1:0",
            "--state-dir",
        ])
        .arg(state)
        .envs(keys().server_env());
        run_bounded(cmd, Duration::from_secs(20))
    };
    let garbage = dir.path().join("garbage");
    std::fs::create_dir_all(&garbage).unwrap();
    std::fs::write(garbage.join("ots.db"), vec![7u8; 4096]).unwrap();
    let out = start(&garbage);
    assert_eq!(out.status.code(), Some(69));
    let err = text(&out.stderr);
    assert!(
        err.contains("is not an ots state database (not a SQLite database)"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    let running = start_server(
        &dir.path().join("busy"),
        "tcp://127.0.0.1:0",
        "tcp://127.0.0.1:0",
        &[],
    );
    let out = start(&running.state_dir);
    assert_eq!(out.status.code(), Some(69));
    assert!(
        text(&out.stderr).contains("is in use by another ots-server (pid"),
        "{}",
        text(&out.stderr)
    );
}

/// Each scenario above, once on each backend (`sqlite::NAME`,
/// `postgres::NAME`).
macro_rules! on_backend {
    ($module:ident: $($scenario:ident,)*) => {
        mod $module {
            $(
                #[test]
                fn $scenario() {
                    super::$scenario(super::Backend::$module());
                }
            )*
        }
    };
}
macro_rules! on_both {
    ($($scenario:ident,)*) => {
        on_backend!(sqlite: $($scenario,)*);
        on_backend!(postgres: $($scenario,)*);
    };
}
on_both!(
    server_killed_with_tasks_queued_keeps_them_and_a_waiting_client_sees_it_through,
    server_killed_while_a_task_runs_gets_its_result_when_the_worker_is_back,
    server_killed_after_the_report_was_sent_but_before_it_was_acked,
    worker_killed_before_its_report_was_acked_delivers_it_once_after_restart,
    worker_killed_mid_task_reports_it_interrupted_and_it_runs_again,
    log_flood_across_a_server_crash_is_stored_or_accounted_exactly,
);
