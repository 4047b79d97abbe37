//! The server's side of secured control connections, without I/O: which
//! connection completed a handshake as whom, opening what arrives and
//! sealing what leaves, and closing connections whose key was revoked.
//!
//! Per connection (routing identity) the gate holds one of three states:
//! pending (its handshake is being computed off the event loop by a
//! [`Handshaker`]), secured (a [`Channel`] and the [`Identity`] its key is
//! allowed as) or refused (it failed a handshake or spoke before one;
//! whatever it sends next closes it, at no cryptographic cost).
//! Connections that never sent anything hold no state.
//!
//! A handshake costs about a millisecond of CPU (four X25519 operations);
//! a reconnect storm of thousands of workers would stall the server's loop
//! for seconds if they were computed on it, so the shell hands each one to
//! a handshake thread and brings the result back with
//! [`Gate::complete`]. At most [`MAX_PENDING_HANDSHAKES`] wait; past that a
//! handshake is refused at once ("busy", the peer retries after its
//! backoff) instead of queueing without bound. Entries go when the connection closes, so the
//! gate holds at most one per open connection (`limits.max_connections`).

use super::allow::{AllowList, Identity};
use super::handshake::Accepted;
use super::{handshake, Channel, KeyPair, PublicKey, SecurityError};
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Frame 0 of both handshake messages (PROTOCOL.md §15.2). It cannot be
/// mistaken for an OTSP header (a MessagePack map) nor for a sealed
/// message's number (8 bytes).
pub const HANDSHAKE_MARKER: &[u8] = b"OTS-NOISE-IK-1";

/// Connections the gate keeps state for, past which refused entries are
/// dropped (at most one per open connection is secured, and connections
/// are bounded by `limits.max_connections`).
const MAX_TRACKED: usize = 65_536;

/// Handshakes handed to the handshake thread and not yet completed, past which new ones are
/// refused as busy (a storm of 5000 workers takes a few seconds to admit;
/// the rest retry after their backoff).
pub const MAX_PENDING_HANDSHAKES: usize = 2048;

/// Initiator ephemeral keys of recent handshakes remembered: a message 1
/// seen before is a replay and is refused before any curve operation
/// (an initiator makes a fresh ephemeral key for every handshake).
pub const RECENT_EPHEMERALS: usize = 65_536;

/// Handshakes one source address may start: a burst of this many…
pub const HANDSHAKE_BURST_PER_ADDRESS: f64 = 5000.0;
/// …then this many per second (each costs the server about a
/// millisecond of CPU; a reconnect storm of 5000 workers behind one
/// address still gets in at once). Past it: `limit_reached`.
pub const HANDSHAKES_PER_ADDRESS_PER_SEC: f64 = 500.0;

/// Source addresses whose handshake rate is tracked at most.
const MAX_ADDRESSES: usize = 65_536;

/// A connection's routing identity.
pub type PeerId = Bytes;

enum Conn {
    /// Its handshake is being computed off the loop.
    Pending,
    Secured {
        /// Boxed: ring's expanded keys make a channel ~1 KiB, and most
        /// entries in a flood are `Refused`.
        channel: Box<Channel>,
        identity: Identity,
        key: PublicKey,
    },
    Refused,
}

/// What the shell does with one received message.
#[derive(Debug)]
pub enum Verdict {
    /// An authenticated OTSP message: decode and handle it.
    Open(Vec<Bytes>),
    /// A handshake to compute off the loop with `handshaker`; hand the
    /// result to [`Gate::complete`].
    Handshake {
        first: Bytes,
        handshaker: Handshaker,
    },
    /// A handshake succeeded: send `answer` back; the connection is now
    /// `identity`.
    Secured {
        answer: Vec<Bytes>,
        identity: Identity,
        key: PublicKey,
    },
    /// Refused: answer with a plaintext `error{code: unauthenticated}`
    /// carrying `reason` (the peer cannot read anything else), count and
    /// log it. The connection's next message closes it.
    Refuse { reason: SecurityError },
    /// A refused connection spoke again, or a secured one sent something
    /// that does not open: close it without an answer.
    Close { reason: SecurityError },
}

