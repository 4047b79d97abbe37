//! Delivery semantics with real processes over loopback: final reports and
//! the log lines before them, orphans, expired dispatches, timeouts that
//! kill whole process trees, cancel, lost workers, and log floods while the
//! server is stopped — each accounted for exactly.

mod common;

use common::*;
use nix::sys::signal::Signal;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);

fn junit_line() -> &'static str {
    r#"mkdir -p "$OTS_RESULTS_DIR"; echo '<testsuite><testcase name="t"/></testsuite>' > "$OTS_RESULTS_DIR/r.xml""#
}

fn fast_server(dir: &std::path::Path, extra: &[(&str, &str)]) -> ServerProc {
    let mut env = vec![("OTS_SERVER_HEARTBEAT_INTERVAL_MS", "250")];
    env.extend_from_slice(extra);
    start_server(
        &dir.join("server"),
        "tcp://127.0.0.1:0",
        "tcp://127.0.0.1:0",
        &env,
    )
}

#[test]
fn the_last_log_line_and_the_final_report_both_arrive_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let server = fast_server(dir.path(), &[]);
    let conductor = script(
        dir.path(),
        "last.sh",
        &format!(
            "for i in $(seq 1 3000); do echo \"line $i\"; done\n{}\necho 'LAST LINE before exit'",
            junit_line()
        ),
    );
    let _w = start_idle_worker(
        dir.path(),
        "w",
        "devicegroup:g",
        &server,
        &[conductor.to_str().unwrap()],
        &[],
    );
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
            "--wait",
            "--json",
        ],
        LIMIT,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    let st: serde_json::Value =
        serde_json::from_str(text(&out.stdout).lines().last().unwrap()).unwrap();
    let t = &st["tasks"][0];
    // 3000 lines + the last one + the worker's own first line.
    assert_eq!(t["log_lines_produced"], 3002);
    assert_eq!(t["log_lines_stored"], 3002, "{t}");
    assert_eq!(t["log_gaps"].as_array().unwrap().len(), 0);
    let logs = text(&submit(&server, &["logs", st["run"].as_str().unwrap()], LIMIT).stdout);
    assert_eq!(
        logs.trim_end().lines().last(),
        Some("LAST LINE before exit")
    );
}

#[test]
fn a_report_after_the_channel_closed_is_nacked_once_and_never_resent() {
    let dir = tempfile::tempdir().unwrap();
    let server = fast_server(
        dir.path(),
        &[
            ("OTS_SERVER_LOST_GRACE_MS", "500"),
            ("OTS_SERVER_MAX_ATTEMPTS", "1"),
        ],
    );
    // The worker reaches the control socket through a proxy we can cut.
    let proxy = Proxy::start(&server.control);
    let go = dir.path().join("go");
    let conductor = script(
        dir.path(),
        "waits.sh",
        &format!(
            "echo started\nwhile [ ! -e {go:?} ]; do sleep 0.05; done\n{}",
            junit_line()
        ),
    );
    let w = start_worker_with(
        dir.path(),
        "w",
        "devicegroup:g",
        &proxy.endpoint(),
        &server.events,
        &[conductor.to_str().unwrap()],
        &[],
        "[retry]\ninitial_ms = 200\nfactor = 1.5\ncap_ms = 400\njitter = false\n",
    );
    assert!(wait_for_workers(
        &server,
        Duration::from_secs(20),
        all_idle(&["w"])
    ));
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

    // Partition: the server loses the worker, holds its task, gives up on it.
    proxy.black_hole();
    let st = wait_status(&server, &run, LIMIT, finished);
    assert_eq!(st["tasks"][0]["verdict"], "ERROR");
    assert!(
        st["tasks"][0]["reason"].as_str().unwrap().contains("lost"),
        "{st}"
    );

    // Meanwhile the conductor ends; its report waits in the cut connection.
    let mark = w.stderr.len();
    std::fs::write(&go, "").unwrap();
    assert!(w
        .stderr
        .wait_for_after(mark, "task finished; reporting", LIMIT)
        .is_some());
    proxy.resume();

    assert!(
        w.stderr
            .wait_for_after(mark, "orphan: server closed the task", LIMIT)
            .is_some(),
        "{:?}",
        w.stderr.all()
    );
    // Several resend periods later: still exactly one nack, nothing resent.
    std::thread::sleep(Duration::from_secs(2)); // observation window for resends that must not happen
    assert_eq!(
        w.stderr.count("orphan: server closed the task"),
        1,
        "{:?}",
        w.stderr.all()
    );
    // The report waited for its file; the file's offer (or the report,
    // for a worker that does not upload first) was answered once, never
    // again. Nothing, if the answer to the new hello closed it first.
    let st = current_status(&server, &run);
    let answered = st["counters"]["orphan_control"].as_u64().unwrap_or(0)
        + st["counters"]["orphan_file"].as_u64().unwrap_or(0);
    assert!(answered <= 1, "{}", st["counters"]);
    let orphans = server
        .proc
        .stderr
        .count("orphan: message for a closed or unknown task") as u64;
    // Logged at most once each (the log lines are rate-limited; the
    // counters above are exact).
    assert!(orphans <= answered, "an orphan logged more than once");
}

