//! Benchmark: result files from a real `ots-worker` to the real
//! `ots-server` (release binaries, secured, loopback), and `ots-submit
//! fetch` of them back, beside baselines measured in the same run on the
//! same file, in alternating rounds (medians, and the spread):
//!
//! - **raw copy**: file → TCP over loopback → file, 1 MiB buffers, one
//!   thread each side: what the transport and the filesystem allow;
//! - **verified copy**: the same with SHA-256 computed over every byte on
//!   both ends (the sender to say what it sent, the receiver to check what
//!   it wrote), on each end's I/O thread: the work any transfer that
//!   verifies end to end must do, and so the physical limit for ours on
//!   this machine;
//! - **SHA-256**: the crate's hash over the file, one core, from memory.
//!
//! Each on tmpfs (`/dev/shm`: memory → socket → memory, so the transport,
//! the crypto and the hashing are the limit) and on disk (`/var/tmp`),
//! `OTS_BENCH_DIRS` (comma-separated) to choose. For ots: MB/s from the
//! conductor's exit to the verdict, and of the fetch; peak RSS of server
//! and worker (or ots-submit); the worst answer time of the server to a
//! ping sent every 20 ms meanwhile; the CPU each side spent. The CPU the
//! raw and verified copies spent (both ends together) is printed too: on
//! a machine with few cores it shows what a copy at the raw copy's pace
//! leaves for anything else.
//!
//! `cargo bench --bench files` (OTS_BENCH_FILE_MIB, default "256,1024";
//! OTS_BENCH_ROUNDS, default 3).

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use sha2::Digest;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1024 * 1024;

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

/// Reads `src` in 1 MiB blocks and hands each to `each`.
fn read_blocks(src: &Path, mut each: impl FnMut(&[u8])) {
    let mut f = std::fs::File::open(src).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        each(&buf[..n]);
    }
}

/// file → TCP over loopback → file, 1 MiB buffers; with `verify`, both
/// ends also hash every byte as it passes (the sender after reading, the
/// receiver after writing), on their I/O thread: no copy, no hand-over.
fn tcp_copy(src: &Path, dst: &Path, verify: bool) -> (Duration, f64) {
    let cpu_before = self_cpu();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dst = dst.to_path_buf();
    let started = Instant::now();
    let receiver = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut out = std::fs::File::create(&dst).unwrap();
        let mut h = sha2::Sha256::new();
        let mut buf = vec![0u8; MIB as usize];
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n]).unwrap();
            if verify {
                h.update(&buf[..n]);
            }
        }
        out.sync_all().unwrap();
        hex::encode(h.finalize())
    });
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let mut h = sha2::Sha256::new();
    read_blocks(src, |block| {
        if verify {
            h.update(block);
        }
        s.write_all(block).unwrap();
    });
    drop(s);
    let sent = hex::encode(h.finalize());
    let received = receiver.join().unwrap();
    assert_eq!(sent, received, "the copy arrived intact");
    (started.elapsed(), self_cpu() - cpu_before)
}

/// CPU seconds (user + system) this process has spent, all threads.
fn self_cpu() -> f64 {
    let u = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF).unwrap();
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    secs(u.user_time()) + secs(u.system_time())
}

/// SHA-256 from memory, one core: a block of the file (at most 16 MiB,
/// read first, not timed) hashed over and over for the file's size.
fn hash_speed(src: &Path, size: u64) -> Duration {
    let mut block = Vec::new();
    std::fs::File::open(src)
        .unwrap()
        .take(16 * MIB)
        .read_to_end(&mut block)
        .unwrap();
    let started = Instant::now();
    let mut h = sha2::Sha256::new();
    let mut left = size;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        h.update(&block[..n]);
        left -= n as u64;
    }
    std::hint::black_box(h.finalize());
    started.elapsed()
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

/// CPU time of a process so far, in clock ticks: (user, system).
fn cpu_ticks(pid: i32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|v| v.parse().ok()).unwrap_or(0);
    (field(11), field(12))
}

/// CPU seconds between two readings (user + system).
fn cpu_secs(a: (u64, u64), b: (u64, u64)) -> f64 {
    ((b.0 + b.1) - (a.0 + a.1)) as f64 / 100.0
}

/// Median, min and max of `v` as "median (min–max)".
fn spread(v: &[f64]) -> (f64, String) {
    let mut x = v.to_vec();
    x.sort_by(|a, b| a.total_cmp(b));
    let median = x[x.len() / 2];
    (
        median,
        format!("{median:.0} ({:.0}–{:.0})", x[0], x[x.len() - 1]),
    )
}

