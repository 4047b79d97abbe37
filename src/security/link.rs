//! The initiator's side on a fresh DEALER: what a worker or a client
//! does right after connecting, before any OTSP message (PROTOCOL.md
//! §15.2). A thin async shell over [`super::Initiator`].

use super::allow::Identity;
use super::gate::HANDSHAKE_MARKER;
use super::{Channel, Initiator, KeyPair, PublicKey, SecurityError};
use crate::transport::{self, to_message};
use bytes::Bytes;
use std::time::Duration;
use zeromq::prelude::*;

/// How a worker or client authenticates itself and the server.
#[derive(Clone, Debug)]
pub enum Credentials {
    /// `security = "none"`: plaintext OTSP, for a closed lab only.
    None,
    /// Noise IK with this key pair, pinning this server key.
    Noise { key: KeyPair, server: PublicKey },
}

/// Why a handshake did not complete.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("no handshake answer from the server within {} ms", .0.as_millis())]
    Timeout(Duration),
    #[error("the server refused the handshake: {0}")]
    Refused(String),
    #[error("the server is busy admitting other connections ({0}); retry after a backoff")]
    Busy(String),
    /// A standby (PROTOCOL.md §13.1): the next server of the list leads.
    #[error("not the leader: {0}")]
    NotLeader(String),
    #[error("the server's answer does not authenticate as the pinned server key ({0}); wrong `server_key`, or not the real server")]
    Handshake(SecurityError),
    #[error("handshake transport: {0}")]
    Transport(String),
}

/// Runs the handshake on a freshly connected socket; returns the channel
/// and who the server took us for.
pub async fn handshake<S: SocketSend + SocketRecv>(
    socket: &mut S,
    key: &KeyPair,
    server: &PublicKey,
    timeout: Duration,
) -> Result<(Channel, Identity), LinkError> {
    handshake_offering(
        socket,
        key,
        server,
        timeout,
        super::channel::Cipher::usable_here(),
    )
    .await
}

/// [`handshake`] offering these transport ciphers (benchmarks compare
/// them; everything else offers what this machine seals fast).
pub async fn handshake_offering<S: SocketSend + SocketRecv>(
    socket: &mut S,
    key: &KeyPair,
    server: &PublicKey,
    timeout: Duration,
    ciphers: &[super::channel::Cipher],
) -> Result<(Channel, Identity), LinkError> {
    let (init, first) = Initiator::start(key, server, ciphers).map_err(LinkError::Handshake)?;
    let msg = to_message(vec![
        Bytes::from_static(HANDSHAKE_MARKER),
        Bytes::from(first),
    ]);
    transport::send_bounded(socket, msg, timeout)
        .await
        .map_err(|e| LinkError::Transport(e.to_string()))?;
    let answer = match tokio::time::timeout(timeout, socket.recv()).await {
        Err(_) => return Err(LinkError::Timeout(timeout)),
        Ok(Err(e)) => return Err(LinkError::Transport(e.to_string())),
        Ok(Ok(m)) => m.into_vec(),
    };
    match answer.as_slice() {
        [marker, noise] if marker.as_ref() == HANDSHAKE_MARKER => {
            let (channel, payload) = init.finish(noise).map_err(LinkError::Handshake)?;
            let identity: Identity = rmp_serde::from_slice(&payload).map_err(|_| {
                LinkError::Handshake(SecurityError::Malformed("identity in the answer"))
            })?;
            Ok((channel, identity))
        }
        frames => match crate::protocol::decode(frames.to_vec()) {
            Ok(env) => match env.body {
                crate::protocol::Body::Error {
                    code: crate::protocol::ErrorCode::LimitReached,
                    message,
                    ..
                } => Err(LinkError::Busy(message)),
                crate::protocol::Body::Error {
                    code: crate::protocol::ErrorCode::NotLeader,
                    message,
                    ..
                } => Err(LinkError::NotLeader(message)),
                crate::protocol::Body::Error { message, .. } => Err(LinkError::Refused(message)),
                other => Err(LinkError::Refused(format!(
                    "answered {} instead of a handshake (a server with security = \"none\"?)",
                    other.kind()
                ))),
            },
            Err(_) => Err(LinkError::Handshake(SecurityError::Malformed(
                "the handshake answer",
            ))),
        },
    }
}
