//! ots — brokerless test distribution over ZeroMQ.
//!
//! # Layout
//!
//! - [`protocol`]: the wire protocol — headers, bodies, device specs and the
//!   frame codec. Pure data, no I/O. `docs/PROTOCOL.md` is its prose twin.
//! - [`delivery`]: the delivery rules both ends share, without I/O: the
//!   outbox of mandatory messages, the dedup window, log-line accounting.
//! - [`durable`]: state-directory lock and SQLite opening, shared by the
//!   server's and the worker's durable state.
//! - [`security`]: Noise `IK` handshake, sealed messages, key files and
//!   allow-lists (on by default: every connection is authenticated).
//! - [`transport`]: thin helpers over the `zeromq` crate: binding the server
//!   sockets, connecting a worker or client with a fresh routing identity,
//!   sending with a deadline.
//! - [`server`]: `ots-server`. [`server::scheduler`] is the I/O-free heart
//!   (testruns, tasks, queues, worker registry, verdicts) driven by messages
//!   and a clock; [`server::service`] is the tokio shell around it.
//! - [`worker`]: `ots-worker`. [`worker::session`] is the I/O-free session
//!   (registration, liveness, outbox of mandatory messages);
//!   [`worker::conductor`] runs the conductor command in its own process
//!   group; [`worker::service`] is the tokio shell.
//! - [`client`]: the request/response client behind `ots-submit`.
//! - [`fleet`]: simulated workers on real sockets (load generator, scale
//!   tests).
//! - [`local`]: an embedded server plus local workers in one process, for
//!   `ots-submit run --local`.
//! - [`config`]: layered configuration (file, `OTS_…` environment, flags).
//! - [`setup`]: `ots-server lab DIR`, keys and configurations for trying a
//!   secured lab by hand in one folder.
//! - [`logging`]: the binaries' log output.
//! - [`shutdown`]: SIGTERM/SIGINT for the binaries' orderly stop.
//! - [`jobs`]: named threads for slow work (file I/O, handshakes) off the
//!   event loops.
//! - [`supervision`]: systemd readiness, watchdog and status lines.
//! - [`fatal`]: the panic hook of the binaries: a panic anywhere ends the
//!   process with its location logged, so systemd restarts it.

pub mod client;
pub mod clock;
pub mod delivery;
pub mod docs;
pub mod durable;
pub mod fatal;
pub mod fleet;
pub mod jobs;
pub mod local;
pub mod logging;
pub mod notify;
pub mod protocol;
pub mod security;
pub mod server;
pub mod settings;
pub mod setup;
pub mod shutdown;
pub mod supervision;
pub mod text;
pub mod transport;
pub mod web;
pub mod worker;
