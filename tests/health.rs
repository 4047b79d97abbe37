//! Issue 21: lab health with the real binaries — a broken device never
//! eats the queue, infrastructure failures run again elsewhere, a device
//! repaired by its recovery command comes back by itself, health checks
//! go first and keep running — and fair share between users.

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(60);

const JUNIT: &str = "mkdir -p \"$OTS_RESULTS_DIR\"; echo '<testsuite><testcase name=\"t\"/></testsuite>' > \"$OTS_RESULTS_DIR/r.xml\"";

/// A conductor that passes after `secs`.
fn passing(dir: &Path, name: &str, secs: &str) -> String {
    script(dir, name, &format!("sleep {secs}\n{JUNIT}"))
        .display()
        .to_string()
}

fn workers_json(server: &ServerProc) -> Vec<Value> {
    let out = submit(server, &["workers", "--json"], LIMIT);
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

fn try_health(server: &ServerProc, worker: &str) -> Result<Value, String> {
    let out = submit(server, &["health", worker, "--json"], LIMIT);
    if !out.status.success() {
        return Err(text(&out.stderr));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
}

fn health_of(server: &ServerProc, worker: &str) -> Value {
    try_health(server, worker).unwrap()
}

/// Polls `ots-submit health WORKER` until `ok` holds (the worker may not
/// have registered yet).
fn wait_health(server: &ServerProc, worker: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + LIMIT;
    loop {
        let h = try_health(server, worker);
        if let Ok(h) = &h {
            if ok(h) {
                return h.clone();
            }
        }
        assert!(Instant::now() < deadline, "never reached: {h:#?}");
        std::thread::sleep(Duration::from_millis(100)); // polling interval, bounded by the deadline
    }
}

/// The (worker, attempt) of every dispatch in a status.
fn dispatches(st: &Value) -> Vec<(String, String, u64, u64)> {
    let mut out = Vec::new();
    for t in st["tasks"].as_array().unwrap() {
        for h in t["history"].as_array().unwrap() {
            if h["state"] == "dispatched" {
                out.push((
                    t["task"].as_str().unwrap().to_string(),
                    h["worker"].as_str().unwrap_or("").to_string(),
                    h["attempt"].as_u64().unwrap(),
                    h["at_ms"].as_u64().unwrap(),
                ));
            }
        }
    }
    out
}

/// The scenario: three workers in one group, one of whose
/// conductor fails at once with exit 3 ("flashing failed"); 10 testruns
/// of 3 packages each, one task per package. Every testrun passes: the
/// broken worker's tasks run again on the healthy ones, and it is out of
/// service (suspect, then bad: no health check is configured) within
/// `suspect_after` + 1 of its tasks.
#[test]
fn a_broken_device_does_not_fail_other_peoples_testruns() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_fresh_server(dir.path(), &[]);
    let good = passing(dir.path(), "good.sh", "0.1");
    let broken = script(
        dir.path(),
        "broken.sh",
        "echo 'flashing failed' >&2; exit 3",
    )
    .display()
    .to_string();
    let _w1 = start_idle_worker(
        dir.path(),
        "h-w1",
        "devicegroup:lab",
        &server,
        &[&good],
        &[],
    );
    let _w2 = start_idle_worker(
        dir.path(),
        "h-w2",
        "devicegroup:lab",
        &server,
        &[&good],
        &[],
    );
    let _w3 = start_idle_worker(
        dir.path(),
        "h-w3",
        "devicegroup:lab",
        &server,
        &[&broken],
        &[],
    );
    let runs: Vec<String> = (0..10)
        .map(|_| {
            submit_run(
                &server,
                &[
                    "--device",
                    "devicegroup:lab",
                    "--image",
                    "i",
                    "--packages",
                    "a,b,c",
                    "--distribution",
                    "perpackage",
                ],
            )
        })
        .collect();
    let mut passed = 0;
    let mut on_broken = Vec::new();
    for run in &runs {
        let st = wait_status(&server, run, LIMIT, finished);
        if st["verdict"] == "PASS" {
            passed += 1;
        }
        for (task, worker, attempt, _) in dispatches(&st) {
            if worker == "h-w3" {
                on_broken.push((task.clone(), attempt));
                // It ran again elsewhere and ended there.
                let t = st["tasks"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|t| t["task"] == task.as_str())
                    .unwrap();
                assert_ne!(t["worker"], "h-w3", "{t:#}");
                assert!(t["attempts"].as_u64().unwrap() >= 2, "{t:#}");
            }
        }
    }
    eprintln!(
        "broken device: {passed} of 10 testruns PASS; the broken worker took {} tasks",
        on_broken.len()
    );
    assert!(passed >= 9, "{passed} of 10 passed");
    assert!(
        on_broken.len() <= 3,
        "the broken worker took {} tasks: {on_broken:?}",
        on_broken.len()
    );
    let ws = workers_json(&server);
    let w3 = ws.iter().find(|w| w["name"] == "h-w3").unwrap();
    assert!(w3["health"] == "bad" || w3["health"] == "suspect", "{w3:#}");
    let shown = text(&submit(&server, &["workers"], LIMIT).stdout);
    let line = shown.lines().find(|l| l.starts_with("h-w3")).unwrap();
    assert!(line.contains("bad") || line.contains("suspect"), "{shown}");
    // The change is in its history, the audit log and the metrics' counters.
    let h = health_of(&server, "h-w3");
    let reasons: Vec<&str> = h["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["reason"].as_str().unwrap())
        .collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("2 infrastructure failures in a row")),
        "{reasons:?}"
    );
    assert!(audit_json(&server).contains("h-w3: good -> suspect"));
    // Health is durable: a server killed and restarted on its state still
    // knows the device is out of service, and why.
    let mut server = server;
    let (control, events, state) = (
        server.control.clone(),
        server.events.clone(),
        server.state_dir.clone(),
    );
    let before = health_of(&server, "h-w3");
    server.proc.kill();
    let server = start_server(&state, &control, &events, &[]);
    let after = health_of(&server, "h-w3");
    assert_eq!(after["worker"]["health"], before["worker"]["health"]);
    assert_eq!(after["history"], before["history"]);
}

