//! What a testrun is asked with and what one task of it is: the request,
//! its distribution and priority, the task spec a worker runs, log lines,
//! the outcome and the files it reports. Wire data (field names are the
//! wire names).

use crate::protocol::device::DeviceSpec;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Identifies a testrun; unique per server state directory.
pub type RunId = String;
/// Identifies a task: `<run>.<n>`, n counting from 1.
pub type TaskId = String;

/// How a testrun is split into tasks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Distribution {
    /// One task runs all packages.
    #[default]
    Default,
    /// One task per test package, spread over matching workers.
    Perpackage,
}

impl std::str::FromStr for Distribution {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "default" => Ok(Distribution::Default),
            "perpackage" => Ok(Distribution::Perpackage),
            other => Err(format!(
                "unknown distribution model {other:?}; use default or perpackage"
            )),
        }
    }
}

/// What a developer submits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestrunRequest {
    pub device: DeviceSpec,
    /// Further device specs (the original OTS trigger's `;`-separated
    /// list): the packages run on `device` and on each of these in
    /// parallel, and the verdict is over all of them. At most
    /// `limits::MAX_DEVICE_SPECS` specs in all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceSpec>,
    /// Image URL or path handed to the conductor as `{image}`.
    pub image: String,
    pub packages: Vec<String>,
    pub distribution: Distribution,
    /// Execution timeout of each task, in seconds.
    pub timeout_secs: u64,
    /// Free-form options, available to the conductor as `{option:NAME}`.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// Queue even if no known worker could ever match the device spec.
    #[serde(default)]
    pub queue_anyway: bool,
    /// Options only the worker running a task sees, as `{secret:NAME}` and
    /// `OTS_SECRET_NAME` (PROTOCOL.md §15.6): never in status, events, the
    /// audit log or the stored log (the worker masks them in the output).
    /// A server without security refuses them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, String>,
    /// Input files the conductor of every task finds under
    /// `{inputs_dir}`, each uploaded before the submit (`input_offer`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<InputFile>,
    /// Who submitted the testrun: set by the server from the authenticated
    /// identity (whatever a client sends here is overwritten); nil without
    /// security.
    #[serde(default)]
    pub owner: Option<String>,
    /// Order among its owner's queued tasks (PROTOCOL.md §5.4): `high`
    /// needs role operator or admin.
    #[serde(default, skip_serializing_if = "Priority::is_normal")]
    pub priority: Priority,
    /// Who is told when it ends (README "Notifications"), besides the
    /// operator's targets: a configured target's name, `mailto:ADDR`, or
    /// a URL that `notify.allow_urls` allows; at most 4.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notify: Vec<String>,
    /// Set by the server for a lease (`reserve`, PROTOCOL.md §18): the
    /// testrun is one task holding a device for a person. A `submit`
    /// carrying it is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<Box<crate::protocol::leasing::LeaseTerms>>,
    /// Run at once on the device of this lease (`run --lease`), which the
    /// submitter holds: no queue; the lease's consoles stay attached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_lease: Option<crate::protocol::leasing::LeaseId>,
    /// The series it belongs to (PROTOCOL.md §5.6): its results are
    /// compared with the series' earlier runs. A safe id; when absent
    /// the server names it after its device specs, packages and options
    /// ([`TestrunRequest::default_series`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub series: Option<String>,
}

/// A testrun's standing among its owner's queued tasks.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Low,
    #[default]
    Normal,
    High,
}

impl TestrunRequest {
    /// Every device spec of the testrun, `device` first.
    pub fn all_devices(&self) -> impl Iterator<Item = &DeviceSpec> {
        std::iter::once(&self.device).chain(&self.devices)
    }

    /// The series a testrun without `series` belongs to: `s-` and 16 hex
    /// digits of the SHA-256 of its device specs, packages and options
    /// (not its image, secrets, owner or timeout), so runs of one
    /// configuration on successive images form one series.
    pub fn default_series(&self) -> String {
        use sha2::{Digest, Sha256};
        let shape = (
            self.all_devices().collect::<Vec<_>>(),
            &self.packages,
            self.distribution,
            &self.options,
        );
        let bytes = rmp_serde::to_vec(&shape).unwrap_or_default();
        let digest = Sha256::digest(&bytes);
        format!("s-{}", hex::encode(&digest[..8]))
    }

    /// Its series: as chosen, or [`TestrunRequest::default_series`].
    pub fn series_name(&self) -> String {
        self.series.clone().unwrap_or_else(|| self.default_series())
    }
}

impl Priority {
    pub fn is_normal(&self) -> bool {
        *self == Priority::Normal
    }
}

/// What an operator does to a worker's health (`worker_health`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthAction {
    /// Run a health check now.
    Check,
    MaintenanceOn,
    /// Out of maintenance (or retirement): `unknown`, checked again.
    MaintenanceOff,
    Retire,
}

