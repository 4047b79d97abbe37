//! Benchmark: a device's serial console at a sustained rate through a
//! pseudo-terminal pair (the test writes on the master like a device; the
//! real `ots-worker` reads the slave), while a task runs: whether every
//! byte is in the task's `serial.log`, and the worker's CPU and peak RSS.
//!
//! `cargo bench --bench console` (OTS_BENCH_CONSOLE_SECS, default 60;
//! OTS_BENCH_CONSOLE_RATE bytes per second, default 1 000 000).

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use serialport::SerialPort;
use std::io::Write;
use std::time::{Duration, Instant};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    ticks as f64 / 100.0
}

/// The console stream the record holds (see src/worker/console.rs).
fn reconstruct(record: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(record.len());
    for rec in record.split(|b| *b == b'\n') {
        if rec.len() < 27 {
            continue;
        }
        match rec[25] {
            b'|' => {
                out.extend_from_slice(&rec[27..]);
                out.push(b'\n');
            }
            b'+' => out.extend_from_slice(&rec[27..]),
            _ => {}
        }
    }
    out
}

fn main() {
    let secs = env_u64("OTS_BENCH_CONSOLE_SECS", 60);
    let rate = env_u64("OTS_BENCH_CONSOLE_RATE", 1_000_000);
    let dir = tempfile::tempdir().unwrap();
    let server = start_fresh_server(dir.path(), &[]);
    let (mut master, slave) = serialport::TTYPort::pair().expect("a pseudo-terminal pair");
    let link = dir.path().join("console");
    std::os::unix::fs::symlink(slave.name().unwrap(), &link).unwrap();
    let go = dir.path().join("go");
    let conductor = script(
        dir.path(),
        "wait.sh",
        &format!(
            "while [ ! -e {go:?} ]; do sleep 0.1; done\necho '<testsuite><testcase name=\"b\"/></testsuite>' > \"$OTS_RESULTS_DIR/r.xml\""
        ),
    );
    let ring = (secs * rate * 2).max(64 << 20).to_string();
    let worker = start_worker(
        dir.path(),
        "w",
        "devicegroup:bench",
        &server,
        &[conductor.to_str().unwrap()],
        &[
            ("OTS_WORKER_SERIAL__PORT", link.to_str().unwrap()),
            ("OTS_WORKER_SERIAL__RING_BYTES", ring.as_str()),
        ],
    );
    assert!(worker
        .stderr
        .wait_for("console open", Duration::from_secs(30))
        .is_some());
    let run = submit_run(
        &server,
        &[
            "--device",
            "devicegroup:bench",
            "--image",
            "i",
            "--packages",
            "p",
            "--queue-anyway",
        ],
    );
    wait_status(&server, &run, Duration::from_secs(60), running);
    // Console-like text: lines of 40–120 bytes, some binary noise.
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let pid = worker.child.id();
    let cpu0 = cpu_seconds(pid);
    let started = Instant::now();
    let mut sent = Vec::with_capacity((secs * rate) as usize);
    let chunk = (rate / 20).max(1) as usize; // 20 writes a second
    let mut written = 0u64;
    while written < secs * rate {
        let mut block = Vec::with_capacity(chunk);
        while block.len() < chunk {
            let len = 40 + (next() % 80) as usize;
            for _ in 0..len {
                let r = next();
                block.push(if r % 97 == 0 {
                    (r >> 8) as u8
                } else {
                    b'a' + (r % 26) as u8
                });
            }
            block.push(b'\n');
        }
        master.write_all(&block).unwrap();
        written += block.len() as u64;
        sent.extend_from_slice(&block);
        // Pacing the device at `rate` (what a UART does), not a synchronisation.
        let due = Duration::from_secs_f64(written as f64 / rate as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    let took = started.elapsed();
    // Let the console go quiet, then end the task.
    std::thread::sleep(Duration::from_millis(500)); // the reader's quiet period before the last piece
    let cpu = cpu_seconds(pid) - cpu0;
    std::fs::write(&go, "").unwrap();
    let st = wait_status(&server, &run, Duration::from_secs(120), finished);
    assert_eq!(st["verdict"], "PASS", "{st:#}");
    let out = dir.path().join("fetched");
    let o = submit(
        &server,
        &["fetch", &run, out.to_str().unwrap()],
        Duration::from_secs(300),
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let record = std::fs::read(out.join(format!("{run}.1")).join("serial.log")).unwrap();
    let stream = reconstruct(&record);
    let lost = if stream.ends_with(&sent) {
        0
    } else {
        sent.len().saturating_sub(stream.len()).max(1)
    };
    let (produced, stored, live_lost) = log_accounting(&st["tasks"][0]);
    println!(
        "console at {:.2} MB/s for {:.1} s: {} bytes sent, serial.log {} bytes reconstructing {} ({} lost); worker CPU {:.1} % of a core, peak RSS {} KiB; live lines stored {stored} of {produced} ({live_lost} not shown live)",
        written as f64 / took.as_secs_f64() / 1e6,
        took.as_secs_f64(),
        sent.len(),
        record.len(),
        stream.len(),
        if lost == 0 { "none".to_string() } else { format!("{lost} bytes") },
        cpu * 100.0 / took.as_secs_f64(),
        peak_rss_kib(pid),
    );
    drop(slave);
}