/// A worker whose device breaks (a flag file its conductor checks) turns
/// suspect, is checked after running its recovery command — which
/// "repairs" it (removes the flag) — and is good again by itself; the
/// tasks it failed passed on the other worker.
#[test]
fn a_device_its_recovery_command_repairs_returns_to_good_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("broken");
    let server = start_configured_server(
        dir.path(),
        "[[health.check]]\ndevicegroup = \"rec\"\nimage = \"check\"\npackages = [\"health\"]\ntimeout = \"30s\"\n",
        &[],
    );
    let flaky = script(
        dir.path(),
        "flaky.sh",
        &format!("if [ -e {flag:?} ]; then echo 'no boot' >&2; exit 3; fi\nsleep 0.1\n{JUNIT}"),
    )
    .display()
    .to_string();
    let fix = script(
        dir.path(),
        "fix.sh",
        &format!("echo power-cycling\nrm -f {flag:?}"),
    )
    .display()
    .to_string();
    let good = passing(dir.path(), "good.sh", "0.1");
    let _w1 = start_worker(
        dir.path(),
        "rec-w1",
        "devicegroup:rec",
        &server,
        &[&flaky],
        &[("OTS_WORKER_RECOVERY__COMMAND", &fix)],
    );
    let _w2 = start_worker(
        dir.path(),
        "rec-w2",
        "devicegroup:rec",
        &server,
        &[&good],
        &[],
    );
    for w in ["rec-w1", "rec-w2"] {
        wait_health(&server, w, |h| h["worker"]["health"] == "good");
    }
    std::fs::write(&flag, "").unwrap();
    let mut runs = Vec::new();
    let deadline = Instant::now() + LIMIT;
    // Until the device is suspected (two infrastructure failures on it).
    while !health_of(&server, "rec-w1")["history"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["to"] == "suspect")
    {
        assert!(Instant::now() < deadline, "rec-w1 never suspected");
        let run = submit_run(
            &server,
            &[
                "--device",
                "devicegroup:rec",
                "--image",
                "i",
                "--packages",
                "p",
            ],
        );
        wait_status(&server, &run, LIMIT, finished);
        runs.push(run);
    }
    let h = wait_health(&server, "rec-w1", |h| h["worker"]["health"] == "good");
    let history = h["history"].as_array().unwrap();
    let path: Vec<&str> = history.iter().map(|c| c["to"].as_str().unwrap()).collect();
    assert!(path.ends_with(&["suspect", "good"]), "{path:?}");
    assert!(!flag.exists(), "the recovery command ran");
    for run in &runs {
        assert_eq!(current_status(&server, run)["verdict"], "PASS", "{run}");
    }
    // The check that cleared it ran the recovery command first, in its log.
    let last = history.last().unwrap()["reason"].as_str().unwrap();
    let check_run = last
        .split_whitespace()
        .find(|w| w.starts_with('r') && w.contains('.'))
        .and_then(|t| t.split('.').next())
        .unwrap_or_else(|| panic!("no check task in {last:?}"));
    let out = submit(&server, &["logs", check_run], LIMIT);
    let log = text(&out.stdout);
    assert!(
        log.contains("recovery: running") && log.contains("power-cycling"),
        "{log}"
    );
}

