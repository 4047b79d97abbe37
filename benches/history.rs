//! Benchmark (issue 36): what a lab's history costs the server — memory,
//! start-up, takeover, and requests about it — with 1 000 ended testruns
//! behind it (the baseline) and with 100 000, in the same run, against
//! the real release binaries (secured, loopback, SQLite; PostgreSQL from
//! the test harness for the takeover).
//!
//! The history is written directly through the store: one real testrun
//! (run by a real worker) is the template, and its rows are cloned under
//! new numbers (`r2`, `r3`, …) with the columns they are found by. Then,
//! for each size:
//!
//! 1. the server's RSS after start, and the time from its start to the
//!    first answered request (`runs --limit 1`);
//! 2. with 10 workers streaming log lines: the median and worst latency
//!    of `status` of an old testrun (a different one each time, so each
//!    is read from the database), `runs --limit 50` and the dashboard's
//!    runs page; and the serving loop's longest tick gap beyond the
//!    heartbeat interval (`ots_loop_tick_gap_max_seconds`) meanwhile;
//! 3. on PostgreSQL: the time from SIGKILLing the leader to its standby
//!    answering its first request (the lease's lapse included, the same
//!    for both sizes: `lease_ttl` 1 s).
//!
//! 4. a soak: 5 000 testruns of two tasks through three real workers;
//!    the server's RSS after the first 500 and after the last.
//!
//! `cargo bench --bench history` (OTS_BENCH_HISTORY_RUNS, default
//! 100000; OTS_BENCH_HISTORY_ASKS, default 100; OTS_BENCH_WORKERS, 10;
//! OTS_BENCH_SOAK_RUNS, default 5000, 0: no soak).

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use ots::server::db::{Changes, Db, HistoryRow};
use ots::server::pg::{PgDb, PgSettings};
use ots::server::store::history::{Found, Recall, RunIndex, SqliteHistory};
use std::path::Path;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(300);

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median_max(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    (ms(v[v.len() / 2]), ms(*v.last().unwrap()))
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib / 1024.0
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// One real testrun's rows, to clone.
struct Template {
    run: String,
    run_body: Vec<u8>,
    task_body: Vec<u8>,
    summary: ots::protocol::RunSummary,
    files: Vec<(String, u64, String)>,
    history: Vec<HistoryRow>,
    kept_bytes: u64,
}

/// Runs one testrun through a real server and worker and reads its rows.
fn template(dir: &Path) -> Template {
    std::fs::create_dir_all(dir).unwrap();
    let conductor = script(
        dir,
        "template.sh",
        "for i in 1 2 3 4 5 6 7 8; do echo \"line $i of the template testrun\"; done\n\
         mkdir -p \"$OTS_RESULTS_DIR\"\n\
         echo '<testsuite><testcase name=\"a\"/><testcase name=\"b\"/></testsuite>' > \"$OTS_RESULTS_DIR/r.xml\"\n",
    );
    let mut server = start_fresh_server(dir, &[]);
    let _w = start_worker(
        dir,
        "tpl",
        "devicegroup:bench",
        &server,
        &[conductor.to_str().unwrap(), "{packages}"],
        &[],
    );
    assert!(wait_for_workers(&server, LIMIT, all_idle(&["tpl"])));
    let run = submit_run(
        &server,
        &[
            "--device",
            "devicegroup:bench",
            "--image",
            "img",
            "--packages",
            "p1",
        ],
    );
    wait_status(&server, &run, LIMIT, finished);
    let files = summary_files(&server, &run);
    server.proc.kill();
    let db_path = server.state_dir.join("ots.db");
    let history = SqliteHistory::open(&db_path).unwrap();
    let Found::Rows(rows) = history.recall(&Recall::Runs(vec![run.clone()])).unwrap() else {
        panic!("rows")
    };
    let Found::List(list) = history
        .recall(&Recall::List(ots::server::store::history::RunQuery {
            newest: 10,
            state: None,
            owner: None,
            verdict: None,
            devicegroup: None,
            limit: 10,
        }))
        .unwrap()
    else {
        panic!("list")
    };
    let summary = list
        .into_iter()
        .find(|s| s.run == run)
        .expect("its summary");
    let db = Db::open(&server.state_dir).unwrap();
    let task = rows.tasks[0].0.clone();
    let history_rows = db.history(&task).unwrap();
    let log_bytes = std::fs::metadata(server.state_dir.join("tasks").join(&task).join("log"))
        .map_or(0, |m| m.len());
    let kept_bytes = files.iter().map(|f| f.1).sum::<u64>() + log_bytes;
    assert_eq!(rows.tasks.len(), 1, "one task: packages in one task");
    Template {
        run_body: rows.runs[0].1.clone(),
        run,
        task_body: rows.tasks[0].1.clone(),
        summary,
        files,
        history: history_rows,
        kept_bytes,
    }
}

/// `s` as a MessagePack string (ids are short: a fixstr).
fn fixstr(s: &str) -> Vec<u8> {
    assert!(s.len() < 32);
    let mut out = vec![0xa0 | s.len() as u8];
    out.extend_from_slice(s.as_bytes());
    out
}

/// `body` with every `from` replaced by `to`.
fn replace(body: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 64);
    let mut i = 0;
    while i < body.len() {
        if body[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(body[i]);
            i += 1;
        }
    }
    out
}