/// The server's gate; see the module documentation.
pub struct Gate {
    handshaker: Handshaker,
    conns: HashMap<PeerId, Conn>,
    pending: usize,
    counters: BTreeMap<&'static str, u64>,
    /// Recent initiator ephemeral keys (see [`RECENT_EPHEMERALS`]).
    ephemerals: std::collections::HashSet<[u8; 32]>,
    ephemeral_order: std::collections::VecDeque<[u8; 32]>,
    /// Handshake tokens per source IP: (tokens, when last refilled).
    rates: HashMap<String, (f64, std::time::Instant)>,
}

impl Gate {
    pub fn new(keys: Vec<KeyPair>, allow: AllowList) -> Self {
        Gate {
            handshaker: Handshaker {
                keys: Arc::new(keys),
                allow: Arc::new(allow),
            },
            conns: HashMap::new(),
            pending: 0,
            counters: BTreeMap::new(),
            ephemerals: Default::default(),
            ephemeral_order: Default::default(),
            rates: HashMap::new(),
        }
    }

    /// Like [`Gate::inbound`], for a connection from `address`
    /// (`tcp://IP:PORT`, or `-` if unknown) at `now`: a handshake past the
    /// address's rate is turned away as busy before anything is computed.
    pub fn inbound_from(
        &mut self,
        now: std::time::Instant,
        address: &str,
        peer: &PeerId,
        frames: Vec<Bytes>,
    ) -> Verdict {
        let is_handshake = frames.first().map(|f| f.as_ref()) == Some(HANDSHAKE_MARKER);
        // An address not known yet (its accept event still on the way) is
        // not charged: a shared "unknown" bucket would throttle everyone.
        if is_handshake
            && address != "-"
            && !self.conns.contains_key(peer)
            && !self.take_token(now, address)
        {
            self.count("security_handshakes_rate_limited");
            self.conns.insert(peer.clone(), Conn::Refused);
            return Verdict::Refuse {
                reason: SecurityError::Busy(MAX_PENDING_HANDSHAKES),
            };
        }
        self.inbound(peer, frames)
    }

    /// Takes one handshake token of `address`'s IP (token bucket).
    fn take_token(&mut self, now: std::time::Instant, address: &str) -> bool {
        let ip = address
            .trim_start_matches("tcp://")
            .rsplit_once(':')
            .map_or(address, |(ip, _)| ip)
            .to_string();
        if self.rates.len() >= MAX_ADDRESSES && !self.rates.contains_key(&ip) {
            // Forget the addresses whose bucket has refilled: they hold no
            // state worth keeping.
            self.rates.retain(|_, (tokens, at)| {
                let refilled = *tokens
                    + now.saturating_duration_since(*at).as_secs_f64()
                        * HANDSHAKES_PER_ADDRESS_PER_SEC;
                refilled < HANDSHAKE_BURST_PER_ADDRESS
            });
            if self.rates.len() >= MAX_ADDRESSES {
                return false;
            }
        }
        let (tokens, at) = self
            .rates
            .entry(ip)
            .or_insert((HANDSHAKE_BURST_PER_ADDRESS, now));
        *tokens = (*tokens
            + now.saturating_duration_since(*at).as_secs_f64() * HANDSHAKES_PER_ADDRESS_PER_SEC)
            .min(HANDSHAKE_BURST_PER_ADDRESS);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Remembers message 1's ephemeral key; false if it was seen before.
    fn fresh_ephemeral(&mut self, first: &[u8]) -> bool {
        let Some(e) = first.get(..32).and_then(|e| <[u8; 32]>::try_from(e).ok()) else {
            return true; // too short to be one: the handshake fails anyway
        };
        if !self.ephemerals.insert(e) {
            return false;
        }
        self.ephemeral_order.push_back(e);
        if self.ephemeral_order.len() > RECENT_EPHEMERALS {
            if let Some(old) = self.ephemeral_order.pop_front() {
                self.ephemerals.remove(&old);
            }
        }
        true
    }

    fn count(&mut self, name: &'static str) {
        *self.counters.entry(name).or_default() += 1;
    }

    /// Counters since the last call (the shell adds them to the server's).
    pub fn take_counters(&mut self) -> BTreeMap<&'static str, u64> {
        std::mem::take(&mut self.counters)
    }

    /// Who the connection is, if it completed a handshake.
    pub fn identity(&self, peer: &PeerId) -> Option<&Identity> {
        match self.conns.get(peer) {
            Some(Conn::Secured { identity, .. }) => Some(identity),
            _ => None,
        }
    }

    /// The key the connection authenticated with, if it completed a
    /// handshake.
    pub fn key(&self, peer: &PeerId) -> Option<PublicKey> {
        match self.conns.get(peer) {
            Some(Conn::Secured { key, .. }) => Some(*key),
            _ => None,
        }
    }