/// A new worker runs its health check before any ordinary task (one was
/// queued before it came), and a device that passes its periodic check
/// (every 2 s here) stays good.
#[test]
fn health_checks_go_first_and_keep_a_good_device_good() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_configured_server(
        dir.path(),
        "[[health.check]]\ndevicegroup = \"per\"\nimage = \"check\"\npackages = [\"health\"]\ntimeout = \"30s\"\ninterval = \"2s\"\n",
        &[],
    );
    let run = submit_run(
        &server,
        &[
            "--device",
            "devicegroup:per",
            "--image",
            "i",
            "--packages",
            "p",
            "--queue-anyway",
        ],
    );
    let good = passing(dir.path(), "good.sh", "0.1");
    let _w = start_worker(
        dir.path(),
        "per-w1",
        "devicegroup:per",
        &server,
        &[&good],
        &[],
    );
    let st = wait_status(&server, &run, LIMIT, finished);
    assert_eq!(st["verdict"], "PASS", "{st:#}");
    let ordinary_at = dispatches(&st)[0].3;
    // The first check's run is the next one after the ordinary run.
    let check = current_status(&server, "r2");
    assert_eq!(check["verdict"], "PASS", "{check:#}");
    let check_end = check["tasks"][0]["history"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["state"] == "finished")
        .and_then(|h| h["at_ms"].as_u64())
        .expect("the check ended");
    assert!(
        check_end <= ordinary_at,
        "check ended {check_end}, task dispatched {ordinary_at}"
    );
    // Periodic checks keep passing; the device stays good.
    let h = wait_health(&server, "per-w1", |h| {
        h["history"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["reason"].as_str().unwrap().ends_with("passed"))
            .count()
            >= 3
    });
    assert_eq!(h["worker"]["health"], "good", "{h:#}");
}

/// Fair share with real processes: user A queues 500 short testruns on
/// two workers; user B's one testrun starts within one task duration
/// (plus 1 s) of B's submit, and passes.
#[test]
fn a_newcomer_is_not_stuck_behind_a_backlog() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_fresh_server(dir.path(), &[]);
    let conductor = passing(dir.path(), "short.sh", "0.3");
    let _w1 = start_idle_worker(
        dir.path(),
        "fs-w1",
        "devicegroup:fs",
        &server,
        &[&conductor],
        &[],
    );
    let _w2 = start_idle_worker(
        dir.path(),
        "fs-w2",
        "devicegroup:fs",
        &server,
        &[&conductor],
        &[],
    );
    let (rt, mut a) = client_as(&server, "fair-a", "submit");
    for _ in 0..500 {
        rt.block_on(a.submit(testrun(
            "devicegroup:fs",
            &["p"],
            ots::protocol::Priority::Normal,
        )))
        .unwrap();
    }
    let (rt, mut b) = client_as(&server, "fair-b", "submit");
    let submitted = ots::protocol::limits::unix_ms_now();
    let (run, _) = rt
        .block_on(b.submit(testrun(
            "devicegroup:fs",
            &["p"],
            ots::protocol::Priority::Normal,
        )))
        .unwrap();
    let st = wait_status(&server, &run, LIMIT, finished);
    assert_eq!(st["verdict"], "PASS", "{st:#}");
    let started = dispatches(&st)[0].3;
    let waited = started.saturating_sub(submitted);
    eprintln!("fair share: user B's task started {waited} ms after its submit, behind 500 of A's");
    assert!(
        waited <= 300 + 1000,
        "user B waited {waited} ms behind 500 of A's"
    );
}

