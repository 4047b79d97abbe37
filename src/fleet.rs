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
    /// Log lines a chatty worker sends for each task it is given (0: idle
    /// workers that never take a task).
    pub chatty_lines: usize,
    /// Tasks finished (reported) by the fleet.
    pub finished: Arc<AtomicUsize>,
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

    pub fn finished(&self) -> usize {
        self.finished.load(Ordering::Relaxed)
    }
}

/// Starts `n` simulated workers named `{prefix}{i}` on the tokio runtime,
/// in device groups `fleet0` … `fleet19`. With `chatty_lines > 0` each one
/// takes the tasks it is dispatched and sends that many log lines (in
/// batches of 500, as fast as the socket takes them) before reporting.
pub fn start(control: &str, prefix: &str, n: usize, chatty_lines: usize) -> FleetCounters {
    let counters = FleetCounters {
        chatty_lines,
        ..FleetCounters::default()
    };
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
        let mut seq = 0u64;
        // A dispatch is resent until acknowledged: run each attempt once.
        let mut last: Option<(TaskId, u32)> = None;
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
                            if let Body::Dispatch { spec } = &env.body {
                                let ack = Body::Ack { seq: env.header.seq };
                                if tx.send(frames(&ack)).await.is_err() {
                                    break;
                                }
                                let this = (spec.task.clone(), spec.attempt);
                                if last.as_ref() == Some(&this) {
                                    continue;
                                }
                                last = Some(this);
                                if counters.chatty_lines > 0 {
                                    if run_task(&mut tx, &mut seq, spec, counters.chatty_lines)
                                        .await
                                        .is_err()
                                    {
                                        break;
                                    }
                                    counters.finished.fetch_add(1, Ordering::Relaxed);
                                }
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

fn mandatory(body: &Body, seq: u64, task: &TaskId) -> zeromq::ZmqMessage {
    let h = Header {
        v: PROTOCOL_VERSION,
        class: body.class(),
        mandatory: true,
        seq,
        task: Some(task.clone()),
    };
    to_message(encode(&h, body, None))
}

/// A chatty worker's task: accept, `lines` log lines in batches of 500,
/// report. Acks are not awaited (a load generator, not a worker).
async fn run_task(
    tx: &mut zeromq::DealerSendHalf,
    seq: &mut u64,
    spec: &TaskSpec,
    lines: usize,
) -> Result<(), zeromq::ZmqError> {
    let task = spec.task.clone();
    *seq += 1;
    let accepted = Body::TaskAccepted {
        task: task.clone(),
        attempt: spec.attempt,
    };
    tx.send(mandatory(&accepted, *seq, &task)).await?;
    let mut n = 0u64;
    while (n as usize) < lines {
        let batch: Vec<LogLine> = (0..500.min(lines - n as usize))
            .map(|_| {
                n += 1;
                LogLine {
                    seq: n,
                    stream: Stream::Stdout,
                    text: format!("simulated log line {n} of a chatty worker"),
                }
            })
            .collect();
        let log = Body::Log {
            task: task.clone(),
            attempt: spec.attempt,
            lines: batch,
        };
        let h = Header {
            v: PROTOCOL_VERSION,
            class: Class::Log,
            mandatory: false,
            seq: 0,
            task: Some(task.clone()),
        };
        tx.send(to_message(encode(&h, &log, None))).await?;
    }
    *seq += 1;
    let finished = Body::TaskFinished {
        task: task.clone(),
        attempt: spec.attempt,
        outcome: Outcome {
            exit_code: Some(0),
            ..Outcome::default()
        },
        log_lines: n,
        files: vec![],
    };
    tx.send(mandatory(&finished, *seq, &task)).await?;
    Ok(())
}
