//! Layered configuration: built-in defaults, then a TOML file, then
//! `OTS_SERVER_…` / `OTS_WORKER_…` environment variables, then flags.
//! Unknown keys and invalid values are refused at start with the key and
//! the reason, so a typo never silently falls back to a default.

use crate::delivery::{DeliveryPolicy, OnServerLost, RetryPolicy};
use crate::protocol::{DeviceProps, DeviceSpecError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {path}: {source}")]
    File {
        path: PathBuf,
        source: config::ConfigError,
    },
    #[error("configuration (file or {prefix}_* environment): {source}")]
    Layer {
        prefix: &'static str,
        source: config::ConfigError,
    },
    #[error("configuration key `{key}` = {value:?}: {reason}")]
    Invalid {
        key: &'static str,
        value: String,
        reason: String,
    },
    #[error("configuration key `device`: {0}")]
    Device(#[from] DeviceSpecError),
    #[error(transparent)]
    Notify(#[from] crate::notify::config::NotifyConfigError),
    #[error("instance configuration {path} does not exist: create it (at least `device = \"devicegroup:…\"` for this worker's device) or drop --instance-config")]
    MissingInstance { path: PathBuf },
}

fn invalid(key: &'static str, value: impl ToString, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// Durations in configuration: a number in the key's unit (`_ms`, `_secs`,
/// `_hours`) or a text such as `30s`, `5m`, `1h 30m`, `2d` (humantime).
pub mod duration {
    use serde::{de, Deserialize, Deserializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Number(u64),
        Text(String),
    }

    fn parse<'de, D: Deserializer<'de>>(d: D, unit_ms: u64) -> Result<u64, D::Error> {
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(n),
            Raw::Text(t) => {
                if let Ok(n) = t.trim().parse::<u64>() {
                    return Ok(n);
                }
                let dur = humantime::parse_duration(t.trim()).map_err(|e| {
                    de::Error::custom(format!(
                        "{t:?} is not a duration ({e}); write e.g. 500ms, 30s, 5m, 1h 30m, 2d or a number"
                    ))
                })?;
                let ms = u64::try_from(dur.as_millis()).unwrap_or(u64::MAX);
                if ms % unit_ms != 0 {
                    return Err(de::Error::custom(format!(
                        "{t:?} is not a whole number of {}",
                        match unit_ms {
                            1000 => "seconds",
                            3_600_000 => "hours",
                            _ => "milliseconds",
                        }
                    )));
                }
                Ok(ms / unit_ms)
            }
        }
    }

    pub fn ms<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        parse(d, 1)
    }

    pub fn secs<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        parse(d, 1000)
    }

    pub fn hours<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        parse(d, 3_600_000)
    }
}

/// The effective configuration `cfg`, one `key = value  # source` line per
/// setting, where source is the layer that set it: `default`, `file PATH`,
/// `env NAME` or `flag`. What `--check-config` prints.
pub fn explain<T: Serialize>(
    cfg: &T,
    prefix: &str,
    files: &[&Path],
    overrides: &[Override],
) -> Vec<String> {
    fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flatten(&key, v, out);
                }
            }
            other => out.push((prefix.to_string(), other.to_string())),
        }
    }
    let mut keys = Vec::new();
    flatten(
        "",
        &serde_json::to_value(cfg).unwrap_or_default(),
        &mut keys,
    );
    let layers: Vec<(String, config::Config)> = files
        .iter()
        .filter(|p| p.is_file())
        .filter_map(|p| {
            config::Config::builder()
                .add_source(config::File::from(*p).format(config::FileFormat::Toml))
                .build()
                .ok()
                .map(|c| (format!("file {}", p.display()), c))
        })
        .collect();
    let env_prefix = format!("{prefix}_");
    let env: Vec<(String, String)> = std::env::vars()
        .filter_map(|(k, _)| {
            let rest = k.strip_prefix(&env_prefix)?;
            Some((rest.to_lowercase().replace("__", "."), k))
        })
        .collect();
    keys.into_iter()
        .map(|(key, value)| {
            let source = if overrides.iter().any(|(k, v)| *k == key && v.is_some()) {
                "flag".to_string()
            } else if let Some((_, name)) = env.iter().find(|(k, _)| *k == key) {
                format!("env {name}")
            } else if let Some((name, _)) = layers
                .iter()
                .rev()
                .find(|(_, c)| c.get::<config::Value>(&key).is_ok())
            {
                name.clone()
            } else {
                "default".to_string()
            };
            format!("{key} = {value}  # {source}")
        })
        .collect()
}

