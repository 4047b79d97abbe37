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
//! The store (`store/`): every write the core asks for, off its state:
//! - [`store`]: the [`store::Store`] port (task logs, the audit log) and
//!   its disk implementation; [`store::files`]: the file desk (result
//!   file writes, hashes and reads off the loop).
//! - [`store::db`], [`store::pg`], [`store::state`]: the durable state in
//!   SQLite or PostgreSQL (one schema, the same batches).
//!
//! The shell (`shell/`), around the core:
//! - [`config`]: the settings, turned into each component's own.
//! - [`shell::service`]: start (lease, restore, bind) and the
//!   [`ServerHandle`]; `shell::serving`: the serving loop, a table of
//!   events; `shell::inbound`: the socket reader, connection activity,
//!   the handshake thread; `shell::outlets`: where outputs go;
//!   `shell::reload`: allow-lists that change; [`shell::bridge`]: the
//!   dashboard's requests on the loop's side; [`shell::standby`]: a
//!   standby's `not_leader` answers; [`shell::metrics`]: the Prometheus
//!   page; `shell::error`: [`ServerError`] and [`Fatal`].

pub mod cases;
pub mod config;
pub mod distribution;
pub mod estimate;
pub mod fairshare;
pub mod health;
pub mod lease;
pub mod leasing;
pub mod results;
pub mod scheduler;
pub mod shell;
pub mod store;
pub mod usage;
pub mod verdict;

// The paths the binaries, tests and benches have always used.
pub use shell::error::{Fatal, ServerError};
pub use shell::service::{Server, ServerHandle};
pub use shell::{metrics, service, standby};
pub use store::{db, files, pg, state};
