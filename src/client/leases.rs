//! Leases from the client's side (PROTOCOL.md §18): reserve, list, act,
//! power, and a console session — attached on this connection, output
//! handed over as it comes (gaps counted), input sent as one numbered
//! stream whose unacknowledged tail is sent again until the server says
//! it has it, so every typed byte reaches the device once, in order, even
//! when an answer or the connection is lost.

use super::*;
use crate::protocol::{DeviceLease, DeviceSpec, LeaseAction, PowerAction, Priority};

/// Bytes typed and not yet acknowledged, at most: past it the console
/// stops reading its input (the terminal or pipe waits).
pub const MAX_UNACKED_INPUT: usize = 64 * 1024;
/// An input message not acknowledged within this is sent again.
const RESEND_AFTER: Duration = Duration::from_millis(500);
/// A console that heard nothing for this long pings the server; one whose
/// ping is not answered within as long again counts the connection lost
/// (a server that died says nothing on a DEALER socket).
const QUIET: Duration = Duration::from_secs(2);

/// What a console session hands to its user.
#[derive(Debug, PartialEq)]
pub enum ConsoleEvent {
    Attached {
        writer: bool,
        worker: String,
    },
    /// Device output; `lost`: bytes before these that never arrived.
    Output {
        bytes: Bytes,
        lost: u64,
    },
    /// The server closed the console, and why.
    Closed(String),
}

/// The input side of a console: one stream, numbered from 0.
#[derive(Debug)]
pub struct InputStream {
    pub id: String,
    /// Bytes from `acked` on, not yet acknowledged.
    pending: Vec<u8>,
    acked: u64,
    /// How far of `pending` went out, and when last.
    sent: usize,
    sent_at: Option<tokio::time::Instant>,
}

impl InputStream {
    pub fn new() -> InputStream {
        InputStream {
            id: format!("in-{:016x}", rand::random::<u64>()),
            pending: Vec::new(),
            acked: 0,
            sent: 0,
            sent_at: None,
        }
    }

    pub fn room(&self) -> usize {
        MAX_UNACKED_INPUT.saturating_sub(self.pending.len())
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
    }

    pub fn is_settled(&self) -> bool {
        self.pending.is_empty()
    }

    /// The server has the stream up to `have`.
    fn acknowledged(&mut self, have: u64) {
        if have <= self.acked {
            return;
        }
        let n = ((have - self.acked) as usize).min(self.pending.len());
        self.pending.drain(..n);
        self.acked += n as u64;
        self.sent = self.sent.saturating_sub(n);
        if self.pending.is_empty() {
            self.sent_at = None;
        }
    }

    /// The next piece to send (offset, bytes), if any is due.
    fn next(&mut self, now: tokio::time::Instant) -> Option<(u64, Vec<u8>)> {
        if self
            .sent_at
            .is_some_and(|at| now.duration_since(at) >= RESEND_AFTER)
        {
            self.sent = 0; // unanswered: everything unacknowledged again
        }
        if self.sent >= self.pending.len() {
            return None;
        }
        let end =
            (self.sent + crate::protocol::leasing::MAX_CONSOLE_INPUT_BYTES).min(self.pending.len());
        let piece = self.pending[self.sent..end].to_vec();
        let offset = self.acked + self.sent as u64;
        self.sent = end;
        self.sent_at = Some(now);
        Some((offset, piece))
    }
}

impl Default for InputStream {
    fn default() -> Self {
        InputStream::new()
    }
}

impl Client {
    pub async fn reserve(
        &mut self,
        device: DeviceSpec,
        duration_ms: u64,
        reason: String,
        priority: Priority,
        queue_anyway: bool,
    ) -> Result<DeviceLease, ClientError> {
        match self
            .request(|request| Body::Reserve {
                request,
                device,
                duration_ms,
                reason,
                priority,
                queue_anyway,
            })
            .await?
        {
            (Body::Leases { mut leases, .. }, _) if leases.len() == 1 => Ok(leases.remove(0)),
            (other, _) => Err(unexpected("leases", &other)),
        }
    }

