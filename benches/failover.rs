//! Failover time with the state in PostgreSQL: two real `ots-server`s on
//! one database (a throwaway cluster from the test harness) and one state
//! directory; the leader is SIGKILLed, the time until the standby serves
//! is measured, and the killed one comes back as the next standby — ten
//! times, alternating (`OTS_BENCH_TRIALS`). Printed beside the design's
//! bound: the lease lapses `lease_ttl` after its last renewal, and the
//! standby looks every `lease_renew`, so takeover ≤ lease_ttl +
//! lease_renew after the kill (plus the restore), ≥ lease_ttl − lease_renew.

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use std::time::{Duration, Instant};

fn spawn(state: &std::path::Path, name: &str, url: &str, ttl: &str, renew: &str) -> Proc {
    let mut cmd = std::process::Command::new(bin("ots-server"));
    for (k, v) in keys().server_env() {
        cmd.env(k, v);
    }
    cmd.env("OTS_SERVER_DATABASE", url)
        .env("OTS_SERVER_LEASE_TTL", ttl)
        .env("OTS_SERVER_LEASE_RENEW", renew)
        .env("OTS_SERVER_LOG_LEVEL", "info")
        .arg("--control")
        .arg("tcp://127.0.0.1:0")
        .arg("--events")
        .arg("tcp://127.0.0.1:0")
        .arg("--state-dir")
        .arg(state);
    Proc::spawn(name, cmd)
}

fn main() {
    let trials: usize = std::env::var("OTS_BENCH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let ttl = std::env::var("OTS_BENCH_LEASE_TTL").unwrap_or_else(|_| "5s".into());
    let renew = std::env::var("OTS_BENCH_LEASE_RENEW").unwrap_or_else(|_| "1s".into());
    let limit = Duration::from_secs(120);
    let url = pg::cluster().database();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut leader = spawn(&state, "s0", &url, &ttl, &renew);
    assert!(
        leader.stderr.wait_for("server listening", limit).is_some(),
        "{:?}",
        leader.stderr.all()
    );
    let mut took = Vec::new();
    for i in 1..=trials {
        let standby = spawn(&state, &format!("s{i}"), &url, &ttl, &renew);
        assert!(
            standby.stderr.wait_for("standby:", limit).is_some(),
            "{:?}",
            standby.stderr.all()
        );
        // Killed at a random point of its renewal interval.
        std::thread::sleep(Duration::from_millis(rand::random::<u64>() % 1000)); // a random phase, not synchronisation
        let killed = Instant::now();
        leader.kill();
        assert!(
            standby.stderr.wait_for("server listening", limit).is_some(),
            "{:?}",
            standby.stderr.all()
        );
        let t = killed.elapsed();
        println!(
            "failover {i}: the standby served {:.2} s after the SIGKILL",
            t.as_secs_f64()
        );
        took.push(t);
        leader = standby;
    }
    took.sort();
    println!(
        "failover time over {trials} SIGKILLs (lease_ttl {ttl}, lease_renew {renew}): median {:.2} s, worst {:.2} s, best {:.2} s; the design's bound: between lease_ttl − lease_renew and lease_ttl + lease_renew after the kill",
        took[took.len() / 2].as_secs_f64(),
        took[took.len() - 1].as_secs_f64(),
        took[0].as_secs_f64()
    );
}
