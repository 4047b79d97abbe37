//! One leader at a time among servers sharing a PostgreSQL database: a
//! lease row with a monotonic epoch (the fencing token). A server acts —
//! binds, dispatches, acknowledges — only while it holds a valid lease;
//! every commit checks its epoch in the same transaction, so a deposed
//! leader's late commits fail; a leader that cannot renew steps down
//! before its lease can expire elsewhere.
//!
//! [`Tenure`] is the rule, without I/O and with the clock passed in:
//! when the lease counts as ours, when to step down. The SQL lives in
//! [`super::pg`]. Expiry is judged by the database's clock (one clock for
//! every server), our own validity by our monotonic clock from the
//! moment the renewal was *sent* (so a late answer never extends it).

use std::time::{Duration, Instant};

/// `lease_ttl` and `lease_renew`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeasePolicy {
    /// How long a granted or renewed lease lasts (database clock).
    pub ttl: Duration,
    /// How often the leader renews it.
    pub renew: Duration,
}

impl Default for LeasePolicy {
    fn default() -> Self {
        LeasePolicy {
            ttl: Duration::from_secs(5),
            renew: Duration::from_secs(1),
        }
    }
}

impl LeasePolicy {
    /// A renewal sent at `sent` keeps us leader until this: the lease
    /// runs `ttl` from when the database handled it (after `sent`), less
    /// one renewal interval of margin for the clocks' rates and for the
    /// time it takes us to stop acting.
    pub fn valid_until(&self, sent: Instant) -> Instant {
        sent + self.ttl.saturating_sub(self.renew)
    }
}

/// Our tenure as leader.
#[derive(Clone, Debug)]
pub struct Tenure {
    pub policy: LeasePolicy,
    pub epoch: i64,
    valid_until: Instant,
}

impl Tenure {
    /// Granted by a request sent at `sent`.
    pub fn granted(policy: LeasePolicy, epoch: i64, sent: Instant) -> Tenure {
        Tenure {
            policy,
            epoch,
            valid_until: policy.valid_until(sent),
        }
    }

    /// A renewal sent at `sent` succeeded.
    pub fn renewed(&mut self, sent: Instant) {
        self.valid_until = self.valid_until.max(self.policy.valid_until(sent));
    }

    /// May we still act at `now`? After a stop (SIGSTOP, a stalled
    /// machine) longer than the lease, no: the monotonic clock ran on.
    pub fn valid(&self, now: Instant) -> bool {
        now < self.valid_until
    }

    pub fn valid_until(&self) -> Instant {
        self.valid_until
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_ours_until_a_renewal_interval_before_it_can_expire() {
        let p = LeasePolicy::default();
        let t0 = Instant::now();
        let mut t = Tenure::granted(p, 3, t0);
        assert!(t.valid(t0 + Duration::from_millis(3999)));
        assert!(!t.valid(t0 + Duration::from_secs(4)));
        t.renewed(t0 + Duration::from_secs(1));
        assert!(t.valid(t0 + Duration::from_millis(4999)));
        // A late answer to an old renewal never shortens it.
        t.renewed(t0);
        assert!(t.valid(t0 + Duration::from_millis(4999)));
        // Frozen for longer than the lease: not ours any more.
        assert!(!t.valid(t0 + Duration::from_secs(6)));
    }
}