/// Weights 3:1 (`[fairshare] users`): over the first 200 dispatches the
/// shares are within 10 % of 3:1.
#[test]
fn weights_set_the_shares() {
    let dir = tempfile::tempdir().unwrap();
    let server =
        start_configured_server(dir.path(), "[fairshare]\nusers = { weight-a = 3 }\n", &[]);
    let (rt, mut a) = client_as(&server, "weight-a", "submit");
    let (_rt2, mut b) = client_as(&server, "weight-b", "submit");
    let pkgs: Vec<String> = (0..200).map(|i| format!("p{i}")).collect();
    let pkgs: Vec<&str> = pkgs.iter().map(String::as_str).collect();
    let mut spec = testrun("devicegroup:wt", &pkgs, ots::protocol::Priority::Normal);
    spec.distribution = ots::protocol::Distribution::Perpackage;
    spec.queue_anyway = true;
    let (run_a, _) = rt.block_on(a.submit(spec.clone())).unwrap();
    let (run_b, _) = rt.block_on(b.submit(spec)).unwrap();
    // Workers come once both backlogs are queued.
    let conductor = script(dir.path(), "fast.sh", JUNIT).display().to_string();
    let _w1 = start_worker(
        dir.path(),
        "wt-w1",
        "devicegroup:wt",
        &server,
        &[&conductor],
        &[],
    );
    let _w2 = start_worker(
        dir.path(),
        "wt-w2",
        "devicegroup:wt",
        &server,
        &[&conductor],
        &[],
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut all = loop {
        let mut all: Vec<(u64, char)> = Vec::new();
        for (run, who) in [(&run_a, 'a'), (&run_b, 'b')] {
            let st = current_status(&server, run);
            all.extend(dispatches(&st).into_iter().map(|d| (d.3, who)));
        }
        if all.len() >= 200 {
            break all;
        }
        assert!(Instant::now() < deadline, "only {} dispatched", all.len());
        std::thread::sleep(Duration::from_millis(200)); // polling interval, bounded by the deadline
    };
    all.sort();
    let a_share = all.iter().take(200).filter(|(_, w)| *w == 'a').count();
    eprintln!("weights 3:1: A got {a_share} of the first 200 dispatches");
    // 3:1 of 200 is 150; within 10 %.
    assert!(
        (135..=165).contains(&a_share),
        "A got {a_share} of the first 200"
    );
}

/// A low-priority task still runs while high-priority ones keep arriving
/// faster than they are served: it is overtaken only by tasks queued
/// within twice `priority_lead` (1 s here) after it.
#[test]
fn a_low_priority_task_runs_while_high_ones_keep_coming() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_configured_server(dir.path(), "[fairshare]\npriority_lead = \"1s\"\n", &[]);
    let conductor = passing(dir.path(), "p.sh", "0.2");
    let _w = start_idle_worker(
        dir.path(),
        "pr-w1",
        "devicegroup:pr",
        &server,
        &[&conductor],
        &[],
    );
    let (rt, mut op) = client_as(&server, "prio-op", "operator");
    let high = || testrun("devicegroup:pr", &["h"], ots::protocol::Priority::High);
    // A backlog first, so the low one has to wait.
    for _ in 0..5 {
        rt.block_on(op.submit(high())).unwrap();
    }
    let (low, _) = rt
        .block_on(op.submit(testrun(
            "devicegroup:pr",
            &["l"],
            ots::protocol::Priority::Low,
        )))
        .unwrap();
    let low_queued = ots::protocol::limits::unix_ms_now();
    let mut highs = Vec::new();
    let deadline = Instant::now() + LIMIT;
    // High ones every 50 ms (four times what the worker serves) until the
    // low one has started.
    loop {
        let (r, _) = rt.block_on(op.submit(high())).unwrap();
        highs.push((r, ots::protocol::limits::unix_ms_now()));
        let st = current_status(&server, &low);
        if st["tasks"][0]["state"] != "queued" {
            break;
        }
        assert!(Instant::now() < deadline, "the low task starved: {st:#}");
        std::thread::sleep(Duration::from_millis(50)); // submission pace, bounded by the deadline
    }
    let st = wait_status(&server, &low, LIMIT, finished);
    assert_eq!(st["verdict"], "PASS");
    let low_started = dispatches(&st)[0].3;
    // High ones queued well after it (past twice the lead) did not go first.
    for (r, queued) in &highs {
        if *queued > low_queued + 2000 + 500 {
            let s = current_status(&server, r);
            if let Some(d) = dispatches(&s).first() {
                assert!(
                    d.3 >= low_started,
                    "{r} queued at {queued} ran before the low task"
                );
            }
        }
    }
    eprintln!(
        "low priority: started {} ms after it was queued, {} high ones submitted meanwhile",
        low_started.saturating_sub(low_queued),
        highs.len()
    );
    assert!(
        highs.len() >= 10,
        "only {} high ones arrived meanwhile",
        highs.len()
    );
}

