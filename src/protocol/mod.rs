//! The wire protocol: what travels between server, workers and clients.
//!
//! Pure data and its rules: nothing here imports anything above it
//! (`tests/architecture.rs` checks).
//!
//! - `message`: every header and body, classes, error codes; `testrun`:
//!   what a testrun and a task are; `status`: what the server reports;
//!   `device`: the device specifications used for routing.
//! - `limits`: the numbers (PROTOCOL.md §14); `fields`: one rule per kind
//!   of field; `check`: every message checked against them.
//! - `envelope`: a decoded message and [`ProtocolError`]; `codec`: frames
//!   ↔ messages; `logtext`: packed log text.
//!
//! `docs/PROTOCOL.md` is the normative description; keep both in step.

pub mod check;
mod check_results;
pub mod codec;
pub mod device;
pub mod envelope;
mod fields;
pub mod header;
mod kinds;
pub mod leasing;
pub mod limits;
pub mod logfind;
pub mod logtext;
pub mod message;
pub mod results;
pub mod status;
pub mod testrun;

pub use codec::{decode, encode, Envelope, ProtocolError};
pub use device::{DevicePin, DeviceProps, DeviceSpec, DeviceSpecError};
pub use leasing::{HoldSpec, LeaseAction, LeaseId, LeaseState, LeaseTerms, PowerAction};
pub use message::*;
pub use status::*;
pub use testrun::*;

/// Version carried in every header. A peer speaking another version gets an
/// `Error { code: UnsupportedVersion }` reply and is otherwise ignored.
pub const PROTOCOL_VERSION: u8 = 1;