    pub async fn leases(&mut self, all: bool) -> Result<Vec<DeviceLease>, ClientError> {
        match self
            .request(|request| Body::ListLeases { request, all })
            .await?
        {
            (Body::Leases { leases, .. }, _) => Ok(leases),
            (other, _) => Err(unexpected("leases", &other)),
        }
    }

    pub async fn lease_act(
        &mut self,
        lease: &str,
        action: LeaseAction,
        force: bool,
        duration_ms: Option<u64>,
        user: Option<String>,
    ) -> Result<DeviceLease, ClientError> {
        let lease = lease.to_string();
        match self
            .request(|request| Body::LeaseAct {
                request,
                lease,
                action,
                force,
                duration_ms,
                user,
            })
            .await?
        {
            (Body::Leases { mut leases, .. }, _) if leases.len() == 1 => Ok(leases.remove(0)),
            (other, _) => Err(unexpected("leases", &other)),
        }
    }

    /// A power action; its answer waits for the worker (up to the
    /// command's own timeout, so this waits longer than a request).
    pub async fn power(
        &mut self,
        lease: &str,
        action: PowerAction,
    ) -> Result<(bool, String, String), ClientError> {
        let lease = lease.to_string();
        let saved = self.timeout;
        self.timeout = self.timeout.max(Duration::from_secs(150));
        let answer = self
            .request(|request| Body::Power {
                request,
                lease,
                action,
            })
            .await;
        self.timeout = saved;
        match answer? {
            (
                Body::PowerResult {
                    ok, state, message, ..
                },
                _,
            ) => Ok((ok, state, message)),
            (other, _) => Err(unexpected("power_result", &other)),
        }
    }

    async fn send_raw(&mut self, body: Body, raw: Option<Bytes>) -> Result<(), ClientError> {
        let header = Header {
            v: PROTOCOL_VERSION,
            class: body.class(),
            mandatory: false,
            seq: body.request().unwrap_or(0),
            task: None,
            epoch: None,
        };
        self.send_body(&header, &body, raw)
            .await
            .map_err(|_| ClientError::Unreachable {
                endpoint: self.endpoint.clone(),
                timeout: self.timeout,
            })
    }

