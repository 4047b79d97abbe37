//! `reserve`, `leases`, `release`, `renew`, `lease share|unshare`,
//! `power` and `console`: a person's hold on a device.
//!
//! The console reads the terminal in raw mode (`~.` at the start of a
//! line leaves; said at attach) or, from a pipe, its input as it comes;
//! the device's output goes to stdout as bytes. A lost connection is
//! connected again and the console reattached; input not acknowledged is
//! sent again from where the server has it, so nothing typed is lost or
//! repeated.

use crate::cli::conn::Conn;
use crate::client::leases::{ConsoleEvent, InputStream};
use crate::client::{exit, ClientError};
use crate::protocol::{DeviceLease, DeviceSpec, LeaseAction, LeaseState, PowerAction, Priority};
use crate::text::{ago_short as ago, escape_controls, span_ms};
use std::io::Write;
use std::time::Duration;

fn now_ms() -> u64 {
    crate::protocol::limits::unix_ms_now()
}

fn print_lease(l: &DeviceLease) {
    let now = now_ms();
    let when = match l.state {
        LeaseState::Waiting => format!(
            "waiting{} for {}",
            l.position
                .map_or(String::new(), |p| format!(" (position {p})")),
            ago(now.saturating_sub(l.requested_ms))
        ),
        LeaseState::Held => format!(
            "held on {} for {}, {} left",
            l.worker.as_deref().unwrap_or("-"),
            ago(now.saturating_sub(l.granted_ms.unwrap_or(now))),
            l.until_ms
                .map_or("?".into(), |u| ago(u.saturating_sub(now)))
        ),
        LeaseState::Ended => format!(
            "ended {} ago: {}",
            ago(now.saturating_sub(l.ended_ms.unwrap_or(now))),
            escape_controls(l.ended.as_deref().unwrap_or("-"))
        ),
    };
    crate::outln!(
        "{:<6} {:<8} {:<12} {:<28} {}{}",
        l.lease,
        l.state.to_string(),
        escape_controls(l.holder.as_deref().unwrap_or("-")),
        l.device.to_string(),
        when,
        if l.reason.is_empty() {
            String::new()
        } else {
            format!(" — {}", escape_controls(&l.reason))
        }
    );
}

fn print_one(conn: &Conn, l: &DeviceLease) {
    if conn.json {
        crate::outln!(
            "{}",
            serde_json::to_string_pretty(l).expect("lease serialises")
        );
    } else {
        print_lease(l);
    }
}

pub(crate) struct ReserveArgs {
    pub spec: String,
    pub duration: Duration,
    pub reason: String,
    pub wait: bool,
    pub keep: bool,
    pub priority: Priority,
    pub queue_anyway: bool,
}

/// `reserve`: prints the lease id at once; with `--wait`, waits for the
/// grant (showing the queue place); with `--keep`, keeps it alive until
/// interrupted, then releases it.
pub(crate) async fn reserve(conn: &Conn, a: ReserveArgs) -> Result<i32, ClientError> {
    let device = match DeviceSpec::parse(&a.spec) {
        Ok(d) => d,
        Err(e) => {
            crate::errln!("ots-submit: bad device spec {:?}: {e}", a.spec);
            return Ok(exit::USAGE);
        }
    };
    let mut client = conn.connect().await?;
    let ms = a.duration.as_millis().min(u128::from(u64::MAX)) as u64;
    let lease = client
        .reserve(device, ms, a.reason, a.priority, a.queue_anyway)
        .await?;
    let id = lease.lease.clone();
    if conn.json {
        print_one(conn, &lease);
    } else {
        crate::outln!("{id}");
    }
    if !a.wait && !a.keep {
        return Ok(exit::PASS);
    }
    let mut last_place = None;
    let mut held_said = false;
    loop {
        let l = client
            .lease_act(&id, LeaseAction::Keep, false, None, None)
            .await?;
        match l.state {
            LeaseState::Waiting => {
                if l.position != last_place {
                    crate::errln!(
                        "lease {id}: waiting for {}{}",
                        l.device,
                        l.position
                            .map_or(String::new(), |p| format!(", position {p} in its queue"))
                    );
                    last_place = l.position;
                }
            }
            LeaseState::Held if !held_said => {
                crate::errln!(
                    "lease {id}: granted on worker {} until {}",
                    l.worker.as_deref().unwrap_or("-"),
                    l.until_ms.map_or("?".into(), crate::clock::iso)
                );
                held_said = true;
                if !a.keep {
                    return Ok(exit::PASS);
                }
            }
            LeaseState::Held => {}
            LeaseState::Ended => {
                crate::errln!(
                    "lease {id} ended: {}",
                    escape_controls(l.ended.as_deref().unwrap_or("-"))
                );
                return Ok(exit::CANCELLED);
            }
        }
        let pause = if held_said {
            Duration::from_secs(30)
        } else {
            Duration::from_millis(200)
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = tokio::signal::ctrl_c() => {
                let _ = client.lease_act(&id, LeaseAction::Release, false, None, None).await;
                crate::errln!("lease {id} released");
                return Ok(exit::PASS);
            }
        }
    }
}

