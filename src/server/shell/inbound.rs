//! What arrives on the control socket before the serving loop handles
//! it: the reader task that hands messages and connection events over in
//! order, bounded in count and bytes; when each connection was last heard
//! from; and the thread that computes Noise handshakes off the loop.

use bytes::Bytes;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::warn;
use zeromq::prelude::*;
use zeromq::ZmqMessage;

/// What the control socket's reader hands the serving loop, in order.
pub(super) enum Received {
    Message(ZmqMessage),
    /// Accepted, disconnected…: after every message received before it.
    Connection(zeromq::SocketEvent),
}

/// The bytes of received messages waiting for the scheduler, counted in
/// KiB permits (a message takes at least one, at most all of them).
#[derive(Clone)]
pub(super) struct InboundBytes {
    permits: std::sync::Arc<tokio::sync::Semaphore>,
    total: u32,
}

impl InboundBytes {
    pub(super) fn new(bytes: usize) -> Self {
        let total = (bytes / 1024).clamp(
            1,
            tokio::sync::Semaphore::MAX_PERMITS.min(u32::MAX as usize),
        ) as u32;
        InboundBytes {
            permits: std::sync::Arc::new(tokio::sync::Semaphore::new(total as usize)),
            total,
        }
    }

    pub(super) fn cost(&self, msg: &ZmqMessage) -> u32 {
        let bytes: usize = msg.iter().map(|f| f.len()).sum();
        (bytes.div_ceil(1024).max(1)).min(self.total as usize) as u32
    }

    /// Waits until the message's bytes fit (reading pauses meanwhile).
    pub(super) async fn take(&self, msg: &ZmqMessage) {
        if let Ok(p) = self.permits.acquire_many(self.cost(msg)).await {
            p.forget();
        }
    }

    pub(super) fn give_back(&self, msg: &ZmqMessage) {
        self.permits.add_permits(self.cost(msg) as usize);
    }
}

/// Receives in a task of its own, which keeps the serving loop's select
/// free of cancellation hazards inside the socket's recv. Connection
/// events travel the same queue as messages, in the order they happened:
/// a connection's close is reported when its last message was received
/// (the patched socket tears a peer down when its read half ends), so
/// everything it delivered is handled before its close is.
pub(super) fn spawn_reader(
    mut router_rx: zeromq::RouterRecvHalf,
    mut connections: futures::channel::mpsc::Receiver<zeromq::SocketEvent>,
    inbound_tx: mpsc::Sender<Received>,
    reader_kib: InboundBytes,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let item = tokio::select! {
                biased;
                Some(event) = futures::StreamExt::next(&mut connections) => Received::Connection(event),
                msg = router_rx.recv() => match msg {
                    Ok(msg) => {
                        reader_kib.take(&msg).await;
                        Received::Message(msg)
                    }
                    Err(e) => {
                        warn!(error = %e, "control socket receive error");
                        continue;
                    }
                },
            };
            if inbound_tx.send(item).await.is_err() {
                return;
            }
        }
    })
}

pub(super) type HandshakeJob = (Bytes, Bytes, crate::security::gate::Handshaker);
pub(super) type HandshakeDone = (
    Bytes,
    Result<
        crate::security::handshake::Accepted<crate::security::Identity>,
        crate::security::SecurityError,
    >,
);

/// The thread that computes handshakes (four X25519 operations each,
/// about a millisecond) so that a reconnect storm never stalls the event
/// loop. The channels are unbounded here because the gate bounds the
/// handshakes in flight (`MAX_PENDING_HANDSHAKES`).
pub(super) fn spawn_handshake_thread() -> (
    mpsc::UnboundedSender<HandshakeJob>,
    mpsc::UnboundedReceiver<HandshakeDone>,
) {
    crate::jobs::spawn(
        "ots-handshakes",
        |(peer, first, handshaker): HandshakeJob| Some((peer, handshaker.accept(&first))),
    )
}

/// When each control connection was last heard from, to close the ones
/// that stay silent past the idle timeout. Fed by the socket monitor
/// (accepted, disconnected) and every received message; scanned at most
/// four times per timeout, so its cost per message is one map update.
pub(super) struct ConnectionActivity {
    idle_timeout: Duration,
    last: std::collections::HashMap<Bytes, Instant>,
    /// The remote address of each connection, for logs and the audit log.
    addresses: std::collections::HashMap<Bytes, String>,
    scanned: Instant,
}

impl ConnectionActivity {
    pub(super) fn new(idle_timeout: Duration) -> Self {
        ConnectionActivity {
            idle_timeout,
            last: std::collections::HashMap::new(),
            addresses: std::collections::HashMap::new(),
            scanned: Instant::now(),
        }
    }

    pub(super) fn on_event(&mut self, now: Instant, event: zeromq::SocketEvent) {
        match event {
            zeromq::SocketEvent::Accepted(endpoint, peer) => {
                let peer = Bytes::from(peer);
                self.addresses.insert(peer.clone(), endpoint.to_string());
                self.last.insert(peer, now);
            }
            zeromq::SocketEvent::Disconnected(peer) => {
                let peer = Bytes::from(peer);
                self.last.remove(&peer);
                self.addresses.remove(&peer);
            }
            _ => {}
        }
    }

    pub(super) fn address(&self, peer: &Bytes) -> String {
        self.addresses
            .get(peer)
            .cloned()
            .unwrap_or_else(|| "-".to_string())
    }

    pub(super) fn heard(&mut self, peer: &Bytes, now: Instant) {
        if let Some(t) = self.last.get_mut(peer) {
            *t = now;
        }
    }

    /// Connections silent for longer than the idle timeout, forgotten here.
    pub(super) fn take_idle(&mut self, now: Instant) -> Vec<zeromq::util::PeerIdentity> {
        if now.saturating_duration_since(self.scanned) < self.idle_timeout / 4 {
            return Vec::new();
        }
        self.scanned = now;
        let timeout = self.idle_timeout;
        let idle: Vec<Bytes> = self
            .last
            .iter()
            .filter(|(_, t)| now.saturating_duration_since(**t) > timeout)
            .map(|(p, _)| p.clone())
            .collect();
        idle.into_iter()
            .filter_map(|p| {
                self.last.remove(&p);
                self.addresses.remove(&p);
                zeromq::util::PeerIdentity::try_from(p).ok()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn received_bytes_are_bounded_and_given_back_once_handled() {
        let kib = InboundBytes::new(64 * 1024);
        let big = ZmqMessage::from(vec![0u8; 40 * 1024]);
        let small = ZmqMessage::from(vec![0u8; 10]);
        assert_eq!(kib.cost(&big), 40);
        assert_eq!(kib.cost(&small), 1, "every message costs something");
        let huge = ZmqMessage::from(vec![0u8; 1024 * 1024]);
        assert_eq!(
            kib.cost(&huge),
            64,
            "a message larger than the bound still fits alone"
        );
        kib.take(&big).await;
        // A second 40 KiB message does not fit until the first is handled.
        let waiting = kib.take(&big);
        tokio::pin!(waiting);
        assert!(
            futures::poll!(waiting.as_mut()).is_pending(),
            "the reader must wait"
        );
        kib.give_back(&big);
        waiting.await;
    }
}
