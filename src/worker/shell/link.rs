//! The worker's link to the server: connecting (with the Noise handshake
//! and the heartbeat subscription), the readers that hand each
//! connection's messages to the loop, opening what arrives, and the
//! [`Dialer`] that schedules attempts and moves through the servers that
//! may lead.

use crate::protocol::Body;
use crate::security::broadcast::{BroadcastError, Listener};
use crate::security::link::{self, LinkError};
use crate::security::{Channel, Credentials};
use crate::transport::{self, TransportError};
use crate::worker::config::WorkerConfig;
use crate::worker::session::Arrival;
use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use bytes::Bytes;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, error, info};
use zeromq::prelude::*;
use zeromq::{DealerSendHalf, DealerSocket, SubSocket, ZmqMessage};

/// When a message came off the socket: dispatch expiry counts from here.
pub(super) fn arrival() -> Arrival {
    Arrival {
        at: Instant::now(),
        wall_ms: crate::protocol::limits::unix_ms_now(),
    }
}

/// What the connection's reader tasks hand the loop, tagged with the
/// connection's generation (a message of an older one is dropped).
pub(super) enum Inbound {
    Frames {
        generation: u64,
        from_sub: bool,
        msg: ZmqMessage,
        /// When the frames came off the socket: dispatch expiry counts
        /// from here, not from when the loop got to them.
        received: Arrival,
    },
    Closed {
        generation: u64,
        error: String,
    },
}

pub(super) struct Connection {
    pub(super) dealer: DealerSendHalf,
    readers: Vec<JoinHandle<()>>,
    /// The sealed channel to the server (security on).
    pub(super) channel: Option<Channel>,
    /// Checks the signed broadcasts on the events port (security on),
    /// from the key and beat this connection's welcome named.
    listener: Option<Listener>,
}

/// What a received message is, once opened.
pub(super) enum Opened {
    /// Authentic (or plaintext without security): decode it.
    Frames(Vec<Bytes>),
    /// A control message that does not authenticate: the connection
    /// cannot be trusted (reconnect).
    Unauthentic(String),
    /// A broadcast that is not a sign of this server's life: ignored.
    Refused(BroadcastError),
}

impl Connection {
    pub(super) fn open(&mut self, now: Instant, from_sub: bool, mut frames: Vec<Bytes>) -> Opened {
        match (from_sub, self.channel.as_mut()) {
            (false, Some(channel)) => match channel.open(frames) {
                Ok(f) => Opened::Frames(f),
                Err(e) => Opened::Unauthentic(e.to_string()),
            },
            (false, None) => Opened::Frames(frames),
            // With security, only what the welcomed server signed.
            (true, Some(_)) => match self.listener.as_mut() {
                None => Opened::Refused(BroadcastError::NoKey),
                Some(l) => match l.open(now, frames) {
                    Ok(f) => Opened::Frames(f),
                    Err(e) => Opened::Refused(e),
                },
            },
            (true, None) => {
                if !frames.is_empty() {
                    frames.remove(0); // topic
                }
                Opened::Frames(frames)
            }
        }
    }

    /// A welcome on the control connection names the key and beat its
    /// server signs broadcasts with.
    pub(super) fn welcomed(&mut self, now: Instant, body: &Body) {
        if self.channel.is_some() {
            if let Some(listener) = Listener::from_welcome(body, now) {
                self.listener = Some(listener);
            }
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        for r in &self.readers {
            r.abort();
        }
    }
}

/// A connection being made: the DEALER, with security its channel, and
/// without security the SUB for heartbeats.
pub(super) type Connecting = JoinHandle<Result<Connected, ConnectError>>;

pub(super) struct Connected {
    pub(super) dealer: DealerSocket,
    pub(super) channel: Option<Channel>,
    pub(super) sub: Option<SubSocket>,
}

#[derive(Debug, thiserror::Error)]
pub(super) enum ConnectError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Link(#[from] LinkError),
}

/// Connects to the server: the DEALER (with security, and its Noise
/// handshake) and the SUB for heartbeats (signed with security).
pub(super) async fn connect(
    server: String,
    events: String,
    credentials: Credentials,
    timeout: Duration,
) -> Result<Connected, ConnectError> {
    let mut dealer = transport::connect_dealer(&server, timeout).await?;
    match &credentials {
        Credentials::Noise { key, server } => {
            let (channel, _) = link::handshake(&mut dealer, key, server, timeout).await?;
            let sub = transport::connect_sub(&events, &["hb"], timeout).await?;
            Ok(Connected {
                dealer,
                channel: Some(channel),
                sub: Some(sub),
            })
        }
        Credentials::None => {
            let sub = transport::connect_sub(&events, &["hb"], timeout).await?;
            Ok(Connected {
                dealer,
                channel: None,
                sub: Some(sub),
            })
        }
    }
}

pub(super) fn reconnect_backoff(cfg: &WorkerConfig) -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(cfg.reconnect_min_ms))
        .with_max_delay(Duration::from_millis(cfg.reconnect_max_ms))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// How long to wait before trying the next server after `attempts`