    /// Handles one message received on `peer`'s connection.
    pub fn inbound(&mut self, peer: &PeerId, frames: Vec<Bytes>) -> Verdict {
        self.bound_refused();
        let is_handshake = frames.first().map(|f| f.as_ref()) == Some(HANDSHAKE_MARKER);
        match self.conns.get_mut(peer) {
            Some(Conn::Pending) => {
                // The initiator must wait for the answer (§15.2).
                self.count("security_spoke_during_handshake");
                self.refuse(peer);
                Verdict::Close {
                    reason: SecurityError::Handshake(
                        "sent a message before the handshake was answered".into(),
                    ),
                }
            }
            Some(Conn::Refused) => {
                self.count("security_closed_after_refusal");
                Verdict::Close {
                    reason: SecurityError::Handshake(
                        "the connection was refused before and spoke again".into(),
                    ),
                }
            }
            Some(Conn::Secured { .. }) if is_handshake => {
                self.count("security_second_handshake");
                self.conns.insert(peer.clone(), Conn::Refused);
                Verdict::Close {
                    reason: SecurityError::Handshake(
                        "a second handshake on a secured connection".into(),
                    ),
                }
            }
            Some(Conn::Secured { channel, .. }) => match channel.open(frames) {
                Ok(plain) => Verdict::Open(plain),
                Err(reason) => {
                    self.count(match reason {
                        SecurityError::Replay { .. } => "security_replayed_messages",
                        _ => "security_unauthentic_messages",
                    });
                    // A connection that sends what does not open is broken
                    // or hostile; its keys are not to be trusted further.
                    self.conns.insert(peer.clone(), Conn::Refused);
                    Verdict::Close { reason }
                }
            },
            None if is_handshake => self.start_handshake(peer, frames),
            None => {
                self.count("security_unauthenticated_messages");
                self.conns.insert(peer.clone(), Conn::Refused);
                Verdict::Refuse {
                    reason: SecurityError::Handshake(
                        "this server requires a Noise handshake first (security = \"noise\"); configure `key` and `server_key`".into(),
                    ),
                }
            }
        }
    }

    /// Refused entries are a cache that saves answering a refused
    /// connection twice; a connection that closes without the socket
    /// saying so could leave its entry behind, so past a bound they are
    /// dropped (secured ones go when their connection closes).
    fn bound_refused(&mut self) {
        if self.conns.len() > MAX_TRACKED {
            self.conns
                .retain(|_, c| matches!(c, Conn::Secured { .. } | Conn::Pending));
            self.count("security_refused_entries_dropped");
        }
    }

    /// Marks `peer` refused.
    fn refuse(&mut self, peer: &PeerId) {
        self.conns.insert(peer.clone(), Conn::Refused);
    }

    fn start_handshake(&mut self, peer: &PeerId, frames: Vec<Bytes>) -> Verdict {
        let [_, first]: [Bytes; 2] = match frames.try_into() {
            Ok(f) => f,
            Err(_) => {
                self.count("security_failed_handshakes");
                self.conns.insert(peer.clone(), Conn::Refused);
                return Verdict::Refuse {
                    reason: SecurityError::Malformed(
                        "a handshake message is two frames: marker, Noise message",
                    ),
                };
            }
        };
        if first.len() > handshake::MAX_MESSAGE {
            // Larger than any Noise message: refused before it is queued.
            self.count("security_failed_handshakes");
            self.refuse(peer);
            return Verdict::Refuse {
                reason: SecurityError::Malformed("a handshake message over 65535 bytes"),
            };
        }
        if !self.fresh_ephemeral(&first) {
            // A captured message 1 sent again: refused for a hash lookup,
            // not a handshake's worth of curve operations.
            self.count("security_handshakes_replayed");
            self.refuse(peer);
            return Verdict::Refuse {
                reason: SecurityError::Handshake(
                    "a replayed handshake: its ephemeral key was used before".into(),
                ),
            };
        }
        if self.pending >= MAX_PENDING_HANDSHAKES {
            self.count("security_handshakes_busy");
            self.conns.insert(peer.clone(), Conn::Refused);
            return Verdict::Refuse {
                reason: SecurityError::Busy(MAX_PENDING_HANDSHAKES),
            };
        }
        self.pending += 1;
        self.conns.insert(peer.clone(), Conn::Pending);
        Verdict::Handshake {
            first,
            handshaker: self.handshaker.clone(),
        }
    }