#[test]
fn an_expired_dispatch_is_refused_and_the_task_requeued() {
    let dir = tempfile::tempdir().unwrap();
    // Slow heartbeats and a long liveness window, so a 2.5 s pause of the
    // worker is not a loss; a 1 s dispatch ttl, so it is an expiry.
    let server = start_fresh_server(
        dir.path(),
        &[
            ("OTS_SERVER_LIVENESS", "6"),
            ("OTS_SERVER_DISPATCH_TTL_MS", "1000"),
        ],
    );
    let conductor = script(dir.path(), "ok.sh", junit_line());
    let w = start_idle_worker(
        dir.path(),
        "w",
        "devicegroup:g",
        &server,
        &[conductor.to_str().unwrap()],
        &[],
    );

    w.signal(Signal::SIGSTOP);
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
    std::thread::sleep(Duration::from_millis(2500)); // let the dispatch go stale in the stopped worker's socket
    w.signal(Signal::SIGCONT);

    let st = wait_status(&server, &run, LIMIT, finished);
    assert_eq!(st["verdict"], "PASS", "{st}");
    assert_eq!(
        st["tasks"][0]["attempts"], 1,
        "a refused dispatch is not an attempt"
    );
    assert!(w
        .stderr
        .wait_for("expired dispatch: refused to start a stale task", LIMIT)
        .is_some());
    assert!(server
        .proc
        .stderr
        .wait_for("task re-queued", LIMIT)
        .is_some());
    assert!(
        server.proc.stderr.count("refused it: dispatch was started") >= 1,
        "{:?}",
        server.proc.stderr.all()
    );
}

/// A conductor that ignores SIGTERM and leaves a grandchild that ignores it too.
fn stubborn(dir: &std::path::Path) -> std::path::PathBuf {
    script(
        dir,
        "stubborn.sh",
        "trap '' TERM\nbash -c 'trap \"\" TERM; echo $$ > \"$1\"; exec sleep 120' _ \"$1\" &\necho spawned grandchild\nsleep 120 & wait",
    )
}

#[test]
fn execution_timeout_kills_the_whole_process_tree() {
    let dir = tempfile::tempdir().unwrap();
    let server = fast_server(dir.path(), &[]);
    let conductor = stubborn(dir.path());
    let _w = start_idle_worker(
        dir.path(),
        "w",
        "devicegroup:g",
        &server,
        &[conductor.to_str().unwrap(), "{option:pidfile}"],
        &[],
    );
    let pidfile = dir.path().join("grandchild.pid");
    let opt = format!("pidfile={}", pidfile.display());
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
            "--timeout",
            "2s",
            "--option",
            &opt,
            "--wait",
        ],
        LIMIT,
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stdout));
    assert!(
        text(&out.stdout).contains("execution timeout"),
        "{}",
        text(&out.stdout)
    );
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(process_gone(pid), "grandchild {pid} survived the task");
}

