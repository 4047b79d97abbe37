//! A connection's sealed messages after the handshake.
//!
//! Wire form of one message (PROTOCOL.md §15.3): frame 0 is the message
//! number (8 bytes, big-endian, from 1, +1 per message in each direction);
//! frame 1 is the whole plaintext message — each frame as a 4-byte
//! big-endian length and its bytes — sealed once with ChaCha20-Poly1305
//! under the direction's key: nonce = 4 zero bytes ‖ message number,
//! associated data = handshake hash ‖ message number. One AEAD per message,
//! not per frame: for the small messages that dominate (acks, heartbeats,
//! log batches) the per-operation set-up is most of the cost. A message
//! number not above the last accepted one is a replay or a reordering and
//! is refused before any decryption; anything tampered, truncated or
//! sealed for another connection does not authenticate.

use super::SecurityError;
use bytes::{BufMut, Bytes, BytesMut};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, CHACHA20_POLY1305};

/// The AEAD that seals a connection's messages after the handshake: one of
/// the two ciphers Noise names. ChaCha20-Poly1305 (`ChaChaPoly`) unless
/// both ends have AES and carry-less multiply instructions and agreed on
/// AES-256-GCM (`AESGCM`) in the handshake's payloads (PROTOCOL.md
/// §15.3): there it seals several times faster per core.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cipher {
    ChaChaPoly,
    AesGcm,
}

impl Cipher {
    /// The name in handshake payloads, as Noise spells the cipher.
    pub fn name(self) -> &'static str {
        match self {
            Cipher::ChaChaPoly => "ChaChaPoly",
            Cipher::AesGcm => "AESGCM",
        }
    }

    pub fn from_name(name: &str) -> Option<Cipher> {
        match name {
            "ChaChaPoly" => Some(Cipher::ChaChaPoly),
            "AESGCM" => Some(Cipher::AesGcm),
            _ => None,
        }
    }

    /// The ciphers this machine seals fast, preferred first: AES-256-GCM
    /// only with AES and carry-less multiply in hardware (without them
    /// ring's AES is a slow constant-time fallback), then ChaCha20-Poly1305.
    /// `OTS_TRANSPORT_CIPHER=ChaChaPoly` keeps to ChaCha20-Poly1305 (for
    /// comparing the two).
    pub fn usable_here() -> &'static [Cipher] {
        static BOTH: [Cipher; 2] = [Cipher::AesGcm, Cipher::ChaChaPoly];
        static CHACHA: [Cipher; 1] = [Cipher::ChaChaPoly];
        static CHOSEN: std::sync::OnceLock<&'static [Cipher]> = std::sync::OnceLock::new();
        CHOSEN.get_or_init(|| {
            let forced = std::env::var("OTS_TRANSPORT_CIPHER").ok();
            if forced.as_deref() == Some("ChaChaPoly") || !aes_in_hardware() {
                &CHACHA
            } else {
                &BOTH
            }
        })
    }
}

fn aes_in_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// Frames one sealed message may carry (an OTSP message has at most 3:
/// header, body, raw; a little room for versions to come).
pub const MAX_SEALED_FRAMES: usize = 8;

/// The tag either AEAD appends.
const TAG_LEN: usize = 16;

/// The keys and counters of one secured connection.
pub struct Channel {
    send: LessSafeKey,
    recv: LessSafeKey,
    /// Number of the next message sent.
    next_send: u64,
    /// Number of the last message accepted (0: none yet).
    last_recv: u64,
    /// The Noise handshake hash: binds every message to this connection.
    hash: [u8; 32],
    cipher: Cipher,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Channel {{ next_send: {}, last_recv: {}, cipher: {} }}",
            self.next_send,
            self.last_recv,
            self.cipher.name()
        )
    }
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

fn aad(hash: &[u8; 32], counter: u64) -> Aad<[u8; 40]> {
    let mut a = [0u8; 40];
    a[..32].copy_from_slice(hash);
    a[32..].copy_from_slice(&counter.to_be_bytes());
    Aad::from(a)
}

