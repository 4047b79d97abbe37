//! systemd supervision (`Type=notify`): READY once the daemon serves,
//! WATCHDOG pings from the real main loop (so a wedged loop stops pinging
//! and systemd restarts the process), and STATUS lines that say what the
//! daemon is doing. Without `NOTIFY_SOCKET` (not under systemd) every call
//! does nothing.

use std::time::{Duration, Instant};

/// Test hook: with `OTS_TEST_WEDGE_ON_SIGUSR1=1`, SIGUSR1 wedges the main
/// loop (it blocks forever), to prove the watchdog notices.
pub const WEDGE_HOOK: &str = "OTS_TEST_WEDGE_ON_SIGUSR1";

pub struct Supervisor {
    /// Ping interval: a quarter of `WatchdogSec`, if the watchdog is on.
    ping_every: Option<Duration>,
    last_ping: Option<Instant>,
    last_status: String,
    last_status_at: Option<Instant>,
    wedge: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl Default for Supervisor {
    fn default() -> Self {
        Self::new()
    }
}

impl Supervisor {
    pub fn new() -> Self {
        // As sd_watchdog_enabled(3): WATCHDOG_USEC, and WATCHDOG_PID, if
        // set, naming this process.
        let usec = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|u| *u > 0);
        let ours = std::env::var("WATCHDOG_PID")
            .ok()
            .is_none_or(|p| p.parse::<u32>().ok() == Some(std::process::id()));
        let ping_every = usec
            .filter(|_| ours)
            .map(|u| Duration::from_micros(u / 4).max(Duration::from_millis(10)));
        let wedge = (std::env::var(WEDGE_HOOK).as_deref() == Ok("1")).then(|| {
            let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let f = flag.clone();
            tokio::spawn(async move {
                use tokio::signal::unix::{signal, SignalKind};
                if let Ok(mut s) = signal(SignalKind::user_defined1()) {
                    s.recv().await;
                    f.store(true, std::sync::atomic::Ordering::SeqCst);
                }
            });
            flag
        });
        Supervisor {
            ping_every,
            last_ping: None,
            last_status: String::new(),
            last_status_at: None,
            wedge,
        }
    }

    /// The daemon serves: READY=1 with its first status.
    pub fn ready(&mut self, status: &str) {
        let _ = sd_notify::notify(
            false,
            &[
                sd_notify::NotifyState::Ready,
                sd_notify::NotifyState::Status(status),
            ],
        );
        self.last_status = status.to_string();
        self.last_status_at = Some(Instant::now());
    }

    /// From the main loop, often: pings the watchdog when due, and sends
    /// a changed status at most every 2 s (`status` is only built then).
    pub fn tick(&mut self, now: Instant, status: impl FnOnce() -> String) {
        if self
            .wedge
            .as_ref()
            .is_some_and(|w| w.load(std::sync::atomic::Ordering::SeqCst))
        {
            tracing::warn!("test hook: wedging the main loop");
            loop {
                std::thread::park();
            }
        }
        if let Some(every) = self.ping_every {
            if self
                .last_ping
                .is_none_or(|t| now.saturating_duration_since(t) >= every)
            {
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                self.last_ping = Some(now);
            }
        }
        if self
            .last_status_at
            .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(2))
        {
            let s = status();
            if s != self.last_status {
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Status(&s)]);
                self.last_status = s;
            }
            self.last_status_at = Some(now);
        }
    }

    /// The daemon is stopping (STOPPING=1).
    pub fn stopping(&self, status: &str) {
        let _ = sd_notify::notify(
            false,
            &[
                sd_notify::NotifyState::Stopping,
                sd_notify::NotifyState::Status(status),
            ],
        );
    }
}