#[test]
fn cancel_stops_a_running_testrun_and_its_process_tree() {
    let dir = tempfile::tempdir().unwrap();
    let server = fast_server(dir.path(), &[]);
    let conductor = stubborn(dir.path());
    let _w = start_idle_worker(
        dir.path(),
        "w",
        "devicegroup:g",
        &server,
        &[conductor.to_str().unwrap(), "{option:pidfile}"],
        &[],
    );
    let pidfile = dir.path().join("grandchild.pid");
    let opt = format!("pidfile={}", pidfile.display());
    let run = submit_run(
        &server,
        &[
            "--device",
            "devicegroup:g",
            "--image",
            "i",
            "--packages",
            "p",
            "--option",
            &opt,
        ],
    );
    // Someone is waiting on it.
    let mut waiter = std::process::Command::new(bin("ots-submit"));
    waiter
        .args(["wait", &run])
        .env("OTS_SERVER", &server.control)
        .envs(submit_envs(&server));
    let waiting = std::thread::spawn(move || run_bounded(waiter, LIMIT));
    wait_status(&server, &run, LIMIT, running);
    assert!(wait_for_file(&pidfile, LIMIT));

    let out = submit(&server, &["cancel", &run], LIMIT);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let waited = waiting.join().unwrap();
    assert_eq!(waited.status.code(), Some(3), "{}", text(&waited.stdout));
    assert!(
        text(&waited.stdout).contains("CANCELLED"),
        "{}",
        text(&waited.stdout)
    );
    let st = current_status(&server, &run);
    assert_eq!(st["state"], "cancelled");
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(process_gone(pid), "grandchild {pid} survived the cancel");
}

