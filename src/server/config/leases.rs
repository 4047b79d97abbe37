//! `[leases]` of `conf/server.toml` (README "Leases"): how long a person
//! may hold a device, how long an unheard holder keeps it, and the
//! bounds per user and per lease; checked, and turned into the
//! scheduler's [`LeaseRules`].

use crate::server::leasing::LeaseRules;
use crate::settings::{invalid, ConfigError};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// `[leases]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LeasesConfig {
    /// A lease whose holder was not heard for this long ends (every lease
    /// command, an open console and `reserve --keep` count as heard).
    #[serde(rename = "idle", deserialize_with = "crate::settings::duration::ms")]
    pub idle_ms: u64,
    /// Longest lease per role.
    #[serde(
        rename = "max_submit",
        deserialize_with = "crate::settings::duration::ms"
    )]
    pub max_submit_ms: u64,
    #[serde(
        rename = "max_operator",
        deserialize_with = "crate::settings::duration::ms"
    )]
    pub max_operator_ms: u64,
    #[serde(
        rename = "max_admin",
        deserialize_with = "crate::settings::duration::ms"
    )]
    pub max_admin_ms: u64,
    pub held_per_user: usize,
    pub waiting_per_user: usize,
    pub max_leases: usize,
    pub consoles_per_lease: usize,
    pub consoles_per_user: usize,
    pub input_bytes_per_sec: u64,
    /// Console output kept per lease for a late attach (`--since`).
    pub replay_bytes: usize,
}

impl Default for LeasesConfig {
    fn default() -> Self {
        let r = LeaseRules::default();
        let max = |role: &str| r.max[role].as_millis() as u64;
        LeasesConfig {
            idle_ms: r.idle.as_millis() as u64,
            max_submit_ms: max("submit"),
            max_operator_ms: max("operator"),
            max_admin_ms: max("admin"),
            held_per_user: r.held_per_user,
            waiting_per_user: r.waiting_per_user,
            max_leases: r.max_leases,
            consoles_per_lease: r.consoles_per_lease,
            consoles_per_user: r.consoles_per_user,
            input_bytes_per_sec: r.input_bytes_per_sec,
            replay_bytes: r.replay_bytes,
        }
    }
}

impl LeasesConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let week = crate::protocol::leasing::MAX_LEASE_MS;
        if !(1000..=24 * 3600 * 1000).contains(&self.idle_ms) {
            return Err(invalid(
                "leases.idle",
                self.idle_ms,
                "must be between 1s and 24h",
            ));
        }
        for (key, v) in [
            ("leases.max_submit", self.max_submit_ms),
            ("leases.max_operator", self.max_operator_ms),
            ("leases.max_admin", self.max_admin_ms),
        ] {
            if !(1000..=week).contains(&v) {
                return Err(invalid(key, v, "must be between 1s and 7d"));
            }
        }
        for (key, v, max) in [
            ("leases.held_per_user", self.held_per_user, 1000),
            ("leases.waiting_per_user", self.waiting_per_user, 1000),
            ("leases.max_leases", self.max_leases, 100_000),
            ("leases.consoles_per_lease", self.consoles_per_lease, 1000),
            ("leases.consoles_per_user", self.consoles_per_user, 1000),
            ("leases.replay_bytes", self.replay_bytes, 64 << 20),
        ] {
            if !(1..=max).contains(&v) {
                return Err(invalid(key, v, format!("must be between 1 and {max}")));
            }
        }
        if !(1..=16 << 20).contains(&self.input_bytes_per_sec) {
            return Err(invalid(
                "leases.input_bytes_per_sec",
                self.input_bytes_per_sec,
                "must be between 1 and 16777216",
            ));
        }
        Ok(())
    }

    pub fn rules(&self) -> LeaseRules {
        LeaseRules {
            idle: Duration::from_millis(self.idle_ms),
            max: [
                (
                    "submit".to_string(),
                    Duration::from_millis(self.max_submit_ms),
                ),
                (
                    "operator".to_string(),
                    Duration::from_millis(self.max_operator_ms),
                ),
                (
                    "admin".to_string(),
                    Duration::from_millis(self.max_admin_ms),
                ),
            ]
            .into(),
            default_max: Duration::from_millis(self.max_submit_ms),
            held_per_user: self.held_per_user,
            waiting_per_user: self.waiting_per_user,
            max_leases: self.max_leases,
            consoles_per_lease: self.consoles_per_lease,
            consoles_per_user: self.consoles_per_user,
            input_bytes_per_sec: self.input_bytes_per_sec,
            replay_bytes: self.replay_bytes,
        }
    }
}
