//! Delivery rules shared by both ends, free of I/O: the receiver's dedup
//! window for mandatory messages, the sender's outbox, and the accounting of
//! best-effort log lines by sequence number.

pub mod dedup;
pub mod outbox;
pub mod ranges;

pub use dedup::DedupWindow;
pub use outbox::{Outbox, RetryPolicy};
pub use ranges::SeqRanges;
