//! A load generator: N simulated workers speaking the real protocol over
//! real sockets from one process, for measuring what a big lab costs the
//! server.
//!
//! ```sh
//! cargo run --release --example fleet -- CONTROL WORKERS SECONDS [LINES]
//! cargo run --release --example fleet -- tcp://127.0.0.1:5555 5000 60
//! cargo run --release --example fleet -- tcp://127.0.0.1:5555 1000 60 20000
//! cargo run --release --example fleet -- --keys /tmp/lab tcp://127.0.0.1:5555 1000 60
//! ```
//!
//! With `--keys DIR` the fleet is secured (the server's default): DIR holds
//! the server's `server.pub` and the server's allow-lists `workers.d/` and
//! `users.d/`; each simulated worker gets a key of its own (kept in
//! `DIR/fleet-private/`, made on first use and allow-listed as
//! `workers.d/fleetI.pub`, which a running server picks up within a
//! second), and the generator's requests go as the admin user `fleet`.
//! The longest heartbeat gap is then the one the workers saw in the
//! signed heartbeats on their SUB connections (events port = control
//! port + 1).
//!
//! With LINES (chatty mode), once all are registered it submits one task
//! per worker and each worker streams LINES log lines for it as fast as
//! it can, then reports: a log burst from the whole fleet at once.
//!
//! Each worker registers, repeats `ready` every second, and — like a real
//! worker — reconnects with a jittered delay when its connection
//! closes (a server restart: kill and restart the server while this runs to
//! see the reconnect storm). Every second it prints how many workers are
//! registered, how long a `workers` request took, and the server's welcome
//! count; at the end the slowest request.

use ots::security::{Credentials, KeyPair, PublicKey};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The events endpoint next to a control endpoint (port + 1).
fn events_endpoint(control: &str) -> Option<String> {
    let (base, port) = control.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    Some(format!("{base}:{}", port.checked_add(1)?))
}

/// The fleet's keys under `dir` (see the module documentation), and the
/// generator's own credentials as the admin user `fleet`.
fn secured(dir: &Path, n: usize) -> (ots::fleet::FleetSecurity, Credentials) {
    let fail = |what: &str, e: &dyn std::fmt::Display| -> ! {
        eprintln!("fleet: {what}: {e}");
        std::process::exit(78)
    };
    let server = PublicKey::read(&dir.join("server.pub"))
        .unwrap_or_else(|e| fail("the server's public key", &e));
    let private = dir.join("fleet-private");
    std::fs::create_dir_all(&private).unwrap_or_else(|e| fail("fleet-private", &e));
    let keys = ots::fleet::fleet_keys(&private, &dir.join("workers.d"), "fleet", n)
        .unwrap_or_else(|e| fail("worker keys", &e));
    let user = private.join("user-fleet");
    if !user.with_extension("key").exists() {
        KeyPair::generate()
            .write(&user)
            .unwrap_or_else(|e| fail("user key", &e));
    }
    let key = KeyPair::read(&user.with_extension("key")).unwrap_or_else(|e| fail("user key", &e));
    let users = dir.join("users.d");
    key.public
        .write(&users.join("fleet.pub"))
        .and_then(|()| {
            std::fs::write(users.join("fleet.role"), "admin").map_err(|e| {
                ots::security::SecurityError::KeyFile {
                    path: "fleet.role".into(),
                    reason: e.to_string(),
                }
            })
        })
        .unwrap_or_else(|e| fail("user allow-list", &e));
    (
        ots::fleet::FleetSecurity::Noise {
            server,
            keys: std::sync::Arc::new(keys),
        },
        Credentials::Noise { key, server },
    )
}

