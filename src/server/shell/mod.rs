//! The server's tokio shell around its I/O-free core: it starts the
//! server, runs the serving loop, and moves messages, ticks and results
//! between the sockets, the helper threads and the scheduler.
//!
//! - [`service`]: start (lease, restore, bind) and the handle.
//! - `serving`: the serving loop: one event, one named handler, then the
//!   turn's commit and deliveries.
//! - `inbound`: the control socket's reader, connection activity, the
//!   handshake thread.
//! - `outlets`: where outputs go (sealed sends, signed broadcasts, the
//!   file desk, the notification sender, the history reader).
//! - `history`: the history reader (ended testruns, off the loop).
//! - `reload`: allow-lists re-read while the server runs.
//! - [`bridge`]: the dashboard's requests on the loop's side.
//! - [`standby`]: a standby's `not_leader` answers while it waits.
//! - [`metrics`]: the Prometheus endpoint.
//! - [`error`]: every way the server fails, typed.

pub mod bridge;
pub mod error;
mod history;
mod inbound;
pub mod metrics;
mod outlets;
mod reload;
pub mod service;
mod serving;
pub mod standby;
