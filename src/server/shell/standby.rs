//! What a standby answers while it waits for the lease (PROTOCOL.md
//! §13.1). It binds the control endpoint and answers every message that
//! reaches it — a Noise handshake's first message or a plaintext OTSP
//! one — with a plaintext `error{code: not_leader}` naming the leader it
//! knows, so a worker or client with a list of servers moves on to the
//! next one at once instead of waiting out a timeout, and `ots-submit
//! leader` can say which server stands by for whom.
//!
//! It computes no handshake, reads no state, keeps nothing per peer and
//! does the same constant work for every message (one decode attempt,
//! one small reply): a peer flooding it costs no more than the bytes it
//! sends, within the same connection limits as the serving socket. The
//! answer is not authenticated (no handshake took place); a forged one
//! can only make a peer try the next server, which dropping its packets
//! could do as well. The socket is closed before the server binds the
//! same endpoint to serve.

use crate::protocol::{self, Body, Class, ErrorCode, Header};
use crate::server::store::pg::LeaseView;
use crate::transport::{self, SocketLimits, TransportError};
use std::time::Duration;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use zeromq::{Socket, SocketRecv};

/// How long one answer may wait for a peer's queue: a peer that does not
/// read is not waited for.
const SEND_TIMEOUT: Duration = Duration::from_millis(100);

/// The standby's control socket, answering `not_leader` until closed.
pub struct Standby {
    leader: watch::Sender<Option<LeaseView>>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// The answer's text: who leads, as the database said at the last look.
pub fn answer(leader: Option<&LeaseView>) -> String {
    match leader {
        Some(v) => format!(
            "this server is a standby; {} leads (epoch {}, control endpoint {}): connect to that one",
            v.holder, v.epoch, v.address
        ),
        None => "this server is a standby; no server holds the lease at the moment (one takes it within lease_renew): try again".to_string(),
    }
}

impl Standby {
    /// Binds `control` and starts answering.
    pub async fn bind(control: &str, limits: &SocketLimits) -> Result<Standby, TransportError> {
        let (mut router, endpoint) = crate::transport::bind_control(control, limits).await?;
        tracing::info!(control = %endpoint, "answering not_leader on the control endpoint until this server leads");
        let (leader, seen) = watch::channel(None);
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            // Answers sent, and dropped because the peer was not reading:
            // said when the standby stops answering.
            let (mut answered, mut dropped) = (0u64, 0u64);
            loop {
                let msg = tokio::select! {
                    _ = &mut stopped => break,
                    m = router.recv() => match m {
                        Ok(m) => m,
                        Err(_) => continue,
                    },
                };
                let mut frames = msg.into_vec();
                if frames.is_empty() {
                    continue;
                }
                let peer = frames.remove(0);
                // A handshake's first message does not decode as OTSP (no
                // request id); a plaintext request does, and its id is
                // echoed as for any refusal.
                let request = match protocol::decode(frames) {
                    Ok(env) => env.body.request(),
                    Err(e) => e.request(),
                };
                let body = Body::Error {
                    request,
                    code: ErrorCode::NotLeader,
                    message: answer(seen.borrow().as_ref()),
                    seq: None,
                };
                let mut reply = vec![peer];
                reply.extend(protocol::encode(
                    &Header::best_effort(Class::Control, None),
                    &body,
                    None,
                ));
                match transport::send_bounded(
                    &mut router,
                    transport::to_message(reply),
                    SEND_TIMEOUT,
                )
                .await
                {
                    Ok(()) => answered += 1,
                    Err(_) => dropped += 1,
                }
            }
            tracing::info!(
                answered,
                dropped,
                "stopped answering not_leader (this server leads now, or stops)"
            );
            // Waits until the listener is gone, so that the endpoint is
            // free for the serving socket; dropping the socket then closes
            // every connection it had.
            let _ = router.unbind_all().await;
            drop(router);
        });
        Ok(Standby { leader, stop, task })
    }

    /// The leader seen at the latest look at the lease.
    pub fn tell(&self, leader: Option<&LeaseView>) {
        let _ = self.leader.send(leader.cloned());
    }

    /// Stops answering and frees the endpoint.
    pub async fn close(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}
