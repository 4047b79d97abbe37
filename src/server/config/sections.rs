//! `[health]`, `[fairshare]` and `[retention]` of `conf/server.toml`,
//! their checks, and the scheduler's health and fair-share rules made of
//! them; the credentials a secured server runs with.

use super::ServerConfig;
use crate::settings::{invalid, ConfigError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `[health]` of `conf/server.toml` (README "Device health").
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// Infrastructure failures in a row that make a worker `suspect`.
    pub suspect_after: u32,
    /// Conductor exit statuses that mean the device or worker failed (not
    /// the test): the task runs again on another worker.
    pub infrastructure_exit_codes: Vec<i32>,
    /// A `bad` worker is checked again after this, doubling per failed
    /// check up to `retry_max`.
    #[serde(
        rename = "retry_min",
        deserialize_with = "crate::settings::duration::secs"
    )]
    pub retry_min_secs: u64,
    #[serde(
        rename = "retry_max",
        deserialize_with = "crate::settings::duration::secs"
    )]
    pub retry_max_secs: u64,
    /// `[[health.check]]`: one health check per device group.
    pub check: Vec<HealthCheckConfig>,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            suspect_after: 2,
            infrastructure_exit_codes: vec![3],
            retry_min_secs: 600,
            retry_max_secs: 24 * 3600,
            check: Vec::new(),
        }
    }
}

/// One `[[health.check]]`: the testrun that tells whether a device of
/// `devicegroup` works.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthCheckConfig {
    pub devicegroup: String,
    pub image: String,
    pub packages: Vec<String>,
    pub options: BTreeMap<String, String>,
    /// The check's execution timeout (default 10 min).
    #[serde(
        rename = "timeout",
        deserialize_with = "crate::settings::duration::secs"
    )]
    pub timeout_secs: u64,
    /// A `good` worker is checked again this long after its last check
    /// (default 24 h).
    #[serde(
        rename = "interval",
        deserialize_with = "crate::settings::duration::secs"
    )]
    pub interval_secs: u64,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        HealthCheckConfig {
            devicegroup: String::new(),
            image: String::new(),
            packages: Vec::new(),
            options: BTreeMap::new(),
            timeout_secs: 600,
            interval_secs: 24 * 3600,
        }
    }
}

/// `[fairshare]` of `conf/server.toml`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FairShareConfig {
    /// Weight per user name (default 1, at most 1000).
    pub users: BTreeMap<String, u32>,
    /// Weight per role (submit, operator, admin) for users not listed.
    pub roles: BTreeMap<String, u32>,
    /// `high` moves a task this far ahead of its owner's other tasks,
    /// `low` this far behind.
    #[serde(
        rename = "priority_lead",
        deserialize_with = "crate::settings::duration::secs"
    )]
    pub priority_lead_secs: u64,
}

impl Default for FairShareConfig {
    fn default() -> Self {
        FairShareConfig {
            users: BTreeMap::new(),
            roles: BTreeMap::new(),
            priority_lead_secs: 600,
        }
    }
}

/// `[retention]` of `conf/server.toml`: ended testruns keep their result
/// files and logs this long, and all of them together this many bytes
/// (oldest pruned first); the record of each testrun stays, marked
/// "pruned" with when and why (status, audit log).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Retention {
    #[serde(deserialize_with = "crate::settings::duration::hours")]
    pub max_age_hours: u64,
    pub max_bytes: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_age_hours: 90 * 24,
            max_bytes: 512 << 30,
        }
    }
}

/// `[history]` of `conf/server.toml`: how many ended testruns the server
/// holds in memory (the rest are read from the database when asked for),
/// and how many requests may wait for such a read, in all and per user.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HistoryConfig {
    pub cache_runs: usize,
    pub max_reads: usize,
    pub max_reads_per_user: usize,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        let r = crate::server::scheduler::HistoryRules::default();
        HistoryConfig {
            cache_runs: r.cache_runs,
            max_reads: r.max_reads,
            max_reads_per_user: r.max_reads_per_user,
        }
    }
}

impl HistoryConfig {
    pub fn validate(&self) -> Result<(), crate::settings::ConfigError> {
        use crate::settings::invalid;
        if self.cache_runs > 100_000 {
            return Err(invalid(
                "history.cache_runs",
                self.cache_runs,
                "must be at most 100000 (each ended testrun held costs some 10 KB)",
            ));
        }
        if !(1..=65_536).contains(&self.max_reads) {
            return Err(invalid(
                "history.max_reads",
                self.max_reads,
                "must be between 1 and 65536",
            ));
        }
        if !(1..=self.max_reads).contains(&self.max_reads_per_user) {
            return Err(invalid(
                "history.max_reads_per_user",
                self.max_reads_per_user,
                "must be between 1 and history.max_reads",
            ));
        }
        Ok(())
    }