/// A flag given on the command line, applied over file and environment.
pub type Override = (&'static str, Option<String>);

fn load<T: for<'de> Deserialize<'de> + Serialize + Default>(
    prefix: &'static str,
    files: &[&Path],
    overrides: &[Override],
    list_keys: &[&str],
) -> Result<T, ConfigError> {
    let defaults = config::Config::try_from(&T::default())
        .map_err(|source| ConfigError::Layer { prefix, source })?;
    let mut builder = config::Config::builder().add_source(defaults);
    for path in files {
        let path = *path;
        if !path.is_file() {
            return Err(ConfigError::File {
                path: path.to_path_buf(),
                source: config::ConfigError::Message(
                    "file does not exist or is not a regular file".into(),
                ),
            });
        }
        // Parse the file alone first, so its errors name the file.
        config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .build()
            .map_err(|source| ConfigError::File {
                path: path.to_path_buf(),
                source,
            })?;
        builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
    }
    let mut env = config::Environment::with_prefix(prefix)
        .prefix_separator("_")
        .separator("__")
        .try_parsing(true);
    if !list_keys.is_empty() {
        env = env.list_separator(",");
        for k in list_keys {
            env = env.with_list_parse_key(k);
        }
    }
    builder = builder.add_source(env);
    for (key, value) in overrides {
        if let Some(v) = value {
            builder = builder
                .set_override(*key, v.clone())
                .map_err(|source| ConfigError::Layer { prefix, source })?;
        }
    }
    builder
        .build()
        .and_then(|c| c.try_deserialize())
        .map_err(|source| ConfigError::Layer { prefix, source })
}

/// A list of endpoints, `tcp://a:5555, tcp://b:5555`: the servers that
/// may lead (a standby binds nothing until it takes over).
pub fn endpoints(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(str::to_string)
        .collect()
}

/// `server` and `events` as pairs, checked: one events endpoint per
/// server endpoint, in the same order.
pub fn endpoint_pairs(server: &str, events: &str) -> Result<Vec<(String, String)>, ConfigError> {
    let (s, e) = (endpoints(server), endpoints(events));
    if s.is_empty() {
        return Err(invalid("server", server, "names no endpoint"));
    }
    if s.len() > 16 {
        return Err(invalid("server", server, "lists more than 16 endpoints"));
    }
    if s.len() != e.len() {
        return Err(invalid(
            "events",
            events,
            format!(
                "lists {} endpoints for the {} of `server`: give one events endpoint per server, in the same order",
                e.len(),
                s.len()
            ),
        ));
    }
    for (a, b) in s.iter().zip(&e) {
        check_endpoint("server", a)?;
        check_endpoint("events", b)?;
    }
    Ok(s.into_iter().zip(e).collect())
}

fn check_endpoint(key: &'static str, ep: &str) -> Result<(), ConfigError> {
    let rest = ep.strip_prefix("tcp://").ok_or_else(|| {
        invalid(
            key,
            ep,
            "must be tcp://HOST:PORT (the zeromq crate supports tcp here)",
        )
    })?;
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| invalid(key, ep, "must be tcp://HOST:PORT"))?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(invalid(
            key,
            ep,
            "must be tcp://HOST:PORT with a port number 0–65535",
        ));
    }
    Ok(())
}

/// `[recovery]` of `conf/worker.toml`: an argument vector (no shell) the
/// worker runs, with `timeout`, before a health check the server sends
/// after a failure — a power cycle through pdudaemon, a USB hub reset.
/// Its output goes into the check's log; a non-zero exit fails the check.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RecoveryConfig {
    pub command: Vec<String>,
    #[serde(rename = "timeout", deserialize_with = "crate::config::duration::secs")]
    pub timeout_secs: u64,
}

