//! A lease's hold (PROTOCOL.md §18.3): no conductor runs; the worker
//! keeps the device for its holder until the server cancels the task.
//! What the device printed in the last `[serial] pre_task` opens the
//! transcript and the live output; from then on every byte from the
//! device goes to the server raw (for the consoles, numbered: a gap is
//! output lost, counted) and line by line into the task's log (the
//! transcript), with what was typed, by whom, and every power action.

use crate::protocol::{Outcome, Stream, TaskSpec};
use crate::worker::config::WorkerConfig;
use crate::worker::task::channel::{HoldCommand, ResponseChannel, TaskEvent};
use crate::worker::task::conductor::Stop;
use crate::worker::task::console::{escape, Console};
use crate::worker::task::power;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tracing::info;

/// Console output replayed at the start of a hold, at most.
const PRE_HOLD_BYTES: usize = 256 * 1024;
/// Typed bytes gathered into one transcript line, at most.
const INPUT_LINE_BYTES: usize = 256;
/// Most console bytes sent to the server in one message.
const CHUNK: usize = crate::protocol::leasing::MAX_CONSOLE_OUTPUT_BYTES;

/// Holds the device for the lease in `spec` until `stop` says so.
pub(super) async fn hold(
    cfg: &WorkerConfig,
    console: Option<Console>,
    spec: &TaskSpec,
    mut channel: ResponseChannel,
    mut commands: mpsc::Receiver<HoldCommand>,
    mut stop: watch::Receiver<Stop>,
) {
    let lease = spec.hold.clone().expect("a hold's spec");
    announce(cfg, spec, &mut channel);
    let (task, attempt) = channel.ids();
    let send_bytes = |channel: &ResponseChannel, offset: u64, bytes: Vec<u8>| {
        for (i, piece) in bytes.chunks(CHUNK).enumerate() {
            channel.event(TaskEvent::ConsoleBytes {
                task: task.clone(),
                attempt,
                offset: offset + (i * CHUNK) as u64,
                bytes: bytes::Bytes::copy_from_slice(piece),
            });
        }
    };
    let (mut lines, mut raw) = (None, None);
    if let Some(c) = &console {
        if let Err(why) = c.available() {
            channel.log(
                Stream::Worker,
                format!("the device's console is unavailable: {why}"),
            );
        }
        let since =
            crate::protocol::limits::unix_ms_now().saturating_sub(c.pre_task().as_millis() as u64);
        let before = c.recent(since, PRE_HOLD_BYTES).unwrap_or_default();
        lines = Some(c.tap());
        raw = Some(c.raw_tap(before.len() as u64));
        for line in before.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            channel.log(Stream::Serial, escape(line));
        }
        send_bytes(&channel, 0, before);
    } else {
        channel.log(
            Stream::Worker,
            "this worker has no console ([serial] port): the lease has power only".into(),
        );
    }
    let (power_tx, mut power_rx) = mpsc::channel::<(
        u64,
        crate::protocol::PowerAction,
        String,
        power::PowerOutcome,
    )>(16);
    let mut typed: Option<(String, Vec<u8>)> = None;
    let flush_typed = |channel: &mut ResponseChannel, typed: &mut Option<(String, Vec<u8>)>| {
        if let Some((by, bytes)) = typed.take() {
            channel.log(Stream::Worker, format!("[input {by}] {}", escape(&bytes)));
        }
    };
    let mut quiet = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() != Stop::Running {
                    break;
                }
            }
            Some(line) = async { match lines.as_mut() { Some(l) => l.recv().await, None => None } } => {
                channel.log(Stream::Serial, escape(&line.bytes));
            }
            Some((offset, bytes)) = async { match raw.as_mut() { Some(r) => r.recv().await, None => None } } => {
                send_bytes(&channel, offset, bytes);
            }
            Some(command) = commands.recv() => match command {
                HoldCommand::Input { by, stream, offset, bytes } => {
                    let bytes = match &console {
                        Some(c) => c.send_once(&stream, offset, &bytes),
                        None => Vec::new(),
                    };
                    if bytes.is_empty() {
                        continue;
                    }
                    if typed.as_ref().is_some_and(|(b, _)| *b != by) {
                        flush_typed(&mut channel, &mut typed);
                    }
                    let (_, buf) = typed.get_or_insert_with(|| (by, Vec::new()));
                    buf.extend_from_slice(&bytes);
                    if buf.len() >= INPUT_LINE_BYTES || bytes.iter().any(|b| *b == b'\r' || *b == b'\n') {
                        flush_typed(&mut channel, &mut typed);
                    }
                }
                HoldCommand::Power { id, action, by } => {
                    channel.log(Stream::Worker, format!("[power] {action} asked by {by}"));
                    info!(task = %spec.task, %action, by = %by, "power action for a lease");
                    let (cfg, tx) = (cfg.power.clone(), power_tx.clone());
                    tokio::spawn(async move {
                        let outcome = power::act(&cfg, action).await;
                        let _ = tx.send((id, action, by, outcome)).await;
                    });
                }
            },
            Some((id, action, by, outcome)) = power_rx.recv() => {
                channel.log(
                    Stream::Worker,
                    format!(
                        "[power] {action} by {by}: {}, state {}{}",
                        if outcome.ok { "done" } else { "failed" },
                        outcome.state,
                        if outcome.message.is_empty() { String::new() } else { format!(" ({})", outcome.message) }
                    ),
                );
                channel.event(TaskEvent::PowerDone {
                    task: task.clone(),
                    attempt,
                    id,
                    action,
                    state: outcome.state,
                    ok: outcome.ok,
                    message: outcome.message,
                });
            }
            _ = quiet.tick() => flush_typed(&mut channel, &mut typed),
        }
    }
    flush_typed(&mut channel, &mut typed);
    let_go(cfg, console.as_ref(), channel, &lease.lease);
}

