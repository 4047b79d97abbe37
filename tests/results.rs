//! Results that answer questions (issue 37), with the real binaries, a
//! real test tool and three workers of one device group: pytest runs a
//! suite whose cases fail on purpose — one flaky on one image, one only
//! on worker w3, one from image img2 on, one with a known issue — and
//! `compare`, `history`, `flaky`, the webhook and the worker's health say
//! what each failure is.

mod common;

use common::*;
use serde_json::Value;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Output};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(120);

const SUITE: &str = r#"import os

RUN = int(os.environ["RUN_N"])
IMAGE = os.environ["IMAGE"]
WORKER = os.environ["DEVICE_ID"]


def test_stable():
    pass


def test_net():
    assert WORKER != "w3", "no link on eth0"


def test_flaky():
    assert RUN != 2, "race in setup"


def test_feature():
    assert IMAGE != "img2", "feature broke"


def test_dhcp():
    assert IMAGE != "img2", "timeout waiting for dhcp lease"
"#;

/// Webhook bodies received, by path.
type Received = Mutex<HashMap<String, Vec<Value>>>;

#[derive(Clone, Default)]
struct Hooks(Arc<(Received, Condvar)>);

impl Hooks {
    fn start() -> (Hooks, u16) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let hooks = Hooks::default();
        let me = hooks.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let me = me.clone();
                std::thread::spawn(move || me.serve(conn));
            }
        });
        (hooks, port)
    }

    fn serve(&self, conn: TcpStream) {
        conn.set_read_timeout(Some(Duration::from_secs(30))).ok();
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        let mut line = String::new();
        if reader.read_line(&mut line).is_err() {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
        let mut length = 0usize;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let mut conn = conn;
        let _ =
            conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        if let Ok(v) = serde_json::from_slice::<Value>(&body) {
            let (lock, cv) = &*self.0;
            lock.lock().unwrap().entry(path).or_default().push(v);
            cv.notify_all();
        }
    }

    /// The bodies at `path` once `ok` holds (panics past the limit).
    fn wait(&self, path: &str, ok: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let (lock, cv) = &*self.0;
        let deadline = Instant::now() + LIMIT;
        let mut got = lock.lock().unwrap();
        loop {
            let now_list = got.get(path).cloned().unwrap_or_default();
            if ok(&now_list) {
                return now_list;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "webhooks at {path}: {now_list:?}");
            got = cv.wait_timeout(got, left).unwrap().0;
        }
    }
}

fn run_of(v: &Value) -> &str {
    v["run"].as_str().unwrap_or("")
}

fn names(list: &Value) -> Vec<&str> {
    list.as_array()
        .map(|l| l.iter().filter_map(|c| c["name"].as_str()).collect())
        .unwrap_or_default()
}

/// `ots-submit` as an admin (known-issue rules need role operator).
fn as_admin(server: &ServerProc, args: &[&str]) -> Output {
    let mut cmd = Command::new(bin("ots-submit"));
    cmd.args(args)
        .env("OTS_SERVER", &server.control)
        .envs(submit_envs(server));
    run_bounded(cmd, LIMIT)
}

fn json_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {} / {}", text(&out.stdout), text(&out.stderr)))
}

