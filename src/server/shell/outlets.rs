//! Where the scheduler's outputs go: replies sealed per connection and
//! sent with a bound on the control socket, broadcasts signed on the
//! events socket, file jobs to the desk thread, notifications to their
//! sender — and the answer to a completed handshake.

use crate::protocol::{self, Body, ErrorCode, Header};
use crate::security::broadcast::Announcer;
use crate::security::gate::Verdict;
use crate::security::Gate;
use crate::server::scheduler::{Output, Scheduler};
use crate::server::shell::error::Fatal;
use crate::server::shell::inbound::ConnectionActivity;
use crate::server::store::DiskStore;
use crate::transport::{self, to_message, TransportError};
use bytes::Bytes;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::{debug, error, warn};

/// The serving loop's ways out.
pub(super) struct Outlets {
    pub(super) router_tx: zeromq::RouterSendHalf,
    pub(super) publisher: zeromq::PubSocket,
    /// Signs broadcasts (with security).
    pub(super) announcer: Option<Announcer>,
    pub(super) desk: mpsc::UnboundedSender<crate::server::store::files::FileJob>,
    /// Questions to the history reader.
    pub(super) history: mpsc::UnboundedSender<crate::server::store::history::RecallJob>,
    pub(super) notify: Option<mpsc::UnboundedSender<crate::notify::outbox::Job>>,
    /// A send to one peer that does not complete within this is dropped.
    pub(super) send_timeout: Duration,
    /// Sends that failed (peer gone), for the debug log.
    pub(super) send_failures: u64,
}

impl Outlets {
    /// Closes one connection (a revoked key, an idle or refused peer).
    pub(super) fn disconnect(&mut self, peer: &Bytes) {
        if let Ok(id) = zeromq::util::PeerIdentity::try_from(peer.clone()) {
            self.router_tx.disconnect_peer(&id);
        }
    }

    /// Answers a completed handshake: the Noise answer when it was secured, a
    /// plaintext `error{unauthenticated}` (logged and audited at a bounded
    /// rate) when it was refused.
    pub(super) async fn answer_handshake(
        &mut self,
        verdict: Verdict,
        peer: &Bytes,
        now: Instant,
        scheduler: &mut Scheduler<DiskStore>,
        activity: &ConnectionActivity,
        refusals: &mut crate::logging::Throttle,
    ) {
        let mut out = vec![peer.clone()];
        match verdict {
            Verdict::Secured {
                answer, identity, ..
            } => {
                let address = activity.address(peer);
                debug!(identity = %identity.label(), %address, "handshake completed");
                scheduler.on_authenticated(peer, identity, address);
                out.extend(answer);
            }
            Verdict::Refuse {
                reason: reason @ crate::security::SecurityError::Busy(_),
            } => {
                // Admission control, not a refusal of the key: the peer
                // retries after its backoff (counted by the gate).
                out.extend(plain_error(ErrorCode::LimitReached, &reason));
            }
            Verdict::Refuse { reason } => {
                let address = activity.address(peer);
                if refusals.allow(now, "refused connections") {
                    warn!(%address, %reason, "refused an unauthenticated connection");
                    scheduler.audit(now, "anonymous", &address, "refused", &reason.to_string());
                } else {
                    scheduler.count_shell_event("audit_refusals_not_logged", 1);
                }
                out.extend(plain_error(ErrorCode::Unauthenticated, &reason));
            }
            _ => return,
        }
        if let Err(e) =
            transport::send_bounded(&mut self.router_tx, to_message(out), self.send_timeout).await
        {
            debug!(error = %e, "handshake answer not sent");
        }
    }

