//! The Noise `IK` handshake: two messages, one round trip.
//!
//! ```text
//!   initiator (worker, client)                 responder (server)
//!   knows the server's static key S
//!   -> e, es, s, ss   + payload  ─────────────►  learns the initiator's static
//!                                               key, looks it up (allow-list)
//!                      ◄────────────────────  <- e, ee, se  + payload
//!   both: a Channel with fresh per-connection keys
//! ```
//!
//! An initiator that pinned the wrong server key cannot produce a first
//! message the real server can read; a server without the private key
//! for S cannot read it either. Payloads (≤ [`MAX_PAYLOAD`]) carry what
//! the protocol puts in them (PROTOCOL.md §15).

use super::{Channel, KeyPair, PublicKey, SecurityError, NOISE_PARAMS};

/// Largest handshake payload accepted.
pub const MAX_PAYLOAD: usize = 1024;
/// Largest handshake message (Noise's own limit).
pub(crate) const MAX_MESSAGE: usize = 65_535;

fn failed(e: snow::Error) -> SecurityError {
    SecurityError::Handshake(e.to_string())
}

fn builder(local: &KeyPair) -> snow::Builder<'_> {
    snow::Builder::new(NOISE_PARAMS.parse().expect("valid noise params"))
        .local_private_key(&local.private)
}

/// The initiator's half of a handshake in progress.
pub struct Initiator {
    state: snow::HandshakeState,
}

impl Initiator {
    /// Starts a handshake with the server whose key is pinned; returns the
    /// first message to send.
    pub fn start(
        local: &KeyPair,
        server: &PublicKey,
        payload: &[u8],
    ) -> Result<(Self, Vec<u8>), SecurityError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(SecurityError::Handshake("payload too large".into()));
        }
        let mut state = builder(local)
            .remote_public_key(&server.0)
            .build_initiator()
            .map_err(failed)?;
        let mut msg = vec![0u8; MAX_MESSAGE];
        let n = state.write_message(payload, &mut msg).map_err(failed)?;
        msg.truncate(n);
        Ok((Initiator { state }, msg))
    }

    /// Reads the server's answer; returns the channel and the server's
    /// payload.
    pub fn finish(mut self, answer: &[u8]) -> Result<(Channel, Vec<u8>), SecurityError> {
        if answer.len() > MAX_MESSAGE {
            return Err(SecurityError::Handshake("answer too large".into()));
        }
        let mut payload = vec![0u8; MAX_MESSAGE];
        let n = self
            .state
            .read_message(answer, &mut payload)
            .map_err(failed)?;
        payload.truncate(n);
        Ok((Channel::from_handshake(self.state, true)?, payload))
    }
}

/// What a server learns from an accepted handshake.
pub struct Accepted<T> {
    pub channel: Channel,
    /// The message to send back.
    pub answer: Vec<u8>,
    /// The initiator's static key, authenticated by the handshake.
    pub peer: PublicKey,
    /// What the allow-list said about that key.
    pub identity: T,
    /// The initiator's payload.
    pub payload: Vec<u8>,
}

/// The responder's side.
pub struct Responder;

