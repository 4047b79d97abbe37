//! The first frame of every message and the codes a reply carries:
//! delivery classes, the header, error codes, a worker's refusal reasons
//! (wire data; `message` has the bodies).

use crate::protocol::testrun::TaskId;
use serde::{Deserialize, Serialize};

/// Delivery class. The class decides the delivery rule (docs/PROTOCOL.md §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    /// Task lifecycle, registration, requests and replies. Mandatory when it
    /// changes state on the receiver.
    Control,
    /// Log lines: best-effort, never retried, every line numbered.
    Log,
    /// Result file chunks: mandatory, idempotent by offset.
    File,
    /// Liveness only; never mandatory.
    Heartbeat,
}

/// First frame of every message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Protocol version; see [`crate::protocol::PROTOCOL_VERSION`].
    pub v: u8,
    pub class: Class,
    /// The sender keeps the message until the receiver answers `ack` with
    /// this `seq`; the receiver applies it at most once per (session, seq).
    pub mandatory: bool,
    /// Per-session sequence number; strictly increasing for mandatory
    /// messages of one sender session, informational otherwise.
    pub seq: u64,
    /// The task this message belongs to, where there is one.
    #[serde(default)]
    pub task: Option<TaskId>,
    /// A server with its state in PostgreSQL: the epoch of the lease it
    /// leads under (PROTOCOL.md §13.1), on everything it sends. A
    /// worker ignores `welcome`, `dispatch` and `cancel` from an epoch
    /// older than one it has seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
}

impl Header {
    /// The header of a message sent without the mandatory flag (never
    /// acknowledged, never resent): `seq` 0.
    pub fn best_effort(class: Class, task: Option<&TaskId>) -> Header {
        Header {
            v: crate::protocol::PROTOCOL_VERSION,
            class,
            mandatory: false,
            seq: 0,
            task: task.cloned(),
            epoch: None,
        }
    }
}

/// Error codes of `error` replies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frames could not be decoded.
    Malformed,
    /// The header's version is not one this peer speaks.
    UnsupportedVersion,
    /// The message is too large for its class.
    TooLarge,
    /// The sender must register (hello) first.
    NotRegistered,
    /// The request names a testrun the server does not know.
    UnknownRun,
    /// The request names a task the server does not know.
    UnknownTask,
    /// No known worker could ever run the testrun.
    NoMatchingWorker,
    /// The request is well-formed but invalid (empty package list…).
    BadRequest,
    /// A result file name is absolute or climbs out of the results folder.
    BadFileName,
    /// A field is outside its documented limit (docs/PROTOCOL.md §14); the
    /// message names the field and the limit.
    Invalid,
    /// A `hello` names a worker that is registered and alive under another
    /// session: two workers with one name. The refused worker exits.
    NameInUse,
    /// A server-wide bound was reached (queued tasks, log size, file size);
    /// retry later or ask the operator to raise it.
    LimitReached,
    /// The server could not store what was sent (disk full, I/O error); the
    /// mandatory message is answered and not applied.
    StorageFailed,
    /// The peer did not authenticate (no handshake, unknown key, failed
    /// handshake): PROTOCOL.md §15.
    Unauthenticated,
    /// The authenticated identity may not do this (its role, or another
    /// worker's name); the message names the identity and the rule.
    Forbidden,
    /// A result or input file did not arrive intact (its SHA-256 differs
    /// from the sender's, twice) or changed on disk while it was sent.
    Damaged,
    /// This server is a standby (PostgreSQL, §13.1): it serves nothing
    /// until it holds the lease. The message names the leader it knows;
    /// the peer goes on to the next server of its list.
    NotLeader,
}

/// Why a worker refused a dispatch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefuseReason {
    /// The dispatch's ttl had passed when it arrived.
    Expired,
    /// The worker already runs a task.
    Busy,
}
