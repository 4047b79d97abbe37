//! A fleet of simulated workers speaking the real protocol over real
//! sockets from one process: the load generator behind
//! `examples/fleet.rs` and the scale tests. A simulated worker registers
//! (after a Noise handshake with its own key when the fleet is secured),
//! repeats `ready` every second, and — like a real worker — reconnects
//! with a jittered delay when its connection closes (a server restart).
//! Given endpoint lists (`"tcp://a:5555, tcp://b:5555"`), it goes to the
//! next server in the list after every failed or closed connection, as a
//! real worker does when the leader changes.

use crate::protocol::*;
use crate::security::{link, Channel, KeyPair, PublicKey, SecurityError};
use crate::transport::{connect_dealer, to_message};
use bytes::Bytes;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use zeromq::prelude::*;

fn plain(body: &Body) -> Vec<Bytes> {
    encode(&Header::best_effort(body.class(), None), body, None)
}

/// Seals a message when the connection is secured.
fn wire(channel: &mut Option<Channel>, frames: Vec<Bytes>) -> zeromq::ZmqMessage {
    to_message(match channel {
        Some(c) => c.seal(&frames),
        None => frames,
    })
}

/// How a simulated fleet authenticates.
#[derive(Clone)]
pub enum FleetSecurity {
    /// Plaintext, for a server with `security = "none"`.
    None,
    /// Worker `i` uses `keys[i]` (allow-listed under its name) and pins
    /// `server`.
    Noise {
        server: PublicKey,
        keys: Arc<Vec<KeyPair>>,
    },
}

/// Key pairs for `n` simulated workers `{prefix}{i}`: read from
/// `private_dir/{prefix}{i}.key` when there, otherwise generated and
/// written there; each public key is allow-listed as
/// `workers_dir/{prefix}{i}.pub` (a running server picks them up within a
/// second).
pub fn fleet_keys(
    private_dir: &Path,
    workers_dir: &Path,
    prefix: &str,
    n: usize,
) -> Result<Vec<KeyPair>, SecurityError> {
    let mut keys = Vec::with_capacity(n);
    for i in 0..n {
        let base = private_dir.join(format!("{prefix}{i}"));
        let key = base.with_extension("key");
        let pair = if key.exists() {
            KeyPair::read(&key)?
        } else {
            let pair = KeyPair::generate();
            pair.write(&base)?;
            pair
        };
        let allowed = workers_dir.join(format!("{prefix}{i}.pub"));
        if PublicKey::read(&allowed).ok() != Some(pair.public) {
            pair.public.write(&allowed)?;
        }
        keys.push(pair);
    }
    Ok(keys)
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
    /// Handshakes that failed (refused, timed out, or not answered).
    pub handshake_failures: Arc<AtomicUsize>,
    /// Handshakes the server turned away as busy (admission control; the
    /// worker retries after a pause).
    pub handshakes_busy: Arc<AtomicUsize>,
    /// The longest gap between two server heartbeats one worker received
    /// on one connection, in ms (secured fleets only: each worker reads
    /// the signed heartbeats on its SUB and checks them as a real worker
    /// does, PROTOCOL.md §15.4).
    pub worst_heartbeat_gap_ms: Arc<AtomicU64>,
    /// Broadcasts a secured worker refused (forged, replayed, stale).
    pub broadcasts_refused: Arc<AtomicUsize>,
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

    pub fn handshake_failures(&self) -> usize {
        self.handshake_failures.load(Ordering::Relaxed)
    }

    pub fn handshakes_busy(&self) -> usize {
        self.handshakes_busy.load(Ordering::Relaxed)
    }

    pub fn worst_heartbeat_gap(&self) -> Duration {
        Duration::from_millis(self.worst_heartbeat_gap_ms.load(Ordering::Relaxed))
    }
}

