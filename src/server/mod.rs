//! `ots-server`: accepts testruns, queues tasks by routing key, hands them
//! to workers, collects logs, files and verdicts.
//!
//! - [`scheduler`]: the I/O-free state machine (registry, queues, verdicts).
//! - [`distribution`]: testrun → tasks.
//! - [`fairshare`]: who is next within a routing key (I/O-free).
//! - [`health`]: device health rules (I/O-free).
//! - [`verdict`]: JUnit parsing and verdict rules.
//! - [`store`]: task logs on disk.
//! - [`files`]: the file desk: result file writes, hashes and reads off the loop.
//! - [`db`], [`pg`], [`state`]: the durable state in SQLite or PostgreSQL
//!   (one schema, the same batches); [`lease`]: one leader among servers
//!   sharing a PostgreSQL database.
//! - [`service`]: the tokio shell binding the sockets and driving the scheduler.

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
