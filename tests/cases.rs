//! Test cases as data (issue 37), with the real binaries and a real test
//! tool: pytest runs a generated suite (parametrized, skipped, xfailed,
//! failing and erroring cases) as the conductor; the server records every
//! case from its JUnit file, `status` names the failing ones with their
//! messages, and `cases` lists them all from the database.

mod common;

use common::*;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);

const SUITE: &str = r#"import pytest


@pytest.mark.parametrize("n", [1, 2, 3])
def test_param(n):
    assert n < 3, f"n was {n}"


@pytest.mark.skip(reason="not on this board")
def test_skipped():
    pass


@pytest.mark.xfail(reason="known bug")
def test_xfail():
    assert False


def test_ok():
    pass


@pytest.fixture
def broken():
    raise RuntimeError("fixture broke")


def test_needs_fixture(broken):
    pass
"#;

#[test]
fn pytest_cases_are_recorded_named_and_listed() {
    let dir = tempfile::tempdir().unwrap();
    let suite = dir.path().join("suite");
    std::fs::create_dir_all(&suite).unwrap();
    std::fs::write(suite.join("test_board.py"), SUITE).unwrap();
    let conductor = script(
        dir.path(),
        "pytest.sh",
        &format!(
            "mkdir -p \"$OTS_RESULTS_DIR\"\n\
             cd {}\n\
             exec /usr/bin/python3 -m pytest -q -p no:cacheprovider --junitxml=\"$OTS_RESULTS_DIR/junit.xml\" test_board.py\n",
            suite.display()
        ),
    );
    let server = start_fresh_server(
        dir.path(),
        &[
            ("OTS_SERVER_HISTORY__CACHE_RUNS", "0"),
            ("OTS_SERVER_WEB", "127.0.0.1:0"),
        ],
    );
    let _w = start_worker(
        dir.path(),
        "py1",
        "devicegroup:py",
        &server,
        &[conductor.to_str().unwrap()],
        &[],
    );
    assert!(wait_for_workers(&server, LIMIT, all_idle(&["py1"])));
    let run = submit_run(
        &server,
        &[
            "--device",
            "devicegroup:py",
            "--image",
            "i",
            "--packages",
            "suite",
        ],
    );
    let st = wait_status(&server, &run, LIMIT, finished);
    assert_eq!(st["verdict"], "FAIL", "{st}");
    let cases = &st["tasks"][0]["cases"];
    assert_eq!(
        (
            cases["cases"].as_u64(),
            cases["failures"].as_u64(),
            cases["errors"].as_u64(),
            cases["skipped"].as_u64()
        ),
        (Some(7), Some(1), Some(1), Some(2)),
        "{st}"
    );

    // `status` names the failing cases with their messages.
    let out = submit(&server, &["status", &run], LIMIT);
    let text_out = text(&out.stdout);
    assert!(
        text_out.contains("fail: test_board::test_param[3] — AssertionError: n was 3"),
        "{text_out}"
    );
    assert!(
        text_out.contains("error: test_board::test_needs_fixture"),
        "{text_out}"
    );

    // `cases` lists every case from the database (the testrun left memory).
    let out = submit(&server, &["cases", &run, "--json"], LIMIT);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let got: Vec<(String, String)> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                c["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want = [
        ("test_board::test_param[1]", "pass"),
        ("test_board::test_param[2]", "pass"),
        ("test_board::test_param[3]", "fail"),
        ("test_board::test_skipped", "skip"),
        ("test_board::test_xfail", "skip"),
        ("test_board::test_ok", "pass"),
        ("test_board::test_needs_fixture", "error"),
    ];
    assert_eq!(
        got,
        want.iter()
            .map(|(n, s)| (n.to_string(), s.to_string()))
            .collect::<Vec<_>>()
    );
    assert!(all[0]["duration_ms"].is_u64(), "{all}");
    // A failing case says where the task's log shows it.
    let param3 = all
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "test_board::test_param[3]")
        .unwrap();
    let offset = param3["log_offset"]
        .as_u64()
        .unwrap_or_else(|| panic!("{param3}")) as usize;
    let logs: serde_json::Value =
        serde_json::from_slice(&submit(&server, &["logs", &run, "--json"], LIMIT).stdout).unwrap();
    let log = logs[format!("{run}.1")].as_str().unwrap();
    let line = log.get(offset..).unwrap_or("").lines().next().unwrap_or("");
    assert!(line.contains("test_param[3]"), "{line}");
    assert!(
        all[0]["log_offset"].is_null(),
        "a passing case has none: {all}"
    );
    let out = submit(&server, &["cases", &run, "--failed"], LIMIT);
    let failing = text(&out.stdout);
    assert_eq!(failing.lines().count(), 2, "{failing}");
    assert!(failing.contains("fixture broke"), "{failing}");

    // The run page names them too.
    let line = server
        .proc
        .stderr
        .wait_for("web dashboard listening", LIMIT)
        .unwrap();
    let base = field(&line, "url");
    let out = submit(&server, &["web"], LIMIT);
    let cookie = http::sign_in(text(&out.stdout).lines().last().unwrap().trim());
    let page = http::get(&base, &format!("/runs/{run}"), Some(&cookie));
    assert_eq!(page.status, 200);
    let html = page.text();
    assert!(html.contains("test_board::test_param[3]"), "{html}");
    assert!(html.contains("AssertionError: n was 3"), "{html}");

    // Someone else's testrun: the owner's rule, as for status.
    wait_allowed(&server, "eve");
    let o = server.as_user("eve").submit(&["cases", &run], LIMIT);
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("only its own testruns"),
        "{}",
        text(&o.stderr)
    );
}
