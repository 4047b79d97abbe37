//! History read from the database (issue 36), with the real binaries:
//! a server that holds no ended testrun in memory (`[history]
//! cache_runs = 0`) answers `status`, `logs`, `fetch`, `runs` and the
//! dashboard about old testruns exactly as before — under the same
//! rules for who may see what — before and after a SIGKILL and restart,
//! and its counters say the testruns left memory and were read back.

mod common;

use common::*;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);

fn counter(metrics: &str, name: &str) -> u64 {
    let page = http::get(&format!("http://{metrics}"), "/metrics", None).text();
    page.lines()
        .filter(|l| l.starts_with("ots_events_total") && l.contains(&format!("event=\"{name}\"")))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[test]
fn old_testruns_answer_from_the_database_as_they_did_from_memory() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = format!("127.0.0.1:{}", free_port());
    let env = [
        ("OTS_SERVER_HISTORY__CACHE_RUNS", "0"),
        ("OTS_SERVER_METRICS", metrics.as_str()),
        ("OTS_SERVER_WEB", "127.0.0.1:0"),
    ];
    let mut server = start_server(
        &dir.path().join("server"),
        "tcp://127.0.0.1:0",
        "tcp://127.0.0.1:0",
        &env,
    );
    let conductor = script(
        dir.path(),
        "c.sh",
        "echo \"checked package $1\"\nmkdir -p \"$OTS_RESULTS_DIR\"\n\
         echo '<testsuite><testcase name=\"t\"/></testsuite>' > \"$OTS_RESULTS_DIR/r.xml\"\n",
    );
    let _w = start_worker(
        dir.path(),
        "h1",
        "devicegroup:hist",
        &server,
        &[conductor.to_str().unwrap(), "{packages}"],
        &[],
    );
    assert!(wait_for_workers(&server, LIMIT, all_idle(&["h1"])));
    let runs: Vec<String> = ["alpha", "beta", "gamma"]
        .iter()
        .map(|p| {
            let run = submit_run(
                &server,
                &[
                    "--device",
                    "devicegroup:hist",
                    "--image",
                    "i",
                    "--packages",
                    p,
                ],
            );
            wait_status(&server, &run, LIMIT, finished);
            run
        })
        .collect();
    // Another user's testrun, for the rules.
    wait_allowed(&server, "bob");
    let bob = server.as_user("bob");
    let out = bob.submit(
        &[
            "run",
            "--device",
            "devicegroup:hist",
            "--image",
            "i",
            "--packages",
            "bobs",
            "--wait",
        ],
        LIMIT,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));

    let check = |server: &ServerProc, tag: &str| {
        let first = &runs[0];
        let st = status_json(server, first).unwrap_or_else(|| panic!("{tag}: no status"));
        assert_eq!(st["state"], "finished", "{tag}: {st}");
        assert_eq!(st["verdict"], "PASS", "{tag}: {st}");
        let logs = text(&submit(server, &["logs", first], LIMIT).stdout);
        assert!(logs.contains("checked package alpha"), "{tag}: {logs}");
        let to = dir.path().join(format!("fetched-{tag}"));
        let o = submit(server, &["fetch", first, to.to_str().unwrap()], LIMIT);
        assert!(o.status.success(), "{tag}: {}", text(&o.stderr));
        let listed = text(&submit(server, &["runs", "--json"], LIMIT).stdout);
        for r in &runs {
            assert!(
                listed.contains(&format!("\"{r}\"")),
                "{tag}: {r} not in {listed}"
            );
        }
        // A submit user still sees only its own testruns.
        let o = server.as_user("bob").submit(&["status", first], LIMIT);
        assert!(!o.status.success(), "{tag}: bob read tester's testrun");
        assert!(
            text(&o.stderr).contains("only its own testruns"),
            "{tag}: {}",
            text(&o.stderr)
        );
        let mine = text(
            &server
                .as_user("bob")
                .submit(&["runs", "--json"], LIMIT)
                .stdout,
        );
        assert!(!mine.contains(&format!("\"{first}\"")), "{tag}: {mine}");
    };
    check(&server, "serving");
    assert!(
        counter(&metrics, "runs_evicted") >= 3,
        "ended testruns left memory"
    );
    assert!(
        counter(&metrics, "runs_recalled") >= 1,
        "and were read back"
    );

    // After a SIGKILL the new server loads only what is alive.
    server.proc.kill();
    let server = start_server(
        &dir.path().join("server"),
        "tcp://127.0.0.1:0",
        "tcp://127.0.0.1:0",
        &env,
    );
    let restored = server
        .proc
        .stderr
        .wait_for("state restored", LIMIT)
        .expect("restored");
    assert!(restored.contains("runs=0"), "{restored}");
    check(&server, "restarted");
}
