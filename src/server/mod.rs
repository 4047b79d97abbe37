//! `ots-server`: accepts testruns, queues tasks by routing key, hands them
//! to workers, collects logs, files and verdicts.
//!
//! The I/O-free core, and its rules:
//! - [`scheduler`]: the state machine (registry, queues, uploads,
//!   verdicts, notifications), driven by messages and a clock.
//! - [`distribution`]: testrun → tasks. [`fairshare`]: who is next within
//!   a routing key. [`health`]: device health rules. [`verdict`]: JUnit
//!   parsing and verdict rules. [`lease`]: one leader among servers
//!   sharing a PostgreSQL database (the tenure, without I/O).
//!
//! The store:
//! - [`store`]: task logs and the audit log on disk; [`files`]: the file
//!   desk (result file writes, hashes and reads off the loop).
//! - [`db`], [`pg`], [`state`]: the durable state in SQLite or PostgreSQL
//!   (one schema, the same batches).
//!
//! The shell:
//! - [`config`]: the settings, turned into each component's own.
//! - [`service`]: start (lease, restore, bind) and the [`ServerHandle`].
//! - `serving`: the serving loop, a table of events; `inbound`: the
//!   socket reader, connection activity, the handshake thread;
//!   `outlets`: where outputs go; `reload`: allow-lists that change.
//! - [`bridge`]: the dashboard's requests on the loop's side.
//! - [`standby`]: a standby's `not_leader` answers; [`metrics`]: the
//!   Prometheus page.
//! - `error`: [`ServerError`] and [`Fatal`].

pub mod bridge;
pub mod config;
pub mod db;
pub mod distribution;
mod error;
pub mod fairshare;
pub mod files;
pub mod health;
mod inbound;
pub mod lease;
pub mod metrics;
mod outlets;
pub mod pg;
mod reload;
pub mod scheduler;
pub mod service;
mod serving;
pub mod standby;
pub mod state;
pub mod store;
pub mod verdict;

pub use error::{Fatal, ServerError};
pub use service::{Server, ServerHandle};