/// One task as the worker receives it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSpec {
    pub task: TaskId,
    pub run: RunId,
    /// 1 for the first attempt; higher when re-queued after a lost worker.
    pub attempt: u32,
    pub image: String,
    pub packages: Vec<String>,
    pub timeout_secs: u64,
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// Time to live of this dispatch, in ms: a worker MUST NOT start the
    /// task later than this after the dispatch arrived, measured on its own
    /// monotonic clock, plus the delay in transit it can estimate (see
    /// `sent_ms`). Relative, so expiry never depends on two machines
    /// agreeing on wall time.
    pub ttl_ms: u64,
    /// Server wall clock (Unix ms) when the dispatch was first sent. Only
    /// ever compared with `server_heartbeat.sent_ms` of the same server,
    /// never with the worker's clock directly; 0 if unknown.
    #[serde(default)]
    pub sent_ms: u64,
    /// The testrun's input files, fetched by the worker (`get_input`)
    /// into the task's inputs folder before the conductor starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<InputFile>,
    /// The testrun's secrets (see [`TestrunRequest::secrets`]); they reach
    /// only the worker that runs the task, inside the sealed dispatch.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, String>,
    /// A health check of the worker's device (PROTOCOL.md §5.5).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub health_check: bool,
    /// Run the worker's `[recovery] command` before this task: a health
    /// check that follows a failure.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub recover: bool,
    /// Not a test: hold the device for a lease (PROTOCOL.md §18.3) until
    /// cancelled — its console's output and input, power actions and
    /// notes go into the task's log, the lease's transcript.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold: Option<crate::protocol::leasing::HoldSpec>,
    /// The task runs on a leased device (`run --lease`): the device's raw
    /// output also goes out as `console_data` of this task, and
    /// `lease_input` for it is written to the device (PROTOCOL.md §18.5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_lease: Option<crate::protocol::leasing::LeaseId>,
}

/// Which stream of the conductor a log line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
    /// Lines the worker itself writes into the task log.
    Worker,
    /// The device's serial console, as the worker captured it.
    Serial,
}

/// One log line; `seq` counts from 1 within a task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    pub seq: u64,
    pub stream: Stream,
    pub text: String,
}

/// One part of a packed log message: `count` lines of one stream numbered
/// from `first`, whose text is the next `bytes` bytes of the raw frame
/// ([`crate::protocol::logtext`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogPart {
    pub first: u64,
    pub count: u32,
    pub stream: Stream,
    pub bytes: u32,
}

impl LogPart {
    /// The number of its last line (`first` for a part of one line).
    pub fn last(&self) -> u64 {
        self.first
            .saturating_add(u64::from(self.count))
            .saturating_sub(1)
    }
}

/// How the conductor ended, as the worker observed it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// Exit status if the conductor exited normally.
    pub exit_code: Option<i32>,
    /// Signal number if it was killed by a signal.
    pub signal: Option<i32>,
    /// The conductor could not be run at all (bad template, exec failure).
    pub failure: Option<String>,
    /// The worker killed it at the execution timeout.
    #[serde(default)]
    pub timed_out: bool,
    /// The worker killed it because the server cancelled the task.
    #[serde(default)]
    pub cancelled: bool,
    /// The worker process restarted while the conductor ran: the attempt
    /// did not finish and the server re-queues it per the retry rules.
    #[serde(default)]
    pub interrupted: bool,
    /// `failure` was caused by the testrun's own options (a
    /// `console.expect` it set that never appeared), not by the device or
    /// the worker: the user's failure, not retried, not counted against
    /// the worker (PROTOCOL.md §7.5).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub by_testrun: bool,
}

/// How a conductor ended, as a log line says it: `exit 0`, `signal 9`,
/// `timed out`, `cancelled`, `could not run: …`.
impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(why) = &self.failure {
            return write!(f, "could not run: {why}");
        }
        let mut parts = Vec::new();
        if let Some(code) = self.exit_code {
            parts.push(format!("exit {code}"));
        }
        if let Some(signal) = self.signal {
            parts.push(format!("signal {signal}"));
        }
        if self.timed_out {
            parts.push("timed out".to_string());
        }
        if self.cancelled {
            parts.push("cancelled".to_string());
        }
        if parts.is_empty() {
            parts.push("no exit status".to_string());
        }
        f.write_str(&parts.join(", "))
    }
}

/// A result file as stored or announced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    /// Relative path below the task's results directory, `/`-separated.
    pub name: String,
    pub size: u64,
    /// Lower-case hex SHA-256 of the whole file.
    pub sha256: String,
}

/// An input file of a testrun: the name the conductor sees (a relative
/// path below `{inputs_dir}`) and the content it names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputFile {
    pub name: String,
    pub size: u64,
    /// Lower-case hex SHA-256: the stored input's identity.
    pub sha256: String,
}

/// A result file the worker could not deliver, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileProblem {
    pub name: String,
    pub reason: String,
}
