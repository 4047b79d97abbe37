//! The dashboard's way into the scheduler: the same requests `ots-submit`
//! sends, asked on a bounded queue and handled by the serving loop in its
//! batches like any message, each on a connection of its own that carries
//! the signed-in user's identity. So every page sees exactly what the
//! `access` rules let that user see (PROTOCOL.md §15.5), and the
//! dashboard never touches the scheduler's state.

use crate::protocol::{Body, ErrorCode, Header};
use crate::security::Identity;
use crate::server::scheduler::{Output, Scheduler};
use crate::server::store::Store;
use bytes::Bytes;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// An answer: its body and raw frame.
pub type Answer = (Body, Option<Bytes>);

/// Requests waiting for the serving loop, at most; past it a page gets
/// 503 at once (counted) instead of queueing without bound.
pub const ASK_QUEUE: usize = 256;
/// A request not answered within this is given up (504).
pub const ASK_TIMEOUT: Duration = Duration::from_secs(10);

/// One request of the dashboard's.
pub struct Ask {
    pub identity: Option<Identity>,
    /// Where the browser is (`web:IP`), for the audit log.
    pub address: String,
    pub body: Body,
    pub reply: oneshot::Sender<(Body, Option<Bytes>)>,
}

/// Why a request of the dashboard's got no answer it can show.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error("the server is busy ({ASK_QUEUE} dashboard requests waiting); try again")]
    Busy,
    #[error("the server is stopping")]
    Stopped,
    #[error("the server did not answer within {ASK_TIMEOUT:?}")]
    Timeout,
    #[error("{message}")]
    Refused { code: ErrorCode, message: String },
}

/// The sending half, cloned into every handler.
#[derive(Clone)]
pub struct Asker {
    tx: mpsc::Sender<Ask>,
}

impl Asker {
    pub fn new() -> (Asker, mpsc::Receiver<Ask>) {
        let (tx, rx) = mpsc::channel(ASK_QUEUE);
        (Asker { tx }, rx)
    }

    /// Asks `body` as `identity`; the answer's body and raw frame, or the
    /// error the server answered with.
    pub async fn ask(
        &self,
        identity: Option<Identity>,
        address: String,
        body: Body,
    ) -> Result<(Body, Option<Bytes>), AskError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .try_send(Ask {
                identity,
                address,
                body,
                reply,
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => AskError::Busy,
                mpsc::error::TrySendError::Closed(_) => AskError::Stopped,
            })?;
        match tokio::time::timeout(ASK_TIMEOUT, answer).await {
            Err(_) => Err(AskError::Timeout),
            Ok(Err(_)) => Err(AskError::Stopped),
            Ok(Ok((Body::Error { code, message, .. }, _))) => {
                Err(AskError::Refused { code, message })
            }
            Ok(Ok(answer)) => Ok(answer),
        }
    }
}

/// The serving loop's side: requests handed to the scheduler and not
/// answered yet (a file read goes to the desk and answers later).
pub struct Pending {
    waiting: HashMap<Bytes, (oneshot::Sender<Answer>, Instant)>,
    next: u64,
}

/// The connection id of the `n`th dashboard request: 12 bytes starting
/// with a zero byte. The control socket names its connections with 16
/// random bytes of its own choosing (a peer cannot pick its id), so the
/// two never meet.
fn peer_of(n: u64) -> Bytes {
    let mut id = Vec::with_capacity(12);
    id.extend_from_slice(b"\0web");
    id.extend_from_slice(&n.to_be_bytes());
    Bytes::from(id)
}

impl Default for Pending {
    fn default() -> Self {
        Self::new()
    }
}

impl Pending {
    pub fn new() -> Self {
        Pending {
            waiting: HashMap::new(),
            next: 0,
        }
    }

    /// Requests in the scheduler's hands.
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Hands one request to the scheduler, on a connection of its own.
    pub fn begin<S: Store>(&mut self, scheduler: &mut Scheduler<S>, now: Instant, ask: Ask) {
        self.next += 1;
        let peer = peer_of(self.next);
        if let Some(identity) = ask.identity {
            scheduler.on_authenticated(&peer, identity, ask.address);
        }
        let header = Header::best_effort(ask.body.class(), None);
        self.waiting.insert(peer.clone(), (ask.reply, now));
        scheduler.on_message(
            now,
            &peer,
            crate::protocol::Envelope {
                header,
                body: ask.body,
                raw: None,
            },
        );
    }

    /// Takes the answers to dashboard requests out of `outputs` (their
    /// connections end here) and returns the rest for the sockets.
    pub fn answer<S: Store>(
        &mut self,
        scheduler: &mut Scheduler<S>,
        now: Instant,
        outputs: Vec<Output>,
    ) -> Vec<Output> {
        if self.waiting.is_empty() {
            return outputs;
        }
        let mut rest = Vec::with_capacity(outputs.len());
        for output in outputs {
            match output {
                Output::Send {
                    peer, body, raw, ..
                } if self.waiting.contains_key(&peer) => {
                    let (reply, _) = self.waiting.remove(&peer).expect("waiting");
                    let _ = reply.send((body, raw));
                    scheduler.on_peer_closed(now, &peer);
                }
                other => rest.push(other),
            }
        }
        rest
    }

    /// Gives up requests older than [`ASK_TIMEOUT`] (their pages answered
    /// 504 already); returns how many.
    pub fn expire<S: Store>(&mut self, scheduler: &mut Scheduler<S>, now: Instant) -> usize {
        let old: Vec<Bytes> = self
            .waiting
            .iter()
            .filter(|(_, (_, at))| now.saturating_duration_since(*at) > ASK_TIMEOUT)
            .map(|(p, _)| p.clone())
            .collect();
        for peer in &old {
            self.waiting.remove(peer);
            scheduler.on_peer_closed(now, peer);
        }
        old.len()
    }
}
