//! A fleet of simulated workers speaking the real protocol over real
//! sockets from one process: the load generator behind
//! `examples/fleet.rs` and the scale tests. A simulated worker registers,
//! repeats `ready` every second, and — like a real worker — reconnects with
//! a jittered delay when its connection closes (a server restart).

use crate::protocol::*;
use crate::transport::{connect_dealer, to_message};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
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

/// Counters shared by a fleet.
#[derive(Clone, Default)]
pub struct FleetCounters {
    /// Workers registered now (welcomed on their current connection).
    pub registered: Arc<AtomicUsize>,
    /// Welcomes received in all (a restart adds one per worker).
    pub welcomes: Arc<AtomicUsize>,
}

impl FleetCounters {
    pub fn registered(&self) -> usize {
        self.registered.load(Ordering::Relaxed)
    }

    pub fn welcomes(&self) -> usize {
        self.welcomes.load(Ordering::Relaxed)
    }
}

/// Starts `n` simulated workers named `{prefix}{i}` on the tokio runtime.
pub fn start(control: &str, prefix: &str, n: usize) -> FleetCounters {
    let counters = FleetCounters::default();
    for i in 0..n {
        tokio::spawn(worker(
            format!("{prefix}{i}"),
            i,
            control.to_string(),
            counters.clone(),
        ));
    }
    counters
}

/// One simulated worker, forever: connect, hello, ready every second;
/// on a closed connection, wait a random moment and start over.
async fn worker(name: String, i: usize, control: String, counters: FleetCounters) {
    let session = format!("{:016x}", rand::random::<u64>());
    loop {
        let Ok(mut socket) = connect_dealer(&control, Duration::from_secs(5)).await else {
            tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % 1000)).await;
            continue;
        };
        let mut monitor = socket.monitor();
        let (mut tx, mut rx) = socket.split();
        let hello = Body::Hello {
            worker: name.clone(),
            session: session.clone(),
            device: DeviceProps::parse(&format!("devicegroup:fleet{}", i % 20)).unwrap(),
            running: vec![],
        };
        let _ = tx.send(frames(&hello)).await;
        let mut up = false;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if up && tx.send(frames(&Body::Ready)).await.is_err() {
                        break;
                    }
                    if !up && tx.send(frames(&hello)).await.is_err() {
                        break;
                    }
                }
                m = rx.recv() => match m {
                    Ok(m) => {
                        if let Ok(env) = decode(m.into_vec()) {
                            if env.body.kind() == "welcome" && !up {
                                up = true;
                                counters.registered.fetch_add(1, Ordering::Relaxed);
                                counters.welcomes.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    Err(_) => break,
                },
                e = futures::StreamExt::next(&mut monitor) => {
                    if matches!(e, Some(zeromq::SocketEvent::Disconnected(_)) | None) {
                        break;
                    }
                }
            }
        }
        if up {
            counters.registered.fetch_sub(1, Ordering::Relaxed);
        }
        // A real worker's first retry is immediate, then backs off with
        // jitter; spread the storm over up to a second here.
        tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % 1000)).await;
    }
}