impl Default for RecoveryConfig {
    fn default() -> Self {
        RecoveryConfig {
            command: Vec::new(),
            timeout_secs: 300,
        }
    }
}

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
    #[serde(deserialize_with = "crate::config::duration::ms")]
    pub heartbeat_interval_ms: u64,
    /// A worker is lost after this many silent heartbeat intervals.
    pub liveness: u32,
    /// A dispatch not started within this is stale.
    #[serde(deserialize_with = "crate::config::duration::ms")]
    pub dispatch_ttl_ms: u64,
    /// How long a lost worker's task is held for it.
    #[serde(deserialize_with = "crate::config::duration::ms")]
    pub lost_grace_ms: u64,
    pub max_attempts: u32,
    #[serde(deserialize_with = "crate::config::duration::secs")]
    pub queue_timeout_secs: u64,
    #[serde(deserialize_with = "crate::config::duration::secs")]
    pub backstop_grace_secs: u64,
    /// A send to one peer that does not complete within this is dropped and
    /// counted, so one stuck peer cannot stall the server.
    #[serde(deserialize_with = "crate::config::duration::ms")]
    pub send_timeout_ms: u64,
    /// Resend timing of the server's mandatory messages (dispatch, cancel).
    pub retry: RetryPolicy,
    /// Bounds on what peers can make the server hold (README "Limits").
    pub limits: ServerLimits,
    /// How long ended testruns keep their result files and logs.
    pub retention: Retention,
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
    /// A PostgreSQL statement taking longer fails, and stops the server.
    #[serde(
        rename = "database_statement_timeout",
        deserialize_with = "crate::config::duration::ms"
    )]
    pub database_statement_timeout_ms: u64,
    /// With PostgreSQL: the leader's lease lasts this long…
    #[serde(rename = "lease_ttl", deserialize_with = "crate::config::duration::ms")]
    pub lease_ttl_ms: u64,
    /// …and is renewed this often.
    #[serde(
        rename = "lease_renew",
        deserialize_with = "crate::config::duration::ms"
    )]
    pub lease_renew_ms: u64,
}

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
        deserialize_with = "crate::config::duration::secs"
    )]
    pub retry_min_secs: u64,
    #[serde(
        rename = "retry_max",
        deserialize_with = "crate::config::duration::secs"
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
    #[serde(rename = "timeout", deserialize_with = "crate::config::duration::secs")]
    pub timeout_secs: u64,
    /// A `good` worker is checked again this long after its last check
    /// (default 24 h).
    #[serde(
        rename = "interval",
        deserialize_with = "crate::config::duration::secs"
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
        deserialize_with = "crate::config::duration::secs"
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
    #[serde(deserialize_with = "crate::config::duration::hours")]
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

/// Whether peers authenticate and frames are encrypted (PROTOCOL.md §15).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SecurityMode {
    #[default]
    Noise,
    None,
}

/// `[limits]` of `conf/server.toml`: every bound on what a peer can make
/// the server hold or do. README's Limits table says what a peer sees at
/// each one.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerLimits {
    /// Connections per endpoint (control, events), handshaking or not.
    /// Also capped at start to fit the process's file descriptor limit.
    pub max_connections: usize,
    /// A connection must finish the ZMTP handshake within this.
    #[serde(deserialize_with = "crate::config::duration::ms")]
    pub handshake_timeout_ms: u64,
    /// A control connection that sends nothing for this long is closed
    /// (workers heartbeat every second, clients poll every second).
    #[serde(deserialize_with = "crate::config::duration::ms")]
    pub idle_timeout_ms: u64,
    /// Messages queued to one peer; past it, sends to it are dropped and
    /// counted (`send_dropped_peer_busy`), never waited for.
    pub peer_send_queue: usize,
    /// …and bytes queued to one peer (the memory a peer that stops
    /// reading can hold); past it, the same.
    pub peer_send_queue_bytes: usize,
    /// Received messages waiting for the scheduler; when full, reading
    /// pauses (TCP back-pressure), fairly across peers.
    pub inbound_queue: usize,
    /// …and their bytes: what a burst from many workers can hold in the
    /// server's memory however large their messages are.
    pub inbound_queue_bytes: usize,
    /// Unfinished tasks in all; a submit past it gets `limit_reached`.
    pub max_open_tasks: usize,
    /// …and per user (with security): a user's submit past its own quota
    /// is refused naming it; held below `max_open_tasks` (lowered to
    /// `max_open_tasks - 1` if set higher), so no single user can fill the
    /// server's bound.
    pub max_open_tasks_per_owner: usize,
    /// Unfinished testruns per user.
    pub max_open_runs_per_owner: usize,
    /// Stored log bytes per task attempt; lines past it are dropped and
    /// counted.
    pub max_task_log_bytes: u64,
    /// Separate runs of received log line numbers per task attempt.
    pub max_log_gaps: usize,
    /// Largest result file, and all result files of one task attempt.
    pub max_file_bytes: u64,
    pub max_task_file_bytes: u64,
    /// All stored result files together (the result area's quota): an
    /// offer that would exceed it is refused before any byte is sent.
    pub max_stored_file_bytes: u64,
    /// Credit one upload gets at most: bytes a worker may send ahead of
    /// what the server has written.
    pub file_window_bytes: u64,
    /// Credit all uploads together hold at most: the memory between the
    /// sockets and the disk, whatever the number of uploads.
    pub file_buffer_bytes: u64,
    /// Worker refusals of one task (busy, expired) before it ends in ERROR.
    pub max_refusals: u32,
    /// Worker names the registry holds; a new name past it is refused.
    pub max_workers: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        let s = crate::server::scheduler::SchedulerLimits::default();
        let t = crate::transport::SocketLimits::default();
        ServerLimits {
            max_connections: t.max_connections,
            handshake_timeout_ms: t.handshake_timeout.as_millis() as u64,
            idle_timeout_ms: 120_000,
            peer_send_queue: t.peer_send_queue,
            peer_send_queue_bytes: t.peer_send_bytes,
            inbound_queue: 4096,
            inbound_queue_bytes: 16 * 1024 * 1024,
            max_open_tasks: s.max_open_tasks,
            max_open_tasks_per_owner: s.max_open_tasks_per_owner,
            max_open_runs_per_owner: s.max_open_runs_per_owner,
            max_task_log_bytes: s.max_task_log_bytes,
            max_log_gaps: s.max_log_gaps,
            max_file_bytes: s.max_file_bytes,
            max_task_file_bytes: s.max_task_file_bytes,
            max_stored_file_bytes: s.max_stored_file_bytes,
            file_window_bytes: s.file_window_bytes,
            file_buffer_bytes: s.file_buffer_bytes,
            max_refusals: s.max_refusals,
            max_workers: s.max_workers,
        }
    }
}