#[test]
fn regressions_flakes_device_failures_and_known_issues_are_told_apart() {
    let dir = tempfile::tempdir().unwrap();
    let suite = dir.path().join("suite");
    std::fs::create_dir_all(&suite).unwrap();
    std::fs::write(suite.join("test_board.py"), SUITE).unwrap();
    // The testruns run one after the other: a counter numbers them.
    let conductor = script(
        dir.path(),
        "pytest.sh",
        &format!(
            "mkdir -p \"$OTS_RESULTS_DIR\"\n\
             cd {}\n\
             n=$(( $(cat counter 2>/dev/null || echo 0) + 1 )); echo $n > counter\n\
             RUN_N=$n IMAGE=\"$1\" DEVICE_ID=\"$2\" exec /usr/bin/python3 -m pytest -q -p no:cacheprovider --junitxml=\"$OTS_RESULTS_DIR/junit.xml\" test_board.py\n",
            suite.display()
        ),
    );
    let (hooks, port) = Hooks::start();
    let secret = dir.path().join("hook.secret");
    std::fs::write(&secret, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
    let toml = format!(
        "web = \"127.0.0.1:0\"\n[results]\nusage_flush = \"1s\"\n[notify]\n\
         [[notify.webhook]]\nname = \"all\"\nurl = \"http://127.0.0.1:{port}/all\"\nsecret_file = \"{s}\"\nevents = [\"testrun_finished\"]\n\
         [[notify.webhook]]\nname = \"regressions\"\nurl = \"http://127.0.0.1:{port}/regressions\"\nsecret_file = \"{s}\"\nonly_regressions = true\n",
        s = secret.display()
    );
    let server = start_configured_server(dir.path(), &toml, &[]);
    let argv = [conductor.to_str().unwrap(), "{image}", "{device_id}"];
    let _workers: Vec<Proc> = ["w1", "w2", "w3"]
        .iter()
        .map(|w| {
            start_worker(
                dir.path(),
                w,
                &format!("devicegroup:lab devicename:board deviceid:{w}"),
                &server,
                &argv,
                &[],
            )
        })
        .collect();
    assert!(wait_for_workers(
        &server,
        LIMIT,
        all_idle(&["w1", "w2", "w3"])
    ));
    let run = |image: &str, worker: &str| {
        let device = format!("devicegroup:lab devicename:board deviceid:{worker}");
        let id = submit_run(
            &server,
            &[
                "--device",
                &device,
                "--image",
                image,
                "--packages",
                "suite",
                "--series",
                "nightly",
            ],
        );
        let st = wait_status(&server, &id, LIMIT, finished);
        assert_eq!(st["series"], "nightly", "{st}");
        id
    };
    let compare = |args: &[&str]| {
        let mut all = vec!["compare", "--json"];
        all.extend_from_slice(args);
        let out = submit(&server, &all, LIMIT);
        (json_of(&out), out.status.code())
    };

    // r1: everything passes; nothing to compare with.
    let r1 = run("img1", "w1");
    let (c, code) = compare(&[&r1]);
    assert_eq!(code, Some(0), "{c}");
    assert!(
        c["note"]
            .as_str()
            .unwrap()
            .contains("no earlier finished testrun"),
        "{c}"
    );

    // r2: test_flaky fails on the image it passed on: flaky, not a regression.
    let r2 = run("img1", "w2");
    let (c, code) = compare(&[&r2]);
    assert_eq!(c["base"], r1.as_str(), "{c}");
    assert_eq!(names(&c["flaky"]), ["test_board::test_flaky"], "{c}");
    assert!(names(&c["regressions"]).is_empty(), "{c}");
    assert_eq!(code, Some(0));

    // r3, r4: test_net fails twice on w3 after passing on w1 and w2:
    // device-specific, and evidence against w3's health.
    let r3 = run("img1", "w3");
    let (c, _) = compare(&[&r3]);
    assert_eq!(names(&c["fixed"]), ["test_board::test_flaky"], "{c}");
    let r4 = run("img1", "w3");
    let (c, _) = compare(&[&r4]);
    assert_eq!(
        names(&c["device_specific"]),
        ["test_board::test_net"],
        "{c}"
    );
    assert_eq!(c["device_specific"][0]["worker"], "w3", "{c}");
    assert!(names(&c["regressions"]).is_empty(), "{c}");
    let health = as_admin(&server, &["health", "w3"]);
    assert!(
        text(&health.stdout).contains("failed only on this worker"),
        "{}",
        text(&health.stdout)
    );

    // A known issue, added by an operator at run time; a user may not.
    wait_allowed(&server, "eve");
    let out = server.as_user("eve").submit(
        &[
            "known",
            "add",
            "--match",
            "waiting for dhcp",
            "--label",
            "BUG-123",
        ],
        LIMIT,
    );
    assert!(
        !out.status.success() && text(&out.stderr).contains("operator"),
        "{}",
        text(&out.stderr)
    );
    let out = as_admin(
        &server,
        &[
            "known",
            "add",
            "--match",
            "timeout waiting for dhcp",
            "--on",
            "message",
            "--label",
            "BUG-123",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = as_admin(&server, &["known", "add", "--match", "(", "--label", "X"]);
    assert!(
        !out.status.success(),
        "a pattern that does not compile is refused"
    );

    // r5 on a new image: test_feature is a regression (last passed in
    // r4); test_dhcp is the known issue; compare exits 1.
    let r5 = run("img2", "w1");
    let (c, code) = compare(&[&r5]);
    assert_eq!(code, Some(1), "{c}");
    assert_eq!(
        names(&c["regressions"]),
        ["test_board::test_feature"],
        "{c}"
    );
    assert_eq!(c["regressions"][0]["last_passed"], r4.as_str(), "{c}");
    assert_eq!(names(&c["known"]), ["test_board::test_dhcp"], "{c}");
    assert_eq!(c["known"][0]["known"], "BUG-123", "{c}");
    // Against a base chosen: r1.
    let (c, _) = compare(&[&r1, &r5]);
    assert_eq!(c["base"], r1.as_str(), "{c}");
    assert_eq!(
        names(&c["regressions"]),
        ["test_board::test_feature"],
        "{c}"
    );

    // The webhook that wants regressions only gets r5's, with the case.
    let got = hooks.wait("/regressions", |h| !h.is_empty());
    assert_eq!(run_of(&got[0]), r5, "{got:?}");
    assert_eq!(names(&got[0]["regressions"]), ["test_board::test_feature"]);
    let all = hooks.wait("/all", |h| h.iter().any(|v| run_of(v) == r5));
    assert_eq!(all.len(), 5, "{all:?}");
    let r2_hook = all.iter().find(|v| run_of(v) == r2).unwrap();
    assert_eq!(names(&r2_hook["flaky"]), ["test_board::test_flaky"]);
    assert_eq!(r2_hook["triage"]["regressions"], 0);
    assert_eq!(
        hooks.wait("/regressions", |h| !h.is_empty()).len(),
        1,
        "only r5 had regressions"
    );

    // History: the case's status per testrun, when it last passed and
    // first failed.
    let out = submit(
        &server,
        &[
            "history",
            "test_board::test_feature",
            "--series",
            "nightly",
            "--json",
        ],
        LIMIT,
    );
    let h = json_of(&out);
    let runs: Vec<(&str, &str)> = h["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["run"].as_str().unwrap(), r["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        runs,
        [
            (r5.as_str(), "fail"),
            (r4.as_str(), "pass"),
            (r3.as_str(), "pass"),
            (r2.as_str(), "pass"),
            (r1.as_str(), "pass")
        ]
    );
    assert_eq!(
        (h["last_passed"].as_str(), h["first_failed"].as_str()),
        (Some(r4.as_str()), Some(r5.as_str()))
    );
    assert_eq!(h["runs"][0]["worker"], "w1");
    assert_eq!(h["runs"][0]["image"], "img2");
    let out = submit(&server, &["history", "test_board::test_feature"], LIMIT);
    assert!(
        text(&out.stdout).contains("feature broke"),
        "{}",
        text(&out.stdout)
    );

    // `flaky` lists the flaky case with its evidence.
    let out = submit(&server, &["flaky", "--group", "lab", "--json"], LIMIT);
    let f = json_of(&out);
    let flaky = f
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "test_board::test_flaky")
        .unwrap_or_else(|| panic!("{f}"));
    assert_eq!(flaky["failed_in"][0], r2.as_str(), "{f}");
    assert_eq!(flaky["image"], "img1", "{f}");

    // The usage report: the workers' busy time and task attempts, the
    // owner's device time (the hours are written every second here).
    let deadline = Instant::now() + LIMIT;
    let report = loop {
        let r = json_of(&as_admin(&server, &["report", "--since", "1h", "--json"]));
        let busy = |w: &str| {
            r["devices"]
                .as_array()
                .unwrap()
                .iter()
                .find(|d| d["name"] == w)
                .map_or(0, |d| d["tasks"].as_u64().unwrap_or(0))
        };
        if busy("w1") >= 2
            && busy("w3") >= 2
            && r["owners"].as_array().is_some_and(|o| !o.is_empty())
        {
            break r;
        }
        assert!(Instant::now() < deadline, "{r}");
        std::thread::sleep(Duration::from_millis(200)); // polling interval, bounded by the deadline
    };
    assert_eq!(report["groups"][0]["name"], "lab", "{report}");
    assert!(
        report["groups"][0]["passed"].as_u64().unwrap()
            + report["groups"][0]["failed"].as_u64().unwrap()
            >= 5,
        "{report}"
    );
    let out = as_admin(&server, &["report", "--since", "1h"]);
    assert!(
        text(&out.stdout).contains("group lab: busy"),
        "{}",
        text(&out.stdout)
    );

    pictures(&server, &r1);
}

/// The pictures render in headless Chromium, at desktop and phone
/// sizes (screenshots under target/web-screenshots/).
fn pictures(server: &ServerProc, r1: &str) {
    let line = server
        .proc
        .stderr
        .wait_for("web dashboard listening", LIMIT)
        .unwrap();
    let base = field(&line, "url");
    let out = as_admin(server, &["web"]);
    let link = text(&out.stdout).lines().last().unwrap().trim().to_string();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let b = common::browser::Browser::start().await;
        b.open(&link).await;
        let count = |sel: &str| format!("document.querySelectorAll('{sel}').length");
        // A case's history: a square per result, w3's two failures.
        b.open(&format!("{base}/cases?name=test_board%3A%3Atest_net&series=nightly")).await;
        assert_eq!(b.js(&format!("return {}", count("#case-chart rect.case"))).await, 5);
        assert_eq!(b.js(&format!("return {}", count("#case-chart rect.case.fail"))).await, 2);
        b.screenshot("case-history").await;
        // The series matrix: test_net's row, w3's cell the reddest.
        b.open(&format!("{base}/series/nightly")).await;
        let cells = b.js(&format!("return {}", count("#series-matrix rect.cell"))).await;
        assert!(cells.as_u64().unwrap() >= 3, "{cells}");
        let red = b
            .js("return Array.from(document.querySelectorAll('#series-matrix rect.cell')).map(r => r.querySelector('title').textContent).filter(t => t.includes('test_net on w3'))[0]")
            .await;
        assert!(red.as_str().unwrap().contains("2 failed"), "{red}");
        b.screenshot("series-matrix").await;
        // The run page links its series.
        b.open(&format!("{base}/runs/{r1}")).await;
        assert!(b.js("return document.querySelector('a[href=\"/series/nightly\"]') !== null").await == true);
        // The lab's groups over time, a worker's week, the report.
        b.open(&format!("{base}/")).await;
        b.wait_js("document.querySelectorAll('.charts[data-group=\"lab\"] svg.chart path').length >= 2", LIMIT).await;
        b.screenshot("lab-charts").await;
        b.open(&format!("{base}/workers/w3")).await;
        b.wait_js("document.querySelectorAll('#worker-charts svg.chart').length == 2", LIMIT).await;
        b.screenshot("worker-charts").await;
        b.open(&format!("{base}/report?days=1")).await;
        assert!(b.js(&format!("return {}", count("#report-devices tbody tr"))).await.as_u64().unwrap() >= 4);
        b.screenshot("report").await;
        // At a phone's width the charts shrink instead of widening the page.
        b.client.set_window_size(390, 844).await.unwrap();
        for page in ["/", "/workers/w3", "/cases?name=test_board%3A%3Atest_net", "/series/nightly"] {
            b.open(&format!("{base}{page}")).await;
            let fits = b.js("return document.documentElement.scrollWidth <= window.innerWidth + 1").await;
            let wide = b.js("return Array.from(document.querySelectorAll('main *')).filter(e => e.getBoundingClientRect().right > window.innerWidth + 1).slice(0, 5).map(e => e.tagName + '.' + e.className + '#' + e.id + ' ' + Math.round(e.getBoundingClientRect().right))").await;
            assert_eq!(fits, true, "{page} is wider than a phone: {wide}");
        }
        b.screenshot("lab-charts-phone").await;
    });
}