/// The result files of the testrun's task, as `status` lists them.
fn summary_files(server: &ServerProc, run: &str) -> Vec<(String, u64, String)> {
    let st = status_json(server, run).expect("its status");
    st["tasks"][0]["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["name"].as_str().unwrap().to_string(),
                f["size"].as_u64().unwrap(),
                f["sha256"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Testruns `from..to` cloned from the template, one batch.
fn batch(t: &Template, from: u64, to: u64) -> Changes {
    let mut c = Changes::default();
    // The ids as MessagePack strings: renamed in the encoded rows.
    let (run, task) = (fixstr(&t.run), fixstr(&format!("{}.1", t.run)));
    for n in from..to {
        let id = format!("r{n}");
        let tid = format!("{id}.1");
        let rename =
            |body: &[u8]| replace(&replace(body, &task, &fixstr(&tid)), &run, &fixstr(&id));
        let mut summary = t.summary.clone();
        summary.run = id.clone();
        let index = RunIndex {
            num: n,
            kind: "r".into(),
            state: ots::server::store::history::state_token(summary.state),
            verdict: summary
                .verdict
                .map(ots::server::store::history::verdict_token),
            owner: summary.owner.clone(),
            groups: ",bench,".into(),
            live: false,
            ended_ms: summary.ended_ms,
            kept_bytes: Some(t.kept_bytes),
            summary: rmp_serde::to_vec_named(&summary).unwrap(),
            series: Some("bench".into()),
            image: Some("img".into()),
        };
        c.runs.push((id.clone(), rename(&t.run_body), index));
        c.tasks
            .push((tid.clone(), id.clone(), rename(&t.task_body)));
        for (name, size, sha) in &t.files {
            c.files
                .push((tid.clone(), name.clone(), *size, sha.clone()));
        }
        for h in &t.history {
            c.history.push(HistoryRow {
                task: tid.clone(),
                ..h.clone()
            });
        }
    }
    c.meta.push(("next_run".into(), to.to_string()));
    c
}

const BATCH: u64 = 5_000;

fn fill_sqlite(state: &Path, t: &Template, n: u64) {
    std::fs::create_dir_all(state).unwrap();
    let mut db = Db::open(state).unwrap();
    let mut from = 1;
    while from <= n {
        let to = (from + BATCH).min(n + 1);
        db.commit(&batch(t, from, to)).unwrap();
        from = to;
    }
}

fn pg_settings(url: &str) -> PgSettings {
    PgSettings {
        url: url.to_string(),
        password_file: None,
        ca_file: None,
        statement_timeout: Duration::from_secs(60),
        connect_timeout: Duration::from_secs(10),
    }
}

fn fill_postgres(url: &str, t: &Template, n: u64) {
    rt().block_on(async {
        let mut db = PgDb::open(&pg_settings(url)).await.unwrap();
        let mut from = 1;
        while from <= n {
            let to = (from + BATCH).min(n + 1);
            db.commit(&batch(t, from, to)).await.unwrap();
            from = to;
        }
    });
}

/// What one size measured.
struct Figures {
    rss_mib: f64,
    first_answer: Duration,
    status: (f64, f64),
    runs: (f64, f64),
    page: (f64, f64),
    tick_late_ms: f64,
    tick_gap_ms: f64,
    takeover: Duration,
    asked: usize,
}

/// A client of `server` that has had its first answer, and how long
/// after `started` that was.
fn first_answer(
    rt: &tokio::runtime::Runtime,
    server: &ServerProc,
    started: Instant,
) -> (ots::client::Client, Duration) {
    let creds = credentials(server);
    let deadline = Instant::now() + LIMIT;
    loop {
        let asked = rt.block_on(async {
            let mut c =
                ots::client::Client::connect(&server.control, Duration::from_secs(5), &creds)
                    .await?;
            c.runs(None, None, 1).await.map(|_| c)
        });
        match asked {
            Ok(c) => return (c, started.elapsed()),
            Err(e) if Instant::now() < deadline => eprintln!("not answering yet: {e}"),
            Err(e) => panic!("the server never answered: {e}"),
        }
    }
}

fn measure(dir: &Path, t: &Template, n: u64, asks: u64, workers: usize) -> Figures {
    let state = dir.join(format!("state-{n}"));
    let filling = Instant::now();
    fill_sqlite(&state, t, n);
    println!(
        "  {n} ended testruns written through the store in {:.1} s",
        filling.elapsed().as_secs_f64()
    );
    let metrics = format!("127.0.0.1:{}", free_port());
    let started = Instant::now();
    let server = start_server(
        &state,
        "tcp://127.0.0.1:0",
        "tcp://127.0.0.1:0",
        &[
            ("OTS_SERVER_WEB", "127.0.0.1:0"),
            ("OTS_SERVER_METRICS", &metrics),
        ],
    );
    let rt = rt();
    let (mut client, first) = first_answer(&rt, &server, started);
    let pid = server.proc.child.id();
    let rss = rss_mib(pid);

    // Ten workers streaming log lines while the requests are timed.
    let streamer = script(
        dir,
        "stream.sh",
        "python3 -c '\nimport sys, time\nt0 = time.monotonic()\nn = 0\nwhile time.monotonic() - t0 < float(sys.argv[1]):\n    sys.stdout.write(\"\".join(\"streamed line %d of a busy worker\\n\" % (n + i) for i in range(20)))\n    sys.stdout.flush(); n += 20; time.sleep(0.01)\n' \"$1\"\n",
    );
    let names: Vec<String> = (0..workers).map(|i| format!("hw{n}x{i}")).collect();
    let _workers: Vec<_> = names
        .iter()
        .map(|w| {
            start_worker(
                dir,
                w,
                "devicegroup:stream",
                &server,
                &[streamer.to_str().unwrap(), "{packages}"],
                &[],
            )
        })
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    assert!(wait_for_workers(&server, LIMIT, all_idle(&refs)));
    let busy: Vec<String> = (0..workers)
        .map(|_| {
            submit_run(
                &server,
                &[
                    "--device",
                    "devicegroup:stream",
                    "--image",
                    "i",
                    "--packages",
                    "600",
                    "--timeout",
                    "20m",
                ],
            )
        })
        .collect();
    for run in &busy {
        wait_status(&server, run, LIMIT, running);
    }
    let out = submit(&server, &["web"], LIMIT);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let cookie = http::sign_in(text(&out.stdout).lines().last().unwrap().trim());
    let line = server
        .proc
        .stderr
        .wait_for("web dashboard listening", LIMIT)
        .unwrap();
    let base = field(&line, "url");
    let _ = tick_gap(&metrics); // resets the maximum
    let (mut status, mut runs, mut page) = (Vec::new(), Vec::new(), Vec::new());
    // At least `asks` rounds and at least 5 s: the loop ticks (every
    // heartbeat, 1 s) several times while the requests run.
    let window = Instant::now();
    let mut k = 0u64;
    while k < asks || window.elapsed() < Duration::from_secs(5) {
        k += 1;
        // Old testruns spread over the whole history: each one read
        // from the database.
        let old = format!("r{}", 1 + (k * 7919) % (n / 2).max(1));
        let t0 = Instant::now();
        let st = rt.block_on(client.status(&old)).unwrap();
        status.push(t0.elapsed());
        assert_eq!(st.run, old);
        let t0 = Instant::now();
        let list = rt.block_on(client.runs(None, None, 50)).unwrap();
        runs.push(t0.elapsed());
        assert_eq!(list.len(), 50);
        let t0 = Instant::now();
        let r = http::get(&base, "/runs", Some(&cookie));
        page.push(t0.elapsed());
        assert_eq!(r.status, 200);
    }
    let gap = tick_gap(&metrics);
    let heartbeat = 1.0; // the default heartbeat_interval
    for run in &busy {
        let _ = submit(&server, &["cancel", run], LIMIT);
    }
    drop(server);
    let asked = status.len();
    Figures {
        asked,
        rss_mib: rss,
        first_answer: first,
        status: median_max(status),
        runs: median_max(runs),
        page: median_max(page),
        tick_late_ms: ((gap - heartbeat) * 1e3).max(0.0),
        tick_gap_ms: gap * 1e3,
        takeover: takeover(dir, t, n),
    }
}

/// SIGKILL of a PostgreSQL leader until its standby answers.
fn takeover(dir: &Path, t: &Template, n: u64) -> Duration {
    let url = pg::cluster().database();
    fill_postgres(&url, t, n);
    let state = dir.join(format!("pg-files-{n}"));
    let spawn = |name: &str| {
        let mut cmd = std::process::Command::new(bin("ots-server"));
        for (k, v) in keys().server_env() {
            cmd.env(k, v);
        }
        cmd.env("OTS_SERVER_DATABASE", &url)
            .env("OTS_SERVER_LEASE_TTL", "1s")
            .env("OTS_SERVER_LEASE_RENEW", "200ms")
            .arg("--control")
            .arg("tcp://127.0.0.1:0")
            .arg("--events")
            .arg("tcp://127.0.0.1:0")
            .arg("--state-dir")
            .arg(&state);
        Proc::spawn(name, cmd)
    };
    let mut leader = spawn("leader");
    assert!(leader.stderr.wait_for("server listening", LIMIT).is_some());
    let standby = spawn("standby");
    assert!(standby.stderr.wait_for("standby:", LIMIT).is_some());
    let killed = Instant::now();
    leader.kill();
    let line = standby
        .stderr
        .wait_for("server listening", LIMIT)
        .expect("the standby took over");
    let view = ServerProc {
        control: field(&line, "control"),
        events: field(&line, "events"),
        proc: standby,
        state_dir: state.clone(),
        keys: Some(keys()),
        user: "tester".into(),
    };
    let (_, took) = first_answer(&rt(), &view, killed);
    took
}

/// 5 000 testruns through real workers: the server's RSS after the
/// first 500 and after the last.
fn soak(dir: &Path, runs: u64) {
    let dir = dir.join("soak");
    std::fs::create_dir_all(&dir).unwrap();
    let conductor = script(
        &dir,
        "soak.sh",
        "echo \"package $1\"\nmkdir -p \"$OTS_RESULTS_DIR\"\n\
         echo '<testsuite><testcase name=\"a\"/></testsuite>' > \"$OTS_RESULTS_DIR/r.xml\"\n",
    );
    let server = start_fresh_server(&dir, &[]);
    let names = ["s1", "s2", "s3"];
    let _workers: Vec<_> = names
        .iter()
        .map(|w| {
            start_worker(
                &dir,
                w,
                "devicegroup:soak",
                &server,
                &[conductor.to_str().unwrap(), "{packages}"],
                &[],
            )
        })
        .collect();
    assert!(wait_for_workers(&server, LIMIT, all_idle(&names)));
    let rt = rt();
    let mut client = rt
        .block_on(ots::client::Client::connect(
            &server.control,
            Duration::from_secs(10),
            &credentials(&server),
        ))
        .unwrap();
    let pid = server.proc.child.id();
    let started = Instant::now();
    let mut after_500 = None;
    let mut submitted = 0u64;
    while submitted < runs {
        // Waves of 200: well inside the per-owner quota of open testruns.
        let wave = 200.min(runs - submitted);
        let mut last = String::new();
        for _ in 0..wave {
            let (run, _) = rt
                .block_on(client.submit(ots::protocol::TestrunRequest {
                    lease: None,
                    on_lease: None,
                    series: None,
                    device: ots::protocol::DeviceSpec::parse("devicegroup:soak").unwrap(),
                    image: "i".into(),
                    packages: vec!["a".into(), "b".into()],
                    distribution: ots::protocol::Distribution::Perpackage,
                    timeout_secs: 60,
                    options: Default::default(),
                    queue_anyway: false,
                    secrets: Default::default(),
                    owner: None,
                    inputs: Vec::new(),
                    priority: Default::default(),
                    devices: Vec::new(),
                    notify: Vec::new(),
                }))
                .unwrap();
            last = run;
        }
        submitted += wave;
        let deadline = Instant::now() + LIMIT;
        loop {
            let open = rt
                .block_on(client.runs(Some(ots::protocol::RunState::Queued), None, 1))
                .unwrap()
                .len()
                + rt.block_on(client.runs(Some(ots::protocol::RunState::Running), None, 1))
                    .unwrap()
                    .len();
            if open == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the soak's testruns did not finish"
            );
            std::thread::sleep(Duration::from_millis(100)); // polling interval, bounded by the deadline
        }
        let st = rt.block_on(client.status(&last)).unwrap();
        assert_eq!(st.verdict, Some(ots::protocol::Verdict::Pass), "{st:?}");
        if submitted >= 500 && after_500.is_none() {
            after_500 = Some(rss_mib(pid));
        }
        if submitted.is_multiple_of(1000) {
            println!(
                "  soak: RSS after {submitted} testruns: {:.1} MiB",
                rss_mib(pid)
            );
        }
    }
    let last = rss_mib(pid);
    let first = after_500.unwrap_or(last);
    println!(
        "soak: {runs} testruns of 2 tasks through 3 workers in {:.0} s; server RSS after 500: {first:.1} MiB, after {runs}: {last:.1} MiB ({:+.1} MiB; goal: within 10)",
        started.elapsed().as_secs_f64(),
        last - first
    );
}

fn main() {
    let big = env_u64("OTS_BENCH_HISTORY_RUNS", 100_000);
    let asks = env_u64("OTS_BENCH_HISTORY_ASKS", 100);
    let workers = env_u64("OTS_BENCH_WORKERS", 10) as usize;
    let dir =
        tempfile::tempdir_in(std::env::var("OTS_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()))
            .or_else(|_| tempfile::tempdir())
            .unwrap();
    let t = template(&dir.path().join("template"));
    let mut all = Vec::new();
    for n in [1_000, big] {
        println!("history of {n} ended testruns:");
        let f = measure(dir.path(), &t, n, asks, workers);
        println!(
            "  RSS after start {:.1} MiB; first answer {:.0} ms after start; PostgreSQL takeover (SIGKILL to first answer, lease_ttl 1 s) {:.0} ms",
            f.rss_mib,
            ms(f.first_answer),
            ms(f.takeover)
        );
        println!(
            "  with {workers} workers streaming, median / worst of {}: status of an old testrun {:.2} / {:.2} ms, runs --limit 50 {:.2} / {:.2} ms, dashboard /runs {:.2} / {:.2} ms; longest gap between loop ticks {:.1} ms (heartbeat 1000 ms: {:.1} ms late)",
            f.asked, f.status.0, f.status.1, f.runs.0, f.runs.1, f.page.0, f.page.1, f.tick_gap_ms, f.tick_late_ms
        );
        all.push((n, f));
    }
    let soak_runs = env_u64("OTS_BENCH_SOAK_RUNS", 5_000);
    if soak_runs > 0 {
        soak(dir.path(), soak_runs);
    }
    let (base, large) = (&all[0].1, &all[1].1);
    println!(
        "{} vs 1000 ended testruns: RSS {:+.1} MiB (goal: within 20), start {:+.0} ms and takeover {:+.0} ms (goal: within 1000); worst request {:.1} ms (goal: 50); longest tick {:.1} ms (goal: 50)",
        all[1].0,
        large.rss_mib - base.rss_mib,
        ms(large.first_answer) - ms(base.first_answer),
        ms(large.takeover) - ms(base.takeover),
        [large.status.1, large.runs.1, large.page.1]
            .into_iter()
            .fold(0.0, f64::max),
        large.tick_late_ms
    );
}
