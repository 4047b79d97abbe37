//! A load generator: N simulated workers speaking the real protocol over
//! real sockets from one process, for measuring what a big lab costs the
//! server.
//!
//! ```sh
//! cargo run --release --example fleet -- CONTROL WORKERS SECONDS
//! cargo run --release --example fleet -- tcp://127.0.0.1:5555 5000 60
//! ```
//!
//! Each worker registers, repeats `ready` every second, and — like a real
//! worker — reconnects with a jittered delay when its connection
//! closes (a server restart: kill and restart the server while this runs to
//! see the reconnect storm). Every second it prints how many workers are
//! registered, how long a `workers` request took, and the server's welcome
//! count; at the end the slowest request.

use std::time::{Duration, Instant};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let control = args
        .get(1)
        .cloned()
        .unwrap_or("tcp://127.0.0.1:5555".into());
    let n: usize = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(1000);
    let secs: u64 = args.get(3).and_then(|v| v.parse().ok()).unwrap_or(20);
    let fleet = ots::fleet::start(&control, "fleet", n);
    let start = Instant::now();
    let mut worst = Duration::ZERO;
    while start.elapsed() < Duration::from_secs(secs) {
        let t = Instant::now();
        let ok = match ots::client::Client::connect(&control, Duration::from_secs(10)).await {
            Ok(mut c) => c.workers().await.is_ok(),
            Err(_) => false,
        };
        let rtt = t.elapsed();
        worst = worst.max(rtt);
        println!(
            "{:>5.1}s registered {:>5}/{n} (welcomes {:>6})  workers request {:>7.1} ms {}",
            start.elapsed().as_secs_f64(),
            fleet.registered(),
            fleet.welcomes(),
            rtt.as_secs_f64() * 1000.0,
            if ok { "" } else { "FAILED" }
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    println!(
        "slowest workers request: {:.1} ms",
        worst.as_secs_f64() * 1000.0
    );
}