    pub fn rules(&self) -> crate::server::scheduler::HistoryRules {
        crate::server::scheduler::HistoryRules {
            cache_runs: self.cache_runs,
            max_reads: self.max_reads,
            max_reads_per_user: self.max_reads_per_user,
        }
    }
}

/// What a secured server runs with: its keys (current first) and who may
/// connect.
#[derive(Clone, Debug)]
pub struct ServerCredentials {
    pub keys: Vec<crate::security::KeyPair>,
    pub allow: crate::security::AllowList,
    /// Allow-list entries denied for what their files hold (each names
    /// its file); the server starts with the others.
    pub refused: Vec<crate::security::SecurityError>,
}

impl ServerConfig {
    pub(super) fn validate_health(&self) -> Result<(), ConfigError> {
        let h = &self.health;
        if h.suspect_after < 1 {
            return Err(invalid(
                "health.suspect_after",
                h.suspect_after,
                "must be at least 1",
            ));
        }
        if h.retry_min_secs < 1 || h.retry_max_secs < h.retry_min_secs {
            return Err(invalid(
                "health.retry_min",
                h.retry_min_secs,
                "must be at least 1 s and at most health.retry_max",
            ));
        }
        if h.infrastructure_exit_codes
            .iter()
            .any(|c| matches!(c, 0 | 1))
        {
            return Err(invalid(
                "health.infrastructure_exit_codes",
                format!("{:?}", h.infrastructure_exit_codes),
                "must not contain 0 or 1: those mean the tests ran",
            ));
        }
        let mut groups = std::collections::BTreeSet::new();
        for c in &h.check {
            let key = "health.check";
            let group = &c.devicegroup;
            let spec = crate::protocol::DeviceSpec::parse(&format!("devicegroup:{group}"));
            if group.is_empty() || spec.is_err() {
                return Err(invalid(
                    key,
                    group,
                    "devicegroup must be a device group name (no '.', ':' or whitespace)",
                ));
            }
            if !groups.insert(group.clone()) {
                return Err(invalid(
                    key,
                    group,
                    "a device group has one health check; this one is given twice",
                ));
            }
            if c.image.trim().is_empty() || c.packages.is_empty() {
                return Err(invalid(
                    key,
                    group,
                    "needs an image and at least one package",
                ));
            }
            if c.timeout_secs < 1 || c.timeout_secs > crate::protocol::limits::MAX_TIMEOUT_SECS {
                return Err(invalid(key, group, "timeout must be 1 s to 7 days"));
            }
            if c.interval_secs < 1 || c.interval_secs > 365 * 24 * 3600 {
                return Err(invalid(key, group, "interval must be 1 s to a year"));
            }
        }
        for (who, w) in self.fairshare.users.iter().chain(&self.fairshare.roles) {
            if *w < 1 || *w > crate::server::fairshare::MAX_WEIGHT {
                return Err(invalid("fairshare", who, "weights must be 1–1000"));
            }
        }
        if let Some(r) = self
            .fairshare
            .roles
            .keys()
            .find(|r| !matches!(r.as_str(), "submit" | "operator" | "admin"))
        {
            return Err(invalid(
                "fairshare.roles",
                r,
                "roles are submit, operator and admin",
            ));
        }
        Ok(())
    }

    /// What the scheduler's health and fair-share rules are made of.
    pub fn health_policy(&self) -> crate::server::health::HealthPolicy {
        crate::server::health::HealthPolicy {
            suspect_after: self.health.suspect_after,
            retry_min: std::time::Duration::from_secs(self.health.retry_min_secs),
            retry_max: std::time::Duration::from_secs(self.health.retry_max_secs),
        }
    }

    pub fn health_checks(&self) -> BTreeMap<String, crate::server::health::HealthCheck> {
        self.health
            .check
            .iter()
            .map(|c| {
                (
                    c.devicegroup.clone(),
                    crate::server::health::HealthCheck {
                        image: c.image.clone(),
                        packages: c.packages.clone(),
                        options: c.options.clone(),
                        timeout_secs: c.timeout_secs,
                        interval: std::time::Duration::from_secs(c.interval_secs),
                    },
                )
            })
            .collect()
    }

    pub fn weights(&self) -> BTreeMap<String, u32> {
        let users = self.fairshare.users.iter().map(|(u, w)| (u.clone(), *w));
        let roles = self
            .fairshare
            .roles
            .iter()
            .map(|(r, w)| (format!("role:{r}"), *w));
        users.chain(roles).collect()
    }
}
