//! What the session asks of the shell ([`Action`]), why a link was lost
//! ([`LostReason`]), and whether a message may go now ([`SendOrder`]).

use super::uploads::ReadRequest;
use crate::protocol::*;
use bytes::Bytes;

/// Why the worker gave up on its connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LostReason {
    /// No heartbeat or other message for `liveness` intervals.
    Silent { silent_ms: u64 },
    /// Heartbeats now come from another server incarnation.
    ServerRestarted { old: String, new: String },
    /// The server announced an orderly shutdown.
    ServerShutdown,
    /// The socket refused a send.
    SendFailed(String),
    /// A socket reported its connection closed.
    ConnectionClosed(String),
    /// No welcome within the liveness window after the first hello.
    RegistrationTimeout { waited_ms: u64 },
    /// The server is a standby (`not_leader`): the next one may lead.
    NotLeader(String),
}

impl std::fmt::Display for LostReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LostReason::Silent { silent_ms } => {
                write!(f, "server unreachable: nothing heard for {silent_ms} ms")
            }
            LostReason::ServerRestarted { old, new } => {
                write!(f, "server restarted (incarnation {old} → {new})")
            }
            LostReason::ServerShutdown => write!(f, "server shut down"),
            LostReason::SendFailed(e) => write!(f, "server unreachable: send failed: {e}"),
            LostReason::ConnectionClosed(e) => {
                write!(f, "server unreachable: connection closed: {e}")
            }
            LostReason::NotLeader(said) => write!(f, "not the leader: {said}"),
            LostReason::RegistrationTimeout { waited_ms } => {
                write!(f, "server unreachable: no welcome {waited_ms} ms after the first hello (heartbeats arrive, the control connection does not answer)")
            }
        }
    }
}

/// What the shell must do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    Send {
        header: Header,
        body: Body,
        raw: Option<Bytes>,
    },
    /// Drop both sockets and connect anew (with backoff).
    Reconnect(LostReason),
    /// Start the conductor for this task.
    StartTask(TaskSpec),
    /// The server's log of this task is full: its runner stops handing
    /// over lines (it only counts them, so the numbering stays exact).
    LogFull(TaskId),
    /// Stop the conductor of this task (TERM, grace, KILL).
    StopTask(TaskId),
    /// Hand a server's command to the lease's hold running this task.
    Hold {
        task: TaskId,
        command: Box<crate::worker::task::channel::HoldCommand>,
    },
    /// The server refused this worker for good (its name is in use by
    /// another live worker): stop the worker with this message.
    Refused(ErrorCode, String),
    /// Read (and hash) part of a result file for its upload.
    ReadChunk(ReadRequest),
    /// The task's report was acknowledged (or the server closed the
    /// task): its folder may go.
    TaskDone { task: TaskId, attempt: u32 },
}

/// Whether a message the shell is about to send may go now, given log
/// batches the socket would not take earlier in the same turn: lines keep
/// their order, and a task's final report never overtakes its lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendOrder {
    Now,
    /// A log batch behind held-back ones: held back too, in order.
    HoldBack,
    /// A final report behind held-back lines: taken back (it goes again
    /// from the outbox, after them).
    Withdraw,
}