/// failed ones in this outage: at once within a round of the list, with
/// backoff after each whole round.
pub(super) fn next_server_delay(
    attempts: u32,
    servers: usize,
    backoff: &mut ExponentialBackoff,
    cfg: &WorkerConfig,
) -> Duration {
    if !(attempts as usize).is_multiple_of(servers) {
        Duration::ZERO
    } else {
        backoff
            .next()
            .unwrap_or(Duration::from_millis(cfg.reconnect_max_ms))
    }
}

/// When and where the next connection attempt goes: the servers that may
/// lead, tried in turn (the one that answered is kept; a failed connect
/// moves to the next at once, and only a whole round of failures waits
/// for the backoff), and the outage being lived through.
pub(super) struct Dialer {
    servers: Vec<(String, String)>,
    current: usize,
    backoff: ExponentialBackoff,
    /// When the next attempt may start; none while connected or dialing.
    retry_at: Option<Instant>,
    /// Since when the server is away, and how many attempts failed.
    outage: Option<(Instant, u32)>,
    /// The attempt in flight.
    pub(super) connecting: Option<Connecting>,
    /// Counts connections; tags what each one's readers deliver.
    pub(super) generation: u64,
}

impl Dialer {
    pub(super) fn new(
        cfg: &WorkerConfig,
        now: Instant,
    ) -> Result<Dialer, crate::settings::ConfigError> {
        Ok(Dialer {
            servers: crate::settings::endpoint_pairs(&cfg.server, &cfg.events)?,
            current: 0,
            backoff: reconnect_backoff(cfg),
            retry_at: Some(now),
            outage: None,
            connecting: None,
            generation: 0,
        })
    }

    /// Starts an attempt if none runs, none is up and one is due.
    pub(super) fn dial_if_due(
        &mut self,
        now: Instant,
        connected: bool,
        cfg: &WorkerConfig,
        credentials: &Credentials,
    ) {
        if connected || self.connecting.is_some() || self.retry_at.is_none_or(|t| now < t) {
            return;
        }
        self.retry_at = None;
        let timeout = Duration::from_millis(cfg.connect_timeout_ms);
        let (server, events) = self.servers[self.current].clone();
        self.connecting = Some(tokio::spawn(connect(
            server,
            events,
            credentials.clone(),
            timeout,
        )));
    }

    /// An attempt failed: the next server, at once or after the backoff.
    pub(super) fn failed(&mut self, e: &ConnectError, cfg: &WorkerConfig) {
        let (_, attempts) = self.outage.get_or_insert((Instant::now(), 0));
        *attempts += 1;
        let attempts = *attempts;
        if let ConnectError::Link(LinkError::Refused(_) | LinkError::Handshake(_)) = e {
            // Not a network problem: say so loudly, once per outage (the
            // operator may be adding the key).
            if attempts == 1 {
                error!(error = %e, key = %cfg.key_path().display(), "the server refused this worker's handshake; retrying with backoff until its key is allowed");
            }
        }
        let failed = &self.servers[self.current].0;
        let next = (self.current + 1) % self.servers.len();
        let delay = next_server_delay(attempts, self.servers.len(), &mut self.backoff, cfg);
        debug!(error = %e, server = %failed, attempt = attempts, next = %self.servers[next].0, retry_in_ms = delay.as_millis() as u64, "connect failed");
        self.current = next;
        self.retry_at = Some(Instant::now() + delay);
    }