impl ServerLimits {
    pub fn scheduler(&self) -> crate::server::scheduler::SchedulerLimits {
        crate::server::scheduler::SchedulerLimits {
            max_open_tasks: self.max_open_tasks,
            // Below the server's bound whatever is configured: no single
            // user may fill it.
            max_open_tasks_per_owner: self
                .max_open_tasks_per_owner
                .min(self.max_open_tasks.saturating_sub(1).max(1)),
            max_open_runs_per_owner: self.max_open_runs_per_owner,
            max_task_log_bytes: self.max_task_log_bytes,
            max_log_gaps: self.max_log_gaps,
            max_file_bytes: self.max_file_bytes,
            max_task_file_bytes: self.max_task_file_bytes,
            max_stored_file_bytes: self.max_stored_file_bytes,
            file_window_bytes: self.file_window_bytes,
            file_buffer_bytes: self.file_buffer_bytes,
            max_refusals: self.max_refusals,
            max_workers: self.max_workers,
        }
    }

    pub fn sockets(&self) -> crate::transport::SocketLimits {
        crate::transport::SocketLimits {
            max_message_bytes: crate::transport::MAX_WIRE_MESSAGE_BYTES,
            max_connections: self.max_connections,
            handshake_timeout: Duration::from_millis(self.handshake_timeout_ms),
            peer_send_queue: self.peer_send_queue,
            peer_send_bytes: self.peer_send_queue_bytes,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let positive: [(&'static str, u64); 18] = [
            ("limits.max_workers", self.max_workers as u64),
            (
                "limits.peer_send_queue_bytes",
                self.peer_send_queue_bytes as u64,
            ),
            ("limits.max_connections", self.max_connections as u64),
            ("limits.handshake_timeout_ms", self.handshake_timeout_ms),
            ("limits.idle_timeout_ms", self.idle_timeout_ms),
            ("limits.peer_send_queue", self.peer_send_queue as u64),
            ("limits.inbound_queue", self.inbound_queue as u64),
            (
                "limits.inbound_queue_bytes",
                self.inbound_queue_bytes as u64,
            ),
            ("limits.max_open_tasks", self.max_open_tasks as u64),
            (
                "limits.max_open_tasks_per_owner",
                self.max_open_tasks_per_owner as u64,
            ),
            (
                "limits.max_open_runs_per_owner",
                self.max_open_runs_per_owner as u64,
            ),
            ("limits.max_task_log_bytes", self.max_task_log_bytes),
            ("limits.max_log_gaps", self.max_log_gaps as u64),
            ("limits.max_file_bytes", self.max_file_bytes),
            ("limits.max_task_file_bytes", self.max_task_file_bytes),
            ("limits.max_stored_file_bytes", self.max_stored_file_bytes),
            ("limits.file_window_bytes", self.file_window_bytes),
            ("limits.file_buffer_bytes", self.file_buffer_bytes),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(invalid(key, v, "must be at least 1"));
            }
        }
        if self.max_file_bytes > crate::protocol::limits::MAX_FILE_BYTES {
            return Err(invalid(
                "limits.max_file_bytes",
                self.max_file_bytes,
                format!(
                    "must be at most {} (the protocol's limit)",
                    crate::protocol::limits::MAX_FILE_BYTES
                ),
            ));
        }
        Ok(())
    }
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
            metrics: String::new(),
            web: String::new(),
            web_tls_cert: None,
            web_tls_key: None,
            web_insecure: false,
            web_url: String::new(),
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
    pub fn postgres(&self) -> Option<crate::server::pg::PgSettings> {
        (!self.database.is_empty()).then(|| crate::server::pg::PgSettings {
            url: self.database.clone(),
            password_file: self.database_password_file.clone(),
            ca_file: self.database_ca_file.clone(),
            statement_timeout: Duration::from_millis(self.database_statement_timeout_ms),
            connect_timeout: Duration::from_secs(10),
        })
    }

    /// The web dashboard's settings, checked; none when `web` is empty.
    pub fn web_config(&self) -> Result<Option<crate::web::WebConfig>, ConfigError> {
        if self.web.is_empty() {
            return Ok(None);
        }
        let addr: std::net::SocketAddr = self.web.parse().map_err(|_| {
            invalid(
                "web",
                &self.web,
                "must be HOST:PORT with a numeric address, e.g. 127.0.0.1:8080 (or empty: off)",
            )
        })?;
        let tls = match (&self.web_tls_cert, &self.web_tls_key) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            (None, None) => None,
            (Some(c), None) => {
                return Err(invalid(
                    "web_tls_key",
                    "",
                    format!(
                        "web_tls_cert is set ({}) but web_tls_key is not: set both or neither",
                        c.display()
                    ),
                ))
            }
            (None, Some(k)) => {
                return Err(invalid(
                    "web_tls_cert",
                    "",
                    format!(
                        "web_tls_key is set ({}) but web_tls_cert is not: set both or neither",
                        k.display()
                    ),
                ))
            }
        };
        if !addr.ip().is_loopback() && tls.is_none() && !self.web_insecure {
            return Err(invalid(
                "web",
                &self.web,
                "is not a loopback address: set web_tls_cert and web_tls_key (HTTPS), or bind 127.0.0.1 behind a reverse proxy, or set web_insecure = true to send session cookies in the clear",
            ));
        }
        let url = if self.web_url.is_empty() {
            None
        } else {
            let ok = (self.web_url.starts_with("http://") || self.web_url.starts_with("https://"))
                && self.web_url.len() <= 200
                && self.web_url.bytes().all(|b| b.is_ascii_graphic());
            if !ok {
                return Err(invalid(
                    "web_url",
                    &self.web_url,
                    "must be the dashboard's address as browsers reach it: http(s)://HOST[:PORT][/PATH], at most 200 characters",
                ));
            }
            Some(self.web_url.clone())
        };
        let proxy_user_header = if self.web_proxy_user_header.is_empty() {
            None
        } else {
            if axum::http::HeaderName::from_bytes(self.web_proxy_user_header.as_bytes()).is_err() {
                return Err(invalid(
                    "web_proxy_user_header",
                    &self.web_proxy_user_header,
                    "must be an HTTP header name, e.g. X-Remote-User",
                ));
            }
            Some(self.web_proxy_user_header.clone())
        };
        let mut trusted_proxies = Vec::new();
        for p in &self.web_trusted_proxies {
            trusted_proxies.push(p.parse().map_err(|_| {
                invalid(
                    "web_trusted_proxies",
                    p,
                    "must be a list of IP addresses, e.g. [\"127.0.0.1\", \"::1\"]",
                )
            })?);
        }
        Ok(Some(crate::web::WebConfig {
            addr,
            tls,
            url,
            proxy_user_header,
            trusted_proxies,
            secure: self.security != SecurityMode::None,
        }))
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
                crate::server::pg::redact(&self.database),
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

    fn validate_health(&self) -> Result<(), ConfigError> {
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

/// One thing `--check-config` found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// A start would refuse it (exit 78).
    pub fatal: bool,
    pub message: String,
}

/// Prints what `--check-config` found, one line each; the exit status: 78
/// when a start would refuse, 0 otherwise.
pub fn report_problems(problems: &[Problem]) -> std::process::ExitCode {
    for p in problems {
        println!(
            "{}: {}",
            if p.fatal { "error" } else { "warning" },
            p.message
        );
    }
    if problems.iter().any(|p| p.fatal) {
        std::process::ExitCode::from(78)
    } else {
        std::process::ExitCode::SUCCESS
    }
}

impl Problem {
    fn fatal(message: String) -> Self {
        Problem {
            fatal: true,
            message,
        }
    }

    fn skipped(message: String) -> Self {
        Problem {
            fatal: false,
            message,
        }
    }
}

/// Whether a state directory can be made and written by this user.
fn writable_dir_problem(dir: &Path, key: &str) -> Option<Problem> {
    let probe = if dir.exists() {
        dir.to_path_buf()
    } else {
        dir.ancestors().find(|a| a.exists())?.to_path_buf()
    };
    if nix::unistd::access(
        &probe,
        nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
    )
    .is_err()
    {
        use std::os::unix::fs::MetadataExt;
        let owner = std::fs::metadata(&probe).map(|m| m.uid()).unwrap_or(0);
        return Some(Problem::fatal(format!(
            "{key} {}: {} is not writable by this user (uid {}; it is owned by uid {owner}); give it to the service's user or choose another {key}",
            dir.display(),
            probe.display(),
            nix::unistd::geteuid()
        )));
    }
    None
}

/// How the worker runs a task (`[conductor]` in `conf/worker.toml`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConductorConfig {
    /// Argument vector template; no shell. Placeholders: `{image}`,
    /// `{packages}` (comma-separated), `{packages...}` (one argument per
    /// package), `{results_dir}`, `{work_dir}`, `{task_id}`, `{run_id}`,
    /// `{attempt}`, `{timeout}`, `{device_group}`, `{device_name}`,
    /// `{device_id}`, `{option:NAME}`.
    pub command: Vec<String>,
    /// Globs, relative to the task's results folder, of files to upload.
    pub result_globs: Vec<String>,
    /// Between TERM and KILL of the conductor's process group.
    #[serde(deserialize_with = "crate::config::duration::ms")]
    pub kill_grace_ms: u64,
    /// Largest result file uploaded, and all result files of one task;
    /// larger ones are skipped with a line in the task's log.
    pub max_result_file_bytes: u64,
    pub max_result_bytes: u64,
}

impl Default for ConductorConfig {
    fn default() -> Self {
        ConductorConfig {
            command: vec![
                "examples/conductor.sh".into(),
                "--image".into(),
                "{image}".into(),
                "--packages".into(),
                "{packages}".into(),
                "--results".into(),
                "{results_dir}".into(),
            ],
            result_globs: vec!["**/*".into()],
            kill_grace_ms: 5000,
            max_result_file_bytes: 16 << 30,
            max_result_bytes: 64 << 30,
        }
    }
}

/// What a worker does with its running task when it is asked to stop.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StopPolicy {
    #[default]
    Finish,
    Abort,
}