/// Starts `n` simulated workers named `{prefix}{i}` on the tokio runtime,
/// in device groups `fleet0` … `fleet19`. With `chatty_lines > 0` each one
/// takes the tasks it is dispatched and sends that many log lines (in
/// batches of 500, as fast as the socket takes them) before reporting.
/// `control` and `events` may list several servers (comma-separated, one
/// events endpoint per control endpoint, in the same order); worker `i`
/// starts at server `i % n` so a fleet probes all of them.
pub fn start(
    control: &str,
    events: &str,
    prefix: &str,
    n: usize,
    chatty_lines: usize,
    security: FleetSecurity,
) -> FleetCounters {
    let counters = FleetCounters {
        chatty_lines,
        ..FleetCounters::default()
    };
    let servers: Arc<Vec<(String, String)>> = Arc::new(
        crate::settings::endpoints(control)
            .into_iter()
            .zip(crate::settings::endpoints(events))
            .collect(),
    );
    assert!(
        !servers.is_empty(),
        "fleet: no control endpoint in {control:?} (or no events endpoint in {events:?})"
    );
    for i in 0..n {
        let credentials = match &security {
            FleetSecurity::None => None,
            FleetSecurity::Noise { server, keys } => keys.get(i).map(|k| (k.clone(), *server)),
        };
        tokio::spawn(worker(
            format!("{prefix}{i}"),
            i,
            servers.clone(),
            credentials,
            counters.clone(),
        ));
    }
    counters
}

/// A random pause of up to a second before reconnecting: a real worker's
/// first retry is immediate, then backs off with jitter; the storm is
/// spread over up to a second here.
async fn pause() {
    tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % 1000)).await;
}

