//! Device health, without I/O: what the server believes about each
//! worker's device, and every rule that changes it.
//!
//! A lab's devices break every day. The scheduler tells this machine what
//! happened (an infrastructure failure, a test result, a health check's
//! outcome, an operator's word) with the time; it answers with the change,
//! if any, which the scheduler records everywhere a change is seen (the
//! worker's history, the audit log, metrics, `workers`) and, later, sends
//! as a notification. Only `good` workers get ordinary tasks; health
//! checks go to `unknown`, `suspect` and (after a backoff) `bad` ones.
//!
//! ```text
//!   new / device changed ─► unknown ──check passes──► good ◄──────────┐
//!                              │                       │ suspect_after │
//!                              └──check fails──┐       ▼ infra failures│
//!                                              │    suspect ─check──►──┤
//!                                              ▼       │ fails         │
//!                                             bad ◄────┘               │
//!                                              └─ backoff, check passes┘
//!   maintenance on ─► maintenance ─off─► unknown      retire ─► retired
//! ```

use crate::protocol::{Health, HealthChange};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::time::Duration;

/// Health changes kept per worker (older ones stay in the audit log).
pub const HISTORY_KEPT: usize = 100;

/// Shared testruns remembered per worker for the "fails alone" rule.
pub const SHARED_WINDOW: usize = 8;

/// Shared testruns of the window in which the worker's task failed while
/// every task on other workers passed, before it turns `suspect`.
pub const FAILED_ALONE: usize = 6;
/// Device-specific test failures (a case failing only on this worker of
/// its group while another passes it, `server::results`) since its last
/// passed health check that make a `good` worker `suspect`.
pub const DEVICE_SPECIFIC_SUSPECT: u32 = 3;

/// The rules, from `[health]` of `server.toml`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthPolicy {
    /// Infrastructure failures in a row that make a worker `suspect`.
    pub suspect_after: u32,
    /// A `bad` worker is checked again after this…
    pub retry_min: Duration,
    /// …doubling per failed check up to this.
    pub retry_max: Duration,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        HealthPolicy {
            suspect_after: 2,
            retry_min: Duration::from_secs(600),
            retry_max: Duration::from_secs(24 * 3600),
        }
    }
}

/// A device group's health check (`[[health.check]]` of `server.toml`):
/// a testrun the server runs on one worker of the group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub image: String,
    pub packages: Vec<String>,
    pub options: std::collections::BTreeMap<String, String>,
    pub timeout_secs: u64,
    /// A `good` worker is checked again this long after its last check.
    pub interval: Duration,
}

/// Why the server wants a health check on a worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckReason {
    /// New, or its device changed: never checked as it is.
    New,
    /// Turned `suspect`: checked at once, after its recovery command.
    Suspect,
    /// `bad`, its backoff over: recovery, then a check.
    Retry,
    /// The periodic check (`interval`).
    Periodic,
    /// An operator asked (`ots-submit check`).
    Operator,
    /// A lease ended: whatever its holder left, recovered and checked.
    Lease,
}

impl CheckReason {
    /// Whether the worker runs its recovery command first: only a check
    /// that follows a failure.
    pub fn recovers(self) -> bool {
        matches!(
            self,
            CheckReason::Suspect | CheckReason::Retry | CheckReason::Lease
        )
    }
}

/// What the server knows of one worker's health; stored with the worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerHealth {
    pub health: Health,
    pub since_ms: u64,
    pub reason: String,
    /// Infrastructure failures in a row (reset by a test result).
    #[serde(default)]
    pub streak: u32,
    /// Failed health checks in a row (the backoff's exponent).
    #[serde(default)]
    pub failed_checks: u32,
    /// When the last health check passed.
    #[serde(default)]
    pub checked_ms: Option<u64>,
    /// A `bad` worker is checked again at this time.
    #[serde(default)]
    pub retry_at_ms: Option<u64>,
    /// A check the server wants to run on the worker, and why.
    #[serde(default)]
    pub wanted: Option<CheckReason>,
    /// The device it was checked as (`unknown` again when it changes).
    #[serde(default)]
    pub device: String,
    /// For each recent testrun shared with other workers: whether this
    /// worker's task failed while all the others passed. Newest last.
    #[serde(default)]
    pub shared: VecDeque<bool>,
    /// Changes, oldest first, at most [`HISTORY_KEPT`].
    #[serde(default)]
    pub history: VecDeque<HealthChange>,
    /// Device-specific test failures since its last passed health check.
    #[serde(default)]
    pub device_specific: u32,
}

