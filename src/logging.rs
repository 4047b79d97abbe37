//! Log output of the binaries. On a terminal or in a file: one line per
//! event on stderr (colours only on a terminal). Under systemd (stderr
//! connected to the journal, `JOURNAL_STREAM` set): straight to journald,
//! with the event's level as its priority and each field as a journal
//! field (`TASK=`, `WORKER=`…), no timestamp of our own. The level comes
//! from `RUST_LOG` (e.g. `RUST_LOG=ots=debug`), else the configuration's
//! `log_level`, else the binary's default.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `default` applies without `RUST_LOG`.
pub fn init(default: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(default))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        if let Ok(journald) = tracing_journald::layer() {
            let _ = tracing_subscriber::registry()
                .with(filter)
                .with(journald.with_syslog_identifier(binary_name()))
                .try_init();
            return;
        }
        // No journal socket after all: plain lines, journald stamps them.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default)),
            )
            .with_writer(|| Stderr)
            .log_internal_errors(false)
            .with_ansi(false)
            .with_target(false)
            .without_time()
            .try_init();
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| Stderr)
        .log_internal_errors(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

/// Log lines that could not be written (a closed terminal: EIO; a broken
/// pipe: EPIPE; a full disk), since the last [`take_write_failures`].
static WRITE_FAILURES: AtomicU64 = AtomicU64::new(0);

/// Log lines lost to failed writes since the last call (the server
/// reports them as `log_writes_failed`).
pub fn take_write_failures() -> u64 {
    WRITE_FAILURES.swap(0, Ordering::Relaxed)
}

/// Standard error for log lines: a failed write is counted and dropped,
/// never an error, never a panic. A process never dies of its own output:
/// the terminal it was started from may close, journald may restart.
struct Stderr;

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if std::io::stderr().write_all(buf).is_err() {
            WRITE_FAILURES.fetch_add(1, Ordering::Relaxed);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

fn binary_name() -> String {
    std::env::args()
        .next()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "ots".into())
}

/// Limits how many log lines a kind of peer-triggered event (a refused
/// message, an orphan) writes: `burst` lines per `window`, then one summary
/// line per window with how many were not logged. Counters still count
/// every event; a hostile peer cannot flood the journal or the disk.
#[derive(Clone, Debug)]
pub struct Throttle {
    window: std::time::Duration,
    burst: u32,
    started: Option<std::time::Instant>,
    logged: u32,
    suppressed: u64,
}

impl Throttle {
    pub fn new(window: std::time::Duration, burst: u32) -> Self {
        Throttle {
            window,
            burst,
            started: None,
            logged: 0,
            suppressed: 0,
        }
    }

    /// True if an event at `now` may be logged. When a new window starts
    /// after suppressed events, logs how many were suppressed.
    pub fn allow(&mut self, now: std::time::Instant, what: &'static str) -> bool {
        let fresh = self
            .started
            .is_none_or(|s| now.saturating_duration_since(s) >= self.window);
        if fresh {
            if self.suppressed > 0 {
                tracing::warn!(
                    suppressed = self.suppressed,
                    window_ms = self.window.as_millis() as u64,
                    "{what}: {} more not logged (see the counters)",
                    self.suppressed
                );
            }
            self.started = Some(now);
            self.logged = 0;
            self.suppressed = 0;
        }
        if self.logged < self.burst {
            self.logged += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_burst_is_logged_then_counted_until_the_next_window() {
        let mut t = Throttle::new(Duration::from_secs(10), 3);
        let t0 = Instant::now();
        let allowed = (0..100).filter(|_| t.allow(t0, "x")).count();
        assert_eq!(allowed, 3);
        assert_eq!(t.suppressed, 97);
        assert!(t.allow(t0 + Duration::from_secs(10), "x"));
        assert_eq!(t.suppressed, 0);
    }
}
