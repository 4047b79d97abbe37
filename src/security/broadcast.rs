//! Signed broadcasts on the events port (PROTOCOL.md §15.4), without I/O.
//!
//! PUB accepts anyone, and everything on it reaches every subscriber, so
//! with security the server publishes only its heartbeats and shutdown
//! there, each signed with an Ed25519 key made afresh at every server
//! start. The public half travels in the sealed `welcome`, so only a peer
//! the server authenticated learns it, and only the server can sign:
//! not an anonymous subscriber, not another allow-listed worker, not a
//! former incarnation of the server.
//!
//! Each broadcast carries a *beat*: the number of heartbeat intervals
//! since the server started, counted on its monotonic clock (and strictly
//! increasing). A listener accepts a beat only above the last it accepted
//! (a replayed capture is refused) and only if it is not more than
//! `liveness` intervals behind where the beat should be by the listener's
//! own clock since the welcome (a broadcast held back by someone on the
//! path and released later buys a stopped server at most `liveness`
//! intervals). Both checks come before the signature is verified, so a
//! stream of stale copies costs a comparison each.

use bytes::Bytes;
use ring::signature::{Ed25519KeyPair, KeyPair as _, UnparsedPublicKey, ED25519};
use std::time::{Duration, Instant};

/// Bytes every signed message starts with: a signature over an events
/// broadcast is never valid as anything else.
const CONTEXT: &[u8] = b"OTS-EVENTS-1";

/// The last frame of a signed broadcast: the beat (8 bytes big-endian)
/// and the Ed25519 signature (64 bytes).
pub const SIGNATURE_FRAME_BYTES: usize = 8 + 64;

/// Why a broadcast was not taken as a sign of the server's life.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BroadcastError {
    #[error("a broadcast arrived before the server's welcome named its signing key; ignored")]
    NoKey,
    #[error("a broadcast has {0} frames, not topic, header, body and signature; ignored")]
    Shape(usize),
    #[error("beat {beat} is not above the last accepted {last} (a replayed broadcast); ignored")]
    Replayed { beat: u64, last: u64 },
    #[error("beat {beat} is more than {liveness} intervals behind the expected {expected} (held back and released late); ignored")]
    Stale {
        beat: u64,
        expected: u64,
        liveness: u32,
    },
    #[error("a broadcast's signature does not verify with the key of the server that welcomed us (forged, or from another server); ignored")]
    Forged,
}

