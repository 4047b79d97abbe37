//! A connection's sealed messages after the handshake.
//!
//! Wire form of one message: frame 0 is the message number (8 bytes,
//! big-endian, from 1, +1 per message in each direction), then each
//! plaintext frame sealed with ChaCha20-Poly1305 under the direction's key:
//! nonce = frame index (4 bytes BE) ‖ message number (8 bytes BE),
//! associated data = handshake hash ‖ frame index ‖ frame count. A frame
//! moved, dropped or taken from another message or connection does not
//! authenticate; a message number not above the last accepted one is a
//! replay or a reordering and is refused before any decryption.

use super::SecurityError;
use bytes::Bytes;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};

/// The keys and counters of one secured connection.
pub struct Channel {
    send: ChaCha20Poly1305,
    recv: ChaCha20Poly1305,
    /// Number of the next message sent.
    next_send: u64,
    /// Number of the last message accepted (0: none yet).
    last_recv: u64,
    /// The Noise handshake hash: binds every frame to this connection.
    hash: [u8; 32],
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Channel {{ next_send: {}, last_recv: {} }}",
            self.next_send, self.last_recv
        )
    }
}

fn nonce(index: u32, counter: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&index.to_be_bytes());
    n[4..].copy_from_slice(&counter.to_be_bytes());
    n
}

fn aad(hash: &[u8; 32], index: u32, count: u32) -> [u8; 40] {
    let mut a = [0u8; 40];
    a[..32].copy_from_slice(hash);
    a[32..36].copy_from_slice(&index.to_be_bytes());
    a[36..].copy_from_slice(&count.to_be_bytes());
    a
}

impl Channel {
    pub(crate) fn from_handshake(
        mut state: snow::HandshakeState,
        initiator: bool,
    ) -> Result<Self, SecurityError> {
        if !state.is_handshake_finished() {
            return Err(SecurityError::Handshake("handshake not finished".into()));
        }
        let hash: [u8; 32] = state
            .get_handshake_hash()
            .get(..32)
            .and_then(|h| h.try_into().ok())
            .ok_or_else(|| SecurityError::Handshake("short handshake hash".into()))?;
        // Noise's split: the first key protects initiator → responder.
        let (k1, k2) = state.dangerously_get_raw_split();
        let (send, recv) = if initiator { (k1, k2) } else { (k2, k1) };
        Ok(Channel {
            send: ChaCha20Poly1305::new(Key::from_slice(&send)),
            recv: ChaCha20Poly1305::new(Key::from_slice(&recv)),
            next_send: 1,
            last_recv: 0,
            hash,
        })
    }

    /// Seals one message (its frames) for sending.
    pub fn seal(&mut self, frames: &[Bytes]) -> Vec<Bytes> {
        let counter = self.next_send;
        // 2^64 messages on one connection cannot happen; wrapping would
        // reuse nonces, so the channel refuses to go on instead.
        self.next_send = counter.checked_add(1).expect("message counter exhausted");
        let count = frames.len() as u32;
        let mut out = Vec::with_capacity(frames.len() + 1);
        out.push(Bytes::copy_from_slice(&counter.to_be_bytes()));
        for (i, f) in frames.iter().enumerate() {
            let i = i as u32;
            let sealed = self
                .send
                .encrypt(
                    Nonce::from_slice(&nonce(i, counter)),
                    Payload {
                        msg: f,
                        aad: &aad(&self.hash, i, count),
                    },
                )
                .expect("ChaCha20-Poly1305 sealing");
            out.push(Bytes::from(sealed));
        }
        out
    }