    /// Carries out the scheduler's outputs: sealed per connection with
    /// security on (a connection without a channel gets nothing: nothing
    /// leaves in the clear), bounded sends either way.
    /// A file desk or notification sender that is gone ends the server
    /// (systemd restarts it; what they were given is durable).
    pub(super) async fn deliver(
        &mut self,
        outputs: Vec<Output>,
        scheduler: &mut Scheduler<DiskStore>,
        mut gate: Option<&mut Gate>,
    ) -> Result<(), Fatal> {
        for output in outputs {
            match output {
                Output::Send {
                    peer,
                    header,
                    body,
                    raw,
                } => {
                    let plain = protocol::encode(&header, &body, raw);
                    let wire = match gate.as_deref_mut() {
                        None => plain,
                        Some(gate) => match gate.seal(&peer, &plain) {
                            Some(sealed) => sealed,
                            None => {
                                scheduler.count_shell_event("send_dropped_not_secured", 1);
                                continue;
                            }
                        },
                    };
                    let mut frames = Vec::with_capacity(wire.len() + 1);
                    frames.push(peer.clone());
                    frames.extend(wire);
                    match transport::send_bounded(
                        &mut self.router_tx,
                        to_message(frames),
                        self.send_timeout,
                    )
                    .await
                    {
                        Ok(()) => {}
                        // Not reading: dropped at once (mandatory messages
                        // stay in the worker's outbox and are resent), so
                        // one stuck peer never stalls the others.
                        Err(TransportError::PeerBusy) => {
                            scheduler.count_shell_event("send_dropped_peer_busy", 1);
                            debug!(peer = %hex::encode(&peer), kind = body.kind(), "send dropped: peer not reading");
                        }
                        Err(e) => {
                            self.send_failures += 1;
                            debug!(peer = %hex::encode(&peer), kind = body.kind(), error = %e, send_failures = self.send_failures, "send to peer failed (peer gone?)");
                        }
                    }
                }
                Output::Publish {
                    topic,
                    body,
                    raw,
                    beat,
                } => {
                    let signer = match (self.announcer.as_ref(), beat) {
                        (None, _) => None,
                        (Some(a), Some(beat)) => Some((a, beat)),
                        // Security on and nothing to sign with: a testrun's
                        // traffic never goes out in the clear.
                        (Some(_), None) => {
                            scheduler.count_shell_event("publish_dropped_not_signed", 1);
                            continue;
                        }
                    };
                    publish(
                        &mut self.publisher,
                        topic,
                        &body,
                        raw,
                        signer,
                        self.send_timeout,
                    )
                    .await
                }
                Output::File(job) => {
                    if self.desk.send(job).is_err() {
                        error!("the file desk thread is gone; stopping so that systemd restarts the server");
                        return Err(Fatal::DeskGone);
                    }
                }
                Output::Recall(job) => {
                    if self.history.send(job).is_err() {
                        error!("the history reader is gone; stopping so that systemd restarts the server");
                        return Err(Fatal::HistoryGone);
                    }
                }
                Output::Notify(job) => {
                    let sent = self.notify.as_ref().is_some_and(|n| n.send(job).is_ok());
                    if !sent {
                        // The sender task is gone (it never ends by itself).
                        error!("the notification sender is gone; stopping so that systemd restarts the server (the outbox is durable)");
                        return Err(Fatal::NotifierGone);
                    }
                }
            }
        }
        Ok(())
    }
}

/// The plaintext `error` a connection without a channel is answered with.
fn plain_error(code: ErrorCode, reason: &crate::security::SecurityError) -> Vec<Bytes> {
    let body = Body::Error {
        request: None,
        code,
        message: reason.to_string(),
        seq: None,
    };
    protocol::encode(&Header::best_effort(body.class(), None), &body, None)
}

/// Publishes on PUB; with security signed (`[topic, header, body,
/// signature]`, PROTOCOL.md §15.4).
async fn publish(
    publisher: &mut zeromq::PubSocket,
    topic: String,
    body: &Body,
    raw: Option<Bytes>,
    signer: Option<(&Announcer, u64)>,
    timeout: Duration,
) {
    let header = Header::best_effort(body.class(), None);
    let mut frames = vec![Bytes::from(topic)];
    frames.extend(protocol::encode(&header, body, raw));
    if let Some((announcer, beat)) = signer {
        let signature = announcer.sign(beat, &frames[1], &frames[2]);
        frames.truncate(3);
        frames.push(signature);
    }
    if let Err(e) = transport::send_bounded(publisher, to_message(frames), timeout).await {
        debug!(error = %e, "publish failed");
    }
}
