//! Leases of devices to people, without I/O: when a lease ends by itself
//! and what a holder may ask for. The scheduler keeps one [`Hold`] per
//! lease that is waiting or held and asks it, with the time passed in,
//! whether it is over; everything a lease does to the queue, the worker
//! and its consoles happens in `scheduler/leases.rs`.
//!
//! A lease ends at the first of: its `until` (granted + duration, moved
//! by renew), its holder unheard for `idle` since the grant (every lease
//! request, an attached console and `reserve --keep` count as heard), an
//! explicit release. A waiting lease does not lapse. So a crashed CI job or a closed laptop frees the board after
//! `idle` at most, and nobody holds one longer than their role's maximum
//! without asking again.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// `[leases]` of `server.toml`, as the scheduler uses it.
#[derive(Clone, Debug, PartialEq)]
pub struct LeaseRules {
    /// A lease whose holder was not heard for this long ends.
    pub idle: Duration,
    /// Longest lease per role (`submit`, `operator`, `admin`); a role
    /// missing here gets `default_max`.
    pub max: BTreeMap<String, Duration>,
    pub default_max: Duration,
    /// Leases one user may hold at once, and have waiting.
    pub held_per_user: usize,
    pub waiting_per_user: usize,
    /// Leases waiting or held on the server at once.
    pub max_leases: usize,
    /// Consoles attached to one lease (the holder's and viewers').
    pub consoles_per_lease: usize,
    /// Consoles one user may have attached in all.
    pub consoles_per_user: usize,
    /// Console input accepted per lease per second, in bytes.
    pub input_bytes_per_sec: u64,
    /// Console output kept per lease for a late attach's replay (in all
    /// at most `max_leases` times this).
    pub replay_bytes: usize,
}

impl Default for LeaseRules {
    fn default() -> Self {
        LeaseRules {
            idle: Duration::from_secs(600),
            max: [
                ("submit".to_string(), Duration::from_secs(4 * 3600)),
                ("operator".to_string(), Duration::from_secs(24 * 3600)),
                ("admin".to_string(), Duration::from_secs(7 * 24 * 3600)),
            ]
            .into(),
            default_max: Duration::from_secs(4 * 3600),
            held_per_user: 2,
            waiting_per_user: 4,
            max_leases: 256,
            consoles_per_lease: 8,
            consoles_per_user: 16,
            input_bytes_per_sec: 64 * 1024,
            replay_bytes: 256 << 10,
        }
    }
}

impl LeaseRules {
    /// The longest lease `role` may hold (no role: without security).
    pub fn max_for(&self, role: Option<&str>) -> Duration {
        match role {
            Some(r) => self.max.get(r).copied().unwrap_or(self.default_max),
            None => self.max.values().copied().max().unwrap_or(self.default_max),
        }
    }
}

/// Why a lease ended by itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lapse {
    /// Its time was up.
    Expired,
    /// Its holder was not heard for `idle`.
    Idle,
}

/// The clock side of one live lease.
#[derive(Clone, Debug, PartialEq)]
pub struct Hold {
    /// When its holder was last heard.
    pub heard: Instant,
    /// Granted: until when it holds.
    pub until: Option<Instant>,
}

impl Hold {
    pub fn new(now: Instant) -> Hold {
        Hold {
            heard: now,
            until: None,
        }
    }

    /// The holder said something (or keeps a console open).
    pub fn heard(&mut self, now: Instant) {
        self.heard = self.heard.max(now);
    }

    /// Granted now for `duration`.
    pub fn grant(&mut self, now: Instant, duration: Duration) {
        self.until = Some(now + duration);
        self.heard(now);
    }

    /// Whether it is over at `now`: expiry first (it is the firmer word).
    /// A lease still waiting does not lapse (its holder need not stay at
    /// the keyboard while CI runs; the queue's timeout bounds the wait):
    /// idleness counts from the grant.
    pub fn lapse(&self, now: Instant, idle: Duration) -> Option<Lapse> {
        let until = self.until?;
        if now >= until {
            return Some(Lapse::Expired);
        }
        if now.saturating_duration_since(self.heard) >= idle {
            return Some(Lapse::Idle);
        }
        None
    }

    /// When [`Self::lapse`] next may say yes.
    pub fn next_due(&self, idle: Duration) -> Instant {
        let idle_at = self.heard + idle;
        self.until.map_or(idle_at, |u| u.min(idle_at))
    }
}

/// A token bucket for console input: `rate` bytes a second, at most one
/// second's worth saved up.
#[derive(Clone, Debug)]
pub struct InputBudget {
    tokens: u64,
    at: Instant,
}

impl InputBudget {
    pub fn new(now: Instant, rate: u64) -> InputBudget {
        InputBudget {
            tokens: rate,
            at: now,
        }
    }

    /// Takes `n` bytes if the budget has them.
    pub fn take(&mut self, now: Instant, rate: u64, n: u64) -> bool {
        let elapsed = now.saturating_duration_since(self.at);
        let earned =
            (elapsed.as_micros().min(u128::from(u64::MAX)) as u64).saturating_mul(rate) / 1_000_000;
        if earned > 0 {
            self.tokens = self.tokens.saturating_add(earned).min(rate.max(1));
            self.at = now;
        }
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_lapses_at_its_end_or_when_its_holder_is_gone() {
        let t0 = Instant::now();
        let idle = Duration::from_secs(600);
        let mut h = Hold::new(t0);
        // Waiting: no lapse, however long its holder is away.
        assert_eq!(h.lapse(t0 + idle * 10, idle), None);
        h.grant(t0 + Duration::from_secs(100), Duration::from_secs(3600));
        assert_eq!(
            h.lapse(t0 + Duration::from_secs(100) + idle, idle),
            Some(Lapse::Idle)
        );
        assert_eq!(h.next_due(idle), t0 + Duration::from_secs(700));
        // Heard every few minutes: only the end stops it.
        for m in (5..=60).step_by(5) {
            let now = t0 + Duration::from_secs(100 + m * 60);
            if now < t0 + Duration::from_secs(3700) {
                assert_eq!(h.lapse(now, idle), None, "at minute {m}");
            }
            h.heard(now);
        }
        assert_eq!(
            h.lapse(t0 + Duration::from_secs(3700), idle),
            Some(Lapse::Expired)
        );
        // Being heard never moves time backwards.
        let before = h.heard;
        h.heard(t0);
        assert_eq!(h.heard, before);
    }

    #[test]
    fn input_is_held_to_its_rate() {
        let t0 = Instant::now();
        let mut b = InputBudget::new(t0, 1000);
        assert!(b.take(t0, 1000, 1000));
        assert!(!b.take(t0, 1000, 1));
        assert!(b.take(t0 + Duration::from_millis(500), 1000, 500));
        assert!(!b.take(t0 + Duration::from_millis(500), 1000, 1));
        // Idle time saves up one second at most.
        assert!(!b.take(t0 + Duration::from_secs(100), 1000, 1001));
        assert!(b.take(t0 + Duration::from_secs(100), 1000, 1000));
    }

    #[test]
    fn each_role_has_its_maximum() {
        let r = LeaseRules::default();
        assert_eq!(r.max_for(Some("submit")), Duration::from_secs(4 * 3600));
        assert_eq!(r.max_for(Some("admin")), Duration::from_secs(7 * 24 * 3600));
        assert_eq!(r.max_for(Some("nobody")), r.default_max);
        assert_eq!(r.max_for(None), Duration::from_secs(7 * 24 * 3600));
    }
}