    /// Attaches to `lease`'s console and serves it until the server
    /// closes it (`Ok(Some(reason))`), `input` ends and everything typed
    /// is acknowledged and `linger` passed without output (`Ok(None)`),
    /// or the connection fails (`Err`: the caller may connect again and
    /// call this with the same `stream` — nothing typed is lost or
    /// repeated). `seen`: output offset already shown (a reattach skips
    /// what was shown before).
    #[allow(clippy::too_many_arguments)]
    pub async fn console(
        &mut self,
        lease: &str,
        since_ms: u64,
        stream: &mut InputStream,
        input: &mut tokio::sync::mpsc::Receiver<Vec<u8>>,
        input_open: &mut bool,
        seen: &mut Option<u64>,
        linger: Duration,
        events: &tokio::sync::mpsc::UnboundedSender<ConsoleEvent>,
    ) -> Result<Option<String>, ClientError> {
        let lease = lease.to_string();
        let attach = self.next_request;
        self.next_request += 1;
        self.send_raw(
            Body::ConsoleAttach {
                request: attach,
                lease: lease.clone(),
                since_ms,
            },
            None,
        )
        .await?;
        let mut quiet_since = tokio::time::Instant::now();
        let mut heard = tokio::time::Instant::now();
        let mut pinged: Option<tokio::time::Instant> = None;
        loop {
            let now = tokio::time::Instant::now();
            if now.duration_since(heard) >= QUIET {
                match pinged {
                    Some(at) if now.duration_since(at) >= QUIET => {
                        return Err(ClientError::Unreachable {
                            endpoint: self.endpoint.clone(),
                            timeout: QUIET * 2,
                        });
                    }
                    Some(_) => {}
                    None => {
                        let request = self.next_request;
                        self.next_request += 1;
                        self.send_raw(Body::Ping { request }, None).await?;
                        pinged = Some(now);
                    }
                }
            }
            if *input_open {
                // keep going
            } else if stream.is_settled() && now.duration_since(quiet_since) >= linger {
                let request = self.next_request;
                self.next_request += 1;
                let _ = self
                    .send_raw(
                        Body::ConsoleDetach {
                            request,
                            lease: lease.clone(),
                        },
                        None,
                    )
                    .await;
                return Ok(None);
            }
            while let Some((offset, bytes)) = stream.next(now) {
                let request = self.next_request;
                self.next_request += 1;
                self.send_raw(
                    Body::ConsoleInput {
                        request,
                        lease: lease.clone(),
                        stream: stream.id.clone(),
                        offset,
                    },
                    Some(Bytes::from(bytes)),
                )
                .await?;
            }
            let wake = now + Duration::from_millis(100);
            tokio::select! {
                got = input.recv(), if *input_open && stream.room() > 0 => match got {
                    Some(bytes) => stream.push(&bytes),
                    None => {
                        *input_open = false;
                        quiet_since = tokio::time::Instant::now();
                    }
                },
                env = self.recv_envelope(wake) => {
                    let Some(env) = env? else { continue };
                    heard = tokio::time::Instant::now();
                    pinged = None;
                    match env.body {
                        Body::ConsoleAttached { writer, worker, request, next, .. } if request == attach => {
                            if seen.is_some_and(|s| s > next) {
                                // The server numbers the output anew
                                // (it restarted): count from its numbers.
                                *seen = None;
                            }
                            let _ = events.send(ConsoleEvent::Attached { writer, worker });
                        }
                        Body::ConsoleOutput { offset, dropped, .. } => {
                            let mut bytes = env.raw.unwrap_or_default();
                            let end = offset.saturating_add(bytes.len() as u64);
                            let expected = seen.unwrap_or(offset);
                            if end <= expected {
                                continue;
                            }
                            if offset < expected {
                                bytes = bytes.slice((expected - offset) as usize..);
                            }
                            // A gap in the offsets is output lost (by the
                            // worker, the server or on the way here);
                            // `dropped` says the same from the server's side.
                            let _ = dropped;
                            let lost = offset.saturating_sub(expected);
                            *seen = Some(end);
                            quiet_since = tokio::time::Instant::now();
                            let _ = events.send(ConsoleEvent::Output { bytes, lost });
                        }
                        Body::ConsoleInputAck { stream: s, have, .. } if s == stream.id => {
                            stream.acknowledged(have);
                        }
                        Body::ConsoleClosed { reason, request, .. } if request == attach => {
                            return Ok(Some(reason));
                        }
                        Body::Error { code, message, request, .. } => {
                            if request == Some(attach) {
                                return Err(ClientError::Refused { code, message });
                            }
                            if code == ErrorCode::Forbidden {
                                // A viewer typed: said once, the rest is not sent.
                                stream.pending.clear();
                                stream.sent = 0;
                                let _ = events.send(ConsoleEvent::Closed(format!("input refused: {message}")));
                            }
                            // Over the input rate: resent after RESEND_AFTER.
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_is_resent_from_what_the_server_has_and_never_twice() {
        let t0 = tokio::time::Instant::now();
        let mut s = InputStream::new();
        s.push(b"hello\n");
        assert_eq!(s.next(t0), Some((0, b"hello\n".to_vec())));
        assert_eq!(s.next(t0), None);
        s.push(b"ls\n");
        assert_eq!(s.next(t0), Some((6, b"ls\n".to_vec())));
        // The first answer says 6: only `ls\n` is still owed…
        s.acknowledged(6);
        // …and resent, from 6, when no answer came.
        assert_eq!(s.next(t0 + RESEND_AFTER), Some((6, b"ls\n".to_vec())));
        s.acknowledged(9);
        assert!(s.is_settled());
        assert_eq!(s.next(t0 + RESEND_AFTER * 3), None);
        // An old answer changes nothing.
        s.acknowledged(3);
        assert_eq!(s.acked, 9);
    }
}
