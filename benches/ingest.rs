//! Benchmark: log ingestion and durable mandatory messages, through the
//! real server over real ZeroMQ sockets on loopback.
//!
//! `cargo bench --bench ingest` prints, measured in the same run:
//! 1. the raw DEALER→ROUTER rate of the very same log messages (packed,
//!    as the real worker sends them) from N senders into a bare ROUTER
//!    that only counts them (the transport's ceiling), in every round;
//! 2. log ingestion by `ots-server` from N simulated workers into the
//!    per-task log files, with the SQLite commits it does, and its ratio
//!    to 1. in the same round;
//! 3. mandatory control messages per second, each acknowledged only after
//!    its effect is committed;
//!
//! 2 and 3 in alternating rounds: with `security = "none"` and with Noise (every message
//! sealed by the sender, opened by the server, acks sealed back), and the
//! cost of one connection's handshake.
//!
//! Environment: OTS_BENCH_WORKERS (N, default 10), OTS_BENCH_LINES (lines
//! per worker, default 200000), OTS_BENCH_ROUNDS (rounds of raw, none and
//! noise, default 3; medians). 1000 chatty workers:
//! `OTS_BENCH_WORKERS=1000 OTS_BENCH_LINES=5000 cargo bench --bench ingest`.

// The test harness's throwaway PostgreSQL (the state-in-PostgreSQL rounds).
#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use bytes::Bytes;
use ots::protocol::*;
use ots::security::channel::Cipher;
use ots::server::config::ServerConfig;
use ots::server::Server;
use ots::transport::{connect_dealer, to_message};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use zeromq::prelude::*;
use zeromq::{DealerSocket, RouterSocket};

/// Simulated workers (OTS_BENCH_WORKERS, default 10).
fn worker_count() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        std::env::var("OTS_BENCH_WORKERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10)
            .max(1)
    })
}
const BATCH: usize = 500;

fn header(body: &Body, mandatory: bool, seq: u64) -> Header {
    Header {
        v: PROTOCOL_VERSION,
        class: body.class(),
        mandatory,
        seq,
        task: None,
        epoch: None,
    }
}

fn frames(body: &Body, mandatory: bool, seq: u64, raw: Option<Bytes>) -> zeromq::ZmqMessage {
    to_message(encode(&header(body, mandatory, seq), body, raw))
}

/// One batch of log lines as the real worker sends them: packed (the
/// stored form in a raw frame, one part; PROTOCOL §7.4).
fn log_batch(task: &str, first: u64) -> (Body, Bytes) {
    let mut raw = Vec::new();
    for seq in first..first + BATCH as u64 {
        raw.extend_from_slice(
            format!("[bench/{task}] line {seq:>8} of a realistic length for a test log ........\n")
                .as_bytes(),
        );
    }
    let body = Body::LogPacked {
        task: task.to_string(),
        attempt: 1,
        parts: vec![LogPart {
            first,
            count: BATCH as u32,
            stream: Stream::Stdout,
            bytes: raw.len() as u32,
        }],
    };
    (body, Bytes::from(raw))
}

/// A minimal worker speaking the protocol by hand (sealing and opening
/// when secured, as a real worker does).
struct FakeWorker {
    socket: DealerSocket,
    task: TaskId,
    seq: u64,
    channel: Option<ots::security::Channel>,
}

/// Keys of a secured bench server: its own, the workers' and a user's,
/// and the transport ciphers its simulated workers offer.
struct BenchKeys {
    dir: tempfile::TempDir,
    server: ots::security::PublicKey,
    ciphers: &'static [Cipher],
}

