//! `ots-worker`: owns one device, takes one task at a time from the server,
//! runs the conductor, streams logs, uploads result files, reports.
//!
//! - [`config`]: the settings (`conf/worker.toml`, an instance file, flags).
//! - [`session`]: the I/O-free session (registration, liveness, outbox,
//!   log buffer, the current task, uploads).
//! - [`state`]: the session saved in SQLite, so a restart loses nothing.
//! - [`service`]: the tokio shell (sockets, reconnects, tasks).
//! - What runs a task: [`conductor`] (argv templates, the conductor in its
//!   own process group), [`channel`] (the task's response channel;
//!   `finish()` consumes it), [`reader`] (result files read and hashed for
//!   their uploads, off the loop), [`console`] (the device's serial
//!   console, recorded from power-on).

pub mod channel;
pub mod conductor;
pub mod config;
pub mod console;
mod error;
mod link;
pub mod reader;
pub mod service;
mod serving;
pub mod session;
pub mod state;
mod task;

pub use service::{run, WorkerError};
