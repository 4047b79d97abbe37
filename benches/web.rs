//! Benchmark: the web dashboard against the real release binaries
//! (secured, loopback).
//!
//! 1. Time to first lines of a task whose stored log is 1 GiB: the log
//!    page (HTML with the tail) and the API's tail, as a browser asks for
//!    them, beside reading the same bytes off the end of the log file
//!    directly (the floor) in the same run. Medians of 20, max printed.
//! 2. 100 live views (server-sent event streams, as 100 browser tabs
//!    would hold them) of a task printing 10 000 lines/s: the server's
//!    CPU and the serving loop's longest tick gap
//!    (`ots_loop_tick_gap_max_seconds`), beside the same task with no
//!    view in the same run, and the lines each view received.
//!
//! `cargo bench --bench web` (OTS_BENCH_LOG_MIB: the big log's size,
//! default 1024; OTS_BENCH_VIEWS, default 100).

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Live views one user may keep open (src/web/live.rs).
const MAX_STREAMS_PER_USER: usize = 32;

const LIMIT: Duration = Duration::from_secs(600);

fn median(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], *v.last().unwrap())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// utime + stime of `pid` in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

fn web_url(server: &ServerProc) -> String {
    let line = server
        .proc
        .stderr
        .wait_for("web dashboard listening", LIMIT)
        .expect("dashboard started");
    let start = line.find("url=").unwrap() + 4;
    line[start..].split_whitespace().next().unwrap().to_string()
}

fn sign_in(server: &ServerProc) -> String {
    let out = submit(server, &["web"], LIMIT);
    assert!(out.status.success(), "{}", text(&out.stderr));
    http::sign_in(text(&out.stdout).lines().last().unwrap().trim())
}

