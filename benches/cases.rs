//! Benchmark (issue 37): storing the test cases of a large JUnit file
//! with the real release binaries (secured, loopback), on SQLite and on
//! PostgreSQL: a conductor writes a result file of 100 000 cases (one in
//! ten failing) while a second worker streams log lines (so the serving
//! loop commits all the while); printed: the time from submit to the
//! testrun's end, the serving loop's longest tick gap beyond the
//! heartbeat meanwhile (`ots_loop_tick_gap_max_seconds`, heartbeat
//! 100 ms), the time to list the failing cases, and the state
//! database's growth per million cases (SQLite: the file; PostgreSQL:
//! `pg_total_relation_size('cases')`). Beside them, as the baseline of
//! the same run: the same testrun with a 10-case file.
//!
//! `cargo bench --bench cases` (OTS_BENCH_CASES, default 100000).

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use std::path::Path;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(600);

fn dir_bytes(path: &Path) -> u64 {
    std::fs::read_dir(path)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("ots.db"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

struct Figures {
    took: Duration,
    late_ms: f64,
    listed: Duration,
    failing: usize,
}

/// One testrun whose result file has `n` cases.
fn one(server: &ServerProc, metrics: &str, n: u64) -> Figures {
    let _ = tick_gap(metrics) * 1e3; // resets the maximum
    let started = Instant::now();
    let run = submit_run(
        server,
        &[
            "--device",
            "devicegroup:junit",
            "--image",
            "i",
            "--packages",
            &n.to_string(),
        ],
    );
    let st = wait_status(server, &run, LIMIT, finished);
    let took = started.elapsed();
    let late_ms = (tick_gap(metrics) * 1e3 - 100.0).max(0.0);
    assert_eq!(st["tasks"][0]["cases"]["cases"].as_u64(), Some(n), "{st}");
    let t0 = Instant::now();
    let out = submit(server, &["cases", &run, "--failed", "--json"], LIMIT);
    let listed = t0.elapsed();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let failing: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    Figures {
        took,
        late_ms,
        listed,
        failing: failing.as_array().unwrap().len(),
    }
}

fn lab(dir: &Path, name: &str, database: Option<&str>, n: u64) {
    let dir = dir.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let junit = script(
        &dir,
        "junit.sh",
        "mkdir -p \"$OTS_RESULTS_DIR\"\n\
         python3 -c '\nimport sys\nn = int(sys.argv[1])\nout = open(sys.argv[2], \"w\")\nout.write(\"<testsuites><testsuite name=\\\"bench\\\">\")\nfor i in range(n):\n    if i % 10 == 9:\n        out.write(\"<testcase classname=\\\"bench.mod%d\\\" name=\\\"test_%d\\\" time=\\\"0.001\\\"><failure message=\\\"assert %d == 0\\\">trace</failure></testcase>\" % (i % 50, i, i))\n    else:\n        out.write(\"<testcase classname=\\\"bench.mod%d\\\" name=\\\"test_%d\\\" time=\\\"0.001\\\"/>\" % (i % 50, i))\nout.write(\"</testsuite></testsuites>\")\n' \"$1\" \"$OTS_RESULTS_DIR/junit.xml\"\nexit 1\n",
    );
    let streamer = script(
        &dir,
        "stream.sh",
        "python3 -c '\nimport sys, time\nt0 = time.monotonic()\nn = 0\nwhile time.monotonic() - t0 < 600:\n    sys.stdout.write(\"\".join(\"streamed line %d\\n\" % (n + i) for i in range(20)))\n    sys.stdout.flush(); n += 20; time.sleep(0.01)\n'\n",
    );
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut env = vec![
        ("OTS_SERVER_METRICS", metrics.as_str()),
        ("OTS_SERVER_HEARTBEAT_INTERVAL_MS", "100"),
    ];
    if let Some(url) = database {
        env.push(("OTS_SERVER_DATABASE", url));
    }
    let server = start_fresh_server(&dir, &env);
    let _j = start_worker(
        &dir,
        "junit",
        "devicegroup:junit",
        &server,
        &[junit.to_str().unwrap(), "{packages}"],
        &[],
    );
    let _s = start_worker(
        &dir,
        "stream",
        "devicegroup:stream",
        &server,
        &[streamer.to_str().unwrap()],
        &[],
    );
    assert!(wait_for_workers(
        &server,
        LIMIT,
        all_idle(&["junit", "stream"])
    ));
    let busy = submit_run(
        &server,
        &[
            "--device",
            "devicegroup:stream",
            "--image",
            "i",
            "--packages",
            "s",
            "--timeout",
            "20m",
        ],
    );
    wait_status(&server, &busy, LIMIT, running);
    let size = || match database {
        None => dir_bytes(&server.state_dir),
        Some(url) => {
            let db = url.rsplit('/').next().unwrap().to_string();
            pg::cluster()
                .psql(&db, "SELECT pg_total_relation_size('cases')")
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0)
        }
    };
    let base = one(&server, &metrics, 10);
    let before = size();
    let big = one(&server, &metrics, n);
    let after = size();
    println!(
        "{name}: a {n}-case JUnit file stored and recorded in {:.2} s (10 cases: {:.2} s); longest loop tick beyond the 100 ms heartbeat meanwhile {:.1} ms (10 cases: {:.1} ms); its {} failing cases listed in {:.0} ms; state database +{:.0} MiB per million cases",
        big.took.as_secs_f64(),
        base.took.as_secs_f64(),
        big.late_ms,
        base.late_ms,
        big.failing,
        big.listed.as_secs_f64() * 1e3,
        after.saturating_sub(before) as f64 / n as f64 * 1e6 / (1 << 20) as f64
    );
    let _ = submit(&server, &["cancel", &busy], LIMIT);
}

fn main() {
    let n: u64 = std::env::var("OTS_BENCH_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let dir =
        tempfile::tempdir_in(std::env::var("OTS_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()))
            .or_else(|_| tempfile::tempdir())
            .unwrap();
    lab(dir.path(), "SQLite", None, n);
    let url = pg::cluster().database();
    lab(dir.path(), "PostgreSQL", Some(&url), n);
}
