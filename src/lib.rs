//! ots — brokerless test distribution over ZeroMQ.
//!
//! # Layout, bottom-up
//!
//! Each layer imports only the layers above it in this list (a test,
//! `tests/architecture.rs`, fails on an import circle between files);
//! `docs/ARCHITECTURE.md` walks through it.
//!
//! **Leaves**, knowing nothing of ots:
//! - [`clock`]: wall-clock times (UTC) as people and records read them.
//! - [`text`]: control characters made visible, spans of time in words.
//! - [`jobs`]: named threads for slow work (file I/O, handshakes) off the
//!   event loops.
//! - [`logging`]: the binaries' log output; a throttle for noisy peers.
//! - [`shutdown`]: SIGTERM/SIGINT, and [`shutdown::Stop`], the one stop
//!   request a server or a worker is handed.
//! - [`supervision`]: systemd readiness, watchdog and status lines.
//! - [`fatal`]: the binaries' panic hook: a panic anywhere ends the
//!   process with its location logged, so systemd restarts it.
//! - [`durable`]: state-directory lock and SQLite opening, shared by the
//!   server's and the worker's durable state.
//!
//! **The wire**:
//! - [`protocol`]: headers, bodies, device specs, the limits and checks of
//!   every value, the frame codec. Pure data, no I/O; `docs/PROTOCOL.md`
//!   is its prose twin.
//! - [`settings`]: the layered configuration loader (file, `OTS_…`
//!   environment, flags) and durations in settings; each binary's own
//!   settings live beside their users.
//!
//! **Rules both ends share**:
//! - [`delivery`]: the outbox of mandatory messages, the dedup window,
//!   log-line accounting (I/O-free).
//! - [`security`]: Noise `IK` handshake, sealed messages, key files and
//!   allow-lists, the gate every connection passes.
//! - [`transport`]: thin helpers over the `zeromq` crate: binding,
//!   connecting with a fresh routing identity, sending with a deadline.
//!
//! **Features the server runs**:
//! - [`notify`]: webhooks and mail when testruns end or devices go bad:
//!   rules, an I/O-free outbox, the sender task.
//! - [`client`]: the request/response client library (requests, file
//!   transfer, following a testrun); also used by the worker to fetch
//!   input files.
//!
//! **The two daemons**:
//! - [`server`]: `ots-server` — its I/O-free core ([`server::scheduler`]),
//!   its store (SQLite, PostgreSQL, files), its shell (start, the serving
//!   loop, lease, reload, deliveries, the dashboard's bridge).
//! - [`web`]: the dashboard the server serves (pages, JSON, live views,
//!   sign-in); it reaches the scheduler only through the serving loop.
//! - [`worker`]: `ots-worker` — its I/O-free session, its shell, and what
//!   runs a task (conductor, console, result file reader).
//!
//! **Above both**:
//! - [`local`]: an embedded server plus local workers in one process, for
//!   `ots-submit run --local`.
//! - [`fleet`]: simulated workers on real sockets (load generator, scale
//!   tests).
//! - [`setup`]: `ots-server lab DIR`, keys and configurations for trying a
//!   secured lab by hand in one folder.
//! - [`docs`]: man pages and shell completions from the command lines.
//! - [`cli`]: `ots-submit`'s commands, rendering and progress.

pub mod cli;
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