    /// Opens a received message; refuses replays, reorderings and anything
    /// that does not authenticate. Nothing is accepted (the counter does
    /// not move) unless every frame authenticates.
    pub fn open(&mut self, frames: Vec<Bytes>) -> Result<Vec<Bytes>, SecurityError> {
        let mut frames = frames.into_iter();
        let head = frames
            .next()
            .ok_or(SecurityError::Malformed("no message number"))?;
        let counter = u64::from_be_bytes(
            head.as_ref()
                .try_into()
                .map_err(|_| SecurityError::Malformed("message number is not 8 bytes"))?,
        );
        if counter <= self.last_recv {
            return Err(SecurityError::Replay {
                counter,
                last: self.last_recv,
            });
        }
        let sealed: Vec<Bytes> = frames.collect();
        let count = sealed.len() as u32;
        let mut out = Vec::with_capacity(sealed.len());
        for (i, f) in sealed.iter().enumerate() {
            let i = i as u32;
            let plain = self
                .recv
                .decrypt(
                    Nonce::from_slice(&nonce(i, counter)),
                    Payload {
                        msg: f,
                        aad: &aad(&self.hash, i, count),
                    },
                )
                .map_err(|_| SecurityError::Decrypt)?;
            out.push(Bytes::from(plain));
        }
        self.last_recv = counter;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Initiator, KeyPair, Responder};
    use super::*;

    fn pair() -> (Channel, Channel) {
        let (server, worker) = (KeyPair::generate(), KeyPair::generate());
        let (init, first) = Initiator::start(&worker, &server.public, b"").unwrap();
        let acc = Responder::accept(
            std::slice::from_ref(&server),
            &first,
            |_| Some(()),
            |_| Vec::new(),
        )
        .unwrap();
        let (client, _) = init.finish(&acc.answer).unwrap();
        (client, acc.channel)
    }

    fn msg(parts: &[&str]) -> Vec<Bytes> {
        parts
            .iter()
            .map(|p| Bytes::copy_from_slice(p.as_bytes()))
            .collect()
    }

    #[test]
    fn a_replayed_or_reordered_message_is_refused() {
        let (mut a, mut b) = pair();
        let m1 = a.seal(&msg(&["one"]));
        let m2 = a.seal(&msg(&["two"]));
        assert_eq!(b.open(m2.clone()).unwrap(), msg(&["two"]));
        // m1 arrives after m2: reordered.
        assert_eq!(
            b.open(m1).unwrap_err(),
            SecurityError::Replay {
                counter: 1,
                last: 2
            }
        );
        // m2 again: replayed.
        assert!(matches!(b.open(m2), Err(SecurityError::Replay { .. })));
        // A dropped message leaves a gap, which is fine.
        let _m3 = a.seal(&msg(&["three"]));
        assert_eq!(b.open(a.seal(&msg(&["four"]))).unwrap(), msg(&["four"]));
    }

    #[test]
    fn tampered_moved_or_foreign_frames_do_not_authenticate() {
        let (mut a, mut b) = pair();
        let mut m = a.seal(&msg(&["header", "body"]));
        let mut flipped = m[2].to_vec();
        flipped[0] ^= 1;
        m[2] = Bytes::from(flipped);
        assert_eq!(b.open(m).unwrap_err(), SecurityError::Decrypt);
        // Frames swapped within a message.
        let mut m = a.seal(&msg(&["header", "body"]));
        m.swap(1, 2);
        assert_eq!(b.open(m).unwrap_err(), SecurityError::Decrypt);
        // A frame dropped.
        let mut m = a.seal(&msg(&["header", "body"]));
        m.pop();
        assert_eq!(b.open(m).unwrap_err(), SecurityError::Decrypt);
        // Sealed for another connection (same keys pair, fresh handshake).
        let (mut c, _) = pair();
        assert_eq!(
            b.open(c.seal(&msg(&["x"]))).unwrap_err(),
            SecurityError::Decrypt
        );
        // Failed opens did not move the counter: the next good one passes.
        assert_eq!(b.open(a.seal(&msg(&["ok"]))).unwrap(), msg(&["ok"]));
        assert!(matches!(
            b.open(vec![Bytes::from_static(b"short")]),
            Err(SecurityError::Malformed(_))
        ));
    }

    #[test]
    fn large_frames_seal_whole() {
        let (mut a, mut b) = pair();
        let big = Bytes::from(vec![7u8; 4 * 1024 * 1024]);
        let sealed = a.seal(&[Bytes::from_static(b"h"), big.clone()]);
        assert_eq!(sealed[2].len(), big.len() + 16);
        assert_eq!(b.open(sealed).unwrap()[1], big);
    }
}