fn key(bytes: &[u8; 32], cipher: Cipher) -> LessSafeKey {
    let algorithm = match cipher {
        Cipher::ChaChaPoly => &CHACHA20_POLY1305,
        Cipher::AesGcm => &AES_256_GCM,
    };
    LessSafeKey::new(UnboundKey::new(algorithm, bytes).expect("a 32-byte key"))
}

impl Channel {
    /// The AEAD this connection seals with.
    pub fn cipher(&self) -> Cipher {
        self.cipher
    }

    pub(crate) fn from_handshake(
        mut state: snow::HandshakeState,
        initiator: bool,
        cipher: Cipher,
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
            send: key(&send, cipher),
            recv: key(&recv, cipher),
            next_send: 1,
            last_recv: 0,
            hash,
            cipher,
        })
    }

    /// Seals one message (its frames) for sending.
    pub fn seal(&mut self, frames: &[Bytes]) -> Vec<Bytes> {
        let counter = self.next_send;
        // 2^64 messages on one connection cannot happen; wrapping would
        // reuse nonces, so the channel refuses to go on instead.
        self.next_send = counter.checked_add(1).expect("message counter exhausted");
        let len: usize = frames.iter().map(|f| 4 + f.len()).sum::<usize>() + TAG_LEN;
        let mut buf = BytesMut::with_capacity(len);
        for f in frames {
            // Frames are bounded by the transport's message limit, far
            // below 4 GiB.
            buf.put_u32(u32::try_from(f.len()).expect("frame under 4 GiB"));
            buf.put_slice(f);
        }
        self.send
            .seal_in_place_append_tag(nonce(counter), aad(&self.hash, counter), &mut buf)
            .expect("AEAD sealing");
        vec![Bytes::copy_from_slice(&counter.to_be_bytes()), buf.freeze()]
    }

    /// Opens a received message; refuses replays, reorderings and anything
    /// that does not authenticate or does not parse. Nothing is accepted
    /// (the counter does not move) unless the message authenticates.
    pub fn open(&mut self, frames: Vec<Bytes>) -> Result<Vec<Bytes>, SecurityError> {
        let [head, sealed]: [Bytes; 2] = frames
            .try_into()
            .map_err(|_| SecurityError::Malformed("a sealed message has 2 frames"))?;
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
        // Opened in place, and the frames below are slices of it. A large
        // message arrives in a buffer of its own (the vendored zeromq's
        // decoder sees to it) and is decrypted where it lies; a small one
        // shares its buffer with the messages around it and is copied out.
        let mut buf = sealed
            .try_into_mut()
            .unwrap_or_else(|shared| BytesMut::from(shared.as_ref()));
        let plain_len = self
            .recv
            .open_in_place(nonce(counter), aad(&self.hash, counter), &mut buf)
            .map_err(|_| SecurityError::Decrypt)?
            .len();
        buf.truncate(plain_len);
        let mut plain = buf.freeze();
        // One rule for every plaintext that is not a message (PROTOCOL
        // §15.3): no frame at all is as malformed as lengths that do not
        // add up.
        if plain.is_empty() {
            return Err(SecurityError::Malformed("a sealed message holds no frame"));
        }
        let mut out = Vec::new();
        while !plain.is_empty() {
            if out.len() == MAX_SEALED_FRAMES {
                return Err(SecurityError::Malformed(
                    "too many frames in a sealed message",
                ));
            }
            if plain.len() < 4 {
                return Err(SecurityError::Malformed("truncated frame length"));
            }
            let n = u32::from_be_bytes(plain[..4].try_into().expect("4 bytes")) as usize;
            if plain.len() - 4 < n {
                return Err(SecurityError::Malformed("frame longer than the message"));
            }
            let _ = plain.split_to(4);
            out.push(plain.split_to(n));
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
        let (init, first) = Initiator::start(&worker, &server.public, &[]).unwrap();
        let acc = Responder::accept(
            std::slice::from_ref(&server),
            &first,
            &[],
            |_| Some(()),
            |_, _| Vec::new(),
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
    fn tampered_renumbered_truncated_or_foreign_messages_do_not_authenticate() {
        let (mut a, mut b) = pair();
        let mut m = a.seal(&msg(&["header", "body"]));
        let mut flipped = m[1].to_vec();
        flipped[5] ^= 1;
        m[1] = Bytes::from(flipped);
        assert_eq!(b.open(m).unwrap_err(), SecurityError::Decrypt);
        // Given another (higher) number: the nonce and the associated data
        // no longer match.
        let mut m = a.seal(&msg(&["header", "body"]));
        m[0] = Bytes::copy_from_slice(&1000u64.to_be_bytes());
        assert_eq!(b.open(m).unwrap_err(), SecurityError::Decrypt);
        // Cut short.
        let mut m = a.seal(&msg(&["header", "body"]));
        m[1] = m[1].slice(..m[1].len() - 1);
        assert_eq!(b.open(m).unwrap_err(), SecurityError::Decrypt);
        // The sealed frame dropped, or a frame added.
        let mut m = a.seal(&msg(&["header", "body"]));
        m.pop();
        assert!(matches!(b.open(m), Err(SecurityError::Malformed(_))));
        let mut m = a.seal(&msg(&["header", "body"]));
        m.push(Bytes::from_static(b"extra"));
        assert!(matches!(b.open(m), Err(SecurityError::Malformed(_))));
        // Sealed for another connection (same keys pair, fresh handshake).
        let (mut c, _) = pair();
        assert_eq!(
            b.open(c.seal(&msg(&["x"]))).unwrap_err(),
            SecurityError::Decrypt
        );
        // Failed opens did not move the counter: the next good one passes.
        assert_eq!(b.open(a.seal(&msg(&["ok"]))).unwrap(), msg(&["ok"]));
        assert!(matches!(
            b.open(vec![Bytes::from_static(b"short"), Bytes::new()]),
            Err(SecurityError::Malformed(_))
        ));
    }

    #[test]
    fn empty_frames_and_frame_bounds_survive_the_round_trip() {
        let (mut a, mut b) = pair();
        for m in [msg(&[""]), msg(&["", "x", ""]), msg(&["a"; 8])] {
            assert_eq!(b.open(a.seal(&m)).unwrap(), m);
        }
        // Authentic but holding no frame at all: refused like bad lengths.
        assert!(matches!(
            b.open(a.seal(&msg(&[]))),
            Err(SecurityError::Malformed(_))
        ));
        // Authentic but carrying more frames than any message may: refused.
        assert!(matches!(
            b.open(a.seal(&msg(&["a"; 9]))),
            Err(SecurityError::Malformed(_))
        ));
    }

    #[test]
    fn large_frames_seal_whole() {
        let (mut a, mut b) = pair();
        let big = Bytes::from(vec![7u8; 4 * 1024 * 1024]);
        let sealed = a.seal(&[Bytes::from_static(b"h"), big.clone()]);
        assert_eq!(sealed.len(), 2);
        assert_eq!(sealed[1].len(), 4 + 1 + 4 + big.len() + 16);
        assert_eq!(b.open(sealed).unwrap()[1], big);
    }

    /// A sealed frame the receiver owns alone is opened where it lies; one
    /// that shares its buffer (a slice of what was read) is copied first,
    /// and whoever else holds it sees its bytes unchanged.
    #[test]
    fn a_shared_sealed_frame_is_opened_from_a_copy_and_left_as_it_was() {
        let (mut a, mut b) = pair();
        let sealed = a.seal(&msg(&["header", "body"]));
        let kept = sealed[1].clone();
        let opened = b.open(sealed.clone()).unwrap();
        assert_eq!(opened, msg(&["header", "body"]));
        assert_eq!(kept, sealed[1], "the other holder's bytes are untouched");
        let again = a.seal(&msg(&["x"]));
        let [head, body]: [Bytes; 2] = again.try_into().unwrap();
        let owned = Bytes::from(body.to_vec());
        let at = owned.as_ptr();
        let opened = b.open(vec![head, owned]).unwrap();
        assert_eq!(opened, msg(&["x"]));
        assert_eq!(
            opened[0].as_ptr(),
            at.wrapping_add(4),
            "decrypted in the buffer it arrived in"
        );
    }
}