impl Responder {
    /// Reads a first handshake message and, if `allowed` knows the
    /// initiator's key, answers it. `locals` is the server's current key
    /// first, then any previous one still accepted during a key rotation
    /// (an initiator that pinned the old key still gets in, under it).
    pub fn accept<T>(
        locals: &[KeyPair],
        first: &[u8],
        allowed: impl FnOnce(&PublicKey) -> Option<T>,
        payload: impl FnOnce(&T) -> Vec<u8>,
    ) -> Result<Accepted<T>, SecurityError> {
        if first.len() > MAX_MESSAGE {
            return Err(SecurityError::Handshake("message too large".into()));
        }
        let mut last = SecurityError::Handshake("no server key".into());
        let mut read = None;
        for local in locals {
            let mut state = builder(local).build_responder().map_err(failed)?;
            let mut theirs = vec![0u8; MAX_MESSAGE];
            match state.read_message(first, &mut theirs) {
                Ok(n) => {
                    theirs.truncate(n);
                    read = Some((state, theirs));
                    break;
                }
                Err(e) => last = failed(e),
            }
        }
        let (mut state, theirs) = read.ok_or_else(|| match last {
            // Noise IK's first message is encrypted to the server's static
            // key: it does not open when the initiator pinned another one.
            SecurityError::Handshake(e) if e.contains("decrypt") => SecurityError::Handshake(
                "the handshake does not decrypt with this server's key: the peer pins another server key (check its server_key or --server-key against this server's .pub file), or the message was damaged".into(),
            ),
            other => other,
        })?;
        if theirs.len() > MAX_PAYLOAD {
            return Err(SecurityError::Handshake("payload too large".into()));
        }
        let peer = PublicKey(
            state
                .get_remote_static()
                .and_then(|k| k.try_into().ok())
                .ok_or_else(|| SecurityError::Handshake("no initiator key".into()))?,
        );
        let identity = allowed(&peer).ok_or_else(|| SecurityError::UnknownKey(peer.to_string()))?;
        let payload = payload(&identity);
        if payload.len() > MAX_PAYLOAD {
            return Err(SecurityError::Handshake("payload too large".into()));
        }
        let mut answer = vec![0u8; MAX_MESSAGE];
        let n = state.write_message(&payload, &mut answer).map_err(failed)?;
        answer.truncate(n);
        Ok(Accepted {
            channel: Channel::from_handshake(state, false)?,
            answer,
            peer,
            identity,
            payload: theirs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn frames(parts: &[&'static [u8]]) -> Vec<Bytes> {
        parts.iter().map(|p| Bytes::from_static(p)).collect()
    }

    #[test]
    fn both_sides_authenticate_and_talk() {
        let (server, worker) = (KeyPair::generate(), KeyPair::generate());
        let (init, first) = Initiator::start(&worker, &server.public, b"hello").unwrap();
        let acc = Responder::accept(
            std::slice::from_ref(&server),
            &first,
            |k| (*k == worker.public).then_some("w1"),
            |_| b"welcome".to_vec(),
        )
        .unwrap();
        assert_eq!(acc.identity, "w1");
        assert_eq!(acc.peer, worker.public);
        assert_eq!(acc.payload, b"hello");
        let (mut client, payload) = init.finish(&acc.answer).unwrap();
        assert_eq!(payload, b"welcome");
        let mut server_side = acc.channel;
        let sealed = client.seal(&frames(&[b"header", b"body"]));
        assert_eq!(
            server_side.open(sealed).unwrap(),
            frames(&[b"header", b"body"])
        );
        let back = server_side.seal(&frames(&[b"h", b"b", b"raw"]));
        assert_eq!(client.open(back).unwrap(), frames(&[b"h", b"b", b"raw"]));
    }

    #[test]
    fn an_unknown_key_is_refused_and_a_wrong_server_key_cannot_get_in() {
        let (server, worker) = (KeyPair::generate(), KeyPair::generate());
        let (_, first) = Initiator::start(&worker, &server.public, b"").unwrap();
        let e = Responder::accept(
            std::slice::from_ref(&server),
            &first,
            |_| None::<()>,
            |_| Vec::new(),
        )
        .err()
        .unwrap();
        assert!(matches!(e, SecurityError::UnknownKey(_)), "{e}");
        // Pinned a key that is not the server's: the server cannot read it.
        let impostor = KeyPair::generate();
        let (_, first) = Initiator::start(&worker, &impostor.public, b"").unwrap();
        assert!(matches!(
            Responder::accept(
                std::slice::from_ref(&server),
                &first,
                |_| Some(()),
                |_| Vec::new()
            ),
            Err(SecurityError::Handshake(_))
        ));
        // Garbage is a handshake error, not a panic.
        assert!(Responder::accept(
            std::slice::from_ref(&server),
            &[0u8; 7],
            |_| Some(()),
            |_| Vec::new()
        )
        .is_err());
    }
}