/// `ots-worker` configuration (`conf/worker.toml`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Logical worker name, unique per server.
    pub name: String,
    /// The server's control (ROUTER) endpoint, or a comma-separated
    /// list of the servers that may lead (tried in turn).
    pub server: String,
    /// The server's events (PUB) endpoint; with a list in `server`, a
    /// list of as many, in the same order.
    pub events: String,
    /// `devicegroup:X [devicename:Y] [deviceid:Z]` of the device this worker owns.
    pub device: String,
    /// Per-task working folders live here.
    pub state_dir: PathBuf,
    #[serde(deserialize_with = "crate::config::duration::ms")]
    pub heartbeat_interval_ms: u64,
    /// The server is lost after this many silent heartbeat intervals.
    pub liveness: u32,
    /// One connection attempt gives up after this long.
    #[serde(deserialize_with = "crate::config::duration::ms")]
    pub connect_timeout_ms: u64,
    /// Reconnect backoff: first delay, cap (randomized, exponential).
    #[serde(deserialize_with = "crate::config::duration::ms")]
    pub reconnect_min_ms: u64,
    #[serde(deserialize_with = "crate::config::duration::ms")]
    pub reconnect_max_ms: u64,
    /// Log lines kept while the server is unreachable (oldest dropped first).
    pub log_buffer_lines: usize,
    /// …and at most this many bytes of log text, whatever the conductor's
    /// rate: lines past it are dropped and reported as lost.
    pub log_buffer_bytes: usize,
    /// Log lines are sent in batches at most this old…
    #[serde(deserialize_with = "crate::config::duration::ms")]
    pub log_batch_ms: u64,
    /// …or as soon as this many lines wait (a batch is at most 256 KiB of
    /// text, however many lines that is).
    pub log_batch_lines: usize,
    /// Resend timing of mandatory messages.
    pub retry: RetryPolicy,
    /// Delivery policy per message class.
    pub delivery: DeliveryPolicy,
    /// `continue` (default) or `abort` a running task when the server is lost.
    pub on_server_lost: OnServerLost,
    /// Result files are sent in chunks of this many bytes (4 KiB – 4 MiB;
    /// default 1 MiB: per GiB uploaded, 256 KiB chunks cost the worker 12 %
    /// and the server 30 % more CPU in `cargo bench --bench files`)…
    pub file_chunk_bytes: u64,
    /// …with at most this many bytes read ahead of what was sent (the
    /// server's credit bounds what is in flight). Kept below the 2 MiB the
    /// worker's socket queues towards the server, so a full queue is rare.
    pub file_window_bytes: u64,
    /// Folders of finished tasks kept (for debugging) once their results
    /// are delivered; older ones are removed.
    pub keep_task_dirs: usize,
    /// On SIGTERM: `finish` (default) lets the running task end and
    /// delivers its results before exiting, at most `stop_timeout_ms`
    /// (then it is stopped and reported interrupted); `abort` stops it at
    /// once and reports it interrupted (the server re-queues it).
    pub stop_policy: StopPolicy,
    #[serde(deserialize_with = "crate::config::duration::ms")]
    pub stop_timeout_ms: u64,
    /// Log level (error, warn, info, debug, trace, or a filter such as
    /// `ots=debug`); `RUST_LOG` overrides it.
    pub log_level: String,
    /// The device's serial console (`[serial]`; off without `port`).
    pub serial: crate::worker::console::SerialConfig,
    pub conductor: ConductorConfig,
    /// What repairs the device before a health check that follows a
    /// failure (`[recovery]`; off without `command`).
    pub recovery: RecoveryConfig,
    /// `noise` (default) or `none` (must match the server).
    pub security: SecurityMode,
    /// This worker's private key (`ots-worker keygen`), mode 0600; its
    /// public half is `workers.d/NAME.pub` on the server. `{name}` stands
    /// for the worker's name, so every instance on a host with several
    /// devices finds its own key (`/etc/ots/worker.d/{name}.key`).
    pub key: PathBuf,
    /// The server's public key, pinned: a server without its private half
    /// cannot complete the handshake.
    pub server_key: PathBuf,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            name: String::new(),
            server: "tcp://127.0.0.1:5555".into(),
            events: "tcp://127.0.0.1:5556".into(),
            device: String::new(),
            state_dir: PathBuf::from("/var/lib/ots/worker"),
            heartbeat_interval_ms: 1000,
            liveness: 3,
            connect_timeout_ms: 2000,
            reconnect_min_ms: 100,
            reconnect_max_ms: 2000,
            log_buffer_lines: 100_000,
            log_buffer_bytes: 16 * 1024 * 1024,
            log_batch_ms: 20,
            log_batch_lines: 500,
            retry: RetryPolicy::default(),
            delivery: DeliveryPolicy::default(),
            on_server_lost: OnServerLost::default(),
            file_chunk_bytes: 1024 * 1024,
            file_window_bytes: 1024 * 1024,
            keep_task_dirs: 3,
            stop_policy: StopPolicy::Finish,
            stop_timeout_ms: 600_000,
            log_level: "info".into(),
            serial: Default::default(),
            conductor: ConductorConfig::default(),
            recovery: RecoveryConfig::default(),
            security: SecurityMode::Noise,
            key: PathBuf::from("/etc/ots/worker.d/{name}.key"),
            server_key: PathBuf::from("/etc/ots/server.pub"),
        }
    }
}

