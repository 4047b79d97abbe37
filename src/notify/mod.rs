//! Notifications: what is sent when a testrun ends or a device goes bad,
//! to webhooks (signed as Standard Webhooks specifies) and mail,
//! delivered at least once from an outbox kept in the state database.
//!
//! - [`event`]: the events, their JSON (a stable schema), webhook ids,
//!   target filters.
//! - [`outbox`]: the outbox (I/O-free, owned by the scheduler): which
//!   deliveries an event makes, when each is tried, what a result does.
//! - [`delivery`]: one delivery's retry state machine.
//! - [`urls`]: which per-run URLs are allowed (no SSRF).
//! - [`signature`]: the `webhook-*` headers and their HMAC-SHA256.
//! - [`config`]: `[notify]` of `server.toml`, checked.
//! - [`sender`]: the tokio task that makes the attempts (HTTP, SMTP,
//!   sendmail), off the serving loop.
//! - [`mail`]: what a mail says.

pub mod config;
pub mod delivery;
pub mod event;
pub mod mail;
pub mod outbox;
pub mod sender;
pub mod signature;
pub mod urls;
