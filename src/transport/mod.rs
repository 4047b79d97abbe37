//! Thin helpers over the `zeromq` crate (0.7.0), shaped by what it does not
//! do for us: DEALER never reconnects (we recreate sockets), `connect()`
//! waits for the peer (we bound it), `send()` can wait forever on a full
//! peer queue (we bound it), and a reused routing identity black-holes a
//! connection (every connection gets a fresh one).

use bytes::Bytes;
use std::time::Duration;
use zeromq::prelude::*;
use zeromq::{DealerSocket, PubSocket, RouterSocket, SocketOptions, SubSocket, ZmqMessage};

/// Socket-level failures, each with the endpoint involved.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot bind {endpoint}: {source} (is another server running on it?)")]
    Bind {
        endpoint: String,
        source: zeromq::ZmqError,
    },
    #[error("server unreachable: no answer from {endpoint} within {} ms", timeout.as_millis())]
    ConnectTimeout { endpoint: String, timeout: Duration },
    #[error("cannot connect to {endpoint}: {source}")]
    Connect {
        endpoint: String,
        source: zeromq::ZmqError,
    },
    #[error("send failed: {0}")]
    Send(zeromq::ZmqError),
    #[error("send did not complete within {} ms (peer not reading)", .0.as_millis())]
    SendTimeout(Duration),
    #[error("peer's send queue is full (it is not reading); message not sent")]
    PeerBusy,
    #[error("receive failed: {0}")]
    Recv(zeromq::ZmqError),
}

/// Builds a multipart message from frames.
pub fn to_message(frames: Vec<Bytes>) -> ZmqMessage {
    let mut frames = frames.into_iter();
    let mut msg = ZmqMessage::from(frames.next().unwrap_or_default());
    for f in frames {
        msg.push_back(f);
    }
    msg
}

/// The two server sockets and the endpoints they actually bound (port 0
/// resolved).
pub struct ServerSockets {
    pub router: RouterSocket,
    pub publisher: PubSocket,
    pub control: String,
    pub events: String,
}

/// What the sockets refuse or bound below the application, per socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketLimits {
    /// Largest ZMTP message (all frames) accepted from a peer; a longer
    /// frame header drops that connection before anything is allocated.
    pub max_message_bytes: usize,
    /// Most connections one bound endpoint keeps (server only).
    pub max_connections: usize,
    /// An accepted connection must finish the ZMTP handshake within this.
    pub handshake_timeout: Duration,
    /// Messages queued per peer; a send to a peer whose queue is full
    /// fails at once ([`TransportError::PeerBusy`]) instead of stalling.
    pub peer_send_queue: usize,
    /// …and bytes queued per peer, not yet written to its connection: the
    /// memory one peer that stops reading can hold, whatever the replies.
    pub peer_send_bytes: usize,
}

/// Messages a worker or client queues towards the server at most (a log
/// batch is up to 64 KiB): past it, a best-effort send is dropped and
/// counted, a mandatory one waits in the outbox for its resend.
pub const CLIENT_SEND_QUEUE: usize = 256;

/// Bytes a client or worker queues towards the server at most (a log
/// batch is up to 64 KiB): what a worker whose server reads slowly holds
/// in its socket; beyond it, log batches wait in the session (and the
/// conductor on its pipe), see `worker::channel::LogBudget`.
pub const CLIENT_SEND_BYTES: usize = 2 * 1024 * 1024;

/// Frames in the largest message of our protocol: topic (PUB/SUB) or
/// routing identity, header, body, raw.
pub const MAX_FRAMES: usize = 4;

impl Default for SocketLimits {
    fn default() -> Self {
        SocketLimits {
            max_message_bytes: MAX_WIRE_MESSAGE_BYTES,
            max_connections: 16384,
            handshake_timeout: Duration::from_secs(5),
            peer_send_queue: 1024,
            peer_send_bytes: 16 * 1024 * 1024,
        }
    }
}

/// The largest message the protocol can produce: header, body and raw
/// frame at their limits, plus a topic or identity frame.
pub const MAX_WIRE_MESSAGE_BYTES: usize = crate::protocol::codec::MAX_HEADER_BYTES
    + crate::protocol::codec::MAX_BODY_BYTES
    + crate::protocol::codec::MAX_RAW_BYTES
    + 1024;

impl SocketLimits {
    pub(crate) fn options(&self) -> SocketOptions {
        let mut o = SocketOptions::default();
        o.max_message_size(self.max_message_bytes)
            .max_message_frames(MAX_FRAMES)
            .handshake_timeout(self.handshake_timeout)
            .max_connections(self.max_connections)
            .peer_send_queue(self.peer_send_queue, true)
            .peer_send_queue_bytes(self.peer_send_bytes);
        o
    }
}

/// What the server's PUB keeps of its subscribers' subscriptions (a
/// worker subscribes to `hb`, a plaintext follower to `run/<id>` and
/// `log/<id>`): past these a subscription is ignored and counted
/// (`subscriptions_refused`), so no peer can grow the server's memory
/// by subscribing (PROTOCOL.md §14).
pub const SUBSCRIPTIONS: zeromq::SubscriptionLimits = zeromq::SubscriptionLimits {
    per_connection: 16,
    bytes_per_connection: 1024,
    topic_bytes: 128,
    total: 65_536,
};

