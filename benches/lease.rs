//! Benchmark: a lease's console and its grant, with the real binaries
//! (secured), a fake board on a pseudo-terminal (an echo thread here):
//!
//! 1. keystroke round trip — one byte written into `ots-submit console`'s
//!    stdin until its echo comes out of its stdout, through server,
//!    worker and board — beside a direct pty echo (write to the board's
//!    pty, read the echo) measured in the same run: median and p99;
//! 2. console output of a board printing as fast as the pty allows:
//!    bytes per second reaching the attached console, the transcript
//!    written meanwhile, and every byte accounted (received + reported
//!    lost = produced);
//! 3. grant latency: from the server ending the task that occupied the
//!    only matching worker to the waiting lease being granted (both from
//!    the server's own log timestamps).
//!
//! `cargo bench --bench lease` (OTS_BENCH_LEASE_KEYS, default 500;
//! OTS_BENCH_LEASE_FLOOD_SECS, default 5; OTS_BENCH_LEASE_GRANTS, 10).

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use serialport::SerialPort;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(60);

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A pty board: echoes what it reads; while `flood` is set prints lines
/// as fast as the pty takes them, counting the bytes.
struct Board {
    slave_path: String,
    flood: Arc<AtomicBool>,
    produced: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

fn board() -> Board {
    let (mut master, slave) = serialport::TTYPort::pair().unwrap();
    let slave_path = slave.name().unwrap();
    master.set_timeout(Duration::from_millis(5)).unwrap();
    let flood = Arc::new(AtomicBool::new(false));
    let produced = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (f, p, s) = (flood.clone(), produced.clone(), stop.clone());
    std::thread::spawn(move || {
        let _slave = slave;
        let line: Vec<u8> = (0..79)
            .map(|i| b'a' + (i % 26) as u8)
            .chain([b'\n'])
            .collect();
        let chunk: Vec<u8> = line.repeat(200);
        let mut buf = [0u8; 4096];
        while !s.load(Ordering::SeqCst) {
            if f.load(Ordering::SeqCst) {
                if let Ok(n) = master.write(&chunk) {
                    p.fetch_add(n as u64, Ordering::SeqCst);
                }
                // Drain what the worker may write (nothing in a flood).
                master.set_timeout(Duration::from_millis(0)).ok();
                let _ = master.read(&mut buf);
                master.set_timeout(Duration::from_millis(5)).ok();
                continue;
            }
            if let Ok(n) = master.read(&mut buf) {
                if n > 0 {
                    let _ = master.write_all(&buf[..n]);
                }
            }
        }
    });
    Board {
        slave_path,
        flood,
        produced,
        stop,
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Seconds of the day from a log line's RFC 3339 timestamp.
fn stamp_secs(line: &str) -> Option<f64> {
    let t = line.split_whitespace().next()?;
    let time = t.split('T').nth(1)?.trim_end_matches('Z');
    let mut parts = time.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

fn main() {
    let keys_n = env_u64("OTS_BENCH_LEASE_KEYS", 500) as usize;
    let flood_secs = env_u64("OTS_BENCH_LEASE_FLOOD_SECS", 5);
    let grants = env_u64("OTS_BENCH_LEASE_GRANTS", 10) as usize;
    let dir = tempfile::tempdir().unwrap();
    let server = start_fresh_server(dir.path(), &[]);
    let b = board();
    let link = dir.path().join("console");
    std::os::unix::fs::symlink(&b.slave_path, &link).unwrap();
    let conductor = script(
        dir.path(),
        "gate.sh",
        &format!(
            "while [ ! -e {:?}/$1.go ]; do sleep 0.01; done\necho '<testsuite><testcase name=\"b\"/></testsuite>' > \"$OTS_RESULTS_DIR/r.xml\"",
            dir.path().display().to_string()
        ),
    );
    let w = start_worker(
        dir.path(),
        "w",
        "devicegroup:bench",
        &server,
        &[conductor.to_str().unwrap(), "{run_id}"],
        &[("OTS_WORKER_SERIAL__PORT", link.to_str().unwrap())],
    );
    assert!(w.stderr.wait_for("console open", LIMIT).is_some());
    wait_for_workers(&server, LIMIT, all_idle(&["w"]));

    // --- 1. keystroke round trip ------------------------------------
    let out = submit(&server, &["reserve", "devicegroup:bench", "--wait"], LIMIT);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lease = text(&out.stdout).trim().to_string();
    let mut cmd = std::process::Command::new(bin("ots-submit"));
    cmd.args(["console", &lease, "--since", "0s"])
        .env("OTS_SERVER", &server.control)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    submit_env(&mut cmd, &server, &server.user);
    let mut con = cmd.spawn().unwrap();
    let mut stdin = con.stdin.take().unwrap();
    let mut stdout = con.stdout.take().unwrap();
    let mut stderr = std::io::BufReader::new(con.stderr.take().unwrap());
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let received = Arc::new(AtomicU64::new(0));
    let r2 = received.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 * 1024];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                return;
            }
            r2.fetch_add(n as u64, Ordering::SeqCst);
            if tx.send(buf[..n].to_vec()).is_err() {
                // The round trips are over: only count from now on.
                continue;
            }
        }
    });
    let lost = Arc::new(AtomicU64::new(0));
    {
        let mut first = String::new();
        std::io::BufRead::read_line(&mut stderr, &mut first).unwrap();
        assert!(first.contains("you may type"), "{first}");
        let lost = lost.clone();
        std::thread::spawn(move || {
            for line in std::io::BufRead::lines(stderr).map_while(Result::ok) {
                if let Some(n) = line
                    .strip_prefix("\r[ots: ")
                    .or_else(|| line.strip_prefix("[ots: "))
                    .and_then(|l| l.split_whitespace().next())
                    .and_then(|n| n.parse::<u64>().ok())
                {
                    if line.contains("lost here") {
                        lost.fetch_add(n, Ordering::SeqCst);
                    }
                }
            }
        });
    }
    let wait_for = |want: u8| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let got = rx.recv_timeout(left).expect("echo within 10 s");
            if got.contains(&want) {
                return;
            }
        }
    };
    // Warm up.
    for _ in 0..20 {
        stdin.write_all(b"w").unwrap();
        stdin.flush().unwrap();
        wait_for(b'w');
    }
    let mut through = Vec::with_capacity(keys_n);
    for i in 0..keys_n {
        let key = b'A' + (i % 26) as u8;
        let t = Instant::now();
        stdin.write_all(&[key]).unwrap();
        stdin.flush().unwrap();
        wait_for(key);
        through.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    // Baseline: a direct pty echo in the same run.
    let direct_board = board();
    let mut direct = serialport::new(&direct_board.slave_path, 115_200)
        .timeout(Duration::from_secs(5))
        .open_native()
        .unwrap();
    let mut base = Vec::with_capacity(keys_n);
    let mut one = [0u8; 1];
    for i in 0..keys_n {
        let key = b'A' + (i % 26) as u8;
        let t = Instant::now();
        direct.write_all(&[key]).unwrap();
        loop {
            direct.read_exact(&mut one).unwrap();
            if one[0] == key {
                break;
            }
        }
        base.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    direct_board.stop.store(true, Ordering::SeqCst);
    through.sort_by(f64::total_cmp);
    base.sort_by(f64::total_cmp);
    println!(
        "keystroke round trip through ots (secured): median {:.2} ms, p99 {:.2} ms ({keys_n} keys)",
        percentile(&through, 0.5),
        percentile(&through, 0.99)
    );
    println!(
        "keystroke round trip, direct pty echo (baseline): median {:.3} ms, p99 {:.3} ms",
        percentile(&base, 0.5),
        percentile(&base, 0.99)
    );

    // --- 2. console output throughput --------------------------------
    let before_rx = received.load(Ordering::SeqCst);
    let before_prod = b.produced.load(Ordering::SeqCst);
    drop(rx); // from here the reader only counts
    b.flood.store(true, Ordering::SeqCst);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(flood_secs) {
        std::thread::sleep(Duration::from_millis(100)); // the measured interval itself
    }
    b.flood.store(false, Ordering::SeqCst);
    // The board's last write may still be under way: its count settles.
    let mut produced = b.produced.load(Ordering::SeqCst);
    loop {
        std::thread::sleep(Duration::from_millis(50)); // settling interval
        let now = b.produced.load(Ordering::SeqCst);
        if now == produced {
            break;
        }
        produced = now;
    }
    let produced = produced - before_prod;
    // Until everything produced is received or reported lost (or 30 s).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = (0, Instant::now());
    loop {
        let got = received.load(Ordering::SeqCst) - before_rx + lost.load(Ordering::SeqCst);
        if got >= produced || Instant::now() > deadline {
            break;
        }
        if got != last.0 {
            last = (got, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(5) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20)); // polling interval, bounded by the deadline
    }
    let elapsed = last
        .1
        .max(t0 + Duration::from_secs(flood_secs))
        .duration_since(t0)
        .as_secs_f64();
    let got = received.load(Ordering::SeqCst) - before_rx;
    let lost_n = lost.load(Ordering::SeqCst);
    println!(
        "console output: {:.2} MB/s reached the console ({} of {} bytes produced in {flood_secs} s, {} reported lost, {} unaccounted)",
        got as f64 / elapsed / 1e6,
        got,
        produced,
        lost_n,
        produced as i64 - got as i64 - lost_n as i64
    );
    let _ = con.kill();
    let _ = con.wait();
    let out = submit(&server, &["release", &lease], LIMIT);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let st = wait_status(&server, &lease, LIMIT, finished);
    let t = &st["tasks"][0];
    println!(
        "transcript: {} lines stored, {} produced by the worker",
        t["log_lines_stored"], t["log_lines_produced"]
    );

    // --- 3. grant latency ---------------------------------------------
    let mut lat = Vec::new();
    for _ in 0..grants {
        wait_for_workers(&server, LIMIT, all_idle(&["w"]));
        let run = submit_run(
            &server,
            &[
                "--device",
                "devicegroup:bench",
                "--image",
                "i",
                "--packages",
                "p",
            ],
        );
        wait_status(&server, &run, LIMIT, running);
        let out = submit(&server, &["reserve", "devicegroup:bench"], LIMIT);
        let lease = text(&out.stdout).trim().to_string();
        std::fs::write(dir.path().join(format!("{run}.go")), "").unwrap();
        let deadline = Instant::now() + LIMIT;
        let granted = loop {
            let found =
                server.proc.stderr.all().into_iter().find(|l| {
                    l.contains("lease granted") && l.contains(&format!("lease={lease} "))
                });
            if let Some(line) = found {
                break line;
            }
            assert!(Instant::now() < deadline, "lease {lease} never granted");
            std::thread::sleep(Duration::from_millis(20)); // polling interval, bounded by the deadline
        };
        let ended = server
            .proc
            .stderr
            .all()
            .into_iter()
            .find(|l| l.contains("task ended") && l.contains(&format!("task={run}.1")))
            .expect("the task's end is logged");
        let (a, g) = (stamp_secs(&ended).unwrap(), stamp_secs(&granted).unwrap());
        lat.push((g - a) * 1000.0);
        let out = submit(&server, &["release", &lease], LIMIT);
        assert!(out.status.success(), "{}", text(&out.stderr));
        wait_status(&server, &lease, LIMIT, finished);
    }
    lat.sort_by(f64::total_cmp);
    println!(
        "lease grant after the worker's task ended: median {:.1} ms, worst {:.1} ms ({grants} grants)",
        percentile(&lat, 0.5),
        lat.last().copied().unwrap_or(f64::NAN)
    );
    b.stop.store(true, Ordering::SeqCst);
}
