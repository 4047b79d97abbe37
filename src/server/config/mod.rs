//! `ots-server`'s settings (`conf/server.toml`, `OTS_SERVER_…`, flags),
//! loaded by the shared [`crate::settings`] loader and turned into each
//! component's own small settings (scheduler limits, socket limits, lease
//! policy, PostgreSQL, the dashboard) here, at the top, so no component
//! reads this struct.
//!
//! - `limits`: `[limits]`, every bound on what a peer can make the server hold.
//! - `sections`: `[health]`, `[fairshare]`, `[retention]`, `[history]`
//!   and their checks.
//! - `leases`: `[leases]`, devices leased to people.
//! - `web`: the dashboard's settings, checked.

mod leases;
mod limits;
pub mod results;
mod sections;
mod web;

pub use leases::LeasesConfig;
pub use limits::ServerLimits;
pub use sections::{
    FairShareConfig, HealthCheckConfig, HealthConfig, HistoryConfig, Retention, ServerCredentials,
};

use crate::delivery::RetryPolicy;
use crate::security::SecurityMode;
use crate::settings::{
    check_endpoint, invalid, load, writable_dir_problem, ConfigError, Override, Problem,
};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `ots-server` configuration (`conf/server.toml`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// ROUTER endpoint workers and clients connect to.
    pub control: String,
    /// PUB endpoint for heartbeats and progress.
    pub events: String,
    /// The server's own state: the SQLite database (unless `database`
    /// names PostgreSQL), and by default the files too.
    pub state_dir: PathBuf,
    /// Task logs, result files, input files and the audit log (default:
    /// `state_dir`). Servers sharing a PostgreSQL database share this
    /// folder (NFS or any shared filesystem: README, "State in
    /// PostgreSQL"); their `state_dir`s may be their own.
    pub files_dir: Option<PathBuf>,
    #[serde(deserialize_with = "crate::settings::duration::ms")]
    pub heartbeat_interval_ms: u64,
    /// A worker is lost after this many silent heartbeat intervals.
    pub liveness: u32,
    /// A dispatch not started within this is stale.
    #[serde(deserialize_with = "crate::settings::duration::ms")]
    pub dispatch_ttl_ms: u64,
    /// How long a lost worker's task is held for it.
    #[serde(deserialize_with = "crate::settings::duration::ms")]
    pub lost_grace_ms: u64,
    pub max_attempts: u32,
    #[serde(deserialize_with = "crate::settings::duration::secs")]
    pub queue_timeout_secs: u64,
    #[serde(deserialize_with = "crate::settings::duration::secs")]
    pub backstop_grace_secs: u64,
    /// A send to one peer that does not complete within this is dropped and
    /// counted, so one stuck peer cannot stall the server.
    #[serde(deserialize_with = "crate::settings::duration::ms")]
    pub send_timeout_ms: u64,
    /// Resend timing of the server's mandatory messages (dispatch, cancel).
    pub retry: RetryPolicy,
    /// Bounds on what peers can make the server hold (README "Limits").
    pub limits: ServerLimits,
    /// How long ended testruns keep their result files and logs.
    pub retention: Retention,
    /// Ended testruns held in memory; reads of the others.
    pub history: HistoryConfig,
    /// Triage's window and the known-issue rules (README "Results").
    pub results: results::ResultsConfig,
    /// `HOST:PORT` of the metrics endpoint (`GET /metrics`, Prometheus
    /// text); empty: off.
    pub metrics: String,
    /// `HOST:PORT` of the web dashboard; empty: off. A non-loopback
    /// address needs `web_tls_cert` and `web_tls_key`, or `web_insecure`.
    pub web: String,
    /// PEM certificate chain and private key: the dashboard speaks HTTPS.
    pub web_tls_cert: Option<PathBuf>,
    pub web_tls_key: Option<PathBuf>,
    /// Serve plain HTTP on a non-loopback address anyway (a warning at
    /// every start: session cookies cross the network in the clear).
    pub web_insecure: bool,
    /// The dashboard's address as browsers reach it (behind a reverse
    /// proxy: `https://ots.example.org`); links are made with it.
    pub web_url: String,
    /// The log viewer's "first failure", when no failing test case says
    /// where it is: the first line containing this text (1–256 bytes).
    pub web_failure_text: String,
    /// Trusted-proxy mode: the header in which a reverse proxy that
    /// authenticated the user names it (e.g. `X-Remote-User`); empty: off.
    pub web_proxy_user_header: String,
    /// The addresses such a proxy connects from (default: loopback).
    pub web_trusted_proxies: Vec<String>,
    /// Log level (error, warn, info, debug, trace, or a filter such as
    /// `ots=debug`); `RUST_LOG` overrides it.
    pub log_level: String,
    /// `noise` (default): every peer authenticates with a key from the
    /// allow-lists, every frame is encrypted. `none`: plaintext and no
    /// identities, for a closed lab only (a warning at every start).
    pub security: SecurityMode,
    /// The server's private key (`ots-server keygen`), mode 0600.
    pub key: PathBuf,
    /// Former server keys still accepted during a key rotation.
    pub previous_keys: Vec<PathBuf>,
    /// `NAME.pub` per worker allowed to register as NAME.
    pub workers_dir: PathBuf,
    /// `NAME.pub` (and `NAME.role`: submit, operator, admin) per user.
    pub users_dir: PathBuf,
    /// Device health: infrastructure failures, suspicion, health checks.
    pub health: HealthConfig,
    /// Fair share between users and task priority.
    pub fairshare: FairShareConfig,
    /// Devices leased to people: durations, idle holders, bounds.
    pub leases: LeasesConfig,
    /// Webhooks and mail when testruns end or devices go bad.
    pub notify: crate::notify::config::NotifyConfig,
    /// Where the state lives: empty (default) for the embedded SQLite in
    /// `state_dir`; `postgresql://USER@HOST[:PORT]/DB` for PostgreSQL
    /// (what the URL leaves out: `PGHOST`, `PGPORT`, `PGUSER`,
    /// `PGDATABASE`, `PGPASSWORD`).
    pub database: String,
    /// The PostgreSQL password, the file's first line (mode 0600).
    pub database_password_file: Option<PathBuf>,
    /// PEM CA certificates for PostgreSQL's TLS certificate.
    pub database_ca_file: Option<PathBuf>,
    /// A PostgreSQL statement taking longer fails (a commit that fails
    /// makes the server step down to standby, in the same process).
    #[serde(
        rename = "database_statement_timeout",
        deserialize_with = "crate::settings::duration::ms"
    )]
    pub database_statement_timeout_ms: u64,
    /// With PostgreSQL: the leader's lease lasts this long…
    #[serde(
        rename = "lease_ttl",
        deserialize_with = "crate::settings::duration::ms"
    )]
    pub lease_ttl_ms: u64,
    /// …and is renewed this often.
    #[serde(
        rename = "lease_renew",
        deserialize_with = "crate::settings::duration::ms"
    )]
    pub lease_renew_ms: u64,
}
impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            control: "tcp://127.0.0.1:5555".into(),
            events: "tcp://127.0.0.1:5556".into(),
            state_dir: PathBuf::from("/var/lib/ots/server"),
            files_dir: None,
            heartbeat_interval_ms: 1000,
            liveness: 3,
            dispatch_ttl_ms: 30_000,
            lost_grace_ms: 30_000,
            max_attempts: 3,
            queue_timeout_secs: 24 * 3600,
            backstop_grace_secs: 60,
            send_timeout_ms: 2000,
            retry: RetryPolicy::default(),
            limits: ServerLimits::default(),
            retention: Retention::default(),
            history: HistoryConfig::default(),
            results: results::ResultsConfig::default(),
            metrics: String::new(),
            web: String::new(),
            web_tls_cert: None,
            web_tls_key: None,
            web_insecure: false,
            web_url: String::new(),
            web_failure_text: "FAIL".into(),
            web_proxy_user_header: String::new(),
            web_trusted_proxies: vec!["127.0.0.1".into(), "::1".into()],
            log_level: "info".into(),
            security: SecurityMode::Noise,
            key: PathBuf::from("/etc/ots/server.key"),
            previous_keys: Vec::new(),
            workers_dir: PathBuf::from("/etc/ots/workers.d"),
            users_dir: PathBuf::from("/etc/ots/users.d"),
            health: HealthConfig::default(),
            fairshare: FairShareConfig::default(),
            leases: LeasesConfig::default(),
            notify: crate::notify::config::NotifyConfig::default(),
            database: String::new(),
            database_password_file: None,
            database_ca_file: None,
            database_statement_timeout_ms: 10_000,
            lease_ttl_ms: 5000,
            lease_renew_ms: 1000,
        }
    }
}

