//! Authentication and encryption above ZMTP (the `zeromq` crate offers
//! neither CURVE nor PLAIN): a Noise `IK` handshake per connection and
//! sealed messages after it. I/O-free, like the protocol layer below it:
//! bytes in, bytes out; the shells carry them.
//!
//! - [`keys`]: X25519 key pairs and their files (`NAME.key` readable by the
//!   owner only, `NAME.pub`), as `keygen` writes them and the services
//!   load them.
//! - [`handshake`]: the two-message Noise handshake between an initiator
//!   (worker or client) that pins the server's public key and the server,
//!   which looks the initiator's static key up in its allow-list.
//! - [`channel`]: what both ends hold after the handshake: every frame of a
//!   message is sealed with ChaCha20-Poly1305 under the connection's keys,
//!   with the message number explicit in the first frame; a replayed or
//!   reordered message is refused.
//! - [`broadcast`]: heartbeats and shutdown on the events port, signed
//!   with a key made at each server start whose public half only
//!   authenticated peers receive (in the sealed welcome); beats numbered
//!   so a replayed or held-back copy is refused.
//! - [`allow`]: the allow-lists (`workers.d`, `users.d`), their roles and
//!   pins, read and re-read with file-level fail-closed checks.
//! - [`gate`]: the server's I/O-free gate every connection passes
//!   (handshakes admitted at a bounded cost, messages opened, sessions
//!   revoked); the shell acts on its `Verdict`.
//! - [`link`]: the initiator's side over a socket: the handshake with a
//!   deadline, the cipher negotiated.
//! - [`SecurityMode`]: `noise` or `none`, as both binaries are configured.

pub mod allow;
pub mod broadcast;
pub mod channel;
pub mod gate;
pub mod handshake;
pub mod keys;
pub mod link;

pub use allow::{AllowList, Identity, Role};
pub use channel::Channel;
pub use gate::Gate;
pub use handshake::{Initiator, Responder};
pub use keys::{KeyPair, PublicKey};
pub use link::Credentials;

/// Whether peers authenticate and frames are encrypted (PROTOCOL.md §15).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum SecurityMode {
    #[default]
    Noise,
    None,
}

/// The Noise protocol name: `IK` because the initiator knows the server's
/// static key in advance (pinned in its configuration) and sends its own
/// static key encrypted in the first message, so the handshake takes one
/// round trip and authenticates both sides; X25519, ChaCha20-Poly1305 and
/// BLAKE2s as Noise names them.
pub const NOISE_PARAMS: &str = "Noise_IK_25519_ChaChaPoly_BLAKE2s";

/// Why a key, a handshake or a sealed message was refused.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecurityError {
    #[error("key file {path}: {reason}")]
    KeyFile { path: String, reason: String },
    #[error("private key file {path} has mode {mode:o}: readable or writable by others; run `chmod 600 {path}`")]
    KeyTooOpen { path: String, mode: u32 },
    #[error("handshake failed: {0}")]
    Handshake(String),
    #[error("key {0} is not allowed on this server: it is in none of its allow-lists (workers_dir, users_dir); the server's operator must add it there as NAME.pub")]
    UnknownKey(String),
    #[error("message number {counter} is not above the last accepted {last} (replayed or reordered); refused")]
    Replay { counter: u64, last: u64 },
    #[error("a sealed message does not authenticate (tampered, or sealed for another connection)")]
    Decrypt,
    #[error("sealed message malformed: {0}")]
    Malformed(&'static str),
    #[error("the server is busy with {0} handshakes; retry after a backoff")]
    Busy(usize),
    #[error("{path} cannot be trusted: {reason}; anyone who can write there could make itself admin or impersonate a worker; run `{fix}`")]
    Untrusted {
        path: String,
        reason: String,
        fix: String,
    },
}
