//! Benchmark: the reconnect storm after a server restart, with and
//! without security.
//!
//! `cargo bench --bench storm` starts the real `ots-server` binary, lets N
//! simulated workers (`ots::fleet`, the real protocol over real sockets,
//! each secured worker with a key of its own) register, SIGKILLs the
//! server, restarts it on the same endpoints and state, and prints how long
//! until every worker is registered again, how many the server declared
//! lost over the next liveness windows, and the longest heartbeat gap a
//! worker saw (secured: heartbeats come on the control connection). Once
//! with `security = "none"`, once with Noise.
//!
//! Environment: OTS_STORM_WORKERS (default 1000).

use ots::fleet::{FleetCounters, FleetSecurity};
use ots::security::{KeyPair, PublicKey};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A server child and the lines it wrote to stderr.
struct ServerChild {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    control: String,
    events: String,
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ServerChild {
    fn count(&self, needle: &str) -> usize {
        let lines = self.lines.lock().expect("lines");
        lines.iter().filter(|l| l.contains(needle)).count()
    }
}

fn field(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!("{key}="))? + key.len() + 1;
    Some(line[start..].split_whitespace().next()?.to_string())
}

fn start_server(state: &Path, control: &str, events: &str, keys: Option<&Path>) -> ServerChild {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ots-server"));
    cmd.args(["--control", control, "--events", events, "--state-dir"])
        .arg(state)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    match keys {
        None => {
            cmd.env("OTS_SERVER_SECURITY", "none");
        }
        Some(dir) => {
            cmd.env("OTS_SERVER_KEY", dir.join("server.key"))
                .env("OTS_SERVER_WORKERS_DIR", dir.join("workers.d"))
                .env("OTS_SERVER_USERS_DIR", dir.join("users.d"));
        }
    }
    let mut child = cmd.spawn().expect("ots-server starts");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let lines = lines.clone();
        let stderr = child.stderr.take().expect("piped stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("server listening") {
                    let _ = tx.send(line.clone());
                }
                lines.lock().expect("lines").push(line);
            }
        });
    }
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the server says it is listening within 30 s");
    ServerChild {
        child,
        lines,
        control: field(&line, "control").expect("control endpoint"),
        events: field(&line, "events").expect("events endpoint"),
    }
}

fn wait_until(limit: Duration, ok: impl Fn() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if ok() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10)); // polling interval, bounded by the deadline
    }
    None
}

fn storm(n: usize, secure: bool) {
    let mode = if secure { "noise" } else { "none " };
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("state");
    let keys = dir.path().join("keys");
    let security = if secure {
        for d in ["workers.d", "users.d", "private"] {
            std::fs::create_dir_all(keys.join(d)).expect("key dirs");
        }
        let server = KeyPair::generate();
        server.write(&keys.join("server")).expect("server key");
        let fleet =
            ots::fleet::fleet_keys(&keys.join("private"), &keys.join("workers.d"), "storm", n)
                .expect("fleet keys");
        FleetSecurity::Noise {
            server: PublicKey::read(&keys.join("server.pub")).expect("server.pub"),
            keys: Arc::new(fleet),
        }
    } else {
        FleetSecurity::None
    };
    let keys = secure.then_some(keys.as_path());
    let server = start_server(&state, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0", keys);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let fleet: FleetCounters = {
        let _guard = rt.enter();
        ots::fleet::start(&server.control, "storm", n, 0, security)
    };
    let first = wait_until(Duration::from_secs(120), || fleet.registered() == n);
    let Some(first) = first else {
        println!(
            "{mode}: only {} of {n} registered in 120 s",
            fleet.registered()
        );
        return;
    };
    let (control, events) = (server.control.clone(), server.events.clone());
    let welcomes = fleet.welcomes();
    drop(server); // SIGKILL
    let restarted = Instant::now();
    let server = start_server(&state, &control, &events, keys);
    let back = wait_until(Duration::from_secs(120), || {
        fleet.registered() == n && fleet.welcomes() >= welcomes + n
    });
    let back_after = restarted.elapsed();
    // A few liveness windows after the storm: nobody may be lost.
    std::thread::sleep(Duration::from_secs(5)); // the observation window itself
    let lost = server.count("worker lost");
    match back {
        Some(_) => println!(
            "{mode}: {n} workers registered in {:.2} s; after SIGKILL + restart all back in {:.2} s; \
             declared lost afterwards: {lost}; turned away as busy: {}; failed handshakes: {}; \
             longest heartbeat gap seen by a worker: {}",
            first.as_secs_f64(),
            back_after.as_secs_f64(),
            fleet.handshakes_busy(),
            fleet.handshake_failures(),
            if secure {
                format!("{} ms", fleet.worst_heartbeat_gap().as_millis())
            } else {
                "(on PUB, not measured here)".into()
            }
        ),
        None => println!(
            "{mode}: after the restart only {} of {n} back within 120 s",
            fleet.registered()
        ),
    }
    drop(server);
    drop(rt);
}

fn main() {
    let n: usize = std::env::var("OTS_STORM_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    // Thousands of sockets in one process.
    if let Ok((_, hard)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        let _ =
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
    storm(n, false);
    storm(n, true);
}