fn main() {
    let log_mib: u64 = std::env::var("OTS_BENCH_LOG_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1024);
    let views: usize = std::env::var("OTS_BENCH_VIEWS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let dir =
        tempfile::tempdir_in(std::env::var("OTS_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()))
            .or_else(|_| tempfile::tempdir())
            .unwrap();
    let metrics = format!("127.0.0.1:{}", free_port());
    let log_limit = ((log_mib + 64) << 20).to_string();
    let server = start_fresh_server(
        dir.path(),
        &[
            ("OTS_SERVER_WEB", "127.0.0.1:0"),
            ("OTS_SERVER_METRICS", &metrics),
            ("OTS_SERVER_LIMITS__MAX_TASK_LOG_BYTES", &log_limit),
        ],
    );
    let base = web_url(&server);
    // `big`: 1 GiB of 100-byte lines, as fast as the pipeline takes them.
    // `paced`: 10 000 lines/s (100 every 10 ms) for OTS_BENCH_SECS.
    let conductor = script(
        dir.path(),
        "web-bench.sh",
        &format!(
            "case \"$1\" in\n\
             big) yes 'the quick brown fox jumps over the lazy dog, a line of a long log: 0123456789 abcdefghijklmno' | head -c {} ;;\n\
             paced*) python3 -c '\nimport sys, time\nsecs = float(sys.argv[1]); t0 = time.monotonic(); n = 0\nwhile time.monotonic() - t0 < secs:\n    due = t0 + n / 10000.0\n    now = time.monotonic()\n    if due > now: time.sleep(due - now)\n    sys.stdout.write(\"\".join(\"paced line %d of the live view bench\\n\" % (n + i) for i in range(100)))\n    sys.stdout.flush(); n += 100\n' \"${{1#paced-}}\" ;;\n\
             esac\n\
             mkdir -p \"$OTS_RESULTS_DIR\"; echo '<testsuite><testcase name=\"t\"/></testsuite>' > \"$OTS_RESULTS_DIR/r.xml\"",
            log_mib << 20
        ),
    );
    let _w = start_worker(
        dir.path(),
        "wb",
        "devicegroup:webbench",
        &server,
        &[conductor.to_str().unwrap(), "{packages}"],
        &[],
    );
    assert!(wait_for_workers(&server, LIMIT, all_idle(&["wb"])));
    let cookie = sign_in(&server);

    // 1. A 1 GiB log.
    let started = Instant::now();
    let run = submit_run(
        &server,
        &[
            "--device",
            "devicegroup:webbench",
            "--image",
            "i",
            "--packages",
            "big",
            "--timeout",
            "30m",
        ],
    );
    let st = wait_status(&server, &run, LIMIT, finished);
    let task = st["tasks"][0]["task"].as_str().unwrap().to_string();
    let log = server.state_dir.join("tasks").join(&task).join("log");
    let size = std::fs::metadata(&log).unwrap().len();
    println!(
        "stored a {:.0} MiB log ({} lines) in {:.1} s",
        size as f64 / (1 << 20) as f64,
        st["tasks"][0]["log_lines_stored"],
        started.elapsed().as_secs_f64()
    );
    let mut page = Vec::new();
    let mut api = Vec::new();
    let mut floor = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let r = http::get(&base, &format!("/tasks/{task}/log"), Some(&cookie));
        page.push(t.elapsed());
        assert_eq!(r.status, 200);
        assert!(r.text().contains("lazy dog"), "no lines on the page");
        let t = Instant::now();
        let r = http::get(&base, &format!("/api/tasks/{task}/log"), Some(&cookie));
        api.push(t.elapsed());
        assert_eq!(r.status, 200);
        let t = Instant::now();
        let mut f = std::fs::File::open(&log).unwrap();
        use std::io::Seek;
        f.seek(std::io::SeekFrom::End(-65536)).unwrap();
        let mut buf = vec![0; 65536];
        f.read_exact(&mut buf).unwrap();
        floor.push(t.elapsed());
    }
    let (pm, px) = median(page);
    let (am, ax) = median(api);
    let (fm, fx) = median(floor);
    println!(
        "time to first lines of the {:.0} MiB log (median / max of 20):",
        size as f64 / (1 << 20) as f64
    );
    println!(
        "  log page (HTML, last 64 KiB):   {:8.2} ms / {:8.2} ms",
        ms(pm),
        ms(px)
    );
    println!(
        "  /api/tasks/ID/log (tail JSON):  {:8.2} ms / {:8.2} ms",
        ms(am),
        ms(ax)
    );
    println!(
        "  baseline: read the file's last 64 KiB directly: {:.3} ms / {:.3} ms",
        ms(fm),
        ms(fx)
    );

    // 1b. The whole log searched by the server (64 MiB pieces on its file
    // desk), and a line found by number, while the loop's longest tick
    // is watched; beside a plain scan of the file in this process.
    whole_log_search(&base, &cookie, &task, &log, &metrics, size);

    // 2. Live views of a task printing 10 000 lines/s.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let viewers: Vec<String> = (0..views.div_ceil(MAX_STREAMS_PER_USER))
        .map(|k| {
            // Operators: they may watch the testrun the bench submitted.
            let user = format!("viewer{k}");
            if let Some(keys) = &server.keys {
                keys.user(&user, "operator");
            }
            wait_allowed(&server, &user);
            let out = server.as_user(&user).submit(&["web"], LIMIT);
            assert!(out.status.success(), "{}", text(&out.stderr));
            let cookie = http::sign_in(text(&out.stdout).lines().last().unwrap().trim());
            format!("ots_session={cookie}")
        })
        .collect();
    let secs = std::env::var("OTS_BENCH_SECS").unwrap_or_else(|_| "12".into());
    let pid = server.proc.child.id();
    let mut results = Vec::new();
    for n in [0, views] {
        let run = submit_run(
            &server,
            &[
                "--device",
                "devicegroup:webbench",
                "--image",
                "i",
                "--packages",
                &format!("paced-{secs}"),
            ],
        );
        let st = wait_status(&server, &run, LIMIT, |st| {
            st["tasks"][0]["state"] == "running"
        });
        let task = st["tasks"][0]["task"].as_str().unwrap().to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let fewest = Arc::new(AtomicU64::new(u64::MAX));
        let mut readers = Vec::new();
        for i in 0..n {
            let (stop, received) = (stop.clone(), received.clone());
            // A user may keep 32 live views open: the views are spread
            // over as many users as that takes.
            let c = &viewers[i / MAX_STREAMS_PER_USER];
            let request = format!(
                "GET /api/tasks/{task}/log/stream?from=0 HTTP/1.1\r\nHost: x\r\n{}\r\n\r\n",
                format_args!("Cookie: {c}")
            );
            // Each user from an address of its own, as people at their
            // machines (the dashboard lets 64 connections in per address).
            let from = [127, 0, 0, 2 + (i / MAX_STREAMS_PER_USER) as u8];
            let mut s = http::connect_from(&rt, from, &base);
            let fewest = fewest.clone();
            readers.push(std::thread::spawn(move || {
                s.set_read_timeout(Some(Duration::from_millis(200)))
                    .unwrap();
                s.write_all(request.as_bytes()).unwrap();
                let mut buf = vec![0u8; 1 << 16];
                let mut lines = 0u64;
                let mut head = true;
                let mut last = 0u8;
                while !stop.load(Ordering::Relaxed) {
                    match s.read(&mut buf) {
                        Ok(0) => break,
                        Ok(k) => {
                            if head {
                                assert!(
                                    buf.starts_with(b"HTTP/1.1 200"),
                                    "{}",
                                    String::from_utf8_lossy(&buf[..k.min(200)])
                                );
                                head = false;
                            }
                            // Each stored line arrives JSON-escaped: "\n"
                            // (which a read may cut in two).
                            if last == b'\\' && buf[0] == b'n' {
                                lines += 1;
                            }
                            lines += buf[..k].windows(2).filter(|w| w == b"\\n").count() as u64;
                            last = buf[k - 1];
                            if buf[..k].windows(10).any(|w| w == b"event: end") {
                                break;
                            }
                        }
                        Err(_) => continue,
                    }
                }
                received.fetch_add(lines, Ordering::Relaxed);
                fewest.fetch_min(lines, Ordering::Relaxed);
            }));
        }
        // Measure while the task prints (from its first second on).
        let _ = tick_gap(&metrics);
        let cpu0 = cpu_seconds(pid);
        let t0 = Instant::now();
        let window = Duration::from_secs(secs.parse::<u64>().unwrap().saturating_sub(3).max(2));
        let deadline = t0 + window;
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100)); // the measurement window's pace, not synchronisation
        }
        let cpu = (cpu_seconds(pid) - cpu0) / t0.elapsed().as_secs_f64();
        let gap = tick_gap(&metrics);
        let st = wait_status(&server, &run, LIMIT, finished);
        // Each view reads until its stream's `end` (a view that fell
        // behind catches up first); `stop` only bounds a broken one.
        let bound = std::thread::spawn({
            let stop = stop.clone();
            move || {
                std::thread::sleep(Duration::from_secs(60)); // the bound on a broken view, not synchronisation
                stop.store(true, Ordering::Relaxed);
            }
        });
        drop(bound);
        for r in readers {
            r.join().unwrap();
        }
        let stored = st["tasks"][0]["log_lines_stored"].as_u64().unwrap_or(0);
        let fewest = if n > 0 {
            fewest.load(Ordering::Relaxed)
        } else {
            0
        };
        results.push((
            n,
            cpu,
            gap,
            stored,
            received.load(Ordering::Relaxed),
            fewest,
        ));
    }
    println!("a task printing 10 000 lines/s for {secs} s, server measured over its middle:");
    for (n, cpu, gap, stored, received, fewest) in &results {
        let per_view = if *n > 0 {
            *received as f64 / *n as f64
        } else {
            0.0
        };
        println!(
            "  {n:3} live views: server CPU {:5.1} % of a core, longest tick gap {:.3} s (heartbeat 1 s); {stored} lines stored, {per_view:.0} received per view (the fewest: {fewest})",
            cpu * 100.0,
            gap
        );
    }
    drop(server);
}

