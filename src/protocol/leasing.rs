//! Leases: a person's hold on one device (PROTOCOL.md §17). A lease is a
//! testrun of one task whose spec says `lease`: it waits in the same
//! fair-share queue as every task, is dispatched to one worker like one,
//! and its log is the lease's transcript. What travels for it — the
//! terms, what lists show, console bytes, power — is here, with the
//! check of every field.

use crate::protocol::device::DeviceSpec;
use crate::protocol::envelope::ProtocolError;
use crate::protocol::fields::{check_id, check_text, invalid};
use crate::protocol::message::Body;
use crate::protocol::testrun::{Priority, RunId};
use serde::{Deserialize, Serialize};

/// A lease's id: `l12` (a testrun number; testruns are `r…`).
pub type LeaseId = RunId;

/// Longest `reason` of a lease, in bytes.
pub const MAX_LEASE_REASON_BYTES: usize = 200;
/// Most bytes of console input in one `console_input`.
pub const MAX_CONSOLE_INPUT_BYTES: usize = 4096;
/// Most bytes of console output in one `console_data`/`console_output`.
pub const MAX_CONSOLE_OUTPUT_BYTES: usize = 64 * 1024;
/// Longest lease a request may ask for (the server's per-role maximum is
/// usually far lower).
pub const MAX_LEASE_MS: u64 = 7 * 24 * 3600 * 1000;
/// Longest replay a `console_attach` may ask for.
pub const MAX_REPLAY_MS: u64 = 3600 * 1000;
/// Users a lease may be shared with.
pub const MAX_LEASE_SHARES: usize = 16;
/// Longest id of a console input stream.
pub const MAX_STREAM_ID_BYTES: usize = 64;

/// What a lease asks for and what became of it, kept in its testrun's
/// request (so it survives a restart with it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseTerms {
    /// How long it holds once granted (renew extends it).
    pub duration_ms: u64,
    #[serde(default)]
    pub reason: String,
    /// When it was granted and until when it holds (Unix ms, server clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub granted_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_ms: Option<u64>,
    /// Users who may watch its console (read only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shared: Vec<String>,
    /// Why it ended, once it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<String>,
}

/// What a worker is told about the lease it holds its device for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldSpec {
    pub lease: LeaseId,
    /// Who holds it (nil without security).
    #[serde(default)]
    pub holder: Option<String>,
    #[serde(default)]
    pub reason: String,
}

/// Where a lease stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseState {
    Waiting,
    Held,
    Ended,
}

impl std::fmt::Display for LeaseState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LeaseState::Waiting => "waiting",
            LeaseState::Held => "held",
            LeaseState::Ended => "ended",
        })
    }
}

/// A lease as `leases` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceLease {
    pub lease: LeaseId,
    pub state: LeaseState,
    #[serde(default)]
    pub holder: Option<String>,
    pub device: DeviceSpec,
    /// The worker that holds the device (held or ended after a grant).
    #[serde(default)]
    pub worker: Option<String>,
    pub reason: String,
    pub priority: Priority,
    /// Unix ms (server clock).
    pub requested_ms: u64,
    #[serde(default)]
    pub granted_ms: Option<u64>,
    #[serde(default)]
    pub until_ms: Option<u64>,
    #[serde(default)]
    pub ended_ms: Option<u64>,
    /// Why it ended.
    #[serde(default)]
    pub ended: Option<String>,
    /// Asked-for duration.
    pub duration_ms: u64,
    /// Milliseconds since the holder was last heard (held leases).
    #[serde(default)]
    pub idle_ms: Option<u64>,
    /// Its place in its queue (1: next), while waiting.
    #[serde(default)]
    pub position: Option<u64>,
    #[serde(default)]
    pub shared: Vec<String>,
    /// Consoles attached now.
    #[serde(default)]
    pub consoles: u32,
}

/// What `lease_act` does to a lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LeaseAction {
    /// Ends it (`force`: someone else's, operator or admin).
    Release,
    /// Holds it `duration_ms` from now, within the role's maximum.
    Renew,
    /// Only says the holder is still there (`lease_idle`).
    Keep,
    /// Lets `user` watch its console.
    Share,
    Unshare,
}

