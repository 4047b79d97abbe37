//! One notification delivery to one target, as a state machine with the
//! clock passed in: an attempt's result decides whether it is done, tried
//! again (exponential backoff with jitter: about 1 s first, doubling to a
//! cap) or failed for good; past `max_age` it is failed, never dropped
//! silently.

use serde::{Deserialize, Serialize};

/// When a failed attempt is tried again, and for how long.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The first retry's delay (before jitter).
    pub first_ms: u64,
    /// No retry waits longer than this.
    pub cap_ms: u64,
    /// A delivery not done this long after its event is failed.
    pub max_age_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            first_ms: 1000,
            cap_ms: 5 * 60 * 1000,
            max_age_ms: 24 * 3600 * 1000,
        }
    }
}

/// What one attempt came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// The receiver answered with this HTTP status (mail: 250 for a
    /// relay that took it, its reply code otherwise).
    Status(u16),
    /// No answer within the attempt's timeout.
    Timeout,
    /// No connection, TLS failure, a broken answer: why (tried again).
    Transport(String),
    /// A mail relay or sendmail took the message (its answer).
    Accepted(String),
    /// Refused for good without an HTTP status: a mail relay's permanent
    /// error, a per-run URL resolving only to refused addresses.
    Rejected(String),
}

/// Where a delivery stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Pending,
    Delivered,
    Failed,
}

/// A delivery's record (kept in the outbox row, shown by
/// `ots-submit notifications`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// The `webhook-id`: the same on every attempt.
    pub id: String,
    pub target: String,
    pub state: State,
    pub attempts: u32,
    /// Unix ms of the event that caused it.
    pub created_ms: u64,
    /// Unix ms of the next attempt (pending only).
    pub next_ms: u64,
    /// The last attempt's result, in words (`500`, `timeout`, …).
    pub last: Option<String>,
}

/// Whether an answer ends the delivery, and how.
pub fn classify(a: &Attempt) -> Option<State> {
    match a {
        Attempt::Status(s) if (200..300).contains(s) => Some(State::Delivered),
        Attempt::Status(408 | 429) => None,
        Attempt::Status(s) if *s >= 500 => None,
        // Other 4xx (and redirects, which are not followed): the
        // receiver refused it; trying again would not change that.
        Attempt::Status(_) => Some(State::Failed),
        Attempt::Timeout | Attempt::Transport(_) => None,
        Attempt::Accepted(_) => Some(State::Delivered),
        Attempt::Rejected(_) => Some(State::Failed),
    }
}

impl Delivery {
    pub fn new(id: String, target: String, created_ms: u64) -> Delivery {
        Delivery {
            id,
            target,
            state: State::Pending,
            attempts: 0,
            created_ms,
            next_ms: created_ms,
            last: None,
        }
    }

    /// Records an attempt made at `now_ms`; `jitter` in [0, 1) spreads
    /// the retries of many deliveries (the delay is scaled by 0.5–1.5).
    pub fn attempted(&mut self, now_ms: u64, result: &Attempt, policy: &RetryPolicy, jitter: f64) {
        self.attempts = self.attempts.saturating_add(1);
        self.last = Some(match result {
            Attempt::Status(s) => s.to_string(),
            Attempt::Timeout => "timeout".into(),
            Attempt::Transport(why) | Attempt::Accepted(why) | Attempt::Rejected(why) => {
                why.chars().take(200).collect()
            }
        });
        if let Some(end) = classify(result) {
            self.state = end;
            return;
        }
        let exp = self.attempts.saturating_sub(1).min(30);
        let base = policy
            .first_ms
            .saturating_mul(1u64 << exp)
            .min(policy.cap_ms);
        let delay = (base as f64 * (0.5 + jitter.clamp(0.0, 1.0))) as u64;
        let next = now_ms.saturating_add(delay.max(1));
        if next > self.created_ms.saturating_add(policy.max_age_ms) {
            self.state = State::Failed;
            self.last = Some(format!(
                "{} (gave up: older than max_age)",
                self.last.take().unwrap_or_default()
            ));
        } else {
            self.next_ms = next;
        }
    }

    /// Due for an attempt at `now_ms`.
    pub fn due(&self, now_ms: u64) -> bool {
        self.state == State::Pending && self.next_ms <= now_ms
    }

    /// An operator asked to send it again (`ots-submit notify-retry`).
    pub fn retry_now(&mut self, now_ms: u64) {
        self.state = State::Pending;
        self.next_ms = now_ms;
        // A new lease of life for max_age, from now.
        self.created_ms = now_ms;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_end_it_or_not_as_documented() {
        assert_eq!(classify(&Attempt::Status(200)), Some(State::Delivered));
        assert_eq!(classify(&Attempt::Status(204)), Some(State::Delivered));
        for retried in [408, 429, 500, 502, 503] {
            assert_eq!(classify(&Attempt::Status(retried)), None, "{retried}");
        }
        for failed in [301, 400, 401, 404, 410] {
            assert_eq!(
                classify(&Attempt::Status(failed)),
                Some(State::Failed),
                "{failed}"
            );
        }
        assert_eq!(classify(&Attempt::Timeout), None);
    }

    #[test]
    fn retries_start_near_a_second_and_double_to_the_cap() {
        let p = RetryPolicy::default();
        let mut d = Delivery::new("id".into(), "t".into(), 0);
        let mut now = 0;
        let mut delays = Vec::new();
        for _ in 0..12 {
            d.attempted(now, &Attempt::Status(503), &p, 0.5);
            delays.push(d.next_ms - now);
            now = d.next_ms;
        }
        assert_eq!(&delays[..4], &[1000, 2000, 4000, 8000]);
        assert!(delays.iter().all(|&x| x <= p.cap_ms));
        assert_eq!(*delays.last().unwrap(), p.cap_ms);
        assert_eq!(d.state, State::Pending);
        // Jitter spreads them: 0.5–1.5 of the delay.
        let mut a = Delivery::new("a".into(), "t".into(), 0);
        a.attempted(0, &Attempt::Timeout, &p, 0.0);
        assert_eq!(a.next_ms, 500);
        a = Delivery::new("a".into(), "t".into(), 0);
        a.attempted(0, &Attempt::Timeout, &p, 0.999);
        assert!(a.next_ms >= 1490 && a.next_ms < 1500);
    }

    #[test]
    fn past_max_age_it_fails_and_says_why() {
        let p = RetryPolicy {
            first_ms: 1000,
            cap_ms: 60_000,
            max_age_ms: 10_000,
        };
        let mut d = Delivery::new("id".into(), "t".into(), 0);
        let mut now = 0;
        while d.state == State::Pending {
            d.attempted(now, &Attempt::Status(500), &p, 0.5);
            now = d.next_ms;
        }
        assert_eq!(d.state, State::Failed);
        assert!(d.last.as_deref().unwrap().contains("max_age"));
        assert!(d.attempts <= 4);
        d.retry_now(100_000);
        assert!(d.due(100_000));
    }
}