impl WorkerConfig {
    /// Loads and validates: defaults, `file`, `OTS_WORKER_*`, then `overrides`.
    pub fn load(file: Option<&Path>, overrides: &[Override]) -> Result<Self, ConfigError> {
        Self::load_layered(file, None, overrides)
    }

    /// Loads `file`, then the per-instance `instance` file over it
    /// (`/etc/ots/worker.d/NAME.toml` names one worker's device: it must
    /// exist — a worker silently serving the default device is worse than
    /// one that does not start), then `OTS_WORKER_*`, then `overrides`.
    pub fn load_layered(
        file: Option<&Path>,
        instance: Option<&Path>,
        overrides: &[Override],
    ) -> Result<Self, ConfigError> {
        if let Some(path) = instance.filter(|p| !p.exists()) {
            return Err(ConfigError::MissingInstance {
                path: path.to_path_buf(),
            });
        }
        let files: Vec<&Path> = file.into_iter().chain(instance).collect();
        let mut cfg: WorkerConfig = load(
            "OTS_WORKER",
            &files,
            overrides,
            &[
                "conductor.command",
                "conductor.result_globs",
                "recovery.command",
            ],
        )?;
        // The conductor runs in a fresh working folder, so a relative
        // program path is resolved now, against ots-worker's own.
        if let Some(program) = cfg.conductor.command.first_mut() {
            if program.contains('/') && Path::new(program.as_str()).is_relative() {
                if let Ok(cwd) = std::env::current_dir() {
                    *program = cwd.join(program.as_str()).display().to_string();
                }
            }
        }
        cfg.validate()?;
        if let Some(program) = cfg.conductor.command.first() {
            if program.contains('/') && !Path::new(program).is_file() {
                return Err(invalid(
                    "conductor.command",
                    program,
                    "no such program file",
                ));
            }
        }
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !crate::protocol::limits::is_safe_id(&self.name) {
            return Err(invalid(
                "name",
                &self.name,
                "must be 1–64 characters of A–Z a–z 0–9 . _ - not starting with . or - (set it with --name)",
            ));
        }
        endpoint_pairs(&self.server, &self.events)?;
        self.device_props()?;
        if self.heartbeat_interval_ms < 10 {
            return Err(invalid(
                "heartbeat_interval_ms",
                self.heartbeat_interval_ms,
                "must be at least 10",
            ));
        }
        if self.liveness < 2 {
            return Err(invalid("liveness", self.liveness, "must be at least 2"));
        }
        if self.reconnect_min_ms == 0 || self.reconnect_max_ms < self.reconnect_min_ms {
            return Err(invalid(
                "reconnect_max_ms",
                self.reconnect_max_ms,
                "must be ≥ reconnect_min_ms > 0",
            ));
        }
        if self.log_batch_lines == 0 {
            return Err(invalid("log_batch_lines", 0, "must be at least 1"));
        }
        if self.log_buffer_lines == 0 || self.log_buffer_bytes < 64 * 1024 {
            return Err(invalid(
                "log_buffer_bytes",
                self.log_buffer_bytes,
                "log_buffer_lines must be at least 1 and log_buffer_bytes at least 65536",
            ));
        }
        let max_chunk = crate::protocol::codec::MAX_RAW_BYTES as u64;
        if !(4096..=max_chunk).contains(&self.file_chunk_bytes) {
            return Err(invalid(
                "file_chunk_bytes",
                self.file_chunk_bytes,
                format!("must be between 4096 and {max_chunk}"),
            ));
        }
        if self.file_window_bytes < self.file_chunk_bytes || self.file_window_bytes > 64 << 20 {
            return Err(invalid(
                "file_window_bytes",
                self.file_window_bytes,
                "must be at least file_chunk_bytes and at most 64 MiB",
            ));
        }
        self.serial
            .validate()
            .map_err(|reason| invalid("serial", &self.serial.port, reason))?;
        if self.conductor.command.is_empty() {
            return Err(invalid(
                "conductor.command",
                "[]",
                "must name the conductor program",
            ));
        }
        for arg in &self.conductor.command {
            crate::worker::conductor::check_template(arg)
                .map_err(|reason| invalid("conductor.command", arg, reason))?;
        }
        for g in &self.conductor.result_globs {
            glob::Pattern::new(g)
                .map_err(|e| invalid("conductor.result_globs", g, e.to_string()))?;
        }
        Ok(())
    }

