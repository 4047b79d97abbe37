//! `ots-worker`'s settings (`conf/worker.toml`, a per-instance file,
//! `OTS_WORKER_…`, flags), loaded by the shared [`crate::settings`]
//! loader.

use crate::delivery::{DeliveryPolicy, OnServerLost, RetryPolicy};
use crate::protocol::DeviceProps;
use crate::security::SecurityMode;
use crate::settings::{
    endpoint_pairs, invalid, load, writable_dir_problem, ConfigError, Override, Problem,
};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `[recovery]` of `conf/worker.toml`: an argument vector (no shell) the
/// worker runs, with `timeout`, before a health check the server sends
/// after a failure — a power cycle through pdudaemon, a USB hub reset.
/// Its output goes into the check's log; a non-zero exit fails the check.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RecoveryConfig {
    pub command: Vec<String>,
    /// Use `[power]`'s cycle as the recovery (instead of `command`).
    pub power_cycle: bool,
    #[serde(
        rename = "timeout",
        deserialize_with = "crate::settings::duration::secs"
    )]
    pub timeout_secs: u64,
}

impl Default for RecoveryConfig {
    fn default() -> Self {
        RecoveryConfig {
            command: Vec::new(),
            power_cycle: false,
            timeout_secs: 300,
        }
    }
}

/// `[power]` of `conf/worker.toml`: argument vectors (no shell) that
/// switch the device on and off, cycle it, and read its state back —
/// a pdudaemon request, a USB relay tool. `status` prints `on` or `off`
/// (its first word, any case; `1`/`0` too); anything else is `unknown`.
/// Without `cycle`, a cycle is `off`, `cycle_delay`, `on`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PowerConfig {
    pub on: Vec<String>,
    pub off: Vec<String>,
    pub cycle: Vec<String>,
    pub status: Vec<String>,
    #[serde(
        rename = "cycle_delay",
        deserialize_with = "crate::settings::duration::ms"
    )]
    pub cycle_delay_ms: u64,
    /// Each command must end within this.
    #[serde(rename = "timeout", deserialize_with = "crate::settings::duration::ms")]
    pub timeout_ms: u64,
}

impl PowerConfig {
    /// Defaults for what a file leaves out.
    pub fn normalized(mut self) -> PowerConfig {
        if self.cycle_delay_ms == 0 {
            self.cycle_delay_ms = 3000;
        }
        if self.timeout_ms == 0 {
            self.timeout_ms = 60_000;
        }
        self
    }
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
    #[serde(deserialize_with = "crate::settings::duration::ms")]
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
    #[serde(deserialize_with = "crate::settings::duration::ms")]
    pub heartbeat_interval_ms: u64,
    /// The server is lost after this many silent heartbeat intervals.
    pub liveness: u32,
    /// One connection attempt gives up after this long.
    #[serde(deserialize_with = "crate::settings::duration::ms")]
    pub connect_timeout_ms: u64,
    /// Reconnect backoff: first delay, cap (randomized, exponential).
    #[serde(deserialize_with = "crate::settings::duration::ms")]
    pub reconnect_min_ms: u64,
    #[serde(deserialize_with = "crate::settings::duration::ms")]
    pub reconnect_max_ms: u64,
    /// Log lines kept while the server is unreachable (oldest dropped first).
    pub log_buffer_lines: usize,
    /// …and at most this many bytes of log text, whatever the conductor's
    /// rate: lines past it are dropped and reported as lost.
    pub log_buffer_bytes: usize,
    /// Log lines are sent in batches at most this old…
    #[serde(deserialize_with = "crate::settings::duration::ms")]
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
    #[serde(deserialize_with = "crate::settings::duration::ms")]
    pub stop_timeout_ms: u64,
    /// Log level (error, warn, info, debug, trace, or a filter such as
    /// `ots=debug`); `RUST_LOG` overrides it.
    pub log_level: String,
    /// The device's serial console (`[serial]`; off without `port`).
    pub serial: crate::worker::task::console::SerialConfig,
    pub conductor: ConductorConfig,
    /// What repairs the device before a health check that follows a
    /// failure (`[recovery]`; off without `command`).
    pub recovery: RecoveryConfig,
    /// Power commands for leases and recovery (`[power]`; none: power
    /// requests answer `unknown`, saying so).
    pub power: PowerConfig,
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
            power: PowerConfig::default(),
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
                "power.on",
                "power.off",
                "power.cycle",
                "power.status",
            ],
        )?;
        cfg.power = cfg.power.normalized();
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
            crate::worker::task::conductor::check_template(arg)
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
    fn bad_values_name_the_key() {
        let e = WorkerConfig::load(None, &[("name", Some("w".into()))]).unwrap_err();
        assert!(e.to_string().contains("device"), "{e}");
    }

    #[test]
    fn the_shipped_config_file_loads() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        WorkerConfig::load(
            Some(&root.join("conf/worker.toml")),
            &[("name", Some("w1".into()))],
        )
        .unwrap();
    }
}
