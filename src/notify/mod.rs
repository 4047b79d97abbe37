//! Notifications (issue 23, in progress): what is sent when a testrun
//! ends or a device goes bad, to webhooks (signed as Standard Webhooks
//! specifies) and mail, delivered at least once from an outbox.
//!
//! - [`signature`]: the `webhook-*` headers and their HMAC-SHA256.
//! - [`event`]: the events, their JSON, webhook ids, target filters.
//! - [`delivery`]: one delivery's retry state machine (I/O-free, clock
//!   passed in): which answers end it, when it is tried again.

pub mod delivery;
pub mod event;
pub mod signature;