#[tokio::main]
async fn main() {
    let mut args: Vec<String> = std::env::args().collect();
    let keys_dir = args.iter().position(|a| a == "--keys").map(|i| {
        let dir = args.get(i + 1).cloned().unwrap_or_else(|| {
            eprintln!("fleet: --keys needs a directory");
            std::process::exit(64)
        });
        args.drain(i..i + 2);
        PathBuf::from(dir)
    });
    let control = args
        .get(1)
        .cloned()
        .unwrap_or("tcp://127.0.0.1:5555".into());
    let n: usize = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(1000);
    let secs: u64 = args.get(3).and_then(|v| v.parse().ok()).unwrap_or(20);
    let lines: usize = args.get(4).and_then(|v| v.parse().ok()).unwrap_or(0);
    let (security, credentials) = match &keys_dir {
        Some(dir) => secured(dir, n),
        None => (ots::fleet::FleetSecurity::None, Credentials::None),
    };
    let events = events_endpoint(&control).unwrap_or_else(|| {
        eprintln!("fleet: {control} is not tcp://HOST:PORT (the events port is PORT + 1)");
        std::process::exit(64)
    });
    let fleet = ots::fleet::start(&control, &events, "fleet", n, lines, security);
    // The longest gap between server heartbeats seen on the events port:
    // the loop must keep publishing them under any load.
    let worst_gap = std::sync::Arc::new(std::sync::Mutex::new(Duration::ZERO));
    if let (Some(events), None) = (events_endpoint(&control), &keys_dir) {
        let worst_gap = worst_gap.clone();
        tokio::spawn(async move {
            use zeromq::prelude::*;
            let Ok(mut sub) =
                ots::transport::connect_sub(&events, &["hb"], Duration::from_secs(5)).await
            else {
                return;
            };
            let mut last: Option<Instant> = None;
            while sub.recv().await.is_ok() {
                let now = Instant::now();
                if let Some(l) = last {
                    let mut w = worst_gap.lock().expect("gap lock");
                    *w = (*w).max(now - l);
                }
                last = Some(now);
            }
        });
    }
    let start = Instant::now();
    let mut submitted = lines == 0;
    let mut burst: Option<Instant> = None;
    let mut worst = Duration::ZERO;
    while start.elapsed() < Duration::from_secs(secs) {
        let t = Instant::now();
        let ok = match ots::client::Client::connect(&control, Duration::from_secs(10), &credentials)
            .await
        {
            Ok(mut c) => c.workers().await.is_ok(),
            Err(_) => false,
        };
        let rtt = t.elapsed();
        worst = worst.max(rtt);
        if !submitted && fleet.registered() == n {
            submitted = true;
            burst = Some(Instant::now());
            if let Ok(mut c) =
                ots::client::Client::connect(&control, Duration::from_secs(10), &credentials).await
            {
                for g in 0..20 {
                    let count = (0..n).filter(|i| i % 20 == g).count();
                    if count == 0 {
                        continue;
                    }
                    let _ = c
                        .submit(ots::protocol::TestrunRequest {
                            lease: None,
                            on_lease: None,
                            series: None,
                            device: ots::protocol::DeviceSpec::parse(&format!(
                                "devicegroup:fleet{g}"
                            ))
                            .expect("valid spec"),
                            image: "fleet".into(),
                            packages: (0..count).map(|p| format!("p{p}")).collect(),
                            distribution: ots::protocol::Distribution::Perpackage,
                            timeout_secs: 3600,
                            options: Default::default(),
                            queue_anyway: false,
                            secrets: Default::default(),
                            owner: None,
                            inputs: Default::default(),
                            priority: Default::default(),
                            devices: Vec::new(),
                            notify: Vec::new(),
                        })
                        .await;
                }
            }
        }
        if let Some(b) = burst {
            if fleet.finished() >= n {
                println!(
                    "all {n} tasks of {lines} lines reported {:.1} s after the submit ({:.0} lines/s)",
                    b.elapsed().as_secs_f64(),
                    (n * lines) as f64 / b.elapsed().as_secs_f64()
                );
                burst = None;
            }
        }
        println!(
            "{:>5.1}s registered {:>5}/{n} (welcomes {:>6}, tasks done {:>5})  workers request {:>7.1} ms {}",
            start.elapsed().as_secs_f64(),
            fleet.registered(),
            fleet.welcomes(),
            fleet.finished(),
            rtt.as_secs_f64() * 1000.0,
            if ok { "" } else { "FAILED" }
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let gap = if keys_dir.is_some() {
        fleet.worst_heartbeat_gap()
    } else {
        *worst_gap.lock().expect("gap lock")
    };
    println!(
        "slowest workers request: {:.1} ms; longest gap between server heartbeats: {:.0} ms; failed handshakes: {}, turned away as busy: {}",
        worst.as_secs_f64() * 1000.0,
        gap.as_secs_f64() * 1000.0,
        fleet.handshake_failures(),
        fleet.handshakes_busy()
    );
    if lines > 0 {
        if let Ok(mut c) =
            ots::client::Client::connect(&control, Duration::from_secs(10), &credentials).await
        {
            if let Ok(st) = c.status(&"r1".to_string()).await {
                println!(
                    "server counters: log_lines_stored {} of {} sent",
                    st.counters.get("log_lines_stored").copied().unwrap_or(0),
                    n * lines
                );
            }
        }
    }
}