/// A power action on a leased device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PowerAction {
    On,
    Off,
    Cycle,
    Status,
}

impl std::fmt::Display for PowerAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PowerAction::On => "on",
            PowerAction::Off => "off",
            PowerAction::Cycle => "cycle",
            PowerAction::Status => "status",
        })
    }
}

/// Every lease message's fields against their limits.
pub(super) fn check(kind: &'static str, body: &Body, raw: Option<&[u8]>) -> Result<(), ProtocolError> {
    let raw_len = raw.map_or(0, <[u8]>::len);
    let lease = |l: &str| check_id(kind, "lease", l);
    match body {
        Body::Reserve {
            device,
            duration_ms,
            reason,
            ..
        } => {
            crate::protocol::fields::check_device(
                kind,
                &crate::protocol::DeviceProps {
                    devicegroup: device.devicegroup.clone(),
                    devicename: device.devicename.clone(),
                    deviceid: device.deviceid.clone(),
                },
            )?;
            if !(1000..=MAX_LEASE_MS).contains(duration_ms) {
                return Err(invalid(
                    kind,
                    "duration_ms",
                    format!("{duration_ms} is outside 1000–{MAX_LEASE_MS}"),
                ));
            }
            check_text(kind, "reason", reason, MAX_LEASE_REASON_BYTES)?;
        }
        Body::LeaseAct {
            lease: l,
            duration_ms,
            user,
            ..
        } => {
            lease(l)?;
            if let Some(d) = duration_ms {
                if !(1000..=MAX_LEASE_MS).contains(d) {
                    return Err(invalid(
                        kind,
                        "duration_ms",
                        format!("{d} is outside 1000–{MAX_LEASE_MS}"),
                    ));
                }
            }
            if let Some(u) = user {
                check_id(kind, "user", u)?;
            }
        }
        Body::ConsoleAttach {
            lease: l, since_ms, ..
        } => {
            lease(l)?;
            if *since_ms > MAX_REPLAY_MS {
                return Err(invalid(
                    kind,
                    "since_ms",
                    format!("{since_ms} is over the limit of {MAX_REPLAY_MS}"),
                ));
            }
        }
        Body::ConsoleDetach { lease: l, .. } | Body::Power { lease: l, .. } => lease(l)?,
        Body::ConsoleInput {
            lease: l, stream, ..
        } => {
            lease(l)?;
            check_id(kind, "stream", stream)?;
            if raw_len > MAX_CONSOLE_INPUT_BYTES {
                return Err(invalid(
                    kind,
                    "raw",
                    format!("{raw_len} bytes of input, over the limit of {MAX_CONSOLE_INPUT_BYTES}"),
                ));
            }
        }
        Body::LeaseInput { task, by, .. } => {
            check_id(kind, "task", task)?;
            check_text(kind, "by", by, MAX_LEASE_REASON_BYTES)?;
            if raw_len > MAX_CONSOLE_INPUT_BYTES {
                return Err(invalid(
                    kind,
                    "raw",
                    format!("{raw_len} bytes of input, over the limit of {MAX_CONSOLE_INPUT_BYTES}"),
                ));
            }
        }
        Body::PowerRequest { task, by, .. } => {
            check_id(kind, "task", task)?;
            check_text(kind, "by", by, MAX_LEASE_REASON_BYTES)?;
        }
        Body::PowerDone {
            task,
            state,
            message,
            ..
        } => {
            check_id(kind, "task", task)?;
            check_text(kind, "state", state, 16)?;
            check_text(kind, "message", message, crate::protocol::limits::MAX_TEXT_BYTES)?;
        }
        Body::ConsoleData { task, .. } => {
            check_id(kind, "task", task)?;
            if raw_len > MAX_CONSOLE_OUTPUT_BYTES {
                return Err(invalid(
                    kind,
                    "raw",
                    format!("{raw_len} bytes of output, over the limit of {MAX_CONSOLE_OUTPUT_BYTES}"),
                ));
            }
        }
        _ => {}
    }
    Ok(())
}