fn signed_message(beat: u64, header: &[u8], body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(CONTEXT.len() + 16 + header.len() + body.len());
    m.extend_from_slice(CONTEXT);
    m.extend_from_slice(&beat.to_be_bytes());
    m.extend_from_slice(&(header.len() as u32).to_be_bytes());
    m.extend_from_slice(header);
    m.extend_from_slice(&(body.len() as u32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// The server's side: this incarnation's signing key.
pub struct Announcer {
    key: Ed25519KeyPair,
}

impl Announcer {
    /// A fresh key from the system's random source.
    pub fn generate() -> Announcer {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).expect("system random source");
        Announcer {
            key: Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("a key ring just made"),
        }
    }

    /// The public half, for the sealed `welcome` (`events_key`).
    pub fn public_key(&self) -> [u8; 32] {
        let mut k = [0u8; 32];
        k.copy_from_slice(self.key.public_key().as_ref());
        k
    }

    /// The signature frame for a broadcast of `header` and `body` at `beat`.
    pub fn sign(&self, beat: u64, header: &[u8], body: &[u8]) -> Bytes {
        let sig = self.key.sign(&signed_message(beat, header, body));
        let mut frame = Vec::with_capacity(SIGNATURE_FRAME_BYTES);
        frame.extend_from_slice(&beat.to_be_bytes());
        frame.extend_from_slice(sig.as_ref());
        Bytes::from(frame)
    }
}

/// The server's beat counter: intervals since it started, strictly
/// increasing (two broadcasts within one interval get consecutive beats).
#[derive(Debug)]
pub struct Beats {
    started: Instant,
    interval: Duration,
    last: u64,
}

impl Beats {
    pub fn new(started: Instant, interval: Duration) -> Beats {
        Beats {
            started,
            interval: interval.max(Duration::from_millis(1)),
            last: 0,
        }
    }

    fn at(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.started).as_millis();
        let n = elapsed / self.interval.as_millis().max(1);
        u64::try_from(n).unwrap_or(u64::MAX).saturating_add(1)
    }

    /// The beat for a broadcast sent now.
    pub fn next(&mut self, now: Instant) -> u64 {
        self.last = self.at(now).max(self.last.saturating_add(1));
        self.last
    }

    /// The latest beat given out (or where the count stands now, if
    /// later): the anchor a `welcome` carries.
    pub fn current(&self, now: Instant) -> u64 {
        self.at(now).max(self.last)
    }
}

/// A worker's side, per welcome: the key and the beat the server named.
#[derive(Debug)]
pub struct Listener {
    key: [u8; 32],
    anchor_beat: u64,
    anchor: Instant,
    interval: Duration,
    liveness: u32,
    last: u64,
}

impl Listener {
    /// After a `welcome{events_key, beat}` received at `now`.
    pub fn new(
        key: [u8; 32],
        beat: u64,
        now: Instant,
        interval: Duration,
        liveness: u32,
    ) -> Listener {
        Listener {
            key,
            anchor_beat: beat,
            anchor: now,
            interval: interval.max(Duration::from_millis(1)),
            liveness,
            last: beat.saturating_sub(1),
        }
    }

    /// From a `welcome` received at `now`: its `events_key`, `beat` and
    /// rhythm (as the session adopts it: at least 10 ms, liveness at
    /// least 2). None if the welcome names no key (no security) or a
    /// malformed one.
    pub fn from_welcome(body: &crate::protocol::Body, now: Instant) -> Option<Listener> {
        let crate::protocol::Body::Welcome {
            heartbeat_ms,
            liveness,
            events_key: Some(key),
            beat,
            ..
        } = body
        else {
            return None;
        };
        let mut k = [0u8; 32];
        hex::decode_to_slice(key, &mut k).ok()?;
        Some(Listener::new(
            k,
            *beat,
            now,
            Duration::from_millis((*heartbeat_ms).max(10)),
            (*liveness).max(2),
        ))
    }

    /// Where the server's beat should be by our clock.
    fn expected(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.anchor).as_millis();
        let n = elapsed / self.interval.as_millis().max(1);
        self.anchor_beat
            .saturating_add(u64::try_from(n).unwrap_or(u64::MAX))
    }

    /// Checks a broadcast `[topic, header, body, signature]` received at
    /// `now`; on success returns `[header, body]` to decode.
    pub fn open(&mut self, now: Instant, frames: Vec<Bytes>) -> Result<Vec<Bytes>, BroadcastError> {
        let [_topic, header, body, signature]: [Bytes; 4] = frames
            .try_into()
            .map_err(|f: Vec<Bytes>| BroadcastError::Shape(f.len()))?;
        if signature.len() != SIGNATURE_FRAME_BYTES {
            return Err(BroadcastError::Forged);
        }
        let beat = u64::from_be_bytes(signature[..8].try_into().expect("8 bytes"));
        if beat <= self.last {
            return Err(BroadcastError::Replayed {
                beat,
                last: self.last,
            });
        }
        let expected = self.expected(now);
        if beat.saturating_add(u64::from(self.liveness)) < expected {
            return Err(BroadcastError::Stale {
                beat,
                expected,
                liveness: self.liveness,
            });
        }
        UnparsedPublicKey::new(&ED25519, &self.key)
            .verify(&signed_message(beat, &header, &body), &signature[8..])
            .map_err(|_| BroadcastError::Forged)?;
        self.last = beat;
        Ok(vec![header, body])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HB: Duration = Duration::from_millis(1000);

    fn broadcast(a: &Announcer, beat: u64, body: &'static [u8]) -> Vec<Bytes> {
        let header = Bytes::from_static(b"header");
        let body = Bytes::from_static(body);
        let sig = a.sign(beat, &header, &body);
        vec![Bytes::from_static(b"hb"), header, body, sig]
    }

    #[test]
    fn a_signed_beat_opens_once_and_only_in_order() {
        let t0 = Instant::now();
        let a = Announcer::generate();
        let mut l = Listener::new(a.public_key(), 5, t0, HB, 3);
        assert_eq!(
            l.open(t0, broadcast(&a, 5, b"five")).unwrap()[1],
            &b"five"[..]
        );
        assert!(matches!(
            l.open(t0, broadcast(&a, 5, b"five")),
            Err(BroadcastError::Replayed { .. })
        ));
        assert!(l.open(t0 + HB, broadcast(&a, 6, b"six")).is_ok());
        assert!(matches!(
            l.open(t0 + HB, broadcast(&a, 4, b"four")),
            Err(BroadcastError::Replayed { .. })
        ));
    }

    #[test]
    fn another_key_a_changed_body_or_a_moved_beat_do_not_verify() {
        let t0 = Instant::now();
        let a = Announcer::generate();
        let other = Announcer::generate();
        let mut l = Listener::new(a.public_key(), 1, t0, HB, 3);
        assert_eq!(
            l.open(t0, broadcast(&other, 2, b"x")),
            Err(BroadcastError::Forged)
        );
        let mut tampered = broadcast(&a, 2, b"x");
        tampered[2] = Bytes::from_static(b"y");
        assert_eq!(l.open(t0, tampered), Err(BroadcastError::Forged));
        // The beat is signed: a copy renumbered to look fresh fails.
        let mut renumbered = broadcast(&a, 2, b"x");
        let mut sig = renumbered[3].to_vec();
        sig[..8].copy_from_slice(&9u64.to_be_bytes());
        renumbered[3] = Bytes::from(sig);
        assert_eq!(l.open(t0, renumbered), Err(BroadcastError::Forged));
        // Nothing refused moved the counter: the genuine one still opens.
        assert!(l.open(t0, broadcast(&a, 2, b"x")).is_ok());
    }

    #[test]
    fn a_broadcast_held_back_past_liveness_intervals_is_stale() {
        let t0 = Instant::now();
        let a = Announcer::generate();
        let mut l = Listener::new(a.public_key(), 10, t0, HB, 3);
        let held = broadcast(&a, 11, b"x");
        // Released 5 intervals later: expected 15, 11 + 3 < 15.
        assert!(matches!(
            l.open(t0 + HB * 5, held.clone()),
            Err(BroadcastError::Stale { .. })
        ));
        // Released within the window: accepted.
        assert!(l.open(t0 + HB * 4, held).is_ok());
    }

    #[test]
    fn beats_count_intervals_and_never_repeat() {
        let t0 = Instant::now();
        let mut b = Beats::new(t0, HB);
        assert_eq!(b.next(t0), 1);
        assert_eq!(b.next(t0), 2, "a second broadcast in one interval");
        assert_eq!(b.next(t0 + HB * 10), 11);
        assert_eq!(b.current(t0 + HB * 10), 11);
        assert_eq!(b.current(t0 + HB * 12), 13);
    }

    #[test]
    fn a_misshapen_broadcast_is_refused_without_panicking() {
        let t0 = Instant::now();
        let a = Announcer::generate();
        let mut l = Listener::new(a.public_key(), 1, t0, HB, 3);
        assert_eq!(l.open(t0, vec![]), Err(BroadcastError::Shape(0)));
        let mut short = broadcast(&a, 2, b"x");
        short[3] = Bytes::from_static(b"short");
        assert_eq!(l.open(t0, short), Err(BroadcastError::Forged));
    }
}