/// The secured rounds' simulated workers offer ChaCha20-Poly1305 only
/// (as a machine without AES instructions would) while this is set.
static CHACHA_ONLY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl BenchKeys {
    fn new() -> BenchKeys {
        let dir = tempfile::tempdir().unwrap();
        for d in ["workers.d", "users.d"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        let server = ots::security::KeyPair::generate();
        server.write(&dir.path().join("server")).unwrap();
        for i in 0..worker_count() {
            ots::security::KeyPair::generate()
                .write(&dir.path().join("workers.d").join(format!("bench{i}")))
                .unwrap();
        }
        ots::security::KeyPair::generate()
            .write(&dir.path().join("users.d").join("bench"))
            .unwrap();
        std::fs::write(dir.path().join("users.d").join("bench.role"), "admin").unwrap();
        BenchKeys {
            server: server.public,
            dir,
            ciphers: if CHACHA_ONLY.load(std::sync::atomic::Ordering::Relaxed) {
                &[Cipher::ChaChaPoly]
            } else {
                Cipher::usable_here()
            },
        }
    }

    fn credentials(&self, key: &std::path::Path) -> ots::security::Credentials {
        ots::security::Credentials::Noise {
            key: ots::security::KeyPair::read(key).unwrap(),
            server: self.server,
        }
    }
}

impl FakeWorker {
    async fn send(&mut self, body: &Body, mandatory: bool, seq: u64, raw: Option<Bytes>) {
        let plain = encode(&header(body, mandatory, seq), body, raw);
        self.send_frames(plain).await;
    }

    async fn send_frames(&mut self, plain: Vec<Bytes>) {
        let wire = match self.channel.as_mut() {
            Some(c) => c.seal(&plain),
            None => plain,
        };
        send_paced(&mut self.socket, to_message(wire)).await;
    }

    async fn recv(&mut self) -> Envelope {
        let msg = tokio::time::timeout(Duration::from_secs(30), self.socket.recv())
            .await
            .expect("server answers within 30 s")
            .expect("recv");
        let mut frames = msg.into_vec();
        if let Some(c) = self.channel.as_mut() {
            frames = c.open(frames).expect("authentic");
        }
        decode(frames).expect("decodes")
    }

    async fn start(control: &str, name: &str, keys: Option<&BenchKeys>) -> FakeWorker {
        let mut socket = connect_dealer(control, Duration::from_secs(5))
            .await
            .unwrap();
        let channel = match keys {
            None => None,
            Some(k) => {
                let key = k.dir.path().join("workers.d").join(format!("{name}.key"));
                let ots::security::Credentials::Noise { key, server } = k.credentials(&key) else {
                    unreachable!()
                };
                let (c, _) = ots::security::link::handshake_offering(
                    &mut socket,
                    &key,
                    &server,
                    Duration::from_secs(5),
                    k.ciphers,
                )
                .await
                .unwrap();
                Some(c)
            }
        };
        let mut w = FakeWorker {
            socket,
            task: String::new(),
            seq: 0,
            channel,
        };
        let hello = Body::Hello {
            worker: name.into(),
            session: format!("{name}-bench"),
            device: DeviceProps::parse("devicegroup:bench").unwrap(),
            running: vec![],
            version: None,
        };
        w.send(&hello, false, 0, None).await;
        loop {
            if let Body::Welcome { .. } = w.recv().await.body {
                break;
            }
        }
        w.send(&Body::Ready, false, 0, None).await;
        w
    }

    /// Waits for a dispatch, acks it, and accepts the task.
    async fn take_task(&mut self) {
        loop {
            let env = self.recv().await;
            if let Body::Dispatch { spec } = env.body {
                let ack = Body::Ack {
                    seq: env.header.seq,
                };
                self.send(&ack, false, 0, None).await;
                self.task = spec.task;
                break;
            }
        }
        self.mandatory(
            Body::TaskAccepted {
                task: self.task.clone(),
                attempt: 1,
            },
            None,
        )
        .await;
        self.wait_ack(self.seq).await;
    }

    async fn mandatory(&mut self, body: Body, raw: Option<Bytes>) {
        self.seq += 1;
        let seq = self.seq;
        self.send(&body, true, seq, raw).await;
    }

    async fn wait_ack(&mut self, seq: u64) {
        loop {
            if let Body::Ack { seq: s } = self.recv().await.body {
                if s >= seq {
                    return;
                }
            }
        }
    }
}

/// Sends, waiting while the socket's queue towards the peer is full (our
/// sockets fail fast instead of blocking, so one slow peer cannot stall a
/// loop; a benchmark sender simply waits its turn).
async fn send_paced(d: &mut DealerSocket, m: zeromq::ZmqMessage) {
    loop {
        match d.send(m.clone()).await {
            Ok(()) => return,
            Err(zeromq::ZmqError::BufferFull(_)) => tokio::task::yield_now().await,
            Err(e) => panic!("send failed: {e}"),
        }
    }
}

async fn baseline(messages: &[zeromq::ZmqMessage]) -> Duration {
    let mut router = RouterSocket::new();
    let ep = router.bind("tcp://127.0.0.1:0").await.unwrap().to_string();
    let total = messages.len() * worker_count();
    let mut senders = Vec::new();
    for _ in 0..worker_count() {
        let mut d = connect_dealer(&ep, Duration::from_secs(5)).await.unwrap();
        let msgs = messages.to_vec();
        senders.push(async move {
            for m in msgs {
                send_paced(&mut d, m).await;
            }
            d
        });
    }
    let started = Instant::now();
    let send_all = tokio::spawn(async move { futures_join(senders).await });
    for _ in 0..total {
        router.recv().await.unwrap();
    }
    let elapsed = started.elapsed();
    drop(send_all.await);
    elapsed
}

async fn futures_join<F: std::future::Future<Output = DealerSocket> + Send + 'static>(
    fs: Vec<F>,
) -> Vec<DealerSocket> {
    let handles: Vec<_> = fs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

fn client_credentials(keys: Option<&BenchKeys>) -> ots::security::Credentials {
    match keys {
        None => ots::security::Credentials::None,
        Some(k) => k.credentials(&k.dir.path().join("users.d").join("bench.key")),
    }
}

/// Submits `packages` tasks, in testruns of at most 256 (the protocol's
/// limit); returns the number of testruns.
async fn submit(control: &str, packages: usize, keys: Option<&BenchKeys>) -> usize {
    let mut client =
        ots::client::Client::connect(control, Duration::from_secs(5), &client_credentials(keys))
            .await
            .unwrap();
    let runs = packages.div_ceil(256);
    for r in 0..runs {
        let packages = (packages - r * 256).min(256);
        submit_one(&mut client, packages).await;
    }
    runs
}

async fn submit_one(client: &mut ots::client::Client, packages: usize) {
    client
        .submit(TestrunRequest {
            lease: None,
            on_lease: None,
            series: None,
            device: DeviceSpec::parse("devicegroup:bench").unwrap(),
            image: "bench".into(),
            packages: (1..=packages).map(|i| format!("p{i}")).collect(),
            distribution: Distribution::Perpackage,
            timeout_secs: 3600,
            options: BTreeMap::new(),
            queue_anyway: true,
            secrets: Default::default(),
            owner: None,
            inputs: Default::default(),
            priority: Default::default(),
            devices: Vec::new(),
            notify: Vec::new(),
        })
        .await
        .unwrap();
}

fn main() {
    let lines: u64 = std::env::var("OTS_BENCH_LINES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let batches = (lines as usize).div_ceil(BATCH);
    let lines = (batches * BATCH) as u64;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        // The same messages for the baseline and the server.
        let sample: Vec<(Body, Bytes)> = (0..batches).map(|b| log_batch("r1.1", 1 + (b * BATCH) as u64)).collect();
        let bytes_per_worker: u64 = sample.iter().map(|(_, raw)| raw.len() as u64).sum();
        let msgs: Vec<_> = sample.into_iter().map(|(b, raw)| frames(&b, false, 0, Some(raw))).collect();
        let wire_bytes: usize = msgs.iter().map(|m| m.iter().map(|f| f.len()).sum::<usize>()).sum();
        println!(
            "workload: {} workers × {lines} lines in batches of {BATCH} ({} KiB per message on the wire)",
            worker_count(),
            wire_bytes / msgs.len() / 1024
        );

        let total_lines = lines * worker_count() as u64;
        let mb = (bytes_per_worker * worker_count() as u64) as f64 / 1e6;
        // Alternating rounds, medians reported: one run of each is too
        // short on a shared 2-core machine to tell 10 % from noise; the
        // transport's ceiling is measured in every round too, as it
        // varies as much as anything else here.
        let rounds: usize = std::env::var("OTS_BENCH_ROUNDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3)
            .max(1);
        let (mut plain, mut noise, mut raw, mut ratios) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut chacha = Vec::new();
        // The cipher the secured rounds negotiate here (the server and
        // the simulated workers run on this machine).
        let negotiated = Cipher::usable_here()[0];
        // The same rounds with the state in PostgreSQL (OTS_BENCH_POSTGRES=0
        // leaves them out): a throwaway cluster, one database per round.
        let postgres = std::env::var("OTS_BENCH_POSTGRES").map_or(true, |v| v != "0");
        let mut pg = Vec::new();
        for _ in 0..rounds {
            let t = baseline(&msgs).await;
            let raw_lines = total_lines as f64 / t.as_secs_f64();
            println!(
                "raw DEALER→ROUTER (no storage):   {:>10.0} lines/s  {:>8.1} MB/s  {:>8.0} msg/s",
                raw_lines,
                mb / t.as_secs_f64(),
                (msgs.len() * worker_count()) as f64 / t.as_secs_f64()
            );
            let p = through_server(false, batches, lines, bytes_per_worker).await;
            println!("  ots-server (none) / raw in this round: {:.2}×", p.0 / raw_lines);
            ratios.push((p.0 / raw_lines, 0.0));
            raw.push((raw_lines, 0.0));
            plain.push(p);
            noise.push(through_server(true, batches, lines, bytes_per_worker).await);
            if negotiated != Cipher::ChaChaPoly {
                // The same with ChaCha20-Poly1305: what a machine without
                // AES instructions gets (and what every one got before).
                CHACHA_ONLY.store(true, std::sync::atomic::Ordering::Relaxed);
                chacha.push(through_server(true, batches, lines, bytes_per_worker).await);
                CHACHA_ONLY.store(false, std::sync::atomic::Ordering::Relaxed);
            }
            if postgres {
                let url = common::pg::cluster().database();
                pg.push(through_server_on(false, Some(url), batches, lines, bytes_per_worker).await);
            }
        }
        let median = |v: &[(f64, f64)], pick: fn(&(f64, f64)) -> f64| {
            let mut x: Vec<f64> = v.iter().map(pick).collect();
            x.sort_by(|a, b| a.total_cmp(b));
            x[x.len() / 2]
        };
        let (plain_lines, plain_acks) = (median(&plain, |r| r.0), median(&plain, |r| r.1));
        let (noise_lines, noise_acks) = (median(&noise, |r| r.0), median(&noise, |r| r.1));
        println!(
            "medians of {rounds} rounds: ingestion {plain_lines:.0} (none) vs {noise_lines:.0} (noise) lines/s; durable acks {plain_acks:.0} vs {noise_acks:.0} msg/s"
        );
        println!(
            "ingestion vs raw DEALER→ROUTER ({} workers): median {:.2}× (raw median {:.0} lines/s)",
            worker_count(),
            median(&ratios, |r| r.0),
            median(&raw, |r| r.0)
        );
        println!(
            "security cost: ingestion {:+.1} %, durable acks {:+.1} % (noise, {}, vs none; the budget is -15 %)",
            (noise_lines / plain_lines - 1.0) * 100.0,
            (noise_acks / plain_acks - 1.0) * 100.0,
            negotiated.name()
        );
        if !chacha.is_empty() {
            let (c_lines, c_acks) = (median(&chacha, |r| r.0), median(&chacha, |r| r.1));
            println!(
                "  with ChaCha20-Poly1305 instead: ingestion {c_lines:.0} lines/s ({:+.1} % vs none), durable acks {c_acks:.0} msg/s ({:+.1} %)",
                (c_lines / plain_lines - 1.0) * 100.0,
                (c_acks / plain_acks - 1.0) * 100.0
            );
        }
        if postgres {
            let (pg_lines, pg_acks) = (median(&pg, |r| r.0), median(&pg, |r| r.1));
            println!(
                "state in PostgreSQL vs SQLite (none, medians): ingestion {pg_lines:.0} vs {plain_lines:.0} lines/s ({:.2}×); durable acks {pg_acks:.0} vs {plain_acks:.0} msg/s ({:.2}×; the budget is ≥ 0.5×)",
                pg_lines / plain_lines,
                pg_acks / plain_acks
            );
        }
        handshakes().await;
    });
}

/// Ingestion and durable acks through the real server; returns
/// (lines/s, msg/s).
async fn through_server(
    secure: bool,
    batches: usize,
    lines: u64,
    bytes_per_worker: u64,
) -> (f64, f64) {
    through_server_on(secure, None, batches, lines, bytes_per_worker).await
}

/// [`through_server`] with the state in the PostgreSQL at `database`.
async fn through_server_on(
    secure: bool,
    database: Option<String>,
    batches: usize,
    lines: u64,
    bytes_per_worker: u64,
) -> (f64, f64) {
    let mode = match (secure, database.is_some()) {
        (false, false) => "none ",
        (true, false) if CHACHA_ONLY.load(std::sync::atomic::Ordering::Relaxed) => {
            "noise, ChaChaPoly"
        }
        (true, false) => "noise",
        (_, true) => "none, PostgreSQL",
    };
    let total_lines = lines * worker_count() as u64;
    let mb = (bytes_per_worker * worker_count() as u64) as f64 / 1e6;
    // The real server, with durable state and per-task log files.
    let dir = tempfile::tempdir().unwrap();
    let keys = secure.then(BenchKeys::new);
    let mut cfg = ServerConfig {
        control: "tcp://127.0.0.1:0".into(),
        events: "tcp://127.0.0.1:0".into(),
        state_dir: dir.path().to_path_buf(),
        security: ots::security::SecurityMode::None,
        database: database.unwrap_or_default(),
        ..ServerConfig::default()
    };
    if let Some(k) = &keys {
        cfg.security = ots::security::SecurityMode::Noise;
        cfg.key = k.dir.path().join("server.key");
        cfg.workers_dir = k.dir.path().join("workers.d");
        cfg.users_dir = k.dir.path().join("users.d");
    }
    let server = Server::start(cfg).await.unwrap();
    let mut workers = Vec::new();
    for i in 0..worker_count() {
        workers.push(FakeWorker::start(&server.control, &format!("bench{i}"), keys.as_ref()).await);
    }
    let runs = submit(&server.control, worker_count(), keys.as_ref()).await;
    for w in workers.iter_mut() {
        w.take_task().await;
    }
    // Encoded before the clock starts, as for the baseline.
    // (Sealing, with security, is timed: it happens per message.)
    let encoded: Vec<Vec<Vec<Bytes>>> = workers
        .iter()
        .map(|w| {
            (0..batches)
                .map(|b| {
                    let (body, raw) = log_batch(&w.task, 1 + (b * BATCH) as u64);
                    encode(&header(&body, false, 0), &body, Some(raw))
                })
                .collect()
        })
        .collect();
    let started = Instant::now();
    let mut handles = Vec::new();
    for (mut w, msgs) in workers.into_iter().zip(encoded) {
        handles.push(tokio::spawn(async move {
            for m in msgs {
                w.send_frames(m).await;
            }
            // Same socket, FIFO: its ack means every line before it was handled.
            let report = Body::TaskFinished {
                task: w.task.clone(),
                attempt: 1,
                outcome: Outcome {
                    exit_code: Some(0),
                    ..Outcome::default()
                },
                log_lines: lines,
                files: vec![],
                file_problems: vec![],
            };
            w.mandatory(report, None).await;
            w.wait_ack(w.seq).await;
            w
        }));
    }
    let mut workers = Vec::new();
    for h in handles {
        workers.push(h.await.unwrap());
    }
    let t = started.elapsed();
    let ingest_rate = total_lines as f64 / t.as_secs_f64();
    let mut client = ots::client::Client::connect(
        &server.control,
        Duration::from_secs(5),
        &client_credentials(keys.as_ref()),
    )
    .await
    .unwrap();
    let mut stored = 0u64;
    for r in 1..=runs {
        let status = client.status(&format!("r{r}")).await.unwrap();
        stored += status.tasks.iter().map(|t| t.log_lines_stored).sum::<u64>();
    }
    println!(
        "ots-server log ingestion ({mode}): {:>10.0} lines/s  {:>8.1} MB/s  ({stored} of {total_lines} lines stored, in {:.2} s)",
        total_lines as f64 / t.as_secs_f64(),
        mb / t.as_secs_f64(),
        t.as_secs_f64()
    );

    // Durable mandatory messages: one-line log batches sent mandatory
    // (applied once, acknowledged after the commit), 256 in flight.
    submit(&server.control, 1, keys.as_ref()).await;
    let w = &mut workers[0];
    w.send(&Body::Ready, false, 0, None).await;
    w.take_task().await;
    let n: u64 = 100_000;
    let window = 256u64;
    let first = w.seq + 1;
    let started = Instant::now();
    let mut acked = first - 1;
    for i in 0..n {
        let batch = Body::Log {
            task: w.task.clone(),
            attempt: 1,
            lines: vec![LogLine {
                seq: i + 1,
                stream: Stream::Stdout,
                text: "x".repeat(64),
            }],
        };
        w.mandatory(batch, None).await;
        while w.seq - acked >= window {
            if let Body::Ack { seq } = w.recv().await.body {
                acked = acked.max(seq);
            }
        }
    }
    w.wait_ack(w.seq).await;
    let t = started.elapsed();
    let ack_rate = n as f64 / t.as_secs_f64();
    println!(
        "durable acks ({mode}):             {:>10.0} msg/s  ({n} mandatory messages, {window} in flight, {:.2} s)",
        n as f64 / t.as_secs_f64(),
        t.as_secs_f64()
    );
    server.shutdown().await.expect("the server stops cleanly");
    (ingest_rate, ack_rate)
}

/// Time per connection: connect alone, and connect plus Noise handshake.
async fn handshakes() {
    let keys = BenchKeys::new();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(ServerConfig {
        control: "tcp://127.0.0.1:0".into(),
        events: "tcp://127.0.0.1:0".into(),
        state_dir: dir.path().to_path_buf(),
        key: keys.dir.path().join("server.key"),
        workers_dir: keys.dir.path().join("workers.d"),
        users_dir: keys.dir.path().join("users.d"),
        ..ServerConfig::default()
    })
    .await
    .unwrap();
    let creds = client_credentials(Some(&keys));
    let ots::security::Credentials::Noise {
        key,
        server: pinned,
    } = &creds
    else {
        unreachable!()
    };
    let n = 200;
    let started = Instant::now();
    for _ in 0..n {
        let _ = connect_dealer(&server.control, Duration::from_secs(5))
            .await
            .unwrap();
    }
    let connect = started.elapsed() / n;
    let started = Instant::now();
    for _ in 0..n {
        let mut d = connect_dealer(&server.control, Duration::from_secs(5))
            .await
            .unwrap();
        ots::security::link::handshake(&mut d, key, pinned, Duration::from_secs(5))
            .await
            .unwrap();
    }
    let secured = started.elapsed() / n;
    println!(
        "per connection: connect {:.2} ms, connect + Noise IK handshake {:.2} ms ({n} sequential)",
        connect.as_secs_f64() * 1e3,
        secured.as_secs_f64() * 1e3
    );
    server.shutdown().await.expect("the server stops cleanly");
}