/// Binds the ROUTER of a control endpoint (the serving server's, or a
/// standby's that answers `not_leader`); returns it with the endpoint it
/// bound (the port filled in).
pub async fn bind_control(
    control: &str,
    limits: &SocketLimits,
) -> Result<(RouterSocket, String), TransportError> {
    let mut options = limits.options();
    // Connections are the server's: the routing identity a peer announces
    // travels in clear text before any handshake, so anyone who saw it
    // could otherwise replace (cut) the connection it names. Each accepted
    // connection gets a random id of the server's choosing instead.
    options.assign_peer_ids(true);
    let mut router = RouterSocket::with_options(options);
    let endpoint = router
        .bind(control)
        .await
        .map_err(|source| TransportError::Bind {
            endpoint: control.to_string(),
            source,
        })?;
    Ok((router, endpoint.to_string()))
}

/// Binds ROUTER `control` and PUB `events`.
pub async fn bind_server(
    control: &str,
    events: &str,
    limits: &SocketLimits,
) -> Result<ServerSockets, TransportError> {
    let (router, control_ep) = bind_control(control, limits).await?;
    let mut options = limits.options();
    options
        .assign_peer_ids(true)
        .subscription_limits(SUBSCRIPTIONS);
    let mut publisher = PubSocket::with_options(options);
    let events_ep = publisher
        .bind(events)
        .await
        .map_err(|source| TransportError::Bind {
            endpoint: events.to_string(),
            source,
        })?;
    Ok(ServerSockets {
        router,
        publisher,
        control: control_ep,
        events: events_ep.to_string(),
    })
}

fn options(timeout: Duration) -> SocketOptions {
    // A rogue server is held to the same limits as any peer; what we queue
    // towards the server is bounded more tightly (it is one peer).
    let mut o = SocketLimits {
        peer_send_queue: CLIENT_SEND_QUEUE,
        peer_send_bytes: CLIENT_SEND_BYTES,
        ..SocketLimits::default()
    }
    .options();
    // A fresh routing identity per connection: reusing one black-holes the
    // newer or older connection inside zeromq 0.7.
    o.peer_identity(zeromq::util::PeerIdentity::new());
    o.connect_timeout(timeout);
    o
}

async fn bounded<T>(
    endpoint: &str,
    timeout: Duration,
    fut: impl std::future::Future<Output = zeromq::ZmqResult<T>>,
) -> Result<T, TransportError> {
    match tokio::time::timeout(timeout, fut).await {
        Err(_) => Err(TransportError::ConnectTimeout {
            endpoint: endpoint.to_string(),
            timeout,
        }),
        Ok(Err(zeromq::ZmqError::ConnectTimeout(_))) => Err(TransportError::ConnectTimeout {
            endpoint: endpoint.to_string(),
            timeout,
        }),
        Ok(Err(source)) => Err(TransportError::Connect {
            endpoint: endpoint.to_string(),
            source,
        }),
        Ok(Ok(v)) => Ok(v),
    }
}

/// Connects a new DEALER (fresh identity) within `timeout`; a refused
/// connection is tried again until then (a server starting).
pub async fn connect_dealer(
    endpoint: &str,
    timeout: Duration,
) -> Result<DealerSocket, TransportError> {
    let mut socket = DealerSocket::with_options(options(timeout));
    bounded(endpoint, timeout, socket.connect(endpoint)).await?;
    Ok(socket)
}

/// Like [`connect_dealer`], but a refused or reset connection fails at
/// once ([`TransportError::Connect`]): a client with a list of servers
/// moves on to the next instead of spending its timeout on a dead one.
pub async fn connect_dealer_fail_fast(
    endpoint: &str,
    timeout: Duration,
) -> Result<DealerSocket, TransportError> {
    let mut o = options(timeout);
    o.fail_fast_connect(true);
    let mut socket = DealerSocket::with_options(o);
    bounded(endpoint, timeout, socket.connect(endpoint)).await?;
    Ok(socket)
}

/// Connects a new SUB subscribed to `topics` within `timeout`.
pub async fn connect_sub(
    endpoint: &str,
    topics: &[&str],
    timeout: Duration,
) -> Result<SubSocket, TransportError> {
    let mut socket = SubSocket::with_options(options(timeout));
    bounded(endpoint, timeout, socket.connect(endpoint)).await?;
    for t in topics {
        socket
            .subscribe(t)
            .await
            .map_err(|source| TransportError::Connect {
                endpoint: endpoint.to_string(),
                source,
            })?;
    }
    Ok(socket)
}

/// Sends with a deadline, so a peer that stopped reading cannot stall us.
pub async fn send_bounded<S: SocketSend>(
    socket: &mut S,
    msg: ZmqMessage,
    timeout: Duration,
) -> Result<(), TransportError> {
    match tokio::time::timeout(timeout, socket.send(msg)).await {
        Err(_) => Err(TransportError::SendTimeout(timeout)),
        Ok(Err(zeromq::ZmqError::BufferFull(_))) => Err(TransportError::PeerBusy),
        Ok(Err(e)) => Err(TransportError::Send(e)),
        Ok(Ok(())) => Ok(()),
    }
}