/// What happened to a worker, as the scheduler saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// It registered with this device (shown form); `has_check`: its
    /// device group has a health check configured.
    Registered {
        device: &'a str,
        has_check: bool,
    },
    /// A task failed on it for infrastructure reasons.
    InfraFailure {
        reason: &'a str,
    },
    /// A task ended on it with a test result (exit 0 or 1).
    TestResult,
    /// A shared testrun ended: whether its task here failed while every
    /// task on another worker passed.
    Shared {
        failed_alone: bool,
    },
    /// A test case failed only on it among the workers of its group
    /// (evidence against the device, beside infrastructure failures).
    DeviceSpecific {
        case: &'a str,
        run: &'a str,
    },
    /// A health check ended.
    CheckPassed {
        task: &'a str,
    },
    CheckFailed {
        task: &'a str,
        reason: &'a str,
    },
    /// A `bad` worker's backoff is over and its group has no check:
    /// ordinary tasks again, on probation.
    RetryWithoutCheck,
    /// An operator's word (`has_check`: as for `Registered`).
    Maintenance {
        on: bool,
        reason: &'a str,
        has_check: bool,
    },
    Retire {
        reason: &'a str,
    },
    /// `ots-submit check`.
    CheckRequested,
    /// A lease of the device ended: a person had it, so its state is
    /// not known (`has_check`: as for `Registered`).
    LeaseEnded {
        reason: &'a str,
        has_check: bool,
    },
}

impl WorkerHealth {
    /// A worker the server has just met.
    pub fn new(now_ms: u64) -> WorkerHealth {
        WorkerHealth {
            health: Health::Unknown,
            since_ms: now_ms,
            reason: "new worker".into(),
            streak: 0,
            failed_checks: 0,
            checked_ms: None,
            retry_at_ms: None,
            wanted: None,
            device: String::new(),
            shared: VecDeque::new(),
            history: VecDeque::new(),
            device_specific: 0,
        }
    }

    /// May it take ordinary tasks?
    pub fn takes_tasks(&self) -> bool {
        self.health == Health::Good
    }

    /// When a `bad` worker is next tried, after `failed` checks in a row.
    pub fn backoff(policy: &HealthPolicy, failed: u32) -> Duration {
        let factor = 1u32
            .checked_shl(failed.saturating_sub(1))
            .unwrap_or(u32::MAX);
        policy
            .retry_min
            .saturating_mul(factor)
            .min(policy.retry_max)
    }

