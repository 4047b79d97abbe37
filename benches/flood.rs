//! Benchmark: a conductor running `yes` past its task's log limit
//! (issue 25, "no work for lines nobody will store"). A real release
//! `ots-server` and `ots-worker`, secured, over loopback; the task's log
//! is capped at `OTS_BENCH_FLOOD_LOG_MIB` (default 256, the default
//! `limits.max_task_log_bytes`); the conductor runs `yes`. Two rounds in one
//! run, each with a fresh server and worker:
//!
//! - **told**: the worker hears `log_full` and stops sending the task's
//!   lines, counting them only;
//! - **ignored** (the same-run baseline): the worker ignores `log_full`
//!   (`OTS_TEST_IGNORE_LOG_FULL`), as a third-party worker may, and every
//!   line still reaches the server to be refused there — what ots did
//!   before the message existed.
//!
//! For each: how long the log took to fill and the server's CPU meanwhile
//! (ingestion), then the server's and the worker's CPU (% of one core)
//! over `OTS_BENCH_FLOOD_SECS` (default 10) of flooding a full log, and
//! the accounting at the end (stored + lost = produced).
//!
//! `cargo bench --bench flood`

#[path = "../tests/common/mod.rs"]
mod common;

use common::zmtp::cpu_ticks;
use common::*;
use std::time::{Duration, Instant};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Clock ticks per second of /proc/PID/stat (USER_HZ).
fn ticks_per_sec() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64
}

struct Round {
    fill_secs: f64,
    fill_server_cpu: f64,
    full_server_cpu: f64,
    full_worker_cpu: f64,
    produced: u64,
    stored: u64,
    lost: u64,
    refused_at_server: u64,
    told: u64,
}

fn round(log_mib: u64, window: Duration, ignore: bool) -> Round {
    let dir = tempfile::tempdir().expect("temp dir");
    let limit = (log_mib << 20).to_string();
    let server = start_fresh_server(
        dir.path(),
        &[("OTS_SERVER_LIMITS__MAX_TASK_LOG_BYTES", limit.as_str())],
    );
    let stop = dir.path().join("stop");
    // `yes` until the bench says stop (the conductor polls a file: it
    // stands for a test that floods its output for as long as it runs).
    let conductor = script(
        dir.path(),
        "yes.sh",
        &format!(
            "yes &\n\
             pid=$!\nwhile [ ! -e {stop:?} ]; do sleep 0.05; done\nkill $pid\nwait $pid\nexit 0\n"
        ),
    );
    let env: &[(&str, &str)] = if ignore {
        &[("OTS_TEST_IGNORE_LOG_FULL", "1")]
    } else {
        &[]
    };
    let worker = start_worker(
        dir.path(),
        "w1",
        "devicegroup:flood",
        &server,
        &[conductor.to_str().expect("utf-8 path")],
        env,
    );
    assert!(
        wait_for_workers(&server, Duration::from_secs(30), all_idle(&["w1"])),
        "the worker did not register"
    );
    let (spid, wpid) = (server.proc.child.id() as i32, worker.child.id() as i32);
    let hz = ticks_per_sec();
    let mark = server.proc.stderr.len();
    let (s0, t0) = (cpu_ticks(spid), Instant::now());
    let run = submit_run(
        &server,
        &[
            "--device",
            "devicegroup:flood",
            "--image",
            "bench",
            "--packages",
            "p",
        ],
    );
    assert!(
        server
            .proc
            .stderr
            .wait_for_after(mark, "task log full", Duration::from_secs(600))
            .is_some(),
        "the log did not fill: {:?}",
        server.proc.stderr.all()
    );
    let fill_secs = t0.elapsed().as_secs_f64();
    let fill_server_cpu = (cpu_ticks(spid) - s0) as f64 / hz / fill_secs * 100.0;
    // The flood goes on against a full log.
    let (s1, w1, t1) = (cpu_ticks(spid), cpu_ticks(wpid), Instant::now());
    std::thread::sleep(window); // the measurement window itself, not a synchronisation
    let secs = t1.elapsed().as_secs_f64();
    let full_server_cpu = (cpu_ticks(spid) - s1) as f64 / hz / secs * 100.0;
    let full_worker_cpu = (cpu_ticks(wpid) - w1) as f64 / hz / secs * 100.0;
    std::fs::write(&stop, "").expect("stop file");
    let st = wait_status(&server, &run, Duration::from_secs(600), finished);
    let (produced, stored, lost) = log_accounting(&st["tasks"][0]);
    assert_eq!(stored + lost, produced, "accounting: {st:#}");
    Round {
        fill_secs,
        fill_server_cpu,
        full_server_cpu,
        full_worker_cpu,
        produced,
        stored,
        lost,
        refused_at_server: st["counters"]["log_lines_over_limit"].as_u64().unwrap_or(0),
        told: st["counters"]["log_full_told"].as_u64().unwrap_or(0),
    }
}

fn main() {
    let log_mib = env_or("OTS_BENCH_FLOOD_LOG_MIB", 256);
    let window = Duration::from_secs(env_or("OTS_BENCH_FLOOD_SECS", 10));
    println!(
        "yes flood past a {log_mib} MiB task log (release, secured, loopback, {} cores); \
         CPU in % of one core over {} s of flooding a full log",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        window.as_secs()
    );
    for (name, ignore) in [("ignored (baseline)", true), ("told", false)] {
        let r = round(log_mib, window, ignore);
        println!(
            "  log_full {name:<18}: filled in {:.1} s (server {:.0} % while ingesting); \
             full: server {:.1} %, worker {:.1} %; {} produced = {} stored + {} lost; \
             {} refused at the server; told {} times",
            r.fill_secs,
            r.fill_server_cpu,
            r.full_server_cpu,
            r.full_worker_cpu,
            r.produced,
            r.stored,
            r.lost,
            r.refused_at_server,
            r.told
        );
    }
}
