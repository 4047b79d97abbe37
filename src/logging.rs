//! Log output of the binaries: one line per event on stderr, filter from
//! `RUST_LOG` (e.g. `RUST_LOG=ots=debug`), or the binary's default.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `default` applies without `RUST_LOG`.
pub fn init(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .try_init();
}
