//! Leases: a person's hold on one device (PROTOCOL.md §18). A lease is a
//! testrun of one task whose spec says `lease`: it waits in the same
//! fair-share queue as every task, is dispatched to one worker like one,
//! and its log is the lease's transcript. What travels for it — the
//! terms, what lists show, console bytes, power — is here, with
//! the limits (`check.rs` checks every field against them).

use serde::{Deserialize, Serialize};

/// A lease's id: `l12` (a testrun number; testruns are `r…`).
pub type LeaseId = String;

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