pub(crate) async fn leases(conn: &Conn, all: bool) -> Result<i32, ClientError> {
    let mut client = conn.connect().await?;
    let leases = client.leases(all).await?;
    if conn.json {
        crate::outln!(
            "{}",
            serde_json::to_string_pretty(&leases).expect("leases serialise")
        );
        return Ok(exit::PASS);
    }
    if leases.is_empty() {
        crate::outln!("no leases");
        return Ok(exit::PASS);
    }
    crate::outln!(
        "{:<6} {:<8} {:<12} {:<28} SINCE/UNTIL",
        "LEASE",
        "STATE",
        "HOLDER",
        "DEVICE"
    );
    for l in &leases {
        print_lease(l);
    }
    Ok(exit::PASS)
}

pub(crate) async fn act(
    conn: &Conn,
    lease: &str,
    action: LeaseAction,
    force: bool,
    duration: Option<Duration>,
    user: Option<String>,
) -> Result<i32, ClientError> {
    let mut client = conn.connect().await?;
    let ms = duration.map(|d| d.as_millis().min(u128::from(u64::MAX)) as u64);
    let l = client.lease_act(lease, action, force, ms, user).await?;
    if conn.json {
        print_one(conn, &l);
        return Ok(exit::PASS);
    }
    match action {
        LeaseAction::Release => crate::outln!("lease {} released", l.lease),
        LeaseAction::Renew => crate::outln!(
            "lease {} renewed for {}: until {}",
            l.lease,
            span_ms(l.duration_ms),
            l.until_ms
                .map_or("its grant + the duration".into(), crate::clock::iso)
        ),
        _ => print_lease(&l),
    }
    Ok(exit::PASS)
}

pub(crate) async fn power(
    conn: &Conn,
    lease: &str,
    action: PowerAction,
) -> Result<i32, ClientError> {
    let mut client = conn.connect().await?;
    let (ok, state, message) = client.power(lease, action).await?;
    if conn.json {
        crate::outln!(
            "{}",
            serde_json::json!({"lease": lease, "action": action, "ok": ok, "state": state, "message": message})
        );
    } else {
        crate::outln!(
            "{state}{}",
            if message.is_empty() {
                String::new()
            } else {
                format!(" ({})", escape_controls(&message))
            }
        );
    }
    Ok(if ok { exit::PASS } else { exit::ERROR })
}

/// The terminal in raw mode while it lives (restored on drop).
struct RawTerminal(Option<nix::sys::termios::Termios>);

impl RawTerminal {
    fn enter() -> RawTerminal {
        use nix::sys::termios::*;
        let stdin = std::io::stdin();
        let Ok(saved) = tcgetattr(&stdin) else {
            return RawTerminal(None);
        };
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        if tcsetattr(&stdin, SetArg::TCSANOW, &raw).is_err() {
            return RawTerminal(None);
        }
        RawTerminal(Some(saved))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                saved,
            );
        }
    }
}

/// Reads stdin on a thread of its own into `tx` (a terminal: byte by
/// byte as typed, `~.` after a newline ends it; a pipe: as it comes).
fn read_input(tx: tokio::sync::mpsc::Sender<Vec<u8>>, terminal: bool) {
    let _ = std::thread::Builder::new()
        .name("ots-console-input".into())
        .spawn(move || {
            use std::io::Read;
            let mut stdin = std::io::stdin().lock();
            let mut buf = [0u8; 4096];
            let mut at_line_start = true;
            let mut tilde = false;
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut out = Vec::with_capacity(n);
                for &b in &buf[..n] {
                    if terminal {
                        if tilde {
                            tilde = false;
                            if b == b'.' {
                                if !out.is_empty() {
                                    let _ = tx.blocking_send(out);
                                }
                                return;
                            }
                            out.push(b'~');
                        } else if at_line_start && b == b'~' {
                            tilde = true;
                            continue;
                        }
                        at_line_start = b == b'\r' || b == b'\n';
                    }
                    out.push(b);
                }
                if !out.is_empty() && tx.blocking_send(out).is_err() {
                    return;
                }
            }
        });
}

