//! The worker's tokio shell around its session.
//!
//! - [`service`]: start-up (settings checked, state opened, the console
//!   started) and [`service::run`].
//! - `serving`: the loop, one event per turn, each a named handler; the
//!   session's actions carried out.
//! - `link`: connecting to the servers that may lead, the readers of each
//!   connection, opening what arrives; the `Dialer` and its schedule.
//! - [`error`]: every way the worker fails, typed.

pub mod error;
mod link;
pub mod service;
mod serving;
