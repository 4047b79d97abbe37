//! Benchmark: result files from a real `ots-worker` to the real
//! `ots-server` (release binaries, secured, loopback), and `ots-submit
//! fetch` of them back, against two baselines measured in the same run on
//! the same file: a raw TCP copy over loopback (file → socket → file) and
//! `sha256sum` (the hash every transfer must compute: the floor).
//!
//! For each size: MB/s from the conductor's exit to the verdict, peak RSS
//! of server and worker, the worst answer time of the server to a ping
//! sent every 20 ms during the transfer (its event loop never waits for
//! the disk), the worker's disk beyond the file itself; then the fetch.
//!
//! `cargo bench --bench files` (OTS_BENCH_FILE_MIB, default "256,1024").

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1024 * 1024;

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

/// file → TCP over loopback → file, with 1 MiB buffers.
fn raw_tcp_copy(src: &Path, dst: &Path) -> Duration {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dst = dst.to_path_buf();
    let started = Instant::now();
    let receiver = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut out = std::fs::File::create(&dst).unwrap();
        let mut buf = vec![0u8; MIB as usize];
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n]).unwrap();
        }
        out.sync_all().unwrap();
    });
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let mut f = std::fs::File::open(src).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        s.write_all(&buf[..n]).unwrap();
    }
    drop(s);
    receiver.join().unwrap();
    started.elapsed()
}

fn sha256sum(path: &Path) -> Duration {
    let started = Instant::now();
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success());
    started.elapsed()
}

/// Bytes of the files below `dir`, each inode counted once (the
/// conductor hard-links the prepared file), excluding `skip`'s inode.
fn du_bytes(dir: &Path, skip: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let skip = std::fs::metadata(skip).map(|m| (m.dev(), m.ino())).ok();
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => {
                    let id = (m.dev(), m.ino());
                    if Some(id) != skip && seen.insert(id) {
                        total += m.blocks() * 512;
                    }
                }
                Err(_) => {}
            }
        }
    }
    total
}

/// Pings the server every 20 ms until `stop`; returns the worst answer
/// time seen.
fn pinger(
    server: &ServerProc,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Duration> {
    let creds = credentials(server);
    let endpoint = server.control.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut client =
                ots::client::Client::connect(&endpoint, Duration::from_secs(10), &creds)
                    .await
                    .unwrap();
            let mut worst = Duration::ZERO;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                client
                    .request(|request| ots::protocol::Body::Ping { request })
                    .await
                    .unwrap();
                worst = worst.max(t.elapsed());
                tokio::time::sleep(Duration::from_millis(20)).await; // the ping cadence
            }
            worst
        })
    })
}

