//! A fleet of simulated workers speaking the real protocol over real
//! sockets, for measuring what a big lab costs the server:
//! `cargo run --release --example fleet -- tcp://127.0.0.1:5555 tcp://127.0.0.1:5556 2000 30`
//! (control, events, workers, seconds). Each worker registers, repeats
//! `ready` every heartbeat and answers nothing else; the program prints
//! how many are registered each second and the slowest `ping` round trip.

use ots::protocol::*;
use ots::transport::{connect_dealer, to_message};
use std::time::{Duration, Instant};
use zeromq::prelude::*;

fn frames(body: &Body) -> zeromq::ZmqMessage {
    let h = Header {
        v: PROTOCOL_VERSION,
        class: body.class(),
        mandatory: false,
        seq: 0,
        task: None,
    };
    to_message(encode(&h, body, None))
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let control = args
        .get(1)
        .cloned()
        .unwrap_or("tcp://127.0.0.1:5555".into());
    let n: usize = args.get(3).and_then(|v| v.parse().ok()).unwrap_or(1000);
    let secs: u64 = args.get(4).and_then(|v| v.parse().ok()).unwrap_or(20);
    let welcomed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for i in 0..n {
        let control = control.clone();
        let welcomed = welcomed.clone();
        tokio::spawn(async move {
            let Ok(socket) = connect_dealer(&control, Duration::from_secs(30)).await else {
                return;
            };
            let (mut tx, mut rx) = socket.split();
            let hello = Body::Hello {
                worker: format!("fleet{i}"),
                session: format!("s{i}"),
                device: DeviceProps::parse(&format!("devicegroup:fleet{}", i % 20)).unwrap(),
                running: vec![],
            };
            let _ = tx.send(frames(&hello)).await;
            let reader = tokio::spawn(async move {
                while let Ok(m) = rx.recv().await {
                    if let Ok(env) = decode(m.into_vec()) {
                        if env.body.kind() == "welcome" {
                            welcomed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                }
            });
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                if tx.send(frames(&Body::Ready)).await.is_err() {
                    break;
                }
            }
            reader.abort();
        });
    }
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
            "{:>5.1}s registered {:>5}/{n}  workers request {:>6.1} ms {}",
            start.elapsed().as_secs_f64(),
            welcomed.load(std::sync::atomic::Ordering::Relaxed),
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
