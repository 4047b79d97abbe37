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