/// A real server and worker with their state below `dir`.
struct Lab {
    dir: PathBuf,
    server: ServerProc,
    worker: Proc,
    src: PathBuf,
    exited: PathBuf,
}

impl Lab {
    fn start(dir: &Path) -> Lab {
        let server = start_fresh_server(dir, &[]);
        // The conductor links the prepared file into its results and
        // notes the time it exits (ns since the epoch).
        let conductor = script(
            dir,
            "link.sh",
            r#"ln "$OTS_BENCH_SRC" "$OTS_RESULTS_DIR/big.bin"
echo '<testsuite><testcase name="bench"/></testsuite>' > "$OTS_RESULTS_DIR/r.xml"
date +%s%N > "$OTS_BENCH_EXITED""#,
        );
        let src = dir.join("src.bin");
        let exited = dir.join("exited");
        let worker = start_worker(
            dir,
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
        Lab {
            dir: dir.to_path_buf(),
            server,
            worker,
            src,
            exited,
        }
    }

    /// Random content, written once per size (not timed).
    fn prepare(&self, mib: u64) {
        let mut f = std::fs::File::create(&self.src).unwrap();
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

    /// One upload through a testrun: (time from the conductor's exit to
    /// the verdict, worst ping, CPU s of server and worker, run id).
    fn upload(&self) -> (Duration, Duration, f64, f64, String) {
        let _ = std::fs::remove_file(&self.exited);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ping = pinger(&self.server, stop.clone());
        let (spid, wpid) = (
            self.server.proc.child.id() as i32,
            self.worker.child.id() as i32,
        );
        let cpu0 = (cpu_ticks(spid), cpu_ticks(wpid));
        let run = submit_run(
            &self.server,
            &[
                "--device",
                "devicegroup:bench",
                "--image",
                "bench",
                "--packages",
                "p",
            ],
        );
        let mut waiter = Command::new(bin("ots-submit"));
        waiter
            .args(["wait", &run])
            .env("OTS_SERVER", &self.server.control)
            .envs(submit_envs(&self.server))
            .stdout(std::process::Stdio::null());
        let out = waiter.status().unwrap();
        let verdict_at = std::time::SystemTime::now();
        let cpu1 = (cpu_ticks(spid), cpu_ticks(wpid));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let worst_ping = ping.join().unwrap();
        if !out.success() {
            let st = status_json(&self.server, &run);
            panic!(
                "the testrun did not pass: {st:#?}\n{:#?}",
                self.worker.stderr.all()
            );
        }
        let exited_ns: u64 = std::fs::read_to_string(&self.exited)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let took = verdict_at
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .saturating_sub(Duration::from_nanos(exited_ns));
        (
            took,
            worst_ping,
            cpu_secs(cpu0.0, cpu1.0),
            cpu_secs(cpu0.1, cpu1.1),
            run,
        )
    }

    /// `ots-submit fetch` of a testrun's files: (time, worst ping, CPU s
    /// of the server and of ots-submit).
    fn fetch(&self, run: &str) -> (Duration, Duration, f64, f64) {
        let fetched = self.dir.join("fetched");
        let _ = std::fs::remove_dir_all(&fetched);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ping = pinger(&self.server, stop.clone());
        let spid = self.server.proc.child.id() as i32;
        let before = children_cpu();
        let server_before = cpu_ticks(spid);
        let started = Instant::now();
        let o = submit(
            &self.server,
            &["fetch", run, fetched.to_str().unwrap(), "--json"],
            Duration::from_secs(600),
        );
        let took = started.elapsed();
        let server_cpu = cpu_secs(server_before, cpu_ticks(spid));
        let client_cpu = children_cpu() - before;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let worst_ping = ping.join().unwrap();
        assert!(o.status.success(), "{}", text(&o.stderr));
        let _ = std::fs::remove_dir_all(&fetched);
        // The stored copies go too, so every round writes into memory
        // the machine already backs: here, past about 2 GiB of pages
        // never used before, writing runs at a third of a GB/s whoever
        // does it (the hypervisor backs each page on first touch), and
        // the 1 GiB rounds measured that instead of the transfer.
        for task in std::fs::read_dir(self.server.state_dir.join("tasks"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let _ = std::fs::remove_file(task.path().join("files").join("big.bin"));
        }
        (took, worst_ping, server_cpu, client_cpu)
    }
}

/// CPU seconds of the waited-for children so far.
fn children_cpu() -> f64 {
    let r = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN).unwrap();
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    secs(r.user_time()) + secs(r.system_time())
}

fn main() {
    let sizes: Vec<u64> = std::env::var("OTS_BENCH_FILE_MIB")
        .unwrap_or_else(|_| "256,1024".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let rounds: usize = std::env::var("OTS_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let dirs: Vec<String> = std::env::var("OTS_BENCH_DIRS")
        .unwrap_or_else(|_| "/dev/shm,/var/tmp".into())
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    println!(
        "{} cores; transport cipher {}; {rounds} alternating rounds, medians (min–max), MB/s",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        ots::security::channel::Cipher::usable_here()[0].name()
    );
    for base in dirs {
        let Ok(dir) = tempfile::tempdir_in(&base) else {
            println!("{base}: cannot make a folder there; skipped");
            continue;
        };
        let lab = Lab::start(dir.path());
        for &mib in &sizes {
            let size = mib * MIB;
            lab.prepare(mib);
            let copy = dir.path().join("copy.bin");
            let (mut raw, mut verified, mut hash, mut up, mut down) =
                (vec![], vec![], vec![], vec![], vec![]);
            let (mut raw_cpu, mut verified_cpu) = (vec![], vec![]);
            let (mut up_ping, mut down_ping) = (Duration::ZERO, Duration::ZERO);
            let (mut up_cpu, mut down_cpu) = (vec![], vec![]);
            for _ in 0..rounds {
                let (took, cpu) = tcp_copy(&lab.src, &copy, false);
                raw.push(mbps(size, took));
                raw_cpu.push(cpu);
                let _ = std::fs::remove_file(&copy);
                let (took, cpu) = tcp_copy(&lab.src, &copy, true);
                verified.push(mbps(size, took));
                verified_cpu.push(cpu);
                let _ = std::fs::remove_file(&copy);
                hash.push(mbps(size, hash_speed(&lab.src, size)));
                let (took, ping, s_cpu, w_cpu, run) = lab.upload();
                up.push(mbps(size, took));
                up_ping = up_ping.max(ping);
                up_cpu.push((s_cpu, w_cpu));
                let (took, ping, s_cpu, c_cpu) = lab.fetch(&run);
                down.push(mbps(size, took));
                down_ping = down_ping.max(ping);
                down_cpu.push((s_cpu, c_cpu));
            }
            let (raw_m, raw_s) = spread(&raw);
            let (ver_m, ver_s) = spread(&verified);
            let (_, hash_s) = spread(&hash);
            let (up_m, up_s) = spread(&up);
            let (down_m, down_s) = spread(&down);
            let gib = size as f64 / (1u64 << 30) as f64;
            let per_gib = |v: &[(f64, f64)], pick: fn(&(f64, f64)) -> f64| {
                spread(&v.iter().map(|c| pick(c) / gib).collect::<Vec<_>>()).0
            };
            println!("{base}, {mib} MiB:");
            let both = |v: &[f64]| spread(&v.iter().map(|c| c / gib).collect::<Vec<_>>()).0;
            println!(
                "  raw copy {raw_s} | verified copy {ver_s} | SHA-256 (one core) {hash_s} | CPU per GiB, both ends: raw {:.2} s, verified {:.2} s",
                both(&raw_cpu),
                both(&verified_cpu)
            );
            println!(
                "  ots upload {up_s} → {:.2}× raw, {:.2}× verified | CPU per GiB: server {:.2} s, worker {:.2} s | worst ping {:.1} ms | peak RSS server {} KiB, worker {} KiB",
                up_m / raw_m,
                up_m / ver_m,
                per_gib(&up_cpu, |c| c.0),
                per_gib(&up_cpu, |c| c.1),
                up_ping.as_secs_f64() * 1e3,
                peak_rss_kib(lab.server.proc.child.id()),
                peak_rss_kib(lab.worker.child.id()),
            );
            let rusage =
                nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
                    .unwrap();
            println!(
                "  ots fetch  {down_s} → {:.2}× raw, {:.2}× verified | CPU per GiB: server {:.2} s, ots-submit {:.2} s | worst ping {:.1} ms | peak RSS server {} KiB, largest child so far (ots-submit) {} KiB",
                down_m / raw_m,
                down_m / ver_m,
                per_gib(&down_cpu, |c| c.0),
                per_gib(&down_cpu, |c| c.1),
                down_ping.as_secs_f64() * 1e3,
                peak_rss_kib(lab.server.proc.child.id()),
                rusage.max_rss(),
            );
        }
    }
}