fn main() {
    let sizes: Vec<u64> = std::env::var("OTS_BENCH_FILE_MIB")
        .unwrap_or_else(|_| "256,1024".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let dir =
        tempfile::tempdir_in(std::env::var("OTS_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()))
            .or_else(|_| tempfile::tempdir())
            .unwrap();
    let server = start_fresh_server(dir.path(), &[]);
    // The conductor links the prepared file into its results and notes
    // the time it exits (ns since the epoch).
    let conductor = script(
        dir.path(),
        "link.sh",
        r#"ln "$OTS_BENCH_SRC" "$OTS_RESULTS_DIR/big.bin"
echo '<testsuite><testcase name="bench"/></testsuite>' > "$OTS_RESULTS_DIR/r.xml"
date +%s%N > "$OTS_BENCH_EXITED""#,
    );
    let src = dir.path().join("src.bin");
    let exited = dir.path().join("exited");
    let worker = start_worker(
        dir.path(),
        "w1",
        "devicegroup:bench",
        &server,
        &[conductor.to_str().unwrap()],
        &[
            ("OTS_BENCH_SRC", src.to_str().unwrap()),
            ("OTS_BENCH_EXITED", exited.to_str().unwrap()),
        ],
    );
    assert!(
        wait_for_workers(&server, Duration::from_secs(30), all_idle(&["w1"])),
        "the worker did not register"
    );
    for mib in sizes {
        let size = mib * MIB;
        // Random content, written once (not timed).
        {
            let mut f = std::fs::File::create(&src).unwrap();
            let mut block = vec![0u8; MIB as usize];
            let mut x: u64 = 0x9E3779B97F4A7C15 ^ mib;
            for _ in 0..mib {
                for b in block.chunks_mut(8) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
                }
                f.write_all(&block).unwrap();
            }
            f.sync_all().unwrap();
        }
        let _ = std::fs::remove_file(&exited);
        let tcp = raw_tcp_copy(&src, &dir.path().join("tcp-copy.bin"));
        std::fs::remove_file(dir.path().join("tcp-copy.bin")).unwrap();
        let hash = sha256sum(&src);

        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ping = pinger(&server, stop.clone());
        let mut waiter = Command::new(bin("ots-submit"));
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
        waiter
            .args(["wait", &run])
            .env("OTS_SERVER", &server.control)
            .envs(submit_envs(&server));
        // Worker disk beyond the file while the upload runs.
        let worker_dir = dir.path().join("w1");
        let mut worker_extra = 0u64;
        let task_results = worker_dir.join("tasks").join(format!("{run}.1-attempt1"));
        let out = {
            let mut child = waiter.stdout(std::process::Stdio::null()).spawn().unwrap();
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    break status;
                }
                if task_results.exists() {
                    worker_extra = worker_extra.max(du_bytes(&worker_dir, &src));
                }
                std::thread::sleep(Duration::from_millis(20)); // sampling the worker's disk
            }
        };
        let verdict_at = std::time::SystemTime::now();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let worst_ping = ping.join().unwrap();
        if !out.success() {
            let st = status_json(&server, &run);
            panic!(
                "the testrun did not pass: {st:#?}\n{:#?}",
                worker.stderr.all()
            );
        }
        let exited_ns: u128 = std::fs::read_to_string(&exited)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let took = verdict_at
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .saturating_sub(Duration::from_nanos(exited_ns as u64));
        let st = status_json(&server, &run).unwrap();
        assert_eq!(st["verdict"], "PASS");
        let lost = st["counters"]["workers_lost_connection_closed"]
            .as_u64()
            .unwrap_or(0)
            + st["counters"]["workers_lost"].as_u64().unwrap_or(0);
        println!(
            "{mib} MiB upload: {:.0} MB/s conductor exit → verdict ({:.2} s) | sha256sum {:.0} MB/s → {:.2}× | raw TCP copy {:.0} MB/s → {:.2}× | peak RSS server {} KiB, worker {} KiB | worst ping {:.1} ms | worker disk beyond the file {} KiB | workers lost {lost}",
            mbps(size, took),
            took.as_secs_f64(),
            mbps(size, hash),
            hash.as_secs_f64() / took.as_secs_f64(),
            mbps(size, tcp),
            tcp.as_secs_f64() / took.as_secs_f64(),
            peak_rss_kib(server.proc.child.id()),
            peak_rss_kib(worker.child.id()),
            worst_ping.as_secs_f64() * 1e3,
            worker_extra / 1024,
        );

        // Fetch it back.
        let fetched = dir.path().join("fetched");
        let _ = std::fs::remove_dir_all(&fetched);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ping = pinger(&server, stop.clone());
        let started = Instant::now();
        let o = submit(
            &server,
            &["fetch", &run, fetched.to_str().unwrap(), "--json"],
            Duration::from_secs(600),
        );
        let fetch = started.elapsed();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let worst_ping = ping.join().unwrap();
        assert!(o.status.success(), "{}", text(&o.stderr));
        let rusage =
            nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN).unwrap();
        println!(
            "{mib} MiB fetch: {:.0} MB/s ({:.2} s) | sha256sum → {:.2}× | raw TCP → {:.2}× | peak RSS server {} KiB, largest child so far (ots-submit) {} KiB | worst ping {:.1} ms",
            mbps(size, fetch),
            fetch.as_secs_f64(),
            hash.as_secs_f64() / fetch.as_secs_f64(),
            tcp.as_secs_f64() / fetch.as_secs_f64(),
            peak_rss_kib(server.proc.child.id()),
            rusage.max_rss(),
            worst_ping.as_secs_f64() * 1e3,
        );
        let _ = std::fs::remove_dir_all(&fetched);
    }
}
