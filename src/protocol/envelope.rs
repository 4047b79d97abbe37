//! A decoded message and why frames were refused: what the codec gives
//! and the checks say, in a room of their own so that neither depends on
//! the other.

use crate::protocol::message::{Body, Header};
use crate::protocol::PROTOCOL_VERSION;
use bytes::Bytes;

/// A decoded message: header, body and the optional raw bulk frame.
#[derive(Clone, Debug, PartialEq)]
pub struct Envelope {
    pub header: Header,
    pub body: Body,
    pub raw: Option<Bytes>,
}

/// Why frames were refused. Each maps to an `error` reply code.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("message has {0} frames; expected header, body and optionally one raw frame")]
    FrameCount(usize),
    #[error("header frame is not a valid MessagePack header: {reason}")]
    BadHeader {
        reason: String,
        /// The body's request id, if the body could be read (§3.3).
        request: Option<u64>,
    },
    #[error(
        "protocol version {version} is not supported (this peer speaks version {PROTOCOL_VERSION})"
    )]
    UnsupportedVersion {
        version: u8,
        /// The body's request id, if the body could be read.
        request: Option<u64>,
    },
    #[error("body frame is not a valid message body: {reason}")]
    BadBody {
        reason: String,
        /// The request id, if the body was a map that carried one.
        request: Option<u64>,
        /// The header's seq if the message was mandatory.
        seq: Option<u64>,
    },
    #[error("{kind}.{field}: {reason}")]
    Invalid {
        kind: &'static str,
        field: &'static str,
        reason: String,
        /// The request id of a client request, echoed in the error reply.
        request: Option<u64>,
        /// The header's seq if the message was mandatory, echoed so the
        /// sender stops resending it.
        seq: Option<u64>,
    },
    #[error("{what} frame is {size} bytes, over the limit of {limit}")]
    TooLarge {
        what: &'static str,
        size: usize,
        limit: usize,
        /// The body's request id, when the header was the large frame.
        request: Option<u64>,
    },
    #[error("header says class {header:?} but a {kind} message travels in class {body:?}")]
    ClassMismatch {
        header: crate::protocol::Class,
        body: crate::protocol::Class,
        kind: &'static str,
        request: Option<u64>,
        seq: Option<u64>,
    },
    #[error("a {kind} message carries a raw frame it does not use")]
    UnexpectedRaw {
        kind: &'static str,
        request: Option<u64>,
        seq: Option<u64>,
    },
}

impl ProtocolError {
    /// The error code to put in the `error` reply.
    pub fn code(&self) -> crate::protocol::ErrorCode {
        use crate::protocol::ErrorCode;
        match self {
            ProtocolError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            ProtocolError::TooLarge { .. } => ErrorCode::TooLarge,
            ProtocolError::Invalid { .. } => ErrorCode::Invalid,
            _ => ErrorCode::Malformed,
        }
    }

    /// The request id to echo in the error reply, where one was readable.
    pub fn request(&self) -> Option<u64> {
        match self {
            ProtocolError::BadBody { request, .. }
            | ProtocolError::BadHeader { request, .. }
            | ProtocolError::Invalid { request, .. }
            | ProtocolError::UnsupportedVersion { request, .. }
            | ProtocolError::TooLarge { request, .. }
            | ProtocolError::ClassMismatch { request, .. }
            | ProtocolError::UnexpectedRaw { request, .. } => *request,
            _ => None,
        }
    }

    /// The seq of the refused mandatory message, where it was readable: the
    /// error reply carries it, and the sender drops the message from its
    /// outbox instead of resending it forever.
    pub fn seq(&self) -> Option<u64> {
        match self {
            ProtocolError::BadBody { seq, .. }
            | ProtocolError::Invalid { seq, .. }
            | ProtocolError::ClassMismatch { seq, .. }
            | ProtocolError::UnexpectedRaw { seq, .. } => *seq,
            _ => None,
        }
    }

    /// Counter name for this refusal.
    pub fn counter(&self) -> &'static str {
        match self {
            ProtocolError::UnsupportedVersion { .. } => "unsupported_version",
            ProtocolError::TooLarge { .. } => "too_large",
            ProtocolError::Invalid { .. } => "invalid_field",
            _ => "malformed",
        }
    }
}