/// `--priority high` needs role operator.
#[test]
fn high_priority_needs_an_operator() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_fresh_server(dir.path(), &[]);
    wait_allowed(&server, "prio-user");
    let out = server.as_user("prio-user").submit(
        &[
            "run",
            "--device",
            "devicegroup:x",
            "--image",
            "i",
            "--packages",
            "p",
            "--queue-anyway",
            "--priority",
            "high",
        ],
        LIMIT,
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("needs role operator"),
        "{}",
        text(&out.stderr)
    );
}

/// Operators set maintenance and retirement; a `submit` user cannot.
#[test]
fn maintenance_and_retirement_are_operators_words() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_fresh_server(dir.path(), &[]);
    let good = passing(dir.path(), "good.sh", "0.1");
    let _w = start_idle_worker(
        dir.path(),
        "mt-w1",
        "devicegroup:mt",
        &server,
        &[&good],
        &[],
    );
    wait_allowed(&server, "mt-user");
    let out = server
        .as_user("mt-user")
        .submit(&["maintenance", "mt-w1", "on"], LIMIT);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("operator"),
        "{}",
        text(&out.stderr)
    );
    let out = submit(
        &server,
        &["maintenance", "mt-w1", "on", "--reason", "new USB hub"],
        LIMIT,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let run = submit_run(
        &server,
        &[
            "--device",
            "devicegroup:mt",
            "--image",
            "i",
            "--packages",
            "p",
        ],
    );
    let st = current_status(&server, &run);
    assert_eq!(st["tasks"][0]["state"], "queued");
    let doing = st["tasks"][0]["waiting"]["workers"][0]["doing"]
        .as_str()
        .unwrap();
    assert!(doing.contains("maintenance: new USB hub"), "{doing}");
    let out = submit(&server, &["maintenance", "mt-w1", "off"], LIMIT);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        wait_status(&server, &run, LIMIT, finished)["verdict"],
        "PASS"
    );
    let out = submit(&server, &["retire", "mt-w1", "--reason", "gone"], LIMIT);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let h = health_of(&server, "mt-w1");
    assert_eq!(h["worker"]["health"], "retired");
    let shown = text(&submit(&server, &["health", "mt-w1"], LIMIT).stdout);
    assert!(
        shown.contains("maintenance -> unknown") || shown.contains("maintenance -> good"),
        "{shown}"
    );
    assert!(shown.contains("retired: gone"), "{shown}");
    let audit = audit_json(&server);
    assert!(
        audit.contains("maintenance_on") && audit.contains("retire"),
        "{audit}"
    );
}