    /// Applies one event at `now_ms`; returns the change it made, if the
    /// health changed (already in the history).
    pub fn apply(
        &mut self,
        event: Event<'_>,
        now_ms: u64,
        policy: &HealthPolicy,
    ) -> Option<HealthChange> {
        use Health::*;
        let parked = matches!(self.health, Maintenance | Retired);
        match event {
            Event::Registered { device, has_check } => {
                let changed = !self.device.is_empty() && self.device != device;
                let was = std::mem::replace(&mut self.device, device.to_string());
                if parked {
                    return None;
                }
                if changed {
                    self.streak = 0;
                    self.shared.clear();
                    return self.unknown(
                        now_ms,
                        has_check,
                        format!("device changed from {was} to {device}"),
                    );
                }
                if self.health == Unknown {
                    let reason = self.reason.clone();
                    return self.unknown(now_ms, has_check, reason);
                }
                None
            }
            Event::InfraFailure { reason } => {
                self.streak = self.streak.saturating_add(1);
                if self.health == Good && self.streak >= policy.suspect_after.max(1) {
                    self.wanted = Some(CheckReason::Suspect);
                    return self.set(
                        Suspect,
                        now_ms,
                        format!(
                            "{} infrastructure failures in a row (suspect_after = {}); last: {reason}",
                            self.streak, policy.suspect_after
                        ),
                    );
                }
                None
            }
            Event::TestResult => {
                self.streak = 0;
                if self.health == Good {
                    self.failed_checks = 0;
                }
                None
            }
            Event::Shared { failed_alone } => self.shared(now_ms, failed_alone),
            Event::DeviceSpecific { case, run } => self.device_specific(now_ms, case, run),
            Event::CheckPassed { task } => {
                self.checked_ms = Some(now_ms);
                self.device_specific = 0;
                self.streak = 0;
                self.failed_checks = 0;
                self.retry_at_ms = None;
                if parked || self.health == Good {
                    self.note(now_ms, format!("health check {task} passed"));
                    return None;
                }
                self.set(Good, now_ms, format!("health check {task} passed"))
            }
            Event::CheckFailed { task, reason } => {
                if parked {
                    self.note(now_ms, format!("health check {task} failed: {reason}"));
                    return None;
                }
                self.fail(
                    now_ms,
                    policy,
                    format!("health check {task} failed: {reason}"),
                )
            }
            Event::RetryWithoutCheck => {
                if self.health != Bad {
                    return None;
                }
                self.retry_at_ms = None;
                // One more infrastructure failure makes it suspect again.
                self.streak = policy.suspect_after.saturating_sub(1);
                self.set(
                    Good,
                    now_ms,
                    "on probation: its backoff is over and its device group has no health check"
                        .into(),
                )
            }
            Event::Maintenance {
                on: true, reason, ..
            } => {
                if self.health == Maintenance {
                    return None;
                }
                self.wanted = None;
                self.set(Maintenance, now_ms, format!("maintenance: {reason}"))
            }
            Event::Maintenance {
                on: false,
                reason,
                has_check,
            } => {
                if !parked {
                    return None;
                }
                self.streak = 0;
                self.failed_checks = 0;
                self.retry_at_ms = None;
                self.unknown(
                    now_ms,
                    has_check,
                    format!("back from maintenance: {reason}"),
                )
            }
            Event::Retire { reason } => {
                if self.health == Retired {
                    return None;
                }
                self.wanted = None;
                self.set(Retired, now_ms, format!("retired: {reason}"))
            }
            Event::CheckRequested => {
                if self.health != Retired {
                    self.wanted = Some(CheckReason::Operator);
                }
                None
            }
            e @ Event::LeaseEnded { .. } => self.after_lease(parked, now_ms, e),
        }
    }

    /// A lease ended: `unknown`, recovered and checked (unless parked).
    fn after_lease(&mut self, parked: bool, now_ms: u64, e: Event<'_>) -> Option<HealthChange> {
        let Event::LeaseEnded { reason, has_check } = e else {
            return None;
        };
        if parked {
            return None;
        }
        let change = self.unknown(now_ms, has_check, reason.to_string());
        if has_check {
            self.wanted = Some(CheckReason::Lease);
        }
        change
    }

    /// `unknown`, wanting its first check; straight to `good` if its
    /// group has none (nothing to check it with).
    fn unknown(&mut self, now_ms: u64, has_check: bool, reason: String) -> Option<HealthChange> {
        if has_check {
            self.wanted = Some(CheckReason::New);
            if self.health == Health::Unknown {
                self.reason = reason;
                return None;
            }
            self.set(Health::Unknown, now_ms, reason)
        } else {
            self.wanted = None;
            self.set(
                Health::Good,
                now_ms,
                format!("{reason}; its device group has no health check configured"),
            )
        }
    }

    /// `bad`, to be tried again after the backoff.
    pub fn fail(
        &mut self,
        now_ms: u64,
        policy: &HealthPolicy,
        reason: String,
    ) -> Option<HealthChange> {
        self.failed_checks = self.failed_checks.saturating_add(1);
        let wait = Self::backoff(policy, self.failed_checks);
        let wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        self.retry_at_ms = Some(now_ms.saturating_add(wait_ms));
        self.wanted = None;
        let reason = format!(
            "{reason}; checked again in {}",
            humantime::format_duration(Duration::from_secs(wait.as_secs()))
        );
        if self.health == Health::Bad {
            self.note(now_ms, reason);
            return None;
        }
        self.set(Health::Bad, now_ms, reason)
    }

