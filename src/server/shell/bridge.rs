//! The serving loop's side of the dashboard's requests
//! (`web::bridge`): each asked on a connection of its own, handed to the
//! scheduler in the loop's batches like any message, answered after the
//! commit like any reply.

use crate::protocol::Header;
use crate::server::scheduler::{Output, Scheduler};
use crate::server::store::Store;
use crate::web::bridge::{Answer, Ask, ASK_TIMEOUT};
use bytes::Bytes;
use std::collections::HashMap;
use std::time::Instant;
use tokio::sync::oneshot;

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
        let env = crate::protocol::Envelope {
            header,
            body: ask.body,
            raw: ask.raw,
        };
        // What a browser typed is held to the same limits as what arrives
        // on the socket (PROTOCOL.md §14): refused the same way.
        match crate::protocol::check::check(&env) {
            Ok(()) => scheduler.on_message(now, &peer, env),
            Err(e) => scheduler.on_bad_frames(&peer, &e),
        }
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