    /// The attempt's task itself failed (a bug): try again after the cap.
    pub(super) fn crashed(&mut self, cfg: &WorkerConfig) {
        self.retry_at = Some(Instant::now() + Duration::from_millis(cfg.reconnect_max_ms));
    }

    /// A standby answered (security off: it answered our hello): the next
    /// server of the list, at once, and after a whole round of them with
    /// backoff, as for a failed connect.
    pub(super) fn not_leader(&mut self, said: &str, cfg: &WorkerConfig) {
        let (_, attempts) = self.outage.get_or_insert((Instant::now(), 0));
        *attempts += 1;
        let delay = next_server_delay(*attempts, self.servers.len(), &mut self.backoff, cfg);
        debug!(server = %self.servers[self.current].0, said = %said, retry_in_ms = delay.as_millis() as u64, "not the leader; trying the next server");
        self.current = (self.current + 1) % self.servers.len();
        self.retry_at = Some(Instant::now() + delay);
    }

    /// The connection was lost: an outage begins (if one was up), and the
    /// same server is tried again at once.
    pub(super) fn lost(&mut self, was_connected: bool) {
        if was_connected {
            self.outage = Some((Instant::now(), 0));
        }
        self.retry_at = Some(Instant::now());
    }

    /// Registered: the outage ends (said in the log), the backoff resets.
    pub(super) fn registered(&mut self, server: &str, cfg: &WorkerConfig) {
        match self.outage.take() {
            Some((since, attempts)) => info!(
                server = %server,
                away_ms = since.elapsed().as_millis() as u64,
                attempts,
                "registered with the server again"
            ),
            None => info!(server = %server, "registered with the server"),
        }
        self.backoff = reconnect_backoff(cfg);
    }
}

pub(super) fn attach(
    generation: u64,
    mut dealer: DealerSocket,
    channel: Option<Channel>,
    sub: Option<SubSocket>,
    tx: mpsc::Sender<Inbound>,
) -> Connection {
    // The socket monitor reports the TCP connection closing at once (a
    // SIGKILLed server, a restart): the worker reconnects without waiting
    // for its next send or for heartbeats to go missing. A hung server
    // keeps its connection open and is still caught by heartbeats.
    let mut events = dealer.monitor();
    let (dealer_tx, mut dealer_rx) = dealer.split();
    // One task reads both, so a close is told after every message the
    // connection delivered (the patched socket reports it when the read
    // half ends): the server's last words (a `shutdown`, an ack) are
    // handled before the worker reconnects.
    let t1 = tx.clone();
    let dealer_reader = tokio::spawn(async move {
        let mut watching = true;
        loop {
            let inbound = tokio::select! {
                biased;
                event = futures::StreamExt::next(&mut events), if watching => match event {
                    Some(zeromq::SocketEvent::Disconnected(_)) => Inbound::Closed {
                        generation,
                        error: "the server closed the control connection".into(),
                    },
                    Some(_) => continue,
                    None => {
                        watching = false;
                        continue;
                    }
                },
                msg = dealer_rx.recv() => match msg {
                    Ok(msg) => Inbound::Frames {
                        generation,
                        from_sub: false,
                        msg,
                        received: arrival(),
                    },
                    Err(e) => Inbound::Closed {
                        generation,
                        error: e.to_string(),
                    },
                },
            };
            let closed = matches!(inbound, Inbound::Closed { .. });
            if t1.send(inbound).await.is_err() || closed {
                return;
            }
        }
    });
    let Some(mut sub) = sub else {
        return Connection {
            dealer: dealer_tx,
            readers: vec![dealer_reader],
            channel,
            listener: None,
        };
    };
    let sub_reader = tokio::spawn(async move {
        loop {
            match sub.recv().await {
                Ok(msg) => {
                    if tx
                        .send(Inbound::Frames {
                            generation,
                            from_sub: true,
                            msg,
                            received: arrival(),
                        })
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx
                        .send(Inbound::Closed {
                            generation,
                            error: e.to_string(),
                        })
                        .await;
                    return;
                }
            }
        }
    });
    Connection {
        dealer: dealer_tx,
        readers: vec![dealer_reader, sub_reader],
        channel,
        listener: None,
    }
}
