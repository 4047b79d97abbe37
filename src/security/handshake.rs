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

use super::channel::Cipher;
use super::{Channel, KeyPair, PublicKey, SecurityError, NOISE_PARAMS};
use serde::{Deserialize, Serialize};

/// Message 1's payload: the transport ciphers the initiator can use,
/// preferred first (Noise's names). No payload at all (an initiator that
/// predates the choice) means ChaCha20-Poly1305 only.
#[derive(Serialize, Deserialize, Default)]
struct Offer {
    #[serde(default)]
    ciphers: Vec<String>,
}

/// What the initiator reads out of message 2's payload besides whatever
/// else the responder put there: the cipher chosen (absent: ChaChaPoly).
#[derive(Deserialize)]
struct Chosen {
    #[serde(default)]
    cipher: Option<String>,
}

/// Message 2's payload as the responder writes it: the map `about`
/// serialises to (for ots, who the server took the initiator for) with
/// the cipher chosen as `cipher`, left out for ChaCha20-Poly1305.
#[derive(Serialize)]
struct Answer<'a, T: Serialize> {
    #[serde(flatten)]
    about: &'a T,
    #[serde(skip_serializing_if = "Option::is_none")]
    cipher: Option<&'static str>,
}

/// The payload for [`Responder::accept`]'s answer: `about` (a struct or
/// map) and the `cipher` the initiator reads back.
pub fn answer_payload<T: Serialize>(about: &T, cipher: Cipher) -> Vec<u8> {
    rmp_serde::to_vec_named(&Answer {
        about,
        cipher: (cipher != Cipher::ChaChaPoly).then(|| cipher.name()),
    })
    .unwrap_or_default()
}

/// Ciphers named in an offer, at most: a longer list is cut.
const MAX_OFFERED: usize = 8;

/// The responder's choice: the initiator's most preferred cipher this
/// side can use too; ChaCha20-Poly1305 when the payload offers nothing
/// usable (or is not an offer at all).
fn choose(offer: &[u8], usable: &[Cipher]) -> Cipher {
    let Ok(offer) = rmp_serde::from_slice::<Offer>(offer) else {
        return Cipher::ChaChaPoly;
    };
    offer
        .ciphers
        .iter()
        .take(MAX_OFFERED)
        .filter_map(|n| Cipher::from_name(n))
        .find(|c| usable.contains(c))
        .unwrap_or(Cipher::ChaChaPoly)
}

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
    offered: Vec<Cipher>,
}