fn testrun(
    device: &str,
    packages: &[&str],
    priority: ots::protocol::Priority,
) -> ots::protocol::TestrunRequest {
    ots::protocol::TestrunRequest {
        lease: None,
        on_lease: None,
        series: None,
        device: ots::protocol::DeviceSpec::parse(device).unwrap(),
        image: "i".into(),
        packages: packages.iter().map(|p| p.to_string()).collect(),
        distribution: ots::protocol::Distribution::Default,
        timeout_secs: 60,
        options: Default::default(),
        queue_anyway: false,
        secrets: Default::default(),
        inputs: Default::default(),
        owner: None,
        priority,
        devices: Vec::new(),
        notify: Vec::new(),
    }
}

/// A library client connected as `user` with `role` (made on first use).
fn client_as(
    server: &ServerProc,
    user: &str,
    role: &str,
) -> (tokio::runtime::Runtime, ots::client::Client) {
    let keys = server.keys.as_ref().expect("a secured server");
    let credentials = ots::security::Credentials::Noise {
        key: ots::security::KeyPair::read(&keys.user(user, role)).unwrap(),
        server: ots::security::PublicKey::read(&keys.server_pub()).unwrap(),
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let deadline = Instant::now() + LIMIT;
    loop {
        match rt.block_on(ots::client::Client::connect(
            &server.control,
            Duration::from_secs(5),
            &credentials,
        )) {
            Ok(c) => return (rt, c),
            Err(e) => assert!(Instant::now() < deadline, "{user} never allowed: {e}"),
        }
        std::thread::sleep(Duration::from_millis(50)); // polling interval, bounded by the deadline
    }
}

/// Several device specs in one testrun, as the original OTS trigger had:
/// the packages run on each spec in parallel; the verdict is over all.
#[test]
fn one_testrun_runs_on_several_device_specs() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_fresh_server(dir.path(), &[]);
    let good = passing(dir.path(), "good.sh", "0.1");
    let bad = script(dir.path(), "fails.sh", "exit 1")
        .display()
        .to_string();
    let _a = start_idle_worker(
        dir.path(),
        "ms-a",
        "devicegroup:msa",
        &server,
        &[&good],
        &[],
    );
    let _b = start_idle_worker(
        dir.path(),
        "ms-b",
        "devicegroup:msb devicename:x",
        &server,
        &[&good],
        &[],
    );
    let run = submit_run(
        &server,
        &[
            "--device",
            "devicegroup:msa; devicegroup:msb devicename:x",
            "--image",
            "i",
            "--packages",
            "p,q",
        ],
    );
    let st = wait_status(&server, &run, LIMIT, finished);
    assert_eq!(st["verdict"], "PASS", "{st:#}");
    let tasks = st["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 2, "{st:#}");
    let workers: Vec<&str> = tasks
        .iter()
        .map(|t| t["worker"].as_str().unwrap())
        .collect();
    assert_eq!(workers, vec!["ms-a", "ms-b"]);
    assert_eq!(tasks[1]["device"]["devicename"], "x");
    let shown = text(&submit(&server, &["status", &run], LIMIT).stdout);
    assert!(shown.contains("on devicegroup:msb devicename:x"), "{shown}");
    // One spec failing fails the testrun.
    let _c = start_idle_worker(dir.path(), "ms-c", "devicegroup:msc", &server, &[&bad], &[]);
    let run = submit_run(
        &server,
        &[
            "--device",
            "devicegroup:msa;devicegroup:msc",
            "--image",
            "i",
            "--packages",
            "p",
        ],
    );
    let st = wait_status(&server, &run, LIMIT, finished);
    assert_eq!(st["verdict"], "FAIL", "{st:#}");
    // A spec nobody has is refused like a single one.
    let out = submit(
        &server,
        &[
            "run",
            "--device",
            "devicegroup:msa; devicegroup:nowhere",
            "--image",
            "i",
            "--packages",
            "p",
        ],
        LIMIT,
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no queue for nowhere"),
        "{}",
        text(&out.stderr)
    );
}