/// The transcript's first line, and the worker's log.
fn announce(cfg: &WorkerConfig, spec: &TaskSpec, channel: &mut ResponseChannel) {
    let lease = spec.hold.as_ref().expect("a hold's spec");
    let holder = lease.holder.clone().unwrap_or_else(|| "-".into());
    channel.log(
        Stream::Worker,
        format!(
            "worker {} holds its device for lease {} of {holder}{}",
            cfg.name,
            lease.lease,
            if lease.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", lease.reason)
            }
        ),
    );
    info!(task = %spec.task, lease = %lease.lease, holder = %holder, "holding the device for a lease");
}

/// The hold is over: the console's taps end, the report goes.
fn let_go(
    cfg: &WorkerConfig,
    console: Option<&Console>,
    mut channel: ResponseChannel,
    lease: &str,
) {
    if let Some(c) = console {
        c.raw_untap();
        let dropped = c.untap();
        if dropped > 0 {
            channel.log(
                Stream::Worker,
                format!("{dropped} console lines were not taken into the transcript in time (the console's record on the worker has them)"),
            );
        }
    }
    channel.log(
        Stream::Worker,
        format!(
            "worker {} lets go of its device: lease {lease} over",
            cfg.name
        ),
    );
    channel.finish(
        Outcome {
            cancelled: true,
            ..Outcome::default()
        },
        Vec::new(),
    );
}

/// A testrun's task on a leased device (`spec.on_lease`): the device's
/// raw output also goes to the lease's consoles, and what the holder
/// types reaches the device, while the conductor runs.
pub(super) struct LeaseTap {
    console: Console,
    raw: mpsc::Receiver<(u64, Vec<u8>)>,
    commands: mpsc::Receiver<HoldCommand>,
}

/// What a [`LeaseTap`] has for the task.
pub(super) enum Tapped {
    Output(u64, Vec<u8>),
    Command(HoldCommand),
}

impl LeaseTap {
    pub(super) fn begin(
        console: Option<&Console>,
        spec: &TaskSpec,
        commands: mpsc::Receiver<HoldCommand>,
    ) -> Option<LeaseTap> {
        spec.on_lease.as_ref()?;
        let console = console?.clone();
        let raw = console.raw_tap(0);
        Some(LeaseTap {
            console,
            raw,
            commands,
        })
    }

    /// The next thing to pass on (never, without a tap).
    pub(super) async fn next(tap: &mut Option<LeaseTap>) -> Option<Tapped> {
        let Some(t) = tap.as_mut() else {
            return std::future::pending().await;
        };
        tokio::select! {
            Some((offset, bytes)) = t.raw.recv() => Some(Tapped::Output(offset, bytes)),
            Some(command) = t.commands.recv() => Some(Tapped::Command(command)),
            else => None,
        }
    }

    pub(super) fn pass(tap: &Option<LeaseTap>, got: Tapped, channel: &mut ResponseChannel) {
        let Some(t) = tap else { return };
        match got {
            Tapped::Output(offset, bytes) => {
                let (task, attempt) = channel.ids();
                for (i, piece) in bytes.chunks(CHUNK).enumerate() {
                    channel.event(TaskEvent::ConsoleBytes {
                        task: task.clone(),
                        attempt,
                        offset: offset + (i * CHUNK) as u64,
                        bytes: bytes::Bytes::copy_from_slice(piece),
                    });
                }
            }
            Tapped::Command(HoldCommand::Input {
                by,
                stream,
                offset,
                bytes,
            }) => {
                let bytes = t.console.send_once(&stream, offset, &bytes);
                if !bytes.is_empty() {
                    channel.log(Stream::Worker, format!("[input {by}] {}", escape(&bytes)));
                }
            }
            // The server asks the hold, not a testrun, for power.
            Tapped::Command(HoldCommand::Power { .. }) => {}
        }
    }
}

impl Drop for LeaseTap {
    fn drop(&mut self) {
        self.console.raw_untap();
    }
}