    fn set(&mut self, to: Health, now_ms: u64, reason: String) -> Option<HealthChange> {
        if to == self.health && reason == self.reason {
            return None;
        }
        let change = HealthChange {
            at_ms: now_ms,
            from: self.health,
            to,
            reason: reason.clone(),
        };
        self.health = to;
        self.since_ms = now_ms;
        self.reason = reason;
        self.push(change.clone());
        Some(change)
    }

    /// Something worth keeping in the history that is no change of health
    /// (a check passed on a good worker).
    /// A shared testrun ended: failing alone too often makes a `good`
    /// worker suspect.
    fn shared(&mut self, now_ms: u64, failed_alone: bool) -> Option<HealthChange> {
        if self.shared.len() >= SHARED_WINDOW {
            self.shared.pop_front();
        }
        self.shared.push_back(failed_alone);
        let alone = self.shared.iter().filter(|f| **f).count();
        if self.health == Health::Good && failed_alone && alone >= FAILED_ALONE {
            self.shared.clear();
            self.wanted = Some(CheckReason::Suspect);
            return self.set(
                Health::Suspect,
                now_ms,
                format!(
                    "failed alone in {alone} of its last {SHARED_WINDOW} testruns shared with other workers (the others passed)"
                ),
            );
        }
        None
    }

    /// A test case failed only on this worker of its group: noted, and
    /// past [`DEVICE_SPECIFIC_SUSPECT`] a `good` worker is suspect.
    fn device_specific(&mut self, now_ms: u64, case: &str, run: &str) -> Option<HealthChange> {
        self.device_specific = self.device_specific.saturating_add(1);
        let why = format!(
            "test case {case} failed only on this worker of its group in {run} ({} such failures since its last passed health check)",
            self.device_specific
        );
        if self.health == Health::Good && self.device_specific >= DEVICE_SPECIFIC_SUSPECT {
            self.wanted = Some(CheckReason::Suspect);
            return self.set(Health::Suspect, now_ms, why);
        }
        self.note(now_ms, why);
        None
    }

    fn note(&mut self, now_ms: u64, reason: String) {
        self.push(HealthChange {
            at_ms: now_ms,
            from: self.health,
            to: self.health,
            reason,
        });
    }