    /// Handshakes handed out and not yet completed. A job counts until its
    /// result comes back, even if its connection closed meanwhile: so
    /// connections that send a handshake and vanish cannot queue more
    /// than [`MAX_PENDING_HANDSHAKES`] jobs for the handshake thread.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// The result of a handshake started by [`Verdict::Handshake`]:
    /// `Secured` or `Refuse`, or `None` when the connection closed (or was
    /// refused) meanwhile and nothing is to be sent. A key revoked while
    /// its handshake was computed is refused here.
    pub fn complete(
        &mut self,
        peer: &PeerId,
        result: Result<Accepted<Identity>, SecurityError>,
    ) -> Option<Verdict> {
        self.pending = self.pending.saturating_sub(1);
        if !matches!(self.conns.get(peer), Some(Conn::Pending)) {
            return None;
        }
        let result = result.and_then(|acc| {
            if self.handshaker.allow.get(&acc.peer) == Some(&acc.identity) {
                Ok(acc)
            } else {
                Err(SecurityError::UnknownKey(acc.peer.to_string()))
            }
        });
        Some(match result {
            Ok(acc) => {
                self.count("security_handshakes");
                self.count(match acc.channel.cipher() {
                    super::channel::Cipher::AesGcm => "security_channels_aesgcm",
                    super::channel::Cipher::ChaChaPoly => "security_channels_chachapoly",
                });
                let answer = vec![
                    Bytes::from_static(HANDSHAKE_MARKER),
                    Bytes::from(acc.answer),
                ];
                self.conns.insert(
                    peer.clone(),
                    Conn::Secured {
                        channel: Box::new(acc.channel),
                        identity: acc.identity.clone(),
                        key: acc.peer,
                    },
                );
                Verdict::Secured {
                    answer,
                    identity: acc.identity,
                    key: acc.peer,
                }
            }
            Err(reason) => {
                self.count(match reason {
                    SecurityError::UnknownKey(_) => "security_unknown_keys",
                    _ => "security_failed_handshakes",
                });
                self.conns.insert(peer.clone(), Conn::Refused);
                Verdict::Refuse { reason }
            }
        })
    }

    /// Seals a message for `peer`; `None` if the connection is not
    /// secured (closed, refused or revoked): nothing leaves in the clear.
    pub fn seal(&mut self, peer: &PeerId, frames: &[Bytes]) -> Option<Vec<Bytes>> {
        match self.conns.get_mut(peer) {
            Some(Conn::Secured { channel, .. }) => Some(channel.seal(frames)),
            _ => None,
        }
    }

    /// The connection closed.
    pub fn forget(&mut self, peer: &PeerId) {
        self.conns.remove(peer);
    }

    /// Replaces the allow-list; returns the secured connections whose key
    /// is no longer allowed as the same identity. They are forgotten here
    /// (nothing from them opens any more); the shell closes them.
    /// The allow-lists in force.
    pub fn allow(&self) -> &AllowList {
        &self.handshaker.allow
    }

    pub fn reload(&mut self, allow: AllowList) -> Vec<(PeerId, Identity)> {
        let revoked: Vec<(PeerId, Identity)> = self
            .conns
            .iter()
            .filter_map(|(peer, conn)| match conn {
                Conn::Secured { identity, key, .. } if allow.get(key) != Some(identity) => {
                    Some((peer.clone(), identity.clone()))
                }
                _ => None,
            })
            .collect();
        for (peer, _) in &revoked {
            // Refused, not forgotten: what it still sends (already queued)
            // closes it without being opened.
            self.conns.insert(peer.clone(), Conn::Refused);
        }
        self.handshaker.allow = Arc::new(allow);
        revoked
    }
}

/// What computing a handshake needs, shared cheaply with the handshake
/// thread: the server's keys and a snapshot of the allow-lists (a reload
/// while a handshake is computed is caught by [`Gate::complete`]).
#[derive(Clone)]
pub struct Handshaker {
    /// The current key first, then previous ones still accepted.
    keys: Arc<Vec<KeyPair>>,
    allow: Arc<AllowList>,
}

impl std::fmt::Debug for Handshaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Handshaker {{ keys: {} }}", self.keys.len())
    }
}