impl Initiator {
    /// Starts a handshake with the server whose key is pinned, offering
    /// `ciphers` for the transport, preferred first (empty: no payload,
    /// ChaCha20-Poly1305); returns the first message to send.
    pub fn start(
        local: &KeyPair,
        server: &PublicKey,
        ciphers: &[Cipher],
    ) -> Result<(Self, Vec<u8>), SecurityError> {
        let payload = if ciphers.is_empty() {
            Vec::new()
        } else {
            rmp_serde::to_vec_named(&Offer {
                ciphers: ciphers.iter().map(|c| c.name().to_string()).collect(),
            })
            .expect("an offer serialises")
        };
        let mut state = builder(local)
            .remote_public_key(&server.0)
            .build_initiator()
            .map_err(failed)?;
        let mut msg = vec![0u8; MAX_MESSAGE];
        let n = state.write_message(&payload, &mut msg).map_err(failed)?;
        msg.truncate(n);
        Ok((
            Initiator {
                state,
                offered: ciphers.to_vec(),
            },
            msg,
        ))
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
        // The server's choice must be one we offered: anything else is a
        // server we cannot talk to (never a silent downgrade: the payload
        // is inside the handshake, no one on the way can change it).
        let cipher = match rmp_serde::from_slice::<Chosen>(&payload)
            .ok()
            .and_then(|c| c.cipher)
        {
            None => Cipher::ChaChaPoly,
            Some(name) => match Cipher::from_name(&name) {
                Some(c) if c == Cipher::ChaChaPoly || self.offered.contains(&c) => c,
                _ => {
                    return Err(SecurityError::Handshake(format!(
                    "the server chose the transport cipher {name:?}, which this side did not offer"
                )))
                }
            },
        };
        Ok((Channel::from_handshake(self.state, true, cipher)?, payload))
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
    /// The transport cipher is chosen from the initiator's offer and
    /// `usable` (this side's, preferred first); `payload` makes message
    /// 2's payload, with [`answer_payload`] (which carries the choice).
    pub fn accept<T>(
        locals: &[KeyPair],
        first: &[u8],
        usable: &[Cipher],
        allowed: impl FnOnce(&PublicKey) -> Option<T>,
        payload: impl FnOnce(&T, Cipher) -> Vec<u8>,
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
        let cipher = choose(&theirs, usable);
        let payload = payload(&identity, cipher);
        if payload.len() > MAX_PAYLOAD {
            return Err(SecurityError::Handshake("payload too large".into()));
        }
        let mut answer = vec![0u8; MAX_MESSAGE];
        let n = state.write_message(&payload, &mut answer).map_err(failed)?;
        answer.truncate(n);
        Ok(Accepted {
            channel: Channel::from_handshake(state, false, cipher)?,
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

    /// A handshake offering `offered` to a server that can use `usable`:
    /// the ciphers each side ends up with, and both channels.
    fn talk(offered: &[Cipher], usable: &[Cipher]) -> (Channel, Channel) {
        let (server, worker) = (KeyPair::generate(), KeyPair::generate());
        let (init, first) = Initiator::start(&worker, &server.public, offered).unwrap();
        let acc = Responder::accept(
            std::slice::from_ref(&server),
            &first,
            usable,
            |k| (*k == worker.public).then_some("w1"),
            |_, cipher| answer_payload(&serde_json::json!({ "name": "w1" }), cipher),
        )
        .unwrap();
        assert_eq!(acc.identity, "w1");
        assert_eq!(acc.peer, worker.public);
        let (client, _) = init.finish(&acc.answer).unwrap();
        (client, acc.channel)
    }

    #[test]
    fn both_sides_authenticate_and_talk_with_the_cipher_both_can_use() {
        use Cipher::*;
        for (offered, usable, expected) in [
            (&[][..], &[AesGcm, ChaChaPoly][..], ChaChaPoly),
            (&[AesGcm, ChaChaPoly][..], &[AesGcm, ChaChaPoly][..], AesGcm),
            (&[AesGcm, ChaChaPoly][..], &[ChaChaPoly][..], ChaChaPoly),
            (&[ChaChaPoly][..], &[AesGcm, ChaChaPoly][..], ChaChaPoly),
            (
                &[ChaChaPoly, AesGcm][..],
                &[AesGcm, ChaChaPoly][..],
                ChaChaPoly,
            ),
        ] {
            let (mut client, mut server_side) = talk(offered, usable);
            assert_eq!(client.cipher(), expected, "{offered:?} to {usable:?}");
            assert_eq!(server_side.cipher(), expected);
            let sealed = client.seal(&frames(&[b"header", b"body"]));
            assert_eq!(
                server_side.open(sealed).unwrap(),
                frames(&[b"header", b"body"])
            );
            let back = server_side.seal(&frames(&[b"h", b"b", b"raw"]));
            assert_eq!(client.open(back).unwrap(), frames(&[b"h", b"b", b"raw"]));
        }
    }

    #[test]
    fn a_server_choosing_a_cipher_not_offered_is_refused() {
        let (server, worker) = (KeyPair::generate(), KeyPair::generate());
        let (init, first) =
            Initiator::start(&worker, &server.public, &[Cipher::ChaChaPoly]).unwrap();
        let acc = Responder::accept(
            std::slice::from_ref(&server),
            &first,
            &[Cipher::ChaChaPoly],
            |_| Some(()),
            |_, _| answer_payload(&serde_json::json!({}), Cipher::AesGcm),
        )
        .unwrap();
        let Err(e) = init.finish(&acc.answer) else {
            panic!("a cipher not offered was taken")
        };
        assert!(e.to_string().contains("did not offer"), "{e}");
    }

    #[test]
    fn an_unknown_key_is_refused_and_a_wrong_server_key_cannot_get_in() {
        let (server, worker) = (KeyPair::generate(), KeyPair::generate());
        let (_, first) = Initiator::start(&worker, &server.public, &[]).unwrap();
        let e = Responder::accept(
            std::slice::from_ref(&server),
            &first,
            &[],
            |_| None::<()>,
            |_, _| Vec::new(),
        )
        .err()
        .unwrap();
        assert!(matches!(e, SecurityError::UnknownKey(_)), "{e}");
        // Pinned a key that is not the server's: the server cannot read it.
        let impostor = KeyPair::generate();
        let (_, first) = Initiator::start(&worker, &impostor.public, &[]).unwrap();
        assert!(matches!(
            Responder::accept(
                std::slice::from_ref(&server),
                &first,
                &[],
                |_| Some(()),
                |_, _| Vec::new()
            ),
            Err(SecurityError::Handshake(_))
        ));
        // Garbage is a handshake error, not a panic.
        assert!(Responder::accept(
            std::slice::from_ref(&server),
            &[0u8; 7],
            &[],
            |_| Some(()),
            |_, _| Vec::new()
        )
        .is_err());
    }
}