    fn push(&mut self, change: HealthChange) {
        if self.history.len() >= HISTORY_KEPT {
            self.history.pop_front();
        }
        self.history.push_back(change);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> WorkerHealth {
        let mut h = WorkerHealth::new(0);
        h.apply(
            Event::Registered {
                device: "devicegroup:g",
                has_check: true,
            },
            0,
            &HealthPolicy::default(),
        );
        h.apply(
            Event::CheckPassed { task: "r1.t1" },
            1,
            &HealthPolicy::default(),
        );
        h
    }

    #[test]
    fn a_new_worker_wants_its_check_and_is_good_once_it_passes() {
        let p = HealthPolicy::default();
        let mut h = WorkerHealth::new(0);
        assert_eq!(
            h.apply(
                Event::Registered {
                    device: "devicegroup:g",
                    has_check: true
                },
                0,
                &p
            ),
            None
        );
        assert_eq!(h.health, Health::Unknown);
        assert_eq!(h.wanted, Some(CheckReason::New));
        assert!(!h.takes_tasks());
        let c = h
            .apply(Event::CheckPassed { task: "r1.t1" }, 5, &p)
            .unwrap();
        assert_eq!((c.from, c.to), (Health::Unknown, Health::Good));
        assert!(h.takes_tasks());
    }

    #[test]
    fn without_a_check_a_new_worker_is_good_at_once() {
        let p = HealthPolicy::default();
        let mut h = WorkerHealth::new(0);
        let c = h
            .apply(
                Event::Registered {
                    device: "devicegroup:g",
                    has_check: false,
                },
                0,
                &p,
            )
            .unwrap();
        assert_eq!(c.to, Health::Good);
        assert!(c.reason.contains("no health check"), "{}", c.reason);
    }

    #[test]
    fn infrastructure_failures_in_a_row_make_it_suspect_and_a_result_resets_them() {
        let p = HealthPolicy::default();
        let mut h = good();
        assert_eq!(
            h.apply(Event::InfraFailure { reason: "exit 3" }, 2, &p),
            None
        );
        h.apply(Event::TestResult, 3, &p);
        assert_eq!(
            h.apply(Event::InfraFailure { reason: "exit 3" }, 4, &p),
            None
        );
        let c = h
            .apply(Event::InfraFailure { reason: "exit 3" }, 5, &p)
            .unwrap();
        assert_eq!(c.to, Health::Suspect);
        assert_eq!(h.wanted, Some(CheckReason::Suspect));
        assert!(CheckReason::Suspect.recovers());
    }

    #[test]
    fn a_failed_check_is_bad_with_a_doubling_backoff_and_a_pass_brings_it_back() {
        let p = HealthPolicy::default();
        let mut h = good();
        h.apply(Event::InfraFailure { reason: "x" }, 2, &p);
        h.apply(Event::InfraFailure { reason: "x" }, 3, &p);
        let c = h
            .apply(
                Event::CheckFailed {
                    task: "r2.t1",
                    reason: "exit 3",
                },
                10,
                &p,
            )
            .unwrap();
        assert_eq!(c.to, Health::Bad);
        assert_eq!(h.retry_at_ms, Some(10 + 600_000));
        h.apply(
            Event::CheckFailed {
                task: "r3.t1",
                reason: "exit 3",
            },
            20,
            &p,
        );
        assert_eq!(h.retry_at_ms, Some(20 + 1_200_000));
        assert_eq!(WorkerHealth::backoff(&p, 40), p.retry_max);
        let c = h
            .apply(Event::CheckPassed { task: "r4.t1" }, 30, &p)
            .unwrap();
        assert_eq!((c.from, c.to), (Health::Bad, Health::Good));
        assert_eq!(h.failed_checks, 0);
    }

    #[test]
    fn maintenance_and_retirement_hold_whatever_happens() {
        let p = HealthPolicy::default();
        let mut h = good();
        h.apply(
            Event::Maintenance {
                on: true,
                reason: "new cable",
                has_check: true,
            },
            2,
            &p,
        );
        for e in [
            Event::InfraFailure { reason: "x" },
            Event::InfraFailure { reason: "x" },
            Event::CheckFailed {
                task: "t",
                reason: "x",
            },
            Event::CheckPassed { task: "t" },
            Event::Registered {
                device: "devicegroup:h",
                has_check: true,
            },
        ] {
            assert_eq!(h.apply(e, 3, &p), None);
            assert_eq!(h.health, Health::Maintenance);
        }
        let c = h
            .apply(
                Event::Maintenance {
                    on: false,
                    reason: "fixed",
                    has_check: true,
                },
                4,
                &p,
            )
            .unwrap();
        assert_eq!(c.to, Health::Unknown);
        assert_eq!(h.wanted, Some(CheckReason::New));
        h.apply(Event::Retire { reason: "gone" }, 5, &p);
        h.apply(Event::CheckRequested, 6, &p);
        assert_eq!((h.health, h.wanted), (Health::Retired, None));
    }

    #[test]
    fn a_changed_device_is_unknown_again() {
        let p = HealthPolicy::default();
        let mut h = good();
        let c = h
            .apply(
                Event::Registered {
                    device: "devicegroup:h",
                    has_check: true,
                },
                9,
                &p,
            )
            .unwrap();
        assert_eq!(c.to, Health::Unknown);
        assert!(c.reason.contains("device changed"), "{}", c.reason);
    }

    #[test]
    fn failing_alone_in_shared_testruns_makes_it_suspect() {
        let p = HealthPolicy::default();
        let mut h = good();
        for i in 0..FAILED_ALONE - 1 {
            assert_eq!(
                h.apply(Event::Shared { failed_alone: true }, i as u64, &p),
                None
            );
        }
        let c = h
            .apply(Event::Shared { failed_alone: true }, 99, &p)
            .unwrap();
        assert_eq!(c.to, Health::Suspect);
    }

    fn event(n: u8, group: bool) -> Event<'static> {
        match n % 13 {
            0 => Event::Registered {
                device: if group {
                    "devicegroup:g"
                } else {
                    "devicegroup:h"
                },
                has_check: group,
            },
            1 | 2 => Event::InfraFailure { reason: "exit 3" },
            3 => Event::TestResult,
            4 => Event::Shared {
                failed_alone: group,
            },
            5 => Event::CheckPassed { task: "t" },
            6 => Event::CheckFailed {
                task: "t",
                reason: "x",
            },
            7 => Event::RetryWithoutCheck,
            8 => Event::Maintenance {
                on: group,
                reason: "r",
                has_check: !group,
            },
            9 => Event::Retire { reason: "r" },
            10 => Event::LeaseEnded {
                reason: "lease l1 ended",
                has_check: group,
            },
            11 => Event::DeviceSpecific {
                case: "c",
                run: "r1",
            },
            _ => Event::CheckRequested,
        }
    }

