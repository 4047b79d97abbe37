//! `ots-worker`: owns one device, takes one task at a time from the server,
//! runs the conductor, streams logs, uploads result files, reports.
//!
//! The core, without I/O:
//! - [`session`]: registration, liveness, the outbox of mandatory
//!   messages, the log buffer, the current task, uploads, the stop — each
//!   with its deadlines, driven by the time the shell hands in.
//! - [`state`]: the session saved in SQLite, so a restart loses nothing.
//! - [`config`]: the settings (`conf/worker.toml`, an instance file, flags).
//!
//! The shell (`shell/`): start-up ([`shell::service`]), the loop (a table
//! of events, carrying out the session's actions), the link to the
//! servers (connecting, readers, failover), [`WorkerError`].
//!
//! What runs a task (`task/`): the attempt's runner ([`task`]: folders,
//! recovery, inputs, the console's actions, the conductor, results),
//! [`task::conductor`] (argv templates, the conductor in its own process
//! group), [`task::channel`] (the task's response channel; `finish()`
//! consumes it), [`task::reader`] (result files read and hashed for their
//! uploads, off the loop), [`task::console`] (the device's serial console,
//! recorded from power-on).

pub mod config;
pub mod session;
pub mod shell;
pub mod state;
pub mod task;

// The paths the binaries, tests and benches have always used.
pub use shell::error::WorkerError;
pub use shell::service;
pub use shell::service::run;
pub use task::{channel, conductor, console, reader};