/// Lines of `log` holding `needle`: `grep -c -F`, the baseline.
fn grep_count(log: &std::path::Path, needle: &str) -> u64 {
    let out = std::process::Command::new("grep")
        .args(["-c", "-F", needle])
        .arg(log)
        .output()
        .unwrap();
    text(&out.stdout).trim().parse().unwrap()
}

fn whole_log_search(
    base: &str,
    cookie: &str,
    task: &str,
    log: &std::path::Path,
    metrics: &str,
    size: u64,
) {
    let mib = size as f64 / (1 << 20) as f64;
    println!("whole-log search of the {mib:.0} MiB log, through the log page:");
    for (what, needle, query) in [
        (
            "a text on no line",
            "needle-on-no-line",
            "needle-on-no-line",
        ),
        ("a text on every line", "lazy dog", "lazy%20dog&m=1000000"),
    ] {
        // Searched again and again for at least 3 s, so the loop's
        // heartbeat ticks (1 s) fall inside: how late they were is how long
        // the loop was held.
        let mut page = Vec::new();
        let mut count = String::new();
        let _ = tick_gap(metrics);
        let t0 = Instant::now();
        while page.len() < 3 || t0.elapsed() < Duration::from_secs(3) {
            let t = Instant::now();
            let r = http::get(base, &format!("/tasks/{task}/log?q={query}"), Some(cookie));
            page.push(t.elapsed());
            assert_eq!(r.status, 200);
            count = r
                .text()
                .split("id=\"match-count\">")
                .nth(1)
                .and_then(|t| t.split('<').next())
                .unwrap_or("0")
                .to_string();
        }
        let late = (tick_gap(metrics) - 1.0).max(0.0);
        let runs = page.len();
        let mut floor = Vec::new();
        for _ in 0..3 {
            let t = Instant::now();
            let n = grep_count(log, needle);
            floor.push(t.elapsed());
            assert_eq!(count, n.to_string(), "the page's count differs from grep's");
        }
        let (pm, px) = median(page);
        let (fm, fx) = median(floor);
        println!(
            "  {what}: page {:6.0} ms / {:6.0} ms (median / max of {runs}; {count} lines, {:.0} MiB/s); the serving loop's heartbeat tick at most {:.0} ms late meanwhile",
            ms(pm),
            ms(px),
            mib / pm.as_secs_f64(),
            late * 1000.0
        );
        println!(
            "    baseline: grep -c -F on the log file: {:6.0} ms / {:6.0} ms",
            ms(fm),
            ms(fx)
        );
    }
    let mut line = Vec::new();
    for n in [1u64, 5_000_000, 10_000_000] {
        let t = Instant::now();
        let r = http::get(base, &format!("/tasks/{task}/log?line={n}"), Some(cookie));
        line.push(t.elapsed());
        assert_eq!(r.status, 200);
        assert!(
            r.text().contains(&format!("id=\"L{n}\"")),
            "line {n} not shown"
        );
    }
    let (lm, lx) = median(line);
    println!(
        "  a line by number (1, 5 000 000, 10 000 000): page {:.2} ms / {:.2} ms",
        ms(lm),
        ms(lx)
    );
}
