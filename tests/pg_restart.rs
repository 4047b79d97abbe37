//! Issue 34, finding 13: PostgreSQL restarted under a loaded server (a
//! cluster of this test binary's own, so restarting it disturbs no other
//! test). A restart within the lease costs a wait; an outage longer than
//! the lease makes the server a standby in the same process, and it leads
//! again when the database is back. It never exits, nothing acknowledged
//! is lost, no task runs twice.

mod common;

use common::*;
use std::path::Path;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(60);

/// A conductor that waits for `go` next to it, then passes.
fn gated(dir: &Path) -> String {
    script(
        dir,
        "gated-pg.sh",
        &format!(
            "echo \"started $OTS_TASK_ID\"\nwhile [ ! -e {dir:?}/go ]; do [ -d {dir:?} ] || exit 3; sleep 0.05; done\n\
             echo \"released $OTS_TASK_ID\"\n\
             mkdir -p \"$OTS_RESULTS_DIR\"; echo '<testsuite><testcase name=\"t\"/></testsuite>' > \"$OTS_RESULTS_DIR/r.xml\"",
        ),
    )
    .display()
    .to_string()
}

fn runs(server: &ServerProc, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            submit_run(
                server,
                &[
                    "--device",
                    "devicegroup:pgr",
                    "--image",
                    "i",
                    "--packages",
                    "p",
                ],
            )
        })
        .collect()
}

fn all_pass(server: &ServerProc, runs: &[String]) {
    for run in runs {
        let st = wait_status(server, run, LIMIT, finished);
        assert_eq!(st["verdict"], "PASS", "{st:#}");
        for t in st["tasks"].as_array().unwrap() {
            assert_eq!(t["attempts"], 1, "ran once: {t:#}");
        }
    }
}

#[test]
fn a_database_restart_or_outage_ends_no_server() {
    let dir = tempfile::tempdir().unwrap();
    let c = pg::cluster();
    let url = c.database();
    let (control, events) = (
        format!("tcp://127.0.0.1:{}", free_port()),
        format!("tcp://127.0.0.1:{}", free_port()),
    );
    let mut server = start_server(
        &dir.path().join("server"),
        &control,
        &events,
        &[
            ("OTS_SERVER_DATABASE", url.as_str()),
            ("OTS_SERVER_LEASE_TTL", "2s"),
            ("OTS_SERVER_LEASE_RENEW", "500ms"),
            ("OTS_SERVER_HEARTBEAT_INTERVAL_MS", "250"),
        ],
    );
    let conductor = gated(dir.path());
    let _w1 = start_worker(
        dir.path(),
        "pgr-w1",
        "devicegroup:pgr",
        &server,
        &[&conductor],
        &[],
    );
    let _w2 = start_worker(
        dir.path(),
        "pgr-w2",
        "devicegroup:pgr",
        &server,
        &[&conductor],
        &[],
    );
    assert!(wait_for_workers(
        &server,
        LIMIT,
        all_idle(&["pgr-w1", "pgr-w2"])
    ));

    // 1. `pg_ctl restart -m fast` with four testruns in flight (two
    // running, two queued): a wait, then every one passes.
    let first = runs(&server, 4);
    wait_status(&server, &first[1], LIMIT, running);
    let restarted = Instant::now();
    c.restart();
    eprintln!("PostgreSQL restarted in {:?}", restarted.elapsed());
    // A submit right after: its commit waits for the connection.
    let after = runs(&server, 1);
    std::fs::write(dir.path().join("go"), b"").unwrap();
    let mut all = first.clone();
    all.extend(after);
    all_pass(&server, &all);
    assert!(
        server.proc.child.try_wait().unwrap().is_none(),
        "still running"
    );
    assert!(
        server.proc.stderr.count("PostgreSQL connection made again") >= 1,
        "{:?}",
        server.proc.stderr.all()
    );
    assert_eq!(server.proc.stderr.count("stepped down"), 0);
    // The file desk's own connection came back too: every testrun's
    // test case was recorded (their result files were stored after the
    // restart).
    for run in &all {
        let out = submit(&server, &["cases", run, "--json"], LIMIT);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let cases: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(cases.as_array().map(Vec::len), Some(1), "{run}: {cases}");
    }
    assert_eq!(
        server
            .proc
            .stderr
            .count("cannot record the result file's test cases"),
        0
    );
    // Counted at the next heartbeat.
    wait_status(&server, &all[4], LIMIT, |st| {
        st["counters"]["postgres_reconnects"].as_u64().unwrap_or(0) >= 1
    });

    // 2. Down for longer than the lease (2 s): a standby in the same
    // process, leading again when the database is back.
    std::fs::remove_file(dir.path().join("go")).unwrap();
    let second = runs(&server, 2);
    wait_status(&server, &second[1], LIMIT, running);
    let mark = server.proc.stderr.len();
    let stopped_at = Instant::now();
    c.stop();
    let stepped = server.proc.stderr.wait_for_after(
        mark,
        "stepped down: this server is a standby now",
        LIMIT,
    );
    assert!(stepped.is_some(), "{:?}", server.proc.stderr.all());
    // Clients meanwhile: refused or not answered, never a wrong answer.
    let out = submit(&server, &["workers", "--connect-timeout", "1s"], LIMIT);
    assert!(!out.status.success());
    let down_for = stopped_at.elapsed();
    c.start();
    let back = Instant::now();
    let led = server
        .proc
        .stderr
        .wait_for_after(mark, "leader: this server holds the lease", LIMIT)
        .expect("leads again");
    eprintln!(
        "database down {down_for:?}; led again {:?} after it was back: {}",
        back.elapsed(),
        led.1
    );
    assert!(
        server.proc.child.try_wait().unwrap().is_none(),
        "never exited"
    );
    assert!(wait_for_workers(&server, LIMIT, |ws| ws.len() == 2));
    std::fs::write(dir.path().join("go"), b"").unwrap();
    all_pass(&server, &second);
    all_pass(&server, &all);
    assert!(server.proc.child.try_wait().unwrap().is_none());
    server.proc.kill();
}
