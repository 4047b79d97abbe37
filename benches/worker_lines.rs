//! Benchmark: one real `ots-worker` whose conductor prints a million log
//! lines as fast as it can, against the real `ots-server` (both release
//! binaries, secured, over loopback): lines per second from the submit to
//! the verdict (every line read from the pipe, batched, sealed, sent,
//! stored and accounted for), and the worker's and the server's peak RSS.
//!
//! `cargo bench --bench worker_lines` (OTS_BENCH_LINES, default 1000000).

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use std::time::{Duration, Instant};

fn main() {
    let lines: u64 = std::env::var("OTS_BENCH_LINES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().expect("temp dir");
    let server = start_fresh_server(dir.path(), &[]);
    let chatty = script(
        dir.path(),
        "chatty.sh",
        &format!(
            "yes 'a test log line of a realistic length, with some words in it: ok' | head -n {lines}"
        ),
    );
    let worker = start_worker(
        dir.path(),
        "w1",
        "devicegroup:bench",
        &server,
        &[chatty.to_str().expect("utf-8 path")],
        &[],
    );
    assert!(
        wait_for_workers(&server, Duration::from_secs(30), all_idle(&["w1"])),
        "the worker did not register"
    );
    let started = Instant::now();
    let run = submit_run(
        &server,
        &[
            "--device",
            "devicegroup:bench",
            "--image",
            "bench",
            "--packages",
            "p",
        ],
    );
    let st = wait_status(&server, &run, Duration::from_secs(600), finished);
    let took = started.elapsed();
    let task = &st["tasks"][0];
    let (produced, stored, lost) = log_accounting(task);
    println!(
        "one ots-worker, {lines} lines: {:.0} lines/s from submit to verdict ({:.2} s); \
         {produced} produced, {stored} stored, {lost} lost; peak RSS: worker {} KiB, server {} KiB",
        lines as f64 / took.as_secs_f64(),
        took.as_secs_f64(),
        peak_rss_kib(worker.child.id()),
        peak_rss_kib(server.proc.child.id()),
    );
    if lost > 0 {
        for line in worker
            .stderr
            .all()
            .iter()
            .chain(server.proc.stderr.all().iter())
        {
            if line.contains("drop") || line.contains("lost") || line.contains("WARN") {
                println!("  {line}");
            }
        }
    }
}
