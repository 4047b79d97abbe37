//! Delivery rules shared by both ends, free of I/O: the receiver's dedup
//! window for mandatory messages ([`dedup`]), the sender's outbox
//! ([`outbox`]), and the accounting of best-effort log lines by sequence
//! number ([`ranges`]).

pub mod dedup;
pub mod outbox;
pub mod ranges;

pub use dedup::DedupWindow;
pub use outbox::{Outbox, RetryPolicy};
pub use ranges::{ByteRanges, SeqRanges};

use serde::{Deserialize, Serialize};

/// What to do with the messages of one class (docs/PROTOCOL.md §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Mandatory: keep until acknowledged, resend with backoff, forever.
    Retry,
    /// Mandatory, but given up (counted and logged) after `give_up_after_ms`.
    GiveUp,
    /// Best-effort: sent once, never resent; losses are counted.
    GuaranteeNothing,
}

/// Delivery policy per message class, configurable per worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliveryPolicy {
    /// task accepted/refused, final report.
    pub control: Policy,
    /// result file uploads: `retry` offers again until stored, `give-up`
    /// stops after `give_up_after_ms`, `guarantee-nothing` takes one go
    /// (a file not delivered is named in the report, and judged ERROR).
    pub file: Policy,
    /// log line batches.
    pub log: Policy,
    /// The bound of the give-up policy.
    #[serde(deserialize_with = "crate::settings::duration::ms")]
    pub give_up_after_ms: u64,
}

impl Default for DeliveryPolicy {
    fn default() -> Self {
        DeliveryPolicy {
            control: Policy::Retry,
            file: Policy::Retry,
            log: Policy::GuaranteeNothing,
            give_up_after_ms: 600_000,
        }
    }
}

impl DeliveryPolicy {
    /// The policy for messages of `class` (heartbeats are never mandatory).
    pub fn for_class(&self, class: crate::protocol::Class) -> Policy {
        use crate::protocol::Class;
        match class {
            Class::Control => self.control,
            Class::File => self.file,
            Class::Log => self.log,
            Class::Heartbeat => Policy::GuaranteeNothing,
        }
    }
}

/// What a worker does with a running task when the server is lost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnServerLost {
    /// The task runs its course; its result is delivered when the server is back.
    #[default]
    Continue,
    /// The task is stopped (TERM, grace, KILL) and reported as aborted.
    Abort,
}
