//! `ots-worker`: owns one device, takes one task at a time from the server,
//! runs the conductor, streams logs, uploads result files, reports.
//!
//! - [`session`]: the I/O-free session (registration, liveness, outbox,
//!   log buffer, the current task).
//! - [`channel`]: the task's response channel; `finish()` consumes it.
//! - [`conductor`]: argv templates and running the conductor in its own
//!   process group.
//! - [`reader`]: reads and hashes result files for their uploads, off the loop.
//! - [`service`]: the tokio shell (sockets, reconnects, tasks).

pub mod channel;
pub mod conductor;
pub mod config;
pub mod console;
pub mod reader;
pub mod service;
pub mod session;
pub mod state;

pub use service::{run, WorkerError};