    proptest::proptest! {
        /// Whatever happens, health changes only as the table in the
        /// module documentation says, each change is in the history, and
        /// a parked worker (maintenance, retired) leaves only by an
        /// operator's word.
        #[test]
        fn health_changes_only_as_specified(events in proptest::collection::vec((proptest::prelude::any::<u8>(), proptest::prelude::any::<bool>()), 1..200)) {
            use Health::*;
            let p = HealthPolicy::default();
            let mut h = WorkerHealth::new(0);
            for (i, (n, g)) in events.into_iter().enumerate() {
                let e = event(n, g);
                let before = h.health;
                let len = h.history.len();
                let change = h.apply(e.clone(), i as u64, &p);
                if let Some(c) = &change {
                    proptest::prop_assert_eq!(c.from, before);
                    proptest::prop_assert_eq!(c.to, h.health);
                    proptest::prop_assert_eq!(h.history.back(), Some(c));
                    proptest::prop_assert!(h.history.len() > len || len == HISTORY_KEPT);
                } else {
                    proptest::prop_assert_eq!(h.health, before, "{:?} changed health without a change", e);
                }
                let (from, to) = (before, h.health);
                if from == to {
                    continue;
                }
                let allowed = match e {
                    Event::Registered { .. } => matches!(to, Unknown | Good) && !matches!(from, Maintenance | Retired),
                    Event::InfraFailure { .. } | Event::Shared { .. } | Event::DeviceSpecific { .. } => (from, to) == (Good, Suspect),
                    Event::CheckPassed { .. } => matches!(from, Unknown | Suspect | Bad) && to == Good,
                    Event::CheckFailed { .. } => matches!(from, Unknown | Suspect | Good) && to == Bad,
                    Event::RetryWithoutCheck => (from, to) == (Bad, Good),
                    Event::Maintenance { on: true, .. } => to == Maintenance,
                    Event::Maintenance { on: false, .. } => matches!(from, Maintenance | Retired) && matches!(to, Unknown | Good),
                    Event::Retire { .. } => to == Retired,
                    Event::LeaseEnded { .. } => !matches!(from, Maintenance | Retired) && matches!(to, Unknown | Good),
                    Event::TestResult | Event::CheckRequested => false,
                };
                proptest::prop_assert!(allowed, "{:?}: {} -> {} not allowed", e, from, to);
            }
        }
    }

    #[test]
    fn the_history_is_bounded() {
        let p = HealthPolicy::default();
        let mut h = good();
        for i in 0..(HISTORY_KEPT as u64 * 3) {
            h.apply(
                Event::Maintenance {
                    on: i % 2 == 0,
                    reason: "x",
                    has_check: true,
                },
                i,
                &p,
            );
        }
        assert_eq!(h.history.len(), HISTORY_KEPT);
    }
}