/// One connection of a simulated worker: the DEALER, with security its
/// handshake (counted when busy or failed) and the signed heartbeats'
/// subscription.
async fn connect(
    control: &str,
    events: &str,
    credentials: Option<&(KeyPair, PublicKey)>,
    counters: &FleetCounters,
) -> Option<(
    zeromq::DealerSocket,
    Option<crate::security::Channel>,
    Option<zeromq::SubSocket>,
)> {
    let mut socket = connect_dealer(control, Duration::from_secs(5)).await.ok()?;
    let Some((key, server)) = credentials else {
        return Some((socket, None, None));
    };
    let channel = match link::handshake(&mut socket, key, server, Duration::from_secs(5)).await {
        Ok((c, _)) => c,
        Err(link::LinkError::Busy(_)) => {
            counters.handshakes_busy.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Err(_) => {
            counters.handshake_failures.fetch_add(1, Ordering::Relaxed);
            return None;
        }
    };
    // Secured: heartbeats come signed on the events port.
    let sub = crate::transport::connect_sub(events, &["hb"], Duration::from_secs(5))
        .await
        .ok()?;
    Some((socket, Some(channel), Some(sub)))
}

/// One simulated worker, forever: connect, handshake (secured), hello,
/// ready every second; on a closed connection, wait a random moment and
/// start over.
async fn worker(
    name: String,
    i: usize,
    servers: Arc<Vec<(String, String)>>,
    credentials: Option<(KeyPair, PublicKey)>,
    counters: FleetCounters,
) {
    let session = format!("{:016x}", rand::random::<u64>());
    let mut next = i;
    loop {
        let (control, events) = &servers[next % servers.len()];
        next = next.wrapping_add(1);
        let Some((mut socket, mut channel, mut sub)) =
            connect(control, events, credentials.as_ref(), &counters).await
        else {
            pause().await;
            continue;
        };
        let mut listener: Option<crate::security::broadcast::Listener> = None;
        let mut monitor = socket.monitor();
        let (mut tx, mut rx) = socket.split();
        let hello = Body::Hello {
            version: None,
            worker: name.clone(),
            session: session.clone(),
            device: DeviceProps::parse(&format!("devicegroup:fleet{}", i % 20)).unwrap(),
            running: vec![],
        };
        let _ = tx.send(wire(&mut channel, plain(&hello))).await;
        let mut up = false;
        let mut seq = 0u64;
        let mut last_heartbeat: Option<Instant> = None;
        // A dispatch is resent until acknowledged: run each attempt once.
        let mut last: Option<(TaskId, u32)> = None;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut unanswered = 0u32;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    // A server that does not welcome us in 10 s (frozen,
                    // deposed) is left for the next one in the list.
                    if !up {
                        unanswered += 1;
                        if unanswered > 10 {
                            break;
                        }
                    }
                    let body = if up { Body::Ready } else { hello.clone() };
                    if tx.send(wire(&mut channel, plain(&body))).await.is_err() {
                        break;
                    }
                }
                m = rx.recv() => match m {
                    Ok(m) => {
                        let frames = match channel.as_mut() {
                            Some(c) => match c.open(m.into_vec()) {
                                Ok(f) => f,
                                // Not from the server: start over, as a
                                // real worker does.
                                Err(_) => break,
                            },
                            None => m.into_vec(),
                        };
                        let Ok(env) = decode(frames) else { continue };
                        match &env.body {
                            // A standby: the next server of the list.
                            Body::Error { code: crate::protocol::ErrorCode::NotLeader, .. } => break,
                            Body::Welcome { .. } if !up => {
                                up = true;
                                counters.registered.fetch_add(1, Ordering::Relaxed);
                                counters.welcomes.fetch_add(1, Ordering::Relaxed);
                                listener = crate::security::broadcast::Listener::from_welcome(&env.body, Instant::now());
                            }
                            Body::Dispatch { spec } => {
                                let ack = Body::Ack { seq: env.header.seq };
                                if tx.send(wire(&mut channel, plain(&ack))).await.is_err() {
                                    break;
                                }
                                let this = (spec.task.clone(), spec.attempt);
                                if last.as_ref() == Some(&this) {
                                    continue;
                                }
                                last = Some(this);
                                if counters.chatty_lines > 0 {
                                    if run_task(&mut tx, &mut channel, &mut seq, spec, counters.chatty_lines)
                                        .await
                                        .is_err()
                                    {
                                        break;
                                    }
                                    counters.finished.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            _ => {}
                        }
                    }
                    Err(_) => break,
                },
                m = async { sub.as_mut()?.recv().await.ok() }, if sub.is_some() => {
                    let Some(m) = m else { break };
                    let opened = listener.as_mut().map(|l| l.open(Instant::now(), m.into_vec()));
                    let Some(Ok(frames)) = opened else {
                        counters.broadcasts_refused.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    if let Ok(Envelope { body: Body::ServerHeartbeat { .. }, .. }) = decode(frames) {
                        let now = Instant::now();
                        if let Some(l) = last_heartbeat {
                            let gap = (now - l).as_millis().min(u64::MAX as u128) as u64;
                            counters.worst_heartbeat_gap_ms.fetch_max(gap, Ordering::Relaxed);
                        }
                        last_heartbeat = Some(now);
                    }
                }
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
        pause().await;
    }
}

fn mandatory(body: &Body, seq: u64, task: &TaskId) -> Vec<Bytes> {
    let h = Header {
        v: PROTOCOL_VERSION,
        class: body.class(),
        mandatory: true,
        seq,
        task: Some(task.clone()),
        epoch: None,
    };
    encode(&h, body, None)
}

/// A chatty worker's task: accept, `lines` log lines in batches of 500,
/// report. Acks are not awaited (a load generator, not a worker).
async fn run_task(
    tx: &mut zeromq::DealerSendHalf,
    channel: &mut Option<Channel>,
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
    tx.send(wire(channel, mandatory(&accepted, *seq, &task)))
        .await?;
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
        let h = Header::best_effort(Class::Log, Some(&task));
        tx.send(wire(channel, encode(&h, &log, None))).await?;
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
        file_problems: vec![],
    };
    tx.send(wire(channel, mandatory(&finished, *seq, &task)))
        .await?;
    Ok(())
}