    pub fn device_props(&self) -> Result<DeviceProps, ConfigError> {
        if self.device.trim().is_empty() {
            return Err(invalid(
                "device",
                "",
                "must give the device, e.g. \"devicegroup:n900\" (set it with --device)",
            ));
        }
        Ok(DeviceProps::parse(&self.device)?)
    }

    /// This worker's key and the pinned server key, loaded and checked.
    /// What `--check-config` reports for a worker: its keys and state
    /// directory, and secrets in the conductor's arguments (not fatal).
    pub fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        if let Err(e) = self.credentials() {
            out.push(Problem::fatal(e.to_string()));
        }
        out.extend(writable_dir_problem(&self.state_dir, "state_dir"));
        for w in self.secret_argv_warnings() {
            out.push(Problem::skipped(w));
        }
        out
    }

    /// The private key file, `{name}` replaced by this worker's name.
    pub fn key_path(&self) -> PathBuf {
        PathBuf::from(self.key.display().to_string().replace("{name}", &self.name))
    }

    /// Warnings about `{secret:NAME}` in the conductor's argument vector:
    /// an argument is readable by every local user (/proc/PID/cmdline);
    /// the environment variable `OTS_SECRET_NAME` is not.
    pub fn secret_argv_warnings(&self) -> Vec<String> {
        self.conductor
            .command
            .iter()
            .enumerate()
            .filter_map(|(i, arg)| {
                let name = arg.split("{secret:").nth(1)?.split('}').next()?;
                Some(format!(
                    "conductor.command[{i}] passes {{secret:{name}}} as an argument, which every local user can read in /proc/PID/cmdline while the conductor runs; have the conductor read the environment variable OTS_SECRET_{} instead",
                    name.to_ascii_uppercase().replace(['-', '.'], "_")
                ))
            })
            .collect()
    }

    pub fn credentials(
        &self,
    ) -> Result<crate::security::Credentials, crate::security::SecurityError> {
        match self.security {
            SecurityMode::None => Ok(crate::security::Credentials::None),
            SecurityMode::Noise => Ok(crate::security::Credentials::Noise {
                key: crate::security::KeyPair::read(&self.key_path())?,
                server: crate::security::PublicKey::read(&self.server_key)?,
            }),
        }
    }

    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
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
        let e = WorkerConfig::load(None, &[("name", Some("w".into()))]).unwrap_err();
        assert!(e.to_string().contains("device"), "{e}");
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
        WorkerConfig::load(
            Some(&root.join("conf/worker.toml")),
            &[("name", Some("w1".into()))],
        )
        .unwrap();
    }
}