impl ServerConfig {
    /// Where task logs, result and input files and the audit log live.
    pub fn files_dir(&self) -> PathBuf {
        self.files_dir
            .clone()
            .unwrap_or_else(|| self.state_dir.clone())
    }

    pub fn lease_policy(&self) -> crate::server::lease::LeasePolicy {
        crate::server::lease::LeasePolicy {
            ttl: Duration::from_millis(self.lease_ttl_ms),
            renew: Duration::from_millis(self.lease_renew_ms),
        }
    }

    /// PostgreSQL's settings when `database` names it; none: SQLite.
    pub fn postgres(&self) -> Option<crate::server::store::pg::PgSettings> {
        (!self.database.is_empty()).then(|| crate::server::store::pg::PgSettings {
            url: self.database.clone(),
            password_file: self.database_password_file.clone(),
            ca_file: self.database_ca_file.clone(),
            statement_timeout: Duration::from_millis(self.database_statement_timeout_ms),
            connect_timeout: Duration::from_secs(10),
        })
    }

    /// Loads and validates: defaults, `file`, `OTS_SERVER_*`, then `overrides`.
    pub fn load(file: Option<&Path>, overrides: &[Override]) -> Result<Self, ConfigError> {
        let files: Vec<&Path> = file.into_iter().collect();
        let cfg: ServerConfig = load(
            "OTS_SERVER",
            &files,
            overrides,
            &["previous_keys", "web_trusted_proxies"],
        )?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        check_endpoint("control", &self.control)?;
        let postgres =
            self.database.starts_with("postgresql://") || self.database.starts_with("postgres://");
        if !self.database.is_empty() && !postgres {
            return Err(invalid(
                "database",
                crate::server::store::pg::redact(&self.database),
                "must be empty (the embedded SQLite in state_dir) or postgresql://USER@HOST[:PORT]/DB",
            ));
        }
        if self.lease_renew_ms < 50
            || self.lease_renew_ms.saturating_mul(2) >= self.lease_ttl_ms
            || self.lease_ttl_ms > 600_000
        {
            return Err(invalid(
                "lease_renew",
                self.lease_renew_ms,
                format!("must be at least 50 ms and less than half of lease_ttl ({} ms, at most 10 min)", self.lease_ttl_ms),
            ));
        }
        if !(100..=600_000).contains(&self.database_statement_timeout_ms) {
            return Err(invalid(
                "database_statement_timeout",
                self.database_statement_timeout_ms,
                "must be between 100 ms and 10 min",
            ));
        }
        if !self.metrics.is_empty() && self.metrics.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                "metrics",
                &self.metrics,
                "must be HOST:PORT with a numeric address, e.g. 127.0.0.1:9464 (or empty: off)",
            ));
        }
        check_endpoint("events", &self.events)?;
        self.leases.validate()?;
        self.history.validate()?;
        self.results.validate()?;
        self.web_config()?;
        if self.heartbeat_interval_ms < 10 {
            return Err(invalid(
                "heartbeat_interval_ms",
                self.heartbeat_interval_ms,
                "must be at least 10",
            ));
        }
        if self.liveness < 2 {
            return Err(invalid(
                "liveness",
                self.liveness,
                "must be at least 2 (one missed heartbeat is not a loss)",
            ));
        }
        if self.max_attempts < 1 {
            return Err(invalid(
                "max_attempts",
                self.max_attempts,
                "must be at least 1",
            ));
        }
        if self.dispatch_ttl_ms < self.heartbeat_interval_ms {
            return Err(invalid(
                "dispatch_ttl_ms",
                self.dispatch_ttl_ms,
                "must be at least heartbeat_interval_ms",
            ));
        }
        if self.state_dir.as_os_str().is_empty() {
            return Err(invalid("state_dir", "", "must name a directory"));
        }
        if self
            .files_dir
            .as_ref()
            .is_some_and(|d| d.as_os_str().is_empty())
        {
            return Err(invalid(
                "files_dir",
                "",
                "must name a directory (leave it out for state_dir)",
            ));
        }
        use crate::protocol::limits;
        if !limits::HEARTBEAT_MS.contains(&self.heartbeat_interval_ms) {
            return Err(invalid(
                "heartbeat_interval_ms",
                self.heartbeat_interval_ms,
                "must be 10–60000 (the protocol's limit)",
            ));
        }
        if !limits::LIVENESS.contains(&self.liveness) {
            return Err(invalid("liveness", self.liveness, "must be 2–100"));
        }
        if !limits::TTL_MS.contains(&self.dispatch_ttl_ms) {
            return Err(invalid(
                "dispatch_ttl_ms",
                self.dispatch_ttl_ms,
                "must be at most 86400000 (24 h)",
            ));
        }
        for (key, v) in [
            ("lost_grace_ms", self.lost_grace_ms / 1000),
            ("queue_timeout_secs", self.queue_timeout_secs),
            ("backstop_grace_secs", self.backstop_grace_secs),
            ("send_timeout_ms", self.send_timeout_ms / 1000),
        ] {
            if v > 365 * 24 * 3600 {
                return Err(invalid(key, v, "must be at most a year"));
            }
        }
        self.limits.validate()?;
        self.validate_health()?;
        Ok(())
    }

    /// The keys and allow-lists `security = "noise"` needs, loaded and
    /// checked (a private key others may read is refused, like ssh does).
    pub fn credentials(&self) -> Result<Option<ServerCredentials>, crate::security::SecurityError> {
        if self.security == SecurityMode::None {
            return Ok(None);
        }
        let mut keys = vec![crate::security::KeyPair::read(&self.key)?];
        for k in &self.previous_keys {
            keys.push(crate::security::KeyPair::read(k)?);
        }
        let loaded = crate::security::AllowList::load(&self.workers_dir, &self.users_dir)?;
        // StrictModes: an allow-list someone else could write is not
        // started on (exit 78 with the path and the fix).
        if let Some(e) = loaded
            .untrusted_dirs
            .into_iter()
            .chain(loaded.untrusted_files)
            .next()
        {
            return Err(e);
        }
        Ok(Some(ServerCredentials {
            keys,
            allow: loaded.list,
            refused: loaded.refused,
        }))
    }

    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }

    /// Everything a start would refuse, or skip, that can be checked
    /// without starting: the keys, the allow-lists and the state
    /// directory (`--check-config` prints these and exits 78 if any is
    /// fatal). Each names the file and what to do.
    pub fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        if self.security == SecurityMode::Noise {
            for key in std::iter::once(&self.key).chain(&self.previous_keys) {
                if let Err(e) = crate::security::KeyPair::read(key) {
                    out.push(Problem::fatal(e.to_string()));
                }
            }
            match crate::security::AllowList::load(&self.workers_dir, &self.users_dir) {
                Err(e) => out.push(Problem::fatal(e.to_string())),
                Ok(loaded) => {
                    for e in loaded.untrusted_dirs.iter().chain(&loaded.untrusted_files) {
                        out.push(Problem::fatal(e.to_string()));
                    }
                    for e in &loaded.refused {
                        out.push(Problem::skipped(format!("allow-list entry denied: {e}")));
                    }
                    if loaded.list.is_empty() {
                        out.push(Problem::skipped(format!(
                            "no identity is allowed: {} and {} hold no valid NAME.pub, so no worker or user can connect",
                            self.workers_dir.display(),
                            self.users_dir.display()
                        )));
                    }
                }
            }
        }
        if let Err(e) = self.notify.rules(None) {
            out.push(Problem::fatal(e.to_string()));
        } else if let Err(e) = crate::notify::sender::Sender::from_config(&self.notify) {
            out.push(Problem::fatal(e.to_string()));
        }
        out.extend(writable_dir_problem(&self.state_dir, "state_dir"));
        if self.files_dir.is_some() {
            out.extend(writable_dir_problem(&self.files_dir(), "files_dir"));
        }
        let audit = self.files_dir().join("audit.log");
        if audit.exists()
            && std::fs::OpenOptions::new()
                .append(true)
                .open(&audit)
                .is_err()
        {
            out.push(Problem::fatal(format!(
                "{} cannot be appended to by this user: audit records would be lost; give it to the server's user (chown)",
                audit.display()
            )));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_defaults_are_valid_and_flags_override() {
        let cfg =
            ServerConfig::load(None, &[("control", Some("tcp://127.0.0.1:0".into()))]).unwrap();
        assert_eq!(cfg.control, "tcp://127.0.0.1:0");
        assert_eq!(cfg.liveness, 3);
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = ServerConfig::load(None, &[("control", Some("udp://x".into()))]).unwrap_err();
        assert!(e.to_string().contains("`control`"), "{e}");
        let e = ServerConfig::load(None, &[("liveness", Some("1".into()))]).unwrap_err();
        assert!(e.to_string().contains("`liveness`"), "{e}");
    }

    #[test]
    fn unknown_keys_in_a_file_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.toml");
        std::fs::write(&path, "hearbeat_interval_ms = 5\n").unwrap();
        let e = ServerConfig::load(Some(&path), &[]).unwrap_err();
        assert!(e.to_string().contains("hearbeat_interval_ms"), "{e}");
        std::fs::write(&path, "liveness = \"three\"\n").unwrap();
        let e = ServerConfig::load(Some(&path), &[]).unwrap_err();
        assert!(e.to_string().contains("liveness"), "{e}");
    }

    #[test]
    fn the_shipped_config_files_load() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        ServerConfig::load(Some(&root.join("conf/server.toml")), &[]).unwrap();
    }
}