impl Handshaker {
    /// Answers a handshake's first message. The answer's payload says who
    /// the server took the peer for; it travels inside the handshake,
    /// readable by the peer only.
    pub fn accept(&self, first: &[u8]) -> Result<Accepted<Identity>, SecurityError> {
        let allow = &self.allow;
        handshake::Responder::accept(
            &self.keys,
            first,
            super::channel::Cipher::usable_here(),
            |k| allow.get(k).cloned(),
            handshake::answer_payload,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::allow::Role;
    use crate::security::Initiator;

    /// `inbound`, with a handshake computed on the spot as the shell's
    /// handshake thread would.
    fn run(gate: &mut Gate, peer: &PeerId, frames: Vec<Bytes>) -> Verdict {
        match gate.inbound(peer, frames) {
            Verdict::Handshake { first, handshaker } => {
                let result = handshaker.accept(&first);
                gate.complete(peer, result).expect("still pending")
            }
            other => other,
        }
    }

    fn handshake_frames(first: Vec<u8>) -> Vec<Bytes> {
        vec![Bytes::from_static(HANDSHAKE_MARKER), Bytes::from(first)]
    }

    #[test]
    fn secured_opened_sealed_refused_revoked() {
        let server = KeyPair::generate();
        let (alice, mallory) = (KeyPair::generate(), KeyPair::generate());
        let alice_id = Identity::User {
            name: "alice".into(),
            role: Role::Submit,
        };
        let mut gate = Gate::new(
            vec![server.clone()],
            AllowList::from_entries([(alice.public, alice_id.clone())]),
        );
        let (p1, p2, p3) = (
            Bytes::from_static(b"p1"),
            Bytes::from_static(b"p2"),
            Bytes::from_static(b"p3"),
        );
        // Plaintext before a handshake: refused once, then closed.
        assert!(matches!(
            run(&mut gate, &p1, vec![Bytes::from_static(b"\x81\xa1v\x01")]),
            Verdict::Refuse { .. }
        ));
        assert!(matches!(
            run(&mut gate, &p1, vec![Bytes::new()]),
            Verdict::Close { .. }
        ));
        // An unknown key.
        let (_, first) = Initiator::start(&mallory, &server.public, &[]).unwrap();
        assert!(matches!(
            run(&mut gate, &p2, handshake_frames(first)),
            Verdict::Refuse {
                reason: SecurityError::UnknownKey(_)
            }
        ));
        // Alice gets in and talks.
        let (init, first) = Initiator::start(&alice, &server.public, &[]).unwrap();
        let Verdict::Secured {
            answer, identity, ..
        } = run(&mut gate, &p3, handshake_frames(first))
        else {
            panic!("not secured")
        };
        assert_eq!(identity, alice_id);
        assert_eq!(gate.identity(&p3), Some(&alice_id));
        let (mut chan, payload) = init.finish(&answer[1]).unwrap();
        let told: Identity = rmp_serde::from_slice(&payload).unwrap();
        assert_eq!(told, alice_id);
        let sealed = chan.seal(&[Bytes::from_static(b"hdr"), Bytes::from_static(b"body")]);
        let Verdict::Open(plain) = run(&mut gate, &p3, sealed.clone()) else {
            panic!("not opened")
        };
        assert_eq!(plain[1], Bytes::from_static(b"body"));
        let back = gate.seal(&p3, &plain).unwrap();
        assert_eq!(chan.open(back).unwrap(), plain);
        assert!(gate.seal(&p1, &plain).is_none());
        // A replay closes the connection.
        assert!(matches!(
            run(&mut gate, &p3, sealed),
            Verdict::Close {
                reason: SecurityError::Replay { .. }
            }
        ));
        // Revocation: a fresh connection of alice's, then her key goes.
        let (_, first) = Initiator::start(&alice, &server.public, &[]).unwrap();
        let p4 = Bytes::from_static(b"p4");
        assert!(matches!(
            run(&mut gate, &p4, handshake_frames(first)),
            Verdict::Secured { .. }
        ));
        let revoked = gate.reload(AllowList::default());
        assert_eq!(revoked, vec![(p4.clone(), alice_id)]);
        assert!(gate.seal(&p4, &plain).is_none());
        let counters = gate.take_counters();
        assert_eq!(counters["security_unknown_keys"], 1);
        assert_eq!(counters["security_replayed_messages"], 1);
    }

    #[test]
    fn a_previous_server_key_is_accepted_during_a_rotation() {
        let (old, new, worker) = (
            KeyPair::generate(),
            KeyPair::generate(),
            KeyPair::generate(),
        );
        let id = Identity::Worker {
            name: "w".into(),
            pin: None,
        };
        let mut gate = Gate::new(
            vec![new.clone(), old.clone()],
            AllowList::from_entries([(worker.public, id)]),
        );
        for pinned in [&old, &new] {
            let (init, first) = Initiator::start(&worker, &pinned.public, &[]).unwrap();
            let peer = Bytes::copy_from_slice(pinned.public.0.as_slice());
            let Verdict::Secured { answer, .. } = run(&mut gate, &peer, handshake_frames(first))
            else {
                panic!("refused")
            };
            init.finish(&answer[1]).unwrap();
        }
    }

    #[test]
    fn a_handshake_computed_off_the_loop_checks_what_changed_meanwhile() {
        let server = KeyPair::generate();
        let worker = KeyPair::generate();
        let id = Identity::Worker {
            name: "w".into(),
            pin: None,
        };
        let allow = || AllowList::from_entries([(worker.public, id.clone())]);
        let mut gate = Gate::new(vec![server.clone()], allow());
        let start = |gate: &mut Gate, peer: &PeerId| {
            let (_, first) = Initiator::start(&worker, &server.public, &[]).unwrap();
            match gate.inbound(peer, handshake_frames(first)) {
                Verdict::Handshake { first, handshaker } => handshaker.accept(&first),
                other => panic!("not handed off: {other:?}"),
            }
        };
        let (p1, p2, p3) = (
            Bytes::from_static(b"p1"),
            Bytes::from_static(b"p2"),
            Bytes::from_static(b"p3"),
        );
        // Speaking before the answer closes the connection.
        let r = start(&mut gate, &p1);
        assert_eq!(gate.pending(), 1);
        assert!(matches!(
            gate.inbound(&p1, vec![Bytes::from_static(b"x")]),
            Verdict::Close { .. }
        ));
        assert!(gate.complete(&p1, r).is_none());
        // Closed meanwhile: nothing to answer.
        let r = start(&mut gate, &p2);
        gate.forget(&p2);
        assert!(gate.complete(&p2, r).is_none());
        // Revoked meanwhile: refused.
        let r = start(&mut gate, &p3);
        gate.reload(AllowList::default());
        assert!(matches!(
            gate.complete(&p3, r),
            Some(Verdict::Refuse {
                reason: SecurityError::UnknownKey(_)
            })
        ));
        assert_eq!(gate.pending(), 0);
        // Past the bound, refused as busy at once.
        gate.reload(allow());
        for i in 0..MAX_PENDING_HANDSHAKES {
            let peer = Bytes::from(format!("q{i}"));
            let frames = handshake_frames(b"anything".to_vec());
            assert!(matches!(
                gate.inbound(&peer, frames),
                Verdict::Handshake { .. }
            ));
        }
        assert!(matches!(
            gate.inbound(
                &Bytes::from_static(b"late"),
                handshake_frames(b"x".to_vec())
            ),
            Verdict::Refuse {
                reason: SecurityError::Busy(_)
            }
        ));
    }

    #[test]
    fn handshakes_per_address_are_rate_limited_and_replays_refused_cheaply() {
        let mut gate = Gate::new(vec![KeyPair::generate()], AllowList::default());
        let t0 = std::time::Instant::now();
        let burst = HANDSHAKE_BURST_PER_ADDRESS as usize;
        for _ in 0..burst {
            assert!(gate.take_token(t0, "tcp://10.0.0.1:4000"));
        }
        assert!(
            !gate.take_token(t0, "tcp://10.0.0.1:4001"),
            "past the burst"
        );
        assert!(
            gate.take_token(t0, "tcp://10.0.0.2:4000"),
            "another address has its own"
        );
        // A second later the rate's worth is back.
        let later = t0 + std::time::Duration::from_secs(1);
        for _ in 0..HANDSHAKES_PER_ADDRESS_PER_SEC as usize {
            assert!(gate.take_token(later, "tcp://10.0.0.1:4000"));
        }
        assert!(!gate.take_token(later, "tcp://10.0.0.1:4000"));

        let first = [7u8; 96];
        assert!(gate.fresh_ephemeral(&first));
        assert!(
            !gate.fresh_ephemeral(&first),
            "the same ephemeral key twice"
        );
        let mut other = first;
        other[0] = 8;
        assert!(gate.fresh_ephemeral(&other));
    }
}