#[test]
fn a_task_whose_worker_is_killed_completes_on_another_worker() {
    let dir = tempfile::tempdir().unwrap();
    let server = fast_server(dir.path(), &[("OTS_SERVER_LOST_GRACE_MS", "500")]);
    let conductor = script(
        dir.path(),
        "slow.sh",
        &format!("echo working\nsleep 2\n{}", junit_line()),
    );
    let argv = [conductor.to_str().unwrap()];
    let mut w1 = start_worker(dir.path(), "w1", "devicegroup:g", &server, &argv, &[]);
    let mut w2 = start_worker(dir.path(), "w2", "devicegroup:g", &server, &argv, &[]);
    assert!(wait_for_workers(
        &server,
        Duration::from_secs(20),
        all_idle(&["w1", "w2"])
    ));
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
    let st = wait_status(&server, &run, LIMIT, running);
    let first = st["tasks"][0]["worker"].as_str().unwrap().to_string();
    let other = if first == "w1" { "w2" } else { "w1" };
    if first == "w1" {
        w1.kill()
    } else {
        w2.kill()
    }

    let st = wait_status(&server, &run, LIMIT, finished);
    let t = &st["tasks"][0];
    assert_eq!(st["verdict"], "PASS", "{st}");
    assert_eq!(t["attempts"], 2);
    assert_eq!(t["worker"], other);
    // Both attempts are in the task's recorded history.
    let dispatched: Vec<(u64, String)> = t["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["state"] == "dispatched")
        .map(|h| {
            (
                h["attempt"].as_u64().unwrap(),
                h["worker"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(dispatched, vec![(1, first.clone()), (2, other.to_string())]);
    let text_status = text(&submit(&server, &["status", &run], LIMIT).stdout);
    assert!(text_status.contains("history of"), "{text_status}");
    let logs = text(&submit(&server, &["logs", &run], LIMIT).stdout);
    assert!(
        logs.contains(&format!("---- attempt 2 on worker {other} ----")),
        "{logs}"
    );
}

#[test]
fn a_log_flood_while_the_server_is_stopped_is_stored_or_accounted_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let server = fast_server(dir.path(), &[]);
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

    let mark = w.stderr.len();
    server.proc.signal(Signal::SIGSTOP);
    assert!(
        w.stderr
            .wait_for_after(mark, "server lost", LIMIT)
            .is_some(),
        "{:?}",
        w.stderr.all()
    );
    std::fs::write(&go, "").unwrap();
    assert!(wait_for_file(&done, LIMIT), "the flood did not finish");
    // The session has taken every line once it handles the final report.
    assert!(w
        .stderr
        .wait_for_after(mark, "task finished; reporting", LIMIT)
        .is_some());
    server.proc.signal(Signal::SIGCONT);

    let st = wait_status(&server, &run, LIMIT, finished);
    let t = &st["tasks"][0];
    assert_eq!(st["verdict"], "PASS", "{st}");
    let (produced, stored, lost) = log_accounting(t);
    // 100000 flood lines + "waiting" + the worker's own first line.
    assert_eq!(produced, 100_002);
    assert_eq!(
        stored + lost,
        produced,
        "stored {stored} + lost {lost} != produced {produced}"
    );
    assert!(
        lost >= 70_000,
        "a 30000-line buffer must have dropped most of the flood (lost {lost})"
    );
    eprintln!(
        "flood: produced {produced}, stored {stored}, lost {lost} in {} ranges",
        t["log_gaps"].as_array().unwrap().len()
    );
    let text_status = text(&submit(&server, &["status", &run], LIMIT).stdout);
    assert!(
        text_status.contains(&format!("{lost} log lines lost")),
        "{text_status}"
    );
}

/// A task whose log is full costs nothing more: the server tells the
/// worker (`log_full`), the worker stops sending that task's lines and
/// only counts them, and the accounting stays exact. Without the message
/// every one of the ten million lines would reach the server and be
/// refused there (`log_lines_over_limit` ≈ lost); with it only those
/// already on their way are.
#[test]
fn a_full_task_log_is_told_to_the_worker_which_stops_sending_its_lines() {
    let dir = tempfile::tempdir().unwrap();
    let server = fast_server(
        dir.path(),
        &[("OTS_SERVER_LIMITS__MAX_TASK_LOG_BYTES", "65536")],
    );
    let conductor = script(
        dir.path(),
        "yes.sh",
        "seq 1 10000000\nprintf 'no newline at the end'\n",
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
    let st = wait_status(&server, &run, Duration::from_secs(120), finished);
    let t = &st["tasks"][0];
    let (produced, stored, lost) = log_accounting(t);
    assert_eq!(
        stored + lost,
        produced,
        "stored {stored} + lost {lost} != produced {produced}"
    );
    // Ten million lines, the one without a newline, and the worker's own
    // line before the conductor's: counted exactly although most were
    // never packed.
    assert_eq!(produced, 10_000_002, "{t:#}");
    assert!(stored > 1000 && stored < 65536 / 4, "stored {stored}");
    let told = st["counters"]["log_full_told"].as_u64().unwrap_or(0);
    let refused = st["counters"]["log_lines_over_limit"].as_u64().unwrap_or(0);
    eprintln!("log full: {stored} stored, {lost} lost, {refused} refused at the server, told {told} times");
    assert!(told >= 1, "{st:#}");
    assert!(
        refused < lost / 4,
        "the worker kept sending lines of a full log: {refused} of {lost} refused by the server"
    );
    assert!(w
        .stderr
        .wait_for("the server stores no more of this task's log", LIMIT)
        .is_some());
    assert!(w
        .stderr
        .wait_for("log lines counted, not sent", LIMIT)
        .is_some());
}
