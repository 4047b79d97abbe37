//! The scheduler's settings: its rules and bounds, made of the server's
//! configuration at the top (`server::config`).

use crate::delivery::RetryPolicy;
use crate::protocol::*;
use crate::server::health::{HealthCheck, HealthPolicy};
use std::collections::BTreeMap;
use std::time::Duration;

/// Timing and retry rules of the scheduler.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Server heartbeat interval; also what workers are expected to keep.
    pub heartbeat: Duration,
    /// Missed intervals before a worker counts as lost.
    pub liveness: u32,
    /// A dispatch is stale this long after it was sent.
    pub dispatch_ttl: Duration,
    /// How long a lost worker's task is held before it is re-queued.
    pub lost_grace: Duration,
    /// Attempts per task before it ends in ERROR.
    pub max_attempts: u32,
    /// A task nobody started within this ends in ERROR.
    pub queue_timeout: Duration,
    /// Server backstop: a running task ends in ERROR this long after its
    /// own execution timeout if the worker never reported.
    pub backstop_grace: Duration,
    /// Resend timing of the server's mandatory messages (dispatch, cancel).
    pub retry: RetryPolicy,
    /// Bounds on what peers can make the scheduler hold.
    pub limits: SchedulerLimits,
    /// Finished testruns keep their result files and logs this long…
    pub retention_age: Duration,
    /// …and all finished testruns together at most this many bytes of
    /// them (oldest pruned first).
    pub retention_bytes: u64,
    /// Security on (`security = "noise"`): every connection is
    /// authenticated by the shell's gate and told to the scheduler with
    /// [`Scheduler::on_authenticated`]; requests are checked against roles,
    /// heartbeats and shutdown are published signed, follower traffic goes
    /// over control connections only.
    pub secure: bool,
    /// Key that seals testrun secrets at rest in the state database
    /// (derived from the server's private key); none without security.
    pub secrets_key: Option<[u8; 32]>,
    /// With security: the public half of the key the shell signs
    /// broadcasts with, told to each worker in its sealed welcome.
    pub events_key: Option<[u8; 32]>,
    /// When a worker turns suspect and how a bad one is retried.
    pub health: HealthPolicy,
    /// Conductor exit statuses that mean "the device or the worker
    /// failed", not the test: the task runs again on another worker.
    pub infrastructure_exit_codes: Vec<i32>,
    /// Health checks per device group.
    pub checks: BTreeMap<String, HealthCheck>,
    /// Fair-share weights per user name or `role:ROLE` (default 1).
    pub weights: BTreeMap<String, u32>,
    /// How far `high` moves a task ahead of its owner's other tasks, and
    /// `low` behind: a low task waits at most twice this behind high
    /// ones queued after it.
    pub priority_lead: Duration,
    /// The web dashboard is served: `web_login` requests are taken (by
    /// the shell, which holds the sessions) instead of refused.
    pub web: bool,
    /// Notification targets and the outbox's rules (`[notify]`).
    pub notify: crate::notify::outbox::Rules,
    /// With PostgreSQL: the epoch of the lease this server leads under.
    pub epoch: Option<u64>,
    /// With PostgreSQL: the lease, as `ping` answers it.
    pub lease: Option<LeaseInfo>,
    /// Device leases to people (`[leases]`).
    pub leases: crate::server::leasing::LeaseRules,
    /// How much history is held in memory, and reads of the rest
    /// (`[history]`).
    pub history: HistoryRules,
    /// Triage's window and the known-issue rules of `server.toml`.
    pub results: ResultsRules,
}

/// `[results]` in `conf/server.toml`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResultsRules {
    /// Testruns of a series whose results say whether a failure is flaky
    /// or device-specific.
    pub window_runs: u32,
    /// The newest finished testruns `list_flaky` looks at.
    pub flaky_runs: u32,
    /// Known-issue rules of the configuration (id 0).
    pub known: Vec<crate::protocol::results::KnownRule>,
    /// How often the usage series' hours are written (a minute's rows
    /// leave at each minute in any case).
    pub usage_flush_ms: u64,
}

impl Default for ResultsRules {
    fn default() -> Self {
        ResultsRules {
            window_runs: 10,
            flaky_runs: 50,
            known: Vec::new(),
            usage_flush_ms: 60_000,
        }
    }
}

