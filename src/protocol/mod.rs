//! The wire protocol: what travels between server, workers and clients.
//!
//! `message` defines every header and body; `device` the device
//! specifications used for routing; `codec` turns them into ZeroMQ frames and
//! back, refusing anything malformed with a typed [`ProtocolError`].
//! `docs/PROTOCOL.md` is the normative description; keep both in step.

pub mod check;
pub mod codec;
pub mod device;
pub mod envelope;
mod fields;
pub mod limits;
pub mod logtext;
pub mod message;
pub mod status;
pub mod testrun;

pub use codec::{decode, encode, Envelope, ProtocolError};
pub use device::{DevicePin, DeviceProps, DeviceSpec, DeviceSpecError};
pub use message::*;
pub use status::*;
pub use testrun::*;

/// Version carried in every header. A peer speaking another version gets an
/// `Error { code: UnsupportedVersion }` reply and is otherwise ignored.
pub const PROTOCOL_VERSION: u8 = 1;