/// `console`: attaches, replays the last `since`, and serves until the
/// lease ends, the server closes it, or the input ends.
pub(crate) async fn console(
    conn: &Conn,
    lease: &str,
    since: Duration,
    linger: Duration,
) -> Result<i32, ClientError> {
    use std::io::IsTerminal;
    let terminal = std::io::stdin().is_terminal();
    let (tx, mut input) = tokio::sync::mpsc::channel(16);
    // Handed to the input reader once attached as the holder: its end
    // (EOF, `~.`) is the input's end.
    let mut tx = Some(tx);
    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let mut stream = InputStream::new();
    let mut input_open = true;
    let mut seen = None;
    let mut lost_total = 0u64;
    let mut _raw = None;
    let mut started = false;
    let mut since_ms = since
        .as_millis()
        .min(u128::from(crate::protocol::leasing::MAX_REPLAY_MS)) as u64;
    let mut attempts = 0u32;
    let outcome = loop {
        let mut client = match conn.connect().await {
            Ok(c) => c,
            Err(e) if started && attempts < 30 => {
                attempts += 1;
                crate::errln!("\r\n[ots: connection lost ({e}); connecting again]\r");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let session = client.console(
            lease,
            since_ms,
            &mut stream,
            &mut input,
            &mut input_open,
            &mut seen,
            linger,
            &events_tx,
        );
        tokio::pin!(session);
        let result = loop {
            tokio::select! {
                r = &mut session => break r,
                Some(event) = events.recv() => {
                    show(event, terminal, &mut started, &mut _raw, &mut lost_total, &mut tx, lease);
                }
            }
        };
        while let Ok(event) = events.try_recv() {
            show(
                event,
                terminal,
                &mut started,
                &mut _raw,
                &mut lost_total,
                &mut tx,
                lease,
            );
        }
        match result {
            Ok(end) => break end,
            Err(ClientError::Refused { code, message }) => {
                drop(_raw.take());
                return Err(ClientError::Refused { code, message });
            }
            Err(e) if started && attempts < 30 => {
                attempts += 1;
                since_ms = crate::protocol::leasing::MAX_REPLAY_MS; // what was missed; `seen` skips the rest
                crate::errln!("\r\n[ots: connection lost ({e}); attaching again]\r");
            }
            Err(e) => return Err(e),
        }
    };
    drop(_raw.take());
    if lost_total > 0 {
        crate::errln!("[ots: {lost_total} bytes of console output were lost on the way]");
    }
    match outcome {
        Some(reason) => {
            crate::errln!(
                "[ots: console of lease {lease} closed: {}]",
                escape_controls(&reason)
            );
            Ok(if reason == "detached" {
                exit::PASS
            } else {
                exit::CANCELLED
            })
        }
        None => Ok(exit::PASS),
    }
}

#[allow(clippy::too_many_arguments)]
fn show(
    event: ConsoleEvent,
    terminal: bool,
    started: &mut bool,
    raw: &mut Option<RawTerminal>,
    lost_total: &mut u64,
    tx: &mut Option<tokio::sync::mpsc::Sender<Vec<u8>>>,
    lease: &str,
) {
    match event {
        ConsoleEvent::Attached { writer, worker } => {
            if !*started {
                *started = true;
                crate::errln!(
                    "[ots: console of lease {lease} on worker {worker}, {}{}]",
                    if writer { "you may type" } else { "read only" },
                    if terminal {
                        "; ~. at the start of a line leaves"
                    } else {
                        ""
                    }
                );
                if terminal {
                    *raw = Some(RawTerminal::enter());
                }
                if writer {
                    if let Some(tx) = tx.take() {
                        read_input(tx, terminal);
                    }
                }
            }
        }
        ConsoleEvent::Output { bytes, lost } => {
            if lost > 0 {
                *lost_total += lost;
                crate::errln!("\r\n[ots: {lost} bytes of console output lost here]\r");
            }
            let mut out = std::io::stdout().lock();
            // A closed stdout is the reader's choice: counted out, not fatal.
            let _ = out.write_all(&bytes).and_then(|()| out.flush());
        }
        ConsoleEvent::Closed(why) => {
            crate::errln!("\r\n[ots: {}]\r", escape_controls(&why));
        }
    }
}