/// How much history the scheduler holds, and how many reads of the rest
/// may wait (`[history]` in `conf/server.toml`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryRules {
    /// Ended testruns held in memory (those that ended or were read most
    /// recently); the others are read from the database when asked for.
    pub cache_runs: usize,
    /// Requests waiting for a read of the database, in all and per user
    /// (per connection without security); past them a request is refused
    /// with `limit_reached`.
    pub max_reads: usize,
    pub max_reads_per_user: usize,
}

impl Default for HistoryRules {
    fn default() -> Self {
        HistoryRules {
            cache_runs: 256,
            max_reads: 256,
            max_reads_per_user: 32,
        }
    }
}

/// What peers can make the scheduler hold, at most. Each bound is
/// configurable (`[limits]` in `conf/server.toml`) and listed in the
/// README's Limits table with what a peer sees when it hits it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchedulerLimits {
    /// Unfinished tasks (queued, dispatched, running, held) in all. A submit
    /// that would exceed it is refused with `limit_reached`.
    pub max_open_tasks: usize,
    /// Unfinished tasks and testruns of one owner (a user, with security):
    /// past them that owner's submit is refused naming the quota, so no
    /// single user can fill `max_open_tasks` and lock everyone out.
    pub max_open_tasks_per_owner: usize,
    pub max_open_runs_per_owner: usize,
    /// Bytes of one task attempt's stored log; lines past it are dropped
    /// and counted (`log_lines_over_limit`), the report says so.
    pub max_task_log_bytes: u64,
    /// Separate runs of received log line numbers kept per task; a line
    /// that would open one more is dropped and counted, so a peer sending
    /// every other number cannot make the accounting grow without bound.
    pub max_log_gaps: usize,
    /// Largest result file, and all result files of one task attempt.
    pub max_file_bytes: u64,
    pub max_task_file_bytes: u64,
    /// All stored result files together; an offer past it is refused.
    pub max_stored_file_bytes: u64,
    /// Credit of one upload, and of all uploads together (PROTOCOL §7.7).
    pub file_window_bytes: u64,
    pub file_buffer_bytes: u64,
    /// Times a task may be refused by workers (refusals use no attempt)
    /// before it ends in ERROR.
    pub max_refusals: u32,
    /// Workers in the registry (every name ever registered, live or lost);
    /// a `hello` with a new name past it gets `limit_reached`.
    pub max_workers: usize,
}

impl Default for SchedulerLimits {
    fn default() -> Self {
        SchedulerLimits {
            max_open_tasks: 10_000,
            max_open_tasks_per_owner: 2_500,
            max_open_runs_per_owner: 1_000,
            max_task_log_bytes: 256 * 1024 * 1024,
            max_log_gaps: 4096,
            max_file_bytes: 4 * 1024 * 1024 * 1024,
            max_task_file_bytes: 16 * 1024 * 1024 * 1024,
            max_stored_file_bytes: 1 << 40,
            file_window_bytes: 8 * 1024 * 1024,
            file_buffer_bytes: 64 * 1024 * 1024,
            max_refusals: 20,
            max_workers: 10_000,
        }
    }
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            heartbeat: Duration::from_secs(1),
            liveness: 3,
            dispatch_ttl: Duration::from_secs(30),
            lost_grace: Duration::from_secs(30),
            max_attempts: 3,
            queue_timeout: Duration::from_secs(24 * 3600),
            backstop_grace: Duration::from_secs(60),
            retry: RetryPolicy::default(),
            limits: SchedulerLimits::default(),
            retention_age: Duration::from_secs(90 * 24 * 3600),
            retention_bytes: 512 << 30,
            secure: false,
            secrets_key: None,
            events_key: None,
            health: HealthPolicy::default(),
            infrastructure_exit_codes: vec![3],
            checks: BTreeMap::new(),
            weights: BTreeMap::new(),
            priority_lead: Duration::from_secs(600),
            web: false,
            notify: crate::notify::outbox::Rules::default(),
            epoch: None,
            lease: None,
            leases: crate::server::leasing::LeaseRules::default(),
            history: HistoryRules::default(),
            results: ResultsRules::default(),
        }
    }
}
